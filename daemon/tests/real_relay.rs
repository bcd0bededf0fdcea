//! The daemon against the real ProxyStore relays from PyPI (1.1.0 and
//! 0.5.2), with the real ProxyStore Python client as the remote peer.

mod support;

use std::time::Duration;

use relay_sidecar_client::{ConnectionState, DescriptionType, Error};
use support::sidecar::{TestDaemon, registered, wait_for_state};
use support::{Dialect, PyPeer, PyRelay, PythonEnv};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

async fn forwards_both_ways_and_reports_bounces(dialect: Dialect) {
    let relay = PyRelay::start(dialect).await;
    let daemon = TestDaemon::start(&relay.url(), dialect).await;
    let client = daemon.client().await;
    let mut inbox = client.subscribe(None).await.unwrap();
    let status = registered(&client).await;
    assert_eq!(status.uuid, daemon.uuid);
    assert_eq!(status.dialect, dialect.as_str());

    let mut peer = PyPeer::start(dialect, &relay.url(), None, "python-peer").await;

    // Peer -> daemon -> subscriber, with the peer's identity.
    peer.send(daemon.uuid, "offer", "from python").await;
    let got = tokio::time::timeout(WAIT, inbox.next_message())
        .await
        .expect("message from the peer in time")
        .unwrap()
        .unwrap();
    assert_eq!(got.source_uuid, peer.uuid());
    assert_eq!(got.source_name, "python-peer");
    assert_eq!(got.peer_uuid, daemon.uuid);
    assert_eq!(
        (got.description_type.as_str(), got.description.as_str()),
        ("offer", "from python")
    );
    assert!(!got.bounced);
    assert_eq!(got.error, None);

    // Worker -> daemon -> peer, with the daemon's identity as source.
    client
        .send(peer.uuid(), DescriptionType::Answer, "from the sidecar")
        .await
        .unwrap();
    let at_peer = peer.expect_message(WAIT).await;
    assert_eq!(at_peer.source_uuid, daemon.uuid);
    assert_eq!(at_peer.source_name, daemon.name);
    assert_eq!(at_peer.peer_uuid, peer.uuid());
    assert_eq!(at_peer.description_type, "answer");
    assert_eq!(at_peer.description, "from the sidecar");
    assert_eq!(at_peer.error, None);

    // To nobody: the relay returns it, and it arrives flagged.
    let nobody = Uuid::new_v4();
    client
        .send(nobody, DescriptionType::Offer, "to nobody")
        .await
        .unwrap();
    let bounce = tokio::time::timeout(WAIT, inbox.next_message())
        .await
        .expect("bounce in time")
        .unwrap()
        .unwrap();
    assert!(bounce.bounced);
    assert_eq!(bounce.source_uuid, daemon.uuid);
    assert_eq!(bounce.peer_uuid, nobody);
    assert_eq!(bounce.description, "to nobody");
    let error = bounce.error.expect("the relay's error text");
    assert!(error.contains(&nobody.to_string()), "{error}");
    assert!(
        error.contains(dialect.unknown_peer_error_fragment()),
        "{error}"
    );

    let counters = client.status().await.unwrap().counters;
    assert_eq!(
        (counters.sent, counters.received, counters.bounced),
        (2, 2, 1)
    );
    assert_eq!(counters.undecodable, 0);
    daemon.stop().await;
}

#[tokio::test]
async fn current_relay_forwards_both_ways_and_reports_bounces() {
    forwards_both_ways_and_reports_bounces(Dialect::Current).await;
}

#[tokio::test]
async fn legacy_relay_forwards_both_ways_and_reports_bounces() {
    forwards_both_ways_and_reports_bounces(Dialect::Legacy).await;
}

#[tokio::test]
async fn relay_restart_goes_backoff_then_registered_and_streams_stay_open() {
    let dialect = Dialect::Current;
    let mut relay = PyRelay::start(dialect).await;
    let daemon = TestDaemon::start(&relay.url(), dialect).await;
    let client = daemon.client().await;
    let mut inbox = client.subscribe(Some("workers")).await.unwrap();
    let mut statuses = client.watch_status().await.unwrap();
    wait_for_state(&mut statuses, ConnectionState::Registered).await;

    relay.kill();
    let backoff = wait_for_state(&mut statuses, ConnectionState::Backoff).await;
    assert!(backoff.attempt >= 1);
    assert!(!backoff.detail.is_empty(), "BACKOFF says why");
    // While down, a send with a short deadline is refused, not lost.
    let refused = client
        .send_with(
            Uuid::new_v4(),
            DescriptionType::Offer,
            "while down",
            relay_sidecar_client::SendOptions::new().timeout(Duration::from_millis(200)),
        )
        .await;
    assert!(
        matches!(refused, Err(Error::Unavailable(_)) | Err(Error::Status(_))),
        "{refused:?}"
    );

    relay.restart().await;
    wait_for_state(&mut statuses, ConnectionState::Registered).await;
    assert_eq!(client.status().await.unwrap().counters.reconnects, 1);

    // The subscription opened before the flap still delivers.
    let mut peer = PyPeer::start(dialect, &relay.url(), None, "after-restart").await;
    peer.send(daemon.uuid, "offer", "after the restart").await;
    let got = tokio::time::timeout(WAIT, inbox.next_message())
        .await
        .expect("message after restart in time")
        .unwrap()
        .expect("the stream is still open");
    assert_eq!(got.description, "after the restart");
    // And sends flow again.
    client
        .send(peer.uuid(), DescriptionType::Answer, "back")
        .await
        .unwrap();
    assert_eq!(peer.expect_message(WAIT).await.description, "back");
    daemon.stop().await;
}

#[tokio::test]
async fn displaced_by_the_same_uuid_fails_until_reconnect() {
    let dialect = Dialect::Current;
    let relay = PyRelay::start(dialect).await;
    let daemon = TestDaemon::start(&relay.url(), dialect).await;
    let client = daemon.client().await;
    let mut statuses = client.watch_status().await.unwrap();
    wait_for_state(&mut statuses, ConnectionState::Registered).await;

    // The ProxyStore client registers the daemon's uuid: the relay closes
    // the daemon's (older) socket with 4004.
    let impostor = PyPeer::start(dialect, &relay.url(), Some(daemon.uuid), "impostor").await;
    let failed = wait_for_state(&mut statuses, ConnectionState::Failed).await;
    assert_eq!(failed.close_code, Some(4004));
    assert!(!failed.detail.is_empty());

    // It stays FAILED: no state change follows on its own, and sends are
    // refused at once with the reason.
    let quiet = tokio::time::timeout(Duration::from_secs(2), statuses.next_status()).await;
    assert!(quiet.is_err(), "FAILED must not retry by itself: {quiet:?}");
    let refused = client
        .send(Uuid::new_v4(), DescriptionType::Offer, "x")
        .await;
    match refused {
        Err(Error::FailedPrecondition(message)) => assert!(message.contains("4004"), "{message}"),
        other => panic!("expected FAILED_PRECONDITION, got {other:?}"),
    }
    assert_eq!(
        client.status().await.unwrap().state,
        ConnectionState::Failed
    );

    impostor.quit().await;
    client.reconnect().await.unwrap();
    let back = wait_for_state(&mut statuses, ConnectionState::Registered).await;
    assert_eq!(back.uuid, daemon.uuid);
    daemon.stop().await;
}
