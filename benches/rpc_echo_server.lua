-- RPC echo server for benches/rpc_echo.sh:
--   luna-host benches/rpc_echo_server.lua PORT [encryption: on|off]
-- One app, one router "bench", one handler written in Lua that returns args.data.
local luna = require("luna")
local port = tonumber(arg[1]) or 19100
local encryption = (arg[2] or "on") ~= "off"

local app = luna.new_app({
  name = "bench", host = "127.0.0.1", port = port, debug = false, encryption = encryption,
  max_ip_connected = 10000, disconnect_time = 3600,
  timeout_client = function() return false end,
})
app:new_router({ prefix = "bench" }):new({
  prefix = "echo",
  fun = function(args) return args.data end,
})
print(("ready port=%d encryption=%s"):format(app.port, tostring(encryption)))
function update() end -- keep the host running until it is killed
