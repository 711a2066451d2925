//! Wire codec: varints, packet headers, handshake packets and session frames.
//! Every decoder works on untrusted bytes and returns `None`/`Err` instead of panicking.

use super::{FRAGMENT_SIZE, HELLO_SIZE, MAX_REASON, VERSION};

/// Packet types (second byte of every datagram).
pub(crate) const T_HELLO: u8 = 1;
pub(crate) const T_RETRY: u8 = 2;
pub(crate) const T_SERVER_HELLO: u8 = 3;
pub(crate) const T_REJECT: u8 = 4;
pub(crate) const T_DATA: u8 = 16;

/// Frame types inside a data packet payload.
pub(crate) const F_ACK: u8 = 1;
pub(crate) const F_PING: u8 = 2;
pub(crate) const F_MSG: u8 = 3;
pub(crate) const F_FRAG: u8 = 4;
pub(crate) const F_CLOSE: u8 = 5;

/// Hello flag: the client wants encryption.
pub(crate) const FLAG_ENCRYPTED: u8 = 1;

pub(crate) const COOKIE_LEN: usize = 20;
pub(crate) const KEY_LEN: usize = 32;
pub(crate) const SIG_LEN: usize = 64;
pub(crate) const TAG_LEN: usize = 16;
/// Data packet header: version, type, 8-byte little-endian packet number.
pub(crate) const DATA_HEADER: usize = 10;
/// Server hello: ver, type, flags, server ephemeral key, server static key, signature.
pub(crate) const SERVER_HELLO_LEN: usize = 3 + KEY_LEN + KEY_LEN + SIG_LEN;
/// Reject: ver, type, reason code, signature.
pub(crate) const REJECT_LEN: usize = 3 + SIG_LEN;
/// Retry: ver, type, cookie.
pub(crate) const RETRY_LEN: usize = 2 + COOKIE_LEN;
/// Most ack ranges (besides the first) in one ack frame.
pub(crate) const MAX_ACK_RANGES: usize = 16;
/// Byte budget an ack frame may take in a packet.
pub(crate) const ACK_BUDGET: usize = 100;

/// Reject reason codes.
pub(crate) const REJECT_MODE: u8 = 1;
pub(crate) const REJECT_BUSY: u8 = 2;

pub(crate) fn reject_text(code: u8) -> &'static str {
    match code {
        REJECT_MODE => "encryption mismatch",
        REJECT_BUSY => "server full",
        _ => "refused",
    }
}

// ---------------------------------------------------------------- varints (LEB128, ≤ 10 bytes)

pub(crate) fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

pub(crate) fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// A bounds-checked cursor over untrusted bytes.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let r = self.buf.get(self.pos..).unwrap_or(&[]);
        self.pos = self.buf.len();
        r
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }
    pub(crate) fn varint(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return None; // overflow past 64 bits
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return None; // non-minimal encoding
                }
                return Some(v);
            }
        }
        None
    }
    /// A varint that must fit `usize` and be at most `max`.
    pub(crate) fn len(&mut self, max: usize) -> Option<usize> {
        let v = self.varint()?;
        if v > max as u64 {
            return None;
        }
        Some(v as usize)
    }
}

// ---------------------------------------------------------------- handshake packets

/// A parsed client hello.
pub(crate) struct Hello<'a> {
    pub flags: u8,
    pub client_key: [u8; KEY_LEN],
    pub cookie: Option<&'a [u8; COOKIE_LEN]>,
}

pub(crate) fn encode_hello(
    buf: &mut Vec<u8>,
    flags: u8,
    key: &[u8; KEY_LEN],
    cookie: Option<&[u8; COOKIE_LEN]>,
) {
    buf.clear();
    buf.extend_from_slice(&[VERSION, T_HELLO, flags]);
    buf.extend_from_slice(key);
    match cookie {
        Some(c) => {
            buf.push(COOKIE_LEN as u8);
            buf.extend_from_slice(c);
        }
        None => buf.push(0),
    }
    buf.resize(HELLO_SIZE, 0);
}

/// `data` starts at the version byte. Hellos must be exactly `HELLO_SIZE` with zero padding.
pub(crate) fn decode_hello(data: &[u8]) -> Option<Hello<'_>> {
    if data.len() != HELLO_SIZE {
        return None;
    }
    let mut r = Reader::new(data.get(2..)?);
    let flags = r.u8()?;
    if flags & !FLAG_ENCRYPTED != 0 {
        return None;
    }
    let client_key = r.array::<KEY_LEN>()?;
    let cookie = match r.u8()? {
        0 => None,
        n if n as usize == COOKIE_LEN => Some(r.bytes(COOKIE_LEN)?.try_into().ok()?),
        _ => return None,
    };
    if r.rest().iter().any(|&b| b != 0) {
        return None;
    }
    Some(Hello { flags, client_key, cookie })
}

pub(crate) fn encode_retry(out: &mut [u8; RETRY_LEN], cookie: &[u8; COOKIE_LEN]) {
    out[0] = VERSION;
    out[1] = T_RETRY;
    out[2..].copy_from_slice(cookie);
}

pub(crate) fn decode_retry(data: &[u8]) -> Option<[u8; COOKIE_LEN]> {
    if data.len() != RETRY_LEN {
        return None;
    }
    data.get(2..)?.try_into().ok()
}

pub(crate) struct ServerHello {
    pub flags: u8,
    pub server_eph: [u8; KEY_LEN],
    pub server_static: [u8; KEY_LEN],
    pub signature: [u8; SIG_LEN],
}

pub(crate) fn encode_server_hello(sh: &ServerHello) -> [u8; SERVER_HELLO_LEN] {
    let mut out = [0u8; SERVER_HELLO_LEN];
    out[0] = VERSION;
    out[1] = T_SERVER_HELLO;
    out[2] = sh.flags;
    out[3..35].copy_from_slice(&sh.server_eph);
    out[35..67].copy_from_slice(&sh.server_static);
    out[67..].copy_from_slice(&sh.signature);
    out
}

pub(crate) fn decode_server_hello(data: &[u8]) -> Option<ServerHello> {
    if data.len() != SERVER_HELLO_LEN {
        return None;
    }
    let mut r = Reader::new(data.get(2..)?);
    Some(ServerHello {
        flags: r.u8()?,
        server_eph: r.array()?,
        server_static: r.array()?,
        signature: r.array()?,
    })
}

pub(crate) fn encode_reject(code: u8, signature: &[u8; SIG_LEN]) -> [u8; REJECT_LEN] {
    let mut out = [0u8; REJECT_LEN];
    out[0] = VERSION;
    out[1] = T_REJECT;
    out[2] = code;
    out[3..].copy_from_slice(signature);
    out
}

pub(crate) fn decode_reject(data: &[u8]) -> Option<(u8, [u8; SIG_LEN])> {
    if data.len() != REJECT_LEN {
        return None;
    }
    let mut r = Reader::new(data.get(2..)?);
    Some((r.u8()?, r.array()?))
}

// ---------------------------------------------------------------- data packets

pub(crate) fn put_data_header(buf: &mut Vec<u8>, pn: u64) {
    buf.clear();
    buf.push(VERSION);
    buf.push(T_DATA);
    buf.extend_from_slice(&pn.to_le_bytes());
}

pub(crate) fn data_pn(data: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(data.get(2..DATA_HEADER)?.try_into().ok()?))
}

/// A decoded ack frame: inclusive `(low, high)` ranges, highest first.
#[derive(Clone, Debug)]
pub(crate) struct AckFrame {
    pub delay_us: u64,
    pub ranges: [(u64, u64); MAX_ACK_RANGES + 1],
    pub n: usize,
}

impl AckFrame {
    pub(crate) fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges[..self.n]
    }
    pub(crate) fn largest(&self) -> u64 {
        self.ranges[0].1
    }
}

/// One frame of a data packet payload. Decoded on the stack, never boxed (the ack variant is the
/// big one on purpose: no allocation per packet).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Frame<'a> {
    Ack(AckFrame),
    Ping,
    /// A whole message (≤ FRAGMENT_SIZE bytes).
    Msg {
        seq: u64,
        data: &'a [u8],
    },
    /// Fragment `index` of a message of `total` bytes.
    Frag {
        seq: u64,
        total: u64,
        index: u64,
        data: &'a [u8],
    },
    Close {
        reason: &'a [u8],
    },
}

/// Number of fragments of a message of `total` bytes sent fragmented.
pub(crate) fn frag_count(total: u64) -> u64 {
    total.div_ceil(FRAGMENT_SIZE as u64)
}

/// Length of fragment `index` of a `total`-byte message.
pub(crate) fn frag_len(total: u64, index: u64) -> u64 {
    let start = index.saturating_mul(FRAGMENT_SIZE as u64);
    total.saturating_sub(start).min(FRAGMENT_SIZE as u64)
}

pub(crate) struct FrameIter<'a> {
    r: Reader<'a>,
}

pub(crate) fn frames(payload: &[u8]) -> FrameIter<'_> {
    FrameIter { r: Reader::new(payload) }
}

impl<'a> Iterator for FrameIter<'a> {
    type Item = Option<Frame<'a>>;
    /// `Some(None)` = malformed (stop there).
    fn next(&mut self) -> Option<Self::Item> {
        if self.r.is_empty() {
            return None;
        }
        let f = decode_frame(&mut self.r);
        if f.is_none() {
            self.r.rest();
        }
        Some(f)
    }
}

fn decode_frame<'a>(r: &mut Reader<'a>) -> Option<Frame<'a>> {
    match r.u8()? {
        F_ACK => {
            let largest = r.varint()?;
            let delay_us = r.varint()?;
            let count = r.len(MAX_ACK_RANGES)?;
            let first = r.varint()?;
            let mut lo = largest.checked_sub(first)?;
            let mut ack = AckFrame { delay_us, ranges: [(0, 0); MAX_ACK_RANGES + 1], n: 1 };
            ack.ranges[0] = (lo, largest);
            for i in 0..count {
                let gap = r.varint()?;
                let len = r.varint()?;
                let hi = lo.checked_sub(gap)?.checked_sub(2)?;
                lo = hi.checked_sub(len)?;
                ack.ranges[i + 1] = (lo, hi);
            }
            ack.n = count + 1;
            Some(Frame::Ack(ack))
        }
        F_PING => Some(Frame::Ping),
        F_MSG => {
            let seq = r.varint()?;
            let len = r.len(FRAGMENT_SIZE)?;
            Some(Frame::Msg { seq, data: r.bytes(len)? })
        }
        F_FRAG => {
            let seq = r.varint()?;
            let total = r.varint()?;
            let index = r.varint()?;
            let len = r.len(FRAGMENT_SIZE)?;
            if total <= FRAGMENT_SIZE as u64
                || index >= frag_count(total)
                || len as u64 != frag_len(total, index)
            {
                return None;
            }
            Some(Frame::Frag { seq, total, index, data: r.bytes(len)? })
        }
        F_CLOSE => {
            let len = r.len(MAX_REASON)?;
            Some(Frame::Close { reason: r.bytes(len)? })
        }
        _ => None,
    }
}

/// Encodes an ack frame for `ranges` (inclusive, highest first) within `ACK_BUDGET` bytes.
pub(crate) fn put_ack(buf: &mut Vec<u8>, ranges: &[(u64, u64)], delay_us: u64) {
    let Some(&(lo0, hi0)) = ranges.first() else { return };
    let start = buf.len();
    buf.push(F_ACK);
    put_varint(buf, hi0);
    put_varint(buf, delay_us);
    let count_pos = buf.len();
    buf.push(0); // range count, patched below (always < 128 so one byte)
    put_varint(buf, hi0 - lo0);
    let mut prev_lo = lo0;
    let mut count = 0u8;
    for &(lo, hi) in ranges.iter().skip(1).take(MAX_ACK_RANGES) {
        if hi + 2 > prev_lo || lo > hi {
            break; // not strictly descending with a gap: never produced by our tracker
        }
        let gap = prev_lo - hi - 2;
        let len = hi - lo;
        if buf.len() - start + varint_len(gap) + varint_len(len) > ACK_BUDGET {
            break;
        }
        put_varint(buf, gap);
        put_varint(buf, len);
        prev_lo = lo;
        count += 1;
    }
    buf[count_pos] = count;
}

pub(crate) fn msg_frame_len(seq: u64, len: usize) -> usize {
    1 + varint_len(seq) + varint_len(len as u64) + len
}

pub(crate) fn frag_frame_len(seq: u64, total: usize, index: u32, len: usize) -> usize {
    1 + varint_len(seq)
        + varint_len(total as u64)
        + varint_len(u64::from(index))
        + varint_len(len as u64)
        + len
}

pub(crate) fn put_msg(buf: &mut Vec<u8>, seq: u64, data: &[u8]) {
    buf.push(F_MSG);
    put_varint(buf, seq);
    put_varint(buf, data.len() as u64);
    buf.extend_from_slice(data);
}

pub(crate) fn put_frag(buf: &mut Vec<u8>, seq: u64, total: usize, index: u32, data: &[u8]) {
    buf.push(F_FRAG);
    put_varint(buf, seq);
    put_varint(buf, total as u64);
    put_varint(buf, u64::from(index));
    put_varint(buf, data.len() as u64);
    buf.extend_from_slice(data);
}

pub(crate) fn put_close(buf: &mut Vec<u8>, reason: &str) {
    let r = truncate_reason(reason);
    buf.push(F_CLOSE);
    put_varint(buf, r.len() as u64);
    buf.extend_from_slice(r.as_bytes());
}

pub(crate) fn truncate_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip_and_rejects() {
        for v in [0u64, 1, 127, 128, 300, 1 << 32, u64::MAX - 1, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v));
            assert_eq!(Reader::new(&b).varint(), Some(v));
        }
        assert_eq!(Reader::new(&[0x80]).varint(), None, "truncated");
        assert_eq!(Reader::new(&[0x80, 0x00]).varint(), None, "non-minimal");
        assert_eq!(Reader::new(&[0xff; 10]).varint(), None, "overflow");
        assert_eq!(Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]).varint(), None);
    }

    #[test]
    fn hello_round_trip_and_rejects() {
        let key = [7u8; 32];
        let cookie = [9u8; COOKIE_LEN];
        let mut b = Vec::new();
        encode_hello(&mut b, FLAG_ENCRYPTED, &key, Some(&cookie));
        assert_eq!(b.len(), HELLO_SIZE);
        let h = decode_hello(&b).unwrap();
        assert_eq!((h.flags, h.client_key, h.cookie.copied()), (FLAG_ENCRYPTED, key, Some(cookie)));
        encode_hello(&mut b, 0, &key, None);
        assert!(decode_hello(&b).unwrap().cookie.is_none());
        assert!(decode_hello(&b[..HELLO_SIZE - 1]).is_none(), "short");
        let mut bad = b.clone();
        bad[HELLO_SIZE - 1] = 1;
        assert!(decode_hello(&bad).is_none(), "non-zero padding");
        let mut bad = b.clone();
        bad[2] = 0x80;
        assert!(decode_hello(&bad).is_none(), "unknown flag");
        let mut bad = b.clone();
        bad[35] = 5;
        assert!(decode_hello(&bad).is_none(), "bad cookie length");
    }

    #[test]
    fn handshake_packets_round_trip() {
        let sh = ServerHello { flags: 1, server_eph: [1; 32], server_static: [2; 32], signature: [3; 64] };
        let b = encode_server_hello(&sh);
        let d = decode_server_hello(&b).unwrap();
        assert_eq!((d.flags, d.server_eph, d.server_static, d.signature), (1, [1; 32], [2; 32], [3; 64]));
        assert!(decode_server_hello(&b[..b.len() - 1]).is_none());
        let mut r = [0u8; RETRY_LEN];
        encode_retry(&mut r, &[4; COOKIE_LEN]);
        assert_eq!(decode_retry(&r), Some([4; COOKIE_LEN]));
        assert!(decode_retry(&r[..5]).is_none());
        let rj = encode_reject(REJECT_BUSY, &[5; 64]);
        assert_eq!(decode_reject(&rj), Some((REJECT_BUSY, [5; 64])));
        assert!(decode_reject(&rj[..10]).is_none());
    }

    fn one(payload: &[u8]) -> Option<Frame<'_>> {
        let mut it = frames(payload);
        let f = it.next()??;
        if it.next().is_some() {
            return None;
        }
        Some(f)
    }

    #[test]
    fn frames_round_trip() {
        let mut b = Vec::new();
        put_ack(&mut b, &[(90, 100), (50, 80), (10, 10)], 77);
        let Some(Frame::Ack(a)) = one(&b) else { panic!() };
        assert_eq!(a.ranges(), &[(90, 100), (50, 80), (10, 10)]);
        assert_eq!(a.delay_us, 77);
        b.clear();
        put_msg(&mut b, 5, b"hello");
        assert!(matches!(one(&b), Some(Frame::Msg { seq: 5, data: b"hello" })));
        b.clear();
        let data = vec![1u8; FRAGMENT_SIZE];
        put_frag(&mut b, 6, 3000, 1, &data);
        assert!(matches!(one(&b), Some(Frame::Frag { seq: 6, total: 3000, index: 1, .. })));
        b.clear();
        put_frag(&mut b, 6, 3000, 2, &data[..3000 - 2048]);
        assert!(matches!(one(&b), Some(Frame::Frag { index: 2, .. })));
        b.clear();
        put_close(&mut b, "bye");
        assert!(matches!(one(&b), Some(Frame::Close { reason: b"bye" })));
        assert!(matches!(one(&[F_PING]), Some(Frame::Ping)));
    }

    #[test]
    fn frame_rejects() {
        // unknown type
        assert!(one(&[0x7f]).is_none());
        // truncated message
        let mut b = Vec::new();
        put_msg(&mut b, 1, b"abcdef");
        assert!(one(&b[..b.len() - 1]).is_none());
        // message longer than a fragment
        b.clear();
        b.push(F_MSG);
        put_varint(&mut b, 1);
        put_varint(&mut b, FRAGMENT_SIZE as u64 + 1);
        b.resize(b.len() + FRAGMENT_SIZE + 1, 0);
        assert!(one(&b).is_none());
        // fragment of a message small enough to be whole, wrong length, index out of range
        for (total, index, len) in [(100u64, 0u64, 100usize), (3000, 1, 10), (3000, 3, 952)] {
            b.clear();
            b.push(F_FRAG);
            put_varint(&mut b, 1);
            put_varint(&mut b, total);
            put_varint(&mut b, index);
            put_varint(&mut b, len as u64);
            b.resize(b.len() + len, 0);
            assert!(one(&b).is_none(), "{total} {index} {len}");
        }
        // ack range underflow, too many ranges
        b.clear();
        b.extend_from_slice(&[F_ACK, 5, 0, 0, 6]);
        assert!(one(&b).is_none());
        b.clear();
        b.extend_from_slice(&[F_ACK, 5, 0, 1, 1, 3, 0]);
        assert!(one(&b).is_none(), "gap below zero");
        b.clear();
        b.extend_from_slice(&[F_ACK, 100, 0, (MAX_ACK_RANGES + 1) as u8, 0]);
        assert!(one(&b).is_none());
        // close reason too long
        b.clear();
        b.push(F_CLOSE);
        put_varint(&mut b, MAX_REASON as u64 + 1);
        b.resize(b.len() + MAX_REASON + 1, b'a');
        assert!(one(&b).is_none());
    }

    #[test]
    fn reason_truncation_respects_utf8() {
        let s = "é".repeat(100);
        let t = truncate_reason(&s);
        assert!(t.len() <= MAX_REASON && t.len().is_multiple_of(2));
    }
}
