//! The one conversion from our errors into `mlua::Error`, and API-misuse messages.

use mlua::{Error, Value};

use crate::driver;

impl From<driver::Error> for Error {
    fn from(e: driver::Error) -> Self {
        Error::external(e.to_string())
    }
}

/// A misuse error naming the call and what was expected, e.g.
/// `luna.spawn(fn, ...): 'fn' must be a function, got nil`.
pub(crate) fn misuse(call: &str, what: impl std::fmt::Display) -> Error {
    Error::external(format!("{call}: {what}"))
}

/// `'name' must be <expected>, got <type>`.
pub(crate) fn bad_arg(call: &str, name: &str, expected: &str, got: &Value) -> Error {
    misuse(call, format!("'{name}' must be {expected}, got {}", lua_type(got)))
}

/// The name Lua's `type()` gives a value (mlua says "integer" for integers).
pub(crate) fn lua_type(value: &Value) -> &'static str {
    match value {
        Value::Integer(_) | Value::Number(_) => "number",
        other => other.type_name(),
    }
}

/// The text of a Lua error without mlua's "runtime error: " framing (tracebacks kept).
pub fn message(e: &Error) -> String {
    match e {
        Error::RuntimeError(msg) => msg.clone(),
        Error::CallbackError { traceback, cause } => format!("{}\n{traceback}", message(cause)),
        Error::WithContext { context, cause } => format!("{context}: {}", message(cause)),
        other => other.to_string(),
    }
}
