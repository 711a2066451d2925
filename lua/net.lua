-- The Lua half of luna.tcp / luna.unix / luna.udp: stream, server and UDP socket objects (Lua
-- tables around a Rust handle `__h`, so users can add fields such as on_data) and the calls
-- that wait. A waiting call parks the running coroutine and yields; `update` resumes it.
local core, internal = ...
local PARK, DELIVERED = core.PARK, core.DELIVERED
local yield, running = coroutine.yield, coroutine.running
local net_read, net_wait, net_write = core.net_read, core.net_wait, core.net_write

-- The running coroutine, or nil on the main thread.
local function current()
  local co, is_main = running()
  if co == nil or is_main then
    return nil
  end
  return co
end

local function need_coroutine(call)
  local co = current()
  if co == nil then
    error(call .. " must be called inside a coroutine: wrap the code in luna.spawn(function() ... end)", 3)
  end
  return co
end

-- Parks `co` on handle `h` until it has news; false if the handle is gone (nothing will wake it).
local function wait(h, co, waiter)
  if waiter(h, co) then
    yield(PARK)
    return true
  end
  return false
end

-- The metatable of a handle object: `methods` first, then the Rust property getter `prop`;
-- printed as luna.<kind>(<the raw field `shown`, or the handle>).
local function handle_class(kind, methods, prop, shown)
  return {
    __index = function(obj, key)
      local method = methods[key]
      if method ~= nil then
        return method
      end
      return prop(rawget(obj, "__h"), key)
    end,
    __tostring = function(obj)
      return ("luna.%s(%s)"):format(kind, tostring(rawget(obj, shown) or rawget(obj, "__h")))
    end,
  }
end

---------------------------------------------------------------------------------------------
-- Streams (TCP, TLS, Unix)

local stream_methods = {}
local net_on_data = core.net_on_data
local STREAM = handle_class("stream", stream_methods, core.net_prop, "peer_address")
-- Only new keys get here: Rust learns that the stream may have `on_data` (it then looks at the
-- field on each arrival instead of handing data to a parked read).
STREAM.__newindex = function(s, key, value)
  rawset(s, key, value)
  if key == "on_data" and value ~= nil then
    net_on_data(rawget(s, "__h"))
  end
end

function internal.net_stream(h)
  return setmetatable({ __h = h }, STREAM)
end

-- mode 0: what is buffered (at most max), 1: through the delimiter `arg`, 2: exactly `arg` bytes.
-- The connection's handler is handed the data when it arrives (DELIVERED, data, err, partial);
-- any other coroutine is woken and reads again.
local function read(s, mode, arg, max, call)
  local co = need_coroutine(call)
  if rawget(s, "on_data") then
    error(call .. ": this stream delivers to s.on_data; set s.on_data = nil to read instead", 3)
  end
  local h = s.__h
  while true do
    local data, err, partial = net_read(h, mode, arg, max)
    if data == PARK or (data == false and net_wait(h, co)) then
      local tag
      tag, data, err, partial = yield(PARK)
      if tag == DELIVERED then
        return data, err, partial
      end
    elseif data ~= false then
      return data, err, partial
    end
  end
end

function stream_methods:read(max)
  return read(self, 0, nil, max, "s:read([max])")
end

function stream_methods:read_until(delimiter, max)
  if type(delimiter) == "number" then
    delimiter = tostring(delimiter)
  end
  return read(self, 1, delimiter, max, "s:read_until(delimiter[, max])")
end

function stream_methods:read_exact(n)
  return read(self, 2, n, nil, "s:read_exact(n)")
end

function stream_methods:write(data)
  return net_write(self.__h, data)
end

-- Asks `check(h)` until it answers something other than false (its answer is returned),
-- waiting for news of the stream between tries.
local function wait_until(h, co, check)
  while true do
    local answer, why = check(h)
    if answer ~= false then
      return answer, why
    end
    if not wait(h, co, net_wait) then
      return nil, "closed"
    end
  end
end

function stream_methods:drain()
  local co = need_coroutine("s:drain()")
  return wait_until(self.__h, co, core.net_drained)
end

function stream_methods:close()
  return core.net_close(self.__h, false)
end

function stream_methods:reset()
  return core.net_close(self.__h, true)
end

function stream_methods:starttls(opts)
  local co = need_coroutine("s:starttls(opts)")
  local h = self.__h
  local ok, err = core.net_starttls(h, opts)
  if not ok then
    return nil, err
  end
  return wait_until(h, co, core.net_tls_state)
end

function stream_methods:getpeername()
  return core.net_name(self.__h, true)
end

function stream_methods:getsockname()
  return core.net_name(self.__h, false)
end

-- Waits until a new stream is connected: the stream, or nil and why not.
local function connected(s, co)
  local open, err = wait_until(s.__h, co, core.net_status)
  if open then
    return s
  end
  return nil, err
end

local function connect(kind, call, host, port, opts)
  local s, err = core.net_connect(kind, call, host, port, opts)
  if not s then
    return nil, err
  end
  local co = current()
  if co then
    return connected(s, co)
  end
  return s
end

---------------------------------------------------------------------------------------------
-- Servers

local server_methods = {}
local SERVER = handle_class("server", server_methods, core.server_prop, "address")

function internal.net_server(h)
  return setmetatable({ __h = h }, SERVER)
end

function server_methods:connections()
  return core.server_connections(self.__h)
end

function server_methods:close(all)
  return core.server_close(self.__h, all)
end

---------------------------------------------------------------------------------------------
-- UDP sockets

local udp_methods = {}
local UDP = handle_class("udp", udp_methods, core.udp_prop, "address")

function internal.net_udp(h)
  return setmetatable({ __h = h }, UDP)
end

function udp_methods:send(data, host, port)
  return core.udp_send(self.__h, data, host, port)
end

function udp_methods:connect(host, port)
  return core.udp_connect(self.__h, host, port)
end

function udp_methods:receive()
  local co = need_coroutine("u:receive()")
  local h = self.__h
  while true do
    local data, ip, port = core.udp_receive(h)
    if data ~= false then
      return data, ip, port
    end
    if not wait(h, co, core.udp_wait) then
      return nil, "closed"
    end
  end
end

function udp_methods:join(group, interface)
  return core.udp_membership(self.__h, true, group, interface)
end

function udp_methods:leave(group, interface)
  return core.udp_membership(self.__h, false, group, interface)
end

function udp_methods:close()
  return core.udp_close(self.__h)
end

---------------------------------------------------------------------------------------------
-- The module tables

local tcp, unix, udp = {}, {}, {}

function tcp.connect(host, port, opts)
  return connect("tcp", "luna.tcp.connect(host, port[, opts])", host, port, opts)
end

function tcp.listen(config)
  return core.net_listen("tcp", "luna.tcp.listen(config)", config)
end

function unix.connect(path, opts)
  return connect("unix", "luna.unix.connect(path[, opts])", path, nil, opts)
end

function unix.listen(config)
  return core.net_listen("unix", "luna.unix.listen(config)", config)
end

function udp.open(config)
  return core.udp_open(config)
end

return { tcp = tcp, unix = unix, udp = udp }
