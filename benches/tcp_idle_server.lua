-- Luna side of benches/tcp_idle.sh: a TCP server on 127.0.0.1:PORT that holds idle connections
-- and, when one of them sends "measure\n", times 200,000 idle luna.update() calls from the host's
-- update (outside coroutines, as benches/ws_idle_server.lua does) and answers the ns per call
-- (os.clock: CPU time of this process) on that connection:
--   luna-host benches/tcp_idle_server.lua PORT [coro|on_data]
-- coro (default): each connection's coroutine waits in s:read(); on_data: on_connection sets
-- s.on_data and returns (no coroutine is left per connection).
local luna = require("luna")
local port = tonumber(arg[1])
local style = arg[2] or "coro"
local requester

local function on_connection(s)
  if style == "on_data" then
    s.on_data = function(s, data)
      if not data:find("\n") then return #data end -- not consumed: a partial line comes again
      if data:find("measure") then requester = s end
    end
    return
  end
  local line = ""
  while true do
    local data = s:read()
    if not data then return end
    line = line .. data
    if line:find("measure\n") then requester, line = s, "" end
  end
end

luna.tcp.listen{host = "127.0.0.1", port = port, on_connection = on_connection}
print("ready"); io.stdout:flush()

function update()
  if requester then
    local s, calls = requester, 200000
    requester = nil
    local t0 = os.clock()
    for _ = 1, calls do luna.update() end
    s:write(("%.1f\n"):format((os.clock() - t0) / calls * 1e9))
  end
end
