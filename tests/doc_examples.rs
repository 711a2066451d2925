//! Every Lua block of docs/api.md and README.md runs, so a documentation example cannot rot.
//! A block's info string says how (documented at the top of docs/api.md):
//! - `lua runnable`: a chunk at top level;
//! - `lua runnable=<context>`: spliced into one of the contexts below, which give it the
//!   variables it uses (`ws`, `app`, `client`, `api`, `s`);
//! - `lua fragment`: not run (a block with neither marker fails this test).
//!
//! Each block gets a fresh Lua state with `luna` and `lunac` as globals and an empty `love`
//! table (`love.load()` is called once, `love.update(dt)` every frame when defined), and runs
//! until nothing is pending or a second passed. Any error fails it: loading, running, raised out
//! of an update, or in a callback. The blocks run in parallel, one thread and state each.
#![cfg(feature = "vendored")]

use std::time::{Duration, Instant};

use mlua::{Lua, Value};

/// How long a block may keep the runtime busy (timers, servers) before it is stopped.
const LIMIT: Duration = Duration::from_secs(1);

struct Block {
    file: &'static str,
    line: usize,
    context: String,
    code: String,
}

/// The Lua blocks of a Markdown file, with their markers.
fn blocks(file: &'static str) -> Vec<Block> {
    let text = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let Some(info) = line.trim_start().strip_prefix("```") else { continue };
        let indent = line.len() - line.trim_start().len();
        let mut code = String::new();
        for (_, body) in lines.by_ref() {
            if body.trim_start() == "```" {
                break;
            }
            code.push_str(body.get(indent..).unwrap_or(body.trim_start()));
            code.push('\n');
        }
        let mut words = info.split_whitespace();
        if words.next() != Some("lua") {
            continue;
        }
        let context = match words.next() {
            Some("runnable") => "top".to_string(),
            Some(w) if w.starts_with("runnable=") => w["runnable=".len()..].to_string(),
            Some("fragment") => continue,
            other => panic!(
                "{file}:{}: a Lua block must be marked `lua runnable[=context]` or `lua fragment`, got {other:?}",
                i + 1
            ),
        };
        out.push(Block { file, line: i + 1, context, code });
    }
    out
}

/// The code around a block: (before, after). `before` has no line break, so the block's line
/// numbers in error messages are its own.
fn context(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        "top" => ("", ""),
        // The body of a WebSocket handler; a client connects, sends "hello", closes after 0.3 s.
        "ws" => (
            r#"local app; app = luna.new_web_app({ name = "doc web app", host = "127.0.0.1", port = 0, debug = false, protocols = { default = function(ws) __doc_started = true; "#,
            r#"
            __doc_done = true end } })
            lunac.connect_to_web_app({ name = "doc web client", debug = false,
              url = "ws://127.0.0.1:" .. app.port .. "/chat?room=1",
              on_connect = function(self) self:send("hello"); luna.set_timeout(0.3, function() self:close() end) end })"#,
        ),
        // Inside `on_connect` of the web client `client` ("lobby") of an echo server.
        "ws-client" => (
            r#"local client; local server = luna.new_web_app({ name = "doc echo", host = "127.0.0.1", port = 0, debug = false, protocols = { default = function(ws) while true do local m, op = ws:receive(); if not m then return end; ws:send(m, op) end end } }); client = lunac.connect_to_web_app({ name = "lobby", url = "ws://127.0.0.1:" .. server.port .. "/", debug = false, on_connect = function() __doc_started = true; "#,
            r#"
            __doc_done = true end })"#,
        ),
        // The body of `new_client(client)` of the RPC app `app`, whose router `api` serves "echo".
        "rpc-server" => (
            r#"local api, app; app = luna.new_app({ name = "doc app", port = 0, debug = false, new_client = function(client) __doc_started = true; "#,
            r#"
            __doc_done = true end })
            api = app:new_router({ prefix = "api" })
            api:new({ prefix = "echo", fun = function(args) return args.text end })
            lunac.connect_to_app({ name = "doc client", host = "127.0.0.1", port = app.port, debug = false })"#,
        ),
        // A coroutine in which `client` ("My Client") is connected to an app serving
        // "api/echo" and "default/ping".
        "rpc-client" => (
            r#"local app = luna.new_app({ name = "doc app", port = 0, debug = false }); app:new_router({ prefix = "api" }):new({ prefix = "echo", fun = function(args) return args.text end }); app:new_router({ prefix = "default" }):new({ prefix = "ping", fun = function() end }); local client = lunac.connect_to_app({ name = "My Client", host = "127.0.0.1", port = app.port, debug = false }); luna.spawn(function() while not client:is_connected() do luna.sleep(0.01) end; __doc_started = true; "#,
            r#"
            __doc_done = true end)"#,
        ),
        // A coroutine in which `s` is a TCP stream connected to an echo server.
        "stream" => (
            r#"local echo = luna.tcp.listen({ host = "127.0.0.1", port = 0, on_connection = function(c) while true do local d = c:read(); if not d then return end; c:write(d) end end }); luna.spawn(function() local s = assert(luna.tcp.connect("127.0.0.1", echo.port)); __doc_started = true; "#,
            r#"
            __doc_done = true end)"#,
        ),
        _ => return None,
    })
}

const PRELUDE: &str = r##"
luna, lunac = require("luna"), require("lunac")
love = {}
__doc_output = {}
function print(...)
  local parts = {}
  for i = 1, select("#", ...) do parts[i] = tostring(select(i, ...)) end
  __doc_output[#__doc_output + 1] = table.concat(parts, "\t")
end
"##;

/// Runs a block; the error says what failed, followed by what the block printed.
fn run(block: &Block) -> Result<(), String> {
    let lua = Lua::new();
    let result = run_in(&lua, block);
    result.map_err(|e| {
        let printed: Vec<String> = lua
            .globals()
            .get::<mlua::Table>("__doc_output")
            .map(|t| t.sequence_values::<String>().filter_map(Result::ok).collect())
            .unwrap_or_default();
        if printed.is_empty() {
            e
        } else {
            format!("{e}\nit printed:\n{}", printed.join("\n"))
        }
    })
}

fn run_in(lua: &Lua, block: &Block) -> Result<(), String> {
    let (before, after) =
        context(&block.context).ok_or_else(|| format!("unknown context '{}'", block.context))?;
    let text = |e: mlua::Error| luna::bind::error_text(&e);
    luna::bind::preload(lua).map_err(text)?;
    lua.load(PRELUDE).exec().map_err(text)?;
    let love: mlua::Table = lua.globals().get("love").map_err(text)?;
    let source = format!("{before}{}{after}", block.code);
    lua.load(source).set_name(format!("={}:{}", block.file, block.line)).exec().map_err(text)?;
    if let Value::Function(load) = love.get::<Value>("load").map_err(text)? {
        load.call::<()>(()).map_err(text)?;
    }
    let deadline = Instant::now() + LIMIT;
    let mut done_at = None;
    while Instant::now() < deadline {
        match love.get::<Value>("update").map_err(text)? {
            Value::Function(update) => {
                update.call::<()>(1.0 / 60.0).map_err(text)?;
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {
                if block.context == "top" && !luna::bind::pending(lua).map_err(text)? {
                    break;
                }
                luna::bind::tick(lua, Some(Duration::from_millis(5))).map_err(text)?;
            }
        }
        // A context block that finished gets a moment for what it set in motion.
        if done_at.is_none() && lua.globals().get::<bool>("__doc_done").unwrap_or(false) {
            done_at = Some(Instant::now());
        }
        if done_at.is_some_and(|at| at.elapsed() > Duration::from_millis(200)) {
            break;
        }
    }
    if block.context != "top" && !lua.globals().get::<bool>("__doc_started").map_err(text)? {
        return Err(format!("its context '{}' never ran it", block.context));
    }
    luna::bind::close(lua).map_err(text)?;
    luna::bind::tick(lua, Some(Duration::from_millis(5))).map_err(text)
}

#[test]
fn every_marked_lua_block_of_the_docs_runs() {
    let all: Vec<Block> = ["docs/api.md", "README.md"].into_iter().flat_map(blocks).collect();
    assert!(all.len() >= 40, "only {} runnable blocks found: were the markers dropped?", all.len());
    let results: Vec<(String, Result<(), String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = all
            .iter()
            .map(|block| {
                scope.spawn(move || {
                    let label = format!("{}:{} ({})", block.file, block.line, block.context);
                    (label, run(block))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let failures: Vec<String> =
        results.iter().filter_map(|(label, r)| r.as_ref().err().map(|e| format!("{label}: {e}"))).collect();
    assert!(
        failures.is_empty(),
        "{} of {} doc blocks failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n\n")
    );
}

#[test]
fn a_block_that_raises_fails() {
    let block = |code: &str| Block { file: "test", line: 1, context: "top".into(), code: code.into() };
    // The issue's example: luna.sleep at top level.
    let err = run(&block("local t0 = luna.now(); luna.sleep(0.25); print(luna.now() - t0)\n")).unwrap_err();
    assert!(err.contains("must be called inside a coroutine"), "{err}");
    let err =
        run(&block("print('before'); luna.set_timeout(0, function() error('late') end)\n")).unwrap_err();
    assert!(err.contains("late") && err.contains("it printed:\nbefore"), "{err}");
    let never = Block { context: "ws".into(), ..block("do return end\n") };
    assert!(run(&never).is_ok(), "a block may return early");
    assert!(run(&block("if x then ... end\n")).is_err(), "a syntax error fails");
}
