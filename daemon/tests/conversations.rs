//! Conversations: one local worker at a time holds the conversation with a
//! remote peer. The remote peers are the real ProxyStore client on the real
//! ProxyStore relay; the local workers use the Rust SDK.

mod support;

use std::time::Duration;

use relay_sidecar_client::{
    Client, DescriptionType, Error, PeerMessage, SendOptions, SubscribeOptions, Subscription,
};
use support::sidecar::TestDaemon;
use support::{Dialect, PyPeer, PyRelay};

const WAIT: Duration = Duration::from_secs(30);

async fn next(inbox: &mut Subscription) -> PeerMessage {
    tokio::time::timeout(WAIT, inbox.next_message())
        .await
        .expect("a message in time")
        .unwrap()
        .expect("the stream is open")
}

/// Nothing arrives on `inbox` for a while (a failure guard for "only the
/// holder gets it": the holder's own copy has arrived first).
async fn quiet(inbox: &mut Subscription) {
    if let Ok(message) =
        tokio::time::timeout(Duration::from_millis(300), inbox.next_message()).await
    {
        panic!("expected nothing, got {message:?}");
    }
}

async fn worker(host: &TestDaemon, label: &str) -> (Client, Subscription) {
    let client = host.registered_client().await.with_worker(label);
    let inbox = client
        .subscribe_with(SubscribeOptions::new().conversations())
        .await
        .unwrap();
    (client, inbox)
}

fn claim() -> SendOptions {
    SendOptions::new().conversation()
}

#[tokio::test]
async fn one_worker_holds_a_peer_and_the_others_are_refused_until_it_lets_go() {
    let dialect = Dialect::Current;
    let relay = PyRelay::start(dialect).await;
    let host = TestDaemon::start(&relay.url(), dialect).await;
    let mut peer = PyPeer::start(dialect, &relay.url(), None, "remote").await;
    let (w1, mut in1) = worker(&host, "w1").await;
    let (w2, mut in2) = worker(&host, "w2").await;

    w1.send_with(peer.uuid(), DescriptionType::Offer, "w1 offer", claim())
        .await
        .unwrap();
    assert_eq!(peer.expect_message(WAIT).await.description, "w1 offer");

    // Another worker's send to the held peer, claiming or not: ABORTED,
    // naming the holder, and nothing reaches the peer.
    for options in [claim(), SendOptions::new()] {
        match w2
            .send_with(peer.uuid(), DescriptionType::Offer, "w2 offer", options)
            .await
        {
            Err(Error::Aborted(message)) => assert!(message.contains("\"w1\""), "{message}"),
            other => panic!("expected ABORTED, got {other:?}"),
        }
    }
    // The peer's answers reach the holder only.
    peer.send(host.uuid, "answer", "to whoever offered").await;
    assert_eq!(next(&mut in1).await.description, "to whoever offered");
    quiet(&mut in2).await;
    let status = w1.status().await.unwrap();
    assert_eq!(
        (
            status.counters.conversations,
            status.counters.conversation_conflicts
        ),
        (1, 2)
    );

    // A waiting send waits: while w1 holds the peer, it fails only at its
    // deadline (the daemon answers up to 50 ms before it, to be heard).
    let patience = Duration::from_millis(500);
    let started = std::time::Instant::now();
    let options = claim().wait_for_conversation().timeout(patience);
    let gave_up = w2
        .send_with(peer.uuid(), DescriptionType::Offer, "w2 gave up", options)
        .await;
    assert!(matches!(gave_up, Err(Error::Aborted(_))), "{gave_up:?}");
    assert!(
        started.elapsed() >= patience - patience / 10,
        "{:?}",
        started.elapsed()
    );

    // A waiting send gets the peer once the holder lets go.
    let waiting = {
        let w2 = w2.clone();
        let to = peer.uuid();
        tokio::spawn(async move {
            let options = claim().wait_for_conversation().timeout(WAIT);
            w2.send_with(to, DescriptionType::Offer, "w2 waited", options)
                .await
        })
    };
    assert!(
        !w2.release_conversation(peer.uuid()).await.unwrap(),
        "not w2's to release"
    );
    assert!(w1.release_conversation(peer.uuid()).await.unwrap());
    waiting.await.unwrap().unwrap();
    assert_eq!(peer.expect_message(WAIT).await.description, "w2 waited");
    peer.send(host.uuid, "answer", "to w2").await;
    assert_eq!(next(&mut in2).await.description, "to w2");
    quiet(&mut in1).await;

    // The holder's process goes away: its conversations end with it.
    drop(in2);
    drop(w2);
    tokio::time::timeout(WAIT, async {
        while w1.status().await.unwrap().counters.conversations > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the conversation ends with its holder's subscription");
    assert_eq!(
        w1.hold_conversation(peer.uuid(), None).await.unwrap(),
        Duration::from_secs(60)
    );
    host.stop().await;
}

#[tokio::test]
async fn a_peers_offer_goes_to_one_worker_and_a_bounce_ends_the_conversation() {
    use futures_util::StreamExt;

    let dialect = Dialect::Current;
    let relay = PyRelay::start(dialect).await;
    let host = TestDaemon::start(&relay.url(), dialect).await;
    let (w1, in1) = worker(&host, "w1").await;
    let (w2, in2) = worker(&host, "w2").await;
    let mut both = futures_util::stream::select(
        in1.map(|m| ("w1", m.unwrap())),
        in2.map(|m| ("w2", m.unwrap())),
    );
    let mut next_of_both = async || {
        tokio::time::timeout(WAIT, both.next())
            .await
            .expect("a message in time")
            .expect("streams open")
    };
    let mut peer = PyPeer::start(dialect, &relay.url(), None, "remote").await;

    peer.send(host.uuid, "offer", "hello host").await;
    let (holder, offer) = next_of_both().await;
    assert_eq!(offer.description, "hello host");
    peer.send(host.uuid, "answer", "more").await;
    assert_eq!(
        next_of_both().await,
        (holder, next_message_like(&offer, "more"))
    );
    let (holder_client, other_client) = if holder == "w1" {
        (&w1, &w2)
    } else {
        (&w2, &w1)
    };
    assert!(matches!(
        other_client
            .send_with(peer.uuid(), DescriptionType::Answer, "me too", claim())
            .await,
        Err(Error::Aborted(_))
    ));

    // A send to a peer that is not registered: the relay's bounce reaches
    // the claimant, and that conversation is over.
    let nobody = uuid::Uuid::new_v4();
    other_client
        .send_with(nobody, DescriptionType::Offer, "anyone?", claim())
        .await
        .unwrap();
    let (who, bounce) = next_of_both().await;
    assert_ne!(who, holder);
    assert!(bounce.bounced && bounce.peer_uuid == nobody, "{bounce:?}");
    let status = holder_client.status().await.unwrap();
    assert_eq!(status.counters.conversations, 1, "only the peer's is left");
    host.stop().await;
}

/// `offer` with another description (and the type the test peer sends).
fn next_message_like(offer: &PeerMessage, description: &str) -> PeerMessage {
    PeerMessage {
        description_type: "answer".into(),
        description: description.into(),
        ..offer.clone()
    }
}

#[tokio::test]
async fn an_offer_while_nobody_is_subscribed_is_refused_at_once() {
    let dialect = Dialect::Current;
    let relay = PyRelay::start(dialect).await;
    let host = TestDaemon::start(&relay.url(), dialect).await;
    let client = host.registered_client().await;
    let mut peer = PyPeer::start(dialect, &relay.url(), None, "remote").await;

    peer.send(host.uuid, "offer", "v=0 anyone home?").await;
    let answer = peer.expect_message(WAIT).await;
    assert_eq!(
        (answer.source_uuid, answer.peer_uuid),
        (host.uuid, peer.uuid())
    );
    let error = answer.error.expect("the answer carries an error");
    assert!(error.contains("no worker"), "{error}");
    let status = client.status().await.unwrap();
    assert_eq!(status.counters.offers_refused, 1);

    // Nothing was kept for a later subscriber.
    let mut late = client.subscribe(None).await.unwrap();
    quiet(&mut late).await;
    host.stop().await;
}
