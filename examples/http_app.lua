-- An HTTP app (luna.new_http_app): routes with parameters, a group with its own middleware,
-- templates (logger, cors, rate limit, body parser, static files), a file upload streamed as
-- it arrives, and a WebSocket chat page on the same port.
--   cargo run --release -- examples/http_app.lua --serve      (PORT=... to change 8080)
--   then open http://127.0.0.1:8080/ in two browser tabs and chat, or
--   curl http://127.0.0.1:8080/api/scores/ada ; curl -d 'name=ada&points=7' http://127.0.0.1:8080/api/scores
--   curl -F title=replay -F file=@some.bin http://127.0.0.1:8080/upload
-- Without --serve it asks itself a few questions, prints the answers and exits.
local luna = require("luna")
local lunac = require("lunac")
local serve = (...) == "--serve"

local PAGE = [[<!doctype html><meta charset="utf-8"><title>Luna chat</title>
<ul id="log"></ul><form id="f"><input id="m" autocomplete="off"><button>send</button></form>
<script>
const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/chat");
ws.onmessage = e => { const li = document.createElement("li"); li.textContent = e.data; log.appendChild(li); };
f.onsubmit = e => { e.preventDefault(); ws.send(m.value); m.value = ""; };
</script>
<form method="post" action="/upload" enctype="multipart/form-data">
<input name="title" placeholder="title"><input type="file" name="file"><button>upload</button></form>]]

local app = luna.new_http_app({ name = "example" })
app:use(app.templates.logger({ skip = function() return not serve end }))
app:use(app.templates.cors())
app:use(app.templates.body_parser())
app:use(app.templates.static("examples/public")) -- files, if that directory exists

local scores = {}
app:get("/", function(_, res) res:send(PAGE) end)

local api = app:group("/api")
api:use(app.templates.rate_limited({ max_requests = 60, window_ms = 60000 }))
api:get("/scores/:name", function(req, res)
  local points = scores[req.params.name]
  if not points then return res:status(404):json({ error = "no score for " .. req.params.name }) end
  res:json({ name = req.params.name, points = points })
end)
api:post("/scores", function(req, res)
  local name, points = req.body.name, tonumber(req.body.points)
  if type(name) ~= "string" or not points then
    return res:status(400):json({ error = "send name and points" })
  end
  scores[name] = points
  res:status(201):json({ saved = name })
end)

-- An upload streams through as it arrives: the file field goes to a temporary file piece by
-- piece (never whole in memory), the other fields land in req.post_params.
app:post("/upload", function(req, res)
  local file, size = io.tmpfile(), 0
  req:stream_post_param("file", function(chunk)
    if chunk then
      file:write(chunk)
      size = size + #chunk
    end
  end)
  local ok, why = req:process_request_body()
  file:close()
  if not ok then return res:status(400):json({ error = why }) end
  res:json({ title = req.post_params.title, bytes = size })
end, { stream_body = true, max_body_size = 100 * 1024 * 1024 })

-- Everyone on /chat hears every message.
app:websocket("/chat", function(ws)
  ws:broadcast("someone joined")
  while true do
    local message = ws:receive()
    if not message then return end
    ws:broadcast(message)
  end
end)

app:listen(serve and tonumber(os.getenv("PORT") or "8080") or 0)
if serve then
  return -- the open server keeps the host running
end

-- One request on a new connection; the status and the body.
local function ask(request)
  local s = assert(luna.tcp.connect("127.0.0.1", app.server.port))
  s:write(request)
  local reply = {}
  for chunk in function() return s:read() end do reply[#reply + 1] = chunk end
  reply = table.concat(reply)
  return reply:match("^HTTP/1.1 (%d+)") .. " " .. reply:match("\r\n\r\n(.*)$")
end

luna.spawn(function()
  local form = "name=ada&points=7"
  print(ask("POST /api/scores HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    .. "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: " .. #form .. "\r\n\r\n" .. form))
  print(ask("GET /api/scores/ada HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
  print(ask("DELETE /api/scores/ada HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
  local upload = "--b\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nreplay\r\n"
    .. "--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"r.bin\"\r\n\r\n"
    .. ("x"):rep(100000) .. "\r\n--b--\r\n"
  print(ask("POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    .. "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: " .. #upload .. "\r\n\r\n" .. upload))
  local heard
  local chat = lunac.connect_to_web_app({ name = "chat", url = "ws://127.0.0.1:" .. app.server.port .. "/chat",
    debug = false,
    on_message = function(self, message)
      if message == "someone joined" then return self:send("hello from Lua") end
      heard = message
    end })
  while not heard do luna.sleep(0.01) end
  print("chat: " .. heard)
  lunac.disconnect_to_web_app(chat)
  app:stop() -- nothing is left open: the host exits
end)
