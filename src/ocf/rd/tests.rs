use super::*;
use minicbor::Encoder;

type Enc<'w> = Encoder<&'w mut Vec<u8>>;

fn encode(build: impl FnOnce(&mut Enc<'_>)) -> Vec<u8> {
    let mut out = Vec::new();
    build(&mut Encoder::new(&mut out));
    out
}

const DI: &str = "5bbc55bb-686f-4068-6c2d-75c4a8b4f49a";

/// Appendix A item 3: (href, rt, if, device-sent ins).
const APPENDIX_A_LINKS: [(&str, &[&str], &[&str], u32); 5] = [
    (
        "/oic/d",
        &["oic.d.cloudDevice", "oic.wk.d"],
        &["oic.if.r", "oic.if.baseline"],
        2761263951,
    ),
    (
        "/oic/p",
        &["oic.wk.p"],
        &["oic.if.r", "oic.if.baseline"],
        837940787,
    ),
    (
        "/light/1",
        &["core.light"],
        &["oic.if.rw", "oic.if.baseline"],
        378059762,
    ),
    (
        "/switches",
        &["oic.wk.col"],
        &["oic.if.ll", "oic.if.b", "oic.if.baseline"],
        3428965409,
    ),
    (
        "/oc/con",
        &["oic.wk.con"],
        &["oic.if.rw", "oic.if.baseline"],
        2513654414,
    ),
];

fn strs(e: &mut Enc<'_>, items: &[&str]) {
    e.array(items.len() as u64).unwrap();
    for item in items {
        e.str(item).unwrap();
    }
}

fn appendix_a_publish() -> Vec<u8> {
    encode(|e| {
        e.map(4).unwrap();
        e.str("di").unwrap().str(DI).unwrap();
        e.str("n").unwrap().str("dev1").unwrap();
        e.str("ttl").unwrap().u8(0).unwrap();
        e.str("links").unwrap().array(5).unwrap();
        for (href, rt, ifs, ins) in APPENDIX_A_LINKS {
            e.map(6).unwrap();
            e.str("href").unwrap().str(href).unwrap();
            e.str("rt").unwrap();
            strs(e, rt);
            e.str("if").unwrap();
            strs(e, ifs);
            e.str("rel").unwrap().str("hosts").unwrap();
            e.str("ins").unwrap().u32(ins).unwrap();
            e.str("p").unwrap().map(1).unwrap();
            e.str("bm").unwrap().u8(3).unwrap();
        }
    })
}

#[test]
fn appendix_a_publish_decodes_and_device_ins_is_overwritten() {
    let bytes = appendix_a_publish();
    let request = PublishRequest::decode(&bytes).unwrap();
    assert_eq!(request.device_id, DI);
    assert_eq!(request.ttl, 0);
    assert_eq!(request.links.len(), 5);
    for (link, (href, rt, ifs, device_ins)) in request.links.iter().zip(APPENDIX_A_LINKS) {
        assert_eq!(link.href, href);
        assert_eq!(link.resource_types.as_deref(), Some(rt));
        assert_eq!(link.interfaces.as_deref(), Some(ifs));
        assert_eq!(link.device_id, DI);
        assert_eq!(
            link.policy,
            Some(Policy {
                bit_mask: 3,
                ..Policy::default()
            })
        );
        assert!(link.policy.unwrap().observable());
        assert_eq!(
            link.instance_id,
            i64::from(crc32fast::hash(href.as_bytes()))
        );
        assert_ne!(link.instance_id, i64::from(device_ins));
    }
    // IEEE CRC-32 of "/oic/d", computed independently (zlib.crc32).
    assert_eq!(request.links[0].instance_id, 136_750_592);
}

/// Exact bytes of a one-link echo, and the request it came from.
#[test]
fn exact_request_and_echo_bytes() {
    let request = encode(|e| {
        e.map(3).unwrap();
        e.str("di").unwrap().str("d").unwrap();
        e.str("links").unwrap().array(1).unwrap();
        e.map(2).unwrap();
        e.str("href").unwrap().str("/a").unwrap();
        e.str("rel").unwrap().str("hosts").unwrap();
        e.str("lt").unwrap().u16(300).unwrap();
    });
    let decoded = PublishRequest::decode(&request).unwrap();
    let mut out = Vec::new();
    decoded.encode(ContentFormat::OcfCbor, &mut out).unwrap();

    let ins = crc32fast::hash(b"/a");
    let mut expected = vec![0xa4, 0x62, b'd', b'i', 0x61, b'd', 0x65];
    expected.extend_from_slice(b"links");
    expected.extend_from_slice(&[0x81, 0xa3, 0x64]);
    expected.extend_from_slice(b"href");
    expected.extend_from_slice(&[0x62, b'/', b'a', 0x62, b'd', b'i', 0x61, b'd', 0x63]);
    expected.extend_from_slice(b"ins");
    expected.push(0x1a);
    expected.extend_from_slice(&ins.to_be_bytes());
    expected.extend_from_slice(&[0x63, b't', b't', b'l', 0x19, 0x01, 0x2c]);
    expected.extend_from_slice(&[0x62, b'l', b't', 0x19, 0x01, 0x2c]);
    assert_eq!(out, expected);
}

#[test]
fn json_echo_for_accept_50() {
    let bytes = encode(|e| {
        e.map(3).unwrap();
        e.str("di").unwrap().str("d").unwrap();
        e.str("ttl").unwrap().u8(5).unwrap();
        e.str("links").unwrap().array(1).unwrap();
        e.map(5).unwrap();
        e.str("href").unwrap().str("/a").unwrap();
        e.str("rt").unwrap();
        strs(e, &["x"]);
        e.str("p").unwrap().map(2).unwrap();
        e.str("bm").unwrap().u8(1).unwrap();
        e.str("sec").unwrap().bool(true).unwrap();
        e.str("eps").unwrap().array(1).unwrap();
        e.map(2).unwrap();
        e.str("ep").unwrap().str("coap://[::1]:1").unwrap();
        e.str("pri").unwrap().u8(2).unwrap();
        e.str("title").unwrap().str("T").unwrap();
    });
    let request = PublishRequest::decode(&bytes).unwrap();
    let mut out = Vec::new();
    request.encode(ContentFormat::Json, &mut out).unwrap();
    let ins = crc32fast::hash(b"/a");
    let expected = format!(
        r#"{{"di":"d","links":[{{"href":"/a","rt":["x"],"p":{{"bm":1,"sec":true}},"eps":[{{"ep":"coap://[::1]:1","pri":2}}],"di":"d","ins":{ins},"title":"T"}}],"ttl":5,"lt":5}}"#
    );
    assert_eq!(String::from_utf8(out).unwrap(), expected);
}

/// Every understood link key survives the CBOR echo; re-decoding the echo
/// gives the same request (normalisation is idempotent).
#[test]
fn full_link_round_trips_through_the_echo() {
    let bytes = encode(|e| {
        e.map(3).unwrap();
        e.str("di").unwrap().str("d").unwrap();
        e.str("ttl").unwrap().u32(12345).unwrap();
        e.str("links").unwrap().array(1).unwrap();
        e.map(11).unwrap();
        e.str("href").unwrap().str("//x//y/").unwrap();
        e.str("rt").unwrap();
        strs(e, &["r1", "r2"]);
        e.str("if").unwrap();
        strs(e, &[]);
        e.str("p").unwrap().map(5).unwrap();
        e.str("bm").unwrap().u8(2).unwrap();
        e.str("port").unwrap().u16(5683).unwrap();
        e.str("x.org.iotivity.tcp").unwrap().u16(1).unwrap();
        e.str("x.org.iotivity.tls").unwrap().u16(2).unwrap();
        e.str("sec").unwrap().bool(false).unwrap();
        e.str("eps").unwrap().array(2).unwrap();
        e.map(1).unwrap().str("ep").unwrap().str("a").unwrap();
        e.map(2).unwrap().str("ep").unwrap().str("b").unwrap();
        e.str("pri").unwrap().u8(1).unwrap();
        e.str("anchor").unwrap().str("ocf://d").unwrap();
        e.str("di").unwrap().str("ignored").unwrap();
        e.str("ins").unwrap().i64(-7).unwrap();
        e.str("title").unwrap().str("t").unwrap();
        e.str("type").unwrap();
        strs(e, &["application/cbor"]);
        e.str("id").unwrap().str("dropped").unwrap();
    });
    let request = PublishRequest::decode(&bytes).unwrap();
    let link = &request.links[0];
    assert_eq!(link.href, "/x/y");
    assert_eq!(link.instance_id, instance_id("/x/y"));
    assert_eq!(link.device_id, "d");
    assert_eq!(link.id, Some("dropped"));
    assert_eq!(
        link.policy,
        Some(Policy {
            bit_mask: 2,
            port: Some(5683),
            tcp_port: Some(1),
            tls_port: Some(2),
            secured: Some(false),
        })
    );
    assert_eq!(
        link.endpoints.as_deref(),
        Some(
            &[
                Endpoint {
                    uri: "a",
                    priority: None
                },
                Endpoint {
                    uri: "b",
                    priority: Some(1)
                }
            ][..]
        )
    );
    let mut echo = Vec::new();
    request.encode(ContentFormat::Cbor, &mut echo).unwrap();
    let again = PublishRequest::decode(&echo).unwrap();
    let mut without_id = request.clone();
    without_id.links[0].id = None;
    assert_eq!(again, without_id);
}

fn publish_with(build: impl FnOnce(&mut Enc<'_>)) -> Result<PublishRequest<'static>, PublishError> {
    let bytes = Box::leak(encode(build).into_boxed_slice());
    PublishRequest::decode(bytes)
}

fn one_link(e: &mut Enc<'_>, href: &str) {
    e.str("links").unwrap().array(1).unwrap();
    e.map(1).unwrap().str("href").unwrap().str(href).unwrap();
}

/// Checklist item 40, each error with its text.
#[test]
fn checklist_40_validation_errors() {
    let no_links = publish_with(|e| {
        e.map(2).unwrap();
        e.str("di").unwrap().str("d").unwrap();
        e.str("ttl").unwrap().u8(0).unwrap();
    });
    assert_eq!(no_links.unwrap_err().to_string(), "empty links");
    let empty_links = publish_with(|e| {
        e.map(3).unwrap();
        e.str("di").unwrap().str("d").unwrap();
        e.str("ttl").unwrap().u8(0).unwrap();
        e.str("links").unwrap().array(0).unwrap();
    });
    assert_eq!(empty_links, Err(PublishError::EmptyLinks));
    let null_links = publish_with(|e| {
        e.map(3).unwrap();
        e.str("di").unwrap().str("d").unwrap();
        e.str("ttl").unwrap().u8(0).unwrap();
        e.str("links").unwrap().null().unwrap();
    });
    assert_eq!(null_links, Err(PublishError::EmptyLinks));
    let not_array = publish_with(|e| {
        e.map(3).unwrap();
        e.str("di").unwrap().str("d").unwrap();
        e.str("ttl").unwrap().u8(0).unwrap();
        e.str("links").unwrap().map(0).unwrap();
    });
    assert_eq!(not_array.unwrap_err().to_string(), "links: expected array");
    let no_ttl = publish_with(|e| {
        e.map(2).unwrap();
        e.str("di").unwrap().str("d").unwrap();
        one_link(e, "/a");
    });
    assert_eq!(no_ttl.unwrap_err().to_string(), "invalid TimeToLive");
    let negative = publish_with(|e| {
        e.map(4).unwrap();
        e.str("di").unwrap().str("d").unwrap();
        e.str("ttl").unwrap().i64(-1).unwrap();
        e.str("lt").unwrap().i64(-5).unwrap();
        one_link(e, "/a");
    });
    assert_eq!(negative, Err(PublishError::InvalidTimeToLive));
    for href in ["", "/", "///"] {
        let bad = publish_with(|e| {
            e.map(3).unwrap();
            e.str("di").unwrap().str("d").unwrap();
            e.str("ttl").unwrap().u8(0).unwrap();
            one_link(e, href);
        });
        assert_eq!(bad.unwrap_err().to_string(), "invalid resource href");
    }
    let no_href = publish_with(|e| {
        e.map(3).unwrap();
        e.str("di").unwrap().str("d").unwrap();
        e.str("ttl").unwrap().u8(0).unwrap();
        e.str("links").unwrap().array(1).unwrap();
        e.map(1).unwrap().str("rt").unwrap().array(0).unwrap();
    });
    assert_eq!(no_href, Err(PublishError::InvalidHref));
    let no_di = publish_with(|e| {
        e.map(2).unwrap();
        e.str("ttl").unwrap().u8(0).unwrap();
        one_link(e, "/a");
    });
    assert_eq!(no_di.unwrap_err().to_string(), "invalid DeviceId");
    assert_eq!(
        PublishRequest::decode(&[]),
        Err(PublishError::Body(BodyError::Empty))
    );
}

/// Checklist item 41 and the other ttl/lt combinations.
#[test]
fn checklist_41_ttl_and_lt() {
    let cases: [(Option<i64>, Option<i64>, u64); 5] = [
        (Some(12345), None, 12345),
        (None, Some(0), 0),
        (Some(-1), Some(60), 60),
        (Some(30), Some(-1), 30),
        (Some(30), Some(60), 30),
    ];
    for (ttl, lt, want) in cases {
        let request = publish_with(|e| {
            let n = 2 + u64::from(ttl.is_some()) + u64::from(lt.is_some());
            e.map(n).unwrap();
            e.str("di").unwrap().str("d").unwrap();
            if let Some(ttl) = ttl {
                e.str("ttl").unwrap().i64(ttl).unwrap();
            }
            if let Some(lt) = lt {
                e.str("lt").unwrap().i64(lt).unwrap();
            }
            one_link(e, "/a");
        })
        .unwrap();
        assert_eq!(request.ttl, want, "ttl {ttl:?} lt {lt:?}");
        let mut echo = Vec::new();
        request.encode(ContentFormat::OcfCbor, &mut echo).unwrap();
        let f = Fields::body(&echo, ["ttl", "lt"]).unwrap();
        assert_eq!(f.uint::<u64>("ttl").unwrap(), Some(want));
        assert_eq!(f.uint::<u64>("lt").unwrap(), Some(want));
    }
}

/// A wrong CBOR type in every understood field is an error naming it.
#[test]
fn wrong_types_for_every_field() {
    type Build = fn(&mut Enc<'_>);
    let top: [(&str, Build, &str); 4] = [
        (
            "di",
            |e| {
                e.u8(1).unwrap();
            },
            "di: expected text string",
        ),
        (
            "links",
            |e| {
                e.str("x").unwrap();
            },
            "links: expected array",
        ),
        (
            "ttl",
            |e| {
                e.str("5").unwrap();
            },
            "ttl: expected integer",
        ),
        (
            "lt",
            |e| {
                e.f32(1.5).unwrap();
            },
            "lt: expected integer",
        ),
    ];
    for (key, value, text) in top {
        let err = publish_with(|e| {
            e.map(1).unwrap().str(key).unwrap();
            value(e);
        })
        .unwrap_err();
        assert_eq!(err.to_string(), text, "{key}");
    }

    let in_link: [(&str, Build, &str); 18] = [
        (
            "href",
            |e| {
                e.u8(1).unwrap();
            },
            "links[].href: expected text string",
        ),
        (
            "rt",
            |e| {
                e.str("x").unwrap();
            },
            "links[].rt: expected array",
        ),
        (
            "rt",
            |e| {
                e.array(1).and_then(|e| e.u8(1)).unwrap();
            },
            "links[].rt: expected text string",
        ),
        (
            "if",
            |e| {
                e.map(0).unwrap();
            },
            "links[].if: expected array",
        ),
        (
            "p",
            |e| {
                e.u8(3).unwrap();
            },
            "links[].p: expected map",
        ),
        (
            "p",
            |e| {
                e.map(1).and_then(|e| e.str("bm")?.str("3")).unwrap();
            },
            "links[].p.bm: expected unsigned integer",
        ),
        (
            "p",
            |e| {
                e.map(1).and_then(|e| e.str("bm")?.u16(256)).unwrap();
            },
            "links[].p.bm: value out of range",
        ),
        (
            "p",
            |e| {
                e.map(1).and_then(|e| e.str("port")?.u32(70000)).unwrap();
            },
            "links[].p.port: value out of range",
        ),
        (
            "p",
            |e| {
                e.map(1).and_then(|e| e.str("sec")?.u8(1)).unwrap();
            },
            "links[].p.sec: expected bool",
        ),
        (
            "eps",
            |e| {
                e.str("x").unwrap();
            },
            "links[].eps: expected array",
        ),
        (
            "eps",
            |e| {
                e.array(1).and_then(|e| e.str("x")).unwrap();
            },
            "links[].eps[]: expected map",
        ),
        (
            "eps",
            |e| {
                e.array(1).and_then(|e| e.map(1)?.str("ep")?.u8(1)).unwrap();
            },
            "links[].eps[].ep: expected text string",
        ),
        (
            "eps",
            |e| {
                e.array(1)
                    .and_then(|e| e.map(1)?.str("pri")?.i8(-1))
                    .unwrap();
            },
            "links[].eps[].pri: value out of range",
        ),
        (
            "anchor",
            |e| {
                e.array(0).unwrap();
            },
            "links[].anchor: expected text string",
        ),
        (
            "di",
            |e| {
                e.u8(1).unwrap();
            },
            "links[].di: expected text string",
        ),
        (
            "ins",
            |e| {
                e.str("1").unwrap();
            },
            "links[].ins: expected integer",
        ),
        (
            "title",
            |e| {
                e.bool(true).unwrap();
            },
            "links[].title: expected text string",
        ),
        (
            "type",
            |e| {
                e.str("x").unwrap();
            },
            "links[].type: expected array",
        ),
    ];
    for (key, value, text) in in_link {
        let err = publish_with(|e| {
            e.map(3).unwrap();
            e.str("di").unwrap().str("d").unwrap();
            e.str("ttl").unwrap().u8(0).unwrap();
            e.str("links").unwrap().array(1).unwrap();
            e.map(2).unwrap();
            e.str("href").unwrap().str("/a").unwrap();
            e.str(key).unwrap();
            value(e);
        })
        .unwrap_err();
        assert_eq!(err.to_string(), text, "{key}");
    }

    // A link that is not a map, and an id of the wrong type.
    let err = publish_with(|e| {
        e.map(2).unwrap();
        e.str("di").unwrap().str("d").unwrap();
        e.str("links").unwrap().array(1).unwrap().str("/a").unwrap();
    })
    .unwrap_err();
    assert_eq!(err.to_string(), "links[]: expected map");
    let err = publish_with(|e| {
        e.map(2).unwrap();
        e.str("ttl").unwrap().u8(0).unwrap();
        e.str("links").unwrap().array(1).unwrap();
        e.map(1).unwrap().str("id").unwrap().u8(0).unwrap();
    })
    .unwrap_err();
    assert_eq!(err.to_string(), "links[].id: expected text string");
    // Type errors win over validation errors (no di here).
    assert!(matches!(err, PublishError::Body(_)));
}

#[test]
fn case_insensitive_keys() {
    let request = publish_with(|e| {
        e.map(3).unwrap();
        e.str("DI").unwrap().str("d").unwrap();
        e.str("TTL").unwrap().u8(9).unwrap();
        e.str("Links").unwrap().array(1).unwrap();
        e.map(2).unwrap();
        e.str("HREF").unwrap().str("/a").unwrap();
        e.str("P").unwrap().map(1).unwrap();
        e.str("BM").unwrap().u8(1).unwrap();
    })
    .unwrap();
    assert_eq!(request.ttl, 9);
    assert_eq!(request.links[0].href, "/a");
    assert_eq!(request.links[0].policy.map(|p| p.bit_mask), Some(1));
}

#[test]
fn href_normalisation() {
    for (raw, normal) in [
        ("/a/b", "/a/b"),
        ("/", "/"),
        ("", "/"),
        ("a", "/a"),
        ("a/", "/a"),
        ("//a///b//", "/a/b"),
        ("/light/1/", "/light/1"),
    ] {
        assert_eq!(normalize_href(raw), normal, "{raw:?}");
    }
    assert!(matches!(normalize_href("/oic/d"), Cow::Borrowed(_)));
}

/// spec §14 item 7: the normalised href is hashed.
#[test]
fn ins_is_the_crc_of_the_normalised_href() {
    let request = publish_with(|e| {
        e.map(3).unwrap();
        e.str("di").unwrap().str("d").unwrap();
        e.str("ttl").unwrap().u8(0).unwrap();
        one_link(e, "//light/");
    })
    .unwrap();
    assert_eq!(request.links[0].href, "/light");
    assert_eq!(request.links[0].instance_id, instance_id("/light"));
    assert_ne!(request.links[0].instance_id, instance_id("//light/"));
}

fn unpublish(options: &[&'static str]) -> Result<UnpublishQuery<'static>, UnpublishError> {
    UnpublishQuery::parse(options.iter().map(|o| o.as_bytes()))
}

/// Checklist item 42 (the query part; the device and back-end checks are
/// the handler's).
#[test]
fn checklist_42_unpublish_queries() {
    let q = unpublish(&["di=c&ins=5"]).unwrap();
    assert_eq!(
        (q.device_id.as_ref(), q.instance_ids.as_slice()),
        ("c", &[5][..])
    );
    assert_eq!(unpublish(&["ins=4"]), Err(UnpublishError::MissingDeviceId));
    assert_eq!(
        unpublish(&["ins=4"]).unwrap_err().to_string(),
        "deviceID not found"
    );
    let q = unpublish(&["di=D"]).unwrap();
    assert!(q.instance_ids.is_empty(), "no ins means all links");
    assert_eq!(
        unpublish(&["di=D", "di=D"]),
        Err(UnpublishError::DuplicateDeviceId)
    );
    assert_eq!(
        unpublish(&["di=D&ins=x"]).unwrap_err().to_string(),
        r#"cannot convert "x" to number"#
    );
    assert!(unpublish(&["di=D&ins="]).is_err());
    assert!(unpublish(&["di=D&ins=99999999999999999999"]).is_err());
    assert!(matches!(
        unpublish(&["di=%"]),
        Err(UnpublishError::Query(_))
    ));
    assert_eq!(unpublish(&[]), Err(UnpublishError::MissingDeviceId));
}

#[test]
fn unpublish_packed_or_split_options() {
    // `%2B` is a sign (Go's Atoi takes one); a bare `+` would be a space.
    let packed = unpublish(&["di=D&ins=2761263951&ins=-3&ins=%2B4"]).unwrap();
    let split = unpublish(&["di=D&ins=2761263951", "ins=-3", "ins=%2B4"]).unwrap();
    assert_eq!(packed, split);
    assert_eq!(packed.instance_ids, [2761263951, -3, 4]);
    assert!(unpublish(&["di=D&ins=+4"]).is_err());
    // An empty di does not make a later one a duplicate (the reference).
    assert_eq!(unpublish(&["di=&di=x"]).unwrap().device_id, "x");
}

/// Checklist item 43.
#[test]
fn checklist_43_selector() {
    let mut out = Vec::new();
    SelectorResponse
        .encode(ContentFormat::OcfCbor, &mut out)
        .unwrap();
    assert_eq!(out, [0xa1, 0x63, b's', b'e', b'l', 0x00]);
    out.clear();
    SelectorResponse
        .encode(ContentFormat::Json, &mut out)
        .unwrap();
    assert_eq!(out, br#"{"sel":0}"#);
}
