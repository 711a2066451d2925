-- An RPC client for examples/rpc_server.lua:
--   cargo run --release -- examples/rpc_client.lua
local luna, lunac = require("luna"), require("lunac")

local client = lunac.connect_to_app({
  name = "My Client",
  host = os.getenv("HOST") or "localhost", -- names are resolved without blocking
  port = tonumber(os.getenv("PORT") or "8080"),
  server_key = os.getenv("SERVER_KEY"), -- optional pin (the server prints its key)
  no_errors = true,
  listener = function(message) print("Received message:", message) end,
  connect_server = function() print("Successfully connected to server!") end,
  disconnect_server = function(err) print("Disconnected from server:", err) end,
})

-- fetch returns the result, or nil and the error text.
local function show(what, result, err)
  if err then
    print(what .. " failed: " .. err)
  else
    print(what .. " -> " .. tostring(result))
  end
end

-- Calls inside a coroutine wait without blocking the game loop.
luna.spawn(function()
  show("echo", client:fetch("api/echo", { text = "Hello" }, 3))
  show("slow_add", client:fetch("api/slow_add", { a = 2, b = 40 }))
  show("bad args", client:fetch("api/slow_add", { a = "2" }))
  client:noawait_fetch("default/ping", function(_, err)
    print(err and ("ping failed: " .. err) or "ping answered")
    lunac.close()
  end, {})
end)
