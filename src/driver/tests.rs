//! The driver over real sockets on 127.0.0.1 and Unix sockets, with the raw and WebSocket
//! protocols.

use std::io::{Read, Write};
use std::net::SocketAddr;

use super::*;
use crate::proto::raw::{DatagramLimits, RawDatagrams, RawLimits, RawStream};
use crate::proto::tls::tests::{test_client_config, test_server_config};

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Polls and services until `done` holds for the events seen so far (5 s at most).
fn pump(driver: &mut Driver, events: &mut Vec<Event>, mut done: impl FnMut(&mut Driver, &[Event]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done(driver, events) {
        assert!(Instant::now() < deadline, "timed out; events so far: {events:?}");
        let mut ready = Vec::new();
        driver.poll(Some(Duration::from_millis(10)), &mut ready).unwrap();
        for r in ready {
            if let Ready::Entry(key) = r {
                driver.service(key, Instant::now());
            }
        }
        while let Some(ev) = driver.pop_event() {
            events.push(ev);
        }
    }
}

fn raw_listener(
    driver: &mut Driver,
    config_tls: Option<Arc<rustls::ServerConfig>>,
    max: Option<usize>,
) -> Key {
    let socket = net::tcp_listen(localhost(), net::ListenOptions::default()).unwrap();
    let config = ListenerConfig {
        tls: config_tls,
        make: Box::new(|_| Box::new(RawStream::new(RawLimits::default()))),
        max_connections: max,
        nodelay: true,
    };
    driver.listen(socket, config, 7).unwrap()
}

fn local_port(driver: &mut Driver, listener: Key) -> SocketAddr {
    driver.listener(listener).unwrap().local.ip().unwrap()
}

fn accepted(events: &[Event]) -> Vec<Key> {
    events.iter().filter(|e| matches!(e.kind, EventKind::Accepted { .. })).map(|e| e.key).collect()
}

fn input(driver: &mut Driver, key: Key) -> Vec<u8> {
    driver.proto::<RawStream>(key).map(|p| p.input().to_vec()).unwrap_or_default()
}

#[test]
fn udp_readiness_is_reported_for_the_right_key_only() {
    let mut driver = Driver::new().unwrap();
    let raw = || Some(Box::new(RawDatagrams::new(DatagramLimits::default())) as Box<dyn DatagramProtocol>);
    let udp = || net::udp_bind(localhost(), net::UdpOptions::default()).unwrap();
    let idle = driver.open_datagram(udp(), raw(), 64, 1).unwrap();
    let key = driver.open_datagram(udp(), raw(), 64, 2).unwrap();
    let addr = driver.datagram(key).unwrap().local;
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sender.send_to(b"hi", addr).unwrap();
    let mut events = Vec::new();
    pump(&mut driver, &mut events, |_, e| !e.is_empty());
    assert_eq!(events, vec![Event { key, tag: 2, kind: EventKind::News }]);
    let got = driver.datagram_proto::<RawDatagrams>(key).unwrap().receive().unwrap();
    assert_eq!(got, (b"hi".to_vec(), sender.local_addr().unwrap()));
    assert!(driver.close(key));
    assert!(!driver.close(key), "second close of the same key is a no-op");
    assert!(driver.datagram(key).is_none());
    assert_eq!(driver.pending(), 1);
    assert!(driver.close(idle));
}

#[test]
fn lookup_runs_in_background_and_wakes_the_poll() {
    let mut driver = Driver::new().unwrap();
    assert_eq!(driver.lookup("::1", Instant::now()), Lookup::Done(vec!["::1".parse().unwrap()]));
    assert_eq!(driver.lookup("localhost", Instant::now()), Lookup::Pending);
    assert_eq!(driver.pending(), 1);
    let mut ready = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready.is_empty() && Instant::now() < deadline {
        driver.poll(Some(Duration::from_secs(1)), &mut ready).unwrap();
    }
    assert_eq!(ready, vec![Ready::Resolved("localhost".into())]);
    match driver.lookup("localhost", Instant::now()) {
        Lookup::Done(ips) => assert!(ips.iter().all(|ip| ip.is_loopback()), "{ips:?}"),
        other => panic!("expected a cached answer, got {other:?}"),
    }
    assert_eq!(driver.pending(), 0);
}

/// A client stream and the server stream it was accepted as, both raw.
fn raw_pair(driver: &mut Driver, server_tls: bool) -> (Key, Key, Key) {
    let listener = raw_listener(driver, server_tls.then(test_server_config), None);
    let addr = local_port(driver, listener);
    let tls = server_tls.then(|| ClientTls { config: test_client_config(), server_name: "localhost".into() });
    let options = ConnectOptions { tls, ..ConnectOptions::default() };
    let proto = Box::new(RawStream::new(RawLimits::default()));
    let client = driver.connect(&Target::Tcp(addr), proto, options, 9).unwrap();
    let mut events = Vec::new();
    pump(driver, &mut events, |d, e| {
        !accepted(e).is_empty() && d.proto::<RawStream>(client).is_some_and(|p| p.is_open())
    });
    let server = accepted(&events)[0];
    assert_eq!(
        events.iter().find(|e| e.key == server).unwrap().tag,
        7,
        "accepted streams get the listener's tag"
    );
    assert_eq!(driver.listener_of(server), Some(listener));
    driver.adopt(server);
    (listener, client, server)
}

fn echo_round(driver: &mut Driver, from: Key, to: Key, data: &[u8]) {
    driver.proto::<RawStream>(from).unwrap().write(data).unwrap();
    driver.flush(from);
    let mut events = Vec::new();
    pump(driver, &mut events, |d, _| input(d, to).len() >= data.len());
    assert_eq!(input(driver, to), data);
    let n = data.len();
    driver.proto::<RawStream>(to).unwrap().consume_input(n);
}

#[test]
fn raw_streams_over_tcp_and_tls_carry_bytes_both_ways() {
    for tls in [false, true] {
        let mut driver = Driver::new().unwrap();
        let (listener, client, server) = raw_pair(&mut driver, tls);
        assert_eq!(driver.stream(server).unwrap().tls().is_some(), tls);
        echo_round(&mut driver, client, server, b"hello");
        let big = vec![7u8; 300_000];
        echo_round(&mut driver, server, client, &big);
        assert_eq!(driver.listener(listener).unwrap().connections(), 1);

        // The client finishes: the server sees the end of stream, the client's socket closes.
        driver.proto::<RawStream>(client).unwrap().finish();
        driver.flush(client);
        let mut events = Vec::new();
        pump(&mut driver, &mut events, |d, _| d.proto::<RawStream>(server).unwrap().is_eof());
        assert!(driver.stream(client).unwrap().is_closed());
        assert_eq!(driver.proto::<RawStream>(client).unwrap().ended(), Some(None));
        driver.close(server);
        assert_eq!(driver.listener(listener).unwrap().connections(), 0);
    }
}

#[test]
fn connect_failures_reach_the_protocol_with_a_reason() {
    let mut driver = Driver::new().unwrap();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let proto = Box::new(RawStream::new(RawLimits::default()));
    let key = driver.connect(&Target::Tcp(port), proto, ConnectOptions::default(), 1).unwrap();
    let mut events = Vec::new();
    pump(&mut driver, &mut events, |d, _| d.proto::<RawStream>(key).unwrap().ended().is_some());
    let why = driver.proto::<RawStream>(key).unwrap().ended().unwrap().unwrap().to_owned();
    assert!(why.contains("refused"), "{why}");

    // TLS to a server whose certificate the client does not trust.
    let listener = raw_listener(&mut driver, Some(test_server_config()), None);
    let addr = local_port(&mut driver, listener);
    let config =
        crate::proto::tls::client_config(Some(crate::proto::tls::root_store(Vec::new(), None).unwrap()), &[]);
    let tls = Some(ClientTls { config, server_name: "localhost".into() });
    let proto = Box::new(RawStream::new(RawLimits::default()));
    let key =
        driver.connect(&Target::Tcp(addr), proto, ConnectOptions { tls, ..Default::default() }, 1).unwrap();
    pump(&mut driver, &mut events, |d, _| d.proto::<RawStream>(key).unwrap().ended().is_some());
    let why = driver.proto::<RawStream>(key).unwrap().ended().unwrap().unwrap().to_owned();
    assert!(why.contains("certificate verify failed: UnknownIssuer"), "{why}");
    // The server side never announced the stream and forgot it.
    pump(&mut driver, &mut events, |d, _| d.listener(listener).unwrap().stats.tls_failures == 1);
    assert!(accepted(&events).is_empty());
    assert_eq!(driver.listener(listener).unwrap().connections(), 0);
}

#[test]
fn connections_past_max_connections_are_closed_and_the_rest_served() {
    let mut driver = Driver::new().unwrap();
    let listener = raw_listener(&mut driver, None, Some(2));
    let addr = local_port(&mut driver, listener);
    let mut peers: Vec<std::net::TcpStream> =
        (0..3).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    let mut events = Vec::new();
    pump(&mut driver, &mut events, |d, _| d.listener(listener).unwrap().stats.refused == 1);
    let kept = accepted(&events);
    assert_eq!(kept.len(), 2);
    peers[2].set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 8];
    assert!(matches!(peers[2].read(&mut buf), Ok(0) | Err(_)), "the third connection is closed");
    for key in &kept {
        driver.adopt(*key);
    }
    peers[0].write_all(b"still served").unwrap();
    pump(&mut driver, &mut events, |d, _| kept.iter().any(|k| input(d, *k) == b"still served"));
}

#[test]
fn unix_listener_replaces_a_stale_socket_file_and_refuses_a_live_one() {
    let dir = std::env::temp_dir().join(format!("luna-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // leaves a stale file
    let mut driver = Driver::new().unwrap();
    let socket = net::unix_listen(&path, net::ListenOptions::default()).unwrap();
    let config = ListenerConfig {
        tls: None,
        make: Box::new(|_| Box::new(RawStream::new(RawLimits::default()))),
        max_connections: None,
        nodelay: false,
    };
    let listener = driver.listen(socket, config, 3).unwrap();
    let live = net::unix_listen(&path, net::ListenOptions::default()).unwrap_err();
    assert_eq!(live.kind(), std::io::ErrorKind::AddrInUse, "{live}");

    let proto = Box::new(RawStream::new(RawLimits::default()));
    let client = driver.connect(&Target::Unix(path.clone()), proto, ConnectOptions::default(), 4).unwrap();
    let mut events = Vec::new();
    pump(&mut driver, &mut events, |d, e| {
        !accepted(e).is_empty() && d.proto::<RawStream>(client).is_some_and(|p| p.is_open())
    });
    // The live check's probe was accepted first.
    let server = *accepted(&events).last().unwrap();
    driver.adopt(server);
    echo_round(&mut driver, client, server, b"over a unix socket");
    driver.close(listener);
    assert!(!path.exists(), "closing the listener removes its socket file");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_websocket_session_gives_back_traffic_buffers_once_idle() {
    use crate::proto::ws::session::IDLE_TRIM;
    use crate::proto::ws::{Opcode, Received, Settings, WsSession, WsUrl};
    let mut driver = Driver::new().unwrap();
    let settings = Arc::new(Settings::default());
    let handlers: Arc<[String]> = Arc::from(vec!["default".to_string()]);
    let server_settings = settings.clone();
    let socket = net::tcp_listen(localhost(), net::ListenOptions::default()).unwrap();
    let config = ListenerConfig {
        tls: None,
        make: Box::new(move |now| {
            Box::new(WsSession::server(handlers.clone(), server_settings.clone(), now))
        }),
        max_connections: None,
        nodelay: true,
    };
    let listener = driver.listen(socket, config, 1).unwrap();
    let addr = local_port(&mut driver, listener);
    let url = WsUrl::parse(&format!("ws://{addr}/")).unwrap();
    let session = WsSession::client(&url, &[], [7; 16], settings, Instant::now()).unwrap();
    let client = driver.connect(&Target::Tcp(addr), Box::new(session), ConnectOptions::default(), 2).unwrap();
    let mut events = Vec::new();
    let mut server = None;
    pump(&mut driver, &mut events, |d, e| {
        for ev in e.iter().filter(|ev| matches!(ev.kind, EventKind::Accepted { .. })) {
            server = Some(ev.key);
        }
        server.is_some_and(|s| d.proto::<WsSession>(s).is_some_and(|p| p.is_established()))
            && d.proto::<WsSession>(client).is_some_and(|p| p.is_open())
    });
    let server = server.unwrap();
    driver.adopt(server);
    assert_eq!(driver.proto::<WsSession>(server).unwrap().poll_timeout(), None, "no traffic, no timer");

    // 4 KiB each way: the buffers grow and are kept while traffic goes on.
    let payload = vec![5u8; 4096];
    driver.proto::<WsSession>(client).unwrap().send(Opcode::Binary, &payload).unwrap();
    driver.flush(client);
    let mut got = None;
    pump(&mut driver, &mut events, |d, _| {
        got = got.take().or_else(|| d.proto::<WsSession>(server).unwrap().receive());
        got.is_some()
    });
    assert!(matches!(got, Some(Received::Message(_, data)) if data.len() == 4096));
    let trim_at = driver.proto::<WsSession>(server).unwrap().poll_timeout().expect("a trim is planned");
    assert!(trim_at > Instant::now() + IDLE_TRIM / 2);

    // Serviced after IDLE_TRIM of silence: trimmed, nothing left to plan.
    driver.service(server, Instant::now() + IDLE_TRIM * 2);
    let session = driver.proto::<WsSession>(server).unwrap();
    assert_eq!(session.poll_timeout(), None);
    assert!(session.is_open());
}

#[test]
fn wake_times_come_back_as_events_and_deadlines_may_move_both_ways() {
    let mut driver = Driver::new().unwrap();
    let udp = net::udp_bind(localhost(), net::UdpOptions::default()).unwrap();
    let key = driver.open_datagram(udp, None, 16, 5).unwrap();
    let now = Instant::now();
    driver.set_wake(key, Some(now + Duration::from_secs(60)));
    driver.set_wake(key, Some(now + Duration::from_millis(30)));
    driver.set_wake(key, Some(now + Duration::from_millis(50)));
    assert_eq!(driver.next_deadline(), Some(now + Duration::from_millis(30)), "the early item stays queued");
    let mut events = Vec::new();
    pump(&mut driver, &mut events, |_, e| !e.is_empty());
    assert!(Instant::now() >= now + Duration::from_millis(50), "woken at the last time set, not earlier");
    assert_eq!(events, vec![Event { key, tag: 5, kind: EventKind::Wake }]);
    assert_eq!(driver.wake(key), None);
    assert_eq!(driver.next_deadline(), None);
}
