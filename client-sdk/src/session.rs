//! The session path: one worker's stream to the daemon, open both ways for
//! as long as the worker lives.
//!
//! A [`Session`] is a `SendStream` call held open next to a `Subscribe`,
//! both on the client's one connection. A message costs one HTTP/2 DATA
//! frame each way and no call of its own, and the daemon confirms sends in
//! batches, as for any `SendStream`; each [`Session::send`] still hears its
//! own outcome, with the codes of a unary send.
//!
//! How outcomes find their sends: requests leave in the order they were
//! queued, and the daemon reports progress as a count of settled messages
//! plus the failures among them, so the n-th queued send is the n-th
//! settled. A send is a [`Waiter`] once the stream has taken its request;
//! until then it sits in the queue, and a stream that ends before taking it
//! answers it `Unavailable` (nothing was sent).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::Stream;
use relay_sidecar_proto::v1;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use uuid::Uuid;

use crate::{Client, DescriptionType, Error, PeerMessage, SubscribeOptions, Subscription};

/// Sends one session keeps unsettled; [`Session::send`] waits for room
/// beyond it. The daemon's own queue holds 1024 sends or stream chunks, so
/// one session can keep it busy, and no more.
pub const SESSION_IN_FLIGHT: usize = 1024;

type Outcome = Result<(), Error>;

/// One queued send: its request, where its outcome goes, and its room.
struct Queued {
    request: v1::SendRequest,
    waiter: Waiter,
}

/// A send the stream has taken.
struct Waiter {
    done: oneshot::Sender<Outcome>,
    _room: OwnedSemaphorePermit,
}

/// The stream in use, if any. A new one opens at the first send after the
/// last one ended.
#[derive(Default)]
struct Link {
    queue: Option<mpsc::UnboundedSender<Queued>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The sending half of a [`Session`]; cheap to clone, and clones share the
/// session's stream and its order.
#[derive(Clone)]
pub struct SessionSender {
    client: Client,
    link: Arc<Mutex<Link>>,
    room: Arc<Semaphore>,
}

impl std::fmt::Debug for SessionSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSender")
            .field(
                "unsettled",
                &(SESSION_IN_FLIGHT - self.room.available_permits()),
            )
            .finish_non_exhaustive()
    }
}

/// One worker's two-way stream with the daemon: sends on a held-open
/// `SendStream`, inbound messages on a `Subscribe`, both on the client's
/// connection. Open one with [`Client::session`].
///
/// Its inbound half is a [`Subscription`] (it resumes after a daemon
/// restart the same way); its sending half opens a fresh stream at the
/// first send after the daemon restarted.
#[derive(Debug)]
pub struct Session {
    sender: SessionSender,
    inbox: Subscription,
}

impl Client {
    /// Opens a [`Session`] for this worker: a subscription with `options`,
    /// and a send stream opened at the first send.
    ///
    /// The cheapest way for a long-lived worker to send and receive: see
    /// [`Session`].
    pub async fn session(&self, options: SubscribeOptions) -> Result<Session, Error> {
        let inbox = self.subscribe_with(options).await?;
        Ok(Session {
            sender: SessionSender {
                client: self.clone(),
                link: Arc::default(),
                room: Arc::new(Semaphore::new(SESSION_IN_FLIGHT)),
            },
            inbox,
        })
    }
}

impl Session {
    /// Sends one message to `peer`, and returns its outcome, with the
    /// meaning and the errors of [`Client::send`]. To pipeline, use
    /// [`Session::queue`].
    pub async fn send(
        &self,
        peer: Uuid,
        kind: DescriptionType,
        description: impl Into<String>,
    ) -> Result<(), Error> {
        self.sender.send(peer, kind, description).await
    }

    /// Queues one message to `peer` once the session has room for it (at
    /// most [`SESSION_IN_FLIGHT`] unsettled), and returns its outcome to
    /// come. Messages leave in the order they were queued: a worker that
    /// queues many before awaiting any keeps the stream full.
    pub async fn queue(
        &self,
        peer: Uuid,
        kind: DescriptionType,
        description: impl Into<String>,
    ) -> Pending {
        self.sender.queue(peer, kind, description).await
    }

    /// The sending half, to send from other tasks.
    pub fn sender(&self) -> SessionSender {
        self.sender.clone()
    }

    /// The next inbound message, as [`Subscription::next_message`].
    pub async fn next_message(&mut self) -> Result<Option<PeerMessage>, Error> {
        self.inbox.next_message().await
    }

    /// The two halves, for a worker that sends and receives in different
    /// tasks.
    pub fn into_split(self) -> (SessionSender, Subscription) {
        (self.sender, self.inbox)
    }

    /// Ends the session: stops receiving, lets the daemon answer for every
    /// send it was given, and returns once each has its outcome.
    pub async fn close(self) {
        drop(self.inbox);
        self.sender.close().await;
    }
}

impl Stream for Session {
    type Item = Result<PeerMessage, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inbox).poll_next(cx)
    }
}

impl SessionSender {
    /// As [`Session::send`].
    pub async fn send(
        &self,
        peer: Uuid,
        kind: DescriptionType,
        description: impl Into<String>,
    ) -> Result<(), Error> {
        self.queue(peer, kind, description).await.await
    }

    /// As [`Session::queue`].
    pub async fn queue(
        &self,
        peer: Uuid,
        kind: DescriptionType,
        description: impl Into<String>,
    ) -> Pending {
        self.queue_request(self.request(peer, kind, description, false))
            .await
    }

    /// As [`Session::send`], taking part in the conversation with `peer`
    /// (see [`SendOptions::conversation`](crate::SendOptions::conversation)).
    /// A conversation held by another worker fails this message at once with
    /// [`Error::Aborted`]: a stream never waits for one.
    pub async fn send_in_conversation(
        &self,
        peer: Uuid,
        kind: DescriptionType,
        description: impl Into<String>,
    ) -> Result<(), Error> {
        self.queue_request(self.request(peer, kind, description, true))
            .await
            .await
    }

    fn request(
        &self,
        peer: Uuid,
        kind: DescriptionType,
        description: impl Into<String>,
        conversation: bool,
    ) -> v1::SendRequest {
        v1::SendRequest {
            peer_uuid: peer.to_string(),
            description_type: kind.to_string(),
            description: description.into(),
            worker: self.client.worker().unwrap_or_default().to_owned(),
            conversation,
            wait_for_conversation: false,
        }
    }

    async fn queue_request(&self, request: v1::SendRequest) -> Pending {
        let room = Arc::clone(&self.room)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (done, outcome) = oneshot::channel();
        let queued = Queued {
            request,
            waiter: Waiter { done, _room: room },
        };
        let mut link = self.link.lock().expect("session lock");
        let mut queued = Some(queued);
        // A stream that ended closes its queue: the message goes to a new
        // one.
        for _ in 0..2 {
            let queue = match &link.queue {
                Some(queue) if !queue.is_closed() => queue.clone(),
                _ => {
                    let (queue, task) = open(self.client.clone());
                    link.queue = Some(queue.clone());
                    link.task = Some(task);
                    queue
                }
            };
            match queue.send(queued.take().expect("queued once")) {
                Ok(()) => break,
                Err(mpsc::error::SendError(back)) => {
                    link.queue = None;
                    queued = Some(back);
                }
            }
        }
        if let Some(queued) = queued {
            let _ = queued.waiter.done.send(Err(not_sent()));
        }
        Pending { outcome }
    }

    /// Half-closes the stream, and waits until every send has its outcome.
    pub async fn close(&self) {
        let task = {
            let mut link = self.link.lock().expect("session lock");
            link.queue = None;
            link.task.take()
        };
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// The outcome of a queued message, to come: see [`Session::queue`].
#[derive(Debug)]
#[must_use = "the outcome says whether the message went out"]
pub struct Pending {
    outcome: oneshot::Receiver<Outcome>,
}

impl std::future::Future for Pending {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // A waiter dropped unanswered was never taken by a stream.
        Pin::new(&mut self.outcome)
            .poll(cx)
            .map(|answer| answer.unwrap_or_else(|_| Err(not_sent())))
    }
}

fn not_sent() -> Error {
    Error::Unavailable("not sent: the session's stream to the daemon ended first".into())
}

/// Opens a `SendStream` fed by a new queue; its task matches the daemon's
/// progress reports to the sends and answers what is left when it ends.
fn open(client: Client) -> (mpsc::UnboundedSender<Queued>, tokio::task::JoinHandle<()>) {
    let (queue, requests) = mpsc::unbounded_channel::<Queued>();
    let requests = Arc::new(Mutex::new(requests));
    let taken: Arc<Mutex<VecDeque<Waiter>>> = Arc::default();
    let outgoing = {
        let (requests, taken) = (Arc::clone(&requests), Arc::clone(&taken));
        futures_util::stream::poll_fn(move |cx| {
            let next = requests.lock().expect("session lock").poll_recv(cx);
            next.map(|next| {
                next.map(|Queued { request, waiter }| {
                    taken.lock().expect("session lock").push_back(waiter);
                    request
                })
            })
        })
    };
    let task = tokio::spawn(async move {
        let ended = match client.raw().send_stream(outgoing).await {
            Ok(progress) => settle(progress.into_inner(), &taken).await,
            Err(status) => Err(Error::from(status)),
        };
        // Still queued: never sent. Closing the queue sends the next send
        // to a new stream.
        let mut requests = requests.lock().expect("session lock");
        requests.close();
        while let Ok(queued) = requests.try_recv() {
            let _ = queued.waiter.done.send(Err(not_sent()));
        }
        // Taken and never settled: they may have reached the daemon.
        let why = match ended {
            Ok(()) => "the session's stream ended before its outcome".to_owned(),
            Err(e) => format!("the session's stream ended before its outcome: {e}"),
        };
        for waiter in taken.lock().expect("session lock").drain(..) {
            let _ = waiter.done.send(Err(Error::Unconfirmed(why.clone())));
        }
    });
    (queue, task)
}

/// Answers the taken sends as the daemon settles them, in order.
async fn settle(
    mut progress: tonic::Streaming<v1::SendStreamResponse>,
    taken: &Mutex<VecDeque<Waiter>>,
) -> Result<(), Error> {
    let mut settled = 0u64;
    while let Some(response) = progress.message().await? {
        let mut failures: HashMap<u64, v1::SendFailure> = response
            .failures
            .into_iter()
            .map(|failure| (failure.index, failure))
            .collect();
        let mut taken = taken.lock().expect("session lock");
        while settled < response.settled {
            let outcome = match failures.remove(&settled) {
                None => Ok(()),
                Some(failure) => Err(Error::from(tonic::Status::new(
                    tonic::Code::from_i32(failure.code),
                    failure.message,
                ))),
            };
            let Some(waiter) = taken.pop_front() else {
                return Err(Error::Protocol(format!(
                    "the daemon settled message {settled}, which was never sent"
                )));
            };
            let _ = waiter.done.send(outcome);
            settled += 1;
        }
    }
    Ok(())
}
