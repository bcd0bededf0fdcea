//! The daemon's own view of its relay link: the connection state machine's
//! states, the published link status, and the message counters.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

/// The state of the relay connection. Transitions happen only in
/// [`crate::relay::Connection`], which logs and publishes each one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Lazy mode: nothing opened yet.
    Idle,
    /// WebSocket handshake and registration under way.
    Connecting,
    /// Registered: messages flow.
    Registered,
    /// Waiting to retry after a failure.
    Backoff,
    /// Unrecoverable until `Reconnect` or a restart.
    Failed,
    /// The daemon is shutting down.
    Stopping,
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectionState::Idle => "idle",
            ConnectionState::Connecting => "connecting",
            ConnectionState::Registered => "registered",
            ConnectionState::Backoff => "backoff",
            ConnectionState::Failed => "failed",
            ConnectionState::Stopping => "stopping",
        })
    }
}

/// What the relay task publishes at every transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    pub state: ConnectionState,
    /// Close code of the last lost connection, if one was seen.
    pub close_code: Option<u16>,
    /// Why the link is in this state (close reason, error, refusal).
    pub detail: String,
    /// Failed attempts and lost connections since the last registration
    /// that stayed up; the retry delay grows with it.
    pub attempt: u32,
    /// When the next attempt starts, in `Backoff`.
    pub retry_at: Option<Instant>,
}

impl LinkStatus {
    pub fn new(state: ConnectionState) -> Self {
        LinkStatus {
            state,
            close_code: None,
            detail: String::new(),
            attempt: 0,
            retry_at: None,
        }
    }
}

/// Message counters, shared by the relay task, the router and the service.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub bounced: AtomicU64,
    /// Dropped because the backlog was full while nobody was subscribed.
    pub dropped_no_subscriber: AtomicU64,
    /// Dropped for a group because every member's queue was full, or
    /// because the queue of a conversation's holder was full.
    pub dropped_queue_full: AtomicU64,
    /// Dropped because they waited in the backlog longer than its ttl.
    pub dropped_expired: AtomicU64,
    /// Dropped because only conversation subscribers were there and the
    /// message belonged to no conversation.
    pub dropped_no_conversation: AtomicU64,
    /// Offers from remote peers answered with a refusal.
    pub offers_refused: AtomicU64,
    /// Sends and holds refused because another worker held the peer's
    /// conversation.
    pub conversation_conflicts: AtomicU64,
    /// Conversations ended by their time-to-live.
    pub conversations_expired: AtomicU64,
    pub delivered: AtomicU64,
    /// Round trips through the relay (probes back) that confirmed sends.
    pub confirmations: AtomicU64,
    pub reconnects: AtomicU64,
    pub undecodable: AtomicU64,
}

/// A copy of [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub sent: u64,
    pub received: u64,
    pub bounced: u64,
    pub dropped_no_subscriber: u64,
    pub dropped_queue_full: u64,
    pub dropped_expired: u64,
    pub dropped_no_conversation: u64,
    pub offers_refused: u64,
    pub conversation_conflicts: u64,
    pub conversations_expired: u64,
    pub delivered: u64,
    pub confirmations: u64,
    pub reconnects: u64,
    pub undecodable: u64,
}

impl CounterSnapshot {
    /// Every inbound message dropped, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_no_subscriber
            + self.dropped_queue_full
            + self.dropped_expired
            + self.dropped_no_conversation
    }
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            sent: get(&self.sent),
            received: get(&self.received),
            bounced: get(&self.bounced),
            dropped_no_subscriber: get(&self.dropped_no_subscriber),
            dropped_queue_full: get(&self.dropped_queue_full),
            dropped_expired: get(&self.dropped_expired),
            dropped_no_conversation: get(&self.dropped_no_conversation),
            offers_refused: get(&self.offers_refused),
            conversation_conflicts: get(&self.conversation_conflicts),
            conversations_expired: get(&self.conversations_expired),
            delivered: get(&self.delivered),
            confirmations: get(&self.confirmations),
            reconnects: get(&self.reconnects),
            undecodable: get(&self.undecodable),
        }
    }
}
