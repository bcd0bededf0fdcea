//! The supervisor: the task that owns the link for the daemon's lifetime. It
//! connects, serves each registered connection as a [`session`], waits out
//! backoff, stays FAILED when retrying cannot help, and keeps the outbox in
//! between. The state machine ([`ConnectionState`]) lives here and only
//! here: every transition goes through [`Connection::publish`], which logs
//! it and broadcasts it.
//!
//! [`session`]: super::session

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::backoff::{Backoff, Next};
use super::handle::Handle;
use super::handshake::{self, AttemptError, describe_close};
use super::outbox::{Outbox, Undelivered};
use super::session::{self, Link, SessionEnd};
use super::{Command, LinkOptions, OUTBOX_ENTRIES, UNRECOVERABLE};
use crate::router::Router;
use crate::status::{ConnectionState, Counters, LinkStatus};

/// Reconnect and Wake requests waiting for the supervisor: callers of
/// Reconnect wait for room, and one Wake is as good as many.
const COMMAND_QUEUE: usize = 16;

/// The task that owns the relay link. Create with [`Connection::new`],
/// then spawn [`Connection::run`].
#[derive(Debug)]
pub struct Connection {
    options: LinkOptions,
    router: Arc<Router>,
    counters: Arc<Counters>,
    commands: mpsc::Receiver<Command>,
    status: watch::Sender<LinkStatus>,
    shutdown: CancellationToken,
    /// Between sessions; lent to each session's writer.
    outbox: Option<Outbox>,
    backoff: Backoff,
    registrations: u64,
    /// The close code of the last connection closed with one.
    last_close: Option<u16>,
}

/// How a connection attempt ended.
enum Attempt {
    /// Boxed: a socket is large, and this is made once per connection.
    Registered(Box<handshake::Socket>),
    Failed(AttemptError),
    /// A Reconnect came first: start over.
    Restart,
    Shutdown,
}

/// What follows a lost connection or a failed attempt.
enum Verdict {
    Retry {
        delay: std::time::Duration,
        detail: String,
    },
    Fail {
        detail: String,
    },
}

impl Connection {
    pub fn new(
        options: LinkOptions,
        router: Arc<Router>,
        counters: Arc<Counters>,
        shutdown: CancellationToken,
    ) -> (Connection, Handle) {
        let first = if options.lazy {
            ConnectionState::Idle
        } else {
            ConnectionState::Connecting
        };
        let (status_tx, status_rx) = watch::channel(LinkStatus::new(first));
        let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE);
        let (outbox_tx, outbox) = Outbox::new(OUTBOX_ENTRIES);
        let backoff = Backoff::new(
            options.backoff_initial,
            options.backoff_max,
            options.registration_timeout,
        );
        let connection = Connection {
            options,
            router,
            counters,
            commands: command_rx,
            status: status_tx,
            shutdown,
            outbox: Some(outbox),
            backoff,
            registrations: 0,
            last_close: None,
        };
        let handle = Handle {
            outbox: outbox_tx,
            commands: command_tx,
            status: status_rx,
        };
        (connection, handle)
    }

    /// The one place a state changes: logged, then broadcast.
    fn publish(&self, state: ConnectionState, detail: String, retry_at: Option<Instant>) {
        let next = LinkStatus {
            state,
            close_code: self.last_close,
            detail,
            attempt: self.backoff.failures(),
            retry_at,
        };
        let previous = self.status.borrow().state;
        if previous != next.state {
            info!(
                from = %previous,
                to = %next.state,
                attempt = next.attempt,
                close_code = next.close_code,
                detail = (!next.detail.is_empty()).then_some(next.detail.as_str()),
                "relay connection state"
            );
        }
        self.status.send_replace(next);
    }

    /// Connects, registers and reconnects until shutdown.
    pub async fn run(mut self) {
        if self.options.lazy && !self.wait_for_first_use().await {
            return self.stop();
        }
        loop {
            self.publish(ConnectionState::Connecting, String::new(), None);
            let verdict = match self.attempt().await {
                Attempt::Registered(socket) => match self.serve(*socket).await {
                    Some(verdict) => verdict,
                    None if self.shutdown.is_cancelled() => break,
                    None => continue,
                },
                Attempt::Failed(error) => self.attempt_failed(error),
                Attempt::Restart => continue,
                Attempt::Shutdown => break,
            };
            let go_on = match verdict {
                Verdict::Retry { delay, detail } => self.wait_to_retry(delay, detail).await,
                Verdict::Fail { detail } => self.failed(detail).await,
            };
            if !go_on {
                break;
            }
        }
        self.stop();
    }

    /// One connection attempt.
    async fn attempt(&mut self) -> Attempt {
        let attempt = handshake::connect(&self.options, &self.counters);
        tokio::pin!(attempt);
        loop {
            tokio::select! {
                result = &mut attempt => return match result {
                    Ok(socket) => Attempt::Registered(Box::new(socket)),
                    Err(error) => Attempt::Failed(error),
                },
                () = self.shutdown.cancelled() => return Attempt::Shutdown,
                command = self.commands.recv() => match between_sessions(command, &mut self.backoff) {
                    Some(true) => return Attempt::Restart,
                    Some(false) => return Attempt::Shutdown,
                    None => {}
                },
            }
        }
    }

    /// Serves a registered connection. `None` to connect again at once (a
    /// Reconnect) or to stop; otherwise what to do next.
    async fn serve(&mut self, socket: handshake::Socket) -> Option<Verdict> {
        self.registrations += 1;
        if self.registrations > 1 {
            Counters::add(&self.counters.reconnects, 1);
        }
        self.backoff.registered();
        self.publish(ConnectionState::Registered, String::new(), None);
        let registered = Instant::now();
        let outbox = self
            .outbox
            .take()
            .expect("the outbox is home between sessions");
        let (end, outbox) = session::run(
            socket,
            outbox,
            Link {
                options: &self.options,
                router: &self.router,
                counters: &self.counters,
                commands: &mut self.commands,
                shutdown: &self.shutdown,
            },
        )
        .await;
        self.outbox = Some(outbox);
        let detail = end.describe();
        let code = match end {
            SessionEnd::Shutdown => return None,
            SessionEnd::Reconnect => {
                self.backoff.reset();
                self.last_close = Some(1000);
                return None;
            }
            SessionEnd::Closed { code, .. } => code,
            SessionEnd::Lost(_) => None,
        };
        if code.is_some() {
            self.last_close = code;
        }
        if code.is_some_and(|c| UNRECOVERABLE.contains(&c)) {
            return Some(Verdict::Fail { detail });
        }
        Some(
            match self.backoff.session_ended(code, registered.elapsed()) {
                Next::Retry(delay) => Verdict::Retry { delay, detail },
                Next::Displaced(why) => Verdict::Fail { detail: why },
            },
        )
    }

    fn attempt_failed(&mut self, error: AttemptError) -> Verdict {
        let (code, detail) = match error {
            AttemptError::Refused(why) => {
                return Verdict::Fail {
                    detail: format!("registration refused: {why}"),
                };
            }
            AttemptError::Closed { code, reason } if code.is_none() && !reason.is_empty() => {
                (None, reason)
            }
            AttemptError::Closed { code, reason } => (code, describe_close(code, &reason)),
            AttemptError::Other(why) => (None, why),
        };
        if code.is_some() {
            self.last_close = code;
        }
        if code.is_some_and(|c| UNRECOVERABLE.contains(&c)) {
            return Verdict::Fail { detail };
        }
        Verdict::Retry {
            delay: self.backoff.attempt_failed(),
            detail,
        }
    }

    fn stop(&mut self) {
        let last = self.status.borrow().detail.clone();
        self.publish(ConnectionState::Stopping, last, None);
        // Anyone still waiting is told at once.
        self.commands.close();
        if let Some(outbox) = self.outbox.as_mut() {
            outbox.close();
            outbox.refuse_all(|| Undelivered::Stopping);
        }
    }

    /// Lazy mode: waits for the first use. False on shutdown.
    async fn wait_for_first_use(&mut self) -> bool {
        tokio::select! {
            command = self.commands.recv() => command.is_some(),
            () = self.shutdown.cancelled() => false,
        }
    }

    /// Waits out one retry delay; sends queued meanwhile wait in the outbox
    /// (within their deadlines). False on shutdown.
    async fn wait_to_retry(&mut self, delay: std::time::Duration, detail: String) -> bool {
        let retry_at = Instant::now() + delay;
        warn!(
            attempt = self.backoff.failures(),
            delay_ms = delay.as_millis() as u64,
            close_code = self.last_close,
            %detail,
            "relay connection will retry"
        );
        self.publish(ConnectionState::Backoff, detail, Some(retry_at));
        loop {
            tokio::select! {
                () = sleep_until(retry_at) => return true,
                () = self.shutdown.cancelled() => return false,
                command = self.commands.recv() => {
                    if let Some(go_on) = between_sessions(command, &mut self.backoff) {
                        return go_on;
                    }
                }
            }
        }
    }

    /// Stays FAILED until a Reconnect (true) or shutdown (false); every
    /// send, queued or new, is refused with the reason.
    async fn failed(&mut self, detail: String) -> bool {
        tracing::error!(close_code = self.last_close, %detail, "relay connection failed: not retrying until Reconnect");
        self.publish(ConnectionState::Failed, detail.clone(), None);
        let code = self.last_close;
        let refusal = || Undelivered::Failed {
            code,
            detail: detail.clone(),
        };
        let outbox = self
            .outbox
            .as_mut()
            .expect("the outbox is home between sessions");
        outbox.refuse_all(refusal);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return false,
                command = self.commands.recv() => {
                    if let Some(go_on) = between_sessions(command, &mut self.backoff) {
                        return go_on;
                    }
                }
                entry = outbox.next() => match entry {
                    Some(entry) => entry.refuse(refusal()),
                    None => return false,
                },
            }
        }
    }
}

/// What a command means while no session runs: `Some(true)` to connect
/// now (a Reconnect, which also starts the delays afresh), `Some(false)` to
/// stop (every handle is gone), `None` to go on waiting (a Wake).
fn between_sessions(command: Option<Command>, backoff: &mut Backoff) -> Option<bool> {
    match command {
        Some(Command::Reconnect) => {
            backoff.reset();
            Some(true)
        }
        Some(Command::Wake) => None,
        None => Some(false),
    }
}
