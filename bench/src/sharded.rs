//! The device fleet on the shards runtime's client side
//! (`shards::Runtime::start_client`): the same thread-per-core executors,
//! io_uring sockets, unbuffered rustls pump and batched writes the gateway
//! runs on, driving sans-IO simulated twin devices (`twin.rs`), so one
//! process drives thousands of devices from a core or two.
//!
//! Each device, once its TLS handshake (with its own identity certificate)
//! is done, sends our CSM and a sign-up (spec §5.2) with a code minted in
//! process, signs in (spec §5.4), publishes its K resources (spec §5.7),
//! answers the gateway's discovery, observations and commands from its
//! twin model (spec §6, §7) and Pings (RFC 8323 §5.4), and is IN_SYNC when
//! the gateway observes every resource (spec §6.6). While a sending phase
//! runs ([`ShardFleet::start_sending`]) it writes notifications
//! `{"seq", "t"}`: at a fixed share of the total rate, evenly staggered, or
//! as fast as the window allows (`per_write` per millisecond), never more
//! than `window` ahead of what the hub has counted (`live::Shared`).
//!
//! Bounded: set-up has a deadline, every device a set-up time-out, and
//! [`ShardFleet::stop`] shuts the shards down (each device closes).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use coap_gateway::auth::authority::Authority;
use coap_gateway::coap::{deframer, signal, Code, MessageRef};
use rustls::pki_types::ServerName;
use shards::{CloseReason, ConnId, ConnInfo, Connect, Connection, Runtime, RuntimeConfig, Service};

use crate::device::{DeviceError, Stage, Timings};
use crate::live::{unix_ns, SendPlan, Shared};
use crate::load::{LoadResult, StageHistograms};
use crate::ocf::{self, Identity};
use crate::twin::TwinModel;

/// Largest message we accept from the gateway.
const MAX_MESSAGE: usize = 1 << 20;
/// How long a device may take from its connect request to IN_SYNC.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Set-up connections in flight at once (connect to IN_SYNC).
const SETUP_IN_FLIGHT: u64 = 256;
/// The tick of the client shards' timers, and of full-speed sending.
const TICK: Duration = Duration::from_millis(1);

/// What the scenario tells a device.
#[derive(Debug, Clone, Copy)]
pub enum Cmd {
    /// Start a sending phase begun at `phase_start` (unix ns).
    Send { plan: SendPlan, phase_start_ns: u64 },
}

/// What a device leaves behind when it closes.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub device_id: String,
    /// Notifications written.
    pub sent: u64,
    /// `v` of each update (`command`), in arrival order.
    pub update_values: Vec<u64>,
    /// The gateway closed it (not us at the end of the run).
    pub closed_by_gateway: bool,
    pub in_sync: bool,
}

/// The state every shard's devices share with the scenario.
struct Fleet {
    addr: SocketAddr,
    identities: Vec<Identity>,
    authority: Arc<Authority>,
    resources: usize,
    total: usize,
    /// Per device: unix ns of its connect request.
    requested_ns: Vec<AtomicU64>,
    live: Arc<Shared>,
    /// Devices IN_SYNC, and failed during set-up.
    in_sync: AtomicU64,
    failed: AtomicU64,
    setup: Mutex<SetupTally>,
    /// Per device, its connection once it is IN_SYNC.
    ids: Mutex<Vec<Option<ConnId>>>,
    summaries: Mutex<HashMap<usize, Summary>>,
    /// The scenario is ending: closes are ours, not the gateway's.
    stopping: AtomicBool,
}

#[derive(Default)]
struct SetupTally {
    latency: Option<StageHistograms>,
    errors: crate::load::Errors,
}

impl Fleet {
    fn fail(&self, e: DeviceError) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.setup.lock().unwrap().errors.record(&e);
    }
}

/// Where a device is in its set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    SigningUp,
    SigningIn,
    Publishing,
    Syncing,
    InSync,
}

/// One simulated device: a `shards::Connection`.
struct FleetDevice {
    index: usize,
    id: ConnId,
    fleet: Arc<Fleet>,
    twin: TwinModel,
    step: Step,
    /// The token of our request in flight (sign-up, sign-in, publish).
    waiting: [u8; 8],
    next_token: u64,
    timings: Timings,
    step_started: Instant,
    setup_deadline: Option<Instant>,
    /// Plaintext to send.
    out: Vec<u8>,
    sending: Option<Sending>,
    closed: bool,
    closed_by_gateway: bool,
}

/// A sending phase.
#[derive(Debug, Clone, Copy)]
struct Sending {
    plan: SendPlan,
    /// Rate mode: this device's interval and the instant of its first
    /// notification; the n-th is due at `first + n * interval`.
    interval: Option<Duration>,
    first: Instant,
    sent_in_phase: u64,
    next_at: Instant,
    next_resource: usize,
}

impl Sending {
    /// Notifications due at `now`, at most `per_write`: in rate mode those
    /// of the device's schedule not sent yet (a device that fell behind
    /// catches up `per_write` at a time); at full speed `per_write`.
    fn owed(&self, now: Instant) -> u64 {
        if now < self.next_at {
            return 0;
        }
        let per_write = self.plan.per_write as u64;
        match self.interval {
            Some(interval) => {
                let due = (now.saturating_duration_since(self.first).as_nanos()
                    / interval.as_nanos().max(1)) as u64
                    + 1;
                due.saturating_sub(self.sent_in_phase).min(per_write)
            }
            None => per_write,
        }
    }

    /// Counts `wrote` of the `owed` notifications and sets the next
    /// instant to act: the next on the schedule, or the next tick when the
    /// window held some back or the device is behind.
    fn advance(&mut self, now: Instant, wrote: u64, owed: u64) {
        self.sent_in_phase += wrote;
        self.next_at = match self.interval {
            Some(interval) => {
                let next = self.first + interval.mul_f64(self.sent_in_phase as f64);
                if wrote < owed || next <= now {
                    now + TICK
                } else {
                    next
                }
            }
            None => now + TICK,
        };
    }
}

impl FleetDevice {
    fn token(&mut self) -> [u8; 8] {
        self.next_token += 1;
        self.next_token.to_be_bytes()
    }

    fn fail(&mut self, stage: Stage, what: impl std::fmt::Display) {
        if self.step != Step::InSync && !self.closed {
            self.fleet.fail(DeviceError::new(stage, what));
        }
        self.closed = true;
    }

    fn stage(&self) -> Stage {
        match self.step {
            Step::SigningUp => Stage::SignUp,
            Step::SigningIn => Stage::SignIn,
            _ => Stage::Request,
        }
    }

    /// Our answer awaited: the next set-up step.
    fn on_response(&mut self, now: Instant, m: &MessageRef<'_>) {
        if m.token != self.waiting || matches!(self.step, Step::Syncing | Step::InSync) {
            return;
        }
        if m.code != Code::CHANGED {
            let stage = self.stage();
            self.fail(
                stage,
                format!(
                    "answered {}: {}",
                    m.code,
                    String::from_utf8_lossy(m.payload)
                ),
            );
            return;
        }
        let took = now - self.step_started;
        self.step_started = now;
        match self.step {
            Step::SigningUp => {
                self.timings.sign_up = Some(took);
                let registration = match ocf::parse_sign_up(m.payload) {
                    Ok(r) => r,
                    Err(e) => return self.fail(Stage::SignUp, e),
                };
                let body = ocf::sign_in_body(
                    self.twin.device_id(),
                    &registration.user_id,
                    &registration.access_token,
                );
                self.waiting = self.token();
                ocf::write_post(
                    &mut self.out,
                    &self.waiting,
                    &["oic", "sec", "session"],
                    &body,
                );
                self.step = Step::SigningIn;
            }
            Step::SigningIn => {
                self.timings.sign_in = Some(took);
                let body = self.twin.publish_body();
                self.waiting = self.token();
                ocf::write_post(&mut self.out, &self.waiting, &["oic", "rd"], &body);
                self.step = Step::Publishing;
            }
            Step::Publishing => self.step = Step::Syncing,
            Step::Syncing | Step::InSync => {}
        }
    }

    fn check_in_sync(&mut self) {
        if self.step == Step::Syncing && self.twin.all_observed() {
            self.step = Step::InSync;
            self.setup_deadline = None;
            let mut tally = self.fleet.setup.lock().unwrap();
            tally
                .latency
                .get_or_insert_with(StageHistograms::new)
                .record(&self.timings);
            drop(tally);
            if let Some(slot) = self.fleet.ids.lock().unwrap().get_mut(self.index) {
                *slot = Some(self.id);
            }
            self.fleet.in_sync.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes what the sending phase owes at `now` and sets the next
    /// instant to act.
    fn send_due(&mut self, now: Instant) {
        let Some(mut s) = self.sending else { return };
        let live = &self.fleet.live;
        if !live.sending.load(Ordering::Acquire) || self.step != Step::InSync {
            self.sending = None;
            return;
        }
        if now < s.next_at {
            return;
        }
        let owed = s.owed(now);
        // The window as the thread driver keeps it (`live.rs`).
        let ahead = live
            .sent
            .load(Ordering::Relaxed)
            .saturating_sub(live.acked.load(Ordering::Relaxed));
        let mut wrote = 0;
        if ahead < s.plan.window {
            let t_ns = unix_ns();
            let resources = self.twin.resource_count().max(1);
            for _ in 0..owed {
                let k = s.next_resource % resources;
                if self
                    .twin
                    .write_notification(k, t_ns, &mut self.out)
                    .is_none()
                {
                    break;
                }
                s.next_resource = s.next_resource.wrapping_add(1);
                wrote += 1;
            }
        }
        if wrote > 0 {
            live.sent.fetch_add(wrote, Ordering::Relaxed);
        }
        s.advance(now, wrote, owed);
        self.sending = Some(s);
    }
}

impl Connection for FleetDevice {
    type Message = Cmd;

    fn on_data(&mut self, now: Instant, data: &[u8]) -> usize {
        let mut used = 0;
        loop {
            match deframer::next_message(&data[used..], MAX_MESSAGE) {
                Ok(Some((m, len))) => {
                    used += len;
                    if m.code == Code::PING {
                        signal::write_pong(&mut self.out, m.token, false);
                        self.fleet.live.pings.fetch_add(1, Ordering::Relaxed);
                    } else if m.code.is_request() {
                        self.twin.answer(&m, &mut self.out);
                        self.fleet.live.requests.fetch_add(1, Ordering::Relaxed);
                    } else if m.code.is_signal() {
                        // The gateway's CSM (RFC 8323 §5.3) and the like.
                    } else {
                        self.on_response(now, &m);
                    }
                    if self.closed {
                        return used;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.fail(self.stage(), format!("bad frame from the gateway: {e}"));
                    return used;
                }
            }
        }
        self.check_in_sync();
        used
    }

    fn on_timeout(&mut self, now: Instant) {
        if self.setup_deadline.is_some_and(|d| now >= d) {
            let stage = self.stage();
            self.fail(
                stage,
                format!(
                    "not IN_SYNC within {SETUP_TIMEOUT:?} (stopped at {:?})",
                    self.step
                ),
            );
            return;
        }
        self.send_due(now);
    }

    fn on_message(&mut self, now: Instant, msg: Cmd) {
        match msg {
            Cmd::Send {
                plan,
                phase_start_ns,
            } => {
                if self.step != Step::InSync {
                    return;
                }
                // The phase's origin in this clock, then this device's
                // place in the rotation: device i of n sends at
                // origin + (i / n + j) × n / rate (rate mode).
                let behind = Duration::from_nanos(unix_ns().saturating_sub(phase_start_ns));
                let origin = now.checked_sub(behind).unwrap_or(now);
                let total = self.fleet.total.max(1) as f64;
                let interval = plan
                    .rate
                    .map(|r| Duration::from_secs_f64(total / r.max(1e-9)));
                let first = match interval {
                    Some(i) => origin + i.mul_f64(self.index as f64 / total),
                    None => origin,
                };
                self.sending = Some(Sending {
                    plan,
                    interval,
                    first,
                    sent_in_phase: 0,
                    next_at: first,
                    next_resource: 0,
                });
                self.send_due(now);
            }
        }
    }

    fn on_shutdown(&mut self, _now: Instant) {
        self.closed = true;
    }

    fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        if self.out.is_empty() {
            return false;
        }
        out.append(&mut self.out);
        true
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match (self.setup_deadline, self.sending.map(|s| s.next_at)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn is_closed(&self) -> bool {
        self.closed
    }

    fn on_closed(&mut self, _now: Instant, reason: &CloseReason) {
        let by_gateway = !matches!(reason, CloseReason::Local | CloseReason::Shutdown)
            && !self.fleet.stopping.load(Ordering::Relaxed);
        if self.step != Step::InSync && !self.closed {
            let stage = self.stage();
            self.fleet
                .fail(DeviceError::new(stage, format!("closed: {reason:?}")));
        }
        if by_gateway {
            self.closed_by_gateway = true;
            self.fleet.live.closed.fetch_add(1, Ordering::Relaxed);
        }
        self.fleet.summaries.lock().unwrap().insert(
            self.index,
            Summary {
                device_id: self.twin.device_id().to_owned(),
                sent: self.twin.sent,
                update_values: std::mem::take(&mut self.twin.update_values),
                closed_by_gateway: self.closed_by_gateway,
                in_sync: self.step == Step::InSync,
            },
        );
    }
}

/// One client shard's factory of devices.
struct FleetService {
    fleet: Arc<Fleet>,
}

impl Service for FleetService {
    type Conn = FleetDevice;

    fn accept(&self, info: &ConnInfo<'_>, now: Instant) -> FleetDevice {
        let index = info.tag as usize;
        let fleet = &self.fleet;
        let identity = &fleet.identities[index];
        let requested = fleet.requested_ns[index].load(Ordering::Relaxed);
        let handshake = Duration::from_nanos(unix_ns().saturating_sub(requested));
        let mut device = FleetDevice {
            index,
            id: info.id,
            fleet: fleet.clone(),
            twin: TwinModel::new(&identity.id, fleet.resources),
            step: Step::SigningUp,
            waiting: [0; 8],
            next_token: (index as u64) << 20,
            timings: Timings {
                // The client shard does TCP and TLS in one go: both are
                // in `tls` here; the gateway's CSM comes with our sign-up.
                tcp_connect: Duration::ZERO,
                tls: handshake,
                first_csm: Duration::ZERO,
                sign_up: None,
                sign_in: None,
            },
            step_started: now,
            setup_deadline: Some(now + SETUP_TIMEOUT),
            out: Vec::with_capacity(512),
            sending: None,
            closed: false,
            closed_by_gateway: false,
        };
        let csm_token = device.token();
        signal::write_csm(&mut device.out, &csm_token, None, false);
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match fleet
            .authority
            .issue_code(identity.owner, Some(&identity.id), secs)
        {
            Ok(code) => {
                device.waiting = device.token();
                let body = ocf::sign_up_body(&identity.id, &code);
                ocf::write_post(
                    &mut device.out,
                    &device.waiting,
                    &["oic", "sec", "account"],
                    &body,
                );
            }
            Err(e) => device.fail(Stage::SignUp, format!("cannot mint a code: {e}")),
        }
        device
    }

    fn connect_failed(&self, tag: u64, _now: Instant, reason: &CloseReason) {
        let stage = match reason {
            CloseReason::Io(_) => Stage::Connect,
            _ => Stage::Tls,
        };
        self.fleet
            .fail(DeviceError::new(stage, format!("device {tag}: {reason:?}")));
    }
}

/// A fleet of twin devices on client shards.
pub struct ShardFleet {
    runtime: Runtime<Cmd>,
    fleet: Arc<Fleet>,
    pub shared: Arc<Shared>,
}

impl ShardFleet {
    /// Starts `shards` client shards and sets up every identity (connect,
    /// sign-up, sign-in, publish, IN_SYNC), at most [`SETUP_IN_FLIGHT`] at
    /// a time, until all are done, `deadline` or an interrupt. Returns the
    /// fleet and the set-up's figures.
    pub fn start(
        addr: SocketAddr,
        identities: Vec<Identity>,
        authority: &Arc<Authority>,
        resources: usize,
        shards: usize,
        deadline: Instant,
        interrupted: &Arc<AtomicBool>,
    ) -> Result<(ShardFleet, LoadResult), String> {
        let total = identities.len();
        let live = Arc::new(Shared::default());
        let fleet = Arc::new(Fleet {
            addr,
            requested_ns: (0..total).map(|_| AtomicU64::new(0)).collect(),
            identities,
            authority: authority.clone(),
            resources,
            total,
            live: live.clone(),
            in_sync: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            setup: Mutex::new(SetupTally::default()),
            ids: Mutex::new(vec![None; total]),
            summaries: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
        });
        let mut config = RuntimeConfig::new(addr, None);
        config.shards = shards.max(1);
        config.tick = TICK;
        config.handshake_timeout = SETUP_TIMEOUT;
        // Not pinned: the spawned gateway pins its shard 0 to the first
        // CPU; `taskset -c 1` keeps the bench off it (perf/README.md).
        config.pin = false;
        let for_shards = fleet.clone();
        let runtime = Runtime::start_client(config, move |_| FleetService {
            fleet: for_shards.clone(),
        })
        .map_err(|e| format!("cannot start the client shards: {e}"))?;
        let name = ServerName::try_from("localhost").expect("a valid DNS name");
        let started = Instant::now();
        let bar = crate::progress::counter("setting up (shards)", total as u64);
        let done = || fleet.in_sync.load(Ordering::Relaxed) + fleet.failed.load(Ordering::Relaxed);
        let mut cut_short = None;
        for index in 0..total {
            // Bounded wait for room in the set-up window.
            loop {
                if interrupted.load(Ordering::Relaxed) {
                    cut_short = Some("interrupted".to_owned());
                } else if Instant::now() >= deadline {
                    cut_short = Some("deadline reached".to_owned());
                }
                if cut_short.is_some() || (index as u64) < done() + SETUP_IN_FLIGHT {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            if cut_short.is_some() {
                break;
            }
            fleet.requested_ns[index].store(unix_ns(), Ordering::Relaxed);
            let request = Connect {
                addr: fleet.addr,
                tls: fleet.identities[index].config.clone(),
                name: name.clone(),
                tag: index as u64,
            };
            if runtime.connect(index % runtime.shards(), request).is_err() {
                cut_short = Some("the client shards stopped".to_owned());
                break;
            }
            bar.set_position(done());
        }
        while cut_short.is_none() && done() < total as u64 {
            if interrupted.load(Ordering::Relaxed) {
                cut_short = Some("interrupted".to_owned());
            } else if Instant::now() >= deadline {
                cut_short = Some("deadline reached".to_owned());
            }
            bar.set_position(done());
            std::thread::sleep(Duration::from_millis(2));
        }
        bar.finish_and_clear();
        let mut load = LoadResult::empty();
        load.wall = started.elapsed();
        load.ok = fleet.in_sync.load(Ordering::Relaxed);
        load.cut_short = cut_short;
        {
            let mut tally = fleet.setup.lock().unwrap();
            load.errors = std::mem::take(&mut tally.errors);
            if let Some(latency) = tally.latency.take() {
                load.latency = latency;
            }
        }
        Ok((
            ShardFleet {
                runtime,
                fleet,
                shared: live,
            },
            load,
        ))
    }

    /// The IDs of the devices that reached IN_SYNC.
    pub fn device_ids(&self) -> Vec<String> {
        let ids = self.fleet.ids.lock().unwrap();
        ids.iter()
            .enumerate()
            .filter(|(_, id)| id.is_some())
            .map(|(i, _)| self.fleet.identities[i].id.clone())
            .collect()
    }

    /// Devices IN_SYNC.
    pub fn held(&self) -> usize {
        self.fleet.in_sync.load(Ordering::Relaxed) as usize
    }

    /// Starts a sending phase: raises `shared.sending` and tells every
    /// device (a message through its shard).
    pub fn start_sending(&self, plan: SendPlan, phase_start_ns: u64) {
        self.shared
            .phase_start_ns
            .store(phase_start_ns, Ordering::Release);
        self.shared.sending.store(true, Ordering::Release);
        let sender = self.runtime.sender();
        let ids: Vec<ConnId> = self
            .fleet
            .ids
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .copied()
            .collect();
        for id in ids {
            let mut msg = Cmd::Send {
                plan,
                phase_start_ns,
            };
            // Bounded retries on a full shard channel.
            for _ in 0..1000 {
                match sender.send(id, msg) {
                    Err(e) if e.is_full() => {
                        msg = e.into_inner();
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    _ => break,
                }
            }
        }
    }

    /// Ends the sending phase (devices see it at their next tick).
    pub fn stop_sending(&self) {
        self.shared.sending.store(false, Ordering::Release);
    }

    /// Closes every device and stops the shards; what each device left.
    pub fn stop(self) -> Vec<Summary> {
        self.fleet.stopping.store(true, Ordering::Relaxed);
        self.shared.sending.store(false, Ordering::Release);
        self.runtime.shutdown();
        self.runtime.join();
        let mut summaries = std::mem::take(&mut *self.fleet.summaries.lock().unwrap());
        let mut out: Vec<Summary> = (0..self.fleet.total)
            .filter_map(|i| summaries.remove(&i))
            .collect();
        out.retain(|s| s.in_sync);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sending(rate: Option<f64>, per_write: usize, first: Instant) -> Sending {
        Sending {
            plan: SendPlan {
                rate,
                per_write,
                window: 1000,
            },
            // 100 devices at 1,000/s: every 100 ms each.
            interval: rate.map(|r| Duration::from_secs_f64(100.0 / r)),
            first,
            sent_in_phase: 0,
            next_at: first,
            next_resource: 0,
        }
    }

    #[test]
    fn a_rated_device_sends_one_per_interval_on_its_own_schedule() {
        let t0 = Instant::now();
        let mut s = sending(Some(1000.0), 8, t0 + Duration::from_millis(30));
        // Before its first slot: nothing.
        assert_eq!(s.owed(t0), 0);
        let at = t0 + Duration::from_millis(30);
        assert_eq!(s.owed(at), 1);
        s.advance(at, 1, 1);
        assert_eq!(s.next_at, t0 + Duration::from_millis(130));
        assert_eq!(s.owed(t0 + Duration::from_millis(129)), 0);
        let at = t0 + Duration::from_millis(130);
        assert_eq!(s.owed(at), 1);
        s.advance(at, 1, 1);
        assert_eq!(s.sent_in_phase, 2);
        assert_eq!(s.next_at, t0 + Duration::from_millis(230));
    }

    #[test]
    fn a_late_device_catches_up_per_write_at_a_time_then_keeps_the_schedule() {
        let t0 = Instant::now();
        let mut s = sending(Some(1000.0), 4, t0);
        // 1 s late: 11 slots are due, 4 go now, the rest at the next ticks.
        let late = t0 + Duration::from_millis(1000);
        assert_eq!(s.owed(late), 4);
        s.advance(late, 4, 4);
        assert_eq!(s.next_at, late + TICK);
        let at = late + TICK;
        assert_eq!(s.owed(at), 4);
        s.advance(at, 4, 4);
        let at = at + TICK;
        assert_eq!(s.owed(at), 3);
        s.advance(at, 3, 3);
        // Caught up: the next slot is the 12th, at 1,100 ms.
        assert_eq!(s.next_at, t0 + Duration::from_millis(1100));
    }

    #[test]
    fn a_window_that_holds_notifications_back_retries_at_the_next_tick() {
        let t0 = Instant::now();
        let mut s = sending(Some(1000.0), 8, t0);
        assert_eq!(s.owed(t0), 1);
        s.advance(t0, 0, 1);
        assert_eq!(s.sent_in_phase, 0);
        assert_eq!(s.next_at, t0 + TICK);
        // Full speed: per_write at every tick.
        let mut s = sending(None, 8, t0);
        assert_eq!(s.owed(t0), 8);
        s.advance(t0, 8, 8);
        assert_eq!(s.next_at, t0 + TICK);
        assert_eq!(s.owed(t0), 0);
    }
}
