-- Raw stream echo, coroutine style, used by benches/tcp_echo.sh:
--   luna-host benches/tcp_echo_server.lua PORT|PATH
-- A number listens on 127.0.0.1:PORT (TCP), anything else on the Unix-domain socket PATH. Each
-- connection's on_connection runs in a library coroutine doing s:write(s:read()).
local luna = require("luna")
local where = arg[1]

local function on_connection(s)
  while true do
    local data = s:read() -- waits for >= 1 byte; nil, reason at the end
    if not data then return end
    s:write(data) -- queues, never blocks
  end
end

if tonumber(where) then
  luna.tcp.listen{host = "127.0.0.1", port = tonumber(where), on_connection = on_connection}
else
  luna.unix.listen{path = where, on_connection = on_connection}
end
print("ready"); io.stdout:flush()
