//! The contract between the driver, which owns sockets, and a protocol, which owns bytes.
//!
//! A protocol object is sans-IO: the driver hands it plaintext that arrived (TLS is the
//! driver's business, below every protocol), asks it for bytes to send, and arms one deadline
//! per entry from [`StreamProtocol::poll_timeout`]. Whatever a protocol has for the layer above
//! (messages, requests, state changes) stays inside it: it raises a flag that
//! [`StreamProtocol::take_news`] reads, the driver reports the entry, and the layer above
//! downcasts the protocol (`&mut dyn Any`) to read what it holds.
//!
//! A new protocol is one type implementing [`StreamProtocol`] (TCP, TLS, Unix) or
//! [`DatagramProtocol`] (UDP); the driver needs no change.

use std::any::Any;
use std::net::SocketAddr;
use std::time::Instant;

/// What a stream protocol wants done with its transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep the connection: read while [`StreamProtocol::wants_input`], write what
    /// [`StreamProtocol::outgoing`] holds.
    Open,
    /// Nothing more is read; close once the queued bytes are out (TLS `close_notify`, FIN).
    Finish,
    /// Close at once, dropping what is queued.
    Abort,
}

/// A protocol running over a byte stream (TCP or Unix socket, optionally TLS).
pub trait StreamProtocol: Any {
    /// The transport is ready for data: connected and, with TLS, past the handshake. Called
    /// again after a later TLS upgrade (`starttls`) completes.
    fn handle_ready(&mut self, _now: Instant) {}

    /// Plaintext bytes from the peer.
    fn handle_bytes(&mut self, now: Instant, data: &[u8]);

    /// The peer finished sending (end of stream); more may still be written unless the
    /// protocol finishes too.
    fn handle_eof(&mut self, now: Instant);

    /// The transport failed (connect refused or timed out, reset, TLS failure): nothing more
    /// will be read or written.
    fn handle_error(&mut self, now: Instant, error: &str);

    /// The driver closed the transport after the protocol asked it to ([`Flow::Finish`] once
    /// everything was written, or [`Flow::Abort`]).
    fn handle_closed(&mut self, _now: Instant) {}

    /// The deadline from [`poll_timeout`](Self::poll_timeout) passed.
    fn handle_timeout(&mut self, _now: Instant) {}

    /// When the protocol next needs [`handle_timeout`](Self::handle_timeout).
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    /// Whether the driver should read more now (false: the protocol's buffers are full and
    /// TCP flow control pushes back on the peer).
    fn wants_input(&self) -> bool;

    /// Bytes waiting to be written.
    fn outgoing(&self) -> &[u8];

    /// The first `n` bytes of [`outgoing`](Self::outgoing) were written, at `now`.
    fn consume_outgoing(&mut self, now: Instant, n: usize);

    /// What to do with the transport.
    fn flow(&self) -> Flow;

    /// True once after something happened that the layer above should look at.
    fn take_news(&mut self) -> bool;
}

/// A protocol running over a UDP socket.
pub trait DatagramProtocol: Any {
    /// A datagram arrived from `from`.
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]);

    /// The deadline from [`poll_timeout`](Self::poll_timeout) passed.
    fn handle_timeout(&mut self, _now: Instant) {}

    /// When the protocol next needs [`handle_timeout`](Self::handle_timeout).
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    /// The next datagram to send, written into `buf` (cleared by the caller), and its
    /// destination; `None` when nothing is waiting.
    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<SocketAddr>;

    /// Whether the driver should read more now.
    fn wants_input(&self) -> bool {
        true
    }

    /// True once after something happened that the layer above should look at.
    fn take_news(&mut self) -> bool;
}
