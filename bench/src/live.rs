//! Many connected twin devices (`twin.rs`) driven by a few client
//! threads: non-blocking sockets, one `mio` poller (epoll, edge
//! triggered) per thread. Each thread answers the gateway's requests and
//! Pings as they come (`Device::pump`), and while the shared `sending`
//! flag is up writes notifications: as fast as the sockets take them, a
//! burst of `per_write` per device per pass, or at a fixed total rate
//! (the devices take turns, so each sends evenly spaced, at most one
//! poll tick — 1 ms — late); never more than
//! `window` notifications ahead of what the hub has counted (`acked`,
//! kept up to date by the caller from `/metrics`).
//!
//! Bounded: a thread stops when `stop` is set, at its deadline, or when
//! the user interrupts.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::device::Device;

/// How the devices send.
#[derive(Debug, Clone, Copy)]
pub struct SendPlan {
    /// Notifications per second over all devices; `None`: as fast as
    /// possible.
    pub rate: Option<f64>,
    /// At most this many notifications in one write (one TLS record).
    pub per_write: usize,
    /// At most this many notifications sent and not yet counted by the hub.
    pub window: u64,
}

/// State shared by the driver threads and the scenario.
#[derive(Default)]
pub struct Shared {
    /// Devices write notifications while this is up.
    pub sending: AtomicBool,
    /// Ends the threads.
    pub stop: AtomicBool,
    /// Notifications written (all threads).
    pub sent: AtomicU64,
    /// Notifications the hub counted since the run began (set by the
    /// caller).
    pub acked: AtomicU64,
    /// Changes the hub has not handed on yet (the NATS hub's queue to the
    /// broker; always 0 on the embedded hub), set by the caller.
    pub hub_queued: AtomicU64,
    /// Unix ns at which the current sending phase began (the rate's time
    /// origin).
    pub phase_start_ns: AtomicU64,
    /// Devices whose connection the gateway closed.
    pub closed: AtomicU64,
    pub pings: AtomicU64,
    pub requests: AtomicU64,
    /// Responses and signals nobody waited for.
    pub other: AtomicU64,
    /// Write errors other than a full socket.
    pub write_errors: AtomicU64,
}

pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One device on a driver thread.
struct Slot {
    device: Device,
    /// The socket was full: wait for a writable event.
    blocked: bool,
    closed: bool,
    /// The resource of the next notification.
    next_resource: usize,
}

/// Drives `devices` until `shared.stop` or `deadline`; returns them.
/// `total` is the fleet's size (this thread's share of the rate).
pub fn drive(
    devices: Vec<Device>,
    total: usize,
    plan: SendPlan,
    shared: Arc<Shared>,
    deadline: Instant,
    interrupted: Arc<AtomicBool>,
) -> io::Result<Vec<Device>> {
    let mut poll = Poll::new()?;
    let mut slots: Vec<Slot> = Vec::with_capacity(devices.len());
    for (i, device) in devices.into_iter().enumerate() {
        device.set_nonblocking()?;
        let fd = device.raw_fd();
        poll.registry().register(
            &mut SourceFd(&fd),
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        slots.push(Slot {
            device,
            blocked: false,
            closed: false,
            next_resource: 0,
        });
    }
    let n = slots.len();
    // This thread's share of the total rate. Devices take turns in index
    // order, so each sends every n / rate seconds, evenly staggered.
    let thread_rate = plan.rate.map(|r| r * n as f64 / total.max(1) as f64);
    let mut events = Events::with_capacity(1024);
    let mut cursor = 0usize;
    let mut last_sweep = Instant::now();
    // (phase, notifications this thread sent in it)
    let mut phase_sent = (0u64, 0u64);
    loop {
        if shared.stop.load(Ordering::Relaxed)
            || interrupted.load(Ordering::Relaxed)
            || Instant::now() >= deadline
        {
            break;
        }
        let mut wrote = 0u64;
        let mut wait = Duration::from_millis(1);
        if shared.sending.load(Ordering::Acquire) && n > 0 {
            let phase = shared.phase_start_ns.load(Ordering::Acquire);
            if phase_sent.0 != phase {
                phase_sent = (phase, 0);
            }
            let now_ns = unix_ns();
            let elapsed_s = now_ns.saturating_sub(phase) as f64 / 1e9;
            // How many this pass may write: all devices once (as fast as
            // possible), or what is due by now (rated).
            let (mut budget, per_write) = match thread_rate {
                None => (u64::MAX, plan.per_write as u64),
                Some(r) => {
                    let due = (elapsed_s * r).floor() as u64 + 1;
                    let behind = due.saturating_sub(phase_sent.1);
                    // Behind by more than a round: several per write.
                    let each = behind.div_ceil(n as u64).clamp(1, plan.per_write as u64);
                    if behind == 0 {
                        let next = (phase_sent.1 as f64 / r - elapsed_s).max(0.0);
                        wait = Duration::from_secs_f64(next.min(0.001));
                    }
                    (behind, each)
                }
            };
            for _ in 0..n {
                if budget == 0 {
                    break;
                }
                let i = cursor;
                cursor = (cursor + 1) % n;
                let s = &mut slots[i];
                if s.blocked || s.closed {
                    continue;
                }
                let in_flight = shared
                    .sent
                    .load(Ordering::Relaxed)
                    .saturating_sub(shared.acked.load(Ordering::Relaxed));
                if in_flight >= plan.window {
                    break;
                }
                let resources = s.device.twin.as_ref().map_or(0, |t| t.resource_count());
                if resources == 0 {
                    continue;
                }
                let k = s.next_resource % resources;
                s.next_resource = s.next_resource.wrapping_add(1);
                let want = per_write.min(budget) as usize;
                match s.device.notify_nonblocking(k, want, now_ns) {
                    Ok((w, flushed)) => {
                        budget = budget.saturating_sub(w);
                        phase_sent.1 += w;
                        wrote += w;
                        shared.sent.fetch_add(w, Ordering::Relaxed);
                        s.blocked = !flushed;
                    }
                    Err(_) => {
                        shared.write_errors.fetch_add(1, Ordering::Relaxed);
                        s.closed = true;
                        shared.closed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        let timeout = if wrote > 0 { Duration::ZERO } else { wait };
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            let Some(s) = slots.get_mut(ev.token().0) else {
                continue;
            };
            if s.closed {
                continue;
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                serve(s, &shared);
            }
            if ev.is_writable() && s.blocked && !s.closed {
                match s.device.flush_nonblocking() {
                    Ok(done) => s.blocked = !done,
                    Err(_) => {
                        s.closed = true;
                        shared.closed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        // Edge-triggered readiness: a pump that stopped at its bound left
        // bytes behind; a sweep every second reads them.
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            last_sweep = Instant::now();
            for s in slots.iter_mut().filter(|s| !s.closed) {
                serve(s, &shared);
            }
        }
    }
    Ok(slots
        .into_iter()
        .filter(|s| !s.closed)
        .map(|s| s.device)
        .collect())
}

fn serve(s: &mut Slot, shared: &Shared) {
    let p = s.device.pump();
    shared.pings.fetch_add(p.pings_answered, Ordering::Relaxed);
    shared
        .requests
        .fetch_add(p.requests_answered, Ordering::Relaxed);
    shared.other.fetch_add(p.other_messages, Ordering::Relaxed);
    if p.closed {
        s.closed = true;
        shared.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Spreads `devices` over `threads` driver threads.
pub struct Drivers {
    handles: Vec<std::thread::JoinHandle<io::Result<Vec<Device>>>>,
    pub shared: Arc<Shared>,
}

impl Drivers {
    pub fn start(
        devices: Vec<Device>,
        threads: usize,
        plan: SendPlan,
        deadline: Instant,
        interrupted: &Arc<AtomicBool>,
    ) -> Drivers {
        let shared = Arc::new(Shared::default());
        let total = devices.len();
        let threads = threads.clamp(1, total.max(1));
        let per = total.div_ceil(threads);
        let mut rest = devices;
        let mut handles = Vec::with_capacity(threads);
        while !rest.is_empty() {
            let tail = rest.split_off(per.min(rest.len()));
            let mine = std::mem::replace(&mut rest, tail);
            let (shared, interrupted) = (shared.clone(), interrupted.clone());
            handles.push(std::thread::spawn(move || {
                drive(mine, total, plan, shared, deadline, interrupted)
            }));
        }
        Drivers { handles, shared }
    }

    /// Stops the threads; the devices still connected, and the errors of
    /// threads that failed.
    pub fn stop(self) -> (Vec<Device>, Vec<String>) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let mut devices = Vec::new();
        let mut errors = Vec::new();
        for h in self.handles {
            match h.join() {
                Ok(Ok(d)) => devices.extend(d),
                Ok(Err(e)) => errors.push(format!("a device thread failed: {e}")),
                Err(_) => errors.push("a device thread panicked".into()),
            }
        }
        (devices, errors)
    }
}
