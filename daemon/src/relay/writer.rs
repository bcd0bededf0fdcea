//! The session's writer task: the only one that writes to the socket. It
//! takes sends from the outbox in order, in batches, while the in-flight
//! window has room, and writes a probe after a batch when none is out (or
//! when the reader says one came back and batches wait); pings and close
//! frames come from the session over a small channel and go first, so order
//! on the wire has one owner. It never reads, and nothing it waits for
//! waits on it.

use std::sync::Arc;

use futures_util::SinkExt;
use futures_util::stream::SplitSink;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::handshake::Socket;
use super::outbox::{Entry, Outbox};
use super::probes::ProbeTag;
use super::session::Shared;
use super::{IN_FLIGHT_FRAMES, WRITE_BATCH};

/// What the session asks the writer to send, ahead of any send.
#[derive(Debug)]
pub(super) enum Control {
    /// A WebSocket ping carrying this number.
    Ping(u64),
    /// Take nothing more from the outbox (before a deliberate close).
    Hold,
    /// A close frame (`None`: answer the relay's close), then stop.
    Close(Option<CloseFrame>),
}

/// Why the writer stopped.
#[derive(Debug)]
pub(super) enum WriterEnd {
    /// It sent the close frame it was asked for.
    Closed,
    /// Writing failed.
    Lost(String),
    /// The session stopped it.
    Cancelled,
}

pub(super) struct Writer {
    pub(super) sink: SplitSink<Socket, Message>,
    pub(super) outbox: Outbox,
    pub(super) control: mpsc::Receiver<Control>,
    pub(super) shared: Arc<Shared>,
    pub(super) tag: ProbeTag,
    pub(super) me: Uuid,
    pub(super) name: String,
    /// Entries of the batch being put together (kept to reuse its memory).
    pub(super) batch: Vec<Entry>,
    /// Frames of the batch being written (likewise).
    pub(super) frames: Vec<String>,
}

impl Writer {
    /// Writes until cancelled, told to close, or the socket fails; then
    /// hands the outbox back with whatever it did not take.
    pub(super) async fn run(mut self, cancel: CancellationToken) -> (Outbox, WriterEnd) {
        let end = tokio::select! {
            biased;
            () = cancel.cancelled() => WriterEnd::Cancelled,
            end = self.serve() => end,
        };
        (self.outbox, end)
    }

    async fn serve(&mut self) -> WriterEnd {
        let mut holding = false;
        loop {
            tokio::select! {
                biased;
                control = self.control.recv() => match control {
                    Some(Control::Ping(n)) => {
                        let ping = Message::Ping(n.to_be_bytes().to_vec().into());
                        if let Err(e) = self.sink.send(ping).await {
                            return WriterEnd::Lost(format!("connection lost while writing: {e}"));
                        }
                    }
                    Some(Control::Hold) => holding = true,
                    Some(Control::Close(frame)) => {
                        let _ = match frame {
                            Some(frame) => self.sink.send(Message::Close(Some(frame))).await,
                            // tungstenite has queued its answer to the relay's close.
                            None => self.sink.close().await,
                        };
                        return WriterEnd::Closed;
                    }
                    None => return WriterEnd::Cancelled,
                },
                () = self.shared.probe_wanted.notified() => {
                    if let Some(seq) = self.shared.probe_due() {
                        let probe = Message::text(self.tag.frame(seq, &self.name));
                        if let Err(e) = self.sink.send(probe).await {
                            return WriterEnd::Lost(format!("connection lost while writing: {e}"));
                        }
                    }
                }
                first = Self::next_entry(&mut self.outbox, &self.shared), if !holding => {
                    if let Err(e) = self.write_batch(first).await {
                        return WriterEnd::Lost(format!("connection lost while writing: {e}"));
                    }
                }
            }
        }
    }

    /// The next entry to write, once the window has room for it. Cancel-safe:
    /// an entry not returned is still in the outbox.
    async fn next_entry(outbox: &mut Outbox, shared: &Shared) -> Entry {
        loop {
            // Room for at least one frame and its probe.
            while shared.in_flight() + 2 > IN_FLIGHT_FRAMES {
                shared.window.notified().await;
            }
            let Some(entry) = outbox.next().await else {
                // Closed only when the daemon stops, after the session.
                return std::future::pending().await;
            };
            let in_flight = shared.in_flight();
            if in_flight > 0 && in_flight + entry.frames.len() + 1 > IN_FLIGHT_FRAMES {
                outbox.put_back(entry);
                shared.window.notified().await;
                continue;
            }
            if let Some(entry) = entry.admit(Instant::now()) {
                return entry;
            }
        }
    }

    /// Writes `first` and whatever else is queued and fits (up to
    /// [`WRITE_BATCH`] frames and the window), then a probe unless one is
    /// out, with one flush. Its callers hear how it went when the probe that
    /// confirms it returns, or when the session ends.
    async fn write_batch(
        &mut self,
        first: Entry,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        let now = Instant::now();
        let in_flight = self.shared.in_flight();
        let mut frames = first.frames.len();
        self.batch.push(first);
        while frames < WRITE_BATCH {
            let Some(entry) = self.outbox.try_next() else {
                break;
            };
            if in_flight + frames + entry.frames.len() + 1 > IN_FLIGHT_FRAMES {
                self.outbox.put_back(entry);
                break;
            }
            if let Some(entry) = entry.admit(now) {
                frames += entry.frames.len();
                self.batch.push(entry);
            }
        }
        // Committed before the first byte goes out: from here on the
        // callers' answer is OK or UNKNOWN, never "not sent".
        let probe = self
            .shared
            .commit(&mut self.batch, self.me, &mut self.frames);
        for frame in self.frames.drain(..) {
            self.sink.feed(Message::text(frame)).await?;
        }
        if let Some(seq) = probe {
            self.sink
                .feed(Message::text(self.tag.frame(seq, &self.name)))
                .await?;
        }
        self.sink.flush().await
    }
}
