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

-- Calls inside a coroutine wait without blocking the game loop.
luna.spawn(function()
  print("echo ->", client:fetch("api/echo", { text = "Hello" }, 3))
  print("slow_add ->", client:fetch("api/slow_add", { a = 2, b = 40 }))
  print("bad args ->", client:fetch("api/slow_add", { a = "2" }))
  client:noawait_fetch("default/ping", function(data, err)
    print("ping answered", data, err)
    lunac.close()
  end, {})
end)
