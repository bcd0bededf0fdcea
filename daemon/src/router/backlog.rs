//! Messages kept while nobody is subscribed, for the first subscriber:
//! bounded by count and by bytes (a remote peer chooses how big its
//! messages are), and each kept at most `backlog_ttl` (a WebRTC offer that
//! has waited longer than its sender does is worse than none).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::PeerMessage;

/// What is kept, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BacklogLimits {
    pub messages: usize,
    pub bytes: usize,
    pub ttl: Duration,
}

#[derive(Debug)]
struct Waiting {
    message: Arc<PeerMessage>,
    cost: usize,
    until: Instant,
}

#[derive(Debug)]
pub struct Backlog {
    limits: BacklogLimits,
    queue: VecDeque<Waiting>,
    bytes: usize,
}

/// What a push or an expiry cost.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Lost {
    /// Pushed out by newer messages, over the count or the bytes.
    pub overflow: u64,
    /// Older than `ttl`.
    pub expired: u64,
}

impl Backlog {
    pub fn new(limits: BacklogLimits) -> Self {
        Backlog {
            limits,
            queue: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Keeps `message` (which costs `cost` bytes), dropping the oldest until
    /// both bounds hold again.
    pub fn push(&mut self, message: Arc<PeerMessage>, cost: usize, now: Instant) -> Lost {
        let mut lost = Lost {
            overflow: 0,
            expired: self.expire(now),
        };
        self.queue.push_back(Waiting {
            message,
            cost,
            until: now + self.limits.ttl,
        });
        self.bytes += cost;
        while self.queue.len() > self.limits.messages || self.bytes > self.limits.bytes {
            let Some(oldest) = self.queue.pop_front() else {
                break;
            };
            self.bytes -= oldest.cost;
            lost.overflow += 1;
        }
        lost
    }

    /// Drops what has waited too long; returns how many.
    pub fn expire(&mut self, now: Instant) -> u64 {
        let mut expired = 0;
        while self.queue.front().is_some_and(|w| w.until <= now) {
            let gone = self.queue.pop_front().expect("front exists");
            self.bytes -= gone.cost;
            expired += 1;
        }
        expired
    }

    /// Everything still fresh, oldest first, and how many had expired.
    pub fn take(&mut self, now: Instant) -> (Vec<(Arc<PeerMessage>, usize)>, u64) {
        let expired = self.expire(now);
        self.bytes = 0;
        let fresh = self.queue.drain(..).map(|w| (w.message, w.cost)).collect();
        (fresh, expired)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::PeerConnection;

    fn message(n: usize) -> Arc<PeerMessage> {
        Arc::new(PeerMessage {
            peer: PeerConnection {
                source_uuid: uuid::Uuid::nil(),
                source_name: "peer".into(),
                peer_uuid: uuid::Uuid::nil(),
                description_type: "offer".into(),
                description: n.to_string(),
                error: None,
            },
            bounced: false,
        })
    }

    fn numbers(taken: Vec<(Arc<PeerMessage>, usize)>) -> Vec<String> {
        taken
            .into_iter()
            .map(|(m, _)| m.peer.description.clone())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_bound_it_as_well_as_count() {
        let mut backlog = Backlog::new(BacklogLimits {
            messages: 100,
            bytes: 1000,
            ttl: Duration::from_secs(10),
        });
        let now = Instant::now();
        let mut lost = Lost::default();
        for n in 0..5 {
            let l = backlog.push(message(n), 300, now);
            lost.overflow += l.overflow;
        }
        // Three of 300 bytes fit in 1000.
        assert_eq!(lost.overflow, 2);
        assert_eq!(numbers(backlog.take(now).0), ["2", "3", "4"]);
    }

    #[tokio::test(start_paused = true)]
    async fn messages_expire_after_the_ttl() {
        let mut backlog = Backlog::new(BacklogLimits {
            messages: 100,
            bytes: 1 << 20,
            ttl: Duration::from_secs(10),
        });
        let start = Instant::now();
        backlog.push(message(0), 10, start);
        backlog.push(message(1), 10, start + Duration::from_secs(5));
        assert_eq!(backlog.expire(start + Duration::from_secs(9)), 0);
        let (fresh, expired) = backlog.take(start + Duration::from_secs(10));
        assert_eq!((numbers(fresh), expired), (vec!["1".to_owned()], 1));
        assert_eq!((backlog.len(), backlog.bytes), (0, 0));
    }
}
