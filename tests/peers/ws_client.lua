-- Our client against an independent server (Python websockets), run by luna-host.
-- usage: luna-host ws_client.lua <url> [ca file]; prints what it saw, one fact per line.
local lunac = require("lunac")
local url, ca = arg[1], arg[2]
local step = 0
lunac.connect_to_web_app({
  name = "peer client", url = url, protocol = { "nope", "chat" }, debug = false,
  ssl = ca and { ca = ca } or nil,
  on_connect = function(self)
    print("connected")
    self:send("hello text")
  end,
  on_message = function(self, message, opcode)
    step = step + 1
    print(("message %d opcode %d %s"):format(step, opcode, message))
    if step == 1 then
      self:send("\0\1\2\255", self.opcodes.BINARY)
    elseif step == 2 then
      self:send(("x"):rep(100000))
    elseif step == 3 then
      self:send("bye")
    end
  end,
  on_close = function(self, code, reason)
    print(("closed %s %s"):format(tostring(code), tostring(reason)))
    lunac.close()
  end,
})
