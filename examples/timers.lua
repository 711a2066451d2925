-- Timers and coroutines, run by the standalone host:
--   cargo run --release -- examples/timers.lua
-- The same code works in a LÖVE game that calls luna.update(dt) from love.update.
local luna = require("luna")

print(("%s: started"):format(luna._VERSION))

-- A coroutine that waits without blocking anything else.
luna.spawn(function(name)
  for i = 1, 3 do
    luna.sleep(0.2)
    print(("[%s] step %d at t=%.2fs"):format(name, i, luna.now()))
  end
end, "worker")

-- A repeating timer; the callback gets its own handle and cancels itself.
local beats = 0
luna.set_interval(0.25, function(timer)
  beats = beats + 1
  print(("heartbeat %d at t=%.2fs"):format(beats, luna.now()))
  if beats == 4 then
    timer:cancel()
  end
end)

-- Timer callbacks run in coroutines, so they may wait too: name resolution happens on a helper
-- thread while the game keeps running.
luna.set_timeout(0.5, function()
  local addresses, err = luna.resolve("localhost")
  print("localhost resolves to " .. (addresses and table.concat(addresses, ", ") or err))
end)

-- A timer that is cancelled before it fires.
local never = luna.set_timeout(0.1, function()
  print("this never prints")
end)
never:cancel()

-- The host calls a global update(dt) at a fixed rate (60 Hz by default, --hz to change).
local frames = 0
function update(dt)
  frames = frames + 1
end

luna.set_timeout(1.2, function()
  print(("%d frames in %.2fs; closing"):format(frames, luna.now()))
  luna.close() -- the host exits once nothing is pending
end)
