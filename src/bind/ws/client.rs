//! WebSocket clients: `lunac.connect_to_web_app`, `lunac.disconnect_to_web_app` and the app
//! object (`send`, `close`, callbacks).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use mlua::{
    AnyUserData, Function, IntoLuaMulti, Lua, MetaMethod, MultiValue, RegistryKey, Result, Table, Thread,
    UserData, UserDataMethods, Value,
};

use super::super::error::{bad_arg, message, misuse};
use super::super::options::Options;
use super::super::policy::Policy;
use super::super::sched::{park_value, Job};
use super::super::{runtime, Runtime};
use super::TAG;
use super::{close_code, opcode_arg, opcodes, policy, send, settings, with_data, with_stream, Client};
use crate::driver::{ClientTls, ConnectOptions, Key, Lookup, Target};
use crate::proto::ws::{Opcode, Received, WsConfig, WsSession, WsUrl};

pub(super) const ON_CONNECT: usize = 0;
const ON_MESSAGE: usize = 1;
const ON_CLOSE: usize = 2;

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
    "compression",
    "ping_interval",
    "ping_timeout",
];

/// A client app (`lunac.connect_to_web_app`): its id and name (the name outlives the app, so
/// `on_close` can read `self.name`), and what `app:receive()` still has to give once the
/// connection ended.
struct WsClient(u64, String, RefCell<After>);

/// Messages that were unread when the connection ended, then the end (`was_clean, code,
/// reason`), which `app:receive()` returns from then on.
#[derive(Default)]
struct After {
    /// The upgrade completed (`app:wait_connected()` answers true even if it ended since).
    opened: bool,
    unread: VecDeque<(Opcode, tungstenite::Bytes)>,
    end: Option<(bool, u16, String)>,
}

/// Fields users attach to a client object (their own data).
fn fields(ud: &AnyUserData) -> Result<Table> {
    ud.user_value::<Table>()
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
                    (b"receive", _) | (b"wait_connected", _) => {
                        // A field the user set under that name comes first.
                        let own = fields(&ud)?.raw_get::<Value>(&key)?;
                        if !own.is_nil() {
                            return Ok(own);
                        }
                        let name = if name.as_bytes().as_ref() == b"receive" {
                            "ws_client_receive"
                        } else {
                            "ws_client_wait"
                        };
                        return lua.named_registry_value::<Value>(&format!("luna.{name}"));
                    }
                    (b"name", _) => return lua.create_string(&ud.borrow::<WsClient>()?.1).map(Value::String),
                    (b"connected", c) => {
                        let open = c.and_then(|c| c.stream).is_some_and(|k| {
                            rt.driver.borrow_mut().proto::<WsSession>(k).is_some_and(|s| s.is_open())
                        });
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
        Some(
            rt.tls
                .borrow_mut()
                .client("ssl", ca.as_deref(), verify, &[b"http/1.1"])
                .map_err(|e| misuse(call, e))?,
        )
    } else {
        None
    };
    let settings = settings(&opts, WsConfig::default(), false)?;
    let policy = policy(&opts, lua, format!("web-client '{name}'"))?;
    let mut callbacks: [Option<RegistryKey>; 3] = Default::default();
    for (slot, key) in [(ON_CONNECT, "on_connect"), (ON_MESSAGE, "on_message"), (ON_CLOSE, "on_close")] {
        callbacks[slot] = opts.function(key)?.map(|f| lua.create_registry_value(f)).transpose()?;
    }
    let id = rt.ws.borrow_mut().id();
    let object = new_object(lua, WsClient(id, name.clone(), RefCell::default()))?;
    let client = Client {
        name,
        policy,
        object: lua.create_registry_value(&object)?,
        url,
        protocols,
        tls,
        settings: std::sync::Arc::new(settings),
        stream: None,
        callbacks,
        waiting: Vec::new(),
        receiving: false,
    };
    rt.ws.borrow_mut().clients.insert(id, client);
    start_client(&rt, id, Instant::now());
    Ok(object)
}

/// Resolves (without blocking) and connects a client; failures are reported by the next update.
pub(super) fn start_client(rt: &Runtime, id: u64, now: Instant) {
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
    let started = WsSession::client(&url, &protocols, key, settings, now)
        .map_err(|e| e.to_string())
        .and_then(|session| {
            let tls = tls.map(|config| ClientTls { config, server_name: url.host.clone() });
            let options = ConnectOptions { tls, ..ConnectOptions::default() };
            let target = Target::Tcp(SocketAddr::new(ip, url.port));
            rt.driver.borrow_mut().connect(&target, Box::new(session), options, TAG)
        });
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

pub(super) fn disconnect(rt: &Runtime, id: u64, code: u16, reason: &str) {
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

pub(super) fn client_callback(lua: &Lua, rt: &Runtime, id: u64, slot: usize, args: MultiValue) -> Result<()> {
    let (callback, object, policy) = {
        let ws = rt.ws.borrow();
        let Some(c) = ws.clients.get(&id) else { return Ok(()) };
        let callback = match &c.callbacks[slot] {
            Some(key) => lua.registry_value::<Function>(key)?,
            None => return Ok(()),
        };
        (callback, lua.registry_value::<AnyUserData>(&c.object)?, c.policy.clone())
    };
    call_back(lua, &callback, object, &policy, args)
}

/// Calls `callback(object, args...)`; an error goes to the app's policy.
fn call_back(
    lua: &Lua,
    callback: &Function,
    object: AnyUserData,
    policy: &Policy,
    args: MultiValue,
) -> Result<()> {
    let mut full = MultiValue::new();
    full.push_back(Value::UserData(object));
    full.extend(args);
    match callback.call::<()>(full) {
        Ok(()) => Ok(()),
        Err(e) => policy.report(lua, &message(&e)),
    }
}

pub(super) fn client_inbox(lua: &Lua, rt: &Runtime, id: u64, conn: Key) -> Result<()> {
    // In receiving mode messages wait in the session for `app:receive()` (its inbox bound holds
    // reading back); when the end comes, what is unread moves to the app object and the end is
    // handled at once.
    let receiving =
        rt.ws.borrow().clients.get(&id).is_some_and(|c| c.receiving && c.callbacks[ON_MESSAGE].is_none());
    if receiving {
        keep_unread(lua, rt, id, conn)?;
    }
    loop {
        let received = {
            let mut driver = rt.driver.borrow_mut();
            let session = driver.proto::<WsSession>(conn);
            if receiving && session.as_ref().is_some_and(|s| s.has_message()) {
                None
            } else {
                session.and_then(|s| s.receive())
            }
        };
        match received {
            None => {
                // The inbox was drained: reading held back for it goes on now.
                rt.resume_reading(conn);
                wake_receivers(rt, id);
                return Ok(());
            }
            Some(Received::Message(op, data)) => {
                let args = message_values(lua, rt, op, &data)?;
                client_callback(lua, rt, id, ON_MESSAGE, args)?;
            }
            Some(Received::Closed { code, reason, clean }) => {
                super::count_end(rt, code, clean);
                rt.driver.borrow_mut().close(conn);
                rt.ws.borrow_mut().client_streams.remove(&conn);
                return client_closed(lua, rt, id, (clean, code), &reason);
            }
        }
    }
}

/// Once the session ended, moves its unread messages to the app object (bounded by the
/// session's inbox), so the end can be handled now.
fn keep_unread(lua: &Lua, rt: &Runtime, id: u64, conn: Key) -> Result<()> {
    let mut driver = rt.driver.borrow_mut();
    let Some(session) = driver.proto::<WsSession>(conn).filter(|s| s.end().is_some() && s.has_message())
    else {
        return Ok(());
    };
    let Some(object) = object_of(lua, rt, id)? else { return Ok(()) };
    let client = object.borrow::<WsClient>()?;
    let mut after = client.2.borrow_mut();
    while session.has_message() {
        if let Some(Received::Message(op, data)) = session.receive() {
            after.unread.push_back((op, data));
        }
    }
    Ok(())
}

/// A received message as Lua's `message, opcode` (counted for `luna.stats()`).
fn message_values(lua: &Lua, rt: &Runtime, op: Opcode, data: &[u8]) -> Result<MultiValue> {
    rt.counters.borrow_mut().ws_in += 1;
    (lua.create_string(data)?, op.as_u8()).into_lua_multi(lua)
}

/// The app object of client `id`, while the client is registered.
fn object_of(lua: &Lua, rt: &Runtime, id: u64) -> Result<Option<AnyUserData>> {
    match rt.ws.borrow().clients.get(&id) {
        Some(c) => lua.registry_value(&c.object).map(Some),
        None => Ok(None),
    }
}

/// The upgrade completed: notes it on the app object and wakes `app:wait_connected()`.
pub(super) fn opened(lua: &Lua, rt: &Runtime, id: u64) -> Result<()> {
    let Some(object) = object_of(lua, rt, id)? else { return Ok(()) };
    object.borrow::<WsClient>()?.2.borrow_mut().opened = true;
    wake_receivers(rt, id);
    Ok(())
}

/// Makes the coroutines waiting in `app:receive()` / `app:wait_connected()` ready.
pub(super) fn wake_receivers(rt: &Runtime, id: u64) {
    let waiting = rt.ws.borrow_mut().clients.get_mut(&id).map(|c| std::mem::take(&mut c.waiting));
    if let Some(waiting) = waiting {
        rt.sched.borrow_mut().jobs.extend(waiting.into_iter().map(Job::Key));
    }
}

/// `core.ws_client_take(app, co)` → `message, opcode`, `nil, nil, was_clean, code, reason` once
/// the connection ended, or `PARK` after parking `co` until something arrives.
fn take(lua: &Lua, (app, co): (AnyUserData, Thread)) -> Result<MultiValue> {
    const CALL: &str = "app:receive()";
    let client = app.borrow::<WsClient>()?;
    let id = client.0;
    {
        let mut after = client.2.borrow_mut();
        if let Some((op, data)) = after.unread.pop_front() {
            drop(after);
            return message_values(lua, &*runtime(lua)?, op, &data);
        }
        if let Some((clean, code, reason)) = after.end.clone() {
            return (Value::Nil, Value::Nil, clean, code, reason).into_lua_multi(lua);
        }
    }
    let rt = runtime(lua)?;
    let stream = {
        let mut ws = rt.ws.borrow_mut();
        let Some(c) = ws.clients.get_mut(&id) else { return park(lua, &rt, id, co) };
        if c.callbacks[ON_MESSAGE].is_some() {
            return Err(misuse(CALL, "this app has an on_message callback, which gets its messages"));
        }
        c.receiving = true;
        c.stream
    };
    if let Some(key) = stream {
        let taken = rt
            .driver
            .borrow_mut()
            .proto::<WsSession>(key)
            .filter(|s| s.has_message())
            .and_then(|s| s.receive());
        if let Some(Received::Message(op, data)) = taken {
            rt.resume_reading(key);
            let more = rt.driver.borrow_mut().proto::<WsSession>(key).is_some_and(|s| s.has_message());
            if more {
                // Another coroutine may be waiting for the next one.
                wake_receivers(&rt, id);
            }
            return message_values(lua, &rt, op, &data);
        }
    }
    park(lua, &rt, id, co)
}

/// `core.ws_client_wait(app, co)` → `true` once connected, `nil, reason` if the connection
/// ended first, or `PARK` after parking `co`.
fn wait_open(lua: &Lua, (app, co): (AnyUserData, Thread)) -> Result<MultiValue> {
    let client = app.borrow::<WsClient>()?;
    {
        let after = client.2.borrow();
        if after.opened {
            return true.into_lua_multi(lua);
        }
        if let Some((_, code, reason)) = &after.end {
            return (Value::Nil, format!("closed ({code}) {reason}").trim_end().to_owned())
                .into_lua_multi(lua);
        }
    }
    let rt = runtime(lua)?;
    if let Some(c) = rt.ws.borrow_mut().clients.get_mut(&client.0) {
        // Waiting for the connection opts in to `receive`: nothing that arrives is dropped.
        c.receiving = c.callbacks[ON_MESSAGE].is_none();
    }
    park(lua, &rt, client.0, co)
}

fn park(lua: &Lua, rt: &Runtime, id: u64, co: Thread) -> Result<MultiValue> {
    let key = lua.create_registry_value(co)?;
    match rt.ws.borrow_mut().clients.get_mut(&id) {
        Some(c) => c.waiting.push(key),
        None => rt.sched.borrow_mut().jobs.push_back(Job::Key(key)),
    }
    Value::LightUserData(park_value()).into_lua_multi(lua)
}

/// A client's connection ended (or never started): forget it, then `on_close(self, code,
/// reason)` once. Forgotten first, so `on_close` may reconnect under the same name or close
/// everything without reaching this client again.
pub(super) fn client_closed(
    lua: &Lua,
    rt: &Runtime,
    id: u64,
    (clean, code): (bool, u16),
    reason: &str,
) -> Result<()> {
    let Some(c) = rt.ws.borrow_mut().clients.remove(&id) else { return Ok(()) };
    // Coroutines in `app:receive()` / `app:wait_connected()` see the end from now on.
    rt.sched.borrow_mut().jobs.extend(c.waiting.into_iter().map(Job::Key));
    if let Some(key) = c.stream {
        if rt.ws.borrow_mut().client_streams.remove(&key).is_some() {
            rt.driver.borrow_mut().close(key);
        }
    }
    let mut result = Ok(());
    if code == 1006 {
        result = c.policy.network(lua, &format!("connection lost: {reason}"));
    }
    let object = lua.registry_value::<AnyUserData>(&c.object)?;
    lua.remove_registry_value(c.object)?;
    object.borrow::<WsClient>()?.2.borrow_mut().end = Some((clean, code, reason.to_owned()));
    let mut callbacks = c.callbacks;
    let on_close = callbacks[ON_CLOSE].take();
    for key in callbacks.into_iter().flatten() {
        lua.remove_registry_value(key)?;
    }
    if let Some(key) = on_close {
        let callback = lua.registry_value::<Function>(&key)?;
        lua.remove_registry_value(key)?;
        let args = (code, reason.to_owned()).into_lua_multi(lua)?;
        result = result.and(call_back(lua, &callback, object, &c.policy, args));
    }
    result
}

/// The primitives of `app:receive()` and `app:wait_connected()` (their Lua halves are in
/// `lua/luna.lua`).
pub(super) fn core(lua: &Lua, core: &Table) -> Result<()> {
    core.set("ws_client_take", lua.create_function(take)?)?;
    core.set("ws_client_wait", lua.create_function(wait_open)?)
}

pub(super) fn register(lua: &Lua, module: &Table) -> Result<()> {
    module.set("connect_to_web_app", lua.create_function(connect_to_web_app)?)?;
    module.set("disconnect_to_web_app", lua.create_function(disconnect_to_web_app)?)
}
