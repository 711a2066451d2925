-- The server headless Chromium talks to (tests/peers/ws_peers.py, browser_check), with
-- permessage-deflate allowed: prints what the page reports and how many bytes its big message
-- took on the wire.   usage: luna-host ws_browser.lua <port>
local luna = require("luna")

local function say(line)
  print(line)
  io.stdout:flush()
end

luna.new_web_app({
  name = "browser test", host = "127.0.0.1", port = tonumber(arg[1]), debug = false,
  compression = true,
  protocols = { default = function(ws)
    say(ws:receive())  -- "extensions <what the browser negotiated>"
    local before = ws:stats().bytes_in
    local big = ws:receive()
    say(("bytes %d of %d"):format(ws:stats().bytes_in - before, #big))
    ws:send(big)
    say(ws:receive())  -- "echo ok" when the echo came back whole
  end },
})
say("ready")
function update() end
