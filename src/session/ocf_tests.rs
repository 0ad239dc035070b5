//! The OCF flow on one session with the embedded authority, a virtual
//! clock and no sockets: sign-up → sign-in → publish → discovery →
//! unpublish → sign-out → sign-off, and the token deadline.

#![allow(clippy::disallowed_methods)]

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::*;
use crate::auth::authority::{Authority, AuthoritySettings, SigningKey};
use crate::auth::jwt::AuthorizationMode;
use crate::auth::provider::EmbeddedProvider;
use crate::coap::{deframer, option, Code, MessageWriter};
use crate::hub::Hub;

const D: &str = "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a";
const T0: u64 = 1_800_000_000;

struct Flow {
    session: Session,
    hub: Arc<MemoryHub>,
    provider: Arc<EmbeddedProvider>,
    now: Instant,
    wall: SystemTime,
}

type Sent = (Code, Vec<u8>, Vec<u8>);

use super::twin_tests::{cbor, encode_request};

fn text(payload: &[u8], key: &str) -> Option<String> {
    let mut d = minicbor::Decoder::new(payload);
    let n = d.map().ok()??;
    for _ in 0..n {
        let k = d.str().ok()?;
        if k == key {
            return d.str().ok().map(str::to_owned);
        }
        d.skip().ok()?;
    }
    None
}

fn int(payload: &[u8], key: &str) -> Option<i64> {
    let mut d = minicbor::Decoder::new(payload);
    let n = d.map().ok()??;
    for _ in 0..n {
        let k = d.str().ok()?;
        if k == key {
            return d.i64().ok();
        }
        d.skip().ok()?;
    }
    None
}

impl Flow {
    fn new(ttl: Duration, owner_cache_expiration: Duration) -> Flow {
        let mut settings = AuthoritySettings::new("https://auth.test");
        settings.access_token_ttl = ttl;
        let authority =
            Arc::new(Authority::new(SigningKey::generate().unwrap(), settings).unwrap());
        let validator = TokenValidator::new(
            authority.key_set(),
            authority.validation_settings(AuthorizationMode::DeviceIdClaim),
        )
        .unwrap();
        let provider = Arc::new(EmbeddedProvider::new("plgd", authority));
        let hub = Arc::new(MemoryHub::new());
        let config = SessionConfig {
            owner_cache_expiration,
            hub: hub.clone(),
            validator: Arc::new(SharedValidator::new(validator)),
            providers: vec![provider.clone()],
            ..SessionConfig::default()
        };
        let _ = config
            .discovery_endpoint
            .set("coaps+tcp://127.0.0.1:5684".into());
        let identity = PeerIdentity {
            device_id: Some(D.into()),
            connection: ConnectionRef(9),
            remote: "127.0.0.1:40000".into(),
        };
        let now = Instant::now();
        let mut flow = Flow {
            session: Session::new(Rc::new(config), identity, now, 1),
            hub,
            provider,
            now,
            wall: UNIX_EPOCH + Duration::from_secs(T0),
        };
        assert_eq!(flow.sent()[0].0, Code::CSM);
        flow
    }

    fn code(&self, owner: &str) -> String {
        self.provider
            .authority()
            .issue_code(owner, None, T0)
            .unwrap()
    }

    fn send(
        &mut self,
        code: Code,
        path: &[&str],
        queries: &[&str],
        body: Option<&serde_json::Value>,
    ) {
        let out = encode_request(code, path, queries, body);
        let (msg, _) = deframer::next_message(&out, 1 << 20).unwrap().unwrap();
        self.session.handle_frame(self.now, self.wall, msg);
        while let Some(ex) = self.session.poll_exchange() {
            let provider = self.session.config.providers[ex.provider].clone();
            let result = provider
                .exchange(ex.request, Box::new(|_| {}))
                .expect("the embedded provider answers at once");
            self.session
                .handle_exchange(self.now, self.wall, ex.id, result);
        }
    }

    fn sent(&mut self) -> Vec<Sent> {
        let mut out = Vec::new();
        while self.session.poll_transmit(&mut out) {}
        let mut msgs = Vec::new();
        let mut rest = &out[..];
        while let Some((m, len)) = deframer::next_message(rest, 1 << 20).unwrap() {
            msgs.push((m.code, m.token.to_vec(), m.payload.to_vec()));
            rest = &rest[len..];
        }
        msgs
    }

    /// The one response to our request (token `tk`).
    fn response(&mut self) -> Sent {
        let responses: Vec<Sent> = self.sent().into_iter().filter(|m| m.1 == b"tk").collect();
        assert_eq!(responses.len(), 1, "{responses:?}");
        responses.into_iter().next().unwrap()
    }

    fn sign_up(&mut self, owner: &str) -> (String, String) {
        let code = self.code(owner);
        self.send(
            Code::POST,
            &["oic", "sec", "account"],
            &[],
            Some(&serde_json::json!({"di": D, "authprovider": "plgd", "accesstoken": code})),
        );
        let (c, _, body) = self.response();
        assert_eq!(c, Code::CHANGED, "{}", String::from_utf8_lossy(&body));
        assert_eq!(text(&body, "uid").as_deref(), Some(owner));
        assert_eq!(text(&body, "redirecturi").as_deref(), Some(""));
        (
            text(&body, "accesstoken").unwrap(),
            text(&body, "refreshtoken").unwrap(),
        )
    }

    fn sign_in(&mut self, owner: &str, token: &str) -> Sent {
        self.send(
            Code::POST,
            &["oic", "sec", "session"],
            &[],
            Some(&serde_json::json!({"di": D, "uid": owner, "accesstoken": token, "login": true})),
        );
        self.response()
    }
}

#[test]
fn sign_up_sign_in_publish_discover_unpublish_sign_out_sign_off() {
    let mut f = Flow::new(Duration::from_secs(3600), Duration::from_secs(60));
    let (access, _refresh) = f.sign_up("alice");
    assert!(f.hub.owns("alice", D));

    // Sign-in: 2.04 {expiresin = 3600 − 120}, ONLINE, then our GET /oic/res.
    f.send(
        Code::POST,
        &["oic", "sec", "session"],
        &[],
        Some(&serde_json::json!({"di": D, "uid": "alice", "accesstoken": access, "login": true})),
    );
    let sent = f.sent();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0].0, Code::CHANGED);
    assert_eq!(int(&sent[0].2, "expiresin"), Some(3480));
    assert_eq!(sent[1].0, Code::GET);
    assert!(
        f.session.exchanges.is_none(),
        "a signed-in session keeps no exchange state"
    );
    let status = f.hub.device("alice", D).unwrap().status;
    assert!(status.online);
    assert_eq!(status.connection_id, "127.0.0.1:40000");

    // The device answers our GET with its /oic/d link.
    let mut answer = Vec::new();
    MessageWriter::new(&mut answer, Code::CONTENT, &sent[1].1)
        .option_uint(option::CONTENT_FORMAT, 10000)
        .payload(&cbor(
            &serde_json::json!([{"href": "/oic/d", "eps": [{"ep": "coaps+tcp://10.0.0.1:5684"}]}]),
        ))
        .finish();
    let (msg, _) = deframer::next_message(&answer, 1 << 20).unwrap().unwrap();
    f.session.handle_frame(f.now, f.wall, msg);
    assert_eq!(
        f.hub.device("alice", D).unwrap().status.local_endpoints,
        ["coaps+tcp://10.0.0.1:5684"]
    );

    // Publish, echoed with ins; a foreign di is refused.
    let links = serde_json::json!({"di": D, "ttl": 0, "links": [{"href": "/light/1", "rt": ["core.light"], "p": {"bm": 3}}]});
    f.send(Code::POST, &["oic", "rd"], &[], Some(&links));
    assert_eq!(f.response().0, Code::CHANGED);
    let foreign = serde_json::json!({"di": "00000000-0000-0000-0000-000000000001", "ttl": 0, "links": [{"href": "/x"}]});
    f.send(Code::POST, &["oic", "rd"], &[], Some(&foreign));
    assert_eq!(f.response().0, Code::BAD_REQUEST);

    // Discovery rewrites hrefs.
    f.send(Code::GET, &["oic", "res"], &[], None);
    let (c, _, body) = f.response();
    assert_eq!(c, Code::CONTENT);
    let body = String::from_utf8_lossy(&body).to_string();
    assert!(
        body.contains(&format!("/api/v1/devices/{D}/light/1")),
        "{body}"
    );

    // Unpublish all, twice.
    let q = format!("di={D}");
    f.send(Code::DELETE, &["oic", "rd"], &[&q], None);
    assert_eq!(f.response().0, Code::DELETED);
    f.send(Code::DELETE, &["oic", "rd"], &[&q], None);
    assert_eq!(f.response().0, Code::BAD_REQUEST);

    // Sign-out: 2.04 A0, OFFLINE, and the gate is shut again.
    f.send(
        Code::POST,
        &["oic", "sec", "session"],
        &[],
        Some(&serde_json::json!({"login": false})),
    );
    let (c, _, body) = f.response();
    assert_eq!((c, body.as_slice()), (Code::CHANGED, &[0xa0][..]));
    assert!(!f.hub.device("alice", D).unwrap().status.online);

    // Sign-in again, then sign-off from the session: device gone, still open.
    assert_eq!(f.sign_in("alice", &access).0, Code::CHANGED);
    f.send(Code::DELETE, &["oic", "sec", "account"], &[], None);
    assert_eq!(f.response().0, Code::DELETED);
    assert!(!f.hub.owns("alice", D));
    assert!(f.session.is_closed().is_none());
}

#[test]
fn the_same_code_twice_is_one_exchange() {
    let mut f = Flow::new(Duration::from_secs(3600), Duration::from_secs(60));
    let code = f.code("alice");
    let body = serde_json::json!({"di": D, "authprovider": "plgd", "accesstoken": code});
    f.send(Code::POST, &["oic", "sec", "account"], &[], Some(&body));
    let first = f.response();
    // A second redemption at the provider would fail: the cache answers.
    f.send(Code::POST, &["oic", "sec", "account"], &[], Some(&body));
    let second = f.response();
    assert_eq!(first, second);
    assert_eq!(first.0, Code::CHANGED);
}

#[test]
fn another_owner_cannot_take_a_device() {
    let mut f = Flow::new(Duration::from_secs(3600), Duration::from_secs(60));
    f.sign_up("alice");
    let code = f.code("bob");
    f.send(
        Code::POST,
        &["oic", "sec", "account"],
        &[],
        Some(&serde_json::json!({"di": D, "authprovider": "plgd", "accesstoken": code})),
    );
    assert_eq!(f.response().0, Code::UNAUTHORIZED);
    assert_eq!(
        f.session.is_closed(),
        Some(&CloseReason::SecurityRequestFailed)
    );
    assert!(f.hub.owns("alice", D));
}

#[test]
fn refresh_rotates_and_the_deadline_closes() {
    let mut f = Flow::new(Duration::from_secs(10), Duration::from_secs(1));
    let (access, refresh) = f.sign_up("alice");
    let (c, _, body) = f.sign_in("alice", &access);
    assert_eq!(c, Code::CHANGED);
    assert_eq!(int(&body, "expiresin"), Some(8));
    f.sent();
    f.send(
        Code::POST,
        &["oic", "sec", "tokenrefresh"],
        &[],
        Some(&serde_json::json!({"di": D, "uid": "alice", "refreshtoken": refresh, "authprovider": "plgd"})),
    );
    let (c, _, body) = f.response();
    assert_eq!(c, Code::CHANGED);
    assert_ne!(text(&body, "refreshtoken").unwrap(), refresh);
    assert_eq!(int(&body, "expiresin"), Some(10));
    // The refreshed session ends at the new token's expiry.
    let deadline = f.session.poll_timeout().unwrap();
    f.now += Duration::from_secs(10);
    f.wall += Duration::from_secs(10);
    assert!(deadline <= f.now);
    f.session.handle_timeout(f.now);
    // Keepalive would have pinged first; the deadline closes regardless.
    assert_eq!(f.session.is_closed(), Some(&CloseReason::TokenExpired));
    f.session.transport_closed("closed".into());
    assert!(!f.hub.device("alice", D).unwrap().status.online);
}

#[test]
fn a_token_without_enough_lifetime_is_refused() {
    let mut f = Flow::new(Duration::from_secs(100), Duration::from_secs(60));
    let (access, _) = f.sign_up("alice");
    let (c, _, _) = f.sign_in("alice", &access);
    assert_eq!(c, Code::UNAUTHORIZED);
    assert!(!f.hub.device("alice", D).unwrap().status.online);
}

#[test]
fn uid_must_be_the_owner() {
    let mut f = Flow::new(Duration::from_secs(3600), Duration::from_secs(60));
    let (access, _) = f.sign_up("alice");
    let (c, _, _) = f.sign_in("mallory", &access);
    assert_eq!(c, Code::UNAUTHORIZED);
    assert_eq!(
        f.session.is_closed(),
        Some(&CloseReason::SecurityRequestFailed)
    );
}

#[test]
fn local_endpoints_are_read_from_iotivity_lites_indefinite_length_link_list() {
    // spec §8.1, Appendix A: IoTivity-Lite (tinycbor) answers
    // GET /oic/res?if=oic.if.ll&rt=oic.wk.d with indefinite-length arrays
    // and maps, an anchor, and `lat` next to each `ep`.
    let mut payload = Vec::new();
    let mut e = minicbor::Encoder::new(&mut payload);
    e.begin_array().unwrap().begin_map().unwrap();
    e.str("anchor").unwrap().str(&format!("ocf://{D}")).unwrap();
    e.str("href").unwrap().str("/oic/d").unwrap();
    e.str("rt").unwrap().begin_array().unwrap();
    e.str("oic.wk.d").unwrap().end().unwrap();
    e.str("p").unwrap().begin_map().unwrap();
    e.str("bm").unwrap().u8(1).unwrap().end().unwrap();
    e.str("eps").unwrap().begin_array().unwrap();
    for ep in [
        "coaps://[fe80::1%25eth0]:56789",
        "coaps+tcp://192.168.1.20:40000",
    ] {
        e.begin_map().unwrap();
        e.str("ep").unwrap().str(ep).unwrap();
        e.str("lat").unwrap().u32(240).unwrap();
        e.end().unwrap();
    }
    e.end().unwrap(); // eps
    e.end().unwrap(); // link
    e.end().unwrap(); // links
    assert_eq!(
        super::ocf_handlers::first_link_endpoints(&payload),
        [
            "coaps://[fe80::1%25eth0]:56789",
            "coaps+tcp://192.168.1.20:40000"
        ]
    );
    // The definite-length form, and garbage, as before.
    assert_eq!(
        super::ocf_handlers::first_link_endpoints(&cbor(
            &serde_json::json!([{"href": "/oic/d", "eps": [{"ep": "coap+tcp://10.0.0.1:1"}]}])
        )),
        ["coap+tcp://10.0.0.1:1"]
    );
    assert!(super::ocf_handlers::first_link_endpoints(b"\xff\x00").is_empty());
    assert!(super::ocf_handlers::first_link_endpoints(&[]).is_empty());
}
