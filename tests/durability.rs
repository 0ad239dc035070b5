//! The embedded hub survives a crash (issue 4): after an acknowledged
//! update and a pending command, `kill -9` the gateway; after a restart on
//! the same data dir the twin and the pending command are there, and the
//! device gets the command when it signs in again.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use coap_gateway::coap::Code;
use common::ocf::*;
use common::process::{Api, Setup};
use common::DEVICE_ID;
use serde_json::{json, Value};

fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let limit = Duration::from_secs(10);
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn light_path() -> String {
    format!("/api/v1/devices/{DEVICE_ID}/resources/light")
}

fn twin_light(api: &Api) -> Value {
    api.get(&light_path()).1["content"].clone()
}

#[test]
fn kill_9_after_an_acknowledged_update_and_a_pending_command_loses_neither() {
    let setup = Setup::new("");
    let mut gw = setup.serve();
    let (cert, key) = setup.device_certificate(DEVICE_ID);
    let tls = coap_gateway::auth::tls::client_config(
        &setup.pki().join("ca.pem"),
        Some((cert.as_path(), key.as_path())),
    )
    .expect("device TLS config");
    let addr = format!("127.0.0.1:{}", setup.port).parse().expect("addr");
    let code = setup.cli(&["token", "code", "--owner", OWNER]);
    let api = setup.api(setup.cli(&["token", "user", "--owner", OWNER]).trim());

    let connect = || {
        let mut dev = OcfDevice::connect_to(addr, tls.clone());
        dev.add_resource("/light", "core.light", json!({"state": false}), true);
        dev
    };
    let mut dev = connect();
    let m = dev.sign_up_with(&sign_up_body(code.trim()));
    assert_eq!(m.code, Code::CHANGED, "sign-up: {}", text(&m));
    let reg = Registration::from_sign_up(&m);
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    let body = dev.publish_body(&["/light"]);
    assert_eq!(dev.publish(&body).code, Code::CHANGED);
    dev.settle(Duration::from_millis(300));

    // An acknowledged update: the device answers while the API waits, so
    // the device is served on another thread meanwhile.
    let served = std::thread::spawn(move || {
        dev.wait_for_request(Duration::from_secs(10), |m| {
            m.code == Code::POST && uri_path(m) == "/light"
        });
        dev.settle(Duration::from_millis(300));
        dev
    });
    let (status, answer) = api.put(&light_path(), &json!({"state": true}));
    assert_eq!(status, 200, "{answer}\n{}", gw.log());
    let dev = served.join().expect("device thread");
    eventually("the twin shows the update", || {
        (twin_light(&api) == json!({"state": true})).then_some(())
    });

    // Offline: a pending command, acknowledged with 202.
    drop(dev);
    eventually("OFFLINE", || {
        let (_, d) = api.get(&format!("/api/v1/devices/{DEVICE_ID}"));
        (d["metadata"]["connection"]["status"] == "OFFLINE").then_some(())
    });
    let (status, pending) = api.put(
        &format!("{}?timeToLive=10m", light_path()),
        &json!({"state": false}),
    );
    assert_eq!(status, 202, "{pending}");
    let correlation = pending["correlationId"]
        .as_str()
        .expect("correlationId")
        .to_owned();

    // The crash.
    gw.kill_9();
    let gw = setup.serve();

    assert_eq!(
        twin_light(&api),
        json!({"state": true}),
        "the twin survived\n{}",
        gw.log()
    );
    let (_, list) = api.get(&format!("/api/v1/devices/{DEVICE_ID}/pending-commands"));
    let ids: Vec<&str> = list
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|c| c["correlationId"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        ids,
        vec![correlation.as_str()],
        "the pending command survived: {list}"
    );

    // The device signs in again and gets the command, once.
    let mut dev = connect();
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    let post = dev.wait_for_request(Duration::from_secs(10), |m| {
        m.code == Code::POST && uri_path(m) == "/light"
    });
    assert_eq!(from_cbor(&post.payload), json!({"state": false}));
    dev.settle(Duration::from_millis(300));
    assert_eq!(
        dev.count_requests(|m| m.code == Code::POST && uri_path(m) == "/light"),
        1
    );
    eventually("no pending command left", || {
        let (_, list) = api.get(&format!("/api/v1/devices/{DEVICE_ID}/pending-commands"));
        list.as_array().is_some_and(Vec::is_empty).then_some(())
    });
}
