//! The device twin as the hub keeps it (spec §6): per resource the latest
//! content the device reported, its status, ETag and version, and the
//! twin synchronisation state of spec §6.9. Content is kept as the raw
//! bytes and Content-Format the device sent (no decode on the notification
//! path, spec §6.7).

use std::collections::BTreeMap;

use crate::coap::Code;

use super::ConnectionRef;

/// A resource representation as the device sent it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Content {
    pub data: Vec<u8>,
    /// The CoAP Content-Format number; `-1` when the device sent none
    /// (spec §5.12).
    pub content_format: i32,
}

impl Content {
    /// No content (`coap_content_format = -1`).
    pub fn none() -> Content {
        Content {
            data: Vec::new(),
            content_format: -1,
        }
    }

    /// The textual content type of spec §5.12, when the format is one of
    /// the four the hub names.
    pub fn content_type(&self) -> Option<&'static str> {
        content_type_name(self.content_format)
    }
}

/// spec §5.12: the four content types exchanged with the hub by name.
pub fn content_type_name(format: i32) -> Option<&'static str> {
    match format {
        0 => Some("text/plain; charset=utf-8"),
        50 => Some("application/json"),
        60 => Some("application/cbor"),
        10000 => Some("application/vnd.ocf+cbor"),
        _ => None,
    }
}

/// The inverse of [`content_type_name`]; parameters after `;` other than
/// the text charset are ignored.
pub fn content_format_of(content_type: &str) -> Option<i32> {
    let base = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match base.as_str() {
        "text/plain" => Some(0),
        "application/json" => Some(50),
        "application/cbor" => Some(60),
        "application/vnd.ocf+cbor" => Some(10000),
        _ => None,
    }
}

/// Which request a device answered, for the 2.03 flavour of spec §5.12.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Update,
    Retrieve,
    Create,
    Delete,
    /// A notification or a read done by the twin synchronisation: 2.03 is
    /// NOT_MODIFIED as for retrieve (spec §6.5 "batch flavour").
    Notify,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Update => "update",
            Operation::Retrieve => "retrieve",
            Operation::Create => "create",
            Operation::Delete => "delete",
            Operation::Notify => "notify",
        }
    }
}

/// The hub's `Status` of spec §5.12.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Ok,
    Created,
    NotModified,
    Accepted,
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    NotImplemented,
    Unavailable,
    Error,
}

impl Status {
    /// spec §5.12 "Device CoAP response code → hub Status".
    pub fn from_coap(code: Code, operation: Operation) -> Status {
        match (code.class(), code.detail()) {
            (2, 4) | (2, 5) | (2, 2) => Status::Ok,
            (2, 3) => match operation {
                Operation::Retrieve | Operation::Notify => Status::NotModified,
                _ => Status::Accepted,
            },
            (2, 1) => Status::Created,
            (4, 0) => Status::BadRequest,
            (4, 1) => Status::Unauthorized,
            (4, 3) => Status::Forbidden,
            (4, 4) => Status::NotFound,
            (4, 5) => Status::MethodNotAllowed,
            (5, 1) => Status::NotImplemented,
            (5, 3) => Status::Unavailable,
            _ => Status::Error,
        }
    }

    /// The name plgd uses (`OK`, `NOT_FOUND`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Created => "CREATED",
            Status::NotModified => "NOT_MODIFIED",
            Status::Accepted => "ACCEPTED",
            Status::BadRequest => "BAD_REQUEST",
            Status::Unauthorized => "UNAUTHORIZED",
            Status::Forbidden => "FORBIDDEN",
            Status::NotFound => "NOT_FOUND",
            Status::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Status::NotImplemented => "NOT_IMPLEMENTED",
            Status::Unavailable => "UNAVAILABLE",
            Status::Error => "ERROR",
        }
    }

    /// The HTTP status the API answers a command with.
    pub fn http_status(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::Created => 201,
            Status::Accepted => 202,
            Status::NotModified => 304,
            Status::BadRequest => 400,
            Status::Unauthorized => 401,
            Status::Forbidden => 403,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::NotImplemented => 501,
            Status::Unavailable => 503,
            Status::Error => 500,
        }
    }

    pub fn is_success(self) -> bool {
        matches!(
            self,
            Status::Ok | Status::Created | Status::NotModified | Status::Accepted
        )
    }
}

/// A change the device reported for one resource (spec §6.5 step 5,
/// §6.7): a notification, a batch element, or a one-time read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceChange {
    /// The resource's href on the device (`/light`).
    pub href: String,
    pub content: Content,
    pub status: Status,
    /// The ETag of this representation, when the device gave one.
    pub etag: Option<Vec<u8>>,
    /// `rt` of the representation, else of the published link.
    pub resource_types: Vec<String>,
    /// The per-connection sequence of the inbound message (spec §8.3): the
    /// hub keeps a change only if it is newer than the last one from the
    /// same connection (spec §6.7).
    pub sequence: u64,
}

/// One resource of the twin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceState {
    pub href: String,
    pub content: Content,
    pub status: Status,
    pub etag: Option<Vec<u8>>,
    pub resource_types: Vec<String>,
    /// Counts the accepted changes of this resource, from 0.
    pub version: u64,
    /// When the last change was accepted, Unix nanoseconds.
    pub updated_at_ns: u64,
}

/// spec §6.9: the twin synchronisation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TwinState {
    #[default]
    OutOfSync,
    Syncing,
    InSync,
    Disabled,
}

impl TwinState {
    pub fn as_str(self) -> &'static str {
        match self {
            TwinState::OutOfSync => "OUT_OF_SYNC",
            TwinState::Syncing => "SYNCING",
            TwinState::InSync => "IN_SYNC",
            TwinState::Disabled => "DISABLED",
        }
    }
}

/// A device's twin synchronisation as the API shows it (spec §6.9).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TwinSync {
    pub state: TwinState,
    /// Whether the twin is kept at all (spec §6.2; default true).
    pub enabled: bool,
    /// Unix ns of the last SYNCING / IN_SYNC report.
    pub syncing_at_ns: u64,
    pub in_sync_at_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coap_codes_map_to_status_as_spec_5_12_says() {
        assert_eq!(
            Status::from_coap(Code::CHANGED, Operation::Update),
            Status::Ok
        );
        assert_eq!(
            Status::from_coap(Code::CONTENT, Operation::Retrieve),
            Status::Ok
        );
        assert_eq!(
            Status::from_coap(Code::DELETED, Operation::Delete),
            Status::Ok
        );
        assert_eq!(
            Status::from_coap(Code::VALID, Operation::Retrieve),
            Status::NotModified
        );
        assert_eq!(
            Status::from_coap(Code::VALID, Operation::Notify),
            Status::NotModified
        );
        assert_eq!(
            Status::from_coap(Code::VALID, Operation::Update),
            Status::Accepted
        );
        assert_eq!(
            Status::from_coap(Code::CREATED, Operation::Create),
            Status::Created
        );
        assert_eq!(
            Status::from_coap(Code::NOT_FOUND, Operation::Update),
            Status::NotFound
        );
        assert_eq!(
            Status::from_coap(Code::SERVICE_UNAVAILABLE, Operation::Update),
            Status::Unavailable
        );
        assert_eq!(
            Status::from_coap(Code::GATEWAY_TIMEOUT, Operation::Update),
            Status::Error
        );
    }

    #[test]
    fn content_types_by_name() {
        assert_eq!(content_format_of("application/json"), Some(50));
        assert_eq!(content_format_of("text/plain; charset=utf-8"), Some(0));
        assert_eq!(content_format_of("Application/VND.ocf+cbor"), Some(10000));
        assert_eq!(content_format_of("application/xml"), None);
        assert_eq!(content_type_name(60), Some("application/cbor"));
        assert_eq!(content_type_name(-1), None);
    }
}

/// One resource of a device's twin as a hub back end keeps it: the state
/// the user side reads, and what the §6.7 ordering rule needs.
#[derive(Debug, Clone)]
pub(crate) struct TwinResource {
    pub(crate) state: ResourceState,
    /// The connection and sequence of the last accepted change (spec §6.7).
    pub(crate) last: Option<(ConnectionRef, u64)>,
}

/// Applies one change from `connection` to a twin, at `at` (Unix ns), by
/// the rule of spec §6.7: an older change of the same connection is stale
/// and an identical one changes nothing (it only advances the sequence).
/// True when the twin changed (a new version to record and announce).
pub(crate) fn apply_change(
    twin: &mut BTreeMap<String, TwinResource>,
    connection: ConnectionRef,
    change: ResourceChange,
    at: u64,
) -> bool {
    match twin.entry(change.href.clone()) {
        std::collections::btree_map::Entry::Vacant(slot) => {
            slot.insert(TwinResource {
                state: ResourceState {
                    href: change.href,
                    content: change.content,
                    status: change.status,
                    etag: change.etag,
                    resource_types: change.resource_types,
                    version: 0,
                    updated_at_ns: at,
                },
                last: Some((connection, change.sequence)),
            });
            true
        }
        std::collections::btree_map::Entry::Occupied(mut slot) => {
            let r = slot.get_mut();
            let stale =
                matches!(r.last, Some((c, seq)) if c == connection && change.sequence < seq);
            let same = r.state.content == change.content
                && r.state.status == change.status
                && r.state.etag == change.etag;
            if stale || same {
                if !stale {
                    r.last = Some((connection, change.sequence));
                }
                false
            } else {
                r.state.content = change.content;
                r.state.status = change.status;
                r.state.etag = change.etag;
                if !change.resource_types.is_empty() {
                    r.state.resource_types = change.resource_types;
                }
                r.state.version += 1;
                r.state.updated_at_ns = at;
                r.last = Some((connection, change.sequence));
                true
            }
        }
    }
}

/// spec §6.5 ETags on re-sync: the ETags of a twin's latest
/// representations, newest first, at most `max`.
pub(crate) fn latest_etags(twin: &BTreeMap<String, TwinResource>, max: usize) -> Vec<Vec<u8>> {
    let mut tagged: Vec<(u64, &Vec<u8>)> = twin
        .values()
        .filter_map(|r| r.state.etag.as_ref().map(|e| (r.state.updated_at_ns, e)))
        .collect();
    tagged.sort_by_key(|t| std::cmp::Reverse(t.0));
    tagged
        .into_iter()
        .take(max)
        .map(|(_, e)| e.clone())
        .collect()
}
