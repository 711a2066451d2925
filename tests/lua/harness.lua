-- A tiny test harness that runs in every host (vendored LuaJIT/5.4, Debian luajit and lua5.1,
-- LÖVE). Tests run one after another, each in its own luna coroutine, so they may wait.
-- No pcall around waiting code (PUC 5.1 cannot yield across pcall): failures are caught by
-- luna.set_error_handler. The summary line is "N passed, M failed".
local H = {}

function H.new(luna)
  local T = { tests = {}, passed = 0, failed = 0, finished = false }
  local current

  local function report(ok, name, err)
    if ok then
      T.passed = T.passed + 1
      print("ok - " .. name)
    else
      T.failed = T.failed + 1
      print("not ok - " .. name .. "\n    " .. tostring(err):gsub("\n", "\n    "))
    end
  end

  -- Registers a test; `fn` runs in a coroutine and may wait. Default limit 5 s.
  function T.test(name, fn, limit)
    T.tests[#T.tests + 1] = { name = name, fn = fn, limit = limit or 5 }
  end

  -- Runs `fn` right now, outside any coroutine (for "called outside a coroutine" checks).
  function T.main(name, fn)
    local ok, err = pcall(fn)
    report(ok, name, err)
  end

  function T.eq(got, want, what)
    if got ~= want then
      error(("%s: expected %s, got %s"):format(what or "value", tostring(want), tostring(got)), 2)
    end
  end

  function T.ok(cond, what)
    if not cond then
      error(what or "assertion failed", 2)
    end
  end

  -- Asserts `fn(...)` raises an error whose text contains every given plain string.
  function T.raises(parts, fn, ...)
    local ok, err = pcall(fn, ...)
    if ok then
      error("expected an error containing '" .. parts[1] .. "'", 2)
    end
    for _, part in ipairs(parts) do
      if not tostring(err):find(part, 1, true) then
        error(("error '%s' does not contain '%s'"):format(tostring(err), part), 2)
      end
    end
    return tostring(err)
  end

  -- Waits (in a coroutine) until `cond()` is true or `limit` seconds pass.
  function T.wait_until(cond, limit, what)
    local deadline = luna.now() + (limit or 2)
    while not cond() do
      if luna.now() > deadline then
        error("timed out waiting for " .. (what or "condition"), 2)
      end
      luna.sleep(0.001)
    end
  end

  local function capture(err)
    if current then
      current.err = current.err or err
    else
      print("error outside a test: " .. tostring(err))
      T.failed = T.failed + 1
    end
  end

  -- Puts the harness's error handler back after a test replaced it.
  function T.restore_handler()
    luna.set_error_handler(capture)
  end

  function T.run()
    luna.set_error_handler(capture)
    luna.spawn(function()
      for _, t in ipairs(T.tests) do
        current = t
        local deadline = luna.now() + t.limit
        luna.spawn(function()
          t.fn()
          t.done = true
        end)
        while not t.done and not t.err and luna.now() < deadline do
          luna.sleep(0.001)
        end
        current = nil
        if t.err then
          report(false, t.name, t.err)
        elseif not t.done then
          report(false, t.name, "timed out after " .. t.limit .. " s")
        else
          report(true, t.name)
        end
      end
      print(("%d passed, %d failed"):format(T.passed, T.failed))
      T.finished = true
    end)
  end

  return T
end

return H
