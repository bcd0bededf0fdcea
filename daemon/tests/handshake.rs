//! What the daemon puts in the relay's opening handshake, TLS to `wss://`
//! relays, relays that refuse it, stop answering pings or send garbage. A scripted relay stands in where the
//! real one cannot show what it received or cannot run offline (its
//! authentication needs Globus).

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use relay_sidecar::codec::{self, Frame, RelayResponse};
use relay_sidecar_client::ConnectionState;
use support::Dialect;
use support::relays::{Headers, accept_recording, header};
use support::sidecar::{TestDaemon, settings, wait_for_state};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// What the scripted relay does after reading a registration.
#[derive(Clone, Copy)]
enum Answer {
    /// success: true, then wait for the client to close.
    Accept,
    /// success: true, then close with 1001 (so the client reconnects).
    AcceptThenGoAway,
    /// success: false with a reason.
    Refuse,
    /// close with this code instead of answering.
    Close(u16),
    /// success: true, then never read again (so pings go unanswered).
    AcceptThenHang,
    /// success: true, then frames that do not decode, then one peer message
    /// to the client, then wait for the client to close.
    AcceptThenGarbage,
}

/// Serves WebSocket connections on `listener`, one script step per
/// connection that gets through `wrap` (a TLS handshake may fail), reporting
/// each handshake's headers.
fn scripted_relay<S, F, Fut>(
    listener: TcpListener,
    script: Vec<Answer>,
    wrap: F,
) -> mpsc::UnboundedReceiver<Headers>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<S>> + Send,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for answer in script {
            let stream = loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                if let Some(stream) = wrap(tcp).await {
                    break stream;
                }
            };
            let Some(mut ws) = accept_recording(stream, tx.clone()).await else {
                continue;
            };
            let Some(Ok(first)) = ws.next().await else {
                continue;
            };
            let Ok(Frame::Registration(client)) =
                codec::decode(first.to_text().unwrap(), Dialect::Current)
            else {
                panic!("the first frame is a registration: {first:?}");
            };
            let reply = |success: bool, message: Option<&str>| {
                Message::text(codec::encode(
                    &Frame::Response(RelayResponse {
                        success,
                        message: message.map(str::to_owned),
                        error: !success,
                    }),
                    Dialect::Current,
                ))
            };
            let close = |code: u16, reason: &str| {
                Message::Close(Some(CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.to_owned().into(),
                }))
            };
            match answer {
                Answer::Accept => {
                    ws.send(reply(true, None)).await.unwrap();
                    while let Some(Ok(_)) = ws.next().await {}
                }
                Answer::AcceptThenGoAway => {
                    ws.send(reply(true, None)).await.unwrap();
                    let _ = ws.send(close(1001, "going away")).await;
                    while let Some(Ok(_)) = ws.next().await {}
                }
                Answer::Refuse => {
                    ws.send(reply(false, Some("not on the list")))
                        .await
                        .unwrap();
                    while let Some(Ok(_)) = ws.next().await {}
                }
                Answer::AcceptThenHang => {
                    ws.send(reply(true, None)).await.unwrap();
                    std::future::pending::<()>().await;
                }
                Answer::AcceptThenGarbage => {
                    ws.send(reply(true, None)).await.unwrap();
                    for garbage in [
                        "not json",
                        r#"{"message_type": "peer_connection"}"#,
                        r#"{"message_type": "relay_response", "extra": 1}"#,
                    ] {
                        ws.send(Message::text(garbage)).await.unwrap();
                    }
                    ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
                    let peer = Frame::Peer(codec::PeerConnection {
                        source_uuid: uuid::Uuid::new_v4(),
                        source_name: "after-garbage".into(),
                        peer_uuid: client.uuid,
                        description_type: "offer".into(),
                        description: "still here".into(),
                        error: None,
                    });
                    ws.send(Message::text(codec::encode(&peer, Dialect::Current)))
                        .await
                        .unwrap();
                    while let Some(Ok(_)) = ws.next().await {}
                }
                Answer::Close(code) => {
                    let _ = ws.send(close(code, "Unauthorized")).await;
                    while let Some(Ok(_)) = ws.next().await {}
                }
            }
        }
    });
    rx
}

async fn plain(tcp: tokio::net::TcpStream) -> Option<tokio::net::TcpStream> {
    Some(tcp)
}

#[tokio::test]
async fn headers_and_a_fresh_token_go_in_every_handshake() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let mut handshakes = scripted_relay(
        listener,
        vec![Answer::AcceptThenGoAway, Answer::Accept],
        plain,
    );
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "first-secret\n").unwrap();
    let mut config = settings(dir.path(), &url, Dialect::Current);
    config.token_file = Some(token.clone());
    config.headers.insert("X-Tenant".into(), "lab-a".into());
    let daemon = TestDaemon::start_with(config).await;

    let first = tokio::time::timeout(Duration::from_secs(20), handshakes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(header(&first, "authorization"), Some("Bearer first-secret"));
    assert_eq!(header(&first, "x-tenant"), Some("lab-a"));
    // The token is read again at the next connect.
    std::fs::write(&token, "second-secret").unwrap();
    let second = tokio::time::timeout(Duration::from_secs(20), handshakes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        header(&second, "authorization"),
        Some("Bearer second-secret")
    );
    let client = daemon.client().await;
    let mut statuses = client.watch_status().await.unwrap();
    wait_for_state(&mut statuses, ConnectionState::Registered).await;
    daemon.stop().await;
}

#[tokio::test]
async fn unauthorized_and_refused_registrations_fail_without_retrying() {
    for (answer, code, words) in [
        (Answer::Close(4001), Some(4001), "Unauthorized"),
        (Answer::Close(4002), Some(4002), "Unauthorized"),
        (Answer::Refuse, None, "not on the list"),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let _handshakes = scripted_relay(listener, vec![answer], plain);
        let daemon = TestDaemon::start(&url, Dialect::Current).await;
        let client = daemon.client().await;
        let mut statuses = client.watch_status().await.unwrap();
        let failed = wait_for_state(&mut statuses, ConnectionState::Failed).await;
        assert_eq!(failed.close_code, code);
        assert!(failed.detail.contains(words), "{}", failed.detail);
        daemon.stop().await;
    }
}

/// A self-signed certificate for "localhost", and a TLS acceptor with it.
fn tls_server() -> (String, tokio_rustls::TlsAcceptor) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let pem = cert.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    (pem, tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn wss_relay(script: Vec<Answer>) -> (String, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("wss://localhost:{}", listener.local_addr().unwrap().port());
    let (pem, acceptor) = tls_server();
    scripted_relay(listener, script, move |tcp| {
        let acceptor = acceptor.clone();
        async move { acceptor.accept(tcp).await.ok() }
    });
    (url, pem)
}

#[tokio::test]
async fn wss_with_a_ca_file_registers() {
    let (url, pem) = wss_relay(vec![Answer::Accept]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let mut config = settings(dir.path(), &url, Dialect::Current);
    config.ca_file = Some(ca);
    let daemon = TestDaemon::start_with(config).await;
    let client = daemon.client().await;
    let mut statuses = client.watch_status().await.unwrap();
    wait_for_state(&mut statuses, ConnectionState::Registered).await;
    daemon.stop().await;
}

#[tokio::test]
async fn wss_with_an_unknown_certificate_backs_off_unless_told_to_skip_verification() {
    // The strict daemon never gets through TLS; the one that skips
    // verification does.
    let (url, _pem) = wss_relay(vec![Answer::Accept]).await;
    let dir = tempfile::tempdir().unwrap();
    let strict = TestDaemon::start_with(settings(dir.path(), &url, Dialect::Current)).await;
    let client = strict.client().await;
    let mut statuses = client.watch_status().await.unwrap();
    let backoff = wait_for_state(&mut statuses, ConnectionState::Backoff).await;
    assert!(
        backoff.detail.to_lowercase().contains("certificate"),
        "{}",
        backoff.detail
    );
    strict.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let mut config = settings(dir.path(), &url, Dialect::Current);
    config.insecure_skip_verify = true;
    let lax = TestDaemon::start_with(config).await;
    let client = lax.client().await;
    let mut statuses = client.watch_status().await.unwrap();
    wait_for_state(&mut statuses, ConnectionState::Registered).await;
    lax.stop().await;
}

#[tokio::test]
async fn a_relay_that_stops_answering_pings_is_left() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let _handshakes = scripted_relay(listener, vec![Answer::AcceptThenHang], plain);
    let dir = tempfile::tempdir().unwrap();
    let mut config = settings(dir.path(), &url, Dialect::Current);
    config.ping_interval = Duration::from_millis(100);
    config.ping_timeout = Duration::from_millis(300);
    let daemon = TestDaemon::start_with(config).await;
    let client = daemon.client().await;
    let mut statuses = client.watch_status().await.unwrap();
    wait_for_state(&mut statuses, ConnectionState::Registered).await;
    let lost = wait_for_state(&mut statuses, ConnectionState::Backoff).await;
    assert!(lost.detail.contains("ping"), "{}", lost.detail);
    daemon.stop().await;
}

#[tokio::test]
async fn frames_that_do_not_decode_are_counted_and_skipped() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let _handshakes = scripted_relay(listener, vec![Answer::AcceptThenGarbage], plain);
    let daemon = TestDaemon::start(&url, Dialect::Current).await;
    let client = daemon.client().await;
    let mut inbox = client.subscribe(None).await.unwrap();
    let message = tokio::time::timeout(Duration::from_secs(20), inbox.next_message())
        .await
        .expect("the good message after the garbage arrives")
        .unwrap()
        .unwrap();
    assert_eq!(message.description, "still here");
    let status = client.status().await.unwrap();
    assert_eq!(status.counters.undecodable, 4);
    assert_eq!(status.counters.received, 1);
    assert_eq!(status.state, ConnectionState::Registered);
    assert_eq!(status.counters.reconnects, 0);
    daemon.stop().await;
}

#[tokio::test]
async fn lazy_mode_waits_for_first_use() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let mut handshakes = scripted_relay(listener, vec![Answer::Accept], plain);
    let dir = tempfile::tempdir().unwrap();
    let mut config = settings(dir.path(), &url, Dialect::Current);
    config.lazy = true;
    let daemon = TestDaemon::start_with(config).await;
    let client = daemon.client().await;
    let idle = client.status().await.unwrap();
    assert_eq!(idle.state, ConnectionState::Idle);
    assert!(
        handshakes.try_recv().is_err(),
        "nothing opened before first use"
    );
    let mut statuses = client.watch_status().await.unwrap();
    let _inbox = client.subscribe(None).await.unwrap();
    wait_for_state(&mut statuses, ConnectionState::Registered).await;
    assert!(handshakes.try_recv().is_ok());
    daemon.stop().await;
}
