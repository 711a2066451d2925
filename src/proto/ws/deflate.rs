//! permessage-deflate (RFC 7692) on tungstenite's frames, sans-IO.
//!
//! tungstenite has no extension support: its reader fails every frame with RSV1 set. A
//! connection that negotiated deflate therefore puts an `Inflater` in front of it: received
//! frames are parsed with tungstenite's own [`FrameHeader`], the frames of compressed messages
//! are unmasked, inflated and handed on as plain frames (RSV1 clear), every other frame passes
//! through untouched, and tungstenite does the rest (reassembly, UTF-8, control frames, the
//! close handshake) as on any connection. Outgoing messages of at least the threshold's size
//! are compressed by a `Deflater` and framed with RSV1 set.
//!
//! Negotiation: [`negotiate`] on the server, [`offer`] and [`accept_response`] on the client.
//! A compression context with takeover costs ~380 KiB for the compressor and ~40 KiB for the
//! decompressor (`tests/ws_memory.rs`); without takeover both are reset after every message and come from a small
//! per-thread pool, so they cost nothing per connection. [`Contexts`] bounds how many
//! connections of a server keep their own.

use super::conn::{frame_header, Role, MAX_HEADER};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::cell::RefCell;
use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// The tail every compressed message's deflate stream ends with (an empty stored block, from
/// the sync flush); RFC 7692 takes it off the wire.
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// What an app allows (server) or offers (client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateConfig {
    /// zlib level, 0 (store) to 9 (smallest, slowest).
    pub level: u32,
    /// Messages shorter than this are sent uncompressed (each message says which it is).
    pub threshold: usize,
    /// The largest LZ77 window our compressor uses, 2^bits bytes (9 to 15).
    pub window_bits: u8,
    /// Keep compression contexts from message to message (better ratios on similar messages,
    /// at the memory cost above). Off: both sides reset after each message.
    pub context_takeover: bool,
    /// Server: how many connections may keep their own contexts; later ones are negotiated
    /// without context takeover until some of those close.
    pub max_contexts: usize,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        Self { level: 1, threshold: 64, window_bits: 15, context_takeover: true, max_contexts: 128 }
    }
}

/// What one connection agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    pub level: u32,
    pub threshold: usize,
    /// Our compressor's window. 8 when the peer asked for 256 bytes, which zlib cannot make:
    /// then every message is sent uncompressed (allowed: compression is per message).
    pub send_window_bits: u8,
    /// We keep our compressor's context between messages.
    pub send_takeover: bool,
    /// The peer keeps its context, so our decompressor must too.
    pub recv_takeover: bool,
}

impl Agreed {
    /// Whether this connection keeps a context of its own (counts against [`Contexts`]).
    pub fn keeps_context(&self) -> bool {
        self.send_takeover || self.recv_takeover
    }
}

/// The number of a server's connections that keep their own contexts, bounded.
#[derive(Debug)]
pub struct Contexts {
    max: usize,
    used: AtomicUsize,
}

/// One connection's share of [`Contexts`], given back when dropped.
#[derive(Debug)]
pub struct ContextTicket(Arc<Contexts>);

impl Contexts {
    pub fn new(max: usize) -> Arc<Contexts> {
        Arc::new(Contexts { max, used: AtomicUsize::new(0) })
    }

    /// Whether another connection may keep its own contexts.
    pub fn available(&self) -> bool {
        self.used.load(Ordering::Relaxed) < self.max
    }

    /// Counts a connection that keeps its own contexts.
    pub fn take(self: &Arc<Self>) -> ContextTicket {
        self.used.fetch_add(1, Ordering::Relaxed);
        ContextTicket(self.clone())
    }

    /// Connections keeping their own contexts now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl Drop for ContextTicket {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Negotiation.

/// An extension's parameters: names and values.
type ExtParams<'a> = Vec<(&'a str, Option<&'a str>)>;

/// `name; param; param=value` items of `Sec-WebSocket-Extensions` values (several headers and
/// comma-separated lists alike; quoted values unquoted).
fn parse_extensions<'a>(values: impl Iterator<Item = &'a str>) -> Vec<(&'a str, ExtParams<'a>)> {
    let mut out = Vec::new();
    for item in values.flat_map(|v| v.split(',')) {
        let mut parts = item.split(';').map(str::trim);
        let name = parts.next().unwrap_or("");
        if name.is_empty() {
            continue;
        }
        let params = parts
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim().trim_matches('"'))),
                None => (p, None),
            })
            .collect();
        out.push((name, params));
    }
    out
}

/// A window-bits value: 8 to 15, decimal without leading zeros.
fn window_bits(v: &str) -> Option<u8> {
    if v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

/// The offer's parameters, or `None` when one is unknown, repeated or malformed (such an
/// offer must be declined).
#[derive(Default)]
struct Params {
    server_no_takeover: bool,
    client_no_takeover: bool,
    server_bits: Option<u8>,
    client_bits: Option<Option<u8>>,
}

fn read_params(params: &[(&str, Option<&str>)]) -> Option<Params> {
    let mut p = Params::default();
    for (i, (name, value)) in params.iter().enumerate() {
        if params[..i].iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return None;
        }
        match (name.to_ascii_lowercase().as_str(), value) {
            ("server_no_context_takeover", None) => p.server_no_takeover = true,
            ("client_no_context_takeover", None) => p.client_no_takeover = true,
            ("server_max_window_bits", Some(v)) => p.server_bits = Some(window_bits(v)?),
            ("client_max_window_bits", None) => p.client_bits = Some(None),
            ("client_max_window_bits", Some(v)) => p.client_bits = Some(Some(window_bits(v)?)),
            _ => return None,
        }
    }
    Some(p)
}

/// Server: the first acceptable permessage-deflate offer among the request's
/// `Sec-WebSocket-Extensions` values, as what was agreed and the response header's value.
/// `own_context`: whether this connection may keep contexts ([`Contexts::available`]).
pub fn negotiate<'a>(
    offers: impl Iterator<Item = &'a str>,
    config: &DeflateConfig,
    own_context: bool,
) -> Option<(Agreed, String)> {
    let takeover = config.context_takeover && own_context;
    parse_extensions(offers)
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("permessage-deflate"))
        .find_map(|(_, params)| {
            let p = read_params(params)?;
            let send_takeover = takeover && !p.server_no_takeover;
            // The peer said it resets anyway, or we ask it to: our decompressor need not keep
            // its window.
            let recv_takeover = takeover && !p.client_no_takeover;
            let send_window_bits = p.server_bits.unwrap_or(15).min(config.window_bits);
            let mut response = String::from("permessage-deflate");
            if !send_takeover {
                response.push_str("; server_no_context_takeover");
            }
            if !recv_takeover {
                response.push_str("; client_no_context_takeover");
            }
            if p.server_bits.is_some() || send_window_bits < 15 {
                response.push_str(&format!("; server_max_window_bits={send_window_bits}"));
            }
            let agreed = Agreed {
                level: config.level,
                threshold: config.threshold,
                send_window_bits,
                send_takeover,
                recv_takeover,
            };
            Some((agreed, response))
        })
}

/// Client: the `Sec-WebSocket-Extensions` value offering permessage-deflate.
pub fn offer(config: &DeflateConfig) -> String {
    let mut offer = String::from("permessage-deflate; client_max_window_bits");
    if !config.context_takeover {
        offer.push_str("; server_no_context_takeover; client_no_context_takeover");
    }
    offer
}

/// Client: what the server's response headers agreed to, `Ok(None)` when it declined, or why
/// the response is unacceptable.
pub fn accept_response<'a>(
    values: impl Iterator<Item = &'a str>,
    config: &DeflateConfig,
) -> Result<Option<Agreed>, String> {
    let exts = parse_extensions(values);
    let params = match exts.as_slice() {
        [] => return Ok(None),
        [(name, params)] if name.eq_ignore_ascii_case("permessage-deflate") => params,
        _ => return Err("server selected extensions we did not offer".into()),
    };
    let p = read_params(params).ok_or("server answered permessage-deflate with invalid parameters")?;
    if !config.context_takeover && !p.server_no_takeover {
        // Accepting our offer means echoing this (RFC 7692 §7.1.1.1).
        return Err(
            "server accepted permessage-deflate without the server_no_context_takeover we asked for".into()
        );
    }
    let send_window_bits = match p.client_bits {
        Some(Some(bits)) => bits.min(config.window_bits),
        Some(None) => return Err("server sent client_max_window_bits without a value".into()),
        None => config.window_bits,
    };
    Ok(Some(Agreed {
        level: config.level,
        threshold: config.threshold,
        send_window_bits,
        send_takeover: config.context_takeover && !p.client_no_takeover,
        recv_takeover: !p.server_no_takeover,
    }))
}

// ---------------------------------------------------------------------------------------------
// zlib state: own (takeover) or pooled (reset after every message).

/// Free zlib states for connections without takeover (a few are enough: a message is
/// compressed in one call, and inflated between its first and last frame).
const POOL_KEEP: usize = 8;

thread_local! {
    static COMPRESSORS: RefCell<Vec<(u32, u8, Compress)>> = const { RefCell::new(Vec::new()) };
    static DECOMPRESSORS: RefCell<Vec<Decompress>> = const { RefCell::new(Vec::new()) };
}

fn take_compressor(level: u32, bits: u8) -> Compress {
    COMPRESSORS
        .with_borrow_mut(|pool| {
            let i = pool.iter().position(|(l, b, _)| *l == level && *b == bits)?;
            Some(pool.swap_remove(i).2)
        })
        .unwrap_or_else(|| Compress::new_with_window_bits(Compression::new(level), false, bits))
}

fn give_compressor(level: u32, bits: u8, mut z: Compress) {
    z.reset();
    COMPRESSORS.with_borrow_mut(|pool| {
        if pool.len() < POOL_KEEP {
            pool.push((level, bits, z));
        }
    });
}

fn take_decompressor() -> Decompress {
    // A full window inflates whatever window the peer compressed with.
    DECOMPRESSORS.with_borrow_mut(|pool| pool.pop()).unwrap_or_else(|| Decompress::new(false))
}

fn give_decompressor(mut z: Decompress) {
    z.reset(false);
    DECOMPRESSORS.with_borrow_mut(|pool| {
        if pool.len() < POOL_KEEP {
            pool.push(z);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Sending.

/// Compresses outgoing messages.
#[derive(Debug)]
pub(super) struct Deflater {
    agreed: Agreed,
    /// Kept between messages only with takeover.
    zlib: Option<Compress>,
}

impl Deflater {
    pub(super) fn new(agreed: Agreed) -> Self {
        Deflater { agreed, zlib: None }
    }

    /// Compresses `data` into `out` (cleared first) and returns `true`, or returns `false`
    /// when the message goes uncompressed (under the threshold, a window zlib cannot honour,
    /// or, without takeover, no gain).
    pub(super) fn compress(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        let a = self.agreed;
        // (An empty message gains nothing, and zlib has nothing to flush for it.)
        if data.is_empty() || data.len() < a.threshold || a.send_window_bits < 9 {
            return false;
        }
        let mut z = self.zlib.take().unwrap_or_else(|| take_compressor(a.level, a.send_window_bits));
        out.clear();
        let start = z.total_in();
        loop {
            out.reserve(data.len() / 2 + 64);
            let done = (z.total_in() - start) as usize;
            // Compressing into a Vec's spare room cannot fail.
            let _ = z.compress_vec(&data[done..], out, FlushCompress::Sync);
            // The sync flush is complete once the input is in and the output did not fill up
            // (zlib asks for more than 6 bytes to spare, or it may repeat the flush marker).
            if (z.total_in() - start) as usize == data.len() && out.capacity() - out.len() > 6 {
                break;
            }
        }
        debug_assert!(out.ends_with(&TAIL));
        out.truncate(out.len().saturating_sub(TAIL.len()));
        if a.send_takeover {
            self.zlib = Some(z);
            true
        } else {
            give_compressor(a.level, a.send_window_bits, z);
            // The context is reset, so the plain message is as good when it is no larger.
            out.len() < data.len()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Receiving.

/// The frame being passed on or inflated.
#[derive(Debug, Clone, Copy)]
struct Current {
    left: u64,
    mask: Option<[u8; 4]>,
    /// Payload bytes of this frame seen so far (the mask's phase).
    seen: usize,
    inflate: bool,
    fin: bool,
}

/// Why a connection failed in the inflater: close code and reason.
pub type Failure = (u16, &'static str);

/// Turns the received byte stream into one tungstenite can read (see the module docs).
#[derive(Debug)]
pub(super) struct Inflater {
    role: Role,
    recv_takeover: bool,
    max_frame: u64,
    max_message: usize,
    /// Header bytes received so far (at most [`MAX_HEADER`]).
    head: Vec<u8>,
    frame: Option<Current>,
    /// A data message is open: its first frame was not final.
    in_message: bool,
    /// The open message is compressed: its opcode until its first inflated frame went out,
    /// then `Continue`.
    compressed: Option<OpCode>,
    /// Inflated bytes of the open message handed on.
    message_len: usize,
    /// Compressed payload bytes of the open message.
    message_in: usize,
    /// The open message's last chunk went to zlib with the tail, and its end was handed on.
    ended: bool,
    /// The peer's deflate stream ended (a block with BFINAL): the rest of the message's input
    /// is ignored and the next message starts a new stream.
    stream_ended: bool,
    zlib: Option<Decompress>,
    /// Scratch for unmasking.
    unmasked: Vec<u8>,
    /// Received bytes not looked at yet because the sink was full.
    queue: Vec<u8>,
    failed: Option<Failure>,
}

/// Something that takes the bytes tungstenite reads.
pub(super) trait Sink {
    fn push(&mut self, data: &[u8]);
    /// Enough waits for tungstenite: further input stays queued in the inflater (so a peer
    /// cannot make one read inflate into many messages' worth of memory).
    fn full(&self) -> bool;
}

/// Compressed input inflated per step: between steps the sink's backpressure is checked, so
/// one step's output (at most ~1,000 times this, and never past the message limit) bounds what
/// inflating adds to the input buffer.
const INFLATE_STEP: usize = 4096;
/// Output room given to zlib per call.
const INFLATE_ROOM: usize = 64 << 10;

thread_local! {
    /// Where zlib writes inflated bytes before they are handed on (one per thread, so a
    /// connection keeps no output buffer).
    static INFLATED: RefCell<Vec<u8>> = RefCell::new(vec![0; INFLATE_ROOM]);
}

impl Inflater {
    pub(super) fn new(role: Role, agreed: &Agreed, max_frame: usize, max_message: usize) -> Self {
        Inflater {
            role,
            recv_takeover: agreed.recv_takeover,
            max_frame: max_frame as u64,
            max_message,
            head: Vec::new(),
            frame: None,
            in_message: false,
            compressed: None,
            message_len: 0,
            message_in: 0,
            ended: false,
            stream_ended: false,
            zlib: None,
            unmasked: Vec::new(),
            queue: Vec::new(),
            failed: None,
        }
    }

    /// Received bytes waiting for the sink to drain (see [`resume`](Self::resume)).
    pub(super) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Whether scratch buffers grew past an idle connection's needs.
    pub(super) fn has_spare_buffers(&self) -> bool {
        self.unmasked.capacity() + self.queue.capacity() > 0
    }

    /// Why the connection must fail, once it must (nothing more is handed on then).
    pub(super) fn failed(&self) -> Option<Failure> {
        self.failed
    }

    /// Gives back scratch buffers (for a connection gone idle; queued input stays).
    pub(super) fn trim(&mut self) {
        self.unmasked = Vec::new();
        if self.queue.is_empty() {
            self.queue = Vec::new();
        }
    }

    fn fail(&mut self, code: u16, reason: &'static str) {
        self.failed = Some((code, reason));
        self.frame = None;
        self.queue = Vec::new();
    }

    /// Feeds received bytes; what tungstenite should read goes to `sink`, as far as it has room.
    pub(super) fn push(&mut self, data: &[u8], sink: &mut impl Sink) {
        if self.queue.is_empty() {
            let rest = self.process(data, sink);
            self.queue.extend_from_slice(rest);
        } else {
            self.queue.extend_from_slice(data);
            self.resume(sink);
        }
    }

    /// Goes on with queued input (once tungstenite read what the sink held).
    pub(super) fn resume(&mut self, sink: &mut impl Sink) {
        let queue = std::mem::take(&mut self.queue);
        let rest = self.process(&queue, sink).len();
        if self.failed.is_none() {
            self.queue = queue;
            self.queue.drain(..self.queue.len() - rest);
        }
    }

    /// Processes `data` until it is used up or the sink is full; returns what is left.
    fn process<'d>(&mut self, mut data: &'d [u8], sink: &mut impl Sink) -> &'d [u8] {
        while !data.is_empty() && self.failed.is_none() && !sink.full() {
            let Some(mut cur) = self.frame else {
                data = self.read_header(data, sink);
                continue;
            };
            let step = if cur.inflate { INFLATE_STEP } else { usize::MAX };
            let n = cur.left.min(data.len().min(step) as u64) as usize;
            let (chunk, rest) = data.split_at(n);
            data = rest;
            if cur.inflate {
                self.inflate_chunk(chunk, &mut cur, sink);
            } else {
                sink.push(chunk);
            }
            cur.left -= n as u64;
            cur.seen += n;
            self.frame = Some(cur);
            if cur.left == 0 {
                self.end_frame(cur, sink);
            }
        }
        if self.failed.is_some() {
            return &[];
        }
        data
    }

    /// Takes header bytes from `data` (returns the rest); once the header is complete, decides
    /// what to do with the frame.
    fn read_header<'d>(&mut self, data: &'d [u8], sink: &mut impl Sink) -> &'d [u8] {
        let had = self.head.len();
        let take = (MAX_HEADER - had).min(data.len());
        self.head.extend_from_slice(&data[..take]);
        let mut cursor = Cursor::new(&self.head[..]);
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return &data[take..],
            Err(_) => {
                // Let tungstenite report what is wrong with it.
                sink.push(&self.head);
                self.head.clear();
                self.fail(1002, "invalid frame header");
                return &[];
            }
        };
        let used = cursor.position() as usize;
        let rest = &data[used - had..];
        if self.role == Role::Server && header.mask.is_none() {
            // tungstenite accepts unmasked frames on deflate connections (inflated frames are
            // handed on unmasked), so the rule is enforced here.
            self.head.clear();
            self.fail(1002, "unmasked frame from a client");
            return &[];
        }
        let is_data = matches!(header.opcode, OpCode::Data(Data::Text | Data::Binary));
        // (RSV2/RSV3 pass through for tungstenite to refuse.)
        let starts = header.rsv1 && !header.rsv2 && !header.rsv3 && is_data && !self.in_message;
        let continues = self.compressed.is_some()
            && header.opcode == OpCode::Data(Data::Continue)
            && !header.rsv1
            && !header.rsv2
            && !header.rsv3;
        let inflate = (starts || continues) && (self.role == Role::Server || header.mask.is_none());
        if is_data && !header.is_final {
            self.in_message = true;
        }
        if header.opcode == OpCode::Data(Data::Continue) && header.is_final {
            self.in_message = false;
        }
        let cur = Current { left: len, mask: header.mask, seen: 0, inflate, fin: header.is_final };
        if inflate {
            if len > self.max_frame {
                self.head.clear();
                self.fail(1009, "frame too big");
                return &[];
            }
            if starts {
                self.compressed = Some(header.opcode);
                self.message_len = 0;
                self.message_in = 0;
                self.ended = false;
                self.stream_ended = false;
                if !header.is_final {
                    // tungstenite learns at once that a message is open, so a data frame that
                    // does not continue it fails as on any connection.
                    self.emit_header(false, 0, sink);
                }
            }
        } else {
            sink.push(&self.head[..used]);
        }
        self.head.clear();
        self.frame = Some(cur);
        if len == 0 {
            self.end_frame(cur, sink);
        }
        rest
    }

    fn end_frame(&mut self, cur: Current, sink: &mut impl Sink) {
        self.frame = None;
        if cur.inflate && cur.fin && self.failed.is_none() {
            // The last chunk usually went with the tail and FIN (see `inflate_chunk`); not when
            // the final frame is empty. An empty payload is an empty message (the context is
            // left as it was).
            if !self.ended {
                if self.message_in > 0 {
                    self.inflate(&TAIL, true, sink);
                } else {
                    self.emit(&[], true, sink);
                }
            }
            self.compressed = None;
            self.in_message = false;
            if let Some(z) = self.zlib.take() {
                if self.recv_takeover && !self.stream_ended {
                    self.zlib = Some(z);
                } else {
                    give_decompressor(z);
                }
            }
        }
    }

    /// Inflates a chunk of a compressed frame's payload. The message's last chunk goes with the
    /// tail, and its last output with FIN (one frame for a message inflated in one call).
    fn inflate_chunk(&mut self, chunk: &[u8], cur: &mut Current, sink: &mut impl Sink) {
        if chunk.is_empty() {
            return;
        }
        self.message_in += chunk.len();
        if self.zlib.is_none() {
            self.zlib = Some(take_decompressor());
        }
        let last = cur.fin && chunk.len() as u64 == cur.left;
        if cur.mask.is_none() && !last {
            return self.inflate(chunk, false, sink);
        }
        let mut input = std::mem::take(&mut self.unmasked);
        input.clear();
        match cur.mask {
            Some(mask) => input.extend(chunk.iter().enumerate().map(|(i, b)| b ^ mask[(cur.seen + i) & 3])),
            None => input.extend_from_slice(chunk),
        }
        if last {
            input.extend_from_slice(&TAIL);
            self.ended = true;
        }
        self.inflate(&input, last, sink);
        self.unmasked = input;
    }

    /// Inflates compressed bytes of the open message and hands the output on as frames, bounded
    /// by the message limit; `fin`: this input ends the message.
    fn inflate(&mut self, mut input: &[u8], fin: bool, sink: &mut impl Sink) {
        if self.stream_ended {
            if fin {
                self.emit(&[], true, sink);
            }
            return;
        }
        INFLATED.with_borrow_mut(|buf| loop {
            let Some(z) = self.zlib.as_mut() else { return };
            // Room for one call, never much past the message limit (a bomb stops there).
            let room =
                self.max_message.saturating_add(1).saturating_sub(self.message_len).clamp(1, buf.len());
            let (before_in, before_out) = (z.total_in(), z.total_out());
            let status = z.decompress(input, &mut buf[..room], FlushDecompress::Sync);
            let produced = (z.total_out() - before_out) as usize;
            input = &input[(z.total_in() - before_in) as usize..];
            if self.message_len + produced > self.max_message {
                return self.fail(1009, "message too big");
            }
            let done = match status {
                Err(_) => return self.fail(1007, "invalid compressed data"),
                Ok(Status::StreamEnd) => {
                    self.stream_ended = true;
                    true
                }
                // Everything taken and room left over: zlib has nothing more to give.
                Ok(_) => input.is_empty() && produced < room,
            };
            self.emit(&buf[..produced], fin && done, sink);
            if done {
                return;
            }
        })
    }

    /// Hands inflated bytes on as frames within the frame limit, which tungstenite applies to
    /// them too (the message's first frame carries its opcode; nothing is sent for no bytes
    /// unless the message ends).
    fn emit(&mut self, data: &[u8], fin: bool, sink: &mut impl Sink) {
        if data.is_empty() && fin {
            self.emit_header(true, 0, sink);
        }
        let mut pieces = data.chunks(self.max_frame.max(1) as usize).peekable();
        while let Some(piece) = pieces.next() {
            self.emit_header(fin && pieces.peek().is_none(), piece.len(), sink);
            sink.push(piece);
        }
        self.message_len += data.len();
    }

    /// Hands on a frame header of the open message: its opcode on the first, then continuations.
    fn emit_header(&mut self, fin: bool, len: usize, sink: &mut impl Sink) {
        let continuation = OpCode::Data(Data::Continue);
        let opcode = self.compressed.replace(continuation).unwrap_or(continuation);
        sink.push(frame_header(fin, false, opcode, len).as_ref());
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        if let Some(z) = self.zlib.take() {
            if !self.recv_takeover {
                give_decompressor(z);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agreed(takeover: bool) -> Agreed {
        Agreed {
            level: 6,
            threshold: 0,
            send_window_bits: 15,
            send_takeover: takeover,
            recv_takeover: takeover,
        }
    }

    #[test]
    fn negotiation_server() {
        let cfg = DeflateConfig::default();
        // Chromium's offer.
        let (a, r) =
            negotiate(["permessage-deflate; client_max_window_bits"].into_iter(), &cfg, true).unwrap();
        assert_eq!(r, "permessage-deflate");
        assert!(a.send_takeover && a.recv_takeover && a.send_window_bits == 15);
        // A bounded window and no takeover asked for; out of contexts.
        let (a, r) = negotiate(
            ["x-foo, permessage-deflate; server_max_window_bits=10; server_no_context_takeover"].into_iter(),
            &cfg,
            true,
        )
        .unwrap();
        assert_eq!(r, "permessage-deflate; server_no_context_takeover; server_max_window_bits=10");
        assert!(!a.send_takeover && a.recv_takeover && a.send_window_bits == 10);
        let (a, r) = negotiate(["permessage-deflate"].into_iter(), &cfg, false).unwrap();
        assert_eq!(r, "permessage-deflate; server_no_context_takeover; client_no_context_takeover");
        assert!(!a.keeps_context());
        // Invalid offers are declined; the next acceptable one wins.
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; foo",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
        ] {
            assert!(negotiate([bad].into_iter(), &cfg, true).is_none(), "{bad}");
            let two = [bad, "permessage-deflate; server_max_window_bits=\"12\""];
            assert_eq!(negotiate(two.into_iter(), &cfg, true).unwrap().0.send_window_bits, 12, "{bad}");
        }
        assert!(negotiate(["x-webkit-deflate-frame"].into_iter(), &cfg, true).is_none());
    }

    #[test]
    fn negotiation_client() {
        let cfg = DeflateConfig { window_bits: 12, ..DeflateConfig::default() };
        assert_eq!(offer(&cfg), "permessage-deflate; client_max_window_bits");
        assert_eq!(accept_response(std::iter::empty(), &cfg), Ok(None));
        let a = accept_response(["permessage-deflate; client_max_window_bits=9"].into_iter(), &cfg)
            .unwrap()
            .unwrap();
        assert_eq!((a.send_window_bits, a.send_takeover, a.recv_takeover), (9, true, true));
        let a = accept_response(["permessage-deflate; server_no_context_takeover"].into_iter(), &cfg)
            .unwrap()
            .unwrap();
        assert_eq!((a.send_window_bits, a.send_takeover, a.recv_takeover), (12, true, false));
        for bad in
            ["permessage-deflate, permessage-deflate", "x-foo", "permessage-deflate; client_max_window_bits"]
        {
            assert!(accept_response([bad].into_iter(), &cfg).is_err(), "{bad}");
        }
        let no_takeover = DeflateConfig { context_takeover: false, ..cfg };
        assert!(accept_response(["permessage-deflate"].into_iter(), &no_takeover).is_err());
        let ok = ["permessage-deflate; server_no_context_takeover; client_no_context_takeover"];
        let a = accept_response(ok.into_iter(), &no_takeover).unwrap().unwrap();
        assert!(!a.keeps_context());
    }

    impl Sink for Vec<u8> {
        fn push(&mut self, data: &[u8]) {
            self.extend_from_slice(data);
        }
        fn full(&self) -> bool {
            false
        }
    }

    /// A client's frame: masked, RSV1 as given.
    fn frame(opcode: OpCode, fin: bool, rsv1: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let header = FrameHeader { is_final: fin, rsv1, opcode, mask: Some(mask), ..FrameHeader::default() };
        let mut out = Vec::new();
        header.format(payload.len() as u64, &mut out).unwrap();
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    /// The frames an inflater hands on: (fin, opcode, unmasked payload).
    fn frames(mut bytes: &[u8]) -> Vec<(bool, OpCode, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let mut c = Cursor::new(bytes);
            let (h, len) = FrameHeader::parse(&mut c).unwrap().unwrap();
            let start = c.position() as usize;
            let mut payload = bytes[start..start + len as usize].to_vec();
            if let Some(m) = h.mask {
                payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= m[i & 3]);
            }
            assert!(!h.rsv1);
            out.push((h.is_final, h.opcode, payload));
            bytes = &bytes[start + len as usize..];
        }
        out
    }

    fn joined(frames: &[(bool, OpCode, Vec<u8>)]) -> Vec<u8> {
        frames.iter().filter(|f| matches!(f.1, OpCode::Data(_))).flat_map(|f| f.2.clone()).collect()
    }

    const TEXT: OpCode = OpCode::Data(Data::Text);
    const CONT: OpCode = OpCode::Data(Data::Continue);
    const PING: OpCode = OpCode::Control(tungstenite::protocol::frame::coding::Control::Ping);

    #[test]
    fn round_trip_with_and_without_takeover_byte_by_byte() {
        for takeover in [true, false] {
            let mut d = Deflater::new(agreed(takeover));
            let mut inf = Inflater::new(Role::Server, &agreed(takeover), 1 << 20, 1 << 20);
            let msg = "hello hello hello hello, deflate".repeat(20);
            let mut sizes = Vec::new();
            for _ in 0..3 {
                let mut c = Vec::new();
                assert!(d.compress(msg.as_bytes(), &mut c));
                sizes.push(c.len());
                let wire = frame(TEXT, true, true, &c);
                let mut got = Vec::new();
                for b in &wire {
                    inf.push(std::slice::from_ref(b), &mut got);
                }
                let fs = frames(&got);
                assert_eq!(fs.first().unwrap().1, TEXT);
                assert!(fs.last().unwrap().0);
                assert_eq!(joined(&fs), msg.as_bytes());
                assert!(inf.head.is_empty() && inf.frame.is_none() && inf.compressed.is_none());
                assert!(inf.failed().is_none());
            }
            // With takeover the second copy refers back to the first.
            assert_eq!(sizes[1] < sizes[0], takeover, "{sizes:?}");
        }
    }

    #[test]
    fn fragments_with_a_ping_between_keep_their_order() {
        let mut d = Deflater::new(agreed(true));
        let mut c = Vec::new();
        assert!(d.compress(&[7u8; 5000], &mut c));
        let (a, b) = c.split_at(c.len() / 2);
        let mut wire = frame(OpCode::Data(Data::Binary), false, true, a);
        wire.extend(frame(PING, true, false, b"p"));
        wire.extend(frame(CONT, true, false, b));
        // A plain message after it passes through.
        wire.extend(frame(TEXT, true, false, b"plain"));
        let mut inf = Inflater::new(Role::Server, &agreed(true), 1 << 20, 1 << 20);
        let mut got = Vec::new();
        inf.push(&wire, &mut got);
        let fs = frames(&got);
        // The message's inflated frames (first Binary, then continuations) around the ping.
        let ping = fs.iter().position(|f| f.1 == PING).unwrap();
        let data: Vec<_> = fs[..fs.len() - 1].iter().filter(|f| f.1 != PING).collect();
        assert_eq!(data[0].1, OpCode::Data(Data::Binary));
        assert!(data[1..].iter().all(|f| f.1 == CONT));
        // The message ends after the ping.
        assert!(data.last().unwrap().0 && fs[ping + 1..].contains(data.last().unwrap()));
        assert_eq!(fs.last().unwrap(), &(true, TEXT, b"plain".to_vec()));
        assert_eq!(joined(&fs[..fs.len() - 1]), vec![7u8; 5000]);
    }

    #[test]
    fn a_compressed_message_may_end_with_an_empty_frame() {
        let mut d = Deflater::new(agreed(true));
        let mut c = Vec::new();
        assert!(d.compress(b"ends with an empty frame", &mut c));
        let mut wire = frame(TEXT, false, true, &c);
        wire.extend(frame(CONT, true, false, b""));
        let mut inf = Inflater::new(Role::Server, &agreed(true), 1 << 20, 1 << 20);
        let mut got = Vec::new();
        inf.push(&wire, &mut got);
        let fs = frames(&got);
        assert!(fs.last().unwrap().0, "{fs:?}");
        assert_eq!(joined(&fs), b"ends with an empty frame");
        // A message that arrives whole is handed on as one frame.
        assert!(d.compress(b"one frame, one frame", &mut c));
        let mut got = Vec::new();
        inf.push(&frame(TEXT, true, true, &c), &mut got);
        assert_eq!(frames(&got), [(true, TEXT, b"one frame, one frame".to_vec())]);
    }

    #[test]
    fn bombs_and_garbage_fail_the_connection() {
        // 16 MiB of zeros compresses to ~16 KiB; the limit is 1 MiB.
        let mut d = Deflater::new(agreed(false));
        let mut c = Vec::new();
        assert!(d.compress(&vec![0u8; 16 << 20], &mut c));
        assert!(c.len() < 64 << 10);
        let mut inf = Inflater::new(Role::Server, &agreed(false), 1 << 20, 1 << 20);
        let mut got = Vec::new();
        inf.push(&frame(TEXT, true, true, &c), &mut got);
        assert_eq!(inf.failed(), Some((1009, "message too big")));
        assert!(got.len() < (1 << 20) + 4096, "{}", got.len());
        // Not deflate data.
        let mut inf = Inflater::new(Role::Server, &agreed(false), 1 << 20, 1 << 20);
        inf.push(&frame(TEXT, true, true, &[0xff; 40]), &mut Vec::new());
        assert_eq!(inf.failed(), Some((1007, "invalid compressed data")));
        // A compressed frame over the frame limit, unmasked client frames.
        let mut inf = Inflater::new(Role::Server, &agreed(false), 100, 1 << 20);
        inf.push(&frame(TEXT, true, true, &[0; 200]), &mut Vec::new());
        assert_eq!(inf.failed(), Some((1009, "frame too big")));
        let mut inf = Inflater::new(Role::Server, &agreed(false), 100, 1 << 20);
        inf.push(&[0x81, 0x01, b'a'], &mut Vec::new());
        assert_eq!(inf.failed(), Some((1002, "unmasked frame from a client")));
    }

    #[test]
    fn rsv1_where_it_is_not_allowed_reaches_tungstenite() {
        // On a control frame and on a continuation: passed through with RSV1 for tungstenite
        // to fail with 1002.
        for wire in [frame(PING, true, true, b"x"), {
            let mut w = frame(TEXT, false, false, b"a");
            w.extend(frame(CONT, true, true, b"b"));
            w
        }] {
            let mut inf = Inflater::new(Role::Server, &agreed(true), 1 << 20, 1 << 20);
            let mut got = Vec::new();
            inf.push(&wire, &mut got);
            assert_eq!(got, wire);
        }
    }

    #[test]
    fn uncompressed_when_small_or_window_8() {
        let mut d = Deflater::new(Agreed { threshold: 100, ..agreed(true) });
        assert!(!d.compress(&[1; 99], &mut Vec::new()));
        let mut d = Deflater::new(Agreed { send_window_bits: 8, ..agreed(true) });
        assert!(!d.compress(&[1; 1000], &mut Vec::new()));
    }
}
