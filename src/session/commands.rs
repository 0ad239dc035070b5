//! Hub commands on a device connection (spec §7): each becomes one CoAP
//! request (§7.2) queued behind the others (§2.6), and is answered to the
//! hub exactly once (§7.3): with the device's response, UNAVAILABLE when
//! the device does not answer in time or the connection closes after it
//! was sent, or by the gateway itself (`/plgd/s`, a request that cannot be
//! built). Commands never sent go back to the hub for the next connection.
//!
//! What it does not do: retry (spec §7.4: one attempt per command) or
//! check `valid_until` (the hub does, spec §7.1).

use super::ocf_handlers::unix_ns;
use super::requests::{href_fits, Request, MAX_URI_OPTION_LEN};
use super::twin::STATUS_HREF;
use super::*;
use crate::hub::twin::content_type_name;
use crate::hub::{Command, CommandKind};

/// A `text/plain` answer the gateway gives in the device's place (spec
/// §7.3 failure handling).
fn text(message: &str) -> Content {
    Content {
        data: message.as_bytes().to_vec(),
        content_format: 0,
    }
}

/// spec §7.3: a request that cannot be built is BAD_REQUEST.
fn check(command: &Command) -> Result<(), String> {
    if let CommandKind::Update { content } | CommandKind::Create { content } = &command.kind {
        // spec §7.2, §5.12: only the four named content types.
        if content_type_name(content.content_format).is_none() {
            return Err(format!(
                "unsupported content format {}: use text/plain (0), application/json (50), \
                 application/cbor (60) or application/vnd.ocf+cbor (10000)",
                content.content_format
            ));
        }
    }
    if !href_fits(&command.href) {
        return Err(format!(
            "href {:?} has a segment longer than {MAX_URI_OPTION_LEN} bytes",
            command.href
        ));
    }
    if command
        .interface
        .as_ref()
        .is_some_and(|i| i.len() + 3 > MAX_URI_OPTION_LEN)
    {
        return Err("the interface is too long".into());
    }
    Ok(())
}

/// spec §7.2: `/plgd/s` is answered without device traffic.
fn status_resource_answer(kind: &CommandKind) -> Status {
    match kind {
        CommandKind::Update { .. } => Status::MethodNotAllowed,
        CommandKind::Create { .. } | CommandKind::Delete => Status::Forbidden,
        CommandKind::Retrieve { .. } => Status::Ok,
    }
}

impl Session {
    /// A command from the hub (live, spec §7.1 feed, or cold start).
    pub(super) fn accept_command(&mut self, command: Box<Command>) {
        if self.closed.is_some() || self.signed_in.is_none() {
            // Not ours to execute: pending again, for the next connection.
            self.config.hub.return_commands(
                &command.device_id,
                self.identity.connection,
                std::slice::from_ref(&command.correlation_id),
            );
            return;
        }
        if command.href == STATUS_HREF {
            let status = status_resource_answer(&command.kind);
            self.confirm(&command, status, Content::none(), None);
            return;
        }
        if let Err(message) = check(&command) {
            self.confirm(&command, Status::BadRequest, text(&message), None);
            return;
        }
        self.enqueue(Request::Command(command));
    }

    /// spec §7.1 cold start: the pending commands of the device's
    /// published resources, in order (after sign-in and after a publish).
    pub(super) fn cold_start(&mut self) {
        let Some(ctx) = self.signed_in.as_ref().map(|s| s.ctx.clone()) else {
            return;
        };
        let commands = self.config.hub.take_pending_commands(
            &ctx,
            self.identity.connection,
            unix_ns(self.wall),
        );
        for command in commands {
            self.accept_command(Box::new(command));
        }
    }

    fn confirm(&self, command: &Command, status: Status, content: Content, etag: Option<Vec<u8>>) {
        let Some(signed_in) = &self.signed_in else {
            return;
        };
        self.config.hub.command_result(
            &signed_in.ctx,
            self.identity.connection,
            CommandResult {
                correlation_id: command.correlation_id.clone(),
                status,
                content,
                etag,
            },
        );
    }

    /// spec §7.3: the device answered.
    pub(super) fn command_answered(&mut self, command: &Command, msg: MessageRef<'_>) {
        if msg.code == Code::NOT_FOUND {
            // The device no longer has it: unpublished before the answer.
            self.unpublish_href(&command.href);
        }
        let format = msg.content_format();
        let content = if msg.payload.is_empty() && format.is_none() {
            Content::none()
        } else {
            Content {
                data: msg.payload.to_vec(),
                content_format: format.map_or(-1, i32::from),
            }
        };
        let status = Status::from_coap(msg.code, command.kind.operation());
        let etag = msg.etag().map(<[u8]>::to_vec);
        self.confirm(command, status, content, etag);
    }

    /// spec §7.3: no answer within `keepalive_timeout`.
    pub(super) fn command_timed_out(&mut self, command: &Command) {
        let message = format!(
            "the device did not answer within {}",
            humantime::format_duration(self.config.keepalive_timeout)
        );
        self.confirm(command, Status::Unavailable, text(&message), None);
    }

    /// The session of `ctx` ends on this connection (sign-out, sign-off,
    /// another device signing in, the connection closing): the command
    /// sent and not answered is UNAVAILABLE, those never sent go back to
    /// the hub, the other requests are dropped, and the twin stops
    /// (spec §6.10; `on_wire` cancels its observations). Called before
    /// OFFLINE, which would make the sent command pending again.
    pub(super) fn leave_session(&mut self, ctx: &AuthContext, on_wire: bool, why: &str) {
        let mut unanswered = None;
        let mut unsent = Vec::new();
        if let Some(requests) = self.requests.as_mut() {
            if let Some(in_flight) = requests.in_flight.as_mut() {
                if !in_flight.abandoned {
                    in_flight.abandoned = true;
                    if let Request::Command(command) = &in_flight.request {
                        unanswered = Some(command.correlation_id.clone());
                    }
                }
            }
            requests.queue.retain(|r| match r {
                Request::Command(command) => {
                    unsent.push(command.correlation_id.clone());
                    false
                }
                Request::Cancel { .. } => true,
                _ => false,
            });
        }
        let hub = &self.config.hub;
        if let Some(correlation_id) = unanswered {
            hub.command_result(
                ctx,
                self.identity.connection,
                CommandResult {
                    correlation_id,
                    status: Status::Unavailable,
                    content: text(why),
                    etag: None,
                },
            );
        }
        if !unsent.is_empty() {
            hub.return_commands(&ctx.device_id, self.identity.connection, &unsent);
        }
        self.stop_twin(on_wire);
        if !on_wire {
            self.requests = None;
            self.timers[Timer::DeviceRequest as usize] = None;
        }
    }
}
