//! relayctl as an operator uses it: status, send, listen, human and JSON.

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use support::Dialect;
use support::sidecar::{TestDaemon, dev_relay, relayctl};
use tokio::io::{AsyncBufReadExt, BufReader};

const WAIT: Duration = Duration::from_secs(20);

async fn run(command: &mut tokio::process::Command) -> std::process::Output {
    tokio::time::timeout(WAIT, command.output())
        .await
        .expect("relayctl exits in time")
        .expect("relayctl runs")
}

#[tokio::test]
async fn status_send_and_listen() {
    let relay = dev_relay().await;
    let daemon = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let client = daemon.registered_client().await;

    let status = run(relayctl(&daemon.socket).arg("status")).await;
    assert!(status.status.success());
    let text = String::from_utf8(status.stdout).unwrap();
    assert!(
        text.contains(&daemon.uuid.to_string()) && text.contains("registered"),
        "{text}"
    );

    let json = run(relayctl(&daemon.socket).args(["--json", "status"])).await;
    let json: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["state"], "registered");
    assert_eq!(json["uuid"], daemon.uuid.to_string());

    let mut listen = relayctl(&daemon.socket)
        .args(["--json", "listen", "--count", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the listener is subscribed.
    tokio::time::timeout(WAIT, async {
        while client.status().await.unwrap().counters.subscribers == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("listener subscribed");

    let me = daemon.uuid.to_string();
    let nobody = uuid::Uuid::new_v4().to_string();
    assert!(
        run(relayctl(&daemon.socket).args(["send", &me, "offer", "hello, me"]))
            .await
            .status
            .success()
    );
    assert!(
        run(relayctl(&daemon.socket).args(["send", &nobody, "answer", "anyone?"]))
            .await
            .status
            .success()
    );

    let mut lines = BufReader::new(listen.stdout.take().unwrap()).lines();
    let mut got = Vec::new();
    while let Some(line) = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
    {
        got.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    assert!(
        listen.wait().await.unwrap().success(),
        "listen --count 2 exits 0"
    );
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["description"], "hello, me");
    assert_eq!(got[0]["bounced"], false);
    assert_eq!(got[1]["description"], "anyone?");
    assert_eq!(got[1]["bounced"], true);
    assert!(got[1]["error"].as_str().unwrap().contains("not registered"));

    // Bad input is refused with a message naming it; a missing daemon with
    // the socket path that was tried.
    let bad = run(relayctl(&daemon.socket).args(["send", "nope", "offer", "x"])).await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("nope"));
    let missing = run(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_relayctl")).args([
            "--socket",
            "/nonexistent/relay.sock",
            "status",
        ]),
    )
    .await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/relay.sock"));
    daemon.stop().await;
}
