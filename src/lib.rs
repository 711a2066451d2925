//! Luna: networking for Lua games and embedded Lua hosts.
//!
//! Layers (dependencies point one way): [`bind`] (mlua) → [`driver`] (mio) → [`proto`] (sans-IO).

pub mod driver;
pub mod proto;

#[cfg(feature = "lua")]
pub mod bind;
