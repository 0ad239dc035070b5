//! `command`: N connected twin devices (`twin.rs`); M updates through the
//! hub's HTTP API, `PUT /api/v1/devices/{id}/resources/bench/0` with body
//! `{"v": i}`, each to a random device, from C client threads each with
//! one request outstanding (keep-alive connection). The API waits for the
//! device's answer (spec §7.2 POST, §7.3), so the HTTP round trip is the
//! command's: API → hub (committed to its store) → gateway session →
//! device → 2.04 → hub → API. Each device records the `v` of every
//! update it got, so that "answered exactly once" is checked on both
//! ends: HTTP 200 with the device's echo of `v`, and `v` seen by exactly
//! one device exactly once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};

use crate::http::Http;
use crate::live::SendPlan;
use crate::load::{self, Percentiles};
use crate::notify::{twin_fleet, HubCounts};
use crate::{check_health, procfs, round, Cli, Context, Failure};

/// Goal of `command` (issue 4): p99 of the HTTP round trip, µs.
pub const COMMAND_P99_GOAL_US: u64 = 2_000;
/// Time-out of one command's HTTP call.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Error messages kept.
const SAMPLES: usize = 10;

/// xorshift64*: a device picked at random per command, reproducible per
/// thread.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// How the commands of one phase ended.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Outcomes {
    /// HTTP 200, `status` OK, content `{"v": i}` echoed.
    pub ok: u64,
    /// HTTP status other than 200, by status.
    pub http_status: BTreeMap<u16, u64>,
    /// 200 whose body was not the device's echo.
    pub wrong_answer: u64,
    /// No HTTP answer (connection or time-out).
    pub transport: u64,
    pub samples: Vec<String>,
    /// The `v` of every command answered 200 with its echo.
    #[serde(skip)]
    pub ok_values: Vec<u64>,
}

impl Outcomes {
    fn add(&mut self, o: Outcomes) {
        self.ok += o.ok;
        for (k, v) in o.http_status {
            *self.http_status.entry(k).or_default() += v;
        }
        self.wrong_answer += o.wrong_answer;
        self.transport += o.transport;
        for s in o.samples {
            if self.samples.len() < SAMPLES {
                self.samples.push(s);
            }
        }
        self.ok_values.extend(o.ok_values);
    }

    fn failed(&self) -> u64 {
        self.http_status.values().sum::<u64>() + self.wrong_answer + self.transport
    }

    fn sample(&mut self, m: String) {
        if self.samples.len() < SAMPLES {
            self.samples.push(m);
        }
    }
}

/// Whether `body` is the API's answer to update `v`: `status` OK and
/// the device's echo `{"v": v}` as content.
pub fn is_echo(body: &[u8], v: u64) -> bool {
    let Ok(j) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    j.get("status").and_then(Value::as_str) == Some("OK")
        && j.get("content")
            .and_then(|c| c.get("v"))
            .and_then(Value::as_u64)
            == Some(v)
}

/// The exactly-once check: `ok` values (HTTP 200 with echo) against how
/// often each value in `range` reached a device.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ExactlyOnce {
    /// Commands issued.
    pub issued: u64,
    /// 200 with echo and seen exactly once on the devices.
    pub exactly_once: u64,
    /// Values no device saw.
    pub never_reached_device: u64,
    /// Extra deliveries of a value a device had already seen.
    pub device_duplicates: u64,
    /// 200 with echo although no device saw the value (should be 0).
    pub ok_without_delivery: u64,
}

pub fn exactly_once(range: std::ops::Range<u64>, ok: &[u64], seen: &[u64]) -> ExactlyOnce {
    let len = (range.end - range.start) as usize;
    let mut count = vec![0u32; len];
    for &v in seen {
        if range.contains(&v) {
            count[(v - range.start) as usize] += 1;
        }
    }
    let mut okay = vec![false; len];
    for &v in ok {
        if range.contains(&v) {
            okay[(v - range.start) as usize] = true;
        }
    }
    let mut r = ExactlyOnce {
        issued: len as u64,
        ..ExactlyOnce::default()
    };
    for i in 0..len {
        match count[i] {
            0 => {
                r.never_reached_device += 1;
                if okay[i] {
                    r.ok_without_delivery += 1;
                }
            }
            c => {
                r.device_duplicates += u64::from(c - 1);
                if c == 1 && okay[i] {
                    r.exactly_once += 1;
                }
            }
        }
    }
    r
}

/// `count` commands numbered from `first`, over `clients` threads (thread
/// `t` takes numbers `first + t`, `first + t + clients`, …).
/// Where the commands go: the API, its bearer token, the devices.
struct Commands {
    api: SocketAddr,
    bearer: String,
    ids: Arc<Vec<String>>,
}

fn run_phase(
    to: &Commands,
    first: u64,
    count: u64,
    clients: usize,
    deadline: Instant,
    interrupted: &Arc<AtomicBool>,
) -> (Outcomes, Histogram<u64>, Duration) {
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|t| {
            let (api, ids, bearer, interrupted) = (
                to.api,
                to.ids.clone(),
                to.bearer.clone(),
                interrupted.clone(),
            );
            std::thread::spawn(move || {
                let mut http = Http::new(api, Some(bearer), HTTP_TIMEOUT);
                let mut rng =
                    Rng(0x9e37_79b9_7f4a_7c15
                        ^ (first + t as u64 + 1).wrapping_mul(0x1000_0000_01b3));
                let mut out = Outcomes::default();
                let mut h = load::histogram();
                let mut v = first + t as u64;
                while v < first + count {
                    if Instant::now() >= deadline || interrupted.load(Ordering::Relaxed) {
                        break;
                    }
                    let id = &ids[rng.below(ids.len())];
                    let path = format!("/api/v1/devices/{id}/resources/bench/0");
                    let body = format!("{{\"v\":{v}}}");
                    let at = Instant::now();
                    match http.request("PUT", &path, Some(("application/json", body.as_bytes()))) {
                        Ok(r) if r.status == 200 && is_echo(&r.body, v) => {
                            load::record(&mut h, at.elapsed());
                            out.ok += 1;
                            out.ok_values.push(v);
                        }
                        Ok(r) if r.status == 200 => {
                            out.wrong_answer += 1;
                            out.sample(format!(
                                "PUT {path} v={v}: 200 {}",
                                String::from_utf8_lossy(&r.body)
                            ));
                        }
                        Ok(r) => {
                            *out.http_status.entry(r.status).or_default() += 1;
                            out.sample(format!(
                                "PUT {path} v={v}: {} {}",
                                r.status,
                                String::from_utf8_lossy(&r.body)
                            ));
                        }
                        Err(e) => {
                            out.transport += 1;
                            out.sample(format!("PUT {path} v={v}: {e}"));
                        }
                    }
                    v += clients as u64;
                }
                (out, h)
            })
        })
        .collect();
    let mut all = Outcomes::default();
    let mut h = load::histogram();
    for handle in handles {
        match handle.join() {
            Ok((o, x)) => {
                all.add(o);
                let _ = h.add(&x);
            }
            Err(_) => all.sample("a client thread panicked".into()),
        }
    }
    (all, h, started.elapsed())
}

pub fn scenario(cli: &Cli, ctx: &Context, open_files: u64) -> Result<Value, Failure> {
    let n = cli.devices.unwrap_or(1000).max(1);
    let requests = cli.requests.unwrap_or(20_000).max(1);
    let clients = cli.concurrency.unwrap_or(1).max(1);
    let limit = cli.duration.unwrap_or(Duration::from_secs(300));
    let device_threads = cli.threads.unwrap_or(1).max(1);
    let mut tf = twin_fleet(cli, ctx, open_files, n, 1, 0)?;
    let pid = tf.target.pid;
    let gw_cpu = || pid.and_then(|p| procfs::process_cpu_ticks(p).ok());
    let devices = tf
        .devices
        .take()
        .ok_or_else(|| Failure::Runtime("no twin fleet".into()))?;
    let held = devices.held();
    let ids: Arc<Vec<String>> = Arc::new(devices.device_ids());
    let deadline = Instant::now() + limit + Duration::from_secs(60);
    let plan = SendPlan {
        rate: None,
        per_write: 1,
        window: u64::MAX,
    };
    // Devices only answer: `sending` stays down.
    let drivers = devices.drive(device_threads, plan, deadline, &ctx.interrupted);
    let shared = drivers.shared();

    let warm = (requests / 10).clamp(50, 500);
    let to = Commands {
        api: tf.api,
        bearer: tf.bearer.clone(),
        ids: ids.clone(),
    };
    let (warm_out, _, _) = run_phase(&to, 0, warm, clients, deadline, &ctx.interrupted);
    println!(
        "warm-up: {} commands, {} ok, {} failed",
        warm,
        warm_out.ok,
        warm_out.failed()
    );

    let mut http = Http::new(tf.api, None, HTTP_TIMEOUT);
    let before = HubCounts::read(&mut http)?;
    let cpu_before = gw_cpu();
    let threads_before = pid.and_then(|p| procfs::threads_cpu_ticks(p).ok());
    let self_before = procfs::self_cpu_ticks().ok();
    let (out, hist, wall) = run_phase(
        &to,
        warm,
        requests,
        clients,
        Instant::now() + limit,
        &ctx.interrupted,
    );
    let cpu_after = gw_cpu();
    let threads_after = pid.and_then(|p| procfs::threads_cpu_ticks(p).ok());
    let self_after = procfs::self_cpu_ticks().ok();
    // The devices' follow-up notifications may still be on their way.
    std::thread::sleep(Duration::from_millis(200));
    let after = HubCounts::read(&mut http)?;
    let rss = pid.and_then(|p| procfs::vm_rss_bytes(p).ok());
    let (devices, thread_errors) = drivers.stop();
    let still_open = devices.len();
    let mut seen = Vec::new();
    for d in &devices {
        seen.extend_from_slice(&d.update_values);
    }
    let health = tf.target.spawned.as_mut().map(|g| g.health());

    let once = exactly_once(warm..warm + requests, &out.ok_values, &seen);
    let p = Percentiles::of(&hist);
    let d = after.since(&before);
    let wall_s = wall.as_secs_f64();
    let cpu = cpu_before.zip(cpu_after).map(|(a, b)| b.since(a));
    let cpu_s = cpu.map(|t| ctx.ticks_to_s(t.total()));
    let cpu_sys_s = cpu.map(|t| ctx.ticks_to_s(t.system));
    let client_cpu_s = self_before
        .zip(self_after)
        .map(|(a, b)| ctx.ticks_to_s(b.since(a).total()));
    let throughput = out.ok as f64 / wall_s.max(1e-9);
    let met = (p.count > 0).then_some(p.p99 < COMMAND_P99_GOAL_US);

    println!(
        "command: {requests} PUTs to random devices of {held}, {clients} client(s) with one request each in flight, {device_threads} device {} thread(s)",
        cli.engine.name()
    );
    println!(
        "  {} ok, {} failed ({} transport, {} wrong answer, HTTP {:?}) in {wall_s:.2} s ({throughput:.0}/s)",
        out.ok,
        out.failed(),
        out.transport,
        out.wrong_answer,
        out.http_status
    );
    println!(
        "  round trip µs p50 {} p90 {} p99 {} p99.9 {} max {} (goal p99 < {COMMAND_P99_GOAL_US}: {})",
        p.p50,
        p.p90,
        p.p99,
        p.p999,
        p.max,
        match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        }
    );
    println!(
        "  exactly once: {} of {} (never reached a device {}, device duplicates {}, ok without delivery {})",
        once.exactly_once,
        once.issued,
        once.never_reached_device,
        once.device_duplicates,
        once.ok_without_delivery
    );
    if let Some(c) = cpu_s {
        println!(
            "  gateway CPU {c:.2} s ({:.2} s kernel) = {:.1} µs per command; client CPU {:.2} s; hub: {} submitted, {} answered, {} notifications, {} store commits",
            cpu_sys_s.unwrap_or(0.0),
            c * 1e6 / out.ok.max(1) as f64,
            client_cpu_s.unwrap_or(0.0),
            d.commands_submitted,
            d.commands_answered,
            d.notifications,
            d.store_commits
        );
    }
    for e in out.samples.iter().chain(thread_errors.iter()) {
        println!("  error: {e}");
    }
    procfs::print_threads_cpu(threads_before.as_ref(), threads_after.as_ref(), ctx.clk_tck);
    check_health(health.as_ref())?;
    if out.ok == 0 {
        return Err(Failure::Runtime("no command was answered".into()));
    }
    let opt = |x: Option<f64>, p: i32| x.map(|v| round(v, p));
    Ok(json!({
        "scenario": "command",
        "engine": cli.engine.name(),
        "devices": held,
        "requests": requests,
        "concurrency": clients,
        "duration_s": round(wall_s, 3),
        "throughput_per_s": round(throughput, 1),
        "latency_us": p,
        "latency_what": "HTTP PUT sent to its 200 read (API → hub → gateway → device 2.04 → API), client side",
        "outcomes": out,
        "exactly_once": once,
        "lost": once.never_reached_device,
        "duplicated": once.device_duplicates,
        "hub": {
            "commands_submitted": d.commands_submitted,
            "commands_answered": d.commands_answered,
            "notifications": d.notifications,
            "store_commits": d.store_commits,
        },
        "errors": {
            "failed": out.failed(),
            "devices_closed": shared.closed.load(Ordering::Relaxed),
            "thread_errors": thread_errors,
        },
        "gateway": {
            "pid": pid,
            "shards": cli.gateway.is_none().then_some(cli.shards),
            "memory_hub": cli.memory,
            "rss_bytes": rss,
            "cpu_seconds": opt(cpu_s, 3),
            "cpu_system_seconds": opt(cpu_sys_s, 3),
            "cpu_seconds_by_thread": threads_before
                .as_ref()
                .zip(threads_after.as_ref())
                .map(|(a, b)| procfs::threads_cpu_delta(a, b, ctx.clk_tck)),
            "cpu_us_per_command": opt(cpu_s.map(|c| c * 1e6 / out.ok.max(1) as f64), 2),
            "cpu_utilisation": opt(cpu_s.map(|c| c / wall_s.max(1e-9)), 3),
            "bytes_per_device": Value::Null,
            "stderr_lines": health.as_ref().map(|h| h.stderr_lines),
        },
        "baseline": Value::Null,
        "goal": { "p99_us_max": COMMAND_P99_GOAL_US, "met": met },
        "warm_up": { "commands": warm, "ok": warm_out.ok, "failed": warm_out.failed() },
        "setup": tf.setup,
        "client_threads": clients,
        "device_threads": device_threads,
        "client_cpu_seconds": opt(client_cpu_s, 3),
        "devices_still_connected": still_open,
        "gateway_requests_answered": shared.requests.load(Ordering::Relaxed),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_is_checked() {
        let ok = br#"{"correlationId":"c","deviceId":"d","href":"/bench/0","status":"OK","content":{"v":12},"contentType":"application/vnd.ocf+cbor"}"#;
        assert!(is_echo(ok, 12));
        assert!(!is_echo(ok, 13));
        assert!(!is_echo(
            br#"{"status":"NOT_FOUND","content":{"v":12}}"#,
            12
        ));
        assert!(!is_echo(b"<html>", 12));
    }

    #[test]
    fn exactly_once_accounting() {
        // Commands 10..15: 10 fine; 11 delivered twice; 12 never delivered
        // but (wrongly) ok; 13 delivered, HTTP failed; 14 fine. 99 and 3
        // are outside the range.
        let ok = [10, 11, 12, 14];
        let seen = [10, 11, 11, 13, 14, 99, 3];
        let r = exactly_once(10..15, &ok, &seen);
        assert_eq!(
            r,
            ExactlyOnce {
                issued: 5,
                exactly_once: 2,
                never_reached_device: 1,
                device_duplicates: 1,
                ok_without_delivery: 1,
            }
        );
    }

    #[test]
    fn random_devices_cover_the_fleet() {
        let mut rng = Rng(42);
        let mut hit = [0u32; 10];
        for _ in 0..10_000 {
            hit[rng.below(10)] += 1;
        }
        assert!(hit.iter().all(|&h| (800..1200).contains(&h)), "{hit:?}");
    }
}
