//! The glue between the `shards` runtime and the sans-IO [`Session`]: turns
//! the plaintext byte stream of a connection into CoAP messages (the
//! deframer borrows them from the runtime's buffer) and hands the session's
//! bytes back. Wall-clock and randomness are read here, not in the session.

// The glue is the IO side of the session: it reads the wall clock.
#![allow(clippy::disallowed_methods)]

use std::rc::Rc;
use std::time::{Instant, SystemTime};

use shards::{CloseReason, ConnInfo, Connection, Service};

use crate::auth::identity::peer_identity;
use crate::coap::deframer;
use crate::session::{PeerIdentity, Session, SessionConfig};

/// One shard's factory of device connections.
pub struct GatewayService {
    config: Rc<SessionConfig>,
    rng: ring::rand::SystemRandom,
}

impl GatewayService {
    pub fn new(config: SessionConfig) -> Self {
        GatewayService {
            config: Rc::new(config),
            rng: ring::rand::SystemRandom::new(),
        }
    }
}

impl Service for GatewayService {
    type Conn = DeviceConnection;

    fn accept(&self, info: &ConnInfo<'_>, now: Instant) -> DeviceConnection {
        let identity = match info.peer_certificates {
            Some(chain) => PeerIdentity {
                device_id: peer_identity(chain).device_id.map(String::into_boxed_str),
            },
            None => PeerIdentity::default(),
        };
        tracing::debug!(
            peer = %info.peer_addr,
            shard = info.shard,
            device_id = identity.device_id.as_deref().unwrap_or(""),
            tls = ?info.tls_version,
            "device connected"
        );
        let seed: [u8; 8] = ring::rand::generate(&self.rng)
            .map(|r| r.expose())
            // The kernel RNG does not fail after boot; if it ever does, a
            // time-derived seed keeps tokens unique per connection.
            .unwrap_or_else(|_| fallback_seed(now));
        DeviceConnection {
            session: Session::new(self.config.clone(), identity, now, u64::from_be_bytes(seed)),
            max_message_size: self.config.max_message_size,
        }
    }
}

fn fallback_seed(now: Instant) -> [u8; 8] {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (now.elapsed().as_nanos() as u64)).to_be_bytes()
}

/// A device connection as the runtime sees it.
pub struct DeviceConnection {
    session: Session,
    max_message_size: usize,
}

impl DeviceConnection {
    pub fn session(&self) -> &Session {
        &self.session
    }
}

impl Connection for DeviceConnection {
    fn on_data(&mut self, now: Instant, data: &[u8]) -> usize {
        let wall = SystemTime::now();
        let mut used = 0;
        while self.session.is_closed().is_none() {
            let rest = data.get(used..).unwrap_or_default();
            match deframer::next_message(rest, self.max_message_size) {
                Ok(Some((msg, len))) => {
                    self.session.handle_frame(now, wall, msg);
                    used += len;
                }
                Ok(None) => break,
                Err(error) => {
                    self.session.handle_frame_error(error);
                    return data.len();
                }
            }
        }
        used
    }

    fn on_timeout(&mut self, now: Instant) {
        self.session.handle_timeout(now);
    }

    fn on_shutdown(&mut self, _now: Instant) {
        self.session.shutdown();
    }

    fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        self.session.poll_transmit(out)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.session.poll_timeout()
    }

    fn is_closed(&self) -> bool {
        self.session.is_closed().is_some()
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
