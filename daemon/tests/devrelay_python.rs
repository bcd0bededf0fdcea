//! The embedded dev relay speaks the protocol the real ProxyStore Python
//! clients expect: they register, forward to each other and get bounces.

mod support;

use std::time::Duration;

use relay_sidecar::devrelay::DevRelay;
use support::{Dialect, PyPeer, PythonEnv};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

async fn python_clients_use_the_dev_relay(dialect: Dialect) {
    let relay = DevRelay::start(
        "127.0.0.1:0".parse().unwrap(),
        dialect,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let mut a = PyPeer::start(dialect, &relay.url(), None, "peer-a").await;
    let mut b = PyPeer::start(dialect, &relay.url(), None, "peer-b").await;

    a.send(b.uuid(), "offer", "sdp offer").await;
    let got = b.expect_message(WAIT).await;
    assert_eq!(
        (got.source_uuid, got.source_name.as_str()),
        (a.uuid(), "peer-a")
    );
    assert_eq!(
        (got.peer_uuid, got.description_type.as_str()),
        (b.uuid(), "offer")
    );
    assert_eq!(
        (got.description.as_str(), got.error.as_deref()),
        ("sdp offer", None)
    );

    b.send(a.uuid(), "answer", "sdp answer").await;
    assert_eq!(a.expect_message(WAIT).await.description, "sdp answer");

    let nobody = Uuid::new_v4();
    a.send(nobody, "offer", "to nobody").await;
    let bounce = a.expect_message(WAIT).await;
    assert_eq!((bounce.source_uuid, bounce.peer_uuid), (a.uuid(), nobody));
    let error = bounce.error.expect("the bounce carries the relay's error");
    assert!(error.contains(&nobody.to_string()), "{error}");
    assert!(
        error.contains(dialect.unknown_peer_error_fragment()),
        "{error}"
    );

    a.quit().await;
    b.quit().await;
    relay.stop().await;
}

#[tokio::test]
async fn proxystore_client_registers_forwards_and_gets_bounces() {
    python_clients_use_the_dev_relay(Dialect::Current).await;
}

#[tokio::test]
async fn legacy_proxystore_client_registers_forwards_and_gets_bounces() {
    python_clients_use_the_dev_relay(Dialect::Legacy).await;
}
