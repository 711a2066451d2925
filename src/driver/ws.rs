//! WebSocket streams over TCP, optionally TLS: the I/O half. The protocol lives in `proto::ws`;
//! this moves bytes between a socket and those state machines, keeps each stream's deadlines
//! (upgrade, connect, closing handshake, keep-alive) and queues received messages for `receive`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

use crate::proto::ws::{
    AcceptedUpgrade, ClientHandshake, Opcode, Role, ServerHandshake, ServerUpgrade, Tls, UpgradeLimits,
    WsConfig, WsConn, WsEvent, WsUrl,
};

/// A client that has not finished its upgrade request by then is dropped (slowloris).
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting, the TLS handshake and the upgrade of a client must finish by then.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing handshake may take before the connection is cut.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that moved nothing for this long gives back the buffers it kept for traffic.
pub const IDLE_TRIM: Duration = Duration::from_secs(2);
/// Received data held for a handler that is not receiving; past it the socket is left unread
/// and TCP flow control pushes back on the peer.
const INBOX_LIMIT: usize = 1 << 20;

/// Per-app settings shared by a listener's streams.
#[derive(Clone, Debug)]
pub struct Settings {
    pub ws: WsConfig,
    /// Send a ping after this much silence from the peer (`None`: no keep-alive).
    pub ping_interval: Option<Duration>,
    /// A peer that sends nothing for this long after our ping is dead.
    pub ping_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { ws: WsConfig::default(), ping_interval: None, ping_timeout: Duration::from_secs(20) }
    }
}

pub struct Listener {
    pub socket: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handlers: Arc<[String]>,
    settings: Arc<Settings>,
}

impl Listener {
    pub fn new(
        socket: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        handlers: Vec<String>,
        settings: Settings,
    ) -> Listener {
        Listener { socket, tls, handlers: handlers.into(), settings: Arc::new(settings) }
    }
}

enum Phase {
    Connecting {
        request: Vec<u8>,
        handshake: ClientHandshake,
    },
    ClientUpgrade(ClientHandshake),
    ServerUpgrade(ServerHandshake),
    Open(Box<WsConn>),
    /// Nothing more is read; the socket closes once the pending bytes are out.
    Finished,
}

/// What an accepted upgrade told us, kept for the Lua side (`ws.raw_socket`, handler choice).
#[derive(Clone, Debug, Default)]
pub struct UpgradeInfo {
    pub handler: String,
    pub protocol: Option<String>,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
}

/// A received message or the end of the connection, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    Message(Opcode, tungstenite::Bytes),
    Closed { code: u16, reason: String, clean: bool },
}

pub struct Stream {
    socket: Option<TcpStream>,
    tls: Option<Box<Tls>>,
    phase: Phase,
    /// Bytes for the socket that are not part of the WebSocket stream yet (upgrade request or
    /// response, TLS records).
    out: Vec<u8>,
    inbox: VecDeque<Received>,
    inbox_bytes: usize,
    /// The listener (server side) or the client app's own handle.
    pub owner: Option<super::Key>,
    pub peer: SocketAddr,
    pub local: Option<SocketAddr>,
    pub upgrade: UpgradeInfo,
    handlers: Arc<[String]>,
    settings: Arc<Settings>,
    started: Instant,
    last_rx: Instant,
    /// Last time `send`/`close` output was written.
    last_tx: Instant,
    /// When to look at trimming the connection's buffers ([`IDLE_TRIM`]).
    trim_at: Option<Instant>,
    ping_sent: Option<Instant>,
    closing_since: Option<Instant>,
    closed: bool,
    writable: bool,
    /// Reading stopped because the inbox or the connection's input buffer is full.
    read_paused: bool,
    /// The upgrade completed (the layer above knows this stream).
    known: bool,
    /// The poller saw the peer's end of stream or an error: read on until EOF.
    pub(super) hangup: bool,
    /// In the driver's list of streams to write at the end of the update (any write clears it).
    pub(super) flush_due: bool,
}

/// Events streams report, in order.
pub type WsEvents = VecDeque<WsIo>;

/// What a stream reports to the layer above.
#[derive(Debug, Clone, PartialEq)]
pub enum WsIo {
    /// A server stream completed its upgrade.
    Accepted { conn: super::Key, listener: super::Key },
    /// A server stream's upgrade was refused (an HTTP error was sent).
    Rejected { listener: super::Key, peer: SocketAddr, reason: String },
    /// A client stream completed its upgrade.
    Opened { conn: super::Key },
    /// New messages (or the end) are in the stream's inbox.
    Inbox { conn: super::Key },
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Stream {
    fn new(
        socket: TcpStream,
        peer: SocketAddr,
        phase: Phase,
        settings: Arc<Settings>,
        now: Instant,
    ) -> Stream {
        Stream {
            local: socket.local_addr().ok(),
            socket: Some(socket),
            tls: None,
            phase,
            out: Vec::new(),
            inbox: VecDeque::new(),
            inbox_bytes: 0,
            owner: None,
            peer,
            upgrade: UpgradeInfo::default(),
            handlers: Arc::from(Vec::new()),
            settings,
            started: now,
            last_rx: now,
            last_tx: now,
            trim_at: None,
            ping_sent: None,
            closing_since: None,
            closed: false,
            writable: false,
            read_paused: false,
            known: false,
            hangup: false,
            flush_due: false,
        }
    }

    /// A server-side stream that was just accepted.
    pub fn accepted(
        listener: &Listener,
        socket: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) -> io::Result<Stream> {
        socket.set_nodelay(true)?;
        let phase = Phase::ServerUpgrade(ServerHandshake::new(UpgradeLimits::default()));
        let mut stream = Stream::new(socket, peer, phase, listener.settings.clone(), now);
        stream.handlers = listener.handlers.clone();
        if let Some(config) = &listener.tls {
            stream.tls = Some(Box::new(Tls::server(config.clone()).map_err(io::Error::other)?));
        }
        Ok(stream)
    }

    /// A client stream connecting to `addr` (completion is reported by a writable event).
    pub fn connect(
        addr: SocketAddr,
        url: &WsUrl,
        protocols: &[&str],
        key: [u8; 16],
        tls: Option<Arc<rustls::ClientConfig>>,
        settings: Settings,
        now: Instant,
    ) -> Result<Stream, String> {
        let socket = TcpStream::connect(addr).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let (handshake, request) = ClientHandshake::new(url, protocols, key).map_err(|e| e.to_string())?;
        let mut stream =
            Stream::new(socket, addr, Phase::Connecting { request, handshake }, Arc::new(settings), now);
        if let Some(config) = tls {
            stream.tls = Some(Box::new(Tls::client(config, &url.host).map_err(|e| e.to_string())?));
        }
        Ok(stream)
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let interest = match self.phase {
            Phase::Connecting { .. } => Interest::READABLE | Interest::WRITABLE,
            _ => Interest::READABLE,
        };
        self.writable = interest.is_writable();
        match &mut self.socket {
            Some(socket) => registry.register(socket, token, interest),
            None => Ok(()),
        }
    }

    pub fn deregister(&mut self, registry: &Registry) {
        if let Some(mut socket) = self.socket.take() {
            let _ = registry.deregister(&mut socket);
        }
    }

    /// A server stream whose socket is gone before its upgrade completed.
    pub fn is_orphan(&self) -> bool {
        !self.known && self.owner.is_some() && self.socket.is_none()
    }

    pub fn is_open(&self) -> bool {
        matches!(&self.phase, Phase::Open(conn) if conn.can_send())
    }

    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_deref()
    }

    #[cfg(unix)]
    pub fn fd(&self) -> Option<i32> {
        use std::os::fd::AsRawFd;
        self.socket.as_ref().map(|s| s.as_raw_fd())
    }

    /// Handles readiness and deadlines: reads, advances the protocol, writes, closes.
    pub fn service(
        &mut self,
        key: super::Key,
        registry: &Registry,
        now: Instant,
        io: &mut WsEvents,
        buf: &mut [u8],
    ) {
        if let Phase::Connecting { .. } = self.phase {
            self.finish_connect(now);
        }
        self.read(key, now, io, buf);
        self.check_deadlines(now);
        self.pump(key, io);
        self.flush(key, registry);
        self.arm_trim(now);
    }

    /// Writes what `send`/`close` queued (no reading).
    pub fn write(&mut self, key: super::Key, registry: &Registry, now: Instant, io: &mut WsEvents) {
        self.last_tx = now;
        self.flush_due = false;
        self.flush(key, registry);
        self.pump(key, io);
        self.arm_trim(now);
    }

    /// Plans a look at the buffers once traffic made them grow.
    fn arm_trim(&mut self, now: Instant) {
        if self.trim_at.is_none() && matches!(&self.phase, Phase::Open(conn) if conn.has_spare_buffers()) {
            self.trim_at = Some(now + IDLE_TRIM);
        }
    }

    fn finish_connect(&mut self, now: Instant) {
        let Some(socket) = &self.socket else { return };
        match socket.take_error() {
            Ok(Some(e)) | Err(e) => return self.fail(1006, &format!("cannot connect to {}: {e}", self.peer)),
            Ok(None) => {}
        }
        if socket.peer_addr().is_err() {
            return; // still connecting: wait for the next writable event
        }
        let _ = socket.set_nodelay(true);
        self.local = socket.local_addr().ok();
        self.last_rx = now;
        let Phase::Connecting { request, handshake } = std::mem::replace(&mut self.phase, Phase::Finished)
        else {
            return;
        };
        self.phase = Phase::ClientUpgrade(handshake);
        self.queue_plain(&request);
    }

    fn wants_input(&self) -> bool {
        match &self.phase {
            Phase::Connecting { .. } | Phase::Finished => false,
            Phase::Open(conn) => conn.wants_input() && self.inbox_bytes < INBOX_LIMIT,
            _ => true,
        }
    }

    /// Reads what the socket has. A short read means the socket is drained (a stream socket
    /// reports more data with a new edge), which saves the `WouldBlock` read per message; only a
    /// hang-up needs reading on to end of stream.
    fn read(&mut self, key: super::Key, now: Instant, io: &mut WsEvents, buf: &mut [u8]) {
        let mut plain = Vec::new();
        loop {
            if !self.wants_input() {
                self.read_paused = self.socket.is_some() && !matches!(self.phase, Phase::Finished);
                return;
            }
            let Some(socket) = &mut self.socket else { return };
            let n = match socket.read(buf) {
                Ok(0) => return self.handle_eof(),
                Ok(n) => n,
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.fail(1006, &format!("connection error: {e}")),
            };
            self.last_rx = now;
            match &mut self.tls {
                Some(tls) => {
                    if let Err(e) = tls.handle_ciphertext(&buf[..n]) {
                        return self.fail(1006, &e.to_string());
                    }
                    plain.clear();
                    tls.read_plaintext(&mut plain);
                    self.handle_plain(key, &plain, io);
                }
                None => self.handle_plain(key, &buf[..n], io),
            }
            if n < buf.len() && !self.hangup {
                break;
            }
        }
        self.read_paused = false;
    }

    fn handle_plain(&mut self, key: super::Key, data: &[u8], io: &mut WsEvents) {
        if data.is_empty() {
            return;
        }
        match &mut self.phase {
            Phase::ServerUpgrade(handshake) => {
                let handlers = self.handlers.clone();
                match handshake.handle_bytes(data, |name| handlers.iter().any(|h| h == name)) {
                    ServerUpgrade::Incomplete => {}
                    ServerUpgrade::Accept(up) => self.accept(key, *up, io),
                    ServerUpgrade::Reject(rejection) => {
                        self.queue_plain(&rejection.response);
                        self.phase = Phase::Finished;
                        if let Some(listener) = self.owner {
                            io.push_back(WsIo::Rejected {
                                listener,
                                peer: self.peer,
                                reason: rejection.reason,
                            });
                        }
                    }
                }
            }
            Phase::ClientUpgrade(handshake) => match handshake.handle_bytes(data) {
                Ok(None) => {}
                Ok(Some(up)) => {
                    self.upgrade.protocol = up.protocol;
                    self.upgrade.headers = up.headers;
                    self.phase =
                        Phase::Open(Box::new(WsConn::new(Role::Client, self.settings.ws, &up.leftover)));
                    io.push_back(WsIo::Opened { conn: key });
                }
                Err(e) => self.fail(1006, &format!("upgrade failed: {e}")),
            },
            Phase::Open(conn) => conn.handle_bytes(data),
            Phase::Connecting { .. } | Phase::Finished => {}
        }
    }

    fn accept(&mut self, key: super::Key, up: AcceptedUpgrade, io: &mut WsEvents) {
        self.queue_plain(&up.response);
        self.phase = Phase::Open(Box::new(WsConn::new(Role::Server, self.settings.ws, &up.leftover)));
        self.upgrade = UpgradeInfo {
            handler: up.handler,
            protocol: up.protocol,
            path: up.path,
            query: up.query,
            headers: up.headers,
        };
        if let Some(listener) = self.owner {
            self.known = true;
            io.push_back(WsIo::Accepted { conn: key, listener });
        }
    }

    fn handle_eof(&mut self) {
        if let Some(tls) = &mut self.tls {
            tls.handle_eof();
        }
        match &mut self.phase {
            Phase::Open(conn) => conn.handle_eof(),
            Phase::Finished => {}
            _ => self.fail(1006, "connection closed during the handshake"),
        }
        self.read_paused = false;
        if let Some(socket) = &self.socket {
            let _ = socket.shutdown(std::net::Shutdown::Read);
        }
    }

    /// Ends the stream with a close code that only this side knows (transport or handshake failure).
    fn fail(&mut self, code: u16, reason: &str) {
        if let Phase::Open(conn) = &mut self.phase {
            conn.abort(reason);
            return;
        }
        if !self.closed {
            self.push_inbox(Received::Closed { code, reason: reason.to_owned(), clean: false });
            self.closed = true;
        }
        self.phase = Phase::Finished;
        self.out.clear();
    }

    fn push_inbox(&mut self, received: Received) {
        if let Received::Message(_, data) = &received {
            self.inbox_bytes += data.len();
        }
        self.inbox.push_back(received);
    }

    fn check_deadlines(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::ServerUpgrade(_) if now >= self.started + UPGRADE_TIMEOUT => {
                self.phase = Phase::Finished;
                self.out.clear();
                if let Some(socket) = self.socket.take() {
                    drop(socket); // a half-open upgrade gets no answer
                }
            }
            Phase::Connecting { .. } | Phase::ClientUpgrade(_) if now >= self.started + CONNECT_TIMEOUT => {
                self.fail(1006, "connect timed out")
            }
            Phase::Open(conn) => {
                if self.trim_at.is_some_and(|at| now >= at) {
                    let quiet_since = self.last_rx.max(self.last_tx);
                    if now >= quiet_since + IDLE_TRIM {
                        conn.trim();
                        self.trim_at = None;
                    } else {
                        self.trim_at = Some(quiet_since + IDLE_TRIM);
                    }
                }
                if conn.is_closing() {
                    let since = *self.closing_since.get_or_insert(now);
                    if now >= since + CLOSE_TIMEOUT {
                        conn.abort("closing handshake timed out");
                    }
                } else if let Some(interval) = self.settings.ping_interval {
                    match self.ping_sent {
                        Some(sent) if self.last_rx > sent => self.ping_sent = None,
                        Some(sent) if now >= sent + self.settings.ping_timeout => {
                            conn.abort("keep-alive timeout: no answer to ping")
                        }
                        Some(_) => {}
                        None if now >= self.last_rx + interval && conn.ping(b"luna").is_ok() => {
                            self.ping_sent = Some(now);
                        }
                        None => {}
                    }
                }
            }
            Phase::Finished
                if !self.out.is_empty() && now >= self.started.max(self.last_rx) + CLOSE_TIMEOUT =>
            {
                self.out.clear(); // the peer stopped reading: give up on the last bytes
            }
            _ => {}
        }
    }

    /// Moves events from the connection into the inbox while it has room.
    fn pump(&mut self, key: super::Key, io: &mut WsEvents) {
        let mut new = false;
        if let Phase::Open(conn) = &mut self.phase {
            while self.inbox_bytes < INBOX_LIMIT {
                match conn.poll_event() {
                    Some(WsEvent::Message { opcode, data }) => {
                        self.inbox_bytes += data.len();
                        self.inbox.push_back(Received::Message(opcode, data));
                    }
                    Some(WsEvent::Closed { code, reason, clean }) => {
                        self.inbox.push_back(Received::Closed { code, reason, clean });
                        self.closed = true;
                        new = true;
                        break;
                    }
                    None => break,
                }
                new = true;
            }
            if conn.is_closed() && !conn.wants_write() {
                self.phase = Phase::Finished;
            }
        }
        if (new || (self.closed && !self.inbox.is_empty())) && !self.inbox.is_empty() {
            io.push_back(WsIo::Inbox { conn: key });
        }
    }

    /// Plaintext for the peer outside the WebSocket stream (upgrade request/response).
    fn queue_plain(&mut self, data: &[u8]) {
        match &mut self.tls {
            Some(tls) => {
                let _ = tls.write_plaintext(data);
            }
            None => self.out.extend_from_slice(data),
        }
    }

    /// Writes what is pending until the socket would block; closes it when all is done.
    fn flush(&mut self, key: super::Key, registry: &Registry) {
        if self.socket.is_none() {
            return;
        }
        // WebSocket bytes go behind anything already queued; with TLS only once the previous
        // records are out, so the connection's outgoing bound is what limits memory.
        if let Phase::Open(conn) = &mut self.phase {
            if conn.outgoing_len() > 0 {
                match &mut self.tls {
                    Some(tls) if !tls.wants_write() => {
                        let _ = tls.write_plaintext(conn.outgoing());
                        let n = conn.outgoing_len();
                        conn.consume_outgoing(n);
                    }
                    Some(_) => {}
                    None if self.out.is_empty() => {
                        let written = write_some(self.socket.as_mut().unwrap(), conn.outgoing());
                        match written {
                            Ok(n) => conn.consume_outgoing(n),
                            Err(e) => return self.fail(1006, &format!("connection error: {e}")),
                        }
                    }
                    None => {}
                }
            }
        }
        if matches!(self.phase, Phase::Finished) {
            if let Some(tls) = &mut self.tls {
                tls.send_close_notify();
            }
        }
        if let Some(tls) = &mut self.tls {
            tls.take_ciphertext(&mut self.out);
        }
        if !self.out.is_empty() {
            match write_some(self.socket.as_mut().unwrap(), &self.out) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) => {
                    self.out.clear();
                    return self.fail(1006, &format!("connection error: {e}"));
                }
            }
        }
        let conn_pending = matches!(&self.phase, Phase::Open(conn) if conn.outgoing_len() > 0);
        let pending =
            !self.out.is_empty() || conn_pending || self.tls.as_ref().is_some_and(|t| t.wants_write());
        if matches!(self.phase, Phase::Finished) && !pending {
            if let Some(mut socket) = self.socket.take() {
                let _ = socket.flush();
                let _ = registry.deregister(&mut socket);
            }
            return;
        }
        let connecting = matches!(self.phase, Phase::Connecting { .. });
        if pending || connecting {
            if !self.writable {
                self.writable = true;
                if let Some(socket) = &mut self.socket {
                    let _ = registry.reregister(socket, key.token(), Interest::READABLE | Interest::WRITABLE);
                }
            }
        } else if self.writable {
            self.writable = false;
            if let Some(socket) = &mut self.socket {
                let _ = registry.reregister(socket, key.token(), Interest::READABLE);
            }
        }
    }

    /// When this stream next needs servicing without I/O.
    pub fn deadline(&self) -> Option<Instant> {
        self.socket.as_ref()?;
        match &self.phase {
            Phase::ServerUpgrade(_) => Some(self.started + UPGRADE_TIMEOUT),
            Phase::Connecting { .. } | Phase::ClientUpgrade(_) => Some(self.started + CONNECT_TIMEOUT),
            Phase::Open(conn) if conn.is_closing() => {
                Some(self.closing_since.map_or(self.last_rx, |s| s) + CLOSE_TIMEOUT)
            }
            Phase::Open(_) => {
                let ping = self.settings.ping_interval.map(|interval| match self.ping_sent {
                    Some(sent) => sent + self.settings.ping_timeout,
                    None => self.last_rx + interval,
                });
                [ping, self.trim_at].into_iter().flatten().min()
            }
            Phase::Finished => Some(self.started.max(self.last_rx) + CLOSE_TIMEOUT),
        }
    }

    /// Reading was paused for a full inbox that has since drained.
    pub fn should_resume_reading(&self) -> bool {
        self.read_paused && self.wants_input()
    }

    /// The next received message or the end of the stream (which stays, so every later call
    /// sees it too). `None` while nothing is there.
    pub fn receive(&mut self) -> Option<Received> {
        match self.inbox.front()? {
            Received::Closed { .. } => self.inbox.front().cloned(),
            Received::Message(_, data) => {
                self.inbox_bytes -= data.len();
                self.inbox.pop_front()
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// How the stream ended (code, reason, clean), once it has; messages received before the
    /// end stay in the inbox.
    pub fn end(&self) -> Option<(u16, &str, bool)> {
        match self.inbox.back()? {
            Received::Closed { code, reason, clean } => Some((*code, reason, *clean)),
            Received::Message(..) => None,
        }
    }

    /// Bytes waiting to be written to the socket.
    pub fn queued_len(&self) -> usize {
        let conn = match &self.phase {
            Phase::Open(conn) => conn.outgoing_len(),
            _ => 0,
        };
        self.out.len() + conn
    }

    /// Queues a message; `Err` carries a readable reason (closed, backpressure).
    pub fn send(&mut self, opcode: Opcode, data: &[u8]) -> Result<(), String> {
        match &mut self.phase {
            Phase::Open(conn) => conn.send(opcode, data).map_err(|e| e.to_string()),
            _ => Err("the connection is not open".into()),
        }
    }

    /// Queues a frame encoded once for many connections (server side only).
    pub fn send_encoded(&mut self, frame: &[u8]) -> Result<(), String> {
        match &mut self.phase {
            Phase::Open(conn) => conn.send_encoded(frame).map_err(|e| e.to_string()),
            _ => Err("the connection is not open".into()),
        }
    }

    /// Starts the closing handshake (or drops a stream that is not open yet).
    pub fn close(&mut self, code: u16, reason: &str) {
        match &mut self.phase {
            Phase::Open(conn) => {
                if conn.close(code, reason).is_err() {
                    conn.abort(reason);
                }
            }
            _ => self.fail(code, reason),
        }
    }
}

fn write_some(socket: &mut TcpStream, mut data: &[u8]) -> io::Result<usize> {
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
