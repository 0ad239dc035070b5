//! The embedded token authority (SURFACE.md `[authority]`, `token code`,
//! `token user`, `/.well-known/openid-configuration`, `/.well-known/jwks.json`,
//! `POST /oauth/token`): a minimal OAuth issuer so the gateway runs without
//! an external identity provider.
//!
//! What it issues, all signed ES256 with one P-256 key:
//! * authorization codes — short-lived JWTs (header `typ` [`CODE_TYP`],
//!   claim `purpose: authorization_code`, random `jti`) that a device
//!   presents at sign-up (spec §5.2) and the gateway redeems here. The
//!   caller records the `jti` until the code expires to make codes
//!   one-time; the validator refuses them as access tokens twice over
//!   (header `typ` and `purpose`).
//! * access tokens — `sub` and owner claim, the device-ID claim
//!   (`https://plgd.dev/deviceId` by default, §4.2), `iss`, `iat`, `exp`,
//!   `jti`; [`super::jwt::TokenValidator`] accepts them with
//!   [`Authority::key_set`] as its keys.
//! * refresh tokens — opaque random strings; the caller keeps the state.
//! * user tokens for the HTTP API — access tokens without a device.
//!
//! Sans-IO apart from the key file: `now` (unix seconds) is an argument,
//! randomness comes from ring's `SystemRandom`, and HTTP is the control
//! plane's job.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde_json::{json, Map, Value};

use super::jwks::{self, Jwks, PublicJwk};
use super::jwt::{
    self, install_crypto_provider, optional_string, parse_header, same_device_id,
    AuthorizationMode, JwtError, TimeClaims, ValidationSettings, ACCESS_TOKEN_TYP, CODE_TYP,
    DEFAULT_DEVICE_ID_CLAIM, DEFAULT_OWNER_CLAIM, PURPOSE_ACCESS, PURPOSE_AUTHORIZATION_CODE,
    PURPOSE_CLAIM,
};

/// Default lifetime of access tokens (SURFACE.md `access_token_ttl`).
pub const DEFAULT_ACCESS_TOKEN_TTL: Duration = Duration::from_secs(60 * 60);
/// Default lifetime of authorization codes (SURFACE.md `token code`).
pub const DEFAULT_CODE_TTL: Duration = Duration::from_secs(10 * 60);
/// Default key file name under the data directory (SURFACE.md `key_file`).
pub const DEFAULT_KEY_FILE: &str = "authority-key.pem";

/// Claim binding a code to a device. Fixed, whatever `device_id_claim` is
/// configured: codes are our private format.
const CODE_DEVICE_CLAIM: &str = DEFAULT_DEVICE_ID_CLAIM;
/// Random bytes in a `jti` (128 bits: collisions are out of reach).
const TOKEN_ID_BYTES: usize = 16;
/// Random bytes in a refresh token.
const REFRESH_TOKEN_BYTES: usize = 32;
/// Owners and device IDs are short identifiers; a longer one is a mistake
/// or abuse, not a name.
const MAX_IDENTIFIER_LEN: usize = 256;

/// Why the authority could not do something.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// The key file exists but could not be read.
    #[error("cannot read authority key {}: {source}", path.display())]
    KeyFileRead {
        /// The key file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A new key file could not be written.
    #[error("cannot write authority key {}: {source}", path.display())]
    KeyFileWrite {
        /// The key file (or its directory).
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The key file is not a P-256 PKCS#8 PEM private key.
    #[error("authority key {} is unusable: {reason}; fix or remove the file (a new key is created when it is missing, which invalidates every token issued so far)", path.display())]
    KeyFileCorrupt {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// In-memory key material is not a P-256 PKCS#8 key.
    #[error("authority key is unusable: {0}")]
    InvalidKey(String),
    /// Another jsonwebtoken `CryptoProvider` is installed process-wide, so
    /// signing could panic or use another crypto library.
    #[error("another jsonwebtoken CryptoProvider is installed; call auth::jwt::install_crypto_provider() before any other jsonwebtoken use")]
    ForeignCryptoProvider,
    /// The system random generator failed.
    #[error("system random number generator failed")]
    Random,
    /// Signing a token failed.
    #[error("cannot sign token: {0}")]
    Signing(String),
    /// Settings that cannot work.
    #[error("invalid authority settings: {0}")]
    InvalidSettings(&'static str),
    /// A request the authority refuses (empty owner, zero TTL, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    /// The string is not a valid code of this authority.
    #[error("invalid authorization code: {0}")]
    InvalidCode(String),
    /// The code's lifetime is over.
    #[error("authorization code expired at {expired_at} (now {now})")]
    CodeExpired {
        /// The code's `exp`.
        expired_at: u64,
        /// The caller's `now`.
        now: u64,
    },
    /// The code is bound to another device (or the redeemer could not say
    /// which device it is).
    #[error("authorization code is bound to device {bound}, not {presented:?}")]
    CodeDeviceMismatch {
        /// The device the code was issued for.
        bound: String,
        /// The device that presented it.
        presented: Option<String>,
    },
}

/// The authority's ES256 signing key (P-256, PKCS#8).
pub struct SigningKey {
    pkcs8: Vec<u8>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: PublicJwk,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.jwk.kid())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh key from ring's system random generator.
    pub fn generate() -> Result<Self, AuthorityError> {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| AuthorityError::Random)?;
        Self::from_pkcs8_der(pkcs8.as_ref()).map_err(AuthorityError::InvalidKey)
    }

    /// A key from PKCS#8 PEM text (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem(pem: &[u8]) -> Result<Self, AuthorityError> {
        Self::parse_pem(pem).map_err(AuthorityError::InvalidKey)
    }

    /// Loads the key at `path`, or creates it (mode 0600, parent
    /// directories as needed) when the file does not exist. Creation is
    /// atomic: the key is written to a temporary file and hard-linked into
    /// place, so two nodes starting at once on a shared directory end up
    /// with the same key, and a crash never leaves half a key behind.
    pub fn load_or_create(path: &Path) -> Result<Self, AuthorityError> {
        match Self::load(path) {
            Err(AuthorityError::KeyFileRead { source, .. })
                if source.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
        let key = Self::generate()?;
        let write_error = |path: &Path| {
            let path = path.to_owned();
            move |source| AuthorityError::KeyFileWrite { path, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(write_error(dir))?;
        }
        let mut suffix = [0u8; 8];
        SystemRandom::new()
            .fill(&mut suffix)
            .map_err(|_| AuthorityError::Random)?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| DEFAULT_KEY_FILE.to_owned());
        let temp = path.with_file_name(format!(
            ".{file_name}.{}.tmp",
            URL_SAFE_NO_PAD.encode(suffix)
        ));
        let result = write_secret(&temp, key.to_pkcs8_pem().as_bytes())
            .map_err(write_error(&temp))
            .and_then(|()| match fs::hard_link(&temp, path) {
                Ok(()) => Ok(Some(())),
                // Another process created the key first: use theirs.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(write_error(path)(e)),
            });
        let _ = fs::remove_file(&temp);
        match result? {
            Some(()) => Ok(key),
            None => Self::load(path),
        }
    }

    /// Loads the key at `path`.
    pub fn load(path: &Path) -> Result<Self, AuthorityError> {
        let pem = fs::read(path).map_err(|source| AuthorityError::KeyFileRead {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_pem(&pem).map_err(|reason| AuthorityError::KeyFileCorrupt {
            path: path.to_owned(),
            reason,
        })
    }

    fn parse_pem(pem: &[u8]) -> Result<Self, String> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|e| {
            format!(
                "no PKCS#8 \"PRIVATE KEY\" PEM block ({e}); the key must be P-256 in PKCS#8 PEM"
            )
        })?;
        Self::from_pkcs8_der(der.secret_pkcs8_der())
    }

    fn from_pkcs8_der(der: &[u8]) -> Result<Self, String> {
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
                .map_err(|e| format!("not a P-256 ECDSA private key ({e})"))?;
        let point = pair.public_key().as_ref();
        let jwk = PublicJwk::ec_p256(point).map_err(|e| e.to_string())?;
        Ok(SigningKey {
            pkcs8: der.to_vec(),
            encoding: EncodingKey::from_ec_der(der),
            decoding: DecodingKey::from_ec_der(point),
            jwk,
        })
    }

    /// PKCS#8 PEM, 64-column base64 (RFC 7468).
    fn to_pkcs8_pem(&self) -> String {
        let body = STANDARD.encode(&self.pkcs8);
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in body.as_bytes().chunks(64) {
            // Base64 output is ASCII, so every chunk is valid UTF-8.
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        pem
    }

    /// The key ID: the RFC 7638 thumbprint of the public key, the same on
    /// every node that shares the key file.
    pub fn kid(&self) -> &str {
        self.jwk.kid()
    }

    /// The public key as a JWK.
    pub fn public_jwk(&self) -> &PublicJwk {
        &self.jwk
    }
}

/// Writes a new file readable by the owner only.
fn write_secret(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// What the authority puts into tokens (SURFACE.md `[authority]`,
/// `[authorization]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthoritySettings {
    /// `iss` of every token, and the discovery document's `issuer`.
    pub issuer: String,
    /// `aud` of access tokens, when the gateway checks one
    /// (`[authorization] audience`).
    pub audience: Option<String>,
    /// Access-token lifetime.
    pub access_token_ttl: Duration,
    /// Authorization-code lifetime.
    pub code_ttl: Duration,
    /// Claim carrying the device ID in access tokens; `None` leaves it out.
    pub device_id_claim: Option<String>,
    /// Claim carrying the owner; `sub` always carries it too.
    pub owner_claim: String,
}

impl AuthoritySettings {
    /// Defaults for everything but the issuer.
    pub fn new(issuer: impl Into<String>) -> Self {
        AuthoritySettings {
            issuer: issuer.into(),
            audience: None,
            access_token_ttl: DEFAULT_ACCESS_TOKEN_TTL,
            code_ttl: DEFAULT_CODE_TTL,
            device_id_claim: Some(DEFAULT_DEVICE_ID_CLAIM.to_owned()),
            owner_claim: DEFAULT_OWNER_CLAIM.to_owned(),
        }
    }
}

/// A signed token and its `exp` (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The compact JWS.
    pub token: String,
    /// Its `exp`.
    pub expires_at: u64,
}

/// A redeemed authorization code. Only [`Authority::redeem_code`] builds
/// one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeGrant {
    owner: String,
    device_id: Option<String>,
    code_id: String,
    expires_at: u64,
}

impl CodeGrant {
    /// The owner the code was issued to.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The device the code is bound to, if it is bound.
    pub fn device_id(&self) -> Option<&str> {
        self.device_id.as_deref()
    }

    /// The code's `jti`: record it until [`expires_at`](Self::expires_at)
    /// and refuse a second redemption, which makes codes one-time.
    pub fn code_id(&self) -> &str {
        &self.code_id
    }

    /// When the code expires; after that the record can be dropped.
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }
}

/// The embedded token authority.
#[derive(Debug)]
pub struct Authority {
    key: SigningKey,
    settings: AuthoritySettings,
    rng: SystemRandom,
}

impl Authority {
    /// An authority signing with `key`. Empty `audience` and
    /// `device_id_claim` count as unset, as in the config file.
    pub fn new(key: SigningKey, mut settings: AuthoritySettings) -> Result<Self, AuthorityError> {
        if !install_crypto_provider() {
            return Err(AuthorityError::ForeignCryptoProvider);
        }
        settings.audience = settings.audience.filter(|a| !a.is_empty());
        settings.device_id_claim = settings.device_id_claim.filter(|c| !c.is_empty());
        if settings.issuer.is_empty() {
            return Err(AuthorityError::InvalidSettings("issuer must not be empty"));
        }
        if settings.owner_claim.is_empty() {
            return Err(AuthorityError::InvalidSettings(
                "owner_claim must not be empty",
            ));
        }
        if settings.access_token_ttl.as_secs() == 0 || settings.code_ttl.as_secs() == 0 {
            return Err(AuthorityError::InvalidSettings(
                "access_token_ttl and code_ttl must be at least one second",
            ));
        }
        Ok(Authority {
            key,
            settings,
            rng: SystemRandom::new(),
        })
    }

    /// The settings in effect.
    pub fn settings(&self) -> &AuthoritySettings {
        &self.settings
    }

    /// The signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// Validation settings under which the gateway accepts this authority's
    /// access tokens (and nothing from any other issuer).
    pub fn validation_settings(&self, mode: AuthorizationMode) -> ValidationSettings {
        ValidationSettings {
            issuer: Some(self.settings.issuer.clone()),
            audience: self.settings.audience.clone(),
            owner_claim: self.settings.owner_claim.clone(),
            device_id_claim: self.settings.device_id_claim.clone(),
            mode,
        }
    }

    /// An authorization code for `owner`'s device sign-up (SURFACE.md
    /// `token code`), bound to `device_id` when given. Valid `code_ttl`.
    pub fn issue_code(
        &self,
        owner: &str,
        device_id: Option<&str>,
        now_unix: u64,
    ) -> Result<String, AuthorityError> {
        check_identifier(
            owner,
            "owner must be a non-empty string of at most 256 bytes",
        )?;
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(self.settings.issuer));
        claims.insert("sub".into(), json!(owner));
        claims.insert(PURPOSE_CLAIM.into(), json!(PURPOSE_AUTHORIZATION_CODE));
        if let Some(device_id) = device_id {
            check_identifier(
                device_id,
                "device id must be a non-empty string of at most 256 bytes",
            )?;
            claims.insert(CODE_DEVICE_CLAIM.into(), json!(device_id));
        }
        let expires_at = now_unix.saturating_add(self.settings.code_ttl.as_secs());
        self.stamp(&mut claims, now_unix, expires_at)?;
        self.sign(CODE_TYP, &claims)
    }

    /// Checks a code (signature, purpose, issuer, expiry, device binding)
    /// and returns what it grants. `device_id` is the device redeeming it;
    /// a bound code needs it. One-time use is the caller's job, by
    /// [`CodeGrant::code_id`].
    pub fn redeem_code(
        &self,
        code: &str,
        device_id: Option<&str>,
        now_unix: u64,
    ) -> Result<CodeGrant, AuthorityError> {
        let invalid = |e: JwtError| AuthorityError::InvalidCode(e.to_string());
        if code.len() > jwt::MAX_TOKEN_LEN {
            return Err(AuthorityError::InvalidCode("too long".into()));
        }
        let header = parse_header(code).map_err(invalid)?;
        if header.alg != Algorithm::ES256 || header.typ.as_deref() != Some(CODE_TYP) {
            return Err(AuthorityError::InvalidCode(
                "not an authorization code".into(),
            ));
        }
        let claims =
            jwt::decode_verified(code, &self.key.decoding, Algorithm::ES256).map_err(invalid)?;
        if claims.get(PURPOSE_CLAIM).and_then(Value::as_str) != Some(PURPOSE_AUTHORIZATION_CODE) {
            return Err(AuthorityError::InvalidCode(
                "not an authorization code".into(),
            ));
        }
        if optional_string(&claims, "iss").map_err(invalid)?.as_deref()
            != Some(self.settings.issuer.as_str())
        {
            return Err(AuthorityError::InvalidCode(
                "issued by another authority".into(),
            ));
        }
        let times = TimeClaims::read(&claims).map_err(invalid)?;
        let expires_at = times
            .exp
            .ok_or_else(|| AuthorityError::InvalidCode("no expiry".into()))?;
        match times.check(now_unix) {
            Ok(()) => {}
            Err(JwtError::Expired { exp, now }) => {
                return Err(AuthorityError::CodeExpired {
                    expired_at: exp,
                    now,
                })
            }
            Err(e) => return Err(invalid(e)),
        }
        let required = |name: &str| -> Result<String, AuthorityError> {
            optional_string(&claims, name)
                .map_err(invalid)?
                .filter(|v| !v.is_empty())
                .ok_or_else(|| AuthorityError::InvalidCode(format!("no {name}")))
        };
        let owner = required("sub")?;
        let code_id = required("jti")?;
        let bound = optional_string(&claims, CODE_DEVICE_CLAIM).map_err(invalid)?;
        if let Some(bound) = &bound {
            if !device_id.is_some_and(|presented| same_device_id(bound, presented)) {
                return Err(AuthorityError::CodeDeviceMismatch {
                    bound: bound.clone(),
                    presented: device_id.map(str::to_owned),
                });
            }
        }
        Ok(CodeGrant {
            owner,
            device_id: bound,
            code_id,
            expires_at,
        })
    }

    /// An access token for `owner` (and `device_id`, in the configured
    /// device-ID claim), valid `access_token_ttl`.
    pub fn issue_access_token(
        &self,
        owner: &str,
        device_id: Option<&str>,
        now_unix: u64,
    ) -> Result<IssuedToken, AuthorityError> {
        self.access_token(owner, device_id, self.settings.access_token_ttl, now_unix)
    }

    /// A bearer token for the HTTP API (SURFACE.md `token user`): an access
    /// token without device, valid `ttl`.
    pub fn issue_user_token(
        &self,
        owner: &str,
        ttl: Duration,
        now_unix: u64,
    ) -> Result<IssuedToken, AuthorityError> {
        self.access_token(owner, None, ttl, now_unix)
    }

    /// An opaque refresh token: 32 random bytes, base64url. The caller
    /// stores what it stands for.
    pub fn issue_refresh_token(&self) -> Result<String, AuthorityError> {
        self.random_string(REFRESH_TOKEN_BYTES)
    }

    /// `/.well-known/openid-configuration` for an authority served at
    /// `base_url`. The gateway (and plgd clients) read `issuer` and
    /// `jwks_uri` (spec §4.1).
    pub fn openid_configuration(&self, base_url: &str) -> Value {
        let base = base_url.trim_end_matches('/');
        json!({
            "issuer": self.settings.issuer,
            "jwks_uri": format!("{base}/.well-known/jwks.json"),
            "token_endpoint": format!("{base}/oauth/token"),
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "response_types_supported": ["code"],
            "token_endpoint_auth_methods_supported": ["none"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "claims_supported": self.claims_supported(),
        })
    }

    fn claims_supported(&self) -> Vec<String> {
        let mut claims: Vec<String> = ["iss", "sub", "aud", "exp", "iat", "jti"]
            .iter()
            .map(|c| (*c).to_owned())
            .collect();
        claims.extend(self.settings.device_id_claim.iter().cloned());
        if !claims.contains(&self.settings.owner_claim) {
            claims.push(self.settings.owner_claim.clone());
        }
        claims
    }

    /// `/.well-known/jwks.json`.
    pub fn jwks(&self) -> Value {
        jwks::document(std::slice::from_ref(&self.key.jwk))
    }

    /// The verification keys, for a [`super::jwt::TokenValidator`] when the
    /// gateway trusts the embedded authority (`jwks_url = ""`).
    pub fn key_set(&self) -> Jwks {
        Jwks::from_public_jwks(std::slice::from_ref(&self.key.jwk))
    }

    fn access_token(
        &self,
        owner: &str,
        device_id: Option<&str>,
        ttl: Duration,
        now_unix: u64,
    ) -> Result<IssuedToken, AuthorityError> {
        check_identifier(
            owner,
            "owner must be a non-empty string of at most 256 bytes",
        )?;
        if ttl.as_secs() == 0 {
            return Err(AuthorityError::InvalidRequest(
                "token lifetime must be at least one second",
            ));
        }
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(self.settings.issuer));
        claims.insert("sub".into(), json!(owner));
        claims.insert(self.settings.owner_claim.clone(), json!(owner));
        if let Some(audience) = &self.settings.audience {
            claims.insert("aud".into(), json!(audience));
        }
        claims.insert(PURPOSE_CLAIM.into(), json!(PURPOSE_ACCESS));
        if let Some(device_id) = device_id {
            check_identifier(
                device_id,
                "device id must be a non-empty string of at most 256 bytes",
            )?;
            if let Some(claim) = &self.settings.device_id_claim {
                claims.insert(claim.clone(), json!(device_id));
            }
        }
        let expires_at = now_unix.saturating_add(ttl.as_secs());
        self.stamp(&mut claims, now_unix, expires_at)?;
        let token = self.sign(ACCESS_TOKEN_TYP, &claims)?;
        Ok(IssuedToken { token, expires_at })
    }

    /// `iat`, `exp` and a random `jti`.
    fn stamp(
        &self,
        claims: &mut Map<String, Value>,
        now: u64,
        expires_at: u64,
    ) -> Result<(), AuthorityError> {
        claims.insert("iat".into(), json!(now));
        claims.insert("exp".into(), json!(expires_at));
        claims.insert("jti".into(), json!(self.random_string(TOKEN_ID_BYTES)?));
        Ok(())
    }

    fn sign(&self, typ: &str, claims: &Map<String, Value>) -> Result<String, AuthorityError> {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some(typ.to_owned());
        header.kid = Some(self.key.kid().to_owned());
        jsonwebtoken::encode(&header, claims, &self.key.encoding)
            .map_err(|e| AuthorityError::Signing(e.to_string()))
    }

    fn random_string(&self, len: usize) -> Result<String, AuthorityError> {
        let mut bytes = vec![0u8; len];
        self.rng
            .fill(&mut bytes)
            .map_err(|_| AuthorityError::Random)?;
        Ok(URL_SAFE_NO_PAD.encode(bytes))
    }
}

fn check_identifier(value: &str, message: &'static str) -> Result<(), AuthorityError> {
    if value.is_empty() || value.len() > MAX_IDENTIFIER_LEN {
        return Err(AuthorityError::InvalidRequest(message));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jwt::tests::{TestKey, NOW};
    use crate::auth::jwt::{resolve_device_id, CertificateDeviceId, TokenValidator};

    const DEVICE: &str = "2f4b0d2e-7b41-4b6b-9a55-3b0d0c7a9f10";
    const OTHER_DEVICE: &str = "6a3d1c4e-0f8b-4c2a-b1d7-5e9f2a6c8b30";
    const ISSUER: &str = "https://gateway.example.com";

    fn authority() -> Authority {
        Authority::new(
            SigningKey::generate().unwrap(),
            AuthoritySettings::new(ISSUER),
        )
        .unwrap()
    }

    fn validator(authority: &Authority, mode: AuthorizationMode) -> TokenValidator {
        TokenValidator::new(authority.key_set(), authority.validation_settings(mode)).unwrap()
    }

    #[test]
    fn validator_accepts_access_tokens() {
        let a = authority();
        let v = validator(&a, AuthorizationMode::DeviceIdClaim);
        let issued = a.issue_access_token("alice", Some(DEVICE), NOW).unwrap();
        assert_eq!(issued.expires_at, NOW + 3600);
        let t = v.validate(&issued.token, NOW).unwrap();
        assert_eq!(t.owner(), "alice");
        assert_eq!(t.device_id_claim(), Some(DEVICE));
        assert_eq!(t.expires_at(), Some(NOW + 3600));
        assert_eq!(t.issuer(), Some(ISSUER));
        assert_eq!(
            t.token_id().map(str::len),
            Some(22),
            "16 random bytes, base64url"
        );
        assert_eq!(
            resolve_device_id(&t, CertificateDeviceId::Required(Some(DEVICE)), "").unwrap(),
            DEVICE
        );
        // Also through the published JWKS document, as a remote gateway sees it.
        let parsed = Jwks::parse(a.jwks().to_string().as_bytes()).unwrap();
        let remote = TokenValidator::new(
            parsed,
            a.validation_settings(AuthorizationMode::DeviceIdClaim),
        )
        .unwrap();
        assert!(remote.validate(&issued.token, NOW).is_ok());
        // Two tokens never share a jti.
        let again = a.issue_access_token("alice", Some(DEVICE), NOW).unwrap();
        assert_ne!(
            v.validate(&again.token, NOW).unwrap().token_id(),
            t.token_id()
        );
        assert!(v.validate(&issued.token, NOW + 3600).is_err(), "expired");
    }

    #[test]
    fn custom_claims_and_audience() {
        let mut settings = AuthoritySettings::new(ISSUER);
        settings.owner_claim = "https://example.com/owner".into();
        settings.device_id_claim = Some("deviceId".into());
        settings.audience = Some("coap-gateway".into());
        let a = Authority::new(SigningKey::generate().unwrap(), settings).unwrap();
        let v = validator(&a, AuthorizationMode::DeviceIdClaim);
        let issued = a.issue_access_token("alice", Some(DEVICE), NOW).unwrap();
        let t = v.validate(&issued.token, NOW).unwrap();
        assert_eq!(t.owner(), "alice");
        assert_eq!(t.subject(), Some("alice"));
        assert_eq!(t.claims()["deviceId"], DEVICE);
        assert_eq!(t.claims()["aud"], "coap-gateway");
        // A token of another authority (same claims, other key) is refused.
        let other = authority();
        let foreign = other
            .issue_access_token("alice", Some(DEVICE), NOW)
            .unwrap();
        assert!(v
            .validate(&foreign.token, NOW)
            .unwrap_err()
            .is_unknown_key());
    }

    #[test]
    fn user_tokens() {
        let a = authority();
        let issued = a
            .issue_user_token("alice", Duration::from_secs(60), NOW)
            .unwrap();
        assert_eq!(issued.expires_at, NOW + 60);
        let valid_token = validator(&a, AuthorizationMode::ValidToken);
        assert_eq!(
            valid_token.validate(&issued.token, NOW).unwrap().owner(),
            "alice"
        );
        // No device claim: not a device sign-in token in device-ID-claim mode.
        let device_mode = validator(&a, AuthorizationMode::DeviceIdClaim);
        assert!(matches!(
            device_mode.validate(&issued.token, NOW).unwrap_err(),
            JwtError::MissingDeviceIdClaim { .. }
        ));
        assert!(matches!(
            a.issue_user_token("alice", Duration::from_millis(500), NOW),
            Err(AuthorityError::InvalidRequest(_))
        ));
        assert!(matches!(
            a.issue_user_token("", Duration::from_secs(60), NOW),
            Err(AuthorityError::InvalidRequest(_))
        ));
    }

    #[test]
    fn codes_redeem_once_per_jti() {
        let a = authority();
        let code = a.issue_code("alice", Some(DEVICE), NOW).unwrap();
        let grant = a.redeem_code(&code, Some(DEVICE), NOW + 1).unwrap();
        assert_eq!(grant.owner(), "alice");
        assert_eq!(grant.device_id(), Some(DEVICE));
        assert_eq!(grant.expires_at(), NOW + 600);
        // The same code redeems to the same jti: that is what the caller's
        // one-time record keys on.
        assert_eq!(
            a.redeem_code(&code, Some(DEVICE), NOW + 2)
                .unwrap()
                .code_id(),
            grant.code_id()
        );
        let second = a.issue_code("alice", Some(DEVICE), NOW).unwrap();
        assert_ne!(
            a.redeem_code(&second, Some(DEVICE), NOW).unwrap().code_id(),
            grant.code_id()
        );
        // Unbound code: any device, or none.
        let open = a.issue_code("bob", None, NOW).unwrap();
        assert_eq!(
            a.redeem_code(&open, Some(OTHER_DEVICE), NOW)
                .unwrap()
                .device_id(),
            None
        );
        assert_eq!(a.redeem_code(&open, None, NOW).unwrap().owner(), "bob");
    }

    #[test]
    fn codes_expire() {
        let a = authority();
        let code = a.issue_code("alice", None, NOW).unwrap();
        assert!(a.redeem_code(&code, None, NOW + 599).is_ok());
        assert!(matches!(
            a.redeem_code(&code, None, NOW + 600),
            Err(AuthorityError::CodeExpired { expired_at, now }) if expired_at == NOW + 600 && now == NOW + 600
        ));
        // Issued in the future beyond the leeway: refused.
        let future = a.issue_code("alice", None, NOW + 3600).unwrap();
        assert!(matches!(
            a.redeem_code(&future, None, NOW),
            Err(AuthorityError::InvalidCode(_))
        ));
    }

    #[test]
    fn codes_are_bound_to_their_device() {
        let a = authority();
        let code = a.issue_code("alice", Some(DEVICE), NOW).unwrap();
        assert!(matches!(
            a.redeem_code(&code, Some(OTHER_DEVICE), NOW),
            Err(AuthorityError::CodeDeviceMismatch { .. })
        ));
        assert!(matches!(
            a.redeem_code(&code, None, NOW),
            Err(AuthorityError::CodeDeviceMismatch { .. })
        ));
        assert!(a
            .redeem_code(&code, Some(&DEVICE.to_uppercase()), NOW)
            .is_ok());
    }

    #[test]
    fn codes_are_not_access_tokens_and_back() {
        let a = authority();
        let code = a.issue_code("alice", Some(DEVICE), NOW).unwrap();
        for mode in [
            AuthorizationMode::DeviceIdClaim,
            AuthorizationMode::ValidToken,
        ] {
            assert_eq!(
                validator(&a, mode).validate(&code, NOW).unwrap_err(),
                JwtError::NotAnAccessToken
            );
        }
        // An access token is not a code either.
        let access = a.issue_access_token("alice", Some(DEVICE), NOW).unwrap();
        assert!(matches!(
            a.redeem_code(&access.token, Some(DEVICE), NOW),
            Err(AuthorityError::InvalidCode(_))
        ));
        // A code from another authority, or a tampered one, is refused.
        let other = authority().issue_code("alice", Some(DEVICE), NOW).unwrap();
        assert!(matches!(
            a.redeem_code(&other, Some(DEVICE), NOW),
            Err(AuthorityError::InvalidCode(_))
        ));
        assert!(matches!(
            a.redeem_code("garbage", Some(DEVICE), NOW),
            Err(AuthorityError::InvalidCode(_))
        ));
        // A foreign key signing a perfect-looking code under our kid.
        let forger = TestKey::es256();
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some(CODE_TYP.into());
        header.kid = Some(a.signing_key().kid().into());
        let claims = json!({"iss": ISSUER, "sub": "mallory", "purpose": PURPOSE_AUTHORIZATION_CODE,
                            "jti": "x", "iat": NOW, "exp": NOW + 600});
        let forged = jsonwebtoken::encode(&header, &claims, &forger.encoding).unwrap();
        assert!(matches!(
            a.redeem_code(&forged, None, NOW),
            Err(AuthorityError::InvalidCode(_))
        ));
    }

    #[test]
    fn refresh_tokens_are_random() {
        let a = authority();
        let one = a.issue_refresh_token().unwrap();
        let two = a.issue_refresh_token().unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(&one).unwrap().len(), 32);
        assert_ne!(one, two);
    }

    #[test]
    fn discovery_documents() {
        let a = authority();
        let config = a.openid_configuration("http://127.0.0.1:8080/");
        assert_eq!(config["issuer"], ISSUER);
        assert_eq!(
            config["jwks_uri"],
            "http://127.0.0.1:8080/.well-known/jwks.json"
        );
        assert_eq!(
            config["token_endpoint"],
            "http://127.0.0.1:8080/oauth/token"
        );
        let jwks = a.jwks();
        assert_eq!(jwks["keys"][0]["kid"], a.signing_key().kid());
        assert_eq!(jwks["keys"][0]["alg"], "ES256");
        assert_eq!(jwks["keys"][0]["crv"], "P-256");
        assert!(jwks["keys"][0].get("d").is_none(), "no private part");
    }

    #[test]
    fn settings_are_checked() {
        let key = || SigningKey::generate().unwrap();
        assert!(Authority::new(key(), AuthoritySettings::new("")).is_err());
        let mut s = AuthoritySettings::new(ISSUER);
        s.code_ttl = Duration::ZERO;
        assert!(Authority::new(key(), s).is_err());
        let mut s = AuthoritySettings::new(ISSUER);
        s.owner_claim.clear();
        assert!(Authority::new(key(), s).is_err());
        let mut s = AuthoritySettings::new(ISSUER);
        s.device_id_claim = Some(String::new());
        s.audience = Some(String::new());
        let a = Authority::new(key(), s).unwrap();
        assert_eq!(a.settings().device_id_claim, None);
        let t = a.issue_access_token("alice", Some(DEVICE), NOW).unwrap();
        let v = validator(&a, AuthorizationMode::ValidToken);
        assert!(v
            .validate(&t.token, NOW)
            .unwrap()
            .claims()
            .get(DEFAULT_DEVICE_ID_CLAIM)
            .is_none());
    }

    #[cfg(unix)]
    #[test]
    fn key_file_created_0600_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/authority-key.pem");
        let created = SigningKey::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let bytes = fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"-----BEGIN PRIVATE KEY-----\n"));
        let reloaded = SigningKey::load_or_create(&path).unwrap();
        assert_eq!(reloaded.kid(), created.kid());
        assert_eq!(reloaded.public_jwk(), created.public_jwk());
        assert_eq!(fs::read(&path).unwrap(), bytes, "not rewritten");
        // No temporary files left behind.
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
        // Tokens signed with the first instance verify with the second.
        let a = Authority::new(created, AuthoritySettings::new(ISSUER)).unwrap();
        let b = Authority::new(reloaded, AuthoritySettings::new(ISSUER)).unwrap();
        let code = a.issue_code("alice", None, NOW).unwrap();
        assert!(b.redeem_code(&code, None, NOW).is_ok());
        // An OpenSSL-made P-256 PKCS#8 key loads too.
        let openssl = dir.path().join("openssl.pem");
        fs::write(&openssl, crate::auth::pki::FOREIGN_CA_KEY_PEM).unwrap();
        assert!(SigningKey::load_or_create(&openssl).is_ok());
    }

    #[test]
    fn corrupt_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &[u8], &str); 4] = [
            ("garbage.pem", b"not a key at all", "no PKCS#8"),
            ("empty.pem", b"", "no PKCS#8"),
            ("sec1.pem", crate::auth::pki::FOREIGN_CA_KEY_SEC1_PEM.as_bytes(), "no PKCS#8"),
            (
                "truncated.pem",
                b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n",
                "not a P-256",
            ),
        ];
        for (name, contents, expected) in cases {
            let path = dir.path().join(name);
            fs::write(&path, contents).unwrap();
            let err = SigningKey::load_or_create(&path).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, AuthorityError::KeyFileCorrupt { .. }),
                "{name}: {message}"
            );
            assert!(
                message.contains(name) && message.contains(expected),
                "{name}: {message}"
            );
            assert_eq!(
                fs::read(&path).unwrap(),
                contents,
                "{name}: a corrupt key is never replaced"
            );
        }
        // An RSA key is not an authority key.
        let rsa = dir.path().join("rsa.pem");
        fs::write(&rsa, crate::auth::jwt::tests::RSA_TEST_KEY_PEM.as_bytes()).unwrap();
        let message = SigningKey::load_or_create(&rsa).unwrap_err().to_string();
        assert!(message.contains("not a P-256"), "{message}");
        // A directory where the file should be.
        let err = SigningKey::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, AuthorityError::KeyFileRead { .. }), "{err}");
    }
}
