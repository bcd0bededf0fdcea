//! The callers' side of the link: a [`Handle`] puts sends into the outbox
//! and reads the published status; a [`Ticket`] waits for a send's outcome.
//!
//! A send is accepted into the outbox at once (or as soon as there is room,
//! within its deadline), whatever the state of the connection: sends accepted
//! one after another are written in that order, even across reconnects.

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout_at};

use super::outbox::{Answer, Claim, Entry, Undelivered};
use super::{Command, Outgoing, SendError};
use crate::status::{ConnectionState, LinkStatus};

/// A cheap, cloneable way to use the relay link.
#[derive(Debug, Clone)]
pub struct Handle {
    pub(super) outbox: mpsc::Sender<Entry>,
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) status: watch::Receiver<LinkStatus>,
}

impl Handle {
    /// The link status now.
    pub fn status(&self) -> LinkStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every state change.
    pub fn watch(&self) -> watch::Receiver<LinkStatus> {
        self.status.clone()
    }

    /// In lazy mode, starts connecting. Otherwise does nothing.
    pub fn wake(&self) {
        if self.status.borrow().state == ConnectionState::Idle {
            let _ = self.commands.try_send(Command::Wake);
        }
    }

    /// Drops the connection and registers again at once.
    pub async fn reconnect(&self) -> Result<(), SendError> {
        self.commands
            .send(Command::Reconnect)
            .await
            .map_err(|_| SendError::Stopping)
    }

    /// Accepts one encoded frame, after everything accepted before it;
    /// `deadline` bounds the wait for it to be written. The [`Ticket`] then
    /// tells how it went.
    pub async fn submit(&self, message: Outgoing, deadline: Instant) -> Result<Ticket, SendError> {
        self.submit_all(vec![message], deadline).await
    }

    /// Accepts several encoded frames as one: they are written together and
    /// in order, after everything accepted before them, and one [`Ticket`]
    /// tells how it went for all of them. This is how a stream of sends
    /// avoids paying for each message's confirmation on its own. Waits for
    /// room in the queue until `deadline`.
    pub async fn submit_all(
        &self,
        frames: Vec<Outgoing>,
        deadline: Instant,
    ) -> Result<Ticket, SendError> {
        {
            let now = self.status.borrow();
            match now.state {
                ConnectionState::Failed => {
                    return Err(SendError::Failed {
                        code: now.close_code,
                        detail: now.detail.clone(),
                    });
                }
                ConnectionState::Stopping => return Err(SendError::Stopping),
                ConnectionState::Idle => {
                    drop(now);
                    self.wake();
                }
                _ => {}
            }
        }
        let (reply, answer) = oneshot::channel();
        let claim = Claim::default();
        let entry = Entry {
            frames,
            deadline,
            reply,
            claim: claim.clone(),
        };
        match self.outbox.try_send(entry) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(entry)) => {
                match timeout_at(deadline, self.outbox.send(entry)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(SendError::Stopping),
                    Err(_) => return Err(not_sent(&self.status, "the send queue stayed full")),
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(SendError::Stopping),
        }
        Ok(Ticket {
            answer,
            claim,
            deadline,
            status: self.status.clone(),
        })
    }
}

/// Frames accepted by the link, on their way to the relay.
#[derive(Debug)]
pub struct Ticket {
    answer: oneshot::Receiver<Answer>,
    claim: Claim,
    deadline: Instant,
    status: watch::Receiver<LinkStatus>,
}

impl Ticket {
    /// Waits until the relay has handled the frames, or it is known that
    /// they were not (or may not have been) sent. Frames not written by the
    /// deadline are withdrawn and reported as not sent; once written, the
    /// link answers within its confirmation timeout.
    pub async fn outcome(self) -> Result<(), SendError> {
        let Ticket {
            mut answer,
            claim,
            deadline,
            status,
        } = self;
        let answered = tokio::select! {
            biased;
            answered = &mut answer => answered,
            () = sleep_until(deadline) => {
                if claim.take() {
                    return Err(not_sent(&status, ""));
                }
                // The writer took it first: it has been written.
                answer.await
            }
        };
        match answered {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Undelivered::Expired)) => Err(not_sent(&status, "")),
            Ok(Err(Undelivered::Unconfirmed(why))) => Err(SendError::Unconfirmed(why)),
            Ok(Err(Undelivered::Failed { code, detail })) => {
                Err(SendError::Failed { code, detail })
            }
            Ok(Err(Undelivered::Stopping)) | Err(_) => Err(SendError::Stopping),
        }
    }
}

/// Nothing was sent before the deadline; says what the link was doing.
fn not_sent(status: &watch::Receiver<LinkStatus>, why: &str) -> SendError {
    let now = status.borrow();
    let detail = if why.is_empty() {
        now.detail.clone()
    } else {
        why.to_owned()
    };
    SendError::NotRegistered {
        state: now.state,
        detail,
    }
}
