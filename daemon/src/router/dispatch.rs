//! Delivery of one inbound message: the conversation rules first, then
//! the plain groups, and what nobody could take counted or refused.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::debug;
use uuid::Uuid;

use super::drops::Reason;
use super::{Handed, Inner, PeerMessage, Refusal, RefusalReason, Router, UnclaimedOffers};
use crate::limits::MAX_CONVERSATIONS;
use crate::status::Counters;

/// What became of one message, across the subscriptions it was offered to.
#[derive(Default)]
struct Outcome {
    delivered: u64,
    full: u64,
    closed: bool,
}

/// What the conversation rules did with a message.
enum Conversed {
    /// Handed to the conversation's holder (or to the subscriber that now
    /// holds a new one).
    Delivered,
    /// Its holder's queue was full: lost, and counted.
    Lost,
    /// An offer nobody could take.
    Refused(RefusalReason),
    /// Not a conversation's message: plain subscriptions only.
    NotOurs,
}

impl Router {
    /// Delivers one inbound message. Never blocks, never allocates beyond
    /// the message itself.
    pub fn dispatch(&self, message: PeerMessage) {
        let now = Instant::now();
        let cost = message.cost();
        let mut inner = self.lock();
        self.route(&mut inner, Arc::new(message), cost, now);
    }

    pub(super) fn route(
        &self,
        inner: &mut Inner,
        message: Arc<PeerMessage>,
        cost: usize,
        now: Instant,
    ) {
        if inner.is_empty() {
            if message.is_offer()
                && !message.is_self_addressed()
                && self.limits.unclaimed_offers == UnclaimedOffers::Refuse
            {
                self.refuse(inner, message.remote(), RefusalReason::NoWorker, now);
            } else {
                let lost = inner.backlog.push(message, cost, now);
                let tally = &mut inner.tally;
                tally.drop(&self.counters, Reason::NoSubscriber, lost.overflow, now);
                tally.drop(&self.counters, Reason::Expired, lost.expired, now);
            }
            return;
        }
        let mut outcome = Outcome::default();
        let conversed = if inner.conversers.is_empty() && inner.conversations.is_empty() {
            Conversed::NotOurs
        } else {
            self.converse(inner, &message, cost, now, &mut outcome)
        };
        let plain = !(inner.solo.is_empty() && inner.groups.is_empty());
        if plain {
            self.deliver_plain(inner, &message, cost, now, &mut outcome);
        }
        match conversed {
            Conversed::Refused(why) => self.refuse(inner, message.remote(), why, now),
            Conversed::NotOurs if !plain => {
                inner
                    .tally
                    .drop(&self.counters, Reason::NoConversation, 1, now);
            }
            _ => {}
        }
        if outcome.closed {
            inner.prune(|m| !m.tx.is_closed());
        }
        Counters::add(&self.counters.delivered, outcome.delivered);
        inner
            .tally
            .drop(&self.counters, Reason::QueueFull, outcome.full, now);
    }

    /// The conversation rules for one message.
    fn converse(
        &self,
        inner: &mut Inner,
        message: &Arc<PeerMessage>,
        cost: usize,
        now: Instant,
        outcome: &mut Outcome,
    ) -> Conversed {
        let budget = self.limits.subscriber_queue_bytes;
        let remote = message.remote();
        if let Some(holder) = inner.conversations.holder(remote, now).cloned() {
            if inner.has_converser(&holder) {
                inner.conversations.renew(remote, now);
                let mut conversed = Conversed::Lost;
                for c in inner
                    .conversers
                    .iter()
                    .filter(|c| c.member.worker == holder)
                {
                    match c.member.hand(message, cost, budget) {
                        Handed::Taken => {
                            conversed = Conversed::Delivered;
                            break;
                        }
                        Handed::Full => {}
                        Handed::Closed => outcome.closed = true,
                    }
                }
                match conversed {
                    Conversed::Delivered => outcome.delivered += 1,
                    _ => outcome.full += 1,
                }
                // The relay could not reach the peer, or the peer refused:
                // the conversation is over once its holder has heard so.
                if message.peer.error.is_some() {
                    inner.conversations.end(remote);
                    debug!(peer = %remote, worker = holder.as_str(), "conversation ended by an error");
                    self.ended.notify_waiters();
                }
                return conversed;
            }
            // Its holder's subscriptions are gone: so is the conversation.
            inner.conversations.end(remote);
            self.ended.notify_waiters();
        }
        if !message.is_offer() || inner.conversers.is_empty() {
            return Conversed::NotOurs;
        }
        if inner.conversations.len() >= MAX_CONVERSATIONS {
            self.expire_conversations(inner, now);
        }
        if inner.conversations.len() >= MAX_CONVERSATIONS {
            return Conversed::Refused(RefusalReason::Full);
        }
        // A new conversation: exactly one conversation subscriber, in turn.
        let count = inner.conversers.len();
        let start = inner.next_converser % count;
        for offset in 0..count {
            let index = (start + offset) % count;
            let member = &inner.conversers[index].member;
            match member.hand(message, cost, budget) {
                Handed::Taken => {
                    let holder = member.worker.clone();
                    // Nobody holds it and there is room: this cannot fail.
                    let _ = inner.conversations.claim(&holder, remote, now);
                    debug!(peer = %remote, worker = holder.as_str(), "conversation started by the peer");
                    inner.next_converser = index + 1;
                    outcome.delivered += 1;
                    return Conversed::Delivered;
                }
                Handed::Full => {}
                Handed::Closed => outcome.closed = true,
            }
        }
        Conversed::Refused(RefusalReason::Busy)
    }

    /// The plain rules: every group once, ungrouped subscribers each.
    fn deliver_plain(
        &self,
        inner: &mut Inner,
        message: &Arc<PeerMessage>,
        cost: usize,
        now: Instant,
        outcome: &mut Outcome,
    ) {
        let budget = self.limits.subscriber_queue_bytes;
        let preferred = inner.affinity.preferred(message.remote(), now);
        // Ungrouped subscribers each get the message.
        for member in &inner.solo {
            match member.hand(message, cost, budget) {
                Handed::Taken => outcome.delivered += 1,
                Handed::Full => outcome.full += 1,
                Handed::Closed => outcome.closed = true,
            }
        }
        // Each named group gets it once: from the preferred worker's
        // subscription if it has one there, else from the member whose turn
        // it is; a full member passes it on to the next.
        for group in &mut inner.groups {
            let count = group.members.len();
            let affine = preferred.and_then(|w| group.members.iter().position(|m| &m.worker == w));
            let start = affine.unwrap_or(group.turn);
            let mut taken = false;
            for offset in 0..count {
                let index = (start + offset) % count;
                match group.members[index].hand(message, cost, budget) {
                    Handed::Taken => {
                        if affine.is_none() {
                            group.turn = index + 1;
                        }
                        taken = true;
                        break;
                    }
                    Handed::Full => {}
                    Handed::Closed => outcome.closed = true,
                }
            }
            if taken {
                outcome.delivered += 1;
            } else {
                outcome.full += 1;
            }
        }
    }

    /// Turns an offer down: counted, and queued for an answer to its sender.
    fn refuse(&self, inner: &mut Inner, peer: Uuid, why: RefusalReason, now: Instant) {
        inner.tally.refuse(&self.counters, now);
        debug!(%peer, reason = why.describe(), "offer refused");
        // Full: the refusal stands, only unanswered (see REFUSALS_QUEUED).
        let _ = self.refusals.try_send(Refusal { peer, why });
    }
}
