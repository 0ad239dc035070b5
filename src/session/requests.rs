//! The requests this gateway sends a device (spec §2.6): at most one is
//! outstanding per connection (GET, POST, DELETE, Observe registration or
//! cancellation); the others wait in FIFO order. Each gets a fresh 8-byte
//! token (an Observe cancellation reuses its observation's, spec §6.6) and
//! waits at most `keepalive_timeout` for its answer (spec §7.2).
//!
//! What it does not do: decide what an answer means. The twin
//! ([`super::twin`]) and the commands ([`super::commands`]) do; this module
//! writes the request bytes, matches the answer by token and reports a
//! timeout.

use std::collections::VecDeque;

use super::*;
use crate::hub::{Command, CommandKind};

/// One request to the device, described until it is written.
#[derive(Debug)]
pub(super) enum Request {
    /// spec §8.1: `GET /oic/res?if=oic.if.ll&rt=oic.wk.d`.
    LocalEndpoints,
    /// spec §6.3: `GET /oic/res?if=oic.if.ll`.
    Discover,
    /// spec §6.5 step 2: `GET /oic/res?if=oic.if.b`, Observe=0, with the
    /// twin's ETags (none on a forced resync).
    BatchObserve { etags: Vec<Vec<u8>> },
    /// spec §6.6: `GET <href>`, Observe=0.
    Observe { href: Box<str> },
    /// spec §6.6: one `GET <href>` of a resource that is not observable.
    Read { href: Box<str> },
    /// spec §6.6, §6.10: `GET` Observe=1 with the observation's token and
    /// path (and the batch query for `/oic/res`).
    Cancel {
        token: [u8; 8],
        href: Box<str>,
        batch: bool,
    },
    /// spec §7.2: a hub command.
    Command(Box<Command>),
}

impl Request {
    /// Whether the twin synchronisation asked for it (dropped when the twin
    /// is torn down, spec §6.10).
    pub(super) fn is_twin(&self) -> bool {
        matches!(
            self,
            Request::Discover
                | Request::BatchObserve { .. }
                | Request::Observe { .. }
                | Request::Read { .. }
        )
    }
}

/// The request the device has not answered yet.
#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) token: [u8; 8],
    pub(super) request: Request,
    /// The session stopped waiting for this answer (sign-out, twin
    /// disabled; a command was answered UNAVAILABLE already). The slot
    /// stays taken until the device answers or the timeout passes, so the
    /// device still sees one request at a time (spec §2.6).
    pub(super) abandoned: bool,
}

/// The outbound requests of one connection; boxed in the session and
/// dropped when empty, so an idle session carries none.
#[derive(Debug, Default)]
pub(super) struct Requests {
    pub(super) in_flight: Option<InFlight>,
    pub(super) queue: VecDeque<Request>,
}

/// The Uri-Path segments of an href (`/a/b` → `a`, `b`).
fn segments(href: &str) -> impl Iterator<Item = &str> {
    href.split('/').filter(|s| !s.is_empty())
}

/// Longest value of a Uri-Path or Uri-Query option (RFC 7252 §5.10).
pub(super) const MAX_URI_OPTION_LEN: usize = 255;

/// Whether `href` can be written as Uri-Path options (RFC 7252 §5.10:
/// each segment at most 255 bytes).
pub(super) fn href_fits(href: &str) -> bool {
    segments(href).all(|s| s.len() <= MAX_URI_OPTION_LEN)
}

/// spec §6.5 step 2: ETags after the first go into `incChanges=` queries
/// of unpadded base64url values joined by `,`; a new query starts once the
/// current one reaches 239 characters.
pub(super) fn inc_changes_queries(etags: &[Vec<u8>]) -> Vec<String> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    const PREFIX: &str = "incChanges=";
    const SPLIT_AT: usize = 239;
    let mut out = Vec::new();
    let mut current = String::new();
    for etag in etags {
        if current.is_empty() {
            current.push_str(PREFIX);
        } else {
            current.push(',');
        }
        URL_SAFE_NO_PAD.encode_string(etag, &mut current);
        if current.len() >= SPLIT_AT {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// An ETag option value must be 1 to 8 bytes (RFC 7252 §5.10.6).
pub(super) fn etag_fits(etag: &[u8]) -> bool {
    (1..=8).contains(&etag.len())
}

/// Appends `request` with `token` to `out` (spec §6.3, §6.5, §6.6, §7.2).
fn write(out: &mut Vec<u8>, token: &[u8; 8], request: &Request) {
    match request {
        Request::LocalEndpoints => {
            MessageWriter::new(out, Code::GET, token)
                .option_str(option::URI_PATH, "oic")
                .option_str(option::URI_PATH, "res")
                .option_str(option::URI_QUERY, "if=oic.if.ll")
                .option_str(option::URI_QUERY, "rt=oic.wk.d")
                .finish();
        }
        Request::Discover => {
            MessageWriter::new(out, Code::GET, token)
                .option_str(option::URI_PATH, "oic")
                .option_str(option::URI_PATH, "res")
                .option_str(option::URI_QUERY, "if=oic.if.ll")
                .finish();
        }
        Request::BatchObserve { etags } => {
            let mut w = MessageWriter::new(out, Code::GET, token);
            if let Some(first) = etags.first() {
                w.option(option::ETAG, first);
            }
            w.option_uint(option::OBSERVE, 0)
                .option_str(option::URI_PATH, "oic")
                .option_str(option::URI_PATH, "res")
                .option_str(option::URI_QUERY, "if=oic.if.b");
            for query in inc_changes_queries(etags.get(1..).unwrap_or_default()) {
                w.option_str(option::URI_QUERY, &query);
            }
            w.finish();
        }
        Request::Observe { href } => {
            let mut w = MessageWriter::new(out, Code::GET, token);
            w.option_uint(option::OBSERVE, 0);
            for s in segments(href) {
                w.option_str(option::URI_PATH, s);
            }
            w.finish();
        }
        Request::Read { href } => {
            let mut w = MessageWriter::new(out, Code::GET, token);
            for s in segments(href) {
                w.option_str(option::URI_PATH, s);
            }
            w.finish();
        }
        Request::Cancel { href, batch, .. } => {
            let mut w = MessageWriter::new(out, Code::GET, token);
            w.option_uint(option::OBSERVE, 1);
            for s in segments(href) {
                w.option_str(option::URI_PATH, s);
            }
            if *batch {
                w.option_str(option::URI_QUERY, "if=oic.if.b");
            }
            w.finish();
        }
        Request::Command(command) => write_command(out, token, command),
    }
}

/// spec §7.2: the CoAP request of a hub command (checked by
/// `commands::check` before it was queued).
fn write_command(out: &mut Vec<u8>, token: &[u8; 8], command: &Command) {
    let code = match command.kind {
        CommandKind::Update { .. } | CommandKind::Create { .. } => Code::POST,
        CommandKind::Retrieve { .. } => Code::GET,
        CommandKind::Delete => Code::DELETE,
    };
    let mut w = MessageWriter::new(out, code, token);
    if let CommandKind::Retrieve { etags } = &command.kind {
        for etag in etags.iter().filter(|e| etag_fits(e)) {
            w.option(option::ETAG, etag);
        }
    }
    for s in segments(&command.href) {
        w.option_str(option::URI_PATH, s);
    }
    let content = match &command.kind {
        CommandKind::Update { content } | CommandKind::Create { content } => Some(content),
        _ => None,
    };
    if let Some(content) = content {
        let format = u32::try_from(content.content_format).unwrap_or_default();
        w.option_uint(option::CONTENT_FORMAT, format);
    }
    match (&command.kind, &command.interface) {
        // spec §7.2: create always asks for the create interface.
        (CommandKind::Create { .. }, _) => {
            w.option_str(option::URI_QUERY, "if=oic.if.create");
        }
        (_, Some(interface)) if !interface.is_empty() => {
            w.option_str(option::URI_QUERY, &format!("if={interface}"));
        }
        _ => {}
    }
    if let Some(content) = content {
        w.payload(&content.data);
    }
    w.finish();
}

impl Session {
    /// Queues a request; it is written at once when nothing else waits for
    /// an answer (spec §2.6).
    pub(super) fn enqueue(&mut self, request: Request) {
        self.requests
            .get_or_insert_with(Box::default)
            .queue
            .push_back(request);
        self.pump();
    }

    /// Sends the next queued request when none is outstanding.
    pub(super) fn pump(&mut self) {
        if self.closed.is_some() {
            return;
        }
        let Some(requests) = self.requests.as_mut() else {
            return;
        };
        if requests.in_flight.is_some() {
            return;
        }
        let Some(request) = requests.queue.pop_front() else {
            self.requests = None;
            return;
        };
        let token = match &request {
            Request::Cancel { token, .. } => *token,
            _ => self.next_token(),
        };
        write(&mut self.out, &token, &request);
        if let Some(requests) = self.requests.as_mut() {
            requests.in_flight = Some(InFlight {
                token,
                request,
                abandoned: false,
            });
        }
        self.timers[Timer::DeviceRequest as usize] = Some(self.now + self.config.keepalive_timeout);
    }

    /// The outstanding request `token` answers, if any; its slot is free
    /// afterwards (the caller pumps the queue once it has handled it).
    pub(super) fn take_in_flight(&mut self, token: &[u8]) -> Option<InFlight> {
        let requests = self.requests.as_mut()?;
        if requests
            .in_flight
            .as_ref()
            .is_none_or(|f| f.token[..] != *token)
        {
            return None;
        }
        self.timers[Timer::DeviceRequest as usize] = None;
        requests.in_flight.take()
    }

    /// The device did not answer the outstanding request in time.
    pub(super) fn request_timed_out(&mut self) {
        self.timers[Timer::DeviceRequest as usize] = None;
        let Some(in_flight) = self.requests.as_mut().and_then(|r| r.in_flight.take()) else {
            return;
        };
        tracing::debug!(request = ?in_flight.request, "the device did not answer our request in time");
        if !in_flight.abandoned {
            match in_flight.request {
                Request::LocalEndpoints | Request::Cancel { .. } => {}
                // spec §6.3: a missing answer still tries batch mode.
                Request::Discover => self.discovered(None),
                Request::BatchObserve { .. } | Request::Observe { .. } | Request::Read { .. } => {
                    self.twin_failed("the device did not answer a twin request in time");
                }
                Request::Command(command) => self.command_timed_out(&command),
            }
        }
        self.pump();
    }

    /// A response from the device (spec §2.7): the answer to our
    /// outstanding request, a notification of an observation, or dropped.
    pub(super) fn handle_response(&mut self, msg: MessageRef<'_>) {
        if let Some(in_flight) = self.take_in_flight(msg.token) {
            self.answered(in_flight, msg);
            self.pump();
        } else if !self.twin_notification(msg) {
            tracing::debug!(code = %msg.code, "dropping a response for an unknown token");
        }
    }

    fn answered(&mut self, in_flight: InFlight, msg: MessageRef<'_>) {
        let token = in_flight.token;
        if in_flight.abandoned {
            // An observation registered after we stopped wanting it is
            // cancelled at once (spec §6.10).
            if let Request::Observe { href } = in_flight.request {
                if is_registered(&msg) && self.signed_in.is_some() {
                    self.enqueue(Request::Cancel {
                        token,
                        href,
                        batch: false,
                    });
                }
            } else if matches!(in_flight.request, Request::BatchObserve { .. })
                && is_registered(&msg)
                && self.signed_in.is_some()
            {
                self.enqueue(Request::Cancel {
                    token,
                    href: "/oic/res".into(),
                    batch: true,
                });
            }
            return;
        }
        match in_flight.request {
            Request::LocalEndpoints => self.local_endpoints_answered(msg),
            Request::Discover => self.discovered(Some(msg)),
            Request::BatchObserve { .. } => self.batch_registered(token, msg),
            Request::Observe { href } => self.resource_registered(&href, token, msg),
            Request::Read { href } => self.resource_read(&href, msg),
            Request::Cancel { .. } => {}
            Request::Command(command) => self.command_answered(&command, msg),
        }
    }

    /// Drops the queued twin requests and abandons an outstanding one
    /// (spec §6.10).
    pub(super) fn drop_twin_requests(&mut self) {
        if let Some(requests) = self.requests.as_mut() {
            requests.queue.retain(|r| !r.is_twin());
            if let Some(in_flight) = requests.in_flight.as_mut() {
                if in_flight.request.is_twin() {
                    in_flight.abandoned = true;
                }
            }
        }
    }
}

/// spec §6.5 step 3, §6.6: a successful first answer that carries an
/// Observe option registered the observation.
pub(super) fn is_registered(msg: &MessageRef<'_>) -> bool {
    (msg.code == Code::CONTENT || msg.code == Code::VALID) && msg.observe().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inc_changes_encoding_and_split() {
        assert!(inc_changes_queries(&[]).is_empty());
        assert_eq!(
            inc_changes_queries(&[vec![1, 2, 3], vec![0xff; 8]]),
            ["incChanges=AQID,__________8"]
        );
        // 11 + 20 × (11 + 1) = 251 ≥ 239 after 20 ETags of 8 bytes.
        let many = vec![vec![7u8; 8]; 25];
        let queries = inc_changes_queries(&many);
        assert_eq!(queries.len(), 2);
        assert!(queries[0].len() >= 239 && queries[0].len() <= 255);
        let values: usize = queries
            .iter()
            .map(|q| q.trim_start_matches("incChanges=").split(',').count())
            .sum();
        assert_eq!(values, 25);
    }
}
