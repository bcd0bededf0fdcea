//! The daemon's memory: its RSS registered and idle, and with many open
//! subscriptions, each on its own connection (as from that many worker
//! processes) or shared over a few.

use std::time::Duration;

use anyhow::{Result, ensure};
use relay_sidecar_client::proto::v1;
use tokio::time::Instant;

use crate::procfs::Rss;
use crate::report::{Results, Row, Unit, thousands};
use crate::run::Bench;
use crate::sidecar::subscribe;
use crate::traffic::START_TIMEOUT;

/// Daemon RSS idle, and with many open subscriptions: each on its own
/// connection (as from that many worker processes), and shared over a
/// few connections. Each case on a fresh daemon.
pub async fn measure(bench: &Bench, results: &mut Results) -> Result<()> {
    let c = &bench.counts;
    let (idle, own) = subscribed_rss(bench, c.subscriptions).await?;
    let (_, shared) = subscribed_rss(bench, c.subscription_connections).await?;
    eprintln!(
        "memory: idle {idle}; {n} subscriptions on {n} connections {own}; on {} connections {shared}",
        c.subscription_connections,
        n = c.subscriptions,
    );
    results.add(
        Row::new(
            "memory.idle_rss",
            "memory",
            "daemon RSS, registered, idle".into(),
            Unit::MiB,
            vec![idle.rss_mib()],
        )
        .detail(idle.detail()),
    );
    results.add(
        Row::new(
            "memory.subscribed_rss",
            "memory",
            format!(
                "daemon RSS, {} subscriptions, each on its own connection",
                thousands(c.subscriptions)
            ),
            Unit::MiB,
            vec![own.rss_mib()],
        )
        .detail(own.detail()),
    );
    results.add(
        Row::new(
            "memory.subscribed_shared_rss",
            "memory",
            format!(
                "daemon RSS, {} subscriptions on {} connections",
                thousands(c.subscriptions),
                c.subscription_connections
            ),
            Unit::MiB,
            vec![shared.rss_mib()],
        )
        .detail(shared.detail()),
    );
    Ok(())
}

/// A fresh daemon's RSS when idle, and then with `subscriptions` open
/// subscriptions spread over `connections` connections.
async fn subscribed_rss(bench: &Bench, connections: u64) -> Result<(Rss, Rss)> {
    let subscriptions = bench.counts.subscriptions;
    let daemon = bench.start_daemon("memory", &bench.relay_url).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = Rss::of(daemon.pid)?;
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(daemon.client().await?);
    }
    let mut streams = Vec::new();
    for n in 0..subscriptions {
        let client = &mut clients[(n % connections) as usize];
        streams.push(subscribe(client, "", &format!("idle-{n}")).await?);
    }
    let mut probe = daemon.client().await?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let status = probe
            .get_status(v1::GetStatusRequest {})
            .await?
            .into_inner();
        let open = status.counters.map(|c| c.subscribers).unwrap_or(0);
        if open >= subscriptions {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {open} of {subscriptions} subscriptions open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let subscribed = Rss::of(daemon.pid)?;
    drop(streams);
    drop(clients);
    daemon.stop().await;
    Ok((idle, subscribed))
}
