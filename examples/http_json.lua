-- Calls a JSON API: POSTs a score, reads the leaderboard back, decodes it with luna.json.
--   luna-host examples/http_json.lua [base_url]
-- Without a URL it starts the API itself (a luna.new_http_app) on a free port.
local luna = require("luna")
local base = ...
local app
if not base then
  local scores = {}
  app = luna.new_http_app({ name = "scores" })
  app:use(app.templates.body_parser())
  app:post("/scores", function(req, res)
    scores[#scores + 1] = { name = req.body.name, points = req.body.points }
    table.sort(scores, function(a, b) return a.points > b.points end)
    res:status(201):json({ rank = #scores })
  end)
  app:get("/scores", function(req, res) res:json(luna.json.array(scores)) end)
  app:listen(0, "127.0.0.1")
  base = "http://127.0.0.1:" .. app.server.port
end

local function call(method, path, value)
  local response, err = luna.http.request({
    url = base .. path, method = method, timeout = 5,
    headers = { ["Content-Type"] = "application/json", Accept = "application/json" },
    body = value and luna.json.encode(value) or nil,
  })
  if not response then
    return nil, err
  end
  if not response.ok then
    return nil, ("HTTP %d %s"):format(response.status_code, response.status_message)
  end
  return luna.json.decode(response.body)
end

luna.spawn(function()
  for _, entry in ipairs({ { name = "ada", points = 30 }, { name = "bob", points = 45 } }) do
    local answer, err = call("POST", "/scores", entry)
    print(answer and ("%s is ranked %d of the scores sent"):format(entry.name, answer.rank) or err)
  end
  local board, err = call("GET", "/scores")
  if board then
    for i, e in ipairs(board) do
      print(("%d. %s %d"):format(i, e.name, e.points))
    end
  else
    print("leaderboard failed: " .. err)
  end
  if app then
    app:stop()
  end
  luna.close()
end)
