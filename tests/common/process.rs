//! The `coap-gateway` binary as a user runs it: a config file in a
//! temporary directory, `serve` as a child process (killed when dropped),
//! the CLI for certificates and tokens, an HTTP client for the API, and
//! the Python with aiocoap that scripts/test prepares.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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

/// A gateway's directory: config file, data dir, ports.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    pub api_port: u16,
}

impl Setup {
    /// One shard on loopback, the data dir inside a temp dir, `extra`
    /// appended to the config.
    pub fn new(extra: &str) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let port = free_port();
        let api_port = free_port();
        let config = dir.path().join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "[coap]\naddress = \"127.0.0.1:{port}\"\nshards = 1\n{extra}\n\n\
                 [hub]\ndata_dir = {data:?}\n\n\
                 [api]\naddress = \"127.0.0.1:{api_port}\"\n",
                data = data.to_str().expect("utf-8 path"),
            ),
        )
        .expect("config");
        Setup {
            dir,
            config,
            data,
            port,
            api_port,
        }
    }

    pub fn pki(&self) -> PathBuf {
        self.data.join("pki")
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
        gw
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
