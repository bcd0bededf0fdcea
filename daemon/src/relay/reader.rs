//! The session's reader task: the only one that reads the socket. It decodes
//! each frame and hands it on at once: probes to the confirmation
//! bookkeeping, pongs to the ping watch, everything else to the router,
//! which never blocks. It never writes and never waits for the writer, so
//! the relay can always hand us what it forwards.

use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use super::handshake::{Socket, close_parts};
use super::probes::{Probe, ProbeTag};
use super::session::Shared;
use crate::codec::{self, Dialect, Frame};
use crate::limits::LOG_SUMMARY_INTERVAL;
use crate::router::{PeerMessage, Router};
use crate::status::Counters;
use crate::summary::Summary;

/// Frames from the relay that the daemon skips: the relay can send them in
/// volume, so the first of each kind is logged, the rest counted (the
/// `undecodable` counter has them all) and mentioned with the next line.
static BINARY: Summary = Summary::new(LOG_SUMMARY_INTERVAL);
static UNDECODABLE: Summary = Summary::new(LOG_SUMMARY_INTERVAL);
static UNEXPECTED: Summary = Summary::new(LOG_SUMMARY_INTERVAL);

/// Why the reader stopped.
#[derive(Debug)]
pub(super) enum ReaderEnd {
    /// The relay sent a close frame.
    Closed { code: Option<u16>, reason: String },
    /// The connection broke or ended without a close frame.
    Lost(String),
    /// The session stopped it.
    Cancelled,
}

pub(super) struct Reader {
    pub(super) stream: SplitStream<Socket>,
    pub(super) shared: Arc<Shared>,
    pub(super) tag: ProbeTag,
    pub(super) me: Uuid,
    pub(super) dialect: Dialect,
    pub(super) router: Arc<Router>,
    pub(super) counters: Arc<Counters>,
}

impl Reader {
    /// Reads until the connection ends or the session cancels it.
    pub(super) async fn run(mut self, cancel: CancellationToken) -> ReaderEnd {
        tokio::select! {
            biased;
            () = cancel.cancelled() => ReaderEnd::Cancelled,
            end = self.serve() => end,
        }
    }

    async fn serve(&mut self) -> ReaderEnd {
        loop {
            match self.stream.next().await {
                Some(Ok(Message::Text(text))) => self.on_text(&text),
                Some(Ok(Message::Pong(payload))) => {
                    if let Ok(n) = <[u8; 8]>::try_from(payload.as_ref()) {
                        self.shared.pong(u64::from_be_bytes(n));
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = close_parts(frame);
                    return ReaderEnd::Closed { code, reason };
                }
                Some(Ok(Message::Binary(_))) => {
                    Counters::add(&self.counters.undecodable, 1);
                    if let Some(earlier) = BINARY.note() {
                        warn!(earlier, "binary frame from the relay skipped");
                    }
                }
                // tungstenite answers pings itself.
                Some(Ok(Message::Ping(_) | Message::Frame(_))) => {}
                Some(Err(e)) => return ReaderEnd::Lost(format!("connection lost: {e}")),
                None => {
                    return ReaderEnd::Lost("the connection ended without a close frame".into());
                }
            }
        }
    }

    /// Handles one text frame from the relay. Never fails: what does not
    /// decode is counted and logged.
    fn on_text(&self, text: &str) {
        let peer = match codec::decode(text, self.dialect) {
            Ok(Frame::Peer(peer)) => peer,
            Ok(Frame::Response(response)) => {
                if let Some(earlier) = UNEXPECTED.note() {
                    warn!(
                        earlier,
                        success = response.success,
                        message = response.message.as_deref(),
                        "relay response outside registration"
                    );
                }
                return;
            }
            Ok(Frame::Registration(_)) => {
                Counters::add(&self.counters.undecodable, 1);
                if let Some(earlier) = UNEXPECTED.note() {
                    warn!(earlier, "the relay sent a registration request: skipped");
                }
                return;
            }
            Err(e) => {
                Counters::add(&self.counters.undecodable, 1);
                if let Some(earlier) = UNDECODABLE.note() {
                    warn!(error = %e, len = text.len(), earlier, "undecodable frame from the relay skipped");
                }
                return;
            }
        };
        match self.tag.check(&peer) {
            Probe::Ours(seq) => {
                let sent = self.shared.confirm(seq);
                Counters::add(&self.counters.sent, sent);
                Counters::add(&self.counters.confirmations, u64::from(sent > 0));
                return;
            }
            Probe::Stale => {
                debug!("another session's probe skipped");
                return;
            }
            Probe::No => {}
        }
        // The relay routes by peer_uuid, so what it forwards to us has ours
        // there; only a message it returns to us can have another. And the
        // relay checks no source_uuid: a peer can claim ours, with an error.
        let bounced = peer.source_uuid == self.me
            && peer.error.is_some()
            && peer.peer_uuid != self.me
            && self.shared.wrote_to(&peer.peer_uuid);
        Counters::add(&self.counters.received, 1);
        if bounced {
            Counters::add(&self.counters.bounced, 1);
            debug!(peer = %peer.peer_uuid, error = peer.error.as_deref(), "relay returned a message");
        }
        self.router.dispatch(PeerMessage { peer, bounced });
    }
}
