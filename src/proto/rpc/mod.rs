//! Secure reliable-UDP RPC sessions (sans-IO).
//!
//! This module is the protocol half of Luna's RPC apps: a stateless-cookie handshake with an
//! ephemeral X25519 key exchange signed by the server's long-term Ed25519 key, ChaCha20-Poly1305
//! on every packet (nonce = packet number, one key per direction, sliding replay window), and a
//! reliable, ordered, exactly-once message stream with selective acks, RTT-timed retransmission,
//! aggregation, fragmentation, keep-alives and an authenticated close. The wire format is written
//! down in `docs/protocol.md`.
//!
//! Nothing here touches a socket, reads a clock or draws randomness on its own: the caller passes
//! `now: Instant` in (and a `SecureRandom` when creating a server or client), and takes
//! datagrams, deadlines and events out (quinn-proto's convention: `handle_*` for input, `poll_*`
//! for output). Both sides implement [`DatagramProtocol`](crate::proto::stream::DatagramProtocol),
//! which is how the driver runs them.
//!
//! # Driving a [`Server`] (one per listening UDP socket)
//!
//! ```text
//! on readable:   for each datagram: server.handle_datagram(now, from, &bytes)
//! on timer:      server.handle_timeout(now)
//! then always:   while let Some(ev) = server.poll_event() { … }           // Connected / Message / Disconnected
//!                while let Some(to) = server.poll_transmit(now, &mut buf) { socket.send_to(&buf, to) }
//!                arm the timer at server.poll_timeout()                  // O(1): a heap peek
//! ```
//! [`Server::send`] queues a reliable ordered message, [`Server::close`] tells the peer (the
//! close packet is produced by the next `poll_transmit`, so keep polling before dropping the
//! socket). Every `Connected` is followed by exactly one `Disconnected` (also after a local
//! close, which reports [`DisconnectReason::Local`] at once).
//!
//! A [`Client`] has the same shape for one session; it emits `Connected` when the handshake is
//! done and may queue messages before that.
//!
//! The messages carried by a session are RPC envelopes ([`envelope`]): requests, responses and
//! pushes. [`fuzzing`] holds the entry functions shared by the fuzz targets and the seed replay
//! test.

mod client;
mod crypto;
pub mod envelope;
pub mod fuzzing;
mod server;
mod session;
mod wire;

#[cfg(test)]
mod tests;

use std::fmt;
use std::time::Duration;

pub use client::{Client, ClientEvent};
pub use envelope::Envelope;
pub use server::{Server, ServerEvent};

/// Largest datagram the protocol ever sends (UDP payload bytes).
pub const MAX_DATAGRAM: usize = 1200;
/// Size of a client hello; hellos are zero-padded to exactly this size so every server reply
/// before the address is proven is smaller than the request that caused it.
pub const HELLO_SIZE: usize = 1200;
/// Wire protocol version carried in the first byte of every datagram.
pub const VERSION: u8 = 1;
/// Size of one fragment of a message larger than this (the last fragment may be shorter).
pub const FRAGMENT_SIZE: usize = 1024;
/// Longest close reason sent on the wire (longer reasons are cut at a char boundary).
pub const MAX_REASON: usize = 128;

/// Session and handshake parameters. `Default` gives the documented defaults.
#[derive(Clone, Debug)]
pub struct Config {
    /// Encrypt and authenticate every packet (default `true`). Both sides must agree; the server
    /// rejects hellos asking for the other mode.
    pub encryption: bool,
    /// Largest message accepted by `send` and delivered on receipt (default 1 MiB). Larger
    /// incoming messages are discarded (counted in `Stats::oversized_messages`), the session
    /// goes on.
    pub max_message_size: usize,
    /// Consecutive retransmission timeouts without any acknowledgement before the session is
    /// declared dead with reason `timeout` (default 10).
    pub max_retries: u32,
    /// Upper bound of the retransmission timeout after exponential backoff (default 2 s): an
    /// unacknowledged packet is retransmitted at least this often.
    pub message_timeout: Duration,
    /// Send a ping when nothing ack-eliciting was sent for this long (default 1 s).
    pub keepalive_interval: Duration,
    /// Declare the peer dead when nothing authenticated arrived for this long (default 10 s).
    pub dead_peer_timeout: Duration,
    /// Give up a handshake (client) / forget an unconfirmed session (server) after this long
    /// (default 5 s).
    pub connect_timeout: Duration,
    /// Longest an acknowledgement is delayed waiting for data to piggyback on (default 5 ms).
    pub max_ack_delay: Duration,
    /// Lower bound of the retransmission timeout (default 20 ms: loopback friendly).
    pub min_rto: Duration,
    /// Retransmission timeout before the first RTT sample, also for hellos (default 250 ms).
    pub initial_rto: Duration,
    /// Most ack-eliciting packets in flight per session (default 512).
    pub max_inflight_packets: usize,
    /// Most bytes of unacknowledged outgoing messages per session; `send` fails beyond
    /// (default 16 MiB).
    pub max_send_buffer: usize,
    /// Most bytes buffered for out-of-order messages and partial reassembly per session
    /// (default 4 MiB; the next in-order message may additionally use up to `max_message_size`).
    pub max_recv_buffer: usize,
    /// Server: most sessions (default 65 536).
    pub max_sessions: usize,
    /// Server: most sessions whose client has not confirmed the keys yet (default 4 096).
    pub max_pending: usize,
    /// Server: most sessions per source IP address, 0 = unlimited (default 0; the Lua layer
    /// enforces `max_ip_connected` itself, see [`Server::set_max_per_ip`]).
    pub max_per_ip: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            encryption: true,
            max_message_size: 1 << 20,
            max_retries: 10,
            message_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(1),
            dead_peer_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_ack_delay: Duration::from_millis(5),
            min_rto: Duration::from_millis(20),
            initial_rto: Duration::from_millis(250),
            max_inflight_packets: 512,
            max_send_buffer: 16 << 20,
            max_recv_buffer: 4 << 20,
            max_sessions: 65_536,
            max_pending: 4_096,
            max_per_ip: 0,
        }
    }
}

/// Errors returned by the RPC protocol layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The connection id does not name a live, connected session (closed, never connected, or
    /// a stale id from an earlier session in the same slot).
    UnknownConnection,
    /// The client's session is closed or the handshake failed; nothing more can be sent.
    NotConnected,
    /// The message is larger than `max_message_size`.
    MessageTooLarge,
    /// Queuing the message would exceed `max_send_buffer` unacknowledged bytes.
    SendBufferFull,
    /// The system random number generator failed.
    Rng,
    /// An envelope or frame could not be decoded (truncated, bad tag, bad varint, bad UTF-8).
    Malformed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::UnknownConnection => "unknown connection",
            Error::NotConnected => "not connected",
            Error::MessageTooLarge => "message too large",
            Error::SendBufferFull => "send buffer full",
            Error::Rng => "random number generator failed",
            Error::Malformed => "malformed data",
        })
    }
}

impl std::error::Error for Error {}

/// Why a session ended. `Display` gives the text the Lua layer shows (`"timeout"`, the peer's
/// reason, …).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The peer closed the session with this (authenticated) reason.
    Closed(String),
    /// This side called `close` with this reason.
    Local(String),
    /// The peer stopped answering: nothing for `dead_peer_timeout`, or `max_retries`
    /// retransmission timeouts in a row.
    Timeout,
    /// Client: the server did not complete the handshake within `connect_timeout`.
    HandshakeTimeout,
    /// Client: the server presented a long-term key other than the pinned one.
    ServerKeyMismatch,
    /// Client: the server refused the session (`"encryption mismatch"`, `"server full"`, …).
    Rejected(String),
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::Closed(r) | DisconnectReason::Local(r) => f.write_str(r),
            DisconnectReason::Timeout => f.write_str("timeout"),
            DisconnectReason::HandshakeTimeout => f.write_str("handshake timeout"),
            DisconnectReason::ServerKeyMismatch => f.write_str("server key mismatch"),
            DisconnectReason::Rejected(r) => write!(f, "rejected: {r}"),
        }
    }
}

/// Small generational connection id (slot index + generation); a stale id never names a newer
/// session that reused the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    index: u32,
    generation: u32,
}

impl ConnId {
    /// Packs the id into one integer (for handles stored on the Lua side).
    pub fn to_u64(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }
    /// Inverse of [`ConnId::to_u64`].
    pub fn from_u64(v: u64) -> Self {
        ConnId { index: v as u32, generation: (v >> 32) as u32 }
    }
}

/// Counters of what happened to incoming and outgoing datagrams. Every dropped datagram is
/// counted in exactly one of the drop counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams handed to `handle_datagram`.
    pub datagrams_in: u64,
    /// Datagrams returned by `poll_transmit`.
    pub datagrams_out: u64,
    /// Dropped: truncated, bad length, unknown packet type, malformed frames.
    pub malformed: u64,
    /// Dropped: unknown protocol version.
    pub bad_version: u64,
    /// Dropped: a session packet from an address with no session (or from the wrong address).
    pub unknown_peer: u64,
    /// Dropped: AEAD authentication failed (forged, tampered or wrong key).
    pub auth_failed: u64,
    /// Dropped: packet number already received or older than the replay window.
    pub replayed: u64,
    /// Hellos whose cookie was missing was answered with a retry (no state created).
    pub retries_sent: u64,
    /// Hellos with a forged or expired cookie (answered with a fresh retry).
    pub bad_cookie: u64,
    /// Dropped: handshake packets refused by limits (sessions, pending, per-IP) or state.
    pub handshake_dropped: u64,
    /// Dropped: server hello / reject with an invalid signature (client).
    pub bad_signature: u64,
    /// Dropped: the packet's data did not fit the receive buffers (not acked; the peer resends).
    pub buffer_full: u64,
    /// Incoming messages discarded for exceeding `max_message_size`.
    pub oversized_messages: u64,
    /// Message chunks sent again after a loss was detected.
    pub retransmits: u64,
    /// Stateless replies dropped because the reply queue was full.
    pub reply_queue_full: u64,
    /// Sessions fully established (server: client confirmed the keys; client: server hello ok).
    pub handshakes_completed: u64,
}

impl Stats {
    /// The packet type of a datagram of our version; a short or foreign one is counted and `None`.
    pub(crate) fn packet_kind(&mut self, data: &[u8]) -> Option<u8> {
        let (Some(&version), Some(&kind)) = (data.first(), data.get(1)) else {
            self.malformed += 1;
            return None;
        };
        if version != VERSION {
            self.bad_version += 1;
            return None;
        }
        Some(kind)
    }
}
