//! One established session: packet protection, replay window, selective acks, RTT-timed
//! retransmission, aggregation, fragmentation/reassembly, in-order exactly-once delivery,
//! keep-alive and close. Shared by [`super::Server`] and [`super::Client`].

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::crypto::PacketKeys;
use super::wire::{self, Frame, DATA_HEADER, TAG_LEN};
use super::{Config, DisconnectReason, Error, Stats, FRAGMENT_SIZE, MAX_DATAGRAM};

/// Most messages between the oldest unacknowledged one and the newest sent (receiver rejects
/// sequence numbers beyond `next expected + MSG_WINDOW` as malformed).
pub(crate) const MSG_WINDOW: u64 = 4096;
/// Packets older than `largest received - REPLAY_WINDOW` are dropped as replays.
const REPLAY_WINDOW: u64 = 128;
/// Received packet-number ranges remembered for acks.
const MAX_TRACKED_RANGES: usize = 32;
/// A packet is lost when one sent this many packets later was acknowledged.
const PACKET_THRESHOLD: u64 = 3;
/// How many times a close is sent when the peer does not answer it.
const CLOSE_SENDS: u8 = 5;

struct SentPacket {
    time: Instant,
    /// `(message sequence, chunk index)` carried by the packet.
    chunks: Vec<(u64, u32)>,
}

struct OutMsg {
    data: Vec<u8>,
    nchunks: u32,
    remaining: u32,
    acked_small: u64,
    acked_big: Vec<u64>,
}

impl OutMsg {
    fn is_acked(&self, ci: u32) -> bool {
        if self.nchunks <= 64 {
            self.acked_small & (1u64 << ci) != 0
        } else {
            self.acked_big.get((ci / 64) as usize).is_some_and(|w| w & (1u64 << (ci % 64)) != 0)
        }
    }
    /// Marks a chunk acknowledged; true if it was not already.
    fn set_acked(&mut self, ci: u32) -> bool {
        if ci >= self.nchunks || self.is_acked(ci) {
            return false;
        }
        if self.nchunks <= 64 {
            self.acked_small |= 1u64 << ci;
        } else if let Some(w) = self.acked_big.get_mut((ci / 64) as usize) {
            *w |= 1u64 << (ci % 64);
        }
        true
    }
}

enum Reasm {
    Partial {
        buf: Vec<u8>,
        got: Vec<u64>,
        missing: u64,
    },
    Complete(Vec<u8>),
    /// Larger than `max_message_size`: skipped when its turn comes.
    Discard,
}

struct Closing {
    reason: String,
    sends_left: u8,
    send_now: bool,
    next: Option<Instant>,
}

/// Result of handling one data packet.
pub(crate) enum Outcome {
    /// Accepted (or harmlessly ignored).
    Ok,
    /// Dropped and counted.
    Dropped,
    /// The peer sent an authenticated close with this reason.
    Closed(String),
}

pub(crate) struct Session {
    keys: Option<PacketKeys>,
    /// The peer proved it has the keys (server side: first authenticated packet).
    pub(crate) confirmed: bool,
    closing: Option<Closing>,
    // ---- sending
    next_pn: u64,
    sent: VecDeque<Option<SentPacket>>,
    sent_base: u64,
    inflight: usize,
    msgs: VecDeque<OutMsg>,
    msg_base: u64,
    unsent_msg: usize,
    unsent_chunk: u32,
    send_buffered: usize,
    retx: VecDeque<(u64, u32)>,
    pool: Vec<Vec<(u64, u32)>>,
    srtt: Option<Duration>,
    rttvar: Duration,
    backoff: u32,
    /// `rto()` as last computed; emptied when `srtt`, `rttvar` or `backoff` change.
    rto_cache: Cell<Option<Duration>>,
    last_eliciting_sent: Instant,
    ping_pending: bool,
    // ---- receiving
    largest_rx: Option<u64>,
    largest_rx_time: Instant,
    replay: u128,
    ack_ranges: Vec<(u64, u64)>,
    unacked_eliciting: u32,
    ack_deadline: Option<Instant>,
    ack_now: bool,
    next_deliver: u64,
    ooo: BTreeMap<u64, Reasm>,
    recv_buffered: usize,
    last_recv: Instant,
    scratch: Vec<u8>,
}

impl Session {
    pub(crate) fn new(keys: Option<PacketKeys>, confirmed: bool, now: Instant) -> Self {
        Session {
            keys,
            confirmed,
            closing: None,
            next_pn: 0,
            sent: VecDeque::new(),
            sent_base: 0,
            inflight: 0,
            msgs: VecDeque::new(),
            msg_base: 0,
            unsent_msg: 0,
            unsent_chunk: 0,
            send_buffered: 0,
            retx: VecDeque::new(),
            pool: Vec::new(),
            srtt: None,
            rttvar: Duration::ZERO,
            backoff: 0,
            rto_cache: Cell::new(None),
            last_eliciting_sent: now,
            ping_pending: false,
            largest_rx: None,
            largest_rx_time: now,
            replay: 0,
            ack_ranges: Vec::new(),
            unacked_eliciting: 0,
            ack_deadline: None,
            ack_now: false,
            next_deliver: 0,
            ooo: BTreeMap::new(),
            recv_buffered: 0,
            last_recv: now,
            scratch: Vec::with_capacity(MAX_DATAGRAM),
        }
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.is_some()
    }

    /// Queue a ping (used as the client's key confirmation).
    pub(crate) fn queue_ping(&mut self) {
        self.ping_pending = true;
    }

    /// Smoothed RTT and its variation (RFC 6298's SRTT and RTTVAR), once measured.
    pub(crate) fn rtt(&self) -> Option<(Duration, Duration)> {
        self.srtt.map(|srtt| (srtt, self.rttvar))
    }

    fn tag_len(&self) -> usize {
        if self.keys.is_some() {
            TAG_LEN
        } else {
            0
        }
    }

    /// Current retransmission timeout including backoff (RFC 6298 with a loopback-friendly
    /// minimum and `message_timeout` as the maximum).
    fn rto(&self, cfg: &Config) -> Duration {
        if let Some(rto) = self.rto_cache.get() {
            return rto;
        }
        let max = cfg.message_timeout.max(cfg.min_rto);
        let base = match self.srtt {
            Some(s) => s + (self.rttvar * 4).max(Duration::from_millis(1)) + cfg.max_ack_delay,
            None => cfg.initial_rto,
        };
        let base = base.clamp(cfg.min_rto, max);
        let rto = base.checked_mul(1u32 << self.backoff.min(16)).unwrap_or(max).min(max);
        self.rto_cache.set(Some(rto));
        rto
    }

    // ------------------------------------------------------------------ sending API

    pub(crate) fn send(&mut self, cfg: &Config, msg: Vec<u8>) -> Result<(), Error> {
        if self.closing.is_some() {
            return Err(Error::NotConnected);
        }
        if msg.len() > cfg.max_message_size {
            return Err(Error::MessageTooLarge);
        }
        if self.send_buffered + msg.len() > cfg.max_send_buffer {
            return Err(Error::SendBufferFull);
        }
        let nchunks = if msg.len() <= FRAGMENT_SIZE { 1 } else { msg.len().div_ceil(FRAGMENT_SIZE) };
        let Ok(nchunks) = u32::try_from(nchunks) else { return Err(Error::MessageTooLarge) };
        let acked_big = if nchunks > 64 { vec![0u64; nchunks.div_ceil(64) as usize] } else { Vec::new() };
        self.send_buffered += msg.len();
        self.msgs.push_back(OutMsg { data: msg, nchunks, remaining: nchunks, acked_small: 0, acked_big });
        Ok(())
    }

    /// Starts closing: buffers are dropped, a close packet is sent (and repeated a few times if
    /// the peer keeps talking or does not answer).
    pub(crate) fn close(&mut self, reason: &str) {
        if self.closing.is_some() {
            return;
        }
        self.closing = Some(Closing {
            reason: wire::truncate_reason(reason).to_owned(),
            sends_left: CLOSE_SENDS,
            send_now: true,
            next: None,
        });
        self.msgs.clear();
        self.retx.clear();
        self.sent.clear();
        self.sent_base = self.next_pn;
        self.inflight = 0;
        self.send_buffered = 0;
        self.ooo.clear();
        self.recv_buffered = 0;
        self.ping_pending = false;
    }

    /// True when `poll_transmit` would produce a datagram now.
    pub(crate) fn wants_transmit(&self, cfg: &Config) -> bool {
        if let Some(c) = &self.closing {
            return c.send_now;
        }
        self.ping_pending
            || self.ack_now
            || (self.inflight < cfg.max_inflight_packets
                && (!self.retx.is_empty()
                    || (self.unsent_msg < self.msgs.len() && (self.unsent_msg as u64) < MSG_WINDOW)))
    }

    /// Earliest deadline of this session.
    pub(crate) fn timeout(&self, cfg: &Config) -> Option<Instant> {
        if let Some(c) = &self.closing {
            return c.next;
        }
        let dead = self.last_recv + if self.confirmed { cfg.dead_peer_timeout } else { cfg.connect_timeout };
        let mut t = dead;
        if let Some(a) = self.ack_deadline {
            t = t.min(a);
        }
        if self.inflight > 0 {
            if let Some(Some(p)) = self.sent.front() {
                t = t.min(p.time + self.rto(cfg));
            }
        }
        if self.confirmed && !self.ping_pending {
            t = t.min(self.last_eliciting_sent + cfg.keepalive_interval);
        }
        Some(t)
    }

    /// Runs due timers. `Some(reason)` = the session is over (for a closing session: the close
    /// handshake finished or gave up).
    pub(crate) fn handle_timeout(
        &mut self,
        cfg: &Config,
        now: Instant,
        stats: &mut Stats,
    ) -> Option<DisconnectReason> {
        if let Some(c) = &mut self.closing {
            if c.next.is_some_and(|n| n <= now) {
                if c.sends_left > 0 {
                    c.send_now = true;
                    c.next = None;
                } else {
                    return Some(DisconnectReason::Local(std::mem::take(&mut c.reason)));
                }
            }
            return None;
        }
        let dead = self.last_recv + if self.confirmed { cfg.dead_peer_timeout } else { cfg.connect_timeout };
        if now >= dead {
            return Some(DisconnectReason::Timeout);
        }
        if self.ack_deadline.is_some_and(|d| d <= now) {
            self.ack_deadline = None;
            self.ack_now = true;
        }
        if self.inflight > 0 {
            let rto = self.rto(cfg);
            if let Some(Some(p)) = self.sent.front() {
                if p.time + rto <= now {
                    self.on_rto(now, rto, stats);
                    if self.backoff > cfg.max_retries {
                        return Some(DisconnectReason::Timeout);
                    }
                }
            }
        }
        if self.confirmed && now >= self.last_eliciting_sent + cfg.keepalive_interval {
            self.ping_pending = true;
        }
        None
    }

    fn on_rto(&mut self, now: Instant, rto: Duration, stats: &mut Stats) {
        let mut i = 0;
        while i < self.sent.len() {
            match &self.sent[i] {
                Some(p) if p.time + rto <= now => {
                    if let Some(p) = self.sent[i].take() {
                        self.inflight -= 1;
                        self.lose(p, stats);
                    }
                }
                Some(_) => break,
                None => {}
            }
            i += 1;
        }
        self.trim_sent();
        self.backoff += 1;
        self.rto_cache.set(None);
        if self.retx.is_empty() {
            // Nothing to resend (ping-only packets): probe with a ping so the timer keeps going.
            self.ping_pending = true;
        }
    }

    fn lose(&mut self, mut p: SentPacket, stats: &mut Stats) {
        for &(seq, ci) in &p.chunks {
            if !self.chunk_is_acked(seq, ci) {
                self.retx.push_back((seq, ci));
                stats.retransmits += 1;
            }
        }
        p.chunks.clear();
        self.pool.push(p.chunks);
    }

    fn chunk_is_acked(&self, seq: u64, ci: u32) -> bool {
        if seq < self.msg_base {
            return true;
        }
        match self.msgs.get((seq - self.msg_base) as usize) {
            Some(m) => m.is_acked(ci),
            None => true,
        }
    }

    fn trim_sent(&mut self) {
        while let Some(None) = self.sent.front() {
            self.sent.pop_front();
            self.sent_base += 1;
        }
        if self.sent.is_empty() {
            self.sent_base = self.next_pn;
        }
    }

    /// Builds the next datagram into `buf` (cleared first). False if there is nothing to send.
    pub(crate) fn poll_transmit(&mut self, cfg: &Config, now: Instant, buf: &mut Vec<u8>) -> bool {
        let tag = self.tag_len();
        let rto = self.rto(cfg);
        if let Some(c) = &mut self.closing {
            if !c.send_now {
                return false;
            }
            c.send_now = false;
            c.sends_left = c.sends_left.saturating_sub(1);
            c.next = Some(now + rto);
            let reason = c.reason.clone();
            wire::put_data_header(buf, self.next_pn);
            wire::put_close(buf, &reason);
            self.finish_packet(buf);
            return true;
        }
        let ack_due =
            !self.ack_ranges.is_empty() && (self.ack_now || self.ack_deadline.is_some_and(|d| d <= now));
        if !ack_due && !self.wants_transmit(cfg) {
            return false;
        }
        wire::put_data_header(buf, self.next_pn);
        let wrote_ack = !self.ack_ranges.is_empty();
        if wrote_ack {
            let delay =
                now.saturating_duration_since(self.largest_rx_time).as_micros().min(u128::from(u64::MAX))
                    as u64;
            wire::put_ack(buf, &self.ack_ranges, delay);
        }
        let mut eliciting = false;
        if self.ping_pending {
            buf.push(wire::F_PING);
            self.ping_pending = false;
            eliciting = true;
        }
        let mut chunks = self.pool.pop().unwrap_or_default();
        if self.inflight < cfg.max_inflight_packets {
            // Retransmissions first.
            while let Some(&(seq, ci)) = self.retx.front() {
                if self.chunk_is_acked(seq, ci) {
                    self.retx.pop_front();
                    continue;
                }
                if !self.write_chunk(buf, seq, ci, tag) {
                    break;
                }
                self.retx.pop_front();
                chunks.push((seq, ci));
            }
            // Then new data, if retransmissions left room.
            if self.retx.is_empty() {
                while self.unsent_msg < self.msgs.len() && (self.unsent_msg as u64) < MSG_WINDOW {
                    let seq = self.msg_base + self.unsent_msg as u64;
                    let ci = self.unsent_chunk;
                    if !self.write_chunk(buf, seq, ci, tag) {
                        break;
                    }
                    chunks.push((seq, ci));
                    self.unsent_chunk += 1;
                    if self.unsent_chunk >= self.msgs[self.unsent_msg].nchunks {
                        self.unsent_chunk = 0;
                        self.unsent_msg += 1;
                    }
                }
            }
        }
        eliciting |= !chunks.is_empty();
        if !eliciting && !ack_due {
            buf.clear();
            self.pool.push(chunks);
            return false;
        }
        if wrote_ack {
            self.unacked_eliciting = 0;
            self.ack_deadline = None;
            self.ack_now = false;
        }
        if eliciting {
            self.sent.push_back(Some(SentPacket { time: now, chunks }));
            self.inflight += 1;
            self.last_eliciting_sent = now;
        } else {
            self.pool.push(chunks);
            self.sent.push_back(None);
        }
        self.finish_packet(buf);
        self.trim_sent();
        true
    }

    /// Seals the packet in `buf` (if encrypted) and consumes its packet number.
    fn finish_packet(&mut self, buf: &mut Vec<u8>) {
        if let Some(k) = &self.keys {
            k.seal(self.next_pn, buf);
        }
        self.next_pn += 1;
        if self.closing.is_some() {
            self.sent_base = self.next_pn;
        }
    }

    /// Builds a one-off close packet (the answer to the peer's close).
    pub(crate) fn seal_close_reply(&mut self, buf: &mut Vec<u8>) {
        wire::put_data_header(buf, self.next_pn);
        wire::put_close(buf, "");
        self.finish_packet(buf);
    }

    /// Appends chunk `ci` of message `seq` if it fits the datagram; false otherwise.
    fn write_chunk(&self, buf: &mut Vec<u8>, seq: u64, ci: u32, tag: usize) -> bool {
        let Some(m) = seq.checked_sub(self.msg_base).and_then(|i| self.msgs.get(i as usize)) else {
            return false;
        };
        let room = MAX_DATAGRAM - tag;
        if m.nchunks == 1 {
            if buf.len() + wire::msg_frame_len(seq, m.data.len()) > room {
                return false;
            }
            wire::put_msg(buf, seq, &m.data);
        } else {
            let start = ci as usize * FRAGMENT_SIZE;
            let end = (start + FRAGMENT_SIZE).min(m.data.len());
            let Some(part) = m.data.get(start..end) else { return false };
            if buf.len() + wire::frag_frame_len(seq, m.data.len(), ci, part.len()) > room {
                return false;
            }
            wire::put_frag(buf, seq, m.data.len(), ci, part);
        }
        true
    }

    // ------------------------------------------------------------------ receiving

    fn replay_ok(&self, pn: u64) -> bool {
        match self.largest_rx {
            None => true,
            Some(l) if pn > l => true,
            Some(l) => {
                let d = l - pn;
                d < REPLAY_WINDOW && self.replay & (1u128 << d) == 0
            }
        }
    }

    fn mark_received(&mut self, pn: u64, now: Instant) -> bool {
        let in_order = match self.largest_rx {
            None => {
                self.largest_rx = Some(pn);
                self.replay = 1;
                self.largest_rx_time = now;
                pn == 0
            }
            Some(l) if pn > l => {
                let shift = pn - l;
                self.replay = if shift >= REPLAY_WINDOW { 0 } else { self.replay << shift };
                self.replay |= 1;
                self.largest_rx = Some(pn);
                self.largest_rx_time = now;
                shift == 1
            }
            Some(l) => {
                self.replay |= 1u128 << (l - pn);
                false
            }
        };
        self.insert_range(pn);
        in_order
    }

    fn insert_range(&mut self, pn: u64) {
        let r = &mut self.ack_ranges;
        if let Some(first) = r.first_mut() {
            if pn == first.1 + 1 {
                first.1 = pn;
                return;
            }
        }
        let mut i = 0;
        while i < r.len() && r[i].0 > pn {
            i += 1;
        }
        if i < r.len() && r[i].1 >= pn {
            return;
        }
        let join_above = i > 0 && r[i - 1].0 == pn + 1;
        let join_below = i < r.len() && r[i].1 + 1 == pn;
        match (join_above, join_below) {
            (true, true) => {
                r[i - 1].0 = r[i].0;
                r.remove(i);
            }
            (true, false) => r[i - 1].0 = pn,
            (false, true) => r[i].1 = pn,
            (false, false) => r.insert(i, (pn, pn)),
        }
        if r.len() > MAX_TRACKED_RANGES {
            r.pop();
        }
    }

    /// Handles one data datagram (whole, header included) from the peer.
    pub(crate) fn handle_packet(
        &mut self,
        cfg: &Config,
        now: Instant,
        data: &[u8],
        stats: &mut Stats,
        deliver: &mut dyn FnMut(Vec<u8>),
    ) -> Outcome {
        let Some(pn) = wire::data_pn(data) else {
            stats.malformed += 1;
            return Outcome::Dropped;
        };
        if !self.replay_ok(pn) {
            stats.replayed += 1;
            return Outcome::Dropped;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.extend_from_slice(data);
        let plen = match &self.keys {
            Some(k) => match k.open(pn, &mut scratch) {
                Some(n) => n,
                None => {
                    stats.auth_failed += 1;
                    self.scratch = scratch;
                    return Outcome::Dropped;
                }
            },
            None => data.len() - DATA_HEADER,
        };
        let out = match scratch.get(DATA_HEADER..DATA_HEADER + plen) {
            Some(payload) if !payload.is_empty() => self.process(cfg, now, pn, payload, stats, deliver),
            _ => {
                stats.malformed += 1;
                Outcome::Dropped
            }
        };
        self.scratch = scratch;
        out
    }

    fn process(
        &mut self,
        cfg: &Config,
        now: Instant,
        pn: u64,
        payload: &[u8],
        stats: &mut Stats,
        deliver: &mut dyn FnMut(Vec<u8>),
    ) -> Outcome {
        // Pass 1: validate everything and check buffer room before changing any state, so a
        // dropped packet leaves no trace (and is not acked, so the peer resends it).
        let mut need = 0usize;
        let mut close = None;
        for f in wire::frames(payload) {
            let Some(f) = f else {
                stats.malformed += 1;
                return Outcome::Dropped;
            };
            let ok = match f {
                Frame::Ack(a) => a.largest() < self.next_pn,
                Frame::Ping => true,
                Frame::Msg { seq, data } => {
                    if seq > self.next_deliver
                        && data.len() <= cfg.max_message_size
                        && !self.ooo.contains_key(&seq)
                    {
                        need += data.len();
                    }
                    seq < self.next_deliver + MSG_WINDOW
                }
                Frame::Frag { seq, total, .. } => {
                    let mut ok = seq < self.next_deliver + MSG_WINDOW;
                    if seq >= self.next_deliver {
                        match self.ooo.get(&seq) {
                            Some(Reasm::Partial { buf, .. }) => ok &= buf.len() as u64 == total,
                            None if total <= cfg.max_message_size as u64 && seq != self.next_deliver => {
                                need = need.saturating_add(total as usize);
                            }
                            _ => {}
                        }
                    }
                    ok
                }
                Frame::Close { reason } => {
                    close = Some(reason);
                    true
                }
            };
            if !ok {
                stats.malformed += 1;
                return Outcome::Dropped;
            }
        }
        if self.closing.is_some() {
            // Authenticated packet while closing: a close ends it, anything else gets our close
            // again (bounded by the remaining sends).
            self.mark_received(pn, now);
            if let Some(r) = close {
                return Outcome::Closed(String::from_utf8_lossy(r).into_owned());
            }
            let Some(c) = &mut self.closing else { return Outcome::Ok };
            if c.sends_left > 0 && c.next.is_some() {
                c.send_now = true;
                c.next = None;
            }
            return Outcome::Ok;
        }
        if need > 0 && self.recv_buffered.saturating_add(need) > cfg.max_recv_buffer {
            stats.buffer_full += 1;
            return Outcome::Dropped;
        }
        // Commit.
        let in_order = self.mark_received(pn, now);
        self.last_recv = now;
        self.confirmed = true;
        let mut eliciting = false;
        for f in wire::frames(payload).flatten() {
            match f {
                Frame::Ack(a) => self.on_ack(cfg, now, &a, stats),
                Frame::Ping => eliciting = true,
                Frame::Msg { seq, data } => {
                    eliciting = true;
                    self.on_msg(cfg, seq, data, stats, deliver);
                }
                Frame::Frag { seq, total, index, data } => {
                    eliciting = true;
                    self.on_frag(cfg, seq, total, index, data, stats, deliver);
                }
                Frame::Close { reason } => {
                    return Outcome::Closed(String::from_utf8_lossy(reason).into_owned())
                }
            }
        }
        if eliciting {
            self.unacked_eliciting += 1;
            if self.unacked_eliciting >= 2 || !in_order {
                self.ack_now = true;
            } else if self.ack_deadline.is_none() {
                self.ack_deadline = Some(now + cfg.max_ack_delay);
            }
        }
        Outcome::Ok
    }

    fn on_ack(&mut self, cfg: &Config, now: Instant, a: &wire::AckFrame, stats: &mut Stats) {
        let largest = a.largest();
        let end = self.sent_base + self.sent.len() as u64;
        let mut newly = false;
        let mut sample = None;
        for &(lo, hi) in a.ranges() {
            let lo = lo.max(self.sent_base);
            let hi = hi.min(end.saturating_sub(1));
            if self.sent.is_empty() || lo > hi {
                continue;
            }
            for pn in lo..=hi {
                let idx = (pn - self.sent_base) as usize;
                if let Some(p) = self.sent.get_mut(idx).and_then(Option::take) {
                    self.inflight -= 1;
                    newly = true;
                    if pn == largest {
                        sample = Some(now.saturating_duration_since(p.time));
                    }
                    for &(seq, ci) in &p.chunks {
                        self.chunk_acked(seq, ci);
                    }
                    let mut v = p.chunks;
                    v.clear();
                    self.pool.push(v);
                }
            }
        }
        if newly && self.backoff != 0 {
            self.backoff = 0;
            self.rto_cache.set(None);
        }
        if let Some(mut r) = sample {
            self.rto_cache.set(None);
            let delay = Duration::from_micros(a.delay_us).min(cfg.max_ack_delay);
            if r > delay {
                r -= delay;
            }
            match self.srtt {
                None => {
                    self.srtt = Some(r);
                    self.rttvar = r / 2;
                }
                Some(s) => {
                    let d = s.abs_diff(r);
                    self.rttvar = self.rttvar * 3 / 4 + d / 4;
                    self.srtt = Some(s * 7 / 8 + r / 8);
                }
            }
        }
        // Packet-threshold loss detection.
        if largest >= PACKET_THRESHOLD {
            let limit = (largest - PACKET_THRESHOLD + 1).min(self.sent_base + self.sent.len() as u64);
            let mut pn = self.sent_base;
            while pn < limit {
                let idx = (pn - self.sent_base) as usize;
                if let Some(p) = self.sent.get_mut(idx).and_then(Option::take) {
                    self.inflight -= 1;
                    self.lose(p, stats);
                }
                pn += 1;
            }
        }
        self.trim_sent();
    }

    fn chunk_acked(&mut self, seq: u64, ci: u32) {
        let Some(idx) = seq.checked_sub(self.msg_base) else { return };
        let Some(m) = self.msgs.get_mut(idx as usize) else { return };
        if m.set_acked(ci) {
            m.remaining -= 1;
            if m.remaining == 0 {
                self.send_buffered -= m.data.len();
                m.data = Vec::new();
                m.acked_big = Vec::new();
            }
        }
        while self.unsent_msg > 0 && self.msgs.front().is_some_and(|m| m.remaining == 0) {
            self.msgs.pop_front();
            self.msg_base += 1;
            self.unsent_msg -= 1;
        }
    }

    fn discard(&mut self, seq: u64, stats: &mut Stats, deliver: &mut dyn FnMut(Vec<u8>)) {
        if self.ooo.contains_key(&seq) {
            return;
        }
        stats.oversized_messages += 1;
        if seq == self.next_deliver {
            self.next_deliver += 1;
            self.drain(deliver);
        } else {
            self.ooo.insert(seq, Reasm::Discard);
        }
    }

    fn on_msg(
        &mut self,
        cfg: &Config,
        seq: u64,
        data: &[u8],
        stats: &mut Stats,
        deliver: &mut dyn FnMut(Vec<u8>),
    ) {
        if seq < self.next_deliver {
            return; // duplicate of a delivered message
        }
        if data.len() > cfg.max_message_size {
            return self.discard(seq, stats, deliver);
        }
        if self.ooo.contains_key(&seq) {
            return;
        }
        if seq == self.next_deliver {
            deliver(data.to_vec());
            self.next_deliver += 1;
            self.drain(deliver);
        } else {
            self.recv_buffered += data.len();
            self.ooo.insert(seq, Reasm::Complete(data.to_vec()));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_frag(
        &mut self,
        cfg: &Config,
        seq: u64,
        total: u64,
        index: u64,
        data: &[u8],
        stats: &mut Stats,
        deliver: &mut dyn FnMut(Vec<u8>),
    ) {
        if seq < self.next_deliver {
            return;
        }
        if total > cfg.max_message_size as u64 {
            return self.discard(seq, stats, deliver);
        }
        let total = total as usize;
        let recv_buffered = &mut self.recv_buffered;
        let entry = self.ooo.entry(seq).or_insert_with(|| {
            *recv_buffered += total;
            let n = wire::frag_count(total as u64);
            Reasm::Partial { buf: vec![0u8; total], got: vec![0u64; n.div_ceil(64) as usize], missing: n }
        });
        let Reasm::Partial { buf, got, missing } = entry else { return };
        let (w, b) = ((index / 64) as usize, index % 64);
        let (Some(word), Some(dst)) = (got.get_mut(w), buf.get_mut(index as usize * FRAGMENT_SIZE..)) else {
            return;
        };
        if *word & (1u64 << b) != 0 {
            return;
        }
        let Some(dst) = dst.get_mut(..data.len()) else { return };
        dst.copy_from_slice(data);
        *word |= 1u64 << b;
        *missing -= 1;
        if *missing == 0 {
            let full = std::mem::take(buf);
            *entry = Reasm::Complete(full);
            if seq == self.next_deliver {
                self.drain(deliver);
            }
        }
    }

    /// Delivers every complete message that is next in order.
    fn drain(&mut self, deliver: &mut dyn FnMut(Vec<u8>)) {
        while let Some(e) = self.ooo.first_entry() {
            if *e.key() != self.next_deliver || matches!(e.get(), Reasm::Partial { .. }) {
                break;
            }
            match e.remove() {
                Reasm::Complete(v) => {
                    self.recv_buffered -= v.len();
                    deliver(v);
                }
                Reasm::Discard | Reasm::Partial { .. } => {}
            }
            self.next_deliver += 1;
        }
    }
}
