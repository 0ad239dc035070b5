//! One gateway shard of the in-memory transport on its own thread: the
//! gateway's real [`GatewayService`] and one [`Driver`] per device (what the
//! shards runtime keeps per connection, minus the socket and its task),
//! each paired with an in-memory device (`inmem_device.rs`). Bytes go
//! between them in this thread's buffers; deadlines are kept in a set
//! ordered by instant, as the runtime does (`shards/src/runtime.rs`
//! `fire_timers`), and fired with the real clock during the set-up and a
//! virtual one during the idle phase.
//!
//! Phases, each reported to the main thread (which reads the process's
//! memory in between) and started by it: warm-up (a few devices set up and
//! closed: one-time allocations are not per-device memory), set-up (every
//! device connects, signs up, signs in, is IN_SYNC), idle (keepalives only,
//! for a virtual duration), end.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use coap_gateway::auth::authority::Authority;
use coap_gateway::auth::pki::Ca;
use coap_gateway::gateway::{DeviceConnection, GatewayService, SenderSlot};
use coap_gateway::session::SessionConfig;
use hdrhistogram::Histogram;
use rustls::{RootCertStore, ServerConfig};
use shards::{CloseReason, ConnId, Driver, Endpoint};

use crate::inmem_device::{self, IdleDevice, SetupDevice};
use crate::load;
use crate::ocf;

/// Rounds of bytes back and forth for one device's set-up (handshake,
/// sign-up, sign-in, twin set-up take ~6).
const MAX_ROUNDS: usize = 64;
/// During the set-up, expired deadlines are fired every this many devices.
const TIMER_CHECK_EVERY: u64 = 64;
/// Progress counters are published every this many devices.
const PUBLISH_EVERY: u64 = 256;
/// Distinct error messages kept; the rest are counted as "other".
const ERROR_KINDS: usize = 16;

/// What every shard thread shares.
pub struct Common {
    pub session: SessionConfig,
    pub server: Arc<ServerConfig>,
    pub ca: Ca,
    pub roots: Arc<RootCertStore>,
    pub provider: Arc<rustls::crypto::CryptoProvider>,
    pub authority: Arc<Authority>,
    pub interrupted: Arc<AtomicBool>,
    /// Devices idle so far, over all shards.
    pub up: AtomicU64,
    /// Failed set-ups, over all shards.
    pub failed: AtomicU64,
    /// Set-up stops after this many failures.
    pub max_failures: u64,
    /// Pings answered in the idle phase, over all shards.
    pub pings: AtomicU64,
    /// The set-up stops at this instant.
    pub setup_deadline: Instant,
    /// Granularity of the timer set (`RuntimeConfig::tick`).
    pub tick: Duration,
}

/// What the shard tells the main thread.
pub enum Event {
    WarmedUp,
    SetUp(Box<PhaseReport>),
    Idle(Box<PhaseReport>),
}

/// Where a phase's time went, on this shard's thread.
#[derive(Debug, Default, Clone)]
pub struct PhaseReport {
    pub shard: usize,
    pub wall: Duration,
    /// The shards' walls added up (in a sum of reports; else zero).
    pub busy: Duration,
    /// This thread's CPU time (`/proc/thread-self/schedstat`, ns).
    pub cpu: Duration,
    /// Inside the gateway's code: driver calls (TLS, session, hub) and
    /// the timer set.
    pub gateway: Duration,
    /// Inside the devices' code: rustls client, CoAP, record layer.
    pub device: Duration,
    /// Issuing device certificates and sign-up codes (what a
    /// manufacturer and a user's app do before a device exists).
    pub provisioning: Duration,
    /// Devices set up and idle (set-up), or still open (idle).
    pub devices: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    /// Keepalive Pings answered / other requests / other messages.
    pub pings: u64,
    pub requests: u64,
    pub other_messages: u64,
    /// Connections the gateway closed, and why.
    pub closed_by_gateway: BTreeMap<String, u64>,
    /// Timer events fired (deadlines reached).
    pub timers_fired: u64,
    /// Virtual time covered (idle phase).
    pub virtual_time: Duration,
    /// Devices whose twin was IN_SYNC at the end of the set-up.
    pub in_sync: u64,
    /// Per-device set-up time, µs.
    pub latency: Option<Histogram<u64>>,
}

impl PhaseReport {
    /// The CPU time of the part of the phase that took `part` of the
    /// threads' wall time: the thread CPU split by the wall-time shares
    /// measured around each call (a preempted thread loses wall time in
    /// every part alike; per-call CPU clocks are not readable without
    /// `unsafe`).
    pub fn cpu_share(&self, part: Duration) -> Duration {
        let wall = if self.busy.is_zero() {
            self.wall
        } else {
            self.busy
        };
        if wall.is_zero() {
            return Duration::ZERO;
        }
        self.cpu
            .mul_f64((part.as_secs_f64() / wall.as_secs_f64()).min(1.0))
    }

    fn error(&mut self, e: String) {
        self.failed += 1;
        let n = self.errors.len();
        let key = if self.errors.contains_key(&e) || n < ERROR_KINDS {
            e
        } else {
            "other".into()
        };
        *self.errors.entry(key).or_default() += 1;
    }
}

/// The gateway's per-connection state as the runtime keeps it: the
/// driver and the deadline registered in the timer set.
struct Slot {
    driver: Driver<DeviceConnection>,
    registered: Option<Instant>,
    /// Set when the gateway closed the connection.
    closed: bool,
}

/// Bytes per device of the shard's own bookkeeping, for the report.
pub const SLOT_BYTES: usize = std::mem::size_of::<Slot>();
pub const DRIVER_BYTES: usize = std::mem::size_of::<Driver<DeviceConnection>>();

struct Shard<'a> {
    index: usize,
    common: &'a Common,
    service: GatewayService,
    slots: Vec<Slot>,
    devices: Vec<IdleDevice>,
    timers: BTreeSet<(Instant, u32)>,
    /// Scratch buffers, reused.
    wire: Vec<u8>,
    out: Vec<u8>,
    report: PhaseReport,
}

/// Runs one shard: `warmup` devices set up and closed, then `devices`
/// devices set up and held, then `idle` of virtual time. Stops early (still
/// reporting every phase) when the main thread goes away or on Ctrl-C.
pub fn run(
    index: usize,
    common: Arc<Common>,
    warmup: u64,
    devices: u64,
    idle: Duration,
    events: Sender<Event>,
    go: Receiver<()>,
) {
    let cpu = thread_cpu;
    let mut shard = Shard {
        index,
        common: &common,
        service: GatewayService::new(common.session.clone(), SenderSlot::default()),
        slots: Vec::with_capacity(devices as usize),
        devices: Vec::with_capacity(devices as usize),
        timers: BTreeSet::new(),
        wire: Vec::with_capacity(8192),
        out: Vec::with_capacity(8192),
        report: PhaseReport::default(),
    };

    for _ in 0..warmup {
        // Failures here show again in the set-up; not counted.
        let _ = shard.set_up_one(Instant::now());
    }
    let now = Instant::now();
    for slot in &mut shard.slots {
        slot.driver.abort(now, CloseReason::Shutdown);
    }
    shard.slots.clear();
    shard.devices.clear();
    shard.timers.clear();
    shard.report = PhaseReport::default();
    if events.send(Event::WarmedUp).is_err() || go.recv().is_err() {
        return;
    }

    let (started, cpu0) = (Instant::now(), cpu());
    shard.report.latency = Some(load::histogram());
    let mut unpublished = 0u64;
    for n in 0..devices {
        if common.interrupted.load(Ordering::Relaxed)
            || Instant::now() >= common.setup_deadline
            || common.failed.load(Ordering::Relaxed) >= common.max_failures
        {
            break;
        }
        let t = Instant::now();
        match shard.set_up_one(t) {
            Ok(()) => {
                if let Some(h) = shard.report.latency.as_mut() {
                    load::record(h, t.elapsed());
                }
                unpublished += 1;
            }
            Err(e) => {
                shard.report.error(e);
                common.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        if n % TIMER_CHECK_EVERY == TIMER_CHECK_EVERY - 1 {
            shard.fire_timers(Instant::now());
        }
        if unpublished >= PUBLISH_EVERY {
            common.up.fetch_add(unpublished, Ordering::Relaxed);
            unpublished = 0;
        }
    }
    common.up.fetch_add(unpublished, Ordering::Relaxed);
    shard.fire_timers(Instant::now());
    shard.report.wall = started.elapsed();
    shard.report.cpu = cpu().saturating_sub(cpu0);
    shard.report.in_sync = shard
        .slots
        .iter()
        .filter(|s| {
            s.driver
                .app()
                .and_then(|c| c.session().twin_in_sync())
                .unwrap_or(false)
        })
        .count() as u64;
    shard.report.devices = shard.open();
    let mut report = std::mem::take(&mut shard.report);
    report.shard = index;
    if events.send(Event::SetUp(Box::new(report))).is_err() || go.recv().is_err() {
        return;
    }

    let (started, cpu0) = (Instant::now(), cpu());
    shard.run_idle(idle);
    shard.report.wall = started.elapsed();
    shard.report.cpu = cpu().saturating_sub(cpu0);
    shard.report.devices = shard.open();
    let mut report = std::mem::take(&mut shard.report);
    report.shard = index;
    if events.send(Event::Idle(Box::new(report))).is_err() {
        return;
    }
    // Keep everything until the main thread read the memory.
    let _ = go.recv();
}

impl Shard<'_> {
    fn open(&self) -> u64 {
        self.slots.iter().filter(|s| !s.closed).count() as u64
    }

    fn endpoint(&self, slot: usize) -> Endpoint {
        // A distinct peer per device: the session keeps it as text.
        let s = slot as u32;
        Endpoint {
            peer_addr: SocketAddr::from((
                [10, (s >> 16) as u8, (s >> 8) as u8, s as u8],
                49152 + (s % 16384) as u16,
            )),
            local_addr: SocketAddr::from(([127, 0, 0, 1], 5684)),
            id: ConnId {
                shard: self.index as u32,
                slot: s,
                generation: 1,
            },
        }
    }

    /// One device from nothing to idle: certificate, TLS handshake, CSM,
    /// sign-up, sign-in, the gateway's requests answered, twin IN_SYNC.
    fn set_up_one(&mut self, now: Instant) -> Result<(), String> {
        let common = self.common;
        let t = Instant::now();
        let id = uuid::Uuid::new_v4();
        let config = inmem_device::client_config(&common.ca, &common.roots, &common.provider, id)?;
        let id = id.to_string();
        let code = common
            .authority
            .issue_code(ocf::OWNER, Some(&id), unix_now())
            .map_err(|e| format!("cannot mint a sign-up code: {e}"))?;
        let t1 = Instant::now();
        self.report.provisioning += t1 - t;
        let mut device = SetupDevice::new(config, id, &code)?;
        let t2 = Instant::now();
        self.report.device += t2 - t1;
        let mut driver = Driver::tls(common.server.clone())
            .map_err(|e| format!("TLS server connection: {e}"))?;
        self.report.gateway += t2.elapsed();
        let at = self.endpoint(self.slots.len());

        let mut quiet = false;
        for _ in 0..MAX_ROUNDS {
            self.wire.clear();
            self.out.clear();
            let t = Instant::now();
            device.transmit(&mut self.wire)?;
            let t1 = Instant::now();
            self.report.device += t1 - t;
            if !self.wire.is_empty() {
                driver.receive(&self.service, at, now, &mut self.wire, &mut self.out);
            }
            let t2 = Instant::now();
            self.report.gateway += t2 - t1;
            if let Some(reason) = driver.closed() {
                return Err(format!("the gateway closed the connection: {reason:?}"));
            }
            if !self.out.is_empty() {
                device.receive(&self.out)?;
            }
            self.report.device += t2.elapsed();
            if self.wire.is_empty() && self.out.is_empty() {
                quiet = true;
                break;
            }
        }
        if !quiet {
            return Err(format!("not quiet after {MAX_ROUNDS} rounds"));
        }
        if !device.is_signed_in() {
            return Err("the set-up ended without a sign-in".into());
        }
        // spec §6.6: with nothing to observe the twin is IN_SYNC once the
        // link list is read; a session still waiting is a failed set-up.
        if driver.app().and_then(|c| c.session().twin_in_sync()) == Some(false) {
            return Err("quiet, but the twin is not IN_SYNC".into());
        }
        self.report.requests += u64::from(device.requests_answered);
        self.report.pings += u64::from(device.pings_answered);
        let t = Instant::now();
        let idle = device.into_idle()?;
        self.report.device += t.elapsed();
        self.slots.push(Slot {
            driver,
            registered: None,
            closed: false,
        });
        self.devices.push(idle);
        let key = self.slots.len() - 1;
        let t = Instant::now();
        self.rearm(key);
        self.report.gateway += t.elapsed();
        Ok(())
    }

    /// Registers slot `key`'s next deadline in the timer set, as the
    /// runtime does after every driver call.
    fn rearm(&mut self, key: usize) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let deadline = if slot.driver.closed().is_some() {
            None
        } else {
            slot.driver.deadline()
        };
        if deadline != slot.registered {
            if let Some(old) = slot.registered {
                self.timers.remove(&(old, key as u32));
            }
            if let Some(at) = deadline {
                self.timers.insert((at, key as u32));
            }
            slot.registered = deadline;
        }
    }

    /// Fires every deadline at or before `now`: the gateway acts (a
    /// keepalive Ping, a close), the device answers, the gateway reads
    /// the answer.
    fn fire_timers(&mut self, now: Instant) {
        // Bounded: each slot is fired at most once per call (its next
        // deadline is re-registered after `now`, or the bound stops us).
        for _ in 0..self.slots.len() + 1 {
            let t = Instant::now();
            let Some(&(at, key)) = self.timers.first() else {
                self.report.gateway += t.elapsed();
                break;
            };
            if at > now {
                self.report.gateway += t.elapsed();
                break;
            }
            self.timers.pop_first();
            let k = key as usize;
            let at_ep = self.endpoint(k);
            self.report.timers_fired += 1;
            let Some(slot) = self.slots.get_mut(k) else {
                continue;
            };
            slot.registered = None;
            self.out.clear();
            slot.driver
                .on_timeout(&self.service, at_ep, now, &mut self.out);
            self.report.gateway += t.elapsed();
            self.exchange(k, now);
            let t = Instant::now();
            self.rearm(k);
            self.report.gateway += t.elapsed();
        }
    }

    /// Carries what the gateway wrote (`self.out`) to device `k`, its
    /// answer back, and so on until both are quiet.
    fn exchange(&mut self, k: usize, now: Instant) {
        let at = self.endpoint(k);
        for _ in 0..8 {
            if self.out.is_empty() {
                break;
            }
            let t = Instant::now();
            self.wire.clear();
            let seen = match self.devices.get_mut(k) {
                Some(d) => d.receive(&mut self.out, &mut self.wire),
                None => Err("no such device".into()),
            };
            let t1 = Instant::now();
            self.report.device += t1 - t;
            self.out.clear();
            let Some(slot) = self.slots.get_mut(k) else {
                return;
            };
            match seen {
                Ok(seen) => {
                    self.report.pings += u64::from(seen.pings);
                    self.report.requests += u64::from(seen.requests);
                    self.report.other_messages += u64::from(seen.other);
                    if seen.pings > 0 {
                        self.common
                            .pings
                            .fetch_add(u64::from(seen.pings), Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    self.report.error(format!("idle device: {e}"));
                    slot.driver.abort(now, CloseReason::Io(e));
                }
            }
            if !self.wire.is_empty() {
                slot.driver
                    .receive(&self.service, at, now, &mut self.wire, &mut self.out);
            }
            self.report.gateway += t1.elapsed();
        }
        let Some(slot) = self.slots.get_mut(k) else {
            return;
        };
        if let (Some(reason), false) = (slot.driver.closed(), slot.closed) {
            slot.closed = true;
            let why = match reason {
                CloseReason::Local => slot
                    .driver
                    .app()
                    .and_then(|c| c.session().is_closed().map(|r| format!("{r:?}")))
                    .unwrap_or_else(|| "Local".into()),
                other => format!("{other:?}"),
            };
            *self.report.closed_by_gateway.entry(why).or_default() += 1;
        }
    }

    /// The idle phase: the clock jumps from deadline to deadline (rounded
    /// up to the timer tick, as the runtime's tick task fires them) until
    /// `idle` of virtual time has passed. What it costs is the per-device
    /// timer cost, without waiting for it in real time.
    fn run_idle(&mut self, idle: Duration) {
        let start = Instant::now();
        let end = start + idle;
        let tick = self.common.tick.max(Duration::from_millis(1));
        let mut now = start;
        // Bounded: `now` moves forward by at least one tick per iteration.
        loop {
            if self.common.interrupted.load(Ordering::Relaxed) {
                break;
            }
            let Some(&(at, _)) = self.timers.first() else {
                break;
            };
            if at > end {
                break;
            }
            let ticks = at
                .saturating_duration_since(start)
                .as_nanos()
                .div_ceil(tick.as_nanos());
            let fire_at = start + tick * u32::try_from(ticks).unwrap_or(u32::MAX);
            // Strictly forward: a deadline that stays due after firing
            // waits for the next tick instead of spinning here.
            now = fire_at.max(now + tick).min(end);
            self.fire_timers(now);
            if now >= end {
                break;
            }
        }
        self.report.virtual_time = if self.common.interrupted.load(Ordering::Relaxed) {
            now.saturating_duration_since(start)
        } else {
            idle
        };
    }
}

/// The calling thread's time on a CPU: the first field of
/// `/proc/thread-self/schedstat`, in nanoseconds (the scheduler's own
/// account, not rounded to clock ticks); zero when unreadable.
pub fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
