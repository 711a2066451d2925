//! RPC apps at the Lua surface: `luna.new_app` / `luna.remove_app` ([`server`]) and
//! `lunac.connect_to_app` / `lunac.disconnect_to_app` ([`client`]), with the calls a client
//! makes ([`calls`]: `fetch`, `noawait_fetch`). This module holds their shared state and the
//! glue to the driver: each app is a datagram entry running a `proto::rpc` server or client,
//! whose events this module turns into calls. App, router and handler objects, the request
//! pipeline and the waiting `fetch` are the Lua half in `lua/rpc.lua`.

mod calls;
mod client;
mod server;

use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mlua::{Function, Lua, RegistryKey, Result, Table, Value};

use super::error::{bad_arg, lua_type, misuse};
use super::stats::Census;
use super::time::MAX_SECONDS;
use super::{sched, Runtime, Side};
use crate::driver::net::{self, UdpOptions};
use crate::driver::{Driver, Event, EventKind, Key, Tag};
use crate::proto::rpc::{self, Client, ClientEvent, Server, ServerEvent};
use crate::proto::stream::DatagramProtocol;

/// The tag of every entry this module opens.
pub(crate) const TAG: Tag = 2;

/// Datagrams read per update and socket: past it the rest waits for the next update, so a
/// flood cannot stall a frame.
const READ_BUDGET: usize = 4096;

#[derive(Default)]
pub(crate) struct RpcState {
    next_id: u32,
    servers: FxHashMap<u32, server::ServerApp>,
    clients: FxHashMap<u32, client::ClientApp>,
    by_key: FxHashMap<Key, u32>,
    /// The Lua half's `request` (the pipeline every request goes through).
    request: Option<RegistryKey>,
    /// The buffer a call's arguments are encoded into before they join its message (kept, so
    /// a call allocates only its message).
    args: Vec<u8>,
}

/// An event of an entry's protocol.
enum RpcEvent {
    Server(ServerEvent),
    Client(ClientEvent),
}

/// The next event of `key`'s protocol.
fn next_event(driver: &mut Driver, key: Key) -> Option<RpcEvent> {
    if let Some(server) = driver.datagram_proto::<Server>(key) {
        return server.poll_event().map(RpcEvent::Server);
    }
    driver.datagram_proto::<Client>(key)?.poll_event().map(RpcEvent::Client)
}

fn has_events(driver: &mut Driver, key: Key) -> bool {
    if let Some(server) = driver.datagram_proto::<Server>(key) {
        return server.has_events();
    }
    driver.datagram_proto::<Client>(key).is_some_and(|c| c.has_events())
}

/// Every event `key`'s protocol has (for callers that must not run Lua yet).
fn drain_events(driver: &mut Driver, key: Key) -> Vec<RpcEvent> {
    std::iter::from_fn(|| next_event(driver, key)).collect()
}

/// Handles the events of `key`'s protocol, one at a time (each may run Lua that changes
/// everything, the app's existence included).
fn handle_events(lua: &Lua, rt: &Runtime, key: Key, now: Instant) -> Result<()> {
    let mut first_error = None;
    let mut first = true;
    loop {
        let Some(id) = rt.rpc.borrow().by_key.get(&key).copied() else { break };
        // One socket carries every client of a server: the budget is counted per message (the
        // first one on the driver event's account), and what is left is this entry's news
        // again, first in the next update.
        let limited = !std::mem::take(&mut first) && rt.budget.get().limited();
        if limited && has_events(&mut rt.driver.borrow_mut(), key) && !rt.take_unit() {
            rt.driver.borrow_mut().unpop_event(Event { key, tag: TAG, kind: EventKind::News });
            break;
        }
        let Some(ev) = next_event(&mut rt.driver.borrow_mut(), key) else { break };
        let r = match ev {
            RpcEvent::Server(ev) => server::event(lua, rt, id, key, ev, now),
            RpcEvent::Client(ev) => client::event(lua, rt, id, key, ev, now),
        };
        if let Err(e) = r {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// A driver event for one of this module's entries.
pub(crate) fn event(lua: &Lua, rt: &Runtime, ev: Event) -> Result<()> {
    let now = Instant::now();
    match ev.kind {
        EventKind::News => handle_events(lua, rt, ev.key, now),
        EventKind::Wake => {
            let Some(id) = rt.rpc.borrow().by_key.get(&ev.key).copied() else { return Ok(()) };
            if rt.rpc.borrow().servers.contains_key(&id) {
                server::idle_scan(lua, rt, id, ev.key, now)
            } else {
                client::wake(lua, rt, id, ev.key, now)
            }
        }
        EventKind::Accepted { .. } | EventKind::Drained => Ok(()),
    }
}

/// Adds a session object's retransmissions and drops to `c`.
fn add_stats(c: &mut Census, s: &rpc::Stats) {
    c.rpc_retransmits += s.retransmits;
    c.oversize += s.oversized_messages;
    c.malformed +=
        s.malformed + s.bad_version + s.auth_failed + s.bad_signature + s.bad_cookie + s.unknown_peer;
    c.flood += s.handshake_dropped + s.buffer_full + s.reply_queue_full;
}

/// Keeps the counts of `key`'s server or client object before it goes (app removed, session
/// ended), so the totals `luna.stats()` reports never fall.
fn retire(rt: &Runtime, driver: &mut Driver, key: Key) {
    if let Some(s) = stats_of(driver, key) {
        add_stats(&mut rt.counters.borrow_mut().rpc_retired, s);
    }
}

/// The counts of `key`'s server or client object.
fn stats_of(driver: &mut Driver, key: Key) -> Option<&rpc::Stats> {
    let proto: &dyn std::any::Any = driver.datagram(key)?.proto()?;
    match proto.downcast_ref::<Server>() {
        Some(s) => Some(s.stats()),
        None => proto.downcast_ref::<Client>().map(Client::stats),
    }
}

/// Sessions, connected clients, retransmissions and dropped input, for `luna.stats()`.
pub(crate) fn census(rt: &Runtime, c: &mut Census) {
    let retired = rt.counters.borrow().rpc_retired;
    c.rpc_retransmits += retired.rpc_retransmits;
    c.oversize += retired.oversize;
    c.malformed += retired.malformed;
    c.flood += retired.flood;
    let st = rt.rpc.borrow();
    let mut driver = rt.driver.borrow_mut();
    let keys = st.servers.values().map(|a| Some(a.key)).chain(st.clients.values().map(|a| a.key));
    for key in keys.flatten() {
        if let Some(s) = stats_of(&mut driver, key) {
            add_stats(c, s);
        }
    }
    c.rpc_sessions += st.servers.values().map(|a| a.session_count() as u64).sum::<u64>();
    c.rpc_clients += st.clients.values().filter(|a| a.connected).count() as u64;
}

/// An RTT and its variation as seconds for Lua.
fn seconds(rtt: Option<(Duration, Duration)>) -> (Option<f64>, Option<f64>) {
    rtt.map_or((None, None), |(srtt, var)| (Some(srtt.as_secs_f64()), Some(var.as_secs_f64())))
}

/// Marks `key`'s queued messages to leave with the next batch: at the end of this update, or
/// at the start of the next one (or `luna.flush()`) when called between updates, so the many
/// calls or pushes a frame makes share datagrams instead of costing one `sendto` each.
fn send_soon(rt: &Runtime, key: Key) {
    rt.driver.borrow_mut().queue_flush(key);
}

/// Sends what `key` has queued: at the end of the current update when inside one, else now.
fn flush(lua: &Lua, rt: &Runtime, key: Key) -> Result<()> {
    if rt.in_update() {
        rt.driver.borrow_mut().queue_flush(key);
        return Ok(());
    }
    flush_now(lua, rt, key)
}

/// Sends what `key` has queued now and handles the events that produced (a close reports
/// `Disconnected` at once).
fn flush_now(lua: &Lua, rt: &Runtime, key: Key) -> Result<()> {
    rt.driver.borrow_mut().flush(key);
    handle_events(lua, rt, key, Instant::now())
}

/// Makes the entry wake up at `at` at the latest (an earlier wake stays).
fn wake_by(rt: &Runtime, key: Key, at: Instant) {
    let mut driver = rt.driver.borrow_mut();
    let at = driver.wake(key).map_or(at, |w| w.min(at));
    driver.set_wake(key, Some(at));
}

/// Binds a UDP socket for `proto` to the first of `addrs` that works, and registers it.
fn open_socket(
    rt: &Runtime,
    addrs: &[SocketAddr],
    proto: Box<dyn DatagramProtocol>,
) -> std::result::Result<Key, String> {
    let mut last = String::from("no address to bind");
    for addr in addrs {
        match net::udp_bind(*addr, UdpOptions::default()) {
            Ok(socket) => {
                return rt
                    .driver
                    .borrow_mut()
                    .open_datagram(socket, Some(proto), READ_BUDGET, TAG)
                    .map_err(|e| e.to_string())
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

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

/// The table `lua/rpc.lua` returns, built once per state.
fn half(lua: &Lua) -> Result<Table> {
    const KEY: &str = "luna.rpc_half";
    if let Value::Table(t) = lua.named_registry_value::<Value>(KEY)? {
        return Ok(t);
    }
    let core = lua.create_table()?;
    core.set("PARK", Value::LightUserData(sched::park_value()))?;
    core.set("DELIVERED", Value::LightUserData(sched::delivered_value()))?;
    core.set("set", lua.create_function(set)?)?;
    server::core(lua, &core)?;
    calls::core(lua, &core)?;
    let t: Table = lua.load(include_str!("../../../lua/rpc.lua")).set_name("=rpc.lua").call(core)?;
    lua.set_named_registry_value(KEY, &t)?;
    Ok(t)
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

/// `core.set(id, call, name, n)`: the reliability and idle knobs of an app or client.
fn set(lua: &Lua, (id, call, name, n): (u32, String, String, Value)) -> Result<()> {
    let rt = super::runtime(lua)?;
    let number = match n {
        Value::Integer(i) => i as f64,
        Value::Number(x) => x,
        other => return Err(misuse(&call, format!("'n' must be a number, got {}", lua_type(&other)))),
    };
    if !(number > 0.0 && number <= MAX_SECONDS) {
        return Err(misuse(&call, format!("'n' must be a number > 0 and <= 1e9, got {number:?}")));
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
            return server::idle_scan(lua, &rt, id, key, now);
        }
        drop(st);
        if let Some(s) = rt.driver.borrow_mut().datagram_proto::<Server>(key) {
            apply(s.config_mut());
        }
        return Ok(());
    }
    let Some(app) = st.clients.get_mut(&id) else { return Err(misuse(&call, "the app was removed")) };
    apply(&mut app.config);
    let Some(key) = app.key else { return Ok(()) };
    drop(st);
    if let Some(c) = rt.driver.borrow_mut().datagram_proto::<Client>(key) {
        apply(c.config_mut());
    }
    Ok(())
}

/// A host name some client apps were waiting for resolved (called by `tick`).
pub(crate) fn resolved(lua: &Lua, rt: &Runtime, host: &str, now: Instant) -> Result<()> {
    client::resolved(lua, rt, host, now)
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
            Side::Server => server::remove(lua, rt, id),
            Side::Client => client::remove(lua, rt, id),
        };
        result = result.and(r);
    }
    result
}

/// Adds the RPC calls to `luna` (server) or `lunac` (client).
pub(crate) fn register(lua: &Lua, module: &Table, side: Side) -> Result<()> {
    match side {
        Side::Server => server::register(lua, module),
        Side::Client => client::register(lua, module),
    }
}
