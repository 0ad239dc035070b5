//! Twin synchronisation (spec §6) on one session against a real
//! [`MemoryHub`], driven with frames and a virtual clock: batch and
//! per-resource modes, the empty-rep and 2.03 rules, 4.04 unpublishing,
//! reconciliation, require-batch-observe and twin disable/enable.

#![allow(clippy::disallowed_methods)]

use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::twin::Mode;
use super::*;
use crate::auth::authority::{Authority, AuthoritySettings, SigningKey};
use crate::auth::jwt::AuthorizationMode;
use crate::coap::{deframer, option, Code, MessageWriter};
use crate::hub::{Connections, Hub, StoredLink, TwinState};
use crate::ocf::rd::{instance_id, Policy};

pub(super) const D: &str = "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a";
pub(super) const OWNER: &str = "alice";
const T0: u64 = 1_800_000_000;
pub(super) const CONN: ConnectionRef = ConnectionRef(9);

/// The hub's side of the connections: what it delivered and closed.
#[derive(Default)]
pub(super) struct Inbox {
    pub(super) delivered: Mutex<Vec<HubMessage>>,
}

impl Connections for Inbox {
    fn close(&self, _: ConnectionRef, _: &str) {}
    fn deliver(&self, _: ConnectionRef, message: HubMessage) -> Result<(), HubMessage> {
        self.delivered.lock().unwrap().push(message);
        Ok(())
    }
}

/// A message the session sent the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Sent {
    pub(super) code: Code,
    pub(super) token: Vec<u8>,
    pub(super) payload: Vec<u8>,
    pub(super) options: Vec<(u16, Vec<u8>)>,
}

impl Sent {
    pub(super) fn path(&self) -> String {
        let mut out = String::new();
        for (_, v) in self.options.iter().filter(|o| o.0 == option::URI_PATH) {
            out.push('/');
            out.push_str(std::str::from_utf8(v).unwrap());
        }
        out
    }

    pub(super) fn queries(&self) -> Vec<String> {
        self.values(option::URI_QUERY)
            .into_iter()
            .map(|v| String::from_utf8(v).unwrap())
            .collect()
    }

    pub(super) fn values(&self, number: u16) -> Vec<Vec<u8>> {
        self.options
            .iter()
            .filter(|o| o.0 == number)
            .map(|o| o.1.clone())
            .collect()
    }

    pub(super) fn observe(&self) -> Option<u32> {
        self.values(option::OBSERVE)
            .first()
            .map(|v| option::decode_uint(v).unwrap())
    }
}

pub(super) struct Dev {
    pub(super) session: Session,
    pub(super) hub: Arc<MemoryHub>,
    pub(super) inbox: Arc<Inbox>,
    pub(super) now: Instant,
    pub(super) wall: SystemTime,
    access: String,
}

pub(super) fn ctx() -> AuthContext {
    AuthContext {
        owner: OWNER.into(),
        device_id: D.into(),
        ..AuthContext::default()
    }
}

pub(super) fn link(href: &str, rt: &str, bm: u8) -> StoredLink {
    StoredLink {
        href: href.into(),
        device_id: D.into(),
        instance_id: instance_id(href),
        resource_types: Some(vec![rt.into()]),
        interfaces: Some(vec!["oic.if.baseline".into()]),
        policy: Some(Policy {
            bit_mask: bm,
            ..Policy::default()
        }),
        ..StoredLink::default()
    }
}

/// A CBOR value from JSON (test data).
pub(super) fn cbor(value: &serde_json::Value) -> Vec<u8> {
    fn enc(e: &mut minicbor::Encoder<&mut Vec<u8>>, v: &serde_json::Value) {
        use serde_json::Value::*;
        match v {
            Null => {
                e.null().unwrap();
            }
            Bool(b) => {
                e.bool(*b).unwrap();
            }
            Number(n) => {
                e.i64(n.as_i64().unwrap()).unwrap();
            }
            String(s) => {
                e.str(s).unwrap();
            }
            Array(a) => {
                e.array(a.len() as u64).unwrap();
                a.iter().for_each(|v| enc(e, v));
            }
            Object(m) => {
                e.map(m.len() as u64).unwrap();
                for (k, v) in m {
                    e.str(k).unwrap();
                    enc(e, v);
                }
            }
        }
    }
    let mut out = Vec::new();
    enc(&mut minicbor::Encoder::new(&mut out), value);
    out
}

/// A device request with token `tk`: Uri-Path segments, Uri-Query
/// options and a CBOR body (Content-Format 10000).
pub(super) fn encode_request(
    code: Code,
    path: &[&str],
    queries: &[&str],
    body: Option<&serde_json::Value>,
) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut w = MessageWriter::new(&mut out, code, b"tk");
        for segment in path {
            w.option_str(option::URI_PATH, segment);
        }
        if body.is_some() {
            w.option_uint(option::CONTENT_FORMAT, 10000);
        }
        for q in queries {
            w.option_str(option::URI_QUERY, q);
        }
        if let Some(body) = body {
            w.payload(&cbor(body));
        }
        w.finish();
    }
    out
}

/// One batch element (spec §6.5 step 4) with a raw `rep`.
pub(super) struct Element<'a> {
    pub(super) href: &'a str,
    pub(super) etag: Option<&'a [u8]>,
    pub(super) rep: Vec<u8>,
}

pub(super) fn batch(elements: &[Element<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = minicbor::Encoder::new(&mut out);
    e.array(elements.len() as u64).unwrap();
    for el in elements {
        e.map(if el.etag.is_some() { 3 } else { 2 }).unwrap();
        e.str("href").unwrap().str(el.href).unwrap();
        if let Some(tag) = el.etag {
            e.str("etag").unwrap().bytes(tag).unwrap();
        }
        e.str("rep").unwrap();
        e.writer_mut().extend_from_slice(&el.rep);
    }
    out
}

/// The device's `oic.if.ll` answer: `/oic/res` (batch observable or not)
/// and these hrefs.
pub(super) fn link_list(batch_observable: bool, hrefs: &[&str]) -> Vec<u8> {
    let mut links = vec![serde_json::json!({
        "href": "/oic/res",
        "rt": ["oic.wk.res"],
        "if": if batch_observable { serde_json::json!(["oic.if.ll", "oic.if.b", "oic.if.baseline"]) } else { serde_json::json!(["oic.if.ll", "oic.if.baseline"]) },
        "p": {"bm": if batch_observable { 3 } else { 1 }},
    })];
    for href in hrefs {
        links.push(serde_json::json!({"href": href, "rt": ["x.test"], "if": ["oic.if.rw"], "p": {"bm": 3}}));
    }
    cbor(&serde_json::Value::Array(links))
}

impl Dev {
    /// A registered device with `links` published in the hub, connected
    /// but not signed in.
    pub(super) fn new(require_batch_observe: bool, links: Vec<StoredLink>) -> Dev {
        let authority = Arc::new(
            Authority::new(
                SigningKey::generate().unwrap(),
                AuthoritySettings::new("https://auth.test"),
            )
            .unwrap(),
        );
        let validator = TokenValidator::new(
            authority.key_set(),
            authority.validation_settings(AuthorizationMode::DeviceIdClaim),
        )
        .unwrap();
        let hub = Arc::new(MemoryHub::new());
        let inbox = Arc::new(Inbox::default());
        hub.set_connections(inbox.clone());
        hub.add_device(&ctx()).unwrap();
        if !links.is_empty() {
            hub.publish(&ctx(), links).unwrap();
        }
        let access = authority
            .issue_access_token(OWNER, Some(D), T0)
            .unwrap()
            .token;
        let config = SessionConfig {
            keepalive_timeout: Duration::from_secs(20),
            hub: hub.clone(),
            validator: Arc::new(SharedValidator::new(validator)),
            require_batch_observe,
            ..SessionConfig::default()
        };
        let identity = PeerIdentity {
            device_id: Some(D.into()),
            connection: CONN,
            remote: "127.0.0.1:40000".into(),
        };
        let now = Instant::now();
        let mut dev = Dev {
            session: Session::new(Rc::new(config), identity, now, 1),
            hub,
            inbox,
            now,
            wall: UNIX_EPOCH + Duration::from_secs(T0),
            access,
        };
        assert_eq!(dev.sent()[0].code, Code::CSM);
        dev
    }

    pub(super) fn feed(&mut self, bytes: &[u8]) {
        let (msg, _) = deframer::next_message(bytes, 1 << 20).unwrap().unwrap();
        self.session.handle_frame(self.now, self.wall, msg);
    }

    pub(super) fn request(
        &mut self,
        code: Code,
        path: &[&str],
        queries: &[&str],
        body: Option<&serde_json::Value>,
    ) {
        self.feed(&encode_request(code, path, queries, body));
    }

    /// Everything the session queued for the device.
    pub(super) fn sent(&mut self) -> Vec<Sent> {
        let mut out = Vec::new();
        while self.session.poll_transmit(&mut out) {}
        let mut msgs = Vec::new();
        let mut rest = &out[..];
        while let Some((m, len)) = deframer::next_message(rest, 1 << 20).unwrap() {
            msgs.push(Sent {
                code: m.code,
                token: m.token.to_vec(),
                payload: m.payload.to_vec(),
                options: m.options().map(|o| (o.number, o.value.to_vec())).collect(),
            });
            rest = &rest[len..];
        }
        msgs
    }

    /// The one request the session sent since the last look.
    pub(super) fn one_request(&mut self) -> Sent {
        let sent = self.sent();
        assert_eq!(sent.len(), 1, "{sent:?}");
        sent.into_iter().next().unwrap()
    }

    /// The device answers `to` (or notifies on its token).
    pub(super) fn answer(
        &mut self,
        to: &Sent,
        code: Code,
        observe: Option<u32>,
        format: Option<u32>,
        payload: &[u8],
    ) {
        self.answer_with(to, code, None, observe, format, payload);
    }

    pub(super) fn answer_with(
        &mut self,
        to: &Sent,
        code: Code,
        etag: Option<&[u8]>,
        observe: Option<u32>,
        format: Option<u32>,
        payload: &[u8],
    ) {
        let mut out = Vec::new();
        {
            let mut w = MessageWriter::new(&mut out, code, &to.token);
            if let Some(tag) = etag {
                w.option(option::ETAG, tag);
            }
            if let Some(o) = observe {
                w.option_uint(option::OBSERVE, o);
            }
            if let Some(f) = format {
                w.option_uint(option::CONTENT_FORMAT, f);
            }
            w.payload(payload);
            w.finish();
        }
        self.feed(&out);
    }

    /// Signs in; returns what the session sent besides the 2.04 (its
    /// first request to the device).
    pub(super) fn sign_in(&mut self) -> Sent {
        let access = self.access.clone();
        self.request(
            Code::POST,
            &["oic", "sec", "session"],
            &[],
            Some(&serde_json::json!({"di": D, "uid": OWNER, "accesstoken": access, "login": true})),
        );
        let sent = self.sent();
        assert_eq!(sent[0].code, Code::CHANGED, "{sent:?}");
        assert_eq!(sent.len(), 2, "{sent:?}");
        sent[1].clone()
    }

    /// Signs in and answers the local-endpoints GET: returns the twin's
    /// discovery GET (spec §6.3).
    pub(super) fn sign_in_to_discovery(&mut self) -> Sent {
        let local = self.sign_in();
        assert_eq!(local.path(), "/oic/res");
        assert_eq!(local.queries(), ["if=oic.if.ll", "rt=oic.wk.d"]);
        self.answer(&local, Code::CONTENT, None, Some(10000), &cbor(&serde_json::json!([{"href": "/oic/d", "eps": [{"ep": "coap+tcp://10.0.0.1:5683"}]}])));
        self.one_request()
    }

    /// Signs in and answers the twin's link-list GET (spec §6.3) with
    /// these links, `/oic/res` batch observable or not.
    pub(super) fn sign_in_with_links(&mut self, batch: bool, hrefs: &[&str]) {
        let discover = self.sign_in_to_discovery();
        self.answer(
            &discover,
            Code::CONTENT,
            None,
            Some(10000),
            &link_list(batch, hrefs),
        );
    }

    pub(super) fn twin_state(&self) -> TwinState {
        self.hub.device(OWNER, D).unwrap().twin.state
    }

    pub(super) fn twin(&self) -> Vec<crate::hub::ResourceState> {
        self.hub.resources(OWNER, D).unwrap()
    }

    pub(super) fn published(&self) -> Vec<String> {
        self.hub
            .links(OWNER, &[D], &[], T0)
            .into_iter()
            .flat_map(|(_, l)| l)
            .map(|l| l.href)
            .collect()
    }

    pub(super) fn advance(&mut self, by: Duration) {
        self.now += by;
        self.wall += by;
        if self.session.poll_timeout().is_some_and(|t| t <= self.now) {
            self.session.handle_timeout(self.now);
        }
    }
}

fn rep(value: serde_json::Value) -> Vec<u8> {
    cbor(&value)
}

#[test]
fn batch_mode_syncs_the_twin_syncing_then_in_sync() {
    // checklist 46, 49, 52 (first part) and spec §6.5 steps 2–9.
    let mut dev = Dev::new(false, vec![link("/light", "core.light", 3)]);
    let discover = dev.sign_in_to_discovery();
    assert_eq!(discover.code, Code::GET);
    assert_eq!(discover.path(), "/oic/res");
    assert_eq!(discover.queries(), ["if=oic.if.ll"]);
    assert_eq!(discover.observe(), None);
    assert_eq!(dev.twin_state(), TwinState::OutOfSync);

    dev.answer(
        &discover,
        Code::CONTENT,
        None,
        Some(10000),
        &link_list(true, &["/light", "/oic/d"]),
    );
    assert_eq!(dev.twin_state(), TwinState::Syncing);
    assert_eq!(dev.session.twin.as_ref().unwrap().mode(), Some(Mode::Batch));
    let observe = dev.one_request();
    assert_eq!(observe.code, Code::GET);
    assert_eq!(observe.path(), "/oic/res");
    assert_eq!(observe.queries(), ["if=oic.if.b"]);
    assert_eq!(observe.observe(), Some(0));
    assert_eq!(observe.token.len(), 8);
    assert!(
        observe.values(option::ETAG).is_empty(),
        "a fresh twin has no ETags"
    );

    let payload = batch(&[
        Element {
            href: &format!("ocf://{D}/light"),
            etag: Some(b"\x01"),
            rep: rep(serde_json::json!({"state": true, "rt": ["core.light"]})),
        },
        Element {
            href: "/oic/d",
            etag: Some(b"\x02"),
            rep: rep(serde_json::json!({"n": "dev"})),
        },
        // spec §6.5 step 6: dropped for /oic/sec/, NOT_FOUND otherwise.
        Element {
            href: "/oic/sec/acl2",
            etag: None,
            rep: vec![0xbf, 0xff],
        },
        Element {
            href: "/gone",
            etag: None,
            rep: vec![0xbf, 0xff],
        },
    ]);
    dev.answer_with(
        &observe,
        Code::CONTENT,
        Some(b"\x01"),
        Some(1),
        Some(10000),
        &payload,
    );
    assert_eq!(dev.twin_state(), TwinState::InSync);
    let twin = dev.twin();
    let hrefs: Vec<&str> = twin.iter().map(|r| r.href.as_str()).collect();
    assert_eq!(hrefs, ["/gone", "/light", "/oic/d"]);
    let light = &twin[1];
    assert_eq!(
        light.content.data,
        rep(serde_json::json!({"state": true, "rt": ["core.light"]}))
    );
    assert_eq!(light.content.content_format, 10000);
    assert_eq!(light.status, Status::Ok);
    assert_eq!(light.etag.as_deref(), Some(&b"\x01"[..]));
    assert_eq!(light.resource_types, ["core.light"]);
    let gone = &twin[0];
    assert_eq!(gone.status, Status::NotFound);
    assert_eq!(gone.content, Content::none());
    // spec §6.5 step 7: the element the notification's ETag names went
    // last, so it is the device's latest ETag.
    assert_eq!(dev.hub.latest_etags(D, 8)[0], b"\x01");

    // A later notification updates the twin.
    dev.answer(
        &observe,
        Code::CONTENT,
        Some(2),
        Some(10000),
        &batch(&[Element {
            href: "/light",
            etag: Some(b"\x03"),
            rep: rep(serde_json::json!({"state": false})),
        }]),
    );
    let twin = dev.twin();
    assert_eq!(
        twin[1].content.data,
        rep(serde_json::json!({"state": false}))
    );
    assert_eq!(twin[1].version, 1);
    assert!(dev.sent().is_empty());
    assert!(dev.session.is_closed().is_none());
}

#[test]
fn a_2_03_batch_answer_without_payload_is_not_forwarded_but_completes_sync() {
    // checklist 52; spec §6.5 step 2: the hub's ETags go with the request.
    let mut dev = Dev::new(false, vec![link("/light", "core.light", 3)]);
    // The twin has values from an earlier connection.
    dev.hub
        .set_online(
            &ctx(),
            crate::hub::Online {
                connection: ConnectionRef(1),
                connected_at_ns: 1,
                protocol: Protocol::CoapsTcp,
                service_id: "s".into(),
                connection_id: "c".into(),
            },
        )
        .unwrap();
    let change = |href: &str, tag: &[u8]| crate::hub::ResourceChange {
        href: href.into(),
        content: Content {
            data: vec![0xa0],
            content_format: 10000,
        },
        status: Status::Ok,
        etag: Some(tag.to_vec()),
        resource_types: vec![],
        sequence: 1,
    };
    dev.hub
        .resources_changed(&ctx(), ConnectionRef(1), vec![change("/a", b"\xaa")])
        .unwrap();
    dev.hub
        .resources_changed(&ctx(), ConnectionRef(1), vec![change("/b", b"\xbb")])
        .unwrap();
    dev.hub.set_offline(D, ConnectionRef(1));
    let events = dev.hub.subscribe(OWNER);

    dev.sign_in_with_links(true, &["/light"]);
    let observe = dev.one_request();
    let etags = observe.values(option::ETAG);
    assert_eq!(etags.len(), 1);
    let queries = observe.queries();
    assert_eq!(queries.len(), 2, "{queries:?}");
    assert_eq!(queries[0], "if=oic.if.b");
    assert!(queries[1].starts_with("incChanges="));
    let mut all = vec![etags[0].clone()];
    use base64::Engine;
    all.push(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(queries[1].trim_start_matches("incChanges="))
            .unwrap(),
    );
    all.sort();
    assert_eq!(all, [b"\xaa".to_vec(), b"\xbb".to_vec()]);

    dev.answer(&observe, Code::VALID, Some(1), None, &[]);
    assert_eq!(dev.twin_state(), TwinState::InSync);
    let changed = events
        .try_iter()
        .filter(|e| matches!(e.kind, crate::hub::EventKind::ResourceChanged { .. }))
        .count();
    assert_eq!(changed, 0, "nothing was forwarded");
}

#[test]
fn a_batch_notification_in_another_format_closes() {
    let mut dev = Dev::new(false, vec![]);
    dev.sign_in_with_links(true, &[]);
    let observe = dev.one_request();
    dev.answer(&observe, Code::CONTENT, Some(1), Some(50), b"[]");
    assert!(matches!(
        dev.session.is_closed(),
        Some(CloseReason::TwinSyncFailed(_))
    ));
    // A first answer without Observe also fails the batch observation.
    let mut dev = Dev::new(false, vec![]);
    dev.sign_in_with_links(true, &[]);
    let observe = dev.one_request();
    dev.answer(&observe, Code::CONTENT, None, Some(10000), &batch(&[]));
    assert!(matches!(
        dev.session.is_closed(),
        Some(CloseReason::TwinSyncFailed(_))
    ));
}

#[test]
fn an_unavailable_link_list_tries_batch_and_removes_nothing() {
    // spec §6.3 last bullet, §6.4 "unless the answer was empty".
    let mut dev = Dev::new(false, vec![link("/light", "core.light", 3)]);
    let discover = dev.sign_in_to_discovery();
    dev.answer(&discover, Code::NOT_FOUND, None, None, &[]);
    assert_eq!(dev.published(), ["/light"]);
    let observe = dev.one_request();
    assert_eq!(observe.queries(), ["if=oic.if.b"]);
    assert_eq!(observe.observe(), Some(0));
}

#[test]
fn links_the_device_no_longer_has_are_unpublished_at_sign_in() {
    // checklist 51, spec §6.4.
    let mut dev = Dev::new(
        false,
        vec![link("/light", "core.light", 3), link("/old", "x.old", 3)],
    );
    dev.sign_in_with_links(true, &["/light"]);
    assert_eq!(dev.published(), ["/light"]);
}

#[test]
fn require_batch_observe_closes_a_device_without_batch_observable_res() {
    // checklist 47.
    let mut dev = Dev::new(true, vec![link("/light", "core.light", 3)]);
    dev.sign_in_with_links(false, &["/light"]);
    assert!(matches!(
        dev.session.is_closed(),
        Some(CloseReason::TwinSyncFailed(_))
    ));
    assert!(dev.sent().is_empty());
    dev.session.transport_closed("closed".into());
    assert!(!dev.hub.device(OWNER, D).unwrap().status.online);
}

#[test]
fn per_resource_mode_observes_observable_links_and_reads_the_others() {
    // checklist 48, spec §6.6.
    let mut dev = Dev::new(
        false,
        vec![
            link("/light", "core.light", 3),
            link("/plain", "x.plain", 1),
            link("/plgd/s", "x.status", 3),
        ],
    );
    dev.sign_in_with_links(false, &["/light", "/plain", "/plgd/s"]);
    assert_eq!(dev.twin_state(), TwinState::Syncing);
    assert_eq!(
        dev.session.twin.as_ref().unwrap().mode(),
        Some(Mode::PerResource)
    );
    // One request at a time (spec §2.6), in link order; /plgd/s skipped.
    let light = dev.one_request();
    assert_eq!((light.code, light.path().as_str()), (Code::GET, "/light"));
    assert_eq!(light.observe(), Some(0));
    assert!(light.queries().is_empty());
    dev.answer(
        &light,
        Code::CONTENT,
        Some(1),
        Some(10000),
        &rep(serde_json::json!({"on": true})),
    );
    assert_eq!(dev.twin_state(), TwinState::Syncing);
    let plain = dev.one_request();
    assert_eq!(plain.path(), "/plain");
    assert_eq!(plain.observe(), None);
    dev.answer(
        &plain,
        Code::CONTENT,
        None,
        Some(10000),
        &rep(serde_json::json!({"v": 1})),
    );
    assert_eq!(dev.twin_state(), TwinState::InSync);
    assert!(dev.sent().is_empty(), "nothing for /plgd/s");
    let twin = dev.twin();
    assert_eq!(twin.len(), 2);
    assert_eq!(twin[0].href, "/light");
    assert_eq!(twin[0].resource_types, ["core.light"], "from the link");

    // A notification; then a 4.04 unpublishes and cancels (checklist 50).
    dev.answer(
        &light,
        Code::CONTENT,
        Some(2),
        Some(10000),
        &rep(serde_json::json!({"on": false})),
    );
    assert_eq!(
        dev.twin()[0].content.data,
        rep(serde_json::json!({"on": false}))
    );
    dev.answer(&light, Code::NOT_FOUND, Some(3), None, &[]);
    assert_eq!(dev.published(), ["/plain", "/plgd/s"]);
    assert_eq!(dev.twin()[0].status, Status::NotFound);
    let cancel = dev.one_request();
    assert_eq!(cancel.token, light.token, "same token");
    assert_eq!(cancel.path(), "/light");
    assert_eq!(cancel.observe(), Some(1));

    // Publishing during the session observes the new link (spec §6.8).
    dev.answer(&cancel, Code::CONTENT, None, None, &[]);
    dev.request(
        Code::POST,
        &["oic", "rd"],
        &[],
        Some(&serde_json::json!({"di": D, "ttl": 0, "links": [{"href": "/new", "rt": ["x.new"], "p": {"bm": 3}}]})),
    );
    let sent = dev.sent();
    assert_eq!(sent[0].code, Code::CHANGED);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(
        (sent[1].path().as_str(), sent[1].observe()),
        ("/new", Some(0))
    );
    dev.answer(
        &sent[1],
        Code::CONTENT,
        Some(1),
        Some(10000),
        &rep(serde_json::json!({})),
    );
    // The device's DELETE /oic/rd cancels it again.
    let q = format!("di={D}");
    let ins = format!("ins={}", instance_id("/new"));
    dev.request(Code::DELETE, &["oic", "rd"], &[&q, &ins], None);
    let sent = dev.sent();
    assert_eq!(sent[0].code, Code::DELETED);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(
        (sent[1].path().as_str(), sent[1].observe()),
        ("/new", Some(1))
    );
}

#[test]
fn a_2_03_without_payload_is_not_forwarded_in_per_resource_mode() {
    let mut dev = Dev::new(false, vec![link("/light", "core.light", 3)]);
    dev.sign_in_with_links(false, &["/light"]);
    let light = dev.one_request();
    dev.answer(&light, Code::VALID, Some(1), None, &[]);
    assert_eq!(dev.twin_state(), TwinState::InSync);
    assert!(dev.twin().is_empty());
}

#[test]
fn a_refused_per_resource_observation_closes() {
    let mut dev = Dev::new(false, vec![link("/light", "core.light", 3)]);
    dev.sign_in_with_links(false, &["/light"]);
    let light = dev.one_request();
    dev.answer(&light, Code::UNAUTHORIZED, None, None, &[]);
    assert!(matches!(
        dev.session.is_closed(),
        Some(CloseReason::TwinSyncFailed(_))
    ));
}

#[test]
fn a_twin_request_without_answer_closes_after_the_keepalive_timeout() {
    let mut dev = Dev::new(false, vec![]);
    dev.sign_in_with_links(true, &[]);
    let _observe = dev.one_request();
    // The device keeps the connection alive but never answers.
    for _ in 0..4 {
        dev.advance(Duration::from_secs(5));
        for ping in dev.sent().into_iter().filter(|m| m.code == Code::PING) {
            let mut pong = Vec::new();
            MessageWriter::new(&mut pong, Code::PONG, &ping.token).finish();
            dev.feed(&pong);
        }
    }
    assert!(matches!(
        dev.session.is_closed(),
        Some(CloseReason::TwinSyncFailed(_))
    ));
}

#[test]
fn disabling_the_twin_cancels_observations_and_enabling_recreates_them() {
    // checklist 60, spec §7.5.
    let mut dev = Dev::new(false, vec![link("/light", "core.light", 3)]);
    dev.sign_in_with_links(true, &["/light"]);
    let observe = dev.one_request();
    dev.answer(&observe, Code::CONTENT, Some(1), Some(10000), &batch(&[]));
    assert_eq!(dev.twin_state(), TwinState::InSync);

    dev.hub.set_twin_enabled(OWNER, D, false, false).unwrap();
    let message = dev.inbox.delivered.lock().unwrap().pop().unwrap();
    assert_eq!(
        message,
        HubMessage::Twin {
            enabled: false,
            force: false
        }
    );
    dev.session.handle_hub_message(dev.now, dev.wall, message);
    let cancel = dev.one_request();
    assert_eq!(cancel.token, observe.token);
    assert_eq!(cancel.observe(), Some(1));
    assert_eq!(cancel.path(), "/oic/res");
    assert_eq!(dev.twin_state(), TwinState::Disabled);
    assert!(dev.session.twin.is_none());
    dev.answer(&cancel, Code::CONTENT, None, Some(10000), &batch(&[]));
    // Notifications on the cancelled token are dropped.
    dev.answer(
        &observe,
        Code::CONTENT,
        Some(5),
        Some(10000),
        &batch(&[Element {
            href: "/light",
            etag: None,
            rep: rep(serde_json::json!({"x": 1})),
        }]),
    );
    assert!(dev.twin().is_empty());

    dev.hub.set_twin_enabled(OWNER, D, true, false).unwrap();
    let message = dev.inbox.delivered.lock().unwrap().pop().unwrap();
    dev.session.handle_hub_message(dev.now, dev.wall, message);
    let discover = dev.one_request();
    assert_eq!(discover.queries(), ["if=oic.if.ll"]);
    dev.answer(
        &discover,
        Code::CONTENT,
        None,
        Some(10000),
        &link_list(true, &["/light"]),
    );
    let again = dev.one_request();
    assert_eq!(again.observe(), Some(0));
    assert_ne!(again.token, observe.token);
}

#[test]
fn a_twin_disabled_in_the_hub_is_not_synchronised() {
    // spec §6.2: no observation at all, nothing read.
    let mut dev = Dev::new(false, vec![link("/light", "core.light", 3)]);
    dev.hub.set_twin_enabled(OWNER, D, false, false).unwrap();
    let local = dev.sign_in();
    dev.answer(
        &local,
        Code::CONTENT,
        None,
        Some(10000),
        &cbor(&serde_json::json!([])),
    );
    assert!(dev.sent().is_empty());
    assert_eq!(dev.twin_state(), TwinState::Disabled);
}

#[test]
fn sign_out_cancels_observations_on_the_wire() {
    // spec §6.10.
    let mut dev = Dev::new(false, vec![link("/light", "core.light", 3)]);
    dev.sign_in_with_links(false, &["/light"]);
    let light = dev.one_request();
    dev.answer(
        &light,
        Code::CONTENT,
        Some(1),
        Some(10000),
        &rep(serde_json::json!({})),
    );
    dev.request(
        Code::POST,
        &["oic", "sec", "session"],
        &[],
        Some(&serde_json::json!({"login": false})),
    );
    let sent = dev.sent();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(sent
        .iter()
        .any(|m| m.code == Code::CHANGED && m.token == b"tk"));
    let cancel = sent.iter().find(|m| m.code == Code::GET).unwrap();
    assert_eq!(
        (cancel.token.clone(), cancel.observe()),
        (light.token, Some(1))
    );
    assert_eq!(cancel.path(), "/light");
}

#[test]
fn a_forced_resync_rebuilds_the_observation_without_etags() {
    // spec §7.5: force rebuilds; spec §6.5 step 2: no ETags when forced.
    let mut dev = Dev::new(false, vec![link("/light", "core.light", 3)]);
    dev.sign_in_with_links(true, &["/light"]);
    let observe = dev.one_request();
    let payload = batch(&[Element {
        href: "/light",
        etag: Some(b"\x07"),
        rep: rep(serde_json::json!({"on": true})),
    }]);
    dev.answer(&observe, Code::CONTENT, Some(1), Some(10000), &payload);
    assert_eq!(dev.hub.latest_etags(D, 8), [b"\x07".to_vec()]);

    dev.hub.set_twin_enabled(OWNER, D, true, true).unwrap();
    let message = dev.inbox.delivered.lock().unwrap().pop().unwrap();
    assert_eq!(
        message,
        HubMessage::Twin {
            enabled: true,
            force: true
        }
    );
    dev.session.handle_hub_message(dev.now, dev.wall, message);
    let cancel = dev.one_request();
    assert_eq!(
        (cancel.token.clone(), cancel.observe()),
        (observe.token.clone(), Some(1))
    );
    dev.answer(&cancel, Code::CONTENT, None, None, &[]);
    let discover = dev.one_request();
    assert_eq!(discover.queries(), ["if=oic.if.ll"]);
    dev.answer(
        &discover,
        Code::CONTENT,
        None,
        Some(10000),
        &link_list(true, &["/light"]),
    );
    let again = dev.one_request();
    assert_eq!(again.observe(), Some(0));
    assert!(again.values(option::ETAG).is_empty());
    assert_eq!(again.queries(), ["if=oic.if.b"]);
    dev.answer(&again, Code::CONTENT, Some(1), Some(10000), &payload);
    assert_eq!(dev.twin_state(), TwinState::InSync);
}

#[test]
fn a_hub_that_refuses_notifications_closes_the_connection() {
    // spec §6.7: the hub is out of sync; the device reconnects.
    let mut dev = Dev::new(false, vec![]);
    dev.sign_in_with_links(true, &[]);
    let observe = dev.one_request();
    // Another connection of the device went ONLINE meanwhile: the hub
    // refuses this one's changes.
    dev.hub
        .set_online(
            &ctx(),
            crate::hub::Online {
                connection: ConnectionRef(77),
                connected_at_ns: 2,
                protocol: Protocol::CoapsTcp,
                service_id: "s".into(),
                connection_id: "other".into(),
            },
        )
        .unwrap();
    let payload = batch(&[Element {
        href: "/light",
        etag: None,
        rep: rep(serde_json::json!({"on": true})),
    }]);
    dev.answer(&observe, Code::CONTENT, Some(1), Some(10000), &payload);
    assert!(matches!(
        dev.session.is_closed(),
        Some(CloseReason::TwinSyncFailed(_))
    ));
}
