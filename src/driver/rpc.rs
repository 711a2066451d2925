//! RPC endpoints: the I/O half. One UDP socket per entry driving a `proto::rpc::Server` (an app)
//! or `proto::rpc::Client` (a connection to an app). Datagrams are drained until `WouldBlock`,
//! everything the protocol wants to send goes out until the socket pushes back (the unsent
//! datagram waits for WRITABLE), and the entry's deadline follows `poll_timeout` (plus an extra
//! deadline the layer above uses for idle checks and reconnects).

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::UdpSocket;
use mio::Interest;
use ring::rand::SystemRandom;

use super::{Driver, Entry, Error, Key, Result};
use crate::proto::rpc::{Client, ClientEvent, Server, ServerEvent, MAX_DATAGRAM};

/// The protocol state an endpoint drives.
pub enum Proto {
    Server(Box<Server>),
    /// `None` once the layer above dropped a finished session (waiting to reconnect).
    Client(Option<Box<Client>>),
}

/// What an endpoint reports to the layer above.
#[derive(Debug)]
pub enum RpcEvent {
    Server(ServerEvent),
    Client(ClientEvent),
    /// The extra deadline passed.
    Wake,
}

pub struct Endpoint {
    pub(super) socket: UdpSocket,
    pub proto: Proto,
    pub rng: SystemRandom,
    pub local: SocketAddr,
    /// A datagram the socket refused (`WouldBlock`), sent on the next WRITABLE event.
    unsent: Option<(Vec<u8>, SocketAddr)>,
    writable_interest: bool,
    /// Deadline the layer above asked for (idle scan, reconnect).
    pub extra: Option<Instant>,
    /// Datagrams are left in the socket after the read budget ran out.
    backlog: bool,
}

/// Datagrams read per service: past it the rest waits for the next update, so a flood cannot
/// stall a frame.
const READ_BUDGET: usize = 4096;

impl Endpoint {
    fn drain(&mut self, now: Instant) {
        let mut buf = [0u8; 2048];
        self.backlog = false;
        for _ in 0..READ_BUDGET {
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => match &mut self.proto {
                    Proto::Server(s) => s.handle_datagram(now, from, &buf[..n], &self.rng),
                    Proto::Client(Some(c)) => c.handle_datagram(now, from, &buf[..n]),
                    Proto::Client(None) => {}
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors (port unreachable) and the like: the protocol's timers handle it.
                Err(_) => continue,
            }
        }
        // Budget spent before `WouldBlock`: no new readiness event will come (edge-triggered),
        // so ask to be serviced again at once.
        self.backlog = true;
    }

    /// Sends until the protocol has nothing more or the socket pushes back.
    fn transmit(&mut self, now: Instant) {
        if let Some((data, to)) = self.unsent.take() {
            if !self.send(&data, to) {
                return;
            }
        }
        let mut buf = Vec::with_capacity(MAX_DATAGRAM);
        loop {
            buf.clear();
            let to = match &mut self.proto {
                Proto::Server(s) => s.poll_transmit(now, &mut buf),
                Proto::Client(Some(c)) => c.poll_transmit(now, &mut buf),
                Proto::Client(None) => None,
            };
            let Some(to) = to else { break };
            if !self.send(&buf, to) {
                break;
            }
        }
    }

    /// False when the socket would block (the datagram is kept).
    fn send(&mut self, data: &[u8], to: SocketAddr) -> bool {
        loop {
            match self.socket.send_to(data, to) {
                Ok(_) => return true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.unsent = Some((data.to_vec(), to));
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Unreachable peer, message too long…: the datagram is lost, the protocol resends.
                Err(_) => return true,
            }
        }
    }

    fn events(&mut self, out: &mut Vec<RpcEvent>) {
        match &mut self.proto {
            Proto::Server(s) => {
                while let Some(ev) = s.poll_event() {
                    out.push(RpcEvent::Server(ev));
                }
            }
            Proto::Client(Some(c)) => {
                while let Some(ev) = c.poll_event() {
                    out.push(RpcEvent::Client(ev));
                }
            }
            Proto::Client(None) => {}
        }
    }

    fn deadline(&self) -> Option<Instant> {
        let proto = match &self.proto {
            Proto::Server(s) => s.poll_timeout(),
            Proto::Client(Some(c)) => c.poll_timeout(),
            Proto::Client(None) => None,
        };
        match (proto, self.extra) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Driver {
    /// Binds a UDP socket for `proto` to the first of `addrs` that works, and registers it.
    pub fn rpc_open(&mut self, addrs: &[SocketAddr], proto: Proto, now: Instant) -> Result<Key> {
        let mut bound = Err(std::io::Error::from(std::io::ErrorKind::AddrNotAvailable));
        for addr in addrs {
            bound = UdpSocket::bind(*addr);
            if bound.is_ok() {
                break;
            }
        }
        let socket = bound?;
        let local = socket.local_addr()?;
        let is_server = matches!(proto, Proto::Server(_));
        let endpoint = Box::new(Endpoint {
            socket,
            proto,
            rng: SystemRandom::new(),
            local,
            unsent: None,
            writable_interest: false,
            extra: None,
            backlog: false,
        });
        let key = self.entries.insert(if is_server {
            Entry::RpcServer(endpoint)
        } else {
            Entry::RpcClient(endpoint)
        });
        let Some(Entry::RpcServer(ep) | Entry::RpcClient(ep)) = self.entries.get_mut(key) else {
            unreachable!()
        };
        if let Err(e) = self.poll.registry().register(&mut ep.socket, key.token(), Interest::READABLE) {
            self.entries.remove(key);
            return Err(e.into());
        }
        let mut ignored = Vec::new();
        self.rpc_flush(key, now, &mut ignored);
        Ok(key)
    }

    /// The endpoint of an RPC entry.
    pub fn rpc(&mut self, key: Key) -> Result<&mut Endpoint> {
        match self.entries.get_mut(key) {
            Some(Entry::RpcServer(ep) | Entry::RpcClient(ep)) => Ok(ep),
            _ => Err(Error::StaleHandle),
        }
    }

    /// Services a ready or due entry: reads everything, runs timers, collects events, sends.
    pub fn rpc_service(&mut self, key: Key, now: Instant, out: &mut Vec<RpcEvent>) {
        let Ok(ep) = self.rpc(key) else { return };
        ep.drain(now);
        match &mut ep.proto {
            Proto::Server(s) => s.handle_timeout(now),
            Proto::Client(Some(c)) => c.handle_timeout(now),
            Proto::Client(None) => {}
        }
        if ep.extra.is_some_and(|at| at <= now) {
            ep.extra = None;
            out.push(RpcEvent::Wake);
        }
        self.rpc_flush(key, now, out);
    }

    /// After `send`/`close` (or any change): collects events, sends what is queued and re-arms
    /// the deadline and the WRITABLE interest.
    pub fn rpc_flush(&mut self, key: Key, now: Instant, out: &mut Vec<RpcEvent>) {
        let Ok(ep) = self.rpc(key) else { return };
        ep.events(out);
        ep.transmit(now);
        ep.events(out);
        let want_writable = ep.unsent.is_some();
        let at = if ep.backlog { Some(now) } else { ep.deadline() };
        if want_writable != ep.writable_interest {
            ep.writable_interest = want_writable;
            let interest =
                if want_writable { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            let Some(Entry::RpcServer(ep) | Entry::RpcClient(ep)) = self.entries.get_mut(key) else { return };
            let _ = self.poll.registry().reregister(&mut ep.socket, key.token(), interest);
        }
        self.set_deadline(key, at);
    }
}
