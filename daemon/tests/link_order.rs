//! Order across a lost registration: one worker sends to this host itself,
//! pipelined unary Sends in one test and a SendStream in the other, while
//! ProxyStore's relay is killed and restarted halfway through; 10 runs each. Among the messages that came
//! back OK, none may arrive after a later one.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use relay_sidecar_client::{DescriptionType, Error, Outgoing, Subscription};
use support::relays::Restart;
use support::sidecar::{LoggedDaemon, registered};
use support::{Dialect, PyRelay};
use uuid::Uuid;

const RUNS: usize = 10;
const PER_RUN: usize = 2_000;
/// Padding on every message of the stream, so that the daemon's writes to
/// the relay fill the socket's buffers and sends queue up behind them when
/// it dies. Unary sends go without: concurrent calls on one HTTP/2
/// connection share its flow-control window, and large ones would reach
/// the daemon in another order than they were made.
const STREAM_PADDING: usize = 8 * 1024;
/// Unary Sends one worker keeps in flight.
const IN_FLIGHT: usize = 64;
/// A failure guard, not a speed requirement.
const WAIT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug)]
enum Way {
    Unary,
    Stream,
}

/// Sends run `run`'s messages the given way; returns each one's outcome.
async fn send_all(
    client: relay_sidecar_client::Client,
    me: Uuid,
    run: usize,
    way: Way,
) -> Vec<Result<(), Error>> {
    let padding = match way {
        Way::Unary => String::new(),
        Way::Stream => "x".repeat(STREAM_PADDING),
    };
    let text = move |n: usize| format!("{run}:{n}:{padding}");
    match way {
        Way::Unary => {
            futures_util::stream::iter(0..PER_RUN)
                .map(|n| {
                    let (client, text) = (client.clone(), text.clone());
                    async move { client.send(me, DescriptionType::Offer, text(n)).await }
                })
                .buffered(IN_FLIGHT)
                .collect()
                .await
        }
        Way::Stream => {
            let messages = futures_util::stream::iter(0..PER_RUN).map(move |n| Outgoing {
                peer: me,
                kind: DescriptionType::Offer,
                description: text(n),
            });
            let report = client.send_stream(messages).await.unwrap();
            assert_eq!(report.settled, PER_RUN as u64);
            let mut outcomes: Vec<Result<(), Error>> = (0..PER_RUN).map(|_| Ok(())).collect();
            for failure in report.failures {
                outcomes[failure.index as usize] = Err(failure.error);
            }
            outcomes
        }
    }
}

/// Reads run `run`'s messages, in arrival order, until its end marker.
async fn receive_run(
    mut inbox: Subscription,
    run: usize,
    arrived: Arc<AtomicUsize>,
) -> (Subscription, Vec<usize>) {
    let prefix = format!("{run}:");
    let mut seen = Vec::with_capacity(PER_RUN);
    loop {
        let message = inbox.next_message().await.unwrap().expect("stream open");
        if message.description == format!("end-{run}") {
            return (inbox, seen);
        }
        if let Some((n, _)) = message
            .description
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split_once(':'))
        {
            seen.push(n.parse().unwrap());
            arrived.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// OK messages that arrived after a higher-numbered OK message.
fn inversions(arrival: &[usize], ok: &HashSet<usize>) -> usize {
    let mut highest = None;
    let mut count = 0;
    for n in arrival.iter().filter(|n| ok.contains(n)) {
        match highest {
            Some(h) if *n < h => count += 1,
            _ => highest = Some(*n),
        }
    }
    count
}

async fn order_holds_across_lost_registrations(way: Way, relay: &mut impl Restart) {
    let daemon = LoggedDaemon::start(
        &relay.url(),
        &[
            ("RELAY_SIDECAR_BACKOFF_INITIAL", "50ms"),
            ("RELAY_SIDECAR_BACKOFF_MAX", "500ms"),
            // The test's reader may fall behind a whole run (2,000 x 8 KiB);
            // neither of the subscriber queue's bounds may drop any of it.
            ("RELAY_SIDECAR_SUBSCRIBER_QUEUE", "16384"),
            ("RELAY_SIDECAR_SUBSCRIBER_QUEUE_BYTES", "268435456"),
        ],
        &[],
    )
    .await;
    let client = daemon.client().await.with_worker("one-worker");
    let me = registered(&client).await.uuid;
    let mut inbox = Some(client.subscribe(None).await.unwrap());
    let mut total = 0;
    let mut report = Vec::new();
    for run in 0..RUNS {
        let arrived = Arc::new(AtomicUsize::new(0));
        let reader = tokio::spawn(receive_run(
            inbox.take().unwrap(),
            run,
            Arc::clone(&arrived),
        ));
        let sender = tokio::spawn(send_all(client.clone(), me, run, way));
        tokio::time::timeout(WAIT, async {
            while arrived.load(Ordering::Relaxed) < PER_RUN / 2 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("half of the run comes back");
        relay.restart().await;
        let outcomes = tokio::time::timeout(WAIT, sender)
            .await
            .expect("the sends settle")
            .unwrap();
        registered(&client).await;
        client
            .send(me, DescriptionType::Offer, format!("end-{run}"))
            .await
            .unwrap();
        let (back, arrival) = tokio::time::timeout(WAIT, reader)
            .await
            .expect("the end marker arrives")
            .unwrap();
        inbox = Some(back);

        let mut ok = HashSet::new();
        let mut unknown = 0;
        for (n, outcome) in outcomes.iter().enumerate() {
            match outcome {
                Ok(()) => {
                    ok.insert(n);
                }
                Err(Error::Unconfirmed(_)) => unknown += 1,
                Err(other) => panic!("run {run}, message {n}: {other:?}"),
            }
        }
        let arrived_ok: HashSet<usize> =
            arrival.iter().copied().filter(|n| ok.contains(n)).collect();
        let dropped = client.status().await.unwrap().counters.dropped;
        assert_eq!(
            arrived_ok.len(),
            ok.len(),
            "run {run}: OK messages lost ({dropped} dropped by the daemon so far)"
        );
        let found = inversions(&arrival, &ok);
        report.push((ok.len(), unknown, found));
        total += found;
    }
    eprintln!("{way:?}: (OK, UNKNOWN, inversions) per run: {report:?}");
    // Every restart cost a registration, or the order was never put to it.
    let reconnects = client.status().await.unwrap().counters.reconnects;
    assert!(
        reconnects >= RUNS as u64,
        "{reconnects} reconnects in {RUNS} runs"
    );
    assert_eq!(total, 0, "{way:?}: OK messages out of order: {report:?}");
    daemon.stop().await;
}

// One thread: the test's own gRPC client then sends the calls in the order
// they were made (on several threads, its tasks race to write them).
#[tokio::test]
async fn unary_sends_from_one_worker_keep_their_order_across_lost_registrations() {
    let mut relay = PyRelay::start_quiet(Dialect::Current).await;
    order_holds_across_lost_registrations(Way::Unary, &mut relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_stream_keeps_its_order_across_lost_registrations() {
    let mut relay = PyRelay::start_quiet(Dialect::Current).await;
    order_holds_across_lost_registrations(Way::Stream, &mut relay).await;
}

#[test]
fn inversions_count_late_arrivals() {
    let ok: HashSet<usize> = [0, 1, 2, 3, 5].into_iter().collect();
    assert_eq!(inversions(&[0, 1, 2, 3, 5], &ok), 0);
    assert_eq!(inversions(&[0, 2, 1, 3, 5], &ok), 1);
    // 4 is not OK (UNKNOWN): it does not count either way.
    assert_eq!(inversions(&[0, 1, 4, 2, 3, 5], &ok), 0);
    assert_eq!(inversions(&[5, 0, 1, 2, 3], &ok), 4);
}
