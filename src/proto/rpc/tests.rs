//! Deterministic simulations of a client/server pair over a lossy link (virtual time, seeded
//! link faults), and the spoofing/amplification/forgery properties.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;

use super::fuzzing::Pair;
use super::wire;
use super::*;

/// xorshift64*: the link's fault injection is reproducible from the seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

struct Sim {
    server: Server,
    client: Client,
    now: Instant,
    start: Instant,
    rng: Rng,
    server_addr: SocketAddr,
    client_addr: SocketAddr,
    loss: f64,
    dup: f64,
    delay_ms: (u64, u64),
    link_up: bool,
    /// (deliver at, to server?, bytes)
    wire: Vec<(Instant, bool, Vec<u8>)>,
    server_events: VecDeque<ServerEvent>,
    client_events: VecDeque<ClientEvent>,
    conn: Option<ConnId>,
    buf: Vec<u8>,
    datagrams: u64,
}

impl Sim {
    fn new(seed: u64, config: Config) -> Self {
        let crypto_rng = SystemRandom::new();
        let now = Instant::now();
        let server_addr: SocketAddr = "192.168.1.1:433".parse().unwrap();
        let client_addr: SocketAddr = "192.168.1.2:50000".parse().unwrap();
        let server = Server::new(config.clone(), [3; 32], [4; 32], Box::new(SystemRandom::new()));
        let client = Client::new(config, server_addr, Some(server.public_key()), now, &crypto_rng).unwrap();
        Sim {
            server,
            client,
            now,
            start: now,
            rng: Rng(seed | 1),
            server_addr,
            client_addr,
            loss: 0.0,
            dup: 0.0,
            delay_ms: (1, 1),
            link_up: true,
            wire: Vec::new(),
            server_events: VecDeque::new(),
            client_events: VecDeque::new(),
            conn: None,
            buf: Vec::new(),
            datagrams: 0,
        }
    }

    fn lossy(mut self, loss: f64, dup: f64, delay_ms: (u64, u64)) -> Self {
        self.loss = loss;
        self.dup = dup;
        self.delay_ms = delay_ms;
        self
    }

    fn put_on_wire(&mut self, to_server: bool) {
        assert!(self.buf.len() <= MAX_DATAGRAM, "datagram of {} bytes", self.buf.len());
        self.datagrams += 1;
        if !self.link_up || self.rng.chance(self.loss) {
            return;
        }
        let copies = if self.rng.chance(self.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let d = Duration::from_micros(self.rng.range(self.delay_ms.0 * 1000, self.delay_ms.1 * 1000));
            self.wire.push((self.now + d, to_server, self.buf.clone()));
        }
    }

    /// One step: transmit, advance virtual time to the next event, deliver, run timers.
    fn step(&mut self) {
        while self.client.poll_transmit(self.now, &mut self.buf).is_some() {
            self.put_on_wire(true);
        }
        while let Some(to) = self.server.poll_transmit(self.now, &mut self.buf) {
            assert_eq!(to, self.client_addr);
            self.put_on_wire(false);
        }
        let mut next = self.now + Duration::from_millis(50);
        for t in [self.client.poll_timeout(), self.server.poll_timeout()].into_iter().flatten() {
            next = next.min(t);
        }
        for (t, _, _) in &self.wire {
            next = next.min(*t);
        }
        self.now = self.now.max(next);
        let now = self.now;
        let mut i = 0;
        while i < self.wire.len() {
            if self.wire[i].0 <= now {
                let (_, to_server, data) = self.wire.swap_remove(i);
                if to_server {
                    self.server.handle_datagram(now, self.client_addr, &data);
                } else {
                    self.client.handle_datagram(now, self.server_addr, &data);
                }
            } else {
                i += 1;
            }
        }
        self.client.handle_timeout(now);
        self.server.handle_timeout(now);
        while let Some(e) = self.server.poll_event() {
            if let ServerEvent::Connected { conn, .. } = e {
                self.conn = Some(conn);
            }
            self.server_events.push_back(e);
        }
        while let Some(e) = self.client.poll_event() {
            self.client_events.push_back(e);
        }
    }

    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        while self.now - self.start < limit {
            if done(self) {
                return true;
            }
            self.step();
        }
        done(self)
    }

    fn connect(&mut self) {
        assert!(self.run_until(Duration::from_secs(30), |s| s.conn.is_some()
            && s.client_events.contains(&ClientEvent::Connected)));
    }

    fn server_msgs(&self) -> Vec<Vec<u8>> {
        self.server_events
            .iter()
            .filter_map(|e| match e {
                ServerEvent::Message { data, .. } => Some(data.clone()),
                _ => None,
            })
            .collect()
    }

    fn client_msgs(&self) -> Vec<Vec<u8>> {
        self.client_events
            .iter()
            .filter_map(|e| match e {
                ClientEvent::Message(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    }
}

fn message(dir: u8, i: usize) -> Vec<u8> {
    // Every 25th message is large (fragmented); sizes vary so fragment counts differ.
    let len = if i % 25 == 7 { 3000 + i * 997 % 60_000 } else { 1 + i * 31 % 700 };
    let mut m = vec![dir; len];
    m[..8.min(len)].copy_from_slice(&(i as u64).to_le_bytes()[..8.min(len)]);
    m
}

fn lossy_transfer(seed: u64, encryption: bool, max_recv_buffer: usize) {
    let cfg = Config { encryption, max_recv_buffer, ..Config::default() };
    let mut sim = Sim::new(seed, cfg).lossy(0.2, 0.05, (2, 40));
    sim.connect();
    let conn = sim.conn.unwrap();
    let n = 400;
    let mut sent = 0;
    // Interleave sends with simulation steps so many messages are in flight at once.
    while sent < n {
        for _ in 0..8 {
            if sent < n {
                sim.client.send(message(b'c', sent)).unwrap();
                sim.server.send(conn, message(b's', sent)).unwrap();
                sent += 1;
            }
        }
        sim.step();
    }
    let done =
        sim.run_until(Duration::from_secs(900), |s| s.server_msgs().len() >= n && s.client_msgs().len() >= n);
    assert!(done, "seed {seed}: got {} / {} messages", sim.server_msgs().len(), sim.client_msgs().len());
    // Let retransmissions and duplicates settle, then check exactly-once in-order delivery.
    sim.run_until(sim.now - sim.start + Duration::from_secs(3), |_| false);
    let expect_c: Vec<_> = (0..n).map(|i| message(b'c', i)).collect();
    let expect_s: Vec<_> = (0..n).map(|i| message(b's', i)).collect();
    assert!(sim.server_msgs() == expect_c, "seed {seed}: server saw a different sequence");
    assert!(sim.client_msgs() == expect_s, "seed {seed}: client saw a different sequence");
    let st = sim.server.stats();
    assert!(
        st.retransmits > 0 && sim.client.stats().retransmits > 0,
        "loss must have caused retransmissions"
    );
    assert!(st.replayed > 0, "duplicated datagrams must have been caught by the replay window");
    assert_eq!(st.auth_failed + st.malformed, 0);
    // Still connected.
    assert!(sim.client.is_connected());
    assert!(!sim.server_events.iter().any(|e| matches!(e, ServerEvent::Disconnected { .. })));
}

#[test]
fn lossy_link_exactly_once_in_order_encrypted() {
    for seed in [1, 2, 3] {
        lossy_transfer(seed, true, Config::default().max_recv_buffer);
    }
}

#[test]
fn lossy_link_exactly_once_in_order_plain() {
    lossy_transfer(11, false, Config::default().max_recv_buffer);
}

#[test]
fn lossy_link_with_tiny_receive_buffer_still_delivers() {
    // Out-of-order buffering capped at 4 KiB: packets that do not fit are dropped unacked (and
    // counted), the next in-order message always fits, so everything still arrives.
    let cfg = Config { max_recv_buffer: 4096, ..Config::default() };
    let mut sim = Sim::new(5, cfg).lossy(0.2, 0.05, (2, 40));
    sim.connect();
    let conn = sim.conn.unwrap();
    let big: Vec<Vec<u8>> = (0..6).map(|i| vec![i as u8; 20_000 + i * 1000]).collect();
    for m in &big {
        sim.server.send(conn, m.as_slice()).unwrap();
    }
    assert!(sim.run_until(Duration::from_secs(300), |s| s.client_msgs().len() == big.len()));
    assert_eq!(sim.client_msgs(), big);
    assert!(sim.client.stats().buffer_full > 0);
}

#[test]
fn dead_peer_detected_within_configured_time() {
    let cfg = Config {
        dead_peer_timeout: Duration::from_secs(3),
        keepalive_interval: Duration::from_millis(500),
        ..Config::default()
    };
    let mut sim = Sim::new(7, cfg).lossy(0.0, 0.0, (5, 5));
    sim.connect();
    // Idle but alive for a while: keep-alives keep the session up.
    sim.run_until(Duration::from_secs(20), |_| false);
    assert!(sim.client.is_connected());
    assert!(!sim.server_events.iter().any(|e| matches!(e, ServerEvent::Disconnected { .. })));
    sim.link_up = false;
    let cut = sim.now;
    let both = sim.run_until(Duration::from_secs(60), |s| {
        s.client_events.contains(&ClientEvent::Disconnected(DisconnectReason::Timeout))
            && s.server_events
                .iter()
                .any(|e| matches!(e, ServerEvent::Disconnected { reason: DisconnectReason::Timeout, .. }))
    });
    assert!(both);
    let took = sim.now - cut;
    assert!(took <= Duration::from_millis(3100), "detected after {took:?}");
    assert_eq!(sim.server.session_count(), 0);
}

#[test]
fn max_retries_ends_session_while_sending() {
    let cfg = Config {
        dead_peer_timeout: Duration::from_secs(600),
        max_retries: 3,
        message_timeout: Duration::from_millis(200),
        ..Config::default()
    };
    let mut sim = Sim::new(8, cfg).lossy(0.0, 0.0, (1, 1));
    sim.connect();
    sim.link_up = false;
    let cut = sim.now;
    sim.client.send(b"into the void").unwrap();
    assert!(sim.run_until(Duration::from_secs(60), |s| s
        .client_events
        .contains(&ClientEvent::Disconnected(DisconnectReason::Timeout))));
    assert!(sim.now - cut < Duration::from_secs(2), "took {:?}", sim.now - cut);
}

fn close_test(client_closes: bool) {
    let mut sim = Sim::new(9, Config::default()).lossy(0.2, 0.05, (2, 30));
    sim.connect();
    let conn = sim.conn.unwrap();
    sim.client.send(b"last words").unwrap();
    sim.run_until(Duration::from_secs(60), |s| !s.server_msgs().is_empty());
    if client_closes {
        sim.client.close("bye from client");
        assert!(sim.client.send(b"x").is_err() || !sim.client.is_connected());
        let seen = sim.run_until(Duration::from_secs(60), |s| {
            s.server_events.iter().any(|e| {
                matches!(e, ServerEvent::Disconnected { conn: c, reason: DisconnectReason::Closed(r) } if *c == conn && r == "bye from client")
            })
        });
        assert!(seen, "server did not see the close");
        assert_eq!(
            sim.client_events.back(),
            Some(&ClientEvent::Disconnected(DisconnectReason::Local("bye from client".into())))
        );
    } else {
        sim.server.close(conn, "kicked").unwrap();
        assert_eq!(sim.server.send(conn, b"x"), Err(Error::UnknownConnection));
        let seen = sim.run_until(Duration::from_secs(60), |s| {
            s.client_events.contains(&ClientEvent::Disconnected(DisconnectReason::Closed("kicked".into())))
        });
        assert!(seen, "client did not see the close");
        let local =
            sim.server_events.iter().filter(|e| matches!(e, ServerEvent::Disconnected { .. })).count();
        assert_eq!(local, 1, "exactly one Disconnected per Connected");
    }
    // Both sides end up without state and without further events.
    sim.run_until(sim.now - sim.start + Duration::from_secs(10), |_| false);
    assert_eq!(sim.server.session_count(), 0);
    assert!(sim.client.is_closed());
    assert_eq!(sim.client_events.iter().filter(|e| matches!(e, ClientEvent::Disconnected(_))).count(), 1);
    assert_eq!(sim.server_events.iter().filter(|e| matches!(e, ServerEvent::Disconnected { .. })).count(), 1);
}

#[test]
fn close_by_client_seen_by_server() {
    close_test(true);
}

#[test]
fn close_by_server_seen_by_client() {
    close_test(false);
}

#[test]
fn hello_flood_from_spoofed_addresses_creates_no_state_and_no_amplification() {
    let rng = SystemRandom::new();
    let mut server = Server::new(Config::default(), [1; 32], [2; 32], Box::new(SystemRandom::new()));
    server.set_max_per_ip(2);
    let now = Instant::now();
    let mut r = Rng(42);
    let mut hello = Vec::new();
    let mut out = Vec::new();
    let mut replies = 0;
    for i in 0..5000u32 {
        let from = SocketAddr::from((
            [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
            1024 + (r.next() % 60000) as u16,
        ));
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&r.next().to_le_bytes());
        // Half without a cookie, half with a forged one.
        let forged = [(r.next() & 0xff) as u8; wire::COOKIE_LEN];
        wire::encode_hello(
            &mut hello,
            wire::FLAG_ENCRYPTED,
            &key,
            if i % 2 == 0 { None } else { Some(&forged) },
        );
        server.handle_datagram(now, from, &hello);
        // Also short junk and truncated hellos.
        server.handle_datagram(now, from, &hello[..100]);
        while let Some(to) = server.poll_transmit(now, &mut out) {
            assert_eq!(to, from);
            assert!(out.len() <= 100, "reply of {} bytes to a spoofed hello", out.len());
            assert_eq!(out[1], wire::T_RETRY);
            replies += 1;
        }
    }
    assert_eq!(replies, 5000, "one small retry per full hello, nothing for junk");
    assert_eq!(server.session_count(), 0);
    assert!(server.poll_event().is_none(), "no callback may run");
    assert!(server.poll_timeout().is_none(), "no timers, so no state");
    let st = server.stats();
    assert_eq!((st.retries_sent, st.bad_cookie, st.malformed), (2500, 2500, 5000));
    // The per-IP quota of a victim address is untouched: a real client from 10.0.0.7 connects.
    let mut sim = Sim::new(1, Config::default());
    sim.server = server;
    sim.client =
        Client::new(Config::default(), sim.server_addr, Some(sim.server.public_key()), sim.now, &rng)
            .unwrap();
    sim.client_addr = "10.0.0.7:1024".parse().unwrap();
    sim.connect();
}

#[test]
fn per_ip_limit_counts_only_proven_clients() {
    let mut sim = Sim::new(2, Config::default());
    sim.server.set_max_per_ip(1);
    sim.connect();
    // A second client from the same IP, other port.
    let rng = SystemRandom::new();
    let mut c2 = Client::new(Config::default(), sim.server_addr, None, sim.now, &rng).unwrap();
    let c2_addr: SocketAddr = "192.168.1.2:50001".parse().unwrap();
    let mut buf = Vec::new();
    let mut rejected = false;
    for _ in 0..10 {
        while c2.poll_transmit(sim.now, &mut buf).is_some() {
            sim.server.handle_datagram(sim.now, c2_addr, &buf);
        }
        while let Some(to) = sim.server.poll_transmit(sim.now, &mut buf) {
            if to == c2_addr {
                c2.handle_datagram(sim.now, sim.server_addr, &buf);
            }
        }
        while let Some(e) = c2.poll_event() {
            rejected |= e == ClientEvent::Disconnected(DisconnectReason::Rejected("server full".into()));
        }
    }
    assert!(rejected);
    assert_eq!(sim.server.session_count(), 1);
}

#[test]
fn replayed_forged_tampered_and_misaddressed_packets_are_dropped() {
    let mut p = Pair::new(Config::default());
    p.connect();
    let conn = p.conn.unwrap();
    p.client.send(b"pay 10 coins").unwrap();
    let mut pkt = Vec::new();
    assert!(p.client.poll_transmit(p.now, &mut pkt).is_some());
    p.server.handle_datagram(p.now, p.client_addr, &pkt);
    p.drain_events();
    assert_eq!(p.server_msgs, vec![b"pay 10 coins".to_vec()]);
    // Replay.
    p.server.handle_datagram(p.now, p.client_addr, &pkt);
    assert_eq!(p.server.stats().replayed, 1);
    // A second packet, tampered before delivery: ciphertext, tag, packet number (nonce/AAD).
    p.client.send(b"pay 20 coins").unwrap();
    let mut pkt2 = Vec::new();
    assert!(p.client.poll_transmit(p.now, &mut pkt2).is_some());
    for pos in [pkt2.len() - 20, pkt2.len() - 1, 2] {
        let mut t = pkt2.clone();
        t[pos] ^= 0x01;
        p.server.handle_datagram(p.now, p.client_addr, &t);
    }
    assert_eq!(p.server.stats().auth_failed, 3);
    p.server.handle_datagram(p.now, p.client_addr, &pkt2);
    p.drain_events();
    assert_eq!(p.server_msgs.len(), 2, "the untampered original is still accepted");
    // Forged from scratch.
    let mut forged = Vec::new();
    wire::put_data_header(&mut forged, 1000);
    wire::put_msg(&mut forged, 1, b"pay 1000 coins");
    forged.extend_from_slice(&[0u8; 16]);
    p.server.handle_datagram(p.now, p.client_addr, &forged);
    assert_eq!(p.server.stats().auth_failed, 4);
    // Truncated, unknown version, unknown type, from another address.
    p.server.handle_datagram(p.now, p.client_addr, &pkt[..12]);
    p.server.handle_datagram(p.now, p.client_addr, &[]);
    let mut v = pkt.clone();
    v[0] = 9;
    p.server.handle_datagram(p.now, p.client_addr, &v);
    let mut ty = pkt.clone();
    ty[1] = 0x7e;
    p.server.handle_datagram(p.now, p.client_addr, &ty);
    p.server.handle_datagram(p.now, "10.9.9.9:1".parse().unwrap(), &pkt);
    let st = p.server.stats().clone();
    assert_eq!(st.auth_failed, 4);
    assert_eq!(st.replayed, 2, "a truncated copy of a received packet is caught as a replay first");
    assert_eq!((st.malformed, st.bad_version, st.unknown_peer), (2, 1, 1));
    p.exchange();
    assert_eq!(
        p.server_msgs,
        vec![b"pay 10 coins".to_vec(), b"pay 20 coins".to_vec()],
        "nothing delivered twice or forged"
    );
    // The session is unharmed.
    p.server.send(conn, b"ok").unwrap();
    p.exchange();
    assert_eq!(p.client_msgs, vec![b"ok".to_vec()]);
}

#[test]
fn pinned_key_mismatch_aborts_the_client() {
    let rng = SystemRandom::new();
    let mut sim = Sim::new(3, Config::default());
    sim.client = Client::new(Config::default(), sim.server_addr, Some([0xAA; 32]), sim.now, &rng).unwrap();
    assert!(sim.run_until(Duration::from_secs(10), |s| !s.client_events.is_empty()));
    assert_eq!(
        sim.client_events.pop_front(),
        Some(ClientEvent::Disconnected(DisconnectReason::ServerKeyMismatch))
    );
    assert!(sim.client.send(b"x").is_err());
    sim.run_until(Duration::from_secs(20), |_| false);
    assert!(sim.server_events.is_empty(), "the server never saw a confirmed session");
    assert_eq!(sim.server.session_count(), 0, "the unconfirmed session expired");
}

#[test]
fn forged_server_hello_is_ignored() {
    // Unpinned client: a server hello signed by someone else over another transcript fails the
    // signature check and the real handshake still completes.
    let rng = SystemRandom::new();
    let mut p = Pair::new(Config::default());
    p.client = Client::new(Config::default(), p.server_addr, None, p.now, &rng).unwrap();
    let mut buf = Vec::new();
    // Get a cookie.
    p.client.poll_transmit(p.now, &mut buf);
    p.server.handle_datagram(p.now, p.client_addr, &buf);
    p.server.poll_transmit(p.now, &mut buf);
    p.client.handle_datagram(p.now, p.server_addr, &buf);
    let fake = wire::encode_server_hello(&wire::ServerHello {
        flags: wire::FLAG_ENCRYPTED,
        server_eph: [5; 32],
        server_static: [6; 32],
        signature: [7; 64],
    });
    p.client.handle_datagram(p.now, p.server_addr, &fake);
    assert_eq!(p.client.stats().bad_signature, 1);
    assert!(!p.client.is_connected());
    p.connect();
    assert!(p.client.is_connected());
    assert_eq!(p.client.server_public_key(), Some(p.server.public_key()));
}

#[test]
fn encryption_mismatch_is_rejected() {
    let rng = SystemRandom::new();
    let mut p = Pair::new(Config::default());
    p.client = Client::new(
        Config { encryption: false, ..Config::default() },
        p.server_addr,
        Some(p.server.public_key()),
        p.now,
        &rng,
    )
    .unwrap();
    p.connect();
    assert_eq!(
        p.client_events,
        vec![ClientEvent::Disconnected(DisconnectReason::Rejected("encryption mismatch".into()))]
    );
    assert_eq!(p.server.session_count(), 0);
}

#[test]
fn handshake_times_out_without_server() {
    let rng = SystemRandom::new();
    let now = Instant::now();
    let mut c = Client::new(Config::default(), "127.0.0.1:9".parse().unwrap(), None, now, &rng).unwrap();
    let mut t = now;
    let mut buf = Vec::new();
    let mut hellos = 0;
    while c.poll_event().is_none() {
        while c.poll_transmit(t, &mut buf).is_some() {
            assert_eq!(buf.len(), HELLO_SIZE);
            hellos += 1;
        }
        t = c.poll_timeout().unwrap().max(t);
        c.handle_timeout(t);
    }
    assert!(hellos >= 3 && t - now == Config::default().connect_timeout, "{hellos} hellos, {:?}", t - now);
}

#[test]
fn messages_queued_before_connect_are_sent() {
    let mut p = Pair::new(Config::default());
    p.client.send(b"early 1").unwrap();
    p.client.send([1u8; 5000]).unwrap();
    p.connect();
    assert_eq!(p.server_msgs, vec![b"early 1".to_vec(), vec![1u8; 5000]]);
}

#[test]
fn oversized_messages_are_refused_and_discarded() {
    let mut p = Pair::new(Config { max_message_size: 2000, ..Config::default() });
    p.connect();
    let conn = p.conn.unwrap();
    assert_eq!(p.client.send([0; 2001]), Err(Error::MessageTooLarge));
    // The receiver's limit is lower than the sender's: the message is skipped, later ones flow.
    p.server.config_mut().max_message_size = 100;
    p.client.send([1; 1500]).unwrap();
    p.client.send([2; 200]).unwrap();
    p.client.send([3; 50]).unwrap();
    p.exchange();
    assert_eq!(p.server_msgs, vec![vec![3u8; 50]]);
    assert_eq!(p.server.stats().oversized_messages, 2);
    p.server.send(conn, b"still here").unwrap();
    p.exchange();
    assert_eq!(p.client_msgs, vec![b"still here".to_vec()]);
}

#[test]
fn send_buffer_is_bounded() {
    let mut p = Pair::new(Config { max_send_buffer: 10_000, ..Config::default() });
    p.connect();
    p.client.send([0; 6000]).unwrap();
    assert_eq!(p.client.send([0; 6000]), Err(Error::SendBufferFull));
    p.exchange();
    p.client.send([0; 6000]).unwrap();
}

#[test]
fn round_trip_costs_two_datagrams_plus_one_coalesced_ack() {
    let mut p = Pair::new(Config::default());
    p.connect();
    let conn = p.conn.unwrap();
    let mut buf = Vec::new();
    let mut datagrams = 0;
    // Ping-pong: the client sends the next request as soon as the response arrives; the server
    // answers each request at once (as the Lua handler would, before the next flush).
    p.client.send(b"req").unwrap();
    for i in 0..1000 {
        while p.client.poll_transmit(p.now, &mut buf).is_some() {
            datagrams += 1;
            p.server.handle_datagram(p.now, p.client_addr, &buf);
        }
        while p.server.poll_event().is_some() {
            p.server.send(conn, b"resp").unwrap();
        }
        while p.server.poll_transmit(p.now, &mut buf).is_some() {
            datagrams += 1;
            p.client.handle_datagram(p.now, p.server_addr, &buf);
        }
        while p.client.poll_event().is_some() {
            if i < 999 {
                p.client.send(b"req").unwrap();
            }
        }
        p.now += Duration::from_micros(20);
    }
    assert_eq!(datagrams, 2000, "steady state: exactly one datagram each way per round trip");
    // After the last response, one ack-only datagram goes out once the ack delay expires.
    p.advance(Config::default().max_ack_delay);
    let mut acks = 0;
    while p.client.poll_transmit(p.now, &mut buf).is_some() {
        acks += 1;
    }
    assert_eq!(acks, 1);
}

#[test]
fn many_messages_are_aggregated_per_datagram() {
    let mut p = Pair::new(Config::default());
    p.connect();
    for i in 0..100u8 {
        p.client.send([i; 20]).unwrap();
    }
    let mut buf = Vec::new();
    let mut n = 0;
    while p.client.poll_transmit(p.now, &mut buf).is_some() {
        assert!(buf.len() <= MAX_DATAGRAM);
        p.server.handle_datagram(p.now, p.client_addr, &buf);
        n += 1;
    }
    assert!(n <= 3, "{n} datagrams for 100 small messages");
    p.drain_events();
    assert_eq!(p.server_msgs.len(), 100);
}

#[test]
fn timers_of_idle_sessions_are_not_scanned() {
    // 1000 connected sessions: handle_timeout at a time when nothing is due touches nothing and
    // poll_timeout is the heap minimum.
    let rng = SystemRandom::new();
    let cfg = Config::default();
    let mut server = Server::new(cfg.clone(), [1; 32], [2; 32], Box::new(SystemRandom::new()));
    let now = Instant::now();
    let saddr: SocketAddr = "10.0.0.1:1".parse().unwrap();
    let mut buf = Vec::new();
    for i in 0..1000u32 {
        let caddr = SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 2000));
        let mut c = Client::new(cfg.clone(), saddr, None, now, &rng).unwrap();
        for _ in 0..4 {
            while c.poll_transmit(now, &mut buf).is_some() {
                server.handle_datagram(now, caddr, &buf);
            }
            while server.poll_transmit(now, &mut buf).is_some() {
                c.handle_datagram(now, saddr, &buf);
            }
        }
    }
    assert_eq!(server.session_count(), 1000);
    let mut connected = 0;
    while let Some(e) = server.poll_event() {
        connected += matches!(e, ServerEvent::Connected { .. }) as usize;
    }
    assert_eq!(connected, 1000);
    while server.poll_transmit(now, &mut buf).is_some() {}
    let next = server.poll_timeout().unwrap();
    assert!(next > now);
    let t0 = std::time::Instant::now();
    for _ in 0..10_000 {
        server.handle_timeout(now);
        assert!(server.poll_transmit(now, &mut buf).is_none());
    }
    let per = t0.elapsed() / 10_000;
    assert!(per < Duration::from_micros(20), "idle handle_timeout+poll_transmit took {per:?}");
}

/// In-memory round-trip rate (not a substitute for the real benchmark). Run with
/// `cargo test --release … -- --ignored --nocapture bench_round_trips`.
#[test]
#[ignore]
fn bench_round_trips() {
    for encryption in [false, true] {
        let mut p = Pair::new(Config { encryption, ..Config::default() });
        p.connect();
        let conn = p.conn.unwrap();
        let mut buf = Vec::new();
        let n = 200_000;
        let req = [7u8; 40];
        let t0 = std::time::Instant::now();
        p.client.send(req).unwrap();
        for _ in 0..n {
            while p.client.poll_transmit(p.now, &mut buf).is_some() {
                p.server.handle_datagram(p.now, p.client_addr, &buf);
            }
            while let Some(e) = p.server.poll_event() {
                if let ServerEvent::Message { data, .. } = e {
                    p.server.send(conn, data).unwrap();
                }
            }
            while p.server.poll_transmit(p.now, &mut buf).is_some() {
                p.client.handle_datagram(p.now, p.server_addr, &buf);
            }
            while let Some(e) = p.client.poll_event() {
                if let ClientEvent::Message(m) = e {
                    p.client.send(m).unwrap();
                }
            }
        }
        let el = t0.elapsed();
        println!(
            "encryption={encryption}: {:.0} round trips/s ({:?} per round trip)",
            n as f64 / el.as_secs_f64(),
            el / n
        );
    }
}

/// Poor man's fuzzing on stable: random scripts and corpus mutations through the fuzz entry
/// functions. Run with `cargo test --release … -- --ignored random_fuzz_smoke`.
#[test]
#[ignore]
fn random_fuzz_smoke() {
    let mut r = Rng(0x5eed);
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    for t in ["rpc_packet", "rpc_handshake", "rpc_session"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(t)) {
            for e in rd.flatten() {
                seeds.push((t.to_owned(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    let iters: usize = std::env::var("RPC_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    for _ in 0..iters {
        let (t, base) = &seeds[(r.next() % seeds.len() as u64) as usize];
        let mut d = base.clone();
        for _ in 0..r.range(1, 8) {
            match r.next() % 4 {
                0 if !d.is_empty() => {
                    let i = (r.next() % d.len() as u64) as usize;
                    d[i] ^= r.next() as u8;
                }
                1 => d.push(r.next() as u8),
                2 if !d.is_empty() => {
                    let n = (r.next() % d.len() as u64) as usize;
                    d.truncate(n);
                }
                _ => {
                    for _ in 0..r.range(1, 16) {
                        d.push(r.next() as u8)
                    }
                }
            }
        }
        match t.as_str() {
            "rpc_packet" => fuzzing::packet(&d),
            "rpc_handshake" => fuzzing::handshake(&d),
            _ => fuzzing::session(&d),
        }
    }
}
