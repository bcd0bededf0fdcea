//! Faults: subscriber churn, bad input in the middle of another worker's
//! stream, and SIGTERM under load.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use relay_sidecar::codec::{self, Frame, RelayResponse};
use relay_sidecar_client::proto::v1;
use relay_sidecar_client::{Client, DescriptionType};
use support::Dialect;
use support::sidecar::{TestDaemon, daemon_args, dev_relay, registered, spawn_daemon};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(60);

/// Resident set size of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Bound on the daemon's growth over 1,000 subscribe-and-drop clients.
const CHURN_RSS_GROWTH_KIB: u64 = 8 * 1024;

#[tokio::test]
async fn subscriber_churn_leaves_nothing_behind() {
    let relay = dev_relay().await;
    let dir = tempfile::tempdir().unwrap();
    let (args, socket) = daemon_args(dir.path(), &relay.url());
    let mut daemon = spawn_daemon(&args).await;
    let pid = daemon.id().unwrap();
    let observer = relay_sidecar_client::connect(&socket).await.unwrap();
    registered(&observer).await;

    // Warm up once so that one-time allocations are not counted as growth.
    churn(&socket, 50).await;
    wait_for_subscribers(&observer, 0).await;
    let before = rss_kib(pid);
    churn(&socket, 1000).await;
    let after_status = wait_for_subscribers(&observer, 0).await;
    let after = rss_kib(pid);
    eprintln!(
        "daemon RSS: {before} KiB before, {after} KiB after 1,000 subscribe-and-drop clients"
    );
    assert!(
        after <= before + CHURN_RSS_GROWTH_KIB,
        "RSS grew from {before} KiB to {after} KiB"
    );
    assert_eq!(after_status.counters.workers, 0);
    daemon.kill().await.unwrap();
}

/// `n` clients, 50 at a time, each connecting, subscribing, and going away.
async fn churn(socket: &std::path::Path, n: usize) {
    for batch in 0..n.div_ceil(50) {
        let tasks: Vec<_> = (0..50.min(n - batch * 50))
            .map(|i| {
                let socket = socket.to_path_buf();
                tokio::spawn(async move {
                    let client = relay_sidecar_client::connect(&socket).await.unwrap();
                    let group = format!("g{}", i % 7);
                    let subscription = client.subscribe(Some(&group)).await.unwrap();
                    drop(subscription);
                    drop(client);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    }
}

async fn wait_for_subscribers(client: &Client, n: u64) -> relay_sidecar_client::Status {
    tokio::time::timeout(WAIT, async {
        loop {
            let status = client.status().await.unwrap();
            if status.counters.subscribers == n {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("subscriptions of gone clients are removed")
}

#[tokio::test]
async fn one_workers_bad_input_never_costs_another_its_stream() {
    let relay = dev_relay().await;
    let host = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let remote = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let (client, receiver) = (
        host.registered_client().await,
        remote.registered_client().await,
    );
    let mut inbox = receiver.subscribe(None).await.unwrap();

    const N: usize = 1000;
    let good = client.clone().with_worker("good");
    let to = remote.uuid;
    let streaming = tokio::spawn(async move {
        for n in 0..N {
            good.send(to, DescriptionType::Offer, n.to_string())
                .await
                .unwrap();
        }
    });
    let mut bad = client.raw();
    let mut refused = 0;
    for i in 0..20 {
        let request = if i % 2 == 0 {
            v1::SendRequest {
                peer_uuid: to.to_string(),
                description_type: "offer".into(),
                description: "b".repeat(2 << 20),
                worker: "bad".into(),
                ..Default::default()
            }
        } else {
            v1::SendRequest {
                peer_uuid: format!("{to}-not"),
                description_type: "offer".into(),
                description: "x".into(),
                worker: "bad".into(),
                ..Default::default()
            }
        };
        let status = bad.send(request).await.expect_err("bad input is refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        refused += 1;
    }
    for n in 0..N {
        let message = tokio::time::timeout(WAIT, inbox.next_message())
            .await
            .expect("the good worker's messages keep arriving")
            .unwrap()
            .unwrap();
        assert_eq!(message.description, n.to_string());
    }
    streaming.await.unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(refused, 20);
    assert_eq!(
        status.counters.sent, N as u64,
        "no bad message reached the relay"
    );
    assert_eq!(
        status.counters.reconnects, 0,
        "the relay never closed the connection"
    );
    assert_eq!(status.close_code, None);
    host.stop().await;
    remote.stop().await;
}

/// A relay that registers one client, returns what the client sends to
/// itself (the daemon's confirmation probes), swallows the rest, and reports
/// the close code the client ends with: the real relays do not tell.
async fn recording_relay() -> (String, tokio::task::JoinHandle<(usize, Option<u16>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        let first = ws.next().await.unwrap().unwrap();
        let Ok(Frame::Registration(client)) =
            codec::decode(first.to_text().unwrap(), Dialect::Current)
        else {
            panic!("the first frame is a registration: {first:?}");
        };
        let ok = Frame::Response(RelayResponse {
            success: true,
            message: None,
            error: false,
        });
        ws.send(Message::text(codec::encode(&ok, Dialect::Current)))
            .await
            .unwrap();
        let mut frames = 0;
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Text(text) => match codec::decode(&text, Dialect::Current) {
                    Ok(Frame::Peer(peer)) if peer.peer_uuid == client.uuid => {
                        ws.send(Message::Text(text)).await.unwrap();
                    }
                    _ => frames += 1,
                },
                Message::Close(frame) => return (frames, frame.map(|f| u16::from(f.code))),
                _ => {}
            }
        }
        (frames, None)
    });
    (url, task)
}

#[tokio::test]
async fn sigterm_under_load_closes_with_1000_ends_streams_and_exits() {
    let (url, relay) = recording_relay().await;
    let dir = tempfile::tempdir().unwrap();
    let (args, socket) = daemon_args(dir.path(), &url);
    let mut daemon = spawn_daemon(&args).await;
    let client = relay_sidecar_client::connect(&socket).await.unwrap();
    registered(&client).await;

    // Four workers, each with an open subscription, streaming sends.
    let mut workers = Vec::new();
    for w in 0..4 {
        let worker = client.clone().with_worker(format!("w{w}"));
        let mut inbox = worker.subscribe(Some("workers")).await.unwrap();
        workers.push(tokio::spawn(async move {
            let peer = uuid::Uuid::new_v4();
            let (mut ok, mut failed) = (0u64, 0u64);
            loop {
                match worker.send(peer, DescriptionType::Offer, "load").await {
                    Ok(()) => ok += 1,
                    Err(_) => {
                        failed += 1;
                        break;
                    }
                }
            }
            // The subscription ends rather than hangs.
            while let Ok(Some(_)) = inbox.next_message().await {}
            (ok, failed)
        }));
    }
    // Let the load build up: wait until the relay has seen traffic.
    tokio::time::timeout(WAIT, async {
        while client.status().await.unwrap().counters.sent < 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("traffic flows");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(5), daemon.wait())
        .await
        .expect("the daemon exits within 5 s of SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    let (frames, close_code) = tokio::time::timeout(WAIT, relay).await.unwrap().unwrap();
    assert_eq!(close_code, Some(1000), "a clean close");
    let mut ok_total = 0;
    for worker in workers {
        let (ok, failed) = tokio::time::timeout(WAIT, worker)
            .await
            .expect("every worker's calls and streams ended")
            .unwrap();
        assert_eq!(failed, 1, "each worker was told once its send failed");
        ok_total += ok;
    }
    // Every send reported OK was written to the relay before the close.
    assert!(
        ok_total as usize <= frames,
        "{ok_total} OK, {frames} at the relay"
    );
    assert!(!socket.exists(), "the socket file is removed");
}
