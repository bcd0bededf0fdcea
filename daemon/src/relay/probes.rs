//! Confirmation bookkeeping for one session. A batch the writer sends is
//! followed by a probe (a message from this host to itself, tagged with a
//! random tag chosen for this session and a sequence number) unless one is
//! out already, in which case it waits for the next, written when that one
//! comes back; the reader sees probes come back and confirms every batch up
//! to them. What is written and not yet confirmed is the session's
//! in-flight window, which the writer keeps under [`super::IN_FLIGHT_FRAMES`].
//!
//! One probe is shared by all the callers whose frames it follows: a round
//! trip through the relay per probe, whatever the number of callers.

use std::collections::VecDeque;

use tokio::time::Instant;
use uuid::Uuid;

use super::outbox::{Entry, Reply, Undelivered};
use crate::codec::{self, PeerConnection};

/// How every probe's description starts. A message from this host to
/// itself that starts so but is not one of this session's probes is another
/// session's (a connection that just ended, or another daemon given this
/// uuid): never anyone's data, so it is dropped.
const PROBE_PREFIX: &str = "relay-sidecar-probe:";

/// What a message from the relay is, as far as probes go.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Probe {
    /// This session's probe with this sequence number.
    Ours(u64),
    /// Another session's probe.
    Stale,
    /// Not a probe.
    No,
}

/// What marks this session's probes. A fresh random tag per session, so no
/// one who saw an earlier session's probes (a client that displaced us) can
/// confirm this session's sends.
#[derive(Debug, Clone)]
pub(super) struct ProbeTag {
    me: Uuid,
    /// `PROBE_PREFIX`, the tag, and a colon.
    prefix: String,
}

impl ProbeTag {
    pub(super) fn new(me: Uuid) -> ProbeTag {
        ProbeTag {
            me,
            prefix: format!("{PROBE_PREFIX}{}:", Uuid::new_v4().simple()),
        }
    }

    /// The probe with sequence number `seq` (a peer connection message,
    /// the same in both dialects).
    pub(super) fn frame(&self, seq: u64, name: &str) -> String {
        codec::encode_peer(
            self.me,
            name,
            self.me,
            "offer",
            &format!("{}{seq}", self.prefix),
            None,
        )
    }

    /// Whether `peer` is a probe, and whose.
    pub(super) fn check(&self, peer: &PeerConnection) -> Probe {
        if peer.source_uuid != self.me
            || peer.peer_uuid != self.me
            || !peer.description.starts_with(PROBE_PREFIX)
        {
            return Probe::No;
        }
        match peer
            .description
            .strip_prefix(&self.prefix)
            .and_then(|n| n.parse().ok())
        {
            Some(seq) => Probe::Ours(seq),
            None => Probe::Stale,
        }
    }
}

/// One batch written and waiting for the probe that confirms it: its own,
/// written right after it, or (when another probe was out) the next one.
#[derive(Debug)]
struct Batch {
    /// The probe that confirms it.
    seq: u64,
    /// Its frames, a probe written with it included.
    frames: usize,
    /// Its sends' frames.
    messages: usize,
    /// How many of `Confirmations::replies` and `peers` are this batch's.
    replies: usize,
    peers: usize,
    written_at: Instant,
}

/// Batches written and not yet confirmed, oldest first.
///
/// At most one probe is out at a time: a batch written while one is out
/// waits for the next, which goes out once the first comes back. Under load
/// the relay then carries one probe per round trip, whichever callers and
/// however many batches it confirms; alone, a send still gets its own.
#[derive(Debug, Default)]
pub(super) struct Confirmations {
    /// The sequence number of the next probe.
    next_seq: u64,
    /// A probe is out and has not come back.
    probe_out: bool,
    batches: VecDeque<Batch>,
    /// The callers of the batches above, in order.
    replies: VecDeque<Reply>,
    /// The peers (other than ourselves) the batches above were sent to: a
    /// message the relay returns is ours only if it went to one of them.
    peers: VecDeque<Uuid>,
    in_flight: usize,
}

impl Confirmations {
    /// Records `entries` as one batch written now and moves their frames to
    /// `out`, in order; returns the sequence number of the probe that must
    /// follow them, or `None` when one is out already (the next one, from
    /// [`Confirmations::probe_due`], will confirm them).
    pub(super) fn commit(
        &mut self,
        entries: &mut Vec<Entry>,
        me: Uuid,
        out: &mut Vec<String>,
    ) -> Option<u64> {
        let (replies, peers, frames) = (entries.len(), self.peers.len(), out.len());
        for entry in entries.drain(..) {
            for outgoing in entry.frames {
                if outgoing.peer != me {
                    self.peers.push_back(outgoing.peer);
                }
                out.push(outgoing.frame);
            }
            self.replies.push_back(entry.reply);
        }
        let messages = out.len() - frames;
        self.in_flight += messages;
        self.batches.push_back(Batch {
            seq: self.next_seq,
            frames: messages,
            messages,
            replies,
            peers: self.peers.len() - peers,
            written_at: Instant::now(),
        });
        self.probe_due()
    }

    /// The sequence number of a probe to write now: when batches wait for
    /// one and none is out.
    pub(super) fn probe_due(&mut self) -> Option<u64> {
        let waiting = self.batches.back_mut()?;
        if self.probe_out || waiting.seq != self.next_seq {
            return None;
        }
        waiting.frames += 1;
        self.in_flight += 1;
        self.probe_out = true;
        self.next_seq += 1;
        Some(waiting.seq)
    }

    /// Probe `seq` came back: everything up to it is confirmed. Returns how
    /// many frames (probes not counted) that confirmed.
    pub(super) fn confirm(&mut self, seq: u64) -> u64 {
        // A number never sent (forged, or from a displaced session's
        // successor) confirms nothing.
        if seq >= self.next_seq {
            return 0;
        }
        if seq + 1 == self.next_seq {
            self.probe_out = false;
        }
        let mut sent = 0;
        while self.batches.front().is_some_and(|b| b.seq <= seq) {
            let batch = self.batches.pop_front().expect("front exists");
            self.in_flight -= batch.frames;
            sent += batch.messages as u64;
            self.peers.drain(..batch.peers);
            for reply in self.replies.drain(..batch.replies) {
                let _ = reply.send(Ok(()));
            }
        }
        sent
    }

    /// The session is over: every batch not confirmed is answered with
    /// `why`, since it may or may not have been forwarded.
    pub(super) fn fail_all(&mut self, why: &str) {
        self.probe_out = false;
        self.batches.clear();
        self.peers.clear();
        self.in_flight = 0;
        for reply in self.replies.drain(..) {
            let _ = reply.send(Err(Undelivered::Unconfirmed(why.to_owned())));
        }
    }

    /// Frames written and not confirmed, probes included.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(super) fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// When the oldest unconfirmed batch was written.
    pub(super) fn oldest(&self) -> Option<Instant> {
        self.batches.front().map(|b| b.written_at)
    }

    /// Whether an unconfirmed frame went to `peer`.
    pub(super) fn wrote_to(&self, peer: &uuid::Uuid) -> bool {
        self.peers.contains(peer)
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::super::Outgoing;
    use super::super::outbox::Claim;
    use super::*;

    fn entry(peers: &[Uuid]) -> (Entry, oneshot::Receiver<super::super::outbox::Answer>) {
        let (reply, answer) = oneshot::channel();
        let frames = peers
            .iter()
            .map(|peer| Outgoing {
                peer: *peer,
                frame: peer.to_string(),
            })
            .collect();
        let entry = Entry {
            frames,
            deadline: Instant::now(),
            reply,
            claim: Claim::default(),
        };
        (entry, answer)
    }

    #[tokio::test]
    async fn a_probe_confirms_its_batch_and_every_one_before() {
        let (me, far) = (Uuid::new_v4(), Uuid::new_v4());
        let mut c = Confirmations::default();
        let mut out = Vec::new();
        let (a, mut answer_a) = entry(&[me, far]);
        let (b, mut answer_b) = entry(&[far]);
        let first = c.commit(&mut vec![a], me, &mut out).expect("no probe out");
        let (d, mut answer_d) = entry(&[me]);
        // A probe is out: b and d wait for the next one.
        assert_eq!(c.commit(&mut vec![b, d], me, &mut out), None);
        assert_eq!(c.probe_due(), None, "not while one is out");
        assert_eq!(out.len(), 4);
        assert_eq!(c.in_flight(), 5);
        assert!(c.wrote_to(&far) && !c.wrote_to(&me));

        assert_eq!(c.confirm(first + 7), 0, "a number never sent");
        assert_eq!(c.confirm(first + 1), 0, "nor the next, not yet written");
        assert_eq!(c.confirm(first), 2);
        assert!(matches!(answer_a.try_recv(), Ok(Ok(()))));
        assert!(answer_b.try_recv().is_err(), "not yet");
        assert_eq!(c.in_flight(), 2);
        assert!(c.wrote_to(&far), "b's peer is still unconfirmed");
        let second = c.probe_due().expect("b and d wait for a probe");
        assert_eq!(c.probe_due(), None, "one at a time");
        assert_eq!(c.in_flight(), 3);
        assert_eq!(c.confirm(second), 2);
        assert!(matches!(answer_b.try_recv(), Ok(Ok(()))));
        assert!(matches!(answer_d.try_recv(), Ok(Ok(()))));
        assert!(c.is_empty() && c.in_flight() == 0 && !c.wrote_to(&far));
        assert_eq!(c.probe_due(), None, "nothing waits");
    }

    #[tokio::test]
    async fn batches_written_while_a_probe_is_out_share_the_next() {
        let me = Uuid::new_v4();
        let mut c = Confirmations::default();
        let mut out = Vec::new();
        let first = c.commit(&mut vec![entry(&[me]).0], me, &mut out).unwrap();
        for _ in 0..10 {
            assert_eq!(c.commit(&mut vec![entry(&[me]).0], me, &mut out), None);
        }
        assert_eq!(c.confirm(first), 1);
        let next = c.probe_due().unwrap();
        assert_eq!(c.confirm(next), 10, "one probe for ten batches");
        assert!(c.is_empty() && c.in_flight() == 0);
    }

    #[tokio::test]
    async fn what_is_unconfirmed_at_the_end_is_unknown() {
        let me = Uuid::new_v4();
        let mut c = Confirmations::default();
        let (a, mut answer) = entry(&[me]);
        c.commit(&mut vec![a], me, &mut Vec::new());
        c.fail_all("lost");
        assert!(matches!(
            answer.try_recv(),
            Ok(Err(Undelivered::Unconfirmed(why))) if why == "lost"
        ));
        assert!(c.is_empty() && c.oldest().is_none());
    }

    #[test]
    fn only_this_sessions_probes_are_probes() {
        let me = Uuid::new_v4();
        let (tag, other) = (ProbeTag::new(me), ProbeTag::new(me));
        let decode = |text: &str| match codec::decode(text, codec::Dialect::Current) {
            Ok(codec::Frame::Peer(peer)) => peer,
            other => panic!("{other:?}"),
        };
        let probe = decode(&tag.frame(42, "host"));
        assert_eq!(tag.check(&probe), Probe::Ours(42));
        assert_eq!(other.check(&probe), Probe::Stale, "another session's tag");
        let mut forwarded = probe.clone();
        forwarded.peer_uuid = Uuid::new_v4();
        assert_eq!(tag.check(&forwarded), Probe::No);
        let mut data = probe.clone();
        data.description = "hello".into();
        assert_eq!(tag.check(&data), Probe::No);
    }
}
