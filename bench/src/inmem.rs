//! `idle --transport memory`: N authenticated, idle devices held by the
//! gateway's real sessions in this process, without sockets (issue 5 item
//! 4: past the per-process limit on open files, up to 1,000,000 devices).
//!
//! The gateway side is the gateway's own: the TLS server configuration of
//! `serve` (development PKI, mutual TLS with OCF identity certificates,
//! `client_auth = "identity"`), [`GatewayService`] with the session
//! settings `serve` derives from the same [`Config`]
//! (`server::session_config`), the embedded authority as the OAuth
//! provider and token validator, and the embedded hub in memory
//! (`MemoryHub::new()`, as `serve --memory`). Each shard thread
//! (`--shards`, one per core as the gateway runs) drives its share of the
//! devices through [`shards::Driver`], the sans-IO connection handling the
//! io_uring runtime drives with socket bytes (`inmem_shard.rs`); the
//! devices are in `inmem_device.rs`.
//!
//! Figures: the process's VmRSS after a warm-up, after the set-up and after
//! the idle phase; the gateway's share of the growth (the devices' share
//! is known exactly: `IdleDevice::BYTES` each); set-up rate and where its
//! CPU went (gateway, devices, provisioning); CPU per idle device per
//! second of (virtual) idle time, i.e. the cost of keepalive timers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use coap_gateway::auth::jwt::TokenValidator;
use coap_gateway::auth::pki::Ca;
use coap_gateway::auth::provider::{EmbeddedProvider, TokenProvider};
use coap_gateway::auth::tls;
use coap_gateway::auth::validator::SharedValidator;
use coap_gateway::auth::ClientAuth;
use coap_gateway::config::Config;
use coap_gateway::hub::MemoryHub;
use coap_gateway::server;
use serde_json::{json, Value};

use crate::gateway::Pki;
use crate::inmem_device::IdleDevice;
use crate::inmem_shard::{self, Common, Event, PhaseReport};
use crate::load::Percentiles;
use crate::{procfs, round, Cli, Context, Failure};

/// Goal (issue 5): gateway memory per idle authenticated device.
pub const BYTES_GOAL: f64 = 4096.0;
/// Default virtual idle time: six keepalive periods of the default 20 s
/// timeout (a Ping after 10 s of silence, spec §2.4).
const DEFAULT_IDLE: Duration = Duration::from_secs(60);
/// Warm-up devices per shard (set up and closed before the first reading).
const WARMUP: u64 = 16;
/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// The runtime's default timer tick (`RuntimeConfig::tick`).
const TICK: Duration = Duration::from_millis(50);

pub fn scenario(cli: &Cli, ctx: &Context) -> Result<Value, Failure> {
    if cli.gateway.is_some() || cli.spawn || cli.memory {
        return Err(Failure::Usage(
            "--transport memory runs the gateway in this process; it takes no \
             --gateway, --spawn or --memory"
                .into(),
        ));
    }
    let devices = cli.devices.unwrap_or(10_000);
    if devices == 0 || devices > u64::from(u32::MAX) {
        return Err(Failure::Usage(format!(
            "--devices must be 1..={}",
            u32::MAX
        )));
    }
    let shards = cli.shards.clamp(1, 64);
    let idle = cli.duration.unwrap_or(DEFAULT_IDLE);
    let pid = std::process::id();
    let rss = || procfs::vm_rss_bytes(pid).unwrap_or(0);
    let anon = || procfs::rss_anon_bytes(pid).unwrap_or(0);
    let rss_start = rss();

    let pki = Pki::create()?;
    let mut config = Config::default();
    config.hub.data_dir = pki.data_dir().to_owned();
    config.coap.tls.client_auth = ClientAuth::Identity;
    let server_config = tls::server_config(&pki.server_files(), config.coap.tls.client_auth)
        .map_err(|e| format!("TLS configuration: {e}"))?;
    let authority = Arc::new(server::load_authority(&config)?);
    let validator = TokenValidator::new(authority.key_set(), server::validation_settings(&config))
        .map_err(|e| format!("token validator: {e}"))?;
    let provider = Arc::new(EmbeddedProvider::new(
        config.authority.provider_name.clone(),
        authority.clone(),
    ));
    let providers: Vec<Arc<dyn TokenProvider>> = vec![provider];
    let hub = Arc::new(MemoryHub::new());
    let discovery = Arc::new(OnceLock::new());
    let _ = discovery.set(coap_gateway::ocf::res::gateway_endpoint(
        true,
        &config.coap.address.to_string(),
    ));
    let session = server::session_config(
        &config,
        hub.clone(),
        Arc::new(SharedValidator::new(validator)),
        providers,
        &uuid::Uuid::new_v4().to_string(),
        discovery,
    );
    let ca = Ca::load(&pki.pki_dir()).map_err(|e| format!("cannot load the CA: {e}"))?;
    let roots = Arc::new(
        tls::load_roots(&pki.pki_dir().join("ca.pem"))
            .map_err(|e| format!("cannot load the CA certificate: {e}"))?,
    );
    let common = Arc::new(Common {
        session,
        server: server_config,
        ca,
        roots,
        provider: Arc::new(tls::provider()),
        authority,
        interrupted: ctx.interrupted.clone(),
        up: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        max_failures: (devices / 10).max(50),
        pings: AtomicU64::new(0),
        // ~1.5 ms of CPU per device on this machine; generous.
        setup_deadline: Instant::now()
            + Duration::from_secs(120)
            + Duration::from_millis(20 * devices / shards as u64),
        tick: TICK,
    });

    println!(
        "in-memory transport: {devices} devices on {shards} shard thread(s), then {} of virtual idle time",
        humantime::format_duration(idle)
    );
    let mut threads = Vec::with_capacity(shards);
    for i in 0..shards {
        let share = devices / shards as u64 + u64::from((i as u64) < devices % shards as u64);
        let (events_tx, events_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel();
        let common = common.clone();
        let handle = std::thread::Builder::new()
            .name(format!("inmem-shard-{i}"))
            .spawn(move || inmem_shard::run(i, common, WARMUP, share, idle, events_tx, go_rx))
            .map_err(|e| format!("cannot start a shard thread: {e}"))?;
        threads.push(ShardThread {
            handle: Some(handle),
            events: events_rx,
            go: go_tx,
        });
    }

    wait_all(&mut threads, &common, devices, "warm-up", |e| {
        matches!(e, Event::WarmedUp).then_some(())
    })?;
    std::thread::sleep(Duration::from_millis(200));
    let (rss_before, anon_before) = (rss(), anon());
    let cpu_before = procfs::self_cpu_ticks().map(|c| c.total()).unwrap_or(0);
    let setup_started = Instant::now();
    go_all(&threads);
    let setups = wait_all(&mut threads, &common, devices, "set-up", |e| match e {
        Event::SetUp(r) => Some(*r),
        _ => None,
    })?;
    let setup_wall = setup_started.elapsed();
    let cpu_setup = procfs::self_cpu_ticks().map(|c| c.total()).unwrap_or(0);
    let (rss_setup, anon_setup) = (rss(), anon());
    let setup = sum(&setups);
    println!(
        "set-up: {}/{devices} devices idle in {:.1} s ({:.0}/s), {} failed; VmRSS {:.1} MiB",
        setup.devices,
        setup_wall.as_secs_f64(),
        setup.devices as f64 / setup_wall.as_secs_f64().max(1e-9),
        setup.failed,
        mib(rss_setup)
    );

    let idle_started = Instant::now();
    go_all(&threads);
    let idles = wait_all(&mut threads, &common, devices, "idle", |e| match e {
        Event::Idle(r) => Some(*r),
        _ => None,
    })?;
    let idle_wall = idle_started.elapsed();
    let cpu_idle = procfs::self_cpu_ticks().map(|c| c.total()).unwrap_or(0);
    let (rss_idle, anon_idle) = (rss(), anon());
    let idled = sum(&idles);
    // Let the threads drop their devices.
    go_all(&threads);
    for t in &mut threads {
        if let Some(h) = t.handle.take() {
            let _ = h.join();
        }
    }
    drop(hub);

    let held = setup.devices;
    let device_side = held * IdleDevice::BYTES as u64;
    let per_device = |after: u64, before: u64| {
        (held > 0).then(|| (after.saturating_sub(before) as f64) / held as f64)
    };
    let gateway_per_device = |after: u64, before: u64| {
        (held > 0).then(|| {
            (after.saturating_sub(before).saturating_sub(device_side) as f64) / held as f64
        })
    };
    let bytes_per_device = gateway_per_device(rss_idle, rss_before);
    let setup_cpu_s = ctx.ticks_to_s(cpu_setup.saturating_sub(cpu_before));
    let idle_cpu_s = ctx.ticks_to_s(cpu_idle.saturating_sub(cpu_setup));
    let virtual_s = idles
        .iter()
        .map(|r| r.virtual_time.as_secs_f64())
        .fold(f64::INFINITY, f64::min);
    let virtual_s = if virtual_s.is_finite() {
        virtual_s
    } else {
        0.0
    };
    let device_seconds = idled.devices as f64 * virtual_s;
    let per_device_second = |d: Duration| {
        (device_seconds > 0.0).then(|| round(d.as_secs_f64() * 1e6 / device_seconds, 4))
    };
    let us_each = |d: Duration, n: u64| (n > 0).then(|| round(d.as_secs_f64() * 1e6 / n as f64, 1));
    let latency = setup
        .latency
        .as_ref()
        .map(Percentiles::of)
        .map(|p| serde_json::to_value(p).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    let failures = setup.failed + idled.failed;
    let closed: u64 = idled.closed_by_gateway.values().sum();

    println!(
        "memory: VmRSS {:.1} MiB at start, {:.1} after warm-up, {:.1} with {held} devices idle, {:.1} after the idle phase",
        mib(rss_start),
        mib(rss_before),
        mib(rss_setup),
        mib(rss_idle)
    );
    println!(
        "  per device: {} bytes in all, of which the in-memory devices hold {} (exact): gateway {} bytes (goal ≤ {BYTES_GOAL:.0})",
        fmt_opt(per_device(rss_idle, rss_before)),
        IdleDevice::BYTES,
        fmt_opt(bytes_per_device)
    );
    println!(
        "set-up CPU {:.1} s (shard threads {:.1} s): gateway {:.1} s ({} µs per device), devices {:.1} s, provisioning {:.1} s",
        setup_cpu_s,
        setup.cpu.as_secs_f64(),
        setup.cpu_share(setup.gateway).as_secs_f64(),
        fmt_opt(us_each(setup.cpu_share(setup.gateway), held)),
        setup.cpu_share(setup.device).as_secs_f64(),
        setup.cpu_share(setup.provisioning).as_secs_f64()
    );
    println!(
        "idle: {} devices for {virtual_s:.0} s of virtual time in {:.1} s wall, {:.2} CPU-s; {} Pings answered, {} closed by the gateway; gateway {} µs CPU per device per second",
        idled.devices,
        idle_wall.as_secs_f64(),
        idle_cpu_s,
        idled.pings,
        closed,
        per_device_second(idled.cpu_share(idled.gateway)).map_or("?".into(), |v| format!("{v:.3}"))
    );
    for (e, n) in setup.errors.iter().chain(idled.errors.iter()) {
        println!("  error ({n}x): {e}");
    }

    let phase = |r: &PhaseReport, cpu_s: f64| {
        json!({
            "wall_s": round(r.wall.as_secs_f64(), 3),
            "process_cpu_s": round(cpu_s, 2),
            "shard_threads_cpu_s": round(r.cpu.as_secs_f64(), 3),
            "shard_threads_wall_s": round(r.busy.as_secs_f64(), 3),
            "gateway_wall_s": round(r.gateway.as_secs_f64(), 3),
            "device_wall_s": round(r.device.as_secs_f64(), 3),
            "provisioning_wall_s": round(r.provisioning.as_secs_f64(), 3),
            "gateway_cpu_s": round(r.cpu_share(r.gateway).as_secs_f64(), 3),
            "device_cpu_s": round(r.cpu_share(r.device).as_secs_f64(), 3),
            "provisioning_cpu_s": round(r.cpu_share(r.provisioning).as_secs_f64(), 3),
            "devices": r.devices,
            "failed": r.failed,
            "errors": r.errors,
            "pings_answered": r.pings,
            "requests_answered": r.requests,
            "other_messages": r.other_messages,
            "closed_by_gateway": r.closed_by_gateway,
            "timers_fired": r.timers_fired,
        })
    };
    let mut setup_json = phase(&setup, setup_cpu_s);
    setup_json["in_sync"] = json!(setup.in_sync);
    setup_json["devices_per_wall_s"] =
        json!(round(held as f64 / setup_wall.as_secs_f64().max(1e-9), 1));
    setup_json["devices_per_process_cpu_s"] =
        json!((setup_cpu_s > 0.0).then(|| round(held as f64 / setup_cpu_s, 1)));
    setup_json["gateway_cpu_us_per_device"] = json!(us_each(setup.cpu_share(setup.gateway), held));
    setup_json["device_cpu_us_per_device"] = json!(us_each(setup.cpu_share(setup.device), held));
    setup_json["provisioning_cpu_us_per_device"] =
        json!(us_each(setup.cpu_share(setup.provisioning), held));
    setup_json["per_shard"] = json!(setups
        .iter()
        .map(|r| json!({"shard": r.shard, "devices": r.devices, "wall_s": round(r.wall.as_secs_f64(), 2)}))
        .collect::<Vec<_>>());
    let mut idle_json = phase(&idled, idle_cpu_s);
    idle_json["virtual_s"] = json!(round(virtual_s, 3));
    idle_json["gateway_cpu_us_per_device_per_s"] =
        json!(per_device_second(idled.cpu_share(idled.gateway)));
    idle_json["device_cpu_us_per_device_per_s"] =
        json!(per_device_second(idled.cpu_share(idled.device)));
    idle_json["process_cpu_us_per_device_per_s"] =
        json!((device_seconds > 0.0).then(|| round(idle_cpu_s * 1e6 / device_seconds, 4)));
    idle_json["gateway_cpu_us_per_ping"] =
        json!(us_each(idled.cpu_share(idled.gateway), idled.pings));
    idle_json["keepalive_timeout_s"] = json!(config.coap.keepalive_timeout.as_secs_f64());

    Ok(json!({
        "scenario": "idle",
        "transport": "memory",
        "devices": devices,
        "duration_s": round(virtual_s, 3),
        "throughput_per_s": round(held as f64 / setup_wall.as_secs_f64().max(1e-9), 1),
        "latency_us": latency,
        "latency_what": "wall time of one device's set-up on its shard thread: certificate, handshake, CSM, sign-up, sign-in, twin set-up",
        "shards": shards,
        "auth_mode": "identity",
        "hub": "memory (MemoryHub::new, as serve --memory)",
        "gateway": {
            "rss_bytes": rss_idle,
            "rss_start_bytes": rss_start,
            "rss_before_bytes": rss_before,
            "rss_setup_bytes": rss_setup,
            "rss_anon_before_bytes": anon_before,
            "rss_anon_setup_bytes": anon_setup,
            "rss_anon_bytes": anon_idle,
            "cpu_seconds": round(
                (setup.cpu_share(setup.gateway) + idled.cpu_share(idled.gateway)).as_secs_f64(),
                2
            ),
            "bytes_per_device": bytes_per_device.map(|b| round(b, 1)),
            "bytes_per_device_after_setup": gateway_per_device(rss_setup, rss_before).map(|b| round(b, 1)),
            "rss_anon_bytes_per_device": gateway_per_device(anon_idle, anon_before).map(|b| round(b, 1)),
            "process_bytes_per_device": per_device(rss_idle, rss_before).map(|b| round(b, 1)),
            "device_side_bytes_per_device": IdleDevice::BYTES,
            "driver_struct_bytes": inmem_shard::DRIVER_BYTES,
            "slot_struct_bytes": inmem_shard::SLOT_BYTES,
            "what": "VmRSS growth of this process from after the warm-up to after the idle phase, minus the in-memory devices' exact share, per device held; includes the sessions, TLS state, the embedded hub's and authority's per-device records and the timer set; not the runtime's socket, task or kernel buffers",
        },
        "setup": setup_json,
        "idle": idle_json,
        "baseline": Value::Null,
        "errors": {"total": failures, "setup": setup.errors, "idle": idled.errors},
        "closed_by_gateway": closed,
        "goal": {
            "bytes_per_device": BYTES_GOAL,
            "met": bytes_per_device.map(|b| b <= BYTES_GOAL),
        },
    }))
}

struct ShardThread {
    handle: Option<std::thread::JoinHandle<()>>,
    events: mpsc::Receiver<Event>,
    go: mpsc::Sender<()>,
}

fn go_all(threads: &[ShardThread]) {
    for t in threads {
        let _ = t.go.send(());
    }
}

/// Waits for every shard's event of a phase, printing progress.
fn wait_all<T>(
    threads: &mut [ShardThread],
    common: &Common,
    devices: u64,
    phase: &str,
    pick: impl Fn(Event) -> Option<T>,
) -> Result<Vec<T>, Failure> {
    let mut got: Vec<Option<T>> = threads.iter().map(|_| None).collect();
    let started = Instant::now();
    let mut last = Instant::now();
    let mut last_up = common.up.load(Ordering::Relaxed);
    // Bounded: every shard reports each phase or its thread ends; the
    // shards themselves stop at the set-up deadline and after the idle
    // time.
    while got.iter().any(Option::is_none) {
        for (t, slot) in threads.iter().zip(got.iter_mut()) {
            if slot.is_some() {
                continue;
            }
            match t.events.recv_timeout(Duration::from_millis(100)) {
                Ok(event) => match pick(event) {
                    Some(v) => *slot = Some(v),
                    None => {
                        return Err(Failure::Runtime(format!(
                            "a shard reported out of order during the {phase}"
                        )))
                    }
                },
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Failure::Runtime(format!(
                        "a shard thread ended during the {phase} (panic?)"
                    )))
                }
            }
        }
        if last.elapsed() >= PROGRESS_EVERY {
            let up = common.up.load(Ordering::Relaxed);
            let rate = (up - last_up.min(up)) as f64 / last.elapsed().as_secs_f64();
            println!(
                "  {phase} {:.0} s: {up}/{devices} devices idle ({rate:.0}/s), {} failed, {} Pings answered, VmRSS {:.1} MiB",
                started.elapsed().as_secs_f64(),
                common.failed.load(Ordering::Relaxed),
                common.pings.load(Ordering::Relaxed),
                mib(procfs::vm_rss_bytes(std::process::id()).unwrap_or(0))
            );
            last = Instant::now();
            last_up = up;
        }
    }
    Ok(got.into_iter().flatten().collect())
}

/// The shards' reports of one phase added up (wall: the longest).
fn sum(reports: &[PhaseReport]) -> PhaseReport {
    let mut total = PhaseReport::default();
    for r in reports {
        total.wall = total.wall.max(r.wall);
        total.busy += r.wall;
        total.cpu += r.cpu;
        total.gateway += r.gateway;
        total.device += r.device;
        total.provisioning += r.provisioning;
        total.devices += r.devices;
        total.failed += r.failed;
        for (k, v) in &r.errors {
            *total.errors.entry(k.clone()).or_default() += v;
        }
        total.pings += r.pings;
        total.requests += r.requests;
        total.other_messages += r.other_messages;
        for (k, v) in &r.closed_by_gateway {
            *total.closed_by_gateway.entry(k.clone()).or_default() += v;
        }
        total.timers_fired += r.timers_fired;
        total.virtual_time = total.virtual_time.max(r.virtual_time);
        total.in_sync += r.in_sync;
        match (&mut total.latency, &r.latency) {
            (Some(mine), Some(theirs)) => {
                let _ = mine.add(theirs);
            }
            (mine @ None, Some(theirs)) => *mine = Some(theirs.clone()),
            _ => {}
        }
    }
    total
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or("?".into(), |v| format!("{v:.0}"))
}
