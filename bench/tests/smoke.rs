//! Each device scenario of `coap-gateway-bench` runs end to end against a
//! gateway it spawns, at a tiny size: the simulated devices must keep up
//! with what the gateway asks of them (a twin set-up the bench devices did
//! not answer once broke the `signin` scenario without any test noticing).
//! Figures are not checked here; only that every request succeeded.

mod common;
use common::run;

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

#[test]
fn the_thread_engine_still_drives_notify_and_command() {
    let r = run(&[
        "notify",
        "--spawn",
        "--devices",
        "5",
        "--duration",
        "1s",
        "--engine",
        "threads",
    ]);
    assert_eq!(r["engine"], "threads", "{r}");
    assert_eq!(r["hub"]["lost_or_uncounted"], 0, "{r}");
    assert!(r["hub"]["notifications"].as_u64().unwrap_or(0) > 0, "{r}");
    let r = run(&[
        "command",
        "--spawn",
        "--devices",
        "5",
        "--requests",
        "20",
        "--engine",
        "threads",
    ]);
    assert_eq!(r["exactly_once"]["exactly_once"], 20, "{r}");
}
