//! Lua values as MessagePack and back: RPC arguments, results and pushes. Decoding checks every
//! claimed length against the bytes left (hostile input cannot make us allocate) and bounds
//! nesting; encoding names what it cannot encode.

use mlua::{Lua, Result, Value};

use super::error::{lua_type, message, misuse};

/// Deepest nesting of tables accepted by the encoder and the decoder.
const MAX_DEPTH: usize = 64;

/// Encodes a Lua value; `Err` names what could not be encoded.
pub(crate) fn encode(value: &Value, out: &mut Vec<u8>) -> std::result::Result<(), String> {
    let mut path = Vec::new();
    encode_inner(value, out, &mut path)
}

fn encode_inner(value: &Value, out: &mut Vec<u8>, path: &mut Vec<usize>) -> std::result::Result<(), String> {
    use rmp::encode as e;
    let io = |_| "write failed".to_string();
    match value {
        Value::Nil => e::write_nil(out).map_err(io)?,
        Value::Boolean(b) => e::write_bool(out, *b).map_err(io)?,
        Value::Integer(i) => {
            e::write_sint(out, *i).map_err(|_| "write failed".to_string())?;
        }
        Value::Number(n) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                e::write_sint(out, *n as i64).map_err(|_| "write failed".to_string())?;
            } else {
                e::write_f64(out, *n).map_err(|_| "write failed".to_string())?;
            }
        }
        Value::String(s) => {
            let bytes = s.as_bytes();
            match std::str::from_utf8(&bytes) {
                Ok(text) => e::write_str(out, text).map_err(|_| "write failed".to_string())?,
                Err(_) => e::write_bin(out, &bytes).map_err(|_| "write failed".to_string())?,
            }
        }
        Value::Table(t) => {
            let ptr = t.to_pointer() as usize;
            if path.contains(&ptr) {
                return Err("a cyclic table".into());
            }
            if path.len() >= MAX_DEPTH {
                return Err(format!("a table nested deeper than {MAX_DEPTH} levels"));
            }
            path.push(ptr);
            let len = t.raw_len();
            let mut count = 0usize;
            for pair in t.pairs::<Value, Value>() {
                let _ = pair.map_err(|e| message(&e))?;
                count += 1;
            }
            if len > 0 && count == len {
                e::write_array_len(out, len as u32).map_err(|_| "write failed".to_string())?;
                for i in 1..=len {
                    let v: Value = t.raw_get(i).map_err(|e| message(&e))?;
                    encode_inner(&v, out, path)?;
                }
            } else {
                e::write_map_len(out, count as u32).map_err(|_| "write failed".to_string())?;
                for pair in t.pairs::<Value, Value>() {
                    let (k, v) = pair.map_err(|e| message(&e))?;
                    encode_inner(&k, out, path)?;
                    encode_inner(&v, out, path)?;
                }
            }
            path.pop();
        }
        other => return Err(format!("a {} value", lua_type(other))),
    }
    Ok(())
}

/// Decodes one MessagePack value into Lua (strings and binaries both become Lua strings).
/// Lengths are checked against the bytes left, so hostile input cannot make us allocate.
pub(crate) fn decode(lua: &Lua, data: &[u8]) -> Result<Value> {
    if data.is_empty() {
        return Ok(Value::Nil);
    }
    let mut rd = data;
    decode_inner(lua, &mut rd, 0)
}

fn bad(what: impl std::fmt::Display) -> mlua::Error {
    mlua::Error::external(format!("cannot decode a message: {what}"))
}

fn take<'a>(rd: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if rd.len() < n {
        return Err(bad("truncated data"));
    }
    let (head, rest) = rd.split_at(n);
    *rd = rest;
    Ok(head)
}

fn decode_inner(lua: &Lua, rd: &mut &[u8], depth: usize) -> Result<Value> {
    use rmp::decode::RmpRead;
    use rmp::Marker as M;
    if depth > MAX_DEPTH {
        return Err(bad(format!("nested deeper than {MAX_DEPTH} levels")));
    }
    let marker = rmp::decode::read_marker(rd).map_err(|_| bad("truncated data"))?;
    let int = |i: i64| Value::Integer(i as _);
    let value = match marker {
        M::Null => Value::Nil,
        M::True => Value::Boolean(true),
        M::False => Value::Boolean(false),
        M::FixPos(n) => int(n.into()),
        M::FixNeg(n) => int(n.into()),
        M::U8 => int(rd.read_data_u8().map_err(bad)?.into()),
        M::U16 => int(rd.read_data_u16().map_err(bad)?.into()),
        M::U32 => int(rd.read_data_u32().map_err(bad)?.into()),
        M::U64 => match rd.read_data_u64().map_err(bad)? {
            v if v > i64::MAX as u64 => Value::Number(v as f64),
            v => int(v as i64),
        },
        M::I8 => int(rd.read_data_i8().map_err(bad)?.into()),
        M::I16 => int(rd.read_data_i16().map_err(bad)?.into()),
        M::I32 => int(rd.read_data_i32().map_err(bad)?.into()),
        M::I64 => int(rd.read_data_i64().map_err(bad)?),
        M::F32 => Value::Number(rd.read_data_f32().map_err(bad)?.into()),
        M::F64 => Value::Number(rd.read_data_f64().map_err(bad)?),
        M::FixStr(_) | M::Str8 | M::Str16 | M::Str32 | M::Bin8 | M::Bin16 | M::Bin32 => {
            let n = match marker {
                M::FixStr(n) => n.into(),
                M::Str8 | M::Bin8 => rd.read_data_u8().map_err(bad)?.into(),
                M::Str16 | M::Bin16 => rd.read_data_u16().map_err(bad)?.into(),
                _ => rd.read_data_u32().map_err(bad)?,
            };
            Value::String(lua.create_string(take(rd, n as usize)?)?)
        }
        M::FixArray(_) | M::Array16 | M::Array32 => {
            let n = match marker {
                M::FixArray(n) => n.into(),
                M::Array16 => rd.read_data_u16().map_err(bad)?.into(),
                _ => rd.read_data_u32().map_err(bad)?,
            } as usize;
            if n > rd.len() {
                return Err(bad("array longer than the data"));
            }
            let t = lua.create_table_with_capacity(n, 0)?;
            for i in 1..=n {
                t.raw_set(i, decode_inner(lua, rd, depth + 1)?)?;
            }
            Value::Table(t)
        }
        M::FixMap(_) | M::Map16 | M::Map32 => {
            let n = rmp::decode::marker_to_len(rd, marker).map_err(bad)? as usize;
            if n > rd.len() / 2 {
                return Err(bad("map longer than the data"));
            }
            let t = lua.create_table_with_capacity(0, n)?;
            for _ in 0..n {
                let k = decode_inner(lua, rd, depth + 1)?;
                let v = decode_inner(lua, rd, depth + 1)?;
                match k {
                    Value::Nil => {}
                    Value::Number(f) if f.is_nan() => return Err(bad("a NaN table key")),
                    k => t.raw_set(k, v)?,
                }
            }
            Value::Table(t)
        }
        other => return Err(bad(format!("unsupported MessagePack type {other:?}"))),
    };
    Ok(value)
}

pub(crate) fn encode_for(call: &str, what: &str, value: &Value) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode(value, &mut out).map_err(|e| misuse(call, format!("cannot encode '{what}': it contains {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlua::Table;

    fn round_trip(lua: &Lua, src: &str) -> Value {
        let value: Value = lua.load(src).eval().unwrap();
        let mut bytes = Vec::new();
        encode(&value, &mut bytes).unwrap();
        decode(lua, &bytes).unwrap()
    }

    #[test]
    fn values_round_trip() {
        let lua = Lua::new();
        let v = round_trip(&lua, r#"return {1, 2.5, "a\0b", true, {x = {y = -7}}, ("z"):rep(70000)}"#);
        let t = v.as_table().unwrap();
        assert_eq!(t.raw_len(), 6);
        assert_eq!(t.get::<f64>(2).unwrap(), 2.5);
        assert_eq!(t.get::<mlua::String>(3).unwrap().as_bytes().as_ref(), b"a\0b");
        assert_eq!(t.get::<Table>(5).unwrap().get::<Table>("x").unwrap().get::<i64>("y").unwrap(), -7);
        assert_eq!(t.get::<mlua::String>(6).unwrap().as_bytes().len(), 70000);
    }

    #[test]
    fn unencodable_values_are_named() {
        let lua = Lua::new();
        let f: Value = lua.load("return {f = print}").eval().unwrap();
        assert!(encode(&f, &mut Vec::new()).unwrap_err().contains("function"));
        let cyclic: Value = lua.load("local t = {}; t.me = t; return t").eval().unwrap();
        assert!(encode(&cyclic, &mut Vec::new()).unwrap_err().contains("cyclic"));
    }

    #[test]
    fn hostile_bytes_never_panic_or_allocate_by_claimed_length() {
        let lua = Lua::new();
        // Claimed lengths far beyond the data.
        for bytes in [
            &[0xdd, 0xff, 0xff, 0xff, 0xff][..],
            &[0xdf, 0xff, 0xff, 0xff, 0xff],
            &[0xdb, 0xff, 0xff, 0xff, 0xff, 1],
        ] {
            assert!(decode(&lua, bytes).is_err());
        }
        // Deep nesting and a NaN key.
        assert!(decode(&lua, &[0x91; 200]).is_err());
        assert!(decode(&lua, &[0x81, 0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0, 0x01]).is_err());
        // Every prefix and random mutations of a valid message.
        let value: Value = lua.load(r#"return {1, "two", {3, {four = 4.5}}, true}"#).eval().unwrap();
        let mut good = Vec::new();
        encode(&value, &mut good).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for cut in 0..good.len() {
            let _ = decode(&lua, &good[..cut]);
        }
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % bytes.len();
                bytes[i] = (seed >> 32) as u8;
            }
            let _ = decode(&lua, &bytes);
        }
    }
}
