//! What a local caller or a remote peer can make the router keep is bounded:
//! worker labels, the reply-affinity table, the backlog's bytes, and the log
//! lines that drops cost. Each test attacks the real daemon binary and
//! measures it from outside (its resident memory in /proc, its log).

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt;
use relay_sidecar_client::proto::v1;
use relay_sidecar_client::{Client, DescriptionType, Outgoing};
use support::Dialect;
use support::sidecar::{
    TestDaemon, daemon_args, daemon_command, dev_relay, registered, status_until,
};
use tokio::io::AsyncBufReadExt;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(120);

/// Resident set size of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The daemon binary on `relay_url`, with extra settings from the
/// environment, JSON logs collected on a channel; and its socket.
async fn daemon(
    dir: &Path,
    relay_url: &str,
    env: &[(&str, &str)],
) -> (
    tokio::process::Child,
    std::path::PathBuf,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (args, socket) = daemon_args(dir, relay_url);
    let mut command = daemon_command();
    command.args(&args).args(["--log-format", "json"]);
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.stdout(Stdio::null()).spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line);
        }
    });
    let client = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(client) = relay_sidecar_client::connect(&socket).await {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the daemon serves");
    registered(&client).await;
    (child, socket, rx)
}

/// Streams `requests` on one SendStream call; returns how many failed, by
/// code.
async fn send_stream(client: &Client, requests: Vec<v1::SendRequest>) -> Vec<(i32, String)> {
    let mut responses = client
        .raw()
        .send_stream(futures_util::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut failures = Vec::new();
    while let Some(response) = responses.next().await {
        for f in response.unwrap().failures {
            failures.push((f.code, f.message));
        }
    }
    failures
}

fn send_request(worker: String) -> v1::SendRequest {
    v1::SendRequest {
        peer_uuid: Uuid::new_v4().to_string(),
        description_type: "offer".into(),
        description: "x".into(),
        worker,
        ..Default::default()
    }
}

/// A worker label may be at most 256 bytes: 300 sends with 1 MiB labels to
/// 300 peers are refused by field, and the daemon keeps nothing of them.
const HUGE_LABEL_RSS_GROWTH_KIB: u64 = 24 * 1024;
/// 150,000 sends, each with a label of its own, to 150,000 peers: the
/// affinity table keeps 4,096 bindings at most (under 1 MiB). Without the
/// bound the table kept every one: +10.8 MB for 100,000 in one run.
const MANY_LABELS_RSS_GROWTH_KIB: u64 = 8 * 1024;

#[tokio::test]
async fn worker_labels_and_the_affinity_table_are_bounded() {
    let relay = dev_relay().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, socket, _log) = daemon(dir.path(), &relay.url(), &[]).await;
    let pid = child.id().unwrap();
    let client = relay_sidecar_client::connect(&socket).await.unwrap();
    // Warm up: one-time allocations are not growth. In streams of 500:
    // every send comes back as a bounce (nobody has these uuids), and the
    // embedded relay closes a client that has more than 1,024 unread.
    for chunk in 0..4 {
        let requests = (0..500)
            .map(|n| send_request(format!("warm-{chunk}-{n}")))
            .collect();
        let failures = send_stream(&client, requests).await;
        assert!(failures.is_empty(), "{failures:?}");
    }

    let before = rss_kib(pid);
    let huge = "w".repeat(1 << 20);
    for _ in 0..300 {
        let request = send_request(huge.clone());
        let status = client.raw().send(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("worker:"),
            "{}",
            status.message()
        );
    }
    let mut long = relay_sidecar_client::proto::v1::SubscribeRequest {
        worker: huge.clone(),
        ..Default::default()
    };
    let status = client.raw().subscribe(long.clone()).await.unwrap_err();
    assert!(
        status.message().starts_with("worker:"),
        "{}",
        status.message()
    );
    long.worker.clear();
    long.group = huge;
    let status = client.raw().subscribe(long).await.unwrap_err();
    assert!(
        status.message().starts_with("group:"),
        "{}",
        status.message()
    );
    let after_huge = rss_kib(pid);

    const MANY: usize = 150_000;
    for chunk in 0..MANY / 500 {
        let requests = (0..500)
            .map(|n| send_request(format!("label-{chunk}-{n}")))
            .collect();
        let failures = send_stream(&client, requests).await;
        assert!(
            failures.is_empty(),
            "{} failed: {:?}",
            failures.len(),
            failures.first()
        );
    }
    let after_many = rss_kib(pid);
    eprintln!(
        "daemon RSS: {before} KiB, {after_huge} KiB after 300 sends with 1 MiB labels, \
         {after_many} KiB after {MANY} sends with distinct labels to distinct peers"
    );
    assert!(
        after_huge <= before + HUGE_LABEL_RSS_GROWTH_KIB,
        "1 MiB labels: RSS grew from {before} KiB to {after_huge} KiB"
    );
    assert!(
        after_many <= after_huge + MANY_LABELS_RSS_GROWTH_KIB,
        "distinct labels: RSS grew from {after_huge} KiB to {after_many} KiB"
    );
    child.kill().await.unwrap();
}

/// 200 messages of 600 kB from a remote peer while nobody is subscribed:
/// the backlog keeps 8 MiB of them (backlog_bytes), not 120 MB.
const BIG_BACKLOG_RSS_GROWTH_KIB: u64 = 40 * 1024;

#[tokio::test]
async fn the_backlog_is_bounded_in_bytes() {
    let relay = dev_relay().await;
    let dir = tempfile::tempdir().unwrap();
    // Only the byte bound may drop: none expires on a slow run.
    let env = [("RELAY_SIDECAR_BACKLOG_TTL", "600s")];
    let (mut child, socket, _log) = daemon(dir.path(), &relay.url(), &env).await;
    let pid = child.id().unwrap();
    let host = relay_sidecar_client::connect(&socket).await.unwrap();
    let host_uuid = host.status().await.unwrap().uuid;
    let remote = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let sender = remote.registered_client().await;

    let before = rss_kib(pid);
    const N: u64 = 200;
    let big = "b".repeat(600_000);
    let messages = (0..N).map(move |_| Outgoing {
        peer: host_uuid,
        kind: DescriptionType::Answer,
        description: big.clone(),
    });
    let report = sender
        .send_stream(futures_util::stream::iter(messages))
        .await
        .unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let status = status_until(&host, |s| s.counters.received == N).await;
    let after = rss_kib(pid);
    let kept = N - status.counters.dropped_no_subscriber;
    eprintln!(
        "daemon RSS: {before} KiB before, {after} KiB after {N} x 600 kB with nobody subscribed; \
         {kept} kept, {} dropped",
        status.counters.dropped_no_subscriber
    );
    assert!(kept <= 14, "8 MiB holds 13 of them: {kept} kept");
    assert!(
        after <= before + BIG_BACKLOG_RSS_GROWTH_KIB,
        "RSS grew from {before} KiB to {after} KiB"
    );
    remote.stop().await;
    child.kill().await.unwrap();
}

/// 20,000 messages while nobody is subscribed, into a backlog of 16: drops
/// are a summary in the log, never a line each.
const DROP_LOG_LINES: usize = 3;

#[tokio::test]
async fn drops_are_logged_as_a_summary_not_a_line_each() {
    let relay = dev_relay().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, socket, mut log) =
        daemon(dir.path(), &relay.url(), &[("RELAY_SIDECAR_BACKLOG", "16")]).await;
    let host = relay_sidecar_client::connect(&socket).await.unwrap();
    let host_uuid = host.status().await.unwrap().uuid;
    let remote = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let sender = remote.registered_client().await;

    const N: u64 = 20_000;
    let messages = (0..N).map(move |n| Outgoing {
        peer: host_uuid,
        kind: DescriptionType::Answer,
        description: n.to_string(),
    });
    let report = sender
        .send_stream(futures_util::stream::iter(messages))
        .await
        .unwrap();
    assert!(report.failures.is_empty());
    let status = status_until(&host, |s| s.counters.received == N).await;
    assert_eq!(status.counters.dropped_no_subscriber, N - 16);

    // SIGTERM: the daemon logs what is pending as it stops.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    let mut lines = Vec::new();
    while let Ok(line) = log.try_recv() {
        lines.push(line);
    }
    let summaries: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l.get("dropped").is_some())
        .collect();
    eprintln!(
        "{} log lines, {} about drops: {summaries:?}",
        lines.len(),
        summaries.len()
    );
    assert!(
        !summaries.is_empty() && summaries.len() <= DROP_LOG_LINES,
        "{} lines about drops",
        summaries.len()
    );
    let logged: u64 = summaries
        .iter()
        .map(|s| s["dropped"].as_u64().unwrap())
        .sum();
    assert_eq!(logged, N - 16, "the summaries add up to the counter");
    let message = summaries[0]["message"].as_str().unwrap();
    assert!(message.contains("no subscriber"), "{message}");
    remote.stop().await;
}
