-- The Lua half of luna/lunac: calls that wait. A Rust function cannot yield on Lua 5.1/LuaJIT,
-- so these wrappers park the running coroutine with a Rust primitive and yield here;
-- `update` resumes it when what it waits for is ready. Wrappers re-check their condition after
-- every resume, so an early (spurious) resume is harmless.
local core = ...
local PARK, DELIVERED = core.PARK, core.DELIVERED
local yield, running = coroutine.yield, coroutine.running
local now = core.now

local api = { now = now }

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

-- Internal pieces the Rust side builds objects with.
local internal = {}

-- A server-side WebSocket connection: a table (users add fields such as on_close) around the
-- Rust handle `__h`; methods are looked up in Lua.
local ws_methods = {}
local WS = {
  __index = function(ws, key)
    local method = ws_methods[key]
    if method ~= nil then
      return method
    end
    if key == "raw_socket" then
      return core.ws_info(rawget(ws, "__h"))
    end
  end,
  __tostring = function(ws)
    local ip, port = core.ws_peer(rawget(ws, "__h"))
    return ip and ("luna.ws(%s:%d)"):format(ip, port) or "luna.ws(closed)"
  end,
}

function internal.ws_new(handle)
  return setmetatable({ __h = handle }, WS)
end

-- The handler parks inside core.ws_receive and is resumed with DELIVERED and the message;
-- any other coroutine parks with core.ws_wait and calls again once woken.
local ws_receive, ws_wait, ws_send = core.ws_receive, core.ws_wait, core.ws_send

function ws_methods:receive()
  local co = need_coroutine("ws:receive()")
  local h = self.__h
  while true do
    local message, opcode, clean, code, reason = ws_receive(h)
    if message == PARK or (message == false and ws_wait(h, co)) then
      local tag
      tag, message, opcode, clean, code, reason = yield(PARK)
      if tag == DELIVERED then
        return message, opcode, clean, code, reason
      end
    elseif message ~= false then
      return message, opcode, clean, code, reason
    end
  end
end

function ws_methods:send(data, opcode)
  return ws_send(self.__h, data, opcode)
end

function ws_methods:close(code, reason)
  return core.ws_close(self.__h, code, reason)
end

function ws_methods:broadcast(data, opcode)
  return core.ws_broadcast(self.__h, data, opcode)
end

function ws_methods:stats(t)
  return core.ws_stats(self.__h, t)
end

function ws_methods:getpeername()
  return core.ws_peer(self.__h)
end

-- A WebSocket client app without on_message, read from a coroutine: `app:receive()` returns
-- what the server's `ws:receive()` does; `app:wait_connected()` waits for the upgrade. Both call
-- a primitive that answers, or parks the coroutine and answers `PARK` (then ask again).
local function settled(primitive, app, co, first, ...)
  if first ~= PARK then
    return first, ...
  end
  yield(PARK)
  return settled(primitive, app, co, primitive(app, co))
end

local function client_wait(call, primitive)
  return function(app)
    if type(app) ~= "userdata" then
      error(call .. ": call it with a colon, " .. call, 2)
    end
    local co = need_coroutine(call)
    return settled(primitive, app, co, primitive(app, co))
  end
end

internal.ws_client_receive = client_wait("app:receive()", core.ws_client_take)
internal.ws_client_wait = client_wait("app:wait_connected()", core.ws_client_wait)

-- Header fields {name, value, name, value, ...} as a table by name: repeated fields joined with
-- ", ", except `special`, joined with `special_sep` (cookies do not take commas). The HTTP
-- server's requests and the client's responses both use it.
local function join_fields(fields, special, special_sep)
  local headers = {}
  for i = 1, #fields, 2 do
    local name, value = fields[i], fields[i + 1]
    local before = headers[name]
    if before then
      value = before .. (name == special and special_sep or ", ") .. value
    end
    headers[name] = value
  end
  return headers
end
internal.join_fields = join_fields

-- Runs an HTTP handler (luna.serve) on a request whose fields Rust hands over as arguments:
-- one resume builds the table here, instead of a C API call per field. `...` is the header
-- names and values (repeated names in order, at most the header limit); `query` is the decoded
-- query (nil for none: a query may hold thousands of pairs, too many for arguments);
-- `connection` numbers the connection, `peer` is the client's "ip:port".
function internal.http_request(handler, body, query, connection, peer, number, method, path, target, raw_query, ...)
  local headers = join_fields({ ... }, "cookie", "; ")
  return handler({ method = method, path = path, target = target, raw_query = raw_query,
    body = body, headers = headers, query = query or {}, connection = connection, peer_address = peer,
    number = number })
end

return api, internal
