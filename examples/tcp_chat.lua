-- A line-based chat server: everyone connected sees what everyone else types.
--   cargo run --release -- examples/tcp_chat.lua          (PORT=... to change 7000)
-- then, in other terminals:
--   nc 127.0.0.1 7000
-- Type a line and press Enter; "/nick NAME" renames you, "/quit" leaves.
-- Each connection is a coroutine that waits for its next line (s:read_until) without ever
-- blocking the others; writes queue and leave at the end of the update.
local luna = require("luna")
local port = tonumber(os.getenv("PORT") or "7000")

local people, count = {}, 0 -- stream -> nick, how many

local function broadcast(from, text)
  for s in pairs(people) do
    if s ~= from then
      -- A reader that stopped reading gets "backpressure": drop it rather than buffer forever.
      if not s:write(text) then
        s:reset()
      end
    end
  end
end

local server = luna.tcp.listen({
  host = "*", port = port,
  max_connections = 200,
  max_input = 4096, -- a line longer than this is cut (read_until's max below)
  on_connection = function(s)
    local nick = s.peer_address
    people[s], count = nick, count + 1
    s:write("welcome to the chat, " .. nick .. " (" .. count .. " here)\n")
    broadcast(s, "* " .. nick .. " joined\n")
    while true do
      local line = s:read_until("\n", 4096)
      if not line then break end -- the peer left, or the connection failed
      line = line:gsub("\r?\n$", "")
      local new = line:match("^/nick%s+(%S+)")
      if new then
        broadcast(s, "* " .. nick .. " is now " .. new .. "\n")
        nick, people[s] = new, new
      elseif line == "/quit" then
        s:write("bye\n")
        s:close()
        break
      elseif line ~= "" then
        broadcast(s, "<" .. nick .. "> " .. line .. "\n")
      end
    end
    people[s], count = nil, count - 1
    broadcast(s, "* " .. nick .. " left\n")
  end,
})

print(("chat: listening on %s (try: nc 127.0.0.1 %d); Ctrl-C stops"):format(server.address, server.port))
