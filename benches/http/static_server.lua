-- HTTP static-file server used by `PAGE=static benches/http_hello.sh`:
-- luna-host benches/http/static_server.lua PORT DIR (an HTTP app with the static template).
local luna = require("luna")
local app = luna.new_http_app({ name = "static bench" })
app:use(app.templates.static(arg[2]))
app:listen(tonumber(arg[1]))
print("ready")
io.stdout:flush()
function update() end
