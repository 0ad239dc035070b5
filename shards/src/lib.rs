//! `shards`: the thread-per-core runtime of the gateway.
//!
//! It moves bytes: accepts connections on SO_REUSEPORT listeners (one per
//! shard), drives TLS, hands plaintext to an application [`Connection`] and
//! sends what it answers, keeps each shard's connections and timers. It
//! delivers messages from other threads to one connection on its shard
//! ([`ShardSender`], [`ConnId`], [`Connection::on_message`]). It
//! knows nothing of CoAP (ARCHITECTURE.md: `shards` moves bytes, `coap`
//! frames them, `session` decides).
//!
//! The same shards also run the client side ([`Runtime::start_client`],
//! [`Runtime::connect`], [`Connect`]): connections opened to a server, with
//! their application created when the TLS handshake is done, exactly as an
//! accepted one. The bench's device fleet runs on it.

// The runtime is the IO side: it reads the clock and hands `now` to the
// sans-IO layers (clippy.toml bans clock reads elsewhere).
#![allow(clippy::disallowed_methods)]

mod driver;
mod message;
mod runtime;
pub mod system;

pub use driver::{CloseReason, ConnInfo, Connection, Driver, Endpoint, Service};
pub use message::{ConnId, ParseConnIdError, SendError, ShardSender};
pub use runtime::{Connect, Runtime, RuntimeConfig, ShardStats, StartError, MIN_PENDING_TX};
