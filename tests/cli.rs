//! The `coap-gateway` binary as a user runs it (SURFACE.md): first start on
//! the embedded defaults, a second instance on a taken port, SIGTERM,
//! `check-config`, `certs`.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coap_gateway::coap::Code;
use common::TestDevice;

const BIN: &str = env!("CARGO_BIN_EXE_coap-gateway");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn gateway(dir: &Path, port: u16) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env_remove("RUST_LOG")
        .env("COAP_GATEWAY__COAP__ADDRESS", format!("127.0.0.1:{port}"))
        .env("COAP_GATEWAY__COAP__SHARDS", "1")
        .env("COAP_GATEWAY__API__ADDRESS", "127.0.0.1:0");
    cmd
}

fn wait_for_port(port: u16, child: &mut Child) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("gateway exited early: {status}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "gateway did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `certs device` as a user runs it (CA in `data/pki`), then a TLS device
/// with that certificate connected to the gateway on `port`.
fn device_with_cli_certificate(dir: &Path, port: u16) -> TestDevice {
    let status = Command::new(BIN)
        .current_dir(dir)
        .args([
            "certs",
            "device",
            "--ca",
            "data/pki",
            "--out",
            "data/devices",
        ])
        .args(["--device-id", common::DEVICE_ID])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let d = dir.join("data/devices");
    let client = coap_gateway::auth::tls::client_config(
        &dir.join("data/pki/ca.pem"),
        Some((&d.join("device.pem"), &d.join("device-key.pem"))),
    )
    .unwrap();
    TestDevice::connect_tls(([127, 0, 0, 1], port).into(), client).unwrap()
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("gateway did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn first_start_creates_the_dev_pki_serves_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = gateway(dir.path(), port)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_port(port, &mut child);
    for f in ["ca.pem", "ca-key.pem", "gateway.pem", "gateway-key.pem"] {
        assert!(dir.path().join("data/pki").join(f).exists(), "{f} missing");
    }

    // A device certificate from the printed command, then a real device.
    let mut dev = device_with_cli_certificate(dir.path(), port);
    assert_eq!(dev.recv().unwrap().code, Code::CSM);

    // SIGTERM: Release to the device, then exit 0.
    sigterm(&child);
    let (msgs, _) = dev.recv_until_closed(Duration::from_secs(10));
    assert_eq!(
        msgs.iter().map(|m| m.code).collect::<Vec<_>>(),
        vec![Code::RELEASE]
    );
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.contains("Created a development PKI"), "{stderr}");
    assert!(stderr.contains("certs device"), "{stderr}");
    assert!(stderr.contains("coap-client-openssl"), "{stderr}");

    // Second start: the PKI is reused, not re-created.
    let mut again = gateway(dir.path(), port)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_port(port, &mut again);
    sigterm(&again);
    assert_eq!(
        wait_exit(&mut again, Duration::from_secs(10)).code(),
        Some(0)
    );
    let mut stderr = String::new();
    again
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!stderr.contains("Created a development PKI"), "{stderr}");
}

#[test]
fn a_second_gateway_on_a_taken_port_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut first = gateway(dir.path(), port)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, &mut first);
    let out = gateway(dir.path(), port).output().unwrap();
    sigterm(&first);
    wait_exit(&mut first, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already in use"), "{stderr}");
}

#[test]
fn bad_config_exits_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[coap]\nadress = \"0.0.0.0:1\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("adress"));

    let out = Command::new(BIN)
        .current_dir(dir.path())
        .env("COAP_GATEWAY__COAP__KEEPALIVE_TIMEOUT", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("COAP_GATEWAY__COAP__KEEPALIVE_TIMEOUT"));
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml");
    let out = Command::new(BIN)
        .args(["check-config", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("keepalive_timeout = \"20s\""), "{text}");
    assert!(text.contains("data/pki/ca.pem"), "{text}");
}

#[test]
fn certs_init_and_device_write_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let hub = "0f6c7ae1-3b8a-4c55-9c2e-111111111111";
    let out = Command::new(BIN)
        .args([
            "certs",
            "init",
            "--out",
            pki.to_str().unwrap(),
            "--hub-id",
            hub,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(hub));
    for (name, any) in [("identity", false), ("plain", true)] {
        let mut cmd = Command::new(BIN);
        cmd.args(["certs", "device", "--ca", pki.to_str().unwrap()])
            .args(["--device-id", common::DEVICE_ID])
            .args(["--out", dir.path().join(name).to_str().unwrap()]);
        if any {
            cmd.arg("--any");
        }
        assert!(cmd.status().unwrap().success());
        assert!(dir.path().join(name).join("device.pem").exists());
    }
    // Refuses to overwrite, with exit code 2.
    let out = Command::new(BIN)
        .args(["certs", "init", "--out", pki.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // A CA directory without a CA is a clear error.
    let out = Command::new(BIN)
        .args(["certs", "device", "--ca", dir.path().to_str().unwrap()])
        .args(["--device-id", common::DEVICE_ID, "--out", "/tmp/x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
}

#[test]
fn http_api_serves_health_readiness_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let ports = common::nats::distinct_ports(2);
    let (port, api_port) = (ports[0], ports[1]);
    let mut child = gateway(dir.path(), port)
        .env(
            "COAP_GATEWAY__API__ADDRESS",
            format!("127.0.0.1:{api_port}"),
        )
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, &mut child);
    wait_for_port(api_port, &mut child);
    let base = format!("http://127.0.0.1:{api_port}");
    let get = |path: &str| -> (u16, String) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut response = agent.get(&format!("{base}{path}")).call().expect("HTTP");
        let status = response.status().as_u16();
        (
            status,
            response.body_mut().read_to_string().unwrap_or_default(),
        )
    };
    assert_eq!(get("/healthz").0, 200);
    assert_eq!(get("/readyz").0, 200);

    // One device connects: the metrics count it on its shard.
    let mut dev = device_with_cli_certificate(dir.path(), port);
    assert_eq!(dev.recv().unwrap().code, Code::CSM);
    let (status, metrics) = get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("coapgw_connections_active{shard=\"0\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("coapgw_tls_handshakes_total{shard=\"0\"} 1"),
        "{metrics}"
    );

    let (status, jwks) = get("/.well-known/jwks.json");
    assert_eq!(status, 200);
    assert!(jwks.contains("\"kty\":\"EC\""), "{jwks}");
    let (status, discovery) = get("/.well-known/openid-configuration");
    assert_eq!(status, 200);
    assert!(discovery.contains("jwks_uri"), "{discovery}");
    assert!(dir.path().join("data/authority-key.pem").exists());

    let (status, body) = get("/nope");
    assert_eq!(status, 404);
    assert!(body.contains("\"code\":404"), "{body}");

    sigterm(&child);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).code(),
        Some(0)
    );
}

#[test]
fn token_commands_sign_with_the_data_dir_key() {
    use coap_gateway::auth::authority::{Authority, AuthoritySettings, SigningKey};
    use coap_gateway::auth::jwt::{AuthorizationMode, TokenValidator};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .args(["--data-dir", data])
            .output()
            .unwrap()
    };
    let code = run(&[
        "token",
        "code",
        "--owner",
        "alice",
        "--device-id",
        common::DEVICE_ID,
    ]);
    assert!(code.status.success(), "{code:?}");
    let code = String::from_utf8(code.stdout).unwrap().trim().to_owned();
    let user = run(&["token", "user", "--owner", "alice", "--ttl", "2h"]);
    assert!(user.status.success(), "{user:?}");
    let user = String::from_utf8(user.stdout).unwrap().trim().to_owned();

    // The key was created in the data dir, private to its owner.
    let key_file = dir.path().join("authority-key.pem");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // Both verify against that key with the default issuer.
    let key = SigningKey::load(&key_file).unwrap();
    let authority = Authority::new(key, AuthoritySettings::new("http://127.0.0.1:8080")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let grant = authority
        .redeem_code(&code, Some(common::DEVICE_ID), now)
        .unwrap();
    assert_eq!(grant.owner(), "alice");
    let validator = TokenValidator::new(
        authority.key_set(),
        authority.validation_settings(AuthorizationMode::ValidToken),
    )
    .unwrap();
    let verified = validator.validate(&user, now).unwrap();
    assert_eq!(verified.owner(), "alice");
    let expires = verified.expires_at().unwrap();
    assert!(
        expires > now + 3600 && expires <= now + 7200 + 5,
        "{expires} vs {now}"
    );
    // A code is not an access token.
    assert!(validator.validate(&code, now).is_err());

    // Bad input is exit 2 with a message.
    let bad = run(&["token", "code", "--owner", ""]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(!bad.stderr.is_empty());
}
