//! Messages from other threads (the control plane) to one connection on its
//! shard: a [`ConnId`] names the connection, a [`ShardSender`] puts the
//! message on the owning shard's bounded channel, and the shard's receive
//! task hands it to the connection's [`Connection::on_message`]
//! (ARCHITECTURE.md "Threads and channels": one bounded channel per shard,
//! a full channel is visible, never a silent drop).
//!
//! [`Connection::on_message`]: crate::Connection::on_message

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::runtime::ShardStats;

/// The identity of one connection, unique for the lifetime of the process:
/// the shard that owns it, its slot in that shard's table, and the
/// generation of the slot's occupant. A slot is reused after its connection
/// closes, but the new connection gets a new generation, so a message
/// addressed to the old one is dropped (and counted), never delivered to
/// its successor.
///
/// Generations come from a per-shard counter of accepted connections: they
/// repeat only after 2^32 connections on one shard, and then only matter if
/// the same slot comes up with the same count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub shard: u32,
    pub slot: u32,
    pub generation: u32,
}

/// `shard:slot:generation`, e.g. `1:17:40213`.
impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.shard, self.slot, self.generation)
    }
}

/// The text form is not a `ConnId` (`shard:slot:generation`, decimal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseConnIdError;

impl fmt::Display for ParseConnIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("expected a connection id `shard:slot:generation`")
    }
}

impl std::error::Error for ParseConnIdError {}

impl FromStr for ConnId {
    type Err = ParseConnIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(':').map(|p| p.parse::<u32>());
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Ok(shard)), Some(Ok(slot)), Some(Ok(generation)), None) => Ok(ConnId {
                shard,
                slot,
                generation,
            }),
            _ => Err(ParseConnIdError),
        }
    }
}

/// A message that could not be queued; it is handed back.
#[derive(Clone, PartialEq, Eq)]
pub enum SendError<M> {
    /// The shard's channel is full: the shard is behind. Retry later, shed
    /// load, or report it; the message was not queued.
    Full(M),
    /// No running shard takes messages for this `ConnId`: the runtime has
    /// stopped, or the id names a shard this runtime does not have.
    Stopped(M),
}

impl<M> SendError<M> {
    /// The message that was not sent.
    pub fn into_inner(self) -> M {
        match self {
            SendError::Full(m) | SendError::Stopped(m) => m,
        }
    }

    pub fn is_full(&self) -> bool {
        matches!(self, SendError::Full(_))
    }
}

// Not derived: the message type need not be Debug.
impl<M> fmt::Debug for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Full(_) => f.write_str("Full(..)"),
            SendError::Stopped(_) => f.write_str("Stopped(..)"),
        }
    }
}

impl<M> fmt::Display for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Full(_) => f.write_str("the shard's message channel is full"),
            SendError::Stopped(_) => f.write_str("the shard has stopped"),
        }
    }
}

impl<M> std::error::Error for SendError<M> {}

/// What travels on a shard's channel.
pub(crate) type Envelope<M> = (ConnId, M);

/// One shard's inbound end, as seen from outside.
struct ShardInbox<M> {
    tx: flume::Sender<Envelope<M>>,
    stats: Arc<ShardStats>,
}

/// Sends messages to connections on their shards, from any thread. Cheap to
/// clone; sending never blocks ([`ShardSender::send`]) or waits for room
/// only in an async context ([`ShardSender::send_async`]).
pub struct ShardSender<M> {
    shards: Arc<[ShardInbox<M>]>,
}

impl<M> Clone for ShardSender<M> {
    fn clone(&self) -> Self {
        ShardSender {
            shards: self.shards.clone(),
        }
    }
}

impl<M> fmt::Debug for ShardSender<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardSender")
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl<M: Send + 'static> ShardSender<M> {
    pub(crate) fn new(shards: Vec<(flume::Sender<Envelope<M>>, Arc<ShardStats>)>) -> Self {
        ShardSender {
            shards: shards
                .into_iter()
                .map(|(tx, stats)| ShardInbox { tx, stats })
                .collect(),
        }
    }

    /// Queues `msg` for the connection `to` without waiting. A full channel
    /// gives the message back as [`SendError::Full`] (and counts it in the
    /// shard's `messages_rejected_full`); it is never dropped silently. A
    /// message that is queued but whose connection has closed by the time
    /// the shard reads it is dropped there and counted in
    /// `messages_dropped_closed`.
    pub fn send(&self, to: ConnId, msg: M) -> Result<(), SendError<M>> {
        let Some(inbox) = self.inbox(to) else {
            return Err(SendError::Stopped(msg));
        };
        match inbox.tx.try_send((to, msg)) {
            Ok(()) => Ok(()),
            Err(flume::TrySendError::Full((_, msg))) => {
                inbox
                    .stats
                    .messages_rejected_full
                    .fetch_add(1, Ordering::Relaxed);
                Err(SendError::Full(msg))
            }
            Err(flume::TrySendError::Disconnected((_, msg))) => Err(SendError::Stopped(msg)),
        }
    }

    /// Queues `msg`, waiting (asynchronously) while the shard's channel is
    /// full. Works from tokio or any other executor.
    pub async fn send_async(&self, to: ConnId, msg: M) -> Result<(), SendError<M>> {
        let Some(inbox) = self.inbox(to) else {
            return Err(SendError::Stopped(msg));
        };
        inbox
            .tx
            .send_async((to, msg))
            .await
            .map_err(|e| SendError::Stopped(e.into_inner().1))
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Messages waiting on `shard`'s channel (0 for an unknown shard).
    pub fn queued(&self, shard: usize) -> usize {
        self.shards.get(shard).map_or(0, |inbox| inbox.tx.len())
    }

    fn inbox(&self, to: ConnId) -> Option<&ShardInbox<M>> {
        self.shards.get(usize::try_from(to.shard).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(shard: u32, slot: u32, generation: u32) -> ConnId {
        ConnId {
            shard,
            slot,
            generation,
        }
    }

    #[test]
    fn conn_id_text_round_trip() {
        let c = id(1, 17, 40213);
        assert_eq!(c.to_string(), "1:17:40213");
        assert_eq!("1:17:40213".parse::<ConnId>(), Ok(c));
        for bad in ["", "1:2", "1:2:3:4", "a:2:3", "1:-2:3", "1:2:4294967296"] {
            assert_eq!(bad.parse::<ConnId>(), Err(ParseConnIdError), "{bad:?}");
        }
    }

    #[test]
    fn a_full_channel_hands_the_message_back_and_counts_it() {
        let (tx, rx) = flume::bounded(1);
        let stats = Arc::new(ShardStats::default());
        let sender = ShardSender::new(vec![(tx, stats.clone())]);
        assert_eq!(sender.send(id(0, 0, 1), "first".to_string()), Ok(()));
        assert_eq!(
            sender.send(id(0, 0, 1), "second".to_string()),
            Err(SendError::Full("second".to_string()))
        );
        assert_eq!(stats.messages_rejected_full.load(Ordering::Relaxed), 1);
        assert_eq!(sender.queued(0), 1);
        assert_eq!(rx.try_recv(), Ok((id(0, 0, 1), "first".to_string())));
        assert_eq!(sender.send(id(0, 0, 1), "third".to_string()), Ok(()));
    }

    #[test]
    fn a_stopped_or_unknown_shard_hands_the_message_back() {
        let (tx, rx) = flume::bounded(4);
        let sender = ShardSender::new(vec![(tx, Arc::new(ShardStats::default()))]);
        assert_eq!(
            sender.send(id(3, 0, 1), 7u32),
            Err(SendError::Stopped(7)),
            "no shard 3"
        );
        drop(rx);
        assert_eq!(sender.send(id(0, 0, 1), 8u32), Err(SendError::Stopped(8)));
        let blocked = futures_lite::future::block_on(sender.send_async(id(0, 0, 1), 9u32));
        assert_eq!(blocked, Err(SendError::Stopped(9)));
    }

    #[test]
    fn send_async_waits_for_room() {
        let (tx, rx) = flume::bounded(1);
        let sender = ShardSender::new(vec![(tx, Arc::new(ShardStats::default()))]);
        sender.send(id(0, 0, 1), 1u32).unwrap();
        let other = sender.clone();
        let waiter = std::thread::spawn(move || {
            futures_lite::future::block_on(other.send_async(id(0, 0, 1), 2u32))
        });
        assert_eq!(rx.recv().unwrap().1, 1);
        assert_eq!(rx.recv().unwrap().1, 2);
        assert_eq!(waiter.join().unwrap(), Ok(()));
    }

    #[test]
    fn the_sender_is_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<ShardSender<String>>();
    }
}
