//! Bad input from a worker gets INVALID_ARGUMENT naming the field, never
//! reaches the relay, and never costs the other workers the connection.

mod support;

use std::time::Duration;

use relay_sidecar_client::proto::v1;
use relay_sidecar_client::tonic::Code;
use relay_sidecar_client::{DescriptionType, Error};
use support::Dialect;
use support::sidecar::{TestDaemon, dev_relay, settings};

const WAIT: Duration = Duration::from_secs(20);

fn request(peer_uuid: &str, description_type: &str, description: String) -> v1::SendRequest {
    v1::SendRequest {
        peer_uuid: peer_uuid.to_owned(),
        description_type: description_type.to_owned(),
        description,
        worker: String::new(),
        ..Default::default()
    }
}

/// Streams `requests` with the raw SendStream RPC and reads every progress
/// report: the last `settled` count and all failures, in order.
async fn send_stream(
    client: &relay_sidecar_client::Client,
    requests: Vec<v1::SendRequest>,
) -> (u64, Vec<v1::SendFailure>) {
    let mut progress = client
        .raw()
        .send_stream(futures_util::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let (mut settled, mut failures) = (0, Vec::new());
    while let Some(response) = progress.message().await.unwrap() {
        assert!(response.settled > settled, "progress only grows");
        settled = response.settled;
        failures.extend(response.failures);
    }
    (settled, failures)
}

#[tokio::test]
async fn bad_sends_are_refused_by_field_and_the_link_survives() {
    let relay = dev_relay().await;
    let a = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let b = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let (client_a, client_b) = (a.registered_client().await, b.registered_client().await);
    let mut inbox_b = client_b.subscribe(None).await.unwrap();
    let peer = b.uuid.to_string();
    let mut raw = client_a.raw();

    let cases = [
        (request("not-a-uuid", "offer", "x".into()), "peer_uuid"),
        (request("", "offer", "x".into()), "peer_uuid"),
        (request(&peer, "pranswer", "x".into()), "description_type"),
        (request(&peer, "", "x".into()), "description_type"),
        (request(&peer, "offer", "x".repeat(1 << 20)), "description"),
    ];
    for (bad, field) in cases {
        let status = raw.send(bad).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "the message names {field}: {}",
            status.message()
        );
    }
    // Through the SDK, the same refusal is a typed error.
    let oversized = client_a
        .send(b.uuid, DescriptionType::Offer, "y".repeat(2 << 20))
        .await;
    assert!(matches!(oversized, Err(Error::InvalidArgument(m)) if m.starts_with("description:")));

    // Nothing reached the relay, the link was never dropped, and the next
    // good message goes through, and is the first B sees.
    client_a
        .send(b.uuid, DescriptionType::Offer, "good")
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, inbox_b.next_message())
        .await
        .expect("good message in time")
        .unwrap()
        .unwrap();
    assert_eq!(got.description, "good");
    let status = client_a.status().await.unwrap();
    assert_eq!(status.counters.sent, 1);
    assert_eq!(status.counters.reconnects, 0);
    assert_eq!(status.close_code, None);

    // A message exactly at the limit is accepted.
    let frame_overhead = {
        let probe = relay_sidecar::codec::encode(
            &relay_sidecar::codec::Frame::Peer(relay_sidecar::codec::PeerConnection {
                source_uuid: a.uuid,
                source_name: a.name.clone(),
                peer_uuid: b.uuid,
                description_type: "offer".into(),
                description: String::new(),
                error: None,
            }),
            relay_sidecar::codec::Dialect::Current,
        );
        probe.len()
    };
    let at_limit = "z".repeat((1 << 20) - frame_overhead);
    client_a
        .send(b.uuid, DescriptionType::Offer, at_limit.clone())
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, inbox_b.next_message())
        .await
        .expect("message at the limit in time")
        .unwrap()
        .unwrap();
    assert_eq!(got.description.len(), at_limit.len());
    assert_eq!(client_a.status().await.unwrap().counters.reconnects, 0);

    a.stop().await;
    b.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn send_stream_reports_each_bad_message_and_delivers_the_rest() {
    let relay = dev_relay().await;
    let a = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let b = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let (client_a, client_b) = (a.registered_client().await, b.registered_client().await);
    let mut inbox_b = client_b.subscribe(None).await.unwrap();
    let peer = b.uuid.to_string();

    const N: usize = 2000;
    let requests: Vec<v1::SendRequest> = (0..N)
        .map(|n| match n {
            500 => request("not-a-uuid", "offer", "bad".into()),
            1500 => request(&peer, "hello", "bad".into()),
            _ => request(&peer, "offer", n.to_string()),
        })
        .collect();
    let (settled, failures) = send_stream(&client_a, requests).await;
    assert_eq!(settled, N as u64, "every message has an outcome");
    let failed: Vec<(u64, i32)> = failures.iter().map(|f| (f.index, f.code)).collect();
    assert_eq!(
        failed,
        [
            (500, Code::InvalidArgument as i32),
            (1500, Code::InvalidArgument as i32)
        ]
    );
    assert!(failures[0].message.starts_with("peer_uuid:"));
    assert!(failures[1].message.starts_with("description_type:"));

    for n in (0..N).filter(|n| *n != 500 && *n != 1500) {
        let got = tokio::time::timeout(WAIT, inbox_b.next_message())
            .await
            .expect("streamed message in time")
            .unwrap()
            .unwrap();
        assert_eq!(got.description, n.to_string(), "in order");
    }
    assert_eq!(client_a.status().await.unwrap().counters.sent, N as u64 - 2);

    // The SDK's wrapper reports the same way, with typed errors.
    let outgoing = |description: String| relay_sidecar_client::Outgoing {
        peer: b.uuid,
        kind: DescriptionType::Answer,
        description,
    };
    let messages = vec![
        outgoing("one".into()),
        outgoing("z".repeat(2 << 20)),
        outgoing("three".into()),
    ];
    let report = client_a
        .send_stream(futures_util::stream::iter(messages))
        .await
        .unwrap();
    assert_eq!(report.settled, 3);
    assert_eq!(report.failures.len(), 1);
    assert_eq!(report.failures[0].index, 1);
    assert!(
        matches!(&report.failures[0].error, Error::InvalidArgument(m) if m.starts_with("description:"))
    );
    for expected in ["one", "three"] {
        let got = tokio::time::timeout(WAIT, inbox_b.next_message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.description, expected);
    }
    a.stop().await;
    b.stop().await;
    relay.stop().await;
}

#[tokio::test]
async fn send_stream_without_a_relay_gives_every_message_its_own_outcome() {
    // A relay that was there and is gone: the daemon backs off and retries.
    let relay = dev_relay().await;
    let url = relay.url();
    relay.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path(), &url, Dialect::Current);
    settings.send_timeout = Duration::from_millis(300);
    let daemon = TestDaemon::start_with(settings).await;
    let client = daemon.client().await;

    const N: u64 = 300;
    const BAD: u64 = 157;
    let peer = uuid::Uuid::new_v4().to_string();
    let requests: Vec<v1::SendRequest> = (0..N)
        .map(|n| match n {
            BAD => request(&peer, "hello", "bad".into()),
            _ => request(&peer, "offer", n.to_string()),
        })
        .collect();
    let (settled, failures) = send_stream(&client, requests).await;
    assert_eq!(settled, N, "every message has an outcome");
    let indices: Vec<u64> = failures.iter().map(|f| f.index).collect();
    assert_eq!(
        indices,
        (0..N).collect::<Vec<_>>(),
        "one failure per message, in order"
    );
    for failure in &failures {
        let expected = if failure.index == BAD {
            Code::InvalidArgument
        } else {
            Code::Unavailable
        };
        assert_eq!(
            failure.code, expected as i32,
            "message {}: {}",
            failure.index, failure.message
        );
    }
    let status = client.status().await.unwrap();
    assert_eq!(status.counters.sent, 0);
    daemon.stop().await;
}
