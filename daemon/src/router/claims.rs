//! What a worker may send, and the conversations it claims, holds and
//! releases: the router's answer to the gRPC service before a send.

use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;
use uuid::Uuid;

use super::{Claimed, Router, RouterError, Worker};
use crate::status::Counters;

impl Router {
    /// Whether `worker` may send to `peer` now, and if `claim`, gives it
    /// `peer`'s conversation. A conversation another worker holds refuses
    /// every send to its peer, claiming or not; with `wait_until`, waits
    /// (until then at the latest) for it to end instead of refusing at once.
    /// On success the peer's replies also prefer `worker` in plain groups.
    /// Returns how the claim went when there was one.
    pub async fn clear_to_send(
        &self,
        worker: &Worker,
        peer: Uuid,
        claim: bool,
        wait_until: Option<Instant>,
    ) -> Result<Option<Claimed>, RouterError> {
        let cleared = self
            .when_free(wait_until, || self.admit(worker, peer, claim))
            .await?;
        self.note_send(worker, peer);
        Ok(cleared)
    }

    /// [`Router::clear_to_send`] without waiting, for a stream of sends.
    pub fn try_clear_to_send(
        &self,
        worker: &Worker,
        peer: Uuid,
        claim: bool,
    ) -> Result<Option<Claimed>, RouterError> {
        let cleared = self.admit(worker, peer, claim);
        if matches!(cleared, Err(RouterError::Held { .. })) {
            Counters::add(&self.counters.conversation_conflicts, 1);
        }
        let cleared = cleared?;
        self.note_send(worker, peer);
        Ok(cleared)
    }

    /// Claims or renews `peer`'s conversation for `worker` without sending;
    /// returns how long it now lasts without another sign of life.
    pub async fn hold(
        &self,
        worker: &Worker,
        peer: Uuid,
        wait_until: Option<Instant>,
    ) -> Result<Duration, RouterError> {
        self.when_free(wait_until, || self.admit(worker, peer, true))
            .await?;
        Ok(self.limits.conversation_ttl)
    }

    /// Ends `peer`'s conversation if `worker` holds it.
    pub fn release(&self, worker: &Worker, peer: Uuid) -> bool {
        let released = self.lock().conversations.release(worker, peer);
        if released {
            debug!(%peer, worker = worker.as_str(), "conversation released");
            self.ended.notify_waiters();
        }
        released
    }

    /// Runs `attempt` until it is not refused for a held conversation, or
    /// `wait_until` passes; counts a refusal that stands.
    async fn when_free<T>(
        &self,
        wait_until: Option<Instant>,
        attempt: impl Fn() -> Result<T, RouterError>,
    ) -> Result<T, RouterError> {
        let Some(wait) = wait_until else {
            // Nothing to wait for: no waiter to register on every send.
            let result = attempt();
            if matches!(result, Err(RouterError::Held { .. })) {
                Counters::add(&self.counters.conversation_conflicts, 1);
            }
            return result;
        };
        loop {
            // Listen before looking, so that an end in between is not missed.
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let result = attempt();
            match &result {
                Err(RouterError::Held { .. }) if wait > Instant::now() => {}
                Err(RouterError::Held { .. }) => {
                    Counters::add(&self.counters.conversation_conflicts, 1);
                    return result;
                }
                _ => return result,
            }
            if tokio::time::timeout_at(wait, ended).await.is_err() {
                let last = attempt();
                if matches!(last, Err(RouterError::Held { .. })) {
                    Counters::add(&self.counters.conversation_conflicts, 1);
                }
                return last;
            }
        }
    }

    fn admit(
        &self,
        worker: &Worker,
        peer: Uuid,
        claim: bool,
    ) -> Result<Option<Claimed>, RouterError> {
        let now = Instant::now();
        let mut inner = self.lock();
        if !claim {
            inner
                .conversations
                .check(worker, peer, now)
                .map_err(|c| RouterError::conflict(peer, c))?;
            // Nobody else holds it: if `worker` does, this is a sign of life.
            inner.conversations.renew(peer, now);
            return Ok(None);
        }
        if !inner.has_converser(worker) {
            return Err(RouterError::NoConversationSubscription {
                worker: worker.as_str().to_owned(),
            });
        }
        let claimed = inner
            .conversations
            .claim(worker, peer, now)
            .map_err(|c| RouterError::conflict(peer, c))?;
        if claimed == Claimed::New {
            debug!(%peer, worker = worker.as_str(), "conversation claimed");
        }
        Ok(Some(claimed))
    }

    /// Records that `worker` is sending to `peer`: the peer's replies (and
    /// the relay's returns of this send) prefer that worker in plain groups
    /// for a while. Called before the message is written, since a reply can
    /// be quick.
    pub(super) fn note_send(&self, worker: &Worker, peer: Uuid) {
        self.lock().affinity.bind(worker, peer, Instant::now());
    }
}
