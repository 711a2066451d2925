//! `luna-host`: runs a Luna script without LÖVE (dedicated servers, tools).
//!
//! The script runs once with `luna`/`lunac` preloaded; then the runtime ticks. I/O and timers
//! are handled as soon as they are ready (the host sleeps in the poll, it never spins), and a
//! global `update(dt)` is called at a fixed rate. The host exits when nothing is pending and the
//! script either called `luna.close()` or defines no `update`; on SIGINT/SIGTERM it calls a
//! global `quit()` if there is one, closes everything and exits 0.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::{Function, Lua, MultiValue, Value};

const USAGE: &str = "usage: luna-host [--hz N] script.lua [args...]
  --hz N      rate of the global update(dt) calls (default 60)
  --help      print this help and exit
  --version   print the version and exit";

/// Longest sleep in the poll, so a signal is noticed promptly even if it did not interrupt it.
const MAX_WAIT: Duration = Duration::from_millis(250);

struct Options {
    hz: f64,
    script: String,
    args: Vec<String>,
}

/// What the command line asks for.
enum Command {
    Run(Options),
    /// Print this on standard output and exit 0 (`--help`, `--version`).
    Print(String),
}

/// The command, or a usage error (printed on standard error, exit status 2).
fn parse_args() -> Result<Command, String> {
    let mut args = std::env::args().skip(1);
    let mut hz = 60.0;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Print(USAGE.into())),
            "-V" | "--version" => {
                return Ok(Command::Print(format!("luna-host {}", env!("CARGO_PKG_VERSION"))))
            }
            "--hz" => {
                let value = args.next().ok_or("--hz needs a value")?;
                hz = value.parse().map_err(|_| format!("--hz: '{value}' is not a number"))?;
                if !(0.01..=10_000.0).contains(&hz) {
                    return Err(format!("--hz must be from 0.01 to 10000, got {value}"));
                }
            }
            _ if arg.starts_with('-') => return Err(format!("unknown option '{arg}'\n{USAGE}")),
            _ => return Ok(Command::Run(Options { hz, script: arg, args: args.collect() })),
        }
    }
    Err(format!("no script given\n{USAGE}"))
}

fn global_function(lua: &Lua, name: &str) -> mlua::Result<Option<Function>> {
    match lua.globals().get::<Value>(name)? {
        Value::Function(f) => Ok(Some(f)),
        _ => Ok(None),
    }
}

fn run(options: Options) -> mlua::Result<()> {
    // SAFETY: the full standard library (debug, ffi) is what a script expects of a Lua host.
    let lua = unsafe { Lua::unsafe_new() };
    luna::bind::preload(&lua)?;
    let arg = lua.create_table()?;
    arg.set(0, options.script.as_str())?;
    for (i, a) in options.args.iter().enumerate() {
        arg.set(i + 1, a.as_str())?;
    }
    lua.globals().set("arg", arg)?;
    // Logs of a dedicated server usually go to a pipe (systemd, docker): flush them per line.
    lua.load("io.stdout:setvbuf('line')").exec()?;

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).map_err(mlua::Error::external)?;
    }

    let script_args: MultiValue =
        options.args.iter().map(|a| lua.create_string(a).map(Value::String)).collect::<mlua::Result<_>>()?;
    let source = std::fs::read(&options.script)
        .map_err(|e| mlua::Error::external(format!("cannot read {}: {e}", options.script)))?;
    lua.load(source).set_name(format!("@{}", options.script)).call::<()>(script_args)?;

    let frame = Duration::from_secs_f64(1.0 / options.hz);
    let mut next_frame = Instant::now() + frame;
    let mut last_update = Instant::now();
    // Looked up once a frame, not once a tick (the script may define or drop it at any time).
    let mut update = global_function(&lua, "update")?;
    loop {
        if stop.load(Ordering::Relaxed) {
            if let Some(quit) = global_function(&lua, "quit")? {
                quit.call::<()>(())?;
            }
            luna::bind::close(&lua)?;
            return Ok(());
        }
        let state = luna::bind::host_state(&lua)?;
        if !state.pending && (update.is_none() || state.close_requested) {
            return Ok(());
        }
        let now = Instant::now();
        let mut wake = now + MAX_WAIT;
        if update.is_some() {
            wake = wake.min(next_frame);
        }
        if let Some(at) = state.wake {
            wake = wake.min(at);
        }
        luna::bind::tick(&lua, Some(wake.saturating_duration_since(now)))?;
        let now = Instant::now();
        if now >= next_frame {
            update = global_function(&lua, "update")?;
            if let Some(update) = &update {
                update.call::<()>((now - last_update).as_secs_f64())?;
                last_update = now;
            }
            next_frame += frame;
            if next_frame <= now {
                // Fell behind (a slow frame): keep the rate, do not burst.
                next_frame = now + frame;
            }
        }
    }
}

/// Keeps freed memory of up to this size in the heap for reuse (glibc's default gives back every
/// allocation over 128 KiB–32 MiB to the kernel, so each large WebSocket message paid a page
/// fault per 4 KiB of every buffer it passed through: half the time of a 4 MiB echo).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    const MMAP_THRESHOLD: libc::c_int = 32 << 20;
    const TRIM_THRESHOLD: libc::c_int = 128 << 20;
    // An operator's own malloc tunables win.
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc")) {
        return;
    }
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() -> ExitCode {
    tune_malloc();
    let options = match parse_args() {
        Ok(Command::Run(options)) => options,
        Ok(Command::Print(text)) => {
            println!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(text) => {
            eprintln!("{text}");
            return ExitCode::from(2);
        }
    };
    match run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("luna-host: {}", luna::bind::error_text(&e));
            ExitCode::FAILURE
        }
    }
}
