//! Handshake cryptography: cookies, transcript, signatures, key schedule, packet AEAD.

use std::net::SocketAddr;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::digest;
use ring::hkdf;
use ring::hmac;
use ring::signature::{self, Ed25519KeyPair, KeyPair};

use super::wire::{COOKIE_LEN, DATA_HEADER, KEY_LEN, SIG_LEN, TAG_LEN};
use super::VERSION;

/// Seconds per cookie time bucket; a cookie is valid in its bucket and the next one.
pub(crate) const COOKIE_BUCKET_SECS: u64 = 10;

const TRANSCRIPT_LABEL: &[u8] = b"luna-rpc/1 transcript";
const SIGN_LABEL: &[u8] = b"luna-rpc/1 server hello";
const REJECT_LABEL: &[u8] = b"luna-rpc/1 reject";
const COOKIE_LABEL: &[u8] = b"luna-rpc/1 cookie";

fn addr_bytes(addr: &SocketAddr) -> [u8; 18] {
    let mut out = [0u8; 18];
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    };
    out[..16].copy_from_slice(&ip);
    out[16..].copy_from_slice(&addr.port().to_be_bytes());
    out
}

/// Stateless address-validation cookies: `bucket (u32 LE) ‖ HMAC-SHA256(secret, label ‖ bucket ‖
/// addr ‖ flags ‖ client key)[..16]`.
pub(crate) struct CookieKey(hmac::Key);

impl CookieKey {
    pub(crate) fn new(secret: &[u8; 32]) -> Self {
        CookieKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    fn mac(&self, bucket: u32, addr: &SocketAddr, flags: u8, client_key: &[u8; KEY_LEN]) -> [u8; 16] {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(COOKIE_LABEL);
        ctx.update(&bucket.to_le_bytes());
        ctx.update(&addr_bytes(addr));
        ctx.update(&[flags]);
        ctx.update(client_key);
        let tag = ctx.sign();
        let mut out = [0u8; 16];
        out.copy_from_slice(&tag.as_ref()[..16]);
        out
    }

    pub(crate) fn make(
        &self,
        bucket: u32,
        addr: &SocketAddr,
        flags: u8,
        client_key: &[u8; KEY_LEN],
    ) -> [u8; COOKIE_LEN] {
        let mut out = [0u8; COOKIE_LEN];
        out[..4].copy_from_slice(&bucket.to_le_bytes());
        out[4..].copy_from_slice(&self.mac(bucket, addr, flags, client_key));
        out
    }

    pub(crate) fn verify(
        &self,
        cookie: &[u8; COOKIE_LEN],
        now_bucket: u32,
        addr: &SocketAddr,
        flags: u8,
        client_key: &[u8; KEY_LEN],
    ) -> bool {
        let bucket = u32::from_le_bytes([cookie[0], cookie[1], cookie[2], cookie[3]]);
        if bucket != now_bucket && bucket.wrapping_add(1) != now_bucket {
            return false;
        }
        ct_eq(&cookie[4..], &self.mac(bucket, addr, flags, client_key))
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Transcript hash: SHA-256(label ‖ version ‖ flags ‖ client eph ‖ server eph ‖ cookie ‖ server
/// static key). Keys are derived from it and the server signs it.
pub(crate) fn transcript(
    flags: u8,
    client_eph: &[u8; KEY_LEN],
    server_eph: &[u8; KEY_LEN],
    cookie: &[u8; COOKIE_LEN],
    server_static: &[u8; KEY_LEN],
) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(TRANSCRIPT_LABEL);
    ctx.update(&[VERSION, flags]);
    ctx.update(client_eph);
    ctx.update(server_eph);
    ctx.update(cookie);
    ctx.update(server_static);
    let d = ctx.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The server's long-term Ed25519 identity.
pub(crate) struct Identity {
    pair: Ed25519KeyPair,
    public: [u8; KEY_LEN],
}

impl Identity {
    pub(crate) fn from_seed(seed: &[u8; 32]) -> Self {
        // A 32-byte seed is always accepted by ring (the check is only on its length).
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).expect("32-byte Ed25519 seed");
        let mut public = [0u8; KEY_LEN];
        public.copy_from_slice(pair.public_key().as_ref());
        Identity { pair, public }
    }
    pub(crate) fn public(&self) -> [u8; KEY_LEN] {
        self.public
    }
    fn sign2(&self, label: &[u8], body: &[u8]) -> [u8; SIG_LEN] {
        let mut msg = [0u8; 64];
        let n = label.len() + body.len();
        msg[..label.len()].copy_from_slice(label);
        msg[label.len()..n].copy_from_slice(body);
        let sig = self.pair.sign(&msg[..n]);
        let mut out = [0u8; SIG_LEN];
        out.copy_from_slice(sig.as_ref());
        out
    }
    pub(crate) fn sign_transcript(&self, th: &[u8; 32]) -> [u8; SIG_LEN] {
        self.sign2(SIGN_LABEL, th)
    }
    pub(crate) fn sign_reject(&self, code: u8, client_eph: &[u8; KEY_LEN]) -> [u8; SIG_LEN] {
        let mut body = [0u8; 33];
        body[0] = code;
        body[1..].copy_from_slice(client_eph);
        self.sign2(REJECT_LABEL, &body)
    }
}

fn verify2(public: &[u8; KEY_LEN], label: &[u8], body: &[u8], sig: &[u8; SIG_LEN]) -> bool {
    let mut msg = [0u8; 64];
    let n = label.len() + body.len();
    msg[..label.len()].copy_from_slice(label);
    msg[label.len()..n].copy_from_slice(body);
    signature::UnparsedPublicKey::new(&signature::ED25519, public).verify(&msg[..n], sig).is_ok()
}

pub(crate) fn verify_transcript(public: &[u8; KEY_LEN], th: &[u8; 32], sig: &[u8; SIG_LEN]) -> bool {
    verify2(public, SIGN_LABEL, th, sig)
}

pub(crate) fn verify_reject(
    public: &[u8; KEY_LEN],
    code: u8,
    client_eph: &[u8; KEY_LEN],
    sig: &[u8; SIG_LEN],
) -> bool {
    let mut body = [0u8; 33];
    body[0] = code;
    body[1..].copy_from_slice(client_eph);
    verify2(public, REJECT_LABEL, &body, sig)
}

/// Per-direction packet keys of one session.
pub(crate) struct PacketKeys {
    tx: LessSafeKey,
    rx: LessSafeKey,
}

/// HKDF-SHA256(salt = transcript hash, ikm = X25519 shared secret); expand with labels
/// `"luna-rpc/1 c2s"` and `"luna-rpc/1 s2c"`.
pub(crate) fn derive_keys(shared: &[u8], th: &[u8; 32], is_server: bool) -> PacketKeys {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, th).extract(shared);
    let key = |label: &[u8]| -> LessSafeKey {
        let info = [label];
        let okm = prk.expand(&info, &CHACHA20_POLY1305).expect("HKDF output length is valid");
        LessSafeKey::new(UnboundKey::from(okm))
    };
    let c2s = key(b"luna-rpc/1 c2s");
    let s2c = key(b"luna-rpc/1 s2c");
    if is_server {
        PacketKeys { tx: s2c, rx: c2s }
    } else {
        PacketKeys { tx: c2s, rx: s2c }
    }
}

fn nonce(pn: u64) -> Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&pn.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

impl PacketKeys {
    /// Encrypts `buf[DATA_HEADER..]` in place (header = AAD) and appends the tag.
    pub(crate) fn seal(&self, pn: u64, buf: &mut Vec<u8>) {
        let mut hdr = [0u8; DATA_HEADER];
        hdr.copy_from_slice(&buf[..DATA_HEADER]);
        let tag = self
            .tx
            .seal_in_place_separate_tag(nonce(pn), Aad::from(&hdr), &mut buf[DATA_HEADER..])
            .expect("ChaCha20-Poly1305 seal of a datagram-sized buffer cannot fail");
        buf.extend_from_slice(tag.as_ref());
    }

    /// Decrypts a whole datagram in `buf` (header ‖ ciphertext ‖ tag); returns the plaintext
    /// length (starting at `DATA_HEADER`).
    pub(crate) fn open(&self, pn: u64, buf: &mut [u8]) -> Option<usize> {
        if buf.len() < DATA_HEADER + TAG_LEN {
            return None;
        }
        let mut hdr = [0u8; DATA_HEADER];
        hdr.copy_from_slice(&buf[..DATA_HEADER]);
        let pt = self.rx.open_in_place(nonce(pn), Aad::from(&hdr), &mut buf[DATA_HEADER..]).ok()?;
        Some(pt.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_binds_address_key_flags_and_time() {
        let k = CookieKey::new(&[1; 32]);
        let a: SocketAddr = "1.2.3.4:5".parse().unwrap();
        let b: SocketAddr = "1.2.3.4:6".parse().unwrap();
        let key = [3u8; 32];
        let c = k.make(100, &a, 1, &key);
        assert!(k.verify(&c, 100, &a, 1, &key));
        assert!(k.verify(&c, 101, &a, 1, &key), "previous bucket still valid");
        assert!(!k.verify(&c, 102, &a, 1, &key), "expired");
        assert!(!k.verify(&c, 99, &a, 1, &key), "from the future");
        assert!(!k.verify(&c, 100, &b, 1, &key), "other address");
        assert!(!k.verify(&c, 100, &a, 0, &key), "other flags");
        assert!(!k.verify(&c, 100, &a, 1, &[4; 32]), "other client key");
        let other = CookieKey::new(&[2; 32]);
        assert!(!other.verify(&c, 100, &a, 1, &key), "other secret");
        let mut t = c;
        t[10] ^= 1;
        assert!(!k.verify(&t, 100, &a, 1, &key), "tampered");
    }

    #[test]
    fn aead_round_trip_and_tamper() {
        let th = [5u8; 32];
        let s = derive_keys(&[9; 32], &th, true);
        let c = derive_keys(&[9; 32], &th, false);
        let mut buf = Vec::new();
        super::super::wire::put_data_header(&mut buf, 42);
        buf.extend_from_slice(b"secret payload");
        c.seal(42, &mut buf);
        let mut copy = buf.clone();
        assert_eq!(s.open(42, &mut copy), Some(14));
        assert_eq!(&copy[DATA_HEADER..DATA_HEADER + 14], b"secret payload");
        let mut copy = buf.clone();
        assert!(s.open(43, &mut copy).is_none(), "wrong nonce");
        let mut copy = buf.clone();
        copy[DATA_HEADER + 1] ^= 1;
        assert!(s.open(42, &mut copy).is_none(), "tampered");
        let mut copy = buf.clone();
        assert!(c.open(42, &mut copy).is_none(), "own direction key does not open");
    }

    #[test]
    fn signatures() {
        let id = Identity::from_seed(&[7; 32]);
        let th = [1u8; 32];
        let sig = id.sign_transcript(&th);
        assert!(verify_transcript(&id.public(), &th, &sig));
        assert!(!verify_transcript(&id.public(), &[2; 32], &sig));
        assert!(!verify_transcript(&Identity::from_seed(&[8; 32]).public(), &th, &sig));
        let rs = id.sign_reject(2, &[3; 32]);
        assert!(verify_reject(&id.public(), 2, &[3; 32], &rs));
        assert!(!verify_reject(&id.public(), 1, &[3; 32], &rs));
    }
}
