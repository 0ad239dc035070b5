//! `storm`: N signed-up twin devices connect, sign in, publish and are
//! observed by the gateway (IN_SYNC, spec §6.6/§6.9); then all of them
//! disconnect at once and, once the hub shows every one OFFLINE, all of
//! them reconnect at once: TCP, mutual TLS, CSM, sign-in (spec §5.4), and
//! the gateway's twin set-up again (`GET /oic/res`, one observation per
//! resource, spec §6.6). No device re-publishes: the hub keeps the links.
//!
//! Two views of "back in sync":
//! - the devices': every resource observed again on the new connection
//!   (the last Observe registration answered), a client clock;
//! - the hub's (the one reported as the recovery time): `GET
//!   /api/v1/devices` shows each device ONLINE and `twinSynchronization`
//!   IN_SYNC with `inSyncAt` (the hub's clock, Unix ns) after the storm
//!   began; recovery = max(`inSyncAt`) − start. The API is only read
//!   after the devices' view is complete, so its cost stays out of the
//!   storm's CPU figure.
//!
//! The devices are non-blocking state machines (rustls over `mio`), a few
//! driver threads, so that every device really is in flight at once.
//! Bounded: each attempt has [`ATTEMPT_TIMEOUT`], a failed attempt is
//! retried [`ATTEMPTS`] − 1 times after [`RETRY_AFTER`] (a device that
//! lost its connection reconnects), each phase has a deadline, and the
//! user can interrupt.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_gateway::coap::{deframer, signal, Code, MessageRef};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::pki_types::ServerName;
use rustls::ClientConnection;
use serde_json::{json, Value};

use crate::device::{DeviceError, Stage};
use crate::fleet::Registered;
use crate::http::Http;
use crate::load::{self, Errors, Percentiles};
use crate::twin::TwinModel;
use crate::{check_health, live, ocf, procfs, round, Cli, Context, Failure};

/// Largest message accepted from the gateway.
const MAX_MESSAGE: usize = 1 << 20;
/// Attempts per device and phase (the first and its retries).
const ATTEMPTS: u32 = 3;
/// A device whose attempt failed tries again after this.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// One attempt, from TCP connect to every resource observed.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Devices connecting at once per driver thread in the first (paced)
/// connect; the storm has no limit.
const PACED_IN_FLIGHT: usize = 32;
/// Time-out of HTTP calls to the API.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the hub may take to show a state change of every device.
const HUB_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Handshaking,
    AwaitCsm,
    AwaitSignIn,
    AwaitPublish,
    Syncing,
    Synced,
}

impl State {
    fn stage(self) -> Stage {
        match self {
            State::Connecting => Stage::Connect,
            State::Handshaking => Stage::Tls,
            State::AwaitCsm => Stage::Csm,
            State::AwaitSignIn => Stage::SignIn,
            State::AwaitPublish | State::Syncing | State::Synced => Stage::Request,
        }
    }
}

/// One connection of a device: a non-blocking rustls client.
struct Conn {
    sock: TcpStream,
    tls: ClientConnection,
    /// Plaintext received and not yet parsed.
    buf: Vec<u8>,
    /// Plaintext to send.
    out: Vec<u8>,
    twin: TwinModel,
    state: State,
    publish: bool,
    next_token: u64,
    sign_in_token: [u8; 8],
    publish_token: [u8; 8],
    started: Instant,
    tcp_at: Option<Instant>,
    tls_at: Option<Instant>,
    csm_at: Option<Instant>,
    signed_in_at: Option<Instant>,
    synced_at: Option<Instant>,
}

fn err(stage: Stage, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::new(stage, e)
}

impl Conn {
    fn start(
        addr: SocketAddr,
        device: &StormDevice,
        resources: usize,
        publish: bool,
    ) -> Result<Conn, DeviceError> {
        let started = Instant::now();
        let sock = TcpStream::connect(addr).map_err(|e| err(Stage::Connect, e))?;
        let name = ServerName::try_from("localhost").map_err(|e| err(Stage::Tls, e))?;
        let tls = ClientConnection::new(device.registered.config.clone(), name)
            .map_err(|e| err(Stage::Tls, e))?;
        Ok(Conn {
            sock,
            tls,
            buf: Vec::new(),
            out: Vec::new(),
            twin: TwinModel::new(&device.id, resources),
            state: State::Connecting,
            publish,
            next_token: 1,
            sign_in_token: [0; 8],
            publish_token: [0; 8],
            started,
            tcp_at: None,
            tls_at: None,
            csm_at: None,
            signed_in_at: None,
            synced_at: None,
        })
    }

    fn token(&mut self) -> [u8; 8] {
        self.next_token += 1;
        self.next_token.to_be_bytes()
    }

    /// Progress after a readiness event (or a sweep): reads what arrived,
    /// answers, moves the state on, writes.
    fn step(&mut self, device: &StormDevice) -> Result<(), DeviceError> {
        if self.state == State::Connecting {
            if let Some(e) = self.sock.take_error().map_err(|e| err(Stage::Connect, e))? {
                return Err(err(Stage::Connect, e));
            }
            match self.sock.peer_addr() {
                Ok(_) => {
                    self.tcp_at = Some(Instant::now());
                    self.state = State::Handshaking;
                    let _ = self.sock.set_nodelay(true);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotConnected | io::ErrorKind::WouldBlock
                    ) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(err(Stage::Connect, e)),
            }
        }
        let stage = self.state.stage();
        self.read().map_err(|e| err(stage, e))?;
        if self.state == State::Handshaking && !self.tls.is_handshaking() {
            self.tls_at = Some(Instant::now());
            self.state = State::AwaitCsm;
        }
        let buf = std::mem::take(&mut self.buf);
        let mut consumed = 0;
        let mut result = Ok(());
        while result.is_ok() {
            match deframer::next_message(&buf[consumed..], MAX_MESSAGE) {
                Ok(Some((m, len))) => {
                    consumed += len;
                    result = self.on_message(&m, device);
                }
                Ok(None) => break,
                Err(e) => result = Err(err(self.state.stage(), e)),
            }
        }
        self.buf = buf;
        self.buf.drain(..consumed);
        result?;
        if self.state == State::Syncing && self.twin.all_observed() {
            self.synced_at = Some(Instant::now());
            self.state = State::Synced;
        }
        let stage = self.state.stage();
        self.flush().map_err(|e| err(stage, e))
    }

    /// Reads TLS records until the socket would block (bounded), moving
    /// the plaintext into `buf`.
    fn read(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 16384];
        for _ in 0..1024 {
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => return Err(io::Error::other("closed by the gateway")),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = self.tls.process_new_packets() {
                // Send our alert before giving up.
                let _ = self.flush();
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            loop {
                match self.tls.reader().read(&mut chunk) {
                    Ok(0) => return Err(io::Error::other("close_notify from the gateway")),
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    fn on_message(&mut self, m: &MessageRef<'_>, device: &StormDevice) -> Result<(), DeviceError> {
        let stage = self.state.stage();
        match m.code {
            Code::PING => {
                signal::write_pong(&mut self.out, m.token, false);
            }
            Code::CSM if self.state == State::AwaitCsm => {
                self.csm_at = Some(Instant::now());
                let csm = self.token();
                signal::write_csm(&mut self.out, &csm, None, false);
                self.sign_in_token = self.token();
                ocf::write_post(
                    &mut self.out,
                    &self.sign_in_token,
                    &["oic", "sec", "session"],
                    &device.registered.sign_in_body,
                );
                self.state = State::AwaitSignIn;
            }
            Code::RELEASE | Code::ABORT => {
                return Err(err(stage, format!("the gateway sent {}", m.code)));
            }
            c if c.is_request() => self.twin.answer(m, &mut self.out),
            c if c.is_response() => {
                let answered = |what: &str| {
                    err(
                        stage,
                        format!(
                            "{what} answered {}: {}",
                            m.code,
                            String::from_utf8_lossy(m.payload)
                        ),
                    )
                };
                if self.state == State::AwaitSignIn && m.token == self.sign_in_token {
                    if m.code != Code::CHANGED {
                        return Err(answered("sign-in"));
                    }
                    self.signed_in_at = Some(Instant::now());
                    if self.publish {
                        self.publish_token = self.token();
                        let body = self.twin.publish_body();
                        ocf::write_post(&mut self.out, &self.publish_token, &["oic", "rd"], &body);
                        self.state = State::AwaitPublish;
                    } else {
                        self.state = State::Syncing;
                    }
                } else if self.state == State::AwaitPublish && m.token == self.publish_token {
                    if m.code != Code::CHANGED {
                        return Err(answered("POST /oic/rd"));
                    }
                    self.state = State::Syncing;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.tls.writer().write_all(&self.out)?;
            self.out.clear();
        }
        if self.state == State::Connecting {
            return Ok(());
        }
        for _ in 0..1024 {
            if !self.tls.wants_write() {
                break;
            }
            match self.tls.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn close(mut self, poll: &Poll) {
        self.tls.send_close_notify();
        let _ = self.flush();
        let _ = poll.registry().deregister(&mut self.sock);
    }
}

/// A signed-up device of the storm.
struct StormDevice {
    id: String,
    registered: Registered,
}

/// A device on a driver thread.
struct Slot {
    device: StormDevice,
    conn: Option<Conn>,
    attempts: u32,
    retry_at: Option<Instant>,
    /// Synced or given up in the current phase.
    done: bool,
}

#[derive(Clone, Copy)]
enum Cmd {
    /// Every device connects, signs in (and with `publish` publishes its
    /// resources) and waits until the gateway observes them all; at most
    /// `in_flight` devices of a thread at once.
    Connect {
        publish: bool,
        in_flight: usize,
        deadline: Instant,
    },
    /// Every device closes (close_notify, then the socket).
    Close,
}

/// What a thread saw in one phase.
struct PhaseReport {
    /// TCP connect to the gateway's CSM (TCP, mutual TLS, the gateway's
    /// verification of the device certificate).
    handshake: Histogram<u64>,
    tcp: Histogram<u64>,
    tls: Histogram<u64>,
    /// Our CSM + sign-in sent to its 2.04.
    sign_in: Histogram<u64>,
    /// TCP connect to the last resource observed (device view of IN_SYNC).
    synced: Histogram<u64>,
    synced_count: u64,
    failed_devices: u64,
    retries: u64,
    errors: Errors,
    /// Connections the gateway closed after their device was in sync.
    closed_by_gateway: u64,
    last_synced: Option<Instant>,
    /// When the last first attempt of the phase was started.
    last_started: Option<Instant>,
    closed: u64,
}

impl PhaseReport {
    fn new() -> PhaseReport {
        PhaseReport {
            handshake: load::histogram(),
            tcp: load::histogram(),
            tls: load::histogram(),
            sign_in: load::histogram(),
            synced: load::histogram(),
            synced_count: 0,
            failed_devices: 0,
            retries: 0,
            errors: Errors::default(),
            closed_by_gateway: 0,
            last_synced: None,
            last_started: None,
            closed: 0,
        }
    }

    fn add(&mut self, o: &PhaseReport) {
        let _ = self.handshake.add(&o.handshake);
        let _ = self.tcp.add(&o.tcp);
        let _ = self.tls.add(&o.tls);
        let _ = self.sign_in.add(&o.sign_in);
        let _ = self.synced.add(&o.synced);
        self.synced_count += o.synced_count;
        self.failed_devices += o.failed_devices;
        self.retries += o.retries;
        self.errors.add(&o.errors);
        self.closed_by_gateway += o.closed_by_gateway;
        self.last_synced = self.last_synced.max(o.last_synced);
        self.last_started = self.last_started.max(o.last_started);
        self.closed += o.closed;
    }

    fn record_synced(&mut self, c: &Conn) {
        let since = |t: Option<Instant>, from: Option<Instant>| {
            t.zip(from).map(|(t, f)| t.saturating_duration_since(f))
        };
        let start = Some(c.started);
        if let Some(d) = since(c.tcp_at, start) {
            load::record(&mut self.tcp, d);
        }
        if let Some(d) = since(c.tls_at, c.tcp_at) {
            load::record(&mut self.tls, d);
        }
        if let Some(d) = since(c.csm_at, start) {
            load::record(&mut self.handshake, d);
        }
        if let Some(d) = since(c.signed_in_at, c.csm_at) {
            load::record(&mut self.sign_in, d);
        }
        if let Some(d) = since(c.synced_at, start) {
            load::record(&mut self.synced, d);
        }
        self.synced_count += 1;
        self.last_synced = self.last_synced.max(c.synced_at);
    }

    fn json(&self) -> Value {
        let p = |h: &Histogram<u64>| Percentiles::of(h);
        json!({
            "synced": self.synced_count,
            "failed_devices": self.failed_devices,
            "retries": self.retries,
            "errors": self.errors,
            "closed_by_gateway_after_sync": self.closed_by_gateway,
            "stages_us": {
                "handshake": p(&self.handshake),
                "tcp_connect": p(&self.tcp),
                "tls": p(&self.tls),
                "sign_in": p(&self.sign_in),
                "in_sync_device_view": p(&self.synced),
            },
        })
    }
}

/// One driver thread: its devices, one `mio` poller.
fn drive(
    addr: SocketAddr,
    resources: usize,
    devices: Vec<StormDevice>,
    commands: Receiver<Cmd>,
    reports: Sender<PhaseReport>,
    interrupted: Arc<AtomicBool>,
    hard_deadline: Instant,
) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut slots: Vec<Slot> = devices
        .into_iter()
        .map(|device| Slot {
            device,
            conn: None,
            attempts: 0,
            retry_at: None,
            done: true,
        })
        .collect();
    let mut events = Events::with_capacity(1024);
    // The phase in progress: (publish, in_flight limit, deadline), the
    // devices still to start, the report so far.
    let mut phase: Option<(bool, usize, Instant)> = None;
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut report = PhaseReport::new();
    let mut in_flight = 0usize;
    let mut last_sweep = Instant::now();
    let mut last_check = Instant::now();
    let mut idle_closed = 0u64;
    loop {
        if interrupted.load(Ordering::Relaxed) || Instant::now() >= hard_deadline {
            break;
        }
        match commands.try_recv() {
            Ok(Cmd::Connect {
                publish,
                in_flight: limit,
                deadline,
            }) => {
                phase = Some((publish, limit.max(1), deadline));
                report = PhaseReport::new();
                in_flight = 0;
                queue = (0..slots.len()).collect();
                for s in &mut slots {
                    s.attempts = 0;
                    s.retry_at = None;
                    s.done = false;
                }
            }
            Ok(Cmd::Close) => {
                let mut r = PhaseReport::new();
                for s in &mut slots {
                    if let Some(c) = s.conn.take() {
                        c.close(&poll);
                        r.closed += 1;
                    }
                }
                r.closed_by_gateway = std::mem::take(&mut idle_closed);
                let _ = reports.send(r);
            }
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => break,
        }
        let now = Instant::now();
        if let Some((publish, limit, deadline)) = phase {
            // Start first attempts up to the limit, and retries when due.
            while in_flight < limit {
                let Some(i) = queue.pop_front() else { break };
                in_flight += 1;
                start(
                    &mut slots[i],
                    i,
                    addr,
                    resources,
                    publish,
                    &poll,
                    &mut report,
                    &mut in_flight,
                );
                report.last_started = Some(Instant::now());
            }
            // Retries when due, attempts that took too long: every 100 ms.
            if now.saturating_duration_since(last_check) >= Duration::from_millis(100) {
                last_check = now;
                for (i, s) in slots.iter_mut().enumerate() {
                    if s.retry_at.is_some_and(|t| now >= t) {
                        s.retry_at = None;
                        report.retries += 1;
                        start(
                            s,
                            i,
                            addr,
                            resources,
                            publish,
                            &poll,
                            &mut report,
                            &mut in_flight,
                        );
                    }
                    let late = s.conn.as_ref().is_some_and(|c| {
                        c.state != State::Synced && now - c.started >= ATTEMPT_TIMEOUT
                    });
                    if late {
                        let stage = s.conn.as_ref().map_or(Stage::Connect, |c| c.state.stage());
                        fail(
                            s,
                            &poll,
                            err(stage, "attempt timed out"),
                            &mut report,
                            &mut in_flight,
                        );
                    }
                }
            }
            let all_done = queue.is_empty() && slots.iter().all(|s| s.done);
            if all_done || now >= deadline {
                for s in slots.iter_mut().filter(|s| !s.done) {
                    s.done = true;
                    s.retry_at = None;
                    report.failed_devices += 1;
                    report.errors.record(&err(
                        s.conn.as_ref().map_or(Stage::Connect, |c| c.state.stage()),
                        "phase deadline reached",
                    ));
                    if let Some(c) = s.conn.take() {
                        c.close(&poll);
                    }
                }
                queue.clear();
                phase = None;
                report.closed_by_gateway += std::mem::take(&mut idle_closed);
                let _ = reports.send(std::mem::replace(&mut report, PhaseReport::new()));
            }
        }
        match poll.poll(&mut events, Some(Duration::from_millis(5))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        let mut touched: Vec<usize> = events.iter().map(|e| e.token().0).collect();
        // Edge-triggered readiness: a read that stopped at its bound left
        // bytes behind; a sweep every second steps every connection.
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            last_sweep = Instant::now();
            touched = (0..slots.len()).collect();
        }
        for i in touched {
            let Some(s) = slots.get_mut(i) else { continue };
            let Some(c) = s.conn.as_mut() else { continue };
            let was_synced = c.state == State::Synced;
            match c.step(&s.device) {
                Ok(()) => {
                    if !was_synced && c.state == State::Synced && !s.done {
                        report.record_synced(c);
                        s.done = true;
                        in_flight = in_flight.saturating_sub(1);
                    }
                }
                Err(e) if was_synced => {
                    // A device in sync whose connection the gateway
                    // closed: counted, not retried.
                    let _ = e;
                    if let Some(c) = s.conn.take() {
                        c.close(&poll);
                    }
                    if phase.is_some() {
                        report.closed_by_gateway += 1;
                    } else {
                        idle_closed += 1;
                    }
                }
                Err(e) if phase.is_some() && !s.done => {
                    fail(s, &poll, e, &mut report, &mut in_flight);
                }
                Err(_) => {
                    if let Some(c) = s.conn.take() {
                        c.close(&poll);
                    }
                    idle_closed += 1;
                }
            }
        }
    }
    for s in &mut slots {
        if let Some(c) = s.conn.take() {
            c.close(&poll);
        }
    }
    Ok(())
}

/// Starts an attempt of device `i` (its previous connection closed).
#[allow(clippy::too_many_arguments)]
fn start(
    s: &mut Slot,
    i: usize,
    addr: SocketAddr,
    resources: usize,
    publish: bool,
    poll: &Poll,
    report: &mut PhaseReport,
    in_flight: &mut usize,
) {
    if let Some(c) = s.conn.take() {
        c.close(poll);
    }
    s.attempts += 1;
    let conn = Conn::start(addr, &s.device, resources, publish).and_then(|mut c| {
        poll.registry()
            .register(
                &mut c.sock,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| err(Stage::Connect, e))?;
        Ok(c)
    });
    match conn {
        Ok(c) => s.conn = Some(c),
        Err(e) => fail(s, poll, e, report, in_flight),
    }
}

/// An attempt failed: retried after [`RETRY_AFTER`] unless it was the
/// last one.
fn fail(
    s: &mut Slot,
    poll: &Poll,
    e: DeviceError,
    report: &mut PhaseReport,
    in_flight: &mut usize,
) {
    report.errors.record(&e);
    if let Some(c) = s.conn.take() {
        c.close(poll);
    }
    if s.attempts < ATTEMPTS {
        s.retry_at = Some(Instant::now() + RETRY_AFTER);
    } else {
        s.done = true;
        s.retry_at = None;
        report.failed_devices += 1;
        *in_flight = in_flight.saturating_sub(1);
    }
}

/// The driver threads and their channels.
struct Drivers {
    commands: Vec<Sender<Cmd>>,
    reports: Receiver<PhaseReport>,
    handles: Vec<std::thread::JoinHandle<io::Result<()>>>,
}

impl Drivers {
    fn start(
        addr: SocketAddr,
        resources: usize,
        devices: Vec<StormDevice>,
        threads: usize,
        interrupted: &Arc<AtomicBool>,
        hard_deadline: Instant,
    ) -> Drivers {
        let threads = threads.clamp(1, devices.len().max(1));
        let mut shares: Vec<Vec<StormDevice>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, d) in devices.into_iter().enumerate() {
            shares[i % threads].push(d);
        }
        let (report_tx, reports) = mpsc::channel();
        let mut commands = Vec::new();
        let mut handles = Vec::new();
        for share in shares {
            let (tx, rx) = mpsc::channel();
            commands.push(tx);
            let (report_tx, interrupted) = (report_tx.clone(), interrupted.clone());
            handles.push(std::thread::spawn(move || {
                drive(
                    addr,
                    resources,
                    share,
                    rx,
                    report_tx,
                    interrupted,
                    hard_deadline,
                )
            }));
        }
        Drivers {
            commands,
            reports,
            handles,
        }
    }

    /// Sends `cmd` to every thread and sums their reports (bounded by
    /// `limit`; a thread that does not answer is an error).
    fn phase(&self, cmd: Cmd, limit: Duration) -> Result<PhaseReport, String> {
        for c in &self.commands {
            c.send(cmd)
                .map_err(|_| "a storm driver thread ended early".to_owned())?;
        }
        let until = Instant::now() + limit;
        let mut total = PhaseReport::new();
        for _ in 0..self.commands.len() {
            let left = until.saturating_duration_since(Instant::now());
            let r = self
                .reports
                .recv_timeout(left)
                .map_err(|e| format!("a storm driver thread did not report: {e}"))?;
            total.add(&r);
        }
        Ok(total)
    }

    fn stop(self) -> Vec<String> {
        drop(self.commands);
        let mut errors = Vec::new();
        for h in self.handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(format!("a storm driver thread failed: {e}")),
                Err(_) => errors.push("a storm driver thread panicked".into()),
            }
        }
        errors
    }
}

/// What `GET /api/v1/devices` shows.
#[derive(Debug, Default, Clone)]
struct HubView {
    devices: u64,
    online: u64,
    offline: u64,
    /// ONLINE and IN_SYNC with `inSyncAt` ≥ the `since` asked for.
    in_sync_since: u64,
    /// The latest such `inSyncAt` (Unix ns).
    last_in_sync_at: u64,
}

fn hub_view(http: &mut Http, since_ns: u64) -> Result<HubView, String> {
    let text = http.get_text("/api/v1/devices")?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("GET /api/v1/devices: {e}"))?;
    let list = v
        .as_array()
        .ok_or("GET /api/v1/devices: not a JSON array")?;
    let mut view = HubView {
        devices: list.len() as u64,
        ..HubView::default()
    };
    for d in list {
        let meta = &d["metadata"];
        let online = meta["connection"]["status"] == "ONLINE";
        if online {
            view.online += 1;
        } else {
            view.offline += 1;
        }
        let twin = &meta["twinSynchronization"];
        let at = twin["inSyncAt"].as_u64().unwrap_or(0);
        if online && twin["state"] == "IN_SYNC" && at >= since_ns {
            view.in_sync_since += 1;
            view.last_in_sync_at = view.last_in_sync_at.max(at);
        }
    }
    Ok(view)
}

/// Reads the hub every 250 ms until `done(view)` (bounded by
/// [`HUB_WAIT`]); the last view and whether it was reached.
fn wait_hub(
    http: &mut Http,
    since_ns: u64,
    interrupted: &AtomicBool,
    done: impl Fn(&HubView) -> bool,
) -> Result<(HubView, bool), String> {
    let until = Instant::now() + HUB_WAIT;
    loop {
        let view = hub_view(http, since_ns)?;
        if done(&view) {
            return Ok((view, true));
        }
        if Instant::now() >= until || interrupted.load(Ordering::Relaxed) {
            return Ok((view, false));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The `di` of a sign-in body ([`ocf::sign_in_body`]).
fn device_id_of(sign_in_body: &[u8]) -> Option<String> {
    let mut d = minicbor::Decoder::new(sign_in_body);
    let n = d.map().ok()??;
    for _ in 0..n {
        let key = d.str().ok()?;
        if key == "di" {
            return d.str().ok().map(str::to_owned);
        }
        d.skip().ok()?;
    }
    None
}

fn print_phase(label: &str, r: &PhaseReport, n: u64) {
    let p = Percentiles::of(&r.handshake);
    let s = Percentiles::of(&r.synced);
    println!(
        "{label}: {}/{n} devices in sync (device view), {} failed, {} retries, {} errors; handshake µs p50 {} p99 {} max {}; in sync µs p50 {} p99 {} max {}",
        r.synced_count,
        r.failed_devices,
        r.retries,
        r.errors.total,
        p.p50,
        p.p99,
        p.max,
        s.p50,
        s.p99,
        s.max
    );
    for e in &r.errors.samples {
        println!("  error: {e}");
    }
}

pub fn scenario(cli: &Cli, ctx: &Context, open_files: u64) -> Result<Value, Failure> {
    let n = cli.devices.unwrap_or(1000).max(1);
    let resources = cli.resources.unwrap_or(1).max(1);
    let hold = cli.duration.unwrap_or(Duration::from_secs(2));
    let threads = cli.threads.unwrap_or(2).max(1);
    if open_files != 0 && n + 64 > open_files {
        return Err(Failure::Usage(format!(
            "{n} devices need more open files than the limit of {open_files} (ulimit -n)"
        )));
    }
    let pki = crate::gateway::Pki::create()?;
    let (mut target, _client) = crate::target(cli, ctx, &pki)?;
    let pid = target.pid;
    let gw_cpu = || pid.and_then(|p| procfs::process_cpu_ticks(p).ok());
    let config = target.config()?.clone();
    let authority = ocf::authority(&config)?;
    let bearer = authority
        .issue_user_token(
            ocf::OWNER,
            Duration::from_secs(3600),
            live::unix_ns() / 1_000_000_000,
        )
        .map(|t| t.token)
        .map_err(|e| format!("cannot issue an API token: {e}"))?;
    let mut http = Http::new(config.api.address, Some(bearer), HTTP_TIMEOUT);

    // Set-up: identities, and one sign-up each (connect, CSM, sign-up,
    // close).
    let (registered, setup) = crate::sign_up_fleet(ctx, &target, &authority, n, &gw_cpu)?;
    let devices: Vec<StormDevice> = registered
        .into_iter()
        .filter_map(|registered| {
            device_id_of(&registered.sign_in_body).map(|id| StormDevice { id, registered })
        })
        .collect();
    let fleet_size = devices.len() as u64;
    if fleet_size == 0 {
        return Err(Failure::Runtime("no device could sign up".into()));
    }
    let phase_limit = Duration::from_secs(120) + Duration::from_millis(10 * n);
    let hard_deadline = Instant::now() + 4 * phase_limit + 2 * HUB_WAIT + hold;
    let drivers = Drivers::start(
        target.addr,
        resources,
        devices,
        threads,
        &ctx.interrupted,
        hard_deadline,
    );

    // 1. First connect, paced: sign in, publish, observed.
    let paced_started = Instant::now();
    let initial = drivers.phase(
        Cmd::Connect {
            publish: true,
            in_flight: PACED_IN_FLIGHT,
            deadline: Instant::now() + phase_limit,
        },
        phase_limit + Duration::from_secs(10),
    )?;
    let paced_s = paced_started.elapsed().as_secs_f64();
    print_phase("first connect (paced)", &initial, fleet_size);
    let (hub_before, all_in_sync) = wait_hub(&mut http, 0, &ctx.interrupted, |v| {
        v.in_sync_since >= initial.synced_count
    })?;
    println!(
        "  hub: {} devices, {} ONLINE, {} IN_SYNC",
        hub_before.devices, hub_before.online, hub_before.in_sync_since
    );
    if !all_in_sync || initial.synced_count == 0 {
        let _ = drivers.stop();
        return Err(Failure::Runtime(format!(
            "the fleet did not get in sync before the storm: {} of {fleet_size} devices in sync by the devices' view, {} by the hub's",
            initial.synced_count, hub_before.in_sync_since
        )));
    }
    crate::sleep_unless(hold, &ctx.interrupted);

    // 2. Everyone disconnects at once; the hub must see them OFFLINE.
    let close_started = Instant::now();
    let closed = drivers.phase(Cmd::Close, Duration::from_secs(60))?;
    let close_s = close_started.elapsed().as_secs_f64();
    let (hub_offline, all_offline) = wait_hub(&mut http, 0, &ctx.interrupted, |v| v.online == 0)?;
    let offline_s = close_started.elapsed().as_secs_f64();
    println!(
        "disconnect: {} connections closed in {close_s:.3} s; hub shows {} OFFLINE, {} ONLINE after {offline_s:.2} s",
        closed.closed, hub_offline.offline, hub_offline.online
    );
    if !all_offline {
        let _ = drivers.stop();
        return Err(Failure::Runtime(format!(
            "{} devices still ONLINE {HUB_WAIT:?} after they disconnected",
            hub_offline.online
        )));
    }

    // 3. The storm: everyone reconnects at once.
    let rss_before = pid.and_then(|p| procfs::vm_rss_bytes(p).ok());
    let threads_before = pid.and_then(|p| procfs::threads_cpu_ticks(p).ok());
    let cpu_before = gw_cpu();
    let self_before = procfs::self_cpu_ticks().ok();
    let t0_ns = live::unix_ns();
    let t0 = Instant::now();
    let storm = drivers.phase(
        Cmd::Connect {
            publish: false,
            in_flight: usize::MAX,
            deadline: Instant::now() + phase_limit,
        },
        phase_limit + Duration::from_secs(10),
    )?;
    let devices_done = t0.elapsed();
    let cpu_after = gw_cpu();
    let self_after = procfs::self_cpu_ticks().ok();
    let threads_after = pid.and_then(|p| procfs::threads_cpu_ticks(p).ok());
    let rss_peak = pid.and_then(|p| procfs::vm_rss_bytes(p).ok());
    print_phase("storm (all at once)", &storm, fleet_size);
    let storm_cpu_s = cpu_before
        .zip(cpu_after)
        .map(|(a, b)| ctx.ticks_to_s(b.since(a).total()));
    let client_cpu_s = self_before
        .zip(self_after)
        .map(|(a, b)| ctx.ticks_to_s(b.since(a).total()));
    let recovery_devices = storm
        .last_synced
        .map(|t| t.saturating_duration_since(t0).as_secs_f64());
    let issue_s = storm
        .last_started
        .map(|t| t.saturating_duration_since(t0).as_secs_f64());
    let (hub_after, hub_all) = wait_hub(&mut http, t0_ns, &ctx.interrupted, |v| {
        v.in_sync_since >= storm.synced_count
    })?;
    let recovery_hub = (hub_after.in_sync_since > 0)
        .then(|| hub_after.last_in_sync_at.saturating_sub(t0_ns) as f64 / 1e9);
    let threads_cpu = threads_before
        .as_ref()
        .zip(threads_after.as_ref())
        .map(|(a, b)| procfs::threads_cpu_delta(a, b, ctx.clk_tck));

    let thread_errors = drivers.stop();
    let health = target.spawned.as_mut().map(|g| g.health());
    drop(target);

    let handshake = Percentiles::of(&storm.handshake);
    println!(
        "  recovery: all {} back IN_SYNC in the hub {} s after the storm began (devices' view {} s; all connects issued within {} s)",
        hub_after.in_sync_since,
        recovery_hub.map_or("?".into(), |s| format!("{s:.3}")),
        recovery_devices.map_or("?".into(), |s| format!("{s:.3}")),
        issue_s.map_or("?".into(), |s| format!("{s:.3}"))
    );
    println!(
        "  gateway CPU over the storm {} s ({} µs per device); client {} CPU-s; gateway VmRSS {} -> {} MiB",
        storm_cpu_s.map_or("?".into(), |s| format!("{s:.2}")),
        storm_cpu_s
            .filter(|_| storm.synced_count > 0)
            .map_or("?".into(), |s| format!("{:.0}", s * 1e6 / storm.synced_count as f64)),
        client_cpu_s.map_or("?".into(), |s| format!("{s:.2}")),
        rss_before.map_or("?".into(), |b| format!("{:.1}", b as f64 / 1048576.0)),
        rss_peak.map_or("?".into(), |b| format!("{:.1}", b as f64 / 1048576.0)),
    );
    if let Some(t) = &threads_cpu {
        println!("  gateway CPU-s by thread: {t:?}");
    }
    for e in &thread_errors {
        println!("  {e}");
    }
    check_health(health.as_ref())?;
    if !hub_all {
        println!(
            "  the hub shows only {} of {} devices back IN_SYNC after {HUB_WAIT:?}",
            hub_after.in_sync_since, storm.synced_count
        );
    }
    if storm.synced_count == 0 {
        return Err(Failure::Runtime("no device got back in sync".into()));
    }
    let opt = |x: Option<f64>, d: i32| x.map(|v| round(v, d));
    let recovery = recovery_hub.unwrap_or(devices_done.as_secs_f64());
    Ok(json!({
        "scenario": "storm",
        "devices": fleet_size,
        "resources_per_device": resources,
        "duration_s": round(recovery, 3),
        "throughput_per_s": round(storm.synced_count as f64 / recovery.max(1e-9), 1),
        "latency_us": handshake,
        "errors": storm.errors,
        "gateway": {
            "pid": pid,
            "shards": cli.gateway.is_none().then_some(cli.shards),
            "rss_bytes": rss_peak,
            "rss_before_bytes": rss_before,
            "cpu_seconds": opt(storm_cpu_s, 3),
            "cpu_us_per_device": opt(
                storm_cpu_s.filter(|_| storm.synced_count > 0)
                    .map(|s| s * 1e6 / storm.synced_count as f64),
                1,
            ),
            "cpu_seconds_by_thread": threads_cpu,
            "bytes_per_device": Value::Null,
            "stderr_lines": health.as_ref().map(|h| h.stderr_lines),
        },
        "baseline": Value::Null,
        "storm": merge(storm.json(), json!({
            "recovery_s": opt(recovery_hub, 3),
            "recovery_source": "hub: max inSyncAt of GET /api/v1/devices - storm start (Unix ns, same machine)",
            "recovery_devices_view_s": opt(recovery_devices, 3),
            "all_back_in_sync_hub": hub_all && hub_after.in_sync_since == fleet_size,
            "hub_in_sync": hub_after.in_sync_since,
            "hub_online": hub_after.online,
            "devices_phase_s": round(devices_done.as_secs_f64(), 3),
            "all_connects_issued_s": opt(issue_s, 3),
            "client_cpu_seconds": opt(client_cpu_s, 3),
        })),
        "initial": merge(initial.json(), json!({
            "what": format!("paced: at most {PACED_IN_FLIGHT} devices per driver thread in flight; sign-in, publish, observed"),
            "wall_s": round(paced_s, 3),
            "hub_in_sync": hub_before.in_sync_since,
        })),
        "disconnect": {
            "closed": closed.closed,
            "close_s": round(close_s, 3),
            "all_offline": all_offline,
            "all_offline_after_s": round(offline_s, 3),
            "closed_by_gateway_while_held": closed.closed_by_gateway,
        },
        "goal": Value::Null,
        "setup": setup,
        "client_threads": threads,
    }))
}

fn merge(a: Value, b: Value) -> Value {
    crate::merge(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_id_is_read_from_a_sign_in_body() {
        let body = ocf::sign_in_body("d-1", "u", "tok");
        assert_eq!(device_id_of(&body).as_deref(), Some("d-1"));
        assert_eq!(device_id_of(&[0xa0]), None);
        assert_eq!(device_id_of(&[0xff]), None);
    }
}
