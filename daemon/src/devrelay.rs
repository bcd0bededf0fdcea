//! An embedded relay that speaks the ProxyStore relay protocol (either
//! dialect), for `--dev`, tests and benchmarks.
//!
//! It mirrors ProxyStore's own relay servers (1.1.0 for the current dialect,
//! 0.5.2 for the legacy one) minus authentication: every client is the same
//! user. Each connection is one task; the registry of clients maps a UUID to
//! that client's bounded outbound queue and is only locked between awaits.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::codec::{self, Dialect, Frame, PeerConnection, Registration, RelayResponse};

/// The largest frame or message a client may send: the `websockets` default
/// that the Python relays run with. Larger ones close the socket with 1009.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// How many frames may wait for one client before it counts as not reading
/// and is closed, so that it cannot stall the clients sending to it.
pub const OUTBOUND_QUEUE_FRAMES: usize = 1024;

/// The opening handshake's bound (the `websockets` `open_timeout`).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a closing socket may take to send our close frame and answer it;
/// this bounds [`DevRelay::stop`].
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (e.g. out of file descriptors), so that the
/// loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The current relay's close reasons, verbatim.
const REASON_UNKNOWN_MESSAGE: &str = "Unknown message type.";
const REASON_NOT_REGISTERED: &str =
    "ForbiddenError: Client has not registered and authenticated with the relay server.";
const REASON_DISPLACED: &str = "Relay received a registration with the same ID. \
     This might mean that the endpoint is running in multiple locations.";
/// Ours: the Python relays have no outbound queue (a slow reader blocks them).
const REASON_NOT_READING: &str = "Outbound queue full: the client is not reading.";

/// A running embedded relay. Dropping it stops it without waiting;
/// [`DevRelay::stop`] also waits until every connection is closed.
#[derive(Debug)]
pub struct DevRelay {
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl DevRelay {
    /// Binds `addr` (port 0 picks a free port) and serves there until
    /// `shutdown` is cancelled or the relay is stopped or dropped.
    pub async fn start(
        addr: SocketAddr,
        dialect: Dialect,
        shutdown: CancellationToken,
    ) -> io::Result<DevRelay> {
        let listener = TcpListener::bind(addr).await?;
        DevRelay::serve(listener, dialect, shutdown)
    }

    /// Serves on an already-bound listener in a new task, until `shutdown`
    /// is cancelled or the relay is stopped or dropped.
    pub fn serve(
        listener: TcpListener,
        dialect: Dialect,
        shutdown: CancellationToken,
    ) -> io::Result<DevRelay> {
        let local_addr = listener.local_addr()?;
        // A child token, so that stopping this relay does not cancel the
        // caller's token.
        let shutdown = shutdown.child_token();
        let task = tokio::spawn(run(listener, dialect, shutdown.clone()));
        Ok(DevRelay {
            local_addr,
            shutdown,
            task: Some(task),
        })
    }

    /// The address the relay listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The relay's WebSocket URL, `ws://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("ws://{}", self.local_addr)
    }

    /// Closes every client with 1001 (going away), stops accepting and waits
    /// for all of the relay's tasks to end.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            warn!(error = %e, "dev relay task failed");
        }
    }
}

impl Drop for DevRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Serves the relay protocol on `listener` in the current task until
/// `shutdown` is cancelled, then closes every client with 1001 and returns
/// once all of their tasks have ended.
pub async fn run(listener: TcpListener, dialect: Dialect, shutdown: CancellationToken) {
    let relay = Arc::new(Relay {
        dialect,
        clients: Mutex::new(HashMap::new()),
    });
    let tracker = TaskTracker::new();
    let mut next_conn: u64 = 0;
    info!(addr = ?listener.local_addr().ok(), %dialect, "dev relay listening");
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, addr)) => {
                next_conn += 1;
                tracker.spawn(connection(
                    relay.clone(),
                    tcp,
                    addr,
                    next_conn,
                    shutdown.clone(),
                ));
            }
            Err(e) => {
                warn!(error = %e, "dev relay failed to accept a connection");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    info!(%dialect, "dev relay stopped");
}

/// State shared by all connections.
struct Relay {
    dialect: Dialect,
    clients: Mutex<HashMap<Uuid, Registered>>,
}

impl Relay {
    /// Never held across an `.await`; a panic while it was held cannot leave
    /// the map half-updated, so a poisoned lock is still usable.
    fn clients(&self) -> MutexGuard<'_, HashMap<Uuid, Registered>> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A registered client, as seen by the other connections.
struct Registered {
    conn: u64,
    name: String,
    outbox: Outbox,
}

/// What a connection's writer sends next.
enum Outbound {
    Text(Utf8Bytes),
    /// Sent after the frames queued before it.
    Close(CloseFrame),
}

/// The way into one connection's socket from any task, without waiting.
#[derive(Clone)]
struct Outbox {
    frames: mpsc::Sender<Outbound>,
    closer: Arc<Closer>,
}

impl Outbox {
    /// Queues a frame. A full queue means the client is not reading: it is
    /// closed instead and `false` returned.
    fn push(&self, text: Utf8Bytes) -> bool {
        match self.frames.try_send(Outbound::Text(text)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.closer.close(close_frame(1008, REASON_NOT_READING));
                false
            }
            // The connection is already ending.
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Closes the socket after the frames already queued, or at once if the
    /// queue is full.
    fn close(&self, frame: CloseFrame) {
        if let Err(mpsc::error::TrySendError::Full(Outbound::Close(frame))) =
            self.frames.try_send(Outbound::Close(frame))
        {
            self.closer.close(frame);
        }
    }
}

/// Asks a connection to close now, whatever is queued for it.
#[derive(Default)]
struct Closer {
    frame: Mutex<Option<CloseFrame>>,
    requested: Notify,
}

impl Closer {
    fn close(&self, frame: CloseFrame) {
        self.frame
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(frame);
        self.requested.notify_one();
    }

    async fn requested(&self) -> CloseFrame {
        self.requested.notified().await;
        self.frame
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| close_frame(1001, ""))
    }
}

/// How a connection ends.
enum End {
    /// The client closed, or the socket broke: nothing more to send.
    Gone,
    /// We close with this frame and wait for the client's answer.
    Close(CloseFrame),
    /// The client sent an oversized frame: the rest of the stream cannot be
    /// parsed, so we close with this frame and discard what is still coming.
    TooBig(CloseFrame),
}

type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;
type Source = SplitStream<WebSocketStream<TcpStream>>;

/// One client connection, from the TCP accept to the close.
async fn connection(
    relay: Arc<Relay>,
    tcp: TcpStream,
    addr: SocketAddr,
    conn: u64,
    shutdown: CancellationToken,
) {
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(conn, error = %e, "could not set TCP_NODELAY");
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(crate::relay::READ_BUFFER_BYTES)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let handshake = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::accept_async_with_config(tcp, Some(config)),
    );
    let ws = tokio::select! {
        _ = shutdown.cancelled() => return,
        ws = handshake => match ws {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                debug!(conn, %addr, error = %e, "WebSocket handshake failed");
                return;
            }
            Err(_) => {
                debug!(conn, %addr, "WebSocket handshake timed out");
                return;
            }
        },
    };
    debug!(conn, %addr, "client connected");

    let (frames, mut queued) = mpsc::channel(OUTBOUND_QUEUE_FRAMES);
    let closer = Arc::new(Closer::default());
    let (mut sink, mut source) = ws.split();
    let mut session = Session {
        relay,
        conn,
        addr,
        outbox: Outbox {
            frames,
            closer: closer.clone(),
        },
        registered: None,
    };
    let end = tokio::select! {
        end = session.read(&mut source) => end,
        end = write(&mut sink, &mut queued) => end,
        frame = closer.requested() => End::Close(frame),
        _ = shutdown.cancelled() => End::Close(close_frame(1001, "")),
    };
    // Out of the registry before the close, so that nothing more is routed
    // here.
    session.unregister();
    finish(sink, source, end, conn).await;
    debug!(conn, %addr, "client disconnected");
}

/// Writes queued frames, batching whatever is already waiting into one flush.
async fn write(sink: &mut Sink, queued: &mut mpsc::Receiver<Outbound>) -> End {
    while let Some(mut next) = queued.recv().await {
        loop {
            match next {
                Outbound::Text(text) => {
                    if let Err(e) = sink.feed(Message::Text(text)).await {
                        debug!(error = %e, "write failed");
                        return End::Gone;
                    }
                }
                Outbound::Close(frame) => return End::Close(frame),
            }
            match queued.try_recv() {
                Ok(more) => next = more,
                Err(_) => break,
            }
        }
        if let Err(e) = sink.flush().await {
            debug!(error = %e, "write failed");
            return End::Gone;
        }
    }
    // The session holds a sender for as long as this runs.
    End::Gone
}

/// Sends our close frame, if any, and lets the closing handshake finish,
/// within [`CLOSE_TIMEOUT`]. Dropping the halves then closes the TCP socket.
async fn finish(mut sink: Sink, mut source: Source, end: End, conn: u64) {
    let closing = async {
        match end {
            End::Gone => {
                // Reading on flushes tungstenite's answer to a client's close.
                while let Some(Ok(_)) = source.next().await {}
            }
            End::Close(frame) => {
                debug!(conn, code = u16::from(frame.code), reason = %frame.reason, "closing");
                if sink.send(Message::Close(Some(frame))).await.is_ok() {
                    while let Some(Ok(_)) = source.next().await {}
                }
            }
            End::TooBig(frame) => {
                if sink.send(Message::Close(Some(frame))).await.is_err() {
                    return;
                }
                let Ok(ws) = source.reunite(sink) else {
                    return;
                };
                // Unread bytes at close would make the kernel reset the
                // connection, and the client might lose our close frame: so
                // send FIN and discard until the client hangs up.
                let mut tcp = ws.into_inner();
                if tcp.shutdown().await.is_err() {
                    return;
                }
                let mut discard = vec![0u8; 64 * 1024];
                while let Ok(1..) = tcp.read(&mut discard).await {}
            }
        }
    };
    if tokio::time::timeout(CLOSE_TIMEOUT, closing).await.is_err() {
        debug!(conn, "closing handshake timed out");
    }
}

/// One connection's protocol state.
struct Session {
    relay: Arc<Relay>,
    conn: u64,
    addr: SocketAddr,
    outbox: Outbox,
    /// The UUID this socket registered, once it has.
    registered: Option<Uuid>,
}

impl Session {
    /// Reads and handles frames until the connection must end.
    async fn read(&mut self, source: &mut Source) -> End {
        loop {
            let message = match source.next().await {
                None => return End::Gone,
                Some(Ok(message)) => message,
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                    warn!(conn = self.conn, size, max_size, "closing: message too big");
                    // The reasons the `websockets` versions under each relay give.
                    let reason = match self.relay.dialect {
                        Dialect::Current => {
                            format!("frame with {size} bytes exceeds limit of {max_size} bytes")
                        }
                        Dialect::Legacy => String::new(),
                    };
                    return End::TooBig(close_frame(1009, &reason));
                }
                Some(Err(WsError::Protocol(e))) => {
                    debug!(conn = self.conn, error = %e, "closing: protocol error");
                    return End::Close(close_frame(1002, &e.to_string()));
                }
                Some(Err(WsError::Utf8(e))) => {
                    debug!(conn = self.conn, error = %e, "closing: invalid UTF-8");
                    return End::Close(close_frame(1007, "invalid UTF-8"));
                }
                Some(Err(e)) => {
                    debug!(conn = self.conn, error = %e, "read failed");
                    return End::Gone;
                }
            };
            let handled = match message {
                Message::Text(text) => self.on_text(text),
                Message::Binary(bytes) => self.on_binary(bytes.len()),
                // tungstenite has queued the answer; `finish` flushes it.
                Message::Close(_) => return End::Gone,
                // tungstenite answers pings itself.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
            };
            if let Some(end) = handled {
                return end;
            }
        }
    }

    fn on_text(&mut self, text: Utf8Bytes) -> Option<End> {
        let dialect = self.relay.dialect;
        debug!(conn = self.conn, bytes = text.len(), "frame received");
        let frame = match codec::decode(&text, dialect) {
            Ok(frame) => frame,
            Err(e) => {
                return match dialect {
                    Dialect::Current => {
                        warn!(conn = self.conn, addr = %self.addr, error = %e, "closing: undecodable frame");
                        Some(End::Close(close_frame(4000, REASON_UNKNOWN_MESSAGE)))
                    }
                    Dialect::Legacy => {
                        warn!(conn = self.conn, addr = %self.addr, error = %e, "skipping undecodable frame");
                        None
                    }
                };
            }
        };
        match frame {
            Frame::Registration(registration) => self.register(registration),
            Frame::Peer(peer) => self.forward(peer, text),
            Frame::Response(_) => {
                // Both Python relays end the handler with an AssertionError on
                // a relay response from a client, which `websockets` turns
                // into 1011 (internal error).
                warn!(conn = self.conn, addr = %self.addr, "closing: client sent a relay response");
                Some(End::Close(close_frame(1011, "")))
            }
        }
    }

    fn on_binary(&mut self, len: usize) -> Option<End> {
        match self.relay.dialect {
            Dialect::Current => {
                warn!(conn = self.conn, addr = %self.addr, bytes = len, "closing: binary frame");
                Some(End::Close(close_frame(4000, REASON_UNKNOWN_MESSAGE)))
            }
            Dialect::Legacy => {
                // The 0.5.2 relay raises an AssertionError outside its decode
                // error handling, so `websockets` closes with 1011.
                warn!(conn = self.conn, addr = %self.addr, bytes = len, "closing: binary frame");
                Some(End::Close(close_frame(1011, "")))
            }
        }
    }

    fn register(&mut self, registration: Registration) -> Option<End> {
        let Registration { name, uuid } = registration;
        let dialect = self.relay.dialect;
        if dialect == Dialect::Legacy
            && let Some(current) = self.registered
        {
            // The 0.5.2 relay keeps a socket's first registration.
            info!(conn = self.conn, peer = %current, requested = %uuid, "already registered; keeping the registration");
            return self.reply_ok();
        }
        let displaced = {
            let mut clients = self.relay.clients();
            // A socket holds one registration: a new UUID replaces its old one.
            if let Some(old) = self.registered.filter(|old| *old != uuid)
                && clients.get(&old).is_some_and(|c| c.conn == self.conn)
            {
                clients.remove(&old);
            }
            let entry = Registered {
                conn: self.conn,
                name: name.clone(),
                outbox: self.outbox.clone(),
            };
            clients
                .insert(uuid, entry)
                .filter(|previous| previous.conn != self.conn)
        };
        if let Some(previous) = displaced {
            info!(peer = %uuid, name = %previous.name, conn = previous.conn, "closing the older connection of a re-registered client");
            previous.outbox.close(match dialect {
                Dialect::Current => close_frame(4004, REASON_DISPLACED),
                Dialect::Legacy => close_frame(1001, ""),
            });
        }
        self.registered = Some(uuid);
        info!(peer = %uuid, %name, conn = self.conn, addr = %self.addr, "registered");
        self.reply_ok()
    }

    fn forward(&mut self, mut peer: PeerConnection, text: Utf8Bytes) -> Option<End> {
        let dialect = self.relay.dialect;
        let Some(me) = self.registered else {
            return match dialect {
                Dialect::Current => {
                    warn!(conn = self.conn, addr = %self.addr, claimed = %peer.source_uuid, "closing: peer connection before registration");
                    Some(End::Close(close_frame(4002, REASON_NOT_REGISTERED)))
                }
                Dialect::Legacy => {
                    info!(conn = self.conn, addr = %self.addr, claimed = %peer.source_uuid, "refusing peer connection before registration");
                    self.reply(&Frame::Response(RelayResponse {
                        success: false,
                        message: Some("client has not registered yet".into()),
                        error: true,
                    }))
                }
            };
        };
        let target = peer.peer_uuid;
        let delivered = {
            let clients = self.relay.clients();
            clients.get(&target).map(|c| c.outbox.push(text))
        };
        match delivered {
            Some(true) => {
                debug!(from = %me, to = %target, "forwarded");
                None
            }
            Some(false) => {
                warn!(from = %me, to = %target, "dropped a message for a client that is not reading");
                None
            }
            None => {
                debug!(from = %me, to = %target, "bouncing a message for an unknown peer");
                peer.error = Some(match dialect {
                    Dialect::Current => format!(
                        "Cannot forward peer connection message to peer {target} because this peer is not registered this relay server."
                    ),
                    Dialect::Legacy => format!(
                        "Cannot forward peer connection message to peer {target} because this peer is unknown."
                    ),
                });
                self.reply(&Frame::Peer(peer))
            }
        }
    }

    fn reply_ok(&self) -> Option<End> {
        self.reply(&Frame::Response(RelayResponse {
            success: true,
            message: None,
            error: false,
        }))
    }

    /// Queues a frame for this socket, behind whatever was forwarded to it.
    fn reply(&self, frame: &Frame) -> Option<End> {
        let text = codec::encode(frame, self.relay.dialect);
        if self.outbox.push(text.into()) {
            None
        } else {
            Some(End::Close(close_frame(1008, REASON_NOT_READING)))
        }
    }

    /// Drops this socket's registration, unless a newer socket took it over.
    fn unregister(&mut self) {
        let Some(uuid) = self.registered.take() else {
            return;
        };
        let removed = {
            let mut clients = self.relay.clients();
            if clients.get(&uuid).is_some_and(|c| c.conn == self.conn) {
                clients.remove(&uuid)
            } else {
                None
            }
        };
        if let Some(client) = removed {
            info!(peer = %uuid, name = %client.name, conn = self.conn, "unregistered");
        }
    }
}

/// A close frame; the reason is cut to the 123 bytes a close frame can carry.
fn close_frame(code: u16, reason: &str) -> CloseFrame {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from(&reason[..end]),
    }
}
