//! When to ping the relay, and when an unanswered ping means it is gone.
//! The timeout is a deadline set when a ping goes out, so a relay that stops
//! answering is noticed within `ping_interval + ping_timeout` of going
//! silent, whatever the two are.

use std::time::Duration;

use tokio::time::Instant;

/// When to ping, and when an unanswered ping means the relay is gone.
#[derive(Debug)]
pub(super) struct Pings {
    interval: Duration,
    timeout: Duration,
    /// The last ping's number.
    sent: u64,
    /// When the next ping is due.
    next: Instant,
    /// The deadline of the ping waiting for its answer.
    deadline: Option<Instant>,
}

impl Pings {
    /// Pings every `interval` from `now` on.
    pub(super) fn new(now: Instant, interval: Duration, timeout: Duration) -> Pings {
        Pings {
            interval,
            timeout,
            sent: 0,
            next: now + interval,
            deadline: None,
        }
    }

    /// When the session must look again.
    pub(super) fn next_at(&self) -> Instant {
        self.deadline.unwrap_or(self.next)
    }

    /// At [`Pings::next_at`], with the highest ping number answered so far:
    /// the number of a ping to send now, or why the link is dead.
    pub(super) fn due(&mut self, now: Instant, answered: u64) -> Result<Option<u64>, String> {
        if self.deadline.is_some() {
            if answered < self.sent {
                return Err(format!(
                    "no answer to a ping within ping_timeout ({:?})",
                    self.timeout
                ));
            }
            self.deadline = None;
        }
        if now < self.next {
            return Ok(None);
        }
        self.sent += 1;
        self.next = now + self.interval;
        self.deadline = Some(now + self.timeout);
        Ok(Some(self.sent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_ping_timeout_is_a_deadline_from_the_ping_not_the_next_tick() {
        let (interval, timeout) = (3000 * MS, 300 * MS);
        let start = Instant::now();
        let mut pings = Pings::new(start, interval, timeout);
        assert_eq!(pings.next_at(), start + interval);
        assert_eq!(pings.due(start + interval, 0), Ok(Some(1)));
        assert_eq!(pings.next_at(), start + interval + timeout);
        // Answered in time: the next ping a full interval after this one.
        assert_eq!(pings.due(start + interval + timeout, 1), Ok(None));
        assert_eq!(pings.next_at(), start + 2 * interval);
        assert_eq!(pings.due(start + 2 * interval, 1), Ok(Some(2)));
        // Not answered: dead at the deadline.
        assert!(pings.due(start + 2 * interval + timeout, 1).is_err());
    }

    #[test]
    fn a_ping_timeout_longer_than_the_interval_pings_again_at_once() {
        let start = Instant::now();
        let mut pings = Pings::new(start, 100 * MS, 500 * MS);
        assert_eq!(pings.due(start + 100 * MS, 0), Ok(Some(1)));
        assert_eq!(pings.due(start + 600 * MS, 1), Ok(Some(2)));
    }
}
