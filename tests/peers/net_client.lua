-- Our client against the independent peers' servers (run by luna-host).
-- usage: luna-host net_client.lua tcp|tls|udp|broadcast <host> <port> <message> [ca] [server_name] [verify]
-- Prints "ok <reply>" or "err <reason>".
local luna = require("luna")
local mode, host, port, message, ca, server_name, verify = arg[1], arg[2], tonumber(arg[3]), arg[4], arg[5], arg[6], arg[7]

luna.spawn(function()
  if mode == "udp" or mode == "broadcast" then
    local u = luna.udp.open{host = "0.0.0.0", broadcast = mode == "broadcast"}
    local ok, err = u:send(message, host, port)
    if not ok then print("err " .. err) return luna.close() end
    local reply = u:receive()
    print("ok " .. reply)
    return luna.close()
  end
  local opts = {timeout = 5}
  if mode == "tls" then
    opts.tls = {ca = ca ~= "" and ca or nil, server_name = server_name ~= "" and server_name or nil, verify = verify ~= "false"}
  end
  local s, err = luna.tcp.connect(host, port, opts)
  if not s then
    print("err " .. err)
    return luna.close()
  end
  s:write(message .. "\n")
  local reply, why = s:read_until("\n")
  print(reply and ("ok " .. reply:gsub("\n$", "")) or ("err " .. why))
  s:close()
  luna.close()
end)
