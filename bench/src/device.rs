//! A simulated device: a blocking CoAP-over-TLS client (RFC 8323) on a std
//! `TcpStream` with a buffered rustls `ClientConnection`. It connects,
//! handshakes, waits for the gateway's CSM, sends requests (the OCF sign-up
//! and sign-in among them), answers Pings and the gateway's own requests,
//! and closes. Every blocking call has a socket timeout.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_gateway::auth::tls::{client_config_with, ClientOptions};
use coap_gateway::coap::{deframer, option, signal, Code, MessageRef, MessageWriter};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

use crate::ocf::{self, Registration};
use crate::twin::TwinModel;

/// Largest message we accept from the gateway.
const MAX_MESSAGE: usize = 1 << 20;
/// Messages skipped while waiting for a particular one.
const MAX_SKIPPED: usize = 16;

/// A client configuration presenting the device certificate, with session
/// resumption disabled so that every handshake is a full one.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>, String> {
    let config = client_config_with(ca, Some((cert, key)), &ClientOptions::default())
        .map_err(|e| e.to_string())?;
    let mut config = (*config).clone();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Where a connection attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// TCP connect.
    Connect,
    /// TLS handshake.
    Tls,
    /// Waiting for the gateway's first message (its CSM).
    Csm,
    /// A request after the CSM.
    Request,
    /// `POST /oic/sec/account` (spec §5.2).
    SignUp,
    /// `POST /oic/sec/session` with `login: true` (spec §5.4).
    SignIn,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Connect => "tcp_connect",
            Stage::Tls => "tls",
            Stage::Csm => "first_csm",
            Stage::Request => "request",
            Stage::SignUp => "sign_up",
            Stage::SignIn => "sign_in",
        }
    }
}

#[derive(Debug)]
pub struct DeviceError {
    pub stage: Stage,
    pub message: String,
}

impl DeviceError {
    pub fn new(stage: Stage, error: impl fmt::Display) -> Self {
        DeviceError {
            stage,
            message: error.to_string(),
        }
    }
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage.name(), self.message)
    }
}

/// How long each stage of a connection took.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub tcp_connect: Duration,
    /// From the TCP connection to the client's end of the handshake (it has
    /// the server's Finished and sent its own).
    pub tls: Duration,
    /// From there to the gateway's CSM: the server has verified the client
    /// certificate and Finished, and its session has spoken.
    pub first_csm: Duration,
    /// From there to the sign-up's 2.04 (our CSM and the request sent
    /// together), when the connection signed up.
    pub sign_up: Option<Duration>,
    /// From there to the sign-in's 2.04 (with our CSM when it is the
    /// connection's first request), when the connection signed in.
    pub sign_in: Option<Duration>,
}

impl Timings {
    pub fn total(&self) -> Duration {
        self.tcp_connect
            + self.tls
            + self.first_csm
            + self.sign_up.unwrap_or_default()
            + self.sign_in.unwrap_or_default()
    }
}

/// One inbound message, owned.
#[derive(Debug, Clone)]
pub struct Msg {
    pub code: Code,
    pub token: Vec<u8>,
    pub payload: Vec<u8>,
    /// The whole frame (for [`MessageRef::parse`]: options).
    pub frame: Vec<u8>,
}

/// What [`Device::service`] found on a non-blocking connection.
#[derive(Debug, Default, Clone, Copy)]
pub struct Serviced {
    pub pings_answered: u64,
    pub other_messages: u64,
    /// The gateway closed the connection (EOF, close_notify or an error).
    pub closed: bool,
}

pub struct Device {
    tls: ClientConnection,
    sock: TcpStream,
    /// Plaintext received and not yet parsed.
    buf: Vec<u8>,
    next_token: u64,
    /// The socket timeout of every blocking call.
    timeout: Duration,
    /// A device that keeps a twin answers the gateway's requests with it
    /// (`twin.rs`); otherwise only the local-endpoints `GET /oic/res`.
    pub twin: Option<TwinModel>,
    /// Plaintext being built for one TLS write.
    scratch: Vec<u8>,
}

/// What [`Device::pump`] did on a non-blocking connection.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pumped {
    pub pings_answered: u64,
    pub requests_answered: u64,
    /// Responses and signals nobody waits for.
    pub other_messages: u64,
    /// The gateway closed the connection (EOF, close_notify or an error).
    pub closed: bool,
}

impl Device {
    /// TCP connect, full TLS handshake, then the gateway's first message,
    /// which must be a CSM. `timeout` bounds every blocking call.
    pub fn connect(
        addr: SocketAddr,
        config: &Arc<ClientConfig>,
        timeout: Duration,
    ) -> Result<(Device, Timings), DeviceError> {
        let started = Instant::now();
        // A worker of `--procs` connects from its own source address.
        let sock = match crate::spread::source_ip() {
            Some(ip) => crate::spread::connect_from(ip, addr, timeout),
            None => TcpStream::connect_timeout(&addr, timeout),
        }
        .map_err(|e| DeviceError::new(Stage::Connect, e))?;
        let connected = Instant::now();
        let setup = |s: &TcpStream| -> io::Result<()> {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))
        };
        setup(&sock).map_err(|e| DeviceError::new(Stage::Connect, e))?;
        let name = ServerName::try_from("localhost").expect("a valid DNS name");
        let tls = ClientConnection::new(config.clone(), name)
            .map_err(|e| DeviceError::new(Stage::Tls, e))?;
        let mut device = Device {
            tls,
            sock,
            buf: Vec::new(),
            next_token: 1,
            timeout,
            twin: None,
            scratch: Vec::new(),
        };
        device
            .handshake()
            .map_err(|e| DeviceError::new(Stage::Tls, e))?;
        let handshaken = Instant::now();
        let first = device.recv().map_err(|e| DeviceError::new(Stage::Csm, e))?;
        if first.code != Code::CSM {
            return Err(DeviceError::new(
                Stage::Csm,
                format!("first message is {}, not a CSM", first.code),
            ));
        }
        let done = Instant::now();
        Ok((
            device,
            Timings {
                tcp_connect: connected - started,
                tls: handshaken - connected,
                first_csm: done - handshaken,
                sign_up: None,
                sign_in: None,
            },
        ))
    }

    fn handshake(&mut self) -> io::Result<()> {
        // Bounded: every round trip either progresses or hits the socket
        // timeout; the count guards against a peer that trickles bytes.
        for _ in 0..64 {
            if !self.tls.is_handshaking() {
                return self.flush();
            }
            let (read, written) = self.tls.complete_io(&mut self.sock)?;
            if read == 0 && written == 0 && self.tls.is_handshaking() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Err(io::Error::other("handshake did not finish"))
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            self.tls.write_tls(&mut self.sock)?;
        }
        Ok(())
    }

    /// Reads TLS records until a whole message is buffered (blocking).
    pub fn recv(&mut self) -> io::Result<Msg> {
        loop {
            if let Some(msg) = self.parse_one()? {
                return Ok(msg);
            }
            if self.read_plaintext()? == 0 {
                let n = self.tls.read_tls(&mut self.sock)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                self.process()?;
            }
        }
    }

    fn parse_one(&mut self) -> io::Result<Option<Msg>> {
        match deframer::next_message(&self.buf, MAX_MESSAGE) {
            Ok(Some((m, len))) => {
                let msg = Msg {
                    code: m.code,
                    token: m.token.to_vec(),
                    payload: m.payload.to_vec(),
                    frame: self.buf[..len].to_vec(),
                };
                self.buf.drain(..len);
                Ok(Some(msg))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
    }

    /// Moves decrypted bytes into `buf`; 0 when none are ready. EOF (a
    /// close_notify) is an error.
    fn read_plaintext(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 4096];
        match self.tls.reader().read(&mut chunk) {
            Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn process(&mut self) -> io::Result<()> {
        self.tls
            .process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.flush()
    }

    /// Writes `bytes` (whole CoAP messages) and flushes. Blocking.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tls.writer().write_all(bytes)?;
        self.flush()
    }

    fn token(&mut self) -> [u8; 8] {
        self.next_token += 1;
        self.next_token.to_be_bytes()
    }

    /// Waits for the response carrying `token`, answering Pings and the
    /// gateway's own requests (its `GET /oic/res` after a first sign-in)
    /// on the way. Blocking, bounded by [`MAX_SKIPPED`] other messages.
    pub fn response(&mut self, token: &[u8]) -> io::Result<Msg> {
        for _ in 0..MAX_SKIPPED {
            let msg = self.recv()?;
            if msg.code == Code::PING {
                self.pong(&msg.token)?;
            } else if msg.code.is_request() {
                self.answer(&msg)?;
            } else if msg.code.is_response() && msg.token == token {
                return Ok(msg);
            }
        }
        Err(io::Error::other(format!(
            "no response after {MAX_SKIPPED} other messages"
        )))
    }

    /// Waits up to `wait` for a request of the gateway and answers it
    /// (Pings on the way too); `false` when none came. For the `GET
    /// /oic/res` that follows a first sign-in, so that it is not left
    /// for a measured phase.
    pub fn serve_request(&mut self, wait: Duration) -> io::Result<bool> {
        self.sock.set_read_timeout(Some(wait))?;
        let mut served = Ok(false);
        for _ in 0..MAX_SKIPPED {
            match self.recv() {
                Ok(msg) if msg.code == Code::PING => {
                    if let Err(e) = self.pong(&msg.token) {
                        served = Err(e);
                        break;
                    }
                }
                Ok(msg) if msg.code.is_request() => {
                    served = self.answer(&msg).map(|()| true);
                    break;
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => {
                    served = Err(e);
                    break;
                }
            }
        }
        self.sock.set_read_timeout(Some(self.timeout))?;
        served
    }

    /// Answers a request of the gateway: with the twin model when the
    /// device has one; otherwise its `GET /oic/res` (spec §8.1) with one
    /// `/oic/d` link, anything else 4.04.
    fn answer(&mut self, request: &Msg) -> io::Result<()> {
        let mut out = Vec::with_capacity(128);
        if let Some(twin) = self.twin.as_mut() {
            let m = MessageRef::parse(&request.frame)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            twin.answer(&m, &mut out);
        } else if request.code == Code::GET {
            MessageWriter::new(&mut out, Code::CONTENT, &request.token)
                .option_uint(option::CONTENT_FORMAT, ocf::OCF_CBOR)
                .payload(&ocf::local_links_body())
                .finish();
        } else {
            MessageWriter::new(&mut out, Code::NOT_FOUND, &request.token).finish();
        }
        self.send(&out)
    }

    /// Appends our CSM (RFC 8323 §5.3; sent with the connection's first
    /// request).
    fn write_csm(&mut self, out: &mut Vec<u8>) {
        let token = self.token();
        signal::write_csm(out, &token, None, false);
    }

    /// `POST /oic/sec/account` with a sign-up code (spec §5.2), preceded by
    /// our CSM when `csm`; waits for the 2.04 and returns what it carries.
    pub fn sign_up(
        &mut self,
        device_id: &str,
        code: &str,
        csm: bool,
    ) -> Result<(Registration, Duration), DeviceError> {
        let started = Instant::now();
        let mut out = Vec::with_capacity(1024);
        if csm {
            self.write_csm(&mut out);
        }
        let token = self.token();
        ocf::write_post(
            &mut out,
            &token,
            &["oic", "sec", "account"],
            &ocf::sign_up_body(device_id, code),
        );
        let failed = |e| DeviceError::new(Stage::SignUp, e);
        self.send(&out).map_err(failed)?;
        let msg = self.response(&token).map_err(failed)?;
        if msg.code != Code::CHANGED {
            return Err(DeviceError::new(
                Stage::SignUp,
                format!(
                    "answered {}: {}",
                    msg.code,
                    String::from_utf8_lossy(&msg.payload)
                ),
            ));
        }
        let registration =
            ocf::parse_sign_up(&msg.payload).map_err(|e| DeviceError::new(Stage::SignUp, e))?;
        Ok((registration, started.elapsed()))
    }

    /// Sends a sign-in (`body`: [`ocf::sign_in_body`]), preceded by our CSM
    /// when `csm`, without waiting; returns the request's token for
    /// [`Device::sign_in_answer`].
    pub fn send_sign_in(&mut self, body: &[u8], csm: bool) -> Result<[u8; 8], DeviceError> {
        let mut out = Vec::with_capacity(body.len() + 64);
        if csm {
            self.write_csm(&mut out);
        }
        let token = self.token();
        ocf::write_post(&mut out, &token, &["oic", "sec", "session"], body);
        self.send(&out)
            .map_err(|e| DeviceError::new(Stage::SignIn, e))?;
        Ok(token)
    }

    /// Waits for the answer to the sign-in sent with `token`: a 2.04.
    pub fn sign_in_answer(&mut self, token: &[u8]) -> Result<(), DeviceError> {
        let msg = self
            .response(token)
            .map_err(|e| DeviceError::new(Stage::SignIn, e))?;
        if msg.code != Code::CHANGED {
            return Err(DeviceError::new(
                Stage::SignIn,
                format!(
                    "answered {}: {}",
                    msg.code,
                    String::from_utf8_lossy(&msg.payload)
                ),
            ));
        }
        Ok(())
    }

    /// A sign-in and its 2.04; returns how long it took.
    pub fn sign_in(&mut self, body: &[u8], csm: bool) -> Result<Duration, DeviceError> {
        let started = Instant::now();
        let token = self.send_sign_in(body, csm)?;
        self.sign_in_answer(&token)?;
        Ok(started.elapsed())
    }

    /// Sends our CSM and `GET /x.plgd.dev/time`, then waits for the 2.05
    /// (answering Pings on the way). Blocking.
    pub fn csm_and_get_time(&mut self) -> Result<(), DeviceError> {
        let mut out = Vec::with_capacity(64);
        signal::write_csm(&mut out, &self.token(), None, false);
        let token = self.token();
        MessageWriter::new(&mut out, Code::GET, &token)
            .option_str(option::URI_PATH, "x.plgd.dev")
            .option_str(option::URI_PATH, "time")
            .finish();
        self.send(&out)
            .map_err(|e| DeviceError::new(Stage::Request, e))?;
        for _ in 0..MAX_SKIPPED {
            let msg = self
                .recv()
                .map_err(|e| DeviceError::new(Stage::Request, e))?;
            if msg.code == Code::PING {
                self.pong(&msg.token)
                    .map_err(|e| DeviceError::new(Stage::Request, e))?;
            } else if msg.token == token {
                if msg.code == Code::CONTENT {
                    return Ok(());
                }
                return Err(DeviceError::new(
                    Stage::Request,
                    format!("GET /x.plgd.dev/time answered {}", msg.code),
                ));
            }
        }
        Err(DeviceError::new(
            Stage::Request,
            "no answer to GET /x.plgd.dev/time",
        ))
    }

    fn pong(&mut self, token: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(16);
        signal::write_pong(&mut out, token, false);
        self.send(&out)
    }

    /// Switches the socket to non-blocking mode for [`Device::service`].
    pub fn set_nonblocking(&self) -> io::Result<()> {
        self.sock.set_nonblocking(true)
    }

    /// [`Device::pump`] once on a blocking device, which stays blocking:
    /// answers the Pings and requests that arrived meanwhile. `None` if
    /// the socket mode cannot be switched.
    pub fn pump_once(&mut self) -> Option<Pumped> {
        self.sock.set_nonblocking(true).ok()?;
        let pumped = self.pump();
        self.sock.set_nonblocking(false).ok()?;
        Some(pumped)
    }

    /// Non-blocking: reads what arrived, answers Pings, reports a close.
    pub fn service(&mut self) -> Serviced {
        let mut seen = Serviced::default();
        for _ in 0..MAX_SKIPPED {
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => {
                    seen.closed = true;
                    return seen;
                }
                Ok(_) => {
                    if self.process().is_err() {
                        seen.closed = true;
                        return seen;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    seen.closed = true;
                    return seen;
                }
            }
        }
        loop {
            match self.read_plaintext() {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => {
                    seen.closed = true;
                    return seen;
                }
            }
        }
        loop {
            match self.parse_one() {
                Ok(Some(msg)) if msg.code == Code::PING => {
                    // A Pong is a few bytes: the socket buffer takes it.
                    if self.pong(&msg.token).is_err() {
                        seen.closed = true;
                        return seen;
                    }
                    seen.pings_answered += 1;
                }
                Ok(Some(_)) => seen.other_messages += 1,
                Ok(None) => break,
                Err(_) => {
                    seen.closed = true;
                    return seen;
                }
            }
        }
        seen
    }

    /// `POST /oic/rd` with `body` (spec §5.7), waiting for its 2.04 while
    /// answering the gateway's requests. Blocking.
    pub fn publish(&mut self, body: &[u8]) -> Result<(), DeviceError> {
        let mut out = Vec::with_capacity(body.len() + 32);
        let token = self.token();
        ocf::write_post(&mut out, &token, &["oic", "rd"], body);
        let failed = |e| DeviceError::new(Stage::Request, e);
        self.send(&out).map_err(failed)?;
        let msg = self.response(&token).map_err(failed)?;
        if msg.code != Code::CHANGED {
            return Err(DeviceError::new(
                Stage::Request,
                format!(
                    "POST /oic/rd answered {}: {}",
                    msg.code,
                    String::from_utf8_lossy(&msg.payload)
                ),
            ));
        }
        Ok(())
    }

    /// Answers the gateway's requests (and Pings) until `done(self)` or
    /// `wait` has passed; `Ok(false)` on time-out. Blocking, bounded by
    /// the time and by 64 messages.
    pub fn serve_until(
        &mut self,
        wait: Duration,
        done: impl Fn(&Device) -> bool,
    ) -> io::Result<bool> {
        let until = Instant::now() + wait;
        let mut result = Ok(false);
        for _ in 0..64 {
            if done(self) {
                result = Ok(true);
                break;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.sock.set_read_timeout(Some(left))?;
            match self.recv() {
                Ok(msg) if msg.code == Code::PING => {
                    if let Err(e) = self.pong(&msg.token) {
                        result = Err(e);
                        break;
                    }
                }
                Ok(msg) if msg.code.is_request() => {
                    if let Err(e) = self.answer(&msg) {
                        result = Err(e);
                        break;
                    }
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if matches!(result, Ok(false)) && done(self) {
            result = Ok(true);
        }
        self.sock.set_read_timeout(Some(self.timeout))?;
        result
    }

    /// The socket, to register it with a poller (`mio::unix::SourceFd`).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.sock.as_raw_fd()
    }

    /// Non-blocking: writes what rustls holds; `Ok(true)` when all of it
    /// went out, `Ok(false)` when the socket is full.
    pub fn flush_nonblocking(&mut self) -> io::Result<bool> {
        // Bounded: each write moves at least one byte or stops.
        for _ in 0..1024 {
            if !self.tls.wants_write() {
                return Ok(true);
            }
            match self.tls.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(!self.tls.wants_write())
    }

    /// Non-blocking: encrypts `plaintext` (one TLS record up to 16 KiB)
    /// and writes what the socket takes; `Ok(false)` when some is left
    /// for [`Device::flush_nonblocking`].
    pub fn write_nonblocking(&mut self, plaintext: &[u8]) -> io::Result<bool> {
        self.tls.writer().write_all(plaintext)?;
        self.flush_nonblocking()
    }

    /// Non-blocking, for a socket a poller found readable (edge
    /// triggered: reads until the socket would block, up to 256 reads):
    /// answers Pings and the gateway's requests (with the twin model, see
    /// [`Device::twin`]), counts the rest.
    pub fn pump(&mut self) -> Pumped {
        let mut seen = Pumped::default();
        let mut chunk = [0u8; 16384];
        for _ in 0..256 {
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => {
                    seen.closed = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    seen.closed = true;
                    return seen;
                }
            }
            if self.tls.process_new_packets().is_err() {
                seen.closed = true;
                return seen;
            }
            loop {
                match self.tls.reader().read(&mut chunk) {
                    Ok(0) => {
                        seen.closed = true;
                        break;
                    }
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        seen.closed = true;
                        return seen;
                    }
                }
            }
        }
        let mut consumed = 0;
        self.scratch.clear();
        loop {
            match deframer::next_message(&self.buf[consumed..], MAX_MESSAGE) {
                Ok(Some((m, len))) => {
                    consumed += len;
                    if m.code == Code::PING {
                        signal::write_pong(&mut self.scratch, m.token, false);
                        seen.pings_answered += 1;
                    } else if m.code.is_request() {
                        match self.twin.as_mut() {
                            Some(twin) => twin.answer(&m, &mut self.scratch),
                            None => {
                                MessageWriter::new(&mut self.scratch, Code::NOT_FOUND, m.token)
                                    .finish();
                            }
                        }
                        seen.requests_answered += 1;
                    } else {
                        seen.other_messages += 1;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    seen.closed = true;
                    return seen;
                }
            }
        }
        self.buf.drain(..consumed);
        if !self.scratch.is_empty() {
            let out = std::mem::take(&mut self.scratch);
            if self.write_nonblocking(&out).is_err() {
                seen.closed = true;
            }
            self.scratch = out;
        }
        seen
    }

    /// Non-blocking: `n` notifications of resource `k` (of the twin model),
    /// `{"seq", "t"}` with `t` = now, in one TLS record; returns how many
    /// were written (0 when the resource is not observed) and whether the
    /// socket took all of it.
    pub fn notify_nonblocking(&mut self, k: usize, n: usize, t_ns: u64) -> io::Result<(u64, bool)> {
        let Some(twin) = self.twin.as_mut() else {
            return Ok((0, true));
        };
        self.scratch.clear();
        let mut written = 0;
        for _ in 0..n {
            if twin
                .write_notification(k, t_ns, &mut self.scratch)
                .is_none()
            {
                break;
            }
            written += 1;
        }
        if written == 0 {
            return Ok((0, true));
        }
        let out = std::mem::take(&mut self.scratch);
        let flushed = self.write_nonblocking(&out);
        self.scratch = out;
        Ok((written, flushed?))
    }

    /// Sends close_notify (best effort) and closes the socket.
    pub fn close(mut self) {
        self.tls.send_close_notify();
        let _ = self.flush();
    }
}
