//! The NATS hub against a real nats-server (Debian's 2.9): one node, two
//! nodes on one server, a node that dies, a broker that restarts. Each
//! test starts its own server with JetStream on a free loopback port and
//! a temporary store; a missing `nats-server` fails the test.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command as Process, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::*;
use crate::hub::twin::Operation;
use crate::hub::{CommandKind, Protocol};

const D: &str = "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a";

/// A nats-server with JetStream on loopback; killed on drop.
struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl NatsServer {
    fn start() -> NatsServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = NatsServer {
            child: None,
            port,
            dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Process::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start nats-server ({e}): install it (Debian: apt-get install -y nats-server)"
                )
            });
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn settings(server: &NatsServer, prefix: &str, node: &str) -> NatsSettings {
    NatsSettings {
        servers: vec![server.url()],
        credentials_file: None,
        token: None,
        tls_ca: None,
        replicas: 1,
        prefix: prefix.to_owned(),
        request_timeout: Duration::from_secs(2),
        heartbeat_ttl: Duration::from_secs(2),
        buffer: 4096,
        event_retention: 10_000,
        node_id: node.to_owned(),
        grant_max_age: Duration::from_secs(3600),
    }
}

/// What a node's shards would do with the hub's messages: records them.
#[derive(Default)]
struct Inbox {
    delivered: Mutex<Vec<(ConnectionRef, HubMessage)>>,
    closed: Mutex<Vec<(ConnectionRef, String)>>,
}

impl Connections for Inbox {
    fn close(&self, connection: ConnectionRef, reason: &str) {
        lock(&self.closed).push((connection, reason.to_owned()));
    }

    fn deliver(&self, connection: ConnectionRef, message: HubMessage) -> Result<(), HubMessage> {
        lock(&self.delivered).push((connection, message));
        Ok(())
    }
}

impl Inbox {
    /// Waits for a command handed to `connection`.
    fn command(&self, connection: ConnectionRef) -> Command {
        let found = wait_for(Duration::from_secs(5), || {
            let mut delivered = lock(&self.delivered);
            let at = delivered
                .iter()
                .position(|(c, m)| *c == connection && matches!(m, HubMessage::Command(_)))?;
            match delivered.remove(at).1 {
                HubMessage::Command(c) => Some(*c),
                HubMessage::Twin { .. } => None,
            }
        });
        found.expect("a command reached the connection")
    }
}

fn wait_for<T>(limit: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        sleep(Duration::from_millis(50));
    }
}

fn prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

fn open(server: &NatsServer, prefix: &str, node: &str) -> (NatsHub, Arc<Inbox>) {
    let hub = NatsHub::open(settings(server, prefix, node)).expect("the NATS hub opens");
    let inbox = Arc::new(Inbox::default());
    hub.set_connections(inbox.clone());
    (hub, inbox)
}

fn ctx(owner: &str) -> AuthContext {
    AuthContext {
        owner: owner.into(),
        device_id: D.into(),
        ..AuthContext::default()
    }
}

fn online(node: &str, c: u128) -> Online {
    Online {
        connection: ConnectionRef(c),
        connected_at_ns: 1,
        protocol: Protocol::CoapsTcp,
        service_id: node.into(),
        connection_id: "127.0.0.1:1".into(),
    }
}

fn link(href: &str) -> StoredLink {
    StoredLink {
        href: href.into(),
        device_id: D.into(),
        instance_id: crate::ocf::rd::instance_id(href),
        resource_types: Some(vec!["x.light".into()]),
        ..StoredLink::default()
    }
}

fn change(href: &str, value: &[u8], sequence: u64) -> ResourceChange {
    ResourceChange {
        href: href.into(),
        content: Content {
            data: value.to_vec(),
            content_format: 60,
        },
        status: Status::Ok,
        etag: Some(value.to_vec()),
        resource_types: vec!["x.light".into()],
        sequence,
    }
}

fn update(correlation_id: &str, href: &str) -> Command {
    Command {
        correlation_id: correlation_id.into(),
        device_id: D.into(),
        href: href.into(),
        kind: CommandKind::Update {
            content: Content {
                data: vec![0xa0],
                content_format: 60,
            },
        },
        interface: None,
        valid_until_ns: 0,
        issued_at_ns: 0,
    }
}

fn ok(correlation_id: &str) -> CommandResult {
    CommandResult {
        correlation_id: correlation_id.into(),
        status: Status::Ok,
        content: Content::none(),
        etag: None,
    }
}

fn outcome(ticket: &CommandTicket) -> CommandOutcome {
    ticket
        .outcome
        .recv_timeout(Duration::from_secs(10))
        .expect("the command's outcome arrives")
}

#[test]
fn one_node_keeps_the_registry_the_twin_and_commands() {
    let server = NatsServer::start();
    let p = prefix();
    let (hub, inbox) = open(&server, &p, "node-a");
    let alice = ctx("alice");
    hub.add_device(&alice).unwrap();
    hub.add_device(&alice).unwrap();
    assert!(matches!(
        hub.add_device(&ctx("bob")),
        Err(HubError::PermissionDenied(_))
    ));
    assert!(hub.owns("alice", &D.to_uppercase()));
    assert!(!hub.owns("bob", D));
    assert!(hub.available());

    assert_eq!(
        hub.set_online(&alice, online("node-a", 1)),
        Ok(Replaced(None))
    );
    hub.publish(&alice, vec![link("/light"), link("/switch")])
        .unwrap();
    assert_eq!(hub.links("alice", &[D], &[], 0)[0].1.len(), 2);
    assert!(matches!(
        hub.publish(&alice, vec![link("/")]),
        Err(HubError::InvalidArgument(_))
    ));
    // A twin value, a stale one (older sequence) and an identical one.
    hub.resources_changed(&alice, ConnectionRef(1), vec![change("/light", b"on", 5)])
        .unwrap();
    hub.resources_changed(&alice, ConnectionRef(1), vec![change("/light", b"off", 4)])
        .unwrap();
    hub.resources_changed(&alice, ConnectionRef(1), vec![change("/light", b"on", 6)])
        .unwrap();
    assert!(matches!(
        hub.resources_changed(&alice, ConnectionRef(9), vec![change("/light", b"x", 7)]),
        Err(HubError::PermissionDenied(_))
    ));
    hub.set_twin_state(&alice, ConnectionRef(1), TwinState::InSync);
    assert_eq!(hub.latest_etags(D, 4), vec![b"on".to_vec()]);
    hub.flush().unwrap();
    let twin = hub.resources("alice", D).unwrap();
    assert_eq!(twin.len(), 1);
    assert_eq!(twin[0].content.data, b"on");
    assert_eq!(twin[0].version, 0);
    assert_eq!(
        hub.resource("alice", D, "/light").unwrap().content.data,
        b"on"
    );
    assert!(matches!(
        hub.resource("alice", D, "/switch"),
        Err(HubError::Unavailable(_))
    ));
    assert!(matches!(
        hub.resource("alice", D, "/nope"),
        Err(HubError::NotFound(_))
    ));
    assert!(matches!(
        hub.resources("bob", D),
        Err(HubError::NotFound(_))
    ));
    let record = hub.device("alice", D).unwrap();
    assert!(record.status.online);
    assert_eq!(record.status.service_id, "node-a");
    assert_eq!(record.twin.state, TwinState::InSync);
    assert_eq!(hub.devices("alice").len(), 1);

    // A command for the online device reaches its connection; the answer
    // reaches the ticket.
    let ticket = hub.submit_command("alice", update("c1", "/light")).unwrap();
    assert!(!ticket.pending);
    assert!(matches!(
        hub.submit_command("alice", update("c1", "/light")),
        Err(HubError::InvalidArgument(_))
    ));
    let sent = inbox.command(ConnectionRef(1));
    assert_eq!(sent.correlation_id, "c1");
    hub.command_result(&alice, ConnectionRef(1), ok("c1"));
    assert_eq!(outcome(&ticket), CommandOutcome::Answered(ok("c1")));
    // A second answer is ignored: answered exactly once.
    hub.command_result(&alice, ConnectionRef(1), ok("c1"));

    // Offline: a command waits, and goes out at the next sign-in.
    hub.set_offline(D, ConnectionRef(1));
    hub.flush().unwrap();
    assert!(!hub.device("alice", D).unwrap().status.online);
    let waiting = hub.submit_command("alice", update("c2", "/light")).unwrap();
    assert!(waiting.pending);
    assert_eq!(hub.pending_commands("alice", D).unwrap().len(), 1);
    let canceled = hub.submit_command("alice", update("c3", "/light")).unwrap();
    hub.cancel_command("alice", D, "c3").unwrap();
    assert_eq!(outcome(&canceled), CommandOutcome::Canceled);
    assert!(matches!(
        hub.cancel_command("alice", D, "c3"),
        Err(HubError::NotFound(_))
    ));
    hub.set_online(&alice, online("node-a", 2)).unwrap();
    let taken = hub.take_pending_commands(&alice, ConnectionRef(2), now_ns());
    assert_eq!(
        taken
            .iter()
            .map(|c| c.correlation_id.as_str())
            .collect::<Vec<_>>(),
        ["c2"]
    );
    assert!(hub
        .take_pending_commands(&alice, ConnectionRef(2), now_ns())
        .is_empty());
    assert!(matches!(
        hub.cancel_command("alice", D, "c2"),
        Err(HubError::InvalidArgument(_))
    ));
    hub.command_result(&alice, ConnectionRef(2), ok("c2"));
    assert_eq!(outcome(&waiting), CommandOutcome::Answered(ok("c2")));
    // The twin survived the reconnection.
    assert_eq!(hub.latest_etags(D, 4), vec![b"on".to_vec()]);

    // The event log, in order, by stream sequence.
    let events = hub.events_after("alice", 0, 1000).unwrap();
    let names: Vec<&str> = events.iter().map(|e| e.kind.name()).collect();
    assert_eq!(names.first(), Some(&"device_registered"));
    assert_eq!(
        names.iter().filter(|n| **n == "resource_changed").count(),
        1,
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| **n == "command_answered").count(),
        2,
        "{names:?}"
    );
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    let later = hub.events_after("alice", events[2].seq, 1000).unwrap();
    assert_eq!(
        later.len(),
        events.len() - 3,
        "{:?} {:?}",
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        later
            .iter()
            .map(|e| (e.seq, e.kind.name()))
            .collect::<Vec<_>>()
    );
    assert!(hub.events_after("bob", 0, 10).unwrap().is_empty());

    // A live subscriber sees what comes next.
    let live = hub.subscribe("alice");
    hub.set_twin_enabled("alice", D, false, false).unwrap();
    let event = live
        .recv_timeout(Duration::from_secs(5))
        .expect("a live event");
    assert_eq!(event.kind, EventKind::TwinEnabledChanged { enabled: false });
    assert!(!hub.twin_enabled(D));
    assert!(lock(&inbox.delivered).iter().any(|(_, m)| *m
        == HubMessage::Twin {
            enabled: false,
            force: false
        }));

    // Unpublish takes the resource out of the twin; delete ends it all.
    let ins = crate::ocf::rd::instance_id("/light");
    assert_eq!(hub.unpublish(&alice, &[ins], 0).unwrap(), vec!["/light"]);
    assert!(matches!(
        hub.resource("alice", D, "/light"),
        Err(HubError::NotFound(_))
    ));
    let orphan = hub
        .submit_command("alice", update("c4", "/switch"))
        .unwrap();
    hub.delete_device("alice", D).unwrap();
    assert_eq!(outcome(&orphan), CommandOutcome::DeviceDeleted);
    assert!(lock(&inbox.closed)
        .iter()
        .any(|(c, r)| *c == ConnectionRef(2) && r == "device deleted"));
    assert!(!hub.owns("alice", D));
    assert!(hub.devices("alice").is_empty());
    assert!(matches!(
        hub.delete_device("alice", D),
        Err(HubError::NotFound(_))
    ));
    assert!(hub.stats().nats_published.load(Ordering::Relaxed) > 0);
}

/// The issuer's watch on a command starts while the command is already
/// on its way (spawned, not awaited, before the dispatch): an answer
/// stored before the watch exists must still reach the caller. Here the
/// key is answered before the watch starts at all.
#[test]
fn an_answer_stored_before_the_issuers_watch_still_reaches_the_caller() {
    let server = NatsServer::start();
    let p = prefix();
    let (hub, _inbox) = open(&server, &p, "node-a");
    let ckey = Inner::item_key("alice", &device_key(D), "early");
    let answered = CommandEntry {
        owner: "alice".into(),
        order: 1,
        command: update("early", "/light"),
        state: CommandState::Answered(ok("early")),
        finished_at_ns: now_ns(),
    };
    let inner = hub.inner.clone();
    let (key, bytes) = (ckey.clone(), answered.encode().unwrap());
    hub.call(async move {
        inner
            .commands
            .create(&key, bytes)
            .await
            .map_err(unavailable)?;
        Ok(())
    })
    .unwrap();
    let (tx, rx) = flume::bounded(1);
    hub.handle.spawn(hub.inner.clone().watch_outcome(ckey, tx));
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)),
        Ok(CommandOutcome::Answered(ok("early")))
    );
}

/// A burst of notifications goes out merged (a few messages, not two
/// per notification), and every reader gets it back event by event, in
/// order: the event log from any point, a live subscriber, the twin.
#[test]
fn a_burst_of_notifications_is_merged_and_read_back_one_by_one() {
    const N: usize = 300;
    let server = NatsServer::start();
    let p = prefix();
    let (hub, _inbox) = open(&server, &p, "node-a");
    let alice = ctx("alice");
    hub.add_device(&alice).unwrap();
    hub.set_online(&alice, online("node-a", 1)).unwrap();
    hub.publish(&alice, vec![link("/light")]).unwrap();
    hub.flush().unwrap();
    let live = hub.subscribe("alice");
    let published = || hub.stats().nats_published.load(Ordering::Relaxed);
    let before = published();
    for i in 1..=N {
        let value = i.to_string();
        hub.resources_changed(
            &alice,
            ConnectionRef(1),
            vec![change("/light", value.as_bytes(), i as u64)],
        )
        .unwrap();
    }
    hub.flush().unwrap();
    let messages = published() - before;
    assert!(
        messages < N as u64,
        "{N} notifications (an event and a twin value each) went out in {messages} messages"
    );

    let values = |events: &[Event]| -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::ResourceChanged { content, .. } => {
                    Some(String::from_utf8(content.data.clone()).unwrap())
                }
                _ => None,
            })
            .collect()
    };
    let expected: Vec<String> = (1..=N).map(|i| i.to_string()).collect();
    let all = hub.events_after("alice", 0, 10_000).unwrap();
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(values(&all), expected);
    // From inside a merged message, and bounded by the limit.
    let changed: Vec<&Event> = all
        .iter()
        .filter(|e| matches!(e.kind, EventKind::ResourceChanged { .. }))
        .collect();
    let mid = changed[N / 2 - 1].seq;
    let rest = hub.events_after("alice", mid, 10_000).unwrap();
    assert_eq!(values(&rest), expected[N / 2..]);
    let ten = hub.events_after("alice", mid, 10).unwrap();
    assert_eq!(values(&ten), expected[N / 2..N / 2 + 10]);
    assert_eq!(
        ten.iter().map(|e| e.seq).collect::<Vec<_>>(),
        changed[N / 2..N / 2 + 10]
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>()
    );

    let mut seen = Vec::new();
    while seen.len() < N {
        let event = live
            .recv_timeout(Duration::from_secs(5))
            .expect("every event reaches the live subscriber");
        seen.push(event.as_ref().clone());
    }
    assert_eq!(values(&seen), expected);
    assert_eq!(
        hub.resource("alice", D, "/light").unwrap().content.data,
        N.to_string().into_bytes()
    );
}

#[test]
fn two_nodes_route_commands_and_share_the_twin() {
    let server = NatsServer::start();
    let p = prefix();
    let (a, inbox_a) = open(&server, &p, "node-a");
    let (b, _inbox_b) = open(&server, &p, "node-b");
    let alice = ctx("alice");
    a.add_device(&alice).unwrap();
    a.set_online(&alice, online("node-a", 1)).unwrap();
    a.publish(&alice, vec![link("/light")]).unwrap();
    a.resources_changed(&alice, ConnectionRef(1), vec![change("/light", b"42", 1)])
        .unwrap();
    a.flush().unwrap();

    // B knows the device (its registry mirror) and reads A's twin.
    assert!(b.owns("alice", D));
    let seen = wait_for(Duration::from_secs(5), || {
        b.device("alice", D).filter(|r| r.status.online)
    })
    .expect("B sees the device online");
    assert_eq!(seen.status.service_id, "node-a");
    assert_eq!(
        b.resource("alice", D, "/light").unwrap().content.data,
        b"42"
    );
    assert_eq!(b.links("alice", &[], &[], 0)[0].1.len(), 1);

    // A command accepted by B reaches A's connection; A's answer reaches
    // B's caller.
    let ticket = b
        .submit_command("alice", update("via-b", "/light"))
        .unwrap();
    assert!(!ticket.pending, "A took the command");
    let sent = inbox_a.command(ConnectionRef(1));
    assert_eq!(sent.correlation_id, "via-b");
    a.command_result(&alice, ConnectionRef(1), ok("via-b"));
    assert_eq!(outcome(&ticket), CommandOutcome::Answered(ok("via-b")));

    // B's events include A's, without gap: one log.
    let events = b.events_after("alice", 0, 1000).unwrap();
    assert!(events
        .iter()
        .any(|e| matches!(&e.kind, EventKind::ResourceChanged { href, .. } if href == "/light")));

    // A second sign-in on B closes A's connection (spec §14 item 13).
    b.set_online(&alice, online("node-b", 7)).unwrap();
    let closed = wait_for(Duration::from_secs(5), || {
        lock(&inbox_a.closed)
            .iter()
            .find(|(c, _)| *c == ConnectionRef(1))
            .cloned()
    })
    .expect("A closed the older connection");
    assert!(closed.1.contains("another connection"), "{closed:?}");
    // A's late OFFLINE of the older connection changes nothing.
    a.set_offline(D, ConnectionRef(1));
    a.flush().unwrap();
    let record = b.device("alice", D).unwrap();
    assert!(record.status.online);
    assert_eq!(record.status.service_id, "node-b");
    // B took the twin over with the device.
    assert_eq!(b.latest_etags(D, 1), vec![b"42".to_vec()]);
}

#[test]
fn a_dead_node_has_its_devices_offline_and_its_commands_unavailable() {
    let server = NatsServer::start();
    let p = prefix();
    let (a, inbox_a) = open(&server, &p, "node-a");
    let (b, inbox_b) = open(&server, &p, "node-b");
    let alice = ctx("alice");
    a.add_device(&alice).unwrap();
    a.set_online(&alice, online("node-a", 1)).unwrap();
    a.publish(&alice, vec![link("/light")]).unwrap();
    a.resources_changed(&alice, ConnectionRef(1), vec![change("/light", b"v1", 1)])
        .unwrap();
    a.flush().unwrap();
    // Dispatched to A's connection, never answered.
    let lost = b.submit_command("alice", update("lost", "/light")).unwrap();
    assert!(!lost.pending);
    inbox_a.command(ConnectionRef(1));

    // Node A dies without a word (its heartbeats stop).
    let died = Instant::now();
    drop(a);
    let offline = wait_for(Duration::from_secs(10), || {
        b.device("alice", D).filter(|r| !r.status.online)
    });
    assert!(offline.is_some(), "B marked the device OFFLINE");
    let took = died.elapsed();
    let ttl = Duration::from_secs(2);
    assert!(
        took <= ttl * 2 + Duration::from_secs(1),
        "OFFLINE after {took:?}, TTL {ttl:?}"
    );
    // spec §7.3: it may have reached the device; never sent again.
    match outcome(&lost) {
        CommandOutcome::Answered(r) => assert_eq!(r.status, Status::Unavailable),
        other => panic!("{other:?}"),
    }
    // A command issued meanwhile waits, and is delivered exactly once
    // when the device reconnects to B; its twin is intact.
    let waiting = b
        .submit_command("alice", update("later", "/light"))
        .unwrap();
    assert!(waiting.pending);
    b.set_online(&alice, online("node-b", 5)).unwrap();
    assert_eq!(b.latest_etags(D, 1), vec![b"v1".to_vec()]);
    let taken = b.take_pending_commands(&alice, ConnectionRef(5), now_ns());
    assert_eq!(
        taken
            .iter()
            .map(|c| c.correlation_id.as_str())
            .collect::<Vec<_>>(),
        ["later"]
    );
    b.command_result(&alice, ConnectionRef(5), ok("later"));
    assert_eq!(outcome(&waiting), CommandOutcome::Answered(ok("later")));
    assert!(lock(&inbox_b.delivered).is_empty(), "nothing sent twice");
    let answered = b.stats().answered(Status::Unavailable);
    assert_eq!(answered, 1);
}

#[test]
fn a_broker_restart_loses_no_queued_change() {
    let mut server = NatsServer::start();
    let p = prefix();
    let (hub, inbox) = open(&server, &p, "node-a");
    let alice = ctx("alice");
    hub.add_device(&alice).unwrap();
    hub.set_online(&alice, online("node-a", 1)).unwrap();
    hub.publish(&alice, vec![link("/light")]).unwrap();
    let ticket = hub
        .submit_command("alice", update("inflight", "/light"))
        .unwrap();
    inbox.command(ConnectionRef(1));

    server.stop();
    assert!(
        wait_for(Duration::from_secs(5), || (!hub.available()).then_some(())).is_some(),
        "the hub reports the broker unreachable"
    );
    // The device stays connected: its notifications queue up, and the
    // answer to the command in flight too (items 62–63).
    for i in 0..50u64 {
        let value = format!("v{i}");
        hub.resources_changed(
            &alice,
            ConnectionRef(1),
            vec![change("/light", value.as_bytes(), i + 1)],
        )
        .unwrap();
    }
    hub.command_result(&alice, ConnectionRef(1), ok("inflight"));
    assert!(hub.stats().nats_queue_depth.load(Ordering::Relaxed) > 0);
    // Longer than the request timeout: the publishes fail and are retried.
    sleep(Duration::from_secs(3));

    server.spawn();
    let flushed = wait_for(Duration::from_secs(20), || hub.flush().ok());
    assert!(flushed.is_some(), "the queue drained after the restart");
    assert!(hub.available());
    assert_eq!(outcome(&ticket), CommandOutcome::Answered(ok("inflight")));
    assert_eq!(
        hub.resource("alice", D, "/light").unwrap().content.data,
        b"v49"
    );
    let versions: Vec<u64> = hub
        .events_after("alice", 0, 10_000)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::ResourceChanged { version, .. } => Some(version),
            _ => None,
        })
        .collect();
    assert_eq!(
        versions,
        (0..50).collect::<Vec<_>>(),
        "each change once, in order"
    );
    assert!(hub.stats().nats_retries.load(Ordering::Relaxed) > 0);
    assert_eq!(hub.stats().nats_queue_depth.load(Ordering::Relaxed), 0);
    assert_eq!(hub.stats().answered(Status::Ok), 1);
    let answered = hub
        .events_after("alice", 0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| {
            matches!(&e.kind, EventKind::CommandAnswered { operation, .. } if *operation == Operation::Update)
        })
        .count();
    assert_eq!(answered, 1);
}

#[test]
fn a_full_queue_holds_the_shard_then_refuses_and_drops_nothing_it_took() {
    let mut server = NatsServer::start();
    let p = prefix();
    let mut s = settings(&server, &p, "node-a");
    s.buffer = 8;
    s.request_timeout = Duration::from_millis(500);
    let hub = NatsHub::open(s).expect("the NATS hub opens");
    let alice = ctx("alice");
    hub.add_device(&alice).unwrap();
    hub.set_online(&alice, online("node-a", 1)).unwrap();
    hub.publish(&alice, vec![link("/light")]).unwrap();
    server.stop();
    let mut accepted = 0u64;
    let mut refused = false;
    for i in 0..40u64 {
        let value = format!("v{i}");
        match hub.resources_changed(
            &alice,
            ConnectionRef(1),
            vec![change("/light", value.as_bytes(), i + 1)],
        ) {
            Ok(()) => accepted += 1,
            Err(HubError::Unavailable(_)) => {
                refused = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused, "a full queue refuses after the wait");
    assert!(hub.stats().nats_queue_full.load(Ordering::Relaxed) > 0);
    server.spawn();
    assert!(wait_for(Duration::from_secs(20), || hub.flush().ok()).is_some());
    // Every change the hub took is in the log (the refused one is the
    // device's to resend after its resync, spec §6.7).
    let changes = hub
        .events_after("alice", 0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| matches!(e.kind, EventKind::ResourceChanged { .. }))
        .count() as u64;
    assert!(changes >= accepted, "{changes} < {accepted}");
    assert_eq!(hub.stats().nats_failed.load(Ordering::Relaxed), 0);
}

#[test]
fn open_fails_without_a_broker() {
    let server = NatsServer::start();
    let mut s = settings(&server, &prefix(), "node-a");
    s.servers = vec!["nats://127.0.0.1:1".into()];
    s.request_timeout = Duration::from_millis(300);
    let err = NatsHub::open(s).unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

// -- the token authority's refresh grants and used codes (issue 13) ---------

mod grants {
    use super::*;
    use crate::auth::grants::tests::{contract, redeem, refresh};
    use crate::auth::grants::GrantPolicy;
    use crate::auth::provider::OAuthError;

    const NOW: u64 = 1_800_000_000;
    const POLICY: GrantPolicy = GrantPolicy {
        ttl: 1000,
        reuse_window: 60,
    };
    const D2: &str = "0f4a5ea1-6b6e-4d7b-8e52-1b4c5c2b9a10";

    #[test]
    fn the_nats_store_keeps_the_contract() {
        let server = NatsServer::start();
        let (hub, _) = open(&server, &prefix(), "n1");
        contract(hub.grants());
    }

    #[test]
    fn a_grant_from_one_node_refreshes_on_another_and_a_code_is_used_once() {
        let server = NatsServer::start();
        let p = prefix();
        let (a, _) = open(&server, &p, "a");
        let (b, _) = open(&server, &p, "b");
        let (ga, gb) = (a.grants(), b.grants());
        // Signed up through node a.
        redeem(ga.as_ref(), "code-1", "r0", D, NOW, POLICY.ttl).unwrap();
        // The same code on node b: used already.
        assert!(matches!(
            redeem(gb.as_ref(), "code-1", "other", D, NOW, POLICY.ttl),
            Err(OAuthError::Rejected(_))
        ));
        // Failed over to node b: it refreshes.
        let pair = refresh(gb.as_ref(), "r0", NOW + 1, POLICY, 1).unwrap();
        // The answer was lost; the retry lands on node a: the same pair.
        assert_eq!(
            refresh(ga.as_ref(), "r0", NOW + 2, POLICY, 2).unwrap(),
            pair
        );
        // The successor is used on a; the old token is refused on b.
        refresh(ga.as_ref(), "refresh-1", NOW + 3, POLICY, 3).unwrap();
        assert!(matches!(
            refresh(gb.as_ref(), "r0", NOW + 4, POLICY, 4),
            Err(OAuthError::Rejected(_))
        ));
        // Sign-off on b revokes what a issued.
        redeem(ga.as_ref(), "code-2", "r-d2", D2, NOW, POLICY.ttl).unwrap();
        gb.revoke_device(D2);
        let revoked = wait_for(Duration::from_secs(5), || {
            refresh(ga.as_ref(), "r-d2", NOW + 5, POLICY, 5)
                .is_err()
                .then_some(())
        });
        assert!(revoked.is_some(), "the revoked grant still refreshes");
        // The other device's grant is untouched.
        assert!(refresh(gb.as_ref(), "refresh-3", NOW + 6, POLICY, 6).is_ok());
        // A new hub instance (a restarted node) still knows the grants.
        drop(a);
        let (c, _) = open(&server, &p, "c");
        assert!(refresh(c.grants().as_ref(), "refresh-6", NOW + 7, POLICY, 7).is_ok());
    }

    #[test]
    fn racing_rotations_on_two_nodes_hand_out_one_pair() {
        let server = NatsServer::start();
        let p = prefix();
        let (a, _) = open(&server, &p, "a");
        let (b, _) = open(&server, &p, "b");
        redeem(a.grants().as_ref(), "code-1", "r0", D, NOW, POLICY.ttl).unwrap();
        let (ga, gb) = (a.grants(), b.grants());
        let ta = std::thread::spawn(move || refresh(ga.as_ref(), "r0", NOW + 1, POLICY, 1));
        let tb = std::thread::spawn(move || refresh(gb.as_ref(), "r0", NOW + 1, POLICY, 2));
        let (ra, rb) = (ta.join().unwrap().unwrap(), tb.join().unwrap().unwrap());
        assert_eq!(ra, rb, "both nodes answer with the winner's pair");
    }
}
