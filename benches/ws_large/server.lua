-- Luna's echo for benches/ws_large.sh (luna-host): max_message_size 64 MiB.
local luna = require("luna")
luna.new_web_app({
  name = "large echo", host = "127.0.0.1", port = tonumber(arg[1]), debug = false,
  max_message_size = 64 * 1024 * 1024,
  protocols = { default = function(ws)
    while true do
      local m, op = ws:receive()
      if not m then return end
      ws:send(m, op)
    end
  end },
})
print("ready")
io.stdout:flush()
function update() end
