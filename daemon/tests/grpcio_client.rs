//! A Python `grpcio` client, its stubs generated from proto/ at test time,
//! calls GetStatus, Send and Subscribe over the daemon's Unix socket, with a
//! real ProxyStore client as the remote peer on the real relay.

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use support::sidecar::TestDaemon;
use support::{Dialect, PyPeer, PyRelay, python, repo_root};
use tokio::io::{AsyncBufReadExt, BufReader};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn grpcio_client_gets_status_sends_and_subscribes() {
    let dialect = Dialect::Current;
    let relay = PyRelay::start(dialect).await;
    let daemon = TestDaemon::start(&relay.url(), dialect).await;
    daemon.registered_client().await;
    let mut peer = PyPeer::start(dialect, &relay.url(), None, "grpcio-peer").await;

    let root = repo_root();
    let mut child = tokio::process::Command::new(python(dialect))
        .arg(root.join("tests/python/grpc_client.py"))
        .arg("--proto-dir")
        .arg(root.join("proto"))
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("--peer")
        .arg(peer.uuid().to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("grpc client output in time")
            .unwrap()
            .expect("grpc client still running");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"))
    };

    let status = next().await;
    assert_eq!(status["event"], "status");
    assert_eq!(status["uuid"], daemon.uuid.to_string());
    assert_eq!(status["name"], daemon.name);
    assert_eq!(status["state"], "CONNECTION_STATE_REGISTERED");
    assert_eq!(status["dialect"], "current");

    // The rest comes in an order that depends on the threads in the client.
    let (mut invalid, mut reply, mut bounce) = (None, None, None);
    while invalid.is_none() || reply.is_none() || bounce.is_none() {
        let event = next().await;
        match event["event"].as_str().unwrap() {
            "sent" if event["peer_uuid"] == peer.uuid().to_string() => {
                let at_peer = peer.expect_message(WAIT).await;
                assert_eq!(at_peer.source_uuid, daemon.uuid);
                assert_eq!(at_peer.source_name, daemon.name);
                assert_eq!(at_peer.description, "hello from grpcio");
                peer.send(daemon.uuid, "answer", "reply to grpcio").await;
            }
            "sent" => {}
            "invalid_argument" => invalid = Some(event),
            "message" if event["bounced"] == true => bounce = Some(event),
            "message" => reply = Some(event),
            _ => panic!("unexpected output from the grpc client: {event}"),
        }
    }
    let invalid = invalid.unwrap();
    assert!(
        invalid["details"]
            .as_str()
            .unwrap()
            .starts_with("peer_uuid:"),
        "{invalid}"
    );
    let (reply, bounce) = (reply.unwrap(), bounce.unwrap());
    assert_eq!(reply["source_uuid"], peer.uuid().to_string());
    assert_eq!(reply["source_name"], "grpcio-peer");
    assert_eq!(reply["description"], "reply to grpcio");
    assert_eq!(reply["error"], Value::Null);
    assert_eq!(bounce["description"], "lost");
    assert!(
        bounce["error"].as_str().unwrap().contains("not registered"),
        "{bounce}"
    );

    let exit = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "grpc client exit: {exit:?}");
    daemon.stop().await;
}
