//! Shared pieces of the integration tests: a gateway started in this
//! process on a loopback port, and a blocking CoAP-over-TLS test device.
#![allow(dead_code)]

pub mod ocf;
pub mod process;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_gateway::auth::{pki, ClientAuth};
use coap_gateway::coap::{deframer, Code, MessageRef};
use coap_gateway::config::Config;
use coap_gateway::server;

/// A development PKI in a temporary directory, with device certificates.
pub struct TestPki {
    pub dir: tempfile::TempDir,
}

pub const DEVICE_ID: &str = "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a";

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki_dir = dir.path().join("pki");
        pki::init(&pki_dir, uuid::Uuid::new_v4(), false).expect("pki init");
        let id = uuid::Uuid::parse_str(DEVICE_ID).expect("uuid");
        pki::device(&pki_dir, id, &dir.path().join("device"), false).expect("device cert");
        pki::device(&pki_dir, id, &dir.path().join("any"), true).expect("any cert");
        // A second, unrelated CA and a device certificate from it.
        let other = dir.path().join("other");
        pki::init(&other, uuid::Uuid::new_v4(), false).expect("other pki");
        pki::device(&other, id, &dir.path().join("foreign"), false).expect("foreign cert");
        TestPki { dir }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("pki/ca.pem")
    }

    /// `device` (OCF identity), `any` (plain client certificate) or `foreign`
    /// (identity certificate from another CA).
    pub fn cert(&self, kind: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.path().join(kind);
        (d.join("device.pem"), d.join("device-key.pem"))
    }

    /// A gateway config on a free loopback port with this PKI.
    pub fn config(&self, client_auth: ClientAuth) -> Config {
        let mut config = Config::with_data_dir(self.dir.path());
        config.coap.address = "127.0.0.1:0".parse().expect("addr");
        config.coap.shards = 1;
        config.coap.tls.client_auth = client_auth;
        config
    }

    pub fn client_config(&self, kind: Option<&str>) -> Arc<rustls::ClientConfig> {
        let cert = kind.map(|k| self.cert(k));
        coap_gateway::auth::tls::client_config(
            &self.ca(),
            cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .expect("client config")
    }
}

/// Starts a gateway in this process; it stops when dropped.
pub struct TestGateway {
    pub gateway: Option<server::Gateway>,
    pub addr: SocketAddr,
}

impl TestGateway {
    pub fn start(config: &Config) -> TestGateway {
        let gateway = server::start(config).expect("gateway starts");
        let addr = gateway.local_addr();
        TestGateway {
            gateway: Some(gateway),
            addr,
        }
    }

    fn running(&self) -> &server::Gateway {
        self.gateway.as_ref().expect("running")
    }

    pub fn stats(&self) -> &[Arc<shards::ShardStats>] {
        self.running().runtime.stats()
    }

    /// The embedded hub (`[hub] kind = "embedded"`, what these in-process
    /// gateways run).
    pub fn hub(&self) -> &Arc<coap_gateway::hub::MemoryHub> {
        self.running()
            .embedded_hub()
            .expect("the gateway runs the embedded hub")
    }

    /// The hub whichever the back end (`[hub] kind`).
    pub fn any_hub(&self) -> &Arc<dyn coap_gateway::hub::Hub> {
        &self.running().hub
    }

    pub fn authority(&self) -> &Arc<coap_gateway::auth::authority::Authority> {
        self.running()
            .authority()
            .expect("the embedded authority runs")
    }

    pub fn provider(&self) -> &Arc<coap_gateway::auth::provider::EmbeddedProvider> {
        self.running()
            .provider
            .as_ref()
            .expect("the embedded authority runs")
    }

    /// Starts the drain and waits for it (what dropping does).
    pub fn stop(&mut self) {
        if let Some(gw) = self.gateway.take() {
            gw.shutdown();
            gw.join();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An owned CoAP message, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub code: Code,
    pub token: Vec<u8>,
    pub options: Vec<(u16, Vec<u8>)>,
    pub payload: Vec<u8>,
}

impl Msg {
    fn from_ref(m: &MessageRef<'_>) -> Msg {
        Msg {
            code: m.code,
            token: m.token.to_vec(),
            options: m.options().map(|o| (o.number, o.value.to_vec())).collect(),
            payload: m.payload.to_vec(),
        }
    }
}

/// The transport under a test device: TLS or plain TCP.
pub enum Transport {
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    Plain(TcpStream),
}

impl Transport {
    fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Tls(s) => &s.sock,
            Transport::Plain(s) => s,
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Transport::Tls(s) => s.read(buf),
            Transport::Plain(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Transport::Tls(s) => s.write(buf),
            Transport::Plain(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Transport::Tls(s) => s.flush(),
            Transport::Plain(s) => s.flush(),
        }
    }
}

/// A blocking test device speaking CoAP over TCP (RFC 8323).
pub struct TestDevice {
    pub io: Transport,
    buf: Vec<u8>,
}

impl TestDevice {
    /// Connects and completes the TLS handshake (an error if it fails).
    pub fn connect_tls(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<TestDevice> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let name = rustls::pki_types::ServerName::try_from("localhost")
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let conn = rustls::ClientConnection::new(config, name)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        Ok(TestDevice {
            io: Transport::Tls(Box::new(stream)),
            buf: Vec::new(),
        })
    }

    pub fn connect_plain(addr: SocketAddr) -> std::io::Result<TestDevice> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(TestDevice {
            io: Transport::Plain(tcp),
            buf: Vec::new(),
        })
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.io.tcp().set_read_timeout(Some(t)).expect("timeout");
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes)?;
        self.io.flush()
    }

    /// The next whole message; an error on timeout, EOF or a bad frame.
    pub fn recv(&mut self) -> std::io::Result<Msg> {
        loop {
            match deframer::next_message(&self.buf, 16 << 20) {
                Ok(Some((m, len))) => {
                    let msg = Msg::from_ref(&m);
                    self.buf.drain(..len);
                    return Ok(msg);
                }
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.io.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads until the gateway closes the connection; returns what came
    /// before and how long the close took. Fails if still open at `limit`.
    pub fn recv_until_closed(&mut self, limit: Duration) -> (Vec<Msg>, Duration) {
        let started = Instant::now();
        self.set_read_timeout(limit);
        let mut msgs = Vec::new();
        loop {
            match self.recv() {
                Ok(m) => msgs.push(m),
                Err(e) => {
                    assert!(
                        !matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ),
                        "connection still open after {limit:?} (got {msgs:?})"
                    );
                    return (msgs, started.elapsed());
                }
            }
        }
    }
}
