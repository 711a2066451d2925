//! A WebSocket session as a stream protocol: the upgrade (either side), the connection, the
//! inbox of received messages, and the session's clocks (upgrade and connect timeouts, the
//! closing handshake's timeout, keep-alive pings, giving back buffers once idle). The driver
//! runs it like any [`StreamProtocol`]; the layer above reads the inbox with
//! [`WsSession::receive`] and sends with [`WsSession::send`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    AcceptedUpgrade, ClientHandshake, Contexts, DeflateConfig, Opcode, Role, ServerHandshake, ServerUpgrade,
    UpgradeLimits, WsConfig, WsConn, WsEvent, WsUrl,
};
use crate::proto::stream::{Flow, StreamProtocol};

/// A client that has not finished its upgrade request by then is dropped (slowloris).
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// The upgrade of a client (after connecting) must finish by then.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing handshake may take before the connection is cut.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that moved nothing for this long gives back the buffers it kept for traffic.
pub const IDLE_TRIM: Duration = Duration::from_secs(2);
/// Received data held for a handler that is not receiving (the default of
/// [`Settings::inbox_limit`]).
pub const INBOX_LIMIT: usize = 1 << 20;

/// Per-app settings shared by a server's sessions.
#[derive(Clone, Debug)]
pub struct Settings {
    pub ws: WsConfig,
    /// Send a ping after this much silence from the peer (`None`: no keep-alive).
    pub ping_interval: Option<Duration>,
    /// A peer that sends nothing for this long after our ping is dead.
    pub ping_timeout: Duration,
    /// Received bytes held for a handler that is not receiving; past it the socket is left
    /// unread and TCP flow control pushes back on the peer.
    pub inbox_limit: usize,
    /// permessage-deflate, when the app allows (server) or offers (client) it, with the count
    /// of a server's connections that keep their own compression contexts.
    pub deflate: Option<(DeflateConfig, Arc<Contexts>)>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ws: WsConfig::default(),
            ping_interval: None,
            ping_timeout: Duration::from_secs(20),
            inbox_limit: INBOX_LIMIT,
            deflate: None,
        }
    }
}

/// What an accepted upgrade told us, kept for the layer above (handler choice, `raw_socket`).
#[derive(Clone, Debug, Default)]
pub struct UpgradeInfo {
    pub handler: String,
    pub protocol: Option<String>,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
}

/// A received message or the end of the session, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    Message(Opcode, tungstenite::Bytes),
    Closed { code: u16, reason: String, clean: bool },
}

enum Phase {
    /// A client waiting for its transport; the request goes out once it is ready.
    Connecting {
        request: Vec<u8>,
        handshake: ClientHandshake,
    },
    ClientUpgrade(ClientHandshake),
    ServerUpgrade(ServerHandshake),
    Open(Box<WsConn>),
    /// Nothing more is read; the transport closes once the pending bytes are out.
    Finished,
    /// Close the transport at once (a half-open upgrade gets no answer).
    Dropped,
}

/// A WebSocket session. See the module documentation.
pub struct WsSession {
    phase: Phase,
    /// Bytes for the peer ahead of the connection's (upgrade request or response).
    head: Vec<u8>,
    head_pos: usize,
    inbox: VecDeque<Received>,
    inbox_bytes: usize,
    upgrade: UpgradeInfo,
    /// Server: the handler names an upgrade may ask for.
    handlers: Arc<[String]>,
    settings: Arc<Settings>,
    started: Instant,
    last_rx: Instant,
    /// Something was sent since the last idle check.
    sent: bool,
    quiet_since: Instant,
    /// When to look at trimming the connection's buffers ([`IDLE_TRIM`]).
    trim_at: Option<Instant>,
    ping_sent: Option<Instant>,
    closing_since: Option<Instant>,
    closed: bool,
    /// The connection stopped reading input because the peer does not read its output.
    stalled: bool,
    /// The upgrade completed (and stays true after the session ended).
    established: bool,
    /// Server: the upgrade completed (`true` once; see [`WsSession::take_upgraded`]).
    upgraded: bool,
    /// Client: the upgrade completed since the last [`WsSession::take_opened`].
    opened: bool,
    /// Server: why an upgrade was refused (for the app's log).
    rejection: Option<String>,
    news: bool,
    /// Messages taken from the inbox and messages queued to send, for `ws:stats()`.
    pub messages_in: u64,
    pub messages_out: u64,
}

impl WsSession {
    fn new(phase: Phase, settings: Arc<Settings>, now: Instant) -> WsSession {
        WsSession {
            phase,
            head: Vec::new(),
            head_pos: 0,
            inbox: VecDeque::new(),
            inbox_bytes: 0,
            upgrade: UpgradeInfo::default(),
            handlers: Arc::from(Vec::new()),
            settings,
            started: now,
            last_rx: now,
            sent: false,
            quiet_since: now,
            trim_at: None,
            ping_sent: None,
            closing_since: None,
            closed: false,
            stalled: false,
            established: false,
            upgraded: false,
            opened: false,
            rejection: None,
            news: false,
            messages_in: 0,
            messages_out: 0,
        }
    }

    /// A server session waiting for an upgrade request naming one of `handlers`.
    pub fn server(handlers: Arc<[String]>, settings: Arc<Settings>, now: Instant) -> WsSession {
        let phase = Phase::ServerUpgrade(ServerHandshake::new(UpgradeLimits::default()));
        let mut session = WsSession::new(phase, settings, now);
        session.handlers = handlers;
        session
    }

    /// A client session that sends its upgrade request once the transport is ready.
    pub fn client(
        url: &WsUrl,
        protocols: &[&str],
        key: [u8; 16],
        settings: Arc<Settings>,
        now: Instant,
    ) -> Result<WsSession, super::Error> {
        let deflate = settings.deflate.as_ref().map(|(config, _)| config);
        let (handshake, request) = ClientHandshake::new(url, protocols, key, deflate)?;
        Ok(WsSession::new(Phase::Connecting { request, handshake }, settings, now))
    }

    /// The upgrade's details (server: once [`take_upgraded`](Self::take_upgraded) said so).
    pub fn upgrade(&self) -> &UpgradeInfo {
        &self.upgrade
    }

    /// Server: true once, after the upgrade completed.
    pub fn take_upgraded(&mut self) -> bool {
        std::mem::take(&mut self.upgraded)
    }

    /// Client: true once, after the upgrade completed.
    pub fn take_opened(&mut self) -> bool {
        std::mem::take(&mut self.opened)
    }

    /// Server: why the upgrade was refused (once).
    pub fn take_rejection(&mut self) -> Option<String> {
        self.rejection.take()
    }

    /// Whether the upgrade completed at some point.
    pub fn is_established(&self) -> bool {
        self.established
    }

    pub fn is_open(&self) -> bool {
        matches!(&self.phase, Phase::Open(conn) if conn.can_send())
    }

    /// Whether the session ended (its `Closed` is in the inbox).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The next received message or the end of the session (which stays, so every later call
    /// sees it too). `None` while nothing is there.
    pub fn receive(&mut self) -> Option<Received> {
        let received = match self.inbox.front()? {
            Received::Closed { .. } => return self.inbox.front().cloned(),
            Received::Message(_, data) => {
                self.inbox_bytes -= data.len();
                self.messages_in += 1;
                self.inbox.pop_front()
            }
        };
        if self.inbox.is_empty() {
            // Room again: move what the connection holds into the inbox.
            self.pump();
        }
        received
    }

    /// Whether a message waits to be taken by [`WsSession::receive`] (not just the end).
    pub fn has_message(&self) -> bool {
        matches!(self.inbox.front(), Some(Received::Message(..)))
    }

    /// How the session ended (code, reason, clean), once it has; messages received before the
    /// end stay in the inbox.
    pub fn end(&self) -> Option<(u16, &str, bool)> {
        match self.inbox.back()? {
            Received::Closed { code, reason, clean } => Some((*code, reason, *clean)),
            Received::Message(..) => None,
        }
    }

    /// Queues a message; `Err` carries a readable reason (closed, backpressure).
    pub fn send(&mut self, opcode: Opcode, data: &[u8]) -> Result<(), String> {
        match &mut self.phase {
            Phase::Open(conn) => {
                self.sent = true;
                conn.send(opcode, data).map_err(|e| e.to_string())?;
                self.messages_out += 1;
                Ok(())
            }
            _ => Err("the connection is not open".into()),
        }
    }

    /// Queues a frame encoded once for many connections (server side only).
    pub fn send_encoded(&mut self, frame: &[u8]) -> Result<(), String> {
        match &mut self.phase {
            Phase::Open(conn) => {
                self.sent = true;
                conn.send_encoded(frame).map_err(|e| e.to_string())?;
                self.messages_out += 1;
                Ok(())
            }
            _ => Err("the connection is not open".into()),
        }
    }

    /// Starts the closing handshake (or drops a session that is not open yet).
    pub fn close(&mut self, code: u16, reason: &str) {
        match &mut self.phase {
            Phase::Open(conn) => match conn.close(code, reason) {
                Ok(()) => self.pump(),
                Err(_) => self.abort(reason),
            },
            _ => self.fail(code, reason),
        }
    }

    /// Plaintext for the peer outside the WebSocket stream (upgrade request/response).
    fn queue_head(&mut self, data: &[u8]) {
        self.head.extend_from_slice(data);
    }

    fn accept(&mut self, up: AcceptedUpgrade) {
        self.queue_head(&up.response);
        let mut conn = WsConn::new(Role::Server, self.settings.ws, &up.leftover, up.deflate);
        if let (Some(agreed), Some((_, contexts))) = (&up.deflate, &self.settings.deflate) {
            if agreed.keeps_context() {
                conn.keep_context(contexts.take());
            }
        }
        self.phase = Phase::Open(Box::new(conn));
        self.upgrade = UpgradeInfo {
            handler: up.handler,
            protocol: up.protocol,
            path: up.path,
            query: up.query,
            headers: up.headers,
        };
        self.upgraded = true;
        self.established = true;
        self.news = true;
    }

    /// Ends a session that is not open with a close code only this side knows (handshake
    /// failure); what is queued is dropped, the transport closes.
    fn fail(&mut self, code: u16, reason: &str) {
        if !self.closed {
            self.inbox.push_back(Received::Closed { code, reason: reason.to_owned(), clean: false });
            self.closed = true;
            self.news = true;
        }
        self.phase = Phase::Finished;
        self.head.clear();
        self.head_pos = 0;
    }

    /// Gives up on the session now (transport failure, keep-alive or closing timeout, a close
    /// that cannot be sent) and drops the transport. The connection's events all go to the
    /// inbox, past its limit (they are bounded by the connection's own buffers), so the end is
    /// reported after every message received before it.
    fn abort(&mut self, reason: &str) {
        if let Phase::Open(conn) = &mut self.phase {
            conn.abort(reason);
            self.pump_up_to(usize::MAX);
        } else {
            self.fail(1006, reason);
        }
        self.phase = Phase::Dropped;
    }

    /// Moves events from the connection into the inbox while it has room.
    fn pump(&mut self) {
        self.pump_up_to(self.settings.inbox_limit);
    }

    fn pump_up_to(&mut self, limit: usize) {
        let Phase::Open(conn) = &mut self.phase else { return };
        while self.inbox_bytes < limit {
            match conn.poll_event() {
                Some(WsEvent::Message { opcode, data }) => {
                    self.inbox_bytes += data.len();
                    self.inbox.push_back(Received::Message(opcode, data));
                    self.news = true;
                }
                Some(WsEvent::Closed { code, reason, clean }) => {
                    self.inbox.push_back(Received::Closed { code, reason, clean });
                    self.closed = true;
                    self.news = true;
                    break;
                }
                None => break,
            }
        }
        self.stalled = conn.outgoing_len() > conn.config().max_outgoing_buffer.saturating_mul(2);
        if conn.is_closed() && self.closed {
            // The end is in the inbox. What the connection still owes the peer (the reply to
            // its close) goes out first, within the Finished phase's deadline.
            self.head.extend_from_slice(conn.outgoing());
            self.phase = Phase::Finished;
        }
    }

    /// Plans a look at the buffers once traffic made them grow.
    fn arm_trim(&mut self, now: Instant) {
        if self.trim_at.is_none() && matches!(&self.phase, Phase::Open(conn) if conn.has_spare_buffers()) {
            self.trim_at = Some(now + IDLE_TRIM);
        }
    }
}

impl StreamProtocol for WsSession {
    fn handle_ready(&mut self, now: Instant) {
        if let Phase::Connecting { .. } = self.phase {
            let Phase::Connecting { request, handshake } =
                std::mem::replace(&mut self.phase, Phase::Finished)
            else {
                unreachable!()
            };
            self.phase = Phase::ClientUpgrade(handshake);
            self.queue_head(&request);
            self.last_rx = now;
        }
    }

    fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.last_rx = now;
        self.quiet_since = now;
        match &mut self.phase {
            Phase::ServerUpgrade(handshake) => {
                let handlers = self.handlers.clone();
                let deflate =
                    self.settings.deflate.as_ref().map(|(config, contexts)| (config, contexts.available()));
                match handshake.handle_bytes(data, |name| handlers.iter().any(|h| h == name), deflate) {
                    ServerUpgrade::Incomplete => {}
                    ServerUpgrade::Accept(up) => self.accept(*up),
                    ServerUpgrade::Reject(rejection) => {
                        self.queue_head(&rejection.response);
                        self.phase = Phase::Finished;
                        self.rejection = Some(rejection.reason);
                        self.news = true;
                    }
                }
            }
            Phase::ClientUpgrade(handshake) => match handshake.handle_bytes(data) {
                Ok(None) => {}
                Ok(Some(up)) => {
                    self.upgrade.protocol = up.protocol;
                    self.upgrade.headers = up.headers;
                    let conn = WsConn::new(Role::Client, self.settings.ws, &up.leftover, up.deflate);
                    self.phase = Phase::Open(Box::new(conn));
                    self.opened = true;
                    self.established = true;
                    self.news = true;
                }
                Err(e) => self.fail(1006, &format!("upgrade failed: {e}")),
            },
            Phase::Open(conn) => conn.handle_bytes(data),
            Phase::Connecting { .. } | Phase::Finished | Phase::Dropped => {}
        }
        self.pump();
        self.arm_trim(now);
    }

    fn handle_eof(&mut self, _now: Instant) {
        match &mut self.phase {
            Phase::Open(conn) => conn.handle_eof(),
            Phase::Finished | Phase::Dropped => {}
            _ => self.fail(1006, "connection closed during the handshake"),
        }
        self.pump();
    }

    fn handle_error(&mut self, _now: Instant, error: &str) {
        self.abort(error);
    }

    fn handle_timeout(&mut self, now: Instant) {
        let mut give_up = None;
        match &mut self.phase {
            Phase::ServerUpgrade(_) if now >= self.started + UPGRADE_TIMEOUT => {
                self.phase = Phase::Dropped;
                self.head.clear();
                self.news = true;
            }
            Phase::Connecting { .. } | Phase::ClientUpgrade(_) if now >= self.started + CONNECT_TIMEOUT => {
                self.fail(1006, "connect timed out")
            }
            Phase::Open(conn) => {
                if std::mem::take(&mut self.sent) {
                    self.quiet_since = now;
                }
                if self.trim_at.is_some_and(|at| now >= at) {
                    if now >= self.quiet_since + IDLE_TRIM {
                        conn.trim();
                        self.trim_at = None;
                    } else {
                        self.trim_at = Some(self.quiet_since + IDLE_TRIM);
                    }
                }
                if conn.is_closing() {
                    let since = *self.closing_since.get_or_insert(now);
                    if now >= since + CLOSE_TIMEOUT {
                        give_up = Some("closing handshake timed out");
                    }
                } else if let Some(interval) = self.settings.ping_interval {
                    match self.ping_sent {
                        Some(sent) if self.last_rx > sent => self.ping_sent = None,
                        Some(sent) if now >= sent + self.settings.ping_timeout => {
                            give_up = Some("keep-alive timeout: no answer to ping")
                        }
                        Some(_) => {}
                        None if now >= self.last_rx + interval => {
                            // A ping refused for backpressure (the peer reads nothing) counts as
                            // sent: the peer then has `ping_timeout` to send something, and the
                            // deadline moves on instead of staying due.
                            let _ = conn.ping(b"luna");
                            self.ping_sent = Some(now);
                        }
                        None => {}
                    }
                }
                self.pump();
            }
            Phase::Finished if now >= self.started.max(self.last_rx) + CLOSE_TIMEOUT => {
                // The peer stopped reading: give up on the last bytes.
                self.phase = Phase::Dropped;
            }
            _ => {}
        }
        if let Some(reason) = give_up {
            self.abort(reason);
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::ServerUpgrade(_) => Some(self.started + UPGRADE_TIMEOUT),
            Phase::Connecting { .. } | Phase::ClientUpgrade(_) => Some(self.started + CONNECT_TIMEOUT),
            Phase::Open(conn) if conn.is_closing() => {
                Some(self.closing_since.unwrap_or(self.last_rx) + CLOSE_TIMEOUT)
            }
            Phase::Open(_) => {
                let ping = self.settings.ping_interval.map(|interval| match self.ping_sent {
                    Some(sent) if self.last_rx <= sent => sent + self.settings.ping_timeout,
                    _ => self.last_rx + interval,
                });
                [ping, self.trim_at].into_iter().flatten().min()
            }
            Phase::Finished => Some(self.started.max(self.last_rx) + CLOSE_TIMEOUT),
            Phase::Dropped => None,
        }
    }

    fn wants_input(&self) -> bool {
        match &self.phase {
            Phase::Connecting { .. } | Phase::Finished | Phase::Dropped => false,
            Phase::Open(conn) => {
                !self.stalled && conn.wants_input() && self.inbox_bytes < self.settings.inbox_limit
            }
            Phase::ClientUpgrade(_) | Phase::ServerUpgrade(_) => true,
        }
    }

    fn outgoing(&self) -> &[u8] {
        if self.head_pos < self.head.len() {
            return &self.head[self.head_pos..];
        }
        match &self.phase {
            Phase::Open(conn) => conn.outgoing(),
            _ => &[],
        }
    }

    fn consume_outgoing(&mut self, _now: Instant, n: usize) {
        if self.head_pos < self.head.len() {
            self.head_pos += n;
            if self.head_pos >= self.head.len() {
                self.head = Vec::new();
                self.head_pos = 0;
            }
            return;
        }
        if let Phase::Open(conn) = &mut self.phase {
            conn.consume_outgoing(n);
            if self.stalled {
                self.pump();
            }
        }
    }

    fn flow(&self) -> Flow {
        match self.phase {
            Phase::Finished => Flow::Finish,
            Phase::Dropped => Flow::Abort,
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
    use crate::proto::ws::encode_frame;

    /// A client session past its upgrade, with `rest` arriving in the same read as the 101.
    fn open_client(rest: &[u8], settings: Settings, now: Instant) -> WsSession {
        let url = WsUrl::parse("ws://example.com/chat").unwrap();
        let mut ws = WsSession::client(&url, &[], [7; 16], Arc::new(settings), now).unwrap();
        ws.handle_ready(now);
        let n = ws.outgoing().len();
        ws.consume_outgoing(now, n);
        let mut input = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: CdXSYUsvsaMthlEXWDNURGWA/1o=\r\n\r\n"
            .to_vec();
        input.extend_from_slice(rest);
        ws.handle_bytes(now, &input);
        assert!(ws.take_opened());
        ws
    }

    #[test]
    fn a_close_behind_a_full_inbox_is_still_reported() {
        let now = Instant::now();
        let message = vec![7u8; 64 << 10];
        let count = INBOX_LIMIT / message.len() + 4;
        let mut input = Vec::new();
        for _ in 0..count {
            input.extend(encode_frame(Opcode::Binary, &message).unwrap());
        }
        input.extend_from_slice(b"\x88\x05\x03\xe8bye"); // close 1000 "bye"
        let mut ws = open_client(&input, Settings::default(), now);
        assert!(!ws.wants_input(), "a full inbox stops reading");
        // The driver writes the close reply and sees the flow; the handler reads later.
        while !ws.outgoing().is_empty() {
            let n = ws.outgoing().len();
            ws.consume_outgoing(now, n);
        }
        let mut messages = 0;
        let end = loop {
            match ws.receive() {
                Some(Received::Message(_, data)) => {
                    assert_eq!(data.len(), message.len());
                    messages += 1;
                }
                Some(Received::Closed { code, .. }) => break code,
                None => panic!("the session ended without reporting it after {messages} messages"),
            }
        };
        assert_eq!((messages, end), (count, 1000));
    }

    #[test]
    fn a_peer_that_reads_nothing_times_out_without_spinning() {
        let now = Instant::now();
        let settings = Settings {
            ping_interval: Some(Duration::from_secs(1)),
            ping_timeout: Duration::from_secs(2),
            ..Settings::default()
        };
        let mut ws = open_client(&[], settings, now);
        // The peer never reads: the queue fills until sends are refused (so is the ping).
        while ws.send(Opcode::Binary, &[1; 4096]).is_ok() {}
        let later = now + Duration::from_secs(3);
        assert!(ws.poll_timeout().is_some_and(|at| at <= later));
        ws.handle_timeout(later);
        assert!(ws.poll_timeout().is_some_and(|at| at > later), "the keep-alive deadline must move on");
        let dead = ws.poll_timeout().unwrap();
        ws.handle_timeout(dead);
        assert_eq!(ws.flow(), Flow::Abort, "the transport is dropped, not kept with its queue");
        assert!(matches!(ws.receive(), Some(Received::Closed { code: 1006, .. })));
        assert_eq!(ws.end().map(|(_, reason, _)| reason), Some("keep-alive timeout: no answer to ping"));
    }

    #[test]
    fn an_abort_behind_a_full_inbox_reports_the_inbox_then_the_end() {
        let now = Instant::now();
        let mut input = Vec::new();
        for _ in 0..8 {
            input.extend(encode_frame(Opcode::Text, &[b'a'; 100]).unwrap());
        }
        let settings = Settings { inbox_limit: 250, ..Settings::default() };
        let mut ws = open_client(&input, settings, now);
        assert!(!ws.wants_input());
        ws.handle_error(now, "connection reset by peer");
        assert_eq!(ws.flow(), Flow::Abort);
        let mut messages = 0;
        while let Some(Received::Message(..)) = ws.receive() {
            messages += 1;
        }
        // What the inbox held (3 × 100 B reach its 250 B limit); frames the connection had not
        // parsed yet go with it.
        assert_eq!(messages, 3);
        assert_eq!(
            ws.end().map(|(code, reason, _)| (code, reason)),
            Some((1006, "connection reset by peer"))
        );
    }
}
