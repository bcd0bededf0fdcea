//! The relay link: this host's one registered WebSocket to the relay, kept
//! up across failures, and the only way anything reaches the relay. Others
//! use it through a [`Handle`].
//!
//! The rooms, each with one owner:
//! - [`handle`]: the callers' side. A send is accepted into the link's
//!   [`outbox`], and its [`Ticket`] says how it went.
//! - [`outbox`]: the link's own ordered, bounded queue of accepted sends. It
//!   outlives every connection, so order holds by construction: nobody
//!   resubmits anything.
//! - [`supervisor`]: the task that owns the link and runs its state machine;
//!   the one place a state changes ([`ConnectionState`]).
//! - [`handshake`]: URL, headers, token, TLS and registration.
//! - [`session`]: one registered connection, split into a [`reader`] that
//!   only reads and a [`writer`] that only writes; neither waits on the
//!   other. The session watches [`pings`] and confirmations.
//! - [`probes`]: confirmation bookkeeping. The relay never acknowledges a
//!   forward, so writes are followed by a probe, a message from this host
//!   to itself; the relay handles one socket's frames in order, so when the
//!   probe comes back every send before it has been handled (forwarded, or
//!   returned as a bounce), and only then do those senders hear OK. One
//!   probe is out at a time, shared by everything written before it.
//! - [`backoff`]: retry delays, and the detector for another client taking
//!   this uuid on relays that do not say so.
//!
//! Every bound the link keeps is below, with why it is that number.

mod backoff;
mod handle;
mod handshake;
mod outbox;
mod pings;
mod probes;
mod reader;
mod session;
mod supervisor;
mod tls;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use uuid::Uuid;

pub use self::handle::{Handle, Ticket};
pub use self::handshake::without_credentials;
pub use self::supervisor::Connection;
pub use self::tls::{TlsError, client_config};
use crate::codec::Dialect;
use crate::status::ConnectionState;

/// Sends (a unary Send, or one chunk of a SendStream) the link holds before
/// a caller must wait for room, within its deadline. Enough to keep the
/// writer busy through a reconnect at full speed; small enough that what
/// waits is bounded (a chunk is at most 64 messages).
pub const OUTBOX_ENTRIES: usize = 1024;

/// Frames written to the relay and not yet confirmed, probes included; the
/// writer pauses when this many are out. Everything a relay sends back
/// because of our writes (our messages to ourselves, our probes, bounces of
/// our sends) queues at the relay towards us, and the embedded relay closes
/// a client whose queue passes [`crate::devrelay::OUTBOUND_QUEUE_FRAMES`]
/// (1024) with 1008; ProxyStore's relay instead waits on our socket inside
/// the sender's handler. A quarter of that queue leaves room for what remote
/// peers send meanwhile, and still holds several batches, so at loopback
/// latency the writer seldom waits.
pub const IN_FLIGHT_FRAMES: usize = 256;
const _: () = assert!(IN_FLIGHT_FRAMES <= crate::devrelay::OUTBOUND_QUEUE_FRAMES / 4);

/// How many queued frames are gathered for one flush (a
/// SendStream chunk is never split, so a batch may run over by one chunk).
const WRITE_BATCH: usize = 64;
const _: () = assert!(2 * (WRITE_BATCH + 1) <= IN_FLIGHT_FRAMES);

/// How much one read from a WebSocket asks for, bytes. tungstenite zeroes
/// this much of its buffer before every read (its default is 128 KiB), and
/// relay messages are a few hundred bytes: a larger frame just takes several
/// reads. The embedded relay uses the same.
pub const READ_BUFFER_BYTES: usize = 8 * 1024;

/// How long a deliberate close waits, first for the relay to confirm what
/// was written, then for its answering close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Close codes after which retrying cannot help (PROTOCOL.md).
const UNRECOVERABLE: [u16; 3] = [4001, 4002, 4004];

/// Everything the link needs to know, resolved from the settings.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// The relay's URL as configured, credentials included: only the
    /// handshake reads it. Everything shown uses [`without_credentials`].
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
    /// How long the relay may take to return a probe before the link counts
    /// as broken.
    pub confirm_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Wait for the first send or subscription before connecting.
    pub lazy: bool,
    pub max_message_bytes: usize,
}

/// One encoded frame for the relay, and the peer it is addressed to (a
/// returned message is only taken as our bounce if it went to a peer we
/// wrote to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub peer: Uuid,
    pub frame: String,
}

/// Why a send was not (or may not have been) handled by the relay.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SendError {
    /// Nothing was sent: the deadline came first.
    #[error("not sent before the deadline: the relay connection is {state}{}", detail_suffix(.detail))]
    NotRegistered {
        state: ConnectionState,
        detail: String,
    },
    #[error("relay connection failed{}: {detail}; call Reconnect once the cause is fixed", code_suffix(*.code))]
    Failed { code: Option<u16>, detail: String },
    #[error("the relay did not confirm the message, which may or may not have been forwarded: {0}")]
    Unconfirmed(String),
    #[error("the daemon is stopping")]
    Stopping,
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    }
}

fn code_suffix(code: Option<u16>) -> String {
    code.map(|c| format!(" (close code {c})"))
        .unwrap_or_default()
}

/// What the supervisor is asked to do, besides sending.
#[derive(Debug)]
enum Command {
    /// Drop the connection (if any) and register again at once.
    Reconnect,
    /// Lazy mode: start connecting.
    Wake,
}
