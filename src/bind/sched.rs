//! The scheduler: library-owned coroutines, the wake list, and the error policy.
//!
//! A coroutine waiting for something yields the `PARK` sentinel after registering itself with a
//! primitive (timer, lookup, socket). Any other yield means "resume me next update". Borrows of
//! the runtime are never held while Lua code runs: Lua calls back into us.

use std::collections::{HashMap, VecDeque};

use rustc_hash::FxHashMap;
use std::ffi::{c_int, c_void};
use std::time::Duration;

use mlua::{Function, IntoLuaMulti, LightUserData, Lua, RegistryKey, Result, Thread, ThreadStatus, Value};

use super::error::message;
use super::raw;
use super::Runtime;
use crate::driver::{Key, TimerQueue};

/// What a due timer does.
pub(crate) enum TimerAction {
    /// Resume a coroutine parked in `luna.sleep`.
    Wake(RegistryKey),
    /// Run a callback in a new coroutine (`set_timeout`, or `set_interval` with `every`).
    Call { func: RegistryKey, every: Option<Duration> },
}

/// Runs when a library-owned coroutine finishes (`Ok` with its first return value) or fails;
/// an app uses it to send a handler's result or to apply its own error policy.
pub(crate) type Hook = Box<dyn FnOnce(&Lua, &Runtime, Result<Value>) -> Result<()>>;

#[derive(Default)]
pub(crate) struct Sched {
    /// Hooks of running owned coroutines, by thread pointer (the key keeps the thread alive, so
    /// the pointer cannot be reused meanwhile).
    hooks: FxHashMap<usize, (RegistryKey, Hook)>,
    pub timers: TimerQueue<TimerAction>,
    /// Parked coroutines that are ready, resumed by the current or next update.
    pub jobs: VecDeque<Job>,
    /// Coroutines that yielded without parking: resumed by the next update.
    pub next_frame: Vec<RegistryKey>,
    /// Coroutines waiting for a host name, by host.
    pub dns_waiters: HashMap<String, Vec<RegistryKey>>,
    /// Coroutines waiting for a driver entry (a socket) to have something for them.
    pub waiters: FxHashMap<Key, Vec<RegistryKey>>,
    /// `luna.set_error_handler`: receives errors of library-owned coroutines instead of `update`.
    pub error_handler: Option<RegistryKey>,
    /// `luna.close()` was called (the standalone host exits once nothing is pending).
    pub close_requested: bool,
}

impl Sched {
    /// Anything that can still resume a coroutine or call back into Lua.
    pub fn pending(&self) -> bool {
        !(self.timers.is_empty()
            && self.jobs.is_empty()
            && self.next_frame.is_empty()
            && self.dns_waiters.is_empty())
    }

    /// Parks a coroutine until `wake(key)`.
    pub fn park_on(&mut self, key: Key, thread: RegistryKey) {
        self.waiters.entry(key).or_default().push(thread);
    }

    /// Makes every coroutine parked on `key` ready.
    pub fn wake(&mut self, key: Key) {
        if let Some(waiters) = self.waiters.remove(&key) {
            self.jobs.extend(waiters.into_iter().map(Job::Key));
        }
    }
}

/// A coroutine to resume: held by an mlua registry key, or by a raw reference (coroutines that
/// raw C functions parked, e.g. a waiting `fetch`).
pub(crate) enum Job {
    Key(RegistryKey),
    Raw(raw::ThreadRef),
}

static PARK_SENTINEL: u8 = 0;
static DELIVERED_SENTINEL: u8 = 0;

/// The value a parked coroutine yields.
pub(crate) fn park_value() -> LightUserData {
    LightUserData(&PARK_SENTINEL as *const u8 as *mut c_void)
}

/// The first resume value of a coroutine that is handed what it waited for (the rest follow).
pub(crate) fn delivered_value() -> LightUserData {
    LightUserData(&DELIVERED_SENTINEL as *const u8 as *mut c_void)
}

fn is_park(value: &Value) -> bool {
    matches!(value, Value::LightUserData(ud) if ud.0 == park_value().0)
}

/// Resumes `thread` if it can be resumed. A yield without `PARK` schedules it for the next
/// update; an error goes to the error policy.
pub(crate) fn resume(lua: &Lua, rt: &Runtime, thread: &Thread, args: impl IntoLuaMulti) -> Result<()> {
    // Parked coroutines can die or be resumed by someone else meanwhile.
    if thread.status() != ThreadStatus::Resumable {
        return Ok(());
    }
    // Only the first value matters (`PARK`, or a finished coroutine's result): no list is built.
    let result = thread.resume::<Value>(args);
    if let Ok(values) = &result {
        if thread.status() == ThreadStatus::Resumable {
            if !is_park(values) {
                let key = lua.create_registry_value(thread)?;
                rt.sched.borrow_mut().next_frame.push(key);
            }
            return Ok(());
        }
    }
    finished(lua, rt, thread.to_pointer() as usize, result)
}

/// A coroutine (by pointer) ended with `result`: its hook takes it, or an error goes to the
/// error policy.
fn finished(lua: &Lua, rt: &Runtime, thread: usize, result: Result<Value>) -> Result<()> {
    let hook = rt.sched.borrow_mut().hooks.remove(&thread);
    match (hook, result) {
        (Some((key, hook)), result) => {
            lua.remove_registry_value(key)?;
            hook(lua, rt, result)
        }
        (None, Ok(_)) => Ok(()),
        (None, Err(e)) => report(lua, rt, &e),
    }
}

/// Hands `args` to a parked coroutine (its registry slot and pointer) with [`raw::resume`], then
/// does what [`resume`] does after a resume.
pub(crate) fn resume_parked(
    lua: &Lua,
    rt: &Runtime,
    thread: c_int,
    ptr: usize,
    args: &[raw::Value],
) -> Result<()> {
    match raw::resume(lua, thread, args)? {
        raw::Outcome::Parked | raw::Outcome::Idle => Ok(()),
        raw::Outcome::Yielded(thread) => {
            let key = lua.create_registry_value(thread)?;
            rt.sched.borrow_mut().next_frame.push(key);
            Ok(())
        }
        raw::Outcome::Finished(value) => finished(lua, rt, ptr, Ok(value)),
        raw::Outcome::Failed(e) => finished(lua, rt, ptr, Err(e)),
    }
}

/// A new coroutine running `func`, whose end (result or error) goes to `hook`; start it with
/// [`resume`].
pub(crate) fn create_owned(lua: &Lua, rt: &Runtime, func: Function, hook: Hook) -> Result<Thread> {
    let thread = lua.create_thread(func)?;
    let key = lua.create_registry_value(&thread)?;
    rt.sched.borrow_mut().hooks.insert(thread.to_pointer() as usize, (key, hook));
    Ok(thread)
}

/// Runs `func(args)` in a new coroutine whose end (result or error) goes to `hook`.
pub(crate) fn spawn_owned(
    lua: &Lua,
    rt: &Runtime,
    func: Function,
    args: impl IntoLuaMulti,
    hook: Hook,
) -> Result<Thread> {
    let thread = create_owned(lua, rt, func, hook)?;
    resume(lua, rt, &thread, args)?;
    Ok(thread)
}

/// The error policy for library-owned coroutines: the error handler if one is set, otherwise
/// the error raises out of the call that resumed the coroutine (`update`, `spawn`).
pub(crate) fn report(lua: &Lua, rt: &Runtime, e: &mlua::Error) -> Result<()> {
    rt.counters.borrow_mut().handler_errors += 1;
    let text = message(e);
    let handler = match &rt.sched.borrow().error_handler {
        Some(key) => Some(lua.registry_value::<Function>(key)?),
        None => None,
    };
    match handler {
        Some(handler) => handler.call::<()>(text),
        None => Err(mlua::Error::external(text)),
    }
}

/// Resumes every coroutine that was ready when called. Ones made ready meanwhile wait for the
/// next update, so a coroutine that keeps waking itself cannot stall a frame. On error, or when
/// the budget runs out (false), the remaining jobs stay queued.
pub(crate) fn run_jobs(lua: &Lua, rt: &Runtime) -> Result<bool> {
    let count = rt.sched.borrow().jobs.len();
    for _ in 0..count {
        if !rt.take_unit() {
            return Ok(false);
        }
        let Some(job) = rt.sched.borrow_mut().jobs.pop_front() else { break };
        match job {
            Job::Key(key) => {
                let thread: Thread = lua.registry_value(&key)?;
                lua.remove_registry_value(key)?;
                resume(lua, rt, &thread, ())?;
            }
            Job::Raw(thread) => {
                let resumed = resume_parked(lua, rt, thread.id, thread.ptr, &[]);
                thread.release(lua);
                resumed?;
            }
        }
    }
    Ok(true)
}
