-- RPC echo load generator for benches/rpc_echo.sh, measuring Luna with Luna:
--   luna-host benches/rpc_echo_client.lua PORT SIZE WARMUP DURATION SERVER_PID [on|off] [--pipeline K]
-- Connects with lunac.connect_to_app, then K coroutines (default 1) each call
-- client:fetch("bench/echo", {data = <SIZE bytes>}) in a loop; after WARMUP seconds every call's
-- round trip (luna.now() before and after fetch) is recorded for DURATION seconds. Prints
-- "RESULT rate=… p50_us=… p99_us=… client_cpu=… server_cpu=… others_cpu=…" (CPU in % of one core,
-- from /proc/PID/stat over the measured window; others = the rest of the machine, /proc/stat).
local luna, lunac = require("luna"), require("lunac")

local positional, pipeline = {}, 1
do
  local i = 1
  while arg[i] do
    if arg[i] == "--pipeline" then
      pipeline = assert(tonumber(arg[i + 1]), "--pipeline K")
      i = i + 2
    else
      positional[#positional + 1] = arg[i]
      i = i + 1
    end
  end
end
local port = assert(tonumber(positional[1]), "PORT")
local size = tonumber(positional[2]) or 32
local warmup = tonumber(positional[3]) or 2
local duration = tonumber(positional[4]) or 5
local server_pid = positional[5]
local encryption = (positional[6] or "on") ~= "off"

local function proc_cpu(pid) -- utime + stime in ticks
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return 0 end
  local s = f:read("*a")
  f:close()
  local rest = s:match("%) (.*)")
  local fields = {}
  for w in rest:gmatch("%S+") do fields[#fields + 1] = w end
  return tonumber(fields[12]) + tonumber(fields[13]) -- fields 14 and 15 of the whole line
end
local function machine_busy() -- busy ticks of all cpus
  local f = io.open("/proc/stat")
  local line = f:read("*l")
  f:close()
  local v = {}
  for n in line:gmatch("%d+") do v[#v + 1] = tonumber(n) end
  -- user nice system idle iowait irq softirq steal
  return v[1] + v[2] + v[3] + v[6] + v[7] + v[8]
end
local HZ = 100 -- USER_HZ on Linux

-- The payload: a table {data = string} whose string is sized so the MessagePack args are SIZE B.
local data = ("x"):rep(math.max(1, size - 8))
local args = { data = data }

local client = lunac.connect_to_app({
  name = "bench", host = "127.0.0.1", port = port, encryption = encryption, no_errors = true,
  disconnect_server = function(reason) io.stderr:write("disconnected: ", tostring(reason), "\n") end,
})

local samples, n = {}, 0
local calls, errors = 0, 0
local measuring, stopped = false, false
local t_start, t_end, c0, s0, m0
local running = pipeline

local function finish()
  local el = luna.now() - t_start
  local ccpu = (proc_cpu("self") - c0) / HZ / el * 100
  local scpu = server_pid and (proc_cpu(server_pid) - s0) / HZ / el * 100 or 0
  local others = (machine_busy() - m0) / HZ / el * 100 - ccpu - scpu
  table.sort(samples)
  local p50 = n > 0 and samples[math.floor(n * 0.50) + 1] * 1e6 or 0
  local p99 = n > 0 and samples[math.floor(n * 0.99) + 1] * 1e6 or 0
  print(("luna%s: %d round trips in %.2f s (%d errors, %d in flight, encryption %s)"):format(
    pipeline > 1 and "-pipelined" or "", calls, el, errors, pipeline, tostring(encryption)))
  print(("RESULT rate=%.0f p50_us=%.1f p99_us=%.1f client_cpu=%.0f server_cpu=%.0f others_cpu=%.0f"):format(
    calls / el, p50, p99, ccpu, scpu, math.max(0, others)))
  lunac.close()
end

local function worker()
  -- Waits for the session (calls made earlier are queued anyway).
  while not client:is_connected() do luna.sleep(0.01) end
  local t_warm = luna.now() + warmup
  while true do
    local t = luna.now()
    if not measuring and t >= t_warm then
      measuring = true
      t_start, t_end = t, t + duration
      c0, m0 = proc_cpu("self"), machine_busy()
      s0 = server_pid and proc_cpu(server_pid) or 0
    end
    if measuring and t >= t_end then break end
    local r, err = client:fetch("bench/echo", args, 5)
    local t1 = luna.now()
    if r == nil then
      errors = errors + 1
      if errors == 1 then io.stderr:write("fetch error: ", tostring(err), "\n") end
      if errors > 100 then break end
    elseif measuring and t1 < t_end then
      n = n + 1
      samples[n] = t1 - t
      calls = calls + 1
    end
  end
  running = running - 1
  if running == 0 and not stopped then
    stopped = true
    finish()
  end
end

for _ = 1, pipeline do luna.spawn(worker) end
-- A hard stop so a broken run never hangs.
luna.set_timeout(warmup + duration + 30, function()
  if not stopped then io.stderr:write("rpc_echo_client: timed out\n") os.exit(1) end
end)
