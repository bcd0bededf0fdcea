//! The `relay_sidecar.v1.RelaySidecar` gRPC service: validates requests,
//! converts between the contract's prost types and the daemon's own, and
//! maps the daemon's errors to precise gRPC status codes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use relay_sidecar_proto::v1;
use relay_sidecar_proto::v1::relay_sidecar_server::RelaySidecar;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::access::Admins;
use crate::codec::{self, DESCRIPTION_TYPES, Dialect};
use crate::identity::Identity;
use crate::limits::{FAR_DEADLINE, GRPC_TIMEOUT_DIGITS, MAX_LABEL_BYTES};
use crate::relay::{Handle, Outgoing, SendError, Ticket};
use crate::router::{Claimed, Interest, PeerMessage, Refusal, Router, RouterError, Worker};
use crate::status::{ConnectionState, Counters, LinkStatus};

/// The most messages of one SendStream taken together: what has arrived is
/// validated, written to the relay and confirmed as one.
const CHUNK: usize = 64;

/// How many chunks of one SendStream may be on their way at once (so at
/// most `CHUNK * CHUNKS_IN_FLIGHT` messages).
const CHUNKS_IN_FLIGHT: usize = 16;

/// The most a Send keeps back from the caller's deadline to answer in time.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);

/// How long an answer to a refused offer may wait for the relay connection:
/// past this, its sender has given up or will get the relay's own answer.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The service, one per daemon; cheap to clone into tonic.
#[derive(Debug, Clone)]
pub struct Service {
    inner: Arc<ServiceParts>,
}

/// What the service is built from.
#[derive(Debug)]
pub struct ServiceParts {
    pub identity: Identity,
    pub relay_url: String,
    pub dialect: Dialect,
    pub relay: Handle,
    pub router: Arc<Router>,
    pub counters: Arc<Counters>,
    pub send_timeout: Duration,
    pub max_message_bytes: usize,
    /// Cancelled at shutdown: open streams end then.
    pub shutdown: CancellationToken,
    /// Who may call Reconnect, and how often.
    pub admins: Admins,
}

impl Service {
    pub fn new(parts: ServiceParts) -> Self {
        Service {
            inner: Arc::new(parts),
        }
    }

    /// Validates and encodes what arrived of a SendStream, and queues the
    /// valid messages for the relay as one.
    async fn submit_chunk(
        &self,
        items: Vec<Result<v1::SendRequest, Status>>,
        process: &Worker,
    ) -> Chunk {
        let mut outcomes = Vec::with_capacity(items.len());
        let mut frames = Vec::with_capacity(items.len());
        for item in items {
            let encoded = item.and_then(|request| {
                let (peer, frame) = self.encode(&request)?;
                let worker = if request.worker.is_empty() {
                    process.clone()
                } else {
                    Worker::label(&request.worker)
                };
                self.inner
                    .router
                    .try_clear_to_send(&worker, peer, request.conversation)?;
                Ok(Outgoing { peer, frame })
            });
            match encoded {
                Ok(frame) => {
                    frames.push(frame);
                    outcomes.push(Ok(()));
                }
                Err(status) => outcomes.push(Err(status)),
            }
        }
        let ticket = if frames.is_empty() {
            None
        } else {
            let deadline = deadline_in(self.inner.send_timeout);
            Some(self.inner.relay.submit_all(frames, deadline).await)
        };
        Chunk { outcomes, ticket }
    }

    /// Validates and encodes a send request. Nothing invalid reaches the relay.
    fn encode(&self, request: &v1::SendRequest) -> Result<(Uuid, String), Status> {
        let peer_uuid = parse_peer(&request.peer_uuid)?;
        check_label("worker", &request.worker)?;
        if !DESCRIPTION_TYPES.contains(&request.description_type.as_str()) {
            return Err(Status::invalid_argument(format!(
                "description_type: {:?} is not \"offer\" or \"answer\"",
                request.description_type
            )));
        }
        let identity = &self.inner.identity;
        // The same in both dialects; encoded from the request as it is.
        let frame = codec::encode_peer(
            identity.uuid,
            &identity.name,
            peer_uuid,
            &request.description_type,
            &request.description,
            None,
        );
        if frame.len() > self.inner.max_message_bytes {
            return Err(Status::invalid_argument(format!(
                "description: the message would be {} bytes on the wire, over the limit of {} (max_message_bytes)",
                frame.len(),
                self.inner.max_message_bytes
            )));
        }
        Ok((peer_uuid, frame))
    }

    /// How long a Send may wait for registration. With a caller's deadline,
    /// a little less than it, so that the caller hears UNAVAILABLE from us
    /// rather than tonic's own deadline error.
    fn wait_budget<T>(&self, request: &Request<T>) -> Duration {
        match call_timeout(request) {
            Some(timeout) => timeout - (timeout / 10).min(DEADLINE_MARGIN),
            None => self.inner.send_timeout,
        }
    }

    fn status_message(&self, link: &LinkStatus) -> v1::GetStatusResponse {
        let inner = &self.inner;
        let c = inner.counters.snapshot();
        v1::GetStatusResponse {
            uuid: inner.identity.uuid.to_string(),
            name: inner.identity.name.clone(),
            relay_url: inner.relay_url.clone(),
            dialect: inner.dialect.to_string(),
            state: state_to_proto(link.state) as i32,
            close_code: link.close_code.map(u32::from).unwrap_or(0),
            detail: link.detail.clone(),
            attempt: link.attempt,
            retry_in: link.retry_at.map(|at| {
                let left = at.saturating_duration_since(Instant::now());
                relay_sidecar_proto::prost_types::Duration {
                    seconds: left.as_secs() as i64,
                    nanos: left.subsec_nanos() as i32,
                }
            }),
            counters: Some(v1::Counters {
                sent: c.sent,
                received: c.received,
                bounced: c.bounced,
                dropped: c.dropped(),
                reconnects: c.reconnects,
                subscribers: inner.router.subscribers() as u64,
                undecodable: c.undecodable,
                delivered: c.delivered,
                dropped_no_subscriber: c.dropped_no_subscriber,
                dropped_queue_full: c.dropped_queue_full,
                workers: inner.router.workers() as u64,
                conversations: inner.router.conversations() as u64,
                conversation_conflicts: c.conversation_conflicts,
                conversations_expired: c.conversations_expired,
                offers_refused: c.offers_refused,
                dropped_expired: c.dropped_expired,
                dropped_no_conversation: c.dropped_no_conversation,
                confirmations: c.confirmations,
            }),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// Answers the offers the router refused, each with a message to its
    /// sender that carries the reason in `error`: a ProxyStore peer then
    /// fails its connection attempt at once (`PeerConnectionError`), as it
    /// would if this host were not registered. Runs until `shutdown`.
    pub async fn answer_refusals(
        self,
        mut refusals: mpsc::Receiver<Refusal>,
        shutdown: CancellationToken,
    ) {
        let identity = &self.inner.identity;
        loop {
            let refusal = tokio::select! {
                refusal = refusals.recv() => match refusal {
                    Some(refusal) => refusal,
                    None => return,
                },
                () = shutdown.cancelled() => return,
            };
            let error = format!(
                "relay-sidecar on {}: {}",
                identity.name,
                refusal.why.describe()
            );
            let frame = codec::encode_peer(
                identity.uuid,
                &identity.name,
                refusal.peer,
                "answer",
                "",
                Some(&error),
            );
            // One at a time (a dropped ticket would not be written): a
            // flood of offers fills the router's queue of refusals instead.
            // How it went is of no use to anyone here.
            let outgoing = Outgoing {
                peer: refusal.peer,
                frame,
            };
            let deadline = Instant::now() + REFUSAL_TIMEOUT;
            if let Ok(ticket) = self.inner.relay.submit(outgoing, deadline).await {
                let _ = ticket.outcome().await;
            }
        }
    }
}

/// A request's `peer_uuid`, parsed.
fn parse_peer(peer_uuid: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(peer_uuid).map_err(|e| {
        Status::invalid_argument(format!("peer_uuid: {peer_uuid:?} is not a UUID ({e})"))
    })
}

/// Refuses a worker label or group name longer than the router keeps.
fn check_label(field: &str, value: &str) -> Result<(), Status> {
    if value.len() > MAX_LABEL_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field}: {} bytes, over the limit of {MAX_LABEL_BYTES}",
            value.len()
        )));
    }
    Ok(())
}

fn state_to_proto(state: ConnectionState) -> v1::ConnectionState {
    match state {
        ConnectionState::Idle => v1::ConnectionState::Idle,
        ConnectionState::Connecting => v1::ConnectionState::Connecting,
        ConnectionState::Registered => v1::ConnectionState::Registered,
        ConnectionState::Backoff => v1::ConnectionState::Backoff,
        ConnectionState::Failed => v1::ConnectionState::Failed,
        ConnectionState::Stopping => v1::ConnectionState::Stopping,
    }
}

fn message_to_proto(message: Arc<PeerMessage>) -> v1::SubscribeResponse {
    // A message that reached one subscriber only is this stream's alone: its
    // strings move into the response instead of being copied.
    let PeerMessage { peer, bounced } = Arc::unwrap_or_clone(message);
    v1::SubscribeResponse {
        message: Some(v1::PeerMessage {
            source_uuid: peer.source_uuid.to_string(),
            source_name: peer.source_name,
            peer_uuid: peer.peer_uuid.to_string(),
            description_type: peer.description_type,
            description: peer.description,
            error: peer.error,
            bounced,
        }),
    }
}

/// Part of a SendStream on its way: one outcome per message, in order, the
/// valid ones `Ok` until the relay's answer for them all is known.
struct Chunk {
    outcomes: Vec<Result<(), Status>>,
    ticket: Option<Result<Ticket, SendError>>,
}

impl Chunk {
    async fn settle(self) -> Vec<Result<(), Status>> {
        let Chunk {
            mut outcomes,
            ticket,
        } = self;
        let answer = match ticket {
            None => Ok(()),
            Some(Ok(ticket)) => ticket.outcome().await,
            Some(Err(e)) => Err(e),
        };
        if let Err(e) = answer {
            let status = Status::from(e);
            for outcome in outcomes.iter_mut().filter(|o| o.is_ok()) {
                *outcome = Err(status.clone());
            }
        }
        outcomes
    }
}

impl From<RouterError> for Status {
    fn from(e: RouterError) -> Self {
        match e {
            RouterError::ExclusiveWithoutGroup | RouterError::NoConversationSubscription { .. } => {
                Status::invalid_argument(e.to_string())
            }
            RouterError::GroupInUse { .. } | RouterError::GroupHeld { .. } => {
                Status::already_exists(e.to_string())
            }
            RouterError::Held { .. } => Status::aborted(e.to_string()),
            RouterError::Full => Status::resource_exhausted(e.to_string()),
        }
    }
}

/// Whether a failed send certainly wrote nothing to the relay.
fn nothing_sent(e: &SendError) -> bool {
    !matches!(e, SendError::Unconfirmed(_))
}

impl From<SendError> for Status {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Failed { .. } => Status::failed_precondition(e.to_string()),
            SendError::NotRegistered { .. } | SendError::Stopping => {
                Status::unavailable(e.to_string())
            }
            SendError::Unconfirmed(_) => Status::unknown(e.to_string()),
        }
    }
}

/// Who is calling: the request's worker label, else the calling process from
/// the Unix socket's peer credentials.
fn caller<T>(request: &Request<T>, label: &str) -> Worker {
    if !label.is_empty() {
        return Worker::label(label);
    }
    request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .and_then(|cred| cred.pid())
        .map(Worker::process)
        .unwrap_or_else(Worker::anonymous)
}

/// The caller's deadline from the `grpc-timeout` header, if it sent a
/// valid one.
fn call_timeout<T>(request: &Request<T>) -> Option<Duration> {
    parse_grpc_timeout(request.metadata().get("grpc-timeout")?.to_str().ok()?)
}

/// A `grpc-timeout` value as the gRPC over HTTP/2 spec defines it: 1 to 8
/// ASCII digits and a unit (H, M, S, m, u, n). Anything else is no deadline
/// (as tonic, which enforces the header, reads it too).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty()
        || digits.len() > GRPC_TIMEOUT_DIGITS
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // At most 99,999,999: no unit can overflow.
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The instant `after` from now, without overflow: [`FAR_DEADLINE`] at most.
fn deadline_in(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after.min(FAR_DEADLINE)).unwrap_or(now)
}

/// What a Send whose deadline passed after its message was handed to the
/// relay connection returns: DEADLINE_EXCEEDED, before tonic's own timer
/// would cancel the call with CANCELLED (which the contract does not use).
fn deadline_exceeded() -> Status {
    Status::deadline_exceeded(
        "the call's deadline passed before the relay confirmed the message; it may or may not have been forwarded",
    )
}

#[tonic::async_trait]
impl RelaySidecar for Service {
    async fn get_status(
        &self,
        _request: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::GetStatusResponse>, Status> {
        let link = self.inner.relay.status();
        Ok(Response::new(self.status_message(&link)))
    }

    type WatchStatusStream = ResponseStream<v1::WatchStatusResponse>;

    async fn watch_status(
        &self,
        _request: Request<v1::WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let service = self.clone();
        let mut last_state = None;
        let mut stopped = false;
        let stream = WatchStream::new(self.inner.relay.watch())
            // One update per change of state; the attempt counter and retry
            // time changing within BACKOFF are not news.
            .filter(move |link| {
                let changed = last_state != Some((link.state, link.close_code));
                last_state = Some((link.state, link.close_code));
                std::future::ready(changed)
            })
            // The stream ends after telling the caller the daemon is stopping.
            .take_while(move |link| {
                let more = !stopped;
                stopped = link.state == ConnectionState::Stopping;
                std::future::ready(more)
            })
            .map(move |link| {
                Ok(v1::WatchStatusResponse {
                    status: Some(service.status_message(&link)),
                })
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn send(
        &self,
        request: Request<v1::SendRequest>,
    ) -> Result<Response<v1::SendResponse>, Status> {
        let (peer, frame) = self.encode(request.get_ref())?;
        let worker = caller(&request, &request.get_ref().worker);
        let deadline = deadline_in(self.wait_budget(&request));
        let v1::SendRequest {
            conversation,
            wait_for_conversation,
            ..
        } = *request.get_ref();
        let router = &self.inner.router;
        let claimed = router
            .clear_to_send(
                &worker,
                peer,
                conversation,
                wait_for_conversation.then_some(deadline),
            )
            .await?;
        let sent = match self
            .inner
            .relay
            .submit(Outgoing { peer, frame }, deadline)
            .await
        {
            Ok(ticket) if call_timeout(&request).is_some() => {
                match tokio::time::timeout_at(deadline, ticket.outcome()).await {
                    Ok(outcome) => outcome,
                    // Written, or about to be: past the caller's deadline,
                    // nobody knows whether the relay forwarded it.
                    Err(_) => return Err(deadline_exceeded()),
                }
            }
            Ok(ticket) => ticket.outcome().await,
            Err(e) => Err(e),
        };
        if let Err(e) = &sent
            && claimed == Some(Claimed::New)
            && nothing_sent(e)
        {
            // Nothing went out: the claim would only keep others away.
            router.release(&worker, peer);
        }
        sent?;
        Ok(Response::new(v1::SendResponse {}))
    }

    type SendStreamStream = ResponseStream<v1::SendStreamResponse>;

    async fn send_stream(
        &self,
        request: Request<tonic::Streaming<v1::SendRequest>>,
    ) -> Result<Response<Self::SendStreamStream>, Status> {
        let process = caller(&request, "");
        let end = call_timeout(&request).map(|_| deadline_in(self.wait_budget(&request)));
        let service = self.clone();
        // What has arrived is taken as a chunk and queued for the relay,
        // chunk after chunk, in order; outcomes are awaited up to
        // CHUNKS_IN_FLIGHT chunks at a time, come back in order, and leave
        // in batches.
        let outcomes = request
            .into_inner()
            .ready_chunks(CHUNK)
            .then(move |items| {
                let service = service.clone();
                let process = process.clone();
                async move { service.submit_chunk(items, &process).await }
            })
            .map(Chunk::settle)
            .buffered(CHUNKS_IN_FLIGHT)
            .ready_chunks(CHUNKS_IN_FLIGHT)
            .map(|chunks| chunks.into_iter().flatten());
        let mut settled = 0u64;
        let responses = outcomes.map(move |chunk| {
            let mut failures = Vec::new();
            for outcome in chunk {
                if let Err(status) = outcome {
                    failures.push(v1::SendFailure {
                        index: settled,
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                    });
                }
                settled += 1;
            }
            Ok(v1::SendStreamResponse { settled, failures })
        });
        let responses: Self::SendStreamStream = Box::pin(responses);
        let Some(end) = end else {
            return Ok(Response::new(responses));
        };
        // With a deadline, the stream ends with DEADLINE_EXCEEDED just
        // before it, rather than being cancelled by tonic's timer: the
        // messages after the last `settled` have no outcome.
        let timed = futures_util::stream::unfold(
            (responses, Box::pin(tokio::time::sleep_until(end)), false),
            |(mut responses, mut timer, over)| async move {
                if over {
                    return None;
                }
                tokio::select! {
                    biased;
                    item = responses.next() => item.map(|item| (item, (responses, timer, false))),
                    () = &mut timer => Some((Err(deadline_exceeded()), (responses, timer, true))),
                }
            },
        );
        Ok(Response::new(Box::pin(timed)))
    }

    type SubscribeStream = ResponseStream<v1::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        check_label("worker", &request.get_ref().worker)?;
        check_label("group", &request.get_ref().group)?;
        let worker = caller(&request, &request.get_ref().worker);
        let request = request.into_inner();
        let interest = Interest {
            group: Some(request.group).filter(|g| !g.is_empty()),
            exclusive: request.exclusive,
            conversations: request.conversations,
        };
        let subscription = self.inner.router.subscribe(interest, worker)?;
        self.inner.relay.wake();
        let stream = subscription
            .map(|message| Ok(message_to_proto(message)))
            .take_until(self.inner.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn hold_conversation(
        &self,
        request: Request<v1::HoldConversationRequest>,
    ) -> Result<Response<v1::HoldConversationResponse>, Status> {
        let peer = parse_peer(&request.get_ref().peer_uuid)?;
        check_label("worker", &request.get_ref().worker)?;
        let worker = caller(&request, &request.get_ref().worker);
        let wait_until = request
            .get_ref()
            .wait
            .then(|| deadline_in(self.wait_budget(&request)));
        let left = self.inner.router.hold(&worker, peer, wait_until).await?;
        Ok(Response::new(v1::HoldConversationResponse {
            expires_in: Some(relay_sidecar_proto::prost_types::Duration {
                seconds: left.as_secs() as i64,
                nanos: left.subsec_nanos() as i32,
            }),
        }))
    }

    async fn release_conversation(
        &self,
        request: Request<v1::ReleaseConversationRequest>,
    ) -> Result<Response<v1::ReleaseConversationResponse>, Status> {
        let peer = parse_peer(&request.get_ref().peer_uuid)?;
        check_label("worker", &request.get_ref().worker)?;
        let worker = caller(&request, &request.get_ref().worker);
        let released = self.inner.router.release(&worker, peer);
        Ok(Response::new(v1::ReleaseConversationResponse { released }))
    }

    async fn reconnect(
        &self,
        request: Request<v1::ReconnectRequest>,
    ) -> Result<Response<v1::ReconnectResponse>, Status> {
        self.inner.admins.admit("Reconnect", &request)?;
        self.inner.relay.reconnect().await?;
        Ok(Response::new(v1::ReconnectResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_follow_the_spec() {
        assert_eq!(parse_grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in [
            "18446744073709551615S",
            "123456789S",
            "S",
            "",
            "1",
            "+1S",
            "1s",
            "1.5S",
            " 1S",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        // The longest deadline still makes an instant.
        let far = deadline_in(parse_grpc_timeout("99999999H").unwrap());
        assert!(far > Instant::now());
        assert!(deadline_in(Duration::MAX) > Instant::now());
    }
}
