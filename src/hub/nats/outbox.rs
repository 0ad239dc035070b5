//! The bounded queue of changes on their way to the broker, and the
//! control-plane task that publishes them (issue 6: never one broker round
//! trip per notification on the shard).
//!
//! The shards enqueue ([`Outbox::push`], a channel send); one task takes
//! what is queued, merges each run of plain records ([`Merge`]: a
//! device's consecutive events of one kind in one message, a key's last
//! value only), publishes the run with many publishes in flight and then
//! awaits all their acks, and applies the few changes that
//! need a compare-and-set (OFFLINE, command answers) one at a time in
//! queue order. A failure is retried from the first change not
//! acknowledged, after a backoff, for as long as the broker is away: the
//! queue keeps them (bounded by `hub.nats.buffer`; a full queue holds the
//! caller, counted as `nats_queue_full`). Re-sent records carry the same
//! `Nats-Msg-Id`, so the stream drops the copies a lost ack caused
//! (JetStream's duplicate window, 2 min). Changes of one device keep their
//! order: they are queued in call order and published in queue order
//! over one connection, and a retry resumes at the first one missing.
//!
//! The task is IO: it waits with the monotonic clock.
#![allow(clippy::disallowed_methods)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::HeaderMap;
use bytes::Bytes;

use super::records::{self, MAX_GROUP};
use super::Inner;
use crate::hub::{AuthContext, CommandResult, ConnectionRef, HubError, HubStats};

/// Changes one pass of the task takes at most.
const MAX_BATCH: usize = 4096;
/// Bytes of events one merged message holds at most (the broker's
/// default `max_payload` is 1 MiB).
const MAX_GROUP_BYTES: usize = 256 * 1024;
/// Backoff between retries: grows to this.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// A change the broker refuses (while reachable) this many times in a row
/// is given up, counted and logged (e.g. larger than its max payload).
const MAX_REFUSALS: u32 = 20;

/// One change for the broker.
#[derive(Debug)]
pub(super) enum Out {
    /// A record on a subject: an event, a twin value, a link, a twin
    /// sync state. `delete` marks a KV key deleted instead.
    Put {
        subject: String,
        payload: Bytes,
        msg_id: String,
        delete: bool,
        merge: Merge,
    },
    /// OFFLINE (spec §8.2) of the device's `connection` on this node, and
    /// its dispatched commands the session never saw back to pending.
    Offline {
        device_key: String,
        connection: ConnectionRef,
    },
    /// `local_endpoints` of an online device (spec §8.1).
    Endpoints {
        device_key: String,
        connection: ConnectionRef,
        endpoints: Vec<String>,
    },
    /// A device's answer (spec §7.3), to the command dispatched to
    /// `connection`.
    Answer {
        ctx: AuthContext,
        connection: ConnectionRef,
        result: CommandResult,
    },
    /// Dispatched commands the session never sent: pending again.
    Return {
        device_key: String,
        connection: ConnectionRef,
        correlation_ids: Vec<String>,
    },
    /// Everything queued before it is acknowledged.
    Barrier(flume::Sender<()>),
}

/// How a record may be combined with the records queued next to it, so
/// that a burst of notifications costs a few broker round trips, not two
/// per notification (issue 6: batch publishes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Merge {
    /// A key-value entry: the buckets keep one value per key (history 1),
    /// so of the values a run holds for one key only the last is sent.
    Latest,
    /// An event: consecutive events of one device and kind go in one
    /// message ([`records::group_events`]), in their order.
    Event,
}

/// Why a step failed.
pub(super) struct Fail {
    /// The broker answered, and refused (not an outage).
    pub refused: bool,
    pub message: String,
}

impl Fail {
    pub fn outage(message: impl Into<String>) -> Fail {
        Fail {
            refused: false,
            message: message.into(),
        }
    }

    pub fn refused(message: impl Into<String>) -> Fail {
        Fail {
            refused: true,
            message: message.into(),
        }
    }
}

/// The producer side.
#[derive(Debug, Clone)]
pub(super) struct Outbox {
    tx: flume::Sender<Out>,
    stats: Arc<HubStats>,
}

impl Outbox {
    pub fn new(capacity: usize, stats: Arc<HubStats>) -> (Outbox, flume::Receiver<Out>) {
        let (tx, rx) = flume::bounded(capacity);
        (Outbox { tx, stats }, rx)
    }

    /// Queues a change; a full queue holds the caller (backpressure on the
    /// shard) until there is room, or until `limit` passed when given:
    /// then [`HubError::Unavailable`].
    pub fn push(&self, out: Out, limit: Option<Duration>) -> Result<(), HubError> {
        let out = match self.tx.try_send(out) {
            Ok(()) => {
                self.stats.nats_queue_depth.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Err(flume::TrySendError::Full(out)) => out,
            Err(flume::TrySendError::Disconnected(_)) => {
                return Err(HubError::Unavailable("the NATS hub is stopped".into()))
            }
        };
        self.stats.nats_queue_full.fetch_add(1, Ordering::Relaxed);
        let sent = match limit {
            Some(limit) => self.tx.send_timeout(out, limit).map_err(|e| match e {
                flume::SendTimeoutError::Timeout(_) => {
                    HubError::Unavailable("the queue of changes for the NATS broker is full".into())
                }
                flume::SendTimeoutError::Disconnected(_) => {
                    HubError::Unavailable("the NATS hub is stopped".into())
                }
            }),
            None => self
                .tx
                .send(out)
                .map_err(|_| HubError::Unavailable("the NATS hub is stopped".into())),
        };
        if sent.is_ok() {
            self.stats.nats_queue_depth.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// [`Outbox::push`] from async code (never blocks a runtime thread).
    pub async fn push_async(&self, out: Out) -> Result<(), HubError> {
        if self.tx.is_full() {
            self.stats.nats_queue_full.fetch_add(1, Ordering::Relaxed);
        }
        self.tx
            .send_async(out)
            .await
            .map_err(|_| HubError::Unavailable("the NATS hub is stopped".into()))?;
        self.stats.nats_queue_depth.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Waits until everything queued so far is acknowledged, at most
    /// `limit`.
    pub fn flush(&self, limit: Duration) -> Result<(), HubError> {
        let (tx, rx) = flume::bounded(1);
        self.push(Out::Barrier(tx), Some(limit))?;
        rx.recv_timeout(limit).map_err(|_| {
            HubError::Unavailable(format!(
                "the NATS broker did not acknowledge the changes within {}",
                humantime::format_duration(limit)
            ))
        })
    }
}

/// The consumer side: runs until the hub is dropped.
pub(super) async fn run(inner: Arc<Inner>, rx: flume::Receiver<Out>) {
    while let Ok(first) = rx.recv_async().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(out) => batch.push(out),
                Err(_) => break,
            }
        }
        let taken = batch.len() as u64;
        process(&inner, batch).await;
        inner
            .stats
            .nats_queue_depth
            .fetch_sub(taken, Ordering::Relaxed);
    }
}

async fn process(inner: &Arc<Inner>, batch: Vec<Out>) {
    // Merged once, so that a retry re-sends the same messages with the
    // same IDs (the stream drops the copies).
    let mut batch = merge_runs(batch);
    let mut at = 0;
    let mut attempt: u32 = 0;
    let mut failing_since: Option<Instant> = None;
    while at < batch.len() {
        let end = batch[at..]
            .iter()
            .position(|o| !matches!(o, Out::Put { .. }))
            .map_or(batch.len(), |p| at + p);
        let step = if end > at {
            publish_run(inner, &batch[at..end])
                .await
                .map(|()| (end, Vec::new()))
                .map_err(|(k, e)| (at + k, e))
        } else {
            apply(inner, &batch[at])
                .await
                .map(|follow| (at + 1, follow))
                .map_err(|e| (at, e))
        };
        match step {
            Ok((next, follow)) => {
                if failing_since.take().is_some() {
                    tracing::info!("the NATS broker takes changes again");
                }
                attempt = 0;
                if follow.is_empty() {
                    at = next;
                } else {
                    // A step's follow-up (its event) goes next, before
                    // later changes.
                    batch.splice(at..next, follow);
                }
            }
            Err((failed_at, fail)) => {
                at = failed_at;
                attempt += 1;
                inner.stats.nats_retries.fetch_add(1, Ordering::Relaxed);
                if failing_since.is_none() {
                    failing_since = Some(Instant::now());
                    tracing::warn!(
                        queued = batch.len() - at,
                        "the NATS broker does not take changes ({}); they wait in the queue",
                        fail.message
                    );
                }
                if fail.refused && attempt >= MAX_REFUSALS {
                    inner.stats.nats_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        change = ?batch[at],
                        "the NATS broker refuses a change for good; giving it up: {}",
                        fail.message
                    );
                    at += 1;
                    attempt = 0;
                    continue;
                }
                let backoff = Duration::from_millis(50u64.saturating_mul(1 << attempt.min(5)))
                    .min(MAX_BACKOFF);
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// Each run of records (between two steps that are not records)
/// rewritten as [`Merge`] allows. Only records next to each other in the
/// queue are combined: nothing moves across an OFFLINE, an answer or a
/// barrier.
fn merge_runs(batch: Vec<Out>) -> Vec<Out> {
    let mut merged = Vec::with_capacity(batch.len());
    let mut run = Vec::new();
    for out in batch {
        if matches!(out, Out::Put { .. }) {
            run.push(out);
        } else {
            merge_run(std::mem::take(&mut run), &mut merged);
            merged.push(out);
        }
    }
    merge_run(run, &mut merged);
    merged
}

/// Events of one merged message.
struct Group {
    subject: String,
    msg_id: String,
    records: Vec<Bytes>,
    bytes: usize,
}

fn merge_run(run: Vec<Out>, merged: &mut Vec<Out>) {
    if run.len() < 2 {
        merged.extend(run);
        return;
    }
    // The last value of each key (Merge::Latest).
    let mut keep = vec![true; run.len()];
    let mut seen = HashSet::new();
    for (i, out) in run.iter().enumerate().rev() {
        if let Out::Put {
            subject,
            merge: Merge::Latest,
            ..
        } = out
        {
            keep[i] = seen.insert(subject.as_str());
        }
    }
    drop(seen);
    // Events: a device's open group takes its next event if that event
    // has the group's subject (same kind); an event of another kind
    // opens a new group, so a device's events keep their order.
    enum Slot {
        Out(Out),
        Group(Group),
    }
    let mut slots: Vec<Slot> = Vec::with_capacity(run.len());
    let mut open: HashMap<String, usize> = HashMap::new();
    for (out, keep) in run.into_iter().zip(keep) {
        if !keep {
            continue;
        }
        let Out::Put {
            subject,
            payload,
            msg_id,
            merge: Merge::Event,
            ..
        } = out
        else {
            slots.push(Slot::Out(out));
            continue;
        };
        // `<p>.events.<owner>.<device>.<kind>`: the device is all but
        // the last token.
        let device = subject
            .rsplit_once('.')
            .map_or(subject.as_str(), |(d, _)| d);
        if let Some(Slot::Group(g)) = open.get(device).map(|&i| &mut slots[i]) {
            if g.subject == subject
                && g.records.len() < MAX_GROUP
                && g.bytes + payload.len() <= MAX_GROUP_BYTES
            {
                g.bytes += payload.len();
                g.records.push(payload);
                continue;
            }
        }
        open.insert(device.to_owned(), slots.len());
        slots.push(Slot::Group(Group {
            subject,
            msg_id,
            bytes: payload.len(),
            records: vec![payload],
        }));
    }
    merged.extend(slots.into_iter().map(|slot| match slot {
        Slot::Out(out) => out,
        Slot::Group(mut g) if g.records.len() == 1 => Out::Put {
            subject: g.subject,
            payload: g.records.pop().unwrap_or_default(),
            msg_id: g.msg_id,
            delete: false,
            merge: Merge::Event,
        },
        // The first event's ID and the count: the same group re-sent has
        // the same ID.
        Slot::Group(g) => Out::Put {
            payload: records::group_events(&g.records),
            msg_id: format!("{}+{}", g.msg_id, g.records.len()),
            subject: g.subject,
            delete: false,
            merge: Merge::Event,
        },
    }));
}

/// Publishes a run of records, all in flight at once, then awaits the
/// acks in order; the index of the first one not acknowledged on error.
async fn publish_run(inner: &Arc<Inner>, run: &[Out]) -> Result<(), (usize, Fail)> {
    let mut acks = Vec::with_capacity(run.len());
    for (i, out) in run.iter().enumerate() {
        let Out::Put {
            subject,
            payload,
            msg_id,
            delete,
            ..
        } = out
        else {
            continue;
        };
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id.as_str());
        if *delete {
            headers.insert("KV-Operation", "DEL");
        }
        match inner
            .js
            .publish_with_headers(subject.clone(), headers, payload.clone())
            .await
        {
            Ok(ack) => acks.push((i, ack)),
            // Nothing of the run was awaited yet: all of it goes again
            // (the copies are dropped by their message IDs).
            Err(e) => return Err((0, publish_fail(e.kind(), &e))),
        }
    }
    for (i, ack) in acks {
        match ack.await {
            Ok(_) => {
                inner.stats.nats_published.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return Err((i, publish_fail(e.kind(), &e))),
        }
    }
    Ok(())
}

fn publish_fail(kind: PublishErrorKind, e: &dyn std::fmt::Display) -> Fail {
    match kind {
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::StreamNotFound
        | PublishErrorKind::MaxAckPending => Fail::outage(e.to_string()),
        _ => Fail::refused(e.to_string()),
    }
}

/// One change that is more than a record; what must follow it.
async fn apply(inner: &Arc<Inner>, out: &Out) -> Result<Vec<Out>, Fail> {
    match out {
        Out::Put { .. } => Ok(Vec::new()),
        Out::Barrier(done) => {
            let _ = done.send(());
            Ok(Vec::new())
        }
        Out::Offline {
            device_key,
            connection,
        } => inner.apply_offline(device_key, *connection).await,
        Out::Endpoints {
            device_key,
            connection,
            endpoints,
        } => inner
            .apply_endpoints(device_key, *connection, endpoints)
            .await
            .map(|()| Vec::new()),
        Out::Answer {
            ctx,
            connection,
            result,
        } => inner.apply_answer(ctx, *connection, result).await,
        Out::Return {
            device_key,
            connection,
            correlation_ids,
        } => inner
            .apply_return(device_key, *connection, correlation_ids)
            .await
            .map(|()| Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(device: &str, kind: &str, n: u8) -> Out {
        Out::Put {
            subject: format!("p.events.o.{device}.{kind}"),
            payload: Bytes::from(vec![1, n]),
            msg_id: format!("id{n}"),
            delete: false,
            merge: Merge::Event,
        }
    }

    fn kv(key: &str, n: u8) -> Out {
        Out::Put {
            subject: format!("$KV.p-twin.{key}"),
            payload: Bytes::from(vec![1, n]),
            msg_id: format!("id{n}"),
            delete: false,
            merge: Merge::Latest,
        }
    }

    /// (subject, msg_id, payload) of each record; "barrier" for a step.
    fn shape(batch: &[Out]) -> Vec<(String, String, Vec<u8>)> {
        batch
            .iter()
            .map(|o| match o {
                Out::Put {
                    subject,
                    msg_id,
                    payload,
                    ..
                } => (subject.clone(), msg_id.clone(), payload.to_vec()),
                _ => ("barrier".into(), String::new(), Vec::new()),
            })
            .collect()
    }

    fn group(items: &[u8]) -> Vec<u8> {
        let records: Vec<Bytes> = items.iter().map(|&n| Bytes::from(vec![1, n])).collect();
        records::group_events(&records).to_vec()
    }

    #[test]
    fn a_devices_consecutive_events_of_one_kind_share_a_message() {
        let merged = merge_runs(vec![
            event("a", "x", 1),
            event("b", "x", 2),
            event("a", "x", 3),
            event("b", "x", 4),
            event("a", "x", 5),
        ]);
        assert_eq!(
            shape(&merged),
            vec![
                ("p.events.o.a.x".into(), "id1+3".into(), group(&[1, 3, 5])),
                ("p.events.o.b.x".into(), "id2+2".into(), group(&[2, 4])),
            ]
        );
    }

    #[test]
    fn another_kind_between_keeps_a_devices_order() {
        let merged = merge_runs(vec![
            event("a", "x", 1),
            event("a", "y", 2),
            event("a", "x", 3),
            event("a", "x", 4),
        ]);
        assert_eq!(
            shape(&merged),
            vec![
                ("p.events.o.a.x".into(), "id1".into(), vec![1, 1]),
                ("p.events.o.a.y".into(), "id2".into(), vec![1, 2]),
                ("p.events.o.a.x".into(), "id3+2".into(), group(&[3, 4])),
            ]
        );
    }

    #[test]
    fn only_the_last_value_of_a_key_is_sent() {
        let merged = merge_runs(vec![
            kv("k", 1),
            kv("m", 2),
            kv("k", 3),
            event("a", "x", 4),
            kv("k", 5),
        ]);
        assert_eq!(
            shape(&merged),
            vec![
                ("$KV.p-twin.m".into(), "id2".into(), vec![1, 2]),
                ("p.events.o.a.x".into(), "id4".into(), vec![1, 4]),
                ("$KV.p-twin.k".into(), "id5".into(), vec![1, 5]),
            ]
        );
    }

    #[test]
    fn nothing_is_combined_across_another_step() {
        let (tx, _rx) = flume::bounded(1);
        let merged = merge_runs(vec![
            kv("k", 1),
            event("a", "x", 2),
            Out::Barrier(tx),
            kv("k", 3),
            event("a", "x", 4),
        ]);
        assert_eq!(
            shape(&merged),
            vec![
                ("$KV.p-twin.k".into(), "id1".into(), vec![1, 1]),
                ("p.events.o.a.x".into(), "id2".into(), vec![1, 2]),
                ("barrier".into(), String::new(), Vec::new()),
                ("$KV.p-twin.k".into(), "id3".into(), vec![1, 3]),
                ("p.events.o.a.x".into(), "id4".into(), vec![1, 4]),
            ]
        );
    }

    #[test]
    fn a_group_is_bounded() {
        let n = MAX_GROUP + 5;
        let merged = merge_runs((0..n).map(|i| event("a", "x", i as u8)).collect());
        assert_eq!(merged.len(), 2);
        let sizes: Vec<usize> = merged
            .iter()
            .map(|o| match o {
                Out::Put { payload, .. } => records::decode_events(payload, 1).len(),
                _ => 0,
            })
            .collect();
        // The test payloads are not event records: each decodes as one
        // (unreadable) entry, so the count is still the group's size.
        assert_eq!(sizes, vec![MAX_GROUP, 5]);
    }
}
