//! `luna.update(dt, {budget, max_events})` against a real flood: an RPC server and client in one
//! Lua state over loopback, the server's handler busy for at least 1 ms per call.
#![cfg(feature = "vendored")]

use std::time::{Duration, Instant};

use mlua::{Function, Lua, ObjectLike, Table};

/// A server whose "t/work" handler spins 1 ms and logs its argument, a connected client, and
/// `state.flood(n)` making n `noawait_fetch` calls.
fn setup() -> (Lua, Table) {
    let lua = Lua::new();
    luna::bind::preload(&lua).unwrap();
    let state: Table = lua
        .load(
            r#"local luna, lunac = require("luna"), require("lunac")
            local state = { served = {}, answers = 0 }
            local app = luna.new_app({ name = "budget", host = "127.0.0.1", port = 0, debug = false })
            app:new_router({ prefix = "t" }):new({ prefix = "work", fun = function(args)
              local t = luna.now()
              while luna.now() - t < 0.001 do end
              state.served[#state.served + 1] = args[1]
              return args[1]
            end })
            local c = lunac.connect_to_app({ name = "budget", host = "127.0.0.1", port = app.port, no_errors = true })
            state.client = c
            function state.flood(n)
              for i = 1, n do
                c:noawait_fetch("t/work", function() state.answers = state.answers + 1 end, { i })
              end
            end
            function state.frame(opts)
              local t = luna.now()
              local handled, deferred = luna.update(1 / 60, opts)
              return handled, deferred, luna.now() - t
            end
            return state"#,
        )
        .eval()
        .unwrap();
    let client: Table = state.get("client").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client.call_method::<bool>("is_connected", ()).unwrap() {
        assert!(Instant::now() < deadline, "no connection");
        luna::bind::tick(&lua, Some(Duration::from_millis(1))).unwrap();
    }
    (lua, state)
}

fn served(state: &Table) -> Vec<i64> {
    state.get::<Table>("served").unwrap().sequence_values().map(Result::unwrap).collect()
}

#[test]
fn a_budgeted_update_stops_in_time_and_finishes_the_flood_in_order_on_later_frames() {
    let (lua, state) = setup();
    state.call_function::<()>("flood", 200).unwrap();
    let frame: Function = state.get("frame").unwrap();
    let opts = lua.create_table().unwrap();
    opts.set("budget", 0.002).unwrap();
    let (mut frames, mut cut, mut slowest) = (0, 0, 0.0f64);
    let mut before = 0;
    while state.get::<u32>("answers").unwrap() < 200 {
        frames += 1;
        assert!(frames < 2000, "the flood did not finish: {} served", served(&state).len());
        let (handled, deferred, took): (u64, u64, f64) = frame.call(&opts).unwrap();
        let now_served = served(&state).len();
        // Each handler takes >= 1 ms: a 2 ms budget starts at most two, plus the one running
        // when the budget ran out.
        assert!(now_served - before <= 3, "{} handlers ran in one 2 ms update", now_served - before);
        before = now_served;
        slowest = slowest.max(took);
        if deferred > 0 {
            cut += 1;
            assert!(handled > 0, "a cut update did something");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(served(&state), (1..=200).collect::<Vec<_>>(), "every call ran once, oldest first");
    assert!(cut >= 50, "the budget cut {cut} of {frames} updates");
    // Budget + one handler + room for a noisy machine; unbudgeted, this update took 200 ms.
    assert!(slowest < 0.05, "the slowest budgeted update took {:.1} ms", slowest * 1e3);
}

#[test]
fn max_events_leaves_the_rest_for_later_and_starves_no_kind_of_work() {
    let (lua, state) = setup();
    state.call_function::<()>("flood", 100).unwrap();
    let frame: Function = state.get("frame").unwrap();
    let opts = lua.create_table().unwrap();
    opts.set("max_events", 3).unwrap();
    let (mut frames, mut armed, mut before) = (0, false, 0);
    while state.get::<u32>("answers").unwrap() < 100 {
        frames += 1;
        assert!(frames < 3000, "the flood did not finish");
        let (_, deferred, _): (u64, u64, f64) = frame.call(&opts).unwrap();
        let now_served = served(&state).len();
        assert!(now_served - before <= 3, "max_events = 3 ran {} handlers", now_served - before);
        before = now_served;
        if !armed && now_served > 0 && deferred > 0 {
            // A backlog exists: a timer and a waking coroutine must not wait for it to clear.
            armed = true;
            lua.load(
                r#"local luna, state = require("luna"), ...
                state.armed_at = #state.served
                luna.set_timeout(0, function() state.timer_at = #state.served end)
                luna.spawn(function() luna.sleep(0); state.slept_at = #state.served end)"#,
            )
            .call::<()>(&state)
            .unwrap();
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    assert!(armed, "the flood never built a backlog");
    assert_eq!(served(&state), (1..=100).collect::<Vec<_>>(), "every call ran once, in order");
    let armed_at: u32 = state.get("armed_at").unwrap();
    for what in ["timer_at", "slept_at"] {
        let at: Option<u32> = state.get(what).unwrap();
        // Taking turns, the timer and the coroutine run within a few updates, while most of
        // the flood still waits; behind it they would run after all 100.
        assert!(at.is_some_and(|n| n < armed_at + 20 && n < 100), "{what}: {at:?} (armed at {armed_at})");
    }
    // Unbudgeted updates do everything as before and report nothing deferred.
    state.call_function::<()>("flood", 20).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while state.get::<u32>("answers").unwrap() < 120 {
        assert!(Instant::now() < deadline, "the last calls were not answered");
        let (_, deferred, _): (u64, u64, f64) = frame.call(()).unwrap();
        assert_eq!(deferred, 0);
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_tiny_budget_still_makes_progress() {
    let (lua, state) = setup();
    state.call_function::<()>("flood", 10).unwrap();
    let frame: Function = state.get("frame").unwrap();
    let opts = lua.create_table().unwrap();
    opts.set("budget", 1e-9).unwrap();
    let mut frames = 0;
    while state.get::<u32>("answers").unwrap() < 10 {
        frames += 1;
        assert!(frames < 5000, "no progress: {} served", served(&state).len());
        let (handled, _, _): (u64, u64, f64) = frame.call(&opts).unwrap();
        assert!(handled <= 1, "a spent budget runs one unit, ran {handled}");
        std::thread::sleep(Duration::from_micros(100));
    }
    assert_eq!(served(&state), (1..=10).collect::<Vec<_>>());
}

#[test]
fn update_options_are_checked() {
    let (lua, _state) = setup();
    for (opts, want) in [
        ("{ budget = 0 }", "luna.update(dt): 'budget' must be a number of seconds > 0, got number"),
        ("{ budget = 'x' }", "'budget' must be a number of seconds > 0, got string"),
        ("{ max_events = 0.5 }", "'max_events' must be an integer >= 1, got number"),
        ("{ budjet = 1 }", "luna.update(dt): unknown option 'budjet' (use budget, max_events)"),
        ("5", "'opts' must be a table or nil"),
    ] {
        let err = lua.load(format!("require('luna').update(0, {opts})")).exec().unwrap_err();
        let text = luna::bind::error_text(&err);
        assert!(text.contains(want), "{opts}: {text}");
    }
}
