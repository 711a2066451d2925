//! WebSocket servers: `luna.new_web_app`, `luna.remove_web_app`, and each accepted connection's
//! life (handler coroutine, `on_close`, release).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use std::rc::Rc;

use mlua::{Function, Lua, RegistryKey, Result, Table, Value};

use super::super::error::{bad_arg, lua_type, message, misuse};
use super::super::options::Options;
use super::super::policy::Policy;
use super::super::{addr, runtime, sched, Runtime};
use super::{count_end, opcodes, policy, settings, with_stream, Conn, Server, TAG};
use crate::driver::net::ListenOptions;
use crate::driver::{Key, ListenerConfig};
use crate::proto::ws::{Settings, WsConfig, WsSession};

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
    "compression",
    "ping_interval",
    "ping_timeout",
];

/// Listens on the first of `addrs` that works; accepted connections run WebSocket sessions
/// waiting for an upgrade to one of `handlers`.
fn bind_listener(
    rt: &Runtime,
    addrs: &[SocketAddr],
    tls: Option<Arc<rustls::ServerConfig>>,
    handlers: Vec<String>,
    settings: Settings,
) -> std::result::Result<(Key, SocketAddr), String> {
    let handlers: Arc<[String]> = handlers.into();
    let settings = Arc::new(settings);
    let (socket, local) = addr::tcp_listen_first(addrs, ListenOptions::default())?;
    let config = ListenerConfig {
        tls,
        make: Box::new(move |now| Box::new(WsSession::server(handlers.clone(), settings.clone(), now))),
        max_connections: None,
        nodelay: true,
    };
    rt.driver.borrow_mut().listen(socket, config, TAG).map(|key| (key, local)).map_err(|e| e.to_string())
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
    let mut wrong = Vec::new();
    for pair in protocols.pairs::<Value, Value>() {
        match pair? {
            (Value::String(k), Value::Function(f)) => {
                handlers.insert(k.to_str()?.to_owned(), lua.create_registry_value(f)?);
            }
            (k, v) => wrong.push(format!("{} = {}", lua_type(&k), lua_type(&v))),
        }
    }
    // The first in sorted order, so the same config always gets the same error.
    if let Some(first) = wrong.iter().min() {
        for (_, key) in handlers {
            lua.remove_registry_value(key)?;
        }
        return Err(misuse(
            call,
            format!("'protocols' maps protocol names to handler functions; got {first}"),
        ));
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
                super::super::tls::server_config("ssl", &cert, &key, &[b"http/1.1"])
                    .map_err(|e| misuse(call, e))?,
            )
        }
    };
    let settings = settings(&opts, WsConfig::default(), true)?;
    let policy = policy(&opts, lua, format!("web-app '{name}'"))?;
    let names: Vec<String> = handlers.keys().cloned().collect();

    let app = lua.create_table()?;
    app.set("name", name.as_str())?;
    app.set("host", host.as_str())?;
    app.set("opcodes", opcodes(lua)?)?;
    let id = rt.ws.borrow_mut().id();
    let app_key = lua.create_registry_value(&app)?;
    rt.ws.borrow_mut().servers.insert(
        id,
        Server {
            name,
            policy: policy.clone(),
            handlers,
            groups: HashMap::new(),
            listener: None,
            app: app_key,
        },
    );
    let shown = host.clone();
    let bind: addr::Continuation = Box::new(move |lua, rt, ips| {
        let Some(app) = rt.ws.borrow().servers.get(&id).map(|s| lua.registry_value::<Table>(&s.app)) else {
            return Ok(()); // removed while its host name resolved
        };
        let app = app?;
        let bound = ips.and_then(|ips| bind_listener(rt, &addr::with_port(&ips, port), tls, names, settings));
        match bound {
            Ok((key, local)) => {
                let mut ws = rt.ws.borrow_mut();
                ws.listeners.insert(key, id);
                if let Some(server) = ws.servers.get_mut(&id) {
                    server.listener = Some(key);
                }
                drop(ws);
                app.set("port", local.port())?;
                policy.log(lua, &format!("listening on {shown}:{}", local.port()))
            }
            Err(e) => {
                if let Some(server) = rt.ws.borrow_mut().servers.remove(&id) {
                    lua.remove_registry_value(server.app)?;
                }
                Err(misuse(call, e))
            }
        }
    });
    app.set("port", port)?;
    addr::resolve_then(lua, &rt, &host, true, bind)?;
    Ok(app)
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

pub(crate) fn remove_server(lua: &Lua, rt: &Runtime, id: u64) -> Result<()> {
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

/// A connection an HTTP server handed over, until its upgrade finished.
pub(crate) struct Upgrading {
    server: u64,
    group: String,
    pub(super) handler: RegistryKey,
}

/// A server record for the WebSocket connections an HTTP server upgrades (no listener of its
/// own); `luna.remove_web_app` and [`remove_server`] treat it as any web app.
pub(crate) fn attach(lua: &Lua, rt: &Runtime, name: String, policy: Rc<Policy>) -> Result<u64> {
    let app = lua.create_table()?;
    app.set("name", name.as_str())?;
    app.set("opcodes", opcodes(lua)?)?;
    let app = lua.create_registry_value(&app)?;
    let mut ws = rt.ws.borrow_mut();
    let id = ws.id();
    let server =
        Server { name, policy, handlers: HashMap::new(), groups: HashMap::new(), listener: None, app };
    ws.servers.insert(id, server);
    Ok(id)
}

/// What an HTTP server hands over with a connection.
pub(crate) struct Handover {
    /// The server record (from [`attach`]).
    pub server: u64,
    /// What `ws:broadcast` reaches.
    pub group: String,
    pub handler: Function,
    pub settings: Arc<Settings>,
}

/// Runs an HTTP connection as a WebSocket session: `head` is its upgrade request as sent (and
/// what came after; `eof` if the client finished sending), which the session answers (101, or
/// an error and a close); once upgraded, `handler(ws)` runs.
pub(crate) fn upgrade(
    lua: &Lua,
    rt: &Runtime,
    conn: Key,
    handover: Handover,
    head: &[u8],
    eof: bool,
) -> Result<()> {
    let Handover { server, group, handler, settings } = handover;
    let handler = lua.create_registry_value(handler)?;
    rt.ws.borrow_mut().upgrading.insert(conn, Upgrading { server, group, handler });
    let now = rt.driver.borrow().now();
    let session = WsSession::server(Arc::from(["default".to_owned()]), settings, now);
    rt.driver.borrow_mut().replace_proto(conn, Box::new(session), TAG, head, eof);
    Ok(())
}

/// A connection that finished its upgrade after an HTTP server handed it over.
pub(super) fn start(lua: &Lua, rt: &Runtime, conn: Key, up: Upgrading) -> Result<()> {
    let handler = lua.registry_value::<Function>(&up.handler)?;
    lua.remove_registry_value(up.handler)?;
    if !rt.ws.borrow().servers.contains_key(&up.server) {
        rt.driver.borrow_mut().close(conn); // its server went away meanwhile
        return Ok(());
    }
    rt.driver.borrow_mut().adopt(conn);
    run_handler(lua, rt, conn, up.server, up.group, handler)
}

pub(super) fn accepted(lua: &Lua, rt: &Runtime, conn: Key, listener: Key) -> Result<()> {
    let Some(server_id) = rt.ws.borrow().listeners.get(&listener).copied() else {
        rt.driver.borrow_mut().close(conn);
        return Ok(());
    };
    rt.driver.borrow_mut().adopt(conn);
    let Some(handler_name) =
        rt.driver.borrow_mut().proto::<WsSession>(conn).map(|s| s.upgrade().handler.clone())
    else {
        return Ok(());
    };
    let handler =
        lua.registry_value::<Function>(&rt.ws.borrow().servers[&server_id].handlers[&handler_name])?;
    run_handler(lua, rt, conn, server_id, handler_name, handler)
}

/// Starts `handler(ws)` for an upgraded connection of server record `server_id`, in `group`.
fn run_handler(
    lua: &Lua,
    rt: &Runtime,
    conn: Key,
    server_id: u64,
    handler_name: String,
    handler: Function,
) -> Result<()> {
    let peer = rt.driver.borrow_mut().stream(conn).map(|s| s.peer.to_string()).unwrap_or_default();
    let policy = rt.ws.borrow().servers[&server_id].policy.clone();
    policy.log(lua, &format!("client {peer} connected ({handler_name})"))?;
    let handle = rt.ws.borrow_mut().id();
    let object: Table = lua.named_registry_value::<Function>("luna.ws.new")?.call(handle)?;
    let hook = handler_end(conn, policy);
    let thread = sched::create_owned(lua, rt, handler, hook)?;
    {
        let mut ws = rt.ws.borrow_mut();
        let object_key = lua.create_registry_value(&object)?;
        ws.handles.insert(handle, conn);
        ws.conns.insert(
            conn,
            Conn {
                server: server_id,
                handle,
                object: object_key,
                group: handler_name.clone(),
                handler_ptr: thread.to_pointer() as usize,
                handler: lua.create_registry_value(&thread)?,
                parked: false,
                handler_done: false,
                closed_seen: false,
            },
        );
        if let Some(server) = ws.servers.get_mut(&server_id) {
            server.groups.entry(handler_name).or_default().insert(conn);
        }
    }
    sched::resume(lua, rt, &thread, object)
}

/// What happens when a connection's handler returns or raises: the connection closes (1000, or
/// 1011 after an error, which goes to the app's error policy).
fn handler_end(conn: Key, policy: std::rc::Rc<super::super::policy::Policy>) -> sched::Hook {
    Box::new(move |lua, rt, result| {
        let failure = result.err().map(|e| message(&e));
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
    })
}

pub(super) fn server_inbox(lua: &Lua, rt: &Runtime, conn: Key) -> Result<()> {
    let closed = rt.driver.borrow_mut().proto::<WsSession>(conn).is_some_and(|s| s.is_closed());
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
    let end = rt
        .driver
        .borrow_mut()
        .proto::<WsSession>(conn)
        .and_then(|s| s.end().map(|(code, reason, clean)| (code, reason.to_owned(), clean)));
    if let Some((code, _, clean)) = &end {
        count_end(rt, *code, *clean);
    }
    let end = end.map(|(code, reason, _)| (code, reason));
    if let (Some((code, reason)), Value::Function(on_close)) = (end, object.raw_get::<Value>("on_close")?) {
        if let Err(e) = on_close.call::<()>((code, reason)) {
            if let Some(policy) = &policy {
                policy.report(lua, &message(&e))?;
            }
        }
    }
    release_if_done(lua, rt, conn)
}

/// Forgets a server connection once its handler ended and the stream is closed.
fn release_if_done(lua: &Lua, rt: &Runtime, conn: Key) -> Result<()> {
    let closed = rt.driver.borrow_mut().proto::<WsSession>(conn).is_none_or(|s| s.is_closed());
    let done = rt.ws.borrow().conns.get(&conn).is_some_and(|c| c.handler_done && (closed || c.closed_seen));
    if !done {
        return Ok(());
    }
    let removed = rt.ws.borrow_mut().conns.remove(&conn);
    if let Some(c) = removed {
        rt.ws.borrow_mut().handles.remove(&c.handle);
        lua.remove_registry_value(c.object)?;
    }
    rt.driver.borrow_mut().close(conn);
    Ok(())
}

pub(super) fn register(lua: &Lua, module: &Table) -> Result<()> {
    module.set("new_web_app", lua.create_function(new_web_app)?)?;
    module.set("remove_web_app", lua.create_function(remove_web_app)?)
}
