//! Servers: `luna.tcp.listen{...}` and `luna.unix.listen{...}`. Each accepted connection's
//! `on_connection(s)` runs in a library coroutine (it may read and wait, or set `s.on_data` and
//! return: returning does not close the stream).

use std::sync::Arc;

use mlua::{Function, Lua, RegistryKey, Result, Table, Value};

use super::super::error::misuse;
use super::super::options::Options;
use super::super::{addr, runtime, sched, Runtime};
use super::stream::{self, Record as StreamRecord};
use super::{Handles, TAG};
use crate::driver::net::{self, ListenOptions};
use crate::driver::{Address, Key, ListenerConfig};
use crate::proto::raw::{RawLimits, RawStream};

pub(super) struct Record {
    /// `None` once closed (or while the host name resolves).
    key: Option<Key>,
    object: RegistryKey,
    on_connection: RegistryKey,
    pub conns: Handles,
    limits: RawLimits,
    half_open: bool,
}

const LISTEN_KEYS: &[&str] = &[
    "host",
    "port",
    "path",
    "tls",
    "backlog",
    "reuse_port",
    "max_connections",
    "max_queued",
    "max_input",
    "allow_half_open",
    "nodelay",
    "on_connection",
];

/// `core.net_listen(kind, call, config)` → server object.
pub(super) fn listen(lua: &Lua, (kind, _call, config): (String, Value, Value)) -> Result<Table> {
    let unix = kind == "unix";
    let call: &'static str = if unix { "luna.unix.listen(config)" } else { "luna.tcp.listen(config)" };
    let o = Options::new(call, config, LISTEN_KEYS)?;
    let on_connection = o
        .function("on_connection")?
        .ok_or_else(|| misuse(call, "'on_connection' is required: a function(s) run for each connection"))?;
    let options = ListenOptions {
        backlog: match o.number("backlog")? {
            None => ListenOptions::default().backlog,
            Some(n) if n.fract() == 0.0 && n >= 1.0 => n.min(65535.0) as i32,
            Some(n) => return Err(misuse(call, format!("'backlog' must be a whole number >= 1, got {n}"))),
        },
        reuse_port: o.boolean("reuse_port")?.unwrap_or(false),
    };
    let max_connections = match o.number("max_connections")? {
        None => None,
        Some(n) if n.fract() == 0.0 && n >= 1.0 => Some(n as usize),
        Some(n) => {
            return Err(misuse(call, format!("'max_connections' must be a whole number >= 1, got {n}")))
        }
    };
    let tls = match o.table("tls")? {
        Some(t) => Some(super::super::tls::server_options(call, t, &[])?),
        None => None,
    };
    let limits = stream::limits(&o)?;
    let nodelay = o.boolean("nodelay")?.unwrap_or(true);
    let rt = runtime(lua)?;
    let h = rt.net.borrow_mut().handle();
    let object: Table = lua.named_registry_value::<Function>("luna.net.server")?.call(h)?;
    let record = Record {
        key: None,
        object: lua.create_registry_value(&object)?,
        on_connection: lua.create_registry_value(on_connection)?,
        conns: Handles::default(),
        limits,
        half_open: o.boolean("allow_half_open")?.unwrap_or(false),
    };
    rt.net.borrow_mut().servers.insert(h, record);
    let make = move |tls: Option<Arc<rustls::ServerConfig>>| ListenerConfig {
        tls,
        make: Box::new(move |_| Box::new(RawStream::new(limits))),
        max_connections,
        nodelay,
    };
    if unix {
        let path = o.string("path")?.ok_or_else(|| misuse(call, "'path' is required (the socket file)"))?;
        let socket = net::unix_listen(path.as_ref(), options)
            .map_err(|e| misuse(call, format!("cannot listen on '{path}': {e}")));
        let socket = match socket {
            Ok(s) => s,
            Err(e) => {
                rt.net.borrow_mut().servers.remove(&h);
                return Err(e);
            }
        };
        bound(&rt, h, &object, socket, make(tls))?;
        return Ok(object);
    }
    let host = o.string("host")?.unwrap_or_else(|| "*".into());
    let port = o.port("port")?.ok_or_else(|| misuse(call, "'port' is required (0 picks a free port)"))?;
    let continuation: addr::Continuation = Box::new(move |lua, rt, ips| {
        let object: Table = match rt.net.borrow().servers.get(&h) {
            Some(rec) => lua.registry_value(&rec.object)?,
            None => return Ok(()), // closed while resolving
        };
        let listening = ips.and_then(|ips| addr::tcp_listen_first(&addr::with_port(&ips, port), options));
        match listening {
            Ok((socket, _)) => bound(rt, h, &object, socket, make(tls)),
            Err(e) => {
                rt.net.borrow_mut().servers.remove(&h);
                Err(misuse(call, e))
            }
        }
    });
    addr::resolve_then(lua, &rt, &host, true, continuation)?;
    Ok(object)
}

/// The listening socket exists: register it and tell the object its address.
fn bound(
    rt: &Runtime,
    h: u64,
    object: &Table,
    socket: net::ListenSocket,
    config: ListenerConfig,
) -> Result<()> {
    let local = socket.local_address().map_err(mlua::Error::external)?;
    let key = rt.driver.borrow_mut().listen(socket, config, TAG)?;
    let mut net = rt.net.borrow_mut();
    net.server_keys.insert(key, h);
    if let Some(rec) = net.servers.get_mut(&h) {
        rec.key = Some(key);
    }
    object.raw_set("address", local.to_string())?;
    match local {
        Address::Ip(a) => object.raw_set("port", a.port()),
        Address::Unix(path) => object.raw_set("path", path.map(|p| p.to_string_lossy().into_owned())),
    }
}

/// A listener accepted (and, with TLS, shook hands with) a connection: a stream object for it,
/// and `on_connection(s)` in a new coroutine.
pub(super) fn accepted(lua: &Lua, rt: &Runtime, key: Key, listener: Key) -> Result<()> {
    let server = rt.net.borrow().server_keys.get(&listener).copied();
    let Some(server) = server else {
        // The server closed meanwhile.
        rt.driver.borrow_mut().close(key);
        return Ok(());
    };
    let (on_connection, limits, half_open) = {
        let net = rt.net.borrow();
        let rec = &net.servers[&server];
        (lua.registry_value::<Function>(&rec.on_connection)?, rec.limits, rec.half_open)
    };
    rt.driver.borrow_mut().adopt(key);
    let (h, object) = stream::new_object(lua, rt)?;
    stream::set_addresses(rt, &object, key)?;
    let mut record = StreamRecord::new(lua.create_registry_value(&object)?, Some(key), Some(server), limits);
    record.half_open = half_open;
    let hook: sched::Hook = Box::new(move |lua, rt, result| {
        let failed = result.err();
        if let Some(rec) = rt.net.borrow_mut().streams.get_mut(&h) {
            rec.owner = None;
        }
        match failed {
            Some(e) => {
                // The connection's code died: the connection goes with it.
                let key = rt.net.borrow().streams.get(&h).and_then(|r| r.key);
                if let Some(key) = key {
                    let mut driver = rt.driver.borrow_mut();
                    if let Some(proto) = driver.proto::<RawStream>(key) {
                        proto.abort(Some("on_connection raised an error".into()));
                    }
                    driver.flush(key);
                }
                sched::report(lua, rt, &e)
            }
            None => Ok(()),
        }
    });
    let thread = sched::create_owned(lua, rt, on_connection, hook)?;
    record.owner = Some((lua.create_registry_value(&thread)?, thread.to_pointer() as usize));
    {
        let mut net = rt.net.borrow_mut();
        net.stream_keys.insert(key, h);
        net.streams.insert(h, Box::new(record));
        if let Some(rec) = net.servers.get_mut(&server) {
            rec.conns.insert(h);
        }
    }
    sched::resume(lua, rt, &thread, object)
}

/// Stops accepting; with `all`, every connection of the server finishes too.
pub(super) fn close(rt: &Runtime, h: u64, all: bool) {
    let (key, conns) = {
        let mut net = rt.net.borrow_mut();
        let Some(rec) = net.servers.get_mut(&h) else { return };
        let key = rec.key.take();
        let conns: Vec<u64> = if all { rec.conns.iter().copied().collect() } else { Vec::new() };
        if let Some(key) = key {
            net.server_keys.remove(&key);
        }
        net.servers.remove(&h);
        (key, conns)
    };
    if let Some(key) = key {
        rt.driver.borrow_mut().close(key);
    }
    for conn in conns {
        stream::finish(rt, conn);
    }
}

/// `core.server_close(h, all)`.
fn server_close(lua: &Lua, (h, all): (Value, Option<bool>)) -> Result<bool> {
    let rt = runtime(lua)?;
    let Some(h) = super::super::handle_number(&h) else { return Ok(false) };
    close(&rt, h, all.unwrap_or(false));
    Ok(true)
}

/// `core.server_connections(h)`: the open connections' stream objects.
fn server_connections(lua: &Lua, h: Value) -> Result<Table> {
    let rt = runtime(lua)?;
    let list = lua.create_table()?;
    let net = rt.net.borrow();
    let Some(rec) = super::super::handle_number(&h).and_then(|h| net.servers.get(&h)) else {
        return Ok(list);
    };
    for conn in &rec.conns {
        if let Some(s) = net.streams.get(conn) {
            list.raw_push(lua.registry_value::<Table>(&s.object)?)?;
        }
    }
    Ok(list)
}

/// `core.server_prop(h, name)`: `running`; nil for other names.
fn server_prop(lua: &Lua, (h, name): (Value, Value)) -> Result<Value> {
    let rt = runtime(lua)?;
    let net = rt.net.borrow();
    let rec = super::super::handle_number(&h).and_then(|h| net.servers.get(&h));
    Ok(match &name {
        Value::String(s) if s.as_bytes().as_ref() == b"running" => {
            Value::Boolean(rec.is_some_and(|r| r.key.is_some()))
        }
        _ => Value::Nil,
    })
}

pub(super) fn register(lua: &Lua, core: &Table) -> Result<()> {
    core.set("net_listen", lua.create_function(listen)?)?;
    core.set("server_close", lua.create_function(server_close)?)?;
    core.set("server_connections", lua.create_function(server_connections)?)?;
    core.set("server_prop", lua.create_function(server_prop)?)
}
