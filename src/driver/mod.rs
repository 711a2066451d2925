//! The only code that does I/O: one `mio::Poll`, generation-checked entries, name resolution.
//!
//! `poll` drains every ready event until the sockets report `WouldBlock`; the work per call is
//! proportional to ready events, never to the number of open entries.

mod dns;
mod error;
mod slots;
mod timers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};

pub use dns::{parse_ip, Lookup};
pub use error::{Error, Result};
pub use slots::{Key, Slots};
pub use timers::TimerQueue;

/// The waker token; entry tokens never reach it (their index is below `u32::MAX`).
const WAKER: Token = Token(usize::MAX);

/// Something that became ready during [`Driver::poll`].
#[derive(Debug, Clone, PartialEq)]
pub enum Ready {
    /// A background lookup of this host finished; [`Driver::lookup`] now answers from cache.
    Resolved(String),
    /// An entry's socket is readable (or hung up).
    Readable(Key),
}

/// An open I/O resource.
pub enum Entry {
    /// A bound UDP socket.
    Udp(UdpSocket),
}

pub struct Driver {
    poll: Poll,
    events: Events,
    dns: dns::Dns,
    entries: Slots<Entry>,
    resolved: Vec<String>,
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
                if self.entries.get(key).is_some() {
                    ready.push(Ready::Readable(key));
                }
            }
        }
        Ok(())
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
            None => Err(Error::StaleHandle),
        }
    }

    /// Closes an entry; returns false for a stale key.
    pub fn close(&mut self, key: Key) -> bool {
        match self.entries.remove(key) {
            Some(Entry::Udp(mut socket)) => {
                let _ = self.poll.registry().deregister(&mut socket);
                true
            }
            None => false,
        }
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
        assert_eq!(ready, vec![Ready::Readable(key)]);
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
}
