//! Raw bytes for Lua scripts: [`RawStream`] (TCP, TLS, Unix streams) and [`RawDatagrams`] (UDP).
//!
//! Both are buffers with bounds and a state: what arrived waits in an inbox until the layer
//! above takes it, what Lua writes waits in an outbox until the driver sends it. A full inbox
//! stops reading (TCP pushes back on the peer; UDP drops and counts); a full outbox refuses
//! writes with [`WriteError::Backpressure`] so memory stays bounded whatever the peer does.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use super::stream::{DatagramProtocol, Flow, StreamProtocol};

/// Why a write was refused; nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// The stream is closing or closed.
    Closed,
    /// More than the limit is queued already: wait for the queue to drain.
    Backpressure,
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WriteError::Closed => "closed",
            WriteError::Backpressure => "backpressure",
        })
    }
}

/// Limits of a raw stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawLimits {
    /// Received bytes held for the layer above; past it reading stops.
    pub max_input: usize,
    /// Queued bytes past which writes are refused (a write into a queue below it is taken
    /// whole, so the queue holds at most this plus one write).
    pub max_queued: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits { max_input: 1 << 20, max_queued: 1 << 20 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Connecting (or in the TLS handshake).
    Starting,
    Open,
    /// Write what is queued, then close.
    Finishing,
    /// Close now, dropping the queue; the end is reported with this reason.
    Aborting(Option<String>),
    /// The transport is gone: `None` after a clean end, else why.
    Ended(Option<String>),
}

/// A byte stream for Lua. See the module documentation.
#[derive(Debug)]
pub struct RawStream {
    limits: RawLimits,
    input: Vec<u8>,
    /// Bytes at the front of `input` already taken.
    input_pos: usize,
    out: Vec<u8>,
    out_pos: usize,
    state: State,
    /// The peer finished sending.
    eof: bool,
    /// The transport became ready (connected, TLS done) since the last call of
    /// [`RawStream::take_ready`].
    ready: bool,
    news: bool,
}

/// Drained buffers larger than this are given back.
const KEEP: usize = 16 * 1024;

impl RawStream {
    pub fn new(limits: RawLimits) -> RawStream {
        RawStream {
            limits,
            input: Vec::new(),
            input_pos: 0,
            out: Vec::new(),
            out_pos: 0,
            state: State::Starting,
            eof: false,
            ready: false,
            news: false,
        }
    }

    /// Received bytes not taken yet.
    pub fn input(&self) -> &[u8] {
        &self.input[self.input_pos..]
    }

    /// Marks the first `n` bytes of [`input`](Self::input) as taken.
    pub fn consume_input(&mut self, n: usize) {
        self.input_pos = (self.input_pos + n).min(self.input.len());
        if self.input_pos == self.input.len() {
            self.input.clear();
            self.input_pos = 0;
            if self.input.capacity() > KEEP {
                self.input = Vec::new();
            }
        }
    }

    /// Whether the input is full (reading has stopped until some is taken).
    pub fn input_full(&self) -> bool {
        self.input().len() >= self.limits.max_input
    }

    /// Queues `data` for the peer.
    pub fn write(&mut self, data: &[u8]) -> Result<(), WriteError> {
        if !matches!(self.state, State::Starting | State::Open) {
            return Err(WriteError::Closed);
        }
        if self.queued() >= self.limits.max_queued {
            return Err(WriteError::Backpressure);
        }
        if self.out_pos > 0 && self.out_pos >= self.out.len() / 2 {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        self.out.extend_from_slice(data);
        Ok(())
    }

    /// Bytes queued and not written yet.
    pub fn queued(&self) -> usize {
        self.out.len() - self.out_pos
    }

    pub fn limits(&self) -> RawLimits {
        self.limits
    }

    /// Closes after the queued bytes are out (nothing more is read).
    pub fn finish(&mut self) {
        if matches!(self.state, State::Starting | State::Open) {
            self.state = State::Finishing;
        }
    }

    /// Closes at once, dropping the queue; the end reads `why` (`None`: a clean end).
    pub fn abort(&mut self, why: Option<String>) {
        if !matches!(self.state, State::Ended(_)) {
            self.state = State::Aborting(why);
        }
    }

    /// Whether the transport is ready and the stream not closing.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Whether the peer finished sending.
    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// `Some(None)` once the transport is gone after a clean end, `Some(Some(why))` after a
    /// failure; `None` while it lasts.
    pub fn ended(&self) -> Option<Option<&str>> {
        match &self.state {
            State::Ended(why) => Some(why.as_deref()),
            _ => None,
        }
    }

    /// True once after the transport became ready.
    pub fn take_ready(&mut self) -> bool {
        std::mem::take(&mut self.ready)
    }

    fn set_ended(&mut self, why: Option<String>) {
        if !matches!(self.state, State::Ended(_)) {
            self.state = State::Ended(why);
            self.out.clear();
            self.out_pos = 0;
            self.news = true;
        }
    }
}

impl StreamProtocol for RawStream {
    fn handle_ready(&mut self, _now: Instant) {
        if self.state == State::Starting {
            self.state = State::Open;
        }
        self.ready = true;
        self.news = true;
    }

    fn handle_bytes(&mut self, _now: Instant, data: &[u8]) {
        if self.input_pos > 0 && self.input_pos >= self.input.len() / 2 {
            self.input.drain(..self.input_pos);
            self.input_pos = 0;
        }
        self.input.extend_from_slice(data);
        self.news = true;
    }

    fn handle_eof(&mut self, _now: Instant) {
        self.eof = true;
        self.news = true;
    }

    fn handle_error(&mut self, _now: Instant, error: &str) {
        self.set_ended(Some(error.to_owned()));
    }

    fn handle_closed(&mut self, _now: Instant) {
        let why = match &mut self.state {
            State::Aborting(why) => why.take(),
            _ => None,
        };
        self.set_ended(why);
    }

    fn wants_input(&self) -> bool {
        !self.eof && !self.input_full() && matches!(self.state, State::Starting | State::Open)
    }

    fn outgoing(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    fn consume_outgoing(&mut self, _now: Instant, n: usize) {
        self.out_pos = (self.out_pos + n).min(self.out.len());
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > KEEP {
                self.out = Vec::new();
            }
        }
    }

    fn flow(&self) -> Flow {
        match self.state {
            State::Starting | State::Open => Flow::Open,
            State::Finishing => Flow::Finish,
            State::Aborting(_) | State::Ended(_) => Flow::Abort,
        }
    }

    fn take_news(&mut self) -> bool {
        std::mem::take(&mut self.news)
    }
}

/// Limits of a UDP socket for Lua.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramLimits {
    /// Larger datagrams are dropped (and counted).
    pub max_size: usize,
    /// Datagrams held for the layer above; past it new ones are dropped (and counted).
    pub max_inbox: usize,
    /// Datagrams waiting to be sent; past it `send` is refused with backpressure.
    pub max_outbox: usize,
}

impl Default for DatagramLimits {
    fn default() -> Self {
        DatagramLimits { max_size: 64 * 1024, max_inbox: 1024, max_outbox: 1024 }
    }
}

/// Datagrams dropped on the way in, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub oversize: u64,
    pub inbox_full: u64,
}

/// A UDP socket's datagrams for Lua.
#[derive(Debug, Default)]
pub struct RawDatagrams {
    limits: DatagramLimits,
    inbox: VecDeque<(Vec<u8>, SocketAddr)>,
    outbox: VecDeque<(Vec<u8>, SocketAddr)>,
    dropped: Dropped,
    news: bool,
}

impl RawDatagrams {
    pub fn new(limits: DatagramLimits) -> RawDatagrams {
        RawDatagrams { limits, ..Default::default() }
    }

    /// The oldest datagram received and not taken yet.
    pub fn receive(&mut self) -> Option<(Vec<u8>, SocketAddr)> {
        self.inbox.pop_front()
    }

    /// Queues a datagram; refused when `data` is over the size limit or the queue is full.
    pub fn send(&mut self, data: &[u8], to: SocketAddr) -> Result<(), WriteError> {
        if self.outbox.len() >= self.limits.max_outbox {
            return Err(WriteError::Backpressure);
        }
        self.outbox.push_back((data.to_vec(), to));
        Ok(())
    }

    pub fn dropped(&self) -> Dropped {
        self.dropped
    }

    pub fn limits(&self) -> DatagramLimits {
        self.limits
    }
}

impl DatagramProtocol for RawDatagrams {
    fn handle_datagram(&mut self, _now: Instant, from: SocketAddr, data: &[u8]) {
        if data.len() > self.limits.max_size {
            self.dropped.oversize += 1;
        } else if self.inbox.len() >= self.limits.max_inbox {
            self.dropped.inbox_full += 1;
        } else {
            self.inbox.push_back((data.to_vec(), from));
            self.news = true;
        }
    }

    fn poll_transmit(&mut self, _now: Instant, buf: &mut Vec<u8>) -> Option<SocketAddr> {
        let (data, to) = self.outbox.pop_front()?;
        // Handed over, not copied (`buf` is empty).
        *buf = data;
        Some(to)
    }

    fn take_news(&mut self) -> bool {
        std::mem::take(&mut self.news)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn input_is_kept_until_taken_and_bounded() {
        let mut s = RawStream::new(RawLimits { max_input: 8, max_queued: 4 });
        s.handle_ready(now());
        assert!(s.take_news() && s.take_ready() && !s.take_news());
        s.handle_bytes(now(), b"hello ");
        s.handle_bytes(now(), b"wor");
        assert!(s.take_news());
        assert_eq!(s.input(), b"hello wor");
        assert!(s.input_full() && !s.wants_input());
        s.consume_input(6);
        assert_eq!(s.input(), b"wor");
        assert!(s.wants_input());
        s.handle_bytes(now(), b"ld");
        assert_eq!(s.input(), b"world");
        s.consume_input(99);
        assert_eq!(s.input(), b"");
    }

    #[test]
    fn writes_past_the_limit_are_refused_not_queued() {
        let mut s = RawStream::new(RawLimits { max_input: 8, max_queued: 4 });
        assert_eq!(s.write(b"abc"), Ok(()));
        assert_eq!(s.write(b"defgh"), Ok(()), "a queue below the limit takes a whole write");
        assert_eq!(s.write(b"x"), Err(WriteError::Backpressure));
        assert_eq!(s.outgoing(), b"abcdefgh");
        s.consume_outgoing(Instant::now(), 5);
        assert_eq!(s.queued(), 3);
        assert_eq!(s.write(b"ij"), Ok(()));
        assert_eq!(s.outgoing(), b"fghij");
        s.finish();
        assert_eq!(s.flow(), Flow::Finish);
        assert_eq!(s.write(b"late"), Err(WriteError::Closed));
        s.handle_closed(now());
        assert_eq!(s.ended(), Some(None));
        assert_eq!(s.queued(), 0);
    }

    #[test]
    fn errors_end_the_stream_once() {
        let mut s = RawStream::new(RawLimits::default());
        s.handle_error(now(), "connection refused");
        assert_eq!(s.ended(), Some(Some("connection refused")));
        s.handle_closed(now());
        assert_eq!(s.ended(), Some(Some("connection refused")));
        assert_eq!(s.flow(), Flow::Abort);
        assert!(!s.wants_input());

        let mut s = RawStream::new(RawLimits::default());
        s.abort(Some("input limit".into()));
        s.handle_closed(now());
        assert_eq!(s.ended(), Some(Some("input limit")));
    }

    #[test]
    fn datagrams_over_the_limits_are_dropped_and_counted() {
        let limits = DatagramLimits { max_size: 4, max_inbox: 2, max_outbox: 1 };
        let mut u = RawDatagrams::new(limits);
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        u.handle_datagram(now(), from, b"12345");
        u.handle_datagram(now(), from, b"a");
        u.handle_datagram(now(), from, b"b");
        u.handle_datagram(now(), from, b"c");
        assert_eq!(u.dropped(), Dropped { oversize: 1, inbox_full: 1 });
        assert!(u.take_news());
        assert_eq!(u.receive(), Some((b"a".to_vec(), from)));
        assert_eq!(u.send(b"x", from), Ok(()));
        assert_eq!(u.send(b"y", from), Err(WriteError::Backpressure));
        let mut buf = Vec::new();
        assert_eq!(u.poll_transmit(now(), &mut buf), Some(from));
        assert_eq!(buf, b"x");
    }
}
