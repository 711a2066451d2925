-- The Lua half of RPC apps (luna.new_app / lunac.connect_to_app): app, router, handler and client
-- objects, the request pipeline (middlewares, validate, handler, response_validate) and the
-- waiting `fetch`. Sockets, sessions, encoding, idle clients and penalties live in Rust
-- (src/bind/rpc/); `core` is its table of primitives.
local core = ...
local PARK, DELIVERED = core.PARK, core.DELIVERED
local yield, running = coroutine.yield, coroutine.running
local unpack = table.unpack or unpack

local R = {}

-- Methods accept both `obj:m(x)` and `obj.m(x)`.
local function method(obj, fn)
  return function(a, ...)
    if a == obj then
      return fn(...)
    end
    return fn(a, ...)
  end
end

-- Server side -----------------------------------------------------------------------------

local function type_list(types)
  return table.concat(types, " or ")
end

local function matches(value, types)
  local t = type(value)
  for _, want in ipairs(types) do
    if want == t then
      return true
    end
  end
  return false
end

-- Orders `validate` names so the same bad input always names the same argument (`pairs` order
-- varies from run to run): numbers before strings, each ascending.
local function before(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then
    return ta < tb
  end
  if ta == "number" or ta == "string" then
    return a < b
  end
  return tostring(a) < tostring(b)
end

local function sorted_names(validate)
  local names = {}
  for name in pairs(validate) do
    names[#names + 1] = name
  end
  table.sort(names, before)
  return names
end

-- nil when `args` satisfy `validate`, else the error text about the first bad argument in
-- `names` order.
local function check_args(validate, names, args)
  for _, name in ipairs(names) do
    local types = validate[name]
    local value = args[name]
    if not matches(value, types) then
      return ("Argument '%s' expected to be %s, got %s (%s)"):format(
        tostring(name), type_list(types), type(value), tostring(value))
    end
  end
end

local function check_response(types, value)
  if not matches(value, types) then
    return ("Response expected to be %s, got %s (%s)"):format(type_list(types), type(value), tostring(value))
  end
end

-- The error policy of a request: handler > router > app.
local function report(app, router, handler, msg)
  local fn = handler.error_handler or router.error_handler
  if fn then
    core.handled_error()
    return fn(msg)
  end
  local no_errors = handler.no_errors
  if no_errors == nil then
    no_errors = router.no_errors
  end
  core.report(app.__id, ("request '%s': %s"):format(handler.path, msg), no_errors)
end

local function new_handler(app, router, config)
  core.check("router:new(config)", config)
  local prefix = config.prefix
  if prefix:find("/", 1, true) then
    error("router:new(config): 'prefix' must not contain '/', got '" .. prefix .. "'", 3)
  end
  local handler = {
    prefix = prefix,
    path = router.prefix .. "/" .. prefix,
    fun = config.fun,
    no_errors = config.no_errors,
    async = config.async or false,
    error_handler = config.error_handler,
    validate = config.validate,
    validate_names = config.validate and sorted_names(config.validate),
    response_validate = config.response_validate,
    max_message_size = config.max_message_size,
    message_penalty = config.message_penalty or "timeout",
    timeout_duration = config.timeout_duration or 10,
    middlewares = config.middlewares or {},
  }
  router.handlers[prefix] = handler
  return handler
end

function R.new_router(app, config)
  if config == nil then
    config = {}
  end
  core.check("app:new_router(config)", config)
  local prefix = config.prefix or ""
  if prefix:find("/", 1, true) then
    error("app:new_router(config): 'prefix' must not contain '/', got '" .. prefix .. "'", 3)
  end
  local router = {
    prefix = prefix,
    no_errors = config.no_errors,
    error_handler = config.error_handler,
    handlers = {},
  }
  router.new = method(router, function(cfg)
    return new_handler(app, router, cfg)
  end)
  router.remove = method(router, function(x)
    local prefix = type(x) == "table" and x.prefix or x
    if type(prefix) ~= "string" then
      error("router:remove(handler or prefix): expected a handler or a string, got " .. type(x), 2)
    end
    local existed = router.handlers[prefix] ~= nil
    router.handlers[prefix] = nil
    return existed
  end)
  app.__routers[prefix] = router
  return router
end

-- Sends the answer to request `id` (ok = true: `value` is the result; false: an error text).
local function answer(app, client, id, ok, value)
  if client.__closed then
    return
  end
  local sent, err = core.respond(app.__id, client.__conn, id, ok, value)
  if not sent then
    core.report(app.__id, err)
  end
end

-- Runs middleware `mw` (`pre`: before the handler) → true and its result; if it raises, the
-- client gets the error, the app's policy hears of it, and false is returned.
local function middleware(app, router, handler, client, id, mw, context, pre)
  local ok, result = pcall(mw, context, pre)
  if not ok then
    local msg = "Middleware error: " .. tostring(result)
    answer(app, client, id, false, msg)
    report(app, router, handler, msg)
    return false
  end
  return true, result
end

-- Post phase, response_validate, send. `ok`/`value`: the handler's outcome. `context` is nil
-- for a handler without middlewares.
local function finish(app, router, handler, context, client, id, ok, value)
  if ok then
    if context then
      context.response = value
      for _, mw in ipairs(handler.middlewares) do
        local mok, replaced = middleware(app, router, handler, client, id, mw, context, false)
        if not mok then
          return
        end
        if replaced ~= nil then
          context.response = replaced
        end
        if context.stop then
          break
        end
      end
      value = context.response
    end
    if handler.response_validate then
      local err = check_response(handler.response_validate, value)
      if err then
        answer(app, client, id, false, err)
        return report(app, router, handler, err)
      end
    end
    answer(app, client, id, true, value)
  else
    local msg = tostring(value)
    answer(app, client, id, false, msg)
    return report(app, router, handler, msg)
  end
end

-- "router/handler" split once per distinct path (paths are interned strings); the cache is
-- emptied when hostile clients fill it with made-up paths.
local routes, route_count = {}, 0
local function route(path)
  local r = routes[path]
  if r == nil then
    local rname, hname = path:match("^([^/]*)/([^/]*)")
    r = rname and { rname, hname } or false
    if route_count >= 1024 then
      routes, route_count = {}, 0
    end
    routes[path], route_count = r, route_count + 1
  end
  return r
end

-- One request from `client` (called by Rust for every request envelope).
function R.request(app, client, id, path, args, size)
  local r = route(path)
  local router = r and app.__routers[r[1]]
  local handler = router and router.handlers[r[2]]
  if not handler then
    return answer(app, client, id, false, "Unknown route '" .. path .. "'")
  end
  if handler.max_message_size and size > handler.max_message_size then
    local msg = ("Message size exceeds limit of %d bytes"):format(handler.max_message_size)
    if handler.message_penalty == "timeout" then
      msg = msg .. (" Timed out for %s seconds"):format(tostring(handler.timeout_duration))
    end
    answer(app, client, id, false, msg)
    core.penalty(app.__id, client.__conn, handler.message_penalty, handler.timeout_duration, msg)
    return
  end
  if app.__request_listener then
    app.__request_listener({ path = path, args = args }, client)
    if client.__closed then
      return
    end
  end
  if args == nil then
    args = {}
  end
  local context
  if handler.middlewares[1] ~= nil then
    context = { request = { path = path, args = args }, client = client, ip = client.ip, port = client.port,
                stop = false }
    for _, mw in ipairs(handler.middlewares) do
      local ok, result = middleware(app, router, handler, client, id, mw, context, true)
      if not ok then
        return
      end
      if context.stop then
        if result ~= nil then
          return answer(app, client, id, true, result)
        end
        return answer(app, client, id, false, "Request stopped by middleware")
      end
    end
    args = context.request.args
  end
  if handler.validate then
    local err = check_args(handler.validate, handler.validate_names, type(args) == "table" and args or {})
    if err then
      answer(app, client, id, false, err)
      return report(app, router, handler, err)
    end
  end
  if handler.async then
    core.spawn(handler.fun, function(ok, value)
      finish(app, router, handler, context, client, id, ok, value)
    end, args, client)
  else
    local ok, value = pcall(handler.fun, args, client)
    finish(app, router, handler, context, client, id, ok, value)
  end
end

-- The app object returned by luna.new_app.
function R.server_app(id, info, request_listener)
  local app = {
    __id = id,
    __routers = {},
    __request_listener = request_listener,
    name = info.name,
    host = info.host,
    port = info.port,
    public_key = info.public_key,
    encryption = info.encryption,
  }
  app.new_router = method(app, function(config)
    return R.new_router(app, config)
  end)
  app.remove_router = method(app, function(x)
    local prefix = type(x) == "table" and x.prefix or x
    if type(prefix) ~= "string" then
      error("app:remove_router(router or prefix): expected a router or a string, got " .. type(x), 2)
    end
    local existed = app.__routers[prefix] ~= nil
    app.__routers[prefix] = nil
    return existed
  end)
  app.get_clients = method(app, function()
    return core.get_clients(id)
  end)
  for _, name in ipairs({ "set_max_message_size", "set_max_retries", "set_message_timeout",
                          "set_disconnect_time" }) do
    app[name] = method(app, function(n)
      return core.set(id, "app:" .. name .. "(n)", name, n)
    end)
  end
  return app
end

-- A connected client as the server sees it.
function R.client_object(app_id, conn, ip, port)
  local client = { ip = ip, port = port, __conn = conn, __closed = false }
  client.getpeername = method(client, function()
    return ip, port
  end)
  client.close = method(client, function()
    core.close_conn(app_id, conn)
  end)
  client.send = method(client, function(message)
    return core.push(app_id, conn, message)
  end)
  client.rtt = method(client, function()
    return core.rtt(app_id, conn)
  end)
  return client
end

-- Client side -----------------------------------------------------------------------------

local function fetch(id, path, args, timeout)
  local co, is_main = running()
  if co == nil or is_main then
    return core.fetch_block(id, path, args, timeout)
  end
  local call, err = core.fetch_start(id, path, args, timeout, co)
  if not call then
    return nil, err
  end
  while true do
    -- The answer comes as resume values; any other wake-up (timeout, disconnect) asks.
    local tag, result, ferr = yield(PARK)
    if tag == DELIVERED then
      return result, ferr
    end
    local done
    done, result, ferr = core.fetch_result(id, call)
    if done then
      return result, ferr
    end
  end
end

-- The app object returned by lunac.connect_to_app.
function R.client_app(id, info)
  local app = { __id = id, name = info.name, host = info.host, port = info.port }
  app.fetch = method(app, function(path, args, timeout)
    return fetch(id, path, args, timeout)
  end)
  app.noawait_fetch = method(app, function(path, callback, args)
    return core.noawait(id, path, callback, args)
  end)
  for _, name in ipairs({ "set_max_message_size", "set_max_retries", "set_message_timeout" }) do
    app[name] = method(app, function(n)
      return core.set(id, "client:" .. name .. "(n)", name, n)
    end)
  end
  app.is_connected = method(app, function()
    return core.is_connected(id)
  end)
  app.rtt = method(app, function()
    return core.client_rtt(id)
  end)
  return app
end

R.unpack = unpack
return R
