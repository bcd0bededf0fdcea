//! The Prometheus endpoint (`metrics_listen`), scraped over plain HTTP after
//! the daemon has registered, sent and had a message bounced.

mod support;

use std::time::Duration;

use relay_sidecar_client::{DescriptionType, SendOptions};
use support::sidecar::{TestDaemon, dev_relay, settings};
use support::{Dialect, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

/// GET `path` from 127.0.0.1:`port`; the status line and the body.
async fn get(port: u16, path: &str) -> (String, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    let response = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("a response");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers and a body");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// The value of the sample named exactly `sample` (with its labels).
fn value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {sample} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_scrape_shows_state_counters_subscribers_and_send_latency() {
    let relay = dev_relay().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut s = settings(dir.path(), &relay.url(), Dialect::Current);
    s.metrics_listen = Some(format!("127.0.0.1:{port}"));
    let daemon = TestDaemon::start_with(s).await;
    let client = daemon.registered_client().await;
    let mut subscription = client.subscribe(None).await.unwrap();
    // To nobody: the relay returns it, and the subscriber sees the bounce.
    client
        .send_with(
            Uuid::new_v4(),
            DescriptionType::Offer,
            "anyone?",
            SendOptions::new(),
        )
        .await
        .unwrap();
    let bounce = tokio::time::timeout(WAIT, subscription.next_message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(bounce.bounced);

    let (status, text) = get(port, "/metrics").await;
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(
        value(
            &text,
            "relay_sidecar_connection_state{state=\"registered\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&text, "relay_sidecar_connection_state{state=\"backoff\"}"),
        0.0
    );
    assert_eq!(value(&text, "relay_sidecar_registrations_total"), 1.0);
    assert_eq!(value(&text, "relay_sidecar_reconnects_total"), 0.0);
    assert_eq!(value(&text, "relay_sidecar_messages_sent_total"), 1.0);
    assert_eq!(value(&text, "relay_sidecar_messages_bounced_total"), 1.0);
    // The bounce came in from the relay like any message.
    assert_eq!(value(&text, "relay_sidecar_messages_received_total"), 1.0);
    assert_eq!(
        value(
            &text,
            "relay_sidecar_messages_dropped_total{reason=\"queue_full\"}"
        ),
        0.0
    );
    assert_eq!(value(&text, "relay_sidecar_subscribers"), 1.0);
    assert_eq!(
        value(&text, "relay_sidecar_send_duration_seconds_count"),
        1.0
    );
    let sum = value(&text, "relay_sidecar_send_duration_seconds_sum");
    assert!(sum > 0.0 && sum < WAIT.as_secs_f64(), "{sum}");
    assert!(text.contains("# TYPE relay_sidecar_send_duration_seconds histogram"));
    assert!(text.trim_end().ends_with("# EOF"), "{text}");

    // Anything else is a 404 that says where to look.
    let (status, body) = get(port, "/").await;
    assert!(status.contains(" 404 "), "{status}");
    assert!(body.contains("/metrics"));

    drop(subscription);
    daemon.stop().await;
    let gone = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    assert!(gone.is_err(), "the endpoint closes with the daemon");
}
