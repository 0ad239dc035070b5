//! The device twin (spec §6): after a sign-in that opens a session, and
//! when the hub turns the twin on or forces a resync, the session reads the
//! device's link list (§6.3), removes hub links the device no longer has
//! (§6.4), then observes either `/oic/res` in batch (§6.5) or each
//! published resource (§6.6), and forwards what the device reports to the
//! hub (§6.7) as raw bytes with their Content-Format.
//!
//! What it does not do: keep resource values (the hub does), decode
//! representations beyond `rt`, or retry: a failed observation closes the
//! connection so that the device reconnects and resyncs (spec §6.6, §6.7).

use minicbor::data::Type;
use minicbor::Decoder;

use super::ocf_handlers::unix;
use super::requests::{etag_fits, is_registered, Request};
use super::*;
use crate::hub::{Operation, ResourceChange, StoredLink, TwinState};
use crate::ocf::cbor::{self, BodyError, Fields, Items, Key};
use crate::ocf::rd::{decode_link_list, instance_id, normalize_href};

/// The device's discovery resource, observed in batch mode (spec §6.5).
pub(super) const BATCH_HREF: &str = "/oic/res";
/// spec §6.6, §7.2: the hub's virtual status resource, never asked of the
/// device.
pub(super) const STATUS_HREF: &str = "/plgd/s";
/// spec §6.5 step 2: `deviceTwin.maxETagsCountInRequest` (default 8).
const MAX_ETAGS: usize = 8;

/// spec §6.3: how the twin is observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// One observation of `/oic/res?if=oic.if.b` (spec §6.5).
    Batch,
    /// One observation (or read) per published resource (spec §6.6).
    PerResource,
}

/// One resource observed or read in per-resource mode (spec §6.6).
#[derive(Debug)]
struct Tracked {
    href: Box<str>,
    /// `rt` of the published link (spec §6.7, when the payload has none).
    resource_types: Vec<String>,
    /// The observation's token once the device accepted it.
    token: Option<[u8; 8]>,
    /// Whether a first result arrived (spec §6.6: IN_SYNC when all did).
    delivered: bool,
}

/// The twin synchronisation of a signed-in session; boxed and present
/// only while the twin is kept (spec §6.2).
#[derive(Debug)]
pub(super) struct Twin {
    /// A forced resync sends no ETags (spec §6.5 step 2).
    force: bool,
    /// `None` while the link list is being read (spec §6.3).
    mode: Option<Mode>,
    in_sync: bool,
    /// The batch observation's token, once registered (spec §6.5).
    batch: Option<[u8; 8]>,
    tracked: Vec<Tracked>,
}

impl Twin {
    #[cfg(test)]
    pub(super) fn mode(&self) -> Option<Mode> {
        self.mode
    }

    pub(super) fn is_in_sync(&self) -> bool {
        self.in_sync
    }
}

/// The href of a batch element (spec §6.5 step 4): the part after the
/// device ID of `ocf://<di>/<path>`, or a plain `/path`.
fn element_href(href: &str) -> String {
    let path = match href.strip_prefix("ocf://") {
        Some(rest) => rest.find('/').map_or("/", |at| &rest[at..]),
        None => href,
    };
    normalize_href(path).into_owned()
}

/// spec §6.5 step 6: IoTivity-Lite encodes `{}` as the 2 bytes `BF FF`.
fn is_empty_rep(rep: &[u8]) -> bool {
    if rep.len() != 2 {
        return false;
    }
    let mut d = Decoder::new(rep);
    match d.map() {
        Ok(Some(0)) => true,
        Ok(None) => d.datatype().is_ok_and(|t| t == Type::Break),
        _ => false,
    }
}

/// `rt` of a representation, when it is a map that has one (spec §6.5
/// step 5, §6.7).
fn rep_resource_types(rep: &[u8]) -> Vec<String> {
    if rep.is_empty() {
        return Vec::new();
    }
    Fields::walk(&mut Decoder::new(rep), cbor::BODY, "rep", ["rt"])
        .and_then(|f| f.text_array("rt"))
        .ok()
        .flatten()
        .map(|rt| rt.into_iter().map(str::to_owned).collect())
        .unwrap_or_default()
}

const ELEMENT: Key = Key {
    context: "",
    name: "[]",
};

/// spec §6.5 steps 4–7: the records of one batch notification, in the
/// order the hub applies them.
fn batch_changes(
    msg: &MessageRef<'_>,
    format: u16,
    sequence: u64,
) -> Result<Vec<ResourceChange>, BodyError> {
    let mut d = Decoder::new(msg.payload);
    let mut changes = Vec::new();
    for item in Items::new(&mut d, cbor::BODY)? {
        let f = Fields::walk(&mut item?, ELEMENT, "[]", ["href", "etag", "rep", "rt"])?;
        let href = element_href(f.text_or_empty("href")?);
        let etag = match f.value("etag") {
            Some(mut v) => match v.datatype().map_err(|_| BodyError::Malformed)? {
                Type::Bytes => Some(v.bytes().map_err(|_| BodyError::Malformed)?.to_vec()),
                Type::Null | Type::Undefined => None,
                _ => {
                    return Err(BodyError::WrongType {
                        key: Key {
                            context: "[]",
                            name: "etag",
                        },
                        expected: "bytes",
                    })
                }
            },
            None => None,
        };
        let rep: &[u8] = match f.value("rep") {
            Some(mut v) => {
                let start = v.position();
                v.skip().map_err(|_| BodyError::Malformed)?;
                v.input().get(start..v.position()).unwrap_or_default()
            }
            None => &[],
        };
        let resource_types = match f.text_array("rt")? {
            Some(rt) => rt.into_iter().map(str::to_owned).collect(),
            None => rep_resource_types(rep),
        };
        if is_empty_rep(rep) {
            // spec §6.5 step 6.
            if href.starts_with("/oc/wk/introspection") || href.starts_with("/oic/sec/") {
                continue;
            }
            changes.push(ResourceChange {
                href,
                content: Content::none(),
                status: Status::NotFound,
                etag,
                resource_types,
                sequence,
            });
            continue;
        }
        changes.push(ResourceChange {
            href,
            content: Content {
                data: rep.to_vec(),
                content_format: i32::from(format),
            },
            status: Status::from_coap(msg.code, Operation::Notify),
            etag,
            resource_types,
            sequence,
        });
    }
    // spec §6.5 step 7: the element the notification's ETag names goes
    // last, so that it defines the device ETag.
    if let Some(tag) = msg.etag() {
        if let Some(at) = changes.iter().position(|c| c.etag.as_deref() == Some(tag)) {
            let change = changes.remove(at);
            changes.push(change);
        }
    }
    Ok(changes)
}

impl Session {
    /// spec §6.1, §6.2: starts the synchronisation if the hub keeps a twin
    /// for the device.
    pub(super) fn start_twin(&mut self, force: bool) {
        let Some(signed_in) = &self.signed_in else {
            return;
        };
        if !self.config.hub.twin_enabled(&signed_in.ctx.device_id) {
            return;
        }
        self.twin = Some(Box::new(Twin {
            force,
            mode: None,
            in_sync: false,
            batch: None,
            tracked: Vec::new(),
        }));
        self.enqueue(Request::Discover);
    }

    /// spec §6.10: stops the twin; `on_wire` cancels the device's
    /// observations (GET Observe=1 with their tokens), otherwise (the
    /// socket is gone) the state is just dropped.
    pub(super) fn stop_twin(&mut self, on_wire: bool) {
        self.drop_twin_requests();
        let Some(twin) = self.twin.take() else {
            return;
        };
        if !on_wire || self.closed.is_some() {
            return;
        }
        if let Some(token) = twin.batch {
            self.enqueue(Request::Cancel {
                token,
                href: BATCH_HREF.into(),
                batch: true,
            });
        }
        for tracked in twin.tracked {
            if let Some(token) = tracked.token {
                self.enqueue(Request::Cancel {
                    token,
                    href: tracked.href,
                    batch: false,
                });
            }
        }
    }

    /// The synchronisation cannot go on: close, so that the device
    /// reconnects and resyncs (spec §6.6, §6.7).
    pub(super) fn twin_failed(&mut self, reason: impl Into<String>) {
        let reason = reason.into();
        if self.closed.is_none() {
            tracing::info!(%reason, "closing: the twin cannot be synchronised");
            self.closed = Some(CloseReason::TwinSyncFailed(reason));
        }
    }

    fn published_links(&self, ctx: &AuthContext) -> Vec<StoredLink> {
        self.config
            .hub
            .links(&ctx.owner, &[&ctx.device_id], &[], unix(self.wall))
            .into_iter()
            .flat_map(|(_, links)| links)
            .collect()
    }

    /// spec §6.3, §6.4: the device's link list came (or not: `None`).
    pub(super) fn discovered(&mut self, msg: Option<MessageRef<'_>>) {
        let Some(ctx) = self.signed_in.as_ref().map(|s| s.ctx.clone()) else {
            return;
        };
        let Some(force) = self.twin.as_ref().map(|t| t.force) else {
            return;
        };
        let links = msg
            .filter(|m| m.code == Code::CONTENT)
            .and_then(|m| match decode_link_list(m.payload) {
                Ok(links) => Some(links),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the device's link list");
                    None
                }
            })
            .unwrap_or_default();
        let discovery = links.iter().find(|l| l.href == BATCH_HREF);
        let batch_observable = discovery.is_some_and(|l| {
            l.policy.is_some_and(|p| p.observable())
                && l.interfaces
                    .as_ref()
                    .is_some_and(|i| i.contains(&"oic.if.b"))
        });
        // spec §6.3: only a listed, non-batch-observable /oic/res selects
        // per-resource mode; anything else tries batch.
        let mode = if discovery.is_some() && !batch_observable {
            Mode::PerResource
        } else {
            Mode::Batch
        };
        // spec §6.4: hub links the device no longer lists are unpublished,
        // unless the answer was empty or unavailable.
        if !links.is_empty() {
            let stale: Vec<i64> = self
                .published_links(&ctx)
                .iter()
                .filter(|s| s.href != STATUS_HREF && !links.iter().any(|l| l.href == s.href))
                .map(|s| s.instance_id)
                .collect();
            if !stale.is_empty() {
                if let Err(e) = self.config.hub.unpublish(&ctx, &stale, unix(self.wall)) {
                    tracing::debug!(error = %e, "cannot unpublish links the device dropped");
                }
            }
        }
        drop(links);
        if mode == Mode::PerResource && self.config.require_batch_observe {
            // spec §6.6, checklist item 47.
            self.twin_failed("the device's /oic/res is not batch observable");
            return;
        }
        self.config
            .hub
            .set_twin_state(&ctx, self.identity.connection, TwinState::Syncing);
        if let Some(twin) = self.twin.as_mut() {
            twin.mode = Some(mode);
        }
        match mode {
            Mode::Batch => {
                let etags = if force {
                    Vec::new()
                } else {
                    let mut etags = self.config.hub.latest_etags(&ctx.device_id, MAX_ETAGS);
                    etags.retain(|e| etag_fits(e));
                    etags
                };
                self.enqueue(Request::BatchObserve { etags });
            }
            Mode::PerResource => {
                for link in self.published_links(&ctx) {
                    self.track(&link);
                }
                self.check_in_sync();
            }
        }
    }

    /// spec §6.6, §6.8: observe (or read once) one more published link.
    fn track(&mut self, link: &StoredLink) {
        if link.href == STATUS_HREF {
            return;
        }
        let Some(twin) = self.twin.as_mut() else {
            return;
        };
        if twin.tracked.iter().any(|t| *t.href == *link.href) {
            return;
        }
        let href: Box<str> = link.href.as_str().into();
        twin.tracked.push(Tracked {
            href: href.clone(),
            resource_types: link.resource_types.clone().unwrap_or_default(),
            token: None,
            delivered: false,
        });
        if link.policy.is_some_and(|p| p.observable()) {
            self.enqueue(Request::Observe { href });
        } else {
            self.enqueue(Request::Read { href });
        }
    }

    /// spec §6.8: links published during the session join the
    /// per-resource observations (batch mode already covers them).
    pub(super) fn twin_published(&mut self, links: &[StoredLink]) {
        if self.twin.as_ref().and_then(|t| t.mode) != Some(Mode::PerResource) {
            return;
        }
        for link in links {
            self.track(link);
        }
    }

    /// spec §6.6, §6.8: unpublished links are no longer observed.
    pub(super) fn twin_unpublished(&mut self, hrefs: &[String]) {
        let Some(twin) = self.twin.as_mut() else {
            return;
        };
        let mut cancels = Vec::new();
        twin.tracked.retain(|t| {
            let gone = hrefs.iter().any(|h| **h == *t.href);
            if gone {
                if let Some(token) = t.token {
                    cancels.push((token, t.href.clone()));
                }
            }
            !gone
        });
        for (token, href) in cancels {
            self.enqueue(Request::Cancel {
                token,
                href,
                batch: false,
            });
        }
        self.check_in_sync();
    }

    /// spec §6.7: a device that answered 4.04 for `href` no longer has it.
    pub(super) fn unpublish_href(&mut self, href: &str) {
        let Some(ctx) = self.signed_in.as_ref().map(|s| s.ctx.clone()) else {
            return;
        };
        let href = normalize_href(href);
        match self
            .config
            .hub
            .unpublish(&ctx, &[instance_id(&href)], unix(self.wall))
        {
            Ok(hrefs) => self.twin_unpublished(&hrefs),
            Err(e) => tracing::debug!(error = %e, %href, "nothing to unpublish"),
        }
    }

    fn check_in_sync(&mut self) {
        let Some(twin) = self.twin.as_mut() else {
            return;
        };
        if twin.in_sync || twin.mode != Some(Mode::PerResource) {
            return;
        }
        if twin.tracked.iter().all(|t| t.delivered) {
            self.mark_in_sync();
        }
    }

    fn mark_in_sync(&mut self) {
        let Some(twin) = self.twin.as_mut() else {
            return;
        };
        if twin.in_sync {
            return;
        }
        twin.in_sync = true;
        if let Some(signed_in) = &self.signed_in {
            self.config.hub.set_twin_state(
                &signed_in.ctx,
                self.identity.connection,
                TwinState::InSync,
            );
        }
    }

    /// Hands changes to the hub; a refusal closes the connection (spec
    /// §6.7: the hub is out of sync, the device reconnects and resyncs).
    fn forward(&mut self, changes: Vec<ResourceChange>) {
        let Some(signed_in) = &self.signed_in else {
            return;
        };
        if changes.is_empty() {
            return;
        }
        if let Err(e) =
            self.config
                .hub
                .resources_changed(&signed_in.ctx, self.identity.connection, changes)
        {
            self.twin_failed(format!("the hub refused a notification: {e}"));
        }
    }

    /// spec §6.5 step 3: the first answer to the batch observation.
    pub(super) fn batch_registered(&mut self, token: [u8; 8], msg: MessageRef<'_>) {
        if !is_registered(&msg) {
            self.twin_failed(format!(
                "the device did not accept the /oic/res observation ({})",
                msg.code
            ));
            return;
        }
        if let Some(twin) = self.twin.as_mut() {
            twin.batch = Some(token);
        }
        self.batch_notification(msg);
    }

    /// spec §6.5 steps 3–9.
    fn batch_notification(&mut self, msg: MessageRef<'_>) {
        if msg.observe().is_none() {
            tracing::debug!("a batch response without Observe is not forwarded");
            return;
        }
        if msg.code.class() != 2 {
            // RFC 7641 §3.2: an error ends the observation; the twin would
            // go stale, so the device reconnects and resyncs.
            self.twin_failed(format!(
                "the device ended the /oic/res observation ({})",
                msg.code
            ));
            return;
        }
        // A 2.03 without payload ("nothing changed since your ETags") is not
        // forwarded but completes the synchronisation.
        if !msg.payload.is_empty() {
            let format = match msg.content_format() {
                Some(f @ (60 | 10000)) => f,
                other => {
                    self.twin_failed(format!(
                        "a batch notification in content format {other:?} (spec §6.5 step 4)"
                    ));
                    return;
                }
            };
            match batch_changes(&msg, format, self.inbound) {
                Ok(changes) => self.forward(changes),
                Err(e) => {
                    self.twin_failed(format!("an unreadable batch notification: {e}"));
                    return;
                }
            }
        }
        if self.closed.is_none() {
            self.mark_in_sync();
        }
    }

    /// spec §6.6: the first answer to a per-resource observation.
    pub(super) fn resource_registered(&mut self, href: &str, token: [u8; 8], msg: MessageRef<'_>) {
        if msg.code != Code::NOT_FOUND {
            if !is_registered(&msg) {
                self.twin_failed(format!(
                    "the device did not accept the observation of {href} ({})",
                    msg.code
                ));
                return;
            }
            if let Some(t) = self.tracked_mut(href) {
                t.token = Some(token);
            }
        }
        self.resource_result(href, msg);
    }

    /// spec §6.6: the answer to the one read of a non-observable resource.
    pub(super) fn resource_read(&mut self, href: &str, msg: MessageRef<'_>) {
        self.resource_result(href, msg);
    }

    fn tracked_mut(&mut self, href: &str) -> Option<&mut Tracked> {
        self.twin
            .as_mut()?
            .tracked
            .iter_mut()
            .find(|t| *t.href == *href)
    }

    /// spec §6.7: one result of one resource.
    fn resource_result(&mut self, href: &str, msg: MessageRef<'_>) {
        let Some(tracked) = self.tracked_mut(href) else {
            return;
        };
        tracked.delivered = true;
        let link_types = tracked.resource_types.clone();
        if msg.code == Code::VALID && msg.payload.is_empty() {
            // Not forwarded: the resource is in sync.
            self.check_in_sync();
            return;
        }
        if msg.code == Code::NOT_FOUND {
            // Unpublished first, then still forwarded (spec §6.7).
            self.unpublish_href(href);
        }
        let mut resource_types = rep_resource_types(msg.payload);
        if resource_types.is_empty() {
            resource_types = link_types;
        }
        let change = ResourceChange {
            href: href.to_owned(),
            content: Content {
                data: msg.payload.to_vec(),
                content_format: msg.content_format().map_or(-1, i32::from),
            },
            status: Status::from_coap(msg.code, Operation::Notify),
            etag: msg.etag().map(<[u8]>::to_vec),
            resource_types,
            sequence: self.inbound,
        };
        self.forward(vec![change]);
        self.check_in_sync();
    }

    /// A notification of one of our observations; false when `msg` is for
    /// none of them.
    pub(super) fn twin_notification(&mut self, msg: MessageRef<'_>) -> bool {
        let Some(twin) = self.twin.as_ref() else {
            return false;
        };
        if twin.batch.is_some_and(|t| t[..] == *msg.token) {
            self.batch_notification(msg);
            return true;
        }
        let href = twin
            .tracked
            .iter()
            .find(|t| t.token.is_some_and(|t| t[..] == *msg.token))
            .map(|t| t.href.clone());
        match href {
            Some(href) => {
                self.resource_result(&href, msg);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_hrefs() {
        assert_eq!(element_href("ocf://5bbc55bb/light/1"), "/light/1");
        assert_eq!(element_href("/oic/d"), "/oic/d");
        assert_eq!(element_href("ocf://5bbc55bb"), "/");
    }

    #[test]
    fn empty_reps() {
        assert!(is_empty_rep(&[0xbf, 0xff]));
        assert!(!is_empty_rep(&[0xa0]));
        assert!(!is_empty_rep(&[0xa1, 0x61]));
        assert!(!is_empty_rep(&[0xbf, 0x61, 0x61, 0x01, 0xff]));
    }
}
