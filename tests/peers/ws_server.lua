-- The server the independent-peer tests talk to (run by luna-host).
-- usage: luna-host ws_server.lua <ws port> <wss port> <test data dir> <keep-alive port> <large port>
--        <deflate port>
local luna = require("luna")
local port, tls_port, data = tonumber(arg[1]), tonumber(arg[2]), arg[3]

local function echo(ws)
  while true do
    local message, opcode = ws:receive()
    if not message then return end
    local code, reason = message:match("^close:(%d+):(.*)$")
    if code then
      ws:close(tonumber(code), reason)
    elseif message == "flood" then
      -- The test client does not read: send must report backpressure, not buffer forever.
      local chunk, sent = ("x"):rep(65536), 0
      while true do
        local ok, err = ws:send(chunk, 2)
        if not ok then
          print(("backpressure after %d sends: %s"):format(sent, err))
          break
        end
        sent = sent + 1
        if sent > 10000 then
          print("no backpressure after 10000 sends")
          break
        end
      end
    elseif message == "protocol?" then
      ws:send(tostring(ws.raw_socket.protocol))
    elseif message == "bytes_in?" then
      ws:send(tostring(ws:stats().bytes_in))
    else
      ws:send(message, opcode)
    end
  end
end

local config = {
  name = "peer test", host = "127.0.0.1", port = port, debug = false,
  max_message_size = 65536,
  protocols = { default = echo, chat = echo, echo = echo },
}
luna.new_web_app(config)
config.name, config.port = "peer test tls", tls_port
config.ssl = { cert = data .. "/server.pem", key = data .. "/server.key" }
luna.new_web_app(config)
-- Keep-alive: pings after 0.2 s of silence, a peer silent 0.5 s after a ping is dropped.
luna.new_web_app({
  name = "peer test keep-alive", host = "127.0.0.1", port = tonumber(arg[4]), debug = false,
  ping_interval = 0.2, ping_timeout = 0.5,
  protocols = { default = echo },
})
-- Large messages: limits raised well past the defaults (frames as big as messages).
luna.new_web_app({
  name = "peer test large", host = "127.0.0.1", port = tonumber(arg[5]), debug = false,
  max_message_size = 64 * 1024 * 1024,
  protocols = { default = echo },
})
-- permessage-deflate allowed; 1 MiB messages at most (after inflating).
luna.new_web_app({
  name = "peer test deflate", host = "127.0.0.1", port = tonumber(arg[6]), debug = false,
  max_message_size = 1024 * 1024, compression = true,
  protocols = { default = echo },
})
print("ready")
function update() end
