//! `POST /api/v1/authorization-codes`: a one-time sign-up code for the
//! bearer's owner from the embedded authority, what `coap-gateway token
//! code` prints, for a device (or `POST /oauth/token`) to redeem.
//!
//! What it does not do: check that a named device is unowned or the
//! caller's; sign-up does that when the code is redeemed (spec §4.5).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::bearer::Caller;
use super::{now_unix, ApiState, Failure};
use crate::auth::authority::AuthorityError;

/// The optional body: `{"deviceId": "..."}` binds the code to that device.
/// An empty body is a code for any device.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CodeRequest {
    device_id: Option<String>,
}

fn code_request(body: &[u8]) -> Result<CodeRequest, Failure> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(CodeRequest::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            format!("the body must be empty or a JSON object {{\"deviceId\": \"...\"}}: {e}"),
        )
    })
}

/// Answers 200 `{"code": "...", "expiresIn": <seconds>}`; 404 when the
/// embedded authority is not enabled (codes then come from the external
/// provider).
pub(super) async fn issue(
    State(state): State<ApiState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    let authority = state.embedded_authority().ok_or_else(|| {
        Failure::new(
            StatusCode::NOT_FOUND,
            "the embedded authority is not enabled: get authorization codes from the configured OAuth provider",
        )
    })?;
    let body = body.map_err(|e| Failure::new(e.status(), e.body_text()))?;
    let request = code_request(&body)?;
    let code = authority
        .issue_code(caller.owner(), request.device_id.as_deref(), now_unix())
        .map_err(|e| match e {
            AuthorityError::InvalidRequest(_) => {
                Failure::new(StatusCode::BAD_REQUEST, e.to_string())
            }
            e => Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot issue an authorization code: {e}"),
            ),
        })?;
    Ok(Json(serde_json::json!({
        "code": code,
        "expiresIn": authority.settings().code_ttl.as_secs(),
    }))
    .into_response())
}
