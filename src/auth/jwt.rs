//! Access-token validation (spec §4.1–§4.4) and the token-lifetime
//! arithmetic of §4.7.
//!
//! [`TokenValidator::validate`] is the one place that turns a bearer string
//! into a [`VerifiedToken`]; later code (sign-up, sign-in, sign-out,
//! sign-off, refresh: §4.5) takes that type, so a skipped check cannot
//! compile (STYLE.md §4). Device-ID resolution (§4.3) and the sign-in
//! deadline / `expiresin` values (§4.7) are pure functions of a
//! `VerifiedToken` and the caller's `now`.
//!
//! Cryptography: jsonwebtoken 10+ has no ring backend, and without an
//! installed `CryptoProvider` it panics on first use (FIELD-NOTES.md). This
//! module supplies a ring-backed provider ([`install_crypto_provider`]) for
//! ES256/ES384, RS256/384/512, PS256/384/512 and EdDSA; the validator's and
//! the authority's constructors install it, so no path of ours reaches the
//! panicking default. HMAC (HS*) is deliberately absent: the gateway never
//! shares a secret with an issuer, and accepting HS* next to published
//! public keys is the classic key-confusion forgery.
//!
//! Sans-IO: `now` is an argument. jsonwebtoken's own `exp`/`nbf` checks read
//! the system clock, so they are switched off and the time claims are
//! checked here against the caller's `now_unix` instead.
//!
//! Deliberate differences from the reference (spec §14 item 4): `aud` is
//! checked when an audience is configured (the reference accepts the
//! setting but ignores it), and `nbf`/`iat` get a fixed clock-skew leeway.

use std::str::FromStr;
use std::sync::{Once, OnceLock};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD_INDIFFERENT;
use base64::Engine;
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error as LibError, ErrorKind as LibErrorKind};
use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
use jsonwebtoken::signature::{Error as SignatureError, Signer, Verifier};
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey, Header, Validation,
};
use ring::rand::SystemRandom;
use ring::signature as ring_sig;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::jwks::{Jwks, KeyLookupError};

/// plgd's device-ID claim (spec §4.2), the default of
/// `[authorization] device_id_claim` and what the embedded authority puts
/// in access tokens.
pub const DEFAULT_DEVICE_ID_CLAIM: &str = "https://plgd.dev/deviceId";

/// Default owner claim (spec §4.2).
pub const DEFAULT_OWNER_CLAIM: &str = "sub";

/// How far in the future `nbf` and `iat` may lie: tolerates an issuer
/// whose clock runs up to a minute ahead of ours. `exp` gets no leeway —
/// RFC 7519 §4.1.4 says "before", and the sign-in margin of §4.7 already
/// keeps two owner-cache periods in hand.
pub const CLOCK_SKEW_LEEWAY_SECS: u64 = 60;

/// Budget for a bearer token from a device: real tokens are 0.5–2 KiB; a
/// larger one is refused before any base64 or JSON work.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Claim naming what a token of the embedded authority is for. Only
/// [`PURPOSE_ACCESS`] may be used as an access token, so an authorization
/// code (same key, same issuer) can never sign a device in.
pub const PURPOSE_CLAIM: &str = "purpose";
/// [`PURPOSE_CLAIM`] value of access and user tokens.
pub const PURPOSE_ACCESS: &str = "access";
/// [`PURPOSE_CLAIM`] value of authorization codes.
pub const PURPOSE_AUTHORIZATION_CODE: &str = "authorization_code";
/// JWS header `typ` of authorization codes (explicit typing, RFC 8725
/// §3.11); the validator refuses it.
pub const CODE_TYP: &str = "authz-code+jwt";
/// JWS header `typ` of the embedded authority's access tokens (RFC 9068).
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

// ---------------------------------------------------------------------------
// The ring CryptoProvider.

static INSTALL: Once = Once::new();
static RING_PROVIDER_ACTIVE: OnceLock<bool> = OnceLock::new();

/// Installs the ring-backed jsonwebtoken `CryptoProvider` as the process
/// default, once. Returns whether ours is the active provider: `false`
/// means something installed another provider first (or used jsonwebtoken
/// before any provider was installed, which latches its panicking default),
/// and [`TokenValidator::new`] then refuses to build.
pub fn install_crypto_provider() -> bool {
    INSTALL.call_once(|| {
        let installed = RING_PROVIDER.install_default().is_ok();
        let _ = RING_PROVIDER_ACTIVE.set(installed);
    });
    RING_PROVIDER_ACTIVE.get().copied().unwrap_or(false)
}

static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: rsa_components_from_private_key,
        rsa_pub_components_from_public_key: rsa_components_from_public_key,
        ec_pub_components_from_private_key: ec_components_from_private_key,
        ed_pub_components_from_private_key: ed_components_from_private_key,
        compute_digest,
    },
};

type LibResult<T> = Result<T, LibError>;

fn provider_error(what: &str) -> LibError {
    LibErrorKind::Provider(what.to_owned()).into()
}

/// What ring needs to sign with one JWS algorithm.
enum SigningScheme {
    Ecdsa(&'static ring_sig::EcdsaSigningAlgorithm),
    Rsa(&'static dyn ring_sig::RsaEncoding),
    Ed25519,
}

fn signing_scheme(alg: Algorithm) -> LibResult<SigningScheme> {
    use Algorithm::*;
    Ok(match alg {
        ES256 => SigningScheme::Ecdsa(&ring_sig::ECDSA_P256_SHA256_FIXED_SIGNING),
        ES384 => SigningScheme::Ecdsa(&ring_sig::ECDSA_P384_SHA384_FIXED_SIGNING),
        RS256 => SigningScheme::Rsa(&ring_sig::RSA_PKCS1_SHA256),
        RS384 => SigningScheme::Rsa(&ring_sig::RSA_PKCS1_SHA384),
        RS512 => SigningScheme::Rsa(&ring_sig::RSA_PKCS1_SHA512),
        PS256 => SigningScheme::Rsa(&ring_sig::RSA_PSS_SHA256),
        PS384 => SigningScheme::Rsa(&ring_sig::RSA_PSS_SHA384),
        PS512 => SigningScheme::Rsa(&ring_sig::RSA_PSS_SHA512),
        EdDSA => SigningScheme::Ed25519,
        _ => return Err(LibErrorKind::UnsupportedAlgorithm.into()),
    })
}

enum RingKeyPair {
    Ecdsa(ring_sig::EcdsaKeyPair),
    Rsa(ring_sig::RsaKeyPair, &'static dyn ring_sig::RsaEncoding),
    Ed25519(ring_sig::Ed25519KeyPair),
}

struct RingSigner {
    alg: Algorithm,
    pair: RingKeyPair,
}

impl Signer<Vec<u8>> for RingSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, SignatureError> {
        let rng = SystemRandom::new();
        match &self.pair {
            RingKeyPair::Ecdsa(pair) => pair
                .sign(&rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| SignatureError::new()),
            RingKeyPair::Rsa(pair, encoding) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(*encoding, &rng, msg, &mut signature)
                    .map_err(|_| SignatureError::new())?;
                Ok(signature)
            }
            RingKeyPair::Ed25519(pair) => Ok(pair.sign(msg).as_ref().to_vec()),
        }
    }
}

impl JwtSigner for RingSigner {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// Private keys are PKCS#8 DER (RSA also PKCS#1 `RSAPrivateKey`, the form
/// jsonwebtoken's own PEM reader hands over).
fn new_signer(alg: &Algorithm, key: &EncodingKey) -> LibResult<Box<dyn JwtSigner>> {
    let alg = *alg;
    if key.family() != alg.family() {
        return Err(LibErrorKind::InvalidKeyFormat.into());
    }
    let der = key.as_bytes();
    let pair = match signing_scheme(alg)? {
        SigningScheme::Ecdsa(signing) => RingKeyPair::Ecdsa(
            ring_sig::EcdsaKeyPair::from_pkcs8(signing, der, &SystemRandom::new())
                .map_err(|_| LibErrorKind::InvalidEcdsaKey)?,
        ),
        SigningScheme::Rsa(encoding) => RingKeyPair::Rsa(
            ring_sig::RsaKeyPair::from_pkcs8(der)
                .or_else(|_| ring_sig::RsaKeyPair::from_der(der))
                .map_err(|e| LibErrorKind::InvalidRsaKey(e.to_string()))?,
            encoding,
        ),
        SigningScheme::Ed25519 => RingKeyPair::Ed25519(
            ring_sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                .map_err(|_| LibErrorKind::InvalidEddsaKey)?,
        ),
    };
    Ok(Box::new(RingSigner { alg, pair }))
}

enum PublicKeyMaterial {
    /// SEC 1 point (ECDSA), raw 32 bytes (Ed25519) or DER `RSAPublicKey`.
    Raw(Vec<u8>),
    /// RSA modulus and exponent, big-endian (from a JWK).
    RsaComponents { n: Vec<u8>, e: Vec<u8> },
}

struct RingVerifier {
    alg: Algorithm,
    algorithm: &'static dyn ring_sig::VerificationAlgorithm,
    rsa: Option<&'static ring_sig::RsaParameters>,
    key: PublicKeyMaterial,
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), SignatureError> {
        let result = match (&self.key, self.rsa) {
            (PublicKeyMaterial::Raw(bytes), _) => {
                ring_sig::UnparsedPublicKey::new(self.algorithm, bytes).verify(msg, signature)
            }
            (PublicKeyMaterial::RsaComponents { n, e }, Some(params)) => {
                ring_sig::RsaPublicKeyComponents { n, e }.verify(params, msg, signature)
            }
            (PublicKeyMaterial::RsaComponents { .. }, None) => return Err(SignatureError::new()),
        };
        result.map_err(|_| SignatureError::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// RSA verification takes 2048–8192-bit keys only (ring's bounds); smaller
/// keys fail every signature.
fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> LibResult<Box<dyn JwtVerifier>> {
    use Algorithm::*;
    let alg = *alg;
    if key.family() != alg.family() {
        return Err(LibErrorKind::InvalidKeyFormat.into());
    }
    let rsa: Option<&'static ring_sig::RsaParameters> = match alg {
        RS256 => Some(&ring_sig::RSA_PKCS1_2048_8192_SHA256),
        RS384 => Some(&ring_sig::RSA_PKCS1_2048_8192_SHA384),
        RS512 => Some(&ring_sig::RSA_PKCS1_2048_8192_SHA512),
        PS256 => Some(&ring_sig::RSA_PSS_2048_8192_SHA256),
        PS384 => Some(&ring_sig::RSA_PSS_2048_8192_SHA384),
        PS512 => Some(&ring_sig::RSA_PSS_2048_8192_SHA512),
        _ => None,
    };
    let algorithm: &'static dyn ring_sig::VerificationAlgorithm = match (alg, rsa) {
        (_, Some(params)) => params,
        (ES256, None) => &ring_sig::ECDSA_P256_SHA256_FIXED,
        (ES384, None) => &ring_sig::ECDSA_P384_SHA384_FIXED,
        (EdDSA, None) => &ring_sig::ED25519,
        _ => return Err(LibErrorKind::UnsupportedAlgorithm.into()),
    };
    let key = match key.kind() {
        DecodingKeyKind::SecretOrDer(bytes) => PublicKeyMaterial::Raw(bytes.clone()),
        DecodingKeyKind::RsaModulusExponent { n, e } if rsa.is_some() => {
            PublicKeyMaterial::RsaComponents {
                n: n.clone(),
                e: e.clone(),
            }
        }
        DecodingKeyKind::RsaModulusExponent { .. } => {
            return Err(LibErrorKind::InvalidKeyFormat.into())
        }
    };
    Ok(Box::new(RingVerifier {
        alg,
        algorithm,
        rsa,
        key,
    }))
}

fn rsa_components_from_private_key(der: &[u8]) -> LibResult<(Vec<u8>, Vec<u8>)> {
    let pair = ring_sig::RsaKeyPair::from_pkcs8(der)
        .or_else(|_| ring_sig::RsaKeyPair::from_der(der))
        .map_err(|e| LibErrorKind::InvalidRsaKey(e.to_string()))?;
    let components = ring_sig::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
    Ok((components.n, components.e))
}

/// ring has no public parser for a bare DER `RSAPublicKey`; nothing in the
/// gateway needs it (JWKs carry `n` and `e`), so this is an error rather
/// than the default provider's panic.
fn rsa_components_from_public_key(_der: &[u8]) -> LibResult<(Vec<u8>, Vec<u8>)> {
    Err(provider_error(
        "the ring provider cannot split a DER RSA public key; use the JWK's n and e",
    ))
}

fn ec_components_from_private_key(
    der: &[u8],
    alg: Algorithm,
) -> LibResult<(EllipticCurve, Vec<u8>, Vec<u8>)> {
    let (signing, curve, len): (&'static ring_sig::EcdsaSigningAlgorithm, _, _) = match alg {
        Algorithm::ES256 => (
            &ring_sig::ECDSA_P256_SHA256_FIXED_SIGNING,
            EllipticCurve::P256,
            32,
        ),
        Algorithm::ES384 => (
            &ring_sig::ECDSA_P384_SHA384_FIXED_SIGNING,
            EllipticCurve::P384,
            48,
        ),
        _ => return Err(LibErrorKind::InvalidEcdsaKey.into()),
    };
    let pair = ring_sig::EcdsaKeyPair::from_pkcs8(signing, der, &SystemRandom::new())
        .map_err(|_| LibErrorKind::InvalidEcdsaKey)?;
    use ring_sig::KeyPair;
    match pair.public_key().as_ref() {
        [0x04, rest @ ..] if rest.len() == 2 * len => {
            let (x, y) = rest.split_at(len);
            Ok((curve, x.to_vec(), y.to_vec()))
        }
        _ => Err(LibErrorKind::InvalidEcdsaKey.into()),
    }
}

fn ed_components_from_private_key(der: &[u8], curve: &EllipticCurve) -> LibResult<Vec<u8>> {
    if *curve != EllipticCurve::Ed25519 {
        return Err(LibErrorKind::InvalidAlgorithm.into());
    }
    let pair = ring_sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
        .map_err(|_| LibErrorKind::InvalidEddsaKey)?;
    use ring_sig::KeyPair;
    Ok(pair.public_key().as_ref().to_vec())
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> LibResult<Vec<u8>> {
    let algorithm = match hash {
        ThumbprintHash::SHA256 => &ring::digest::SHA256,
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
        _ => return Err(provider_error("unsupported thumbprint hash")),
    };
    Ok(ring::digest::digest(algorithm, data).as_ref().to_vec())
}

// ---------------------------------------------------------------------------
// Settings and errors.

/// `[authorization] mode` (spec §4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthorizationMode {
    /// "Valid token with device-ID claim": the token must carry the device
    /// ID in `device_id_claim`, and with mTLS it must equal the
    /// certificate's.
    #[default]
    DeviceIdClaim,
    /// "Valid token only": any valid token of the owner; the device ID comes
    /// from the certificate or the request. The device-ID claim is not read.
    ValidToken,
}

/// What a token must satisfy besides its signature (spec §4.1, §4.2).
/// Empty strings count as unset, as in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationSettings {
    /// Required `iss` (canonicalised: a trailing slash is ignored, §4.1).
    /// `None`: any issuer whose key is in the set.
    pub issuer: Option<String>,
    /// Required `aud` member. `None`: `aud` is ignored.
    pub audience: Option<String>,
    /// Claim holding the owner (§4.2), `sub` by default.
    pub owner_claim: String,
    /// Claim holding the device ID (§4.2); required in
    /// [`AuthorizationMode::DeviceIdClaim`].
    pub device_id_claim: Option<String>,
    /// §4.4.
    pub mode: AuthorizationMode,
}

impl Default for ValidationSettings {
    fn default() -> Self {
        ValidationSettings {
            issuer: None,
            audience: None,
            owner_claim: DEFAULT_OWNER_CLAIM.to_owned(),
            device_id_claim: Some(DEFAULT_DEVICE_ID_CLAIM.to_owned()),
            mode: AuthorizationMode::DeviceIdClaim,
        }
    }
}

/// Why a [`TokenValidator`] cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// §4.2: the owner claim is required configuration.
    #[error("authorization.owner_claim must not be empty")]
    EmptyOwnerClaim,
    /// §4.4: the device-ID-claim mode needs the claim's name.
    #[error(
        "authorization.mode = \"device-id-claim\" needs a non-empty authorization.device_id_claim"
    )]
    MissingDeviceIdClaim,
    /// Another jsonwebtoken `CryptoProvider` won the process-wide install
    /// (or jsonwebtoken was used before any was installed): tokens could
    /// not be verified, or verification would panic.
    #[error("another jsonwebtoken CryptoProvider is installed; call auth::jwt::install_crypto_provider() before any other jsonwebtoken use")]
    ForeignCryptoProvider,
}

/// Why a token was refused. Every variant maps to 4.01 at the CoAP layer
/// (spec §4.3, §5.2–§5.6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("token is {len} bytes, more than the {max} accepted")]
    TooLong {
        /// The token's length.
        len: usize,
        /// The budget.
        max: usize,
    },
    /// Not a three-part JWS compact serialisation with a JSON header and
    /// payload.
    #[error("token is malformed: {0}")]
    Malformed(String),
    /// `alg: none` (RFC 7518 §3.6): an unsigned token is never accepted.
    #[error("token is unsigned (alg \"none\")")]
    Unsigned,
    /// An algorithm we do not verify (HS* included, by design).
    #[error("token algorithm {0:?} is not accepted")]
    UnsupportedAlgorithm(String),
    /// A `crit` header names extensions we do not understand (RFC 7515
    /// §4.1.11 requires rejecting the token).
    #[error("token header lists critical extensions {0:?}")]
    CriticalHeader(Vec<String>),
    /// No key of the set fits (unknown `kid`, algorithm mismatch).
    #[error(transparent)]
    Key(#[from] KeyLookupError),
    /// The signature does not verify with the key.
    #[error("token signature is invalid")]
    BadSignature,
    /// The key could not be used for the algorithm.
    #[error("token key is unusable: {0}")]
    KeyUnusable(String),
    /// A claim has the wrong JSON type (§4.1: a malformed `exp` is a
    /// validation error; §4.3: a non-string device ID is an error).
    #[error("claim {claim:?} must be {expected}")]
    InvalidClaim {
        /// The claim.
        claim: String,
        /// What it must be.
        expected: &'static str,
    },
    /// `now ≥ exp`.
    #[error("token expired at {exp} (now {now})")]
    Expired {
        /// The token's `exp`.
        exp: u64,
        /// The caller's `now`.
        now: u64,
    },
    /// `nbf` more than the leeway in the future.
    #[error("token is not valid before {nbf} (now {now})")]
    NotYetValid {
        /// The token's `nbf`.
        nbf: u64,
        /// The caller's `now`.
        now: u64,
    },
    /// `iat` more than the leeway in the future (§4.1).
    #[error("token is issued in the future ({iat}, now {now})")]
    IssuedInFuture {
        /// The token's `iat`.
        iat: u64,
        /// The caller's `now`.
        now: u64,
    },
    /// `iss` differs from the configured issuer, or is missing.
    #[error("token issuer {found:?} is not {expected:?}")]
    WrongIssuer {
        /// The configured issuer.
        expected: String,
        /// The token's `iss`.
        found: Option<String>,
    },
    /// `aud` does not contain the configured audience.
    #[error("token audience does not include {expected:?}")]
    WrongAudience {
        /// The configured audience.
        expected: String,
    },
    /// The owner claim is missing or empty (§4.5).
    #[error("token lacks the owner claim {claim:?}")]
    MissingOwnerClaim {
        /// The configured owner claim.
        claim: String,
    },
    /// §4.3 step 1: the configured device-ID claim is missing or empty.
    #[error("token lacks the device id claim {claim:?}")]
    MissingDeviceIdClaim {
        /// The configured device-ID claim.
        claim: String,
    },
    /// An authorization code or other non-access token of the embedded
    /// authority.
    #[error("token is not an access token")]
    NotAnAccessToken,
}

impl JwtError {
    /// Whether the control plane should re-fetch the issuer's key set and
    /// retry once (spec §4.1: "on a cache miss the JWKS is re-fetched once").
    pub fn is_unknown_key(&self) -> bool {
        matches!(self, JwtError::Key(KeyLookupError::UnknownKid(_)))
    }
}

// ---------------------------------------------------------------------------
// The validator.

/// A token that passed [`TokenValidator::validate`]. Only that function
/// builds one (private fields), so code that takes it cannot skip the
/// checks.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    owner: String,
    device_id_claim: Option<String>,
    subject: Option<String>,
    token_id: Option<String>,
    issuer: Option<String>,
    expires_at: Option<u64>,
    claims: Map<String, Value>,
}

impl VerifiedToken {
    /// The owner (user ID): the owner claim, or the fallback of
    /// [`TokenValidator::validate_with_owner_fallback`].
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The device-ID claim's value. Always `Some` and non-empty in
    /// [`AuthorizationMode::DeviceIdClaim`]; always `None` in
    /// [`AuthorizationMode::ValidToken`], where the claim is not read.
    pub fn device_id_claim(&self) -> Option<&str> {
        self.device_id_claim.as_deref()
    }

    /// `sub`.
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// `jti`.
    pub fn token_id(&self) -> Option<&str> {
        self.token_id.as_deref()
    }

    /// `iss`.
    pub fn issuer(&self) -> Option<&str> {
        self.issuer.as_deref()
    }

    /// `exp` in unix seconds; `None` for a token without expiry (spec §14
    /// item 15: such a token is never cut off).
    pub fn expires_at(&self) -> Option<u64> {
        self.expires_at
    }

    /// All claims, as sent.
    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }
}

/// Checks access tokens against one issuer's key set (spec §4.1).
#[derive(Debug, Clone)]
pub struct TokenValidator {
    keys: Jwks,
    settings: ValidationSettings,
}

impl TokenValidator {
    /// Builds a validator; installs the ring provider first.
    pub fn new(keys: Jwks, settings: ValidationSettings) -> Result<Self, SettingsError> {
        if !install_crypto_provider() {
            return Err(SettingsError::ForeignCryptoProvider);
        }
        let settings = normalise(settings);
        if settings.owner_claim.is_empty() {
            return Err(SettingsError::EmptyOwnerClaim);
        }
        if settings.mode == AuthorizationMode::DeviceIdClaim && settings.device_id_claim.is_none() {
            return Err(SettingsError::MissingDeviceIdClaim);
        }
        Ok(TokenValidator { keys, settings })
    }

    /// The effective settings (empty strings turned into `None`).
    pub fn settings(&self) -> &ValidationSettings {
        &self.settings
    }

    /// The key set in use.
    pub fn keys(&self) -> &Jwks {
        &self.keys
    }

    /// Replaces the key set (after the control plane re-fetched it).
    pub fn set_keys(&mut self, keys: Jwks) {
        self.keys = keys;
    }

    /// Validates an access token at `now_unix` (seconds): signature with the
    /// key its header names, time claims, issuer and audience when
    /// configured, owner claim, and in device-ID-claim mode the device-ID
    /// claim (§4.3 step 1).
    pub fn validate(&self, token: &str, now_unix: u64) -> Result<VerifiedToken, JwtError> {
        self.check(token, now_unix, None)
    }

    /// As [`validate`](Self::validate), but a token without an owner claim
    /// takes `fallback_owner` (token refresh, spec §4.5 / §5.6: "owner from
    /// claim, falling back to `uid`"). An owner claim of the wrong type is
    /// still an error.
    pub fn validate_with_owner_fallback(
        &self,
        token: &str,
        fallback_owner: &str,
        now_unix: u64,
    ) -> Result<VerifiedToken, JwtError> {
        self.check(token, now_unix, Some(fallback_owner))
    }

    fn check(
        &self,
        token: &str,
        now: u64,
        fallback_owner: Option<&str>,
    ) -> Result<VerifiedToken, JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::TooLong {
                len: token.len(),
                max: MAX_TOKEN_LEN,
            });
        }
        let header = parse_header(token)?;
        if header
            .typ
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case(CODE_TYP))
        {
            return Err(JwtError::NotAnAccessToken);
        }
        let key = self.keys.find(header.kid.as_deref(), header.alg)?;
        let claims = decode_verified(token, key.decoding_key(), header.alg)?;

        let times = TimeClaims::read(&claims)?;
        times.check(now)?;
        match claims.get(PURPOSE_CLAIM) {
            None => {}
            Some(Value::String(p)) if p == PURPOSE_ACCESS => {}
            Some(_) => return Err(JwtError::NotAnAccessToken),
        }
        let issuer = optional_string(&claims, "iss")?;
        if let Some(expected) = &self.settings.issuer {
            let matches = issuer
                .as_deref()
                .is_some_and(|iss| canonical_issuer(iss) == canonical_issuer(expected));
            if !matches {
                return Err(JwtError::WrongIssuer {
                    expected: expected.clone(),
                    found: issuer,
                });
            }
        }
        if let Some(expected) = &self.settings.audience {
            if !audience_contains(claims.get("aud"), expected) {
                return Err(JwtError::WrongAudience {
                    expected: expected.clone(),
                });
            }
        }
        let owner = match optional_string(&claims, &self.settings.owner_claim)? {
            Some(owner) if !owner.is_empty() => owner,
            _ => match fallback_owner {
                Some(fallback) if !fallback.is_empty() => fallback.to_owned(),
                _ => {
                    return Err(JwtError::MissingOwnerClaim {
                        claim: self.settings.owner_claim.clone(),
                    })
                }
            },
        };
        // §4.3 step 1; §4.4: the claim is only read in device-ID-claim mode.
        let device_id_claim = match (&self.settings.mode, &self.settings.device_id_claim) {
            (AuthorizationMode::DeviceIdClaim, Some(claim)) => {
                match optional_string(&claims, claim)? {
                    Some(id) if !id.is_empty() => Some(id),
                    _ => {
                        return Err(JwtError::MissingDeviceIdClaim {
                            claim: claim.clone(),
                        })
                    }
                }
            }
            _ => None,
        };
        Ok(VerifiedToken {
            owner,
            device_id_claim,
            subject: optional_string(&claims, "sub")?,
            token_id: optional_string(&claims, "jti")?,
            issuer,
            expires_at: times.exp,
            claims,
        })
    }
}

fn normalise(mut settings: ValidationSettings) -> ValidationSettings {
    let unset_empty = |v: Option<String>| v.filter(|s| !s.is_empty());
    settings.issuer = unset_empty(settings.issuer);
    settings.audience = unset_empty(settings.audience);
    settings.device_id_claim = unset_empty(settings.device_id_claim);
    settings
}

/// §4.1: issuers are compared with a trailing slash ignored.
fn canonical_issuer(issuer: &str) -> &str {
    issuer.strip_suffix('/').unwrap_or(issuer)
}

/// RFC 7519 §4.1.3: `aud` is a string or an array of strings.
fn audience_contains(aud: Option<&Value>, expected: &str) -> bool {
    match aud {
        Some(Value::String(a)) => a == expected,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(expected)),
        _ => false,
    }
}

pub(crate) struct TokenHeader {
    pub(crate) alg: Algorithm,
    pub(crate) kid: Option<String>,
    pub(crate) typ: Option<String>,
}

/// Reads the JWS header, telling apart the refusals a device operator
/// needs to see (`alg: none`, an algorithm we do not take) from plain
/// garbage.
pub(crate) fn parse_header(token: &str) -> Result<TokenHeader, JwtError> {
    let segments = token.split('.').count();
    if segments != 3 {
        return Err(JwtError::Malformed(if segments == 5 {
            "encrypted tokens (JWE) are not supported".to_owned()
        } else {
            format!("expected 3 dot-separated parts, found {segments}")
        }));
    }
    let header: Header = match jsonwebtoken::decode_header(token) {
        Ok(header) => header,
        Err(error) => return Err(classify_header_error(token, &error)),
    };
    let alg = header.alg;
    if alg.family() == AlgorithmFamily::Hmac {
        return Err(JwtError::UnsupportedAlgorithm(format!("{alg:?}")));
    }
    if let Some(crit) = header.crit {
        return Err(JwtError::CriticalHeader(crit));
    }
    Ok(TokenHeader {
        alg,
        kid: header.kid,
        typ: header.typ,
    })
}

fn classify_header_error(token: &str, error: &LibError) -> JwtError {
    let raw_alg = token
        .split('.')
        .next()
        .and_then(|h| URL_SAFE_NO_PAD_INDIFFERENT.decode(h).ok())
        .and_then(|h| serde_json::from_slice::<Value>(&h).ok())
        .and_then(|h| h.get("alg").and_then(Value::as_str).map(str::to_owned));
    match raw_alg {
        Some(alg) if alg.eq_ignore_ascii_case("none") => JwtError::Unsigned,
        Some(alg) if Algorithm::from_str(&alg).is_err() => JwtError::UnsupportedAlgorithm(alg),
        _ => JwtError::Malformed(format!("bad header: {error}")),
    }
}

/// Verifies the signature with `key` for `alg` and returns the claims.
/// jsonwebtoken's time checks are off (they read the system clock); the
/// caller checks time claims against its `now`.
pub(crate) fn decode_verified(
    token: &str,
    key: &DecodingKey,
    alg: Algorithm,
) -> Result<Map<String, Value>, JwtError> {
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    match jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation) {
        Ok(data) => Ok(data.claims),
        Err(error) => Err(match error.kind() {
            LibErrorKind::InvalidSignature => JwtError::BadSignature,
            LibErrorKind::InvalidKeyFormat
            | LibErrorKind::InvalidEcdsaKey
            | LibErrorKind::InvalidEddsaKey
            | LibErrorKind::InvalidRsaKey(_)
            | LibErrorKind::UnsupportedAlgorithm
            | LibErrorKind::InvalidAlgorithm
            | LibErrorKind::Provider(_) => JwtError::KeyUnusable(error.to_string()),
            _ => JwtError::Malformed(error.to_string()),
        }),
    }
}

/// `exp`, `nbf`, `iat` as unix seconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TimeClaims {
    pub(crate) exp: Option<u64>,
    pub(crate) nbf: Option<u64>,
    pub(crate) iat: Option<u64>,
}

impl TimeClaims {
    pub(crate) fn read(claims: &Map<String, Value>) -> Result<Self, JwtError> {
        Ok(TimeClaims {
            exp: numeric_date(claims, "exp")?,
            nbf: numeric_date(claims, "nbf")?,
            iat: numeric_date(claims, "iat")?,
        })
    }

    /// RFC 7519 §4.1.4–§4.1.6 against the caller's clock; leeway
    /// [`CLOCK_SKEW_LEEWAY_SECS`] for `nbf` and `iat` only.
    pub(crate) fn check(&self, now: u64) -> Result<(), JwtError> {
        if let Some(exp) = self.exp {
            if now >= exp {
                return Err(JwtError::Expired { exp, now });
            }
        }
        let horizon = now.saturating_add(CLOCK_SKEW_LEEWAY_SECS);
        if let Some(nbf) = self.nbf {
            if nbf > horizon {
                return Err(JwtError::NotYetValid { nbf, now });
            }
        }
        if let Some(iat) = self.iat {
            if iat > horizon {
                return Err(JwtError::IssuedInFuture { iat, now });
            }
        }
        Ok(())
    }
}

/// RFC 7519 §2 NumericDate: a non-negative number of seconds; a fractional
/// value is truncated. Anything else (string, null, negative) is a
/// validation error (spec §4.1).
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, JwtError> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let invalid = || JwtError::InvalidClaim {
        claim: name.to_owned(),
        expected: "a non-negative NumericDate",
    };
    let Value::Number(number) = value else {
        return Err(invalid());
    };
    if let Some(seconds) = number.as_u64() {
        return Ok(Some(seconds));
    }
    match number.as_f64() {
        // Saturating float-to-int cast; the range check keeps it exact.
        Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => Ok(Some(f as u64)),
        _ => Err(invalid()),
    }
}

/// A claim that must be a string when present.
pub(crate) fn optional_string(
    claims: &Map<String, Value>,
    name: &str,
) -> Result<Option<String>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(JwtError::InvalidClaim {
            claim: name.to_owned(),
            expected: "a string",
        }),
    }
}

// ---------------------------------------------------------------------------
// Spec §4.3: device-ID resolution.

/// What the TLS layer knows about the device (spec §4.3 steps 2 and 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateDeviceId<'a> {
    /// TLS is off, or client certificates are not required
    /// (`client_auth = "none"`): the certificate plays no part (step 2).
    NotRequired,
    /// Mutual TLS: the device ID from the client certificate (§3.3), `None`
    /// when the certificate has no OCF identity (`client_auth = "any"`).
    Required(Option<&'a str>),
}

/// Why no device ID could be settled (spec §4.3); all map to 4.01.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    /// Step 3: mutual TLS but the certificate carries no device ID.
    #[error("the client certificate carries no device id")]
    NoCertificateDeviceId,
    /// Step 3: the token's device-ID claim names another device.
    #[error("token issued to another device ({token}, certificate says {certificate})")]
    IssuedToAnotherDevice {
        /// The token's device-ID claim.
        token: String,
        /// The certificate's device ID.
        certificate: String,
    },
    /// Step 4 ended with an empty ID (no claim, no certificate, no `di`).
    #[error("no device id in the token, the certificate or the request")]
    NoDeviceId,
}

/// Spec §4.3, the normative algorithm: the device a request speaks for.
/// With mutual TLS the certificate wins over the request's `di`; the token's
/// device-ID claim (read only in device-ID-claim mode) must agree with it.
///
/// IDs are compared as UUIDs when both parse (so `ABC…` and `abc…` agree;
/// the certificate ID is canonical lower case, §3.3) and byte for byte
/// otherwise. An empty result is an error rather than an empty ID.
pub fn resolve_device_id(
    token: &VerifiedToken,
    certificate: CertificateDeviceId<'_>,
    param_device_id: &str,
) -> Result<String, DeviceIdError> {
    let jwt_device_id = token.device_id_claim().filter(|id| !id.is_empty());
    let candidate = match certificate {
        // Step 2.
        CertificateDeviceId::NotRequired => jwt_device_id,
        // Step 3.
        CertificateDeviceId::Required(tls) => {
            let tls = tls
                .filter(|id| !id.is_empty())
                .ok_or(DeviceIdError::NoCertificateDeviceId)?;
            if let Some(jwt) = jwt_device_id {
                if !same_device_id(jwt, tls) {
                    return Err(DeviceIdError::IssuedToAnotherDevice {
                        token: jwt.to_owned(),
                        certificate: tls.to_owned(),
                    });
                }
            }
            Some(tls)
        }
    };
    // Step 4.
    match candidate.unwrap_or(param_device_id) {
        "" => Err(DeviceIdError::NoDeviceId),
        id => Ok(id.to_owned()),
    }
}

/// Device IDs are UUIDs (OCF `di`): compare them as such when both parse.
pub(crate) fn same_device_id(a: &str, b: &str) -> bool {
    match (Uuid::parse_str(a), Uuid::parse_str(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

// ---------------------------------------------------------------------------
// Spec §4.7: token lifetime and `expiresin`.

/// The sign-in lifetime rule failed (§4.5: remaining lifetime must be
/// ≥ 2 × `ownerCacheExpiration`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("token expires in {remaining_secs} s, less than the required {required_secs} s (2 × owner_cache_expiration)")]
pub struct LifetimeError {
    /// Seconds until `exp` (0 when already past).
    pub remaining_secs: u64,
    /// 2 × `owner_cache_expiration`, in whole seconds rounded up.
    pub required_secs: u64,
}

/// 2 × `owner_cache_expiration` in whole seconds, rounded up so a
/// sub-second setting never shortens the margin.
fn sign_in_margin_secs(owner_cache_expiration: Duration) -> u64 {
    let margin = owner_cache_expiration.saturating_mul(2);
    margin
        .as_secs()
        .saturating_add(u64::from(margin.subsec_nanos() > 0))
}

/// §4.7: the session deadline for a token, `exp − 2 × owner_cache_expiration`
/// (saturating at the epoch, so a tiny `exp` gives a deadline in the past,
/// never "no deadline"). `None` when the token has no `exp` (§14 item 15).
pub fn token_deadline(expires_at: Option<u64>, owner_cache_expiration: Duration) -> Option<u64> {
    expires_at.map(|exp| exp.saturating_sub(sign_in_margin_secs(owner_cache_expiration)))
}

/// Sign-in (§4.5, §4.7): the deadline to arm, after checking the remaining
/// lifetime is at least 2 × `owner_cache_expiration`. `Ok(None)`: no `exp`,
/// no deadline.
pub fn sign_in_deadline(
    expires_at: Option<u64>,
    owner_cache_expiration: Duration,
    now_unix: u64,
) -> Result<Option<u64>, LifetimeError> {
    let Some(exp) = expires_at else {
        return Ok(None);
    };
    let required_secs = sign_in_margin_secs(owner_cache_expiration);
    let remaining_secs = exp.saturating_sub(now_unix);
    if remaining_secs < required_secs {
        return Err(LifetimeError {
            remaining_secs,
            required_secs,
        });
    }
    Ok(Some(exp - required_secs))
}

/// Sign-up and refresh (§4.7): the expiry derived from the OAuth token
/// response's `expires_in`, no margin. `None` when the response had none.
pub fn oauth_expiry(expires_in_secs: Option<u64>, now_unix: u64) -> Option<u64> {
    expires_in_secs.map(|secs| now_unix.saturating_add(secs))
}

/// The `expiresin` value of sign-up, sign-in and refresh responses (§4.7,
/// §5.2, §5.4, §5.6): whole seconds from `now` until `deadline`, `-1` when
/// there is none. A deadline already passed gives 0, never a negative
/// number a device could read as "no expiry".
pub fn expires_in(deadline: Option<u64>, now_unix: u64) -> i64 {
    match deadline {
        None => -1,
        Some(deadline) => i64::try_from(deadline.saturating_sub(now_unix)).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::auth::jwks::PublicJwk;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::signature::KeyPair;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::PrivatePkcs8KeyDer;
    use serde_json::json;

    pub(crate) const NOW: u64 = 1_800_000_000;
    const DEVICE: &str = "2f4b0d2e-7b41-4b6b-9a55-3b0d0c7a9f10";
    const OTHER_DEVICE: &str = "6a3d1c4e-0f8b-4c2a-b1d7-5e9f2a6c8b30";

    /// RSA 2048 test key (`openssl genpkey -algorithm RSA -pkeyopt
    /// rsa_keygen_bits:2048 | openssl pkcs8 -topk8 -nocrypt`): ring cannot
    /// generate RSA keys. Test-only key material.
    pub(crate) const RSA_TEST_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQDrkK4oQcxOczeq
PaJrHrDdRztBWCOpRCGJiCuYNgPoeG0LfTVhqY5I/QH8l7nmZxDtGuwndAG4g39H
HQQtNAyKPkciqmvNMw5BITbCFrheEjOm5j5+zj5MyRX7qVG1/Ffg4umovXaGsQHj
T3GjvbcL19/r/7KUzENcb3zvApOsWSkQZu1ydnGJN7q2A/vwSMqVNk1rQAw17w+x
33kufz0UWnhgcnmrud8mA7z82NO28OY4Y5mhAjlL7zEYmMqfAjWAkwsOtMjAJRCm
fU5HP1LYqfgOjwCGCUAg4M444mrXfLmMyCj8bN5PYdLLYi+ZM1u50nZnjQQCcp6v
r7/pzAJzAgMBAAECggEADjFC1OkV8poNfgPFn9eTB1ntz4OMbnvM23jpS3vho2Vy
CHGsQCyThoE71+iaSi/mfKqVFNFv8xp1FidA46pRoRicd5G1+gB7+N+T6YCt7fkB
xKn1lPU/Gqg421c5tZG1B7cUJdb4Z6gNeZEFQzzAZQXGF3Vp4H4oBs8uw0Wv+P+u
l63RVAnYkMgW5RmsXL+GK7UF8Bks9jrbQjNq+Rneoxin1/x9MhLnFUiETzM9f8QN
cToCTWrn4YdGEKYm6nljq9/F3co40Qw6kwGLUcYp+070vuJzkh1Q812TDPBVv/QA
UvQaEmKFXpLLppWl1tdlnljKWyy9GDcRQo/RL8j08QKBgQD83Dhv8slUczZdMetj
phbYPA+t7hMny6sK4wdoiqoKCPr2ldZ7EI2fDpcHqk/cgfIXIWg7lKyz0O9n9BpU
K7K5LKeB73HO/2NBs/dhgqmP46fQFRcFdjOE9a7HZ+5ukkWDv44Nfa0A6f9yGQQZ
kfHMniMZfgsuxLf9c6bAbvKfcQKBgQDufXus70cne9F5MCm/AFLCIO0z0q9eRzOu
YSoib5YRPD1PgL2yY4nL9d293dRKbAllW86hKCrGpMZu7hVkzqSSYxAFoheouXXQ
bF9TvL23MPwO5M5X7vBG1+ne+XMlhN36xcaaR8N6pYcPRacYTFrIRs5XPclDbked
VgdktnSWIwKBgD5ProC33bE36w+wO4eE6GBE/MApyQKnh/DY3Xx/n0N1zxJw/je5
bozhtYooCCIYy6Wzj9IO4zg0pqqBVvOjCRnkzSqR7QPLn5QTW0TmRA63VSVL7S5l
YHDFclqlW/ZXiVXcII9mhvmQsGhXjdEXS/TWi2O+0daml4iXtWH6dUOhAoGAS+jt
ALJ4t3yVxDksUHtN3DSWy7P31c5cCNksjCFwZrQB39heiPVd2um7Vr/Q3o9cvkJm
lq0uUGQKNSza6mdLwrx9UQ2y8iV19o1IGmMtD64rzKHPe/W1zRbUfgBwQjT0Yumo
uVq2QceGIbpN4VIMY0sGSoaEFU54xP+pAsmAenkCgYA0MNVDoiadBZtjGIXWc4qM
OEiQQmH5jqMLBA4oYImomfEyEblx21qhEpi+qG0kuKcnCouyjOXNpnixMglG6GBy
MMXohRTv6pw7SxmhXLM6VRs8DJFe+UupqKY0euyKvVqK+df4YWOzndPK081g1iiK
q/R2kC6+K7mDfj0tbGOqbA==
-----END PRIVATE KEY-----
";

    /// A key pair that signs test tokens, and its published JWK.
    pub(crate) struct TestKey {
        pub(crate) alg: Algorithm,
        pub(crate) encoding: EncodingKey,
        pub(crate) jwk: PublicJwk,
    }

    impl TestKey {
        pub(crate) fn es256() -> Self {
            install_crypto_provider();
            let rng = SystemRandom::new();
            let pkcs8 = ring_sig::EcdsaKeyPair::generate_pkcs8(
                &ring_sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                &rng,
            )
            .unwrap();
            let pair = ring_sig::EcdsaKeyPair::from_pkcs8(
                &ring_sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                pkcs8.as_ref(),
                &rng,
            )
            .unwrap();
            TestKey {
                alg: Algorithm::ES256,
                encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
                jwk: PublicJwk::ec_p256(pair.public_key().as_ref()).unwrap(),
            }
        }

        pub(crate) fn rs256() -> Self {
            install_crypto_provider();
            let der = PrivatePkcs8KeyDer::from_pem_slice(RSA_TEST_KEY_PEM.as_bytes()).unwrap();
            let pair = ring_sig::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap();
            let public = ring_sig::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
            TestKey {
                alg: Algorithm::RS256,
                encoding: EncodingKey::from_rsa_der(der.secret_pkcs8_der()),
                jwk: PublicJwk::rsa(&public.n, &public.e, Algorithm::RS256).unwrap(),
            }
        }

        pub(crate) fn eddsa() -> Self {
            install_crypto_provider();
            let pkcs8 = ring_sig::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
            let pair = ring_sig::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
            TestKey {
                alg: Algorithm::EdDSA,
                encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
                jwk: PublicJwk::ed25519(pair.public_key().as_ref()).unwrap(),
            }
        }

        pub(crate) fn sign(&self, claims: &Value) -> String {
            let mut header = Header::new(self.alg);
            header.kid = Some(self.jwk.kid().to_owned());
            jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
        }
    }

    fn claims() -> Value {
        json!({
            "sub": "alice",
            "iss": "https://auth.example.com/",
            "aud": ["coap-gateway", "other"],
            "exp": NOW + 3600,
            "iat": NOW - 10,
            "nbf": NOW - 10,
            "jti": "token-1",
            DEFAULT_DEVICE_ID_CLAIM: DEVICE,
        })
    }

    fn validator(keys: &[&TestKey], settings: ValidationSettings) -> TokenValidator {
        let jwks: Vec<PublicJwk> = keys.iter().map(|k| k.jwk.clone()).collect();
        TokenValidator::new(Jwks::from_public_jwks(&jwks), settings).unwrap()
    }

    fn strict() -> ValidationSettings {
        ValidationSettings {
            issuer: Some("https://auth.example.com".into()),
            audience: Some("coap-gateway".into()),
            ..ValidationSettings::default()
        }
    }

    /// Rewrites a token's claims (keeping header and signature).
    fn tamper(token: &str, claims: &Value) -> String {
        let mut parts: Vec<&str> = token.split('.').collect();
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        parts[1] = &payload;
        parts.join(".")
    }

    fn with(mut claims: Value, key: &str, value: Value) -> Value {
        claims[key] = value;
        claims
    }

    fn without(mut claims: Value, key: &str) -> Value {
        claims.as_object_mut().unwrap().remove(key);
        claims
    }

    #[test]
    fn valid_tokens_of_each_algorithm() {
        for key in [TestKey::es256(), TestKey::rs256(), TestKey::eddsa()] {
            let v = validator(&[&key], strict());
            let token = key.sign(&claims());
            let verified = v
                .validate(&token, NOW)
                .unwrap_or_else(|e| panic!("{:?}: {e}", key.alg));
            assert_eq!(verified.owner(), "alice");
            assert_eq!(verified.device_id_claim(), Some(DEVICE));
            assert_eq!(verified.subject(), Some("alice"));
            assert_eq!(verified.token_id(), Some("token-1"));
            assert_eq!(verified.issuer(), Some("https://auth.example.com/"));
            assert_eq!(verified.expires_at(), Some(NOW + 3600));
            assert_eq!(verified.claims()["jti"], "token-1");
        }
    }

    #[test]
    fn other_rsa_and_ec_variants_verify() {
        let rsa = TestKey::rs256();
        for alg in [
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS512,
        ] {
            let der = PrivatePkcs8KeyDer::from_pem_slice(RSA_TEST_KEY_PEM.as_bytes()).unwrap();
            let pair = ring_sig::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap();
            let public = ring_sig::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
            let key = TestKey {
                alg,
                encoding: rsa.encoding.clone(),
                jwk: PublicJwk::rsa(&public.n, &public.e, alg).unwrap(),
            };
            let v = validator(&[&key], strict());
            v.validate(&key.sign(&claims()), NOW)
                .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        }
    }

    #[test]
    fn wrong_signature() {
        let key = TestKey::es256();
        let other = TestKey::es256();
        let v = validator(&[&key], strict());
        // Signed by another key under our kid.
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.jwk.kid().to_owned());
        let forged = jsonwebtoken::encode(&header, &claims(), &other.encoding).unwrap();
        assert_eq!(
            v.validate(&forged, NOW).unwrap_err(),
            JwtError::BadSignature
        );
        // Claims changed after signing.
        let token = key.sign(&claims());
        let changed = tamper(&token, &with(claims(), "sub", json!("mallory")));
        assert_eq!(
            v.validate(&changed, NOW).unwrap_err(),
            JwtError::BadSignature
        );
        // One signature character changed (still valid base64url).
        let mut flipped = token.clone().into_bytes();
        let at = token.len() - 20;
        flipped[at] = if flipped[at] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert_eq!(
            v.validate(&flipped, NOW).unwrap_err(),
            JwtError::BadSignature
        );
        // Truncated signature: bad base64 or bad signature, never accepted.
        let cut = &token[..token.len() - 4];
        assert!(matches!(
            v.validate(cut, NOW).unwrap_err(),
            JwtError::BadSignature | JwtError::Malformed(_)
        ));
    }

    #[test]
    fn unsigned_token_is_refused() {
        let key = TestKey::es256();
        let v = validator(&[&key], ValidationSettings::default());
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims().to_string());
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}"),
        ] {
            let err = v.validate(&token, NOW).unwrap_err();
            assert!(
                matches!(err, JwtError::Unsigned | JwtError::Malformed(_)),
                "{err:?}"
            );
        }
        assert_eq!(
            v.validate(&format!("{header}.{payload}."), NOW)
                .unwrap_err(),
            JwtError::Unsigned
        );
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"NONE"}"#);
        assert_eq!(
            v.validate(&format!("{header}.{payload}."), NOW)
                .unwrap_err(),
            JwtError::Unsigned
        );
    }

    #[test]
    fn algorithm_must_match_the_key() {
        let ec = TestKey::es256();
        let rsa = TestKey::rs256();
        let v = validator(&[&ec, &rsa], ValidationSettings::default());
        // An RS256 token that names the EC key.
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(ec.jwk.kid().to_owned());
        let token = jsonwebtoken::encode(&header, &claims(), &rsa.encoding).unwrap();
        assert!(matches!(
            v.validate(&token, NOW).unwrap_err(),
            JwtError::Key(KeyLookupError::AlgorithmMismatch { .. })
        ));
        // HS256 "signed" with the published key (key confusion).
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(rsa.jwk.kid().to_owned());
        let secret = EncodingKey::from_secret(rsa.jwk.to_json().to_string().as_bytes());
        let hs = jsonwebtoken::encode(&header, &claims(), &secret).unwrap_or_else(|_| {
            // Our provider refuses to make HMAC signers; build it by hand.
            let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"x"}"#);
            let p = URL_SAFE_NO_PAD.encode(claims().to_string());
            format!("{h}.{p}.AAAA")
        });
        assert_eq!(
            v.validate(&hs, NOW).unwrap_err(),
            JwtError::UnsupportedAlgorithm("HS256".into())
        );
        // An algorithm jsonwebtoken does not know.
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES512","kid":"x"}"#);
        let p = URL_SAFE_NO_PAD.encode(claims().to_string());
        assert_eq!(
            v.validate(&format!("{h}.{p}.AAAA"), NOW).unwrap_err(),
            JwtError::UnsupportedAlgorithm("ES512".into())
        );
    }

    #[test]
    fn time_claims() {
        let key = TestKey::es256();
        let v = validator(&[&key], strict());
        let exp = NOW + 3600;
        let token = key.sign(&claims());
        assert!(v.validate(&token, exp - 1).is_ok());
        assert_eq!(
            v.validate(&token, exp).unwrap_err(),
            JwtError::Expired { exp, now: exp }
        );
        // nbf / iat: leeway of CLOCK_SKEW_LEEWAY_SECS, not more.
        let edge = NOW + CLOCK_SKEW_LEEWAY_SECS;
        let early = key.sign(&with(claims(), "nbf", json!(edge)));
        assert!(v.validate(&early, NOW).is_ok());
        let early = key.sign(&with(claims(), "nbf", json!(edge + 1)));
        assert_eq!(
            v.validate(&early, NOW).unwrap_err(),
            JwtError::NotYetValid {
                nbf: edge + 1,
                now: NOW
            }
        );
        let future = key.sign(&with(claims(), "iat", json!(edge)));
        assert!(v.validate(&future, NOW).is_ok());
        let future = key.sign(&with(claims(), "iat", json!(edge + 1)));
        assert_eq!(
            v.validate(&future, NOW).unwrap_err(),
            JwtError::IssuedInFuture {
                iat: edge + 1,
                now: NOW
            }
        );
        // Malformed time claims are errors (§4.1), fractional ones are fine.
        for bad in [json!("1800003600"), json!(-1), json!(null), json!(true)] {
            let t = key.sign(&with(claims(), "exp", bad.clone()));
            assert!(
                matches!(v.validate(&t, NOW).unwrap_err(), JwtError::InvalidClaim { ref claim, .. } if claim == "exp"),
                "{bad}"
            );
        }
        let t = key.sign(&with(claims(), "exp", json!((NOW + 10) as f64 + 0.5)));
        assert_eq!(v.validate(&t, NOW).unwrap().expires_at(), Some(NOW + 10));
        // No exp at all: accepted, no expiry (§14 item 15).
        let t = key.sign(&without(claims(), "exp"));
        assert_eq!(v.validate(&t, u64::MAX).unwrap().expires_at(), None);
    }

    #[test]
    fn issuer_and_audience_only_when_configured() {
        let key = TestKey::es256();
        let v = validator(&[&key], strict());
        let t = key.sign(&with(claims(), "iss", json!("https://evil.example.com")));
        assert!(matches!(
            v.validate(&t, NOW).unwrap_err(),
            JwtError::WrongIssuer { .. }
        ));
        let t = key.sign(&without(claims(), "iss"));
        assert!(matches!(
            v.validate(&t, NOW).unwrap_err(),
            JwtError::WrongIssuer { found: None, .. }
        ));
        let t = key.sign(&with(claims(), "aud", json!("someone-else")));
        assert!(matches!(
            v.validate(&t, NOW).unwrap_err(),
            JwtError::WrongAudience { .. }
        ));
        let t = key.sign(&without(claims(), "aud"));
        assert!(matches!(
            v.validate(&t, NOW).unwrap_err(),
            JwtError::WrongAudience { .. }
        ));
        let t = key.sign(&with(claims(), "aud", json!("coap-gateway")));
        assert!(v.validate(&t, NOW).is_ok());

        // Not configured (empty strings count as unset): both ignored.
        let lax = validator(
            &[&key],
            ValidationSettings {
                issuer: Some(String::new()),
                audience: Some(String::new()),
                ..ValidationSettings::default()
            },
        );
        assert_eq!(lax.settings().issuer, None);
        let t = key.sign(&with(
            with(claims(), "iss", json!("https://evil.example.com")),
            "aud",
            json!("someone-else"),
        ));
        assert!(lax.validate(&t, NOW).is_ok());
    }

    #[test]
    fn owner_claim() {
        let key = TestKey::es256();
        let v = validator(&[&key], ValidationSettings::default());
        let missing = key.sign(&without(claims(), "sub"));
        assert_eq!(
            v.validate(&missing, NOW).unwrap_err(),
            JwtError::MissingOwnerClaim {
                claim: "sub".into()
            }
        );
        let empty = key.sign(&with(claims(), "sub", json!("")));
        assert!(matches!(
            v.validate(&empty, NOW).unwrap_err(),
            JwtError::MissingOwnerClaim { .. }
        ));
        let number = key.sign(&with(claims(), "sub", json!(42)));
        assert!(matches!(
            v.validate(&number, NOW).unwrap_err(),
            JwtError::InvalidClaim { .. }
        ));
        // Refresh: owner falls back to the device's uid (§4.5).
        let verified = v
            .validate_with_owner_fallback(&missing, "bob", NOW)
            .unwrap();
        assert_eq!(verified.owner(), "bob");
        assert!(v.validate_with_owner_fallback(&missing, "", NOW).is_err());
        assert_eq!(
            v.validate_with_owner_fallback(&key.sign(&claims()), "bob", NOW)
                .unwrap()
                .owner(),
            "alice"
        );
        // Another owner claim name.
        let custom = validator(
            &[&key],
            ValidationSettings {
                owner_claim: "https://example.com/owner".into(),
                ..ValidationSettings::default()
            },
        );
        let t = key.sign(&with(claims(), "https://example.com/owner", json!("carol")));
        assert_eq!(custom.validate(&t, NOW).unwrap().owner(), "carol");
        assert!(custom.validate(&key.sign(&claims()), NOW).is_err());
    }

    #[test]
    fn device_id_claim_mode() {
        let key = TestKey::es256();
        let v = validator(&[&key], ValidationSettings::default());
        for bad in [
            without(claims(), DEFAULT_DEVICE_ID_CLAIM),
            with(claims(), DEFAULT_DEVICE_ID_CLAIM, json!("")),
        ] {
            assert_eq!(
                v.validate(&key.sign(&bad), NOW).unwrap_err(),
                JwtError::MissingDeviceIdClaim {
                    claim: DEFAULT_DEVICE_ID_CLAIM.into()
                }
            );
        }
        let t = key.sign(&with(claims(), DEFAULT_DEVICE_ID_CLAIM, json!(7)));
        assert!(matches!(
            v.validate(&t, NOW).unwrap_err(),
            JwtError::InvalidClaim { .. }
        ));

        // Claim for another device: refused against the certificate's ID.
        let token = v.validate(&key.sign(&claims()), NOW).unwrap();
        assert_eq!(
            resolve_device_id(
                &token,
                CertificateDeviceId::Required(Some(OTHER_DEVICE)),
                DEVICE
            )
            .unwrap_err(),
            DeviceIdError::IssuedToAnotherDevice {
                token: DEVICE.into(),
                certificate: OTHER_DEVICE.into()
            }
        );
        assert_eq!(
            resolve_device_id(
                &token,
                CertificateDeviceId::Required(Some(DEVICE)),
                OTHER_DEVICE
            )
            .unwrap(),
            DEVICE,
            "mTLS: the certificate wins over di"
        );
        let upper = DEVICE.to_uppercase();
        let t = v
            .validate(
                &key.sign(&with(claims(), DEFAULT_DEVICE_ID_CLAIM, json!(upper))),
                NOW,
            )
            .unwrap();
        assert_eq!(
            resolve_device_id(&t, CertificateDeviceId::Required(Some(DEVICE)), "").unwrap(),
            DEVICE
        );
        assert_eq!(
            resolve_device_id(&token, CertificateDeviceId::Required(None), DEVICE).unwrap_err(),
            DeviceIdError::NoCertificateDeviceId
        );
        // No mTLS: the claim decides, not di.
        assert_eq!(
            resolve_device_id(&token, CertificateDeviceId::NotRequired, OTHER_DEVICE).unwrap(),
            DEVICE
        );
    }

    #[test]
    fn valid_token_mode_ignores_the_claim() {
        let key = TestKey::es256();
        let v = validator(
            &[&key],
            ValidationSettings {
                mode: AuthorizationMode::ValidToken,
                ..ValidationSettings::default()
            },
        );
        let t = v
            .validate(&key.sign(&without(claims(), DEFAULT_DEVICE_ID_CLAIM)), NOW)
            .unwrap();
        assert_eq!(t.device_id_claim(), None);
        assert_eq!(
            resolve_device_id(&t, CertificateDeviceId::NotRequired, DEVICE).unwrap(),
            DEVICE
        );
        assert_eq!(
            resolve_device_id(
                &t,
                CertificateDeviceId::Required(Some(OTHER_DEVICE)),
                DEVICE
            )
            .unwrap(),
            OTHER_DEVICE
        );
        assert_eq!(
            resolve_device_id(&t, CertificateDeviceId::NotRequired, "").unwrap_err(),
            DeviceIdError::NoDeviceId
        );
        // Even a claim for another device is not read in this mode.
        let t = v
            .validate(
                &key.sign(&with(
                    claims(),
                    DEFAULT_DEVICE_ID_CLAIM,
                    json!(OTHER_DEVICE),
                )),
                NOW,
            )
            .unwrap();
        assert_eq!(
            resolve_device_id(&t, CertificateDeviceId::Required(Some(DEVICE)), "").unwrap(),
            DEVICE
        );
    }

    #[test]
    fn unknown_kid_and_missing_kid() {
        let key = TestKey::es256();
        let stranger = TestKey::es256();
        let v = validator(&[&key], ValidationSettings::default());
        let err = v.validate(&stranger.sign(&claims()), NOW).unwrap_err();
        assert!(err.is_unknown_key(), "{err:?}");
        // Without kid, the single fitting key is used.
        let no_kid =
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims(), &key.encoding).unwrap();
        assert!(v.validate(&no_kid, NOW).is_ok());
        let two = validator(&[&key, &stranger], ValidationSettings::default());
        assert!(matches!(
            two.validate(&no_kid, NOW).unwrap_err(),
            JwtError::Key(KeyLookupError::KidRequired { .. })
        ));
        // After a re-fetch that brings the key, the token passes.
        let mut v = v;
        v.set_keys(Jwks::from_public_jwks(&[
            key.jwk.clone(),
            stranger.jwk.clone(),
        ]));
        assert!(v.validate(&stranger.sign(&claims()), NOW).is_ok());
    }

    #[test]
    fn malformed_and_oversized_tokens() {
        let key = TestKey::es256();
        let v = validator(&[&key], ValidationSettings::default());
        for garbage in ["", "abc", "a.b", "a.b.c", "a.b.c.d.e", "!!!.???.###"] {
            assert!(
                matches!(
                    v.validate(garbage, NOW).unwrap_err(),
                    JwtError::Malformed(_)
                ),
                "{garbage}"
            );
        }
        let token = key.sign(&claims());
        let parts: Vec<&str> = token.split('.').collect();
        let not_json = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode("not json"),
            parts[2]
        );
        assert!(matches!(
            v.validate(&not_json, NOW).unwrap_err(),
            JwtError::BadSignature | JwtError::Malformed(_)
        ));
        let huge = "a".repeat(MAX_TOKEN_LEN + 1);
        assert!(matches!(
            v.validate(&huge, NOW).unwrap_err(),
            JwtError::TooLong { .. }
        ));
        let crit = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"alg":"ES256","kid":"{}","crit":["exp"]}}"#,
            key.jwk.kid()
        ));
        assert!(matches!(
            v.validate(&format!("{crit}.{}.{}", parts[1], parts[2]), NOW)
                .unwrap_err(),
            JwtError::CriticalHeader(_)
        ));
    }

    #[test]
    fn code_purpose_is_not_an_access_token() {
        let key = TestKey::es256();
        let v = validator(&[&key], ValidationSettings::default());
        let t = key.sign(&with(
            claims(),
            PURPOSE_CLAIM,
            json!(PURPOSE_AUTHORIZATION_CODE),
        ));
        assert_eq!(v.validate(&t, NOW).unwrap_err(), JwtError::NotAnAccessToken);
        let t = key.sign(&with(claims(), PURPOSE_CLAIM, json!(PURPOSE_ACCESS)));
        assert!(v.validate(&t, NOW).is_ok());
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.jwk.kid().to_owned());
        header.typ = Some(CODE_TYP.to_owned());
        let t = jsonwebtoken::encode(&header, &claims(), &key.encoding).unwrap();
        assert_eq!(v.validate(&t, NOW).unwrap_err(), JwtError::NotAnAccessToken);
    }

    #[test]
    fn settings_errors() {
        let keys = Jwks::default();
        let no_owner = ValidationSettings {
            owner_claim: String::new(),
            ..ValidationSettings::default()
        };
        assert_eq!(
            TokenValidator::new(keys.clone(), no_owner).unwrap_err(),
            SettingsError::EmptyOwnerClaim
        );
        let no_claim = ValidationSettings {
            device_id_claim: Some(String::new()),
            ..ValidationSettings::default()
        };
        assert_eq!(
            TokenValidator::new(keys.clone(), no_claim.clone()).unwrap_err(),
            SettingsError::MissingDeviceIdClaim
        );
        let valid_token = ValidationSettings {
            mode: AuthorizationMode::ValidToken,
            ..no_claim
        };
        assert!(TokenValidator::new(keys, valid_token).is_ok());
        let mode: AuthorizationMode = serde_json::from_str("\"valid-token\"").unwrap();
        assert_eq!(mode, AuthorizationMode::ValidToken);
        let mode: AuthorizationMode = serde_json::from_str("\"device-id-claim\"").unwrap();
        assert_eq!(mode, AuthorizationMode::DeviceIdClaim);
    }

    #[test]
    fn provider_never_panics() {
        assert!(install_crypto_provider());
        let key = TestKey::es256();
        // Signer/verifier for mismatched or unsupported inputs: errors only.
        let hmac = EncodingKey::from_secret(b"secret");
        assert!(jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims(), &hmac).is_err());
        assert!(
            jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims(), &key.encoding).is_err()
        );
        assert!(jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &claims(),
            &EncodingKey::from_ec_der(b"junk")
        )
        .is_err());
        let jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&key.encoding, Algorithm::ES256).unwrap();
        assert!(jwk.thumbprint(ThumbprintHash::SHA256).is_ok());
        let rsa = TestKey::rs256();
        assert!(jsonwebtoken::jwk::Jwk::from_encoding_key(&rsa.encoding, Algorithm::RS256).is_ok());
        let ed = TestKey::eddsa();
        // jsonwebtoken only takes 48-byte PKCS#8 v1 Ed25519 keys here; ring
        // makes v2 keys. The point is an error, not a panic.
        let _ = jsonwebtoken::jwk::Jwk::from_encoding_key(&ed.encoding, Algorithm::EdDSA);
        let public =
            ed_components_from_private_key(ed.encoding.as_bytes(), &EllipticCurve::Ed25519)
                .unwrap();
        assert_eq!(ed.jwk.to_json()["x"], URL_SAFE_NO_PAD.encode(public));
        assert!(
            ed_components_from_private_key(ed.encoding.as_bytes(), &EllipticCurve::P256).is_err()
        );
        assert!(ec_components_from_private_key(key.encoding.as_bytes(), Algorithm::ES384).is_err());
        assert!(rsa_components_from_public_key(b"x").is_err());
    }

    #[test]
    fn deadline_and_expires_in() {
        let minute = Duration::from_secs(60);
        // exp − 2 × ownerCacheExpiration (§4.7).
        assert_eq!(token_deadline(Some(NOW + 3600), minute), Some(NOW + 3480));
        assert_eq!(token_deadline(None, minute), None);
        assert_eq!(
            token_deadline(Some(100), minute),
            Some(0),
            "saturates, still a deadline"
        );
        assert_eq!(
            token_deadline(Some(NOW), Duration::from_millis(1500)),
            Some(NOW - 3)
        );
        assert_eq!(
            token_deadline(Some(NOW), Duration::from_millis(1200)),
            Some(NOW - 3),
            "rounded up"
        );
        assert_eq!(token_deadline(Some(NOW), Duration::ZERO), Some(NOW));

        // Sign-in: remaining lifetime ≥ 2 × ownerCacheExpiration.
        assert_eq!(
            sign_in_deadline(Some(NOW + 120), minute, NOW),
            Ok(Some(NOW))
        );
        assert_eq!(
            sign_in_deadline(Some(NOW + 119), minute, NOW),
            Err(LifetimeError {
                remaining_secs: 119,
                required_secs: 120
            })
        );
        assert_eq!(
            sign_in_deadline(Some(NOW - 5), minute, NOW),
            Err(LifetimeError {
                remaining_secs: 0,
                required_secs: 120
            })
        );
        assert_eq!(sign_in_deadline(None, minute, NOW), Ok(None));
        assert_eq!(
            sign_in_deadline(Some(u64::MAX), Duration::MAX, NOW)
                .unwrap_err()
                .required_secs,
            u64::MAX
        );

        // expiresin: whole seconds, -1 without expiry (§14 item 15).
        assert_eq!(expires_in(None, NOW), -1);
        assert_eq!(expires_in(Some(NOW + 3480), NOW), 3480);
        assert_eq!(expires_in(Some(NOW), NOW), 0);
        assert_eq!(expires_in(Some(NOW - 10), NOW), 0, "never negative");
        assert_eq!(expires_in(Some(u64::MAX), 0), i64::MAX);
        let deadline = sign_in_deadline(Some(NOW + 3600), minute, NOW).unwrap();
        assert_eq!(expires_in(deadline, NOW), 3480);

        // Sign-up / refresh: OAuth expires_in, no margin.
        assert_eq!(oauth_expiry(Some(3600), NOW), Some(NOW + 3600));
        assert_eq!(oauth_expiry(None, NOW), None);
        assert_eq!(expires_in(oauth_expiry(Some(3600), NOW), NOW), 3600);
        assert_eq!(expires_in(oauth_expiry(None, NOW), NOW), -1);
    }

    /// Verify cost, for the performance notes (no assertion on time):
    /// `cargo test --release --lib auth::jwt::tests::verify_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing report, run by hand in release mode"]
    #[allow(clippy::disallowed_methods)] // Measuring wall time is the point of this test.
    fn verify_timing() {
        const ROUNDS: u32 = 2000;
        for key in [TestKey::es256(), TestKey::rs256(), TestKey::eddsa()] {
            let v = validator(&[&key], strict());
            let token = key.sign(&claims());
            for _ in 0..100 {
                v.validate(&token, NOW).unwrap();
            }
            let start = std::time::Instant::now();
            for _ in 0..ROUNDS {
                std::hint::black_box(v.validate(std::hint::black_box(&token), NOW).unwrap());
            }
            let validate = start.elapsed() / ROUNDS;
            // The bare signature check through the provider, for the ratio.
            let (message, signature) = token.rsplit_once('.').unwrap();
            let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
            let jwks = Jwks::from_public_jwks(std::slice::from_ref(&key.jwk));
            let decoding = jwks.keys()[0].decoding_key();
            let start = std::time::Instant::now();
            for _ in 0..ROUNDS {
                let verifier = new_verifier(&key.alg, decoding).unwrap();
                verifier.verify(message.as_bytes(), &signature).unwrap();
            }
            let verify = start.elapsed() / ROUNDS;
            let start = std::time::Instant::now();
            for _ in 0..ROUNDS / 4 {
                std::hint::black_box(key.sign(&claims()));
            }
            let sign = start.elapsed() / (ROUNDS / 4);
            println!(
                "{:?}: validate {validate:?} (signature alone {verify:?}), sign {sign:?}",
                key.alg
            );
        }
    }
}
