//! The connections accepted on the gRPC socket, and their budget.
//!
//! - Callers the allow-list refuses are answered at accept, from their peer
//!   credentials, before anything they send is parsed ([`access::refuse`]).
//! - At most `max_connections` are open, below the file descriptor limit
//!   less [`FD_RESERVE`]; at the limit the connection idle longest is closed
//!   to admit the new one.
//! - A connection that sends no HTTP/2 preface within `handshake_timeout`,
//!   or has no call open for `idle_timeout`, is closed.
//! - When accept(2) fails for lack of file descriptors or memory, the loop
//!   sheds an idle connection and backs off instead of spinning.
//!
//! A connection is logged at DEBUG; what a caller can cause in volume is
//! logged once and then as a count ([`Summary`]).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::{Connected, UdsConnectInfo};
use tracing::{debug, info, warn};

use crate::access::{self, AllowList};
use crate::authority::{FRAME_HEADER, Normalise, PREFACE};
use crate::limits::{
    ACCEPT_BACKOFF_INITIAL, ACCEPT_BACKOFF_MAX, FD_RESERVE, LOG_SUMMARY_INTERVAL,
    MAX_REFUSALS_IN_FLIGHT,
};
use crate::summary::Summary;

/// Bytes a connection must have sent to have made its handshake: the
/// HTTP/2 preface and the header of its first frame (SETTINGS).
const HANDSHAKE_BYTES: usize = PREFACE.len() + FRAME_HEADER;

static SHED: Summary = Summary::new(LOG_SUMMARY_INTERVAL);
static FULL: Summary = Summary::new(LOG_SUMMARY_INTERVAL);
static REFUSED: Summary = Summary::new(LOG_SUMMARY_INTERVAL);
static NO_FDS: Summary = Summary::new(LOG_SUMMARY_INTERVAL);
static TIMED_OUT: Summary = Summary::new(LOG_SUMMARY_INTERVAL);

/// The budget for connections on the socket (settings `max_connections`,
/// `handshake_timeout`, `idle_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Budget {
    /// This budget with `max_connections` lowered, if need be, to what the
    /// process's file descriptor limit allows after [`FD_RESERVE`]. The soft
    /// limit is raised to the hard one first (systemd's soft default of 1024
    /// is for programs that use select(2); this one does not).
    pub fn fit_to_fd_limit(self) -> Self {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
            return self;
        };
        let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            hard
        } else {
            soft
        };
        let room = usize::try_from(limit.saturating_sub(FD_RESERVE).max(1)).unwrap_or(usize::MAX);
        if room < self.max_connections {
            info!(
                max_connections = room,
                configured = self.max_connections,
                fd_limit = limit,
                "max_connections lowered to fit the file descriptor limit"
            );
            return Budget {
                max_connections: room,
                ..self
            };
        }
        self
    }
}

/// The open connections; cheap to clone.
#[derive(Debug, Clone)]
pub struct Connections {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    budget: Budget,
    /// What the connections' times are counted from.
    epoch: Instant,
    table: Mutex<HashMap<u64, Arc<State>>>,
    next_id: AtomicU64,
    refusals: AtomicUsize,
}

/// One connection, as the budget sees it.
#[derive(Debug)]
struct State {
    id: u64,
    /// What `idle_since` is counted from (the table's epoch).
    epoch: Instant,
    accepted: Instant,
    handshaken: AtomicBool,
    open_calls: AtomicUsize,
    /// When the last call ended (or the connection was accepted), in
    /// milliseconds since the epoch.
    idle_since: AtomicU64,
    closing: AtomicBool,
    read_waker: AtomicWaker,
    write_waker: AtomicWaker,
}

impl State {
    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.read_waker.wake();
        self.write_waker.wake();
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    fn is_idle(&self) -> bool {
        self.open_calls.load(Ordering::Acquire) == 0
    }
}

impl Connections {
    pub fn new(budget: Budget) -> Self {
        Connections {
            shared: Arc::new(Shared {
                budget,
                epoch: Instant::now(),
                table: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                refusals: AtomicUsize::new(0),
            }),
        }
    }

    pub fn budget(&self) -> Budget {
        self.shared.budget
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.shared.table().len()
    }

    /// Closes connections past their handshake or idle timeout, until
    /// `shutdown`; also logs what the summaries have counted.
    pub async fn sweep(self, shutdown: CancellationToken) {
        let budget = self.shared.budget;
        let tick = (budget.handshake_timeout.min(budget.idle_timeout) / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            let (handshake, idle) = self.shared.close_overdue();
            if handshake + idle > 0 {
                debug!(handshake, idle, "closed connections past their timeouts");
                for _ in 0..handshake + idle {
                    if let Some(before) = TIMED_OUT.note() {
                        log_timed_out(before + 1);
                    }
                }
            }
            if let Some(n) = TIMED_OUT.flush() {
                log_timed_out(n);
            }
            for (summary, what) in [
                (&SHED, "connections closed to stay within max_connections"),
                (
                    &FULL,
                    "connections refused: max_connections reached with a call open on every one",
                ),
                (&REFUSED, "callers refused by allow_uids/allow_gids"),
                (&NO_FDS, "failed accepts: out of file descriptors or memory"),
            ] {
                if let Some(n) = summary.flush() {
                    warn!(count = n, interval = ?summary.interval(), "{what}, in the last interval");
                }
            }
        }
    }
}

fn log_timed_out(count: u64) {
    info!(
        count,
        "closed connections that sent no HTTP/2 preface within handshake_timeout or had no call open for idle_timeout"
    );
}

impl Shared {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<State>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn admit(self: &Arc<Self>) -> Result<Arc<State>, ()> {
        let now = Instant::now();
        let mut table = self.table();
        let open = table.values().filter(|s| !s.is_closing()).count();
        if open >= self.budget.max_connections {
            match idlest(&table) {
                Some(victim) => {
                    victim.close();
                    if let Some(before) = SHED.note() {
                        warn!(
                            max_connections = self.budget.max_connections,
                            earlier = before,
                            "at max_connections: closing the connections idle longest to admit new callers"
                        );
                    }
                }
                None => {
                    if let Some(before) = FULL.note() {
                        warn!(
                            max_connections = self.budget.max_connections,
                            earlier = before,
                            "at max_connections with a call open on every connection: refusing new connections"
                        );
                    }
                    return Err(());
                }
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(State {
            id,
            epoch: self.epoch,
            accepted: now,
            handshaken: AtomicBool::new(false),
            open_calls: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.millis(now)),
            closing: AtomicBool::new(false),
            read_waker: AtomicWaker::new(),
            write_waker: AtomicWaker::new(),
        });
        table.insert(id, Arc::clone(&state));
        Ok(state)
    }

    /// Closes the connection idle longest, if any: called when accept(2)
    /// runs out of file descriptors.
    fn shed_one(&self) -> bool {
        idlest(&self.table()).map(|s| s.close()).is_some()
    }

    /// Closes what is past its timeouts; how many for each.
    fn close_overdue(&self) -> (u64, u64) {
        let now = Instant::now();
        let now_ms = self.millis(now);
        let idle_ms = u64::try_from(self.budget.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let (mut handshake, mut idle) = (0, 0);
        for state in self.table().values().filter(|s| !s.is_closing()) {
            if !state.handshaken.load(Ordering::Relaxed) {
                if now.saturating_duration_since(state.accepted) >= self.budget.handshake_timeout {
                    state.close();
                    handshake += 1;
                }
            } else if state.is_idle()
                && now_ms.saturating_sub(state.idle_since.load(Ordering::Relaxed)) >= idle_ms
            {
                state.close();
                idle += 1;
            }
        }
        (handshake, idle)
    }
}

/// The connection that has done nothing longest, to close when room is
/// needed: one that never finished its handshake first, then the one idle
/// longest. None when every connection has a call open.
fn idlest(table: &HashMap<u64, Arc<State>>) -> Option<&Arc<State>> {
    table
        .values()
        .filter(|s| !s.is_closing() && s.is_idle())
        .min_by_key(|s| {
            (
                s.handshaken.load(Ordering::Relaxed),
                s.idle_since.load(Ordering::Relaxed),
            )
        })
}

/// The connections accepted on `listener`: callers the allow-list refuses
/// are answered on tasks of `tasks` and not yielded; the rest are yielded
/// within the budget, wrapped so that h2 accepts any client's `:authority`.
pub fn incoming(
    listener: UnixListener,
    connections: Connections,
    allow: AllowList,
    tasks: TaskTracker,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    let accept = Accept {
        listener,
        connections,
        allow,
        tasks,
        backoff: ACCEPT_BACKOFF_INITIAL,
    };
    futures_util::stream::unfold(accept, |mut accept| async move {
        let conn = accept.next().await;
        Some((Ok(conn), accept))
    })
}

struct Accept {
    listener: UnixListener,
    connections: Connections,
    allow: AllowList,
    tasks: TaskTracker,
    backoff: Duration,
}

impl Accept {
    async fn next(&mut self) -> Conn {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) if out_of_resources(&e) => {
                    let shed = self.connections.shared.shed_one();
                    if let Some(before) = NO_FDS.note() {
                        warn!(
                            error = %e,
                            shed,
                            retry_in = ?self.backoff,
                            earlier = before,
                            "cannot accept connections: out of file descriptors or memory; closing an idle one and waiting"
                        );
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
                Err(e) => {
                    // A connection gone before it was accepted; anything
                    // that repeats still must not spin.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF_INITIAL).await;
                    continue;
                }
            };
            self.backoff = ACCEPT_BACKOFF_INITIAL;
            let cred = stream.peer_cred().ok();
            match cred {
                Some(cred) => debug!(
                    uid = cred.uid(),
                    gid = cred.gid(),
                    pid = cred.pid().unwrap_or(0),
                    "caller connected"
                ),
                None => debug!("caller connected; its credentials are unknown"),
            }
            if let Err(message) = self.allow.admits_peer(cred.as_ref()) {
                self.refuse(stream, message);
                continue;
            }
            let Ok(state) = self.connections.shared.admit() else {
                continue;
            };
            let uds = UdsConnectInfo {
                peer_addr: stream.peer_addr().ok().map(Arc::new),
                peer_cred: cred,
            };
            return Conn {
                io: Normalise::new(stream),
                peer: Peer { uds, state },
                shared: Arc::clone(&self.connections.shared),
                seen: 0,
            };
        }
    }

    /// Answers a refused caller on a task of its own, a bounded number at
    /// a time; past that, its connection is closed unanswered.
    fn refuse(&self, stream: UnixStream, message: String) {
        if let Some(before) = REFUSED.note() {
            warn!(
                earlier = before,
                "{message}; refusing its calls (further refusals are counted, not logged one by one)"
            );
        }
        let shared = &self.connections.shared;
        if shared.refusals.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSALS_IN_FLIGHT {
            shared.refusals.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let shared = Arc::clone(shared);
        self.tasks.spawn(async move {
            access::refuse(stream, &message).await;
            shared.refusals.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// accept(2) errors that last until something is closed: retrying at once
/// would spin.
fn out_of_resources(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// What the gRPC server knows of a connection: its peer credentials (as
/// tonic's own [`UdsConnectInfo`], which [`CallLayer`] puts in every
/// request) and its place in the budget.
#[derive(Debug, Clone)]
pub struct Peer {
    pub uds: UdsConnectInfo,
    state: Arc<State>,
}

/// An accepted connection within the budget: ends when the budget closes
/// it, and marks it handshaken once the HTTP/2 preface has come.
#[derive(Debug)]
pub struct Conn {
    io: Normalise<UnixStream>,
    peer: Peer,
    shared: Arc<Shared>,
    /// Bytes read, counted until the handshake is made.
    seen: usize,
}

impl Conn {
    pub fn get_ref(&self) -> &UnixStream {
        self.io.get_ref()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.table().remove(&self.peer.state.id);
    }
}

impl Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "closed by the daemon's connection budget",
    )
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let state = &this.peer.state;
        state.read_waker.register(cx.waker());
        if state.is_closing() {
            return Poll::Ready(Err(closed()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if this.seen < HANDSHAKE_BYTES {
            this.seen += buf.filled().len() - before;
            if this.seen >= HANDSHAKE_BYTES {
                state.handshaken.store(true, Ordering::Relaxed);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.peer.state.write_waker.register(cx.waker());
        if this.peer.state.is_closing() {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.peer.state.write_waker.register(cx.waker());
        if this.peer.state.is_closing() {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A layer for the gRPC server that counts each connection's open calls
/// (a call is open until its response body ends), for the idle timeout,
/// and gives every request tonic's [`UdsConnectInfo`].
#[derive(Debug, Clone, Default)]
pub struct CallLayer;

impl<S> tower::Layer<S> for CallLayer {
    type Service = Calls<S>;

    fn layer(&self, inner: S) -> Calls<S> {
        Calls { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Calls<S> {
    inner: S,
}

/// One open call; ends the call when dropped.
#[derive(Debug)]
struct Call {
    state: Arc<State>,
}

impl Call {
    fn start(state: Arc<State>) -> Self {
        state.open_calls.fetch_add(1, Ordering::AcqRel);
        Call { state }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let now = u64::try_from(self.state.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.state.idle_since.store(now, Ordering::Relaxed);
        self.state.open_calls.fetch_sub(1, Ordering::AcqRel);
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Calls<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let call = request.extensions().get::<Peer>().cloned().map(|peer| {
            request.extensions_mut().insert(peer.uds);
            Call::start(peer.state)
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match call {
                Some(call) => response.map(|body| tonic::body::Body::new(Open { body, call })),
                None => response,
            })
        })
    }
}

/// A response body that keeps its call open until it ends.
struct Open {
    body: tonic::body::Body,
    #[allow(dead_code, reason = "held for its Drop, which ends the call")]
    call: Call,
}

impl http_body::Body for Open {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
