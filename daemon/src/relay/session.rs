//! One registered connection, from registration to its end. The socket is
//! split between a [`Reader`] and a [`Writer`] task that never wait on each
//! other; the session itself only watches: it pings on time (the timeout is
//! a deadline set when the ping goes out), fails the link when the relay
//! stops confirming, and closes cleanly on request. When it ends, what was
//! written and not confirmed is answered UNKNOWN, and the outbox, with
//! everything not yet written, goes back to the supervisor for the next one.

use futures_util::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::handshake::{Socket, describe_close};
use super::outbox::{Entry, Outbox};
use super::pings::Pings;
use super::probes::{Confirmations, ProbeTag};
use super::reader::{Reader, ReaderEnd};
use super::writer::{Control, Writer, WriterEnd};
use super::{CLOSE_GRACE, Command, LinkOptions};
use crate::router::Router;
use crate::status::Counters;

/// Pings and close requests waiting for the writer. One ping is out at a
/// time, so this only has to hold that and a close.
const CONTROL_QUEUE: usize = 4;

/// What the reader, the writer and the session share.
#[derive(Debug, Default)]
pub(super) struct Shared {
    confirmations: Mutex<Confirmations>,
    /// Room has come free in the in-flight window.
    pub(super) window: Notify,
    /// Nothing is left unconfirmed.
    drained: Notify,
    /// A probe came back with batches still waiting: the writer may owe the
    /// next one.
    pub(super) probe_wanted: Notify,
    /// The highest ping number answered.
    pong: AtomicU64,
}

impl Shared {
    /// Never held across an `.await`; the bookkeeping is whole between
    /// calls, so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, Confirmations> {
        self.confirmations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn in_flight(&self) -> usize {
        self.lock().in_flight()
    }

    /// Records a batch about to be written; the probe to follow it, if one
    /// is due (see [`Confirmations::commit`]).
    pub(super) fn commit(
        &self,
        batch: &mut Vec<Entry>,
        me: Uuid,
        out: &mut Vec<String>,
    ) -> Option<u64> {
        self.lock().commit(batch, me, out)
    }

    /// The probe the writer should write now, if one is due.
    pub(super) fn probe_due(&self) -> Option<u64> {
        self.lock().probe_due()
    }

    /// Probe `seq` came back; returns how many sends that confirmed. Tells
    /// the writer when batches wait for the next probe.
    pub(super) fn confirm(&self, seq: u64) -> u64 {
        let (sent, empty) = {
            let mut confirmations = self.lock();
            let sent = confirmations.confirm(seq);
            (sent, confirmations.is_empty())
        };
        self.window.notify_one();
        if empty {
            self.drained.notify_one();
        } else {
            self.probe_wanted.notify_one();
        }
        sent
    }

    pub(super) fn wrote_to(&self, peer: &Uuid) -> bool {
        self.lock().wrote_to(peer)
    }

    pub(super) fn pong(&self, n: u64) {
        self.pong.fetch_max(n, Ordering::Relaxed);
    }
}

/// How a session ended.
#[derive(Debug)]
pub(super) enum SessionEnd {
    /// The daemon is stopping; the relay got a clean close.
    Shutdown,
    /// A Reconnect was asked for; the relay got a clean close.
    Reconnect,
    /// The relay closed the connection.
    Closed { code: Option<u16>, reason: String },
    /// The connection broke, or was found dead or broken, without a close
    /// from the relay.
    Lost(String),
}

impl SessionEnd {
    /// In words, for the status, the log and UNKNOWN answers.
    pub(super) fn describe(&self) -> String {
        match self {
            SessionEnd::Shutdown => "the daemon is stopping".into(),
            SessionEnd::Reconnect => "reconnect requested".into(),
            SessionEnd::Closed { code, reason } => describe_close(*code, reason),
            SessionEnd::Lost(why) => why.clone(),
        }
    }
}

/// What a session uses of the link's.
pub(super) struct Link<'a> {
    pub(super) options: &'a LinkOptions,
    pub(super) router: &'a Arc<Router>,
    pub(super) counters: &'a Arc<Counters>,
    pub(super) commands: &'a mut mpsc::Receiver<Command>,
    pub(super) shutdown: &'a CancellationToken,
}

/// Serves one registered connection until it ends; returns how, and the
/// outbox.
pub(super) async fn run(socket: Socket, outbox: Outbox, link: Link<'_>) -> (SessionEnd, Outbox) {
    let options = link.options;
    let (sink, stream) = socket.split();
    let tag = ProbeTag::new(options.uuid);
    let shared = Arc::new(Shared::default());
    let cancel = CancellationToken::new();
    let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let reader = tokio::spawn(
        Reader {
            stream,
            shared: Arc::clone(&shared),
            tag: tag.clone(),
            me: options.uuid,
            dialect: options.dialect,
            router: Arc::clone(link.router),
            counters: Arc::clone(link.counters),
        }
        .run(cancel.clone()),
    );
    let writer = tokio::spawn(
        Writer {
            sink,
            outbox,
            control: control_rx,
            shared: Arc::clone(&shared),
            tag,
            me: options.uuid,
            name: options.name.clone(),
            batch: Vec::new(),
            frames: Vec::new(),
        }
        .run(cancel.clone()),
    );
    let mut session = Session {
        options,
        shared,
        control,
        cancel,
        reader: Some(reader),
        writer: Some(writer),
        outbox: None,
    };
    let event = session.watch(link.commands, link.shutdown).await;
    let end = session.finish(event).await;
    session.cancel.cancel();
    if let Some(reader) = session.reader.take() {
        joined(reader).await;
    }
    if let Some(writer) = session.writer.take() {
        session.outbox = Some(joined(writer).await.0);
    }
    // Whatever the relay had not confirmed may or may not have gone.
    session.shared.lock().fail_all(&end.describe());
    let outbox = session.outbox.expect("the writer hands the outbox back");
    (end, outbox)
}

/// What ended the watch.
enum Event {
    Reader(ReaderEnd),
    Writer(WriterEnd),
    Shutdown,
    Reconnect,
    /// Found dead or broken by the session itself.
    Failed(String),
}

struct Session<'a> {
    options: &'a LinkOptions,
    shared: Arc<Shared>,
    control: mpsc::Sender<Control>,
    cancel: CancellationToken,
    reader: Option<JoinHandle<ReaderEnd>>,
    writer: Option<JoinHandle<(Outbox, WriterEnd)>>,
    outbox: Option<Outbox>,
}

impl Session<'_> {
    /// Watches the connection until something ends it.
    async fn watch(
        &mut self,
        commands: &mut mpsc::Receiver<Command>,
        shutdown: &CancellationToken,
    ) -> Event {
        let options = self.options;
        let mut pings = Pings::new(Instant::now(), options.ping_interval, options.ping_timeout);
        let ping_timer = sleep_until(pings.next_at());
        let confirm_timer = sleep_until(Instant::now() + options.confirm_timeout);
        tokio::pin!(ping_timer, confirm_timer);
        let (reader, writer) = (
            self.reader.as_mut().expect("running"),
            self.writer.as_mut().expect("running"),
        );
        let event = loop {
            tokio::select! {
                end = &mut *reader => break Event::Reader(done(end)),
                end = &mut *writer => {
                    let (outbox, end) = done(end);
                    self.outbox = Some(outbox);
                    break Event::Writer(end);
                }
                () = shutdown.cancelled() => break Event::Shutdown,
                command = commands.recv() => match command {
                    Some(Command::Reconnect) => break Event::Reconnect,
                    Some(Command::Wake) => {}
                    None => break Event::Shutdown,
                },
                () = &mut ping_timer => {
                    let answered = self.shared.pong.load(Ordering::Relaxed);
                    match pings.due(Instant::now(), answered) {
                        Ok(Some(n)) => {
                            // A full queue means the writer is stuck: the
                            // deadline set now finds that out.
                            let _ = self.control.try_send(Control::Ping(n));
                        }
                        Ok(None) => {}
                        Err(why) => break Event::Failed(why),
                    }
                    ping_timer.as_mut().reset(pings.next_at());
                }
                () = &mut confirm_timer => {
                    let now = Instant::now();
                    let oldest = self.shared.lock().oldest();
                    match oldest.map(|at| at + options.confirm_timeout) {
                        Some(due) if due <= now => break Event::Failed(format!(
                            "no confirmation from the relay within confirm_timeout ({:?}): the \
                             connection counts as broken",
                            options.confirm_timeout
                        )),
                        Some(due) => confirm_timer.as_mut().reset(due),
                        None => confirm_timer.as_mut().reset(now + options.confirm_timeout),
                    }
                }
            }
        };
        match &event {
            Event::Reader(_) => self.reader = None,
            Event::Writer(_) => self.writer = None,
            _ => {}
        }
        event
    }

    /// Ends the connection the way `event` calls for.
    async fn finish(&mut self, event: Event) -> SessionEnd {
        match event {
            Event::Reader(ReaderEnd::Closed { code, reason }) => {
                // Answer the relay's close, briefly.
                let _ = self.control.try_send(Control::Close(None));
                self.writer_done(Instant::now() + CLOSE_GRACE).await;
                SessionEnd::Closed { code, reason }
            }
            Event::Reader(ReaderEnd::Lost(why)) => SessionEnd::Lost(why),
            Event::Writer(WriterEnd::Lost(why)) => {
                // The relay may have said why, just before.
                match self.reader_done(Instant::now() + CLOSE_GRACE).await {
                    Some(ReaderEnd::Closed { code, reason }) => SessionEnd::Closed { code, reason },
                    _ => SessionEnd::Lost(why),
                }
            }
            Event::Reader(ReaderEnd::Cancelled) | Event::Writer(_) => {
                SessionEnd::Lost("the connection's tasks ended".into())
            }
            Event::Failed(why) => {
                tracing::warn!(detail = %why, "dropping the relay connection");
                SessionEnd::Lost(why)
            }
            Event::Shutdown => {
                self.close(CloseCode::Normal, "relay-sidecar stopping")
                    .await;
                SessionEnd::Shutdown
            }
            Event::Reconnect => {
                tracing::info!("reconnect requested");
                self.close(CloseCode::Normal, "reconnect requested").await;
                SessionEnd::Reconnect
            }
        }
    }

    /// A clean close: stop writing new sends, let the relay confirm what it
    /// has, send a close frame and wait for its answer; each step within
    /// [`CLOSE_GRACE`].
    async fn close(&mut self, code: CloseCode, reason: &str) {
        let deadline = Instant::now() + CLOSE_GRACE;
        if timeout_at(deadline, self.control.send(Control::Hold))
            .await
            .is_ok()
        {
            let drained = async {
                loop {
                    let notified = self.shared.drained.notified();
                    if self.shared.lock().is_empty() {
                        return;
                    }
                    notified.await;
                }
            };
            let _ = timeout_at(deadline, drained).await;
        }
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let deadline = Instant::now() + CLOSE_GRACE;
        if timeout_at(deadline, self.control.send(Control::Close(Some(frame))))
            .await
            .is_ok()
        {
            self.reader_done(deadline).await;
        }
    }

    /// The reader's end, if it comes by `deadline`.
    async fn reader_done(&mut self, deadline: Instant) -> Option<ReaderEnd> {
        let reader = self.reader.as_mut()?;
        let end = timeout_at(deadline, reader).await.ok().map(done)?;
        self.reader = None;
        Some(end)
    }

    /// Waits for the writer to stop by itself, until `deadline`.
    async fn writer_done(&mut self, deadline: Instant) {
        let Some(writer) = self.writer.as_mut() else {
            return;
        };
        if let Ok(joined) = timeout_at(deadline, writer).await {
            self.outbox = Some(done(joined).0);
            self.writer = None;
        }
    }
}

/// A finished task's output; a panic in it goes on in the session.
fn done<T>(joined: Result<T, tokio::task::JoinError>) -> T {
    match joined {
        Ok(output) => output,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("a relay connection task was aborted: {e}"),
        },
    }
}

async fn joined<T>(task: JoinHandle<T>) -> T {
    done(task.await)
}
