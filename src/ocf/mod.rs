//! OCF cloud messages exchanged with devices (spec §5), as sans-IO decoders
//! and encoders: each request body or Uri-Query becomes a typed value that
//! borrows from the received message, or a typed error whose `Display` is
//! the diagnostic text of the 4.xx answer; each response body is appended
//! to a caller-owned buffer in the format Accept asked for.
//!
//! | resource | module |
//! |---|---|
//! | `/oic/sec/account` (sign-up, sign-off) | [`account`] |
//! | `/oic/sec/session` (sign-in, sign-out) | [`session`] |
//! | `/oic/sec/tokenrefresh` | [`tokenrefresh`] |
//! | `/oic/rd` (publish, unpublish, selector) | [`rd`] |
//! | `/oic/res` (cloud discovery) | [`res`] |
//! | `/x.plgd.dev/time` | [`time`] |
//!
//! [`cbor`] walks CBOR maps the spec §5.0 way; [`query`] parses Uri-Query
//! options as URL-encoded forms.
//!
//! What it does not do: choose response codes, validate tokens, talk to
//! the back end, or read a clock (`expiresin` and times are arguments).

pub mod account;
pub mod cbor;
pub mod query;
pub mod rd;
pub mod res;
pub mod session;
pub mod time;
pub mod tokenrefresh;

/// The response formats a device may ask for with Accept (spec §5.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentFormat {
    /// 50 `application/json`.
    Json,
    /// 60 `application/cbor`.
    Cbor,
    /// 10000 `application/vnd.ocf+cbor`.
    OcfCbor,
}

impl ContentFormat {
    /// spec §5.0: no Accept → 10000; 50 → JSON; 60 or 10000 → CBOR; anything
    /// else is an encoding error (`None`).
    pub fn from_accept(accept: Option<u16>) -> Option<ContentFormat> {
        match accept {
            None | Some(10000) => Some(ContentFormat::OcfCbor),
            Some(60) => Some(ContentFormat::Cbor),
            Some(50) => Some(ContentFormat::Json),
            Some(_) => None,
        }
    }

    /// The CoAP Content-Format number (RFC 7252 §12.3, OCF 10000).
    pub fn number(self) -> u16 {
        match self {
            ContentFormat::Json => 50,
            ContentFormat::Cbor => 60,
            ContentFormat::OcfCbor => 10000,
        }
    }
}

/// A body could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode body: {0}")]
pub struct EncodeError(pub String);

#[cfg(test)]
mod garbage {
    //! Whatever a device sends, every decoder answers and none panics; what
    //! decodes also encodes, in every format.

    use super::*;
    use proptest::prelude::*;

    /// Everything the gateway does with a body or a query from a device.
    fn exercise(bytes: &[u8]) {
        if let Ok(r) = account::SignUpRequest::decode(bytes) {
            let response = account::SignUpResponse {
                access_token: r.authorization_code,
                user_id: r.device_id,
                refresh_token: r.authorization_provider,
                expires_in: -1,
                redirect_uri: "",
            };
            for format in FORMATS {
                response.encode(format, &mut Vec::new()).unwrap();
            }
        }
        if let Ok(r) = session::SessionRequest::decode(bytes) {
            let _ = r.credentials.check();
        }
        if let Ok(r) = tokenrefresh::TokenRefreshRequest::decode(bytes) {
            let response = tokenrefresh::TokenRefreshResponse {
                access_token: r.refresh_token,
                refresh_token: r.user_id,
                expires_in: 0,
            };
            for format in FORMATS {
                response.encode(format, &mut Vec::new()).unwrap();
            }
        }
        if let Ok(r) = rd::PublishRequest::decode(bytes) {
            echo_round_trip(&r);
            let devices = [res::DeviceLinks {
                device_id: r.device_id,
                links: &r.links,
            }];
            let response = res::DiscoveryResponse {
                devices: &devices,
                endpoint: "coaps+tcp://gw:5684",
            };
            for format in FORMATS {
                response.encode(format, &mut Vec::new()).unwrap();
            }
        }
        // The same bytes as Uri-Query options, split where a 0x00 is.
        let options = || bytes.split(|b| *b == 0);
        let _ = account::SignOffQuery::parse(options());
        let _ = rd::UnpublishQuery::parse(options());
        let _ = res::DiscoveryQuery::parse(options());
        if let Ok(pairs) = query::pairs(bytes) {
            // A checked option yields at most one pair per `&`-segment.
            assert!(pairs.count() <= bytes.split(|b| *b == b'&').count());
        }
    }

    const FORMATS: [ContentFormat; 3] = [
        ContentFormat::Json,
        ContentFormat::Cbor,
        ContentFormat::OcfCbor,
    ];

    /// The publish echo decodes to the request it echoes (less `id`, which
    /// is not echoed): normalisation is idempotent and nothing is lost.
    fn echo_round_trip(request: &rd::PublishRequest<'_>) {
        let mut json = Vec::new();
        request.encode(ContentFormat::Json, &mut json).unwrap();
        serde_json::from_slice::<serde_json::Value>(&json).unwrap();
        let mut echo = Vec::new();
        request.encode(ContentFormat::OcfCbor, &mut echo).unwrap();
        let again = rd::PublishRequest::decode(&echo).unwrap();
        let mut expected = request.clone();
        for link in &mut expected.links {
            link.id = None;
        }
        assert_eq!(again, expected);
    }

    /// A CBOR value built from the keys the decoders know, so random input
    /// reaches past the first type check.
    #[derive(Debug, Clone)]
    enum Value {
        Int(i64),
        Uint(u64),
        Text(String),
        Bool(bool),
        Null,
        Float,
        Bytes,
        Array(Vec<Value>, bool),
        Map(Vec<(String, Value)>, bool),
    }

    const KEYS: &[&str] = &[
        "di",
        "DI",
        "uid",
        "accesstoken",
        "AccessToken",
        "authcode",
        "authprovider",
        "login",
        "refreshtoken",
        "links",
        "Links",
        "ttl",
        "lt",
        "href",
        "rt",
        "if",
        "p",
        "bm",
        "port",
        "x.org.iotivity.tcp",
        "sec",
        "eps",
        "ep",
        "pri",
        "anchor",
        "ins",
        "title",
        "type",
        "id",
        "devicetype",
        "rel",
    ];

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(Value::Int),
            any::<u64>().prop_map(Value::Uint),
            prop_oneof![
                Just(String::new()),
                Just("/".to_string()),
                Just("/a//b/".to_string()),
                "[a-z/]{0,6}",
                any::<String>(),
            ]
            .prop_map(Value::Text),
            any::<bool>().prop_map(Value::Bool),
            Just(Value::Null),
            Just(Value::Float),
            Just(Value::Bytes),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                (prop::collection::vec(inner.clone(), 0..6), any::<bool>())
                    .prop_map(|(v, indef)| Value::Array(v, indef)),
                (
                    prop::collection::vec((prop::sample::select(KEYS), inner), 0..8),
                    any::<bool>()
                )
                    .prop_map(|(v, indef)| Value::Map(
                        v.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                        indef
                    )),
            ]
        })
    }

    fn write(e: &mut minicbor::Encoder<&mut Vec<u8>>, v: &Value) {
        match v {
            Value::Int(i) => {
                e.i64(*i).unwrap();
            }
            Value::Uint(u) => {
                e.u64(*u).unwrap();
            }
            Value::Text(s) => {
                e.str(s).unwrap();
            }
            Value::Bool(b) => {
                e.bool(*b).unwrap();
            }
            Value::Null => {
                e.null().unwrap();
            }
            Value::Float => {
                e.f64(0.5).unwrap();
            }
            Value::Bytes => {
                e.bytes(b"xy").unwrap();
            }
            Value::Array(items, indef) => {
                if *indef {
                    e.begin_array().unwrap();
                } else {
                    e.array(items.len() as u64).unwrap();
                }
                items.iter().for_each(|item| write(e, item));
                if *indef {
                    e.end().unwrap();
                }
            }
            Value::Map(entries, indef) => {
                if *indef {
                    e.begin_map().unwrap();
                } else {
                    e.map(entries.len() as u64).unwrap();
                }
                for (key, value) in entries {
                    e.str(key).unwrap();
                    write(e, value);
                }
                if *indef {
                    e.end().unwrap();
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            exercise(&bytes);
        }

        /// Random CBOR trees over the known keys, whole and cut short.
        #[test]
        fn random_cbor_never_panics(v in value(), cut in any::<prop::sample::Index>()) {
            let mut bytes = Vec::new();
            write(&mut minicbor::Encoder::new(&mut bytes), &v);
            exercise(&bytes);
            let cut = cut.index(bytes.len() + 1);
            exercise(&bytes[..cut]);
        }

        /// A well-formed publish with random links still round-trips.
        #[test]
        fn random_publish_round_trips(
            links in prop::collection::vec(
                (prop_oneof!["[a-z/]{0,8}", any::<String>()], any::<Option<u8>>(), any::<Option<u64>>()),
                1..6,
            ),
            ttl in any::<i64>(),
        ) {
            let mut bytes = Vec::new();
            let mut e = minicbor::Encoder::new(&mut bytes);
            e.map(3).unwrap();
            e.str("di").unwrap().str("d").unwrap();
            e.str("ttl").unwrap().i64(ttl).unwrap();
            e.str("links").unwrap().array(links.len() as u64).unwrap();
            for (href, bm, pri) in &links {
                e.map(3).unwrap();
                e.str("href").unwrap().str(href).unwrap();
                e.str("p").unwrap().map(1).unwrap().str("bm").unwrap();
                match bm {
                    Some(bm) => e.u8(*bm).unwrap(),
                    None => e.null().unwrap(),
                };
                e.str("eps").unwrap().array(1).unwrap().map(1).unwrap();
                match pri {
                    Some(pri) => e.str("pri").unwrap().u64(*pri).unwrap(),
                    None => e.str("ep").unwrap().str(href).unwrap(),
                };
            }
            exercise(&bytes);
            match rd::PublishRequest::decode(&bytes) {
                Ok(r) => {
                    prop_assert!(ttl >= 0);
                    for link in &r.links {
                        prop_assert_eq!(link.instance_id, rd::instance_id(&link.href));
                        prop_assert!(link.href.starts_with('/') && link.href.len() > 1);
                    }
                }
                Err(rd::PublishError::InvalidTimeToLive) => prop_assert!(ttl < 0),
                Err(rd::PublishError::InvalidHref) => {}
                Err(other) => prop_assert!(false, "unexpected {other}"),
            }
        }
    }
}
