//! What runs the twin devices of `notify` and `command` (`--engine`):
//!
//! - `shards` (default): the shards runtime's client side (`sharded.rs`),
//!   `--threads` client shards doing set-up and traffic as sans-IO devices
//!   on io_uring, like the gateway's own shards;
//! - `threads`: the first fleet, kept to compare with and to reproduce the
//!   figures recorded with it: blocking set-up threads (`fleet.rs`), then
//!   `mio` poll loops (`live.rs`).
//!
//! Both give the scenario the same counters (`live::Shared`) and the same
//! per-device summary at the end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::ValueEnum;

use crate::device::Device;
use crate::live::{Drivers, SendPlan, Shared};
use crate::sharded::{ShardFleet, Summary};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    Shards,
    Threads,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Shards => "shards",
            Engine::Threads => "threads",
        }
    }
}

/// A fleet that is set up (every device IN_SYNC) and not driven yet.
pub enum Fleet {
    Threads(Vec<Device>),
    Shards(ShardFleet),
}

impl Fleet {
    pub fn held(&self) -> usize {
        match self {
            Fleet::Threads(devices) => devices.len(),
            Fleet::Shards(fleet) => fleet.held(),
        }
    }

    pub fn device_ids(&self) -> Vec<String> {
        match self {
            Fleet::Threads(devices) => devices
                .iter()
                .filter_map(|d| d.twin.as_ref().map(|t| t.device_id().to_owned()))
                .collect(),
            Fleet::Shards(fleet) => fleet.device_ids(),
        }
    }

    /// Starts answering and (when told) sending: `threads` poll-loop
    /// threads for the thread fleet; the shards already run.
    pub fn drive(
        self,
        threads: usize,
        plan: SendPlan,
        deadline: Instant,
        interrupted: &Arc<AtomicBool>,
    ) -> Live {
        match self {
            Fleet::Threads(devices) => Live::Threads {
                drivers: Drivers::start(devices, threads, plan, deadline, interrupted),
            },
            Fleet::Shards(fleet) => Live::Shards { fleet, plan },
        }
    }
}

/// A fleet being driven.
pub enum Live {
    Threads { drivers: Drivers },
    Shards { fleet: ShardFleet, plan: SendPlan },
}

impl Live {
    pub fn shared(&self) -> Arc<Shared> {
        match self {
            Live::Threads { drivers } => drivers.shared.clone(),
            Live::Shards { fleet, .. } => fleet.shared.clone(),
        }
    }

    /// Begins a sending phase whose time origin is `start_ns` (unix ns).
    pub fn start_sending(&self, start_ns: u64) {
        match self {
            Live::Threads { drivers } => {
                let shared = &drivers.shared;
                shared.phase_start_ns.store(start_ns, Ordering::Release);
                shared.sending.store(true, Ordering::Release);
            }
            Live::Shards { fleet, plan } => fleet.start_sending(*plan, start_ns),
        }
    }

    pub fn stop_sending(&self) {
        match self {
            Live::Threads { drivers } => drivers.shared.sending.store(false, Ordering::Release),
            Live::Shards { fleet, .. } => fleet.stop_sending(),
        }
    }

    /// Stops and closes every device; what each device still connected
    /// left, and errors of the threads that failed.
    pub fn stop(self) -> (Vec<Summary>, Vec<String>) {
        match self {
            Live::Threads { drivers } => {
                let (devices, errors) = drivers.stop();
                let summaries = devices
                    .into_iter()
                    .map(|mut d| {
                        let summary = d
                            .twin
                            .as_mut()
                            .map(|t| Summary {
                                device_id: t.device_id().to_owned(),
                                sent: t.sent,
                                update_values: std::mem::take(&mut t.update_values),
                                closed_by_gateway: false,
                                in_sync: true,
                            })
                            .unwrap_or_default();
                        d.close();
                        summary
                    })
                    .collect();
                (summaries, errors)
            }
            Live::Shards { fleet, .. } => {
                let summaries = fleet
                    .stop()
                    .into_iter()
                    .filter(|s| !s.closed_by_gateway)
                    .collect();
                (summaries, Vec::new())
            }
        }
    }
}
