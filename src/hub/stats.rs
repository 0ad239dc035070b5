//! Counters of the hub for `/metrics` (issue 4: sign-ins, notifications,
//! commands by status, pending depth, queue-full drops). Plain atomics,
//! bumped by the hub implementation, read by the API.

use std::sync::atomic::{AtomicU64, Ordering};

use super::twin::Status;

/// Every [`Status`], in the order [`HubStats::answered`] counts them.
pub const STATUSES: [Status; 12] = [
    Status::Ok,
    Status::Created,
    Status::NotModified,
    Status::Accepted,
    Status::BadRequest,
    Status::Unauthorized,
    Status::Forbidden,
    Status::NotFound,
    Status::MethodNotAllowed,
    Status::NotImplemented,
    Status::Unavailable,
    Status::Error,
];

fn status_index(status: Status) -> usize {
    STATUSES.iter().position(|s| *s == status).unwrap_or(11)
}

#[derive(Debug, Default)]
pub struct HubStats {
    /// Devices that went ONLINE (spec §8.1).
    pub sign_ins: AtomicU64,
    /// Resource changes the sessions reported (spec §6.7).
    pub notifications: AtomicU64,
    /// Of those, the ones that changed the twin.
    pub twin_updates: AtomicU64,
    pub commands_submitted: AtomicU64,
    /// Answered commands by [`STATUSES`] index.
    pub answered: [AtomicU64; 12],
    pub commands_expired: AtomicU64,
    pub commands_canceled: AtomicU64,
    /// Commands whose connection's queue was full (or gone) when the hub
    /// handed them over: they stayed pending.
    pub queue_full: AtomicU64,
    /// Write transactions the embedded hub's store committed (group
    /// commits: each holds many records).
    pub store_commits: AtomicU64,
    /// Records (device, link, twin, command, event) those commits wrote.
    pub store_records: AtomicU64,
    /// Durable redb commits of the embedded hub's store (checkpoints);
    /// group commits in between are durable in its write-ahead log.
    pub store_checkpoints: AtomicU64,
    /// Commits that failed (their changes are in memory only).
    pub store_errors: AtomicU64,
    /// Times a hub call found the store's queue full and waited for the
    /// disk (backpressure on the shard).
    pub store_queue_full: AtomicU64,
    /// The NATS hub: device-side changes waiting for the broker now (a
    /// gauge; bounded by `hub.nats.buffer`).
    pub nats_queue_depth: AtomicU64,
    /// The NATS hub: times a hub call found that queue full and waited
    /// (backpressure on the shard).
    pub nats_queue_full: AtomicU64,
    /// The NATS hub: messages the broker acknowledged (JetStream acks; a
    /// message may hold several merged events).
    pub nats_published: AtomicU64,
    /// The NATS hub: attempts that failed and were retried (broker
    /// unreachable or slow; the queue keeps them in order meanwhile).
    pub nats_retries: AtomicU64,
    /// The NATS hub: changes given up after the broker refused them for
    /// good (logged each; e.g. a record over the server's max payload).
    pub nats_failed: AtomicU64,
}

impl HubStats {
    pub fn count_answer(&self, status: Status) {
        self.answered[status_index(status)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn answered(&self, status: Status) -> u64 {
        self.answered[status_index(status)].load(Ordering::Relaxed)
    }
}
