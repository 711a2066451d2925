-- The HTTP server the independent-peer tests talk to (run by luna-host).
-- usage: luna-host http_server.lua <port> <tls port> <test data dir> <app port> <static dir>
-- Routes: /hello, /echo (answers "METHOD LENGTH SUM" of the body), /big (1 MiB), /slow (0.2 s),
-- anything else 404. Heads must arrive within 1 s (slowloris checks). On <app port> an HTTP
-- app serves <static dir>, /api/items/:id (JSON) and a form (POST /form). Prints "ready".
local luna = require("luna")
local port, tls_port, data, app_port, static = tonumber(arg[1]), tonumber(arg[2]), arg[3], tonumber(arg[4]), arg[5]
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
local app = luna.new_http_app({ name = "peers" })
app:use(app.templates.body_parser())
app:use(app.templates.static(static))
app:group("/api"):get("/items/:id", function(req, res) res:json({ id = req.params.id }) end)
app:post("/form", function(req, res) res:json(req.body) end)
app:listen(app_port)
print("ready")
io.stdout:flush()
function update() end
