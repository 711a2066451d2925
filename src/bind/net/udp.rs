//! UDP sockets: `luna.udp.open{...}`, `u:send`, `u:connect`, `u:receive`, multicast, and the
//! `on_packet(u, data, ip, port)` callback. Reads per update are bounded (a flood cannot stall a
//! frame); datagrams over `max_size`, or arriving while the inbox is full, are dropped and
//! counted (`u.dropped`).

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use mlua::{Function, Lua, RegistryKey, Result, Table, Thread, Value};

use super::super::error::{bad_arg, misuse};
use super::super::options::Options;
use super::super::{addr, handle_number, runtime, Runtime};
use super::{call_back, callback, wake_all, TAG};
use crate::driver::net::{self, UdpOptions};
use crate::driver::{parse_ip, Key, Lookup};
use crate::proto::raw::{DatagramLimits, RawDatagrams, WriteError};

/// Datagrams read per update and socket.
const READ_BUDGET: usize = 256;
/// The largest payload an IPv4 UDP datagram can carry.
const MAX_PAYLOAD: usize = 65_507;
/// Datagrams kept while their destination's name resolves.
const MAX_RESOLVING: usize = 64;

pub(super) struct Record {
    key: Key,
    object: RegistryKey,
    waiters: Vec<RegistryKey>,
    /// The default destination (`u:connect`).
    peer: Option<SocketAddr>,
    /// The socket is IPv6 (IPv4 destinations are sent to as IPv4-mapped addresses).
    v6: bool,
    /// Datagrams waiting for their destination's name.
    resolving: usize,
}

const OPEN_KEYS: &[&str] = &["host", "port", "broadcast", "reuse_port", "max_size", "on_packet"];
const OPEN: &str = "luna.udp.open(config)";

/// `core.udp_open(config)` → socket object.
fn open(lua: &Lua, config: Value) -> Result<Table> {
    let config = if config.is_nil() { Value::Table(lua.create_table()?) } else { config };
    let o = Options::new(OPEN, config, OPEN_KEYS)?;
    let host = o.string("host")?.unwrap_or_else(|| "*".into());
    let port = o.port("port")?.unwrap_or(0);
    let ips = addr::listen_ips(&host).ok_or_else(|| {
        misuse(OPEN, format!("'host' must be an IP address, \"localhost\" or \"*\", got '{host}'"))
    })?;
    let options = UdpOptions {
        reuse_port: o.boolean("reuse_port")?.unwrap_or(false),
        broadcast: o.boolean("broadcast")?.unwrap_or(false),
    };
    let mut limits = DatagramLimits::default();
    if let Some(n) = o.size("max_size")? {
        limits.max_size = n.min(MAX_PAYLOAD);
    }
    let mut last = String::new();
    let mut socket = None;
    for a in addr::with_port(&ips, port) {
        match net::udp_bind(a, options) {
            Ok(s) => {
                socket = Some(s);
                break;
            }
            Err(e) => last = format!("cannot bind {}: {e}", addr::show(a)),
        }
    }
    let socket = socket.ok_or_else(|| misuse(OPEN, last))?;
    let rt = runtime(lua)?;
    let proto = Box::new(RawDatagrams::new(limits));
    let key = rt.driver.borrow_mut().open_datagram(socket, Some(proto), READ_BUDGET, TAG)?;
    let local = rt.driver.borrow_mut().datagram(key).map(|d| d.local).expect("just opened");
    let h = rt.net.borrow_mut().handle();
    let object: Table = lua.named_registry_value::<Function>("luna.net.udp")?.call(h)?;
    object.raw_set("address", addr::show(local))?;
    if let Some(f) = o.function("on_packet")? {
        object.raw_set("on_packet", f)?;
    }
    let record = Record {
        key,
        object: lua.create_registry_value(&object)?,
        waiters: Vec::new(),
        peer: None,
        v6: local.is_ipv6(),
        resolving: 0,
    };
    let mut net = rt.net.borrow_mut();
    net.udp_keys.insert(key, h);
    net.udps.insert(h, record);
    Ok(object)
}

/// `to` as the socket can send to it.
fn destination(v6: bool, to: SocketAddr) -> SocketAddr {
    match (v6, to.ip()) {
        (true, IpAddr::V4(ip)) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), to.port()),
        _ => to,
    }
}

fn port_arg(call: &str, v: &Value) -> Result<u16> {
    match v {
        Value::Integer(p) if (1..=65535).contains(p) => Ok(*p as u16),
        Value::Number(p) if p.fract() == 0.0 && (1.0..=65535.0).contains(p) => Ok(*p as u16),
        other => Err(bad_arg(call, "port", "a port number 1-65535", other)),
    }
}

/// Queues a datagram on socket `h`.
fn queue(rt: &Runtime, h: u64, data: &[u8], to: SocketAddr) -> std::result::Result<(), String> {
    let (key, v6) = match rt.net.borrow().udps.get(&h) {
        Some(rec) => (rec.key, rec.v6),
        None => return Err("closed".into()),
    };
    let mut driver = rt.driver.borrow_mut();
    let sent = driver.datagram_proto::<RawDatagrams>(key).map(|p| p.send(data, destination(v6, to)));
    match sent {
        Some(Ok(())) => {
            if rt.in_update() {
                driver.queue_flush(key);
            } else {
                driver.flush(key);
            }
            Ok(())
        }
        Some(Err(WriteError::Backpressure)) => Err("backpressure".into()),
        Some(Err(WriteError::Closed)) | None => Err("closed".into()),
    }
}

/// `core.udp_send(h, data, host, port)` → `true`, or `nil, reason`.
fn send(
    lua: &Lua,
    (h, data, host, port): (Value, Value, Value, Value),
) -> Result<(Option<bool>, Option<String>)> {
    const CALL: &str = "u:send(data[, host, port])";
    let text;
    let bytes;
    let data: &[u8] = match &data {
        Value::String(s) => {
            bytes = s.as_bytes();
            &bytes
        }
        Value::Integer(_) | Value::Number(_) => {
            text = data.to_string()?;
            text.as_bytes()
        }
        other => return Err(bad_arg(CALL, "data", "a string", other)),
    };
    if data.len() > MAX_PAYLOAD {
        return Err(misuse(
            CALL,
            format!("a datagram carries at most {MAX_PAYLOAD} bytes, got {}", data.len()),
        ));
    }
    let rt = runtime(lua)?;
    let Some(h) = handle_number(&h) else { return Ok((None, Some("closed".into()))) };
    let answer = |r: std::result::Result<(), String>| match r {
        Ok(()) => (Some(true), None),
        Err(e) => (None, Some(e)),
    };
    let host = match host {
        Value::Nil => {
            let peer = rt.net.borrow().udps.get(&h).and_then(|r| r.peer);
            return match peer {
                Some(to) => Ok(answer(queue(&rt, h, data, to))),
                None => Err(misuse(
                    CALL,
                    "no destination: pass host and port, or call u:connect(host, port) first",
                )),
            };
        }
        Value::String(s) => s,
        other => return Err(bad_arg(CALL, "host", "a string", &other)),
    };
    let host = host.to_str()?;
    let host: &str = &host;
    let port = port_arg(CALL, &port)?;
    // An IP literal (the usual reply to a sender) needs no lookup.
    if let Some(ip) = parse_ip(host) {
        return Ok(answer(queue(&rt, h, data, SocketAddr::new(ip, port))));
    }
    let lookup = rt.driver.borrow_mut().lookup(host, Instant::now());
    match lookup {
        Lookup::Done(ips) => Ok(answer(queue(&rt, h, data, SocketAddr::new(ips[0], port)))),
        Lookup::Failed(e) => Ok((None, Some(e))),
        Lookup::Pending => {
            {
                let mut net = rt.net.borrow_mut();
                let Some(rec) = net.udps.get_mut(&h) else { return Ok((None, Some("closed".into()))) };
                if rec.resolving >= MAX_RESOLVING {
                    return Ok((None, Some("backpressure".into())));
                }
                rec.resolving += 1;
            }
            let data = data.to_vec();
            let then: addr::Continuation = Box::new(move |_, rt, ips| {
                if let Some(rec) = rt.net.borrow_mut().udps.get_mut(&h) {
                    rec.resolving -= 1;
                }
                if let Ok(ips) = ips {
                    let _ = queue(rt, h, &data, SocketAddr::new(ips[0], port));
                }
                Ok(())
            });
            addr::resolve_then(lua, &rt, host, false, then)?;
            Ok((Some(true), None))
        }
    }
}

/// `core.udp_connect(h, host, port)`: the default destination, and only datagrams from it are
/// received.
fn connect(lua: &Lua, (h, host, port): (Value, Value, Value)) -> Result<(Option<bool>, Option<String>)> {
    const CALL: &str = "u:connect(host, port)";
    let Value::String(host) = host else { return Err(bad_arg(CALL, "host", "a string", &host)) };
    let host = host.to_str()?.to_owned();
    let port = port_arg(CALL, &port)?;
    let rt = runtime(lua)?;
    let Some(h) = handle_number(&h) else { return Ok((None, Some("closed".into()))) };
    let then: addr::Continuation = Box::new(move |lua, rt, ips| {
        let ip = match ips {
            Ok(ips) => ips[0],
            Err(_) => return Ok(()),
        };
        let mut net = rt.net.borrow_mut();
        let Some(rec) = net.udps.get_mut(&h) else { return Ok(()) };
        let to = SocketAddr::new(ip, port);
        if let Some(d) = rt.driver.borrow_mut().datagram(rec.key) {
            let _ = d.socket().connect(destination(rec.v6, to));
        }
        rec.peer = Some(to);
        lua.registry_value::<Table>(&rec.object)?.raw_set("peer_address", addr::show(to))
    });
    let known = matches!(rt.driver.borrow_mut().lookup(&host, Instant::now()), Lookup::Done(_));
    addr::resolve_then(lua, &rt, &host, false, then)?;
    if known && rt.net.borrow().udps.get(&h).is_some_and(|r| r.peer.is_none()) {
        return Ok((None, Some("closed".into())));
    }
    Ok((Some(true), None))
}

/// `core.udp_receive(h)` → `data, ip, port`; `false` while nothing waits; `nil, "closed"`.
fn receive(lua: &Lua, h: Value) -> Result<(Value, Value, Option<u16>)> {
    let rt = runtime(lua)?;
    let closed = (Value::Nil, Value::String(lua.create_string("closed")?), None);
    let Some(key) = handle_number(&h).and_then(|h| rt.net.borrow().udps.get(&h).map(|r| r.key)) else {
        return Ok(closed);
    };
    let got = rt.driver.borrow_mut().datagram_proto::<RawDatagrams>(key).and_then(|p| p.receive());
    Ok(match got {
        Some((data, from)) => (
            Value::String(lua.create_string(&data)?),
            Value::String(lua.create_string(from.ip().to_canonical().to_string())?),
            Some(from.port()),
        ),
        None => (Value::Boolean(false), Value::Nil, None),
    })
}

/// `core.udp_wait(h, co)`: parks `co` until a datagram arrives; false if the socket is gone.
fn wait(lua: &Lua, (h, thread): (Value, Thread)) -> Result<bool> {
    let rt = runtime(lua)?;
    let mut net = rt.net.borrow_mut();
    let Some(rec) = handle_number(&h).and_then(|h| net.udps.get_mut(&h)) else { return Ok(false) };
    rec.waiters.push(lua.create_registry_value(thread)?);
    Ok(true)
}

/// `core.udp_membership(h, join, group, interface)`: joins or leaves a multicast group (an
/// IPv4 interface address, or an IPv6 interface index).
fn membership(
    lua: &Lua,
    (h, join, group, interface): (Value, bool, String, Value),
) -> Result<(Option<bool>, Option<String>)> {
    let call = if join { "u:join(group[, interface])" } else { "u:leave(group[, interface])" };
    let group: IpAddr = crate::driver::parse_ip(&group)
        .ok_or_else(|| misuse(call, format!("'group' must be a multicast IP address, got '{group}'")))?;
    let rt = runtime(lua)?;
    let Some(key) = handle_number(&h).and_then(|h| rt.net.borrow().udps.get(&h).map(|r| r.key)) else {
        return Ok((None, Some("closed".into())));
    };
    let mut driver = rt.driver.borrow_mut();
    let socket = driver.datagram(key).expect("open udp entry").socket();
    let done = match group {
        IpAddr::V4(g) => {
            let iface = match &interface {
                Value::Nil => std::net::Ipv4Addr::UNSPECIFIED,
                Value::String(s) => {
                    s.to_str()?.parse().map_err(|_| misuse(call, "'interface' must be an IPv4 address"))?
                }
                other => return Err(bad_arg(call, "interface", "an IPv4 address", other)),
            };
            if join {
                socket.join_multicast_v4(&g, &iface)
            } else {
                socket.leave_multicast_v4(&g, &iface)
            }
        }
        IpAddr::V6(g) => {
            let index = match &interface {
                Value::Nil => 0,
                Value::Integer(i) => *i as u32,
                Value::Number(n) => *n as u32,
                other => return Err(bad_arg(call, "interface", "an interface index", other)),
            };
            if join {
                socket.join_multicast_v6(&g, index)
            } else {
                socket.leave_multicast_v6(&g, index)
            }
        }
    };
    Ok(match done {
        Ok(()) => (Some(true), None),
        Err(e) => (None, Some(e.to_string())),
    })
}

/// Closes socket `h`: waiting coroutines get `nil, "closed"`.
pub(super) fn close(_lua: &Lua, rt: &Runtime, h: u64) -> Result<()> {
    let removed = rt.net.borrow_mut().udps.remove(&h);
    let Some(mut rec) = removed else { return Ok(()) };
    rt.net.borrow_mut().udp_keys.remove(&rec.key);
    rt.driver.borrow_mut().close(rec.key);
    wake_all(rt, &mut rec.waiters);
    Ok(())
}

fn close_fn(lua: &Lua, h: Value) -> Result<bool> {
    let rt = runtime(lua)?;
    match handle_number(&h) {
        Some(h) => close(lua, &rt, h).map(|()| true),
        None => Ok(false),
    }
}

/// `core.udp_prop(h, name)`: `dropped` (a table of counts by reason); nil for other names.
fn prop(lua: &Lua, (h, name): (Value, Value)) -> Result<Value> {
    let rt = runtime(lua)?;
    let is = |n: &[u8]| matches!(&name, Value::String(s) if s.as_bytes().as_ref() == n);
    let Some(key) = handle_number(&h).and_then(|h| rt.net.borrow().udps.get(&h).map(|r| r.key)) else {
        return Ok(Value::Nil);
    };
    if !is(b"dropped") {
        return Ok(Value::Nil);
    }
    let dropped = rt.driver.borrow_mut().datagram_proto::<RawDatagrams>(key).map(|p| p.dropped());
    let t = lua.create_table()?;
    if let Some(d) = dropped {
        t.set("oversize", d.oversize)?;
        t.set("inbox_full", d.inbox_full)?;
    }
    Ok(Value::Table(t))
}

/// Datagrams arrived: each goes to `on_packet(u, data, ip, port)` if set, else waits for
/// `u:receive()`.
pub(super) fn news(lua: &Lua, rt: &Runtime, h: u64) -> Result<()> {
    let (key, object) = {
        let mut net = rt.net.borrow_mut();
        let Some(rec) = net.udps.get_mut(&h) else { return Ok(()) };
        wake_all(rt, &mut rec.waiters);
        (rec.key, lua.registry_value::<Table>(&rec.object)?)
    };
    let Some(on_packet) = callback(&object, "on_packet")? else { return Ok(()) };
    // The sender's IP as text, kept while datagrams come from the same address.
    let mut ip_text: Option<(IpAddr, mlua::String)> = None;
    loop {
        let got = rt.driver.borrow_mut().datagram_proto::<RawDatagrams>(key).and_then(|p| p.receive());
        let Some((data, from)) = got else { return Ok(()) };
        let ip = match &ip_text {
            Some((last, text)) if *last == from.ip() => text.clone(),
            _ => {
                let text = lua.create_string(from.ip().to_canonical().to_string())?;
                ip_text = Some((from.ip(), text.clone()));
                text
            }
        };
        let args = (object.clone(), lua.create_string(&data)?, ip, from.port());
        call_back(lua, rt, &on_packet, args)?;
        if !rt.net.borrow().udps.contains_key(&h) {
            return Ok(()); // closed by the callback
        }
    }
}

pub(super) fn register(lua: &Lua, core: &Table) -> Result<()> {
    core.set("udp_open", lua.create_function(open)?)?;
    core.set("udp_send", lua.create_function(send)?)?;
    core.set("udp_connect", lua.create_function(connect)?)?;
    core.set("udp_receive", lua.create_function(receive)?)?;
    core.set("udp_wait", lua.create_function(wait)?)?;
    core.set("udp_membership", lua.create_function(membership)?)?;
    core.set("udp_close", lua.create_function(close_fn)?)?;
    core.set("udp_prop", lua.create_function(prop)?)
}
