//! Closed-loop connection load: `threads` client threads each open a
//! connection, handshake, wait for the server's CSM, (with [`Plan::SignIn`])
//! send our CSM and a sign-in and wait for its 2.04, and close, again and
//! again, until `count` connections were attempted, the deadline passed,
//! too many failed, or the user interrupted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::ClientConfig;
use serde::Serialize;

use crate::device::{Device, DeviceError, Stage, Timings};
use crate::fleet::Registered;

/// What each connection does.
#[derive(Clone)]
pub enum Plan {
    /// Handshake and the server's CSM, every connection with one client
    /// configuration.
    Handshake(Arc<ClientConfig>),
    /// Handshake, the server's CSM, then our CSM with a sign-in (spec §5.4)
    /// and its 2.04, cycling through devices that signed up before. Thread
    /// `t` of `n` uses the devices whose index is `t` modulo `n`, so a
    /// device never has two connections at once.
    SignIn(Arc<Vec<Registered>>),
}

impl Plan {
    /// Client threads for `wanted`: no more than there are devices.
    fn threads(&self, wanted: usize) -> usize {
        match self {
            Plan::Handshake(_) => wanted.max(1),
            Plan::SignIn(fleet) => wanted.clamp(1, fleet.len().max(1)),
        }
    }

    /// One connection attempt of client thread `thread` of `threads`, its
    /// `attempt`-th.
    fn connect(
        &self,
        addr: SocketAddr,
        thread: usize,
        threads: usize,
        attempt: u64,
    ) -> Result<Timings, DeviceError> {
        match self {
            Plan::Handshake(config) => {
                let (device, timings) = Device::connect(addr, config, IO_TIMEOUT)?;
                device.close();
                Ok(timings)
            }
            Plan::SignIn(fleet) => {
                let mine = fleet.len().saturating_sub(thread).div_ceil(threads).max(1) as u64;
                let index = thread + (attempt % mine) as usize * threads;
                let Some(d) = fleet.get(index) else {
                    return Err(DeviceError::new(
                        Stage::Connect,
                        "no device for this thread",
                    ));
                };
                let (mut device, mut timings) = Device::connect(addr, &d.config, IO_TIMEOUT)?;
                timings.sign_in = Some(device.sign_in(&d.sign_in_body, true)?);
                device.close();
                Ok(timings)
            }
        }
    }
}

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
    /// `[percentile, µs]` points for the plot (`report::curve`).
    pub curve: Vec<[f64; 2]>,
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
            curve: crate::report::curve(h),
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
    pub sign_up: Histogram<u64>,
    pub sign_in: Histogram<u64>,
}

impl StageHistograms {
    pub fn new() -> Self {
        StageHistograms {
            total: histogram(),
            tcp_connect: histogram(),
            tls: histogram(),
            first_csm: histogram(),
            sign_up: histogram(),
            sign_in: histogram(),
        }
    }

    pub fn record(&mut self, t: &Timings) {
        record(&mut self.total, t.total());
        record(&mut self.tcp_connect, t.tcp_connect);
        record(&mut self.tls, t.tls);
        record(&mut self.first_csm, t.first_csm);
        if let Some(d) = t.sign_up {
            record(&mut self.sign_up, d);
        }
        if let Some(d) = t.sign_in {
            record(&mut self.sign_in, d);
        }
    }

    pub fn add(&mut self, other: &StageHistograms) {
        // Same bounds everywhere: adding cannot fail.
        let _ = self.total.add(&other.total);
        let _ = self.tcp_connect.add(&other.tcp_connect);
        let _ = self.tls.add(&other.tls);
        let _ = self.first_csm.add(&other.first_csm);
        let _ = self.sign_up.add(&other.sign_up);
        let _ = self.sign_in.add(&other.sign_in);
    }

    pub fn stages(&self) -> StagePercentiles {
        let some = |h: &Histogram<u64>| (!h.is_empty()).then(|| Percentiles::of(h));
        StagePercentiles {
            tcp_connect: Percentiles::of(&self.tcp_connect),
            tls: Percentiles::of(&self.tls),
            first_csm: Percentiles::of(&self.first_csm),
            sign_up: some(&self.sign_up),
            sign_in: some(&self.sign_in),
        }
    }
}

/// Per-stage latency; `sign_up`/`sign_in` are null when no connection
/// did one.
#[derive(Debug, Clone, Serialize)]
pub struct StagePercentiles {
    pub tcp_connect: Percentiles,
    pub tls: Percentiles,
    pub first_csm: Percentiles,
    pub sign_up: Option<Percentiles>,
    pub sign_in: Option<Percentiles>,
}

/// Failed connections by stage, with a few messages.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Errors {
    pub total: u64,
    pub tcp_connect: u64,
    pub tls: u64,
    pub first_csm: u64,
    pub request: u64,
    pub sign_up: u64,
    pub sign_in: u64,
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
            Stage::SignUp => self.sign_up += 1,
            Stage::SignIn => self.sign_in += 1,
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
        self.sign_up += other.sign_up;
        self.sign_in += other.sign_in;
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

/// Runs `count` connections against `addr` from `threads` threads, each
/// doing what `plan` says.
pub fn run(
    addr: SocketAddr,
    plan: &Plan,
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
    let threads = plan.threads(threads);
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let (next, failed, plan, interrupted) = (
                next.clone(),
                failed.clone(),
                plan.clone(),
                interrupted.clone(),
            );
            std::thread::spawn(move || {
                let mut latency = StageHistograms::new();
                let mut errors = Errors::default();
                let mut ok = 0u64;
                let mut attempt = 0u64;
                loop {
                    if Instant::now() >= deadline
                        || interrupted.load(Ordering::Relaxed)
                        || failed.load(Ordering::Relaxed) >= max_failures
                        || next.fetch_add(1, Ordering::Relaxed) >= count
                    {
                        break;
                    }
                    let outcome = plan.connect(addr, thread, threads, attempt);
                    attempt += 1;
                    match outcome {
                        Ok(timings) => {
                            latency.record(&timings);
                            ok += 1;
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
