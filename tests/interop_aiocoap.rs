//! Interoperability with an independent CoAP implementation playing an OCF
//! device: Python's aiocoap (tests/aiocoap_device.py) over `coaps+tcp` with
//! the device certificate `coap-gateway certs device` makes, against the
//! `coap-gateway` binary as a user runs it: sign-up with a code from
//! `coap-gateway token code`, sign-in, publish, sign-out (spec §5.2, §5.4,
//! §5.5, §5.7), then SIGTERM and exit 0.
//!
//! The interpreter is the virtualenv scripts/test sets up with aiocoap and
//! cbor2, passed as COAP_GATEWAY_TEST_PYTHON; without it the test fails (it
//! never skips).

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_coap-gateway");
const DEVICE_ID: &str = "8c1e5f39-3a4e-4d8e-9f3c-4d1c2b7a9e01";
const OWNER: &str = "alice";

/// The Python with aiocoap and cbor2: COAP_GATEWAY_TEST_PYTHON (scripts/test
/// exports it), else the virtualenv scripts/test leaves in target/.
fn python() -> PathBuf {
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The gateway process; killed if the test panics before it stops it.
struct Gateway {
    child: Child,
    stderr: PathBuf,
}

impl Gateway {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
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

fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
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

/// Runs a `coap-gateway` command (not `serve`) with the test's config and
/// returns its stdout.
fn cli(config: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
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

#[test]
fn aiocoap_device_signs_up_signs_in_publishes_and_signs_out() {
    let python = python();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_port();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[coap]\naddress = \"127.0.0.1:{port}\"\nshards = 1\n\n\
             [hub]\ndata_dir = {data:?}\n\n\
             [api]\naddress = \"127.0.0.1:0\"\n",
            data = data.to_str().expect("utf-8 path"),
        ),
    )
    .expect("config");

    // First start creates the development PKI in data/pki.
    let stderr = dir.path().join("gateway.log");
    let mut gw = Gateway {
        child: Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("log file"))
            .spawn()
            .expect("gateway starts"),
        stderr,
    };
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

    // The device certificate and the sign-up code, as a user makes them.
    let pki = data.join("pki");
    let devices = data.join("devices");
    cli(
        &config,
        &[
            "certs",
            "device",
            "--ca",
            pki.to_str().unwrap(),
            "--device-id",
            DEVICE_ID,
            "--out",
            devices.to_str().unwrap(),
        ],
    );
    let code = cli(&config, &["token", "code", "--owner", OWNER]);
    let code = code.trim();
    assert!(!code.is_empty());

    // The device: its own bounded timeouts (10 s per request), and a bound
    // here in case the interpreter hangs.
    let out_path = dir.path().join("device.out");
    let err_path = dir.path().join("device.err");
    let mut device = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/aiocoap_device.py"))
        .arg(format!("127.0.0.1:{port}"))
        .arg(pki.join("ca.pem"))
        .arg(devices.join("device.pem"))
        .arg(devices.join("device-key.pem"))
        .arg(DEVICE_ID)
        .arg(code)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("out file"))
        .stderr(File::create(&err_path).expect("err file"))
        .spawn()
        .expect("python starts");
    let status = wait_exit(&mut device, Duration::from_secs(120));
    if status.is_none() {
        let _ = device.kill();
        let _ = device.wait();
    }
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let device_stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let context = format!(
        "device exit: {status:?}\n--- device stdout:\n{stdout}\n--- device stderr:\n{device_stderr}\n--- gateway log:\n{}",
        gw.log()
    );
    let status = status.unwrap_or_else(|| panic!("the aiocoap device hung\n{context}"));
    let report: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON report from the device\n{context}"));
    assert!(status.success(), "the aiocoap device failed\n{context}");
    assert_eq!(report["ok"], Value::Bool(true), "{context}");
    eprintln!("aiocoap device report: {report}");

    // What the device checked, checked again here where a reader of the
    // test looks (the script exits non-zero on any mismatch).
    let steps = &report["steps"];
    for (step, code) in [
        ("time", "2.05 Content"),
        ("sign_up", "2.04 Changed"),
        ("sign_in", "2.04 Changed"),
        ("publish", "2.04 Changed"),
        ("sign_out", "2.04 Changed"),
    ] {
        assert_eq!(steps[step]["code"], code, "{step}\n{context}");
        assert_eq!(steps[step]["content_format"], 10000, "{step}\n{context}");
    }
    let account = &steps["sign_up"]["payload"];
    assert_eq!(account["uid"], OWNER, "{context}");
    for key in ["accesstoken", "refreshtoken"] {
        assert!(
            account[key].as_str().is_some_and(|t| !t.is_empty()),
            "{key}\n{context}"
        );
    }
    assert!(account["expiresin"].is_i64(), "{context}");
    assert!(
        steps["sign_in"]["payload"]["expiresin"].is_i64(),
        "{context}"
    );
    let link = &steps["publish"]["payload"]["links"][0];
    assert_eq!(link["href"], "/light/1", "{context}");
    assert_eq!(link["ins"], crc32fast::hash(b"/light/1"), "{context}");
    assert_eq!(link["di"], DEVICE_ID, "{context}");
    assert_eq!(steps["sign_out"]["payload_hex"], "a0", "{context}");

    // SIGTERM: drain and exit 0.
    let ok = Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
    let status = wait_exit(&mut gw.child, Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "gateway after SIGTERM: {status:?}\n{}",
        gw.log()
    );
}
