//! One device connection's sans-IO state machine (ARCHITECTURE.md, "The
//! session contract"): CoAP messages and `now` in; CoAP bytes, token
//! exchanges for the control plane, the next deadline and the close
//! decision out. No socket, no clock, no executor: the hub is called
//! through the [`Hub`] trait, whose embedded implementation answers from
//! memory, and slow OAuth exchanges leave as [`Exchange`] requests whose
//! answers come back through [`Session::handle_exchange`].
//!
//! It handles RFC 8323 signalling (CSM first, Ping/Pong, Release and
//! Abort from the device), keepalive (spec §2.4), the OCF cloud resources
//! of spec §5 (sign-up, sign-off, sign-in, sign-out, token refresh,
//! publish, unpublish, selector, discovery, time), the authorization gate
//! of spec §4.6, the token deadline of spec §4.7, and as a CoAP client of
//! the device: its request queue (spec §2.6, `requests`), the device
//! twin (spec §6, `twin`) and hub commands (spec §7, `commands`).

mod commands;
mod error;
mod keepalive;
mod ocf_handlers;
mod requests;
mod twin;

use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::auth::jwks::Jwks;
use crate::auth::jwt::{TokenValidator, ValidationSettings};
use crate::auth::provider::{ExchangeRequest, OAuthError, TokenProvider, TokenSet};
use crate::auth::validator::SharedValidator;
use crate::coap::{deframer, option, signal, Code, MessageRef, MessageWriter};
use crate::hub::{
    AuthContext, CommandResult, ConnectionRef, Content, Hub, HubMessage, MemoryHub, Protocol,
    Status,
};
use crate::ocf::{self, ContentFormat};
use requests::Requests;
use twin::Twin;

pub use error::{SessionError, WireAction};
use keepalive::Keepalive;
use ocf_handlers::SignedIn;

/// Settings and services shared by every session of a shard.
#[derive(Clone)]
pub struct SessionConfig {
    /// Largest inbound Len accepted (spec §2.2, `coap.max_message_size`).
    pub max_message_size: usize,
    /// `coap.keepalive_timeout` (spec §2.4).
    pub keepalive_timeout: Duration,
    /// `authorization.owner_cache_expiration` (spec §4.7).
    pub owner_cache_expiration: Duration,
    /// spec §4.3 step 3: with `client_auth = "identity"` the certificate's
    /// device ID is the device, whatever the request says. With `any` and
    /// `none` the certificate carries no device ID and the token's claim or
    /// the request's `di` decide (spec §14 item 1: the reference cannot sign
    /// in with an `any` certificate at all; we let it).
    pub certificate_device_id: bool,
    /// spec §8.1 `connection.protocol`.
    pub protocol: Protocol,
    /// This process's random ID (spec §8.1 `service_id`).
    pub service_id: Arc<str>,
    /// `ep` of discovered links (spec §5.9), e.g. `coaps+tcp://host:5684`;
    /// set once the listener's address is known.
    pub discovery_endpoint: Arc<OnceLock<String>>,
    pub hub: Arc<dyn Hub>,
    pub validator: Arc<SharedValidator>,
    /// OAuth providers by `authprovider` name; the first is used when a
    /// refresh names none (spec §4.8).
    pub providers: Vec<Arc<dyn TokenProvider>>,
    /// `coap.require_batch_observe` (spec §6.6, checklist item 47): a
    /// device without a batch-observable `/oic/res` is disconnected
    /// instead of being observed resource by resource.
    pub require_batch_observe: bool,
    /// `coap.close_linger`: how long a connection whose session ended with
    /// an answer for the device waits for the device to close (spec
    /// Appendix A.7; see [`CloseReason::lingers`]).
    pub close_linger: Duration,
    /// `coap.tls.disconnect_on_expired_certificate` (spec §3.5): the
    /// transport glue sets each session's certificate deadline
    /// ([`Session::set_certificate_deadline`]) from the earliest NotAfter
    /// of the device's chain and of `ca_not_after`.
    pub disconnect_on_expired_certificate: bool,
    /// The earliest NotAfter of the configured CA file, when certificates
    /// are checked against it.
    pub ca_not_after: Option<SystemTime>,
}

impl Default for SessionConfig {
    /// A session with an empty hub, no token keys and no providers: it
    /// serves signalling and time, and refuses every sign-in.
    fn default() -> Self {
        let validator = TokenValidator::new(Jwks::default(), ValidationSettings::default())
            .expect("the default validation settings are valid");
        SessionConfig {
            max_message_size: 262_144,
            keepalive_timeout: Duration::from_secs(20),
            owner_cache_expiration: Duration::from_secs(60),
            certificate_device_id: true,
            protocol: Protocol::CoapsTcp,
            service_id: Arc::from("00000000-0000-0000-0000-000000000000"),
            discovery_endpoint: Arc::new(OnceLock::new()),
            hub: Arc::new(MemoryHub::new()),
            validator: Arc::new(SharedValidator::new(validator)),
            providers: Vec::new(),
            require_batch_observe: false,
            close_linger: Duration::from_secs(2),
            disconnect_on_expired_certificate: false,
            ca_not_after: None,
        }
    }
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("max_message_size", &self.max_message_size)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field("owner_cache_expiration", &self.owner_cache_expiration)
            .field("certificate_device_id", &self.certificate_device_id)
            .field("providers", &self.providers.len())
            .field("require_batch_observe", &self.require_batch_observe)
            .finish_non_exhaustive()
    }
}

/// Who is at the other end, as far as the transport could tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// From an OCF identity certificate (spec §3.3), lower-case.
    pub device_id: Option<Box<str>>,
    /// How the hub addresses this connection (spec §4.9, §14 item 13).
    pub connection: ConnectionRef,
    /// The device's `ip:port` as seen here: the connection ID of spec §8.3.
    pub remote: Box<str>,
}

/// An OAuth exchange the session needs (spec §4.8): the driver hands it to
/// `providers[provider]` and feeds the answer to
/// [`Session::handle_exchange`] with the same `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub id: u64,
    pub provider: usize,
    pub request: ExchangeRequest,
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
    /// The session deadline passed without a refresh (spec §4.7).
    TokenExpired,
    /// A request to `/oic/sec/*` failed (spec §5.0 close-on-error).
    SecurityRequestFailed,
    /// The twin cannot be synchronised (spec §6.6, §6.7): an observation
    /// failed, the hub refused a notification, or `/oic/res` is not batch
    /// observable while batch observation is required (checklist item 47).
    TwinSyncFailed(String),
    /// The device's certificate, or the CA it chains to, expired (spec
    /// §3.5, checklist item 12); we sent Release.
    CertificateExpired,
}

impl CloseReason {
    /// Whether the session ended by sending the device something it must
    /// read (an error answer, an Abort), so that the transport should let
    /// the device read it before closing: a device that finds the answer
    /// and the close in one read drops the answer (spec Appendix A.7).
    pub fn lingers(&self) -> bool {
        matches!(
            self,
            CloseReason::Aborted(_)
                | CloseReason::Unauthorized
                | CloseReason::SecurityRequestFailed
        )
    }
}

/// Timers as data (STYLE.md §6): one deadline per kind.
#[derive(Debug, Clone, Copy)]
enum Timer {
    Keepalive = 0,
    /// spec §4.7: the signed-in session's deadline.
    Deadline = 1,
    /// Our outstanding request waits for the device's answer (spec §2.6,
    /// §7.2: `keepalive_timeout`).
    DeviceRequest = 2,
    /// Exchanged tokens wait for the issuer's new keys (spec §4.1).
    KeyRetry = 3,
    /// spec §3.5: the device's certificate chain (or the CA) expires.
    Certificate = 4,
}
const TIMERS: usize = 5;

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
    /// How much of `out` `poll_transmit` has handed over already: it hands
    /// one message per call (spec Appendix A.6).
    out_sent: usize,
    timers: [Option<Instant>; TIMERS],
    keepalive: Keepalive,
    peer_csm: PeerCsm,
    /// Source of the tokens we generate (spec §2.2: 8 random bytes).
    token_state: u64,
    closed: Option<CloseReason>,
    /// spec §4.6: only a verified token puts a value here.
    signed_in: Option<SignedIn>,
    /// OAuth exchanges (spec §4.8): only while a device signs up or
    /// refreshes, boxed so an idle session does not carry them.
    exchanges: Option<Box<ocf_handlers::Exchanges>>,
    /// Our requests to the device, one outstanding at a time (spec §2.6);
    /// `None` when there are none.
    requests: Option<Box<Requests>>,
    /// The twin synchronisation (spec §6), while the twin is kept.
    twin: Option<Box<Twin>>,
    /// Counts inbound messages: the sequence of spec §8.3 that orders this
    /// connection's notifications in the hub.
    inbound: u64,
    /// The `now` of the latest input, for deadlines set by handlers, and
    /// the wall clock at that moment.
    now: Instant,
    wall: SystemTime,
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
            out_sent: 0,
            timers: [None; TIMERS],
            peer_csm: PeerCsm::default(),
            token_state: seed,
            closed: None,
            signed_in: None,
            exchanges: None,
            requests: None,
            twin: None,
            inbound: 0,
            now,
            wall: SystemTime::UNIX_EPOCH,
        };
        let token = session.next_token();
        // spec §2.3: the CSM carries no options (neither Max-Message-Size nor
        // Block-Wise-Transfer).
        signal::write_csm(&mut session.out, &token, None, false);
        session.arm_keepalive();
        session
    }

    pub fn config(&self) -> &Rc<SessionConfig> {
        &self.config
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
        self.now = now;
        self.wall = wall;
        self.inbound += 1;
        // spec §2.4 step 1: every inbound frame counts as activity.
        self.keepalive.on_activity(now);
        let result = if msg.code.is_signal() {
            self.handle_signal(msg)
        } else if msg.code.is_request() {
            self.handle_request(wall, msg)
        } else if msg.code.is_empty() {
            // spec §2.7/§4.6: an Empty message needs a signed-in session;
            // signed in, it would cancel a client-API observation (§5.11),
            // of which there are none.
            if self.is_signed_in(wall) {
                Ok(())
            } else {
                Err(SessionError::Unauthorized)
            }
        } else {
            self.handle_response(msg);
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
        self.now = now;
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
        if self.timers[Timer::Deadline as usize].is_some_and(|at| now >= at) {
            self.timers[Timer::Deadline as usize] = None;
            tracing::debug!("closing a connection whose token deadline passed (spec §4.7)");
            self.closed = Some(CloseReason::TokenExpired);
        }
        if self.timers[Timer::KeyRetry as usize].is_some_and(|at| now >= at) {
            self.timers[Timer::KeyRetry as usize] = None;
            self.retry_awaiting_keys();
        }
        if self.timers[Timer::DeviceRequest as usize].is_some_and(|at| now >= at) {
            self.request_timed_out();
        }
        if self.closed.is_none()
            && self.timers[Timer::Certificate as usize].is_some_and(|at| now >= at)
        {
            // spec §3.5, checklist item 12: a certificate that is no longer
            // valid ends the session, as a handshake with it would fail.
            tracing::info!(
                device_id = self.auth_context().map(|c| c.device_id.as_str()).unwrap_or(""),
                peer = %self.identity.remote,
                "the device's certificate expired; closing the connection"
            );
            let token = self.next_token();
            signal::write_release(&mut self.out, &token);
            self.closed = Some(CloseReason::CertificateExpired);
        }
    }

    /// spec §3.5: the session ends (Release, then close) at `at`, when the
    /// device's certificate chain or its CA expires.
    pub fn set_certificate_deadline(&mut self, at: Instant) {
        self.timers[Timer::Certificate as usize] = Some(at);
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

    /// The transport is gone: the session ends and a signed-in device goes
    /// OFFLINE (spec §8.2), whatever closed it.
    pub fn transport_closed(&mut self, reason: String) {
        if self.closed.is_none() {
            self.closed = Some(CloseReason::Transport(reason));
        }
        if let Some(signed_in) = self.signed_in.take() {
            // Before OFFLINE: the command sent and not answered is
            // UNAVAILABLE, those never sent go back to the hub (spec §7.3).
            self.leave_session(
                &signed_in.ctx,
                false,
                "the connection closed before the device answered",
            );
            self.config
                .hub
                .set_offline(&signed_in.ctx.device_id, self.identity.connection);
        }
        self.requests = None;
        self.twin = None;
    }

    /// A command or twin setting from the hub (spec §7).
    pub fn handle_hub_message(&mut self, now: Instant, wall: SystemTime, message: HubMessage) {
        self.now = now;
        self.wall = wall;
        match message {
            HubMessage::Command(command) => self.accept_command(command),
            HubMessage::Twin { enabled, force } => {
                if self.closed.is_some() || self.signed_in.is_none() {
                    return;
                }
                // spec §7.5: disabling stops every observation (GET
                // Observe=1, checklist item 60); forcing rebuilds without
                // ETags; enabling starts the twin if it is not kept yet.
                if !enabled || force {
                    self.stop_twin(true);
                }
                if enabled && (force || self.twin.is_none()) {
                    self.start_twin(force);
                }
            }
        }
    }

    /// The twin synchronisation state of spec §6.9 as this session sees
    /// it: `None` while no twin is kept, else whether it is in sync.
    pub fn twin_in_sync(&self) -> Option<bool> {
        self.twin.as_ref().map(|t| t.is_in_sync())
    }

    /// The next OAuth exchange for the driver to start.
    pub fn poll_exchange(&mut self) -> Option<Exchange> {
        let queued = &mut self.exchanges.as_mut()?.queued;
        (!queued.is_empty()).then(|| queued.remove(0))
    }

    /// The signed-in device's authorization context (spec §4.6), if any.
    pub fn auth_context(&self) -> Option<&AuthContext> {
        self.signed_in.as_ref().map(|s| &s.ctx)
    }

    /// Moves the next queued CoAP message into `buf`; true when there was
    /// one. One message per call, because the transport seals each call's
    /// bytes in TLS records of their own: IoTivity-Lite on mbedTLS takes one
    /// CoAP message out of each record it decrypts and leaves the rest of
    /// the record waiting until the socket is readable again, which keeps
    /// such a device one message behind (spec Appendix A.6).
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool {
        let rest = &self.out[self.out_sent..];
        if rest.is_empty() {
            return false;
        }
        // Our own frames are well formed, so the header measures them; the
        // fallback (hand over the rest) cannot happen but loses nothing.
        let len = match deframer::frame_len(rest, usize::MAX) {
            Ok(Some(len)) if len > 0 => len,
            _ => rest.len(),
        };
        if len == self.out.len() && buf.is_empty() {
            // The common case, one message queued: hand the buffer over.
            std::mem::swap(buf, &mut self.out);
        } else {
            buf.extend_from_slice(&rest[..len]);
            self.out_sent += len;
            if self.out_sent < self.out.len() {
                return true;
            }
        }
        // An idle session keeps no buffer.
        self.out = Vec::new();
        self.out_sent = 0;
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
        self.handle_ocf_request(wall, msg)
    }

    /// The one place where an error becomes wire behaviour.
    fn apply(&mut self, error: &SessionError, token: &[u8]) {
        self.apply_closing(error, token, false);
    }

    /// As [`apply`](Self::apply); `close_anyway` closes after the response
    /// whatever the error (spec §5.0 close-on-error for `/oic/sec/*`).
    fn apply_closing(&mut self, error: &SessionError, token: &[u8], close_anyway: bool) {
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
                } else if close_anyway {
                    self.closed = Some(CloseReason::SecurityRequestFailed);
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

#[cfg(test)]
mod ocf_tests;

#[cfg(test)]
mod twin_tests;

#[cfg(test)]
mod command_tests;
