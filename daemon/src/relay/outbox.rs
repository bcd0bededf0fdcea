//! The outbox: the link's own ordered queue of accepted sends. Callers put
//! entries in through a bounded channel (and wait for room within their
//! deadline); the supervisor owns the other end and lends it to each
//! session's writer, which takes entries in order. What no session has taken
//! stays here for the next one, so a lost connection never reorders sends.
//!
//! An entry is claimed exactly once: by the writer when it writes it, or by
//! its caller when the deadline passes first (then nothing was sent).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::Outgoing;

/// What the link tells a caller about its entry.
#[derive(Debug)]
pub(super) enum Undelivered {
    /// The deadline passed before the entry could be written.
    Expired,
    /// Written, but the relay did not confirm it (the reason).
    Unconfirmed(String),
    /// The link failed before the entry was written.
    Failed { code: Option<u16>, detail: String },
    /// The daemon stopped before the entry was written.
    Stopping,
}

pub(super) type Answer = Result<(), Undelivered>;
pub(super) type Reply = oneshot::Sender<Answer>;

/// Decides, once, who an entry belongs to: the writer or its caller.
#[derive(Debug, Clone, Default)]
pub(super) struct Claim(Arc<AtomicBool>);

impl Claim {
    /// True for the first caller only.
    pub(super) fn take(&self) -> bool {
        !self.0.swap(true, Ordering::AcqRel)
    }
}

/// Frames accepted as one: written together, in order, confirmed together.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) frames: Vec<Outgoing>,
    pub(super) deadline: Instant,
    pub(super) reply: Reply,
    pub(super) claim: Claim,
}

impl Entry {
    /// Takes the entry for writing now, if it is still wanted: not given up
    /// by its caller (gone, or withdrawn at its deadline) and not expired.
    pub(super) fn admit(self, now: Instant) -> Option<Entry> {
        if self.reply.is_closed() || !self.claim.take() {
            return None;
        }
        if now >= self.deadline {
            let _ = self.reply.send(Err(Undelivered::Expired));
            return None;
        }
        Some(self)
    }

    /// Tells the caller the entry will not be written, unless it has
    /// already withdrawn it.
    pub(super) fn refuse(self, why: Undelivered) {
        if self.claim.take() {
            let _ = self.reply.send(Err(why));
        }
    }
}

/// The receiving end of the queue, with room to put one entry back at its
/// front (one the writer took but had no window for yet).
#[derive(Debug)]
pub(super) struct Outbox {
    entries: mpsc::Receiver<Entry>,
    front: Option<Entry>,
}

impl Outbox {
    pub(super) fn new(capacity: usize) -> (mpsc::Sender<Entry>, Outbox) {
        let (tx, rx) = mpsc::channel(capacity);
        let outbox = Outbox {
            entries: rx,
            front: None,
        };
        (tx, outbox)
    }

    /// The next entry, waiting for one. Cancel-safe: an entry is either
    /// returned or still queued. `None` once closed and empty.
    pub(super) async fn next(&mut self) -> Option<Entry> {
        match self.front.take() {
            Some(entry) => Some(entry),
            None => self.entries.recv().await,
        }
    }

    /// The next entry if one is queued.
    pub(super) fn try_next(&mut self) -> Option<Entry> {
        self.front.take().or_else(|| self.entries.try_recv().ok())
    }

    /// Puts `entry` back in front of everything else.
    pub(super) fn put_back(&mut self, entry: Entry) {
        debug_assert!(self.front.is_none(), "one entry put back at a time");
        self.front = Some(entry);
    }

    /// Refuses everything queued now with the answer `why` gives.
    pub(super) fn refuse_all(&mut self, why: impl Fn() -> Undelivered) {
        while let Some(entry) = self.try_next() {
            entry.refuse(why());
        }
    }

    /// Takes no more entries; callers still waiting for room fail.
    pub(super) fn close(&mut self) {
        self.entries.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(deadline: Instant) -> (Entry, oneshot::Receiver<Answer>, Claim) {
        let (reply, answer) = oneshot::channel();
        let claim = Claim::default();
        let entry = Entry {
            frames: Vec::new(),
            deadline,
            reply,
            claim: claim.clone(),
        };
        (entry, answer, claim)
    }

    #[tokio::test]
    async fn an_entry_goes_to_the_writer_or_back_to_its_caller_never_both() {
        let later = Instant::now() + std::time::Duration::from_secs(60);
        // The writer first: the caller can no longer withdraw it.
        let (e, _answer, claim) = entry(later);
        assert!(e.admit(Instant::now()).is_some());
        assert!(!claim.take());
        // The caller first: the writer skips it.
        let (e, _answer, claim) = entry(later);
        assert!(claim.take());
        assert!(e.admit(Instant::now()).is_none());
        // A caller that went away is not written to.
        let (e, answer, _claim) = entry(later);
        drop(answer);
        assert!(e.admit(Instant::now()).is_none());
        // Past its deadline it is answered, not written.
        let (e, answer, _claim) = entry(Instant::now());
        assert!(e.admit(Instant::now()).is_none());
        assert!(matches!(answer.await, Ok(Err(Undelivered::Expired))));
    }

    #[tokio::test]
    async fn order_is_kept_across_a_put_back() {
        let (tx, mut outbox) = Outbox::new(8);
        let later = Instant::now() + std::time::Duration::from_secs(60);
        let mut answers = Vec::new();
        for n in 0..3 {
            let (mut e, answer, _) = entry(later);
            e.frames.push(Outgoing {
                peer: uuid::Uuid::nil(),
                frame: n.to_string(),
            });
            answers.push(answer);
            tx.send(e).await.unwrap();
        }
        let first = outbox.next().await.unwrap();
        outbox.put_back(first);
        let order: Vec<String> = std::iter::from_fn(|| outbox.try_next())
            .map(|e| e.frames[0].frame.clone())
            .collect();
        assert_eq!(order, ["0", "1", "2"]);
    }
}
