//! Many concurrent TLS connections to one gateway process, spread over two
//! shards by SO_REUSEPORT, every one answered.

// Tests are the IO side: they time real sockets (clippy.toml).
#![allow(clippy::disallowed_methods)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use coap_gateway::auth::ClientAuth;
use coap_gateway::coap::{option, Code, MessageWriter};
use common::{TestDevice, TestGateway, TestPki};

const CONNECTIONS: usize = 2_000;
const THREADS: usize = 8;

#[test]
fn two_thousand_concurrent_tls_connections_over_two_shards_are_all_answered() {
    let pki = TestPki::new();
    let mut config = pki.config(ClientAuth::Identity);
    config.coap.shards = 2;
    // The test holds every connection open for its whole duration.
    config.coap.keepalive_timeout = Duration::from_secs(120);
    let gw = TestGateway::start(&config);
    let client = pki.client_config(Some("device"));
    let deadline = Instant::now() + Duration::from_secs(120);

    // Phase 1: open all connections (each thread keeps its own).
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let client = client.clone();
            let addr = gw.addr;
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut devices = Vec::with_capacity(CONNECTIONS / THREADS);
                for _ in 0..CONNECTIONS / THREADS {
                    assert!(Instant::now() < deadline, "took too long");
                    let mut dev = TestDevice::connect_tls(addr, client.clone()).expect("connect");
                    assert_eq!(dev.recv().expect("csm").code, Code::CSM);
                    devices.push(dev);
                }
                // Phase 2: only once every connection is open, each asks the time.
                barrier.wait();
                for (i, dev) in devices.iter_mut().enumerate() {
                    let token = format!("{t}-{i}").into_bytes();
                    let mut req = Vec::new();
                    MessageWriter::new(&mut req, Code::GET, &token)
                        .option_str(option::URI_PATH, "x.plgd.dev")
                        .option_str(option::URI_PATH, "time")
                        .finish();
                    dev.send(&req).expect("send");
                }
                let mut answered = 0;
                for (i, dev) in devices.iter_mut().enumerate() {
                    let m = dev.recv().expect("answer");
                    assert_eq!(m.code, Code::CONTENT);
                    assert_eq!(m.token, format!("{t}-{i}").into_bytes());
                    answered += 1;
                }
                // Keep the connections open until the main thread has
                // read the gateway's counters.
                (answered, devices)
            })
        })
        .collect();
    let results: Vec<(usize, Vec<TestDevice>)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    let answered: usize = results.iter().map(|r| r.0).sum();
    assert_eq!(answered, CONNECTIONS);

    let per_shard: Vec<u64> = gw
        .stats()
        .iter()
        .map(|s| s.handshakes.load(Ordering::Relaxed))
        .collect();
    assert_eq!(per_shard.iter().sum::<u64>(), CONNECTIONS as u64);
    for (i, n) in per_shard.iter().enumerate() {
        assert!(
            *n >= CONNECTIONS as u64 / 5,
            "shard {i} served only {n} of {CONNECTIONS}: {per_shard:?}"
        );
    }
    let active: usize = gw
        .stats()
        .iter()
        .map(|s| s.active.load(Ordering::Relaxed))
        .sum();
    assert_eq!(active, CONNECTIONS);
    drop(results);
}
