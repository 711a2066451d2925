-- Server and client in one process; `fetch` outside a coroutine blocks like the original but
-- keeps the local server serving (no `server = luna` needed).
--   cargo run --release -- examples/rpc_one_process.lua
local luna, lunac = require("luna"), require("lunac")

local app = luna.new_app({ name = "local", host = "127.0.0.1", port = 0, debug = false })
app:new_router({ prefix = "math" }):new({
  prefix = "sum",
  fun = function(list)
    local total = 0
    for _, v in ipairs(list) do total = total + v end
    return total
  end,
})

local client = lunac.connect_to_app({
  name = "local client", host = "127.0.0.1", port = app.port, server_key = app.public_key, debug = false,
})
-- fetch returns the result, or nil and the error text.
print("blocking fetch: " .. assert(client:fetch("math/sum", { 1, 2, 3, 4 })))

luna.spawn(function()
  print("fetch in a coroutine: " .. assert(client:fetch("math/sum", { 10, 20 })))
  local _, err = client:fetch("math/nope", {})
  print("unknown route: " .. err)
  lunac.close()
  luna.close()
end)
