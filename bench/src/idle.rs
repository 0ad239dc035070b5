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
