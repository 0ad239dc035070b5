//! Token refresh, `POST /oic/sec/tokenrefresh` (spec §5.6, §4.7), and
//! sign-off, `DELETE /oic/sec/account` (spec §5.3); checklist items 34–39.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::TcpListener;
use std::time::Duration;

use coap_gateway::coap::{option, Code};
use coap_gateway::config::OAuthProviderConfig;
use common::ocf::*;
use common::{TestGateway, TestPki, DEVICE_ID};
use serde_json::json;

/// spec §5.0: failures on `/oic/sec/*` close the connection ~10 ms after
/// the error response.
/// The gateway lingers `coap.close_linger` (2 s by default) after such an
/// answer so that the device reads it before the close (spec Appendix A.7).
const CLOSE_LIMIT: Duration = Duration::from_secs(4);

fn start(pki: &TestPki) -> TestGateway {
    TestGateway::start(&gateway_config(pki))
}

fn refresh_request(body: &serde_json::Value) -> Request {
    Request::post("/oic/sec/tokenrefresh", body)
}

#[test]
fn item_34_refresh_with_missing_or_mistyped_fields_is_4_00() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let cases = [
        (json!({}), "invalid deviceID"),
        (
            json!({"di": DEVICE_ID, "refreshtoken": "r", "authprovider": PROVIDER}),
            "invalid userId",
        ),
        (
            json!({"di": DEVICE_ID, "uid": OWNER, "authprovider": PROVIDER}),
            "invalid refreshToken",
        ),
        (
            json!({"di": DEVICE_ID, "uid": OWNER, "refreshtoken": 42, "authprovider": PROVIDER}),
            "",
        ),
    ];
    for (sent, needle) in cases {
        let mut dev = OcfDevice::connect(&gw, &pki);
        let m = dev.request(&refresh_request(&sent));
        assert_eq!(m.code, Code::BAD_REQUEST, "{sent}: {:?}", text(&m));
        assert_error(&m, Code::BAD_REQUEST, needle);
        dev.expect_closed(CLOSE_LIMIT);
    }
}

#[test]
fn item_35_refresh_returns_new_tokens() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let reg = dev.sign_up(&gw, OWNER);
    let m = dev.refresh(&reg.uid, &reg.refresh_token);
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
    assert_eq!(option_uint(&m, option::CONTENT_FORMAT), Some(OCF_CBOR));
    let b = body(&m);
    let access = b["accesstoken"].as_str().expect("accesstoken text");
    let refresh = b["refreshtoken"].as_str().expect("refreshtoken text");
    assert!(!access.is_empty() && !refresh.is_empty(), "{b}");
    assert_ne!(access, reg.access_token, "a new access token");
    // §4.7: the OAuth lifetime, no margin (1 h by default).
    let expires_in = b["expiresin"].as_i64().expect("integer expiresin");
    assert!(
        (3590..=3600).contains(&expires_in),
        "expiresin {expires_in}"
    );
    assert_eq!(jwt_claims(access)["sub"], json!(OWNER));
    // Refresh does not sign in (§4.7) and keeps the connection; the new
    // token signs in.
    dev.assert_open();
    dev.sign_in_ok(&reg.uid, access);
}

#[test]
fn item_36_refresh_with_oauth_server_down_is_5_03_and_closes() {
    let pki = TestPki::new();
    let mut config = gateway_config(&pki);
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    config.authorization.providers.push(OAuthProviderConfig {
        name: "remote".to_owned(),
        token_url: format!("http://127.0.0.1:{port}/oauth/token"),
        client_id: "coap-gateway".to_owned(),
        timeout: Duration::from_secs(2),
        ..OAuthProviderConfig::default()
    });
    let gw = TestGateway::start(&config);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.request(&refresh_request(&json!({
        "di": DEVICE_ID, "uid": OWNER, "refreshtoken": "some-refresh-token",
        "authprovider": "remote", "granttype": "refresh_token",
    })));
    assert_error(&m, Code::SERVICE_UNAVAILABLE, "");
    assert!(
        text(&m).starts_with("temporary error: "),
        "spec §5.0: {:?}",
        text(&m)
    );
    dev.expect_closed(Duration::from_secs(4));
}

/// spec §5.6 quirk (§14 item 3, kept): a refresh token the provider
/// rejects is 5.03, not 4.01.
#[test]
fn refresh_with_a_rejected_refresh_token_is_5_03_and_closes() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.refresh(OWNER, "not-a-refresh-token-of-ours");
    assert_error(&m, Code::SERVICE_UNAVAILABLE, "");
    dev.expect_closed(CLOSE_LIMIT);
}

#[test]
fn item_37_sign_off_with_a_bad_query_is_4_02() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.request(&Request::delete("/oic/sec/account").query("di=%"));
    assert_error(&m, Code::BAD_OPTION, "");
    dev.expect_closed(CLOSE_LIMIT);
}

#[test]
fn item_38_sign_off_without_session_needs_uid_and_token() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let di = format!("di={DEVICE_ID}");
    // `?di=D`.
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.request(&Request::delete("/oic/sec/account").query(&di));
    assert_error(&m, Code::BAD_REQUEST, "invalid user id");
    dev.expect_closed(CLOSE_LIMIT);
    // `?di=D&uid=0`, in one option and in two (spec §5.3: both work).
    for req in [
        Request::delete("/oic/sec/account").query(&format!("{di}&uid=0")),
        Request::delete("/oic/sec/account")
            .query(&di)
            .query("uid=0"),
    ] {
        let mut dev = OcfDevice::connect(&gw, &pki);
        let m = dev.request(&req);
        assert_error(&m, Code::BAD_REQUEST, "invalid access token");
        dev.expect_closed(CLOSE_LIMIT);
    }
}

#[test]
fn item_39_sign_off_with_a_session_deletes_the_device() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let (mut dev, _reg) = signed_in(&gw, &pki);
    let m = dev.publish(&json!({"di": DEVICE_ID, "links": [{"href": "/light/1"}], "ttl": 0}));
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
    let m = dev.request(&Request::delete("/oic/sec/account"));
    assert_eq!(m.code, Code::DELETED, "{:?}", text(&m));
    assert!(m.payload.is_empty(), "{m:?}");
    assert_eq!(option_uint(&m, option::CONTENT_FORMAT), None);
    // Gone from the hub: registration, links, status.
    assert!(!gw.hub().owns(OWNER, DEVICE_ID));
    assert!(record(&gw, OWNER).is_none());
    assert!(gw
        .hub()
        .links(OWNER, &[DEVICE_ID], &[], now_unix())
        .iter()
        .all(|(_, links)| links.is_empty()));
    // The gateway does not close the connection, but the session is gone
    // (§5.3: auth context torn down, so §4.6 applies again).
    dev.assert_open();
    let m = dev.request(&Request::get("/oic/rd"));
    assert_error(&m, Code::UNAUTHORIZED, "");
    dev.expect_closed(CLOSE_LIMIT);
}
