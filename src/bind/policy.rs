//! An app's error policy: `no_errors` and `error_handler`, as the original Luna defines them.

use mlua::{Function, Lua, RegistryKey, Result, Value};

pub(crate) struct Policy {
    /// `app 'name'` / `web-app 'name'`: used in messages.
    pub label: String,
    pub no_errors: bool,
    pub handler: Option<RegistryKey>,
    pub debug: bool,
}

impl Policy {
    /// The policy an app's config asks for: `no_errors`, `error_handler`, `debug` (on unless
    /// set to false).
    pub fn from_options(lua: &Lua, o: &super::options::Options, label: String) -> Result<Policy> {
        Ok(Policy {
            label,
            no_errors: o.boolean("no_errors")?.unwrap_or(false),
            handler: o.function("error_handler")?.map(|f| lua.create_registry_value(f)).transpose()?,
            debug: o.boolean("debug")?.unwrap_or(true),
        })
    }

    /// An error in user code: raises (out of `update`) unless `no_errors`, in which case it goes to
    /// `error_handler` (default: printed).
    pub fn report(&self, lua: &Lua, msg: &str) -> Result<()> {
        if let Ok(rt) = super::runtime(lua) {
            rt.counters.borrow_mut().handler_errors += 1;
        }
        if !self.no_errors {
            return Err(mlua::Error::external(format!("Error in {}: {msg}", self.label)));
        }
        self.deliver(lua, msg)
    }

    /// Something a remote peer caused: never raises; goes to `error_handler` when set, else to
    /// the debug log.
    pub fn network(&self, lua: &Lua, msg: &str) -> Result<()> {
        if self.handler.is_some() {
            return self.deliver(lua, msg);
        }
        self.log(lua, msg)
    }

    /// Prints `[luna] <label>: msg` when the app has `debug` on.
    pub fn log(&self, lua: &Lua, msg: &str) -> Result<()> {
        if self.debug {
            print(lua, &format!("[luna] {}: {msg}", self.label))?;
        }
        Ok(())
    }

    fn deliver(&self, lua: &Lua, msg: &str) -> Result<()> {
        match &self.handler {
            Some(key) => lua.registry_value::<Function>(key)?.call::<()>(msg),
            None => print(lua, &format!("Error in {}: {msg}", self.label)),
        }
    }
}

/// Lua's `print` (LÖVE and tests may redirect it).
pub(crate) fn print(lua: &Lua, text: &str) -> Result<()> {
    match lua.globals().get::<Value>("print")? {
        Value::Function(print) => print.call::<()>(text),
        _ => Ok(()),
    }
}
