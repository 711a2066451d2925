-- Raw stream echo, callback style (MonaServer's on_data), used by benches/tcp_echo.sh:
--   luna-host benches/tcp_echo_server_on_data.lua PORT|PATH
-- A number listens on 127.0.0.1:PORT (TCP), anything else on the Unix-domain socket PATH.
-- on_data returns the number of bytes not consumed: nil, all of them are.
local luna = require("luna")
local where = arg[1]

local function on_connection(s)
  s.on_data = function(s, data) s:write(data) end
end

if tonumber(where) then
  luna.tcp.listen{host = "127.0.0.1", port = tonumber(where), on_connection = on_connection}
else
  luna.unix.listen{path = where, on_connection = on_connection}
end
print("ready"); io.stdout:flush()
