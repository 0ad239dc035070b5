//! The per-connection byte pump: TLS (rustls's unbuffered API) between the
//! wire and the application [`Connection`], with no socket and no clock in it.
//!
//! Why the unbuffered API: rustls's buffered `ServerConnection` keeps a 4 KiB
//! read buffer per connection for as long as the connection lives. Here the
//! shard hands every read in a buffer it owns; a connection keeps bytes only
//! while a TLS record or an application frame is incomplete (`tls_tail`,
//! `plain_tail`), so an idle device costs its TLS keys and its session, not
//! buffers (ARCHITECTURE.md "Memory per connection").
//!
//! The same driver serves plain TCP (`tls.enabled = false`) by passing bytes
//! straight through, and it is what an in-memory transport drives.
//!
//! It also drives the client side of a connection ([`Driver::tls_client`]):
//! the same pump over rustls's unbuffered client, so a load generator (the
//! bench's device fleet) runs its devices on the same shards as the gateway
//! runs its sessions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::{CipherSuite, ClientConfig, CommonState, ProtocolVersion, ServerConfig};

use crate::message::ConnId;

/// What the runtime tells the application about a new connection, once the
/// TLS handshake (if any) has completed.
#[derive(Debug)]
pub struct ConnInfo<'a> {
    pub peer_addr: SocketAddr,
    pub local_addr: SocketAddr,
    /// Index of the shard that owns the connection.
    pub shard: usize,
    /// The connection's identity: what other threads address messages to
    /// (`ShardSender::send`), delivered by [`Connection::on_message`].
    pub id: ConnId,
    /// The client's certificate chain, leaf first (mutual TLS only).
    pub peer_certificates: Option<&'a [CertificateDer<'static>]>,
    pub tls_version: Option<ProtocolVersion>,
    pub cipher_suite: Option<CipherSuite>,
    /// The tag the connection was opened with ([`Driver::tls_client`],
    /// the runtime's `connect`); 0 for an accepted connection.
    pub tag: u64,
}

/// Why a connection ended, as seen by the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The application asked to close (after its last bytes were sent).
    Local,
    /// The peer closed the TCP connection or sent a TLS close_notify.
    PeerClosed,
    /// The TLS layer failed (bad record, failed handshake, ...).
    Tls(String),
    /// A socket error.
    Io(String),
    /// The TLS handshake did not finish within the handshake timeout.
    HandshakeTimeout,
    /// The gateway is shutting down.
    Shutdown,
    /// The peer took none of the bytes waiting for it (at the runtime's
    /// `max_pending_tx`) within `write_stall_timeout`.
    WriteStalled,
}

/// The application side of one connection: a sans-IO state machine fed with
/// plaintext and asked for plaintext.
pub trait Connection: 'static {
    /// What other threads (the control plane) send to this connection
    /// through the runtime's `ShardSender`.
    type Message: Send + 'static;

    /// Plaintext received from the peer. Returns how many bytes were consumed;
    /// the runtime keeps the rest (an incomplete frame) and presents it again,
    /// followed by newer bytes, on the next call.
    fn on_data(&mut self, now: Instant, data: &[u8]) -> usize;
    /// Called when the deadline from [`Connection::poll_timeout`] has passed.
    fn on_timeout(&mut self, now: Instant);
    /// A message addressed to this connection's [`ConnId`]. Afterwards the
    /// runtime sends what the application queued, re-arms its deadline and
    /// closes the connection if it is closed, as after `on_data`.
    fn on_message(&mut self, now: Instant, msg: Self::Message);
    /// The gateway is shutting down: queue any goodbye (e.g. CoAP Release)
    /// and close.
    fn on_shutdown(&mut self, now: Instant);
    /// Append plaintext to send. Returns true when something was appended.
    /// The runtime calls it until it returns false and seals the bytes of
    /// each call in TLS records of their own, so an application whose
    /// peer must find one message per record (IoTivity-Lite, spec
    /// Appendix A.6) appends one message per call.
    fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool;
    /// The next instant at which `on_timeout` must run.
    fn poll_timeout(&self) -> Option<Instant>;
    /// True once the application wants the connection closed (its final
    /// bytes are sent first).
    fn is_closed(&self) -> bool;
    /// The transport is gone; called exactly once, last.
    fn on_closed(&mut self, now: Instant, reason: &CloseReason);
}

/// Creates the application side of each connection on one shard.
pub trait Service: 'static {
    type Conn: Connection;
    fn accept(&self, info: &ConnInfo<'_>, now: Instant) -> Self::Conn;
    /// A connection this shard opened (the runtime's `connect`) ended
    /// before its application existed: the TCP connect or the TLS
    /// handshake failed, or the handshake timed out. `tag` is the one it
    /// was opened with.
    fn connect_failed(&self, _tag: u64, _now: Instant, _reason: &CloseReason) {}
}

/// Where a connection sits, for [`ConnInfo`].
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    pub peer_addr: SocketAddr,
    pub local_addr: SocketAddr,
    /// The shard is `id.shard`.
    pub id: ConnId,
}

impl Endpoint {
    fn info<'a>(&self) -> ConnInfo<'a> {
        ConnInfo {
            peer_addr: self.peer_addr,
            local_addr: self.local_addr,
            shard: self.id.shard as usize,
            id: self.id,
            peer_certificates: None,
            tls_version: None,
            cipher_suite: None,
            tag: 0,
        }
    }
}

/// The TLS side of a connection. The client side is boxed: it is the rare
/// one (load generators), and the gateway's connections stay the size of
/// a server connection (inline, as before: no extra allocation per
/// gateway connection).
#[allow(clippy::large_enum_variant)]
enum Tls {
    Server(UnbufferedServerConnection),
    Client(Box<ClientTls>),
}

struct ClientTls {
    conn: UnbufferedClientConnection,
    tag: u64,
}

/// rustls's two unbuffered connections share one state machine but not one
/// type: this lets one pump drive both.
trait Records {
    type Data;
    fn records<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn common(&self) -> &CommonState;
}

impl Records for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn records<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &CommonState {
        self
    }
}

impl Records for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn records<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &CommonState {
        self
    }
}

/// One connection's transport state. Kept small on purpose: buffers are
/// empty `Vec`s (no heap) whenever nothing is incomplete or pending.
pub struct Driver<C> {
    tls: Option<Tls>,
    app: Option<C>,
    /// Bytes of an incomplete TLS record (TLS mode only).
    tls_tail: Vec<u8>,
    /// Bytes of an incomplete application frame.
    plain_tail: Vec<u8>,
    /// The peer sent close_notify; we answer with ours and close.
    peer_closed: bool,
    closed: Option<CloseReason>,
}

/// Largest TLS plaintext record (RFC 8446 §5.1); encryption goes in chunks of
/// this so the output buffer growth is bounded per step.
const MAX_FRAGMENT: usize = 16 * 1024;

impl<C: Connection> Driver<C> {
    /// A TLS connection; the application is created when the handshake ends.
    pub fn tls(config: Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(Self {
            tls: Some(Tls::Server(UnbufferedServerConnection::new(config)?)),
            ..Self::plain()
        })
    }

    /// The client side of a TLS connection to `name`: [`Driver::start`]
    /// sends the ClientHello; the application is created (with `tag` in
    /// its [`ConnInfo`]) when the handshake ends.
    pub fn tls_client(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        tag: u64,
    ) -> Result<Self, rustls::Error> {
        Ok(Self {
            tls: Some(Tls::Client(Box::new(ClientTls {
                conn: UnbufferedClientConnection::new(config, name)?,
                tag,
            }))),
            ..Self::plain()
        })
    }

    /// A plain TCP connection; call [`Driver::start`] right after accepting.
    pub fn plain() -> Self {
        Self {
            tls: None,
            app: None,
            tls_tail: Vec::new(),
            plain_tail: Vec::new(),
            peer_closed: false,
            closed: None,
        }
    }

    pub fn is_handshaking(&self) -> bool {
        self.app.is_none()
    }

    /// Set once nothing more will be sent; the caller flushes `out` and
    /// closes the socket.
    pub fn closed(&self) -> Option<&CloseReason> {
        self.closed.as_ref()
    }

    /// The application's next deadline (none while handshaking: the runtime
    /// keeps the handshake timeout itself).
    pub fn deadline(&self) -> Option<Instant> {
        self.app.as_ref().and_then(|app| app.poll_timeout())
    }

    pub fn app(&self) -> Option<&C> {
        self.app.as_ref()
    }

    /// The tag of a client connection ([`Driver::tls_client`]).
    pub fn client_tag(&self) -> Option<u64> {
        match &self.tls {
            Some(Tls::Client(c)) => Some(c.tag),
            _ => None,
        }
    }

    /// Bytes held for incomplete records/frames (for memory accounting).
    pub fn buffered_bytes(&self) -> usize {
        self.tls_tail.capacity() + self.plain_tail.capacity()
    }

    /// Plain mode: create the application at once so that it can speak
    /// first (the gateway's CSM, RFC 8323 §5.3). Client TLS: the
    /// ClientHello.
    pub fn start<S: Service<Conn = C>>(
        &mut self,
        service: &S,
        at: Endpoint,
        now: Instant,
        out: &mut Vec<u8>,
    ) {
        if self.app.is_some() || self.closed.is_some() {
            return;
        }
        match self.tls {
            None => {
                self.app = Some(service.accept(&at.info(), now));
                self.flush_plain(now, out);
            }
            Some(Tls::Client(_)) => {
                self.pump(service, at, now, &mut [], out);
            }
            Some(Tls::Server(_)) => {}
        }
    }

    /// Bytes arrived from the wire. `data` is a scratch buffer the driver may
    /// modify in place (TLS decryption). Wire bytes to send are appended to
    /// `out`.
    pub fn receive<S: Service<Conn = C>>(
        &mut self,
        service: &S,
        at: Endpoint,
        now: Instant,
        data: &mut [u8],
        out: &mut Vec<u8>,
    ) {
        if self.closed.is_some() {
            return;
        }
        if self.tls.is_none() {
            if let Some(app) = self.app.as_mut() {
                deliver(app, &mut self.plain_tail, now, data);
            }
            self.flush_plain(now, out);
            return;
        }
        if self.tls_tail.is_empty() {
            let used = self.pump(service, at, now, data, out);
            if used < data.len() {
                self.tls_tail.extend_from_slice(&data[used..]);
            }
        } else {
            let mut tail = std::mem::take(&mut self.tls_tail);
            tail.extend_from_slice(data);
            let used = self.pump(service, at, now, &mut tail, out);
            tail.drain(..used);
            if !tail.is_empty() {
                self.tls_tail = tail;
            }
        }
    }

    /// The deadline passed: let the application act, then send what it queued.
    pub fn on_timeout<S: Service<Conn = C>>(
        &mut self,
        service: &S,
        at: Endpoint,
        now: Instant,
        out: &mut Vec<u8>,
    ) {
        if let (Some(app), None) = (self.app.as_mut(), &self.closed) {
            app.on_timeout(now);
            self.flush(service, at, now, out);
        }
    }

    /// A message for the application: it acts, then what it queued is sent
    /// (appended to `out`). Returns false, dropping the message, when there
    /// is no application to take it (still handshaking, or closed).
    pub fn on_message<S: Service<Conn = C>>(
        &mut self,
        service: &S,
        at: Endpoint,
        now: Instant,
        msg: C::Message,
        out: &mut Vec<u8>,
    ) -> bool {
        match (self.app.as_mut(), &self.closed) {
            (Some(app), None) => {
                app.on_message(now, msg);
                self.flush(service, at, now, out);
                true
            }
            _ => false,
        }
    }

    /// Graceful shutdown: the application says goodbye, then we close.
    pub fn shutdown<S: Service<Conn = C>>(
        &mut self,
        service: &S,
        at: Endpoint,
        now: Instant,
        out: &mut Vec<u8>,
    ) {
        if self.closed.is_some() {
            return;
        }
        match self.app.as_mut() {
            Some(app) => {
                app.on_shutdown(now);
                self.flush(service, at, now, out);
                if self.closed.is_none() {
                    self.close(now, CloseReason::Shutdown, out);
                }
            }
            None => self.close(now, CloseReason::Shutdown, out),
        }
    }

    /// Send whatever the application has queued (after a command from
    /// outside the connection, for example).
    pub fn flush<S: Service<Conn = C>>(
        &mut self,
        service: &S,
        at: Endpoint,
        now: Instant,
        out: &mut Vec<u8>,
    ) {
        if self.tls.is_some() {
            self.pump(service, at, now, &mut [], out);
        } else {
            self.flush_plain(now, out);
        }
    }

    /// The transport is gone (socket error, EOF, handshake timeout): tell the
    /// application once.
    pub fn abort(&mut self, now: Instant, reason: CloseReason) {
        if self.closed.is_none() {
            if let Some(app) = self.app.as_mut() {
                app.on_closed(now, &reason);
            }
            self.closed = Some(reason);
        }
    }

    /// Close from our side: TLS close_notify when possible, then done.
    fn close(&mut self, now: Instant, reason: CloseReason, out: &mut Vec<u8>) {
        match self.tls.as_mut() {
            Some(Tls::Server(tls)) => close_notify(tls, out),
            Some(Tls::Client(c)) => close_notify(&mut c.conn, out),
            None => {}
        }
        self.abort(now, reason);
    }

    fn flush_plain(&mut self, now: Instant, out: &mut Vec<u8>) {
        let Some(app) = self.app.as_mut() else { return };
        while app.poll_transmit(out) {}
        if app.is_closed() {
            self.abort(now, CloseReason::Local);
        }
    }

    /// Runs rustls over `incoming` until it needs more bytes; returns how
    /// many bytes of `incoming` were consumed.
    fn pump<S: Service<Conn = C>>(
        &mut self,
        service: &S,
        at: Endpoint,
        now: Instant,
        incoming: &mut [u8],
        out: &mut Vec<u8>,
    ) -> usize {
        // Taken out while it runs, so the pump can borrow the rest of the
        // driver (the application, the tails) alongside it.
        let Some(mut tls) = self.tls.take() else {
            return 0;
        };
        let used = match &mut tls {
            Tls::Server(conn) => self.pump_with(conn, 0, service, at, now, incoming, out),
            Tls::Client(c) => self.pump_with(&mut c.conn, c.tag, service, at, now, incoming, out),
        };
        self.tls = Some(tls);
        used
    }

    #[allow(clippy::too_many_arguments)]
    fn pump_with<T: Records, S: Service<Conn = C>>(
        &mut self,
        tls: &mut T,
        tag: u64,
        service: &S,
        at: Endpoint,
        now: Instant,
        incoming: &mut [u8],
        out: &mut Vec<u8>,
    ) -> usize {
        let mut used = 0;
        // Bounded: every iteration either consumes input, emits output, or
        // breaks; the bound only guards against a library bug spinning us.
        for _ in 0..10_000 {
            let UnbufferedStatus { discard, state } = tls.records(&mut incoming[used..]);
            let mut discard = discard;
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    used += discard;
                    self.fail(tls, now, e, out);
                    return used;
                }
            };
            match state {
                ConnectionState::ReadTraffic(mut read) => {
                    while let Some(record) = read.next_record() {
                        match record {
                            Ok(record) => {
                                discard += record.discard;
                                if let Some(app) = self.app.as_mut() {
                                    deliver(app, &mut self.plain_tail, now, record.payload);
                                } else {
                                    // TLS 1.3: the client's first records
                                    // can come with its Finished, before
                                    // rustls reports WriteTraffic (where the
                                    // application starts). Keep them for it.
                                    self.plain_tail.extend_from_slice(record.payload);
                                }
                            }
                            Err(e) => {
                                used += discard;
                                self.fail(tls, now, e, out);
                                return used;
                            }
                        }
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    let start = out.len();
                    out.resize(start + 4096, 0);
                    let n = match encode.encode(&mut out[start..]) {
                        Ok(n) => n,
                        Err(EncodeError::InsufficientSize(need)) => {
                            out.resize(start + need.required_size, 0);
                            encode.encode(&mut out[start..]).unwrap_or(0)
                        }
                        Err(_) => 0,
                    };
                    out.truncate(start + n);
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    // `out` is ours and is sent by the caller after this
                    // returns, so the records count as transmitted now.
                    transmit.done();
                }
                ConnectionState::BlockedHandshake => {
                    used += discard;
                    break;
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                }
                ConnectionState::Closed => {
                    used += discard;
                    self.abort(now, CloseReason::PeerClosed);
                    break;
                }
                ConnectionState::WriteTraffic(mut write) => {
                    used += discard;
                    if self.app.is_none() {
                        // Handshake complete: the application starts here so
                        // that the client certificate is known (spec §3.3).
                        let common = tls.common();
                        let info = ConnInfo {
                            peer_certificates: common.peer_certificates(),
                            tls_version: common.protocol_version(),
                            cipher_suite: common.negotiated_cipher_suite().map(|s| s.suite()),
                            tag,
                            ..at.info()
                        };
                        let app = self.app.insert(service.accept(&info, now));
                        // Plaintext that arrived with the handshake's last
                        // flight goes to the application first.
                        if !self.plain_tail.is_empty() {
                            let early = std::mem::take(&mut self.plain_tail);
                            deliver(app, &mut self.plain_tail, now, &early);
                        }
                        continue;
                    }
                    let Some(app) = self.app.as_mut() else { break };
                    // Each call's bytes go in TLS records of their own
                    // (several records still share the caller's one
                    // write): a peer that takes one application message
                    // out of each record, as IoTivity-Lite on mbedTLS
                    // does, then reads every message when it arrives
                    // (spec Appendix A.6).
                    let mut plain = Vec::new();
                    while app.poll_transmit(&mut plain) {
                        for chunk in plain.chunks(MAX_FRAGMENT) {
                            encrypt_into(&mut write, chunk, out);
                        }
                        plain.clear();
                    }
                    if app.is_closed() || self.peer_closed {
                        let start = out.len();
                        out.resize(start + 64, 0);
                        let n = write.queue_close_notify(&mut out[start..]).unwrap_or(0);
                        out.truncate(start + n);
                        let reason = if self.peer_closed {
                            CloseReason::PeerClosed
                        } else {
                            CloseReason::Local
                        };
                        self.abort(now, reason);
                    }
                    break;
                }
                _ => {
                    // Early data is not enabled; any other future state is
                    // unexpected: close rather than guess.
                    used += discard;
                    self.abort(now, CloseReason::Tls("unexpected TLS state".into()));
                    break;
                }
            }
            used += discard;
        }
        used
    }

    /// A TLS error: rustls queued an alert for the peer; send it and close.
    fn fail<T: Records>(
        &mut self,
        tls: &mut T,
        now: Instant,
        error: rustls::Error,
        out: &mut Vec<u8>,
    ) {
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = tls.records(&mut []).state {
            let start = out.len();
            out.resize(start + 256, 0);
            let n = encode.encode(&mut out[start..]).unwrap_or(0);
            out.truncate(start + n);
        }
        self.abort(now, CloseReason::Tls(error.to_string()));
    }
}

/// Queues a close_notify when the connection can still write.
fn close_notify<T: Records>(tls: &mut T, out: &mut Vec<u8>) {
    if let Ok(ConnectionState::WriteTraffic(mut w)) = tls.records(&mut []).state {
        let start = out.len();
        out.resize(start + 64, 0);
        let n = w.queue_close_notify(&mut out[start..]).unwrap_or(0);
        out.truncate(start + n);
    }
}

fn encrypt_into<D>(
    write: &mut rustls::unbuffered::WriteTraffic<'_, D>,
    chunk: &[u8],
    out: &mut Vec<u8>,
) {
    let start = out.len();
    // Record overhead is at most a few dozen bytes (header, tag, padding).
    out.resize(start + chunk.len() + 64, 0);
    let n = match write.encrypt(chunk, &mut out[start..]) {
        Ok(n) => n,
        Err(EncryptError::InsufficientSize(need)) => {
            out.resize(start + need.required_size, 0);
            write.encrypt(chunk, &mut out[start..]).unwrap_or(0)
        }
        Err(_) => 0,
    };
    out.truncate(start + n);
}

/// Hands plaintext to the application, keeping only an incomplete frame.
fn deliver<C: Connection>(app: &mut C, plain_tail: &mut Vec<u8>, now: Instant, data: &[u8]) {
    if app.is_closed() {
        return;
    }
    if plain_tail.is_empty() {
        let n = app.on_data(now, data).min(data.len());
        if n < data.len() && !app.is_closed() {
            plain_tail.extend_from_slice(&data[n..]);
        }
    } else {
        plain_tail.extend_from_slice(data);
        let n = app.on_data(now, plain_tail).min(plain_tail.len());
        plain_tail.drain(..n);
        if plain_tail.is_empty() || app.is_closed() {
            // Give the memory back: an idle connection holds no buffer.
            *plain_tail = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    //! The driver against a rustls client in memory: no sockets, no executor.

    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use std::io::{Read, Write};

    /// Greets on start, then echoes whole lines ('\n'-terminated) upper-cased;
    /// "bye\n" closes.
    struct LineEcho {
        out: Vec<u8>,
        closed: bool,
        seen_closed: Option<CloseReason>,
    }

    impl Connection for LineEcho {
        /// A line to send; "close" closes instead.
        type Message = &'static str;

        fn on_data(&mut self, _now: Instant, data: &[u8]) -> usize {
            let mut used = 0;
            while let Some(pos) = data[used..].iter().position(|b| *b == b'\n') {
                let line = &data[used..used + pos + 1];
                if line == b"bye\n" {
                    self.closed = true;
                }
                self.out.extend(line.iter().map(u8::to_ascii_uppercase));
                used += pos + 1;
            }
            used
        }
        fn on_timeout(&mut self, _now: Instant) {}
        fn on_message(&mut self, _now: Instant, msg: &'static str) {
            if msg == "close" {
                self.closed = true;
            } else {
                self.out.extend_from_slice(msg.as_bytes());
            }
        }
        fn on_shutdown(&mut self, _now: Instant) {
            self.out.extend_from_slice(b"shutdown\n");
            self.closed = true;
        }
        /// One line per call: the driver seals each in records of its own.
        fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
            if self.out.is_empty() {
                return false;
            }
            let end = self
                .out
                .iter()
                .position(|b| *b == b'\n')
                .map_or(self.out.len(), |pos| pos + 1);
            out.extend(self.out.drain(..end));
            true
        }
        fn poll_timeout(&self) -> Option<Instant> {
            None
        }
        fn is_closed(&self) -> bool {
            self.closed
        }
        fn on_closed(&mut self, _now: Instant, reason: &CloseReason) {
            self.seen_closed = Some(reason.clone());
        }
    }

    struct Greeter;
    impl Service for Greeter {
        type Conn = LineEcho;
        fn accept(&self, info: &ConnInfo<'_>, _now: Instant) -> LineEcho {
            assert!(info.tls_version.is_some());
            LineEcho {
                out: b"hello\n".to_vec(),
                closed: false,
                seen_closed: None,
            }
        }
    }

    fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    fn endpoint() -> Endpoint {
        Endpoint {
            peer_addr: "127.0.0.1:1".parse().unwrap(),
            local_addr: "127.0.0.1:2".parse().unwrap(),
            id: crate::ConnId {
                shard: 0,
                slot: 0,
                generation: 1,
            },
        }
    }

    struct Pair {
        driver: Driver<LineEcho>,
        client: rustls::ClientConnection,
        now: Instant,
    }

    impl Pair {
        fn new() -> Pair {
            let (server, client) = configs();
            let client =
                rustls::ClientConnection::new(client, ServerName::try_from("localhost").unwrap())
                    .unwrap();
            Pair {
                driver: Driver::tls(server).unwrap(),
                client,
                now: Instant::now(),
            }
        }

        /// Moves bytes both ways until quiet; `chunk` limits each write to
        /// the driver (to split records).
        fn pump(&mut self, chunk: usize) {
            for _ in 0..100 {
                let mut wire = Vec::new();
                while self.client.wants_write() {
                    self.client.write_tls(&mut wire).unwrap();
                }
                let mut out = Vec::new();
                for piece in wire.chunks(chunk.max(1)) {
                    let mut scratch = piece.to_vec();
                    self.driver
                        .receive(&Greeter, endpoint(), self.now, &mut scratch, &mut out);
                }
                if wire.is_empty() {
                    self.driver.flush(&Greeter, endpoint(), self.now, &mut out);
                }
                if out.is_empty() && wire.is_empty() {
                    return;
                }
                let mut rd = &out[..];
                while !rd.is_empty() {
                    self.client.read_tls(&mut rd).unwrap();
                    self.client.process_new_packets().unwrap();
                }
            }
            panic!("no quiescence");
        }

        fn read_plain(&mut self) -> Vec<u8> {
            let mut buf = Vec::new();
            let _ = self.client.reader().read_to_end(&mut buf);
            buf
        }
    }

    #[test]
    fn data_sent_with_the_clients_finished_is_delivered() {
        // rustls buffers this and sends it in the same flight as its
        // Finished (TLS 1.3), so it reaches the driver in one read.
        let mut p = Pair::new();
        p.client.writer().write_all(b"early\n").unwrap();
        p.pump(usize::MAX);
        assert!(!p.driver.is_handshaking());
        assert_eq!(p.read_plain(), b"hello\nEARLY\n");
    }

    #[test]
    fn handshake_then_greeting_then_echo_with_records_split_byte_by_byte() {
        let mut p = Pair::new();
        p.pump(usize::MAX);
        assert!(!p.driver.is_handshaking());
        assert_eq!(p.read_plain(), b"hello\n");
        p.client.writer().write_all(b"one\ntw").unwrap();
        p.pump(1);
        assert_eq!(p.read_plain(), b"ONE\n");
        assert!(p.driver.buffered_bytes() > 0, "incomplete line kept");
        p.client.writer().write_all(b"o\n").unwrap();
        p.pump(3);
        assert_eq!(p.read_plain(), b"TWO\n");
        assert_eq!(
            p.driver.buffered_bytes(),
            0,
            "an idle connection keeps no buffer"
        );
    }

    /// TLS records in `wire` whose (outer) content type is application
    /// data (RFC 8446 §5.1, RFC 5246 §6.2.1).
    fn application_records(wire: &[u8]) -> usize {
        let mut n = 0;
        let mut rest = wire;
        while rest.len() >= 5 {
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            n += usize::from(rest[0] == 23);
            rest = &rest[(5 + len).min(rest.len())..];
        }
        n
    }

    #[test]
    fn each_message_goes_in_a_tls_record_of_its_own_in_one_write() {
        // spec Appendix A.6: IoTivity-Lite reads one message per record.
        let mut p = Pair::new();
        p.pump(usize::MAX);
        p.read_plain();
        p.client.writer().write_all(b"one\ntwo\nthree\n").unwrap();
        let mut wire = Vec::new();
        while p.client.wants_write() {
            p.client.write_tls(&mut wire).unwrap();
        }
        let mut out = Vec::new();
        p.driver
            .receive(&Greeter, endpoint(), p.now, &mut wire, &mut out);
        assert_eq!(application_records(&out), 3, "one record per message");
        let mut rd = &out[..];
        while !rd.is_empty() {
            p.client.read_tls(&mut rd).unwrap();
        }
        p.client.process_new_packets().unwrap();
        assert_eq!(p.read_plain(), b"ONE\nTWO\nTHREE\n");
    }

    #[test]
    fn application_close_sends_its_last_bytes_and_close_notify() {
        let mut p = Pair::new();
        p.pump(usize::MAX);
        p.read_plain();
        p.client.writer().write_all(b"bye\n").unwrap();
        p.pump(usize::MAX);
        assert_eq!(p.read_plain(), b"BYE\n");
        assert_eq!(p.driver.closed(), Some(&CloseReason::Local));
        assert!(p.client.process_new_packets().unwrap().peer_has_closed());
        // The application heard of the close, with its reason.
        let app = p.driver.app().expect("app");
        assert_eq!(app.seen_closed, Some(CloseReason::Local));
    }

    #[test]
    fn shutdown_lets_the_application_say_goodbye() {
        let mut p = Pair::new();
        p.pump(usize::MAX);
        p.read_plain();
        let mut out = Vec::new();
        p.driver.shutdown(&Greeter, endpoint(), p.now, &mut out);
        let mut rd = &out[..];
        while !rd.is_empty() {
            p.client.read_tls(&mut rd).unwrap();
        }
        p.client.process_new_packets().unwrap();
        assert_eq!(p.read_plain(), b"shutdown\n");
        assert!(p.driver.closed().is_some());
        let app = p.driver.app().expect("app");
        assert_eq!(app.seen_closed.as_ref(), p.driver.closed());
    }

    #[test]
    fn a_message_is_sent_encrypted_and_can_close_the_connection() {
        let mut p = Pair::new();
        let mut out = Vec::new();
        assert!(
            !p.driver
                .on_message(&Greeter, endpoint(), p.now, "early\n", &mut out),
            "no application while handshaking: dropped"
        );
        p.pump(usize::MAX);
        p.read_plain();
        assert!(p
            .driver
            .on_message(&Greeter, endpoint(), p.now, "from the hub\n", &mut out));
        let mut rd = &out[..];
        while !rd.is_empty() {
            p.client.read_tls(&mut rd).unwrap();
        }
        p.client.process_new_packets().unwrap();
        assert_eq!(p.read_plain(), b"from the hub\n");

        out.clear();
        assert!(p
            .driver
            .on_message(&Greeter, endpoint(), p.now, "close", &mut out));
        assert_eq!(p.driver.closed(), Some(&CloseReason::Local));
        let mut rd = &out[..];
        while !rd.is_empty() {
            p.client.read_tls(&mut rd).unwrap();
        }
        assert!(p.client.process_new_packets().unwrap().peer_has_closed());
        assert!(
            !p.driver
                .on_message(&Greeter, endpoint(), p.now, "late\n", &mut out),
            "closed: dropped"
        );
    }

    #[test]
    fn garbage_instead_of_a_client_hello_fails_the_connection() {
        let (server, _) = configs();
        let mut d: Driver<LineEcho> = Driver::tls(server).unwrap();
        let mut out = Vec::new();
        let mut junk = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        d.receive(&Greeter, endpoint(), Instant::now(), &mut junk, &mut out);
        assert!(matches!(d.closed(), Some(CloseReason::Tls(_))));
    }

    #[test]
    fn plain_mode_passes_bytes_through() {
        let mut d: Driver<LineEcho> = Driver::plain();
        let mut out = Vec::new();
        let now = Instant::now();
        d.start(&Greeter2, endpoint(), now, &mut out);
        assert_eq!(out, b"hello\n");
        out.clear();
        d.receive(&Greeter2, endpoint(), now, &mut b"ab".to_vec(), &mut out);
        d.receive(
            &Greeter2,
            endpoint(),
            now,
            &mut b"c\nbye\n".to_vec(),
            &mut out,
        );
        assert_eq!(out, b"ABC\nBYE\n");
        assert_eq!(d.closed(), Some(&CloseReason::Local));
    }

    struct Greeter2;
    impl Service for Greeter2 {
        type Conn = LineEcho;
        fn accept(&self, _info: &ConnInfo<'_>, _now: Instant) -> LineEcho {
            LineEcho {
                out: b"hello\n".to_vec(),
                closed: false,
                seen_closed: None,
            }
        }
    }
}
