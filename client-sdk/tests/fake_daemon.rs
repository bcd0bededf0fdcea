//! Drives the SDK against a fake daemon: a real tonic server on a real Unix
//! socket, answering with canned replies and recording what it was sent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use relay_sidecar_client::{
    ConnectionState, DescriptionType, Error, SendOptions, connect,
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
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
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
        Ok(Response::new(status(v1::ConnectionState::Registered)))
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
        self.0.push(format!(
            "send {} {} {} worker={:?} timeout={:?}",
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
            "subscribe group={:?} worker={:?}",
            r.group, r.worker
        ));
        let items = [
            Ok(peer_message("hello", false)),
            Ok(peer_message("back", true)),
        ];
        Ok(Response::new(Box::pin(stream::iter(items))))
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
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.sock");
    let incoming = UnixListenerStream::new(UnixListener::bind(&path).unwrap());
    let seen = Seen::default();
    let authority = seen.clone();
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
        .add_service(RelaySidecarServer::new(Fake(seen.clone())));
    tokio::spawn(router.serve_with_incoming(incoming));
    (dir, path, seen)
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

    let mut sub = client.subscribe(Some("g")).await.unwrap();
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
    assert!(sub.next_message().await.unwrap().is_none());
    assert!(
        seen.take()
            .contains(&"subscribe group=\"g\" worker=\"w1\"".to_owned())
    );
}
