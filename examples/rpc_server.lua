-- An RPC server (the documentation's ping and echo routers), run by the standalone host:
--   cargo run --release -- examples/rpc_server.lua        (then examples/rpc_client.lua)
-- In a LÖVE game the same code runs with luna.update(dt) called from love.update.
local luna = require("luna")

local app = luna.new_app({
  name = "My Server",
  host = "127.0.0.1",
  port = tonumber(os.getenv("PORT") or "8080"),
  no_errors = true,
  error_handler = function(err) print("Server error:", err) end,
  new_client = function(client) print("New client connected", client:getpeername()) end,
  close_client = function(client) print("Client disconnected", client.ip, client.port) end,
  disconnect_time = 10,
})
print("public key (pin it with server_key):", app.public_key)

local default_router = app:new_router({ prefix = "default" })
default_router:new({ prefix = "ping", fun = function(args, client) end })

local api_router = app:new_router({ prefix = "api", no_errors = true })
api_router:new({
  prefix = "echo",
  validate = { text = { "string", "nil" } },
  response_validate = { "string" },
  fun = function(args, client)
    return args.text or "no text provided"
  end,
})
api_router:new({
  prefix = "slow_add",
  async = true, -- may wait: runs in a coroutine
  validate = { a = { "number" }, b = { "number" } },
  fun = function(args, client)
    luna.sleep(0.1)
    client:send("working on it")
    return args.a + args.b
  end,
})
