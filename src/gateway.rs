//! The glue between the `shards` runtime and the sans-IO [`Session`]: turns
//! the plaintext byte stream of a connection into CoAP messages (the
//! deframer borrows them from the runtime's buffer) and hands the session's
//! bytes back. Wall-clock and randomness are read here, not in the session.

// The glue is the IO side of the session: it reads the wall clock.
#![allow(clippy::disallowed_methods)]

use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use shards::{CloseReason, ConnId, ConnInfo, Connection, Service, ShardSender};

use crate::auth::identity::{earliest_not_after, peer_identity};
use crate::auth::provider::{OAuthError, TokenSet};
use crate::coap::deframer;
use crate::hub::{ConnectionRef, Connections, HubMessage};
use crate::session::{PeerIdentity, Session, SessionConfig};

/// The runtime's message sender, known once the runtime started.
pub type SenderSlot = Arc<OnceLock<ShardSender<GatewayMessage>>>;

/// A connection's ID as the hub sees it.
pub fn connection_ref(id: ConnId) -> ConnectionRef {
    ConnectionRef(
        u128::from(id.shard) << 64 | u128::from(id.slot) << 32 | u128::from(id.generation),
    )
}

/// The inverse of [`connection_ref`].
pub fn conn_id(r: ConnectionRef) -> ConnId {
    ConnId {
        shard: (r.0 >> 64) as u32,
        slot: (r.0 >> 32) as u32,
        generation: r.0 as u32,
    }
}

/// The hub closes device connections through the shards' channels.
pub struct ShardConnections {
    pub sender: SenderSlot,
}

impl Connections for ShardConnections {
    fn close(&self, connection: ConnectionRef, reason: &str) {
        let Some(sender) = self.sender.get() else {
            return;
        };
        let to = conn_id(connection);
        if let Err(e) = sender.send(
            to,
            GatewayMessage::Close {
                reason: reason.to_owned(),
            },
        ) {
            tracing::warn!(conn = %to, "cannot ask the connection to close: {e}");
        }
    }

    fn deliver(&self, connection: ConnectionRef, message: HubMessage) -> Result<(), HubMessage> {
        let Some(sender) = self.sender.get() else {
            return Err(message);
        };
        let to = conn_id(connection);
        sender
            .send(to, GatewayMessage::Hub(message))
            .map_err(|e| match e.into_inner() {
                GatewayMessage::Hub(m) => m,
                // We sent a Hub message; the runtime hands back what it got.
                other => unreachable!("the runtime handed back another message: {other:?}"),
            })
    }
}

/// One shard's factory of device connections.
pub struct GatewayService {
    config: Rc<SessionConfig>,
    rng: ring::rand::SystemRandom,
    sender: SenderSlot,
}

impl GatewayService {
    pub fn new(config: SessionConfig, sender: SenderSlot) -> Self {
        GatewayService {
            config: Rc::new(config),
            rng: ring::rand::SystemRandom::new(),
            sender,
        }
    }
}

impl Service for GatewayService {
    type Conn = DeviceConnection;

    fn accept(&self, info: &ConnInfo<'_>, now: Instant) -> DeviceConnection {
        // The leaf is parsed once: its device ID and its NotAfter.
        let presented = info
            .peer_certificates
            .map(|chain| (peer_identity(chain), chain));
        let identity = PeerIdentity {
            device_id: presented
                .as_ref()
                .and_then(|(leaf, _)| leaf.device_id.as_deref().map(Box::from)),
            connection: connection_ref(info.id),
            remote: info.peer_addr.to_string().into_boxed_str(),
        };
        tracing::debug!(
            peer = %info.peer_addr,
            conn = %info.id,
            device_id = identity.device_id.as_deref().unwrap_or(""),
            tls = ?info.tls_version,
            "device connected"
        );
        let seed: [u8; 8] = ring::rand::generate(&self.rng)
            .map(|r| r.expose())
            // The kernel RNG does not fail after boot; if it ever does, a
            // time-derived seed keeps tokens unique per connection.
            .unwrap_or_else(|_| fallback_seed(now));
        let mut session =
            Session::new(self.config.clone(), identity, now, u64::from_be_bytes(seed));
        if self.config.disconnect_on_expired_certificate {
            // spec §3.5: the earliest NotAfter of the presented chain (the
            // leaf's came with its identity) and of the CA, on the
            // monotonic clock the session runs on.
            let chain = presented.and_then(|(leaf, chain)| {
                let rest = earliest_not_after(chain.get(1..).unwrap_or_default());
                leaf.not_after.into_iter().chain(rest).min()
            });
            if let Some(expiry) = chain.into_iter().chain(self.config.ca_not_after).min() {
                let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
                session.set_certificate_deadline(now + left);
            }
        }
        DeviceConnection {
            session,
            max_message_size: self.config.max_message_size,
            id: info.id,
            sender: self.sender.clone(),
            linger: Linger::Open,
        }
    }
}

fn fallback_seed(now: Instant) -> [u8; 8] {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (now.elapsed().as_nanos() as u64)).to_be_bytes()
}

/// What the control plane sends to one device connection (through
/// `shards::ShardSender`, addressed by the `ConnId` the connection was
/// accepted with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayMessage {
    /// Disconnect the device (e.g. it was removed through the API): the
    /// session closes without sending anything more.
    Close { reason: String },
    /// The answer of an external OAuth provider to the session's exchange
    /// `id` (spec §4.8).
    Exchange {
        id: u64,
        result: Result<TokenSet, OAuthError>,
    },
    /// A command or twin setting from the hub (spec §7).
    Hub(HubMessage),
}

/// A device connection as the runtime sees it.
pub struct DeviceConnection {
    session: Session,
    max_message_size: usize,
    id: ConnId,
    sender: SenderSlot,
    linger: Linger,
}

/// Where the transport stands once the session has ended. A session that
/// ended with an answer for the device (4.01 before sign-in, a failed
/// `/oic/sec/*` request, an Abort) keeps the connection open until the
/// device closes it or `coap.close_linger` passes: IoTivity-Lite drops an
/// answer that arrives in the same read as the close_notify or FIN, and
/// then only sees "connection closed" and retries (spec Appendix A.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linger {
    /// The session runs (or has just ended and was not looked at yet).
    Open,
    /// The answer is sent; close at this instant unless the device does
    /// first. Inbound data is dropped meanwhile.
    Until(Instant),
    /// Close now.
    Over,
}

impl DeviceConnection {
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// After every input: once the session has ended, linger or close.
    fn settle(&mut self, now: Instant) {
        if self.linger != Linger::Open {
            return;
        }
        if let Some(reason) = self.session.is_closed() {
            let linger = self.session.config().close_linger;
            self.linger = if reason.lingers() && !linger.is_zero() {
                Linger::Until(now + linger)
            } else {
                Linger::Over
            };
        }
    }

    /// Starts the OAuth exchanges the session asked for. The embedded
    /// authority answers at once; an external provider answers later
    /// through a [`GatewayMessage::Exchange`] to this connection.
    fn start_exchanges(&mut self, now: Instant) {
        while let Some(exchange) = self.session.poll_exchange() {
            let providers = &self.session.config().providers;
            let Some(provider) = providers.get(exchange.provider).cloned() else {
                continue;
            };
            let sender = self.sender.clone();
            let to = self.id;
            let id = exchange.id;
            let done = Box::new(move |result: Result<TokenSet, OAuthError>| {
                let delivered = sender
                    .get()
                    .map(|s| s.send(to, GatewayMessage::Exchange { id, result }));
                if !matches!(delivered, Some(Ok(()))) {
                    tracing::warn!(conn = %to, "cannot deliver an OAuth answer to its connection");
                }
            });
            if let Some(result) = provider.exchange(exchange.request, done) {
                self.session
                    .handle_exchange(now, SystemTime::now(), id, result);
            }
        }
    }
}

impl Connection for DeviceConnection {
    type Message = GatewayMessage;

    fn on_data(&mut self, now: Instant, data: &[u8]) -> usize {
        let wall = SystemTime::now();
        let mut used = 0;
        while self.session.is_closed().is_none() {
            let rest = data.get(used..).unwrap_or_default();
            match deframer::next_message(rest, self.max_message_size) {
                Ok(Some((msg, len))) => {
                    self.session.handle_frame(now, wall, msg);
                    used += len;
                    self.start_exchanges(now);
                }
                Ok(None) => break,
                Err(error) => {
                    self.session.handle_frame_error(error);
                    break;
                }
            }
        }
        self.settle(now);
        if self.session.is_closed().is_some() {
            // Ended (or lingering): nothing more is read, and nothing is
            // kept of what came after.
            return data.len();
        }
        used
    }

    fn on_timeout(&mut self, now: Instant) {
        match self.linger {
            Linger::Until(at) if now >= at => self.linger = Linger::Over,
            Linger::Until(_) => {}
            _ => self.session.handle_timeout(now),
        }
        self.settle(now);
    }

    fn on_message(&mut self, now: Instant, msg: GatewayMessage) {
        match msg {
            GatewayMessage::Close { reason } => {
                self.session.close(reason);
                // The hub's word ends a linger too.
                self.linger = Linger::Over;
            }
            GatewayMessage::Exchange { id, result } => {
                self.session
                    .handle_exchange(now, SystemTime::now(), id, result);
                self.start_exchanges(now);
            }
            GatewayMessage::Hub(message) => {
                self.session
                    .handle_hub_message(now, SystemTime::now(), message);
            }
        }
        self.settle(now);
    }

    fn on_shutdown(&mut self, _now: Instant) {
        self.session.shutdown();
        self.linger = Linger::Over;
    }

    fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        self.session.poll_transmit(out)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self.linger {
            Linger::Until(at) => Some(at),
            _ => self.session.poll_timeout(),
        }
    }

    fn is_closed(&self) -> bool {
        self.linger == Linger::Over
    }

    fn on_closed(&mut self, _now: Instant, reason: &CloseReason) {
        tracing::debug!(
            device_id = self.session.identity().device_id.as_deref().unwrap_or(""),
            ?reason,
            "device disconnected"
        );
        self.session.transport_closed(format!("{reason:?}"));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::TcpStream;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use shards::{ConnId, Runtime, RuntimeConfig};

    use super::*;
    use crate::coap::Code;
    use crate::session::CloseReason as SessionClose;

    fn info(id: ConnId) -> ConnInfo<'static> {
        ConnInfo {
            peer_addr: "127.0.0.1:40000".parse().unwrap(),
            local_addr: "127.0.0.1:5684".parse().unwrap(),
            shard: id.shard as usize,
            id,
            peer_certificates: None,
            tls_version: None,
            cipher_suite: None,
            tag: 0,
        }
    }

    #[test]
    fn a_close_message_closes_the_session_without_a_response() {
        let id = ConnId {
            shard: 0,
            slot: 3,
            generation: 7,
        };
        let now = Instant::now();
        let mut conn = GatewayService::new(SessionConfig::default(), SenderSlot::default())
            .accept(&info(id), now);
        let mut csm = Vec::new();
        assert!(conn.poll_transmit(&mut csm));
        conn.on_message(
            now,
            GatewayMessage::Close {
                reason: "device removed".into(),
            },
        );
        assert!(conn.is_closed());
        assert!(!conn.poll_transmit(&mut Vec::new()), "nothing is sent");
        assert_eq!(
            conn.session().is_closed(),
            Some(&SessionClose::ClosedByHub("device removed".into()))
        );
        assert_eq!(conn.poll_timeout(), None);
    }

    /// The gateway's service, remembering the ids it accepted.
    struct Recording {
        inner: GatewayService,
        seen: Arc<Mutex<Vec<ConnId>>>,
    }

    impl Service for Recording {
        type Conn = DeviceConnection;
        fn accept(&self, info: &ConnInfo<'_>, now: Instant) -> DeviceConnection {
            self.seen.lock().unwrap().push(info.id);
            self.inner.accept(info, now)
        }
    }

    #[test]
    fn the_hub_disconnects_a_device_through_the_runtime() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut config = RuntimeConfig::new("127.0.0.1:0".parse().unwrap(), None);
        config.shards = 1;
        let recorded = seen.clone();
        let runtime = Runtime::start(config, move |_| Recording {
            inner: GatewayService::new(SessionConfig::default(), SenderSlot::default()),
            seen: recorded.clone(),
        })
        .expect("runtime starts");
        let mut device = TcpStream::connect(runtime.local_addr()).unwrap();
        device
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut first = [0u8; 64];
        let n = device.read(&mut first).unwrap();
        let (csm, len) = deframer::next_message(&first[..n], 1024).unwrap().unwrap();
        assert_eq!((csm.code, len), (Code::CSM, n));

        let id = seen.lock().unwrap()[0];
        runtime
            .sender()
            .send(
                id,
                GatewayMessage::Close {
                    reason: "device removed".into(),
                },
            )
            .unwrap();
        let mut rest = Vec::new();
        device.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "closed without a response: {rest:?}");
        let stats = &runtime.stats()[0];
        assert_eq!(
            stats
                .messages_delivered
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        runtime.shutdown();
        runtime.join();
    }
}
