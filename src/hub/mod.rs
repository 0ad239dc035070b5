//! The hub boundary (ARCHITECTURE.md): what the gateway remembers about
//! devices and owners, behind the [`Hub`] trait, so that everything above
//! it is the same whichever back end runs it.
//!
//! What is here today (the protocol issue): the device registry (device →
//! owner, spec §4.5 `AddDevice`/`DeleteDevices`), published resource links
//! (spec §5.7–§5.9), connection status (spec §8.1/§8.2, ONLINE/OFFLINE with
//! the connection that went online), and the device → connection routing
//! that lets the hub disconnect a device (spec §4.9, checklist item 32) and
//! a second sign-in close the older connection (spec §14 item 13).
//!
//! [`memory::MemoryHub`] keeps it in memory (durable with redb); the NATS
//! JetStream hub ([`nats::NatsHub`], several gateway nodes) implements the
//! same trait.

pub mod command;
pub mod event;
mod grants;
pub mod memory;
pub mod nats;
pub mod stats;
pub mod store;
pub mod twin;
mod wal;

use std::borrow::Cow;
use std::fmt;

use crate::ocf::rd::{Endpoint, Link, Policy};

pub use command::{Command, CommandKind, CommandOutcome, CommandResult, CommandTicket, HubMessage};
pub use event::{Event, EventKind};
pub use memory::MemoryHub;
pub use stats::HubStats;
pub use store::{StoreError, StoreSettings};
pub use twin::{Content, Operation, ResourceChange, ResourceState, Status, TwinState, TwinSync};

/// Who acts: the authorization context of a connection (spec §4.6), carried
/// by every change a device makes, so each change in the hub is
/// attributable to the token that signed the device in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthContext {
    /// The owner (the token's owner claim, equal to the device's `uid`).
    pub owner: String,
    /// The resolved device ID (spec §4.3).
    pub device_id: String,
    /// The token's `sub`, when it has one.
    pub subject: Option<String>,
    /// The token's `jti`, when it has one.
    pub token_id: Option<String>,
}

/// Identifies one device connection to the hub: opaque to the hub, made by
/// the transport (its shard, slot and generation packed in a `u128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ConnectionRef(pub u128);

/// The transport side of the hub: closes a device connection (device
/// deleted, newer sign-in of the same device). Implemented by the gateway
/// on top of the shards' message channels.
pub trait Connections: Send + Sync {
    fn close(&self, connection: ConnectionRef, reason: &str);

    /// Hands a message to the connection's session. A connection that is
    /// gone or whose queue is full hands the message back (the hub then
    /// keeps a command pending).
    fn deliver(&self, connection: ConnectionRef, message: HubMessage) -> Result<(), HubMessage>;
}

/// spec §8.1 `connection.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// CoAP over TLS over TCP.
    CoapsTcp,
    /// CoAP over plain TCP.
    CoapTcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::CoapsTcp => "COAPS_TCP",
            Protocol::CoapTcp => "COAP_TCP",
        }
    }
}

/// spec §8: a device's connection as the hub shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectionStatus {
    pub online: bool,
    /// Sign-in time, Unix nanoseconds (kept when the device goes offline).
    pub connected_at_ns: u64,
    pub protocol: Option<Protocol>,
    /// This gateway process's random ID (spec §8.1 `service_id`).
    pub service_id: String,
    /// `ip:port` of the device as the gateway sees it (spec §8.3).
    pub connection_id: String,
    /// `eps[].ep` of the device's `/oic/d` link (spec §8.1).
    pub local_endpoints: Vec<String>,
}

/// One registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device_id: String,
    pub owner: String,
    pub status: ConnectionStatus,
    /// spec §6.9.
    pub twin: TwinSync,
}

/// ONLINE (spec §8.1): what the session knows at sign-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Online {
    pub connection: ConnectionRef,
    pub connected_at_ns: u64,
    pub protocol: Protocol,
    pub service_id: String,
    pub connection_id: String,
}

/// A published link as the hub keeps it (spec §5.7, normalised).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredLink {
    pub href: String,
    pub device_id: String,
    pub instance_id: i64,
    pub resource_types: Option<Vec<String>>,
    pub interfaces: Option<Vec<String>>,
    pub policy: Option<Policy>,
    pub endpoints: Option<Vec<(String, Option<u64>)>>,
    pub anchor: Option<String>,
    pub title: Option<String>,
    pub content_types: Option<Vec<String>>,
    /// Unix seconds after which the link expires (publish `ttl`); `None`
    /// for no expiry.
    pub valid_until: Option<u64>,
}

fn owned(v: &Option<Vec<&str>>) -> Option<Vec<String>> {
    v.as_ref()
        .map(|v| v.iter().map(|s| (*s).to_owned()).collect())
}

fn borrowed(v: &Option<Vec<String>>) -> Option<Vec<&str>> {
    v.as_ref().map(|v| v.iter().map(String::as_str).collect())
}

impl StoredLink {
    pub fn from_link(link: &Link<'_>, valid_until: Option<u64>) -> StoredLink {
        StoredLink {
            href: link.href.to_string(),
            device_id: link.device_id.to_owned(),
            instance_id: link.instance_id,
            resource_types: owned(&link.resource_types),
            interfaces: owned(&link.interfaces),
            policy: link.policy,
            endpoints: link
                .endpoints
                .as_ref()
                .map(|eps| eps.iter().map(|e| (e.uri.to_owned(), e.priority)).collect()),
            anchor: link.anchor.as_ref().map(|a| a.to_string()),
            title: link.title.map(str::to_owned),
            content_types: owned(&link.content_types),
            valid_until,
        }
    }

    /// The link in the codec's borrowed form (for encoding).
    pub fn as_link(&self) -> Link<'_> {
        Link {
            href: Cow::Borrowed(&self.href),
            resource_types: borrowed(&self.resource_types),
            interfaces: borrowed(&self.interfaces),
            policy: self.policy,
            endpoints: self.endpoints.as_ref().map(|eps| {
                eps.iter()
                    .map(|(uri, priority)| Endpoint {
                        uri,
                        priority: *priority,
                    })
                    .collect()
            }),
            anchor: self.anchor.as_deref().map(Cow::Borrowed),
            device_id: &self.device_id,
            instance_id: self.instance_id,
            title: self.title.as_deref(),
            content_types: borrowed(&self.content_types),
            id: None,
        }
    }

    pub fn has_resource_type(&self, rt: &str) -> bool {
        self.resource_types
            .as_ref()
            .is_some_and(|types| types.iter().any(|t| t == rt))
    }
}

/// Why the hub refused. The CoAP code follows spec §5.12 (the gRPC codes of
/// the reference's back end) and the transient rule of spec §5.0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// gRPC InvalidArgument → 4.00.
    #[error("{0}")]
    InvalidArgument(String),
    /// gRPC PermissionDenied → 4.03 (sign-up maps it to 4.01, spec §5.2).
    #[error("{0}")]
    PermissionDenied(String),
    /// gRPC NotFound → 4.04.
    #[error("{0}")]
    NotFound(String),
    /// The back end cannot answer now → 5.03 `temporary error: ` (spec §5.0).
    #[error("{0}")]
    Unavailable(String),
}

/// What a sign-in replaced (spec §14 item 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replaced(pub Option<ConnectionRef>);

/// The hub as the sessions see it. Calls are short and synchronous: the
/// embedded hub answers from memory. Implementations are shared by every
/// shard.
pub trait Hub: Send + Sync + fmt::Debug {
    /// Sign-up (spec §4.5 `AddDevice`): records `device_id` as `owner`'s.
    /// Idempotent for the same owner; another owner's device is
    /// [`HubError::PermissionDenied`].
    fn add_device(&self, ctx: &AuthContext) -> Result<(), HubError>;

    /// The ownership check of sign-in and refresh (spec §4.5).
    fn owns(&self, owner: &str, device_id: &str) -> bool;

    /// Removes the device, its links and its status (sign-off, spec §5.3;
    /// `DELETE /api/v1/devices/{id}`). A connected device is disconnected
    /// (spec §4.9). [`HubError::NotFound`] when `owner` has no such device.
    fn delete_device(&self, owner: &str, device_id: &str) -> Result<(), HubError>;

    /// Publish (spec §5.7): adds or replaces links by href.
    fn publish(&self, ctx: &AuthContext, links: Vec<StoredLink>) -> Result<(), HubError>;

    /// Unpublish (spec §5.8): removes the links with these instance IDs
    /// (all of the device's when empty) and returns their hrefs;
    /// [`HubError::NotFound`] when nothing was removed.
    fn unpublish(
        &self,
        ctx: &AuthContext,
        instance_ids: &[i64],
        now_unix: u64,
    ) -> Result<Vec<String>, HubError>;

    /// Discovery (spec §5.9): `owner`'s unexpired links, devices in ID order;
    /// empty filters match everything.
    fn links(
        &self,
        owner: &str,
        device_ids: &[&str],
        resource_types: &[&str],
        now_unix: u64,
    ) -> Vec<(String, Vec<StoredLink>)>;

    /// ONLINE (spec §8.1). An earlier connection of the same device that is
    /// still open is closed (spec §14 item 13) and returned.
    /// [`HubError::NotFound`] when the device is not `ctx.owner`'s.
    fn set_online(&self, ctx: &AuthContext, online: Online) -> Result<Replaced, HubError>;

    /// The device's local endpoints, once its `/oic/d` link was read (spec
    /// §8.1), if `connection` is still the one that went online.
    fn set_local_endpoints(&self, device_id: &str, connection: ConnectionRef, eps: Vec<String>);

    /// OFFLINE (spec §8.2), ignored unless `connection` is the one that went
    /// online (a newer connection of the same device stays ONLINE).
    fn set_offline(&self, device_id: &str, connection: ConnectionRef);

    /// One device of `owner`.
    fn device(&self, owner: &str, device_id: &str) -> Option<DeviceRecord>;

    /// All devices of `owner`, in ID order.
    fn devices(&self, owner: &str) -> Vec<DeviceRecord>;

    // -- the device side of the twin and commands (spec §6, §7) ----------
    //
    // Called by a signed-in session with its connection: calls from a
    // connection other than the one that went ONLINE are refused (a newer
    // connection of the same device owns the twin, spec §6.9, §8.2).

    /// spec §6.2: whether the twin is kept (default true).
    fn twin_enabled(&self, device_id: &str) -> bool;

    /// spec §6.9: SYNCING / IN_SYNC from the session.
    fn set_twin_state(&self, ctx: &AuthContext, connection: ConnectionRef, state: TwinState);

    /// spec §6.5 ETags on re-sync: the ETags of the twin's latest
    /// representations, newest first, at most `max`.
    fn latest_etags(&self, device_id: &str, max: usize) -> Vec<Vec<u8>>;

    /// Notifications and reads (spec §6.5, §6.7), applied in order. A
    /// change is kept only if it is newer (by `sequence`) than the last
    /// one from the same connection and differs from the twin. An error
    /// means the hub could not take them: the session closes the
    /// connection so that the device resyncs (spec §6.7).
    fn resources_changed(
        &self,
        ctx: &AuthContext,
        connection: ConnectionRef,
        changes: Vec<ResourceChange>,
    ) -> Result<(), HubError>;

    /// Cold start (spec §7.1): the device's unexpired pending commands for
    /// published resources, oldest first, now dispatched to `connection`
    /// (so no other connection gets them). Expired ones are reported as
    /// expired and dropped.
    fn take_pending_commands(
        &self,
        ctx: &AuthContext,
        connection: ConnectionRef,
        now_ns: u64,
    ) -> Vec<Command>;

    /// The answer to a dispatched command (spec §7.3). Ignored for a
    /// command that is not dispatched to `connection` (answered already,
    /// canceled, or of another connection).
    fn command_result(&self, ctx: &AuthContext, connection: ConnectionRef, result: CommandResult);

    /// Dispatched commands the session never sent (its connection closed
    /// first): pending again, for the device's next connection.
    fn return_commands(
        &self,
        device_id: &str,
        connection: ConnectionRef,
        correlation_ids: &[String],
    );

    // -- the user side (HTTP API) -----------------------------------------
    //
    // Scoped by owner: another owner's device is NotFound. Calls that
    // report a change return once it is durable.

    /// The twin of one device: every resource with a reported value, in
    /// href order.
    fn resources(&self, owner: &str, device_id: &str) -> Result<Vec<ResourceState>, HubError>;

    /// One resource of the twin. NotFound when the device has no such
    /// published resource; a published resource without a value yet is
    /// [`HubError::Unavailable`].
    fn resource(&self, owner: &str, device_id: &str, href: &str)
        -> Result<ResourceState, HubError>;

    /// Accepts a command: sent to the device's connection now if it is
    /// online, else pending until the device signs in again (spec §7.1)
    /// or `valid_until_ns` passes. A pending command is durable when this
    /// returns; an online device's command is durable with its answer (the
    /// ticket's outcome arrives once that is on disk). A `correlation_id` already in use by a
    /// command not yet answered is InvalidArgument.
    fn submit_command(&self, owner: &str, command: Command) -> Result<CommandTicket, HubError>;

    /// The device's commands not yet answered (pending or dispatched),
    /// oldest first.
    fn pending_commands(&self, owner: &str, device_id: &str) -> Result<Vec<Command>, HubError>;

    /// Cancels a pending command (never sent). A dispatched command cannot
    /// be canceled (FailedPrecondition-like: InvalidArgument); an unknown
    /// one is NotFound.
    fn cancel_command(
        &self,
        owner: &str,
        device_id: &str,
        correlation_id: &str,
    ) -> Result<(), HubError>;

    /// spec §7.5: turns the twin on or off (or forces a resync with
    /// `force`); an online device's session is told at once.
    fn set_twin_enabled(
        &self,
        owner: &str,
        device_id: &str,
        enabled: bool,
        force: bool,
    ) -> Result<(), HubError>;

    /// Expires pending commands whose `valid_until` passed (spec §7.4):
    /// their issuers learn [`CommandOutcome::Expired`]. Called
    /// periodically by the control plane.
    fn expire_commands(&self, now_ns: u64);

    /// Events of `owner`'s devices from now on. A subscriber that falls
    /// more than the channel's bound behind is dropped (its receiver
    /// disconnects).
    fn subscribe(&self, owner: &str) -> flume::Receiver<std::sync::Arc<Event>>;

    /// The event log of `owner` with `seq` above `after`, oldest first, at
    /// most `limit`: what a subscriber that saw `after` last has missed
    /// (within the log's retention; empty for a hub that keeps no log).
    /// Everything emitted before the call is included.
    fn events_after(&self, owner: &str, after: u64, limit: usize) -> Result<Vec<Event>, HubError>;

    /// Counters for `/metrics`.
    fn stats(&self) -> &HubStats;

    /// Commands not yet answered, over all devices (a gauge).
    fn pending_depth(&self) -> usize;

    /// Where the embedded token authority keeps its refresh grants and
    /// used sign-up codes (issue 13): durable with the hub's other
    /// records, shared by the nodes of a NATS hub.
    fn grants(&self) -> std::sync::Arc<dyn crate::auth::grants::GrantStore>;

    /// Whether the back end can take changes now: the NATS hub answers
    /// false while its broker is unreachable (issue 6: `/readyz` is
    /// not-ready then, so the load balancer sends new devices elsewhere).
    fn available(&self) -> bool {
        true
    }
}
