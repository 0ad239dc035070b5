//! A simulated device that keeps a twin (spec §6, §7): it lists K
//! observable resources `/bench/0` … `/bench/{K-1}` in its `/oic/res`
//! (with `/oic/res` itself **not** batch observable, so the gateway runs
//! per-resource mode, spec §6.6, the IoTivity-Lite default build), answers
//! the gateway's observation registrations, reads and updates (an update
//! answers 2.04 with the new value and notifies the observer, as
//! IoTivity-Lite does), and writes notifications on demand whose CBOR
//! payload carries a sequence number and the send time:
//! `{"seq": n, "t": unix_ns}`.
//!
//! Pure encoding and decoding: the socket side is in `device.rs`.

use coap_gateway::coap::{option, Code, MessageRef, MessageWriter};
use minicbor::{Decoder, Encoder};

use crate::ocf::OCF_CBOR;

/// What a device lists as its endpoint (spec §8.1).
const LOCAL_ENDPOINT: &str = "coaps+tcp://127.0.0.1:1";
/// The observe sequence is a 24-bit number (RFC 7641 §4.4).
const OBSERVE_MASK: u32 = 0x00ff_ffff;

/// The href of resource `k`.
pub fn href(k: usize) -> String {
    format!("/bench/{k}")
}

/// One resource of the device.
#[derive(Debug)]
struct Resource {
    href: String,
    /// The gateway's observation token, once registered.
    observer: Option<Vec<u8>>,
    /// The representation (CBOR).
    value: Vec<u8>,
}

/// The device side of the twin: resources, observers, notification
/// sequence numbers, and what it was asked.
#[derive(Debug)]
pub struct TwinModel {
    device_id: String,
    resources: Vec<Resource>,
    /// Notifications written so far (the payload's `seq` of the last one).
    pub sent: u64,
    /// The Observe option of the next notification or registration answer.
    observe_seq: u32,
    /// POSTs (commands, spec §7.2) answered.
    pub updates: u64,
    /// The last update's payload (the command's value).
    pub last_update: Vec<u8>,
    /// Requests answered 4.04 (nothing the bench expects).
    pub not_found: u64,
    /// `v` of every update whose body is `{"v": n}` (the `command`
    /// scenario's numbering), in arrival order.
    pub update_values: Vec<u64>,
}

impl TwinModel {
    pub fn new(device_id: &str, resources: usize) -> TwinModel {
        TwinModel {
            device_id: device_id.to_owned(),
            resources: (0..resources)
                .map(|k| Resource {
                    href: href(k),
                    observer: None,
                    value: notification_body(0, 0),
                })
                .collect(),
            sent: 0,
            observe_seq: 2,
            updates: 0,
            last_update: Vec::new(),
            not_found: 0,
            update_values: Vec::new(),
        }
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    pub fn resource_count(&self) -> usize {
        self.resources.len()
    }

    /// Whether the gateway observes every resource (spec §6.6 done).
    pub fn all_observed(&self) -> bool {
        self.resources.iter().all(|r| r.observer.is_some())
    }

    /// The link list (`GET /oic/res`, spec §6.3): `/oic/d`, `/oic/res`
    /// (observable but without `oic.if.b`: per-resource mode) and the
    /// resources; only those of type `rt` when given (spec §8.1).
    pub fn links_body(&self, rt: Option<&str>) -> Vec<u8> {
        let mut links: Vec<(String, &str, &[&str], u32)> = vec![
            (
                "/oic/d".into(),
                "oic.wk.d",
                &["oic.if.r", "oic.if.baseline"],
                1,
            ),
            (
                "/oic/res".into(),
                "oic.wk.res",
                &["oic.if.ll", "oic.if.baseline"],
                1,
            ),
        ];
        for r in &self.resources {
            links.push((
                r.href.clone(),
                "x.bench",
                &["oic.if.rw", "oic.if.baseline"],
                3,
            ));
        }
        links.retain(|l| rt.is_none_or(|rt| rt == l.1));
        let mut e = Encoder::new(Vec::with_capacity(128 * links.len()));
        // Writing into a Vec cannot fail (its error type is Infallible).
        let _ = e.array(links.len() as u64);
        for (href, rt, ifs, bm) in &links {
            let _ = e.map(6);
            let _ = e.str("href").and_then(|e| e.str(href));
            let _ = e.str("rt").and_then(|e| e.array(1)).and_then(|e| e.str(rt));
            let _ = e.str("if").and_then(|e| e.array(ifs.len() as u64));
            for i in *ifs {
                let _ = e.str(i);
            }
            let _ = e
                .str("p")
                .and_then(|e| e.map(1))
                .and_then(|e| e.str("bm"))
                .and_then(|e| e.u32(*bm));
            let _ = e
                .str("anchor")
                .and_then(|e| e.str(&format!("ocf://{}", self.device_id)));
            let _ = e
                .str("eps")
                .and_then(|e| e.array(1))
                .and_then(|e| e.map(1))
                .and_then(|e| e.str("ep"))
                .and_then(|e| e.str(LOCAL_ENDPOINT));
        }
        e.into_writer()
    }

    /// `POST /oic/rd` body (spec §5.7) publishing the resources' links.
    pub fn publish_body(&self) -> Vec<u8> {
        // The publish body is the link list of the resources wrapped in
        // {di, links, ttl}: reuse the encoder by filtering on our type.
        let links = self.links_body(Some("x.bench"));
        let mut e = Encoder::new(Vec::with_capacity(links.len() + 64));
        let _ = e.map(3);
        let _ = e.str("di").and_then(|e| e.str(&self.device_id));
        let _ = e.str("links");
        let mut out = e.into_writer();
        out.extend_from_slice(&links);
        let mut e = Encoder::new(out);
        let _ = e.str("ttl").and_then(|e| e.u32(0));
        e.into_writer()
    }

    fn resource_index(&self, req: &MessageRef<'_>) -> Option<usize> {
        let mut path = req.uri_path();
        if path.next() != Some(b"bench") {
            return None;
        }
        let k: usize = std::str::from_utf8(path.next()?).ok()?.parse().ok()?;
        if path.next().is_some() {
            return None;
        }
        (k < self.resources.len()).then_some(k)
    }

    fn next_observe(&mut self) -> u32 {
        self.observe_seq = (self.observe_seq + 1) & OBSERVE_MASK;
        self.observe_seq
    }

    /// Appends the answer to a request of the gateway to `out`; after an
    /// update also the notification of the new value (RFC 7641: the
    /// observer learns of the change).
    pub fn answer(&mut self, req: &MessageRef<'_>, out: &mut Vec<u8>) {
        let queries: Vec<&[u8]> = req.uri_queries().collect();
        if req.code == Code::GET && req.uri_path_is(&["oic", "res"]) {
            let rt = queries
                .iter()
                .find_map(|q| q.strip_prefix(b"rt="))
                .and_then(|rt| std::str::from_utf8(rt).ok());
            let body = self.links_body(rt);
            reply(out, req.token, Code::CONTENT, None, Some(&body));
            return;
        }
        if req.code == Code::GET && req.uri_path_is(&["oic", "d"]) {
            let mut e = Encoder::new(Vec::with_capacity(64));
            let _ = e.map(2);
            let _ = e.str("di").and_then(|e| e.str(&self.device_id));
            let _ = e.str("n").and_then(|e| e.str("bench device"));
            reply(out, req.token, Code::CONTENT, None, Some(&e.into_writer()));
            return;
        }
        let Some(k) = self.resource_index(req) else {
            self.not_found += 1;
            reply(out, req.token, Code::NOT_FOUND, None, None);
            return;
        };
        match req.code {
            Code::GET => {
                let observe = match req.observe() {
                    Some(0) => {
                        self.resources[k].observer = Some(req.token.to_vec());
                        Some(self.next_observe())
                    }
                    Some(1) => {
                        self.resources[k].observer = None;
                        None
                    }
                    _ => None,
                };
                let value = std::mem::take(&mut self.resources[k].value);
                reply(out, req.token, Code::CONTENT, observe, Some(&value));
                self.resources[k].value = value;
            }
            Code::POST | Code::PUT => {
                self.updates += 1;
                self.last_update.clear();
                self.last_update.extend_from_slice(req.payload);
                if let Some(v) = uint_field(req.payload, "v") {
                    self.update_values.push(v);
                }
                self.resources[k].value = req.payload.to_vec();
                reply(out, req.token, Code::CHANGED, None, Some(req.payload));
                if let Some(token) = self.resources[k].observer.clone() {
                    let seq = self.next_observe();
                    reply(out, &token, Code::CONTENT, Some(seq), Some(req.payload));
                }
            }
            _ => {
                self.not_found += 1;
                reply(out, req.token, Code::METHOD_NOT_ALLOWED, None, None);
            }
        }
    }

    /// Appends a notification of resource `k` with payload
    /// `{"seq": sent + 1, "t": t_ns}` to `out`; `None` (nothing written)
    /// when the gateway does not observe it. Returns the `seq`.
    pub fn write_notification(&mut self, k: usize, t_ns: u64, out: &mut Vec<u8>) -> Option<u64> {
        let observe = self.next_observe();
        let r = self.resources.get_mut(k)?;
        let token = r.observer.as_deref()?;
        let seq = self.sent + 1;
        let body = notification_body(seq, t_ns);
        reply(out, token, Code::CONTENT, Some(observe), Some(&body));
        r.value = body;
        self.sent = seq;
        Some(seq)
    }
}

fn reply(out: &mut Vec<u8>, token: &[u8], code: Code, observe: Option<u32>, body: Option<&[u8]>) {
    let mut w = MessageWriter::new(out, code, token);
    if let Some(seq) = observe {
        w.option_uint(option::OBSERVE, seq);
    }
    if let Some(body) = body {
        w.option_uint(option::CONTENT_FORMAT, OCF_CBOR);
        w.payload(body);
    }
    w.finish();
}

/// `{"seq": seq, "t": t_ns}` in CBOR.
pub fn notification_body(seq: u64, t_ns: u64) -> Vec<u8> {
    let mut e = Encoder::new(Vec::with_capacity(24));
    let _ = e.map(2);
    let _ = e.str("seq").and_then(|e| e.u64(seq));
    let _ = e.str("t").and_then(|e| e.u64(t_ns));
    e.into_writer()
}

/// The unsigned integer `key` of a CBOR map.
pub fn uint_field(body: &[u8], key: &str) -> Option<u64> {
    let mut d = Decoder::new(body);
    let n = d.map().ok()??;
    for _ in 0..n {
        let k = d.str().ok()?;
        if k == key {
            return d.u64().ok();
        }
        d.skip().ok()?;
    }
    None
}

/// `seq` and `t` of a notification body in CBOR.
#[cfg(test)]
pub fn parse_notification_body(body: &[u8]) -> Option<(u64, u64)> {
    use minicbor::data::Type;
    let mut d = Decoder::new(body);
    let n = d.map().ok()??;
    let (mut seq, mut t) = (None, None);
    for _ in 0..n {
        let key = d.str().ok()?;
        match (key, d.datatype().ok()?) {
            ("seq", Type::U8 | Type::U16 | Type::U32 | Type::U64) => seq = d.u64().ok(),
            ("t", Type::U8 | Type::U16 | Type::U32 | Type::U64) => t = d.u64().ok(),
            _ => d.skip().ok()?,
        }
    }
    Some((seq?, t?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use coap_gateway::coap::deframer;

    fn request(code: Code, path: &[&str], query: &[&str], observe: Option<u32>) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut w = MessageWriter::new(&mut out, code, &[1, 2, 3, 4, 5, 6, 7, 8]);
            if let Some(o) = observe {
                w.option_uint(option::OBSERVE, o);
            }
            for p in path {
                w.option_str(option::URI_PATH, p);
            }
            for q in query {
                w.option_str(option::URI_QUERY, q);
            }
            w.finish();
        }
        out
    }

    fn parse(bytes: &[u8]) -> Vec<MessageRef<'_>> {
        let mut all = Vec::new();
        let mut at = 0;
        while let Some((m, len)) = deframer::next_message(&bytes[at..], 1 << 20).unwrap() {
            all.push(m);
            at += len;
        }
        assert_eq!(at, bytes.len());
        all
    }

    #[test]
    fn links_list_resources_and_a_non_batch_res() {
        let m = TwinModel::new("d1", 2);
        let body = m.links_body(None);
        let links = coap_gateway::ocf::rd::decode_link_list(&body).unwrap();
        let hrefs: Vec<&str> = links.iter().map(|l| l.href.as_ref()).collect();
        assert_eq!(hrefs, ["/oic/d", "/oic/res", "/bench/0", "/bench/1"]);
        let res = links.iter().find(|l| l.href == "/oic/res").unwrap();
        assert!(!res.interfaces.as_ref().unwrap().contains(&"oic.if.b"));
        assert!(links[2].policy.unwrap().observable());
        let body = m.links_body(Some("oic.wk.d"));
        let d = coap_gateway::ocf::rd::decode_link_list(&body).unwrap();
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn publish_body_is_a_valid_publish() {
        let m = TwinModel::new("0b6a2c1e-8a5e-4f4c-9f3c-1d2e3f405162", 3);
        let body = m.publish_body();
        let p = coap_gateway::ocf::rd::PublishRequest::decode(&body).unwrap();
        assert_eq!(p.links.len(), 3);
    }

    #[test]
    fn observe_then_notify_then_update() {
        let mut m = TwinModel::new("d1", 1);
        let mut out = Vec::new();
        // Nobody observes yet: nothing is written.
        assert_eq!(m.write_notification(0, 5, &mut out), None);
        assert!(out.is_empty());
        let req = request(Code::GET, &["bench", "0"], &[], Some(0));
        let req = MessageRef::parse(&req).unwrap();
        m.answer(&req, &mut out);
        assert!(m.all_observed());
        let reg = parse(&out);
        assert_eq!(reg[0].code, Code::CONTENT);
        assert!(reg[0].observe().is_some());
        out.clear();
        assert_eq!(m.write_notification(0, 77, &mut out), Some(1));
        assert_eq!(m.write_notification(0, 78, &mut out), Some(2));
        let n = parse(&out);
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].token, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(n[1].observe().unwrap() > n[0].observe().unwrap());
        assert_eq!(parse_notification_body(n[1].payload), Some((2, 78)));
        assert_eq!(n[1].content_format(), Some(10000));
        // An update: 2.04 with the value, then a notification of it.
        out.clear();
        let mut post = Vec::new();
        MessageWriter::new(&mut post, Code::POST, &[9])
            .option_str(option::URI_PATH, "bench")
            .option_str(option::URI_PATH, "0")
            .option_uint(option::CONTENT_FORMAT, 10000)
            .payload(&[0xa1, 0x61, 0x76, 0x05])
            .finish();
        m.answer(&MessageRef::parse(&post).unwrap(), &mut out);
        let a = parse(&out);
        assert_eq!(
            (a[0].code, a[0].token, a[0].payload),
            (Code::CHANGED, &[9u8][..], &[0xa1, 0x61, 0x76, 0x05][..])
        );
        assert_eq!(a[1].token, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(m.updates, 1);
        assert_eq!(m.update_values, [5]);
        // Unknown resource and cancel.
        out.clear();
        let r = request(Code::GET, &["bench", "7"], &[], None);
        m.answer(&MessageRef::parse(&r).unwrap(), &mut out);
        assert_eq!(parse(&out)[0].code, Code::NOT_FOUND);
        let c = request(Code::GET, &["bench", "0"], &[], Some(1));
        out.clear();
        m.answer(&MessageRef::parse(&c).unwrap(), &mut out);
        assert!(!m.all_observed());
    }

    #[test]
    fn notification_bodies_round_trip() {
        let b = notification_body(u64::MAX, 1_800_000_000_000_000_000);
        assert_eq!(
            parse_notification_body(&b),
            Some((u64::MAX, 1_800_000_000_000_000_000))
        );
        assert_eq!(parse_notification_body(&[0xa0]), None);
        assert_eq!(parse_notification_body(&[0xff]), None);
    }
}
