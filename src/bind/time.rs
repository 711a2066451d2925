//! Time: `spawn`, `sleep`'s primitive, `set_timeout` / `set_interval` and their handles.

use std::time::{Duration, Instant};

use mlua::{Function, Lua, MultiValue, Result, Thread, UserData, UserDataMethods, Value};

use super::error::{bad_arg, misuse};
use super::sched::{self, TimerAction};
use super::{runtime, Runtime};

/// A `set_timeout` / `set_interval` handle.
pub(crate) struct Timer(u64);

impl UserData for Timer {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // Returns true if the timer was still scheduled.
        methods.add_method("cancel", |lua, this, ()| {
            let rt = runtime(lua)?;
            let cancelled = rt.sched.borrow_mut().timers.cancel(this.0);
            match cancelled {
                Some(TimerAction::Call { func: key, .. } | TimerAction::Wake(key)) => {
                    lua.remove_registry_value(key)?;
                    Ok(true)
                }
                None => Ok(false),
            }
        });
        methods
            .add_method("active", |lua, this, ()| Ok(runtime(lua)?.sched.borrow().timers.contains(this.0)));
        methods.add_meta_method("__tostring", |_, this, ()| Ok(format!("luna.timer({})", this.0)));
    }
}

/// The longest delay or timeout accepted (~31 years): the clock plus more could overflow.
pub(crate) const MAX_SECONDS: f64 = 1e9;

/// Checks a delay argument: a number of seconds from 0 to [`MAX_SECONDS`].
pub(crate) fn seconds(call: &str, name: &str, value: &Value) -> Result<Duration> {
    let number = match *value {
        Value::Integer(i) => Some(i as f64),
        Value::Number(n) => Some(n),
        _ => None,
    };
    match number {
        Some(s) if (0.0..=MAX_SECONDS).contains(&s) => Ok(Duration::from_secs_f64(s)),
        Some(s) => {
            Err(misuse(call, format!("'{name}' must be a number of seconds from 0 to 1e9, got {s:?}")))
        }
        None => Err(bad_arg(call, name, "a number of seconds", value)),
    }
}

fn callback(call: &str, value: Value) -> Result<Function> {
    match value {
        Value::Function(f) => Ok(f),
        other => Err(bad_arg(call, "fn", "a function", &other)),
    }
}

/// `luna.spawn(fn, ...)`: runs `fn(...)` in a new library-owned coroutine, at once, until it
/// first waits. Returns the coroutine.
pub(crate) fn spawn(lua: &Lua, (func, args): (Value, MultiValue)) -> Result<Thread> {
    let func = callback("luna.spawn(fn, ...)", func)?;
    let thread = lua.create_thread(func)?;
    let rt = runtime(lua)?;
    sched::resume(lua, &rt, &thread, args)?;
    Ok(thread)
}

fn schedule(lua: &Lua, call: &str, (delay, func): (Value, Value), repeat: bool) -> Result<Timer> {
    let delay = seconds(call, "seconds", &delay)?;
    let func = lua.create_registry_value(callback(call, func)?)?;
    let every = repeat.then_some(delay);
    let rt = runtime(lua)?;
    let id = rt.sched.borrow_mut().timers.insert(Instant::now() + delay, TimerAction::Call { func, every });
    Ok(Timer(id))
}

pub(crate) fn set_timeout(lua: &Lua, args: (Value, Value)) -> Result<Timer> {
    schedule(lua, "luna.set_timeout(seconds, fn)", args, false)
}

pub(crate) fn set_interval(lua: &Lua, args: (Value, Value)) -> Result<Timer> {
    schedule(lua, "luna.set_interval(seconds, fn)", args, true)
}

/// `core.sleep(co, seconds)`: parks `co` until the deadline, which it returns (seconds on the
/// `luna.now()` clock). The Lua wrapper validated the arguments.
pub(crate) fn sleep(lua: &Lua, (thread, delay): (Thread, Value)) -> Result<f64> {
    let delay = seconds("luna.sleep(seconds)", "seconds", &delay)?;
    let rt = runtime(lua)?;
    let deadline = Instant::now() + delay;
    let key = lua.create_registry_value(thread)?;
    rt.sched.borrow_mut().timers.insert(deadline, TimerAction::Wake(key));
    Ok(rt.clock(deadline))
}

/// `luna.now()`: seconds on the runtime's monotonic clock (a raw C function: games call it
/// every frame, benchmarks around every call).
pub(crate) struct Now;

impl super::raw::RawFn for Now {
    const NAME: &'static str = "luna.now()";

    fn call(rt: &Runtime, _: &super::raw::Stack) -> std::result::Result<super::raw::Out, String> {
        Ok(super::raw::Out::one(super::raw::Value::Num(rt.clock(Instant::now()))))
    }
}

/// Runs every timer due at `now`. Callbacks run in new coroutines, given the timer handle.
pub(crate) fn fire_timers(lua: &Lua, rt: &Runtime, now: Instant) -> Result<bool> {
    loop {
        if rt.sched.borrow_mut().timers.next_deadline().is_none_or(|at| at > now) {
            return Ok(true);
        }
        if !rt.take_unit() {
            return Ok(false);
        }
        let due = rt.sched.borrow_mut().timers.pop_due(now);
        let Some((id, at, action)) = due else { return Ok(true) };
        match action {
            TimerAction::Wake(thread) => rt.sched.borrow_mut().jobs.push_back(sched::Job::Key(thread)),
            TimerAction::Call { func, every } => {
                let callback: Function = lua.registry_value(&func)?;
                match every {
                    Some(period) => {
                        // Keep the cadence; after a stall skip missed runs instead of bursting.
                        let mut next = at + period;
                        if next <= now {
                            next = now + period.max(Duration::from_nanos(1));
                        }
                        rt.sched.borrow_mut().timers.insert_with_id(
                            id,
                            next,
                            TimerAction::Call { func, every },
                        );
                    }
                    None => lua.remove_registry_value(func)?,
                }
                let thread = lua.create_thread(callback)?;
                sched::resume(lua, rt, &thread, Timer(id))?;
            }
        }
    }
}
