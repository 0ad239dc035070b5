//! Checklist item 12 (spec §3.5): a signed-in device whose certificate
//! expires is disconnected, with a Release (RFC 8323 §5.5), and goes
//! OFFLINE; `disconnect_on_expired_certificate = false` keeps it (the
//! reference's default).

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_gateway::auth::pki::{Ca, LeafSpec};
use coap_gateway::auth::ClientAuth;
use coap_gateway::coap::Code;
use common::ocf::*;
use common::{TestGateway, TestPki, DEVICE_ID};

/// An identity certificate for [`DEVICE_ID`] from the test CA that expires
/// `valid_for` from now.
fn short_lived(pki: &TestPki, valid_for: Duration) -> Arc<rustls::ClientConfig> {
    let ca = Ca::load(&pki.data_dir().join("pki")).expect("test CA");
    let mut spec = LeafSpec::device(DEVICE_ID.parse().expect("uuid"));
    spec.not_after = time::OffsetDateTime::now_utc() + valid_for;
    let leaf = ca.issue(&spec).expect("short-lived certificate");
    let dir = pki.data_dir().join("short-lived");
    std::fs::create_dir_all(&dir).expect("dir");
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write");
        path
    };
    let cert = write("device.pem", &leaf.cert_pem);
    let key = write("device-key.pem", &leaf.key_pem);
    coap_gateway::auth::tls::client_config(&pki.ca(), Some((cert.as_path(), key.as_path())))
        .expect("client config")
}

fn signed_in_with(gw: &TestGateway, tls: Arc<rustls::ClientConfig>) -> OcfDevice {
    let mut dev = OcfDevice::connect_with(gw, tls);
    let reg = dev.sign_up(gw, OWNER);
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    dev
}

#[test]
fn item_12_a_signed_in_device_whose_certificate_expires_is_released() {
    let pki = TestPki::new();
    let gw = TestGateway::start(&gateway_config(&pki));
    let started = Instant::now();
    let mut dev = signed_in_with(&gw, short_lived(&pki, Duration::from_secs(4)));
    wait_online(&gw, OWNER);
    let took = dev.expect_closed(Duration::from_secs(12)) + started.elapsed();
    let released = dev.unexpected.iter().any(|m| m.code == Code::RELEASE);
    assert!(
        released,
        "no Release before the close: {:?}",
        dev.unexpected
    );
    // X.509 validity has whole seconds: between 3 and 4 s after issue.
    assert!(
        took >= Duration::from_secs(3),
        "closed {took:?} after the certificate was issued, before it expired"
    );
    wait_offline(&gw, OWNER);
}

#[test]
fn item_12_off_a_device_keeps_its_connection_past_its_certificate() {
    let pki = TestPki::new();
    let mut config = gateway_config(&pki);
    config.coap.tls.disconnect_on_expired_certificate = false;
    let gw = TestGateway::start(&config);
    let mut dev = signed_in_with(&gw, short_lived(&pki, Duration::from_secs(2)));
    dev.settle(Duration::from_secs(4));
    dev.assert_open();
    assert!(record(&gw, OWNER).is_some_and(|r| r.status.online));
}

#[test]
fn item_12_a_ca_that_expires_releases_its_devices() {
    // A CA valid for 4 s, a device certificate from it valid for a year.
    let pki = TestPki::new();
    let ca_dir = pki.data_dir().join("short-ca");
    let ca = Ca::generate_until(
        "short-lived test CA",
        time::OffsetDateTime::now_utc() + Duration::from_secs(4),
    )
    .expect("CA");
    std::fs::create_dir_all(&ca_dir).expect("dir");
    std::fs::write(ca_dir.join("ca.pem"), ca.cert_pem()).expect("write");
    std::fs::write(ca_dir.join("ca-key.pem"), ca.key_pem()).expect("write");
    let mut config = pki.config(ClientAuth::Identity);
    config.coap.tls.ca = ca_dir.join("ca.pem");
    let gw = TestGateway::start(&config);
    let leaf = Ca::load(&ca_dir)
        .expect("CA")
        .issue(&LeafSpec::device(DEVICE_ID.parse().expect("uuid")))
        .expect("device");
    std::fs::write(ca_dir.join("device.pem"), &leaf.cert_pem).expect("write");
    std::fs::write(ca_dir.join("device-key.pem"), &leaf.key_pem).expect("write");
    // The device checks the gateway against the test PKI's CA, which
    // signed the gateway's certificate.
    let tls = coap_gateway::auth::tls::client_config(
        &pki.ca(),
        Some((
            ca_dir.join("device.pem").as_path(),
            ca_dir.join("device-key.pem").as_path(),
        )),
    )
    .expect("client config");
    let mut dev = OcfDevice::connect_with(&gw, tls);
    dev.assert_open();
    dev.expect_closed(Duration::from_secs(12));
    assert!(
        dev.unexpected.iter().any(|m| m.code == Code::RELEASE),
        "no Release before the close: {:?}",
        dev.unexpected
    );
}
