//! Stream entries: a TCP or Unix socket, optional TLS, and the protocol running over it.
//!
//! The stream moves bytes between the socket and its protocol object ([`StreamProtocol`]):
//! it finishes a non-blocking connect, runs the TLS pump, reads while the protocol wants
//! input (within a per-service budget, so one busy peer cannot hold a frame), writes what the
//! protocol queued until the socket pushes back, and closes the socket when the protocol's
//! [`Flow`] says so. TLS records and bytes queued before a TLS upgrade wait in `out`, ahead of
//! the protocol's own output.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Interest, Registry, Token};

use super::net::{Address, StreamSocket};
use crate::proto::stream::{Flow, StreamProtocol};
use crate::proto::tls::Tls;

/// Bytes read from one stream per service; the rest waits for the next update.
const READ_BUDGET: usize = 256 * 1024;
/// How long a stream that finished may go without getting any of its last bytes out before it
/// is cut (a slow reader of a long answer keeps it as long as the bytes move).
const FINISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect and TLS handshake time limit when the caller sets none.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A client's non-blocking connect is in progress.
    Connecting,
    /// The TLS handshake is running.
    Handshaking,
    Ready,
    /// The socket is closed.
    Closed,
}

/// Where the stream's TLS session comes from when it connects.
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: String,
}

/// How to connect a client stream.
pub struct ConnectOptions {
    /// Connect plus TLS handshake time limit.
    pub timeout: Duration,
    pub nodelay: bool,
    pub ttl: Option<u32>,
    pub tls: Option<ClientTls>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions { timeout: DEFAULT_CONNECT_TIMEOUT, nodelay: true, ttl: None, tls: None }
    }
}

/// What happened while a stream was serviced, for the driver to turn into events.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Outcome {
    /// The transport just became ready (connected, TLS done).
    pub ready: bool,
    /// The protocol has news for the layer above.
    pub news: bool,
    /// Everything queued was written (after some was waiting).
    pub drained: bool,
}

pub struct Stream {
    socket: Option<StreamSocket>,
    tls: Option<Box<Tls>>,
    proto: Box<dyn StreamProtocol>,
    /// Bytes for the socket ahead of the protocol's: TLS records, or plaintext queued before a
    /// TLS upgrade.
    out: Vec<u8>,
    phase: Phase,
    /// When connecting or the TLS handshake must be done.
    ready_by: Option<Instant>,
    /// When the protocol asked to finish.
    finish_since: Option<Instant>,
    /// The protocol heard `handle_ready` for the current transport.
    ready_told: bool,
    /// It did since the last [`Outcome`].
    just_ready: bool,
    close_notify_sent: bool,
    pub peer: Address,
    pub local: Option<Address>,
    writable: bool,
    /// The poller saw the peer's end of stream or an error: read on until EOF.
    pub(super) hangup: bool,
    /// Reading stopped because the protocol wanted no more input.
    read_paused: bool,
    /// The read budget ran out with the socket not drained.
    backlog: bool,
    /// Output was waiting after the last write (for [`Outcome::drained`]).
    was_queued: bool,
    last_rx: Instant,
    last_tx: Instant,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Stream {
    fn new(socket: StreamSocket, peer: Address, proto: Box<dyn StreamProtocol>, now: Instant) -> Stream {
        Stream {
            local: socket.local_address(),
            socket: Some(socket),
            tls: None,
            proto,
            out: Vec::new(),
            phase: Phase::Ready,
            ready_by: None,
            finish_since: None,
            ready_told: false,
            just_ready: false,
            close_notify_sent: false,
            peer,
            writable: false,
            hangup: false,
            read_paused: false,
            backlog: false,
            was_queued: false,
            last_rx: now,
            last_tx: now,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// A stream accepted by a listener; with `tls` it is ready once the handshake is done.
    pub(super) fn accepted(
        socket: StreamSocket,
        peer: Address,
        proto: Box<dyn StreamProtocol>,
        tls: Option<&Arc<rustls::ServerConfig>>,
        now: Instant,
    ) -> io::Result<Stream> {
        let mut stream = Stream::new(socket, peer, proto, now);
        if let Some(config) = tls {
            stream.tls = Some(Box::new(Tls::server(config.clone()).map_err(io::Error::other)?));
            stream.phase = Phase::Handshaking;
            stream.ready_by = Some(now + DEFAULT_CONNECT_TIMEOUT);
        }
        Ok(stream)
    }

    /// A client stream whose connect is under way (or, for Unix sockets, done).
    pub(super) fn connecting(
        socket: StreamSocket,
        peer: Address,
        proto: Box<dyn StreamProtocol>,
        options: ConnectOptions,
        now: Instant,
    ) -> Result<Stream, String> {
        if options.nodelay {
            let _ = socket.set_nodelay(true);
        }
        if let Some(ttl) = options.ttl {
            socket.set_ttl(ttl).map_err(|e| format!("cannot set the TTL: {e}"))?;
        }
        let mut stream = Stream::new(socket, peer, proto, now);
        stream.phase = Phase::Connecting;
        stream.ready_by = Some(now + options.timeout);
        if let Some(tls) = options.tls {
            stream.tls =
                Some(Box::new(Tls::client(tls.config, &tls.server_name).map_err(|e| e.to_string())?));
        }
        Ok(stream)
    }

    pub(super) fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let interest = match self.phase {
            Phase::Connecting => Interest::READABLE | Interest::WRITABLE,
            _ => Interest::READABLE,
        };
        self.writable = interest.is_writable();
        match &mut self.socket {
            Some(socket) => registry.register(socket, token, interest),
            None => Ok(()),
        }
    }

    pub(super) fn deregister(&mut self, registry: &Registry) {
        if let Some(mut socket) = self.socket.take() {
            let _ = registry.deregister(&mut socket);
        }
    }

    /// The protocol object (downcast it to the type the layer above put there).
    pub fn proto(&mut self) -> &mut dyn StreamProtocol {
        &mut *self.proto
    }

    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_deref()
    }

    /// The transport is ready for data (connected, TLS done) and not closed.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// The socket is closed (the protocol keeps what it received).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// When data last came in / went out.
    pub fn last_rx(&self) -> Instant {
        self.last_rx
    }

    pub fn last_tx(&self) -> Instant {
        self.last_tx
    }

    /// Bytes waiting to be written to the socket.
    pub fn queued(&self) -> usize {
        self.out.len() + self.proto.outgoing().len()
    }

    #[cfg(unix)]
    pub fn fd(&self) -> Option<i32> {
        self.socket.as_ref().map(StreamSocket::fd)
    }

    /// Reading was paused for a protocol that now wants input again.
    pub(super) fn should_resume_reading(&self) -> bool {
        self.read_paused && self.proto.wants_input()
    }

    /// Hands the stream to another protocol (an HTTP connection upgraded to WebSocket): what
    /// the old one queued goes out first (through TLS when there is TLS); the new one gets
    /// `received`, bytes the old one had read and not used, and the peer's end of stream if it
    /// came already.
    pub(super) fn replace_proto(
        &mut self,
        proto: Box<dyn StreamProtocol>,
        received: &[u8],
        eof: bool,
        now: Instant,
    ) {
        let pending = self.proto.outgoing();
        let queued = match &mut self.tls {
            Some(tls) => tls.write_plaintext(pending),
            None => {
                self.out.extend_from_slice(pending);
                Ok(())
            }
        };
        let n = pending.len();
        self.proto.consume_outgoing(now, n);
        self.proto = proto;
        if let Err(e) = queued {
            return self.fail(now, &e.to_string());
        }
        self.proto.handle_bytes(now, received);
        if eof {
            self.proto.handle_eof(now);
        }
    }

    /// Adds TLS to a plain, ready stream: what the protocol queued so far goes out in plaintext
    /// first; `leftover` (bytes already read past the plaintext part) is the start of the
    /// peer's TLS records.
    pub(super) fn start_tls(&mut self, tls: Tls, leftover: &[u8], now: Instant) -> Result<(), String> {
        if self.tls.is_some() {
            return Err("the stream already uses TLS".into());
        }
        if self.phase != Phase::Ready {
            return Err("the stream is not connected".into());
        }
        let pending = self.proto.outgoing().len();
        self.out.extend_from_slice(self.proto.outgoing());
        self.proto.consume_outgoing(now, pending);
        self.tls = Some(Box::new(tls));
        self.phase = Phase::Handshaking;
        self.ready_told = false;
        self.ready_by = Some(now + DEFAULT_CONNECT_TIMEOUT);
        if !leftover.is_empty() {
            self.handle_ciphertext(leftover, now);
        }
        Ok(())
    }

    /// Handles readiness and deadlines: connects, reads, advances the protocol, writes, closes.
    pub(super) fn service(
        &mut self,
        registry: &Registry,
        token: Token,
        now: Instant,
        buf: &mut [u8],
    ) -> Outcome {
        let mut outcome = Outcome::default();
        if self.phase == Phase::Connecting {
            self.finish_connect(now);
        }
        self.read(now, buf);
        if self.ready_by.is_some_and(|at| now >= at)
            && matches!(self.phase, Phase::Connecting | Phase::Handshaking)
        {
            let what = if self.phase == Phase::Connecting { "connect" } else { "TLS handshake" };
            self.fail(now, &format!("{what} timed out"));
        }
        if self.proto.poll_timeout().is_some_and(|at| now >= at) {
            self.proto.handle_timeout(now);
        }
        self.check_ready(now);
        outcome.ready = std::mem::take(&mut self.just_ready);
        self.write(registry, token, now, &mut outcome);
        outcome.news = self.proto.take_news();
        outcome
    }

    /// Writes what the protocol queued (no reading).
    pub(super) fn flush(&mut self, registry: &Registry, token: Token, now: Instant) -> Outcome {
        let mut outcome = Outcome::default();
        self.write(registry, token, now, &mut outcome);
        outcome.news = self.proto.take_news();
        outcome
    }

    /// When this stream next needs servicing without I/O.
    pub(super) fn deadline(&self, now: Instant) -> Option<Instant> {
        if self.backlog {
            return Some(now);
        }
        let mut at = self.proto.poll_timeout();
        let transport = match self.phase {
            Phase::Connecting | Phase::Handshaking => self.ready_by,
            Phase::Ready if !self.ready_told => Some(now),
            Phase::Ready => self.finish_since.map(|since| since + FINISH_TIMEOUT),
            Phase::Closed => None,
        };
        if let Some(t) = transport {
            at = Some(at.map_or(t, |a| a.min(t)));
        }
        at
    }

    fn finish_connect(&mut self, now: Instant) {
        let Some(socket) = &self.socket else { return };
        match socket.take_error() {
            Ok(Some(e)) | Err(e) => return self.fail(now, &format!("cannot connect to {}: {e}", self.peer)),
            Ok(None) => {}
        }
        if !socket.is_connected() {
            return; // still connecting: wait for the next writable event
        }
        self.local = socket.local_address();
        self.last_rx = now;
        self.phase = if self.tls.is_some() { Phase::Handshaking } else { Phase::Ready };
    }

    /// Tells the protocol once the transport is ready (connected, TLS handshake done).
    fn check_ready(&mut self, now: Instant) {
        if self.phase == Phase::Handshaking && self.tls.as_ref().is_some_and(|t| t.is_handshake_complete()) {
            self.phase = Phase::Ready;
        }
        if self.phase == Phase::Ready && !self.ready_told {
            self.ready_told = true;
            self.just_ready = true;
            self.ready_by = None;
            self.proto.handle_ready(now);
        }
    }

    fn wants_input(&self) -> bool {
        match self.phase {
            Phase::Handshaking => true,
            Phase::Ready => self.proto.wants_input() && self.proto.flow() == Flow::Open,
            Phase::Connecting | Phase::Closed => false,
        }
    }

    /// Reads what the socket has. A short read means the socket is drained (a stream socket
    /// reports more data with a new edge), which saves the `WouldBlock` read per message; only a
    /// hang-up needs reading on to end of stream.
    fn read(&mut self, now: Instant, buf: &mut [u8]) {
        let mut budget = READ_BUDGET;
        self.backlog = false;
        loop {
            if !self.wants_input() {
                self.read_paused = matches!(self.phase, Phase::Ready | Phase::Handshaking);
                return;
            }
            let Some(socket) = &mut self.socket else { return };
            let n = match socket.read(buf) {
                Ok(0) => return self.handle_eof(now),
                Ok(n) => n,
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.fail(now, &format!("connection error: {e}")),
            };
            self.last_rx = now;
            self.bytes_in += n as u64;
            if self.tls.is_some() {
                self.handle_ciphertext(&buf[..n], now);
            } else {
                self.proto.handle_bytes(now, &buf[..n]);
            }
            if n < buf.len() && !self.hangup {
                break;
            }
            budget = budget.saturating_sub(n);
            if budget == 0 {
                self.backlog = true;
                break;
            }
        }
        self.read_paused = false;
    }

    fn handle_ciphertext(&mut self, data: &[u8], now: Instant) {
        let Some(tls) = &mut self.tls else { return };
        if let Err(e) = tls.handle_ciphertext(data) {
            return self.fail(now, &e.to_string());
        }
        if tls.plaintext_len() > 0 {
            let mut plain = Vec::new();
            tls.read_plaintext(&mut plain);
            // The handshake may finish with application data in the same read.
            self.check_ready(now);
            self.proto.handle_bytes(now, &plain);
        }
    }

    fn handle_eof(&mut self, now: Instant) {
        if let Some(tls) = &mut self.tls {
            tls.handle_eof();
        }
        self.read_paused = false;
        if matches!(self.phase, Phase::Connecting | Phase::Handshaking) {
            return self.fail(now, "connection closed during the handshake");
        }
        self.proto.handle_eof(now);
    }

    /// The transport failed: the protocol hears why, the socket is dropped.
    fn fail(&mut self, now: Instant, why: &str) {
        self.out.clear();
        self.socket = None;
        self.phase = Phase::Closed;
        self.proto.handle_error(now, why);
    }

    fn pending(&self) -> bool {
        !self.out.is_empty()
            || !self.proto.outgoing().is_empty()
            || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Writes what is pending until the socket would block; closes it when the protocol is done.
    fn write(&mut self, registry: &Registry, token: Token, now: Instant, outcome: &mut Outcome) {
        let Some(socket) = &mut self.socket else { return };
        let flow = self.proto.flow();
        if flow == Flow::Abort {
            socket.set_reset_on_close();
            return self.close(registry, now);
        }
        if self.phase != Phase::Connecting {
            if let Err(e) = self.write_out(now) {
                return self.fail(now, &format!("connection error: {e}"));
            }
        }
        let pending = self.pending();
        if flow == Flow::Finish {
            // Counted from the last write that made progress.
            let since = self.finish_since.map_or(now, |s| s.max(self.last_tx));
            self.finish_since = Some(since);
            if !pending {
                if let (Some(tls), false) = (&mut self.tls, self.close_notify_sent) {
                    self.close_notify_sent = true;
                    tls.send_close_notify();
                    return self.write(registry, token, now, outcome);
                }
                return self.close(registry, now);
            }
            if now >= since + FINISH_TIMEOUT {
                return self.close(registry, now);
            }
        }
        if self.was_queued && !pending {
            outcome.drained = true;
        }
        self.was_queued = pending;
        let want = pending || self.phase == Phase::Connecting;
        if want != self.writable {
            self.writable = want;
            let interest = if want { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            if let Some(socket) = &mut self.socket {
                let _ = registry.reregister(socket, token, interest);
            }
        }
    }

    /// Writes `out`, then the protocol's bytes (through TLS when there is TLS).
    fn write_out(&mut self, now: Instant) -> io::Result<()> {
        let socket = self.socket.as_mut().expect("write_out needs the socket");
        let mut written = 0;
        let result = loop {
            if let Some(tls) = &mut self.tls {
                tls.take_ciphertext(&mut self.out);
            }
            if !self.out.is_empty() {
                let n = match write_some(socket, &self.out) {
                    Ok(n) => n,
                    Err(e) => break Err(e),
                };
                self.out.drain(..n);
                written += n;
                if !self.out.is_empty() {
                    break Ok(()); // the socket pushes back
                }
            }
            let data = self.proto.outgoing();
            if data.is_empty() {
                break Ok(());
            }
            let len = data.len();
            match &mut self.tls {
                // Plaintext goes to TLS only once the previous records are out, so the protocol's
                // own bound on queued output is what limits memory.
                Some(tls) => {
                    if let Err(e) = tls.write_plaintext(data) {
                        break Err(io::Error::other(e));
                    }
                    self.proto.consume_outgoing(now, len);
                }
                None => {
                    let n = match write_some(socket, data) {
                        Ok(n) => n,
                        Err(e) => break Err(e),
                    };
                    self.proto.consume_outgoing(now, n);
                    written += n;
                    if n < len {
                        break Ok(());
                    }
                }
            }
        };
        if written > 0 {
            self.bytes_out += written as u64;
            self.last_tx = now;
        }
        result
    }

    fn close(&mut self, registry: &Registry, now: Instant) {
        if let Some(socket) = &self.socket {
            socket.shutdown_write();
        }
        self.deregister(registry);
        self.out.clear();
        self.phase = Phase::Closed;
        self.proto.handle_closed(now);
    }
}

fn write_some(socket: &mut StreamSocket, mut data: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while !data.is_empty() {
        match socket.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n;
                data = &data[n..];
            }
            Err(e) if would_block(&e) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}
