//! Lua values as MessagePack and back: RPC arguments, results and pushes.
//!
//! Both directions work on the Lua stack with the C API, inside one protected call each (an
//! allocation failure raises into mlua's pcall, and the code holds nothing with a destructor
//! while it calls the API): building a table through mlua handles cost more than the rest of an
//! RPC round trip. Decoding checks every claimed length against the bytes left (hostile input
//! cannot make us allocate) and bounds nesting; encoding names what it cannot encode.

use std::ffi::{c_int, c_void, CStr};

use mlua::{ffi, Lua, Result, Value};

use super::error::misuse;

/// Deepest nesting of tables accepted by the encoder and the decoder.
const MAX_DEPTH: usize = 64;

/// Why a value cannot be encoded (turned into text after the protected call).
#[derive(Debug, Clone, Copy)]
pub(crate) enum EncodeError {
    Cyclic,
    TooDeep,
    /// The Lua stack could not grow (nesting too deep for this state).
    NoStack,
    /// The Lua type name of the value.
    Type(&'static CStr),
}

impl EncodeError {
    pub(crate) fn text(self) -> String {
        match self {
            EncodeError::Cyclic => "a cyclic table".into(),
            EncodeError::NoStack => "tables nested too deep for the Lua stack".into(),
            EncodeError::TooDeep => format!("a table nested deeper than {MAX_DEPTH} levels"),
            EncodeError::Type(name) => format!("a {} value", name.to_string_lossy()),
        }
    }
}

/// Encodes a Lua value; `Err` names what could not be encoded.
pub(crate) fn encode(lua: &Lua, value: &Value, out: &mut Vec<u8>) -> std::result::Result<(), String> {
    let mut failed = None;
    // SAFETY: protected (exec_raw); the closure holds references only. Iterating with lua_next
    // never converts a key in place (numbers are read with lua_tonumber).
    let done = unsafe {
        lua.exec_raw::<()>(value, |state| {
            if let Err(e) = encode_stack(state, ffi::lua_gettop(state), out) {
                failed = Some(e);
            }
            ffi::lua_pop(state, 1);
        })
    };
    done.map_err(|e| super::error::message(&e))?;
    failed.map_or(Ok(()), |e| Err(e.text()))
}

/// Encodes a call's `what` argument, or raises naming the call.
pub(crate) fn encode_for(lua: &Lua, call: &str, what: &str, value: &Value) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode(lua, value, &mut out)
        .map_err(|e| misuse(call, format!("cannot encode '{what}': it contains {e}")))?;
    Ok(out)
}

/// Stack slots [`encode_stack`] may use: three per level of nesting. A raw function that encodes
/// reserves them first (`RawFn::STACK`), so the encoder's `lua_checkstack`s never grow the
/// stack, which could raise (out of memory) inside the body.
pub(crate) const ENCODE_STACK: c_int = 3 * MAX_DEPTH as c_int + 8;

/// Encodes the value at stack index `idx` (absolute) of `state` into `out`. Raises no Lua error
/// when [`ENCODE_STACK`] slots are free (it only reads the stack), so raw C functions may call it.
pub(crate) unsafe fn encode_stack(
    state: *mut ffi::lua_State,
    idx: c_int,
    out: &mut Vec<u8>,
) -> std::result::Result<(), EncodeError> {
    let mut path = [std::ptr::null(); MAX_DEPTH];
    encode_at(state, idx, out, &mut path, 0)
}

unsafe fn encode_at(
    state: *mut ffi::lua_State,
    idx: c_int,
    out: &mut Vec<u8>,
    path: &mut [*const c_void; MAX_DEPTH],
    depth: usize,
) -> std::result::Result<(), EncodeError> {
    use rmp::encode as e;
    // Writing into a Vec cannot fail.
    match ffi::lua_type(state, idx) {
        ffi::LUA_TNIL => e::write_nil(out).unwrap_or(()),
        ffi::LUA_TBOOLEAN => e::write_bool(out, ffi::lua_toboolean(state, idx) != 0).unwrap_or(()),
        ffi::LUA_TNUMBER => {
            #[cfg(feature = "lua54")]
            if ffi::lua_isinteger(state, idx) != 0 {
                let _ = e::write_sint(out, ffi::lua_tointeger(state, idx));
                return Ok(());
            }
            let n = ffi::lua_tonumber(state, idx);
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                let _ = e::write_sint(out, n as i64);
            } else {
                let _ = e::write_f64(out, n);
            }
        }
        ffi::LUA_TSTRING => {
            let mut len = 0;
            let ptr = ffi::lua_tolstring(state, idx, &mut len);
            let bytes = std::slice::from_raw_parts(ptr as *const u8, len);
            let _ = match std::str::from_utf8(bytes) {
                Ok(text) => e::write_str(out, text),
                Err(_) => e::write_bin(out, bytes),
            };
        }
        ffi::LUA_TTABLE => {
            let ptr = ffi::lua_topointer(state, idx);
            if path[..depth].contains(&ptr) {
                return Err(EncodeError::Cyclic);
            }
            if depth >= MAX_DEPTH {
                return Err(EncodeError::TooDeep);
            }
            path[depth] = ptr;
            if ffi::lua_checkstack(state, 3) == 0 {
                return Err(EncodeError::NoStack);
            }
            let len = ffi::lua_rawlen(state, idx);
            let mut count = 0usize;
            ffi::lua_pushnil(state);
            while ffi::lua_next(state, idx) != 0 {
                count += 1;
                ffi::lua_pop(state, 1);
            }
            if len > 0 && count == len {
                let _ = e::write_array_len(out, len as u32);
                for i in 1..=len {
                    ffi::lua_rawgeti(state, idx, i as _);
                    let r = encode_at(state, ffi::lua_gettop(state), out, path, depth + 1);
                    ffi::lua_pop(state, 1);
                    r?;
                }
            } else {
                let _ = e::write_map_len(out, count as u32);
                ffi::lua_pushnil(state);
                while ffi::lua_next(state, idx) != 0 {
                    let top = ffi::lua_gettop(state);
                    let r = encode_at(state, top - 1, out, path, depth + 1)
                        .and_then(|()| encode_at(state, top, out, path, depth + 1));
                    if r.is_err() {
                        ffi::lua_pop(state, 2);
                        return r;
                    }
                    ffi::lua_pop(state, 1);
                }
            }
        }
        t => return Err(EncodeError::Type(CStr::from_ptr(ffi::lua_typename(state, t)))),
    }
    Ok(())
}

/// Why bytes are not a MessagePack value we take.
#[derive(Debug, Clone, Copy)]
enum DecodeError {
    Truncated,
    TooDeep,
    LongArray,
    LongMap,
    NanKey,
    Unsupported(u8),
}

impl DecodeError {
    fn error(self) -> mlua::Error {
        let what = match self {
            DecodeError::Truncated => "truncated data".to_string(),
            DecodeError::TooDeep => format!("nested deeper than {MAX_DEPTH} levels"),
            DecodeError::LongArray => "array longer than the data".into(),
            DecodeError::LongMap => "map longer than the data".into(),
            DecodeError::NanKey => "a NaN table key".into(),
            DecodeError::Unsupported(marker) => format!("unsupported MessagePack type 0x{marker:02x}"),
        };
        mlua::Error::external(format!("cannot decode a message: {what}"))
    }
}

/// Checks that `data` is one value [`push_valid`] can push: every length within the data, nesting
/// bounded, no NaN key, only supported types. (Decoding into Lua needs no other checks then.)
pub(crate) fn validate(data: &[u8]) -> Result<()> {
    let mut rd = data;
    check(&mut rd, 0).map_err(DecodeError::error)
}

fn check(rd: &mut &[u8], depth: usize) -> std::result::Result<(), DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    let marker = be::<1>(rd)?[0];
    let skip = |rd: &mut &[u8], n: usize| take(rd, n).map(|_| ());
    match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => Ok(()),
        0xcc | 0xd0 => skip(rd, 1),
        0xcd | 0xd1 => skip(rd, 2),
        0xce | 0xd2 | 0xca => skip(rd, 4),
        0xcf | 0xd3 | 0xcb => skip(rd, 8),
        0xa0..=0xbf => skip(rd, (marker & 0x1f) as usize),
        0xd9 | 0xc4 => {
            let n = length(rd, 1)?;
            skip(rd, n)
        }
        0xda | 0xc5 => {
            let n = length(rd, 2)?;
            skip(rd, n)
        }
        0xdb | 0xc6 => {
            let n = length(rd, 4)?;
            skip(rd, n)
        }
        0x90..=0x9f | 0xdc | 0xdd => {
            let n = array_len(marker, rd)?;
            (0..n).try_for_each(|_| check(rd, depth + 1))
        }
        0x80..=0x8f | 0xde | 0xdf => {
            let n = map_len(marker, rd)?;
            for _ in 0..n {
                let nan = match rd.first() {
                    Some(0xca) => {
                        rd.get(1..5).is_some_and(|b| f32::from_be_bytes([b[0], b[1], b[2], b[3]]).is_nan())
                    }
                    Some(0xcb) => rd
                        .get(1..9)
                        .is_some_and(|b| f64::from_be_bytes(b.try_into().unwrap_or([0; 8])).is_nan()),
                    _ => false,
                };
                if nan {
                    return Err(DecodeError::NanKey);
                }
                check(rd, depth + 1)?;
                check(rd, depth + 1)?;
            }
            Ok(())
        }
        other => Err(DecodeError::Unsupported(other)),
    }
}

/// Pushes the value in `data`, which [`validate`] accepted. Raises only if Lua runs out of
/// memory or stack, so raw C functions push results with it (see `bind/raw.rs`).
pub(crate) unsafe fn push_valid(state: *mut ffi::lua_State, data: &[u8]) {
    let top = ffi::lua_gettop(state);
    let mut rd = data;
    if data.is_empty() || push_decoded(state, &mut rd, 0).is_err() {
        ffi::lua_settop(state, top);
        ffi::lua_pushnil(state);
    }
}

/// Decodes one MessagePack value into Lua (strings and binaries both become Lua strings).
pub(crate) fn decode(lua: &Lua, data: &[u8]) -> Result<Value> {
    if data.is_empty() {
        return Ok(Value::Nil);
    }
    let mut failed = None;
    // SAFETY: protected; the closure holds references and integers only, and leaves exactly one
    // value (the result, or nil after a failure) on the stack.
    let ((), value) = unsafe {
        super::raw::protected(lua, |state| {
            let top = ffi::lua_gettop(state);
            let mut rd = data;
            if let Err(e) = push_decoded(state, &mut rd, 0) {
                ffi::lua_settop(state, top);
                ffi::lua_pushnil(state);
                failed = Some(e);
            }
        })?
    };
    failed.map_or(Ok(value.unwrap_or(Value::Nil)), |e| Err(e.error()))
}

fn take<'a>(rd: &mut &'a [u8], n: usize) -> std::result::Result<&'a [u8], DecodeError> {
    if rd.len() < n {
        return Err(DecodeError::Truncated);
    }
    let (head, rest) = rd.split_at(n);
    *rd = rest;
    Ok(head)
}

fn be<const N: usize>(rd: &mut &[u8]) -> std::result::Result<[u8; N], DecodeError> {
    let mut b = [0u8; N];
    b.copy_from_slice(take(rd, N)?);
    Ok(b)
}

/// The element count of an array header, checked against the bytes left (each element takes one).
fn array_len(marker: u8, rd: &mut &[u8]) -> std::result::Result<usize, DecodeError> {
    count(marker, rd, 1, DecodeError::LongArray)
}

/// The pair count of a map header, checked against the bytes left (each pair takes two).
fn map_len(marker: u8, rd: &mut &[u8]) -> std::result::Result<usize, DecodeError> {
    count(marker, rd, 2, DecodeError::LongMap)
}

/// The count of an array or map header (fix: low nibble; 16 or 32 bits after 0xdc/0xde or
/// 0xdd/0xdf), at most the bytes left over `per_item`.
fn count(
    marker: u8,
    rd: &mut &[u8],
    per_item: usize,
    too_long: DecodeError,
) -> std::result::Result<usize, DecodeError> {
    let n = match marker {
        0x80..=0x9f => (marker & 0x0f) as usize,
        0xdc | 0xde => length(rd, 2)?,
        _ => length(rd, 4)?,
    };
    if n > rd.len() / per_item {
        return Err(too_long);
    }
    Ok(n)
}

/// A length of 1, 2 or 4 big-endian bytes.
fn length(rd: &mut &[u8], bytes: usize) -> std::result::Result<usize, DecodeError> {
    Ok(match bytes {
        1 => be::<1>(rd)?[0] as usize,
        2 => u16::from_be_bytes(be(rd)?) as usize,
        _ => u32::from_be_bytes(be(rd)?) as usize,
    })
}

unsafe fn push_int(state: *mut ffi::lua_State, i: i64) {
    ffi::lua_pushinteger(state, i as ffi::lua_Integer);
}

/// Decodes one value from `rd` and pushes it.
unsafe fn push_decoded(
    state: *mut ffi::lua_State,
    rd: &mut &[u8],
    depth: usize,
) -> std::result::Result<(), DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    ffi::luaL_checkstack(state, 3, std::ptr::null());
    let marker = be::<1>(rd)?[0];
    match marker {
        0x00..=0x7f => push_int(state, marker as i64),
        0xe0..=0xff => push_int(state, marker as i8 as i64),
        0xc0 => ffi::lua_pushnil(state),
        0xc2 => ffi::lua_pushboolean(state, 0),
        0xc3 => ffi::lua_pushboolean(state, 1),
        0xcc => push_int(state, be::<1>(rd)?[0] as i64),
        0xcd => push_int(state, u16::from_be_bytes(be(rd)?) as i64),
        0xce => push_int(state, u32::from_be_bytes(be(rd)?) as i64),
        0xcf => match u64::from_be_bytes(be(rd)?) {
            v if v > i64::MAX as u64 => ffi::lua_pushnumber(state, v as f64),
            v => push_int(state, v as i64),
        },
        0xd0 => push_int(state, be::<1>(rd)?[0] as i8 as i64),
        0xd1 => push_int(state, i16::from_be_bytes(be(rd)?) as i64),
        0xd2 => push_int(state, i32::from_be_bytes(be(rd)?) as i64),
        0xd3 => push_int(state, i64::from_be_bytes(be(rd)?)),
        0xca => ffi::lua_pushnumber(state, f32::from_be_bytes(be(rd)?) as f64),
        0xcb => ffi::lua_pushnumber(state, f64::from_be_bytes(be(rd)?)),
        0xa0..=0xbf | 0xd9 | 0xda | 0xdb | 0xc4 | 0xc5 | 0xc6 => {
            let n = match marker {
                0xa0..=0xbf => (marker & 0x1f) as usize,
                0xd9 | 0xc4 => length(rd, 1)?,
                0xda | 0xc5 => length(rd, 2)?,
                _ => length(rd, 4)?,
            };
            let bytes = take(rd, n)?;
            ffi::lua_pushlstring(state, bytes.as_ptr() as *const _, bytes.len());
        }
        0x90..=0x9f | 0xdc | 0xdd => {
            let n = array_len(marker, rd)?;
            ffi::lua_createtable(state, n as c_int, 0);
            for i in 1..=n {
                push_decoded(state, rd, depth + 1)?;
                ffi::lua_rawseti(state, -2, i as _);
            }
        }
        0x80..=0x8f | 0xde | 0xdf => {
            let n = map_len(marker, rd)?;
            ffi::lua_createtable(state, 0, n as c_int);
            for _ in 0..n {
                push_decoded(state, rd, depth + 1)?;
                push_decoded(state, rd, depth + 1)?;
                match ffi::lua_type(state, -2) {
                    // A nil key cannot be stored: the pair is skipped.
                    ffi::LUA_TNIL => ffi::lua_pop(state, 2),
                    ffi::LUA_TNUMBER if ffi::lua_tonumber(state, -2).is_nan() => {
                        return Err(DecodeError::NanKey)
                    }
                    _ => ffi::lua_rawset(state, -3),
                }
            }
        }
        other => return Err(DecodeError::Unsupported(other)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlua::Table;

    fn round_trip(lua: &Lua, src: &str) -> Value {
        let value: Value = lua.load(src).eval().unwrap();
        let mut bytes = Vec::new();
        encode(lua, &value, &mut bytes).unwrap();
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
        let v = round_trip(&lua, "return {[1] = 'a', [3] = 'c', k = false, [-2.5] = 1e300}");
        let t = v.as_table().unwrap();
        assert_eq!(t.get::<String>(3).unwrap(), "c");
        assert!(!t.get::<bool>("k").unwrap());
        assert_eq!(t.get::<f64>(-2.5).unwrap(), 1e300);
        assert!(round_trip(&lua, "return nil").is_nil());
        assert_eq!(round_trip(&lua, "return -0x7fffffff - 1").as_i64(), Some(-2147483648));
    }

    #[test]
    fn unencodable_values_are_named() {
        let lua = Lua::new();
        let f: Value = lua.load("return {f = print}").eval().unwrap();
        assert!(encode(&lua, &f, &mut Vec::new()).unwrap_err().contains("function"));
        let cyclic: Value = lua.load("local t = {}; t.me = t; return t").eval().unwrap();
        assert!(encode(&lua, &cyclic, &mut Vec::new()).unwrap_err().contains("cyclic"));
        let deep: Value = lua.load("local t = {} for i = 1, 100 do t = {t} end return t").eval().unwrap();
        assert!(encode(&lua, &deep, &mut Vec::new()).unwrap_err().contains("deeper"));
        // A failed encode leaves the stack and the table usable.
        let t: Table = lua.load("return {a = 1, b = coroutine.create(print)}").eval().unwrap();
        assert!(encode(&lua, &Value::Table(t.clone()), &mut Vec::new()).unwrap_err().contains("thread"));
        assert_eq!(t.get::<i64>("a").unwrap(), 1);
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
        assert!(decode(&lua, &[0xc1]).unwrap_err().to_string().contains("0xc1"));
        // Every prefix and random mutations of a valid message.
        let value: Value = lua.load(r#"return {1, "two", {3, {four = 4.5}}, true}"#).eval().unwrap();
        let mut good = Vec::new();
        encode(&lua, &value, &mut good).unwrap();
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
        // The state is still consistent after all of that.
        assert_eq!(lua.load("return 1 + 1").eval::<i64>().unwrap(), 2);
    }
}
