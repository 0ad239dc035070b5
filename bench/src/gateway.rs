//! The gateway under test: a development PKI in a temporary data directory
//! and, with `--spawn`, the real `coap-gateway` binary started on a free
//! loopback port. [`SpawnedGateway`] kills the process when dropped, also on
//! error and panic.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_gateway::auth::pki;
use coap_gateway::auth::tls::TlsFiles;
use rustls::ClientConfig;

use crate::device::{self, Device};

/// The hub a spawned gateway runs with (`--hub`, `--memory`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubChoice {
    /// The embedded hub with its store (`<data_dir>/hub.redb`).
    Embedded,
    /// `serve --memory`: the embedded hub without its store.
    Memory,
    /// `[hub] kind = "nats"` against the broker at `url`.
    Nats { url: String },
}

/// A `nats-server -js` the bench starts for `--hub nats` without
/// `--nats-url`: loopback, a free port, its own store in a temporary
/// directory; killed when dropped.
pub struct NatsServer {
    child: Child,
    pub url: String,
    _store: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> Result<NatsServer, String> {
        let binary = [
            "nats-server",
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
        ]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .ok_or(
            "--hub nats needs nats-server (Debian: apt-get install nats-server) or --nats-url",
        )?;
        let store = tempfile::Builder::new()
            .prefix("coap-gateway-bench-nats-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let port = free_port()?;
        let monitor = free_port()?;
        let child = Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
            .args(["-m", &monitor.to_string(), "-sd"])
            .arg(store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {binary}: {e}"))?;
        let server = NatsServer {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _store: store,
        };
        // Ready when its monitoring endpoint says JetStream is up.
        let started = Instant::now();
        loop {
            let healthy = std::net::TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], monitor)),
                Duration::from_millis(200),
            )
            .ok()
            .and_then(|mut s| {
                use std::io::{Read, Write};
                s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
                s.write_all(b"GET /healthz?js-enabled-only=true HTTP/1.0\r\n\r\n")
                    .ok()?;
                let mut answer = String::new();
                s.read_to_string(&mut answer).ok()?;
                Some(answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"))
            })
            .unwrap_or(false);
            if healthy {
                return Ok(server);
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "nats-server on port {port} is not ready after {START_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long the gateway has to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A development PKI (CA, gateway certificate) plus one device identity
/// certificate, in a temporary directory that is the gateway's data dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn create() -> Result<Pki, String> {
        let dir = tempfile::Builder::new()
            .prefix("coap-gateway-bench-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        // The CA and gateway certificate are made once and cached, so the
        // device certificates issued by that CA are cached with them.
        crate::certcache::dev_pki_into(&dir.path().join("pki"))?;
        let pki = Pki { dir };
        pki::device(
            &pki.pki_dir(),
            uuid::Uuid::new_v4(),
            &pki.device_dir(),
            false,
        )
        .map_err(|e| format!("cannot create the device certificate: {e}"))?;
        Ok(pki)
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    fn device_dir(&self) -> PathBuf {
        self.dir.path().join("device")
    }

    /// The files the gateway's listener uses (also used by the baseline
    /// server, so both present the same certificate and trust the same CA).
    pub fn server_files(&self) -> TlsFiles {
        let d = self.pki_dir();
        TlsFiles {
            ca: d.join("ca.pem"),
            cert: d.join("gateway.pem"),
            key: d.join("gateway-key.pem"),
        }
    }

    /// The device's client configuration (no resumption).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        let d = self.device_dir();
        device::client_config(
            &self.pki_dir().join("ca.pem"),
            &d.join("device.pem"),
            &d.join("device-key.pem"),
        )
    }
}

/// A device identity issued by an existing CA directory (`ca.pem`,
/// `ca-key.pem`), for `--gateway ADDR`.
pub fn external_client_config(ca_dir: &Path, scratch: &Path) -> Result<Arc<ClientConfig>, String> {
    let out = scratch.join("external-device");
    let paths = pki::device(ca_dir, uuid::Uuid::new_v4(), &out, false).map_err(|e| {
        format!(
            "cannot issue a device certificate from {}: {e}",
            ca_dir.display()
        )
    })?;
    device::client_config(&paths.ca, &paths.cert, &paths.key)
}

/// The `coap-gateway` binary next to this one.
pub fn default_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    Ok(exe.with_file_name("coap-gateway"))
}

/// A `coap-gateway serve` child process.
pub struct SpawnedGateway {
    child: Child,
    pub addr: SocketAddr,
    pub shards: usize,
    /// The `COAP_GATEWAY__…` variables it runs with: with
    /// `Config::load_with_env(None, env)` the bench sees the configuration
    /// the gateway sees (its authority's key file and issuer).
    pub env: Vec<(String, String)>,
    stderr_path: PathBuf,
}

impl SpawnedGateway {
    /// Starts the binary on a free loopback port with `pki`'s data dir and
    /// the hub `hub` (embedded, `serve --memory`, or NATS JetStream) and
    /// waits until a device can complete a handshake and get the CSM.
    pub fn start(
        binary: &Path,
        pki: &Pki,
        shards: usize,
        hub: &HubChoice,
        client: &Arc<ClientConfig>,
        interrupted: &Arc<AtomicBool>,
    ) -> Result<SpawnedGateway, String> {
        if !binary.is_file() {
            return Err(format!(
                "{} not found; build both binaries first: cargo build --release -p bench -p coap-gateway",
                binary.display()
            ));
        }
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // The HTTP API too gets a free loopback port: its default
        // (127.0.0.1:8080) may be taken, and two runs must not collide.
        let api = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut env: Vec<(String, String)> = [
            (
                "COAP_GATEWAY__HUB__DATA_DIR",
                pki.data_dir().display().to_string(),
            ),
            ("COAP_GATEWAY__COAP__ADDRESS", addr.to_string()),
            ("COAP_GATEWAY__API__ADDRESS", api.to_string()),
            ("COAP_GATEWAY__COAP__SHARDS", shards.to_string()),
            ("COAP_GATEWAY__LOG__LEVEL", "warn".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if let HubChoice::Nats { url } = hub {
            // A prefix of its own: runs sharing one broker see nothing of
            // each other's streams and buckets.
            let prefix = format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            env.extend([
                ("COAP_GATEWAY__HUB__KIND".to_owned(), "nats".to_owned()),
                ("COAP_GATEWAY__HUB__NATS__URL".to_owned(), url.clone()),
                ("COAP_GATEWAY__HUB__NATS__PREFIX".to_owned(), prefix),
            ]);
        }
        let memory = matches!(hub, HubChoice::Memory);
        let stderr_path = pki.data_dir().join("gateway.stderr");
        let stderr = File::create(&stderr_path)
            .map_err(|e| format!("cannot create {}: {e}", stderr_path.display()))?;
        // The gateway gets the whole machine even when the bench is
        // confined (`taskset -c 1`, perf/README.md "Core placement"): its
        // shard pins itself to the first CPU, its other threads float.
        let wide = shards::system::WideAffinity::online();
        let child = Command::new(binary)
            .arg("serve")
            // `serve --memory`: the embedded hub without its store.
            .args(memory.then_some("--memory"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        drop(wide);
        let mut gateway = SpawnedGateway {
            child,
            addr,
            shards,
            env,
            stderr_path,
        };
        gateway.wait_ready(client, interrupted)?;
        Ok(gateway)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(
        &mut self,
        client: &Arc<ClientConfig>,
        interrupted: &Arc<AtomicBool>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::from("no attempt");
        while Instant::now() < deadline && !interrupted.load(Ordering::Relaxed) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the gateway exited during start-up ({status}); its stderr:\n{}",
                    self.stderr_tail()
                ));
            }
            match Device::connect(self.addr, client, Duration::from_secs(2)) {
                Ok((device, _)) => {
                    device.close();
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "the gateway did not accept a device on {} within {START_TIMEOUT:?} (last: {last}); its stderr:\n{}",
            self.addr,
            self.stderr_tail()
        ))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines the gateway wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        tail(&std::fs::read_to_string(&self.stderr_path).unwrap_or_default())
    }

    /// Whether the gateway still runs and what it wrote to stderr, reading
    /// its stderr file once.
    pub fn health(&mut self) -> Health {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        Health {
            running: self.is_running(),
            stderr_lines: text.lines().count(),
            stderr_tail: tail(&text),
        }
    }
}

/// The spawned gateway's state at the end of a run.
pub struct Health {
    pub running: bool,
    /// Lines on its stderr (warnings and errors).
    pub stderr_lines: usize,
    /// The last of them.
    pub stderr_tail: String,
}

impl Health {
    /// Prints the gateway's stderr lines, if it wrote any.
    pub fn report_stderr(&self) {
        if self.stderr_lines > 0 {
            println!(
                "  the gateway wrote {} line(s) to stderr; last ones:\n{}",
                self.stderr_lines, self.stderr_tail
            );
        }
    }

    /// An error when the gateway died during the run.
    pub fn died(&self) -> Option<String> {
        (!self.running).then(|| {
            format!(
                "the gateway died during the run; its stderr:\n{}",
                self.stderr_tail
            )
        })
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Drop for SpawnedGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot find a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}
