//! The calls a client app makes: `fetch` (waits in a coroutine, blocks outside one), its result,
//! `noawait_fetch` (a callback or nothing), and the deadlines of waiting calls.

use std::ffi::c_int;
use std::time::{Duration, Instant};

use mlua::{Lua, Result, Table, Value};

use super::super::error::{bad_arg, message, misuse};
use super::super::msgpack::{decode, encode_for, encode_stack, ENCODE_STACK};
use super::super::raw::{self, FnRef, Out, RawFn, Stack, ThreadRef};
use super::super::runtime;
use super::super::time::MAX_SECONDS;
use super::super::Runtime;
use super::client::Link;
use super::{send_soon, wake_by};
use crate::driver::Key;
use crate::proto::rpc::{self, Client, Envelope};

/// Default `fetch` timeout.
const DEFAULT_FETCH_TIMEOUT: f64 = 5.0;

/// A call in flight.
pub(super) enum Call {
    /// `fetch`: the coroutine to wake (none when blocking) and when to give up.
    Waiting { thread: Option<ThreadRef>, deadline: Instant },
    /// `noawait_fetch` with a callback.
    Callback(FnRef),
    /// The answer, until the waiting `fetch` picks it up.
    Done(std::result::Result<Vec<u8>, String>),
}

/// Makes the client entry wake up at `at` (a waiting `fetch`'s deadline).
pub(super) fn arm_calls(rt: &Runtime, key: Key, at: Option<Instant>) {
    if let Some(at) = at {
        wake_by(rt, key, at);
    }
}

/// Sends a call with its encoded arguments and keeps `state` for its answer (none: nobody waits
/// for it); `Err(text)` when the client cannot send. The entry to flush comes back with the call
/// id (none while the host name resolves). Runs no Lua.
fn send_call(
    rt: &Runtime,
    id: u32,
    path: &str,
    args: &[u8],
    noawait: bool,
    state: Option<Call>,
) -> std::result::Result<(u32, Option<Key>), (String, Option<Call>)> {
    let mut st = rt.rpc.borrow_mut();
    let Some(c) = st.clients.get_mut(&id) else { return Err(("Not connected to server".into(), state)) };
    if c.link == Link::Down {
        return Err(("Not connected to server".into(), state));
    }
    c.next_call = c.next_call.wrapping_add(1);
    let call = c.next_call;
    let mut msg = Vec::new();
    Envelope::Request { id: call, path, args, noawait }.encode(&mut msg);
    let key = c.key;
    match key {
        None => c.early.push(msg),
        Some(key) => {
            let sent = match rt.driver.borrow_mut().datagram_proto::<Client>(key) {
                Some(client) => client.send(msg),
                None => Err(rpc::Error::NotConnected),
            };
            if let Err(e) = sent {
                return Err((e.to_string(), state));
            }
            rt.counters.borrow_mut().rpc_out += 1;
        }
    }
    let deadline = match &state {
        Some(Call::Waiting { deadline, .. }) => Some(*deadline),
        _ => None,
    };
    if let Some(state) = state {
        c.calls.insert(call, state);
    }
    drop(st);
    if let (Some(key), Some(at)) = (key, deadline) {
        wake_by(rt, key, at);
    }
    Ok((call, key))
}

/// Sends a call for a raw function and gives its answer: the call id, or `nil, why` (the
/// registry slot `state` holds is freed then). `encoded` goes back to the runtime's buffer.
fn issue(
    rt: &Runtime,
    st: &Stack,
    (id, path, encoded): (u32, &str, Vec<u8>),
    noawait: bool,
    state: Option<Call>,
) -> Out {
    let sent = send_call(rt, id, path, &encoded, noawait, state);
    rt.rpc.borrow_mut().args = encoded;
    match sent {
        Ok((call, key)) => {
            if let Some(key) = key {
                send_soon(rt, key);
            }
            Out::one(raw::Value::Int(call.into()))
        }
        Err((e, state)) => {
            match state {
                Some(Call::Waiting { thread: Some(t), .. }) => st.unref(t.id),
                Some(Call::Callback(f)) => st.unref(f.0),
                _ => {}
            }
            let mut out = Out::one(raw::Value::Nil);
            out.push(raw::Value::Owned(e.into_bytes()));
            out
        }
    }
}

fn seconds(secs: f64) -> std::result::Result<Duration, String> {
    if !(secs > 0.0 && secs <= MAX_SECONDS) {
        return Err(format!("{FETCH}: 'timeout' must be a number of seconds > 0 and <= 1e9, got {secs:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn timeout_of(call: &str, v: &Value) -> Result<Duration> {
    let secs = match v {
        Value::Nil => DEFAULT_FETCH_TIMEOUT,
        Value::Integer(i) => *i as f64,
        Value::Number(n) => *n,
        other => return Err(bad_arg(call, "timeout", "a number of seconds or nil", other)),
    };
    seconds(secs).map_err(|e| misuse(call, e.trim_start_matches(&format!("{FETCH}: "))))
}

const FETCH: &str = "client:fetch(path, args, timeout)";

/// Argument `idx` (a table or nil) of `call` as MessagePack, in the state's reused buffer (the
/// caller puts it back after sending). Encoding only reads the stack: nothing raises.
fn args_of(rt: &Runtime, st: &Stack, idx: c_int, call: &str) -> std::result::Result<Vec<u8>, String> {
    let mut encoded = std::mem::take(&mut rt.rpc.borrow_mut().args);
    encoded.clear();
    if !st.is_table(idx) {
        encoded.push(0xc0); // nil
        return Ok(encoded);
    }
    // SAFETY: `idx` is an argument of the running call.
    unsafe { encode_stack(st.state(), idx, &mut encoded) }
        .map_err(|e| format!("{call}: cannot encode 'args': it contains {}", e.text()))?;
    Ok(encoded)
}

/// `core.fetch_start(id, path, args, timeout, co)` → call id or `nil, err`: a raw C function
/// (every `fetch` in a coroutine starts here). The answer is handed to `co` as resume values
/// (`DELIVERED, result, err`).
pub(super) struct FetchStart;

impl RawFn for FetchStart {
    const NAME: &'static str = FETCH;
    const REFS: &'static [c_int] = &[5];
    const STACK: c_int = ENCODE_STACK;

    fn call(rt: &Runtime, st: &Stack) -> std::result::Result<Out, String> {
        let bad = |name: &str, expected: &str, idx| {
            format!("{FETCH}: '{name}' must be {expected}, got {}", st.type_name(idx))
        };
        // The trampoline registered the coroutine (argument 5) before this body ran.
        let Some(thread) = st.thread_ref(5) else { return Err(bad("co", "a coroutine", 5)) };
        let unref = |thread: ThreadRef| st.unref(thread.id);
        let checked = (|| {
            let id = st.integer(1).ok_or_else(|| bad("id", "an app id", 1))? as u32;
            let path = st.bytes(2).ok_or_else(|| bad("path", "a string", 2))?;
            let path =
                std::str::from_utf8(path).map_err(|_| format!("{FETCH}: 'path' must be UTF-8 text"))?;
            if !(st.is_nil(3) || st.is_table(3)) {
                return Err(bad("args", "a table or nil", 3));
            }
            let timeout = match st.is_nil(4) {
                true => DEFAULT_FETCH_TIMEOUT,
                false => st.number(4).ok_or_else(|| bad("timeout", "a number of seconds or nil", 4))?,
            };
            let deadline = Instant::now() + seconds(timeout)?;
            let encoded = args_of(rt, st, 3, FETCH)?;
            Ok((id, path, encoded, deadline))
        })();
        let (id, path, encoded, deadline) = match checked {
            Ok(checked) => checked,
            Err(e) => {
                unref(thread);
                return Err(e);
            }
        };
        let state = Call::Waiting { thread: Some(thread), deadline };
        Ok(issue(rt, st, (id, path, encoded), false, Some(state)))
    }
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
                t.release(lua);
            }
            Ok((true, Value::Nil, Some("Request timed out".into())))
        }
        Call::Done(Ok(bytes)) => match decode(lua, &bytes) {
            Ok(v) => Ok((true, v, None)),
            Err(e) => Ok((true, Value::Nil, Some(message(&e)))),
        },
        Call::Done(Err(e)) => Ok((true, Value::Nil, Some(e))),
        Call::Callback(f) => {
            f.release(lua);
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
    let deadline = Instant::now() + timeout_of(FETCH, &timeout)?;
    let Value::String(path) = &path else { return Err(bad_arg(FETCH, "path", "a string", &path)) };
    let path = path.to_str()?.to_owned();
    if !matches!(args, Value::Nil | Value::Table(_)) {
        return Err(bad_arg(FETCH, "args", "a table or nil", &args));
    }
    let encoded = encode_for(lua, FETCH, "args", &args)?;
    let state = Call::Waiting { thread: None, deadline };
    let rt = runtime(lua)?;
    let call = match send_call(&rt, id, &path, &encoded, false, Some(state)) {
        Ok((call, key)) => {
            if let Some(key) = key {
                send_soon(&rt, key);
            }
            call
        }
        Err((e, _)) => return Ok((Value::Nil, Some(e))),
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

/// `core.noawait(id, path, callback, args)` → call id or `nil, err`: a raw C function (a game may
/// make hundreds a frame). The answer, or the error, is handed to `callback` by `lunac.update`.
struct Noawait;

impl RawFn for Noawait {
    const NAME: &'static str = NOAWAIT;
    const REFS: &'static [c_int] = &[3, 4];
    const STACK: c_int = ENCODE_STACK;

    fn call(rt: &Runtime, st: &Stack) -> std::result::Result<Out, String> {
        let bad = |name: &str, expected: &str, idx| {
            format!("{NOAWAIT}: '{name}' must be {expected}, got {}", st.type_name(idx))
        };
        // The documentation's own example passes the args in the callback's place.
        let (cb, args) = if st.is_table(3) && st.is_nil(4) { (4, 3) } else { (3, 4) };
        if !(st.is_nil(cb) || st.is_function(cb)) {
            return Err(bad("callback", "a function or nil", cb));
        }
        // The trampoline registered the callback before this body ran.
        let state = st.function_ref(cb).map(Call::Callback);
        let checked = (|| {
            let id = st.integer(1).ok_or_else(|| bad("id", "an app id", 1))? as u32;
            let path = st.bytes(2).ok_or_else(|| bad("path", "a string", 2))?;
            let path =
                std::str::from_utf8(path).map_err(|_| format!("{NOAWAIT}: 'path' must be UTF-8 text"))?;
            if !(st.is_nil(args) || st.is_table(args)) {
                return Err(bad("args", "a table or nil", args));
            }
            let encoded = args_of(rt, st, args, NOAWAIT)?;
            Ok((id, path, encoded))
        })();
        let (id, path, encoded) = match checked {
            Ok(checked) => checked,
            Err(e) => {
                if let Some(Call::Callback(f)) = state {
                    st.unref(f.0);
                }
                return Err(e);
            }
        };
        Ok(issue(rt, st, (id, path, encoded), true, state))
    }
}

const NOAWAIT: &str = "client:noawait_fetch(path, callback, args)";

/// `core.client_rtt(id)` → smoothed RTT and its variation in seconds, nil before the first sample.
fn client_rtt(lua: &Lua, id: u32) -> Result<(Option<f64>, Option<f64>)> {
    let rt = runtime(lua)?;
    let key = rt.rpc.borrow().clients.get(&id).and_then(|c| c.key);
    let rtt = key.and_then(|k| rt.driver.borrow_mut().datagram_proto::<Client>(k).and_then(|c| c.rtt()));
    Ok(super::seconds(rtt))
}

fn is_connected(lua: &Lua, id: u32) -> Result<bool> {
    Ok(runtime(lua)?.rpc.borrow().clients.get(&id).is_some_and(|c| c.connected))
}

/// The client-side primitives of the Lua half.
pub(super) fn core(lua: &Lua, core: &Table) -> Result<()> {
    let boxed = raw::runtime_box(lua, &runtime(lua)?)?;
    core.set("fetch_start", raw::function::<FetchStart>(lua, &boxed)?)?;
    core.set("fetch_result", lua.create_function(fetch_result)?)?;
    core.set("fetch_block", lua.create_function(fetch_block)?)?;
    core.set("noawait", raw::function::<Noawait>(lua, &boxed)?)?;
    core.set("client_rtt", lua.create_function(client_rtt)?)?;
    core.set("is_connected", lua.create_function(is_connected)?)
}
