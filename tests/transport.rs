//! Connection behaviour over real TLS sockets (spec §2, checklist items 1–5).

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use coap_gateway::auth::ClientAuth;
use coap_gateway::coap::{option, signal, Code, MessageWriter};
use common::{Msg, TestDevice, TestGateway, TestPki};

fn time_request(token: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    MessageWriter::new(&mut out, Code::GET, token)
        .option_str(option::URI_PATH, "x.plgd.dev")
        .option_str(option::URI_PATH, "time")
        .finish();
    out
}

fn connect(pki: &TestPki, gw: &TestGateway) -> TestDevice {
    TestDevice::connect_tls(gw.addr, pki.client_config(Some("device"))).expect("connects")
}

fn assert_time_answer(dev: &mut TestDevice, token: &[u8]) {
    dev.send(&time_request(token)).expect("send");
    let m = dev.recv().expect("answer");
    assert_eq!(m.code, Code::CONTENT, "{m:?}");
    assert_eq!(m.token, token);
    assert!(!m.payload.is_empty());
}

#[test]
fn item_01_gateway_sends_csm_without_options_first() {
    let pki = TestPki::new();
    let gw = TestGateway::start(&pki.config(ClientAuth::Identity));
    let mut dev = connect(&pki, &gw);
    let first = dev.recv().expect("csm");
    assert_eq!(first.code, Code::CSM);
    assert_eq!(first.token.len(), 8);
    assert!(first.options.is_empty() && first.payload.is_empty());
    // spec §2.3: no peer CSM is needed before requests.
    assert_time_answer(&mut dev, b"t1");
}

#[test]
fn item_02_ping_gets_pong_with_the_same_token() {
    let pki = TestPki::new();
    let gw = TestGateway::start(&pki.config(ClientAuth::Identity));
    let mut dev = connect(&pki, &gw);
    dev.recv().expect("csm");
    let mut ping = Vec::new();
    signal::write_ping(&mut ping, b"\xaa\xbb", false);
    dev.send(&ping).unwrap();
    let pong = dev.recv().expect("pong");
    assert_eq!(pong.code, Code::PONG);
    assert_eq!(pong.token, b"\xaa\xbb");
}

#[test]
fn item_03_release_and_abort_from_the_device_are_ignored() {
    let pki = TestPki::new();
    let gw = TestGateway::start(&pki.config(ClientAuth::Identity));
    let mut dev = connect(&pki, &gw);
    dev.recv().expect("csm");
    let mut bytes = Vec::new();
    signal::write_release(&mut bytes, b"r");
    signal::write_abort(&mut bytes, b"a", None, "going");
    dev.send(&bytes).unwrap();
    // The next thing we hear is the answer to this request: nothing was
    // sent for Release/Abort and the connection is still up.
    assert_time_answer(&mut dev, b"after");
}

#[test]
fn item_04_keepalive_pings_and_closes_a_silent_device() {
    let pki = TestPki::new();
    let mut config = pki.config(ClientAuth::Identity);
    config.coap.keepalive_timeout = Duration::from_secs(2);
    let gw = TestGateway::start(&config);
    let mut dev = connect(&pki, &gw);
    let (msgs, took) = dev.recv_until_closed(Duration::from_secs(6));
    let codes: Vec<Code> = msgs.iter().map(|m| m.code).collect();
    assert_eq!(codes, vec![Code::CSM, Code::PING], "{msgs:?}");
    // Ping after 1 s of silence, close by ~1.8 s (+ one 50 ms timer tick).
    assert!(
        took >= Duration::from_millis(1500),
        "closed too early: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "closed too late: {took:?}");
}

#[test]
fn item_04_a_device_that_answers_pings_stays_connected() {
    let pki = TestPki::new();
    let mut config = pki.config(ClientAuth::Identity);
    config.coap.keepalive_timeout = Duration::from_secs(2);
    let gw = TestGateway::start(&config);
    let mut dev = connect(&pki, &gw);
    dev.recv().expect("csm");
    let started = std::time::Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(4) {
        let m: Msg = dev.recv().expect("still connected");
        assert_eq!(m.code, Code::PING);
        pings += 1;
        let mut pong = Vec::new();
        signal::write_pong(&mut pong, &m.token, false);
        dev.send(&pong).unwrap();
    }
    assert!(pings >= 3, "pinged {pings} times in 4 s");
    assert_time_answer(&mut dev, b"alive");
}

#[test]
fn item_05_oversized_frame_aborts_that_connection_only() {
    let pki = TestPki::new();
    let mut config = pki.config(ClientAuth::Identity);
    config.coap.max_message_size = 1024;
    let gw = TestGateway::start(&config);
    let mut bystander = connect(&pki, &gw);
    bystander.recv().expect("csm");
    let mut dev = connect(&pki, &gw);
    dev.recv().expect("csm");
    // Len nibble 14: two extended bytes, 2000 - 269 = 1731 → announces 2000.
    dev.send(&[0xE1, 0x06, 0xC3, 0x02, 0x01]).unwrap();
    let (msgs, _) = dev.recv_until_closed(Duration::from_secs(5));
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0].code, Code::ABORT);
    let reason = String::from_utf8_lossy(&msgs[0].payload).to_string();
    assert!(
        reason.contains("2000") && reason.contains("1024"),
        "{reason}"
    );
    assert_time_answer(&mut bystander, b"still");
}

#[test]
fn malformed_frame_is_aborted_with_a_reason() {
    let pki = TestPki::new();
    let gw = TestGateway::start(&pki.config(ClientAuth::Identity));
    let mut dev = connect(&pki, &gw);
    dev.recv().expect("csm");
    // TKL 9 is reserved (RFC 8323 §3.2).
    dev.send(&[0x09, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
    let (msgs, _) = dev.recv_until_closed(Duration::from_secs(5));
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0].code, Code::ABORT);
    assert!(String::from_utf8_lossy(&msgs[0].payload).contains("token length"));
}

#[test]
fn requests_before_sign_in_get_4_01_and_the_connection_closes() {
    let pki = TestPki::new();
    let gw = TestGateway::start(&pki.config(ClientAuth::Identity));
    let mut dev = connect(&pki, &gw);
    dev.recv().expect("csm");
    dev.send(&rd_before_sign_in()).unwrap();
    let (msgs, _) = dev.recv_until_closed(Duration::from_secs(5));
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].code, Code::UNAUTHORIZED);
    assert_eq!(msgs[0].token, b"rd");
}

fn rd_before_sign_in() -> Vec<u8> {
    let mut req = Vec::new();
    MessageWriter::new(&mut req, Code::POST, b"rd")
        .option_str(option::URI_PATH, "oic")
        .option_str(option::URI_PATH, "rd")
        .payload(b"\xa0")
        .finish();
    req
}

fn active(gw: &TestGateway) -> usize {
    gw.stats()
        .iter()
        .map(|s| s.active.load(std::sync::atomic::Ordering::Relaxed))
        .sum()
}

/// A gateway lingering `linger` after an answer that ends a connection,
/// and a device that sent a request before signing in and read the 4.01
/// (spec §4.6); also when the 4.01 was read.
fn refused_before_sign_in(
    linger: Duration,
) -> (TestPki, TestGateway, TestDevice, std::time::Instant) {
    let pki = TestPki::new();
    let mut config = pki.config(ClientAuth::Identity);
    config.coap.close_linger = linger;
    let gw = TestGateway::start(&config);
    let mut dev = connect(&pki, &gw);
    dev.recv().expect("csm");
    dev.send(&rd_before_sign_in()).unwrap();
    let m = dev.recv().expect("the 4.01 arrives on its own");
    assert_eq!(m.code, Code::UNAUTHORIZED);
    (pki, gw, dev, std::time::Instant::now())
}

#[test]
fn an_answer_that_ends_the_connection_comes_before_the_close_by_the_linger() {
    // spec Appendix A.7: a device that reads the answer and the close in
    // one read drops the answer, so the gateway lingers before it closes.
    let (_pki, _gw, mut dev, answered) = refused_before_sign_in(Duration::from_millis(1500));
    // Anything the device sends now is ignored (no answer, no error).
    dev.send(&time_request(b"late")).unwrap();
    let (msgs, _) = dev.recv_until_closed(Duration::from_secs(5));
    let took = answered.elapsed();
    assert!(msgs.is_empty(), "nothing after the answer: {msgs:?}");
    assert!(
        took >= Duration::from_millis(1300),
        "closed {took:?} after the answer: no linger"
    );
}

#[test]
fn a_device_that_closes_after_the_answer_ends_the_linger() {
    let (_pki, gw, dev, _) = refused_before_sign_in(Duration::from_secs(20));
    assert_eq!(active(&gw), 1, "lingering");
    drop(dev);
    let started = std::time::Instant::now();
    while active(&gw) > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the gateway kept a closed device's connection for the whole linger"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn frames_split_across_tls_records_and_batched_frames_are_handled() {
    let pki = TestPki::new();
    let gw = TestGateway::start(&pki.config(ClientAuth::Identity));
    let mut dev = connect(&pki, &gw);
    dev.recv().expect("csm");
    let req = time_request(b"split");
    // One request byte by byte: each byte is its own TLS record.
    for b in &req {
        dev.send(std::slice::from_ref(b)).unwrap();
    }
    assert_eq!(dev.recv().unwrap().token, b"split");
    // Three requests in one record.
    let mut many = Vec::new();
    for t in [b"a", b"b", b"c"] {
        many.extend_from_slice(&time_request(t));
    }
    dev.send(&many).unwrap();
    for t in [b"a", b"b", b"c"] {
        assert_eq!(dev.recv().unwrap().token, t);
    }
}

#[test]
fn handshake_timeout_closes_a_connection_that_never_speaks_tls() {
    let pki = TestPki::new();
    let mut config = pki.config(ClientAuth::Identity);
    config.coap.handshake_timeout = Duration::from_millis(500);
    let gw = TestGateway::start(&config);
    let mut tcp = std::net::TcpStream::connect(gw.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut tcp, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without data");
    assert!(started.elapsed() < Duration::from_secs(3));
    let failures: u64 = gw
        .stats()
        .iter()
        .map(|s| {
            s.handshake_failures
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert_eq!(failures, 1);
}

#[test]
fn max_connections_refuses_the_connection_over_the_limit() {
    let pki = TestPki::new();
    let mut config = pki.config(ClientAuth::Identity);
    config.coap.max_connections = 2;
    let gw = TestGateway::start(&config);
    let mut a = connect(&pki, &gw);
    let mut b = connect(&pki, &gw);
    a.recv().expect("csm");
    b.recv().expect("csm");
    let third = TestDevice::connect_tls(gw.addr, pki.client_config(Some("device")));
    assert!(third.is_err(), "the third connection must be refused");
    drop(a);
    // The slot frees up once the gateway saw the close.
    let started = std::time::Instant::now();
    loop {
        if let Ok(mut c) = TestDevice::connect_tls(gw.addr, pki.client_config(Some("device"))) {
            if c.recv().is_ok() {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "slot never freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn graceful_shutdown_sends_release() {
    let pki = TestPki::new();
    let mut gw = TestGateway::start(&pki.config(ClientAuth::Identity));
    let mut dev = connect(&pki, &gw);
    dev.recv().expect("csm");
    let rt = gw.gateway.take().unwrap();
    rt.shutdown();
    let (msgs, _) = dev.recv_until_closed(Duration::from_secs(5));
    assert_eq!(
        msgs.iter().map(|m| m.code).collect::<Vec<_>>(),
        vec![Code::RELEASE]
    );
    rt.join();
}

#[test]
fn plain_tcp_when_tls_is_disabled() {
    let pki = TestPki::new();
    let mut config = pki.config(ClientAuth::Identity);
    config.coap.tls.enabled = false;
    let gw = TestGateway::start(&config);
    let mut dev = TestDevice::connect_plain(gw.addr).unwrap();
    assert_eq!(dev.recv().unwrap().code, Code::CSM);
    assert_time_answer(&mut dev, b"plain");
}
