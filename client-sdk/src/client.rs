//! The [`Client`] handle and the streams it opens.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::Stream;
use relay_sidecar_proto::v1::{self, relay_sidecar_client::RelaySidecarClient};
use tonic::transport::Channel;
use uuid::Uuid;

use crate::{DescriptionType, Error, PeerMessage, Status};

/// A connection to the relay-sidecar daemon.
///
/// Cheap to clone: clones share one connection to the daemon's socket, and
/// calls on clones may run concurrently. If the daemon restarts, later calls
/// reconnect to the same socket path.
#[derive(Debug, Clone)]
pub struct Client {
    inner: RelaySidecarClient<Channel>,
    worker: Option<String>,
    /// The socket it was connected to, for messages.
    socket: Option<PathBuf>,
}

/// One message for [`Client::send_stream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The receiving peer.
    pub peer: Uuid,
    /// Offer or answer.
    pub kind: DescriptionType,
    /// The payload.
    pub description: String,
}

/// What became of the messages of one [`Client::send_stream`] call.
#[derive(Debug, Default)]
pub struct StreamReport {
    /// How many messages have an outcome (all of them, once the call returns).
    pub settled: u64,
    /// The messages that did not succeed; every other one did, as a
    /// [`Client::send`] that returned `Ok`.
    pub failures: Vec<SendFailure>,
}

/// One message of a [`Client::send_stream`] call that did not succeed.
#[derive(Debug)]
pub struct SendFailure {
    /// Its position in the stream, from 0.
    pub index: u64,
    /// Why, as [`Client::send`] would have reported it.
    pub error: Error,
}

/// Per-call options for [`Client::send_with`].
///
/// ```
/// # use std::time::Duration;
/// let options = relay_sidecar_client::SendOptions::new()
///     .worker("ingest-3")
///     .timeout(Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    worker: Option<String>,
    timeout: Option<Duration>,
    conversation: bool,
    wait_for_conversation: bool,
}

impl SendOptions {
    /// No worker override and no deadline (the daemon's default send timeout applies).
    pub fn new() -> Self {
        Self::default()
    }

    /// The worker label for this send, overriding [`Client::with_worker`].
    pub fn worker(mut self, worker: impl Into<String>) -> Self {
        self.worker = Some(worker.into());
        self
    }

    /// The call's deadline: how long the daemon may wait for the relay
    /// connection to be registered before it fails with
    /// [`Error::Unavailable`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Takes part in the conversation with the peer: claims it for this
    /// worker if nobody holds it, renews it if this worker does. The worker
    /// needs an open subscription made with
    /// [`SubscribeOptions::conversations`], where the peer's replies arrive.
    /// While another worker holds it the send fails with [`Error::Aborted`].
    pub fn conversation(mut self) -> Self {
        self.conversation = true;
        self
    }

    /// While another worker holds the peer's conversation, waits for it to
    /// end (up to the [`timeout`](Self::timeout), else the daemon's send
    /// timeout) instead of failing at once with [`Error::Aborted`].
    pub fn wait_for_conversation(mut self) -> Self {
        self.wait_for_conversation = true;
        self
    }
}

/// Per-call options for [`Client::subscribe_with`].
///
/// ```
/// let options = relay_sidecar_client::SubscribeOptions::new()
///     .group("proxystore-endpoint")
///     .exclusive();
/// ```
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    group: Option<String>,
    exclusive: bool,
    conversations: bool,
}

impl SubscribeOptions {
    /// No group (a group of its own, which sees every message).
    pub fn new() -> Self {
        Self::default()
    }

    /// The delivery group: every group receives each message once, shared
    /// among its subscriptions.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Holds the group alone while the subscription is open: refused with
    /// [`Error::AlreadyExists`] while the group has another subscription, and
    /// every later subscription to the group is refused the same way until
    /// this one is dropped. Needs a [`group`](Self::group).
    pub fn exclusive(mut self) -> Self {
        self.exclusive = true;
        self
    }

    /// A conversation subscription: it receives the messages of the
    /// conversations its worker holds (claimed by a send with
    /// [`SendOptions::conversation`], or started by a peer's offer handed to
    /// it), and nothing else. For anything that answers WebRTC offers; see
    /// the contract's "Conversations".
    pub fn conversations(mut self) -> Self {
        self.conversations = true;
        self
    }
}

impl Client {
    /// A client over an already connected channel to the daemon (for custom
    /// transports; most callers use [`connect`](crate::connect)).
    pub fn from_channel(channel: Channel) -> Self {
        Client {
            inner: RelaySidecarClient::new(channel),
            worker: None,
            socket: None,
        }
    }

    /// This handle, remembering the socket it was connected to.
    pub(crate) fn at(mut self, socket: PathBuf) -> Self {
        self.socket = Some(socket);
        self
    }

    /// The socket this client was connected to, when it was connected by path.
    pub fn socket(&self) -> Option<&std::path::Path> {
        self.socket.as_deref()
    }

    /// This handle with a worker label, sent with every send and subscribe
    /// made through it. Replies from a peer go preferably to the subscription
    /// of the worker that last sent to that peer; without a label the calling
    /// process is the worker, so set one when several tasks of one process
    /// each subscribe and send.
    pub fn with_worker(mut self, worker: impl Into<String>) -> Self {
        self.worker = Some(worker.into());
        self
    }

    /// The worker label set with [`Client::with_worker`], if any.
    pub fn worker(&self) -> Option<&str> {
        self.worker.as_deref()
    }

    /// The generated tonic client, for calls or metadata the SDK does not cover.
    pub fn raw(&self) -> RelaySidecarClient<Channel> {
        self.inner.clone()
    }

    /// Sends one message to `peer` as this host's identity.
    ///
    /// Returns once the daemon has written the message to the relay; the relay
    /// does not acknowledge delivery, and a message it cannot forward comes
    /// back on [`Client::subscribe`] with [`PeerMessage::bounced`] set.
    /// Fails with [`Error::InvalidArgument`] (nothing sent),
    /// [`Error::Unavailable`] (not registered in time: safe to retry) or
    /// [`Error::FailedPrecondition`] (the connection is FAILED).
    pub async fn send(
        &self,
        peer: Uuid,
        kind: DescriptionType,
        description: impl Into<String>,
    ) -> Result<(), Error> {
        self.send_with(peer, kind, description, SendOptions::new())
            .await
    }

    /// [`Client::send`] with a worker label or a deadline for this call.
    pub async fn send_with(
        &self,
        peer: Uuid,
        kind: DescriptionType,
        description: impl Into<String>,
        options: SendOptions,
    ) -> Result<(), Error> {
        let mut request = tonic::Request::new(v1::SendRequest {
            peer_uuid: peer.to_string(),
            description_type: kind.to_string(),
            description: description.into(),
            worker: options
                .worker
                .or_else(|| self.worker.clone())
                .unwrap_or_default(),
            conversation: options.conversation,
            wait_for_conversation: options.wait_for_conversation,
        });
        if let Some(timeout) = options.timeout {
            request.set_timeout(timeout);
        }
        self.inner.clone().send(request).await?;
        Ok(())
    }

    /// Sends many messages on one call (the `SendStream` RPC), in order, and
    /// waits until every one has an outcome. A refused message costs only
    /// itself: it is listed in [`StreamReport::failures`] and the rest go on.
    ///
    /// Cheaper than one [`Client::send`] per message for a worker that sends
    /// a lot.
    pub async fn send_stream<S>(&self, messages: S) -> Result<StreamReport, Error>
    where
        S: Stream<Item = Outgoing> + Send + 'static,
    {
        use futures_util::StreamExt;

        let worker = self.worker.clone().unwrap_or_default();
        let requests = messages.map(move |m| v1::SendRequest {
            peer_uuid: m.peer.to_string(),
            description_type: m.kind.to_string(),
            description: m.description,
            worker: worker.clone(),
            ..Default::default()
        });
        let mut progress = self.inner.clone().send_stream(requests).await?.into_inner();
        let mut report = StreamReport::default();
        while let Some(response) = progress.message().await? {
            report.settled = response.settled;
            for failure in response.failures {
                let code = tonic::Code::from_i32(failure.code);
                report.failures.push(SendFailure {
                    index: failure.index,
                    error: tonic::Status::new(code, failure.message).into(),
                });
            }
        }
        Ok(report)
    }

    /// Opens a stream of inbound messages and bounces.
    ///
    /// Every `group` receives each message once, shared among the
    /// subscriptions in it; `None` is a group of its own that receives every
    /// message. The stream outlives relay reconnects, and a restart of the
    /// daemon: when the daemon stops, the subscription waits up to
    /// [`RESUME_WITHIN`] (see [`Subscription::resume_within`]) for a daemon
    /// with the same identity to answer on the same socket and subscribes
    /// again. Messages that reached the host while no daemon ran are not
    /// delivered (the relay bounced them to their senders). If none comes
    /// back in time, or one with another identity does, the stream yields
    /// [`Error::SubscriptionLost`] and ends.
    pub async fn subscribe(&self, group: Option<&str>) -> Result<Subscription, Error> {
        let mut options = SubscribeOptions::new();
        options.group = group.map(str::to_owned);
        self.subscribe_with(options).await
    }

    /// [`Client::subscribe`] with more options, such as holding a group
    /// exclusively.
    pub async fn subscribe_with(&self, options: SubscribeOptions) -> Result<Subscription, Error> {
        let request = v1::SubscribeRequest {
            group: options.group.unwrap_or_default(),
            worker: self.worker.clone().unwrap_or_default(),
            exclusive: options.exclusive,
            conversations: options.conversations,
        };
        // The identity a resumed subscription must find again.
        let uuid = self.status().await?.uuid;
        let inner = self
            .inner
            .clone()
            .subscribe(request.clone())
            .await?
            .into_inner();
        Ok(Subscription {
            client: self.clone(),
            request,
            uuid,
            resume_within: RESUME_WITHIN,
            resumed: 0,
            state: Receiving::Open(inner),
        })
    }

    /// Claims the conversation with `peer` for this worker without sending,
    /// or renews it if the worker holds it: what keeps a conversation whose
    /// WebRTC connection is up (and so quiet on the relay). Returns how long
    /// it lasts without another sign of life; renew well within it. With
    /// `wait`, waits up to that long for another worker's conversation with
    /// `peer` to end; without, fails at once with [`Error::Aborted`].
    pub async fn hold_conversation(
        &self,
        peer: Uuid,
        wait: Option<Duration>,
    ) -> Result<Duration, Error> {
        let mut request = tonic::Request::new(v1::HoldConversationRequest {
            peer_uuid: peer.to_string(),
            worker: self.worker.clone().unwrap_or_default(),
            wait: wait.is_some(),
        });
        if let Some(wait) = wait {
            request.set_timeout(wait);
        }
        let response = self.inner.clone().hold_conversation(request).await?;
        let left = response.into_inner().expires_in.unwrap_or_default();
        Ok(Duration::new(
            u64::try_from(left.seconds).unwrap_or(0),
            u32::try_from(left.nanos).unwrap_or(0),
        ))
    }

    /// Ends this worker's conversation with `peer`; `false` if it did not
    /// hold it (another worker's is left alone).
    pub async fn release_conversation(&self, peer: Uuid) -> Result<bool, Error> {
        let request = v1::ReleaseConversationRequest {
            peer_uuid: peer.to_string(),
            worker: self.worker.clone().unwrap_or_default(),
        };
        let response = self.inner.clone().release_conversation(request).await?;
        Ok(response.into_inner().released)
    }

    /// The daemon's identity, connection state and counters.
    pub async fn status(&self) -> Result<Status, Error> {
        let response = self
            .inner
            .clone()
            .get_status(v1::GetStatusRequest {})
            .await?;
        response.into_inner().try_into()
    }

    /// A stream of statuses: the current one at once, then one at every change
    /// of the connection state, until it is dropped or the daemon stops.
    pub async fn watch_status(&self) -> Result<StatusStream, Error> {
        let request = v1::WatchStatusRequest {};
        let inner = self.inner.clone().watch_status(request).await?.into_inner();
        Ok(StatusStream { inner })
    }

    /// Drops the relay connection and registers again at once: the way out of
    /// [`ConnectionState::Failed`](crate::ConnectionState::Failed). Returns
    /// when the new attempt has started; watch the status for its outcome.
    pub async fn reconnect(&self) -> Result<(), Error> {
        self.inner
            .clone()
            .reconnect(v1::ReconnectRequest {})
            .await?;
        Ok(())
    }
}

/// How long a [`Subscription`] waits, by default, for its daemon to come
/// back after it stopped: a restart (by systemd, which waits 2 s, or by a
/// job script) takes a few seconds, and a worker whose daemon is gone for
/// good learns it within half a minute.
pub const RESUME_WITHIN: Duration = Duration::from_secs(30);
/// The first pause between attempts to subscribe again, doubled per attempt
/// up to [`RESUME_RETRY_MAX`]: a local socket answers at once when a daemon
/// is there, so trying often costs little.
const RESUME_RETRY_FIRST: Duration = Duration::from_millis(50);
const RESUME_RETRY_MAX: Duration = Duration::from_secs(1);

/// Inbound messages from [`Client::subscribe`]: a [`Stream`] of
/// `Result<PeerMessage, Error>` that resumes after a restart of the daemon.
pub struct Subscription {
    client: Client,
    request: v1::SubscribeRequest,
    uuid: Uuid,
    resume_within: Duration,
    resumed: u64,
    state: Receiving,
}

#[allow(
    clippy::large_enum_variant,
    reason = "one per subscription, and Open is the usual state: boxing it would add an indirection to every message for nothing"
)]
enum Receiving {
    Open(tonic::Streaming<v1::SubscribeResponse>),
    Reopening(Pin<Box<dyn Future<Output = Result<Reopened, Error>> + Send>>),
    Ended,
}

type Reopened = tonic::Streaming<v1::SubscribeResponse>;

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            Receiving::Open(_) => "open",
            Receiving::Reopening(_) => "reopening",
            Receiving::Ended => "ended",
        };
        f.debug_struct("Subscription")
            .field("group", &self.request.group)
            .field("uuid", &self.uuid)
            .field("resume_within", &self.resume_within)
            .field("resumed", &self.resumed)
            .field("state", &state)
            .finish()
    }
}

impl Subscription {
    /// The next message, or `None` once the stream has ended.
    pub async fn next_message(&mut self) -> Result<Option<PeerMessage>, Error> {
        use futures_util::StreamExt;
        self.next().await.transpose()
    }

    /// How long to wait for the daemon to come back after it stopped
    /// (default [`RESUME_WITHIN`]); zero: not at all, the stream yields
    /// [`Error::SubscriptionLost`] at once.
    pub fn resume_within(mut self, within: Duration) -> Self {
        self.resume_within = within;
        self
    }

    /// How many times this subscription was opened again after its daemon
    /// stopped.
    pub fn resumed(&self) -> u64 {
        self.resumed
    }

    /// Starts waiting for a daemon to subscribe to again, after `why`.
    fn reopen(&mut self, why: String) {
        let client = self.client.clone();
        let request = self.request.clone();
        let (uuid, within) = (self.uuid, self.resume_within);
        self.state = Receiving::Reopening(Box::pin(async move {
            let lost = |last: &str| {
                let at = client
                    .socket
                    .as_ref()
                    .map(|p| format!(" at {}", p.display()))
                    .unwrap_or_default();
                Error::SubscriptionLost(format!(
                    "the daemon{at} {why}, and none answered again within {within:?} (last: {last})"
                ))
            };
            if within.is_zero() {
                return Err(lost("not waited for"));
            }
            let deadline = tokio::time::Instant::now() + within;
            let mut pause = RESUME_RETRY_FIRST;
            loop {
                let last = match client.resubscribe(&request, uuid).await {
                    Ok(inner) => return Ok(inner),
                    Err(e @ (Error::Unavailable(_) | Error::Unconfirmed(_))) => e.to_string(),
                    Err(e) => return Err(e),
                };
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Err(lost(&last));
                }
                tokio::time::sleep(pause.min(deadline - now)).await;
                pause = (pause * 2).min(RESUME_RETRY_MAX);
            }
        }));
    }
}

impl Client {
    /// Subscribes again with `request`, if the daemon answering now is still
    /// the peer `uuid`.
    async fn resubscribe(
        &self,
        request: &v1::SubscribeRequest,
        uuid: Uuid,
    ) -> Result<Reopened, Error> {
        let now = self.status().await?.uuid;
        if now != uuid {
            return Err(Error::SubscriptionLost(format!(
                "the daemon came back as another peer ({now}, was {uuid}); subscribe again to use it"
            )));
        }
        Ok(self
            .inner
            .clone()
            .subscribe(request.clone())
            .await?
            .into_inner())
    }
}

/// Whether a failed stream means the daemon went away (rather than refusing
/// this subscription).
fn daemon_gone(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
    )
}

impl Stream for Subscription {
    type Item = Result<PeerMessage, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match &mut self.state {
                Receiving::Open(inner) => match ready!(Pin::new(inner).poll_next(cx)) {
                    Some(Ok(message)) => return Poll::Ready(Some(message.try_into())),
                    Some(Err(status)) if daemon_gone(&status) => {
                        self.reopen(format!("stopped ({})", status.message()));
                    }
                    Some(Err(status)) => {
                        self.state = Receiving::Ended;
                        return Poll::Ready(Some(Err(status.into())));
                    }
                    None => self.reopen("ended the stream".to_owned()),
                },
                Receiving::Reopening(reopening) => match ready!(reopening.as_mut().poll(cx)) {
                    Ok(inner) => {
                        self.resumed += 1;
                        self.state = Receiving::Open(inner);
                    }
                    Err(e) => {
                        self.state = Receiving::Ended;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                Receiving::Ended => return Poll::Ready(None),
            }
        }
    }
}

/// Status updates from [`Client::watch_status`]: a [`Stream`] of
/// `Result<Status, Error>`.
#[derive(Debug)]
pub struct StatusStream {
    inner: tonic::Streaming<v1::WatchStatusResponse>,
}

impl StatusStream {
    /// The next status, or `None` once the daemon has ended the stream.
    pub async fn next_status(&mut self) -> Result<Option<Status>, Error> {
        self.inner
            .message()
            .await?
            .map(TryInto::try_into)
            .transpose()
    }
}

impl Stream for StatusStream {
    type Item = Result<Status, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner)
            .poll_next(cx)
            .map(|item| item.map(|r| r.map_err(Error::from).and_then(TryInto::try_into)))
    }
}
