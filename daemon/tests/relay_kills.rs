//! The real relay is SIGKILLed and restarted five times while four workers
//! send 20,000 messages to a ProxyStore Python peer. No send may be lost
//! without its caller being told:
//! - every send that returned OK reached the peer, or came back bounced
//!   (the peer was itself reconnecting) on the workers' subscription;
//! - no send that returned UNAVAILABLE reached anyone;
//! - sends that returned UNKNOWN (written, then the relay died before
//!   confirming) may have gone either way, and are counted.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use relay_sidecar_client::{DescriptionType, Error};
use support::sidecar::{TestDaemon, registered};
use support::{Dialect, PeerEvent, PyPeer, PyRelay};
use tokio::sync::Mutex;

const WORKERS: usize = 4;
const PER_WORKER: usize = 5_000;
const KILLS: usize = 5;
const WAIT: Duration = Duration::from_secs(120);

#[derive(Default)]
struct Outcomes {
    ok: HashSet<String>,
    unavailable: HashSet<String>,
    unconfirmed: HashSet<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_five_times_under_load_loses_nothing_untold() {
    let dialect = Dialect::Current;
    let mut relay = PyRelay::start(dialect).await;
    let daemon = TestDaemon::start(&relay.url(), dialect).await;
    let client = daemon.registered_client().await;
    let mut inbox = client.subscribe(None).await.unwrap();
    let mut peer = PyPeer::start(dialect, &relay.url(), None, "far-peer").await;
    let peer_uuid = peer.uuid();

    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let worker = client.clone().with_worker(format!("w{w}"));
        let (outcomes, done) = (Arc::clone(&outcomes), Arc::clone(&done));
        workers.push(tokio::spawn(async move {
            for n in 0..PER_WORKER {
                let text = format!("w{w}-{n}");
                let result = worker
                    .send(peer_uuid, DescriptionType::Offer, text.clone())
                    .await;
                let mut o = outcomes.lock().await;
                match result {
                    Ok(()) => o.ok.insert(text),
                    Err(Error::Unavailable(_)) => o.unavailable.insert(text),
                    Err(Error::Unconfirmed(_)) => o.unconfirmed.insert(text),
                    Err(other) => panic!("{text}: unexpected {other:?}"),
                };
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // The peer's side: everything it receives, read as it arrives so that
    // its pipe never fills.
    let received = Arc::new(Mutex::new(HashSet::new()));
    let reader = {
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            loop {
                match peer.recv(WAIT).await {
                    PeerEvent::Message(m) if m.description == "end" => return peer,
                    PeerEvent::Message(m) => {
                        assert!(
                            received.lock().await.insert(m.description.clone()),
                            "duplicate {}",
                            m.description
                        );
                    }
                    _ => {}
                }
            }
        })
    };

    // Kill the relay each time another sixth of the traffic has gone by.
    let total = WORKERS * PER_WORKER;
    for kill in 1..=KILLS {
        let at = total * kill / (KILLS + 1);
        tokio::time::timeout(WAIT, async {
            while done.load(Ordering::Relaxed) < at {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("sends keep completing");
        relay.kill();
        relay.restart().await;
    }
    for worker in workers {
        tokio::time::timeout(WAIT, worker)
            .await
            .expect("workers finish")
            .unwrap();
    }

    // An end marker, sent until it is confirmed and not bounced: once the
    // peer has it, it has everything sent before it.
    registered(&client).await;
    loop {
        if client
            .send(peer_uuid, DescriptionType::Offer, "end")
            .await
            .is_ok()
        {
            break;
        }
    }
    let _peer = tokio::time::timeout(WAIT, reader)
        .await
        .expect("the end marker arrives")
        .unwrap();

    // Bounces come back on the subscription opened before the first kill.
    let status = client.status().await.unwrap();
    let mut bounced = HashSet::new();
    for _ in 0..status.counters.bounced {
        let message = tokio::time::timeout(WAIT, inbox.next_message())
            .await
            .expect("bounce in time")
            .unwrap()
            .expect("the subscription stayed open through every kill");
        assert!(message.bounced);
        if message.description != "end" {
            bounced.insert(message.description);
        }
    }

    let o = outcomes.lock().await;
    let received = received.lock().await;
    let handled: HashSet<&String> = received.iter().chain(bounced.iter()).collect();
    eprintln!(
        "{} sends: {} OK, {} UNAVAILABLE, {} UNKNOWN; peer received {}, bounced {}; reconnects {}",
        total,
        o.ok.len(),
        o.unavailable.len(),
        o.unconfirmed.len(),
        received.len(),
        bounced.len(),
        status.counters.reconnects
    );
    assert_eq!(
        o.ok.len() + o.unavailable.len() + o.unconfirmed.len(),
        total
    );
    for text in &o.ok {
        assert!(
            handled.contains(text),
            "{text} returned OK but never arrived"
        );
    }
    for text in &o.unavailable {
        assert!(
            !handled.contains(text),
            "{text} returned UNAVAILABLE but was sent"
        );
    }
    for text in handled.iter() {
        assert!(
            o.ok.contains(*text) || o.unconfirmed.contains(*text),
            "{text} arrived but its sender was told it failed"
        );
    }
    let unconfirmed_delivered = o.unconfirmed.iter().filter(|t| handled.contains(t)).count();
    assert_eq!(o.ok.len() + unconfirmed_delivered, handled.len());
    assert!(status.counters.reconnects >= KILLS as u64, "{status:?}");
    assert_eq!(status.counters.subscribers, 1);
    daemon.stop().await;
}
