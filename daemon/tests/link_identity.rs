//! Who the link believes: two daemons given one uuid on ProxyStore's 0.5.2
//! relay (which closes a displaced socket with 1001, not 4004) must not take
//! the uuid from each other forever; and a remote peer that forges our uuid
//! as the source of an error message must not pass for the relay returning
//! one of our sends.

mod support;

use std::time::Duration;

use relay_sidecar_client::{Client, ConnectionState, DescriptionType, Status};
use support::sidecar::{STATE_TIMEOUT, TestDaemon, registered, settings, wait_for_state};
use support::{Dialect, PyPeer, PyRelay};
use uuid::Uuid;

/// The daemons' first retry delay. Not the test default (50 ms): the 0.5.2
/// relay waits for a displaced socket's closing handshake before it records
/// the new registration, and a registration of the same uuid that comes in
/// meanwhile displaces no one and is then silently overwritten, leaving two
/// sockets registered. A retry that quick can land in that window on a
/// loaded machine; the default (1 s) does not.
const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long both daemons must then stay as they are: several times the
/// longest retry delay, so a further round of displacement would show.
const QUIET: Duration = Duration::from_secs(6);
const WAIT: Duration = Duration::from_secs(20);

async fn daemon_with_uuid(url: &str, uuid: Uuid, dir: &tempfile::TempDir) -> TestDaemon {
    let mut config = settings(dir.path(), url, Dialect::Legacy);
    config.uuid = Some(uuid);
    config.backoff_initial = BACKOFF_INITIAL;
    config.backoff_max = BACKOFF_MAX;
    TestDaemon::start_with(config).await
}

#[tokio::test]
async fn two_daemons_with_one_uuid_on_the_legacy_relay_stop_fighting() {
    let relay = PyRelay::start(Dialect::Legacy).await;
    let uuid = Uuid::new_v4();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = daemon_with_uuid(&relay.url(), uuid, &dir_a).await;
    let client_a = a.client().await;
    registered(&client_a).await;
    let mut states_a = client_a.watch_status().await.unwrap();

    let b = daemon_with_uuid(&relay.url(), uuid, &dir_b).await;
    let client_b = b.client().await;
    let mut states_b = client_b.watch_status().await.unwrap();

    // One of them gives up with a reason...
    let failed = tokio::time::timeout(STATE_TIMEOUT, async {
        tokio::select! {
            status = wait_for_state(&mut states_a, ConnectionState::Failed) => status,
            status = wait_for_state(&mut states_b, ConnectionState::Failed) => status,
        }
    })
    .await
    .expect("one daemon fails instead of displacing the other forever");
    assert!(
        failed.detail.contains("1001") && failed.detail.contains("another client"),
        "the reason says what happened: {}",
        failed.detail
    );

    // ...and then nothing moves any more.
    let settled = |status: &Status| {
        matches!(
            status.state,
            ConnectionState::Registered | ConnectionState::Failed
        )
    };
    let quiet = tokio::time::timeout(QUIET, async {
        loop {
            tokio::select! {
                status = states_a.next_status() => {
                    let status = status.unwrap().unwrap();
                    if !settled(&status) { return status; }
                }
                status = states_b.next_status() => {
                    let status = status.unwrap().unwrap();
                    if !settled(&status) { return status; }
                }
            }
        }
    })
    .await;
    if let Ok(moved) = quiet {
        panic!("a daemon kept going after one had failed: {moved:?}");
    }
    let (now_a, now_b) = (
        client_a.status().await.unwrap(),
        client_b.status().await.unwrap(),
    );
    eprintln!(
        "a: {:?} after {} re-registrations ({}); b: {:?} after {} ({})",
        now_a.state,
        now_a.counters.reconnects,
        now_a.detail,
        now_b.state,
        now_b.counters.reconnects,
        now_b.detail
    );
    for now in [&now_a, &now_b] {
        assert!(now.counters.reconnects <= 1, "{now:?}");
    }
    // The one that did not fail holds the uuid, and works.
    let states = [now_a.state, now_b.state];
    assert!(states.contains(&ConnectionState::Failed), "{states:?}");
    if let Some(holder) = [(&now_a, &client_a), (&now_b, &client_b)]
        .into_iter()
        .find(|(now, _)| now.state == ConnectionState::Registered)
        .map(|(_, client)| client)
    {
        sends_to_itself(holder, uuid).await;
    }
    a.stop().await;
    b.stop().await;
}

async fn sends_to_itself(client: &Client, uuid: Uuid) {
    let mut inbox = client.subscribe(None).await.unwrap();
    client
        .send(uuid, DescriptionType::Offer, "still mine")
        .await
        .unwrap();
    let back = tokio::time::timeout(WAIT, inbox.next_message())
        .await
        .expect("the message to itself comes back")
        .unwrap()
        .unwrap();
    assert_eq!(back.description, "still mine");
}

async fn a_forged_bounce_is_an_ordinary_message(dialect: Dialect) {
    let relay = PyRelay::start(dialect).await;
    let daemon = TestDaemon::start(&relay.url(), dialect).await;
    let client = daemon.client().await;
    let mut inbox = client.subscribe(None).await.unwrap();
    registered(&client).await;
    let mut peer = PyPeer::start(dialect, &relay.url(), None, "forger").await;

    // The peer claims to be us returning an error: the relay forwards it,
    // since the peer_uuid is ours.
    peer.send_forged(daemon.uuid, daemon.uuid, "forged", "Cannot forward")
        .await;
    let got = tokio::time::timeout(WAIT, inbox.next_message())
        .await
        .expect("the forged message arrives")
        .unwrap()
        .unwrap();
    assert_eq!(got.description, "forged");
    assert!(
        !got.bounced,
        "a peer's message taken as our bounce: {got:?}"
    );

    // A genuine bounce is still one.
    let nobody = Uuid::new_v4();
    client
        .send(nobody, DescriptionType::Offer, "to nobody")
        .await
        .unwrap();
    let bounce = tokio::time::timeout(WAIT, inbox.next_message())
        .await
        .expect("the bounce arrives")
        .unwrap()
        .unwrap();
    assert!(bounce.bounced, "{bounce:?}");
    assert_eq!(bounce.peer_uuid, nobody);

    let counters = client.status().await.unwrap().counters;
    assert_eq!((counters.received, counters.bounced), (2, 1));
    daemon.stop().await;
}

#[tokio::test]
async fn a_forged_bounce_through_the_current_relay_is_an_ordinary_message() {
    a_forged_bounce_is_an_ordinary_message(Dialect::Current).await;
}

#[tokio::test]
async fn a_forged_bounce_through_the_legacy_relay_is_an_ordinary_message() {
    a_forged_bounce_is_an_ordinary_message(Dialect::Legacy).await;
}
