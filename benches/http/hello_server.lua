-- HTTP hello server used by benches/http_hello.sh: luna-host benches/http/hello_server.lua PORT
-- (a 13-byte text body from a Lua handler, like the nginx + Lua peer's ngx.print).
local luna = require("luna")
luna.serve(tonumber(arg[1]), function() return "Hello, World!" end)
print("ready")
io.stdout:flush()
function update() end
