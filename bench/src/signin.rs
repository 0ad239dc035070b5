//! Sign-ins over established connections: N devices are connected, signed
//! up and signed in once (set-up, [`crate::fleet::enroll`]); then each
//! client thread signs its devices in again and again — one sign-in in
//! flight per connection, all of a thread's connections at once (a batch:
//! send to each, then read each answer) — for a bounded count and time.
//! A re-sign-in of the same device and owner on the same connection makes
//! the gateway verify the JWT again and replace the token (no ONLINE, no
//! `GET /oic/res`): its cost is parsing, verification and the round trip.
//!
//! The yardsticks run in this process, on the main thread, with the same
//! tokens: a bare `jsonwebtoken` ES256 verify ([`BareVerifier`]) and the
//! gateway's own [`TokenValidator`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_gateway::auth::jwt::TokenValidator;
use hdrhistogram::Histogram;

use crate::device::{Device, DeviceError};
use crate::fleet::Registered;
use crate::load::{self, Errors};
use crate::procfs::{self, CpuTicks};

/// A kept connection of a signed-in device.
pub struct Held {
    pub device: Device,
    pub registered: Registered,
}

/// One gateway phase.
pub struct Round {
    pub ok: u64,
    pub errors: Errors,
    pub wall: Duration,
    /// Send to answer of each sign-in, µs (includes waiting behind the
    /// rest of the thread's batch).
    pub latency: Histogram<u64>,
    pub cut_short: Option<String>,
}

impl Round {
    pub fn empty() -> Round {
        Round {
            ok: 0,
            errors: Errors::default(),
            wall: Duration::ZERO,
            latency: load::histogram(),
            cut_short: None,
        }
    }

    pub fn add(&mut self, other: &Round) {
        self.ok += other.ok;
        self.errors.add(&other.errors);
        self.wall += other.wall;
        let _ = self.latency.add(&other.latency);
        if self.cut_short.is_none() {
            self.cut_short.clone_from(&other.cut_short);
        }
    }
}

/// `count` sign-ins spread over the threads (one per group of held
/// connections) in proportion to their devices. Returns the connections
/// still usable, grouped as given.
pub fn gateway_round(
    groups: Vec<Vec<Held>>,
    count: u64,
    deadline: Instant,
    interrupted: &Arc<AtomicBool>,
) -> (Vec<Vec<Held>>, Round) {
    let total: u64 = groups.iter().map(|g| g.len() as u64).sum();
    let failed = Arc::new(AtomicU64::new(0));
    let max_failures = (count / 10).max(50);
    let mut assigned = 0;
    let n = groups.len();
    let started = Instant::now();
    let handles: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(i, group)| {
            let quota = if i + 1 == n {
                count - assigned
            } else {
                count * group.len() as u64 / total.max(1)
            };
            assigned += quota;
            let (failed, interrupted) = (failed.clone(), interrupted.clone());
            std::thread::spawn(move || {
                sign_in_loop(group, quota, deadline, &interrupted, &failed, max_failures)
            })
        })
        .collect();
    let mut round = Round::empty();
    let mut groups = Vec::with_capacity(n);
    for h in handles {
        match h.join() {
            Ok((group, r)) => {
                round.add(&r);
                groups.push(group);
            }
            Err(_) => round.cut_short = Some("a client thread panicked".into()),
        }
    }
    round.wall = started.elapsed();
    if round.ok + round.errors.total < count && round.cut_short.is_none() {
        round.cut_short = Some(if interrupted.load(Ordering::Relaxed) {
            "interrupted".into()
        } else if round.errors.total >= max_failures {
            format!("stopped after {} failures", round.errors.total)
        } else if groups.iter().all(Vec::is_empty) {
            "no connection left".into()
        } else {
            "deadline reached".into()
        });
    }
    (groups, round)
}

fn sign_in_loop(
    mut held: Vec<Held>,
    quota: u64,
    deadline: Instant,
    interrupted: &AtomicBool,
    failed: &AtomicU64,
    max_failures: u64,
) -> (Vec<Held>, Round) {
    let mut round = Round::empty();
    let mut sent: Vec<(usize, [u8; 8], Instant)> = Vec::with_capacity(held.len());
    let mut dead: Vec<usize> = Vec::new();
    let mut cursor = 0usize;
    let mut done = 0u64;
    while done < quota && !held.is_empty() {
        if Instant::now() >= deadline
            || interrupted.load(Ordering::Relaxed)
            || failed.load(Ordering::Relaxed) >= max_failures
        {
            break;
        }
        let batch = (quota - done).min(held.len() as u64) as usize;
        sent.clear();
        dead.clear();
        let fail = |round: &mut Round, e: &DeviceError| {
            round.errors.record(e);
            failed.fetch_add(1, Ordering::Relaxed);
        };
        for k in 0..batch {
            let i = (cursor + k) % held.len();
            let h = &mut held[i];
            match h.device.send_sign_in(&h.registered.sign_in_body, false) {
                Ok(token) => sent.push((i, token, Instant::now())),
                Err(e) => {
                    fail(&mut round, &e);
                    dead.push(i);
                }
            }
        }
        for &(i, token, at) in &sent {
            match held[i].device.sign_in_answer(&token) {
                Ok(()) => {
                    load::record(&mut round.latency, at.elapsed());
                    round.ok += 1;
                }
                Err(e) => {
                    fail(&mut round, &e);
                    dead.push(i);
                }
            }
        }
        done += batch as u64;
        cursor = (cursor + batch) % held.len();
        if !dead.is_empty() {
            dead.sort_unstable();
            dead.dedup();
            for &i in dead.iter().rev() {
                // Dropping closes the socket; the gateway has closed it too
                // (spec §5.0: a failed /oic/sec request closes).
                drop(held.swap_remove(i));
            }
            cursor = 0;
        }
    }
    (held, round)
}

/// A yardstick phase on the calling thread.
pub struct Local {
    pub ok: u64,
    pub failures: u64,
    pub cpu: Option<CpuTicks>,
    pub wall: Duration,
}

/// `count` calls of `verify` over `tokens` (round robin) on this thread,
/// with this thread's CPU time read around them.
pub fn local_round(
    tokens: &[&str],
    count: u64,
    deadline: Instant,
    interrupted: &AtomicBool,
    verify: &dyn Fn(&str) -> bool,
) -> Local {
    let tid = procfs::current_tid().ok();
    let cpu = || tid.and_then(|t| procfs::thread_cpu_ticks(t).ok());
    let before = cpu();
    let started = Instant::now();
    let (mut ok, mut failures) = (0u64, 0u64);
    for i in 0..count {
        // Checking the clock every 256 calls costs nothing measurable.
        if i % 256 == 0 && (Instant::now() >= deadline || interrupted.load(Ordering::Relaxed)) {
            break;
        }
        let token = tokens[(i % tokens.len() as u64) as usize];
        if std::hint::black_box(verify(std::hint::black_box(token))) {
            ok += 1;
        } else {
            failures += 1;
        }
    }
    let wall = started.elapsed();
    Local {
        ok,
        failures,
        cpu: before.zip(cpu()).map(|(a, b)| b.since(a)),
        wall,
    }
}

/// The gateway's validator as a yardstick closure.
pub fn validator_check(validator: &TokenValidator) -> impl Fn(&str) -> bool + '_ {
    move |token| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        validator.validate(token, now).is_ok()
    }
}
