//! A WebSocket connection (after the upgrade) over an in-memory [`Pipe`], sans-IO.
//!
//! The driver feeds received bytes with [`WsConn::handle_bytes`], drains
//! [`WsConn::poll_event`] until `None`, and writes [`WsConn::outgoing`] to the transport
//! (then [`WsConn::consume_outgoing`]). Pongs, close replies and failure close frames
//! (1002/1007/1009) are produced automatically and appear in the outgoing bytes.
//!
//! Framing, masking rules, UTF-8 validation, fragment reassembly with interleaved control
//! frames and close-code validation are tungstenite's (`WebSocket::from_raw_socket` over the
//! pipe), configured for many connections: a 4 KiB read buffer, bounded frame and message
//! sizes, no write batching (frames go straight to the pipe, so pre-encoded frames keep their
//! order), and unmasked client frames refused.

use super::deflate::{Agreed, ContextTicket, Deflater, Inflater, Sink};
use super::pipe::Pipe;
use super::Error;
use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::{CloseFrame, Frame, FrameHeader};
use tungstenite::protocol::{Role as WsRole, WebSocket, WebSocketConfig};
use tungstenite::{Bytes, Message};

/// Which end of the connection we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We accepted the connection: our frames are unmasked, the peer's must be masked.
    Server,
    /// We connected: our frames are masked, the peer's must not be.
    Client,
}

/// Message opcodes (the only ones a message can have).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// UTF-8 text (opcode 1).
    Text,
    /// Binary data (opcode 2).
    Binary,
}

impl Opcode {
    /// The wire value (1 or 2).
    pub fn as_u8(self) -> u8 {
        match self {
            Opcode::Text => 1,
            Opcode::Binary => 2,
        }
    }

    /// From the wire value; only 1 and 2 are message opcodes.
    pub fn from_u8(op: u8) -> Result<Opcode, Error> {
        match op {
            1 => Ok(Opcode::Text),
            2 => Ok(Opcode::Binary),
            other => Err(Error::InvalidOpcode(other)),
        }
    }

    fn data(self) -> OpCode {
        OpCode::Data(match self {
            Opcode::Text => Data::Text,
            Opcode::Binary => Data::Binary,
        })
    }
}

/// What a connection reports to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEvent {
    /// A complete (reassembled, for text UTF-8 checked) message.
    Message {
        /// Text or binary.
        opcode: Opcode,
        /// The payload.
        data: Bytes,
    },
    /// The connection is over; no further events follow. Flush the outgoing bytes, then
    /// close the transport.
    Closed {
        /// Close code: the peer's (1005 if its close frame had none), 1006 when the transport
        /// ended without a closing handshake, or the code we failed the connection with
        /// (1002 protocol error, 1007 invalid UTF-8, 1009 too big).
        code: u16,
        /// Close reason from the peer, or a description of the failure.
        reason: String,
        /// `true` when a close frame was received (closing handshake), `false` otherwise.
        clean: bool,
    },
}

/// Per-connection limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsConfig {
    /// tungstenite's read buffer (allocated eagerly; the bulk of an idle connection's heap).
    pub read_buffer_size: usize,
    /// Largest accepted message (after reassembly); larger → close 1009.
    pub max_message_size: usize,
    /// Largest accepted frame payload; larger → close 1009. tungstenite reserves a frame's
    /// declared length when its header arrives; that is address space, not memory, until the
    /// payload does.
    pub max_frame_size: usize,
    /// Bound on queued outgoing bytes: `send` refuses with [`Error::Backpressure`] when a
    /// message would take the queue past it (a message is always accepted into an empty
    /// queue). Input processing pauses while the queue is over twice this bound.
    pub max_outgoing_buffer: usize,
    /// Bound on received-but-unprocessed bytes; [`WsConn::wants_input`] turns false above it.
    pub max_incoming_buffer: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            read_buffer_size: 1024,
            max_message_size: 16 << 20,
            max_frame_size: 16 << 20,
            max_outgoing_buffer: 1 << 20,
            max_incoming_buffer: 64 << 10,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// We sent a close frame and wait for the peer's.
    Closing,
    Closed,
}

/// A frame payload over this makes the reader's buffer be given back as soon as possible.
const REFRESH_NOW_ABOVE: u64 = 16 * 1024;

/// Largest frame header (2 + 8 length bytes + 4 mask bytes).
pub(super) const MAX_HEADER: usize = 14;

/// An encoded, unmasked frame header.
pub(super) struct Header {
    buf: [u8; MAX_HEADER],
    len: usize,
}

impl AsRef<[u8]> for Header {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The header of an unmasked frame of `len` payload bytes.
pub(super) fn frame_header(is_final: bool, rsv1: bool, opcode: OpCode, len: usize) -> Header {
    let header = FrameHeader { is_final, rsv1, opcode, ..FrameHeader::default() };
    let mut buf = [0u8; MAX_HEADER];
    let mut w = &mut buf[..];
    // The largest header fits.
    let _ = header.format(len as u64, &mut w);
    let len = MAX_HEADER - w.len();
    Header { buf, len }
}

/// What tungstenite reads, as an inflater's [`Sink`]: full at the input bound.
struct Feed<'a> {
    pipe: &'a mut Pipe,
    limit: usize,
}

impl Sink for Feed<'_> {
    fn push(&mut self, data: &[u8]) {
        self.pipe.push_incoming(data);
    }
    fn full(&self) -> bool {
        self.pipe.incoming_len() >= self.limit
    }
}

/// permessage-deflate state of a connection that negotiated it.
#[derive(Debug)]
struct Deflate {
    inflater: Inflater,
    deflater: Deflater,
    /// The transport ended after what the inflater still queues.
    eof: bool,
    /// This connection's share of its server's bound on contexts.
    _context: Option<ContextTicket>,
}

thread_local! {
    /// The compressed form of the message being sent (one per thread, so a connection keeps
    /// no buffer for it).
    static COMPRESSED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`COMPRESSED`] is given back when a message grew it past this.
const KEEP_COMPRESSED: usize = 1 << 20;

/// Close codes an endpoint may put on the wire (RFC 6455 §7.4).
pub fn is_sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Encode one unmasked, final frame (what a server sends) into `out`.
pub fn encode_frame_into(opcode: Opcode, data: &[u8], out: &mut Vec<u8>) {
    out.reserve(data.len() + 10);
    out.extend_from_slice(frame_header(true, false, opcode.data(), data.len()).as_ref());
    out.extend_from_slice(data);
}

/// Encode one unmasked, final frame once, for [`WsConn::send_encoded`] on many server
/// connections (broadcast). Text must be UTF-8.
pub fn encode_frame(opcode: Opcode, data: &[u8]) -> Result<Vec<u8>, Error> {
    if opcode == Opcode::Text && std::str::from_utf8(data).is_err() {
        return Err(Error::InvalidUtf8);
    }
    let mut out = Vec::with_capacity(data.len() + 10);
    encode_frame_into(opcode, data, &mut out);
    Ok(out)
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A WebSocket connection. See the module documentation.
#[derive(Debug)]
pub struct WsConn {
    ws: WebSocket<Pipe>,
    role: Role,
    config: WsConfig,
    state: State,
    pending: Option<WsEvent>,
    activity: bool,
    /// The last read found nothing more to parse and no byte (nor the end of the stream) came
    /// since, so reading again would find nothing either (a message is read in one call, then
    /// the session asks again twice: after pumping it and once its inbox is empty).
    starved: bool,
    deflate: Option<Box<Deflate>>,
}

impl WsConn {
    /// A connection whose upgrade just completed; `leftover` are the bytes received after the
    /// upgrade head (they belong to the WebSocket stream). `deflate`: what the upgrade agreed
    /// on for permessage-deflate, if it did.
    pub fn new(role: Role, config: WsConfig, leftover: &[u8], deflate: Option<Agreed>) -> Self {
        let deflate = deflate.map(|agreed| {
            Box::new(Deflate {
                inflater: Inflater::new(role, &agreed, config.max_frame_size, config.max_message_size),
                deflater: Deflater::new(agreed),
                eof: false,
                _context: None,
            })
        });
        let mut conn = WsConn {
            ws: Self::make_ws(role, &config, Pipe::new(), deflate.is_some()),
            role,
            config,
            state: State::Open,
            pending: None,
            activity: false,
            starved: false,
            deflate,
        };
        conn.handle_bytes(leftover);
        conn
    }

    /// `inflating`: frames reach tungstenite through an [`Inflater`], which hands inflated
    /// frames on unmasked and checks the peer's masking itself.
    fn make_ws(role: Role, config: &WsConfig, pipe: Pipe, inflating: bool) -> WebSocket<Pipe> {
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(config.read_buffer_size.max(256))
            .write_buffer_size(0)
            .max_write_buffer_size(usize::MAX)
            .max_message_size(Some(config.max_message_size))
            .max_frame_size(Some(config.max_frame_size))
            .accept_unmasked_frames(inflating && role == Role::Server);
        let ws_role = match role {
            Role::Server => WsRole::Server,
            Role::Client => WsRole::Client,
        };
        WebSocket::from_raw_socket(pipe, ws_role, Some(ws_config))
    }

    /// Whether the reader holds no partial state: it just reported `WouldBlock`, every byte it
    /// got formed complete frames of complete messages, nothing is pending to send and the
    /// connection is open. Its state then equals a fresh one's.
    fn reader_is_quiet(&self) -> bool {
        self.state == State::Open && self.ws.can_write() && self.ws.get_ref().at_quiet_boundary()
    }

    /// A fresh reader (small buffers) in place of the current one; only when quiet.
    fn refresh_reader(&mut self) {
        let mut fresh = Self::make_ws(self.role, &self.config, Pipe::new(), self.deflate.is_some());
        std::mem::swap(fresh.get_mut(), self.ws.get_mut());
        self.ws = fresh;
        self.ws.get_mut().reset_largest_frame();
    }

    /// tungstenite's read buffer grows to the largest frame (it reserves the whole payload)
    /// and never shrinks. After a frame over [`REFRESH_NOW_ABOVE`] the reader is replaced as
    /// soon as it is quiet; smaller frames grow it less, which [`trim`](Self::trim) undoes once
    /// the connection idles (so a stream of mid-sized messages does not reallocate per message).
    fn maybe_refresh_reader(&mut self) {
        if self.ws.get_ref().largest_frame() > REFRESH_NOW_ABOVE && self.reader_is_quiet() {
            self.refresh_reader();
        }
    }

    /// Whether a frame since the reader was made may have grown its buffer.
    fn reader_grew(&self) -> bool {
        self.ws.get_ref().largest_frame() > self.config.read_buffer_size as u64 / 2
    }

    /// Whether buffers grew past an idle connection's size ([`trim`](Self::trim) would help).
    pub fn has_spare_buffers(&self) -> bool {
        let deflate = self.deflate.as_ref().is_some_and(|d| d.inflater.has_spare_buffers());
        self.ws.get_ref().heap_capacity() > super::pipe::TRIM_KEEP || self.reader_grew() || deflate
    }

    /// Counts this connection against its server's bound on compression contexts for as long
    /// as it lives.
    pub fn keep_context(&mut self, ticket: ContextTicket) {
        if let Some(d) = &mut self.deflate {
            d._context = Some(ticket);
        }
    }

    /// Gives back buffers kept for traffic (for a connection gone idle): a fresh reader and
    /// small pipe buffers. Does nothing in the middle of a message, nor while tungstenite may
    /// hold frames it read but did not parse yet (only a read that found nothing, with nothing
    /// received since, says its buffer is empty).
    pub fn trim(&mut self) {
        if !self.starved || !self.reader_is_quiet() {
            return;
        }
        if self.reader_grew() {
            self.refresh_reader();
        }
        self.ws.get_mut().trim();
        if let Some(d) = &mut self.deflate {
            d.inflater.trim();
        }
    }

    /// Our role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The limits in force.
    pub fn config(&self) -> &WsConfig {
        &self.config
    }

    /// Feed bytes received from the transport (ignored once closed).
    pub fn handle_bytes(&mut self, data: &[u8]) {
        if self.state == State::Closed || data.is_empty() {
            return;
        }
        self.activity = true;
        self.starved = false;
        let limit = self.config.max_incoming_buffer;
        match &mut self.deflate {
            Some(d) => d.inflater.push(data, &mut Feed { pipe: self.ws.get_mut(), limit }),
            None => self.ws.get_mut().push_incoming(data),
        }
    }

    /// The transport reached end of stream (after the buffered bytes are processed, an
    /// unclosed connection reports `Closed { code: 1006, clean: false }`).
    pub fn handle_eof(&mut self) {
        self.starved = false;
        match &mut self.deflate {
            // The pipe ends once the inflater handed on what it queues.
            Some(d) if d.inflater.queued() > 0 => d.eof = true,
            _ => self.ws.get_mut().set_eof(),
        }
    }

    /// Whether the driver should read more from the transport: not closed and fewer than
    /// `max_incoming_buffer` unprocessed bytes buffered.
    pub fn wants_input(&self) -> bool {
        let queued = self.deflate.as_ref().map_or(0, |d| d.inflater.queued());
        self.state != State::Closed
            && self.ws.get_ref().incoming_len() + queued < self.config.max_incoming_buffer
    }

    /// `true` if bytes were received since the last call (for keep-alive: the driver owns
    /// the clock and decides when to ping and when the peer is dead).
    pub fn take_activity(&mut self) -> bool {
        std::mem::take(&mut self.activity)
    }

    /// Process buffered input and return the next event, or `None` when more input is needed
    /// (or the connection is closed and its `Closed` event was already returned).
    pub fn poll_event(&mut self) -> Option<WsEvent> {
        if let Some(ev) = self.pending.take() {
            return Some(ev);
        }
        if self.state == State::Closed || self.starved {
            return None;
        }
        loop {
            if self.ws.get_ref().outgoing_len() > self.config.max_outgoing_buffer.saturating_mul(2) {
                // The peer is not reading what we (or our pongs) send: stop consuming input
                // until the driver has flushed.
                return None;
            }
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    return Some(WsEvent::Message { opcode: Opcode::Text, data: t.into() })
                }
                Ok(Message::Binary(b)) => return Some(WsEvent::Message { opcode: Opcode::Binary, data: b }),
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => continue,
                Ok(Message::Close(frame)) => {
                    // Push the close reply (if any) into the pipe now.
                    let _ = self.ws.flush();
                    self.state = State::Closed;
                    let (code, reason) = match frame {
                        Some(f) if is_sendable_close_code(u16::from(f.code)) => {
                            (u16::from(f.code), f.reason.as_str().to_string())
                        }
                        // tungstenite answers invalid codes with 1002 while open; in reply
                        // to our close it passes them through, so report them the same way.
                        Some(f) => (1002, format!("peer sent invalid close code {}", f.code)),
                        None => (1005, String::new()),
                    };
                    return Some(WsEvent::Closed { code, reason, clean: true });
                }
                Err(WsError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.resume_inflating() {
                        continue;
                    }
                    if let Some(failed) = self.fail_if_inflater_failed() {
                        return Some(failed);
                    }
                    self.starved = true;
                    self.maybe_refresh_reader();
                    return None;
                }
                // What the inflater refused came first (the peer may have left after it).
                Err(e) => return Some(self.fail_if_inflater_failed().unwrap_or_else(|| self.fail(e))),
            }
        }
    }

    /// Fails the connection with the inflater's code, if it refused the peer's input.
    fn fail_if_inflater_failed(&mut self) -> Option<WsEvent> {
        let (code, reason) = self.deflate.as_ref().and_then(|d| d.inflater.failed())?;
        Some(self.fail_with(code, reason, reason.to_string()))
    }

    /// tungstenite read everything it had: the inflater goes on with what it queued (and the
    /// pipe ends if the transport did). Returns whether there is more to read.
    fn resume_inflating(&mut self) -> bool {
        let limit = self.config.max_incoming_buffer;
        let Some(d) = &mut self.deflate else { return false };
        if d.inflater.queued() == 0 {
            return false;
        }
        let pipe = self.ws.get_mut();
        d.inflater.resume(&mut Feed { pipe, limit });
        if d.inflater.queued() == 0 && std::mem::take(&mut d.eof) {
            pipe.set_eof();
        }
        true
    }

    /// Turn a tungstenite error into the final event, sending a close frame when the peer
    /// is still there.
    fn fail(&mut self, e: WsError) -> WsEvent {
        let (code, wire_reason) = match &e {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => (1009, "message too big"),
            WsError::Capacity(_) => (1009, "too big"),
            WsError::Utf8(_) => (1007, "invalid UTF-8"),
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)
            | WsError::ConnectionClosed
            | WsError::AlreadyClosed
            | WsError::Io(_) => (1006, ""),
            WsError::Protocol(_) => (1002, "protocol error"),
            _ => (1011, "internal error"),
        };
        let reason = match code {
            1006 => "connection closed without a close frame".to_string(),
            _ => e.to_string(),
        };
        self.fail_with(code, wire_reason, reason)
    }

    /// Fail the connection with `code` (a close frame with `wire_reason` when the peer is
    /// still there; not for 1006).
    fn fail_with(&mut self, code: u16, wire_reason: &str, reason: String) -> WsEvent {
        if code != 1006 && self.state == State::Open {
            let frame = CloseFrame { code: code.into(), reason: wire_reason.into() };
            let _ = self.ws.close(Some(frame));
        }
        self.state = State::Closed;
        WsEvent::Closed { code, reason, clean: false }
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.state != State::Open || !self.ws.can_write() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    fn check_room(&self, len: usize) -> Result<(), Error> {
        let queued = self.ws.get_ref().outgoing_len();
        let limit = self.config.max_outgoing_buffer;
        if queued > 0 && queued.saturating_add(len) > limit {
            return Err(Error::Backpressure { queued, limit });
        }
        Ok(())
    }

    /// Queue one message. Fails without queuing anything when the connection is closing
    /// ([`Error::Closed`]), text is not UTF-8 ([`Error::InvalidUtf8`]) or the outgoing queue
    /// is full ([`Error::Backpressure`]).
    pub fn send(&mut self, opcode: Opcode, data: &[u8]) -> Result<(), Error> {
        self.check_open()?;
        if opcode == Opcode::Text && std::str::from_utf8(data).is_err() {
            return Err(Error::InvalidUtf8);
        }
        self.check_room(data.len() + MAX_HEADER)?;
        if self.deflate.is_none() {
            return self.send_frame(opcode, false, data);
        }
        COMPRESSED.with_borrow_mut(|buf| {
            let compressed = self.deflate.as_mut().is_some_and(|d| d.deflater.compress(data, buf));
            let result = self.send_frame(opcode, compressed, if compressed { buf } else { data });
            if buf.capacity() > KEEP_COMPRESSED {
                *buf = Vec::new();
            }
            result
        })
    }

    /// Queues one final frame (RSV1 says whether `payload` is compressed).
    fn send_frame(&mut self, opcode: Opcode, rsv1: bool, payload: &[u8]) -> Result<(), Error> {
        match self.role {
            Role::Server => {
                // Our frames are unmasked: encode straight into the pipe (one copy). The
                // tungstenite write buffer is always empty here (write_buffer_size 0), so
                // frame order is preserved.
                let header = frame_header(true, rsv1, opcode.data(), payload.len());
                self.ws.get_mut().push_outgoing_all(&[header.as_ref(), payload]);
                Ok(())
            }
            Role::Client => {
                let mut frame = Frame::message(Bytes::copy_from_slice(payload), opcode.data(), true);
                frame.header_mut().rsv1 = rsv1;
                self.write_message(Message::Frame(frame))
            }
        }
    }

    fn write_message(&mut self, msg: Message) -> Result<(), Error> {
        match self.ws.write(msg).and_then(|_| self.ws.flush()) {
            Ok(()) => Ok(()),
            Err(_) => {
                // Only reachable if tungstenite considers the connection finished.
                Err(Error::Closed)
            }
        }
    }

    /// Queue a frame produced by [`encode_frame`] (server connections only; the same bytes
    /// can go to many connections). Same checks as [`send`](Self::send) except UTF-8.
    pub fn send_encoded(&mut self, frame: &[u8]) -> Result<(), Error> {
        if self.role != Role::Server {
            return Err(Error::WrongRole("pre-encoded frames are unmasked and may only be sent by a server"));
        }
        self.check_open()?;
        self.check_room(frame.len())?;
        self.ws.get_mut().push_outgoing(frame);
        Ok(())
    }

    /// Queue a ping (payload at most 125 bytes), e.g. for keep-alive. The peer's pong counts
    /// as activity (see [`take_activity`](Self::take_activity)).
    pub fn ping(&mut self, payload: &[u8]) -> Result<(), Error> {
        if payload.len() > 125 {
            return Err(Error::ControlFrameTooLong(payload.len()));
        }
        self.check_open()?;
        self.write_message(Message::Ping(Bytes::copy_from_slice(payload)))
    }

    /// Start the closing handshake with `code` (1000–1003, 1007–1014, 3000–4999) and `reason`
    /// (cut to 123 bytes at a character boundary). Messages that arrive before the peer's
    /// close frame are still delivered; the peer's reply ends in `Closed { clean: true }`.
    /// Does nothing if already closing or closed.
    pub fn close(&mut self, code: u16, reason: &str) -> Result<(), Error> {
        if !is_sendable_close_code(code) {
            return Err(Error::InvalidCloseCode(code));
        }
        if self.state != State::Open {
            return Ok(());
        }
        let reason = truncate_utf8(reason, 123);
        let frame = CloseFrame { code: code.into(), reason: reason.into() };
        let _ = self.ws.close(Some(frame));
        self.state = State::Closing;
        self.starved = false;
        Ok(())
    }

    /// Give up on the connection now (e.g. the close handshake timed out, the transport
    /// failed): the next [`poll_event`](Self::poll_event) returns `Closed { code: 1006,
    /// reason, clean: false }` unless the connection was already closed.
    pub fn abort(&mut self, reason: &str) {
        if self.state != State::Closed {
            self.state = State::Closed;
            self.pending = Some(WsEvent::Closed { code: 1006, reason: reason.to_string(), clean: false });
        }
    }

    /// `true` once the connection is over (its `Closed` event is returned or pending).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// `true` after [`close`](Self::close) until the peer answers.
    pub fn is_closing(&self) -> bool {
        self.state == State::Closing
    }

    /// `true` while messages can be sent.
    pub fn can_send(&self) -> bool {
        self.check_open().is_ok()
    }

    /// Bytes waiting to be written to the transport.
    pub fn outgoing(&self) -> &[u8] {
        self.ws.get_ref().outgoing()
    }

    /// Number of bytes waiting to be written.
    pub fn outgoing_len(&self) -> usize {
        self.ws.get_ref().outgoing_len()
    }

    /// Whether bytes are waiting to be written.
    pub fn wants_write(&self) -> bool {
        self.outgoing_len() > 0
    }

    /// Mark `n` bytes of [`outgoing`](Self::outgoing) as written.
    pub fn consume_outgoing(&mut self, n: usize) {
        self.ws.get_mut().consume_outgoing(n);
    }

    /// Move all waiting outgoing bytes to the end of `out`.
    pub fn take_outgoing(&mut self, out: &mut Vec<u8>) {
        self.ws.get_mut().take_outgoing(out);
    }

    /// Received bytes not yet processed.
    pub fn incoming_len(&self) -> usize {
        self.ws.get_ref().incoming_len()
    }
}
