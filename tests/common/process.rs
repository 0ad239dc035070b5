//! The `coap-gateway` binary as a user runs it: a config file in a
//! temporary directory, `serve` as a child process (killed when dropped),
//! the CLI for certificates and tokens, an HTTP client for the API, and
//! the Python with aiocoap that scripts/test prepares.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_coap-gateway");

/// The Python with aiocoap and cbor2: COAP_GATEWAY_TEST_PYTHON (scripts/test
/// exports it), else the virtualenv scripts/test leaves in target/.
pub fn python() -> PathBuf {
    let python = std::env::var_os("COAP_GATEWAY_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python")
        });
    let hint = "scripts/test installs aiocoap and cbor2 in a virtualenv and exports \
                COAP_GATEWAY_TEST_PYTHON=<venv>/bin/python; run it once, or set that \
                variable to a Python with aiocoap and cbor2";
    match Command::new(&python)
        .args(["-c", "import aiocoap, cbor2"])
        .output()
    {
        Ok(out) if out.status.success() => python,
        Ok(out) => panic!(
            "{} cannot import aiocoap/cbor2: {}\n{hint}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("no Python at {}: {e}\n{hint}", python.display()),
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The hub a [`Setup`]'s gateway runs on.
#[derive(Debug, Clone)]
pub enum HubBackend {
    /// `[hub] kind = "embedded"` (the default): `<data_dir>/hub.redb`.
    Embedded,
    /// `[hub] kind = "nats"`: JetStream at `url` (comma-separated for a
    /// cluster) under `prefix`; `extra` is more `[hub.nats]` keys, one
    /// per line (e.g. `heartbeat_ttl = "3s"`).
    Nats {
        url: String,
        prefix: String,
        extra: String,
    },
}

impl HubBackend {
    /// What `COAP_GATEWAY_TEST_HUB` asks for: in the NATS pass the
    /// process's shared nats-server under a prefix of this gateway's own
    /// (nats.rs), else the embedded hub.
    pub fn from_env() -> HubBackend {
        if super::nats::nats_pass() {
            HubBackend::Nats {
                url: super::nats::shared().url(),
                prefix: super::nats::unique_prefix(),
                extra: String::new(),
            }
        } else {
            HubBackend::Embedded
        }
    }

    pub fn is_nats(&self) -> bool {
        matches!(self, HubBackend::Nats { .. })
    }
}

/// The issuer every node of a multi-node set-up names (`[authority]
/// issuer`): a token one node's authority issued is valid on the others
/// only if they agree on it (the default, `http://<api.address>`, differs
/// per node).
pub const CLUSTER_ISSUER: &str = "https://coap-gateway.test";

/// A gateway's directory: config file, data dir, ports.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    pub api_port: u16,
    /// Where the CA, the gateway certificate and key are: `<data>/pki`
    /// (the development PKI, created by the first `serve`), or the first
    /// node's for a node made with [`Setup::node_of`].
    pub pki_dir: PathBuf,
    /// The embedded authority's signing key file in force.
    pub authority_key: PathBuf,
    pub hub: HubBackend,
}

impl Setup {
    /// One shard on loopback, the data dir inside a temp dir, `extra`
    /// appended to the `[coap]` section; the hub as `COAP_GATEWAY_TEST_HUB`
    /// says ([`HubBackend::from_env`]).
    pub fn new(extra: &str) -> Setup {
        Setup::with_hub(extra, HubBackend::from_env())
    }

    /// [`Setup::new`] on `hub`.
    pub fn with_hub(extra: &str, hub: HubBackend) -> Setup {
        Setup::build(extra, hub, None)
    }

    /// The first node of a multi-node set-up: [`Setup::with_hub`] with
    /// `[authority] issuer` = [`CLUSTER_ISSUER`], so that [`Setup::node_of`]
    /// can share its files.
    pub fn first_node(extra: &str, hub: HubBackend) -> Setup {
        Setup::build(extra, hub, Some(None))
    }

    /// Another node beside `first`: its own data dir and ports, `first`'s
    /// CA, gateway certificate and key, authority key and issuer (through
    /// its config: `[coap.tls]`, `[authority]`), on `hub`. `first` must
    /// have served once (which creates the PKI and the key).
    pub fn node_of(first: &Setup, extra: &str, hub: HubBackend) -> Setup {
        assert!(
            first.pki_dir.join("ca.pem").exists() && first.authority_key.exists(),
            "node_of: the first node has not created its PKI and authority key yet (serve it first)"
        );
        Setup::build(extra, hub, Some(Some(first)))
    }

    /// `cluster`: `None` = a lone gateway (defaults for the PKI and the
    /// authority); `Some(None)` = the first node of several; `Some(Some(a))`
    /// = a node sharing `a`'s files.
    fn build(extra: &str, hub: HubBackend, cluster: Option<Option<&Setup>>) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        // Two calls of free_port can give the same port (CI saw the API
        // refused on the CoAP port): distinct ones.
        let ports = super::nats::distinct_ports(2);
        let (port, api_port) = (ports[0], ports[1]);
        let config = dir.path().join("gateway.toml");
        let path = |p: &Path| format!("{:?}", p.to_str().expect("utf-8 path"));
        let hub_keys = match &hub {
            HubBackend::Embedded => String::new(),
            HubBackend::Nats { url, prefix, extra } => super::nats::hub_toml(url, prefix, extra),
        };
        let (pki_dir, authority_key) = match cluster {
            Some(Some(first)) => (first.pki_dir.clone(), first.authority_key.clone()),
            _ => (data.join("pki"), data.join("authority-key.pem")),
        };
        let mut text = format!(
            "[coap]\naddress = \"127.0.0.1:{port}\"\nshards = 1\n{extra}\n\n\
             [hub]\ndata_dir = {data}\n{hub_keys}\n\
             [api]\naddress = \"127.0.0.1:{api_port}\"\n",
            data = path(&data),
        );
        match cluster {
            None => {}
            Some(None) => {
                text.push_str(&format!("\n[authority]\nissuer = {CLUSTER_ISSUER:?}\n"));
            }
            Some(Some(_)) => {
                text.push_str(&format!(
                    "\n[coap.tls]\nca = {}\ncert = {}\nkey = {}\n\n\
                     [authority]\nissuer = {CLUSTER_ISSUER:?}\nkey_file = {}\n",
                    path(&pki_dir.join("ca.pem")),
                    path(&pki_dir.join("gateway.pem")),
                    path(&pki_dir.join("gateway-key.pem")),
                    path(&authority_key),
                ));
            }
        }
        std::fs::write(&config, text).expect("config");
        Setup {
            dir,
            config,
            data,
            port,
            api_port,
            pki_dir,
            authority_key,
            hub,
        }
    }

    pub fn pki(&self) -> PathBuf {
        self.pki_dir.clone()
    }

    /// Runs a `coap-gateway` command (not `serve`) with this config and
    /// returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .expect("coap-gateway runs");
        assert!(
            out.status.success(),
            "coap-gateway {args:?}: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// `certs device` for `device_id` into `<data>/devices`; returns
    /// (certificate, key).
    pub fn device_certificate(&self, device_id: &str) -> (PathBuf, PathBuf) {
        let out = self.data.join("devices");
        self.cli(&[
            "certs",
            "device",
            "--ca",
            self.pki().to_str().expect("utf-8"),
            "--device-id",
            device_id,
            "--out",
            out.to_str().expect("utf-8"),
        ]);
        (out.join("device.pem"), out.join("device-key.pem"))
    }

    /// `serve` with this config; waits until the CoAP and API ports listen.
    pub fn serve(&self) -> Gateway {
        let stderr = self.dir.path().join(format!("gateway-{}.log", free_port()));
        let mut gw = Gateway {
            child: Command::new(BIN)
                .args(["serve", "--config"])
                .arg(&self.config)
                .env_remove("RUST_LOG")
                .stdout(Stdio::null())
                .stderr(File::create(&stderr).expect("log file"))
                .spawn()
                .expect("gateway starts"),
            stderr,
        };
        for port in [self.port, self.api_port] {
            let started = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Ok(Some(status)) = gw.child.try_wait() {
                    panic!("gateway exited early: {status}\n{}", gw.log());
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "gateway did not listen on {port}\n{}",
                    gw.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if self.hub.is_nats() {
            // The API listens before the hub has reached the broker;
            // `/readyz` says when it has.
            self.wait_ready(&mut gw, Duration::from_secs(20));
        }
        gw
    }

    /// The status of `GET /readyz` (0 when the API does not answer).
    pub fn readyz(&self) -> u16 {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        agent
            .get(&format!("http://127.0.0.1:{}/readyz", self.api_port))
            .call()
            .map_or(0, |r| r.status().as_u16())
    }

    /// Polls `/readyz` until 200; panics with the log after `limit` or if
    /// the gateway exits.
    pub fn wait_ready(&self, gw: &mut Gateway, limit: Duration) {
        let started = Instant::now();
        loop {
            let status = self.readyz();
            if status == 200 {
                return;
            }
            if let Ok(Some(exit)) = gw.child.try_wait() {
                panic!("gateway exited early: {exit}\n{}", gw.log());
            }
            assert!(
                started.elapsed() < limit,
                "gateway not ready (/readyz {status}) within {limit:?}\n{}",
                gw.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn api(&self, token: &str) -> Api {
        Api {
            base: format!("http://127.0.0.1:{}", self.api_port),
            token: token.to_owned(),
        }
    }
}

/// The gateway process; killed if the test ends before it stops it.
pub struct Gateway {
    pub child: Child,
    pub stderr: PathBuf,
}

impl Gateway {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGKILL: the process dies without any clean-up.
    pub fn kill_9(&mut self) {
        let ok = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -9");
        wait_exit(&mut self.child, Duration::from_secs(10)).expect("killed");
    }

    /// SIGTERM; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -TERM");
        wait_exit(&mut self.child, Duration::from_secs(10)).and_then(|s| s.code())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The HTTP API with one owner's bearer token.
pub struct Api {
    pub base: String,
    pub token: String,
}

impl Api {
    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into()
    }

    fn answer(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
        let mut response = response.expect("HTTP");
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        Self::answer(
            Self::agent()
                .get(&format!("{}{path}", self.base))
                .header("Authorization", &format!("Bearer {}", self.token))
                .call(),
        )
    }

    pub fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        Self::answer(
            Self::agent()
                .put(&format!("{}{path}", self.base))
                .header("Authorization", &format!("Bearer {}", self.token))
                .header("Content-Type", "application/json")
                .send(body.to_string().as_bytes()),
        )
    }
}

impl Api {
    pub fn delete(&self, path: &str) -> (u16, Value) {
        Self::answer(
            Self::agent()
                .delete(&format!("{}{path}", self.base))
                .header("Authorization", &format!("Bearer {}", self.token))
                .call(),
        )
    }

    /// `GET /api/v1/events{query}` (server-sent events), with
    /// `Last-Event-ID` when given (the hub replays its log after it);
    /// read on a thread of its own for at most `limit`.
    pub fn events(&self, query: &str, last_event_id: Option<u64>, limit: Duration) -> EventStream {
        let (tx, rx) = mpsc::channel();
        let url = format!("{}/api/v1/events{query}", self.base);
        let token = self.token.clone();
        std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(limit))
                .build()
                .into();
            let mut request = agent
                .get(&url)
                .header("Authorization", &format!("Bearer {token}"));
            if let Some(id) = last_event_id {
                request = request.header("Last-Event-ID", &id.to_string());
            }
            let response = match request.call() {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(format!("GET {url}: {e}")));
                    return;
                }
            };
            if response.status().as_u16() != 200 {
                let status = response.status();
                let body = response.into_body().read_to_string().unwrap_or_default();
                let _ = tx.send(Err(format!("GET {url}: {status} {body}")));
                return;
            }
            let reader = BufReader::new(response.into_body().into_reader());
            let (mut event, mut id, mut data) = (String::new(), None, String::new());
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if line.is_empty() {
                    // WHATWG HTML §9.2.6: a blank line dispatches.
                    if !data.is_empty() {
                        let parsed =
                            serde_json::from_str(&data).unwrap_or(Value::String(data.clone()));
                        let e = SseEvent {
                            id,
                            event: std::mem::take(&mut event),
                            data: parsed,
                        };
                        if tx.send(Ok(e)).is_err() {
                            return;
                        }
                    }
                    event.clear();
                    data.clear();
                    id = None;
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim_start().to_owned();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            let _ = tx.send(Err("the event stream ended".to_owned()));
        });
        EventStream { rx, ended: None }
    }
}

/// One event of `GET /api/v1/events`.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// `id:`, the hub's sequence number.
    pub id: Option<u64>,
    /// `event:`, the kind (`resource_changed`, `command_answered`, ...).
    pub event: String,
    /// `data:` as JSON.
    pub data: Value,
}

/// The events of one `GET /api/v1/events`, as they arrive.
pub struct EventStream {
    rx: mpsc::Receiver<Result<SseEvent, String>>,
    /// Why the stream ended, once it has.
    pub ended: Option<String>,
}

impl EventStream {
    /// The next event within `wait`; `None` on timeout or once the stream
    /// ended (then [`ended`](Self::ended) says why).
    pub fn next(&mut self, wait: Duration) -> Option<SseEvent> {
        if self.ended.is_some() {
            return None;
        }
        match self.rx.recv_timeout(wait) {
            Ok(Ok(e)) => Some(e),
            Ok(Err(why)) => {
                self.ended = Some(why);
                None
            }
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.ended = Some("the reader stopped".to_owned());
                None
            }
        }
    }

    /// Every event until none came for `quiet` after the first (which
    /// may take up to `first`: the answer's head waits for a replay), the
    /// stream ended, or `limit` passed.
    pub fn until_quiet(
        &mut self,
        first: Duration,
        quiet: Duration,
        limit: Duration,
    ) -> Vec<SseEvent> {
        let started = Instant::now();
        let mut events = Vec::new();
        while started.elapsed() < limit {
            let wait = if events.is_empty() { first } else { quiet };
            match self.next(wait) {
                Some(e) => events.push(e),
                None => break,
            }
        }
        events
    }
}
