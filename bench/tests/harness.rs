//! The harness self-test of issue 5: a 50-device `connect`, `notify` and
//! `command` run against a gateway the bench spawns completes with 0 lost,
//! 0 duplicated and 0 errors, and each leaves a well-formed report: the
//! JSON fields SURFACE.md names, its latency curve, and the PNG plot.

use serde_json::Value;

mod common;

struct Run {
    report: Value,
    png: Vec<u8>,
    row: String,
}

/// A 50-device run against a spawned gateway, with its plot and its
/// Markdown row.
fn run(args: &[&str]) -> Run {
    let dir = common::run_dir();
    let md = dir.path().join("RESULTS.md");
    let md_arg = md.to_str().expect("a UTF-8 temporary path").to_owned();
    let mut all = args.to_vec();
    all.extend([
        "--spawn",
        "--devices",
        "50",
        "--no-progress",
        "--results-md",
        &md_arg,
    ]);
    let run = common::run_spawning_in(dir, &all);
    let png =
        std::fs::read(run.dir.path().join("report.png")).expect("the plot next to the report");
    let row = std::fs::read_to_string(&md).expect("the Markdown row");
    Run {
        report: run.report,
        png,
        row,
    }
}

/// The top level SURFACE.md promises scripts and docs.
fn assert_well_formed(r: &Run, scenario: &str) {
    let v = &r.report;
    assert_eq!(v["scenario"], scenario, "{v}");
    assert_eq!(v["devices"], 50, "{v}");
    assert!(v["duration_s"].as_f64().is_some_and(|d| d > 0.0), "{v}");
    assert!(
        v["throughput_per_s"].as_f64().is_some_and(|t| t > 0.0),
        "{v}"
    );
    let lat = &v["latency_us"];
    let p = |k: &str| {
        lat[k]
            .as_u64()
            .unwrap_or_else(|| panic!("latency_us.{k}: {lat}"))
    };
    assert!(
        p("p50") > 0 && p("p50") <= p("p90") && p("p90") <= p("p99"),
        "{lat}"
    );
    assert!(p("p99") <= p("p999") && p("p999") <= p("max"), "{lat}");
    let curve = lat["curve"].as_array().expect("latency_us.curve");
    assert!(curve.len() >= 3, "{lat}");
    assert_eq!(curve.last().unwrap()[0], 100.0, "{lat}");
    let gw = &v["gateway"];
    assert!(gw["rss_bytes"].as_u64().is_some_and(|b| b > 0), "{gw}");
    assert!(gw["cpu_seconds"].as_f64().is_some(), "{gw}");
    assert!(gw.get("bytes_per_device").is_some(), "{gw}");
    assert!(
        v.get("baseline").is_some(),
        "baseline (null where none): {v}"
    );
    assert!(v["machine"]["nproc"].as_u64().is_some(), "{v}");
    assert!(
        v["command"].as_str().is_some_and(|c| c.contains(scenario)),
        "{v}"
    );
    assert_eq!(&r.png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        r.row
            .lines()
            .any(|l| l.starts_with("| 20") && l.contains(&format!("| {scenario} |"))),
        "{}",
        r.row
    );
}

#[test]
fn connect_50_devices_no_errors() {
    let r = run(&["connect", "--rounds", "1", "--fleet", "50"]);
    assert_well_formed(&r, "connect");
    assert_eq!(r.report["errors"]["total"], 0, "{}", r.report);
}

#[test]
fn notify_50_devices_nothing_lost_or_duplicated() {
    // At a rate the sampled event stream of a debug build keeps up with,
    // so that the per-sequence check covers the whole run.
    let r = run(&["notify", "--duration", "2s", "--rate", "2000"]);
    assert_well_formed(&r, "notify");
    let v = &r.report;
    // The fleet runs on the shards runtime's client side by default.
    assert_eq!(v["engine"], "shards", "{v}");
    assert_eq!(v["devices"], 50, "{v}");
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["duplicated"], 0, "{v}");
    assert!(v["hub"]["notifications"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["sampled"]["stream_ended"], Value::Null, "{v}");
    assert_eq!(v["sampled"]["sequences"]["lost"], 0, "{v}");
    assert_eq!(v["sampled"]["sequences"]["duplicated"], 0, "{v}");
    assert!(
        v["sampled"]["sequences"]["received"].as_u64().unwrap_or(0) > 0,
        "{v}"
    );
}

#[test]
fn command_50_devices_every_put_answered_once() {
    let r = run(&["command", "--requests", "100"]);
    assert_well_formed(&r, "command");
    let v = &r.report;
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["duplicated"], 0, "{v}");
    assert_eq!(v["exactly_once"]["exactly_once"], 100, "{v}");
}
