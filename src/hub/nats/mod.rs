//! The hub on NATS JetStream (issue 6; ARCHITECTURE.md "Scale-out"):
//! several gateway nodes behind an L4 load balancer share devices, twins,
//! commands and events through one NATS deployment, with the same
//! [`Hub`] contract as the embedded hub.
//!
//! # Data layout
//!
//! `<p>` is `hub.nats.prefix`. Names inside keys and subjects are
//! [`records::token`]s (`k` + base64url of the UTF-8 bytes): owners, device
//! IDs (normalised as the embedded hub does), hrefs and correlation IDs
//! may hold any character, tokens are valid subject tokens and KV keys.
//! Every value is an rkyv record behind a format byte ([`records`]).
//!
//! | where | key / subject | value |
//! |---|---|---|
//! | stream `<p>-events` | `<p>.events.<owner>.<device>.<kind>` | an event, or several consecutive events of the device and kind ([`records::EVENTS`]); an event's `seq` is `stream sequence << 10 \| index` |
//! | bucket `<p>-registry` | `dev.<device>` | owner, connection status, node (`service_id`) and connection, twin enabled; changed by CAS |
//! | bucket `<p>-registry` | `sync.<device>` | twin sync state (spec §6.9), written by the device's node |
//! | bucket `<p>-twin` | `<owner>.<device>.<href>` | latest content of the resource |
//! | bucket `<p>-links` | `<owner>.<device>.<href>` | a published link (spec §5.7) |
//! | bucket `<p>-commands` | `<owner>.<device>.<correlation>` | a command, its `valid_until` and its state |
//! | bucket `<p>-nodes` | `<node>` (`max_age` = heartbeat TTL) | a node's last heartbeat |
//! | bucket `<p>-grants` | `g.<hash>`, `c.<code>`, `d.<device>.<hash>` (`max_age` = refresh token TTL) | the embedded authority's refresh grants and used codes ([`grants`]) |
//! | core NATS | `<p>.node.<node>.{wake,close,twin}` | requests to the node holding a device |
//!
//! # Who writes what
//!
//! The node that holds a device's connection writes its twin, sync state,
//! links and device events; it keeps them in memory too ([`LocalDevice`],
//! loaded at sign-in), so that the shards' reads (`latest_etags`,
//! `twin_enabled`) and the twin's change detection never wait for the
//! broker. Every node mirrors the registry bucket (a watch), so that
//! `owns`, `device`, `devices` answer from memory; a device the mirror does
//! not know yet is read from the bucket.
//!
//! Device-side changes (`resources_changed`, `set_twin_state`,
//! `command_result`, `set_offline`, ...) are queued and published by a
//! control-plane task in batches ([`outbox`]): bounded, retried across
//! broker outages, order per device kept. Within a batch a device's
//! consecutive events of one kind share a message and a key's superseded
//! values are not sent, so a burst costs a few broker round trips, not
//! two per notification. Rare calls wait for the broker,
//! bounded by `hub.nats.request_timeout` (then [`HubError::Unavailable`]):
//! `add_device`, `delete_device`, `set_online` (registry CAS, twin load),
//! `publish`/`unpublish` (acknowledged before they return), and
//! `take_pending_commands` at sign-in. The user side (HTTP API) reads the
//! buckets and the stream, bounded the same way.
//!
//! # Commands
//!
//! A command's key goes Pending → Dispatched{node, connection} →
//! Answered (or Expired / Canceled / DeviceDeleted), each step a CAS
//! update: a command is dispatched at most once and answered exactly once
//! whichever nodes race. The node that accepted it watches its key and
//! hands the outcome to its caller's ticket, then deletes the key. A
//! command for an online device is offered to its node (`wake`, a
//! request): that node dispatches it to the connection if it still holds
//! the device; otherwise it stays pending for the next sign-in, on any
//! node (`take_pending_commands`). A dispatched command whose connection
//! or node dies unanswered is answered UNAVAILABLE and never re-sent (spec
//! §7.3).
//!
//! # Liveness (spec §8.4)
//!
//! Each node puts its heartbeat every third of `heartbeat_ttl` into the
//! nodes bucket, whose `max_age` is the TTL (nats-server 2.9 has no
//! per-message TTL). Every node periodically lists the live nodes and
//! marks OFFLINE (CAS) the devices whose node is gone, answering their
//! dispatched commands UNAVAILABLE. A node only does so after its own
//! heartbeats have succeeded for a whole TTL: after a broker outage every
//! node has had time to heartbeat again first.
//!
//! Unlike spec §8.4's gateway, a node that cannot heartbeat does NOT
//! terminate itself: during a broker outage devices stay connected and
//! their changes wait in the queue (issue 6, checklist items 62–63), and
//! nobody can mark anything while nobody reaches the broker. If a node
//! was cut off for longer than the TTL while others were not, they may
//! have marked its devices OFFLINE: once it reaches the broker again it
//! closes the connections the registry no longer gives it, and those
//! devices reconnect to a consistent state.
//!
//! The hub stamps records with the wall clock and its tasks time with the
//! monotonic clock: it is the record keeper and IO, not protocol code.
#![allow(clippy::disallowed_methods)]

mod grants;
mod outbox;
mod records;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;

use self::outbox::{Fail, Merge, Out, Outbox};
use self::records::{
    decode_events, decode_link, decode_resource, device_key, encode_event, encode_link,
    encode_resource, stream_seq_of, token, untoken, CommandEntry, CommandState, DeviceEntry,
    NodeMsg, SyncEntry,
};
use super::twin::{apply_change, latest_etags, Content, Status, TwinResource};
use super::{
    AuthContext, Command, CommandOutcome, CommandResult, CommandTicket, ConnectionRef,
    ConnectionStatus, Connections, DeviceRecord, Event, EventKind, Hub, HubError, HubMessage,
    HubStats, Online, Replaced, ResourceChange, ResourceState, StoredLink, TwinState,
};

/// How far an event subscriber may fall behind before it is dropped (as
/// in the embedded hub).
const SUBSCRIBER_QUEUE: usize = 4096;
/// Compare-and-set attempts before a call gives up as unavailable.
const CAS_TRIES: usize = 8;
/// A final command whose issuer is gone (its node died before it deleted
/// the key) is removed this long after it ended.
const FINISHED_KEPT: Duration = Duration::from_secs(60);
/// The longest a listing read of the buckets returns.
const SCAN_MAX: usize = 1_000_000;
/// A read of a stream that got nothing for this long has all there is.
const READ_IDLE: Duration = Duration::from_millis(500);
/// How long a read from a start sequence waits for more than was counted.
const READ_TAIL: Duration = Duration::from_millis(100);

/// `[hub.nats]` with the node's identity, as [`NatsHub::open`] takes it.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    pub servers: Vec<String>,
    pub credentials_file: Option<PathBuf>,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub replicas: usize,
    pub prefix: String,
    pub request_timeout: Duration,
    pub heartbeat_ttl: Duration,
    pub buffer: usize,
    /// Events the stream keeps (`hub.event_retention`); older ones go.
    pub event_retention: u64,
    /// This node: the gateway process's random `service_id` (spec §8.1).
    pub node_id: String,
    /// `max_age` of the grants bucket: the longest a refresh grant or a
    /// used code must be kept (`[authority] refresh_token_ttl`, or
    /// `code_ttl` if longer).
    pub grant_max_age: Duration,
}

/// [`NatsSettings::grant_max_age`] unless the gateway's config says.
pub const DEFAULT_GRANT_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

impl NatsSettings {
    /// The settings of `[hub]` / `[hub.nats]` for the node `node_id`.
    pub fn from_config(hub: &crate::config::HubConfig, node_id: &str) -> NatsSettings {
        let n = &hub.nats;
        let path = |p: &PathBuf| (!p.as_os_str().is_empty()).then(|| p.clone());
        NatsSettings {
            servers: n.servers(),
            credentials_file: path(&n.credentials_file),
            token: (!n.token.is_empty()).then(|| n.token.clone()),
            tls_ca: path(&n.tls_ca),
            replicas: n.replicas,
            prefix: n.prefix.clone(),
            request_timeout: n.request_timeout,
            heartbeat_ttl: n.heartbeat_ttl,
            buffer: n.buffer,
            event_retention: hub.event_retention,
            node_id: node_id.to_owned(),
            grant_max_age: DEFAULT_GRANT_MAX_AGE,
        }
    }
}

/// Why the NATS hub could not start (spec §8.4: failing to register the
/// node aborts the start).
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot start the NATS hub's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot connect to NATS at {servers}: {message}")]
    Connect { servers: String, message: String },
    #[error("NATS JetStream at {servers}: {message}")]
    Setup { servers: String, message: String },
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn unavailable(e: impl std::fmt::Display) -> HubError {
    HubError::Unavailable(format!("the NATS broker: {e}"))
}

fn owner_ctx(owner: &str, device_id: &str) -> AuthContext {
    AuthContext {
        owner: owner.to_owned(),
        device_id: device_id.to_owned(),
        ..AuthContext::default()
    }
}

/// A device whose connection this node holds: what its shard reads and
/// changes without waiting for the broker.
#[derive(Debug)]
struct LocalDevice {
    owner: String,
    device_id: String,
    connection: ConnectionRef,
    twin: BTreeMap<String, TwinResource>,
    links: BTreeMap<String, StoredLink>,
    twin_enabled: bool,
    sync: SyncEntry,
}

/// The registry as this node last saw it, by device key: `None` for a
/// deleted device. With the revision it was seen at.
#[derive(Debug, Default)]
struct Mirror {
    devices: HashMap<String, (Option<DeviceEntry>, u64)>,
    syncs: HashMap<String, (SyncEntry, u64)>,
}

impl Mirror {
    fn put_device(&mut self, key: &str, entry: Option<DeviceEntry>, revision: u64) {
        match self.devices.get(key) {
            Some((_, seen)) if *seen >= revision => {}
            _ => {
                self.devices.insert(key.to_owned(), (entry, revision));
            }
        }
    }

    fn put_sync(&mut self, key: &str, sync: SyncEntry, revision: u64) {
        match self.syncs.get(key) {
            Some((_, seen)) if *seen >= revision && revision != 0 => {}
            _ => {
                self.syncs.insert(key.to_owned(), (sync, revision));
            }
        }
    }

    fn record(&self, key: &str, entry: &DeviceEntry) -> DeviceRecord {
        let mut record = entry.record.clone();
        if let Some((sync, _)) = self.syncs.get(key) {
            record.twin.state = sync.state;
            record.twin.syncing_at_ns = sync.syncing_at_ns;
            record.twin.in_sync_at_ns = sync.in_sync_at_ns;
        }
        record
    }
}

/// Node liveness as this node sees its own heartbeats.
#[derive(Debug)]
struct Liveness {
    /// The last heartbeat the broker took.
    last_ok: Instant,
    /// Since when every heartbeat succeeded (`None` while failing).
    ok_since: Option<Instant>,
}

/// What the hub's tasks share.
struct Inner {
    settings: NatsSettings,
    client: async_nats::Client,
    js: jetstream::Context,
    events: stream::Stream,
    registry: kv::Store,
    twin: kv::Store,
    links: kv::Store,
    commands: kv::Store,
    nodes: kv::Store,
    grants: kv::Store,
    outbox: Outbox,
    connections: OnceLock<Arc<dyn Connections>>,
    stats: Arc<HubStats>,
    local: Mutex<HashMap<String, LocalDevice>>,
    mirror: Mutex<Mirror>,
    liveness: Mutex<Liveness>,
    /// Commands not yet answered over all devices, as of the last scan.
    pending: AtomicUsize,
    /// An expiry scan runs.
    expiring: AtomicBool,
    /// Numbers this node's `Nats-Msg-Id`s.
    msg_seq: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic under the lock leaves maps that later calls read correctly
    // (each change is one map operation): take the lock over.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A record read back from a stream: its subject, payload and sequence.
struct Record {
    subject: String,
    payload: Bytes,
    seq: u64,
    deleted: bool,
}

impl Inner {
    fn node(&self) -> &str {
        &self.settings.node_id
    }

    fn prefix(&self) -> &str {
        &self.settings.prefix
    }

    fn local(&self) -> MutexGuard<'_, HashMap<String, LocalDevice>> {
        lock(&self.local)
    }

    fn mirror(&self) -> MutexGuard<'_, Mirror> {
        lock(&self.mirror)
    }

    fn dev_key(key: &str) -> String {
        format!("dev.{}", token(key))
    }

    fn sync_key(key: &str) -> String {
        format!("sync.{}", token(key))
    }

    /// `<owner>.<device>.<name>`: the twin's, links' and commands' keys.
    fn item_key(owner: &str, key: &str, name: &str) -> String {
        format!("{}.{}.{}", token(owner), token(key), token(name))
    }

    fn kv_subject(store: &kv::Store, key: &str) -> String {
        format!("{}{key}", store.prefix)
    }

    fn next_msg_id(&self) -> String {
        format!(
            "{}-{}",
            self.node(),
            self.msg_seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A key-value entry for the outbox.
    fn put(&self, subject: String, payload: Bytes) -> Out {
        Out::Put {
            subject,
            payload,
            msg_id: self.next_msg_id(),
            delete: false,
            merge: Merge::Latest,
        }
    }

    fn delete_out(&self, subject: String) -> Out {
        Out::Put {
            subject,
            payload: Bytes::new(),
            msg_id: self.next_msg_id(),
            delete: true,
            merge: Merge::Latest,
        }
    }

    /// An event for the outbox; `None` (logged) if it cannot be encoded.
    fn event_out(
        &self,
        owner: &str,
        device_id: &str,
        auth: AuthContext,
        kind: EventKind,
    ) -> Option<Out> {
        let subject = format!(
            "{}.events.{}.{}.{}",
            self.prefix(),
            token(owner),
            token(&device_key(device_id)),
            kind.name()
        );
        let event = Event {
            seq: 0,
            owner: owner.to_owned(),
            device_id: device_id.to_owned(),
            at_ns: now_ns(),
            auth,
            kind,
        };
        match encode_event(&event) {
            Ok(payload) => Some(Out::Put {
                subject,
                payload,
                msg_id: self.next_msg_id(),
                delete: false,
                merge: Merge::Event,
            }),
            Err(e) => {
                tracing::error!(device_id, "an event cannot be encoded: {e}");
                None
            }
        }
    }

    fn sync_out(&self, key: &str, sync: &SyncEntry) -> Option<Out> {
        let subject = Self::kv_subject(&self.registry, &Self::sync_key(key));
        match sync.encode() {
            Ok(payload) => Some(self.put(subject, payload)),
            Err(e) => {
                tracing::error!(device_key = key, "a twin state cannot be encoded: {e}");
                None
            }
        }
    }

    fn close_connection(&self, connection: ConnectionRef, reason: &str) {
        if let Some(c) = self.connections.get() {
            c.close(connection, reason);
        }
    }

    fn deliver(&self, connection: ConnectionRef, message: HubMessage) -> Result<(), HubMessage> {
        match self.connections.get() {
            Some(c) => c.deliver(connection, message),
            None => Err(message),
        }
    }

    // -- reads ---------------------------------------------------------------

    /// Reads `stream` from `policy` on, filtered, up to what was there when
    /// the read began (or `limit` records).
    async fn read_stream(
        &self,
        stream: &stream::Stream,
        filter: String,
        policy: consumer::DeliverPolicy,
        limit: usize,
    ) -> Result<Vec<Record>, HubError> {
        let consumer = stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: filter,
                deliver_policy: policy,
                replay_policy: consumer::ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        // What matched when the consumer was made: the per-message
        // `pending` of a filtered consumer is not exact on 2.9, and from a
        // start sequence the count may miss one (seen on 2.9.10): such a
        // read also takes what arrives right after.
        let from_sequence = matches!(policy, consumer::DeliverPolicy::ByStartSequence { .. });
        let expected = usize::try_from(consumer.cached_info().num_pending)
            .unwrap_or(usize::MAX)
            .min(limit);
        if expected == 0 && !from_sequence {
            return Ok(out);
        }
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        loop {
            // A record counted at the start may be gone before it is
            // delivered (a bucket's max_age): past a quiet moment, what
            // came is all there is.
            let idle = if out.len() >= expected {
                READ_TAIL
            } else {
                READ_IDLE
            };
            let next = tokio::time::timeout(idle, messages.next()).await;
            let Ok(Some(message)) = next else {
                break;
            };
            let message = message.map_err(unavailable)?;
            let seq = message.info().map_err(unavailable)?.stream_sequence;
            let deleted = message
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| op.as_str() != "PUT");
            out.push(Record {
                subject: message.subject.to_string(),
                payload: message.payload.clone(),
                seq,
                deleted,
            });
            if out.len() >= limit || (out.len() >= expected && !from_sequence) {
                break;
            }
        }
        Ok(out)
    }

    /// The latest value of every key of `store` matching `filter` (a key
    /// pattern, `>` allowed), deleted keys left out: (key, value, revision).
    async fn scan(
        &self,
        store: &kv::Store,
        filter: &str,
    ) -> Result<Vec<(String, Bytes, u64)>, HubError> {
        let records = self
            .read_stream(
                &store.stream,
                Self::kv_subject(store, filter),
                consumer::DeliverPolicy::LastPerSubject,
                SCAN_MAX,
            )
            .await?;
        Ok(records
            .into_iter()
            .filter(|r| !r.deleted)
            .filter_map(|r| {
                let key = r.subject.strip_prefix(store.prefix.as_str())?.to_owned();
                Some((key, r.payload, r.seq))
            })
            .collect())
    }

    async fn entry(store: &kv::Store, key: &str) -> Result<Option<(Bytes, u64)>, HubError> {
        match store.entry(key).await.map_err(unavailable)? {
            Some(e) if e.operation == kv::Operation::Put => Ok(Some((e.value, e.revision))),
            _ => Ok(None),
        }
    }

    /// The registry's record of a device, fresh from the bucket (and into
    /// the mirror).
    async fn device_entry(&self, key: &str) -> Result<Option<(DeviceEntry, u64)>, HubError> {
        match Self::entry(&self.registry, &Self::dev_key(key)).await? {
            Some((bytes, revision)) => {
                let entry = DeviceEntry::decode(&bytes).map_err(HubError::Unavailable)?;
                self.mirror().put_device(key, Some(entry.clone()), revision);
                Ok(Some((entry, revision)))
            }
            None => Ok(None),
        }
    }

    async fn command_entry(&self, key: &str) -> Result<Option<(CommandEntry, u64)>, HubError> {
        match Self::entry(&self.commands, key).await? {
            Some((bytes, revision)) => Ok(Some((
                CommandEntry::decode(&bytes).map_err(HubError::Unavailable)?,
                revision,
            ))),
            None => Ok(None),
        }
    }

    /// CAS of a registry record; `Ok(None)` when someone changed it first.
    async fn update_device(
        &self,
        key: &str,
        entry: &DeviceEntry,
        revision: u64,
    ) -> Result<Option<u64>, HubError> {
        let bytes = entry.encode().map_err(HubError::Unavailable)?;
        match self
            .registry
            .update(Self::dev_key(key), bytes, revision)
            .await
        {
            Ok(revision) => {
                self.mirror().put_device(key, Some(entry.clone()), revision);
                Ok(Some(revision))
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// CAS of a command; `Ok(None)` when someone changed it first.
    async fn update_command(
        &self,
        key: &str,
        entry: &CommandEntry,
        revision: u64,
    ) -> Result<Option<u64>, HubError> {
        let bytes = entry.encode().map_err(HubError::Unavailable)?;
        match self.commands.update(key, bytes, revision).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Pending → Expired (spec §7.4) by CAS; its issuer learns it through
    /// the CommandExpired event, attributed to `ctx`. Nothing happens when
    /// someone changed the command first.
    async fn expire_command(
        &self,
        key: &str,
        entry: CommandEntry,
        revision: u64,
        now_ns: u64,
        ctx: AuthContext,
    ) -> Result<(), HubError> {
        let expired = CommandEntry {
            state: CommandState::Expired,
            finished_at_ns: now_ns,
            ..entry
        };
        if self
            .update_command(key, &expired, revision)
            .await?
            .is_none()
        {
            return Ok(());
        }
        self.stats.commands_expired.fetch_add(1, Ordering::Relaxed);
        let c = &expired.command;
        let kind = EventKind::CommandExpired {
            correlation_id: c.correlation_id.clone(),
            href: c.href.clone(),
            operation: c.kind.operation(),
        };
        if let Some(out) = self.event_out(&expired.owner, &c.device_id, ctx, kind) {
            self.outbox.push_async(out).await?;
        }
        Ok(())
    }

    /// The commands of one device: (key, entry, revision), oldest first.
    async fn device_commands(
        &self,
        owner: &str,
        key: &str,
    ) -> Result<Vec<(String, CommandEntry, u64)>, HubError> {
        let filter = format!("{}.{}.>", token(owner), token(key));
        let mut out = Vec::new();
        for (k, bytes, revision) in self.scan(&self.commands, &filter).await? {
            match CommandEntry::decode(&bytes) {
                Ok(entry) => out.push((k, entry, revision)),
                Err(e) => tracing::warn!(key = %k, "skipping an unreadable command: {e}"),
            }
        }
        out.sort_by(|a, b| (a.1.order, &a.0).cmp(&(b.1.order, &b.0)));
        Ok(out)
    }

    /// The links of one device (`Some(key)`) or of every device of `owner`,
    /// by device key.
    async fn read_links(
        &self,
        owner: &str,
        key: Option<&str>,
    ) -> Result<BTreeMap<String, Vec<StoredLink>>, HubError> {
        let filter = match key {
            Some(k) => format!("{}.{}.>", token(owner), token(k)),
            None => format!("{}.>", token(owner)),
        };
        let mut out: BTreeMap<String, Vec<StoredLink>> = BTreeMap::new();
        for (k, bytes, _) in self.scan(&self.links, &filter).await? {
            let Some(device) = k.split('.').nth(1).and_then(untoken) else {
                continue;
            };
            match decode_link(&bytes) {
                Ok(link) => out.entry(device).or_default().push(link),
                Err(e) => tracing::warn!(key = %k, "skipping an unreadable link: {e}"),
            }
        }
        for links in out.values_mut() {
            links.sort_by(|a, b| a.href.cmp(&b.href));
        }
        Ok(out)
    }

    async fn read_twin(&self, owner: &str, key: &str) -> Result<Vec<ResourceState>, HubError> {
        let filter = format!("{}.{}.>", token(owner), token(key));
        let mut out = Vec::new();
        for (k, bytes, _) in self.scan(&self.twin, &filter).await? {
            match decode_resource(&bytes) {
                Ok(state) => out.push(state),
                Err(e) => tracing::warn!(key = %k, "skipping an unreadable twin value: {e}"),
            }
        }
        out.sort_by(|a, b| a.href.cmp(&b.href));
        Ok(out)
    }

    /// The device as `owner`'s: from the mirror, else from the bucket.
    async fn owned_entry(&self, owner: &str, key: &str) -> Result<DeviceEntry, HubError> {
        let known = self.mirror().devices.get(key).cloned();
        let entry = match known {
            Some((entry, _)) => entry,
            None => self.device_entry(key).await?.map(|(e, _)| e),
        };
        entry
            .filter(|e| e.record.owner == owner)
            .ok_or_else(|| HubError::NotFound(format!("device {key} not found")))
    }

    // -- the registry mirror ---------------------------------------------------

    fn mirror_record(&self, record: &Record) {
        let Some(key) = record.subject.strip_prefix(self.registry.prefix.as_str()) else {
            return;
        };
        if let Some(device) = key.strip_prefix("dev.").and_then(untoken) {
            let entry = if record.deleted {
                None
            } else {
                match DeviceEntry::decode(&record.payload) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        tracing::warn!(device, "skipping an unreadable registry record: {e}");
                        return;
                    }
                }
            };
            self.mirror().put_device(&device, entry, record.seq);
        } else if let Some(device) = key.strip_prefix("sync.").and_then(untoken) {
            if record.deleted {
                self.mirror().syncs.remove(&device);
            } else if let Ok(sync) = SyncEntry::decode(&record.payload) {
                self.mirror().put_sync(&device, sync, record.seq);
            }
        }
    }

    /// Follows the registry bucket for ever; `ready` gets a message once
    /// the mirror caught up.
    async fn mirror_loop(self: Arc<Self>, ready: flume::Sender<()>) {
        loop {
            if let Err(e) = self.mirror_once(&ready).await {
                tracing::warn!("the registry watch stopped ({e}); restarting it");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn mirror_once(&self, ready: &flume::Sender<()>) -> Result<(), HubError> {
        let consumer = self
            .registry
            .stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: Self::kv_subject(&self.registry, ">"),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                replay_policy: consumer::ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let initial = consumer.cached_info().num_pending;
        if initial == 0 {
            let _ = ready.try_send(());
        }
        let mut seen = 0u64;
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(unavailable)?;
            let (seq, left) = {
                let info = message.info().map_err(unavailable)?;
                (info.stream_sequence, info.pending)
            };
            seen += 1;
            let deleted = message
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| op.as_str() != "PUT");
            self.mirror_record(&Record {
                subject: message.subject.to_string(),
                payload: message.payload.clone(),
                seq,
                deleted,
            });
            if left == 0 || seen >= initial {
                let _ = ready.try_send(());
            }
        }
        Err(HubError::Unavailable("the watch ended".into()))
    }

    // -- node messages -----------------------------------------------------------

    fn node_subject(&self, node: &str, what: &str) -> String {
        format!("{}.node.{}.{what}", self.prefix(), token(node))
    }

    async fn node_loop(self: Arc<Self>, mut subscriber: async_nats::Subscriber) {
        while let Some(message) = subscriber.next().await {
            let inner = self.clone();
            tokio::spawn(async move { inner.on_node_message(message).await });
        }
    }

    async fn on_node_message(&self, message: async_nats::Message) {
        let msg = match NodeMsg::decode(&message.payload) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!(subject = %message.subject, "an unreadable node message: {e}");
                return;
            }
        };
        match msg {
            NodeMsg::Wake {
                owner,
                device_key,
                correlation_id,
                connection,
            } => {
                let sent = self
                    .dispatch_here(&owner, &device_key, &correlation_id, connection)
                    .await;
                if let Some(reply) = message.reply {
                    let answer = Bytes::from_static(if sent { b"1" } else { b"0" });
                    if let Err(e) = self.client.publish(reply, answer).await {
                        tracing::debug!("cannot answer a wake: {e}");
                    }
                }
            }
            NodeMsg::Close {
                device_key,
                connection,
                reason,
            } => {
                {
                    let mut local = self.local();
                    if local
                        .get(&device_key)
                        .is_some_and(|d| d.connection == connection)
                    {
                        local.remove(&device_key);
                    }
                }
                self.close_connection(connection, &reason);
            }
            NodeMsg::Twin {
                device_key,
                connection,
                enabled,
                force,
            } => self.twin_here(&device_key, connection, enabled, force),
        }
    }

    /// spec §7.5 on the node holding the device.
    fn twin_here(&self, key: &str, connection: ConnectionRef, enabled: bool, force: bool) {
        {
            let mut local = self.local();
            match local.get_mut(key) {
                Some(d) if d.connection == connection => d.twin_enabled = enabled,
                _ => return,
            }
        }
        if self
            .deliver(connection, HubMessage::Twin { enabled, force })
            .is_err()
        {
            // The session cannot be told: it reconnects with the setting.
            self.close_connection(
                connection,
                "cannot deliver a twin setting to the connection",
            );
        }
    }

    /// Dispatches a pending command to the device's `connection` if this
    /// node still holds it: true when the session took it.
    async fn dispatch_here(
        &self,
        owner: &str,
        key: &str,
        correlation_id: &str,
        connection: ConnectionRef,
    ) -> bool {
        let current = self
            .local()
            .get(key)
            .is_some_and(|d| d.connection == connection);
        if !current {
            return false;
        }
        let ckey = Self::item_key(owner, key, correlation_id);
        let Ok(Some((entry, revision))) = self.command_entry(&ckey).await else {
            return false;
        };
        if entry.state != CommandState::Pending || entry.command.expired(now_ns()) {
            return false;
        }
        let dispatched = CommandEntry {
            state: CommandState::Dispatched {
                node: self.node().to_owned(),
                connection,
            },
            ..entry.clone()
        };
        let Ok(Some(revision)) = self.update_command(&ckey, &dispatched, revision).await else {
            return false;
        };
        match self.deliver(
            connection,
            HubMessage::Command(Box::new(entry.command.clone())),
        ) {
            Ok(()) => true,
            Err(_) => {
                self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    device_key = key,
                    "the device's connection cannot take the command now; it waits"
                );
                if let Err(e) = self.update_command(&ckey, &entry, revision).await {
                    tracing::warn!(correlation_id, "a command back to pending: {e}");
                }
                false
            }
        }
    }

    // -- outbox steps --------------------------------------------------------------

    async fn apply_offline(&self, key: &str, connection: ConnectionRef) -> Result<Vec<Out>, Fail> {
        let outage = |e: HubError| Fail::outage(e.to_string());
        let mut follow = Vec::new();
        let mut owner = None;
        for attempt in 0..=CAS_TRIES {
            if attempt == CAS_TRIES {
                return Err(Fail::outage("the registry record keeps changing"));
            }
            let Some((mut entry, revision)) = self.device_entry(key).await.map_err(outage)? else {
                return Ok(follow);
            };
            owner = Some(entry.record.owner.clone());
            if !entry.held_by(self.node(), connection) {
                break;
            }
            entry.record.status.online = false;
            if self
                .update_device(key, &entry, revision)
                .await
                .map_err(outage)?
                .is_some()
            {
                let (o, id) = (&entry.record.owner, &entry.record.device_id);
                follow.extend(self.event_out(o, id, owner_ctx(o, id), EventKind::Offline));
                break;
            }
        }
        // Commands handed to this connection that its session never saw
        // are pending again (the session answered or returned the others
        // before it reported OFFLINE).
        if let Some(owner) = owner {
            self.return_dispatched(&owner, key, connection, None)
                .await
                .map_err(outage)?;
        }
        Ok(follow)
    }

    /// Dispatched{this node, connection} → Pending, for the named
    /// commands or all of them.
    async fn return_dispatched(
        &self,
        owner: &str,
        key: &str,
        connection: ConnectionRef,
        only: Option<&[String]>,
    ) -> Result<(), HubError> {
        let mine = CommandState::Dispatched {
            node: self.node().to_owned(),
            connection,
        };
        for (ckey, entry, revision) in self.device_commands(owner, key).await? {
            if entry.state != mine
                || only.is_some_and(|ids| !ids.contains(&entry.command.correlation_id))
            {
                continue;
            }
            let back = CommandEntry {
                state: CommandState::Pending,
                ..entry
            };
            // Lost to a concurrent change: that change ended it.
            let _ = self.update_command(&ckey, &back, revision).await?;
        }
        Ok(())
    }

    async fn apply_return(
        &self,
        key: &str,
        connection: ConnectionRef,
        ids: &[String],
    ) -> Result<(), Fail> {
        let owner = self
            .mirror()
            .devices
            .get(key)
            .and_then(|(e, _)| e.as_ref().map(|e| e.record.owner.clone()));
        let owner = match owner {
            Some(o) => o,
            None => match self.device_entry(key).await {
                Ok(Some((e, _))) => e.record.owner,
                Ok(None) => return Ok(()),
                Err(e) => return Err(Fail::outage(e.to_string())),
            },
        };
        self.return_dispatched(&owner, key, connection, Some(ids))
            .await
            .map_err(|e| Fail::outage(e.to_string()))
    }

    async fn apply_endpoints(
        &self,
        key: &str,
        connection: ConnectionRef,
        endpoints: &[String],
    ) -> Result<(), Fail> {
        for _ in 0..CAS_TRIES {
            let entry = self
                .device_entry(key)
                .await
                .map_err(|e| Fail::outage(e.to_string()))?;
            let Some((mut entry, revision)) = entry else {
                return Ok(());
            };
            if !entry.held_by(self.node(), connection)
                || entry.record.status.local_endpoints == endpoints
            {
                return Ok(());
            }
            entry.record.status.local_endpoints = endpoints.to_vec();
            match self.update_device(key, &entry, revision).await {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => continue,
                Err(e) => return Err(Fail::outage(e.to_string())),
            }
        }
        Err(Fail::outage("the registry record keeps changing"))
    }

    async fn apply_answer(
        &self,
        ctx: &AuthContext,
        connection: ConnectionRef,
        result: &CommandResult,
    ) -> Result<Vec<Out>, Fail> {
        let key = device_key(&ctx.device_id);
        let ckey = Self::item_key(&ctx.owner, &key, &result.correlation_id);
        let mine = CommandState::Dispatched {
            node: self.node().to_owned(),
            connection,
        };
        for _ in 0..CAS_TRIES {
            let found = self
                .command_entry(&ckey)
                .await
                .map_err(|e| Fail::outage(e.to_string()))?;
            let Some((entry, revision)) = found.filter(|(e, _)| e.state == mine) else {
                tracing::debug!(correlation_id = %result.correlation_id, "an answer for no dispatched command");
                return Ok(Vec::new());
            };
            let answered = CommandEntry {
                state: CommandState::Answered(result.clone()),
                finished_at_ns: now_ns(),
                ..entry
            };
            match self.update_command(&ckey, &answered, revision).await {
                Ok(Some(_)) => {
                    self.stats.count_answer(result.status);
                    let c = &answered.command;
                    let kind = EventKind::CommandAnswered {
                        correlation_id: result.correlation_id.clone(),
                        href: c.href.clone(),
                        operation: c.kind.operation(),
                        status: result.status,
                        content: result.content.clone(),
                    };
                    return Ok(self
                        .event_out(&ctx.owner, &c.device_id, ctx.clone(), kind)
                        .into_iter()
                        .collect());
                }
                Ok(None) => continue,
                Err(e) => return Err(Fail::outage(e.to_string())),
            }
        }
        Err(Fail::outage("the command record keeps changing"))
    }

    // -- commands ---------------------------------------------------------------

    /// Waits for the command's final state and hands it to the issuer,
    /// then removes the key. Ends early when the issuer stopped waiting.
    async fn watch_outcome(self: Arc<Self>, ckey: String, tx: flume::Sender<CommandOutcome>) {
        loop {
            if tx.is_disconnected() {
                return;
            }
            // With history (the key's latest value first, then its
            // updates): the watch starts while the command is already on
            // its way, and a plain `watch` (new updates only) missed an
            // answer that came before the watch's consumer existed — the
            // caller then waited until its timeout (1 in ~3,000 commands
            // under `command --hub nats`). Also what a re-watch after a
            // broken one needs.
            let mut watch = match self.commands.watch_with_history(&ckey).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::debug!(key = %ckey, "cannot watch a command yet: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            loop {
                let next = tokio::time::timeout(Duration::from_secs(1), watch.next()).await;
                let entry = match next {
                    Err(_) => {
                        if tx.is_disconnected() {
                            return;
                        }
                        continue;
                    }
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        tracing::debug!(key = %ckey, "a command watch failed: {e}");
                        break;
                    }
                    Ok(Some(Ok(entry))) => entry,
                };
                if entry.operation != kv::Operation::Put {
                    // Deleted by someone else after it ended: nothing left
                    // to tell (the issuer learns it was the device's
                    // deletion from the registry).
                    let _ = tx.send(CommandOutcome::DeviceDeleted);
                    return;
                }
                let Ok(command) = CommandEntry::decode(&entry.value) else {
                    continue;
                };
                let outcome = match command.state {
                    CommandState::Answered(r) => CommandOutcome::Answered(r),
                    CommandState::Expired => CommandOutcome::Expired,
                    CommandState::Canceled => CommandOutcome::Canceled,
                    CommandState::DeviceDeleted => CommandOutcome::DeviceDeleted,
                    CommandState::Pending | CommandState::Dispatched { .. } => continue,
                };
                let _ = tx.send(outcome);
                if let Err(e) = self
                    .commands
                    .purge_expect_revision(&ckey, Some(entry.revision))
                    .await
                {
                    tracing::debug!(key = %ckey, "an ended command stays for the cleanup: {e}");
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One expiry pass over every command (spec §7.4); also counts the
    /// commands not yet answered and removes ended ones nobody collected.
    async fn expire_pass(&self, now: u64) -> Result<(), HubError> {
        let mut open = 0;
        for (ckey, bytes, revision) in self.scan(&self.commands, ">").await? {
            let Ok(entry) = CommandEntry::decode(&bytes) else {
                continue;
            };
            match &entry.state {
                CommandState::Pending if entry.command.expired(now) => {
                    let ctx = owner_ctx(&entry.owner, &entry.command.device_id);
                    self.expire_command(&ckey, entry, revision, now, ctx)
                        .await?;
                }
                CommandState::Pending | CommandState::Dispatched { .. } => open += 1,
                _ => {
                    let age = Duration::from_nanos(now.saturating_sub(entry.finished_at_ns));
                    if age > FINISHED_KEPT {
                        let _ = self
                            .commands
                            .purge_expect_revision(&ckey, Some(revision))
                            .await;
                    }
                }
            }
        }
        self.pending.store(open, Ordering::Relaxed);
        Ok(())
    }

    // -- liveness (spec §8.4) -------------------------------------------------------

    async fn heartbeat(&self) -> Result<(), HubError> {
        let at = now_ns().to_be_bytes();
        self.nodes
            .put(token(self.node()), Bytes::copy_from_slice(&at))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let ttl = self.settings.heartbeat_ttl;
        let mut failing = false;
        loop {
            tokio::time::sleep(ttl / 3).await;
            let beat = tokio::time::timeout(self.settings.request_timeout, self.heartbeat()).await;
            match beat {
                Ok(Ok(())) => {
                    let gap = {
                        let mut l = lock(&self.liveness);
                        let gap = l.last_ok.elapsed();
                        l.last_ok = Instant::now();
                        if l.ok_since.is_none() {
                            l.ok_since = Some(Instant::now());
                        }
                        gap
                    };
                    if failing {
                        failing = false;
                        tracing::info!("the node heartbeats again");
                    }
                    if gap >= ttl {
                        self.reconcile().await;
                    }
                }
                Ok(Err(_)) | Err(_) => {
                    lock(&self.liveness).ok_since = None;
                    if !failing {
                        failing = true;
                        tracing::warn!(
                            "the node cannot heartbeat: the NATS broker is unreachable; \
                             devices stay connected and changes wait in the queue"
                        );
                    }
                }
            }
        }
    }

    /// After this node could not heartbeat for a whole TTL: the devices
    /// the registry no longer gives it (another node marked them OFFLINE)
    /// are disconnected, so that they reconnect to a consistent state.
    async fn reconcile(&self) {
        let held: Vec<(String, ConnectionRef)> = self
            .local()
            .iter()
            .map(|(k, d)| (k.clone(), d.connection))
            .collect();
        for (key, connection) in held {
            let still = match self.device_entry(&key).await {
                Ok(Some((e, _))) => e.held_by(self.node(), connection),
                Ok(None) => false,
                Err(_) => continue,
            };
            if !still {
                self.local().remove(&key);
                self.close_connection(
                    connection,
                    "the hub marked the device offline while this node could not reach it",
                );
            }
        }
    }

    async fn liveness_loop(self: Arc<Self>) {
        let ttl = self.settings.heartbeat_ttl;
        let period = (ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(2));
        loop {
            tokio::time::sleep(period).await;
            let stable = lock(&self.liveness)
                .ok_since
                .is_some_and(|t| t.elapsed() >= ttl);
            if !stable {
                continue;
            }
            let limit = self.settings.request_timeout * 4;
            match tokio::time::timeout(limit, self.liveness_pass()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("node liveness check: {e}"),
                Err(_) => tracing::debug!("node liveness check: the broker is slow"),
            }
        }
    }

    async fn liveness_pass(&self) -> Result<(), HubError> {
        let live: HashSet<String> = self
            .scan(&self.nodes, ">")
            .await?
            .into_iter()
            .filter_map(|(k, _, _)| untoken(&k))
            .collect();
        let dead: Vec<(String, String)> = self
            .mirror()
            .devices
            .iter()
            .filter_map(|(k, (e, _))| {
                let s = &e.as_ref()?.record.status;
                (s.online && s.service_id != self.node() && !live.contains(&s.service_id))
                    .then(|| (k.clone(), s.service_id.clone()))
            })
            .collect();
        for (key, node) in dead {
            self.node_died(&key, &node).await?;
        }
        Ok(())
    }

    /// The device's node is gone (spec §8.4): OFFLINE, and its commands
    /// dispatched there answered UNAVAILABLE (spec §7.3: they may have
    /// reached the device; never sent again).
    async fn node_died(&self, key: &str, node: &str) -> Result<(), HubError> {
        let mut owner = None;
        for _ in 0..CAS_TRIES {
            let Some((mut entry, revision)) = self.device_entry(key).await? else {
                return Ok(());
            };
            owner = Some(entry.record.owner.clone());
            let s = &entry.record.status;
            if !s.online || s.service_id != node {
                break;
            }
            entry.record.status.online = false;
            if self.update_device(key, &entry, revision).await?.is_some() {
                tracing::info!(device_key = key, node, "the device's node is gone: OFFLINE");
                let (o, id) = (&entry.record.owner, &entry.record.device_id);
                if let Some(out) = self.event_out(o, id, owner_ctx(o, id), EventKind::Offline) {
                    self.outbox.push_async(out).await?;
                }
                break;
            }
        }
        let Some(owner) = owner else {
            return Ok(());
        };
        for (ckey, entry, revision) in self.device_commands(&owner, key).await? {
            let CommandState::Dispatched { node: n, .. } = &entry.state else {
                continue;
            };
            if n != node {
                continue;
            }
            let result = CommandResult {
                correlation_id: entry.command.correlation_id.clone(),
                status: Status::Unavailable,
                content: Content::none(),
                etag: None,
            };
            let answered = CommandEntry {
                state: CommandState::Answered(result.clone()),
                finished_at_ns: now_ns(),
                ..entry
            };
            if self
                .update_command(&ckey, &answered, revision)
                .await?
                .is_some()
            {
                self.stats.count_answer(Status::Unavailable);
                let c = &answered.command;
                let kind = EventKind::CommandAnswered {
                    correlation_id: c.correlation_id.clone(),
                    href: c.href.clone(),
                    operation: c.kind.operation(),
                    status: Status::Unavailable,
                    content: Content::none(),
                };
                let ctx = owner_ctx(&owner, &c.device_id);
                if let Some(out) = self.event_out(&owner, &c.device_id, ctx, kind) {
                    self.outbox.push_async(out).await?;
                }
            }
        }
        Ok(())
    }
}

/// The [`Hub`] on NATS JetStream; see the module documentation.
pub struct NatsHub {
    inner: Arc<Inner>,
    handle: tokio::runtime::Handle,
    grants: Arc<grants::NatsGrants>,
    /// Shut down in the background on drop (the hub may be dropped on an
    /// async thread).
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for NatsHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsHub")
            .field("servers", &self.inner.settings.servers)
            .field("prefix", &self.inner.settings.prefix)
            .field("node", &self.inner.settings.node_id)
            .finish_non_exhaustive()
    }
}

impl Drop for NatsHub {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn connect(settings: &NatsSettings) -> Result<async_nats::Client, String> {
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("coap-gateway {}", settings.node_id))
        .connection_timeout(settings.request_timeout)
        .request_timeout(Some(settings.request_timeout))
        .max_reconnects(None)
        // Quick reconnects: changes wait in the queue meanwhile.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100 * attempts as u64).min(1000))
        });
    if let Some(path) = &settings.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| format!("hub.nats.credentials_file {}: {e}", path.display()))?;
    }
    if let Some(token) = &settings.token {
        options = options.token(token.clone());
    }
    if let Some(ca) = &settings.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    options
        .connect(settings.servers.as_slice())
        .await
        .map_err(|e| e.to_string())
}

impl NatsHub {
    /// Connects, creates (or reuses) the stream and buckets, registers
    /// this node's heartbeat and loads the registry mirror. Fails when the
    /// broker cannot be reached within `request_timeout` (spec §8.4: a
    /// node that cannot register does not start).
    pub fn open(settings: NatsSettings) -> Result<NatsHub, NatsError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("nats-hub")
            .enable_all()
            .build()
            .map_err(NatsError::Runtime)?;
        let handle = runtime.handle().clone();
        let servers = settings.servers.join(",");
        let limit = settings.request_timeout;
        let (tx, rx) = flume::bounded(1);
        let opening = settings.clone();
        handle.spawn(async move {
            let _ = tx.send(Self::setup(opening).await);
        });
        // Connect, stream and buckets, heartbeat, mirror: a few calls.
        let inner = match rx.recv_timeout(limit * 8 + Duration::from_secs(1)) {
            Ok(Ok(inner)) => inner,
            Ok(Err(e)) => {
                runtime.shutdown_background();
                return Err(e);
            }
            Err(_) => {
                runtime.shutdown_background();
                return Err(NatsError::Connect {
                    servers,
                    message: "no answer in time".into(),
                });
            }
        };
        let grants = Arc::new(grants::NatsGrants {
            inner: inner.clone(),
            handle: handle.clone(),
        });
        Ok(NatsHub {
            inner,
            handle,
            grants,
            runtime: Some(runtime),
        })
    }

    async fn setup(settings: NatsSettings) -> Result<Arc<Inner>, NatsError> {
        let servers = settings.servers.join(",");
        let setup_err = |message: String| NatsError::Setup {
            servers: servers.clone(),
            message,
        };
        let client = connect(&settings)
            .await
            .map_err(|message| NatsError::Connect {
                servers: servers.clone(),
                message,
            })?;
        let js = jetstream::ContextBuilder::new()
            .timeout(settings.request_timeout)
            .ack_timeout(settings.request_timeout)
            .build(client.clone());
        let p = &settings.prefix;
        let replicas = settings.replicas;
        let events = js
            .get_or_create_stream(stream::Config {
                name: format!("{p}-events"),
                subjects: vec![format!("{p}.events.>")],
                max_messages: i64::try_from(settings.event_retention).unwrap_or(i64::MAX),
                num_replicas: replicas,
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| setup_err(format!("stream {p}-events: {e}")))?;
        // The buckets' streams are made here as async-nats would make them
        // (`create_key_value` first asks for the account info, whose
        // answer from a 2.9 server it cannot parse).
        let mut stores = Vec::new();
        for (name, max_age) in [
            ("registry", Duration::ZERO),
            ("twin", Duration::ZERO),
            ("links", Duration::ZERO),
            ("commands", Duration::ZERO),
            ("nodes", settings.heartbeat_ttl),
            ("grants", settings.grant_max_age),
        ] {
            let bucket = format!("{p}-{name}");
            js.get_or_create_stream(stream::Config {
                name: format!("KV_{bucket}"),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age,
                storage: stream::StorageType::File,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                num_replicas: replicas,
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| setup_err(format!("bucket {bucket}: {e}")))?;
            let store = js
                .get_key_value(&bucket)
                .await
                .map_err(|e| setup_err(format!("bucket {bucket}: {e}")))?;
            stores.push(store);
        }
        let mut stores = stores.into_iter();
        let (Some(registry), Some(twin), Some(links), Some(commands), Some(nodes), Some(grants)) = (
            stores.next(),
            stores.next(),
            stores.next(),
            stores.next(),
            stores.next(),
            stores.next(),
        ) else {
            return Err(setup_err("the buckets were not all created".into()));
        };
        let stats = Arc::new(HubStats::default());
        let (outbox, queue) = Outbox::new(settings.buffer, stats.clone());
        let inner = Arc::new(Inner {
            settings,
            client,
            js,
            events,
            registry,
            twin,
            links,
            commands,
            nodes,
            grants,
            outbox,
            connections: OnceLock::new(),
            stats,
            local: Mutex::new(HashMap::new()),
            mirror: Mutex::new(Mirror::default()),
            liveness: Mutex::new(Liveness {
                last_ok: Instant::now(),
                ok_since: None,
            }),
            pending: AtomicUsize::new(0),
            expiring: AtomicBool::new(false),
            msg_seq: AtomicU64::new(0),
        });
        // spec §8.4: registered before anything else.
        inner
            .heartbeat()
            .await
            .map_err(|e| setup_err(format!("cannot register the node: {e}")))?;
        {
            let mut l = lock(&inner.liveness);
            l.last_ok = Instant::now();
            l.ok_since = Some(Instant::now());
        }
        let subscriber = inner
            .client
            .subscribe(inner.node_subject(inner.node(), ">"))
            .await
            .map_err(|e| setup_err(format!("cannot subscribe to the node subject: {e}")))?;
        let (ready_tx, ready_rx) = flume::bounded(1);
        tokio::spawn(inner.clone().mirror_loop(ready_tx));
        ready_rx
            .recv_async()
            .await
            .map_err(|_| setup_err("the registry could not be read".into()))?;
        tokio::spawn(inner.clone().node_loop(subscriber));
        tokio::spawn(outbox::run(inner.clone(), queue));
        tokio::spawn(inner.clone().heartbeat_loop());
        tokio::spawn(inner.clone().liveness_loop());
        tracing::info!(
            servers = %servers,
            prefix = %inner.settings.prefix,
            node = %inner.settings.node_id,
            "NATS hub connected"
        );
        Ok(inner)
    }

    /// How the hub reaches device connections; set once, after the
    /// transport started (as [`crate::hub::MemoryHub::set_connections`]).
    pub fn set_connections(&self, connections: Arc<dyn Connections>) {
        if self.inner.connections.set(connections).is_err() {
            tracing::warn!("hub connections set twice; keeping the first");
        }
    }

    /// This node's ID (the gateway's `service_id`).
    pub fn node_id(&self) -> &str {
        self.inner.node()
    }

    /// Waits until the queued changes are acknowledged (at most
    /// `request_timeout`), for shutdown and tests.
    pub fn flush(&self) -> Result<(), HubError> {
        self.inner.outbox.flush(self.inner.settings.request_timeout)
    }

    /// Runs `work` on the hub's runtime and waits for it, at most
    /// `request_timeout` (then [`HubError::Unavailable`]).
    fn call<T, F>(&self, work: F) -> Result<T, HubError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, HubError>> + Send + 'static,
    {
        let limit = self.inner.settings.request_timeout;
        let (tx, rx) = flume::bounded(1);
        self.handle.spawn(async move {
            let result = match tokio::time::timeout(limit, work).await {
                Ok(result) => result,
                Err(_) => Err(HubError::Unavailable(format!(
                    "the NATS broker did not answer within {}",
                    humantime::format_duration(limit)
                ))),
            };
            let _ = tx.send(result);
        });
        rx.recv_timeout(limit + Duration::from_millis(500))
            .unwrap_or_else(|_| {
                Err(HubError::Unavailable(
                    "the NATS hub did not answer in time".into(),
                ))
            })
    }

    fn push_all(&self, outs: Vec<Out>, limit: Option<Duration>) -> Result<(), HubError> {
        for out in outs {
            self.inner.outbox.push(out, limit)?;
        }
        Ok(())
    }

    /// Queues changes that must not be lost (the caller cannot be told):
    /// a full queue holds the caller.
    fn push_must(&self, outs: Vec<Out>) {
        if let Err(e) = self.push_all(outs, None) {
            tracing::error!("a change for the NATS broker is lost: {e}");
        }
    }

    /// Queues changes and waits until the broker acknowledged them.
    fn push_durable(&self, outs: Vec<Out>) -> Result<(), HubError> {
        let limit = self.inner.settings.request_timeout;
        self.push_all(outs, Some(limit))?;
        self.inner.outbox.flush(limit)
    }
}

impl Hub for NatsHub {
    fn grants(&self) -> Arc<dyn crate::auth::grants::GrantStore> {
        self.grants.clone()
    }

    fn add_device(&self, ctx: &AuthContext) -> Result<(), HubError> {
        let inner = self.inner.clone();
        let c = ctx.clone();
        let created = self.call(async move {
            let key = device_key(&c.device_id);
            for _ in 0..CAS_TRIES {
                if let Some((entry, _)) = inner.device_entry(&key).await? {
                    if entry.record.owner != c.owner {
                        return Err(HubError::PermissionDenied(format!(
                            "device {} belongs to another owner",
                            c.device_id
                        )));
                    }
                    return Ok(false);
                }
                let entry = DeviceEntry {
                    record: DeviceRecord {
                        device_id: c.device_id.clone(),
                        owner: c.owner.clone(),
                        status: ConnectionStatus::default(),
                        twin: super::TwinSync {
                            enabled: true,
                            ..super::TwinSync::default()
                        },
                    },
                    connection: ConnectionRef::default(),
                };
                let bytes = entry.encode().map_err(HubError::Unavailable)?;
                match inner.registry.create(Inner::dev_key(&key), bytes).await {
                    Ok(revision) => {
                        inner.mirror().put_device(&key, Some(entry), revision);
                        return Ok(true);
                    }
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(unavailable(e)),
                }
            }
            Err(HubError::Unavailable(
                "the device's registry record keeps changing".into(),
            ))
        })?;
        if created {
            let event = self.inner.event_out(
                &ctx.owner,
                &ctx.device_id,
                ctx.clone(),
                EventKind::DeviceRegistered,
            );
            self.push_durable(event.into_iter().collect())?;
        }
        Ok(())
    }

    fn owns(&self, owner: &str, device_id: &str) -> bool {
        let key = device_key(device_id);
        let known = self.inner.mirror().devices.get(&key).cloned();
        match known {
            Some((entry, _)) => entry.is_some_and(|e| e.record.owner == owner),
            None => {
                // Registered on another node a moment ago: ask the bucket.
                let inner = self.inner.clone();
                self.call(async move { inner.device_entry(&key).await })
                    .ok()
                    .flatten()
                    .is_some_and(|(e, _)| e.record.owner == owner)
            }
        }
    }

    fn delete_device(&self, owner: &str, device_id: &str) -> Result<(), HubError> {
        let inner = self.inner.clone();
        let (owner_s, key) = (owner.to_owned(), device_key(device_id));
        let removed = self.call(async move {
            let mut removed = None;
            for _ in 0..CAS_TRIES {
                let found = inner.device_entry(&key).await?;
                let Some((entry, revision)) = found.filter(|(e, _)| e.record.owner == owner_s)
                else {
                    return Err(HubError::NotFound(format!("device {key} not found")));
                };
                match inner
                    .registry
                    .delete_expect_revision(Inner::dev_key(&key), Some(revision))
                    .await
                {
                    Ok(()) => {
                        inner.mirror().put_device(&key, None, revision + 1);
                        removed = Some(entry);
                        break;
                    }
                    Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => continue,
                    Err(e) => return Err(unavailable(e)),
                }
            }
            let Some(entry) = removed else {
                return Err(HubError::Unavailable(
                    "the device's registry record keeps changing".into(),
                ));
            };
            // Its commands end (their issuers learn it), then its twin,
            // links and sync state go.
            for (ckey, command, revision) in inner.device_commands(&owner_s, &key).await? {
                if command.state.is_final() {
                    continue;
                }
                let gone = CommandEntry {
                    state: CommandState::DeviceDeleted,
                    finished_at_ns: now_ns(),
                    ..command
                };
                let _ = inner.update_command(&ckey, &gone, revision).await?;
            }
            let filter = format!("{}.{}.>", token(&owner_s), token(&key));
            for store in [&inner.twin, &inner.links] {
                store
                    .stream
                    .purge()
                    .filter(Inner::kv_subject(store, &filter))
                    .await
                    .map_err(unavailable)?;
            }
            let _ = inner.registry.purge(Inner::sync_key(&key)).await;
            inner.mirror().syncs.remove(&key);
            Ok(entry)
        })?;
        let device_id = removed.record.device_id.clone();
        let key = device_key(&device_id);
        let event = self.inner.event_out(
            owner,
            &device_id,
            owner_ctx(owner, &device_id),
            EventKind::DeviceDeleted,
        );
        // spec §4.9: the device's connection goes.
        let status = &removed.record.status;
        if status.online {
            if status.service_id == self.inner.node() {
                // The connection this node holds, if any: a session that
                // signs off marks itself offline first (spec §5.3) and its
                // OFFLINE may still be in the outbox, so the registry can
                // say online for a connection that must stay open to get
                // the sign-off's answer.
                let held = self.inner.local().remove(&key);
                if let Some(held) = held {
                    self.inner
                        .close_connection(held.connection, "device deleted");
                }
            } else {
                self.send_node(
                    &status.service_id,
                    "close",
                    NodeMsg::Close {
                        device_key: key,
                        connection: removed.connection,
                        reason: "device deleted".into(),
                    },
                );
            }
        }
        self.push_durable(event.into_iter().collect())
    }

    fn publish(&self, ctx: &AuthContext, links: Vec<StoredLink>) -> Result<(), HubError> {
        if let Some(bad) = links.iter().find(|l| l.href == "/") {
            return Err(HubError::InvalidArgument(format!(
                "invalid resource href {:?}",
                bad.href
            )));
        }
        if !self.owns(&ctx.owner, &ctx.device_id) {
            return Err(HubError::PermissionDenied(format!(
                "device {} is not registered",
                ctx.device_id
            )));
        }
        let key = device_key(&ctx.device_id);
        let mut outs = Vec::with_capacity(links.len() + 1);
        for link in &links {
            let subject = Inner::kv_subject(
                &self.inner.links,
                &Inner::item_key(&ctx.owner, &key, &link.href),
            );
            let payload = encode_link(link).map_err(HubError::InvalidArgument)?;
            outs.push(self.inner.put(subject, payload));
        }
        let hrefs: Vec<String> = links.iter().map(|l| l.href.clone()).collect();
        outs.extend(self.inner.event_out(
            &ctx.owner,
            &ctx.device_id,
            ctx.clone(),
            EventKind::LinksPublished { hrefs },
        ));
        if let Some(local) = self.inner.local().get_mut(&key) {
            for link in links {
                local.links.insert(link.href.clone(), link);
            }
        }
        self.push_durable(outs)
    }

    fn unpublish(
        &self,
        ctx: &AuthContext,
        instance_ids: &[i64],
        now_unix: u64,
    ) -> Result<Vec<String>, HubError> {
        let key = device_key(&ctx.device_id);
        let cached = self
            .inner
            .local()
            .get(&key)
            .filter(|d| d.owner == ctx.owner)
            .map(|d| d.links.values().cloned().collect::<Vec<_>>());
        let current = match cached {
            Some(links) => links,
            None => {
                let inner = self.inner.clone();
                let (owner, k) = (ctx.owner.clone(), key.clone());
                self.inner_owned(&ctx.owner, &key)?;
                self.call(async move { inner.read_links(&owner, Some(&k)).await })?
                    .remove(&key)
                    .unwrap_or_default()
            }
        };
        // Expired links are gone already; they do not count as unpublished.
        let (expired, live): (Vec<_>, Vec<_>) = current
            .into_iter()
            .partition(|l| l.valid_until.is_some_and(|t| t <= now_unix));
        let removed: Vec<String> = live
            .iter()
            .filter(|l| instance_ids.is_empty() || instance_ids.contains(&l.instance_id))
            .map(|l| l.href.clone())
            .collect();
        if removed.is_empty() {
            return Err(HubError::NotFound("no such resource links".into()));
        }
        let mut outs = Vec::new();
        for href in expired.iter().map(|l| &l.href).chain(removed.iter()) {
            let item = Inner::item_key(&ctx.owner, &key, href);
            outs.push(
                self.inner
                    .delete_out(Inner::kv_subject(&self.inner.links, &item)),
            );
        }
        // An unpublished resource leaves the twin.
        for href in &removed {
            let item = Inner::item_key(&ctx.owner, &key, href);
            outs.push(
                self.inner
                    .delete_out(Inner::kv_subject(&self.inner.twin, &item)),
            );
        }
        outs.extend(self.inner.event_out(
            &ctx.owner,
            &ctx.device_id,
            ctx.clone(),
            EventKind::LinksUnpublished {
                hrefs: removed.clone(),
            },
        ));
        if let Some(local) = self.inner.local().get_mut(&key) {
            for href in expired.iter().map(|l| &l.href).chain(removed.iter()) {
                local.links.remove(href);
                local.twin.remove(href);
            }
        }
        self.push_durable(outs)?;
        Ok(removed)
    }

    fn links(
        &self,
        owner: &str,
        device_ids: &[&str],
        resource_types: &[&str],
        now_unix: u64,
    ) -> Vec<(String, Vec<StoredLink>)> {
        let mut wanted: Vec<String> = device_ids.iter().map(|d| device_key(d)).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut found: BTreeMap<String, Vec<StoredLink>> = BTreeMap::new();
        let mut remote = Vec::new();
        {
            let local = self.inner.local();
            for key in &wanted {
                match local.get(key).filter(|d| d.owner == owner) {
                    Some(d) => {
                        found.insert(key.clone(), d.links.values().cloned().collect());
                    }
                    None => remote.push(key.clone()),
                }
            }
        }
        if wanted.is_empty() || !remote.is_empty() {
            let inner = self.inner.clone();
            let o = owner.to_owned();
            let all = wanted.is_empty();
            let read = self.call(async move {
                if all {
                    return inner.read_links(&o, None).await;
                }
                let mut out = BTreeMap::new();
                for key in remote {
                    out.append(&mut inner.read_links(&o, Some(&key)).await?);
                }
                Ok(out)
            });
            match read {
                Ok(mut more) => found.append(&mut more),
                Err(e) => tracing::warn!(owner, "links cannot be read: {e}"),
            }
        }
        let mirror = self.inner.mirror();
        let mut out: Vec<(String, Vec<StoredLink>)> = found
            .into_iter()
            .filter_map(|(key, links)| {
                // A device deleted since its links were read is gone.
                let id = match mirror.devices.get(&key) {
                    Some((Some(e), _)) if e.record.owner == owner => e.record.device_id.clone(),
                    Some(_) => return None,
                    None => links.first()?.device_id.clone(),
                };
                let links: Vec<StoredLink> = links
                    .into_iter()
                    .filter(|l| l.valid_until.is_none_or(|t| t > now_unix))
                    .filter(|l| {
                        resource_types.is_empty()
                            || resource_types.iter().any(|rt| l.has_resource_type(rt))
                    })
                    .collect();
                (!links.is_empty()).then_some((id, links))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn set_online(&self, ctx: &AuthContext, online: Online) -> Result<Replaced, HubError> {
        let inner = self.inner.clone();
        let c = ctx.clone();
        let on = online.clone();
        let (previous, entry) = self.call(async move {
            let key = device_key(&c.device_id);
            let found = inner.device_entry(&key).await?;
            if found
                .as_ref()
                .is_none_or(|(e, _)| e.record.owner != c.owner)
            {
                return Err(HubError::NotFound(format!(
                    "device {} is not registered",
                    c.device_id
                )));
            }
            // The twin and links this node will keep for the device.
            let twin = inner.read_twin(&c.owner, &key).await?;
            let links = inner
                .read_links(&c.owner, Some(&key))
                .await?
                .remove(&key)
                .unwrap_or_default();
            let mut found = found;
            for _ in 0..CAS_TRIES {
                let Some((mut entry, revision)) = found.take() else {
                    return Err(HubError::NotFound(format!(
                        "device {} is not registered",
                        c.device_id
                    )));
                };
                if entry.record.owner != c.owner {
                    return Err(HubError::NotFound(format!(
                        "device {} is not registered",
                        c.device_id
                    )));
                }
                let previous = entry
                    .record
                    .status
                    .online
                    .then(|| (entry.record.status.service_id.clone(), entry.connection));
                entry.record.status = ConnectionStatus {
                    online: true,
                    connected_at_ns: on.connected_at_ns,
                    protocol: Some(on.protocol),
                    service_id: inner.node().to_owned(),
                    connection_id: on.connection_id.clone(),
                    local_endpoints: Vec::new(),
                };
                entry.connection = on.connection;
                if inner.update_device(&key, &entry, revision).await?.is_some() {
                    let local = LocalDevice {
                        owner: c.owner.clone(),
                        device_id: entry.record.device_id.clone(),
                        connection: on.connection,
                        twin: twin
                            .into_iter()
                            .map(|state| (state.href.clone(), TwinResource { state, last: None }))
                            .collect(),
                        links: links.into_iter().map(|l| (l.href.clone(), l)).collect(),
                        twin_enabled: entry.record.twin.enabled,
                        sync: SyncEntry::default(),
                    };
                    inner.local().insert(key.clone(), local);
                    return Ok((previous, entry));
                }
                found = inner.device_entry(&key).await?;
            }
            Err(HubError::Unavailable(
                "the device's registry record keeps changing".into(),
            ))
        })?;
        self.inner.stats.sign_ins.fetch_add(1, Ordering::Relaxed);
        let key = device_key(&ctx.device_id);
        let device_id = entry.record.device_id.clone();
        // spec §6.9: a new connection starts out of sync (or disabled).
        let sync = SyncEntry {
            state: if entry.record.twin.enabled {
                TwinState::OutOfSync
            } else {
                TwinState::Disabled
            },
            ..self
                .inner
                .mirror()
                .syncs
                .get(&key)
                .map(|s| s.0)
                .unwrap_or_default()
        };
        if let Some(local) = self.inner.local().get_mut(&key) {
            local.sync = sync;
        }
        self.inner.mirror().put_sync(&key, sync, 0);
        let mut outs: Vec<Out> = self.inner.sync_out(&key, &sync).into_iter().collect();
        outs.extend(self.inner.event_out(
            &ctx.owner,
            &device_id,
            ctx.clone(),
            EventKind::Online {
                connection_id: online.connection_id.clone(),
                protocol: online.protocol,
                service_id: self.inner.node().to_owned(),
            },
        ));
        self.push_must(outs);
        // spec §14 item 13: one connection per device; the newer wins.
        let replaced = match previous {
            Some((node, older)) if node == self.inner.node() => {
                (older != online.connection).then_some(older)
            }
            Some((node, older)) => {
                self.send_node(
                    &node,
                    "close",
                    NodeMsg::Close {
                        device_key: key,
                        connection: older,
                        reason: "the device signed in on another connection".into(),
                    },
                );
                None
            }
            None => None,
        };
        if let Some(older) = replaced {
            self.inner
                .close_connection(older, "the device signed in on another connection");
        }
        Ok(Replaced(replaced))
    }

    fn set_local_endpoints(&self, device_id: &str, connection: ConnectionRef, eps: Vec<String>) {
        let key = device_key(device_id);
        let current = self
            .inner
            .local()
            .get(&key)
            .is_some_and(|d| d.connection == connection);
        if current {
            self.push_must(vec![Out::Endpoints {
                device_key: key,
                connection,
                endpoints: eps,
            }]);
        }
    }

    fn set_offline(&self, device_id: &str, connection: ConnectionRef) {
        let key = device_key(device_id);
        {
            let mut local = self.inner.local();
            if local.get(&key).is_some_and(|d| d.connection == connection) {
                local.remove(&key);
            }
        }
        self.push_must(vec![Out::Offline {
            device_key: key,
            connection,
        }]);
    }

    fn device(&self, owner: &str, device_id: &str) -> Option<DeviceRecord> {
        let key = device_key(device_id);
        let known = {
            let mirror = self.inner.mirror();
            mirror
                .devices
                .get(&key)
                .map(|(e, _)| e.as_ref().map(|e| mirror.record(&key, e)))
        };
        let record = match known {
            Some(record) => record,
            None => {
                let inner = self.inner.clone();
                let k = key.clone();
                self.call(async move { inner.device_entry(&k).await })
                    .ok()
                    .flatten()
                    .map(|(e, _)| self.inner.mirror().record(&key, &e))
            }
        };
        record.filter(|r| r.owner == owner)
    }

    fn devices(&self, owner: &str) -> Vec<DeviceRecord> {
        let mirror = self.inner.mirror();
        let mut out: Vec<DeviceRecord> = mirror
            .devices
            .iter()
            .filter_map(|(k, (e, _))| {
                e.as_ref()
                    .filter(|e| e.record.owner == owner)
                    .map(|e| mirror.record(k, e))
            })
            .collect();
        out.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        out
    }

    fn twin_enabled(&self, device_id: &str) -> bool {
        let key = device_key(device_id);
        if let Some(d) = self.inner.local().get(&key) {
            return d.twin_enabled;
        }
        match self.inner.mirror().devices.get(&key) {
            Some((Some(e), _)) => e.record.twin.enabled,
            _ => true,
        }
    }

    fn set_twin_state(&self, ctx: &AuthContext, connection: ConnectionRef, state: TwinState) {
        let key = device_key(&ctx.device_id);
        let (sync, device_id) = {
            let mut local = self.inner.local();
            let Some(d) = local
                .get_mut(&key)
                .filter(|d| d.owner == ctx.owner && d.connection == connection)
            else {
                return;
            };
            if d.sync.state == state {
                return;
            }
            d.sync.state = state;
            match state {
                TwinState::Syncing => d.sync.syncing_at_ns = now_ns(),
                TwinState::InSync => d.sync.in_sync_at_ns = now_ns(),
                _ => {}
            }
            (d.sync, d.device_id.clone())
        };
        self.inner.mirror().put_sync(&key, sync, 0);
        let mut outs: Vec<Out> = self.inner.sync_out(&key, &sync).into_iter().collect();
        outs.extend(self.inner.event_out(
            &ctx.owner,
            &device_id,
            ctx.clone(),
            EventKind::TwinStateChanged { state },
        ));
        self.push_must(outs);
    }

    fn latest_etags(&self, device_id: &str, max: usize) -> Vec<Vec<u8>> {
        let local = self.inner.local();
        let Some(device) = local.get(&device_key(device_id)) else {
            return Vec::new();
        };
        latest_etags(&device.twin, max)
    }

    fn resources_changed(
        &self,
        ctx: &AuthContext,
        connection: ConnectionRef,
        changes: Vec<ResourceChange>,
    ) -> Result<(), HubError> {
        let key = device_key(&ctx.device_id);
        let at = now_ns();
        self.inner
            .stats
            .notifications
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        let mut outs = Vec::new();
        {
            let mut local = self.inner.local();
            let device = local
                .get_mut(&key)
                .filter(|d| d.owner == ctx.owner)
                .ok_or_else(|| {
                    HubError::PermissionDenied(
                        "the device is not online on this node's connection".into(),
                    )
                })?;
            if device.connection != connection {
                return Err(HubError::PermissionDenied(
                    "the device is online on another connection".into(),
                ));
            }
            for change in changes {
                let href = change.href.clone();
                let kept = apply_change(&mut device.twin, connection, change, at);
                if !kept {
                    continue;
                }
                self.inner
                    .stats
                    .twin_updates
                    .fetch_add(1, Ordering::Relaxed);
                let Some(r) = device.twin.get(&href).map(|r| &r.state) else {
                    continue;
                };
                let item = Inner::item_key(&ctx.owner, &key, &r.href);
                match encode_resource(r) {
                    Ok(payload) => outs.push(
                        self.inner
                            .put(Inner::kv_subject(&self.inner.twin, &item), payload),
                    ),
                    Err(e) => {
                        tracing::error!(href = %r.href, "a twin value cannot be encoded: {e}")
                    }
                }
                outs.extend(self.inner.event_out(
                    &ctx.owner,
                    &device.device_id,
                    ctx.clone(),
                    EventKind::ResourceChanged {
                        href: r.href.clone(),
                        status: r.status,
                        content: r.content.clone(),
                        etag: r.etag.clone(),
                        version: r.version,
                    },
                ));
            }
        }
        // Backpressure: a full queue holds the shard up to the request
        // timeout; past it the session closes the connection and the
        // device resyncs later (spec §6.7), so nothing is silently lost.
        let limit = self.inner.settings.request_timeout;
        self.push_all(outs, Some(limit))
    }

    fn take_pending_commands(
        &self,
        ctx: &AuthContext,
        connection: ConnectionRef,
        now_ns: u64,
    ) -> Vec<Command> {
        let key = device_key(&ctx.device_id);
        let published: Option<HashSet<String>> = self
            .inner
            .local()
            .get(&key)
            .filter(|d| d.owner == ctx.owner && d.connection == connection)
            .map(|d| d.links.keys().cloned().collect());
        let Some(published) = published else {
            return Vec::new();
        };
        let inner = self.inner.clone();
        let c = ctx.clone();
        let taken = self.call(async move {
            let mut taken = Vec::new();
            for (ckey, entry, revision) in inner.device_commands(&c.owner, &key).await? {
                if entry.state != CommandState::Pending {
                    continue;
                }
                if entry.command.expired(now_ns) {
                    inner
                        .expire_command(&ckey, entry, revision, now_ns, c.clone())
                        .await?;
                } else if entry.command.href == "/plgd/s" || published.contains(&entry.command.href)
                {
                    let dispatched = CommandEntry {
                        state: CommandState::Dispatched {
                            node: inner.node().to_owned(),
                            connection,
                        },
                        ..entry
                    };
                    if inner
                        .update_command(&ckey, &dispatched, revision)
                        .await?
                        .is_some()
                    {
                        taken.push(dispatched.command);
                    }
                }
            }
            Ok(taken)
        });
        match taken {
            Ok(taken) => taken,
            Err(e) => {
                // Those dispatched before the failure go back with the
                // connection's OFFLINE (or the device's next sign-in).
                tracing::error!(device_id = %ctx.device_id, "pending commands stay pending: {e}");
                Vec::new()
            }
        }
    }

    fn command_result(&self, ctx: &AuthContext, connection: ConnectionRef, result: CommandResult) {
        self.push_must(vec![Out::Answer {
            ctx: ctx.clone(),
            connection,
            result,
        }]);
    }

    fn return_commands(
        &self,
        device_id: &str,
        connection: ConnectionRef,
        correlation_ids: &[String],
    ) {
        if correlation_ids.is_empty() {
            return;
        }
        self.push_must(vec![Out::Return {
            device_key: device_key(device_id),
            connection,
            correlation_ids: correlation_ids.to_vec(),
        }]);
    }

    fn resources(&self, owner: &str, device_id: &str) -> Result<Vec<ResourceState>, HubError> {
        let key = device_key(device_id);
        let inner = self.inner.clone();
        let o = owner.to_owned();
        self.call(async move {
            inner.owned_entry(&o, &key).await?;
            inner.read_twin(&o, &key).await
        })
    }

    fn resource(
        &self,
        owner: &str,
        device_id: &str,
        href: &str,
    ) -> Result<ResourceState, HubError> {
        let key = device_key(device_id);
        let inner = self.inner.clone();
        let (o, h, id) = (owner.to_owned(), href.to_owned(), device_id.to_owned());
        self.call(async move {
            inner.owned_entry(&o, &key).await?;
            let item = Inner::item_key(&o, &key, &h);
            if let Some((bytes, _)) = Inner::entry(&inner.twin, &item).await? {
                return decode_resource(&bytes).map_err(HubError::Unavailable);
            }
            if Inner::entry(&inner.links, &item).await?.is_some() {
                Err(HubError::Unavailable(format!(
                    "resource {h} of device {id} has no value yet"
                )))
            } else {
                Err(HubError::NotFound(format!(
                    "resource {h} of device {id} not found"
                )))
            }
        })
    }

    fn submit_command(&self, owner: &str, command: Command) -> Result<CommandTicket, HubError> {
        let (tx, rx) = flume::bounded(1);
        let correlation_id = command.correlation_id.clone();
        let inner = self.inner.clone();
        let o = owner.to_owned();
        let (command, target, ckey) = self.call(async move {
            let mut command = command;
            let key = device_key(&command.device_id);
            let entry = inner
                .device_entry(&key)
                .await?
                .map(|(e, _)| e)
                .filter(|e| e.record.owner == o)
                .ok_or_else(|| {
                    HubError::NotFound(format!("device {} not found", command.device_id))
                })?;
            command.device_id.clone_from(&entry.record.device_id);
            command.issued_at_ns = now_ns();
            let ckey = Inner::item_key(&o, &key, &command.correlation_id);
            let pending = CommandEntry {
                owner: o.clone(),
                order: command.issued_at_ns,
                command: command.clone(),
                state: CommandState::Pending,
                finished_at_ns: 0,
            };
            let bytes = pending.encode().map_err(HubError::InvalidArgument)?;
            let in_use = || {
                HubError::InvalidArgument(format!(
                    "correlation ID {} is in use",
                    command.correlation_id
                ))
            };
            match inner.commands.create(&ckey, bytes.clone()).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    // An ended command's key may be reused.
                    match inner.command_entry(&ckey).await? {
                        Some((old, revision)) if old.state.is_final() => {
                            if inner.commands.update(&ckey, bytes, revision).await.is_err() {
                                return Err(in_use());
                            }
                        }
                        _ => return Err(in_use()),
                    }
                }
                Err(e) => return Err(unavailable(e)),
            }
            let status = &entry.record.status;
            let target = status
                .online
                .then(|| (status.service_id.clone(), entry.connection));
            Ok((command, target, ckey))
        })?;
        self.inner
            .stats
            .commands_submitted
            .fetch_add(1, Ordering::Relaxed);
        let kind = EventKind::CommandPending {
            correlation_id: command.correlation_id.clone(),
            href: command.href.clone(),
            operation: command.kind.operation(),
            valid_until_ns: command.valid_until_ns,
        };
        let event = self.inner.event_out(
            owner,
            &command.device_id,
            owner_ctx(owner, &command.device_id),
            kind,
        );
        self.handle
            .spawn(self.inner.clone().watch_outcome(ckey, tx));
        // The command is stored; its event goes with the queue.
        self.push_must(event.into_iter().collect());
        let key = device_key(&command.device_id);
        let sent = match target {
            None => false,
            Some((node, connection)) if node == self.inner.node() => {
                let inner = self.inner.clone();
                let (o, k, c) = (owner.to_owned(), key, correlation_id.clone());
                self.call(async move { Ok(inner.dispatch_here(&o, &k, &c, connection).await) })
                    .unwrap_or(false)
            }
            Some((node, connection)) => {
                let wake = NodeMsg::Wake {
                    owner: owner.to_owned(),
                    device_key: key,
                    correlation_id: correlation_id.clone(),
                    connection,
                };
                let inner = self.inner.clone();
                let subject = self.inner.node_subject(&node, "wake");
                self.call(async move {
                    let payload = wake.encode().map_err(HubError::InvalidArgument)?;
                    let answer = inner
                        .client
                        .request(subject, payload)
                        .await
                        .map_err(unavailable)?;
                    Ok(answer.payload.as_ref() == b"1")
                })
                .unwrap_or_else(|e| {
                    tracing::debug!(%node, "the device's node did not take the command: {e}");
                    false
                })
            }
        };
        Ok(CommandTicket {
            correlation_id,
            pending: !sent,
            outcome: rx,
        })
    }

    fn pending_commands(&self, owner: &str, device_id: &str) -> Result<Vec<Command>, HubError> {
        let key = device_key(device_id);
        let inner = self.inner.clone();
        let o = owner.to_owned();
        self.call(async move {
            inner.owned_entry(&o, &key).await?;
            Ok(inner
                .device_commands(&o, &key)
                .await?
                .into_iter()
                .filter(|(_, e, _)| !e.state.is_final())
                .map(|(_, e, _)| e.command)
                .collect())
        })
    }

    fn cancel_command(
        &self,
        owner: &str,
        device_id: &str,
        correlation_id: &str,
    ) -> Result<(), HubError> {
        let key = device_key(device_id);
        let inner = self.inner.clone();
        let (o, cid) = (owner.to_owned(), correlation_id.to_owned());
        let canceled = self.call(async move {
            inner.owned_entry(&o, &key).await?;
            let ckey = Inner::item_key(&o, &key, &cid);
            for _ in 0..CAS_TRIES {
                let found = inner.command_entry(&ckey).await?;
                let Some((entry, revision)) = found.filter(|(e, _)| !e.state.is_final()) else {
                    return Err(HubError::NotFound(format!("no pending command {cid}")));
                };
                if entry.state != CommandState::Pending {
                    return Err(HubError::InvalidArgument(format!(
                        "command {cid} was sent to the device already"
                    )));
                }
                let canceled = CommandEntry {
                    state: CommandState::Canceled,
                    finished_at_ns: now_ns(),
                    ..entry
                };
                if inner
                    .update_command(&ckey, &canceled, revision)
                    .await?
                    .is_some()
                {
                    return Ok(canceled.command);
                }
            }
            Err(HubError::Unavailable(
                "the command record keeps changing".into(),
            ))
        })?;
        self.inner
            .stats
            .commands_canceled
            .fetch_add(1, Ordering::Relaxed);
        let kind = EventKind::CommandCanceled {
            correlation_id: correlation_id.to_owned(),
            href: canceled.href.clone(),
            operation: canceled.kind.operation(),
        };
        let event = self.inner.event_out(
            owner,
            &canceled.device_id,
            owner_ctx(owner, &canceled.device_id),
            kind,
        );
        self.push_durable(event.into_iter().collect())
    }

    fn set_twin_enabled(
        &self,
        owner: &str,
        device_id: &str,
        enabled: bool,
        force: bool,
    ) -> Result<(), HubError> {
        let key = device_key(device_id);
        let inner = self.inner.clone();
        let (o, k) = (owner.to_owned(), key.clone());
        let (entry, changed) = self.call(async move {
            for _ in 0..CAS_TRIES {
                let found = inner.device_entry(&k).await?;
                let Some((mut entry, revision)) = found.filter(|(e, _)| e.record.owner == o) else {
                    return Err(HubError::NotFound(format!("device {k} not found")));
                };
                if entry.record.twin.enabled == enabled {
                    return Ok((entry, false));
                }
                entry.record.twin.enabled = enabled;
                if inner.update_device(&k, &entry, revision).await?.is_some() {
                    return Ok((entry, true));
                }
            }
            Err(HubError::Unavailable(
                "the device's registry record keeps changing".into(),
            ))
        })?;
        let id = entry.record.device_id.clone();
        let mut outs = Vec::new();
        if changed || force {
            let mut sync = self
                .inner
                .mirror()
                .syncs
                .get(&key)
                .map(|s| s.0)
                .unwrap_or_default();
            sync.state = if enabled {
                TwinState::OutOfSync
            } else {
                TwinState::Disabled
            };
            self.inner.mirror().put_sync(&key, sync, 0);
            outs.extend(self.inner.sync_out(&key, &sync));
        }
        if changed {
            outs.extend(self.inner.event_out(
                owner,
                &id,
                owner_ctx(owner, &id),
                EventKind::TwinEnabledChanged { enabled },
            ));
        }
        // Durable before the session acts on it.
        self.push_durable(outs)?;
        let status = &entry.record.status;
        if status.online && (changed || force) {
            if status.service_id == self.inner.node() {
                self.inner.twin_here(&key, entry.connection, enabled, force);
            } else {
                self.send_node(
                    &status.service_id,
                    "twin",
                    NodeMsg::Twin {
                        device_key: key,
                        connection: entry.connection,
                        enabled,
                        force,
                    },
                );
            }
        }
        Ok(())
    }

    fn expire_commands(&self, now_ns: u64) {
        if self.inner.expiring.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.inner.clone();
        let limit = self.inner.settings.request_timeout;
        // Called from the control plane's own runtime: never waits here.
        self.handle.spawn(async move {
            match tokio::time::timeout(limit * 4, inner.expire_pass(now_ns)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("command expiry: {e}"),
                Err(_) => tracing::debug!("command expiry: the broker is slow"),
            }
            inner.expiring.store(false, Ordering::Release);
        });
    }

    fn subscribe(&self, owner: &str) -> flume::Receiver<Arc<Event>> {
        let (tx, rx) = flume::bounded(SUBSCRIBER_QUEUE);
        let (ready_tx, ready_rx) = flume::bounded(1);
        let inner = self.inner.clone();
        let filter = format!("{}.events.{}.>", self.inner.prefix(), token(owner));
        let owner = owner.to_owned();
        self.handle.spawn(async move {
            let created = inner
                .events
                .create_consumer(consumer::push::OrderedConfig {
                    deliver_subject: inner.client.new_inbox(),
                    filter_subject: filter,
                    deliver_policy: consumer::DeliverPolicy::New,
                    replay_policy: consumer::ReplayPolicy::Instant,
                    ..Default::default()
                })
                .await;
            let mut messages = match created {
                Ok(c) => match c.messages().await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(owner, "cannot subscribe to events: {e}");
                        return;
                    }
                },
                Err(e) => {
                    tracing::warn!(owner, "cannot subscribe to events: {e}");
                    return;
                }
            };
            let _ = ready_tx.send(());
            loop {
                let next = tokio::time::timeout(Duration::from_secs(1), messages.next()).await;
                let message = match next {
                    Err(_) if tx.is_disconnected() => return,
                    Err(_) => continue,
                    Ok(Some(Ok(m))) => m,
                    Ok(Some(Err(e))) => {
                        tracing::debug!(owner, "an event subscription failed: {e}");
                        continue;
                    }
                    Ok(None) => return,
                };
                let Ok(seq) = message.info().map(|i| i.stream_sequence) else {
                    continue;
                };
                for event in decode_events(&message.payload, seq) {
                    let event = match event {
                        Ok(e) => Arc::new(e),
                        Err(e) => {
                            tracing::warn!(seq, "skipping an unreadable event: {e}");
                            continue;
                        }
                    };
                    match tx.try_send(event) {
                        Ok(()) => {}
                        Err(flume::TrySendError::Full(_)) => {
                            tracing::warn!(owner, "dropping an event subscriber that fell behind");
                            return;
                        }
                        Err(flume::TrySendError::Disconnected(_)) => return,
                    }
                }
            }
        });
        // "From now on": the consumer exists before this returns. Without
        // the broker the receiver is disconnected at once.
        let _ = ready_rx.recv_timeout(self.inner.settings.request_timeout);
        rx
    }

    fn events_after(&self, owner: &str, after: u64, limit: usize) -> Result<Vec<Event>, HubError> {
        // What this node emitted before the call belongs to the answer.
        self.flush()?;
        let inner = self.inner.clone();
        let filter = format!("{}.events.{}.>", self.inner.prefix(), token(owner));
        self.call(async move {
            let records = inner
                .read_stream(
                    &inner.events,
                    filter,
                    // The message that holds `after` may hold later
                    // events too (a group, records::SEQ_SHIFT).
                    consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: stream_seq_of(after).max(1),
                    },
                    limit.saturating_add(1),
                )
                .await?;
            Ok(records
                .into_iter()
                .flat_map(|r| decode_events(&r.payload, r.seq))
                .filter_map(|e| match e {
                    Ok(e) => Some(e),
                    Err(e) => {
                        tracing::warn!("skipping an unreadable event: {e}");
                        None
                    }
                })
                .filter(|e| e.seq > after)
                .take(limit)
                .collect())
        })
    }

    fn stats(&self) -> &HubStats {
        &self.inner.stats
    }

    fn pending_depth(&self) -> usize {
        self.inner.pending.load(Ordering::Relaxed)
    }

    fn available(&self) -> bool {
        self.inner.client.connection_state() == async_nats::connection::State::Connected
    }
}

impl NatsHub {
    /// Sends `msg` to another node (core NATS, not awaited for an answer).
    fn send_node(&self, node: &str, what: &str, msg: NodeMsg) {
        let subject = self.inner.node_subject(node, what);
        let inner = self.inner.clone();
        self.handle.spawn(async move {
            let payload = match msg.encode() {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!("a node message cannot be encoded: {e}");
                    return;
                }
            };
            if let Err(e) = inner.client.publish(subject, payload).await {
                tracing::warn!("cannot reach another node: {e}");
            }
        });
    }

    /// NotFound unless `owner` has the device (mirror, else bucket).
    fn inner_owned(&self, owner: &str, key: &str) -> Result<(), HubError> {
        let inner = self.inner.clone();
        let (o, k) = (owner.to_owned(), key.to_owned());
        self.call(async move { inner.owned_entry(&o, &k).await.map(|_| ()) })
    }
}
