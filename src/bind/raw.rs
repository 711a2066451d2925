//! Hot-path functions as plain `lua_CFunction`s. A WebSocket echo makes two calls into Rust per
//! message (`send`, `receive`); through mlua's safe callbacks each one costs more than the work it
//! wraps (argument conversion, a protected wrapper, the runtime lookup in app data). These read
//! their arguments straight off the Lua stack and reach the runtime through an upvalue.
//!
//! Rules that keep them sound: a body never calls into Lua while it holds a borrow of the
//! runtime, pushes at most a handful of values (a C function has `LUA_MINSTACK` slots), and
//! reports misuse by returning `Err`: the trampoline raises the Lua error only after every Rust
//! value of the call has been dropped. A panic becomes a Lua error instead of unwinding into C.

use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;

use mlua::{ffi, AnyUserData, Function, Lua, Result};

use super::Runtime;

/// The Lua stack of the thread that called a raw function.
pub(crate) struct Stack(*mut ffi::lua_State);

/// A raw function: `NAME` prefixes its internal errors.
pub(crate) trait RawFn {
    const NAME: &'static str;
    fn call(rt: &Runtime, stack: &mut Stack) -> std::result::Result<c_int, String>;
}

impl Stack {
    /// The calling coroutine (its `lua_State`), as mlua's `Thread::to_pointer` gives it.
    pub fn thread(&self) -> usize {
        self.0 as usize
    }

    /// The name `type()` gives argument `idx`.
    pub fn type_name(&self, idx: c_int) -> String {
        // SAFETY: lua_typename returns a static C string for every type tag.
        unsafe {
            let name = ffi::lua_typename(self.0, ffi::lua_type(self.0, idx));
            std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    }

    pub fn is_nil(&self, idx: c_int) -> bool {
        unsafe { ffi::lua_type(self.0, idx) <= ffi::LUA_TNIL }
    }

    /// Argument `idx` if it is a number with an integral value.
    pub fn integer(&self, idx: c_int) -> Option<i64> {
        unsafe {
            if ffi::lua_type(self.0, idx) != ffi::LUA_TNUMBER {
                return None;
            }
            let n = ffi::lua_tonumber(self.0, idx);
            (n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15).then_some(n as i64)
        }
    }

    /// The bytes of a string argument, or of a number as Lua prints it (`lua_tolstring` turns the
    /// stack slot into that string). `None` for other types.
    pub fn bytes(&self, idx: c_int) -> Option<&[u8]> {
        unsafe {
            let t = ffi::lua_type(self.0, idx);
            if t != ffi::LUA_TSTRING && t != ffi::LUA_TNUMBER {
                return None;
            }
            let mut len = 0usize;
            let ptr = ffi::lua_tolstring(self.0, idx, &mut len);
            // The string lives in the stack slot for the rest of the call.
            Some(std::slice::from_raw_parts(ptr as *const u8, len))
        }
    }

    pub fn push_bytes(&mut self, data: &[u8]) {
        unsafe {
            ffi::lua_pushlstring(self.0, data.as_ptr() as *const c_char, data.len());
        }
    }

    pub fn push_int(&mut self, n: i64) {
        unsafe { ffi::lua_pushinteger(self.0, n as ffi::lua_Integer) }
    }

    pub fn push_bool(&mut self, b: bool) {
        unsafe { ffi::lua_pushboolean(self.0, b as c_int) }
    }

    pub fn push_nil(&mut self) {
        unsafe { ffi::lua_pushnil(self.0) }
    }

    pub fn push_light(&mut self, p: *mut c_void) {
        unsafe { ffi::lua_pushlightuserdata(self.0, p) }
    }
}

unsafe extern "C-unwind" fn trampoline<F: RawFn>(state: *mut ffi::lua_State) -> c_int {
    let outcome = {
        let slot = ffi::lua_touserdata(state, ffi::lua_upvalueindex(1)) as *const *const Runtime;
        let rt = *slot;
        if rt.is_null() {
            Err(format!("{}: the luna runtime is closed", F::NAME))
        } else {
            let mut stack = Stack(state);
            match catch_unwind(AssertUnwindSafe(|| F::call(&*rt, &mut stack))) {
                Ok(result) => result,
                Err(_) => Err(format!("{}: internal error (a bug in luna)", F::NAME)),
            }
        }
    };
    match outcome {
        Ok(n) => n,
        Err(message) => {
            ffi::lua_pushlstring(state, message.as_ptr() as *const c_char, message.len());
            drop(message);
            ffi::lua_error(state)
        }
    }
}

/// `__gc` of the box that holds the raw functions' reference to the runtime.
unsafe extern "C-unwind" fn release_runtime(state: *mut ffi::lua_State) -> c_int {
    let slot = ffi::lua_touserdata(state, 1) as *mut *const Runtime;
    if !slot.is_null() && !(*slot).is_null() {
        drop(Rc::from_raw(*slot));
        *slot = std::ptr::null();
    }
    0
}

/// The upvalue every raw function shares: a userdata owning one `Rc` of the runtime, so the
/// runtime outlives every call (the state's finalizers included).
pub(crate) fn runtime_box(lua: &Lua, rt: &Rc<Runtime>) -> Result<AnyUserData> {
    let rt = rt.clone();
    // SAFETY: the closure only pushes values; the userdata is written before anything can fail.
    unsafe {
        lua.exec_raw((), move |state| {
            let slot =
                ffi::lua_newuserdata(state, std::mem::size_of::<*const Runtime>()) as *mut *const Runtime;
            slot.write(Rc::into_raw(rt));
            ffi::lua_createtable(state, 0, 1);
            ffi::lua_pushcfunction(state, release_runtime);
            ffi::lua_setfield(state, -2, c"__gc".as_ptr());
            ffi::lua_setmetatable(state, -2);
        })
    }
}

/// A Lua function running `F` with the runtime in `boxed`.
pub(crate) fn function<F: RawFn>(lua: &Lua, boxed: &AnyUserData) -> Result<Function> {
    // SAFETY: pops the box pushed as the argument and pushes the closure over it.
    unsafe { lua.exec_raw(boxed, |state| ffi::lua_pushcclosure(state, trampoline::<F>, 1)) }
}
