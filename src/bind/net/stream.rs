//! Stream objects (TCP, TLS, Unix): connecting, reading (three ways: what is buffered, through a
//! delimiter, an exact count), writing with backpressure, draining, closing, TLS upgrades,
//! properties, and the callbacks `on_connect`, `on_data` (MonaServer's contract: it returns how
//! many bytes it did **not** consume, and those come again in front of the next ones),
//! `on_drain` and `on_close`.
//!
//! `read` and `write` are raw C functions (`bind/raw.rs`). The connection's own coroutine (a
//! server's `on_connection`) parks in `read` with its request; when data arrives it is resumed
//! with the answer (`DELIVERED, data`), saving a call per message.

use std::ffi::c_int;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mlua::{Lua, RegistryKey, Result, Table, Thread, Value};

use super::super::error::{bad_arg, misuse};
use super::super::options::Options;
use super::super::raw::{self, Out, RawFn, Stack};
use super::super::sched::{self, delivered_value, park_value};
use super::super::{addr, handle_number, runtime, Runtime};
use super::{call_back, callback, wake_all, TAG};
use crate::driver::{Address, ClientTls, ConnectOptions, Key, Target};
use crate::proto::raw::{RawLimits, RawStream, WriteError};
use crate::proto::tls::Tls;

/// What a parked read waits for.
#[derive(Debug, Clone)]
pub(super) enum Request {
    /// What is buffered, at most this many bytes.
    Any(usize),
    /// Through the delimiter (included), or `max` bytes without it.
    Until(Vec<u8>, usize),
    Exact(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Upgrade {
    None,
    Running,
    Failed(String),
}

pub(super) struct Record {
    /// `None` while the host name resolves.
    pub key: Option<Key>,
    pub object: RegistryKey,
    /// The server that accepted it.
    pub server: Option<u64>,
    /// The connection's own coroutine while it runs (registry key, pointer).
    pub owner: Option<(RegistryKey, usize)>,
    /// The owner waits in `read` for this.
    parked: Option<Request>,
    waiters: Vec<RegistryKey>,
    /// Client only (boxed: an accepted stream does not pay for it).
    client: Option<Box<ClientPart>>,
    limits: RawLimits,
    /// `on_data` may be set (the field is looked at on each arrival only then).
    pub on_data: bool,
    pub half_open: bool,
    opened: bool,
    eof_seen: bool,
    upgrade: Upgrade,
    /// The end was reported (`on_close` ran): `Some(None)` for a clean end.
    ended: Option<Option<String>>,
}

/// What a client needs while it connects.
#[derive(Default)]
struct ClientPart {
    /// Addresses still to try if connecting fails, and how.
    fallback: Vec<SocketAddr>,
    options: Option<ConnectOptionsSpec>,
    /// Writes made before the stream existed (host name resolving).
    early: Vec<u8>,
}

#[derive(Clone)]
struct ConnectOptionsSpec {
    timeout: Duration,
    nodelay: bool,
    ttl: Option<u32>,
    tls: Option<(std::sync::Arc<rustls::ClientConfig>, String)>,
}

impl ConnectOptionsSpec {
    fn options(&self) -> ConnectOptions {
        ConnectOptions {
            timeout: self.timeout,
            nodelay: self.nodelay,
            ttl: self.ttl,
            tls: self
                .tls
                .as_ref()
                .map(|(config, name)| ClientTls { config: config.clone(), server_name: name.clone() }),
        }
    }
}

impl Record {
    pub(super) fn new(
        object: RegistryKey,
        key: Option<Key>,
        server: Option<u64>,
        limits: RawLimits,
    ) -> Record {
        Record {
            key,
            object,
            server,
            owner: None,
            parked: None,
            waiters: Vec::new(),
            client: None,
            limits,
            on_data: false,
            half_open: false,
            opened: false,
            eof_seen: false,
            upgrade: Upgrade::None,
            ended: None,
        }
    }
}

/// The largest read buffer kept for the next read.
const READ_BUF_KEEP: usize = 64 * 1024;

/// Takes what `request` asks for from `input`, if it is there; at the end (`ended`) a request
/// that cannot be met takes nothing.
fn take(proto: &mut RawStream, request: &Request) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    take_into(proto, request, &mut out).then_some(out)
}

/// [`take`] into `out` (cleared first); false when the request cannot be answered yet.
fn take_into(proto: &mut RawStream, request: &Request, out: &mut Vec<u8>) -> bool {
    let input = proto.input();
    let n = match request {
        Request::Any(max) if !input.is_empty() => input.len().min(*max),
        Request::Until(delim, max) => {
            let window = &input[..input.len().min(max.saturating_add(delim.len() - 1))];
            match window.windows(delim.len()).position(|w| w == delim.as_slice()) {
                Some(at) if at + delim.len() <= *max => at + delim.len(),
                _ if input.len() >= *max => *max,
                _ => return false,
            }
        }
        Request::Exact(n) if input.len() >= *n => *n,
        _ => return false,
    };
    out.clear();
    out.extend_from_slice(&input[..n]);
    proto.consume_input(n);
    true
}

/// Why reads end now, if they do: `Some(None)` for a clean end of stream.
fn end_of(rec: &Record, proto: Option<&RawStream>) -> Option<Option<String>> {
    if let Some(why) = &rec.ended {
        return Some(why.clone());
    }
    let proto = proto?;
    if let Some(why) = proto.ended() {
        return Some(why.map(str::to_owned));
    }
    proto.is_eof().then_some(None)
}

fn reason(why: &Option<String>) -> String {
    why.clone().unwrap_or_else(|| "closed".into())
}

// ---------------------------------------------------------------------------------------------
// read / write (raw)

fn request(call: &str, st: &Stack) -> std::result::Result<Request, String> {
    let max = match st.is_nil(4) {
        true => None,
        false => match st.integer(4) {
            Some(n) if n >= 1 => Some(n as usize),
            _ => return Err(format!("{call}: 'max' must be a whole number >= 1, got {}", st.type_name(4))),
        },
    };
    Ok(match st.integer(2) {
        Some(0) => Request::Any(max.unwrap_or(usize::MAX)),
        Some(1) => match st.bytes(3) {
            Some(delim) if !delim.is_empty() => Request::Until(delim.to_vec(), max.unwrap_or(usize::MAX)),
            _ => {
                return Err(format!(
                    "{call}: 'delimiter' must be a non-empty string, got {}",
                    st.type_name(3)
                ))
            }
        },
        _ => match st.integer(3) {
            Some(n) if n >= 0 => Request::Exact(n as usize),
            _ => return Err(format!("{call}: 'n' must be a whole number >= 0, got {}", st.type_name(3))),
        },
    })
}

fn read_call(st: &Stack) -> &'static str {
    match st.integer(2) {
        Some(1) => "s:read_until(delimiter[, max])",
        Some(2) => "s:read_exact(n)",
        _ => "s:read([max])",
    }
}

/// The values `read` returns at the end: `nil, reason, partial`.
fn end_values(why: &Option<String>, partial: Vec<u8>) -> Out {
    let mut out = Out::new();
    out.push(raw::Value::Nil);
    out.push(raw::Value::Owned(reason(why).into_bytes()));
    out.push(raw::Value::Owned(partial));
    out
}

/// `core.net_read(h, mode, arg, max)` → data; `nil, reason, partial` at the end; `PARK` when
/// the caller is the connection's coroutine (it is now parked with its request); `false` for
/// any other coroutine (it parks with `core.net_wait`).
pub(super) struct Read;

impl RawFn for Read {
    const NAME: &'static str = "s:read()";

    fn call(rt: &Runtime, st: &Stack) -> std::result::Result<Out, String> {
        let call = read_call(st);
        let request = request(call, st)?;
        let Some(h) = st.integer(1) else { return Ok(end_values(&None, Vec::new())) };
        let h = h as u64;
        let mut net = rt.net.borrow_mut();
        let Some(rec) = net.streams.get_mut(&h) else { return Ok(end_values(&None, Vec::new())) };
        let is_owner = rec.owner.as_ref().is_some_and(|(_, ptr)| *ptr == st.thread());
        if is_owner {
            rec.parked = None;
        }
        let mut driver = rt.driver.borrow_mut();
        let proto = rec.key.and_then(|key| driver.proto::<RawStream>(key));
        let answer = match proto {
            Some(proto) => match take(proto, &request) {
                Some(data) => Some(Ok(data)),
                None => end_of(rec, Some(proto)).map(|why| {
                    let partial = proto.input().to_vec();
                    let n = partial.len();
                    proto.consume_input(n);
                    Err((why, partial))
                }),
            },
            None => end_of(rec, None).map(|why| Err((why, Vec::new()))),
        };
        let key = rec.key;
        match answer {
            Some(Ok(data)) => {
                drop(driver);
                drop(net);
                if let Some(key) = key {
                    rt.resume_reading(key);
                }
                Ok(Out::one(raw::Value::Owned(data)))
            }
            Some(Err((why, partial))) => {
                let released = rec.ended.is_some();
                drop(driver);
                drop(net);
                if released {
                    release(rt, h);
                }
                Ok(end_values(&why, partial))
            }
            None if is_owner => {
                rec.parked = Some(request);
                Ok(Out::one(raw::Value::Light(park_value().0)))
            }
            None => Ok(Out::one(raw::Value::Bool(false))),
        }
    }
}

/// `core.net_write(h, data)` → `true`, or `nil, reason` (`"backpressure"`, `"closed"`).
pub(super) struct Write;

impl RawFn for Write {
    const NAME: &'static str = "s:write(data)";
    const STRINGS: &'static [c_int] = &[2];

    fn call(rt: &Runtime, st: &Stack) -> std::result::Result<Out, String> {
        let Some(data) = st.bytes(2) else {
            return Err(format!("s:write(data): 'data' must be a string, got {}", st.type_name(2)));
        };
        let refused = |why: &'static str| {
            let mut out = Out::one(raw::Value::Nil);
            out.push(raw::Value::Str(why));
            Ok(out)
        };
        let h = st.integer(1).unwrap_or(0) as u64;
        let mut net = rt.net.borrow_mut();
        let Some(rec) = net.streams.get_mut(&h) else { return refused("closed") };
        if rec.ended.is_some() {
            return refused("closed");
        }
        let Some(key) = rec.key else {
            // Still resolving the host name: kept until the stream exists.
            let early = &mut rec.client.get_or_insert_with(Box::default).early;
            if early.len() >= rec.limits.max_queued {
                return refused("backpressure");
            }
            early.extend_from_slice(data);
            return Ok(Out::one(raw::Value::Bool(true)));
        };
        drop(net);
        let written = rt.driver.borrow_mut().proto::<RawStream>(key).map(|p| p.write(data));
        match written {
            Some(Ok(())) => {
                rt.flush(key);
                Ok(Out::one(raw::Value::Bool(true)))
            }
            Some(Err(WriteError::Backpressure)) => refused("backpressure"),
            Some(Err(WriteError::Closed)) | None => refused("closed"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Events

/// A stream's protocol has news: it connected, data arrived, the peer finished, it ended.
pub(super) fn news(lua: &Lua, rt: &Runtime, h: u64) -> Result<()> {
    let Some(key) = rt.net.borrow().streams.get(&h).and_then(|r| r.key) else { return Ok(()) };
    let (ready, eof, ended) = {
        let mut driver = rt.driver.borrow_mut();
        let Some(proto) = driver.proto::<RawStream>(key) else { return Ok(()) };
        (proto.take_ready(), proto.is_eof(), proto.ended().map(|w| w.map(str::to_owned)))
    };
    if let Some(Some(why)) = &ended {
        if retry_connect(rt, h, key) {
            return Ok(());
        }
        let mut net = rt.net.borrow_mut();
        if let Some(rec) = net.streams.get_mut(&h) {
            if rec.upgrade == Upgrade::Running {
                rec.upgrade = Upgrade::Failed(why.clone());
            }
        }
    }
    if ready {
        opened(lua, rt, h, key)?;
    }
    deliver(lua, rt, h, key)?;
    if eof {
        let mut net = rt.net.borrow_mut();
        if let Some(rec) = net.streams.get_mut(&h) {
            if !rec.eof_seen {
                rec.eof_seen = true;
                if !rec.half_open {
                    net.finishing.push(h);
                }
            }
        }
    }
    if let Some(why) = ended {
        return end(lua, rt, h, why);
    }
    if let Some(rec) = rt.net.borrow_mut().streams.get_mut(&h) {
        wake_all(rt, &mut rec.waiters);
    }
    Ok(())
}

/// A failed connect with addresses left tries the next one; true if it did.
fn retry_connect(rt: &Runtime, h: u64, old: Key) -> bool {
    let (next, spec, limits) = {
        let mut net = rt.net.borrow_mut();
        let Some(rec) = net.streams.get_mut(&h) else { return false };
        let Some(client) = rec.client.as_mut().filter(|_| !rec.opened) else { return false };
        let Some(options) = client.options.clone().filter(|_| !client.fallback.is_empty()) else {
            return false;
        };
        (client.fallback.remove(0), options, rec.limits)
    };
    rt.driver.borrow_mut().close(old);
    rt.net.borrow_mut().stream_keys.remove(&old);
    start(rt, h, &Target::Tcp(next), &spec, limits).is_ok()
}

/// The transport became ready: the first time (connected or accepted) the object learns its
/// addresses and a client's `on_connect` runs; after `starttls`, the upgrade is done.
fn opened(lua: &Lua, rt: &Runtime, h: u64, key: Key) -> Result<()> {
    let (object, first, client) = {
        let mut net = rt.net.borrow_mut();
        let Some(rec) = net.streams.get_mut(&h) else { return Ok(()) };
        if rec.upgrade == Upgrade::Running {
            rec.upgrade = Upgrade::None;
        }
        let first = !std::mem::replace(&mut rec.opened, true);
        // Connected: what the client part held is done with.
        let early = rec.client.take().map(|c| c.early).unwrap_or_default();
        wake_all(rt, &mut rec.waiters);
        if !early.is_empty() {
            if let Some(proto) = rt.driver.borrow_mut().proto::<RawStream>(key) {
                let _ = proto.write(&early);
            }
            rt.flush(key);
        }
        (lua.registry_value::<Table>(&rec.object)?, first, rec.server.is_none())
    };
    if !first {
        return Ok(());
    }
    set_addresses(rt, &object, key)?;
    if client {
        if let Some(on_connect) = callback(&object, "on_connect")? {
            call_back(lua, rt, &on_connect, object)?;
        }
    }
    Ok(())
}

/// Stores `address` and `peer_address` in the object (they stay readable after the end).
pub(super) fn set_addresses(rt: &Runtime, object: &Table, key: Key) -> Result<()> {
    let (local, peer) = {
        let mut driver = rt.driver.borrow_mut();
        let Some(stream) = driver.stream(key) else { return Ok(()) };
        (stream.local.as_ref().map(Address::to_string), stream.peer.to_string())
    };
    object.raw_set("address", local)?;
    object.raw_set("peer_address", peer)
}

/// Hands received data to `on_data`, or to the connection's coroutine parked in `read`.
fn deliver(lua: &Lua, rt: &Runtime, h: u64, key: Key) -> Result<()> {
    let object = {
        let net = rt.net.borrow();
        let Some(rec) = net.streams.get(&h) else { return Ok(()) };
        rec.on_data.then(|| lua.registry_value::<Table>(&rec.object)).transpose()?
    };
    if let Some(object) = object {
        if let Some(on_data) = callback(&object, "on_data")? {
            return deliver_on_data(lua, rt, key, object, on_data);
        }
    }
    let (answer, thread, ptr) = {
        let mut net = rt.net.borrow_mut();
        let net = &mut *net;
        let Some(rec) = net.streams.get_mut(&h) else { return Ok(()) };
        let (Some(request), Some((thread, ptr))) = (&rec.parked, &rec.owner) else { return Ok(()) };
        let (thread, ptr) = (thread.id(), *ptr);
        let mut driver = rt.driver.borrow_mut();
        let Some(proto) = driver.proto::<RawStream>(key) else { return Ok(()) };
        let answer = if take_into(proto, request, &mut net.read_buf) {
            Ok(std::mem::take(&mut net.read_buf))
        } else {
            let Some(why) = end_of(rec, Some(proto)) else { return Ok(()) };
            let partial = proto.input().to_vec();
            proto.consume_input(partial.len());
            Err((why, partial))
        };
        rec.parked = None;
        (answer, thread, ptr)
    };
    let tag = raw::Value::Light(delivered_value().0);
    match answer {
        Ok(data) => {
            rt.resume_reading(key);
            let mut args = [tag, raw::Value::Owned(data)];
            let resumed = sched::resume_parked(lua, rt, thread, ptr, &args);
            // The buffer serves the next read (unless a large read grew it).
            if let raw::Value::Owned(buf) = &mut args[1] {
                if buf.capacity() <= READ_BUF_KEEP {
                    rt.net.borrow_mut().read_buf = std::mem::take(buf);
                }
            }
            resumed
        }
        Err((why, partial)) => {
            let args = [
                tag,
                raw::Value::Nil,
                raw::Value::Owned(reason(&why).into_bytes()),
                raw::Value::Owned(partial),
            ];
            sched::resume_parked(lua, rt, thread, ptr, &args)
        }
    }
}

/// `on_data(s, data)` gets everything buffered; what it returns is how many bytes it kept for
/// later (they stay in front of the next data). A stream whose input limit is full of kept
/// bytes can never make progress: it is closed with the reason.
fn deliver_on_data(lua: &Lua, rt: &Runtime, key: Key, object: Table, on_data: mlua::Function) -> Result<()> {
    let data = match rt.driver.borrow_mut().proto::<RawStream>(key) {
        Some(proto) if !proto.input().is_empty() => lua.create_string(proto.input())?,
        _ => return Ok(()),
    };
    let len = data.as_bytes().len();
    let kept = match call_back(lua, rt, &on_data, (object, data))? {
        Value::Integer(n) => n.clamp(0, len as _) as usize,
        Value::Number(n) if n.is_finite() => n.clamp(0.0, len as f64) as usize,
        _ => 0,
    };
    {
        let mut driver = rt.driver.borrow_mut();
        let Some(proto) = driver.proto::<RawStream>(key) else { return Ok(()) };
        proto.consume_input(len - kept);
        if kept > 0 && proto.input_full() {
            let max = proto.limits().max_input;
            proto.abort(Some(format!(
                "on_data kept {kept} bytes, the whole input limit (max_input = {max}): nothing can arrive"
            )));
        }
    }
    rt.flush(key);
    rt.resume_reading(key);
    Ok(())
}

/// Everything queued was written: `on_drain(s)`, and `drain()` returns.
pub(super) fn drained(lua: &Lua, rt: &Runtime, h: u64) -> Result<()> {
    let object = {
        let mut net = rt.net.borrow_mut();
        let Some(rec) = net.streams.get_mut(&h) else { return Ok(()) };
        wake_all(rt, &mut rec.waiters);
        lua.registry_value::<Table>(&rec.object)?
    };
    match callback(&object, "on_drain")? {
        Some(on_drain) => call_back(lua, rt, &on_drain, object).map(|_| ()),
        None => Ok(()),
    }
}

/// The stream ended (`why`: `None` for a clean end): told once, to a parked read, to waiting
/// coroutines and to `on_close(s, why)`. The record goes once its input was read.
pub(super) fn end(lua: &Lua, rt: &Runtime, h: u64, why: Option<String>) -> Result<()> {
    let object = {
        let mut net = rt.net.borrow_mut();
        let Some(rec) = net.streams.get_mut(&h) else { return Ok(()) };
        if rec.ended.is_some() {
            return Ok(());
        }
        rec.ended = Some(why.clone());
        wake_all(rt, &mut rec.waiters);
        let (object, server) = (lua.registry_value::<Table>(&rec.object)?, rec.server);
        if let Some(server) = server.and_then(|s| net.servers.get_mut(&s)) {
            server.conns.remove(&h);
        }
        object
    };
    let key = rt.net.borrow().streams.get(&h).and_then(|r| r.key);
    if let Some(key) = key {
        deliver(lua, rt, h, key)?;
    }
    // Kept to the end of the update: the coroutines just woken read the reason.
    rt.net.borrow_mut().ended.push(h);
    match callback(&object, "on_close")? {
        Some(on_close) => call_back(lua, rt, &on_close, (object, why)).map(|_| ()),
        None => Ok(()),
    }
}

/// Forgets an ended stream once nothing is left to read in it (the rest goes when a read takes
/// it, or at `close`).
pub(super) fn release_if_read(rt: &Runtime, h: u64) {
    let unread = {
        let net = rt.net.borrow();
        let Some(rec) = net.streams.get(&h) else { return };
        let mut driver = rt.driver.borrow_mut();
        rec.key.and_then(|k| driver.proto::<RawStream>(k)).is_some_and(|p| !p.input().is_empty())
    };
    if !unread {
        release(rt, h);
    }
}

/// Forgets a stream: its record, its entry, its coroutine.
pub(super) fn release(rt: &Runtime, h: u64) {
    let removed = {
        let mut net = rt.net.borrow_mut();
        let rec = net.streams.remove(&h);
        if let Some(key) = rec.as_ref().and_then(|r| r.key) {
            net.stream_keys.remove(&key);
        }
        rec
    };
    let Some(mut rec) = removed else { return };
    if let Some(key) = rec.key {
        rt.driver.borrow_mut().close(key);
    }
    wake_all(rt, &mut rec.waiters);
    // Registry keys are dropped with the record: mlua frees them at the next registry use.
}

/// Closes after the queued bytes are out (the peer finished, or `luna.close()`).
pub(super) fn finish(rt: &Runtime, h: u64) {
    let Some(key) = rt.net.borrow().streams.get(&h).and_then(|r| r.key) else { return };
    if let Some(proto) = rt.driver.borrow_mut().proto::<RawStream>(key) {
        proto.finish();
    }
    rt.flush(key);
}

// ---------------------------------------------------------------------------------------------
// Connecting

const CONNECT_KEYS: &[&str] = &[
    "tls",
    "timeout",
    "nodelay",
    "ttl",
    "max_queued",
    "max_input",
    "allow_half_open",
    "on_connect",
    "on_data",
    "on_drain",
    "on_close",
];

/// Reads the stream limits and callbacks shared by clients and servers' connections.
pub(super) fn limits(opts: &Options) -> Result<RawLimits> {
    let mut limits = RawLimits::default();
    if let Some(n) = opts.size("max_queued")? {
        limits.max_queued = n;
    }
    if let Some(n) = opts.size("max_input")? {
        limits.max_input = n;
    }
    Ok(limits)
}

/// A new stream object with its record.
pub(super) fn new_object(lua: &Lua, rt: &Runtime) -> Result<(u64, Table)> {
    let h = rt.net.borrow_mut().handle();
    let object: Table = lua.named_registry_value::<mlua::Function>("luna.net.stream")?.call(h)?;
    Ok((h, object))
}

fn client_tls(
    rt: &Runtime,
    call: &'static str,
    value: Value,
    host: &str,
) -> Result<Option<(std::sync::Arc<rustls::ClientConfig>, String)>> {
    let table = match value {
        Value::Nil | Value::Boolean(false) => return Ok(None),
        Value::Boolean(true) => None,
        Value::Table(t) => Some(t),
        other => return Err(bad_arg(call, "tls", "true or a table {ca, verify, server_name, alpn}", &other)),
    };
    let (mut ca, mut verify, mut name, mut alpn) =
        (None, true, host.trim_matches(['[', ']']).to_owned(), Vec::new());
    if let Some(table) = table {
        let o = Options::new(call, Value::Table(table), &["ca", "verify", "server_name", "alpn"])?;
        ca = o.string("ca")?;
        verify = o.boolean("verify")?.unwrap_or(true);
        if let Some(n) = o.string("server_name")? {
            name = n;
        }
        alpn = alpn_list(call, &o)?;
    }
    let alpn: Vec<&[u8]> = alpn.iter().map(|p| p.as_bytes()).collect();
    let config = rt.tls.borrow_mut().client(call, ca.as_deref(), verify, &alpn)?;
    Ok(Some((config, name)))
}

/// `alpn`: a protocol name or a list of them.
pub(super) fn alpn_list(call: &str, o: &Options) -> Result<Vec<String>> {
    match o.table("alpn") {
        Ok(Some(list)) => list.sequence_values::<String>().collect(),
        Ok(None) => Ok(Vec::new()),
        Err(_) => o
            .string("alpn")
            .map(|s| s.into_iter().collect())
            .map_err(|_| misuse(call, "'alpn' must be a string or a list of strings")),
    }
}

/// `core.net_connect(kind, call, host_or_path, port, opts)` → stream, or `nil, err`.
pub(super) fn connect(
    lua: &Lua,
    (kind, _call, host, port, opts): (String, Value, Value, Value, Value),
) -> Result<(Value, Option<String>)> {
    let call: &'static str = if kind == "unix" {
        "luna.unix.connect(path[, opts])"
    } else {
        "luna.tcp.connect(host, port[, opts])"
    };
    let Value::String(host) = host else {
        let what = if kind == "unix" { "path" } else { "host" };
        return Err(bad_arg(call, what, "a string", &host));
    };
    let host = host.to_str()?.to_owned();
    let port = match (kind.as_str(), &port) {
        ("unix", _) => 0,
        (_, Value::Integer(p)) if (1..=65535).contains(p) => *p as u16,
        (_, Value::Number(p)) if p.fract() == 0.0 && (1.0..=65535.0).contains(p) => *p as u16,
        (_, other) => return Err(bad_arg(call, "port", "a port number 1-65535", other)),
    };
    let opts = match opts {
        Value::Nil => lua.create_table()?,
        Value::Table(t) => t,
        other => return Err(bad_arg(call, "opts", "a table or nil", &other)),
    };
    let o = Options::new(call, Value::Table(opts.clone()), CONNECT_KEYS)?;
    let rt = runtime(lua)?;
    let spec = ConnectOptionsSpec {
        timeout: o.seconds("timeout")?.unwrap_or(crate::driver::stream::DEFAULT_CONNECT_TIMEOUT),
        nodelay: o.boolean("nodelay")?.unwrap_or(true),
        ttl: match o.number("ttl")? {
            None => None,
            Some(t) if t.fract() == 0.0 && (1.0..=255.0).contains(&t) => Some(t as u32),
            Some(t) => return Err(misuse(call, format!("'ttl' must be a whole number 1-255, got {t}"))),
        },
        tls: client_tls(&rt, call, opts.raw_get("tls")?, &host)?,
    };
    let limits = limits(&o)?;
    let half_open = o.boolean("allow_half_open")?.unwrap_or(false);
    let (h, object) = new_object(lua, &rt)?;
    for name in ["on_connect", "on_data", "on_drain", "on_close"] {
        if let Some(f) = o.function(name)? {
            object.raw_set(name, f)?;
        }
    }
    let mut rec = Record::new(lua.create_registry_value(&object)?, None, None, limits);
    rec.half_open = half_open;
    rec.on_data = o.function("on_data")?.is_some();
    rt.net.borrow_mut().streams.insert(h, Box::new(rec));
    if kind == "unix" {
        if let Err(e) = start(&rt, h, &Target::Unix(host.into()), &spec, limits) {
            release(&rt, h);
            return Ok((Value::Nil, Some(e)));
        }
        return Ok((Value::Table(object), None));
    }
    let then_spec = spec.clone();
    let name = host.clone();
    let continuation: addr::Continuation = Box::new(move |lua, rt, ips| {
        let mut addrs = match ips {
            Ok(ips) if !ips.is_empty() => addr::with_port(&ips, port),
            Ok(_) => return end(lua, rt, h, Some(format!("cannot resolve '{name}': no addresses"))),
            Err(e) => return end(lua, rt, h, Some(e)),
        };
        let first = addrs.remove(0);
        if let Some(rec) = rt.net.borrow_mut().streams.get_mut(&h) {
            let client = rec.client.get_or_insert_with(Box::default);
            client.fallback = addrs;
            client.options = Some(then_spec.clone());
        }
        match start(rt, h, &Target::Tcp(first), &then_spec, limits) {
            Ok(()) => Ok(()),
            Err(e) => end(lua, rt, h, Some(e)),
        }
    });
    addr::resolve_then(lua, &rt, &host, false, continuation)?;
    // A literal (or cached) address that cannot even start connecting fails at once.
    let failed = rt.net.borrow().streams.get(&h).and_then(|r| r.ended.clone());
    if let Some(why) = failed {
        release(&rt, h);
        return Ok((Value::Nil, Some(reason(&why))));
    }
    Ok((Value::Table(object), None))
}

/// Opens the driver stream of record `h` to `target`.
fn start(
    rt: &Runtime,
    h: u64,
    target: &Target,
    spec: &ConnectOptionsSpec,
    limits: RawLimits,
) -> std::result::Result<(), String> {
    let proto = Box::new(RawStream::new(limits));
    let key = rt.driver.borrow_mut().connect(target, proto, spec.options(), TAG)?;
    let mut net = rt.net.borrow_mut();
    match net.streams.get_mut(&h) {
        Some(rec) => {
            rec.key = Some(key);
            net.stream_keys.insert(key, h);
            Ok(())
        }
        None => {
            drop(net);
            rt.driver.borrow_mut().close(key);
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The other primitives (through mlua)

/// `core.net_on_data(h)`: the stream's `on_data` field was set.
fn net_on_data(lua: &Lua, h: Value) -> Result<()> {
    let rt = runtime(lua)?;
    let mut net = rt.net.borrow_mut();
    if let Some(rec) = handle_number(&h).and_then(|h| net.streams.get_mut(&h)) {
        rec.on_data = true;
    }
    Ok(())
}

/// `core.net_wait(h, co)`: parks `co` until the stream has news; false if it is gone.
fn net_wait(lua: &Lua, (h, thread): (Value, Thread)) -> Result<bool> {
    let rt = runtime(lua)?;
    let mut net = rt.net.borrow_mut();
    let Some(rec) = handle_number(&h).and_then(|h| net.streams.get_mut(&h)) else { return Ok(false) };
    if rec.ended.is_some() && rec.key.is_none() {
        return Ok(false);
    }
    rec.waiters.push(lua.create_registry_value(thread)?);
    Ok(true)
}

/// `core.net_status(h)` → `true` (open), `false` (connecting), or `nil, reason`.
fn net_status(lua: &Lua, h: Value) -> Result<(Option<bool>, Option<String>)> {
    let rt = runtime(lua)?;
    let net = rt.net.borrow();
    let Some(rec) = handle_number(&h).and_then(|h| net.streams.get(&h)) else {
        return Ok((None, Some("closed".into())));
    };
    if let Some(why) = &rec.ended {
        return Ok((None, Some(reason(why))));
    }
    Ok((Some(rec.opened), None))
}

/// `core.net_drained(h)` → `true` once nothing is queued, `nil, reason` after the end, `false`
/// while bytes wait.
fn net_drained(lua: &Lua, h: Value) -> Result<(Value, Option<String>)> {
    let rt = runtime(lua)?;
    let net = rt.net.borrow();
    let Some(rec) = handle_number(&h).and_then(|h| net.streams.get(&h)) else {
        return Ok((Value::Nil, Some("closed".into())));
    };
    if let Some(why) = &rec.ended {
        return Ok((Value::Nil, Some(reason(why))));
    }
    let queued = rec
        .key
        .and_then(|k| rt.driver.borrow_mut().stream(k).map(|s| s.queued()))
        .unwrap_or_else(|| rec.client.as_ref().map_or(0, |c| c.early.len()));
    Ok((Value::Boolean(queued == 0 && rec.opened), None))
}

/// `core.net_close(h, reset)`: `close` finishes (queued bytes go out first), `reset` aborts.
fn net_close(lua: &Lua, (h, reset): (Value, bool)) -> Result<bool> {
    let rt = runtime(lua)?;
    let Some(h) = handle_number(&h) else { return Ok(false) };
    let (key, ended) = match rt.net.borrow().streams.get(&h) {
        Some(rec) => (rec.key, rec.ended.is_some()),
        None => return Ok(false),
    };
    match key {
        Some(key) if !ended => {
            if let Some(proto) = rt.driver.borrow_mut().proto::<RawStream>(key) {
                if reset {
                    proto.abort(None);
                } else {
                    proto.finish();
                }
            }
            rt.flush(key);
        }
        // Resolving still, or ended with unread input.
        _ => {
            if !ended {
                end(lua, &rt, h, None)?;
            }
            release(&rt, h);
        }
    }
    Ok(true)
}

/// `core.net_starttls(h, opts)`: starts a TLS upgrade of a plain stream; unread input is taken
/// as the start of the peer's TLS records.
fn net_starttls(lua: &Lua, (h, opts): (Value, Value)) -> Result<(bool, Option<String>)> {
    const CALL: &str = "s:starttls(opts)";
    let rt = runtime(lua)?;
    let Some(h) = handle_number(&h) else { return Ok((false, Some("closed".into()))) };
    let (key, server) = match rt.net.borrow().streams.get(&h) {
        Some(rec) if rec.ended.is_none() => (rec.key, rec.server.is_some()),
        _ => return Ok((false, Some("closed".into()))),
    };
    let Some(key) = key else { return Ok((false, Some("not connected yet".into()))) };
    let tls = if server {
        let Value::Table(t) = opts else { return Err(bad_arg(CALL, "opts", "a table {cert, key}", &opts)) };
        let config = super::super::tls::server_options(CALL, t, &[])?;
        Tls::server(config).map_err(|e| misuse(CALL, e))?
    } else {
        let peer = rt.driver.borrow_mut().stream(key).map(|s| s.peer.clone());
        let host = match peer.as_ref().and_then(Address::ip) {
            Some(addr) => addr.ip().to_string(),
            None => "localhost".to_owned(),
        };
        let value = if opts.is_nil() { Value::Boolean(true) } else { opts };
        let Some((config, name)) = client_tls(&rt, CALL, value, &host)? else {
            return Ok((false, Some("no TLS options".into())));
        };
        Tls::client(config, &name).map_err(|e| misuse(CALL, e))?
    };
    let leftover = {
        let mut driver = rt.driver.borrow_mut();
        let Some(proto) = driver.proto::<RawStream>(key) else { return Ok((false, Some("closed".into()))) };
        let leftover = proto.input().to_vec();
        proto.consume_input(leftover.len());
        leftover
    };
    if let Err(e) = rt.driver.borrow_mut().start_tls(key, tls, &leftover) {
        return Ok((false, Some(e)));
    }
    if let Some(rec) = rt.net.borrow_mut().streams.get_mut(&h) {
        rec.upgrade = Upgrade::Running;
    }
    Ok((true, None))
}

/// `core.net_tls_state(h)` → `true` once a TLS upgrade is done, `nil, reason` if it failed,
/// `false` while it runs.
fn net_tls_state(lua: &Lua, h: Value) -> Result<(Value, Option<String>)> {
    let rt = runtime(lua)?;
    let net = rt.net.borrow();
    let Some(rec) = handle_number(&h).and_then(|h| net.streams.get(&h)) else {
        return Ok((Value::Nil, Some("closed".into())));
    };
    Ok(match (&rec.upgrade, &rec.ended) {
        (Upgrade::Failed(why), _) => (Value::Nil, Some(why.clone())),
        (_, Some(why)) => (Value::Nil, Some(reason(why))),
        (Upgrade::Running, None) => (Value::Boolean(false), None),
        (Upgrade::None, None) => (Value::Boolean(true), None),
    })
}

/// `core.net_name(h, peer)` → `ip, port` (or the path of a Unix socket).
fn net_name(lua: &Lua, (h, peer): (Value, bool)) -> Result<(Value, Option<u16>)> {
    let rt = runtime(lua)?;
    let Some(key) = handle_number(&h).and_then(|h| rt.net.borrow().streams.get(&h).and_then(|r| r.key))
    else {
        return Ok((Value::Nil, None));
    };
    let address = {
        let mut driver = rt.driver.borrow_mut();
        let Some(stream) = driver.stream(key) else { return Ok((Value::Nil, None)) };
        if peer {
            Some(stream.peer.clone())
        } else {
            stream.local.clone()
        }
    };
    Ok(match address {
        Some(Address::Ip(a)) => {
            (Value::String(lua.create_string(a.ip().to_canonical().to_string())?), Some(a.port()))
        }
        Some(Address::Unix(Some(p))) => {
            (Value::String(lua.create_string(p.to_string_lossy().as_bytes())?), None)
        }
        _ => (Value::Nil, None),
    })
}

/// `core.net_prop(h, name)`: `connected`, `queued`, `idle_time`, `tls`; nil for other names.
fn net_prop(lua: &Lua, (h, name): (Value, Value)) -> Result<Value> {
    let Value::String(name) = name else { return Ok(Value::Nil) };
    let rt = runtime(lua)?;
    let (key, opened, ended) = match handle_number(&h)
        .and_then(|h| rt.net.borrow().streams.get(&h).map(|r| (r.key, r.opened, r.ended.is_some())))
    {
        Some(r) => r,
        None => (None, false, true),
    };
    let mut driver = rt.driver.borrow_mut();
    let stream = key.and_then(|k| driver.stream(k));
    Ok(match (name.as_bytes().as_ref(), stream) {
        (b"connected", s) => Value::Boolean(opened && !ended && s.is_some_and(|s| !s.is_closed())),
        (b"queued", Some(s)) => Value::Integer(s.queued() as _),
        (b"queued", None) => Value::Integer(0),
        (b"idle_time", Some(s)) => {
            Value::Number(Instant::now().saturating_duration_since(s.last_tx()).as_secs_f64())
        }
        (b"tls", Some(s)) => match s.tls() {
            Some(tls) if tls.is_handshake_complete() => Value::Table(tls_info(lua, tls)?),
            _ => Value::Nil,
        },
        _ => Value::Nil,
    })
}

/// `s.tls`: protocol version, cipher, ALPN, SNI, the peer certificate's subject.
fn tls_info(lua: &Lua, tls: &Tls) -> Result<Table> {
    let info = lua.create_table()?;
    info.set("version", tls.protocol_version())?;
    info.set("cipher", tls.cipher_suite())?;
    info.set("alpn", tls.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()))?;
    info.set("sni", tls.sni_hostname())?;
    if let Some(der) = tls.peer_certificate() {
        if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
            info.set("peer_subject", cert.subject().to_string())?;
            info.set("peer_issuer", cert.issuer().to_string())?;
        }
    }
    Ok(info)
}

pub(super) fn register(lua: &Lua, rt: &std::rc::Rc<Runtime>, core: &Table) -> Result<()> {
    let boxed = raw::runtime_box(lua, rt)?;
    core.set("net_read", raw::function::<Read>(lua, &boxed)?)?;
    core.set("net_write", raw::function::<Write>(lua, &boxed)?)?;
    core.set("net_wait", lua.create_function(net_wait)?)?;
    core.set("net_on_data", lua.create_function(net_on_data)?)?;
    core.set("net_status", lua.create_function(net_status)?)?;
    core.set("net_drained", lua.create_function(net_drained)?)?;
    core.set("net_close", lua.create_function(net_close)?)?;
    core.set("net_starttls", lua.create_function(net_starttls)?)?;
    core.set("net_tls_state", lua.create_function(net_tls_state)?)?;
    core.set("net_name", lua.create_function(net_name)?)?;
    core.set("net_prop", lua.create_function(net_prop)?)?;
    core.set("net_connect", lua.create_function(connect)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::stream::StreamProtocol;

    fn stream_with(input: &[u8]) -> RawStream {
        let mut s = RawStream::new(RawLimits::default());
        s.handle_bytes(Instant::now(), input);
        s
    }

    #[test]
    fn requests_take_what_they_ask_for() {
        let mut s = stream_with(b"line one\nline two\nrest");
        assert_eq!(take(&mut s, &Request::Until(b"\n".to_vec(), usize::MAX)).unwrap(), b"line one\n");
        assert_eq!(
            take(&mut s, &Request::Until(b"two".to_vec(), 4)).unwrap(),
            b"line",
            "max wins over a far delimiter"
        );
        assert_eq!(take(&mut s, &Request::Until(b"\r\n".to_vec(), usize::MAX)), None);
        assert_eq!(take(&mut s, &Request::Exact(4)).unwrap(), b" two");
        assert_eq!(take(&mut s, &Request::Exact(99)), None);
        assert_eq!(take(&mut s, &Request::Any(2)).unwrap(), b"\nr");
        assert_eq!(take(&mut s, &Request::Any(usize::MAX)).unwrap(), b"est");
        assert_eq!(take(&mut s, &Request::Any(usize::MAX)), None);
        assert_eq!(take(&mut s, &Request::Exact(0)).unwrap(), b"");
    }

    #[test]
    fn a_delimiter_split_across_arrivals_is_found() {
        let mut s = stream_with(b"abc\r");
        assert_eq!(take(&mut s, &Request::Until(b"\r\n".to_vec(), usize::MAX)), None);
        s.handle_bytes(Instant::now(), b"\nxyz");
        assert_eq!(take(&mut s, &Request::Until(b"\r\n".to_vec(), usize::MAX)).unwrap(), b"abc\r\n");
    }
}
