//! Scale-out (issue 6): several `coap-gateway serve` nodes sharing one hub
//! on NATS JetStream (`[hub] kind = "nats"`), with Debian's `nats-server`
//! on loopback ports of its own (tests/common/nats.rs). The nodes share
//! the CA, the gateway certificate and the authority's key through their
//! config files, not a data dir (tests/common/process.rs `Setup::node_of`).
//!
//! * any node's API reaches a device held by another node, and reads its
//!   twin;
//! * kill -9 of a node: its device is OFFLINE on the others within the
//!   heartbeat TTL (spec §8.4); a command issued meanwhile waits and is
//!   delivered once when the device comes back to another node;
//! * items 61/62: a device that closes its connection, and the devices of
//!   a node that stops (SIGTERM), are OFFLINE on every node;
//! * item 63: a broker restart during an update loses neither the update
//!   nor the device's changes; `/readyz` is 503 meanwhile;
//! * a three-node NATS cluster with R3 streams loses a node during a
//!   notification load: 0 lost, 0 duplicated events, by sequence number.
//!
//! Every wait is bounded; a missing nats-server fails the test (scripts/test
//! installs it).

// Tests are the IO side: they time real processes and sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_gateway::coap::{option, Code, MessageWriter};
use common::nats::{self, NatsCluster, NatsServer};
use common::ocf::{
    body, cbor, sign_up_body, text, uri_path, Hook, OcfDevice, Registration, OCF_CBOR,
};
use common::process::{Api, Gateway, HubBackend, Setup, SseEvent};
use common::{Msg, DEVICE_ID};
use serde_json::{json, Value};

const OWNER: &str = "alice";
/// How long a test waits for something a gateway does on its own.
const PATIENCE: Duration = Duration::from_secs(15);
/// `[hub.nats] heartbeat_ttl` of these tests: short, so that the crash
/// tests take seconds.
const HEARTBEAT_TTL: Duration = Duration::from_secs(3);
/// What detecting a lapsed heartbeat may take beyond the TTL itself: the
/// other nodes' check period and an API poll.
const DETECTION_SLACK: Duration = Duration::from_secs(2);

fn nats_hub(url: &str, prefix: &str, replicas: u32) -> HubBackend {
    HubBackend::Nats {
        url: url.to_owned(),
        prefix: prefix.to_owned(),
        extra: format!(
            "replicas = {replicas}\nheartbeat_ttl = \"{}s\"\nrequest_timeout = \"2s\"\n",
            HEARTBEAT_TTL.as_secs()
        ),
    }
}

/// Two nodes on the hub at `url` under one fresh prefix: A serves first
/// (creating the PKI and the authority key), B shares A's files.
fn two_nodes(url: &str, replicas: u32) -> (Setup, Gateway, Setup, Gateway) {
    let prefix = nats::unique_prefix();
    let a = Setup::first_node("", nats_hub(url, &prefix, replicas));
    let gw_a = a.serve();
    let b = Setup::node_of(&a, "", nats_hub(url, &prefix, replicas));
    let gw_b = b.serve();
    (a, gw_a, b, gw_b)
}

fn logs(nodes: &[(&str, &Gateway)]) -> String {
    nodes
        .iter()
        .map(|(name, gw)| format!("--- node {name} ---\n{}", gw.log()))
        .collect()
}

/// The OCF identity of [`DEVICE_ID`] for `setup`'s CA.
fn device_tls(setup: &Setup) -> Arc<rustls::ClientConfig> {
    let (cert, key) = setup.device_certificate(DEVICE_ID);
    coap_gateway::auth::tls::client_config(&setup.pki().join("ca.pem"), Some((&cert, &key)))
        .expect("device TLS config")
}

/// A device on `setup`'s node with an observable `/light`.
fn light_device(setup: &Setup, tls: &Arc<rustls::ClientConfig>, value: Value) -> OcfDevice {
    let addr = format!("127.0.0.1:{}", setup.port).parse().expect("addr");
    let mut dev = OcfDevice::connect_to(addr, tls.clone());
    dev.add_resource("/light", "core.light", value, true);
    dev
}

/// Sign-up with a code from `setup`'s CLI, sign-in, publish `/light`.
fn sign_up_in_publish(setup: &Setup, dev: &mut OcfDevice) -> Registration {
    let code = setup.cli(&["token", "code", "--owner", OWNER]);
    let m = dev.sign_up_with(&sign_up_body(code.trim()));
    assert_eq!(m.code, Code::CHANGED, "sign-up: {:?}", text(&m));
    let reg = Registration::from_sign_up(&m);
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    let published = dev.publish(&dev.publish_body(&["/light"]));
    assert_eq!(
        published.code,
        Code::CHANGED,
        "publish: {:?}",
        text(&published)
    );
    dev.settle(Duration::from_millis(200));
    reg
}

fn user_api(setup: &Setup) -> Api {
    let token = setup.cli(&["token", "user", "--owner", OWNER]);
    setup.api(token.trim())
}

fn light_path() -> String {
    format!("/api/v1/devices/{DEVICE_ID}/resources/light")
}

fn status_of(api: &Api) -> Option<String> {
    let (code, device) = api.get(&format!("/api/v1/devices/{DEVICE_ID}"));
    (code == 200)
        .then(|| {
            device["metadata"]["connection"]["status"]
                .as_str()
                .map(str::to_owned)
        })
        .flatten()
}

/// The twin's `/light` content as `api` shows it.
fn twin_light(api: &Api) -> Option<Value> {
    let (code, body) = api.get(&light_path());
    (code == 200).then(|| body["content"].clone())
}

/// Serves `dev` (answers the gateway, in short slices) until `probe`
/// gives a value; panics naming `what` after `limit`.
fn serve_until<T>(
    dev: &mut OcfDevice,
    limit: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not within {limit:?}; device requests {:?}",
            dev.requests
        );
        dev.settle(Duration::from_millis(30));
    }
}

/// Polls `probe` every 50 ms; panics naming `what` after `limit`.
fn poll_until<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `PUT .../resources/light` through `api` on a thread, serving `dev`
/// until it answers.
fn put_light_serving(api: &Api, dev: &mut OcfDevice, value: &Value) -> (u16, Value) {
    let caller = Api {
        base: api.base.clone(),
        token: api.token.clone(),
    };
    let path = format!("{}?timeToLive=30s", light_path());
    let value = value.clone();
    let put = std::thread::spawn(move || caller.put(&path, &value));
    serve_until(dev, Duration::from_secs(40), "the PUT's answer", || {
        put.is_finished().then_some(())
    });
    put.join().expect("PUT thread")
}

fn is_light_post(m: &Msg) -> bool {
    m.code == Code::POST && uri_path(m) == "/light"
}

/// Every event of `OWNER` the hub has, replayed by `api`'s node from its
/// log (`Last-Event-ID: 0`), until the stream is quiet for a second. A
/// replay the node refuses with 503 (the broker did not answer in time,
/// e.g. while a stream elects a new leader) is asked again, for
/// [`PATIENCE`] at most; an answered one must be whole.
fn all_events(api: &Api) -> Vec<SseEvent> {
    let started = Instant::now();
    let mut refusals = Vec::new();
    loop {
        let mut stream = api.events("", Some(0), Duration::from_secs(60));
        let events = stream.until_quiet(PATIENCE, Duration::from_secs(1), Duration::from_secs(30));
        match &stream.ended {
            Some(why) if events.is_empty() && why.contains(": 503 ") => {
                refusals.push(format!("{:?}: {why}", started.elapsed()));
                assert!(
                    started.elapsed() < PATIENCE,
                    "the event replay was refused for {PATIENCE:?}: {refusals:#?}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            Some(why) if events.is_empty() => panic!("the event replay failed: {why}"),
            _ => {
                if !refusals.is_empty() {
                    eprintln!("the event replay was refused first: {refusals:#?}");
                }
                return events;
            }
        }
    }
}

/// How often each `seq` of `/light` appears in the `resource_changed`
/// events.
fn light_seqs(events: &[SseEvent]) -> BTreeMap<u64, usize> {
    let mut seen = BTreeMap::new();
    for e in events {
        if e.event == "resource_changed" && e.data["href"] == "/light" {
            if let Some(seq) = e.data["content"]["seq"].as_u64() {
                *seen.entry(seq).or_insert(0) += 1;
            }
        }
    }
    seen
}

/// The kinds and ids of `events`, for a failure message.
fn summary(events: &[SseEvent]) -> String {
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for e in events {
        *kinds.entry(e.event.as_str()).or_insert(0) += 1;
    }
    format!(
        "{} events, ids {:?}..{:?}, {kinds:?}",
        events.len(),
        events.first().and_then(|e| e.id),
        events.last().and_then(|e| e.id)
    )
}

fn answered(events: &[SseEvent], correlation_id: &str) -> Vec<SseEvent> {
    events
        .iter()
        .filter(|e| e.event == "command_answered" && e.data["correlationId"] == correlation_id)
        .cloned()
        .collect()
}

/// The device's answer to `req`: 2.04 with `value` as CBOR.
fn changed_answer(req: &Msg, value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut w = MessageWriter::new(&mut out, Code::CHANGED, &req.token);
        w.option_uint(option::CONTENT_FORMAT, OCF_CBOR);
        w.payload(&cbor(value));
        w.finish();
    }
    out
}

#[test]
fn a_put_through_node_b_reaches_the_device_on_node_a_and_b_reads_its_twin() {
    let nats = NatsServer::start();
    let (a, gw_a, b, gw_b) = two_nodes(&nats.url(), 1);
    let ctx = || logs(&[("A", &gw_a), ("B", &gw_b)]);
    let tls = device_tls(&a);
    let mut dev = light_device(&a, &tls, json!({"state": false, "seq": 0}));
    sign_up_in_publish(&a, &mut dev);
    let api_a = user_api(&a);
    let api_b = user_api(&b);

    // Any node knows the device and where it is connected.
    serve_until(&mut dev, PATIENCE, "ONLINE through B", || {
        (status_of(&api_b).as_deref() == Some("ONLINE")).then_some(())
    });
    let (_, on_a) = api_a.get(&format!("/api/v1/devices/{DEVICE_ID}"));
    let (_, on_b) = api_b.get(&format!("/api/v1/devices/{DEVICE_ID}"));
    assert_eq!(
        on_a["metadata"]["connection"], on_b["metadata"]["connection"],
        "both nodes show A's connection"
    );

    // The twin read through B follows what the device on A pushes.
    serve_until(&mut dev, PATIENCE, "the twin through B", || {
        twin_light(&api_b).filter(|c| c["seq"] == 0)
    });
    dev.set_value("/light", json!({"state": false, "seq": 1}));
    serve_until(&mut dev, PATIENCE, "the pushed change through B", || {
        twin_light(&api_b).filter(|c| c["seq"] == 1)
    });

    // An update through B reaches the device on A; B answers with its
    // answer.
    let (status, answer) = put_light_serving(&api_b, &mut dev, &json!({"state": true}));
    assert_eq!(status, 200, "{answer}\n{}", ctx());
    assert_eq!(answer["status"], "OK", "{answer}");
    assert_eq!(
        answer["content"],
        json!({"state": true, "seq": 1}),
        "{answer}"
    );
    assert_eq!(dev.count_requests(is_light_post), 1, "{:?}", dev.requests);
    let post = dev
        .requests
        .iter()
        .find(|m| is_light_post(m))
        .expect("the POST");
    assert_eq!(body(post), json!({"state": true}));
    serve_until(
        &mut dev,
        PATIENCE,
        "the update in the twin through B",
        || twin_light(&api_b).filter(|c| c["state"] == true),
    );
    let correlation_id = answer["correlationId"].as_str().expect("correlationId");
    let events = all_events(&api_b);
    assert_eq!(
        answered(&events, correlation_id).len(),
        1,
        "one answer recorded: {events:?}"
    );
    dev.assert_open();
}

#[test]
fn item_62_kill_9_of_node_a_makes_its_device_offline_within_the_ttl_and_a_pending_command_reaches_it_once_on_node_b(
) {
    let nats = NatsServer::start();
    let (a, mut gw_a, b, gw_b) = two_nodes(&nats.url(), 1);
    let tls = device_tls(&a);
    let mut dev = light_device(&a, &tls, json!({"state": false, "seq": 0}));
    let reg = sign_up_in_publish(&a, &mut dev);
    let api_b = user_api(&b);
    serve_until(&mut dev, PATIENCE, "ONLINE with its twin through B", || {
        (status_of(&api_b).as_deref() == Some("ONLINE"))
            .then(|| twin_light(&api_b))
            .flatten()
    });

    // spec §8.4: A dies without a word; B notices its heartbeat lapse.
    gw_a.kill_9();
    let killed = Instant::now();
    drop(dev);
    poll_until(
        HEARTBEAT_TTL + DETECTION_SLACK + Duration::from_secs(5),
        "OFFLINE through B",
        || (status_of(&api_b).as_deref() == Some("OFFLINE")).then_some(()),
    );
    let took = killed.elapsed();
    eprintln!("kill -9 of node A: OFFLINE through B after {took:?}");
    assert!(
        took <= HEARTBEAT_TTL + DETECTION_SLACK,
        "OFFLINE after {took:?}; heartbeat TTL {HEARTBEAT_TTL:?}\n{}",
        gw_b.log()
    );

    // Meanwhile an update waits as a pending command.
    let (status, pending) = api_b.put(
        &format!("{}?timeToLive=1m", light_path()),
        &json!({"state": true}),
    );
    assert_eq!(status, 202, "{pending}\n{}", gw_b.log());
    assert_eq!(pending["status"], "PENDING", "{pending}");
    let correlation_id = pending["correlationId"]
        .as_str()
        .expect("correlationId")
        .to_owned();
    let (_, list) = api_b.get(&format!("/api/v1/devices/{DEVICE_ID}/pending-commands"));
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    // The device comes back to B, with its twin intact, and gets the
    // command once.
    let (_, twin_before) = api_b.get(&light_path());
    assert_eq!(twin_before["content"], json!({"state": false, "seq": 0}));
    let mut dev = light_device(&b, &tls, json!({"state": false, "seq": 0}));
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    dev.wait_for_request(PATIENCE, is_light_post);
    serve_until(&mut dev, PATIENCE, "the pending command answered", || {
        let (_, list) = api_b.get(&format!("/api/v1/devices/{DEVICE_ID}/pending-commands"));
        list.as_array().is_some_and(Vec::is_empty).then_some(())
    });
    dev.settle(Duration::from_secs(1));
    assert_eq!(
        dev.count_requests(is_light_post),
        1,
        "delivered exactly once: {:?}",
        dev.requests
    );
    assert_eq!(status_of(&api_b).as_deref(), Some("ONLINE"));
    let events = all_events(&api_b);
    let answers = answered(&events, &correlation_id);
    assert_eq!(answers.len(), 1, "one answer recorded: {events:?}");
    assert_eq!(answers[0].data["status"], "OK", "{:?}", answers[0]);
    serve_until(&mut dev, PATIENCE, "the update in the twin", || {
        twin_light(&api_b).filter(|c| c["state"] == true)
    });
}

#[test]
fn item_61_a_device_closing_its_connection_is_offline_on_every_node() {
    let nats = NatsServer::start();
    let (a, gw_a, b, gw_b) = two_nodes(&nats.url(), 1);
    let tls = device_tls(&a);
    let mut dev = light_device(&a, &tls, json!({"state": false}));
    sign_up_in_publish(&a, &mut dev);
    let api_a = user_api(&a);
    let api_b = user_api(&b);
    serve_until(&mut dev, PATIENCE, "ONLINE through B", || {
        (status_of(&api_b).as_deref() == Some("ONLINE")).then_some(())
    });
    drop(dev);
    for (name, api) in [("A", &api_a), ("B", &api_b)] {
        poll_until(PATIENCE, &format!("OFFLINE through {name}"), || {
            (status_of(api).as_deref() == Some("OFFLINE")).then_some(())
        });
    }
    drop((gw_a, gw_b));
}

#[test]
fn item_62_sigterm_of_a_gateway_node_makes_its_devices_offline() {
    let nats = NatsServer::start();
    let (a, mut gw_a, b, gw_b) = two_nodes(&nats.url(), 1);
    let tls = device_tls(&a);
    let mut dev = light_device(&a, &tls, json!({"state": false}));
    sign_up_in_publish(&a, &mut dev);
    let api_b = user_api(&b);
    serve_until(&mut dev, PATIENCE, "ONLINE through B", || {
        (status_of(&api_b).as_deref() == Some("ONLINE")).then_some(())
    });

    let stopping = std::thread::spawn(move || {
        let code = gw_a.terminate();
        (code, gw_a)
    });
    // The drain closes the device's connection (Release, then close).
    dev.expect_closed(Duration::from_secs(15));
    let (code, gw_a) = stopping.join().expect("terminate thread");
    assert_eq!(code, Some(0), "a clean stop\n{}", gw_a.log());
    let stopped = Instant::now();
    poll_until(HEARTBEAT_TTL + DETECTION_SLACK, "OFFLINE through B", || {
        (status_of(&api_b).as_deref() == Some("OFFLINE")).then_some(())
    });
    eprintln!(
        "SIGTERM of node A: OFFLINE through B {:?} after it exited",
        stopped.elapsed()
    );
    assert!(stopped.elapsed() <= HEARTBEAT_TTL + DETECTION_SLACK);
    drop(gw_b);
}

#[test]
fn item_63_a_nats_restart_during_an_update_loses_neither_the_update_nor_the_notifications() {
    let mut nats = NatsServer::start();
    let prefix = nats::unique_prefix();
    let setup = Setup::with_hub("", nats_hub(&nats.url(), &prefix, 1));
    let gw = setup.serve();
    let tls = device_tls(&setup);
    let mut dev = light_device(&setup, &tls, json!({"state": false, "seq": 0}));
    sign_up_in_publish(&setup, &mut dev);
    let api = user_api(&setup);
    serve_until(&mut dev, PATIENCE, "the twin", || {
        twin_light(&api).filter(|c| c["seq"] == 0)
    });

    // The device holds its answer to the update while the broker is away.
    dev.hook = Some(Box::new(|m: &Msg| {
        if is_light_post(m) {
            Hook::Silent
        } else {
            Hook::Default
        }
    }));
    let caller = Api {
        base: api.base.clone(),
        token: api.token.clone(),
    };
    let path = format!("{}?timeToLive=60s", light_path());
    let put = std::thread::spawn(move || caller.put(&path, &json!({"state": true})));
    let post = dev.wait_for_request(PATIENCE, is_light_post);

    nats.kill_9();
    let outage = Instant::now();
    serve_until(&mut dev, PATIENCE, "/readyz 503 without the broker", || {
        (setup.readyz() == 503).then_some(())
    });
    // During the outage: the device answers the update and pushes a
    // change; its connection stays up.
    dev.hook = None;
    dev.resources
        .insert("/light".to_owned(), json!({"state": true, "seq": 1}));
    dev.send_raw(&changed_answer(&post, &json!({"state": true, "seq": 1})));
    dev.set_value("/light", json!({"state": true, "seq": 2}));
    while outage.elapsed() < Duration::from_secs(3) {
        dev.settle(Duration::from_millis(50));
    }
    dev.assert_open();
    assert!(!put.is_finished(), "the update ended during the outage");

    nats.restart_and_wait();
    serve_until(
        &mut dev,
        Duration::from_secs(30),
        "/readyz 200 again",
        || (setup.readyz() == 200).then_some(()),
    );
    serve_until(
        &mut dev,
        Duration::from_secs(40),
        "the update's answer",
        || put.is_finished().then_some(()),
    );
    let (status, answer) = put.join().expect("PUT thread");
    assert_eq!(status, 200, "{answer}\n{}", gw.log());
    assert_eq!(answer["status"], "OK", "{answer}");
    assert_eq!(answer["content"], json!({"state": true, "seq": 1}));
    assert_eq!(dev.count_requests(is_light_post), 1, "sent once");

    // Nothing lost: the twin has the change pushed during the outage, the
    // log has each change and the answer once.
    serve_until(
        &mut dev,
        PATIENCE,
        "the outage's change in the twin",
        || twin_light(&api).filter(|c| c["seq"] == 2),
    );
    let events = all_events(&api);
    let seqs = light_seqs(&events);
    assert_eq!(seqs.get(&2), Some(&1), "{seqs:?}");
    let correlation_id = answer["correlationId"].as_str().expect("correlationId");
    assert_eq!(answered(&events, correlation_id).len(), 1, "{events:?}");
    dev.assert_open();
}

#[test]
fn a_nats_node_dies_during_a_notification_load_on_an_r3_cluster_and_no_event_is_lost_or_duplicated()
{
    const NOTIFICATIONS: u64 = 300;
    let mut cluster = NatsCluster::start(3);
    let (a, gw_a, b, gw_b) = two_nodes(&cluster.url(), 3);
    let ctx = |cluster: &NatsCluster| {
        format!("{}{}", logs(&[("A", &gw_a), ("B", &gw_b)]), cluster.logs())
    };
    let tls = device_tls(&a);
    let mut dev = light_device(&a, &tls, json!({"state": false, "seq": 0}));
    sign_up_in_publish(&a, &mut dev);
    let api_b = user_api(&b);
    serve_until(&mut dev, PATIENCE, "the twin through B", || {
        twin_light(&api_b).filter(|c| c["seq"] == 0)
    });

    // The node to stop: the leader of this prefix's event stream if the
    // monitoring endpoint names one, else the meta leader.
    let victim_name = stream_leader(&cluster, &a)
        .or_else(|| cluster.meta_leader())
        .expect("a leader to stop");
    let victim = cluster
        .nodes
        .iter()
        .position(|n| n.name == victim_name)
        .expect("the leader is a node");

    let started = Instant::now();
    for seq in 1..=NOTIFICATIONS {
        if seq == NOTIFICATIONS / 3 {
            cluster.nodes[victim].kill_9();
        }
        dev.set_value("/light", json!({"state": seq % 2 == 0, "seq": seq}));
        // Paces the load and answers the gateway meanwhile.
        dev.settle(Duration::from_millis(5));
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the load took over a minute"
        );
    }
    serve_until(
        &mut dev,
        Duration::from_secs(30),
        "the last notification in the twin through B",
        || twin_light(&api_b).filter(|c| c["seq"] == NOTIFICATIONS),
    );
    // The twin (a key-value bucket with its own leader) can be ahead of
    // the event stream: when the stream's leader is the node killed, its
    // events wait in node A's outbox until the two left elect a new one
    // (5-10 s on nats-server 2.9), so wait for the last event itself.
    // A device's events keep their order, so with the last one present a
    // missing one is lost, not late.
    let started = Instant::now();
    let events = loop {
        let events = all_events(&api_b);
        if light_seqs(&events).contains_key(&NOTIFICATIONS)
            || started.elapsed() > Duration::from_secs(60)
        {
            break events;
        }
        dev.settle(Duration::from_millis(200));
    };
    let seqs = light_seqs(&events);
    let lost: Vec<u64> = (1..=NOTIFICATIONS)
        .filter(|s| !seqs.contains_key(s))
        .collect();
    let duplicated: Vec<(u64, usize)> = seqs
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, n)| (*s, *n))
        .collect();
    assert!(
        lost.is_empty() && duplicated.is_empty(),
        "lost {} {lost:?}, duplicated {duplicated:?} (node {victim_name} killed at seq {}); \
         the replay: {}\n{}",
        lost.len(),
        NOTIFICATIONS / 3,
        summary(&events),
        ctx(&cluster)
    );
    dev.assert_open();
    cluster.nodes[victim].restart_and_wait();
}

/// The `server_name` leading the JetStream stream that holds `setup`'s
/// events: a stream of its prefix whose name says "event", as
/// `/jsz?accounts=true&streams=true` lists them.
fn stream_leader(cluster: &NatsCluster, setup: &Setup) -> Option<String> {
    let HubBackend::Nats { prefix, .. } = &setup.hub else {
        return None;
    };
    let prefix = prefix.to_ascii_lowercase();
    let jsz = nats::monitor_json(
        cluster.nodes[0].monitor_port,
        "/jsz?accounts=true&streams=true",
    )?;
    let accounts = jsz["account_details"].as_array()?;
    accounts
        .iter()
        .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
        .filter(|s| {
            let name = s["name"].as_str().unwrap_or("").to_ascii_lowercase();
            name.contains(&prefix) && name.contains("event")
        })
        .find_map(|s| s["cluster"]["leader"].as_str().map(str::to_owned))
}

/// What the other tests build on, with the embedded hub (so it passes
/// without the NATS backend): a second node made with `Setup::node_of`
/// shares the first's CA, gateway certificate and authority key through
/// its config only: a device with a certificate of A's CA is served by B,
/// B's API takes a token A's CLI signed, and a sign-up code from A's CLI
/// signs the device up on B.
#[test]
fn a_second_node_shares_the_ca_certificate_and_authority_key_through_its_config() {
    let a = Setup::first_node("", HubBackend::Embedded);
    let gw_a = a.serve();
    let b = Setup::node_of(&a, "", HubBackend::Embedded);
    let gw_b = b.serve();
    assert_ne!(a.data, b.data);
    assert!(
        !b.data.join("pki").exists(),
        "B made a PKI of its own instead of using A's files"
    );
    assert!(
        !b.data.join("authority-key.pem").exists(),
        "B made an authority key of its own instead of using A's"
    );

    let tls = device_tls(&a);
    let mut dev = light_device(&b, &tls, json!({"state": false}));
    sign_up_in_publish(&a, &mut dev);
    let api_b = user_api(&a);
    let api_b = Api {
        base: b.api(&api_b.token).base,
        token: api_b.token,
    };
    serve_until(&mut dev, PATIENCE, "ONLINE through B", || {
        (status_of(&api_b).as_deref() == Some("ONLINE")).then_some(())
    });
    drop((gw_a, gw_b));
}
