//! The only code that knows Lua: the `luna` / `lunac` module tables, the objects Lua holds and
//! the scheduler. All state lives in one `Runtime` per Lua state (mlua app data), so it dies
//! with the state at `lua_close` (LÖVE's restart included).
//!
//! One module per protocol, each owning the driver entries it opens (their `Tag`):
//! `ws` (WebSocket apps), `rpc` (RPC apps), `net` (raw TCP/TLS/Unix/UDP sockets), `http`
//! (HTTP servers and apps; `http::client`, the HTTP client, has a tag of its own). `tick`
//! polls the driver, services ready entries and hands each event to its module. Shared by all:
//! `addr` (addresses and waiting for name resolution), `tls` (configs from PEM files and the
//! system store), `options` and `policy` (config tables, error policy), `sched` and `time`
//! (coroutines, timers), `raw` (hot-path C functions and resuming parked handlers),
//! `msgpack`. A new protocol is one module here (plus its `proto::` type).

mod addr;
mod budget;
mod error;
mod http;
mod json;
mod msgpack;
mod net;
mod options;
mod policy;
mod raw;
mod rpc;
mod sched;
mod stats;
mod time;
mod tls;
mod ws;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::{Function, Lua, Result, Table, Thread, Value};

use crate::driver::{Driver, Key, Lookup, Ready};
use budget::Budget;
use error::bad_arg;
pub use error::message as error_text;
use sched::Sched;

/// Per-Lua-state runtime. Never borrow a field across a call into Lua.
pub(crate) struct Runtime {
    driver: RefCell<Driver>,
    sched: RefCell<Sched>,
    ws: RefCell<ws::WsState>,
    rpc: RefCell<rpc::RpcState>,
    net: RefCell<net::NetState>,
    http: RefCell<http::HttpState>,
    http_client: RefCell<http::client::ClientState>,
    tls: RefCell<tls::TlsCache>,
    /// What waits for host names to resolve.
    resolving: RefCell<addr::Waiting>,
    /// Entries that became ready and are not serviced yet (kept if a callback raises).
    service: RefCell<std::collections::VecDeque<Key>>,
    /// The buffer `poll` reports readiness into, kept between ticks (a nested tick makes its own).
    ready: RefCell<Vec<Ready>>,
    /// How many `tick`s are running (they nest: a blocking fetch or an update inside a coroutine).
    ticking: Cell<u32>,
    /// The running tick's limits and what it did.
    budget: Cell<Budget>,
    /// What `luna.stats()` reports.
    counters: RefCell<stats::Counters>,
    /// The phase (index in [`PHASES`]) the next tick starts with (0 unless a budget cut one short).
    phase: Cell<usize>,
    /// Zero of the `luna.now()` clock.
    epoch: Instant,
}

impl Runtime {
    /// True while an update runs (output can wait for its end and go out together).
    fn in_update(&self) -> bool {
        self.ticking.get() > 0
    }

    /// Writes what `key` queued: at the end of the current update when inside one (replies to
    /// many peers leave together), else now.
    fn flush(&self, key: Key) {
        let mut driver = self.driver.borrow_mut();
        if self.in_update() {
            driver.queue_flush(key);
        } else {
            driver.flush(key);
        }
    }

    /// Restarts reading of a stream that stopped for a full input (edge-triggered polling
    /// would not report it again).
    fn resume_reading(&self, key: Key) {
        if self.driver.borrow_mut().should_resume_reading(key) {
            self.service.borrow_mut().push_back(key);
        }
    }

    /// Whether one more unit of work may run in this tick (counted if so).
    fn take_unit(&self) -> bool {
        let mut budget = self.budget.get();
        let ok = budget.take();
        self.budget.set(budget);
        ok
    }

    /// Work waiting for the next update: driver events, ready sockets, coroutines, due timers.
    fn deferred(&self) -> usize {
        let sched = self.sched.borrow();
        self.driver.borrow().events_waiting()
            + self.service.borrow().len()
            + sched.jobs.len()
            + sched.timers.due(Instant::now())
    }

    /// Seconds since the runtime started, on the monotonic clock.
    fn clock(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.epoch).as_secs_f64()
    }
}

/// A handle number passed through Lua (objects hold one in `__h`).
pub(crate) fn handle_number(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => Some(*i as u64),
        Value::Number(n) if n.fract() == 0.0 && *n >= 0.0 => Some(*n as u64),
        _ => None,
    }
}

/// The runtime of this Lua state, created on first use.
pub(crate) fn runtime(lua: &Lua) -> Result<Rc<Runtime>> {
    if let Some(rt) = lua.app_data_ref::<Rc<Runtime>>() {
        return Ok(rt.clone());
    }
    let rt = Rc::new(Runtime {
        driver: RefCell::new(Driver::new()?),
        sched: RefCell::new(Sched::default()),
        ws: RefCell::new(ws::WsState::default()),
        rpc: RefCell::new(rpc::RpcState::default()),
        net: RefCell::new(net::NetState::default()),
        http: RefCell::new(http::HttpState::default()),
        http_client: RefCell::default(),
        tls: RefCell::new(tls::TlsCache::default()),
        resolving: RefCell::new(addr::Waiting::default()),
        service: RefCell::new(Default::default()),
        ready: RefCell::new(Vec::new()),
        ticking: Default::default(),
        budget: Default::default(),
        counters: Default::default(),
        phase: Default::default(),
        epoch: Instant::now(),
    });
    lua.set_app_data(rt.clone());
    Ok(rt)
}

/// One tick: wait up to `timeout` for I/O (`Some(ZERO)` in `update`), then resume whatever became
/// ready and run due timers. Work is proportional to ready events and due timers.
pub fn tick(lua: &Lua, timeout: Option<Duration>) -> Result<()> {
    tick_within(lua, timeout, Budget::unlimited()).map(drop)
}

/// A tick that stops dispatching once `budget` is spent; returns what it did.
fn tick_within(lua: &Lua, timeout: Option<Duration>, budget: Budget) -> Result<Budget> {
    let rt = runtime(lua)?;
    let outermost = !rt.in_update();
    rt.ticking.set(rt.ticking.get() + 1);
    // A nested tick (a blocking fetch) runs under its own budget; the outer one's resumes after.
    let outer = rt.budget.replace(budget);
    let result = tick_inner(lua, &rt, timeout);
    let mut done = rt.budget.replace(outer);
    rt.ticking.set(rt.ticking.get() - 1);
    // Output queued by this update goes out even when a callback raised.
    net::end_of_update(&rt);
    rt.driver.borrow_mut().flush_queued();
    if done.cut {
        done.deferred = rt.deferred() as u64;
    }
    if outermost {
        // Timed for `luna.stats()` from the poll's return: a tick that waits (the standalone
        // host's) counts its work, not its wait.
        let took = rt.driver.borrow().now().elapsed();
        rt.counters.borrow_mut().update_done(took, done.handled, done.deferred);
    }
    result.map(|()| done)
}

/// The kinds of work a tick dispatches, in order (each kind oldest first). A budgeted tick that
/// stops in one starts the next tick with the one after it.
#[derive(Clone, Copy)]
enum Phase {
    /// Driver events left by an earlier tick (cut short, or a callback raised).
    Events,
    /// Entries that became ready: their I/O, then their events.
    Sockets,
    Timers,
    Coroutines,
}

const PHASES: [Phase; 4] = [Phase::Events, Phase::Sockets, Phase::Timers, Phase::Coroutines];

fn tick_inner(lua: &Lua, rt: &Runtime, timeout: Option<Duration>) -> Result<()> {
    // What the script queued since the last update (RPC calls and pushes) leaves first: before
    // a wait (a blocking fetch's request), else right after the poll, inside the timed part.
    let waits = timeout != Some(Duration::ZERO);
    if waits {
        rt.driver.borrow_mut().flush_queued();
    }
    // Empty: the last tick drained it.
    let mut ready = std::mem::take(&mut *rt.ready.borrow_mut());
    rt.driver.borrow_mut().poll(timeout, &mut ready)?;
    if !waits {
        rt.driver.borrow_mut().flush_queued();
    }
    let now = rt.driver.borrow().now();
    let mut resolved = Vec::new();
    {
        let mut sched = rt.sched.borrow_mut();
        let mut service = rt.service.borrow_mut();
        for event in ready.drain(..) {
            match event {
                Ready::Resolved(host) => {
                    let waiters = sched.dns_waiters.remove(&host).unwrap_or_default();
                    sched.jobs.extend(waiters.into_iter().map(sched::Job::Key));
                    resolved.push(host);
                }
                Ready::Entry(key) => service.push_back(key),
            }
        }
        *rt.ready.borrow_mut() = ready;
        let yielded = std::mem::take(&mut sched.next_frame);
        sched.jobs.extend(yielded.into_iter().map(sched::Job::Key));
    }
    // Everything waiting for a host hears of it, even if one of them raises.
    let mut raised = Ok(());
    for host in resolved {
        raised = raised
            .and(addr::resolved(lua, rt, &host, now))
            .and(ws::resolved(lua, rt, &host, now))
            .and(rpc::resolved(lua, rt, &host, now));
    }
    raised?;
    ws::report_failures(lua, rt)?;
    let start = rt.phase.get();
    for i in 0..PHASES.len() {
        let at = (start + i) % PHASES.len();
        let finished = match PHASES[at] {
            Phase::Events => dispatch(lua, rt)?,
            Phase::Sockets => service_ready(lua, rt, now)?,
            Phase::Timers => time::fire_timers(lua, rt, now)?,
            Phase::Coroutines => sched::run_jobs(lua, rt)?,
        };
        if !finished {
            // The next tick starts with the kind after this one: each gets the first turn in
            // turn, so a flood of one kind cannot hold the others back.
            rt.phase.set((at + 1) % PHASES.len());
            return Ok(());
        }
    }
    rt.phase.set(0);
    Ok(())
}

/// Services the entries that became ready, oldest first, and hands out their events; false when
/// the budget ran out first.
fn service_ready(lua: &Lua, rt: &Runtime, now: Instant) -> Result<bool> {
    loop {
        if rt.service.borrow().is_empty() {
            return Ok(true);
        }
        if !rt.take_unit() {
            return Ok(false);
        }
        let Some(key) = rt.service.borrow_mut().pop_front() else { return Ok(true) };
        rt.driver.borrow_mut().service(key, now);
        if !dispatch(lua, rt)? {
            return Ok(false);
        }
    }
}

/// Hands every driver event to the module that owns the entry (by its tag); false when the
/// budget ran out first. Events not handled (budget, or a callback raised) stay queued for the
/// next update.
fn dispatch(lua: &Lua, rt: &Runtime) -> Result<bool> {
    loop {
        if !rt.driver.borrow().has_events() {
            return Ok(true);
        }
        if !rt.take_unit() {
            return Ok(false);
        }
        let Some(event) = rt.driver.borrow_mut().pop_event() else { return Ok(true) };
        match event.tag {
            ws::TAG => ws::event(lua, rt, event)?,
            rpc::TAG => rpc::event(lua, rt, event)?,
            net::TAG => net::event(lua, rt, event)?,
            http::TAG => http::event(lua, rt, event)?,
            http::client::TAG => http::client::event(lua, rt, event)?,
            _ => {}
        }
    }
}

/// What the standalone host needs between ticks.
pub struct HostState {
    /// Timers, waiting coroutines or open sockets can still call back into Lua.
    pub pending: bool,
    /// The script called `luna.close()` / `lunac.close()`.
    pub close_requested: bool,
    /// When to tick next at the latest (`None`: only I/O can wake anything).
    pub wake: Option<Instant>,
}

/// The runtime's state for the standalone host's loop (one look, once per tick).
pub fn host_state(lua: &Lua) -> Result<HostState> {
    let rt = runtime(lua)?;
    let wake = wakeup(&rt);
    let sched = rt.sched.borrow();
    Ok(HostState {
        // Idle pooled HTTP client connections wait for a request that may never come.
        pending: sched.pending()
            || rt.driver.borrow().pending() > rt.http_client.borrow().idle_count()
            || !rt.resolving.borrow().is_empty(),
        close_requested: sched.close_requested,
        wake,
    })
}

fn wakeup(rt: &Runtime) -> Option<Instant> {
    let mut sched = rt.sched.borrow_mut();
    if !sched.jobs.is_empty() || !sched.next_frame.is_empty() || !rt.service.borrow().is_empty() {
        return Some(Instant::now());
    }
    let mut driver = rt.driver.borrow_mut();
    if driver.has_events() {
        return Some(Instant::now());
    }
    match (sched.timers.next_deadline(), driver.next_deadline()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Runs `f` on this state's driver (embedding hosts and benchmarks open entries this way).
pub fn with_driver<R>(lua: &Lua, f: impl FnOnce(&mut Driver) -> R) -> Result<R> {
    Ok(f(&mut runtime(lua)?.driver.borrow_mut()))
}

/// True while timers, waiting coroutines or open sockets can still call back into Lua.
pub fn pending(lua: &Lua) -> Result<bool> {
    Ok(host_state(lua)?.pending)
}

/// `luna.close()` and `lunac.close()` together (the standalone host's shutdown).
pub fn close(lua: &Lua) -> Result<()> {
    close_side(lua, Side::Server)?;
    close_side(lua, Side::Client)
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Server,
    Client,
}

/// `luna.close()` (server apps) or `lunac.close()` (client apps).
fn close_side(lua: &Lua, side: Side) -> Result<()> {
    let rt = runtime(lua)?;
    rt.sched.borrow_mut().close_requested = true;
    // Every kind closes even if a callback raises on the way; the first error is reported.
    http::client::close_idle(&rt);
    let mut result = rpc::close_all(lua, &rt, side).and(ws::close_all(lua, &rt, side));
    if side == Side::Server {
        result = result.and(net::close_all(lua, &rt)).and(http::close_all(lua, &rt));
    }
    result
}

/// `core.resolve(host, co)`: the addresses, `nil, err`, or `PARK` after parking `co`.
fn resolve(lua: &Lua, (host, thread): (String, Thread)) -> Result<(Value, Option<String>)> {
    let rt = runtime(lua)?;
    let lookup = rt.driver.borrow_mut().lookup(&host, Instant::now());
    match lookup {
        Lookup::Done(ips) => {
            let list = lua.create_sequence_from(ips.iter().map(|ip| ip.to_string()))?;
            Ok((Value::Table(list), None))
        }
        Lookup::Failed(err) => Ok((Value::Nil, Some(format!("luna.resolve: {err}")))),
        Lookup::Pending => {
            let key = lua.create_registry_value(thread)?;
            rt.sched.borrow_mut().dns_waiters.entry(host).or_default().push(key);
            Ok((Value::LightUserData(sched::park_value()), None))
        }
    }
}

/// The functions both modules share; `name` prefixes error messages.
fn fill_common(lua: &Lua, module: &Table, name: &'static str) -> Result<()> {
    let update_call = if name == "luna" { "luna.update(dt)" } else { "lunac.update(dt)" };
    module.set(
        "update",
        lua.create_function(move |lua, (dt, opts): (Value, Value)| {
            if !matches!(dt, Value::Nil | Value::Number(_) | Value::Integer(_)) {
                return Err(bad_arg(update_call, "dt", "a number or nil", &dt));
            }
            let budget = match opts {
                Value::Nil => Budget::unlimited(),
                Value::Table(opts) => Budget::from_options(update_call, &opts, Instant::now())?,
                other => return Err(bad_arg(update_call, "opts", "a table or nil", &other)),
            };
            let done = tick_within(lua, Some(Duration::ZERO), budget)?;
            Ok((done.handled, done.deferred))
        })?,
    )?;
    module.set("stats", raw::function::<stats::Stats>(lua, &raw::runtime_box(lua, &runtime(lua)?)?)?)?;
    // Sends what waits for the next update now (RPC calls and pushes made between updates).
    module.set(
        "flush",
        lua.create_function(|lua, ()| {
            runtime(lua)?.driver.borrow_mut().flush_queued();
            Ok(())
        })?,
    )?;
    let side = if name == "luna" { Side::Server } else { Side::Client };
    module.set("close", lua.create_function(move |lua, ()| close_side(lua, side))?)?;
    ws::register(lua, module, side)?;
    rpc::register(lua, module, side)?;
    json::register(lua, module)?;
    if side == Side::Server {
        http::register(lua, module)?;
    }
    module.set("http", http::client::table(lua)?)?;
    module.set("spawn", lua.create_function(time::spawn)?)?;
    module.set("set_timeout", lua.create_function(time::set_timeout)?)?;
    module.set("set_interval", lua.create_function(time::set_interval)?)?;
    module.set(
        "set_error_handler",
        lua.create_function(|lua, handler: Value| {
            let key = match handler {
                Value::Nil => None,
                Value::Function(f) => Some(lua.create_registry_value(f)?),
                other => {
                    return Err(bad_arg("luna.set_error_handler(fn)", "fn", "a function or nil", &other))
                }
            };
            runtime(lua)?.sched.borrow_mut().error_handler = key;
            Ok(())
        })?,
    )?;
    for pair in lua_half(lua)?.pairs::<Value, Value>() {
        let (key, value) = pair?;
        module.set(key, value)?;
    }
    Ok(())
}

/// The table `lua/luna.lua` returns, built once per state.
fn lua_half(lua: &Lua) -> Result<Table> {
    const KEY: &str = "luna.lua_half";
    if let Value::Table(t) = lua.named_registry_value::<Value>(KEY)? {
        return Ok(t);
    }
    let core = lua.create_table()?;
    core.set("PARK", Value::LightUserData(sched::park_value()))?;
    core.set("DELIVERED", Value::LightUserData(sched::delivered_value()))?;
    let rt = runtime(lua)?;
    let boxed = raw::runtime_box(lua, &rt)?;
    core.set("now", raw::function::<time::Now>(lua, &boxed)?)?;
    core.set("sleep", lua.create_function(time::sleep)?)?;
    core.set("resolve", lua.create_function(resolve)?)?;
    ws::core(lua, &rt, &core)?;
    let (half, internal): (Table, Table) =
        lua.load(include_str!("../../lua/luna.lua")).set_name("=luna.lua").call(core.clone())?;
    let sockets = net::tables(lua, &rt, &core, &internal)?;
    for pair in sockets.pairs::<Value, Value>() {
        let (name, table) = pair?;
        half.set(name, table)?;
    }
    lua.set_named_registry_value(KEY, &half)?;
    for (name, constructor) in [
        ("luna.ws.new", "ws_new"),
        ("luna.ws_client_receive", "ws_client_receive"),
        ("luna.ws_client_wait", "ws_client_wait"),
        ("luna.net.stream", "net_stream"),
        ("luna.net.server", "net_server"),
        ("luna.net.udp", "net_udp"),
        ("luna.http.request", "http_request"),
        ("luna.join_fields", "join_fields"),
    ] {
        lua.set_named_registry_value(name, internal.get::<Function>(constructor)?)?;
    }
    Ok(half)
}

/// Builds (once per state) the module `name`, and makes the other module requirable from it so
/// a game that ships one file still gets both.
fn open_module(lua: &Lua, name: &'static str) -> Result<Table> {
    let key = format!("luna.module.{name}");
    if let Value::Table(t) = lua.named_registry_value::<Value>(&key)? {
        return Ok(t);
    }
    runtime(lua)?;
    let module = lua.create_table()?;
    fill_common(lua, &module, name)?;
    module.set("_VERSION", concat!("luna ", env!("CARGO_PKG_VERSION")))?;
    lua.set_named_registry_value(&key, &module)?;
    preload(lua)?;
    Ok(module)
}

pub fn open_luna(lua: &Lua) -> Result<Table> {
    open_module(lua, "luna")
}

pub fn open_lunac(lua: &Lua) -> Result<Table> {
    open_module(lua, "lunac")
}

/// Registers `luna` and `lunac` in `package.preload` (where not already loadable).
pub fn preload(lua: &Lua) -> Result<()> {
    let Value::Table(package) = lua.globals().get::<Value>("package")? else { return Ok(()) };
    let preload: Table = package.get("preload")?;
    let loaded: Table = package.get("loaded")?;
    for (name, open) in [("luna", open_luna as fn(&Lua) -> Result<Table>), ("lunac", open_lunac)] {
        if loaded.get::<Value>(name)?.is_nil() && preload.get::<Value>(name)?.is_nil() {
            let loader: Function = lua.create_function(move |lua, _: mlua::MultiValue| open(lua))?;
            preload.set(name, loader)?;
        }
    }
    Ok(())
}

#[cfg(feature = "module")]
#[mlua::lua_module(name = "luna")]
fn luna_module(lua: &Lua) -> Result<Table> {
    open_luna(lua)
}

#[cfg(feature = "module")]
#[mlua::lua_module(name = "lunac")]
fn lunac_module(lua: &Lua) -> Result<Table> {
    open_lunac(lua)
}
