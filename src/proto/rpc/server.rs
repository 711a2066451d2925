//! The server side: stateless cookie handshake, session table, timer heap, transmit queue.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::rand::SecureRandom;

use super::crypto::{self, CookieKey, Identity, COOKIE_BUCKET_SECS};
use super::session::{Outcome, Session};
use super::wire::{self, COOKIE_LEN, FLAG_ENCRYPTED, KEY_LEN, RETRY_LEN, SERVER_HELLO_LEN};
use super::{Config, ConnId, DisconnectReason, Error, Stats};

/// What a [`Server`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// A client completed the handshake (it proved its address and holds the session keys).
    Connected {
        /// The new session.
        conn: ConnId,
        /// The client's address.
        addr: SocketAddr,
    },
    /// A complete message, in order, exactly once.
    Message {
        /// The session it came on.
        conn: ConnId,
        /// The message bytes.
        data: Vec<u8>,
    },
    /// The session ended (reported once per `Connected`, also after a local `close`).
    Disconnected {
        /// The session.
        conn: ConnId,
        /// Why.
        reason: DisconnectReason,
    },
}

/// Largest reply the server builds without a session (retry, server hello, reject, close reply).
const REPLY_CAP: usize = 160;
/// Most queued stateless replies; beyond, replies are dropped (counted).
const MAX_REPLIES: usize = 1024;

struct Reply {
    to: SocketAddr,
    len: u8,
    data: [u8; REPLY_CAP],
}

struct Conn {
    addr: SocketAddr,
    session: Session,
    client_eph: [u8; KEY_LEN],
    server_hello: Option<[u8; SERVER_HELLO_LEN]>,
    /// `Connected` was emitted.
    connected: bool,
    /// `Disconnected` was emitted.
    disconnected: bool,
    /// Earliest deadline pushed to the timer heap and not yet popped.
    scheduled: Option<Instant>,
    /// In the ready-to-transmit queue.
    queued: bool,
}

struct Slot {
    generation: u32,
    conn: Option<Conn>,
}

/// One listening socket's worth of sessions. See the [module docs](super) for the driving loop.
pub struct Server {
    config: Config,
    identity: Identity,
    cookies: CookieKey,
    epoch: Option<Instant>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    by_addr: HashMap<SocketAddr, u32>,
    per_ip: HashMap<IpAddr, usize>,
    live: usize,
    pending: usize,
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    due: Vec<(Instant, u32, u32)>,
    ready: VecDeque<(u32, u32)>,
    replies: VecDeque<Reply>,
    events: VecDeque<ServerEvent>,
    stats: Stats,
    /// Randomness for the handshake's ephemeral keys (passed in: tests use their own).
    rng: Box<dyn SecureRandom>,
}

impl Server {
    /// A server with the given long-term Ed25519 seed (its public key is what clients pin),
    /// cookie MAC secret (random; rotating it invalidates outstanding cookies only) and source
    /// of randomness for ephemeral keys.
    pub fn new(
        config: Config,
        identity_seed: [u8; 32],
        cookie_secret: [u8; 32],
        rng: Box<dyn SecureRandom>,
    ) -> Self {
        Server {
            config,
            identity: Identity::from_seed(&identity_seed),
            cookies: CookieKey::new(&cookie_secret),
            epoch: None,
            slots: Vec::new(),
            free: Vec::new(),
            by_addr: HashMap::new(),
            per_ip: HashMap::new(),
            live: 0,
            pending: 0,
            timers: BinaryHeap::new(),
            due: Vec::new(),
            ready: VecDeque::new(),
            replies: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            rng,
        }
    }

    /// The server's long-term Ed25519 public key (clients pin it).
    pub fn public_key(&self) -> [u8; 32] {
        self.identity.public()
    }

    /// Counters of accepted, dropped and sent datagrams.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The current configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The knobs in force; changes apply from the next packet on.
    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }
    /// Sets the most sessions per source IP (0 = unlimited). Counted only for clients that
    /// proved their address, so spoofing cannot use up another IP's quota.
    pub fn set_max_per_ip(&mut self, n: usize) {
        self.config.max_per_ip = n;
    }

    /// Number of sessions (connected or completing the handshake).
    pub fn session_count(&self) -> usize {
        self.live
    }

    /// The address of a connected session.
    pub fn addr(&self, conn: ConnId) -> Option<SocketAddr> {
        self.get(conn).filter(|c| c.connected).map(|c| c.addr)
    }

    /// The smoothed round-trip time of a connected session and its variation, once measured.
    pub fn rtt(&self, conn: ConnId) -> Option<(Duration, Duration)> {
        self.get(conn).and_then(|c| c.session.rtt())
    }

    fn get(&self, conn: ConnId) -> Option<&Conn> {
        let s = self.slots.get(conn.index as usize)?;
        if s.generation != conn.generation {
            return None;
        }
        s.conn.as_ref()
    }

    fn conn_mut(&mut self, index: u32, generation: u32) -> Option<&mut Conn> {
        let s = self.slots.get_mut(index as usize)?;
        if s.generation != generation {
            return None;
        }
        s.conn.as_mut()
    }

    fn id(&self, index: u32) -> ConnId {
        ConnId { index, generation: self.slots[index as usize].generation }
    }

    /// Queues a reliable, ordered message on `conn`; `Err(UnknownConnection)` if `conn` is not
    /// a connected session (or it is closing).
    pub fn send(&mut self, conn: ConnId, msg: impl Into<Vec<u8>>) -> Result<(), Error> {
        let cfg = &self.config;
        let s = self.slots.get_mut(conn.index as usize).ok_or(Error::UnknownConnection)?;
        if s.generation != conn.generation {
            return Err(Error::UnknownConnection);
        }
        let c = s.conn.as_mut().ok_or(Error::UnknownConnection)?;
        if !c.connected || c.session.is_closing() {
            return Err(Error::UnknownConnection);
        }
        c.session.send(cfg, msg.into())?;
        self.after_change(conn.index);
        Ok(())
    }

    /// Closes a session: the peer receives an authenticated close with `reason` (from the next
    /// `poll_transmit`), and `Disconnected { reason: Local(reason) }` is reported now.
    pub fn close(&mut self, conn: ConnId, reason: &str) -> Result<(), Error> {
        let c = self.conn_mut(conn.index, conn.generation).ok_or(Error::UnknownConnection)?;
        if !c.connected || c.session.is_closing() {
            return Err(Error::UnknownConnection);
        }
        c.session.close(reason);
        c.disconnected = true;
        let reason = DisconnectReason::Local(wire::truncate_reason(reason).to_owned());
        self.events.push_back(ServerEvent::Disconnected { conn, reason });
        self.after_change(conn.index);
        Ok(())
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// Whether [`Self::poll_event`] has something.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Earliest instant at which `handle_timeout` has work (a heap peek; may be early, never
    /// late). Call `poll_transmit` after every input regardless.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|r| r.0 .0)
    }

    /// Runs every timer due at `now` (only the sessions whose deadline passed are visited).
    pub fn handle_timeout(&mut self, now: Instant) {
        // Take the due entries first: deadlines re-armed while handling them wait for the next
        // call even if they are already due, so this loop always ends.
        let mut due = std::mem::take(&mut self.due);
        while let Some(&Reverse(entry)) = self.timers.peek() {
            if entry.0 > now {
                break;
            }
            self.timers.pop();
            due.push(entry);
        }
        for &(t, index, generation) in &due {
            let cfg = &self.config;
            let stats = &mut self.stats;
            let Some(s) = self.slots.get_mut(index as usize) else { continue };
            if s.generation != generation {
                continue;
            }
            let Some(c) = s.conn.as_mut() else { continue };
            if c.scheduled != Some(t) {
                continue; // superseded by an earlier entry that already ran
            }
            c.scheduled = None;
            match c.session.handle_timeout(cfg, now, stats) {
                Some(reason) => self.remove(index, reason),
                None => self.after_change(index),
            }
        }
        due.clear();
        self.due = due;
    }

    /// Writes the next datagram to send into `buf` (cleared first) and returns its destination.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<SocketAddr> {
        if let Some(r) = self.replies.pop_front() {
            buf.clear();
            buf.extend_from_slice(&r.data[..r.len as usize]);
            self.stats.datagrams_out += 1;
            return Some(r.to);
        }
        while let Some((index, generation)) = self.ready.pop_front() {
            let cfg = &self.config;
            let Some(c) = self
                .slots
                .get_mut(index as usize)
                .filter(|s| s.generation == generation)
                .and_then(|s| s.conn.as_mut())
            else {
                continue;
            };
            c.queued = false;
            let sent = c.session.poll_transmit(cfg, now, buf);
            let addr = c.addr;
            self.after_change(index);
            if sent {
                self.stats.datagrams_out += 1;
                return Some(addr);
            }
        }
        None
    }

    /// Re-arms the session's timer and transmit-queue membership after any change.
    fn after_change(&mut self, index: u32) {
        let cfg = &self.config;
        let Some(s) = self.slots.get_mut(index as usize) else { return };
        let generation = s.generation;
        let Some(c) = s.conn.as_mut() else { return };
        if let Some(d) = c.session.timeout(cfg) {
            if c.scheduled.is_none_or(|s| d < s) {
                c.scheduled = Some(d);
                self.timers.push(Reverse((d, index, generation)));
            }
        }
        if !c.queued && c.session.wants_transmit(cfg) {
            c.queued = true;
            self.ready.push_back((index, generation));
        }
    }

    fn remove(&mut self, index: u32, reason: DisconnectReason) {
        let id = self.id(index);
        let Some(s) = self.slots.get_mut(index as usize) else { return };
        let Some(c) = s.conn.take() else { return };
        s.generation = s.generation.wrapping_add(1);
        self.free.push(index);
        self.live -= 1;
        if !c.session.confirmed {
            self.pending -= 1;
        }
        self.by_addr.remove(&c.addr);
        if let Some(n) = self.per_ip.get_mut(&c.addr.ip()) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&c.addr.ip());
            }
        }
        if c.connected && !c.disconnected {
            self.events.push_back(ServerEvent::Disconnected { conn: id, reason });
        }
    }

    fn push_reply(&mut self, to: SocketAddr, data: &[u8]) {
        if self.replies.len() >= MAX_REPLIES || data.len() > REPLY_CAP {
            self.stats.reply_queue_full += 1;
            return;
        }
        let mut r = Reply { to, len: data.len() as u8, data: [0; REPLY_CAP] };
        r.data[..data.len()].copy_from_slice(data);
        self.replies.push_back(r);
    }

    fn bucket(&mut self, now: Instant) -> u32 {
        let epoch = *self.epoch.get_or_insert(now);
        (now.saturating_duration_since(epoch).as_secs() / COOKIE_BUCKET_SECS) as u32
    }

    /// Feeds one received datagram. Never panics; anything unusable is dropped and counted.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.stats.datagrams_in += 1;
        let Some(kind) = self.stats.packet_kind(data) else { return };
        match kind {
            wire::T_DATA => match self.by_addr.get(&from) {
                Some(&index) => self.handle_session_packet(index, now, data),
                None => self.stats.unknown_peer += 1,
            },
            wire::T_HELLO => self.handle_hello(now, from, data),
            _ => self.stats.malformed += 1,
        }
    }

    fn handle_session_packet(&mut self, index: u32, now: Instant, data: &[u8]) {
        let id = self.id(index);
        let cfg = &self.config;
        let events = &mut self.events;
        let stats = &mut self.stats;
        let Some(c) = self.slots.get_mut(index as usize).and_then(|s| s.conn.as_mut()) else { return };
        let was_confirmed = c.session.confirmed;
        let was_closing = c.session.is_closing();
        let mark = events.len();
        let outcome = c.session.handle_packet(cfg, now, data, stats, &mut |m| {
            events.push_back(ServerEvent::Message { conn: id, data: m });
        });
        if !was_confirmed && c.session.confirmed {
            events.insert(mark, ServerEvent::Connected { conn: id, addr: c.addr });
            c.connected = true;
            c.server_hello = None;
            self.pending -= 1;
            stats.handshakes_completed += 1;
        }
        match outcome {
            Outcome::Closed(reason) => {
                if !was_closing {
                    let mut buf = Vec::with_capacity(64);
                    c.session.seal_close_reply(&mut buf);
                    let addr = c.addr;
                    self.push_reply(addr, &buf);
                }
                self.remove(index, DisconnectReason::Closed(reason));
            }
            Outcome::Ok | Outcome::Dropped => self.after_change(index),
        }
    }

    fn retry(&mut self, to: SocketAddr, bucket: u32, flags: u8, client_key: &[u8; KEY_LEN]) {
        let cookie = self.cookies.make(bucket, &to, flags, client_key);
        let mut out = [0u8; RETRY_LEN];
        wire::encode_retry(&mut out, &cookie);
        self.push_reply(to, &out);
    }

    fn reject(&mut self, to: SocketAddr, code: u8, client_key: &[u8; KEY_LEN]) {
        self.stats.handshake_dropped += 1;
        let sig = self.identity.sign_reject(code, client_key);
        let out = wire::encode_reject(code, &sig);
        self.push_reply(to, &out);
    }

    fn handle_hello(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        let Some(h) = wire::decode_hello(data) else {
            self.stats.malformed += 1;
            return;
        };
        if let Some(&index) = self.by_addr.get(&from) {
            // A retransmitted hello for a session still waiting for key confirmation: resend the
            // server hello (smaller than the hello). Anything else is ignored.
            let resend = self.slots[index as usize]
                .conn
                .as_ref()
                .filter(|c| !c.session.confirmed && c.client_eph == h.client_key)
                .and_then(|c| c.server_hello);
            match resend {
                Some(sh) => self.push_reply(from, &sh),
                None => self.stats.handshake_dropped += 1,
            }
            return;
        }
        let bucket = self.bucket(now);
        let cookie: [u8; COOKIE_LEN] = match h.cookie {
            None => {
                self.stats.retries_sent += 1;
                return self.retry(from, bucket, h.flags, &h.client_key);
            }
            Some(c) if !self.cookies.verify(c, bucket, &from, h.flags, &h.client_key) => {
                self.stats.bad_cookie += 1;
                return self.retry(from, bucket, h.flags, &h.client_key);
            }
            Some(c) => *c,
        };
        // The client owns its address from here on.
        let mode = if self.config.encryption { FLAG_ENCRYPTED } else { 0 };
        if h.flags != mode {
            return self.reject(from, wire::REJECT_MODE, &h.client_key);
        }
        let ip_count = self.per_ip.get(&from.ip()).copied().unwrap_or(0);
        if self.live >= self.config.max_sessions
            || self.pending >= self.config.max_pending
            || (self.config.max_per_ip > 0 && ip_count >= self.config.max_per_ip)
        {
            return self.reject(from, wire::REJECT_BUSY, &h.client_key);
        }
        let Ok(eph) = EphemeralPrivateKey::generate(&X25519, &*self.rng) else {
            self.stats.handshake_dropped += 1;
            return;
        };
        let Ok(eph_pub) = eph.compute_public_key() else {
            self.stats.handshake_dropped += 1;
            return;
        };
        let mut server_eph = [0u8; KEY_LEN];
        server_eph.copy_from_slice(eph_pub.as_ref());
        let static_pub = self.identity.public();
        let th = crypto::transcript(h.flags, &h.client_key, &server_eph, &cookie, &static_pub);
        let Ok(keys) =
            agreement::agree_ephemeral(eph, &UnparsedPublicKey::new(&X25519, &h.client_key), |shared| {
                crypto::derive_keys(shared, &th, true)
            })
        else {
            self.stats.malformed += 1; // unusable client key share
            return;
        };
        let signature = self.identity.sign_transcript(&th);
        let sh = wire::encode_server_hello(&wire::ServerHello {
            flags: h.flags,
            server_eph,
            server_static: static_pub,
            signature,
        });
        let session = Session::new(self.config.encryption.then_some(keys), false, now);
        let conn = Conn {
            addr: from,
            session,
            client_eph: h.client_key,
            server_hello: Some(sh),
            connected: false,
            disconnected: false,
            scheduled: None,
            queued: false,
        };
        let index = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize].conn = Some(conn);
                i
            }
            None => {
                self.slots.push(Slot { generation: 0, conn: Some(conn) });
                (self.slots.len() - 1) as u32
            }
        };
        self.by_addr.insert(from, index);
        *self.per_ip.entry(from.ip()).or_insert(0) += 1;
        self.live += 1;
        self.pending += 1;
        self.push_reply(from, &sh);
        self.after_change(index);
    }
}

impl crate::proto::stream::DatagramProtocol for Server {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        Server::handle_datagram(self, now, from, data)
    }

    fn handle_timeout(&mut self, now: Instant) {
        Server::handle_timeout(self, now)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Server::poll_timeout(self)
    }

    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<SocketAddr> {
        Server::poll_transmit(self, now, buf)
    }

    /// Events are waiting for [`Server::poll_event`].
    fn take_news(&mut self) -> bool {
        !self.events.is_empty()
    }
}
