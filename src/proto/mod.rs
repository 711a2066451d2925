//! Protocol state machines: no sockets, no clock, no Lua, no randomness source.

pub mod rpc;
pub mod ws;
