//! Datagram entries: a UDP socket and the protocol running over it. Datagrams are read until
//! `WouldBlock` or the entry's read budget (the rest waits for the next update, so a flood
//! cannot stall a frame); everything the protocol wants to send goes out until the socket
//! pushes back (the refused datagram waits for WRITABLE).

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use crate::proto::stream::DatagramProtocol;

pub struct Datagram {
    pub(super) socket: UdpSocket,
    /// `None` while the layer above has no protocol on the socket (datagrams are dropped).
    proto: Option<Box<dyn DatagramProtocol>>,
    pub local: SocketAddr,
    /// Datagrams read per service.
    budget: usize,
    /// A datagram the socket refused (`WouldBlock`), sent on the next WRITABLE event.
    unsent: Option<(Vec<u8>, SocketAddr)>,
    writable: bool,
    /// Datagrams are left in the socket after the read budget ran out.
    backlog: bool,
    /// The buffer outgoing datagrams are encoded into.
    send_buf: Vec<u8>,
    pub received: Moved,
    pub sent: Moved,
}

/// Datagrams and their bytes moved one way.
#[derive(Clone, Copy, Debug, Default)]
pub struct Moved {
    pub datagrams: u64,
    pub bytes: u64,
}

impl Datagram {
    pub(super) fn new(
        socket: UdpSocket,
        proto: Option<Box<dyn DatagramProtocol>>,
        budget: usize,
    ) -> io::Result<Datagram> {
        Ok(Datagram {
            local: socket.local_addr()?,
            socket,
            proto,
            budget,
            unsent: None,
            writable: false,
            backlog: false,
            send_buf: Vec::with_capacity(2048),
            received: Moved::default(),
            sent: Moved::default(),
        })
    }

    /// The protocol object, if any.
    pub fn proto(&mut self) -> Option<&mut dyn DatagramProtocol> {
        self.proto.as_deref_mut()
    }

    /// Puts a protocol on the socket (or takes it off).
    pub fn set_proto(&mut self, proto: Option<Box<dyn DatagramProtocol>>) {
        self.proto = proto;
        self.unsent = None;
    }

    /// Bytes of the datagram the socket refused, waiting for WRITABLE.
    pub fn unsent_len(&self) -> usize {
        self.unsent.as_ref().map_or(0, |(data, _)| data.len())
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Reads, runs the protocol's timers, sends; true if the protocol has news.
    pub(super) fn service(
        &mut self,
        registry: &Registry,
        token: Token,
        now: Instant,
        buf: &mut [u8],
    ) -> bool {
        self.read(now, buf);
        if let Some(proto) = &mut self.proto {
            if proto.poll_timeout().is_some_and(|at| now >= at) {
                proto.handle_timeout(now);
            }
        }
        self.flush(registry, token, now)
    }

    fn read(&mut self, now: Instant, buf: &mut [u8]) {
        self.backlog = false;
        for _ in 0..self.budget {
            if self.proto.as_ref().is_some_and(|p| !p.wants_input()) {
                return;
            }
            match self.socket.recv_from(buf) {
                Ok((n, from)) => {
                    self.received.datagrams += 1;
                    self.received.bytes += n as u64;
                    if let Some(proto) = &mut self.proto {
                        proto.handle_datagram(now, from, &buf[..n]);
                    }
                }
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

    /// Sends until the protocol has nothing more or the socket pushes back; true if the
    /// protocol has news.
    pub(super) fn flush(&mut self, registry: &Registry, token: Token, now: Instant) -> bool {
        let Some(proto) = &mut self.proto else { return false };
        let mut blocked = false;
        if let Some((data, to)) = self.unsent.take() {
            blocked = !send(&self.socket, &data, to, &mut self.unsent, &mut self.sent);
        }
        while !blocked {
            self.send_buf.clear();
            let Some(to) = proto.poll_transmit(now, &mut self.send_buf) else { break };
            blocked = !send(&self.socket, &self.send_buf, to, &mut self.unsent, &mut self.sent);
        }
        if blocked != self.writable {
            self.writable = blocked;
            let interest = if blocked { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            let _ = registry.reregister(&mut self.socket, token, interest);
        }
        proto.take_news()
    }

    /// When the entry next needs servicing without I/O.
    pub(super) fn deadline(&self, now: Instant) -> Option<Instant> {
        if self.backlog {
            return Some(now);
        }
        self.proto.as_ref().and_then(|p| p.poll_timeout())
    }
}

/// Sends one datagram; false when the socket would block (the datagram is kept in `unsent`).
fn send(
    socket: &UdpSocket,
    data: &[u8],
    to: SocketAddr,
    unsent: &mut Option<(Vec<u8>, SocketAddr)>,
    sent: &mut Moved,
) -> bool {
    loop {
        match socket.send_to(data, to) {
            Ok(n) => {
                sent.datagrams += 1;
                sent.bytes += n as u64;
                return true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *unsent = Some((data.to_vec(), to));
                return false;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Unreachable peer, message too long…: the datagram is lost (protocols resend).
            Err(_) => return true,
        }
    }
}
