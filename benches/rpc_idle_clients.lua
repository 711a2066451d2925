-- Helper of benches/rpc_idle_server.lua: holds N RPC client sessions (one UDP socket each) open
-- and idle: luna-host benches/rpc_idle_clients.lua PORT N
local luna, lunac = require("luna"), require("lunac")
local port = tonumber(arg[1]) or 19200
local n = tonumber(arg[2]) or 1000
local up, failed = 0, 0
-- Connect in batches of 50 every 50 ms: 1,000 simultaneous 1200-byte HELLOs overflow the
-- server's socket buffer (see the report); reconnect_time retries any that still time out.
local function connect(i)
  lunac.connect_to_app({
    name = "idle" .. i, host = "127.0.0.1", port = port, no_errors = true, reconnect_time = 1,
    connect_server = function()
      up = up + 1
      if up == n then print("clients connected: " .. n) end
    end,
    disconnect_server = function(reason)
      if reason ~= "timeout" then up = up - 1 end -- a handshake timeout was never up
      failed = failed + 1
    end,
  })
end
luna.spawn(function()
  for i = 1, n do
    connect(i)
    if i % 50 == 0 then luna.sleep(0.05) end
  end
end)
function update() end
