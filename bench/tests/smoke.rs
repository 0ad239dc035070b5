//! Each device scenario of `coap-gateway-bench` runs end to end against a
//! gateway it spawns, at a tiny size: the simulated devices must keep up
//! with what the gateway asks of them (a twin set-up the bench devices did
//! not answer once broke the `signin` scenario without any test noticing).
//! Figures are not checked here; only that every request succeeded.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_coap-gateway-bench");

fn run(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("report.json");
    let gateway = Path::new(BENCH).with_file_name("coap-gateway");
    assert!(
        gateway.exists(),
        "{} is built with the workspace (cargo test --workspace)",
        gateway.display()
    );
    let result = Command::new(BENCH)
        .args(args)
        .arg("--out")
        .arg(&out)
        .env_remove("RUST_LOG")
        .output()
        .expect("the bench runs");
    let report = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        result.status.success(),
        "coap-gateway-bench {args:?}: {:?}\n{}\n{}",
        result.status,
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    serde_json::from_str(&report).unwrap_or_else(|e| panic!("report: {e}\n{report}"))
}

#[test]
fn signin_signs_in_over_established_connections_without_errors() {
    let r = run(&[
        "signin",
        "--spawn",
        "--devices",
        "5",
        "--requests",
        "200",
        "--rounds",
        "1",
    ]);
    assert_eq!(r["errors"]["total"], 0, "{r}");
    assert_eq!(r["gateway"]["signins"], 200, "{r}");
}

#[test]
fn notify_counts_every_notification_in_the_hub() {
    let r = run(&["notify", "--spawn", "--devices", "5", "--duration", "1s"]);
    assert_eq!(r["hub"]["lost_or_uncounted"], 0, "{r}");
    assert!(r["hub"]["notifications"].as_u64().unwrap_or(0) > 0, "{r}");
}

#[test]
fn command_answers_every_put_exactly_once() {
    let r = run(&["command", "--spawn", "--devices", "5", "--requests", "20"]);
    assert_eq!(r["exactly_once"]["exactly_once"], 20, "{r}");
    assert_eq!(r["outcomes"]["ok"], 20, "{r}");
}
