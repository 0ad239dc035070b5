//! The client side of the shards runtime (`Runtime::start_client`,
//! `Runtime::connect`): real TLS connections from client shards to a server
//! runtime over loopback sockets.

// A test of the IO side: it reads the clock.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use shards::{CloseReason, ConnInfo, Connect, Connection, Runtime, RuntimeConfig, Service};

/// Server side: answers every line upper-cased.
struct Upper {
    out: Vec<u8>,
    closed: bool,
}

impl Connection for Upper {
    type Message = ();
    fn on_data(&mut self, _now: Instant, data: &[u8]) -> usize {
        let mut used = 0;
        while let Some(pos) = data[used..].iter().position(|b| *b == b'\n') {
            self.out.extend(
                data[used..used + pos + 1]
                    .iter()
                    .map(u8::to_ascii_uppercase),
            );
            used += pos + 1;
        }
        used
    }
    fn on_timeout(&mut self, _now: Instant) {}
    fn on_message(&mut self, _now: Instant, _msg: ()) {}
    fn on_shutdown(&mut self, _now: Instant) {
        self.closed = true;
    }
    fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        if self.out.is_empty() {
            return false;
        }
        out.append(&mut self.out);
        true
    }
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
    fn is_closed(&self) -> bool {
        self.closed
    }
    fn on_closed(&mut self, _now: Instant, _reason: &CloseReason) {}
}

struct UpperService;
impl Service for UpperService {
    type Conn = Upper;
    fn accept(&self, _info: &ConnInfo<'_>, _now: Instant) -> Upper {
        Upper {
            out: Vec::new(),
            closed: false,
        }
    }
}

/// What the client connections saw, by tag.
#[derive(Default)]
struct Seen {
    answers: HashMap<u64, String>,
    failed: HashMap<u64, CloseReason>,
    closed: HashMap<u64, CloseReason>,
    /// A timer of the application fired.
    timers: usize,
}

/// Client side: says "hello <tag>" when the handshake is done, waits for
/// the answer, then a timer 20 ms later closes the connection.
struct Hello {
    tag: u64,
    out: Vec<u8>,
    got: Vec<u8>,
    close_at: Option<Instant>,
    closed: bool,
    seen: Arc<Mutex<Seen>>,
}

impl Connection for Hello {
    type Message = ();
    fn on_data(&mut self, now: Instant, data: &[u8]) -> usize {
        self.got.extend_from_slice(data);
        if self.got.ends_with(b"\n") {
            let line = String::from_utf8_lossy(&self.got).trim_end().to_owned();
            self.seen.lock().unwrap().answers.insert(self.tag, line);
            self.close_at = Some(now + Duration::from_millis(20));
        }
        data.len()
    }
    fn on_timeout(&mut self, _now: Instant) {
        self.seen.lock().unwrap().timers += 1;
        self.closed = true;
    }
    fn on_message(&mut self, _now: Instant, _msg: ()) {}
    fn on_shutdown(&mut self, _now: Instant) {
        self.closed = true;
    }
    fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        if self.out.is_empty() {
            return false;
        }
        out.append(&mut self.out);
        true
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.close_at
    }
    fn is_closed(&self) -> bool {
        self.closed
    }
    fn on_closed(&mut self, _now: Instant, reason: &CloseReason) {
        self.seen
            .lock()
            .unwrap()
            .closed
            .insert(self.tag, reason.clone());
    }
}

struct HelloService {
    seen: Arc<Mutex<Seen>>,
}

impl Service for HelloService {
    type Conn = Hello;
    fn accept(&self, info: &ConnInfo<'_>, _now: Instant) -> Hello {
        assert!(info.tls_version.is_some());
        Hello {
            tag: info.tag,
            out: format!("hello {}\n", info.tag).into_bytes(),
            got: Vec::new(),
            close_at: None,
            closed: false,
            seen: self.seen.clone(),
        }
    }
    fn connect_failed(&self, tag: u64, _now: Instant, reason: &CloseReason) {
        self.seen.lock().unwrap().failed.insert(tag, reason.clone());
    }
}

fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>, Arc<ClientConfig>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let client = |root: &rcgen::CertifiedKey<rcgen::KeyPair>| {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.cert.der().clone()).unwrap();
        Arc::new(
            ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    };
    let trusted = client(&cert);
    let stranger = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let untrusting = client(&stranger);
    (Arc::new(server), trusted, untrusting)
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn client_runtime(seen: &Arc<Mutex<Seen>>) -> Runtime<()> {
    let mut config = RuntimeConfig::new("127.0.0.1:0".parse().unwrap(), None);
    config.shards = 2;
    config.tick = Duration::from_millis(5);
    let seen = seen.clone();
    Runtime::start_client(config, move |_| HelloService { seen: seen.clone() })
        .expect("client runtime starts")
}

#[test]
fn client_shards_open_tls_connections_that_speak_first_run_timers_and_close() {
    let (server_tls, client_tls, _) = configs();
    let mut config = RuntimeConfig::new("127.0.0.1:0".parse().unwrap(), Some(server_tls));
    config.shards = 1;
    let server = Runtime::start(config, |_| UpperService).expect("server starts");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let client = client_runtime(&seen);
    assert_eq!(client.shards(), 2);
    const N: u64 = 200;
    for tag in 1..=N {
        let request = Connect {
            addr: server.local_addr(),
            tls: client_tls.clone(),
            name: ServerName::try_from("localhost").unwrap(),
            tag,
        };
        assert!(client.connect(tag as usize, request).is_ok());
    }
    wait_for("every connection to close", || {
        seen.lock().unwrap().closed.len() == N as usize
    });
    let seen = seen.lock().unwrap();
    assert!(seen.failed.is_empty(), "{:?}", seen.failed);
    for tag in 1..=N {
        assert_eq!(seen.answers[&tag], format!("HELLO {tag}"));
        assert_eq!(seen.closed[&tag], CloseReason::Local);
    }
    assert_eq!(seen.timers, N as usize);
    let opened: u64 = client
        .stats()
        .iter()
        .map(|s| s.handshakes.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert_eq!(opened, N);
    for shard in client.stats() {
        // Spread over both shards by the caller's choice (tag % 2).
        assert_eq!(
            shard.handshakes.load(std::sync::atomic::Ordering::Relaxed),
            N / 2
        );
    }
    client.shutdown();
    client.join();
    server.shutdown();
    server.join();
}

#[test]
fn a_refused_connect_and_an_untrusted_server_are_reported_with_their_tag() {
    let (server_tls, _, untrusting) = configs();
    let mut config = RuntimeConfig::new("127.0.0.1:0".parse().unwrap(), Some(server_tls));
    config.shards = 1;
    let server = Runtime::start(config, |_| UpperService).expect("server starts");
    // A port nobody listens on: bind one, then let it go.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let client = client_runtime(&seen);
    let name = ServerName::try_from("localhost").unwrap();
    for (tag, addr) in [(7, closed_port), (8, server.local_addr())] {
        let request = Connect {
            addr,
            tls: untrusting.clone(),
            name: name.clone(),
            tag,
        };
        assert!(client.connect(0, request).is_ok());
    }
    wait_for("both failures", || seen.lock().unwrap().failed.len() == 2);
    let seen = seen.lock().unwrap();
    assert!(
        matches!(seen.failed[&7], CloseReason::Io(_)),
        "{:?}",
        seen.failed[&7]
    );
    assert!(
        matches!(&seen.failed[&8], CloseReason::Tls(m) if m.contains("invalid peer certificate")),
        "{:?}",
        seen.failed[&8]
    );
    assert!(seen.answers.is_empty() && seen.closed.is_empty());
    client.shutdown();
    client.join();
    server.shutdown();
    server.join();
}

#[test]
fn a_server_runtime_refuses_connect_requests() {
    let mut config = RuntimeConfig::new("127.0.0.1:0".parse().unwrap(), None);
    config.shards = 1;
    let server = Runtime::start(config, |_| UpperService).expect("server starts");
    let (_, client_tls, _) = configs();
    let request = Connect {
        addr: server.local_addr(),
        tls: client_tls,
        name: ServerName::try_from("localhost").unwrap(),
        tag: 1,
    };
    assert!(server.connect(0, request).is_err());
    server.shutdown();
    server.join();
}

#[test]
fn a_client_past_max_connections_reports_the_refusal() {
    let (server_tls, client_tls, _) = configs();
    let mut config = RuntimeConfig::new("127.0.0.1:0".parse().unwrap(), Some(server_tls));
    config.shards = 1;
    let server = Runtime::start(config, |_| UpperService).expect("server starts");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut config = RuntimeConfig::new("127.0.0.1:0".parse().unwrap(), None);
    config.shards = 1;
    config.max_connections = 1;
    let for_shards = seen.clone();
    let client = Runtime::start_client(config, move |_| HelloService {
        seen: for_shards.clone(),
    })
    .expect("client runtime starts");
    for tag in [1, 2] {
        let request = Connect {
            addr: server.local_addr(),
            tls: client_tls.clone(),
            name: ServerName::try_from("localhost").unwrap(),
            tag,
        };
        assert!(client.connect(0, request).is_ok());
    }
    wait_for("one answer and one refusal", || {
        let seen = seen.lock().unwrap();
        seen.closed.len() == 1 && seen.failed.len() == 1
    });
    let seen = seen.lock().unwrap();
    assert_eq!(seen.answers[&1], "HELLO 1");
    assert!(
        matches!(&seen.failed[&2], CloseReason::Io(m) if m.contains("max_connections")),
        "{:?}",
        seen.failed
    );
    let rejected: u64 = client
        .stats()
        .iter()
        .map(|s| {
            s.rejected_max_connections
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert_eq!(rejected, 1);
    client.shutdown();
    client.join();
    server.shutdown();
    server.join();
}
