-- Luna's WebSocket client against Autobahn|Testsuite's fuzzingserver (scripts/autobahn.sh):
--   luna-host scripts/autobahn_client.lua ws://127.0.0.1:PORT
-- Asks for the case count, echoes every message of each case from a coroutine (app:receive;
-- permessage-deflate offered, for groups 12 and 13),
-- then asks the server to write its report.
local luna, lunac = require("luna"), require("lunac")
local base = arg[1] or "ws://127.0.0.1:9001"
local LIMIT = 64 * 1024 * 1024

local function open(name, path)
  local app = lunac.connect_to_web_app({ name = name, url = base .. path, debug = false, max_message_size = LIMIT,
    compression = true })
  return app, app:wait_connected()
end

luna.spawn(function()
  local counter, ok = open("case count", "/getCaseCount")
  local count = ok and tonumber((counter:receive())) or 0
  repeat until counter:receive() == nil
  for case = 1, count do
    local app, connected = open("case " .. case, ("/runCase?case=%d&agent=luna"):format(case))
    while connected do
      local message, opcode = app:receive()
      if not message then break end
      app:send(message, opcode)
    end
  end
  local report = open("report", "/updateReports?agent=luna")
  repeat until report:receive() == nil
  print(("ran %d cases"):format(count))
  lunac.close()
end)
