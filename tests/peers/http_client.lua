-- The client side of tests/peers/http_client_peers.py: requests to nginx, results printed as
-- name=value lines. Arguments: http port, https port, test data dir, work dir.
local luna, lunac = require("luna"), require("lunac")
local port, tls_port, data, work = ...
local base, secure = "http://127.0.0.1:" .. port, "https://127.0.0.1:" .. tls_port
local ffi = require("ffi")
ffi.cdef("int usleep(unsigned int usec);")

local function sha256(s)
  local path = work .. "/sum.tmp"
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
  local p = io.popen("sha256sum " .. path)
  local sum = p:read("*l"):match("^(%x+)")
  p:close()
  return sum
end

local function report(name, value)
  print(name .. "=" .. tostring(value))
end

local done, measuring = false, false
luna.spawn(function()
  for _, name in ipairs({ "small.txt", "64k.bin", "text.txt", "api.json" }) do
    local r, err = luna.http.request(base .. "/" .. name)
    report(name, r and sha256(r.body) or err)
    if name == "text.txt" then
      report("text.encoding", r and r.headers["content-encoding"])
    end
  end
  local r = luna.http.request(base .. "/small.txt")
  report("reused", r and r.timings.reused)
  r = luna.http.request(base .. "/redirect")
  report("redirect", r and (r.status_code .. " " .. r.body))
  r = luna.http.request({ url = secure .. "/64k.bin", tls = { ca = data .. "/ca.pem" } })
  report("https", r and sha256(r.body))
  local _, err = luna.http.request(secure .. "/64k.bin")
  report("https.unverified", err)
  local last
  r, err = luna.http.request({ url = base .. "/1m.bin", save_to = work .. "/download.bin",
    on_progress = function(got, total) last = got .. "/" .. tostring(total) end })
  report("progress", r and last or err)
  local body = lunac.http.fetch(base .. "/api.json")
  local value = luna.json.decode(body)
  report("json", value.name .. " " .. #value.list .. " " .. tostring(value.nested.ok))

  -- 50 coroutines, 10 requests each, while the main loop below keeps the frame.
  local answered, running = 0, 50
  measuring = true
  for i = 1, 50 do
    luna.spawn(function()
      for j = 1, 10 do
        local resp = luna.http.request(base .. (j % 2 == 0 and "/small.txt" or "/64k.bin"))
        if resp and resp.status_code == 200 then
          answered = answered + 1
        end
      end
      running = running - 1
      if running == 0 then
        report("flight", answered)
        done = true
      end
    end)
  end
end)

-- A game's frame loop: update, then sleep 1 ms (a frame's other work).
local slowest, total, frames = 0, 0, 0
while not done do
  local t = luna.now()
  luna.update(1 / 60)
  local took = luna.now() - t
  if measuring then
    slowest = math.max(slowest, took)
    total, frames = total + took, frames + 1
  end
  ffi.C.usleep(1000)
end
report("max_update", slowest)
report("mean_update", total / math.max(frames, 1))
report("frames", frames)
luna.close()
