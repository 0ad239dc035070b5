//! Access-token validation at sign-in (spec §4.1–§4.5) and the session
//! deadline (spec §4.7), over real TLS.
//!
//! Each bad token is a token the gateway accepts with exactly one thing
//! changed, so each test also signs in with the unchanged token on a new
//! connection: the refusal is the changed claim's doing.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use coap_gateway::coap::Code;
use coap_gateway::config::Config;
use common::ocf::*;
use common::{TestGateway, TestPki, DEVICE_ID};
use serde_json::{json, Map, Value};

/// spec §5.0: a failed sign-in closes the connection ~10 ms later.
/// The gateway lingers `coap.close_linger` (2 s by default) after such an
/// answer so that the device reads it before the close (spec Appendix A.7).
const CLOSE_LIMIT: Duration = Duration::from_secs(4);

/// A gateway with [`DEVICE_ID`] registered to [`OWNER`], and a forge for
/// tokens under its authority's key.
struct Bench {
    pki: TestPki,
    gw: TestGateway,
    forge: TokenForge,
}

impl Bench {
    fn new() -> Bench {
        Bench::with(|_| {})
    }

    fn with(adjust: impl FnOnce(&mut Config)) -> Bench {
        let pki = TestPki::new();
        let mut config = gateway_config(&pki);
        adjust(&mut config);
        let gw = TestGateway::start(&config);
        register(&gw, OWNER, DEVICE_ID);
        let forge = TokenForge::gateway(&gw, &config);
        Bench { pki, gw, forge }
    }

    /// Claims the gateway accepts for [`OWNER`] on [`DEVICE_ID`].
    fn good_claims(&self) -> Map<String, Value> {
        self.forge.claims(OWNER, Some(DEVICE_ID))
    }

    /// Sign-in with `token` as `uid` is 4.01, the connection closes, and
    /// the hub recorded nothing: the device's status is what it was (never
    /// ONLINE unless an earlier control signed in), the owner the same.
    fn refused(&self, uid: &str, token: &str) {
        let before = record(&self.gw, OWNER).expect("the owner's device").status;
        assert!(!before.online, "a control connection is still ONLINE");
        let mut dev = OcfDevice::connect(&self.gw, &self.pki);
        let m = dev.sign_in(uid, token);
        assert_error(&m, Code::UNAUTHORIZED, "");
        dev.expect_closed(CLOSE_LIMIT);
        let r = record(&self.gw, OWNER).expect("still the owner's device");
        assert_eq!(r.status, before, "hub status changed");
        assert_eq!(r.owner, OWNER);
        assert!(self.gw.hub().owns(OWNER, DEVICE_ID));
    }

    /// The control: these claims, signed properly, sign in. The device
    /// then disconnects and the test waits for OFFLINE.
    fn accepted(&self, claims: &Map<String, Value>) {
        let mut dev = OcfDevice::connect(&self.gw, &self.pki);
        dev.sign_in_ok(OWNER, &self.forge.sign(claims));
        wait_online(&self.gw, OWNER);
        drop(dev);
        wait_offline(&self.gw, OWNER);
    }

    /// `good_claims` with `change` applied is refused; unchanged, accepted.
    fn refused_with(&self, change: impl FnOnce(&mut Map<String, Value>)) {
        let good = self.good_claims();
        let mut bad = good.clone();
        change(&mut bad);
        self.refused(OWNER, &self.forge.sign(&bad));
        self.accepted(&good);
    }
}

#[test]
fn bad_token_wrong_signature() {
    let b = Bench::new();
    // Same kid, issuer and claims; another key signed it.
    let impostor = TokenForge::impostor(&b.gw);
    let good = b.good_claims();
    b.refused(OWNER, &impostor.sign(&good));
    // The same claims signed with the gateway's key.
    b.accepted(&good);
}

#[test]
fn bad_token_from_another_authority_with_the_same_issuer() {
    let b = Bench::new();
    use coap_gateway::auth::authority::{Authority, SigningKey};
    let other = Authority::new(
        SigningKey::generate().expect("key"),
        b.gw.authority().settings().clone(),
    )
    .expect("authority");
    let token = other
        .issue_access_token(OWNER, Some(DEVICE_ID), now_unix())
        .expect("token");
    b.refused(OWNER, &token.token);
    b.accepted(&b.good_claims());
}

#[test]
fn bad_token_alg_none() {
    let b = Bench::new();
    let good = b.good_claims();
    b.refused(OWNER, &unsigned_token(&good));
    b.accepted(&good);
}

#[test]
fn bad_token_tampered_claims() {
    let b = Bench::new();
    // A valid token of bob's with its payload replaced by alice's claims.
    let bob = b.forge.sign(&b.forge.claims("bob", Some(DEVICE_ID)));
    let parts: Vec<&str> = bob.split('.').collect();
    let alice = b.forge.sign(&b.good_claims());
    let alice_payload = alice.split('.').nth(1).expect("payload");
    let spliced = format!("{}.{}.{}", parts[0], alice_payload, parts[2]);
    b.refused(OWNER, &spliced);
    b.accepted(&b.good_claims());
}

#[test]
fn bad_token_expired() {
    let b = Bench::new();
    let now = now_unix();
    b.refused_with(|c| {
        c.insert("iat".into(), json!(now - 7200));
        c.insert("exp".into(), json!(now - 3600));
    });
}

#[test]
fn bad_token_not_yet_valid() {
    let b = Bench::new();
    let now = now_unix();
    b.refused_with(|c| {
        c.insert("nbf".into(), json!(now + 3600));
    });
}

/// spec §4.1: `iat` must not be in the future.
#[test]
fn bad_token_issued_in_the_future() {
    let b = Bench::new();
    let now = now_unix();
    b.refused_with(|c| {
        c.insert("iat".into(), json!(now + 3600));
        c.insert("exp".into(), json!(now + 7200));
    });
}

/// spec §4.1: a malformed `exp` (wrong type) is a validation error.
#[test]
fn bad_token_exp_of_wrong_type() {
    let b = Bench::new();
    b.refused_with(|c| {
        c.insert("exp".into(), json!("tomorrow"));
    });
}

#[test]
fn bad_token_wrong_issuer() {
    let b = Bench::new();
    b.refused_with(|c| {
        c.insert("iss".into(), json!("https://evil.example.com"));
    });
}

#[test]
fn bad_token_wrong_audience() {
    let b = Bench::with(|c| c.authorization.audience = "coap-gateway".to_owned());
    let good = b.good_claims();
    assert_eq!(
        good["aud"],
        json!("coap-gateway"),
        "forge follows the config"
    );
    b.refused_with(|c| {
        c.insert("aud".into(), json!("someone-else"));
    });
    b.refused_with(|c| {
        c.remove("aud");
    });
    // An array containing the audience is fine (RFC 7519 §4.1.3).
    let mut listed = good.clone();
    listed.insert("aud".into(), json!(["someone-else", "coap-gateway"]));
    b.accepted(&listed);
}

#[test]
fn bad_token_without_device_id_claim() {
    let b = Bench::new();
    b.refused_with(|c| {
        c.remove(DEVICE_ID_CLAIM);
    });
}

#[test]
fn bad_token_device_id_claim_for_another_device() {
    let b = Bench::new();
    b.refused_with(|c| {
        c.insert(DEVICE_ID_CLAIM.into(), json!(OTHER_DEVICE));
    });
}

#[test]
fn bad_token_without_owner_claim() {
    let b = Bench::new();
    b.refused_with(|c| {
        c.remove("sub");
    });
}

#[test]
fn bad_token_for_another_owner() {
    let b = Bench::new();
    // A valid token of bob's, presented as bob: bob does not own the
    // device (spec §4.5 ownership check).
    let bob = b.forge.sign(&b.forge.claims("bob", Some(DEVICE_ID)));
    b.refused("bob", &bob);
    assert!(!b.gw.hub().owns("bob", DEVICE_ID));
    // Presented as alice: uid ≠ owner claim (checklist item 23).
    b.refused(OWNER, &bob);
    b.accepted(&b.good_claims());
}

#[test]
fn bad_token_authorization_code_is_not_an_access_token() {
    let b = Bench::new();
    let code =
        b.gw.authority()
            .issue_code(OWNER, Some(DEVICE_ID), now_unix())
            .expect("code");
    b.refused(OWNER, &code);
    b.accepted(&b.good_claims());
}

#[test]
fn bad_token_malformed() {
    let b = Bench::new();
    for garbage in ["not-a-jwt", "a.b.c", "a.b.c.d.e"] {
        b.refused(OWNER, garbage);
    }
    b.accepted(&b.good_claims());
}

// ---------------------------------------------------------------------------
// Token deadline (spec §4.7). Checklist item 33 (deadline closes the
// connection) is in ocf_signin.rs.

/// A re-sign-in with a longer-lived token replaces the deadline (§4.7:
/// "each new sign-in re-arms the entry").
#[test]
fn token_deadline_re_sign_in_with_a_longer_token_extends_the_session() {
    let b = Bench::with(|c| c.authorization.owner_cache_expiration = Duration::from_secs(1));
    let mut dev = OcfDevice::connect(&b.gw, &b.pki);
    align_to_second();
    let now = now_unix();
    let mut short = b.good_claims();
    // 3 s of token, 2 × 1 s margin: 1 s of session.
    short.insert("exp".into(), json!(now + 3));
    let short_deadline = (now + 3 - 2) as f64;
    let expires_in = dev.sign_in_ok(OWNER, &b.forge.sign(&short));
    assert!((0..=1).contains(&expires_in), "expiresin {expires_in}");
    let long = b.good_claims();
    let expires_in = dev.sign_in_ok(OWNER, &b.forge.sign(&long));
    assert!(expires_in > 3500, "expiresin {expires_in}");
    // Past the first token's deadline and one sweep (1 s): still served.
    let until = short_deadline + 1.5;
    dev.settle(Duration::from_secs_f64((until - now_unix_f64()).max(0.1)));
    let m = dev.request(&Request::get("/oic/rd"));
    assert_eq!(m.code, Code::CONTENT, "session ended: {:?}", text(&m));
    assert!(record(&b.gw, OWNER).expect("record").status.online);
}

/// A refresh on a signed-in connection moves the deadline to the new
/// OAuth expiry, without margin (§4.7), and the session then ends there.
#[test]
fn token_deadline_refresh_re_arms_the_session() {
    let pki = TestPki::new();
    let mut config = gateway_config(&pki);
    config.authorization.owner_cache_expiration = Duration::from_secs(1);
    config.authority.access_token_ttl = Duration::from_secs(3);
    let gw = TestGateway::start(&config);
    let mut dev = OcfDevice::connect(&gw, &pki);
    align_to_second();
    let reg = dev.sign_up(&gw, OWNER);
    let exp = jwt_claims(&reg.access_token)["exp"].as_u64().expect("exp");
    // 3 s token, 2 s margin: 1 s of session.
    let expires_in = dev.sign_in_ok(&reg.uid, &reg.access_token);
    assert!((0..=1).contains(&expires_in), "expiresin {expires_in}");
    let m = dev.refresh(&reg.uid, &reg.refresh_token);
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
    let refreshed = body(&m)["expiresin"].as_i64().expect("expiresin");
    let new_deadline = now_unix() as f64 + refreshed as f64;
    let old_deadline = (exp - 2) as f64;
    assert!(
        new_deadline > old_deadline + 1.0,
        "{new_deadline} vs {old_deadline}"
    );
    // Past the old deadline and a sweep: still signed in.
    dev.settle(Duration::from_secs_f64(
        (old_deadline + 1.3 - now_unix_f64()).max(0.1),
    ));
    let m = dev.request(&Request::get("/oic/rd"));
    assert_eq!(
        m.code,
        Code::CONTENT,
        "session ended at the old deadline: {:?}",
        text(&m)
    );
    // Then it ends at the new one.
    dev.expect_closed(Duration::from_secs(5));
    let closed_at = now_unix_f64();
    assert!(
        closed_at >= new_deadline - 1.05,
        "closed at {closed_at}, deadline {new_deadline}"
    );
    wait_offline(&gw, OWNER);
}
