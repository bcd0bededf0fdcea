//! Proves the Python test harness (`support::PyRelay`, `support::PyPeer`)
//! against the real ProxyStore relays and clients, before any test relies on
//! it to judge the daemon.

mod support;

use std::time::Duration;

use support::{Dialect, PeerEvent, PyPeer, PyRelay, PythonEnv};
use uuid::Uuid;

const STEP: Duration = Duration::from_secs(15);

/// Two real clients exchange a message through a real relay, and a message
/// to an unregistered uuid comes back to its sender with `error` set.
async fn forward_and_bounce(dialect: Dialect) {
    let relay = PyRelay::start(dialect).await;
    let mut a = PyPeer::start(dialect, &relay.url(), None, "harness-a").await;
    let mut b = PyPeer::start(dialect, &relay.url(), None, "harness-b").await;

    a.send(b.uuid(), "offer", "hello from a").await;
    let got = b.expect_message(STEP).await;
    assert_eq!(got.source_uuid, a.uuid());
    assert_eq!(got.source_name, "harness-a");
    assert_eq!(got.peer_uuid, b.uuid());
    assert_eq!(got.description_type, "offer");
    assert_eq!(got.description, "hello from a");
    assert_eq!(got.error, None);

    b.send(a.uuid(), "answer", "hello from b").await;
    let got = a.expect_message(STEP).await;
    assert_eq!(
        (got.source_uuid, got.source_name.as_str()),
        (b.uuid(), "harness-b")
    );
    assert_eq!(got.description_type, "answer");
    assert_eq!(got.description, "hello from b");
    assert_eq!(got.error, None);

    let nobody = Uuid::new_v4();
    a.send(nobody, "offer", "anyone there?").await;
    let bounced = a.expect_message(STEP).await;
    assert_eq!(
        bounced.source_uuid,
        a.uuid(),
        "a bounce keeps the sender as source"
    );
    assert_eq!(bounced.peer_uuid, nobody);
    assert_eq!(bounced.description, "anyone there?");
    let error = bounced.error.expect("a bounced message carries an error");
    assert!(
        error.contains(dialect.unknown_peer_error_fragment()),
        "{dialect} bounce error {error:?} lacks {:?}",
        dialect.unknown_peer_error_fragment()
    );

    // B saw nothing of the bounce.
    b.expect_silence(Duration::from_millis(200)).await;

    a.quit().await;
    b.quit().await;
}

#[tokio::test]
async fn forward_and_bounce_current() {
    forward_and_bounce(Dialect::Current).await;
}

#[tokio::test]
async fn forward_and_bounce_legacy() {
    forward_and_bounce(Dialect::Legacy).await;
}

/// `PyRelay::kill` + `restart` keep the port, and the real client
/// re-registers by itself and carries messages again.
async fn relay_restart(dialect: Dialect) {
    let mut relay = PyRelay::start(dialect).await;
    let url = relay.url();
    let mut a = PyPeer::start(dialect, &url, None, "restart-a").await;
    let mut b = PyPeer::start(dialect, &url, None, "restart-b").await;

    relay.kill();
    assert!(!relay.is_running());
    // The drop shows up as a closed connection, without a close frame.
    match a.recv(STEP).await {
        PeerEvent::Error { code, .. } => assert_eq!(code, None, "SIGKILL leaves no close code"),
        other => panic!("expected the connection to drop, got {other:?}"),
    }

    relay.restart().await;
    assert_eq!(relay.url(), url, "restart keeps the port");
    a.wait_registered(Duration::from_secs(60)).await;
    b.wait_registered(Duration::from_secs(60)).await;

    a.send(b.uuid(), "offer", "after the restart").await;
    let got = b.expect_message(STEP).await;
    assert_eq!(got.source_uuid, a.uuid());
    assert_eq!(got.description, "after the restart");

    a.quit().await;
    b.quit().await;
}

#[tokio::test]
async fn relay_restart_current() {
    relay_restart(Dialect::Current).await;
}

#[tokio::test]
async fn relay_restart_legacy() {
    relay_restart(Dialect::Legacy).await;
}

/// Current relay: a second registration of a uuid closes the first socket
/// with 4004, which the real client treats as unrecoverable.
#[tokio::test]
async fn duplicate_registration_current() {
    let relay = PyRelay::start(Dialect::Current).await;
    let shared = Uuid::new_v4();
    let mut first = PyPeer::start(Dialect::Current, &relay.url(), Some(shared), "first").await;
    let second = PyPeer::start(Dialect::Current, &relay.url(), Some(shared), "second").await;

    match first.recv(STEP).await {
        PeerEvent::Error { code, .. } => assert_eq!(code, Some(4004)),
        other => panic!("expected a 4004 close, got {other:?}"),
    }
    match first.recv(STEP).await {
        PeerEvent::Error { kind, .. } => assert_eq!(kind, "RelayRegistrationError"),
        other => panic!("expected the client to give up, got {other:?}"),
    }
    let status = first.wait_exit(STEP).await;
    assert!(
        !status.success(),
        "a displaced peer exits non-zero: {status}"
    );

    second.quit().await;
}
