-- UDP echo used by benches/udp_echo.sh: luna-host benches/udp_echo_server.lua PORT
-- (bound to 127.0.0.1:PORT; every datagram goes back to where it came from).
local luna = require("luna")
local port = tonumber(arg[1])
luna.udp.open{host = "127.0.0.1", port = port, on_packet = function(u, data, ip, port) u:send(data, ip, port) end}
print("ready"); io.stdout:flush()
