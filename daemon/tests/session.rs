//! The session path (a held-open SendStream beside a Subscribe, through the
//! Rust SDK's `Session`) and confirmations shared across callers, against
//! ProxyStore's relay: order, one outcome per message, a refused message
//! that costs only itself, and a session that outlives its daemon.

mod support;

use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use relay_sidecar_client::{DescriptionType, Error, SubscribeOptions};
use support::sidecar::{TestDaemon, daemon_args, registered, spawn_daemon};
use support::{Dialect, PyRelay};

/// A failure guard, not a speed requirement.
const WAIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn a_session_keeps_order_and_answers_every_message() {
    const MESSAGES: usize = 5_000;
    let relay = PyRelay::start_quiet(Dialect::Current).await;
    let daemon = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let client = daemon.registered_client().await.with_worker("session");
    let mut session = client.session(SubscribeOptions::new()).await.unwrap();
    let sender = session.sender();
    let me = daemon.uuid;

    // Pipelined: queued in order, up to the session's bound unsettled.
    let sends = tokio::spawn(async move {
        let mut pending = Vec::with_capacity(MESSAGES);
        for n in 0..MESSAGES {
            pending.push(
                sender
                    .queue(me, DescriptionType::Offer, n.to_string())
                    .await,
            );
        }
        futures_util::future::join_all(pending).await
    });
    let mut arrived = Vec::with_capacity(MESSAGES);
    tokio::time::timeout(WAIT, async {
        while arrived.len() < MESSAGES {
            let message = session.next_message().await.unwrap().expect("open");
            arrived.push(message.description.parse::<usize>().unwrap());
        }
    })
    .await
    .expect("every message arrives");
    let outcomes = sends.await.unwrap();
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    assert_eq!(arrived, (0..MESSAGES).collect::<Vec<_>>());

    let status = client.status().await.unwrap();
    assert!(status.counters.sent >= MESSAGES as u64);
    session.close().await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_refused_message_on_a_session_costs_only_itself() {
    let relay = PyRelay::start_quiet(Dialect::Current).await;
    let daemon = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let client = daemon.registered_client().await;
    let mut session = client.session(SubscribeOptions::new()).await.unwrap();
    let me = daemon.uuid;
    // Over the daemon's max_message_bytes (1 MiB), under what it decodes.
    let oversized = "x".repeat(2 << 20);
    let first = session.queue(me, DescriptionType::Offer, "before").await;
    let refused = session.queue(me, DescriptionType::Offer, oversized).await;
    let last = session.queue(me, DescriptionType::Offer, "after").await;
    let (first, refused, last) = tokio::join!(first, refused, last);
    first.unwrap();
    last.unwrap();
    match refused {
        Err(Error::InvalidArgument(message)) => {
            assert!(message.contains("description"), "{message}")
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    let mut texts = Vec::new();
    for _ in 0..2 {
        texts.push(session.next_message().await.unwrap().unwrap().description);
    }
    assert_eq!(texts, ["before", "after"]);
    session.close().await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_session_outlives_a_killed_daemon() {
    let relay = PyRelay::start_quiet(Dialect::Current).await;
    let dir = tempfile::tempdir().unwrap();
    let (args, socket) = daemon_args(dir.path(), &relay.url());
    let mut daemon = spawn_daemon(&args).await;
    let client = relay_sidecar_client::connect(&socket).await.unwrap();
    let me = registered(&client).await.uuid;
    let mut session = client.session(SubscribeOptions::new()).await.unwrap();
    session
        .send(me, DescriptionType::Offer, "before")
        .await
        .unwrap();
    assert_eq!(
        session.next_message().await.unwrap().unwrap().description,
        "before"
    );

    // Sends in flight when the daemon dies: each gets an outcome.
    let sender = session.sender();
    let in_flight: FuturesUnordered<_> = (0..500)
        .map(|n| {
            let sender = sender.clone();
            async move { sender.send(me, DescriptionType::Offer, n.to_string()).await }
        })
        .collect();
    let in_flight = tokio::spawn(in_flight.collect::<Vec<_>>());
    daemon.kill().await.unwrap();
    let outcomes = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("every send in flight has an outcome")
        .unwrap();
    for outcome in &outcomes {
        match outcome {
            Ok(()) | Err(Error::Unconfirmed(_) | Error::Unavailable(_)) => {}
            other => panic!("{other:?}"),
        }
    }

    let _daemon = spawn_daemon(&args).await;
    registered(&client).await;
    tokio::time::timeout(WAIT, async {
        // The first sends may still meet the connection that died.
        while session
            .send(me, DescriptionType::Offer, "after")
            .await
            .is_err()
        {}
    })
    .await
    .expect("the session sends again");
    let after = tokio::time::timeout(WAIT, async {
        loop {
            let message = session.next_message().await.unwrap().expect("resumed");
            if message.description == "after" {
                return message;
            }
        }
    })
    .await
    .expect("the resumed inbox sees it");
    assert!(!after.bounced);
}

/// Concurrent unary Sends from many workers share the relay round trips
/// that confirm them: one per write batch, not one per caller.
#[tokio::test]
async fn concurrent_unary_sends_share_their_confirmations() {
    const WORKERS: usize = 16;
    const IN_FLIGHT: usize = 64;
    const PER_WORKER: usize = 256;
    let relay = PyRelay::start_quiet(Dialect::Current).await;
    let daemon = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let client = daemon.registered_client().await;
    let me = daemon.uuid;
    let before = client.status().await.unwrap().counters;
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let client = client.clone().with_worker(format!("w{w}"));
            tokio::spawn(async move {
                futures_util::stream::iter(0..PER_WORKER)
                    .map(|n| {
                        let client = client.clone();
                        async move {
                            client
                                .send(me, DescriptionType::Answer, n.to_string())
                                .await
                        }
                    })
                    .buffer_unordered(IN_FLIGHT)
                    .collect::<Vec<_>>()
                    .await
            })
        })
        .collect();
    for worker in workers {
        let outcomes = tokio::time::timeout(WAIT, worker).await.unwrap().unwrap();
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    }
    let after = client.status().await.unwrap().counters;
    let sent = after.sent - before.sent;
    let round_trips = after.confirmations - before.confirmations;
    eprintln!("{sent} sends confirmed in {round_trips} round trips");
    assert_eq!(sent, (WORKERS * PER_WORKER) as u64);
    assert!(round_trips > 0);
    // One round trip per send would be 4,096.
    assert!(
        sent >= 4 * round_trips,
        "{sent} sends took {round_trips} round trips"
    );
    daemon.stop().await;
}
