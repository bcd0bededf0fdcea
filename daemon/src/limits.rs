//! Every bound the daemon puts on what a local caller can make it hold on
//! the socket and on the metrics endpoint (connections, streams, header
//! bytes, time), and on what callers and remote peers make the router keep
//! for delivery. Each says why it is that number; the ones an operator may
//! need to change are settings (`config.rs`), whose defaults are here too.
//!
//! The README's "Limits and abuse" table lists the attack each one answers.

use std::time::Duration;

// --- HTTP/2 on the socket: the gRPC server and the `:authority` rewriter
// --- in front of it, which must be at least as strict as h2 behind it.

/// The largest decoded header list of one request (RFC 7541 §4.1: name,
/// value and 32 bytes a field). hyper's own default, set explicitly: a gRPC
/// request's headers are a few hundred bytes, and the rewriter decodes
/// blocks before h2 does, so it must stop at the same size.
pub const MAX_HEADER_LIST_BYTES: usize = 16 * 1024;

/// The HPACK dynamic table a client may use: RFC 7541's default, which
/// tonic does not change, so a client may not make it larger.
pub const HPACK_TABLE_BYTES: usize = 4096;

/// The most encoded bytes of one header block (HEADERS and CONTINUATION
/// payloads together) the rewriter holds. Huffman coding can make a field
/// longer than it is decoded, and padding adds up to 255 bytes a frame;
/// four times the decoded limit is h2's own "abuse" bound for a block.
pub const MAX_HEADER_BLOCK_BYTES: usize = 4 * MAX_HEADER_LIST_BYTES;

/// The longest `:authority` the rewriter replaces. It exists for clients
/// that put the socket path there: a Unix socket path is at most 107 bytes
/// (`sun_path`), percent-encoded at most three times that. A longer value is
/// left for h2, which refuses it.
pub const MAX_REWRITTEN_AUTHORITY_BYTES: usize = 3 * 107;

/// The most CONTINUATION frames one block may have. h2 allows the frames a
/// full header list needs plus a quarter, and at least 5; with 16 KiB
/// frames and a 16 KiB list that is 5.
pub const MAX_CONTINUATION_FRAMES: usize = 5;

/// How long a header block may take from its HEADERS frame to its last
/// CONTINUATION. A client writes a block in one go; one that stops in the
/// middle is holding the connection's memory, not sending a request.
pub const HEADER_BLOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest frame payload the rewriter writes (RFC 9113 §4.2: every peer
/// accepts it), and the largest the server advertises it will read.
pub const MAX_FRAME_BYTES: u32 = 16_384;

/// Open calls on one connection. tonic's builder passes none to hyper,
/// which would lift h2's own default of 200 and let one connection open
/// streams without end (each Subscribe is a stream the router feeds). A
/// worker holds a few; 128 leaves room for a process with many threads
/// sharing one channel. More wait in the client until one ends.
pub const MAX_CONCURRENT_STREAMS: u32 = 128;

/// Flow-control windows, per stream and per connection: hyper's defaults,
/// set explicitly. 1 MiB lets a largest message (`max_message_bytes`) in
/// without a round trip, and bounds what one connection can make h2 buffer
/// before the service reads it.
pub const STREAM_WINDOW_BYTES: u32 = 1 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 1 << 20;

/// Streams a client may open and reset at once before the connection is
/// closed (the "rapid reset" attack): h2's default, set explicitly.
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// Streams the server may reset for a client's protocol errors before the
/// connection is closed: hyper's default, set explicitly.
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// HTTP/2 pings to a connection that has been quiet this long, and how long
/// the answer may take before the connection is closed: they find callers
/// that vanished without closing (a frozen process keeps its socket open).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The largest request tonic decodes (a larger one is refused while its
/// length prefix is read, OUT_OF_RANGE, never buffered): tonic's own
/// default, set explicitly. Up to it, a message over `max_message_bytes`
/// gets INVALID_ARGUMENT naming `description`, as the contract says. When
/// `max_message_bytes` is raised past it, the limit is that plus
/// [`REQUEST_OVERHEAD_BYTES`].
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// Room in a request for the fields besides `description`, whose own
/// limits are far smaller.
pub const REQUEST_OVERHEAD_BYTES: usize = 64 * 1024;

// --- Connections on the socket.

/// File descriptors kept back from callers: the relay connection and its
/// reconnects, the metrics endpoint, the listening sockets, the log, the
/// identity and TLS files. A reconnect that meets EMFILE would cost every
/// worker the relay link, so callers never get the last ones.
pub const FD_RESERVE: u64 = 64;

/// Default `max_connections`: about 32 KiB of h2 buffers each when idle, so
/// 1024 idle connections are about 32 MiB, and the service unit's
/// `LimitNOFILE` leaves room for far more if an operator raises it.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Default `handshake_timeout`: from accept to the HTTP/2 preface and the
/// first frame. Every client sends them at once; one that does not in 10 s
/// is not a client.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default `idle_timeout`: how long a connection may stay without an open
/// call. Clients reconnect on their next call, so closing a quiet one costs
/// a connect; five minutes keeps the workers that send every few seconds
/// or minutes on one connection.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The first and the longest wait before accepting again after accept(2)
/// failed for lack of file descriptors or memory: without it the accept
/// loop retries at once, forever, at full CPU.
pub const ACCEPT_BACKOFF_INITIAL: Duration = Duration::from_millis(10);
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long a caller the allow-list refuses is answered (PERMISSION_DENIED
/// for every call it has sent by then) before its connection is closed, and
/// how many bytes of it are read: enough for a client's first requests,
/// never a header block's decoding.
pub const REFUSAL_TIME: Duration = Duration::from_secs(2);
pub const REFUSAL_BYTES: usize = 64 * 1024;

/// Refused callers being answered at once; past this, a refused caller's
/// connection is closed unanswered, so that refusals cannot use up the file
/// descriptors the admitted callers need.
pub const MAX_REFUSALS_IN_FLIGHT: usize = 64;

// --- Admin calls.

/// Default `reconnect_min_interval`: Reconnect drops the registration every
/// worker shares; more than one every few seconds is a loop, not a repair.
pub const DEFAULT_RECONNECT_MIN_INTERVAL: Duration = Duration::from_secs(5);

// --- Deadlines.

/// The most digits a `grpc-timeout` value may have (the gRPC over HTTP/2
/// spec: `TimeoutValue → {positive integer as ASCII string of at most 8
/// digits}`); longer values are not a deadline.
pub const GRPC_TIMEOUT_DIGITS: usize = 8;

/// A deadline further away than this is treated as this far: 100 years is
/// "never" for a call, and `Instant` arithmetic cannot overflow below it.
pub const FAR_DEADLINE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

// --- The metrics endpoint (HTTP/1.1 over TCP).

/// Connections to `metrics_listen` at once: a scraper uses one; a few more
/// for people with curl. The oldest is closed to admit one more.
pub const METRICS_CONNECTIONS: usize = 16;

/// How long one metrics connection may live: one request is read and
/// answered (no keep-alive) within it.
pub const METRICS_CONNECTION_TIME: Duration = Duration::from_secs(10);

// --- The router: what callers and remote peers make it keep for delivery.
// --- Its queue and backlog budgets are settings (`config.rs`).

/// The longest worker label or group name, in bytes. Checked where
/// requests come in (INVALID_ARGUMENT naming the field): labels are kept in
/// the router's tables, and a caller chooses them. Generous for a label
/// such as `ingest-3` or `proxystore-1234-5f3a9c2e`.
pub const MAX_LABEL_BYTES: usize = 256;

/// The most remote peers the reply-affinity table remembers. A host talks
/// to tens or hundreds of peers within one `affinity` period; past this the
/// oldest binding is forgotten (its replies then take turns in their group,
/// as after an expiry), so a caller sending to endless fresh uuids costs a
/// fixed amount of memory (with labels of at most [`MAX_LABEL_BYTES`],
/// under 2 MiB).
pub const MAX_AFFINITY_ENTRIES: usize = 4096;

/// The most conversations the host holds at once. A ProxyStore worker
/// holds one per remote peer it has a connection with; a thousand local
/// workers each with four remote peers fit. Bounded because any local
/// caller can claim fresh uuids, and any remote peer can offer.
pub const MAX_CONVERSATIONS: usize = 4096;

/// Refusals of remote offers waiting to be written to the relay. An offer
/// refused while this many are queued is still refused, only without the
/// answer (its sender times out instead): a flood of offers cannot make the
/// daemon queue an answer to each.
pub const REFUSALS_QUEUED: usize = 256;

/// How often expired backlog messages, affinity bindings and conversations
/// are swept away, and a pending drop summary is logged when due: the
/// resolution of every time-to-live in the router.
pub const ROUTER_SWEEP_EVERY: Duration = Duration::from_secs(1);

// --- Logs.

/// Events a caller can cause in volume (connections refused or shed,
/// Reconnects refused) are logged once, then as a count per this interval;
/// messages the router drops, and offers it refuses, as one summary per
/// this interval.
pub const LOG_SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
