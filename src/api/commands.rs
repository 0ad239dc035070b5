//! Commands to devices over HTTP (spec §7; paths of the plgd HTTP gateway):
//! update, create, delete and a direct read of one resource, and the
//! device's commands not yet answered.
//!
//! | route | command |
//! |---|---|
//! | `PUT /api/v1/devices/{id}/resources/{*href}` | update (spec §7.2 POST) |
//! | `GET /api/v1/devices/{id}/resources/{*href}?twin=false` | retrieve (`resources.rs`) |
//! | `POST /api/v1/devices/{id}/resource-links/{*href}` | create (`if=oic.if.create`) |
//! | `DELETE /api/v1/devices/{id}/resource-links/{*href}` | delete |
//! | `GET /api/v1/devices/{id}/pending-commands` | the commands not yet answered |
//! | `DELETE /api/v1/devices/{id}/pending-commands/{correlationId}` | cancel one not yet sent |
//!
//! Query parameters of a command: `timeToLive` (humantime, `30s`; default
//! [`ApiState::with_command_ttl`], 10 minutes), `interface` (the `if=` of
//! the request, e.g. `oic.if.baseline`; update and retrieve only) and
//! `correlationId` (default a random UUID v4).
//!
//! Request body of update and create: JSON (no `Content-Type`,
//! `application/json`, or `application/x-www-form-urlencoded`, which is
//! what `curl -d` sends), sent to the device as `application/vnd.ocf+cbor`
//! (10000); or raw CBOR with `Content-Type: application/cbor` (sent as 60)
//! or `application/vnd.ocf+cbor` (sent as 10000), which must be one
//! well-formed CBOR item.
//!
//! How the request ends:
//! * the device answered: the HTTP status of its status (spec §5.12,
//!   [`Status::http_status`]) with
//!   `{"correlationId", "deviceId", "href", "status", "content",
//!   "contentType", "etag"}` (`content` as JSON, `content.rs`; `etag`
//!   base64, when the device gave one); a status that is not a success
//!   also carries `code` and `message`, as every API error does;
//! * the device is offline (or its connection cannot take the command
//!   now): `202 Accepted` at once, `{"correlationId", "status": "PENDING",
//!   "validUntil"}`; the command waits in the hub until the device signs
//!   in (spec §7.1) or `validUntil` (Unix ns) passes (spec §7.4);
//! * no answer within the time to live: 504 with `correlationId`; the
//!   command stays in the hub and its answer is still an event;
//! * it expired before it was sent (the device went offline meanwhile):
//!   504; canceled meanwhile: 409; the device was deleted: 404;
//! * the API is stopping: 503 with `correlationId`.
//!
//! What it does not do: answer in CBOR (`Accept` is not read), or wait for
//! a pending command (a client that wants the answer of a pending command
//! follows `GET /api/v1/events`).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Map, Value};

use super::bearer::Caller;
use super::content::{self, OCF_CBOR};
use super::devices::{device_id, hub, hub_error};
use super::{now_ns, ApiState, Failure};
use crate::hub::twin::content_format_of;
use crate::hub::{Command, CommandKind, CommandOutcome, Content, HubError};

/// `{id}` and `{*href}` of a resource route.
pub(super) type TargetPath = Result<Path<(String, String)>, PathRejection>;

/// The device ID and the resource's href, normalised to one leading `/`.
pub(super) fn target(path: TargetPath) -> Result<(String, String), Failure> {
    let Path((id, href)) =
        path.map_err(|e| Failure::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let href = normalize_href(&href)?;
    Ok((id, href))
}

/// `light`, `/light` and `//light` name `/light`; an empty href (or `/`
/// alone, which no device publishes, spec §5.7) is refused.
pub(super) fn normalize_href(href: &str) -> Result<String, Failure> {
    let rest = href.trim_start_matches('/');
    if rest.is_empty() {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "the resource href is empty",
        ));
    }
    Ok(format!("/{rest}"))
}

/// The query of a command request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CommandQuery {
    pub(super) time_to_live: Duration,
    pub(super) interface: Option<String>,
    pub(super) correlation_id: String,
    /// `twin` of a resource read: `Some(false)` reads from the device.
    pub(super) twin: Option<bool>,
}

/// The longest correlation ID we take (plgd has no limit; ours is kept in
/// memory per pending command).
const MAX_CORRELATION_ID: usize = 256;

impl CommandQuery {
    /// Parses the query; unknown parameters are ignored (plgd clients send
    /// some of their own).
    pub(super) fn parse(raw: Option<&str>, default_ttl: Duration) -> Result<CommandQuery, Failure> {
        let bad = |m: String| Failure::new(StatusCode::BAD_REQUEST, m);
        let mut query = CommandQuery {
            time_to_live: default_ttl,
            interface: None,
            correlation_id: String::new(),
            twin: None,
        };
        for (name, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            match name.as_ref() {
                "timeToLive" => {
                    let ttl = humantime::parse_duration(&value)
                        .map_err(|e| bad(format!("timeToLive {value:?}: {e} (e.g. 30s, 5m)")))?;
                    if ttl.is_zero() {
                        return Err(bad("timeToLive must be more than 0".into()));
                    }
                    query.time_to_live = ttl;
                }
                "interface" if !value.is_empty() => query.interface = Some(value.into_owned()),
                "correlationId" => {
                    if value.is_empty() || value.len() > MAX_CORRELATION_ID {
                        return Err(bad(format!(
                            "correlationId must have 1 to {MAX_CORRELATION_ID} bytes"
                        )));
                    }
                    query.correlation_id = value.into_owned();
                }
                "twin" => {
                    query.twin = Some(match value.as_ref() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(bad(format!("twin {value:?}: expected true or false"))),
                    })
                }
                _ => {}
            }
        }
        if query.correlation_id.is_empty() {
            query.correlation_id = uuid::Uuid::new_v4().to_string();
        }
        Ok(query)
    }
}

/// The content of an update or create request body.
fn request_content(headers: &HeaderMap, body: &Bytes) -> Result<Content, Failure> {
    let media = match headers.get(CONTENT_TYPE) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            Failure::new(
                StatusCode::BAD_REQUEST,
                "the Content-Type header is not text",
            )
        })?),
    };
    let format = match media {
        None => 50,
        // `curl -d` labels every body so; these routes take no forms, so
        // the body is read as the JSON it almost always is.
        Some(m) if is_form(m) => 50,
        Some(m) => match content_format_of(m) {
            Some(f @ (50 | 60 | OCF_CBOR)) => f,
            _ => {
                return Err(Failure::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "Content-Type {m:?} is not taken: send application/json, \
                         application/cbor or application/vnd.ocf+cbor"
                    ),
                ))
            }
        },
    };
    if body.is_empty() {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "the request needs a body: the resource's new representation",
        ));
    }
    if format == 50 {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            Failure::new(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            )
        })?;
        return Ok(Content {
            data: content::json_to_cbor(&value),
            content_format: OCF_CBOR,
        });
    }
    content::check_cbor(body).map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not one CBOR item: {e}"),
        )
    })?;
    Ok(Content {
        data: body.to_vec(),
        content_format: format,
    })
}

fn is_form(media: &str) -> bool {
    media.split(';').next().is_some_and(|m| {
        m.trim()
            .eq_ignore_ascii_case("application/x-www-form-urlencoded")
    })
}

/// `PUT /api/v1/devices/{id}/resources/{*href}`: update.
pub(super) async fn update(
    State(state): State<ApiState>,
    caller: Caller,
    path: TargetPath,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Failure> {
    let (id, href) = target(path)?;
    let query = CommandQuery::parse(raw.as_deref(), state.command_ttl)?;
    let content = request_content(&headers, &body)?;
    run(
        &state,
        &caller,
        id,
        href,
        CommandKind::Update { content },
        query,
    )
    .await
}

/// `POST /api/v1/devices/{id}/resource-links/{*href}`: create (spec §7.2,
/// `if=oic.if.create` is added by the session).
pub(super) async fn create(
    State(state): State<ApiState>,
    caller: Caller,
    path: TargetPath,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Failure> {
    let (id, href) = target(path)?;
    let mut query = CommandQuery::parse(raw.as_deref(), state.command_ttl)?;
    query.interface = None;
    let content = request_content(&headers, &body)?;
    run(
        &state,
        &caller,
        id,
        href,
        CommandKind::Create { content },
        query,
    )
    .await
}

/// `DELETE /api/v1/devices/{id}/resource-links/{*href}`: delete.
pub(super) async fn delete(
    State(state): State<ApiState>,
    caller: Caller,
    path: TargetPath,
    RawQuery(raw): RawQuery,
) -> Result<Response, Failure> {
    let (id, href) = target(path)?;
    let mut query = CommandQuery::parse(raw.as_deref(), state.command_ttl)?;
    query.interface = None;
    run(&state, &caller, id, href, CommandKind::Delete, query).await
}

/// A command error with its correlation ID: `{"code", "message",
/// "correlationId"}`.
fn failed(status: StatusCode, message: String, correlation_id: &str) -> Response {
    (
        status,
        Json(json!({
            "code": status.as_u16(),
            "message": message,
            "correlationId": correlation_id,
        })),
    )
        .into_response()
}

/// Runs the hub call on the blocking pool: a durable hub's writes wait
/// for the disk, which must not stall the API's single-threaded runtime.
pub(super) async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, HubError> + Send + 'static,
) -> Result<T, Failure> {
    match tokio::task::spawn_blocking(call).await {
        Ok(result) => result.map_err(hub_error),
        Err(e) => Err(Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the hub call failed: {e}"),
        )),
    }
}

/// Submits a command and answers as the module doc says.
pub(super) async fn run(
    state: &ApiState,
    caller: &Caller,
    device_id: String,
    href: String,
    kind: CommandKind,
    query: CommandQuery,
) -> Result<Response, Failure> {
    let hub = hub(state)?.clone();
    let issued_at_ns = now_ns();
    // spec §7.4: `valid_until` bounds how long a command may wait to be
    // sent; the same time to live bounds how long we wait for its answer.
    let ttl_ns = u64::try_from(query.time_to_live.as_nanos()).unwrap_or(u64::MAX);
    let valid_until_ns = issued_at_ns.saturating_add(ttl_ns);
    let command = Command {
        correlation_id: query.correlation_id.clone(),
        device_id: device_id.clone(),
        href: href.clone(),
        kind,
        interface: query.interface,
        valid_until_ns,
        issued_at_ns,
    };
    let owner = caller.owner().to_owned();
    let ticket = blocking(move || hub.submit_command(&owner, command)).await?;
    let correlation_id = ticket.correlation_id.clone();
    if ticket.pending {
        // spec §7.1: the device is offline; it gets the command when it
        // signs in again. The client learns the answer from the events.
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({
                "correlationId": correlation_id,
                "status": "PENDING",
                "validUntil": valid_until_ns,
            })),
        )
            .into_response());
    }
    let mut stopping = state.stopping.subscribe();
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(query.time_to_live, ticket.outcome.recv_async()) => outcome,
        _ = stopping.wait_for(|stop| *stop) => {
            return Ok(failed(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the HTTP API is stopping; command {correlation_id} stays in the hub"),
                &correlation_id,
            ));
        }
    };
    let outcome = match outcome {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => {
            return Ok(failed(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the hub dropped command {correlation_id} without an outcome"),
                &correlation_id,
            ))
        }
        Err(_) => {
            return Ok(failed(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the device did not answer command {correlation_id} within {}; \
                     its answer will be an event of GET /api/v1/events",
                    humantime::format_duration(query.time_to_live)
                ),
                &correlation_id,
            ))
        }
    };
    Ok(match outcome {
        CommandOutcome::Answered(result) => {
            let mut body = Map::new();
            body.insert("correlationId".into(), correlation_id.into());
            body.insert("deviceId".into(), device_id.into());
            body.insert("href".into(), href.into());
            body.insert("status".into(), result.status.as_str().into());
            content::show(&result.content).insert_into(&mut body, &result.content);
            if let Some(etag) = &result.etag {
                body.insert("etag".into(), STANDARD.encode(etag).into());
            }
            let status = StatusCode::from_u16(result.status.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if !result.status.is_success() {
                body.insert("code".into(), status.as_u16().into());
                body.insert(
                    "message".into(),
                    format!("the device answered {}", result.status.as_str()).into(),
                );
            }
            (status, Json(Value::Object(body))).into_response()
        }
        CommandOutcome::Expired => failed(
            StatusCode::GATEWAY_TIMEOUT,
            format!("command {correlation_id} expired before the device could take it"),
            &correlation_id,
        ),
        CommandOutcome::Canceled => failed(
            StatusCode::CONFLICT,
            format!("command {correlation_id} was canceled"),
            &correlation_id,
        ),
        CommandOutcome::DeviceDeleted => failed(
            StatusCode::NOT_FOUND,
            format!("the device was deleted before it answered command {correlation_id}"),
            &correlation_id,
        ),
    })
}

/// One command not yet answered, as `GET .../pending-commands` lists it:
/// `{"correlationId", "deviceId", "href", "operation" ("update",
/// "retrieve", "create", "delete"), "interface", "content", "contentType",
/// "validUntil", "issuedAt"}`; `interface` when one was asked for,
/// `content`/`contentType` for update and create, `validUntil` (Unix ns)
/// unless it never expires.
fn pending_json(command: &Command) -> Value {
    let mut object = Map::new();
    object.insert(
        "correlationId".into(),
        command.correlation_id.clone().into(),
    );
    object.insert("deviceId".into(), command.device_id.clone().into());
    object.insert("href".into(), command.href.clone().into());
    object.insert("operation".into(), command.kind.operation().as_str().into());
    if let Some(interface) = &command.interface {
        object.insert("interface".into(), interface.clone().into());
    }
    match &command.kind {
        CommandKind::Update { content: c } | CommandKind::Create { content: c } => {
            content::show(c).insert_into(&mut object, c);
        }
        CommandKind::Retrieve { .. } | CommandKind::Delete => {}
    }
    if command.valid_until_ns != 0 {
        object.insert("validUntil".into(), command.valid_until_ns.into());
    }
    object.insert("issuedAt".into(), command.issued_at_ns.into());
    Value::Object(object)
}

/// `GET /api/v1/devices/{id}/pending-commands`: the device's commands not
/// yet answered (waiting for the device, or sent and waiting for its
/// answer), oldest first, a JSON array of [`pending_json`].
pub(super) async fn pending(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Failure> {
    let id = device_id(path)?;
    let hub = hub(&state)?.clone();
    let owner = caller.owner().to_owned();
    let commands = blocking(move || hub.pending_commands(&owner, &id)).await?;
    let list: Vec<Value> = commands.iter().map(pending_json).collect();
    Ok(Json(list).into_response())
}

/// `DELETE /api/v1/devices/{id}/pending-commands/{correlationId}`: cancels
/// a command not yet sent; its issuer learns it was canceled. 200
/// `{"correlationId"}`; 404 for an unknown one; 409 for one already sent
/// to the device (its answer is coming).
pub(super) async fn cancel(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, Failure> {
    let Path((id, correlation_id)) =
        path.map_err(|e| Failure::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let hub = hub(&state)?.clone();
    let owner = caller.owner().to_owned();
    let cid = correlation_id.clone();
    let canceled = tokio::task::spawn_blocking(move || hub.cancel_command(&owner, &id, &cid)).await;
    match canceled {
        Ok(Ok(())) => Ok(Json(json!({ "correlationId": correlation_id })).into_response()),
        // The hub's contract: a dispatched command cannot be canceled
        // (InvalidArgument, FailedPrecondition-like), which is a conflict
        // with the command's state, not a bad request.
        Ok(Err(HubError::InvalidArgument(m))) => Err(Failure::new(StatusCode::CONFLICT, m)),
        Ok(Err(e)) => Err(hub_error(e)),
        Err(e) => Err(Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the hub call failed: {e}"),
        )),
    }
}
