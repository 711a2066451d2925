//! RPC apps over real loopback sockets, against what the network does: a lossy, duplicating,
//! reordering relay; floods of junk and of hellos that never prove their address; and the
//! server and client examples as two processes.
#![cfg(feature = "vendored")]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::{Lua, ObjectLike, Table};

fn lua() -> Lua {
    let lua = Lua::new();
    luna::bind::preload(&lua).unwrap();
    lua
}

/// Ticks the runtime until `done()` holds or the deadline passes.
fn drive(lua: &Lua, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out");
        if let Err(e) = luna::bind::tick(lua, Some(Duration::from_millis(1))) {
            panic!("update raised: {}", luna::bind::error_text(&e));
        }
    }
}

/// A tiny xorshift so the relay is reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// A datagram held back until its time: (when, tie-break, destination, bytes).
type Delayed = (Instant, u64, SocketAddr, Vec<u8>);

/// Forwards datagrams between the first client that writes to it and `server`; when `lossy`,
/// dropping 20 %, duplicating 10 % and delaying each copy by 0–30 ms (which reorders them).
/// Returns its address and counters: dropped, duplicated, datagrams from the client.
fn relay(server: SocketAddr, stop: Arc<AtomicBool>, lossy: bool) -> (SocketAddr, Arc<[AtomicUsize; 3]>) {
    let counts: Arc<[AtomicUsize; 3]> = Arc::new(std::array::from_fn(|_| AtomicUsize::new(0)));
    let seen = counts.clone();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut client = None;
        let mut queue: BinaryHeap<Reverse<Delayed>> = BinaryHeap::new();
        let mut seq = 0;
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                let to = if from == server {
                    client
                } else {
                    client = Some(from);
                    seen[2].fetch_add(1, Ordering::Relaxed);
                    Some(server)
                };
                if let Some(to) = to {
                    let copies = if !lossy {
                        1
                    } else if rng.chance(20) {
                        0
                    } else if rng.chance(10) {
                        2
                    } else {
                        1
                    };
                    if copies != 1 {
                        seen[copies / 2].fetch_add(1, Ordering::Relaxed);
                    }
                    for _ in 0..copies {
                        let delay = if lossy { rng.next() % 30 } else { 0 };
                        let at = Instant::now() + Duration::from_millis(delay);
                        seq += 1;
                        queue.push(Reverse((at, seq, to, buf[..n].to_vec())));
                    }
                }
            }
            while queue.peek().is_some_and(|Reverse((at, ..))| *at <= Instant::now()) {
                let Reverse((_, _, to, data)) = queue.pop().unwrap();
                let _ = socket.send_to(&data, to);
            }
        }
    });
    (addr, counts)
}

#[test]
fn calls_complete_exactly_once_through_a_lossy_relay() {
    for encryption in [true, false] {
        let lua = lua();
        let server: Table = lua
            .load(format!(
                r#"local luna = require("luna")
                local app = luna.new_app({{ name = "lossy", host = "127.0.0.1", port = 0, debug = false,
                                            encryption = {encryption} }})
                local state = {{ port = app.port, calls = 0 }}
                app:new_router({{ prefix = "t" }}):new({{ prefix = "echo", fun = function(args)
                  state.calls = state.calls + 1
                  return {{ n = args.n, blob = args.blob }}
                end }})
                return state"#
            ))
            .eval()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (relay, counts) = relay(
            format!("127.0.0.1:{}", server.get::<u16>("port").unwrap()).parse().unwrap(),
            stop.clone(),
            true,
        );
        let client: Table = lua
            .load(format!(
                r#"local luna, lunac = require("luna"), require("lunac")
                local c = lunac.connect_to_app({{ name = "through relay", host = "127.0.0.1", port = {port},
                                                  encryption = {encryption}, no_errors = true }})
                local state = {{ ok = 0, wrong = 0 }}
                local blob = ("0123456789"):rep(300) -- 3 KB: several fragments per call
                for i = 1, 60 do
                  luna.spawn(function()
                    local r, err = c:fetch("t/echo", {{ n = i, blob = i % 5 == 0 and blob or nil }}, 60)
                    if r and r.n == i and (i % 5 ~= 0 or r.blob == blob) then
                      state.ok = state.ok + 1
                    else
                      state.wrong = state.wrong + 1
                      state.err = err
                    end
                  end)
                end
                return state"#,
                port = relay.port()
            ))
            .eval()
            .unwrap();
        drive(&lua, Duration::from_secs(90), || {
            client.get::<u32>("ok").unwrap() + client.get::<u32>("wrong").unwrap() == 60
        });
        stop.store(true, Ordering::Relaxed);
        let err: Option<String> = client.get("err").unwrap();
        assert_eq!(client.get::<u32>("wrong").unwrap(), 0, "encryption={encryption}: {err:?}");
        assert_eq!(server.get::<u32>("calls").unwrap(), 60, "every handler ran exactly once");
        let (dropped, duplicated) = (counts[0].load(Ordering::Relaxed), counts[1].load(Ordering::Relaxed));
        assert!(dropped >= 10 && duplicated >= 3, "the relay dropped {dropped} and duplicated {duplicated}");
    }
}

#[test]
fn calls_made_between_updates_share_datagrams_and_leave_at_the_next_update_or_flush() {
    let lua = lua();
    let port: u16 = lua
        .load(
            r#"local luna = require("luna")
            local app = luna.new_app({ name = "batch", host = "127.0.0.1", port = 0, debug = false })
            app:new_router({ prefix = "t" }):new({ prefix = "echo", fun = function(args) return args[1] end })
            return app.port"#,
        )
        .eval()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (relay, counts) = relay(format!("127.0.0.1:{port}").parse().unwrap(), stop.clone(), false);
    let client: Table = lua
        .load(format!(
            r#"local lunac = require("lunac")
            local c = lunac.connect_to_app({{ name = "batch", host = "127.0.0.1", port = {port}, no_errors = true }})
            local state = {{ answers = {{}}, client = c }}
            function state.calls(from, to)
              for i = from, to do
                c:noawait_fetch("t/echo", function(r) state.answers[#state.answers + 1] = r end, {{ i }})
              end
            end
            return state"#,
            port = relay.port()
        ))
        .eval()
        .unwrap();
    let c: Table = client.get("client").unwrap();
    drive(&lua, Duration::from_secs(10), || c.call_method::<bool>("is_connected", ()).unwrap());
    let sent = || {
        std::thread::sleep(Duration::from_millis(100)); // the relay counts what reached it
        counts[2].load(Ordering::Relaxed)
    };
    let answers = || client.get::<Table>("answers").unwrap().raw_len();
    for (from, to, leave) in [(1, 200, "update"), (201, 400, "flush")] {
        let before = sent();
        client.get::<mlua::Function>("calls").unwrap().call::<()>((from, to)).unwrap();
        assert_eq!(sent(), before, "calls made between updates wait for the next one");
        match leave {
            "update" => luna::bind::tick(&lua, Some(Duration::ZERO)).unwrap(),
            _ => lua.load(r#"require("lunac").flush()"#).exec().unwrap(),
        }
        // 200 calls of ~20 bytes each fill a handful of ~1200-byte datagrams.
        let datagrams = sent() - before;
        assert!((1..=8).contains(&datagrams), "200 calls left in {datagrams} datagrams ({leave})");
        drive(&lua, Duration::from_secs(10), || answers() == to);
    }
    stop.store(true, Ordering::Relaxed);
    let got: Vec<i64> =
        client.get::<Table>("answers").unwrap().sequence_values().map(Result::unwrap).collect();
    assert_eq!(got, (1..=400).collect::<Vec<_>>(), "every call answered once, in order");
}

#[test]
fn junk_and_unproven_hellos_create_no_clients_and_are_not_amplified() {
    let lua = lua();
    let state: Table = lua
        .load(
            r#"local luna = require("luna")
            local state = { new_clients = 0 }
            local app = luna.new_app({ name = "flooded", host = "127.0.0.1", port = 0, debug = false,
                                       new_client = function() state.new_clients = state.new_clients + 1 end })
            app:new_router({ prefix = "t" }):new({ prefix = "ping", fun = function() return "pong" end })
            state.port, state.app = app.port, app
            return state"#,
        )
        .eval()
        .unwrap();
    let server: SocketAddr = format!("127.0.0.1:{}", state.get::<u16>("port").unwrap()).parse().unwrap();
    // A genuine first hello, as a client that never answers the cookie challenge would send.
    let rng = ring::rand::SystemRandom::new();
    let mut hello_client =
        luna::proto::rpc::Client::new(Default::default(), server, None, Instant::now(), &rng).unwrap();
    let mut hello = Vec::new();
    assert!(hello_client.poll_transmit(Instant::now(), &mut hello).is_some());
    let mut rng = Rng(7);
    let mut floods = Vec::new();
    for i in 0..200 {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_nonblocking(true).unwrap();
        let junk: Vec<u8> = (0..(rng.next() % 1400) as usize).map(|_| rng.next() as u8).collect();
        let mut truncated = hello.clone();
        truncated.truncate((rng.next() as usize) % hello.len());
        let mut flipped = hello.clone();
        flipped[(rng.next() as usize) % hello.len()] ^= 0x40;
        let datagrams = [hello.clone(), junk, truncated, flipped, vec![1], vec![]];
        let sent: usize = datagrams.iter().map(Vec::len).sum();
        for d in &datagrams {
            s.send_to(d, server).unwrap();
        }
        floods.push((s, sent, datagrams.iter().map(Vec::len).max().unwrap(), i));
        luna::bind::tick(&lua, Some(Duration::ZERO)).unwrap();
    }
    let settle = Instant::now() + Duration::from_millis(250);
    while Instant::now() < settle {
        luna::bind::tick(&lua, Some(Duration::from_millis(1))).unwrap();
    }
    let (mut replies, mut reply_bytes, mut sent_bytes) = (0, 0, 0);
    for (s, sent, largest, _) in &floods {
        sent_bytes += sent;
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            assert!(n <= *largest, "a reply of {n} B to datagrams of at most {largest} B");
            replies += 1;
            reply_bytes += n;
        }
    }
    assert!(replies > 0, "the cookie challenge is answered");
    assert!(reply_bytes * 10 < sent_bytes, "{reply_bytes} B of replies to {sent_bytes} B of flood");
    assert_eq!(state.get::<u32>("new_clients").unwrap(), 0, "no client without a proven address");
    let clients: usize =
        lua.load("return #select(1, ...):get_clients()").call(state.get::<Table>("app").unwrap()).unwrap();
    assert_eq!(clients, 0);
    // The server still serves a real client.
    let done: Table = lua
        .load(format!(
            r#"local luna, lunac = require("luna"), require("lunac")
            local c = lunac.connect_to_app({{ name = "real", host = "127.0.0.1", port = {} }})
            local done = {{}}
            luna.spawn(function() done.answer = c:fetch("t/ping", {{}}, 5) end)
            return done"#,
            server.port()
        ))
        .eval()
        .unwrap();
    drive(&lua, Duration::from_secs(10), || done.get::<Option<String>>("answer").unwrap().is_some());
    assert_eq!(state.get::<u32>("new_clients").unwrap(), 1);
}

#[test]
fn server_and_client_examples_as_two_processes() {
    let host = env!("CARGO_BIN_EXE_luna-host");
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let server = Command::new(host)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("examples/rpc_server.lua")
        .env("PORT", &port)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new(host)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("examples/rpc_client.lua")
        .env("PORT", &port)
        .output()
        .unwrap();
    let _ = Command::new("kill").arg(server.id().to_string()).status();
    let served = server.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in [
        "Successfully connected to server!",
        "echo -> Hello\n",
        "slow_add -> 42\n",
        "bad args failed: Argument 'a' expected to be number, got string (2)\n",
        "Received message:\tworking on it",
        "ping answered\n",
    ] {
        assert!(text.contains(line), "missing '{line}' in:\n{text}");
    }
    assert!(!text.contains("nil"), "stray nils in the example's output:\n{text}");
    // Log lines name the app once, in their prefix.
    let log = String::from_utf8_lossy(&served.stdout);
    for line in [
        format!("[luna] app 'My Server': started on 127.0.0.1:{port}\n"),
        "[luna] app 'My Server': stopped\n".to_string(),
    ] {
        assert!(log.contains(&line), "missing '{line}' in:\n{log}");
    }
    assert!(!log.contains("App 'My Server'") && !log.contains("Server 'My Server'"), "{log}");
}

#[test]
fn one_process_example_prints_results_without_stray_values() {
    let out = Command::new(env!("CARGO_BIN_EXE_luna-host"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("examples/rpc_one_process.lua")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        text,
        "blocking fetch: 10\nfetch in a coroutine: 30\nunknown route: Unknown route 'math/nope'\n"
    );
}
