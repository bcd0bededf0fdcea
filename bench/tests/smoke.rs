//! The benchmark cannot rot: `relay-sidecar-bench --quick` runs every path
//! it measures (the raw pair in one process and in two, the Unix-socket
//! floor, the sidecar, memory, fan-out, the scale row, the ProxyStore anchor
//! and the sidecar through the Python relay) with tiny counts, and must exit
//! 0 and write every row as JSON. No figure is checked: timings belong to
//! `scripts/bench`, not to the test suite. And `scripts/bench --help`
//! answers without building anything.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Every row the bench reports, in order.
const ROWS: [&str; 34] = [
    "raw.latency_p50",
    "raw.latency_p99",
    "raw.throughput",
    "raw_processes.latency_p50",
    "raw_processes.latency_p99",
    "raw_processes.throughput",
    "ipc.latency_p50",
    "memory.idle_rss",
    "memory.subscribed_rss",
    "memory.subscribed_shared_rss",
    "sidecar.latency_p50",
    "sidecar.latency_p99",
    "session.latency_p50",
    "session.latency_p99",
    "sidecar.grpc_round_trip",
    "sidecar.unary_throughput",
    "sidecar.stream_throughput",
    "sidecar.unary_cpu_sending",
    "sidecar.unary_cpu_receiving",
    "sidecar.stream_cpu_sending",
    "sidecar.stream_cpu_receiving",
    "fanout.delivered",
    "scale.delivered",
    "scale.latency_p50",
    "scale.latency_p99",
    "scale.total_rss",
    "scale.cpu_per_message",
    "proxystore.latency_p50",
    "proxystore.latency_p99",
    "proxystore.throughput",
    "sidecar_py.latency_p50",
    "sidecar_py.latency_p99",
    "sidecar_py.stream_throughput",
    "sidecar_py.unary_throughput",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Python of `scripts/test`'s `.venv` (proxystore 1.1.0), from
/// `RELAY_SIDECAR_PYTHON`; never skipped.
fn python() -> PathBuf {
    let Some(python) = std::env::var_os("RELAY_SIDECAR_PYTHON").filter(|p| !p.is_empty()) else {
        panic!(
            "RELAY_SIDECAR_PYTHON is not set: run scripts/test (it builds .venv with \
             proxystore 1.1.0 and sets it), or export RELAY_SIDECAR_PYTHON=$PWD/.venv/bin/python"
        );
    };
    let python = PathBuf::from(python);
    assert!(
        python.is_file(),
        "RELAY_SIDECAR_PYTHON={} is not a file",
        python.display()
    );
    python
}

/// The daemon binary, built now by the Cargo running this test, so that it
/// is never an older build left in the target directory.
fn daemon() -> PathBuf {
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args([
            "build",
            "--quiet",
            "-p",
            "relay-sidecar",
            "--bin",
            "relay-sidecar",
        ])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(repo_root());
    // What Cargo set for this test is not the build's environment: ring's
    // build script watches CARGO_MANIFEST_DIR, and a value here would
    // rebuild ring and all above it, and again at the next plain build.
    for (key, _) in std::env::vars_os() {
        let name = key.to_string_lossy();
        if ["CARGO_PKG_", "CARGO_BIN_EXE_", "CARGO_MANIFEST_"]
            .iter()
            .any(|prefix| name.starts_with(prefix))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&name.as_ref())
        {
            cargo.env_remove(&key);
        }
    }
    let output = cargo.output().expect("run cargo build");
    assert!(
        output.status.success(),
        "cargo build -p relay-sidecar failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "relay-sidecar")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo built no relay-sidecar executable")
}

#[test]
fn quick_bench_writes_every_row() {
    let python = python();
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let output = Command::new(env!("CARGO_BIN_EXE_relay-sidecar-bench"))
        .arg("--quick")
        .arg("--json")
        .arg(&json)
        .arg("--python")
        .arg(&python)
        .arg("--daemon")
        .arg(daemon())
        .env_remove("RUST_LOG")
        .output()
        .expect("run relay-sidecar-bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "relay-sidecar-bench --quick failed ({}):\n{stderr}",
        output.status
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("| section | measure |"),
        "no table:\n{table}"
    );

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON written"))
            .expect("valid JSON");
    let machine = &report["machine"];
    for key in [
        "cpu",
        "cores",
        "kernel",
        "started",
        "build",
        "python",
        "proxystore",
    ] {
        assert!(!machine[key].is_null(), "machine.{key} missing: {machine}");
    }
    let rows = report["rows"].as_array().expect("rows");
    let keys: Vec<&str> = rows
        .iter()
        .map(|r| r["key"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(keys, ROWS);
    for row in rows {
        let value = row["value"].as_f64().unwrap_or(f64::NAN);
        assert!(value.is_finite() && value > 0.0, "no figure: {row}");
        assert!(
            row["samples"].as_array().is_some_and(|s| !s.is_empty()),
            "no samples: {row}"
        );
        // A row compared with a limit or an anchor carries the ratio, and a
        // row with a target says whether it was met.
        if !row["reference"].is_null() {
            assert!(
                row["ratio"].as_f64().is_some_and(f64::is_finite),
                "no ratio: {row}"
            );
        }
        if !row["target"].is_null() {
            assert!(row["met"].is_boolean(), "target without verdict: {row}");
        }
        // The sidecar is compared with the limit as users meet it: raw
        // clients in processes of their own, not the in-process pair.
        let key = row["key"].as_str().unwrap_or("");
        if key.starts_with("sidecar.") || key.starts_with("fanout.") {
            let reference = row["reference"].as_str().unwrap_or("raw_processes.");
            assert!(reference.starts_with("raw_processes."), "{row}");
        }
    }
}

#[test]
fn scripts_bench_help_builds_nothing() {
    let target = tempfile::tempdir().expect("temp dir");
    let output = Command::new(repo_root().join("scripts/bench"))
        .arg("--help")
        .env("CARGO_TARGET_DIR", target.path())
        .output()
        .expect("run scripts/bench --help");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "scripts/bench --help failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("--quick"), "no usage:\n{stdout}");
    let built: Vec<_> = std::fs::read_dir(target.path())
        .expect("target dir")
        .collect();
    assert!(built.is_empty(), "--help built into {built:?}");
}
