//! Many authenticated devices holding their connections open: each client
//! thread connects its share (handshake, CSM, then our CSM and one `GET
//! /x.plgd.dev/time` answered 2.05), keeps the connections in a `Vec` in
//! non-blocking mode and sweeps them now and then to answer the gateway's
//! keepalive Pings, until told to stop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;

use crate::device::Device;
use crate::load::{Errors, StageHistograms, IO_TIMEOUT};

/// How often a thread sweeps its held connections.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// State shared between the client threads and the main thread.
pub struct Shared {
    /// Devices connected (CSM and 2.05 received) so far.
    pub connected: AtomicU64,
    /// Threads that finished their connect phase.
    pub done_connecting: AtomicUsize,
    /// Set by the main thread: close everything and report.
    pub stop: AtomicBool,
    failed: AtomicU64,
}

/// What one thread (or, summed, all of them) saw.
#[derive(Default)]
pub struct ThreadReport {
    pub connected: u64,
    /// Still open at the final sweep.
    pub held_at_end: u64,
    /// Closed by the gateway while held.
    pub closed_by_gateway: u64,
    pub pings_answered: u64,
    /// Messages other than Pings that arrived while held.
    pub unexpected_messages: u64,
    pub errors: Errors,
    pub latency: Option<StageHistograms>,
}

impl ThreadReport {
    pub fn add(&mut self, other: ThreadReport) {
        self.connected += other.connected;
        self.held_at_end += other.held_at_end;
        self.closed_by_gateway += other.closed_by_gateway;
        self.pings_answered += other.pings_answered;
        self.unexpected_messages += other.unexpected_messages;
        self.errors.add(&other.errors);
        match (&mut self.latency, other.latency) {
            (Some(mine), Some(theirs)) => mine.add(&theirs),
            (mine @ None, theirs) => *mine = theirs,
            _ => {}
        }
    }
}

pub struct IdleClients {
    pub shared: Arc<Shared>,
    handles: Vec<std::thread::JoinHandle<ThreadReport>>,
}

impl IdleClients {
    /// Starts `threads` threads connecting `devices` devices in total. The
    /// connect phase ends at `connect_deadline`; a thread closes everything
    /// at `hard_deadline` even if never told to stop.
    pub fn start(
        addr: SocketAddr,
        config: &Arc<ClientConfig>,
        devices: u64,
        threads: usize,
        connect_deadline: Instant,
        hard_deadline: Instant,
        interrupted: &Arc<AtomicBool>,
    ) -> IdleClients {
        let shared = Arc::new(Shared {
            connected: AtomicU64::new(0),
            done_connecting: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            failed: AtomicU64::new(0),
        });
        let threads = threads.max(1);
        let max_failures = (devices / 10).max(50);
        let handles = (0..threads)
            .map(|i| {
                let share =
                    devices / threads as u64 + u64::from((i as u64) < devices % threads as u64);
                let (shared, config, interrupted) =
                    (shared.clone(), config.clone(), interrupted.clone());
                std::thread::spawn(move || {
                    let stopped = || {
                        shared.stop.load(Ordering::Relaxed)
                            || interrupted.load(Ordering::Relaxed)
                            || Instant::now() >= hard_deadline
                    };
                    let mut report = ThreadReport {
                        latency: Some(StageHistograms::new()),
                        ..ThreadReport::default()
                    };
                    let mut held: Vec<Device> = Vec::with_capacity(share as usize);
                    let mut last_sweep = Instant::now();
                    for _ in 0..share {
                        if stopped()
                            || Instant::now() >= connect_deadline
                            || shared.failed.load(Ordering::Relaxed) >= max_failures
                        {
                            break;
                        }
                        let attempt = Device::connect(addr, &config, IO_TIMEOUT).and_then(
                            |(mut device, timings)| {
                                device.csm_and_get_time()?;
                                Ok((device, timings))
                            },
                        );
                        match attempt {
                            Ok((device, timings)) => {
                                if let Some(l) = report.latency.as_mut() {
                                    l.record(&timings);
                                }
                                if device.set_nonblocking().is_ok() {
                                    held.push(device);
                                    report.connected += 1;
                                    shared.connected.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(e) => {
                                report.errors.record(&e);
                                shared.failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if last_sweep.elapsed() >= SWEEP_EVERY {
                            sweep(&mut held, &mut report);
                            last_sweep = Instant::now();
                        }
                    }
                    shared.done_connecting.fetch_add(1, Ordering::SeqCst);
                    while !stopped() {
                        std::thread::sleep(Duration::from_millis(50));
                        if last_sweep.elapsed() >= SWEEP_EVERY {
                            sweep(&mut held, &mut report);
                            last_sweep = Instant::now();
                        }
                    }
                    sweep(&mut held, &mut report);
                    report.held_at_end = held.len() as u64;
                    for device in held {
                        device.close();
                    }
                    report
                })
            })
            .collect();
        IdleClients { shared, handles }
    }

    pub fn all_connected(&self) -> bool {
        self.shared.done_connecting.load(Ordering::SeqCst) == self.handles.len()
    }

    /// Tells the threads to close their connections; returns their reports.
    pub fn stop(self) -> ThreadReport {
        self.shared.stop.store(true, Ordering::SeqCst);
        let mut total = ThreadReport::default();
        for h in self.handles {
            if let Ok(r) = h.join() {
                total.add(r);
            }
        }
        total
    }
}

fn sweep(held: &mut Vec<Device>, report: &mut ThreadReport) {
    held.retain_mut(|device| {
        let seen = device.service();
        report.pings_answered += seen.pings_answered;
        report.unexpected_messages += seen.other_messages;
        if seen.closed {
            report.closed_by_gateway += 1;
        }
        !seen.closed
    });
}

/// The gateway's memory, CPU and the kernel's TCP memory at one moment of
/// an `idle` run.
pub struct Snapshot {
    pub rss: Option<u64>,
    pub anon: Option<u64>,
    pub cpu: Option<crate::procfs::CpuTicks>,
    pub sockstat: Option<String>,
}

impl Snapshot {
    pub fn take(pid: Option<u32>) -> Snapshot {
        use crate::procfs;
        Snapshot {
            rss: pid.and_then(|p| procfs::vm_rss_bytes(p).ok()),
            anon: pid.and_then(|p| procfs::rss_anon_bytes(p).ok()),
            cpu: pid.and_then(|p| procfs::process_cpu_ticks(p).ok()),
            sockstat: procfs::tcp_sockstat(),
        }
    }
}

/// Warm-up of `idle`: 16 devices connect and leave, so one-time
/// allocations (session cache, shard buffers) are not counted per device.
pub fn warm_up(
    addr: SocketAddr,
    client: &Arc<ClientConfig>,
    interrupted: &Arc<AtomicBool>,
) -> Result<(), crate::Failure> {
    let warmup = IdleClients::start(
        addr,
        client,
        16,
        1,
        Instant::now() + Duration::from_secs(30),
        Instant::now() + Duration::from_secs(60),
        interrupted,
    );
    while !warmup.all_connected() && !interrupted.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let warm = warmup.stop();
    if warm.connected == 0 {
        return Err(crate::Failure::Runtime(format!(
            "no warm-up device could connect: {:?}",
            warm.errors.samples
        )));
    }
    crate::sleep_unless(Duration::from_secs(1), interrupted);
    Ok(())
}

/// What an `idle` run measured, from one process or several (`spread.rs`):
/// printed and reported the same way.
pub struct Measured {
    pub devices: u64,
    pub connected: u64,
    pub connect_phase: Duration,
    pub held_for: Duration,
    pub total: ThreadReport,
    pub pid: Option<u32>,
    pub rss_startup: Option<u64>,
    pub before: Snapshot,
    pub after: Snapshot,
    /// VmRSS 2 s after every device left (informational: the allocator
    /// need not give freed memory back).
    pub rss_after_close: Option<u64>,
    pub health: Option<crate::gateway::Health>,
}

impl Measured {
    /// (after − before) / devices still open at the end.
    fn per_device(&self, before: Option<u64>, after: Option<u64>) -> Option<f64> {
        match (before, after) {
            (Some(b), Some(a)) if self.total.held_at_end > 0 => Some(crate::round(
                (a as f64 - b as f64) / self.total.held_at_end as f64,
                1,
            )),
            _ => None,
        }
    }

    pub fn bytes_per_device(&self) -> Option<f64> {
        self.per_device(self.before.rss, self.after.rss)
    }

    fn latency(&self) -> StageHistograms {
        self.total
            .latency
            .clone()
            .unwrap_or_else(StageHistograms::new)
    }

    /// The summary lines after each scenario's own first line.
    fn print(&self) {
        let p = crate::load::Percentiles::of(&self.latency().total);
        println!(
            "  connect+CSM+GET latency µs p50 {} p99 {} max {}; {} errors",
            p.p50, p.p99, p.max, self.total.errors.total
        );
        let mib = |b: Option<u64>| {
            b.map_or("?".to_owned(), |b| {
                format!("{:.1} MiB", b as f64 / 1048576.0)
            })
        };
        println!(
            "  gateway VmRSS: start-up {}, before {}, with devices {}, after they left {}",
            mib(self.rss_startup),
            mib(self.before.rss),
            mib(self.after.rss),
            mib(self.rss_after_close)
        );
        let t = &self.total;
        println!(
            "  still open at the end {}, closed by the gateway {}, pings answered {}, unexpected messages {}",
            t.held_at_end, t.closed_by_gateway, t.pings_answered, t.unexpected_messages
        );
        let goal = crate::IDLE_BYTES_GOAL;
        match self.bytes_per_device() {
            Some(b) => println!(
                "  bytes per device {b:.0} (RssAnon {}; from start-up {}); goal <= {goal:.0}: {}",
                self.per_device(self.before.anon, self.after.anon)
                    .map_or("?".into(), |a| format!("{a:.0}")),
                self.per_device(self.rss_startup, self.after.rss)
                    .map_or("?".into(), |a| format!("{a:.0}")),
                if b <= goal { "met" } else { "MISSED" }
            ),
            None => println!("  bytes per device: not measured"),
        }
        for e in &t.errors.samples {
            println!("  error: {e}");
        }
    }

    /// The JSON report (SURFACE.md fields and the idle details).
    /// Prints the figures; fails when the gateway died or no device
    /// connected, else the report.
    pub fn finish(
        &self,
        spawned_shards: Option<usize>,
        ctx: &crate::Context,
    ) -> Result<serde_json::Value, crate::Failure> {
        self.print();
        crate::check_health(self.health.as_ref())?;
        if self.connected == 0 {
            return Err(crate::Failure::Runtime("no device could connect".into()));
        }
        Ok(self.report(spawned_shards, ctx))
    }

    fn report(&self, spawned_shards: Option<usize>, ctx: &crate::Context) -> serde_json::Value {
        use crate::round;
        let latency = self.latency();
        let bytes_per_device = self.bytes_per_device();
        let cpu_seconds = self
            .before
            .cpu
            .zip(self.after.cpu)
            .map(|(a, b)| round(ctx.ticks_to_s(b.since(a).total()), 3));
        let t = &self.total;
        serde_json::json!({
            "scenario": "idle",
            "devices": self.devices,
            "duration_s": round(self.held_for.as_secs_f64(), 3),
            "throughput_per_s": round(
                self.connected as f64 / self.connect_phase.as_secs_f64().max(1e-9),
                1
            ),
            "latency_us": crate::load::Percentiles::of(&latency.total),
            "stages_us": latency.stages(),
            "errors": t.errors,
            "gateway": {
                "pid": self.pid,
                "shards": spawned_shards,
                "rss_bytes": self.after.rss,
                "rss_before_bytes": self.before.rss,
                "rss_startup_bytes": self.rss_startup,
                "rss_anon_before_bytes": self.before.anon,
                "rss_anon_bytes": self.after.anon,
                "rss_after_close_bytes": self.rss_after_close,
                "cpu_seconds": cpu_seconds,
                "bytes_per_device": bytes_per_device,
                "bytes_per_device_from_startup": self.per_device(self.rss_startup, self.after.rss),
                "anon_bytes_per_device": self.per_device(self.before.anon, self.after.anon),
                "stderr_lines": self.health.as_ref().map(|h| h.stderr_lines),
            },
            "baseline": serde_json::Value::Null,
            "idle": {
                "connected": self.connected,
                "held_at_end": t.held_at_end,
                "closed_by_gateway": t.closed_by_gateway,
                "pings_answered": t.pings_answered,
                "unexpected_messages": t.unexpected_messages,
                "connect_phase_s": round(self.connect_phase.as_secs_f64(), 3),
                "tcp_sockstat_before": self.before.sockstat,
                "tcp_sockstat_after": self.after.sockstat,
            },
            "goal": {
                "bytes_per_device_max": crate::IDLE_BYTES_GOAL,
                "met": bytes_per_device.map(|b| b <= crate::IDLE_BYTES_GOAL),
            },
            "client_threads": ctx.threads,
        })
    }
}
