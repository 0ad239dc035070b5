//! One device connection's sans-IO state machine (ARCHITECTURE.md, "The
//! session contract"): CoAP messages and `now` in; CoAP bytes, the next
//! deadline and the close decision out. No socket, no clock, no executor.
//!
//! What it does today: RFC 8323 signalling (CSM first, Ping/Pong, Release
//! and Abort from the device), keepalive (spec §2.4), `GET
//! /x.plgd.dev/time` (spec §5.10) and the authorization gate of spec §4.6:
//! until sign-in exists every other request is answered 4.01 and the
//! connection is closed.

mod error;
mod keepalive;

use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use crate::coap::{option, signal, Code, MessageRef, MessageWriter};
use crate::ocf::{self, ContentFormat};

pub use error::{SessionError, WireAction};
use keepalive::Keepalive;

/// Settings shared by every session of a shard.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Largest inbound Len accepted (spec §2.2, `coap.max_message_size`).
    pub max_message_size: usize,
    /// `coap.keepalive_timeout` (spec §2.4).
    pub keepalive_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_message_size: 262_144,
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Who is at the other end, as far as the transport could tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// From an OCF identity certificate (spec §3.3), lower-case.
    pub device_id: Option<Box<str>>,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The device stayed silent after a keepalive Ping (spec §2.4).
    KeepaliveTimeout,
    /// We sent an Abort (malformed or oversized frame, bad CSM option).
    Aborted(String),
    /// A request that requires sign-in came before it (spec §4.6).
    Unauthorized,
    /// The gateway is shutting down (we sent Release).
    Shutdown,
    /// The hub asked to disconnect the device (e.g. it was removed); the
    /// reason is the hub's.
    ClosedByHub(String),
    /// The transport went away.
    Transport(String),
}

/// Timers as data (STYLE.md §6): one deadline per kind.
#[derive(Debug, Clone, Copy)]
enum Timer {
    Keepalive = 0,
}
const TIMERS: usize = 1;

/// Peer capabilities from its CSM (RFC 8323 §5.3). A device that sends no
/// CSM gets the defaults (spec §2.3: real devices skip it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCsm {
    pub max_message_size: u32,
    pub block_wise: bool,
}

impl Default for PeerCsm {
    fn default() -> Self {
        // RFC 8323 §5.3.1: the default Max-Message-Size is 1152.
        PeerCsm {
            max_message_size: 1152,
            block_wise: false,
        }
    }
}

pub struct Session {
    config: Rc<SessionConfig>,
    identity: PeerIdentity,
    /// CoAP bytes waiting for `poll_transmit`; empty (no heap) when idle.
    out: Vec<u8>,
    timers: [Option<Instant>; TIMERS],
    keepalive: Keepalive,
    peer_csm: PeerCsm,
    /// Source of the tokens we generate (spec §2.2: 8 random bytes).
    token_state: u64,
    closed: Option<CloseReason>,
}

impl Session {
    /// A new connection. `seed` must be random (it makes the tokens we
    /// generate unpredictable); the gateway's CSM is queued at once because
    /// it must be the first message we send (RFC 8323 §5.3, spec §2.3).
    pub fn new(config: Rc<SessionConfig>, identity: PeerIdentity, now: Instant, seed: u64) -> Self {
        let mut session = Session {
            keepalive: Keepalive::new(now),
            config,
            identity,
            out: Vec::new(),
            timers: [None; TIMERS],
            peer_csm: PeerCsm::default(),
            token_state: seed,
            closed: None,
        };
        let token = session.next_token();
        // spec §2.3: the CSM carries no options (neither Max-Message-Size nor
        // Block-Wise-Transfer).
        signal::write_csm(&mut session.out, &token, None, false);
        session.arm_keepalive();
        session
    }

    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    pub fn peer_csm(&self) -> PeerCsm {
        self.peer_csm
    }

    /// A CoAP message from the device.
    pub fn handle_frame(&mut self, now: Instant, wall: SystemTime, msg: MessageRef<'_>) {
        if self.closed.is_some() {
            return;
        }
        // spec §2.4 step 1: every inbound frame counts as activity.
        self.keepalive.on_activity(now);
        let result = if msg.code.is_signal() {
            self.handle_signal(msg)
        } else if msg.code.is_request() {
            self.handle_request(wall, msg)
        } else if msg.code.is_empty() {
            // spec §2.7/§4.6: an Empty message needs a signed-in session.
            Err(SessionError::Unauthorized)
        } else {
            // spec §2.7: a response for a token we do not know is dropped.
            tracing::debug!(code = %msg.code, "dropping response for unknown token");
            Ok(())
        };
        if let Err(error) = result {
            self.apply(&error, msg.token);
        }
        self.arm_keepalive();
    }

    /// The device sent bytes that are not a CoAP message: RFC 8323 §5.6
    /// Abort with the reason, then close this connection only.
    pub fn handle_frame_error(&mut self, error: crate::coap::FrameError) {
        if self.closed.is_none() {
            self.apply(&SessionError::Frame(error), &[]);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if self.timers[Timer::Keepalive as usize].is_some_and(|at| now >= at) {
            match self
                .keepalive
                .on_deadline(now, self.config.keepalive_timeout)
            {
                keepalive::Action::Ping => {
                    let token = self.next_token();
                    self.keepalive.ping_sent(token);
                    signal::write_ping(&mut self.out, &token, false);
                }
                keepalive::Action::Close => {
                    tracing::debug!("closing a silent connection (keepalive)");
                    self.closed = Some(CloseReason::KeepaliveTimeout);
                }
                keepalive::Action::Wait => {}
            }
            self.arm_keepalive();
        }
    }

    /// The gateway is shutting down: RFC 8323 §5.5 Release, then close.
    pub fn shutdown(&mut self) {
        if self.closed.is_none() {
            let token = self.next_token();
            signal::write_release(&mut self.out, &token);
            self.closed = Some(CloseReason::Shutdown);
        }
    }

    /// Close from the server side at the hub's request: nothing more is sent
    /// (no response, no Release); queued bytes still go out first.
    pub fn close(&mut self, reason: String) {
        if self.closed.is_none() {
            tracing::debug!(%reason, "closing at the hub's request");
            self.closed = Some(CloseReason::ClosedByHub(reason));
        }
    }

    /// The transport is gone.
    pub fn transport_closed(&mut self, reason: String) {
        if self.closed.is_none() {
            self.closed = Some(CloseReason::Transport(reason));
        }
    }

    /// Moves queued CoAP bytes into `buf`; true when there were any.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool {
        if self.out.is_empty() {
            return false;
        }
        if buf.is_empty() {
            std::mem::swap(buf, &mut self.out);
        } else {
            buf.extend_from_slice(&self.out);
        }
        // An idle session keeps no buffer.
        self.out = Vec::new();
        true
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        self.timers.iter().flatten().min().copied()
    }

    pub fn is_closed(&self) -> Option<&CloseReason> {
        self.closed.as_ref()
    }

    fn arm_keepalive(&mut self) {
        self.timers[Timer::Keepalive as usize] =
            Some(self.keepalive.deadline(self.config.keepalive_timeout));
    }

    fn next_token(&mut self) -> [u8; 8] {
        // splitmix64: a bijection of a counter, so tokens never repeat on a
        // connection and look random when the seed is.
        self.token_state = self.token_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.token_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).to_be_bytes()
    }

    fn handle_signal(&mut self, msg: MessageRef<'_>) -> Result<(), SessionError> {
        match signal::Signal::parse(&msg).map_err(SessionError::Signal)? {
            signal::Signal::Csm {
                max_message_size,
                block_wise,
            } => {
                // spec §2.3: Max-Message-Size is recorded; block-wise is
                // switched on by option 4 (used once block-wise lands).
                let defaults = PeerCsm::default();
                self.peer_csm = PeerCsm {
                    max_message_size: max_message_size.unwrap_or(defaults.max_message_size),
                    block_wise,
                };
            }
            signal::Signal::Ping { .. } => {
                // spec §2.3: Pong with the same token, Custody not echoed.
                signal::write_pong(&mut self.out, msg.token, false);
            }
            signal::Signal::Pong { .. } => self.keepalive.pong(msg.token),
            // spec §2.3 (checklist item 3): ignored; the connection ends
            // only when the peer closes the socket.
            signal::Signal::Release { .. } | signal::Signal::Abort { .. } => {}
        }
        Ok(())
    }

    fn handle_request(
        &mut self,
        wall: SystemTime,
        msg: MessageRef<'_>,
    ) -> Result<(), SessionError> {
        if msg.uri_path_is(&["x.plgd.dev", "time"]) {
            // spec §5.10: no authorization; GET only.
            if msg.code != Code::GET {
                return Err(SessionError::MethodNotAllowed);
            }
            // RFC 7252 §5.4.1: an unrecognised critical option is 4.02.
            if let Some(number) = msg.first_unknown_critical_option() {
                return Err(SessionError::BadOption(number));
            }
            let format = ContentFormat::from_accept(msg.accept())
                .ok_or(SessionError::BadRequest("unsupported accept"))?;
            let mut body = Vec::new();
            ocf::time::encode_time_response(wall, format, &mut body)
                .map_err(|_| SessionError::Internal("cannot encode time"))?;
            let mut response = MessageWriter::new(&mut self.out, Code::CONTENT, msg.token);
            response
                .option_uint(option::CONTENT_FORMAT, u32::from(format.number()))
                .payload(&body);
            response.finish();
            return Ok(());
        }
        // spec §4.6: every other path requires a signed-in session. Sign-up,
        // sign-in and the resource directory arrive with the OCF protocol;
        // until then no connection can be signed in.
        Err(SessionError::Unauthorized)
    }

    /// The one place where an error becomes wire behaviour.
    fn apply(&mut self, error: &SessionError, token: &[u8]) {
        match error.wire_action() {
            WireAction::Respond { code, close } => {
                let diagnostic = error.to_string();
                // spec §5.0: error responses carry a diagnostic text and no
                // Content-Format.
                let mut response = MessageWriter::new(&mut self.out, code, token);
                response.payload(diagnostic.as_bytes());
                response.finish();
                if close {
                    self.closed = Some(CloseReason::Unauthorized);
                }
            }
            WireAction::Abort { bad_csm_option } => {
                let diagnostic = error.to_string();
                signal::write_abort(&mut self.out, &[], bad_csm_option, &diagnostic);
                self.closed = Some(CloseReason::Aborted(diagnostic));
            }
        }
    }
}

#[cfg(test)]
mod tests;
