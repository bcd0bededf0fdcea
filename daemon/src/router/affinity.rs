//! Reply affinity for plain subscriptions: which worker last sent to a
//! remote peer, and until when its replies prefer that worker. Keyed by
//! what callers choose (peer uuids, worker labels), so it is bounded in
//! entries ([`MAX_AFFINITY_ENTRIES`]) and forgets expired entries as it
//! goes.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use super::Worker;
use crate::limits::MAX_AFFINITY_ENTRIES;

#[derive(Debug)]
pub struct Affinity {
    ttl: Duration,
    bindings: HashMap<Uuid, (Worker, Instant)>,
    /// Every bound peer once, roughly in order of expiry: the expiry it had
    /// when queued, which a later send may have pushed back.
    order: VecDeque<(Uuid, Instant)>,
}

impl Affinity {
    pub fn new(ttl: Duration) -> Self {
        Affinity {
            ttl,
            bindings: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Binds `peer`'s replies to `worker` until `now + ttl`.
    pub fn bind(&mut self, worker: &Worker, peer: Uuid, now: Instant) {
        self.prune(now);
        let until = now + self.ttl;
        if let Some(binding) = self.bindings.get_mut(&peer) {
            *binding = (worker.clone(), until);
            return;
        }
        if self.bindings.len() >= MAX_AFFINITY_ENTRIES
            && let Some((oldest, _)) = self.order.pop_front()
        {
            self.bindings.remove(&oldest);
        }
        self.bindings.insert(peer, (worker.clone(), until));
        self.order.push_back((peer, until));
    }

    /// The worker `peer`'s replies prefer now, if any.
    pub fn preferred(&self, peer: Uuid, now: Instant) -> Option<&Worker> {
        match self.bindings.get(&peer) {
            Some((worker, until)) if *until > now => Some(worker),
            _ => None,
        }
    }

    /// Forgets bindings that have expired. Each call costs one step per
    /// binding that is due, so calling it at every send keeps the table as
    /// small as the set of peers talked to recently.
    pub fn prune(&mut self, now: Instant) {
        while let Some(&(peer, queued_until)) = self.order.front() {
            if queued_until > now {
                return;
            }
            self.order.pop_front();
            match self.bindings.get(&peer) {
                // Renewed since it was queued: queue it again at its expiry.
                Some(&(_, until)) if until > now => self.order.push_back((peer, until)),
                Some(_) => {
                    self.bindings.remove(&peer);
                }
                None => {}
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.bindings.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bindings_expire_and_renew() {
        let mut table = Affinity::new(Duration::from_secs(60));
        let (w1, w2) = (Worker::label("w1"), Worker::label("w2"));
        let (p1, p2) = (Uuid::new_v4(), Uuid::new_v4());
        let start = Instant::now();
        table.bind(&w1, p1, start);
        table.bind(&w2, p2, start + Duration::from_secs(30));
        // A later send renews p1's binding and moves it to w2.
        table.bind(&w2, p1, start + Duration::from_secs(50));
        let later = start + Duration::from_secs(61);
        table.prune(later);
        assert_eq!(table.preferred(p1, later), Some(&w2));
        assert_eq!(table.len(), 2);
        let much_later = start + Duration::from_secs(111);
        table.prune(much_later);
        assert_eq!(table.len(), 0);
        assert_eq!(table.order.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_never_holds_more_than_its_bound() {
        let mut table = Affinity::new(Duration::from_secs(60));
        let now = Instant::now();
        let first = Uuid::new_v4();
        table.bind(&Worker::label("w"), first, now);
        for _ in 0..MAX_AFFINITY_ENTRIES * 3 {
            table.bind(&Worker::label("w"), Uuid::new_v4(), now);
        }
        assert_eq!(table.len(), MAX_AFFINITY_ENTRIES);
        assert_eq!(table.order.len(), MAX_AFFINITY_ENTRIES);
        assert_eq!(table.preferred(first, now), None, "the oldest goes first");
    }
}
