//! Ten thousand sans-IO sessions in one thread on a virtual clock against
//! one MemoryHub: each device signs in, has three published resources and
//! a batch-observable `/oic/res`, reaches IN_SYNC (spec §6.5), and answers
//! one hub command, which its issuer learns exactly once (spec §7.3).

// The virtual clock starts at a real instant; the sessions never read it.
#![allow(clippy::disallowed_methods)]

use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coap_gateway::auth::authority::{Authority, AuthoritySettings, SigningKey};
use coap_gateway::auth::jwt::{AuthorizationMode, TokenValidator};
use coap_gateway::auth::validator::SharedValidator;
use coap_gateway::coap::{deframer, option, Code, MessageRef, MessageWriter};
use coap_gateway::hub::{
    AuthContext, Command, CommandKind, CommandOutcome, ConnectionRef, Connections, Hub, HubMessage,
    MemoryHub, Status, StoredLink, TwinState,
};
use coap_gateway::ocf::rd::{instance_id, Policy};
use coap_gateway::session::{PeerIdentity, Session, SessionConfig};

const DEVICES: usize = 10_000;
const OWNER: &str = "fleet-owner";
const T0: u64 = 1_800_000_000;
const RESOURCES: [&str; 3] = ["/light", "/switch", "/oic/d"];

/// The hub's messages to connections, routed by the test's loop.
#[derive(Default)]
struct Mailbox(Mutex<Vec<(ConnectionRef, HubMessage)>>);

impl Connections for Mailbox {
    fn close(&self, _: ConnectionRef, _: &str) {}
    fn deliver(&self, to: ConnectionRef, message: HubMessage) -> Result<(), HubMessage> {
        self.0.lock().unwrap().push((to, message));
        Ok(())
    }
}

fn device_id(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

fn stored_link(device: &str, href: &str) -> StoredLink {
    StoredLink {
        href: href.into(),
        device_id: device.into(),
        instance_id: instance_id(href),
        resource_types: Some(vec!["x.fleet".into()]),
        policy: Some(Policy {
            bit_mask: 3,
            ..Policy::default()
        }),
        ..StoredLink::default()
    }
}

/// The device's `oic.if.ll` answer: a batch-observable `/oic/res` and its
/// three resources (shared by all devices).
fn link_list() -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = minicbor::Encoder::new(&mut out);
    e.array(1 + RESOURCES.len() as u64).unwrap();
    e.map(3).unwrap();
    e.str("href").unwrap().str("/oic/res").unwrap();
    e.str("if").unwrap().array(2).unwrap();
    e.str("oic.if.ll").unwrap().str("oic.if.b").unwrap();
    e.str("p")
        .unwrap()
        .map(1)
        .unwrap()
        .str("bm")
        .unwrap()
        .u8(3)
        .unwrap();
    for href in RESOURCES {
        e.map(2).unwrap();
        e.str("href").unwrap().str(href).unwrap();
        e.str("p")
            .unwrap()
            .map(1)
            .unwrap()
            .str("bm")
            .unwrap()
            .u8(3)
            .unwrap();
    }
    out
}

/// The first batch notification: each resource's representation.
fn batch(i: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = minicbor::Encoder::new(&mut out);
    e.array(RESOURCES.len() as u64).unwrap();
    for (n, href) in RESOURCES.iter().enumerate() {
        e.map(3).unwrap();
        e.str("href").unwrap().str(href).unwrap();
        e.str("etag").unwrap().bytes(&[n as u8 + 1]).unwrap();
        e.str("rep").unwrap().map(1).unwrap();
        e.str("v").unwrap().u64(i as u64).unwrap();
    }
    out
}

struct Device {
    session: Session,
    out: Vec<u8>,
}

impl Device {
    fn feed(&mut self, now: Instant, wall: SystemTime, bytes: &[u8]) {
        let (msg, _) = deframer::next_message(bytes, 1 << 20).unwrap().unwrap();
        self.session.handle_frame(now, wall, msg);
    }

    /// The requests the session sent (code, token, path, queries).
    fn requests(&mut self) -> Vec<(Code, Vec<u8>, String, Vec<String>)> {
        self.out.clear();
        while self.session.poll_transmit(&mut self.out) {}
        let mut rest = &self.out[..];
        let mut found = Vec::new();
        while let Some((m, len)) = deframer::next_message(rest, 1 << 20).unwrap() {
            if m.code.is_request() {
                found.push(describe(&m));
            }
            rest = &rest[len..];
        }
        found
    }
}

fn describe(m: &MessageRef<'_>) -> (Code, Vec<u8>, String, Vec<String>) {
    let path: String = m
        .uri_path()
        .map(|s| format!("/{}", String::from_utf8_lossy(s)))
        .collect();
    let queries = m
        .uri_queries()
        .map(|q| String::from_utf8_lossy(q).into_owned())
        .collect();
    (m.code, m.token.to_vec(), path, queries)
}

fn response(token: &[u8], code: Code, observe: Option<u32>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut w = MessageWriter::new(&mut out, code, token);
        if let Some(o) = observe {
            w.option_uint(option::OBSERVE, o);
        }
        if !payload.is_empty() {
            w.option_uint(option::CONTENT_FORMAT, 10000);
        }
        w.payload(payload);
        w.finish();
    }
    out
}

#[test]
fn ten_thousand_devices_reach_in_sync_and_answer_one_command_each() {
    let started = Instant::now();
    let mut settings = AuthoritySettings::new("https://auth.fleet");
    settings.access_token_ttl = Duration::from_secs(3600);
    let authority = Authority::new(SigningKey::generate().unwrap(), settings).unwrap();
    // One owner token for the fleet: the device comes from each
    // connection's certificate (valid-token mode, spec §4.3).
    let validator = TokenValidator::new(
        authority.key_set(),
        authority.validation_settings(AuthorizationMode::ValidToken),
    )
    .unwrap();
    let token = authority.issue_access_token(OWNER, None, T0).unwrap().token;
    let hub = Arc::new(MemoryHub::new());
    let mailbox = Arc::new(Mailbox::default());
    hub.set_connections(mailbox.clone());
    let config = Rc::new(SessionConfig {
        hub: hub.clone(),
        validator: Arc::new(SharedValidator::new(validator)),
        certificate_device_id: true,
        ..SessionConfig::default()
    });
    let now = Instant::now();
    let wall = UNIX_EPOCH + Duration::from_secs(T0);
    let links = link_list();

    let mut devices: Vec<Device> = (0..DEVICES)
        .map(|i| {
            let id = device_id(i);
            let ctx = AuthContext {
                owner: OWNER.into(),
                device_id: id.clone(),
                ..AuthContext::default()
            };
            hub.add_device(&ctx).unwrap();
            hub.publish(
                &ctx,
                RESOURCES.iter().map(|h| stored_link(&id, h)).collect(),
            )
            .unwrap();
            let identity = PeerIdentity {
                device_id: Some(id.into()),
                connection: ConnectionRef(i as u128 + 1),
                remote: format!("10.0.{}.{}:5684", i / 256, i % 256).into(),
            };
            let mut d = Device {
                session: Session::new(config.clone(), identity, now, i as u64 + 1),
                out: Vec::new(),
            };
            d.requests();
            d
        })
        .collect();

    // Sign in, answer the local-endpoints GET, the link list and the batch
    // observation, all on one thread.
    let sign_in = |i: usize| {
        let mut body = Vec::new();
        let mut e = minicbor::Encoder::new(&mut body);
        e.map(4).unwrap();
        e.str("di").unwrap().str(&device_id(i)).unwrap();
        e.str("uid").unwrap().str(OWNER).unwrap();
        e.str("accesstoken").unwrap().str(&token).unwrap();
        e.str("login").unwrap().bool(true).unwrap();
        let mut out = Vec::new();
        MessageWriter::new(&mut out, Code::POST, b"si")
            .option_str(option::URI_PATH, "oic")
            .option_str(option::URI_PATH, "sec")
            .option_str(option::URI_PATH, "session")
            .option_uint(option::CONTENT_FORMAT, 10000)
            .payload(&body)
            .finish();
        out
    };
    for (i, d) in devices.iter_mut().enumerate() {
        d.feed(now, wall, &sign_in(i));
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps <= 8, "device {i} needs too many steps");
            let requests = d.requests();
            let Some((code, token, path, queries)) = requests.into_iter().next() else {
                break;
            };
            assert_eq!((code, path.as_str()), (Code::GET, "/oic/res"));
            let answer = match queries.first().map(String::as_str) {
                Some("if=oic.if.ll") if queries.len() == 2 => {
                    response(&token, Code::CONTENT, None, &[0x80])
                }
                Some("if=oic.if.ll") => response(&token, Code::CONTENT, None, &links),
                Some("if=oic.if.b") => response(&token, Code::CONTENT, Some(1), &batch(i)),
                other => panic!("unexpected query {other:?}"),
            };
            d.feed(now, wall, &answer);
        }
        assert_eq!(d.session.twin_in_sync(), Some(true), "device {i}");
    }
    let signed_in = started.elapsed();

    // Every twin is IN_SYNC with its three resources.
    for i in (0..DEVICES).step_by(97).chain([DEVICES - 1]) {
        let record = hub.device(OWNER, &device_id(i)).unwrap();
        assert!(record.status.online);
        assert_eq!(record.twin.state, TwinState::InSync, "device {i}");
        assert_eq!(hub.resources(OWNER, &device_id(i)).unwrap().len(), 3);
    }

    // One retrieve per device, answered by the device.
    let tickets: Vec<_> = (0..DEVICES)
        .map(|i| {
            hub.submit_command(
                OWNER,
                Command {
                    correlation_id: format!("cmd-{i}"),
                    device_id: device_id(i),
                    href: "/light".into(),
                    kind: CommandKind::Retrieve { etags: vec![] },
                    interface: None,
                    valid_until_ns: 0,
                    issued_at_ns: 0,
                },
            )
            .unwrap()
        })
        .collect();
    let delivered = std::mem::take(&mut *mailbox.0.lock().unwrap());
    assert_eq!(delivered.len(), DEVICES);
    for (to, message) in delivered {
        let i = usize::try_from(to.0 - 1).unwrap();
        let d = &mut devices[i];
        d.session.handle_hub_message(now, wall, message);
        let requests = d.requests();
        assert_eq!(requests.len(), 1, "device {i}");
        let (code, token, path, _) = &requests[0];
        assert_eq!((*code, path.as_str()), (Code::GET, "/light"));
        d.feed(now, wall, &response(token, Code::CONTENT, None, &[0xa0]));
    }
    let mut answered = 0;
    for ticket in &tickets {
        match ticket.outcome.try_recv() {
            Ok(CommandOutcome::Answered(r)) if r.status == Status::Ok => answered += 1,
            other => panic!("{}: {other:?}", ticket.correlation_id),
        }
        assert!(ticket.outcome.try_recv().is_err(), "answered exactly once");
    }
    assert_eq!(answered, DEVICES);

    // Closing every connection leaves nothing pending and every device
    // OFFLINE; no outcome arrives twice.
    for d in &mut devices {
        d.session.transport_closed("test over".into());
    }
    assert_eq!(hub.pending_depth(), 0);
    assert!(tickets.iter().all(|t| t.outcome.try_recv().is_err()));
    assert!(!hub.device(OWNER, &device_id(0)).unwrap().status.online);
    eprintln!(
        "{DEVICES} devices in sync after {signed_in:?}, all done after {:?}",
        started.elapsed()
    );
}
