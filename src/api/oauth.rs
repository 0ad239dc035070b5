//! `POST /oauth/token`, the embedded authority's token endpoint (RFC 6749
//! §3.2): the `authorization_code` grant (§4.1.3) turns a code from
//! `coap-gateway token code` or `POST /api/v1/authorization-codes` into an
//! access and a refresh token; the `refresh_token` grant (§6) rotates
//! them. It is the same [`EmbeddedProvider`] the devices' sign-up and
//! refresh use, so a code is redeemed once whichever side redeems it.
//!
//! The body is `application/x-www-form-urlencoded` (RFC 6749 Appendix B);
//! a JSON object of strings is accepted too. An extra `device_id` parameter
//! names the device a code is redeemed for: a code bound to a device needs
//! it, and the access token then carries the device-ID claim.
//!
//! What it does not do: client authentication (the discovery document says
//! `token_endpoint_auth_methods_supported: ["none"]`; `client_id`,
//! `client_secret` and `redirect_uri` are ignored), scopes, the other
//! grant types.
//!
//! [`EmbeddedProvider`]: crate::auth::provider::EmbeddedProvider

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, PRAGMA};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::{error, now_unix, ApiState};
use crate::auth::provider::{OAuthError, TokenSet};

/// An error response of RFC 6749 §5.2 (status 400 unless said otherwise).
#[derive(Debug, PartialEq, Eq)]
enum TokenError {
    /// `invalid_request`: a parameter missing, repeated or malformed, or a
    /// body that is neither form nor JSON.
    InvalidRequest(String),
    /// `unsupported_grant_type`.
    UnsupportedGrantType(String),
    /// `invalid_grant`: the code or refresh token is invalid, expired,
    /// used, or bound to another device.
    InvalidGrant(String),
    /// The provider could not answer now: 503 `temporarily_unavailable`
    /// (the code RFC 6749 §4.1.2.1 defines for this, used here too).
    Unavailable(String),
}

impl From<OAuthError> for TokenError {
    fn from(e: OAuthError) -> TokenError {
        match e {
            OAuthError::Rejected(m) => TokenError::InvalidGrant(m),
            OAuthError::Unavailable(m) => TokenError::Unavailable(m),
        }
    }
}

/// The one place a [`TokenError`] becomes a response.
impl IntoResponse for TokenError {
    fn into_response(self) -> Response {
        let (status, code, description) = match self {
            TokenError::InvalidRequest(d) => (StatusCode::BAD_REQUEST, "invalid_request", d),
            TokenError::UnsupportedGrantType(d) => {
                (StatusCode::BAD_REQUEST, "unsupported_grant_type", d)
            }
            TokenError::InvalidGrant(d) => (StatusCode::BAD_REQUEST, "invalid_grant", d),
            TokenError::Unavailable(d) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                d,
            ),
        };
        (
            status,
            [(CACHE_CONTROL, "no-store"), (PRAGMA, "no-cache")],
            Json(serde_json::json!({
                "error": code,
                "error_description": description_chars(&description),
            })),
        )
            .into_response()
    }
}

/// RFC 6749 §5.2: `error_description` is limited to %x20-21 / %x23-5B /
/// %x5D-7E; our messages may quote (`"`, `\`) or carry other text, which
/// is replaced rather than sent.
fn description_chars(description: &str) -> String {
    description
        .chars()
        .map(|c| match c {
            '"' => '\'',
            '\\' => '/',
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

/// `POST /oauth/token`. Success is 200 with `{"access_token",
/// "token_type": "Bearer", "expires_in", "refresh_token"}` and the
/// `Cache-Control: no-store` / `Pragma: no-cache` of RFC 6749 §5.1.
pub(super) async fn token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(provider) = &state.provider else {
        return if state.embedded_authority().is_none() {
            error(
                StatusCode::NOT_FOUND,
                "the embedded authority is not enabled: tokens come from the configured OAuth provider",
            )
        } else {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the HTTP API has no token provider: the embedded authority cannot exchange tokens here",
            )
        };
    };
    let body = match body {
        Ok(body) => body,
        Err(e) => return error(e.status(), &e.body_text()),
    };
    let now = now_unix();
    // The grant store answers once the grant is durable (the hub's store
    // or broker): awaited here, never blocking the runtime.
    let exchanged = match params(&headers, &body) {
        Err(e) => Err(e),
        Ok(p) => match p.get("grant_type") {
            None => Err(TokenError::InvalidRequest("missing grant_type".into())),
            // RFC 6749 §4.1.3.
            Some("authorization_code") => match p.required("code") {
                Ok(code) => provider
                    .redeem_async(code, p.get("device_id"), now)
                    .await
                    .map_err(TokenError::from),
                Err(e) => Err(e),
            },
            // RFC 6749 §6.
            Some("refresh_token") => match p.required("refresh_token") {
                Ok(refresh_token) => provider
                    .refresh_async(refresh_token, now)
                    .await
                    .map_err(TokenError::from),
                Err(e) => Err(e),
            },
            Some(other) => Err(TokenError::UnsupportedGrantType(format!(
                "grant_type {other} is not supported: use authorization_code or refresh_token"
            ))),
        },
    };
    match exchanged {
        Ok(tokens) => token_response(tokens),
        Err(e) => e.into_response(),
    }
}

/// RFC 6749 §5.1.
fn token_response(tokens: TokenSet) -> Response {
    let mut body = serde_json::Map::new();
    body.insert("access_token".into(), tokens.access_token.into());
    body.insert("token_type".into(), "Bearer".into());
    if let Some(expires_in) = tokens.expires_in {
        body.insert("expires_in".into(), expires_in.into());
    }
    if !tokens.refresh_token.is_empty() {
        body.insert("refresh_token".into(), tokens.refresh_token.into());
    }
    (
        [(CACHE_CONTROL, "no-store"), (PRAGMA, "no-cache")],
        Json(serde_json::Value::Object(body)),
    )
        .into_response()
}

/// The request's parameters: each at most once (RFC 6749 §3.2), one sent
/// without a value counts as omitted (§3.1).
#[derive(Debug, Default, PartialEq, Eq)]
struct Params(BTreeMap<String, String>);

impl Params {
    fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Result<Params, TokenError> {
        let mut params = BTreeMap::new();
        for (name, value) in pairs {
            if value.is_empty() {
                continue;
            }
            if params.contains_key(&name) {
                return Err(TokenError::InvalidRequest(format!(
                    "parameter {name} is repeated"
                )));
            }
            params.insert(name, value);
        }
        Ok(Params(params))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn required(&self, name: &str) -> Result<&str, TokenError> {
        self.get(name)
            .ok_or_else(|| TokenError::InvalidRequest(format!("missing {name}")))
    }
}

/// The body by its media type: form (also when none is named, as `curl
/// -d` would send it) or JSON.
fn params(headers: &HeaderMap, body: &[u8]) -> Result<Params, TokenError> {
    let media_type = headers
        .get(CONTENT_TYPE)
        .map(|v| {
            v.to_str()
                .map(|v| {
                    v.split(';')
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_ascii_lowercase()
                })
                .map_err(|_| TokenError::InvalidRequest("unreadable Content-Type".into()))
        })
        .transpose()?;
    match media_type.as_deref() {
        None | Some("application/x-www-form-urlencoded") => form_params(body),
        Some("application/json") => json_params(body),
        Some(other) => Err(TokenError::InvalidRequest(format!(
            "Content-Type {other} is not supported: send application/x-www-form-urlencoded"
        ))),
    }
}

/// `application/x-www-form-urlencoded` (RFC 6749 Appendix B): `&`-separated
/// `name=value` pairs, `+` for space, `%XX` escapes, UTF-8.
fn form_params(body: &[u8]) -> Result<Params, TokenError> {
    let pairs = body
        .split(|b| *b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = match pair.iter().position(|b| *b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &[][..]),
            };
            Ok((form_decode(name)?, form_decode(value)?))
        })
        .collect::<Result<Vec<_>, TokenError>>()?;
    Params::from_pairs(pairs)
}

fn form_decode(encoded: &[u8]) -> Result<String, TokenError> {
    let bad = || TokenError::InvalidRequest("malformed form encoding".into());
    let mut out = Vec::with_capacity(encoded.len());
    let mut bytes = encoded.iter();
    while let Some(&b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let hi = bytes.next().and_then(|h| (*h as char).to_digit(16));
                let lo = bytes.next().and_then(|l| (*l as char).to_digit(16));
                match (hi, lo) {
                    // Two hex digits are at most 0xff: the cast is exact.
                    (Some(hi), Some(lo)) => (hi * 16 + lo) as u8,
                    _ => return Err(bad()),
                }
            }
            b => b,
        });
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// A JSON object whose parameters are strings (`null` counts as omitted).
fn json_params(body: &[u8]) -> Result<Params, TokenError> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| TokenError::InvalidRequest(format!("body is not a JSON object: {e}")))?;
    let pairs = object
        .into_iter()
        .filter_map(|(name, value)| match value {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(Ok((name, s))),
            _ => Some(Err(TokenError::InvalidRequest(format!(
                "parameter {name} must be a string"
            )))),
        })
        .collect::<Result<Vec<_>, TokenError>>()?;
    Params::from_pairs(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> Result<Params, TokenError> {
        form_params(body.as_bytes())
    }

    #[test]
    fn form_decoding() {
        let p = form("grant_type=authorization_code&code=a%2Bb+c%3D&device_id=&x").unwrap();
        assert_eq!(p.get("grant_type"), Some("authorization_code"));
        assert_eq!(p.get("code"), Some("a+b c="));
        // RFC 6749 §3.1: sent without a value = omitted.
        assert_eq!(p.get("device_id"), None);
        assert_eq!(p.get("x"), None);
        assert_eq!(form("").unwrap(), Params::default());
        assert_eq!(
            form("%C3%A9=%e2%82%AC").unwrap().get("é"),
            Some("€"),
            "UTF-8 escapes, hex digits of either case"
        );
    }

    #[test]
    fn malformed_and_repeated_form_parameters_are_invalid_requests() {
        for body in ["code=%", "code=%4", "code=%zz", "code=%ff", "a=1&a=2"] {
            assert!(
                matches!(form(body), Err(TokenError::InvalidRequest(_))),
                "{body}"
            );
        }
        // A repeated parameter whose second copy is empty is not repeated.
        assert!(form("a=1&a=").is_ok());
    }

    #[test]
    fn json_parameters_are_strings() {
        let p = json_params(br#"{"grant_type": "refresh_token", "device_id": null}"#).unwrap();
        assert_eq!(p.get("grant_type"), Some("refresh_token"));
        assert_eq!(p.get("device_id"), None);
        for body in [&br#"{"code": 1}"#[..], b"[]", b"", b"{"] {
            assert!(matches!(
                json_params(body),
                Err(TokenError::InvalidRequest(_))
            ));
        }
    }

    #[test]
    fn media_types() {
        let mut headers = HeaderMap::new();
        assert!(params(&headers, b"a=1").is_ok());
        headers.insert(
            CONTENT_TYPE,
            "Application/JSON; charset=utf-8".parse().unwrap(),
        );
        assert_eq!(
            params(&headers, br#"{"a":"1"}"#).unwrap().get("a"),
            Some("1")
        );
        headers.insert(CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(matches!(
            params(&headers, b"a=1"),
            Err(TokenError::InvalidRequest(_))
        ));
    }

    #[test]
    fn error_descriptions_keep_to_the_allowed_characters() {
        assert_eq!(
            description_chars("bound to \"d\\x\"\u{e9}\n"),
            "bound to 'd/x'??"
        );
    }
}
