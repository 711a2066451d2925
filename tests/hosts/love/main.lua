-- LÖVE 11.4 headless host test. First run: smoke-test the module, count open file descriptors,
-- restart the game (love.event.quit("restart") closes the Lua state). Second run: the runtime of
-- the first state must be gone (no more descriptors than in the first run at the same point),
-- then the full suites run.
local marker = assert(os.getenv("LUNA_LOVE_MARKER"), "set LUNA_LOVE_MARKER")
local suites = os.getenv("LUNA_SUITES") or "runtime_suite,ws_suite,rpc_suite,reentry_suite,net_suite,http_suite,http_app_suite,http_request_suite"
local ffi = require("ffi")
ffi.cdef("int getpid(void);")

local function open_fds()
  local p = io.popen("ls /proc/" .. ffi.C.getpid() .. "/fd")
  local n = 0
  for _ in p:lines() do n = n + 1 end
  p:close()
  return n
end

local luna = require("luna")
local lunac = require("lunac")
local f = io.open(marker, "r")
local first_run = f == nil
local fds_before = f and tonumber(f:read("*a"))
if f then f:close() end

local T, fds_now
local frames, smoke = 0, {}
-- The second run calls luna.stats every frame, as a game's debug overlay would, into one table.
local stats, stats_frames, stats_time, stats_error = nil, 0, 0, nil
local last_in, last_bytes, slowest_update = 0, 0, 0

local function check_stats()
  local t0 = luna.now()
  stats = luna.stats(stats)
  stats_time = stats_time + (luna.now() - t0)
  stats_frames = stats_frames + 1
  local u = stats.update
  if u.count < 1 or u.max < u.avg or u.last > u.max then
    stats_error = stats_error or ("update figures inconsistent: count %d, last %g, avg %g, max %g"):format(
      u.count, u.last, u.avg, u.max)
  end
  if stats.messages_in < last_in or stats.bytes_in < last_bytes then
    stats_error = stats_error or "a counter went down"
  end
  last_in, last_bytes = stats.messages_in, stats.bytes_in
  slowest_update = math.max(slowest_update, u.max)
end

function love.load()
  if first_run then
    luna.spawn(function()
      luna.sleep(0.05)
      smoke.slept = true
    end)
    luna.set_timeout(0.02, function() smoke.timer = true end)
    luna.set_interval(0.01, function() smoke.ticks = (smoke.ticks or 0) + 1 end)
  else
    -- Measured before the suites open sockets: the new runtime alone, as in the first run.
    fds_now = open_fds()
    T = require("harness").new(luna)
    for name in suites:gmatch("[^,]+") do
      require(name)(T, luna, lunac)
    end
    T.run()
  end
end

function love.update(dt)
  luna.update(dt)
  frames = frames + 1
  if first_run then
    if smoke.slept and smoke.timer and (smoke.ticks or 0) >= 3 then
      local out = assert(io.open(marker, "w"))
      out:write(tostring(open_fds()))
      out:close()
      print(("first run ok after %d frames: spawn, sleep, timers; restarting"):format(frames))
      love.event.quit("restart")
    end
  elseif not T.finished then
    check_stats()
  else
    local fds = fds_now
    local ok = T.failed == 0 and T.passed > 0
    if stats_error or stats_frames < 10 or stats.messages_in == 0 or stats.bytes_in == 0 then
      print(("not ok - luna.stats every frame: %s (%d frames, %d messages in)"):format(
        stats_error or "nothing counted", stats_frames, stats and stats.messages_in or 0))
      ok = false
    else
      print(("ok - luna.stats every frame: %d frames, %.1f us per call, %d messages and %d bytes in, slowest update %.1f ms"):format(
        stats_frames, stats_time / stats_frames * 1e6, stats.messages_in, stats.bytes_in, slowest_update * 1e3))
    end
    if fds > fds_before then
      print(("not ok - the first state's runtime leaked: %d descriptors open, %d before restart"):format(fds, fds_before))
      ok = false
    else
      print(("ok - restart closed the first runtime (%d descriptors, %d before)"):format(fds, fds_before))
    end
    love.event.quit(ok and 0 or 1)
  end
end
