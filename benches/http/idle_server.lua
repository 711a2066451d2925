-- Luna side of benches/http_idle.sh: luna.serve on 127.0.0.1:PORT answering "ok"; "GET /measure"
-- waits while the host's update() times 200,000 idle luna.update() calls (outside coroutines, as
-- benches/tcp_idle_server.lua does) and answers the ns per call (os.clock: CPU time).
--   luna-host benches/http/idle_server.lua PORT
local luna = require("luna")
local wanted, result = false, nil

luna.serve({ port = tonumber(arg[1]), handleRequest = function(req)
  if req.path ~= "/measure" then return "ok" end
  wanted = true
  while not result do luna.sleep(0.01) end
  local r = result
  result = nil
  return r
end })
print("ready"); io.stdout:flush()

function update()
  if wanted then
    wanted = false
    local calls = 200000
    local t0 = os.clock()
    for _ = 1, calls do luna.update() end
    result = ("%.1f\n"):format((os.clock() - t0) / calls * 1e9)
  end
end
