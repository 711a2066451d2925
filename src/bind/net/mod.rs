//! Sockets Lua scripts drive themselves: `luna.tcp`, `luna.unix` (streams and servers, with
//! TLS) and `luna.udp`. This module keeps their records and turns driver events into calls;
//! [`stream`] holds the stream primitives, [`server`] the listeners, [`udp`] the UDP sockets.
//! The objects and the calls that wait are the Lua half in `lua/net.lua`.

mod server;
mod stream;
mod udp;

use mlua::{Function, Lua, RegistryKey, Result, Table, Value};
use rustc_hash::{FxHashMap, FxHashSet};

use super::sched;
use super::Runtime;
use crate::driver::{Event, EventKind, Key, Tag};

/// The tag of every entry this module opens.
pub(crate) const TAG: Tag = 3;

#[derive(Default)]
pub(crate) struct NetState {
    /// Boxed: the table holds pointers, so its spare capacity costs little per connection.
    streams: FxHashMap<u64, Box<stream::Record>>,
    stream_keys: FxHashMap<Key, u64>,
    servers: FxHashMap<u64, server::Record>,
    server_keys: FxHashMap<Key, u64>,
    udps: FxHashMap<u64, udp::Record>,
    udp_keys: FxHashMap<Key, u64>,
    /// Handles are never reused (unlike driver keys' slots).
    next: u64,
    /// Streams whose peer finished: they finish at the end of the update, after the handlers
    /// that heard of it had their say.
    finishing: Vec<u64>,
    /// Streams that ended during the update: released at its end (once their input was read).
    ended: Vec<u64>,
    /// The buffer that carries read data to a parked coroutine, reused from one read to the next.
    read_buf: Vec<u8>,
}

impl NetState {
    fn handle(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

/// Wakes the coroutines in `waiters` (they look again at what they wait for).
fn wake_all(rt: &Runtime, waiters: &mut Vec<RegistryKey>) {
    if !waiters.is_empty() {
        rt.sched.borrow_mut().jobs.extend(waiters.drain(..).map(sched::Job::Key));
    }
}

/// Calls `callback(object, args...)`; an error goes to the error policy.
fn call_back(lua: &Lua, rt: &Runtime, callback: &Function, args: impl mlua::IntoLuaMulti) -> Result<Value> {
    match callback.call::<Value>(args) {
        Ok(v) => Ok(v),
        Err(e) => sched::report(lua, rt, &e).map(|()| Value::Nil),
    }
}

/// The function in field `name` of `object`, if any.
fn callback(object: &Table, name: &str) -> Result<Option<Function>> {
    match object.raw_get::<Value>(name)? {
        Value::Function(f) => Ok(Some(f)),
        _ => Ok(None),
    }
}

/// A driver event for an entry of this module.
pub(crate) fn event(lua: &Lua, rt: &Runtime, ev: Event) -> Result<()> {
    let (stream, udp) = {
        let net = rt.net.borrow();
        (net.stream_keys.get(&ev.key).copied(), net.udp_keys.get(&ev.key).copied())
    };
    match (ev.kind, stream, udp) {
        (EventKind::Accepted { listener }, _, _) => server::accepted(lua, rt, ev.key, listener),
        (EventKind::News, Some(h), _) => stream::news(lua, rt, h),
        (EventKind::Drained, Some(h), _) => stream::drained(lua, rt, h),
        (EventKind::News, _, Some(h)) => udp::news(lua, rt, h),
        _ => Ok(()),
    }
}

/// Open sockets and dropped datagrams, for `luna.stats()`.
pub(crate) fn census(rt: &Runtime, c: &mut super::stats::Census) {
    let st = rt.net.borrow();
    c.streams += st.streams.len() as u64;
    c.udp += st.udps.len() as u64;
    c.listeners += st.servers.len() as u64;
    let mut driver = rt.driver.borrow_mut();
    for key in st.udp_keys.keys() {
        if let Some(p) = driver.datagram_proto::<crate::proto::raw::RawDatagrams>(*key) {
            let d = p.dropped();
            c.oversize += d.oversize;
            c.flood += d.inbox_full;
        }
    }
}

/// The end of an update: streams whose peer finished finish too (unless half-open), streams
/// that ended are released.
pub(crate) fn end_of_update(rt: &Runtime) {
    let (finishing, ended) = {
        let mut net = rt.net.borrow_mut();
        (std::mem::take(&mut net.finishing), std::mem::take(&mut net.ended))
    };
    for h in finishing {
        stream::finish(rt, h);
    }
    for h in ended {
        stream::release_if_read(rt, h);
    }
}

/// `luna.close()`: every server and UDP socket closes, every stream finishes.
pub(crate) fn close_all(lua: &Lua, rt: &Runtime) -> Result<()> {
    let (servers, streams, udps): (Vec<u64>, Vec<u64>, Vec<u64>) = {
        let net = rt.net.borrow();
        (
            net.servers.keys().copied().collect(),
            net.streams.keys().copied().collect(),
            net.udps.keys().copied().collect(),
        )
    };
    for h in servers {
        server::close(rt, h, false);
    }
    for h in udps {
        udp::close(lua, rt, h)?;
    }
    for h in streams {
        stream::finish(rt, h);
    }
    Ok(())
}

/// Builds `luna.tcp`, `luna.unix` and `luna.udp` (once per state).
pub(crate) fn tables(lua: &Lua, rt: &std::rc::Rc<Runtime>, core: &Table, internal: &Table) -> Result<Table> {
    stream::register(lua, rt, core)?;
    server::register(lua, core)?;
    udp::register(lua, core)?;
    lua.load(include_str!("../../../lua/net.lua")).set_name("=net.lua").call((core.clone(), internal.clone()))
}

/// Sets of handles used by servers.
type Handles = FxHashSet<u64>;
