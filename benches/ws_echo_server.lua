-- WebSocket echo server used by benches/ws_echo.sh and ws_large.sh:
--   luna-host benches/ws_echo_server.lua PORT [CERT KEY]
-- (with CERT and KEY, PEM paths, it serves wss; WS_MAX_MESSAGE_SIZE sets max_message_size;
-- WS_COMPRESSION=1 allows permessage-deflate, WS_COMPRESSION=LEVEL at that zlib level).
-- Prints "ready" once listening.
local luna = require("luna")
local port = tonumber(arg[1]) or 9001
local ssl = arg[2] and arg[3] and { cert = arg[2], key = arg[3] } or nil
luna.new_web_app({ name = "bench", host = "127.0.0.1", port = port, debug = false, ssl = ssl,
  max_message_size = tonumber(os.getenv("WS_MAX_MESSAGE_SIZE")),
  compression = os.getenv("WS_COMPRESSION") and { level = tonumber(os.getenv("WS_COMPRESSION")) } or nil,
  protocols = { default = function(ws)
    while true do
      local m, op = ws:receive()
      if not m then return end
      ws:send(m, op)
    end
  end } })
print("ready")
io.stdout:flush()
function update() end  -- keep the host running
