//! `coap-gateway-bench`: load generator for the CoAP gateway (SURFACE.md,
//! "Benchmark"). Scenarios so far:
//!
//! - `baseline`: bare rustls mutual-TLS handshakes on one server thread,
//!   per server CPU-second.
//! - `connect`: full device connects into the gateway — mutual TLS, CSM
//!   both ways, OCF sign-in (devices signed up in a set-up phase) — per
//!   gateway CPU-second and in gateway CPU µs each, against bare rustls +
//!   bare `jsonwebtoken` in the same run; `--handshake-only` measures the
//!   handshake (until the gateway's CSM) against bare rustls, as before.
//! - `idle`: N authenticated devices held open; the gateway's resident
//!   memory per device. `--transport memory`: the gateway's sessions in
//!   this process without sockets, up to 1,000,000 devices (`inmem.rs`).
//! - `signin`: repeated OCF sign-ins over N established connections, per
//!   gateway CPU-second, against a bare `jsonwebtoken` ES256 verify loop
//!   (and the gateway's own validator) in the same run.
//! - `notify`: N twin devices push notifications; what the embedded hub
//!   counted per gateway CPU-second, latency device → hub and loss by
//!   sequence number on sampled devices.
//! - `command`: HTTP PUTs through the hub's API to N connected devices;
//!   the round trip's latency and exactly-once delivery.
//! - `storm`: N twin devices disconnect at once and reconnect at once;
//!   time until the hub shows all back IN_SYNC (`storm.rs`).
//! - `raw`: pipelined CoAP GETs over coaps+tcp, no OCF, against the
//!   gateway and libcoap's `coap-server-openssl` side by side, then again
//!   with idle sessions held open on each (`raw.rs`).
//!
//! `idle --procs P` and `connect --handshake-only --procs P` spread the
//! devices over P child processes of this binary, each with its own
//! source address (`spread.rs`).
//!
//! Exit codes: 0 measured (goals met or not), 1 runtime failure, 2 usage.
#![forbid(unsafe_code)]
// The benchmark is the IO side: it reads clocks to time what it measures
// (clippy.toml, STYLE.md §1).
#![allow(clippy::disallowed_methods)]

mod baseline;
mod certcache;
mod command;
mod device;
mod engine;
mod fleet;
mod gateway;
mod http;
mod idle;
mod inmem;
mod inmem_device;
mod inmem_shard;
mod jwt;
mod live;
mod load;
mod notify;
mod ocf;
mod procfs;
mod progress;
mod raw;
mod report;
mod seq;
mod sharded;
mod signin;
mod spread;
mod storm;
mod twin;

/// The gateway binary's allocator (bench/Cargo.toml says why).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::{Parser, ValueEnum};
use coap_gateway::config::Config;
use rustls::ClientConfig;
use serde_json::{json, Value};

use crate::baseline::BaselineServer;
use crate::gateway::{Pki, SpawnedGateway};
use crate::jwt::BareVerifier;
use crate::load::{LoadResult, Percentiles, Plan};
use crate::procfs::CpuTicks;

/// Goal of `connect`: gateway connects per CPU-second against the bare
/// floor (rustls, and with sign-in bare `jsonwebtoken`).
const CONNECT_RATIO_GOAL: f64 = 0.90;
/// Goal of `signin`: gateway sign-ins per CPU-second against bare
/// `jsonwebtoken` ES256 verifies per CPU-second.
const SIGNIN_RATIO_GOAL: f64 = 0.80;
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
    /// Handshakes (baseline, connect) or devices held open (idle, signin).
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
    /// Run the spawned gateway with `serve --memory` (the embedded hub
    /// keeps nothing on disk).
    #[arg(long, conflicts_with = "gateway")]
    memory: bool,
    /// The spawned gateway's hub: `embedded` (default) or `nats` (NATS
    /// JetStream: `[hub] kind = "nats"`, against --nats-url or a
    /// nats-server the bench starts on loopback).
    #[arg(long, value_enum, default_value_t = HubArg::Embedded, conflicts_with_all = ["gateway", "memory"])]
    hub: HubArg,
    /// With --hub nats: the broker (default: a nats-server of the bench's own).
    #[arg(long, requires = "hub")]
    nats_url: Option<String>,
    /// Shards of the spawned gateway.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Write the JSON report here, and its latency-percentile plot next to
    /// it (same name, `.png`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bars (they show only on a terminal anyway).
    #[arg(long)]
    no_progress: bool,
    /// Do not draw the plot next to the --out report.
    #[arg(long)]
    no_plot: bool,
    /// Append the run's key figures as a Markdown table row to this file
    /// (e.g. perf/RESULTS.md), under its "Run log" heading.
    #[arg(long)]
    results_md: Option<PathBuf>,
    /// connect, signin: alternate gateway and yardstick this many times,
    /// each round with 1/rounds of the work (connect default 1 = gateway,
    /// then baseline; signin default 6).
    #[arg(long)]
    rounds: Option<u64>,
    /// connect: only the handshake (until the gateway's CSM), no sign-in,
    /// against bare rustls (the measurement before OCF sign-in existed).
    #[arg(long)]
    handshake_only: bool,
    /// connect: devices (identity certificates) signed up in the set-up
    /// phase and cycled through by the measured connects (default
    /// min(devices, 1000)).
    #[arg(long)]
    fleet: Option<u64>,
    /// signin: measured sign-ins in total (default 60000); command:
    /// measured HTTP PUTs (default 20000).
    #[arg(long)]
    requests: Option<u64>,
    /// notify: resources per device, each observed by the gateway
    /// (default 1).
    #[arg(long)]
    resources: Option<usize>,
    /// notify: notifications per second over all devices (default: as
    /// fast as the gateway takes them, within --window).
    #[arg(long)]
    rate: Option<f64>,
    /// notify: at most this many notifications in one write of a device
    /// (one TLS record; default 8).
    #[arg(long)]
    per_write: Option<usize>,
    /// notify: at most this many notifications sent and not yet counted by
    /// the hub (default 50000); raw: requests outstanding per connection
    /// (default 16).
    #[arg(long)]
    window: Option<u64>,
    /// raw: load connections per server, one client thread each (default
    /// 4).
    #[arg(long)]
    connections: Option<usize>,
    /// raw: mutual-TLS handshakes measured per server (default 2000).
    #[arg(long)]
    handshakes: Option<u64>,
    /// raw: idle authenticated sessions held open on each server during
    /// the second request pass (default 1000; 0 skips that pass).
    #[arg(long)]
    idle: Option<u64>,
    /// raw: the servers, comma separated: gateway, libcoap (default both).
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<raw::RawTarget>>,
    /// raw: libcoap's server binary (default coap-server-openssl on PATH,
    /// Debian package libcoap3-bin).
    #[arg(long)]
    libcoap_bin: Option<PathBuf>,
    /// idle, connect --handshake-only: spread the devices over this many
    /// load-generator processes, worker i connecting from 127.0.0.(1+i)
    /// (default 1: this process).
    #[arg(long)]
    procs: Option<usize>,
    /// Internal: run as worker I of `--procs` (spread.rs).
    #[arg(long, hide = true)]
    worker: Option<usize>,
    /// notify: devices followed on the hub's event stream for latency and
    /// loss (default 20).
    #[arg(long)]
    sample: Option<usize>,
    /// command: client threads, each with one HTTP request in flight
    /// (default 1).
    #[arg(long)]
    concurrency: Option<usize>,
    /// With --gateway: its configuration file, to mint sign-up codes with
    /// its authority (key file, issuer); COAP_GATEWAY__… variables apply.
    #[arg(long, requires = "gateway")]
    gateway_config: Option<PathBuf>,
    /// Client threads (default 4; notify, command: client shards or
    /// device threads of --engine, default 1).
    #[arg(long)]
    threads: Option<usize>,
    /// notify, command: what runs the devices: `shards` (the shards
    /// runtime's client side: set-up and traffic on --threads io_uring
    /// shards) or `threads` (blocking set-up threads, then --threads mio
    /// poll loops: the first fleet, for comparison).
    #[arg(long, value_enum, default_value_t = engine::Engine::Shards)]
    engine: engine::Engine,
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
    /// idle: `socket` (a gateway process, real TCP connections) or
    /// `memory` (the gateway's sessions in this process, one thread per
    /// --shards, no sockets; --duration is virtual idle time, default 60s).
    #[arg(long, value_enum, default_value_t = Transport::Socket)]
    transport: Transport,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    Socket,
    Memory,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum HubArg {
    Embedded,
    Nats,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Baseline,
    Connect,
    Idle,
    Signin,
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
            Scenario::Signin => "signin",
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

/// Prints what the spawned gateway wrote to stderr; an error when it died
/// during the run.
fn check_health(health: Option<&gateway::Health>) -> Result<(), Failure> {
    let Some(h) = health else {
        return Ok(());
    };
    h.report_stderr();
    h.died().map_or(Ok(()), |died| Err(Failure::Runtime(died)))
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
    if cli.no_progress {
        progress::disable();
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
    if cli.transport == Transport::Memory && cli.scenario != Scenario::Idle {
        return Err(Failure::Usage(
            "--transport memory is a mode of the idle scenario".into(),
        ));
    }
    // Worker processes of --procs report to their parent only.
    match cli.scenario {
        Scenario::Idle if cli.worker.is_some() => return spread::idle_worker(cli, &ctx),
        Scenario::Connect if cli.worker.is_some() => return spread::connect_worker(cli, &ctx),
        _ => {}
    }
    let spread = cli.procs.unwrap_or(1) > 1;
    let mut report = match cli.scenario {
        Scenario::Idle if cli.transport == Transport::Memory => inmem::scenario(cli, &ctx)?,
        Scenario::Baseline => baseline_scenario(cli, &ctx)?,
        Scenario::Connect if spread => spread::connect_scenario(cli, &ctx)?,
        Scenario::Connect => connect_scenario(cli, &ctx)?,
        Scenario::Signin => signin_scenario(cli, &ctx, open_files)?,
        Scenario::Notify => notify::scenario(cli, &ctx, open_files)?,
        Scenario::Command => command::scenario(cli, &ctx, open_files)?,
        Scenario::Storm => storm::scenario(cli, &ctx, open_files)?,
        Scenario::Raw => raw::scenario(cli, &ctx, open_files)?,
        Scenario::Idle if spread => spread::idle_scenario(cli, &ctx)?,
        Scenario::Idle => idle_scenario(cli, &ctx, open_files)?,
    };
    if ctx.interrupted.load(Ordering::Relaxed) {
        eprintln!(
            "interrupted: the {} figures cover only part of the run",
            cli.scenario.name()
        );
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
    // Which hub the spawned gateway ran with (null: --gateway, unknown).
    let hub = match (cli.gateway.is_some(), cli.hub, cli.memory) {
        (true, _, _) => Value::Null,
        (false, HubArg::Nats, _) => json!("nats"),
        (false, HubArg::Embedded, true) => json!("memory"),
        (false, HubArg::Embedded, false) => json!("embedded"),
    };
    obj.insert("hub_backend".into(), hub);
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
        if !cli.no_plot {
            let png = report::plot_path(path);
            match report::write_plot(&report, &png) {
                Ok(true) => println!("latency plot written to {}", png.display()),
                Ok(false) => {}
                // The figures are in the JSON already: a missing font
                // costs the picture, not the run.
                Err(e) => eprintln!("warning: no plot: {e}"),
            }
        }
    }
    if let Some(md) = &cli.results_md {
        let date = humantime::format_rfc3339_seconds(ctx.started).to_string();
        let row = report::markdown_row(&report, &date[..10], cli.out.as_deref());
        report::append_row(md, &row)?;
        println!("row appended to {}", md.display());
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
    /// The broker the bench started for `--hub nats`, kept until the end
    /// (after `spawned`: the gateway is dropped first).
    _nats: Option<gateway::NatsServer>,
    /// The gateway's configuration, when known (spawned, or
    /// --gateway-config).
    config: Option<Config>,
    /// The CA directory (`ca.pem`, `ca-key.pem`) of the device certificates.
    ca_dir: PathBuf,
}

impl Target {
    /// The configuration, needed to mint sign-up codes.
    fn config(&self) -> Result<&Config, Failure> {
        self.config.as_ref().ok_or_else(|| {
            Failure::Usage(
                "signing devices up needs the gateway's configuration: --gateway-config FILE \
                 (or --handshake-only for connect)"
                    .into(),
            )
        })
    }
}

fn target(cli: &Cli, ctx: &Context, pki: &Pki) -> Result<(Target, Arc<ClientConfig>), Failure> {
    if let (Some(addr), Some(ca_dir)) = (cli.gateway, &cli.ca_dir) {
        let client = gateway::external_client_config(ca_dir, pki.data_dir())?;
        let config = match &cli.gateway_config {
            Some(path) => Some(Config::load(Some(path)).map_err(|e| {
                Failure::Usage(format!("--gateway-config {}: {e}", path.display()))
            })?),
            None => None,
        };
        return Ok((
            Target {
                addr,
                pid: cli.gateway_pid,
                spawned: None,
                _nats: None,
                config,
                ca_dir: ca_dir.clone(),
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
    let (hub, nats) = match (cli.hub, cli.memory) {
        (HubArg::Nats, _) => match &cli.nats_url {
            Some(url) => (gateway::HubChoice::Nats { url: url.clone() }, None),
            None => {
                let server = gateway::NatsServer::start()?;
                println!("nats-server on {} (--hub nats)", server.url);
                (
                    gateway::HubChoice::Nats {
                        url: server.url.clone(),
                    },
                    Some(server),
                )
            }
        },
        (HubArg::Embedded, true) => (gateway::HubChoice::Memory, None),
        (HubArg::Embedded, false) => (gateway::HubChoice::Embedded, None),
    };
    let spawned = SpawnedGateway::start(&binary, pki, cli.shards, &hub, &client, &ctx.interrupted)?;
    println!(
        "gateway pid {} on {} ({} shard{})",
        spawned.pid(),
        spawned.addr,
        spawned.shards,
        if spawned.shards == 1 { "" } else { "s" }
    );
    let config = Config::load_with_env(None, spawned.env.clone())
        .map_err(|e| format!("the spawned gateway's configuration: {e}"))?;
    Ok((
        Target {
            addr: spawned.addr,
            pid: Some(spawned.pid()),
            spawned: Some(spawned),
            _nats: nats,
            config: Some(config),
            ca_dir: pki.pki_dir(),
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
fn warm_up(ctx: &Context, addr: SocketAddr, plan: &Plan, count: u64) {
    let warmup = (count / 20).clamp(20, 200);
    let _ = load::run(
        addr,
        plan,
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
    plan: &Plan,
    count: u64,
    deadline: Instant,
    cpu: &dyn Fn() -> Option<CpuTicks>,
    in_process: bool,
) -> Measured {
    let cpu_before = cpu();
    let self_before = procfs::self_cpu_ticks().ok();
    let load = load::run(addr, plan, count, ctx.threads, deadline, &ctx.interrupted);
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
    let plan = Plan::Handshake(client.clone());
    warm_up(ctx, server.addr, &plan, count);
    let measured = measure(
        ctx,
        server.addr,
        &plan,
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
        "  stages p50/p99 µs: tcp {}/{}  tls {}/{}  first CSM {}/{}{}",
        s.tcp_connect.p50,
        s.tcp_connect.p99,
        s.tls.p50,
        s.tls.p99,
        s.first_csm.p50,
        s.first_csm.p99,
        s.sign_in
            .as_ref()
            .map_or(String::new(), |p| format!("  sign-in {}/{}", p.p50, p.p99))
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
    let rounds = cli.rounds.unwrap_or(1).clamp(1, count.max(1));
    let with_sign_in = !cli.handshake_only;
    let pki = Pki::create()?;
    let (mut target, client) = target(cli, ctx, &pki)?;
    let pid = target.pid;
    let gw_cpu = || pid.and_then(|p| procfs::process_cpu_ticks(p).ok());

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

    // Set-up (with sign-in): every device of the fleet connects once and
    // signs up; the measured connects then sign these devices in.
    let (plan, verifier, fleet_size, setup) = if with_sign_in {
        let config = target.config()?;
        let authority = ocf::authority(config)?;
        let verifier = Arc::new(BareVerifier::new(&authority)?);
        let fleet_size = cli.fleet.unwrap_or(count.min(1000)).max(1);
        let (registered, setup) = sign_up_fleet(ctx, &target, &authority, fleet_size, &gw_cpu)?;
        (
            Plan::SignIn(Arc::new(registered)),
            Some(verifier),
            Some(fleet_size),
            setup,
        )
    } else {
        (Plan::Handshake(client.clone()), None, None, Value::Null)
    };
    let base = BaselineServer::start_with(&pki.server_files(), verifier)?;
    let base_cpu = || base.cpu_ticks().ok();

    warm_up(ctx, target.addr, &plan, count);
    warm_up(ctx, base.addr, &plan, count);
    let rss_before = pid.and_then(|p| procfs::vm_rss_bytes(p).ok());
    // Gateway, then the bare floor with the same number of connects, in
    // `rounds` alternations so that drift of a noisy machine hits both.
    let deadline = Instant::now() + limit;
    let mut gw = Measured::empty();
    let mut bl = Measured::empty();
    let mut per_round = Vec::new();
    for r in 0..rounds {
        let n = count / rounds + u64::from(r < count % rounds);
        let g = measure(ctx, target.addr, &plan, n, deadline, &gw_cpu, false);
        let b = measure(ctx, base.addr, &plan, n, deadline, &base_cpu, true);
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

    let yardstick = if with_sign_in {
        "baseline (bare rustls + bare jsonwebtoken, 1 thread)"
    } else {
        "baseline (bare rustls, 1 thread)"
    };
    print_run("gateway", &gw, "gateway process");
    if let Some(h) = &health {
        h.report_stderr();
    }
    print_run(yardstick, &bl, "server thread");
    if let Some(died) = health.as_ref().and_then(|h| h.died()) {
        return Err(Failure::Runtime(died));
    }
    let us_per = |m: &Measured| m.per_cpu_second().map(|r| round(1e6 / r, 1));
    println!(
        "CPU per connect: gateway {} µs, baseline {} µs",
        us_per(&gw).map_or("?".into(), |u| format!("{u:.0}")),
        us_per(&bl).map_or("?".into(), |u| format!("{u:.0}"))
    );
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
            "no connect into the gateway succeeded".into(),
        ));
    }
    Ok(json!({
        "scenario": "connect",
        "mode": if with_sign_in { "tls+csm+sign-in" } else { "handshake" },
        "devices": count,
        "fleet": fleet_size,
        "rounds": rounds,
        "duration_s": round(gw.load.wall.as_secs_f64(), 3),
        "throughput_per_s": round(gw.load.per_wall_second(), 1),
        "handshakes_per_cpu_s": gw.per_cpu_second().map(|r| round(r, 1)),
        "cpu_us_per_connect": us_per(&gw),
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
            "cpu_us_per_connect": us_per(&gw),
            "bytes_per_device": Value::Null,
            "idle_cpu_fraction": idle_cpu_fraction,
            "stderr_lines": health.as_ref().map(|h| h.stderr_lines),
        },
        "baseline": merge(
            bl.summary("handshakes_per_cpu_s"),
            json!({
                "what": yardstick,
                "cpu_us_per_connect": us_per(&bl),
                "server_failures": base_failures,
            }),
        ),
        "ratio": ratio.map(|r| round(r, 4)),
        "per_round": per_round,
        "goal": { "ratio_min": CONNECT_RATIO_GOAL, "met": ratio.map(|r| r >= CONNECT_RATIO_GOAL) },
        "setup": setup,
        "client_threads": ctx.threads,
        "client_cpu_seconds": gw.client_cpu_seconds.map(|s| round(s, 3)),
    }))
}

/// Issues `n` device identities and signs them up (connect, our CSM and a
/// sign-up, close), with the gateway's CPU read around it. Returns the
/// registered devices and the set-up's report.
pub(crate) fn sign_up_fleet(
    ctx: &Context,
    target: &Target,
    authority: &Arc<coap_gateway::auth::authority::Authority>,
    n: u64,
    gw_cpu: &dyn Fn() -> Option<CpuTicks>,
) -> Result<(Vec<fleet::Registered>, Value), Failure> {
    let started = Instant::now();
    let identities = ocf::identities(&target.ca_dir, n as usize, ctx.threads)?;
    let identities_s = started.elapsed().as_secs_f64();
    let (enrolled, cpu) = enroll_measured(
        ctx,
        target,
        identities,
        authority,
        Duration::from_millis(10),
        fleet::Keep::Close,
        gw_cpu,
    );
    let (registered, load) = enrolled.into_registered();
    let report = setup_report(&load, n, cpu, identities_s, "connect, CSM, sign-up, close");
    if registered.is_empty() {
        return Err(Failure::Runtime(format!(
            "no device could sign up: {:?}",
            load.errors.samples
        )));
    }
    Ok((registered, report))
}

/// Enrolls `identities` into the target with the gateway's CPU read around
/// it (the set-up every device scenario starts with). The enrolment may
/// take a minute plus `per_device` for each.
fn enroll_measured(
    ctx: &Context,
    target: &Target,
    identities: Vec<ocf::Identity>,
    authority: &Arc<coap_gateway::auth::authority::Authority>,
    per_device: Duration,
    keep: fleet::Keep,
    gw_cpu: &dyn Fn() -> Option<CpuTicks>,
) -> (fleet::Enrolled, Option<f64>) {
    let n = identities.len() as u32;
    let before = gw_cpu();
    let enrolled = fleet::enroll(
        target.addr,
        identities,
        authority,
        ctx.threads,
        Instant::now() + Duration::from_secs(60) + per_device * n,
        &ctx.interrupted,
        keep,
    );
    let cpu = before
        .zip(gw_cpu())
        .map(|(a, b)| ctx.ticks_to_s(b.since(a).total()));
    (enrolled, cpu)
}

/// The set-up phase in a report, and printed.
fn setup_report(
    load: &LoadResult,
    devices: u64,
    cpu_s: Option<f64>,
    identities_s: f64,
    what: &str,
) -> Value {
    let us_each = cpu_s
        .filter(|_| load.ok > 0)
        .map(|s| round(s * 1e6 / load.ok as f64, 1));
    let s = load.latency.stages();
    println!(
        "set-up ({what}): {}/{devices} devices in {:.2} s, {} errors; gateway {} µs CPU each; sign-up p50/p99 µs {}",
        load.ok,
        load.wall.as_secs_f64(),
        load.errors.total,
        us_each.map_or("?".into(), |u| format!("{u:.0}")),
        s.sign_up
            .as_ref()
            .map_or("?".into(), |p| format!("{}/{}", p.p50, p.p99))
    );
    for e in &load.errors.samples {
        println!("  error: {e}");
    }
    json!({
        "what": what,
        "devices": devices,
        "ok": load.ok,
        "errors": load.errors,
        "cut_short": load.cut_short,
        "duration_s": round(load.wall.as_secs_f64(), 3),
        "identities_s": round(identities_s, 3),
        "gateway_cpu_seconds": cpu_s.map(|s| round(s, 3)),
        "gateway_cpu_us_each": us_each,
        "latency_us": Percentiles::of(&load.latency.total),
        "stages_us": s,
    })
}

/// Sum of one side's phases in `signin`.
#[derive(Default)]
struct Side {
    ok: u64,
    failures: u64,
    cpu_s: f64,
    cpu_system_s: f64,
    wall_s: f64,
}

impl Side {
    fn per_cpu_second(&self) -> Option<f64> {
        (self.cpu_s > 0.0).then(|| self.ok as f64 / self.cpu_s)
    }

    fn add_local(&mut self, ctx: &Context, l: &signin::Local) -> Option<f64> {
        self.ok += l.ok;
        self.failures += l.failures;
        self.wall_s += l.wall.as_secs_f64();
        let cpu = l.cpu.map(|t| ctx.ticks_to_s(t.total()))?;
        self.cpu_s += cpu;
        (cpu > 0.0).then(|| l.ok as f64 / cpu)
    }

    fn report(&self, count_key: &str, rate_key: &str, us_key: &str) -> Value {
        let rate = self.per_cpu_second();
        json!({
            count_key: self.ok,
            "failures": self.failures,
            "cpu_seconds": round(self.cpu_s, 3),
            "wall_s": round(self.wall_s, 3),
            rate_key: rate.map(|r| round(r, 1)),
            us_key: rate.map(|r| round(1e6 / r, 2)),
        })
    }
}

fn signin_scenario(cli: &Cli, ctx: &Context, open_files: u64) -> Result<Value, Failure> {
    let devices = cli.devices.unwrap_or(200).max(1);
    let requests = cli.requests.unwrap_or(60_000).max(1);
    let rounds = cli.rounds.unwrap_or(6).clamp(1, requests);
    let limit = cli.duration.unwrap_or(Duration::from_secs(180));
    if open_files != 0 && devices + 64 > open_files {
        return Err(Failure::Usage(format!(
            "{devices} devices need more open files than the limit of {open_files} (ulimit -n)"
        )));
    }
    let pki = Pki::create()?;
    let (mut target, _client) = target(cli, ctx, &pki)?;
    let pid = target.pid;
    let gw_cpu = || pid.and_then(|p| procfs::process_cpu_ticks(p).ok());
    let config = target.config()?.clone();
    let authority = ocf::authority(&config)?;
    let bare = BareVerifier::new(&authority)?;
    let validator = jwt::gateway_validator(&authority, &config)?;

    // Set-up: connect, sign up, sign in once, answer the gateway's GET.
    let started = Instant::now();
    let identities = ocf::identities(&target.ca_dir, devices as usize, ctx.threads)?;
    let identities_s = started.elapsed().as_secs_f64();
    let (enrolled, setup_cpu) = enroll_measured(
        ctx,
        &target,
        identities,
        &authority,
        Duration::from_millis(10),
        fleet::Keep::SignedIn,
        &gw_cpu,
    );
    let setup = setup_report(
        &enrolled.load,
        devices,
        setup_cpu,
        identities_s,
        "connect, CSM, sign-up, sign-in, GET /oic/res answered; kept open",
    );
    let mut groups: Vec<Vec<signin::Held>> = enrolled
        .groups
        .into_iter()
        .map(|g| {
            g.into_iter()
                .filter_map(|(registered, device)| {
                    device.map(|device| signin::Held { device, registered })
                })
                .collect::<Vec<_>>()
        })
        .filter(|g| !g.is_empty())
        .collect();
    let held: u64 = groups.iter().map(|g| g.len() as u64).sum();
    if held == 0 {
        return Err(Failure::Runtime("no device could sign up and in".into()));
    }
    let tokens: Vec<String> = groups
        .iter()
        .flatten()
        .map(|h| h.registered.registration.access_token.clone())
        .collect();
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    if let Err(e) = bare.verify(token_refs[0]) {
        return Err(Failure::Runtime(format!(
            "bare jsonwebtoken refuses the gateway's token: {e}"
        )));
    }
    let check = signin::validator_check(&validator);
    if !check(token_refs[0]) {
        return Err(Failure::Runtime(
            "the gateway's validator refuses its own token".into(),
        ));
    }
    let bare_check = |t: &str| bare.verify(t).is_ok();

    // Warm-up: one sign-in per device, a few hundred local verifies.
    let warm_deadline = Instant::now() + Duration::from_secs(30);
    let (g, _) = signin::gateway_round(groups, held, warm_deadline, &ctx.interrupted);
    groups = g;
    let _ = signin::local_round(
        &token_refs,
        300,
        warm_deadline,
        &ctx.interrupted,
        &bare_check,
    );
    let _ = signin::local_round(&token_refs, 300, warm_deadline, &ctx.interrupted, &check);

    let deadline = Instant::now() + limit;
    let mut total = signin::Round::empty();
    let mut gw = Side::default();
    let mut client_cpu_s = 0.0;
    let mut bl = Side::default();
    let mut va = Side::default();
    let mut per_round = Vec::new();
    for r in 0..rounds {
        let n = requests / rounds + u64::from(r < requests % rounds);
        let cpu_before = gw_cpu();
        let self_before = procfs::self_cpu_ticks().ok();
        let (g, round_result) = signin::gateway_round(groups, n, deadline, &ctx.interrupted);
        groups = g;
        let cpu = cpu_before.zip(gw_cpu()).map(|(a, b)| b.since(a));
        if let Some(t) = self_before.zip(procfs::self_cpu_ticks().ok()) {
            client_cpu_s += ctx.ticks_to_s(t.1.since(t.0).total());
        }
        let g_cpu = cpu.map_or(0.0, |t| ctx.ticks_to_s(t.total()));
        gw.ok += round_result.ok;
        gw.failures += round_result.errors.total;
        gw.cpu_s += g_cpu;
        gw.cpu_system_s += cpu.map_or(0.0, |t| ctx.ticks_to_s(t.system));
        gw.wall_s += round_result.wall.as_secs_f64();
        let g_rate = (g_cpu > 0.0).then(|| round_result.ok as f64 / g_cpu);
        let b = signin::local_round(&token_refs, n, deadline, &ctx.interrupted, &bare_check);
        let b_rate = bl.add_local(ctx, &b);
        let v = signin::local_round(&token_refs, n, deadline, &ctx.interrupted, &check);
        let v_rate = va.add_local(ctx, &v);
        let ratio = g_rate.zip(b_rate).map(|(g, b)| round(g / b, 4));
        println!(
            "round {}: gateway {:.0} sign-ins/CPU-s ({} in {:.2} s wall, {:.2} CPU-s), bare jsonwebtoken {:.0}/CPU-s, validator {:.0}/CPU-s, ratio {}",
            r + 1,
            g_rate.unwrap_or(0.0),
            round_result.ok,
            round_result.wall.as_secs_f64(),
            g_cpu,
            b_rate.unwrap_or(0.0),
            v_rate.unwrap_or(0.0),
            ratio.map_or("?".into(), |r| format!("{r:.3}"))
        );
        per_round.push(json!({
            "signins": round_result.ok,
            "gateway_cpu_seconds": round(g_cpu, 3),
            "gateway_per_cpu_s": g_rate.map(|r| round(r, 1)),
            "gateway_wall_s": round(round_result.wall.as_secs_f64(), 3),
            "bare_per_cpu_s": b_rate.map(|r| round(r, 1)),
            "validator_per_cpu_s": v_rate.map(|r| round(r, 1)),
            "ratio": ratio,
        }));
        total.add(&round_result);
        if ctx.interrupted.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
    }
    let rss = pid.and_then(|p| procfs::vm_rss_bytes(p).ok());
    let still_open: usize = groups.iter().map(Vec::len).sum();
    for h in groups.into_iter().flatten() {
        h.device.close();
    }
    let health = target.spawned.as_mut().map(|g| g.health());
    drop(target);

    let p = Percentiles::of(&total.latency);
    let ratio = gw
        .per_cpu_second()
        .zip(bl.per_cpu_second())
        .map(|(g, b)| g / b);
    let ratio_validator = gw
        .per_cpu_second()
        .zip(va.per_cpu_second())
        .map(|(g, v)| g / v);
    let us = |s: &Side| s.per_cpu_second().map(|r| 1e6 / r);
    println!(
        "gateway: {} sign-ins over {held} connections in {:.2} s ({:.0}/s wall), {:.2} CPU-s ({:.0} % of a core), {} errors",
        total.ok,
        gw.wall_s,
        total.ok as f64 / gw.wall_s.max(1e-9),
        gw.cpu_s,
        100.0 * gw.cpu_s / gw.wall_s.max(1e-9),
        total.errors.total
    );
    println!(
        "  {:.0} sign-ins per gateway CPU-second ({:.1} µs each); latency µs p50 {} p99 {} max {} (pipelined batches)",
        gw.per_cpu_second().unwrap_or(0.0),
        us(&gw).unwrap_or(0.0),
        p.p50,
        p.p99,
        p.max
    );
    println!(
        "bare jsonwebtoken ES256: {:.0} verifies/CPU-s ({:.1} µs); gateway validator: {:.0}/CPU-s ({:.1} µs)",
        bl.per_cpu_second().unwrap_or(0.0),
        us(&bl).unwrap_or(0.0),
        va.per_cpu_second().unwrap_or(0.0),
        us(&va).unwrap_or(0.0)
    );
    if let Some(why) = &total.cut_short {
        println!("  cut short: {why}");
    }
    for e in &total.errors.samples {
        println!("  error: {e}");
    }
    check_health(health.as_ref())?;
    match ratio {
        Some(r) => println!(
            "ratio gateway/bare jsonwebtoken: {r:.3} (goal >= {SIGNIN_RATIO_GOAL:.2}: {}); gateway/validator {}",
            if r >= SIGNIN_RATIO_GOAL { "met" } else { "MISSED" },
            ratio_validator.map_or("?".into(), |r| format!("{r:.3}"))
        ),
        None => println!("ratio: not measured (no gateway pid, or interrupted)"),
    }
    if total.ok == 0 {
        return Err(Failure::Runtime("no sign-in succeeded".into()));
    }
    let opt = |x: Option<f64>, d: i32| x.map(|v| round(v, d));
    Ok(json!({
        "scenario": "signin",
        "devices": held,
        "requests": requests,
        "rounds": rounds,
        "duration_s": round(gw.wall_s, 3),
        "throughput_per_s": round(total.ok as f64 / gw.wall_s.max(1e-9), 1),
        "signins_per_cpu_s": opt(gw.per_cpu_second(), 1),
        "latency_us": p,
        "errors": total.errors,
        "cut_short": total.cut_short,
        "gateway": {
            "pid": pid,
            "shards": cli.gateway.is_none().then_some(cli.shards),
            "rss_bytes": rss,
            "cpu_seconds": round(gw.cpu_s, 3),
            "cpu_system_seconds": round(gw.cpu_system_s, 3),
            "signins": gw.ok,
            "signins_per_cpu_s": opt(gw.per_cpu_second(), 1),
            "cpu_us_per_signin": opt(us(&gw), 2),
            "cpu_utilisation": round(gw.cpu_s / gw.wall_s.max(1e-9), 3),
            "connections_open_at_end": still_open,
            "bytes_per_device": Value::Null,
            "stderr_lines": health.as_ref().map(|h| h.stderr_lines),
        },
        "baseline": merge(
            bl.report("verifies", "verifies_per_cpu_s", "cpu_us_per_verify"),
            json!({ "what": "jsonwebtoken::decode ES256 (signature, exp, iss) on the ring provider, same tokens, main thread of the bench" }),
        ),
        "validator": merge(
            va.report("verifies", "verifies_per_cpu_s", "cpu_us_per_verify"),
            json!({ "what": "coap_gateway TokenValidator::validate (what the gateway runs per sign-in), same tokens" }),
        ),
        "ratio": opt(ratio, 4),
        "ratio_vs_validator": opt(ratio_validator, 4),
        "gateway_overhead_us_per_signin": opt(us(&gw).zip(us(&bl)).map(|(g, b)| g - b), 2),
        "per_round": per_round,
        "goal": { "ratio_min": SIGNIN_RATIO_GOAL, "met": ratio.map(|r| r >= SIGNIN_RATIO_GOAL) },
        "setup": setup,
        "client_threads": ctx.threads,
        "client_cpu_seconds": round(client_cpu_s, 3),
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
    let rss_startup = pid.and_then(|p| procfs::vm_rss_bytes(p).ok());
    idle::warm_up(target.addr, &client, &ctx.interrupted)?;
    let before = idle::Snapshot::take(pid);

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
    let bar = progress::counter("connecting", devices);
    while !clients.all_connected() && !ctx.interrupted.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        bar.set_position(clients.shared.connected.load(Ordering::Relaxed));
        if bar.is_hidden() && last_print.elapsed() >= Duration::from_secs(5) {
            println!(
                "  {} devices connected",
                clients.shared.connected.load(Ordering::Relaxed)
            );
            last_print = Instant::now();
        }
    }
    bar.finish_and_clear();
    let connect_phase = started.elapsed();
    let connected = clients.shared.connected.load(Ordering::Relaxed);
    let bar = progress::timed("idle", hold);
    let hold_started = Instant::now();
    while hold_started.elapsed() < hold && !ctx.interrupted.load(Ordering::Relaxed) {
        sleep_unless(
            (hold - hold_started.elapsed()).min(Duration::from_millis(250)),
            &ctx.interrupted,
        );
        bar.set_position(hold_started.elapsed().as_millis() as u64);
    }
    bar.finish_and_clear();
    let after = idle::Snapshot::take(pid);
    let held_for = started.elapsed() - connect_phase;
    let threads = clients.stop();
    // Informational: what the gateway keeps once every device has gone (the
    // allocator need not give freed memory back, so this is no leak test).
    sleep_unless(Duration::from_secs(2), &ctx.interrupted);
    let rss_after_close = pid.and_then(|p| procfs::vm_rss_bytes(p).ok());
    let health = target.spawned.as_mut().map(|g| g.health());
    drop(target);

    println!(
        "idle: {connected}/{devices} devices connected in {:.2} s ({:.0}/s), {} errors; held {:.1} s",
        connect_phase.as_secs_f64(),
        connected as f64 / connect_phase.as_secs_f64().max(1e-9),
        threads.errors.total,
        held_for.as_secs_f64()
    );
    let measured = idle::Measured {
        devices,
        connected,
        connect_phase,
        held_for,
        total: threads,
        pid,
        rss_startup,
        before,
        after,
        rss_after_close,
        health,
    };
    measured.finish(cli.gateway.is_none().then_some(cli.shards), ctx)
}
