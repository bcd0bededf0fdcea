//! The benchmark cannot rot: `relay-sidecar-bench --quick` runs every path
//! it measures (raw relay, sidecar, memory, fan-out, the ProxyStore anchor
//! and the sidecar through the Python relay) with tiny counts, and must exit
//! 0 and write every row as JSON. No figure is checked: timings belong to
//! `scripts/bench`, not to the test suite.

mod support;

use std::process::Command;

use serde_json::Value;

/// Every row the bench reports, in order.
const ROWS: [&str; 23] = [
    "raw.latency_p50",
    "raw.latency_p99",
    "raw.throughput",
    "memory.idle_rss",
    "memory.subscribed_rss",
    "memory.subscribed_shared_rss",
    "sidecar.latency_p50",
    "sidecar.latency_p99",
    "sidecar.grpc_round_trip",
    "sidecar.unary_throughput",
    "sidecar.stream_throughput",
    "sidecar.unary_cpu_sending",
    "sidecar.unary_cpu_receiving",
    "sidecar.stream_cpu_sending",
    "sidecar.stream_cpu_receiving",
    "fanout.delivered",
    "proxystore.latency_p50",
    "proxystore.latency_p99",
    "proxystore.throughput",
    "sidecar_py.latency_p50",
    "sidecar_py.latency_p99",
    "sidecar_py.stream_throughput",
    "sidecar_py.unary_throughput",
];

#[test]
fn quick_bench_writes_every_row() {
    let python = support::python(support::Dialect::Current);
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let output = Command::new(env!("CARGO_BIN_EXE_relay-sidecar-bench"))
        .arg("--quick")
        .arg("--json")
        .arg(&json)
        .arg("--python")
        .arg(&python)
        .arg("--daemon")
        .arg(env!("CARGO_BIN_EXE_relay-sidecar"))
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
    }
}
