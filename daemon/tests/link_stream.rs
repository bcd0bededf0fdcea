//! One worker streams 150,000 messages to this host itself (every one goes
//! out to the relay and comes back) while the relay crashes and restarts 3
//! times, on the embedded relay and on ProxyStore's own. The link must never
//! be the reason the relay drops it (the embedded relay closes a client that
//! stops reading with 1008; ProxyStore's relay waits on the client's socket
//! and its keepalive closes it), and nothing is lost untold: every message
//! is OK or UNKNOWN, every OK one arrives, none twice, and a crash costs at
//! most the link's in-flight window in UNKNOWN answers.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use relay_sidecar::relay::IN_FLIGHT_FRAMES;
use relay_sidecar_client::{DescriptionType, Error, Outgoing};
use support::relays::{CrashableRelay, Restart};
use support::sidecar::{LoggedDaemon, registered};
use support::{Dialect, PyRelay};

const MESSAGES: usize = 150_000;
const RESTARTS: usize = 3;
/// A failure guard for the whole stream, not a speed requirement.
const WAIT: Duration = Duration::from_secs(240);

async fn stream_to_self_across_restarts(relay: &mut impl Restart) {
    let queue = (MESSAGES + 1024).to_string();
    let daemon = LoggedDaemon::start(
        &relay.url(),
        &[
            ("RELAY_SIDECAR_BACKOFF_INITIAL", "50ms"),
            ("RELAY_SIDECAR_BACKOFF_MAX", "500ms"),
            // The test's reader may fall behind; the daemon must not drop.
            ("RELAY_SIDECAR_SUBSCRIBER_QUEUE", queue.as_str()),
            ("RELAY_SIDECAR_SUBSCRIBER_QUEUE_BYTES", "268435456"),
        ],
        &[],
    )
    .await;
    let client = daemon.client().await;
    let me = registered(&client).await.uuid;

    let mut inbox = client.subscribe(None).await.unwrap();
    let arrived = Arc::new(AtomicUsize::new(0));
    let reader = {
        let arrived = Arc::clone(&arrived);
        tokio::spawn(async move {
            let mut seen = Vec::with_capacity(MESSAGES);
            loop {
                let message = inbox.next_message().await.unwrap().expect("stream open");
                assert!(!message.bounced, "{message:?}");
                if message.description == "end" {
                    return seen;
                }
                seen.push(message.description.parse::<usize>().unwrap());
                arrived.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let sender = {
        let client = client.clone().with_worker("streamer");
        tokio::spawn(async move {
            let messages = futures_util::stream::iter(0..MESSAGES).map(move |n| Outgoing {
                peer: me,
                kind: DescriptionType::Offer,
                description: n.to_string(),
            });
            client.send_stream(messages).await
        })
    };
    // Crash the relay each time another quarter has come back.
    for restart in 1..=RESTARTS {
        let at = MESSAGES * restart / (RESTARTS + 1);
        tokio::time::timeout(WAIT, async {
            while arrived.load(Ordering::Relaxed) < at {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{at} messages back before restart {restart}"));
        relay.restart().await;
    }
    let report = tokio::time::timeout(WAIT, sender)
        .await
        .expect("the stream settles")
        .unwrap()
        .unwrap();

    // Once this comes back, everything written before it has.
    registered(&client).await;
    client
        .send(me, DescriptionType::Offer, "end")
        .await
        .unwrap();
    let seen = tokio::time::timeout(WAIT, reader)
        .await
        .expect("the end marker arrives")
        .unwrap();

    assert_eq!(report.settled, MESSAGES as u64);
    let mut unknown = HashSet::new();
    for failure in &report.failures {
        assert!(
            matches!(failure.error, Error::Unconfirmed(_)),
            "message {} failed with {:?}: only UNKNOWN may come of a lost connection",
            failure.index,
            failure.error
        );
        unknown.insert(failure.index as usize);
    }
    let mut arrived_once = HashSet::new();
    for n in &seen {
        assert!(arrived_once.insert(*n), "message {n} arrived twice");
    }
    let lost: Vec<usize> = (0..MESSAGES)
        .filter(|n| !unknown.contains(n) && !arrived_once.contains(n))
        .collect();
    assert!(
        lost.is_empty(),
        "{} OK messages never arrived, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );

    let status = client.status().await.unwrap();
    let log = daemon.stop().await;
    // Every registration that ended, and how.
    let ends: Vec<serde_json::Value> = log
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| entry["from"] == "registered")
        .collect();
    eprintln!(
        "{MESSAGES} messages, {RESTARTS} restarts: {} OK, {} UNKNOWN ({} of which arrived); \
         reconnects {}; registrations ended: {:?}",
        MESSAGES - unknown.len(),
        unknown.len(),
        unknown.iter().filter(|n| arrived_once.contains(n)).count(),
        status.counters.reconnects,
        ends.iter()
            .map(|e| (e["close_code"].clone(), e["detail"].clone()))
            .collect::<Vec<_>>()
    );
    // Only the crashes ended a registration: no close from the relay at all
    // (a 1008 for not reading, a keepalive 1011), no timeout of our own.
    assert_eq!(
        ends.len(),
        RESTARTS + 1,
        "one end per crash, and the stop: {ends:#?}"
    );
    for end in &ends[..RESTARTS] {
        assert!(end["close_code"].is_null(), "{end:#}");
        let detail = end["detail"].as_str().unwrap_or_default();
        assert!(
            !detail.contains("ping") && !detail.contains("confirm"),
            "{end:#}"
        );
    }
    assert_eq!(status.counters.reconnects, RESTARTS as u64);
    // A crash can cost only what was in flight: the link's window.
    assert!(
        unknown.len() <= RESTARTS * IN_FLIGHT_FRAMES,
        "{} UNKNOWN in {RESTARTS} crashes; at most {IN_FLIGHT_FRAMES} can be in flight",
        unknown.len()
    );
    assert_eq!(status.counters.dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_relay_150k_to_self_across_3_crashes() {
    let mut relay = CrashableRelay::start(Dialect::Current);
    stream_to_self_across_restarts(&mut relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxystore_relay_150k_to_self_across_3_crashes() {
    let mut relay = PyRelay::start_quiet(Dialect::Current).await;
    stream_to_self_across_restarts(&mut relay).await;
}
