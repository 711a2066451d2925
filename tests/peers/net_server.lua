-- The sockets the independent-peer tests talk to (run by luna-host).
-- usage: luna-host net_server.lua <tcp port> <tls port> <unix path> <udp port> <test data dir> [max_connections]
-- On a TCP or TLS connection: "FLOOD <bytes>\n" answers that many bytes as fast as the peer
-- reads (never more than max_queued waiting), "FRAME?\n" answers the longest gap between two
-- frames (update calls) seen, in ms; anything else is echoed.
local luna = require("luna")
local tcp_port, tls_port, unix_path, udp_port, data = tonumber(arg[1]), tonumber(arg[2]), arg[3], tonumber(arg[4]), arg[5]
local max_connections = tonumber(arg[6])

local longest, last = 0, nil
function update()
  local now = luna.now()
  if last then longest = math.max(longest, now - last) end
  last = now
end

local function serve(s)
  local first = s:read()
  if not first then return end
  local flood = first:match("^FLOOD (%d+)\n")
  if flood then
    local chunk, left = ("f"):rep(65536), tonumber(flood)
    while left > 0 do
      local piece = chunk:sub(1, math.min(#chunk, left))
      local ok, err = s:write(piece)
      if ok then
        left = left - #piece
      elseif err == "backpressure" then
        if not s:drain() then return end -- the peer went away mid-write
      else
        return
      end
    end
    s:close()
    return
  end
  if first == "FRAME?\n" then
    s:write(("%.1f\n"):format(longest * 1000))
    longest = 0
    return
  end
  local data = first
  while data do
    s:write(data)
    data = s:read()
  end
end

luna.tcp.listen{host = "127.0.0.1", port = tcp_port, max_connections = max_connections, on_connection = serve}
luna.tcp.listen{host = "127.0.0.1", port = tls_port, on_connection = serve,
  tls = {cert = data .. "/server.pem", key = data .. "/server.key"}}
luna.unix.listen{path = unix_path, on_connection = serve}
luna.udp.open{host = "*", port = udp_port, on_packet = function(u, d, ip, port) u:send(d, ip, port) end}
print("ready")
io.stdout:flush()
