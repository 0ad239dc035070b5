//! Hub → device commands (spec §7; checklist items 53–59) over real TLS:
//! the hub's command becomes the CoAP request of spec §7.2 on the device's
//! connection, and the device's answer the status of spec §5.12.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use coap_gateway::coap::{option, Code};
use coap_gateway::config::Config;
use coap_gateway::hub::{
    Command, CommandKind, CommandOutcome, CommandResult, CommandTicket, Content, Status,
};
use common::ocf::*;
use common::{Msg, TestGateway, TestPki, DEVICE_ID};
use serde_json::json;

const SETTLE: Duration = Duration::from_millis(300);

fn start_with(pki: &TestPki, tweak: impl FnOnce(&mut Config)) -> TestGateway {
    let mut config = gateway_config(pki);
    tweak(&mut config);
    TestGateway::start(&config)
}

fn light_device(gw: &TestGateway, pki: &TestPki) -> OcfDevice {
    let mut dev = OcfDevice::connect(gw, pki);
    dev.add_resource("/light", "core.light", json!({"state": false}), true);
    dev
}

/// Signed up, signed in, `/light` published, twin set up.
fn online_light(gw: &TestGateway, pki: &TestPki) -> (OcfDevice, Registration) {
    let mut dev = light_device(gw, pki);
    let reg = dev.sign_up(gw, OWNER);
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    let body = dev.publish_body(&["/light"]);
    assert_eq!(dev.publish(&body).code, Code::CHANGED);
    dev.settle(SETTLE);
    (dev, reg)
}

fn command(id: &str, href: &str, kind: CommandKind) -> Command {
    Command {
        correlation_id: id.to_owned(),
        device_id: DEVICE_ID.to_owned(),
        href: href.to_owned(),
        kind,
        interface: None,
        valid_until_ns: 0,
        issued_at_ns: 0,
    }
}

fn submit(gw: &TestGateway, c: Command) -> CommandTicket {
    gw.hub().submit_command(OWNER, c).expect("command accepted")
}

/// Serves the gateway until the command's outcome arrives.
fn outcome(dev: &mut OcfDevice, ticket: &CommandTicket, limit: Duration) -> CommandResult {
    let started = Instant::now();
    loop {
        if let Ok(o) = ticket.outcome.try_recv() {
            match o {
                CommandOutcome::Answered(r) => return r,
                other => panic!("command ended as {other:?}"),
            }
        }
        assert!(
            started.elapsed() < limit,
            "no outcome within {limit:?}; device saw {:?}",
            dev.requests
        );
        dev.settle(Duration::from_millis(20));
    }
}

fn to_light(code: Code) -> impl Fn(&Msg) -> bool {
    move |m| m.code == code && uri_path(m) == "/light"
}

fn ocf_cbor(value: serde_json::Value) -> Content {
    Content {
        data: cbor(&value),
        content_format: OCF_CBOR as i32,
    }
}

#[test]
fn item_53_update_with_json_content_posts_the_same_bytes_and_reports_ok() {
    let pki = TestPki::new();
    let gw = start_with(&pki, |_| {});
    let (mut dev, _) = online_light(&gw, &pki);
    dev.hook = Some(Box::new(|m| {
        if m.code == Code::POST && uri_path(m) == "/light" {
            Hook::Reply {
                code: Code::CHANGED,
                body: Some(cbor(&json!({"state": true}))),
            }
        } else {
            Hook::Default
        }
    }));
    let json_body = br#"{"state":true}"#.to_vec();
    let ticket = submit(
        &gw,
        command(
            "c53",
            "/light",
            CommandKind::Update {
                content: Content {
                    data: json_body.clone(),
                    content_format: 50,
                },
            },
        ),
    );
    assert!(!ticket.pending, "the device is online");
    let result = outcome(&mut dev, &ticket, PATIENCE);
    let post = dev.wait_for_request(PATIENCE, to_light(Code::POST));
    assert_eq!(option_uint(&post, option::CONTENT_FORMAT), Some(50));
    assert_eq!(post.payload, json_body);
    assert_eq!(result.status, Status::Ok);
    assert_eq!(from_cbor(&result.content.data), json!({"state": true}));
    assert_eq!(result.content.content_format, OCF_CBOR as i32);
}

#[test]
fn item_54_retrieve_with_interface_and_etag_and_2_03_is_not_modified() {
    let pki = TestPki::new();
    let gw = start_with(&pki, |_| {});
    let (mut dev, _) = online_light(&gw, &pki);
    dev.hook = Some(Box::new(|m| {
        if m.code == Code::GET
            && uri_path(m) == "/light"
            && option_uint(m, option::OBSERVE).is_none()
        {
            Hook::Reply {
                code: Code::VALID,
                body: None,
            }
        } else {
            Hook::Default
        }
    }));
    let mut c = command(
        "c54",
        "/light",
        CommandKind::Retrieve {
            etags: vec![b"etag-1".to_vec()],
        },
    );
    c.interface = Some("oic.if.baseline".into());
    let ticket = submit(&gw, c);
    let result = outcome(&mut dev, &ticket, PATIENCE);
    let get = dev.wait_for_request(PATIENCE, |m| {
        to_light(Code::GET)(m) && option_uint(m, option::OBSERVE).is_none()
    });
    assert!(uri_queries(&get).contains(&"if=oic.if.baseline".to_owned()));
    assert_eq!(options(&get, option::ETAG), vec![b"etag-1".as_slice()]);
    assert_eq!(result.status, Status::NotModified);
}

#[test]
fn item_55_create_posts_with_if_create_and_2_01_is_created() {
    let pki = TestPki::new();
    let gw = start_with(&pki, |_| {});
    let (mut dev, _) = online_light(&gw, &pki);
    let ticket = submit(
        &gw,
        command(
            "c55",
            "/light",
            CommandKind::Create {
                content: ocf_cbor(json!({"n": "child"})),
            },
        ),
    );
    let result = outcome(&mut dev, &ticket, PATIENCE);
    let post = dev.wait_for_request(PATIENCE, to_light(Code::POST));
    assert!(uri_queries(&post).contains(&"if=oic.if.create".to_owned()));
    assert_eq!(result.status, Status::Created);
}

#[test]
fn item_56_delete_sends_delete_and_2_02_is_ok() {
    let pki = TestPki::new();
    let gw = start_with(&pki, |_| {});
    let (mut dev, _) = online_light(&gw, &pki);
    let ticket = submit(&gw, command("c56", "/light", CommandKind::Delete));
    let result = outcome(&mut dev, &ticket, PATIENCE);
    dev.wait_for_request(PATIENCE, to_light(Code::DELETE));
    assert_eq!(result.status, Status::Ok);
}

#[test]
fn item_57_a_device_that_does_not_answer_in_time_yields_unavailable() {
    let pki = TestPki::new();
    let keepalive = Duration::from_secs(2);
    let gw = start_with(&pki, |c| c.coap.keepalive_timeout = keepalive);
    let (mut dev, _) = online_light(&gw, &pki);
    dev.hook = Some(Box::new(|m| {
        if m.code == Code::POST && uri_path(m) == "/light" {
            Hook::Silent
        } else {
            Hook::Default
        }
    }));
    let started = Instant::now();
    let ticket = submit(
        &gw,
        command(
            "c57",
            "/light",
            CommandKind::Update {
                content: ocf_cbor(json!({"state": true})),
            },
        ),
    );
    let result = outcome(&mut dev, &ticket, keepalive * 4);
    assert_eq!(result.status, Status::Unavailable);
    assert!(
        started.elapsed() >= keepalive - Duration::from_millis(100),
        "spec §7.2: the timeout is keepAlive.timeout ({:?})",
        started.elapsed()
    );
    // The connection stayed up: it was the request's timeout, not a close.
    dev.assert_open();
}

#[test]
fn item_58_plgd_s_commands_are_answered_without_device_traffic() {
    let pki = TestPki::new();
    let gw = start_with(&pki, |_| {});
    let (mut dev, _) = online_light(&gw, &pki);
    let cases = [
        (
            "u",
            CommandKind::Update {
                content: ocf_cbor(json!({})),
            },
            Status::MethodNotAllowed,
        ),
        (
            "c",
            CommandKind::Create {
                content: ocf_cbor(json!({})),
            },
            Status::Forbidden,
        ),
        ("d", CommandKind::Delete, Status::Forbidden),
        ("r", CommandKind::Retrieve { etags: vec![] }, Status::Ok),
    ];
    for (id, kind, status) in cases {
        let ticket = submit(&gw, command(id, "/plgd/s", kind));
        let result = outcome(&mut dev, &ticket, PATIENCE);
        assert_eq!(result.status, status, "command {id}");
    }
    dev.settle(SETTLE);
    assert_eq!(
        dev.count_requests(|m| uri_path(m) == "/plgd/s"),
        0,
        "spec §7.2: nothing is sent to the device"
    );
}

#[test]
fn item_59_offline_commands_are_delivered_after_sign_in_and_after_publish() {
    let pki = TestPki::new();
    let gw = start_with(&pki, |_| {});
    let (first, reg) = online_light(&gw, &pki);
    drop(first);
    wait_offline(&gw, OWNER);

    let now_ticket = submit(
        &gw,
        command(
            "c59a",
            "/light",
            CommandKind::Update {
                content: ocf_cbor(json!({"state": true})),
            },
        ),
    );
    assert!(
        now_ticket.pending,
        "the device is offline: the command waits"
    );
    let later_ticket = submit(
        &gw,
        command(
            "c59b",
            "/later",
            CommandKind::Update {
                content: ocf_cbor(json!({"v": 2})),
            },
        ),
    );
    assert_eq!(
        gw.hub().pending_commands(OWNER, DEVICE_ID).unwrap().len(),
        2
    );

    let mut dev = light_device(&gw, &pki);
    dev.add_resource("/later", "x.later", json!({"v": 1}), true);
    dev.sign_in_ok(&reg.uid, &reg.access_token);
    let result = outcome(&mut dev, &now_ticket, PATIENCE);
    assert_eq!(result.status, Status::Ok);
    assert_eq!(dev.count_requests(to_light(Code::POST)), 1);
    dev.settle(SETTLE);
    assert_eq!(
        dev.count_requests(|m| m.code == Code::POST && uri_path(m) == "/later"),
        0,
        "spec §7.1: only commands of published resources at cold start"
    );

    let body = dev.publish_body(&["/later"]);
    assert_eq!(dev.publish(&body).code, Code::CHANGED);
    let result = outcome(&mut dev, &later_ticket, PATIENCE);
    assert_eq!(result.status, Status::Ok);
    dev.settle(SETTLE);
    assert_eq!(
        dev.count_requests(|m| m.code == Code::POST && uri_path(m) == "/later"),
        1,
        "delivered exactly once"
    );
    assert_eq!(dev.count_requests(to_light(Code::POST)), 1);
    assert!(gw
        .hub()
        .pending_commands(OWNER, DEVICE_ID)
        .unwrap()
        .is_empty());
}
