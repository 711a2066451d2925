-- A UDP echo server, and a client that pings it three times and measures the round trips.
--   cargo run --release -- examples/udp_echo.lua
-- With --serve it only serves, until Ctrl-C (PORT=... to change 7001):
--   cargo run --release -- examples/udp_echo.lua --serve
--   nc -u 127.0.0.1 7001
local luna = require("luna")
local serve = (...) == "--serve"

local echo = luna.udp.open({
  host = "127.0.0.1",
  port = serve and tonumber(os.getenv("PORT") or "7001") or 0,
  on_packet = function(u, data, ip, port)
    u:send(data, ip, port)
  end,
})
print("echo: listening on " .. echo.address)
if serve then
  return -- the open socket keeps the host running
end

local port = tonumber(echo.address:match(":(%d+)$"))
luna.spawn(function()
  local u = luna.udp.open({ host = "127.0.0.1" })
  u:connect("127.0.0.1", port)
  for i = 1, 3 do
    local t0 = luna.now()
    u:send("ping " .. i)
    local reply = u:receive()
    print(("client: %s in %.0f us"):format(reply, (luna.now() - t0) * 1e6))
  end
  u:close()
  echo:close()
end)
