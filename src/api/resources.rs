//! The device twin over HTTP (spec §6): the latest value each resource
//! reported, as JSON.
//!
//! `GET /api/v1/devices/{id}/resources/{*href}` answers one resource:
//!
//! ```json
//! {
//!   "deviceId": "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a",
//!   "href": "/light/1",
//!   "resourceTypes": ["core.light"],
//!   "status": "OK",
//!   "content": {"state": true, "power": 40},
//!   "contentType": "application/vnd.ocf+cbor",
//!   "etag": "AQIDBA==",
//!   "version": 3,
//!   "updatedAt": 1800000000000000000
//! }
//! ```
//!
//! `content` is the representation the device sent, as JSON (`content.rs`:
//! CBOR converted, JSON as is, text as a string; bytes JSON cannot show are
//! base64 with `"contentEncoding": "base64"`); `contentType` names the
//! format the device sent (spec §5.12; `contentFormat` with the number
//! when it is none of the four). `status` is the status of the device's
//! last report (spec §5.12); `etag` (base64) only when the device gave one;
//! `version` counts the accepted changes from 0; `updatedAt` is Unix ns.
//! A published resource without a value yet is 503; a resource the device
//! did not publish is 404.
//!
//! `?twin=false` reads from the device instead: a retrieve command
//! (`commands.rs`), answered like every command.
//!
//! `GET /api/v1/devices/{id}/resources` answers every resource with a value,
//! a JSON array of the same objects in href order.
//!
//! What it does not do: say how fresh a value is beyond `updatedAt` and the
//! device's `twinSynchronization` state (a device whose twin is disabled
//! keeps its last values).

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{Map, Value};

use super::bearer::Caller;
use super::commands::{self, target, CommandQuery, TargetPath};
use super::content;
use super::devices::{device_id, hub};
use super::{ApiState, Failure};
use crate::api::commands::blocking;
use crate::hub::{CommandKind, ResourceState};

/// One resource of the twin as JSON (shape in the module doc).
fn resource_json(device_id: &str, resource: &ResourceState) -> Value {
    let mut object = Map::new();
    object.insert("deviceId".into(), device_id.into());
    object.insert("href".into(), resource.href.clone().into());
    object.insert(
        "resourceTypes".into(),
        resource.resource_types.clone().into(),
    );
    object.insert("status".into(), resource.status.as_str().into());
    content::show(&resource.content).insert_into(&mut object, &resource.content);
    if let Some(etag) = &resource.etag {
        object.insert("etag".into(), STANDARD.encode(etag).into());
    }
    object.insert("version".into(), resource.version.into());
    object.insert("updatedAt".into(), resource.updated_at_ns.into());
    Value::Object(object)
}

/// `GET /api/v1/devices/{id}/resources/{*href}`.
pub(super) async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    path: TargetPath,
    RawQuery(raw): RawQuery,
) -> Result<Response, Failure> {
    let (id, href) = target(path)?;
    let query = CommandQuery::parse(raw.as_deref(), state.command_ttl)?;
    if query.twin == Some(false) {
        // Read from the device (spec §7.2 GET): no ETags, so the device
        // answers with the representation, never 2.03.
        let kind = CommandKind::Retrieve { etags: Vec::new() };
        return commands::run(&state, &caller, id, href, kind, query).await;
    }
    let hub = hub(&state)?.clone();
    let (owner, key) = (caller.owner().to_owned(), id.clone());
    let (resource, device) = blocking(move || {
        let resource = hub.resource(&owner, &key, &href)?;
        Ok((resource, hub.device(&owner, &key)))
    })
    .await?;
    let shown_id = device
        .as_ref()
        .map_or(id.as_str(), |d| d.device_id.as_str());
    Ok(Json(resource_json(shown_id, &resource)).into_response())
}

/// `GET /api/v1/devices/{id}/resources`: the whole twin.
pub(super) async fn list(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Failure> {
    let id = device_id(path)?;
    let hub = hub(&state)?.clone();
    let (owner, key) = (caller.owner().to_owned(), id.clone());
    let (resources, device) = blocking(move || {
        let resources = hub.resources(&owner, &key)?;
        Ok((resources, hub.device(&owner, &key)))
    })
    .await?;
    let shown_id = device
        .as_ref()
        .map_or(id.as_str(), |d| d.device_id.as_str());
    let list: Vec<Value> = resources
        .iter()
        .map(|r| resource_json(shown_id, r))
        .collect();
    Ok(Json(list).into_response())
}

/// `.../resources/` and `.../resource-links/` with nothing after the
/// slash: the wildcard does not match an empty href, so say what is wrong
/// rather than "no such route".
pub(super) async fn empty_href(_caller: Caller) -> Response {
    Failure::new(StatusCode::BAD_REQUEST, "the resource href is empty").into_response()
}
