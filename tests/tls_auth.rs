//! Device authentication over real TLS sockets in the three `client_auth`
//! modes (spec §3, checklist items 8–10).

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use coap_gateway::auth::tls::{client_config_with, ClientOptions};
use coap_gateway::auth::ClientAuth;
use coap_gateway::coap::Code;
use common::{TestDevice, TestGateway, TestPki};

/// Connects and waits for the gateway's CSM: with TLS 1.3 a rejected client
/// certificate only shows after the client's handshake "completes", as an
/// alert on the first read.
fn served(pki: &TestPki, gw: &TestGateway, cert: Option<&str>) -> bool {
    match TestDevice::connect_tls(gw.addr, pki.client_config(cert)) {
        Ok(mut dev) => matches!(dev.recv(), Ok(m) if m.code == Code::CSM),
        Err(_) => false,
    }
}

#[test]
fn identity_mode_accepts_identity_certificates_only() {
    let pki = TestPki::new();
    let gw = TestGateway::start(&pki.config(ClientAuth::Identity));
    assert!(served(&pki, &gw, Some("device")));
    assert!(
        !served(&pki, &gw, Some("foreign")),
        "wrong CA must be refused"
    );
    assert!(
        !served(&pki, &gw, Some("any")),
        "item 9: a certificate without the OCF identity properties is refused"
    );
    assert!(!served(&pki, &gw, None), "item 8: no client certificate");
    let stats = gw.stats();
    let failures: u64 = stats
        .iter()
        .map(|s| {
            s.handshake_failures
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert_eq!(failures, 3);
}

#[test]
fn any_mode_accepts_any_certificate_from_the_ca() {
    let pki = TestPki::new();
    let gw = TestGateway::start(&pki.config(ClientAuth::Any));
    assert!(served(&pki, &gw, Some("device")));
    assert!(served(&pki, &gw, Some("any")));
    assert!(
        !served(&pki, &gw, Some("foreign")),
        "wrong CA must be refused"
    );
    assert!(!served(&pki, &gw, None), "item 8: no client certificate");
}

#[test]
fn none_mode_needs_no_client_certificate() {
    let pki = TestPki::new();
    let gw = TestGateway::start(&pki.config(ClientAuth::None));
    assert!(served(&pki, &gw, None));
}

#[test]
fn tls12_only_device_with_ecdhe_ecdsa_aes_gcm_connects() {
    // Appendix A: IoTivity-Lite with mbedtls speaks TLS 1.2 only, offers
    // ECDHE-ECDSA-AES128/256-GCM, and sends neither SNI nor ALPN.
    let pki = TestPki::new();
    let gw = TestGateway::start(&pki.config(ClientAuth::Identity));
    let (cert, key) = pki.cert("device");
    for suite in [
        rustls::crypto::ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ] {
        let suites = [suite];
        let config = client_config_with(
            &pki.ca(),
            Some((&cert, &key)),
            &ClientOptions::tls12_only(&suites),
        )
        .unwrap();
        let mut dev = TestDevice::connect_tls(gw.addr, config).expect("TLS 1.2 handshake");
        if let common::Transport::Tls(s) = &dev.io {
            assert_eq!(
                s.conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_2)
            );
            assert_eq!(s.conn.negotiated_cipher_suite(), Some(suite));
        }
        assert_eq!(dev.recv().unwrap().code, Code::CSM);
    }
}
