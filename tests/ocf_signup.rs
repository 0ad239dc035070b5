//! Sign-up, `POST /oic/sec/account` (spec §5.2, §4.5, §4.8; checklist
//! items 13–21), over real TLS with the embedded token authority.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::TcpListener;
use std::time::Duration;

use coap_gateway::coap::{option, Code};
use coap_gateway::config::{Config, OAuthProviderConfig};
use common::ocf::*;
use common::{TestGateway, TestPki, DEVICE_ID};
use serde_json::json;

/// spec §5.0: failures on `/oic/sec/account` close the connection ~10 ms
/// after the error response.
/// The gateway lingers `coap.close_linger` (2 s by default) after such an
/// answer so that the device reads it before the close (spec Appendix A.7).
const CLOSE_LIMIT: Duration = Duration::from_secs(4);

fn start(pki: &TestPki) -> TestGateway {
    TestGateway::start(&gateway_config(pki))
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// An external OAuth provider whose token endpoint refuses connections.
fn with_unreachable_provider(mut config: Config, name: &str) -> Config {
    config.authorization.providers.push(OAuthProviderConfig {
        name: name.to_owned(),
        token_url: format!("http://127.0.0.1:{}/oauth/token", closed_port()),
        client_id: "coap-gateway".to_owned(),
        timeout: Duration::from_secs(2),
        ..OAuthProviderConfig::default()
    });
    config
}

#[test]
fn item_13_sign_up_without_device_id_is_4_00_and_closes() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.sign_up_with(&json!({}));
    assert_error(&m, Code::BAD_REQUEST, "invalid device id");
    dev.expect_closed(CLOSE_LIMIT);
}

#[test]
fn item_14_sign_up_without_code_is_4_00_invalid_authorization_code() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.sign_up_with(&json!({"di": DEVICE_ID}));
    assert_error(&m, Code::BAD_REQUEST, "invalid authorization code");
    dev.expect_closed(CLOSE_LIMIT);
}

#[test]
fn item_15_sign_up_with_accesstoken_of_wrong_cbor_type_is_4_00() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m =
        dev.sign_up_with(&json!({"di": DEVICE_ID, "accesstoken": 123, "authprovider": PROVIDER}));
    assert_error(&m, Code::BAD_REQUEST, "");
    dev.expect_closed(CLOSE_LIMIT);
}

#[test]
fn item_16_sign_up_with_unknown_authprovider_is_4_01() {
    let pki = TestPki::new();
    let gw = start(&pki);
    // Unknown name.
    let mut dev = OcfDevice::connect(&gw, &pki);
    let code = auth_code(&gw, OWNER);
    let m =
        dev.sign_up_with(&json!({"di": DEVICE_ID, "accesstoken": code, "authprovider": "nosuch"}));
    assert_error(&m, Code::UNAUTHORIZED, "");
    dev.expect_closed(CLOSE_LIMIT);
    // spec §5.2: absent `authprovider` is the same failure.
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.sign_up_with(&json!({"di": DEVICE_ID, "accesstoken": code}));
    assert_error(&m, Code::UNAUTHORIZED, "");
    dev.expect_closed(CLOSE_LIMIT);
    // Nothing was registered, and the code is still good.
    assert!(!gw.hub().owns(OWNER, DEVICE_ID));
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.sign_up_with(&sign_up_body(&code));
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
}

#[test]
fn item_17_sign_up_returns_tokens_uid_expiresin_and_empty_redirecturi() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let code = auth_code(&gw, OWNER);
    let m = dev.sign_up_with(&sign_up_body(&code));
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
    assert_eq!(
        option_uint(&m, option::CONTENT_FORMAT),
        Some(OCF_CBOR),
        "spec §5.0: no Accept → 10000"
    );
    let b = body(&m);
    let access = b["accesstoken"].as_str().expect("accesstoken text");
    let refresh = b["refreshtoken"].as_str().expect("refreshtoken text");
    assert!(!access.is_empty() && !refresh.is_empty(), "{b}");
    assert_eq!(b["redirecturi"], json!(""), "{b}");
    // `uid` is the owner claim of the access token (spec §4.5).
    let claims = jwt_claims(access);
    assert_eq!(b["uid"], json!(OWNER), "{b}");
    assert_eq!(claims["sub"], json!(OWNER), "{claims}");
    // `expiresin`: an integer, the OAuth lifetime without margin (§4.7):
    // the embedded authority's default 1 h.
    let expires_in = b["expiresin"].as_i64().expect("integer expiresin");
    assert!(
        (3590..=3600).contains(&expires_in),
        "expiresin {expires_in}"
    );
    // The device is registered to the owner; sign-up does not sign in and
    // leaves the connection open (spec §5.2).
    assert!(gw.hub().owns(OWNER, DEVICE_ID));
    dev.assert_open();
    assert!(!record(&gw, OWNER).expect("record").status.online);
}

#[test]
fn item_18_the_same_code_twice_on_one_connection_exchanges_once() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let code = auth_code(&gw, OWNER);
    let first = dev.sign_up_with(&sign_up_body(&code));
    let second = dev.sign_up_with(&sign_up_body(&code));
    assert_eq!(first.code, Code::CHANGED, "{:?}", text(&first));
    assert_eq!(second.code, Code::CHANGED, "{:?}", text(&second));
    // The embedded provider redeems a code once (a second redemption is
    // refused), so identical tokens mean the second answer came from the
    // connection's exchange cache (spec §4.8, hub issue #396).
    let (a, b) = (
        Registration::from_sign_up(&first),
        Registration::from_sign_up(&second),
    );
    assert_eq!(a.access_token, b.access_token);
    assert_eq!(a.refresh_token, b.refresh_token);
    assert_eq!(a.uid, b.uid);
    // The cache is per connection: elsewhere the used code is an OAuth
    // failure (spec §5.2: 5.03).
    let mut other = OcfDevice::connect(&gw, &pki);
    let m = other.sign_up_with(&sign_up_body(&code));
    assert_error(&m, Code::SERVICE_UNAVAILABLE, "");
    other.expect_closed(CLOSE_LIMIT);
}

#[test]
fn item_19_sign_up_with_unreachable_oauth_server_is_5_03() {
    let pki = TestPki::new();
    let gw = TestGateway::start(&with_unreachable_provider(gateway_config(&pki), "remote"));
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.sign_up_with(&json!({
        "di": DEVICE_ID, "accesstoken": "some-code", "authprovider": "remote",
    }));
    // spec §5.0: a refused connection is transient: 5.03 and the text
    // prefixed `temporary error: `.
    assert_error(&m, Code::SERVICE_UNAVAILABLE, "");
    assert!(
        text(&m).starts_with("temporary error: "),
        "diagnostic {:?}",
        text(&m)
    );
    dev.expect_closed(Duration::from_secs(4));
    assert!(!gw.hub().owns(OWNER, DEVICE_ID));
}

#[test]
fn item_20_sign_up_of_a_device_owned_by_another_user_is_4_01() {
    let pki = TestPki::new();
    let gw = start(&pki);
    register(&gw, OTHER_OWNER, DEVICE_ID);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.sign_up_with(&sign_up_body(&auth_code(&gw, OWNER)));
    assert_error(&m, Code::UNAUTHORIZED, "");
    dev.expect_closed(CLOSE_LIMIT);
    assert!(gw.hub().owns(OTHER_OWNER, DEVICE_ID));
    assert!(!gw.hub().owns(OWNER, DEVICE_ID));
}

#[test]
fn item_21_legacy_authcode_key_is_accepted() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let code = auth_code(&gw, OWNER);
    let m = dev.sign_up_with(&json!({"di": DEVICE_ID, "authcode": code, "authprovider": PROVIDER}));
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
    let reg = Registration::from_sign_up(&m);
    assert_eq!(reg.uid, OWNER);
    assert!(gw.hub().owns(OWNER, DEVICE_ID));
    // And the tokens work: sign-in succeeds.
    dev.sign_in_ok(&reg.uid, &reg.access_token);
}

/// spec §5.0 and §14 item 16: an empty payload gets 4.00 (and the close
/// of every `/oic/sec/*` failure), not the reference's silence.
#[test]
fn sign_up_with_empty_payload_is_4_00_and_closes() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.request(&Request::new(Code::POST, "/oic/sec/account").content_format(OCF_CBOR));
    assert_error(&m, Code::BAD_REQUEST, "");
    dev.expect_closed(CLOSE_LIMIT);
}
