//! Who may call: the optional allow-list of uids and gids (`allow_uids`,
//! `allow_gids`), checked against a connection's peer credentials when it is
//! accepted, before anything it sends is parsed, and the refusal those
//! callers get; and who may make the calls that affect every worker
//! (`admin_uids`, `admin_gids`: Reconnect), at most one every
//! `reconnect_min_interval`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::UCred;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};
use tracing::{info, warn};

use crate::authority::{
    CONTINUATION, END_HEADERS, END_STREAM, FRAME_HEADER, HEADERS, PREFACE, frame_header,
    literal_field,
};
use crate::limits::{LOG_SUMMARY_INTERVAL, MAX_FRAME_BYTES, REFUSAL_BYTES, REFUSAL_TIME};
use crate::summary::Summary;

static ADMIN_REFUSED: Summary = Summary::new(LOG_SUMMARY_INTERVAL);

/// The callers admitted; an empty list admits anyone who can open the socket.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    uids: Arc<[u32]>,
    gids: Arc<[u32]>,
}

impl AllowList {
    pub fn new(uids: &[u32], gids: &[u32]) -> Self {
        AllowList {
            uids: uids.into(),
            gids: gids.into(),
        }
    }

    /// Whether anyone who can open the socket is admitted.
    pub fn is_open(&self) -> bool {
        self.uids.is_empty() && self.gids.is_empty()
    }

    pub fn admits(&self, uid: u32, gid: u32) -> bool {
        self.is_open() || self.uids.contains(&uid) || self.gids.contains(&gid)
    }

    /// Whether the caller with these peer credentials is admitted; if not,
    /// the message it is refused with.
    pub fn admits_peer(&self, cred: Option<&UCred>) -> Result<(), String> {
        if self.is_open() {
            return Ok(());
        }
        match cred {
            None => Err("the caller's credentials are unknown, and this daemon admits only the uids in allow_uids and the gids in allow_gids".into()),
            Some(cred) if self.admits(cred.uid(), cred.gid()) => Ok(()),
            Some(cred) => Err(format!(
                "uid {} (gid {}) may not use this daemon: it admits only the uids in allow_uids and the gids in allow_gids",
                cred.uid(),
                cred.gid()
            )),
        }
    }
}

/// Who may make the calls that affect every worker, and how often.
#[derive(Debug)]
pub struct Admins {
    uids: Vec<u32>,
    gids: Vec<u32>,
    min_interval: Duration,
    last: Mutex<Option<Instant>>,
}

impl Admins {
    /// Empty lists admit root and the daemon's own uid.
    pub fn new(uids: &[u32], gids: &[u32], min_interval: Duration) -> Self {
        let uids = if uids.is_empty() && gids.is_empty() {
            let own = nix::unistd::geteuid().as_raw();
            if own == 0 { vec![0] } else { vec![0, own] }
        } else {
            uids.to_vec()
        };
        Admins {
            uids,
            gids: gids.to_vec(),
            min_interval,
            last: Mutex::new(None),
        }
    }

    /// Admits the caller behind `request` to `call`, which affects every
    /// worker: PERMISSION_DENIED unless it is an admin, RESOURCE_EXHAUSTED
    /// within `reconnect_min_interval` of the last one admitted. The calls
    /// admitted are logged with their caller.
    pub fn admit<T>(&self, call: &str, request: &Request<T>) -> Result<(), Status> {
        let cred = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred);
        let (uid, gid, pid) = match cred {
            Some(c) => (c.uid(), c.gid(), c.pid().unwrap_or(0)),
            None => {
                return Err(Status::permission_denied(format!(
                    "{call}: the caller's credentials are unknown; only admin_uids and admin_gids may call it"
                )));
            }
        };
        if !self.uids.contains(&uid) && !self.gids.contains(&gid) {
            if let Some(earlier) = ADMIN_REFUSED.note() {
                warn!(
                    call,
                    uid, gid, pid, earlier, "admin call refused: not in admin_uids or admin_gids"
                );
            }
            return Err(Status::permission_denied(format!(
                "{call}: uid {uid} (gid {gid}) may not call it: it affects every worker, and only admin_uids and admin_gids may (by default root and the daemon's own user)"
            )));
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(at) = *last {
            let since = now.duration_since(at);
            if since < self.min_interval {
                let wait = self.min_interval - since;
                return Err(Status::resource_exhausted(format!(
                    "{call}: the last one was {:.1} s ago; at most one every {:?} (reconnect_min_interval); try again in {:.1} s",
                    since.as_secs_f64(),
                    self.min_interval,
                    wait.as_secs_f64()
                )));
            }
        }
        *last = Some(now);
        info!(call, uid, gid, pid, "admin call");
        Ok(())
    }
}

/// Answers a caller the allow-list refuses: every call it has sent within
/// [`REFUSAL_TIME`] (and [`REFUSAL_BYTES`]) gets PERMISSION_DENIED with
/// `message`, then the connection is closed. Only frame headers are read:
/// nothing the caller sends is decoded, so a refused caller costs a few
/// kilobytes for two seconds, whatever it sends.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, message: &str) {
    let _ = tokio::time::timeout(REFUSAL_TIME, answer_refused(&mut stream, message)).await;
    let _ = stream.shutdown().await;
}

const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

async fn answer_refused<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    message: &str,
) -> std::io::Result<()> {
    // The server's connection preface: SETTINGS, all defaults.
    stream.write_all(&frame_header(0, SETTINGS, 0, 0)).await?;
    let mut input = BytesMut::with_capacity(4096);
    let mut budget = REFUSAL_BYTES;
    if !fill(stream, &mut input, PREFACE.len(), &mut budget).await? || !input.starts_with(PREFACE) {
        return Ok(());
    }
    input.advance(PREFACE.len());
    let response = refusal_block(message);
    let mut said_goaway = false;
    loop {
        if !fill(stream, &mut input, FRAME_HEADER, &mut budget).await? {
            return Ok(());
        }
        let len = usize::from(input[0]) << 16 | usize::from(input[1]) << 8 | usize::from(input[2]);
        let (kind, flags) = (input[3], input[4]);
        let stream_id = u32::from_be_bytes([input[5], input[6], input[7], input[8]]) & 0x7fff_ffff;
        if len > MAX_FRAME_BYTES as usize
            || !fill(stream, &mut input, FRAME_HEADER + len, &mut budget).await?
        {
            return Ok(());
        }
        let frame = input.split_to(FRAME_HEADER + len);
        let payload = &frame[FRAME_HEADER..];
        let mut out = Vec::new();
        match kind {
            SETTINGS if flags & ACK == 0 => {
                out.extend_from_slice(&frame_header(0, SETTINGS, ACK, 0))
            }
            PING if flags & ACK == 0 && len == 8 => {
                out.extend_from_slice(&frame_header(8, PING, ACK, 0));
                out.extend_from_slice(payload);
            }
            // A request is answered once its header block is complete; its
            // fields are never decoded.
            HEADERS | CONTINUATION if flags & END_HEADERS != 0 && stream_id != 0 => {
                out.extend_from_slice(&frame_header(
                    response.len(),
                    HEADERS,
                    END_HEADERS | END_STREAM,
                    stream_id,
                ));
                out.extend_from_slice(&response);
                if !said_goaway {
                    // No new calls on this connection: this one is the last.
                    said_goaway = true;
                    out.extend_from_slice(&frame_header(8, GOAWAY, 0, 0));
                    out.extend_from_slice(&stream_id.to_be_bytes());
                    out.extend_from_slice(&0u32.to_be_bytes());
                }
            }
            _ => {}
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
        }
    }
}

/// Reads until `input` holds `want` bytes; false at the end of the input or
/// of the byte budget.
async fn fill<S: AsyncRead + Unpin>(
    stream: &mut S,
    input: &mut BytesMut,
    want: usize,
    budget: &mut usize,
) -> std::io::Result<bool> {
    while input.len() < want {
        if *budget == 0 {
            return Ok(false);
        }
        let mut chunk = [0u8; 4096];
        let max = chunk.len().min(*budget);
        let n = stream.read(&mut chunk[..max]).await?;
        if n == 0 {
            return Ok(false);
        }
        *budget -= n;
        input.extend_from_slice(&chunk[..n]);
    }
    Ok(true)
}

/// A gRPC "trailers-only" response: PERMISSION_DENIED with `message`, as an
/// HPACK block that refers to no table.
fn refusal_block(message: &str) -> Vec<u8> {
    // :status 200 is entry 8 of HPACK's static table.
    let mut block = vec![0x88];
    literal_field(b"content-type", b"application/grpc", &mut block);
    literal_field(b"grpc-status", b"7", &mut block);
    literal_field(b"grpc-message", &percent_encode(message), &mut block);
    block
}

/// `grpc-message` as the gRPC over HTTP/2 spec encodes it: printable ASCII
/// but `%` as it is, every other byte as `%XX`.
fn percent_encode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for &b in text.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_list_admits_and_empty_lists_admit_all() {
        let open = AllowList::default();
        assert!(open.is_open() && open.admits(1234, 1234));
        let list = AllowList::new(&[1000], &[50]);
        assert!(list.admits(1000, 1));
        assert!(list.admits(1, 50));
        assert!(!list.admits(1001, 1001));
        // No credentials, no call.
        assert!(list.admits_peer(None).is_err());
        assert!(open.admits_peer(None).is_ok());
    }
}
