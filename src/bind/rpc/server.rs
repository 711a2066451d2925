//! Server apps: `luna.new_app` / `luna.remove_app`, the clients' records (objects, idle times),
//! requests handed to the Lua pipeline, answers, pushes, penalties and idle timeouts.

use std::collections::HashMap;

use rustc_hash::FxHashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::{Function, Lua, RegistryKey, Result, Table, Value};
use ring::rand::{SecureRandom, SystemRandom};

use super::super::addr;
use super::super::error::{lua_type, message, misuse};
use super::super::msgpack::{encode_for, encode_stack, validate, ENCODE_STACK};
use super::super::options::Options;
use super::super::policy::Policy;
use super::super::raw::{self, Out, RawFn, Stack};
use super::super::{runtime, sched, Runtime, Side};
use super::{
    app_id, drain_events, flush, from_hex, func, half, handle_events, key_of, open_socket, send_soon, to_hex,
    wake_by, RpcEvent,
};
use crate::driver::Key;
use crate::proto::rpc::{self, ConnId, Envelope, Server, ServerEvent};

/// Default seconds of inactivity before the server drops a client (`disconnect_time`).
const DEFAULT_DISCONNECT: Duration = Duration::from_secs(10);
/// Default `max_ip_connected`.
const DEFAULT_MAX_IP: usize = 100;
/// How long a `"closed"` penalty keeps an IP out when the handler sets no `timeout_duration`.
const DEFAULT_BAN: Duration = Duration::from_secs(10);

pub(super) struct ServerApp {
    pub name: String,
    pub key: Key,
    policy: Rc<Policy>,
    table: RegistryKey,
    new_client: Option<RegistryKey>,
    close_client: Option<RegistryKey>,
    timeout_client: Option<RegistryKey>,
    pub disconnect_time: Duration,
    clients: FxHashMap<ConnId, ClientRecord>,
    /// Requests from these IPs are refused until the instant (penalty `"timeout"`).
    blocked: HashMap<IpAddr, Instant>,
    /// Sessions from these IPs are closed at once until the instant (penalty `"closed"`).
    banned: HashMap<IpAddr, Instant>,
}

/// A connected client as its server app knows it.
struct ClientRecord {
    /// The client's address, canonical (plain IPv4 for IPv4 clients of a `"*"` app).
    addr: SocketAddr,
    last_active: Instant,
    handle: RegistryKey,
}

const APP_KEYS: &[&str] = &[
    "name",
    "host",
    "port",
    "max_ip_connected",
    "error_handler",
    "no_errors",
    "debug",
    "new_client",
    "close_client",
    "request_listener",
    "timeout_client",
    "disconnect_time",
    "encryption",
    "secret_key",
    "max_message_size",
];

fn new_app(lua: &Lua, config: Value) -> Result<Table> {
    const CALL: &str = "luna.new_app(config)";
    let o = Options::new(CALL, config, APP_KEYS)?;
    let name = o.string("name")?.unwrap_or_else(|| "unknown name".into());
    let host = o.string("host")?.unwrap_or_else(|| "127.0.0.1".into());
    let ips = addr::listen_ips(&host).ok_or_else(|| {
        misuse(CALL, format!("'host' must be an IP address, \"localhost\" or \"*\", got '{host}'"))
    })?;
    let port = o.port("port")?.ok_or_else(|| misuse(CALL, "'port' is required (0 picks a free port)"))?;
    let max_ip = match o.number("max_ip_connected")? {
        None => DEFAULT_MAX_IP,
        Some(n) if n >= 0.0 && n.fract() == 0.0 => n as usize,
        Some(n) => {
            return Err(misuse(CALL, format!("'max_ip_connected' must be a whole number >= 0, got {n}")))
        }
    };
    let policy = Rc::new(Policy::from_options(lua, &o, format!("app '{name}'"))?);
    let new_client = key_of(lua, o.function("new_client")?)?;
    let close_client = key_of(lua, o.function("close_client")?)?;
    let timeout_client = key_of(lua, o.function("timeout_client")?)?;
    let request_listener = o.function("request_listener")?;
    let disconnect_time = o.seconds("disconnect_time")?.unwrap_or(DEFAULT_DISCONNECT);
    let encryption = o.boolean("encryption")?.unwrap_or(true);
    let max_message_size = o.size("max_message_size")?.unwrap_or(rpc::Config::default().max_message_size);
    let rt = runtime(lua)?;
    if rt.rpc.borrow().servers.values().any(|a| a.name == name) {
        return Err(misuse(CALL, format!("an app named '{name}' already exists")));
    }
    let rng = SystemRandom::new();
    let mut seed = [0u8; 32];
    let mut secret = [0u8; 32];
    rng.fill(&mut seed)
        .and_then(|_| rng.fill(&mut secret))
        .map_err(|_| misuse(CALL, "no system randomness"))?;
    // A fixed identity keeps `app.public_key` (what clients pin) the same across restarts.
    if let Some(hex) = o.string("secret_key")? {
        seed = from_hex(&hex).ok_or_else(|| {
            misuse(CALL, "'secret_key' must be 64 hex digits (e.g. from `openssl rand -hex 32`)")
        })?;
    }
    let config = rpc::Config { encryption, max_message_size, ..Default::default() };
    let mut server = Server::new(config, seed, secret, Box::new(rng));
    server.set_max_per_ip(max_ip);
    let public_key = to_hex(&server.public_key());
    let addrs: Vec<SocketAddr> = addr::with_port(&ips, port);
    let key = open_socket(&rt, &addrs, Box::new(server))
        .map_err(|e| misuse(CALL, format!("cannot listen on {host}:{port}: {e}")))?;
    let local = rt.driver.borrow_mut().datagram(key).map(|d| d.local).expect("just opened");
    let info = lua.create_table()?;
    info.set("name", name.as_str())?;
    info.set("host", host.as_str())?;
    info.set("port", local.port())?;
    info.set("public_key", public_key)?;
    info.set("encryption", encryption)?;
    let state = rt.rpc.borrow_mut().next_id;
    let id = state + 1;
    let table: Table = half(lua)?.get::<Function>("server_app")?.call((id, info, request_listener))?;
    // The label names the app: "[luna] app 'name': started on …".
    policy.log(lua, &format!("started on {host}:{}", local.port()))?;
    let mut st = rt.rpc.borrow_mut();
    st.next_id = id;
    st.by_key.insert(key, id);
    st.servers.insert(
        id,
        ServerApp {
            name,
            key,
            policy,
            table: lua.create_registry_value(&table)?,
            new_client,
            close_client,
            timeout_client,
            disconnect_time,
            clients: FxHashMap::default(),
            blocked: HashMap::new(),
            banned: HashMap::new(),
        },
    );
    Ok(table)
}

fn remove_app(lua: &Lua, x: Value) -> Result<(bool, Option<String>)> {
    let rt = runtime(lua)?;
    let Some(id) = app_id(&rt, "luna.remove_app(app or name)", &x, Side::Server)? else {
        return Ok((false, Some("App not found".into())));
    };
    remove(lua, &rt, id)?;
    Ok((true, None))
}

/// Removes a server app: unregistered first (what its callbacks call cannot reach it again),
/// sessions closed with "Server app removed" after what is queued for them went out, then
/// `close_client` once for every client record it had.
pub(super) fn remove(lua: &Lua, rt: &Runtime, id: u32) -> Result<()> {
    let app = {
        let mut st = rt.rpc.borrow_mut();
        let Some(app) = st.servers.remove(&id) else { return Ok(()) };
        st.by_key.remove(&app.key);
        app
    };
    let now = Instant::now();
    let mut events;
    {
        let mut driver = rt.driver.borrow_mut();
        // Take in what already arrived (a session confirmed meanwhile is closed with the rest)
        // and send what is queued for the clients before the sessions close (closing drops it).
        driver.service(app.key, now);
        events = drain_events(&mut driver, app.key);
        let confirmed = events.iter().filter_map(|ev| match ev {
            RpcEvent::Server(ServerEvent::Connected { conn, .. }) => Some(*conn),
            _ => None,
        });
        let conns: Vec<ConnId> = app.clients.keys().copied().chain(confirmed).collect();
        if let Some(s) = driver.datagram_proto::<Server>(app.key) {
            for conn in conns {
                let _ = s.close(conn, "Server app removed");
            }
        }
        driver.flush(app.key);
        events.extend(drain_events(&mut driver, app.key));
        super::retire(rt, &mut driver, app.key);
        driver.close(app.key);
    }
    let ServerApp { policy, table, new_client, close_client, timeout_client, clients, .. } = app;
    let mut result = Ok(());
    let close_client_fn = func(lua, &close_client)?;
    for k in [Some(table), new_client, close_client, timeout_client].into_iter().flatten() {
        lua.remove_registry_value(k)?;
    }
    for (conn, c) in clients {
        let reason = events
            .iter()
            .find_map(|ev| match ev {
                RpcEvent::Server(ServerEvent::Disconnected { conn: gone, reason }) if *gone == conn => {
                    Some(reason.to_string())
                }
                _ => None,
            })
            .unwrap_or_else(|| "Server app removed".into());
        let r = client_left(lua, &policy, close_client_fn.as_ref(), c, &reason);
        result = result.and(r);
    }
    result.and(policy.log(lua, "stopped"))
}

/// A client record's session ended (it was already taken out of the app): mark it closed, log,
/// and call `close_client` once.
fn client_left(
    lua: &Lua,
    policy: &Policy,
    close_client: Option<&Function>,
    c: ClientRecord,
    reason: &str,
) -> Result<()> {
    let client: Table = lua.registry_value(&c.handle)?;
    lua.remove_registry_value(c.handle)?;
    client.raw_set("__closed", true)?;
    policy.log(lua, &format!("client {} disconnected: {reason}", c.addr))?;
    if let Some(cb) = close_client {
        if let Err(e) = cb.call::<()>(client) {
            policy.report(lua, &format!("close_client: {}", message(&e)))?;
        }
    }
    Ok(())
}

/// An event of app `id`'s server.
pub(super) fn event(lua: &Lua, rt: &Runtime, id: u32, key: Key, ev: ServerEvent, now: Instant) -> Result<()> {
    match ev {
        ServerEvent::Connected { conn, addr } => {
            let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
            let (banned, policy) = {
                let mut st = rt.rpc.borrow_mut();
                let Some(app) = st.servers.get_mut(&id) else { return Ok(()) };
                app.banned.retain(|_, until| *until > now);
                (app.banned.contains_key(&addr.ip()), app.policy.clone())
            };
            if banned {
                if let Some(s) = rt.driver.borrow_mut().datagram_proto::<Server>(key) {
                    let _ = s.close(conn, "Client IP is temporarily banned");
                }
                return flush(lua, rt, key);
            }
            let ip = addr.ip().to_string();
            let client: Table = half(lua)?.get::<Function>("client_object")?.call((
                id,
                conn.to_u64(),
                ip.as_str(),
                addr.port(),
            ))?;
            let cb = {
                let mut st = rt.rpc.borrow_mut();
                let Some(app) = st.servers.get_mut(&id) else { return Ok(()) };
                let handle = lua.create_registry_value(&client)?;
                app.clients.insert(conn, ClientRecord { addr, last_active: now, handle });
                wake_by(rt, key, now + app.disconnect_time);
                func(lua, &app.new_client)?
            };
            flush(lua, rt, key)?;
            policy.log(lua, &format!("client {addr} connected"))?;
            if let Some(cb) = cb {
                if let Err(e) = cb.call::<()>(client) {
                    policy.report(lua, &format!("new_client: {}", message(&e)))?;
                }
            }
            Ok(())
        }
        ServerEvent::Message { conn, data } => {
            rt.counters.borrow_mut().rpc_in += 1;
            let Ok(Envelope::Request { id: rid, path, args, .. }) = Envelope::decode(&data) else {
                return Ok(());
            };
            let (client, table, blocked) = {
                let mut st = rt.rpc.borrow_mut();
                let Some(app) = st.servers.get_mut(&id) else { return Ok(()) };
                let Some(c) = app.clients.get_mut(&conn) else { return Ok(()) };
                c.last_active = now;
                let ip = c.addr.ip();
                let client = c.handle.id();
                if !app.blocked.is_empty() {
                    app.blocked.retain(|_, until| *until > now);
                }
                let blocked =
                    app.blocked.contains_key(&ip).then(|| format!("Client IP {ip} is temporarily blocked"));
                (client, app.table.id(), blocked)
            };
            if let Some(msg) = blocked {
                return send_response(rt, id, conn, rid, Err(&msg));
            }
            if let Err(e) = if args.is_empty() { Ok(()) } else { validate(args) } {
                return send_response(rt, id, conn, rid, Err(&message(&e)));
            }
            // The request pipeline of lua/rpc.lua, called with the arguments decoded in place.
            let request = request_fn(lua, rt)?;
            let call = [
                raw::Value::Ref(table),
                raw::Value::Ref(client),
                raw::Value::Int(rid.into()),
                raw::Value::Slice(path.as_bytes()),
                raw::Value::MsgPack(args.into()),
                raw::Value::Int(data.len() as i64),
            ];
            raw::call(lua, request, &call)
        }
        ServerEvent::Disconnected { conn, reason } => {
            let (c, cb, policy) = {
                let mut st = rt.rpc.borrow_mut();
                let Some(app) = st.servers.get_mut(&id) else { return Ok(()) };
                let Some(c) = app.clients.remove(&conn) else { return Ok(()) };
                (c, func(lua, &app.close_client)?, app.policy.clone())
            };
            client_left(lua, &policy, cb.as_ref(), c, &reason.to_string())
        }
    }
}

/// The registry slot of the Lua half's request pipeline (looked up once).
fn request_fn(lua: &Lua, rt: &Runtime) -> Result<std::ffi::c_int> {
    if let Some(key) = &rt.rpc.borrow().request {
        return Ok(key.id());
    }
    let f: Function = half(lua)?.get("request")?;
    let key = lua.create_registry_value(&f)?;
    let id = key.id();
    rt.rpc.borrow_mut().request = Some(key);
    Ok(id)
}

/// Offers idle clients to `timeout_client` and closes the ones it does not keep.
pub(super) fn idle_scan(lua: &Lua, rt: &Runtime, id: u32, key: Key, now: Instant) -> Result<()> {
    let (idle, dt, cb, policy) = {
        let st = rt.rpc.borrow();
        let Some(app) = st.servers.get(&id) else { return Ok(()) };
        let dt = app.disconnect_time;
        let idle: Vec<(ConnId, Duration)> = app
            .clients
            .iter()
            .filter(|(_, c)| now.saturating_duration_since(c.last_active) >= dt)
            .map(|(&conn, c)| (conn, now.saturating_duration_since(c.last_active)))
            .collect();
        (idle, dt, func(lua, &app.timeout_client)?, app.policy.clone())
    };
    let mut result = Ok(());
    for (conn, inactive) in idle {
        let mut keep = false;
        if let Some(cb) = &cb {
            let client = {
                let st = rt.rpc.borrow();
                match st.servers.get(&id).and_then(|a| a.clients.get(&conn)) {
                    Some(c) => lua.registry_value::<Table>(&c.handle)?,
                    None => continue,
                }
            };
            match cb.call::<Value>((client, inactive.as_secs_f64(), dt.as_secs_f64())) {
                Ok(Value::Boolean(false)) => keep = true,
                Ok(_) => {}
                Err(e) => {
                    keep = true;
                    if result.is_ok() {
                        result = policy.report(lua, &format!("timeout_client: {}", message(&e)));
                    }
                }
            }
        }
        if server_key(rt, id).is_none() {
            return result; // the callback removed the app
        }
        if keep {
            if let Some(c) = rt.rpc.borrow_mut().servers.get_mut(&id).and_then(|a| a.clients.get_mut(&conn)) {
                c.last_active = now;
            }
        } else if let Some(s) = rt.driver.borrow_mut().datagram_proto::<Server>(key) {
            let _ = s.close(conn, "idle timeout");
        }
    }
    let next = {
        let st = rt.rpc.borrow();
        let Some(app) = st.servers.get(&id) else { return result };
        app.clients.values().map(|c| c.last_active + app.disconnect_time).min()
    };
    rt.driver.borrow_mut().set_wake(key, next.map(|at| at.max(now + Duration::from_millis(1))));
    flush(lua, rt, key)?;
    result
}

impl ServerApp {
    /// Connected clients.
    pub fn session_count(&self) -> usize {
        self.clients.len()
    }
}

fn server_key(rt: &Runtime, id: u32) -> Option<Key> {
    rt.rpc.borrow().servers.get(&id).map(|a| a.key)
}

fn send_response(
    rt: &Runtime,
    id: u32,
    conn: ConnId,
    rid: u32,
    result: std::result::Result<&[u8], &str>,
) -> Result<()> {
    let mut msg = Vec::new();
    Envelope::Response { id: rid, result }.encode(&mut msg);
    if let Some(key) = queue_message(rt, id, conn, msg) {
        send_soon(rt, key);
    }
    Ok(())
}

/// Queues an encoded message to client `conn` of app `id`; the entry to flush.
fn queue_message(rt: &Runtime, id: u32, conn: ConnId, msg: Vec<u8>) -> Option<Key> {
    let key = server_key(rt, id)?;
    if let Some(s) = rt.driver.borrow_mut().datagram_proto::<Server>(key) {
        if s.send(conn, msg).is_ok() {
            rt.counters.borrow_mut().rpc_out += 1;
        }
    }
    Some(key)
}

/// `core.respond(app, conn, id, ok, value)`: the answer to a request (`ok`: `value` is the
/// result, else an error text) → `true`, or `nil, why` when the result could not be encoded
/// (the client got that error; the Lua half reports it to the app's policy). A raw C function:
/// every request ends here.
pub(super) struct Respond;

impl RawFn for Respond {
    const NAME: &'static str = "core.respond";
    const STACK: std::ffi::c_int = ENCODE_STACK;

    fn call(rt: &Runtime, st: &Stack) -> std::result::Result<Out, String> {
        let int = |i| st.integer(i).ok_or_else(|| format!("core.respond: argument {i} must be an integer"));
        let (id, conn, rid) = (int(1)? as u32, ConnId::from_u64(int(2)? as u64), int(3)? as u32);
        // The envelope and the result are encoded into the one buffer the session keeps.
        let mut msg = Vec::with_capacity(64);
        let ok = st.truthy(4);
        Envelope::response_head(rid, ok, &mut msg);
        let failed = if ok {
            // SAFETY: index 5 is an argument of this call; encoding only reads the stack.
            unsafe { encode_stack(st.state(), 5, &mut msg) }
                .err()
                .map(|e| format!("cannot encode the result: it contains {}", e.text()))
        } else {
            // Error texts travel as UTF-8 (the client drops a response whose text is not).
            msg.extend_from_slice(String::from_utf8_lossy(st.bytes(5).unwrap_or(b"error")).as_bytes());
            None
        };
        if let Some(e) = &failed {
            msg.clear();
            Envelope::Response { id: rid, result: Err(e) }.encode(&mut msg);
        }
        if let Some(key) = queue_message(rt, id, conn, msg) {
            send_soon(rt, key);
        }
        Ok(match failed {
            Some(e) => {
                let mut out = Out::one(raw::Value::Nil);
                out.push(raw::Value::Owned(e.into_bytes()));
                out
            }
            None => Out::one(raw::Value::Bool(true)),
        })
    }
}

/// `client:send(message)`.
fn push(lua: &Lua, (id, conn, value): (u32, u64, Value)) -> Result<(bool, Option<String>)> {
    let rt = runtime(lua)?;
    let payload = encode_for(lua, "client:send(message)", "message", &value)?;
    let Some(key) = server_key(&rt, id) else { return Ok((false, Some("app removed".into()))) };
    let mut msg = Vec::new();
    Envelope::Push(&payload).encode(&mut msg);
    let sent = match rt.driver.borrow_mut().datagram_proto::<Server>(key) {
        Some(s) => s.send(ConnId::from_u64(conn), msg),
        None => Ok(()),
    };
    if sent.is_ok() {
        rt.counters.borrow_mut().rpc_out += 1;
    }
    send_soon(&rt, key);
    Ok(match sent {
        Ok(()) => (true, None),
        Err(e) => (false, Some(e.to_string())),
    })
}

/// `core.rtt(app, conn)` → smoothed RTT and its variation in seconds, nil before the first sample.
fn rtt(lua: &Lua, (id, conn): (u32, u64)) -> Result<(Option<f64>, Option<f64>)> {
    let rt = runtime(lua)?;
    let Some(key) = server_key(&rt, id) else { return Ok((None, None)) };
    let rtt =
        rt.driver.borrow_mut().datagram_proto::<Server>(key).and_then(|s| s.rtt(ConnId::from_u64(conn)));
    Ok(super::seconds(rtt))
}

/// `client:close()` on the server.
fn close_conn(lua: &Lua, (id, conn): (u32, u64)) -> Result<()> {
    let rt = runtime(lua)?;
    let Some(key) = server_key(&rt, id) else { return Ok(()) };
    close_session(lua, &rt, key, ConnId::from_u64(conn), "Closed by server")
}

/// Closes one client's session after sending what is already queued for it (answers queued in
/// this update would otherwise be dropped with the session).
fn close_session(lua: &Lua, rt: &Runtime, key: Key, conn: ConnId, reason: &str) -> Result<()> {
    let now = Instant::now();
    {
        let mut driver = rt.driver.borrow_mut();
        driver.flush(key);
        if let Some(s) = driver.datagram_proto::<Server>(key) {
            let _ = s.close(conn, reason);
        }
    }
    // Lua runs only now, after the driver work (it may remove the app).
    handle_events(lua, rt, key, now)?;
    flush(lua, rt, key)
}

/// `core.penalty(app, conn, kind, seconds, reason)`: a handler's `max_message_size` was exceeded.
fn penalty(lua: &Lua, (id, conn, kind, seconds, reason): (u32, u64, String, f64, String)) -> Result<()> {
    let rt = runtime(lua)?;
    let now = Instant::now();
    let conn = ConnId::from_u64(conn);
    let until = now + Duration::try_from_secs_f64(seconds).unwrap_or(DEFAULT_BAN);
    let key = {
        let mut st = rt.rpc.borrow_mut();
        let Some(app) = st.servers.get_mut(&id) else { return Ok(()) };
        let Some(ip) = app.clients.get(&conn).map(|c| c.addr.ip()) else { return Ok(()) };
        match kind.as_str() {
            "timeout" => {
                app.blocked.insert(ip, until);
                None
            }
            "closed" => {
                app.banned.insert(ip, until);
                Some(app.key)
            }
            _ => None,
        }
    };
    if let Some(key) = key {
        close_session(lua, &rt, key, conn, &reason)?;
    }
    Ok(())
}

fn get_clients(lua: &Lua, id: u32) -> Result<Table> {
    let rt = runtime(lua)?;
    let st = rt.rpc.borrow();
    let list = lua.create_table()?;
    if let Some(app) = st.servers.get(&id) {
        for c in app.clients.values() {
            list.raw_push(lua.registry_value::<Table>(&c.handle)?)?;
        }
    }
    Ok(list)
}

/// `core.report(app, msg, no_errors)`: a request's error with no handler/router error_handler.
fn report(lua: &Lua, (id, msg, no_errors): (u32, String, Option<bool>)) -> Result<()> {
    let rt = runtime(lua)?;
    let policy = rt.rpc.borrow().servers.get(&id).map(|a| a.policy.clone());
    let Some(policy) = policy else { return Ok(()) };
    match no_errors {
        Some(no_errors) if no_errors != policy.no_errors => {
            let p = Policy { label: policy.label.clone(), no_errors, handler: None, debug: policy.debug };
            if no_errors && policy.handler.is_some() {
                rt.counters.borrow_mut().handler_errors += 1;
                return policy.network(lua, &msg);
            }
            p.report(lua, &msg)
        }
        _ => policy.report(lua, &msg),
    }
}

/// `core.spawn(fn, done, args, client)`: an async handler in a library-owned coroutine; its end
/// calls `done(true, result)` or `done(false, error)`.
fn spawn(lua: &Lua, (f, done, args, client): (Function, Function, Value, Value)) -> Result<()> {
    let rt = runtime(lua)?;
    let done = lua.create_registry_value(done)?;
    let hook: sched::Hook = Box::new(move |lua, _rt, result| {
        let done_fn: Function = lua.registry_value(&done)?;
        lua.remove_registry_value(done)?;
        match result {
            Ok(value) => done_fn.call::<()>((true, value)),
            Err(e) => done_fn.call::<()>((false, message(&e))),
        }
    });
    sched::spawn_owned(lua, &rt, f, (args, client), hook)?;
    Ok(())
}

const ROUTER_KEYS: &[&str] = &["prefix", "no_errors", "error_handler"];
const HANDLER_KEYS: &[&str] = &[
    "prefix",
    "fun",
    "no_errors",
    "async",
    "error_handler",
    "validate",
    "response_validate",
    "max_message_size",
    "message_penalty",
    "timeout_duration",
    "middlewares",
];

/// `core.check(call, config)`: option names and types of routers and handlers.
fn check(_lua: &Lua, (call, config): (String, Value)) -> Result<()> {
    if call.starts_with("app:") {
        const CALL: &str = "app:new_router(config)";
        let o = Options::new(CALL, config, ROUTER_KEYS)?;
        o.string("prefix")?;
        o.boolean("no_errors")?;
        o.function("error_handler")?;
        return Ok(());
    }
    const CALL: &str = "router:new(config)";
    let o = Options::new(CALL, config, HANDLER_KEYS)?;
    o.string("prefix")?;
    if o.function("fun")?.is_none() {
        return Err(misuse(CALL, "'fun' is required (a function(args, client))"));
    }
    o.boolean("no_errors")?;
    o.boolean("async")?;
    o.function("error_handler")?;
    let type_names = ["nil", "number", "string", "boolean", "table"];
    let check_types = |what: &str, list: &Table| -> Result<()> {
        for v in list.clone().sequence_values::<Value>() {
            match v? {
                Value::String(s) if type_names.contains(&s.to_str()?.as_ref()) => {}
                other => {
                    return Err(misuse(
                        CALL,
                        format!(
                            "{what} must list type names ({}), got {}",
                            type_names.join(", "),
                            lua_type(&other)
                        ),
                    ))
                }
            }
        }
        Ok(())
    };
    if let Some(v) = o.table("validate")? {
        // In sorted order, so the same config always gets the same error (like lua/rpc.lua).
        let mut entries = Vec::new();
        for pair in v.pairs::<Value, Value>() {
            let (k, types) = pair?;
            entries.push((k.to_string()?, types));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, types) in entries {
            let Value::Table(types) = types else {
                return Err(misuse(
                    CALL,
                    format!("'validate' entries must be lists of type names, got {}", lua_type(&types)),
                ));
            };
            check_types(&format!("'validate' entry for {name}"), &types)?;
        }
    }
    if let Some(v) = o.table("response_validate")? {
        check_types("'response_validate'", &v)?;
    }
    o.size("max_message_size")?;
    match o.string("message_penalty")?.as_deref() {
        None | Some("timeout") | Some("closed") => {}
        Some(other) => {
            return Err(misuse(
                CALL,
                format!("'message_penalty' must be \"timeout\" or \"closed\", got '{other}'"),
            ))
        }
    }
    o.seconds("timeout_duration")?;
    if let Some(list) = o.table("middlewares")? {
        for v in list.sequence_values::<Value>() {
            let v = v?;
            if !matches!(v, Value::Function(_)) {
                return Err(misuse(
                    CALL,
                    format!("'middlewares' must be a list of functions, got {}", lua_type(&v)),
                ));
            }
        }
    }
    Ok(())
}

/// The server-side primitives of the Lua half.
pub(super) fn core(lua: &Lua, core: &Table) -> Result<()> {
    core.set("check", lua.create_function(check)?)?;
    core.set("report", lua.create_function(report)?)?;
    // A request error a handler's or router's own error_handler took (counted, not reported).
    core.set(
        "handled_error",
        lua.create_function(|lua, ()| {
            runtime(lua)?.counters.borrow_mut().handler_errors += 1;
            Ok(())
        })?,
    )?;
    core.set("spawn", lua.create_function(spawn)?)?;
    let boxed = raw::runtime_box(lua, &runtime(lua)?)?;
    core.set("respond", raw::function::<Respond>(lua, &boxed)?)?;
    core.set("push", lua.create_function(push)?)?;
    core.set("close_conn", lua.create_function(close_conn)?)?;
    core.set("rtt", lua.create_function(rtt)?)?;
    core.set("penalty", lua.create_function(penalty)?)?;
    core.set("get_clients", lua.create_function(get_clients)?)
}

pub(super) fn register(lua: &Lua, module: &Table) -> Result<()> {
    module.set("new_app", lua.create_function(new_app)?)?;
    module.set("remove_app", lua.create_function(remove_app)?)
}
