//! Relays that stop working without going away: one that takes frames and
//! forwards nothing, one that is frozen (SIGSTOP); and a relay URL that
//! carries a password, which must never be shown.

mod support;

use std::time::{Duration, Instant};

use relay_sidecar_client::{ConnectionState, DescriptionType, Error};
use support::relays::{CrashableRelay, SwallowingRelay, header};
use support::sidecar::{LoggedDaemon, TestDaemon, settings, wait_for_state};
use support::{Dialect, PyRelay};
use uuid::Uuid;

/// Slack on top of a configured bound: a failure guard on a loaded machine,
/// not a measurement.
const SLACK: Duration = Duration::from_millis(1500);
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_relay_that_swallows_frames_answers_unknown_within_the_bound_and_is_left() {
    let mut relay = SwallowingRelay::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = settings(dir.path(), relay.url(), Dialect::Current);
    let confirm_timeout = Duration::from_secs(1);
    config.confirm_timeout = confirm_timeout;
    let daemon = TestDaemon::start_with(config).await;
    let client = daemon.registered_client().await;
    relay
        .next_handshake(WAIT)
        .await
        .expect("the first handshake");
    let mut statuses = client.watch_status().await.unwrap();

    // No deadline on the call: only the daemon's own bound can end it.
    let started = Instant::now();
    let sent = tokio::time::timeout(
        WAIT,
        client.send(Uuid::new_v4(), DescriptionType::Offer, "x"),
    )
    .await
    .expect("a Send with no deadline returns");
    let took = started.elapsed();
    match sent {
        Err(Error::Unconfirmed(message)) => {
            assert!(message.contains("confirm"), "{message}")
        }
        other => panic!("expected UNKNOWN, got {other:?}"),
    }
    assert!(
        took <= confirm_timeout + SLACK,
        "took {took:?}, bound {confirm_timeout:?}"
    );
    eprintln!("UNKNOWN after {took:?} (confirm_timeout {confirm_timeout:?})");

    // The link was dropped as broken, said so, and connected again.
    let lost = wait_for_state(&mut statuses, ConnectionState::Backoff).await;
    assert!(lost.detail.contains("confirm"), "{}", lost.detail);
    relay
        .next_handshake(WAIT)
        .await
        .expect("the daemon connects again");
    wait_for_state(&mut statuses, ConnectionState::Registered).await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_frozen_relay_is_noticed_within_ping_interval_plus_ping_timeout() {
    let relay = PyRelay::start(Dialect::Current).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = settings(dir.path(), &relay.url(), Dialect::Current);
    // The timeout much shorter than the interval: it must not round up to it.
    let (interval, timeout) = (Duration::from_secs(3), Duration::from_millis(300));
    config.ping_interval = interval;
    config.ping_timeout = timeout;
    let daemon = TestDaemon::start_with(config).await;
    let client = daemon.client().await;
    let mut statuses = client.watch_status().await.unwrap();
    wait_for_state(&mut statuses, ConnectionState::Registered).await;

    let pid = nix::unistd::Pid::from_raw(relay.pid().expect("the relay runs") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    let lost = wait_for_state(&mut statuses, ConnectionState::Backoff).await;
    let noticed = stopped.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    eprintln!("noticed after {noticed:?}: {}", lost.detail);
    assert!(lost.detail.contains("ping"), "{}", lost.detail);
    assert!(
        noticed <= interval + timeout + SLACK,
        "noticed after {noticed:?}; ping_interval + ping_timeout is {:?}",
        interval + timeout
    );
    daemon.stop().await;
}

/// The password in `relay_url`, which must appear nowhere.
const SECRET: &str = "s3cret-pw";

#[tokio::test]
async fn a_password_in_the_relay_url_is_never_logged_nor_returned() {
    let mut relay = CrashableRelay::start(Dialect::Current);
    let plain = relay.url();
    let with_password = plain.replacen("ws://", &format!("ws://alice:{SECRET}@"), 1);
    let daemon = LoggedDaemon::start(
        &with_password,
        &[
            ("RELAY_SIDECAR_BACKOFF_INITIAL", "50ms"),
            ("RELAY_SIDECAR_BACKOFF_MAX", "200ms"),
        ],
        &["--log-level", "debug"],
    )
    .await;
    let client = daemon.client().await;
    let mut statuses = client.watch_status().await.unwrap();
    let status = wait_for_state(&mut statuses, ConnectionState::Registered).await;
    assert_eq!(status.relay_url, plain);

    // Through a loss and a reconnect, with traffic: every log line there is.
    relay.kill();
    let down = wait_for_state(&mut statuses, ConnectionState::Backoff).await;
    relay.restart();
    wait_for_state(&mut statuses, ConnectionState::Registered).await;
    client
        .send(status.uuid, DescriptionType::Offer, "hello")
        .await
        .unwrap();
    let shown = format!("{status:?}\n{down:?}\n{:?}", client.status().await.unwrap());
    assert!(!shown.contains(SECRET), "GetStatus shows it: {shown}");
    assert!(
        !shown.contains("alice"),
        "GetStatus shows the user: {shown}"
    );

    let log = daemon.stop().await;
    assert!(log.len() > 10, "the debug log was captured: {log:?}");
    let leaks: Vec<&String> = log.iter().filter(|line| line.contains(SECRET)).collect();
    assert!(leaks.is_empty(), "logged: {leaks:#?}");
}

#[tokio::test]
async fn credentials_in_the_relay_url_go_in_the_handshake() {
    let mut relay = SwallowingRelay::start().await;
    // "p@ss" percent-encoded, as a URL must carry it.
    let url = relay.url().replacen("ws://", "ws://alice:p%40ss@", 1);
    let dir = tempfile::tempdir().unwrap();
    let daemon = TestDaemon::start_with(settings(dir.path(), &url, Dialect::Current)).await;
    let handshake = relay.next_handshake(WAIT).await.expect("a handshake");
    // base64("alice:p@ss"), as ProxyStore's websockets client sends it.
    assert_eq!(
        header(&handshake, "authorization"),
        Some("Basic YWxpY2U6cEBzcw==")
    );
    assert_eq!(
        header(&handshake, "host"),
        Some(url.rsplit_once('@').unwrap().1)
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_relay_going_away_is_logged_with_its_code_and_meaning() {
    // The embedded relay stops as ProxyStore's does on SIGTERM: 1001 and
    // no reason.
    let relay = support::sidecar::dev_relay().await;
    let daemon = LoggedDaemon::start(&relay.url(), &[], &[]).await;
    let client = daemon.client().await;
    let mut statuses = client.watch_status().await.unwrap();
    wait_for_state(&mut statuses, ConnectionState::Registered).await;
    relay.stop().await;
    let down = wait_for_state(&mut statuses, ConnectionState::Backoff).await;
    assert_eq!(down.close_code, Some(1001));
    assert!(down.detail.contains("1001 (going away)"), "{}", down.detail);

    let log = daemon.stop().await;
    let first_warning: serde_json::Value = log
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|entry| entry["level"] == "WARN")
        .expect("the loss is logged as a warning");
    let detail = first_warning["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("1001 (going away)"), "{first_warning:#}");
}

/// A relay that sends thousands of frames the daemon cannot use (binary,
/// undecodable text, a registration request) costs the log a line or two of
/// each kind, not one per frame, and the connection stays up.
#[tokio::test]
async fn junk_from_the_relay_is_counted_not_logged_frame_by_frame() {
    use tokio_tungstenite::tungstenite::Message;

    const EACH: usize = 2_000;
    let mut junk = Vec::with_capacity(2 * EACH + 1);
    for n in 0..EACH {
        junk.push(Message::binary(vec![0u8; 16]));
        junk.push(Message::text(format!("{{\"not\": \"a relay frame {n}\"}}")));
    }
    let relay = SwallowingRelay::sending(junk).await;
    let daemon = LoggedDaemon::start(relay.url(), &[], &[]).await;
    let client = daemon.client().await;
    let status =
        support::sidecar::status_until(&client, |s| s.counters.undecodable >= (2 * EACH) as u64)
            .await;
    assert_eq!(status.counters.undecodable, (2 * EACH) as u64);
    assert_eq!(status.state, ConnectionState::Registered);
    assert_eq!(status.counters.reconnects, 0);
    let log = daemon.stop().await;
    for what in ["binary frame", "undecodable frame"] {
        let lines = log.iter().filter(|line| line.contains(what)).count();
        // The first at once; the rest counted, at most a line per 10 s.
        assert!((1..=2).contains(&lines), "{lines} lines about {what}");
    }
}
