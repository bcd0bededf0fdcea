//! Hands inbound relay messages to local subscribers.
//!
//! Every group gets each message once: a subscriber without a group is a
//! group of its own, members of a named group take turns. Nothing here ever
//! waits: a full subscriber queue costs that subscriber the message (counted),
//! never the relay reader or another subscriber. While nobody is subscribed,
//! messages wait in a bounded backlog for the first subscriber.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::codec::PeerConnection;
use crate::status::Counters;

/// An inbound message as subscribers receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerMessage {
    pub peer: PeerConnection,
    /// The relay returned one of our own sends; `peer.error` says why.
    pub bounced: bool,
}

/// Queue sizes, from the daemon's settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages a subscriber may have waiting before it loses messages.
    pub subscriber_queue: usize,
    /// Messages kept while nobody is subscribed.
    pub backlog: usize,
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
    subscribers: Vec<Subscriber>,
    /// Turn-taking position per named group.
    turns: Vec<(String, usize)>,
    backlog: VecDeque<Arc<PeerMessage>>,
}

#[derive(Debug)]
struct Subscriber {
    id: u64,
    group: Option<String>,
    tx: mpsc::Sender<Arc<PeerMessage>>,
}

impl Router {
    pub fn new(limits: Limits, counters: Arc<Counters>) -> Arc<Self> {
        Arc::new(Router {
            inner: Mutex::new(Inner {
                next_id: 0,
                subscribers: Vec::new(),
                turns: Vec::new(),
                backlog: VecDeque::new(),
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
        self.lock().subscribers.len()
    }

    /// Adds a subscriber. The first subscriber also receives the backlog.
    pub fn subscribe(self: &Arc<Self>, group: Option<String>) -> Subscription {
        let mut inner = self.lock();
        let backlog = std::mem::take(&mut inner.backlog);
        let (tx, rx) = mpsc::channel(self.limits.subscriber_queue + backlog.len());
        for message in backlog {
            // Capacity was sized for the backlog, so this cannot fail.
            let _ = tx.try_send(message);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.subscribers.push(Subscriber { id, group, tx });
        debug!(subscriber = id, "subscribed");
        Subscription {
            id,
            rx,
            router: Arc::clone(self),
        }
    }

    fn unsubscribe(&self, id: u64) {
        let mut inner = self.lock();
        inner.subscribers.retain(|s| s.id != id);
        debug!(subscriber = id, "unsubscribed");
    }

    /// Delivers one inbound message. Never blocks.
    pub fn dispatch(&self, message: PeerMessage) {
        let message = Arc::new(message);
        let mut inner = self.lock();
        let inner = &mut *inner;
        if inner.subscribers.is_empty() {
            inner.backlog.push_back(message);
            if inner.backlog.len() > self.limits.backlog {
                inner.backlog.pop_front();
                Counters::add(&self.counters.dropped, 1);
                warn!(
                    limit = self.limits.backlog,
                    "no subscriber and the backlog is full: dropped the oldest message"
                );
            }
            return;
        }

        let mut delivered = 0;
        let mut dropped = 0;
        let mut closed = false;
        // Ungrouped subscribers each get the message.
        for sub in inner.subscribers.iter().filter(|s| s.group.is_none()) {
            match sub.tx.try_send(Arc::clone(&message)) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                Err(mpsc::error::TrySendError::Closed(_)) => closed = true,
            }
        }
        // Each named group gets it once, from the member whose turn it is;
        // when that member is full the next one takes it.
        let mut seen: Vec<&str> = Vec::new();
        for sub in &inner.subscribers {
            let Some(group) = sub.group.as_deref() else {
                continue;
            };
            if seen.contains(&group) {
                continue;
            }
            seen.push(group);
            let members: Vec<&Subscriber> = inner
                .subscribers
                .iter()
                .filter(|s| s.group.as_deref() == Some(group))
                .collect();
            let turn = match inner.turns.iter_mut().find(|(g, _)| g == group) {
                Some((_, turn)) => turn,
                None => {
                    inner.turns.push((group.to_owned(), 0));
                    &mut inner.turns.last_mut().expect("just pushed").1
                }
            };
            let start = *turn;
            let mut taken = false;
            for offset in 0..members.len() {
                let index = (start + offset) % members.len();
                match members[index].tx.try_send(Arc::clone(&message)) {
                    Ok(()) => {
                        *turn = index + 1;
                        taken = true;
                        break;
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => closed = true,
                }
            }
            if taken {
                delivered += 1;
            } else {
                dropped += 1;
            }
        }
        if closed {
            inner.subscribers.retain(|s| !s.tx.is_closed());
        }
        Counters::add(&self.counters.delivered, delivered);
        if dropped > 0 {
            Counters::add(&self.counters.dropped, dropped);
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
        PeerMessage {
            peer: PeerConnection {
                source_uuid: uuid::Uuid::nil(),
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
        };
        (Router::new(limits, Arc::clone(&counters)), counters)
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
        let mut sub = router.subscribe(None);
        assert_eq!(drain(&mut sub), ["2", "3", "4"]);
        assert_eq!(counters.snapshot().dropped, 2);
    }

    #[test]
    fn groups_share_and_ungrouped_see_everything() {
        let (router, counters) = router(100, 10);
        let mut a1 = router.subscribe(Some("a".into()));
        let mut a2 = router.subscribe(Some("a".into()));
        let mut solo = router.subscribe(None);
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
        let mut a1 = router.subscribe(Some("a".into()));
        let mut a2 = router.subscribe(Some("a".into()));
        for n in 0..3 {
            router.dispatch(message(n));
        }
        assert_eq!(drain(&mut a1), ["0"]);
        assert_eq!(drain(&mut a2), ["1"]);
        assert_eq!(counters.snapshot().dropped, 1);
    }

    #[tokio::test]
    async fn dropping_a_subscription_unsubscribes_at_once() {
        let (router, _) = router(4, 4);
        let mut sub = router.subscribe(None);
        router.dispatch(message(0));
        assert_eq!(sub.next().await.unwrap().peer.description, "0");
        assert_eq!(router.subscribers(), 1);
        drop(sub);
        assert_eq!(router.subscribers(), 0);
        // With nobody left, messages wait in the backlog again.
        router.dispatch(message(1));
        let mut next = router.subscribe(None);
        assert_eq!(drain(&mut next), ["1"]);
    }
}
