//! The primitives behind a server-side `ws` object (a Lua table built by lua/luna.lua around
//! a numeric handle `__h`): `core.ws_send`, `core.ws_receive`, `core.ws_wait`, `core.ws_close`,
//! `core.ws_broadcast`, `core.ws_peer`, `core.ws_info`, and the hand-over of a message to a
//! handler parked in `receive`.
//!
//! The hot pair, `send` and `receive`, are raw C functions (`super::super::raw`). A handler that
//! finds nothing to receive parks itself with a flag on its connection, and the next message is
//! passed to it as resume values (`DELIVERED, message, opcode`) without a further call.

use mlua::{Lua, Result, Thread, Value};

use super::super::raw::{self, Out, RawFn, Stack};
use super::super::sched::{self, delivered_value, park_value};
use super::super::{handle_number, runtime, Runtime};
use super::{close_code, opcode_arg, opcode_number, send, with_data, with_stream, OPCODE_EXPECTED};
use crate::driver::{Address, Key};
use crate::proto::ws::{self as proto, Opcode, Received, WsSession};

/// The connection behind a handle number, if it is still known.
fn handle_key(rt: &Runtime, handle: Option<i64>) -> Option<Key> {
    rt.ws.borrow().handles.get(&(handle? as u64)).copied()
}

/// [`handle_key`] for a handle passed through mlua.
fn conn_key(rt: &Runtime, handle: &Value) -> Option<Key> {
    handle_key(rt, handle_number(handle).map(|h| h as i64))
}

/// How `receive` ends once the connection is gone from the runtime.
fn released() -> Received {
    Received::Closed { code: 1006, reason: "connection released".into(), clean: false }
}

/// `ws.raw_socket`: addresses, descriptor, upgrade request details and TLS parameters.
fn peer_info(lua: &Lua, rt: &Runtime, key: Key) -> Result<Value> {
    let mut driver = rt.driver.borrow_mut();
    let Some(stream) = driver.stream(key) else { return Ok(Value::Nil) };
    let t = lua.create_table()?;
    if let Address::Ip(peer) = &stream.peer {
        t.set("peer_ip", peer.ip().to_string())?;
        t.set("peer_port", peer.port())?;
    }
    if let Some(Address::Ip(local)) = &stream.local {
        t.set("local_ip", local.ip().to_string())?;
        t.set("local_port", local.port())?;
    }
    t.set("fd", stream.fd())?;
    if let Some(tls) = stream.tls() {
        let info = lua.create_table()?;
        info.set("version", tls.protocol_version())?;
        info.set("cipher", tls.cipher_suite())?;
        info.set("sni", tls.sni_hostname())?;
        t.set("tls", info)?;
    }
    let Some(session) = driver.proto::<WsSession>(key) else { return Ok(Value::Table(t)) };
    let upgrade = session.upgrade();
    t.set("protocol", upgrade.protocol.clone())?;
    t.set("path", upgrade.path.clone())?;
    t.set("query", upgrade.query.clone())?;
    let headers = lua.create_table()?;
    for (name, value) in &upgrade.headers {
        headers.set(name.as_str(), value.as_str())?;
    }
    t.set("headers", headers)?;
    Ok(Value::Table(t))
}

/// `core.ws_send(h, data, opcode)` → `true`, or `nil, reason` (closed, backpressure).
pub(super) struct Send;

impl RawFn for Send {
    const NAME: &'static str = "ws:send(data, opcode)";
    const STRINGS: &'static [std::ffi::c_int] = &[2];

    fn call(rt: &Runtime, st: &Stack) -> std::result::Result<Out, String> {
        let op = if st.is_nil(3) {
            Opcode::Text
        } else {
            st.integer(3).and_then(opcode_number).ok_or_else(|| {
                format!("{}: 'opcode' must be {OPCODE_EXPECTED}, got {}", Self::NAME, st.type_name(3))
            })?
        };
        let key = handle_key(rt, st.integer(1));
        let Some(data) = st.bytes(2) else {
            return Err(format!("{}: 'data' must be a string, got {}", Self::NAME, st.type_name(2)));
        };
        let sent = match key {
            Some(key) => send(rt, key, op, data),
            None => (None, Some("the connection is closed".to_owned())),
        };
        Ok(match sent {
            (Some(ok), _) => Out::one(raw::Value::Bool(ok)),
            (None, err) => {
                let mut out = Out::one(raw::Value::Nil);
                out.push(raw::Value::Owned(err.unwrap_or_default().into_bytes()));
                out
            }
        })
    }
}

/// Pops the next received message (or peeks at the end) of a session; `None` while nothing is
/// there. A stream gone from the driver ends with 1006.
fn take_received(rt: &Runtime, key: Key) -> Option<Received> {
    let received = match rt.driver.borrow_mut().proto::<WsSession>(key) {
        Some(session) => session.receive(),
        None => return Some(released()),
    };
    rt.resume_reading(key);
    if let Some(Received::Message(..)) = &received {
        rt.counters.borrow_mut().ws_in += 1;
    }
    received
}

/// `core.ws_receive(h)` → `message, opcode`; `nil, nil, clean, code, reason` once the connection
/// ended; `PARK` when the calling coroutine is the connection's handler (it is now parked and the
/// next message resumes it); `false` for any other coroutine (it parks with `core.ws_wait`).
pub(super) struct Receive;

impl RawFn for Receive {
    const NAME: &'static str = "ws:receive()";

    fn call(rt: &Runtime, st: &Stack) -> std::result::Result<Out, String> {
        let Some(key) = handle_key(rt, st.integer(1)) else { return Ok(received_values(released())) };
        // Whatever resumed the handler, it is not parked until it says so again.
        let is_handler = match rt.ws.borrow_mut().conns.get_mut(&key) {
            Some(c) if c.handler_ptr == st.thread() => {
                c.parked = false;
                true
            }
            _ => false,
        };
        match take_received(rt, key) {
            Some(received) => Ok(received_values(received)),
            None if is_handler => {
                if let Some(c) = rt.ws.borrow_mut().conns.get_mut(&key) {
                    c.parked = true;
                }
                Ok(Out::one(raw::Value::Light(park_value().0)))
            }
            None => Ok(Out::one(raw::Value::Bool(false))),
        }
    }
}

/// What `receive` returns for `received`.
fn received_values(received: Received) -> Out {
    let mut out = Out::new();
    match received {
        Received::Message(op, data) => {
            out.push(raw::Value::Bytes(data));
            out.push(raw::Value::Int(op.as_u8().into()));
        }
        Received::Closed { code, reason, clean } => {
            out.push(raw::Value::Nil);
            out.push(raw::Value::Nil);
            out.push(raw::Value::Bool(clean));
            out.push(raw::Value::Int(code.into()));
            out.push(raw::Value::Owned(reason.into_bytes()));
        }
    }
    out
}

/// `core.ws_wait(h, co)`: parks a coroutine other than the handler until the connection has
/// news; `false` if the connection is gone (nothing will wake it).
fn ws_wait(lua: &Lua, (h, thread): (Value, Thread)) -> Result<bool> {
    let rt = runtime(lua)?;
    let Some(key) = conn_key(&rt, &h) else { return Ok(false) };
    let thread = lua.create_registry_value(thread)?;
    rt.sched.borrow_mut().park_on(key, thread);
    Ok(true)
}

/// Hands the next message (or the end) to the connection's handler if it is parked in
/// `receive`: it resumes with `DELIVERED, message, opcode` (or `DELIVERED, nil, nil, clean,
/// code, reason`).
pub(super) fn deliver(lua: &Lua, rt: &Runtime, conn: Key) -> Result<()> {
    let (thread, ptr) = match rt.ws.borrow().conns.get(&conn) {
        Some(c) if c.parked => (c.handler.id(), c.handler_ptr),
        _ => return Ok(()),
    };
    let Some(received) = take_received(rt, conn) else { return Ok(()) };
    if let Some(c) = rt.ws.borrow_mut().conns.get_mut(&conn) {
        c.parked = false;
    }
    let tag = raw::Value::Light(delivered_value().0);
    match received {
        Received::Message(op, data) => {
            let args = [tag, raw::Value::Bytes(data), raw::Value::Int(op.as_u8().into())];
            sched::resume_parked(lua, rt, thread, ptr, &args)
        }
        Received::Closed { code, reason, clean } => {
            let args = [
                tag,
                raw::Value::Nil,
                raw::Value::Nil,
                raw::Value::Bool(clean),
                raw::Value::Int(code.into()),
                raw::Value::Owned(reason.into_bytes()),
            ];
            sched::resume_parked(lua, rt, thread, ptr, &args)
        }
    }
}

/// `core.ws_close(h, code, reason)`.
fn ws_close(lua: &Lua, (h, code, reason): (Value, Value, Option<String>)) -> Result<bool> {
    let code = close_code("ws:close(code, reason)", &code)?;
    let rt = runtime(lua)?;
    if let Some(key) = conn_key(&rt, &h) {
        with_stream(&rt, key, |s| s.close(code, reason.as_deref().unwrap_or("")));
    }
    Ok(true)
}

/// `core.ws_broadcast(h, data, opcode)`: encodes the frame once for the whole group.
fn ws_broadcast(lua: &Lua, (h, data, op): (Value, Value, Value)) -> Result<usize> {
    let call = "ws:broadcast(data, opcode)";
    let (op, rt) = (opcode_arg(call, &op)?, runtime(lua)?);
    let frame = with_data(call, &data, |data| proto::encode_frame(op, data))?
        .map_err(|e| super::super::error::misuse(call, e))?;
    let members: Vec<Key> = {
        let ws = rt.ws.borrow();
        let Some(conn) = conn_key(&rt, &h).and_then(|key| ws.conns.get(&key)) else { return Ok(0) };
        // The app may be removed while its connections are still closing.
        let Some(server) = ws.servers.get(&conn.server) else { return Ok(0) };
        server.groups.get(&conn.group).map(|g| g.iter().copied().collect()).unwrap_or_default()
    };
    let mut sent = 0;
    for member in members {
        if let Some(Ok(())) = with_stream(&rt, member, |s| s.send_encoded(&frame)) {
            sent += 1;
        }
    }
    rt.counters.borrow_mut().ws_out += sent as u64;
    Ok(sent)
}

/// `core.ws_stats(h, t)` → `t` (or a new table) filled with the connection's counts; nil once
/// it is gone. A raw C function: an overlay may call it for every connection every frame.
pub(super) struct Stats;

impl RawFn for Stats {
    const NAME: &'static str = "ws:stats([t])";

    fn call(rt: &Runtime, st: &Stack) -> std::result::Result<Out, String> {
        st.report_table(2, Self::NAME)?;
        let Some(key) = handle_key(rt, st.integer(1)) else { return Ok(Out::one(raw::Value::Nil)) };
        let mut driver = rt.driver.borrow_mut();
        let messages = driver.proto::<WsSession>(key).map(|s| (s.messages_in, s.messages_out));
        let stream = driver.stream(key).map(|s| (s.bytes_in, s.bytes_out, s.queued() as u64));
        let Some(((messages_in, messages_out), (bytes_in, bytes_out, queued))) = messages.zip(stream) else {
            return Ok(Out::one(raw::Value::Nil));
        };
        let n = |v: u64| v as f64;
        let fields = vec![
            ("", "messages_in", n(messages_in)),
            ("", "messages_out", n(messages_out)),
            ("", "bytes_in", n(bytes_in)),
            ("", "bytes_out", n(bytes_out)),
            ("", "queued_bytes", n(queued)),
        ];
        Ok(Out::one(raw::Value::Report { into: 2, fields }))
    }
}

/// `core.ws_peer(h)` → ip, port (nil once released).
fn ws_peer(lua: &Lua, h: Value) -> Result<(Option<String>, Option<u16>)> {
    let rt = runtime(lua)?;
    let Some(key) = conn_key(&rt, &h) else { return Ok((None, None)) };
    let peer = rt.driver.borrow_mut().stream(key).and_then(|s| s.peer.ip());
    Ok(match peer {
        Some(peer) => (Some(peer.ip().to_string()), Some(peer.port())),
        None => (None, None),
    })
}

/// `core.ws_info(h)`: the `ws.raw_socket` table.
fn ws_info(lua: &Lua, h: Value) -> Result<Value> {
    let rt = runtime(lua)?;
    match conn_key(&rt, &h) {
        Some(key) => peer_info(lua, &rt, key),
        None => Ok(Value::Nil),
    }
}

/// Adds the primitives to `core`.
pub(super) fn register(lua: &Lua, rt: &std::rc::Rc<Runtime>, core: &mlua::Table) -> Result<()> {
    let boxed = super::super::raw::runtime_box(lua, rt)?;
    core.set("ws_send", super::super::raw::function::<Send>(lua, &boxed)?)?;
    core.set("ws_receive", super::super::raw::function::<Receive>(lua, &boxed)?)?;
    core.set("ws_wait", lua.create_function(ws_wait)?)?;
    core.set("ws_close", lua.create_function(ws_close)?)?;
    core.set("ws_broadcast", lua.create_function(ws_broadcast)?)?;
    core.set("ws_peer", lua.create_function(ws_peer)?)?;
    core.set("ws_stats", super::super::raw::function::<Stats>(lua, &boxed)?)?;
    core.set("ws_info", lua.create_function(ws_info)?)
}
