//! Conversation leases: which local worker holds the conversation with a
//! remote peer.
//!
//! A remote ProxyStore peer keys its side of a WebRTC exchange by the pair
//! of uuids, and every local worker shares this host's uuid: two local
//! workers talking to one remote at once are one conversation to it, and
//! break both ends. So the conversation with peer P is leased to one worker
//! at a time, host-wide. A lease lives `conversation_ttl` after the last
//! sign of life (a message either way, or an explicit renewal) and ends
//! earlier when its holder releases it, when the holder's last conversation
//! subscription ends, or when a message about P carries an error (the relay
//! could not reach P, or P refused).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use super::Worker;
use crate::limits::MAX_CONVERSATIONS;

#[derive(Debug, Clone)]
pub struct Lease {
    pub holder: Worker,
    /// When the holder got it.
    pub since: Instant,
    /// When it ends unless renewed.
    pub until: Instant,
}

/// Why a worker cannot have a conversation now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// Another worker holds it.
    Held { holder: Worker, for_: Duration },
    /// The host holds [`MAX_CONVERSATIONS`] already.
    Full,
}

/// How a claim went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// The worker did not hold it before.
    New,
    /// The worker held it already; renewed.
    Renewed,
}

#[derive(Debug)]
pub struct Conversations {
    ttl: Duration,
    leases: HashMap<Uuid, Lease>,
}

impl Conversations {
    pub fn new(ttl: Duration) -> Self {
        Conversations {
            ttl,
            leases: HashMap::new(),
        }
    }

    /// The worker holding `peer`'s conversation now, if any.
    pub fn holder(&self, peer: Uuid, now: Instant) -> Option<&Worker> {
        self.leases
            .get(&peer)
            .filter(|lease| lease.until > now)
            .map(|lease| &lease.holder)
    }

    /// Whether `worker` may write to `peer` now: nobody else holds it.
    pub fn check(&self, worker: &Worker, peer: Uuid, now: Instant) -> Result<(), Conflict> {
        match self.leases.get(&peer) {
            Some(lease) if lease.until > now && &lease.holder != worker => Err(Conflict::Held {
                holder: lease.holder.clone(),
                for_: now.duration_since(lease.since),
            }),
            _ => Ok(()),
        }
    }

    /// Gives `peer`'s conversation to `worker`, or renews it if it holds it.
    pub fn claim(
        &mut self,
        worker: &Worker,
        peer: Uuid,
        now: Instant,
    ) -> Result<Claimed, Conflict> {
        self.check(worker, peer, now)?;
        let until = now + self.ttl;
        let full = self.leases.len() >= MAX_CONVERSATIONS;
        match self.leases.get_mut(&peer) {
            Some(lease) if lease.until > now => {
                lease.until = until;
                return Ok(Claimed::Renewed);
            }
            Some(_) => {}
            None if full => return Err(Conflict::Full),
            None => {}
        }
        self.leases.insert(
            peer,
            Lease {
                holder: worker.clone(),
                since: now,
                until,
            },
        );
        Ok(Claimed::New)
    }

    /// Pushes the end of `peer`'s lease back: there was traffic.
    pub fn renew(&mut self, peer: Uuid, now: Instant) {
        if let Some(lease) = self.leases.get_mut(&peer)
            && lease.until > now
        {
            lease.until = now + self.ttl;
        }
    }

    /// Ends `peer`'s lease, whoever holds it.
    pub fn end(&mut self, peer: Uuid) -> Option<Lease> {
        self.leases.remove(&peer)
    }

    /// Ends `peer`'s lease if `worker` holds it.
    pub fn release(&mut self, worker: &Worker, peer: Uuid) -> bool {
        if self.leases.get(&peer).is_some_and(|l| &l.holder == worker) {
            self.leases.remove(&peer);
            true
        } else {
            false
        }
    }

    /// Ends every lease `worker` holds; returns how many.
    pub fn release_all(&mut self, worker: &Worker) -> usize {
        let before = self.leases.len();
        self.leases.retain(|_, lease| &lease.holder != worker);
        before - self.leases.len()
    }

    /// Ends the leases whose time is up; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.leases.len();
        self.leases.retain(|_, lease| lease.until > now);
        before - self.leases.len()
    }

    /// Leases held now (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Leases that have not expired.
    pub fn live(&self, now: Instant) -> usize {
        self.leases.values().filter(|l| l.until > now).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_holder_at_a_time_until_release_or_expiry() {
        let mut table = Conversations::new(Duration::from_secs(60));
        let (a, b) = (Worker::label("a"), Worker::label("b"));
        let peer = Uuid::new_v4();
        let start = Instant::now();
        assert_eq!(table.claim(&a, peer, start), Ok(Claimed::New));
        assert_eq!(table.claim(&a, peer, start), Ok(Claimed::Renewed));
        let later = start + Duration::from_secs(5);
        assert_eq!(
            table.claim(&b, peer, later),
            Err(Conflict::Held {
                holder: a.clone(),
                for_: Duration::from_secs(5)
            })
        );
        assert!(!table.release(&b, peer), "only the holder releases");
        assert!(table.release(&a, peer));
        assert_eq!(table.claim(&b, peer, later), Ok(Claimed::New));

        // Traffic renews; silence ends it.
        table.renew(peer, start + Duration::from_secs(50));
        assert_eq!(table.expire(start + Duration::from_secs(100)), 0);
        assert_eq!(
            table.holder(peer, start + Duration::from_secs(109)),
            Some(&b)
        );
        assert_eq!(table.holder(peer, start + Duration::from_secs(110)), None);
        assert_eq!(
            table.claim(&a, peer, start + Duration::from_secs(110)),
            Ok(Claimed::New)
        );
        assert_eq!(table.expire(start + Duration::from_secs(200)), 1);
        assert_eq!(table.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded() {
        let mut table = Conversations::new(Duration::from_secs(60));
        let now = Instant::now();
        let w = Worker::label("w");
        for _ in 0..MAX_CONVERSATIONS {
            table.claim(&w, Uuid::new_v4(), now).unwrap();
        }
        assert_eq!(table.claim(&w, Uuid::new_v4(), now), Err(Conflict::Full));
        assert_eq!(table.release_all(&w), MAX_CONVERSATIONS);
    }
}
