//! The hub in memory: registry, links, statuses, the twin, commands and
//! event subscribers of the embedded default. One lock for the whole
//! state: each call is a few map operations.
//!
//! Opened with [`MemoryHub::open`] it is also durable: every change is
//! journaled (a record per changed device, link, twin resource, command
//! and event, see [`super::store`]) while the lock is held, so records
//! reach the disk in the order of the changes. Reads never touch the disk.
//! Calls that report a change to a user (`add_device`, `delete_device`,
//! `submit_command`, `cancel_command`, `set_twin_enabled`) return once
//! their records are committed; a command's outcome reaches its issuer
//! once the records of the answer are; a command is handed to a
//! connection only once its dispatch is committed (so that a restart
//! knows which commands may have reached a device, spec §7.3).
//!
//! The hub stamps events with the wall clock: it is the record keeper,
//! not protocol code.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, HashMap};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use super::grants::StoreGrants;
use super::store::{Journal, Op, Store, StoreError, StoreSettings};
use super::twin::{apply_change, latest_etags, Content, Status, TwinResource};
use super::{
    AuthContext, Command, CommandOutcome, CommandResult, CommandTicket, ConnectionRef,
    ConnectionStatus, Connections, DeviceRecord, Event, EventKind, Hub, HubError, HubMessage,
    HubStats, Online, Replaced, ResourceChange, ResourceState, StoredLink, TwinState, TwinSync,
};
use crate::auth::grants::{GrantStore, MemoryGrants};

/// How far a subscriber may fall behind before it is dropped.
const SUBSCRIBER_QUEUE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dispatch {
    Pending,
    /// Handed to this connection's session.
    Sent(ConnectionRef),
}

#[derive(Debug)]
struct CommandEntry {
    command: Command,
    dispatch: Dispatch,
    /// Where the issuer waits for the outcome.
    waiter: Option<flume::Sender<CommandOutcome>>,
    /// Acceptance order over the hub, kept on disk so that a restart keeps
    /// commands oldest first (spec §7.1).
    order: u64,
}

#[derive(Debug)]
struct Device {
    /// [`key`] of the device ID.
    key: String,
    /// As the device first presented it.
    device_id: String,
    owner: String,
    status: ConnectionStatus,
    /// The connection that went ONLINE last, while it is open.
    connection: Option<ConnectionRef>,
    /// By normalised href.
    links: BTreeMap<String, StoredLink>,
    twin_sync: TwinSync,
    /// By href.
    twin: BTreeMap<String, TwinResource>,
    /// Not yet answered, oldest first.
    commands: Vec<CommandEntry>,
}

impl Device {
    fn new(device_id: &str, owner: &str) -> Device {
        Device {
            key: key(device_id),
            device_id: device_id.to_owned(),
            owner: owner.to_owned(),
            status: ConnectionStatus::default(),
            connection: None,
            links: BTreeMap::new(),
            twin_sync: TwinSync {
                enabled: true,
                ..TwinSync::default()
            },
            twin: BTreeMap::new(),
            commands: Vec::new(),
        }
    }

    fn record(&self) -> DeviceRecord {
        DeviceRecord {
            device_id: self.device_id.clone(),
            owner: self.owner.clone(),
            status: self.status.clone(),
            twin: self.twin_sync.clone(),
        }
    }

    fn is_current(&self, connection: ConnectionRef) -> bool {
        self.connection == Some(connection)
    }
}

// -- journal records (no-ops without a store) --------------------------------

fn put_device(journal: &mut Option<Journal>, device: &Device) {
    if let Some(j) = journal {
        j.push(Op::PutDevice {
            key: device.key.clone(),
            device: device.record(),
        });
    }
}

fn put_link(journal: &mut Option<Journal>, device_key: &str, link: &StoredLink) {
    if let Some(j) = journal {
        j.push(Op::PutLink {
            key: device_key.to_owned(),
            link: link.clone(),
        });
    }
}

fn delete_link(journal: &mut Option<Journal>, device_key: &str, href: &str) {
    if let Some(j) = journal {
        j.push(Op::DeleteLink {
            key: device_key.to_owned(),
            href: href.to_owned(),
        });
    }
}

fn put_resource(journal: &mut Option<Journal>, device_key: &str, state: &ResourceState) {
    if let Some(j) = journal {
        j.push(Op::PutResource {
            key: device_key.to_owned(),
            state: state.clone(),
        });
    }
}

fn delete_resource(journal: &mut Option<Journal>, device_key: &str, href: &str) {
    if let Some(j) = journal {
        j.push(Op::DeleteResource {
            key: device_key.to_owned(),
            href: href.to_owned(),
        });
    }
}

fn put_command(journal: &mut Option<Journal>, device_key: &str, entry: &CommandEntry) {
    if let Some(j) = journal {
        j.push(Op::PutCommand {
            key: device_key.to_owned(),
            order: entry.order,
            sent: entry.dispatch != Dispatch::Pending,
            command: entry.command.clone(),
        });
    }
}

fn delete_command(journal: &mut Option<Journal>, device_key: &str, correlation_id: &str) {
    if let Some(j) = journal {
        j.push(Op::DeleteCommand {
            key: device_key.to_owned(),
            correlation_id: correlation_id.to_owned(),
        });
    }
}

struct Subscriber {
    owner: String,
    tx: flume::Sender<Arc<Event>>,
}

#[derive(Default)]
struct State {
    /// Keyed by [`key`].
    devices: HashMap<String, Device>,
    subscribers: Vec<Subscriber>,
    next_seq: u64,
    /// [`CommandEntry::order`] of the next accepted command.
    next_order: u64,
    /// Where changes are recorded, when the hub is durable.
    journal: Option<Journal>,
}

impl State {
    /// Records an event and hands it to the owner's subscribers; a
    /// subscriber that is gone or too far behind is dropped.
    fn emit(&mut self, owner: &str, device_id: &str, auth: AuthContext, kind: EventKind) {
        self.next_seq += 1;
        let event = Arc::new(Event {
            seq: self.next_seq,
            owner: owner.to_owned(),
            device_id: device_id.to_owned(),
            at_ns: now_ns(),
            auth,
            kind,
        });
        if let Some(j) = &mut self.journal {
            j.push(Op::Event(event.clone()));
        }
        self.subscribers.retain(|s| {
            s.owner != owner
                || match s.tx.try_send(event.clone()) {
                    Ok(()) => true,
                    Err(flume::TrySendError::Full(_)) => {
                        tracing::warn!(owner, "dropping an event subscriber that fell behind");
                        false
                    }
                    Err(flume::TrySendError::Disconnected(_)) => false,
                }
        });
    }

    /// Sends the outcome to the command's issuer, if it still waits: at
    /// once in memory, after the commit of the records before it when
    /// durable.
    fn finish(&mut self, entry: CommandEntry, outcome: CommandOutcome) {
        let Some(waiter) = entry.waiter else {
            return;
        };
        match &mut self.journal {
            Some(j) => j.push(Op::Notify(waiter, outcome)),
            None => {
                let _ = waiter.send(outcome);
            }
        }
    }

    /// Sends what was recorded to the store now, marked as awaited; the
    /// seq to wait for (`None` in memory).
    fn commit_point(&mut self) -> Option<u64> {
        self.journal.as_mut().map(|j| {
            j.urgent();
            j.seal()
        })
    }

    fn take_order(&mut self) -> u64 {
        self.next_order += 1;
        self.next_order
    }
}

/// The locked state. Whatever a call recorded goes to the store when the
/// lock is released, so that records keep the order of the changes.
struct Locked<'a>(MutexGuard<'a, State>);

impl Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.0
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if let Some(j) = &mut self.0.journal {
            j.seal();
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn owner_ctx(owner: &str, device_id: &str) -> AuthContext {
    AuthContext {
        owner: owner.to_owned(),
        device_id: device_id.to_owned(),
        ..AuthContext::default()
    }
}

/// The embedded [`Hub`]: in memory only ([`MemoryHub::new`]) or durable in
/// a data directory ([`MemoryHub::open`]).
pub struct MemoryHub {
    state: Mutex<State>,
    connections: OnceLock<Arc<dyn Connections>>,
    stats: Arc<HubStats>,
    /// The token authority's refresh grants and used codes (issue 13): in
    /// the store when durable, else in memory.
    grants: Arc<dyn GrantStore>,
    /// Dropped after `state` (field order): the journal's last records
    /// are queued before the store's stop.
    store: Option<Store>,
}

impl Default for MemoryHub {
    fn default() -> Self {
        MemoryHub {
            state: Mutex::default(),
            connections: OnceLock::new(),
            stats: Arc::default(),
            grants: Arc::new(MemoryGrants::new()),
            store: None,
        }
    }
}

impl std::fmt::Debug for MemoryHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryHub")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Device IDs are UUIDs (OCF `di`): `ABC…` and `abc…` are one device.
fn key(device_id: &str) -> String {
    match uuid::Uuid::parse_str(device_id) {
        Ok(id) => id.hyphenated().to_string(),
        Err(_) => device_id.to_owned(),
    }
}

impl MemoryHub {
    /// A hub without disk: everything is lost with the process.
    pub fn new() -> MemoryHub {
        MemoryHub::default()
    }

    /// The durable hub in `dir` (created if missing) with the default
    /// settings; see [`MemoryHub::open_with`].
    pub fn open(dir: &Path) -> Result<MemoryHub, StoreError> {
        MemoryHub::open_with(dir, StoreSettings::default())
    }

    /// The durable hub in `<dir>/hub.redb`: loads everything into memory,
    /// then records the restart before it returns: devices that were
    /// ONLINE are OFFLINE (their connections died with the process, spec
    /// §8.2), and commands that were dispatched to such a connection but
    /// not answered are answered UNAVAILABLE (the device may or may not
    /// have received them; a command is sent at most once, spec §7.3).
    /// Pending commands stay pending.
    pub fn open_with(dir: &Path, settings: StoreSettings) -> Result<MemoryHub, StoreError> {
        let stats = Arc::new(HubStats::default());
        let (store, journal, loaded) = Store::open(dir, settings, stats.clone())?;
        let mut state = State {
            next_seq: loaded.last_event,
            ..State::default()
        };
        for (k, record) in loaded.devices {
            let mut device = Device::new(&record.device_id, &record.owner);
            device.key.clone_from(&k);
            device.status = record.status;
            device.twin_sync = record.twin;
            state.devices.insert(k, device);
        }
        for (k, link) in loaded.links {
            if let Some(device) = state.devices.get_mut(&k) {
                device.links.insert(link.href.clone(), link);
            }
        }
        for (k, resource) in loaded.resources {
            if let Some(device) = state.devices.get_mut(&k) {
                device.twin.insert(
                    resource.href.clone(),
                    TwinResource {
                        state: resource,
                        last: None,
                    },
                );
            }
        }
        let mut commands = loaded.commands;
        commands.sort_by_key(|c| c.1);
        state.next_order = commands.last().map_or(0, |c| c.1);
        // From here on the restart is recorded.
        state.journal = Some(journal);
        let mut unanswered = Vec::new();
        for (k, order, sent, command) in commands {
            let Some(device) = state.devices.get_mut(&k) else {
                continue;
            };
            if sent {
                unanswered.push((device.owner.clone(), device.device_id.clone(), command));
            } else {
                device.commands.push(CommandEntry {
                    command,
                    dispatch: Dispatch::Pending,
                    waiter: None,
                    order,
                });
            }
        }
        // spec §7.3: dispatched to a connection of the process that died,
        // never answered: UNAVAILABLE, never sent again.
        for (owner, device_id, command) in unanswered {
            let k = key(&device_id);
            delete_command(&mut state.journal, &k, &command.correlation_id);
            let kind = EventKind::CommandAnswered {
                correlation_id: command.correlation_id.clone(),
                href: command.href.clone(),
                operation: command.kind.operation(),
                status: Status::Unavailable,
                content: Content::none(),
            };
            state.emit(&owner, &device_id, owner_ctx(&owner, &device_id), kind);
            stats.count_answer(Status::Unavailable);
        }
        // spec §8.2: the connections died with the process.
        let mut online: Vec<String> = state
            .devices
            .values()
            .filter(|d| d.status.online)
            .map(|d| d.key.clone())
            .collect();
        online.sort();
        for k in online {
            let st = &mut state;
            let Some(device) = st.devices.get_mut(&k) else {
                continue;
            };
            device.status.online = false;
            put_device(&mut st.journal, device);
            let (owner, id) = (device.owner.clone(), device.device_id.clone());
            st.emit(&owner, &id, owner_ctx(&owner, &id), EventKind::Offline);
        }
        let point = state.commit_point();
        let hub = MemoryHub {
            state: Mutex::new(state),
            connections: OnceLock::new(),
            stats,
            grants: StoreGrants::new(store.side()),
            store: Some(store),
        };
        hub.wait(point).map_err(|e| StoreError::Commit {
            path: hub
                .store
                .as_ref()
                .map(|s| s.path().to_owned())
                .unwrap_or_default(),
            message: e.to_string(),
        })?;
        Ok(hub)
    }

    /// Whether changes are kept on disk.
    pub fn is_durable(&self) -> bool {
        self.store.is_some()
    }

    /// Waits until every change made so far is committed.
    pub fn flush(&self) -> Result<(), HubError> {
        let point = self.state().commit_point();
        self.wait(point)
    }

    /// Commits every change made so far and stops the store: later changes
    /// stay in memory only (the calls that wait for a commit answer
    /// [`HubError::Unavailable`]). For shutdown; a no-op in memory.
    pub fn close(&self) {
        if let Some(store) = &self.store {
            if let Err(e) = self.flush() {
                tracing::error!("the hub store could not commit its last changes: {e}");
            }
            store.close();
        }
    }

    /// Drops the hub as a killed process would: records not yet committed
    /// are lost. For crash tests.
    pub fn abandon(self) {
        if let Some(store) = &self.store {
            store.abandon();
        }
    }

    /// How the hub reaches device connections; set once, after the
    /// transport started. Until then no connection is closed by the hub
    /// and every command stays pending.
    pub fn set_connections(&self, connections: Arc<dyn Connections>) {
        if self.connections.set(connections).is_err() {
            tracing::warn!("hub connections set twice; keeping the first");
        }
    }

    fn state(&self) -> Locked<'_> {
        // A panic while holding the lock cannot leave a map half-updated in
        // a way later calls would misread (each call is one map operation),
        // so a poisoned lock is taken over rather than spreading the panic.
        Locked(
            self.state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Waits for a commit point of [`State::commit_point`].
    fn wait(&self, point: Option<u64>) -> Result<(), HubError> {
        match (point, &self.store) {
            (Some(seq), Some(store)) => store.wait(seq),
            _ => Ok(()),
        }
    }

    fn close_connection(&self, connection: ConnectionRef, reason: &str) {
        if let Some(connections) = self.connections.get() {
            connections.close(connection, reason);
        }
    }

    fn deliver(&self, connection: ConnectionRef, message: HubMessage) -> Result<(), HubMessage> {
        match self.connections.get() {
            Some(connections) => connections.deliver(connection, message),
            None => Err(message),
        }
    }

    /// A command the session could not be handed: pending again. Waits
    /// for the record, so that the caller reports a pending command that a
    /// restart still finds pending.
    fn undispatch(&self, device_id: &str, correlation_id: &str, connection: ConnectionRef) {
        let point = {
            let mut guard = self.state();
            let st = &mut *guard;
            if let Some(device) = st.devices.get_mut(&key(device_id)) {
                for entry in &mut device.commands {
                    if entry.command.correlation_id == correlation_id
                        && entry.dispatch == Dispatch::Sent(connection)
                    {
                        entry.dispatch = Dispatch::Pending;
                        put_command(&mut st.journal, &device.key, entry);
                    }
                }
            }
            st.commit_point()
        };
        if let Err(e) = self.wait(point) {
            // Still pending in memory; a restart reports it UNAVAILABLE
            // (it may have been sent, as far as the disk knows).
            tracing::warn!(
                correlation_id,
                "a command back to pending is not recorded: {e}"
            );
        }
    }
}

impl Hub for MemoryHub {
    fn grants(&self) -> Arc<dyn GrantStore> {
        self.grants.clone()
    }

    fn add_device(&self, ctx: &AuthContext) -> Result<(), HubError> {
        let point = {
            let mut state = self.state();
            let k = key(&ctx.device_id);
            if let Some(device) = state.devices.get(&k) {
                if device.owner != ctx.owner {
                    return Err(HubError::PermissionDenied(format!(
                        "device {} belongs to another owner",
                        ctx.device_id
                    )));
                }
            } else {
                let device = Device::new(&ctx.device_id, &ctx.owner);
                put_device(&mut state.journal, &device);
                state.devices.insert(k, device);
                state.emit(
                    &ctx.owner,
                    &ctx.device_id,
                    ctx.clone(),
                    EventKind::DeviceRegistered,
                );
            }
            // Also for a device registered already: its record may still
            // be on its way to the disk.
            state.commit_point()
        };
        self.wait(point)
    }

    fn owns(&self, owner: &str, device_id: &str) -> bool {
        self.state()
            .devices
            .get(&key(device_id))
            .is_some_and(|d| d.owner == owner)
    }

    fn delete_device(&self, owner: &str, device_id: &str) -> Result<(), HubError> {
        let (removed, point) = {
            let mut state = self.state();
            let k = key(device_id);
            let removed = match state.devices.get(&k) {
                Some(d) if d.owner == owner => state.devices.remove(&k),
                _ => None,
            };
            let Some(mut device) = removed else {
                return Err(HubError::NotFound(format!("device {device_id} not found")));
            };
            if let Some(j) = &mut state.journal {
                j.push(Op::DeleteDevice { key: k });
            }
            state.emit(
                owner,
                &device.device_id,
                owner_ctx(owner, &device.device_id),
                EventKind::DeviceDeleted,
            );
            for entry in device.commands.drain(..) {
                state.finish(entry, CommandOutcome::DeviceDeleted);
            }
            (device, state.commit_point())
        };
        // spec §4.9: the device's connection goes, durable or not.
        if let Some(connection) = removed.connection {
            self.close_connection(connection, "device deleted");
        }
        self.wait(point)
    }

    fn publish(&self, ctx: &AuthContext, links: Vec<StoredLink>) -> Result<(), HubError> {
        if let Some(bad) = links.iter().find(|l| l.href == "/") {
            return Err(HubError::InvalidArgument(format!(
                "invalid resource href {:?}",
                bad.href
            )));
        }
        let mut guard = self.state();
        let st = &mut *guard;
        let device = st
            .devices
            .get_mut(&key(&ctx.device_id))
            .filter(|d| d.owner == ctx.owner)
            .ok_or_else(|| {
                HubError::PermissionDenied(format!("device {} is not registered", ctx.device_id))
            })?;
        let hrefs: Vec<String> = links.iter().map(|l| l.href.clone()).collect();
        for link in links {
            put_link(&mut st.journal, &device.key, &link);
            device.links.insert(link.href.clone(), link);
        }
        let device_id = device.device_id.clone();
        st.emit(
            &ctx.owner,
            &device_id,
            ctx.clone(),
            EventKind::LinksPublished { hrefs },
        );
        Ok(())
    }

    fn unpublish(
        &self,
        ctx: &AuthContext,
        instance_ids: &[i64],
        now_unix: u64,
    ) -> Result<Vec<String>, HubError> {
        let mut guard = self.state();
        let st = &mut *guard;
        let device = st
            .devices
            .get_mut(&key(&ctx.device_id))
            .filter(|d| d.owner == ctx.owner)
            .ok_or_else(|| HubError::NotFound(format!("device {} not found", ctx.device_id)))?;
        // Expired links are gone already; they do not count as unpublished.
        let expired: Vec<String> = device
            .links
            .values()
            .filter(|l| l.valid_until.is_some_and(|t| t <= now_unix))
            .map(|l| l.href.clone())
            .collect();
        for href in &expired {
            device.links.remove(href);
            delete_link(&mut st.journal, &device.key, href);
        }
        let removed: Vec<String> = device
            .links
            .values()
            .filter(|l| instance_ids.is_empty() || instance_ids.contains(&l.instance_id))
            .map(|l| l.href.clone())
            .collect();
        if removed.is_empty() {
            return Err(HubError::NotFound("no such resource links".into()));
        }
        for href in &removed {
            device.links.remove(href);
            delete_link(&mut st.journal, &device.key, href);
            // An unpublished resource leaves the twin.
            if device.twin.remove(href).is_some() {
                delete_resource(&mut st.journal, &device.key, href);
            }
        }
        let device_id = device.device_id.clone();
        st.emit(
            &ctx.owner,
            &device_id,
            ctx.clone(),
            EventKind::LinksUnpublished {
                hrefs: removed.clone(),
            },
        );
        Ok(removed)
    }

    fn links(
        &self,
        owner: &str,
        device_ids: &[&str],
        resource_types: &[&str],
        now_unix: u64,
    ) -> Vec<(String, Vec<StoredLink>)> {
        let mut wanted: Vec<String> = device_ids.iter().map(|d| key(d)).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let state = self.state();
        // Named devices are looked up, not searched for: a session asks for
        // its own device's links (spec §6.4), which must not cost a walk
        // over every device of a large owner.
        let devices: Box<dyn Iterator<Item = &Device>> = if wanted.is_empty() {
            Box::new(state.devices.values())
        } else {
            Box::new(wanted.iter().filter_map(|k| state.devices.get(k)))
        };
        let mut out: Vec<(String, Vec<StoredLink>)> = devices
            .filter(|d| d.owner == owner)
            .map(|d| {
                let links = d
                    .links
                    .values()
                    .filter(|l| l.valid_until.is_none_or(|t| t > now_unix))
                    .filter(|l| {
                        resource_types.is_empty()
                            || resource_types.iter().any(|rt| l.has_resource_type(rt))
                    })
                    .cloned()
                    .collect::<Vec<_>>();
                (d.device_id.clone(), links)
            })
            .filter(|(_, links)| !links.is_empty())
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn set_online(&self, ctx: &AuthContext, online: Online) -> Result<Replaced, HubError> {
        let replaced = {
            let mut guard = self.state();
            let st = &mut *guard;
            // Only a registered device goes online: a device deleted
            // between the ownership check and here stays deleted.
            let device = st
                .devices
                .get_mut(&key(&ctx.device_id))
                .filter(|d| d.owner == ctx.owner)
                .ok_or_else(|| {
                    HubError::NotFound(format!("device {} is not registered", ctx.device_id))
                })?;
            let previous = device
                .connection
                .replace(online.connection)
                .filter(|c| *c != online.connection);
            let event = EventKind::Online {
                connection_id: online.connection_id.clone(),
                protocol: online.protocol,
                service_id: online.service_id.clone(),
            };
            device.status = ConnectionStatus {
                online: true,
                connected_at_ns: online.connected_at_ns,
                protocol: Some(online.protocol),
                service_id: online.service_id,
                connection_id: online.connection_id,
                local_endpoints: Vec::new(),
            };
            self.stats.sign_ins.fetch_add(1, Ordering::Relaxed);
            // spec §6.9: a new connection starts out of sync (or disabled).
            device.twin_sync.state = if device.twin_sync.enabled {
                TwinState::OutOfSync
            } else {
                TwinState::Disabled
            };
            put_device(&mut st.journal, device);
            let device_id = device.device_id.clone();
            st.emit(&ctx.owner, &device_id, ctx.clone(), event);
            previous
        };
        // spec §14 item 13: one connection per device; the newer wins.
        if let Some(older) = replaced {
            self.close_connection(older, "the device signed in on another connection");
        }
        Ok(Replaced(replaced))
    }

    fn set_local_endpoints(&self, device_id: &str, connection: ConnectionRef, eps: Vec<String>) {
        let mut guard = self.state();
        let st = &mut *guard;
        if let Some(device) = st.devices.get_mut(&key(device_id)) {
            if device.is_current(connection) && device.status.local_endpoints != eps {
                device.status.local_endpoints = eps;
                put_device(&mut st.journal, device);
            }
        }
    }

    fn set_offline(&self, device_id: &str, connection: ConnectionRef) {
        let mut guard = self.state();
        let st = &mut *guard;
        let Some(device) = st.devices.get_mut(&key(device_id)) else {
            return;
        };
        // Commands handed to this connection that its session never saw
        // (still in the shard's channel when it closed) were never sent:
        // pending again. The session returns or answers those it saw
        // before it reports OFFLINE.
        for entry in &mut device.commands {
            if entry.dispatch == Dispatch::Sent(connection) {
                entry.dispatch = Dispatch::Pending;
                put_command(&mut st.journal, &device.key, entry);
            }
        }
        if device.is_current(connection) {
            device.connection = None;
            device.status.online = false;
            put_device(&mut st.journal, device);
            let (owner, id) = (device.owner.clone(), device.device_id.clone());
            st.emit(&owner, &id, owner_ctx(&owner, &id), EventKind::Offline);
        }
    }

    fn device(&self, owner: &str, device_id: &str) -> Option<DeviceRecord> {
        self.state()
            .devices
            .get(&key(device_id))
            .filter(|d| d.owner == owner)
            .map(Device::record)
    }

    fn devices(&self, owner: &str) -> Vec<DeviceRecord> {
        let mut out: Vec<DeviceRecord> = self
            .state()
            .devices
            .values()
            .filter(|d| d.owner == owner)
            .map(Device::record)
            .collect();
        out.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        out
    }

    fn twin_enabled(&self, device_id: &str) -> bool {
        self.state()
            .devices
            .get(&key(device_id))
            .is_none_or(|d| d.twin_sync.enabled)
    }

    fn set_twin_state(&self, ctx: &AuthContext, connection: ConnectionRef, twin: TwinState) {
        let mut guard = self.state();
        let st = &mut *guard;
        let Some(device) = st
            .devices
            .get_mut(&key(&ctx.device_id))
            .filter(|d| d.owner == ctx.owner && d.is_current(connection))
        else {
            return;
        };
        if device.twin_sync.state == twin {
            return;
        }
        device.twin_sync.state = twin;
        match twin {
            TwinState::Syncing => device.twin_sync.syncing_at_ns = now_ns(),
            TwinState::InSync => device.twin_sync.in_sync_at_ns = now_ns(),
            _ => {}
        }
        put_device(&mut st.journal, device);
        let id = device.device_id.clone();
        st.emit(
            &ctx.owner,
            &id,
            ctx.clone(),
            EventKind::TwinStateChanged { state: twin },
        );
    }

    fn latest_etags(&self, device_id: &str, max: usize) -> Vec<Vec<u8>> {
        let state = self.state();
        let Some(device) = state.devices.get(&key(device_id)) else {
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
        let mut guard = self.state();
        let st = &mut *guard;
        let device = st
            .devices
            .get_mut(&key(&ctx.device_id))
            .filter(|d| d.owner == ctx.owner)
            .ok_or_else(|| HubError::NotFound(format!("device {} not found", ctx.device_id)))?;
        if !device.is_current(connection) {
            return Err(HubError::PermissionDenied(
                "the device is online on another connection".into(),
            ));
        }
        let at = now_ns();
        let mut events = Vec::new();
        self.stats
            .notifications
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        for change in changes {
            let href = change.href.clone();
            let kept = apply_change(&mut device.twin, connection, change, at);
            if kept {
                self.stats.twin_updates.fetch_add(1, Ordering::Relaxed);
                let r = &device.twin[&href].state;
                put_resource(&mut st.journal, &device.key, r);
                events.push(EventKind::ResourceChanged {
                    href: r.href.clone(),
                    status: r.status,
                    content: r.content.clone(),
                    etag: r.etag.clone(),
                    version: r.version,
                });
            }
        }
        let id = device.device_id.clone();
        for event in events {
            st.emit(&ctx.owner, &id, ctx.clone(), event);
        }
        Ok(())
    }

    fn take_pending_commands(
        &self,
        ctx: &AuthContext,
        connection: ConnectionRef,
        now_ns: u64,
    ) -> Vec<Command> {
        let (taken, point) = {
            let mut guard = self.state();
            let st = &mut *guard;
            let Some(device) = st
                .devices
                .get_mut(&key(&ctx.device_id))
                .filter(|d| d.owner == ctx.owner && d.is_current(connection))
            else {
                return Vec::new();
            };
            let mut expired = Vec::new();
            let mut taken = Vec::new();
            let mut kept = Vec::with_capacity(device.commands.len());
            for mut entry in device.commands.drain(..) {
                if entry.dispatch != Dispatch::Pending {
                    kept.push(entry);
                } else if entry.command.expired(now_ns) {
                    delete_command(&mut st.journal, &device.key, &entry.command.correlation_id);
                    expired.push(entry);
                } else if entry.command.href == "/plgd/s"
                    || device.links.contains_key(&entry.command.href)
                {
                    entry.dispatch = Dispatch::Sent(connection);
                    put_command(&mut st.journal, &device.key, &entry);
                    taken.push(entry.command.clone());
                    kept.push(entry);
                } else {
                    kept.push(entry);
                }
            }
            device.commands = kept;
            let id = device.device_id.clone();
            for entry in expired {
                let c = &entry.command;
                let kind = EventKind::CommandExpired {
                    correlation_id: c.correlation_id.clone(),
                    href: c.href.clone(),
                    operation: c.kind.operation(),
                };
                st.emit(&ctx.owner, &id, ctx.clone(), kind);
                self.stats.commands_expired.fetch_add(1, Ordering::Relaxed);
                st.finish(entry, CommandOutcome::Expired);
            }
            // The dispatch must be on disk before the session may send the
            // commands: a restart reports a dispatched, unanswered command
            // UNAVAILABLE instead of sending it twice (spec §7.3).
            let point = if taken.is_empty() {
                None
            } else {
                st.commit_point()
            };
            (taken, point)
        };
        if let Err(e) = self.wait(point) {
            tracing::error!(device_id = %ctx.device_id, "pending commands stay pending: {e}");
            let ids: Vec<String> = taken.into_iter().map(|c| c.correlation_id).collect();
            self.return_commands(&ctx.device_id, connection, &ids);
            return Vec::new();
        }
        taken
    }

    fn command_result(&self, ctx: &AuthContext, connection: ConnectionRef, result: CommandResult) {
        let mut guard = self.state();
        let st = &mut *guard;
        let Some(device) = st
            .devices
            .get_mut(&key(&ctx.device_id))
            .filter(|d| d.owner == ctx.owner)
        else {
            return;
        };
        let Some(at) = device.commands.iter().position(|e| {
            e.command.correlation_id == result.correlation_id
                && e.dispatch == Dispatch::Sent(connection)
        }) else {
            tracing::debug!(correlation_id = %result.correlation_id, "an answer for no dispatched command");
            return;
        };
        let entry = device.commands.remove(at);
        delete_command(&mut st.journal, &device.key, &result.correlation_id);
        let id = device.device_id.clone();
        let kind = EventKind::CommandAnswered {
            correlation_id: result.correlation_id.clone(),
            href: entry.command.href.clone(),
            operation: entry.command.kind.operation(),
            status: result.status,
            content: result.content.clone(),
        };
        st.emit(&ctx.owner, &id, ctx.clone(), kind);
        self.stats.count_answer(result.status);
        st.finish(entry, CommandOutcome::Answered(result));
        // Someone waits for this answer, and gets it once it is on disk:
        // commit now rather than at the end of the group-commit interval.
        let _ = st.commit_point();
    }

    fn return_commands(
        &self,
        device_id: &str,
        connection: ConnectionRef,
        correlation_ids: &[String],
    ) {
        let mut guard = self.state();
        let st = &mut *guard;
        if let Some(device) = st.devices.get_mut(&key(device_id)) {
            for entry in &mut device.commands {
                if entry.dispatch == Dispatch::Sent(connection)
                    && correlation_ids.contains(&entry.command.correlation_id)
                {
                    entry.dispatch = Dispatch::Pending;
                    put_command(&mut st.journal, &device.key, entry);
                }
            }
        }
    }

    fn resources(&self, owner: &str, device_id: &str) -> Result<Vec<ResourceState>, HubError> {
        let state = self.state();
        let device = state
            .devices
            .get(&key(device_id))
            .filter(|d| d.owner == owner)
            .ok_or_else(|| HubError::NotFound(format!("device {device_id} not found")))?;
        Ok(device.twin.values().map(|r| r.state.clone()).collect())
    }

    fn resource(
        &self,
        owner: &str,
        device_id: &str,
        href: &str,
    ) -> Result<ResourceState, HubError> {
        let state = self.state();
        let device = state
            .devices
            .get(&key(device_id))
            .filter(|d| d.owner == owner)
            .ok_or_else(|| HubError::NotFound(format!("device {device_id} not found")))?;
        if let Some(r) = device.twin.get(href) {
            return Ok(r.state.clone());
        }
        if device.links.contains_key(href) {
            Err(HubError::Unavailable(format!(
                "resource {href} of device {device_id} has no value yet"
            )))
        } else {
            Err(HubError::NotFound(format!(
                "resource {href} of device {device_id} not found"
            )))
        }
    }

    fn submit_command(&self, owner: &str, mut command: Command) -> Result<CommandTicket, HubError> {
        let (tx, rx) = flume::bounded(1);
        let correlation_id = command.correlation_id.clone();
        let (connection, order, point) = {
            let mut guard = self.state();
            let order = guard.take_order();
            let st = &mut *guard;
            let device = st
                .devices
                .get_mut(&key(&command.device_id))
                .filter(|d| d.owner == owner)
                .ok_or_else(|| {
                    HubError::NotFound(format!("device {} not found", command.device_id))
                })?;
            if device
                .commands
                .iter()
                .any(|e| e.command.correlation_id == command.correlation_id)
            {
                return Err(HubError::InvalidArgument(format!(
                    "correlation ID {} is in use",
                    command.correlation_id
                )));
            }
            command.device_id.clone_from(&device.device_id);
            command.issued_at_ns = now_ns();
            self.stats
                .commands_submitted
                .fetch_add(1, Ordering::Relaxed);
            let connection = device.connection;
            let entry = CommandEntry {
                command: command.clone(),
                dispatch: connection.map_or(Dispatch::Pending, Dispatch::Sent),
                waiter: Some(tx),
                order,
            };
            put_command(&mut st.journal, &device.key, &entry);
            device.commands.push(entry);
            let kind = EventKind::CommandPending {
                correlation_id: command.correlation_id.clone(),
                href: command.href.clone(),
                operation: command.kind.operation(),
                valid_until_ns: command.valid_until_ns,
            };
            let id = device.device_id.clone();
            st.emit(owner, &id, owner_ctx(owner, &id), kind);
            // A command for an offline device is acknowledged (202) as
            // pending: it must be on disk first. One for an online device
            // is handed over at once and its records follow with the next
            // group commit: until the device's answer is on disk the caller
            // has been told nothing, and a crash before its record is on
            // disk leaves no copy that a restart could send again (sent at
            // most once, spec §7.3). One wait for the answer, not two.
            let point = match connection {
                Some(_) => None,
                None => st.commit_point(),
            };
            (connection, order, point)
        };
        let device_id = command.device_id.clone();
        if let Err(e) = self.wait(point) {
            self.withdraw(&device_id, &correlation_id, order);
            return Err(e);
        }
        let pending = match connection {
            Some(c) => match self.deliver(c, HubMessage::Command(Box::new(command))) {
                Ok(()) => false,
                Err(_) => {
                    self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%device_id, "the device's connection cannot take the command now; it waits");
                    self.undispatch(&device_id, &correlation_id, c);
                    true
                }
            },
            None => true,
        };
        Ok(CommandTicket {
            correlation_id,
            pending,
            outcome: rx,
        })
    }

    fn pending_commands(&self, owner: &str, device_id: &str) -> Result<Vec<Command>, HubError> {
        let state = self.state();
        let device = state
            .devices
            .get(&key(device_id))
            .filter(|d| d.owner == owner)
            .ok_or_else(|| HubError::NotFound(format!("device {device_id} not found")))?;
        Ok(device.commands.iter().map(|e| e.command.clone()).collect())
    }

    fn cancel_command(
        &self,
        owner: &str,
        device_id: &str,
        correlation_id: &str,
    ) -> Result<(), HubError> {
        let point = {
            let mut guard = self.state();
            let st = &mut *guard;
            let device = st
                .devices
                .get_mut(&key(device_id))
                .filter(|d| d.owner == owner)
                .ok_or_else(|| HubError::NotFound(format!("device {device_id} not found")))?;
            let at = device
                .commands
                .iter()
                .position(|e| e.command.correlation_id == correlation_id)
                .ok_or_else(|| {
                    HubError::NotFound(format!("no pending command {correlation_id}"))
                })?;
            if device.commands[at].dispatch != Dispatch::Pending {
                return Err(HubError::InvalidArgument(format!(
                    "command {correlation_id} was sent to the device already"
                )));
            }
            let entry = device.commands.remove(at);
            delete_command(&mut st.journal, &device.key, correlation_id);
            let id = device.device_id.clone();
            let kind = EventKind::CommandCanceled {
                correlation_id: correlation_id.to_owned(),
                href: entry.command.href.clone(),
                operation: entry.command.kind.operation(),
            };
            st.emit(owner, &id, owner_ctx(owner, &id), kind);
            self.stats.commands_canceled.fetch_add(1, Ordering::Relaxed);
            st.finish(entry, CommandOutcome::Canceled);
            st.commit_point()
        };
        self.wait(point)
    }

    fn set_twin_enabled(
        &self,
        owner: &str,
        device_id: &str,
        enabled: bool,
        force: bool,
    ) -> Result<(), HubError> {
        let (connection, point) = {
            let mut guard = self.state();
            let st = &mut *guard;
            let device = st
                .devices
                .get_mut(&key(device_id))
                .filter(|d| d.owner == owner)
                .ok_or_else(|| HubError::NotFound(format!("device {device_id} not found")))?;
            let changed = device.twin_sync.enabled != enabled;
            device.twin_sync.enabled = enabled;
            if changed || force {
                device.twin_sync.state = if enabled {
                    TwinState::OutOfSync
                } else {
                    TwinState::Disabled
                };
                put_device(&mut st.journal, device);
            }
            let connection = device.connection;
            let id = device.device_id.clone();
            if changed {
                st.emit(
                    owner,
                    &id,
                    owner_ctx(owner, &id),
                    EventKind::TwinEnabledChanged { enabled },
                );
            }
            (connection.filter(|_| changed || force), st.commit_point())
        };
        // Durable before the session acts on it.
        self.wait(point)?;
        if let Some(c) = connection {
            if self
                .deliver(c, HubMessage::Twin { enabled, force })
                .is_err()
            {
                // The session cannot be told: it reconnects with the new
                // setting, so close it.
                self.close_connection(c, "cannot deliver a twin setting to the connection");
            }
        }
        Ok(())
    }

    fn expire_commands(&self, now_ns: u64) {
        let mut guard = self.state();
        let st = &mut *guard;
        let mut expired = Vec::new();
        for device in st.devices.values_mut() {
            if !device
                .commands
                .iter()
                .any(|e| e.dispatch == Dispatch::Pending && e.command.expired(now_ns))
            {
                continue;
            }
            let (gone, kept): (Vec<_>, Vec<_>) = device
                .commands
                .drain(..)
                .partition(|e| e.dispatch == Dispatch::Pending && e.command.expired(now_ns));
            device.commands = kept;
            for entry in gone {
                delete_command(&mut st.journal, &device.key, &entry.command.correlation_id);
                expired.push((device.owner.clone(), device.device_id.clone(), entry));
            }
        }
        for (owner, id, entry) in expired {
            let c = &entry.command;
            let kind = EventKind::CommandExpired {
                correlation_id: c.correlation_id.clone(),
                href: c.href.clone(),
                operation: c.kind.operation(),
            };
            st.emit(&owner, &id, owner_ctx(&owner, &id), kind);
            self.stats.commands_expired.fetch_add(1, Ordering::Relaxed);
            st.finish(entry, CommandOutcome::Expired);
        }
    }

    fn events_after(&self, owner: &str, after: u64, limit: usize) -> Result<Vec<Event>, HubError> {
        match &self.store {
            Some(store) => {
                // What was emitted but is still on its way to disk belongs
                // to the answer too.
                self.flush()?;
                store.events_after(owner, after, limit)
            }
            None => Ok(Vec::new()),
        }
    }

    fn stats(&self) -> &HubStats {
        &self.stats
    }

    fn pending_depth(&self) -> usize {
        self.state()
            .devices
            .values()
            .map(|d| d.commands.len())
            .sum()
    }

    fn subscribe(&self, owner: &str) -> flume::Receiver<Arc<Event>> {
        let (tx, rx) = flume::bounded(SUBSCRIBER_QUEUE);
        self.state().subscribers.push(Subscriber {
            owner: owner.to_owned(),
            tx,
        });
        rx
    }
}

impl MemoryHub {
    /// A command whose acceptance could not be recorded: taken back, as if
    /// never submitted (its issuer is told [`HubError::Unavailable`]).
    fn withdraw(&self, device_id: &str, correlation_id: &str, order: u64) {
        let mut guard = self.state();
        let st = &mut *guard;
        if let Some(device) = st.devices.get_mut(&key(device_id)) {
            if let Some(at) = device
                .commands
                .iter()
                .position(|e| e.order == order && e.command.correlation_id == correlation_id)
            {
                device.commands.remove(at);
                delete_command(&mut st.journal, &device.key, correlation_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Protocol;

    const D: &str = "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a";

    fn ctx(owner: &str) -> AuthContext {
        AuthContext {
            owner: owner.into(),
            device_id: D.into(),
            ..AuthContext::default()
        }
    }

    fn online(c: u128) -> Online {
        Online {
            connection: ConnectionRef(c),
            connected_at_ns: 1,
            protocol: Protocol::CoapsTcp,
            service_id: "s".into(),
            connection_id: "127.0.0.1:1".into(),
        }
    }

    fn link(href: &str, rt: &str) -> StoredLink {
        StoredLink {
            href: href.into(),
            device_id: D.into(),
            instance_id: crate::ocf::rd::instance_id(href),
            resource_types: Some(vec![rt.into()]),
            ..StoredLink::default()
        }
    }

    #[derive(Default)]
    struct Closed(Mutex<Vec<(ConnectionRef, String)>>);
    impl Connections for Closed {
        fn close(&self, c: ConnectionRef, reason: &str) {
            self.0.lock().unwrap().push((c, reason.into()));
        }
        fn deliver(&self, _: ConnectionRef, message: HubMessage) -> Result<(), HubMessage> {
            Err(message)
        }
    }

    #[test]
    fn a_device_has_one_owner() {
        let hub = MemoryHub::new();
        hub.add_device(&ctx("alice")).unwrap();
        hub.add_device(&ctx("alice")).unwrap();
        assert!(matches!(
            hub.add_device(&ctx("bob")),
            Err(HubError::PermissionDenied(_))
        ));
        assert!(hub.owns("alice", &D.to_uppercase()));
        assert!(!hub.owns("bob", D));
    }

    #[test]
    fn unpublish_by_instance_and_all() {
        let hub = MemoryHub::new();
        let c = ctx("alice");
        hub.add_device(&c).unwrap();
        hub.publish(&c, vec![link("/a", "x"), link("/b", "y")])
            .unwrap();
        assert_eq!(hub.links("alice", &[], &["y"], 0)[0].1.len(), 1);
        assert!(hub.unpublish(&c, &[999], 0).is_err());
        let ins = crate::ocf::rd::instance_id("/a");
        assert_eq!(hub.unpublish(&c, &[ins], 0).unwrap(), vec!["/a"]);
        assert_eq!(hub.unpublish(&c, &[], 0).unwrap(), vec!["/b"]);
        assert!(hub.unpublish(&c, &[], 0).is_err());
        assert!(hub.links("alice", &[], &[], 0).is_empty());
    }

    #[test]
    fn root_href_is_refused() {
        let hub = MemoryHub::new();
        let c = ctx("alice");
        hub.add_device(&c).unwrap();
        assert!(matches!(
            hub.publish(&c, vec![link("/", "x")]),
            Err(HubError::InvalidArgument(_))
        ));
    }

    #[test]
    fn offline_from_an_older_connection_is_ignored_and_delete_closes() {
        let hub = MemoryHub::new();
        let closed = Arc::new(Closed::default());
        hub.set_connections(closed.clone());
        let c = ctx("alice");
        hub.add_device(&c).unwrap();
        assert!(hub.set_online(&ctx("bob"), online(1)).is_err());
        assert_eq!(hub.set_online(&c, online(1)), Ok(Replaced(None)));
        assert_eq!(
            hub.set_online(&c, online(2)),
            Ok(Replaced(Some(ConnectionRef(1))))
        );
        hub.set_offline(D, ConnectionRef(1));
        assert!(hub.device("alice", D).unwrap().status.online);
        assert!(hub.device("bob", D).is_none());
        hub.delete_device("alice", D).unwrap();
        assert_eq!(
            closed.0.lock().unwrap().as_slice(),
            &[
                (
                    ConnectionRef(1),
                    "the device signed in on another connection".to_string()
                ),
                (ConnectionRef(2), "device deleted".to_string())
            ]
        );
        assert!(hub.devices("alice").is_empty());
        assert!(hub.delete_device("alice", D).is_err());
    }
}
