-- The Luna side of benches/http_client.sh: `client_get.lua URL N [COROUTINES [close [CA]]]` makes
-- N GETs of URL (whole bodies) from COROUTINES coroutines (default 1: sequential), on pooled
-- keep-alive connections or, with `close`, a new connection each (`Connection: close`), https
-- verified with the CA file; prints `requests=N seconds=S rate=R bytes=B`.
local luna = require("luna")
local url, n, workers = arg[1], tonumber(arg[2]), tonumber(arg[3] or "1")
local config = { url = url, tls = arg[5] and { ca = arg[5] } or nil }
if arg[4] == "close" then
  config.headers = { Connection = "close" }
end
local left, bytes, running = n, 0, workers
local start = luna.now()
for _ = 1, workers do
  luna.spawn(function()
    while left > 0 do
      left = left - 1
      local r = assert(luna.http.request(config))
      bytes = bytes + #r.body
    end
    running = running - 1
    if running == 0 then
      local seconds = luna.now() - start
      print(("requests=%d seconds=%.3f rate=%.0f bytes=%d"):format(n, seconds, n / seconds, bytes))
      luna.close()
    end
  end)
end
