//! The standard gRPC services on the daemon's socket, and clients that know
//! nothing of relay-sidecar: `grpc.health.v1.Health` follows registration,
//! `buf curl` calls GetStatus and the health check through reflection, and a
//! Python grpcio channel with default settings (which sends the socket path
//! as `:authority`) is served.

mod support;

use std::path::Path;
use std::time::Duration;

use relay_sidecar::devrelay::DevRelay;
use relay_sidecar_proto::SERVICE_NAME;
use serde_json::Value;
use support::sidecar::{TestDaemon, channel, require_tool};
use support::{Dialect, free_port, python};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const WAIT: Duration = Duration::from_secs(30);

async fn dev_relay_on(port: u16) -> DevRelay {
    DevRelay::start(
        ([127, 0, 0, 1], port).into(),
        relay_sidecar::codec::Dialect::Current,
        CancellationToken::new(),
    )
    .await
    .expect("dev relay starts")
}

fn ask(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

async fn next_status(updates: &mut tonic::Streaming<HealthCheckResponse>) -> ServingStatus {
    let update = tokio::time::timeout(WAIT, updates.next())
        .await
        .expect("a health update in time")
        .expect("the watch stays open")
        .expect("a health update");
    ServingStatus::try_from(update.status).unwrap()
}

/// Checks the server as a whole ("") and the relay service: both `expected`.
async fn assert_both_checks(
    health: &mut HealthClient<tonic::transport::Channel>,
    expected: ServingStatus,
) {
    for service in ["", SERVICE_NAME] {
        let status = health
            .check(ask(service))
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, expected as i32, "{service:?}");
    }
}

#[tokio::test]
async fn health_is_serving_only_while_registered() {
    // The daemon starts before its relay exists: NOT_SERVING.
    let port = free_port();
    let daemon = TestDaemon::start(&format!("ws://127.0.0.1:{port}"), Dialect::Current).await;
    let mut health = HealthClient::new(channel(&daemon.socket).await);
    assert_both_checks(&mut health, ServingStatus::NotServing).await;
    let unknown = health.check(ask("no.Such")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    let mut updates = health.watch(ask("")).await.unwrap().into_inner();
    assert_eq!(next_status(&mut updates).await, ServingStatus::NotServing);

    let relay = dev_relay_on(port).await;
    assert_eq!(next_status(&mut updates).await, ServingStatus::Serving);
    assert_both_checks(&mut health, ServingStatus::Serving).await;

    // The relay goes away: NOT_SERVING again.
    tokio::time::timeout(WAIT, relay.stop()).await.unwrap();
    assert_eq!(next_status(&mut updates).await, ServingStatus::NotServing);

    // Shutdown ends the watch instead of holding the daemon up.
    daemon.stop().await;
    let end = tokio::time::timeout(WAIT, updates.next()).await.unwrap();
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
}

/// `buf curl` over the socket, with the schema from the daemon's reflection.
async fn buf_curl(buf: &Path, socket: &Path, method: &str, data: &str) -> Value {
    let run = tokio::process::Command::new(buf)
        .arg("curl")
        .arg("--unix-socket")
        .arg(socket)
        .args(["--protocol", "grpc", "--http2-prior-knowledge", "-d", data])
        .arg(format!("http://localhost/{method}"))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT, run)
        .await
        .expect("buf curl ends")
        .expect("buf runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "buf curl {method}: {:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{stdout}: {e}"))
}

#[tokio::test]
async fn buf_curl_calls_get_status_and_health_through_reflection() {
    let buf = require_tool("buf", "npm install -g @bufbuild/buf");
    let relay = dev_relay_on(0).await;
    let daemon = TestDaemon::start(&relay.url(), Dialect::Current).await;
    daemon.registered_client().await;

    let status = buf_curl(
        &buf,
        &daemon.socket,
        "relay_sidecar.v1.RelaySidecar/GetStatus",
        "{}",
    )
    .await;
    assert_eq!(status["uuid"], daemon.uuid.to_string(), "{status}");
    assert_eq!(status["state"], "CONNECTION_STATE_REGISTERED", "{status}");
    let health = buf_curl(
        &buf,
        &daemon.socket,
        "grpc.health.v1.Health/Check",
        &format!("{{\"service\": \"{SERVICE_NAME}\"}}"),
    )
    .await;
    assert_eq!(health["status"], "SERVING", "{health}");
    daemon.stop().await;
}

/// What the Python client below prints for each way of opening a channel.
const PYTHON_CLIENT: &str = r#"
import json, sys
import grpc

socket = sys.argv[1]
channels = {
    # The defaults: grpcio 1.57+ sends the socket path, percent-encoded, as
    # :authority.
    "unix://" + socket: [],
    "unix:" + socket: [],
    # What grpc-java and grpcurl send: the path as it is.
    "unix:" + socket + " (path authority)": [("grpc.default_authority", socket)],
}
for target, options in channels.items():
    with grpc.insecure_channel(target.split(" ")[0], options=options) as channel:
        status = channel.unary_unary("/relay_sidecar.v1.RelaySidecar/GetStatus")(b"", timeout=10)
        health = channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)
        print(json.dumps({"target": target, "status": status.hex(), "health": health.hex()}))
"#;

#[tokio::test]
async fn a_default_python_grpc_channel_is_served() {
    let relay = dev_relay_on(0).await;
    let daemon = TestDaemon::start(&relay.url(), Dialect::Current).await;
    daemon.registered_client().await;
    let output = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(python(Dialect::Current))
            .args(["-c", PYTHON_CLIENT])
            .arg(&daemon.socket)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the python client ends")
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let uuid_hex: String = daemon
        .uuid
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for line in &lines {
        let status = line["status"].as_str().unwrap();
        assert!(status.contains(&uuid_hex), "GetStatus answered: {line}");
        // HealthCheckResponse { status: SERVING }
        assert_eq!(line["health"], "0801", "{line}");
    }
    daemon.stop().await;
}
