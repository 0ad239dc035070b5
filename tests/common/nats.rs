//! `nats-server` for the tests of the NATS JetStream hub (issue 6):
//! one server with JetStream on loopback ports of its own and a store
//! dir of its own, or a three-node cluster on loopback; each can be
//! killed (`kill -9`) and started again on the same ports and store dir.
//! Debian's `nats-server` package is what scripts/test installs; a test
//! that needs it and does not find it panics saying so (it never skips).
//!
//! [`shared`] is one server for a whole test binary, used by the tests
//! that run a second time against `[hub] kind = "nats"`
//! (`COAP_GATEWAY_TEST_HUB=nats`, see process.rs); each of their
//! gateways gets a [`unique_prefix`] so they do not see each other.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::process::{free_port, wait_exit};

/// How long a server (or a cluster) may take to have JetStream ready.
pub const STARTUP: Duration = Duration::from_secs(20);

/// The variable naming the backend of the tests that run against both:
/// `nats` runs them against a NATS hub, anything else (or unset) against
/// the embedded one.
pub const HUB_ENV: &str = "COAP_GATEWAY_TEST_HUB";

/// Whether this run is the NATS pass of the suite (`COAP_GATEWAY_TEST_HUB=nats`).
pub fn nats_pass() -> bool {
    std::env::var(HUB_ENV).is_ok_and(|v| v == "nats")
}

/// The `nats-server` executable: `COAP_GATEWAY_TEST_NATS_SERVER`, else
/// `nats-server` on the PATH, else Debian's `/usr/sbin/nats-server` (not
/// on a normal user's PATH). Panics with what to do when there is none.
pub fn nats_server_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = BIN.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os("COAP_GATEWAY_TEST_NATS_SERVER") {
            candidates.push(PathBuf::from(p));
        }
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
        }
        candidates.push(PathBuf::from("/usr/sbin/nats-server"));
        candidates.push(PathBuf::from("/usr/bin/nats-server"));
        candidates
            .into_iter()
            .find(|p| {
                Command::new(p)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .ok_or_else(|| {
                "no nats-server found (looked at $COAP_GATEWAY_TEST_NATS_SERVER, the PATH, \
                 /usr/sbin and /usr/bin). The NATS hub tests need it: run scripts/test, which \
                 installs Debian's nats-server package (or `apt-get install nats-server`)"
                    .to_owned()
            })
    });
    match found {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// A per-test prefix of subjects, streams and buckets (`[hub.nats]
/// prefix`): letters and digits only, so it is a valid subject token and
/// stream name; unique within this process and across processes.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("t{}x{n}x{nanos:x}", std::process::id())
}

/// `k` free loopback ports, no two the same (each [`free_port`] is free
/// when asked, but two calls may give the same one).
pub fn distinct_ports(k: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::with_capacity(k);
    for _ in 0..k * 10 {
        if ports.len() == k {
            break;
        }
        let p = free_port();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    assert_eq!(ports.len(), k, "{k} distinct free ports");
    ports
}

/// GET `http://127.0.0.1:<port><path>` as JSON; `None` when the server
/// does not answer (yet) or answers something else than 200 with JSON.
pub fn monitor_json(port: u16, path: &str) -> Option<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    let mut response = agent
        .get(&format!("http://127.0.0.1:{port}{path}"))
        .call()
        .ok()?;
    if response.status().as_u16() != 200 {
        return None;
    }
    let text = response.body_mut().read_to_string().ok()?;
    serde_json::from_str(&text).ok()
}

/// Route settings of a cluster node.
#[derive(Debug, Clone)]
struct ClusterArgs {
    name: String,
    port: u16,
    routes: Vec<u16>,
}

/// One `nats-server -js` on loopback; killed when dropped.
pub struct NatsServer {
    /// The client port (`nats://127.0.0.1:<port>`).
    pub port: u16,
    /// The HTTP monitoring port (`-m`): `/healthz`, `/jsz`.
    pub monitor_port: u16,
    /// `server_name`.
    pub name: String,
    /// The JetStream store dir (`-sd`); kept across restarts.
    pub store: PathBuf,
    /// The server's log (`-l`), appended to across restarts.
    pub log: PathBuf,
    cluster: Option<ClusterArgs>,
    child: Option<Child>,
    /// Owns `store` and `log` when the server was started on its own.
    _dir: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// A single server with JetStream in a fresh temp dir; waits until
    /// JetStream is ready.
    pub fn start() -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = NatsServer::configured(dir.path(), "single", None);
        server._dir = Some(dir);
        server.spawn();
        server.wait_ready(None, STARTUP);
        server
    }

    /// Ports and paths under `dir`; not started.
    fn configured(dir: &Path, name: &str, cluster: Option<ClusterArgs>) -> NatsServer {
        NatsServer {
            port: free_port(),
            monitor_port: free_port(),
            name: name.to_owned(),
            store: dir.join(format!("{name}-store")),
            log: dir.join(format!("{name}.log")),
            cluster,
            child: None,
            _dir: None,
        }
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            self.port.to_string(),
            "-m".into(),
            self.monitor_port.to_string(),
            "-js".into(),
            "-sd".into(),
            self.store.to_str().expect("utf-8 path").into(),
            "--server_name".into(),
            self.name.clone(),
        ];
        if let Some(c) = &self.cluster {
            let routes: Vec<String> = c
                .routes
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            args.extend([
                "--cluster_name".into(),
                c.name.clone(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{}", c.port),
                "--routes".into(),
                routes.join(","),
            ]);
        }
        args
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("nats-server log file");
        let child = Command::new(nats_server_bin())
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("nats-server starts: {e}"));
        self.child = Some(child);
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/jsz` of this server, if it answers.
    pub fn jsz(&self) -> Option<Value> {
        monitor_json(self.monitor_port, "/jsz")
    }

    /// Whether JetStream is up here: `/healthz` says ok and `/jsz` shows
    /// the JetStream config, and with `cluster_size` a meta leader
    /// elected in a meta group of that size.
    pub fn jetstream_ready(&self, cluster_size: Option<u64>) -> bool {
        self.readiness(cluster_size).is_ok()
    }

    /// [`jetstream_ready`](Self::jetstream_ready), or what is missing.
    pub fn readiness(&self, cluster_size: Option<u64>) -> Result<(), String> {
        let health = monitor_json(self.monitor_port, "/healthz");
        if !health.as_ref().is_some_and(|h| h["status"] == "ok") {
            return Err(format!("/healthz: {health:?}"));
        }
        let jsz = self.jsz().ok_or("/jsz does not answer")?;
        if jsz["config"].is_null() {
            return Err(format!("/jsz without JetStream config: {jsz}"));
        }
        if let Some(n) = cluster_size {
            let meta = &jsz["meta_cluster"];
            let led = meta["leader"].as_str().is_some_and(|l| !l.is_empty());
            if !led || meta["cluster_size"].as_u64() != Some(n) {
                return Err(format!(
                    "/jsz meta_cluster (want {n} nodes and a leader): {meta}"
                ));
            }
        }
        Ok(())
    }

    /// Panics with the log if the server process has exited.
    fn assert_alive(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nats-server {} exited: {status}\n{}",
                    self.name,
                    self.log_text()
                );
            }
        }
    }

    /// Polls the monitoring endpoint until [`jetstream_ready`](Self::jetstream_ready);
    /// panics with the log after `limit` or if the server exits.
    pub fn wait_ready(&mut self, cluster_size: Option<u64>, limit: Duration) {
        let started = Instant::now();
        loop {
            let why = match self.readiness(cluster_size) {
                Ok(()) => return,
                Err(why) => why,
            };
            self.assert_alive();
            assert!(
                started.elapsed() < limit,
                "nats-server {}: JetStream not ready within {limit:?}: {why}\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the server dies without any clean-up (its store dir stays).
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            wait_exit(&mut child, Duration::from_secs(10)).expect("nats-server killed");
        }
    }

    /// SIGTERM (a clean stop: it leaves its cluster, flushes its store).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let ok = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if !ok || wait_exit(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Starts a stopped or killed server again on the same ports and store
    /// dir; does not wait for JetStream (see [`wait_ready`](Self::wait_ready)).
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// [`restart`](Self::restart) and wait until JetStream is ready again.
    pub fn restart_and_wait(&mut self) {
        self.spawn();
        let size = self.cluster.as_ref().map(|c| c.routes.len() as u64);
        self.wait_ready(size, STARTUP);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `n` `nats-server -js` routed to each other on loopback (one cluster
/// name, a `server_name` and a store dir each); killed when dropped.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` nodes and waits until each sees a meta leader elected in
    /// a meta group of `n` (JetStream clustered and ready, so an R`n`
    /// stream can be created).
    pub fn start(n: usize) -> NatsCluster {
        assert!(n >= 1, "a cluster of at least one node");
        let dir = tempfile::tempdir().expect("tempdir");
        // Client, monitoring and route ports, all distinct.
        let mut ports = distinct_ports(3 * n).into_iter();
        let mut take = || ports.next().expect("enough ports");
        let route_ports: Vec<u16> = (0..n).map(|_| take()).collect();
        let cluster_name = format!("c{}", unique_prefix());
        let mut nodes: Vec<NatsServer> = route_ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let mut node = NatsServer::configured(
                    dir.path(),
                    &format!("n{}", i + 1),
                    Some(ClusterArgs {
                        name: cluster_name.clone(),
                        port: *port,
                        routes: route_ports.clone(),
                    }),
                );
                node.port = take();
                node.monitor_port = take();
                node
            })
            .collect();
        for node in &mut nodes {
            node.spawn();
        }
        let mut cluster = NatsCluster { nodes, _dir: dir };
        cluster.wait_ready(STARTUP);
        cluster
    }

    /// Waits until every running node is ready ([`NatsServer::readiness`]
    /// for the whole cluster's size); panics with every node's log after
    /// `limit` or when a node exited.
    pub fn wait_ready(&mut self, limit: Duration) {
        let size = self.nodes.len() as u64;
        let started = Instant::now();
        loop {
            let mut waiting = Vec::new();
            for node in &mut self.nodes {
                if node.child.is_none() {
                    continue;
                }
                if let Err(why) = node.readiness(Some(size)) {
                    waiting.push(format!("{}: {why}", node.name));
                }
            }
            if waiting.is_empty() {
                return;
            }
            for node in &mut self.nodes {
                if node.child.is_some() {
                    node.assert_alive();
                }
            }
            assert!(
                started.elapsed() < limit,
                "the NATS cluster is not ready within {limit:?}: {waiting:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every node's client URL, comma-separated (`[hub.nats] url`).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The `server_name` of the meta leader, as the first node that
    /// answers sees it.
    pub fn meta_leader(&self) -> Option<String> {
        self.nodes.iter().find_map(|n| {
            n.jsz()?["meta_cluster"]["leader"]
                .as_str()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
        })
    }

    /// The logs of every node, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name, n.log_text()))
            .collect()
    }
}

/// One server for every test of this binary that runs against the NATS
/// hub. It lives as long as the test process: a `sh` holds it and kills
/// it (and removes its store dir) when its stdin, a pipe this process
/// keeps open, reaches end-of-file, which is when this process exits,
/// however it exits.
pub struct SharedNats {
    pub port: u16,
    pub monitor_port: u16,
    pub dir: PathBuf,
    _keeper: Child,
    _lifeline: ChildStdin,
}

impl SharedNats {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// The [`SharedNats`] of this test process, started on first use.
pub fn shared() -> &'static SharedNats {
    static SHARED: OnceLock<SharedNats> = OnceLock::new();
    SHARED.get_or_init(|| {
        let bin = nats_server_bin();
        let ports = distinct_ports(2);
        let (port, monitor_port) = (ports[0], ports[1]);
        let dir = std::env::temp_dir().join(format!("coap-gateway-test-nats-{}", unique_prefix()));
        std::fs::create_dir_all(&dir).expect("shared nats dir");
        // $1 = nats-server, $2 = the dir, the rest its arguments. The
        // server runs in the background (its stdin is /dev/null); `read`
        // returns when our end of the pipe closes.
        let script = r#"bin=$1; dir=$2; shift 2
"$bin" "$@" 2>>"$dir/nats.log" &
pid=$!
read -r _ignored
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
rm -rf "$dir""#;
        let mut keeper = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(&bin)
            .arg(&dir)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-m",
                &monitor_port.to_string(),
                "-js",
                "-sd",
                dir.join("store").to_str().expect("utf-8 path"),
                "--server_name",
                "shared",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sh starts");
        let lifeline = keeper.stdin.take().expect("piped stdin");
        let started = Instant::now();
        loop {
            let up = monitor_json(monitor_port, "/jsz").is_some_and(|j| !j["config"].is_null());
            if up {
                break;
            }
            if let Ok(Some(status)) = keeper.try_wait() {
                panic!(
                    "the shared nats-server exited: {status}\n{}",
                    std::fs::read_to_string(dir.join("nats.log")).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < STARTUP,
                "the shared nats-server: JetStream not ready within {STARTUP:?}\n{}",
                std::fs::read_to_string(dir.join("nats.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        SharedNats {
            port,
            monitor_port,
            dir,
            _keeper: keeper,
            _lifeline: lifeline,
        }
    })
}

/// The `[hub]` keys (after `data_dir`) and the `[hub.nats]` table of a
/// gateway on the NATS hub at `url` under `prefix`; `extra` is more
/// `[hub.nats]` keys (e.g. `heartbeat_ttl = "3s"`).
pub fn hub_toml(url: &str, prefix: &str, extra: &str) -> String {
    format!("kind = \"nats\"\n\n[hub.nats]\nurl = {url:?}\nprefix = {prefix:?}\n{extra}\n")
}

/// A bare NATS client (the text protocol, no TLS, no auth) for checking
/// a server from a test: request/reply with the JetStream API, e.g.
/// `$JS.API.STREAM.INFO.<name>`. Not the gateway's client: the tests
/// must not share code with what they test.
pub struct RawClient {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
    next_sid: u32,
}

impl RawClient {
    /// Connects to `127.0.0.1:port` and completes the INFO/CONNECT
    /// exchange; `None` if the server does not answer.
    pub fn connect(port: u16) -> Option<RawClient> {
        use std::io::Write;
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut client = RawClient {
            stream,
            buf: Vec::new(),
            next_sid: 0,
        };
        let info = client.line()?;
        if !info.starts_with("INFO ") {
            return None;
        }
        client
            .stream
            .write_all(
                b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false}\r\nPING\r\n",
            )
            .ok()?;
        loop {
            match client.line()?.as_str() {
                "PONG" => return Some(client),
                l if l.starts_with("-ERR") => return None,
                _ => {}
            }
        }
    }

    /// One protocol line without its CRLF.
    fn line(&mut self) -> Option<String> {
        use std::io::Read;
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Some(line);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn payload(&mut self, len: usize) -> Option<Vec<u8>> {
        use std::io::Read;
        while self.buf.len() < len + 2 {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let body = self.buf[..len].to_vec();
        self.buf.drain(..len + 2);
        Some(body)
    }

    /// Publishes `payload` on `subject` with a fresh reply inbox and
    /// returns the reply as JSON; `None` without a reply within `wait`.
    pub fn request(&mut self, subject: &str, payload: &[u8], wait: Duration) -> Option<Value> {
        use std::io::Write;
        self.next_sid += 1;
        let sid = self.next_sid;
        let inbox = format!("_INBOX.test.{sid}");
        let mut out = format!(
            "SUB {inbox} {sid}\r\nPUB {subject} {inbox} {}\r\n",
            payload.len()
        )
        .into_bytes();
        out.extend_from_slice(payload);
        out.extend_from_slice(format!("\r\nUNSUB {sid} 1\r\n").as_bytes());
        self.stream.write_all(&out).ok()?;
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).ok()?;
            let line = self.line()?;
            if line == "PING" {
                self.stream.write_all(b"PONG\r\n").ok()?;
                continue;
            }
            // MSG <subject> <sid> [reply] <#bytes>
            let Some(rest) = line.strip_prefix("MSG ") else {
                continue;
            };
            let parts: Vec<&str> = rest.split(' ').collect();
            let len: usize = parts.last()?.parse().ok()?;
            let body = self.payload(len)?;
            if parts.get(1) == Some(&sid.to_string().as_str()) {
                return serde_json::from_slice(&body).ok();
            }
        }
    }

    /// A JetStream API request (`$JS.API.<api>`); `None` without a reply,
    /// the reply otherwise (which may carry an `error`).
    pub fn js(&mut self, api: &str, body: &Value) -> Option<Value> {
        self.request(
            &format!("$JS.API.{api}"),
            body.to_string().as_bytes(),
            Duration::from_secs(5),
        )
    }
}
