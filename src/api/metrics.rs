//! Prometheus metrics read at scrape time from the shards' atomic counters
//! (no per-event cost on the data path beyond the counters themselves).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use shards::ShardStats;

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
const COUNTERS: [(&str, &str, Read); 8] = [
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
