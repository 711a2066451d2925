//! Hot-path functions as plain `lua_CFunction`s. A WebSocket echo makes two calls into Rust per
//! message (`send`, `receive`), a stream echo two (`write`, `read`); through mlua's safe
//! callbacks each one costs more than the work it wraps (argument conversion, a protected
//! wrapper, the runtime lookup in app data). These read their arguments straight off the Lua
//! stack and reach the runtime through an upvalue.
//!
//! Soundness: a Lua error is a `longjmp` (PUC Lua) or a foreign unwind (LuaJIT), and it may come
//! from any API call that allocates (`lua_pushlstring`, `lua_tolstring` on a number). Skipping
//! Rust frames that own values is undefined behaviour, so:
//! - arguments that may need converting (numbers passed as strings) are converted by the
//!   trampoline before the body runs, when no Rust value is alive;
//! - the body only reads the stack and returns what to push ([`Out`]); every borrow of the
//!   runtime is released when it returns;
//! - the trampoline pushes the results (or raises the error) from `ManuallyDrop` storage, so an
//!   allocation failure while pushing leaks that storage instead of skipping a destructor;
//! - a panic becomes a Lua error instead of unwinding into C.
//!
//! [`resume`] is the other half: it hands values to a parked coroutine (a connection's handler
//! waiting in `receive` or `read`) with `lua_resume` directly, in protected mode, instead of
//! through mlua's handles (a registry lookup, an argument list, a result list per message).
//!
//! [`protected`] is how Rust calls into Lua on the hot paths: mlua's `exec_raw` pushes two fresh
//! C closures per call (its runner and its message handler) under LuaJIT and 5.1, where C
//! functions are collectable objects; ours are made once per state and kept in the registry.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void};
use std::mem::{ManuallyDrop, MaybeUninit};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;

use mlua::{ffi, AnyUserData, Error, Function, Lua, Result};

use super::sched::park_value;
use super::Runtime;

/// The Lua stack of the thread that called a raw function (read-only for the body), with the
/// registry slots the trampoline made for its [`RawFn::REFS`] arguments.
pub(crate) struct Stack {
    state: *mut ffi::lua_State,
    /// `(argument, slot)`; a slot the body takes becomes `LUA_NOREF`, the rest are freed after it.
    refs: [(c_int, Cell<c_int>); MAX_REFS],
}

const MAX_REFS: usize = 2;

/// A value for the trampoline (or [`call`], [`resume`]) to push; `'a` is what a borrowed one
/// lives for.
pub(crate) enum Value<'a> {
    Nil,
    Bool(bool),
    Int(i64),
    Num(f64),
    Light(*mut c_void),
    Bytes(tungstenite::Bytes),
    Owned(Vec<u8>),
    Str(&'static str),
    Slice(&'a [u8]),
    /// MessagePack that `msgpack::validate` accepted, pushed as the Lua value it encodes.
    MsgPack(std::borrow::Cow<'a, [u8]>),
    /// The value in a registry slot (a `RegistryKey::id`).
    Ref(c_int),
    /// A table of numbers: argument `into`'s table if it is one, else a new one, given the
    /// fields (`(sub-table or "", name, value)`, each sub-table's fields together).
    Report {
        into: c_int,
        fields: Vec<Field>,
    },
}

/// A number field of a [`Value::Report`]: `(sub-table or "", name, value)`.
pub(crate) type Field = (&'static str, &'static str, f64);

/// What a raw function returns: at most [`Out::MAX`] values (a C function may push
/// `LUA_MINSTACK` without checking the stack).
pub(crate) struct Out {
    /// The first `len` are written (nothing is initialised or dropped for the rest: every call
    /// returns one of these).
    values: [MaybeUninit<Value<'static>>; Out::MAX],
    len: usize,
}

impl Out {
    pub const MAX: usize = 6;

    pub fn new() -> Out {
        Out { values: [const { MaybeUninit::uninit() }; Out::MAX], len: 0 }
    }

    pub fn one(value: Value<'static>) -> Out {
        let mut out = Out::new();
        out.push(value);
        out
    }

    pub fn push(&mut self, value: Value<'static>) {
        assert!(self.len < Out::MAX, "a raw function returns at most {} values", Out::MAX);
        self.values[self.len].write(value);
        self.len += 1;
    }

    fn values(&self) -> &[Value<'static>] {
        // SAFETY: the first `len` values were written by `push`.
        unsafe { std::slice::from_raw_parts(self.values.as_ptr().cast(), self.len) }
    }
}

impl Drop for Out {
    fn drop(&mut self) {
        for value in &mut self.values[..self.len] {
            // SAFETY: written by `push`, dropped once.
            unsafe { value.assume_init_drop() }
        }
    }
}

/// A raw function: `NAME` prefixes its internal errors; arguments listed in `STRINGS` are
/// turned into strings before `call` runs when they are numbers. Whatever may raise a Lua error
/// (allocating) happens in the trampoline, before or after `call`, never inside it: an error
/// unwinding through `call` would meet `catch_unwind` (LuaJIT's errors are foreign exceptions,
/// which abort there) and skip destructors.
pub(crate) trait RawFn {
    const NAME: &'static str;
    const STRINGS: &'static [c_int] = &[];
    /// Arguments kept in registry slots for the body when they are a function or a coroutine
    /// (at most [`MAX_REFS`]): it takes them with [`Stack::thread_ref`] / [`Stack::function_ref`].
    const REFS: &'static [c_int] = &[];
    /// Free stack slots the body may use without growing the stack (`msgpack::encode_stack`
    /// needs a few per level of nesting).
    const STACK: c_int = 0;
    fn call(rt: &Runtime, stack: &Stack) -> std::result::Result<Out, String>;
}

impl Stack {
    /// The calling coroutine (its `lua_State`), as mlua's `Thread::to_pointer` gives it.
    pub fn thread(&self) -> usize {
        self.state as usize
    }

    /// The name `type()` gives argument `idx`.
    pub fn type_name(&self, idx: c_int) -> String {
        // SAFETY: lua_typename returns a static C string for every type tag.
        unsafe {
            let name = ffi::lua_typename(self.state, ffi::lua_type(self.state, idx));
            std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    }

    /// The state itself, for readers that walk the stack (`msgpack::encode_stack`).
    pub fn state(&self) -> *mut ffi::lua_State {
        self.state
    }

    pub fn is_nil(&self, idx: c_int) -> bool {
        unsafe { ffi::lua_type(self.state, idx) <= ffi::LUA_TNIL }
    }

    /// Argument `idx` (one of [`RawFn::REFS`]) if it is a coroutine: a [`ThreadRef`] keeping it
    /// alive, now the body's to hand on or free.
    pub fn thread_ref(&self, idx: c_int) -> Option<ThreadRef> {
        let co = unsafe { ffi::lua_tothread(self.state, idx) };
        let id = self.take_ref(idx).filter(|_| !co.is_null())?;
        Some(ThreadRef { id, ptr: co as usize })
    }

    /// Argument `idx` (one of [`RawFn::REFS`]) if it is a function, as [`Stack::thread_ref`].
    pub fn function_ref(&self, idx: c_int) -> Option<FnRef> {
        if !self.is_function(idx) {
            return None;
        }
        self.take_ref(idx).map(FnRef)
    }

    fn take_ref(&self, idx: c_int) -> Option<c_int> {
        let (_, slot) = self.refs.iter().find(|(arg, _)| *arg == idx)?;
        Some(slot.replace(ffi::LUA_NOREF)).filter(|&id| id != ffi::LUA_NOREF)
    }

    /// Frees a registry slot made by [`Stack::thread_ref`] or [`Stack::function_ref`] (for a
    /// body that gives up before the slot was handed on).
    pub fn unref(&self, id: c_int) {
        // SAFETY: luaL_unref only writes existing registry slots (nothing raises).
        unsafe { ffi::luaL_unref(self.state, ffi::LUA_REGISTRYINDEX, id) }
    }

    /// Checks argument `idx`, the table a [`Value::Report`] fills (`t`), is a table or nil.
    pub fn report_table(&self, idx: c_int, call: &str) -> std::result::Result<(), String> {
        if self.is_nil(idx) || self.is_table(idx) {
            return Ok(());
        }
        Err(format!("{call}: 't' must be a table or nil, got {}", self.type_name(idx)))
    }

    /// Argument `idx` as a number (integers included).
    pub fn number(&self, idx: c_int) -> Option<f64> {
        unsafe {
            (ffi::lua_type(self.state, idx) == ffi::LUA_TNUMBER).then(|| ffi::lua_tonumber(self.state, idx))
        }
    }

    /// Whether argument `idx` is a function.
    pub fn is_function(&self, idx: c_int) -> bool {
        unsafe { ffi::lua_type(self.state, idx) == ffi::LUA_TFUNCTION }
    }

    /// Whether argument `idx` is a table.
    pub fn is_table(&self, idx: c_int) -> bool {
        unsafe { ffi::lua_type(self.state, idx) == ffi::LUA_TTABLE }
    }

    /// Argument `idx` as Lua's truth (nil and false are false).
    pub fn truthy(&self, idx: c_int) -> bool {
        unsafe { ffi::lua_toboolean(self.state, idx) != 0 }
    }

    /// Argument `idx` if it is a number with an integral value.
    pub fn integer(&self, idx: c_int) -> Option<i64> {
        unsafe {
            if ffi::lua_type(self.state, idx) != ffi::LUA_TNUMBER {
                return None;
            }
            let n = ffi::lua_tonumber(self.state, idx);
            (n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15).then_some(n as i64)
        }
    }

    /// The bytes of a string argument (numbers among `STRINGS` were converted already); `None`
    /// for other types.
    pub fn bytes(&self, idx: c_int) -> Option<&[u8]> {
        unsafe {
            if ffi::lua_type(self.state, idx) != ffi::LUA_TSTRING {
                return None;
            }
            let mut len = 0usize;
            // No conversion happens for a string, so this cannot raise.
            let ptr = ffi::lua_tolstring(self.state, idx, &mut len);
            // The string lives in the stack slot for the rest of the call.
            Some(std::slice::from_raw_parts(ptr as *const u8, len))
        }
    }
}

/// Pushes `value`. May raise (out of memory): the caller holds it in `ManuallyDrop`.
unsafe fn push(state: *mut ffi::lua_State, value: &Value) {
    match value {
        Value::Nil => ffi::lua_pushnil(state),
        Value::Bool(b) => ffi::lua_pushboolean(state, *b as c_int),
        Value::Int(n) => ffi::lua_pushinteger(state, *n as ffi::lua_Integer),
        Value::Num(n) => ffi::lua_pushnumber(state, *n),
        Value::Light(p) => ffi::lua_pushlightuserdata(state, *p),
        Value::Bytes(b) => push_bytes(state, b),
        Value::Owned(v) => push_bytes(state, v),
        Value::Slice(b) => push_bytes(state, b),
        Value::Str(s) => push_bytes(state, s.as_bytes()),
        Value::MsgPack(data) => super::msgpack::push_valid(state, data),
        Value::Ref(id) => {
            ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, *id as _);
        }
        Value::Report { into, fields } => push_report(state, *into, fields),
    }
}

/// Pushes argument `into`'s table (or a new one) after setting `fields` in it with raw sets.
unsafe fn push_report(state: *mut ffi::lua_State, into: c_int, fields: &[Field]) {
    ffi::luaL_checkstack(state, 4, std::ptr::null());
    if ffi::lua_type(state, into) == ffi::LUA_TTABLE {
        ffi::lua_pushvalue(state, into);
    } else {
        ffi::lua_createtable(state, 0, 16);
    }
    let t = ffi::lua_gettop(state);
    let mut open = "";
    for &(sub, name, value) in fields {
        if sub != open {
            ffi::lua_settop(state, t);
            open = sub;
            if !sub.is_empty() {
                push_bytes(state, sub.as_bytes());
                ffi::lua_rawget(state, t);
                if ffi::lua_type(state, -1) != ffi::LUA_TTABLE {
                    ffi::lua_pop(state, 1);
                    ffi::lua_createtable(state, 0, 8);
                    push_bytes(state, sub.as_bytes());
                    ffi::lua_pushvalue(state, -2);
                    ffi::lua_rawset(state, t);
                }
            }
        }
        push_bytes(state, name.as_bytes());
        ffi::lua_pushnumber(state, value);
        ffi::lua_rawset(state, if sub.is_empty() { t } else { t + 1 });
    }
    ffi::lua_settop(state, t);
}

unsafe fn push_bytes(state: *mut ffi::lua_State, bytes: &[u8]) {
    ffi::lua_pushlstring(state, bytes.as_ptr() as *const c_char, bytes.len());
}

unsafe extern "C-unwind" fn trampoline<F: RawFn>(state: *mut ffi::lua_State) -> c_int {
    // Conversions that may raise happen first, while nothing here owns anything.
    for &idx in F::STRINGS {
        if ffi::lua_type(state, idx) == ffi::LUA_TNUMBER {
            ffi::lua_tolstring(state, idx, std::ptr::null_mut());
        }
    }
    let slot = ffi::lua_touserdata(state, ffi::lua_upvalueindex(1)) as *const *const Runtime;
    let rt = *slot;
    let outcome = if rt.is_null() {
        Err(format!("{}: the luna runtime is closed", F::NAME))
    } else {
        // What may raise, while nothing here owns anything: stack room, registry slots.
        if F::STACK > 0 {
            ffi::luaL_checkstack(state, F::STACK, std::ptr::null());
        }
        let mut stack = Stack { state, refs: std::array::from_fn(|_| (0, Cell::new(ffi::LUA_NOREF))) };
        for (i, &idx) in F::REFS.iter().take(MAX_REFS).enumerate() {
            if matches!(ffi::lua_type(state, idx), ffi::LUA_TFUNCTION | ffi::LUA_TTHREAD) {
                ffi::lua_pushvalue(state, idx);
                stack.refs[i] = (idx, Cell::new(ffi::luaL_ref(state, ffi::LUA_REGISTRYINDEX)));
            }
        }
        let result = match catch_unwind(AssertUnwindSafe(|| F::call(&*rt, &stack))) {
            Ok(result) => result,
            Err(payload) => {
                drop(payload);
                Err(format!("{}: internal error (a bug in luna)", F::NAME))
            }
        };
        for (_, slot) in &stack.refs {
            if slot.get() != ffi::LUA_NOREF {
                stack.unref(slot.get());
            }
        }
        result
    };
    match outcome {
        Ok(out) => {
            let out = ManuallyDrop::new(out);
            for value in out.values() {
                push(state, value);
            }
            let n = out.len as c_int;
            drop(ManuallyDrop::into_inner(out));
            n
        }
        Err(message) => {
            let message = ManuallyDrop::new(message);
            ffi::lua_pushlstring(state, message.as_ptr() as *const c_char, message.len());
            drop(ManuallyDrop::into_inner(message));
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
    // SAFETY: the closure only pushes values; the userdata is written before anything can fail
    // (an allocation failure in lua_createtable leaks the Rc, which is sound).
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

/// How a coroutine [`resume`] handed values to stopped.
pub(crate) enum Outcome {
    /// It waits again (yielded `PARK`).
    Parked,
    /// It yielded without parking (resume it next update).
    Yielded(mlua::Thread),
    /// It returned (its first result).
    Finished(mlua::Value),
    /// It raised (the message, with the coroutine's traceback).
    Failed(mlua::Error),
    /// It was not waiting (it died meanwhile, or something else resumed it).
    Idle,
}

/// Resumes the suspended coroutine held in registry slot `thread` (a `RegistryKey::id`) with
/// `args` (at most [`Out::MAX`]).
pub(crate) fn resume(lua: &Lua, thread: c_int, args: &[Value]) -> Result<Outcome> {
    const PARKED: i64 = 0;
    const YIELDED: i64 = 1;
    const FINISHED: i64 = 2;
    const FAILED: i64 = 3;
    const IDLE: i64 = 4;
    let n = args.len() as c_int;
    // SAFETY: runs in protected mode, so an allocation failure while pushing raises into the
    // pcall; the closure holds only references and integers (nothing to drop). It returns an
    // outcome code and leaves the outcome's value on the main stack.
    let (code, value) = unsafe {
        protected(lua, move |state| {
            ffi::luaL_checkstack(state, Out::MAX as c_int + 4, std::ptr::null());
            ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, thread as _);
            let co = ffi::lua_tothread(state, -1);
            if co.is_null() || ffi::lua_status(co) != ffi::LUA_YIELD || ffi::lua_checkstack(co, n + 2) == 0 {
                ffi::lua_pop(state, 1);
                ffi::lua_pushnil(state);
                return IDLE;
            }
            // The thread stays at the bottom of what we push: the outcome's value may be it.
            for value in args {
                push(state, value);
            }
            ffi::lua_xmove(state, co, n);
            let mut results = 0;
            match ffi::lua_resume(co, state, n, &mut results) {
                ffi::LUA_YIELD => {
                    let first = ffi::lua_gettop(co) - results + 1;
                    let parked = results >= 1 && ffi::lua_touserdata(co, first) == park_value().0;
                    ffi::lua_settop(co, 0);
                    if parked {
                        ffi::lua_pop(state, 1);
                        ffi::lua_pushnil(state);
                        PARKED
                    } else {
                        YIELDED // the thread is the value
                    }
                }
                ffi::LUA_OK => {
                    ffi::lua_pop(state, 1);
                    if results >= 1 {
                        ffi::lua_pushvalue(co, ffi::lua_gettop(co) - results + 1);
                        ffi::lua_xmove(co, state, 1);
                    } else {
                        ffi::lua_pushnil(state);
                    }
                    ffi::lua_settop(co, 0);
                    FINISHED
                }
                _ => {
                    // [thread] -> ["message\ntraceback"]
                    ffi::lua_xmove(co, state, 1);
                    let text = ffi::luaL_tolstring(state, -1, std::ptr::null_mut());
                    ffi::luaL_traceback(state, co, text, 0);
                    ffi::lua_replace(state, -4);
                    ffi::lua_pop(state, 2);
                    FAILED
                }
            }
        })?
    };
    let value = value.unwrap_or(mlua::Value::Nil);
    Ok(match (code, value) {
        (PARKED, _) => Outcome::Parked,
        (YIELDED, mlua::Value::Thread(t)) => Outcome::Yielded(t),
        (FINISHED, v) => Outcome::Finished(v),
        (FAILED, v) => Outcome::Failed(mlua::Error::RuntimeError(v.to_string().unwrap_or_default())),
        _ => Outcome::Idle,
    })
}

/// Calls the function in registry slot `func` with `args` (at most [`Out::MAX`]), in protected
/// mode; errors come back as mlua errors, with the traceback.
pub(crate) fn call(lua: &Lua, func: c_int, args: &[Value]) -> Result<()> {
    let n = args.len() as c_int;
    // SAFETY: protected; the closure holds references and integers only.
    unsafe {
        protected(lua, move |state| {
            ffi::luaL_checkstack(state, n + 1, std::ptr::null());
            ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, func as _);
            for value in args {
                push(state, value);
            }
            ffi::lua_call(state, n, 0);
        })?;
    }
    Ok(())
}

/// The registry key (by address) under which a state keeps the slots of the two C functions
/// [`protected`] runs through: a table `{handler slot, runner slot}`.
static SLOTS_KEY: u8 = 0;

thread_local! {
    /// The body the next [`run_body`] runs: set just before its `lua_pcall`, read on entry (so
    /// nested protected calls cannot mix them up), without a light userdata on the stack.
    static BODY: Cell<*mut c_void> = const { Cell::new(std::ptr::null_mut()) };
    /// `(main state, handler slot, runner slot)` last used, so a call costs two `lua_rawgeti`
    /// (checked: the slots must hold our functions, whatever state now lives at that address).
    static SLOTS: Cell<(usize, c_int, c_int)> = const { Cell::new((0, 0, 0)) };
}

/// Makes the C functions [`protected`] runs through (once per state, on first use).
fn install_protected(lua: &Lua) -> Result<()> {
    // SAFETY: protected (exec_raw); pushes and stores two C functions, owns nothing.
    unsafe {
        lua.exec_raw::<()>((), |state| {
            ffi::lua_pushlightuserdata(state, &SLOTS_KEY as *const u8 as *mut c_void);
            ffi::lua_createtable(state, 2, 0);
            for (i, f) in [(1, add_traceback as ffi::lua_CFunction), (2, run_body)] {
                ffi::lua_pushcfunction(state, f);
                let slot = ffi::luaL_ref(state, ffi::LUA_REGISTRYINDEX);
                ffi::lua_pushinteger(state, slot as _);
                ffi::lua_rawseti(state, -2, i);
            }
            ffi::lua_rawset(state, ffi::LUA_REGISTRYINDEX);
        })
    }
}

/// Pushes the handler and the runner from slots `(handler, runner)`; false (nothing pushed) if
/// they are not ours.
unsafe fn push_protected_fns(state: *mut ffi::lua_State, (handler, runner): (c_int, c_int)) -> bool {
    ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, handler as _);
    ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, runner as _);
    let is =
        |idx, f: ffi::lua_CFunction| ffi::lua_tocfunction(state, idx).map(|g| g as usize) == Some(f as usize);
    if is(-2, add_traceback) && is(-1, run_body) {
        return true;
    }
    ffi::lua_pop(state, 2);
    false
}

/// The slots this state keeps under [`SLOTS_KEY`], if it has them.
unsafe fn protected_slots(state: *mut ffi::lua_State) -> Option<(c_int, c_int)> {
    ffi::lua_pushlightuserdata(state, &SLOTS_KEY as *const u8 as *mut c_void);
    ffi::lua_rawget(state, ffi::LUA_REGISTRYINDEX);
    let slots = if ffi::lua_type(state, -1) == ffi::LUA_TTABLE {
        ffi::lua_rawgeti(state, -1, 1);
        ffi::lua_rawgeti(state, -2, 2);
        let slots = (ffi::lua_tointeger(state, -2) as c_int, ffi::lua_tointeger(state, -1) as c_int);
        ffi::lua_pop(state, 2);
        Some(slots)
    } else {
        None
    };
    ffi::lua_pop(state, 1);
    slots
}

/// Runs `f` on the main Lua stack in protected mode, as mlua's `exec_raw` does, without
/// allocating. `f` may leave one value on the stack, returned beside its result. A Lua error
/// comes back as a runtime error carrying the message and a traceback (`not enough memory` as
/// a memory error).
///
/// # Safety
/// As for `exec_raw`: `f` may be cut short by a Lua error, so it must own nothing that needs
/// dropping, and it must leave the stack as it found it apart from that one value.
pub(crate) unsafe fn protected<R>(
    lua: &Lua,
    f: impl FnOnce(*mut ffi::lua_State) -> R,
) -> Result<(R, Option<mlua::Value>)> {
    let mut f = Some(f);
    let mut result = None;
    for _ in 0..2 {
        let mut run = |state| result = f.take().map(|f| f(state));
        let mut body: &mut dyn FnMut(*mut ffi::lua_State) = &mut run;
        match run_protected(lua, &mut body as *mut &mut dyn FnMut(*mut ffi::lua_State) as *mut c_void)? {
            Some(value) => {
                return match result {
                    Some(result) => Ok((result, value)),
                    None => Err(Error::runtime("luna: a protected call did not run")),
                }
            }
            None => install_protected(lua)?,
        }
    }
    Err(Error::runtime("luna: protected calls cannot be set up"))
}

/// Calls the body `body` points to through the registry's runner; `None` if the runner is not
/// there yet.
unsafe fn run_protected(lua: &Lua, body: *mut c_void) -> Result<Option<Option<mlua::Value>>> {
    lua.exec_raw_lua(|raw| {
        let state = raw.state();
        if ffi::lua_checkstack(state, 3) == 0 {
            return Err(Error::StackError);
        }
        let base = ffi::lua_gettop(state);
        let (cached, handler, runner) = SLOTS.get();
        if cached != state as usize || !push_protected_fns(state, (handler, runner)) {
            let Some(slots) = protected_slots(state) else { return Ok(None) };
            if !push_protected_fns(state, slots) {
                return Ok(None);
            }
            SLOTS.set((state as usize, slots.0, slots.1));
        }
        BODY.set(body);
        let code = ffi::lua_pcall(state, 0, ffi::LUA_MULTRET, base + 1);
        // Not left pointing at this frame if the call failed before the runner took it.
        BODY.set(std::ptr::null_mut());
        match code {
            ffi::LUA_OK => {
                let value = (ffi::lua_gettop(state) > base + 1).then(|| raw.pop_value());
                ffi::lua_settop(state, base);
                Ok(Some(value))
            }
            code => {
                let text = ffi::lua_tolstring(state, -1, std::ptr::null_mut());
                let text = if text.is_null() {
                    "unknown error".to_owned()
                } else {
                    std::ffi::CStr::from_ptr(text).to_string_lossy().into_owned()
                };
                ffi::lua_settop(state, base);
                Err(if code == ffi::LUA_ERRMEM {
                    Error::MemoryError(text)
                } else {
                    Error::RuntimeError(text)
                })
            }
        }
    })
}

/// The function [`protected`] calls: runs the body [`BODY`] points to; what the body left on
/// the stack is the result.
unsafe extern "C-unwind" fn run_body(state: *mut ffi::lua_State) -> c_int {
    let body = BODY.replace(std::ptr::null_mut()) as *mut &mut dyn FnMut(*mut ffi::lua_State);
    if body.is_null() {
        return 0; // called from Lua somehow: nothing to run
    }
    (*body)(state);
    ffi::lua_gettop(state)
}

/// The message handler of [`protected`]: the error as text, with the traceback.
unsafe extern "C-unwind" fn add_traceback(state: *mut ffi::lua_State) -> c_int {
    if ffi::lua_checkstack(state, ffi::LUA_TRACEBACK_STACK + 2) != 0 {
        let text = ffi::luaL_tolstring(state, -1, std::ptr::null_mut());
        ffi::luaL_traceback(state, state, text, 1);
        ffi::lua_remove(state, -2);
    }
    1
}

/// A coroutine kept alive in a registry slot of ours (made by [`Stack::thread_ref`]): its slot and
/// its pointer (what `Thread::to_pointer` gives). [`ThreadRef::release`] frees the slot.
#[derive(Debug)]
pub(crate) struct ThreadRef {
    pub id: c_int,
    pub ptr: usize,
}

impl ThreadRef {
    /// Frees the registry slot (the coroutine may then be collected).
    pub fn release(self, lua: &Lua) {
        unref(lua, self.id);
    }
}

/// A function kept alive in a registry slot of ours (made by [`Stack::function_ref`]), called
/// with [`call`]; [`FnRef::release`] frees the slot.
#[derive(Debug)]
pub(crate) struct FnRef(pub c_int);

impl FnRef {
    pub fn release(self, lua: &Lua) {
        unref(lua, self.0);
    }
}

fn unref(lua: &Lua, id: c_int) {
    // SAFETY: luaL_unref only writes existing registry slots (no allocation, nothing raises).
    lua.exec_raw_lua(|raw| unsafe { ffi::luaL_unref(raw.state(), ffi::LUA_REGISTRYINDEX, id) });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_calls_allocate_nothing() {
        let lua = Lua::new();
        // SAFETY: the bodies push and pop integers only.
        let call = || unsafe { protected(&lua, |state| ffi::lua_pushinteger(state, 7)) };
        let ((), first) = call().unwrap(); // sets the runner up
        assert_eq!(first, Some(mlua::Value::Integer(7)));
        lua.gc_stop();
        let before = lua.used_memory();
        for _ in 0..10_000 {
            call().unwrap();
        }
        let grown = lua.used_memory() - before;
        // mlua's exec_raw leaves two C closures per call for the collector (96 bytes a call).
        assert!(grown < 1024, "10,000 protected calls allocated {grown} bytes");
    }

    #[test]
    fn protected_calls_follow_the_state_they_run_in() {
        // Alternating states, and states dropped and made again (maybe at the same address):
        // the cached slots are checked before use.
        let push = |lua: &Lua, n| unsafe { protected(lua, move |state| ffi::lua_pushinteger(state, n)) };
        for round in 0..20 {
            let a = Lua::new();
            let b = Lua::new();
            // Different registry layouts, so the slots differ between the two states.
            for _ in 0..round % 3 {
                b.create_registry_value(round).unwrap();
            }
            for i in 0..3 {
                assert_eq!(push(&a, i).unwrap().1, Some(mlua::Value::Integer(i)));
                assert_eq!(push(&b, i + 10).unwrap().1, Some(mlua::Value::Integer(i + 10)));
            }
        }
    }

    #[test]
    fn protected_errors_carry_message_traceback_and_kind() {
        let lua = Lua::new();
        let f: Function = lua.load("return function() error('boom') end").eval().unwrap();
        let key = lua.create_registry_value(f).unwrap();
        let err = call(&lua, key.id(), &[]).unwrap_err().to_string();
        assert!(err.contains("boom") && err.contains("stack traceback"), "{err}");
        // The stack is as it was: a later call works.
        let ok: Function = lua.load("return function(a, b) assert(a == 1 and b == 'x') end").eval().unwrap();
        let ok = lua.create_registry_value(ok).unwrap();
        call(&lua, ok.id(), &[Value::Int(1), Value::Slice(b"x")]).unwrap();

        lua.set_memory_limit(lua.used_memory() + 64 * 1024).unwrap();
        let hog: Function =
            lua.load("return function() local t = {} for i = 1, 1e7 do t[i] = i end end").eval().unwrap();
        let hog = lua.create_registry_value(hog).unwrap();
        match call(&lua, hog.id(), &[]) {
            Err(Error::MemoryError(_)) => {}
            other => panic!("expected a memory error, got {other:?}"),
        }
    }
}
