-- The HTTP server the independent-peer tests talk to (run by luna-host).
-- usage: luna-host http_server.lua <port> <tls port> <test data dir> <app port> <app tls port>
--   <static dir>
-- Routes: /hello, /echo (answers "METHOD LENGTH SUM" of the body), /big (1 MiB), /slow (0.2 s),
-- anything else 404. Heads must arrive within 1 s (slowloris checks). On <app port> (and with
-- https on <app tls port>) an HTTP app serves <static dir>, /api/items/:id (JSON), a form
-- (POST /form), a multipart upload (POST /upload), streaming uploads (POST /save, PUT /count,
-- POST /refuse) and a WebSocket route (/chat). Prints "ready".
local luna = require("luna")
local port, tls_port, data = tonumber(arg[1]), tonumber(arg[2]), arg[3]
local app_ports, static = { http = tonumber(arg[4]), https = tonumber(arg[5]) }, arg[6]
local big = ("0123456789abcdef"):rep(65536)

local function handle(req)
  if req.path == "/hello" then return "Hello, World!" end
  if req.path == "/echo" then
    local sum = 0
    for i = 1, #req.body, 97 do sum = sum + req.body:byte(i) end
    return req.method .. " " .. #req.body .. " " .. sum
  end
  if req.path == "/big" then return { headers = { ["content-type"] = "application/octet-stream" }, body = big } end
  if req.path == "/slow" then luna.sleep(0.2) return "slow" end
  return { status = 404, body = "not found" }
end

luna.serve({ port = port, head_timeout = 1, max_body_size = 8 * 1024 * 1024, handleRequest = handle })
luna.serve({ port = tls_port, head_timeout = 1, handleRequest = handle,
  tls = { cert = data .. "/server.pem", key = data .. "/server.key" } })
-- The app, over http and https: the browser page in <static dir> opens a WebSocket to /chat and reports what it got with POST /result (printed).
for _, protocol in ipairs({ "http", "https" }) do
  local app = luna.new_http_app({ name = "peers " .. protocol, compress = true })
  app:get("/text", function(_, res) res:setHeader("Content-Type", "text/plain"):send(("gzip me "):rep(4096)) end)
  app:use(app.templates.body_parser())
  app:use(app.templates.static(static))
  app:group("/api"):get("/items/:id", function(req, res) res:json({ id = req.params.id }) end)
  app:post("/form", function(req, res) res:json(req.body) end)
  app:post("/upload", function(req, res)
    local file, meta = req.post_params.file, req.post_metadata.file
    res:json({ title = req.post_params.title, name = meta and meta.file_name, size = file and #file,
      error = req.post_error })
  end)
  -- Streaming routes: a file field saved to <static dir>/../saved.bin, a raw body counted, and
  -- an answer before the body.
  local streaming = { stream_body = true, max_body_size = 1024 * 1024 * 1024 }
  app:post("/save", function(req, res)
    local out, meta, size = assert(io.open(static .. "/../saved.bin", "wb")), nil, 0
    req:stream_post_param("file", function(chunk, m)
      if chunk then
        out:write(chunk)
        size = size + #chunk
      else
        meta = m
      end
    end)
    local ok, why = req:process_request_body()
    out:close()
    res:json({ ok = ok, error = why, title = req.post_params.title, name = meta and meta.file_name, size = size })
  end, streaming)
  app:put("/count", function(req)
    local size, pieces = 0, 0
    local ok, why = req:stream_request_body(function(piece) size, pieces = size + #piece, pieces + 1 end)
    return ("%s %s %d %d"):format(tostring(ok), tostring(why), size, pieces)
  end, streaming)
  app:post("/refuse", function(_, res) res:status(403):send("no uploads here") end, streaming)
  app:websocket("/chat", function(ws)
    local message = ws:receive()
    ws:send("pong " .. tostring(message))
  end)
  app:post("/result", function(req, res)
    print("result " .. protocol .. " " .. req.body)
    io.stdout:flush()
    res:send("thanks")
  end)
  app:listen(app_ports[protocol], "127.0.0.1", protocol, { cert = data .. "/server.pem", key = data .. "/server.key" })
end
print("ready")
io.stdout:flush()
function update() end
