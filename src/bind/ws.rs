//! WebSocket apps: `luna.new_web_app` / `luna.remove_web_app` (server, handlers as coroutines)
//! and `lunac.connect_to_web_app` / `lunac.disconnect_to_web_app` (client, callbacks), and the
//! `ws` connection objects.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use mlua::{
    AnyUserData, Function, IntoLuaMulti, Lua, MetaMethod, MultiValue, RegistryKey, Result, Table, UserData,
    UserDataMethods, Value,
};

use super::error::{bad_arg, misuse};
use super::options::Options;
use super::policy::Policy;
use super::sched::{self, park_value};
use super::{runtime, Runtime, Side};
use crate::driver::ws::{Received, Settings, Stream, WsIo};
use crate::driver::{parse_ip, Key, Lookup};
use crate::proto::ws::{self as proto, Opcode, WsConfig, WsUrl};

const SERVER_KEYS: &[&str] = &[
    "name",
    "host",
    "port",
    "debug",
    "error_handler",
    "no_errors",
    "ssl",
    "protocols",
    "max_message_size",
    "ping_interval",
    "ping_timeout",
];
const CLIENT_KEYS: &[&str] = &[
    "name",
    "url",
    "debug",
    "error_handler",
    "no_errors",
    "protocol",
    "ssl",
    "on_connect",
    "on_message",
    "on_close",
    "max_message_size",
];

struct Server {
    name: String,
    policy: Rc<Policy>,
    handlers: HashMap<String, RegistryKey>,
    /// Open connections by handler name (`broadcast` goes to one group).
    groups: HashMap<String, HashSet<Key>>,
    listener: Option<Key>,
    /// Host name still being resolved before the listener can bind.
    pending: Option<(String, u16, Settings, Option<Arc<rustls::ServerConfig>>)>,
    app: RegistryKey,
}

struct Conn {
    server: u64,
    object: RegistryKey,
    group: String,
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
    settings: Settings,
    stream: Option<Key>,
    callbacks: [Option<RegistryKey>; 3],
}

const ON_CONNECT: usize = 0;
const ON_MESSAGE: usize = 1;
const ON_CLOSE: usize = 2;

#[derive(Default)]
pub(crate) struct WsState {
    servers: HashMap<u64, Server>,
    listeners: HashMap<Key, u64>,
    conns: HashMap<Key, Conn>,
    clients: HashMap<u64, Client>,
    client_streams: HashMap<Key, u64>,
    next_id: u64,
    /// Client failures found outside `update` (bad address…), reported by the next `update`.
    failed: Vec<(u64, String)>,
    /// Events produced by sends/closes outside `update`, dispatched by the next `update`.
    deferred: std::collections::VecDeque<WsIo>,
    tls_clients: HashMap<(Option<String>, bool), Arc<rustls::ClientConfig>>,
}

impl WsState {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// A server-side connection (`ws` in a protocol handler).
struct Ws(Key);
/// A client app (`lunac.connect_to_web_app`).
struct WsClient(u64);

fn opcode_arg(call: &str, value: &Value) -> Result<Opcode> {
    match value {
        Value::Nil => Ok(Opcode::Text),
        Value::Integer(1) => Ok(Opcode::Text),
        Value::Integer(2) => Ok(Opcode::Binary),
        Value::Number(n) if *n == 1.0 => Ok(Opcode::Text),
        Value::Number(n) if *n == 2.0 => Ok(Opcode::Binary),
        other => Err(bad_arg(call, "opcode", "opcodes.TEXT (1) or opcodes.BINARY (2)", other)),
    }
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

/// Fields users attach to `ws` / client objects (`on_close`, their own data).
fn fields(ud: &AnyUserData) -> Result<Table> {
    ud.user_value::<Table>()
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

/// Sends on a stream and writes at once; events it causes wait for the next update.
fn with_stream<R>(rt: &Runtime, key: Key, f: impl FnOnce(&mut Stream) -> R) -> Option<R> {
    let mut driver = rt.driver.borrow_mut();
    let result = f(driver.ws_stream(key).ok()?);
    let mut io = Vec::new();
    driver.ws_flush(key, Instant::now(), &mut io);
    drop(driver);
    rt.ws.borrow_mut().deferred.extend(io);
    Some(result)
}

fn send(rt: &Runtime, key: Key, op: Opcode, data: &[u8]) -> (Option<bool>, Option<String>) {
    match with_stream(rt, key, |s| s.send(op, data)) {
        Some(Ok(())) => (Some(true), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, Some("the connection is closed".into())),
    }
}

fn peer_info(lua: &Lua, rt: &Runtime, key: Key) -> Result<Value> {
    let driver = rt.driver.borrow();
    let Some(crate::driver::Entry::Ws(stream)) = driver.entry(key) else { return Ok(Value::Nil) };
    let t = lua.create_table()?;
    t.set("peer_ip", stream.peer.ip().to_string())?;
    t.set("peer_port", stream.peer.port())?;
    if let Some(local) = stream.local {
        t.set("local_ip", local.ip().to_string())?;
        t.set("local_port", local.port())?;
    }
    t.set("fd", stream.fd())?;
    t.set("protocol", stream.upgrade.protocol.clone())?;
    t.set("path", stream.upgrade.path.clone())?;
    t.set("query", stream.upgrade.query.clone())?;
    let headers = lua.create_table()?;
    for (name, value) in &stream.upgrade.headers {
        headers.set(name.as_str(), value.as_str())?;
    }
    t.set("headers", headers)?;
    if let Some(tls) = stream.tls() {
        let info = lua.create_table()?;
        info.set("version", tls.protocol_version())?;
        info.set("cipher", tls.cipher_suite())?;
        info.set("sni", tls.sni_hostname())?;
        t.set("tls", info)?;
    }
    Ok(Value::Table(t))
}

/// The handle inside a server-side `ws` object: the object itself is a Lua table (lua/luna.lua),
/// so method lookups and user fields (`ws.on_close`) never cross into Rust.
impl UserData for Ws {}

fn key_of(h: &AnyUserData) -> Result<Key> {
    Ok(h.borrow::<Ws>()?.0)
}

/// `core.ws_send(h, data, opcode)`.
fn ws_send(lua: &Lua, (h, data, op): (AnyUserData, Value, Value)) -> Result<(Option<bool>, Option<String>)> {
    let call = "ws:send(data, opcode)";
    let (key, op, rt) = (key_of(&h)?, opcode_arg(call, &op)?, runtime(lua)?);
    with_data(call, &data, |data| send(&rt, key, op, data))
}

/// `core.ws_close(h, code, reason)`.
fn ws_close(lua: &Lua, (h, code, reason): (AnyUserData, Value, Option<String>)) -> Result<bool> {
    let code = close_code("ws:close(code, reason)", &code)?;
    with_stream(&*runtime(lua)?, key_of(&h)?, |s| s.close(code, reason.as_deref().unwrap_or("")));
    Ok(true)
}

/// `core.ws_broadcast(h, data, opcode)`: encodes the frame once for the whole group.
fn ws_broadcast(lua: &Lua, (h, data, op): (AnyUserData, Value, Value)) -> Result<usize> {
    let call = "ws:broadcast(data, opcode)";
    let (key, op, rt) = (key_of(&h)?, opcode_arg(call, &op)?, runtime(lua)?);
    let frame = with_data(call, &data, |data| proto::encode_frame(op, data))?.map_err(|e| misuse(call, e))?;
    let members: Vec<Key> = {
        let ws = rt.ws.borrow();
        let Some(conn) = ws.conns.get(&key) else { return Ok(0) };
        let server = &ws.servers[&conn.server];
        server.groups.get(&conn.group).map(|g| g.iter().copied().collect()).unwrap_or_default()
    };
    let mut sent = 0;
    for member in members {
        if let Some(Ok(())) = with_stream(&rt, member, |s| s.send_encoded(&frame)) {
            sent += 1;
        }
    }
    Ok(sent)
}

/// `core.ws_peer(h)` → ip, port (nil once released).
fn ws_peer(lua: &Lua, h: AnyUserData) -> Result<(Option<String>, Option<u16>)> {
    let rt = runtime(lua)?;
    let mut driver = rt.driver.borrow_mut();
    Ok(match driver.ws_stream(key_of(&h)?) {
        Ok(stream) => (Some(stream.peer.ip().to_string()), Some(stream.peer.port())),
        Err(_) => (None, None),
    })
}

/// `core.ws_info(h)`: the `ws.raw_socket` table.
fn ws_info(lua: &Lua, h: AnyUserData) -> Result<Value> {
    peer_info(lua, &*runtime(lua)?, key_of(&h)?)
}

impl UserData for WsClient {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("send", |lua, this, (data, op): (Value, Value)| {
            let call = "app:send(data, opcode)";
            let (op, rt) = (opcode_arg(call, &op)?, runtime(lua)?);
            let stream = rt.ws.borrow().clients.get(&this.0).and_then(|c| c.stream);
            with_data(call, &data, |data| match stream {
                Some(key) => send(&rt, key, op, data),
                None => (None, Some("not connected".to_owned())),
            })
        });
        methods.add_method("close", |lua, this, (code, reason): (Value, Option<String>)| {
            let code = close_code("app:close(code, reason)", &code)?;
            disconnect(&*runtime(lua)?, this.0, code, reason.as_deref().unwrap_or(""));
            Ok(true)
        });
        methods.add_meta_function(MetaMethod::Index, |lua, (ud, key): (AnyUserData, Value)| {
            let id = ud.borrow::<WsClient>()?.0;
            if let Value::String(name) = &key {
                let rt = runtime(lua)?;
                let ws = rt.ws.borrow();
                match (name.as_bytes().as_ref(), ws.clients.get(&id)) {
                    (b"opcodes", _) => return Ok(Value::Table(opcodes(lua)?)),
                    (b"name", Some(c)) => return lua.create_string(&c.name).map(Value::String),
                    (b"connected", c) => {
                        let open = c
                            .and_then(|c| c.stream)
                            .is_some_and(|k| rt.driver.borrow_mut().ws_stream(k).is_ok_and(|s| s.is_open()));
                        return Ok(Value::Boolean(open));
                    }
                    _ => {}
                }
            }
            fields(&ud)?.raw_get(key)
        });
        methods
            .add_meta_function(MetaMethod::NewIndex, |_, (ud, key, value): (AnyUserData, Value, Value)| {
                fields(&ud)?.raw_set(key, value)
            });
    }
}

fn new_object<T: UserData + 'static>(lua: &Lua, value: T) -> Result<AnyUserData> {
    let ud = lua.create_userdata(value)?;
    ud.set_user_value(lua.create_table()?)?;
    Ok(ud)
}

/// The address a server binds: `*` is every interface (IPv6 socket that also takes IPv4).
fn bind_addresses(host: &str, port: u16) -> Option<Vec<SocketAddr>> {
    match host {
        "*" => Some(vec![
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
        ]),
        "localhost" => Some(vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)]),
        other => parse_ip(other).map(|ip| vec![SocketAddr::new(ip, port)]),
    }
}

fn settings(opts: &Options, ws_default: WsConfig) -> Result<Settings> {
    let mut settings = Settings { ws: ws_default, ..Settings::default() };
    if let Some(size) = opts.size("max_message_size")? {
        settings.ws.max_message_size = size;
        settings.ws.max_frame_size = settings.ws.max_frame_size.min(size);
    }
    settings.ping_interval = opts.seconds("ping_interval")?;
    if let Some(timeout) = opts.seconds("ping_timeout")? {
        settings.ping_timeout = timeout;
    }
    Ok(settings)
}

fn policy(opts: &Options, lua: &Lua, label: String) -> Result<Rc<Policy>> {
    Ok(Rc::new(Policy {
        label,
        no_errors: opts.boolean("no_errors")?.unwrap_or(false),
        handler: opts.function("error_handler")?.map(|f| lua.create_registry_value(f)).transpose()?,
        debug: opts.boolean("debug")?.unwrap_or(true),
    }))
}

fn bind_listener(
    rt: &Runtime,
    addrs: &[SocketAddr],
    tls: Option<Arc<rustls::ServerConfig>>,
    handlers: Vec<String>,
    settings: Settings,
) -> std::result::Result<(Key, SocketAddr), String> {
    let mut driver = rt.driver.borrow_mut();
    let mut last = String::new();
    for addr in addrs {
        match driver.ws_listen(*addr, tls.clone(), handlers.clone(), settings.clone()) {
            Ok(key) => {
                let Some(crate::driver::Entry::WsListener(l)) = driver.entry(key) else { unreachable!() };
                let local = l.socket.local_addr().map_err(|e| e.to_string())?;
                return Ok((key, local));
            }
            Err(e) => last = format!("cannot listen on {addr}: {e}"),
        }
    }
    Err(last)
}

/// `luna.new_web_app(config)`.
fn new_web_app(lua: &Lua, config: Value) -> Result<Table> {
    let call = "luna.new_web_app(config)";
    let opts = Options::new(call, config, SERVER_KEYS)?;
    let name = opts.string("name")?.unwrap_or_else(|| "unknown name".into());
    let host = opts.string("host")?.unwrap_or_else(|| "*".into());
    let port = opts.port("port")?.unwrap_or(80);
    let Some(protocols) = opts.table("protocols")? else {
        return Err(misuse(
            call,
            "'protocols' must be a table of handler functions, e.g. {default = function(ws) ... end}",
        ));
    };
    let rt = runtime(lua)?;
    if rt.ws.borrow().servers.values().any(|s| s.name == name) {
        return Err(misuse(call, format!("a web app named '{name}' already exists")));
    }
    let mut handlers = HashMap::new();
    for pair in protocols.pairs::<Value, Value>() {
        match pair? {
            (Value::String(k), Value::Function(f)) => {
                handlers.insert(k.to_str()?.to_owned(), lua.create_registry_value(f)?);
            }
            (k, v) => {
                return Err(misuse(
                    call,
                    format!(
                        "'protocols' maps protocol names to handler functions; got {} = {}",
                        super::error::lua_type(&k),
                        super::error::lua_type(&v)
                    ),
                ))
            }
        }
    }
    if handlers.is_empty() {
        return Err(misuse(call, "'protocols' has no handler"));
    }
    let tls = match opts.table("ssl")? {
        None => None,
        Some(ssl) => {
            let ssl = Options::new(call, Value::Table(ssl), &["cert", "key"])?;
            let (Some(cert), Some(key)) = (ssl.string("cert")?, ssl.string("key")?) else {
                return Err(misuse(call, "'ssl' needs both 'cert' and 'key' (PEM file paths)"));
            };
            Some(
                proto::TlsServerConfig::from_pem_files(&cert, &key)
                    .map_err(|e| misuse(call, format!("ssl: {e}")))?,
            )
        }
    };
    let settings = settings(&opts, WsConfig::default())?;
    let policy = policy(&opts, lua, format!("web-app '{name}'"))?;
    let names: Vec<String> = handlers.keys().cloned().collect();

    let app = lua.create_table()?;
    app.set("name", name.as_str())?;
    app.set("host", host.as_str())?;
    app.set("opcodes", opcodes(lua)?)?;
    let (listener, pending) = match bind_addresses(&host, port) {
        Some(addrs) => {
            let (key, local) =
                bind_listener(&rt, &addrs, tls, names, settings).map_err(|e| misuse(call, e))?;
            app.set("port", local.port())?;
            (Some(key), None)
        }
        None => {
            app.set("port", port)?;
            match rt.driver.borrow_mut().lookup(&host, Instant::now()) {
                Lookup::Failed(e) => return Err(misuse(call, e)),
                Lookup::Done(ips) => {
                    let addrs: Vec<SocketAddr> =
                        ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect();
                    let (key, _) =
                        bind_listener(&rt, &addrs, tls, names, settings).map_err(|e| misuse(call, e))?;
                    (Some(key), None)
                }
                Lookup::Pending => (None, Some((host.clone(), port, settings, tls))),
            }
        }
    };
    policy.log(lua, &format!("listening on {host}:{}", app.get::<u16>("port")?))?;
    let mut ws = rt.ws.borrow_mut();
    let id = ws.id();
    if let Some(key) = listener {
        ws.listeners.insert(key, id);
    }
    let app_key = lua.create_registry_value(&app)?;
    ws.servers.insert(
        id,
        Server { name, policy, handlers, groups: HashMap::new(), listener, pending, app: app_key },
    );
    Ok(app)
}

/// A host name a server or client was waiting for has resolved.
pub(crate) fn resolved(lua: &Lua, rt: &Runtime, host: &str, now: Instant) -> Result<()> {
    let waiting: Vec<u64> = {
        let ws = rt.ws.borrow();
        ws.servers
            .iter()
            .filter(|(_, s)| s.pending.as_ref().is_some_and(|p| p.0 == host))
            .map(|(id, _)| *id)
            .collect()
    };
    for id in waiting {
        let Some((host, port, settings, tls)) =
            rt.ws.borrow_mut().servers.get_mut(&id).and_then(|s| s.pending.take())
        else {
            continue;
        };
        let lookup = rt.driver.borrow_mut().lookup(&host, now);
        let result = match lookup {
            Lookup::Done(ips) => {
                let addrs: Vec<SocketAddr> = ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect();
                let names = rt.ws.borrow().servers[&id].handlers.keys().cloned().collect();
                bind_listener(rt, &addrs, tls, names, settings).map(|(key, _)| key)
            }
            Lookup::Failed(e) => Err(e),
            Lookup::Pending => continue,
        };
        let policy = rt.ws.borrow().servers[&id].policy.clone();
        match result {
            Ok(key) => {
                let mut ws = rt.ws.borrow_mut();
                ws.listeners.insert(key, id);
                if let Some(server) = ws.servers.get_mut(&id) {
                    server.listener = Some(key);
                }
            }
            Err(e) => policy.report(lua, &e)?,
        }
    }
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
    dispatch_deferred(lua, rt)
}

/// Server: `luna.remove_web_app(app or name)`: stops listening and closes every connection
/// with a close frame (1001).
fn remove_web_app(lua: &Lua, which: Value) -> Result<(bool, Option<String>)> {
    let rt = runtime(lua)?;
    let name = match &which {
        Value::String(s) => s.to_str()?.to_owned(),
        Value::Table(t) => t.get::<String>("name")?,
        other => return Err(bad_arg("luna.remove_web_app(app)", "app", "a web app or its name", other)),
    };
    let id = rt.ws.borrow().servers.iter().find(|(_, s)| s.name == name).map(|(id, _)| *id);
    match id {
        Some(id) => {
            remove_server(lua, &rt, id)?;
            Ok((true, None))
        }
        None => Ok((false, Some("App not found".into()))),
    }
}

fn remove_server(lua: &Lua, rt: &Runtime, id: u64) -> Result<()> {
    let Some(server) = rt.ws.borrow_mut().servers.remove(&id) else { return Ok(()) };
    if let Some(key) = server.listener {
        rt.driver.borrow_mut().close(key);
        rt.ws.borrow_mut().listeners.remove(&key);
    }
    let conns: Vec<Key> =
        rt.ws.borrow().conns.iter().filter(|(_, c)| c.server == id).map(|(k, _)| *k).collect();
    for key in conns {
        with_stream(rt, key, |s| s.close(1001, "server shutting down"));
    }
    server.policy.log(lua, "stopped")?;
    for (_, key) in server.handlers {
        lua.remove_registry_value(key)?;
    }
    lua.remove_registry_value(server.app)
}

/// `lunac.connect_to_web_app(config)`.
fn connect_to_web_app(lua: &Lua, config: Value) -> Result<AnyUserData> {
    let call = "lunac.connect_to_web_app(config)";
    let opts = Options::new(call, config, CLIENT_KEYS)?;
    let name = opts.string("name")?.unwrap_or_else(|| "unknown name".into());
    let Some(url_text) = opts.string("url")? else {
        return Err(misuse(call, "'url' is required, e.g. \"ws://127.0.0.1:8080/path\""));
    };
    let url = WsUrl::parse(&url_text).map_err(|e| misuse(call, format!("'url': {e}")))?;
    let protocols = match opts.table("protocol") {
        Ok(Some(list)) => list.sequence_values::<String>().collect::<Result<Vec<_>>>()?,
        _ => opts.string("protocol")?.into_iter().collect(),
    };
    let rt = runtime(lua)?;
    if rt.ws.borrow().clients.values().any(|c| c.name == name) {
        return Err(misuse(call, format!("a web client named '{name}' already exists")));
    }
    let tls = if url.secure {
        let (ca, verify) = match opts.table("ssl")? {
            Some(ssl) => {
                let ssl = Options::new(call, Value::Table(ssl), &["ca", "verify"])?;
                (ssl.string("ca")?, ssl.boolean("verify")?.unwrap_or(true))
            }
            None => (None, true),
        };
        let cached = rt.ws.borrow().tls_clients.get(&(ca.clone(), verify)).cloned();
        Some(match cached {
            Some(config) => config,
            None => {
                let config = proto::client_config(ca.as_deref().map(std::path::Path::new), verify)
                    .map_err(|e| misuse(call, format!("ssl: {e}")))?;
                rt.ws.borrow_mut().tls_clients.insert((ca, verify), config.clone());
                config
            }
        })
    } else {
        None
    };
    let settings = settings(&opts, WsConfig::default())?;
    let policy = policy(&opts, lua, format!("web-client '{name}'"))?;
    let mut callbacks: [Option<RegistryKey>; 3] = Default::default();
    for (slot, key) in [(ON_CONNECT, "on_connect"), (ON_MESSAGE, "on_message"), (ON_CLOSE, "on_close")] {
        callbacks[slot] = opts.function(key)?.map(|f| lua.create_registry_value(f)).transpose()?;
    }
    let id = rt.ws.borrow_mut().id();
    let object = new_object(lua, WsClient(id))?;
    let client = Client {
        name,
        policy,
        object: lua.create_registry_value(&object)?,
        url,
        protocols,
        tls,
        settings,
        stream: None,
        callbacks,
    };
    rt.ws.borrow_mut().clients.insert(id, client);
    start_client(&rt, id, Instant::now());
    Ok(object)
}

/// Resolves (without blocking) and connects a client; failures are reported by the next update.
fn start_client(rt: &Runtime, id: u64, now: Instant) {
    let (url, protocols, tls, settings) = {
        let ws = rt.ws.borrow();
        let Some(c) = ws.clients.get(&id) else { return };
        (c.url.clone(), c.protocols.clone(), c.tls.clone(), c.settings.clone())
    };
    let lookup = rt.driver.borrow_mut().lookup(&url.host, now);
    let ip = match lookup {
        Lookup::Pending => return,
        Lookup::Failed(e) => return rt.ws.borrow_mut().failed.push((id, e)),
        Lookup::Done(ips) => ips[0],
    };
    let mut key = [0u8; 16];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).is_err() {
        return rt.ws.borrow_mut().failed.push((id, "no randomness for the WebSocket key".into()));
    }
    let protocols: Vec<&str> = protocols.iter().map(String::as_str).collect();
    let started = Stream::connect(SocketAddr::new(ip, url.port), &url, &protocols, key, tls, settings, now)
        .and_then(|stream| rt.driver.borrow_mut().ws_connect(stream, now).map_err(|e| e.to_string()));
    let mut ws = rt.ws.borrow_mut();
    match started {
        Ok(key) => {
            ws.client_streams.insert(key, id);
            if let Some(c) = ws.clients.get_mut(&id) {
                c.stream = Some(key);
            }
        }
        Err(e) => ws.failed.push((id, e)),
    }
}

fn disconnect(rt: &Runtime, id: u64, code: u16, reason: &str) {
    let stream = rt.ws.borrow().clients.get(&id).and_then(|c| c.stream);
    match stream {
        Some(key) => {
            with_stream(rt, key, |s| s.close(code, reason));
        }
        None => rt.ws.borrow_mut().failed.push((id, reason.to_owned())),
    }
}

/// `lunac.disconnect_to_web_app(app or name)`: close frame 1000; `on_close` follows.
fn disconnect_to_web_app(lua: &Lua, which: Value) -> Result<(bool, Option<String>)> {
    let rt = runtime(lua)?;
    let id = match &which {
        Value::UserData(ud) => ud.borrow::<WsClient>().ok().map(|c| c.0),
        Value::String(s) => {
            let name = s.to_str()?;
            rt.ws.borrow().clients.iter().find(|(_, c)| c.name == *name).map(|(id, _)| *id)
        }
        other => {
            return Err(bad_arg("lunac.disconnect_to_web_app(app)", "app", "a web client or its name", other))
        }
    };
    match id.filter(|id| rt.ws.borrow().clients.contains_key(id)) {
        Some(id) => {
            disconnect(&rt, id, 1000, "App closing");
            Ok((true, None))
        }
        None => Ok((false, Some("App not found".into()))),
    }
}

/// `luna.close()` / `lunac.close()`: every server or client WebSocket app.
pub(crate) fn close_all(lua: &Lua, rt: &Runtime, side: Side) -> Result<()> {
    match side {
        Side::Server => {
            let ids: Vec<u64> = rt.ws.borrow().servers.keys().copied().collect();
            for id in ids {
                remove_server(lua, rt, id)?;
            }
        }
        Side::Client => {
            let ids: Vec<u64> = rt.ws.borrow().clients.keys().copied().collect();
            for id in ids {
                disconnect(rt, id, 1000, "App closing");
            }
        }
    }
    Ok(())
}

/// `core.ws_receive(ws, co)`: the next message, the end of the connection, or `PARK`.
fn receive(lua: &Lua, (ud, thread): (AnyUserData, mlua::Thread)) -> Result<MultiValue> {
    let key = key_of(&ud)?;
    let rt = runtime(lua)?;
    let received = {
        let mut driver = rt.driver.borrow_mut();
        match driver.ws_stream(key) {
            Ok(stream) => {
                let r = stream.receive();
                if stream.should_resume_reading() {
                    rt.service.borrow_mut().push_back(key);
                }
                r
            }
            Err(_) => {
                Some(Received::Closed { code: 1006, reason: "connection released".into(), clean: false })
            }
        }
    };
    match received {
        Some(Received::Message(op, data)) => (lua.create_string(&data)?, op.as_u8()).into_lua_multi(lua),
        Some(Received::Closed { code, reason, clean }) => {
            (Value::Nil, Value::Nil, clean, code, reason).into_lua_multi(lua)
        }
        None => {
            let thread = lua.create_registry_value(thread)?;
            rt.sched.borrow_mut().park_on(key, thread);
            Value::LightUserData(park_value()).into_lua_multi(lua)
        }
    }
}

/// Services a listener or stream and reacts to what happened.
pub(crate) fn service(lua: &Lua, rt: &Runtime, key: Key, now: Instant) -> Result<()> {
    let mut io = Vec::new();
    rt.driver.borrow_mut().ws_service(key, now, &mut io);
    rt.ws.borrow_mut().deferred.extend(io);
    dispatch_deferred(lua, rt)
}

/// Dispatches queued stream events and client failures.
pub(crate) fn dispatch_deferred(lua: &Lua, rt: &Runtime) -> Result<()> {
    loop {
        let failed = rt.ws.borrow_mut().failed.pop();
        let Some((id, reason)) = failed else { break };
        client_closed(lua, rt, id, 1006, &reason)?;
    }
    loop {
        let next = rt.ws.borrow_mut().deferred.pop_front();
        let Some(event) = next else { return Ok(()) };
        handle(lua, rt, event)?;
    }
}

fn handle(lua: &Lua, rt: &Runtime, event: WsIo) -> Result<()> {
    match event {
        WsIo::Accepted { conn, listener } => accepted(lua, rt, conn, listener),
        WsIo::Rejected { listener, peer, reason } => {
            let policy = {
                let ws = rt.ws.borrow();
                ws.listeners.get(&listener).and_then(|id| ws.servers.get(id)).map(|s| s.policy.clone())
            };
            match policy {
                Some(policy) => policy.network(lua, &format!("refused upgrade from {peer}: {reason}")),
                None => Ok(()),
            }
        }
        WsIo::Opened { conn } => {
            let id = rt.ws.borrow().client_streams.get(&conn).copied();
            match id {
                Some(id) => client_callback(lua, rt, id, ON_CONNECT, MultiValue::new()),
                None => Ok(()),
            }
        }
        WsIo::Inbox { conn } => {
            rt.sched.borrow_mut().wake(conn);
            let client = rt.ws.borrow().client_streams.get(&conn).copied();
            match client {
                Some(id) => client_inbox(lua, rt, id, conn),
                None => server_inbox(lua, rt, conn),
            }
        }
    }
}

fn accepted(lua: &Lua, rt: &Runtime, conn: Key, listener: Key) -> Result<()> {
    let Some(server_id) = rt.ws.borrow().listeners.get(&listener).copied() else {
        rt.driver.borrow_mut().close(conn);
        return Ok(());
    };
    let (handler_name, peer) = {
        let mut driver = rt.driver.borrow_mut();
        let stream = driver.ws_stream(conn)?;
        (stream.upgrade.handler.clone(), stream.peer)
    };
    let (handler, policy) = {
        let ws = rt.ws.borrow();
        let server = &ws.servers[&server_id];
        (lua.registry_value::<Function>(&server.handlers[&handler_name])?, server.policy.clone())
    };
    policy.log(lua, &format!("client {peer} connected ({handler_name})"))?;
    let object: Table =
        lua.named_registry_value::<Function>("luna.ws.new")?.call(lua.create_userdata(Ws(conn))?)?;
    {
        let mut ws = rt.ws.borrow_mut();
        let object = lua.create_registry_value(&object)?;
        ws.conns.insert(
            conn,
            Conn {
                server: server_id,
                object,
                group: handler_name.clone(),
                handler_done: false,
                closed_seen: false,
            },
        );
        if let Some(server) = ws.servers.get_mut(&server_id) {
            server.groups.entry(handler_name).or_default().insert(conn);
        }
    }
    let hook: sched::Hook = Box::new(move |lua, rt, result| {
        let failure = result.err().map(|e| super::error::message(&e));
        let (code, reason) = if failure.is_some() { (1011, "internal error") } else { (1000, "") };
        with_stream(rt, conn, |s| s.close(code, reason));
        if let Some(c) = rt.ws.borrow_mut().conns.get_mut(&conn) {
            c.handler_done = true;
        }
        release_if_done(lua, rt, conn)?;
        match failure {
            Some(msg) => policy.report(lua, &msg),
            None => Ok(()),
        }
    });
    sched::spawn_owned(lua, rt, handler, object, hook)?;
    Ok(())
}

fn server_inbox(lua: &Lua, rt: &Runtime, conn: Key) -> Result<()> {
    let closed = rt.driver.borrow_mut().ws_stream(conn).is_ok_and(|s| s.is_closed());
    let first_close = {
        let mut ws = rt.ws.borrow_mut();
        match ws.conns.get_mut(&conn) {
            Some(c) if closed && !c.closed_seen => {
                c.closed_seen = true;
                let (server, group) = (c.server, c.group.clone());
                if let Some(g) = ws.servers.get_mut(&server).and_then(|s| s.groups.get_mut(&group)) {
                    g.remove(&conn);
                }
                true
            }
            _ => false,
        }
    };
    if !first_close {
        return Ok(());
    }
    let (object, policy) = {
        let ws = rt.ws.borrow();
        let c = &ws.conns[&conn];
        (lua.registry_value::<Table>(&c.object)?, ws.servers.get(&c.server).map(|s| s.policy.clone()))
    };
    let closed_with = rt.driver.borrow_mut().ws_stream(conn)?.receive();
    if let (Some(Received::Closed { code, reason, .. }), Value::Function(on_close)) =
        (closed_with, object.raw_get::<Value>("on_close")?)
    {
        if let Err(e) = on_close.call::<()>((code, reason)) {
            if let Some(policy) = &policy {
                policy.report(lua, &super::error::message(&e))?;
            }
        }
    }
    release_if_done(lua, rt, conn)
}

/// Forgets a server connection once its handler ended and the stream is closed.
fn release_if_done(lua: &Lua, rt: &Runtime, conn: Key) -> Result<()> {
    let closed = rt.driver.borrow_mut().ws_stream(conn).map_or(true, |s| s.is_closed());
    let done = rt.ws.borrow().conns.get(&conn).is_some_and(|c| c.handler_done && (closed || c.closed_seen));
    if !done {
        return Ok(());
    }
    if let Some(c) = rt.ws.borrow_mut().conns.remove(&conn) {
        lua.remove_registry_value(c.object)?;
    }
    rt.driver.borrow_mut().close(conn);
    Ok(())
}

fn client_callback(lua: &Lua, rt: &Runtime, id: u64, slot: usize, args: MultiValue) -> Result<()> {
    let (callback, object, policy) = {
        let ws = rt.ws.borrow();
        let Some(c) = ws.clients.get(&id) else { return Ok(()) };
        let callback = match &c.callbacks[slot] {
            Some(key) => lua.registry_value::<Function>(key)?,
            None => return Ok(()),
        };
        (callback, lua.registry_value::<AnyUserData>(&c.object)?, c.policy.clone())
    };
    let mut full = MultiValue::new();
    full.push_back(Value::UserData(object));
    full.extend(args);
    match callback.call::<()>(full) {
        Ok(()) => Ok(()),
        Err(e) => policy.report(lua, &super::error::message(&e)),
    }
}

fn client_inbox(lua: &Lua, rt: &Runtime, id: u64, conn: Key) -> Result<()> {
    loop {
        let received = rt.driver.borrow_mut().ws_stream(conn).ok().and_then(|s| s.receive());
        match received {
            None => return Ok(()),
            Some(Received::Message(op, data)) => {
                let args = (lua.create_string(&data)?, op.as_u8()).into_lua_multi(lua)?;
                client_callback(lua, rt, id, ON_MESSAGE, args)?;
            }
            Some(Received::Closed { code, reason, .. }) => {
                rt.driver.borrow_mut().close(conn);
                rt.ws.borrow_mut().client_streams.remove(&conn);
                return client_closed(lua, rt, id, code, &reason);
            }
        }
    }
}

/// A client's connection ended (or never started): `on_close(self, code, reason)`, then forget it.
fn client_closed(lua: &Lua, rt: &Runtime, id: u64, code: u16, reason: &str) -> Result<()> {
    if let Some(policy) = rt.ws.borrow().clients.get(&id).map(|c| c.policy.clone()) {
        if code == 1006 {
            policy.network(lua, &format!("connection lost: {reason}"))?;
        }
    }
    let args = (code, reason.to_owned()).into_lua_multi(lua)?;
    let result = client_callback(lua, rt, id, ON_CLOSE, args);
    if let Some(c) = rt.ws.borrow_mut().clients.remove(&id) {
        lua.remove_registry_value(c.object)?;
        for key in c.callbacks.into_iter().flatten() {
            lua.remove_registry_value(key)?;
        }
    }
    result
}

/// Adds the WebSocket functions of one side to its module table.
pub(crate) fn register(lua: &Lua, module: &Table, side: Side) -> Result<()> {
    match side {
        Side::Server => {
            module.set("new_web_app", lua.create_function(new_web_app)?)?;
            module.set("remove_web_app", lua.create_function(remove_web_app)?)?;
        }
        Side::Client => {
            module.set("connect_to_web_app", lua.create_function(connect_to_web_app)?)?;
            module.set("disconnect_to_web_app", lua.create_function(disconnect_to_web_app)?)?;
        }
    }
    Ok(())
}

/// The `core` primitives the Lua half needs.
pub(crate) fn core(lua: &Lua, core: &Table) -> Result<()> {
    core.set("ws_receive", lua.create_function(receive)?)?;
    core.set("ws_send", lua.create_function(ws_send)?)?;
    core.set("ws_close", lua.create_function(ws_close)?)?;
    core.set("ws_broadcast", lua.create_function(ws_broadcast)?)?;
    core.set("ws_peer", lua.create_function(ws_peer)?)?;
    core.set("ws_info", lua.create_function(ws_info)?)
}
