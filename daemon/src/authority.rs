//! A wrapper for accepted connections that replaces an HTTP/2 request's
//! `:authority` with `localhost` when h2 would refuse it, so that gRPC
//! clients which put the socket path there work with their default settings.
//!
//! grpcio 1.57+ sends the socket path percent-encoded, grpc-java and grpcurl
//! send it as is; h2 parses `:authority` as a URI authority and resets such a
//! stream with PROTOCOL_ERROR before tonic sees the request, and offers no
//! option to relax that (hyperium/h2#487). The daemon serves nothing that
//! depends on `:authority`, so the value can be replaced before h2 reads it.
//!
//! Only the client-to-server direction is touched, and in it only header
//! blocks (HEADERS and their CONTINUATION frames): every other frame is copied
//! through as it arrives. A connection whose first request carries an
//! `:authority` h2 accepts is passed through untouched from then on: one
//! connection is one client channel, with one authority. Otherwise every
//! block is decoded, to follow the client's HPACK dynamic table, and
//! re-encoded from the decoded fields as literals without indexing, which
//! refer to no table at all (h2's view of the table would differ from the
//! client's after the first change). Anything this module
//! cannot follow (no HTTP/2 preface, a malformed frame, an HPACK error) turns
//! it into a plain pipe from that byte on, so h2 sees the same input as
//! without it and reports the error itself.
//!
//! It holds no more than h2 would: a block over the decoded header-list
//! limit, over the encoded block limit, with too many CONTINUATION frames,
//! or not finished in time is not rewritten but handed to h2 as it came
//! (which refuses it by the same limits), or the connection is closed when
//! h2 could no longer follow it ([`crate::limits`]).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::Connected;
use tracing::debug;

use crate::limits::{
    HEADER_BLOCK_TIMEOUT, HPACK_TABLE_BYTES, MAX_CONTINUATION_FRAMES, MAX_FRAME_BYTES,
    MAX_HEADER_BLOCK_BYTES, MAX_HEADER_LIST_BYTES, MAX_REWRITTEN_AUTHORITY_BYTES,
};

/// What a client sends first on an HTTP/2 connection with prior knowledge.
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub(crate) const FRAME_HEADER: usize = 9;
pub(crate) const HEADERS: u8 = 0x1;
pub(crate) const CONTINUATION: u8 = 0x9;
pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The re-encoded blocks are cut into frames no larger than every peer must
/// accept, whatever h2 advertises.
const MAX_FRAME: usize = MAX_FRAME_BYTES as usize;
/// RFC 7541 §4.1: what each field adds to a header list's size.
const FIELD_OVERHEAD: usize = 32;
/// What replaces an `:authority` that h2 would refuse.
const LOCALHOST: &[u8] = b"localhost";

/// A connection whose incoming header blocks carry only an `:authority` h2
/// accepts. Writes go straight to the inner stream.
pub struct Normalise<S> {
    inner: S,
    rewriter: Rewriter,
    /// Bytes ready for the reader.
    out: BytesMut,
    eof: bool,
    /// When the header block being held must be complete.
    block_deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> Normalise<S> {
    pub fn new(inner: S) -> Self {
        Normalise {
            inner,
            rewriter: Rewriter::new(),
            out: BytesMut::new(),
            eof: false,
            block_deadline: None,
        }
    }

    /// Starts the clock when a header block starts arriving; stops it when
    /// none is held.
    fn arm_block_deadline(&mut self) {
        if !self.rewriter.holding() {
            self.block_deadline = None;
        } else if self.block_deadline.is_none() {
            self.block_deadline = Some(Box::pin(tokio::time::sleep(HEADER_BLOCK_TIMEOUT)));
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for Normalise<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Normalise")
            .field("inner", &self.inner)
            .field("phase", &self.rewriter.phase)
            .field("reencoding", &self.rewriter.reencode)
            .finish_non_exhaustive()
    }
}

/// The peer credentials and address stay those of the socket.
impl<S: Connected> Connected for Normalise<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Normalise<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Frame payloads that pass unchanged (DATA, above all) are read
            // straight into the caller's buffer.
            if let Some(limit) = this.rewriter.direct_limit() {
                let n = if limit >= buf.remaining() {
                    // The caller's buffer as it is: no copy, and none of
                    // its unwritten part zeroed first.
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                    buf.filled().len() - before
                } else {
                    let mut direct = ReadBuf::new(buf.initialize_unfilled_to(limit));
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                    let n = direct.filled().len();
                    buf.advance(n);
                    n
                };
                this.rewriter.passed_directly(n);
                this.eof = n == 0;
                return Poll::Ready(Ok(()));
            }
            if let Some(deadline) = this.block_deadline.as_mut()
                && deadline.as_mut().poll(cx).is_ready()
            {
                debug!(timeout = ?HEADER_BLOCK_TIMEOUT, "closing a connection: header block not finished in time");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "header block not finished in time",
                )));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // What was held back goes to h2, which sees the same
                // truncated input it would have seen without this wrapper.
                this.eof = true;
                this.rewriter.finish(&mut this.out);
            } else {
                this.rewriter.push(read.filled(), &mut this.out);
            }
            if this.rewriter.phase == Phase::Closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a header block over the limits after :authority rewriting began",
                )));
            }
            this.arm_block_deadline();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Normalise<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the connection preface.
    Preface,
    /// At a frame boundary.
    Frames,
    /// Copying the payload of an unchanged frame: this many bytes are left.
    Copy(usize),
    /// Given up: everything passes unchanged.
    Pipe,
    /// A block over the limits on a connection whose blocks were being
    /// re-encoded: h2's HPACK table no longer matches the client's, so h2
    /// cannot be handed the block; the connection ends.
    Closed,
}

/// A header block waiting for its last CONTINUATION frame.
struct Block {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    continuations: usize,
}

/// The byte-level rewriting, apart from any I/O: bytes from the client are
/// pushed in, bytes for h2 come out.
struct Rewriter {
    phase: Phase,
    /// Received bytes not yet passed on or held.
    pending: BytesMut,
    /// The frames of the block being received, as they came.
    held: BytesMut,
    block: Option<Block>,
    decoder: Decoder<'static>,
    /// Set at the first change: every block is re-encoded from then on.
    reencode: bool,
}

impl Rewriter {
    fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_BYTES);
        Rewriter {
            phase: Phase::Preface,
            pending: BytesMut::new(),
            held: BytesMut::new(),
            block: None,
            decoder,
            reencode: false,
        }
    }

    /// How many bytes may bypass the rewriter now, if any.
    fn direct_limit(&self) -> Option<usize> {
        if !self.pending.is_empty() {
            return None;
        }
        match self.phase {
            Phase::Pipe => Some(usize::MAX),
            Phase::Copy(left) if left > 0 => Some(left),
            Phase::Copy(_) | Phase::Preface | Phase::Frames | Phase::Closed => None,
        }
    }

    /// Whether part of a header block is held back, waiting for the rest.
    fn holding(&self) -> bool {
        self.phase == Phase::Frames && (!self.held.is_empty() || !self.pending.is_empty())
    }

    fn passed_directly(&mut self, n: usize) {
        if let Phase::Copy(left) = self.phase {
            self.phase = if n == left {
                Phase::Frames
            } else {
                Phase::Copy(left - n)
            };
        }
    }

    /// Everything held back, at the end of the input.
    fn finish(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(&self.held.split());
        out.extend_from_slice(&self.pending.split());
        self.block = None;
        self.phase = Phase::Pipe;
    }

    fn give_up(&mut self, out: &mut BytesMut, why: &str) {
        debug!(why, "not following this connection's header blocks");
        self.finish(out);
    }

    /// A block over one of the limits: h2 gets it as it came and applies
    /// the same limits itself, unless h2's view of the HPACK table already
    /// differs from the client's.
    fn over_limit(&mut self, out: &mut BytesMut, why: &str) {
        if self.reencode {
            debug!(why, "closing a connection: header block over the limits");
            self.held.clear();
            self.pending.clear();
            self.block = None;
            self.phase = Phase::Closed;
        } else {
            self.give_up(out, why);
        }
    }

    fn push(&mut self, input: &[u8], out: &mut BytesMut) {
        self.pending.extend_from_slice(input);
        loop {
            match self.phase {
                Phase::Closed => {
                    self.pending.clear();
                    return;
                }
                Phase::Pipe => {
                    out.extend_from_slice(&self.pending.split());
                    return;
                }
                Phase::Copy(left) => {
                    let n = left.min(self.pending.len());
                    out.extend_from_slice(&self.pending.split_to(n));
                    self.passed_directly(n);
                    if self.pending.is_empty() {
                        return;
                    }
                }
                Phase::Preface => {
                    let n = PREFACE.len().min(self.pending.len());
                    if self.pending[..n] != PREFACE[..n] {
                        return self.give_up(out, "no HTTP/2 preface");
                    }
                    if n < PREFACE.len() {
                        return;
                    }
                    out.extend_from_slice(&self.pending.split_to(n));
                    self.phase = Phase::Frames;
                }
                Phase::Frames => {
                    if self.pending.len() < FRAME_HEADER {
                        return;
                    }
                    let len = usize::from(self.pending[0]) << 16
                        | usize::from(self.pending[1]) << 8
                        | usize::from(self.pending[2]);
                    let kind = self.pending[3];
                    if kind != HEADERS && kind != CONTINUATION {
                        if self.block.is_some() {
                            // A protocol error: h2 will say so.
                            return self.give_up(out, "frame inside a header block");
                        }
                        out.extend_from_slice(&self.pending.split_to(FRAME_HEADER));
                        self.phase = match len {
                            0 => Phase::Frames,
                            len => Phase::Copy(len),
                        };
                        continue;
                    }
                    if self.held.len() + FRAME_HEADER + len > MAX_HEADER_BLOCK_BYTES {
                        return self.over_limit(out, "header block over its encoded size limit");
                    }
                    if self.pending.len() < FRAME_HEADER + len {
                        return;
                    }
                    let frame = self.pending.split_to(FRAME_HEADER + len);
                    self.held.extend_from_slice(&frame);
                    match self.header_frame(&frame, out) {
                        Ok(()) => {}
                        Err(Refusal::Malformed(why)) => return self.give_up(out, why),
                        Err(Refusal::OverLimit(why)) => return self.over_limit(out, why),
                    }
                }
            }
        }
    }

    /// Takes in one HEADERS or CONTINUATION frame (already in `held`).
    fn header_frame(&mut self, frame: &[u8], out: &mut BytesMut) -> Result<(), Refusal> {
        use Refusal::{Malformed, OverLimit};
        let (kind, flags) = (frame[3], frame[4]);
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let mut payload = &frame[FRAME_HEADER..];
        if kind == HEADERS {
            if self.block.is_some() {
                return Err(Malformed("HEADERS inside a header block"));
            }
            let mut pad = 0;
            if flags & PADDED != 0 {
                let (&len, rest) = payload.split_first().ok_or(Malformed("bad padding"))?;
                pad = usize::from(len);
                payload = rest;
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                let (fields, rest) = payload
                    .split_at_checked(5)
                    .ok_or(Malformed("bad priority"))?;
                priority = Some(<[u8; 5]>::try_from(fields).expect("five bytes"));
                payload = rest;
            }
            let end = payload
                .len()
                .checked_sub(pad)
                .ok_or(Malformed("bad padding"))?;
            self.block = Some(Block {
                stream_id,
                end_stream: flags & END_STREAM != 0,
                priority,
                fragment: payload[..end].to_vec(),
                continuations: 0,
            });
        } else {
            let block = self
                .block
                .as_mut()
                .ok_or(Malformed("CONTINUATION without HEADERS"))?;
            if block.stream_id != stream_id {
                return Err(Malformed("CONTINUATION on another stream"));
            }
            block.continuations += 1;
            if block.continuations > MAX_CONTINUATION_FRAMES {
                return Err(OverLimit("too many CONTINUATION frames"));
            }
            block.fragment.extend_from_slice(payload);
        }
        if flags & END_HEADERS == 0 {
            return Ok(());
        }
        let block = self.block.take().expect("a block is open");
        let mut fields = Vec::new();
        // The whole block is decoded (the table must follow the client's),
        // but no field is kept past the header list limit: a few bytes of
        // HPACK can stand for kilobytes of fields.
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                size = size.saturating_add(name.len() + value.len() + FIELD_OVERHEAD);
                if size <= MAX_HEADER_LIST_BYTES {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|_| Malformed("HPACK error"))?;
        if size > MAX_HEADER_LIST_BYTES {
            return Err(OverLimit("header list over its size limit"));
        }
        let mut changed = false;
        for (name, value) in &mut fields {
            if name == b":authority"
                && value.len() <= MAX_REWRITTEN_AUTHORITY_BYTES
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                debug!(authority = %String::from_utf8_lossy(value), "replacing an :authority h2 would refuse");
                *value = LOCALHOST.to_vec();
                changed = true;
            }
        }
        self.reencode |= changed;
        if self.reencode {
            self.held.clear();
            encode_block(&block, &fields, out);
        } else {
            out.extend_from_slice(&self.held.split());
            // A connection is one client channel with one authority: when
            // its first request needed nothing, none will, and following
            // every later block would cost each request an HPACK decode.
            debug!("first request's :authority is fine; passing this connection through");
            self.phase = Phase::Pipe;
        }
        Ok(())
    }
}

/// Why a header block is not rewritten.
enum Refusal {
    /// Not valid HTTP/2 or HPACK: h2 will say so.
    Malformed(&'static str),
    /// Over one of the limits h2 applies too.
    OverLimit(&'static str),
}

/// Runs `input` through a rewriter in pieces of at most `piece` bytes (at
/// least 1), as if read from a connection, and returns what h2 would read:
/// the fuzz target and the tests drive the rewriter through this.
pub fn rewrite(input: &[u8], piece: usize) -> Vec<u8> {
    let mut rewriter = Rewriter::new();
    let mut out = BytesMut::new();
    for piece in input.chunks(piece.max(1)) {
        rewriter.push(piece, &mut out);
        // What the limits promise: never more held than one block's worth.
        assert!(rewriter.held.len() <= MAX_HEADER_BLOCK_BYTES + FRAME_HEADER);
    }
    if rewriter.phase != Phase::Closed {
        rewriter.finish(&mut out);
    }
    out.to_vec()
}

/// Appends one header field as an HPACK literal without indexing, new name:
/// 0x00, then two non-Huffman strings (a length with a 7-bit prefix, then the
/// bytes). It refers to no table and adds to none.
pub(crate) fn literal_field(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    for text in [name, value] {
        loona_hpack::encoder::encode_integer_into(text.len(), 7, 0, &mut *out)
            .expect("writing to a Vec");
        out.extend_from_slice(text);
    }
}

/// An HTTP/2 frame header (RFC 9113 §4.1); `len` is at most 2^24 - 1.
pub(crate) fn frame_header(len: usize, kind: u8, flags: u8, stream_id: u32) -> [u8; FRAME_HEADER] {
    let [_, a, b, c] = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    let [d, e, f, g] = stream_id.to_be_bytes();
    [a, b, c, kind, flags, d, e, f, g]
}

/// Writes `fields` as one header block of literals without indexing, cut
/// into a HEADERS frame and as many CONTINUATION frames as it takes.
fn encode_block(block: &Block, fields: &[(Vec<u8>, Vec<u8>)], out: &mut BytesMut) {
    let mut encoded = Vec::new();
    for (name, value) in fields {
        literal_field(name, value, &mut encoded);
    }
    let mut first = Vec::with_capacity(MAX_FRAME);
    let mut flags = 0;
    if block.end_stream {
        flags |= END_STREAM;
    }
    if let Some(priority) = block.priority {
        flags |= PRIORITY;
        first.extend_from_slice(&priority);
    }
    let mut rest = encoded.as_slice();
    let n = rest.len().min(MAX_FRAME - first.len());
    first.extend_from_slice(&rest[..n]);
    rest = &rest[n..];
    let mut kind = HEADERS;
    let mut payload = first.as_slice();
    loop {
        let last = rest.is_empty();
        let frame_flags = if last { flags | END_HEADERS } else { flags };
        out.extend_from_slice(&frame_header(
            payload.len(),
            kind,
            frame_flags,
            block.stream_id,
        ));
        out.extend_from_slice(payload);
        if last {
            return;
        }
        let n = rest.len().min(MAX_FRAME);
        (payload, rest) = rest.split_at(n);
        kind = CONTINUATION;
        // END_STREAM and PRIORITY belong to the HEADERS frame only.
        flags = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::Encoder;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn request(authority: &str, path: &str) -> Fields {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A frame as the reader of the rewritten bytes sees it.
    #[derive(Debug, PartialEq)]
    struct Frame {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    }

    fn frames(mut bytes: &[u8]) -> Vec<Frame> {
        assert!(bytes.starts_with(PREFACE), "the preface goes first");
        bytes = &bytes[PREFACE.len()..];
        let mut all = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            all.push(Frame {
                kind: bytes[3],
                flags: bytes[4],
                stream: u32::from_be_bytes(bytes[5..9].try_into().unwrap()),
                payload: bytes[9..9 + len].to_vec(),
            });
            bytes = &bytes[9 + len..];
        }
        all
    }

    /// Header blocks decoded as h2 would, with one decoder for the connection.
    fn header_blocks(frames: &[Frame]) -> Vec<(u32, u8, Fields)> {
        let mut decoder = Decoder::new();
        let mut blocks = Vec::new();
        let mut open: Option<(u32, u8, Vec<u8>)> = None;
        for f in frames {
            match f.kind {
                HEADERS => {
                    assert!(open.is_none());
                    assert!(f.payload.len() <= MAX_FRAME);
                    let mut p = &f.payload[..];
                    let mut pad = 0;
                    if f.flags & PADDED != 0 {
                        pad = usize::from(p[0]);
                        p = &p[1..];
                    }
                    if f.flags & PRIORITY != 0 {
                        p = &p[5..];
                    }
                    open = Some((f.stream, f.flags, p[..p.len() - pad].to_vec()));
                }
                CONTINUATION => {
                    assert!(f.payload.len() <= MAX_FRAME);
                    open.as_mut().unwrap().2.extend_from_slice(&f.payload);
                }
                _ => continue,
            }
            if f.flags & END_HEADERS != 0 {
                let (stream, flags, fragment) = open.take().unwrap();
                blocks.push((stream, flags, decoder.decode(&fragment).unwrap()));
            }
        }
        blocks
    }

    /// A client connection: the preface, then each block with the client's
    /// own HPACK encoder (which indexes what it sends), a DATA frame after
    /// each.
    fn connection(blocks: &[Fields]) -> Vec<u8> {
        let mut encoder = Encoder::new();
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[0, 4, 0, 0, 0, 0]));
        // An empty frame (a SETTINGS acknowledgement).
        bytes.extend(frame(0x4, 0x1, 0, &[]));
        for (i, fields) in blocks.iter().enumerate() {
            let stream = 2 * i as u32 + 1;
            let block = encoder.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
            bytes.extend(frame(HEADERS, END_HEADERS, stream, &block));
            bytes.extend(frame(0x0, END_STREAM, stream, b"\0\0\0\0\x02hi"));
        }
        bytes
    }

    #[test]
    fn valid_authorities_pass_byte_for_byte() {
        let input = connection(&[
            request("localhost", "/a.B/C"),
            request("localhost", "/a.B/D"),
            request("example.org:443", "/a.B/C"),
        ]);
        for step in [1, 7, input.len()] {
            assert_eq!(rewrite(&input, step), input);
        }
    }

    #[test]
    fn socket_paths_become_localhost_and_later_blocks_stay_decodable() {
        let blocks = [
            request("%2Frun%2Frelay-sidecar%2Frelay.sock", "/a.B/C"),
            // Indexed by the client's encoder: refers to entries h2 never
            // saw, so this block must be re-encoded too.
            request("%2Frun%2Frelay-sidecar%2Frelay.sock", "/a.B/C"),
            request("/run/relay-sidecar/relay.sock", "/a.B/D"),
            request("localhost", "/a.B/E"),
        ];
        let input = connection(&blocks);
        for step in [1, 3, 100, input.len()] {
            let out = rewrite(&input, step);
            let frames = frames(&out);
            let decoded = header_blocks(&frames);
            assert_eq!(decoded.len(), blocks.len());
            for ((stream, flags, fields), sent) in decoded.iter().zip(&blocks) {
                assert_eq!(flags & END_HEADERS, END_HEADERS);
                let authority = &sent.iter().find(|(n, _)| n == b":authority").unwrap().1;
                let mut expected = sent.clone();
                if http::uri::Authority::try_from(authority.as_slice()).is_err() {
                    for (n, v) in &mut expected {
                        if n == b":authority" {
                            *v = b"localhost".to_vec();
                        }
                    }
                }
                assert_eq!(fields, &expected, "stream {stream}");
            }
            // DATA frames are untouched.
            let data: Vec<_> = frames.iter().filter(|f| f.kind == 0).collect();
            assert_eq!(data.len(), blocks.len());
            assert!(data.iter().all(|f| f.payload == b"\0\0\0\0\x02hi"));
        }
    }

    #[test]
    fn a_connection_that_starts_valid_is_passed_through() {
        // Not a real client's behaviour: h2 judges the later block itself.
        let input = connection(&[
            request("localhost", "/a.B/C"),
            request("/run/relay-sidecar/relay.sock", "/a.B/D"),
        ]);
        for step in [1, 7, input.len()] {
            assert_eq!(rewrite(&input, step), input);
        }
    }

    #[test]
    fn padding_priority_and_continuation_frames_in() {
        let mut fields = request("/tmp/x.sock", "/a.B/C");
        fields.push((b"x-big".to_vec(), vec![b'v'; 15_000]));
        let block = Encoder::new().encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
        // HEADERS padded and with priority, the block split over two frames.
        let (a, b) = block.split_at(100);
        let mut headers = vec![3u8];
        headers.extend_from_slice(&[0, 0, 0, 0, 15]);
        headers.extend_from_slice(a);
        headers.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &headers));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, b));
        let out = rewrite(&input, 1000);
        let frames = frames(&out);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].kind, HEADERS);
        assert_eq!(frames[0].flags, PRIORITY | END_STREAM | END_HEADERS);
        assert_eq!(&frames[0].payload[..5], &[0, 0, 0, 0, 15]);
        let decoded = header_blocks(&frames);
        fields[3].1 = b"localhost".to_vec();
        assert_eq!(decoded, vec![(5, frames[0].flags, fields)]);
    }

    #[test]
    fn blocks_are_cut_into_frames_of_at_most_16_kib() {
        let mut fields = request("localhost", "/a.B/C");
        fields.push((b"x-big".to_vec(), vec![b'v'; 40_000]));
        let block = Block {
            stream_id: 5,
            end_stream: true,
            priority: Some([0, 0, 0, 0, 15]),
            fragment: Vec::new(),
            continuations: 0,
        };
        let mut out = BytesMut::from(PREFACE);
        encode_block(&block, &fields, &mut out);
        let frames = frames(&out);
        assert!(frames.len() >= 3);
        assert_eq!(frames[0].kind, HEADERS);
        assert_eq!(frames[0].flags, PRIORITY | END_STREAM);
        assert!(
            frames[1..]
                .iter()
                .all(|f| f.kind == CONTINUATION && f.stream == 5)
        );
        assert_eq!(frames.last().unwrap().flags, END_HEADERS);
        assert_eq!(header_blocks(&frames), vec![(5, frames[0].flags, fields)]);
    }

    /// A client's first block over a limit reaches h2 exactly as sent, so
    /// that h2 refuses it by the same limit; a later one, once blocks are
    /// being re-encoded, ends the connection.
    #[test]
    fn blocks_over_the_limits_are_not_rewritten() {
        let mut big = request("/tmp/x.sock", "/a.B/C");
        big.push((b"x-big".to_vec(), vec![b'v'; MAX_HEADER_LIST_BYTES]));
        let first = connection(std::slice::from_ref(&big));
        assert_eq!(rewrite(&first, 1000), first);

        let later = connection(&[request("/tmp/x.sock", "/a.B/C"), big]);
        let mut rewriter = Rewriter::new();
        let mut out = BytesMut::new();
        rewriter.push(&later, &mut out);
        assert_eq!(rewriter.phase, Phase::Closed);
        assert_eq!(
            header_blocks(&frames(&out)).len(),
            1,
            "the first block only"
        );

        // Too many CONTINUATION frames.
        let block = Encoder::new().encode(
            request("/tmp/x.sock", "/a")
                .iter()
                .map(|(n, v)| (&n[..], &v[..])),
        );
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &block[..1]));
        for byte in &block[1..=MAX_CONTINUATION_FRAMES + 1] {
            input.extend(frame(CONTINUATION, 0, 1, &[*byte]));
        }
        assert_eq!(rewrite(&input, 7), input);
    }

    /// The HPACK bomb: one table entry of 4 KB, then a block that refers
    /// to it thousands of times, a million header bytes from a few KB.
    pub(crate) fn hpack_bomb(references: usize) -> Vec<u8> {
        let mut block = Vec::new();
        // A literal with incremental indexing, new name: it becomes entry
        // 62, the first of the dynamic table.
        block.push(0x40);
        for text in [&b"x-bomb"[..], &[b'b'; 4000][..]] {
            loona_hpack::encoder::encode_integer_into(text.len(), 7, 0, &mut block).unwrap();
            block.extend_from_slice(text);
        }
        block.extend(std::iter::repeat_n(0x80 | 62, references));
        let mut input = PREFACE.to_vec();
        let mut chunks = block.chunks(MAX_FRAME);
        input.extend(frame(HEADERS, 0, 1, chunks.next().unwrap()));
        let rest: Vec<_> = chunks.collect();
        for (i, chunk) in rest.iter().enumerate() {
            let flags = if i + 1 == rest.len() { END_HEADERS } else { 0 };
            input.extend(frame(CONTINUATION, flags, 1, chunk));
        }
        input
    }

    #[test]
    fn an_hpack_bomb_is_not_expanded() {
        // 60,000 references: 240 MB of headers, within the encoded limit.
        let bomb = hpack_bomb(60_000);
        assert!(bomb.len() < MAX_HEADER_BLOCK_BYTES);
        let started = std::time::Instant::now();
        assert_eq!(rewrite(&bomb, 8192), bomb, "handed to h2 as it came");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // A million references: over the encoded limit before any decoding.
        let bomb = hpack_bomb(1_000_000);
        assert_eq!(rewrite(&bomb, 8192), bomb);
    }

    #[test]
    fn what_cannot_be_followed_passes_unchanged() {
        // Not HTTP/2.
        let http1 = b"GET / HTTP/1.1\r\nHost: /tmp/x.sock\r\n\r\n";
        assert_eq!(rewrite(http1, 5), http1);
        // An HPACK error (index 70 with an empty dynamic table), then more.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0x80 | 70]));
        input.extend(frame(0x0, 0, 1, b"abc"));
        assert_eq!(rewrite(&input, 4), input);
        // A DATA frame in the middle of a header block.
        let block = Encoder::new().encode(
            request("/tmp/x.sock", "/a")
                .iter()
                .map(|(n, v)| (&n[..], &v[..])),
        );
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &block));
        input.extend(frame(0x0, 0, 1, b"abc"));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b""));
        assert_eq!(rewrite(&input, 2), input);
        // A truncated connection.
        let input = connection(&[request("/tmp/x.sock", "/a")]);
        // Past the DATA frame, into the HEADERS frame.
        let cut = &input[..input.len() - 20];
        assert_eq!(rewrite(cut, 9), cut[..]);
    }

    #[tokio::test]
    async fn the_stream_wrapper_reads_rewritten_bytes_and_writes_through() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let input = connection(&[request("/tmp/x.sock", "/a.B/C")]);
        let expected = rewrite(&input, input.len());
        assert_ne!(expected, input);
        let (mut client, server) = tokio::io::duplex(64);
        let mut wrapped = Normalise::new(server);
        let writer = tokio::spawn(async move {
            client.write_all(&input).await.unwrap();
            let mut answer = [0u8; 5];
            client.read_exact(&mut answer).await.unwrap();
            answer
        });
        let mut got = vec![0u8; expected.len()];
        wrapped.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
        wrapped.write_all(b"hello").await.unwrap();
        assert_eq!(&writer.await.unwrap(), b"hello");
    }
}
