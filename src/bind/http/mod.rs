//! HTTP servers in Lune's shape: `luna.serve(port_or_config, handler_or_config)`. Each request
//! runs its handler in a library coroutine (it may `luna.sleep`, `fetch`, wait on sockets) while
//! the server goes on with other connections; the handler returns a string (200, text/plain) or
//! `{status, headers, body}`. The HTTP/1.1 rules live in `proto::http`; this module turns
//! requests into Lua tables (with `lua/luna.lua`'s `http_request`) and Lua answers into
//! responses. Also `luna.url_encode` / `luna.url_decode`.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mlua::{Function, Lua, RegistryKey, Result, Table, Value};
use rustc_hash::FxHashMap;

mod app;
mod body;
pub(crate) mod client;
mod multipart;
mod streamed;

use super::error::{lua_type, message, misuse};
use super::options::Options;
use super::policy::Policy;
use super::{addr, runtime, sched, ws, Runtime};
use crate::driver::net::ListenOptions;
use crate::driver::{Event, EventKind, Key, ListenerConfig, Tag};
use crate::proto::http::{HttpLimits, HttpServerConn, Request, Response};
use crate::proto::ws::Settings;

/// The tag of every entry this module opens.
pub(crate) const TAG: Tag = 4;

const CALL: &str = "luna.serve(port, handler)";

/// The type of a handler's string answer and of our 500.
const PLAIN: &[(&[u8], &[u8])] = &[(b"content-type", b"text/plain; charset=utf-8")];

const CONFIG_KEYS: &[&str] = &[
    "port",
    "host",
    "address",
    "handleRequest",
    "handleWebSocket",
    "tls",
    "max_header_size",
    "max_body_size",
    "max_uri_size",
    "head_timeout",
    "body_timeout",
    "idle_timeout",
    "send_timeout",
    "error_handler",
    "no_errors",
    "on_open",
    "on_close",
    "websocket",
];

struct Server {
    handler: RegistryKey,
    shared: Rc<Shared>,
    listener: Option<Key>,
    stopped: bool,
    /// `handleWebSocket`: runs every WebSocket upgrade request (not `handleRequest`).
    ws_handler: Option<RegistryKey>,
    /// The sessions of upgraded connections get these.
    ws_settings: Arc<Settings>,
    /// The WebSocket server record of the connections upgraded so far.
    ws_server: Option<u64>,
}

/// What a server's connections share with it, kept by each so a connection that outlives its
/// stopped server still reports its end.
struct Shared {
    policy: Rc<Policy>,
    /// `on_open(connection, peer_address)` and `on_close(connection, reason)`.
    on_open: Option<RegistryKey>,
    on_close: Option<RegistryKey>,
}

/// What is left of a file being sent as an answer's body.
struct FileBody {
    file: std::fs::File,
    left: u64,
}

struct Conn {
    server: u64,
    shared: Rc<Shared>,
    /// The number `on_open`, `on_close` and requests name the connection by.
    id: u64,
    /// The peer's `"ip:port"`.
    address: String,
    /// The file an answer's body is being read from.
    file: Option<Box<FileBody>>,
    /// A request's handler is running.
    busy: bool,
    /// [`news`] is starting this connection's requests.
    starting: bool,
}

#[derive(Default)]
pub(crate) struct HttpState {
    servers: FxHashMap<u64, Server>,
    listeners: FxHashMap<Key, u64>,
    conns: FxHashMap<Key, Conn>,
    /// Connections by the number requests carry.
    keys: FxHashMap<u64, Key>,
    next_id: u64,
    next_conn: u64,
    /// The `Date` value and the second it is for.
    date: (u64, String),
    /// `lua/luna.lua`'s `http_request`.
    runner: Option<RegistryKey>,
    /// File bytes sent in the tick of that instant (see [`pump`]).
    pumped: Option<(std::time::Instant, usize)>,
    /// What file pieces are read into (kept: one allocation, not one per piece).
    scratch: Vec<u8>,
    /// Static roots, open (see `app::resolve`), with the device and inode they were opened at.
    roots: FxHashMap<std::path::PathBuf, (Rc<std::fs::File>, (u64, u64))>,
    /// The file `core.file` last found, open, for the answer that sends it.
    opened: Option<(std::path::PathBuf, std::fs::File)>,
}

impl HttpState {
    fn date(&mut self) -> &str {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.date.0 != secs || self.date.1.is_empty() {
            self.date = (secs, httpdate::fmt_http_date(now));
        }
        &self.date.1
    }
}

/// `luna.serve(port_or_config, handler_or_config)`; `early` (`lua/http_app.lua`'s
/// `core.serve`): handlers start once a request's head is in, with `body = false` when its body
/// is still to come (read with `core.body_read`).
fn serve(lua: &Lua, (first, second): (Value, Value), early: bool) -> Result<Table> {
    let (port, config) = match (&first, &second) {
        (Value::Integer(_) | Value::Number(_), _) => (Some(first.clone()), second),
        (Value::Table(_), Value::Nil) => (None, first),
        _ => {
            return Err(misuse(
                CALL,
                format!(
                    "takes a port and a handler function or config table, or one config table; got {} and {}",
                    lua_type(&first),
                    lua_type(&second)
                ),
            ))
        }
    };
    let opts = match config {
        Value::Function(f) => {
            let t = lua.create_table()?;
            t.set("handleRequest", f)?;
            Options::new(CALL, Value::Table(t), CONFIG_KEYS)?
        }
        other @ Value::Table(_) => Options::new(CALL, other, CONFIG_KEYS)?,
        other => {
            return Err(misuse(
                CALL,
                format!("the handler must be a function or a config table, got {}", lua_type(&other)),
            ))
        }
    };
    if port.is_some() && opts.port("port")?.is_some() {
        return Err(misuse(CALL, "the port is given twice (argument and 'port'): give it once"));
    }
    let port = match port {
        Some(p) => {
            let t = lua.create_table()?;
            t.set("port", p)?;
            Options::new(CALL, Value::Table(t), &["port"])?.port("port")?
        }
        None => opts.port("port")?,
    }
    .ok_or_else(|| misuse(CALL, "a port is required (0 picks a free one)"))?;
    let handler = opts.function("handleRequest")?.ok_or_else(|| {
        misuse(CALL, "'handleRequest' is required: a function(request) returning the response")
    })?;
    let ws_handler = opts.function("handleWebSocket")?.map(|f| lua.create_registry_value(f)).transpose()?;
    let ws_settings = match opts.table("websocket")? {
        Some(t) => ws::upgrade_settings(&Options::new(CALL, Value::Table(t), ws::UPGRADE_KEYS)?)?,
        None => Arc::new(Settings::default()),
    };
    let host = match (opts.string("host")?, opts.string("address")?) {
        (Some(host), _) => host,
        // Lune's form: "http://0.0.0.0".
        (None, Some(address)) => address
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned(),
        (None, None) => "127.0.0.1".into(),
    };
    let tls = match opts.table("tls")? {
        Some(t) => Some(super::tls::server_options(CALL, t, &[b"http/1.1"])?),
        None => None,
    };
    let limits = limits(&opts)?;
    let policy = Policy {
        label: format!("HTTP server on port {port}"),
        // As in Lune: a failing handler is a 500 and a printed error, not a stopped server.
        no_errors: opts.boolean("no_errors")?.unwrap_or(true),
        handler: opts.function("error_handler")?.map(|f| lua.create_registry_value(f)).transpose()?,
        debug: false,
    };
    let hook = |name| opts.function(name).and_then(|f| f.map(|f| lua.create_registry_value(f)).transpose());
    let shared =
        Rc::new(Shared { policy: Rc::new(policy), on_open: hook("on_open")?, on_close: hook("on_close")? });

    let rt = runtime(lua)?;
    let id = {
        let mut http = rt.http.borrow_mut();
        http.next_id += 1;
        http.next_id
    };
    rt.http.borrow_mut().servers.insert(
        id,
        Server {
            handler: lua.create_registry_value(handler)?,
            shared,
            listener: None,
            stopped: false,
            ws_handler,
            ws_settings,
            ws_server: None,
        },
    );
    let handle = lua.create_table()?;
    handle.set("port", port)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    handle.set("address", format!("{scheme}://{host}:{port}"))?;
    handle
        .set("stop", lua.create_function(move |lua, _: mlua::MultiValue| stop(lua, &*runtime(lua)?, id))?)?;
    let object = handle.clone();
    let bind: addr::Continuation = Box::new(move |lua, rt, ips| {
        if rt.http.borrow().servers.get(&id).is_none_or(|s| s.stopped) {
            return Ok(()); // stopped while its host name resolved
        }
        let listening = ips
            .and_then(|ips| addr::tcp_listen_first(&addr::with_port(&ips, port), ListenOptions::default()));
        let (socket, local) = match listening {
            Ok(listening) => listening,
            Err(e) => {
                forget(lua, rt, id)?;
                return Err(misuse(CALL, e));
            }
        };
        let config = ListenerConfig {
            tls,
            make: Box::new(move |now| {
                let conn = HttpServerConn::new(limits, now);
                Box::new(if early { conn.deliver_heads() } else { conn })
            }),
            max_connections: None,
            nodelay: true,
        };
        let key = rt.driver.borrow_mut().listen(socket, config, TAG)?;
        let mut http = rt.http.borrow_mut();
        http.listeners.insert(key, id);
        if let Some(server) = http.servers.get_mut(&id) {
            server.listener = Some(key);
        }
        object.set("port", local.port())?;
        object.set("address", format!("{scheme}://{}", addr::show(local)))
    });
    addr::resolve_then(lua, &rt, &host, true, bind)?;
    Ok(handle)
}

fn limits(opts: &Options) -> Result<HttpLimits> {
    let mut limits = HttpLimits::default();
    let sizes = [
        ("max_header_size", &mut limits.max_header_size),
        ("max_body_size", &mut limits.max_body_size),
        ("max_uri_size", &mut limits.max_uri),
    ];
    for (key, field) in sizes {
        if let Some(size) = opts.size(key)? {
            *field = size;
        }
    }
    let times = [
        ("head_timeout", &mut limits.head_timeout),
        ("body_timeout", &mut limits.body_timeout),
        ("idle_timeout", &mut limits.idle_timeout),
        ("send_timeout", &mut limits.send_timeout),
    ];
    for (key, field) in times {
        if let Some(t) = opts.seconds(key)? {
            *field = t;
        }
    }
    Ok(limits)
}

/// `handle:stop()`: no new connections; idle ones close, requests being handled are answered and
/// their connections close after.
fn stop(lua: &Lua, rt: &Runtime, id: u64) -> Result<()> {
    let listener = match rt.http.borrow_mut().servers.get_mut(&id) {
        Some(server) if !server.stopped => {
            server.stopped = true;
            server.listener.take()
        }
        _ => return Ok(()),
    };
    if let Some(key) = listener {
        close_listener(rt, key);
    }
    let idle: Vec<Key> = rt
        .http
        .borrow()
        .conns
        .iter()
        .filter(|(_, c)| c.server == id && !c.busy && c.file.is_none())
        .map(|(k, _)| *k)
        .collect();
    for key in idle {
        finish(rt, key);
    }
    forget_if_done(lua, rt, id)
}

/// Closes a connection once what it queued is out.
fn finish(rt: &Runtime, key: Key) {
    if let Some(proto) = rt.driver.borrow_mut().proto::<HttpServerConn>(key) {
        proto.finish();
    }
    rt.flush(key);
}

/// Forgets a stopped server once no handler of its requests runs.
fn forget_if_done(lua: &Lua, rt: &Runtime, id: u64) -> Result<()> {
    let done = {
        let http = rt.http.borrow();
        http.servers.get(&id).is_some_and(|s| s.stopped)
            && !http.conns.values().any(|c| c.server == id && c.busy)
    };
    if done {
        forget(lua, rt, id)?;
    }
    Ok(())
}

fn forget(lua: &Lua, rt: &Runtime, id: u64) -> Result<()> {
    let Some(server) = rt.http.borrow_mut().servers.remove(&id) else { return Ok(()) };
    if let Some(key) = server.listener {
        close_listener(rt, key);
    }
    if let Some(ws_server) = server.ws_server {
        ws::remove_server(lua, rt, ws_server)?; // its connections get a close frame (1001)
    }
    if let Some(handler) = server.ws_handler {
        lua.remove_registry_value(handler)?;
    }
    lua.remove_registry_value(server.handler)
}

fn close_listener(rt: &Runtime, key: Key) {
    rt.driver.borrow_mut().close(key);
    rt.http.borrow_mut().listeners.remove(&key);
}

/// A driver event for one of this module's entries.
pub(crate) fn event(lua: &Lua, rt: &Runtime, event: Event) -> Result<()> {
    match event.kind {
        EventKind::Accepted { listener } => accepted(lua, rt, event.key, listener),
        EventKind::News => news(lua, rt, event.key),
        EventKind::Drained | EventKind::Wake => {
            pump(rt, event.key);
            // A handler waiting in `res:flush()`.
            rt.sched.borrow_mut().wake(event.key);
            Ok(())
        }
    }
}

fn accepted(lua: &Lua, rt: &Runtime, key: Key, listener: Key) -> Result<()> {
    let found = {
        let http = rt.http.borrow();
        http.listeners.get(&listener).and_then(|id| Some((*id, http.servers.get(id)?.shared.clone())))
    };
    let Some((server, shared)) = found else {
        rt.driver.borrow_mut().close(key);
        return Ok(());
    };
    let address = {
        let mut driver = rt.driver.borrow_mut();
        driver.adopt(key);
        driver.stream(key).map(|s| s.peer.to_string()).unwrap_or_default()
    };
    let id = {
        let mut http = rt.http.borrow_mut();
        http.next_conn += 1;
        let id = http.next_conn;
        let conn = Conn {
            server,
            shared: shared.clone(),
            id,
            address: address.clone(),
            file: None,
            busy: false,
            starting: false,
        };
        http.conns.insert(key, conn);
        http.keys.insert(id, key);
        id
    };
    call_hook(lua, &shared, shared.on_open.as_ref(), (id, address))?;
    news(lua, rt, key)
}

/// Drops a connection's record; a handler waiting in `res:flush()` learns it is gone.
fn forget_conn(rt: &Runtime, key: Key) -> Option<Conn> {
    let mut http = rt.http.borrow_mut();
    let conn = http.conns.remove(&key)?;
    http.keys.remove(&conn.id);
    rt.sched.borrow_mut().wake(key);
    Some(conn)
}

/// Calls a connection hook; its errors go to the server's error policy.
fn call_hook(
    lua: &Lua,
    shared: &Shared,
    hook: Option<&RegistryKey>,
    args: impl mlua::IntoLuaMulti,
) -> Result<()> {
    let Some(hook) = hook else { return Ok(()) };
    match lua.registry_value::<Function>(hook)?.call::<()>(args) {
        Ok(()) => Ok(()),
        Err(e) => shared.policy.report(lua, &message(&e)),
    }
}

/// A connection has news: a complete request, or its end. Requests a connection holds are
/// started one after another in a loop, not by recursion: a handler that answers at once (its
/// hook calls back here) would otherwise nest one call per pipelined request.
fn news(lua: &Lua, rt: &Runtime, key: Key) -> Result<()> {
    let server = match rt.http.borrow_mut().conns.get_mut(&key) {
        Some(c) if !c.starting => {
            // A handler (or a coroutine it left) waiting for a request's body.
            rt.sched.borrow_mut().wake(key);
            c.starting = true;
            c.server
        }
        _ => return Ok(()),
    };
    let result = start_requests(lua, rt, key, server);
    if let Some(c) = rt.http.borrow_mut().conns.get_mut(&key) {
        c.starting = false;
    }
    result
}

fn start_requests(lua: &Lua, rt: &Runtime, key: Key, server: u64) -> Result<()> {
    loop {
        let Some(busy) = rt.http.borrow().conns.get(&key).map(|c| c.busy) else { return Ok(()) };
        let (ready, closed) = match rt.driver.borrow_mut().proto::<HttpServerConn>(key) {
            Some(proto) => (!busy && proto.has_request(), proto.is_closed().then(|| proto.close_reason())),
            None => (false, Some("client_closed")),
        };
        if let Some(reason) = closed {
            // A running handler finds the connection gone and drops its answer.
            let conn = forget_conn(rt, key);
            rt.driver.borrow_mut().close(key);
            return match conn {
                Some(c) => call_hook(lua, &c.shared, c.shared.on_close.as_ref(), (c.id, reason)),
                None => Ok(()),
            };
        }
        if !ready {
            return Ok(());
        }
        // Looked up before the request is taken, so a failure leaves it for the next news.
        let handlers = rt.http.borrow().servers.get(&server).map(|s| {
            let ws = s.ws_handler.as_ref().map(|k| lua.registry_value::<Function>(k));
            (lua.registry_value::<Function>(&s.handler), ws)
        });
        let Some((handler, ws_handler)) = handlers else { return Ok(()) };
        let (handler, ws_handler, runner) = (handler?, ws_handler.transpose()?, runner(lua, rt)?);
        let request = rt
            .driver
            .borrow_mut()
            .proto::<HttpServerConn>(key)
            .and_then(|p| Some((p.take_request()?, p.body_pending())));
        let Some((request, pending)) = request else { return Ok(()) };
        if let Some(ws_handler) = ws_handler {
            if hand_over(lua, rt, key, server, "default".into(), ws_handler)? {
                return Ok(());
            }
        }
        if let Some(c) = rt.http.borrow_mut().conns.get_mut(&key) {
            c.busy = true;
        }
        let hook: sched::Hook = Box::new(move |lua, rt, result| answered(lua, rt, key, server, result));
        let started = match sched::create_owned(lua, rt, runner, hook) {
            Ok(thread) => start(lua, rt, key, &thread, handler, &request, pending),
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            if let Some(c) = rt.http.borrow_mut().conns.get_mut(&key) {
                c.busy = false;
            }
            return Err(e);
        }
    }
}

/// `lua/luna.lua`'s `http_request`, which builds the request table and calls the handler.
fn runner(lua: &Lua, rt: &Runtime) -> Result<Function> {
    let cached = rt.http.borrow().runner.as_ref().map(|k| lua.registry_value::<Function>(k));
    if let Some(f) = cached {
        return f;
    }
    let f: Function = lua.named_registry_value("luna.http.request")?;
    rt.http.borrow_mut().runner = Some(lua.create_registry_value(&f)?);
    Ok(f)
}

/// Starts `thread` (running `http_request`) on the handler and the request's fields, for a
/// table `{method, path, query, headers, body, target, raw_query, connection, peer_address,
/// number}` (Lune's, plus the target as sent, the query undecoded, who sent it and the
/// request's number on its connection; `body` is false while it is still to come). Strings go straight
/// onto the Lua stack; the query, whose pairs are not bounded by the header limit, comes as a
/// table.
fn start(
    lua: &Lua,
    rt: &Runtime,
    key: Key,
    thread: &mlua::Thread,
    handler: Function,
    request: &Request,
    pending: bool,
) -> Result<()> {
    let query = form_table(lua, request.query.as_bytes())?;
    let mut fields: Vec<&str> = Vec::with_capacity(4 + 2 * request.headers.len());
    fields.extend([request.method.as_str(), &request.path, &request.target, &request.query]);
    for (name, value) in &request.headers {
        fields.extend([name.as_str(), value.as_str()]);
    }
    let body = match pending {
        true => Value::Boolean(false),
        false => Value::String(lua.create_string(&request.body)?),
    };
    let (id, address) = match rt.http.borrow().conns.get(&key) {
        Some(c) => (c.id, lua.create_string(&c.address)?),
        None => return Ok(()),
    };
    let args = (handler, body, query, id, address, request.number, mlua::Variadic::from(fields));
    sched::resume(lua, rt, thread, args)
}

/// The pairs of a urlencoded query or form as a table (the last of a repeated name wins), nil
/// for none.
fn form_table(lua: &Lua, text: &[u8]) -> Result<Option<Table>> {
    let mut table = None;
    for (k, v) in form_urlencoded::parse(text) {
        let t = match &table {
            Some(t) => t,
            None => table.insert(lua.create_table()?),
        };
        t.raw_set(k.as_ref(), v.as_ref())?;
    }
    Ok(table)
}

/// Hands the connection of a WebSocket upgrade request to a WebSocket session running
/// `handler(ws)` in `group`; false (nothing done) when the request did not ask for an upgrade.
fn hand_over(
    lua: &Lua,
    rt: &Runtime,
    key: Key,
    server: u64,
    group: String,
    handler: Function,
) -> Result<bool> {
    if !rt.driver.borrow_mut().proto::<HttpServerConn>(key).is_some_and(|p| p.wants_upgrade()) {
        return Ok(false); // most requests: nothing to look up
    }
    let found = rt
        .http
        .borrow()
        .servers
        .get(&server)
        .map(|s| (s.ws_settings.clone(), s.ws_server, s.shared.policy.clone()));
    let Some((settings, existing, policy)) = found else { return Ok(false) };
    let head = rt.driver.borrow_mut().proto::<HttpServerConn>(key).and_then(|p| p.take_upgrade());
    let Some((head, eof)) = head else { return Ok(false) };
    let ws_server = match existing {
        Some(id) => id,
        None => {
            let id = ws::attach(lua, rt, format!("{} (WebSocket)", policy.label), policy)?;
            if let Some(s) = rt.http.borrow_mut().servers.get_mut(&server) {
                s.ws_server = Some(id);
            }
            id
        }
    };
    let conn = forget_conn(rt, key);
    ws::upgrade(lua, rt, key, ws::Handover { server: ws_server, group, handler, settings }, &head, eof)?;
    rt.resume_reading(key);
    match conn {
        Some(c) => call_hook(lua, &c.shared, c.shared.on_close.as_ref(), (c.id, "upgraded")).map(|()| true),
        None => Ok(true),
    }
}

/// The answer to a request that asked for no upgrade when the handler accepted one.
fn upgrade_required(rt: &Runtime, key: Key) {
    let headers: &[(&[u8], &[u8])] = &[
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"sec-websocket-version", b"13"),
        (b"upgrade", b"websocket"),
    ];
    // Valid by construction: it cannot fail.
    let _ = send(
        rt,
        key,
        Response { status: 426, headers, body: b"Upgrade Required: connect with WebSocket\n", date: "" },
    );
}

/// A request's handler ended: its answer (or a 500) goes out, and the next request may start.
/// An answer `{websocket = handler}` upgrades the connection to WebSocket instead (426 if the
/// request did not ask for that).
fn answered(lua: &Lua, rt: &Runtime, key: Key, server: u64, result: Result<Value>) -> Result<()> {
    if let Some(c) = rt.http.borrow_mut().conns.get_mut(&key) {
        c.busy = false;
    }
    let websocket = match &result {
        Ok(Value::Table(t)) => match t.raw_get::<Value>("websocket")? {
            Value::Function(handler) => Some((handler, t.raw_get::<Option<String>>("group")?)),
            _ => None,
        },
        _ => None,
    };
    let upgrade = websocket.is_some();
    if let Some((handler, group)) = websocket {
        if hand_over(lua, rt, key, server, group.unwrap_or_else(|| "default".into()), handler)? {
            return forget_if_done(lua, rt, server);
        }
    }
    let (shared, stopped) = match rt.http.borrow().servers.get(&server) {
        Some(s) => (Some(s.shared.clone()), s.stopped),
        None => (None, true),
    };
    if stopped {
        if let Some(proto) = rt.driver.borrow_mut().proto::<HttpServerConn>(key) {
            proto.close_after_response();
        }
    }
    // A handler that sent its answer piece by piece (`res:send_data`) is done with it; one
    // that failed half-way leaves a truncated answer, so the connection is cut.
    let streamed = {
        let mut driver = rt.driver.borrow_mut();
        let now = driver.now();
        match driver.proto::<HttpServerConn>(key) {
            Some(p) if !p.is_closed() && !p.awaits_response() => {
                if result.is_ok() {
                    p.end_body(now);
                } else {
                    p.abort();
                }
                true
            }
            _ => false,
        }
    };
    let failure = match result {
        Err(e) if streamed => {
            rt.flush(key);
            Some(message(&e))
        }
        Ok(_) if streamed => None,
        Ok(_) if upgrade => {
            upgrade_required(rt, key);
            None
        }
        Ok(value) => respond(rt, key, &value).err(),
        Err(e) => Some(message(&e)),
    };
    if failure.is_some() {
        // Valid by construction: it cannot fail.
        let _ = send(
            rt,
            key,
            Response { status: 500, headers: PLAIN, body: b"Internal Server Error\n", date: "" },
        );
    }
    rt.http.borrow_mut().opened = None;
    pump(rt, key);
    let streaming = rt.http.borrow().conns.get(&key).is_some_and(|c| c.file.is_some());
    if stopped {
        // A file being sent finishes first (it closes after: the answer said so).
        if !streaming {
            finish(rt, key);
        }
        forget_if_done(lua, rt, server)?;
    } else {
        rt.flush(key);
        rt.resume_reading(key);
    }
    // The next pipelined request, if one is buffered.
    news(lua, rt, key)?;
    match (failure, shared) {
        (Some(why), Some(shared)) => shared.policy.report(lua, &why),
        _ => Ok(()),
    }
}

/// Sends the handler's answer; a malformed one is an error (the caller sends a 500).
fn respond(rt: &Runtime, key: Key, value: &Value) -> std::result::Result<(), String> {
    let t = match value {
        Value::String(body) => {
            return send(rt, key, Response { status: 200, headers: PLAIN, body: &body.as_bytes(), date: "" })
        }
        Value::Table(t) => t,
        other => {
            return Err(format!(
                "the handler must return a string or a table {{status = 200, headers = {{...}}, body = \"...\"}}, got {}",
                lua_type(other)
            ))
        }
    };
    let field = |name: &str| t.raw_get::<Value>(name).map_err(|e| message(&e));
    let status = match field("status")? {
        Value::Nil => 200,
        Value::Integer(n) if (200..=599).contains(&n) => n as u16,
        Value::Number(n) if n.fract() == 0.0 && (200.0..=599.0).contains(&n) => n as u16,
        other => {
            return Err(format!("the response's status must be a whole number 200-599, got {}", show(&other)))
        }
    };
    let headers = match field("headers")? {
        Value::Nil => Vec::new(),
        Value::Table(fields) => header_fields(&fields)?,
        other => return Err(format!("the response's headers must be a table, got {}", lua_type(&other))),
    };
    let headers = borrowed(&headers);
    if let Value::String(path) = field("file")? {
        let range = (field("offset")?, field("length")?);
        return send_file(
            rt,
            key,
            Response { status, headers: &headers, body: b"", date: "" },
            &path.to_str().map_err(|e| message(&e))?,
            range,
        );
    }
    let body = match field("body")? {
        Value::Nil => None,
        Value::String(s) => Some(s),
        other => return Err(format!("the response's body must be a string, got {}", lua_type(&other))),
    };
    let body_bytes = body.as_ref().map(|b| b.as_bytes());
    let body: &[u8] = body_bytes.as_ref().map_or(b"", |b| &b[..]);
    send(rt, key, Response { status, headers: &headers, body, date: "" })
}

/// A header field: name and value.
type Field = (Vec<u8>, Vec<u8>);

/// Fields as `Response` takes them.
fn borrowed(fields: &[Field]) -> Vec<(&[u8], &[u8])> {
    fields.iter().map(|(n, v)| (&n[..], &v[..])).collect()
}

/// A response's `headers` table (name → string, number or list of them) as fields, sorted by
/// name so the same table always gives the same head.
fn header_fields(fields: &Table) -> std::result::Result<Vec<Field>, String> {
    let mut out = Vec::new();
    for pair in fields.pairs::<Value, Value>() {
        let (name, value) = pair.map_err(|e| message(&e))?;
        let Value::String(name) = name else {
            return Err(format!("header names must be strings, got {}", lua_type(&name)));
        };
        let values = match value {
            Value::Table(list) => {
                list.sequence_values::<Value>().collect::<mlua::Result<Vec<_>>>().map_err(|e| message(&e))?
            }
            one => vec![one],
        };
        for v in values {
            let bytes = match &v {
                Value::String(s) => s.as_bytes().to_vec(),
                Value::Integer(_) | Value::Number(_) => show(&v).into_bytes(),
                other => {
                    return Err(format!(
                        "header '{}' must be a string, a number or a list of them, got {}",
                        name.to_string_lossy(),
                        lua_type(other)
                    ))
                }
            };
            out.push((name.as_bytes().to_vec(), bytes));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Bytes of files sent per tick, over all connections; the rest waits for the next tick, so a
/// large file on a fast link cannot hold a frame.
const PUMP_BUDGET: usize = 4 << 20;

/// Bytes read from a file at a time.
const FILE_CHUNK: u64 = 64 << 10;

/// The open directory of static root `root`, opened on first use (None when it cannot be).
/// A directory swapped in at the same path (a deploy's `mv new public`) is opened anew.
fn root_dir(rt: &Runtime, root: &std::path::Path) -> Option<Rc<std::fs::File>> {
    use std::os::unix::fs::MetadataExt;
    let now = std::fs::metadata(root).ok()?;
    let id = (now.dev(), now.ino());
    let mut http = rt.http.borrow_mut();
    match http.roots.get(root) {
        Some((dir, opened)) if *opened == id => Some(dir.clone()),
        _ => {
            let dir = Rc::new(std::fs::File::open(root).ok()?);
            http.roots.insert(root.to_owned(), (dir.clone(), id));
            Some(dir)
        }
    }
}

/// The connection of request `connection` (the number requests carry).
fn key_of(rt: &Runtime, connection: u64) -> Option<Key> {
    rt.http.borrow().keys.get(&connection).copied()
}

/// Keeps the file `core.file` opened at `path` for the answer (one at a time: the previous
/// one, never sent, is closed; every answer clears it, so a later one never gets a stale file).
fn keep_opened(rt: &Runtime, path: std::path::PathBuf, file: Option<std::fs::File>) {
    rt.http.borrow_mut().opened = file.map(|f| (path, f));
}

/// The file kept open for `path`, if it is the last one found.
fn take_opened(rt: &Runtime, path: &str) -> Option<std::fs::File> {
    match rt.http.borrow_mut().opened.take() {
        Some((p, f)) if p.as_os_str() == path => Some(f),
        _ => None,
    }
}

/// Answers with the file at `path` (from byte `offset`, `length` bytes; default: to its end),
/// read as the client takes it, so memory does not follow the file's size; one piece or less
/// goes at once, as a plain answer.
fn send_file(
    rt: &Runtime,
    key: Key,
    response: Response,
    path: &str,
    range: (Value, Value),
) -> std::result::Result<(), String> {
    use std::io::{Seek, SeekFrom};
    let whole = |v: &Value, what: &str| match v {
        Value::Nil => Ok(None),
        Value::Integer(n) if *n >= 0 => Ok(Some(*n as u64)),
        Value::Number(n) if *n >= 0.0 && n.fract() == 0.0 => Ok(Some(*n as u64)),
        other => Err(format!("the response's {what} must be a whole number >= 0, got {}", show(other))),
    };
    let (offset, length) = (whole(&range.0, "offset")?.unwrap_or(0), whole(&range.1, "length")?);
    let mut file = match take_opened(rt, path) {
        Some(file) => file,
        None => std::fs::File::open(path).map_err(|e| format!("cannot open '{path}': {e}"))?,
    };
    let unreadable = |e: std::io::Error| format!("cannot read '{path}': {e}");
    if offset > 0 {
        file.seek(SeekFrom::Start(offset)).map_err(unreadable)?;
    }
    // A length of at most one piece needs no size: the file's end may only make it shorter.
    let left = match length.filter(|n| *n <= FILE_CHUNK) {
        Some(n) => n,
        None => {
            length.unwrap_or(u64::MAX).min(file.metadata().map_err(unreadable)?.len().saturating_sub(offset))
        }
    };
    // One piece or less: read now and sent as a plain answer.
    if left <= FILE_CHUNK {
        use std::io::Read;
        let mut body = Vec::with_capacity(left as usize);
        file.take(left).read_to_end(&mut body).map_err(unreadable)?;
        return send(rt, key, Response { body: &body, ..response });
    }
    let streaming = answer(rt, key, |proto, now, date| {
        proto.respond_streamed(now, Response { date, ..response }, Some(left))?;
        Ok(proto.is_streaming())
    })?;
    if streaming {
        if let Some(conn) = rt.http.borrow_mut().conns.get_mut(&key) {
            conn.file = Some(Box::new(FileBody { file, left }));
        }
    }
    Ok(())
}

/// Feeds a connection's file body while the socket takes it and the tick's budget lasts (then
/// it asks to be woken next tick); once the file is sent the next request may start. Each
/// piece is written at once, not at the end of the tick, so a socket that takes everything is
/// fed again (it will not report itself drained).
fn pump(rt: &Runtime, key: Key) {
    use std::io::Read;
    let now = rt.driver.borrow().now();
    let done = loop {
        let mut guard = rt.http.borrow_mut();
        let http = &mut *guard;
        let used = match http.pumped {
            Some((at, used)) if at == now => used,
            _ => 0,
        };
        let Some(body) = http.conns.get_mut(&key).and_then(|c| c.file.as_mut()) else { return };
        let mut driver = rt.driver.borrow_mut();
        let Some(proto) = driver.proto::<HttpServerConn>(key) else { return };
        if !proto.is_streaming() {
            break true;
        }
        if !proto.wants_body() {
            driver.flush(key);
            match driver.proto::<HttpServerConn>(key) {
                Some(proto) if proto.wants_body() => continue,
                // A backlog: the socket reports when it drained.
                _ => return,
            }
        }
        if used >= PUMP_BUDGET {
            // A later tick (a wake due now could come back within this one).
            driver.set_wake(key, Some(now + std::time::Duration::from_millis(1)));
            break false;
        }
        if http.scratch.is_empty() {
            http.scratch = vec![0; FILE_CHUNK as usize];
        }
        let chunk = &mut http.scratch[..FILE_CHUNK.min(body.left) as usize];
        match body.file.read(chunk) {
            // The file shrank or failed under us: the answer cannot be completed.
            Ok(0) | Err(_) => {
                proto.end_body(now);
                break true;
            }
            Ok(n) => {
                proto.send_body(now, &chunk[..n]);
                body.left -= n as u64;
                http.pumped = Some((now, used + n));
            }
        }
    };
    if done {
        let server = rt.http.borrow_mut().conns.get_mut(&key).map(|c| {
            c.file = None;
            c.server
        });
        let stopped = server.is_some_and(|id| rt.http.borrow().servers.get(&id).is_none_or(|s| s.stopped));
        if stopped {
            finish(rt, key);
        }
    }
    rt.flush(key);
    // Reading may have paused behind the file; nothing else restarts it (edge-triggered).
    rt.resume_reading(key);
}

/// Runs `f` on the connection with the time and the `Date` value, if it still waits for an
/// answer; else nothing (it closed, or failed before the layer above heard of it) and
/// `T::default()`.
fn answer<T: Default>(
    rt: &Runtime,
    key: Key,
    f: impl FnOnce(&mut HttpServerConn, std::time::Instant, &str) -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    let mut http = rt.http.borrow_mut();
    let date = http.date();
    let mut driver = rt.driver.borrow_mut();
    let now = driver.now();
    match driver.proto::<HttpServerConn>(key) {
        Some(proto) if proto.awaits_response() && !proto.is_closed() => f(proto, now, date),
        _ => Ok(T::default()),
    }
}

/// Hands `response` to the connection, dated now (see [`answer`]).
fn send(rt: &Runtime, key: Key, response: Response) -> std::result::Result<(), String> {
    answer(rt, key, |proto, now, date| proto.respond(now, Response { date, ..response }))
}

fn show(v: &Value) -> String {
    match v {
        Value::Integer(n) => n.to_string(),
        Value::Number(n) => n.to_string(),
        other => lua_type(other).to_owned(),
    }
}

/// `luna.close()`: every server stops.
pub(crate) fn close_all(lua: &Lua, rt: &Runtime) -> Result<()> {
    let ids: Vec<u64> = rt.http.borrow().servers.keys().copied().collect();
    let mut result = Ok(());
    for id in ids {
        result = result.and(stop(lua, rt, id));
    }
    result
}

/// What `luna.url_encode` leaves as is: RFC 3986's unreserved characters.
const ENCODED: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// `luna.url_encode(s[, binary])` (Lune's `urlEncode`): every byte but `A-Z a-z 0-9 - . _ ~` as
/// `%XX`; `s` must be UTF-8 unless `binary`.
fn url_encode(lua: &Lua, (s, binary): (mlua::String, Option<bool>)) -> Result<mlua::String> {
    let bytes = s.as_bytes();
    if !binary.unwrap_or(false) && std::str::from_utf8(&bytes).is_err() {
        return Err(misuse(
            "luna.url_encode(s, binary)",
            "'s' is not UTF-8: pass binary = true to encode bytes",
        ));
    }
    lua.create_string(percent_encoding::percent_encode(&bytes, ENCODED).to_string())
}

/// `luna.url_decode(s[, binary])` (Lune's `urlDecode`): `%XX` sequences decoded (`+` stays);
/// the result must be UTF-8 unless `binary`.
fn url_decode(lua: &Lua, (s, binary): (mlua::String, Option<bool>)) -> Result<mlua::String> {
    let decoded: Vec<u8> = percent_encoding::percent_decode(&s.as_bytes()).collect();
    if !binary.unwrap_or(false) && std::str::from_utf8(&decoded).is_err() {
        return Err(misuse(
            "luna.url_decode(s, binary)",
            "the decoded text is not UTF-8: pass binary = true to get the bytes",
        ));
    }
    lua.create_string(decoded)
}

/// Adds `luna.serve`, `luna.new_http_app`, `luna.url_encode` and `luna.url_decode`.
pub(crate) fn register(lua: &Lua, module: &Table) -> Result<()> {
    module.set("serve", lua.create_function(|lua, args| serve(lua, args, false))?)?;
    module.set("url_encode", lua.create_function(url_encode)?)?;
    module.set("url_decode", lua.create_function(url_decode)?)?;
    let status_codes = lua.create_table()?;
    for code in 100..600 {
        let reason = crate::proto::http::reason(code);
        if !reason.is_empty() {
            status_codes.raw_set(code, reason)?;
        }
    }
    let core = app::core(lua)?;
    core.set("serve", lua.create_function(|lua, args| serve(lua, args, true))?)?;
    let new_http_app: Function = lua
        .load(include_str!("../../../lua/http_app.lua"))
        .set_name("=http_app.lua")
        .call((module.clone(), core, status_codes))?;
    module.set("new_http_app", new_http_app)
}
