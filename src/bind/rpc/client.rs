//! Client apps: `lunac.connect_to_app` / `lunac.disconnect_to_app`, each app's session (name
//! resolution, the handshake, reconnects), and what the server sends (answers, pushes).

use rustc_hash::FxHashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::{Function, Lua, RegistryKey, Result, Table, Value};
use ring::rand::SystemRandom;

use super::super::error::{message, misuse};
use super::super::msgpack::{decode, validate};
use super::super::options::Options;
use super::super::policy::Policy;
use super::super::raw::{self, FnRef};
use super::super::sched;
use super::super::{runtime, Runtime, Side};
use super::calls::{arm_calls, Call};
use super::{app_id, flush, from_hex, func, half, key_of, open_socket};
use crate::driver::net::any_address;
use crate::driver::{Key, Lookup};
use crate::proto::rpc::{self, Client, ClientEvent, Envelope};

/// Where a client app's link to its server stands.
#[derive(PartialEq, Eq, Clone, Copy, Debug)]
pub(super) enum Link {
    /// Waiting for the host name to resolve.
    Resolving,
    /// A session is (being) established on `key`.
    Open,
    /// The session ended; waiting for `reconnect_time` (if any).
    Down,
}

pub(super) struct ClientApp {
    pub name: String,
    pub key: Option<Key>,
    pub link: Link,
    pub policy: Rc<Policy>,
    table: RegistryKey,
    host: String,
    port: u16,
    pub config: rpc::Config,
    pinned: Option<[u8; 32]>,
    reconnect: Option<Duration>,
    listener: Option<RegistryKey>,
    connect_server: Option<RegistryKey>,
    disconnect_server: Option<RegistryKey>,
    pub connected: bool,
    pub calls: FxHashMap<u32, Call>,
    pub next_call: u32,
    /// Messages queued while the host name resolves.
    pub early: Vec<Vec<u8>>,
}

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
    let policy = Rc::new(Policy::from_options(lua, &o, format!("client app '{name}'"))?);
    let encryption = o.boolean("encryption")?.unwrap_or(true);
    let max_message_size = o.size("max_message_size")?.unwrap_or(rpc::Config::default().max_message_size);
    let app = ClientApp {
        name: name.clone(),
        key: None,
        link: Link::Resolving,
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
        calls: FxHashMap::default(),
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
        c.link = Link::Resolving;
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
    let client = match Client::new(config, server, pinned, now, &SystemRandom::new()) {
        Ok(c) => c,
        Err(e) => return client_down(lua, rt, id, None, e.to_string(), now),
    };
    let opened = open_socket(rt, &[any_address(&server)], Box::new(client));
    let key = match opened {
        Ok(key) => key,
        Err(e) => return client_down(lua, rt, id, None, format!("cannot open a UDP socket: {e}"), now),
    };
    let (early, next) = {
        let mut st = rt.rpc.borrow_mut();
        st.by_key.insert(key, id);
        let Some(c) = st.clients.get_mut(&id) else { return Ok(()) };
        c.key = Some(key);
        c.link = Link::Open;
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
    arm_calls(rt, key, next);
    if let Some(c) = rt.driver.borrow_mut().datagram_proto::<Client>(key) {
        let sent = early.into_iter().filter_map(|msg| c.send(msg).ok()).count();
        rt.counters.borrow_mut().rpc_out += sent as u64;
    }
    flush(lua, rt, key)
}

/// A host name some client apps were waiting for resolved (called by `tick`).
pub(crate) fn resolved(lua: &Lua, rt: &Runtime, host: &str, now: Instant) -> Result<()> {
    let waiting: Vec<u32> = rt
        .rpc
        .borrow()
        .clients
        .iter()
        .filter(|(_, c)| c.link == Link::Resolving && c.host == host)
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
        if c.link == Link::Down {
            return Ok(());
        }
        c.connected = false;
        c.link = Link::Down;
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
        let mut kept = FxHashMap::default();
        for (call, state) in calls {
            match state {
                Call::Waiting { thread, .. } => {
                    if let Some(t) = thread {
                        sched.jobs.push_back(super::super::sched::Job::Raw(t));
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
                super::retire(rt, &mut driver, key);
                if let Some(d) = driver.datagram(key) {
                    d.set_proto(None);
                }
                driver.set_wake(key, Some(now + after));
            }
            None => {
                let mut driver = rt.driver.borrow_mut();
                super::retire(rt, &mut driver, key);
                driver.close(key);
                drop(driver);
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
    callbacks: Vec<FnRef>,
    disconnect_server: Option<Function>,
    reason: &str,
) -> Result<()> {
    let text = format!("Disconnected: {reason}");
    let mut result = policy.log(lua, &format!("disconnected: {reason}"));
    for f in callbacks {
        result =
            result.and(call_back(lua, policy, f, &[raw::Value::Nil, raw::Value::Slice(text.as_bytes())]));
    }
    if let Some(cb) = disconnect_server {
        if let Err(e) = cb.call::<()>(reason) {
            result = result.and(policy.report(lua, &format!("disconnect_server: {}", message(&e))));
        }
    }
    result
}

/// An event of app `id`'s client.
pub(super) fn event(lua: &Lua, rt: &Runtime, id: u32, key: Key, ev: ClientEvent, now: Instant) -> Result<()> {
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
        ClientEvent::Message(data) => message_in(lua, rt, id, &data),
    }
}

/// An answer or a push from the server.
fn message_in(lua: &Lua, rt: &Runtime, id: u32, data: &[u8]) -> Result<()> {
    rt.counters.borrow_mut().rpc_in += 1;
    match Envelope::decode(data) {
        Ok(Envelope::Response { id: call, result }) => {
            let (cb, policy) = {
                let mut st = rt.rpc.borrow_mut();
                let Some(c) = st.clients.get_mut(&id) else { return Ok(()) };
                let policy = c.policy.clone();
                match c.calls.remove(&call) {
                    Some(Call::Waiting { thread: Some(thread), .. }) => {
                        drop(st);
                        return deliver(lua, rt, thread, result);
                    }
                    Some(Call::Waiting { thread: None, .. }) => {
                        // A blocking fetch picks it up.
                        c.calls.insert(call, Call::Done(result.map(<[u8]>::to_vec).map_err(str::to_owned)));
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
            let (args, n) = answer(result);
            call_back(lua, &policy, cb, &args[..n])
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
    }
}

/// An answer as the values Lua gets: `result`, or `nil, error` (also when the result is not
/// valid MessagePack), borrowed from the message; the count says how many of the two.
fn answer<'a>(result: std::result::Result<&'a [u8], &'a str>) -> ([raw::Value<'a>; 2], usize) {
    match result.map(|bytes| validate(bytes).map(|()| bytes)) {
        Ok(Ok(bytes)) => ([raw::Value::MsgPack(bytes.into()), raw::Value::Nil], 1),
        Ok(Err(e)) => ([raw::Value::Nil, raw::Value::Owned(message(&e).into_bytes())], 2),
        Err(e) => ([raw::Value::Nil, raw::Value::Slice(e.as_bytes())], 2),
    }
}

/// Calls a `noawait_fetch` callback with `args` and frees its slot; what it raises goes to the
/// app's policy.
fn call_back(lua: &Lua, policy: &Policy, f: FnRef, args: &[raw::Value]) -> Result<()> {
    let called = raw::call(lua, f.0, args);
    f.release(lua);
    match called {
        Ok(()) => Ok(()),
        Err(e) => policy.report(lua, &format!("noawait_fetch callback: {}", message(&e))),
    }
}

/// Hands the answer of a `fetch` to the coroutine waiting in it (`DELIVERED, result` or
/// `DELIVERED, nil, error`), decoded straight onto its stack.
fn deliver(
    lua: &Lua,
    rt: &Runtime,
    thread: raw::ThreadRef,
    result: std::result::Result<&[u8], &str>,
) -> Result<()> {
    let ([a, b], n) = answer(result);
    let args = [raw::Value::Light(sched::delivered_value().0), a, b];
    let resumed = sched::resume_parked(lua, rt, thread.id, thread.ptr, &args[..n + 1]);
    thread.release(lua);
    resumed
}

/// A wake-up of the client entry: reconnect time, or a waiting `fetch` ran out of time.
pub(super) fn wake(lua: &Lua, rt: &Runtime, id: u32, key: Key, now: Instant) -> Result<()> {
    let due =
        matches!(rt.rpc.borrow().clients.get(&id), Some(c) if c.link == Link::Down && c.reconnect.is_some());
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
                    rt.sched.borrow_mut().jobs.push_back(sched::Job::Raw(t));
                }
            } else {
                next = Some(next.map_or(*deadline, |n| n.min(*deadline)));
            }
        }
    }
    drop(st);
    arm_calls(rt, key, next);
    Ok(())
}

fn disconnect_to_app(lua: &Lua, x: Value) -> Result<(bool, Option<String>)> {
    let rt = runtime(lua)?;
    let Some(id) = app_id(&rt, "lunac.disconnect_to_app(app or name)", &x, Side::Client)? else {
        return Ok((false, Some("App not found".into())));
    };
    remove(lua, &rt, id)?;
    Ok((true, None))
}

/// Removes a client app: unregistered first, so nothing its callbacks call can reach it again
/// (a nested close finds it gone), then told once: `disconnect_server("Close server")` unless its
/// session already ended and was reported.
pub(super) fn remove(lua: &Lua, rt: &Runtime, id: u32) -> Result<()> {
    let Some(app) = rt.rpc.borrow_mut().clients.remove(&id) else { return Ok(()) };
    if let Some(key) = app.key {
        let mut driver = rt.driver.borrow_mut();
        // Calls made since the last update leave before the goodbye (closing drops the queue).
        driver.flush(key);
        if let Some(c) = driver.datagram_proto::<Client>(key) {
            if !c.is_closed() {
                c.close("Close server");
            }
        }
        // The goodbye leaves now; its events are the app's, which is gone.
        driver.flush(key);
        super::retire(rt, &mut driver, key);
        driver.close(key);
        drop(driver);
        rt.rpc.borrow_mut().by_key.remove(&key);
    }
    let ClientApp { table, listener, connect_server, disconnect_server, calls, link, policy, .. } = app;
    let cb = func(lua, &disconnect_server)?;
    for k in [Some(table), listener, connect_server, disconnect_server].into_iter().flatten() {
        lua.remove_registry_value(k)?;
    }
    let mut callbacks = Vec::new();
    for (_, call) in calls {
        match call {
            Call::Waiting { thread: Some(t), .. } => rt.sched.borrow_mut().jobs.push_back(sched::Job::Raw(t)),
            Call::Callback(f) => callbacks.push(f),
            _ => {}
        }
    }
    if link == Link::Down {
        // Its end was reported when the session ended (no call was accepted since).
        callbacks.into_iter().for_each(|f| f.release(lua));
        return Ok(());
    }
    report_down(lua, &policy, callbacks, cb, "Close server")
}

pub(super) fn register(lua: &Lua, module: &Table) -> Result<()> {
    module.set("connect_to_app", lua.create_function(connect_to_app)?)?;
    module.set("disconnect_to_app", lua.create_function(disconnect_to_app)?)
}
