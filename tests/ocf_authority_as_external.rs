//! The embedded authority seen from outside (issue: "serves POST
//! /oauth/token on the API address so the gateway can also be pointed at it
//! as if it were external"): gateway A runs the authority and its HTTP API;
//! gateway B has no authority of its own and is configured with A's OpenID
//! issuer as `jwks_url` and A's `/oauth/token` as an external provider. A
//! device signs up, signs in and refreshes at B with a code from A.

#![allow(clippy::disallowed_methods)]

mod common;

use std::net::TcpListener;
use std::time::Duration;

use coap_gateway::api::{ApiServer, ApiState};
use coap_gateway::coap::Code;
use coap_gateway::config::OAuthProviderConfig;
use common::ocf::*;
use common::{TestGateway, TestPki, DEVICE_ID};
use serde_json::json;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

// Embedded hub only (scripts/test skips it in the NATS pass): it checks
// that A and B keep separate hubs, whereas on NATS the two gateways of one
// test share theirs.
#[test]
fn a_gateway_signs_devices_up_against_another_gateways_authority() {
    let pki = TestPki::new();
    // Gateway A: the authority, with its API on a known port (its issuer is
    // http://<api.address>).
    let mut config_a = gateway_config(&pki);
    config_a.api.address = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let a = TestGateway::start(&config_a);
    let running = a.gateway.as_ref().expect("running");
    let state = ApiState::new(
        running.runtime.stats().to_vec(),
        running.runtime.shutdown_flag(),
    )
    .with_authority(a.authority().clone())
    .with_provider(a.provider().clone())
    .with_hub(a.hub().clone())
    .with_validator(running.validator.clone());
    let api = ApiServer::start(config_a.api.address, state).expect("API of A");
    let base = format!("http://{}", api.local_addr());

    // Gateway B: no authority, A's keys and token endpoint.
    let mut config_b = gateway_config(&pki);
    // Its own hub store: A's data dir is A's (one process per store).
    config_b.hub.data_dir = pki.data_dir().join("gateway-b");
    config_b.authority.enabled = false;
    config_b.authorization.jwks_url = base.clone();
    config_b.authorization.issuer = config_a.authority_issuer();
    config_b.authorization.providers = vec![OAuthProviderConfig {
        name: "plgd".into(),
        token_url: format!("{base}/oauth/token"),
        client_id: "gateway-b".into(),
        timeout: Duration::from_secs(5),
        ..OAuthProviderConfig::default()
    }];
    config_b.validate().expect("config B");
    let b = TestGateway::start(&config_b);

    let mut dev = OcfDevice::connect(&b, &pki);
    let code = a
        .authority()
        .issue_code(OWNER, None, now_unix())
        .expect("code");
    let m = dev.sign_up_with(&sign_up_body(&code));
    assert_eq!(m.code, Code::CHANGED, "sign-up at B: {:?}", text(&m));
    let reg = Registration::from_sign_up(&m);
    assert_eq!(reg.uid, OWNER);
    assert!(b.hub().owns(OWNER, DEVICE_ID), "B registered the device");
    assert!(!a.hub().owns(OWNER, DEVICE_ID), "A only issued the tokens");

    dev.sign_in_ok(&reg.uid, &reg.access_token);
    let status = wait_until(PATIENCE, "online at B", || {
        let s = b.hub().device(OWNER, DEVICE_ID)?.status;
        s.online.then_some(s)
    });
    assert_eq!(status.connection_id, dev.local_addr().to_string());

    // Refresh goes to A's /oauth/token too, and rotates the refresh token.
    let m = dev.refresh(&reg.uid, &reg.refresh_token);
    assert_eq!(m.code, Code::CHANGED, "refresh at B: {:?}", text(&m));
    let refreshed = body(&m);
    assert_ne!(refreshed["refreshtoken"], json!(reg.refresh_token));
    let again = dev.refresh(&reg.uid, &reg.refresh_token);
    assert_eq!(
        again.code,
        Code::CHANGED,
        "the same request is answered from the cache"
    );
    assert_eq!(body(&again), refreshed);

    drop(dev);
    api.stop();
}
