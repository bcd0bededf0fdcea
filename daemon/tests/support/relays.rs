//! Relays that fail in ways a test needs: the embedded relay that can crash
//! (its process dies: no close frames), and a relay that registers clients
//! and then swallows whatever they send (a broken relay, not a model of the
//! real one; interoperability is proven against [`super::PyRelay`]).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use relay_sidecar::codec::{self, Dialect, Frame, RelayResponse};
use relay_sidecar::devrelay::DevRelay;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_util::sync::CancellationToken;

/// How long [`CrashableRelay::restart`] keeps trying to bind its old port.
const REBIND_TIMEOUT: Duration = Duration::from_secs(10);

/// The embedded relay on a runtime of its own, on a fixed loopback port.
/// [`CrashableRelay::kill`] drops that runtime: every socket closes at once
/// without a close frame, as when a relay process is SIGKILLed.
pub struct CrashableRelay {
    addr: SocketAddr,
    dialect: Dialect,
    running: Option<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl CrashableRelay {
    /// Starts an embedded relay of `dialect` on a free loopback port.
    pub fn start(dialect: Dialect) -> CrashableRelay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let mut relay = CrashableRelay {
            addr: listener.local_addr().expect("local_addr"),
            dialect,
            running: None,
        };
        relay.serve(listener);
        relay
    }

    /// `ws://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Crashes the relay: its runtime is dropped with every connection.
    /// Returns once the port is free again.
    pub fn kill(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.send(());
            thread.join().expect("the relay thread");
        }
    }

    /// Crashes the relay and starts a new one on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + REBIND_TIMEOUT;
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding {}: {e}; retrying", self.addr);
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot rebind {} within {REBIND_TIMEOUT:?}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    fn serve(&mut self, listener: std::net::TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let dialect = self.dialect;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the relay");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                // Never cancelled: the relay must not close anything politely.
                let relay = DevRelay::serve(listener, dialect, CancellationToken::new())
                    .expect("the relay serves");
                let _ = stopped.await;
                // Its Drop would cancel it, which nothing polls any more;
                // dropping the runtime below drops every task unpolled.
                std::mem::forget(relay);
            });
            drop(runtime);
        });
        self.running = Some((stop, thread));
    }
}

impl Drop for CrashableRelay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A relay that answers every registration with success and then reads and
/// discards everything the client sends, forever (WebSocket pings are still
/// answered). Each accepted handshake's headers are reported.
pub struct SwallowingRelay {
    url: String,
    handshakes: mpsc::UnboundedReceiver<Headers>,
    stop: CancellationToken,
}

impl SwallowingRelay {
    pub async fn start() -> SwallowingRelay {
        SwallowingRelay::sending(Vec::new()).await
    }

    /// As [`SwallowingRelay::start`], sending `frames` to each client once
    /// it is registered.
    pub async fn sending(frames: Vec<Message>) -> SwallowingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}", listener.local_addr().expect("local_addr"));
        let (seen, handshakes) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    () = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => return,
                    },
                };
                let (seen, token, frames) = (seen.clone(), token.clone(), frames.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = token.cancelled() => {}
                        () = swallow(tcp, seen, frames) => {}
                    }
                });
            }
        });
        SwallowingRelay {
            url,
            handshakes,
            stop,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The headers of the next accepted handshake, waiting at most `timeout`.
    pub async fn next_handshake(&mut self, timeout: Duration) -> Option<Headers> {
        tokio::time::timeout(timeout, self.handshakes.recv())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for SwallowingRelay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Headers of an opening handshake, as (name, value).
pub type Headers = Vec<(String, String)>;

/// Accepts a WebSocket on `stream`, reporting the handshake's headers to
/// `seen`. `None` if the handshake fails.
pub async fn accept_recording<S>(
    stream: S,
    seen: mpsc::UnboundedSender<Headers>,
) -> Option<tokio_tungstenite::WebSocketStream<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // The callback's signature is tungstenite's.
    #[allow(clippy::result_large_err)]
    let capture = move |request: &Request, response: Response| {
        let headers = request
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let _ = seen.send(headers);
        Ok(response)
    };
    tokio_tungstenite::accept_hdr_async(stream, capture)
        .await
        .ok()
}

async fn swallow(
    tcp: tokio::net::TcpStream,
    seen: mpsc::UnboundedSender<Headers>,
    frames: Vec<Message>,
) {
    let Some(mut ws) = accept_recording(tcp, seen).await else {
        return;
    };
    let Some(Ok(Message::Text(first))) = ws.next().await else {
        return;
    };
    let dialect = match codec::decode(&first, Dialect::Current) {
        Ok(Frame::Registration(_)) => Dialect::Current,
        _ => Dialect::Legacy,
    };
    let ok = Frame::Response(RelayResponse {
        success: true,
        message: None,
        error: false,
    });
    if ws
        .send(Message::text(codec::encode(&ok, dialect)))
        .await
        .is_err()
    {
        return;
    }
    for frame in frames {
        if ws.feed(frame).await.is_err() {
            return;
        }
    }
    if ws.flush().await.is_err() {
        return;
    }
    // Reading on is what answers pings.
    while let Some(Ok(_)) = ws.next().await {}
}

/// The value of header `name` (any case) among `headers`.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A relay a test can crash and start again on the same port.
pub trait Restart {
    /// `ws://127.0.0.1:PORT`
    fn url(&self) -> String;
    /// Kills the relay (no close frames) and starts it again.
    fn restart(&mut self) -> impl std::future::Future<Output = ()>;
}

impl Restart for CrashableRelay {
    fn url(&self) -> String {
        CrashableRelay::url(self)
    }

    async fn restart(&mut self) {
        CrashableRelay::restart(self);
    }
}

impl Restart for super::PyRelay {
    fn url(&self) -> String {
        super::PyRelay::url(self)
    }

    async fn restart(&mut self) {
        // SIGKILL, then a new process on the same port.
        super::PyRelay::restart(self).await;
    }
}
