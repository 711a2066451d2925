//! RPC apps at the Lua surface: `luna.new_app` / `luna.remove_app` and `lunac.connect_to_app` /
//! `lunac.disconnect_to_app`. Sessions, encoding (MessagePack), client records, idle timeouts,
//! penalties and pending calls live here; app/router/handler objects, the request pipeline and
//! the waiting `fetch` are the Lua half in `lua/rpc.lua`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::{Function, Lua, RegistryKey, Result, Table, Thread, Value};
use ring::rand::{SecureRandom, SystemRandom};

use super::error::{bad_arg, lua_type, message, misuse};
use super::options::Options;
use super::policy::Policy;
use super::{canonical, runtime, sched, Runtime, Side};
use crate::driver::rpc::{Proto, RpcEvent};
use crate::driver::{parse_ip, Key, Lookup};
use crate::proto::rpc::{self, Client, ClientEvent, ConnId, Envelope, Server, ServerEvent};

/// Default seconds of inactivity before the server drops a client (`disconnect_time`).
const DEFAULT_DISCONNECT: Duration = Duration::from_secs(10);
/// Default `fetch` timeout.
const DEFAULT_FETCH_TIMEOUT: f64 = 5.0;
/// Default `max_ip_connected`.
const DEFAULT_MAX_IP: usize = 100;
/// How long a `"closed"` penalty keeps an IP out when the handler sets no `timeout_duration`.
const DEFAULT_BAN: Duration = Duration::from_secs(10);
/// Deepest nesting of tables accepted by the encoder and the decoder.
const MAX_DEPTH: usize = 64;

#[derive(Default)]
pub(crate) struct RpcState {
    next_id: u32,
    servers: HashMap<u32, ServerApp>,
    clients: HashMap<u32, ClientApp>,
    by_key: HashMap<Key, u32>,
    /// Endpoints with output queued during this update: sent together at its end, so many
    /// answers (or calls) share a datagram.
    dirty: Vec<Key>,
}

struct ServerApp {
    name: String,
    key: Key,
    policy: Rc<Policy>,
    table: RegistryKey,
    new_client: Option<RegistryKey>,
    close_client: Option<RegistryKey>,
    timeout_client: Option<RegistryKey>,
    disconnect_time: Duration,
    conns: HashMap<ConnId, Conn>,
    /// Requests from these IPs are refused until the instant (penalty `"timeout"`).
    blocked: HashMap<IpAddr, Instant>,
    /// Sessions from these IPs are closed at once until the instant (penalty `"closed"`).
    banned: HashMap<IpAddr, Instant>,
}

struct Conn {
    /// The client's address, canonical (plain IPv4 for IPv4 clients of a `"*"` app).
    addr: SocketAddr,
    last_active: Instant,
    handle: RegistryKey,
}

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
enum Phase {
    /// Waiting for the host name to resolve.
    Resolving,
    /// A session is (being) established on `key`.
    Open,
    /// The session ended; waiting for `reconnect_time` (if any).
    Down,
}

struct ClientApp {
    name: String,
    key: Option<Key>,
    phase: Phase,
    policy: Rc<Policy>,
    table: RegistryKey,
    host: String,
    port: u16,
    config: rpc::Config,
    pinned: Option<[u8; 32]>,
    reconnect: Option<Duration>,
    listener: Option<RegistryKey>,
    connect_server: Option<RegistryKey>,
    disconnect_server: Option<RegistryKey>,
    connected: bool,
    calls: HashMap<u32, Call>,
    next_call: u32,
    /// Messages queued while the host name resolves.
    early: Vec<Vec<u8>>,
}

enum Call {
    /// `fetch`: a coroutine to wake (none when blocking) and when to give up.
    Waiting { thread: Option<RegistryKey>, deadline: Instant },
    /// `noawait_fetch` with a callback.
    Callback(RegistryKey),
    /// The answer, until the waiting `fetch` picks it up.
    Done(std::result::Result<Vec<u8>, String>),
}

// ---------------------------------------------------------------------------------------------
// Values <-> MessagePack

/// Encodes a Lua value; `Err` names what could not be encoded.
pub(crate) fn encode(value: &Value, out: &mut Vec<u8>) -> std::result::Result<(), String> {
    let mut path = Vec::new();
    encode_inner(value, out, &mut path)
}

fn encode_inner(value: &Value, out: &mut Vec<u8>, path: &mut Vec<usize>) -> std::result::Result<(), String> {
    use rmp::encode as e;
    let io = |_| "write failed".to_string();
    match value {
        Value::Nil => e::write_nil(out).map_err(io)?,
        Value::Boolean(b) => e::write_bool(out, *b).map_err(io)?,
        Value::Integer(i) => {
            e::write_sint(out, *i).map_err(|_| "write failed".to_string())?;
        }
        Value::Number(n) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                e::write_sint(out, *n as i64).map_err(|_| "write failed".to_string())?;
            } else {
                e::write_f64(out, *n).map_err(|_| "write failed".to_string())?;
            }
        }
        Value::String(s) => {
            let bytes = s.as_bytes();
            match std::str::from_utf8(&bytes) {
                Ok(text) => e::write_str(out, text).map_err(|_| "write failed".to_string())?,
                Err(_) => e::write_bin(out, &bytes).map_err(|_| "write failed".to_string())?,
            }
        }
        Value::Table(t) => {
            let ptr = t.to_pointer() as usize;
            if path.contains(&ptr) {
                return Err("a cyclic table".into());
            }
            if path.len() >= MAX_DEPTH {
                return Err(format!("a table nested deeper than {MAX_DEPTH} levels"));
            }
            path.push(ptr);
            let len = t.raw_len();
            let mut count = 0usize;
            for pair in t.pairs::<Value, Value>() {
                let _ = pair.map_err(|e| message(&e))?;
                count += 1;
            }
            if len > 0 && count == len {
                e::write_array_len(out, len as u32).map_err(|_| "write failed".to_string())?;
                for i in 1..=len {
                    let v: Value = t.raw_get(i).map_err(|e| message(&e))?;
                    encode_inner(&v, out, path)?;
                }
            } else {
                e::write_map_len(out, count as u32).map_err(|_| "write failed".to_string())?;
                for pair in t.pairs::<Value, Value>() {
                    let (k, v) = pair.map_err(|e| message(&e))?;
                    encode_inner(&k, out, path)?;
                    encode_inner(&v, out, path)?;
                }
            }
            path.pop();
        }
        other => return Err(format!("a {} value", lua_type(other))),
    }
    Ok(())
}

/// Decodes one MessagePack value into Lua (strings and binaries both become Lua strings).
/// Lengths are checked against the bytes left, so hostile input cannot make us allocate.
pub(crate) fn decode(lua: &Lua, data: &[u8]) -> Result<Value> {
    if data.is_empty() {
        return Ok(Value::Nil);
    }
    let mut rd = data;
    decode_inner(lua, &mut rd, 0)
}

fn bad(what: impl std::fmt::Display) -> mlua::Error {
    mlua::Error::external(format!("cannot decode a message: {what}"))
}

fn take<'a>(rd: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if rd.len() < n {
        return Err(bad("truncated data"));
    }
    let (head, rest) = rd.split_at(n);
    *rd = rest;
    Ok(head)
}

fn decode_inner(lua: &Lua, rd: &mut &[u8], depth: usize) -> Result<Value> {
    use rmp::decode::RmpRead;
    use rmp::Marker as M;
    if depth > MAX_DEPTH {
        return Err(bad(format!("nested deeper than {MAX_DEPTH} levels")));
    }
    let marker = rmp::decode::read_marker(rd).map_err(|_| bad("truncated data"))?;
    let int = |i: i64| Value::Integer(i as _);
    let value = match marker {
        M::Null => Value::Nil,
        M::True => Value::Boolean(true),
        M::False => Value::Boolean(false),
        M::FixPos(n) => int(n.into()),
        M::FixNeg(n) => int(n.into()),
        M::U8 => int(rd.read_data_u8().map_err(bad)?.into()),
        M::U16 => int(rd.read_data_u16().map_err(bad)?.into()),
        M::U32 => int(rd.read_data_u32().map_err(bad)?.into()),
        M::U64 => match rd.read_data_u64().map_err(bad)? {
            v if v > i64::MAX as u64 => Value::Number(v as f64),
            v => int(v as i64),
        },
        M::I8 => int(rd.read_data_i8().map_err(bad)?.into()),
        M::I16 => int(rd.read_data_i16().map_err(bad)?.into()),
        M::I32 => int(rd.read_data_i32().map_err(bad)?.into()),
        M::I64 => int(rd.read_data_i64().map_err(bad)?),
        M::F32 => Value::Number(rd.read_data_f32().map_err(bad)?.into()),
        M::F64 => Value::Number(rd.read_data_f64().map_err(bad)?),
        M::FixStr(_) | M::Str8 | M::Str16 | M::Str32 | M::Bin8 | M::Bin16 | M::Bin32 => {
            let n = match marker {
                M::FixStr(n) => n.into(),
                M::Str8 | M::Bin8 => rd.read_data_u8().map_err(bad)?.into(),
                M::Str16 | M::Bin16 => rd.read_data_u16().map_err(bad)?.into(),
                _ => rd.read_data_u32().map_err(bad)?,
            };
            Value::String(lua.create_string(take(rd, n as usize)?)?)
        }
        M::FixArray(_) | M::Array16 | M::Array32 => {
            let n = match marker {
                M::FixArray(n) => n.into(),
                M::Array16 => rd.read_data_u16().map_err(bad)?.into(),
                _ => rd.read_data_u32().map_err(bad)?,
            } as usize;
            if n > rd.len() {
                return Err(bad("array longer than the data"));
            }
            let t = lua.create_table_with_capacity(n, 0)?;
            for i in 1..=n {
                t.raw_set(i, decode_inner(lua, rd, depth + 1)?)?;
            }
            Value::Table(t)
        }
        M::FixMap(_) | M::Map16 | M::Map32 => {
            let n = rmp::decode::marker_to_len(rd, marker).map_err(bad)? as usize;
            if n > rd.len() / 2 {
                return Err(bad("map longer than the data"));
            }
            let t = lua.create_table_with_capacity(0, n)?;
            for _ in 0..n {
                let k = decode_inner(lua, rd, depth + 1)?;
                let v = decode_inner(lua, rd, depth + 1)?;
                match k {
                    Value::Nil => {}
                    Value::Number(f) if f.is_nan() => return Err(bad("a NaN table key")),
                    k => t.raw_set(k, v)?,
                }
            }
            Value::Table(t)
        }
        other => return Err(bad(format!("unsupported MessagePack type {other:?}"))),
    };
    Ok(value)
}

fn encode_for(call: &str, what: &str, value: &Value) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode(value, &mut out).map_err(|e| misuse(call, format!("cannot encode '{what}': it contains {e}")))?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn key_of(lua: &Lua, f: Option<Function>) -> Result<Option<RegistryKey>> {
    f.map(|f| lua.create_registry_value(f)).transpose()
}

fn func(lua: &Lua, key: &Option<RegistryKey>) -> Result<Option<Function>> {
    key.as_ref().map(|k| lua.registry_value::<Function>(k)).transpose()
}

fn half(lua: &Lua) -> Result<Table> {
    const KEY: &str = "luna.rpc_half";
    if let Value::Table(t) = lua.named_registry_value::<Value>(KEY)? {
        return Ok(t);
    }
    let core = lua.create_table()?;
    core.set("PARK", Value::LightUserData(sched::park_value()))?;
    core.set("check", lua.create_function(check)?)?;
    core.set("report", lua.create_function(report)?)?;
    core.set("spawn", lua.create_function(spawn)?)?;
    core.set("respond", lua.create_function(respond)?)?;
    core.set("push", lua.create_function(push)?)?;
    core.set("close_conn", lua.create_function(close_conn)?)?;
    core.set("penalty", lua.create_function(penalty)?)?;
    core.set("get_clients", lua.create_function(get_clients)?)?;
    core.set("set", lua.create_function(set)?)?;
    core.set("fetch_start", lua.create_function(fetch_start)?)?;
    core.set("fetch_result", lua.create_function(fetch_result)?)?;
    core.set("fetch_block", lua.create_function(fetch_block)?)?;
    core.set("noawait", lua.create_function(noawait)?)?;
    core.set("is_connected", lua.create_function(is_connected)?)?;
    let t: Table = lua.load(include_str!("../../lua/rpc.lua")).set_name("=rpc.lua").call(core)?;
    lua.set_named_registry_value(KEY, &t)?;
    Ok(t)
}

/// Sends what the entry queued and handles the events that produced (closes report
/// `Disconnected` at once).
/// Sends what `key` has queued: at the end of the current update when inside one, else now.
fn flush(lua: &Lua, rt: &Runtime, key: Key, now: Instant) -> Result<()> {
    if rt.in_update() {
        let dirty = &mut rt.rpc.borrow_mut().dirty;
        if !dirty.contains(&key) {
            dirty.push(key);
        }
        return Ok(());
    }
    flush_now(lua, rt, key, now)
}

fn flush_now(lua: &Lua, rt: &Runtime, key: Key, now: Instant) -> Result<()> {
    let mut events = Vec::new();
    rt.driver.borrow_mut().rpc_flush(key, now, &mut events);
    handle_events(lua, rt, key, events, now)
}

fn handle_events(lua: &Lua, rt: &Runtime, key: Key, events: Vec<RpcEvent>, now: Instant) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let Some(id) = rt.rpc.borrow().by_key.get(&key).copied() else { return Ok(()) };
    let mut first_error = None;
    for ev in events {
        let r = match ev {
            RpcEvent::Server(ev) => server_event(lua, rt, id, key, ev, now),
            RpcEvent::Client(ev) => client_event(lua, rt, id, key, ev, now),
            RpcEvent::Wake => wake(lua, rt, id, key, now),
        };
        if let Err(e) = r {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Services a ready or due RPC entry (called by `tick`).
/// Sends everything queued during this update (see [`flush`]).
pub(crate) fn flush_dirty(lua: &Lua, rt: &Runtime, now: Instant) -> Result<()> {
    loop {
        let next = rt.rpc.borrow_mut().dirty.pop();
        let Some(key) = next else { return Ok(()) };
        flush_now(lua, rt, key, now)?;
    }
}

pub(crate) fn service(lua: &Lua, rt: &Runtime, key: Key, now: Instant) -> Result<()> {
    let mut events = Vec::new();
    rt.driver.borrow_mut().rpc_service(key, now, &mut events);
    handle_events(lua, rt, key, events, now)
}

fn wake(lua: &Lua, rt: &Runtime, id: u32, key: Key, now: Instant) -> Result<()> {
    if rt.rpc.borrow().servers.contains_key(&id) {
        return idle_scan(lua, rt, id, key, now);
    }
    let due = matches!(rt.rpc.borrow().clients.get(&id), Some(c) if c.phase == Phase::Down && c.reconnect.is_some());
    if due {
        rt.driver.borrow_mut().close(key);
        rt.rpc.borrow_mut().by_key.remove(&key);
        if let Some(c) = rt.rpc.borrow_mut().clients.get_mut(&id) {
            c.key = None;
        }
        return start_client(lua, rt, id, now);
    }
    // A waiting `fetch` ran out of time: resume it (it reports the timeout).
    let mut st = rt.rpc.borrow_mut();
    let Some(c) = st.clients.get_mut(&id) else { return Ok(()) };
    let mut next: Option<Instant> = None;
    for call in c.calls.values_mut() {
        if let Call::Waiting { thread, deadline } = call {
            if *deadline <= now {
                if let Some(t) = thread.take() {
                    rt.sched.borrow_mut().jobs.push_back(t);
                }
            } else {
                next = Some(next.map_or(*deadline, |n| n.min(*deadline)));
            }
        }
    }
    drop(st);
    arm_calls(rt, key, next, now);
    Ok(())
}

/// Makes the client entry wake up at `at` (a waiting `fetch`'s deadline).
fn arm_calls(rt: &Runtime, key: Key, at: Option<Instant>, now: Instant) {
    let Some(at) = at else { return };
    let mut driver = rt.driver.borrow_mut();
    if let Ok(ep) = driver.rpc(key) {
        ep.extra = Some(ep.extra.map_or(at, |e| e.min(at)));
        driver.rpc_flush(key, now, &mut Vec::new());
    }
}

// ---------------------------------------------------------------------------------------------
// Server side

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

/// The addresses to try, in order: `*` is every interface (an IPv6 socket that also takes IPv4,
/// or IPv4 alone where IPv6 is off).
fn bind_hosts(call: &str, host: &str) -> Result<Vec<IpAddr>> {
    match host {
        "localhost" => Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]),
        "*" => Ok(vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED), IpAddr::V4(Ipv4Addr::UNSPECIFIED)]),
        _ => parse_ip(host).map(|ip| vec![ip]).ok_or_else(|| {
            misuse(call, format!("'host' must be an IP address, \"localhost\" or \"*\", got '{host}'"))
        }),
    }
}

fn new_app(lua: &Lua, config: Value) -> Result<Table> {
    const CALL: &str = "luna.new_app(config)";
    let o = Options::new(CALL, config, APP_KEYS)?;
    let name = o.string("name")?.unwrap_or_else(|| "unknown name".into());
    let host = o.string("host")?.unwrap_or_else(|| "127.0.0.1".into());
    let ips = bind_hosts(CALL, &host)?;
    let port = o.port("port")?.ok_or_else(|| misuse(CALL, "'port' is required (0 picks a free port)"))?;
    let max_ip = match o.number("max_ip_connected")? {
        None => DEFAULT_MAX_IP,
        Some(n) if n >= 0.0 && n.fract() == 0.0 => n as usize,
        Some(n) => {
            return Err(misuse(CALL, format!("'max_ip_connected' must be a whole number >= 0, got {n}")))
        }
    };
    let policy = Rc::new(Policy {
        label: format!("app '{name}'"),
        no_errors: o.boolean("no_errors")?.unwrap_or(false),
        handler: key_of(lua, o.function("error_handler")?)?,
        debug: o.boolean("debug")?.unwrap_or(true),
    });
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
    let mut server =
        Server::new(rpc::Config { encryption, max_message_size, ..Default::default() }, seed, secret);
    server.set_max_per_ip(max_ip);
    let public_key = to_hex(&server.public_key());
    let now = Instant::now();
    let addrs: Vec<SocketAddr> = ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect();
    let key = rt
        .driver
        .borrow_mut()
        .rpc_open(&addrs, Proto::Server(Box::new(server)), now)
        .map_err(|e| misuse(CALL, format!("cannot listen on {host}:{port}: {e}")))?;
    let local = rt.driver.borrow_mut().rpc(key)?.local;
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
            conns: HashMap::new(),
            blocked: HashMap::new(),
            banned: HashMap::new(),
        },
    );
    Ok(table)
}

/// Finds an app by its table (`__id`) or name.
fn app_id(rt: &Runtime, call: &str, x: &Value, side: Side) -> Result<Option<u32>> {
    let st = rt.rpc.borrow();
    let exists = |id: u32| match side {
        Side::Server => st.servers.contains_key(&id),
        Side::Client => st.clients.contains_key(&id),
    };
    match x {
        Value::Table(t) => {
            let id: Option<u32> = t.raw_get("__id")?;
            Ok(id.filter(|&id| exists(id)))
        }
        Value::String(s) => {
            let name = s.to_str()?;
            Ok(match side {
                Side::Server => st.servers.iter().find(|(_, a)| a.name == *name).map(|(&id, _)| id),
                Side::Client => st.clients.iter().filter(|(_, a)| a.name == *name).map(|(&id, _)| id).min(),
            })
        }
        other => Err(bad_arg(call, "app", "an app or its name", other)),
    }
}

fn remove_app(lua: &Lua, x: Value) -> Result<(bool, Option<String>)> {
    let rt = runtime(lua)?;
    let Some(id) = app_id(&rt, "luna.remove_app(app or name)", &x, Side::Server)? else {
        return Ok((false, Some("App not found".into())));
    };
    remove_server(lua, &rt, id)?;
    Ok((true, None))
}

/// Removes a server app: unregistered first (what its callbacks call cannot reach it again),
/// sessions closed with "Server app removed" after what is queued for them went out, then
/// `close_client` once for every client record it had.
fn remove_server(lua: &Lua, rt: &Runtime, id: u32) -> Result<()> {
    let app = {
        let mut st = rt.rpc.borrow_mut();
        let Some(app) = st.servers.remove(&id) else { return Ok(()) };
        st.by_key.remove(&app.key);
        app
    };
    let now = Instant::now();
    let mut events = Vec::new();
    {
        let mut driver = rt.driver.borrow_mut();
        // Take in what already arrived (a session confirmed meanwhile is closed with the rest)
        // and send what is queued for the clients before the sessions close (closing drops it).
        driver.rpc_service(app.key, now, &mut events);
        let confirmed = events.iter().filter_map(|ev| match ev {
            RpcEvent::Server(ServerEvent::Connected { conn, .. }) => Some(*conn),
            _ => None,
        });
        let conns: Vec<ConnId> = app.conns.keys().copied().chain(confirmed).collect();
        if let Ok(Proto::Server(s)) = driver.rpc(app.key).map(|ep| &mut ep.proto) {
            for conn in conns {
                let _ = s.close(conn, "Server app removed");
            }
        }
        driver.rpc_flush(app.key, now, &mut events);
        driver.close(app.key);
    }
    let ServerApp { policy, table, new_client, close_client, timeout_client, conns, .. } = app;
    let mut result = Ok(());
    let close_client_fn = func(lua, &close_client)?;
    for k in [Some(table), new_client, close_client, timeout_client].into_iter().flatten() {
        lua.remove_registry_value(k)?;
    }
    for (conn, c) in conns {
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
    c: Conn,
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

fn server_event(lua: &Lua, rt: &Runtime, id: u32, key: Key, ev: ServerEvent, now: Instant) -> Result<()> {
    match ev {
        ServerEvent::Connected { conn, addr } => {
            let addr = canonical(addr);
            let (banned, policy) = {
                let mut st = rt.rpc.borrow_mut();
                let Some(app) = st.servers.get_mut(&id) else { return Ok(()) };
                app.banned.retain(|_, until| *until > now);
                (app.banned.contains_key(&addr.ip()), app.policy.clone())
            };
            if banned {
                if let Proto::Server(s) = &mut rt.driver.borrow_mut().rpc(key)?.proto {
                    let _ = s.close(conn, "Client IP is temporarily banned");
                }
                return flush(lua, rt, key, now);
            }
            let ip = addr.ip().to_string();
            let client: Table = half(lua)?.get::<Function>("client_object")?.call((
                id,
                conn.to_u64() as f64,
                ip.as_str(),
                addr.port(),
            ))?;
            let cb = {
                let mut st = rt.rpc.borrow_mut();
                let Some(app) = st.servers.get_mut(&id) else { return Ok(()) };
                let handle = lua.create_registry_value(&client)?;
                app.conns.insert(conn, Conn { addr, last_active: now, handle });
                let at = now + app.disconnect_time;
                let mut driver = rt.driver.borrow_mut();
                let ep = driver.rpc(key)?;
                ep.extra = Some(ep.extra.map_or(at, |e| e.min(at)));
                func(lua, &app.new_client)?
            };
            flush(lua, rt, key, now)?;
            policy.log(lua, &format!("client {addr} connected"))?;
            if let Some(cb) = cb {
                if let Err(e) = cb.call::<()>(client) {
                    policy.report(lua, &format!("new_client: {}", message(&e)))?;
                }
            }
            Ok(())
        }
        ServerEvent::Message { conn, data } => {
            let Ok(Envelope::Request { id: rid, path, args, .. }) = Envelope::decode(&data) else {
                return Ok(());
            };
            let (client, table, blocked) = {
                let mut st = rt.rpc.borrow_mut();
                let Some(app) = st.servers.get_mut(&id) else { return Ok(()) };
                let Some(c) = app.conns.get_mut(&conn) else { return Ok(()) };
                c.last_active = now;
                let ip = c.addr.ip();
                let client: Table = lua.registry_value(&c.handle)?;
                app.blocked.retain(|_, until| *until > now);
                let blocked =
                    app.blocked.contains_key(&ip).then(|| format!("Client IP {ip} is temporarily blocked"));
                (client, lua.registry_value::<Table>(&app.table)?, blocked)
            };
            if let Some(msg) = blocked {
                return send_response(lua, rt, id, conn, rid, Err(&msg));
            }
            let args = match decode(lua, args) {
                Ok(v) => v,
                Err(e) => return send_response(lua, rt, id, conn, rid, Err(&message(&e))),
            };
            let request: Function = half(lua)?.get("request")?;
            request.call::<()>((table, client, rid, path, args, data.len()))
        }
        ServerEvent::Disconnected { conn, reason } => {
            let (c, cb, policy) = {
                let mut st = rt.rpc.borrow_mut();
                let Some(app) = st.servers.get_mut(&id) else { return Ok(()) };
                let Some(c) = app.conns.remove(&conn) else { return Ok(()) };
                (c, func(lua, &app.close_client)?, app.policy.clone())
            };
            client_left(lua, &policy, cb.as_ref(), c, &reason.to_string())
        }
    }
}

/// Offers idle clients to `timeout_client` and closes the ones it does not keep.
fn idle_scan(lua: &Lua, rt: &Runtime, id: u32, key: Key, now: Instant) -> Result<()> {
    let (idle, dt, cb, policy) = {
        let st = rt.rpc.borrow();
        let Some(app) = st.servers.get(&id) else { return Ok(()) };
        let dt = app.disconnect_time;
        let idle: Vec<(ConnId, Duration)> = app
            .conns
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
                match st.servers.get(&id).and_then(|a| a.conns.get(&conn)) {
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
            if let Some(c) = rt.rpc.borrow_mut().servers.get_mut(&id).and_then(|a| a.conns.get_mut(&conn)) {
                c.last_active = now;
            }
        } else if let Proto::Server(s) = &mut rt.driver.borrow_mut().rpc(key)?.proto {
            let _ = s.close(conn, "idle timeout");
        }
    }
    let next = {
        let st = rt.rpc.borrow();
        let Some(app) = st.servers.get(&id) else { return result };
        app.conns.values().map(|c| c.last_active + app.disconnect_time).min()
    };
    rt.driver.borrow_mut().rpc(key)?.extra = next.map(|at| at.max(now + Duration::from_millis(1)));
    flush(lua, rt, key, now)?;
    result
}

fn server_key(rt: &Runtime, id: u32) -> Option<Key> {
    rt.rpc.borrow().servers.get(&id).map(|a| a.key)
}

fn send_response(
    lua: &Lua,
    rt: &Runtime,
    id: u32,
    conn: ConnId,
    rid: u32,
    result: std::result::Result<&[u8], &str>,
) -> Result<()> {
    let Some(key) = server_key(rt, id) else { return Ok(()) };
    let mut msg = Vec::new();
    Envelope::Response { id: rid, result }.encode(&mut msg);
    if let Proto::Server(s) = &mut rt.driver.borrow_mut().rpc(key)?.proto {
        let _ = s.send(conn, &msg);
    }
    flush(lua, rt, key, Instant::now())
}

/// `core.respond(app, conn, id, ok, value)`: the answer to a request.
fn respond(lua: &Lua, (id, conn, rid, ok, value): (u32, f64, u32, bool, Value)) -> Result<()> {
    let rt = runtime(lua)?;
    let conn = ConnId::from_u64(conn as u64);
    if !ok {
        let text = match &value {
            Value::String(s) => s.to_string_lossy(),
            other => format!("{other:?}"),
        };
        return send_response(lua, &rt, id, conn, rid, Err(&text));
    }
    let mut out = Vec::new();
    match encode(&value, &mut out) {
        Ok(()) => send_response(lua, &rt, id, conn, rid, Ok(&out)),
        Err(e) => {
            let msg = format!("cannot encode the result: it contains {e}");
            send_response(lua, &rt, id, conn, rid, Err(&msg))?;
            let policy = rt.rpc.borrow().servers.get(&id).map(|a| a.policy.clone());
            match policy {
                Some(p) => p.report(lua, &msg),
                None => Ok(()),
            }
        }
    }
}

/// `client:send(message)`.
fn push(lua: &Lua, (id, conn, value): (u32, f64, Value)) -> Result<(bool, Option<String>)> {
    let rt = runtime(lua)?;
    let payload = encode_for("client:send(message)", "message", &value)?;
    let Some(key) = server_key(&rt, id) else { return Ok((false, Some("app removed".into()))) };
    let mut msg = Vec::new();
    Envelope::Push(&payload).encode(&mut msg);
    let sent = match &mut rt.driver.borrow_mut().rpc(key)?.proto {
        Proto::Server(s) => s.send(ConnId::from_u64(conn as u64), &msg),
        Proto::Client(_) => Ok(()),
    };
    flush(lua, &rt, key, Instant::now())?;
    Ok(match sent {
        Ok(()) => (true, None),
        Err(e) => (false, Some(e.to_string())),
    })
}

/// `client:close()` on the server.
fn close_conn(lua: &Lua, (id, conn): (u32, f64)) -> Result<()> {
    let rt = runtime(lua)?;
    let Some(key) = server_key(&rt, id) else { return Ok(()) };
    close_session(lua, &rt, key, ConnId::from_u64(conn as u64), "Closed by server")
}

/// Closes one client's session after sending what is already queued for it (answers queued in
/// this update would otherwise be dropped with the session).
fn close_session(lua: &Lua, rt: &Runtime, key: Key, conn: ConnId, reason: &str) -> Result<()> {
    let now = Instant::now();
    let mut events = Vec::new();
    {
        let mut driver = rt.driver.borrow_mut();
        driver.rpc_flush(key, now, &mut events);
        if let Proto::Server(s) = &mut driver.rpc(key)?.proto {
            let _ = s.close(conn, reason);
        }
    }
    // Lua runs only now, after the driver work (it may remove the app).
    handle_events(lua, rt, key, events, now)?;
    flush(lua, rt, key, now)
}

/// `core.penalty(app, conn, kind, seconds, reason)`: a handler's `max_message_size` was exceeded.
fn penalty(lua: &Lua, (id, conn, kind, seconds, reason): (u32, f64, String, f64, String)) -> Result<()> {
    let rt = runtime(lua)?;
    let now = Instant::now();
    let conn = ConnId::from_u64(conn as u64);
    let until = now + Duration::try_from_secs_f64(seconds).unwrap_or(DEFAULT_BAN);
    let key = {
        let mut st = rt.rpc.borrow_mut();
        let Some(app) = st.servers.get_mut(&id) else { return Ok(()) };
        let Some(ip) = app.conns.get(&conn).map(|c| c.addr.ip()) else { return Ok(()) };
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
        for c in app.conns.values() {
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
            Ok(values) => done_fn.call::<()>((true, values.into_iter().next().unwrap_or(Value::Nil))),
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

/// `core.set(id, call, name, n)`: the reliability and idle knobs of an app or client.
fn set(lua: &Lua, (id, call, name, n): (u32, String, String, Value)) -> Result<()> {
    let rt = runtime(lua)?;
    let number = match n {
        Value::Integer(i) => i as f64,
        Value::Number(x) => x,
        other => return Err(misuse(&call, format!("'n' must be a number, got {}", lua_type(&other)))),
    };
    if !(number.is_finite() && number > 0.0) {
        return Err(misuse(&call, format!("'n' must be a number > 0, got {number}")));
    }
    let seconds = Duration::from_secs_f64(number);
    let whole = number.max(1.0) as u64;
    let apply = |config: &mut rpc::Config| match name.as_str() {
        "set_max_message_size" => config.max_message_size = whole as usize,
        "set_max_retries" => config.max_retries = whole as u32,
        _ => config.message_timeout = seconds,
    };
    let now = Instant::now();
    let mut st = rt.rpc.borrow_mut();
    if let Some(app) = st.servers.get_mut(&id) {
        let key = app.key;
        if name == "set_disconnect_time" {
            app.disconnect_time = seconds;
            drop(st);
            return idle_scan(lua, &rt, id, key, now);
        }
        drop(st);
        let mut driver = rt.driver.borrow_mut();
        if let Proto::Server(s) = &mut driver.rpc(key)?.proto {
            apply(s.config_mut());
        }
        return Ok(());
    }
    let Some(app) = st.clients.get_mut(&id) else { return Err(misuse(&call, "the app was removed")) };
    apply(&mut app.config);
    let Some(key) = app.key else { return Ok(()) };
    drop(st);
    if let Proto::Client(Some(c)) = &mut rt.driver.borrow_mut().rpc(key)?.proto {
        apply(c.config_mut());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Client side

const CLIENT_KEYS: &[&str] = &[
    "name",
    "host",
    "port",
    "no_errors",
    "error_handler",
    "listener",
    "server",
    "reconnect_time",
    "connect_server",
    "disconnect_server",
    "encryption",
    "server_key",
    "debug",
    "max_message_size",
];

fn connect_to_app(lua: &Lua, config: Value) -> Result<Table> {
    const CALL: &str = "lunac.connect_to_app(config)";
    let o = Options::new(CALL, config, CLIENT_KEYS)?;
    let name = o.string("name")?.unwrap_or_else(|| "unknown name".into());
    let host = o.string("host")?.ok_or_else(|| misuse(CALL, "'host' is required"))?;
    let port = o.port("port")?.ok_or_else(|| misuse(CALL, "'port' is required"))?;
    if port == 0 {
        return Err(misuse(CALL, "'port' must be the server's port (1-65535), got 0"));
    }
    o.table("server")?;
    let pinned = match o.string("server_key")? {
        None => None,
        Some(hex) => Some(from_hex(&hex).ok_or_else(|| {
            misuse(CALL, "'server_key' must be the server's public key: 64 hex digits (app.public_key)")
        })?),
    };
    let policy = Rc::new(Policy {
        label: format!("client app '{name}'"),
        no_errors: o.boolean("no_errors")?.unwrap_or(false),
        handler: key_of(lua, o.function("error_handler")?)?,
        debug: o.boolean("debug")?.unwrap_or(true),
    });
    let encryption = o.boolean("encryption")?.unwrap_or(true);
    let max_message_size = o.size("max_message_size")?.unwrap_or(rpc::Config::default().max_message_size);
    let app = ClientApp {
        name: name.clone(),
        key: None,
        phase: Phase::Resolving,
        policy,
        table: lua.create_registry_value(Value::Nil)?,
        host: host.clone(),
        port,
        config: rpc::Config { encryption, max_message_size, ..Default::default() },
        pinned,
        reconnect: o.seconds("reconnect_time")?,
        listener: key_of(lua, o.function("listener")?)?,
        connect_server: key_of(lua, o.function("connect_server")?)?,
        disconnect_server: key_of(lua, o.function("disconnect_server")?)?,
        connected: false,
        calls: HashMap::new(),
        next_call: 0,
        early: Vec::new(),
    };
    let rt = runtime(lua)?;
    let id = rt.rpc.borrow().next_id + 1;
    let info = lua.create_table()?;
    info.set("name", name)?;
    info.set("host", host)?;
    info.set("port", port)?;
    let table: Table = half(lua)?.get::<Function>("client_app")?.call((id, info))?;
    let mut app = app;
    let old = std::mem::replace(&mut app.table, lua.create_registry_value(&table)?);
    lua.remove_registry_value(old)?;
    {
        let mut st = rt.rpc.borrow_mut();
        st.next_id = id;
        st.clients.insert(id, app);
    }
    start_client(lua, &rt, id, Instant::now())?;
    Ok(table)
}

/// Resolves the host (without blocking) and opens a session once it is known.
fn start_client(lua: &Lua, rt: &Runtime, id: u32, now: Instant) -> Result<()> {
    let host = {
        let mut st = rt.rpc.borrow_mut();
        let Some(c) = st.clients.get_mut(&id) else { return Ok(()) };
        // A new attempt: its end (even a failed lookup) is reported once more.
        c.phase = Phase::Resolving;
        c.host.clone()
    };
    let lookup = rt.driver.borrow_mut().lookup(&host, now);
    match lookup {
        Lookup::Pending => Ok(()),
        Lookup::Failed(err) => client_down(lua, rt, id, None, format!("cannot resolve '{host}': {err}"), now),
        Lookup::Done(ips) => {
            let Some(ip) = ips.first().copied() else {
                return client_down(lua, rt, id, None, format!("cannot resolve '{host}': no address"), now);
            };
            open_client(lua, rt, id, ip, now)
        }
    }
}

fn open_client(lua: &Lua, rt: &Runtime, id: u32, ip: IpAddr, now: Instant) -> Result<()> {
    let (config, pinned, port) = {
        let st = rt.rpc.borrow();
        let Some(c) = st.clients.get(&id) else { return Ok(()) };
        (c.config.clone(), c.pinned, c.port)
    };
    let server = SocketAddr::new(ip, port);
    let local: SocketAddr = match ip {
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let client = match Client::new(config, server, pinned, now, &SystemRandom::new()) {
        Ok(c) => c,
        Err(e) => return client_down(lua, rt, id, None, e.to_string(), now),
    };
    let opened = rt.driver.borrow_mut().rpc_open(&[local], Proto::Client(Some(Box::new(client))), now);
    let key = match opened {
        Ok(key) => key,
        Err(e) => return client_down(lua, rt, id, None, format!("cannot open a UDP socket: {e}"), now),
    };
    let (early, next) = {
        let mut st = rt.rpc.borrow_mut();
        st.by_key.insert(key, id);
        let Some(c) = st.clients.get_mut(&id) else { return Ok(()) };
        c.key = Some(key);
        c.phase = Phase::Open;
        let next = c
            .calls
            .values()
            .filter_map(|call| match call {
                Call::Waiting { deadline, .. } => Some(*deadline),
                _ => None,
            })
            .min();
        (std::mem::take(&mut c.early), next)
    };
    arm_calls(rt, key, next, now);
    if let Proto::Client(Some(c)) = &mut rt.driver.borrow_mut().rpc(key)?.proto {
        for msg in early {
            let _ = c.send(&msg);
        }
    }
    flush(lua, rt, key, now)
}

/// A host name some client apps were waiting for resolved (called by `tick`).
pub(crate) fn resolved(lua: &Lua, rt: &Runtime, host: &str, now: Instant) -> Result<()> {
    let waiting: Vec<u32> = rt
        .rpc
        .borrow()
        .clients
        .iter()
        .filter(|(_, c)| c.phase == Phase::Resolving && c.host == host)
        .map(|(&id, _)| id)
        .collect();
    for id in waiting {
        start_client(lua, rt, id, now)?;
    }
    Ok(())
}

/// The session of client app `id` ended (or never started): fail its calls, tell
/// `disconnect_server`, and either wait for `reconnect_time` or drop the socket. Each session
/// (each attempt) is reported once: a client already down is not reported again.
fn client_down(
    lua: &Lua,
    rt: &Runtime,
    id: u32,
    key: Option<Key>,
    reason: String,
    now: Instant,
) -> Result<()> {
    let (calls, cb, policy, reconnect) = {
        let mut st = rt.rpc.borrow_mut();
        let Some(c) = st.clients.get_mut(&id) else { return Ok(()) };
        if c.phase == Phase::Down {
            return Ok(());
        }
        c.connected = false;
        c.phase = Phase::Down;
        c.early.clear();
        let calls: Vec<(u32, Call)> = c.calls.drain().collect();
        (calls, func(lua, &c.disconnect_server)?, c.policy.clone(), c.reconnect)
    };
    let text = format!("Disconnected: {reason}");
    let mut callbacks = Vec::new();
    {
        let mut st = rt.rpc.borrow_mut();
        let mut sched = rt.sched.borrow_mut();
        let c = st.clients.get_mut(&id);
        let mut kept = HashMap::new();
        for (call, state) in calls {
            match state {
                Call::Waiting { thread, .. } => {
                    if let Some(t) = thread {
                        sched.jobs.push_back(t);
                    }
                    kept.insert(call, Call::Done(Err(text.clone())));
                }
                Call::Callback(f) => callbacks.push(f),
                Call::Done(r) => {
                    kept.insert(call, Call::Done(r));
                }
            }
        }
        if let Some(c) = c {
            c.calls = kept;
        }
    }
    if let Some(key) = key {
        match reconnect {
            Some(after) => {
                let mut driver = rt.driver.borrow_mut();
                let ep = driver.rpc(key)?;
                ep.proto = Proto::Client(None);
                ep.extra = Some(now + after);
                driver.rpc_flush(key, now, &mut Vec::new());
            }
            None => {
                rt.driver.borrow_mut().close(key);
                let mut st = rt.rpc.borrow_mut();
                st.by_key.remove(&key);
                if let Some(c) = st.clients.get_mut(&id) {
                    c.key = None;
                }
            }
        }
    }
    report_down(lua, &policy, callbacks, cb, &reason)
}

/// Tells a client app's `noawait_fetch` callbacks and `disconnect_server` that its session ended
/// (the app's state already says so: whatever they call sees it).
fn report_down(
    lua: &Lua,
    policy: &Policy,
    callbacks: Vec<RegistryKey>,
    disconnect_server: Option<Function>,
    reason: &str,
) -> Result<()> {
    let text = format!("Disconnected: {reason}");
    let mut result = policy.log(lua, &format!("disconnected: {reason}"));
    for f in callbacks {
        let cb: Function = lua.registry_value(&f)?;
        lua.remove_registry_value(f)?;
        if let Err(e) = cb.call::<()>((Value::Nil, text.as_str())) {
            result = result.and(policy.report(lua, &format!("noawait_fetch callback: {}", message(&e))));
        }
    }
    if let Some(cb) = disconnect_server {
        if let Err(e) = cb.call::<()>(reason) {
            result = result.and(policy.report(lua, &format!("disconnect_server: {}", message(&e))));
        }
    }
    result
}

fn client_event(lua: &Lua, rt: &Runtime, id: u32, key: Key, ev: ClientEvent, now: Instant) -> Result<()> {
    match ev {
        ClientEvent::Connected => {
            let (cb, policy, server) = {
                let mut st = rt.rpc.borrow_mut();
                let Some(c) = st.clients.get_mut(&id) else { return Ok(()) };
                c.connected = true;
                (func(lua, &c.connect_server)?, c.policy.clone(), format!("{}:{}", c.host, c.port))
            };
            policy.log(lua, &format!("connected to {server}"))?;
            if let Some(cb) = cb {
                if let Err(e) = cb.call::<()>(()) {
                    policy.report(lua, &format!("connect_server: {}", message(&e)))?;
                }
            }
            Ok(())
        }
        ClientEvent::Disconnected(reason) => client_down(lua, rt, id, Some(key), reason.to_string(), now),
        ClientEvent::Message(data) => match Envelope::decode(&data) {
            Ok(Envelope::Response { id: call, result }) => {
                let result = result.map(<[u8]>::to_vec).map_err(str::to_owned);
                let (cb, policy) = {
                    let mut st = rt.rpc.borrow_mut();
                    let Some(c) = st.clients.get_mut(&id) else { return Ok(()) };
                    let policy = c.policy.clone();
                    match c.calls.remove(&call) {
                        Some(Call::Waiting { thread, .. }) => {
                            if let Some(t) = thread {
                                rt.sched.borrow_mut().jobs.push_back(t);
                            }
                            c.calls.insert(call, Call::Done(result));
                            return Ok(());
                        }
                        Some(Call::Callback(f)) => (f, policy),
                        Some(done @ Call::Done(_)) => {
                            c.calls.insert(call, done);
                            return Ok(());
                        }
                        None => return Ok(()),
                    }
                };
                let f: Function = lua.registry_value(&cb)?;
                lua.remove_registry_value(cb)?;
                let r = match result {
                    Ok(bytes) => match decode(lua, &bytes) {
                        Ok(v) => f.call::<()>(v),
                        Err(e) => f.call::<()>((Value::Nil, message(&e))),
                    },
                    Err(e) => f.call::<()>((Value::Nil, e)),
                };
                if let Err(e) = r {
                    policy.report(lua, &format!("noawait_fetch callback: {}", message(&e)))?;
                }
                Ok(())
            }
            Ok(Envelope::Push(payload)) => {
                let (cb, policy) = {
                    let st = rt.rpc.borrow();
                    let Some(c) = st.clients.get(&id) else { return Ok(()) };
                    (func(lua, &c.listener)?, c.policy.clone())
                };
                if let Some(cb) = cb {
                    let value = match decode(lua, payload) {
                        Ok(v) => v,
                        Err(e) => return policy.network(lua, &message(&e)),
                    };
                    if let Err(e) = cb.call::<()>(value) {
                        policy.report(lua, &format!("listener: {}", message(&e)))?;
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        },
    }
}

/// Starts a call; `Ok(Err(text))` when the client cannot send.
fn start_call(
    lua: &Lua,
    call_name: &str,
    id: u32,
    path: &Value,
    args: &Value,
    noawait: bool,
    state: Call,
) -> Result<std::result::Result<u32, String>> {
    let Value::String(path) = path else { return Err(bad_arg(call_name, "path", "a string", path)) };
    let path = path.to_str()?.to_owned();
    if !matches!(args, Value::Nil | Value::Table(_)) {
        return Err(bad_arg(call_name, "args", "a table or nil", args));
    }
    let encoded = encode_for(call_name, "args", args)?;
    let rt = runtime(lua)?;
    let rt = &*rt;
    let mut st = rt.rpc.borrow_mut();
    let Some(c) = st.clients.get_mut(&id) else { return Ok(Err("Not connected to server".into())) };
    if c.phase == Phase::Down {
        return Ok(Err("Not connected to server".into()));
    }
    c.next_call = c.next_call.wrapping_add(1);
    let call = c.next_call;
    let mut msg = Vec::new();
    Envelope::Request { id: call, path: &path, args: &encoded, noawait }.encode(&mut msg);
    let key = c.key;
    match key {
        None => c.early.push(msg),
        Some(key) => {
            let sent = match &mut rt.driver.borrow_mut().rpc(key)?.proto {
                Proto::Client(Some(client)) => client.send(&msg),
                _ => Err(rpc::Error::NotConnected),
            };
            if let Err(e) = sent {
                return Ok(Err(e.to_string()));
            }
        }
    }
    let deadline = match &state {
        Call::Waiting { deadline, .. } => Some(*deadline),
        _ => None,
    };
    c.calls.insert(call, state);
    drop(st);
    if let (Some(key), Some(at)) = (key, deadline) {
        let mut driver = rt.driver.borrow_mut();
        let ep = driver.rpc(key)?;
        ep.extra = Some(ep.extra.map_or(at, |e| e.min(at)));
    }
    if let Some(key) = key {
        flush(lua, rt, key, Instant::now())?;
    }
    Ok(Ok(call))
}

fn timeout_of(call: &str, v: &Value) -> Result<Duration> {
    let secs = match v {
        Value::Nil => DEFAULT_FETCH_TIMEOUT,
        Value::Integer(i) => *i as f64,
        Value::Number(n) => *n,
        other => return Err(bad_arg(call, "timeout", "a number of seconds or nil", other)),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(misuse(call, format!("'timeout' must be a number of seconds > 0, got {secs}")));
    }
    Ok(Duration::from_secs_f64(secs))
}

const FETCH: &str = "client:fetch(path, args, timeout)";

/// `core.fetch_start(id, path, args, timeout, co)` → call id or `nil, err`.
fn fetch_start(
    lua: &Lua,
    (id, path, args, timeout, co): (u32, Value, Value, Value, Thread),
) -> Result<(Option<u32>, Option<String>)> {
    let deadline = Instant::now() + timeout_of(FETCH, &timeout)?;
    let thread = lua.create_registry_value(co)?;
    let state = Call::Waiting { thread: Some(thread), deadline };
    Ok(match start_call(lua, FETCH, id, &path, &args, false, state)? {
        Ok(call) => (Some(call), None),
        Err(e) => (None, Some(e)),
    })
}

/// `core.fetch_result(id, call)` → `done, result, err`.
fn fetch_result(lua: &Lua, (id, call): (u32, u32)) -> Result<(bool, Value, Option<String>)> {
    let rt = runtime(lua)?;
    let state = {
        let mut st = rt.rpc.borrow_mut();
        // Only `disconnect_to_app` / `lunac.close()` remove a client app.
        let Some(c) = st.clients.get_mut(&id) else {
            return Ok((true, Value::Nil, Some("Disconnected: Close server".into())));
        };
        match c.calls.remove(&call) {
            None => return Ok((true, Value::Nil, Some("Disconnected".into()))),
            Some(Call::Waiting { thread, deadline }) if Instant::now() < deadline => {
                c.calls.insert(call, Call::Waiting { thread, deadline });
                return Ok((false, Value::Nil, None));
            }
            Some(other) => other,
        }
    };
    match state {
        Call::Waiting { thread, .. } => {
            if let Some(t) = thread {
                lua.remove_registry_value(t)?;
            }
            Ok((true, Value::Nil, Some("Request timed out".into())))
        }
        Call::Done(Ok(bytes)) => match decode(lua, &bytes) {
            Ok(v) => Ok((true, v, None)),
            Err(e) => Ok((true, Value::Nil, Some(message(&e)))),
        },
        Call::Done(Err(e)) => Ok((true, Value::Nil, Some(e))),
        Call::Callback(f) => {
            lua.remove_registry_value(f)?;
            Ok((true, Value::Nil, None))
        }
    }
}

/// `core.fetch_block(id, path, args, timeout)`: `fetch` outside a coroutine. Pumps the whole
/// runtime (a server in this process keeps serving), sleeping in the poll.
fn fetch_block(
    lua: &Lua,
    (id, path, args, timeout): (u32, Value, Value, Value),
) -> Result<(Value, Option<String>)> {
    let rt = runtime(lua)?;
    let deadline = Instant::now() + timeout_of(FETCH, &timeout)?;
    let state = Call::Waiting { thread: None, deadline };
    let call = match start_call(lua, FETCH, id, &path, &args, false, state)? {
        Ok(call) => call,
        Err(e) => return Ok((Value::Nil, Some(e))),
    };
    drop(rt);
    loop {
        let (done, value, err) = fetch_result(lua, (id, call))?;
        if done {
            return Ok((value, err));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        super::tick(lua, Some(left.min(Duration::from_millis(10))))?;
    }
}

/// `core.noawait(id, path, callback, args)` → call id or `nil, err`.
fn noawait(
    lua: &Lua,
    (id, path, callback, args): (u32, Value, Value, Value),
) -> Result<(Option<u32>, Option<String>)> {
    const CALL: &str = "client:noawait_fetch(path, callback, args)";
    let rt = runtime(lua)?;
    // The documentation's own example passes the args in the callback's place.
    let (callback, args) = match (callback, args) {
        (Value::Table(t), Value::Nil) => (Value::Nil, Value::Table(t)),
        other => other,
    };
    let state = match callback {
        Value::Nil => None,
        Value::Function(f) => Some(Call::Callback(lua.create_registry_value(f)?)),
        other => return Err(bad_arg(CALL, "callback", "a function or nil", &other)),
    };
    let has_state = state.is_some();
    let state = state.unwrap_or(Call::Done(Ok(Vec::new())));
    let r = start_call(lua, CALL, id, &path, &args, true, state)?;
    if let (Ok(call), false) = (&r, has_state) {
        // Nobody waits for this answer.
        if let Some(c) = rt.rpc.borrow_mut().clients.get_mut(&id) {
            c.calls.remove(call);
        }
    }
    Ok(match r {
        Ok(call) => (Some(call), None),
        Err(e) => (None, Some(e)),
    })
}

fn is_connected(lua: &Lua, id: u32) -> Result<bool> {
    Ok(runtime(lua)?.rpc.borrow().clients.get(&id).is_some_and(|c| c.connected))
}

fn disconnect_to_app(lua: &Lua, x: Value) -> Result<(bool, Option<String>)> {
    let rt = runtime(lua)?;
    let Some(id) = app_id(&rt, "lunac.disconnect_to_app(app or name)", &x, Side::Client)? else {
        return Ok((false, Some("App not found".into())));
    };
    remove_client(lua, &rt, id)?;
    Ok((true, None))
}

/// Removes a client app: unregistered first, so nothing its callbacks call can reach it again
/// (a nested close finds it gone), then told once: `disconnect_server("Close server")` unless its
/// session already ended and was reported.
fn remove_client(lua: &Lua, rt: &Runtime, id: u32) -> Result<()> {
    let Some(app) = rt.rpc.borrow_mut().clients.remove(&id) else { return Ok(()) };
    if let Some(key) = app.key {
        let mut driver = rt.driver.borrow_mut();
        if let Ok(Proto::Client(Some(c))) = driver.rpc(key).map(|ep| &mut ep.proto) {
            if !c.is_closed() {
                c.close("Close server");
            }
        }
        // The goodbye leaves now; its events are the app's, which is gone.
        driver.rpc_flush(key, Instant::now(), &mut Vec::new());
        driver.close(key);
        drop(driver);
        rt.rpc.borrow_mut().by_key.remove(&key);
    }
    let ClientApp { table, listener, connect_server, disconnect_server, calls, phase, policy, .. } = app;
    let cb = func(lua, &disconnect_server)?;
    for k in [Some(table), listener, connect_server, disconnect_server].into_iter().flatten() {
        lua.remove_registry_value(k)?;
    }
    let mut callbacks = Vec::new();
    for (_, call) in calls {
        match call {
            Call::Waiting { thread: Some(t), .. } => rt.sched.borrow_mut().jobs.push_back(t),
            Call::Callback(f) => callbacks.push(f),
            _ => {}
        }
    }
    if phase == Phase::Down {
        // Its end was reported when the session ended (no call was accepted since).
        return callbacks.into_iter().try_for_each(|f| lua.remove_registry_value(f));
    }
    report_down(lua, &policy, callbacks, cb, "Close server")
}

/// `luna.close()` / `lunac.close()`: removes every RPC app of that side.
pub(crate) fn close_all(lua: &Lua, rt: &Runtime, side: Side) -> Result<()> {
    let ids: Vec<u32> = match side {
        Side::Server => rt.rpc.borrow().servers.keys().copied().collect(),
        Side::Client => rt.rpc.borrow().clients.keys().copied().collect(),
    };
    let mut result = Ok(());
    for id in ids {
        let r = match side {
            Side::Server => remove_server(lua, rt, id),
            Side::Client => remove_client(lua, rt, id),
        };
        result = result.and(r);
    }
    result
}

/// Adds the RPC calls to `luna` (server) or `lunac` (client).
pub(crate) fn register(lua: &Lua, module: &Table, side: Side) -> Result<()> {
    match side {
        Side::Server => {
            module.set("new_app", lua.create_function(new_app)?)?;
            module.set("remove_app", lua.create_function(remove_app)?)?;
        }
        Side::Client => {
            module.set("connect_to_app", lua.create_function(connect_to_app)?)?;
            module.set("disconnect_to_app", lua.create_function(disconnect_to_app)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(lua: &Lua, src: &str) -> Value {
        let value: Value = lua.load(src).eval().unwrap();
        let mut bytes = Vec::new();
        encode(&value, &mut bytes).unwrap();
        decode(lua, &bytes).unwrap()
    }

    #[test]
    fn values_round_trip() {
        let lua = Lua::new();
        let v = round_trip(&lua, r#"return {1, 2.5, "a\0b", true, {x = {y = -7}}, ("z"):rep(70000)}"#);
        let t = v.as_table().unwrap();
        assert_eq!(t.raw_len(), 6);
        assert_eq!(t.get::<f64>(2).unwrap(), 2.5);
        assert_eq!(t.get::<mlua::String>(3).unwrap().as_bytes().as_ref(), b"a\0b");
        assert_eq!(t.get::<Table>(5).unwrap().get::<Table>("x").unwrap().get::<i64>("y").unwrap(), -7);
        assert_eq!(t.get::<mlua::String>(6).unwrap().as_bytes().len(), 70000);
    }

    #[test]
    fn unencodable_values_are_named() {
        let lua = Lua::new();
        let f: Value = lua.load("return {f = print}").eval().unwrap();
        assert!(encode(&f, &mut Vec::new()).unwrap_err().contains("function"));
        let cyclic: Value = lua.load("local t = {}; t.me = t; return t").eval().unwrap();
        assert!(encode(&cyclic, &mut Vec::new()).unwrap_err().contains("cyclic"));
    }

    #[test]
    fn hostile_bytes_never_panic_or_allocate_by_claimed_length() {
        let lua = Lua::new();
        // Claimed lengths far beyond the data.
        for bytes in [
            &[0xdd, 0xff, 0xff, 0xff, 0xff][..],
            &[0xdf, 0xff, 0xff, 0xff, 0xff],
            &[0xdb, 0xff, 0xff, 0xff, 0xff, 1],
        ] {
            assert!(decode(&lua, bytes).is_err());
        }
        // Deep nesting and a NaN key.
        assert!(decode(&lua, &[0x91; 200]).is_err());
        assert!(decode(&lua, &[0x81, 0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0, 0x01]).is_err());
        // Every prefix and random mutations of a valid message.
        let value: Value = lua.load(r#"return {1, "two", {3, {four = 4.5}}, true}"#).eval().unwrap();
        let mut good = Vec::new();
        encode(&value, &mut good).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for cut in 0..good.len() {
            let _ = decode(&lua, &good[..cut]);
        }
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % bytes.len();
                bytes[i] = (seed >> 32) as u8;
            }
            let _ = decode(&lua, &bytes);
        }
    }
}
