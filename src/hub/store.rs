//! The embedded hub's disk (ARCHITECTURE.md: "embedded (default:
//! in-process, redb on disk)"): every change [`super::MemoryHub`] makes
//! in memory is also a small record, written to one redb file by a
//! persister thread in group commits (one write transaction for the
//! records of a few milliseconds). Records are encoded with rkyv and read
//! back zero-copy on open.
//!
//! Memory stays the source of reads; the file is what a restart loads.
//! Callers that report a change to a user wait for the commit that holds
//! it ([`Store::wait`]); device-side changes do not (a crash loses at most
//! the last commit interval of them, and the device resyncs its twin on
//! its next sign-in, spec §6.5).
//!
//! A group commit is durable once its frame is in the write-ahead log
//! ([`super::wal`], `<data_dir>/hub.wal`); its rows then go to redb in a
//! non-durable transaction, and a durable redb commit (a checkpoint)
//! follows every [`StoreSettings::checkpoint_interval`], when the log is
//! full, when the persister is idle, and at close. Opening replays the
//! frames written after the last checkpoint.
//!
//! The persister is the IO side: it times its group commits with the
//! monotonic clock.
#![allow(clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use rkyv::rancor;
use rkyv::util::AlignedVec;

use super::stats::{HubStats, STATUSES};
use super::twin::{Content, Operation, ResourceState, Status, TwinState, TwinSync};
use super::wal::Wal;
use super::{
    AuthContext, Command, CommandKind, CommandOutcome, ConnectionStatus, DeviceRecord, Event,
    EventKind, HubError, Protocol, StoredLink,
};
use crate::auth::grants::{GrantRecord, TokenHash};
use crate::ocf::rd::Policy;

/// The file in the data directory.
pub const FILE_NAME: &str = "hub.redb";
/// The write-ahead log next to it.
pub const WAL_FILE_NAME: &str = "hub.wal";
/// The log's size at most: a group commit that would not fit is a
/// checkpoint instead. Also what opening reads at most.
const WAL_LIMIT: u64 = 32 << 20;

/// Bumped when a record's layout changes: an older file is refused rather
/// than misread.
const FORMAT: u64 = 1;
/// Batches (one per hub call) that may wait for the persister before a
/// caller is held (spec: bounded queues, a metric when full).
const QUEUE_BATCHES: usize = 16_384;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Device key → [`DeviceRec`].
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// (device key, href) → [`LinkRec`].
const LINKS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("links");
/// (device key, href) → [`ResourceRec`].
const RESOURCES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("resources");
/// (device key, correlation ID) → [`CommandRec`].
const COMMANDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("commands");
/// Event seq → [`EventRec`].
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// SHA-256 of a refresh token → [`super::grants::GrantRec`] (issue 13).
const GRANTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("grants");
/// (device key, grant hash) → (): the grants of a device, for sign-off.
const GRANT_DEVICES: TableDefinition<(&str, &[u8]), ()> = TableDefinition::new("grant_devices");
/// A redeemed sign-up code's `jti` → its expiry (Unix seconds).
const USED_CODES: TableDefinition<&str, u64> = TableDefinition::new("used_codes");

/// How long an API caller waits for its commit before it is told the hub
/// is unavailable (a stuck disk must not hang the API for ever).
const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// Failed commit ranges remembered for waiters that have not looked yet.
const FAILED_KEPT: usize = 1024;

/// `[hub]` settings of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSettings {
    /// Events kept in the log; older ones are pruned.
    pub event_retention: u64,
    /// How long the persister collects records before it commits them.
    pub commit_interval: Duration,
    /// A commit holds at most this many of the hub's call batches.
    pub max_batch: usize,
    /// Time between durable redb commits (checkpoints) while changes
    /// keep coming; in between, the write-ahead log holds them. Each costs
    /// a few milliseconds of writes, so not every group commit.
    pub checkpoint_interval: Duration,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            event_retention: 100_000,
            commit_interval: Duration::from_millis(2),
            max_batch: 4096,
            checkpoint_interval: Duration::from_secs(5),
        }
    }
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data directory {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the hub store {} is already in use by another gateway process", path.display())]
    InUse { path: PathBuf },
    #[error("cannot open the hub store {}: {message}", path.display())]
    Open { path: PathBuf, message: String },
    #[error("the hub store {} cannot be read: {message}", path.display())]
    Corrupt { path: PathBuf, message: String },
    #[error("the hub store {} could not record the restart: {message}", path.display())]
    Commit { path: PathBuf, message: String },
}

/// One change to persist, in the order the hub made it.
pub(crate) enum Op {
    PutDevice {
        key: String,
        device: DeviceRecord,
    },
    /// The device with its links, twin and commands.
    DeleteDevice {
        key: String,
    },
    PutLink {
        key: String,
        link: StoredLink,
    },
    DeleteLink {
        key: String,
        href: String,
    },
    PutResource {
        key: String,
        state: ResourceState,
    },
    DeleteResource {
        key: String,
        href: String,
    },
    PutCommand {
        key: String,
        order: u64,
        /// Handed to a connection (dispatched), not only pending.
        sent: bool,
        command: Command,
    },
    DeleteCommand {
        key: String,
        correlation_id: String,
    },
    Event(Arc<Event>),
    /// A command's outcome, handed to its issuer once the records before
    /// it are committed (so an answer the API reports is durable).
    Notify(flume::Sender<CommandOutcome>, CommandOutcome),
    /// A refresh grant (issue 13), indexed by its device when it has one.
    PutGrant {
        hash: TokenHash,
        device_key: Option<String>,
        record: GrantRecord,
    },
    RemoveGrant {
        hash: TokenHash,
        device_key: Option<String>,
    },
    /// A redeemed sign-up code, kept until it expires.
    PutCode {
        id: String,
        expires_at: u64,
    },
    RemoveCode {
        id: String,
    },
    /// Called once the records before it are durable AND readable from
    /// redb (after the group commit's redb transaction); dropped, never
    /// called, when the commit failed.
    Call(Box<dyn FnOnce() + Send>),
}

impl Op {
    /// Whether the op writes to the file (a notification does not).
    fn is_record(&self) -> bool {
        !matches!(self, Op::Notify(..) | Op::Call(..))
    }
}

enum Msg {
    Batch {
        seq: u64,
        ops: Vec<Op>,
        /// A caller waits: commit without collecting for the interval.
        urgent: bool,
    },
    /// Records of no hub call (the grant store's, issue 13): no seq, no
    /// waiter by seq; their [`Op::Call`]s say when they are done.
    Side(Vec<Op>),
    /// Commit what came before, then stop.
    Stop,
    /// Stop without committing (see [`Store::abandon`]).
    Abandon,
}

/// Where the hub queues records: the producer side of the persister,
/// kept in the hub's state so that records go out in the order of the
/// changes (under the state lock).
pub(crate) struct Journal {
    ops: Vec<Op>,
    tx: flume::Sender<Msg>,
    stats: Arc<HubStats>,
    /// The seq of the last batch sent.
    seq: u64,
    urgent: bool,
}

impl Journal {
    pub(crate) fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Marks the current batch as one a caller will wait for.
    pub(crate) fn urgent(&mut self) {
        self.urgent = true;
    }

    /// Sends the records collected so far to the persister and returns
    /// the seq to wait for: the last batch's when nothing new was
    /// recorded.
    pub(crate) fn seal(&mut self) -> u64 {
        // An awaited seal with nothing new still goes out: it makes the
        // persister commit what it collected so far.
        if !self.ops.is_empty() || self.urgent {
            self.seq += 1;
            let ops = std::mem::take(&mut self.ops);
            let msg = Msg::Batch {
                seq: self.seq,
                ops,
                urgent: self.urgent,
            };
            // A full queue (the disk is behind) holds the caller, and with
            // it the shard: backpressure, counted, never a dropped change.
            let sent = match self.tx.try_send(msg) {
                Ok(()) => Ok(()),
                Err(flume::TrySendError::Full(msg)) => {
                    self.stats.store_queue_full.fetch_add(1, Ordering::Relaxed);
                    self.tx.send(msg).map_err(|_| ())
                }
                Err(flume::TrySendError::Disconnected(_)) => Err(()),
            };
            if sent.is_err() {
                // The persister stopped (closed store): waiters learn it
                // from the progress's `stopped`.
                tracing::error!("the hub store is closed; a change was not recorded");
            }
        }
        self.urgent = false;
        self.seq
    }
}

fn side_ops(msg: Msg) -> Vec<Op> {
    match msg {
        Msg::Side(ops) => ops,
        _ => Vec::new(),
    }
}

/// See [`Store::side`].
pub(crate) struct Side {
    tx: flume::Sender<Msg>,
    db: std::sync::Weak<Database>,
    stats: Arc<HubStats>,
}

impl Side {
    /// Queues records (and their [`Op::Call`]s) for the next group commit
    /// without waiting: a full queue or a stopped store hands them back
    /// (the caller answers unavailable; a shard is never held).
    pub(crate) fn send(&self, ops: Vec<Op>) -> Result<(), (String, Vec<Op>)> {
        match self.tx.try_send(Msg::Side(ops)) {
            Ok(()) => Ok(()),
            Err(flume::TrySendError::Full(msg)) => {
                self.stats.store_queue_full.fetch_add(1, Ordering::Relaxed);
                Err(("the hub store is behind".into(), side_ops(msg)))
            }
            Err(flume::TrySendError::Disconnected(msg)) => {
                Err(("the hub store is closed".into(), side_ops(msg)))
            }
        }
    }

    fn db(&self) -> Result<Arc<Database>, String> {
        self.db
            .upgrade()
            .ok_or_else(|| "the hub store is closed".to_owned())
    }

    /// The grant under `hash`, as redb holds it.
    pub(crate) fn grant(&self, hash: &TokenHash) -> Result<Option<GrantRecord>, String> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(err("begin"))?;
        let table = txn.open_table(GRANTS).map_err(err("grants"))?;
        let value = table.get(hash.as_slice()).map_err(err("grants"))?;
        value
            .map(|v| super::grants::decode_grant(v.value()))
            .transpose()
    }

    /// A used code's expiry.
    pub(crate) fn code(&self, id: &str) -> Result<Option<u64>, String> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(err("begin"))?;
        let table = txn.open_table(USED_CODES).map_err(err("used_codes"))?;
        let value = table.get(id).map_err(err("used_codes"))?;
        Ok(value.map(|v| v.value()))
    }

    /// The hashes of a device's grants.
    pub(crate) fn device_grants(&self, device_key: &str) -> Result<Vec<TokenHash>, String> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(err("begin"))?;
        let table = txn
            .open_table(GRANT_DEVICES)
            .map_err(err("grant_devices"))?;
        let mut out = Vec::new();
        let from: &[u8] = &[];
        for row in table
            .range((device_key, from)..)
            .map_err(err("grant_devices"))?
        {
            let (k, _) = row.map_err(err("grant_devices"))?;
            let (device, hash) = k.value();
            if device != device_key {
                break;
            }
            if let Ok(hash) = TokenHash::try_from(hash) {
                out.push(hash);
            }
        }
        Ok(out)
    }

    /// Grants (hash, device key) and used codes that expired by `now`.
    #[allow(clippy::type_complexity)]
    pub(crate) fn expired(
        &self,
        now: u64,
    ) -> Result<(Vec<(TokenHash, Option<String>)>, Vec<String>), String> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(err("begin"))?;
        let table = txn.open_table(GRANTS).map_err(err("grants"))?;
        let mut grants = Vec::new();
        for row in table.iter().map_err(err("grants"))? {
            let (k, v) = row.map_err(err("grants"))?;
            let Ok(hash) = TokenHash::try_from(k.value()) else {
                continue;
            };
            match super::grants::decode_grant(v.value()) {
                Ok(g) if g.expires_at > now => {}
                Ok(g) => grants.push((hash, g.device_id.as_deref().map(super::grants::device_key))),
                // An undecodable grant is no grant: dropped.
                Err(_) => grants.push((hash, None)),
            }
        }
        let table = txn.open_table(USED_CODES).map_err(err("used_codes"))?;
        let mut codes = Vec::new();
        for row in table.iter().map_err(err("used_codes"))? {
            let (k, v) = row.map_err(err("used_codes"))?;
            if v.value() < now {
                codes.push(k.value().to_owned());
            }
        }
        Ok((grants, codes))
    }
}

#[derive(Default)]
struct Progress {
    /// Every batch up to this seq was committed or failed.
    done: u64,
    /// Seq ranges (inclusive) whose commit failed.
    failed: VecDeque<(u64, u64)>,
    /// The persister is gone.
    stopped: bool,
}

struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
    abandoned: AtomicBool,
    stats: Arc<HubStats>,
}

impl Shared {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The open store: the persister thread and what waiters need.
pub(crate) struct Store {
    /// Shared with the persister, for reading the event log; taken on
    /// close, so that the file is free once the store is closed.
    db: Mutex<Option<Arc<Database>>>,
    tx: flume::Sender<Msg>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// What a file held.
#[derive(Default)]
pub(crate) struct Loaded {
    pub devices: Vec<(String, DeviceRecord)>,
    pub links: Vec<(String, StoredLink)>,
    pub resources: Vec<(String, ResourceState)>,
    /// (device key, order, sent, command).
    pub commands: Vec<(String, u64, bool, Command)>,
    /// The last event's seq (0 with none).
    pub last_event: u64,
}

impl Store {
    /// Opens (or creates) `<dir>/hub.redb`, reads it whole and starts the
    /// persister.
    pub(crate) fn open(
        dir: &Path,
        settings: StoreSettings,
        stats: Arc<HubStats>,
    ) -> Result<(Store, Journal, Loaded), StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse { path: path.clone() },
            e => StoreError::Open {
                path: path.clone(),
                message: e.to_string(),
            },
        })?;
        let corrupt = |message: String| StoreError::Corrupt {
            path: path.clone(),
            message,
        };
        init(&db).map_err(corrupt)?;
        let gen = wal_gen(&db).map_err(corrupt)?;
        let wal_path = dir.join(WAL_FILE_NAME);
        let (mut wal, frames) =
            Wal::open(&wal_path, gen, WAL_LIMIT).map_err(|e| StoreError::Open {
                path: wal_path.clone(),
                message: e.to_string(),
            })?;
        // Always a new generation, in a durable commit with the replayed
        // rows: whatever the log file holds is stale from here on.
        let first_event = first_event(&db).map_err(corrupt)?;
        let first_event = replay(&db, &frames, gen + 1, first_event, settings.event_retention)
            .map_err(|message| StoreError::Corrupt {
                path: wal_path.clone(),
                message,
            })?;
        wal.reset(gen + 1);
        if !frames.is_empty() {
            tracing::info!(
                path = %wal_path.display(),
                group_commits = frames.len(),
                "replayed the hub's write-ahead log"
            );
        }
        let loaded = load(&db).map_err(corrupt)?;
        let (tx, rx) = flume::bounded(QUEUE_BATCHES);
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress::default()),
            changed: Condvar::new(),
            abandoned: AtomicBool::new(false),
            stats,
        });
        let db = Arc::new(db);
        let persister = Persister {
            db: db.clone(),
            rx,
            shared: shared.clone(),
            settings,
            first_event,
            wal,
            gen: gen + 1,
            checkpointed: Instant::now(),
            dirty: false,
            broken: false,
        };
        let thread = std::thread::Builder::new()
            .name("hub-store".into())
            .spawn(move || persister.run())
            .map_err(|e| StoreError::Open {
                path: path.clone(),
                message: format!("cannot start the persister thread: {e}"),
            })?;
        let journal = Journal {
            ops: Vec::new(),
            tx: tx.clone(),
            stats: shared.stats.clone(),
            seq: 0,
            urgent: false,
        };
        Ok((
            Store {
                db: Mutex::new(Some(db)),
                tx,
                shared,
                thread: Mutex::new(Some(thread)),
                path,
            },
            journal,
            loaded,
        ))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The grant store's way in (issue 13): records without a seq, and
    /// reads of what redb holds. Holds the file only weakly, so that a
    /// closed store frees it.
    pub(crate) fn side(&self) -> Side {
        let db = self
            .db
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .map(Arc::downgrade)
            .unwrap_or_default();
        Side {
            tx: self.tx.clone(),
            db,
            stats: self.shared.stats.clone(),
        }
    }

    /// The event log of `owner` after `after`, oldest first, at most
    /// `limit` (committed events only).
    pub(crate) fn events_after(
        &self,
        owner: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Event>, HubError> {
        let db = self
            .db
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .ok_or_else(|| HubError::Unavailable("the hub store is closed".into()))?;
        read_events(&db, owner, after, limit).map_err(|e| {
            tracing::error!("cannot read the hub's event log: {e}");
            HubError::Unavailable("the hub's event log cannot be read".into())
        })
    }

    /// Waits until the batch `seq` (and every one before it) is committed.
    /// A failed commit, a stopped store or a commit that takes longer than
    /// [`WAIT_LIMIT`] is [`HubError::Unavailable`].
    pub(crate) fn wait(&self, seq: u64) -> Result<(), HubError> {
        let deadline = Instant::now() + WAIT_LIMIT;
        let mut progress = self.shared.progress();
        while progress.done < seq {
            if progress.stopped {
                return Err(HubError::Unavailable("the hub store is closed".into()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HubError::Unavailable(
                    "the hub store did not commit in time".into(),
                ));
            }
            progress = self
                .shared
                .changed
                .wait_timeout(progress, left)
                .map_or_else(|p| p.into_inner().0, |(g, _)| g);
        }
        if progress
            .failed
            .iter()
            .any(|(from, to)| (*from..=*to).contains(&seq))
        {
            return Err(HubError::Unavailable(
                "the hub store could not record the change".into(),
            ));
        }
        Ok(())
    }

    /// Commits everything queued, then stops the persister. Later changes
    /// are not recorded (waiters get [`HubError::Unavailable`]).
    pub(crate) fn close(&self) {
        let _ = self.tx.send(Msg::Stop);
        self.join();
    }

    /// Stops the persister as a killed process would: records not yet
    /// committed are lost. For crash tests.
    pub(crate) fn abandon(&self) {
        self.shared.abandoned.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Msg::Abandon);
        self.join();
    }

    fn join(&self) {
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("the hub store's persister panicked");
            }
        }
        self.db
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

fn err<E: Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

fn init(db: &Database) -> Result<(), String> {
    let txn = db.begin_write().map_err(err("begin"))?;
    {
        let mut meta = txn.open_table(META).map_err(err("meta"))?;
        let format = meta.get("format").map_err(err("meta"))?.map(|v| v.value());
        match format {
            None => {
                meta.insert("format", FORMAT).map_err(err("meta"))?;
            }
            Some(FORMAT) => {}
            Some(other) => {
                return Err(format!(
                    "record format {other}, this build reads format {FORMAT}"
                ))
            }
        }
        txn.open_table(DEVICES).map_err(err("devices"))?;
        txn.open_table(LINKS).map_err(err("links"))?;
        txn.open_table(RESOURCES).map_err(err("resources"))?;
        txn.open_table(COMMANDS).map_err(err("commands"))?;
        txn.open_table(EVENTS).map_err(err("events"))?;
        txn.open_table(GRANTS).map_err(err("grants"))?;
        txn.open_table(GRANT_DEVICES)
            .map_err(err("grant_devices"))?;
        txn.open_table(USED_CODES).map_err(err("used_codes"))?;
    }
    txn.commit().map_err(err("commit"))
}

fn load(db: &Database) -> Result<Loaded, String> {
    let txn = db.begin_read().map_err(err("begin"))?;
    let mut buf = AlignedVec::new();
    let mut out = Loaded::default();
    let table = txn.open_table(DEVICES).map_err(err("devices"))?;
    for row in table.iter().map_err(err("devices"))? {
        let (k, v) = row.map_err(err("devices"))?;
        let rec = access::<ArchivedDeviceRec>(v.value(), &mut buf)
            .map_err(|e| format!("device {}: {e}", k.value()))?;
        out.devices.push((k.value().to_owned(), rec.to_device()));
    }
    let table = txn.open_table(LINKS).map_err(err("links"))?;
    for row in table.iter().map_err(err("links"))? {
        let (k, v) = row.map_err(err("links"))?;
        let (key, href) = k.value();
        let rec = access::<ArchivedLinkRec>(v.value(), &mut buf)
            .map_err(|e| format!("link {key} {href}: {e}"))?;
        out.links.push((key.to_owned(), rec.to_link()));
    }
    let table = txn.open_table(RESOURCES).map_err(err("resources"))?;
    for row in table.iter().map_err(err("resources"))? {
        let (k, v) = row.map_err(err("resources"))?;
        let (key, href) = k.value();
        let rec = access::<ArchivedResourceRec>(v.value(), &mut buf)
            .map_err(|e| format!("resource {key} {href}: {e}"))?;
        let state = rec
            .to_state()
            .ok_or_else(|| format!("resource {key} {href}: unknown status"))?;
        out.resources.push((key.to_owned(), state));
    }
    let table = txn.open_table(COMMANDS).map_err(err("commands"))?;
    for row in table.iter().map_err(err("commands"))? {
        let (k, v) = row.map_err(err("commands"))?;
        let (key, id) = k.value();
        let rec = access::<ArchivedCommandRec>(v.value(), &mut buf)
            .map_err(|e| format!("command {key} {id}: {e}"))?;
        let command = rec
            .to_command()
            .ok_or_else(|| format!("command {key} {id}: unknown kind"))?;
        out.commands
            .push((key.to_owned(), rec.order.to_native(), rec.sent, command));
    }
    let table = txn.open_table(EVENTS).map_err(err("events"))?;
    out.last_event = table
        .last()
        .map_err(err("events"))?
        .map_or(0, |(k, _)| k.value());
    Ok(out)
}

fn first_event(db: &Database) -> Result<Option<u64>, String> {
    let txn = db.begin_read().map_err(err("begin"))?;
    let table = txn.open_table(EVENTS).map_err(err("events"))?;
    let first = table.first().map_err(err("events"))?;
    Ok(first.map(|(k, _)| k.value()))
}

/// The write-ahead log's generation that redb's last checkpoint recorded
/// (0 in a file that never had one).
fn wal_gen(db: &Database) -> Result<u64, String> {
    let txn = db.begin_read().map_err(err("begin"))?;
    let meta = txn.open_table(META).map_err(err("meta"))?;
    let gen = meta.get("wal_gen").map_err(err("meta"))?.map(|v| v.value());
    Ok(gen.unwrap_or(0))
}

/// Applies the log's frames to redb and records generation `gen`, in one
/// durable commit; the oldest event after it.
fn replay(
    db: &Database,
    frames: &[Vec<u8>],
    gen: u64,
    first_event: Option<u64>,
    retention: u64,
) -> Result<Option<u64>, String> {
    let txn = db.begin_write().map_err(err("begin"))?;
    let mut first = first_event;
    let mut buf: AlignedVec = AlignedVec::new();
    for (i, frame) in frames.iter().enumerate() {
        buf.clear();
        buf.extend_from_slice(frame);
        let rows = rkyv::from_bytes::<Vec<Row>, rancor::Error>(&buf)
            .map_err(|e| format!("frame {i} of the write-ahead log is undecodable ({e})"))?;
        first = apply_rows(&txn, &rows, first, retention)?;
    }
    txn.open_table(META)
        .map_err(err("meta"))?
        .insert("wal_gen", gen)
        .map_err(err("meta"))?;
    txn.commit().map_err(err("commit"))?;
    Ok(first)
}

/// The redb tables keyed by (device key, second part).
#[derive(Debug, Clone, Copy, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
enum Pair {
    Links,
    Resources,
    Commands,
}

/// One write to a redb table, with its record already encoded: what a
/// group commit is made of, in the write-ahead log and in redb alike.
/// Each is a blind write (a put, a delete, or the delete of a device's
/// rows), so applying a log that redb already holds changes nothing.
#[derive(Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
enum Row {
    PutDevice {
        key: String,
        value: Vec<u8>,
    },
    /// The device with its links, twin and commands.
    RemoveDevice {
        key: String,
    },
    Put {
        table: Pair,
        key: String,
        sub: String,
        value: Vec<u8>,
    },
    Remove {
        table: Pair,
        key: String,
        sub: String,
    },
    Event {
        seq: u64,
        value: Vec<u8>,
    },
    /// A grant under its token's hash; `device` is its device key ("" =
    /// none) for the [`GRANT_DEVICES`] index.
    PutGrant {
        hash: Vec<u8>,
        device: String,
        value: Vec<u8>,
    },
    RemoveGrant {
        hash: Vec<u8>,
        device: String,
    },
    PutCode {
        id: String,
        expires_at: u64,
    },
    RemoveCode {
        id: String,
    },
}

/// The rows of the ops of `batches`, in order.
fn rows_of(batches: &[(u64, Vec<Op>)]) -> Result<Vec<Row>, String> {
    let put = |table: Pair, key: &str, sub: &str, value: AlignedVec| Row::Put {
        table,
        key: key.to_owned(),
        sub: sub.to_owned(),
        value: value.to_vec(),
    };
    let remove = |table: Pair, key: &str, sub: &str| Row::Remove {
        table,
        key: key.to_owned(),
        sub: sub.to_owned(),
    };
    let mut rows = Vec::new();
    for op in batches.iter().flat_map(|b| b.1.iter()) {
        rows.push(match op {
            Op::PutDevice { key, device } => Row::PutDevice {
                key: key.clone(),
                value: encode(&DeviceRec::from(device))?.to_vec(),
            },
            Op::DeleteDevice { key } => Row::RemoveDevice { key: key.clone() },
            Op::PutLink { key, link } => {
                put(Pair::Links, key, &link.href, encode(&LinkRec::from(link))?)
            }
            Op::DeleteLink { key, href } => remove(Pair::Links, key, href),
            Op::PutResource { key, state } => put(
                Pair::Resources,
                key,
                &state.href,
                encode(&ResourceRec::from(state))?,
            ),
            Op::DeleteResource { key, href } => remove(Pair::Resources, key, href),
            Op::PutCommand {
                key,
                order,
                sent,
                command,
            } => put(
                Pair::Commands,
                key,
                &command.correlation_id,
                encode(&CommandRec::new(*order, *sent, command))?,
            ),
            Op::DeleteCommand {
                key,
                correlation_id,
            } => remove(Pair::Commands, key, correlation_id),
            Op::Event(event) => Row::Event {
                seq: event.seq,
                value: encode(&EventRec::from(event.as_ref()))?.to_vec(),
            },
            Op::PutGrant {
                hash,
                device_key,
                record,
            } => Row::PutGrant {
                hash: hash.to_vec(),
                device: device_key.clone().unwrap_or_default(),
                value: super::grants::encode_grant(record)?,
            },
            Op::RemoveGrant { hash, device_key } => Row::RemoveGrant {
                hash: hash.to_vec(),
                device: device_key.clone().unwrap_or_default(),
            },
            Op::PutCode { id, expires_at } => Row::PutCode {
                id: id.clone(),
                expires_at: *expires_at,
            },
            Op::RemoveCode { id } => Row::RemoveCode { id: id.clone() },
            Op::Notify(..) | Op::Call(..) => continue,
        });
    }
    Ok(rows)
}

/// Writes `rows` in `txn` and keeps the newest `retention` events; the
/// oldest event after it (`first_event` is the oldest before).
fn apply_rows(
    txn: &redb::WriteTransaction,
    rows: &[Row],
    first_event: Option<u64>,
    retention: u64,
) -> Result<Option<u64>, String> {
    let mut devices = txn.open_table(DEVICES).map_err(err("devices"))?;
    let mut links = txn.open_table(LINKS).map_err(err("links"))?;
    let mut resources = txn.open_table(RESOURCES).map_err(err("resources"))?;
    let mut commands = txn.open_table(COMMANDS).map_err(err("commands"))?;
    let mut events = txn.open_table(EVENTS).map_err(err("events"))?;
    let mut grants = txn.open_table(GRANTS).map_err(err("grants"))?;
    let mut grant_devices = txn
        .open_table(GRANT_DEVICES)
        .map_err(err("grant_devices"))?;
    let mut used_codes = txn.open_table(USED_CODES).map_err(err("used_codes"))?;
    let mut first = first_event;
    let mut last_event = None;
    for row in rows {
        match row {
            Row::PutDevice { key, value } => {
                devices
                    .insert(key.as_str(), value.as_slice())
                    .map_err(err("devices"))?;
            }
            Row::RemoveDevice { key } => {
                devices.remove(key.as_str()).map_err(err("devices"))?;
                remove_device_rows(&mut links, key).map_err(err("links"))?;
                remove_device_rows(&mut resources, key).map_err(err("resources"))?;
                remove_device_rows(&mut commands, key).map_err(err("commands"))?;
            }
            Row::Put {
                table,
                key,
                sub,
                value,
            } => {
                let (t, name) = pick(*table, &mut links, &mut resources, &mut commands);
                t.insert((key.as_str(), sub.as_str()), value.as_slice())
                    .map_err(err(name))?;
            }
            Row::Remove { table, key, sub } => {
                let (t, name) = pick(*table, &mut links, &mut resources, &mut commands);
                t.remove((key.as_str(), sub.as_str())).map_err(err(name))?;
            }
            Row::Event { seq, value } => {
                events
                    .insert(*seq, value.as_slice())
                    .map_err(err("events"))?;
                last_event = Some(*seq);
                first.get_or_insert(*seq);
            }
            Row::PutGrant {
                hash,
                device,
                value,
            } => {
                grants
                    .insert(hash.as_slice(), value.as_slice())
                    .map_err(err("grants"))?;
                if !device.is_empty() {
                    grant_devices
                        .insert((device.as_str(), hash.as_slice()), ())
                        .map_err(err("grant_devices"))?;
                }
            }
            Row::RemoveGrant { hash, device } => {
                grants.remove(hash.as_slice()).map_err(err("grants"))?;
                if !device.is_empty() {
                    grant_devices
                        .remove((device.as_str(), hash.as_slice()))
                        .map_err(err("grant_devices"))?;
                }
            }
            Row::PutCode { id, expires_at } => {
                used_codes
                    .insert(id.as_str(), *expires_at)
                    .map_err(err("used_codes"))?;
            }
            Row::RemoveCode { id } => {
                used_codes.remove(id.as_str()).map_err(err("used_codes"))?;
            }
        }
    }
    // Bounded retention: keep the newest `retention` events.
    if let (Some(last), Some(oldest)) = (last_event, first) {
        let keep_from = last.saturating_sub(retention.max(1) - 1);
        if oldest < keep_from {
            events
                .retain_in(oldest..keep_from, |_, _| false)
                .map_err(err("events"))?;
        }
        first = Some(oldest.max(keep_from));
    }
    Ok(first)
}

/// The events of `owner` with a seq above `after`, oldest first, at most
/// `limit`.
fn read_events(db: &Database, owner: &str, after: u64, limit: usize) -> Result<Vec<Event>, String> {
    let txn = db.begin_read().map_err(err("begin"))?;
    let table = txn.open_table(EVENTS).map_err(err("events"))?;
    let mut buf = AlignedVec::new();
    let mut out = Vec::new();
    for row in table
        .range(after.saturating_add(1)..)
        .map_err(err("events"))?
    {
        if out.len() >= limit {
            break;
        }
        let (k, v) = row.map_err(err("events"))?;
        let seq = k.value();
        let rec = access::<ArchivedEventRec>(v.value(), &mut buf)
            .map_err(|e| format!("event {seq}: {e}"))?;
        if rec.owner.as_str() != owner {
            continue;
        }
        let event = rec
            .to_event(seq)
            .ok_or_else(|| format!("event {seq}: unknown code"))?;
        out.push(event);
    }
    Ok(out)
}

/// Zero-copy access to a record (FIELD-NOTES: rkyv's `access` needs an
/// aligned buffer; redb's values are not aligned, so copy first).
pub(crate) fn access<'a, T>(bytes: &[u8], buf: &'a mut AlignedVec) -> Result<&'a T, String>
where
    T: rkyv::Portable
        + for<'b> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'b, rancor::Error>>,
{
    buf.clear();
    buf.extend_from_slice(bytes);
    // Release builds' rancor errors carry no detail: the caller names the
    // table and key.
    rkyv::access::<T, rancor::Error>(buf).map_err(|e| format!("undecodable record ({e})"))
}

pub(crate) fn encode<T>(value: &T) -> Result<AlignedVec, String>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    rkyv::to_bytes::<rancor::Error>(value).map_err(err("encode"))
}

struct Persister {
    db: Arc<Database>,
    rx: flume::Receiver<Msg>,
    shared: Arc<Shared>,
    settings: StoreSettings,
    /// The oldest event in the file, for retention.
    first_event: Option<u64>,
    wal: Wal,
    /// The log's generation; the next checkpoint records the one after.
    gen: u64,
    /// When the last checkpoint was made.
    checkpointed: Instant,
    /// Group commits since it (in the log and in redb, non-durably).
    dirty: bool,
    /// redb failed to take a group commit that is in the log: no more
    /// commits or checkpoints (see [`Failed::Apply`]).
    broken: bool,
}

/// How a group commit failed.
enum Failed {
    /// Nothing of it is durable: its waiters are told so.
    Nothing(String),
    /// It is in the write-ahead log but redb did not take it: a
    /// checkpoint now would drop it, so the persister stops and the next
    /// start replays the log.
    Apply(String),
}

/// Marks the store stopped when the persister ends, even by a panic, so
/// that no waiter waits for it.
struct StoppedOnDrop(Arc<Shared>);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        self.0.progress().stopped = true;
        self.0.changed.notify_all();
    }
}

impl Persister {
    fn run(mut self) {
        let _stopped = StoppedOnDrop(self.shared.clone());
        // A clean stop leaves redb holding everything (the log empty);
        // after an abandon or a broken commit the log is what remains.
        if self.serve() {
            self.checkpoint();
        }
    }

    /// Commits until told to stop: true for a clean stop.
    fn serve(&mut self) -> bool {
        loop {
            // While the log holds group commits, an idle persister
            // checkpoints when the interval is over.
            let next = if self.dirty {
                match self
                    .rx
                    .recv_deadline(self.checkpointed + self.settings.checkpoint_interval)
                {
                    Err(flume::RecvTimeoutError::Timeout) => {
                        self.checkpoint();
                        continue;
                    }
                    other => other.map_err(|_| ()),
                }
            } else {
                self.rx.recv().map_err(|_| ())
            };
            let first = match next {
                Ok(Msg::Batch { seq, ops, urgent }) => (seq, ops, urgent),
                Ok(Msg::Side(ops)) => (0, ops, true),
                Ok(Msg::Stop) | Err(()) => return true,
                Ok(Msg::Abandon) => return false,
            };
            let mut urgent = first.2;
            let mut batches = vec![(first.0, first.1)];
            let mut stop = false;
            let deadline = Instant::now() + self.settings.commit_interval;
            // Group commit: collect until the interval passes, a caller
            // waits (then only what is queued already), or the batch is full.
            while batches.len() < self.settings.max_batch {
                let next = if urgent {
                    match self.rx.try_recv() {
                        Ok(m) => Ok(m),
                        Err(flume::TryRecvError::Empty) => break,
                        Err(flume::TryRecvError::Disconnected) => {
                            Err(flume::RecvTimeoutError::Disconnected)
                        }
                    }
                } else {
                    self.rx.recv_deadline(deadline)
                };
                match next {
                    Ok(Msg::Batch {
                        seq,
                        ops,
                        urgent: u,
                    }) => {
                        urgent |= u;
                        batches.push((seq, ops));
                    }
                    Ok(Msg::Side(ops)) => {
                        urgent = true;
                        batches.push((0, ops));
                    }
                    Ok(Msg::Stop) | Err(flume::RecvTimeoutError::Disconnected) => {
                        stop = true;
                        break;
                    }
                    Ok(Msg::Abandon) => return false,
                    Err(flume::RecvTimeoutError::Timeout) => break,
                }
            }
            if self.shared.abandoned.load(Ordering::SeqCst) {
                return false;
            }
            self.commit(batches);
            if self.broken {
                return false;
            }
            if stop {
                return true;
            }
        }
    }

    fn commit(&mut self, mut batches: Vec<(u64, Vec<Op>)>) {
        // Side batches (seq 0) are nobody's seq to wait for.
        let seqs = || batches.iter().map(|b| b.0).filter(|seq| *seq > 0);
        let range = seqs().min().zip(seqs().max());
        // Outcomes are not records: they go to their issuers once the
        // records before them are durable.
        let mut outcomes = Vec::new();
        for (_, ops) in &mut batches {
            if ops.iter().any(|op| !op.is_record()) {
                let (records, notes): (Vec<Op>, Vec<Op>) =
                    std::mem::take(ops).into_iter().partition(Op::is_record);
                *ops = records;
                outcomes.extend(notes);
            }
        }
        let records = batches.iter().map(|b| b.1.len()).sum::<usize>() as u64;
        let durable = if records == 0 {
            Ok(None)
        } else {
            self.make_durable(&batches)
        };
        let result = match durable {
            Ok(rest) => {
                let mut calls = Vec::new();
                for op in outcomes {
                    match op {
                        Op::Notify(waiter, outcome) => {
                            let _ = waiter.send(outcome);
                        }
                        Op::Call(call) => calls.push(call),
                        _ => {}
                    }
                }
                // Issuers do not wait for redb too; the grant store does
                // (it reads its records back from redb).
                let applied = rest.map_or(Ok(()), |rows| {
                    self.apply(&rows, false).map_err(Failed::Apply)
                });
                if applied.is_ok() {
                    calls.into_iter().for_each(|call| call());
                }
                applied
            }
            // The issuers' receivers disconnect with `outcomes`: they
            // cannot be told an answer that is not recorded.
            Err(e) => Err(Failed::Nothing(e)),
        };
        let stats = &self.shared.stats;
        match &result {
            Ok(()) if records == 0 => {}
            Ok(()) => {
                stats.store_commits.fetch_add(1, Ordering::Relaxed);
                stats.store_records.fetch_add(records, Ordering::Relaxed);
            }
            Err(Failed::Nothing(e)) => {
                stats.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("the hub store could not commit {records} records: {e}");
            }
            Err(Failed::Apply(e)) => {
                stats.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    log = %self.wal.path().display(),
                    "the hub store could not apply {records} records from its write-ahead log \
                     to redb: {e}; it stops recording (later changes stay in memory) and \
                     the next start replays the log"
                );
                self.broken = true;
            }
        }
        if let Some((from, to)) = range {
            let mut progress = self.shared.progress();
            progress.done = progress.done.max(to);
            if matches!(result, Err(Failed::Nothing(_))) {
                progress.failed.push_back((from, to));
                while progress.failed.len() > FAILED_KEPT {
                    progress.failed.pop_front();
                }
            }
        }
        self.shared.changed.notify_all();
    }

    /// Makes one group commit durable: a frame in the log, with its rows
    /// returned for redb to take non-durably; or, when a checkpoint is due
    /// or the log is full, a checkpoint that holds them (nothing left).
    fn make_durable(&mut self, batches: &[(u64, Vec<Op>)]) -> Result<Option<Vec<Row>>, String> {
        let rows = rows_of(batches)?;
        let frame = rkyv::to_bytes::<rancor::Error>(&rows).map_err(err("encode"))?;
        if self.wal.fits(frame.len())
            && self.checkpointed.elapsed() < self.settings.checkpoint_interval
        {
            self.wal.append(&frame).map_err(err("write-ahead log"))?;
            Ok(Some(rows))
        } else {
            self.apply(&rows, true)?;
            Ok(None)
        }
    }

    /// Writes `rows` to redb: non-durably (the log holds them), or as a
    /// checkpoint, a durable commit that records the log's next
    /// generation and so empties the log.
    fn apply(&mut self, rows: &[Row], checkpoint: bool) -> Result<(), String> {
        let mut txn = self.db.begin_write().map_err(err("begin"))?;
        if checkpoint {
            txn.open_table(META)
                .map_err(err("meta"))?
                .insert("wal_gen", self.gen + 1)
                .map_err(err("meta"))?;
        } else {
            txn.set_durability(redb::Durability::None)
                .map_err(err("durability"))?;
        }
        let first = apply_rows(&txn, rows, self.first_event, self.settings.event_retention)?;
        txn.commit().map_err(err("commit"))?;
        self.first_event = first;
        if checkpoint {
            self.gen += 1;
            self.wal.reset(self.gen);
            self.checkpointed = Instant::now();
            self.dirty = false;
            self.shared
                .stats
                .store_checkpoints
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.dirty = true;
        }
        Ok(())
    }

    /// A checkpoint with nothing new, when the log holds group commits.
    fn checkpoint(&mut self) {
        if !self.dirty || self.broken {
            return;
        }
        if let Err(e) = self.apply(&[], true) {
            // The log still holds everything: nothing is lost, the log
            // only grows until a later checkpoint succeeds.
            self.shared
                .stats
                .store_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                log = %self.wal.path().display(),
                log_bytes = self.wal.used(),
                "the hub store could not checkpoint: {e}"
            );
        }
    }
}

type PairTable<'t> = redb::Table<'t, (&'static str, &'static str), &'static [u8]>;

/// The open table of `pair`, with its name for errors.
fn pick<'a, 't>(
    pair: Pair,
    links: &'a mut PairTable<'t>,
    resources: &'a mut PairTable<'t>,
    commands: &'a mut PairTable<'t>,
) -> (&'a mut PairTable<'t>, &'static str) {
    match pair {
        Pair::Links => (links, "links"),
        Pair::Resources => (resources, "resources"),
        Pair::Commands => (commands, "commands"),
    }
}

/// Removes every (key, _) row of a device.
fn remove_device_rows(table: &mut PairTable<'_>, key: &str) -> Result<(), redb::StorageError> {
    let mut doomed = Vec::new();
    for row in table.range((key, "")..)? {
        let (k, _) = row?;
        let (device, second) = k.value();
        if device != key {
            break;
        }
        doomed.push(second.to_owned());
    }
    for second in doomed {
        table.remove((key, second.as_str()))?;
    }
    Ok(())
}

// -- codes of the hub's enums ------------------------------------------------

pub(crate) fn status_code(status: Status) -> u8 {
    STATUSES.iter().position(|s| *s == status).unwrap_or(11) as u8
}

pub(crate) fn status_of(code: u8) -> Option<Status> {
    STATUSES.get(usize::from(code)).copied()
}

pub(crate) fn protocol_code(p: Option<Protocol>) -> u8 {
    match p {
        None => 0,
        Some(Protocol::CoapsTcp) => 1,
        Some(Protocol::CoapTcp) => 2,
    }
}

pub(crate) fn protocol_of(code: u8) -> Option<Protocol> {
    match code {
        1 => Some(Protocol::CoapsTcp),
        2 => Some(Protocol::CoapTcp),
        _ => None,
    }
}

pub(crate) fn twin_code(state: TwinState) -> u8 {
    match state {
        TwinState::OutOfSync => 0,
        TwinState::Syncing => 1,
        TwinState::InSync => 2,
        TwinState::Disabled => 3,
    }
}

pub(crate) fn twin_of(code: u8) -> TwinState {
    match code {
        1 => TwinState::Syncing,
        2 => TwinState::InSync,
        3 => TwinState::Disabled,
        _ => TwinState::OutOfSync,
    }
}

fn operation_code(op: Operation) -> u8 {
    match op {
        Operation::Update => 0,
        Operation::Retrieve => 1,
        Operation::Create => 2,
        Operation::Delete => 3,
        Operation::Notify => 4,
    }
}

fn operation_of(code: u8) -> Option<Operation> {
    Some(match code {
        0 => Operation::Update,
        1 => Operation::Retrieve,
        2 => Operation::Create,
        3 => Operation::Delete,
        4 => Operation::Notify,
        _ => return None,
    })
}

pub(crate) fn strings(v: &rkyv::vec::ArchivedVec<rkyv::string::ArchivedString>) -> Vec<String> {
    v.iter().map(|s| s.as_str().to_owned()).collect()
}

fn opt_strings(
    v: &rkyv::option::ArchivedOption<rkyv::vec::ArchivedVec<rkyv::string::ArchivedString>>,
) -> Option<Vec<String>> {
    v.as_ref().map(strings)
}

pub(crate) fn opt_string(
    v: &rkyv::option::ArchivedOption<rkyv::string::ArchivedString>,
) -> Option<String> {
    v.as_ref().map(|s| s.as_str().to_owned())
}

pub(crate) fn opt_bytes(
    v: &rkyv::option::ArchivedOption<rkyv::vec::ArchivedVec<u8>>,
) -> Option<Vec<u8>> {
    v.as_ref().map(|b| b.as_slice().to_vec())
}

// -- records -----------------------------------------------------------------

#[derive(rkyv::Archive, rkyv::Serialize)]
pub(crate) struct DeviceRec {
    device_id: String,
    owner: String,
    online: bool,
    connected_at_ns: u64,
    protocol: u8,
    service_id: String,
    connection_id: String,
    local_endpoints: Vec<String>,
    twin_state: u8,
    twin_enabled: bool,
    syncing_at_ns: u64,
    in_sync_at_ns: u64,
}

impl From<&DeviceRecord> for DeviceRec {
    fn from(d: &DeviceRecord) -> Self {
        DeviceRec {
            device_id: d.device_id.clone(),
            owner: d.owner.clone(),
            online: d.status.online,
            connected_at_ns: d.status.connected_at_ns,
            protocol: protocol_code(d.status.protocol),
            service_id: d.status.service_id.clone(),
            connection_id: d.status.connection_id.clone(),
            local_endpoints: d.status.local_endpoints.clone(),
            twin_state: twin_code(d.twin.state),
            twin_enabled: d.twin.enabled,
            syncing_at_ns: d.twin.syncing_at_ns,
            in_sync_at_ns: d.twin.in_sync_at_ns,
        }
    }
}

impl ArchivedDeviceRec {
    pub(crate) fn to_device(&self) -> DeviceRecord {
        DeviceRecord {
            device_id: self.device_id.as_str().to_owned(),
            owner: self.owner.as_str().to_owned(),
            status: ConnectionStatus {
                online: self.online,
                connected_at_ns: self.connected_at_ns.to_native(),
                protocol: protocol_of(self.protocol),
                service_id: self.service_id.as_str().to_owned(),
                connection_id: self.connection_id.as_str().to_owned(),
                local_endpoints: strings(&self.local_endpoints),
            },
            twin: TwinSync {
                state: twin_of(self.twin_state),
                enabled: self.twin_enabled,
                syncing_at_ns: self.syncing_at_ns.to_native(),
                in_sync_at_ns: self.in_sync_at_ns.to_native(),
            },
        }
    }
}

#[derive(rkyv::Archive, rkyv::Serialize)]
struct PolicyRec {
    bit_mask: u8,
    port: Option<u16>,
    tcp_port: Option<u16>,
    tls_port: Option<u16>,
    secured: Option<bool>,
}

#[derive(rkyv::Archive, rkyv::Serialize)]
struct EndpointRec {
    uri: String,
    priority: Option<u64>,
}

#[derive(rkyv::Archive, rkyv::Serialize)]
pub(crate) struct LinkRec {
    href: String,
    device_id: String,
    instance_id: i64,
    resource_types: Option<Vec<String>>,
    interfaces: Option<Vec<String>>,
    policy: Option<PolicyRec>,
    endpoints: Option<Vec<EndpointRec>>,
    anchor: Option<String>,
    title: Option<String>,
    content_types: Option<Vec<String>>,
    valid_until: Option<u64>,
}

impl From<&StoredLink> for LinkRec {
    fn from(l: &StoredLink) -> Self {
        LinkRec {
            href: l.href.clone(),
            device_id: l.device_id.clone(),
            instance_id: l.instance_id,
            resource_types: l.resource_types.clone(),
            interfaces: l.interfaces.clone(),
            policy: l.policy.map(|p| PolicyRec {
                bit_mask: p.bit_mask,
                port: p.port,
                tcp_port: p.tcp_port,
                tls_port: p.tls_port,
                secured: p.secured,
            }),
            endpoints: l.endpoints.as_ref().map(|eps| {
                eps.iter()
                    .map(|(uri, priority)| EndpointRec {
                        uri: uri.clone(),
                        priority: *priority,
                    })
                    .collect()
            }),
            anchor: l.anchor.clone(),
            title: l.title.clone(),
            content_types: l.content_types.clone(),
            valid_until: l.valid_until,
        }
    }
}

impl ArchivedLinkRec {
    pub(crate) fn to_link(&self) -> StoredLink {
        StoredLink {
            href: self.href.as_str().to_owned(),
            device_id: self.device_id.as_str().to_owned(),
            instance_id: self.instance_id.to_native(),
            resource_types: opt_strings(&self.resource_types),
            interfaces: opt_strings(&self.interfaces),
            policy: self.policy.as_ref().map(|p| Policy {
                bit_mask: p.bit_mask,
                port: p.port.as_ref().map(|v| v.to_native()),
                tcp_port: p.tcp_port.as_ref().map(|v| v.to_native()),
                tls_port: p.tls_port.as_ref().map(|v| v.to_native()),
                secured: p.secured.as_ref().copied(),
            }),
            endpoints: self.endpoints.as_ref().map(|eps| {
                eps.iter()
                    .map(|e| {
                        (
                            e.uri.as_str().to_owned(),
                            e.priority.as_ref().map(|v| v.to_native()),
                        )
                    })
                    .collect()
            }),
            anchor: opt_string(&self.anchor),
            title: opt_string(&self.title),
            content_types: opt_strings(&self.content_types),
            valid_until: self.valid_until.as_ref().map(|v| v.to_native()),
        }
    }
}

#[derive(rkyv::Archive, rkyv::Serialize)]
pub(crate) struct ResourceRec {
    href: String,
    data: Vec<u8>,
    content_format: i32,
    status: u8,
    etag: Option<Vec<u8>>,
    resource_types: Vec<String>,
    version: u64,
    updated_at_ns: u64,
}

impl From<&ResourceState> for ResourceRec {
    fn from(r: &ResourceState) -> Self {
        ResourceRec {
            href: r.href.clone(),
            data: r.content.data.clone(),
            content_format: r.content.content_format,
            status: status_code(r.status),
            etag: r.etag.clone(),
            resource_types: r.resource_types.clone(),
            version: r.version,
            updated_at_ns: r.updated_at_ns,
        }
    }
}

impl ArchivedResourceRec {
    pub(crate) fn to_state(&self) -> Option<ResourceState> {
        Some(ResourceState {
            href: self.href.as_str().to_owned(),
            content: Content {
                data: self.data.as_slice().to_vec(),
                content_format: self.content_format.to_native(),
            },
            status: status_of(self.status)?,
            etag: opt_bytes(&self.etag),
            resource_types: strings(&self.resource_types),
            version: self.version.to_native(),
            updated_at_ns: self.updated_at_ns.to_native(),
        })
    }
}

#[derive(rkyv::Archive, rkyv::Serialize)]
pub(crate) struct CommandRec {
    order: u64,
    sent: bool,
    correlation_id: String,
    device_id: String,
    href: String,
    /// [`operation_code`] of the kind.
    kind: u8,
    data: Vec<u8>,
    content_format: i32,
    etags: Vec<Vec<u8>>,
    interface: Option<String>,
    valid_until_ns: u64,
    issued_at_ns: u64,
}

impl CommandRec {
    pub(crate) fn new(order: u64, sent: bool, c: &Command) -> Self {
        let (data, content_format, etags) = match &c.kind {
            CommandKind::Update { content } | CommandKind::Create { content } => {
                (content.data.clone(), content.content_format, Vec::new())
            }
            CommandKind::Retrieve { etags } => (Vec::new(), -1, etags.clone()),
            CommandKind::Delete => (Vec::new(), -1, Vec::new()),
        };
        CommandRec {
            order,
            sent,
            correlation_id: c.correlation_id.clone(),
            device_id: c.device_id.clone(),
            href: c.href.clone(),
            kind: operation_code(c.kind.operation()),
            data,
            content_format,
            etags,
            interface: c.interface.clone(),
            valid_until_ns: c.valid_until_ns,
            issued_at_ns: c.issued_at_ns,
        }
    }
}

impl ArchivedCommandRec {
    pub(crate) fn to_command(&self) -> Option<Command> {
        let content = || Content {
            data: self.data.as_slice().to_vec(),
            content_format: self.content_format.to_native(),
        };
        let kind = match operation_of(self.kind)? {
            Operation::Update => CommandKind::Update { content: content() },
            Operation::Create => CommandKind::Create { content: content() },
            Operation::Retrieve => CommandKind::Retrieve {
                etags: self.etags.iter().map(|e| e.as_slice().to_vec()).collect(),
            },
            Operation::Delete => CommandKind::Delete,
            Operation::Notify => return None,
        };
        Some(Command {
            correlation_id: self.correlation_id.as_str().to_owned(),
            device_id: self.device_id.as_str().to_owned(),
            href: self.href.as_str().to_owned(),
            kind,
            interface: opt_string(&self.interface),
            valid_until_ns: self.valid_until_ns.to_native(),
            issued_at_ns: self.issued_at_ns.to_native(),
        })
    }
}

#[derive(rkyv::Archive, rkyv::Serialize)]
struct AuthRec {
    owner: String,
    device_id: String,
    subject: Option<String>,
    token_id: Option<String>,
}

#[derive(rkyv::Archive, rkyv::Serialize)]
enum EventKindRec {
    DeviceRegistered,
    DeviceDeleted,
    Online {
        connection_id: String,
        protocol: u8,
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
        status: u8,
        data: Vec<u8>,
        content_format: i32,
        etag: Option<Vec<u8>>,
        version: u64,
    },
    TwinStateChanged {
        state: u8,
    },
    TwinEnabledChanged {
        enabled: bool,
    },
    CommandPending {
        correlation_id: String,
        href: String,
        operation: u8,
        valid_until_ns: u64,
    },
    CommandAnswered {
        correlation_id: String,
        href: String,
        operation: u8,
        status: u8,
        data: Vec<u8>,
        content_format: i32,
    },
    CommandExpired {
        correlation_id: String,
        href: String,
        operation: u8,
    },
    CommandCanceled {
        correlation_id: String,
        href: String,
        operation: u8,
    },
}

#[derive(rkyv::Archive, rkyv::Serialize)]
pub(crate) struct EventRec {
    owner: String,
    device_id: String,
    at_ns: u64,
    auth: AuthRec,
    kind: EventKindRec,
}

impl From<&Event> for EventRec {
    fn from(e: &Event) -> Self {
        let kind = match &e.kind {
            EventKind::DeviceRegistered => EventKindRec::DeviceRegistered,
            EventKind::DeviceDeleted => EventKindRec::DeviceDeleted,
            EventKind::Online {
                connection_id,
                protocol,
                service_id,
            } => EventKindRec::Online {
                connection_id: connection_id.clone(),
                protocol: protocol_code(Some(*protocol)),
                service_id: service_id.clone(),
            },
            EventKind::Offline => EventKindRec::Offline,
            EventKind::LinksPublished { hrefs } => EventKindRec::LinksPublished {
                hrefs: hrefs.clone(),
            },
            EventKind::LinksUnpublished { hrefs } => EventKindRec::LinksUnpublished {
                hrefs: hrefs.clone(),
            },
            EventKind::ResourceChanged {
                href,
                status,
                content,
                etag,
                version,
            } => EventKindRec::ResourceChanged {
                href: href.clone(),
                status: status_code(*status),
                data: content.data.clone(),
                content_format: content.content_format,
                etag: etag.clone(),
                version: *version,
            },
            EventKind::TwinStateChanged { state } => EventKindRec::TwinStateChanged {
                state: twin_code(*state),
            },
            EventKind::TwinEnabledChanged { enabled } => {
                EventKindRec::TwinEnabledChanged { enabled: *enabled }
            }
            EventKind::CommandPending {
                correlation_id,
                href,
                operation,
                valid_until_ns,
            } => EventKindRec::CommandPending {
                correlation_id: correlation_id.clone(),
                href: href.clone(),
                operation: operation_code(*operation),
                valid_until_ns: *valid_until_ns,
            },
            EventKind::CommandAnswered {
                correlation_id,
                href,
                operation,
                status,
                content,
            } => EventKindRec::CommandAnswered {
                correlation_id: correlation_id.clone(),
                href: href.clone(),
                operation: operation_code(*operation),
                status: status_code(*status),
                data: content.data.clone(),
                content_format: content.content_format,
            },
            EventKind::CommandExpired {
                correlation_id,
                href,
                operation,
            } => EventKindRec::CommandExpired {
                correlation_id: correlation_id.clone(),
                href: href.clone(),
                operation: operation_code(*operation),
            },
            EventKind::CommandCanceled {
                correlation_id,
                href,
                operation,
            } => EventKindRec::CommandCanceled {
                correlation_id: correlation_id.clone(),
                href: href.clone(),
                operation: operation_code(*operation),
            },
        };
        EventRec {
            owner: e.owner.clone(),
            device_id: e.device_id.clone(),
            at_ns: e.at_ns,
            auth: AuthRec {
                owner: e.auth.owner.clone(),
                device_id: e.auth.device_id.clone(),
                subject: e.auth.subject.clone(),
                token_id: e.auth.token_id.clone(),
            },
            kind,
        }
    }
}

impl ArchivedEventRec {
    pub(crate) fn to_event(&self, seq: u64) -> Option<Event> {
        let s = |v: &rkyv::string::ArchivedString| v.as_str().to_owned();
        let kind = match &self.kind {
            ArchivedEventKindRec::DeviceRegistered => EventKind::DeviceRegistered,
            ArchivedEventKindRec::DeviceDeleted => EventKind::DeviceDeleted,
            ArchivedEventKindRec::Online {
                connection_id,
                protocol,
                service_id,
            } => EventKind::Online {
                connection_id: s(connection_id),
                protocol: protocol_of(*protocol)?,
                service_id: s(service_id),
            },
            ArchivedEventKindRec::Offline => EventKind::Offline,
            ArchivedEventKindRec::LinksPublished { hrefs } => EventKind::LinksPublished {
                hrefs: strings(hrefs),
            },
            ArchivedEventKindRec::LinksUnpublished { hrefs } => EventKind::LinksUnpublished {
                hrefs: strings(hrefs),
            },
            ArchivedEventKindRec::ResourceChanged {
                href,
                status,
                data,
                content_format,
                etag,
                version,
            } => EventKind::ResourceChanged {
                href: s(href),
                status: status_of(*status)?,
                content: Content {
                    data: data.as_slice().to_vec(),
                    content_format: content_format.to_native(),
                },
                etag: opt_bytes(etag),
                version: version.to_native(),
            },
            ArchivedEventKindRec::TwinStateChanged { state } => EventKind::TwinStateChanged {
                state: twin_of(*state),
            },
            ArchivedEventKindRec::TwinEnabledChanged { enabled } => {
                EventKind::TwinEnabledChanged { enabled: *enabled }
            }
            ArchivedEventKindRec::CommandPending {
                correlation_id,
                href,
                operation,
                valid_until_ns,
            } => EventKind::CommandPending {
                correlation_id: s(correlation_id),
                href: s(href),
                operation: operation_of(*operation)?,
                valid_until_ns: valid_until_ns.to_native(),
            },
            ArchivedEventKindRec::CommandAnswered {
                correlation_id,
                href,
                operation,
                status,
                data,
                content_format,
            } => EventKind::CommandAnswered {
                correlation_id: s(correlation_id),
                href: s(href),
                operation: operation_of(*operation)?,
                status: status_of(*status)?,
                content: Content {
                    data: data.as_slice().to_vec(),
                    content_format: content_format.to_native(),
                },
            },
            ArchivedEventKindRec::CommandExpired {
                correlation_id,
                href,
                operation,
            } => EventKind::CommandExpired {
                correlation_id: s(correlation_id),
                href: s(href),
                operation: operation_of(*operation)?,
            },
            ArchivedEventKindRec::CommandCanceled {
                correlation_id,
                href,
                operation,
            } => EventKind::CommandCanceled {
                correlation_id: s(correlation_id),
                href: s(href),
                operation: operation_of(*operation)?,
            },
        };
        Some(Event {
            seq,
            owner: s(&self.owner),
            device_id: s(&self.device_id),
            at_ns: self.at_ns.to_native(),
            auth: AuthContext {
                owner: s(&self.auth.owner),
                device_id: s(&self.auth.device_id),
                subject: opt_string(&self.auth.subject),
                token_id: opt_string(&self.auth.token_id),
            },
            kind,
        })
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
