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

mod common;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::{python, wait_exit, Setup};
use serde_json::Value;

const DEVICE_ID: &str = "8c1e5f39-3a4e-4d8e-9f3c-4d1c2b7a9e01";
const OWNER: &str = "alice";

#[test]
fn aiocoap_device_signs_up_signs_in_publishes_and_signs_out() {
    let python = python();
    // First start creates the development PKI in data/pki.
    let setup = Setup::new("");
    let dir = &setup.dir;
    let mut gw = setup.serve();

    // The device certificate and the sign-up code, as a user makes them.
    let pki = setup.pki();
    let (device_cert, device_key) = setup.device_certificate(DEVICE_ID);
    let code = setup.cli(&["token", "code", "--owner", OWNER]);
    let code = code.trim();
    assert!(!code.is_empty());

    // The device: its own bounded timeouts (10 s per request), and a bound
    // here in case the interpreter hangs.
    let out_path = dir.path().join("device.out");
    let err_path = dir.path().join("device.err");
    let mut device = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/aiocoap_device.py"))
        .arg(format!("127.0.0.1:{}", setup.port))
        .arg(pki.join("ca.pem"))
        .arg(&device_cert)
        .arg(&device_key)
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
    let status = gw.terminate();
    assert_eq!(status, Some(0), "gateway after SIGTERM\n{}", gw.log());
}
