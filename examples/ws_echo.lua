-- A WebSocket echo server and a client talking to it, in one process:
--   cargo run --release -- examples/ws_echo.lua
-- With --serve it only serves, until Ctrl-C, so you can connect from elsewhere:
--   cargo run --release -- examples/ws_echo.lua --serve     (PORT=... to change 8765)
--   python3 -m websockets ws://127.0.0.1:8765
local luna, lunac = require("luna"), require("lunac")
local serve = (...) == "--serve"

local app = luna.new_web_app({
  name = "echo", host = "127.0.0.1",
  -- The self-test takes any free port; --serve a known one.
  port = serve and tonumber(os.getenv("PORT") or "8765") or 0,
  protocols = {
    default = function(ws)
      local ip, port = ws:getpeername()
      print(("server: %s:%d connected"):format(ip, port))
      ws.on_close = function(code, reason)
        print(("server: %s:%d left (%d %s)"):format(ip, port, code, reason))
      end
      while true do
        local message, opcode = ws:receive() -- waits without blocking the loop
        if not message then return end
        ws:send("echo: " .. message, opcode)
      end
    end,
  },
})

if serve then
  print(("server: listening on ws://127.0.0.1:%d/ (Ctrl-C stops)"):format(app.port))
  return -- the open listener keeps the host running
end

local sent = 0
lunac.connect_to_web_app({
  name = "client", url = "ws://127.0.0.1:" .. app.port .. "/",
  on_connect = function(self)
    print("client: connected")
    self:send("hello")
  end,
  on_message = function(self, message)
    print("client: " .. message)
    sent = sent + 1
    if sent < 3 then
      self:send("message " .. sent)
    else
      lunac.disconnect_to_web_app(self)
    end
  end,
  on_close = function(self, code, reason)
    print(("client: closed (%d %s)"):format(code, reason))
    luna.close() -- stop the server too; the host exits when nothing is left
  end,
})
