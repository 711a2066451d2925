-- The luv peer of benches/tcp_echo.sh (and benches/tcp_idle.sh): a stream echo on libuv through
-- luv (Debian lua-luv), run by Debian's luajit:
--   luajit benches/tcp_echo_luv.lua PORT|PATH
-- A number listens on 127.0.0.1:PORT (TCP, TCP_NODELAY on every connection), anything else on
-- the Unix-domain socket PATH (a libuv pipe). Each read (libuv reads up to 64 KiB) is written
-- back at once; the connection closes at EOF or on an error.
local uv = require("luv")
local where = arg[1]
local port = tonumber(where)
local new_stream = port and uv.new_tcp or function() return uv.new_pipe(false) end

local server = new_stream()
if port then
  assert(server:bind("127.0.0.1", port))
else
  assert(server:bind(where))
end
assert(server:listen(1024, function(err)
  assert(not err, err)
  local client = new_stream()
  if not server:accept(client) then
    client:close()
    return
  end
  if port then client:nodelay(true) end
  client:read_start(function(read_err, data)
    if data then
      client:write(data)
    else
      client:close() -- EOF (data nil) or read_err
    end
  end)
end))
print("ready"); io.stdout:flush()
uv.run()
