//! `luna.json`: JSON text to and from Lua values, with serde_json through mlua's serde support.
//!
//! Tables with only a sequence part are arrays, other tables objects (an empty table is an
//! object unless it carries `luna.json.array`'s mark, as decoded arrays do, so they encode back
//! the same); JSON `null` is `luna.json.null`.

use mlua::{Lua, LuaSerdeExt, Result, SerializeOptions, Table, Value};
use serde::Serialize;

use super::error::misuse;
use super::options::Options;

const ENCODE: &str = "luna.json.encode(value, options)";
const DECODE: &str = "luna.json.decode(text)";

/// `luna.json.encode(value[, {pretty = false, sort_keys = false}])`.
fn encode(lua: &Lua, (value, options): (Value, Value)) -> Result<mlua::String> {
    let opts = Options::optional(lua, ENCODE, options, &["pretty", "sort_keys"])?;
    let pretty = opts.boolean("pretty")?.unwrap_or(false);
    let value = value.to_serializable().sort_keys(opts.boolean("sort_keys")?.unwrap_or(false));
    let mut out = Vec::new();
    let written = if pretty {
        value.serialize(&mut serde_json::Serializer::pretty(&mut out))
    } else {
        value.serialize(&mut serde_json::Serializer::new(&mut out))
    };
    written.map_err(|e| misuse(ENCODE, e))?;
    lua.create_string(out)
}

/// `luna.json.decode(text)`: the value, or an error naming where the text goes wrong.
fn decode(lua: &Lua, text: mlua::String) -> Result<Value> {
    let parsed: serde_json::Value =
        serde_json::from_slice(&text.as_bytes()).map_err(|e| misuse(DECODE, e))?;
    lua.to_value_with(&parsed, SerializeOptions::new().set_array_metatable(true))
}

/// `luna.json.array([t])`: `t` (or a new table) marked to encode as an array even when empty.
fn array(lua: &Lua, t: Option<Table>) -> Result<Table> {
    let t = match t {
        Some(t) => t,
        None => lua.create_table()?,
    };
    t.set_metatable(Some(lua.array_metatable()))?;
    Ok(t)
}

/// Adds `luna.json`.
pub(crate) fn register(lua: &Lua, module: &Table) -> Result<()> {
    let json = lua.create_table()?;
    json.set("encode", lua.create_function(encode)?)?;
    json.set("decode", lua.create_function(decode)?)?;
    json.set("array", lua.create_function(array)?)?;
    json.set("null", lua.null())?;
    module.set("json", json)
}
