//! The embedded dev relay, driven over real sockets by a plain WebSocket
//! client, checked against the behaviour of ProxyStore's relays.

use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use relay_sidecar::codec::{self, Dialect, Frame, PeerConnection, RelayResponse};
use relay_sidecar::devrelay::DevRelay;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A failure guard only: every wait ends as soon as its frame arrives.
const WAIT: Duration = Duration::from_secs(5);

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn start(dialect: Dialect) -> DevRelay {
    DevRelay::start(
        "127.0.0.1:0".parse().unwrap(),
        dialect,
        CancellationToken::new(),
    )
    .await
    .expect("dev relay starts")
}

async fn connect(relay: &DevRelay) -> Ws {
    let (ws, _) = within("connect", tokio_tungstenite::connect_async(relay.url()))
        .await
        .expect("WebSocket handshake");
    ws
}

async fn send(ws: &mut Ws, text: &str) {
    within("send", ws.send(Message::text(text)))
        .await
        .expect("send");
}

/// The next text frame.
async fn recv_text(ws: &mut Ws) -> String {
    loop {
        match within("a text frame", ws.next()).await {
            Some(Ok(Message::Text(text))) => return text.to_string(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// The relay's close frame, once the closing handshake is over.
async fn recv_close(ws: &mut Ws) -> CloseFrame {
    let frame = loop {
        match within("a close frame", ws.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => break frame,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    // Reading on sends tungstenite's answer and waits for the relay to hang up.
    within("the relay to hang up", async {
        while ws.next().await.is_some() {}
    })
    .await;
    frame
}

/// Closes the clients cleanly (or drops those the relay closed), then stops
/// the relay. A client that neither reads nor hangs up would hold `stop` for
/// the relay's close timeout.
async fn hang_up_and_stop(relay: DevRelay, clients: impl IntoIterator<Item = Ws>) {
    for mut ws in clients {
        match within("close", ws.close(None)).await {
            Ok(()) => {
                within("the relay to hang up", async {
                    while ws.next().await.is_some() {}
                })
                .await
            }
            Err(WsError::AlreadyClosed | WsError::ConnectionClosed) => {}
            Err(e) => panic!("close failed: {e}"),
        }
    }
    within("stop", relay.stop()).await;
}

fn assert_close(frame: &CloseFrame, code: u16, reason: &str) {
    assert_eq!(u16::from(frame.code), code, "close code ({frame:?})");
    assert_eq!(frame.reason.as_str(), reason, "close reason");
}

/// Sends the registration as the Python client does and expects success.
async fn register(ws: &mut Ws, dialect: Dialect, name: &str, uuid: Uuid) {
    let kind = match dialect {
        Dialect::Current => "relay_registration",
        Dialect::Legacy => "server_registration",
    };
    send(
        ws,
        &format!(r#"{{"name": "{name}", "uuid": "{uuid}", "message_type": "{kind}"}}"#),
    )
    .await;
    let answer = recv_text(ws).await;
    assert_eq!(
        codec::decode(&answer, dialect).expect("a relay response"),
        Frame::Response(RelayResponse {
            success: true,
            message: None,
            error: false
        }),
        "{answer}"
    );
}

/// A peer connection message spelled the way Python's `json.dumps` spells it,
/// so that "unchanged" means byte for byte, not merely equal once decoded.
fn peer_text(from: Uuid, to: Uuid) -> String {
    format!(
        r#"{{"source_uuid": "{from}", "source_name": "host-a", "peer_uuid": "{to}", "description_type": "offer", "description": "v=0\r\no=- 46117 2 IN IP4 127.0.0.1\r\n", "error": null, "message_type": "peer_connection"}}"#
    )
}

fn decode_peer(text: &str, dialect: Dialect) -> PeerConnection {
    match codec::decode(text, dialect) {
        Ok(Frame::Peer(peer)) => peer,
        other => panic!("expected a peer connection message, got {other:?} from {text}"),
    }
}

async fn registered_pair(relay: &DevRelay, dialect: Dialect) -> (Ws, Uuid, Ws, Uuid) {
    let (a_id, b_id) = (Uuid::new_v4(), Uuid::new_v4());
    let mut a = connect(relay).await;
    let mut b = connect(relay).await;
    register(&mut a, dialect, "host-a", a_id).await;
    register(&mut b, dialect, "host-b", b_id).await;
    (a, a_id, b, b_id)
}

#[tokio::test]
async fn forwards_a_peer_message_unchanged() {
    let relay = start(Dialect::Current).await;
    let (mut a, a_id, mut b, b_id) = registered_pair(&relay, Dialect::Current).await;

    let text = peer_text(a_id, b_id);
    send(&mut a, &text).await;
    assert_eq!(recv_text(&mut b).await, text);

    // And back, on the same sockets.
    let reply = peer_text(b_id, a_id).replace("offer", "answer");
    send(&mut b, &reply).await;
    assert_eq!(recv_text(&mut a).await, reply);
    hang_up_and_stop(relay, [a, b]).await;
}

#[tokio::test]
async fn bounces_a_message_for_an_unknown_peer() {
    let relay = start(Dialect::Current).await;
    let mut a = connect(&relay).await;
    let (a_id, nobody) = (Uuid::new_v4(), Uuid::new_v4());
    register(&mut a, Dialect::Current, "host-a", a_id).await;

    let text = peer_text(a_id, nobody);
    send(&mut a, &text).await;
    let bounced = decode_peer(&recv_text(&mut a).await, Dialect::Current);
    let mut expected = decode_peer(&text, Dialect::Current);
    expected.error = Some(format!(
        "Cannot forward peer connection message to peer {nobody} because this peer is not registered this relay server."
    ));
    assert_eq!(bounced, expected);
    assert_eq!(bounced.source_uuid, a_id);
    hang_up_and_stop(relay, [a]).await;
}

#[tokio::test]
async fn a_second_registration_closes_the_older_socket_with_4004() {
    let relay = start(Dialect::Current).await;
    let (id, sender_id) = (Uuid::new_v4(), Uuid::new_v4());
    let mut older = connect(&relay).await;
    register(&mut older, Dialect::Current, "host-a", id).await;
    let mut newer = connect(&relay).await;
    register(&mut newer, Dialect::Current, "host-a", id).await;

    assert_close(
        &recv_close(&mut older).await,
        4004,
        "Relay received a registration with the same ID. \
         This might mean that the endpoint is running in multiple locations.",
    );

    // Messages for the UUID now go to the newer socket.
    let mut sender = connect(&relay).await;
    register(&mut sender, Dialect::Current, "host-c", sender_id).await;
    let text = peer_text(sender_id, id);
    send(&mut sender, &text).await;
    assert_eq!(recv_text(&mut newer).await, text);
    hang_up_and_stop(relay, [newer, sender]).await;
}

#[tokio::test]
async fn an_undecodable_frame_closes_with_4000() {
    let relay = start(Dialect::Current).await;
    let id = Uuid::new_v4();
    let undecodable = [
        Message::text("not json"),
        // An extra key is a decode error on the Python side too.
        Message::text(format!(
            r#"{{"name": "a", "uuid": "{id}", "extra": 1, "message_type": "relay_registration"}}"#
        )),
        // The legacy dialect's registration.
        Message::text(format!(
            r#"{{"name": "a", "uuid": "{id}", "message_type": "server_registration"}}"#
        )),
        Message::binary(b"{}".to_vec()),
    ];
    for message in undecodable {
        let mut ws = connect(&relay).await;
        within("send", ws.send(message)).await.expect("send");
        assert_close(&recv_close(&mut ws).await, 4000, "Unknown message type.");
    }

    // Also once registered.
    let mut ws = connect(&relay).await;
    register(&mut ws, Dialect::Current, "host-a", id).await;
    send(&mut ws, "{").await;
    assert_close(&recv_close(&mut ws).await, 4000, "Unknown message type.");
    hang_up_and_stop(relay, [ws]).await;
}

#[tokio::test]
async fn a_peer_message_before_registration_closes_with_4002() {
    let relay = start(Dialect::Current).await;
    let mut ws = connect(&relay).await;
    send(&mut ws, &peer_text(Uuid::new_v4(), Uuid::new_v4())).await;
    assert_close(
        &recv_close(&mut ws).await,
        4002,
        "ForbiddenError: Client has not registered and authenticated with the relay server.",
    );
    hang_up_and_stop(relay, [ws]).await;
}

#[tokio::test]
async fn a_message_over_1_mib_closes_with_1009() {
    let relay = start(Dialect::Current).await;
    let mut ws = connect(&relay).await;
    register(&mut ws, Dialect::Current, "host-a", Uuid::new_v4()).await;
    let too_big = "x".repeat((1 << 20) + 1);
    send(&mut ws, &too_big).await;
    assert_close(
        &recv_close(&mut ws).await,
        1009,
        "frame with 1048577 bytes exceeds limit of 1048576 bytes",
    );
    hang_up_and_stop(relay, [ws]).await;
}

#[tokio::test]
async fn stopping_closes_every_client_with_1001() {
    let relay = start(Dialect::Current).await;
    let (mut a, _, mut b, _) = registered_pair(&relay, Dialect::Current).await;
    let addr = relay.local_addr();
    let stopping = tokio::spawn(relay.stop());
    assert_eq!(u16::from(recv_close(&mut a).await.code), 1001);
    assert_eq!(u16::from(recv_close(&mut b).await.code), 1001);
    within("stop", stopping).await.expect("stop task");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the relay still accepts after stop"
    );
}

#[tokio::test]
async fn serves_on_a_bound_listener_until_its_token_is_cancelled() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let relay = DevRelay::serve(listener, Dialect::Current, shutdown.clone()).unwrap();
    assert_eq!(relay.local_addr(), addr);
    assert_eq!(relay.url(), format!("ws://{addr}"));

    let mut ws = connect(&relay).await;
    register(&mut ws, Dialect::Current, "host-a", Uuid::new_v4()).await;
    shutdown.cancel();
    assert_eq!(u16::from(recv_close(&mut ws).await.code), 1001);
    within("stop", relay.stop()).await;
}

#[tokio::test]
async fn a_client_that_does_not_read_does_not_stall_the_others() {
    let relay = start(Dialect::Current).await;
    let (a, a_id, silent, silent_id) = registered_pair(&relay, Dialect::Current).await;
    let (mut a_out, mut a_in) = a.split();

    // Fill the silent client's socket buffers and then its outbound queue.
    let text = peer_text(a_id, silent_id).replace("v=0", &"v".repeat(16 * 1024));
    let flood = tokio::spawn(async move {
        loop {
            if a_out.send(Message::text(text.clone())).await.is_err() {
                break;
            }
        }
    });

    // Once its queue is full the silent client is closed and unregistered,
    // so A's messages bounce: A was served all along.
    let bounced = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match a_in.next().await {
                Some(Ok(Message::Text(text))) => {
                    let peer = decode_peer(&text, Dialect::Current);
                    if peer.error.is_some() {
                        return peer;
                    }
                }
                Some(Ok(_)) => continue,
                other => panic!("A lost its connection: {other:?}"),
            }
        }
    })
    .await
    .expect("the silent client was never dropped");
    assert_eq!(
        bounced.error.unwrap(),
        format!(
            "Cannot forward peer connection message to peer {silent_id} because this peer is not registered this relay server."
        )
    );
    flood.abort();
    drop(silent);
    drop(a_in);
    within("stop", relay.stop()).await;
}

#[tokio::test]
async fn legacy_registers_forwards_and_bounces() {
    let relay = start(Dialect::Legacy).await;
    let (mut a, a_id, mut b, b_id) = registered_pair(&relay, Dialect::Legacy).await;

    let text = peer_text(a_id, b_id);
    send(&mut a, &text).await;
    assert_eq!(recv_text(&mut b).await, text);

    let nobody = Uuid::new_v4();
    send(&mut a, &peer_text(a_id, nobody)).await;
    let bounced = decode_peer(&recv_text(&mut a).await, Dialect::Legacy);
    assert_eq!(bounced.source_uuid, a_id);
    assert_eq!(bounced.peer_uuid, nobody);
    assert_eq!(
        bounced.error.unwrap(),
        format!(
            "Cannot forward peer connection message to peer {nobody} because this peer is unknown."
        )
    );
    hang_up_and_stop(relay, [a, b]).await;
}

#[tokio::test]
async fn legacy_re_registration_closes_the_older_socket_with_1001() {
    let relay = start(Dialect::Legacy).await;
    let (id, sender_id) = (Uuid::new_v4(), Uuid::new_v4());
    let mut older = connect(&relay).await;
    register(&mut older, Dialect::Legacy, "host-a", id).await;
    let mut newer = connect(&relay).await;
    register(&mut newer, Dialect::Legacy, "host-a", id).await;
    assert_eq!(u16::from(recv_close(&mut older).await.code), 1001);

    let mut sender = connect(&relay).await;
    register(&mut sender, Dialect::Legacy, "host-c", sender_id).await;
    let text = peer_text(sender_id, id);
    send(&mut sender, &text).await;
    assert_eq!(recv_text(&mut newer).await, text);
    hang_up_and_stop(relay, [newer, sender]).await;
}

#[tokio::test]
async fn legacy_answers_a_peer_message_before_registration_with_an_error() {
    let relay = start(Dialect::Legacy).await;
    let mut ws = connect(&relay).await;
    send(&mut ws, &peer_text(Uuid::new_v4(), Uuid::new_v4())).await;
    let answer = recv_text(&mut ws).await;
    assert_eq!(
        codec::decode(&answer, Dialect::Legacy).unwrap(),
        Frame::Response(RelayResponse {
            success: false,
            message: Some("client has not registered yet".into()),
            error: true,
        })
    );
    // The socket stays usable.
    register(&mut ws, Dialect::Legacy, "host-a", Uuid::new_v4()).await;
    hang_up_and_stop(relay, [ws]).await;
}

#[tokio::test]
async fn legacy_skips_undecodable_frames() {
    let relay = start(Dialect::Legacy).await;
    let (mut a, a_id, mut b, b_id) = registered_pair(&relay, Dialect::Legacy).await;
    send(&mut a, "not json").await;
    // The current dialect's registration is unknown to a legacy relay.
    send(
        &mut a,
        &format!(r#"{{"name": "a", "uuid": "{a_id}", "message_type": "relay_registration"}}"#),
    )
    .await;
    let text = peer_text(a_id, b_id);
    send(&mut a, &text).await;
    assert_eq!(recv_text(&mut b).await, text);
    hang_up_and_stop(relay, [a, b]).await;
}

#[tokio::test]
async fn legacy_a_message_over_1_mib_closes_with_1009_and_no_reason() {
    let relay = start(Dialect::Legacy).await;
    let mut ws = connect(&relay).await;
    send(&mut ws, &"x".repeat((1 << 20) + 1)).await;
    assert_close(&recv_close(&mut ws).await, 1009, "");
    hang_up_and_stop(relay, [ws]).await;
}
