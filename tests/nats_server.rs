//! The test harness's `nats-server` (tests/common/nats.rs), on its own:
//! what the scale-out tests (tests/scaleout.rs) and the NATS pass of the
//! suite rely on. A server comes up with JetStream on its loopback ports,
//! keeps its stream through `kill -9` and a restart on the same port and
//! store dir; a three-node cluster elects a meta leader, holds an R3
//! stream, and keeps taking writes when a node dies.

// Tests are the IO side: they time real processes (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use common::nats::{self, NatsCluster, NatsServer, RawClient};
use serde_json::{json, Value};

/// Retries a JetStream request until its reply has no `error` (a stream
/// leader being elected answers with one, or not at all).
fn js_ok(port: u16, api: &str, body: &Value, limit: Duration) -> Value {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < limit {
        if let Some(reply) = RawClient::connect(port).and_then(|mut c| c.js(api, body)) {
            if reply["error"].is_null() {
                return reply;
            }
            last = Some(reply);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("$JS.API.{api} {body}: no success within {limit:?}; last reply {last:?}");
}

/// Publishes to a stream subject and waits for its PubAck.
fn publish(port: u16, subject: &str, payload: &str, limit: Duration) -> Value {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < limit {
        if let Some(ack) = RawClient::connect(port)
            .and_then(|mut c| c.request(subject, payload.as_bytes(), Duration::from_secs(3)))
        {
            if ack["error"].is_null() && ack["seq"].is_u64() {
                return ack;
            }
            last = Some(ack);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("publish to {subject}: no PubAck within {limit:?}; last {last:?}");
}

fn messages(port: u16, stream: &str) -> u64 {
    let info = js_ok(
        port,
        &format!("STREAM.INFO.{stream}"),
        &json!({}),
        Duration::from_secs(10),
    );
    info["state"]["messages"]
        .as_u64()
        .unwrap_or_else(|| panic!("stream info without state.messages: {info}"))
}

#[test]
fn a_server_keeps_its_stream_through_kill_9_and_a_restart_on_the_same_port_and_store() {
    let mut server = NatsServer::start();
    assert!(server.jetstream_ready(None));
    let jsz = server.jsz().expect("/jsz");
    let store = jsz["config"]["store_dir"].as_str().expect("store_dir");
    assert!(
        store.starts_with(server.store.to_str().expect("utf-8")),
        "JetStream stores in {store}, not in {}",
        server.store.display()
    );
    js_ok(
        server.port,
        "STREAM.CREATE.T",
        &json!({"name": "T", "subjects": ["t.>"], "storage": "file", "num_replicas": 1}),
        Duration::from_secs(10),
    );
    for i in 1..=3u64 {
        let ack = publish(
            server.port,
            "t.a",
            &format!("m{i}"),
            Duration::from_secs(10),
        );
        assert_eq!(ack["seq"], i, "{ack}");
    }

    let port = server.port;
    server.kill_9();
    assert!(!server.is_running());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still served after kill -9"
    );

    server.restart_and_wait();
    assert_eq!(server.port, port);
    assert_eq!(
        messages(server.port, "T"),
        3,
        "the stream after the restart\n{}",
        server.log_text()
    );
    let ack = publish(server.port, "t.a", "m4", Duration::from_secs(10));
    assert_eq!(ack["seq"], 4, "{ack}");
}

#[test]
fn a_three_node_cluster_elects_a_leader_holds_an_r3_stream_and_survives_a_node() {
    let mut cluster = NatsCluster::start(3);
    let mut names: Vec<String> = Vec::new();
    for node in &cluster.nodes {
        let jsz = node.jsz().expect("/jsz");
        assert_eq!(jsz["meta_cluster"]["cluster_size"], 3, "{jsz}");
        names.push(node.name.clone());
    }
    let leader = cluster.meta_leader().expect("a meta leader");
    assert!(names.contains(&leader), "leader {leader} not in {names:?}");
    assert_eq!(cluster.url().split(',').count(), 3);

    let first = cluster.nodes[0].port;
    js_ok(
        first,
        "STREAM.CREATE.R",
        &json!({"name": "R", "subjects": ["r.>"], "storage": "file", "num_replicas": 3}),
        Duration::from_secs(15),
    );
    publish(first, "r.a", "before", Duration::from_secs(10));

    // Kill the stream's leader: the two others elect a new one and go on.
    let info = js_ok(first, "STREAM.INFO.R", &json!({}), Duration::from_secs(10));
    let stream_leader = info["cluster"]["leader"].as_str().expect("stream leader");
    let victim = cluster
        .nodes
        .iter()
        .position(|n| n.name == stream_leader)
        .unwrap_or_else(|| panic!("leader {stream_leader} not in {names:?}"));
    cluster.nodes[victim].kill_9();
    let survivor = cluster.nodes[(victim + 1) % 3].port;
    publish(survivor, "r.a", "after", Duration::from_secs(20));
    assert_eq!(messages(survivor, "R"), 2, "{}", cluster.logs());

    cluster.nodes[victim].restart_and_wait();
    assert_eq!(
        messages(cluster.nodes[victim].port, "R"),
        2,
        "{}",
        cluster.logs()
    );
}

#[test]
fn the_shared_server_serves_jetstream_and_prefixes_are_unique() {
    let shared = nats::shared();
    assert!(nats::monitor_json(shared.monitor_port, "/jsz").is_some_and(|j| !j["config"].is_null()));
    let mut client = RawClient::connect(shared.port).expect("the shared server answers");
    let info = client.js("INFO", &json!({})).expect("account info");
    assert!(info["error"].is_null(), "{info}");
    let a = nats::unique_prefix();
    let b = nats::unique_prefix();
    assert_ne!(a, b);
    assert!(a.chars().all(|c| c.is_ascii_alphanumeric()), "{a}");
}
