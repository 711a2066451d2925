//! Heap bytes per idle WebSocket connection, measured with a counting global allocator.
//!
//! Run with `--nocapture` to see the figures. One `#[test]` only, so no other test thread
//! allocates while we measure.

use luna::proto::tls::{self, Pem, Tls};
use luna::proto::ws::{
    ClientHandshake, DeflateConfig, Opcode, Role, ServerHandshake, ServerUpgrade, WsConfig, WsConn, WsUrl,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static BLOCKS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Relaxed);
        BLOCKS.fetch_add(1, Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        BLOCKS.fetch_sub(1, Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Relaxed);
        LIVE.fetch_sub(l.size(), Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static A: Counting = Counting;

fn live() -> (usize, usize) {
    (LIVE.load(Relaxed), BLOCKS.load(Relaxed))
}

const N: usize = 1000;

/// A server connection right after a completed upgrade, plus its client.
fn upgraded_pair() -> (WsConn, WsConn) {
    deflate_pair(None)
}

/// [`upgraded_pair`], with permessage-deflate agreed when given.
fn deflate_pair(deflate: Option<&DeflateConfig>) -> (WsConn, WsConn) {
    let url = WsUrl::parse("ws://localhost/").unwrap();
    let (mut ch, req) = ClientHandshake::new(&url, &[], [9; 16], deflate).unwrap();
    let mut sh = ServerHandshake::default();
    let ServerUpgrade::Accept(a) = sh.handle_bytes(&req, |p| p == "default", deflate.map(|d| (d, true)))
    else {
        panic!()
    };
    let up = ch.handle_bytes(&a.response).unwrap().unwrap();
    assert_eq!(up.deflate.is_some(), deflate.is_some());
    (
        WsConn::new(Role::Server, WsConfig::default(), &a.leftover, a.deflate),
        WsConn::new(Role::Client, WsConfig::default(), &up.leftover, up.deflate),
    )
}

fn echo(server: &mut WsConn, client: &mut WsConn, size: usize) {
    client.send(Opcode::Binary, &vec![1u8; size]).unwrap();
    let mut buf = Vec::new();
    client.take_outgoing(&mut buf);
    server.handle_bytes(&buf);
    while let Some(ev) = server.poll_event() {
        if let luna::proto::ws::WsEvent::Message { opcode, data } = ev {
            server.send(opcode, &data).unwrap();
        }
    }
    let mut out = Vec::new();
    server.take_outgoing(&mut out);
    client.handle_bytes(&out);
    while client.poll_event().is_some() {}
}

fn report(what: &str, before: (usize, usize), after: (usize, usize), n: usize) -> usize {
    let per = (after.0 - before.0) / n;
    let blocks = (after.1 - before.1) as f64 / n as f64;
    println!("{what}: {per} heap bytes per connection in {blocks:.1} allocations");
    per
}

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

#[test]
fn idle_connection_memory() {
    // Plain ws, right after the upgrade. Clients are kept in a separate vector measured
    // separately.
    let mut pairs: Vec<(WsConn, WsConn)> = Vec::with_capacity(N);
    let start = live();
    for _ in 0..N {
        pairs.push(upgraded_pair());
    }
    let after = live();
    // Both ends are counted; the vector's inline storage was allocated before `start`.
    let both = report("idle ws pair (server + client) after upgrade", start, after, N);
    let inline = std::mem::size_of::<WsConn>();
    let per_conn_heap = both / 2;
    println!(
        "  => one idle connection: {per_conn_heap} heap bytes + {inline} bytes inline \
         (WsConn struct) = {} bytes",
        per_conn_heap + inline
    );
    assert!(per_conn_heap + inline <= 8 * 1024, "idle connection over 8 KiB");

    // After traffic (32 B and 4 KiB echoes) the buffers are kept for more; once the connection
    // idles (the driver calls `trim` after IDLE_TRIM), they go back.
    let start = live();
    for (s, c) in pairs.iter_mut() {
        echo(s, c, 32);
        echo(s, c, 4096);
        echo(s, c, 32);
    }
    let busy = live();
    println!(
        "after 32 B + 4 KiB + 32 B echoes: {:+} bytes per pair (kept while busy)",
        (busy.0 as isize - start.0 as isize) / N as isize
    );
    for (s, c) in pairs.iter_mut() {
        assert!(s.has_spare_buffers(), "4 KiB of traffic grew the buffers");
        s.trim();
        c.trim();
        assert!(!s.has_spare_buffers(), "trimmed");
    }
    let after = live();
    let delta = after.0 as isize - start.0 as isize;
    println!("  ... trimmed when idle: {:+} bytes per pair", delta / N as isize);
    let per_after = (both as isize + delta / N as isize) / 2;
    println!("  => one connection after traffic: {per_after} heap bytes");
    assert!(per_after as usize + inline <= 8 * 1024, "connection over 8 KiB after traffic");

    // After one 200 KiB message (tungstenite keeps the grown read buffer for a while).
    let start = live();
    for (s, c) in pairs.iter_mut().take(50) {
        echo(s, c, 200 * 1024);
    }
    let after = live();
    let delta = (after.0 as isize - start.0 as isize) / 50;
    println!("after one 200 KiB echo: {delta:+} bytes per pair (retained read buffers)");
    for (s, c) in pairs.iter_mut().take(50) {
        for _ in 0..100 {
            echo(s, c, 32);
        }
    }
    let after2 = live();
    let delta2 = (after2.0 as isize - start.0 as isize) / 50;
    println!("  ... and after 100 more 32 B echoes: {delta2:+} bytes per pair");
    assert!(delta < 2048, "a large message left its buffers behind");
    drop(pairs);

    // permessage-deflate: a server connection after a 4 KiB echo, with and without takeover.
    for takeover in [true, false] {
        let config = DeflateConfig { context_takeover: takeover, ..DeflateConfig::default() };
        const D: usize = 100;
        // Warm up the per-thread pool of zlib states (shared by connections without takeover).
        let (mut s, mut c) = deflate_pair(Some(&config));
        echo(&mut s, &mut c, 4096);
        let mut servers = Vec::with_capacity(D);
        let mut server_bytes = 0isize;
        for _ in 0..D {
            let before = live().0 as isize;
            let (mut s, mut c) = deflate_pair(Some(&config));
            echo(&mut s, &mut c, 4096);
            s.trim();
            drop(c);
            server_bytes += live().0 as isize - before;
            servers.push(s);
        }
        let per = server_bytes / D as isize;
        println!("deflate (context takeover {takeover}): {per:+} heap bytes per server connection after a 4 KiB echo");
        if takeover {
            assert!(per < 512 << 10, "a deflate context over 512 KiB");
        } else {
            assert!(per < 8 << 10, "a connection without takeover kept zlib state");
        }
    }

    // wss: a server TLS session + WsConn after handshake and upgrade.
    let (cert, key, ca) = (read(&data("server.pem")), read(&data("server.key")), read(&data("ca.pem")));
    let pem = |bytes| Pem { bytes, label: "test file" };
    let server_cfg = tls::server_config(pem(&cert), pem(&key), &[]).unwrap();
    let client_cfg = tls::client_config(Some(tls::root_store(Vec::new(), Some(pem(&ca))).unwrap()), &[]);
    const T: usize = 100;
    let mut servers = Vec::with_capacity(T);
    let mut clients = Vec::with_capacity(T);
    let mut server_bytes = 0usize;
    for _ in 0..T {
        let mut ct = Tls::client(client_cfg.clone(), "localhost").unwrap();
        let before = live();
        let mut st = Tls::server(server_cfg.clone()).unwrap();
        for _ in 0..10 {
            let mut a = Vec::new();
            ct.take_ciphertext(&mut a);
            st.handle_ciphertext(&a).unwrap();
            let mut b = Vec::new();
            st.take_ciphertext(&mut b);
            ct.handle_ciphertext(&b).unwrap();
        }
        assert!(st.is_handshake_complete());
        let (s, c) = upgraded_pair();
        drop(c); // only the server end is measured
        server_bytes += live().0 - before.0;
        servers.push((st, s));
        clients.push(ct);
    }
    let per = server_bytes / T;
    println!(
        "idle wss server connection (rustls ServerConnection + WsConn): {per} heap bytes + {} inline",
        std::mem::size_of::<Tls>() + inline
    );
}
