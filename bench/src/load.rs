//! Closed-loop handshake load: `threads` client threads each open a
//! connection, handshake, wait for the server's CSM and close, again and
//! again, until `count` handshakes were attempted, the deadline passed, too
//! many failed, or the user interrupted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::ClientConfig;
use serde::Serialize;

use crate::device::{Device, DeviceError, Stage, Timings};

/// Socket timeout of every blocking client call.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Error messages kept for the report.
const ERROR_SAMPLES: usize = 10;

/// Microsecond latency histogram, 1 µs to 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(d.as_micros().clamp(1, u128::from(u64::MAX)) as u64);
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// Latency of each stage of a connection.
#[derive(Clone)]
pub struct StageHistograms {
    pub total: Histogram<u64>,
    pub tcp_connect: Histogram<u64>,
    pub tls: Histogram<u64>,
    pub first_csm: Histogram<u64>,
}

impl StageHistograms {
    pub fn new() -> Self {
        StageHistograms {
            total: histogram(),
            tcp_connect: histogram(),
            tls: histogram(),
            first_csm: histogram(),
        }
    }

    pub fn record(&mut self, t: &Timings) {
        record(&mut self.total, t.total());
        record(&mut self.tcp_connect, t.tcp_connect);
        record(&mut self.tls, t.tls);
        record(&mut self.first_csm, t.first_csm);
    }

    pub fn add(&mut self, other: &StageHistograms) {
        // Same bounds everywhere: adding cannot fail.
        let _ = self.total.add(&other.total);
        let _ = self.tcp_connect.add(&other.tcp_connect);
        let _ = self.tls.add(&other.tls);
        let _ = self.first_csm.add(&other.first_csm);
    }

    pub fn stages(&self) -> StagePercentiles {
        StagePercentiles {
            tcp_connect: Percentiles::of(&self.tcp_connect),
            tls: Percentiles::of(&self.tls),
            first_csm: Percentiles::of(&self.first_csm),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StagePercentiles {
    pub tcp_connect: Percentiles,
    pub tls: Percentiles,
    pub first_csm: Percentiles,
}

/// Failed connections by stage, with a few messages.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Errors {
    pub total: u64,
    pub tcp_connect: u64,
    pub tls: u64,
    pub first_csm: u64,
    pub request: u64,
    pub samples: Vec<String>,
}

impl Errors {
    pub fn record(&mut self, e: &DeviceError) {
        self.total += 1;
        match e.stage {
            Stage::Connect => self.tcp_connect += 1,
            Stage::Tls => self.tls += 1,
            Stage::Csm => self.first_csm += 1,
            Stage::Request => self.request += 1,
        }
        if self.samples.len() < ERROR_SAMPLES {
            self.samples.push(e.to_string());
        }
    }

    pub fn add(&mut self, other: &Errors) {
        self.total += other.total;
        self.tcp_connect += other.tcp_connect;
        self.tls += other.tls;
        self.first_csm += other.first_csm;
        self.request += other.request;
        for s in &other.samples {
            if self.samples.len() < ERROR_SAMPLES {
                self.samples.push(s.clone());
            }
        }
    }
}

pub struct LoadResult {
    pub ok: u64,
    pub errors: Errors,
    pub wall: Duration,
    pub latency: StageHistograms,
    /// Why the run ended early, if it did.
    pub cut_short: Option<String>,
}

impl LoadResult {
    pub fn empty() -> LoadResult {
        LoadResult {
            ok: 0,
            errors: Errors::default(),
            wall: Duration::ZERO,
            latency: StageHistograms::new(),
            cut_short: None,
        }
    }

    /// Sums two runs (wall times add up: the runs were sequential).
    pub fn add(&mut self, other: &LoadResult) {
        self.ok += other.ok;
        self.errors.add(&other.errors);
        self.wall += other.wall;
        self.latency.add(&other.latency);
        if self.cut_short.is_none() {
            self.cut_short.clone_from(&other.cut_short);
        }
    }

    pub fn per_wall_second(&self) -> f64 {
        self.ok as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Runs `count` handshakes against `addr` from `threads` threads.
pub fn run(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    count: u64,
    threads: usize,
    deadline: Instant,
    interrupted: &Arc<AtomicBool>,
) -> LoadResult {
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    // Stop once a tenth of the attempts (at least 50) failed: the target is
    // broken and hammering it further measures nothing.
    let max_failures = (count / 10).max(50);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (next, failed, config, interrupted) = (
                next.clone(),
                failed.clone(),
                config.clone(),
                interrupted.clone(),
            );
            std::thread::spawn(move || {
                let mut latency = StageHistograms::new();
                let mut errors = Errors::default();
                let mut ok = 0u64;
                loop {
                    if Instant::now() >= deadline
                        || interrupted.load(Ordering::Relaxed)
                        || failed.load(Ordering::Relaxed) >= max_failures
                        || next.fetch_add(1, Ordering::Relaxed) >= count
                    {
                        break;
                    }
                    match Device::connect(addr, &config, IO_TIMEOUT) {
                        Ok((device, timings)) => {
                            latency.record(&timings);
                            ok += 1;
                            device.close();
                        }
                        Err(e) => {
                            errors.record(&e);
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                (ok, errors, latency)
            })
        })
        .collect();
    let mut result = LoadResult::empty();
    for h in handles {
        match h.join() {
            Ok((ok, errors, latency)) => {
                result.ok += ok;
                result.errors.add(&errors);
                result.latency.add(&latency);
            }
            Err(_) => result.cut_short = Some("a client thread panicked".into()),
        }
    }
    result.wall = started.elapsed();
    if result.ok + result.errors.total < count && result.cut_short.is_none() {
        result.cut_short = Some(if interrupted.load(Ordering::Relaxed) {
            "interrupted".into()
        } else if result.errors.total >= max_failures {
            format!("stopped after {} failures", result.errors.total)
        } else {
            "deadline reached".into()
        });
    }
    result
}
