//! The only code that does I/O: one `mio::Poll`, generation-checked entries, name resolution.
//!
//! The driver knows three kinds of entry and nothing about the protocols inside them:
//! - a **stream** ([`stream`]): TCP or Unix socket, optional TLS, carrying a
//!   [`StreamProtocol`] (raw bytes for Lua, WebSocket, ...);
//! - a **datagram** entry ([`datagram`]): a UDP socket carrying a [`DatagramProtocol`] (raw
//!   datagrams for Lua, RPC sessions);
//! - a **listener** ([`listener`]): TCP or Unix, whose accepted streams get a protocol from the
//!   layer above.
//!
//! `poll` reports entries whose socket is ready or whose deadline passed (one deadline per
//! entry: the protocol's `poll_timeout`, the transport's own, and a wake time the layer above may
//! set); `service` runs one of them; what the layer above must hear of comes out as [`Event`]s.
//! Output made during an update is written at its end for every entry at once ([`Driver::queue_flush`],
//! [`Driver::flush_queued`]). The work per call is proportional to ready events, never to the
//! number of open entries.

pub mod datagram;
mod dns;
mod error;
pub mod listener;
pub mod net;
mod slots;
pub mod stream;
mod timers;

use std::any::Any;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::proto::stream::{DatagramProtocol, StreamProtocol};
use crate::proto::tls::Tls;
pub use datagram::Datagram;
pub use dns::{parse_ip, Lookup};
pub use error::{Error, Result};
pub use listener::{Listener, ListenerConfig, ListenerStats};
pub use net::Address;
pub use slots::{Key, Slots};
pub use stream::{ClientTls, ConnectOptions, Stream};
pub use timers::TimerQueue;

/// Bytes queued on a stream during an update past which it is written at once.
const WRITE_NOW: usize = 64 * 1024;

/// The waker token; entry tokens never reach it (their index is below `u32::MAX`).
const WAKER: Token = Token(usize::MAX);

/// A label the layer above gives an entry (which of its modules owns it); accepted streams
/// inherit their listener's. Every event carries it.
pub type Tag = u32;

/// Something that became ready during [`Driver::poll`].
#[derive(Debug, Clone, PartialEq)]
pub enum Ready {
    /// A background lookup of this host finished; [`Driver::lookup`] now answers from cache.
    Resolved(String),
    /// An entry's socket is ready or its deadline passed: [`Driver::service`] it.
    Entry(Key),
}

/// What the layer above hears of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub key: Key,
    pub tag: Tag,
    pub kind: EventKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A listener accepted this stream and it is ready (with TLS: past the handshake). Until
    /// the layer above [`adopts`](Driver::adopt) it, the driver closes it once its socket closes.
    Accepted { listener: Key },
    /// The entry's protocol has news: look at it.
    News,
    /// Everything a stream had queued was written.
    Drained,
    /// The wake time set with [`Driver::set_wake`] passed.
    Wake,
}

/// Where a stream connects to.
#[derive(Debug, Clone)]
pub enum Target {
    Tcp(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

enum Io {
    Stream(Box<Stream>),
    Datagram(Box<Datagram>),
    Listener(Box<Listener>),
}

struct Entry {
    io: Io,
    tag: Tag,
    /// The listener that accepted this stream.
    listener: Option<Key>,
    /// The layer above took charge of the entry.
    adopted: bool,
    /// Accepted was reported.
    announced: bool,
    /// When the layer above wants [`EventKind::Wake`].
    wake: Option<Instant>,
    /// The deadline the entry wants, and the earliest one queued in the heap for it.
    deadline: Option<Instant>,
    armed: Option<Instant>,
    /// In the list written at the end of the update.
    flush_due: bool,
}

impl Entry {
    fn new(io: Io, tag: Tag) -> Entry {
        Entry {
            io,
            tag,
            listener: None,
            adopted: true,
            announced: true,
            wake: None,
            deadline: None,
            armed: None,
            flush_due: false,
        }
    }
}

pub struct Driver {
    poll: Poll,
    events: Events,
    dns: dns::Dns,
    entries: Slots<Entry>,
    resolved: Vec<String>,
    /// Entry deadlines, earliest first. An entry's deadline moving later leaves its heap item
    /// in place (it is re-queued when it comes up); one moving earlier adds an item, and items
    /// that no longer match their entry's `armed` are skipped.
    deadlines: BinaryHeap<Reverse<(Instant, Key)>>,
    out: VecDeque<Event>,
    /// Entries with output queued during the current update.
    to_flush: Vec<Key>,
    /// When the last poll returned (the clock for writes made between polls).
    now: Instant,
    /// The one buffer sockets are read into (they are serviced one at a time).
    read_buf: Box<[u8]>,
    /// What every entry moved, open and closed ones.
    pub traffic: Traffic,
}

/// Totals since the driver started, over every entry (for `luna.stats()`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Traffic {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    /// Streams a TLS listener accepted whose handshake failed.
    pub tls_failures: u64,
}

impl Traffic {
    /// Adds what an entry moved between two readings of [`Io::moved`].
    fn add(&mut self, before: [u64; 4], after: [u64; 4]) {
        self.bytes_in += after[0] - before[0];
        self.bytes_out += after[1] - before[1];
        self.datagrams_in += after[2] - before[2];
        self.datagrams_out += after[3] - before[3];
    }
}

impl Io {
    /// Bytes in, bytes out, datagrams in, datagrams out, so far.
    fn moved(&self) -> [u64; 4] {
        match self {
            Io::Stream(s) => [s.bytes_in, s.bytes_out, 0, 0],
            Io::Datagram(d) => [d.received.bytes, d.sent.bytes, d.received.datagrams, d.sent.datagrams],
            Io::Listener(_) => [0; 4],
        }
    }
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
            deadlines: BinaryHeap::new(),
            out: VecDeque::new(),
            to_flush: Vec::new(),
            now: Instant::now(),
            read_buf: vec![0; 64 * 1024].into_boxed_slice(),
            traffic: Traffic::default(),
        })
    }

    /// Waits up to `timeout` (`Some(ZERO)` never blocks) and appends what became ready.
    pub fn poll(&mut self, timeout: Option<Duration>, ready: &mut Vec<Ready>) -> Result<()> {
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                self.now = Instant::now();
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let now = Instant::now();
        self.now = now;
        for event in self.events.iter() {
            if event.token() == WAKER {
                self.dns.collect(now, &mut self.resolved);
                ready.extend(self.resolved.drain(..).map(Ready::Resolved));
                continue;
            }
            let key = Key::from_token(event.token());
            if let Some(entry) = self.entries.get_mut(key) {
                if let Io::Stream(stream) = &mut entry.io {
                    stream.hangup |= event.is_read_closed() || event.is_error();
                }
                ready.push(Ready::Entry(key));
            }
        }
        while let Some(&Reverse((at, key))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let Some(entry) = self.entries.get_mut(key) else { continue };
            if entry.armed != Some(at) {
                continue;
            }
            entry.armed = None;
            match entry.deadline {
                Some(d) if d <= now => ready.push(Ready::Entry(key)),
                Some(d) => {
                    entry.armed = Some(d);
                    self.deadlines.push(Reverse((d, key)));
                }
                None => {}
            }
        }
        Ok(())
    }

    /// The earliest entry deadline (the host sleeps at most until then).
    pub fn next_deadline(&mut self) -> Option<Instant> {
        loop {
            let &Reverse((at, key)) = self.deadlines.peek()?;
            if self.entries.get(key).is_some_and(|e| e.armed == Some(at)) {
                return Some(at);
            }
            self.deadlines.pop();
        }
    }

    /// Whether events wait for [`Driver::pop_event`].
    pub fn has_events(&self) -> bool {
        !self.out.is_empty()
    }

    /// The next event for the layer above.
    pub fn pop_event(&mut self) -> Option<Event> {
        self.out.pop_front()
    }

    /// Puts an event back at the front (its handler stopped part-way: budget spent).
    pub fn unpop_event(&mut self, event: Event) {
        self.out.push_front(event);
    }

    /// How many events wait for [`Driver::pop_event`].
    pub fn events_waiting(&self) -> usize {
        self.out.len()
    }

    /// Services a ready or due entry: I/O, protocol timers, output; events go to
    /// [`Driver::pop_event`].
    pub fn service(&mut self, key: Key, now: Instant) {
        let registry = self.poll.registry();
        let Some(entry) = self.entries.get_mut(key) else { return };
        let tag = entry.tag;
        let mut accepted = Vec::new();
        let before = entry.io.moved();
        match &mut entry.io {
            Io::Stream(stream) => {
                let outcome = stream.service(registry, key.token(), now, &mut self.read_buf);
                if outcome.ready && !entry.announced {
                    entry.announced = true;
                    let listener = entry.listener.expect("unannounced streams come from a listener");
                    self.out.push_back(Event { key, tag, kind: EventKind::Accepted { listener } });
                }
                push_outcome(&mut self.out, key, tag, outcome.news, outcome.drained);
            }
            Io::Datagram(datagram) => {
                let news = datagram.service(registry, key.token(), now, &mut self.read_buf);
                push_outcome(&mut self.out, key, tag, news, false);
            }
            Io::Listener(listener) => {
                let mut budget = listener.begin(now);
                while let listener::Accepted::Stream(socket, peer) = listener.accept_one(now, &mut budget) {
                    let proto = (listener.config.make)(now);
                    match Stream::accepted(socket, peer, proto, listener.config.tls.as_ref(), now) {
                        Ok(stream) => accepted.push(stream),
                        Err(_) => {
                            listener.stats.tls_failures += 1;
                            self.traffic.tls_failures += 1;
                            listener.children -= 1;
                        }
                    }
                }
            }
        }
        self.traffic.add(before, entry.io.moved());
        if entry.wake.is_some_and(|at| at <= now) {
            entry.wake = None;
            self.out.push_back(Event { key, tag, kind: EventKind::Wake });
        }
        self.after_io(key, now);
        for stream in accepted {
            let mut entry = Entry::new(Io::Stream(Box::new(stream)), tag);
            entry.listener = Some(key);
            entry.adopted = false;
            entry.announced = false;
            let child = self.entries.insert(entry);
            let Some(Entry { io: Io::Stream(stream), .. }) = self.entries.get_mut(child) else {
                unreachable!()
            };
            if stream.register(self.poll.registry(), child.token()).is_err() {
                self.close(child);
                continue;
            }
            self.service(child, now);
        }
    }

    /// After I/O on an entry: forgets an unadopted stream whose socket closed, re-arms the
    /// deadline.
    fn after_io(&mut self, key: Key, now: Instant) {
        let Some(entry) = self.entries.get_mut(key) else { return };
        let io_deadline = match &entry.io {
            Io::Stream(stream) => {
                if stream.is_closed() && !entry.adopted {
                    if !entry.announced {
                        self.count_tls_failure(key);
                    }
                    self.close(key);
                    return;
                }
                stream.deadline(now)
            }
            Io::Datagram(datagram) => datagram.deadline(now),
            Io::Listener(listener) => listener.deadline(now),
        };
        let at = match (io_deadline, entry.wake) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if at == entry.deadline {
            return;
        }
        entry.deadline = at;
        if let Some(at) = at {
            if entry.armed.is_none_or(|armed| at < armed) {
                entry.armed = Some(at);
                self.deadlines.push(Reverse((at, key)));
                if self.deadlines.len() > 64 + 4 * self.entries.len() {
                    self.compact_deadlines();
                }
            }
        }
    }

    fn count_tls_failure(&mut self, key: Key) {
        let listener = self.entries.get(key).and_then(|e| e.listener);
        if let Some(Entry { io: Io::Listener(l), .. }) = listener.and_then(|k| self.entries.get_mut(k)) {
            l.stats.tls_failures += 1;
            self.traffic.tls_failures += 1;
        }
    }

    /// Drops heap items that no longer match their entry.
    fn compact_deadlines(&mut self) {
        let entries = &self.entries;
        self.deadlines.retain(|Reverse((at, key))| entries.get(*key).is_some_and(|e| e.armed == Some(*at)));
    }

    /// Writes what an entry queued now (outside an update).
    pub fn flush(&mut self, key: Key) {
        let now = self.now;
        let registry = self.poll.registry();
        let Some(entry) = self.entries.get_mut(key) else { return };
        entry.flush_due = false;
        let tag = entry.tag;
        let before = entry.io.moved();
        match &mut entry.io {
            Io::Stream(stream) => {
                let outcome = stream.flush(registry, key.token(), now);
                push_outcome(&mut self.out, key, tag, outcome.news, outcome.drained);
            }
            Io::Datagram(datagram) => {
                let news = datagram.flush(registry, key.token(), now);
                push_outcome(&mut self.out, key, tag, news, false);
            }
            Io::Listener(_) => {}
        }
        self.traffic.add(before, entry.io.moved());
        self.after_io(key, now);
    }

    /// Notes that an entry has output, during an update: it is written by
    /// [`Driver::flush_queued`] at its end, so replies to many peers leave back to back (and
    /// many messages to one peer in one write). A stream with `WRITE_NOW` bytes waiting is
    /// written at once, so a burst never meets the backpressure bound only because it was
    /// held back.
    pub fn queue_flush(&mut self, key: Key) {
        let Some(entry) = self.entries.get_mut(key) else { return };
        if let Io::Stream(stream) = &entry.io {
            if stream.queued() >= WRITE_NOW {
                return self.flush(key);
            }
        }
        if !entry.flush_due {
            entry.flush_due = true;
            self.to_flush.push(key);
        }
    }

    /// Writes every entry [`Driver::queue_flush`] noted.
    pub fn flush_queued(&mut self) {
        for key in std::mem::take(&mut self.to_flush) {
            if self.entries.get(key).is_some_and(|e| e.flush_due) {
                self.flush(key);
            }
        }
    }

    /// Arms (or with `None` clears) the time at which the entry reports [`EventKind::Wake`].
    pub fn set_wake(&mut self, key: Key, at: Option<Instant>) {
        let Some(entry) = self.entries.get_mut(key) else { return };
        if entry.wake == at {
            return;
        }
        entry.wake = at;
        let now = self.now;
        self.after_io(key, now);
    }

    /// The wake time of an entry.
    pub fn wake(&self, key: Key) -> Option<Instant> {
        self.entries.get(key).and_then(|e| e.wake)
    }

    /// Starts a client stream to `target` running `proto`.
    pub fn connect(
        &mut self,
        target: &Target,
        proto: Box<dyn StreamProtocol>,
        options: ConnectOptions,
        tag: Tag,
    ) -> std::result::Result<Key, String> {
        let (socket, peer) = match target {
            Target::Tcp(addr) => (net::tcp_connect(*addr), Address::canonical(*addr)),
            Target::Unix(path) => (net::unix_connect(path), Address::Unix(Some(path.clone()))),
        };
        let socket = socket.map_err(|e| format!("cannot connect to {peer}: {e}"))?;
        let stream = Stream::connecting(socket, peer, proto, options, self.now)?;
        let key = self.entries.insert(Entry::new(Io::Stream(Box::new(stream)), tag));
        let Some(Entry { io: Io::Stream(stream), .. }) = self.entries.get_mut(key) else { unreachable!() };
        if let Err(e) = stream.register(self.poll.registry(), key.token()) {
            self.entries.remove(key);
            return Err(format!("cannot register the socket: {e}"));
        }
        let now = self.now;
        self.after_io(key, now);
        Ok(key)
    }

    /// Listens on `socket`; accepted streams get protocols from `config.make`.
    pub fn listen(&mut self, socket: net::ListenSocket, config: ListenerConfig, tag: Tag) -> Result<Key> {
        let listener = Listener::new(socket, config)?;
        let key = self.entries.insert(Entry::new(Io::Listener(Box::new(listener)), tag));
        let Some(Entry { io: Io::Listener(listener), .. }) = self.entries.get_mut(key) else {
            unreachable!()
        };
        if let Err(e) = self.poll.registry().register(&mut listener.socket, key.token(), Interest::READABLE) {
            self.entries.remove(key);
            return Err(e.into());
        }
        Ok(key)
    }

    /// Registers a UDP socket running `proto`, reading at most `budget` datagrams per service.
    pub fn open_datagram(
        &mut self,
        socket: UdpSocket,
        proto: Option<Box<dyn DatagramProtocol>>,
        budget: usize,
        tag: Tag,
    ) -> Result<Key> {
        let datagram = Datagram::new(socket, proto, budget)?;
        let key = self.entries.insert(Entry::new(Io::Datagram(Box::new(datagram)), tag));
        let Some(Entry { io: Io::Datagram(d), .. }) = self.entries.get_mut(key) else { unreachable!() };
        if let Err(e) = self.poll.registry().register(&mut d.socket, key.token(), Interest::READABLE) {
            self.entries.remove(key);
            return Err(e.into());
        }
        self.flush(key);
        Ok(key)
    }

    pub fn stream(&mut self, key: Key) -> Option<&mut Stream> {
        match &mut self.entries.get_mut(key)?.io {
            Io::Stream(stream) => Some(stream),
            _ => None,
        }
    }

    pub fn datagram(&mut self, key: Key) -> Option<&mut Datagram> {
        match &mut self.entries.get_mut(key)?.io {
            Io::Datagram(datagram) => Some(datagram),
            _ => None,
        }
    }

    pub fn listener(&mut self, key: Key) -> Option<&mut Listener> {
        match &mut self.entries.get_mut(key)?.io {
            Io::Listener(listener) => Some(listener),
            _ => None,
        }
    }

    /// A stream's protocol as the type the layer above put there.
    pub fn proto<T: StreamProtocol>(&mut self, key: Key) -> Option<&mut T> {
        let proto: &mut dyn Any = self.stream(key)?.proto();
        proto.downcast_mut()
    }

    /// A datagram entry's protocol as the type the layer above put there.
    pub fn datagram_proto<T: DatagramProtocol>(&mut self, key: Key) -> Option<&mut T> {
        let proto: &mut dyn Any = self.datagram(key)?.proto()?;
        proto.downcast_mut()
    }

    /// The layer above takes charge of an accepted stream (it closes it, not the driver).
    pub fn adopt(&mut self, key: Key) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.adopted = true;
        }
    }

    /// The listener an accepted stream came from.
    pub fn listener_of(&self, key: Key) -> Option<Key> {
        self.entries.get(key)?.listener
    }

    /// Runs a stream on another protocol from now on, its events reported with `tag` (see
    /// `Stream::replace_proto`), and writes what that protocol has to say. The layer above
    /// gives it up (see [`Driver::release`]) until it adopts it again.
    pub fn replace_proto(
        &mut self,
        key: Key,
        proto: Box<dyn StreamProtocol>,
        tag: Tag,
        received: &[u8],
        eof: bool,
    ) {
        let now = self.now;
        let Some(entry) = self.entries.get_mut(key) else { return };
        let Io::Stream(stream) = &mut entry.io else { return };
        entry.tag = tag;
        entry.adopted = false;
        stream.replace_proto(proto, received, eof, now);
        self.flush(key);
    }

    /// Upgrades a ready plain stream to TLS (see `Stream::start_tls`).
    pub fn start_tls(&mut self, key: Key, tls: Tls, leftover: &[u8]) -> std::result::Result<(), String> {
        let now = self.now;
        self.stream(key).ok_or("the stream is closed")?.start_tls(tls, leftover, now)?;
        self.flush(key);
        Ok(())
    }

    /// True if the stream stopped reading for a protocol that now wants input again: service
    /// it (reading may have nothing new to report until then, edge-triggered).
    pub fn should_resume_reading(&mut self, key: Key) -> bool {
        self.stream(key).is_some_and(|s| s.should_resume_reading())
    }

    /// Resolves `host` without blocking (IP literals answer at once).
    pub fn lookup(&mut self, host: &str, now: Instant) -> Lookup {
        self.dns.lookup(host, now)
    }

    /// Closes an entry at once (no goodbye to the peer); returns false for a stale key.
    pub fn close(&mut self, key: Key) -> bool {
        let registry = self.poll.registry();
        let Some(entry) = self.entries.remove(key) else { return false };
        match entry.io {
            Io::Stream(mut stream) => stream.deregister(registry),
            Io::Datagram(mut datagram) => {
                let _ = registry.deregister(&mut datagram.socket);
            }
            Io::Listener(mut listener) => {
                let _ = registry.deregister(&mut listener.socket);
            }
        }
        if let Some(Entry { io: Io::Listener(l), .. }) = entry.listener.and_then(|k| self.entries.get_mut(k))
        {
            l.children -= 1;
        }
        true
    }

    /// Bytes written by the layer above and not yet taken by the kernel (streams' queues and
    /// datagrams the socket refused). O(entries): for reports.
    pub fn queued_bytes(&self) -> u64 {
        let queued = |e: &Entry| match &e.io {
            Io::Stream(s) => s.queued(),
            Io::Datagram(d) => d.unsent_len(),
            Io::Listener(_) => 0,
        };
        self.entries.values().map(|e| queued(e) as u64).sum()
    }

    /// Open entries plus lookups still running.
    pub fn pending(&self) -> usize {
        self.entries.len() + self.dns.in_flight()
    }

    /// When the last poll returned.
    pub fn now(&self) -> Instant {
        self.now
    }
}

fn push_outcome(out: &mut VecDeque<Event>, key: Key, tag: Tag, news: bool, drained: bool) {
    if news {
        out.push_back(Event { key, tag, kind: EventKind::News });
    }
    if drained {
        out.push_back(Event { key, tag, kind: EventKind::Drained });
    }
}

#[cfg(test)]
mod tests;
