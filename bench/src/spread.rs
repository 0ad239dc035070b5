//! Past the per-process socket limit: `idle --procs P` re-executes this
//! binary as P worker processes (`--worker I`, hidden), each holding its
//! share of the devices from its own source address 127.0.0.(1+I) (bound
//! before connect), while this process (the parent) owns the gateway,
//! reads its memory and sums the workers' results.
//!
//! The protocol on the workers' stdin/stdout, one line each. `idle`:
//! worker → parent `connected <n>` once its connect phase is over;
//! parent → worker `stop` after the parent read the gateway's memory;
//! worker → parent `report <json>` with its counts and histograms, then it
//! exits. `connect --handshake-only` likewise: `ready` (warmed up), `go`
//! (the parent read the gateway's CPU), `report <json>`. Every wait is
//! bounded; a worker that does not answer is killed.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::idle::{self, IdleClients, ThreadReport};
use crate::load::{self, Errors, Percentiles, StageHistograms};
use crate::{gateway, procfs, round, sleep_unless, Cli, Context, Failure};

/// The source address of this process's connections, when it is a worker.
static SOURCE: OnceLock<IpAddr> = OnceLock::new();

/// Most worker processes: one 127.0.0.x address each, x = 1..=254.
const MAX_PROCS: usize = 254;

pub fn source_ip() -> Option<IpAddr> {
    SOURCE.get().copied()
}

/// The source address of worker `i`: 127.0.0.(1+i).
pub fn worker_ip(i: usize) -> Option<IpAddr> {
    let x = u8::try_from(i + 1).ok().filter(|x| *x < 255)?;
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, x)))
}

/// A blocking TCP connection to `addr` from `ip` (any port), bounded by
/// `timeout`.
pub fn connect_from(ip: IpAddr, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}

/// A histogram as `[[value, count], ...]` (what a worker sends).
pub fn histogram_json(h: &Histogram<u64>) -> Value {
    Value::Array(
        h.iter_recorded()
            .map(|v| json!([v.value_iterated_to(), v.count_at_value()]))
            .collect(),
    )
}

/// The inverse of [`histogram_json`]; malformed entries are skipped.
pub fn histogram_from_json(v: &Value) -> Histogram<u64> {
    let mut h = load::histogram();
    for pair in v.as_array().into_iter().flatten() {
        if let (Some(value), Some(count)) = (pair[0].as_u64(), pair[1].as_u64()) {
            h.saturating_record_n(value.max(1), count);
        }
    }
    h
}

fn stages_json(s: &StageHistograms) -> Value {
    json!({
        "total": histogram_json(&s.total),
        "tcp_connect": histogram_json(&s.tcp_connect),
        "tls": histogram_json(&s.tls),
        "first_csm": histogram_json(&s.first_csm),
    })
}

fn stages_from_json(v: &Value) -> StageHistograms {
    let mut s = StageHistograms::new();
    s.total = histogram_from_json(&v["total"]);
    s.tcp_connect = histogram_from_json(&v["tcp_connect"]);
    s.tls = histogram_from_json(&v["tls"]);
    s.first_csm = histogram_from_json(&v["first_csm"]);
    s
}

fn errors_from_json(v: &Value) -> Errors {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Errors {
        total: n("total"),
        tcp_connect: n("tcp_connect"),
        tls: n("tls"),
        first_csm: n("first_csm"),
        request: n("request"),
        sign_up: n("sign_up"),
        sign_in: n("sign_in"),
        samples: v["samples"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect(),
    }
}

fn report_json(r: &ThreadReport) -> Value {
    json!({
        "connected": r.connected,
        "held_at_end": r.held_at_end,
        "closed_by_gateway": r.closed_by_gateway,
        "pings_answered": r.pings_answered,
        "unexpected_messages": r.unexpected_messages,
        "errors": r.errors,
        "latency": r.latency.as_ref().map(stages_json),
    })
}

fn report_from_json(v: &Value) -> Result<ThreadReport, String> {
    let n = |k: &str| {
        v[k].as_u64()
            .ok_or_else(|| format!("a worker's report has no {k}: {v}"))
    };
    Ok(ThreadReport {
        connected: n("connected")?,
        held_at_end: n("held_at_end")?,
        closed_by_gateway: n("closed_by_gateway")?,
        pings_answered: n("pings_answered")?,
        unexpected_messages: n("unexpected_messages")?,
        errors: errors_from_json(&v["errors"]),
        latency: Some(stages_from_json(&v["latency"])),
    })
}

/// `idle --worker I`: holds `--devices` devices from 127.0.0.(1+I) until
/// the parent says `stop` (or the hard deadline), then reports.
pub fn idle_worker(cli: &Cli, ctx: &Context) -> Result<(), Failure> {
    let (addr, config, _scratch) = worker_setup(cli)?;
    let devices = cli.devices.unwrap_or(0);
    let hold_limit = cli.duration.unwrap_or(Duration::from_secs(600));
    let started = Instant::now();
    let connect_deadline = started + Duration::from_secs(60) + Duration::from_millis(devices);
    let clients = IdleClients::start(
        addr,
        &config,
        devices,
        ctx.threads,
        connect_deadline,
        connect_deadline + hold_limit,
        &ctx.interrupted,
    );
    while !clients.all_connected() && !ctx.interrupted.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let connected = clients.shared.connected.load(Ordering::Relaxed);
    say(&format!("connected {connected}"))?;
    // Wait for the parent's `stop` (EOF counts: the parent is gone).
    wait_for_parent(hold_limit, &ctx.interrupted);
    let report = clients.stop();
    say(&format!("report {}", report_json(&report)))
}

/// What every worker starts with: it connects from its own source address
/// (127.0.0.(1+I)) to `--gateway`, with the client configuration of
/// `--ca-dir` (its files live in the returned directory).
fn worker_setup(
    cli: &Cli,
) -> Result<
    (
        SocketAddr,
        std::sync::Arc<rustls::ClientConfig>,
        tempfile::TempDir,
    ),
    Failure,
> {
    let (Some(i), Some(addr), Some(ca_dir)) = (cli.worker, cli.gateway, &cli.ca_dir) else {
        return Err(Failure::Usage(
            "--worker is internal: it needs --gateway and --ca-dir".into(),
        ));
    };
    let ip = worker_ip(i)
        .ok_or_else(|| Failure::Usage(format!("--worker {i}: at most {MAX_PROCS} workers")))?;
    SOURCE
        .set(ip)
        .map_err(|_| Failure::Runtime("the source address was already set".into()))?;
    let scratch = tempfile::Builder::new()
        .prefix("coap-gateway-bench-worker-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let config = gateway::external_client_config(ca_dir, scratch.path())?;
    Ok((addr, config, scratch))
}

/// One line to the parent.
fn say(line: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}").map_err(|e| format!("stdout: {e}"))?;
    out.flush()
        .map_err(|e| Failure::Runtime(format!("stdout: {e}")))
}

/// Waits (at most `limit`) for a line from the parent on stdin; EOF
/// counts (the parent is gone).
fn wait_for_parent(limit: Duration, interrupted: &std::sync::atomic::AtomicBool) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = io::stdin().lock().read_line(&mut line);
        let _ = tx.send(line);
    });
    let until = Instant::now() + limit;
    while Instant::now() < until && !interrupted.load(Ordering::Relaxed) {
        if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
            break;
        }
    }
}

/// `connect --handshake-only --worker I`: warms up, says `ready`, waits
/// for `go`, runs `--devices` handshakes from 127.0.0.(1+I) and reports.
pub fn connect_worker(cli: &Cli, ctx: &Context) -> Result<(), Failure> {
    let (addr, config, _scratch) = worker_setup(cli)?;
    let count = cli.devices.unwrap_or(0);
    let limit = cli.duration.unwrap_or(Duration::from_secs(120));
    let plan = load::Plan::Handshake(config);
    let warm = (count / 20).clamp(10, 100);
    let _ = load::run(
        addr,
        &plan,
        warm,
        ctx.threads,
        Instant::now() + Duration::from_secs(30),
        &ctx.interrupted,
    );
    say("ready")?;
    wait_for_parent(Duration::from_secs(120), &ctx.interrupted);
    let r = load::run(
        addr,
        &plan,
        count,
        ctx.threads,
        Instant::now() + limit,
        &ctx.interrupted,
    );
    say(&format!(
        "report {}",
        json!({
            "ok": r.ok,
            "errors": r.errors,
            "wall_s": r.wall.as_secs_f64(),
            "cut_short": r.cut_short,
            "latency": stages_json(&r.latency),
        })
    ))
}

/// A running worker process.
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    ip: IpAddr,
    devices: u64,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Bounded: a worker that already exited is reaped; one that did not
        // answer is killed.
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Waits for one line of each worker starting with `prefix` (bounded);
/// returns the rest of each line by worker.
fn collect(
    lines: &mpsc::Receiver<(usize, String)>,
    procs: usize,
    prefix: &str,
    limit: Duration,
    interrupted: &std::sync::atomic::AtomicBool,
) -> Vec<Option<String>> {
    let mut got: Vec<Option<String>> = vec![None; procs];
    let until = Instant::now() + limit;
    while got.iter().any(Option::is_none) && !interrupted.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match lines.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok((i, line)) => {
                if let Some(rest) = line.strip_prefix(prefix) {
                    got[i] = Some(rest.trim().to_owned());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Every worker closed its stdout.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    got
}

/// The workers' stdout: (worker, line).
type Lines = mpsc::Receiver<(usize, String)>;

/// Starts `procs` workers of `scenario` against `addr`, worker `i` with
/// its share of `devices`; their stdout lines arrive on the receiver.
fn spawn_workers(
    scenario: &str,
    addr: &SocketAddr,
    ca_dir: &std::path::Path,
    devices: u64,
    procs: usize,
    threads: usize,
    extra: &[&str],
) -> Result<(Vec<Worker>, Lines), Failure> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let (tx, lines) = mpsc::channel::<(usize, String)>();
    let mut workers = Vec::with_capacity(procs);
    for i in 0..procs {
        let share = devices / procs as u64 + u64::from((i as u64) < devices % procs as u64);
        let ip =
            worker_ip(i).ok_or_else(|| Failure::Usage(format!("at most {MAX_PROCS} processes")))?;
        let mut child = Command::new(&exe)
            .arg(scenario)
            .args(["--gateway", &addr.to_string()])
            .arg("--ca-dir")
            .arg(ca_dir)
            .args(["--devices", &share.to_string()])
            .args(["--threads", &threads.to_string()])
            .args(["--worker", &i.to_string()])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start worker {i} ({}): {e}", exe.display()))?;
        let stdout = child.stdout.take();
        let stdin = child.stdin.take();
        if let Some(stdout) = stdout {
            let tx = tx.clone();
            std::thread::spawn(move || {
                // Bounded by the worker's life: EOF ends it.
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((i, line)).is_err() {
                        break;
                    }
                }
            });
        }
        workers.push(Worker {
            child,
            stdin,
            ip,
            devices: share,
        });
    }
    Ok((workers, lines))
}

/// Writes `line` to every worker's stdin (and closes it).
fn tell(workers: &mut [Worker], line: &str) {
    for w in workers {
        if let Some(mut stdin) = w.stdin.take() {
            let _ = stdin.write_all(line.as_bytes());
            let _ = stdin.write_all(b"\n");
        }
    }
}

/// `connect --handshake-only --procs P`: the gateway's handshakes per
/// CPU-second with the clients spread over P processes, against bare
/// rustls measured in this process (`baseline`, as plain `connect` does)
/// with the same number of handshakes.
pub fn connect_scenario(cli: &Cli, ctx: &Context) -> Result<Value, Failure> {
    if !cli.handshake_only {
        return Err(Failure::Usage(
            "connect --procs needs --handshake-only: the sign-in set-up keeps its devices in one process"
                .into(),
        ));
    }
    let count = cli.devices.unwrap_or(5000);
    let procs = cli.procs.unwrap_or(1).clamp(1, MAX_PROCS);
    let limit = cli.duration.unwrap_or(Duration::from_secs(120));
    let pki = gateway::Pki::create()?;
    let (mut target, client) = crate::target(cli, ctx, &pki)?;
    let pid = target.pid;
    let gw_cpu = || pid.and_then(|p| procfs::process_cpu_ticks(p).ok());
    let (mut workers, lines) = spawn_workers(
        "connect",
        &target.addr,
        &target.ca_dir,
        count,
        procs,
        ctx.threads,
        &[
            "--handshake-only",
            "--duration",
            &format!("{}s", limit.as_secs()),
        ],
    )?;
    let ready = collect(
        &lines,
        procs,
        "ready",
        Duration::from_secs(120),
        &ctx.interrupted,
    );
    if let Some(i) = ready.iter().position(Option::is_none) {
        return Err(Failure::Runtime(format!("worker {i} did not get ready")));
    }
    let cpu_before = gw_cpu();
    let started = Instant::now();
    tell(&mut workers, "go");
    let reports = collect(
        &lines,
        procs,
        "report ",
        limit + Duration::from_secs(60),
        &ctx.interrupted,
    );
    let wall = started.elapsed();
    let cpu = cpu_before
        .zip(gw_cpu())
        .map(|(a, b)| ctx.ticks_to_s(b.since(a).total()));
    let mut ok = 0;
    let mut errors = Errors::default();
    let mut latency = StageHistograms::new();
    let mut per_process = Vec::new();
    for (i, (w, r)) in workers.iter().zip(&reports).enumerate() {
        let r = r
            .as_ref()
            .ok_or_else(|| format!("worker {i} sent no report"))?;
        let v: Value = serde_json::from_str(r).map_err(|e| format!("worker {i}'s report: {e}"))?;
        let n = v["ok"]
            .as_u64()
            .ok_or_else(|| format!("worker {i}'s report has no ok: {v}"))?;
        let e = errors_from_json(&v["errors"]);
        per_process.push(json!({
            "source_ip": w.ip.to_string(),
            "handshakes": w.devices,
            "ok": n,
            "errors": e.total,
            "wall_s": v["wall_s"],
        }));
        ok += n;
        errors.add(&e);
        latency.add(&stages_from_json(&v["latency"]));
    }
    drop(workers);
    let rss = pid.and_then(|p| procfs::vm_rss_bytes(p).ok());
    let health = target.spawned.as_mut().map(|g| g.health());
    drop(target);
    let gw_rate = cpu.filter(|c| *c > 0.0).map(|c| ok as f64 / c);
    let (floor, floor_failures) = crate::run_baseline(ctx, &pki, &client, count, limit)?;
    let floor_rate = floor.per_cpu_second();
    let ratio = gw_rate.zip(floor_rate).map(|(g, f)| g / f);
    let p = Percentiles::of(&latency.total);
    println!(
        "gateway: {ok} handshakes from {procs} processes in {:.2} s ({:.0}/s wall), {} errors; gateway CPU {} s -> {} per CPU-s; latency µs p50 {} p99 {}",
        wall.as_secs_f64(),
        ok as f64 / wall.as_secs_f64().max(1e-9),
        errors.total,
        cpu.map_or("?".into(), |c| format!("{c:.2}")),
        gw_rate.map_or("?".into(), |r| format!("{r:.0}")),
        p.p50,
        p.p99
    );
    crate::print_run(
        "baseline (bare rustls, 1 thread, clients in this process)",
        &floor,
        "server thread",
    );
    for e in &errors.samples {
        println!("  error: {e}");
    }
    crate::check_health(health.as_ref())?;
    match ratio {
        Some(r) => println!(
            "ratio gateway/baseline: {r:.3} (goal >= {:.2}: {})",
            crate::CONNECT_RATIO_GOAL,
            if r >= crate::CONNECT_RATIO_GOAL {
                "met"
            } else {
                "MISSED"
            }
        ),
        None => println!("ratio gateway/baseline: not measured"),
    }
    if ok == 0 {
        return Err(Failure::Runtime(
            "no connect into the gateway succeeded".into(),
        ));
    }
    Ok(json!({
        "scenario": "connect",
        "mode": "handshake",
        "procs": procs,
        "devices": count,
        "rounds": 1,
        "duration_s": round(wall.as_secs_f64(), 3),
        "throughput_per_s": round(ok as f64 / wall.as_secs_f64().max(1e-9), 1),
        "handshakes_per_cpu_s": gw_rate.map(|r| round(r, 1)),
        "cpu_us_per_connect": gw_rate.map(|r| round(1e6 / r, 1)),
        "latency_us": p,
        "stages_us": latency.stages(),
        "errors": errors,
        "gateway": {
            "pid": pid,
            "shards": cli.gateway.is_none().then_some(cli.shards),
            "rss_bytes": rss,
            "cpu_seconds": cpu.map(|c| round(c, 3)),
            "handshakes_per_cpu_s": gw_rate.map(|r| round(r, 1)),
            "bytes_per_device": Value::Null,
            "stderr_lines": health.as_ref().map(|h| h.stderr_lines),
        },
        "baseline": crate::merge(
            floor.summary("handshakes_per_cpu_s"),
            json!({
                "what": "bare rustls, 1 thread; its clients in the parent process",
                "server_failures": floor_failures,
            }),
        ),
        "ratio": ratio.map(|r| round(r, 4)),
        "per_process": per_process,
        "goal": { "ratio_min": crate::CONNECT_RATIO_GOAL, "met": ratio.map(|r| r >= crate::CONNECT_RATIO_GOAL) },
        "client_threads_per_process": ctx.threads,
    }))
}

/// `idle --procs P`: the parent side.
pub fn idle_scenario(cli: &Cli, ctx: &Context) -> Result<Value, Failure> {
    let devices = cli.devices.unwrap_or(10_000);
    let procs = cli.procs.unwrap_or(1).clamp(1, MAX_PROCS);
    let hold = cli.duration.unwrap_or(Duration::from_secs(5));
    let pki = gateway::Pki::create()?;
    let (mut target, client) = crate::target(cli, ctx, &pki)?;
    let pid = target.pid;
    let rss_startup = pid.and_then(|p| procfs::vm_rss_bytes(p).ok());
    // Warm-up from this process, as `idle` does.
    idle::warm_up(target.addr, &client, &ctx.interrupted)?;
    let before = idle::Snapshot::take(pid);

    let connect_limit = Duration::from_secs(90) + Duration::from_millis(devices);
    let started = Instant::now();
    // The worker's own bound on how long it holds.
    let worker_limit = format!("{}s", (connect_limit + hold).as_secs() + 120);
    let (mut workers, lines) = spawn_workers(
        "idle",
        &target.addr,
        &target.ca_dir,
        devices,
        procs,
        ctx.threads,
        &["--duration", &worker_limit],
    )?;
    let connected_lines = collect(&lines, procs, "connected ", connect_limit, &ctx.interrupted);
    let connect_phase = started.elapsed();
    let connected: u64 = connected_lines
        .iter()
        .flatten()
        .filter_map(|s| s.parse::<u64>().ok())
        .sum();
    if let Some(i) = connected_lines.iter().position(Option::is_none) {
        return Err(Failure::Runtime(format!(
            "worker {i} did not finish connecting within {connect_limit:?}"
        )));
    }
    println!(
        "idle: {connected}/{devices} devices connected by {procs} processes in {:.2} s",
        connect_phase.as_secs_f64()
    );
    sleep_unless(hold, &ctx.interrupted);
    let after = idle::Snapshot::take(pid);
    let held_for = started.elapsed() - connect_phase;
    tell(&mut workers, "stop");
    let reports = collect(
        &lines,
        procs,
        "report ",
        Duration::from_secs(60),
        &ctx.interrupted,
    );
    let mut total = ThreadReport::default();
    let mut per_process = Vec::new();
    for (i, (w, r)) in workers.iter().zip(&reports).enumerate() {
        let r = r
            .as_ref()
            .ok_or_else(|| format!("worker {i} sent no report"))?;
        let v: Value = serde_json::from_str(r).map_err(|e| format!("worker {i}'s report: {e}"))?;
        let report = report_from_json(&v)?;
        per_process.push(json!({
            "source_ip": w.ip.to_string(),
            "devices": w.devices,
            "connected": report.connected,
            "held_at_end": report.held_at_end,
            "closed_by_gateway": report.closed_by_gateway,
            "errors": report.errors.total,
        }));
        total.add(report);
    }
    drop(workers);
    sleep_unless(Duration::from_secs(2), &ctx.interrupted);
    let rss_after_close = pid.and_then(|p| procfs::vm_rss_bytes(p).ok());
    let health = target.spawned.as_mut().map(|g| g.health());
    drop(target);

    let measured = idle::Measured {
        devices,
        connected,
        connect_phase,
        held_for,
        total,
        pid,
        rss_startup,
        before,
        after,
        rss_after_close,
        health,
    };
    let mut report = measured.finish(cli.gateway.is_none().then_some(cli.shards), ctx)?;
    report["procs"] = json!(procs);
    report["per_process"] = json!(per_process);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_the_trip_between_processes() {
        let mut h = load::histogram();
        for v in [1u64, 5, 5, 900, 120_000] {
            h.record(v).unwrap();
        }
        let back = histogram_from_json(&histogram_json(&h));
        assert_eq!(back.len(), 5);
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert_eq!(back.max(), h.max());
        assert!(histogram_from_json(&json!([["x", 1], [3]])).is_empty());
    }

    #[test]
    fn workers_get_distinct_loopback_addresses() {
        assert_eq!(worker_ip(0), Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))));
        assert_eq!(worker_ip(1), Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))));
        assert_eq!(
            worker_ip(253),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 254)))
        );
        assert_eq!(worker_ip(254), None);
    }

    #[test]
    fn a_worker_report_round_trips() {
        let mut r = ThreadReport {
            connected: 3,
            held_at_end: 2,
            closed_by_gateway: 1,
            latency: Some(StageHistograms::new()),
            ..ThreadReport::default()
        };
        r.errors.total = 1;
        r.errors.tls = 1;
        r.errors.samples.push("tls: x".into());
        let back = report_from_json(&report_json(&r)).unwrap();
        assert_eq!(
            (back.connected, back.held_at_end, back.closed_by_gateway),
            (3, 2, 1)
        );
        assert_eq!((back.errors.total, back.errors.tls), (1, 1));
        assert!(report_from_json(&json!({})).is_err());
    }
}
