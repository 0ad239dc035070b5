//! The yardstick: bare rustls on one thread. A blocking accept loop over std
//! `TcpStream`s with a buffered `ServerConnection` built from the gateway's
//! own `server_config` (dev PKI, `ClientAuth::Identity`): complete the
//! handshake, write a CSM (10 bytes, like the gateway's), wait for the
//! client to close (answering its close_notify), next. Its CPU time is read
//! from `/proc/self/task/<tid>/stat`.
//!
//! With a [`BareVerifier`] it is the floor of a full OCF connect instead:
//! after the CSM it reads the client's first request (skipping its CSM),
//! takes `accesstoken` out of the CBOR body, verifies it with bare
//! `jsonwebtoken` and answers 2.04 `{expiresin}` (4.01 if the token fails),
//! then waits for the close.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use coap_gateway::auth::tls::{server_config, TlsFiles};
use coap_gateway::auth::ClientAuth;
use coap_gateway::coap::{deframer, option, signal, Code, MessageWriter};
use rustls::{ServerConfig, ServerConnection};

use crate::jwt::BareVerifier;
use crate::ocf::{self, Val};
use crate::procfs;

/// Largest message the baseline server accepts.
const MAX_MESSAGE: usize = 64 << 10;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct BaselineServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    tid: Arc<AtomicU32>,
    pub failures: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl BaselineServer {
    pub fn start(files: &TlsFiles) -> Result<BaselineServer, String> {
        Self::start_with(files, None)
    }

    /// With `verifier`: the sign-in floor (see the module documentation).
    pub fn start_with(
        files: &TlsFiles,
        verifier: Option<Arc<BareVerifier>>,
    ) -> Result<BaselineServer, String> {
        let config = server_config(files, ClientAuth::Identity)
            .map_err(|e| format!("baseline server config: {e}"))?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| format!("baseline server cannot listen: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let tid = Arc::new(AtomicU32::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let handle = {
            let (stop, tid, failures) = (stop.clone(), tid.clone(), failures.clone());
            std::thread::Builder::new()
                .name("baseline-server".into())
                .spawn(move || {
                    tid.store(procfs::current_tid().unwrap_or(0), Ordering::SeqCst);
                    serve(&listener, &config, verifier.as_deref(), &stop, &failures);
                })
                .map_err(|e| format!("cannot start the baseline server thread: {e}"))?
        };
        // The thread publishes its id first thing; wait for it (bounded).
        for _ in 0..1000 {
            if tid.load(Ordering::SeqCst) != 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if tid.load(Ordering::SeqCst) == 0 {
            return Err("the baseline server thread did not report its id".into());
        }
        Ok(BaselineServer {
            addr,
            stop,
            tid,
            failures,
            handle: Some(handle),
        })
    }

    /// CPU ticks the server thread has used so far.
    pub fn cpu_ticks(&self) -> io::Result<procfs::CpuTicks> {
        procfs::thread_cpu_ticks(self.tid.load(Ordering::SeqCst))
    }
}

impl Drop for BaselineServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve(
    listener: &TcpListener,
    config: &Arc<ServerConfig>,
    verifier: Option<&BareVerifier>,
    stop: &AtomicBool,
    failures: &AtomicU64,
) {
    let mut token = 0u64;
    let mut csm = Vec::with_capacity(16);
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut sock) = stream else { continue };
        token += 1;
        csm.clear();
        signal::write_csm(&mut csm, &token.to_be_bytes(), None, false);
        if one_connection(&mut sock, config, &csm, verifier).is_err() {
            failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn one_connection(
    sock: &mut TcpStream,
    config: &Arc<ServerConfig>,
    csm: &[u8],
    verifier: Option<&BareVerifier>,
) -> io::Result<()> {
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    sock.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut conn = ServerConnection::new(config.clone()).map_err(io::Error::other)?;
    for _ in 0..64 {
        if !conn.is_handshaking() {
            break;
        }
        conn.complete_io(sock)?;
    }
    if conn.is_handshaking() {
        return Err(io::Error::other("handshake did not finish"));
    }
    conn.writer().write_all(csm)?;
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    if let Some(verifier) = verifier {
        sign_in(sock, &mut conn, verifier)?;
    }
    // Wait for the client's close (it closes once it has the CSM).
    for _ in 0..64 {
        match conn.read_tls(sock) {
            Ok(0) => break,
            Ok(_) => match conn.process_new_packets() {
                Ok(state) if state.peer_has_closed() => {
                    conn.send_close_notify();
                    let _ = conn.write_tls(sock);
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            },
            Err(_) => break,
        }
    }
    Ok(())
}

/// Reads until the client's first request, verifies its `accesstoken` and
/// answers it.
fn sign_in(
    sock: &mut TcpStream,
    conn: &mut ServerConnection,
    verifier: &BareVerifier,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    for _ in 0..64 {
        while let Some((msg, len)) = deframer::next_message(&buf, MAX_MESSAGE)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
        {
            if !msg.code.is_request() {
                buf.drain(..len);
                continue;
            }
            let verified = ocf::access_token_of(msg.payload).map(|t| verifier.verify(t));
            let mut out = Vec::with_capacity(64);
            match verified {
                Some(Ok(exp)) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let expires_in = i64::try_from(exp.saturating_sub(now)).unwrap_or(i64::MAX);
                    let body = ocf::cbor_map(&[("expiresin", Val::Int(expires_in))]);
                    MessageWriter::new(&mut out, Code::CHANGED, msg.token)
                        .option_uint(option::CONTENT_FORMAT, ocf::OCF_CBOR)
                        .payload(&body)
                        .finish();
                }
                _ => {
                    MessageWriter::new(&mut out, Code::UNAUTHORIZED, msg.token).finish();
                }
            }
            conn.writer().write_all(&out)?;
            while conn.wants_write() {
                conn.write_tls(sock)?;
            }
            return match verified {
                Some(Ok(_)) => Ok(()),
                _ => Err(io::Error::other("the sign-in token did not verify")),
            };
        }
        if conn.read_tls(sock)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        conn.process_new_packets().map_err(io::Error::other)?;
        loop {
            match conn.reader().read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
    Err(io::Error::other("no request from the client"))
}
