//! The OCF Device-to-Cloud side of the integration tests (spec §5): CBOR
//! bodies written and read as `serde_json` values, a scripted device that
//! serves the gateway's own requests (spec §8.1 local endpoints, §6 twin
//! set-up) while it waits for its answers, the sign-up / sign-in flows
//! against the embedded token authority, and tokens built claim by claim
//! for the negative cases of spec §4.1.
//!
//! What it does not do: decide what the gateway should answer. The tests
//! say that, next to the spec section they check.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use coap_gateway::auth::ClientAuth;
use coap_gateway::coap::{option, signal, Code, MessageWriter};
use coap_gateway::config::Config;
use coap_gateway::hub::{AuthContext, ConnectionStatus, DeviceRecord};
use minicbor::data::Type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde_json::{json, Map, Value};

use super::{Msg, TestDevice, TestGateway, TestPki, DEVICE_ID};

/// The owner (token `sub`) of [`DEVICE_ID`] in these tests.
pub const OWNER: &str = "alice";
/// Another user of the same hub.
pub const OTHER_OWNER: &str = "mallory";
/// A device that is not the one in the test certificate.
pub const OTHER_DEVICE: &str = "6a3d1c4e-0f8b-4c2a-b1d7-5e9f2a6c8b30";
/// The embedded authority's `authprovider` name (`authority.provider_name`).
pub const PROVIDER: &str = "plgd";
/// The claim the embedded authority puts the device ID in (spec §4.2).
pub const DEVICE_ID_CLAIM: &str = "https://plgd.dev/deviceId";
/// What the scripted device lists as `/oic/d`'s `eps` (spec §8.1).
pub const LOCAL_ENDPOINT: &str = "coaps+tcp://127.0.0.1:1234";
/// `application/vnd.ocf+cbor` (spec §5.0).
pub const OCF_CBOR: u32 = 10000;
/// How long a test waits for something the gateway does on its own.
pub const PATIENCE: Duration = Duration::from_secs(3);
/// The read timeout of a device between its own waits.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Time.

/// Unix seconds now (the gateway's clock is this process's clock).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Unix nanoseconds now.
pub fn now_unix_ns() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    d.as_secs() * 1_000_000_000 + u64::from(d.subsec_nanos())
}

/// Polls `probe` every 20 ms until it gives a value; panics naming `what`
/// after `limit`. For state the gateway changes on its own (the hub).
pub fn wait_until<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// CBOR as JSON values (spec §5.0: bodies are CBOR maps).

/// A JSON value as CBOR: integers as CBOR integers, strings as text.
pub fn cbor(value: &Value) -> Vec<u8> {
    let mut e = minicbor::Encoder::new(Vec::new());
    encode_value(&mut e, value);
    e.into_writer()
}

/// Writing into a Vec cannot fail (its error type is Infallible).
fn ok<T>(r: Result<T, minicbor::encode::Error<std::convert::Infallible>>) {
    r.map(|_| ()).expect("CBOR into a Vec")
}

fn encode_value(e: &mut minicbor::Encoder<Vec<u8>>, value: &Value) {
    match value {
        Value::Null => ok(e.null()),
        Value::Bool(b) => ok(e.bool(*b)),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                ok(e.u64(u))
            } else if let Some(i) = n.as_i64() {
                ok(e.i64(i))
            } else {
                ok(e.f64(n.as_f64().expect("finite number")))
            }
        }
        Value::String(s) => ok(e.str(s)),
        Value::Array(items) => {
            ok(e.array(items.len() as u64));
            for item in items {
                encode_value(e, item);
            }
        }
        Value::Object(map) => {
            ok(e.map(map.len() as u64));
            for (k, v) in map {
                ok(e.str(k));
                encode_value(e, v);
            }
        }
    }
}

/// A batch notification body (spec §6.5 step 4) whose `rep`s are given as
/// raw CBOR, e.g. IoTivity-Lite's 2-byte empty map `bf ff` (step 6).
pub fn raw_batch(elements: &[(&str, &[u8])]) -> Vec<u8> {
    let mut e = minicbor::Encoder::new(Vec::new());
    ok(e.array(elements.len() as u64));
    for (href, rep) in elements {
        ok(e.map(2));
        ok(e.str("href"));
        ok(e.str(&format!("ocf://{DEVICE_ID}{href}")));
        ok(e.str("rep"));
        e.writer_mut().extend_from_slice(rep);
    }
    e.into_writer()
}

/// CBOR as a JSON value (byte strings become `{"$bytes": "<hex>"}`, tags
/// are dropped, non-text map keys are written as text). Panics, showing
/// the bytes, on anything that is not one whole CBOR item.
pub fn from_cbor(bytes: &[u8]) -> Value {
    let mut d = minicbor::Decoder::new(bytes);
    let value = decode_value(&mut d).unwrap_or_else(|e| panic!("not CBOR ({e}): {}", hex(bytes)));
    assert_eq!(
        d.position(),
        bytes.len(),
        "trailing bytes after the CBOR item: {}",
        hex(bytes)
    );
    value
}

fn decode_value(d: &mut minicbor::Decoder<'_>) -> Result<Value, minicbor::decode::Error> {
    Ok(match d.datatype()? {
        Type::Bool => json!(d.bool()?),
        Type::Null | Type::Undefined | Type::Simple => {
            d.skip()?;
            Value::Null
        }
        Type::U8
        | Type::U16
        | Type::U32
        | Type::U64
        | Type::I8
        | Type::I16
        | Type::I32
        | Type::I64
        | Type::Int => {
            let i = i128::from(d.int()?);
            match (i64::try_from(i), u64::try_from(i)) {
                (Ok(v), _) => json!(v),
                (_, Ok(v)) => json!(v),
                _ => json!(i.to_string()),
            }
        }
        // Half floats need minicbor's `half` feature; no OCF body has one.
        Type::F16 => {
            d.skip()?;
            Value::Null
        }
        Type::F32 => json!(d.f32()?),
        Type::F64 => json!(d.f64()?),
        Type::Bytes | Type::BytesIndef => {
            let mut all = Vec::new();
            for chunk in d.bytes_iter()? {
                all.extend_from_slice(chunk?);
            }
            json!({ "$bytes": hex(&all) })
        }
        Type::String | Type::StringIndef => {
            let mut all = String::new();
            for chunk in d.str_iter()? {
                all.push_str(chunk?);
            }
            json!(all)
        }
        Type::Array | Type::ArrayIndef => {
            let len = d.array()?;
            let mut items = Vec::new();
            while more(d, len, items.len())? {
                items.push(decode_value(d)?);
            }
            Value::Array(items)
        }
        Type::Map | Type::MapIndef => {
            let len = d.map()?;
            let mut map = Map::new();
            let mut n = 0;
            while more(d, len, n)? {
                let key = match decode_value(d)? {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                map.insert(key, decode_value(d)?);
                n += 1;
            }
            Value::Object(map)
        }
        Type::Tag => {
            d.tag()?;
            decode_value(d)?
        }
        Type::Break | Type::Unknown(_) => {
            return Err(minicbor::decode::Error::message("unexpected CBOR item"))
        }
    })
}

/// Whether a definite (`len`) or indefinite container has another item;
/// consumes the Break of an indefinite one.
fn more(
    d: &mut minicbor::Decoder<'_>,
    len: Option<u64>,
    seen: usize,
) -> Result<bool, minicbor::decode::Error> {
    match len {
        Some(n) => Ok((seen as u64) < n),
        None => {
            if d.datatype()? == Type::Break {
                d.set_position(d.position() + 1);
                Ok(false)
            } else {
                Ok(true)
            }
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Messages.

/// A request from the device, built field by field.
#[derive(Debug, Clone)]
pub struct Request {
    pub code: Code,
    /// `/`-separated, e.g. `/oic/sec/account`.
    pub path: String,
    /// Each element is one Uri-Query option.
    pub queries: Vec<String>,
    pub content_format: Option<u32>,
    pub accept: Option<u32>,
    pub observe: Option<u32>,
    pub payload: Vec<u8>,
}

impl Request {
    pub fn new(code: Code, path: &str) -> Request {
        Request {
            code,
            path: path.to_owned(),
            queries: Vec::new(),
            content_format: None,
            accept: None,
            observe: None,
            payload: Vec::new(),
        }
    }

    pub fn get(path: &str) -> Request {
        Request::new(Code::GET, path)
    }

    pub fn delete(path: &str) -> Request {
        Request::new(Code::DELETE, path)
    }

    /// A POST with a CBOR body and Content-Format 10000, as IoTivity-Lite
    /// sends them (spec Appendix A).
    pub fn post(path: &str, body: &Value) -> Request {
        Request::new(Code::POST, path)
            .content_format(OCF_CBOR)
            .payload(cbor(body))
    }

    /// Adds one Uri-Query option.
    pub fn query(mut self, q: &str) -> Request {
        self.queries.push(q.to_owned());
        self
    }

    pub fn accept(mut self, format: u32) -> Request {
        self.accept = Some(format);
        self
    }

    pub fn content_format(mut self, format: u32) -> Request {
        self.content_format = Some(format);
        self
    }

    pub fn observe(mut self, value: u32) -> Request {
        self.observe = Some(value);
        self
    }

    pub fn payload(mut self, bytes: Vec<u8>) -> Request {
        self.payload = bytes;
        self
    }

    pub fn encode(&self, token: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut w = MessageWriter::new(&mut out, self.code, token);
            // Option numbers ascending (RFC 7252 §3.1).
            if let Some(o) = self.observe {
                w.option_uint(option::OBSERVE, o);
            }
            for segment in self.path.split('/').filter(|s| !s.is_empty()) {
                w.option_str(option::URI_PATH, segment);
            }
            if let Some(cf) = self.content_format {
                w.option_uint(option::CONTENT_FORMAT, cf);
            }
            for q in &self.queries {
                w.option_str(option::URI_QUERY, q);
            }
            if let Some(a) = self.accept {
                w.option_uint(option::ACCEPT, a);
            }
            w.payload(&self.payload);
            w.finish();
        }
        out
    }
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.path)?;
        if !self.queries.is_empty() {
            write!(f, "?{}", self.queries.join("&"))?;
        }
        Ok(())
    }
}

/// Every value of option `number`.
pub fn options(m: &Msg, number: u16) -> Vec<&[u8]> {
    m.options
        .iter()
        .filter(|(n, _)| *n == number)
        .map(|(_, v)| v.as_slice())
        .collect()
}

/// A uint option (RFC 7252 §3.2), if present.
pub fn option_uint(m: &Msg, number: u16) -> Option<u32> {
    options(m, number)
        .first()
        .map(|v| v.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
}

/// `/a/b` from the Uri-Path options.
pub fn uri_path(m: &Msg) -> String {
    let segments: Vec<String> = options(m, option::URI_PATH)
        .iter()
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    format!("/{}", segments.join("/"))
}

/// The Uri-Query options, as text.
pub fn uri_queries(m: &Msg) -> Vec<String> {
    options(m, option::URI_QUERY)
        .iter()
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The diagnostic payload of an error response (spec §5.0: UTF-8 text).
pub fn text(m: &Msg) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

/// The CBOR body of a response, as JSON.
pub fn body(m: &Msg) -> Value {
    assert!(!m.payload.is_empty(), "{} without payload: {m:?}", m.code);
    from_cbor(&m.payload)
}

/// Asserts an error response: `code`, a diagnostic containing `needle`
/// (case-sensitive, spec texts), and no Content-Format (spec §5.0).
pub fn assert_error(m: &Msg, code: Code, needle: &str) {
    assert_eq!(m.code, code, "diagnostic {:?}", text(m));
    assert!(
        text(m).contains(needle),
        "{code} diagnostic {:?} lacks {needle:?}",
        text(m)
    );
    assert_eq!(
        option_uint(m, option::CONTENT_FORMAT),
        None,
        "spec §5.0: error responses carry no Content-Format"
    );
}

// ---------------------------------------------------------------------------
// The scripted device.

/// A device on a real TLS connection with the OCF identity certificate of
/// [`DEVICE_ID`]. While it waits for an answer it serves whatever the
/// gateway asks (spec §5.4: the local-endpoints GET comes while sign-in is
/// unanswered) and answers Pings.
pub struct OcfDevice {
    pub dev: TestDevice,
    /// The gateway's requests to this device, in arrival order; each was
    /// answered.
    pub requests: Vec<Msg>,
    /// Responses to tokens this device never used and signals other than
    /// CSM, Ping and Pong (Release, Abort).
    pub unexpected: Vec<Msg>,
    /// The device's resource links (what `GET /oic/res?if=oic.if.ll`
    /// answers, filtered by `rt=`).
    pub links: Vec<Value>,
    /// The device's resources and their representations (beyond `/oic/d`),
    /// by href; each also has a link in [`links`](Self::links).
    pub resources: BTreeMap<String, Value>,
    /// The gateway's observations of this device: href (`/oic/res` for the
    /// batch observation) → token.
    pub observers: BTreeMap<String, Vec<u8>>,
    /// Decides the answer to a gateway request before the default device
    /// behaviour does.
    pub hook: Option<DeviceHook>,
    next_token: u32,
    observe_seq: u32,
}

/// Decides the answer to a gateway request ([`OcfDevice::hook`]).
pub type DeviceHook = Box<dyn FnMut(&Msg) -> Hook + Send>;

/// What [`OcfDevice::hook`] makes of a gateway request.
pub enum Hook {
    /// The device's default behaviour.
    Default,
    /// This answer instead (Content-Format 10000 when there is a body).
    Reply { code: Code, body: Option<Vec<u8>> },
    /// No answer at all (the request is still recorded).
    Silent,
}

/// `/oic/d` and a batch-observable `/oic/res`, as IoTivity-Lite lists them.
pub fn default_links() -> Vec<Value> {
    vec![
        json!({
            "href": "/oic/d",
            "rt": ["oic.wk.d"],
            "if": ["oic.if.r", "oic.if.baseline"],
            "p": {"bm": 3},
            "anchor": format!("ocf://{DEVICE_ID}"),
            "eps": [{"ep": LOCAL_ENDPOINT}],
        }),
        json!({
            "href": "/oic/res",
            "rt": ["oic.wk.res"],
            "if": ["oic.if.ll", "oic.if.b", "oic.if.baseline"],
            "p": {"bm": 3},
            "anchor": format!("ocf://{DEVICE_ID}"),
            "eps": [{"ep": LOCAL_ENDPOINT}],
        }),
    ]
}

impl OcfDevice {
    /// Connects with the device certificate and reads the gateway's CSM.
    pub fn connect(gw: &TestGateway, pki: &TestPki) -> OcfDevice {
        OcfDevice::connect_with(gw, pki.client_config(Some("device")))
    }

    pub fn connect_with(gw: &TestGateway, tls: Arc<rustls::ClientConfig>) -> OcfDevice {
        OcfDevice::connect_to(gw.addr, tls)
    }

    /// Connects to a gateway at `addr` (e.g. a `coap-gateway serve`
    /// process).
    pub fn connect_to(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> OcfDevice {
        let dev = TestDevice::connect_tls(addr, tls).expect("TLS handshake");
        let mut device = OcfDevice {
            dev,
            requests: Vec::new(),
            unexpected: Vec::new(),
            links: default_links(),
            resources: BTreeMap::new(),
            observers: BTreeMap::new(),
            hook: None,
            next_token: 0,
            observe_seq: 2,
        };
        let csm = device.dev.recv().expect("CSM");
        assert_eq!(csm.code, Code::CSM, "first message: {csm:?}");
        device
    }

    /// This end of the TCP connection: the gateway's connection ID for
    /// this device is its `ip:port` (spec §8.3).
    pub fn local_addr(&self) -> SocketAddr {
        self.dev.io.tcp().local_addr().expect("local addr")
    }

    fn fresh_token(&mut self) -> Vec<u8> {
        self.next_token += 1;
        let mut token = vec![0xd0];
        token.extend_from_slice(&self.next_token.to_be_bytes());
        token
    }

    /// Sends `req` and returns the response on its token, serving the
    /// gateway meanwhile. Panics when the connection ends first.
    pub fn request(&mut self, req: &Request) -> Msg {
        let token = self.fresh_token();
        self.dev
            .send(&req.encode(&token))
            .unwrap_or_else(|e| panic!("cannot send {req}: {e}"));
        self.dev.set_read_timeout(READ_TIMEOUT);
        loop {
            match self.dev.recv() {
                Ok(m) => {
                    if let Some(response) = self.serve(m) {
                        if response.token == token {
                            return response;
                        }
                        self.unexpected.push(response);
                    }
                }
                Err(e) => panic!(
                    "no answer to {req}: {e}; gateway requests so far {:?}, unexpected {:?}",
                    self.requests, self.unexpected
                ),
            }
        }
    }

    /// Sends raw bytes (hand-made frames).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.dev.send(bytes).expect("send");
    }

    /// Handles one message: the gateway's requests and Pings are answered
    /// and consumed (`None`); responses come back to the caller.
    fn serve(&mut self, m: Msg) -> Option<Msg> {
        if m.code.is_request() {
            self.answer(&m);
            self.requests.push(m);
            return None;
        }
        match m.code {
            Code::PING => {
                let mut pong = Vec::new();
                signal::write_pong(&mut pong, &m.token, false);
                // A failed send shows up as the next read's error.
                let _ = self.dev.send(&pong);
                None
            }
            Code::CSM | Code::PONG => None,
            c if c.is_response() => Some(m),
            _ => {
                self.unexpected.push(m);
                None
            }
        }
    }

    /// The device side of spec §6 / §7 / §8.1: `/oic/res` link lists
    /// (`rt=` filtered), the batch representation for `if=oic.if.b`,
    /// `/oic/d` and [`resources`](Self::resources) (GET, observe, POST
    /// merging a map into the representation and notifying observers, POST
    /// `if=oic.if.create`, DELETE), 4.04 for anything else.
    fn answer(&mut self, req: &Msg) {
        if let Some(hook) = self.hook.as_mut() {
            match hook(req) {
                Hook::Default => {}
                Hook::Silent => return,
                Hook::Reply { code, body } => {
                    self.reply(req, code, None, body.as_deref());
                    return;
                }
            }
        }
        let path = uri_path(req);
        let queries = uri_queries(req);
        let observe = option_uint(req, option::OBSERVE);
        let batch = queries.iter().any(|q| q == "if=oic.if.b");
        let mut changed = None;
        let (code, body) = match (req.code, path.as_str()) {
            (Code::GET, "/oic/res") if batch => {
                let key = "/oic/res".to_owned();
                let seq = self.observe_registration(&key, req, observe);
                let all = self.batch_elements(None);
                self.reply(req, Code::CONTENT, seq, Some(&cbor(&all)));
                return;
            }
            (Code::GET, "/oic/res") => {
                let wanted: Vec<&str> = queries
                    .iter()
                    .filter_map(|q| q.strip_prefix("rt="))
                    .collect();
                let links: Vec<Value> = self
                    .links
                    .iter()
                    .filter(|l| {
                        wanted.is_empty()
                            || l["rt"].as_array().is_some_and(|rts| {
                                rts.iter()
                                    .any(|rt| wanted.contains(&rt.as_str().unwrap_or("")))
                            })
                    })
                    .cloned()
                    .collect();
                (Code::CONTENT, Some(Value::Array(links)))
            }
            (Code::GET, "/oic/d") => {
                let seq = self.observe_registration("/oic/d", req, observe);
                let d = json!({"di": DEVICE_ID, "n": "test device"});
                self.reply(req, Code::CONTENT, seq, Some(&cbor(&d)));
                return;
            }
            (Code::GET, href) if self.resources.contains_key(href) => {
                let href = href.to_owned();
                let seq = self.observe_registration(&href, req, observe);
                let value = self.resources[&href].clone();
                self.reply(req, Code::CONTENT, seq, Some(&cbor(&value)));
                return;
            }
            (Code::POST, href) if queries.iter().any(|q| q == "if=oic.if.create") => {
                let created = from_cbor(&req.payload);
                self.add_resource(
                    &format!("{}/new", href.trim_end_matches('/')),
                    "x.new",
                    created.clone(),
                    true,
                );
                (Code::CREATED, Some(created))
            }
            (Code::POST, href) if self.resources.contains_key(href) => {
                let update = from_cbor(&req.payload);
                let value = self.resources.get_mut(href).expect("checked above");
                if let (Some(v), Some(u)) = (value.as_object_mut(), update.as_object()) {
                    for (k, x) in u {
                        v.insert(k.clone(), x.clone());
                    }
                }
                changed = Some(href.to_owned());
                (Code::CHANGED, Some(value.clone()))
            }
            (Code::DELETE, href) if self.resources.contains_key(href) => {
                self.resources.remove(href);
                (Code::DELETED, None)
            }
            _ => (Code::NOT_FOUND, None),
        };
        let body = body.map(|b| cbor(&b));
        self.reply(req, code, None, body.as_deref());
        if let Some(href) = changed {
            self.notify(&href);
        }
    }

    /// Observe=0 registers `key`'s observation (answered with an Observe
    /// sequence when `key` is observable), Observe=1 cancels it.
    fn observe_registration(&mut self, key: &str, req: &Msg, observe: Option<u32>) -> Option<u32> {
        match observe {
            Some(0) if self.observable(key) => {
                self.observers.insert(key.to_owned(), req.token.clone());
                self.observe_seq += 1;
                Some(self.observe_seq)
            }
            Some(1) => {
                self.observers.remove(key);
                None
            }
            _ => None,
        }
    }

    /// Is `href` observable by its link's `p.bm` (and, for `/oic/res`,
    /// batch observable: `if` lists `oic.if.b`)?
    pub fn observable(&self, href: &str) -> bool {
        self.links.iter().any(|l| {
            l["href"] == href
                && l["p"]["bm"].as_u64().is_some_and(|bm| bm & 2 != 0)
                && (href != "/oic/res"
                    || l["if"]
                        .as_array()
                        .is_some_and(|ifs| ifs.iter().any(|i| i == "oic.if.b")))
        })
    }

    /// The batch representation (spec §6.5 step 4): `/oic/d` and every
    /// resource, or only `only`.
    fn batch_elements(&self, only: Option<&str>) -> Value {
        let mut elements = Vec::new();
        if only.is_none() {
            elements.push(json!({
                "href": format!("ocf://{DEVICE_ID}/oic/d"),
                "rep": {"di": DEVICE_ID, "n": "test device"},
            }));
        }
        for (href, rep) in &self.resources {
            if only.is_none_or(|o| o == href) {
                elements.push(json!({"href": format!("ocf://{DEVICE_ID}{href}"), "rep": rep}));
            }
        }
        Value::Array(elements)
    }

    fn reply(&mut self, req: &Msg, code: Code, observe: Option<u32>, body: Option<&[u8]>) {
        let mut out = Vec::new();
        {
            let mut w = MessageWriter::new(&mut out, code, &req.token);
            if let Some(seq) = observe {
                w.option_uint(option::OBSERVE, seq);
            }
            if let Some(body) = body {
                w.option_uint(option::CONTENT_FORMAT, OCF_CBOR);
                w.payload(body);
            }
            w.finish();
        }
        // A failed send shows up as the next read's error.
        let _ = self.dev.send(&out);
    }

    /// Adds a resource with its link (`p.bm` 3 when observable, else 1).
    pub fn add_resource(&mut self, href: &str, rt: &str, value: Value, observable: bool) {
        self.links.push(json!({
            "href": href,
            "rt": [rt],
            "if": ["oic.if.rw", "oic.if.baseline"],
            "p": {"bm": if observable { 3 } else { 1 }},
            "anchor": format!("ocf://{DEVICE_ID}"),
            "eps": [{"ep": LOCAL_ENDPOINT}],
        }));
        self.resources.insert(href.to_owned(), value);
    }

    /// Makes `/oic/res` batch observable or not (IoTivity-Lite's
    /// `OC_DISCOVERY_RESOURCE_OBSERVABLE`, spec §6.6).
    pub fn set_batch_observable(&mut self, yes: bool) {
        for l in &mut self.links {
            if l["href"] == "/oic/res" {
                l["p"]["bm"] = json!(if yes { 3 } else { 1 });
                l["if"] = if yes {
                    json!(["oic.if.ll", "oic.if.b", "oic.if.baseline"])
                } else {
                    json!(["oic.if.ll", "oic.if.baseline"])
                };
            }
        }
    }

    /// The links to publish (spec §5.7) for the resources: a publish body.
    pub fn publish_body(&self, hrefs: &[&str]) -> Value {
        let links: Vec<Value> = self
            .links
            .iter()
            .filter(|l| hrefs.iter().any(|h| l["href"] == *h))
            .cloned()
            .collect();
        json!({"di": DEVICE_ID, "links": links, "ttl": 0})
    }

    /// Changes a resource and notifies its observers (per-resource and
    /// batch).
    pub fn set_value(&mut self, href: &str, value: Value) {
        self.resources.insert(href.to_owned(), value);
        self.notify(href);
    }

    /// Sends `href`'s current representation to its observers.
    pub fn notify(&mut self, href: &str) {
        if let Some(token) = self.observers.get(href).cloned() {
            let value = self.resources.get(href).cloned().unwrap_or(Value::Null);
            self.send_notification(&token, Code::CONTENT, Some(&cbor(&value)));
        }
        if let Some(token) = self.observers.get("/oic/res").cloned() {
            let batch = self.batch_elements(Some(href));
            self.send_notification(&token, Code::CONTENT, Some(&cbor(&batch)));
        }
    }

    /// A notification on `token` with the next Observe sequence.
    pub fn send_notification(&mut self, token: &[u8], code: Code, body: Option<&[u8]>) {
        self.observe_seq += 1;
        let mut out = Vec::new();
        {
            let mut w = MessageWriter::new(&mut out, code, token);
            w.option_uint(option::OBSERVE, self.observe_seq);
            if let Some(body) = body {
                w.option_uint(option::CONTENT_FORMAT, OCF_CBOR);
                w.payload(body);
            }
            w.finish();
        }
        self.dev.send(&out).expect("send a notification");
    }

    /// Serves the gateway until it has been silent for `quiet`: lets the
    /// asynchronous work after sign-in (spec §5.4, §6) finish. Panics if
    /// the connection closes.
    pub fn settle(&mut self, quiet: Duration) {
        self.dev.set_read_timeout(quiet);
        loop {
            match self.dev.recv() {
                Ok(m) => {
                    if let Some(r) = self.serve(m) {
                        self.unexpected.push(r);
                    }
                }
                Err(e) if is_timeout(&e) => break,
                Err(e) => panic!("connection ended while settling: {e}"),
            }
        }
        self.dev.set_read_timeout(READ_TIMEOUT);
    }

    /// The first gateway request (already seen or arriving within
    /// `limit`) that `pred` accepts.
    pub fn wait_for_request(&mut self, limit: Duration, pred: impl Fn(&Msg) -> bool) -> Msg {
        let deadline = Instant::now() + limit;
        let mut checked = 0;
        loop {
            if let Some(m) = self.requests[checked..].iter().find(|m| pred(m)) {
                return m.clone();
            }
            checked = self.requests.len();
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no such gateway request within {limit:?}; got {:?}",
                self.requests
            );
            self.dev.set_read_timeout(left);
            match self.dev.recv() {
                Ok(m) => {
                    if let Some(r) = self.serve(m) {
                        self.unexpected.push(r);
                    }
                }
                Err(e) if is_timeout(&e) => {}
                Err(e) => panic!("connection ended while waiting for a gateway request: {e}"),
            }
        }
    }

    /// Serves the gateway until it closes the connection; panics if it is
    /// still open after `limit`. Returns how long the close took.
    pub fn expect_closed(&mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let left = limit.saturating_sub(started.elapsed());
            assert!(
                !left.is_zero(),
                "connection still open after {limit:?} (gateway requests {:?}, unexpected {:?})",
                self.requests,
                self.unexpected
            );
            self.dev.set_read_timeout(left);
            match self.dev.recv() {
                Ok(m) => {
                    if let Some(r) = self.serve(m) {
                        self.unexpected.push(r);
                    }
                }
                Err(e) if is_timeout(&e) => {}
                Err(_) => return started.elapsed(),
            }
        }
    }

    /// A round trip that needs no sign-in (`GET /x.plgd.dev/time`, spec
    /// §5.10): proves the connection is still served.
    pub fn assert_open(&mut self) {
        let m = self.request(&Request::get("/x.plgd.dev/time"));
        assert_eq!(m.code, Code::CONTENT, "time: {m:?}");
    }

    // -- flows ------------------------------------------------------------

    /// `POST /oic/sec/account` with `body`.
    pub fn sign_up_with(&mut self, body: &Value) -> Msg {
        self.request(&Request::post("/oic/sec/account", body))
    }

    /// Sign-up with a fresh code of `owner` (spec §5.2); asserts 2.04.
    pub fn sign_up(&mut self, gw: &TestGateway, owner: &str) -> Registration {
        let code = auth_code(gw, owner);
        let m = self.sign_up_with(&sign_up_body(&code));
        assert_eq!(m.code, Code::CHANGED, "sign-up: {:?}", text(&m));
        Registration::from_sign_up(&m)
    }

    /// `POST /oic/sec/session` with `body`.
    pub fn session(&mut self, body: &Value) -> Msg {
        self.request(&Request::post("/oic/sec/session", body))
    }

    /// Sign-in (spec §5.4) as IoTivity-Lite sends it.
    pub fn sign_in(&mut self, uid: &str, token: &str) -> Msg {
        self.session(&json!({"di": DEVICE_ID, "uid": uid, "accesstoken": token, "login": true}))
    }

    /// Sign-in that must succeed; returns `expiresin`.
    pub fn sign_in_ok(&mut self, uid: &str, token: &str) -> i64 {
        let m = self.sign_in(uid, token);
        assert_eq!(m.code, Code::CHANGED, "sign-in: {:?}", text(&m));
        let b = body(&m);
        b["expiresin"]
            .as_i64()
            .unwrap_or_else(|| panic!("sign-in body without integer expiresin: {b}"))
    }

    /// `POST /oic/sec/tokenrefresh` (spec §5.6).
    pub fn refresh(&mut self, uid: &str, refresh_token: &str) -> Msg {
        self.request(&Request::post(
            "/oic/sec/tokenrefresh",
            &json!({
                "di": DEVICE_ID,
                "uid": uid,
                "refreshtoken": refresh_token,
                "authprovider": PROVIDER,
                "granttype": "refresh_token",
            }),
        ))
    }

    /// `POST /oic/rd` (spec §5.7).
    pub fn publish(&mut self, body: &Value) -> Msg {
        self.request(&Request::post("/oic/rd", body).query("rt=oic.wk.rdpub"))
    }

    /// How many of the gateway's requests `pred` accepts.
    pub fn count_requests(&self, pred: impl Fn(&Msg) -> bool) -> usize {
        self.requests.iter().filter(|m| pred(m)).count()
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Is `m` the local-endpoints request of spec §8.1 / checklist item 28?
pub fn is_local_endpoints_get(m: &Msg) -> bool {
    let q = uri_queries(m);
    m.code == Code::GET
        && uri_path(m) == "/oic/res"
        && q.iter().any(|q| q == "if=oic.if.ll")
        && q.iter().any(|q| q == "rt=oic.wk.d")
}

/// Is `m` an observe registration (GET with Observe=0)?
pub fn is_observe_registration(m: &Msg) -> bool {
    m.code == Code::GET && option_uint(m, option::OBSERVE) == Some(0)
}

/// What a successful sign-up (or refresh) handed the device.
#[derive(Debug, Clone)]
pub struct Registration {
    pub uid: String,
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: i64,
}

impl Registration {
    pub fn from_sign_up(m: &Msg) -> Registration {
        let b = body(m);
        let s = |k: &str| {
            b[k].as_str()
                .unwrap_or_else(|| panic!("sign-up body without text {k}: {b}"))
                .to_owned()
        };
        Registration {
            uid: s("uid"),
            access_token: s("accesstoken"),
            refresh_token: s("refreshtoken"),
            expires_in: b["expiresin"]
                .as_i64()
                .unwrap_or_else(|| panic!("sign-up body without integer expiresin: {b}")),
        }
    }
}

/// A sign-up code of the embedded authority for `owner`.
pub fn auth_code(gw: &TestGateway, owner: &str) -> String {
    gw.authority()
        .issue_code(owner, None, now_unix())
        .expect("authorization code")
}

/// The sign-up body IoTivity-Lite sends (spec Appendix A item 1).
pub fn sign_up_body(code: &str) -> Value {
    json!({"di": DEVICE_ID, "accesstoken": code, "authprovider": PROVIDER, "devicetype": "device"})
}

/// An access token of the embedded authority for `owner` and `device`.
pub fn access_token(gw: &TestGateway, owner: &str, device: Option<&str>) -> String {
    gw.authority()
        .issue_access_token(owner, device, now_unix())
        .expect("access token")
        .token
}

/// The gateway config of these tests: mutual TLS with OCF identity
/// certificates (spec §3.2), the embedded authority, one shard.
pub fn gateway_config(pki: &TestPki) -> Config {
    pki.config(ClientAuth::Identity)
}

/// Connects, signs up as [`OWNER`] and signs in; settles the work the
/// gateway starts after sign-in.
pub fn signed_in(gw: &TestGateway, pki: &TestPki) -> (OcfDevice, Registration) {
    let mut dev = OcfDevice::connect(gw, pki);
    let reg = dev.sign_up(gw, OWNER);
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    dev.settle(Duration::from_millis(200));
    (dev, reg)
}

// ---------------------------------------------------------------------------
// The hub.

/// Records `device` as `owner`'s, as a sign-up would (spec §4.5).
pub fn register(gw: &TestGateway, owner: &str, device: &str) {
    gw.hub()
        .add_device(&AuthContext {
            owner: owner.to_owned(),
            device_id: device.to_owned(),
            subject: Some(owner.to_owned()),
            token_id: None,
        })
        .expect("add device");
}

pub fn record(gw: &TestGateway, owner: &str) -> Option<DeviceRecord> {
    gw.hub().device(owner, DEVICE_ID)
}

/// Waits until the hub shows [`DEVICE_ID`] ONLINE for `owner`.
pub fn wait_online(gw: &TestGateway, owner: &str) -> ConnectionStatus {
    wait_until(PATIENCE, "device ONLINE in the hub", || {
        record(gw, owner).map(|r| r.status).filter(|s| s.online)
    })
}

/// Waits until the hub no longer shows [`DEVICE_ID`] ONLINE.
pub fn wait_offline(gw: &TestGateway, owner: &str) {
    wait_until(PATIENCE, "device OFFLINE in the hub", || {
        (!record(gw, owner).is_some_and(|r| r.status.online)).then_some(())
    })
}

// ---------------------------------------------------------------------------
// Tokens built claim by claim (spec §4.1).

/// The claims of a JWT, unverified.
pub fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("JWT with a payload");
    let bytes = URL_SAFE_NO_PAD.decode(payload).expect("base64url payload");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

/// Signs arbitrary claims ES256 under a `kid`: with the gateway
/// authority's key ([`TokenForge::gateway`]) or with a key the gateway
/// does not know ([`TokenForge::impostor`]).
pub struct TokenForge {
    key: jsonwebtoken::EncodingKey,
    kid: String,
    issuer: String,
    audience: Option<String>,
}

impl TokenForge {
    /// The key the embedded authority signs with (`authority_key_file`,
    /// created when the gateway started).
    pub fn gateway(gw: &TestGateway, config: &Config) -> TokenForge {
        assert!(
            coap_gateway::auth::jwt::install_crypto_provider(),
            "ring CryptoProvider for jsonwebtoken"
        );
        let path = config.authority_key_file();
        let pem = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("authority key {}: {e}", path.display()));
        let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).expect("PKCS#8 PEM");
        let settings = gw.authority().settings();
        // The audience the gateway requires (`[authorization] audience`).
        let audience = Some(config.authorization.audience.clone())
            .filter(|a| !a.is_empty())
            .or_else(|| settings.audience.clone());
        TokenForge {
            key: jsonwebtoken::EncodingKey::from_ec_der(der.secret_pkcs8_der()),
            kid: gw.authority().signing_key().kid().to_owned(),
            issuer: settings.issuer.clone(),
            audience,
        }
    }

    /// A fresh P-256 key that claims to be the gateway's (same `kid`): its
    /// tokens carry a signature the gateway's key does not verify.
    pub fn impostor(gw: &TestGateway) -> TokenForge {
        assert!(coap_gateway::auth::jwt::install_crypto_provider());
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &ring::rand::SystemRandom::new(),
        )
        .expect("P-256 key");
        let settings = gw.authority().settings();
        TokenForge {
            key: jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
            kid: gw.authority().signing_key().kid().to_owned(),
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
        }
    }

    /// Claims the gateway accepts for `owner` (and `device` in the
    /// device-ID claim): issuer, audience when configured, an hour of life.
    pub fn claims(&self, owner: &str, device: Option<&str>) -> Map<String, Value> {
        let now = now_unix();
        let mut c = Map::new();
        c.insert("iss".into(), json!(self.issuer));
        c.insert("sub".into(), json!(owner));
        if let Some(aud) = &self.audience {
            c.insert("aud".into(), json!(aud));
        }
        if let Some(device) = device {
            c.insert(DEVICE_ID_CLAIM.into(), json!(device));
        }
        c.insert("iat".into(), json!(now));
        c.insert("exp".into(), json!(now + 3600));
        c.insert("jti".into(), json!(format!("test-{now}-{}", rand_suffix())));
        c
    }

    pub fn sign(&self, claims: &Map<String, Value>) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.typ = Some("at+jwt".into());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).expect("sign token")
    }
}

fn rand_suffix() -> u32 {
    let mut b = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("random");
    u32::from_be_bytes(b)
}

/// An unsigned JWT (`alg: none`, empty signature) with `claims`.
pub fn unsigned_token(claims: &Map<String, Value>) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims JSON"));
    format!("{header}.{payload}.")
}

/// Sleeps until just after the next whole Unix second, so that tokens
/// issued now have a full second before their `iat`/`exp` arithmetic
/// moves on (for the deadline tests, whose margins are whole seconds).
pub fn align_to_second() {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let into = Duration::from_nanos(u64::from(d.subsec_nanos()));
    std::thread::sleep(Duration::from_secs(1) - into + Duration::from_millis(20));
}

/// Unix time now, as fractional seconds (for deadline comparisons).
pub fn now_unix_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}
