//! `/oic/rd`, the resource directory: publish (`POST`, spec §5.7), unpublish
//! (`DELETE`, §5.8) and the selector (`GET`, §5.8). Also the resource link
//! type that discovery (§5.9, [`super::res`]) encodes.
//!
//! Publish decodes the body into typed links and applies the §5.7
//! normalisation (ttl/lt mirrored, each link's `di` := the top-level `di`,
//! href normalised, `ins` := CRC-32 of the href). The links are not
//! forwarded as sent: only the keys §5.7 lists survive (`rel`, for one, is
//! dropped), so no raw CBOR is kept. The same normalised request is the 2.04
//! echo body.
//!
//! What it does not do: check the published `di` against the signed-in
//! device (spec §14 item 2: the handler decides), compute `valid_until`
//! (that needs a clock), talk to the back end.

use std::borrow::Cow;

use serde::Serialize;

use super::cbor::{self, BodyError, Fields, Key};
use super::query::{self, QueryError};
use super::{ContentFormat, EncodeError};

/// One resource link (OCF link schema, spec §5.7): the keys the gateway
/// understands. Optional keys are `None` when the device did not send them
/// and are then left out of the echo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Link<'a> {
    /// Normalised (see [`normalize_href`]).
    pub href: Cow<'a, str>,
    #[serde(rename = "rt", skip_serializing_if = "Option::is_none")]
    pub resource_types: Option<Vec<&'a str>>,
    #[serde(rename = "if", skip_serializing_if = "Option::is_none")]
    pub interfaces: Option<Vec<&'a str>>,
    #[serde(rename = "p", skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    #[serde(rename = "eps", skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<Endpoint<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anchor: Option<Cow<'a, str>>,
    /// `di`: always the top-level `di` of the publish (§5.7).
    #[serde(rename = "di")]
    pub device_id: &'a str,
    /// `ins`: always computed by [`instance_id`] (§5.7).
    #[serde(rename = "ins")]
    pub instance_id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<&'a str>,
    /// `type`: the supported content types.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub content_types: Option<Vec<&'a str>>,
    /// `id`: understood and type-checked, but neither echoed (the §5.7 echo
    /// list has no `id`) nor served by discovery (§5.9 removes it).
    #[serde(skip)]
    pub id: Option<&'a str>,
}

/// The link policy `p` (OCF Core: `bm` bit 0 discoverable, bit 1
/// observable; Appendix A item 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Policy {
    /// `bm`; `0` when absent (the reference's zero value). A `u8`, as in the
    /// reference's schema: a larger value is out of range.
    #[serde(rename = "bm")]
    pub bit_mask: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(rename = "x.org.iotivity.tcp", skip_serializing_if = "Option::is_none")]
    pub tcp_port: Option<u16>,
    #[serde(rename = "x.org.iotivity.tls", skip_serializing_if = "Option::is_none")]
    pub tls_port: Option<u16>,
    #[serde(rename = "sec", skip_serializing_if = "Option::is_none")]
    pub secured: Option<bool>,
}

impl Policy {
    /// `bm` bit 1 (spec §6.3 uses it to pick the observation mode).
    pub fn observable(&self) -> bool {
        self.bit_mask & 0x02 != 0
    }
}

/// One entry of `eps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Endpoint<'a> {
    /// `ep`, e.g. `coaps+tcp://192.0.2.1:5684`; `""` when absent.
    #[serde(rename = "ep")]
    pub uri: &'a str,
    /// `pri`: lower is preferred.
    #[serde(rename = "pri", skip_serializing_if = "Option::is_none")]
    pub priority: Option<u64>,
}

/// spec §5.7: runs of `/` collapsed to one, trailing `/` removed, leading
/// `/` ensured; the empty href becomes `/`. Borrows when already canonical.
pub fn normalize_href(href: &str) -> Cow<'_, str> {
    let canonical =
        href.starts_with('/') && !href.contains("//") && (href.len() == 1 || !href.ends_with('/'));
    if canonical {
        return Cow::Borrowed(href);
    }
    let mut out = String::with_capacity(href.len() + 1);
    for segment in href.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// `ins`: the CRC-32 (IEEE) of `href`, as a non-negative integer (§5.7).
///
/// spec §14 item 7: the reference hashes the raw, un-normalised href while
/// the hub keys resources (and this gateway's unpublish and §6.4
/// reconciliation) on the normalised one. Publish here hashes the
/// **normalised** href, so the `ins` a device stores is the one unpublish
/// can find. For canonical hrefs (all IoTivity-Lite sends) both agree.
pub fn instance_id(href: &str) -> i64 {
    i64::from(crc32fast::hash(href.as_bytes()))
}

/// The body of `POST /oic/rd`, normalised per spec §5.7.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRequest<'a> {
    /// `di`, non-empty. Not checked against the signed-in device here (§14
    /// item 2).
    pub device_id: &'a str,
    /// Non-empty.
    pub links: Vec<Link<'a>>,
    /// `ttl` (or the legacy `lt`) in seconds, `0` = no expiry. Echoed as
    /// both `ttl` and `lt`.
    pub ttl: u64,
}

/// Why a publish body was refused (spec §5.7, checklist item 40: all 4.00).
/// The texts are the reference's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// Also "`links` not an array" and any other type error.
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("invalid DeviceId")]
    InvalidDeviceId,
    #[error("empty links")]
    EmptyLinks,
    /// Neither `ttl` nor `lt` is present and non-negative.
    #[error("invalid TimeToLive")]
    InvalidTimeToLive,
    /// A link whose normalised href is `/` (the back end's rule, §5.7).
    #[error("invalid resource href")]
    InvalidHref,
}

const LINK_KEYS: [&str; 11] = [
    "href", "rt", "if", "p", "eps", "anchor", "di", "ins", "title", "type", "id",
];
const POLICY_KEYS: [&str; 5] = [
    "bm",
    "port",
    "x.org.iotivity.tcp",
    "x.org.iotivity.tls",
    "sec",
];

impl<'a> PublishRequest<'a> {
    /// Decodes and normalises a publish body. Type errors anywhere come
    /// first (the reference decodes the whole body before checking), then
    /// `di`, `links`, the ttl and the hrefs, in the reference's order.
    pub fn decode(payload: &'a [u8]) -> Result<PublishRequest<'a>, PublishError> {
        let f = Fields::body(payload, ["di", "links", "ttl", "lt"])?;
        let device_id = f.text_or_empty("di")?;
        let mut links = Vec::new();
        // `links: null` is absent, hence "empty links" below.
        if let Some(items) = f.array("links")? {
            for item in items {
                links.push(decode_link(&mut item?, device_id)?);
            }
        }
        let ttl = f.int("ttl")?;
        let lt = f.int("lt")?;
        if device_id.is_empty() {
            return Err(PublishError::InvalidDeviceId);
        }
        if links.is_empty() {
            return Err(PublishError::EmptyLinks);
        }
        // §5.7: whichever of ttl/lt is present and ≥ 0 fills both, `ttl`
        // first (the reference mirrors `lt` into `ttl` only when `ttl` < 0).
        let non_negative = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
        let ttl = non_negative(ttl)
            .or(non_negative(lt))
            .ok_or(PublishError::InvalidTimeToLive)?;
        if links.iter().any(|link| link.href == "/") {
            return Err(PublishError::InvalidHref);
        }
        Ok(PublishRequest {
            device_id,
            links,
            ttl,
        })
    }

    /// Appends the 2.04 echo body (§5.7): `di`, `links`, `ttl`, `lt`.
    pub fn encode(&self, format: ContentFormat, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match format {
            ContentFormat::Json => {
                #[derive(Serialize)]
                struct Echo<'r, 'a> {
                    di: &'a str,
                    links: &'r [Link<'a>],
                    ttl: u64,
                    lt: u64,
                }
                cbor::json(
                    &Echo {
                        di: self.device_id,
                        links: &self.links,
                        ttl: self.ttl,
                        lt: self.ttl,
                    },
                    out,
                )
            }
            ContentFormat::Cbor | ContentFormat::OcfCbor => {
                let mut e = cbor::Encoder::new(out);
                e.map(4)
                    .and_then(|e| e.str("di")?.str(self.device_id)?.str("links"))
                    .and_then(|e| encode_links(e, &self.links))
                    .and_then(|e| e.str("ttl")?.u64(self.ttl)?.str("lt")?.u64(self.ttl))
                    .map_err(cbor::encode_error)?;
                Ok(())
            }
        }
    }
}

fn decode_link<'a>(
    d: &mut minicbor::Decoder<'a>,
    device_id: &'a str,
) -> Result<Link<'a>, BodyError> {
    let f = Fields::walk(d, key("", "links[]"), "links[]", LINK_KEYS)?;
    // Overwritten below (§5.7), but a wrong type is still an error: the
    // reference decodes them into typed fields.
    f.text("di")?;
    f.int("ins")?;
    let policy = match f.map("p", "links[].p", POLICY_KEYS)? {
        Some(p) => Some(Policy {
            bit_mask: p.uint("bm")?.unwrap_or(0),
            port: p.uint("port")?,
            tcp_port: p.uint("x.org.iotivity.tcp")?,
            tls_port: p.uint("x.org.iotivity.tls")?,
            secured: p.bool("sec")?,
        }),
        None => None,
    };
    let endpoints = match f.array("eps")? {
        Some(items) => {
            let mut endpoints = Vec::new();
            for item in items {
                let ep = Fields::walk(
                    &mut item?,
                    key("links[]", "eps[]"),
                    "links[].eps[]",
                    ["ep", "pri"],
                )?;
                endpoints.push(Endpoint {
                    uri: ep.text_or_empty("ep")?,
                    priority: ep.uint("pri")?,
                });
            }
            Some(endpoints)
        }
        None => None,
    };
    // An absent href is the empty href, which normalises to `/` and is
    // refused as the back end would (§5.7).
    let href = normalize_href(f.text_or_empty("href")?);
    Ok(Link {
        instance_id: instance_id(&href),
        href,
        resource_types: f.text_array("rt")?,
        interfaces: f.text_array("if")?,
        policy,
        endpoints,
        anchor: f.text("anchor")?.map(Cow::Borrowed),
        device_id,
        title: f.text("title")?,
        content_types: f.text_array("type")?,
        id: f.text("id")?,
    })
}

/// The links of a device's `GET /oic/res?if=oic.if.ll` answer (spec §6.3):
/// a CBOR array of link maps, decoded as publish decodes its links (hrefs
/// normalised, `ins` computed). `di` is left empty: the device's answer
/// names itself in `anchor`, not per link.
pub fn decode_link_list(payload: &[u8]) -> Result<Vec<Link<'_>>, BodyError> {
    if payload.is_empty() {
        return Err(BodyError::Empty);
    }
    let mut d = minicbor::Decoder::new(payload);
    let mut links = Vec::new();
    for item in cbor::Items::new(&mut d, cbor::BODY)? {
        links.push(decode_link(&mut item?, "")?);
    }
    Ok(links)
}

fn key(context: &'static str, name: &'static str) -> Key {
    Key { context, name }
}

type EncodeResult<'e, 'w> =
    Result<&'e mut cbor::Encoder<'w>, minicbor::encode::Error<std::convert::Infallible>>;

/// A CBOR array of links, each as [`encode_link`] writes it.
pub(crate) fn encode_links<'e, 'w>(
    e: &'e mut cbor::Encoder<'w>,
    links: &[Link<'_>],
) -> EncodeResult<'e, 'w> {
    e.array(cbor::map_len(links.len()))?;
    for link in links {
        encode_link(e, link)?;
    }
    Ok(e)
}

/// One link as a definite-length CBOR map, keys in the order of the
/// reference's schema (and of [`Link`]'s JSON form).
pub(crate) fn encode_link<'e, 'w>(
    e: &'e mut cbor::Encoder<'w>,
    link: &Link<'_>,
) -> EncodeResult<'e, 'w> {
    let optional = [
        link.resource_types.is_some(),
        link.interfaces.is_some(),
        link.policy.is_some(),
        link.endpoints.is_some(),
        link.anchor.is_some(),
        link.title.is_some(),
        link.content_types.is_some(),
    ];
    let present = 3 + optional.iter().filter(|p| **p).count();
    e.map(cbor::map_len(present))?;
    e.str("href")?.str(&link.href)?;
    if let Some(rt) = &link.resource_types {
        text_array(e.str("rt")?, rt)?;
    }
    if let Some(interfaces) = &link.interfaces {
        text_array(e.str("if")?, interfaces)?;
    }
    if let Some(p) = &link.policy {
        let present = 1 + [
            p.port.is_some(),
            p.tcp_port.is_some(),
            p.tls_port.is_some(),
            p.secured.is_some(),
        ]
        .iter()
        .filter(|p| **p)
        .count();
        e.str("p")?.map(cbor::map_len(present))?;
        e.str("bm")?.u8(p.bit_mask)?;
        if let Some(port) = p.port {
            e.str("port")?.u16(port)?;
        }
        if let Some(port) = p.tcp_port {
            e.str("x.org.iotivity.tcp")?.u16(port)?;
        }
        if let Some(port) = p.tls_port {
            e.str("x.org.iotivity.tls")?.u16(port)?;
        }
        if let Some(sec) = p.secured {
            e.str("sec")?.bool(sec)?;
        }
    }
    if let Some(eps) = &link.endpoints {
        e.str("eps")?.array(cbor::map_len(eps.len()))?;
        for ep in eps {
            e.map(if ep.priority.is_some() { 2 } else { 1 })?;
            e.str("ep")?.str(ep.uri)?;
            if let Some(pri) = ep.priority {
                e.str("pri")?.u64(pri)?;
            }
        }
    }
    if let Some(anchor) = &link.anchor {
        e.str("anchor")?.str(anchor)?;
    }
    e.str("di")?.str(link.device_id)?;
    e.str("ins")?.i64(link.instance_id)?;
    if let Some(title) = link.title {
        e.str("title")?.str(title)?;
    }
    if let Some(types) = &link.content_types {
        text_array(e.str("type")?, types)?;
    }
    Ok(e)
}

fn text_array<'e, 'w>(e: &'e mut cbor::Encoder<'w>, items: &[&str]) -> EncodeResult<'e, 'w> {
    e.array(cbor::map_len(items.len()))?;
    for item in items {
        e.str(item)?;
    }
    Ok(e)
}

/// The Uri-Query of `DELETE /oic/rd` (spec §5.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpublishQuery<'a> {
    /// `di`, given exactly once and non-empty. The handler compares it with
    /// the signed-in device (≠ → 4.00).
    pub device_id: Cow<'a, str>,
    /// Every `ins`, in order; empty means "all links of the device".
    pub instance_ids: Vec<i64>,
}

/// Why an unpublish query was refused (spec §5.8: all 4.00).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnpublishError {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error("duplicate in parameter di")]
    DuplicateDeviceId,
    /// The reference's wording (Go `strconv.Atoi` failed).
    #[error("cannot convert {0:?} to number")]
    InvalidInstanceId(String),
    /// The reference's wording.
    #[error("deviceID not found")]
    MissingDeviceId,
}

impl<'a> UnpublishQuery<'a> {
    /// Parses every Uri-Query option (IoTivity-Lite packs
    /// `di=…&ins=…&ins=…` into one string that may arrive split over
    /// several options; both forms work). As in the reference, an empty
    /// `di` value does not count as the first one of a duplicate, and `ins`
    /// is a decimal `i64` with an optional sign.
    pub fn parse<I>(queries: I) -> Result<UnpublishQuery<'a>, UnpublishError>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let mut device_id = Cow::Borrowed("");
        let mut instance_ids = Vec::new();
        for option in queries {
            for (key, value) in query::pairs(option)? {
                match key.as_ref() {
                    "di" => {
                        if !device_id.is_empty() {
                            return Err(UnpublishError::DuplicateDeviceId);
                        }
                        device_id = value;
                    }
                    "ins" => {
                        let ins = value
                            .parse::<i64>()
                            .map_err(|_| UnpublishError::InvalidInstanceId(value.into_owned()))?;
                        instance_ids.push(ins);
                    }
                    _ => {}
                }
            }
        }
        if device_id.is_empty() {
            return Err(UnpublishError::MissingDeviceId);
        }
        Ok(UnpublishQuery {
            device_id,
            instance_ids,
        })
    }
}

/// The 2.05 body of `GET /oic/rd` (spec §5.8): always `{"sel": 0}`, which
/// tells the device to prefer the cloud resource directory. IoTivity-Lite
/// uses this request as its UDP keepalive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SelectorResponse;

impl SelectorResponse {
    /// Appends the body in the Accept format.
    pub fn encode(&self, format: ContentFormat, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match format {
            ContentFormat::Json => {
                out.extend_from_slice(br#"{"sel":0}"#);
                Ok(())
            }
            ContentFormat::Cbor | ContentFormat::OcfCbor => {
                let mut e = cbor::Encoder::new(out);
                e.map(1)
                    .and_then(|e| e.str("sel")?.u8(0))
                    .map_err(cbor::encode_error)?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests;
