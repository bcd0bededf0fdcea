//! What a hostile local caller can send the daemon meets a named bound
//! (`relay_sidecar::limits`), and the other callers and the relay link do
//! not pay for it. Attacks on the process (memory, file descriptors, CPU,
//! log volume) run against the real daemon binary, measured from /proc;
//! the bounds asserted are generous failure guards, the README's "Limits and
//! abuse" table has the figures of a run.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use loona_hpack::Encoder;
use prost::Message as _;
use relay_sidecar::limits;
use relay_sidecar_client::{Client, ConnectionState, DescriptionType};
use relay_sidecar_proto::v1;
use support::Dialect;
use support::sidecar::{TestDaemon, dev_relay, registered, require_tool, settings};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

// ---------------------------------------------------------------------------
// The daemon binary, with its log kept.

struct Bin {
    child: tokio::process::Child,
    pid: u32,
    socket: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Bin {
    /// Starts the daemon binary on `relay_url` with `args` and `env` added,
    /// under `prlimit --nofile=N` if given, JSON logs at the default level;
    /// returns once it serves.
    async fn start(
        relay_url: &str,
        args: &[&str],
        env: &[(&str, &str)],
        nofile: Option<u32>,
    ) -> Bin {
        let dir = tempfile::tempdir().unwrap();
        let (mut all, socket) = support::sidecar::daemon_args(dir.path(), relay_url);
        all.extend(args.iter().map(|a| a.to_string()));
        all.extend(["--log-format".into(), "json".into()]);
        let bin = env!("CARGO_BIN_EXE_relay-sidecar");
        let mut command = match nofile {
            Some(n) => {
                let prlimit = require_tool("prlimit", "apt-get install util-linux");
                let mut c = tokio::process::Command::new(prlimit);
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin);
                c
            }
            None => tokio::process::Command::new(bin),
        };
        command
            .args(&all)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, _) in std::env::vars() {
            if key.starts_with("RELAY_SIDECAR_") {
                command.env_remove(key);
            }
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let pid = child.id().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let kept = Arc::clone(&log);
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("\"serving\"")
                    && let Some(ready) = ready.take()
                {
                    let _ = ready.send(());
                }
                kept.lock().unwrap().push(line);
            }
        });
        tokio::time::timeout(WAIT, ready_rx)
            .await
            .expect("the daemon serves in time")
            .unwrap_or_else(|_| panic!("the daemon exited before serving"));
        Bin {
            child,
            pid,
            socket,
            log,
            _dir: dir,
        }
    }

    async fn client(&self) -> Client {
        relay_sidecar_client::connect(&self.socket).await.unwrap()
    }

    fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn rss_mib(&self) -> f64 {
        rss_mib(self.pid)
    }

    /// User and system CPU time so far.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // The kernel's USER_HZ is 100 on every Linux this runs on.
        Duration::from_millis(ticks * 10)
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib / 1024.0
}

fn sigterm(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

/// A status call on a fresh connection must succeed within `within`.
async fn served(socket: &Path, within: Duration) -> relay_sidecar_client::Status {
    let call = async {
        let client = relay_sidecar_client::connect(socket).await?;
        client.status().await
    };
    tokio::time::timeout(within, call)
        .await
        .unwrap_or_else(|_| panic!("a new caller was not served within {within:?}"))
        .expect("a new caller is served")
}

// ---------------------------------------------------------------------------
// A client that writes HTTP/2 frames by hand.

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The connection preface and an empty SETTINGS frame.
fn hello() -> Vec<u8> {
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    bytes
}

/// How a hand-written request ended.
#[derive(Debug)]
#[allow(
    dead_code,
    reason = "the error codes are read through Debug, in assertion messages"
)]
enum Outcome {
    /// The response's trailers (or trailers-only headers), decoded.
    Ended(Vec<(String, String)>),
    Reset(u32),
    GoAway(u32),
    Closed,
}

impl Outcome {
    fn field(&self, name: &str) -> Option<&str> {
        match self {
            Outcome::Ended(fields) => fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// A gRPC request by hand: `fields` beyond the usual ones, one message.
fn grpc_request(
    stream: u32,
    authority: &[u8],
    path: &str,
    extra: &[(&str, &str)],
    message: &[u8],
    encoder: &mut Encoder,
) -> Vec<u8> {
    let mut fields: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.as_bytes()),
        (b":authority", authority),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ];
    fields.extend(extra.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let block = encoder.encode(fields);
    let mut bytes = Vec::new();
    let mut chunks = block.chunks(16_384).peekable();
    let mut kind = HEADERS;
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        bytes.extend(frame(kind, flags, stream, chunk));
        kind = CONTINUATION;
    }
    let mut body = vec![0];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(message);
    bytes.extend(frame(DATA, END_STREAM, stream, &body));
    bytes
}

/// Reads frames until `stream` ends, is reset, or the connection goes.
async fn outcome(conn: &mut UnixStream, stream: u32) -> Outcome {
    let mut decoder = loona_hpack::Decoder::new();
    let read = async {
        let mut header = [0u8; 9];
        loop {
            if conn.read_exact(&mut header).await.is_err() {
                return Outcome::Closed;
            }
            let len =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let (kind, flags) = (header[3], header[4]);
            let id = u32::from_be_bytes(header[5..9].try_into().unwrap()) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if conn.read_exact(&mut payload).await.is_err() {
                return Outcome::Closed;
            }
            match kind {
                SETTINGS if flags & 1 == 0 => {
                    let _ = conn.write_all(&frame(SETTINGS, 1, 0, &[])).await;
                }
                HEADERS => {
                    let fields = decoder.decode(&payload).expect("the daemon's HPACK");
                    if id == stream && flags & END_STREAM != 0 {
                        return Outcome::Ended(
                            fields
                                .into_iter()
                                .map(|(n, v)| {
                                    (
                                        String::from_utf8_lossy(&n).into_owned(),
                                        String::from_utf8_lossy(&v).into_owned(),
                                    )
                                })
                                .collect(),
                        );
                    }
                }
                RST_STREAM if id == stream => {
                    return Outcome::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                }
                GOAWAY => {
                    return Outcome::GoAway(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("an outcome in time")
}

/// Waits until the daemon closes `conn` (reads EOF or an error); how long.
async fn closed_by_daemon(conn: &mut UnixStream, within: Duration) -> Duration {
    let started = Instant::now();
    let mut sink = vec![0u8; 65_536];
    tokio::time::timeout(within, async {
        loop {
            match conn.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the daemon kept the connection open for {within:?}"));
    started.elapsed()
}

/// An HPACK bomb: a 4 KB table entry, then `references` one-byte references
/// to it, cut into frames of 16 KiB.
fn hpack_bomb(references: usize) -> Vec<u8> {
    let mut block = vec![0x40];
    for text in [&b"x-bomb"[..], &[b'b'; 4000][..]] {
        loona_hpack::encoder::encode_integer_into(text.len(), 7, 0, &mut block).unwrap();
        block.extend_from_slice(text);
    }
    block.extend(std::iter::repeat_n(0x80 | 62, references));
    let mut bytes = hello();
    let chunks: Vec<_> = block.chunks(16_384).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let flags = if i + 1 == chunks.len() {
            END_HEADERS
        } else {
            0
        };
        bytes.extend(frame(kind, flags, 1, chunk));
    }
    bytes
}

// ---------------------------------------------------------------------------
// Rows 1-3: the `:authority` rewriter.

/// HPACK bombs on new connections, from a caller the allow-list refuses
/// and from one it admits: the daemon's RSS grows by less than 32 MiB.
#[tokio::test]
async fn hpack_bombs_cost_no_memory() {
    let relay = dev_relay().await;
    // Admits only a uid nobody has: this test's caller is refused at accept.
    let mut refused = Bin::start(&relay.url(), &["--allow-uids", "4000000000"], &[], None).await;
    let mut open = Bin::start(&relay.url(), &[], &[], None).await;
    for bin in [&mut refused, &mut open] {
        let before = bin.rss_mib();
        let mut conns = Vec::new();
        for references in [60_000, 1_000_000, 60_000, 1_000_000] {
            let mut conn = UnixStream::connect(&bin.socket).await.unwrap();
            // The daemon may close the connection before it has read it all.
            let _ = conn.write_all(&hpack_bomb(references)).await;
            conns.push(conn);
        }
        for conn in &mut conns {
            closed_by_daemon(conn, WAIT).await;
        }
        let after = bin.rss_mib();
        eprintln!("HPACK bombs: RSS {before:.1} -> {after:.1} MiB");
        assert!(bin.alive());
        assert!(after - before < 32.0, "RSS {before:.1} -> {after:.1} MiB");
    }
    served(&open.socket, WAIT).await;
}

/// 100 connections that start a header block and never finish it: each is
/// closed once it is over the encoded block limit or the block timeout.
#[tokio::test]
async fn unfinished_header_blocks_are_bounded_in_size_and_time() {
    let relay = dev_relay().await;
    let bin = Bin::start(&relay.url(), &[], &[], None).await;
    let before = bin.rss_mib();
    let started = Instant::now();
    let mut conns = Vec::new();
    for i in 0..100 {
        let mut conn = UnixStream::connect(&bin.socket).await.unwrap();
        let mut bytes = hello();
        bytes.extend(frame(HEADERS, 0, 1, &[0x82; 16_384]));
        // Half stop at 48 KiB, half try to send 1 MiB.
        let continuations = if i % 2 == 0 { 2 } else { 63 };
        for _ in 0..continuations {
            bytes.extend(frame(CONTINUATION, 0, 1, &[0x82; 16_384]));
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.write_all(&bytes)).await;
        conns.push(conn);
    }
    let held = bin.rss_mib();
    for conn in &mut conns {
        closed_by_daemon(conn, limits::HEADER_BLOCK_TIMEOUT + WAIT).await;
    }
    let all_closed = started.elapsed();
    eprintln!(
        "unfinished blocks: RSS {before:.1} -> {held:.1} MiB while held; all closed after {all_closed:?}"
    );
    assert!(held - before < 32.0, "RSS {before:.1} -> {held:.1} MiB");
    assert!(all_closed < limits::HEADER_BLOCK_TIMEOUT + Duration::from_secs(10));
    served(&bin.socket, WAIT).await;
}

/// An `:authority` that needs rewriting is rewritten only within h2's header
/// list limit: 100 bytes are served, 10 kB and 900 kB are not.
#[tokio::test]
async fn oversized_authorities_are_not_rewritten() {
    let relay = dev_relay().await;
    let bin = Bin::start(&relay.url(), &[], &[], None).await;
    let path = "/relay_sidecar.v1.RelaySidecar/GetStatus";
    let call = |authority: Vec<u8>| {
        let socket = bin.socket.clone();
        async move {
            let mut conn = UnixStream::connect(&socket).await.unwrap();
            let mut bytes = hello();
            bytes.extend(grpc_request(
                1,
                &authority,
                path,
                &[],
                &[],
                &mut Encoder::new(),
            ));
            let _ = conn.write_all(&bytes).await;
            outcome(&mut conn, 1).await
        }
    };
    let small = call(format!("/{}", "p".repeat(100)).into_bytes()).await;
    assert_eq!(small.field("grpc-status"), Some("0"), "{small:?}");
    for size in [10_000, 900_000] {
        let big = call(format!("/{}", "p".repeat(size)).into_bytes()).await;
        assert_ne!(big.field("grpc-status"), Some("0"), "{size}: {big:?}");
    }
    served(&bin.socket, WAIT).await;
}

// ---------------------------------------------------------------------------
// Rows 5, 6, 18: connections.

/// With the fd limit at 256, 400 idle connections: a new caller is still
/// served, the relay link stays registered, the accept loop does not spin,
/// and the log says so once.
#[tokio::test]
async fn at_the_fd_limit_idle_connections_are_shed_and_callers_served() {
    let relay = dev_relay().await;
    let bin = Bin::start(&relay.url(), &[], &[], Some(256)).await;
    registered(&bin.client().await).await;
    let mut idle = Vec::new();
    for i in 0..400 {
        let mut conn = UnixStream::connect(&bin.socket).await.unwrap();
        if i % 2 == 0 {
            // Half made the handshake and then nothing.
            let _ = conn.write_all(&hello()).await;
        }
        idle.push(conn);
    }
    let cpu_before = bin.cpu();
    let started = Instant::now();
    let status = served(&bin.socket, Duration::from_secs(10)).await;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = bin.cpu() - cpu_before;
    assert_eq!(status.state, ConnectionState::Registered);
    assert_eq!(status.counters.reconnects, 0);
    let shed: Vec<_> = bin
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("at max_connections"))
        .collect();
    eprintln!(
        "fd limit 256, 400 idle connections: served in {took:?}; daemon CPU {cpu:?} over {:?}; {} log line(s)",
        started.elapsed(),
        shed.len()
    );
    assert_eq!(shed.len(), 1, "{shed:?}");
    assert!(shed[0].contains("\"max_connections\":192"), "{}", shed[0]);
    assert!(
        cpu < Duration::from_millis(1500),
        "the daemon used {cpu:?} of CPU"
    );
    drop(idle);
}

/// A connection that sends no preface is closed after handshake_timeout,
/// one that stops after SETTINGS after idle_timeout; one with an open call
/// stays.
#[tokio::test]
async fn handshake_and_idle_timeouts_close_connections() {
    let relay = dev_relay().await;
    let bin = Bin::start(
        &relay.url(),
        &[],
        &[
            ("RELAY_SIDECAR_HANDSHAKE_TIMEOUT", "1s"),
            ("RELAY_SIDECAR_IDLE_TIMEOUT", "3s"),
        ],
        None,
    )
    .await;
    let subscriber = bin.client().await;
    registered(&subscriber).await;
    let mut subscription = subscriber.subscribe(None).await.unwrap();
    let mut silent = Vec::new();
    let mut stopped = Vec::new();
    for _ in 0..10 {
        silent.push(UnixStream::connect(&bin.socket).await.unwrap());
        let mut conn = UnixStream::connect(&bin.socket).await.unwrap();
        conn.write_all(&hello()).await.unwrap();
        stopped.push(conn);
    }
    for conn in &mut silent {
        let took = closed_by_daemon(conn, Duration::from_secs(5)).await;
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
    for conn in &mut stopped {
        closed_by_daemon(conn, Duration::from_secs(8)).await;
    }
    // The subscription, older than the idle timeout, still delivers.
    let me = bin.client().await.status().await.unwrap().uuid;
    bin.client()
        .await
        .send(me, DescriptionType::Offer, "still here")
        .await
        .unwrap();
    let message = tokio::time::timeout(WAIT, subscription.next_message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(message.description, "still here");
}

/// 1,000 connections make no INFO line each: at most a handful in all.
#[tokio::test]
async fn connections_are_not_logged_one_by_one() {
    let relay = dev_relay().await;
    let bin = Bin::start(&relay.url(), &[], &[], None).await;
    registered(&bin.client().await).await;
    let before = bin.log_lines().len();
    for _ in 0..1000 {
        let mut conn = UnixStream::connect(&bin.socket).await.unwrap();
        conn.write_all(&hello()).await.unwrap();
    }
    served(&bin.socket, WAIT).await;
    let lines = bin.log_lines();
    let new = &lines[before..];
    eprintln!("1,000 connections: {} log lines", new.len());
    assert!(new.len() <= 5, "{new:#?}");
    assert!(!new.iter().any(|l| l.contains("caller connected")));
}

// ---------------------------------------------------------------------------
// Row 9: streams per connection.

/// 300 Subscribe calls on one connection: the daemon holds at most
/// MAX_CONCURRENT_STREAMS of them; the rest wait in the client.
#[tokio::test]
async fn one_connection_opens_at_most_max_concurrent_streams() {
    let relay = dev_relay().await;
    let daemon = TestDaemon::start(&relay.url(), Dialect::Current).await;
    let client = daemon.registered_client().await;
    let mut calls = Vec::new();
    for _ in 0..300 {
        let client = client.clone();
        calls.push(tokio::spawn(async move { client.subscribe(None).await }));
    }
    let observer = daemon.client().await;
    let limit = u64::from(limits::MAX_CONCURRENT_STREAMS);
    let deadline = Instant::now() + WAIT;
    let mut subscribers = 0;
    while Instant::now() < deadline {
        subscribers = observer.status().await.unwrap().counters.subscribers;
        if subscribers >= limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give the rest every chance to get through if nothing held them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    subscribers = subscribers.max(observer.status().await.unwrap().counters.subscribers);
    eprintln!("300 Subscribe calls on one connection: {subscribers} open at the daemon");
    assert_eq!(subscribers, limit);
    for call in calls {
        call.abort();
    }
    daemon.stop().await;
}

// ---------------------------------------------------------------------------
// Row 10: the socket file.

/// An exiting daemon leaves a socket file that is not the one it made: a
/// newer daemon's at the same path, or one behind a re-pointed directory
/// symlink.
#[tokio::test]
async fn an_exiting_daemon_removes_only_its_own_socket() {
    let relay = dev_relay().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = |socket: &Path, state: &Path| {
        vec![
            "--relay-url".to_owned(),
            relay.url(),
            "--socket".to_owned(),
            socket.display().to_string(),
            "--state-dir".to_owned(),
            state.display().to_string(),
        ]
    };
    // The same path: the old daemon's file moved away, a new daemon binds.
    let socket = dir.path().join("relay.sock");
    let mut old = support::sidecar::spawn_daemon(&args(&socket, &state)).await;
    std::fs::rename(&socket, dir.path().join("old.sock")).unwrap();
    let mut new = support::sidecar::spawn_daemon(&args(&socket, &dir.path().join("state2"))).await;
    sigterm(old.id().unwrap());
    let exited = tokio::time::timeout(WAIT, old.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exited.success());
    assert!(
        socket.exists(),
        "the old daemon removed the new one's socket"
    );
    served(&socket, WAIT).await;
    sigterm(new.id().unwrap());
    tokio::time::timeout(WAIT, new.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!socket.exists(), "the new daemon removes its own");

    // A directory symlink re-pointed while the old daemon runs.
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    std::fs::create_dir(&first).unwrap();
    std::fs::create_dir(&second).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&first, &link).unwrap();
    let mut old = support::sidecar::spawn_daemon(&args(&link.join("relay.sock"), &state)).await;
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&second, &link).unwrap();
    let mut new =
        support::sidecar::spawn_daemon(&args(&link.join("relay.sock"), &dir.path().join("state2")))
            .await;
    sigterm(old.id().unwrap());
    tokio::time::timeout(WAIT, old.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        second.join("relay.sock").exists(),
        "the new daemon's socket stays"
    );
    assert!(
        !first.join("relay.sock").exists(),
        "the old daemon's is removed"
    );
    served(&link.join("relay.sock"), WAIT).await;
    sigterm(new.id().unwrap());
    tokio::time::timeout(WAIT, new.wait())
        .await
        .unwrap()
        .unwrap();
}

// ---------------------------------------------------------------------------
// Rows 12 and 13: status codes and deadlines.

/// The status codes the contract documents for Send, from the proto's
/// comment on the RPC.
fn documented_send_codes() -> Vec<tonic::Code> {
    let proto = std::fs::read_to_string(
        support::repo_root().join("proto/relay_sidecar/v1/relay_sidecar.proto"),
    )
    .unwrap();
    let send = proto.split("rpc Send(").next().unwrap();
    let comment = send.rsplit("rpc ").next().unwrap();
    let codes: Vec<tonic::Code> = [
        ("INVALID_ARGUMENT", tonic::Code::InvalidArgument),
        ("OUT_OF_RANGE", tonic::Code::OutOfRange),
        ("PERMISSION_DENIED", tonic::Code::PermissionDenied),
        ("UNAVAILABLE", tonic::Code::Unavailable),
        ("UNKNOWN", tonic::Code::Unknown),
        ("FAILED_PRECONDITION", tonic::Code::FailedPrecondition),
        ("DEADLINE_EXCEEDED", tonic::Code::DeadlineExceeded),
        ("CANCELLED", tonic::Code::Cancelled),
        ("RESOURCE_EXHAUSTED", tonic::Code::ResourceExhausted),
        ("INTERNAL", tonic::Code::Internal),
    ]
    .into_iter()
    .filter(|(name, _)| comment.contains(&format!("- {name}:")))
    .map(|(_, code)| code)
    .collect();
    assert!(codes.contains(&tonic::Code::InvalidArgument), "{comment}");
    codes
}

/// A relay that registers the daemon and then reads and drops everything
/// (never forwarding, so a Send is never confirmed); or, with `close`, closes
/// the connection at the first frame after the registration.
async fn swallowing_relay(close: bool) -> String {
    use futures_util::{SinkExt, StreamExt};
    use relay_sidecar::codec::{self, Frame, RelayResponse};
    use tokio_tungstenite::tungstenite::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let _registration = ws.next().await;
                let ok = Frame::Response(RelayResponse {
                    success: true,
                    message: None,
                    error: false,
                });
                let _ = ws
                    .send(Message::text(codec::encode(&ok, Dialect::Current)))
                    .await;
                while let Some(Ok(message)) = ws.next().await {
                    if close && message.is_text() {
                        let _ = ws.close(None).await;
                        return;
                    }
                }
            });
        }
    });
    url
}

fn send_request(peer: Uuid, description: String) -> v1::SendRequest {
    v1::SendRequest {
        peer_uuid: peer.to_string(),
        description_type: "offer".into(),
        description,
        worker: String::new(),
        ..Default::default()
    }
}

#[tokio::test]
async fn send_returns_only_documented_codes() {
    let documented = documented_send_codes();
    let check = |what: &str, status: &tonic::Status| {
        eprintln!("{what}: {:?} {}", status.code(), status.message());
        assert!(
            documented.contains(&status.code()),
            "{what}: {status:?} is not documented for Send"
        );
    };

    // A request over the decoding limit (4 MiB), and one under it but over
    // max_message_bytes.
    let relay = dev_relay().await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), &relay.url(), Dialect::Current);
    s.max_message_bytes = 4096;
    let daemon = TestDaemon::start_with(s).await;
    let mut raw = daemon.registered_client().await.raw();
    let big = raw
        .send(send_request(
            Uuid::new_v4(),
            "x".repeat(limits::MAX_REQUEST_BYTES),
        ))
        .await
        .unwrap_err();
    check("over the decoding limit", &big);
    assert_eq!(big.code(), tonic::Code::OutOfRange);
    let over = raw
        .send(send_request(Uuid::new_v4(), "x".repeat(200_000)))
        .await
        .unwrap_err();
    check("over max_message_bytes", &over);
    assert_eq!(over.code(), tonic::Code::InvalidArgument);
    daemon.stop().await;

    // A caller's deadline while the relay never confirms.
    let daemon = TestDaemon::start(&swallowing_relay(false).await, Dialect::Current).await;
    let client = daemon.registered_client().await;
    let mut request = tonic::Request::new(send_request(Uuid::new_v4(), "hello".into()));
    request.set_timeout(Duration::from_millis(500));
    let late = client.raw().send(request).await.unwrap_err();
    check("deadline before confirmation", &late);
    assert_eq!(late.code(), tonic::Code::DeadlineExceeded);
    // The same on a SendStream: it ends with the status, not cancelled.
    let mut request = tonic::Request::new(
        futures_util::stream::iter(vec![send_request(Uuid::new_v4(), "a".into())])
            .chain(futures_util::stream::pending()),
    );
    request.set_timeout(Duration::from_millis(500));
    let mut responses = client
        .raw()
        .send_stream(request)
        .await
        .unwrap()
        .into_inner();
    let ended = loop {
        match responses.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended OK with messages unsettled"),
            Err(status) => break status,
        }
    };
    check("SendStream deadline", &ended);
    assert_eq!(ended.code(), tonic::Code::DeadlineExceeded);
    daemon.stop().await;

    // The relay closes the connection during a send.
    let daemon = TestDaemon::start(&swallowing_relay(true).await, Dialect::Current).await;
    let client = daemon.registered_client().await;
    let mut request = tonic::Request::new(send_request(Uuid::new_v4(), "hello".into()));
    request.set_timeout(Duration::from_secs(2));
    match client.raw().send(request).await {
        Ok(_) => {}
        Err(status) => check("relay closed during a send", &status),
    }
    daemon.stop().await;
}

/// grpc-timeout values the spec does not allow (more than 8 digits) are no
/// deadline, and never overflow: the call is served.
#[tokio::test]
async fn an_absurd_grpc_timeout_is_ignored() {
    let relay = dev_relay().await;
    let bin = Bin::start(&relay.url(), &[], &[], None).await;
    registered(&bin.client().await).await;
    let message = send_request(Uuid::new_v4(), "hello".into()).encode_to_vec();
    for timeout in ["18446744073709551615S", "99999999H", "123456789n"] {
        let mut conn = UnixStream::connect(&bin.socket).await.unwrap();
        let mut bytes = hello();
        bytes.extend(grpc_request(
            1,
            b"localhost",
            "/relay_sidecar.v1.RelaySidecar/Send",
            &[("grpc-timeout", timeout)],
            &message,
            &mut Encoder::new(),
        ));
        conn.write_all(&bytes).await.unwrap();
        let outcome = outcome(&mut conn, 1).await;
        assert_eq!(
            outcome.field("grpc-status"),
            Some("0"),
            "{timeout}: {outcome:?}"
        );
    }
    let mut bin = bin;
    assert!(bin.alive());
    let lines = bin.log_lines();
    assert!(!lines.iter().any(|l| l.contains("panicked")), "{lines:#?}");
}

// ---------------------------------------------------------------------------
// Row 14: admin calls.

/// Reconnect is for admins only (root and the daemon's user by default),
/// at most one per reconnect_min_interval, and each is logged with its
/// caller.
#[tokio::test]
async fn reconnect_needs_an_admin_and_is_rate_limited() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs relayctl as another user, which needs root: run it as root (CI does)"
    );
    let user = nix::unistd::User::from_name("relay-sidecar-test")
        .unwrap()
        .expect("the user relay-sidecar-test (scripts/test creates it)");
    let relay = dev_relay().await;
    let bin = Bin::start(&relay.url(), &["--socket-mode", "0666"], &[], None).await;
    std::fs::set_permissions(
        bin._dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let client = bin.client().await;
    registered(&client).await;
    let relayctl = |uid: u32, gid: u32| {
        let socket = bin.socket.clone();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_relayctl"))
                .arg("--socket")
                .arg(socket)
                .arg("reconnect")
                .uid(uid)
                .gid(gid)
                .output()
                .await
                .unwrap()
        }
    };
    let other = relayctl(user.uid.as_raw(), user.gid.as_raw()).await;
    assert!(!other.status.success());
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        stderr.contains("permission denied") && stderr.contains("admin_uids"),
        "{stderr}"
    );

    // Root, in a loop: one gets through.
    let mut ok = 0;
    let mut exhausted = 0;
    for _ in 0..20 {
        match client.reconnect().await {
            Ok(()) => ok += 1,
            Err(relay_sidecar_client::Error::ResourceExhausted(_)) => exhausted += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!((ok, exhausted), (1, 19));
    registered(&client).await;
    assert_eq!(client.status().await.unwrap().counters.reconnects, 1);
    let admitted: Vec<_> = bin
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("\"admin call\""))
        .collect();
    assert_eq!(admitted.len(), 1, "{admitted:?}");
    assert!(
        admitted[0].contains("\"uid\":0") && admitted[0].contains("\"call\":\"Reconnect\""),
        "{}",
        admitted[0]
    );
}

// ---------------------------------------------------------------------------
// Row 15: relayctl and peer-controlled text.

#[tokio::test]
async fn relayctl_shows_escape_sequences_instead_of_sending_them_to_the_terminal() {
    let relay = dev_relay().await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), &relay.url(), Dialect::Current);
    s.name = Some("evil\u{1b}[31mname".into());
    let daemon = TestDaemon::start_with(s).await;
    let client = daemon.registered_client().await;
    let listen = tokio::process::Command::new(env!("CARGO_BIN_EXE_relayctl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["listen", "--count", "1"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while client.status().await.unwrap().counters.subscribers == 0 {
        assert!(
            Instant::now() < deadline,
            "relayctl listen did not subscribe"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hostile = "\u{1b}]0;pwned\u{7}\u{1b}[2J\rspoofed\nline";
    client
        .send(daemon.uuid, DescriptionType::Offer, hostile)
        .await
        .unwrap();
    let output = tokio::time::timeout(WAIT, listen.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_relayctl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("status")
        .output()
        .await
        .unwrap();
    for out in [&output.stdout, &status.stdout] {
        let text = String::from_utf8_lossy(out);
        assert!(
            !out.iter().any(|&b| b == 0x1b || b == 0x07 || b == b'\r'),
            "{text:?}"
        );
        assert!(text.contains("evil\\u{1b}[31mname"), "{text}");
    }
    let listened = String::from_utf8_lossy(&output.stdout);
    assert_eq!(listened.lines().count(), 1, "{listened:?}");
    assert!(
        listened.contains("\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\rspoofed\\nline"),
        "{listened}"
    );
    daemon.stop().await;
}

// ---------------------------------------------------------------------------
// Row 16: the metrics endpoint.

/// 100 idle TCP connections to metrics_listen: a scrape still works, the
/// socket still serves, and the daemon closes every idle one within
/// METRICS_CONNECTION_TIME.
#[tokio::test]
async fn the_metrics_endpoint_is_bounded() {
    let relay = dev_relay().await;
    let port = support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let bin = Bin::start(&relay.url(), &["--metrics-listen", &listen], &[], None).await;
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(&listen).await.unwrap());
    }
    let scrape = async {
        let mut stream = tokio::net::TcpStream::connect(&listen).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    let response = tokio::time::timeout(Duration::from_secs(5), scrape)
        .await
        .expect("a scrape in time");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    served(&bin.socket, Duration::from_secs(5)).await;
    let mut sink = [0u8; 64];
    for conn in &mut idle {
        let closed = tokio::time::timeout(
            limits::METRICS_CONNECTION_TIME + Duration::from_secs(10),
            conn.read(&mut sink),
        )
        .await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    }
    eprintln!(
        "100 idle metrics connections: all closed after {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < limits::METRICS_CONNECTION_TIME + Duration::from_secs(10));
}
