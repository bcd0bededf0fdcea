//! Many workers, one identity: groups, reply affinity, bounces, the backlog,
//! slow subscribers and subscriber churn.
//!
//! The remote side is a second daemon on the same embedded relay unless the
//! test needs the real ProxyStore relay and clients.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use relay_sidecar_client::{Client, DescriptionType, PeerMessage, Subscription};
use support::sidecar::{TestDaemon, dev_relay, settings, status_until};
use support::{Dialect, PyPeer, PyRelay};
use tokio::sync::mpsc;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// Forwards every message of `subscription` to `out`, tagged with `who`.
fn collect(
    who: usize,
    mut subscription: Subscription,
    out: mpsc::UnboundedSender<(usize, PeerMessage)>,
) {
    tokio::spawn(async move {
        while let Some(Ok(message)) = subscription.next().await {
            if out.send((who, message)).is_err() {
                return;
            }
        }
    });
}

/// Receives exactly `n` tagged messages.
async fn take(
    rx: &mut mpsc::UnboundedReceiver<(usize, PeerMessage)>,
    n: usize,
) -> Vec<(usize, PeerMessage)> {
    let mut got = Vec::with_capacity(n);
    tokio::time::timeout(WAIT, async {
        while got.len() < n {
            got.push(rx.recv().await.expect("collectors alive"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of {n} messages arrived", got.len()));
    got
}

async fn send_numbered(from: &Client, to: Uuid, range: std::ops::Range<usize>) {
    send_numbered_as(from, to, range, DescriptionType::Offer).await;
}

async fn send_numbered_as(
    from: &Client,
    to: Uuid,
    range: std::ops::Range<usize>,
    kind: DescriptionType,
) {
    for n in range {
        from.send(to, kind, n.to_string()).await.unwrap();
    }
}

#[tokio::test]
async fn each_group_gets_every_message_once_and_members_share() {
    let relay = dev_relay().await;
    let (host, remote) = (
        TestDaemon::start(&relay.url(), Dialect::Current).await,
        TestDaemon::start(&relay.url(), Dialect::Current).await,
    );
    let client = host.registered_client().await;
    let sender = remote.registered_client().await;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let layout = [
        (0, Some("a")),
        (1, Some("a")),
        (2, Some("a")),
        (3, Some("b")),
        (4, Some("b")),
        (5, None),
    ];
    for (who, group) in layout {
        let worker = client.clone().with_worker(format!("worker-{who}"));
        collect(who, worker.subscribe(group).await.unwrap(), tx.clone());
    }
    send_numbered(&sender, host.uuid, 0..300).await;

    let got = take(&mut rx, 900).await;
    let mut per_group: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut per_member = [0usize; 6];
    for (who, message) in &got {
        let group = layout[*who].1.unwrap_or("ungrouped");
        per_group
            .entry(group)
            .or_default()
            .push(message.description.parse().unwrap());
        per_member[*who] += 1;
    }
    for (group, mut numbers) in per_group {
        numbers.sort_unstable();
        assert_eq!(
            numbers,
            (0..300).collect::<Vec<_>>(),
            "group {group} gets each message once"
        );
    }
    assert!(
        per_member.iter().all(|&n| n > 0),
        "every member shares: {per_member:?}"
    );
    assert_eq!(per_member[5], 300);
    let status = client.status().await.unwrap();
    assert_eq!(
        (status.counters.delivered, status.counters.dropped),
        (900, 0)
    );
    assert_eq!(
        (status.counters.subscribers, status.counters.workers),
        (6, 6)
    );
    host.stop().await;
    remote.stop().await;
}

#[tokio::test]
async fn replies_and_bounces_go_to_the_worker_that_sent() {
    let dialect = Dialect::Current;
    let relay = PyRelay::start(dialect).await;
    let host = TestDaemon::start(&relay.url(), dialect).await;
    let client = host.registered_client().await;
    let (w1, w2) = (
        client.clone().with_worker("w1"),
        client.clone().with_worker("w2"),
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    collect(1, w1.subscribe(Some("workers")).await.unwrap(), tx.clone());
    collect(2, w2.subscribe(Some("workers")).await.unwrap(), tx.clone());

    let mut p1 = PyPeer::start(dialect, &relay.url(), None, "peer-1").await;
    let mut p2 = PyPeer::start(dialect, &relay.url(), None, "peer-2").await;
    const ROUNDS: usize = 10;
    for round in 0..ROUNDS {
        w1.send(
            p1.uuid(),
            DescriptionType::Offer,
            format!("w1 offer {round}"),
        )
        .await
        .unwrap();
        w2.send(
            p2.uuid(),
            DescriptionType::Offer,
            format!("w2 offer {round}"),
        )
        .await
        .unwrap();
        let (o1, o2) = (p1.expect_message(WAIT).await, p2.expect_message(WAIT).await);
        assert_eq!(o1.description, format!("w1 offer {round}"));
        assert_eq!(o2.description, format!("w2 offer {round}"));
        p1.send(host.uuid, "answer", &format!("p1 answer {round}"))
            .await;
        p2.send(host.uuid, "answer", &format!("p2 answer {round}"))
            .await;
    }
    for (who, message) in take(&mut rx, 2 * ROUNDS).await {
        let expected_peer = if who == 1 { p1.uuid() } else { p2.uuid() };
        assert_eq!(
            message.source_uuid, expected_peer,
            "worker {who} got {}",
            message.description
        );
    }

    // A bounce goes to the worker whose send it was, and to nobody else.
    let nobody = Uuid::new_v4();
    w1.send(nobody, DescriptionType::Offer, "lost")
        .await
        .unwrap();
    let (who, bounce) = take(&mut rx, 1).await.remove(0);
    assert_eq!(who, 1);
    assert!(bounce.bounced && bounce.peer_uuid == nobody);
    let status = client.status().await.unwrap();
    assert_eq!(
        status.counters.delivered,
        2 * ROUNDS as u64 + 1,
        "nothing went anywhere else"
    );
    assert!(rx.try_recv().is_err());
    host.stop().await;
}

#[tokio::test]
async fn the_first_subscriber_gets_the_backlog_in_order() {
    let relay = dev_relay().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = settings(dir.path(), &relay.url(), Dialect::Current);
    // However slow this machine is: the time-to-live is not under test here.
    config.backlog_ttl = Duration::from_secs(600);
    let host = TestDaemon::start_with(config).await;
    let remote = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let (client, sender) = (
        host.registered_client().await,
        remote.registered_client().await,
    );

    // Answers: an offer while nobody is subscribed is refused at once
    // (unclaimed_offers), everything else waits for the first subscriber.
    send_numbered_as(&sender, host.uuid, 0..500, DescriptionType::Answer).await;
    status_until(&client, |s| s.counters.received == 500).await;
    let mut inbox = client.subscribe(None).await.unwrap();
    for n in 0..500 {
        let message = tokio::time::timeout(WAIT, inbox.next_message())
            .await
            .expect("the backlog arrives")
            .unwrap()
            .unwrap();
        assert_eq!(message.description, n.to_string());
    }
    assert_eq!(client.status().await.unwrap().counters.dropped, 0);
    host.stop().await;
    remote.stop().await;
}

#[tokio::test]
async fn a_full_backlog_keeps_the_newest_and_counts_the_rest() {
    let relay = dev_relay().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = settings(dir.path(), &relay.url(), Dialect::Current);
    config.backlog = 1024;
    config.backlog_ttl = Duration::from_secs(600);
    let host = TestDaemon::start_with(config).await;
    let remote = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let (client, sender) = (
        host.registered_client().await,
        remote.registered_client().await,
    );

    send_numbered_as(&sender, host.uuid, 0..1500, DescriptionType::Answer).await;
    let status = status_until(&client, |s| s.counters.received == 1500).await;
    assert_eq!(status.counters.dropped, 476);
    assert_eq!(status.counters.dropped_no_subscriber, 476);
    let mut inbox = client.subscribe(None).await.unwrap();
    for n in 476..1500 {
        assert_eq!(
            tokio::time::timeout(WAIT, inbox.next_message())
                .await
                .expect("the backlog arrives")
                .unwrap()
                .unwrap()
                .description,
            n.to_string()
        );
    }
    host.stop().await;
    remote.stop().await;
}

#[tokio::test]
async fn a_stalled_subscriber_costs_only_itself() {
    let relay = dev_relay().await;
    let host = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let remote = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let (client, sender) = (
        host.registered_client().await,
        remote.registered_client().await,
    );

    // Subscribed, never read.
    let _stalled = client
        .clone()
        .with_worker("stalled")
        .subscribe(Some("slow"))
        .await
        .unwrap();
    let mut fast = client
        .clone()
        .with_worker("fast")
        .subscribe(Some("fast"))
        .await
        .unwrap();
    const N: usize = 10_000;
    // 1 KiB messages, so that HTTP/2's own buffers cannot hide the stall.
    let padding = "x".repeat(1024);
    let to = host.uuid;
    let sending = tokio::spawn(async move {
        for n in 0..N {
            let text = format!("{n} {padding}");
            sender.send(to, DescriptionType::Offer, text).await.unwrap();
        }
    });
    for n in 0..N {
        let message = tokio::time::timeout(WAIT, fast.next_message())
            .await
            .expect("the fast subscriber keeps receiving")
            .unwrap()
            .unwrap();
        let number = message.description.split(' ').next().unwrap();
        assert_eq!(number, n.to_string(), "in order");
    }
    sending.await.unwrap();
    let status = client.status().await.unwrap();
    let c = status.counters;
    eprintln!(
        "{N} messages: delivered {}, dropped for the stalled group {}",
        c.delivered, c.dropped_queue_full
    );
    assert!(
        c.dropped_queue_full > 0,
        "the stalled group's losses are counted: {c:?}"
    );
    assert_eq!(c.delivered + c.dropped_queue_full, 2 * N as u64, "{c:?}");
    assert_eq!(c.dropped_no_subscriber, 0);
    host.stop().await;
    remote.stop().await;
}

#[tokio::test]
async fn an_exclusive_group_is_held_until_its_stream_ends() {
    use relay_sidecar_client::{Error, SubscribeOptions};

    let relay = dev_relay().await;
    let host = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let endpoint = || SubscribeOptions::new().group("endpoint");

    // The holder is on a connection of its own, as another process would be.
    let holder = host.registered_client().await;
    let held = holder.subscribe_with(endpoint().exclusive()).await.unwrap();
    let other = host.client().await;
    for options in [endpoint().exclusive(), endpoint()] {
        match other.subscribe_with(options).await {
            Err(Error::AlreadyExists(message)) => {
                assert!(message.contains("\"endpoint\""), "{message}")
            }
            other => panic!("expected ALREADY_EXISTS, got {other:?}"),
        }
    }
    match other
        .subscribe_with(SubscribeOptions::new().exclusive())
        .await
    {
        Err(Error::InvalidArgument(message)) => {
            assert!(message.starts_with("exclusive"), "{message}")
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    // Other groups are not affected.
    other.subscribe(Some("workers")).await.unwrap();

    // The holder's connection goes away (its process died): free again.
    drop(held);
    drop(holder);
    tokio::time::timeout(WAIT, async {
        loop {
            match other.subscribe_with(endpoint().exclusive()).await {
                Ok(subscription) => return subscription,
                Err(Error::AlreadyExists(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("the group is free once the holder's stream has ended");
    host.stop().await;
}
