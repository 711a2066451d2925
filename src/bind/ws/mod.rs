//! WebSocket apps: `luna.new_web_app` / `luna.remove_web_app` (server, handlers as coroutines;
//! `server`), `lunac.connect_to_web_app` / `lunac.disconnect_to_web_app` (client, callbacks;
//! `client`), and the primitives behind server `ws` objects (`handle`). This module keeps their
//! shared state and turns stream events into calls.

mod client;
mod handle;
mod server;

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use mlua::{Lua, MultiValue, RegistryKey, Result, Table, Value};
use rustc_hash::{FxHashMap, FxHashSet};

use super::error::bad_arg;
use super::options::Options;
use super::policy::Policy;
use super::{Runtime, Side};
use crate::driver::{Event, EventKind, Key, Tag};
use crate::proto::stream::{Flow, StreamProtocol};
use crate::proto::ws::{
    self as proto, Contexts, DeflateConfig, Opcode, Settings, WsConfig, WsSession, WsUrl,
};
use client::{client_callback, client_closed, client_inbox, disconnect, start_client, ON_CONNECT};
use server::{accepted, server_inbox};
pub(crate) use server::{attach, remove_server, upgrade, Handover};

/// The tag of every entry this module opens.
pub(crate) const TAG: Tag = 1;

struct Server {
    name: String,
    policy: Rc<Policy>,
    handlers: HashMap<String, RegistryKey>,
    /// Open connections by handler name (`broadcast` goes to one group).
    groups: HashMap<String, FxHashSet<Key>>,
    listener: Option<Key>,
    app: RegistryKey,
}

struct Conn {
    server: u64,
    /// The number Lua holds (`ws.__h`); never reused, unlike driver keys' slots.
    handle: u64,
    object: RegistryKey,
    group: String,
    /// The handler coroutine, and its `Thread::to_pointer` (what raw functions compare). A
    /// registry key, not a `Thread`: mlua handles are limited to a few thousand on LuaJIT.
    handler: RegistryKey,
    handler_ptr: usize,
    /// The handler waits in `ws:receive()` for this connection's next message.
    parked: bool,
    handler_done: bool,
    closed_seen: bool,
}

struct Client {
    name: String,
    policy: Rc<Policy>,
    object: RegistryKey,
    url: WsUrl,
    protocols: Vec<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
    settings: Arc<Settings>,
    stream: Option<Key>,
    callbacks: [Option<RegistryKey>; 3],
    /// Coroutines in `app:receive()` or `app:wait_connected()`.
    waiting: Vec<RegistryKey>,
    /// The app called `receive` or `wait_connected` and has no `on_message`: messages wait for
    /// `app:receive()` (before that, as without this API, they are dropped).
    receiving: bool,
}

#[derive(Default)]
pub(crate) struct WsState {
    servers: FxHashMap<u64, Server>,
    listeners: FxHashMap<Key, u64>,
    conns: FxHashMap<Key, Conn>,
    /// Server connections by the handle their `ws` object holds.
    handles: FxHashMap<u64, Key>,
    clients: FxHashMap<u64, Client>,
    client_streams: FxHashMap<Key, u64>,
    next_id: u64,
    /// Client failures found outside `update` (bad address…), reported by the next `update`.
    failed: Vec<(u64, String)>,
    /// Connections an HTTP server handed over, until their upgrade finished: the server record,
    /// the group and the handler they will run.
    upgrading: FxHashMap<Key, server::Upgrading>,
}

impl WsState {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// What an `opcode` argument must be.
const OPCODE_EXPECTED: &str = "opcodes.TEXT (1) or opcodes.BINARY (2)";

/// The message opcode a number names (an omitted opcode means TEXT; callers check for nil).
fn opcode_number(n: i64) -> Option<Opcode> {
    u8::try_from(n).ok().and_then(|b| Opcode::from_u8(b).ok())
}

fn opcode_arg(call: &str, value: &Value) -> Result<Opcode> {
    let number = match value {
        Value::Nil => return Ok(Opcode::Text),
        Value::Integer(i) => Some(*i),
        Value::Number(n) if n.fract() == 0.0 => Some(*n as i64),
        _ => None,
    };
    number.and_then(opcode_number).ok_or_else(|| bad_arg(call, "opcode", OPCODE_EXPECTED, value))
}

/// Runs `f` on the bytes of a `data` argument (a string, or a number as Lua prints it) without
/// copying strings.
fn with_data<R>(call: &str, value: &Value, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
    match value {
        Value::String(s) => Ok(f(&s.as_bytes())),
        Value::Integer(i) => Ok(f(i.to_string().as_bytes())),
        Value::Number(n) => Ok(f(n.to_string().as_bytes())),
        other => Err(bad_arg(call, "data", "a string", other)),
    }
}

fn opcodes(lua: &Lua) -> Result<Table> {
    const KEY: &str = "luna.ws.opcodes";
    if let Value::Table(t) = lua.named_registry_value::<Value>(KEY)? {
        return Ok(t);
    }
    let t = lua.create_table()?;
    for (name, code) in
        [("CONTINUATION", 0), ("TEXT", 1), ("BINARY", 2), ("CLOSE", 8), ("PING", 9), ("PONG", 10)]
    {
        t.set(name, code)?;
    }
    lua.set_named_registry_value(KEY, &t)?;
    Ok(t)
}

fn close_code(call: &str, value: &Value) -> Result<u16> {
    match value {
        Value::Nil => Ok(1000),
        Value::Integer(c) if proto::conn::is_sendable_close_code(*c as u16) && *c < 5000 => Ok(*c as u16),
        Value::Number(c)
            if c.fract() == 0.0 && *c < 5000.0 && proto::conn::is_sendable_close_code(*c as u16) =>
        {
            Ok(*c as u16)
        }
        other => Err(bad_arg(call, "code", "a close code (1000-1003, 1007-1014, 3000-4999)", other)),
    }
}

/// Changes a session (send, close) and writes: at once outside `update`, at the end of it inside
/// (the driver's end-of-update flush). Events it causes wait for the next dispatch.
fn with_stream<R>(rt: &Runtime, key: Key, f: impl FnOnce(&mut WsSession) -> R) -> Option<R> {
    let result = f(rt.driver.borrow_mut().proto::<WsSession>(key)?);
    rt.flush(key);
    Some(result)
}

fn send(rt: &Runtime, key: Key, op: Opcode, data: &[u8]) -> (Option<bool>, Option<String>) {
    match with_stream(rt, key, |s| s.send(op, data)) {
        Some(Ok(())) => {
            rt.counters.borrow_mut().ws_out += 1;
            (Some(true), None)
        }
        Some(Err(e)) => (None, Some(e)),
        None => (None, Some("the connection is closed".into())),
    }
}

/// Keys of the `compression` table of servers and of clients.
const SERVER_COMPRESSION_KEYS: &[&str] =
    &["level", "threshold", "window_bits", "context_takeover", "max_contexts"];
const CLIENT_COMPRESSION_KEYS: &[&str] = &["level", "threshold", "window_bits", "context_takeover"];

/// permessage-deflate from the `compression` option (`true`, or a table of
/// [`SERVER_COMPRESSION_KEYS`] or [`CLIENT_COMPRESSION_KEYS`]; off by default).
fn compression(opts: &Options, server: bool) -> Result<Option<(DeflateConfig, Arc<Contexts>)>> {
    let known = if server { SERVER_COMPRESSION_KEYS } else { CLIENT_COMPRESSION_KEYS };
    let Some(table) = opts.switch("compression", known)? else { return Ok(None) };
    let mut config = DeflateConfig::default();
    if let Some(c) = table {
        config.level = c.whole("level", 0, 9)?.unwrap_or(config.level);
        config.threshold = c.whole("threshold", 0, u32::MAX)?.map_or(config.threshold, |t| t as usize);
        config.window_bits = c.whole("window_bits", 9, 15)?.map_or(config.window_bits, |b| b as u8);
        config.context_takeover = c.boolean("context_takeover")?.unwrap_or(config.context_takeover);
        config.max_contexts =
            c.whole("max_contexts", 0, u32::MAX)?.map_or(config.max_contexts, |m| m as usize);
    }
    Ok(Some((config, Contexts::new(config.max_contexts))))
}

/// What `luna.serve`'s `websocket = {...}` may set: `luna.new_web_app`'s keys for connections.
pub(crate) const UPGRADE_KEYS: &[&str] =
    &["max_message_size", "compression", "ping_interval", "ping_timeout"];

/// Session settings for the connections an HTTP server upgrades, from [`UPGRADE_KEYS`].
pub(crate) fn upgrade_settings(opts: &Options) -> Result<Arc<Settings>> {
    Ok(Arc::new(settings(opts, WsConfig::default(), true)?))
}

fn settings(opts: &Options, ws_default: WsConfig, server: bool) -> Result<Settings> {
    let mut settings =
        Settings { ws: ws_default, deflate: compression(opts, server)?, ..Settings::default() };
    if let Some(size) = opts.size("max_message_size")? {
        // One limit, raised or lowered: a message may come as a single frame of that size.
        settings.ws.max_message_size = size;
        settings.ws.max_frame_size = size;
    }
    settings.ping_interval = opts.seconds("ping_interval")?;
    if let Some(timeout) = opts.seconds("ping_timeout")? {
        settings.ping_timeout = timeout;
    }
    Ok(settings)
}

fn policy(opts: &Options, lua: &Lua, label: String) -> Result<Rc<Policy>> {
    Ok(Rc::new(Policy::from_options(lua, opts, label)?))
}

/// A host name a client was waiting for has resolved.
pub(crate) fn resolved(_lua: &Lua, rt: &Runtime, host: &str, now: Instant) -> Result<()> {
    let clients: Vec<u64> = {
        let ws = rt.ws.borrow();
        ws.clients
            .iter()
            .filter(|(_, c)| c.stream.is_none() && c.url.host == host)
            .map(|(id, _)| *id)
            .collect()
    };
    for id in clients {
        start_client(rt, id, now);
    }
    Ok(())
}

/// `luna.close()` / `lunac.close()`: every server or client WebSocket app.
pub(crate) fn close_all(lua: &Lua, rt: &Runtime, side: Side) -> Result<()> {
    match side {
        Side::Server => {
            // Every app is removed even if a callback raises on the way.
            let ids: Vec<u64> = rt.ws.borrow().servers.keys().copied().collect();
            let mut result = Ok(());
            for id in ids {
                result = result.and(remove_server(lua, rt, id));
            }
            result
        }
        Side::Client => {
            let ids: Vec<u64> = rt.ws.borrow().clients.keys().copied().collect();
            for id in ids {
                disconnect(rt, id, 1000, "App closing");
            }
            Ok(())
        }
    }
}

/// Open connections and listeners, for `luna.stats()`.
pub(crate) fn census(rt: &Runtime, c: &mut super::stats::Census) {
    let st = rt.ws.borrow();
    c.ws += st.conns.len() as u64;
    c.ws_clients += st.client_streams.len() as u64;
    c.listeners += st.listeners.len() as u64;
}

/// A connection ended with `code`: counts the ones we closed for the peer's input.
pub(super) fn count_end(rt: &Runtime, code: u16, clean: bool) {
    let mut counters = rt.counters.borrow_mut();
    match (clean, code) {
        (false, 1009) => counters.ws_oversize += 1,
        (false, 1002 | 1007) => counters.ws_malformed += 1,
        _ => {}
    }
}

/// A driver event for one of this module's entries.
pub(crate) fn event(lua: &Lua, rt: &Runtime, event: Event) -> Result<()> {
    match event.kind {
        EventKind::News => news(lua, rt, event.key),
        EventKind::Accepted { .. } | EventKind::Drained | EventKind::Wake => Ok(()),
    }
}

/// Client failures found outside `update` are reported by it.
pub(crate) fn report_failures(lua: &Lua, rt: &Runtime) -> Result<()> {
    loop {
        let failed = rt.ws.borrow_mut().failed.pop();
        let Some((id, reason)) = failed else { return Ok(()) };
        client_closed(lua, rt, id, (false, 1006), &reason)?;
    }
}

/// A session has news: an upgrade finished or was refused, messages or the end arrived.
fn news(lua: &Lua, rt: &Runtime, key: Key) -> Result<()> {
    let taken = rt
        .driver
        .borrow_mut()
        .proto::<WsSession>(key)
        .map(|session| (session.take_upgraded(), session.take_rejection(), session.take_opened()));
    let Some((upgraded, rejection, opened)) = taken else {
        // Gone already (a refused upgrade the driver closed): what waited for it goes too.
        let handed_over = rt.ws.borrow_mut().upgrading.remove(&key);
        return match handed_over {
            Some(up) => lua.remove_registry_value(up.handler),
            None => Ok(()),
        };
    };
    let client = rt.ws.borrow().client_streams.get(&key).copied();
    if let Some(id) = client {
        if opened {
            client::opened(lua, rt, id)?;
            client_callback(lua, rt, id, ON_CONNECT, MultiValue::new())?;
        }
        return client_inbox(lua, rt, id, key);
    }
    if let Some(reason) = rejection {
        let listener = rt.driver.borrow().listener_of(key);
        let policy = {
            let ws = rt.ws.borrow();
            listener
                .and_then(|l| ws.listeners.get(&l))
                .and_then(|id| ws.servers.get(id))
                .map(|s| s.policy.clone())
        };
        if let Some(policy) = policy {
            let peer = rt.driver.borrow_mut().stream(key).map(|s| s.peer.to_string()).unwrap_or_default();
            policy.network(lua, &format!("refused upgrade from {peer}: {reason}"))?;
        }
    }
    let handed_over = rt.ws.borrow_mut().upgrading.remove(&key);
    let listener = rt.driver.borrow().listener_of(key);
    match (upgraded, handed_over) {
        (true, Some(up)) => server::start(lua, rt, key, up)?,
        (true, None) => match listener {
            Some(listener) => accepted(lua, rt, key, listener)?,
            None => {
                rt.driver.borrow_mut().close(key);
            }
        },
        (false, Some(up)) => {
            // Still upgrading, or refused (or dropped): the driver closes a refused connection
            // once its answer is out (nobody adopted it).
            let refused = rt
                .driver
                .borrow_mut()
                .proto::<WsSession>(key)
                .is_none_or(|s| s.is_closed() || s.flow() != Flow::Open);
            if refused {
                lua.remove_registry_value(up.handler)?;
            } else {
                rt.ws.borrow_mut().upgrading.insert(key, up);
            }
        }
        (false, None) => {}
    }
    if !rt.ws.borrow().conns.contains_key(&key) {
        return Ok(()); // not upgraded (yet): the driver forgets it if it closes
    }
    rt.sched.borrow_mut().wake(key);
    // `on_close` first (as before the handler sees the end); the handler gets its message even
    // if `on_close` raised.
    server_inbox(lua, rt, key).and(handle::deliver(lua, rt, key))
}

/// Adds the WebSocket functions of one side to its module table.
pub(crate) fn register(lua: &Lua, module: &Table, side: Side) -> Result<()> {
    match side {
        Side::Server => server::register(lua, module),
        Side::Client => client::register(lua, module),
    }
}

/// The `core` primitives the Lua half needs.
pub(crate) fn core(lua: &Lua, rt: &Rc<Runtime>, core: &Table) -> Result<()> {
    client::core(lua, core)?;
    handle::register(lua, rt, core)
}
