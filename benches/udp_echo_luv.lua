-- The luv peer of benches/udp_echo.sh: a UDP echo on libuv through luv (Debian lua-luv), run by
-- Debian's luajit: luajit benches/udp_echo_luv.lua PORT (bound to 127.0.0.1:PORT).
local uv = require("luv")
local udp = uv.new_udp()
assert(udp:bind("127.0.0.1", tonumber(arg[1])))
assert(udp:recv_start(function(err, data, addr)
  if data and addr then udp:send(data, addr.ip, addr.port) end
end))
print("ready"); io.stdout:flush()
uv.run()
