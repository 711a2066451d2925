//! `multipart/form-data` for `lua/http_app.lua`: `proto::http::multipart`'s reader as a Lua
//! object (`req:stream_post_param`), and whole bodies read with it (`req.post_params`).

use mlua::{Lua, Result, Table, UserData, UserDataMethods};

use crate::proto::http::multipart::{Part, Reader};

/// `core.multipart_reader(content_type)` → a reader whose `:feed(piece)` (nil: the end) returns
/// the parts that piece completes, each `{"field", name, file_name, content_type}`,
/// `{"data", bytes}`, `{"end"}` or `{"error", why}`; or nil and why there is no boundary.
fn reader(lua: &Lua, content_type: String) -> Result<(Option<mlua::AnyUserData>, Option<String>)> {
    match Reader::new(&content_type) {
        Ok(r) => Ok((Some(lua.create_userdata(r)?), None)),
        Err(why) => Ok((None, Some(why))),
    }
}

impl UserData for Reader {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method_mut("feed", |lua, this, piece: Option<mlua::String>| {
            let parts = this.push(piece.as_ref().map(|p| p.as_bytes()).as_deref());
            let list = lua.create_table_with_capacity(parts.len(), 0)?;
            for part in parts {
                let t = lua.create_table()?;
                match part {
                    Part::Field { name, file_name, content_type } => {
                        t.raw_set(1, "field")?;
                        t.raw_set(2, name)?;
                        t.raw_set(3, file_name)?;
                        t.raw_set(4, content_type)?;
                    }
                    Part::Data(bytes) => {
                        t.raw_set(1, "data")?;
                        t.raw_set(2, lua.create_string(&bytes)?)?;
                    }
                    Part::End => t.raw_set(1, "end")?,
                    Part::Error(why) => {
                        t.raw_set(1, "error")?;
                        t.raw_set(2, why)?;
                    }
                }
                list.raw_push(t)?;
            }
            Ok(list)
        });
    }
}

/// `core.multipart(body, content_type)` → the fields of a whole `multipart/form-data` body, in
/// order, as `{name, value, file_name, content_type}`; or nil and why it is malformed.
fn whole(lua: &Lua, (body, content_type): (mlua::String, String)) -> Result<(Option<Table>, Option<String>)> {
    let mut reader = match Reader::new(&content_type) {
        Ok(r) => r,
        Err(why) => return Ok((None, Some(why))),
    };
    let mut parts = reader.push(Some(&body.as_bytes()));
    parts.extend(reader.push(None));
    let list = lua.create_table()?;
    let mut value = Vec::new();
    let mut field = None;
    for part in parts {
        match part {
            Part::Field { name, file_name, content_type } => {
                let t = lua.create_table()?;
                t.raw_set("name", name)?;
                t.raw_set("file_name", file_name)?;
                t.raw_set("content_type", content_type)?;
                field = Some(t);
                value.clear();
            }
            Part::Data(bytes) => value.extend_from_slice(&bytes),
            Part::End => {
                if let Some(t) = field.take() {
                    t.raw_set("value", lua.create_string(&value)?)?;
                    list.raw_push(t)?;
                }
            }
            Part::Error(why) => return Ok((None, Some(why))),
        }
    }
    Ok((Some(list), None))
}

/// Adds `multipart` and `multipart_reader` to `core`.
pub(super) fn register(lua: &Lua, core: &Table) -> Result<()> {
    core.set("multipart", lua.create_function(whole)?)?;
    core.set("multipart_reader", lua.create_function(reader)?)
}
