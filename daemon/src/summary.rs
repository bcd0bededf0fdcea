//! Log lines for events a caller can cause in volume: the first one is
//! logged at once, the rest are counted and logged as one line an interval
//! ("closed 1,204 connections in the last 10 s"), never a line each.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One kind of event's log budget.
#[derive(Debug)]
pub struct Summary {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the last line was logged.
    logged: Option<Instant>,
    /// Events since then that were not logged.
    counted: u64,
}

impl Summary {
    pub const fn new(interval: Duration) -> Self {
        Summary {
            interval,
            state: Mutex::new(State {
                logged: None,
                counted: 0,
            }),
        }
    }

    /// Records one event. `Some(n)` means: log it now, mentioning the `n`
    /// earlier ones that were only counted; `None`: counted, stay quiet.
    pub fn note(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match state.logged {
            Some(at) if now.duration_since(at) < self.interval => {
                state.counted += 1;
                None
            }
            _ => {
                state.logged = Some(now);
                Some(std::mem::take(&mut state.counted))
            }
        }
    }

    /// The events counted but not logged, once the interval since the last
    /// line has passed: call it now and then so that a burst's count is
    /// logged even when no further event comes.
    pub fn flush(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match state.logged {
            Some(at) if state.counted > 0 && now.duration_since(at) >= self.interval => {
                state.logged = Some(now);
                Some(std::mem::take(&mut state.counted))
            }
            _ => None,
        }
    }

    /// The interval, for log lines that say "in the last ...".
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_event_is_logged_the_rest_counted_until_the_interval_ends() {
        let summary = Summary::new(Duration::from_millis(50));
        assert_eq!(summary.note(), Some(0));
        assert_eq!(summary.note(), None);
        assert_eq!(summary.note(), None);
        assert_eq!(summary.flush(), None, "the interval has not passed");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(summary.flush(), Some(2));
        assert_eq!(summary.flush(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(summary.note(), Some(0));
    }
}
