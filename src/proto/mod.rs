//! Protocol state machines: no sockets, no clock, no Lua, no randomness source.
//!
//! [`stream`] is the contract with the driver; every protocol implements it: [`raw`] (bytes for
//! Lua), [`ws`] (WebSocket sessions), [`rpc`] (reliable UDP sessions), [`http`] (HTTP/1.1 server connections). [`tls`] is the TLS pump the
//! driver runs under any stream. [`fuzzing`] drives any stream protocol through the driver's
//! contract for the fuzz targets.

pub mod fuzzing;
pub mod http;
pub mod raw;
pub mod rpc;
pub mod stream;
pub mod tls;
pub mod ws;
