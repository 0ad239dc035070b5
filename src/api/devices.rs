//! The device routes (SURFACE.md "HTTP API", paths of the plgd HTTP
//! gateway): the caller's devices with their connection status, deleting
//! one, and its published resource links. Everything is scoped to the
//! bearer's owner: another owner's device is answered as if it did not
//! exist (404), so device IDs of other owners cannot be probed.
//!
//! The twin, commands and events are in `resources.rs`, `commands.rs`
//! and `events.rs`; the twin settings (`PUT .../metadata`) are here.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::bearer::Caller;
use super::{now_unix, ApiState, Failure};
use crate::api::commands::blocking;
use crate::auth::provider::TokenProvider;
use crate::hub::{DeviceRecord, Hub, HubError};
use crate::ocf::rd::Link;

/// One device as the API shows it (`GET /api/v1/devices[/{id}]`), after
/// plgd's `Device` message:
///
/// ```json
/// {
///   "id": "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a",
///   "owner": "alice",
///   "metadata": {
///     "connection": {
///       "status": "ONLINE",
///       "connectedAt": 1800000000000000000,
///       "protocol": "COAPS_TCP",
///       "serviceId": "0f9c...",
///       "id": "192.0.2.1:40000",
///       "localEndpoints": ["coaps+tcp://192.0.2.1:5684"]
///     },
///     "twinSynchronization": {
///       "state": "IN_SYNC",
///       "syncingAt": 1800000000100000000,
///       "inSyncAt": 1800000000200000000
///     },
///     "twinEnabled": true
///   }
/// }
/// ```
///
/// `status` is always there (`ONLINE` or `OFFLINE`, spec §8.1/§8.2);
/// `localEndpoints` always (maybe empty). The others are left out until
/// the device first went online. `connectedAt` is the last sign-in in Unix
/// nanoseconds as a JSON number (kept while offline); plgd's protojson
/// writes that int64 as a string, which JavaScript clients may prefer, but
/// an exact number suits every other client. `twinSynchronization` and
/// `twinEnabled` are always there (spec §6.9).
#[derive(Debug, Serialize)]
pub(super) struct DeviceJson<'a> {
    id: &'a str,
    owner: &'a str,
    metadata: Metadata<'a>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Metadata<'a> {
    connection: Connection<'a>,
    twin_synchronization: TwinSynchronization,
    twin_enabled: bool,
}

/// spec §6.9, plgd's `TwinSynchronization`: `state` is `OUT_OF_SYNC`,
/// `SYNCING`, `IN_SYNC` or `DISABLED`; the times (Unix ns) are left out
/// until the state was first reached.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TwinSynchronization {
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    syncing_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_sync_at: Option<u64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Connection<'a> {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    connected_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_id: Option<&'a str>,
    /// The connection ID: the device's `ip:port` as the gateway sees it
    /// (spec §8.3).
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    local_endpoints: &'a [String],
}

impl<'a> DeviceJson<'a> {
    pub(super) fn new(record: &'a DeviceRecord) -> DeviceJson<'a> {
        let status = &record.status;
        let known = |s: &'a String| Some(s.as_str()).filter(|s| !s.is_empty());
        DeviceJson {
            id: &record.device_id,
            owner: &record.owner,
            metadata: Metadata {
                connection: Connection {
                    status: if status.online { "ONLINE" } else { "OFFLINE" },
                    connected_at: Some(status.connected_at_ns).filter(|t| *t != 0),
                    protocol: status.protocol.map(|p| p.as_str()),
                    service_id: known(&status.service_id),
                    id: known(&status.connection_id),
                    local_endpoints: &status.local_endpoints,
                },
                twin_synchronization: TwinSynchronization {
                    state: record.twin.state.as_str(),
                    syncing_at: Some(record.twin.syncing_at_ns).filter(|t| *t != 0),
                    in_sync_at: Some(record.twin.in_sync_at_ns).filter(|t| *t != 0),
                },
                twin_enabled: record.twin.enabled,
            },
        }
    }
}

/// The one place a [`HubError`] becomes an HTTP status (the gRPC codes of
/// spec §5.12 as plgd's HTTP gateway maps them).
pub(super) fn hub_error(e: HubError) -> Failure {
    let status = match &e {
        HubError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        HubError::PermissionDenied(_) => StatusCode::FORBIDDEN,
        HubError::NotFound(_) => StatusCode::NOT_FOUND,
        HubError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    Failure::new(status, e.to_string())
}

pub(super) fn hub(state: &ApiState) -> Result<&Arc<dyn Hub>, Failure> {
    state.hub.as_ref().ok_or_else(|| {
        Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the HTTP API is not connected to the hub",
        )
    })
}

/// `{id}` of the path; a rejection (not UTF-8 after percent-decoding) is a
/// JSON 400 like every other error.
pub(super) fn device_id(path: Result<Path<String>, PathRejection>) -> Result<String, Failure> {
    match path {
        Ok(Path(id)) => Ok(id),
        Err(e) => Err(Failure::new(StatusCode::BAD_REQUEST, e.body_text())),
    }
}

pub(super) fn not_found(id: &str) -> Failure {
    Failure::new(StatusCode::NOT_FOUND, format!("device {id} not found"))
}

/// `GET /api/v1/devices`: the caller's devices in ID order, a JSON array of
/// [`DeviceJson`].
pub(super) async fn list(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Response, Failure> {
    // Hub calls run on the blocking pool: a hub may wait for its store
    // or its broker (the NATS hub reads its buckets).
    let hub = hub(&state)?.clone();
    let owner = caller.owner().to_owned();
    let records = blocking(move || Ok(hub.devices(&owner))).await?;
    let devices: Vec<DeviceJson<'_>> = records.iter().map(DeviceJson::new).collect();
    Ok(Json(devices).into_response())
}

/// `GET /api/v1/devices/{id}`: one [`DeviceJson`].
pub(super) async fn get(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Failure> {
    let id = device_id(path)?;
    let hub = hub(&state)?.clone();
    let (owner, key) = (caller.owner().to_owned(), id.clone());
    let record = blocking(move || Ok(hub.device(&owner, &key)))
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(DeviceJson::new(&record)).into_response())
}

/// `DELETE /api/v1/devices/{id}`: removes the device, its links and status;
/// the hub disconnects it when it is connected (spec §4.9), and the
/// embedded provider forgets its refresh tokens. Answers 200
/// `{"deviceIds": ["<id>"]}` (plgd's `DeleteDevicesResponse`).
pub(super) async fn delete(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Failure> {
    let id = device_id(path)?;
    let hub = hub(&state)?.clone();
    let (owner, key) = (caller.owner().to_owned(), id.clone());
    blocking(move || hub.delete_device(&owner, &key)).await?;
    if let Some(provider) = &state.provider {
        provider.revoke_device(&id);
    }
    Ok(Json(serde_json::json!({ "deviceIds": [id] })).into_response())
}

/// `GET /api/v1/devices/{id}/resource-links`: the device's unexpired
/// published links, a JSON array in href order, each in the OCF link form
/// the device published (spec §5.7, normalised): `href`, `rt`, `if`,
/// `p` (`{"bm": ..}`), `eps` (`[{"ep", "pri"}]`), `anchor`, `di`, `ins`,
/// `title`, `type`; keys the device did not send are left out. A device
/// that published nothing answers `[]`.
pub(super) async fn resource_links(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Failure> {
    let id = device_id(path)?;
    let hub = hub(&state)?.clone();
    let (owner, key) = (caller.owner().to_owned(), id.clone());
    let published = blocking(move || {
        Ok(hub
            .device(&owner, &key)
            .map(|_| hub.links(&owner, &[&key], &[], now_unix())))
    })
    .await?
    .ok_or_else(|| not_found(&id))?;
    let links: Vec<Link<'_>> = published
        .iter()
        .flat_map(|(_, links)| links.iter().map(|l| l.as_link()))
        .collect();
    Ok(Json(links).into_response())
}

/// The body of `PUT /api/v1/devices/{id}/metadata` (plgd's
/// `UpdateDeviceMetadataRequest` fields).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MetadataUpdate {
    twin_enabled: Option<bool>,
    #[serde(default)]
    twin_force_synchronization: bool,
}

/// `PUT /api/v1/devices/{id}/metadata`: `{"twinEnabled": bool}` turns the
/// device's twin on or off, `{"twinForceSynchronization": true}` makes an
/// online device resynchronise from scratch (spec §7.5); either or both.
/// Answers the device's [`DeviceJson`] after the change.
pub(super) async fn metadata(
    State(state): State<ApiState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Response, Failure> {
    let id = device_id(path)?;
    let update: MetadataUpdate = serde_json::from_slice(&body).map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"twinEnabled\": bool, \"twinForceSynchronization\": bool}}: {e}"),
        )
    })?;
    if update.twin_enabled.is_none() && !update.twin_force_synchronization {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "nothing to change: give twinEnabled or twinForceSynchronization: true",
        ));
    }
    let hub = hub(&state)?.clone();
    let record = hub
        .device(caller.owner(), &id)
        .ok_or_else(|| not_found(&id))?;
    let enabled = update.twin_enabled.unwrap_or(record.twin.enabled);
    let force = update.twin_force_synchronization;
    let owner = caller.owner().to_owned();
    let record = super::commands::blocking(move || {
        hub.set_twin_enabled(&owner, &id, enabled, force)?;
        hub.device(&owner, &id)
            .ok_or_else(|| HubError::NotFound(format!("device {id} not found")))
    })
    .await?;
    Ok(Json(DeviceJson::new(&record)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{ConnectionStatus, Protocol};

    #[test]
    fn device_json_leaves_out_what_is_not_known() {
        let record = DeviceRecord {
            device_id: "d".into(),
            owner: "alice".into(),
            status: ConnectionStatus::default(),
            twin: Default::default(),
        };
        assert_eq!(
            serde_json::to_value(DeviceJson::new(&record)).unwrap(),
            serde_json::json!({
                "id": "d", "owner": "alice",
                "metadata": {
                    "connection": {"status": "OFFLINE", "localEndpoints": []},
                    "twinSynchronization": {"state": "OUT_OF_SYNC"},
                    "twinEnabled": false
                }
            })
        );
        let record = DeviceRecord {
            status: ConnectionStatus {
                online: true,
                connected_at_ns: 1_800_000_000_000_000_001,
                protocol: Some(Protocol::CoapsTcp),
                service_id: "svc".into(),
                connection_id: "127.0.0.1:1".into(),
                local_endpoints: vec!["coaps+tcp://127.0.0.1:5684".into()],
            },
            twin: crate::hub::TwinSync {
                state: crate::hub::TwinState::InSync,
                enabled: true,
                syncing_at_ns: 5,
                in_sync_at_ns: 6,
            },
            ..record
        };
        assert_eq!(
            serde_json::to_value(DeviceJson::new(&record)).unwrap(),
            serde_json::json!({
                "id": "d", "owner": "alice",
                "metadata": {
                    "connection": {
                        "status": "ONLINE",
                        "connectedAt": 1_800_000_000_000_000_001u64,
                        "protocol": "COAPS_TCP",
                        "serviceId": "svc",
                        "id": "127.0.0.1:1",
                        "localEndpoints": ["coaps+tcp://127.0.0.1:5684"]
                    },
                    "twinSynchronization": {"state": "IN_SYNC", "syncingAt": 5, "inSyncAt": 6},
                    "twinEnabled": true
                }
            })
        );
    }
}
