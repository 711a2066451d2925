-- Frame-paced RPC load for benches/rpc_frames.sh (issue 14), run by Debian's luajit with the
-- built module, the way a LÖVE game runs: a 60 Hz loop that calls update once a frame and sleeps
-- until the next frame. Under luna-host (Lua 5.4: no ffi) it waits for the next frame in a busy
-- loop instead (the process has its core to itself; nothing else is timed meanwhile).
--   luajit benches/rpc_frames.lua MODULE_DIR server PORT SECONDS
--   luajit benches/rpc_frames.lua MODULE_DIR client PORT SECONDS N WARMUP
--   luna-host benches/rpc_frames.lua - server|client ... (the same arguments)
-- The server answers "bench/echo" with its argument {"hello world"}[1] and times every luna.update. The client
-- issues N client:noawait_fetch calls per frame (an 11-byte string argument, encrypted) and times
-- its frame's networking: the N calls plus lunac.update (which runs the answers' callbacks).
-- Both print "RESULT p50_ms=… p99_ms=… max_ms=…" over their frames after WARMUP s (the server:
-- frames after its first 1.5 s), the client also calls issued and answered.
local dir, role, port, seconds = arg[1], arg[2], tonumber(arg[3]), tonumber(arg[4])
package.cpath = dir .. "/?.so;" .. package.cpath
local has_ffi, ffi = pcall(require, "ffi")
if has_ffi then
  ffi.cdef("int usleep(unsigned int usec);")
end
local luna, lunac = require("luna"), require("lunac")

local function usleep(us)
  if has_ffi then
    ffi.C.usleep(us)
  else
    local until_ = luna.now() + us / 1e6
    repeat until luna.now() >= until_
  end
end

local FRAME = 1 / 60
local samples = {}

local function report(extra)
  table.sort(samples)
  local n = #samples
  local function at(q) return n > 0 and samples[math.min(n, math.floor(n * q) + 1)] * 1e3 or 0 end
  print(("RESULT frames=%d p50_ms=%.3f p99_ms=%.3f max_ms=%.3f%s"):format(
    n, at(0.50), at(0.99), n > 0 and samples[n] * 1e3 or 0, extra or ""))
end

-- Sleeps until `t` (luna.now() seconds).
local function sleep_until(t)
  local left = t - luna.now()
  if left > 0 then usleep(math.floor(left * 1e6)) end
end

if role == "server" then
  local app = luna.new_app({
    name = "frames", host = "127.0.0.1", port = port, debug = false,
    max_ip_connected = 10000, disconnect_time = 3600,
    timeout_client = function() return false end,
  })
  app:new_router({ prefix = "bench" }):new({ prefix = "echo", fun = function(args) return args[1] end })
  io.stdout:write("ready\n")
  io.stdout:flush()
  local start = luna.now()
  local next_frame = start
  while luna.now() - start < seconds do
    local t0 = luna.now()
    luna.update(FRAME)
    if t0 - start > 1.5 then samples[#samples + 1] = luna.now() - t0 end
    next_frame = next_frame + FRAME
    sleep_until(next_frame)
  end
  report()
  luna.close()
  return
end

local per_frame, warmup = tonumber(arg[5]), tonumber(arg[6])
local client = lunac.connect_to_app({ name = "frames", host = "127.0.0.1", port = port, no_errors = true })
local deadline = luna.now() + 10
while not client:is_connected() do
  lunac.update(FRAME)
  usleep(1000)
  if luna.now() > deadline then error("rpc_frames: no connection") end
end
local ARGS = { "hello world" } -- an 11-byte string
local issued, answered, failed = 0, 0, 0
local function on_answer(data, err)
  if data == "hello world" then answered = answered + 1 else failed = failed + 1 end
end
local start = luna.now()
local next_frame = start
while luna.now() - start < seconds do
  local t0 = luna.now()
  for _ = 1, per_frame do
    client:noawait_fetch("bench/echo", on_answer, ARGS)
  end
  issued = issued + per_frame
  lunac.update(FRAME)
  if t0 - start >= warmup then samples[#samples + 1] = luna.now() - t0 end
  next_frame = next_frame + FRAME
  sleep_until(next_frame)
end
-- The last frames' answers.
deadline = luna.now() + 2
while answered + failed < issued and luna.now() < deadline do
  lunac.update(FRAME)
  usleep(1000)
end
report((" issued=%d answered=%d failed=%d"):format(issued, answered, failed))
lunac.close()
