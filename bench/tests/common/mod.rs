//! Running `coap-gateway-bench` from its tests: one place for the
//! command, the `--out` report in a temporary directory, the success check
//! with the bench's output on failure, and the report's parsing.

#![allow(dead_code)] // each test binary uses its part

use std::path::Path;
use std::process::Command;

use serde_json::Value;

pub const BENCH: &str = env!("CARGO_BIN_EXE_coap-gateway-bench");

/// A finished run: its report, its stdout, and the directory its files
/// are in (`report.json`, and whatever the arguments put there).
pub struct BenchRun {
    pub report: Value,
    pub stdout: String,
    pub dir: tempfile::TempDir,
}

/// A temporary directory for a run's files.
pub fn run_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Runs the bench with `args` plus `--out <dir>/report.json`; panics with
/// its output when it fails, or when the report is not JSON.
pub fn run_in(dir: tempfile::TempDir, args: &[&str]) -> BenchRun {
    let out = dir.path().join("report.json");
    let result = Command::new(BENCH)
        .args(args)
        .arg("--out")
        .arg(&out)
        .env_remove("RUST_LOG")
        .output()
        .expect("the bench runs");
    let stdout = String::from_utf8_lossy(&result.stdout).into_owned();
    assert!(
        result.status.success(),
        "coap-gateway-bench {args:?}: {:?}\n{stdout}\n{}",
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let report = serde_json::from_str(&text).unwrap_or_else(|e| panic!("report: {e}\n{text}"));
    BenchRun {
        report,
        stdout,
        dir,
    }
}

/// A run against a gateway the bench spawns (`--spawn`): the gateway
/// binary must be next to the bench's.
pub fn run_spawning(args: &[&str]) -> BenchRun {
    run_spawning_in(run_dir(), args)
}

/// [`run_spawning`] with the run's files in `dir`.
pub fn run_spawning_in(dir: tempfile::TempDir, args: &[&str]) -> BenchRun {
    let gateway = Path::new(BENCH).with_file_name("coap-gateway");
    assert!(
        gateway.exists(),
        "{} is built with the workspace (cargo test --workspace)",
        gateway.display()
    );
    run_in(dir, args)
}

/// The report of a run against a spawned gateway.
pub fn run(args: &[&str]) -> Value {
    run_spawning(args).report
}
