//! Sign-in and sign-out, `POST /oic/sec/session` (spec §5.4, §5.5, §4.3–
//! §4.7, §4.9, §8.1, §8.2; checklist items 22–33), over real TLS with the
//! embedded token authority.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use coap_gateway::coap::{option, Code};
use coap_gateway::hub::Protocol;
use common::ocf::*;
use common::{TestGateway, TestPki, DEVICE_ID};
use serde_json::json;

/// spec §5.0: failures on `/oic/sec/session` close the connection ~10 ms
/// after the error response; the auth gate (§4.6) closes likewise.
/// The gateway lingers `coap.close_linger` (2 s by default) after such an
/// answer so that the device reads it before the close (spec Appendix A.7).
const CLOSE_LIMIT: Duration = Duration::from_secs(4);

fn start(pki: &TestPki) -> TestGateway {
    TestGateway::start(&gateway_config(pki))
}

#[test]
fn item_22_sign_in_with_missing_or_mistyped_fields_is_4_00() {
    let pki = TestPki::new();
    let gw = start(&pki);
    register(&gw, OWNER, DEVICE_ID);
    let token = access_token(&gw, OWNER, Some(DEVICE_ID));
    let cases = [
        (json!({"login": true}), "invalid device id"),
        (
            json!({"di": DEVICE_ID, "accesstoken": token, "login": true}),
            "",
        ),
        (json!({"di": DEVICE_ID, "uid": OWNER, "login": true}), ""),
        (
            json!({"di": DEVICE_ID, "uid": OWNER, "accesstoken": 42, "login": true}),
            "",
        ),
    ];
    for (body_sent, needle) in cases {
        let mut dev = OcfDevice::connect(&gw, &pki);
        let m = dev.session(&body_sent);
        assert_eq!(m.code, Code::BAD_REQUEST, "{body_sent}: {:?}", text(&m));
        assert_error(&m, Code::BAD_REQUEST, needle);
        dev.expect_closed(CLOSE_LIMIT);
    }
    assert!(!record(&gw, OWNER).expect("registered").status.online);
}

#[test]
fn item_23_sign_in_with_uid_other_than_the_owner_claim_is_4_01_and_closes() {
    let pki = TestPki::new();
    let gw = start(&pki);
    register(&gw, OWNER, DEVICE_ID);
    let token = access_token(&gw, OWNER, Some(DEVICE_ID));
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.sign_in("bob", &token);
    assert_error(&m, Code::UNAUTHORIZED, "");
    dev.expect_closed(CLOSE_LIMIT);
    assert!(!record(&gw, OWNER).expect("registered").status.online);
}

#[test]
fn item_24_sign_in_answers_expiresin_with_the_owner_cache_margin() {
    let pki = TestPki::new();
    let config = gateway_config(&pki);
    let gw = TestGateway::start(&config);
    register(&gw, OWNER, DEVICE_ID);
    let token = access_token(&gw, OWNER, Some(DEVICE_ID));
    let exp = jwt_claims(&token)["exp"].as_i64().expect("exp");
    let mut dev = OcfDevice::connect(&gw, &pki);
    let before = now_unix() as i64;
    let m = dev.sign_in(OWNER, &token);
    let after = now_unix() as i64;
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
    assert_eq!(option_uint(&m, option::CONTENT_FORMAT), Some(OCF_CBOR));
    let b = body(&m);
    let expires_in = b["expiresin"].as_i64().expect("integer expiresin");
    // §4.7: expire = exp − 2 × ownerCacheExpiration (default 1 min).
    let margin = 2 * config.authorization.owner_cache_expiration.as_secs() as i64;
    assert!(
        (exp - after - margin - 1..=exp - before - margin).contains(&expires_in),
        "expiresin {expires_in}, exp {exp}, now {before}..{after}, margin {margin}"
    );
    drop(dev);

    // A token without `exp`: expiresin -1 (§4.7, §14 item 15).
    let forge = TokenForge::gateway(&gw, &config);
    let mut claims = forge.claims(OWNER, Some(DEVICE_ID));
    claims.remove("exp");
    let mut dev = OcfDevice::connect(&gw, &pki);
    assert_eq!(dev.sign_in_ok(OWNER, &forge.sign(&claims)), -1);
}

#[test]
fn item_25_sign_in_with_less_than_twice_the_owner_cache_lifetime_is_4_01() {
    let pki = TestPki::new();
    let gw = start(&pki);
    register(&gw, OWNER, DEVICE_ID);
    let now = now_unix();
    let ttl = gw.authority().settings().access_token_ttl.as_secs();
    // 100 s left, 120 s required (2 × 1 min).
    let short = gw
        .authority()
        .issue_access_token(OWNER, Some(DEVICE_ID), now + 100 - ttl)
        .expect("token");
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.sign_in(OWNER, &short.token);
    assert_error(&m, Code::UNAUTHORIZED, "");
    dev.expect_closed(CLOSE_LIMIT);
    assert!(!record(&gw, OWNER).expect("registered").status.online);
    // 130 s left is enough, with 10 s of session.
    let enough = gw
        .authority()
        .issue_access_token(OWNER, Some(DEVICE_ID), now_unix() + 130 - ttl)
        .expect("token");
    let mut dev = OcfDevice::connect(&gw, &pki);
    let expires_in = dev.sign_in_ok(OWNER, &enough.token);
    assert!((8..=10).contains(&expires_in), "expiresin {expires_in}");
}

#[test]
fn item_26_device_id_claim_must_name_the_certificate_device() {
    let pki = TestPki::new();
    let gw = start(&pki);
    register(&gw, OWNER, DEVICE_ID);
    // Token for another device (mutual TLS, device-ID-claim mode).
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.sign_in(OWNER, &access_token(&gw, OWNER, Some(OTHER_DEVICE)));
    assert_error(&m, Code::UNAUTHORIZED, "issued to");
    dev.expect_closed(CLOSE_LIMIT);
    // Token without the claim (§4.3 step 1).
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.sign_in(OWNER, &access_token(&gw, OWNER, None));
    assert_error(&m, Code::UNAUTHORIZED, "device id claim");
    dev.expect_closed(CLOSE_LIMIT);
    assert!(!record(&gw, OWNER).expect("registered").status.online);
    // The claim naming this device works.
    let mut dev = OcfDevice::connect(&gw, &pki);
    dev.sign_in_ok(OWNER, &access_token(&gw, OWNER, Some(DEVICE_ID)));
}

#[test]
fn item_27_after_sign_in_the_hub_shows_the_device_online() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let reg = dev.sign_up(&gw, OWNER);
    let before = now_unix_ns();
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    let after = now_unix_ns();
    // The local endpoints arrive once the device answered the GET of
    // item 28; serve it while polling the hub.
    dev.wait_for_request(PATIENCE, is_local_endpoints_get);
    let status = wait_until(PATIENCE, "ONLINE with local endpoints", || {
        dev.settle(Duration::from_millis(20));
        record(&gw, OWNER)
            .map(|r| r.status)
            .filter(|s| s.online && !s.local_endpoints.is_empty())
    });
    assert_eq!(status.protocol, Some(Protocol::CoapsTcp), "{status:?}");
    assert!(!status.service_id.is_empty(), "{status:?}");
    assert_eq!(status.connection_id, dev.local_addr().to_string());
    assert_eq!(status.local_endpoints, vec![LOCAL_ENDPOINT.to_owned()]);
    let slack = 1_000_000_000;
    assert!(
        status.connected_at_ns + slack >= before && status.connected_at_ns <= after + slack,
        "connected_at {} not the sign-in time {before}..{after}",
        status.connected_at_ns
    );
}

#[test]
fn item_28_sign_in_makes_the_gateway_get_oic_res_for_oic_wk_d() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let reg = dev.sign_up(&gw, OWNER);
    assert_eq!(dev.count_requests(is_local_endpoints_get), 0);
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    let get = dev.wait_for_request(PATIENCE, is_local_endpoints_get);
    assert_eq!(uri_path(&get), "/oic/res");
    let mut queries = uri_queries(&get);
    queries.sort();
    assert_eq!(queries, vec!["if=oic.if.ll", "rt=oic.wk.d"], "{get:?}");
}

#[test]
fn item_29_refresh_and_sign_in_three_times_creates_no_duplicate_observations() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let (mut dev, mut reg) = signed_in(&gw, &pki);
    dev.wait_for_request(PATIENCE, is_local_endpoints_get);
    dev.settle(Duration::from_millis(300));
    let first = wait_online(&gw, OWNER);
    let observations = dev.count_requests(is_observe_registration);
    let endpoint_gets = dev.count_requests(is_local_endpoints_get);
    let all = dev.requests.len();
    for round in 0..3 {
        let m = dev.refresh(&reg.uid, &reg.refresh_token);
        assert_eq!(m.code, Code::CHANGED, "refresh {round}: {:?}", text(&m));
        let b = body(&m);
        reg.access_token = b["accesstoken"].as_str().expect("accesstoken").to_owned();
        reg.refresh_token = b["refreshtoken"].as_str().expect("refreshtoken").to_owned();
        dev.sign_in_ok(&reg.uid, &reg.access_token);
    }
    dev.settle(Duration::from_millis(300));
    // spec §5.4: a re-sign-in of the same device and user only replaces
    // token and deadline: no new observation, no ONLINE again (whose GET
    // of item 28 and `connected_at` would show).
    assert_eq!(
        dev.count_requests(is_observe_registration),
        observations,
        "observations re-created: {:?}",
        &dev.requests[all..]
    );
    assert_eq!(dev.count_requests(is_local_endpoints_get), endpoint_gets);
    assert_eq!(
        dev.requests.len(),
        all,
        "new gateway requests: {:?}",
        &dev.requests[all..]
    );
    let now = wait_online(&gw, OWNER);
    assert_eq!(
        now.connected_at_ns, first.connected_at_ns,
        "ONLINE published again"
    );
    assert_eq!(now.connection_id, first.connection_id);
}

#[test]
fn item_30_sign_out() {
    let pki = TestPki::new();
    let gw = start(&pki);
    // Without a session: 4.00 (nothing to fill the missing values from).
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.session(&json!({"login": false}));
    assert_error(&m, Code::BAD_REQUEST, "");
    dev.expect_closed(CLOSE_LIMIT);

    // With a session: 2.04, Content-Format 10000, payload A0; OFFLINE.
    let (mut dev, reg) = signed_in(&gw, &pki);
    wait_online(&gw, OWNER);
    let m = dev.session(&json!({
        "di": DEVICE_ID, "uid": reg.uid, "accesstoken": reg.access_token, "login": false,
    }));
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
    assert_eq!(option_uint(&m, option::CONTENT_FORMAT), Some(OCF_CBOR));
    assert_eq!(m.payload, vec![0xa0]);
    wait_offline(&gw, OWNER);
    // The connection stays open but is no longer authorized (§4.6).
    dev.assert_open();
    let m = dev.request(&Request::get("/oic/rd"));
    assert_error(&m, Code::UNAUTHORIZED, "");
    dev.expect_closed(CLOSE_LIMIT);
}

#[test]
fn item_31_requests_before_sign_in_are_4_01_and_close() {
    let pki = TestPki::new();
    let gw = start(&pki);
    for req in [
        Request::get("/oic/rd"),
        Request::get("/oic/res"),
        Request::get("/no/such/path"),
        Request::post(
            "/oic/rd",
            &json!({"di": DEVICE_ID, "links": [{"href": "/a"}], "ttl": 0}),
        ),
    ] {
        let mut dev = OcfDevice::connect(&gw, &pki);
        let m = dev.request(&req);
        assert_eq!(m.code, Code::UNAUTHORIZED, "{req}: {:?}", text(&m));
        assert_error(&m, Code::UNAUTHORIZED, "");
        dev.expect_closed(CLOSE_LIMIT);
    }
}

#[test]
fn item_32_deleting_the_device_closes_its_connection_and_sign_in_fails() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let (mut dev, reg) = signed_in(&gw, &pki);
    wait_online(&gw, OWNER);
    gw.hub()
        .delete_device(OWNER, DEVICE_ID)
        .expect("delete device");
    dev.expect_closed(PATIENCE);
    assert!(record(&gw, OWNER).is_none());
    // The token is still valid, but the owner no longer owns the device.
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.sign_in(&reg.uid, &reg.access_token);
    assert_error(&m, Code::UNAUTHORIZED, "");
    dev.expect_closed(CLOSE_LIMIT);
    assert!(!gw.hub().owns(OWNER, DEVICE_ID));
}

#[test]
fn item_33_session_deadline_closes_the_connection_and_goes_offline() {
    let pki = TestPki::new();
    let mut config = gateway_config(&pki);
    config.authorization.owner_cache_expiration = Duration::from_secs(1);
    config.authority.access_token_ttl = Duration::from_secs(4);
    let gw = TestGateway::start(&config);
    let mut dev = OcfDevice::connect(&gw, &pki);
    align_to_second();
    let reg = dev.sign_up(&gw, OWNER);
    let exp = jwt_claims(&reg.access_token)["exp"].as_u64().expect("exp");
    // 4 s of token, 2 × 1 s required: sign-in works, 2 s of session.
    let expires_in = dev.sign_in_ok(&reg.uid, &reg.access_token);
    assert!((1..=2).contains(&expires_in), "expiresin {expires_in}");
    wait_online(&gw, OWNER);
    let deadline = (exp - 2) as f64;
    dev.expect_closed(Duration::from_secs(6));
    let closed_at = now_unix_f64();
    // Not before the deadline; within one sweep (1 s) and change after it.
    assert!(
        closed_at >= deadline - 0.05,
        "closed at {closed_at}, before the deadline {deadline}"
    );
    assert!(
        closed_at <= deadline + 2.0,
        "closed at {closed_at}, deadline {deadline}"
    );
    wait_offline(&gw, OWNER);
}

/// spec §14 item 13, as recommended: a second sign-in of the same device on
/// a new connection closes the older connection; the newer stays ONLINE
/// (the older one's close does not turn it OFFLINE) and keeps working.
#[test]
fn a_second_sign_in_of_the_device_closes_the_older_connection() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let (mut first, reg) = signed_in(&gw, &pki);
    wait_online(&gw, OWNER);
    let first_addr = first.local_addr().to_string();

    let mut second = OcfDevice::connect(&gw, &pki);
    second.sign_in_ok(&reg.uid, &reg.access_token);
    first.expect_closed(PATIENCE);
    let second_addr = second.local_addr().to_string();
    let status = wait_until(PATIENCE, "the newer connection online", || {
        let status = record(&gw, OWNER)?.status;
        (status.online && status.connection_id == second_addr).then_some(status)
    });
    assert_ne!(status.connection_id, first_addr);
    // Still ONLINE a moment later: the older close came and went.
    second.settle(Duration::from_millis(200));
    assert!(record(&gw, OWNER).expect("device").status.online);
    let m = second.request(&Request::get("/oic/rd"));
    assert_eq!(m.code, Code::CONTENT, "{:?}", text(&m));
}
