-- An HTTP server in Lune's shape (luna.serve):
--   cargo run --release -- examples/http_hello.lua --serve      (PORT=... to change 8080)
--   curl 'http://127.0.0.1:8080/hello?name=you'
-- Without --serve it asks itself once over a plain TCP stream, prints the answer and exits.
local luna = require("luna")
local serve = (...) == "--serve"

local server = luna.serve(serve and tonumber(os.getenv("PORT") or "8080") or 0, function(request)
  if request.path == "/hello" then
    return "Hello, " .. (request.query.name or "World") .. "!"
  end
  if request.path == "/slow" then
    luna.sleep(1) -- waits without holding up other requests
    return "slept a second"
  end
  return { status = 404, headers = { ["content-type"] = "text/plain" }, body = "no page at " .. request.path }
end)

if serve then
  print(("listening on %s (Ctrl-C stops)"):format(server.address))
  return -- the open server keeps the host running
end

luna.spawn(function()
  local s = assert(luna.tcp.connect("127.0.0.1", server.port))
  s:write("GET /hello?name=Luna HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
  local reply = {}
  for chunk in function() return s:read() end do reply[#reply + 1] = chunk end
  reply = table.concat(reply)
  print(reply:match("^[^\r]*") .. " / " .. reply:match("\r\n\r\n(.*)$"))
  server:stop() -- nothing is left open: the host exits
end)
