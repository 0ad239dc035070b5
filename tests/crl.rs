//! Revocation of device certificates by the CRL files of `[coap.tls] crl`
//! (spec §3.2 step 2, checklist item 11), over real TLS sockets.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use coap_gateway::auth::pki::Ca;
use coap_gateway::auth::tls::load_certificates;
use coap_gateway::auth::ClientAuth;
use coap_gateway::coap::Code;
use coap_gateway::server;
use common::{TestDevice, TestGateway, TestPki};

/// Connects and waits for the gateway's CSM: with TLS 1.3 a rejected client
/// certificate only shows after the client's handshake "completes", as an
/// alert on the first read.
fn served(pki: &TestPki, gw: &TestGateway, cert: &str) -> bool {
    match TestDevice::connect_tls(gw.addr, pki.client_config(Some(cert))) {
        Ok(mut dev) => matches!(dev.recv(), Ok(m) if m.code == Code::CSM),
        Err(_) => false,
    }
}

/// Writes a PEM CRL of the test CA revoking the certificates of `kinds`
/// (`device`, `any`), and returns its path.
fn crl_revoking(pki: &TestPki, kinds: &[&str]) -> PathBuf {
    let ca = Ca::load(&pki.data_dir().join("pki")).expect("test CA");
    let revoked: Vec<_> = kinds
        .iter()
        .map(|kind| {
            load_certificates(&pki.cert(kind).0)
                .expect("cert")
                .remove(0)
        })
        .collect();
    let path = pki.data_dir().join("ca.crl");
    std::fs::write(&path, ca.revoke(&revoked).expect("CRL")).expect("write CRL");
    path
}

fn handshake_failures(gw: &TestGateway) -> u64 {
    gw.stats()
        .iter()
        .map(|s| {
            s.handshake_failures
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum()
}

#[test]
fn item_11_a_revoked_identity_certificate_is_refused() {
    let pki = TestPki::new();
    let mut config = pki.config(ClientAuth::Identity);
    config.coap.tls.crl = vec![crl_revoking(&pki, &["device"])];
    let gw = TestGateway::start(&config);
    assert!(
        !served(&pki, &gw, "device"),
        "item 11: the revoked identity certificate must be refused"
    );
    assert_eq!(handshake_failures(&gw), 1);
}

#[test]
fn any_mode_refuses_a_revoked_certificate() {
    let pki = TestPki::new();
    let mut config = pki.config(ClientAuth::Any);
    config.coap.tls.crl = vec![crl_revoking(&pki, &["any"])];
    let gw = TestGateway::start(&config);
    assert!(
        !served(&pki, &gw, "any"),
        "the revoked certificate must be refused in mode any"
    );
    assert!(
        served(&pki, &gw, "device"),
        "a certificate the CRL does not list is served"
    );
    assert_eq!(handshake_failures(&gw), 1);
}

#[test]
fn a_certificate_the_crl_does_not_list_still_connects() {
    let pki = TestPki::new();
    let mut config = pki.config(ClientAuth::Identity);
    // Same CA, another certificate revoked.
    config.coap.tls.crl = vec![crl_revoking(&pki, &["any"])];
    let gw = TestGateway::start(&config);
    assert!(served(&pki, &gw, "device"));
    assert!(!served(&pki, &gw, "foreign"), "the CA check still applies");
}

#[test]
fn a_crl_file_that_is_not_a_crl_stops_the_start() {
    let pki = TestPki::new();
    let garbage = pki.data_dir().join("garbage.crl");
    std::fs::write(&garbage, "not a certificate revocation list\n").unwrap();
    let absent = pki.data_dir().join("absent.crl");
    for file in [&garbage, &absent] {
        let mut config = pki.config(ClientAuth::Identity);
        config.coap.tls.crl = vec![file.clone()];
        let Err(err) = server::start(&config) else {
            panic!("the gateway started with {}", file.display());
        };
        let text = err.to_string();
        assert!(
            text.contains("coap.tls.crl") && text.contains(&*file.to_string_lossy()),
            "{text}"
        );
    }

    // `serve` as a user runs it: the error is logged, naming key and file,
    // and the exit code is that of a bad `ca` file (1: start-up failure).
    let out = Command::new(env!("CARGO_BIN_EXE_coap-gateway"))
        .current_dir(pki.data_dir())
        .env_remove("RUST_LOG")
        .env("COAP_GATEWAY__HUB__DATA_DIR", pki.data_dir())
        .env("COAP_GATEWAY__COAP__ADDRESS", "127.0.0.1:0")
        .env("COAP_GATEWAY__API__ADDRESS", "127.0.0.1:0")
        .env("COAP_GATEWAY__COAP__TLS__CRL", "[\"garbage.crl\"]")
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        log.contains("coap.tls.crl") && log.contains("garbage.crl is not a CRL"),
        "{log}"
    );
}
