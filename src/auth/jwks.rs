//! JSON Web Key Sets (RFC 7517): the public keys access tokens are checked
//! against (spec §4.1), and the document the embedded authority publishes
//! at `/.well-known/jwks.json` (SURFACE.md).
//!
//! Parsing only: fetching `jwks_uri` over HTTP, caching and the "re-fetch
//! once on an unknown `kid`" rule of §4.1 belong to the control plane, which
//! hands the parsed [`Jwks`] to [`super::jwt::TokenValidator`].
//!
//! Accepted keys are signature keys of the asymmetric algorithms the ring
//! provider in [`super::jwt`] verifies: EC P-256 (ES256), EC P-384 (ES384),
//! RSA ≥ 2048 bits (RS256/384/512, PS256/384/512) and OKP Ed25519 (EdDSA).
//! Anything else in a set — encryption keys, symmetric `oct` keys, unknown
//! curves, broken entries — is skipped with a reason rather than failing the
//! whole set: identity providers routinely publish encryption keys next to
//! their signing keys, and one odd entry must not lock every device out.
//! Symmetric keys are never accepted: a gateway that verified HS256 with a
//! published key would accept tokens anyone can forge.

use std::str::FromStr;

use base64::engine::general_purpose::{URL_SAFE_NO_PAD, URL_SAFE_NO_PAD_INDIFFERENT};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{json, Map, Value};

/// Byte length of one P-256 coordinate.
const P256_COORDINATE_LEN: usize = 32;
/// Byte length of one P-384 coordinate.
const P384_COORDINATE_LEN: usize = 48;
/// Byte length of an Ed25519 public key (RFC 8037 §2).
const ED25519_KEY_LEN: usize = 32;
/// Smallest RSA modulus ring verifies (`RSA_PKCS1_2048_8192_*`); refusing
/// smaller keys at parse time gives a clear reason instead of a signature
/// failure on every token.
const RSA_MIN_MODULUS_LEN: usize = 2048 / 8;
/// Budget for a key set from a peer: real sets hold a handful of keys.
const MAX_KEYS: usize = 64;

/// The kind of public key behind a JWK, which fixes the algorithms it can
/// verify when the JWK does not name one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// `kty: EC`, `crv: P-256`: ES256.
    EcP256,
    /// `kty: EC`, `crv: P-384`: ES384.
    EcP384,
    /// `kty: RSA`: RS256/384/512 and PS256/384/512.
    Rsa,
    /// `kty: OKP`, `crv: Ed25519`: EdDSA (RFC 8037).
    Ed25519,
}

impl KeyType {
    /// Whether a key of this type can verify `alg` at all (RFC 7518 §3.1,
    /// RFC 8037 §3.1). ES256 with a P-384 key, or RS256 with an EC key, is
    /// a mismatch, not a weaker check.
    pub fn accepts(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (KeyType::EcP256, ES256)
                | (KeyType::EcP384, ES384)
                | (KeyType::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (KeyType::Ed25519, EdDSA)
        )
    }
}

/// One usable signature-verification key of a set.
#[derive(Clone)]
pub struct VerificationKey {
    kid: Option<String>,
    key_type: KeyType,
    algorithm: Option<Algorithm>,
    key: DecodingKey,
}

impl VerificationKey {
    /// The key ID (`kid`), if the JWK has one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The key's type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The algorithm the JWK declares (`alg`), if any.
    pub fn algorithm(&self) -> Option<Algorithm> {
        self.algorithm
    }

    /// Whether a token signed with `alg` may be checked with this key.
    /// Spec §4.1: a declared JWK `alg` must equal the token's `alg`;
    /// without one, the key type decides.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        match self.algorithm {
            Some(declared) => declared == alg,
            None => self.key_type.accepts(alg),
        }
    }

    /// The key in the form jsonwebtoken's verifier takes.
    pub(crate) fn decoding_key(&self) -> &DecodingKey {
        &self.key
    }
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("key_type", &self.key_type)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// A JWK that was left out of a set, and why: for the control plane's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedKey {
    /// The entry's `kid`, when it had a string one.
    pub kid: Option<String>,
    /// Why it was not used.
    pub reason: String,
}

/// A parsed JSON Web Key Set: the usable verification keys, in document
/// order, and the entries that were skipped.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    keys: Vec<VerificationKey>,
    skipped: Vec<SkippedKey>,
}

/// Why a JWKS document could not be used at all.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The document is not JSON.
    #[error("JWKS document is not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// The document is JSON but has no `keys` array (RFC 7517 §5).
    #[error("JWKS document has no \"keys\" array")]
    NoKeysArray,
    /// More keys than any real issuer publishes.
    #[error("JWKS document has {count} keys, more than the {max} accepted")]
    TooManyKeys {
        /// Keys in the document.
        count: usize,
        /// The budget.
        max: usize,
    },
    /// A public key handed to a [`PublicJwk`] constructor is malformed.
    #[error("invalid public key: {0}")]
    InvalidPublicKey(&'static str),
}

/// Why no key of a set fits a token (spec §4.1 key lookup).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyLookupError {
    /// The token names a `kid` the set does not contain. The control plane
    /// re-fetches the set once on this error (§4.1).
    #[error("no key with kid {0:?} in the issuer's key set")]
    UnknownKid(String),
    /// The key the token names cannot verify the token's algorithm.
    #[error("token algorithm {token_alg:?} does not match key {kid:?} ({key})")]
    AlgorithmMismatch {
        /// The key's `kid`.
        kid: Option<String>,
        /// The algorithm in the token header.
        token_alg: Algorithm,
        /// What the key is (declared `alg` or key type).
        key: String,
    },
    /// The token has no `kid` and no key of the set fits its algorithm.
    #[error("token has no kid and no key of the set verifies {0:?}")]
    NoKeyForAlgorithm(Algorithm),
    /// The token has no `kid` and several keys fit; guessing would make the
    /// result depend on key order.
    #[error("token has no kid and {candidates} keys of the set verify {alg:?}")]
    KidRequired {
        /// The token's algorithm.
        alg: Algorithm,
        /// How many keys would fit.
        candidates: usize,
    },
}

impl Jwks {
    /// Parses a JWKS document (RFC 7517 §5). Fails only when the document
    /// as a whole is unusable; bad or unsupported entries land in
    /// [`Jwks::skipped`]. A set with no usable key parses (and rejects
    /// every token), so an issuer mid-rotation does not fail start-up.
    pub fn parse(document: &[u8]) -> Result<Self, JwksError> {
        let value: Value = serde_json::from_slice(document).map_err(JwksError::NotJson)?;
        let entries = value
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(JwksError::NoKeysArray)?;
        if entries.len() > MAX_KEYS {
            return Err(JwksError::TooManyKeys {
                count: entries.len(),
                max: MAX_KEYS,
            });
        }
        let mut set = Jwks::default();
        for entry in entries {
            let kid = entry.get("kid").and_then(Value::as_str).map(str::to_owned);
            let parsed = entry
                .as_object()
                .ok_or_else(|| "entry is not a JSON object".to_owned())
                .and_then(parse_key);
            match parsed {
                Ok(key) if key.kid.is_some() && set.keys.iter().any(|k| k.kid == key.kid) => {
                    // A duplicate kid would make the lookup depend on order.
                    set.skipped.push(SkippedKey {
                        kid,
                        reason: "duplicate kid; the first key with it is used".to_owned(),
                    });
                }
                Ok(key) => set.keys.push(key),
                Err(reason) => set.skipped.push(SkippedKey { kid, reason }),
            }
        }
        Ok(set)
    }

    /// A set made of our own public keys, without a JSON round trip (the
    /// embedded authority's keys, SURFACE.md `jwks_url = ""`).
    pub fn from_public_jwks(keys: &[PublicJwk]) -> Self {
        Jwks {
            keys: keys.iter().map(PublicJwk::verification_key).collect(),
            skipped: Vec::new(),
        }
    }

    /// The usable keys, in document order.
    pub fn keys(&self) -> &[VerificationKey] {
        &self.keys
    }

    /// The entries that were skipped, with reasons.
    pub fn skipped(&self) -> &[SkippedKey] {
        &self.skipped
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set has no usable key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Finds the key for a token header (spec §4.1): by `kid` when the
    /// token has one — an unknown `kid` is an error, never a fallback to
    /// another key — and the key must accept the token's `alg`. A token
    /// without `kid` is accepted only when exactly one key fits its `alg`.
    pub fn find(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<&VerificationKey, KeyLookupError> {
        match kid {
            Some(kid) => {
                let key = self
                    .keys
                    .iter()
                    .find(|k| k.kid.as_deref() == Some(kid))
                    .ok_or_else(|| KeyLookupError::UnknownKid(kid.to_owned()))?;
                if key.accepts(alg) {
                    Ok(key)
                } else {
                    Err(KeyLookupError::AlgorithmMismatch {
                        kid: key.kid.clone(),
                        token_alg: alg,
                        key: describe(key),
                    })
                }
            }
            None => {
                let mut fitting = self.keys.iter().filter(|k| k.accepts(alg));
                match (fitting.next(), fitting.count()) {
                    (None, _) => Err(KeyLookupError::NoKeyForAlgorithm(alg)),
                    (Some(key), 0) => Ok(key),
                    (Some(_), more) => Err(KeyLookupError::KidRequired {
                        alg,
                        candidates: more + 1,
                    }),
                }
            }
        }
    }
}

fn describe(key: &VerificationKey) -> String {
    match key.algorithm {
        Some(alg) => format!("declared alg {alg:?}"),
        None => format!("{:?} key", key.key_type),
    }
}

/// Parses one JWK object into a verification key, or says why it is not
/// one we use.
fn parse_key(jwk: &Map<String, Value>) -> Result<VerificationKey, String> {
    let kid = match jwk.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err("kid is not a string".to_owned()),
    };
    // RFC 7517 §4.2: `use` other than `sig` (typically `enc`) is not for us.
    match jwk.get("use") {
        None => {}
        Some(Value::String(u)) if u == "sig" => {}
        Some(other) => return Err(format!("use is {other}, not \"sig\"")),
    }
    // RFC 7517 §4.3: when `key_ops` is given it must allow verification.
    if let Some(ops) = jwk.get("key_ops") {
        let verifies = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
        if !verifies {
            return Err("key_ops does not include \"verify\"".to_owned());
        }
    }
    let algorithm = match jwk.get("alg") {
        None => None,
        Some(Value::String(name)) => Some(
            Algorithm::from_str(name)
                .map_err(|_| format!("algorithm {name:?} is not supported"))?,
        ),
        Some(_) => return Err("alg is not a string".to_owned()),
    };
    let text = |name: &str| -> Result<&str, String> {
        jwk.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("member {name:?} is missing or not a string"))
    };
    let bytes = |name: &str| -> Result<Vec<u8>, String> {
        URL_SAFE_NO_PAD_INDIFFERENT
            .decode(text(name)?)
            .map_err(|e| format!("member {name:?} is not base64url: {e}"))
    };
    let (key_type, key) = match text("kty")? {
        "EC" => {
            let (key_type, len) = match text("crv")? {
                "P-256" => (KeyType::EcP256, P256_COORDINATE_LEN),
                "P-384" => (KeyType::EcP384, P384_COORDINATE_LEN),
                other => return Err(format!("EC curve {other:?} is not supported")),
            };
            let (x, y) = (bytes("x")?, bytes("y")?);
            if x.len() != len || y.len() != len {
                return Err(format!("EC coordinates must be {len} bytes each"));
            }
            // SEC 1 uncompressed point, the form ring's ECDSA verifier takes.
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (key_type, DecodingKey::from_ec_der(&point))
        }
        "RSA" => {
            let (n, e) = (bytes("n")?, bytes("e")?);
            let significant = n.iter().skip_while(|b| **b == 0).count();
            if significant < RSA_MIN_MODULUS_LEN {
                return Err(format!(
                    "RSA modulus is {} bits; at least 2048 are required",
                    significant * 8
                ));
            }
            if e.is_empty() {
                return Err("RSA exponent is empty".to_owned());
            }
            (KeyType::Rsa, DecodingKey::from_rsa_raw_components(&n, &e))
        }
        "OKP" => {
            match text("crv")? {
                "Ed25519" => {}
                other => return Err(format!("OKP curve {other:?} is not supported")),
            }
            let x = bytes("x")?;
            if x.len() != ED25519_KEY_LEN {
                return Err(format!("Ed25519 key must be {ED25519_KEY_LEN} bytes"));
            }
            (KeyType::Ed25519, DecodingKey::from_ed_der(&x))
        }
        "oct" => return Err("symmetric (oct) keys are never accepted".to_owned()),
        other => return Err(format!("key type {other:?} is not supported")),
    };
    if let Some(alg) = algorithm {
        if !key_type.accepts(alg) {
            return Err(format!("alg {alg:?} does not fit a {key_type:?} key"));
        }
    }
    Ok(VerificationKey {
        kid,
        key_type,
        algorithm,
        key,
    })
}

/// The public half of one of our own signing keys, as a JWK: what the
/// embedded authority publishes. Always `use: sig` with an explicit `alg`,
/// and a `kid` that is the RFC 7638 thumbprint, so every node sharing the
/// key file publishes the same `kid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicJwk {
    kid: String,
    algorithm: Algorithm,
    params: PublicParams,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PublicParams {
    Ec {
        key_type: KeyType,
        x: Vec<u8>,
        y: Vec<u8>,
    },
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Ed25519 {
        x: Vec<u8>,
    },
}

impl PublicJwk {
    /// A P-256 key from its SEC 1 uncompressed point (65 bytes, `04 || x ||
    /// y`, what ring's `EcdsaKeyPair::public_key` gives), for ES256.
    pub fn ec_p256(uncompressed_point: &[u8]) -> Result<Self, JwksError> {
        let coordinates = match uncompressed_point {
            [0x04, rest @ ..] if rest.len() == 2 * P256_COORDINATE_LEN => rest,
            _ => {
                return Err(JwksError::InvalidPublicKey(
                    "a P-256 public key is a 65-byte uncompressed point",
                ))
            }
        };
        let (x, y) = coordinates.split_at(P256_COORDINATE_LEN);
        Ok(Self::with_thumbprint(
            Algorithm::ES256,
            PublicParams::Ec {
                key_type: KeyType::EcP256,
                x: x.to_vec(),
                y: y.to_vec(),
            },
        ))
    }

    /// An Ed25519 key (32 bytes), for EdDSA.
    pub fn ed25519(public_key: &[u8]) -> Result<Self, JwksError> {
        if public_key.len() != ED25519_KEY_LEN {
            return Err(JwksError::InvalidPublicKey(
                "an Ed25519 public key is 32 bytes",
            ));
        }
        Ok(Self::with_thumbprint(
            Algorithm::EdDSA,
            PublicParams::Ed25519 {
                x: public_key.to_vec(),
            },
        ))
    }

    /// An RSA key from its big-endian modulus and exponent, for `alg`
    /// (RS256/384/512 or PS256/384/512).
    pub fn rsa(modulus: &[u8], exponent: &[u8], alg: Algorithm) -> Result<Self, JwksError> {
        if !KeyType::Rsa.accepts(alg) {
            return Err(JwksError::InvalidPublicKey(
                "an RSA key signs only RS* or PS* algorithms",
            ));
        }
        let n: Vec<u8> = modulus.iter().copied().skip_while(|b| *b == 0).collect();
        let e: Vec<u8> = exponent.iter().copied().skip_while(|b| *b == 0).collect();
        if n.len() < RSA_MIN_MODULUS_LEN || e.is_empty() {
            return Err(JwksError::InvalidPublicKey(
                "an RSA key needs a modulus of at least 2048 bits and an exponent",
            ));
        }
        Ok(Self::with_thumbprint(alg, PublicParams::Rsa { n, e }))
    }

    fn with_thumbprint(algorithm: Algorithm, params: PublicParams) -> Self {
        let mut jwk = PublicJwk {
            kid: String::new(),
            algorithm,
            params,
        };
        jwk.kid = jwk.thumbprint();
        jwk
    }

    /// The key ID: the RFC 7638 SHA-256 thumbprint, base64url.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The signature algorithm this key is published for.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// RFC 7638 §3: SHA-256 over the required members in lexicographic
    /// order with no whitespace. The members are base64url or fixed
    /// names, so no JSON escaping can occur.
    pub fn thumbprint(&self) -> String {
        let canonical = match &self.params {
            PublicParams::Ec { key_type, x, y } => format!(
                r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
                curve_name(*key_type),
                URL_SAFE_NO_PAD.encode(x),
                URL_SAFE_NO_PAD.encode(y)
            ),
            PublicParams::Rsa { n, e } => format!(
                r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
                URL_SAFE_NO_PAD.encode(e),
                URL_SAFE_NO_PAD.encode(n)
            ),
            PublicParams::Ed25519 { x } => format!(
                r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
                URL_SAFE_NO_PAD.encode(x)
            ),
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
        URL_SAFE_NO_PAD.encode(digest.as_ref())
    }

    /// The JWK as JSON (RFC 7517 §4, RFC 7518 §6, RFC 8037 §2).
    pub fn to_json(&self) -> Value {
        let alg = format!("{:?}", self.algorithm);
        match &self.params {
            PublicParams::Ec { key_type, x, y } => json!({
                "kty": "EC",
                "crv": curve_name(*key_type),
                "x": URL_SAFE_NO_PAD.encode(x),
                "y": URL_SAFE_NO_PAD.encode(y),
                "kid": self.kid,
                "alg": alg,
                "use": "sig",
            }),
            PublicParams::Rsa { n, e } => json!({
                "kty": "RSA",
                "n": URL_SAFE_NO_PAD.encode(n),
                "e": URL_SAFE_NO_PAD.encode(e),
                "kid": self.kid,
                "alg": alg,
                "use": "sig",
            }),
            PublicParams::Ed25519 { x } => json!({
                "kty": "OKP",
                "crv": "Ed25519",
                "x": URL_SAFE_NO_PAD.encode(x),
                "kid": self.kid,
                "alg": alg,
                "use": "sig",
            }),
        }
    }

    fn verification_key(&self) -> VerificationKey {
        let (key_type, key) = match &self.params {
            PublicParams::Ec { key_type, x, y } => {
                let mut point = Vec::with_capacity(1 + x.len() + y.len());
                point.push(0x04);
                point.extend_from_slice(x);
                point.extend_from_slice(y);
                (*key_type, DecodingKey::from_ec_der(&point))
            }
            PublicParams::Rsa { n, e } => {
                (KeyType::Rsa, DecodingKey::from_rsa_raw_components(n, e))
            }
            PublicParams::Ed25519 { x } => (KeyType::Ed25519, DecodingKey::from_ed_der(x)),
        };
        VerificationKey {
            kid: Some(self.kid.clone()),
            key_type,
            algorithm: Some(self.algorithm),
            key,
        }
    }
}

fn curve_name(key_type: KeyType) -> &'static str {
    match key_type {
        KeyType::EcP384 => "P-384",
        // Only EC key types reach here; P-256 is the one we create.
        _ => "P-256",
    }
}

/// A JWKS document (`{"keys": [...]}`) for `/.well-known/jwks.json`.
pub fn document(keys: &[PublicJwk]) -> Value {
    json!({ "keys": keys.iter().map(PublicJwk::to_json).collect::<Vec<_>>() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

    fn p256_point() -> Vec<u8> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        pair.public_key().as_ref().to_vec()
    }

    fn ed25519_public() -> Vec<u8> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        pair.public_key().as_ref().to_vec()
    }

    #[test]
    fn document_round_trip() {
        let ec = PublicJwk::ec_p256(&p256_point()).unwrap();
        let ed = PublicJwk::ed25519(&ed25519_public()).unwrap();
        let rsa = PublicJwk::rsa(&[0xc3; 256], &[1, 0, 1], Algorithm::RS256).unwrap();
        let doc = document(&[ec.clone(), ed.clone(), rsa.clone()]);
        let set = Jwks::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.len(), 3);
        assert!(set.skipped().is_empty());
        let ec_key = set.find(Some(ec.kid()), Algorithm::ES256).unwrap();
        assert_eq!(ec_key.key_type(), KeyType::EcP256);
        assert_eq!(ec_key.algorithm(), Some(Algorithm::ES256));
        assert_eq!(
            set.find(Some(ed.kid()), Algorithm::EdDSA)
                .unwrap()
                .key_type(),
            KeyType::Ed25519
        );
        assert_eq!(
            set.find(Some(rsa.kid()), Algorithm::RS256)
                .unwrap()
                .key_type(),
            KeyType::Rsa
        );
        // The in-memory set is the same as the parsed one.
        let direct = Jwks::from_public_jwks(&[ec.clone(), ed, rsa]);
        assert_eq!(direct.len(), 3);
        assert_eq!(
            direct
                .find(Some(ec.kid()), Algorithm::ES256)
                .unwrap()
                .decoding_key()
                .try_get_as_bytes()
                .unwrap(),
            ec_key.decoding_key().try_get_as_bytes().unwrap()
        );
    }

    /// RFC 7638 §3.1 example key and its published thumbprint.
    #[test]
    fn thumbprint_matches_rfc7638_example() {
        let n = URL_SAFE_NO_PAD.decode(
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        )
        .unwrap();
        let jwk = PublicJwk::rsa(&n, &[1, 0, 1], Algorithm::RS256).unwrap();
        assert_eq!(jwk.kid(), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }

    #[test]
    fn skips_unusable_entries_with_reasons() {
        let ec = PublicJwk::ec_p256(&p256_point()).unwrap();
        let mut enc = ec.to_json();
        enc["use"] = json!("enc");
        enc["kid"] = json!("enc-key");
        let mut dup = PublicJwk::ec_p256(&p256_point()).unwrap().to_json();
        dup["kid"] = json!(ec.kid());
        let doc = json!({"keys": [
            ec.to_json(),
            enc,
            dup,
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA", "kid": "p521"},
            {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA", "kid": "short"},
            {"kty": "RSA", "n": URL_SAFE_NO_PAD.encode([0xc3; 128]), "e": "AQAB", "kid": "rsa1024"},
            {"kty": "EC", "crv": "P-256", "alg": "RS256", "kid": "confused",
             "x": URL_SAFE_NO_PAD.encode([1; 32]), "y": URL_SAFE_NO_PAD.encode([2; 32])},
            {"kty": "RSA", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB", "kid": "oaep"},
            "not an object",
        ]});
        let set = Jwks::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.len(), 1);
        let reasons: Vec<_> = set.skipped().iter().map(|s| s.reason.as_str()).collect();
        assert_eq!(set.skipped().len(), 9, "{reasons:?}");
        assert!(reasons[0].contains("not \"sig\""));
        assert!(reasons[1].contains("duplicate kid"));
        assert!(reasons[2].contains("symmetric"));
        assert!(reasons[3].contains("P-521"));
        assert!(reasons[4].contains("32 bytes"));
        assert!(reasons[5].contains("1024 bits"));
        assert!(reasons[6].contains("does not fit"));
        assert!(reasons[7].contains("RSA-OAEP"));
        assert!(reasons[8].contains("not a JSON object"));
    }

    #[test]
    fn document_errors() {
        assert!(matches!(Jwks::parse(b"{"), Err(JwksError::NotJson(_))));
        assert!(matches!(
            Jwks::parse(br#"{"keys": {}}"#),
            Err(JwksError::NoKeysArray)
        ));
        let many = json!({ "keys": vec![json!({}); MAX_KEYS + 1] });
        assert!(matches!(
            Jwks::parse(many.to_string().as_bytes()),
            Err(JwksError::TooManyKeys { .. })
        ));
        let empty = Jwks::parse(br#"{"keys": []}"#).unwrap();
        assert!(empty.is_empty());
        assert!(PublicJwk::ec_p256(&[4; 33]).is_err());
        assert!(PublicJwk::ed25519(&[0; 31]).is_err());
        assert!(PublicJwk::rsa(&[0xc3; 256], &[1, 0, 1], Algorithm::ES256).is_err());
    }

    #[test]
    fn lookup_by_kid_and_algorithm() {
        let a = PublicJwk::ec_p256(&p256_point()).unwrap();
        let b = PublicJwk::ec_p256(&p256_point()).unwrap();
        let ed = PublicJwk::ed25519(&ed25519_public()).unwrap();
        let set = Jwks::from_public_jwks(&[a.clone(), b.clone(), ed.clone()]);
        assert_eq!(
            set.find(Some(b.kid()), Algorithm::ES256).unwrap().kid(),
            Some(b.kid())
        );
        assert_eq!(
            set.find(Some("nope"), Algorithm::ES256).unwrap_err(),
            KeyLookupError::UnknownKid("nope".into())
        );
        assert!(matches!(
            set.find(Some(a.kid()), Algorithm::RS256),
            Err(KeyLookupError::AlgorithmMismatch { .. })
        ));
        // Without kid: unique fit is used, several fits are ambiguous.
        assert_eq!(
            set.find(None, Algorithm::EdDSA).unwrap().kid(),
            Some(ed.kid())
        );
        assert_eq!(
            set.find(None, Algorithm::ES256).unwrap_err(),
            KeyLookupError::KidRequired {
                alg: Algorithm::ES256,
                candidates: 2
            }
        );
        assert_eq!(
            set.find(None, Algorithm::RS256).unwrap_err(),
            KeyLookupError::NoKeyForAlgorithm(Algorithm::RS256)
        );
    }

    #[test]
    fn key_without_alg_is_matched_by_type() {
        let mut jwk = PublicJwk::ec_p256(&p256_point()).unwrap().to_json();
        jwk.as_object_mut().unwrap().remove("alg");
        let set = Jwks::parse(json!({ "keys": [jwk] }).to_string().as_bytes()).unwrap();
        let key = &set.keys()[0];
        assert_eq!(key.algorithm(), None);
        assert!(key.accepts(Algorithm::ES256));
        assert!(!key.accepts(Algorithm::ES384));
        assert!(!key.accepts(Algorithm::HS256));
    }
}
