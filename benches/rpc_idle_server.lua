-- Idle luna.update() cost with N connected RPC sessions (benches/rpc_echo.sh, idle part):
--   luna-host benches/rpc_idle_server.lua PORT N [CALLS]
-- Times CALLS (200,000) luna.update() calls from the host's global update(), first with no
-- session, then once N clients (held by benches/rpc_idle_clients.lua in another process) have
-- connected and 2 s have passed (handshakes done; only keep-alives flow). Prints ns/call
-- (os.clock, CPU time of this process) and exits.
local luna = require("luna")
local port = tonumber(arg[1]) or 19200
local want = tonumber(arg[2]) or 1000
local calls = tonumber(arg[3]) or 200000

local connected = 0
local app = luna.new_app({
  name = "idle", host = "127.0.0.1", port = port, debug = false,
  max_ip_connected = want + 100, disconnect_time = 3600,
  new_client = function() connected = connected + 1 end,
  close_client = function() connected = connected - 1 end,
  timeout_client = function() return false end,
})
app:new_router({ prefix = "bench" }):new({ prefix = "echo", fun = function(args) return args end })

local function measure(label)
  local c0, w0 = os.clock(), luna.now()
  for _ = 1, calls do luna.update() end
  local cpu, wall = os.clock() - c0, luna.now() - w0
  print(("IDLE sessions=%d calls=%d ns_per_call=%.1f wall_ns_per_call=%.1f (%s)"):format(
    connected, calls, cpu / calls * 1e9, wall / calls * 1e9, label))
end

local phase, ready_at = "baseline", nil
local deadline = luna.now() + 120
print("ready")
local last_print = 0
function update()
  if luna.now() - last_print > 5 then last_print = luna.now() io.stderr:write(("connected %d\n"):format(connected)) end
  if phase == "baseline" then
    measure("no session yet")
    phase = "waiting"
  elseif phase == "waiting" then
    if connected >= want and not ready_at then ready_at = luna.now() + 2 end
    if ready_at and luna.now() >= ready_at then
      measure(#app:get_clients() .. " clients in app:get_clients()")
      phase = "done"
      luna.close()
      os.exit(0)
    elseif luna.now() > deadline then
      print(("IDLE failed: only %d of %d sessions connected"):format(connected, want))
      os.exit(1)
    end
  end
end
