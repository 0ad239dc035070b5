//! The embedded hub's store as a user meets it: the real binary, a real
//! device, `kill -9`, a restart (issue: "if the gateway process dies, a
//! restart marks devices that were online as OFFLINE before serving"), and
//! `serve --memory`, which keeps nothing.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_gateway::coap::Code;
use common::ocf::{sign_up_body, OcfDevice, Registration};
use common::{TestGateway, DEVICE_ID};

const BIN: &str = env!("CARGO_BIN_EXE_coap-gateway");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The binary in `dir` (data in `dir/data`) with the CoAP and API ports
/// fixed, so that the `token` commands (same environment) sign for the
/// issuer the gateway checks.
fn command(dir: &Path, port: u16, api: u16) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env_remove("RUST_LOG")
        .env("COAP_GATEWAY__COAP__ADDRESS", format!("127.0.0.1:{port}"))
        .env("COAP_GATEWAY__COAP__SHARDS", "1")
        .env("COAP_GATEWAY__API__ADDRESS", format!("127.0.0.1:{api}"));
    cmd
}

/// Waits until `port` accepts; `Err` with the gateway's stderr when it
/// exited first.
fn wait_for_port(port: u16, child: &mut Child, log: &Path) -> Result<(), String> {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let stderr = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!("gateway exited early: {status}\n{stderr}"));
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "gateway did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn serve(dir: &Path, port: u16, api: u16, args: &[&str]) -> Child {
    let log = dir.join("gateway.stderr");
    let started = Instant::now();
    loop {
        let stderr = std::fs::File::create(&log).expect("stderr file");
        let mut child = command(dir, port, api)
            .arg("serve")
            .args(args)
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn the gateway");
        match wait_for_port(port, &mut child, &log)
            .and_then(|()| wait_for_port(api, &mut child, &log))
        {
            Ok(()) => return child,
            // A killed gateway's listener can outlive it briefly (its
            // io_uring is torn down after the process): start again.
            Err(e)
                if e.contains("already in use") && started.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn kill_9(mut child: Child) {
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
}

fn cli(dir: &Path, port: u16, api: u16, args: &[&str]) -> String {
    let out = command(dir, port, api).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The device certificate `certs device` makes from the dev PKI.
fn device_tls(dir: &Path, port: u16, api: u16) -> Arc<rustls::ClientConfig> {
    cli(
        dir,
        port,
        api,
        &[
            "certs",
            "device",
            "--ca",
            "data/pki",
            "--out",
            "data/devices",
            "--device-id",
            DEVICE_ID,
        ],
    );
    let d = dir.join("data/devices");
    coap_gateway::auth::tls::client_config(
        &dir.join("data/pki/ca.pem"),
        Some((&d.join("device.pem"), &d.join("device-key.pem"))),
    )
    .unwrap()
}

/// `GET /api/v1/devices` as the owner: each device's connection status.
fn statuses(api: u16, token: &str) -> Vec<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .get(&format!("http://127.0.0.1:{api}/api/v1/devices"))
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .expect("HTTP");
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value =
        serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    body.as_array()
        .expect("an array of devices")
        .iter()
        .map(|d| {
            d["metadata"]["connection"]["status"]
                .as_str()
                .expect("status")
                .to_owned()
        })
        .collect()
}

#[test]
fn a_device_stays_registered_through_kill_9_and_is_offline_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (port, api) = (free_port(), free_port());
    let gw = serve(dir.path(), port, api, &[]);
    assert!(dir.path().join("data/hub.redb").exists());
    let code = cli(
        dir.path(),
        port,
        api,
        &[
            "token",
            "code",
            "--owner",
            "alice",
            "--device-id",
            DEVICE_ID,
        ],
    );
    let user = cli(
        dir.path(),
        port,
        api,
        &["token", "user", "--owner", "alice"],
    );
    let tls = device_tls(dir.path(), port, api);
    // OcfDevice needs only the address of a gateway.
    let target = TestGateway {
        gateway: None,
        addr: ([127, 0, 0, 1], port).into(),
    };

    let mut dev = OcfDevice::connect_with(&target, tls.clone());
    let m = dev.sign_up_with(&sign_up_body(&code));
    assert_eq!(m.code, Code::CHANGED, "sign-up");
    let reg = Registration::from_sign_up(&m);
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    assert_eq!(statuses(api, &user), ["ONLINE"]);

    // The process dies with the device online.
    kill_9(gw);
    drop(dev);
    let gw = serve(dir.path(), port, api, &[]);
    // Before the device is back: OFFLINE, still alice's.
    assert_eq!(statuses(api, &user), ["OFFLINE"]);
    // Sign-in needs the registration (spec §4.5): it survived.
    let mut dev = OcfDevice::connect_with(&target, tls.clone());
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    assert_eq!(statuses(api, &user), ["ONLINE"]);
    kill_9(gw);
    drop(dev);

    // --memory: the store is not opened, so the device is unknown.
    let gw = serve(dir.path(), port, api, &["--memory"]);
    assert!(statuses(api, &user).is_empty());
    let mut dev = OcfDevice::connect_with(&target, tls);
    let m = dev.sign_in(&reg.uid, &reg.access_token);
    assert_ne!(m.code, Code::CHANGED, "sign-in without a registration");
    kill_9(gw);
}

#[test]
fn a_second_gateway_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (port, api) = (free_port(), free_port());
    let first = serve(dir.path(), port, api, &[]);
    let out = command(dir.path(), free_port(), free_port())
        .arg("serve")
        .output()
        .unwrap();
    kill_9(first);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("hub.redb"), "{stderr}");
    assert!(stderr.contains("already in use"), "{stderr}");
}

#[test]
fn the_control_plane_expires_pending_commands_and_the_store_keeps_the_outcome() {
    use coap_gateway::auth::ClientAuth;
    use coap_gateway::hub::{AuthContext, CommandKind, CommandOutcome, EventKind, Hub};
    let pki = common::TestPki::new();
    let mut gw = TestGateway::start(&pki.config(ClientAuth::Identity));
    let hub = gw.embedded_hub().clone();
    assert!(hub.is_durable());
    hub.add_device(&AuthContext {
        owner: "alice".into(),
        device_id: DEVICE_ID.into(),
        ..AuthContext::default()
    })
    .unwrap();
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let ticket = hub
        .submit_command(
            "alice",
            coap_gateway::hub::Command {
                correlation_id: "soon".into(),
                device_id: DEVICE_ID.into(),
                href: "/light".into(),
                kind: CommandKind::Delete,
                interface: None,
                valid_until_ns: now_ns + 200_000_000,
                issued_at_ns: 0,
            },
        )
        .unwrap();
    assert!(ticket.pending, "the device is offline");
    // spec §7.4: the control plane's periodic expiry (every second).
    assert_eq!(
        ticket.outcome.recv_timeout(Duration::from_secs(5)),
        Ok(CommandOutcome::Expired)
    );
    assert!(hub.pending_commands("alice", DEVICE_ID).unwrap().is_empty());
    gw.stop();
    drop(hub);
    // The expiry is in the log a restart reads.
    let gw = TestGateway::start(&pki.config(ClientAuth::Identity));
    let events = gw.hub().events_after("alice", 0, 100).unwrap();
    assert!(
        events.iter().any(|e| matches!(&e.kind,
            EventKind::CommandExpired { correlation_id, .. } if correlation_id == "soon")),
        "{events:?}"
    );
    assert!(gw
        .hub()
        .pending_commands("alice", DEVICE_ID)
        .unwrap()
        .is_empty());
}
