//! The relay connection: one task owns the WebSocket to the relay, registers
//! this host's identity, reconnects with backoff, and is the only writer and
//! reader of the socket. Everyone else talks to it through a [`Handle`].
//!
//! The state machine ([`ConnectionState`]) lives here and only here: every
//! transition goes through [`Connection::publish`], which logs it and
//! broadcasts it on a watch channel.
//!
//! The relay never acknowledges a forward, so each batch of sends is followed
//! by a probe: a message from this host to itself. The relay handles one
//! socket's frames in order, so when the probe comes back every send before
//! it has been handled (forwarded, or returned as a bounce), and only then do
//! those senders hear OK. Sends whose probe is lost with the connection are
//! reported as unconfirmed, never as OK.

mod tls;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

pub use self::tls::{TlsError, client_config};
use crate::codec::{self, Dialect, Frame, Registration};
use crate::router::{PeerMessage, Router};
use crate::status::{ConnectionState, Counters, LinkStatus};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How many queued frames are gathered for one flush (a batch that
/// arrives as one, from a SendStream, is never split).
const WRITE_BATCH: usize = 64;

/// How much one read from a WebSocket asks for, bytes. tungstenite zeroes
/// this much of its buffer before every read (its default is 128 KiB), and
/// relay messages are a few hundred bytes: a larger frame just takes several
/// reads. The embedded relay uses the same.
pub const READ_BUFFER_BYTES: usize = 8 * 1024;
/// How long a clean close waits for the relay's answering close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Close codes after which retrying cannot help (PROTOCOL.md).
const UNRECOVERABLE: [u16; 3] = [4001, 4002, 4004];

/// Everything the connection needs to know, resolved from the settings.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub url: String,
    pub dialect: Dialect,
    pub uuid: Uuid,
    pub name: String,
    /// Extra headers for the opening handshake.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// A file holding a bearer token, read at every connect.
    pub token_file: Option<PathBuf>,
    /// TLS client configuration, used for `wss://` URLs.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub registration_timeout: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Wait for the first send or subscription before connecting.
    pub lazy: bool,
    pub max_message_bytes: usize,
}

/// Why a send did not reach a registered relay connection.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SendError {
    #[error("relay connection not registered in time (state {state}{})", detail_suffix(.detail))]
    NotRegistered {
        state: ConnectionState,
        detail: String,
    },
    #[error("relay connection failed{}: {detail}; call Reconnect once the cause is fixed", code_suffix(*.code))]
    Failed { code: Option<u16>, detail: String },
    #[error(
        "relay connection lost before the relay confirmed the message, which may or may not have been forwarded: {0}"
    )]
    Unconfirmed(String),
    #[error("the daemon is stopping")]
    Stopping,
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

fn code_suffix(code: Option<u16>) -> String {
    code.map(|c| format!(" (close code {c})"))
        .unwrap_or_default()
}

/// What the relay task tells a sender.
#[derive(Debug)]
enum Undelivered {
    /// Not registered right now; the frames come back to wait again.
    NotRegistered(Vec<String>),
    /// The deadline passed before the frame could be written.
    Expired,
    /// Written, but the connection ended before the relay confirmed it.
    Unconfirmed(String),
    /// The daemon stopped before the frame was written.
    Stopping,
}

type Reply = oneshot::Sender<Result<(), Undelivered>>;

/// Sends written to the relay, waiting for the probe written after them.
#[derive(Debug)]
struct Pending {
    probe: u64,
    /// How many frames the replies stand for.
    frames: u64,
    replies: Vec<Reply>,
}

#[derive(Debug)]
struct Outbound {
    /// Written together, in order, and confirmed together.
    frames: Vec<String>,
    deadline: Instant,
    reply: Reply,
}

#[derive(Debug)]
enum Command {
    Send(Outbound),
    Reconnect,
    Wake,
}

/// A cheap, cloneable way to use the relay connection.
#[derive(Debug, Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<LinkStatus>,
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

    /// Sends one encoded frame, waiting for registration until
    /// `deadline`. `Ok` means the relay has handled it.
    pub async fn send(&self, frame: String, deadline: Instant) -> Result<(), SendError> {
        self.submit(frame, deadline).await?.outcome().await
    }

    /// Queues one encoded frame for the relay, waiting for registration
    /// until `deadline`; the [`Ticket`] then tells how it went. Frames
    /// submitted one after another are written in that order.
    pub async fn submit(&self, frame: String, deadline: Instant) -> Result<Ticket, SendError> {
        self.submit_all(vec![frame], deadline).await
    }

    /// Queues several encoded frames for the relay, as one: they are
    /// written together and in order, and one [`Ticket`] tells how it went
    /// for all of them. This is how a stream of sends avoids paying for
    /// each message's confirmation on its own.
    pub async fn submit_all(
        &self,
        frames: Vec<String>,
        deadline: Instant,
    ) -> Result<Ticket, SendError> {
        // Registered is the usual case: no waiting, so none of its machinery.
        if self.status.borrow().state == ConnectionState::Registered {
            return self.enqueue(frames, deadline).await;
        }
        self.wake();
        let mut status = self.status.clone();
        let ready = timeout_at(deadline, async {
            status
                .wait_for(|s| {
                    matches!(
                        s.state,
                        ConnectionState::Registered
                            | ConnectionState::Failed
                            | ConnectionState::Stopping
                    )
                })
                .await
                .map(|guard| guard.clone())
        })
        .await;
        let now = match ready {
            Err(_) => return Err(self.not_registered()),
            Ok(Err(_)) => return Err(SendError::Stopping),
            Ok(Ok(now)) => now,
        };
        match now.state {
            ConnectionState::Failed => {
                return Err(SendError::Failed {
                    code: now.close_code,
                    detail: now.detail,
                });
            }
            ConnectionState::Stopping => return Err(SendError::Stopping),
            _ => {}
        }
        self.enqueue(frames, deadline).await
    }

    /// Hands a frame to the relay task, which writes it if still
    /// registered and sends it back otherwise.
    async fn enqueue(&self, frames: Vec<String>, deadline: Instant) -> Result<Ticket, SendError> {
        let (reply, answer) = oneshot::channel();
        let outbound = Outbound {
            frames,
            deadline,
            reply,
        };
        if self.commands.send(Command::Send(outbound)).await.is_err() {
            return Err(SendError::Stopping);
        }
        Ok(Ticket {
            handle: self.clone(),
            answer,
            deadline,
        })
    }

    fn not_registered(&self) -> SendError {
        let now = self.status();
        SendError::NotRegistered {
            state: now.state,
            detail: now.detail,
        }
    }
}

/// Frames on their way to the relay.
#[derive(Debug)]
pub struct Ticket {
    handle: Handle,
    answer: oneshot::Receiver<Result<(), Undelivered>>,
    deadline: Instant,
}

impl Ticket {
    /// Waits until the relay has handled the frames, or it is known that
    /// they were not (or may not have been) sent. Frames that met a lost
    /// registration before they were written are submitted again, within
    /// their deadline.
    pub async fn outcome(mut self) -> Result<(), SendError> {
        loop {
            match self.answer.await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(Undelivered::NotRegistered(frames))) => {
                    // Rare; boxed so that every send's outcome future stays
                    // small (SendStream keeps many of them).
                    self = Box::pin(self.handle.submit_all(frames, self.deadline)).await?;
                }
                Ok(Err(Undelivered::Expired)) => return Err(self.handle.not_registered()),
                Ok(Err(Undelivered::Unconfirmed(why))) => return Err(SendError::Unconfirmed(why)),
                Ok(Err(Undelivered::Stopping)) | Err(_) => return Err(SendError::Stopping),
            }
        }
    }
}

/// How a registered session ended.
enum SessionEnd {
    Shutdown,
    ReconnectRequested,
    Closed { code: Option<u16>, reason: String },
}

/// Why a connection attempt did not end registered.
enum AttemptError {
    /// The relay answered the registration with `success: false`.
    Refused(String),
    /// The relay closed the socket, with this code.
    Closed { code: Option<u16>, reason: String },
    /// Anything else: refused TCP connection, DNS, TLS, timeout, protocol.
    Other(String),
}

/// The task that owns the relay socket. Create with [`Connection::new`],
/// then spawn [`Connection::run`].
#[derive(Debug)]
pub struct Connection {
    options: LinkOptions,
    router: Arc<Router>,
    counters: Arc<Counters>,
    commands: mpsc::Receiver<Command>,
    status: watch::Sender<LinkStatus>,
    shutdown: CancellationToken,
    registrations: u64,
    /// Written sends waiting for their probe, oldest first.
    pending: VecDeque<Pending>,
    next_probe: u64,
    /// Marks this daemon's probes (random per start, so no peer's message
    /// can pass for one).
    probe_tag: String,
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
        let (command_tx, command_rx) = mpsc::channel(1024);
        let connection = Connection {
            options,
            router,
            counters,
            commands: command_rx,
            status: status_tx,
            shutdown,
            registrations: 0,
            pending: VecDeque::new(),
            next_probe: 0,
            probe_tag: format!("relay-sidecar-probe:{}:", Uuid::new_v4().simple()),
        };
        let handle = Handle {
            commands: command_tx,
            status: status_rx,
        };
        (connection, handle)
    }

    /// The one place a state changes: logged, then broadcast.
    fn publish(&self, next: LinkStatus) {
        let previous = self.status.borrow().state;
        if previous != next.state {
            info!(
                from = %previous,
                to = %next.state,
                attempt = next.attempt,
                close_code = next.close_code,
                detail = %next.detail,
                "relay connection state"
            );
        }
        self.status.send_replace(next);
    }

    /// Connects, registers and reconnects until shutdown.
    pub async fn run(mut self) {
        if self.options.lazy && !self.wait_for_first_use().await {
            self.stop();
            return;
        }
        let mut attempt: u32 = 0;
        let mut last_close: Option<u16> = None;
        loop {
            attempt += 1;
            self.publish(LinkStatus {
                state: ConnectionState::Connecting,
                close_code: last_close,
                detail: String::new(),
                attempt,
                retry_at: None,
            });
            let outcome = tokio::select! {
                outcome = self.attempt() => outcome,
                () = self.shutdown.cancelled() => break,
            };
            let (code, detail, recoverable) = match outcome {
                Ok(socket) => {
                    self.registrations += 1;
                    if self.registrations > 1 {
                        Counters::add(&self.counters.reconnects, 1);
                    }
                    attempt = 0;
                    self.publish(LinkStatus {
                        close_code: last_close,
                        ..LinkStatus::new(ConnectionState::Registered)
                    });
                    match self.session(socket).await {
                        SessionEnd::Shutdown => break,
                        SessionEnd::ReconnectRequested => {
                            last_close = Some(1000);
                            continue;
                        }
                        SessionEnd::Closed { code, reason } => {
                            let recoverable = !code.is_some_and(|c| UNRECOVERABLE.contains(&c));
                            (code, reason, recoverable)
                        }
                    }
                }
                Err(AttemptError::Refused(why)) => {
                    (None, format!("registration refused: {why}"), false)
                }
                Err(AttemptError::Closed { code, reason }) => {
                    let recoverable = !code.is_some_and(|c| UNRECOVERABLE.contains(&c));
                    (code, reason, recoverable)
                }
                Err(AttemptError::Other(why)) => (None, why, true),
            };
            if code.is_some() {
                last_close = code;
            }
            let go_on = if recoverable {
                self.backoff(attempt.max(1), last_close, detail).await
            } else {
                self.failed(last_close, detail).await
            };
            match go_on {
                Some(reset) => {
                    if reset {
                        attempt = 0;
                    }
                }
                None => break,
            }
        }
        self.stop();
    }

    fn stop(&mut self) {
        let last = self.status.borrow().clone();
        self.publish(LinkStatus {
            state: ConnectionState::Stopping,
            ..last
        });
        // Anyone still waiting is told at once.
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            if let Command::Send(out) = command {
                let _ = out.reply.send(Err(Undelivered::Stopping));
            }
        }
    }

    /// Lazy mode: waits for the first command. False on shutdown.
    async fn wait_for_first_use(&mut self) -> bool {
        tokio::select! {
            command = self.commands.recv() => match command {
                Some(command) => {
                    self.refuse(command);
                    true
                }
                None => false,
            },
            () = self.shutdown.cancelled() => false,
        }
    }

    /// Answers a command that arrives while not registered.
    fn refuse(&self, command: Command) {
        if let Command::Send(out) = command {
            let _ = out.reply.send(Err(Undelivered::NotRegistered(out.frames)));
        }
    }

    /// Waits out one backoff delay. `Some(true)` to retry with the attempt
    /// count reset (a Reconnect), `Some(false)` to retry, `None` on shutdown.
    async fn backoff(
        &mut self,
        attempt: u32,
        close_code: Option<u16>,
        detail: String,
    ) -> Option<bool> {
        let delay = backoff_delay(
            attempt,
            self.options.backoff_initial,
            self.options.backoff_max,
            &mut rand::rng(),
        );
        let retry_at = Instant::now() + delay;
        warn!(attempt, delay_ms = delay.as_millis() as u64, %detail, "relay connection will retry");
        self.publish(LinkStatus {
            state: ConnectionState::Backoff,
            close_code,
            detail,
            attempt,
            retry_at: Some(retry_at),
        });
        loop {
            tokio::select! {
                () = sleep_until(retry_at) => return Some(false),
                () = self.shutdown.cancelled() => return None,
                command = self.commands.recv() => match command {
                    Some(Command::Reconnect) => return Some(true),
                    Some(other) => self.refuse(other),
                    None => return None,
                },
            }
        }
    }

    /// Stays FAILED until a Reconnect (`Some(true)`) or shutdown (`None`).
    async fn failed(&mut self, close_code: Option<u16>, detail: String) -> Option<bool> {
        tracing::error!(close_code, %detail, "relay connection failed: not retrying until Reconnect");
        let attempt = self.status.borrow().attempt;
        self.publish(LinkStatus {
            state: ConnectionState::Failed,
            close_code,
            detail,
            attempt,
            retry_at: None,
        });
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return None,
                command = self.commands.recv() => match command {
                    Some(Command::Reconnect) => return Some(true),
                    Some(other) => self.refuse(other),
                    None => return None,
                },
            }
        }
    }

    /// Opens the WebSocket and registers, within the registration timeout.
    async fn attempt(&self) -> Result<Socket, AttemptError> {
        let deadline = Instant::now() + self.options.registration_timeout;
        let request = self.request()?;
        let connector = match &self.options.tls {
            Some(config) => Connector::Rustls(Arc::clone(config)),
            None => Connector::Plain,
        };
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .max_message_size(Some(self.options.max_message_bytes.max(1 << 20) * 2))
            .max_frame_size(Some(self.options.max_message_bytes.max(1 << 20) * 2));
        debug!(url = %self.options.url, "connecting to relay");
        let (mut socket, _) = timeout_at(
            deadline,
            tokio_tungstenite::connect_async_tls_with_config(
                request,
                Some(config),
                true,
                Some(connector),
            ),
        )
        .await
        .map_err(|_| AttemptError::Other("timed out opening the WebSocket".into()))?
        .map_err(|e| AttemptError::Other(format!("cannot open the WebSocket: {e}")))?;

        let registration = Frame::Registration(Registration {
            name: self.options.name.clone(),
            uuid: self.options.uuid,
        });
        socket
            .send(Message::text(codec::encode(
                &registration,
                self.options.dialect,
            )))
            .await
            .map_err(|e| AttemptError::Other(format!("cannot send the registration: {e}")))?;

        loop {
            let next = timeout_at(deadline, socket.next())
                .await
                .map_err(|_| AttemptError::Other("no answer to the registration in time".into()))?;
            match next {
                Some(Ok(Message::Text(text))) => match codec::decode(&text, self.options.dialect) {
                    Ok(Frame::Response(r)) if r.success => {
                        info!(uuid = %self.options.uuid, name = %self.options.name, url = %self.options.url, "registered with the relay");
                        return Ok(socket);
                    }
                    Ok(Frame::Response(r)) => {
                        return Err(AttemptError::Refused(
                            r.message.unwrap_or_else(|| "no reason given".into()),
                        ));
                    }
                    Ok(_) => {
                        return Err(AttemptError::Other(
                            "the relay answered the registration with an unexpected message".into(),
                        ));
                    }
                    Err(e) => {
                        Counters::add(&self.counters.undecodable, 1);
                        return Err(AttemptError::Other(format!(
                            "undecodable answer to the registration: {e}"
                        )));
                    }
                },
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = close_parts(frame);
                    return Err(AttemptError::Closed { code, reason });
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    return Err(AttemptError::Other(format!("during registration: {e}")));
                }
                None => {
                    return Err(AttemptError::Closed {
                        code: None,
                        reason: "closed during registration".into(),
                    });
                }
            }
        }
    }

    /// The handshake request: URL, extra headers, and the bearer token read
    /// fresh from its file.
    fn request(&self) -> Result<tungstenite::handshake::client::Request, AttemptError> {
        let mut request = self
            .options
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| AttemptError::Other(format!("relay.url: {e}")))?;
        let headers = request.headers_mut();
        for (name, value) in &self.options.headers {
            headers.append(name.clone(), value.clone());
        }
        if let Some(path) = &self.options.token_file {
            let token = std::fs::read_to_string(path).map_err(|e| {
                AttemptError::Other(format!(
                    "cannot read relay.token_file {}: {e}",
                    path.display()
                ))
            })?;
            let mut value =
                HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| {
                    AttemptError::Other(format!(
                        "relay.token_file {} holds characters not allowed in a header",
                        path.display()
                    ))
                })?;
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        Ok(request)
    }

    /// Serves one registered connection until it ends. Sends still waiting
    /// for confirmation then are told so.
    async fn session(&mut self, socket: Socket) -> SessionEnd {
        let end = self.serve_session(socket).await;
        let why = match &end {
            SessionEnd::Shutdown => "the daemon is stopping".to_owned(),
            SessionEnd::ReconnectRequested => "reconnect requested".to_owned(),
            SessionEnd::Closed { code, reason } => match code {
                Some(code) => format!("closed with {code}: {reason}"),
                None => reason.clone(),
            },
        };
        for pending in self.pending.drain(..) {
            for reply in pending.replies {
                let _ = reply.send(Err(Undelivered::Unconfirmed(why.clone())));
            }
        }
        end
    }

    async fn serve_session(&mut self, mut socket: Socket) -> SessionEnd {
        let mut ping = tokio::time::interval_at(
            Instant::now() + self.options.ping_interval,
            self.options.ping_interval,
        );
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping_sent: Option<Instant> = None;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    self.settle(&mut socket).await;
                    close(&mut socket, CloseCode::Normal, "relay-sidecar stopping").await;
                    return SessionEnd::Shutdown;
                }
                inbound = socket.next() => match inbound {
                    Some(Ok(Message::Text(text))) => self.on_text(&text),
                    Some(Ok(Message::Pong(_))) => ping_sent = None,
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = close_parts(frame);
                        // Let tungstenite send its answering close frame.
                        let _ = timeout_at(Instant::now() + CLOSE_GRACE, socket.close(None)).await;
                        return SessionEnd::Closed { code, reason };
                    }
                    Some(Ok(Message::Binary(_))) => {
                        Counters::add(&self.counters.undecodable, 1);
                        warn!("binary frame from the relay skipped");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        return SessionEnd::Closed { code: None, reason: format!("connection lost: {e}") };
                    }
                    None => {
                        return SessionEnd::Closed { code: None, reason: "connection closed without a close frame".into() };
                    }
                },
                command = self.commands.recv() => match command {
                    Some(Command::Send(first)) => {
                        if let Err(end) = self.write_batch(&mut socket, first).await {
                            return end;
                        }
                    }
                    Some(Command::Reconnect) => {
                        info!("reconnect requested");
                        self.settle(&mut socket).await;
                        close(&mut socket, CloseCode::Normal, "reconnect requested").await;
                        return SessionEnd::ReconnectRequested;
                    }
                    Some(Command::Wake) => {}
                    None => {
                        self.settle(&mut socket).await;
                        close(&mut socket, CloseCode::Normal, "relay-sidecar stopping").await;
                        return SessionEnd::Shutdown;
                    }
                },
                _ = ping.tick() => {
                    if let Some(sent) = ping_sent
                        && sent.elapsed() >= self.options.ping_timeout
                    {
                        return SessionEnd::Closed {
                            code: None,
                            reason: format!("no answer to a ping within {:?}", self.options.ping_timeout),
                        };
                    }
                    if ping_sent.is_none() {
                        if let Err(e) = socket.send(Message::Ping(Default::default())).await {
                            return SessionEnd::Closed { code: None, reason: format!("connection lost: {e}") };
                        }
                        ping_sent = Some(Instant::now());
                    }
                }
            }
        }
    }

    /// Writes `first` and whatever other sends are already queued, then a
    /// probe, and flushes once. The senders hear OK when the probe returns.
    async fn write_batch(
        &mut self,
        socket: &mut Socket,
        first: Outbound,
    ) -> Result<(), SessionEnd> {
        let mut batch = Vec::new();
        let mut frames = 0;
        let mut deferred = None;
        let mut next = Some(first);
        while let Some(out) = next.take() {
            if out.reply.is_closed() {
                // The caller gave up: it was told nothing was sent.
            } else if Instant::now() >= out.deadline {
                let _ = out.reply.send(Err(Undelivered::Expired));
            } else {
                frames += out.frames.len();
                batch.push(out);
            }
            if frames < WRITE_BATCH {
                match self.commands.try_recv() {
                    Ok(Command::Send(out)) => next = Some(out),
                    Ok(other) => deferred = Some(other),
                    Err(_) => {}
                }
            }
        }
        if !batch.is_empty() {
            let probe = self.next_probe;
            self.next_probe += 1;
            let mut replies = Vec::with_capacity(batch.len());
            let mut result = Ok(());
            for out in batch {
                replies.push(out.reply);
                for frame in out.frames {
                    if result.is_ok() {
                        result = socket.feed(Message::text(frame)).await;
                    }
                }
            }
            if result.is_ok() {
                result = socket.feed(Message::text(self.probe_frame(probe))).await;
            }
            if result.is_ok() {
                result = socket.flush().await;
            }
            // Written or not, the senders wait for the probe: if the write
            // failed, the session ends and tells them it is unconfirmed.
            self.pending.push_back(Pending {
                probe,
                frames: frames as u64,
                replies,
            });
            if let Err(e) = result {
                return Err(SessionEnd::Closed {
                    code: None,
                    reason: format!("connection lost while writing: {e}"),
                });
            }
        }
        match deferred {
            Some(Command::Reconnect) => {
                info!("reconnect requested");
                self.settle(socket).await;
                close(socket, CloseCode::Normal, "reconnect requested").await;
                Err(SessionEnd::ReconnectRequested)
            }
            _ => Ok(()),
        }
    }

    /// The probe that follows batch `seq`: a message to ourselves.
    fn probe_frame(&self, seq: u64) -> String {
        codec::encode(
            &Frame::Peer(codec::PeerConnection {
                source_uuid: self.options.uuid,
                source_name: self.options.name.clone(),
                peer_uuid: self.options.uuid,
                description_type: "offer".into(),
                description: format!("{}{seq}", self.probe_tag),
                error: None,
            }),
            self.options.dialect,
        )
    }

    /// If `peer` is one of our probes, confirms the sends before it.
    fn on_probe(&mut self, peer: &codec::PeerConnection) -> bool {
        if peer.source_uuid != self.options.uuid {
            return false;
        }
        let Some(seq) = peer
            .description
            .strip_prefix(&self.probe_tag)
            .and_then(|n| n.parse::<u64>().ok())
        else {
            return false;
        };
        while self.pending.front().is_some_and(|p| p.probe <= seq) {
            let done = self.pending.pop_front().expect("front exists");
            Counters::add(&self.counters.sent, done.frames);
            for reply in done.replies {
                let _ = reply.send(Ok(()));
            }
        }
        true
    }

    /// Before a deliberate close: reads until every written send is
    /// confirmed, for at most [`CLOSE_GRACE`].
    async fn settle(&mut self, socket: &mut Socket) {
        let deadline = Instant::now() + CLOSE_GRACE;
        while !self.pending.is_empty() {
            match timeout_at(deadline, socket.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => self.on_text(&text),
                Ok(Some(Ok(_))) => {}
                _ => return,
            }
        }
    }

    /// Handles one text frame from the relay. Never fails: what does not
    /// decode is counted and logged.
    fn on_text(&mut self, text: &str) {
        match codec::decode(text, self.options.dialect) {
            Ok(Frame::Peer(peer)) if self.on_probe(&peer) => {}
            Ok(Frame::Peer(peer)) => {
                Counters::add(&self.counters.received, 1);
                let bounced = peer.source_uuid == self.options.uuid && peer.error.is_some();
                if bounced {
                    Counters::add(&self.counters.bounced, 1);
                    debug!(peer = %peer.peer_uuid, error = peer.error.as_deref(), "relay returned a message");
                }
                self.router.dispatch(PeerMessage { peer, bounced });
            }
            Ok(Frame::Response(response)) => {
                warn!(
                    success = response.success,
                    message = response.message.as_deref(),
                    "relay response outside registration"
                );
            }
            Ok(Frame::Registration(_)) => {
                Counters::add(&self.counters.undecodable, 1);
                warn!("the relay sent a registration request: skipped");
            }
            Err(e) => {
                Counters::add(&self.counters.undecodable, 1);
                warn!(error = %e, len = text.len(), "undecodable frame from the relay skipped");
            }
        }
    }
}

fn close_parts(frame: Option<CloseFrame>) -> (Option<u16>, String) {
    match frame {
        Some(frame) => (Some(u16::from(frame.code)), frame.reason.to_string()),
        None => (None, "closed without a code".into()),
    }
}

/// Sends a close frame and waits briefly for the relay's answer.
async fn close(socket: &mut Socket, code: CloseCode, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let deadline = Instant::now() + CLOSE_GRACE;
    if timeout_at(deadline, socket.close(Some(frame)))
        .await
        .is_err()
    {
        return;
    }
    // Drain until the relay's close frame (or the end) arrives.
    while let Ok(Some(Ok(_))) = timeout_at(deadline, socket.next()).await {}
}

/// The delay before attempt `attempt + 1`: `initial` doubling per attempt,
/// capped at `max`, less up to 25% at random so that many hosts do not
/// retry in step.
pub fn backoff_delay(
    attempt: u32,
    initial: Duration,
    max: Duration,
    rng: &mut impl Rng,
) -> Duration {
    let doubled = initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let capped = doubled.min(max);
    capped.mul_f64(rng.random_range(0.75..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_a_minute_with_jitter() {
        let mut rng = rand::rng();
        let (initial, max) = (Duration::from_secs(1), Duration::from_secs(60));
        for (attempt, nominal) in [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (40, 60)] {
            for _ in 0..100 {
                let d = backoff_delay(attempt, initial, max, &mut rng);
                let nominal = Duration::from_secs(nominal);
                assert!(
                    d <= nominal && d >= nominal.mul_f64(0.75),
                    "{attempt}: {d:?}"
                );
            }
        }
    }
}
