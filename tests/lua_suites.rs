//! Runs the Lua test suites (tests/lua/*_suite.lua) in the vendored Lua this build links
//! (LuaJIT by default, Lua 5.4 with `--no-default-features --features lua54,vendored`), over
//! real sockets, driving the runtime the way a host does.
#![cfg(feature = "lua")]

use std::time::{Duration, Instant};

use mlua::{Lua, Table};

fn run_suite(suite: &str) {
    let lua = Lua::new();
    luna::bind::preload(&lua).unwrap();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/lua");
    let t: Table = lua
        .load(format!(
            r#"package.path = "{dir}/?.lua;" .. package.path
            local H = require("harness")
            local luna, lunac = require("luna"), require("lunac")
            local T = H.new(luna)
            require("{suite}")(T, luna, lunac)
            T.run()
            return T"#
        ))
        .call(())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !t.get::<bool>("finished").unwrap() {
        assert!(Instant::now() < deadline, "suite {suite} did not finish");
        if let Err(e) = luna::bind::tick(&lua, Some(Duration::from_millis(1))) {
            panic!("update raised: {}", luna::bind::error_text(&e));
        }
    }
    let (passed, failed): (u32, u32) = (t.get("passed").unwrap(), t.get("failed").unwrap());
    assert_eq!(failed, 0, "{failed} Lua test(s) failed in {suite}");
    assert!(passed > 0, "no Lua test ran in {suite}");
}

#[test]
fn runtime_suite() {
    run_suite("runtime_suite");
}

#[test]
fn ws_suite() {
    run_suite("ws_suite");
}

#[test]
fn net_suite() {
    run_suite("net_suite");
}

#[test]
fn rpc_suite() {
    run_suite("rpc_suite");
}

#[test]
fn http_app_suite() {
    run_suite("http_app_suite");
}

#[test]
fn reentry_suite() {
    run_suite("reentry_suite");
}

#[test]
fn http_suite() {
    run_suite("http_suite");
}

#[test]
fn http_request_suite() {
    run_suite("http_request_suite");
}
