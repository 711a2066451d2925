//! One HTTP/1.1 client connection as a [`StreamProtocol`]: it sends a request the layer above
//! built (head, then the body whole or piece by piece), reads the response head with
//! `httparse` (1xx skipped), frames the body ([`super::framing`]), decodes gzip, deflate or
//! brotli when asked ([`super::decode`]), and says whether the connection can carry the next request. Bodies are taken
//! piece by piece; reading pauses while [`HOLD`] bytes wait to be taken. Timeouts: a stall
//! (no byte either way), a deadline for the whole exchange, and an idle connection's life.

use std::time::{Duration, Instant};

use super::decode::{Decoder, OVERSHOOT};
use super::framing::{self, Framing, TrailerLimits};
use crate::proto::stream::{Flow, StreamProtocol};

/// Decoded body bytes read ahead of the layer above.
pub const HOLD: usize = 256 << 10;

/// The most bytes one [`HttpClientConn::take_body`] hands over: the read-ahead and one decoding
/// step past it, twice (what was held, then what the input read ahead gives).
pub const MAX_TAKE: usize = 2 * (HOLD + OVERSHOOT);

/// How long a proxy may take to answer `CONNECT`.
const TUNNEL_TIMEOUT: Duration = Duration::from_secs(30);

/// 1xx heads accepted before the final one (a server sending them forever is cut).
const MAX_INFORMATIONAL: u32 = 16;

/// Limits on what a server may send.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    pub max_header_size: usize,
    pub max_headers: usize,
    /// How long an idle connection is kept for the next request.
    pub idle_timeout: Duration,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits { max_header_size: 64 << 10, max_headers: 128, idle_timeout: Duration::from_secs(60) }
    }
}

/// How the request body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    /// All of it is in [`Exchange::body`] (possibly empty).
    Whole,
    /// More comes through [`HttpClientConn::send_body`]; chunked coding when true (the head says
    /// `Transfer-Encoding: chunked`), otherwise the head gave its length.
    Streamed { chunked: bool },
}

/// One request and how to read its response.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// Request line and header fields, through the empty line.
    pub head: Vec<u8>,
    pub body: Vec<u8>,
    pub upload: Upload,
    /// A HEAD request: the response has no body whatever its head says.
    pub head_request: bool,
    /// Decode `Content-Encoding: gzip` / `deflate`.
    pub decompress: bool,
    /// The most body bytes (after decoding) accepted.
    pub max_body: Option<u64>,
    /// No byte either way for this long fails the exchange.
    pub stall: Duration,
    /// The exchange fails at this time.
    pub deadline: Option<Instant>,
}

/// A response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    pub minor_version: u8,
    /// Names lower-case, in order, repeated ones kept.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl ResponseHead {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers.iter().filter(move |(n, _)| n == name).filter_map(|(_, v)| std::str::from_utf8(v).ok())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A `CONNECT` went to a proxy; its answer is awaited.
    Tunnel,
    /// No exchange: the connection waits for the next request.
    Idle,
    /// Waiting for the response head.
    Head,
    Body,
    /// The response is complete.
    Done,
    /// Nothing more will work on this connection.
    Failed,
}

pub struct HttpClientConn {
    limits: ClientLimits,
    phase: Phase,
    exchange: Option<Exchange>,
    input: Vec<u8>,
    out: Vec<u8>,
    /// The request (head and body) is all queued.
    sent: bool,
    head: Option<ResponseHead>,
    /// `head` was taken by the layer above.
    head_taken: bool,
    framing: Framing,
    inflate: Option<Decoder>,
    /// Compressed bytes framed but not decoded yet (decoding pauses with the read-ahead full).
    compressed: Vec<u8>,
    /// Decoded body bytes not taken yet, and how many there were in all.
    body: Vec<u8>,
    received: u64,
    keep_alive: bool,
    failure: Option<String>,
    /// Last byte either way (stall clock), or when the connection went idle.
    since: Instant,
    first_byte: Option<Instant>,
    /// Bytes of this exchange's response seen (a reused connection that closed before any is
    /// one the server dropped while idle: the request can go again on a new one).
    response_bytes: usize,
    exchanges: u32,
    /// The peer closed or reset the connection (not a timeout of ours).
    dropped: bool,
    /// 1xx heads skipped in this exchange.
    informational: u32,
    /// The proxy answered the `CONNECT` with 2xx.
    tunnel_up: bool,
    ready: bool,
    closed: bool,
    idle_expired: bool,
    news: bool,
}

impl HttpClientConn {
    pub fn new(limits: ClientLimits, now: Instant) -> Self {
        HttpClientConn {
            limits,
            phase: Phase::Idle,
            exchange: None,
            input: Vec::new(),
            out: Vec::new(),
            sent: false,
            head: None,
            head_taken: false,
            framing: Framing::Length(0),
            inflate: None,
            compressed: Vec::new(),
            body: Vec::new(),
            received: 0,
            keep_alive: false,
            failure: None,
            since: now,
            first_byte: None,
            response_bytes: 0,
            exchanges: 0,
            dropped: false,
            informational: 0,
            tunnel_up: false,
            ready: false,
            closed: false,
            idle_expired: false,
            news: false,
        }
    }

    /// Connected (and past the TLS handshake).
    pub fn is_ready(&self) -> bool {
        self.ready && self.phase != Phase::Tunnel
    }

    /// Asks the proxy this connection goes to for a tunnel (`CONNECT` head): once it agreed
    /// ([`tunnel_opened`](Self::tunnel_opened)), the layer above starts TLS on the stream and the
    /// connection is ready again when that is done.
    pub fn tunnel(&mut self, now: Instant, connect_head: &[u8]) {
        self.out.extend_from_slice(connect_head);
        self.phase = Phase::Tunnel;
        self.since = now;
    }

    /// The proxy agreed to the tunnel (once): what it sent after its answer is returned, for
    /// the TLS layer.
    pub fn tunnel_opened(&mut self) -> Option<Vec<u8>> {
        if self.phase != Phase::Tunnel || !self.tunnel_up {
            return None;
        }
        self.phase = Phase::Idle;
        self.ready = false;
        Some(std::mem::take(&mut self.input))
    }

    /// Idle, open, and able to take a request.
    pub fn is_reusable(&self) -> bool {
        self.phase == Phase::Idle && !self.closed && !self.idle_expired && self.failure.is_none()
    }

    /// Sends `exchange`'s request. The connection must be idle ([`is_reusable`](Self::is_reusable)
    /// or new).
    pub fn start(&mut self, now: Instant, exchange: Exchange) {
        debug_assert_eq!(self.phase, Phase::Idle);
        self.out.extend_from_slice(&exchange.head);
        self.out.extend_from_slice(&exchange.body);
        self.sent = exchange.upload == Upload::Whole;
        self.exchange = Some(exchange);
        self.phase = Phase::Head;
        self.head = None;
        self.head_taken = false;
        self.body.clear();
        self.received = 0;
        self.first_byte = None;
        self.response_bytes = 0;
        self.informational = 0;
        self.exchanges += 1;
        self.since = now;
        // Bytes that came while idle were not an answer to this request.
        self.process();
    }

    /// The next piece of a streamed request body.
    pub fn send_body(&mut self, data: &[u8]) {
        if self.sent || data.is_empty() || self.exchange.is_none() || self.phase == Phase::Failed {
            return;
        }
        if let Some(Exchange { upload: Upload::Streamed { chunked: true }, .. }) = &self.exchange {
            self.out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            self.out.extend_from_slice(data);
            self.out.extend_from_slice(b"\r\n");
        } else {
            self.out.extend_from_slice(data);
        }
    }

    /// The streamed request body is complete.
    pub fn end_body(&mut self) {
        if self.sent || self.exchange.is_none() {
            return;
        }
        if let Some(Exchange { upload: Upload::Streamed { chunked: true }, .. }) = &self.exchange {
            self.out.extend_from_slice(b"0\r\n\r\n");
        }
        self.sent = true;
    }

    /// Request bytes not written yet.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// The response head, once (when it came).
    pub fn take_head(&mut self) -> Option<ResponseHead> {
        let head = self.head.take()?;
        self.head_taken = true;
        Some(head)
    }

    /// The response head came (taken or not).
    fn has_head(&self) -> bool {
        self.head.is_some() || self.head_taken
    }

    /// Decoded body bytes that came, and whether the body is complete.
    pub fn take_body(&mut self) -> (Vec<u8>, bool) {
        let mut data = std::mem::take(&mut self.body);
        // Input read ahead while the body was full goes along.
        if self.phase == Phase::Body && (!self.input.is_empty() || self.decoding()) {
            self.received += data.len() as u64;
            self.process();
            let more = std::mem::take(&mut self.body);
            self.received += more.len() as u64;
            data.extend_from_slice(&more);
        } else {
            self.received += data.len() as u64;
        }
        (data, self.phase == Phase::Done)
    }

    /// Why the exchange (and the connection) failed.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// The connection was reused and closed before a byte of the response: the server dropped
    /// it while idle, so the request can be sent again on a new connection.
    pub fn lost_idle(&self) -> bool {
        self.dropped && self.exchanges > 1 && self.response_bytes == 0 && !self.has_head()
    }

    pub fn first_byte(&self) -> Option<Instant> {
        self.first_byte
    }

    /// The exchange is over (complete or failed): the next one may start once the layer above
    /// took the body, after [`recycle`](Self::recycle).
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed)
    }

    /// After a complete exchange: idle again if the connection can be kept, otherwise it
    /// finishes. True when kept.
    pub fn recycle(&mut self, now: Instant) -> bool {
        if self.phase != Phase::Done {
            return false;
        }
        self.exchange = None;
        self.inflate = None;
        self.compressed.clear();
        self.head = None;
        if self.keep_alive && self.sent && self.out.is_empty() && !self.closed {
            self.phase = Phase::Idle;
            self.since = now;
            // A server that sends before being asked (or closed meanwhile) is not reusable.
            self.process();
            self.is_reusable()
        } else {
            self.phase = Phase::Failed;
            false
        }
    }

    /// Gives up the exchange (the layer above cancelled it): the connection closes.
    pub fn abort(&mut self) {
        self.fail("cancelled");
    }

    fn fail(&mut self, why: impl Into<String>) {
        if self.phase != Phase::Done {
            self.failure.get_or_insert_with(|| why.into());
            self.phase = Phase::Failed;
            // A failed body is not handed over (past its limit, or cut).
            self.body = Vec::new();
        }
        self.news = true;
    }

    fn process(&mut self) {
        loop {
            match self.phase {
                Phase::Tunnel => {
                    if !self.tunnel_up && !self.input.is_empty() {
                        self.parse_tunnel();
                    }
                    return;
                }
                Phase::Idle => {
                    if !self.input.is_empty() {
                        self.fail("the server sent data without a request");
                    }
                    return;
                }
                Phase::Head => {
                    if self.input.is_empty() || !self.parse_head() {
                        if self.closed && self.phase == Phase::Head {
                            self.fail("the server closed the connection before the response head");
                        }
                        return;
                    }
                }
                Phase::Body => {
                    self.read_body();
                    self.settle_eof();
                    return;
                }
                Phase::Done | Phase::Failed => return,
            }
        }
    }

    /// The proxy's answer to `CONNECT`.
    fn parse_tunnel(&mut self) {
        let mut fields = vec![httparse::EMPTY_HEADER; self.limits.max_headers];
        let mut response = httparse::Response::new(&mut fields);
        match response.parse(&self.input) {
            Ok(httparse::Status::Complete(n)) => {
                let status = response.code.unwrap_or(0);
                if (200..300).contains(&status) {
                    self.input.drain(..n);
                    self.tunnel_up = true;
                    self.news = true;
                } else {
                    let reason = response.reason.unwrap_or("").to_owned();
                    self.fail(format!("the proxy refused the tunnel: {status} {reason}"));
                }
            }
            Ok(httparse::Status::Partial) if self.input.len() <= self.limits.max_header_size => {}
            _ => self.fail("malformed answer from the proxy to CONNECT"),
        }
    }

    /// Parses a head from the input; true when one was taken (a 1xx is skipped).
    fn parse_head(&mut self) -> bool {
        let mut fields = vec![httparse::EMPTY_HEADER; self.limits.max_headers];
        let mut response = httparse::Response::new(&mut fields);
        let n = match response.parse(&self.input) {
            Ok(httparse::Status::Complete(n)) if n <= self.limits.max_header_size => n,
            Ok(httparse::Status::Partial) if self.input.len() <= self.limits.max_header_size => return false,
            Ok(_) | Err(httparse::Error::TooManyHeaders) => {
                self.fail("the response head is too large");
                return false;
            }
            Err(e) => {
                self.fail(format!("malformed response head ({e})"));
                return false;
            }
        };
        let status = response.code.unwrap_or(0);
        let head = ResponseHead {
            status,
            reason: response.reason.unwrap_or("").to_owned(),
            minor_version: response.version.unwrap_or(1),
            headers: response
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect(),
        };
        self.input.drain(..n);
        if status == 101 {
            self.fail("the server switched protocols (101), which this request did not ask for");
            return false;
        }
        if (100..200).contains(&status) {
            self.informational += 1;
            if self.informational > MAX_INFORMATIONAL {
                self.fail("the server sent too many 1xx responses");
                return false;
            }
            return true;
        }
        let Some(exchange) = self.exchange.as_ref() else { return false };
        let codings = framing::transfer_codings(head.values("transfer-encoding"));
        let length = framing::content_length(head.values("content-length"));
        self.framing = if exchange.head_request || status == 204 || status == 304 {
            Framing::Length(0)
        } else if !codings.is_empty() {
            if codings.last().map(String::as_str) == Some("chunked") {
                Framing::Chunked(framing::Chunk::Size)
            } else {
                Framing::UntilClose
            }
        } else {
            match length {
                Ok(Some(n)) => Framing::Length(n),
                Ok(None) => Framing::UntilClose,
                Err(_) => {
                    self.fail("malformed Content-Length in the response");
                    return false;
                }
            }
        };
        if let (Framing::Length(n), Some(max)) = (self.framing, exchange.max_body) {
            if n > max && !exchange.decompress {
                self.fail(format!("body too large ({n} bytes, the limit is {max})"));
                return false;
            }
        }
        let connection: Vec<String> = framing::transfer_codings(head.values("connection"));
        let says = |token: &str| connection.iter().any(|t| t == token);
        self.keep_alive = if head.minor_version == 0 { says("keep-alive") } else { !says("close") };
        // Framing another parser could read differently (RFC 9112 §6.1, §6.3): not reused.
        let doubtful = !codings.is_empty()
            && (length.is_err() || matches!(length, Ok(Some(_))) || head.minor_version == 0);
        if self.framing == Framing::UntilClose || doubtful {
            self.keep_alive = false;
        }
        self.inflate = None;
        if exchange.decompress && self.framing != Framing::Length(0) {
            let encodings = framing::transfer_codings(head.values("content-encoding"));
            self.inflate = match encodings.as_slice() {
                [e] => Decoder::for_encoding(e),
                _ => None,
            };
        }
        self.head = Some(head);
        self.phase = Phase::Body;
        self.news = true;
        true
    }

    fn read_body(&mut self) {
        let input = std::mem::take(&mut self.input);
        let used = self.read_body_from(&input);
        self.input = input;
        self.input.drain(..used);
    }

    /// After the peer's end, once nothing read ahead is left: a body framed by the close is
    /// complete, any other is cut.
    fn settle_eof(&mut self) {
        if !self.closed || self.phase != Phase::Body || !self.input.is_empty() || !self.compressed.is_empty()
        {
            return;
        }
        if self.framing == Framing::UntilClose {
            self.framing = Framing::Length(0);
            self.read_body();
        }
        if self.phase == Phase::Body {
            self.fail("the server closed the connection before the body ended");
        }
    }

    /// Decodes body bytes from `input`: how many of them were used.
    fn read_body_from(&mut self, input: &[u8]) -> usize {
        if self.inflate.is_some() && !self.inflate_some() {
            return 0;
        }
        let room = HOLD.saturating_sub(self.body.len());
        if room == 0 && !self.framing.is_done() {
            return 0;
        }
        let trailers = TrailerLimits { fields: self.limits.max_headers, bytes: self.limits.max_header_size };
        let sink = if self.inflate.is_some() { &mut self.compressed } else { &mut self.body };
        let decoded = match self.framing.decode(input, room, u64::MAX, trailers, Some(sink)) {
            Ok(d) => d,
            Err(_) => {
                self.fail("malformed chunked body in the response");
                return input.len();
            }
        };
        let all_decoded = self.inflate.is_none() || self.inflate_some();
        self.news |= !self.body.is_empty();
        if !self.over_limit() && decoded.done && all_decoded && self.phase == Phase::Body {
            self.complete();
        }
        decoded.consumed
    }

    /// Decodes pending compressed bytes until the read-ahead is full: true when none are left
    /// (in the input or inside the decoder).
    fn inflate_some(&mut self) -> bool {
        let Some(decoder) = self.inflate.as_mut() else { return true };
        let room = HOLD.saturating_sub(self.body.len());
        if room > 0 && (!self.compressed.is_empty() || decoder.has_output()) {
            match decoder.feed(&self.compressed, &mut self.body, room) {
                Ok(used) => {
                    self.compressed.drain(..used);
                }
                Err(_) => {
                    self.fail("the response body does not decompress");
                    return false;
                }
            }
        }
        let left = !self.compressed.is_empty() || self.inflate.as_ref().is_some_and(Decoder::has_output);
        !self.over_limit() && !left
    }

    /// Compressed bytes wait to be decoded.
    fn decoding(&self) -> bool {
        !self.compressed.is_empty() || self.inflate.as_ref().is_some_and(Decoder::has_output)
    }

    /// Body bytes past `max_body` fail the exchange.
    fn over_limit(&mut self) -> bool {
        let max = self.exchange.as_ref().and_then(|e| e.max_body);
        let total = self.received + self.body.len() as u64;
        match max {
            Some(max) if total > max => {
                self.fail(format!("body too large (over the limit of {max} bytes)"));
                true
            }
            _ => false,
        }
    }

    fn complete(&mut self) {
        if let Some(inflate) = self.inflate.as_mut() {
            if inflate.finish(&mut self.body).is_err() {
                return self.fail("the response body does not decompress");
            }
            if self.over_limit() {
                return;
            }
        }
        self.phase = Phase::Done;
        self.news = true;
    }
}

impl StreamProtocol for HttpClientConn {
    fn handle_ready(&mut self, now: Instant) {
        self.ready = true;
        self.since = now;
        self.news = true;
    }

    fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
        self.since = now;
        if matches!(self.phase, Phase::Head | Phase::Body) {
            self.response_bytes += data.len();
            self.first_byte.get_or_insert(now);
        }
        if self.phase == Phase::Body && self.input.is_empty() {
            // Body bytes go straight from the read buffer (the usual case: one copy fewer).
            let used = self.read_body_from(data);
            if self.phase == Phase::Body || self.phase == Phase::Done {
                self.input.extend_from_slice(&data[used..]);
            }
        } else {
            self.input.extend_from_slice(data);
        }
        self.process();
    }

    fn handle_eof(&mut self, _now: Instant) {
        self.closed = true;
        self.dropped = true;
        match self.phase {
            Phase::Tunnel => self.fail("the proxy closed the connection before the tunnel opened"),
            // The end is judged once what was read ahead is used up (`settle_eof`).
            Phase::Head | Phase::Body => {
                self.process();
                self.news = true;
            }
            _ => self.news = true,
        }
    }

    fn handle_error(&mut self, _now: Instant, error: &str) {
        self.closed = true;
        self.dropped = true;
        self.fail(error);
    }

    fn handle_closed(&mut self, _now: Instant) {
        self.closed = true;
        if !self.is_done() {
            self.fail("the connection closed");
        }
        self.news = true;
    }

    fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Tunnel if !self.tunnel_up && now >= self.since + TUNNEL_TIMEOUT => {
                self.fail("timeout (the proxy did not answer CONNECT)");
            }
            Phase::Idle if now >= self.since + self.limits.idle_timeout => {
                self.idle_expired = true;
                self.news = true;
            }
            Phase::Head | Phase::Body => {
                let Some(exchange) = self.exchange.as_ref() else { return };
                if exchange.deadline.is_some_and(|d| now >= d) {
                    self.fail("timeout (the request took longer than its 'timeout')");
                } else if now >= self.since + exchange.stall {
                    let what = if self.has_head() { "the body" } else { "the response" };
                    self.fail(format!(
                        "timeout (no data for {} s while waiting for {what})",
                        exchange.stall.as_secs_f64()
                    ));
                }
            }
            _ => {}
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Tunnel if !self.tunnel_up => Some(self.since + TUNNEL_TIMEOUT),
            Phase::Idle if self.ready && !self.idle_expired => Some(self.since + self.limits.idle_timeout),
            Phase::Head | Phase::Body => {
                let exchange = self.exchange.as_ref()?;
                // A body waiting for the layer above to take it is not stalled.
                let stall = (self.body.len() < HOLD).then(|| self.since + exchange.stall);
                match (stall, exchange.deadline) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            _ => None,
        }
    }

    fn wants_input(&self) -> bool {
        match self.phase {
            Phase::Body => self.body.len() < HOLD && self.input.len() < HOLD && self.compressed.len() < HOLD,
            Phase::Idle | Phase::Head => self.input.len() <= self.limits.max_header_size,
            Phase::Tunnel => !self.tunnel_up && self.input.len() <= self.limits.max_header_size,
            _ => false,
        }
    }

    fn outgoing(&self) -> &[u8] {
        &self.out
    }

    fn consume_outgoing(&mut self, now: Instant, n: usize) {
        self.out.drain(..n);
        self.since = now;
    }

    fn flow(&self) -> Flow {
        match self.phase {
            Phase::Failed => Flow::Abort,
            Phase::Idle if self.idle_expired => Flow::Finish,
            _ => Flow::Open,
        }
    }

    fn take_news(&mut self) -> bool {
        std::mem::take(&mut self.news)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn exchange(head_request: bool) -> Exchange {
        Exchange {
            head: b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
            body: Vec::new(),
            upload: Upload::Whole,
            head_request,
            decompress: true,
            max_body: Some(1 << 20),
            stall: Duration::from_secs(30),
            deadline: None,
        }
    }

    fn conn(now: Instant) -> HttpClientConn {
        let mut c = HttpClientConn::new(ClientLimits::default(), now);
        c.handle_ready(now);
        c.start(now, exchange(false));
        c
    }

    /// Everything the body gives, and whether it completed.
    fn body(c: &mut HttpClientConn) -> (Vec<u8>, bool) {
        c.take_body()
    }

    #[test]
    fn a_length_framed_response_keeps_the_connection() {
        let now = Instant::now();
        let mut c = conn(now);
        assert_eq!(c.outgoing(), b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
        c.consume_outgoing(now, c.outgoing().len());
        c.handle_bytes(now, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhel");
        let head = c.take_head().unwrap();
        assert_eq!((head.status, head.reason.as_str()), (200, "OK"));
        assert_eq!(head.headers.iter().filter(|(n, _)| n == "x-a").count(), 2);
        assert_eq!(body(&mut c), (b"hel".to_vec(), false));
        c.handle_bytes(now, b"lo");
        assert_eq!(body(&mut c), (b"lo".to_vec(), true));
        assert!(c.recycle(now));
        assert!(c.is_reusable());
    }

    #[test]
    fn chunked_gzip_bodies_are_decoded() {
        let now = Instant::now();
        let mut c = conn(now);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&b"hello ".repeat(1000)).unwrap();
        let zipped = gz.finish().unwrap();
        let mut wire =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n".to_vec();
        for piece in zipped.chunks(100) {
            wire.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            wire.extend_from_slice(piece);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        let mut got = Vec::new();
        for byte in wire.chunks(7) {
            c.handle_bytes(now, byte);
            got.extend(body(&mut c).0);
        }
        assert!(c.is_done() && c.failure().is_none());
        assert_eq!(got, b"hello ".repeat(1000));
    }

    #[test]
    fn a_zip_bomb_stops_at_the_limit() {
        let now = Instant::now();
        let mut c = conn(now);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&vec![0u8; 16 << 20]).unwrap();
        let zipped = gz.finish().unwrap();
        let head =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Encoding: gzip\r\n\r\n", zipped.len());
        c.handle_bytes(now, head.as_bytes());
        c.handle_bytes(now, &zipped);
        let mut taken = 0;
        while c.failure().is_none() {
            let (piece, done) = c.take_body();
            assert!(piece.len() <= MAX_TAKE, "a take of {}", piece.len());
            assert!(!done);
            taken += piece.len();
        }
        assert!(c.failure().unwrap().contains("too large"), "{:?}", c.failure());
        assert!(taken <= 1 << 20, "{taken} bytes handed over");
        assert_eq!(c.flow(), Flow::Abort);
        // Without a limit (a streamed download), each take stays bounded however it expands.
        let mut c = conn(now);
        c.exchange.as_mut().unwrap().max_body = None;
        c.handle_bytes(now, head.as_bytes());
        c.handle_bytes(now, &zipped);
        let mut total = 0;
        loop {
            let (piece, done) = c.take_body();
            assert!(piece.len() <= MAX_TAKE, "a take of {}", piece.len());
            total += piece.len();
            if done {
                break;
            }
        }
        assert_eq!(total, 16 << 20);
    }

    #[test]
    fn close_delimited_bodies_end_at_eof_and_are_not_reused() {
        let now = Instant::now();
        let mut c = conn(now);
        c.handle_bytes(now, b"HTTP/1.0 200 OK\r\n\r\nabc");
        c.handle_eof(now);
        assert_eq!(body(&mut c), (b"abc".to_vec(), true));
        assert!(!c.recycle(now));
    }

    #[test]
    fn eof_mid_body_and_bad_chunks_fail() {
        let now = Instant::now();
        let mut c = conn(now);
        c.handle_bytes(now, b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc");
        c.handle_eof(now);
        assert!(c.failure().unwrap().contains("before the body ended"));
        let mut c = conn(now);
        c.handle_bytes(now, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n");
        assert!(c.failure().unwrap().contains("chunked"));
        let mut c = conn(now);
        c.handle_bytes(now, b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n");
        assert!(c.failure().unwrap().contains("Content-Length"));
    }

    #[test]
    fn heads_and_204_have_no_body() {
        let now = Instant::now();
        let mut c = HttpClientConn::new(ClientLimits::default(), now);
        c.start(now, exchange(true));
        c.consume_outgoing(now, c.outgoing().len());
        c.handle_bytes(now, b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n");
        assert_eq!(body(&mut c), (Vec::new(), true));
        assert!(c.recycle(now));
        c.start(now, exchange(false));
        c.consume_outgoing(now, c.outgoing().len());
        c.handle_bytes(now, b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(body(&mut c), (Vec::new(), true));
    }

    #[test]
    fn stalls_deadlines_and_idle_connections_time_out() {
        let now = Instant::now();
        let mut c = conn(now);
        let at = c.poll_timeout().unwrap();
        assert_eq!(at, now + Duration::from_secs(30));
        c.handle_timeout(at);
        assert!(c.failure().unwrap().contains("no data for 30 s"));
        let mut c = HttpClientConn::new(ClientLimits::default(), now);
        c.handle_ready(now);
        let idle = c.poll_timeout().unwrap();
        c.handle_timeout(idle);
        assert_eq!(c.flow(), Flow::Finish);
        assert!(!c.is_reusable());
    }

    #[test]
    fn a_reused_connection_closed_before_any_answer_can_retry() {
        let now = Instant::now();
        let mut c = conn(now);
        c.consume_outgoing(now, c.outgoing().len());
        c.handle_bytes(now, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert!(c.take_body().1 && c.recycle(now));
        c.start(now, exchange(false));
        c.handle_eof(now);
        assert!(c.lost_idle());
    }

    #[test]
    fn huge_heads_and_unasked_bytes_fail() {
        let now = Instant::now();
        let mut c = conn(now);
        c.handle_bytes(now, b"HTTP/1.1 200 OK\r\n");
        c.handle_bytes(now, &vec![b'a'; 70 << 10]);
        assert!(c.failure().unwrap().contains("too large"));
        let mut c = HttpClientConn::new(ClientLimits::default(), now);
        c.handle_bytes(now, b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(!c.is_reusable());
    }

    #[test]
    fn streamed_uploads_are_chunked() {
        let now = Instant::now();
        let mut c = HttpClientConn::new(ClientLimits::default(), now);
        let mut e = exchange(false);
        e.upload = Upload::Streamed { chunked: true };
        e.head = b"POST / HTTP/1.1\r\n\r\n".to_vec();
        c.start(now, e);
        c.send_body(b"abc");
        c.end_body();
        assert_eq!(c.outgoing(), b"POST / HTTP/1.1\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    }
}
