//! Interoperability with an independent CoAP implementation: libcoap's
//! `coap-client-openssl` (Debian `libcoap3-bin`, installed by scripts/test)
//! over `coaps+tcp` with a device certificate. libcoap exits 0 even when a
//! request fails, so the tests read its output.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::Command;

use coap_gateway::auth::ClientAuth;
use common::{TestGateway, TestPki};

fn coap_client(args: &[&str]) -> (String, String) {
    let out = Command::new("coap-client-openssl")
        .args(args)
        .output()
        .expect("coap-client-openssl is installed (scripts/test installs libcoap3-bin)");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn libcoap_gets_the_time_over_coaps_tcp_with_a_device_certificate() {
    let pki = TestPki::new();
    let gw = TestGateway::start(&pki.config(ClientAuth::Identity));
    let (cert, key) = pki.cert("device");
    let uri = format!("coaps+tcp://127.0.0.1:{}/x.plgd.dev/time", gw.addr.port());
    let ca = pki.ca();
    // -v 6 prints the response header: code and Content-Format.
    let (stdout, stderr) = coap_client(&[
        "-v",
        "6",
        "-c",
        cert.to_str().unwrap(),
        "-j",
        key.to_str().unwrap(),
        "-R",
        ca.to_str().unwrap(),
        &uri,
    ]);
    let all = format!("{stdout}\n{stderr}");
    assert!(
        all.contains("c:2.05"),
        "no 2.05 in libcoap's output:\n{all}"
    );
    assert!(all.contains("Content-Format:10000"), "{all}");
    // The CBOR payload holds the key "time" and an RFC 3339 date.
    assert!(stdout.contains("time"), "{all}");
    let year = time::OffsetDateTime::now_utc().year().to_string();
    assert!(stdout.contains(&year), "{all}");
}

#[test]
fn libcoap_without_a_client_certificate_is_refused_in_identity_mode() {
    let pki = TestPki::new();
    let gw = TestGateway::start(&pki.config(ClientAuth::Identity));
    let uri = format!("coaps+tcp://127.0.0.1:{}/x.plgd.dev/time", gw.addr.port());
    let ca = pki.ca();
    let (stdout, stderr) = coap_client(&["-v", "6", "-R", ca.to_str().unwrap(), &uri]);
    let all = format!("{stdout}\n{stderr}");
    assert!(
        !all.contains("c:2.05"),
        "served without a certificate:\n{all}"
    );
}
