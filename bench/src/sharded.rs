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
//! runs ([`ShardFleet::start_sending`]) a pacer thread hands the devices,
//! in turn, bursts to write (a message through each device's shard, so no
//! device keeps a timer of its own): at the total rate, or as fast as the
//! window allows, never more than `window` ahead of what the hub has
//! counted (`live::Shared`). Each burst is written as notifications
//! `{"seq", "t"}` with `t` taken at the write.
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
/// The tick of the client shards' timers.
const TICK: Duration = Duration::from_millis(1);
/// How long the pacer sleeps when nothing is due or the window is full.
const PACER_NAP: Duration = Duration::from_micros(200);

/// What the scenario tells a device.
#[derive(Debug, Clone, Copy)]
pub enum Cmd {
    /// Write this many notifications now.
    Notify(u32),
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
    /// The resource of the next notification.
    next_resource: usize,
    closed: bool,
    closed_by_gateway: bool,
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

    /// Writes `n` notifications, resources in turn.
    fn notify(&mut self, n: u32) {
        if self.step != Step::InSync || self.closed {
            return;
        }
        let t_ns = unix_ns();
        let resources = self.twin.resource_count().max(1);
        let mut wrote = 0;
        for _ in 0..n {
            let k = self.next_resource % resources;
            if self
                .twin
                .write_notification(k, t_ns, &mut self.out)
                .is_none()
            {
                break;
            }
            self.next_resource = self.next_resource.wrapping_add(1);
            wrote += 1;
        }
        if wrote > 0 {
            self.fleet.live.sent.fetch_add(wrote, Ordering::Relaxed);
        }
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
        }
    }

    fn on_message(&mut self, _now: Instant, msg: Cmd) {
        match msg {
            Cmd::Notify(n) => self.notify(n),
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
        self.setup_deadline
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
            next_resource: 0,
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
    /// The sending phase's pacer thread.
    pacer: Mutex<Option<std::thread::JoinHandle<()>>>,
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
                pacer: Mutex::new(None),
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

    /// Starts a sending phase whose time origin is `phase_start_ns`: raises
    /// `shared.sending` and starts the pacer.
    pub fn start_sending(&self, plan: SendPlan, phase_start_ns: u64) {
        self.stop_sending();
        self.shared
            .phase_start_ns
            .store(phase_start_ns, Ordering::Release);
        self.shared.sending.store(true, Ordering::Release);
        let ids: Vec<ConnId> = self
            .fleet
            .ids
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .copied()
            .collect();
        let sender = self.runtime.sender();
        let live = self.shared.clone();
        let handle = std::thread::spawn(move || pace(ids, sender, plan, phase_start_ns, live));
        *self.pacer.lock().unwrap() = Some(handle);
    }

    /// Ends the sending phase: lowers the flag and waits for the pacer.
    pub fn stop_sending(&self) {
        self.shared.sending.store(false, Ordering::Release);
        if let Some(pacer) = self.pacer.lock().unwrap().take() {
            let _ = pacer.join();
        }
    }

    /// Closes every device and stops the shards; what each device left.
    pub fn stop(self) -> Vec<Summary> {
        self.fleet.stopping.store(true, Ordering::Relaxed);
        self.stop_sending();
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

/// How many notifications the pacer may hand out now: at a rate, those due
/// by `elapsed` and not handed out yet; as fast as possible, what the
/// window has room for (`in_flight`: handed out and not counted by the
/// hub).
fn budget(plan: &SendPlan, elapsed: Duration, handed_out: u64, in_flight: u64) -> u64 {
    let room = plan.window.saturating_sub(in_flight);
    match plan.rate {
        Some(rate) => {
            let due = (elapsed.as_secs_f64() * rate).floor() as u64 + 1;
            due.saturating_sub(handed_out).min(room)
        }
        None => room,
    }
}

/// The burst of one device: `per_write` as fast as possible; at a rate, an
/// even share of what is due over the devices (one each when on time, more
/// when behind), at most `per_write`.
fn burst(plan: &SendPlan, budget: u64, devices: usize) -> u64 {
    let per_write = plan.per_write.max(1) as u64;
    let each = match plan.rate {
        Some(_) => budget.div_ceil(devices.max(1) as u64).clamp(1, per_write),
        None => per_write,
    };
    each.min(budget)
}

/// The pacer of a sending phase: hands `ids` bursts in turn (the devices
/// take turns, as in the thread driver) until the phase ends.
fn pace(
    ids: Vec<ConnId>,
    sender: shards::ShardSender<Cmd>,
    plan: SendPlan,
    start_ns: u64,
    live: Arc<Shared>,
) {
    if ids.is_empty() {
        return;
    }
    // Notifications handed out before this phase (earlier phases): the
    // window counts against the hub's total.
    let before = live.sent.load(Ordering::Relaxed);
    let mut handed_out = 0u64;
    let mut cursor = 0usize;
    while live.sending.load(Ordering::Acquire) {
        let elapsed = Duration::from_nanos(unix_ns().saturating_sub(start_ns));
        // Handed out but maybe not written yet counts as in flight.
        let in_flight = (before + handed_out)
            .max(live.sent.load(Ordering::Relaxed))
            .saturating_sub(live.acked.load(Ordering::Relaxed));
        let mut left = budget(&plan, elapsed, handed_out, in_flight);
        // One round over the devices at most, then look at the flags again.
        let mut full = false;
        for _ in 0..ids.len() {
            if left == 0 {
                break;
            }
            let n = burst(&plan, left, ids.len());
            match sender.send(ids[cursor], Cmd::Notify(n as u32)) {
                Ok(()) => {
                    left -= n;
                    handed_out += n;
                }
                Err(e) if e.is_full() => {
                    full = true;
                    break;
                }
                // The client shards stopped.
                Err(_) => return,
            }
            cursor = (cursor + 1) % ids.len();
        }
        if left == 0 || full {
            std::thread::sleep(PACER_NAP);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(rate: Option<f64>, per_write: usize, window: u64) -> SendPlan {
        SendPlan {
            rate,
            per_write,
            window,
        }
    }

    #[test]
    fn at_a_rate_what_is_due_is_handed_out_one_per_device_when_on_time() {
        let p = plan(Some(1000.0), 8, 50_000);
        // At 0 the first is due; 10 ms later 11 in all.
        assert_eq!(budget(&p, Duration::ZERO, 0, 0), 1);
        assert_eq!(budget(&p, Duration::from_millis(10), 1, 0), 10);
        assert_eq!(budget(&p, Duration::from_millis(10), 11, 0), 0);
        // On time over 100 devices: one each.
        assert_eq!(burst(&p, 10, 100), 1);
        // Behind by 2,000 over 100 devices: 8 (per_write) each.
        assert_eq!(burst(&p, 2000, 100), 8);
        assert_eq!(burst(&p, 250, 100), 3);
    }

    #[test]
    fn as_fast_as_possible_the_window_bounds_what_is_in_flight() {
        let p = plan(None, 8, 100);
        assert_eq!(budget(&p, Duration::from_secs(5), 1_000_000, 40), 60);
        assert_eq!(budget(&p, Duration::from_secs(5), 1_000_000, 100), 0);
        assert_eq!(budget(&p, Duration::from_secs(5), 1_000_000, 500), 0);
        assert_eq!(burst(&p, 60, 10), 8);
        assert_eq!(burst(&p, 5, 10), 5);
        // A rate never outruns the window either.
        let p = plan(Some(1e9), 8, 100);
        assert_eq!(budget(&p, Duration::from_secs(1), 0, 90), 10);
    }
}
