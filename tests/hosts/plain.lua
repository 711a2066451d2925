-- Runs the Lua suites in a plain interpreter (Debian luajit / lua5.1) against the built module.
-- usage: <lua> tests/hosts/plain.lua <dir holding the .so> <module shipped: luna|lunac> <suite>...
-- Only the shipped module file is in <dir>, so requiring the other one proves it is preloaded.
local so_dir, shipped = arg[1], arg[2]
package.cpath = so_dir .. "/?.so"
package.path = "tests/lua/?.lua;" .. package.path

local first = require(shipped)
local luna, lunac = require("luna"), require("lunac")
assert(first == (shipped == "luna" and luna or lunac), "require returns the module")

local T = require("harness").new(luna)
for i = 3, #arg do
  require(arg[i])(T, luna, lunac)
end
T.run()
local deadline = os.time() + 120
while not T.finished do
  luna.update()
  if os.time() > deadline then
    print("suite timed out")
    os.exit(1)
  end
end
os.exit((T.failed == 0 and T.passed > 0) and 0 or 1)
