//! `idle --transport memory` end to end at a small size: every device
//! gets through the real mutual-TLS handshake, sign-up, sign-in and twin
//! set-up of the gateway's own sessions in memory, then answers every
//! keepalive Ping of a virtual idle time without being closed; the report's
//! figures are present and within sane ranges.

use serde_json::Value;

mod common;

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

#[test]
fn two_hundred_devices_sign_in_in_memory_and_answer_every_keepalive() {
    let common::BenchRun {
        report: r, stdout, ..
    } = common::run_in(
        common::run_dir(),
        &[
            "idle",
            "--transport",
            "memory",
            "--devices",
            "200",
            "--shards",
            "2",
            "--duration",
            "35s",
        ],
    );
    let ctx = format!("{r:#}\n{stdout}");
    assert_eq!(r["scenario"], "idle", "{ctx}");
    assert_eq!(r["transport"], "memory", "{ctx}");
    assert_eq!(r["errors"]["total"], 0, "{ctx}");
    assert_eq!(r["setup"]["devices"], 200, "{ctx}");
    assert_eq!(r["setup"]["in_sync"], 200, "every twin IN_SYNC: {ctx}");
    // The gateway's GET /oic/res for its local endpoints and the twin's
    // link list (spec §6.3, §8.1), answered by each device during set-up.
    assert!(
        r["setup"]["requests_answered"].as_u64().unwrap_or(0) >= 200,
        "{ctx}"
    );
    assert_eq!(r["idle"]["devices"], 200, "all still open: {ctx}");
    assert_eq!(r["closed_by_gateway"], 0, "{ctx}");
    // spec §2.4: a Ping after 10 s of silence with the default 20 s
    // timeout, so 3 in 35 s of virtual idle time, or 4 for a device whose
    // last activity was more than 5 s before the idle phase began (a slow
    // set-up in a debug build).
    let pings = r["idle"]["pings_answered"].as_u64().unwrap_or(0);
    assert!((600..=800).contains(&pings), "{pings} Pings: {ctx}");
    assert_eq!(f(&r["idle"]["virtual_s"]), 35.0, "{ctx}");

    // Sane figures: the set-up did cost the gateway CPU, a device's
    // set-up took some time, memory grew. Per-device memory at 200
    // devices is dominated by allocator noise (a few pages), so only a
    // wide range is checked; the figures are for 10,000 and up.
    assert!(f(&r["setup"]["gateway_cpu_us_per_device"]) > 10.0, "{ctx}");
    assert!(f(&r["setup"]["devices_per_wall_s"]) > 0.0, "{ctx}");
    assert!(r["latency_us"]["p50"].as_u64().unwrap_or(0) > 0, "{ctx}");
    let per_device = f(&r["gateway"]["process_bytes_per_device"]);
    assert!(
        (1_000.0..200_000.0).contains(&per_device),
        "process bytes per device {per_device}: {ctx}"
    );
    assert!(
        r["gateway"]["device_side_bytes_per_device"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
    assert!(f(&r["idle"]["gateway_cpu_us_per_ping"]) > 0.0, "{ctx}");
    assert!(
        f(&r["idle"]["gateway_cpu_us_per_device_per_s"]) > 0.0,
        "{ctx}"
    );
    assert!(stdout.contains("set-up:"), "{stdout}");
}

#[test]
fn memory_transport_is_refused_outside_idle_and_with_a_gateway() {
    for args in [
        &["notify", "--transport", "memory"][..],
        &["idle", "--transport", "memory", "--spawn"][..],
    ] {
        let out = std::process::Command::new(common::BENCH)
            .args(args)
            .output()
            .expect("the bench runs");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}
