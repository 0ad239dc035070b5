//! Resource directory and discovery: `POST`/`DELETE`/`GET /oic/rd`,
//! `GET /oic/res`, `GET /x.plgd.dev/time` (spec §5.7–§5.10; checklist
//! items 40–45), over real TLS with a signed-in device.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use coap_gateway::coap::{option, Code};
use common::ocf::*;
use common::{TestGateway, TestPki, DEVICE_ID};
use serde_json::{json, Value};

fn start(pki: &TestPki) -> TestGateway {
    TestGateway::start(&gateway_config(pki))
}

fn light() -> Value {
    json!({
        "href": "/light/1",
        "rt": ["core.light"],
        "if": ["oic.if.rw", "oic.if.baseline"],
        "p": {"bm": 3},
    })
}

fn switches() -> Value {
    json!({
        "href": "/switches",
        "rt": ["oic.wk.col"],
        "if": ["oic.if.ll", "oic.if.b", "oic.if.baseline"],
        "p": {"bm": 3},
    })
}

fn crc(href: &str) -> Value {
    json!(i64::from(crc32fast::hash(href.as_bytes())))
}

#[test]
fn item_40_publish_validation() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let (mut dev, _) = signed_in(&gw, &pki);
    let cases = [
        (json!({"di": DEVICE_ID, "ttl": 0}), "empty links"),
        (
            json!({"di": DEVICE_ID, "links": [], "ttl": 0}),
            "empty links",
        ),
        (json!({"di": DEVICE_ID, "links": "/light/1", "ttl": 0}), ""),
        (
            json!({"di": DEVICE_ID, "links": [light()]}),
            "invalid TimeToLive",
        ),
        (
            json!({"di": DEVICE_ID, "links": [light()], "ttl": -1}),
            "invalid TimeToLive",
        ),
        (
            json!({"di": DEVICE_ID, "links": [light()], "lt": -5}),
            "invalid TimeToLive",
        ),
        (
            json!({"di": DEVICE_ID, "links": [{"href": ""}], "ttl": 0}),
            "invalid resource href",
        ),
    ];
    for (sent, needle) in cases {
        let m = dev.publish(&sent);
        assert_eq!(m.code, Code::BAD_REQUEST, "{sent}: {:?}", text(&m));
        assert_error(&m, Code::BAD_REQUEST, needle);
    }
    // spec §5.0: an empty body is 4.00 too.
    let m = dev.request(&Request::new(Code::POST, "/oic/rd").content_format(OCF_CBOR));
    assert_error(&m, Code::BAD_REQUEST, "");
    // None of that closed the connection or published anything.
    let m = dev.publish(&json!({"di": DEVICE_ID, "links": [light()], "ttl": 0}));
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
    let links = gw.hub().links(OWNER, &[DEVICE_ID], &[], now_unix());
    let hrefs: Vec<&str> = links
        .iter()
        .flat_map(|(_, l)| l.iter().map(|l| l.href.as_str()))
        .collect();
    assert_eq!(hrefs, vec!["/light/1"]);
}

#[test]
fn item_41_publish_echoes_ttl_lt_di_and_ins() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let (mut dev, _) = signed_in(&gw, &pki);
    let mut with_ins = switches();
    with_ins["ins"] = json!(5); // overwritten (spec §5.7)
    let m = dev.publish(&json!({
        "di": DEVICE_ID, "n": "dev1", "links": [light(), with_ins], "ttl": 12345,
    }));
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
    assert_eq!(option_uint(&m, option::CONTENT_FORMAT), Some(OCF_CBOR));
    let b = body(&m);
    assert_eq!(b["di"], json!(DEVICE_ID), "{b}");
    assert_eq!(b["ttl"], json!(12345), "{b}");
    assert_eq!(b["lt"], json!(12345), "{b}");
    let links = b["links"].as_array().expect("links array");
    assert_eq!(links.len(), 2, "{b}");
    for (link, sent) in links.iter().zip([light(), switches()]) {
        let href = sent["href"].as_str().unwrap();
        assert_eq!(link["href"], json!(href), "{link}");
        assert_eq!(link["di"], json!(DEVICE_ID), "{link}");
        assert_eq!(link["ins"], crc(href), "{link}");
        assert_eq!(link["rt"], sent["rt"], "{link}");
        assert_eq!(link["if"], sent["if"], "{link}");
        assert_eq!(link["p"], sent["p"], "{link}");
    }
    // The hub has them, valid `ttl` seconds.
    let stored = gw.hub().links(OWNER, &[DEVICE_ID], &[], now_unix());
    let stored: Vec<_> = stored.into_iter().flat_map(|(_, l)| l).collect();
    assert_eq!(stored.len(), 2, "{stored:?}");
    for link in &stored {
        let until = link.valid_until.expect("ttl > 0 gives valid_until");
        assert!(until.abs_diff(now_unix() + 12345) <= 2, "{link:?}");
    }

    // `lt: 0` alone: both mirrored as 0.
    let m = dev.publish(&json!({"di": DEVICE_ID, "links": [light()], "lt": 0}));
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
    let b = body(&m);
    assert_eq!(b["ttl"], json!(0), "{b}");
    assert_eq!(b["lt"], json!(0), "{b}");
}

/// spec §5.7: hrefs are normalised, and `ins` is the CRC-32 of the href
/// as the device sent it (§14 item 7).
#[test]
/// spec §14 item 7: the reference hashes the raw href, but keys the hub on
/// the normalised one, so an `ins` from a non-canonical href can never
/// unpublish. We hash the normalised href (src/ocf/rd.rs `instance_id`):
/// the `ins` a device stores then finds its link. Canonical hrefs (all that
/// IoTivity-Lite sends) give the same value either way.
fn publish_normalises_hrefs_and_keys_ins_on_the_normalised_href() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let (mut dev, _) = signed_in(&gw, &pki);
    let m = dev.publish(&json!({"di": DEVICE_ID, "links": [{"href": "//light//2/"}], "ttl": 0}));
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
    let link = body(&m)["links"][0].clone();
    assert_eq!(link["href"], json!("/light/2"), "{link}");
    assert_eq!(link["ins"], crc("/light/2"), "{link}");
    let ins = format!("ins={}", crc("/light/2"));
    let m = dev.request(
        &Request::delete("/oic/rd")
            .query(&format!("di={DEVICE_ID}"))
            .query(&ins),
    );
    assert_eq!(
        m.code,
        Code::DELETED,
        "the echoed ins unpublishes: {:?}",
        text(&m)
    );
}

#[test]
fn item_42_unpublish() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let (mut dev, _) = signed_in(&gw, &pki);
    let m = dev.publish(&json!({"di": DEVICE_ID, "links": [light(), switches()], "ttl": 0}));
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
    let di = format!("di={DEVICE_ID}");
    let unpublish = |queries: &[&str]| {
        queries
            .iter()
            .fold(Request::delete("/oic/rd"), |r, q| r.query(q))
    };
    // Foreign di (IoTivity-Lite's one-string form), no di, unknown ins.
    for (queries, why) in [
        (vec!["di=c&ins=5"], "foreign di"),
        (vec!["ins=4"], "no di"),
        (vec![di.as_str(), "ins=999"], "no such ins"),
    ] {
        let m = dev.request(&unpublish(&queries));
        assert_eq!(m.code, Code::BAD_REQUEST, "{why}: {:?}", text(&m));
        assert_error(&m, Code::BAD_REQUEST, "");
    }
    assert_eq!(
        gw.hub().links(OWNER, &[DEVICE_ID], &[], now_unix())[0]
            .1
            .len(),
        2,
        "nothing unpublished yet"
    );
    // `?di=D`: all of the device's links.
    let m = dev.request(&unpublish(&[di.as_str()]));
    assert_eq!(m.code, Code::DELETED, "{:?}", text(&m));
    assert!(m.payload.is_empty(), "{m:?}");
    assert!(gw
        .hub()
        .links(OWNER, &[DEVICE_ID], &[], now_unix())
        .iter()
        .all(|(_, l)| l.is_empty()));
    // Again: nothing left to unpublish.
    let m = dev.request(&unpublish(&[di.as_str()]));
    assert_error(&m, Code::BAD_REQUEST, "");
    // Still signed in: unpublish errors do not close.
    let m = dev.request(&Request::get("/oic/rd"));
    assert_eq!(m.code, Code::CONTENT, "{:?}", text(&m));
}

/// Unpublish by instance ID removes exactly those links (spec §5.8).
#[test]
fn unpublish_by_ins_removes_only_those_links() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let (mut dev, _) = signed_in(&gw, &pki);
    let m = dev.publish(&json!({"di": DEVICE_ID, "links": [light(), switches()], "ttl": 0}));
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
    let ins = crc("/light/1");
    let m = dev.request(&Request::delete("/oic/rd").query(&format!("di={DEVICE_ID}&ins={ins}")));
    assert_eq!(m.code, Code::DELETED, "{:?}", text(&m));
    let left: Vec<String> = gw
        .hub()
        .links(OWNER, &[DEVICE_ID], &[], now_unix())
        .into_iter()
        .flat_map(|(_, l)| l.into_iter().map(|l| l.href))
        .collect();
    assert_eq!(left, vec!["/switches".to_owned()]);
}

#[test]
fn item_43_get_oic_rd_is_the_selector() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let (mut dev, _) = signed_in(&gw, &pki);
    let m = dev.request(&Request::get("/oic/rd"));
    assert_eq!(m.code, Code::CONTENT, "{:?}", text(&m));
    assert_eq!(option_uint(&m, option::CONTENT_FORMAT), Some(OCF_CBOR));
    assert_eq!(body(&m), json!({"sel": 0}));
}

#[test]
fn item_44_discovery_of_published_links() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let (mut dev, _) = signed_in(&gw, &pki);
    let m = dev.publish(&json!({"di": DEVICE_ID, "links": [light(), switches()], "ttl": 0}));
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
    let ep = json!([{"ep": format!("coaps+tcp://{}", gw.addr), "pri": 1}]);
    let prefix = format!("/api/v1/devices/{DEVICE_ID}/");
    let discover = |dev: &mut OcfDevice, queries: &[&str]| -> Vec<Value> {
        let req = queries
            .iter()
            .fold(Request::get("/oic/res"), |r, q| r.query(q));
        let m = dev.request(&req);
        assert_eq!(m.code, Code::CONTENT, "{req}: {:?}", text(&m));
        assert_eq!(option_uint(&m, option::CONTENT_FORMAT), Some(OCF_CBOR));
        match body(&m) {
            Value::Array(links) => links,
            other => panic!("{req}: not an array: {other}"),
        }
    };
    let di = format!("di={DEVICE_ID}");
    for queries in [
        vec![],
        vec![di.as_str()],
        vec!["rt=core.light"],
        vec![di.as_str(), "rt=core.light"],
    ] {
        let links = discover(&mut dev, &queries);
        assert!(!links.is_empty(), "{queries:?}");
        for link in &links {
            let href = link["href"].as_str().expect("href");
            assert!(href.starts_with(&prefix), "{queries:?}: {link}");
            assert_eq!(link["eps"], ep, "{queries:?}: {link}");
            assert_eq!(
                link["anchor"],
                json!(format!("ocf://{DEVICE_ID}")),
                "{link}"
            );
            assert!(link.get("id").is_none(), "{link}");
            if queries.contains(&"rt=core.light") {
                assert_eq!(link["rt"], json!(["core.light"]), "{queries:?}: {link}");
            }
        }
    }
    let all = discover(&mut dev, &[]);
    let mut hrefs: Vec<&str> = all.iter().filter_map(|l| l["href"].as_str()).collect();
    hrefs.sort();
    assert_eq!(
        hrefs,
        vec![format!("{prefix}light/1"), format!("{prefix}switches")]
    );
    let foreign = format!("di={OTHER_DEVICE}");
    assert_eq!(discover(&mut dev, &[foreign.as_str()]), Vec::<Value>::new());
}

/// spec §5.9: Accept 60 gives one `{di, links, ttl: -1, lt: -1}` per device.
#[test]
fn discovery_with_accept_60_groups_links_by_device() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let (mut dev, _) = signed_in(&gw, &pki);
    let m = dev.publish(&json!({"di": DEVICE_ID, "links": [light()], "ttl": 0}));
    assert_eq!(m.code, Code::CHANGED, "{:?}", text(&m));
    let m = dev.request(&Request::get("/oic/res").accept(60));
    assert_eq!(m.code, Code::CONTENT, "{:?}", text(&m));
    assert_eq!(option_uint(&m, option::CONTENT_FORMAT), Some(60));
    let b = body(&m);
    let devices = b.as_array().expect("array");
    assert_eq!(devices.len(), 1, "{b}");
    assert_eq!(devices[0]["di"], json!(DEVICE_ID), "{b}");
    assert_eq!(devices[0]["ttl"], json!(-1), "{b}");
    assert_eq!(devices[0]["lt"], json!(-1), "{b}");
    assert_eq!(devices[0]["links"].as_array().map(Vec::len), Some(1), "{b}");
}

#[test]
fn item_45_time_without_sign_in() {
    let pki = TestPki::new();
    let gw = start(&pki);
    let mut dev = OcfDevice::connect(&gw, &pki);
    let m = dev.request(&Request::get("/x.plgd.dev/time"));
    assert_eq!(m.code, Code::CONTENT, "{:?}", text(&m));
    assert_eq!(option_uint(&m, option::CONTENT_FORMAT), Some(OCF_CBOR));
    let b = body(&m);
    let time = b["time"].as_str().expect("time text");
    let at = rfc3339_unix(time).unwrap_or_else(|| panic!("not RFC 3339: {time:?}"));
    assert!((at - now_unix_f64()).abs() < 5.0, "time {time} is not now");
}

/// Seconds since the epoch of an RFC 3339 date-time
/// (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`), `None` if it is not one.
fn rfc3339_unix(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac = 0.0;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        frac = format!("0.{}", &s[start..i]).parse().ok()?;
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        c @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let o = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *c == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    // Days from civil (H. Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    Some(secs as f64 + frac)
}
