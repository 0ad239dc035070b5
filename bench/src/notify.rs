//! `notify`: N twin devices (`twin.rs`) push notifications into the
//! gateway, which forwards them to its embedded hub (spec §6.7). Counted
//! at the hub through `/metrics` (`coapgw_hub_notifications_total`,
//! `coapgw_hub_twin_updates_total`); latency device → hub and loss /
//! duplicates by sequence number sampled on a few devices through the
//! hub's event stream (`GET /api/v1/events?deviceId=…`), whose
//! `resource_changed` events carry the hub's time (`at`) and the
//! payload `{"seq", "t"}` the device wrote.
//!
//! Also the set-up shared with `command` ([`twin_fleet`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::device::Device;
use crate::engine::{self, Engine};
use crate::http::{self, Http, SseStream};
use crate::live::{self, SendPlan, Shared};
use crate::load::{self, Percentiles};
use crate::seq::{SeqReport, SeqTracker};
use crate::sharded::ShardFleet;
use crate::{
    check_health, fleet, ocf, procfs, round, setup_report, sleep_unless, Cli, Context, Failure,
    Target,
};

/// Time-out of HTTP calls to the API.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the hub's counter is read while sending (the window's ack).
const METRICS_EVERY: Duration = Duration::from_millis(25);
/// How long the hub has to count what was sent, after a phase.
const DRAIN_LIMIT: Duration = Duration::from_secs(20);

/// Connected twin devices and what the scenarios need around them.
pub struct TwinFleet {
    pub target: Target,
    /// Taken by the scenario to drive it.
    pub devices: Option<engine::Fleet>,
    /// The gateway's HTTP API.
    pub api: SocketAddr,
    /// A bearer token of the devices' owner.
    pub bearer: String,
    /// The devices signed up to [`ocf::SAMPLE_OWNER`], and its token.
    pub sampled: Vec<String>,
    pub sample_bearer: String,
    pub setup: Value,
    /// The gateway's data directory: dropped after the gateway (fields
    /// drop in order).
    _pki: crate::gateway::Pki,
}

/// Spawns (or targets) the gateway, issues N identities, and connects,
/// signs up, signs in and publishes N twin devices of `resources`
/// resources each, until the gateway observes all of them (spec §6.6).
/// `sample` of them, spread evenly, belong to [`ocf::SAMPLE_OWNER`].
pub fn twin_fleet(
    cli: &Cli,
    ctx: &Context,
    open_files: u64,
    devices: u64,
    resources: usize,
    sample: usize,
) -> Result<TwinFleet, Failure> {
    if open_files != 0 && devices + 64 > open_files {
        return Err(Failure::Usage(format!(
            "{devices} devices need more open files than the limit of {open_files} (ulimit -n)"
        )));
    }
    let pki = crate::gateway::Pki::create()?;
    let (target, _client) = crate::target(cli, ctx, &pki)?;
    let config = target.config()?.clone();
    let authority = ocf::authority(&config)?;
    let token = |owner: &str| {
        authority
            .issue_user_token(owner, Duration::from_secs(3600), now_unix())
            .map(|t| t.token)
            .map_err(|e| format!("cannot issue an API token: {e}"))
    };
    let bearer = token(ocf::OWNER)?;
    let sample_bearer = token(ocf::SAMPLE_OWNER)?;
    let pid = target.pid;
    let gw_cpu = || pid.and_then(|p| procfs::process_cpu_ticks(p).ok());
    let started = Instant::now();
    let mut identities = ocf::identities(&target.ca_dir, devices as usize, ctx.threads)?;
    let identities_s = started.elapsed().as_secs_f64();
    let mut sampled = Vec::new();
    if let Some(step) = identities.len().checked_div(sample) {
        for identity in identities.iter_mut().step_by(step.max(1)).take(sample) {
            identity.owner = ocf::SAMPLE_OWNER;
            sampled.push(identity.id.clone());
        }
    }
    let what =
        "connect, CSM, sign-up, sign-in, publish, observations registered (spec §6.6); kept open";
    let fleet = match cli.engine {
        Engine::Threads => {
            let (enrolled, cpu) = crate::enroll_measured(
                ctx,
                &target,
                identities,
                &authority,
                Duration::from_millis(20),
                fleet::Keep::Twin(resources),
                &gw_cpu,
            );
            let setup = setup_report(&enrolled.load, devices, cpu, identities_s, what);
            let devices: Vec<Device> = enrolled
                .groups
                .into_iter()
                .flatten()
                .filter_map(|(_, d)| d)
                .collect();
            (engine::Fleet::Threads(devices), setup)
        }
        Engine::Shards => {
            let before = gw_cpu();
            let n = identities.len() as u32;
            let (fleet, load) = ShardFleet::start(
                target.addr,
                identities,
                &authority,
                resources,
                cli.threads.unwrap_or(1).max(1),
                Instant::now() + Duration::from_secs(60) + Duration::from_millis(20) * n,
                &ctx.interrupted,
            )?;
            let cpu = before
                .zip(gw_cpu())
                .map(|(a, b)| ctx.ticks_to_s(b.since(a).total()));
            let setup = setup_report(&load, devices, cpu, identities_s, what);
            (engine::Fleet::Shards(fleet), setup)
        }
    };
    let (devices, setup) = fleet;
    if devices.held() == 0 {
        return Err(Failure::Runtime("no twin device could be set up".into()));
    }
    Ok(TwinFleet {
        api: config.api.address,
        target,
        devices: Some(devices),
        bearer,
        sampled,
        sample_bearer,
        setup,
        _pki: pki,
    })
}

fn now_unix() -> u64 {
    live::unix_ns() / 1_000_000_000
}

/// The hub's counters of interest.
#[derive(Debug, Clone, Copy, Default)]
pub struct HubCounts {
    pub notifications: u64,
    pub twin_updates: u64,
    pub commands_submitted: u64,
    pub commands_answered: u64,
    pub store_commits: u64,
    /// Changes waiting for the broker (gauge; the NATS hub counts a
    /// notification when it queues it, and it is recorded once this is
    /// 0).
    pub queued: u64,
}

impl HubCounts {
    pub fn read(http: &mut Http) -> Result<HubCounts, String> {
        let text = http.get_text("/metrics")?;
        let get = |name: &str| http::metric(&text, name).map_or(0, |v| v as u64);
        Ok(HubCounts {
            notifications: get("coapgw_hub_notifications_total"),
            twin_updates: get("coapgw_hub_twin_updates_total"),
            commands_submitted: get("coapgw_hub_commands_submitted_total"),
            commands_answered: get("coapgw_hub_commands_answered_total"),
            store_commits: get("coapgw_hub_store_commits_total"),
            queued: get("coapgw_hub_nats_queue_depth"),
        })
    }

    pub fn since(&self, a: &HubCounts) -> HubCounts {
        HubCounts {
            notifications: self.notifications.saturating_sub(a.notifications),
            twin_updates: self.twin_updates.saturating_sub(a.twin_updates),
            commands_submitted: self.commands_submitted.saturating_sub(a.commands_submitted),
            commands_answered: self.commands_answered.saturating_sub(a.commands_answered),
            store_commits: self.store_commits.saturating_sub(a.store_commits),
            queued: self.queued,
        }
    }
}

/// Reads the hub's notification count every [`METRICS_EVERY`] into
/// `shared.acked` (relative to `base`).
struct Monitor {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl Monitor {
    fn start(api: SocketAddr, shared: Arc<Shared>, base: u64, deadline: Instant) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut http = Http::new(api, None, HTTP_TIMEOUT);
            let mut failures = 0;
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                match HubCounts::read(&mut http) {
                    Ok(c) => {
                        shared.hub_queued.store(c.queued, Ordering::Relaxed);
                        shared
                            .acked
                            .store(c.notifications.saturating_sub(base), Ordering::Relaxed)
                    }
                    Err(_) => failures += 1,
                }
                std::thread::sleep(METRICS_EVERY);
            }
            failures
        });
        Monitor { stop, handle }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(u64::MAX)
    }
}

/// What the event-stream sampler saw.
#[derive(Default)]
pub struct Sampled {
    pub trackers: HashMap<String, SeqTracker>,
    /// `at - t` of events sent within the measured window, µs.
    pub latency: Option<Histogram<u64>>,
    pub events: u64,
    pub unreadable: u64,
    pub ended: Option<String>,
}

/// Follows `GET /api/v1/events?deviceId=…` for the sampled devices.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Sampled>,
}

/// The measured window, Unix ns (0 = not yet).
#[derive(Default)]
struct Window {
    from: AtomicU64,
    until: AtomicU64,
}

impl Sampler {
    fn start(
        api: SocketAddr,
        bearer: &str,
        ids: &[String],
        window: Arc<Window>,
        deadline: Instant,
    ) -> Result<Sampler, String> {
        let query: Vec<String> = ids.iter().map(|id| format!("deviceId={id}")).collect();
        let path = format!("/api/v1/events?{}", query.join("&"));
        let mut stream =
            SseStream::open(api, &path, bearer, HTTP_TIMEOUT, Duration::from_millis(100))
                .map_err(|e| format!("cannot follow {path}: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut out = Sampled {
                latency: Some(load::histogram()),
                ..Sampled::default()
            };
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                let mut on_event = |e: http::SseEvent| {
                    out.events += 1;
                    if e.event != "resource_changed" {
                        return;
                    }
                    match changed_sample(&e.data) {
                        Some((device, seq, t, at)) => {
                            out.trackers.entry(device).or_default().record(seq);
                            let from = window.from.load(Ordering::Relaxed);
                            let until = window.until.load(Ordering::Relaxed);
                            if from != 0 && t >= from && (until == 0 || t <= until) {
                                if let Some(h) = out.latency.as_mut() {
                                    let us = at.saturating_sub(t) / 1000;
                                    h.saturating_record(us.max(1));
                                }
                            }
                        }
                        None => out.unreadable += 1,
                    }
                };
                match stream.poll(&mut on_event) {
                    Ok(true) => {}
                    Ok(false) => {
                        out.ended = Some("the hub ended the event stream".into());
                        break;
                    }
                    Err(e) => {
                        out.ended = Some(format!("event stream: {e}"));
                        break;
                    }
                }
            }
            out
        });
        Ok(Sampler { stop, handle })
    }

    fn stop(self) -> Sampled {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_else(|_| Sampled {
            ended: Some("the sampler panicked".into()),
            ..Sampled::default()
        })
    }
}

/// (device, seq, t, at) of a `resource_changed` event's data whose
/// content is a notification `{"seq", "t"}`; `None` for anything else
/// (the registration's `seq` 0 included).
pub fn changed_sample(data: &str) -> Option<(String, u64, u64, u64)> {
    let v: Value = serde_json::from_str(data).ok()?;
    let device = v.get("deviceId")?.as_str()?.to_owned();
    let at = v.get("at")?.as_u64()?;
    let content = v.get("content")?;
    let seq = content.get("seq")?.as_u64()?;
    let t = content.get("t")?.as_u64()?;
    (seq > 0).then_some((device, seq, t, at))
}

/// Waits until the hub counted everything sent and handed it on (the
/// NATS hub's queue to the broker empty), bounded.
fn drain(shared: &Shared, limit: Duration, interrupted: &AtomicBool) -> bool {
    let done = || {
        shared.acked.load(Ordering::Relaxed) >= shared.sent.load(Ordering::Relaxed)
            && shared.hub_queued.load(Ordering::Relaxed) == 0
    };
    let until = Instant::now() + limit;
    while Instant::now() < until && !interrupted.load(Ordering::Relaxed) {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    done()
}

pub fn scenario(cli: &Cli, ctx: &Context, open_files: u64) -> Result<Value, Failure> {
    let n = cli.devices.unwrap_or(1000).max(1);
    let resources = cli.resources.unwrap_or(1).max(1);
    let duration = cli.duration.unwrap_or(Duration::from_secs(10));
    let plan = SendPlan {
        rate: cli.rate.filter(|r| *r > 0.0),
        per_write: cli.per_write.unwrap_or(8).max(1),
        window: cli.window.unwrap_or(50_000).max(1),
    };
    let client_threads = cli.threads.unwrap_or(1).max(1);
    let sample_n = cli.sample.unwrap_or(20).min(n as usize);
    let mut tf = twin_fleet(cli, ctx, open_files, n, resources, sample_n)?;
    let pid = tf.target.pid;
    let gw_cpu = || pid.and_then(|p| procfs::process_cpu_ticks(p).ok());
    let devices = tf
        .devices
        .take()
        .ok_or_else(|| Failure::Runtime("no twin fleet".into()))?;
    let held = devices.held();
    // The sampled devices that are connected are followed on the event
    // stream.
    let sample_ids: Vec<String> = devices
        .device_ids()
        .into_iter()
        .filter(|id| tf.sampled.contains(id))
        .collect();

    let run_deadline = Instant::now() + duration * 3 + Duration::from_secs(120);
    let mut http = Http::new(tf.api, None, HTTP_TIMEOUT);
    let base = HubCounts::read(&mut http)?;
    let window = Arc::new(Window::default());
    let sampler = Sampler::start(
        tf.api,
        &tf.sample_bearer,
        &sample_ids,
        window.clone(),
        run_deadline,
    )?;
    let drivers = devices.drive(client_threads, plan, run_deadline, &ctx.interrupted);
    let shared = drivers.shared();
    let monitor = Monitor::start(tf.api, shared.clone(), base.notifications, run_deadline);

    // Warm-up: a second of sending, not measured; then the hub catches up.
    let warm = duration
        .mul_f64(0.2)
        .clamp(Duration::from_millis(500), Duration::from_secs(2));
    drivers.start_sending(live::unix_ns());
    sleep_unless(warm, &ctx.interrupted);
    drivers.stop_sending();
    let warm_drained = drain(&shared, DRAIN_LIMIT, &ctx.interrupted);
    let warm_sent = shared.sent.load(Ordering::Relaxed);
    println!(
        "warm-up: {warm_sent} notifications in {:.1} s, hub caught up: {warm_drained}",
        warm.as_secs_f64()
    );

    // Measured phase: from the first send until the hub counted the last.
    let before = HubCounts::read(&mut http)?;
    let sent_before = shared.sent.load(Ordering::Relaxed);
    let cpu_before = gw_cpu();
    let threads_before = pid.and_then(|p| procfs::threads_cpu_ticks(p).ok());
    let self_before = procfs::self_cpu_ticks().ok();
    let started = Instant::now();
    let start_ns = live::unix_ns();
    window.from.store(start_ns, Ordering::Relaxed);
    drivers.start_sending(start_ns);
    sleep_unless(duration, &ctx.interrupted);
    drivers.stop_sending();
    window.until.store(live::unix_ns(), Ordering::Relaxed);
    let sending_s = started.elapsed().as_secs_f64();
    let drained = drain(&shared, DRAIN_LIMIT, &ctx.interrupted);
    let wall_s = started.elapsed().as_secs_f64();
    let cpu_after = gw_cpu();
    let threads_after = pid.and_then(|p| procfs::threads_cpu_ticks(p).ok());
    let self_after = procfs::self_cpu_ticks().ok();
    let after = HubCounts::read(&mut http)?;
    let sent = shared.sent.load(Ordering::Relaxed) - sent_before;
    let rss = pid.and_then(|p| procfs::vm_rss_bytes(p).ok());

    // Let the event stream deliver the last events, then stop everything.
    sleep_unless(Duration::from_millis(500), &ctx.interrupted);
    let monitor_failures = monitor.stop();
    let (devices, thread_errors) = drivers.stop();
    let sampled = sampler.stop();
    let still_open = devices.len();
    let sent_by: HashMap<String, u64> = devices
        .iter()
        .map(|s| (s.device_id.clone(), s.sent))
        .collect();
    let health = tf.target.spawned.as_mut().map(|g| g.health());

    let d = after.since(&before);
    let cpu = cpu_before.zip(cpu_after).map(|(a, b)| b.since(a));
    let cpu_s = cpu.map(|t| ctx.ticks_to_s(t.total()));
    let cpu_sys_s = cpu.map(|t| ctx.ticks_to_s(t.system));
    let client_cpu_s = self_before
        .zip(self_after)
        .map(|(a, b)| ctx.ticks_to_s(b.since(a).total()));
    let per_cpu_s = cpu_s
        .filter(|&s| s > 0.0)
        .map(|s| d.notifications as f64 / s);
    let throughput = d.notifications as f64 / wall_s.max(1e-9);
    let mut seq_total = SeqReport::default();
    let mut per_device = Vec::new();
    for id in &sample_ids {
        let sent = sent_by.get(id).copied();
        let r = sampled
            .trackers
            .get(id)
            .map(|t| t.report(sent.unwrap_or(0)))
            .unwrap_or_else(|| SeqTracker::default().report(sent.unwrap_or(0)));
        if sent.is_some() {
            seq_total.add(&r);
        }
        per_device.push(json!({ "device": id, "still_connected": sent.is_some(), "seq": r }));
    }
    let latency = sampled
        .latency
        .as_ref()
        .map(Percentiles::of)
        .unwrap_or_else(|| Percentiles::of(&load::histogram()));

    println!(
        "notify: {held} devices × {resources} resource(s), {} for {sending_s:.2} s ({}), {client_threads} client {} thread(s)",
        plan.rate
            .map_or("as fast as possible".to_owned(), |r| format!("{r:.0}/s offered")),
        format_args!("≤ {} per write, window {}", plan.per_write, plan.window),
        cli.engine.name()
    );
    println!(
        "  sent {sent}; hub counted {} notifications, {} twin updates in {wall_s:.2} s ({throughput:.0}/s); drained: {drained}",
        d.notifications, d.twin_updates
    );
    match (cpu_s, per_cpu_s) {
        (Some(c), Some(r)) => println!(
            "  gateway CPU {c:.2} s ({:.2} s kernel, {:.0} % of a core) -> {r:.0} notifications per gateway CPU-second ({:.2} µs each); goal >= 100000: {}",
            cpu_sys_s.unwrap_or(0.0),
            100.0 * c / wall_s.max(1e-9),
            1e6 / r,
            if r >= NOTIFY_GOAL { "met" } else { "MISSED" }
        ),
        _ => println!("  gateway CPU not measured"),
    }
    println!(
        "  client CPU {:.2} s; device→hub latency (sampled, {} events of {} devices) µs p50 {} p90 {} p99 {} p99.9 {} max {}",
        client_cpu_s.unwrap_or(0.0),
        latency.count,
        sample_ids.len(),
        latency.p50,
        latency.p90,
        latency.p99,
        latency.p999,
        latency.max
    );
    println!(
        "  sampled sequences: sent {} received {} lost {} duplicated {} out of order {} unexpected {}",
        seq_total.sent,
        seq_total.received,
        seq_total.lost,
        seq_total.duplicated,
        seq_total.out_of_order,
        seq_total.unexpected
    );
    println!(
        "  devices still connected {still_open}/{held}, closed by the gateway {}, pings answered {}, gateway requests answered {}",
        shared.closed.load(Ordering::Relaxed),
        shared.pings.load(Ordering::Relaxed),
        shared.requests.load(Ordering::Relaxed)
    );
    if let Some(why) = &sampled.ended {
        println!("  event stream: {why}");
    }
    for e in &thread_errors {
        println!("  error: {e}");
    }
    procfs::print_threads_cpu(threads_before.as_ref(), threads_after.as_ref(), ctx.clk_tck);
    check_health(health.as_ref())?;
    if d.notifications == 0 {
        return Err(Failure::Runtime("the hub counted no notification".into()));
    }
    let opt = |x: Option<f64>, p: i32| x.map(|v| round(v, p));
    Ok(json!({
        "scenario": "notify",
        "engine": cli.engine.name(),
        "devices": held,
        "resources_per_device": resources,
        "duration_s": round(wall_s, 3),
        "sending_s": round(sending_s, 3),
        "throughput_per_s": round(throughput, 1),
        "notifications_per_cpu_s": opt(per_cpu_s, 1),
        "latency_us": latency,
        "latency_what": "device send time (payload t) to the hub's record time (event at), sampled devices, measured phase",
        "plan": {
            "rate_per_s": plan.rate,
            "max_per_write": plan.per_write,
            "window": plan.window,
            "warm_up_s": round(warm.as_secs_f64(), 3),
            "warm_up_sent": warm_sent,
        },
        "sent": sent,
        // Over all devices by count (the hub's counter against what was
        // sent), and over the sampled devices by sequence number while
        // their event stream lasted: a stream the hub ended (a subscriber
        // that fell behind is dropped) stops the sequence check, it is not
        // a loss by the hub (`sampled.stream_ended` says so).
        "lost": sent.saturating_sub(d.notifications).max(
            if sampled.ended.is_none() { seq_total.lost } else { 0 }),
        "duplicated": d.notifications.saturating_sub(sent).max(seq_total.duplicated),
        "hub": {
            "notifications": d.notifications,
            "twin_updates": d.twin_updates,
            "store_commits": d.store_commits,
            "lost_or_uncounted": sent.saturating_sub(d.notifications),
            "counted_beyond_sent": d.notifications.saturating_sub(sent),
            "drained": drained,
        },
        "sampled": {
            "devices": sample_ids.len(),
            "events": sampled.events,
            "unreadable_events": sampled.unreadable,
            "stream_ended": sampled.ended,
            "sequences": seq_total,
            "per_device": per_device,
        },
        "errors": {
            "devices_closed": shared.closed.load(Ordering::Relaxed),
            "write_errors": shared.write_errors.load(Ordering::Relaxed),
            "thread_errors": thread_errors,
            "metrics_read_failures": monitor_failures,
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
            "cpu_utilisation": opt(cpu_s.map(|c| c / wall_s.max(1e-9)), 3),
            "notifications_per_cpu_s": opt(per_cpu_s, 1),
            "cpu_us_per_notification": opt(per_cpu_s.map(|r| 1e6 / r), 3),
            "bytes_per_device": Value::Null,
            "stderr_lines": health.as_ref().map(|h| h.stderr_lines),
        },
        "baseline": Value::Null,
        "goal": {
            "notifications_per_cpu_s_min": NOTIFY_GOAL,
            "met": per_cpu_s.map(|r| r >= NOTIFY_GOAL),
        },
        "setup": tf.setup,
        "client_threads": client_threads,
        "client_cpu_seconds": opt(client_cpu_s, 3),
        "devices_still_connected": still_open,
        "pings_answered": shared.pings.load(Ordering::Relaxed),
        "gateway_requests_answered": shared.requests.load(Ordering::Relaxed),
    }))
}

/// Goal of `notify` (issue 4): notifications per gateway CPU-second.
pub const NOTIFY_GOAL: f64 = 100_000.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_changed_data_is_read() {
        let data = r#"{"deviceId":"d1","at":1800000000000002000,"href":"/bench/0","status":"OK","content":{"seq":7,"t":1800000000000000000},"contentType":"application/vnd.ocf+cbor","version":7}"#;
        assert_eq!(
            changed_sample(data),
            Some((
                "d1".into(),
                7,
                1_800_000_000_000_000_000,
                1_800_000_000_000_002_000
            ))
        );
        // The registration's value (seq 0), a command's value, junk.
        assert_eq!(
            changed_sample(r#"{"deviceId":"d1","at":1,"content":{"seq":0,"t":0}}"#),
            None
        );
        assert_eq!(
            changed_sample(r#"{"deviceId":"d1","at":1,"content":{"v":3}}"#),
            None
        );
        assert_eq!(changed_sample("not json"), None);
    }
}
