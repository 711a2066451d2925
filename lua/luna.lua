-- The Lua half of luna/lunac: calls that wait. A Rust function cannot yield on Lua 5.1/LuaJIT,
-- so these wrappers park the running coroutine with a Rust primitive and yield here;
-- `update` resumes it when what it waits for is ready. Wrappers re-check their condition after
-- every resume, so an early (spurious) resume is harmless.
local core = ...
local PARK = core.PARK
local yield, running = coroutine.yield, coroutine.running
local now = core.now

local api = {}

-- The running coroutine, or an error naming the call and the fix.
local function need_coroutine(call)
  local co, is_main = running()
  if co == nil or is_main then
    error(call .. " must be called inside a coroutine: wrap the code in luna.spawn(function() ... end)", 3)
  end
  return co
end

function api.sleep(seconds)
  if type(seconds) ~= "number" or seconds ~= seconds or seconds < 0 then
    error("luna.sleep(seconds): 'seconds' must be a number >= 0, got " .. tostring(seconds), 2)
  end
  local co = need_coroutine("luna.sleep(seconds)")
  local deadline = core.sleep(co, seconds)
  repeat
    yield(PARK)
  until now() >= deadline
end

function api.resolve(host)
  if type(host) ~= "string" then
    error("luna.resolve(host): 'host' must be a string, got " .. type(host), 2)
  end
  local co = need_coroutine("luna.resolve(host)")
  while true do
    local addresses, err = core.resolve(host, co)
    if addresses ~= PARK then
      return addresses, err
    end
    yield(PARK)
  end
end

-- Internal wrappers, installed as methods by the Rust side.
local internal = {}

function internal.ws_receive(ws)
  local co = need_coroutine("ws:receive()")
  while true do
    local message, opcode, clean, code, reason = core.ws_receive(ws, co)
    if message ~= PARK then
      return message, opcode, clean, code, reason
    end
    yield(PARK)
  end
end

return api, internal
