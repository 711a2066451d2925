//! One HTTP/1.1 server connection.
//!
//! Requests are read one at a time: a head (`httparse`), then its body by Content-Length or
//! chunked coding, into one [`Request`] that the layer above takes with
//! [`HttpServerConn::take_request`]. A connection made with
//! [`deliver_heads`](HttpServerConn::deliver_heads) hands a request over once its head is in
//! (and its body, when that came with it): the layer above then reads the body whole or piece by
//! piece ([`read_body`](HttpServerConn::read_body), [`take_body`](HttpServerConn::take_body)),
//! or answers without it (what is left of it is read and dropped). `100 Continue` goes out
//! when the body is first asked for. Until it answers with [`HttpServerConn::respond`], further
//! bytes (pipelined requests) stay buffered, up to the header limit, so answers leave in order
//! and a client that sends without reading meets TCP flow control, not our memory.
//!
//! What the peer gets wrong is answered here with the right status and `Connection: close`:
//! malformed heads (400), unsupported versions (505), too many or too large header fields (431),
//! long targets (414), bodies over the limit (413, before any of it is read), framing that could
//! smuggle a request (Content-Length beside Transfer-Encoding, conflicting or malformed lengths,
//! a final coding other than chunked, bad chunk lines: 400; codings we do not decode: 501), an
//! HTTP/1.1 request without exactly one Host (400), expectations other than `100-continue`
//! (417), and heads or bodies that arrive too slowly (408). Those answers carry no `Date` (this
//! layer has no clock); the ones the layer above makes do.

use std::io::Write;
use std::time::{Duration, Instant};

use super::framing::{self, Chunk, FrameError, Framing, TrailerLimits};
use crate::proto::stream::{Flow, StreamProtocol};

/// Limits and timeouts of a server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Largest request head (request line and header fields), and of chunked trailers → 431.
    pub max_header_size: usize,
    /// Most header fields in one head → 431.
    pub max_headers: usize,
    /// Longest request target → 414.
    pub max_uri: usize,
    /// Largest request body → 413.
    pub max_body_size: usize,
    /// From a head's first byte to its end → 408.
    pub head_timeout: Duration,
    /// Longest wait for the next byte of a body → 408.
    pub body_timeout: Duration,
    /// An idle keep-alive connection (no request started, nothing to send) closes after this.
    pub idle_timeout: Duration,
    /// A peer that takes none of our queued answer for this long is cut off.
    pub send_timeout: Duration,
    /// Reading pauses while more than this waits to be sent.
    pub max_outgoing: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_header_size: 16 << 10,
            max_headers: 100,
            max_uri: 8 << 10,
            max_body_size: 10 << 20,
            head_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            send_timeout: Duration::from_secs(60),
            max_outgoing: 1 << 20,
        }
    }
}

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target as sent.
    pub target: String,
    /// The target's path (`*` for `OPTIONS *`; the path of an absolute-form target), not decoded.
    pub path: String,
    /// What follows the `?`, not decoded (`""` without one).
    pub query: String,
    /// The `x` of `HTTP/1.x`.
    pub minor_version: u8,
    /// Header fields in order, names in lower case, values as sent (invalid UTF-8 replaced).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Counts the connection's requests from 1: what [`HttpServerConn::read_body`] and
    /// [`HttpServerConn::take_body`] are asked about.
    pub number: u64,
}

impl Request {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A response from the layer above.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    pub status: u16,
    /// Header fields as given; `Content-Length` and `Transfer-Encoding` are ours to set and are
    /// left out (except a `Content-Length` answering HEAD without a body: the size a GET would
    /// get), `Connection: close` closes the connection after this response.
    pub headers: &'a [(&'a [u8], &'a [u8])],
    pub body: &'a [u8],
    /// The `Date` value (unless `headers` has one).
    pub date: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request head.
    Head,
    /// Reading a body before the request is handed over.
    Body,
    /// A request is with the layer above (its body may still be coming).
    Handling,
    /// The answer went out before the body: the rest of it is read and dropped.
    Discard,
    /// A refusal was queued: what the client still sends is read and dropped until it closes or
    /// a while after the refusal went out, so our close does not reset the connection (and
    /// destroy the refusal) while the client is still sending.
    Linger,
    /// Nothing more is read (closing, or an error answered).
    Done,
}

/// The body of the request being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BodyIn {
    framing: Framing,
    mode: Mode,
    /// Body bytes read so far, and the most allowed (→ 413).
    got: u64,
    limit: u64,
    /// `Expect: 100-continue` was asked and `100 Continue` has not gone out.
    continue_owed: bool,
    /// All of it was read.
    done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not asked for yet: it stays in the input (and the socket).
    Hold,
    /// Read whole, then taken at once.
    Whole,
    /// Taken in pieces; reading pauses while [`STREAM_HOLD`] bytes wait to be taken.
    Stream,
    /// Read and dropped.
    Discard,
}

/// What [`HttpServerConn::take_body`] has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRead {
    /// Nothing yet: ask again after the next news.
    Waiting,
    /// Body bytes, and whether they are the last.
    Data(Vec<u8>, bool),
    /// The body cannot be read: `too_large` (refused with 413), `timeout` (408), `malformed`
    /// (400), `client_closed`, `answered` (the answer went out first).
    Failed(&'static str),
}

/// How the rest of a streamed answer's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outgoing {
    /// This many bytes still to come (the head said `Content-Length`).
    Length(u64),
    Chunked,
    /// Until the connection closes (HTTP/1.0 without a length).
    UntilClose,
}

/// How long a connection lingers after a refusal went out (nginx: `lingering_timeout` 5 s).
const LINGER: Duration = Duration::from_secs(2);

/// Header fields parsed without a heap allocation.
const STACK_HEADERS: usize = 100;

/// Body bytes read ahead of a layer above that takes them piece by piece.
const STREAM_HOLD: usize = 64 << 10;

/// One HTTP/1.1 server connection. See the module documentation.
#[derive(Debug)]
pub struct HttpServerConn {
    limits: HttpLimits,
    phase: Phase,
    /// Received bytes; those before `start` are consumed.
    input: Vec<u8>,
    start: usize,
    out: Vec<u8>,
    out_pos: usize,
    /// The request whose body is read before it is handed over.
    reading: Option<Request>,
    /// The body of the current request, while there is one to read.
    body: Option<BodyIn>,
    /// Body bytes read and not taken yet.
    collected: Vec<u8>,
    /// Why the body of the request being handled cannot be read.
    body_failed: Option<&'static str>,
    /// Requests are handed over once their head is in.
    early: bool,
    /// The number of the last request read, and of the last one whose answer started.
    number: u64,
    answered: u64,
    /// The request waiting for [`take_request`](Self::take_request).
    ready: Option<Request>,
    keep_alive: bool,
    head_request: bool,
    /// The `x` of the current request's `HTTP/1.x`.
    minor_version: u8,
    /// When the peer last took some of our output (or an answer was queued).
    sent: Instant,
    /// When the current wait began: connection start or last response (idle), a head's first
    /// byte, a body's last byte.
    since: Instant,
    head_started: bool,
    eof: bool,
    flow: Flow,
    closed: bool,
    news: bool,
    /// The time of the last call from the driver (for work a write makes possible).
    now: Instant,
    /// Why the connection ends, once it does (see [`close_reason`](Self::close_reason)).
    why: Option<&'static str>,
    /// The framing of a streamed answer's body still to come.
    streaming: Option<Outgoing>,
    /// The head of the request being answered, as sent, when it asks for a WebSocket upgrade.
    upgrade: Option<Vec<u8>>,
}

impl HttpServerConn {
    pub fn new(limits: HttpLimits, now: Instant) -> Self {
        Self {
            limits,
            phase: Phase::Head,
            input: Vec::new(),
            start: 0,
            out: Vec::new(),
            out_pos: 0,
            reading: None,
            body: None,
            collected: Vec::new(),
            body_failed: None,
            early: false,
            number: 0,
            answered: 0,
            ready: None,
            keep_alive: true,
            head_request: false,
            minor_version: 1,
            sent: now,
            since: now,
            head_started: false,
            eof: false,
            flow: Flow::Open,
            closed: false,
            news: false,
            now,
            why: None,
            streaming: None,
            upgrade: None,
        }
    }

    /// Requests are handed over once their head is in; their bodies are read when asked for
    /// ([`read_body`](Self::read_body)), with the limit given then instead of
    /// [`HttpLimits::max_body_size`].
    pub fn deliver_heads(mut self) -> Self {
        self.early = true;
        self
    }

    /// Whether the body of the request being handled is still to be asked for (with
    /// [`read_body`](Self::read_body)).
    pub fn body_pending(&self) -> bool {
        self.body.is_some_and(|b| b.mode == Mode::Hold)
    }

    /// Starts reading the body of request `number` (being handled, not answered yet), at most
    /// `limit` bytes of it (a Content-Length above that is refused with 413 at once): whole
    /// (`stream` false: it is taken at once when complete) or piece by piece. Sends
    /// `100 Continue` if it was asked for.
    pub fn read_body(&mut self, now: Instant, number: u64, limit: u64, stream: bool) {
        if number != self.number || self.answered == number {
            return;
        }
        let Some(body) = self.body.as_mut().filter(|b| b.mode == Mode::Hold) else { return };
        if matches!(body.framing, Framing::Length(n) if n > limit) {
            return self.reject(413, now);
        }
        body.mode = if stream { Mode::Stream } else { Mode::Whole };
        body.limit = limit;
        if std::mem::take(&mut body.continue_owed) {
            self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            self.news = true;
        }
        self.since = now;
        self.advance(now);
    }

    /// What there is of the body of request `number` asked for with
    /// [`read_body`](Self::read_body): a body read whole comes once complete, a streamed one in
    /// the pieces read so far. A request without (more) body gives `Data([], true)`; one whose
    /// answer started (or a request before it), `Failed("answered")`.
    pub fn take_body(&mut self, number: u64) -> BodyRead {
        if number != self.number {
            return BodyRead::Failed("answered");
        }
        if let Some(why) = self.body_failed {
            return BodyRead::Failed(why);
        }
        if self.answered == number {
            return BodyRead::Failed("answered");
        }
        let Some(body) = self.body else { return BodyRead::Data(Vec::new(), true) };
        let ready = match body.mode {
            Mode::Hold => false,
            Mode::Whole => body.done,
            Mode::Stream => body.done || !self.collected.is_empty(),
            Mode::Discard => unreachable!("a body is dropped only once its answer started"),
        };
        if !ready {
            return BodyRead::Waiting;
        }
        let data = std::mem::take(&mut self.collected);
        if body.done {
            self.body = None;
        } else {
            // Room again for what waits in the input.
            let now = self.now;
            self.advance(now);
        }
        BodyRead::Data(data, body.done)
    }

    /// Whether a complete request waits for [`take_request`](Self::take_request).
    pub fn has_request(&self) -> bool {
        self.ready.is_some()
    }

    /// The complete request waiting for an answer, once.
    pub fn take_request(&mut self) -> Option<Request> {
        self.ready.take()
    }

    /// Whether a request was taken and not answered yet.
    pub fn awaits_response(&self) -> bool {
        self.phase == Phase::Handling && self.ready.is_none() && self.streaming.is_none()
    }

    /// The transport is gone (closed, or failed).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Answers the request taken with [`take_request`](Self::take_request), then goes on with
    /// the next one (perhaps already buffered). An invalid header field or status is an error
    /// and nothing is sent (answer again, e.g. with a 500).
    pub fn respond(&mut self, now: Instant, response: Response) -> Result<(), String> {
        let given = response.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(b"content-length"));
        let length = match given {
            // The size a GET would get, for a HEAD answered without the body.
            Some((_, v)) if self.head_request && response.body.is_empty() && framing::is_length(v) => {
                std::str::from_utf8(v).ok().and_then(|v| v.parse().ok())
            }
            _ => None,
        };
        if self.head(now, &response, Some(length.unwrap_or(response.body.len() as u64)))? {
            self.out.extend_from_slice(response.body);
        }
        self.response_sent(now);
        Ok(())
    }

    /// Answers with a head now and a body that follows in [`send_body`](Self::send_body) calls
    /// (`response.body` is not used): `length` bytes of it, or without a length chunked (on
    /// HTTP/1.0: until the connection closes), ended by [`end_body`](Self::end_body). Errors as
    /// [`respond`](Self::respond).
    pub fn respond_streamed(
        &mut self,
        now: Instant,
        response: Response,
        length: Option<u64>,
    ) -> Result<(), String> {
        let body = self.head(now, &response, length)?;
        self.news = true;
        self.sent = now;
        // A body dropped for this answer is read (and dropped) while the answer goes out.
        self.advance(now);
        self.streaming = match (body, length) {
            (false, _) | (true, Some(0)) => None,
            (true, Some(n)) => Some(Outgoing::Length(n)),
            (true, None) if self.minor_version == 1 => Some(Outgoing::Chunked),
            (true, None) => Some(Outgoing::UntilClose),
        };
        if self.streaming.is_none() {
            self.response_sent(now);
        }
        Ok(())
    }

    /// More of a streamed body. Bytes past its length are dropped; once all of it came the
    /// answer is complete.
    pub fn send_body(&mut self, now: Instant, data: &[u8]) {
        match self.streaming {
            Some(Outgoing::Length(left)) => {
                let n = data.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                self.out.extend_from_slice(&data[..n]);
                let left = left - n as u64;
                self.streaming = Some(Outgoing::Length(left));
                if left == 0 {
                    self.streaming = None;
                    self.response_sent(now);
                }
            }
            Some(Outgoing::Chunked) if !data.is_empty() => {
                let _ = write!(self.out, "{:x}\r\n", data.len());
                self.out.extend_from_slice(data);
                self.out.extend_from_slice(b"\r\n");
            }
            Some(Outgoing::UntilClose) => self.out.extend_from_slice(data),
            _ => {}
        }
    }

    /// Ends a streamed body. One shorter than the length its head announced cannot be ended
    /// well: the connection is cut, so the client sees a truncated answer, not a wrong one.
    pub fn end_body(&mut self, now: Instant) {
        match self.streaming.take() {
            Some(Outgoing::Chunked) => {
                self.out.extend_from_slice(b"0\r\n\r\n");
                self.response_sent(now);
            }
            Some(Outgoing::UntilClose) => self.response_sent(now),
            Some(Outgoing::Length(_)) => self.abort(),
            None => {}
        }
    }

    /// Cuts the connection at once, dropping what is queued (an answer that cannot be
    /// completed: the client must not take a part for the whole).
    pub fn abort(&mut self) {
        self.why.get_or_insert("socket_error");
        self.streaming = None;
        self.phase = Phase::Done;
        self.flow = Flow::Abort;
    }

    /// Whether the request being answered asks for a WebSocket upgrade (`Upgrade: websocket`,
    /// no body).
    pub fn wants_upgrade(&self) -> bool {
        self.upgrade.is_some() && self.awaits_response()
    }

    /// Gives up the connection to a WebSocket session: the upgrade request's head as sent and
    /// whatever came after it, and whether the peer finished sending; nothing more happens here
    /// (left in place, the connection would close). `None` unless
    /// [`wants_upgrade`](Self::wants_upgrade).
    pub fn take_upgrade(&mut self) -> Option<(Vec<u8>, bool)> {
        if !self.wants_upgrade() {
            return None;
        }
        let mut bytes = self.upgrade.take()?;
        bytes.extend_from_slice(self.pending());
        self.input = Vec::new();
        self.start = 0;
        self.end("upgraded");
        Some((bytes, self.eof))
    }

    /// Bytes of our answers waiting for the peer to take them.
    pub fn queued(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Whether a streamed body is being sent.
    pub fn is_streaming(&self) -> bool {
        self.streaming.is_some()
    }

    /// Whether a streamed body should get more now: less than the outgoing limit waits to be
    /// sent.
    pub fn wants_body(&self) -> bool {
        self.streaming.is_some() && self.flow == Flow::Open && self.queued() < self.limits.max_outgoing
    }

    /// Writes the head of the answer to the request taken, for a body of `length` bytes
    /// (`None`: chunked, or on HTTP/1.0 until the connection closes); returns whether a body
    /// follows (not for HEAD, 204, 304).
    fn head(&mut self, now: Instant, response: &Response, length: Option<u64>) -> Result<bool, String> {
        if !self.awaits_response() {
            return Err("no request is waiting for a response".into());
        }
        if !(200..=599).contains(&response.status) {
            return Err(format!("status must be 200-599, got {}", response.status));
        }
        let (mut date, mut said_close, mut said_keep_alive) = (true, false, false);
        for (name, value) in response.headers {
            if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
                return Err(format!("invalid header name '{}'", String::from_utf8_lossy(name)));
            }
            if value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                return Err(format!(
                    "the value of header '{}' contains CR, LF or NUL",
                    String::from_utf8_lossy(name)
                ));
            }
            let connection = name.eq_ignore_ascii_case(b"connection");
            said_keep_alive |= connection && has_token(value, "keep-alive");
            said_close |= connection && has_token(value, "close");
            date &= !name.eq_ignore_ascii_case(b"date");
        }
        self.upgrade = None;
        self.answered = self.number;
        self.drop_body(now);
        let status = response.status;
        let body_allowed = status != 204 && status != 304;
        let until_close = body_allowed && length.is_none() && self.minor_version == 0;
        self.keep_alive &= !said_close && !until_close;
        let out = &mut self.out;
        // Writing into a Vec cannot fail.
        let _ = write!(out, "HTTP/1.1 {status} {}\r\n", super::reason(status));
        if date {
            push_field(out, b"date", response.date.as_bytes());
        }
        for (name, value) in response.headers {
            if !name.eq_ignore_ascii_case(b"content-length")
                && !name.eq_ignore_ascii_case(b"transfer-encoding")
            {
                push_field(out, name, value);
            }
        }
        match length {
            _ if !body_allowed => {}
            Some(n) => push_field(out, b"content-length", n.to_string().as_bytes()),
            None if self.minor_version == 1 => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            None => {}
        }
        if !self.keep_alive && !said_close {
            out.extend_from_slice(b"connection: close\r\n");
        } else if self.keep_alive && self.minor_version == 0 && !said_keep_alive {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        Ok(body_allowed && !self.head_request)
    }

    /// An answer goes out before the body was read: the rest of it is read and dropped; one
    /// larger than its limit, or one the client holds back for a `100 Continue`, is not waited
    /// for (the connection closes after the answer).
    fn drop_body(&mut self, now: Instant) {
        self.collected = Vec::new();
        let Some(body) = self.body.as_mut() else { return };
        let too_large = matches!(body.framing, Framing::Length(n) if n > body.limit - body.got);
        if body.done || body.continue_owed || too_large {
            self.keep_alive &= body.done;
            self.body = None;
        } else {
            body.mode = Mode::Discard;
            // Timed from now: the wait before was the layer above's.
            self.since = now;
        }
    }

    /// The answer is complete: the next request may come (or the connection closes).
    fn response_sent(&mut self, now: Instant) {
        self.news = true;
        self.sent = now;
        if self.keep_alive {
            self.next_head(now);
            if self.body.is_some() {
                self.phase = Phase::Discard;
            }
            self.advance(now);
        } else {
            self.end("response_sent");
        }
    }

    /// Waits for the next request's head (idle until its first byte).
    fn next_head(&mut self, now: Instant) {
        self.phase = Phase::Head;
        self.head_started = false;
        self.since = now;
    }

    /// The next response says `Connection: close` and the connection closes after it.
    pub fn close_after_response(&mut self) {
        self.keep_alive = false;
    }

    /// Stops reading and closes once the queued bytes are out (the server stops).
    pub fn finish(&mut self) {
        self.end("server_stopped");
    }

    /// Why the connection ends or ended: `client_closed` (the peer closed, or went away),
    /// `response_sent` (an answer said `Connection: close`), `timeout` (idle, slow head or body,
    /// a reader that stalled), `parse_error` (a request we refused), `socket_error`,
    /// `server_stopped`, `upgraded` (handed to a WebSocket session).
    pub fn close_reason(&self) -> &'static str {
        self.why.unwrap_or("client_closed")
    }

    /// Stops reading and closes once the queued bytes are out, for reason `why` (the first one
    /// given counts).
    fn end(&mut self, why: &'static str) {
        self.why.get_or_insert(why);
        self.phase = Phase::Done;
        self.ready = None;
        if self.flow == Flow::Open {
            self.flow = Flow::Finish;
        }
    }

    fn pending(&self) -> &[u8] {
        &self.input[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.input.len() {
            self.input.clear();
            self.start = 0;
        }
    }

    /// Parses what the input holds as far as it goes.
    fn advance(&mut self, now: Instant) {
        self.now = now;
        loop {
            match self.phase {
                // The next request waits while the answers before it are not out: a client
                // that pipelines without reading holds one answer's worth of our memory.
                Phase::Head if self.out.len() - self.out_pos > self.limits.max_outgoing => return,
                Phase::Head => {
                    // Empty lines before a request (after a body, say) are no request yet.
                    let blank = self.pending().iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
                    self.consume(blank);
                    if self.pending().is_empty() {
                        if self.eof {
                            self.end("client_closed");
                        }
                        return;
                    }
                    if !self.head_started {
                        self.head_started = true;
                        self.since = now;
                    }
                    match self.parse_head() {
                        Ok(Some(())) => {}
                        Ok(None) if self.eof => return self.end("client_closed"),
                        Ok(None) => return,
                        Err(status) => return self.reject(status, now),
                    }
                }
                Phase::Body => match self.pump_body(now) {
                    Ok(true) => self.complete(),
                    Ok(false) if self.eof => return self.end("client_closed"),
                    Ok(false) => return,
                    Err(status) => return self.reject(status, now),
                },
                Phase::Discard => match self.pump_body(now) {
                    Ok(true) => {
                        self.body = None;
                        self.next_head(now);
                    }
                    Ok(false) if self.eof => return self.end("client_closed"),
                    Ok(false) => return,
                    Err(_) => return self.end("parse_error"),
                },
                Phase::Handling => return self.read_alongside(now),
                Phase::Linger | Phase::Done => return,
            }
        }
    }

    /// One head: `Ok(None)` while incomplete, `Err(status)` for a head to refuse.
    fn parse_head(&mut self) -> Result<Option<()>, u16> {
        let limits = self.limits;
        // On the stack for the usual limit (a head is parsed again each time more of it came).
        let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
        let mut heap = Vec::new();
        let fields = if limits.max_headers <= STACK_HEADERS {
            &mut stack[..limits.max_headers]
        } else {
            heap.resize(limits.max_headers, httparse::EMPTY_HEADER);
            &mut heap[..]
        };
        let mut parsed = httparse::Request::new(fields);
        let buf = &self.input[self.start..];
        let n = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                let line_done = buf.contains(&b'\n');
                return match () {
                    _ if !line_done && buf.len() > limits.max_uri + 32 => Err(414),
                    _ if buf.len() > limits.max_header_size => Err(431),
                    _ => Ok(None),
                };
            }
            Err(httparse::Error::TooManyHeaders) => return Err(431),
            Err(httparse::Error::Version) => return Err(505),
            Err(_) => return Err(400),
        };
        if n > limits.max_header_size {
            return Err(431);
        }
        let method = parsed.method.unwrap_or_default().to_owned();
        let target = parsed.path.unwrap_or_default().to_owned();
        if target.len() > limits.max_uri {
            return Err(414);
        }
        let minor_version = parsed.version.unwrap_or(1);
        let headers: Vec<(String, String)> = parsed
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
            .collect();
        let upgrade = parsed
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade") && has_token(h.value, "websocket"));
        self.upgrade = upgrade.then(|| buf[..n].to_vec());
        let (path, query, authority) = split_target(&target).ok_or(400u16)?;
        self.number += 1;
        let number = self.number;
        let mut request =
            Request { method, target, path, query, minor_version, headers, body: Vec::new(), number };
        if let Some(authority) = authority {
            // RFC 9112 §3.2.2: an absolute-form target's authority is the host.
            for (_, value) in request.headers.iter_mut().filter(|(n, _)| n == "host") {
                value.clone_from(&authority);
            }
        }
        self.minor_version = minor_version;
        self.consume(n);
        let framing = self.framing(&request)?;
        if framing != Framing::Length(0) {
            self.upgrade = None;
        }
        let limit = limits.max_body_size as u64;
        let connection =
            |token| request.headers.iter().any(|(n, v)| n == "connection" && has_token(v.as_bytes(), token));
        self.keep_alive = !connection("close") && (minor_version == 1 || connection("keep-alive"));
        self.head_request = request.method == "HEAD";
        let expects = match request.header("expect") {
            Some(e) if !e.trim().eq_ignore_ascii_case("100-continue") => return Err(417),
            Some(_) => minor_version == 1,
            None => false,
        };
        // A body that came with its head is read at once, early or not.
        let here = matches!(framing, Framing::Length(n) if n <= limit && n <= self.pending().len() as u64);
        let continue_owed = expects && !here;
        let mut body =
            BodyIn { framing, mode: Mode::Whole, got: 0, limit, continue_owed: false, done: false };
        self.body_failed = None;
        if self.early && !here {
            body.mode = Mode::Hold;
            body.continue_owed = continue_owed;
            self.body = Some(body);
            self.ready = Some(request);
            self.phase = Phase::Handling;
            self.news = true;
            return Ok(Some(()));
        }
        if matches!(framing, Framing::Length(n) if n > limit) {
            return Err(413);
        }
        if continue_owed {
            self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            self.news = true;
        }
        self.body = Some(body);
        self.reading = Some(request);
        self.phase = Phase::Body;
        Ok(Some(()))
    }

    /// How the body of `request` is delimited (RFC 9112 §6.3), or the status refusing it.
    fn framing(&self, request: &Request) -> Result<Framing, u16> {
        let hosts = request.headers.iter().filter(|(n, _)| n == "host").count();
        if (request.minor_version == 1 && hosts != 1) || hosts > 1 {
            return Err(400);
        }
        let values = |name: &'static str| {
            request.headers.iter().filter(move |(n, _)| n == name).map(|(_, v)| v.as_str())
        };
        let length = framing::content_length(values("content-length")).map_err(|_| 400u16)?;
        let codings = framing::transfer_codings(values("transfer-encoding"));
        if !codings.is_empty() {
            if length.is_some()
                || request.minor_version == 0
                || codings.last().map(String::as_str) != Some("chunked")
            {
                return Err(400);
            }
            if codings.len() > 1 {
                return Err(501);
            }
            return Ok(Framing::Chunked(Chunk::Size));
        }
        Ok(Framing::Length(length.unwrap_or(0)))
    }

    /// Reads the body of the request being handled as far as the input goes, when it was asked
    /// for (or is being dropped).
    fn read_alongside(&mut self, now: Instant) {
        let Some(body) = self.body.filter(|b| b.mode != Mode::Hold && !b.done) else { return };
        let before = self.collected.len();
        match self.pump_body(now) {
            Ok(true) if body.mode == Mode::Discard => self.body = None,
            Ok(true) => {
                if let Some(b) = self.body.as_mut() {
                    b.done = true;
                }
                self.news = true;
            }
            // At the end of the input, unless reading paused with the read-ahead full.
            Ok(false) if self.eof && body.mode != Mode::Discard && !self.body_held() => {
                self.fail_body("client_closed")
            }
            Ok(false) => self.news |= self.collected.len() > before,
            Err(status) if self.awaits_response() => self.reject(status, now),
            Err(status) => {
                self.fail_body(failure(status));
                self.abort();
            }
        }
    }

    fn fail_body(&mut self, why: &'static str) {
        self.body_failed.get_or_insert(why);
        self.body = None;
        self.collected = Vec::new();
        self.news = true;
    }

    /// Moves body bytes out of the input (into `collected`, unless they are dropped):
    /// `Ok(true)` once the body is complete.
    fn pump_body(&mut self, now: Instant) -> Result<bool, u16> {
        let Some(mut body) = self.body else { return Ok(true) };
        let before = self.pending().len();
        let result = self.pump_body_bytes(&mut body);
        self.body = Some(body);
        if self.pending().len() != before {
            self.since = now;
        }
        result
    }

    fn pump_body_bytes(&mut self, body: &mut BodyIn) -> Result<bool, u16> {
        let room = match body.mode {
            Mode::Stream => STREAM_HOLD.saturating_sub(self.collected.len()),
            _ => usize::MAX,
        };
        let out = (body.mode != Mode::Discard).then_some(&mut self.collected);
        let trailers = TrailerLimits { fields: self.limits.max_headers, bytes: self.limits.max_header_size };
        // `got` is within the limit, so this cannot underflow.
        let decoded = body
            .framing
            .decode(&self.input[self.start..], room, body.limit - body.got, trailers, out)
            .map_err(|e| match e {
                FrameError::Malformed => 400u16,
                FrameError::TooLarge => 413,
                FrameError::TrailersTooLarge => 431,
            })?;
        self.consume(decoded.consumed);
        body.got += decoded.data;
        Ok(decoded.done)
    }

    fn complete(&mut self) {
        self.body = None;
        self.ready = self.reading.take().map(|r| Request { body: std::mem::take(&mut self.collected), ..r });
        self.phase = Phase::Handling;
        self.news = true;
    }

    /// Answers a request we refuse, then lingers and closes.
    fn reject(&mut self, status: u16, now: Instant) {
        let text = format!("{status} {}\n", super::reason(status));
        self.out.extend_from_slice(
            format!(
                "HTTP/1.1 {status} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                super::reason(status),
                text.len()
            )
            .as_bytes(),
        );
        if self.phase == Phase::Handling {
            self.body_failed.get_or_insert(failure(status));
        }
        self.reading = None;
        self.ready = None;
        self.body = None;
        self.collected = Vec::new();
        self.input = Vec::new();
        self.start = 0;
        self.news = true;
        self.why.get_or_insert(if status == 408 { "timeout" } else { "parse_error" });
        self.sent = now;
        self.phase = Phase::Linger;
    }

    /// Whether some of our output waits for the peer to take it.
    fn sending(&self) -> bool {
        self.out_pos < self.out.len()
    }

    fn deadline(&self) -> Option<Instant> {
        match self.phase {
            // While an answer goes out, its reader is timed, not the next request.
            Phase::Head if self.sending() => Some(self.sent + self.limits.send_timeout),
            Phase::Head if self.head_started => Some(self.since + self.limits.head_timeout),
            Phase::Head => Some(self.since + self.limits.idle_timeout),
            Phase::Body | Phase::Discard => Some(self.since + self.limits.body_timeout),
            Phase::Handling => {
                // An answer going out (streamed, or one before a pipelined request now
                // handled), and a body being read that the peer stops sending.
                let sending = self.sending().then(|| self.sent + self.limits.send_timeout);
                let reading = self.body_stalls().then(|| self.since + self.limits.body_timeout);
                sending.into_iter().chain(reading).min()
            }
            Phase::Linger if self.sending() => Some(self.sent + self.limits.send_timeout),
            Phase::Linger => Some(self.sent + LINGER),
            Phase::Done => None,
        }
    }

    /// Whether the body being read alongside a handler waits for the peer (not for the layer
    /// above to ask for it, or to take what was read).
    fn body_stalls(&self) -> bool {
        self.body.is_some_and(|b| b.mode != Mode::Hold && !b.done) && !self.body_held()
    }

    /// Whether reading the body paused with the read-ahead full.
    fn body_held(&self) -> bool {
        self.body.is_some_and(|b| b.mode == Mode::Stream) && self.collected.len() >= STREAM_HOLD
    }
}

impl StreamProtocol for HttpServerConn {
    fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
        if matches!(self.phase, Phase::Done | Phase::Linger) {
            return;
        }
        if self.start > 0 && self.start >= self.input.len() / 2 {
            self.input.drain(..self.start);
            self.start = 0;
        }
        self.input.extend_from_slice(data);
        self.advance(now);
    }

    fn handle_eof(&mut self, now: Instant) {
        self.eof = true;
        if self.phase == Phase::Linger {
            // The refusal still goes out; then the connection closes.
            return self.end(self.close_reason());
        }
        // A request being answered is still answered; otherwise an unfinished one is dropped.
        self.advance(now);
    }

    fn handle_error(&mut self, _now: Instant, _error: &str) {
        self.why.get_or_insert("socket_error");
        self.closed = true;
        self.news = true;
        self.phase = Phase::Done;
    }

    fn handle_closed(&mut self, _now: Instant) {
        self.closed = true;
        self.news = true;
    }

    fn handle_timeout(&mut self, now: Instant) {
        if self.deadline().is_none_or(|at| now < at) {
            return;
        }
        let reader_stalled = self.sending() && now >= self.sent + self.limits.send_timeout;
        match self.phase {
            Phase::Head | Phase::Handling | Phase::Linger if reader_stalled => {
                self.why.get_or_insert("timeout");
                self.phase = Phase::Done;
                self.flow = Flow::Abort;
            }
            Phase::Head if !self.head_started => self.end("timeout"),
            Phase::Head | Phase::Body => self.reject(408, now),
            Phase::Handling if self.awaits_response() => self.reject(408, now),
            // The body stopped while an answer goes out: the answer still does, then the
            // connection closes.
            Phase::Handling => {
                self.fail_body("timeout");
                self.keep_alive = false;
                self.why.get_or_insert("timeout");
            }
            Phase::Discard => self.end("timeout"),
            Phase::Linger => self.end(self.close_reason()),
            Phase::Done => {}
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.deadline()
    }

    fn wants_input(&self) -> bool {
        self.flow == Flow::Open
            && self.phase != Phase::Done
            && self.input.len() - self.start <= self.limits.max_header_size
            && self.out.len() - self.out_pos <= self.limits.max_outgoing
    }

    fn outgoing(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    fn consume_outgoing(&mut self, now: Instant, n: usize) {
        self.now = now;
        self.out_pos = (self.out_pos + n).min(self.out.len());
        if n > 0 {
            self.sent = self.now;
        }
        if n > 0 && self.out_pos == self.out.len() {
            self.out_pos = 0;
            self.out.clear();
            if self.out.capacity() > 64 << 10 {
                self.out = Vec::new();
            }
            if self.phase == Phase::Head && !self.head_started {
                // The idle wait for the next request starts once the answer is out.
                self.since = now;
            }
        }
        // What waited behind the answer: the next request, or the end of the stream.
        if self.phase == Phase::Head && (!self.pending().is_empty() || self.eof) {
            self.advance(now);
        }
    }

    fn flow(&self) -> Flow {
        self.flow
    }

    fn take_news(&mut self) -> bool {
        std::mem::take(&mut self.news)
    }
}

/// The path and query of a request target (origin, absolute or asterisk form; RFC 9112 §3.2),
/// as sent (not normalised), and an absolute-form target's authority.
fn split_target(target: &str) -> Option<(String, String, Option<String>)> {
    let split = |t: &str| match t.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (t.to_owned(), String::new()),
    };
    if target.starts_with('/') {
        let (path, query) = split(target);
        return Some((path, query, None));
    }
    if target == "*" {
        return Some(("*".into(), String::new(), None));
    }
    let scheme = target.find("://")?;
    if !matches!(target[..scheme].to_ascii_lowercase().as_str(), "http" | "https") {
        return None;
    }
    let rest = &target[scheme + 3..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let (path, query) = match &rest[end..] {
        "" => ("/".to_owned(), String::new()),
        r if r.starts_with('?') => ("/".to_owned(), r[1..].to_owned()),
        r => split(r),
    };
    Some((path, query, Some(authority.to_owned())))
}

/// What a body refused with `status` fails with (see [`BodyRead::Failed`]).
fn failure(status: u16) -> &'static str {
    match status {
        413 => "too_large",
        408 => "timeout",
        _ => "malformed",
    }
}

/// Whether comma-separated `value` has `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Appends the header field `name: value`.
fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    for part in [name, b": ", value, b"\r\n"] {
        out.extend_from_slice(part);
    }
}

/// A token character of RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
