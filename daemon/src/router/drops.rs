//! What the router loses, counted by reason, and said in the log as one
//! summary per [`LOG_SUMMARY_INTERVAL`] rather than a line per message: a
//! remote peer or a stalled subscriber can cause millions of drops, and a
//! log line each would cost more than the messages did.

use std::fmt::Write as _;

use tokio::time::Instant;
use tracing::warn;

use crate::limits::LOG_SUMMARY_INTERVAL;
use crate::status::Counters;

/// Why an inbound message went to nobody.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Nobody was subscribed and the backlog was over its count or bytes.
    NoSubscriber,
    /// The queue of every subscriber that could take it was full.
    QueueFull,
    /// It waited in the backlog longer than `backlog_ttl`.
    Expired,
    /// Only conversation subscribers were there, and it belonged to no
    /// conversation (it was not an offer, and no worker held its peer).
    NoConversation,
}

impl Reason {
    const ALL: [Reason; 4] = [
        Reason::NoSubscriber,
        Reason::QueueFull,
        Reason::Expired,
        Reason::NoConversation,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn describe(self) -> &'static str {
        match self {
            Reason::NoSubscriber => "no subscriber",
            Reason::QueueFull => "queue full",
            Reason::Expired => "expired in the backlog",
            Reason::NoConversation => "no conversation",
        }
    }
}

/// Drops and refusals since the last summary.
#[derive(Debug, Default)]
pub struct Tally {
    dropped: [u64; Reason::ALL.len()],
    refused: u64,
    /// When the first event of this summary happened.
    since: Option<Instant>,
}

impl Tally {
    /// Counts `n` messages dropped for `reason`.
    pub fn drop(&mut self, counters: &Counters, reason: Reason, n: u64, now: Instant) {
        if n == 0 {
            return;
        }
        let counter = match reason {
            Reason::NoSubscriber => &counters.dropped_no_subscriber,
            Reason::QueueFull => &counters.dropped_queue_full,
            Reason::Expired => &counters.dropped_expired,
            Reason::NoConversation => &counters.dropped_no_conversation,
        };
        Counters::add(counter, n);
        self.dropped[reason.index()] += n;
        self.since.get_or_insert(now);
        self.log_if_due(now);
    }

    /// Counts one offer answered with a refusal.
    pub fn refuse(&mut self, counters: &Counters, now: Instant) {
        Counters::add(&counters.offers_refused, 1);
        self.refused += 1;
        self.since.get_or_insert(now);
        self.log_if_due(now);
    }

    /// Logs the summary once [`LOG_SUMMARY_INTERVAL`] has passed since its first
    /// event.
    pub fn log_if_due(&mut self, now: Instant) {
        if self
            .since
            .is_some_and(|since| now.duration_since(since) >= LOG_SUMMARY_INTERVAL)
        {
            self.log(now);
        }
    }

    /// Logs what is pending now, if anything, and starts a new summary.
    pub fn log(&mut self, now: Instant) {
        let Some(since) = self.since.take() else {
            return;
        };
        let seconds = now.duration_since(since).as_secs().max(1);
        let total: u64 = self.dropped.iter().sum();
        if total > 0 {
            let mut reasons = String::new();
            for reason in Reason::ALL {
                let n = self.dropped[reason.index()];
                if n > 0 {
                    let sep = if reasons.is_empty() { "" } else { ", " };
                    let _ = write!(reasons, "{sep}{} {}", thousands(n), reason.describe());
                }
            }
            warn!(
                dropped = total,
                seconds,
                "dropped {} messages in the last {seconds} s: {reasons}",
                thousands(total)
            );
        }
        if self.refused > 0 {
            warn!(
                refused = self.refused,
                seconds,
                "refused {} offers in the last {seconds} s: no local worker could take the conversation",
                thousands(self.refused)
            );
        }
        *self = Tally::default();
    }
}

/// `1204` as `1,204`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn thousands_are_separated() {
        for (n, text) in [
            (0, "0"),
            (999, "999"),
            (1204, "1,204"),
            (2_000_000, "2,000,000"),
        ] {
            assert_eq!(thousands(n), text);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_summary_waits_for_its_interval_and_then_starts_over() {
        let counters = Counters::default();
        let mut tally = Tally::default();
        let start = Instant::now();
        tally.drop(&counters, Reason::NoSubscriber, 1000, start);
        tally.drop(
            &counters,
            Reason::QueueFull,
            204,
            start + Duration::from_secs(3),
        );
        assert!(tally.since.is_some(), "nothing logged before the interval");
        tally.log_if_due(start + LOG_SUMMARY_INTERVAL);
        assert!(tally.since.is_none() && tally.dropped == [0; 4]);
        let c = counters.snapshot();
        assert_eq!((c.dropped_no_subscriber, c.dropped_queue_full), (1000, 204));
    }
}
