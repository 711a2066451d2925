//! The calls a client app makes: `fetch` (waits in a coroutine, blocks outside one), its result,
//! `noawait_fetch` (a callback or nothing), and the deadlines of waiting calls.

use std::time::{Duration, Instant};

use mlua::{Lua, RegistryKey, Result, Table, Thread, Value};

use super::super::error::{bad_arg, message, misuse};
use super::super::msgpack::{decode, encode_for};
use super::super::runtime;
use super::super::Runtime;
use super::client::Link;
use super::{flush, wake_by};
use crate::driver::Key;
use crate::proto::rpc::{self, Client, Envelope};

/// Default `fetch` timeout.
const DEFAULT_FETCH_TIMEOUT: f64 = 5.0;

/// A call in flight.
pub(super) enum Call {
    /// `fetch`: a coroutine to wake (none when blocking) and when to give up.
    Waiting { thread: Option<RegistryKey>, deadline: Instant },
    /// `noawait_fetch` with a callback.
    Callback(RegistryKey),
    /// The answer, until the waiting `fetch` picks it up.
    Done(std::result::Result<Vec<u8>, String>),
}

/// Makes the client entry wake up at `at` (a waiting `fetch`'s deadline).
pub(super) fn arm_calls(rt: &Runtime, key: Key, at: Option<Instant>) {
    if let Some(at) = at {
        wake_by(rt, key, at);
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
    if c.link == Link::Down {
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
            let sent = match rt.driver.borrow_mut().datagram_proto::<Client>(key) {
                Some(client) => client.send(&msg),
                None => Err(rpc::Error::NotConnected),
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
        wake_by(rt, key, at);
    }
    if let Some(key) = key {
        flush(lua, rt, key)?;
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
        super::super::tick(lua, Some(left.min(Duration::from_millis(10))))?;
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

/// The client-side primitives of the Lua half.
pub(super) fn core(lua: &Lua, core: &Table) -> Result<()> {
    core.set("fetch_start", lua.create_function(fetch_start)?)?;
    core.set("fetch_result", lua.create_function(fetch_result)?)?;
    core.set("fetch_block", lua.create_function(fetch_block)?)?;
    core.set("noawait", lua.create_function(noawait)?)?;
    core.set("is_connected", lua.create_function(is_connected)?)
}
