//! Hub commands (spec §7) on one session against a real [`MemoryHub`]:
//! the exact request of each kind, status mapping, timeout, `/plgd/s`,
//! one request at a time, cold start, and exactly-once answers when the
//! connection closes.

#![allow(clippy::disallowed_methods)]

use std::time::Duration;

use super::twin_tests::{cbor, link, Dev, Sent, D, OWNER};
use super::*;
use crate::coap::{option, Code};
use crate::hub::{Command, CommandKind, CommandOutcome, CommandTicket, Hub};

/// A signed-in device whose twin is off (no twin traffic), with `/light`
/// and `/plgd/s` published and the sign-in's own request answered.
fn device() -> Dev {
    let mut dev = Dev::new(false, vec![link("/light", "core.light", 3)]);
    dev.hub.set_twin_enabled(OWNER, D, false, false).unwrap();
    let local = dev.sign_in();
    dev.answer(
        &local,
        Code::CONTENT,
        None,
        Some(10000),
        &cbor(&serde_json::json!([])),
    );
    assert!(dev.sent().is_empty());
    dev
}

fn command(id: &str, href: &str, kind: CommandKind, interface: Option<&str>) -> Command {
    Command {
        correlation_id: id.into(),
        device_id: D.into(),
        href: href.into(),
        kind,
        interface: interface.map(str::to_owned),
        valid_until_ns: 0,
        issued_at_ns: 0,
    }
}

impl Dev {
    fn submit(&mut self, command: Command) -> CommandTicket {
        let ticket = self.hub.submit_command(OWNER, command).unwrap();
        self.deliver();
        ticket
    }

    /// Hands the hub's delivered messages to the session.
    fn deliver(&mut self) {
        let messages: Vec<_> = std::mem::take(&mut *self.inbox.delivered.lock().unwrap());
        for m in messages {
            self.session.handle_hub_message(self.now, self.wall, m);
        }
    }
}

fn answered(ticket: &CommandTicket) -> CommandResult {
    match ticket.outcome.try_recv() {
        Ok(CommandOutcome::Answered(result)) => result,
        other => panic!("expected an answer, got {other:?}"),
    }
}

fn unanswered(ticket: &CommandTicket) {
    assert!(ticket.outcome.try_recv().is_err(), "not answered yet");
}

fn json_update() -> CommandKind {
    CommandKind::Update {
        content: Content {
            data: br#"{"on":true}"#.to_vec(),
            content_format: 50,
        },
    }
}

#[test]
fn update_is_a_post_with_content_format_and_interface() {
    // checklist 53.
    let mut dev = device();
    let ticket = dev.submit(command("u1", "/light", json_update(), Some("oic.if.rw")));
    let req = dev.one_request();
    assert_eq!(req.code, Code::POST);
    assert_eq!(req.token.len(), 8);
    assert_eq!(req.path(), "/light");
    assert_eq!(req.values(option::CONTENT_FORMAT), [vec![50]]);
    assert_eq!(req.queries(), ["if=oic.if.rw"]);
    assert_eq!(req.payload, br#"{"on":true}"#);
    // Exact bytes: Len/TKL, code, token, Uri-Path, Content-Format,
    // Uri-Query, payload.
    let mut expected = Vec::new();
    MessageWriter::new(&mut expected, Code::POST, &req.token)
        .option_str(option::URI_PATH, "light")
        .option_uint(option::CONTENT_FORMAT, 50)
        .option_str(option::URI_QUERY, "if=oic.if.rw")
        .payload(br#"{"on":true}"#)
        .finish();
    let (msg, _) = crate::coap::deframer::next_message(&expected, 1 << 20)
        .unwrap()
        .unwrap();
    assert_eq!(
        msg.options()
            .map(|o| (o.number, o.value.to_vec()))
            .collect::<Vec<_>>(),
        req.options
    );
    unanswered(&ticket);
    dev.answer(&req, Code::CHANGED, None, Some(10000), &[0xa0]);
    let result = answered(&ticket);
    assert_eq!(result.status, Status::Ok);
    assert_eq!(
        result.content,
        Content {
            data: vec![0xa0],
            content_format: 10000
        }
    );
}

#[test]
fn retrieve_is_a_get_with_etags_and_2_03_is_not_modified() {
    // checklist 54.
    let mut dev = device();
    let ticket = dev.submit(command(
        "r1",
        "/light",
        CommandKind::Retrieve {
            etags: vec![b"\x01\x02".to_vec(), b"\x03".to_vec()],
        },
        Some("oic.if.baseline"),
    ));
    let req = dev.one_request();
    assert_eq!(req.code, Code::GET);
    assert_eq!(
        req.values(option::ETAG),
        [b"\x01\x02".to_vec(), b"\x03".to_vec()]
    );
    assert_eq!(req.queries(), ["if=oic.if.baseline"]);
    assert_eq!(req.observe(), None);
    dev.answer_with(&req, Code::VALID, Some(b"\x03"), None, None, &[]);
    let result = answered(&ticket);
    assert_eq!(result.status, Status::NotModified);
    assert_eq!(result.etag.as_deref(), Some(&b"\x03"[..]));
    assert_eq!(result.content, Content::none());
}

#[test]
fn create_posts_with_the_create_interface_and_delete_deletes() {
    // checklist 55, 56.
    let mut dev = device();
    let create = dev.submit(command(
        "c1",
        "/light",
        CommandKind::Create {
            content: Content {
                data: vec![0xa0],
                content_format: 10000,
            },
        },
        None,
    ));
    let req = dev.one_request();
    assert_eq!(req.code, Code::POST);
    assert_eq!(req.queries(), ["if=oic.if.create"]);
    assert_eq!(req.values(option::CONTENT_FORMAT), [vec![0x27, 0x10]]);
    dev.answer(&req, Code::CREATED, None, None, &[]);
    assert_eq!(answered(&create).status, Status::Created);

    let delete = dev.submit(command("d1", "/light", CommandKind::Delete, None));
    let req = dev.one_request();
    assert_eq!(req.code, Code::DELETE);
    assert_eq!(req.path(), "/light");
    assert!(req.queries().is_empty());
    assert!(req.payload.is_empty());
    dev.answer(&req, Code::DELETED, None, None, &[]);
    assert_eq!(answered(&delete).status, Status::Ok);
}

#[test]
fn an_unsupported_content_format_is_bad_request_without_device_traffic() {
    let mut dev = device();
    let ticket = dev.submit(command(
        "u1",
        "/light",
        CommandKind::Update {
            content: Content {
                data: b"<x/>".to_vec(),
                content_format: 41,
            },
        },
        None,
    ));
    assert!(dev.sent().is_empty());
    let result = answered(&ticket);
    assert_eq!(result.status, Status::BadRequest);
    assert_eq!(result.content.content_format, 0);
    assert!(String::from_utf8(result.content.data)
        .unwrap()
        .contains("41"));
}

#[test]
fn no_answer_within_the_keepalive_timeout_is_unavailable() {
    // checklist 57.
    let mut dev = device();
    let ticket = dev.submit(command("u1", "/light", json_update(), None));
    let req = dev.one_request();
    for _ in 0..4 {
        dev.advance(Duration::from_secs(5));
        for ping in dev.sent().into_iter().filter(|m| m.code == Code::PING) {
            let mut pong = Vec::new();
            MessageWriter::new(&mut pong, Code::PONG, &ping.token).finish();
            dev.feed(&pong);
        }
    }
    let result = answered(&ticket);
    assert_eq!(result.status, Status::Unavailable);
    assert_eq!(result.content.content_format, 0);
    // A late answer changes nothing (exactly once).
    dev.answer(&req, Code::CHANGED, None, None, &[]);
    assert!(ticket.outcome.try_recv().is_err());
    assert!(dev.session.is_closed().is_none());
}

#[test]
fn status_resource_commands_are_answered_by_the_gateway() {
    // checklist 58.
    let mut dev = device();
    let update = dev.submit(command("u", "/plgd/s", json_update(), None));
    let create = dev.submit(command(
        "c",
        "/plgd/s",
        CommandKind::Create {
            content: Content::none(),
        },
        None,
    ));
    let delete = dev.submit(command("d", "/plgd/s", CommandKind::Delete, None));
    let retrieve = dev.submit(command(
        "r",
        "/plgd/s",
        CommandKind::Retrieve { etags: vec![] },
        None,
    ));
    assert!(dev.sent().is_empty());
    assert_eq!(answered(&update).status, Status::MethodNotAllowed);
    assert_eq!(answered(&create).status, Status::Forbidden);
    assert_eq!(answered(&delete).status, Status::Forbidden);
    let r = answered(&retrieve);
    assert_eq!((r.status, r.content), (Status::Ok, Content::none()));
}

#[test]
fn one_request_is_outstanding_at_a_time_in_fifo_order() {
    // spec §2.6.
    let mut dev = device();
    let tickets: Vec<_> = (0..3)
        .map(|i| {
            dev.submit(command(
                &format!("r{i}"),
                "/light",
                CommandKind::Retrieve { etags: vec![] },
                None,
            ))
        })
        .collect();
    let mut tokens = Vec::new();
    for ticket in &tickets {
        let req = dev.one_request();
        assert!(!tokens.contains(&req.token), "a fresh token each");
        tokens.push(req.token.clone());
        assert!(dev.sent().is_empty(), "the next waits for this answer");
        dev.answer(&req, Code::CONTENT, None, Some(10000), &[0xa0]);
        assert_eq!(answered(ticket).status, Status::Ok);
    }
}

#[test]
fn a_4_04_answer_unpublishes_the_resource() {
    let mut dev = device();
    let ticket = dev.submit(command("u1", "/light", json_update(), None));
    let req = dev.one_request();
    dev.answer(&req, Code::NOT_FOUND, None, None, &[]);
    assert_eq!(answered(&ticket).status, Status::NotFound);
    assert!(dev.published().is_empty());
}

#[test]
fn cold_start_after_sign_in_and_after_publish() {
    // checklist 59.
    let mut dev = Dev::new(false, vec![link("/light", "core.light", 3)]);
    dev.hub.set_twin_enabled(OWNER, D, false, false).unwrap();
    // Issued while the device is offline: pending.
    let light = dev
        .hub
        .submit_command(OWNER, command("a", "/light", json_update(), None))
        .unwrap();
    let later = dev
        .hub
        .submit_command(OWNER, command("b", "/later", CommandKind::Delete, None))
        .unwrap();
    assert!(light.pending && later.pending);
    let local = dev.sign_in();
    assert_eq!(local.queries(), ["if=oic.if.ll", "rt=oic.wk.d"]);
    dev.answer(
        &local,
        Code::CONTENT,
        None,
        Some(10000),
        &cbor(&serde_json::json!([])),
    );
    let req = dev.one_request();
    assert_eq!((req.code, req.path().as_str()), (Code::POST, "/light"));
    dev.answer(&req, Code::CHANGED, None, None, &[]);
    assert_eq!(answered(&light).status, Status::Ok);
    unanswered(&later);
    // /later is published now: its command follows the publish response.
    dev.request(
        Code::POST,
        &["oic", "rd"],
        &[],
        Some(
            &serde_json::json!({"di": D, "ttl": 0, "links": [{"href": "/later", "p": {"bm": 3}}]}),
        ),
    );
    let sent = dev.sent();
    assert_eq!(sent[0].code, Code::CHANGED);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(
        (sent[1].code, sent[1].path().as_str()),
        (Code::DELETE, "/later")
    );
    dev.answer(&sent[1], Code::DELETED, None, None, &[]);
    assert_eq!(answered(&later).status, Status::Ok);
}

#[test]
fn closing_answers_the_sent_command_and_returns_the_others() {
    let mut dev = device();
    let sent = dev.submit(command("s", "/light", json_update(), None));
    let queued = dev.submit(command("q", "/light", CommandKind::Delete, None));
    let req: Sent = dev.one_request();
    assert_eq!(req.code, Code::POST);
    dev.session.transport_closed("peer closed".into());
    let result = answered(&sent);
    assert_eq!(result.status, Status::Unavailable);
    assert_eq!(
        String::from_utf8(result.content.data).unwrap(),
        "the connection closed before the device answered"
    );
    unanswered(&queued);
    let pending = dev.hub.pending_commands(OWNER, D).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].correlation_id, "q");
    // The returned command is delivered to the next connection, once.
    let identity = PeerIdentity {
        device_id: Some(D.into()),
        connection: ConnectionRef(10),
        remote: "127.0.0.1:40001".into(),
    };
    dev.session = Session::new(dev.session.config().clone(), identity, dev.now, 2);
    dev.sent();
    let local = dev.sign_in();
    dev.answer(
        &local,
        Code::CONTENT,
        None,
        Some(10000),
        &cbor(&serde_json::json!([])),
    );
    let req = dev.one_request();
    assert_eq!(req.code, Code::DELETE);
    dev.answer(&req, Code::DELETED, None, None, &[]);
    assert_eq!(answered(&queued).status, Status::Ok);
    assert!(sent.outcome.try_recv().is_err(), "answered once");
}

#[test]
fn commands_for_a_closed_session_go_back_to_pending() {
    let mut dev = device();
    dev.session.close("going away".into());
    let ticket = dev.submit(command("x", "/light", CommandKind::Delete, None));
    assert!(dev.sent().is_empty());
    // Only a pending (never sent) command can be canceled.
    dev.hub.cancel_command(OWNER, D, "x").unwrap();
    assert_eq!(ticket.outcome.try_recv().unwrap(), CommandOutcome::Canceled);
}
