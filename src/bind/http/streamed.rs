//! Answers a handler sends piece by piece (Moonbridge's `send_status` / `send_header` /
//! `send_data` / `flush` / `finish`, as `res:` methods of `lua/http_app.lua`): the head goes
//! out with the first piece, the body with a Content-Length when the handler gave one, chunked
//! otherwise. A handler that sends faster than the client reads waits in `flush`.

use mlua::{Lua, Result, Table, Thread, Value};

use super::{borrowed, header_fields, key_of, runtime, HttpServerConn, Response};

/// `core.stream_start(connection, status, headers, length)` → true, or nil and why.
fn start(
    lua: &Lua,
    (connection, status, headers, length): (u64, u16, Table, Option<u64>),
) -> Result<(Option<bool>, Option<String>)> {
    let rt = runtime(lua)?;
    let Some(key) = key_of(&rt, connection) else { return Ok((None, Some("closed".into()))) };
    let fields = header_fields(&headers).map_err(mlua::Error::external)?;
    let fields = borrowed(&fields);
    let date = rt.http.borrow_mut().date().to_owned();
    let mut driver = rt.driver.borrow_mut();
    let now = driver.now();
    let Some(proto) = driver.proto::<HttpServerConn>(key) else { return Ok((None, Some("closed".into()))) };
    let response = Response { status, headers: &fields, body: b"", date: &date };
    let started = proto.respond_streamed(now, response, length);
    drop(driver);
    // A body the answer drops is read on (reading may have paused while it was held).
    rt.resume_reading(key);
    match started {
        Ok(()) => Ok((Some(true), None)),
        Err(e) => Ok((None, Some(e))),
    }
}

/// `core.stream_send(connection, data)` → the bytes now waiting to be sent, or nil and why.
fn send(lua: &Lua, (connection, data): (u64, mlua::String)) -> Result<(Option<usize>, Option<String>)> {
    let rt = runtime(lua)?;
    let Some(key) = key_of(&rt, connection) else { return Ok((None, Some("closed".into()))) };
    let queued = {
        let mut driver = rt.driver.borrow_mut();
        let now = driver.now();
        match driver.proto::<HttpServerConn>(key) {
            Some(proto) if !proto.is_closed() => {
                proto.send_body(now, &data.as_bytes());
                proto.queued()
            }
            _ => return Ok((None, Some("closed".into()))),
        }
    };
    rt.flush(key);
    Ok((Some(queued), None))
}

/// `core.stream_wait(connection, co, most)` → true: `co` is parked until the client took some of
/// the answer; false: at most `most` bytes wait; nil and why once the connection is gone.
fn wait(lua: &Lua, (connection, co, most): (u64, Thread, usize)) -> Result<(Option<bool>, Option<String>)> {
    let rt = runtime(lua)?;
    let Some(key) = key_of(&rt, connection) else { return Ok((None, Some("closed".into()))) };
    // Written now, not at the end of the update: a socket that takes it all reports no
    // drain, and nothing would wake `co`.
    rt.driver.borrow_mut().flush(key);
    let queued = match rt.driver.borrow_mut().proto::<HttpServerConn>(key) {
        Some(proto) if !proto.is_closed() => proto.queued(),
        _ => return Ok((None, Some("closed".into()))),
    };
    if queued <= most {
        return Ok((Some(false), None));
    }
    rt.sched.borrow_mut().park_on(key, lua.create_registry_value(co)?);
    Ok((Some(true), None))
}

/// `core.stream_end(connection)`: the answer is complete (a chunked one gets its last chunk).
fn end(lua: &Lua, connection: u64) -> Result<()> {
    let rt = runtime(lua)?;
    let Some(key) = key_of(&rt, connection) else { return Ok(()) };
    {
        let mut driver = rt.driver.borrow_mut();
        let now = driver.now();
        if let Some(proto) = driver.proto::<HttpServerConn>(key) {
            proto.end_body(now);
        }
    }
    rt.flush(key);
    // The next request, or the rest of a dropped body, may wait behind the answer.
    rt.resume_reading(key);
    Ok(())
}

/// `core.stream_close_after(connection)`: the connection closes once this answer is out.
fn close_after(lua: &Lua, connection: u64) -> Result<()> {
    let rt = runtime(lua)?;
    if let Some(key) = key_of(&rt, connection) {
        if let Some(proto) = rt.driver.borrow_mut().proto::<HttpServerConn>(key) {
            proto.close_after_response();
        }
    }
    Ok(())
}

/// Adds the `stream_*` functions to `core`.
pub(super) fn register(lua: &Lua, core: &Table) -> Result<()> {
    core.set("stream_start", lua.create_function(start)?)?;
    core.set("stream_send", lua.create_function(send)?)?;
    core.set("stream_wait", lua.create_function(wait)?)?;
    core.set("stream_end", lua.create_function(end)?)?;
    core.set("stream_close_after", lua.create_function(close_after)?)?;
    core.set("PARK", Value::LightUserData(crate::bind::sched::park_value()))
}
