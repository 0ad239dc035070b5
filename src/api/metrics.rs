//! Prometheus metrics read at scrape time from the shards' and the hub's
//! atomic counters (no per-event cost on the data path beyond the counters
//! themselves).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use shards::ShardStats;

use crate::hub::stats::STATUSES;
use crate::hub::{Hub, HubStats};

/// Per-shard connection counters, labelled `shard="<index>"`.
#[derive(Debug)]
pub struct ShardMetrics {
    stats: Vec<Arc<ShardStats>>,
}

impl ShardMetrics {
    pub fn new(stats: Vec<Arc<ShardStats>>) -> Self {
        ShardMetrics { stats }
    }
}

type Read = fn(&ShardStats) -> u64;

/// (name, help, read); the `_total` suffix is added by the encoder.
const COUNTERS: [(&str, &str, Read); 11] = [
    ("connections_accepted", "TCP connections accepted", |s| {
        s.accepted.load(Ordering::Relaxed)
    }),
    ("tls_handshakes", "TLS handshakes completed", |s| {
        s.handshakes.load(Ordering::Relaxed)
    }),
    (
        "tls_handshake_failures",
        "TLS handshakes that failed or timed out",
        |s| s.handshake_failures.load(Ordering::Relaxed),
    ),
    (
        "connections_rejected_max_connections",
        "connections refused because max_connections was reached",
        |s| s.rejected_max_connections.load(Ordering::Relaxed),
    ),
    ("connections_closed", "connections closed", |s| {
        s.closed.load(Ordering::Relaxed)
    }),
    (
        "messages_delivered",
        "control-plane messages delivered to a connection",
        |s| s.messages_delivered.load(Ordering::Relaxed),
    ),
    (
        "messages_dropped_closed",
        "control-plane messages dropped: the connection was gone or not yet open",
        |s| s.messages_dropped_closed.load(Ordering::Relaxed),
    ),
    (
        "messages_rejected_full",
        "control-plane messages refused because the shard's channel was full",
        |s| s.messages_rejected_full.load(Ordering::Relaxed),
    ),
    (
        "outbound_backpressure",
        "times a connection's unsent bytes reached coap.max_outbound_bytes and reading from it paused",
        |s| s.backpressure.load(Ordering::Relaxed),
    ),
    (
        "accept_paused",
        "times the shard stopped accepting because coap.max_handshakes_per_shard handshakes were in progress",
        |s| s.accept_paused.load(Ordering::Relaxed),
    ),
    (
        "write_stall_closes",
        "connections closed because their device read none of their unsent bytes within coap.write_stall_timeout",
        |s| s.write_stall_closes.load(Ordering::Relaxed),
    ),
];

impl Collector for ShardMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        {
            let mut family = encoder.encode_descriptor(
                "connections_active",
                "device connections open now",
                None,
                MetricType::Gauge,
            )?;
            for (i, s) in self.stats.iter().enumerate() {
                let labels = [("shard", i.to_string())];
                let active = s.active.load(Ordering::Relaxed) as i64;
                ConstGauge::new(active).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "outbound_queued_bytes",
                "bytes waiting for device sockets (each connection holds at most about coap.max_outbound_bytes)",
                None,
                MetricType::Gauge,
            )?;
            for (i, s) in self.stats.iter().enumerate() {
                let labels = [("shard", i.to_string())];
                let queued = s.pending_tx_bytes.load(Ordering::Relaxed) as i64;
                ConstGauge::new(queued).encode(family.encode_family(&labels)?)?;
            }
        }
        for (name, help, read) in COUNTERS {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (i, s) in self.stats.iter().enumerate() {
                let labels = [("shard", i.to_string())];
                ConstCounter::new(read(s)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The hub's counters (issue 4: sign-ins, notifications, twin updates,
/// commands by outcome, queue-full, pending depth), read at scrape time
/// from [`Hub::stats`] and [`Hub::pending_depth`].
#[derive(Debug)]
pub struct HubMetrics {
    hub: Arc<dyn Hub>,
}

impl HubMetrics {
    pub fn new(hub: Arc<dyn Hub>) -> Self {
        HubMetrics { hub }
    }
}

type ReadHub = fn(&HubStats) -> u64;

/// (name, help, read); the `_total` suffix is added by the encoder.
const HUB_COUNTERS: [(&str, &str, ReadHub); 16] = [
    (
        "hub_sign_ins",
        "devices that went ONLINE (spec §8.1)",
        |s| s.sign_ins.load(Ordering::Relaxed),
    ),
    (
        "hub_notifications",
        "resource changes the sessions reported (spec §6.7)",
        |s| s.notifications.load(Ordering::Relaxed),
    ),
    (
        "hub_twin_updates",
        "resource changes that changed the twin",
        |s| s.twin_updates.load(Ordering::Relaxed),
    ),
    (
        "hub_commands_submitted",
        "commands accepted by the hub",
        |s| s.commands_submitted.load(Ordering::Relaxed),
    ),
    (
        "hub_commands_expired",
        "pending commands that expired before they were sent (spec §7.4)",
        |s| s.commands_expired.load(Ordering::Relaxed),
    ),
    (
        "hub_commands_canceled",
        "pending commands canceled through the API",
        |s| s.commands_canceled.load(Ordering::Relaxed),
    ),
    (
        "hub_commands_queue_full",
        "commands a device connection could not take when handed over (they stayed pending)",
        |s| s.queue_full.load(Ordering::Relaxed),
    ),
    (
        "hub_store_commits",
        "write transactions of the embedded hub's store (group commits)",
        |s| s.store_commits.load(Ordering::Relaxed),
    ),
    (
        "hub_store_checkpoints",
        "durable redb commits of the embedded hub's store (group commits in between are durable in its write-ahead log)",
        |s| s.store_checkpoints.load(Ordering::Relaxed),
    ),
    (
        "hub_store_records",
        "records written by the embedded hub's store",
        |s| s.store_records.load(Ordering::Relaxed),
    ),
    (
        "hub_store_queue_full",
        "hub changes that waited because the store's queue was full (the disk is behind)",
        |s| s.store_queue_full.load(Ordering::Relaxed),
    ),
    (
        "hub_store_errors",
        "failed commits of the embedded hub's store",
        |s| s.store_errors.load(Ordering::Relaxed),
    ),
    (
        "hub_nats_queue_full",
        "NATS hub: hub calls that waited because the queue of changes for the broker was full",
        |s| s.nats_queue_full.load(Ordering::Relaxed),
    ),
    (
        "hub_nats_published",
        "NATS hub: messages the broker acknowledged (one message may hold several events of a device, merged by the outbox)",
        |s| s.nats_published.load(Ordering::Relaxed),
    ),
    (
        "hub_nats_retries",
        "NATS hub: broker calls that failed and were retried (outage or timeout)",
        |s| s.nats_retries.load(Ordering::Relaxed),
    ),
    (
        "hub_nats_failed",
        "NATS hub: changes the broker refused for good (each logged)",
        |s| s.nats_failed.load(Ordering::Relaxed),
    ),
];

impl Collector for HubMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.hub.stats();
        for (name, help, read) in HUB_COUNTERS {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(read(stats)).encode(family)?;
        }
        {
            let mut family = encoder.encode_descriptor(
                "hub_commands_answered",
                "commands answered, by the hub status of the answer (spec §5.12)",
                None,
                MetricType::Counter,
            )?;
            for status in STATUSES {
                let labels = [("status", status.as_str())];
                ConstCounter::new(stats.answered(status)).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let depth = stats.nats_queue_depth.load(Ordering::Relaxed);
            let family = encoder.encode_descriptor(
                "hub_nats_queue_depth",
                "NATS hub: changes waiting for the broker (bounded by hub.nats.buffer)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(depth).unwrap_or(i64::MAX)).encode(family)?;
        }
        let depth = i64::try_from(self.hub.pending_depth()).unwrap_or(i64::MAX);
        let family = encoder.encode_descriptor(
            "hub_commands_pending",
            "commands not yet answered, over all devices",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(depth).encode(family)?;
        Ok(())
    }
}
