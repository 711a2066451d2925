//! Entry functions shared by the fuzz targets (`fuzz/fuzz_targets/rpc_*.rs`) and the seed
//! corpus replay test (`tests/fuzz_seeds_rpc.rs`). Each takes arbitrary bytes and must never
//! panic; the only assertions are protocol invariants (datagram size limits, no reply larger
//! than the request before the address is proven).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;

use super::envelope::Envelope;
use super::wire::{self, DATA_HEADER};
use super::{Client, ClientEvent, Config, ConnId, Server, ServerEvent, MAX_DATAGRAM};

/// Every decoder on arbitrary bytes: handshake packets, data frames, envelopes.
pub fn packet(data: &[u8]) {
    let _ = wire::decode_hello(data);
    let _ = wire::decode_retry(data);
    let _ = wire::decode_server_hello(data);
    let _ = wire::decode_reject(data);
    let _ = wire::data_pn(data);
    for f in wire::frames(data) {
        if f.is_none() {
            break;
        }
    }
    if let Some(p) = data.get(DATA_HEADER..) {
        let _ = wire::frames(p).map_while(|f| f).count();
    }
    if let Ok(e) = Envelope::decode(data) {
        let mut out = Vec::new();
        e.encode(&mut out);
        assert_eq!(Envelope::decode(&out), Ok(e), "envelope re-encoding must round-trip");
    }
}

/// A client and a server joined by a perfect in-memory link on virtual time.
pub(crate) struct Pair {
    pub server: Server,
    pub client: Client,
    pub now: Instant,
    pub server_addr: SocketAddr,
    pub client_addr: SocketAddr,
    pub conn: Option<ConnId>,
    pub server_msgs: Vec<Vec<u8>>,
    pub client_msgs: Vec<Vec<u8>>,
    pub client_events: Vec<ClientEvent>,
    buf: Vec<u8>,
}

impl Pair {
    pub(crate) fn new(config: Config) -> Self {
        let rng = SystemRandom::new();
        let now = Instant::now();
        let server_addr: SocketAddr = "10.0.0.1:4000".parse().unwrap_or_else(|_| unreachable!());
        let client_addr: SocketAddr = "10.0.0.2:5000".parse().unwrap_or_else(|_| unreachable!());
        let server = Server::new(config.clone(), [1; 32], [2; 32], Box::new(SystemRandom::new()));
        let client = match Client::new(config, server_addr, Some(server.public_key()), now, &rng) {
            Ok(c) => c,
            Err(e) => panic!("client: {e}"),
        };
        Pair {
            server,
            client,
            now,
            server_addr,
            client_addr,
            conn: None,
            server_msgs: Vec::new(),
            client_msgs: Vec::new(),
            client_events: Vec::new(),
            buf: Vec::with_capacity(MAX_DATAGRAM),
        }
    }

    /// Delivers everything both sides want to send (repeatedly, until quiet) and drains events.
    pub(crate) fn exchange(&mut self) {
        for _ in 0..64 {
            let mut moved = false;
            while let Some(to) = self.client.poll_transmit(self.now, &mut self.buf) {
                assert!(self.buf.len() <= MAX_DATAGRAM);
                assert_eq!(to, self.server_addr);
                self.server.handle_datagram(self.now, self.client_addr, &self.buf);
                moved = true;
            }
            while let Some(to) = self.server.poll_transmit(self.now, &mut self.buf) {
                assert!(self.buf.len() <= MAX_DATAGRAM);
                if to == self.client_addr {
                    self.client.handle_datagram(self.now, self.server_addr, &self.buf);
                }
                moved = true;
            }
            self.drain_events();
            if !moved {
                break;
            }
        }
    }

    pub(crate) fn drain_events(&mut self) {
        while let Some(e) = self.server.poll_event() {
            match e {
                ServerEvent::Connected { conn, .. } => self.conn = Some(conn),
                ServerEvent::Message { data, .. } => self.server_msgs.push(data),
                ServerEvent::Disconnected { .. } => {}
            }
        }
        while let Some(e) = self.client.poll_event() {
            match e {
                ClientEvent::Message(m) => self.client_msgs.push(m),
                e => self.client_events.push(e),
            }
        }
    }

    /// Advances virtual time and runs timers on both sides.
    pub(crate) fn advance(&mut self, d: Duration) {
        self.now += d;
        self.client.handle_timeout(self.now);
        self.server.handle_timeout(self.now);
    }

    /// Runs the handshake to completion over the perfect link.
    pub(crate) fn connect(&mut self) {
        for _ in 0..4 {
            self.exchange();
            self.advance(Duration::from_millis(6));
        }
        self.exchange();
    }
}

/// Splits fuzz input into `(op, bytes)` records: op byte, length byte, that many bytes.
fn records(data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = data;
    std::iter::from_fn(move || {
        let (&op, r) = rest.split_first()?;
        let (&len, r) = r.split_first().unwrap_or((&0, &[]));
        let n = (len as usize).min(r.len());
        let (body, r) = r.split_at(n);
        rest = r;
        Some((op, body))
    })
}

/// A server fed arbitrary datagrams from a few addresses, interleaved with a real client
/// handshake whose packets the input may corrupt or drop. Checks the anti-amplification rule:
/// before a session exists for an address, no reply is larger than the datagram that caused it.
pub fn handshake(data: &[u8]) {
    let cfg = Config { encryption: data.first().is_none_or(|b| b & 1 == 0), ..Config::default() };
    let mut p = Pair::new(cfg);
    let mut buf = Vec::new();
    for (op, body) in records(data.get(1..).unwrap_or(&[])) {
        match op % 6 {
            0 | 1 => {
                // Stranger from one of four spoofed addresses.
                let from: SocketAddr = SocketAddr::from(([192, 0, 2, op >> 6], 1000 + u16::from(op & 0x30)));
                let before = p.server.session_count();
                p.server.handle_datagram(p.now, from, body);
                while let Some(to) = p.server.poll_transmit(p.now, &mut buf) {
                    if to == from && before == p.server.session_count() && p.server.session_count() == 0 {
                        assert!(buf.len() <= body.len(), "amplification: {} > {}", buf.len(), body.len());
                    }
                }
            }
            2 => p.client.handle_datagram(p.now, p.server_addr, body),
            3 => {
                // Corrupt the client's next datagram.
                if let Some(_to) = p.client.poll_transmit(p.now, &mut buf) {
                    if let (Some(&i), Some(&x)) = (body.first(), body.get(1)) {
                        let n = buf.len();
                        if n > 0 {
                            buf[i as usize % n] ^= x;
                        }
                    }
                    p.server.handle_datagram(p.now, p.client_addr, &buf);
                }
            }
            4 => {
                // Corrupt the server's next datagram.
                if let Some(to) = p.server.poll_transmit(p.now, &mut buf) {
                    if let (Some(&i), Some(&x)) = (body.first(), body.get(1)) {
                        let n = buf.len();
                        if n > 0 {
                            buf[i as usize % n] ^= x;
                        }
                    }
                    if to == p.client_addr {
                        p.client.handle_datagram(p.now, p.server_addr, &buf);
                    }
                }
            }
            _ => {
                p.advance(Duration::from_millis(u64::from(body.first().copied().unwrap_or(1)) * 10));
                p.exchange();
            }
        }
        p.drain_events();
    }
    p.connect();
}

/// A connected pair (plain or encrypted by the first byte); the rest of the input is a script of
/// injected datagrams (both directions), sends, time steps, corruptions and losses.
pub fn session(data: &[u8]) {
    let cfg = Config {
        encryption: data.first().is_some_and(|b| b & 1 == 1),
        max_message_size: 8192,
        max_recv_buffer: 16384,
        ..Config::default()
    };
    let mut p = Pair::new(cfg);
    p.connect();
    let mut buf = Vec::new();
    for (op, body) in records(data.get(1..).unwrap_or(&[])) {
        match op % 8 {
            0 => p.server.handle_datagram(p.now, p.client_addr, body),
            1 => p.client.handle_datagram(p.now, p.server_addr, body),
            2 => p.advance(Duration::from_millis(u64::from(body.first().copied().unwrap_or(1)) * 20)),
            3 => {
                let _ = p.client.send(body.repeat(usize::from(op >> 3) + 1));
            }
            4 => {
                if let Some(c) = p.conn {
                    let _ = p.server.send(c, body.repeat(usize::from(op >> 3) + 1));
                }
            }
            5 => p.exchange(),
            6 => {
                // Drop the next datagram of one side (loss).
                if op & 0x80 == 0 {
                    let _ = p.client.poll_transmit(p.now, &mut buf);
                } else {
                    let _ = p.server.poll_transmit(p.now, &mut buf);
                }
            }
            _ => {
                // Duplicate/replay the client's next datagram, possibly corrupted.
                if p.client.poll_transmit(p.now, &mut buf).is_some() {
                    p.server.handle_datagram(p.now, p.client_addr, &buf);
                    if let (Some(&i), Some(&x)) = (body.first(), body.get(1)) {
                        let n = buf.len();
                        buf[i as usize % n] ^= x;
                    }
                    p.server.handle_datagram(p.now, p.client_addr, &buf);
                }
            }
        }
        p.drain_events();
    }
    if op_close(data) {
        p.client.close("fuzz done");
    }
    p.exchange();
}

fn op_close(data: &[u8]) -> bool {
    data.first().is_some_and(|b| b & 2 == 2)
}

/// Writes the seed corpus (`fuzz/corpus/rpc_*`): real datagrams captured from a handshake and a
/// session, envelopes, and small scripts. Run with `cargo test … -- --ignored write_fuzz_corpus`.
#[cfg(test)]
mod corpus {
    use super::*;
    use std::path::PathBuf;

    fn write(target: &str, name: &str, bytes: &[u8]) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    fn rec(op: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![op, body.len().min(255) as u8];
        v.extend_from_slice(&body[..body.len().min(255)]);
        v
    }

    #[test]
    #[ignore]
    fn write_fuzz_corpus() {
        // Capture real datagrams of a plain session.
        let mut p = Pair::new(Config { encryption: false, ..Config::default() });
        let mut captured: Vec<Vec<u8>> = Vec::new();
        let mut buf = Vec::new();
        for _ in 0..6 {
            while p.client.poll_transmit(p.now, &mut buf).is_some() {
                captured.push(buf.clone());
                p.server.handle_datagram(p.now, p.client_addr, &buf);
            }
            while p.server.poll_transmit(p.now, &mut buf).is_some() {
                captured.push(buf.clone());
                p.client.handle_datagram(p.now, p.server_addr, &buf);
            }
            p.drain_events();
            p.advance(Duration::from_millis(6));
            if let (Some(conn), true) = (p.conn, captured.len() < 12) {
                let _ = p.client.send(b"\x01\x01\x08api/echo\xa2hi");
                let _ = p.server.send(conn, vec![7u8; 2500]);
            }
        }
        p.client.close("bye");
        while p.client.poll_transmit(p.now, &mut buf).is_some() {
            captured.push(buf.clone());
        }
        for (i, d) in captured.iter().enumerate() {
            write("rpc_packet", &format!("captured_{i:02}"), d);
        }
        let mut env = Vec::new();
        Envelope::Request { id: 1, path: "api/echo", args: b"\x81\xa4text\xa2hi", noawait: false }
            .encode(&mut env);
        write("rpc_packet", "env_request", &env);
        env.clear();
        Envelope::Response { id: 1, result: Err("bad") }.encode(&mut env);
        write("rpc_packet", "env_error", &env);

        // Handshake scripts: strangers (a short garbage datagram, a hello), corruptions, time.
        let mut hello = Vec::new();
        wire::encode_hello(&mut hello, wire::FLAG_ENCRYPTED, &[9; 32], None);
        let hello_rec = {
            // A 1200-byte hello does not fit a 255-byte record: send its first 255 bytes (bad
            // length) plus a proper retry-able hello via the real client.
            rec(0, &hello[..255])
        };
        let mut s = vec![0u8];
        s.extend(rec(0, b"\x01\x10garbage"));
        s.extend(hello_rec);
        s.extend(rec(5, &[1]));
        s.extend(rec(3, &[40, 0xff]));
        s.extend(rec(5, &[30]));
        s.extend(rec(4, &[5, 1]));
        s.extend(rec(5, &[100]));
        write("rpc_handshake", "script_encrypted", &s);
        s[0] = 1;
        write("rpc_handshake", "script_plain", &s);
        write("rpc_handshake", "empty", &[]);

        // Session scripts (plain: injected frames reach the frame parser).
        let mut s = vec![2u8];
        s.extend(rec(3, b"hello server"));
        s.extend(rec(5, &[]));
        s.extend(rec(4 | (3 << 3), &[0xab; 200]));
        s.extend(rec(6, &[]));
        s.extend(rec(2, &[20]));
        s.extend(rec(5, &[]));
        if let Some(d) = captured.iter().find(|d| d.len() > 20 && d.len() < 250 && d[1] == wire::T_DATA) {
            s.extend(rec(0, d));
            s.extend(rec(1, d));
        }
        let mut forged = Vec::new();
        wire::put_data_header(&mut forged, 99);
        wire::put_ack(&mut forged, &[(0, 3)], 5);
        wire::put_msg(&mut forged, 0, b"dup");
        wire::put_frag(&mut forged, 5, 3000, 2, &[0; 3000 - 2048]);
        s.extend(rec(0, &forged[..forged.len().min(255)]));
        s.extend(rec(7, &[12, 0x40]));
        s.extend(rec(2, &[255]));
        s.extend(rec(5, &[]));
        write("rpc_session", "script_plain", &s);
        s[0] = 3;
        write("rpc_session", "script_encrypted", &s);
        write("rpc_session", "empty", &[]);
    }
}
