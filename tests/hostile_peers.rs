//! Peers that do not play by the rules (issue 15), against the gateway as
//! a process: its memory and its other devices must not care.
//!
//! The slow reader: one TLS connection with a valid device certificate and
//! no sign-in sends a CSM, then pipelines 7.02 Pings and never reads a
//! Pong. Pings are allowed before sign-in (spec §2.4), so anyone who can
//! open a connection can do this. The gateway stops reading from a peer
//! that leaves `coap.max_outbound_bytes` of its bytes unread, and closes it
//! once that has lasted `coap.write_stall_timeout`.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_gateway::coap::{signal, Code, MessageWriter};
use common::process::{Gateway, Setup};
use common::DEVICE_ID;

/// The gateway's resident memory, from `/proc/<pid>/status`, in bytes.
fn rss(gw: &Gateway) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.child.id()))
        .expect("the gateway's /proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// One counter or gauge of `GET /metrics`, summed over its shards.
fn metric(setup: &Setup, name: &str) -> u64 {
    let mut body = String::new();
    let mut s = TcpStream::connect(("127.0.0.1", setup.api_port)).expect("API");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("GET /metrics");
    s.read_to_string(&mut body).expect("metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// The TLS client config of a device with an identity certificate for
/// [`DEVICE_ID`] (made once per gateway).
fn device_tls(setup: &Setup) -> Arc<rustls::ClientConfig> {
    let dir = setup.data.join("devices");
    let (cert, key) = if dir.join("device.pem").exists() {
        (dir.join("device.pem"), dir.join("device-key.pem"))
    } else {
        setup.device_certificate(DEVICE_ID)
    };
    coap_gateway::auth::tls::client_config(
        &setup.pki().join("ca.pem"),
        Some((cert.as_path(), key.as_path())),
    )
    .expect("device TLS config")
}

/// A device's TLS connection, driven by hand so that it can write without
/// ever reading.
struct RawDevice {
    tls: rustls::ClientConnection,
    tcp: TcpStream,
}

impl RawDevice {
    fn connect(setup: &Setup) -> RawDevice {
        let config = device_tls(setup);
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = rustls::ClientConnection::new(config, name).expect("client");
        let mut tcp = TcpStream::connect(("127.0.0.1", setup.port)).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp).expect("TLS handshake");
        }
        let mut csm = Vec::new();
        MessageWriter::new(&mut csm, Code::CSM, b"").finish();
        tls.writer().write_all(&csm).expect("CSM");
        tls.complete_io(&mut tcp).expect("send CSM");
        tcp.set_nonblocking(true).expect("non-blocking");
        RawDevice { tls, tcp }
    }

    /// Pipelines Pings for `how_long` without reading anything; returns
    /// how many went into the socket.
    fn ping_without_reading(&mut self, how_long: Duration) -> u64 {
        let mut ping = Vec::new();
        signal::write_ping(&mut ping, b"", false);
        let batch: Vec<u8> = ping.repeat(512);
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < how_long {
            if !self.tls.wants_write() {
                self.tls.writer().write_all(&batch).expect("pings");
                sent += 512;
            }
            match self.tls.write_tls(&mut self.tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                // Closed by the gateway (the write-stall test).
                Err(_) => break,
            }
        }
        sent
    }
}

/// What one slow reader did to a gateway with `extra` `[coap]` keys.
#[derive(Debug)]
struct SlowReader {
    /// Pings the socket took after 3 s and after 15 s.
    sent: [u64; 2],
    /// The gateway's RSS before, after 3 s, after 15 s.
    rss: [u64; 3],
    /// `coapgw_outbound_queued_bytes` after 3 s and after 15 s.
    queued: [u64; 2],
    /// `coapgw_outbound_backpressure_total` at the end.
    paused: u64,
}

fn slow_reader_run(extra: &str) -> SlowReader {
    let setup = Setup::new(extra);
    let mut gw = setup.serve();
    setup.wait_ready(&mut gw, Duration::from_secs(20));
    let mut dev = RawDevice::connect(&setup);
    std::thread::sleep(Duration::from_millis(500));
    let rss0 = rss(&gw);
    let sent1 = dev.ping_without_reading(Duration::from_secs(3));
    let rss1 = rss(&gw);
    let queued1 = metric(&setup, "coapgw_outbound_queued_bytes");
    let sent2 = sent1 + dev.ping_without_reading(Duration::from_secs(12));
    let rss2 = rss(&gw);
    let queued2 = metric(&setup, "coapgw_outbound_queued_bytes");
    let run = SlowReader {
        sent: [sent1, sent2],
        rss: [rss0, rss1, rss2],
        queued: [queued1, queued2],
        paused: metric(&setup, "coapgw_outbound_backpressure_total"),
    };
    eprintln!("{extra:?}: {run:?}");
    // Other devices are served meanwhile.
    let tls = device_tls(&setup);
    let addr = format!("127.0.0.1:{}", setup.port).parse().expect("addr");
    common::ocf::OcfDevice::connect_to(addr, tls).assert_open();
    drop(dev);
    run
}

#[test]
fn a_device_that_never_reads_its_pongs_cannot_grow_the_gateways_memory() {
    let run = slow_reader_run("write_stall_timeout = \"120s\"\n");
    let ([sent1, sent2], [rss0, rss1, rss2], paused) = (run.sent, run.rss, run.paused);
    // Each Pong is a TLS record of ~24 bytes, so a few hundred thousand
    // Pings fill the kernel's buffers between the two ends and then
    // max_outbound_bytes; past that the gateway reads nothing more from
    // this device, whose writes then block. (Before the bound the gateway
    // read every Ping and queued every Pong: 25-40 MB in 90 s.)
    assert!(paused >= 1, "reading from the device was never paused");
    // What waits for its socket stays at the bound (256 KiB by default),
    // where a gateway without it (max_outbound_bytes = 1 GiB, tried by
    // hand) queued 119 MB and grew its RSS from 49 to 303 MB in 15 s,
    // plus what the last read before the pause produced (a 16 KiB read of
    // Pings is 8,192 Pongs of 24 bytes).
    for q in run.queued {
        assert!(
            q <= (256 << 10) + (256 << 10),
            "{q} bytes queued for one device that reads nothing: {run:?}"
        );
    }
    assert!(
        sent1 >= 100_000,
        "only {sent1} Pings went out: the test did not load the gateway"
    );
    // (The kernel may still widen its buffers a little: autotuning.)
    assert!(
        sent2 - sent1 < sent1 / 2,
        "the gateway kept reading from a device that reads nothing: {sent1} Pings after 3 s, \
         {sent2} after 15 s"
    );
    // RSS moves in 2 MiB steps here (transparent huge pages under
    // mimalloc): the first burst fills the shard's buffers once, then it
    // stays put.
    assert!(
        rss2.saturating_sub(rss1) <= 4 << 20,
        "the gateway's RSS grew by {} bytes between 3 s and 15 s ({rss1} -> {rss2})",
        rss2.saturating_sub(rss1)
    );
    assert!(
        rss2.saturating_sub(rss0) <= 16 << 20,
        "the gateway's RSS grew by {} bytes ({rss0} -> {rss2})",
        rss2.saturating_sub(rss0)
    );
}

#[test]
fn a_device_that_stays_stalled_is_closed_after_the_write_stall_timeout() {
    let setup = Setup::new("write_stall_timeout = \"2s\"\n");
    let mut gw = setup.serve();
    setup.wait_ready(&mut gw, Duration::from_secs(20));
    let mut dev = RawDevice::connect(&setup);
    let started = Instant::now();
    dev.ping_without_reading(Duration::from_secs(4));
    // Closed within the timeout (+ a timer tick), counted once.
    loop {
        let closes = metric(&setup, "coapgw_write_stall_closes_total");
        if closes == 1 && metric(&setup, "coapgw_connections_active") == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "not closed: {closes} write-stall closes\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn past_max_handshakes_new_connections_wait_and_connected_devices_are_served() {
    // Two connections that never send a ClientHello hold the shard's two
    // handshake places until `handshake_timeout`; a third device waits in
    // the listen backlog meanwhile, while a device already connected keeps
    // getting its Pongs.
    let setup = Setup::new("max_handshakes_per_shard = 2\nhandshake_timeout = \"2s\"\n");
    let mut gw = setup.serve();
    setup.wait_ready(&mut gw, Duration::from_secs(20));
    let tls = device_tls(&setup);
    let addr = format!("127.0.0.1:{}", setup.port).parse().expect("addr");
    let mut connected = common::ocf::OcfDevice::connect_to(addr, tls.clone());
    connected.assert_open();
    let silent: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", setup.port)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let waiting = std::thread::spawn(move || {
        let mut dev = common::ocf::OcfDevice::connect_to(addr, tls);
        dev.assert_open();
        started.elapsed()
    });
    // Served meanwhile: a Ping round trip on the connected device.
    std::thread::sleep(Duration::from_millis(500));
    let ping_started = Instant::now();
    let mut ping = Vec::new();
    signal::write_ping(&mut ping, b"p", false);
    connected.dev.send(&ping).expect("ping");
    let pong = connected.dev.recv().expect("pong");
    assert_eq!(pong.code, Code::PONG);
    assert!(
        ping_started.elapsed() < Duration::from_millis(500),
        "a connected device waited {:?} for its Pong",
        ping_started.elapsed()
    );
    let took = waiting.join().expect("the waiting device");
    assert!(
        took >= Duration::from_millis(1500),
        "a device was admitted after {took:?}, with both handshake places held"
    );
    assert!(metric(&setup, "coapgw_accept_paused_total") >= 1);
    drop(silent);
}
