-- Luna side of benches/ws_idle.sh: a WebSocket server that holds idle connections and, when
-- asked ("measure"), times idle luna.update() calls from the host's update (outside coroutines).
local luna = require("luna")
local port = tonumber(arg[1]) or 9002
local requester
luna.new_web_app({
  name = "idle", host = "127.0.0.1", port = port, debug = false,
  protocols = {
    default = function(ws)
      while true do
        local message = ws:receive()
        if not message then return end
        if message == "measure" then requester = ws end
      end
    end,
  },
})
print("ready")
io.stdout:flush()

function update()
  if requester then
    local ws, calls = requester, 200000
    requester = nil
    local t0 = os.clock()
    for _ = 1, calls do luna.update() end
    ws:send(("%.1f"):format((os.clock() - t0) / calls * 1e9))
  end
end
