//! What the NATS hub keeps in its buckets and streams, encoded with rkyv
//! (the embedded store's records where they fit, see [`crate::hub::store`]),
//! and how names become subject tokens and KV keys.
//!
//! Every value starts with one format byte ([`FORMAT`]), then the rkyv
//! bytes: a node that finds another format refuses the record instead of
//! misreading it (nodes of one deployment run one release).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::hub::store::{
    self, ArchivedCommandRec, ArchivedDeviceRec, ArchivedEventRec, ArchivedLinkRec,
    ArchivedResourceRec, CommandRec, DeviceRec, EventRec, LinkRec, ResourceRec,
};
use crate::hub::twin::{Content, TwinState};
use crate::hub::{
    Command, CommandResult, ConnectionRef, DeviceRecord, Event, ResourceState, StoredLink,
};

/// Bumped when a record's layout changes.
pub(super) const FORMAT: u8 = 1;

// -- names -------------------------------------------------------------------

/// A subject token / KV key part for any string: `k` + base64url without
/// padding. NATS tokens may not hold `.`, `*`, `>` or white space and may
/// not be empty; base64url uses `A-Za-z0-9-_` only, and the `k` keeps an
/// empty string a token. Reversible, so keys read back give the names.
pub(super) fn token(s: &str) -> String {
    let mut out = String::with_capacity(1 + s.len() * 4 / 3 + 2);
    out.push('k');
    URL_SAFE_NO_PAD.encode_string(s.as_bytes(), &mut out);
    out
}

/// The inverse of [`token`].
pub(super) fn untoken(t: &str) -> Option<String> {
    let raw = URL_SAFE_NO_PAD.decode(t.strip_prefix('k')?).ok()?;
    String::from_utf8(raw).ok()
}

/// Device IDs are UUIDs (OCF `di`): `ABC…` and `abc…` are one device (as
/// in the embedded hub).
pub(super) fn device_key(device_id: &str) -> String {
    match uuid::Uuid::parse_str(device_id) {
        Ok(id) => id.hyphenated().to_string(),
        Err(_) => device_id.to_owned(),
    }
}

// -- encoding ----------------------------------------------------------------

fn seal<T>(value: &T) -> Result<Bytes, String>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    let body = store::encode(value)?;
    let mut out = Vec::with_capacity(body.len() + 1);
    out.push(FORMAT);
    out.extend_from_slice(&body);
    Ok(Bytes::from(out))
}

fn open<'a, T>(bytes: &[u8], buf: &'a mut AlignedVec) -> Result<&'a T, String>
where
    T: rkyv::Portable
        + for<'b> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'b, rancor::Error>>,
{
    match bytes.split_first() {
        Some((&FORMAT, body)) => store::access::<T>(body, buf),
        Some((other, _)) => Err(format!(
            "record format {other}, this node reads {FORMAT} (mixed releases?)"
        )),
        None => Err("empty record".to_owned()),
    }
}

// -- the registry ----------------------------------------------------------------

/// `dev.<device>` of the registry bucket: the device, its owner, its
/// connection status, which node and connection hold it, and whether its
/// twin is enabled. Changed by CAS only (revision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DeviceEntry {
    /// `status.service_id` is the node; `twin` carries `enabled` only
    /// (the sync state is the device node's, in [`SyncEntry`]).
    pub record: DeviceRecord,
    /// The connection on `status.service_id` while online.
    pub connection: ConnectionRef,
}

#[derive(rkyv::Archive, rkyv::Serialize)]
struct DeviceEntryRec {
    device: DeviceRec,
    connection_hi: u64,
    connection_lo: u64,
}

impl DeviceEntry {
    pub fn encode(&self) -> Result<Bytes, String> {
        seal(&DeviceEntryRec {
            device: DeviceRec::from(&self.record),
            connection_hi: (self.connection.0 >> 64) as u64,
            connection_lo: self.connection.0 as u64,
        })
    }

    pub fn decode(bytes: &[u8]) -> Result<DeviceEntry, String> {
        let mut buf = AlignedVec::new();
        let rec = open::<ArchivedDeviceEntryRec>(bytes, &mut buf)?;
        let hi = u128::from(rec.connection_hi.to_native());
        let lo = u128::from(rec.connection_lo.to_native());
        Ok(DeviceEntry {
            record: ArchivedDeviceRec::to_device(&rec.device),
            connection: ConnectionRef((hi << 64) | lo),
        })
    }

    /// Online on `node` with `connection`.
    pub fn held_by(&self, node: &str, connection: ConnectionRef) -> bool {
        self.record.status.online
            && self.record.status.service_id == node
            && self.connection == connection
    }
}

/// `sync.<device>` of the registry bucket: the twin synchronisation state
/// (spec §6.9), written by the node that holds the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct SyncEntry {
    pub state: TwinState,
    pub syncing_at_ns: u64,
    pub in_sync_at_ns: u64,
}

#[derive(rkyv::Archive, rkyv::Serialize)]
struct SyncRec {
    state: u8,
    syncing_at_ns: u64,
    in_sync_at_ns: u64,
}

impl SyncEntry {
    pub fn encode(&self) -> Result<Bytes, String> {
        seal(&SyncRec {
            state: store::twin_code(self.state),
            syncing_at_ns: self.syncing_at_ns,
            in_sync_at_ns: self.in_sync_at_ns,
        })
    }

    pub fn decode(bytes: &[u8]) -> Result<SyncEntry, String> {
        let mut buf = AlignedVec::new();
        let rec = open::<ArchivedSyncRec>(bytes, &mut buf)?;
        Ok(SyncEntry {
            state: store::twin_of(rec.state),
            syncing_at_ns: rec.syncing_at_ns.to_native(),
            in_sync_at_ns: rec.in_sync_at_ns.to_native(),
        })
    }
}

// -- links, twin, events -----------------------------------------------------

pub(super) fn encode_link(link: &StoredLink) -> Result<Bytes, String> {
    seal(&LinkRec::from(link))
}

pub(super) fn decode_link(bytes: &[u8]) -> Result<StoredLink, String> {
    let mut buf = AlignedVec::new();
    Ok(open::<ArchivedLinkRec>(bytes, &mut buf)?.to_link())
}

pub(super) fn encode_resource(state: &ResourceState) -> Result<Bytes, String> {
    seal(&ResourceRec::from(state))
}

pub(super) fn decode_resource(bytes: &[u8]) -> Result<ResourceState, String> {
    let mut buf = AlignedVec::new();
    open::<ArchivedResourceRec>(bytes, &mut buf)?
        .to_state()
        .ok_or_else(|| "a twin record with an unknown status".to_owned())
}

/// An event as published; its `seq` comes from the stream sequence
/// JetStream gives its message (so it orders the events of every node,
/// see [`SEQ_SHIFT`]).
pub(super) fn encode_event(event: &Event) -> Result<Bytes, String> {
    seal(&EventRec::from(event))
}

fn decode_event(bytes: &[u8], seq: u64) -> Result<Event, String> {
    let mut buf = AlignedVec::new();
    open::<ArchivedEventRec>(bytes, &mut buf)?
        .to_event(seq)
        .ok_or_else(|| "an event record with an unknown code".to_owned())
}

/// The first byte of a message that holds several events (of one device
/// and kind, merged by the outbox so that a burst of notifications is one
/// broker round trip, issue 6), then per event a `u32` LE length and the
/// event's own record (with its [`FORMAT`] byte).
pub(super) const EVENTS: u8 = 0xE1;
/// An event's `seq` is `stream sequence << SEQ_SHIFT | index in its
/// message`: ordered over nodes and messages like the stream, and
/// distinct for the events of one message.
pub(super) const SEQ_SHIFT: u32 = 10;
/// Events one message holds at most.
pub(super) const MAX_GROUP: usize = 1 << SEQ_SHIFT;

/// One message for several event records (each from [`encode_event`]).
pub(super) fn group_events(records: &[Bytes]) -> Bytes {
    debug_assert!(records.len() <= MAX_GROUP);
    let len: usize = records.iter().map(|r| 4 + r.len()).sum();
    let mut out = Vec::with_capacity(1 + len);
    out.push(EVENTS);
    for r in records {
        out.extend_from_slice(&(r.len() as u32).to_le_bytes());
        out.extend_from_slice(r);
    }
    Bytes::from(out)
}

/// The events of a message at `stream_seq` (one, or a group), each with
/// its `seq`; an unreadable one is an `Err` in its place.
pub(super) fn decode_events(bytes: &[u8], stream_seq: u64) -> Vec<Result<Event, String>> {
    let base = stream_seq << SEQ_SHIFT;
    let Some((&EVENTS, mut rest)) = bytes.split_first() else {
        return vec![decode_event(bytes, base)];
    };
    let mut events = Vec::new();
    while !rest.is_empty() {
        let index = events.len() as u64;
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            events.push(Err("a truncated group of events".to_owned()));
            break;
        };
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len || index >= MAX_GROUP as u64 {
            events.push(Err("a truncated group of events".to_owned()));
            break;
        }
        let (record, tail) = tail.split_at(len);
        events.push(decode_event(record, base | index));
        rest = tail;
    }
    events
}

/// The stream sequence of the message that holds the event `seq`.
pub(super) fn stream_seq_of(seq: u64) -> u64 {
    seq >> SEQ_SHIFT
}

// -- commands ----------------------------------------------------------------

/// Where a command is in its life (spec §7; `crate::hub::command`). Each
/// transition is a CAS update of the command's key, which is what makes
/// a command dispatched at most once and answered exactly once over all
/// nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum CommandState {
    Pending,
    /// Handed to `connection` on `node`.
    Dispatched {
        node: String,
        connection: ConnectionRef,
    },
    Answered(CommandResult),
    Expired,
    Canceled,
    DeviceDeleted,
}

impl CommandState {
    /// No transition leaves it: the issuer is told and the key removed.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            CommandState::Pending | CommandState::Dispatched { .. }
        )
    }

    fn code(&self) -> u8 {
        match self {
            CommandState::Pending => 0,
            CommandState::Dispatched { .. } => 1,
            CommandState::Answered(_) => 2,
            CommandState::Expired => 3,
            CommandState::Canceled => 4,
            CommandState::DeviceDeleted => 5,
        }
    }
}

/// `<owner>.<device>.<correlation>` of the commands bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CommandEntry {
    pub owner: String,
    /// Acceptance order (the accepting node's wall clock, ns): pending
    /// commands go out oldest first (spec §7.1).
    pub order: u64,
    pub command: Command,
    pub state: CommandState,
    /// When it reached a final state, Unix ns (0 before).
    pub finished_at_ns: u64,
}

#[derive(rkyv::Archive, rkyv::Serialize)]
struct CommandEntryRec {
    owner: String,
    order: u64,
    command: CommandRec,
    state: u8,
    node: String,
    connection_hi: u64,
    connection_lo: u64,
    status: u8,
    data: Vec<u8>,
    content_format: i32,
    etag: Option<Vec<u8>>,
    finished_at_ns: u64,
}

impl CommandEntry {
    pub fn encode(&self) -> Result<Bytes, String> {
        let (node, connection) = match &self.state {
            CommandState::Dispatched { node, connection } => (node.clone(), connection.0),
            _ => (String::new(), 0),
        };
        let (status, content, etag) = match &self.state {
            CommandState::Answered(r) => (
                store::status_code(r.status),
                r.content.clone(),
                r.etag.clone(),
            ),
            _ => (0, Content::none(), None),
        };
        seal(&CommandEntryRec {
            owner: self.owner.clone(),
            order: self.order,
            command: CommandRec::new(
                self.order,
                self.state != CommandState::Pending,
                &self.command,
            ),
            state: self.state.code(),
            node,
            connection_hi: (connection >> 64) as u64,
            connection_lo: connection as u64,
            status,
            data: content.data,
            content_format: content.content_format,
            etag,
            finished_at_ns: self.finished_at_ns,
        })
    }

    pub fn decode(bytes: &[u8]) -> Result<CommandEntry, String> {
        let mut buf = AlignedVec::new();
        let rec = open::<ArchivedCommandEntryRec>(bytes, &mut buf)?;
        let command = ArchivedCommandRec::to_command(&rec.command)
            .ok_or_else(|| "a command record with an unknown operation".to_owned())?;
        let connection = ConnectionRef(
            (u128::from(rec.connection_hi.to_native()) << 64)
                | u128::from(rec.connection_lo.to_native()),
        );
        let state = match rec.state {
            0 => CommandState::Pending,
            1 => CommandState::Dispatched {
                node: rec.node.as_str().to_owned(),
                connection,
            },
            2 => CommandState::Answered(CommandResult {
                correlation_id: command.correlation_id.clone(),
                status: store::status_of(rec.status)
                    .ok_or_else(|| "a command answer with an unknown status".to_owned())?,
                content: Content {
                    data: rec.data.as_slice().to_vec(),
                    content_format: rec.content_format.to_native(),
                },
                etag: store::opt_bytes(&rec.etag),
            }),
            3 => CommandState::Expired,
            4 => CommandState::Canceled,
            5 => CommandState::DeviceDeleted,
            other => return Err(format!("a command in unknown state {other}")),
        };
        Ok(CommandEntry {
            owner: rec.owner.as_str().to_owned(),
            order: rec.order.to_native(),
            command,
            state,
            finished_at_ns: rec.finished_at_ns.to_native(),
        })
    }
}

// -- node messages -------------------------------------------------------------

/// What one node asks another on `<prefix>.node.<node>.<what>` (core NATS,
/// not stored: a lost message leaves a command pending, never lost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum NodeMsg {
    /// A command for a device this node holds is pending: dispatch it to
    /// `connection` if that is still the device's (a request: the answer
    /// says whether it was handed to the session).
    Wake {
        owner: String,
        device_key: String,
        correlation_id: String,
        connection: ConnectionRef,
    },
    /// Close the device's connection (newer sign-in elsewhere, spec §14
    /// item 13; device deleted, spec §4.9).
    Close {
        device_key: String,
        connection: ConnectionRef,
        reason: String,
    },
    /// Tell the device's session that its twin was switched (spec §7.5).
    Twin {
        device_key: String,
        connection: ConnectionRef,
        enabled: bool,
        force: bool,
    },
}

#[derive(rkyv::Archive, rkyv::Serialize)]
struct NodeMsgRec {
    kind: u8,
    owner: String,
    device_key: String,
    text: String,
    connection_hi: u64,
    connection_lo: u64,
    enabled: bool,
    force: bool,
}

impl NodeMsg {
    pub fn encode(&self) -> Result<Bytes, String> {
        let (kind, owner, device_key, text, connection, enabled, force) = match self {
            NodeMsg::Wake {
                owner,
                device_key,
                correlation_id,
                connection,
            } => (
                0,
                owner,
                device_key,
                correlation_id,
                connection,
                false,
                false,
            ),
            NodeMsg::Close {
                device_key,
                connection,
                reason,
            } => (1, device_key, device_key, reason, connection, false, false),
            NodeMsg::Twin {
                device_key,
                connection,
                enabled,
                force,
            } => (
                2, device_key, device_key, device_key, connection, *enabled, *force,
            ),
        };
        seal(&NodeMsgRec {
            kind,
            owner: owner.clone(),
            device_key: device_key.clone(),
            text: text.clone(),
            connection_hi: (connection.0 >> 64) as u64,
            connection_lo: connection.0 as u64,
            enabled,
            force,
        })
    }

    pub fn decode(bytes: &[u8]) -> Result<NodeMsg, String> {
        let mut buf = AlignedVec::new();
        let rec = open::<ArchivedNodeMsgRec>(bytes, &mut buf)?;
        let connection = ConnectionRef(
            (u128::from(rec.connection_hi.to_native()) << 64)
                | u128::from(rec.connection_lo.to_native()),
        );
        let device_key = rec.device_key.as_str().to_owned();
        Ok(match rec.kind {
            0 => NodeMsg::Wake {
                owner: rec.owner.as_str().to_owned(),
                device_key,
                correlation_id: rec.text.as_str().to_owned(),
                connection,
            },
            1 => NodeMsg::Close {
                device_key,
                connection,
                reason: rec.text.as_str().to_owned(),
            },
            2 => NodeMsg::Twin {
                device_key,
                connection,
                enabled: rec.enabled,
                force: rec.force,
            },
            other => return Err(format!("unknown node message {other}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::twin::Status;
    use crate::hub::{AuthContext, CommandKind, ConnectionStatus, EventKind, Protocol, TwinSync};

    #[test]
    fn tokens_are_subject_safe_and_reversible() {
        for s in [
            "",
            "alice",
            "a.b*c>d e",
            "/light/1?x",
            "ünï",
            "5bbc55bb-686f",
        ] {
            let t = token(s);
            assert!(t.starts_with('k'));
            assert!(
                t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "{t}"
            );
            assert_eq!(untoken(&t).as_deref(), Some(s));
        }
        assert_eq!(untoken("zzz"), None);
        assert_eq!(
            device_key("5BBC55BB-686F-4068-6C2D-75C4A8B4F49A"),
            "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a"
        );
    }

    #[test]
    fn records_round_trip_and_other_formats_are_refused() {
        let device = DeviceEntry {
            record: DeviceRecord {
                device_id: "d".into(),
                owner: "o".into(),
                status: ConnectionStatus {
                    online: true,
                    connected_at_ns: 7,
                    protocol: Some(Protocol::CoapsTcp),
                    service_id: "node".into(),
                    connection_id: "1.2.3.4:5".into(),
                    local_endpoints: vec!["coaps+tcp://x".into()],
                },
                twin: TwinSync {
                    enabled: true,
                    ..TwinSync::default()
                },
            },
            connection: ConnectionRef(u128::MAX - 3),
        };
        let bytes = device.encode().unwrap();
        assert_eq!(DeviceEntry::decode(&bytes).unwrap(), device);
        let mut other = bytes.to_vec();
        other[0] = FORMAT + 1;
        assert!(DeviceEntry::decode(&other).unwrap_err().contains("format"));
        assert!(DeviceEntry::decode(&[]).is_err());

        let command = CommandEntry {
            owner: "o".into(),
            order: 9,
            command: Command {
                correlation_id: "c".into(),
                device_id: "d".into(),
                href: "/a".into(),
                kind: CommandKind::Update {
                    content: Content {
                        data: vec![1, 2],
                        content_format: 60,
                    },
                },
                interface: None,
                valid_until_ns: 3,
                issued_at_ns: 2,
            },
            state: CommandState::Answered(CommandResult {
                correlation_id: "c".into(),
                status: Status::NotFound,
                content: Content::none(),
                etag: Some(vec![1]),
            }),
            finished_at_ns: 11,
        };
        let bytes = command.encode().unwrap();
        assert_eq!(CommandEntry::decode(&bytes).unwrap(), command);
        let dispatched = CommandEntry {
            state: CommandState::Dispatched {
                node: "n".into(),
                connection: ConnectionRef(1 << 70 | 5),
            },
            ..command
        };
        assert_eq!(
            CommandEntry::decode(&dispatched.encode().unwrap()).unwrap(),
            dispatched
        );

        for msg in [
            NodeMsg::Wake {
                owner: "o".into(),
                device_key: "d".into(),
                correlation_id: "c".into(),
                connection: ConnectionRef(3),
            },
            NodeMsg::Close {
                device_key: "d".into(),
                connection: ConnectionRef(4),
                reason: "r".into(),
            },
            NodeMsg::Twin {
                device_key: "d".into(),
                connection: ConnectionRef(5),
                enabled: false,
                force: true,
            },
        ] {
            assert_eq!(NodeMsg::decode(&msg.encode().unwrap()).unwrap(), msg);
        }
        let sync = SyncEntry {
            state: TwinState::InSync,
            syncing_at_ns: 1,
            in_sync_at_ns: 2,
        };
        assert_eq!(SyncEntry::decode(&sync.encode().unwrap()).unwrap(), sync);
    }

    fn event(n: u64) -> Event {
        Event {
            seq: 0,
            owner: "o".into(),
            device_id: "d".into(),
            at_ns: n,
            auth: AuthContext {
                owner: "o".into(),
                device_id: "d".into(),
                subject: None,
                token_id: None,
            },
            kind: EventKind::ResourceChanged {
                href: "/a".into(),
                status: Status::Ok,
                content: Content {
                    data: vec![n as u8],
                    content_format: 60,
                },
                etag: None,
                version: n,
            },
        }
    }

    #[test]
    fn grouped_events_decode_in_order_with_distinct_ordered_seqs() {
        // One event alone: its seq is the stream sequence's.
        let one = decode_events(&encode_event(&event(1)).unwrap(), 7);
        assert_eq!(one.len(), 1);
        let e = one[0].as_ref().unwrap();
        assert_eq!((e.seq, e.at_ns), (7 << SEQ_SHIFT, 1));
        assert_eq!(stream_seq_of(e.seq), 7);

        let records: Vec<Bytes> = (1..=3).map(|n| encode_event(&event(n)).unwrap()).collect();
        let group = group_events(&records);
        assert_eq!(group[0], EVENTS);
        let events: Vec<Event> = decode_events(&group, 8)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            events.iter().map(|e| (e.seq, e.at_ns)).collect::<Vec<_>>(),
            vec![
                (8 << SEQ_SHIFT, 1),
                (8 << SEQ_SHIFT | 1, 2),
                (8 << SEQ_SHIFT | 2, 3)
            ]
        );
        assert!(events.iter().all(|e| stream_seq_of(e.seq) == 8));
        assert!(events[2].seq < 9 << SEQ_SHIFT);
        assert_eq!(events[1], {
            let mut e = event(2);
            e.seq = 8 << SEQ_SHIFT | 1;
            e
        });

        // A truncated group: what is whole is read, then one error.
        let cut = decode_events(&group[..group.len() - 2], 8);
        assert_eq!(cut.len(), 3);
        assert!(cut[0].is_ok() && cut[1].is_ok());
        assert!(cut[2].as_ref().unwrap_err().contains("truncated"));
        let cut = decode_events(&group[..3], 8);
        assert_eq!(cut.len(), 1);
        assert!(cut[0].is_err());
        assert!(decode_events(&[EVENTS], 1).is_empty());
        assert!(decode_events(&[], 1)[0].is_err());
    }
}
