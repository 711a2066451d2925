//! Entry point for the `stream_glue` fuzz target and its seed replay (`tests/fuzz_seeds_streams.rs`):
//! a stream protocol driven the way the driver drives it, by a script of transport events (bytes
//! in chunks, end of stream, errors, readiness, partial writes, time passing) mixed with what the
//! layer above does (reads, writes, closes), checking the [`StreamProtocol`] contract after each
//! step. Arbitrary input must never panic; a failed assertion is a bug.
//!
//! Byte 0 picks the protocol: a raw stream (small limits), a WebSocket server session or a
//! WebSocket client session (its upgrade key is fixed, so a seed can hold a valid 101 response).
//! Every later byte is an operation: the top three bits say which, the low five its size.
//! [`http_glue`] drives an HTTP/1.1 server connection the same way (the `http_server` target).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::http::multipart::{Part, Reader};
use super::http::{BodyRead, HttpLimits, HttpServerConn, Response};
use super::raw::{RawLimits, RawStream, WriteError};
use super::stream::{Flow, StreamProtocol};
use super::ws::{Contexts, DeflateConfig, Opcode, Received, Settings, WsConfig, WsSession, WsUrl};

/// The client session's upgrade key (a seed's 101 response answers it).
pub const CLIENT_KEY: [u8; 16] = [7; 16];

const RAW_LIMITS: RawLimits = RawLimits { max_input: 64, max_queued: 64 };
/// Timeouts fired at one instant before the protocol must have moved its deadline on (more
/// would be a host that wakes up for nothing, forever).
const MAX_TIMEOUTS_AT_ONCE: usize = 3;

enum Subject {
    Raw(RawStream),
    Ws(Box<WsSession>),
    /// And the number of the last request the layer above took.
    Http(Box<HttpServerConn>, u64),
}

const HTTP_LIMITS: HttpLimits = HttpLimits {
    max_header_size: 256,
    max_headers: 8,
    max_uri: 64,
    max_body_size: 512,
    head_timeout: Duration::from_secs(2),
    body_timeout: Duration::from_secs(3),
    idle_timeout: Duration::from_secs(5),
    send_timeout: Duration::from_secs(4),
    max_outgoing: 1024,
};

/// Answers the request an HTTP connection waits on (the layer above always does, in the end).
fn answer(http: &mut HttpServerConn, now: Instant, status: u16, headers: &[(&[u8], &[u8])], body: &[u8]) {
    let waiting = http.awaits_response();
    let valid = headers.iter().all(|(n, v)| !n.contains(&b' ') && !v.contains(&b'\n'));
    let result = http.respond(now, Response { status, headers, body, date: "Thu, 01 Jan 1970 00:00:00 GMT" });
    assert_eq!(
        result.is_ok(),
        waiting && valid,
        "respond accepts exactly a valid answer to a waiting request"
    );
    if result.is_err() {
        assert_eq!(http.awaits_response(), waiting, "a refused answer changes nothing");
    }
}

impl Subject {
    fn proto(&mut self) -> &mut dyn StreamProtocol {
        match self {
            Subject::Raw(raw) => raw,
            Subject::Ws(ws) => ws.as_mut(),
            Subject::Http(http, _) => http.as_mut(),
        }
    }

    /// What the layer above does; `arg` picks the action and its size.
    fn above(&mut self, arg: u8, now: Instant) {
        let size = usize::from(arg >> 3) * 8 + 1;
        match self {
            Subject::Raw(raw) => match arg & 7 {
                0 => raw.consume_input(size),
                1 | 2 => {
                    let before = raw.queued();
                    match raw.write(&vec![b'x'; size]) {
                        Ok(()) => assert_eq!(raw.queued(), before + size),
                        Err(WriteError::Backpressure) => assert!(before >= RAW_LIMITS.max_queued),
                        Err(WriteError::Closed) => assert!(!raw.is_open()),
                    }
                }
                3 => raw.finish(),
                4 => raw.abort(None),
                5 => raw.abort(Some("reset".into())),
                6 => {
                    let _ = raw.take_ready();
                }
                _ => raw.consume_input(raw.input().len()),
            },
            Subject::Ws(ws) => match arg & 7 {
                0 | 1 => {
                    let _ = ws.receive();
                }
                2 => {
                    let _ = ws.send(Opcode::Text, "hé".repeat(size).as_bytes());
                }
                3 => {
                    let _ = ws.send(Opcode::Binary, &vec![0xa5; size * 16]);
                }
                4 => ws.close(1000, "bye"),
                5 => ws.close(4000 + u16::from(arg), &"r".repeat(size * 4)),
                6 => {
                    let _ = (ws.take_upgraded(), ws.take_opened(), ws.take_rejection());
                }
                _ => while let Some(Received::Message(..)) = ws.receive() {},
            },
            Subject::Http(http, taken) => match arg & 15 {
                0 | 1 => {
                    if let Some(r) = http.take_request() {
                        assert!(r.body.len() <= HTTP_LIMITS.max_body_size);
                        assert!(r.target.len() <= HTTP_LIMITS.max_uri);
                        assert!(r.number > *taken, "each request is taken once");
                        *taken = r.number;
                    }
                }
                2 => answer(http, now, 200, &[(b"x-a", b"1")], &vec![b'b'; size * 8]),
                3 => answer(http, now, 204, &[], b"dropped"),
                4 => answer(http, now, 200, &[(b"connection", b"close")], b"bye"),
                5 => answer(http, now, 200, &[(b"bad name", b"1")], b""),
                6 => http.finish(),
                8 | 9 => {
                    let length = (arg & 1 == 0).then_some(size as u64 * 100);
                    let response = Response { status: 200, headers: &[], body: b"", date: "" };
                    let _ = http.respond_streamed(now, response, length);
                }
                // As the layer above feeds a body: while it wants more.
                10 if http.wants_body() => http.send_body(now, &vec![b's'; size * 50]),
                11 => http.end_body(now),
                12 => {
                    if let Some((bytes, _)) = http.take_upgrade() {
                        assert!(!bytes.is_empty() && !http.awaits_response());
                    }
                }
                // A handler asks for the body (early delivery), whole or in pieces, within a
                // limit of its own; then takes what came.
                7 => http.read_body(now, *taken, size as u64 * 16, size > 1),
                13 => {
                    while let BodyRead::Data(data, last) = http.take_body(*taken) {
                        assert!(data.len() <= 64 << 10, "at most the read-ahead, or the limit given");
                        if last || data.is_empty() {
                            break;
                        }
                    }
                }
                _ => answer(http, now, 500, &[], &vec![b'e'; size * 64]),
            },
        }
    }

    /// Invariants that hold between any two steps.
    fn check(&mut self, chunk: usize) {
        match self {
            Subject::Raw(raw) => {
                // Input is fed only while it wants some; writes are taken whole below the limit.
                assert!(raw.input().len() < RAW_LIMITS.max_input + chunk);
                assert!(raw.queued() < RAW_LIMITS.max_queued + 256);
                if raw.ended().is_some() {
                    assert_eq!(raw.queued(), 0, "an ended stream keeps nothing to send");
                    assert_eq!(raw.write(b"x"), Err(WriteError::Closed));
                }
            }
            Subject::Ws(ws) => {
                if let Some((code, _, _)) = ws.end() {
                    assert!(ws.is_closed());
                    assert!(code >= 1000);
                    assert!(ws.send(Opcode::Text, b"late").is_err());
                }
            }
            // Pipelined input waits while an answer over the bound is queued: output stays
            // within one answer of it.
            Subject::Http(http, _) => assert!(http.outgoing().len() <= HTTP_LIMITS.max_outgoing + 4096),
        }
    }

    /// The transport is gone: what the layer above must have been told by now.
    fn check_closed(&mut self) {
        match self {
            Subject::Raw(raw) => assert!(raw.ended().is_some(), "a closed transport ends the stream"),
            Subject::Ws(ws) => {
                if ws.is_established() {
                    // The handler gets its end after the messages before it.
                    let mut end = None;
                    while let Some(r) = ws.receive() {
                        if let Received::Closed { code, .. } = r {
                            end = Some(code);
                            break;
                        }
                    }
                    assert!(end.is_some(), "an established session reports its end");
                }
            }
            Subject::Http(http, _) => assert!(!http.wants_input(), "a closed connection wants no input"),
        }
    }
}

fn rank(flow: Flow) -> u8 {
    match flow {
        Flow::Open => 0,
        Flow::Finish => 1,
        Flow::Abort => 2,
    }
}

/// The driver's side: what it has told the protocol, and the clock.
struct Harness {
    subject: Subject,
    now: Instant,
    /// Bytes can flow (an accepted stream is connected before it is told it is ready).
    connected: bool,
    ready: bool,
    eof: bool,
    closed: bool,
    flow: Flow,
    max_chunk: usize,
}

impl Harness {
    fn proto(&mut self) -> &mut dyn StreamProtocol {
        self.subject.proto()
    }

    /// What the driver does at the end of every service: fire due timers, act on the flow.
    fn settle(&mut self) {
        if self.closed {
            return;
        }
        let now = self.now;
        let mut fired = 0;
        while self.proto().poll_timeout().is_some_and(|at| at <= now) {
            assert!(fired < MAX_TIMEOUTS_AT_ONCE, "a deadline that stays due spins the host");
            self.proto().handle_timeout(now);
            fired += 1;
        }
        let flow = self.proto().flow();
        assert!(rank(flow) >= rank(self.flow), "flow went back from {:?} to {flow:?}", self.flow);
        self.flow = flow;
        let done = match flow {
            Flow::Open => false,
            Flow::Finish => self.proto().outgoing().is_empty(),
            Flow::Abort => true,
        };
        if done {
            self.proto().handle_closed(now);
            self.closed = true;
        }
        let _ = self.proto().take_news();
        self.subject.check(self.max_chunk);
        if self.closed {
            self.subject.check_closed();
        }
    }

    fn feed(&mut self, data: &[u8]) {
        self.max_chunk = self.max_chunk.max(data.len());
        if self.connected
            && !self.closed
            && !self.eof
            && self.flow == Flow::Open
            && self.proto().wants_input()
        {
            let now = self.now;
            self.proto().handle_bytes(now, data);
        }
    }

    /// The peer read `n` bytes of what is queued.
    fn drain(&mut self, n: usize) {
        if self.connected && !self.closed {
            let n = n.min(self.proto().outgoing().len());
            let now = self.now;
            self.proto().consume_outgoing(now, n);
        }
    }

    fn step(&mut self, op: u8, script: &mut &[u8]) {
        let arg = op & 0x1f;
        let now = self.now;
        match op >> 5 {
            0..=2 => {
                let n = (usize::from(arg) + 1).min(script.len());
                let (data, rest) = script.split_at(n);
                *script = rest;
                self.feed(data);
            }
            3 => self.drain(usize::from(arg) * 16 + 1),
            4 => self.subject.above(arg, now),
            5 => {
                // Time passes: up to about 8 s in steps of 250 ms, or a minute.
                let ms = if arg == 0x1f { 60_000 } else { u64::from(arg) * 250 };
                self.now += Duration::from_millis(ms);
            }
            6 if !self.closed => match arg & 3 {
                0 if !self.ready => {
                    self.ready = true;
                    self.connected = true;
                    self.proto().handle_ready(now);
                }
                1 if self.connected && !self.eof => {
                    self.eof = true;
                    self.proto().handle_eof(now);
                }
                2 => {
                    self.proto().handle_error(now, "connection reset by peer");
                    self.closed = true;
                    self.subject.check_closed();
                }
                _ => {}
            },
            _ => {
                let n = self.proto().outgoing().len();
                self.drain(n);
            }
        }
        self.settle();
    }

    /// The peer reads everything and goes away; time passes. Every protocol must then end.
    fn finish(&mut self) {
        if !self.ready && !self.closed {
            self.ready = true;
            self.connected = true;
            let now = self.now;
            self.proto().handle_ready(now);
        }
        if !self.eof && !self.closed {
            self.eof = true;
            let now = self.now;
            self.proto().handle_eof(now);
        }
        if let Subject::Raw(raw) = &mut self.subject {
            // The layer above closes a raw stream once it read the end (bind does).
            raw.finish();
        }
        for _ in 0..20 {
            if let Subject::Http(http, _) = &mut self.subject {
                // The layer above answers what it was given (a handler ends, or gets a 500) and
                // ends a streamed body (a file is read to its end).
                let _ = http.take_request();
                if http.awaits_response() {
                    answer(http, self.now, 200, &[], b"late");
                }
                http.end_body(self.now);
            }
            self.drain(usize::MAX);
            self.settle();
            if self.closed {
                return;
            }
            self.now += Duration::from_secs(1);
        }
        panic!("the stream never closed after the peer went away (flow {:?})", self.flow);
    }
}

/// See the module documentation.
pub fn stream_glue(data: &[u8]) {
    let Some((&ctl, script)) = data.split_first() else { return };
    let now = Instant::now();
    let settings = Arc::new(Settings {
        ws: WsConfig {
            read_buffer_size: 64,
            max_message_size: 2048,
            max_frame_size: 1024,
            max_outgoing_buffer: 1024,
            max_incoming_buffer: 4096,
        },
        ping_interval: Some(Duration::from_secs(1)),
        ping_timeout: Duration::from_secs(2),
        inbox_limit: 3000,
        // Every other input with permessage-deflate allowed (server) or offered (client).
        deflate: (ctl & 0x80 != 0)
            .then(|| (DeflateConfig { threshold: 16, ..DeflateConfig::default() }, Contexts::new(1))),
    });
    let subject = match ctl % 3 {
        0 => Subject::Raw(RawStream::new(RAW_LIMITS)),
        1 => Subject::Ws(Box::new(WsSession::server(Arc::from(vec!["chat".to_owned()]), settings, now))),
        _ => {
            let url = WsUrl::parse("ws://example.com/chat").expect("static URL");
            let client =
                WsSession::client(&url, &["chat"], CLIENT_KEY, settings, now).expect("static request");
            Subject::Ws(Box::new(client))
        }
    };
    // An accepted stream (raw or server) is connected from the start; a client once it is ready.
    drive(subject, ctl % 3 != 2, now, script);
}

/// An HTTP/1.1 server connection (small limits) driven by a script as [`stream_glue`]'s.
pub fn http_glue(script: &[u8]) {
    let now = Instant::now();
    drive(Subject::Http(Box::new(HttpServerConn::new(HTTP_LIMITS, now)), 0), true, now, script);
}

/// [`http_glue`] for a connection that hands requests over once their head is in
/// (`deliver_heads`), whose bodies the layer above reads or drops.
pub fn http_early_glue(script: &[u8]) {
    let now = Instant::now();
    let conn = HttpServerConn::new(HTTP_LIMITS, now).deliver_heads();
    drive(Subject::Http(Box::new(conn), 0), true, now, script);
}

fn drive(subject: Subject, connected: bool, now: Instant, mut script: &[u8]) {
    let mut h = Harness {
        subject,
        now,
        connected,
        ready: false,
        eof: false,
        closed: false,
        flow: Flow::Open,
        max_chunk: 0,
    };
    while let Some((&op, rest)) = script.split_first() {
        script = rest;
        h.step(op, &mut script);
    }
    h.finish();
}

/// A `multipart/form-data` body (boundary `B`) pushed to [`Reader`] in pieces of the size its
/// first byte picks: parts come well-formed (a field, its data, its end; an error last), never
/// more data than was pushed, and nothing waits unread after a push.
pub fn multipart(data: &[u8]) {
    let Some((&size, body)) = data.split_first() else { return };
    let mut reader = Reader::new("multipart/form-data; boundary=B").expect("a boundary");
    let (mut in_field, mut ended, mut data_bytes) = (false, false, 0);
    let pieces = body.chunks(usize::from(size % 64) + 1).map(Some).chain([None]);
    for piece in pieces {
        for part in reader.push(piece) {
            assert!(!ended, "nothing after an error");
            match part {
                Part::Field { .. } => {
                    assert!(!in_field, "a field starts after the last one ended");
                    in_field = true;
                }
                Part::Data(d) => {
                    assert!(in_field, "data belongs to a field");
                    data_bytes += d.len();
                }
                Part::End => {
                    assert!(in_field);
                    in_field = false;
                }
                Part::Error(_) => ended = true,
            }
        }
        assert_eq!(reader.waiting(), 0, "a push is read through");
    }
    assert!(data_bytes <= body.len());
}

/// An HTTP/1.1 client connection fed a server's bytes in pieces of the size the first byte
/// picks (its top bits choose HEAD, decompression and a body limit): heads come before bodies,
/// no take holds more than the read-ahead plus one decoding step, a body limit holds on what
/// was decoded, a complete response on a kept connection lets the next request start, and
/// after the end of the stream and a long wait every exchange is over.
pub fn http_client(data: &[u8]) {
    use super::http::client::{ClientLimits, Exchange, HttpClientConn, Upload, MAX_TAKE};
    let Some((&ctl, body)) = data.split_first() else { return };
    let mut now = Instant::now();
    let exchange = |now| Exchange {
        head: b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
        body: Vec::new(),
        upload: Upload::Whole,
        head_request: ctl & 0x40 != 0,
        decompress: ctl & 0x80 != 0,
        max_body: (ctl & 0x20 != 0).then_some(1000),
        stall: Duration::from_secs(5),
        deadline: Some(now + Duration::from_secs(60)),
    };
    let limits =
        ClientLimits { max_header_size: 1024, max_headers: 16, idle_timeout: Duration::from_secs(10) };
    let mut conn = HttpClientConn::new(limits, now);
    conn.handle_ready(now);
    conn.start(now, exchange(now));
    let (mut got, mut head) = (0u64, false);
    let mut pump = |conn: &mut HttpClientConn, now: Instant| {
        let _ = conn.take_news();
        let n = conn.outgoing().len();
        conn.consume_outgoing(now, n);
        if conn.take_head().is_some() {
            head = true;
        }
        let (data, done) = conn.take_body();
        assert!(data.is_empty() || head, "body bytes come after a head");
        assert!(data.len() <= MAX_TAKE, "a take holds {} bytes", data.len());
        got += data.len() as u64;
        if ctl & 0x20 != 0 {
            assert!(got <= 1000, "the body limit holds ({got} bytes)");
        }
        if done && conn.recycle(now) {
            assert!(conn.is_reusable());
            conn.start(now, exchange(now));
            (got, head) = (0, false);
        }
    };
    for piece in body.chunks(usize::from(ctl & 0x1f) + 1) {
        if !conn.wants_input() && conn.failure().is_none() {
            pump(&mut conn, now);
        }
        conn.handle_bytes(now, piece);
        pump(&mut conn, now);
        now += Duration::from_millis(10);
    }
    conn.handle_eof(now);
    pump(&mut conn, now);
    now += Duration::from_secs(120);
    if let Some(at) = conn.poll_timeout() {
        assert!(at <= now, "a deadline within the exchange's limits");
        conn.handle_timeout(now);
    }
    pump(&mut conn, now);
    assert!(conn.is_done() || conn.is_reusable() || conn.flow() != Flow::Open, "the exchange is over");
}
