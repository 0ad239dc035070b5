//! Who calls the API: `Authorization: Bearer <token>` (RFC 6750 §2.1)
//! checked against the gateway's token validator, giving a [`Caller`]
//! whose owner scopes every device route.
//!
//! The API accepts any valid access token of the owner: signature, time
//! claims, issuer and audience when configured, and the owner claim. It
//! never asks for the device-ID claim, even when devices must carry one
//! (`[authorization] mode = "device-id-claim"`, spec §4.4): a user's token
//! (`coap-gateway token user`) names no device. So the API validates with a
//! copy of the validator in force switched to
//! [`AuthorizationMode::ValidToken`], rebuilt only when the control plane
//! swaps the validator (new keys).
//!
//! What it does not do: scopes or roles. Every valid token of an owner may
//! do everything with that owner's devices.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{error, now_unix, ApiState};
use crate::auth::jwt::{AuthorizationMode, JwtError, SettingsError, TokenValidator, VerifiedToken};
use crate::auth::validator::SharedValidator;

/// The API's view of the [`SharedValidator`]: the same keys and settings,
/// without the device-ID claim.
pub(super) struct ApiValidator {
    shared: Arc<SharedValidator>,
    /// (the shared validator it was made from, the API's copy). Keyed by
    /// pointer: the shared validator is replaced as a whole on a key
    /// refresh, never changed in place, and holding the source `Arc` here
    /// keeps its address from being reused while the entry lives.
    derived: Mutex<Option<(Arc<TokenValidator>, Arc<TokenValidator>)>>,
    /// Tokens that passed, so a client that sends the same token with
    /// every request pays for the signature check once (an ES256 verify is
    /// most of an API request's CPU). Valid for the validator that checked
    /// them (a key refresh empties it) and until their `exp`.
    passed: Mutex<Passed>,
}

/// Owners of tokens that passed, by token.
#[derive(Default)]
struct Passed {
    /// The API validator the entries were checked with.
    by: Option<Arc<TokenValidator>>,
    /// token → (owner, `exp`).
    tokens: HashMap<Box<str>, (Box<str>, Option<u64>)>,
}

/// Bound of [`Passed`]: emptied when full (tokens of one API user repeat;
/// a flood of distinct tokens only costs their verification).
const PASSED_MAX: usize = 4096;

impl ApiValidator {
    pub(super) fn new(shared: Arc<SharedValidator>) -> ApiValidator {
        ApiValidator {
            shared,
            derived: Mutex::new(None),
            passed: Mutex::new(Passed::default()),
        }
    }

    /// The validator for API tokens, derived from the one in force.
    pub(super) fn current(&self) -> Result<Arc<TokenValidator>, SettingsError> {
        let source = self.shared.load();
        if source.settings().mode == AuthorizationMode::ValidToken {
            return Ok(source);
        }
        // Only the API thread takes this lock, for a pointer comparison
        // (and a key-set clone after a key refresh); a panic cannot leave
        // the cache half-written, so a poisoned lock is taken over.
        let mut derived = self.derived.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((from, api)) = derived.as_ref() {
            if Arc::ptr_eq(from, &source) {
                return Ok(api.clone());
            }
        }
        let mut settings = source.settings().clone();
        settings.mode = AuthorizationMode::ValidToken;
        let api = Arc::new(TokenValidator::new(source.keys().clone(), settings)?);
        *derived = Some((source, api.clone()));
        Ok(api)
    }

    /// The owner of a valid token: from [`Passed`] when this validator
    /// already checked it and it has not expired, else checked now.
    pub(super) fn owner(&self, token: &str, now_unix: u64) -> Result<String, Refusal> {
        let validator = self.current().map_err(Refusal::Settings)?;
        {
            let mut passed = self.passed.lock().unwrap_or_else(|p| p.into_inner());
            if !passed
                .by
                .as_ref()
                .is_some_and(|v| Arc::ptr_eq(v, &validator))
            {
                passed.by = Some(validator.clone());
                passed.tokens.clear();
            }
            match passed.tokens.get(token) {
                // Stricter than the validator: no leeway after `exp`.
                Some((owner, exp)) if exp.is_none_or(|e| now_unix < e) => {
                    return Ok(owner.to_string());
                }
                Some(_) => {
                    passed.tokens.remove(token);
                }
                None => {}
            }
        }
        let verified = self.validate_with(&validator, token, now_unix)?;
        let owner = verified.owner().to_owned();
        let mut passed = self.passed.lock().unwrap_or_else(|p| p.into_inner());
        if passed
            .by
            .as_ref()
            .is_some_and(|v| Arc::ptr_eq(v, &validator))
        {
            if passed.tokens.len() >= PASSED_MAX {
                passed.tokens.clear();
            }
            passed
                .tokens
                .insert(token.into(), (owner.as_str().into(), verified.expires_at()));
        }
        Ok(owner)
    }

    fn validate_with(
        &self,
        validator: &TokenValidator,
        token: &str,
        now_unix: u64,
    ) -> Result<VerifiedToken, Refusal> {
        validator.validate(token, now_unix).map_err(|e| {
            if e.is_unknown_key() {
                // spec §4.1: a token naming a key we do not have makes the
                // control plane fetch the key set again; this request still
                // fails, the next one may pass.
                self.shared.request_refresh();
            }
            Refusal::Token(e)
        })
    }
}

/// Why a request was not let in.
#[derive(Debug)]
pub(super) enum Refusal {
    /// No validator was given to the API.
    NoValidator,
    /// No `Authorization: Bearer` header.
    Missing,
    /// An `Authorization` header of another scheme, or not text.
    NotBearer,
    /// The token failed validation.
    Token(JwtError),
    /// The API's validator could not be derived (cannot happen for a
    /// validator that was built: switching to valid-token mode removes a
    /// requirement and adds none).
    Settings(SettingsError),
}

/// The one place a [`Refusal`] becomes a response: 401 with the RFC 6750
/// §3 challenge, or 503/500 when the API itself cannot check tokens.
impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (challenge, message) = match self {
            Refusal::NoValidator => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the HTTP API has no token validator: bearer tokens cannot be checked",
                )
            }
            Refusal::Settings(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("cannot check bearer tokens: {e}"),
                )
            }
            // RFC 6750 §3.1: no error code when the request had no
            // authentication information.
            Refusal::Missing => (
                r#"Bearer realm="coap-gateway""#,
                "missing Authorization: Bearer token".to_owned(),
            ),
            Refusal::NotBearer => (
                r#"Bearer realm="coap-gateway", error="invalid_request""#,
                "the Authorization header is not a Bearer token".to_owned(),
            ),
            Refusal::Token(e) => (
                r#"Bearer realm="coap-gateway", error="invalid_token""#,
                format!("invalid bearer token: {e}"),
            ),
        };
        let mut response = error(StatusCode::UNAUTHORIZED, &message);
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        response
    }
}

/// The owner a request acts for. Only the token check builds one, so a
/// handler that takes a `Caller` cannot skip it (STYLE.md §4).
#[derive(Debug, Clone)]
pub(super) struct Caller {
    owner: String,
}

impl Caller {
    pub(super) fn owner(&self) -> &str {
        &self.owner
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Refusal> {
        let validator = state.validator.as_ref().ok_or(Refusal::NoValidator)?;
        let header = parts.headers.get(AUTHORIZATION).ok_or(Refusal::Missing)?;
        let token = bearer_token(header).ok_or(Refusal::NotBearer)?;
        Ok(Caller {
            owner: validator.owner(token, now_unix())?,
        })
    }
}

/// RFC 6750 §2.1 `Bearer <token>`; the scheme is case-insensitive
/// (RFC 9110 §11.1).
fn bearer_token(header: &HeaderValue) -> Option<&str> {
    let value = header.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(bearer_token(&h("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&h("bearer  abc ")), Some("abc"));
        assert_eq!(bearer_token(&h("Basic abc")), None);
        assert_eq!(bearer_token(&h("Bearer ")), None);
        assert_eq!(bearer_token(&h("Bearer")), None);
    }
}
