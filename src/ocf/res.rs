//! `GET /oic/res`, cloud-side discovery (spec §5.9): the query filters and
//! the response, with every link rewritten to point at this gateway.
//!
//! What it does not do: fetch the owner's links (the back end filters by
//! the token's owner) or choose the 5.00 for an unsupported Accept
//! ([`ContentFormat::from_accept`] returns `None` for those).

use std::borrow::Cow;

use super::cbor;
use super::query::{self, QueryError};
use super::rd::{self, normalize_href, Endpoint, Link};
use super::{ContentFormat, EncodeError};

/// The discovery filters from Uri-Query (spec §5.9).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiscoveryQuery<'a> {
    /// Every non-empty `di=` value, in order.
    pub device_ids: Vec<Cow<'a, str>>,
    /// Every non-empty `rt=` value, in order.
    pub resource_types: Vec<Cow<'a, str>>,
}

impl<'a> DiscoveryQuery<'a> {
    /// Parses every Uri-Query option as a URL-encoded form; an error is a
    /// 4.00 (the reference's handler). Other keys (e.g. `if`) are ignored.
    ///
    /// Deliberate difference: the reference takes only the first `di` and
    /// `rt` of each option (Go `Values.Get`), so `di=a&di=b` in one option
    /// loses `b`. §5.9 says "zero or more" filters; all are kept here.
    pub fn parse<I>(queries: I) -> Result<DiscoveryQuery<'a>, QueryError>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let mut out = DiscoveryQuery::default();
        for option in queries {
            for (key, value) in query::pairs(option)? {
                let into = match key.as_ref() {
                    "di" => &mut out.device_ids,
                    "rt" => &mut out.resource_types,
                    _ => continue,
                };
                if !value.is_empty() {
                    into.push(value);
                }
            }
        }
        Ok(out)
    }
}

/// The `ep` every discovered link gets (spec §5.9): `coap`/`coaps` by TLS,
/// `+tcp`, then the configured external address (`host:port`).
pub fn gateway_endpoint(tls: bool, external_address: &str) -> String {
    let scheme = if tls { "coaps+tcp" } else { "coap+tcp" };
    format!("{scheme}://{external_address}")
}

/// One device's published links, as the back end returned them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLinks<'a> {
    pub device_id: &'a str,
    /// With their stored hrefs (not yet prefixed).
    pub links: &'a [Link<'a>],
}

/// The 2.05 body of `GET /oic/res`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscoveryResponse<'a> {
    /// In the order to serve them; empty for an unknown `di` (→ `[]`).
    pub devices: &'a [DeviceLinks<'a>],
    /// From [`gateway_endpoint`].
    pub endpoint: &'a str,
}

impl DiscoveryResponse<'_> {
    /// Appends the body (spec §5.9):
    /// * 10000: a flat array of all links;
    /// * 60: an array of `{di, links, ttl: -1, lt: -1}`, one per device;
    /// * 50: `null`. This is the reference's quirk (§14 item 5), kept: the
    ///   reference builds no JSON value for this Accept, and a client that
    ///   asks for JSON gets the same answer from both gateways.
    pub fn encode(&self, format: ContentFormat, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match format {
            ContentFormat::Json => out.extend_from_slice(b"null"),
            ContentFormat::OcfCbor => {
                let mut e = cbor::Encoder::new(out);
                let total = self.devices.iter().map(|d| d.links.len()).sum();
                e.array(cbor::map_len(total)).map_err(cbor::encode_error)?;
                for device in self.devices {
                    for link in device.links {
                        rd::encode_link(&mut e, &self.rewrite(device, link))
                            .map_err(cbor::encode_error)?;
                    }
                }
            }
            ContentFormat::Cbor => {
                let mut e = cbor::Encoder::new(out);
                e.array(cbor::map_len(self.devices.len()))
                    .map_err(cbor::encode_error)?;
                for device in self.devices {
                    let links: Vec<Link<'_>> = device
                        .links
                        .iter()
                        .map(|link| self.rewrite(device, link))
                        .collect();
                    e.map(4)
                        .and_then(|e| e.str("di")?.str(device.device_id)?.str("links"))
                        .and_then(|e| rd::encode_links(e, &links))
                        .and_then(|e| e.str("ttl")?.i8(-1)?.str("lt")?.i8(-1))
                        .map_err(cbor::encode_error)?;
                }
            }
        }
        Ok(())
    }

    /// spec §5.9: href prefixed with `/api/v1/devices/<di>` and normalised,
    /// `id` removed, `anchor` defaulted to `ocf://<di>`, `eps` replaced by
    /// this gateway. The device's `di` is taken from the group, so a link
    /// always points at the device it is listed under.
    fn rewrite<'b>(&'b self, device: &DeviceLinks<'b>, link: &'b Link<'b>) -> Link<'b> {
        let di = device.device_id;
        let prefixed = format!("/api/v1/devices/{di}/{}", link.href);
        let href = Cow::Owned(normalize_href(&prefixed).into_owned());
        let anchor = match &link.anchor {
            Some(anchor) if !anchor.is_empty() => anchor.clone(),
            _ => Cow::Owned(format!("ocf://{di}")),
        };
        Link {
            href,
            anchor: Some(anchor),
            endpoints: Some(vec![Endpoint {
                uri: self.endpoint,
                priority: Some(1),
            }]),
            device_id: di,
            id: None,
            ..link.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ocf::cbor::{Fields, Items, Key};
    use crate::ocf::rd::{instance_id, Policy};

    const KEY: Key = Key {
        context: "",
        name: "test",
    };

    fn link(href: &'static str) -> Link<'static> {
        Link {
            href: Cow::Borrowed(href),
            resource_types: Some(vec!["core.light"]),
            interfaces: Some(vec!["oic.if.rw"]),
            policy: Some(Policy {
                bit_mask: 3,
                ..Policy::default()
            }),
            endpoints: Some(vec![Endpoint {
                uri: "coap://[fe80::1]:5683",
                priority: Some(2),
            }]),
            anchor: None,
            device_id: "stale",
            instance_id: instance_id(href),
            title: None,
            content_types: None,
            id: Some("id-1"),
        }
    }

    fn query(options: &[&'static str]) -> Result<DiscoveryQuery<'static>, QueryError> {
        DiscoveryQuery::parse(options.iter().map(|o| o.as_bytes()))
    }

    #[test]
    fn filters_from_one_or_many_options() {
        let q = query(&["di=D&rt=core.light", "rt=x", "if=oic.if.ll", "di="]).unwrap();
        assert_eq!(q.device_ids, ["D"]);
        assert_eq!(q.resource_types, ["core.light", "x"]);
        let q = query(&["di=a&di=b"]).unwrap();
        assert_eq!(q.device_ids, ["a", "b"], "every di is kept");
        assert_eq!(query(&[]).unwrap(), DiscoveryQuery::default());
        assert!(query(&["rt=%z"]).is_err());
    }

    #[test]
    fn endpoint_scheme() {
        assert_eq!(
            gateway_endpoint(true, "hub.example:5684"),
            "coaps+tcp://hub.example:5684"
        );
        assert_eq!(gateway_endpoint(false, "h:1"), "coap+tcp://h:1");
    }

    fn expected_link_bytes(di: &str, href: &str, ins: i64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = minicbor::Encoder::new(&mut out);
        e.map(8).unwrap();
        e.str("href").unwrap().str(href).unwrap();
        e.str("rt")
            .unwrap()
            .array(1)
            .unwrap()
            .str("core.light")
            .unwrap();
        e.str("if")
            .unwrap()
            .array(1)
            .unwrap()
            .str("oic.if.rw")
            .unwrap();
        e.str("p")
            .unwrap()
            .map(1)
            .unwrap()
            .str("bm")
            .unwrap()
            .u8(3)
            .unwrap();
        e.str("eps").unwrap().array(1).unwrap().map(2).unwrap();
        e.str("ep").unwrap().str("coaps+tcp://gw:5684").unwrap();
        e.str("pri").unwrap().u8(1).unwrap();
        e.str("anchor")
            .unwrap()
            .str(&format!("ocf://{di}"))
            .unwrap();
        e.str("di").unwrap().str(di).unwrap();
        e.str("ins").unwrap().i64(ins).unwrap();
        out
    }

    /// Checklist item 44: prefixed hrefs, one `eps` with `pri: 1`, the flat
    /// array for 10000.
    #[test]
    fn checklist_44_flat_array_for_ocf_cbor() {
        let light = [link("/light/1")];
        let devices = [DeviceLinks {
            device_id: "D",
            links: &light,
        }];
        let response = DiscoveryResponse {
            devices: &devices,
            endpoint: "coaps+tcp://gw:5684",
        };
        let mut out = Vec::new();
        response.encode(ContentFormat::OcfCbor, &mut out).unwrap();
        let mut expected = vec![0x81];
        expected.extend(expected_link_bytes(
            "D",
            "/api/v1/devices/D/light/1",
            instance_id("/light/1"),
        ));
        assert_eq!(out, expected);
    }

    #[test]
    fn grouped_array_for_cbor_60() {
        let a = [link("/a"), link("b/")];
        let b = [link("/c")];
        let devices = [
            DeviceLinks {
                device_id: "A",
                links: &a,
            },
            DeviceLinks {
                device_id: "B",
                links: &b,
            },
        ];
        let response = DiscoveryResponse {
            devices: &devices,
            endpoint: "coaps+tcp://gw:5684",
        };
        let mut out = Vec::new();
        response.encode(ContentFormat::Cbor, &mut out).unwrap();

        let mut d = minicbor::Decoder::new(&out);
        let groups: Vec<_> = Items::new(&mut d, KEY).unwrap().collect();
        assert_eq!(groups.len(), 2);
        let mut first = groups[0].clone().unwrap();
        let f = Fields::walk(&mut first, KEY, "", ["di", "links", "ttl", "lt"]).unwrap();
        assert_eq!(f.text("di").unwrap(), Some("A"));
        assert_eq!(f.int("ttl").unwrap(), Some(-1));
        assert_eq!(f.int("lt").unwrap(), Some(-1));
        let hrefs: Vec<_> = f
            .array("links")
            .unwrap()
            .unwrap()
            .map(|item| {
                let link =
                    Fields::walk(&mut item.unwrap(), KEY, "", ["href", "id", "anchor"]).unwrap();
                assert_eq!(link.text("id").unwrap(), None, "id removed");
                assert_eq!(link.text("anchor").unwrap(), Some("ocf://A"));
                link.text("href").unwrap().unwrap()
            })
            .collect();
        assert_eq!(hrefs, ["/api/v1/devices/A/a", "/api/v1/devices/A/b"]);
    }

    #[test]
    fn anchor_kept_when_given() {
        let mut with_anchor = link("/a");
        with_anchor.anchor = Some(Cow::Borrowed("ocf://other"));
        let links = [with_anchor];
        let devices = [DeviceLinks {
            device_id: "D",
            links: &links,
        }];
        let response = DiscoveryResponse {
            devices: &devices,
            endpoint: "e",
        };
        let rewritten = response.rewrite(&devices[0], &links[0]);
        assert_eq!(rewritten.anchor.as_deref(), Some("ocf://other"));
        assert_eq!(rewritten.device_id, "D");
    }

    /// Checklist item 44 (unknown `di` → empty array) and §14 item 5.
    #[test]
    fn empty_and_json() {
        let response = DiscoveryResponse {
            devices: &[],
            endpoint: "e",
        };
        for (format, bytes) in [
            (ContentFormat::OcfCbor, &[0x80][..]),
            (ContentFormat::Cbor, &[0x80][..]),
            (ContentFormat::Json, &b"null"[..]),
        ] {
            let mut out = Vec::new();
            response.encode(format, &mut out).unwrap();
            assert_eq!(out, bytes, "{format:?}");
        }
        let links = [link("/a")];
        let devices = [DeviceLinks {
            device_id: "D",
            links: &links,
        }];
        let mut out = Vec::new();
        DiscoveryResponse {
            devices: &devices,
            endpoint: "e",
        }
        .encode(ContentFormat::Json, &mut out)
        .unwrap();
        assert_eq!(out, b"null", "the quirk holds with links too");
    }
}
