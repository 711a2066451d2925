//! The client side of one session: hello/retry/server-hello handshake with optional server key
//! pinning, then the shared [`Session`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::rand::SecureRandom;

use super::crypto;
use super::session::{Outcome, Session};
use super::wire::{self, COOKIE_LEN, FLAG_ENCRYPTED, KEY_LEN};
use super::{Config, DisconnectReason, Error, Stats};

/// What a [`Client`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// The handshake completed; the server is authenticated (when a key was pinned).
    Connected,
    /// A complete message from the server, in order, exactly once.
    Message(Vec<u8>),
    /// The session ended (exactly once; also after a local `close`).
    Disconnected(DisconnectReason),
}

struct Handshake {
    eph: Option<EphemeralPrivateKey>,
    eph_pub: [u8; KEY_LEN],
    cookie: Option<[u8; COOKIE_LEN]>,
    started: Instant,
    next_send: Option<Instant>,
    attempts: u32,
}

enum State {
    Handshake(Handshake),
    Established(Box<Session>),
    Closed,
}

/// One client session to one server address.
pub struct Client {
    config: Config,
    server_addr: SocketAddr,
    pinned: Option<[u8; KEY_LEN]>,
    server_key: Option<[u8; KEY_LEN]>,
    state: State,
    /// Messages queued before the handshake completed.
    early: VecDeque<Vec<u8>>,
    early_bytes: usize,
    /// A one-off datagram (close reply) waiting for `poll_transmit`.
    reply: Option<Vec<u8>>,
    events: VecDeque<ClientEvent>,
    stats: Stats,
}

impl Client {
    /// Starts a handshake with `server_addr`. With `pinned_server_key`, the server must prove
    /// possession of that Ed25519 key or the client aborts with `ServerKeyMismatch`.
    pub fn new(
        config: Config,
        server_addr: SocketAddr,
        pinned_server_key: Option<[u8; 32]>,
        now: Instant,
        rng: &dyn SecureRandom,
    ) -> Result<Self, Error> {
        let eph = EphemeralPrivateKey::generate(&X25519, rng).map_err(|_| Error::Rng)?;
        let public = eph.compute_public_key().map_err(|_| Error::Rng)?;
        let mut eph_pub = [0u8; KEY_LEN];
        eph_pub.copy_from_slice(public.as_ref());
        Ok(Client {
            config,
            server_addr,
            pinned: pinned_server_key,
            server_key: None,
            state: State::Handshake(Handshake {
                eph: Some(eph),
                eph_pub,
                cookie: None,
                started: now,
                next_send: Some(now),
                attempts: 0,
            }),
            early: VecDeque::new(),
            early_bytes: 0,
            reply: None,
            events: VecDeque::new(),
            stats: Stats::default(),
        })
    }

    /// The server address this client talks to.
    pub fn server_addr(&self) -> SocketAddr {
        self.server_addr
    }

    /// The server's long-term public key, once the handshake completed.
    pub fn server_public_key(&self) -> Option<[u8; 32]> {
        self.server_key
    }

    /// True once connected and until closed.
    pub fn is_connected(&self) -> bool {
        matches!(&self.state, State::Established(s) if !s.is_closing())
    }

    /// True when the session is over and nothing is left to send: the client can be dropped.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed) && self.reply.is_none()
    }

    /// Counters of accepted, dropped and sent datagrams.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The smoothed round-trip time and its variation, once measured.
    pub fn rtt(&self) -> Option<(Duration, Duration)> {
        match &self.state {
            State::Established(s) => s.rtt(),
            _ => None,
        }
    }

    /// The knobs in force; changes apply from the next packet on.
    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    fn flags(&self) -> u8 {
        if self.config.encryption {
            FLAG_ENCRYPTED
        } else {
            0
        }
    }

    /// Queues a reliable, ordered message (allowed during the handshake: it is sent once
    /// connected).
    pub fn send(&mut self, msg: impl Into<Vec<u8>>) -> Result<(), Error> {
        let msg = msg.into();
        match &mut self.state {
            State::Established(s) => s.send(&self.config, msg),
            State::Handshake(_) => {
                if msg.len() > self.config.max_message_size {
                    return Err(Error::MessageTooLarge);
                }
                if self.early_bytes + msg.len() > self.config.max_send_buffer {
                    return Err(Error::SendBufferFull);
                }
                self.early_bytes += msg.len();
                self.early.push_back(msg);
                Ok(())
            }
            State::Closed => Err(Error::NotConnected),
        }
    }

    /// Closes the session: the server receives an authenticated close with `reason` (from the
    /// next `poll_transmit`); `Disconnected(Local(reason))` is reported now.
    pub fn close(&mut self, reason: &str) {
        let reason_s = wire::truncate_reason(reason).to_owned();
        match &mut self.state {
            State::Established(s) if !s.is_closing() => s.close(reason),
            State::Handshake(_) => self.state = State::Closed,
            _ => return,
        }
        self.events.push_back(ClientEvent::Disconnected(DisconnectReason::Local(reason_s)));
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Whether [`Self::poll_event`] has something.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Earliest instant at which `handle_timeout` has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Handshake(h) => {
                let give_up = h.started + self.config.connect_timeout;
                Some(h.next_send.map_or(give_up, |n| n.min(give_up)))
            }
            State::Established(s) => s.timeout(&self.config),
            State::Closed => None,
        }
    }

    /// Runs due timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.state {
            State::Handshake(h) => {
                if now >= h.started + self.config.connect_timeout {
                    self.state = State::Closed;
                    self.events.push_back(ClientEvent::Disconnected(DisconnectReason::HandshakeTimeout));
                }
            }
            State::Established(s) => {
                let closing = s.is_closing();
                if let Some(reason) = s.handle_timeout(&self.config, now, &mut self.stats) {
                    self.state = State::Closed;
                    if !closing {
                        self.events.push_back(ClientEvent::Disconnected(reason));
                    }
                }
            }
            State::Closed => {}
        }
    }

    /// Writes the next datagram into `buf` (cleared first); returns the server address.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<SocketAddr> {
        if let Some(r) = self.reply.take() {
            buf.clear();
            buf.extend_from_slice(&r);
            self.stats.datagrams_out += 1;
            return Some(self.server_addr);
        }
        let flags = self.flags();
        let sent = match &mut self.state {
            State::Handshake(h) => {
                if h.next_send.is_some_and(|t| t <= now) {
                    wire::encode_hello(buf, flags, &h.eph_pub, h.cookie.as_ref());
                    let backoff =
                        self.config.initial_rto.checked_mul(1 << h.attempts.min(4)).unwrap_or(Duration::MAX);
                    h.attempts += 1;
                    h.next_send =
                        Some(now + backoff.min(self.config.message_timeout.max(self.config.min_rto)));
                    true
                } else {
                    false
                }
            }
            State::Established(s) => s.poll_transmit(&self.config, now, buf),
            State::Closed => false,
        };
        if sent {
            self.stats.datagrams_out += 1;
            Some(self.server_addr)
        } else {
            None
        }
    }

    /// Feeds one received datagram. Datagrams not from the server address are dropped.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.stats.datagrams_in += 1;
        if from != self.server_addr {
            self.stats.unknown_peer += 1;
            return;
        }
        let Some(kind) = self.stats.packet_kind(data) else { return };
        match (&mut self.state, kind) {
            (State::Handshake(h), wire::T_RETRY) => match wire::decode_retry(data) {
                Some(cookie) => {
                    h.cookie = Some(cookie);
                    h.next_send = Some(now); // answer at once
                }
                None => self.stats.malformed += 1,
            },
            (State::Handshake(_), wire::T_SERVER_HELLO) => self.on_server_hello(now, data),
            (State::Handshake(h), wire::T_REJECT) => {
                let Some((code, sig)) = wire::decode_reject(data) else {
                    self.stats.malformed += 1;
                    return;
                };
                if let Some(pin) = &self.pinned {
                    if !crypto::verify_reject(pin, code, &h.eph_pub, &sig) {
                        self.stats.bad_signature += 1;
                        return;
                    }
                }
                self.state = State::Closed;
                let reason = DisconnectReason::Rejected(wire::reject_text(code).to_owned());
                self.events.push_back(ClientEvent::Disconnected(reason));
            }
            (State::Established(s), wire::T_DATA) => {
                let closing = s.is_closing();
                let events = &mut self.events;
                let outcome = s.handle_packet(&self.config, now, data, &mut self.stats, &mut |m| {
                    events.push_back(ClientEvent::Message(m));
                });
                if let Outcome::Closed(reason) = outcome {
                    if !closing {
                        let mut buf = Vec::with_capacity(64);
                        s.seal_close_reply(&mut buf);
                        self.reply = Some(buf);
                        self.events.push_back(ClientEvent::Disconnected(DisconnectReason::Closed(reason)));
                    }
                    self.state = State::Closed;
                }
            }
            (State::Established(_), wire::T_SERVER_HELLO | wire::T_RETRY | wire::T_REJECT) => {
                self.stats.handshake_dropped += 1; // late duplicates
            }
            (State::Closed, _) => self.stats.unknown_peer += 1,
            _ => self.stats.malformed += 1,
        }
    }

    fn on_server_hello(&mut self, now: Instant, data: &[u8]) {
        let flags = self.flags();
        let State::Handshake(h) = &mut self.state else { return };
        let Some(sh) = wire::decode_server_hello(data) else {
            self.stats.malformed += 1;
            return;
        };
        let Some(cookie) = h.cookie else {
            self.stats.handshake_dropped += 1; // we never sent a hello it could answer
            return;
        };
        if sh.flags != flags {
            self.stats.malformed += 1;
            return;
        }
        if let Some(pin) = &self.pinned {
            if *pin != sh.server_static {
                self.state = State::Closed;
                self.events.push_back(ClientEvent::Disconnected(DisconnectReason::ServerKeyMismatch));
                return;
            }
        }
        let th = crypto::transcript(flags, &h.eph_pub, &sh.server_eph, &cookie, &sh.server_static);
        if !crypto::verify_transcript(&sh.server_static, &th, &sh.signature) {
            self.stats.bad_signature += 1;
            return;
        }
        let Some(eph) = h.eph.take() else { return };
        let keys = agreement::agree_ephemeral(eph, &UnparsedPublicKey::new(&X25519, &sh.server_eph), |s| {
            crypto::derive_keys(s, &th, false)
        });
        let Ok(keys) = keys else {
            self.state = State::Closed;
            let reason = DisconnectReason::Rejected("invalid server key share".to_owned());
            self.events.push_back(ClientEvent::Disconnected(reason));
            return;
        };
        let mut session = Session::new(self.config.encryption.then_some(keys), true, now);
        session.queue_ping(); // key confirmation even when there is nothing to send
        for m in self.early.drain(..) {
            // Limits were checked when queued; a lowered limit may refuse some now.
            let _ = session.send(&self.config, m);
        }
        self.early_bytes = 0;
        self.server_key = Some(sh.server_static);
        self.state = State::Established(Box::new(session));
        self.stats.handshakes_completed += 1;
        self.events.push_back(ClientEvent::Connected);
    }
}

impl crate::proto::stream::DatagramProtocol for Client {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        Client::handle_datagram(self, now, from, data)
    }

    fn handle_timeout(&mut self, now: Instant) {
        Client::handle_timeout(self, now)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Client::poll_timeout(self)
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<SocketAddr> {
        Client::poll_transmit(self, now, buf)
    }

    /// Events are waiting for [`Client::poll_event`].
    fn take_news(&mut self) -> bool {
        !self.events.is_empty()
    }
}
