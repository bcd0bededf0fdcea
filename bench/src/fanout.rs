//! Fan-out: one inbound stream delivered by one daemon to many ungrouped
//! subscribers.

use std::sync::Arc;

use anyhow::{Context as _, Result};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use uuid::Uuid;

use crate::daemon::DaemonProc;
use crate::raw::RawPeer;
use crate::report::{Results, Row, Unit};
use crate::run::Bench;
use crate::sidecar::{count, finished, subscribe};
use crate::traffic::{MEASURE_TIMEOUT, Progress, rate};

/// One inbound stream delivered to many ungrouped subscribers.
pub async fn measure(bench: &Bench, results: &mut Results) -> Result<()> {
    let c = &bench.counts;
    let daemon = bench.start_daemon("fanout", &bench.relay_url).await?;
    let mut source =
        RawPeer::connect(&bench.relay_url, "bench-fanout-source", Uuid::new_v4()).await?;
    let mut rates = Vec::new();
    for rep in 0..c.repetitions {
        let rate = fanout(
            &mut source,
            &daemon,
            c.fanout_subscribers,
            c.fanout,
            c.payload,
        )
        .await?;
        eprintln!("fanout #{rep}: {rate:.0} delivered/s");
        rates.push(rate);
    }
    daemon.check_clean().await?;
    daemon.stop().await;
    results.add(
        Row::new(
            "fanout.delivered",
            "fan-out",
            format!(
                "one inbound stream to {} ungrouped subscribers: delivered in total",
                c.fanout_subscribers
            ),
            Unit::PerSecond,
            rates,
        )
        .reference("raw_processes.throughput"),
    );
    Ok(())
}

/// A raw peer streams `count` messages to `daemon`, where `subscribers`
/// ungrouped subscriptions each receive all of them: deliveries per second.
/// The source stays within `WINDOW` of the slowest subscriber, so that
/// none of them loses messages to a full queue.
async fn fanout(
    source: &mut RawPeer,
    daemon: &DaemonProc,
    subscribers: u64,
    messages: u64,
    size: usize,
) -> Result<f64> {
    let changed = Arc::new(Notify::new());
    let mut progress = Vec::new();
    let mut counters = Vec::new();
    for n in 0..subscribers {
        let mut client = daemon.client().await?;
        let inbox = subscribe(&mut client, "", &format!("fanout-{n}")).await?;
        let p = Arc::new(Progress::sharing(&changed));
        counters.push(count(inbox, messages, Arc::clone(&p)));
        progress.push(p);
    }
    let slowest = || progress.iter().map(|p| p.get()).min().unwrap_or(messages);
    let start = Instant::now();
    let sent = timeout(
        MEASURE_TIMEOUT,
        source.send_within(daemon.uuid, messages, size, slowest, &changed),
    )
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        counters.iter().for_each(JoinHandle::abort);
    }
    sent.context("fan-out source timed out")??;
    let mut done = start;
    for counter in counters {
        done = done.max(finished(counter, "fan-out", daemon).await?);
    }
    Ok(rate(messages * subscribers, done - start))
}
