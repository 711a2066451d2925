-- Our client with permessage-deflate offered (compression = true), against the websockets
-- server of tests/peers/ws_peers.py, which first says what it negotiated, then echoes.
--   usage: luna-host ws_deflate_client.lua <url>
local luna, lunac = require("luna"), require("lunac")

luna.spawn(function()
  local app = lunac.connect_to_web_app({ name = "deflate client", url = arg[1], debug = false, compression = true })
  if app:wait_connected() then
    print((app:receive()))  -- "deflate permessage-deflate"
    local text, echoed = ("luna deflate "):rep(10000), 0
    for i = 1, 3 do
      app:send(text:sub(i))
      if app:receive() == text:sub(i) then echoed = echoed + 1 end
    end
    print("echoed " .. echoed)
  else
    print("not connected")
  end
  lunac.close()
end)
