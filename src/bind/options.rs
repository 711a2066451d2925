//! Config tables: unknown keys and wrong types raise errors naming the call and the key.

use mlua::{Function, Table, Value};

use super::error::{bad_arg, lua_type, misuse};
use super::time::MAX_SECONDS;

/// The largest size option (1 GiB): limits this large are reserved as address space when a
/// peer declares that much, and more could fail the allocation outright.
pub(crate) const MAX_SIZE: usize = 1 << 30;

/// A duration in seconds (> 0, at most 1e9) given for option `key` of `call`.
pub(crate) fn seconds_value(
    call: &str,
    key: &str,
    n: Option<f64>,
) -> mlua::Result<Option<std::time::Duration>> {
    match n {
        None => Ok(None),
        Some(s) if s > 0.0 && s <= MAX_SECONDS => Ok(Some(std::time::Duration::from_secs_f64(s))),
        Some(s) => {
            Err(misuse(call, format!("'{key}' must be a number of seconds > 0 and <= 1e9, got {s:?}")))
        }
    }
}

pub(crate) struct Options {
    call: &'static str,
    table: Table,
}

impl Options {
    /// Checks that `value` is a table whose keys are all in `known`. With several unknown keys
    /// the error names the first in sorted order, so the same config always gets the same
    /// message (`pairs` order varies from run to run).
    pub fn new(call: &'static str, value: Value, known: &[&str]) -> mlua::Result<Options> {
        let Value::Table(table) = value else { return Err(bad_arg(call, "config", "a table", &value)) };
        let mut unknown = None::<String>;
        for pair in table.pairs::<Value, Value>() {
            let (key, _) = pair?;
            let name = match &key {
                Value::String(s) => s.to_string_lossy(),
                other => {
                    return Err(misuse(call, format!("config keys must be strings, got {}", lua_type(other))))
                }
            };
            if !known.contains(&name.as_str()) && unknown.as_ref().is_none_or(|first| name < *first) {
                unknown = Some(name);
            }
        }
        if let Some(name) = unknown {
            return Err(misuse(call, format!("unknown option '{name}' (known: {})", known.join(", "))));
        }
        Ok(Options { call, table })
    }

    /// As [`new`](Self::new), with `nil` taken as an empty table (options that may be left out).
    pub fn optional(
        lua: &mlua::Lua,
        call: &'static str,
        value: Value,
        known: &[&str],
    ) -> mlua::Result<Options> {
        match value {
            Value::Nil => Options::new(call, Value::Table(lua.create_table()?), known),
            other => Options::new(call, other, known),
        }
    }

    fn get(&self, key: &str) -> mlua::Result<Value> {
        self.table.raw_get(key)
    }

    fn wrong(&self, key: &str, expected: &str, got: &Value) -> mlua::Error {
        misuse(self.call, format!("'{key}' must be {expected}, got {}", lua_type(got)))
    }

    pub fn string(&self, key: &str) -> mlua::Result<Option<String>> {
        match self.get(key)? {
            Value::Nil => Ok(None),
            Value::String(s) => Ok(Some(s.to_str()?.to_owned())),
            other => Err(self.wrong(key, "a string", &other)),
        }
    }

    pub fn number(&self, key: &str) -> mlua::Result<Option<f64>> {
        match self.get(key)? {
            Value::Nil => Ok(None),
            Value::Integer(i) => Ok(Some(i as f64)),
            Value::Number(n) => Ok(Some(n)),
            other => Err(self.wrong(key, "a number", &other)),
        }
    }

    pub fn boolean(&self, key: &str) -> mlua::Result<Option<bool>> {
        match self.get(key)? {
            Value::Nil => Ok(None),
            Value::Boolean(b) => Ok(Some(b)),
            other => Err(self.wrong(key, "a boolean", &other)),
        }
    }

    pub fn function(&self, key: &str) -> mlua::Result<Option<Function>> {
        match self.get(key)? {
            Value::Nil => Ok(None),
            Value::Function(f) => Ok(Some(f)),
            other => Err(self.wrong(key, "a function", &other)),
        }
    }

    pub fn table(&self, key: &str) -> mlua::Result<Option<Table>> {
        match self.get(key)? {
            Value::Nil => Ok(None),
            Value::Table(t) => Ok(Some(t)),
            other => Err(self.wrong(key, "a table", &other)),
        }
    }

    /// A feature switched on with `true` or configured with a table of `known` keys: `None`
    /// when absent or `false`, `Some(None)` for `true`, `Some(Some(options))` for a table.
    pub fn switch(&self, key: &str, known: &[&str]) -> mlua::Result<Option<Option<Options>>> {
        match self.get(key)? {
            Value::Nil | Value::Boolean(false) => Ok(None),
            Value::Boolean(true) => Ok(Some(None)),
            table @ Value::Table(_) => Ok(Some(Some(Options::new(self.call, table, known)?))),
            other => Err(self.wrong(key, "true, false or a table", &other)),
        }
    }

    /// A whole number from `min` to `max`.
    pub fn whole(&self, key: &str, min: u32, max: u32) -> mlua::Result<Option<u32>> {
        match self.number(key)? {
            None => Ok(None),
            Some(n) if n.fract() == 0.0 && (f64::from(min)..=f64::from(max)).contains(&n) => {
                Ok(Some(n as u32))
            }
            Some(n) => Err(misuse(self.call, format!("'{key}' must be a whole number {min}-{max}, got {n}"))),
        }
    }

    /// A TCP/UDP port number (0 = any free port).
    pub fn port(&self, key: &str) -> mlua::Result<Option<u16>> {
        match self.number(key)? {
            None => Ok(None),
            Some(n) if n.fract() == 0.0 && (0.0..=65535.0).contains(&n) => Ok(Some(n as u16)),
            Some(n) => Err(misuse(self.call, format!("'{key}' must be a port number 0-65535, got {n}"))),
        }
    }

    /// A duration in seconds (> 0).
    pub fn seconds(&self, key: &str) -> mlua::Result<Option<std::time::Duration>> {
        seconds_value(self.call, key, self.number(key)?)
    }

    /// A size in bytes, from 1 to [`MAX_SIZE`].
    pub fn size(&self, key: &str) -> mlua::Result<Option<usize>> {
        match self.number(key)? {
            None => Ok(None),
            Some(n) if n.fract() == 0.0 && (1.0..=MAX_SIZE as f64).contains(&n) => Ok(Some(n as usize)),
            Some(n) => Err(misuse(
                self.call,
                format!("'{key}' must be a whole number of bytes from 1 to 1 GiB (1073741824), got {n:?}"),
            )),
        }
    }
}
