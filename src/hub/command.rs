//! Commands from hub users to devices (spec §7): update, retrieve, create
//! and delete of one resource, each answered exactly once, and the
//! messages the hub sends a device's connection.
//!
//! Life of a command in the hub: **pending** (stored, not yet handed to a
//! connection) → **dispatched** to one connection (the session queues it
//! and sends it when no other request of ours is outstanding, spec §2.6)
//! → **answered** (the device's response, a timeout, or the connection
//! dropping after it was sent: UNAVAILABLE, spec §7.3), or **expired**
//! (`valid_until` passed while pending, never sent, spec §7.4), or
//! **canceled** by the user while pending. A dispatched command that the
//! session had not yet sent when its connection closed goes back to
//! pending ([`crate::hub::Hub::return_commands`]).

use super::twin::{Content, Operation, Status};

/// What a command asks the device (spec §7.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandKind {
    /// POST `<href>` with the content (Uri-Query `if=` when set).
    Update { content: Content },
    /// GET `<href>`, one ETag option per entry.
    Retrieve { etags: Vec<Vec<u8>> },
    /// POST `<href>?if=oic.if.create` with the content.
    Create { content: Content },
    /// DELETE `<href>`.
    Delete,
}

impl CommandKind {
    pub fn operation(&self) -> Operation {
        match self {
            CommandKind::Update { .. } => Operation::Update,
            CommandKind::Retrieve { .. } => Operation::Retrieve,
            CommandKind::Create { .. } => Operation::Create,
            CommandKind::Delete => Operation::Delete,
        }
    }
}

/// One command for one resource of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Unique per command; the user may choose it, else the hub does.
    pub correlation_id: String,
    pub device_id: String,
    /// The resource's href on the device (`/light`).
    pub href: String,
    pub kind: CommandKind,
    /// `if=` of the request (spec §7.2), e.g. `oic.if.baseline`.
    pub interface: Option<String>,
    /// Unix ns after which a command not yet sent expires; 0 = never
    /// (spec §7.4).
    pub valid_until_ns: u64,
    /// When the hub accepted it, Unix ns.
    pub issued_at_ns: u64,
}

impl Command {
    pub fn expired(&self, now_ns: u64) -> bool {
        self.valid_until_ns != 0 && now_ns >= self.valid_until_ns
    }
}

/// The device's answer to a command (spec §7.3), or the gateway's answer
/// in its place (timeout, transport failure, `/plgd/s`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandResult {
    pub correlation_id: String,
    pub status: Status,
    /// The response payload and its format ([`Content::none`] without).
    pub content: Content,
    /// The response's ETag option (retrieve).
    pub etag: Option<Vec<u8>>,
}

/// How a command ended, as its issuer learns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandOutcome {
    /// The device answered (or the gateway answered for it).
    Answered(CommandResult),
    /// `valid_until` passed before it could be sent; it never was.
    Expired,
    /// Canceled through the API while pending; it never was sent.
    Canceled,
    /// The device was deleted before the command was answered.
    DeviceDeleted,
}

/// What [`crate::hub::Hub::submit_command`] hands back: whether the device
/// was offline (the command is pending), and where the outcome arrives. The
/// outcome is sent once it is durable.
#[derive(Debug)]
pub struct CommandTicket {
    pub correlation_id: String,
    /// True when the device was offline and the command waits for it.
    pub pending: bool,
    pub outcome: flume::Receiver<CommandOutcome>,
}

/// What the hub sends a device's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubMessage {
    /// Execute this command (spec §7.2); answer with
    /// [`crate::hub::Hub::command_result`].
    Command(Box<Command>),
    /// Twin enablement changed, or a forced resync (spec §7.5): `enabled =
    /// false` cancels every observation; `true` (re)creates them, `force`
    /// without ETags.
    Twin { enabled: bool, force: bool },
}
