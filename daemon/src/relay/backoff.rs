//! When to try again, and when not to: retry delays that grow until a
//! registration stays up, and the detector for another client registering
//! this uuid on relays that do not say so.
//!
//! ProxyStore's relay closes a displaced socket with 4004 only since 0.8.1;
//! before that (0.5.x, the legacy dialect, and 0.6.0 to 0.8.0, the current
//! one) it closes it with 1001 "going away" and no reason, the same close it
//! sends when it shuts down. Two clients with one uuid then displace each
//! other forever. What tells the two apart: after a shutdown the relay is
//! gone for a while, after a displacement it answers at once, and the other
//! client comes back within its own retry delay. So a registration made at
//! the first attempt after a 1001, and closed with 1001 again before another
//! client's retry could have run out, means the uuid is taken: the link
//! fails with that reason instead of taking it back.

use std::time::Duration;

use rand::Rng;

/// How long a registration must last to count as having stayed up, so that
/// the next loss starts the delays from `backoff_initial` again. Longer than
/// any flapping seen in practice (a displacement fight, a relay that
/// registers and then drops the socket), short against the hours a healthy
/// connection lasts.
pub(super) const STABLE_AFTER: Duration = Duration::from_secs(30);

/// The WebSocket close code for "going away".
const GOING_AWAY: u16 = 1001;

/// What to do after a loss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Next {
    /// Try again after this delay.
    Retry(Duration),
    /// Another client holds this uuid: do not try again by itself.
    Displaced(String),
}

/// The retry policy of one link.
#[derive(Debug)]
pub(super) struct Backoff {
    initial: Duration,
    max: Duration,
    /// How long another client's retry can take: its longest delay plus a
    /// registration.
    displacement_window: Duration,
    /// Losses since the last registration that stayed up.
    failures: u32,
    /// The last loss was a 1001, and no attempt has failed since.
    after_going_away: bool,
    /// The current registration was made at the first attempt after a 1001.
    retook: bool,
}

impl Backoff {
    pub(super) fn new(initial: Duration, max: Duration, registration_timeout: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            displacement_window: max + registration_timeout,
            failures: 0,
            after_going_away: false,
            retook: false,
        }
    }

    /// Losses since the last registration that stayed up.
    pub(super) fn failures(&self) -> u32 {
        self.failures
    }

    /// A fresh start (an explicit Reconnect).
    pub(super) fn reset(&mut self) {
        self.failures = 0;
        self.after_going_away = false;
        self.retook = false;
    }

    /// An attempt did not get registered.
    pub(super) fn attempt_failed(&mut self) -> Duration {
        self.after_going_away = false;
        self.lost()
    }

    /// An attempt registered.
    pub(super) fn registered(&mut self) {
        self.retook = self.after_going_away;
        self.after_going_away = false;
    }

    /// A registration that lasted `lasted` ended with close code `code`
    /// (`None`: no close frame, or the link found it dead).
    pub(super) fn session_ended(&mut self, code: Option<u16>, lasted: Duration) -> Next {
        if lasted >= STABLE_AFTER {
            self.failures = 0;
        }
        let going_away = code == Some(GOING_AWAY);
        if going_away && self.retook && lasted < self.displacement_window {
            return Next::Displaced(format!(
                "another client is registering this uuid: the relay closed this connection \
                 with 1001 (going away) {lasted:.1?} after it had registered again at once \
                 following another 1001, which is how relays before ProxyStore 0.8.1 close \
                 a displaced connection; stop the other client or give one of them another \
                 uuid, then call Reconnect"
            ));
        }
        self.retook = false;
        self.after_going_away = going_away;
        Next::Retry(self.lost())
    }

    fn lost(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        backoff_delay(self.failures, self.initial, self.max, &mut rand::rng())
    }
}

/// The delay before attempt `attempt + 1`: `initial` doubling per attempt,
/// capped at `max`, less up to 25% at random so that many hosts do not
/// retry in step.
fn backoff_delay(attempt: u32, initial: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    let doubled = initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let capped = doubled.min(max);
    capped.mul_f64(rng.random_range(0.75..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn policy() -> Backoff {
        Backoff::new(S, 60 * S, 10 * S)
    }

    fn delay(next: Next) -> Duration {
        match next {
            Next::Retry(delay) => delay,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_from_one_second_to_a_minute_with_jitter() {
        let mut rng = rand::rng();
        let (initial, max) = (Duration::from_secs(1), Duration::from_secs(60));
        for (attempt, nominal) in [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (40, 60)] {
            for _ in 0..100 {
                let d = backoff_delay(attempt, initial, max, &mut rng);
                let nominal = Duration::from_secs(nominal);
                assert!(
                    d <= nominal && d >= nominal.mul_f64(0.75),
                    "{attempt}: {d:?}"
                );
            }
        }
    }

    #[test]
    fn a_registration_that_does_not_stay_up_keeps_the_delays_growing() {
        let mut b = policy();
        for expected in [1, 2, 4, 8] {
            b.registered();
            let d = delay(b.session_ended(None, S));
            assert!(
                d > (expected * S).mul_f64(0.7) && d <= expected * S,
                "{d:?}"
            );
        }
        // One that stays up starts them again.
        b.registered();
        assert!(delay(b.session_ended(None, STABLE_AFTER)) <= S);
        assert_eq!(b.failures(), 1);
    }

    #[test]
    fn retaking_the_uuid_at_once_and_losing_it_again_to_1001_is_a_displacement() {
        let mut b = policy();
        b.registered();
        // The first 1001 may be a relay going down: retry.
        delay(b.session_ended(Some(1001), 3600 * S));
        b.registered();
        let next = b.session_ended(Some(1001), 2 * S);
        assert!(
            matches!(&next, Next::Displaced(why) if why.contains("1001") && why.contains("another client")),
            "{next:?}"
        );
    }

    #[test]
    fn a_relay_that_restarts_is_not_a_displacement() {
        let mut b = policy();
        // 1001, the relay is gone for a while (an attempt fails), comes back.
        b.registered();
        delay(b.session_ended(Some(1001), 3600 * S));
        b.attempt_failed();
        b.registered();
        delay(b.session_ended(Some(1001), 5 * S));
        // 1001 again long after registering: the relay went away again.
        b.registered();
        delay(b.session_ended(Some(1001), 120 * S));
        // A close without a frame, or another code, never counts.
        b.registered();
        delay(b.session_ended(None, S));
        b.registered();
        delay(b.session_ended(Some(1000), S));
        b.registered();
        delay(b.session_ended(Some(1001), S));
    }
}
