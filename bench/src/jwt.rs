//! The yardstick of sign-in costs: a bare `jsonwebtoken::decode` of an
//! ES256 access token with the embedded authority's public key, on the
//! project's ring `CryptoProvider` (jsonwebtoken 11 has no ring backend of
//! its own, FIELD-NOTES.md), checking the signature, `exp` and `iss` —
//! nothing of the gateway's own checks (owner and device-ID claims, `typ`,
//! key lookup by `kid`) and no CoAP, CBOR or TLS.

use coap_gateway::auth::authority::Authority;
use coap_gateway::auth::jwt::{install_crypto_provider, TokenValidator};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

pub struct BareVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl BareVerifier {
    /// For tokens of `authority` (its public key and issuer).
    pub fn new(authority: &Authority) -> Result<BareVerifier, String> {
        if !install_crypto_provider() {
            return Err("another jsonwebtoken CryptoProvider is installed".into());
        }
        let jwks = authority.jwks();
        let jwk = &jwks["keys"][0];
        let (Some(x), Some(y)) = (jwk["x"].as_str(), jwk["y"].as_str()) else {
            return Err(format!("the authority's key is not an EC key: {jwk}"));
        };
        let key = DecodingKey::from_ec_components(x, y)
            .map_err(|e| format!("the authority's public key: {e}"))?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[authority.settings().issuer.as_str()]);
        validation.validate_aud = false;
        Ok(BareVerifier { key, validation })
    }

    /// Verifies `token`; returns its `exp`.
    pub fn verify(&self, token: &str) -> Result<u64, jsonwebtoken::errors::Error> {
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)?;
        Ok(data.claims.get("exp").and_then(Value::as_u64).unwrap_or(0))
    }
}

/// The gateway's own validator for `authority`'s tokens, with the settings
/// the gateway derives from its configuration (`[authorization]` defaults:
/// issuer = the authority's, device-ID-claim mode).
pub fn gateway_validator(
    authority: &Authority,
    config: &coap_gateway::config::Config,
) -> Result<TokenValidator, String> {
    TokenValidator::new(
        authority.key_set(),
        authority.validation_settings(config.authorization.mode),
    )
    .map_err(|e| e.to_string())
}
