//! The bounded queue of changes on their way to the broker, and the
//! control-plane task that publishes them (issue 6: never one broker round
//! trip per notification on the shard).
//!
//! The shards enqueue ([`Outbox::push`], a channel send); one task takes
//! what is queued, publishes runs of plain records with many publishes in
//! flight and then awaits all their acks, and applies the few changes that
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

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::HeaderMap;
use bytes::Bytes;

use super::Inner;
use crate::hub::{AuthContext, CommandResult, ConnectionRef, HubError, HubStats};

/// Changes one pass of the task takes at most.
const MAX_BATCH: usize = 1024;
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

async fn process(inner: &Arc<Inner>, mut batch: Vec<Out>) {
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
