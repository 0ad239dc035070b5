//! The hub's event log (ARCHITECTURE.md "hub remembers"): every change to
//! a device, in order, each with the authorization context it came with,
//! for subscribers (`GET /api/v1/events`) and for the record.

use super::twin::{Content, Operation, Status, TwinState};
use super::{AuthContext, Protocol};

/// One event. `seq` orders all events of a hub: increasing from 1, not
/// necessarily consecutive (the NATS hub numbers an event by its
/// message's stream sequence and its place in that message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub owner: String,
    pub device_id: String,
    /// Unix ns.
    pub at_ns: u64,
    /// Who caused it: the device's connection context for changes that
    /// come from a device; for API-caused events the owner only.
    pub auth: AuthContext,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    DeviceRegistered,
    DeviceDeleted,
    Online {
        connection_id: String,
        protocol: Protocol,
        service_id: String,
    },
    Offline,
    LinksPublished {
        hrefs: Vec<String>,
    },
    LinksUnpublished {
        hrefs: Vec<String>,
    },
    ResourceChanged {
        href: String,
        status: Status,
        content: Content,
        etag: Option<Vec<u8>>,
        version: u64,
    },
    TwinStateChanged {
        state: TwinState,
    },
    TwinEnabledChanged {
        enabled: bool,
    },
    CommandPending {
        correlation_id: String,
        href: String,
        operation: Operation,
        valid_until_ns: u64,
    },
    CommandAnswered {
        correlation_id: String,
        href: String,
        operation: Operation,
        status: Status,
        content: Content,
    },
    CommandExpired {
        correlation_id: String,
        href: String,
        operation: Operation,
    },
    CommandCanceled {
        correlation_id: String,
        href: String,
        operation: Operation,
    },
}

impl EventKind {
    /// The name used on the wire (`GET /api/v1/events` `event:` field).
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::DeviceRegistered => "device_registered",
            EventKind::DeviceDeleted => "device_deleted",
            EventKind::Online { .. } => "online",
            EventKind::Offline => "offline",
            EventKind::LinksPublished { .. } => "links_published",
            EventKind::LinksUnpublished { .. } => "links_unpublished",
            EventKind::ResourceChanged { .. } => "resource_changed",
            EventKind::TwinStateChanged { .. } => "twin_state",
            EventKind::TwinEnabledChanged { .. } => "twin_enabled",
            EventKind::CommandPending { .. } => "command_pending",
            EventKind::CommandAnswered { .. } => "command_answered",
            EventKind::CommandExpired { .. } => "command_expired",
            EventKind::CommandCanceled { .. } => "command_canceled",
        }
    }
}
