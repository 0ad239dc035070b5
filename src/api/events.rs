//! `GET /api/v1/events`: the hub's events of the caller's devices as
//! server-sent events (WHATWG HTML §9.2), from the moment of the request.
//!
//! Each event is
//!
//! ```text
//! event: resource_changed
//! id: 42
//! data: {"deviceId":"5bbc…","at":1800000000000000000,"href":"/light/1",...}
//! ```
//!
//! `event:` is the kind's name ([`EventKind::name`]); `id:` the hub's
//! sequence number; `data:` one line of JSON with `deviceId`, `at` (Unix
//! ns), `auth` (`owner`, and for changes a device made the `subject` and
//! `tokenId` of the token its connection signed in with) and the kind's
//! fields, camelCase:
//!
//! | event | fields |
//! |---|---|
//! | `device_registered`, `device_deleted`, `offline` | |
//! | `online` | `connectionId`, `protocol`, `serviceId` |
//! | `links_published`, `links_unpublished` | `hrefs` |
//! | `resource_changed` | `href`, `status`, `content`, `contentType`, `etag`, `version` |
//! | `twin_state` | `state` |
//! | `twin_enabled` | `enabled` |
//! | `command_pending` | `correlationId`, `href`, `operation`, `validUntil` |
//! | `command_answered` | `correlationId`, `href`, `operation`, `status`, `content`, `contentType` |
//! | `command_expired`, `command_canceled` | `correlationId`, `href`, `operation` |
//!
//! `content` is shown as in `content.rs`. `?deviceId=ID` (repeatable)
//! keeps the events of those devices only. A comment line is sent every 15
//! seconds so that proxies keep the connection open. The stream ends when
//! the hub drops the subscriber (it fell more than the hub's bound behind)
//! and when the API stops.
//!
//! A client that reconnects with `Last-Event-ID: N` (WHATWG HTML §9.2.4:
//! browsers' `EventSource` sends it by itself) first gets the owner's
//! events after `N` from the hub's durable event log, then the live ones,
//! without a gap or a repeat: the subscription starts before the log is
//! read, and live events the replay already gave are skipped. The replay
//! reaches back `[hub] event_retention` events at most (and gives nothing
//! with `serve --memory`, which keeps no log); at most [`REPLAY_MAX`]
//! events per reconnect.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use futures_util::StreamExt;
use serde_json::{Map, Value};

use super::bearer::Caller;
use super::commands::blocking;
use super::content;
use super::devices::hub;
use super::{ApiState, Failure};
use crate::hub::{Event, EventKind};

/// Events replayed to one reconnecting client at most.
pub const REPLAY_MAX: usize = 10_000;

/// The keep-alive comment interval.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The event's `data:` JSON (fields in the module doc).
pub(super) fn event_json(event: &Event) -> Value {
    let mut o = Map::new();
    o.insert("deviceId".into(), event.device_id.clone().into());
    o.insert("at".into(), event.at_ns.into());
    // Who caused it: a device's changes carry the authorization of its
    // connection (the token's subject and ID), API changes the owner.
    let mut auth = Map::new();
    auth.insert("owner".into(), event.auth.owner.clone().into());
    if let Some(subject) = &event.auth.subject {
        auth.insert("subject".into(), subject.clone().into());
    }
    if let Some(token_id) = &event.auth.token_id {
        auth.insert("tokenId".into(), token_id.clone().into());
    }
    o.insert("auth".into(), Value::Object(auth));
    let command = |o: &mut Map<String, Value>, id: &str, href: &str, operation: &str| {
        o.insert("correlationId".into(), id.into());
        o.insert("href".into(), href.into());
        o.insert("operation".into(), operation.into());
    };
    match &event.kind {
        EventKind::DeviceRegistered | EventKind::DeviceDeleted | EventKind::Offline => {}
        EventKind::Online {
            connection_id,
            protocol,
            service_id,
        } => {
            o.insert("connectionId".into(), connection_id.clone().into());
            o.insert("protocol".into(), protocol.as_str().into());
            o.insert("serviceId".into(), service_id.clone().into());
        }
        EventKind::LinksPublished { hrefs } | EventKind::LinksUnpublished { hrefs } => {
            o.insert("hrefs".into(), hrefs.clone().into());
        }
        EventKind::ResourceChanged {
            href,
            status,
            content: c,
            etag,
            version,
        } => {
            o.insert("href".into(), href.clone().into());
            o.insert("status".into(), status.as_str().into());
            content::show(c).insert_into(&mut o, c);
            if let Some(etag) = etag {
                o.insert("etag".into(), STANDARD.encode(etag).into());
            }
            o.insert("version".into(), (*version).into());
        }
        EventKind::TwinStateChanged { state } => {
            o.insert("state".into(), state.as_str().into());
        }
        EventKind::TwinEnabledChanged { enabled } => {
            o.insert("enabled".into(), (*enabled).into());
        }
        EventKind::CommandPending {
            correlation_id,
            href,
            operation,
            valid_until_ns,
        } => {
            command(&mut o, correlation_id, href, operation.as_str());
            o.insert("validUntil".into(), (*valid_until_ns).into());
        }
        EventKind::CommandAnswered {
            correlation_id,
            href,
            operation,
            status,
            content: c,
        } => {
            command(&mut o, correlation_id, href, operation.as_str());
            o.insert("status".into(), status.as_str().into());
            content::show(c).insert_into(&mut o, c);
        }
        EventKind::CommandExpired {
            correlation_id,
            href,
            operation,
        }
        | EventKind::CommandCanceled {
            correlation_id,
            href,
            operation,
        } => command(&mut o, correlation_id, href, operation.as_str()),
    }
    Value::Object(o)
}

fn sse_event(event: &Event) -> SseEvent {
    SseEvent::default()
        .event(event.kind.name())
        .id(event.seq.to_string())
        // One line: serde_json's compact form escapes newlines in strings.
        .data(event_json(event).to_string())
}

/// `GET /api/v1/events`.
pub(super) async fn stream(
    State(state): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, Failure> {
    let devices: Vec<String> = form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .filter(|(name, _)| name == "deviceId")
        .map(|(_, value)| value.to_ascii_lowercase())
        .collect();
    let last_seen = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    Failure::new(
                        StatusCode::BAD_REQUEST,
                        "Last-Event-ID must be the id of an event of this stream",
                    )
                })?,
        ),
    };
    let hub = hub(&state)?.clone();
    // Subscribed before the log is read: nothing falls between the two.
    let receiver = {
        let (hub, owner) = (hub.clone(), caller.owner().to_owned());
        blocking(move || Ok(hub.subscribe(&owner))).await?
    };
    let replay = match last_seen {
        Some(after) => {
            let owner = caller.owner().to_owned();
            blocking(move || hub.events_after(&owner, after, REPLAY_MAX)).await?
        }
        None => Vec::new(),
    };
    let replayed_to = replay.last().map_or(0, |e| e.seq);
    let mut stopping = state.stopping.subscribe();
    let stopped = async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    // Device IDs are UUIDs: compared without case, as the hub does.
    let wanted = move |event: &Event| {
        devices.is_empty() || devices.contains(&event.device_id.to_ascii_lowercase())
    };
    let wanted_live = wanted.clone();
    let replayed = futures_util::stream::iter(
        replay
            .into_iter()
            .filter(|e| wanted(e))
            .map(|e| Ok::<_, Infallible>(sse_event(&e)))
            .collect::<Vec<_>>(),
    );
    let live = receiver
        .into_stream()
        .filter(move |event: &Arc<Event>| {
            std::future::ready(event.seq > replayed_to && wanted_live(event))
        })
        .map(|event| Ok::<_, Infallible>(sse_event(&event)));
    let events = replayed.chain(live).take_until(Box::pin(stopped));
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}
