//! Drives the SDK against a fake daemon: a real tonic server on a real Unix
//! socket, answering with canned replies and recording what it was sent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use relay_sidecar_client::{
    ConnectionState, DescriptionType, Error, SendOptions, SubscribeOptions, connect,
    proto::v1::{self, relay_sidecar_server::RelaySidecarServer},
};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, codegen::BoxStream, transport::Server};
use uuid::Uuid;

const HOST: &str = "6f1e2c1a-8a3b-4c5d-9e0f-112233445566";
const PEER: &str = "0b0b0b0b-1111-4222-8333-444455556666";
const FAILED_PEER: Uuid = Uuid::nil();

/// What the fake daemon saw, one line per request.
#[derive(Debug, Default, Clone)]
struct Seen(Arc<Mutex<Vec<String>>>, Arc<AtomicBool>);

impl Seen {
    fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
    /// From now on, answer as another peer (a daemon that came back with a
    /// new identity).
    fn become_another_peer(&self) {
        self.1.store(true, Ordering::SeqCst);
    }
}

#[derive(Debug)]
struct Fake(Seen);

fn status(state: v1::ConnectionState) -> v1::GetStatusResponse {
    v1::GetStatusResponse {
        uuid: HOST.into(),
        name: "host-a".into(),
        relay_url: "ws://127.0.0.1:1".into(),
        dialect: "current".into(),
        state: state as i32,
        version: "9.9.9".into(),
        ..Default::default()
    }
}

fn peer_message(description: &str, bounced: bool) -> v1::SubscribeResponse {
    v1::SubscribeResponse {
        message: Some(v1::PeerMessage {
            source_uuid: PEER.into(),
            source_name: "peer".into(),
            peer_uuid: HOST.into(),
            description_type: "answer".into(),
            description: description.into(),
            error: bounced.then(|| "unknown peer".into()),
            bounced,
        }),
    }
}

#[tonic::async_trait]
impl v1::relay_sidecar_server::RelaySidecar for Fake {
    async fn get_status(
        &self,
        _: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::GetStatusResponse>, tonic::Status> {
        let mut status = status(v1::ConnectionState::Registered);
        if (self.0).1.load(Ordering::SeqCst) {
            status.uuid = PEER.into();
        }
        Ok(Response::new(status))
    }

    type WatchStatusStream = BoxStream<v1::WatchStatusResponse>;

    async fn watch_status(
        &self,
        _: Request<v1::WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, tonic::Status> {
        let updates = [
            v1::ConnectionState::Connecting,
            v1::ConnectionState::Registered,
        ]
        .map(|s| {
            Ok(v1::WatchStatusResponse {
                status: Some(status(s)),
            })
        });
        Ok(Response::new(Box::pin(stream::iter(updates))))
    }

    async fn send(
        &self,
        request: Request<v1::SendRequest>,
    ) -> Result<Response<v1::SendResponse>, tonic::Status> {
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .map(|v| v.to_str().unwrap().to_owned());
        let r = request.into_inner();
        if r.peer_uuid == FAILED_PEER.to_string() {
            return Err(tonic::Status::failed_precondition("relay closed with 4004"));
        }
        let conversation = match (r.conversation, r.wait_for_conversation) {
            (false, false) => "",
            (true, false) => " conversation",
            (_, true) => " conversation+wait",
        };
        self.0.push(format!(
            "send {} {} {} worker={:?} timeout={:?}{conversation}",
            r.peer_uuid, r.description_type, r.description, r.worker, timeout
        ));
        Ok(Response::new(v1::SendResponse {}))
    }

    type SendStreamStream = BoxStream<v1::SendStreamResponse>;

    async fn send_stream(
        &self,
        _: Request<tonic::Streaming<v1::SendRequest>>,
    ) -> Result<Response<Self::SendStreamStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not faked"))
    }

    type SubscribeStream = BoxStream<v1::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, tonic::Status> {
        let r = request.into_inner();
        self.0.push(format!(
            "subscribe group={:?} worker={:?} exclusive={} conversations={}",
            r.group, r.worker, r.exclusive, r.conversations
        ));
        // Each subscription gets two messages, then the stream ends as it
        // does when the daemon stops.
        let items = [
            Ok(peer_message("hello", false)),
            Ok(peer_message("back", true)),
        ];
        Ok(Response::new(Box::pin(stream::iter(items))))
    }

    async fn hold_conversation(
        &self,
        request: Request<v1::HoldConversationRequest>,
    ) -> Result<Response<v1::HoldConversationResponse>, tonic::Status> {
        let r = request.into_inner();
        if r.peer_uuid == FAILED_PEER.to_string() {
            return Err(tonic::Status::aborted("conversation: held by \"w9\""));
        }
        self.0.push(format!(
            "hold {} worker={:?} wait={}",
            r.peer_uuid, r.worker, r.wait
        ));
        Ok(Response::new(v1::HoldConversationResponse {
            expires_in: Some(relay_sidecar_proto::prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        }))
    }

    async fn release_conversation(
        &self,
        request: Request<v1::ReleaseConversationRequest>,
    ) -> Result<Response<v1::ReleaseConversationResponse>, tonic::Status> {
        let r = request.into_inner();
        self.0
            .push(format!("release {} worker={:?}", r.peer_uuid, r.worker));
        Ok(Response::new(v1::ReleaseConversationResponse {
            released: true,
        }))
    }

    async fn reconnect(
        &self,
        _: Request<v1::ReconnectRequest>,
    ) -> Result<Response<v1::ReconnectResponse>, tonic::Status> {
        Err(tonic::Status::permission_denied("uid 1234 is not allowed"))
    }
}

/// Starts the fake on a socket in a fresh temp dir; records each request's
/// `:authority` as well.
async fn start() -> (tempfile::TempDir, std::path::PathBuf, Seen) {
    let (dir, path, seen, fake) = start_serving();
    // Serving until the test ends.
    std::mem::forget(fake);
    (dir, path, seen)
}

/// A fake serving on a runtime of its own, so that stopping it drops every
/// connection at once, as a daemon that dies does.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Running {
    fn kill(self) {
        let _ = self.stop.send(());
        self.thread.join().unwrap();
    }
}

/// [`start`], with the means to stop the fake.
fn start_serving() -> (tempfile::TempDir, std::path::PathBuf, Seen, Running) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let seen = Seen::default();
    let fake = Fake(seen.clone());
    let authority = seen.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let incoming = UnixListenerStream::new(UnixListener::from_std(listener).unwrap());
            let record = tower::ServiceBuilder::new().map_request(
                move |req: tonic::codegen::http::Request<tonic::body::Body>| {
                    authority.push(format!(
                        "authority {:?}",
                        req.uri().authority().map(|a| a.as_str())
                    ));
                    req
                },
            );
            let router = Server::builder()
                .layer(record)
                .add_service(RelaySidecarServer::new(fake));
            tokio::spawn(router.serve_with_incoming(incoming));
            let _ = stopped.await;
        });
        // Dropping the runtime drops every connection task with it.
    });
    (dir, path, seen, Running { stop, thread })
}

#[tokio::test]
async fn unary_calls_convert_and_map_errors() {
    let (_dir, path, seen) = start().await;
    let client = connect(&path).await.unwrap();

    let s = client.status().await.unwrap();
    assert_eq!(s.uuid, Uuid::parse_str(HOST).unwrap());
    assert_eq!(
        (s.state, s.close_code, s.retry_in),
        (ConnectionState::Registered, None, None)
    );
    assert_eq!(seen.take(), ["authority Some(\"localhost\")"]);

    let peer = Uuid::parse_str(PEER).unwrap();
    client
        .send(peer, DescriptionType::Offer, "sdp-1")
        .await
        .unwrap();
    let client = client.with_worker("w1");
    client
        .send(peer, DescriptionType::Answer, "sdp-2")
        .await
        .unwrap();
    let options = SendOptions::new()
        .worker("w2")
        .timeout(Duration::from_millis(1500));
    client
        .send_with(peer, DescriptionType::Offer, "sdp-3", options)
        .await
        .unwrap();
    let claim = SendOptions::new().conversation();
    client
        .send_with(peer, DescriptionType::Offer, "sdp-4", claim.clone())
        .await
        .unwrap();
    client
        .send_with(
            peer,
            DescriptionType::Offer,
            "sdp-5",
            claim.wait_for_conversation(),
        )
        .await
        .unwrap();
    let lines: Vec<String> = seen
        .take()
        .into_iter()
        .filter(|l| l.starts_with("send"))
        .collect();
    assert_eq!(
        lines,
        [
            format!("send {PEER} offer sdp-1 worker=\"\" timeout=None"),
            format!("send {PEER} answer sdp-2 worker=\"w1\" timeout=None"),
            format!("send {PEER} offer sdp-3 worker=\"w2\" timeout=Some(\"1500000u\")"),
            format!("send {PEER} offer sdp-4 worker=\"w1\" timeout=None conversation"),
            format!("send {PEER} offer sdp-5 worker=\"w1\" timeout=None conversation+wait"),
        ]
    );

    assert_eq!(
        client.hold_conversation(peer, None).await.unwrap(),
        Duration::from_secs(60)
    );
    assert!(client.release_conversation(peer).await.unwrap());
    let err = client
        .hold_conversation(FAILED_PEER, Some(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Aborted(m) if m.contains("w9")),
        "{err:?}"
    );
    assert_eq!(
        seen.take()
            .into_iter()
            .filter(|l| !l.starts_with("authority"))
            .collect::<Vec<_>>(),
        [
            format!("hold {PEER} worker=\"w1\" wait=false"),
            format!("release {PEER} worker=\"w1\""),
        ]
    );

    let err = client
        .send(FAILED_PEER, DescriptionType::Offer, "x")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m == "relay closed with 4004"),
        "{err:?}"
    );
    let err = client.reconnect().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "permission denied: uid 1234 is not allowed"
    );
}

#[tokio::test]
async fn streams_yield_domain_types() {
    let (_dir, path, seen) = start().await;
    let client = connect(&path).await.unwrap().with_worker("w1");

    let states: Vec<_> = client
        .watch_status()
        .await
        .unwrap()
        .map(|s| s.unwrap().state)
        .collect()
        .await;
    assert_eq!(
        states,
        [ConnectionState::Connecting, ConnectionState::Registered]
    );

    let mut sub = client
        .subscribe(Some("g"))
        .await
        .unwrap()
        .resume_within(Duration::ZERO);
    let first = sub.next_message().await.unwrap().unwrap();
    assert_eq!(
        (first.description.as_str(), first.bounced, first.kind()),
        ("hello", false, Some(DescriptionType::Answer))
    );
    let second = sub.next().await.unwrap().unwrap();
    assert_eq!(
        (second.error.as_deref(), second.bounced),
        (Some("unknown peer"), true)
    );
    // The daemon ended the stream; not waiting for it to come back, the
    // subscription says so, then ends.
    let err = sub.next_message().await.unwrap_err();
    assert!(
        matches!(&err, Error::SubscriptionLost(m) if m.contains("ended the stream")),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(sub.next_message().await.unwrap().is_none());
    assert!(seen.take().contains(
        &"subscribe group=\"g\" worker=\"w1\" exclusive=false conversations=false".to_owned()
    ));
    let options = SubscribeOptions::new().group("g").conversations();
    drop(client.subscribe_with(options).await.unwrap());
    assert!(seen.take().contains(
        &"subscribe group=\"g\" worker=\"w1\" exclusive=false conversations=true".to_owned()
    ));
}

#[tokio::test]
async fn a_subscription_resumes_when_its_stream_ends() {
    let (_dir, path, seen) = start().await;
    let client = connect(&path).await.unwrap().with_worker("w1");
    let mut sub = client.subscribe(Some("g")).await.unwrap();
    let mut texts = Vec::new();
    for _ in 0..4 {
        texts.push(sub.next_message().await.unwrap().unwrap().description);
    }
    assert_eq!(texts, ["hello", "back", "hello", "back"]);
    assert_eq!(sub.resumed(), 1);
    let subscribes = seen
        .take()
        .into_iter()
        .filter(|l| l == "subscribe group=\"g\" worker=\"w1\" exclusive=false conversations=false")
        .count();
    assert_eq!(subscribes, 2, "the same group and worker, subscribed again");
}

#[tokio::test]
async fn a_daemon_gone_for_good_ends_the_subscription_with_an_error() {
    let (_dir, path, _seen, fake) = start_serving();
    let client = connect(&path).await.unwrap();
    let mut sub = client
        .subscribe(None)
        .await
        .unwrap()
        .resume_within(Duration::from_millis(300));
    fake.kill();
    std::fs::remove_file(&path).unwrap();
    let mut outcome = Vec::new();
    while let Some(item) = sub.next().await {
        outcome.push(item.map(|m| m.description));
    }
    let (last, delivered) = outcome.split_last().unwrap();
    assert!(delivered.len() <= 2, "{outcome:?}");
    let err = last.as_ref().unwrap_err();
    assert!(
        matches!(err, Error::SubscriptionLost(m) if m.contains("within 300ms")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_daemon_back_as_another_peer_ends_the_subscription() {
    let (_dir, path, seen) = start().await;
    let client = connect(&path).await.unwrap();
    let mut sub = client.subscribe(None).await.unwrap();
    seen.become_another_peer();
    let mut outcome = Vec::new();
    while let Some(item) = sub.next().await {
        outcome.push(item.map(|m| m.description));
    }
    assert_eq!(outcome.len(), 3, "{outcome:?}");
    let err = outcome[2].as_ref().unwrap_err();
    assert!(
        matches!(err, Error::SubscriptionLost(m) if m.contains("another peer") && m.contains(PEER)),
        "{err:?}"
    );
}
