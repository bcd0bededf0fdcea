//! What every measurement shares: the messages' payloads, the window a
//! sender keeps ahead of its receiver, rates, and the bounds on time.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::report::percentile;

/// Ping-pongs before the measured ones, in every latency run.
pub const WARMUP: usize = 100;
/// How far a raw sender may run ahead of its slowest receiver. The embedded
/// relay closes a client with 1024 frames queued for it (a reader that does
/// not keep up), so a raw sender without the daemon's own bound keeps under
/// that.
pub const WINDOW: u64 = 512;
/// Senders flush at least this often, and receivers report their progress
/// this often.
pub const FLUSH_EVERY: u64 = 64;
/// The bound on any one measurement, so that a broken path fails the bench
/// rather than hanging it.
pub const MEASURE_TIMEOUT: Duration = Duration::from_secs(300);
/// The bound on a daemon, relay or client process coming up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A message's description: its sequence number, padded to `size` bytes.
pub fn payload(seq: u64, size: usize) -> String {
    const PAD: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
    let mut text = String::with_capacity(size.max(24));
    let _ = write!(text, "{seq}:");
    while text.len() < size {
        let n = (size - text.len()).min(PAD.len());
        text.push_str(&PAD[..n]);
    }
    text
}

/// How many messages a receiver has counted, for a sender that keeps a
/// bounded window ahead of it.
#[derive(Debug, Default)]
pub struct Progress {
    received: AtomicU64,
    pub changed: Arc<Notify>,
}

impl Progress {
    pub fn sharing(changed: &Arc<Notify>) -> Progress {
        Progress {
            received: AtomicU64::new(0),
            changed: Arc::clone(changed),
        }
    }

    pub fn get(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    pub fn set(&self, n: u64) {
        self.received.store(n, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Waits until a sender about to send message `seq` (counting from 0)
    /// is within [`WINDOW`] of what the receiver has counted.
    pub async fn window_open(&self, seq: u64) {
        wait_for(&self.changed, || seq - self.get() < WINDOW).await;
    }
}

/// Waits until `ready()` holds, checking again at every notification of
/// `changed`. The wait is registered before each check, so a notification
/// between the check and the wait is not missed, however many tasks wait.
pub async fn wait_for(changed: &Notify, ready: impl Fn() -> bool) {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if ready() {
            return;
        }
        notified.await;
    }
}

/// Whether a receiver that has counted `n` of `count` messages reports it.
pub fn reports(n: u64, count: u64) -> bool {
    n.is_multiple_of(FLUSH_EVERY) || n == count
}

pub fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

/// One repetition's figures, on stderr as the run goes.
pub fn progress(path: &str, rep: usize, samples: &[f64], rate: Option<f64>) {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rate = rate.map_or(String::new(), |r| format!("; throughput {r:.0}/s"));
    eprintln!(
        "{path} #{rep}: one-way p50 {:.1} µs, p99 {:.1} µs{rate}",
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.99)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_the_asked_size_and_their_number() {
        for size in [0, 5, 128, 1000] {
            let text = payload(123_456, size);
            assert!(text.starts_with("123456:"));
            assert_eq!(text.len(), size.max("123456:".len()));
        }
    }

    #[tokio::test]
    async fn every_sender_waiting_on_a_window_wakes() {
        let progress = Arc::new(Progress::default());
        let senders: Vec<_> = (0..4)
            .map(|n| {
                let progress = Arc::clone(&progress);
                tokio::spawn(async move { progress.window_open(WINDOW + n).await })
            })
            .collect();
        tokio::task::yield_now().await;
        progress.set(FLUSH_EVERY);
        for sender in senders {
            tokio::time::timeout(Duration::from_secs(10), sender)
                .await
                .expect("a waiting sender was not woken")
                .expect("sender");
        }
    }

    #[test]
    fn receivers_report_every_window_step_and_the_last() {
        assert!(!reports(1, 100));
        assert!(reports(FLUSH_EVERY, 100));
        assert!(reports(100, 100));
    }
}
