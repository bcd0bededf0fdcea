//! Hands inbound relay messages to local subscribers.
//!
//! Every group gets each message once: a subscriber without a group is a
//! group of its own, members of a named group take turns. Reply affinity
//! comes first: after worker W sent to peer P, messages from P (and the
//! relay's returns of W's sends to P) go to W's subscription in each group.
//! Nothing here ever waits: a full subscriber queue passes the message to
//! another member of its group, or costs that group the message (counted),
//! never the relay reader or another subscriber. While nobody is subscribed,
//! messages wait in a bounded backlog for the first subscriber.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::codec::PeerConnection;
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

/// Queue sizes and times, from the daemon's settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages a subscriber may have waiting before it loses messages.
    pub subscriber_queue: usize,
    /// Messages kept while nobody is subscribed.
    pub backlog: usize,
    /// How long a send to a peer binds that peer's replies to the sender.
    pub affinity: Duration,
}

/// The router: shared by the relay task (which dispatches) and the gRPC
/// service (which subscribes).
#[derive(Debug)]
pub struct Router {
    inner: Mutex<Inner>,
    counters: Arc<Counters>,
    limits: Limits,
}

#[derive(Debug)]
struct Inner {
    next_id: u64,
    /// Subscribers without a group: each is a group of its own.
    solo: Vec<Member>,
    /// Named groups that have members now.
    groups: Vec<Group>,
    backlog: VecDeque<Arc<PeerMessage>>,
    /// Remote peer -> the worker that last sent to it, and until when.
    affinity: HashMap<Uuid, (Worker, Instant)>,
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

/// What a subscriber asks for.
#[derive(Debug, Clone, Default)]
pub struct Interest {
    /// Its delivery group; `None` is a group of its own.
    pub group: Option<String>,
    /// The group is this subscriber's alone while it is subscribed.
    pub exclusive: bool,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("exclusive: a group is required to hold one exclusively")]
    ExclusiveWithoutGroup,
    #[error("group: {group:?} already has a subscriber, so it cannot be held exclusively")]
    GroupInUse { group: String },
    #[error("group: {group:?} is held exclusively by another subscriber until its stream ends")]
    GroupHeld { group: String },
}

#[derive(Debug)]
struct Member {
    id: u64,
    worker: Worker,
    tx: mpsc::Sender<Arc<PeerMessage>>,
}

/// How one try to hand a message to a member went.
enum Handed {
    Taken,
    Full,
    Closed,
}

impl Member {
    fn hand(&self, message: &Arc<PeerMessage>) -> Handed {
        match self.tx.try_send(Arc::clone(message)) {
            Ok(()) => Handed::Taken,
            Err(mpsc::error::TrySendError::Full(_)) => Handed::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => Handed::Closed,
        }
    }
}

impl Inner {
    fn members(&self) -> impl Iterator<Item = &Member> {
        self.solo
            .iter()
            .chain(self.groups.iter().flat_map(|g| g.members.iter()))
    }

    /// Drops members whose stream is gone, and groups left empty.
    fn prune(&mut self, keep: impl Fn(&Member) -> bool) {
        self.solo.retain(&keep);
        for group in &mut self.groups {
            group.members.retain(&keep);
        }
        self.groups.retain(|g| !g.members.is_empty());
    }
}

impl Router {
    pub fn new(limits: Limits, counters: Arc<Counters>) -> Arc<Self> {
        Arc::new(Router {
            inner: Mutex::new(Inner {
                next_id: 0,
                solo: Vec::new(),
                groups: Vec::new(),
                backlog: VecDeque::new(),
                affinity: HashMap::new(),
            }),
            counters,
            limits,
        })
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

    /// Records that `worker` is sending to `peer`: the peer's replies (and
    /// the relay's returns of this send) prefer that worker for a while.
    /// Called before the message is written, since a reply can be quick.
    pub fn note_send(&self, worker: &Worker, peer: Uuid) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner
            .affinity
            .insert(peer, (worker.clone(), now + self.limits.affinity));
        // Forget expired bindings now and then, so the map stays as small as
        // the set of peers talked to recently.
        if inner.affinity.len() > 1024 && inner.affinity.len().is_power_of_two() {
            inner.affinity.retain(|_, (_, until)| *until > now);
        }
    }

    /// Adds a subscriber. The first subscriber also receives the backlog.
    pub fn subscribe(
        self: &Arc<Self>,
        interest: Interest,
        worker: Worker,
    ) -> Result<Subscription, SubscribeError> {
        let Interest { group, exclusive } = interest;
        let mut inner = self.lock();
        match (&group, exclusive) {
            (None, true) => return Err(SubscribeError::ExclusiveWithoutGroup),
            (None, false) => {}
            (Some(name), _) => match inner.groups.iter().find(|g| &g.name == name) {
                Some(g) if g.exclusive => {
                    return Err(SubscribeError::GroupHeld {
                        group: name.clone(),
                    });
                }
                Some(_) if exclusive => {
                    return Err(SubscribeError::GroupInUse {
                        group: name.clone(),
                    });
                }
                _ => {}
            },
        }
        let backlog = std::mem::take(&mut inner.backlog);
        let (tx, rx) = mpsc::channel(self.limits.subscriber_queue + backlog.len());
        for message in backlog {
            // Capacity was sized for the backlog, so this cannot fail.
            let _ = tx.try_send(message);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        debug!(
            subscriber = id,
            worker = worker.as_str(),
            group = group.as_deref(),
            exclusive,
            "subscribed"
        );
        let member = Member { id, worker, tx };
        match group {
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
        Ok(Subscription {
            id,
            rx,
            router: Arc::clone(self),
        })
    }

    fn unsubscribe(&self, id: u64) {
        self.lock().prune(|m| m.id != id);
        debug!(subscriber = id, "unsubscribed");
    }

    /// Delivers one inbound message. Never blocks, never allocates beyond
    /// the message itself.
    pub fn dispatch(&self, message: PeerMessage) {
        let message = Arc::new(message);
        let mut inner = self.lock();
        let inner = &mut *inner;
        if inner.solo.is_empty() && inner.groups.is_empty() {
            inner.backlog.push_back(message);
            if inner.backlog.len() > self.limits.backlog {
                inner.backlog.pop_front();
                Counters::add(&self.counters.dropped_no_subscriber, 1);
                warn!(
                    limit = self.limits.backlog,
                    "no subscriber and the backlog is full: dropped the oldest message"
                );
            }
            return;
        }

        let preferred = match inner.affinity.get(&message.remote()) {
            Some((worker, until)) if *until > Instant::now() => Some(worker),
            _ => None,
        };
        let mut delivered = 0;
        let mut dropped = 0;
        let mut closed = false;
        // Ungrouped subscribers each get the message.
        for member in &inner.solo {
            match member.hand(&message) {
                Handed::Taken => delivered += 1,
                Handed::Full => dropped += 1,
                Handed::Closed => closed = true,
            }
        }
        // Each named group gets it once: from the preferred worker's
        // subscription if it has one there, else from the member whose turn
        // it is; a full member passes it on to the next.
        for group in &mut inner.groups {
            let count = group.members.len();
            let affine = preferred.and_then(|w| group.members.iter().position(|m| &m.worker == w));
            let start = affine.unwrap_or(group.turn);
            let mut taken = false;
            for offset in 0..count {
                let index = (start + offset) % count;
                match group.members[index].hand(&message) {
                    Handed::Taken => {
                        if affine.is_none() {
                            group.turn = index + 1;
                        }
                        taken = true;
                        break;
                    }
                    Handed::Full => {}
                    Handed::Closed => closed = true,
                }
            }
            if taken {
                delivered += 1;
            } else {
                dropped += 1;
            }
        }
        if closed {
            inner.prune(|m| !m.tx.is_closed());
        }
        Counters::add(&self.counters.delivered, delivered);
        if dropped > 0 {
            Counters::add(&self.counters.dropped_queue_full, dropped);
            warn!(dropped, "subscriber queue full: message dropped");
        }
    }
}

/// One subscriber's stream of messages. Dropping it unsubscribes at once.
#[derive(Debug)]
pub struct Subscription {
    id: u64,
    rx: mpsc::Receiver<Arc<PeerMessage>>,
    router: Arc<Router>,
}

impl futures_util::Stream for Subscription {
    type Item = Arc<PeerMessage>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.router.unsubscribe(self.id);
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn message(n: usize) -> PeerMessage {
        from(Uuid::nil(), n)
    }

    fn from(source: Uuid, n: usize) -> PeerMessage {
        PeerMessage {
            peer: PeerConnection {
                source_uuid: source,
                source_name: "peer".into(),
                peer_uuid: uuid::Uuid::nil(),
                description_type: "offer".into(),
                description: n.to_string(),
                error: None,
            },
            bounced: false,
        }
    }

    fn router(subscriber_queue: usize, backlog: usize) -> (Arc<Router>, Arc<Counters>) {
        let counters = Arc::new(Counters::default());
        let limits = Limits {
            subscriber_queue,
            backlog,
            affinity: Duration::from_secs(60),
        };
        (Router::new(limits, Arc::clone(&counters)), counters)
    }

    fn join(router: &Arc<Router>, group: Option<String>, worker: Worker) -> Subscription {
        let interest = Interest {
            group,
            ..Interest::default()
        };
        router.subscribe(interest, worker).unwrap()
    }

    fn drain(sub: &mut Subscription) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(m) = sub.rx.try_recv() {
            out.push(m.peer.description.clone());
        }
        out
    }

    #[test]
    fn backlog_goes_to_the_first_subscriber_and_drops_the_oldest() {
        let (router, counters) = router(8, 3);
        for n in 0..5 {
            router.dispatch(message(n));
        }
        let mut sub = join(&router, None, Worker::label("w"));
        assert_eq!(drain(&mut sub), ["2", "3", "4"]);
        assert_eq!(counters.snapshot().dropped_no_subscriber, 2);
    }

    #[test]
    fn groups_share_and_ungrouped_see_everything() {
        let (router, counters) = router(100, 10);
        let mut a1 = join(&router, Some("a".into()), Worker::process(1));
        let mut a2 = join(&router, Some("a".into()), Worker::process(1));
        let mut solo = join(&router, None, Worker::label("w"));
        for n in 0..10 {
            router.dispatch(message(n));
        }
        let (got1, got2) = (drain(&mut a1), drain(&mut a2));
        assert_eq!(got1.len() + got2.len(), 10);
        assert_eq!(got1, ["0", "2", "4", "6", "8"]);
        assert_eq!(drain(&mut solo).len(), 10);
        assert_eq!(counters.snapshot().delivered, 20);
    }

    #[test]
    fn full_member_passes_its_turn_and_full_group_counts_a_drop() {
        let (router, counters) = router(1, 10);
        let mut a1 = join(&router, Some("a".into()), Worker::process(1));
        let mut a2 = join(&router, Some("a".into()), Worker::process(1));
        for n in 0..3 {
            router.dispatch(message(n));
        }
        assert_eq!(drain(&mut a1), ["0"]);
        assert_eq!(drain(&mut a2), ["1"]);
        assert_eq!(counters.snapshot().dropped_queue_full, 1);
    }

    #[tokio::test]
    async fn dropping_a_subscription_unsubscribes_at_once() {
        let (router, _) = router(4, 4);
        let mut sub = join(&router, None, Worker::label("w"));
        router.dispatch(message(0));
        assert_eq!(sub.next().await.unwrap().peer.description, "0");
        assert_eq!(router.subscribers(), 1);
        drop(sub);
        assert_eq!(router.subscribers(), 0);
        // With nobody left, messages wait in the backlog again.
        router.dispatch(message(1));
        let mut next = join(&router, None, Worker::label("w"));
        assert_eq!(drain(&mut next), ["1"]);
    }

    #[test]
    fn replies_follow_the_worker_that_sent_and_fall_back_when_it_leaves() {
        let (router, _) = router(100, 10);
        let (p1, p2) = (Uuid::new_v4(), Uuid::new_v4());
        let (w1, w2) = (Worker::label("w1"), Worker::label("w2"));
        let mut s1 = join(&router, Some("g".into()), w1.clone());
        let mut s2 = join(&router, Some("g".into()), w2.clone());
        let mut other_group = join(&router, Some("h".into()), Worker::label("x"));
        router.note_send(&w1, p1);
        router.note_send(&w2, p2);
        for n in 0..4 {
            router.dispatch(from(p1, n));
            router.dispatch(from(p2, 10 + n));
        }
        assert_eq!(drain(&mut s1), ["0", "1", "2", "3"]);
        assert_eq!(drain(&mut s2), ["10", "11", "12", "13"]);
        // Another group still gets every message once.
        assert_eq!(drain(&mut other_group).len(), 8);

        // A bounce of w2's send to p1 would be keyed by p1; the latest send wins.
        router.note_send(&w2, p1);
        router.dispatch(from(p1, 20));
        assert_eq!(drain(&mut s2), ["20"]);

        // w2 leaves: its peers' messages go to the rest of the group.
        drop(s2);
        router.dispatch(from(p2, 30));
        assert_eq!(drain(&mut s1), ["30"]);
    }

    #[tokio::test(start_paused = true)]
    async fn affinity_expires() {
        let (router, _) = router(100, 10);
        let peer = Uuid::new_v4();
        let mut s1 = join(&router, Some("g".into()), Worker::label("w1"));
        let mut s2 = join(&router, Some("g".into()), Worker::label("w2"));
        router.note_send(&Worker::label("w2"), peer);
        router.dispatch(from(peer, 0));
        assert_eq!(drain(&mut s2), ["0"]);
        tokio::time::advance(Duration::from_secs(61)).await;
        // Back to taking turns: w1's turn comes first.
        router.dispatch(from(peer, 1));
        router.dispatch(from(peer, 2));
        assert_eq!(drain(&mut s1), ["1"]);
        assert_eq!(drain(&mut s2), ["2"]);
    }

    #[test]
    fn a_group_is_forgotten_when_its_last_member_leaves() {
        let (router, _) = router(4, 4);
        for n in 0..100 {
            drop(join(
                &router,
                Some(format!("group-{n}")),
                Worker::process(n),
            ));
        }
        let inner = router.lock();
        assert!(inner.groups.is_empty() && inner.solo.is_empty());
    }

    #[test]
    fn an_exclusive_group_admits_one_subscriber_until_it_leaves() {
        let (router, _) = router(4, 4);
        let exclusive = |group: &str| Interest {
            group: Some(group.into()),
            exclusive: true,
        };
        assert_eq!(
            router
                .subscribe(
                    Interest {
                        group: None,
                        exclusive: true
                    },
                    Worker::label("e")
                )
                .unwrap_err(),
            SubscribeError::ExclusiveWithoutGroup
        );
        let held = router
            .subscribe(exclusive("endpoint"), Worker::label("e1"))
            .unwrap();
        for interest in [
            exclusive("endpoint"),
            Interest {
                group: Some("endpoint".into()),
                exclusive: false,
            },
        ] {
            assert_eq!(
                router.subscribe(interest, Worker::label("e2")).unwrap_err(),
                SubscribeError::GroupHeld {
                    group: "endpoint".into()
                }
            );
        }
        // Other groups are not affected.
        let _other = router
            .subscribe(exclusive("other"), Worker::label("o"))
            .unwrap();
        drop(held);
        let shared = join(&router, Some("endpoint".into()), Worker::label("s"));
        assert_eq!(
            router
                .subscribe(exclusive("endpoint"), Worker::label("e3"))
                .unwrap_err(),
            SubscribeError::GroupInUse {
                group: "endpoint".into()
            }
        );
        drop(shared);
        let _again = router
            .subscribe(exclusive("endpoint"), Worker::label("e4"))
            .unwrap();
    }
}
