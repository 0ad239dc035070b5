//! `storm`, `raw` and `idle --procs` end to end at a tiny size, against a
//! gateway (and for `raw` a libcoap server) the bench spawns. Figures are
//! not checked; counts, failures and the report's shape are.

use serde_json::Value;

mod common;
use common::run;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn storm_brings_every_device_back_in_sync() {
    let r = run(&["storm", "--spawn", "--devices", "20", "--duration", "0s"]);
    assert_eq!(r["scenario"], "storm", "{r}");
    assert_eq!(u(&r["devices"]), 20, "{r}");
    let s = &r["storm"];
    assert_eq!(u(&s["synced"]), 20, "{r}");
    assert_eq!(u(&s["failed_devices"]), 0, "{r}");
    assert_eq!(u(&s["errors"]["total"]), 0, "{r}");
    assert_eq!(u(&s["hub_in_sync"]), 20, "{r}");
    assert_eq!(s["all_back_in_sync_hub"], true, "{r}");
    assert!(s["recovery_s"].as_f64().is_some_and(|x| x > 0.0), "{r}");
    assert_eq!(u(&r["latency_us"]["count"]), 20, "{r}");
    assert_eq!(u(&r["initial"]["synced"]), 20, "{r}");
    assert_eq!(u(&r["disconnect"]["closed"]), 20, "{r}");
    assert_eq!(r["disconnect"]["all_offline"], true, "{r}");
    assert!(r["gateway"]["cpu_seconds"].is_number(), "{r}");
}

#[test]
fn raw_drives_the_gateway_and_libcoap_with_the_same_client() {
    // Never skipped: the comparison is part of the harness.
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join("coap-server-openssl").is_file())
    });
    assert!(
        found,
        "coap-server-openssl is not on PATH: install the Debian package libcoap3-bin \
         (apt-get install libcoap3-bin)"
    );
    let r = run(&[
        "raw",
        "--spawn",
        "--requests",
        "400",
        "--handshakes",
        "20",
        "--idle",
        "10",
        "--connections",
        "2",
        "--window",
        "8",
    ]);
    assert_eq!(r["scenario"], "raw", "{r}");
    assert_eq!(u(&r["errors"]["total"]), 0, "{r}");
    assert_eq!(u(&r["bad_answers"]), 0, "{r}");
    let targets = r["targets"].as_array().expect("targets");
    let names: Vec<&str> = targets
        .iter()
        .filter_map(|t| t["server"].as_str())
        .collect();
    assert_eq!(names, ["gateway", "libcoap"], "{r}");
    for t in targets {
        assert_eq!(u(&t["handshakes"]["ok"]), 20, "{t}");
        assert_eq!(u(&t["handshakes"]["errors"]["total"]), 0, "{t}");
        for pass in ["requests", "requests_with_idle"] {
            assert_eq!(u(&t[pass]["ok"]), 400, "{pass}: {t}");
            assert_eq!(u(&t[pass]["bad_answers"]), 0, "{pass}: {t}");
            assert_eq!(u(&t[pass]["latency_us"]["count"]), 400, "{pass}: {t}");
        }
        assert_eq!(u(&t["idle"]["opened"]), 10, "{t}");
        assert_eq!(u(&t["idle"]["held_at_end"]), 10, "{t}");
        assert_eq!(u(&t["idle"]["closed_by_server"]), 0, "{t}");
    }
    let side = &r["side_by_side"];
    for (i, name) in ["gateway", "libcoap"].into_iter().enumerate() {
        assert!(side["p99_us"][name].is_number(), "p99_us: {r}");
        // CPU time comes in 10 ms clock ticks: a pass this short can cost
        // a server less than one tick, and then it has no per-CPU figure.
        let cpu = targets[i]["requests"]["server_cpu_seconds"].as_f64();
        assert!(
            side["requests_per_cpu_s"][name].is_number() || cpu == Some(0.0),
            "requests_per_cpu_s of {name}: {r}"
        );
    }
}

#[test]
fn idle_spreads_devices_over_worker_processes() {
    let r = run(&[
        "idle",
        "--spawn",
        "--procs",
        "2",
        "--devices",
        "30",
        "--duration",
        "1s",
    ]);
    assert_eq!(r["scenario"], "idle", "{r}");
    assert_eq!(u(&r["procs"]), 2, "{r}");
    assert_eq!(u(&r["idle"]["connected"]), 30, "{r}");
    assert_eq!(u(&r["idle"]["held_at_end"]), 30, "{r}");
    assert_eq!(u(&r["errors"]["total"]), 0, "{r}");
    let per = r["per_process"].as_array().expect("per_process");
    let ips: Vec<&str> = per.iter().filter_map(|p| p["source_ip"].as_str()).collect();
    assert_eq!(ips, ["127.0.0.1", "127.0.0.2"], "{r}");
    let counts: Vec<u64> = per.iter().map(|p| u(&p["held_at_end"])).collect();
    assert_eq!(counts, [15, 15], "{r}");
    assert_eq!(u(&r["latency_us"]["count"]), 30, "{r}");
    assert!(r["gateway"]["bytes_per_device"].is_number(), "{r}");
}

#[test]
fn connect_spreads_handshakes_over_worker_processes() {
    let r = run(&[
        "connect",
        "--spawn",
        "--handshake-only",
        "--procs",
        "2",
        "--devices",
        "40",
    ]);
    assert_eq!(r["scenario"], "connect", "{r}");
    assert_eq!(u(&r["procs"]), 2, "{r}");
    assert_eq!(u(&r["errors"]["total"]), 0, "{r}");
    assert_eq!(u(&r["latency_us"]["count"]), 40, "{r}");
    let per = r["per_process"].as_array().expect("per_process");
    let oks: Vec<u64> = per.iter().map(|p| u(&p["ok"])).collect();
    assert_eq!(oks, [20, 20], "{r}");
    assert_eq!(u(&r["baseline"]["handshakes"]), 40, "{r}");
    assert!(r["ratio"].is_number(), "{r}");
}
