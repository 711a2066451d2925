-- The foundation's behaviour: coroutines, sleep, timers, resolve, error policy, misuse errors.
-- Runs in every host through harness.lua.
return function(T, luna, lunac)
  T.main("both modules load and expose the runtime", function()
    for _, m in ipairs({ luna, lunac }) do
      for _, name in ipairs({ "update", "close", "spawn", "sleep", "set_timeout", "set_interval",
                              "resolve", "now", "set_error_handler" }) do
        T.eq(type(m[name]), "function", name)
      end
    end
    T.eq(require("luna"), luna, "require('luna') is cached")
    T.eq(require("lunac"), lunac, "require('lunac') is cached")
  end)

  T.main("waiting calls outside a coroutine name the call and the fix", function()
    T.raises({ "luna.sleep(seconds) must be called inside a coroutine", "luna.spawn(function()" },
      luna.sleep, 0.1)
    T.raises({ "luna.resolve(host) must be called inside a coroutine" }, luna.resolve, "localhost")
  end)

  T.main("misuse errors name the call, the argument and what was expected", function()
    T.raises({ "luna.spawn(fn, ...)", "'fn' must be a function, got nil" }, luna.spawn)
    T.raises({ "luna.set_timeout(seconds, fn)", "'seconds' must be a number of seconds, got string" },
      luna.set_timeout, "1", function() end)
    T.raises({ "luna.set_timeout(seconds, fn)", "'fn' must be a function, got nil" }, luna.set_timeout, 1)
    T.raises({ "luna.set_interval(seconds, fn)", "'seconds' must be a number of seconds from 0 to 1e9, got -1" },
      luna.set_interval, -1, function() end)
    -- Huge delays are refused (they would overflow the clock), not a crash.
    T.raises({ "luna.set_timeout(seconds, fn)", "from 0 to 1e9, got 1e300" }, luna.set_timeout, 1e300, function() end)
    T.raises({ "luna.set_interval(seconds, fn)", "got inf" }, luna.set_interval, 1 / 0, function() end)
    T.raises({ "luna.update(dt)", "'dt' must be a number or nil, got string" }, luna.update, "x")
    T.raises({ "lunac.update(dt)", "'dt' must be a number or nil, got table" }, lunac.update, {})
    T.raises({ "luna.set_error_handler(fn)", "'fn' must be a function or nil, got number" },
      luna.set_error_handler, 5)
    T.raises({ "luna.sleep(seconds)", "must be a number >= 0, got abc" }, luna.sleep, "abc")
    T.raises({ "luna.resolve(host)", "'host' must be a string, got number" }, luna.resolve, 5)
  end)

  T.test("spawn runs at once until the first wait, with its arguments", function()
    local trace = {}
    local co = luna.spawn(function(a, b)
      trace[#trace + 1] = a .. b
      luna.sleep(0)
      trace[#trace + 1] = "after"
    end, "x", "y")
    T.eq(type(co), "thread", "spawn returns the coroutine")
    T.eq(trace[1], "xy", "ran synchronously")
    T.eq(trace[2], nil, "stopped at the wait")
    T.wait_until(function() return trace[2] == "after" end, 1, "resume after sleep(0)")
    T.eq(coroutine.status(co), "dead", "finished")
  end)

  T.test("sleep waits on the monotonic clock while others run", function()
    local start = luna.now()
    local other = 0
    luna.spawn(function()
      while luna.now() - start < 0.1 do
        other = other + 1
        luna.sleep(0.01)
      end
    end)
    luna.sleep(0.15)
    local waited = luna.now() - start
    T.ok(waited >= 0.15, "slept at least 0.15 s, got " .. waited)
    T.ok(waited < 1, "woke up promptly, got " .. waited)
    T.ok(other >= 3, "the other coroutine ran meanwhile (" .. other .. " times)")
  end)

  T.test("a bare coroutine.yield() in a library coroutine resumes on the next update", function()
    local steps = 0
    luna.spawn(function()
      for _ = 1, 3 do
        coroutine.yield()
        steps = steps + 1
      end
    end)
    T.eq(steps, 0, "nothing ran before an update")
    T.wait_until(function() return steps == 3 end, 1, "three frame-yields")
  end)

  T.test("set_timeout fires once; cancel before it fires prevents it", function()
    local fired, cancelled_fired = 0, false
    local t0 = luna.now()
    local at
    local timer = luna.set_timeout(0.05, function(handle)
      fired = fired + 1
      at = luna.now()
      T.eq(handle:active(), false, "a one-shot is no longer active in its callback")
    end)
    T.eq(tostring(timer):match("^luna.timer"), "luna.timer", "tostring")
    T.eq(timer:active(), true, "active before firing")
    local doomed = luna.set_timeout(0.02, function() cancelled_fired = true end)
    T.eq(doomed:cancel(), true, "cancel reports it was scheduled")
    T.eq(doomed:cancel(), false, "second cancel is a no-op")
    luna.sleep(0.15)
    T.eq(fired, 1, "fired exactly once")
    T.ok(at - t0 >= 0.05, "not early")
    T.eq(cancelled_fired, false, "cancelled timer never fired")
    T.eq(timer:cancel(), false, "cancel after firing")
  end)

  T.test("set_interval repeats on cadence and can cancel itself from its callback", function()
    local times = {}
    local t0 = luna.now()
    luna.set_interval(0.03, function(handle)
      times[#times + 1] = luna.now() - t0
      if #times == 4 then
        T.eq(handle:cancel(), true, "cancel from inside")
      end
    end)
    luna.sleep(0.3)
    T.eq(#times, 4, "stopped after cancel")
    for i, t in ipairs(times) do
      T.ok(t >= 0.03 * i - 1e-6, ("run %d not early (%.4f)"):format(i, t))
    end
  end)

  T.test("timer callbacks run in coroutines and may wait", function()
    local result
    luna.set_timeout(0, function()
      luna.sleep(0.02)
      result = "slept inside a timer"
    end)
    T.wait_until(function() return result end, 1, "timer callback to finish")
  end)

  T.test("timers follow the monotonic clock, not dt", function()
    local fired = false
    luna.set_timeout(0.2, function() fired = true end)
    luna.update(1000) -- a huge dt must not make the timer fire early
    lunac.update(1000)
    T.eq(fired, false, "not fired by a large dt")
    T.wait_until(function() return fired end, 1, "timer on wall time")
  end)

  T.test("luna and lunac drive the same runtime", function()
    local fired = false
    luna.set_timeout(0, function() fired = true end)
    local deadline = luna.now() + 1
    while not fired and luna.now() < deadline do
      lunac.update(0) -- nested update from inside a coroutine is allowed too
    end
    T.eq(fired, true, "a luna timer fired from lunac.update")
  end)

  T.test("resolve: literals at once, names off-thread, failures as nil, err", function()
    local v4 = luna.resolve("127.0.0.1")
    T.eq(v4[1], "127.0.0.1", "IPv4 literal")
    T.eq(luna.resolve("::1")[1], "::1", "IPv6 literal")
    T.eq(luna.resolve("[::1]")[1], "::1", "bracketed IPv6 literal")
    local local_ips = luna.resolve("localhost")
    T.ok(#local_ips >= 1, "localhost has addresses")
    for _, ip in ipairs(local_ips) do
      T.ok(ip == "::1" or ip:match("^127%."), "loopback address " .. ip)
    end
    local again = luna.resolve("localhost")
    T.eq(again[1], local_ips[1], "cached")
    local none, err = luna.resolve("no-such-host.invalid")
    T.eq(none, nil, "unknown host gives nil")
    T.ok(err:find("no-such-host.invalid", 1, true), "error names the host: " .. tostring(err))
  end, 15)

  T.test("errors in coroutines go to the error handler with a traceback", function()
    local seen = {}
    luna.set_error_handler(function(err) seen[#seen + 1] = err end)
    luna.spawn(function()
      luna.sleep(0)
      error("boom in spawn")
    end)
    luna.set_timeout(0, function() error("boom in timer") end)
    T.wait_until(function() return #seen == 2 end, 1, "two errors")
    table.sort(seen)
    T.ok(seen[1]:find("boom in spawn", 1, true), seen[1])
    T.ok(seen[1]:find("traceback", 1, true), "traceback included: " .. seen[1])
    T.ok(seen[2]:find("boom in timer", 1, true), seen[2])
    T.restore_handler()
  end)

  T.test("without a handler, errors raise out of update and nothing else is lost", function()
    luna.set_error_handler(nil)
    local survivor = false
    luna.spawn(function()
      luna.sleep(0.01)
      error("raised out of update")
    end)
    luna.spawn(function()
      luna.sleep(0.01)
      survivor = true
    end)
    local t0 = luna.now()
    while luna.now() - t0 < 0.05 do end -- both sleepers become due in the same update
    local ok, err = pcall(luna.update)
    T.restore_handler()
    T.eq(ok, false, "update raised")
    T.ok(tostring(err):find("raised out of update", 1, true), tostring(err))
    T.wait_until(function() return survivor end, 1, "the other coroutine still ran")
    luna.set_error_handler(nil)
    local ok2, err2 = pcall(luna.spawn, function() error("first run") end)
    T.restore_handler()
    T.eq(ok2, false, "an error before the first wait raises out of spawn")
    T.ok(tostring(err2):find("first run", 1, true), tostring(err2))
  end)
end
