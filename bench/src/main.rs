//! `coap-gateway-bench`: load generator for the CoAP gateway (SURFACE.md,
//! "Benchmark"). Scenarios so far:
//!
//! - `baseline`: bare rustls mutual-TLS handshakes on one server thread,
//!   per server CPU-second.
//! - `connect`: full mutual-TLS handshakes into the gateway (until its first
//!   CSM), per gateway CPU-second, then the `baseline` figure in the same
//!   run, and their ratio.
//! - `idle`: N authenticated devices held open; the gateway's resident
//!   memory per device.
//!
//! Exit codes: 0 measured (goals met or not), 1 runtime failure, 2 usage.
#![forbid(unsafe_code)]
// The benchmark is the IO side: it reads clocks to time what it measures
// (clippy.toml, STYLE.md §1).
#![allow(clippy::disallowed_methods)]

mod baseline;
mod device;
mod gateway;
mod idle;
mod load;
mod procfs;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::{Parser, ValueEnum};
use rustls::ClientConfig;
use serde_json::{json, Value};

use crate::baseline::BaselineServer;
use crate::gateway::{Pki, SpawnedGateway};
use crate::load::{LoadResult, Percentiles};
use crate::procfs::CpuTicks;

/// Goal of `connect`: gateway handshakes per CPU-second against bare rustls.
const CONNECT_RATIO_GOAL: f64 = 0.90;
/// Goal of `idle`: resident bytes per idle authenticated device.
const IDLE_BYTES_GOAL: f64 = 8192.0;

#[derive(Parser)]
#[command(
    name = "coap-gateway-bench",
    version,
    about = "Load generator for coap-gateway (loopback only)"
)]
struct Cli {
    scenario: Scenario,
    /// Handshakes (baseline, connect) or devices held open (idle).
    #[arg(long)]
    devices: Option<u64>,
    /// connect/baseline: time limit of the measured run (default 120s);
    /// idle: how long the devices stay idle before the memory is read
    /// (default 5s).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Use a gateway already listening at ADDR (needs --ca-dir).
    #[arg(long, conflicts_with = "spawn")]
    gateway: Option<SocketAddr>,
    /// Start a gateway on a loopback port (the default for connect/idle).
    #[arg(long)]
    spawn: bool,
    /// Shards of the spawned gateway.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// connect: alternate gateway and baseline this many times, each round
    /// with devices/rounds handshakes (1 = gateway, then baseline).
    #[arg(long, default_value_t = 1)]
    rounds: u64,
    /// Client threads (default 4).
    #[arg(long)]
    threads: Option<usize>,
    /// With --gateway: directory with the CA (ca.pem, ca-key.pem) that
    /// issues the device certificate.
    #[arg(long, requires = "gateway")]
    ca_dir: Option<PathBuf>,
    /// With --gateway: its process id, to read its CPU time and memory.
    #[arg(long, requires = "gateway")]
    gateway_pid: Option<u32>,
    /// The gateway binary for --spawn (default: coap-gateway next to this
    /// executable).
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Baseline,
    Connect,
    Idle,
    Notify,
    Command,
    Storm,
    Raw,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::Connect => "connect",
            Scenario::Idle => "idle",
            Scenario::Notify => "notify",
            Scenario::Command => "command",
            Scenario::Storm => "storm",
            Scenario::Raw => "raw",
        }
    }
}

/// A failure that ends the run.
enum Failure {
    Usage(String),
    Runtime(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Runtime(s)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(1)
        }
    }
}

/// What every scenario needs.
struct Context {
    interrupted: Arc<AtomicBool>,
    clk_tck: u64,
    threads: usize,
    started: SystemTime,
    loadavg_start: String,
    busy_steal_start: Option<(u64, u64)>,
}

impl Context {
    fn ticks_to_s(&self, ticks: u64) -> f64 {
        ticks as f64 / self.clk_tck as f64
    }
}

fn run(cli: &Cli) -> Result<(), Failure> {
    match cli.scenario {
        Scenario::Baseline | Scenario::Connect | Scenario::Idle => {}
        other => {
            return Err(Failure::Usage(format!(
                "scenario {} is not available yet",
                other.name()
            )))
        }
    }
    if cli.shards == 0 {
        return Err(Failure::Usage("--shards must be at least 1".into()));
    }
    if cli.gateway.is_some() && cli.ca_dir.is_none() {
        return Err(Failure::Usage(
            "--gateway ADDR needs --ca-dir DIR (ca.pem and ca-key.pem of the gateway's device CA)"
                .into(),
        ));
    }
    if cli.scenario == Scenario::Baseline && (cli.gateway.is_some() || cli.spawn) {
        return Err(Failure::Usage(
            "baseline measures bare rustls; it takes no gateway".into(),
        ));
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, interrupted.clone())
            .map_err(|e| format!("cannot install the handler for signal {signal}: {e}"))?;
    }
    let open_files = shards::system::raise_nofile_limit();
    let ctx = Context {
        interrupted,
        clk_tck: procfs::clock_ticks_per_second(),
        threads: cli.threads.unwrap_or(4).max(1),
        started: SystemTime::now(),
        loadavg_start: procfs::loadavg(),
        busy_steal_start: procfs::machine_busy_and_steal_ticks(),
    };
    let mut report = match cli.scenario {
        Scenario::Baseline => baseline_scenario(cli, &ctx)?,
        Scenario::Connect => connect_scenario(cli, &ctx)?,
        _ => idle_scenario(cli, &ctx, open_files)?,
    };
    if ctx.interrupted.load(Ordering::Relaxed) {
        eprintln!("interrupted: the figures cover only part of the run");
    }
    let obj = report.as_object_mut().expect("reports are objects");
    let m = machine(&ctx);
    println!(
        "machine: {} CPUs, {} CPU-s busy (all processes) over {} s, steal {} s, load {} -> {}",
        m["nproc"],
        m["busy_cpu_s_all_processes"],
        m["wall_s"],
        m["steal_cpu_s"],
        ctx.loadavg_start,
        m["loadavg_end"].as_str().unwrap_or("")
    );
    obj.insert("machine".into(), m);
    obj.insert("command".into(), Value::String(command_line()));
    if let Some(path) = &cli.out {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("report written to {}", path.display());
    }
    Ok(())
}

fn command_line() -> String {
    let mut args = std::env::args();
    let mut words = vec!["coap-gateway-bench".to_owned()];
    args.next();
    words.extend(args);
    words.join(" ")
}

fn machine(ctx: &Context) -> Value {
    let elapsed = ctx.started.elapsed().map_or(0.0, |d| d.as_secs_f64());
    let (busy, steal) = match (ctx.busy_steal_start, procfs::machine_busy_and_steal_ticks()) {
        (Some((b0, s0)), Some((b1, s1))) => (
            Some(round(ctx.ticks_to_s(b1.saturating_sub(b0)), 2)),
            Some(round(ctx.ticks_to_s(s1.saturating_sub(s0)), 2)),
        ),
        _ => (None, None),
    };
    json!({
        "wall_s": round(elapsed, 2),
        "busy_cpu_s_all_processes": busy,
        "steal_cpu_s": steal,
        "loadavg_start": ctx.loadavg_start,
        "loadavg_end": procfs::loadavg(),
        "nproc": procfs::nproc(),
        "kernel": procfs::kernel(),
        "clock_ticks_per_s": ctx.clk_tck,
        "started_unix_s": ctx.started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// The device identity and the target: a spawned gateway (kept alive by the
/// returned guard) or an external one.
struct Target {
    addr: SocketAddr,
    pid: Option<u32>,
    spawned: Option<SpawnedGateway>,
}

fn target(cli: &Cli, ctx: &Context, pki: &Pki) -> Result<(Target, Arc<ClientConfig>), Failure> {
    if let (Some(addr), Some(ca_dir)) = (cli.gateway, &cli.ca_dir) {
        let client = gateway::external_client_config(ca_dir, pki.data_dir())?;
        return Ok((
            Target {
                addr,
                pid: cli.gateway_pid,
                spawned: None,
            },
            client,
        ));
    }
    if !cli.spawn {
        println!("no --gateway given: spawning one (--spawn)");
    }
    let client = pki.client_config()?;
    let binary = match &cli.gateway_bin {
        Some(b) => b.clone(),
        None => gateway::default_binary()?,
    };
    let spawned = SpawnedGateway::start(&binary, pki, cli.shards, &client, &ctx.interrupted)?;
    println!(
        "gateway pid {} on {} ({} shard{})",
        spawned.pid(),
        spawned.addr,
        spawned.shards,
        if spawned.shards == 1 { "" } else { "s" }
    );
    Ok((
        Target {
            addr: spawned.addr,
            pid: Some(spawned.pid()),
            spawned: Some(spawned),
        },
        client,
    ))
}

/// Handshakes of one measured run and the CPU the server spent on them.
struct Measured {
    load: LoadResult,
    cpu_seconds: Option<f64>,
    /// The part of `cpu_seconds` spent in the kernel.
    cpu_system_seconds: Option<f64>,
    /// This process minus the server thread when the server is in it.
    client_cpu_seconds: Option<f64>,
}

impl Measured {
    fn empty() -> Measured {
        Measured {
            load: LoadResult::empty(),
            cpu_seconds: Some(0.0),
            cpu_system_seconds: Some(0.0),
            client_cpu_seconds: Some(0.0),
        }
    }

    fn add(&mut self, other: &Measured) {
        self.load.add(&other.load);
        let sum = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a + b);
        self.cpu_seconds = sum(self.cpu_seconds, other.cpu_seconds);
        self.cpu_system_seconds = sum(self.cpu_system_seconds, other.cpu_system_seconds);
        self.client_cpu_seconds = sum(self.client_cpu_seconds, other.client_cpu_seconds);
    }

    fn per_cpu_second(&self) -> Option<f64> {
        self.cpu_seconds
            .filter(|&s| s > 0.0)
            .map(|s| self.load.ok as f64 / s)
    }

    fn summary(&self, per_cpu_key: &str) -> Value {
        json!({
            "handshakes": self.load.ok,
            "errors": self.load.errors,
            "duration_s": round(self.load.wall.as_secs_f64(), 3),
            "throughput_per_s": round(self.load.per_wall_second(), 1),
            "cpu_seconds": self.cpu_seconds.map(|s| round(s, 3)),
            "cpu_system_seconds": self.cpu_system_seconds.map(|s| round(s, 3)),
            per_cpu_key: self.per_cpu_second().map(|r| round(r, 1)),
            "client_cpu_seconds": self.client_cpu_seconds.map(|s| round(s, 3)),
            "latency_us": Percentiles::of(&self.load.latency.total),
            "stages_us": self.load.latency.stages(),
            "cut_short": self.load.cut_short,
        })
    }
}

/// Handshakes that are not measured: first-connection costs (lazy
/// initialisation, the server's session cache filling up) stay out.
fn warm_up(ctx: &Context, addr: SocketAddr, client: &Arc<ClientConfig>, count: u64) {
    let warmup = (count / 20).clamp(20, 200);
    let _ = load::run(
        addr,
        client,
        warmup,
        ctx.threads,
        Instant::now() + Duration::from_secs(30),
        &ctx.interrupted,
    );
}

/// `count` measured handshakes with the server's CPU time, `cpu()`, read
/// around them. `in_process`: the server is a thread of this process (its
/// time is taken out of the client's).
fn measure(
    ctx: &Context,
    addr: SocketAddr,
    client: &Arc<ClientConfig>,
    count: u64,
    deadline: Instant,
    cpu: &dyn Fn() -> Option<CpuTicks>,
    in_process: bool,
) -> Measured {
    let cpu_before = cpu();
    let self_before = procfs::self_cpu_ticks().ok();
    let load = load::run(addr, client, count, ctx.threads, deadline, &ctx.interrupted);
    let cpu_after = cpu();
    let self_after = procfs::self_cpu_ticks().ok();
    let server = cpu_before.zip(cpu_after).map(|(a, b)| b.since(a));
    let mut client_ticks = self_before.zip(self_after).map(|(a, b)| b.since(a).total());
    if in_process {
        client_ticks = client_ticks
            .zip(server)
            .map(|(c, s)| c.saturating_sub(s.total()));
    }
    Measured {
        load,
        cpu_seconds: server.map(|t| ctx.ticks_to_s(t.total())),
        cpu_system_seconds: server.map(|t| ctx.ticks_to_s(t.system)),
        client_cpu_seconds: client_ticks.map(|t| ctx.ticks_to_s(t)),
    }
}

fn run_baseline(
    ctx: &Context,
    pki: &Pki,
    client: &Arc<ClientConfig>,
    count: u64,
    limit: Duration,
) -> Result<(Measured, u64), Failure> {
    let server = BaselineServer::start(&pki.server_files())?;
    warm_up(ctx, server.addr, client, count);
    let measured = measure(
        ctx,
        server.addr,
        client,
        count,
        Instant::now() + limit,
        &|| server.cpu_ticks().ok(),
        true,
    );
    let failures = server.failures.load(Ordering::Relaxed);
    Ok((measured, failures))
}

fn print_run(label: &str, m: &Measured, cpu_label: &str) {
    let p = Percentiles::of(&m.load.latency.total);
    let s = m.load.latency.stages();
    println!(
        "{label}: {} handshakes in {:.2} s ({:.0}/s wall), {} errors",
        m.load.ok,
        m.load.wall.as_secs_f64(),
        m.load.per_wall_second(),
        m.load.errors.total
    );
    match (m.cpu_seconds, m.per_cpu_second()) {
        (Some(cpu), Some(rate)) => {
            println!(
                "  {cpu_label} CPU {cpu:.2} s ({:.2} s kernel) -> {rate:.0} handshakes per CPU-second",
                m.cpu_system_seconds.unwrap_or(0.0)
            )
        }
        _ => println!("  {cpu_label} CPU not measured"),
    }
    println!(
        "  latency µs p50 {} p90 {} p99 {} p99.9 {} max {}",
        p.p50, p.p90, p.p99, p.p999, p.max
    );
    println!(
        "  stages p50/p99 µs: tcp {}/{}  tls {}/{}  first CSM {}/{}",
        s.tcp_connect.p50,
        s.tcp_connect.p99,
        s.tls.p50,
        s.tls.p99,
        s.first_csm.p50,
        s.first_csm.p99
    );
    if let Some(why) = &m.load.cut_short {
        println!("  cut short: {why}");
    }
    for e in &m.load.errors.samples {
        println!("  error: {e}");
    }
}

fn baseline_scenario(cli: &Cli, ctx: &Context) -> Result<Value, Failure> {
    let count = cli.devices.unwrap_or(5000);
    let limit = cli.duration.unwrap_or(Duration::from_secs(120));
    let pki = Pki::create()?;
    let client = pki.client_config()?;
    let (m, failures) = run_baseline(ctx, &pki, &client, count, limit)?;
    print_run("baseline (bare rustls, 1 thread)", &m, "server thread");
    if m.load.ok == 0 {
        return Err(Failure::Runtime("no handshake succeeded".into()));
    }
    let summary = m.summary("handshakes_per_cpu_s");
    Ok(json!({
        "scenario": "baseline",
        "devices": count,
        "duration_s": round(m.load.wall.as_secs_f64(), 3),
        "throughput_per_s": round(m.load.per_wall_second(), 1),
        "handshakes_per_cpu_s": m.per_cpu_second().map(|r| round(r, 1)),
        "latency_us": Percentiles::of(&m.load.latency.total),
        "stages_us": m.load.latency.stages(),
        "errors": m.load.errors,
        "gateway": Value::Null,
        "baseline": merge(summary, json!({ "server_failures": failures })),
        "client_threads": ctx.threads,
    }))
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

fn connect_scenario(cli: &Cli, ctx: &Context) -> Result<Value, Failure> {
    let count = cli.devices.unwrap_or(5000);
    let limit = cli.duration.unwrap_or(Duration::from_secs(120));
    let rounds = cli.rounds.clamp(1, count.max(1));
    let pki = Pki::create()?;
    let (mut target, client) = target(cli, ctx, &pki)?;
    let pid = target.pid;
    let gw_cpu = || pid.and_then(|p| procfs::process_cpu_ticks(p).ok());
    let base = BaselineServer::start(&pki.server_files())?;
    let base_cpu = || base.cpu_ticks().ok();

    // Does the idle gateway burn CPU (busy polling)? 2 s of nothing.
    let idle_window = Duration::from_secs(2);
    let idle_before = gw_cpu();
    sleep_unless(idle_window, &ctx.interrupted);
    let idle_cpu_fraction = match (idle_before, gw_cpu()) {
        (Some(a), Some(b)) => Some(round(
            ctx.ticks_to_s(b.since(a).total()) / idle_window.as_secs_f64(),
            4,
        )),
        _ => None,
    };

    warm_up(ctx, target.addr, &client, count);
    warm_up(ctx, base.addr, &client, count);
    let rss_before = pid.and_then(|p| procfs::vm_rss_bytes(p).ok());
    // Gateway, then bare rustls with the same number of handshakes, in
    // `rounds` alternations so that drift of a noisy machine hits both.
    let deadline = Instant::now() + limit;
    let mut gw = Measured::empty();
    let mut bl = Measured::empty();
    let mut per_round = Vec::new();
    for r in 0..rounds {
        let n = count / rounds + u64::from(r < count % rounds);
        let g = measure(ctx, target.addr, &client, n, deadline, &gw_cpu, false);
        let b = measure(ctx, base.addr, &client, n, deadline, &base_cpu, true);
        let ratio = match (g.per_cpu_second(), b.per_cpu_second()) {
            (Some(g), Some(b)) if b > 0.0 => Some(round(g / b, 4)),
            _ => None,
        };
        if rounds > 1 {
            println!(
                "round {}: gateway {:.0}/CPU-s, baseline {:.0}/CPU-s, ratio {}",
                r + 1,
                g.per_cpu_second().unwrap_or(0.0),
                b.per_cpu_second().unwrap_or(0.0),
                ratio.map_or("?".into(), |r| format!("{r:.3}"))
            );
        }
        per_round.push(json!({
            "handshakes": n,
            "gateway_per_cpu_s": g.per_cpu_second().map(|r| round(r, 1)),
            "baseline_per_cpu_s": b.per_cpu_second().map(|r| round(r, 1)),
            "gateway_cpu_seconds": g.cpu_seconds.map(|s| round(s, 3)),
            "baseline_cpu_seconds": b.cpu_seconds.map(|s| round(s, 3)),
            "ratio": ratio,
        }));
        gw.add(&g);
        bl.add(&b);
        if ctx.interrupted.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
    }
    let base_failures = base.failures.load(Ordering::Relaxed);
    drop(base);
    let rss = pid.and_then(|p| procfs::vm_rss_bytes(p).ok());
    let health = target.spawned.as_mut().map(|g| g.health());
    drop(target);

    print_run("gateway", &gw, "gateway process");
    if let Some(h) = &health {
        h.report_stderr();
    }
    print_run("baseline (bare rustls, 1 thread)", &bl, "server thread");
    if let Some(died) = health.as_ref().and_then(|h| h.died()) {
        return Err(Failure::Runtime(died));
    }
    let ratio = match (gw.per_cpu_second(), bl.per_cpu_second()) {
        (Some(g), Some(b)) if b > 0.0 => Some(g / b),
        _ => None,
    };
    match ratio {
        Some(r) => println!(
            "ratio gateway/baseline: {r:.3} (goal >= {CONNECT_RATIO_GOAL:.2}: {})",
            if r >= CONNECT_RATIO_GOAL {
                "met"
            } else {
                "MISSED"
            }
        ),
        None => println!("ratio gateway/baseline: not measured (no gateway pid, or interrupted)"),
    }
    if gw.load.ok == 0 {
        return Err(Failure::Runtime(
            "no handshake into the gateway succeeded".into(),
        ));
    }
    Ok(json!({
        "scenario": "connect",
        "devices": count,
        "rounds": rounds,
        "duration_s": round(gw.load.wall.as_secs_f64(), 3),
        "throughput_per_s": round(gw.load.per_wall_second(), 1),
        "handshakes_per_cpu_s": gw.per_cpu_second().map(|r| round(r, 1)),
        "latency_us": Percentiles::of(&gw.load.latency.total),
        "stages_us": gw.load.latency.stages(),
        "errors": gw.load.errors,
        "cut_short": gw.load.cut_short,
        "gateway": {
            "pid": pid,
            "shards": cli.gateway.is_none().then_some(cli.shards),
            "rss_bytes": rss,
            "rss_before_bytes": rss_before,
            "cpu_seconds": gw.cpu_seconds.map(|s| round(s, 3)),
            "cpu_system_seconds": gw.cpu_system_seconds.map(|s| round(s, 3)),
            "handshakes_per_cpu_s": gw.per_cpu_second().map(|r| round(r, 1)),
            "bytes_per_device": Value::Null,
            "idle_cpu_fraction": idle_cpu_fraction,
            "stderr_lines": health.as_ref().map(|h| h.stderr_lines),
        },
        "baseline": merge(
            bl.summary("handshakes_per_cpu_s"),
            json!({ "server_failures": base_failures }),
        ),
        "ratio": ratio.map(|r| round(r, 4)),
        "per_round": per_round,
        "goal": { "ratio_min": CONNECT_RATIO_GOAL, "met": ratio.map(|r| r >= CONNECT_RATIO_GOAL) },
        "client_threads": ctx.threads,
        "client_cpu_seconds": gw.client_cpu_seconds.map(|s| round(s, 3)),
    }))
}

fn sleep_unless(d: Duration, interrupted: &AtomicBool) {
    let until = Instant::now() + d;
    while !interrupted.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(100)));
    }
}

fn idle_scenario(cli: &Cli, ctx: &Context, open_files: u64) -> Result<Value, Failure> {
    let devices = cli.devices.unwrap_or(10_000);
    let hold = cli.duration.unwrap_or(Duration::from_secs(5));
    // Room for the held sockets plus this process's own files.
    if open_files != 0 && devices + 64 > open_files {
        return Err(Failure::Usage(format!(
            "{devices} devices need more open files than the limit of {open_files} (ulimit -n)"
        )));
    }
    let pki = Pki::create()?;
    let (mut target, client) = target(cli, ctx, &pki)?;
    let pid = target.pid;
    let rss = |f: fn(u32) -> std::io::Result<u64>| pid.and_then(|p| f(p).ok());
    let rss_startup = rss(procfs::vm_rss_bytes);

    // Warm-up: one-time allocations (session cache, shard buffers) are not
    // per-device memory.
    let warmup = idle::IdleClients::start(
        target.addr,
        &client,
        16,
        1,
        Instant::now() + Duration::from_secs(30),
        Instant::now() + Duration::from_secs(60),
        &ctx.interrupted,
    );
    while !warmup.all_connected() && !ctx.interrupted.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let warm = warmup.stop();
    if warm.connected == 0 {
        return Err(Failure::Runtime(format!(
            "no warm-up device could connect: {:?}",
            warm.errors.samples
        )));
    }
    sleep_unless(Duration::from_secs(1), &ctx.interrupted);
    let rss_before = rss(procfs::vm_rss_bytes);
    let anon_before = rss(procfs::rss_anon_bytes);
    let cpu_before = pid.and_then(|p| procfs::process_cpu_ticks(p).ok());
    let sockstat_before = procfs::tcp_sockstat();

    // Connect phase: bounded by 1 ms per device on top of a minute.
    let started = Instant::now();
    let connect_limit = Duration::from_secs(60) + Duration::from_millis(devices);
    let clients = idle::IdleClients::start(
        target.addr,
        &client,
        devices,
        ctx.threads,
        started + connect_limit,
        started + connect_limit + hold + Duration::from_secs(60),
        &ctx.interrupted,
    );
    let mut last_print = Instant::now();
    while !clients.all_connected() && !ctx.interrupted.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        if last_print.elapsed() >= Duration::from_secs(5) {
            println!(
                "  {} devices connected",
                clients.shared.connected.load(Ordering::Relaxed)
            );
            last_print = Instant::now();
        }
    }
    let connect_phase = started.elapsed();
    let connected = clients.shared.connected.load(Ordering::Relaxed);
    sleep_unless(hold, &ctx.interrupted);
    let rss_after = rss(procfs::vm_rss_bytes);
    let anon_after = rss(procfs::rss_anon_bytes);
    let cpu_after = pid.and_then(|p| procfs::process_cpu_ticks(p).ok());
    let sockstat_after = procfs::tcp_sockstat();
    let held_for = started.elapsed() - connect_phase;
    let threads = clients.stop();
    // Informational: what the gateway keeps once every device has gone (the
    // allocator need not give freed memory back, so this is no leak test).
    sleep_unless(Duration::from_secs(2), &ctx.interrupted);
    let rss_after_close = rss(procfs::vm_rss_bytes);
    let health = target.spawned.as_mut().map(|g| g.health());
    drop(target);

    let per_device = |before: Option<u64>, after: Option<u64>| match (before, after) {
        (Some(b), Some(a)) if threads.held_at_end > 0 => {
            Some(round((a as f64 - b as f64) / threads.held_at_end as f64, 1))
        }
        _ => None,
    };
    let bytes_per_device = per_device(rss_before, rss_after);
    let bytes_from_startup = per_device(rss_startup, rss_after);
    let anon_per_device = per_device(anon_before, anon_after);
    let latency = threads
        .latency
        .clone()
        .unwrap_or_else(load::StageHistograms::new);
    let p = Percentiles::of(&latency.total);
    let throughput = connected as f64 / connect_phase.as_secs_f64().max(1e-9);
    let cpu_seconds = match (cpu_before, cpu_after) {
        (Some(a), Some(b)) => Some(round(ctx.ticks_to_s(b.since(a).total()), 3)),
        _ => None,
    };

    println!(
        "idle: {connected}/{devices} devices connected in {:.2} s ({throughput:.0}/s), {} errors; held {:.1} s",
        connect_phase.as_secs_f64(),
        threads.errors.total,
        held_for.as_secs_f64()
    );
    println!(
        "  connect+CSM latency µs p50 {} p99 {} max {}",
        p.p50, p.p99, p.max
    );
    let mib = |b: Option<u64>| {
        b.map_or("?".to_owned(), |b| {
            format!("{:.1} MiB", b as f64 / 1048576.0)
        })
    };
    println!(
        "  gateway VmRSS: start-up {}, before {}, with devices {}, after they left {}",
        mib(rss_startup),
        mib(rss_before),
        mib(rss_after),
        mib(rss_after_close)
    );
    println!(
        "  still open at the end {}, closed by the gateway {}, pings answered {}, unexpected messages {}",
        threads.held_at_end, threads.closed_by_gateway, threads.pings_answered, threads.unexpected_messages
    );
    match bytes_per_device {
        Some(b) => println!(
            "  bytes per device {b:.0} (RssAnon {}; from start-up {}); goal <= {IDLE_BYTES_GOAL:.0}: {}",
            anon_per_device.map_or("?".into(), |a| format!("{a:.0}")),
            bytes_from_startup.map_or("?".into(), |a| format!("{a:.0}")),
            if b <= IDLE_BYTES_GOAL { "met" } else { "MISSED" }
        ),
        None => println!("  bytes per device: not measured"),
    }
    for e in &threads.errors.samples {
        println!("  error: {e}");
    }
    if let Some(h) = &health {
        h.report_stderr();
    }
    if let Some(died) = health.as_ref().and_then(|h| h.died()) {
        return Err(Failure::Runtime(died));
    }
    if connected == 0 {
        return Err(Failure::Runtime("no device could connect".into()));
    }
    Ok(json!({
        "scenario": "idle",
        "devices": devices,
        "duration_s": round(held_for.as_secs_f64(), 3),
        "throughput_per_s": round(throughput, 1),
        "latency_us": p,
        "stages_us": latency.stages(),
        "errors": threads.errors,
        "gateway": {
            "pid": pid,
            "shards": cli.gateway.is_none().then_some(cli.shards),
            "rss_bytes": rss_after,
            "rss_before_bytes": rss_before,
            "rss_startup_bytes": rss_startup,
            "rss_anon_before_bytes": anon_before,
            "rss_anon_bytes": anon_after,
            "rss_after_close_bytes": rss_after_close,
            "cpu_seconds": cpu_seconds,
            "bytes_per_device": bytes_per_device,
            "bytes_per_device_from_startup": bytes_from_startup,
            "anon_bytes_per_device": anon_per_device,
            "stderr_lines": health.as_ref().map(|h| h.stderr_lines),
        },
        "baseline": Value::Null,
        "idle": {
            "connected": connected,
            "held_at_end": threads.held_at_end,
            "closed_by_gateway": threads.closed_by_gateway,
            "pings_answered": threads.pings_answered,
            "unexpected_messages": threads.unexpected_messages,
            "connect_phase_s": round(connect_phase.as_secs_f64(), 3),
            "tcp_sockstat_before": sockstat_before,
            "tcp_sockstat_after": sockstat_after,
        },
        "goal": {
            "bytes_per_device_max": IDLE_BYTES_GOAL,
            "met": bytes_per_device.map(|b| b <= IDLE_BYTES_GOAL),
        },
        "client_threads": ctx.threads,
    }))
}
