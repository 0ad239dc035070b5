//! The session driven with frames and a virtual clock: no sockets.

// The virtual clock starts at a real instant; the session never reads it.
#![allow(clippy::disallowed_methods)]

use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::*;
use crate::coap::{deframer, signal::Signal, Code, MessageWriter};

fn config(keepalive: Duration) -> Rc<SessionConfig> {
    Rc::new(SessionConfig {
        max_message_size: 1024,
        keepalive_timeout: keepalive,
        ..SessionConfig::default()
    })
}

fn wall() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_764_000_000)
}

/// A message the session sent: code, token, payload, options.
type Sent = (Code, Vec<u8>, Vec<u8>, Vec<(u16, Vec<u8>)>);

struct Harness {
    session: Session,
    now: Instant,
}

impl Harness {
    fn new(keepalive: Duration) -> Harness {
        let now = Instant::now();
        Harness {
            session: Session::new(config(keepalive), PeerIdentity::default(), now, 7),
            now,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        let (msg, len) = deframer::next_message(bytes, 1024).unwrap().unwrap();
        assert_eq!(len, bytes.len());
        self.session.handle_frame(self.now, wall(), msg);
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        if self.session.poll_timeout().is_some_and(|t| t <= self.now) {
            self.session.handle_timeout(self.now);
        }
    }

    /// Everything the session has queued, as owned (code, token, payload).
    fn sent(&mut self) -> Vec<Sent> {
        let mut out = Vec::new();
        while self.session.poll_transmit(&mut out) {}
        let mut msgs = Vec::new();
        let mut rest = &out[..];
        while let Some((m, len)) = deframer::next_message(rest, 1 << 20).unwrap() {
            msgs.push((
                m.code,
                m.token.to_vec(),
                m.payload.to_vec(),
                m.options().map(|o| (o.number, o.value.to_vec())).collect(),
            ));
            rest = &rest[len..];
        }
        assert!(rest.is_empty());
        msgs
    }
}

fn request(code: Code, token: &[u8], path: &[&str], accept: Option<u32>) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut w = MessageWriter::new(&mut out, code, token);
        for segment in path {
            w.option_str(crate::coap::option::URI_PATH, segment);
        }
        if let Some(a) = accept {
            w.option_uint(crate::coap::option::ACCEPT, a);
        }
        w.finish();
    }
    out
}

#[test]
fn item_01_csm_without_options_is_the_first_message() {
    let mut h = Harness::new(Duration::from_secs(20));
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    let (code, token, payload, options) = &sent[0];
    assert_eq!(*code, Code::CSM);
    assert_eq!(token.len(), 8, "spec §2.3: 8-byte random token");
    assert!(
        payload.is_empty() && options.is_empty(),
        "spec §2.3: no options"
    );
}

#[test]
fn item_02_ping_is_answered_with_pong_on_the_same_token() {
    let mut h = Harness::new(Duration::from_secs(20));
    h.sent();
    let mut ping = Vec::new();
    // Custody option set: it is not echoed (spec §2.3).
    crate::coap::signal::write_ping(&mut ping, b"\x01\x02\x03", true);
    h.feed(&ping);
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, Code::PONG);
    assert_eq!(sent[0].1, b"\x01\x02\x03");
    assert!(sent[0].3.is_empty());
}

#[test]
fn each_poll_transmit_hands_over_one_whole_message() {
    // spec Appendix A.6: the transport seals each call's bytes in TLS
    // records of their own, and IoTivity-Lite reads one message a record.
    let mut h = Harness::new(Duration::from_secs(20));
    for token in [b"\x01", b"\x02"] {
        let mut ping = Vec::new();
        crate::coap::signal::write_ping(&mut ping, token, false);
        h.feed(&ping);
    }
    let mut codes = Vec::new();
    let mut out = Vec::new();
    while h.session.poll_transmit(&mut out) {
        let (msg, len) = deframer::next_message(&out, 1024).unwrap().unwrap();
        assert_eq!(len, out.len(), "exactly one message per call");
        codes.push((msg.code, msg.token.to_vec()));
        out.clear();
    }
    assert_eq!(
        codes,
        [
            (Code::CSM, codes[0].1.clone()),
            (Code::PONG, b"\x01".to_vec()),
            (Code::PONG, b"\x02".to_vec())
        ]
    );
    assert!(!h.session.poll_transmit(&mut out), "then nothing");
}

#[test]
fn item_03_release_and_abort_from_the_device_change_nothing() {
    let mut h = Harness::new(Duration::from_secs(20));
    h.sent();
    let mut release = Vec::new();
    crate::coap::signal::write_release(&mut release, b"r");
    h.feed(&release);
    let mut abort = Vec::new();
    crate::coap::signal::write_abort(&mut abort, b"a", None, "bye");
    h.feed(&abort);
    assert!(h.sent().is_empty());
    assert!(h.session.is_closed().is_none());
}

#[test]
fn item_04_silent_device_is_pinged_then_closed() {
    let mut h = Harness::new(Duration::from_secs(20));
    h.sent();
    h.advance(Duration::from_secs(9));
    assert!(h.sent().is_empty(), "no ping before 10 s of silence");
    h.advance(Duration::from_secs(1));
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, Code::PING);
    assert_eq!(sent[0].1.len(), 8);
    h.advance(Duration::from_secs(7));
    assert!(h.session.is_closed().is_none(), "still within ~18 s");
    h.advance(Duration::from_secs(1));
    assert_eq!(h.session.is_closed(), Some(&CloseReason::KeepaliveTimeout));
}

#[test]
fn item_04_answered_ping_keeps_the_connection() {
    let mut h = Harness::new(Duration::from_secs(20));
    h.sent();
    h.advance(Duration::from_secs(10));
    let sent = h.sent();
    let token = sent[0].1.clone();
    let mut pong = Vec::new();
    crate::coap::signal::write_pong(&mut pong, &token, false);
    h.advance(Duration::from_secs(1));
    h.feed(&pong);
    h.advance(Duration::from_secs(8));
    assert!(h.session.is_closed().is_none());
    // And the next ping comes 10 s after the Pong.
    h.advance(Duration::from_secs(2));
    assert_eq!(h.sent()[0].0, Code::PING);
}

#[test]
fn any_inbound_frame_counts_as_activity() {
    let mut h = Harness::new(Duration::from_secs(2));
    h.sent();
    for _ in 0..10 {
        h.advance(Duration::from_millis(900));
        h.feed(&request(Code::GET, b"t", &["x.plgd.dev", "time"], None));
    }
    let sent = h.sent();
    assert!(
        sent.iter().all(|m| m.0 == Code::CONTENT),
        "no ping: {sent:?}"
    );
    assert!(h.session.is_closed().is_none());
}

#[test]
fn item_45_time_before_sign_in() {
    let mut h = Harness::new(Duration::from_secs(20));
    h.sent();
    h.feed(&request(Code::GET, b"tok", &["x.plgd.dev", "time"], None));
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    let (code, token, payload, options) = &sent[0];
    assert_eq!(*code, Code::CONTENT);
    assert_eq!(token, b"tok");
    // Content-Format 10000 = 0x2710.
    assert_eq!(options, &vec![(12u16, vec![0x27, 0x10])]);
    let text = "2025-11-24T16:00:00Z";
    let mut expected = vec![0xa1, 0x64];
    expected.extend_from_slice(b"time");
    expected.push(0x60 + text.len() as u8);
    expected.extend_from_slice(text.as_bytes());
    assert_eq!(payload, &expected);
    assert!(h.session.is_closed().is_none());
}

#[test]
fn time_honours_accept_and_rejects_unknown_formats() {
    let mut h = Harness::new(Duration::from_secs(20));
    h.sent();
    h.feed(&request(Code::GET, b"j", &["x.plgd.dev", "time"], Some(50)));
    let sent = h.sent();
    assert_eq!(sent[0].2, br#"{"time":"2025-11-24T16:00:00Z"}"#);
    assert_eq!(sent[0].3, vec![(12u16, vec![50])]);
    h.feed(&request(Code::GET, b"x", &["x.plgd.dev", "time"], Some(41)));
    let sent = h.sent();
    assert_eq!(sent[0].0, Code::BAD_REQUEST);
    assert!(
        sent[0].3.is_empty(),
        "spec §5.0: errors carry no Content-Format"
    );
    assert!(h.session.is_closed().is_none());
}

#[test]
fn ocf_version_options_are_accepted_on_time() {
    let mut h = Harness::new(Duration::from_secs(20));
    h.sent();
    let mut out = Vec::new();
    MessageWriter::new(&mut out, Code::GET, b"v")
        .option_str(crate::coap::option::URI_PATH, "x.plgd.dev")
        .option_str(crate::coap::option::URI_PATH, "time")
        .option_uint(crate::coap::option::ACCEPT, 10000)
        .option_uint(2049, 0x0800)
        .option_uint(2053, 0x0800)
        .finish();
    h.feed(&out);
    assert_eq!(h.sent()[0].0, Code::CONTENT);
}

#[test]
fn unknown_critical_option_is_4_02() {
    let mut h = Harness::new(Duration::from_secs(20));
    h.sent();
    let mut out = Vec::new();
    MessageWriter::new(&mut out, Code::GET, b"c")
        .option_str(crate::coap::option::URI_PATH, "x.plgd.dev")
        .option_str(crate::coap::option::URI_PATH, "time")
        .option(9999, b"?")
        .finish();
    h.feed(&out);
    assert_eq!(h.sent()[0].0, Code::BAD_OPTION);
}

#[test]
fn requests_before_sign_in_get_4_01_and_close() {
    for path in [&["oic", "rd"][..], &["oic", "res"], &["nope"]] {
        let mut h = Harness::new(Duration::from_secs(20));
        h.sent();
        h.feed(&request(Code::POST, b"p", path, None));
        let sent = h.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, Code::UNAUTHORIZED);
        assert_eq!(sent[0].1, b"p");
        assert!(!sent[0].2.is_empty(), "spec §4.6: a diagnostic payload");
        assert_eq!(h.session.is_closed(), Some(&CloseReason::Unauthorized));
        assert_eq!(h.session.poll_timeout(), None);
    }
}

#[test]
fn an_empty_security_request_is_4_00_and_closes() {
    // spec §14 item 16: the reference sends nothing; we answer and close.
    for path in [
        &["oic", "sec", "session"][..],
        &["oic", "sec", "account"],
        &["oic", "sec", "tokenrefresh"],
    ] {
        let mut h = Harness::new(Duration::from_secs(20));
        h.sent();
        h.feed(&request(Code::POST, b"e", path, None));
        let sent = h.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, Code::BAD_REQUEST, "{path:?}");
        assert_eq!(
            h.session.is_closed(),
            Some(&CloseReason::SecurityRequestFailed)
        );
    }
}

#[test]
fn item_05_oversized_frame_is_aborted() {
    let mut h = Harness::new(Duration::from_secs(20));
    h.sent();
    let mut big = Vec::new();
    MessageWriter::new(&mut big, Code::POST, b"b")
        .payload(&[0u8; 2000])
        .finish();
    let err = deframer::frame_len(&big, 1024).unwrap_err();
    h.session.handle_frame_error(err);
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, Code::ABORT);
    assert!(String::from_utf8_lossy(&sent[0].2).contains("exceeds"));
    assert!(matches!(
        h.session.is_closed(),
        Some(CloseReason::Aborted(_))
    ));
}

#[test]
fn unknown_critical_csm_option_is_aborted_with_bad_csm_option() {
    let mut h = Harness::new(Duration::from_secs(20));
    h.sent();
    let mut csm = Vec::new();
    MessageWriter::new(&mut csm, Code::CSM, b"")
        .option(9, b"x")
        .finish();
    h.feed(&csm);
    let mut out = Vec::new();
    while h.session.poll_transmit(&mut out) {}
    let (abort, _) = deframer::next_message(&out, 1024).unwrap().unwrap();
    match Signal::parse(&abort) {
        Ok(Signal::Abort { bad_csm_option, .. }) => assert_eq!(bad_csm_option, Some(9)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn peer_csm_is_recorded() {
    let mut h = Harness::new(Duration::from_secs(20));
    assert_eq!(h.session.peer_csm(), PeerCsm::default());
    let mut csm = Vec::new();
    crate::coap::signal::write_csm(&mut csm, b"", Some(4096), true);
    h.feed(&csm);
    assert_eq!(
        h.session.peer_csm(),
        PeerCsm {
            max_message_size: 4096,
            block_wise: true
        }
    );
    h.sent();
    assert!(h.sent().is_empty(), "a CSM is not answered");
}

#[test]
fn shutdown_sends_release_and_closes() {
    let mut h = Harness::new(Duration::from_secs(20));
    h.sent();
    h.session.shutdown();
    let sent = h.sent();
    assert_eq!(sent[0].0, Code::RELEASE);
    assert_eq!(h.session.is_closed(), Some(&CloseReason::Shutdown));
}

#[test]
fn responses_for_unknown_tokens_are_dropped() {
    let mut h = Harness::new(Duration::from_secs(20));
    h.sent();
    let mut out = Vec::new();
    MessageWriter::new(&mut out, Code::CONTENT, b"zz").finish();
    h.feed(&out);
    assert!(h.sent().is_empty());
    assert!(h.session.is_closed().is_none());
}

#[test]
fn generated_tokens_do_not_repeat() {
    let mut h = Harness::new(Duration::from_secs(20));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10_000 {
        assert!(seen.insert(h.session.next_token()));
    }
}

#[test]
fn idle_session_holds_no_buffer() {
    let mut h = Harness::new(Duration::from_secs(20));
    h.sent();
    assert_eq!(h.session.out.capacity(), 0);
}

#[test]
fn item_12_the_certificate_deadline_sends_release_and_closes() {
    // spec §3.5: the transport glue sets the deadline from the chain's
    // earliest NotAfter; the session says goodbye as at shutdown.
    let mut h = Harness::new(Duration::from_secs(600));
    h.sent();
    h.session
        .set_certificate_deadline(h.now + Duration::from_secs(5));
    h.advance(Duration::from_secs(4));
    assert!(h.session.is_closed().is_none());
    assert!(h.sent().is_empty());
    h.advance(Duration::from_secs(1));
    assert_eq!(
        h.session.is_closed(),
        Some(&CloseReason::CertificateExpired)
    );
    let sent = h.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, Code::RELEASE);
    assert_eq!(h.session.poll_timeout(), None);
}
