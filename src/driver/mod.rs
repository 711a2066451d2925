//! The only code that does I/O: one `mio::Poll`, generation-checked entries, name resolution.
//!
//! `poll` drains every ready event until the sockets report `WouldBlock`; the work per call is
//! proportional to ready events, never to the number of open entries.

mod dns;
mod error;
pub mod rpc;
mod slots;
mod timers;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};

pub use dns::{parse_ip, Lookup};
pub use error::{Error, Result};
pub use slots::{Key, Slots};
pub use timers::TimerQueue;

/// Bytes queued on a stream during an update past which it is written at once.
const WRITE_NOW: usize = 64 * 1024;

/// The waker token; entry tokens never reach it (their index is below `u32::MAX`).
const WAKER: Token = Token(usize::MAX);

/// Something that became ready during [`Driver::poll`].
#[derive(Debug, Clone, PartialEq)]
pub enum Ready {
    /// A background lookup of this host finished; [`Driver::lookup`] now answers from cache.
    Resolved(String),
    /// An entry's socket is ready (readable, writable or hung up).
    Io(Key),
    /// An entry's deadline passed.
    Due(Key),
}

/// An open I/O resource.
pub enum Entry {
    /// A bound UDP socket.
    Udp(UdpSocket),
    /// A WebSocket server's listening socket.
    WsListener(ws::Listener),
    /// A WebSocket connection (either side).
    Ws(Box<ws::Stream>),
    /// An RPC app's socket and protocol server.
    RpcServer(Box<rpc::Endpoint>),
    /// An RPC client's socket and protocol client.
    RpcClient(Box<rpc::Endpoint>),
}

pub struct Driver {
    poll: Poll,
    events: Events,
    dns: dns::Dns,
    entries: Slots<Entry>,
    resolved: Vec<String>,
    /// Entries that asked to be serviced at a time (timeouts, keep-alive, retransmission).
    deadlines: TimerQueue<Key>,
    /// Each entry's armed deadline: (timer id, when).
    armed: rustc_hash::FxHashMap<Key, (u64, Instant)>,
    /// When the last poll returned (a clock for stream writes, which happen in between).
    now: Instant,
    /// Streams with output queued during the current update ([`Driver::ws_queued`]).
    ws_to_flush: Vec<Key>,
    /// The one buffer streams read into (they are serviced one at a time).
    read_buf: Box<[u8]>,
}

impl Driver {
    pub fn new() -> Result<Driver> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        Ok(Driver {
            poll,
            events: Events::with_capacity(1024),
            dns: dns::Dns::new(waker),
            entries: Slots::default(),
            resolved: Vec::new(),
            deadlines: TimerQueue::default(),
            armed: Default::default(),
            ws_to_flush: Vec::new(),
            now: Instant::now(),
            read_buf: vec![0; 64 * 1024].into_boxed_slice(),
        })
    }

    /// Waits up to `timeout` (`Some(ZERO)` never blocks) and appends what became ready.
    pub fn poll(&mut self, timeout: Option<Duration>, now: Instant, ready: &mut Vec<Ready>) -> Result<()> {
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        for event in self.events.iter() {
            if event.token() == WAKER {
                self.dns.collect(now, &mut self.resolved);
                ready.extend(self.resolved.drain(..).map(Ready::Resolved));
            } else {
                let key = Key::from_token(event.token());
                match self.entries.get_mut(key) {
                    Some(Entry::Ws(stream)) => {
                        stream.hangup |= event.is_read_closed() || event.is_error();
                        ready.push(Ready::Io(key));
                    }
                    Some(_) => ready.push(Ready::Io(key)),
                    None => {}
                }
            }
        }
        let now = Instant::now();
        self.now = now;
        while let Some((_, _, key)) = self.deadlines.pop_due(now) {
            self.armed.remove(&key);
            ready.push(Ready::Due(key));
        }
        Ok(())
    }

    /// Arms (or moves, or with `None` disarms) the one deadline of an entry; when it passes,
    /// `poll` reports `Ready::Due(key)`.
    pub fn set_deadline(&mut self, key: Key, at: Option<Instant>) {
        if self.armed.get(&key).map(|&(_, when)| when) == at {
            return;
        }
        if let Some((id, _)) = self.armed.remove(&key) {
            self.deadlines.cancel(id);
        }
        if let Some(at) = at {
            self.armed.insert(key, (self.deadlines.insert(at, key), at));
        }
    }

    /// The earliest entry deadline (the host sleeps at most until then).
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.deadlines.next_deadline()
    }

    pub fn entry(&self, key: Key) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Listens for WebSocket connections (TCP, with TLS when `tls` is set).
    pub fn ws_listen(
        &mut self,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        handlers: Vec<String>,
        settings: ws::Settings,
    ) -> Result<Key> {
        let socket = TcpListener::bind(addr)?;
        let key = self.entries.insert(Entry::WsListener(ws::Listener::new(socket, tls, handlers, settings)));
        let Some(Entry::WsListener(listener)) = self.entries.get_mut(key) else { unreachable!() };
        if let Err(e) = self.poll.registry().register(&mut listener.socket, key.token(), Interest::READABLE) {
            self.entries.remove(key);
            return Err(e.into());
        }
        Ok(key)
    }

    /// Starts a client WebSocket stream owned by `owner` (the caller's handle for the app).
    pub fn ws_connect(&mut self, stream: ws::Stream) -> Result<Key> {
        let key = self.entries.insert(Entry::Ws(Box::new(stream)));
        let Some(Entry::Ws(stream)) = self.entries.get_mut(key) else { unreachable!() };
        stream.register(self.poll.registry(), key.token())?;
        self.ws_reschedule(key);
        Ok(key)
    }

    /// Services a WebSocket listener (accepting every pending connection) or stream.
    pub fn ws_service(&mut self, key: Key, now: Instant, io: &mut ws::WsEvents) {
        let mut accepted = Vec::new();
        match self.entries.get_mut(key) {
            Some(Entry::WsListener(listener)) => loop {
                match listener.socket.accept() {
                    Ok((socket, peer)) => match ws::Stream::accepted(listener, socket, peer, now) {
                        Ok(stream) => accepted.push(stream),
                        Err(_) => continue,
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // Out of descriptors or the like: try again on the next readiness event.
                    Err(_) => break,
                }
            },
            Some(Entry::Ws(stream)) => {
                stream.service(key, self.poll.registry(), now, io, &mut self.read_buf);
                if stream.should_resume_reading() {
                    stream.service(key, self.poll.registry(), now, io, &mut self.read_buf);
                }
                self.ws_reschedule(key);
            }
            _ => {}
        }
        for mut stream in accepted {
            stream.owner = Some(key);
            let conn = self.entries.insert(Entry::Ws(Box::new(stream)));
            let Some(Entry::Ws(stream)) = self.entries.get_mut(conn) else { unreachable!() };
            if stream.register(self.poll.registry(), conn.token()).is_err() {
                self.entries.remove(conn);
                continue;
            }
            self.ws_service(conn, now, io);
        }
    }

    /// Re-arms a stream's deadline after its state changed; forgets a server stream that closed
    /// before its upgrade completed (nobody above knows about it).
    fn ws_reschedule(&mut self, key: Key) {
        let Some(Entry::Ws(stream)) = self.entries.get_mut(key) else { return };
        if stream.is_orphan() {
            self.close(key);
            return;
        }
        let at = stream.deadline();
        self.set_deadline(key, at);
    }

    /// Mutable access to a WebSocket stream; call [`Driver::ws_flush`] after changing it.
    pub fn ws_stream(&mut self, key: Key) -> Result<&mut ws::Stream> {
        match self.entries.get_mut(key) {
            Some(Entry::Ws(stream)) => Ok(stream),
            _ => Err(Error::StaleHandle),
        }
    }

    /// Writes what a stream has queued and re-arms its deadline (after send/close).
    pub fn ws_flush(&mut self, key: Key, io: &mut ws::WsEvents) {
        if let Some(Entry::Ws(stream)) = self.entries.get_mut(key) {
            stream.write(key, self.poll.registry(), self.now, io);
            self.ws_reschedule(key);
        }
    }

    /// Like [`Driver::ws_flush`], but while the caller is in the middle of an update: the stream
    /// is written by [`Driver::ws_flush_queued`] at its end, so replies to many connections
    /// leave back to back (and a message sent twice in one update costs one write). A stream with
    /// [`WRITE_NOW`] bytes waiting is written at once, so a burst never meets the backpressure
    /// bound only because it was held back.
    pub fn ws_queued(&mut self, key: Key, io: &mut ws::WsEvents) {
        let Some(Entry::Ws(stream)) = self.entries.get_mut(key) else { return };
        if stream.queued_len() >= WRITE_NOW {
            return self.ws_flush(key, io);
        }
        if !stream.flush_due {
            stream.flush_due = true;
            self.ws_to_flush.push(key);
        }
    }

    /// Writes every stream [`Driver::ws_queued`] noted.
    pub fn ws_flush_queued(&mut self, io: &mut ws::WsEvents) {
        for key in std::mem::take(&mut self.ws_to_flush) {
            self.ws_flush(key, io);
        }
    }

    /// Resolves `host` without blocking (IP literals answer at once).
    pub fn lookup(&mut self, host: &str, now: Instant) -> Lookup {
        self.dns.lookup(host, now)
    }

    /// Binds a UDP socket and registers it for readability.
    pub fn open_udp(&mut self, addr: SocketAddr) -> Result<Key> {
        let socket = UdpSocket::bind(addr)?;
        let key = self.entries.insert(Entry::Udp(socket));
        let Some(Entry::Udp(socket)) = self.entries.get_mut(key) else { unreachable!() };
        if let Err(e) = self.poll.registry().register(socket, key.token(), Interest::READABLE) {
            self.entries.remove(key);
            return Err(e.into());
        }
        Ok(key)
    }

    pub fn udp(&self, key: Key) -> Result<&UdpSocket> {
        match self.entries.get(key) {
            Some(Entry::Udp(socket)) => Ok(socket),
            _ => Err(Error::StaleHandle),
        }
    }

    /// Closes an entry at once (no goodbye to the peer); returns false for a stale key.
    pub fn close(&mut self, key: Key) -> bool {
        self.set_deadline(key, None);
        let registry = self.poll.registry();
        match self.entries.remove(key) {
            Some(Entry::Udp(mut socket)) => {
                let _ = registry.deregister(&mut socket);
            }
            Some(Entry::WsListener(mut listener)) => {
                let _ = registry.deregister(&mut listener.socket);
            }
            Some(Entry::Ws(mut stream)) => stream.deregister(registry),
            Some(Entry::RpcServer(mut ep) | Entry::RpcClient(mut ep)) => {
                let _ = registry.deregister(&mut ep.socket);
            }
            None => return false,
        }
        true
    }

    /// Open entries plus lookups still running.
    pub fn pending(&self) -> usize {
        self.entries.len() + self.dns.in_flight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_readiness_is_reported_for_the_right_key_only() {
        let mut driver = Driver::new().unwrap();
        let idle = driver.open_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let key = driver.open_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = driver.udp(key).unwrap().local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"hi", addr).unwrap();
        let mut ready = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while ready.is_empty() && Instant::now() < deadline {
            driver.poll(Some(Duration::from_millis(50)), Instant::now(), &mut ready).unwrap();
        }
        assert_eq!(ready, vec![Ready::Io(key)]);
        let mut buf = [0u8; 16];
        assert_eq!(driver.udp(key).unwrap().recv_from(&mut buf).unwrap().0, 2);
        assert!(driver.close(key));
        assert!(!driver.close(key), "second close of the same key is a no-op");
        assert!(matches!(driver.udp(key), Err(Error::StaleHandle)));
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
            driver.poll(Some(Duration::from_secs(1)), Instant::now(), &mut ready).unwrap();
        }
        assert_eq!(ready, vec![Ready::Resolved("localhost".into())]);
        match driver.lookup("localhost", Instant::now()) {
            Lookup::Done(ips) => assert!(ips.iter().all(|ip| ip.is_loopback()), "{ips:?}"),
            other => panic!("expected a cached answer, got {other:?}"),
        }
        assert_eq!(driver.pending(), 0);
        assert!(matches!(driver.lookup("no-such-host.invalid", Instant::now()), Lookup::Pending));
    }

    /// Polls and services every ready stream until `done` holds for the events seen so far.
    fn pump_ws(driver: &mut Driver, events: &mut ws::WsEvents, done: impl Fn(&ws::WsEvents) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(events) {
            assert!(Instant::now() < deadline, "timed out; events so far: {events:?}");
            let mut ready = Vec::new();
            driver.poll(Some(Duration::from_millis(20)), Instant::now(), &mut ready).unwrap();
            for r in ready {
                if let Ready::Io(key) | Ready::Due(key) = r {
                    driver.ws_service(key, Instant::now(), events);
                }
            }
        }
    }

    #[test]
    fn a_stream_gives_back_traffic_buffers_once_idle() {
        let mut driver = Driver::new().unwrap();
        let settings = ws::Settings::default();
        let listener = driver
            .ws_listen("127.0.0.1:0".parse().unwrap(), None, vec!["default".into()], settings.clone())
            .unwrap();
        let Some(Entry::WsListener(l)) = driver.entry(listener) else { panic!() };
        let addr = l.socket.local_addr().unwrap();
        let url = crate::proto::ws::WsUrl::parse(&format!("ws://{addr}/")).unwrap();
        let stream = ws::Stream::connect(addr, &url, &[], [7; 16], None, settings, Instant::now()).unwrap();
        let client = driver.ws_connect(stream).unwrap();
        let mut events = ws::WsEvents::new();
        pump_ws(&mut driver, &mut events, |e| {
            e.iter().any(|e| matches!(e, ws::WsIo::Accepted { .. }))
                && e.iter().any(|e| matches!(e, ws::WsIo::Opened { .. }))
        });
        let server = events.iter().find_map(|e| match e {
            ws::WsIo::Accepted { conn, .. } => Some(*conn),
            _ => None,
        });
        let server = server.unwrap();
        assert_eq!(driver.ws_stream(server).unwrap().deadline(), None, "no traffic, no timer");

        // 4 KiB each way: the buffers grow and are kept while traffic goes on.
        let payload = vec![5u8; 4096];
        driver.ws_stream(client).unwrap().send(crate::proto::ws::Opcode::Binary, &payload).unwrap();
        driver.ws_flush(client, &mut events);
        pump_ws(&mut driver, &mut events, |e| e.contains(&ws::WsIo::Inbox { conn: server }));
        let got = driver.ws_stream(server).unwrap().receive();
        assert!(matches!(got, Some(ws::Received::Message(_, data)) if data.len() == 4096));
        let trim_at = driver.ws_stream(server).unwrap().deadline().expect("a trim is planned");
        assert!(trim_at > Instant::now() + ws::IDLE_TRIM / 2);

        // Serviced after IDLE_TRIM of silence: trimmed, nothing left to plan.
        driver.ws_service(server, Instant::now() + ws::IDLE_TRIM * 2, &mut events);
        assert_eq!(driver.ws_stream(server).unwrap().deadline(), None);
        assert!(driver.ws_stream(server).unwrap().is_open());
    }
}
