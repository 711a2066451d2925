//! WebSocket and TLS glue over in-memory pipes (sans-IO).
//!
//! - [`pipe`]: the in-memory duplex byte pipe tungstenite runs over.
//! - [`upgrade`]: the HTTP/1.1 upgrade, server ([`ServerHandshake`]) and client
//!   ([`ClientHandshake`], [`WsUrl`]).
//! - [`conn`]: a WebSocket connection after the upgrade ([`WsConn`]).
//! - [`session`]: the upgrade, the connection, the inbox and the clocks of one session, as a
//!   stream protocol ([`WsSession`]).
//! - [`fuzzing`]: entry points shared by the fuzz targets and the seed-replay test.
//!
//! Nothing here touches sockets, clocks or randomness: the driver passes bytes (and the
//! client's random key) in and writes out what comes back.

pub mod conn;
pub mod deflate;
mod error;
pub mod fuzzing;
pub mod pipe;
pub mod session;
pub mod upgrade;

pub use conn::{encode_frame, Opcode, Role, WsConfig, WsConn, WsEvent};
pub use deflate::{Agreed, ContextTicket, Contexts, DeflateConfig};
pub use error::Error;
pub use pipe::Pipe;
pub use session::{Received, Settings, UpgradeInfo, WsSession};
pub use upgrade::{
    AcceptedUpgrade, ClientHandshake, ClientUpgrade, Rejection, ServerHandshake, ServerUpgrade,
    UpgradeLimits, WsUrl,
};

#[cfg(test)]
mod tests;
