//! Hands inbound relay messages to local subscribers, and keeps the rule of
//! which local worker holds the conversation with each remote peer.
//!
//! Two kinds of subscription:
//! - Plain ones, in groups. Every group gets each message once: a
//!   subscriber without a group is a group of its own, members of a named
//!   group take turns. Reply affinity comes first: after worker W sent to
//!   peer P, P's messages (and the relay's returns of W's sends to P) go to
//!   W's subscription in each group.
//! - Conversation ones, host-wide whatever their group. The messages of a
//!   remote peer whose conversation a worker holds ([`conversations`]) go to
//!   that worker's conversation subscription and to no other; an offer from
//!   a peer nobody holds goes to exactly one of them, whose worker then
//!   holds the conversation.
//!
//! Plain subscriptions see what their group gets either way. Nothing here
//! ever waits: a full queue passes a plain message to another member of its
//! group, or costs that group the message (counted), never the relay reader
//! or another subscriber. While nobody is subscribed, messages wait in a
//! bounded backlog for the first subscriber ([`backlog`]); an offer nobody
//! can take is refused at once, so that its sender hears so
//! ([`Refusal`]). Everything a caller or a peer can make this module keep
//! is bounded in count and bytes, and expires.
//!
//! Here: the types, subscribing and the sweeper. Delivery is in `dispatch`,
//! what a worker may send and the conversations it claims in `claims`, the
//! leases in [`conversations`], and the bounded `backlog`, `affinity` and
//! drop summaries (`drops`) in their own modules.

mod affinity;
mod backlog;
mod claims;
pub mod conversations;
mod dispatch;
mod drops;

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use uuid::Uuid;

use self::affinity::Affinity;
use self::backlog::{Backlog, BacklogLimits};
pub use self::conversations::Claimed;
use self::conversations::{Conflict, Conversations};
use self::drops::{Reason, Tally};
use crate::codec::PeerConnection;
use crate::limits::{MAX_CONVERSATIONS, REFUSALS_QUEUED, ROUTER_SWEEP_EVERY};
use crate::status::Counters;

/// An inbound message as subscribers receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerMessage {
    pub peer: PeerConnection,
    /// The relay returned one of our own sends; `peer.error` says why.
    pub bounced: bool,
}

impl PeerMessage {
    /// The remote peer this message is about: its sender, or for a bounce
    /// the peer our message was meant for.
    fn remote(&self) -> Uuid {
        if self.bounced {
            self.peer.peer_uuid
        } else {
            self.peer.source_uuid
        }
    }

    /// A remote peer asking to start a connection.
    fn is_offer(&self) -> bool {
        !self.bounced && self.peer.error.is_none() && self.peer.description_type == "offer"
    }

    /// Sent by this host to itself (a worker to another, through the relay):
    /// there is no remote peer to answer with a refusal.
    fn is_self_addressed(&self) -> bool {
        !self.bounced && self.peer.source_uuid == self.peer.peer_uuid
    }

    /// What holding it costs, in bytes, for the byte budgets.
    fn cost(&self) -> usize {
        let p = &self.peer;
        std::mem::size_of::<PeerMessage>()
            + p.source_name.len()
            + p.description_type.len()
            + p.description.len()
            + p.error.as_ref().map_or(0, String::len)
    }
}

/// Who a local caller is: the request's `worker` label, else its process.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Worker(Arc<str>);

impl Worker {
    /// A worker named by its own label.
    pub fn label(label: &str) -> Worker {
        Worker(Arc::from(label))
    }

    /// A worker known only by its process id.
    pub fn process(pid: i32) -> Worker {
        Worker(Arc::from(format!("pid:{pid}")))
    }

    /// Callers that the daemon cannot tell apart (no label, no credentials).
    pub fn anonymous() -> Worker {
        Worker(Arc::from("anonymous"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What happens to an offer that arrives while nobody is subscribed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnclaimedOffers {
    /// Answered at once with an error, as if this host were not registered:
    /// a ProxyStore peer raises `PeerConnectionError` instead of waiting.
    #[default]
    Refuse,
    /// Kept in the backlog like any other message, for `backlog_ttl`.
    Backlog,
}

/// Queue sizes and times, from the daemon's settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages a subscriber may have waiting before it loses messages.
    pub subscriber_queue: usize,
    /// Bytes a subscriber may have waiting (one message is always let in).
    pub subscriber_queue_bytes: usize,
    /// Messages kept while nobody is subscribed.
    pub backlog: usize,
    /// Bytes kept while nobody is subscribed.
    pub backlog_bytes: usize,
    /// How long a message may wait in the backlog.
    pub backlog_ttl: Duration,
    /// How long a send to a peer binds that peer's replies to the sender.
    pub affinity: Duration,
    /// How long a conversation lasts after its last sign of life.
    pub conversation_ttl: Duration,
    /// What happens to an offer while nobody is subscribed.
    pub unclaimed_offers: UnclaimedOffers,
}

/// What a subscriber asks for.
#[derive(Debug, Clone, Default)]
pub struct Interest {
    /// Its delivery group; `None` is a group of its own.
    pub group: Option<String>,
    /// The group is this subscriber's alone while it is subscribed.
    pub exclusive: bool,
    /// A conversation subscription: only the conversations its worker holds.
    pub conversations: bool,
}

/// Why the router refused a caller's request. Each names the request field
/// it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    #[error("exclusive: a group is required to hold one exclusively")]
    ExclusiveWithoutGroup,
    #[error("group: {group:?} already has a subscriber, so it cannot be held exclusively")]
    GroupInUse { group: String },
    #[error("group: {group:?} is held exclusively by another subscriber until its stream ends")]
    GroupHeld { group: String },
    #[error(
        "conversation: worker {worker:?} has no open Subscribe with `conversations` set, so the peer's messages would have nowhere to go; subscribe first, with the same worker label"
    )]
    NoConversationSubscription { worker: String },
    #[error(
        "conversation: peer {peer} is in a conversation with worker {holder:?} on this host (for {seconds} s); retry once it ends, or ask to wait for it"
    )]
    Held {
        peer: Uuid,
        holder: String,
        seconds: u64,
    },
    #[error(
        "conversation: this host holds {MAX_CONVERSATIONS} conversations, the most it keeps; retry once some have ended"
    )]
    Full,
}

impl RouterError {
    fn conflict(peer: Uuid, conflict: Conflict) -> Self {
        match conflict {
            Conflict::Held { holder, for_ } => RouterError::Held {
                peer,
                holder: holder.as_str().to_owned(),
                seconds: for_.as_secs(),
            },
            Conflict::Full => RouterError::Full,
        }
    }
}

/// An offer the router turned down: its sender should hear so at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The remote peer that offered.
    pub peer: Uuid,
    pub why: RefusalReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// Nobody on this host is subscribed.
    NoWorker,
    /// Every conversation subscription's queue is full.
    Busy,
    /// The host holds [`MAX_CONVERSATIONS`].
    Full,
}

impl RefusalReason {
    /// The reason as the remote peer reads it.
    pub fn describe(self) -> &'static str {
        match self {
            RefusalReason::NoWorker => "no worker on this host takes peer connections now",
            RefusalReason::Busy => "every worker on this host that takes peer connections is busy",
            RefusalReason::Full => "this host is in as many conversations as it keeps",
        }
    }
}

/// The router: shared by the relay task (which dispatches), the gRPC
/// service (which subscribes and asks before sending) and the sweeper.
#[derive(Debug)]
pub struct Router {
    inner: Mutex<Inner>,
    counters: Arc<Counters>,
    limits: Limits,
    /// Woken whenever a conversation ends, for sends that wait for one.
    ended: Notify,
    refusals: mpsc::Sender<Refusal>,
}

#[derive(Debug)]
struct Inner {
    next_id: u64,
    /// Plain subscribers without a group: each is a group of its own.
    solo: Vec<Member>,
    /// Named plain groups that have members now.
    groups: Vec<Group>,
    /// Conversation subscribers, host-wide.
    conversers: Vec<Converser>,
    /// The conversation subscriber offered the next new conversation
    /// (modulo their count).
    next_converser: usize,
    backlog: Backlog,
    affinity: Affinity,
    conversations: Conversations,
    tally: Tally,
}

#[derive(Debug)]
struct Group {
    name: String,
    members: Vec<Member>,
    /// The member whose turn is next (modulo the member count).
    turn: usize,
    /// Held by its one member, which asked for it alone.
    exclusive: bool,
}

#[derive(Debug)]
struct Converser {
    member: Member,
    /// Only for `exclusive`: delivery to conversers is host-wide.
    group: Option<String>,
    exclusive: bool,
}

#[derive(Debug)]
struct Member {
    id: u64,
    worker: Worker,
    tx: mpsc::Sender<Arc<PeerMessage>>,
    /// Bytes in the queue; the subscription takes off what it reads.
    queued: Arc<AtomicUsize>,
}

/// How one try to hand a message to a member went.
enum Handed {
    Taken,
    Full,
    Closed,
}

impl Member {
    fn hand(&self, message: &Arc<PeerMessage>, cost: usize, budget: usize) -> Handed {
        let queued = self.queued.fetch_add(cost, Ordering::Relaxed);
        if queued > 0 && queued + cost > budget {
            self.queued.fetch_sub(cost, Ordering::Relaxed);
            return Handed::Full;
        }
        match self.tx.try_send(Arc::clone(message)) {
            Ok(()) => Handed::Taken,
            Err(e) => {
                self.queued.fetch_sub(cost, Ordering::Relaxed);
                match e {
                    mpsc::error::TrySendError::Full(_) => Handed::Full,
                    mpsc::error::TrySendError::Closed(_) => Handed::Closed,
                }
            }
        }
    }
}

impl Inner {
    fn is_empty(&self) -> bool {
        self.solo.is_empty() && self.groups.is_empty() && self.conversers.is_empty()
    }

    fn members(&self) -> impl Iterator<Item = &Member> {
        self.solo
            .iter()
            .chain(self.groups.iter().flat_map(|g| g.members.iter()))
            .chain(self.conversers.iter().map(|c| &c.member))
    }

    fn has_converser(&self, worker: &Worker) -> bool {
        self.conversers.iter().any(|c| &c.member.worker == worker)
    }

    /// Drops members whose stream is gone, and groups left empty.
    fn prune(&mut self, keep: impl Fn(&Member) -> bool) {
        self.solo.retain(&keep);
        for group in &mut self.groups {
            group.members.retain(&keep);
        }
        self.groups.retain(|g| !g.members.is_empty());
        self.conversers.retain(|c| keep(&c.member));
    }

    /// Refuses a subscription that would break a group's exclusivity.
    fn check_exclusive(&self, group: &str, exclusive: bool) -> Result<(), RouterError> {
        let plain = self.groups.iter().find(|g| g.name == group);
        let conversers = || {
            self.conversers
                .iter()
                .filter(|c| c.group.as_deref() == Some(group))
        };
        if plain.is_some_and(|g| g.exclusive) || conversers().any(|c| c.exclusive) {
            return Err(RouterError::GroupHeld {
                group: group.to_owned(),
            });
        }
        if exclusive && (plain.is_some() || conversers().next().is_some()) {
            return Err(RouterError::GroupInUse {
                group: group.to_owned(),
            });
        }
        Ok(())
    }
}

impl Router {
    /// The router, and the offers it refuses, for a task that answers them
    /// through the relay.
    pub fn new(limits: Limits, counters: Arc<Counters>) -> (Arc<Self>, mpsc::Receiver<Refusal>) {
        let (refusals, refused) = mpsc::channel(REFUSALS_QUEUED);
        let router = Arc::new(Router {
            inner: Mutex::new(Inner {
                next_id: 0,
                solo: Vec::new(),
                groups: Vec::new(),
                conversers: Vec::new(),
                next_converser: 0,
                backlog: Backlog::new(BacklogLimits {
                    messages: limits.backlog,
                    bytes: limits.backlog_bytes,
                    ttl: limits.backlog_ttl,
                }),
                affinity: Affinity::new(limits.affinity),
                conversations: Conversations::new(limits.conversation_ttl),
                tally: Tally::default(),
            }),
            counters,
            limits,
            ended: Notify::new(),
            refusals,
        });
        (router, refused)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain data behind;
        // keep routing rather than poison every later call.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Open subscriptions now.
    pub fn subscribers(&self) -> usize {
        self.lock().members().count()
    }

    /// Distinct workers with an open subscription now.
    pub fn workers(&self) -> usize {
        let inner = self.lock();
        let mut workers: Vec<&str> = inner.members().map(|m| m.worker.as_str()).collect();
        workers.sort_unstable();
        workers.dedup();
        workers.len()
    }

    /// Conversations held now.
    pub fn conversations(&self) -> usize {
        self.lock().conversations.live(Instant::now())
    }

    /// Adds a subscriber. The first subscriber also receives the backlog.
    pub fn subscribe(
        self: &Arc<Self>,
        interest: Interest,
        worker: Worker,
    ) -> Result<Subscription, RouterError> {
        let Interest {
            group,
            exclusive,
            conversations,
        } = interest;
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        match &group {
            None if exclusive => return Err(RouterError::ExclusiveWithoutGroup),
            None => {}
            Some(name) => inner.check_exclusive(name, exclusive)?,
        }
        let backlog = if inner.is_empty() {
            let (fresh, expired) = inner.backlog.take(now);
            inner
                .tally
                .drop(&self.counters, Reason::Expired, expired, now);
            fresh
        } else {
            Vec::new()
        };
        let (tx, rx) = mpsc::channel(self.limits.subscriber_queue + backlog.len());
        let id = inner.next_id;
        inner.next_id += 1;
        debug!(
            subscriber = id,
            worker = worker.as_str(),
            group = group.as_deref(),
            exclusive,
            conversations,
            "subscribed"
        );
        let queued = Arc::new(AtomicUsize::new(0));
        let member = Member {
            id,
            worker: worker.clone(),
            tx,
            queued: Arc::clone(&queued),
        };
        match group {
            _ if conversations => inner.conversers.push(Converser {
                member,
                group,
                exclusive,
            }),
            None => inner.solo.push(member),
            Some(name) => match inner.groups.iter_mut().find(|g| g.name == name) {
                Some(group) => group.members.push(member),
                None => inner.groups.push(Group {
                    name,
                    members: vec![member],
                    turn: 0,
                    exclusive,
                }),
            },
        }
        // The backlog goes the way it would have gone had this subscriber
        // been there: for a plain one, all of it.
        for (message, cost) in backlog {
            self.route(inner, message, cost, now);
        }
        Ok(Subscription {
            id,
            rx,
            queued,
            worker,
            conversations,
            router: Arc::clone(self),
        })
    }

    fn unsubscribe(&self, id: u64, worker: &Worker, conversations: bool) {
        let mut inner = self.lock();
        inner.prune(|m| m.id != id);
        debug!(subscriber = id, "unsubscribed");
        // The worker's last conversation subscription is gone (its process
        // may have died): nobody would get its peers' messages.
        if conversations && !inner.has_converser(worker) {
            let ended = inner.conversations.release_all(worker);
            drop(inner);
            if ended > 0 {
                debug!(
                    worker = worker.as_str(),
                    ended, "conversations ended with their holder's subscription"
                );
                self.ended.notify_waiters();
            }
        }
    }

    /// Sweeps expired backlog messages, bindings and conversations away
    /// every [`ROUTER_SWEEP_EVERY`], and logs drop summaries when they are due,
    /// until `shutdown`.
    pub async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(ROUTER_SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sweep_once(Instant::now()),
                () = shutdown.cancelled() => {
                    self.lock().tally.log(Instant::now());
                    return;
                }
            }
        }
    }

    fn sweep_once(&self, now: Instant) {
        let mut inner = self.lock();
        let expired = inner.backlog.expire(now);
        inner
            .tally
            .drop(&self.counters, Reason::Expired, expired, now);
        inner.affinity.prune(now);
        self.expire_conversations(&mut inner, now);
        inner.tally.log_if_due(now);
    }

    /// Ends the conversations whose time is up, counted.
    fn expire_conversations(&self, inner: &mut Inner, now: Instant) {
        let ended = inner.conversations.expire(now);
        if ended > 0 {
            Counters::add(&self.counters.conversations_expired, ended as u64);
            debug!(ended, "conversations expired");
            self.ended.notify_waiters();
        }
    }
}

/// One subscriber's stream of messages. Dropping it unsubscribes at once.
#[derive(Debug)]
pub struct Subscription {
    id: u64,
    rx: mpsc::Receiver<Arc<PeerMessage>>,
    queued: Arc<AtomicUsize>,
    worker: Worker,
    conversations: bool,
    router: Arc<Router>,
}

impl futures_util::Stream for Subscription {
    type Item = Arc<PeerMessage>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(message)) = &next {
            self.queued.fetch_sub(message.cost(), Ordering::Relaxed);
        }
        next
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.router
            .unsubscribe(self.id, &self.worker, self.conversations);
    }
}

#[cfg(test)]
mod tests;
