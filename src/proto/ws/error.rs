//! The one error type of the WebSocket layer.

use std::fmt;

/// Everything that can go wrong in `proto::ws`. Messages are meant to be shown to users as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The string is not a usable `ws://` / `wss://` URL.
    InvalidUrl(String),
    /// The client-side upgrade failed: the server refused it (non-101 status) or its response
    /// is malformed or does not match our request (accept key, protocol, extensions).
    Handshake(String),
    /// The outgoing queue already holds `queued` bytes and adding this message would pass
    /// `limit`; nothing was queued. Retry after the driver has flushed the socket.
    Backpressure {
        /// Bytes currently waiting to be written to the transport.
        queued: usize,
        /// The configured bound (`WsConfig::max_outgoing_buffer`).
        limit: usize,
    },
    /// The connection is closing or closed: no more messages can be sent.
    Closed,
    /// A text message to send is not valid UTF-8 (send it as binary instead).
    InvalidUtf8,
    /// This opcode cannot be used here (only TEXT = 1 and BINARY = 2 are message opcodes).
    InvalidOpcode(u8),
    /// A close code that may not be sent on the wire (valid: 1000–1003, 1007–1014,
    /// 3000–4999).
    InvalidCloseCode(u16),
    /// A control frame payload is too long (ping payloads are limited to 125 bytes).
    ControlFrameTooLong(usize),
    /// The operation is not valid for this role (e.g. pre-encoded unmasked frames on a client
    /// connection, whose frames must be masked).
    WrongRole(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidUrl(m) => write!(f, "invalid WebSocket URL: {m}"),
            Error::Handshake(m) => write!(f, "WebSocket handshake failed: {m}"),
            Error::Backpressure { queued, limit } => {
                write!(f, "send buffer full ({queued} bytes queued, limit {limit}); try again later")
            }
            Error::Closed => write!(f, "the WebSocket connection is closed"),
            Error::InvalidUtf8 => write!(f, "text message is not valid UTF-8 (send it as binary)"),
            Error::InvalidOpcode(op) => {
                write!(f, "invalid opcode {op} (use TEXT = 1 or BINARY = 2)")
            }
            Error::InvalidCloseCode(c) => {
                write!(f, "close code {c} cannot be sent (use 1000-1003, 1007-1014 or 3000-4999)")
            }
            Error::ControlFrameTooLong(n) => {
                write!(f, "control frame payload of {n} bytes exceeds 125 bytes")
            }
            Error::WrongRole(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for Error {}
