//! `raw`: plain CoAP over `coaps+tcp` (RFC 8323), no OCF, so that one
//! client drives two servers: the gateway (`GET /x.plgd.dev/time`, spec
//! §5.10, answered before any sign-in) and libcoap's example server
//! `coap-server-openssl` (Debian `libcoap3-bin`, `GET /time`), both with
//! the same certificate, the same CA and the same mutual-TLS client
//! certificates, in the same run.
//!
//! Per server, in this order (the two servers alternate phase by phase
//! where the open-files limit allows):
//! 1. `--handshakes H` mutual-TLS connects (TCP, full TLS 1.3 handshake
//!    with a client certificate, the server's CSM, close), after H/10 of
//!    warm-up: handshakes per server CPU-second.
//! 2. Requests: `--connections C` connections (one client thread each),
//!    our CSM, then `--requests R` GETs in total with `--window W`
//!    outstanding per connection (a new GET for every answer). Every
//!    answer must be 2.05 with a payload on a token we sent; anything else
//!    is counted as bad. Requests per server CPU-second, latency (send to
//!    answer, so it includes the window's queueing).
//! 3. `--idle N` idle authenticated sessions opened and held (gateway:
//!    signed-in OCF devices, spec §5.4; libcoap: mutual-TLS connections
//!    that sent a CSM and one GET /time answered 2.05), keepalive Pings
//!    answered: server bytes per idle session = VmRSS difference / N, and
//!    the server's CPU over 3 quiet seconds (keepalive work).
//! 4. Requests again, with the N sessions held: whether the cost per
//!    request grows with the number of idle sessions.
//!
//! The server's CPU is `/proc/<pid>/stat` of its process.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use coap_gateway::auth::tls::TlsFiles;
use coap_gateway::coap::{option, signal, Code, MessageWriter};
use hdrhistogram::Histogram;
use rustls::ClientConfig;
use serde_json::{json, Value};

use crate::device::{Device, DeviceError, Stage};
use crate::load::{self, Errors, Percentiles, Plan, IO_TIMEOUT};
use crate::procfs::{self, CpuTicks};
use crate::{check_health, fleet, ocf, round, sleep_unless, Cli, Context, Failure};

/// How long libcoap's server has to start listening.
const LIBCOAP_START: Duration = Duration::from_secs(10);
/// How often the idle sessions are swept (Pings answered, closes noted).
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// The quiet window over which the server's CPU with idle sessions held
/// (and nothing else) is read.
const QUIET: Duration = Duration::from_secs(3);
/// Gateway devices signed up and in per batch, handed to the holder
/// between batches so that none stays unanswered past a keepalive Ping.
const ENROLL_BATCH: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RawTarget {
    Gateway,
    Libcoap,
}

impl RawTarget {
    fn name(self) -> &'static str {
        match self {
            RawTarget::Gateway => "gateway",
            RawTarget::Libcoap => "libcoap",
        }
    }

    /// The resource every GET asks for.
    fn path(self) -> &'static [&'static str] {
        match self {
            RawTarget::Gateway => &["x.plgd.dev", "time"],
            RawTarget::Libcoap => &["time"],
        }
    }
}

/// `coap-server-openssl` as a child process (killed when dropped).
struct Libcoap {
    child: Child,
    /// Its `coaps+tcp` listener (port + 1 of `-p`).
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Libcoap {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name` as given, or found on `PATH`.
fn find_binary(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// A loopback port `p` with `p` and `p + 1` free for TCP and UDP (libcoap
/// binds coap on `p` and coaps on `p + 1`, both transports).
fn libcoap_port() -> Result<u16, String> {
    for _ in 0..50 {
        let probe = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
        let p = probe.local_addr().map_err(|e| e.to_string())?.port();
        drop(probe);
        let Some(q) = p.checked_add(1) else { continue };
        let free = TcpListener::bind(("127.0.0.1", p)).is_ok()
            && TcpListener::bind(("127.0.0.1", q)).is_ok()
            && UdpSocket::bind(("127.0.0.1", p)).is_ok()
            && UdpSocket::bind(("127.0.0.1", q)).is_ok();
        if free {
            return Ok(p);
        }
    }
    Err("no pair of free loopback ports for libcoap".into())
}

impl Libcoap {
    fn start(
        binary: &Path,
        files: &TlsFiles,
        dir: &Path,
        client: &Arc<ClientConfig>,
        interrupted: &AtomicBool,
    ) -> Result<Libcoap, String> {
        let bin = find_binary(binary).ok_or_else(|| {
            format!(
                "{} not found: the raw scenario compares the gateway with libcoap's server; \
                 install the Debian package libcoap3-bin (apt-get install libcoap3-bin) \
                 or pass --libcoap-bin PATH",
                binary.display()
            )
        })?;
        let port = libcoap_port()?;
        let log = dir.join("libcoap.log");
        let out = std::fs::File::create(&log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        // -C: the CA list sent to clients and trusted for their
        // certificates (mutual TLS; without -n the peer is verified).
        let child = Command::new(&bin)
            .args(["-A", "127.0.0.1", "-p", &port.to_string()])
            .arg("-c")
            .arg(&files.cert)
            .arg("-j")
            .arg(&files.key)
            .arg("-C")
            .arg(&files.ca)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut server = Libcoap {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port + 1)),
            log,
        };
        let until = Instant::now() + LIBCOAP_START;
        let mut last = String::from("no attempt");
        while Instant::now() < until && !interrupted.load(Ordering::Relaxed) {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "{} exited during start-up ({status}): {}",
                    bin.display(),
                    server.log_tail()
                ));
            }
            match Device::connect(server.addr, client, Duration::from_secs(2)) {
                Ok((d, _)) => {
                    d.close();
                    return Ok(server);
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "{} did not complete a mutual-TLS handshake with its CSM on {} within {LIBCOAP_START:?} (last: {last}); its log: {}",
            bin.display(),
            server.addr,
            server.log_tail()
        ))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

/// One server under test.
struct Server {
    kind: RawTarget,
    addr: SocketAddr,
    pid: Option<u32>,
}

impl Server {
    fn cpu(&self) -> Option<CpuTicks> {
        self.pid.and_then(|p| procfs::process_cpu_ticks(p).ok())
    }

    fn rss(&self) -> Option<u64> {
        self.pid.and_then(|p| procfs::vm_rss_bytes(p).ok())
    }
}

/// A GET of `path` with an 8-byte token.
fn write_get(out: &mut Vec<u8>, token: u64, path: &[&str]) {
    let t = token.to_be_bytes();
    let mut w = MessageWriter::new(out, Code::GET, &t);
    for p in path {
        w.option_str(option::URI_PATH, p);
    }
    w.finish();
}

/// What one request pass saw.
struct Pass {
    ok: u64,
    /// Answers that were not 2.05 with a payload, or on a token we did not
    /// send.
    bad: u64,
    bad_samples: Vec<String>,
    errors: Errors,
    latency: Histogram<u64>,
    wall: Duration,
    cpu_s: Option<f64>,
}

impl Pass {
    fn per_cpu_s(&self) -> Option<f64> {
        self.cpu_s.filter(|s| *s > 0.0).map(|s| self.ok as f64 / s)
    }

    fn json(&self) -> Value {
        let per = self.per_cpu_s();
        json!({
            "ok": self.ok,
            "bad_answers": self.bad,
            "bad_samples": self.bad_samples,
            "errors": self.errors,
            "wall_s": round(self.wall.as_secs_f64(), 3),
            "throughput_per_s": round(self.ok as f64 / self.wall.as_secs_f64().max(1e-9), 1),
            "server_cpu_seconds": self.cpu_s.map(|s| round(s, 3)),
            "requests_per_cpu_s": per.map(|r| round(r, 1)),
            "cpu_us_per_request": per.map(|r| round(1e6 / r, 3)),
            "latency_us": Percentiles::of(&self.latency),
        })
    }
}

/// One load connection: our CSM, then `quota` pipelined GETs with
/// `window` outstanding. Returns (ok, bad, bad samples, latency).
fn load_connection(
    addr: SocketAddr,
    client: &Arc<ClientConfig>,
    path: &[&str],
    quota: u64,
    window: usize,
    deadline: Instant,
    interrupted: &AtomicBool,
) -> Result<(u64, u64, Vec<String>, Histogram<u64>), DeviceError> {
    let (mut d, _) = Device::connect(addr, client, IO_TIMEOUT)?;
    let mut latency = load::histogram();
    let mut out = Vec::with_capacity(64 * window);
    signal::write_csm(&mut out, &[0xc5], None, false);
    let mut sent: HashMap<u64, Instant> = HashMap::with_capacity(window);
    let (mut issued, mut answered, mut ok, mut bad) = (0u64, 0u64, 0u64, 0u64);
    let mut samples = Vec::new();
    let mut next_token = 1u64;
    let failed = |e: io::Error| DeviceError::new(Stage::Request, e);
    while answered < quota {
        if Instant::now() >= deadline || interrupted.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        while sent.len() < window && issued < quota {
            write_get(&mut out, next_token, path);
            sent.insert(next_token, now);
            next_token += 1;
            issued += 1;
        }
        if !out.is_empty() {
            d.send(&out).map_err(failed)?;
            out.clear();
        }
        let msg = d.recv().map_err(failed)?;
        if msg.code == Code::PING {
            signal::write_pong(&mut out, &msg.token, false);
            continue;
        }
        if !msg.code.is_response() {
            continue;
        }
        let token = <[u8; 8]>::try_from(msg.token.as_slice())
            .ok()
            .map(u64::from_be_bytes);
        match token.and_then(|t| sent.remove(&t)) {
            Some(at) => {
                answered += 1;
                load::record(&mut latency, at.elapsed());
                if msg.code == Code::CONTENT && !msg.payload.is_empty() {
                    ok += 1;
                } else {
                    bad += 1;
                    if samples.len() < 5 {
                        samples.push(format!(
                            "answered {} with {} payload bytes",
                            msg.code,
                            msg.payload.len()
                        ));
                    }
                }
            }
            None => {
                bad += 1;
                if samples.len() < 5 {
                    samples.push(format!("{} on a token we did not send", msg.code));
                }
            }
        }
    }
    d.close();
    Ok((ok, bad, samples, latency))
}

#[allow(clippy::too_many_arguments)]
fn request_pass(
    server: &Server,
    client: &Arc<ClientConfig>,
    connections: usize,
    window: usize,
    requests: u64,
    deadline: Instant,
    interrupted: &Arc<AtomicBool>,
    ctx: &Context,
) -> Pass {
    let cpu_before = server.cpu();
    let started = Instant::now();
    let handles: Vec<_> = (0..connections)
        .map(|i| {
            let quota = requests / connections as u64
                + u64::from((i as u64) < requests % connections as u64);
            let (client, interrupted) = (client.clone(), interrupted.clone());
            let (addr, path) = (server.addr, server.kind.path());
            std::thread::spawn(move || {
                load_connection(addr, &client, path, quota, window, deadline, &interrupted)
            })
        })
        .collect();
    let mut pass = Pass {
        ok: 0,
        bad: 0,
        bad_samples: Vec::new(),
        errors: Errors::default(),
        latency: load::histogram(),
        wall: Duration::ZERO,
        cpu_s: None,
    };
    for h in handles {
        match h.join() {
            Ok(Ok((ok, bad, samples, latency))) => {
                pass.ok += ok;
                pass.bad += bad;
                pass.bad_samples.extend(samples);
                let _ = pass.latency.add(&latency);
            }
            Ok(Err(e)) => pass.errors.record(&e),
            Err(_) => pass.errors.record(&DeviceError::new(
                Stage::Request,
                "a client thread panicked",
            )),
        }
    }
    pass.wall = started.elapsed();
    pass.cpu_s = cpu_before
        .zip(server.cpu())
        .map(|(a, b)| ctx.ticks_to_s(b.since(a).total()));
    pass
}

/// Holds idle sessions: a thread that sweeps them (Pings answered,
/// closes noted) and takes new ones through a channel.
struct Holder {
    tx: Option<mpsc::Sender<Device>>,
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Held>,
}

#[derive(Default, Debug)]
struct Held {
    held_at_end: u64,
    closed_by_server: u64,
    /// Requests of the server answered (Pings are answered too, not
    /// counted).
    requests_answered: u64,
}

impl Holder {
    fn start(hard_deadline: Instant) -> Holder {
        let (tx, rx) = mpsc::channel::<Device>();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut held: Vec<Device> = Vec::new();
            let mut seen = Held::default();
            let mut last = Instant::now();
            loop {
                let stopping = s.load(Ordering::Relaxed) || Instant::now() >= hard_deadline;
                while let Ok(d) = rx.try_recv() {
                    if d.set_nonblocking().is_ok() {
                        held.push(d);
                    }
                }
                if stopping || last.elapsed() >= SWEEP_EVERY {
                    last = Instant::now();
                    held.retain_mut(|d| {
                        // Pings and the server's requests are answered (a
                        // signed-in device gets the gateway's twin
                        // discovery, spec §6.3, which it must answer or be
                        // closed); non-blocking, so this only takes what
                        // already arrived, a few messages per sweep.
                        for _ in 0..8 {
                            match d.serve_request(Duration::from_millis(1)) {
                                Ok(true) => seen.requests_answered += 1,
                                Ok(false) => return true,
                                Err(_) => {
                                    seen.closed_by_server += 1;
                                    return false;
                                }
                            }
                        }
                        true
                    });
                }
                if stopping {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            seen.held_at_end = held.len() as u64;
            for d in held {
                d.close();
            }
            seen
        });
        Holder {
            tx: Some(tx),
            stop,
            handle,
        }
    }

    fn hold(&self, d: Device) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(d);
        }
    }

    fn stop(mut self) -> Held {
        self.tx = None;
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// Opens `n` idle libcoap sessions (mutual TLS, CSM, one GET /time
/// answered 2.05 with a payload) from `threads` threads into `holder`.
fn open_libcoap_sessions(
    server: &Server,
    client: &Arc<ClientConfig>,
    n: u64,
    threads: usize,
    holder: &Holder,
    deadline: Instant,
    interrupted: &Arc<AtomicBool>,
) -> (u64, Errors) {
    let max_failures = (n / 10).max(50);
    let (tx, rx) = mpsc::channel::<Device>();
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let share = n / threads as u64 + u64::from((i as u64) < n % threads as u64);
            let (client, interrupted, tx, failed) = (
                client.clone(),
                interrupted.clone(),
                tx.clone(),
                failed.clone(),
            );
            let (addr, path) = (server.addr, server.kind.path());
            std::thread::spawn(move || {
                let mut errors = Errors::default();
                for _ in 0..share {
                    if Instant::now() >= deadline
                        || interrupted.load(Ordering::Relaxed)
                        || failed.load(Ordering::Relaxed) >= max_failures
                    {
                        break;
                    }
                    match open_session(addr, &client, path) {
                        Ok(d) => {
                            let _ = tx.send(d);
                        }
                        Err(e) => {
                            errors.record(&e);
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                errors
            })
        })
        .collect();
    drop(tx);
    let mut opened = 0;
    for d in rx {
        holder.hold(d);
        opened += 1;
    }
    let mut errors = Errors::default();
    for h in handles {
        if let Ok(e) = h.join() {
            errors.add(&e);
        }
    }
    (opened, errors)
}

fn open_session(
    addr: SocketAddr,
    client: &Arc<ClientConfig>,
    path: &[&str],
) -> Result<Device, DeviceError> {
    let (mut d, _) = Device::connect(addr, client, IO_TIMEOUT)?;
    let mut out = Vec::with_capacity(64);
    signal::write_csm(&mut out, &[0xc5], None, false);
    write_get(&mut out, 7, path);
    let failed = |e| DeviceError::new(Stage::Request, e);
    d.send(&out).map_err(failed)?;
    let msg = d.response(&7u64.to_be_bytes()).map_err(failed)?;
    if msg.code != Code::CONTENT || msg.payload.is_empty() {
        return Err(DeviceError::new(
            Stage::Request,
            format!(
                "GET answered {} with {} payload bytes",
                msg.code,
                msg.payload.len()
            ),
        ));
    }
    Ok(d)
}

/// Signs up and in `n` gateway devices (batches of [`ENROLL_BATCH`]) into
/// `holder`.
fn open_gateway_sessions(
    ctx: &Context,
    addr: SocketAddr,
    ca_dir: &Path,
    authority: &Arc<coap_gateway::auth::authority::Authority>,
    n: u64,
    holder: &Holder,
    deadline: Instant,
) -> Result<(u64, Errors), Failure> {
    let mut opened = 0;
    let mut errors = Errors::default();
    let mut left = n as usize;
    let mut taken = 0;
    while left > 0 && Instant::now() < deadline && !ctx.interrupted.load(Ordering::Relaxed) {
        let batch = left.min(ENROLL_BATCH);
        left -= batch;
        let identities = ocf::identities_from(ca_dir, taken, batch, ctx.threads)?;
        taken += batch;
        let enrolled = fleet::enroll(
            addr,
            identities,
            authority,
            ctx.threads,
            deadline,
            &ctx.interrupted,
            fleet::Keep::SignedIn,
        );
        errors.add(&enrolled.load.errors);
        for (_, d) in enrolled.groups.into_iter().flatten() {
            if let Some(d) = d {
                holder.hold(d);
                opened += 1;
            }
        }
        if errors.total >= (n / 10).max(50) {
            break;
        }
    }
    Ok((opened, errors))
}

/// Everything measured on one server.
struct Measured {
    handshakes: Option<Value>,
    handshakes_per_cpu_s: Option<f64>,
    pass: Option<Pass>,
    idle: Option<Value>,
    bytes_per_idle: Option<f64>,
    pass_idle: Option<Pass>,
    /// Server CPU-s per second with the idle sessions held and no load.
    quiet_cpu_fraction: Option<f64>,
}

impl Measured {
    fn new() -> Measured {
        Measured {
            handshakes: None,
            handshakes_per_cpu_s: None,
            pass: None,
            idle: None,
            bytes_per_idle: None,
            pass_idle: None,
            quiet_cpu_fraction: None,
        }
    }

    fn cpu_us(&self) -> Option<f64> {
        self.pass
            .as_ref()
            .and_then(Pass::per_cpu_s)
            .map(|r| 1e6 / r)
    }

    fn cpu_us_idle(&self) -> Option<f64> {
        self.pass_idle
            .as_ref()
            .and_then(Pass::per_cpu_s)
            .map(|r| 1e6 / r)
    }

    /// Per-request CPU with idle sessions, less the keepalive work they
    /// cost on their own (the quiet rate over the pass's wall time).
    fn cpu_us_idle_net(&self) -> Option<f64> {
        let p = self.pass_idle.as_ref()?;
        let cpu = p.cpu_s? - self.quiet_cpu_fraction? * p.wall.as_secs_f64();
        (p.ok > 0).then(|| cpu.max(0.0) * 1e6 / p.ok as f64)
    }

    fn json(&self, server: &Server) -> Value {
        let growth = self
            .cpu_us_idle()
            .zip(self.cpu_us())
            .map(|(b, a)| round(b / a, 4));
        let growth_net = self
            .cpu_us_idle_net()
            .zip(self.cpu_us())
            .map(|(b, a)| round(b / a, 4));
        json!({
            "server": server.kind.name(),
            "pid": server.pid,
            "address": server.addr.to_string(),
            "path": format!("/{}", server.kind.path().join("/")),
            "handshakes": self.handshakes,
            "requests": self.pass.as_ref().map(Pass::json),
            "idle": self.idle,
            "requests_with_idle": self.pass_idle.as_ref().map(Pass::json),
            "per_request_cpu_growth_with_idle": growth,
            "per_request_cpu_growth_with_idle_net_of_keepalive": growth_net,
        })
    }
}

fn handshake_phase(
    ctx: &Context,
    server: &Server,
    client: &Arc<ClientConfig>,
    count: u64,
    deadline: Instant,
    m: &mut Measured,
) {
    let plan = Plan::Handshake(client.clone());
    let warm = (count / 10).clamp(20, 500);
    let _ = load::run(
        server.addr,
        &plan,
        warm,
        ctx.threads,
        deadline,
        &ctx.interrupted,
    );
    let before = server.cpu();
    let r = load::run(
        server.addr,
        &plan,
        count,
        ctx.threads,
        deadline,
        &ctx.interrupted,
    );
    let cpu = before
        .zip(server.cpu())
        .map(|(a, b)| ctx.ticks_to_s(b.since(a).total()));
    let per = cpu.filter(|s| *s > 0.0).map(|s| r.ok as f64 / s);
    println!(
        "{}: {} mutual-TLS handshakes ({} errors) in {:.2} s, server {} CPU-s -> {} per CPU-s; latency µs p50 {} p99 {}",
        server.kind.name(),
        r.ok,
        r.errors.total,
        r.wall.as_secs_f64(),
        cpu.map_or("?".into(), |c| format!("{c:.2}")),
        per.map_or("?".into(), |p| format!("{p:.0}")),
        Percentiles::of(&r.latency.total).p50,
        Percentiles::of(&r.latency.total).p99,
    );
    for e in &r.errors.samples {
        println!("  error: {e}");
    }
    m.handshakes_per_cpu_s = per;
    m.handshakes = Some(json!({
        "ok": r.ok,
        "errors": r.errors,
        "cut_short": r.cut_short,
        "wall_s": round(r.wall.as_secs_f64(), 3),
        "server_cpu_seconds": cpu.map(|c| round(c, 3)),
        "handshakes_per_cpu_s": per.map(|p| round(p, 1)),
        "latency_us": Percentiles::of(&r.latency.total),
        "warm_up": warm,
    }));
}

fn print_pass(label: &str, server: &Server, p: &Pass) {
    let l = Percentiles::of(&p.latency);
    println!(
        "{}{label}: {} GETs 2.05 ({} bad, {} errors) in {:.2} s ({:.0}/s), server {} CPU-s -> {} per CPU-s; latency µs p50 {} p99 {} max {}",
        server.kind.name(),
        p.ok,
        p.bad,
        p.errors.total,
        p.wall.as_secs_f64(),
        p.ok as f64 / p.wall.as_secs_f64().max(1e-9),
        p.cpu_s.map_or("?".into(), |c| format!("{c:.2}")),
        p.per_cpu_s().map_or("?".into(), |r| format!("{r:.0}")),
        l.p50,
        l.p99,
        l.max
    );
    for s in p.bad_samples.iter().take(3) {
        println!("  bad answer: {s}");
    }
    for e in &p.errors.samples {
        println!("  error: {e}");
    }
}

pub fn scenario(cli: &Cli, ctx: &Context, open_files: u64) -> Result<Value, Failure> {
    let connections = cli.connections.unwrap_or(4).max(1);
    let window = cli.window.unwrap_or(16).clamp(1, 4096) as usize;
    let requests = cli.requests.unwrap_or(100_000).max(1);
    let handshakes = cli.handshakes.unwrap_or(2000);
    let idle = cli.idle.unwrap_or(1000);
    let limit = cli.duration.unwrap_or(Duration::from_secs(120));
    let kinds = cli
        .targets
        .clone()
        .unwrap_or_else(|| vec![RawTarget::Gateway, RawTarget::Libcoap]);
    if kinds.is_empty() {
        return Err(Failure::Usage("--targets lists no server".into()));
    }
    // One server's idle sessions at a time, plus the load connections.
    if open_files != 0 && idle + connections as u64 + 64 > open_files {
        return Err(Failure::Usage(format!(
            "--idle {idle} with --connections {connections} needs more open files than the limit of {open_files} (ulimit -n)"
        )));
    }
    let pki = crate::gateway::Pki::create()?;
    let client = pki.client_config()?;
    let mut gateway_target = None;
    let mut libcoap = None;
    let mut servers = Vec::new();
    for kind in &kinds {
        match kind {
            RawTarget::Gateway if gateway_target.is_none() => {
                let (t, _) = crate::target(cli, ctx, &pki)?;
                servers.push(Server {
                    kind: *kind,
                    addr: t.addr,
                    pid: t.pid,
                });
                gateway_target = Some(t);
            }
            RawTarget::Libcoap if libcoap.is_none() => {
                let bin = cli
                    .libcoap_bin
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("coap-server-openssl"));
                let l = Libcoap::start(
                    &bin,
                    &pki.server_files(),
                    pki.data_dir(),
                    &client,
                    &ctx.interrupted,
                )?;
                println!("libcoap pid {} on {} ({})", l.pid(), l.addr, bin.display());
                servers.push(Server {
                    kind: *kind,
                    addr: l.addr,
                    pid: Some(l.pid()),
                });
                libcoap = Some(l);
            }
            _ => {}
        }
    }
    let deadline = Instant::now() + limit * (2 * servers.len() as u32 + 2);
    let mut measured: Vec<Measured> = servers.iter().map(|_| Measured::new()).collect();

    // 1 and 2, alternating between the servers.
    for (s, m) in servers.iter().zip(measured.iter_mut()) {
        handshake_phase(ctx, s, &client, handshakes, deadline, m);
    }
    for (s, m) in servers.iter().zip(measured.iter_mut()) {
        let p = request_pass(
            s,
            &client,
            connections,
            window,
            requests,
            Instant::now() + limit,
            &ctx.interrupted,
            ctx,
        );
        print_pass("", s, &p);
        m.pass = Some(p);
    }

    // 3 and 4, one server at a time (the open-files limit).
    if idle > 0 {
        for (s, m) in servers.iter().zip(measured.iter_mut()) {
            if ctx.interrupted.load(Ordering::Relaxed) {
                break;
            }
            let holder = Holder::start(deadline + Duration::from_secs(60));
            let rss_before = s.rss();
            let cpu_before = s.cpu();
            let started = Instant::now();
            let open_deadline =
                started + Duration::from_secs(120) + Duration::from_millis(10 * idle);
            let (opened, errors, kind) = match s.kind {
                RawTarget::Gateway => {
                    let Some(t) = gateway_target.as_ref() else {
                        return Err(Failure::Runtime("no gateway target".into()));
                    };
                    let config = t.config()?.clone();
                    let authority = ocf::authority(&config)?;
                    let (o, e) = open_gateway_sessions(
                        ctx,
                        s.addr,
                        &t.ca_dir,
                        &authority,
                        idle,
                        &holder,
                        open_deadline,
                    )?;
                    (o, e, "signed-in OCF devices (mutual TLS, CSM, sign-up, sign-in, GET /oic/res answered)")
                }
                RawTarget::Libcoap => {
                    let (o, e) = open_libcoap_sessions(
                        s,
                        &client,
                        idle,
                        ctx.threads,
                        &holder,
                        open_deadline,
                        &ctx.interrupted,
                    );
                    (
                        o,
                        e,
                        "mutual-TLS connections (CSM, one GET /time answered 2.05)",
                    )
                }
            };
            let open_s = started.elapsed().as_secs_f64();
            let open_cpu = cpu_before
                .zip(s.cpu())
                .map(|(a, b)| ctx.ticks_to_s(b.since(a).total()));
            sleep_unless(Duration::from_secs(1), &ctx.interrupted);
            let rss_after = s.rss();
            let quiet_before = s.cpu();
            sleep_unless(QUIET, &ctx.interrupted);
            let quiet = quiet_before
                .zip(s.cpu())
                .map(|(a, b)| ctx.ticks_to_s(b.since(a).total()) / QUIET.as_secs_f64());
            let bytes = rss_before
                .zip(rss_after)
                .filter(|_| opened > 0)
                .map(|(b, a)| (a as f64 - b as f64) / opened as f64);
            println!(
                "{}: {opened}/{idle} idle sessions open in {open_s:.1} s ({} errors); {} bytes of server VmRSS each; server CPU with them held and no load {} % of a core",
                s.kind.name(),
                errors.total,
                bytes.map_or("?".into(), |b| format!("{b:.0}")),
                quiet.map_or("?".into(), |q| format!("{:.2}", q * 100.0))
            );
            for e in &errors.samples {
                println!("  error: {e}");
            }
            let p = request_pass(
                s,
                &client,
                connections,
                window,
                requests,
                Instant::now() + limit,
                &ctx.interrupted,
                ctx,
            );
            print_pass(&format!(" with {opened} idle sessions"), s, &p);
            let held = holder.stop();
            m.bytes_per_idle = bytes;
            m.quiet_cpu_fraction = quiet;
            m.idle = Some(json!({
                "kind": kind,
                "wanted": idle,
                "opened": opened,
                "errors": errors,
                "open_s": round(open_s, 3),
                "server_cpu_seconds_to_open": open_cpu.map(|c| round(c, 3)),
                "rss_before_bytes": rss_before,
                "rss_bytes": rss_after,
                "bytes_per_session": bytes.map(|b| round(b, 1)),
                "quiet_cpu_fraction": quiet.map(|q| round(q, 4)),
                "held_at_end": held.held_at_end,
                "closed_by_server": held.closed_by_server,
                "requests_answered": held.requests_answered,
            }));
            m.pass_idle = Some(p);
        }
    }

    let health = gateway_target
        .as_mut()
        .and_then(|t| t.spawned.as_mut())
        .map(|g| g.health());
    let libcoap_died = libcoap.as_mut().and_then(|l| {
        (!l.running()).then(|| format!("libcoap's server died during the run: {}", l.log_tail()))
    });
    drop(gateway_target);
    drop(libcoap);
    check_health(health.as_ref())?;
    if let Some(e) = libcoap_died {
        return Err(Failure::Runtime(e));
    }

    let by = |kind: RawTarget| servers.iter().position(|s| s.kind == kind);
    let side = |f: &dyn Fn(&Measured) -> Option<f64>, digits: i32| {
        let g = by(RawTarget::Gateway).and_then(|i| f(&measured[i]));
        let l = by(RawTarget::Libcoap).and_then(|i| f(&measured[i]));
        json!({
            "gateway": g.map(|v| round(v, digits)),
            "libcoap": l.map(|v| round(v, digits)),
            "gateway_over_libcoap": g.zip(l).filter(|(_, l)| *l != 0.0).map(|(g, l)| round(g / l, 4)),
        })
    };
    let p99 = |p: &Option<Pass>| p.as_ref().map(|p| Percentiles::of(&p.latency).p99 as f64);
    let summary = json!({
        "requests_per_cpu_s": side(&|m| m.pass.as_ref().and_then(Pass::per_cpu_s), 1),
        "p99_us": side(&|m| p99(&m.pass), 0),
        "handshakes_per_cpu_s": side(&|m| m.handshakes_per_cpu_s, 1),
        "bytes_per_idle_session": side(&|m| m.bytes_per_idle, 1),
        "requests_per_cpu_s_with_idle": side(&|m| m.pass_idle.as_ref().and_then(Pass::per_cpu_s), 1),
        "p99_us_with_idle": side(&|m| p99(&m.pass_idle), 0),
        "per_request_cpu_growth_with_idle": side(&|m| m.cpu_us_idle().zip(m.cpu_us()).map(|(b, a)| b / a), 4),
        "per_request_cpu_growth_with_idle_net_of_keepalive": side(&|m| m.cpu_us_idle_net().zip(m.cpu_us()).map(|(b, a)| b / a), 4),
    });
    println!("side by side (gateway, libcoap, gateway/libcoap):");
    for key in [
        "requests_per_cpu_s",
        "p99_us",
        "handshakes_per_cpu_s",
        "bytes_per_idle_session",
        "requests_per_cpu_s_with_idle",
        "p99_us_with_idle",
        "per_request_cpu_growth_with_idle",
        "per_request_cpu_growth_with_idle_net_of_keepalive",
    ] {
        let v = &summary[key];
        println!(
            "  {key}: {} {} {}",
            v["gateway"], v["libcoap"], v["gateway_over_libcoap"]
        );
    }
    let mut errors = Errors::default();
    let mut bad = 0;
    for m in &measured {
        for p in [&m.pass, &m.pass_idle].into_iter().flatten() {
            errors.add(&p.errors);
            bad += p.bad;
        }
    }
    let ok: u64 = measured
        .iter()
        .flat_map(|m| [&m.pass, &m.pass_idle])
        .flatten()
        .map(|p| p.ok)
        .sum();
    if ok == 0 {
        return Err(Failure::Runtime("no GET was answered 2.05".into()));
    }
    let first = measured.first().and_then(|m| m.pass.as_ref());
    let gw = by(RawTarget::Gateway).map(|i| &measured[i]);
    Ok(json!({
        "scenario": "raw",
        "devices": idle,
        "duration_s": first.map(|p| round(p.wall.as_secs_f64(), 3)),
        "throughput_per_s": first.map(|p| round(p.ok as f64 / p.wall.as_secs_f64().max(1e-9), 1)),
        "latency_us": first.map(|p| Percentiles::of(&p.latency)),
        "errors": errors,
        "bad_answers": bad,
        "gateway": gw.map(|m| json!({
            "pid": servers[by(RawTarget::Gateway).unwrap_or(0)].pid,
            "shards": cli.gateway.is_none().then_some(cli.shards),
            "rss_bytes": m.idle.as_ref().map(|i| i["rss_bytes"].clone()),
            "cpu_seconds": m.pass.as_ref().and_then(|p| p.cpu_s).map(|c| round(c, 3)),
            "bytes_per_device": m.bytes_per_idle.map(|b| round(b, 1)),
            "stderr_lines": health.as_ref().map(|h| h.stderr_lines),
        })),
        "baseline": Value::Null,
        "side_by_side": summary,
        "targets": servers.iter().zip(&measured).map(|(s, m)| m.json(s)).collect::<Vec<_>>(),
        "config": {
            "connections": connections,
            "window": window,
            "requests_per_pass": requests,
            "handshakes": handshakes,
            "idle_sessions": idle,
            "client_threads_for_handshakes_and_idle": ctx.threads,
        },
        "goal": Value::Null,
    }))
}
