//! Device twin synchronisation (spec §6; checklist items 46–52, 60, 61)
//! over real TLS, with a scripted device that serves its resources,
//! answers observations and pushes notifications.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use coap_gateway::coap::{option, Code};
use coap_gateway::config::Config;
use coap_gateway::hub::{EventKind, ResourceState, Status, TwinState};
use common::ocf::*;
use common::{Msg, TestGateway, TestPki, DEVICE_ID};
use serde_json::json;

const SETTLE: Duration = Duration::from_millis(300);

fn start_with(pki: &TestPki, tweak: impl FnOnce(&mut Config)) -> TestGateway {
    let mut config = gateway_config(pki);
    tweak(&mut config);
    TestGateway::start(&config)
}

/// A device with an observable `/light`, `/oic/res` batch observable or
/// not.
fn light_device(gw: &TestGateway, pki: &TestPki, batch: bool) -> OcfDevice {
    let mut dev = OcfDevice::connect(gw, pki);
    dev.set_batch_observable(batch);
    dev.add_resource("/light", "core.light", json!({"state": false}), true);
    dev
}

/// Signs `dev` up (first time) and in, publishes `hrefs`, settles.
fn sign_up_in_publish(gw: &TestGateway, dev: &mut OcfDevice, hrefs: &[&str]) -> Registration {
    let reg = dev.sign_up(gw, OWNER);
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    let body = dev.publish_body(hrefs);
    let m = dev.publish(&body);
    assert_eq!(m.code, Code::CHANGED, "publish: {}", text(&m));
    dev.settle(SETTLE);
    reg
}

/// The twin's value of `href`, once it has one that `pred` accepts.
fn twin_value(
    gw: &TestGateway,
    href: &str,
    pred: impl Fn(&ResourceState) -> bool,
) -> ResourceState {
    wait_until(PATIENCE, &format!("twin value of {href}"), || {
        gw.hub()
            .resource(OWNER, DEVICE_ID, href)
            .ok()
            .filter(|r| pred(r))
    })
}

fn twin_state(gw: &TestGateway) -> TwinState {
    record(gw, OWNER).expect("registered").twin.state
}

fn wait_twin_state(gw: &TestGateway, state: TwinState) {
    wait_until(PATIENCE, &format!("twin {}", state.as_str()), || {
        (twin_state(gw) == state).then_some(())
    });
}

/// spec §6.3: `GET /oic/res?if=oic.if.ll` without `rt=` (the local
/// endpoints GET of §8.1 has `rt=oic.wk.d`).
fn is_link_list_get(m: &Msg) -> bool {
    let q = uri_queries(m);
    m.code == Code::GET
        && uri_path(m) == "/oic/res"
        && q.iter().any(|q| q == "if=oic.if.ll")
        && !q.iter().any(|q| q.starts_with("rt="))
}

fn is_batch_observe(m: &Msg) -> bool {
    is_observe_registration(m)
        && uri_path(m) == "/oic/res"
        && uri_queries(m).iter().any(|q| q == "if=oic.if.b")
}

fn is_observe_cancel(m: &Msg) -> bool {
    m.code == Code::GET && option_uint(m, option::OBSERVE) == Some(1)
}

#[test]
fn item_46_batch_observation_fills_the_twin_and_goes_syncing_then_in_sync() {
    let pki = TestPki::new();
    let gw = start_with(&pki, |_| {});
    let events = gw.hub().subscribe(OWNER);
    let mut dev = light_device(&gw, &pki, true);
    sign_up_in_publish(&gw, &mut dev, &["/light"]);

    let ll = dev.requests.iter().position(is_link_list_get);
    let batch = dev.requests.iter().position(is_batch_observe);
    assert!(
        matches!((ll, batch), (Some(l), Some(b)) if l < b),
        "spec §6.3 then §6.5: link list, then batch observation; got {:?}",
        dev.requests
    );
    let light = twin_value(&gw, "/light", |_| true);
    assert_eq!(from_cbor(&light.content.data), json!({"state": false}));
    assert_eq!(light.content.content_format, OCF_CBOR as i32);
    assert_eq!(light.status, Status::Ok);

    // A change the device pushes reaches the twin.
    dev.set_value("/light", json!({"state": true}));
    let light = twin_value(&gw, "/light", |r| {
        from_cbor(&r.content.data) == json!({"state": true})
    });
    assert!(light.version >= 1);
    wait_twin_state(&gw, TwinState::InSync);

    let states: Vec<TwinState> = events
        .try_iter()
        .filter_map(|e| match e.kind {
            EventKind::TwinStateChanged { state } => Some(state),
            _ => None,
        })
        .collect();
    let syncing = states.iter().position(|s| *s == TwinState::Syncing);
    let in_sync = states.iter().rposition(|s| *s == TwinState::InSync);
    assert!(
        matches!((syncing, in_sync), (Some(s), Some(i)) if s < i),
        "SYNCING before IN_SYNC: {states:?}"
    );
}

#[test]
fn item_47_required_batch_observation_closes_a_device_without_it() {
    let pki = TestPki::new();
    let gw = start_with(&pki, |c| c.coap.require_batch_observe = true);
    let mut dev = light_device(&gw, &pki, false);
    let reg = dev.sign_up(&gw, OWNER);
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    dev.expect_closed(PATIENCE);
}

/// A device that published before (first connection), reconnected and
/// signed in again: the twin set-up runs with the hub's links known.
fn reconnected(gw: &TestGateway, pki: &TestPki, setup: impl Fn(&mut OcfDevice)) -> OcfDevice {
    let mut first = OcfDevice::connect(gw, pki);
    setup(&mut first);
    let hrefs: Vec<String> = first.resources.keys().cloned().collect();
    let hrefs: Vec<&str> = hrefs.iter().map(String::as_str).collect();
    let reg = sign_up_in_publish(gw, &mut first, &hrefs);
    drop(first);
    wait_offline(gw, OWNER);
    let mut dev = OcfDevice::connect(gw, pki);
    setup(&mut dev);
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    dev.settle(SETTLE);
    dev
}

#[test]
fn item_48_without_batch_each_observable_resource_is_observed_and_others_read_once() {
    let pki = TestPki::new();
    let gw = start_with(&pki, |c| c.coap.require_batch_observe = false);
    let mut dev = reconnected(&gw, &pki, |d| {
        d.set_batch_observable(false);
        d.add_resource("/light", "core.light", json!({"state": false}), true);
        d.add_resource(
            "/switch",
            "oic.r.switch.binary",
            json!({"value": true}),
            false,
        );
    });
    assert!(
        dev.requests
            .iter()
            .any(|m| is_observe_registration(m) && uri_path(m) == "/light"),
        "spec §6.6: /light observed: {:?}",
        dev.requests
    );
    assert!(
        dev.requests.iter().any(|m| m.code == Code::GET
            && uri_path(m) == "/switch"
            && option_uint(m, option::OBSERVE).is_none()),
        "spec §6.6: /switch read once: {:?}",
        dev.requests
    );
    assert!(!dev.requests.iter().any(is_batch_observe));
    twin_value(&gw, "/light", |_| true);
    let switch = twin_value(&gw, "/switch", |_| true);
    assert_eq!(from_cbor(&switch.content.data), json!({"value": true}));
    wait_twin_state(&gw, TwinState::InSync);
    dev.set_value("/light", json!({"state": true}));
    twin_value(&gw, "/light", |r| {
        from_cbor(&r.content.data) == json!({"state": true})
    });
}

#[test]
fn item_49_empty_batch_reps_are_dropped_for_oic_sec_and_not_found_otherwise() {
    let pki = TestPki::new();
    let gw = start_with(&pki, |_| {});
    let mut dev = light_device(&gw, &pki, true);
    sign_up_in_publish(&gw, &mut dev, &["/light"]);
    twin_value(&gw, "/light", |r| r.status == Status::Ok);
    let token = dev
        .observers
        .get("/oic/res")
        .cloned()
        .expect("batch observation");
    // IoTivity-Lite encodes `{}` as an indefinite empty map: 2 bytes.
    let body = raw_batch(&[("/oic/sec/cred", &[0xbf, 0xff]), ("/light", &[0xbf, 0xff])]);
    dev.send_notification(&token, Code::CONTENT, Some(&body));
    let light = twin_value(&gw, "/light", |r| r.status == Status::NotFound);
    assert!(light.content.data.is_empty());
    assert_eq!(light.content.content_format, -1);
    assert!(
        gw.hub()
            .resource(OWNER, DEVICE_ID, "/oic/sec/cred")
            .is_err(),
        "spec §6.5 step 6: /oic/sec/* empty reps are not forwarded"
    );
}

#[test]
fn item_50_a_4_04_to_an_observation_unpublishes_the_resource() {
    let pki = TestPki::new();
    let gw = start_with(&pki, |_| {});
    let mut dev = light_device(&gw, &pki, false);
    sign_up_in_publish(&gw, &mut dev, &["/light"]);
    let token = dev
        .observers
        .get("/light")
        .cloned()
        .expect("spec §6.8: a published observable resource is observed");
    dev.send_notification(&token, Code::NOT_FOUND, None);
    wait_until(PATIENCE, "/light unpublished", || {
        gw.hub()
            .links(OWNER, &[DEVICE_ID], &[], now_unix())
            .iter()
            .all(|(_, links)| links.iter().all(|l| l.href != "/light"))
            .then_some(())
    });
}

#[test]
fn item_51_links_missing_from_the_device_are_unpublished_at_sign_in() {
    let pki = TestPki::new();
    let gw = start_with(&pki, |_| {});
    // First connection publishes /light and /gone; the device then
    // restarts without /gone.
    let mut first = light_device(&gw, &pki, true);
    first.add_resource("/gone", "x.gone", json!({"v": 1}), true);
    let reg = sign_up_in_publish(&gw, &mut first, &["/light", "/gone"]);
    drop(first);
    wait_offline(&gw, OWNER);
    let mut dev = light_device(&gw, &pki, true);
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    dev.settle(SETTLE);
    let hrefs = || -> Vec<String> {
        gw.hub()
            .links(OWNER, &[DEVICE_ID], &[], now_unix())
            .into_iter()
            .flat_map(|(_, links)| links.into_iter().map(|l| l.href))
            .collect()
    };
    wait_until(PATIENCE, "/gone unpublished", || {
        (!hrefs().contains(&"/gone".to_owned())).then_some(())
    });
    assert!(hrefs().contains(&"/light".to_owned()), "{:?}", hrefs());
}

#[test]
fn item_52_a_2_03_batch_notification_without_payload_is_not_forwarded() {
    let pki = TestPki::new();
    let gw = start_with(&pki, |_| {});
    let mut dev = light_device(&gw, &pki, true);
    sign_up_in_publish(&gw, &mut dev, &["/light"]);
    let before = twin_value(&gw, "/light", |_| true);
    wait_twin_state(&gw, TwinState::InSync);
    let events = gw.hub().subscribe(OWNER);
    let token = dev
        .observers
        .get("/oic/res")
        .cloned()
        .expect("batch observation");
    dev.send_notification(&token, Code::VALID, None);
    // Then a real change, so the test knows the 2.03 was processed first.
    dev.set_value("/light", json!({"state": true}));
    let after = twin_value(&gw, "/light", |r| {
        from_cbor(&r.content.data) == json!({"state": true})
    });
    assert_eq!(
        after.version,
        before.version + 1,
        "only the real change counts"
    );
    let changes = events
        .try_iter()
        .filter(|e| matches!(e.kind, EventKind::ResourceChanged { .. }))
        .count();
    assert_eq!(changes, 1);
    assert_eq!(twin_state(&gw), TwinState::InSync);
}

#[test]
fn item_60_twin_disabled_cancels_observations_and_enabled_recreates_them() {
    let pki = TestPki::new();
    let gw = start_with(&pki, |_| {});
    let mut dev = light_device(&gw, &pki, true);
    sign_up_in_publish(&gw, &mut dev, &["/light"]);
    wait_twin_state(&gw, TwinState::InSync);
    let registrations = dev.count_requests(is_batch_observe);

    gw.hub()
        .set_twin_enabled(OWNER, DEVICE_ID, false, false)
        .expect("disable the twin");
    let cancel = dev.wait_for_request(PATIENCE, is_observe_cancel);
    assert_eq!(uri_path(&cancel), "/oic/res");
    assert!(!dev.observers.contains_key("/oic/res"));
    wait_twin_state(&gw, TwinState::Disabled);

    gw.hub()
        .set_twin_enabled(OWNER, DEVICE_ID, true, false)
        .expect("enable the twin");
    wait_until(PATIENCE, "a new batch observation", || {
        dev.settle(Duration::from_millis(50));
        (dev.count_requests(is_batch_observe) > registrations).then_some(())
    });
    wait_twin_state(&gw, TwinState::InSync);
}

#[test]
fn item_61_closing_the_connection_makes_the_device_offline() {
    let pki = TestPki::new();
    let gw = start_with(&pki, |_| {});
    let mut dev = light_device(&gw, &pki, true);
    sign_up_in_publish(&gw, &mut dev, &["/light"]);
    assert!(wait_online(&gw, OWNER).online);
    drop(dev);
    wait_offline(&gw, OWNER);
}
