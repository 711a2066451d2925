//! Listener entries: a TCP or Unix listening socket that accepts until `WouldBlock` within a
//! per-service budget, gives each connection a protocol object from the layer above, and
//! survives running out of descriptors (`EMFILE`, `ENFILE`) by pausing with a growing back-off
//! instead of spinning on a readiness event it cannot clear or stalling until the next one.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::net::{Address, ListenSocket, StreamSocket};
use crate::proto::stream::StreamProtocol;

/// Connections accepted per service; past it the rest waits for the next update.
const ACCEPT_BUDGET: usize = 128;
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Makes the protocol object of each accepted connection.
pub type ProtocolFactory = Box<dyn FnMut(Instant) -> Box<dyn StreamProtocol>>;

/// How a listener treats the connections it accepts.
pub struct ListenerConfig {
    /// TLS for every connection (announced once its handshake is done).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub make: ProtocolFactory,
    /// Connections open at once; past it new ones are accepted and closed at once.
    pub max_connections: Option<usize>,
    pub nodelay: bool,
}

/// Counters of a listener.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ListenerStats {
    pub accepted: u64,
    /// Closed at once because `max_connections` were open.
    pub refused: u64,
    /// Times accepting paused for lack of descriptors or memory.
    pub paused: u64,
    /// TLS handshakes that failed or timed out before the connection was announced.
    pub tls_failures: u64,
}

pub struct Listener {
    pub(super) socket: ListenSocket,
    pub(super) config: ListenerConfig,
    pub local: Address,
    /// Accepted streams not closed yet.
    pub(super) children: usize,
    /// Accepting is paused until then (out of descriptors).
    paused_until: Option<Instant>,
    backoff: Duration,
    /// The accept budget ran out with connections pending.
    backlog: bool,
    pub stats: ListenerStats,
}

/// What one accept attempt gave.
pub(super) enum Accepted {
    Stream(StreamSocket, Address),
    /// Nothing more now (would block, budget spent, paused).
    Done,
}

/// Whether `accept` failed because the process or the system is out of descriptors or memory.
fn out_of_resources(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

impl Listener {
    pub(super) fn new(socket: ListenSocket, config: ListenerConfig) -> io::Result<Listener> {
        Ok(Listener {
            local: socket.local_address()?,
            socket,
            config,
            children: 0,
            paused_until: None,
            backoff: FIRST_BACKOFF,
            backlog: false,
            stats: ListenerStats::default(),
        })
    }

    pub fn connections(&self) -> usize {
        self.children
    }

    /// Starts a round of accepts (one service).
    pub(super) fn begin(&mut self, now: Instant) -> usize {
        self.backlog = false;
        match self.paused_until {
            Some(until) if now < until => 0,
            _ => {
                self.paused_until = None;
                ACCEPT_BUDGET
            }
        }
    }

    /// Accepts one connection; connections over `max_connections` are closed here.
    pub(super) fn accept_one(&mut self, now: Instant, budget: &mut usize) -> Accepted {
        loop {
            if *budget == 0 {
                self.backlog = self.paused_until.is_none();
                return Accepted::Done;
            }
            *budget -= 1;
            match self.socket.accept() {
                Ok((socket, peer)) => {
                    self.backoff = FIRST_BACKOFF;
                    if self.config.max_connections.is_some_and(|max| self.children >= max) {
                        self.stats.refused += 1;
                        socket.set_reset_on_close();
                        continue;
                    }
                    self.stats.accepted += 1;
                    self.children += 1;
                    if self.config.nodelay {
                        let _ = socket.set_nodelay(true);
                    }
                    return Accepted::Stream(socket, peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Accepted::Done,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if out_of_resources(&e) => {
                    self.stats.paused += 1;
                    self.paused_until = Some(now + self.backoff);
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    return Accepted::Done;
                }
                // The connection died in the queue (ECONNABORTED) and the like: take the next.
                Err(_) => continue,
            }
        }
    }

    /// When the listener next needs servicing without a readiness event.
    pub(super) fn deadline(&self, now: Instant) -> Option<Instant> {
        if self.backlog {
            return Some(now);
        }
        self.paused_until
    }
}
