//! Request bodies read while the handler runs (`lua/http_app.lua`'s `req:read_body`,
//! `req:stream_request_body`, and the whole body of a route that does not stream): the
//! connection hands a request over once its head is in (`HttpServerConn::deliver_heads`), and
//! the handler asks for the body here, parking until some of it came.

use mlua::{Lua, Result, Thread, Value};

use super::{key_of, runtime, HttpServerConn};
use crate::proto::http::BodyRead;

/// `core.body_read(connection, request, co, limit, stream)` → the body of the connection's
/// request number `request`, whole (`stream` false) or its next piece, and whether it is the
/// last; `PARK` when `co` is parked until more came; nil and why it cannot be read
/// (`too_large`, `timeout`, `malformed`, `client_closed`, `answered`). The first call starts
/// the reading, at most `limit` bytes.
fn read(
    lua: &Lua,
    (connection, request, co, limit, stream): (u64, u64, Thread, u64, bool),
) -> Result<(Value, Value)> {
    let rt = runtime(lua)?;
    let Some(key) = key_of(&rt, connection) else {
        return Ok((Value::Nil, Value::String(lua.create_string("client_closed")?)));
    };
    let read = {
        let mut driver = rt.driver.borrow_mut();
        let now = driver.now();
        match driver.proto::<HttpServerConn>(key) {
            Some(proto) if !proto.is_closed() => {
                proto.read_body(now, request, limit, stream);
                proto.take_body(request)
            }
            _ => BodyRead::Failed("client_closed"),
        }
    };
    // A `100 Continue`, or a refusal, to send; reading that paused for room to go on.
    rt.flush(key);
    rt.resume_reading(key);
    match read {
        BodyRead::Data(data, last) => Ok((Value::String(lua.create_string(&data)?), Value::Boolean(last))),
        BodyRead::Failed(why) => Ok((Value::Nil, Value::String(lua.create_string(why)?))),
        BodyRead::Waiting => {
            rt.sched.borrow_mut().park_on(key, lua.create_registry_value(co)?);
            Ok((Value::LightUserData(crate::bind::sched::park_value()), Value::Nil))
        }
    }
}

/// Adds `body_read` to `core`.
pub(super) fn register(lua: &Lua, core: &mlua::Table) -> Result<()> {
    core.set("body_read", lua.create_function(read)?)
}
