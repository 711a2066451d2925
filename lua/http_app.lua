-- luna.new_http_app: the original Luna's HTTP apps (routes, groups, middleware, templates) on
-- luna.serve's engine, with the original's bugs fixed and route parameters, HEAD from GET,
-- 405 with Allow and cookies added. Rust (bind/http) parses, frames and limits every request;
-- this file only decides what to answer. Handlers run in the engine's coroutine per request, so
-- they may sleep or wait on sockets.
local luna, core, STATUS_CODES = ...

local METHODS = { "get", "post", "put", "delete", "patch", "head", "options" }

-- The original's table, extended; a type not listed falls back to what the extension says
-- (mime_guess), then application/octet-stream.
local MIME_TYPES = {
  html = "text/html", htm = "text/html", css = "text/css", js = "application/javascript",
  mjs = "application/javascript", json = "application/json", txt = "text/plain",
  md = "text/markdown", xml = "application/xml", png = "image/png", jpg = "image/jpeg",
  jpeg = "image/jpeg", gif = "image/gif", svg = "image/svg+xml", ico = "image/x-icon",
  bmp = "image/bmp", webp = "image/webp", avif = "image/avif", mp3 = "audio/mpeg",
  ogg = "audio/ogg", wav = "audio/wav", mp4 = "video/mp4", webm = "video/webm",
  csv = "text/csv", bin = "application/octet-stream", wasm = "application/wasm",
  woff = "font/woff", woff2 = "font/woff2", ttf = "font/ttf", otf = "font/otf",
  eot = "application/vnd.ms-fontobject", pdf = "application/pdf", zip = "application/zip",
  tar = "application/x-tar", gz = "application/gzip",
}

-- The Content-Type for a file: text types say UTF-8 unless the table says otherwise.
local function content_type(path, mime_types)
  local ext = path:match("%.([^./\\]+)$")
  local t = (ext and (mime_types[ext:lower()] or core.mime(path))) or "application/octet-stream"
  if (t:find("^text/") or t == "application/javascript" or t == "application/json")
      and not t:find("charset", 1, true) then
    t = t .. "; charset=utf-8"
  end
  return t
end

local function check(cond, call, what)
  if not cond then error(call .. ": " .. what, 3) end
end

---------------------------------------------------------------------------------------------
-- Responses

local Response = {}
Response.__index = Response

function Response:status(code)
  check(type(code) == "number" and code % 1 == 0 and code >= 200 and code <= 599,
    "res:status(code)", "'code' must be a whole number 200-599, got " .. tostring(code))
  self.status_code = code
  return self
end

function Response:setHeader(name, value)
  check(type(name) == "string", "res:setHeader(name, value)", "'name' must be a string, got " .. type(name))
  local t = type(value)
  check(t == "string" or t == "number" or t == "table" or value == nil, "res:setHeader(name, value)",
    "'value' must be a string, a number or a list of them, got " .. t)
  self.headers[name:lower()] = value
  return self
end

function Response:getHeader(name)
  return self.headers[name:lower()]
end

-- What template middleware (the logger) wants done once the answer is decided.
local function sent_hooks(res)
  local hooks = res.on_send
  if hooks then
    for i = 1, #hooks do hooks[i](res) end
  end
end

function Response:send(data)
  check(not self.sent, "res:send(data)", "a response was already sent for this request")
  local t = type(data)
  check(t == "string" or t == "number" or data == nil, "res:send(data)",
    "'data' must be a string, got " .. t .. " (use res:json for tables)")
  self.body = data and tostring(data) or ""
  self.sent = true
  sent_hooks(self)
  return self
end

function Response:json(value)
  self.headers["content-type"] = "application/json"
  if type(value) == "string" then
    return self:send(value)
  end
  return self:send(luna.json.encode(value))
end

-- Answers with bytes `offset`.. of the file at `path` (`length` of them; default: the rest),
-- which the engine reads as the client takes them.
local function send_file(res, path, offset, length)
  res.file, res.offset, res.length = path, offset, length
  return res:send("")
end

function Response:sendFile(path, mime)
  check(type(path) == "string", "res:sendFile(path, mime)", "'path' must be a string, got " .. type(path))
  if not core.is_file(path) then
    self.headers["content-type"] = "text/plain; charset=utf-8"
    return self:status(404):send("File not found")
  end
  self.headers["content-type"] = mime or content_type(path, self.app.MIME_TYPES)
  return send_file(self, path)
end

-- Adds a repeated header field (a list value gives one field per entry).
local function append_field(headers, key, value)
  local before = headers[key]
  if before == nil then
    headers[key] = value
  elseif type(before) == "table" then
    before[#before + 1] = value
  else
    headers[key] = { before, value }
  end
end

function Response:cookie(name, value, options)
  check(type(name) == "string", "res:cookie(name, value, options)", "'name' must be a string, got " .. type(name))
  check(type(value) == "string" or type(value) == "number", "res:cookie(name, value, options)",
    "'value' must be a string, got " .. type(value))
  local line = core.set_cookie(name, tostring(value), options)
  -- Always a list, as res:getHeader("set-cookie") shows it.
  append_field(self.headers, "set-cookie", self.headers["set-cookie"] == nil and { line } or line)
  return self
end

-- Whether this answer is gzip-compressed when the client accepts it (default: the app's
-- `compress`).
function Response:compress(on)
  self.compressed = on ~= false
  return self
end

function Response:redirect(url, code)
  check(type(url) == "string", "res:redirect(url, code)", "'url' must be a string, got " .. type(url))
  self:status(code or 302):setHeader("Location", url)
  self.headers["content-type"] = "text/plain; charset=utf-8"
  return self:send("Redirecting to " .. url)
end

-- Answers sent piece by piece (Moonbridge's request:send_status/send_header/send_data/flush/
-- finish): the head goes out with the first piece; a Content-Length set before it frames the
-- body, otherwise it is chunked. Each piece is queued at once; past STREAM_QUEUE bytes waiting,
-- send_data waits for the client (memory stays bounded whatever the handler sends).
local STREAM_QUEUE = 256 * 1024
local PARK = core.PARK

-- Sends the head unless it went; nil and why when it cannot (the client is gone, or the
-- request was answered: a `res` kept past its handler must not write into the next answer).
local function stream_started(res, call)
  if res.over then return nil, "the request was answered" end
  if res.streaming then return true end
  check(not res.sent, call, "the response was already sent with res:send (use one or the other)")
  local length = res.headers["content-length"]
  length = length and tonumber(length)
  check(length == nil or (length >= 0 and length % 1 == 0), call,
    "a Content-Length header must be a whole number >= 0, got " .. tostring(res.headers["content-length"]))
  res.headers["content-length"] = nil
  local ok, err = core.stream_start(res.connection, res.status_code, res.headers, length)
  if not ok then return nil, err end
  res.streaming, res.sent = true, true
  sent_hooks(res)
  return true
end

function Response:send_status(code)
  check(not self.streaming, "res:send_status(code)", "the head was already sent (call it before send_data)")
  return self:status(code)
end

function Response:send_header(name, value)
  local call = "res:send_header(name, value)"
  check(not self.streaming, call, "the head was already sent (call it before send_data)")
  check(type(name) == "string" and (type(value) == "string" or type(value) == "number"), call,
    "'name' and 'value' must be strings")
  local key = name:lower()
  if key == "content-type" or key == "content-length" then
    self.headers[key] = value
  else
    append_field(self.headers, key, value)
  end
  return self
end

-- Waits (in the handler's coroutine) until at most `most` bytes of the answer wait to be sent;
-- nil and the reason once the connection is gone.
local function wait_queue(res, most)
  local co = coroutine.running()
  while true do
    -- Waiting, a `res` kept past its handler can outlive its request (the connection's next
    -- answer wakes it too).
    if res.over then return nil, "the request was answered" end
    local parked, err = core.stream_wait(res.connection, co, most)
    if parked == nil then return nil, err end
    if not parked then return true end
    coroutine.yield(PARK)
  end
end

function Response:send_data(...)
  local started, why = stream_started(self, "res:send_data(...)")
  if not started then return nil, why end
  for i = 1, select("#", ...) do
    local piece = select(i, ...)
    check(type(piece) == "string" or type(piece) == "number", "res:send_data(...)",
      "every piece must be a string, got " .. type(piece))
    if self.over then return nil, "the request was answered" end
    local queued, err = core.stream_send(self.connection, tostring(piece))
    if not queued then return nil, err end
    if queued > STREAM_QUEUE then
      local ok, why = wait_queue(self, STREAM_QUEUE)
      if not ok then return nil, why end
    end
  end
  return true
end

function Response:flush()
  local started, why = stream_started(self, "res:flush()")
  if not started then return nil, why end
  return wait_queue(self, 0)
end

function Response:finish()
  local started, why = stream_started(self, "res:finish()")
  if not started then return nil, why end
  core.stream_end(self.connection)
  self.over = true
  return true
end

function Response:close_after_finish()
  if not self.over then core.stream_close_after(self.connection) end
  return self
end

local function new_response(app)
  return setmetatable({ app = app, status_code = 200, body = "", sent = false,
    headers = { ["content-type"] = "text/html; charset=utf-8" } }, Response)
end

---------------------------------------------------------------------------------------------
-- Requests: the engine's table with params, client_data, ip, and cookies parsed when read.

-- Moonbridge's post_params, post_params_list, post_metadata and post_metadata_list of a
-- urlencoded or multipart/form-data body (the last of a repeated name in the single-value
-- tables); `post_error` says why a multipart body could not be read.
local function new_post_fields()
  return { post_params = {}, post_params_list = {}, post_metadata = {}, post_metadata_list = {} }
end

local function add_post_field(fields, name, value, meta)
  fields.post_params[name], fields.post_metadata[name] = value, meta
  for list, v in pairs({ post_params_list = value, post_metadata_list = meta }) do
    local t = fields[list][name] or {}
    t[#t + 1] = v
    fields[list][name] = t
  end
end

local function set_post_fields(req, fields, err)
  for k, v in pairs(fields) do rawset(req, k, v) end
  rawset(req, "post_error", err)
end

local function post_fields(req)
  local kind, body = rawget(req, "headers")["content-type"] or "", rawget(req, "raw_body")
  local fields, err = new_post_fields(), nil
  if kind:find("application/x-www-form-urlencoded", 1, true) then
    fields.post_params, fields.post_params_list = core.form(body), core.form_lists(body)
  elseif kind:find("multipart/form-data", 1, true) then
    local parts
    parts, err = core.multipart(body, kind)
    for _, part in ipairs(parts or {}) do
      add_post_field(fields, part.name or "", part.value,
        { file_name = part.file_name, content_type = part.content_type })
    end
  end
  set_post_fields(req, fields, err)
end

local POST_FIELDS = { post_params = true, post_params_list = true, post_metadata = true,
  post_metadata_list = true, post_error = true }

-- Bodies. A route's handler gets `req.body` whole (read before the middlewares run, at most
-- max_body_size) unless the route was added with `{stream_body = true}`: its handler then
-- starts once the head is in and reads the body itself (`req:` methods below), or answers
-- without it (what is left of it is read and dropped). The methods work on every route.
local Methods = {}

-- The next piece of a body still to come (all of it unless `stream`, at most `limit` bytes),
-- and whether it is the last; nil and why it cannot be read. A streaming route's body that came
-- with its head is handed over the same way, so how it arrived does not show.
local function read_piece(req, stream, limit)
  local early = rawget(req, "_early")
  if early then
    rawset(req, "_early", nil)
    return early, true
  end
  local co = coroutine.running()
  while true do
    local piece, last = core.body_read(req.connection, req.number, co, limit, stream)
    if piece ~= PARK then return piece, last end
    coroutine.yield(PARK)
  end
end

-- Whether the body is still to come and this call takes it: a body is taken once; later calls
-- get what an earlier read kept, or its failure.
local function take_unread(req, call)
  if rawget(req, "raw_body") or rawget(req, "_failed") then return false end
  check(rawget(req, "_unread"), call, "the body was already streamed by an earlier call")
  req._unread = false
  return true
end

-- A read failed: so do the later ones, for the same reason.
local function read_failed(req, why)
  rawset(req, "_failed", why)
  return nil, why
end

-- Calls `callback(piece)` for each piece of the body as it arrives; true at its end, or nil
-- and why it cannot be read (too_large, timeout, malformed, client_closed, answered).
function Methods:stream_request_body(callback)
  local call = "req:stream_request_body(callback)"
  check(type(callback) == "function", call, "'callback' must be a function(piece), got " .. type(callback))
  if not take_unread(self, call) then
    if rawget(self, "_failed") then return nil, self._failed end
    if self.raw_body ~= "" then callback(self.raw_body) end
    return true
  end
  while true do
    local piece, last = read_piece(self, true, self._limit)
    if not piece then return read_failed(self, last) end
    if piece ~= "" then callback(piece) end
    if last then return true end
  end
end

-- The whole body, at most `limit` bytes, or nil and why.
local function read_whole(req, call, limit)
  if take_unread(req, call) then
    local body, why = read_piece(req, false, limit)
    if not body then return read_failed(req, why) end
    rawset(req, "raw_body", body)
    rawset(req, "body", body)
  end
  if rawget(req, "_failed") then return nil, req._failed end
  return req.raw_body
end

-- The whole body (at most the route's max_body_size), or nil and why.
function Methods:read_body()
  return read_whole(self, "req:read_body()", self._limit)
end

local function add_post_stream(req, call, key, callback)
  check(type(callback) == "function", call, "'callback' must be a function(chunk, meta), got " .. type(callback))
  check(rawget(req, "post_params") == nil, call, "the body was already processed: register streams before")
  local streams = rawget(req, "_post_streams") or {}
  rawset(req, "_post_streams", streams)
  streams[#streams + 1] = { key = key, callback = callback }
  return req
end

-- Moonbridge's: the value of POST field `name` goes to `callback(chunk, meta)` piece by piece
-- (then `callback(nil, meta)`) instead of into post_params, when req:process_request_body()
-- reads the body.
function Methods:stream_post_param(name, callback)
  local call = "req:stream_post_param(name, callback)"
  check(type(name) == "string", call, "'name' must be a string, got " .. type(name))
  return add_post_stream(self, call, { name = name }, callback)
end

-- The same for every field whose name matches Lua pattern `pattern`.
function Methods:stream_post_params(pattern, callback)
  local call = "req:stream_post_params(pattern, callback)"
  check(type(pattern) == "string", call, "'pattern' must be a string, got " .. type(pattern))
  return add_post_stream(self, call, { pattern = pattern }, callback)
end

local function post_stream(req, name)
  for _, s in ipairs(rawget(req, "_post_streams") or {}) do
    if s.key.name == name or (s.key.pattern and name:find(s.key.pattern)) then return s.callback end
  end
end

-- Reads a multipart body as it arrives: fields with a stream go to it, the others are held
-- (all of them together at most the app's max_body_size).
local function stream_multipart(req, kind)
  local reader, err = core.multipart_reader(kind)
  local fields = new_post_fields()
  if not reader then
    set_post_fields(req, fields, err)
    return nil, err
  end
  local callback, meta, name, buffer, held, failed
  held = 0
  local function take(parts)
    for _, part in ipairs(parts) do
      local what = part[1]
      if failed then return end
      if what == "field" then
        name = part[2] or ""
        meta = { field_name = name, file_name = part[3], content_type = part[4] }
        callback = post_stream(req, name)
        buffer = {}
      elseif what == "data" and callback then
        callback(part[2], meta)
      elseif what == "data" then
        held = held + #part[2]
        if held > req._app.max_body_size then failed = "too_large" end
        buffer[#buffer + 1] = part[2]
      elseif what == "end" and callback then
        callback(nil, meta)
      elseif what == "end" then
        add_post_field(fields, name, table.concat(buffer), { file_name = meta.file_name, content_type = meta.content_type })
      else
        failed = part[2]
      end
    end
  end
  local ok, why = req:stream_request_body(function(piece) take(reader:feed(piece)) end)
  reader = ok and not failed and reader
  if reader then take(reader:feed(nil)) end
  err = failed or (not ok and why) or nil
  set_post_fields(req, fields, err)
  if err then return nil, err end
  return true
end

-- Reads the body to its end: POST fields with a stream (req:stream_post_param) go to it, the
-- others into post_params and the other post_ tables. True, or nil and why.
function Methods:process_request_body()
  if rawget(self, "post_params") then return true end
  local call, kind = "req:process_request_body()", self.headers["content-type"] or ""
  local unread = not rawget(self, "raw_body") and not rawget(self, "_failed")
  if unread and kind:find("multipart/form-data", 1, true) then
    check(rawget(self, "_unread"), call, "the body was already streamed by an earlier call")
    return stream_multipart(self, kind)
  end
  -- Held whole: within the app's limit too (a streaming route's may be far above it).
  local body, why = read_whole(self, call, math.min(self._limit, self._app.max_body_size))
  if not body then
    set_post_fields(self, new_post_fields(), why)
    return nil, why
  end
  post_fields(self)
  -- A body read whole: its streamed fields get their value in one piece.
  for name, values in pairs(self.post_params_list) do
    local callback = post_stream(self, name)
    if callback then
      for i, value in ipairs(values) do
        local meta = self.post_metadata_list[name][i]
        meta.field_name = name
        callback(value, meta)
        callback(nil, meta)
      end
      self.post_params[name], self.post_params_list[name] = nil, nil
      self.post_metadata[name], self.post_metadata_list[name] = nil, nil
    end
  end
  return true
end

-- Fields made when first read.
local Request = {
  __index = function(req, key)
    if key == "cookies" then
      local header = rawget(req, "headers").cookie
      local cookies = header and core.cookies(header) or {}
      rawset(req, "cookies", cookies)
      return cookies
    elseif key == "get_params" then
      return rawget(req, "query")
    elseif key == "get_params_list" then
      local lists = core.form_lists(rawget(req, "raw_query"))
      rawset(req, key, lists)
      return lists
    elseif POST_FIELDS[key] and rawget(req, "post_params") == nil then
      check(rawget(req, "_unread") == nil or rawget(req, "raw_body"), "req." .. key,
        "this route streams its body (stream_body = true): call req:process_request_body() first")
      post_fields(req)
      return rawget(req, key)
    end
    return Methods[key]
  end,
}

---------------------------------------------------------------------------------------------
-- Routes: exact paths in a table per method, patterns (":name" segments, a final "*name") in
-- order of addition. Paths are matched as sent (not decoded; a trailing slash counts);
-- parameters are decoded.

local function segments(path)
  local out = {}
  for seg in (path:sub(2) .. "/"):gmatch("([^/]*)/") do out[#out + 1] = seg end
  return out
end

local function compile(path, call)
  if not path:find("[:*]") then return nil end
  local parts = segments(path)
  local pattern = {}
  for i, seg in ipairs(parts) do
    local kind, name = seg:sub(1, 1), seg:sub(2)
    if kind == ":" and name ~= "" then
      pattern[i] = { param = name }
    elseif kind == "*" then
      check(i == #parts, call, "a wildcard '" .. seg .. "' must be the last segment of '" .. path .. "'")
      pattern[i] = { rest = name ~= "" and name or "*" }
    else
      pattern[i] = { literal = seg }
    end
  end
  return pattern
end

local function decode(s)
  return luna.url_decode(s, true)
end

-- The parameters if `parts` (a request path's segments) fits `pattern`, else nil.
local function match(pattern, parts)
  local params = {}
  for i, p in ipairs(pattern) do
    local seg = parts[i]
    if p.rest then
      if seg == nil then return nil end
      params[p.rest] = decode(table.concat(parts, "/", i))
      return params
    end
    if seg == nil then return nil end
    if p.literal then
      if p.literal ~= seg then return nil end
    else
      if seg == "" then return nil end
      params[p.param] = decode(seg)
    end
  end
  if #parts ~= #pattern then return nil end
  return params
end

-- The route for `method` and `path`, and its parameters.
local function find(app, method, path, parts)
  local exact = app.exact[method]
  local route = exact and exact[path]
  if route then return route, {} end
  local list = app.patterns[method]
  if list then
    parts = parts or segments(path)
    for i = 1, #list do
      local params = match(list[i].pattern, parts)
      if params then return list[i], params end
    end
  end
  return nil, nil, parts
end

local ROUTE_OPTIONS = { stream_body = "boolean", max_body_size = "number" }

local function is_size(v)
  return type(v) == "number" and v > 0 and v < math.huge and v % 1 == 0
end

local function add_route(group, method, path, handler, call, options)
  call = call or "app:" .. method:lower() .. "(path, handler, options)"
  check(type(path) == "string" and path:sub(1, 1) == "/", call, "'path' must be a string starting with '/', got " .. tostring(path))
  check(type(handler) == "function", call, "'handler' must be a function, got " .. type(handler))
  options = options or {}
  check(type(options) == "table", call, "'options' must be a table {stream_body, max_body_size}, got " .. type(options))
  for key, value in pairs(options) do
    check(ROUTE_OPTIONS[key], call, "unknown option '" .. tostring(key) .. "' (stream_body, max_body_size)")
    check(type(value) == ROUTE_OPTIONS[key] and (key ~= "max_body_size" or is_size(value)), call,
      "'" .. key .. "' must be a " .. (key == "max_body_size" and "whole number > 0" or "boolean") .. ", got " .. tostring(value))
  end
  local full = group.prefix .. path
  if path == "/" and group.prefix ~= "" then full = group.prefix end
  local app = group.app
  local route = { handler = handler, group = group, path = full, pattern = compile(full, call),
    stream_body = options.stream_body, max_body_size = options.max_body_size }
  if route.pattern then
    local list = app.patterns[method] or {}
    app.patterns[method] = list
    list[#list + 1] = route
  else
    app.exact[method] = app.exact[method] or {}
    app.exact[method][full] = route
  end
  return route
end

---------------------------------------------------------------------------------------------
-- Groups (an app is its own root group): routes go into the app's tables at once, so nested
-- groups and routes added after listen work.

local Group = {}
Group.__index = Group

for _, m in ipairs(METHODS) do
  local method = m:upper()
  Group[m] = function(self, path, handler, options)
    check(getmetatable(self) and self.app, "app:" .. m .. "(path, handler, options)", "call it with a colon: app:" .. m .. "(path, handler)")
    add_route(self, method, path, handler, nil, options)
    return self
  end
end

-- A GET route that upgrades to WebSocket: `handler(ws)` gets luna.new_web_app's `ws` object;
-- the route's connections are one broadcast group. A request that asks for no upgrade gets 426.
function Group:websocket(path, handler)
  local call = "app:websocket(path, handler)"
  check(getmetatable(self) and self.app, call, "call it with a colon: " .. call)
  check(type(handler) == "function", call, "'handler' must be a function(ws), got " .. type(handler))
  local route
  route = add_route(self, "GET", path, function(_, res)
    res.websocket, res.group, res.sent = handler, route.path, true
  end, call)
  return self
end

function Group:group(prefix)
  check(type(prefix) == "string" and prefix:sub(1, 1) == "/", "app:group(prefix)",
    "'prefix' must be a string starting with '/', got " .. tostring(prefix))
  return setmetatable({ app = self.app, parent = self, prefix = self.prefix .. prefix:gsub("/+$", ""),
    middlewares = {} }, Group)
end

function Group:use(middleware)
  check(type(middleware) == "function", "app:use(middleware)",
    "'middleware' must be a function(req, res, next), got " .. type(middleware))
  local list = self.middlewares
  list[#list + 1] = middleware
  return self
end

---------------------------------------------------------------------------------------------
-- Answering a request

local function allowed(app, path)
  local allow, parts = {}, segments(path)
  for _, m in ipairs(METHODS) do
    local method = m:upper()
    if find(app, method, path, parts) then allow[#allow + 1] = method end
  end
  if #allow > 0 then
    local has = {}
    for _, m in ipairs(allow) do has[m] = true end
    if has.GET and not has.HEAD then allow[#allow + 1] = "HEAD" end
    if not has.OPTIONS then allow[#allow + 1] = "OPTIONS" end
  end
  return allow
end

-- The last link of the chain: the route's handler, or what answers when there is none.
local function final_link(app, route, req, res)
  if route then
    return function()
      if res.sent then return end
      local answer = route.handler(req, res, req.client_data)
      if not res.sent and type(answer) == "string" then res:send(answer) end
    end
  end
  return function()
    if res.sent then return end
    local allow = allowed(app, req.path)
    res.headers["content-type"] = "text/plain; charset=utf-8"
    if #allow == 0 then
      return res:status(404):send("Not Found: " .. req.path)
    end
    res.headers.allow = table.concat(allow, ", ")
    if req.method == "OPTIONS" then
      return res:status(204):send("")
    end
    return res:status(405):send("Method Not Allowed")
  end
end

-- Runs `chain[i]` with a `next` that runs the rest once; a link that does not call `next`
-- ends the chain (the handler does not run).
local function step(chain, i, req, res)
  local link = chain[i]
  if not link then return end
  if i == #chain then return link() end
  local called = false
  return link(req, res, function()
    check(not called, "next()", "a middleware called next() twice")
    called = true
    return step(chain, i + 1, req, res)
  end)
end

-- Types worth compressing.
local COMPRESSIBLE = { ["application/json"] = true, ["application/javascript"] = true,
  ["application/xml"] = true, ["image/svg+xml"] = true, ["application/wasm"] = true }

-- Whether an Accept-Encoding header takes gzip (or anything) with a weight above 0.
local function accepts_gzip(header)
  for coding, params in (header or ""):gmatch("%s*([^,;%s]+)([^,]*)") do
    coding = coding:lower()
    if coding == "gzip" or coding == "*" then
      local q = tonumber(params:match("[qQ]%s*=%s*([%d.]+)") or "1")
      return q ~= nil and q > 0
    end
  end
  return false
end

-- Compresses the answer's body when asked to, the client takes gzip, the type compresses and the
-- body is big enough to gain (a streamed answer or a file goes as it is).
local function compress(app, req, res)
  local on = res.compressed
  if on == nil then on = app.config.compress end
  if not on or res.streaming or res.file or #res.body < 1024 or res.headers["content-encoding"] then return end
  local kind = (res.headers["content-type"] or ""):match("^[^;%s]+") or ""
  if not (kind:find("^text/") or COMPRESSIBLE[kind:lower()]) then return end
  local vary = res.headers.vary
  if type(vary) == "table" then
    vary[#vary + 1] = "Accept-Encoding"
  else
    res.headers.vary = vary and (vary .. ", Accept-Encoding") or "Accept-Encoding"
  end
  if not accepts_gzip(req.headers["accept-encoding"]) then return end
  res.body = core.gzip(res.body)
  res.headers["content-encoding"] = "gzip"
end

-- The answer when the body a handler waits for cannot be read (the connection may have
-- refused it already, with 413 or 408: then this goes nowhere).
local UNREADABLE = { status = 400, headers = { ["content-type"] = "text/plain; charset=utf-8" },
  body = "Bad Request: the body could not be read\n" }

-- A body over the route's limit that came with its head (the connection applied the app's).
local TOO_LARGE = { status = 413, headers = { ["content-type"] = "text/plain; charset=utf-8", connection = "close" },
  body = "413 Content Too Large\n" }

local function dispatch(app, req)
  local method = req.method
  local route, params = find(app, method, req.path)
  if not route and method == "HEAD" then
    route, params = find(app, "GET", req.path)
  end
  req._app = app
  req._limit = route and route.max_body_size or app.max_body_size
  local body, streams = req.body, route and route.stream_body
  -- Judged on the length announced, not on how much came with the head.
  local length = tonumber(req.headers["content-length"])
  if (length and length > req._limit) or (body and #body > req._limit) then return TOO_LARGE end
  if streams then
    -- Read with req: methods, whether or not it came with the head.
    req._unread, req._early, req.body = true, body or nil, nil
  else
    if body == false then
      body = read_piece(req, false, req._limit)
      if not body then return UNREADABLE end
    end
    req.raw_body, req.body = body, body
  end
  setmetatable(req, Request)
  req.client_data = app.clients[req.connection] or {}
  req.ip = req.peer_address
  local res = new_response(app)
  res.connection = req.connection
  req.params = params or {}
  local chain = {}
  for _, mw in ipairs(app.middlewares) do chain[#chain + 1] = mw end
  if route then
    local groups, g = {}, route.group
    while g and g ~= app do
      table.insert(groups, 1, g)
      g = g.parent
    end
    for _, group in ipairs(groups) do
      for _, mw in ipairs(group.middlewares) do chain[#chain + 1] = mw end
    end
  end
  chain[#chain + 1] = final_link(app, route, req, res)
  step(chain, 1, req, res)
  compress(app, req, res)
  res.over = true
  return { status = res.status_code, headers = res.headers, body = res.body, file = res.file,
    offset = res.offset, length = res.length, websocket = res.websocket, group = res.group }
end

---------------------------------------------------------------------------------------------
-- Templates: middleware factories.

local templates = {}

local function header_list(list)
  return table.concat(list, ", ")
end

local function contains(list, value, fold)
  for _, v in ipairs(list) do
    if v == value or (fold and v:lower() == value:lower()) then return true end
  end
  return false
end

-- The one byte range of a `Range` header within `size`: first, last; false when it cannot be
-- satisfied; nil when the header is to be ignored (absent, several ranges, not bytes).
local function byte_range(header, size)
  if not header then return nil end
  local a, b = header:match("^%s*bytes%s*=%s*(%d*)%s*%-%s*(%d*)%s*$")
  if not a or (a == "" and b == "") then return nil end
  local first, last
  if a == "" then
    local n = tonumber(b)
    if n == 0 then return false end
    first, last = math.max(size - n, 0), size - 1
  else
    first = tonumber(a)
    if b ~= "" and tonumber(b) < first then return nil end -- not a valid range: ignored (RFC 9110 §14.2)
    last = b == "" and size - 1 or math.min(tonumber(b), size - 1)
  end
  if first >= size then return false end
  return first, last
end

local STATIC_CACHE = 1000

function templates.static(dir, options)
  local call = "templates.static(dir, options)"
  check(type(dir) == "string", call, "'dir' must be a directory path, got " .. type(dir))
  check(options == nil or type(options) == "table", call, "'options' must be a table, got " .. type(options))
  local dotfiles = options and options.dotfiles or false
  local root -- resolved once it exists
  -- Per file: its validators, made again when its size or time changes (at most
  -- STATIC_CACHE files; then the cache starts over).
  local cache, cached = {}, 0
  local function describe(path, size, mtime)
    local d = cache[path]
    if d and d.size == size and d.mtime == mtime then return d end
    if cached >= STATIC_CACHE then cache, cached = {}, 0 end
    d = { size = size, mtime = mtime, etag = ('"%x-%x"'):format(mtime, size), modified = core.http_date(mtime) }
    cache[path], cached = d, cached + 1
    return d
  end
  return function(req, res, nxt)
    if req.method ~= "GET" and req.method ~= "HEAD" then return nxt() end
    root = root or core.canonical(dir)
    if not root then return nxt() end
    local path, size, mtime = core.file(root, req.path, dotfiles)
    if not path then
      if size == "forbidden" then
        res.headers["content-type"] = "text/plain; charset=utf-8"
        return res:status(403):send("Forbidden")
      end
      return nxt()
    end
    local d = describe(path, size, mtime)
    local etag = d.etag
    local headers = res.headers
    headers["content-type"] = content_type(path, res.app.MIME_TYPES)
    headers.etag = etag
    headers["last-modified"] = d.modified
    headers["accept-ranges"] = "bytes"
    local h = req.headers
    local none_match, since = h["if-none-match"], h["if-modified-since"]
    local fresh = false
    if none_match then
      for tag in none_match:gmatch("[^,]+") do
        tag = tag:match("^%s*(.-)%s*$")
        fresh = fresh or tag == "*" or tag == etag or tag == "W/" .. etag
      end
    elseif since then
      local t = core.parse_http_date(since)
      fresh = t ~= nil and mtime <= t
    end
    if fresh then
      res.headers["content-type"] = nil
      return res:status(304):send("")
    end
    local first, last = byte_range(h.range, size)
    if h["if-range"] and h["if-range"] ~= etag then first = nil end
    if first == false then
      res.headers["content-range"] = "bytes */" .. size
      res.headers["content-type"] = "text/plain; charset=utf-8"
      return res:status(416):send("Range Not Satisfiable")
    end
    if first then
      res:status(206)
      res.headers["content-range"] = ("bytes %d-%d/%d"):format(first, last, size)
    else
      first, last = 0, size - 1
    end
    return send_file(res, path, first, last - first + 1)
  end
end

function templates.cors(options)
  options = options or {}
  local origins = options.origins or { "*" }
  local methods = options.methods or { "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD" }
  local headers = options.headers or { "Content-Type", "Authorization", "X-Requested-With" }
  local credentials, max_age = options.credentials or false, options.max_age or 86400
  local any = contains(origins, "*")
  return function(req, res, nxt)
    local origin = req.headers.origin
    local allow = any and "*" or (origin and contains(origins, origin) and origin) or "null"
    res:setHeader("Access-Control-Allow-Origin", allow)
    if allow ~= "*" then res:setHeader("Vary", "Origin") end
    res:setHeader("Access-Control-Allow-Methods", header_list(methods))
    res:setHeader("Access-Control-Allow-Headers", header_list(headers))
    if credentials and allow ~= "*" and allow ~= "null" then res:setHeader("Access-Control-Allow-Credentials", "true") end
    res:setHeader("Access-Control-Max-Age", tostring(max_age))
    if req.method == "OPTIONS" then
      local want = req.headers["access-control-request-method"]
      if want and not contains(methods, want:upper()) then
        return res:status(405):json({ error = "Method " .. want .. " not allowed" })
      end
      for name in (req.headers["access-control-request-headers"] or ""):gmatch("[^,%s]+") do
        if not contains(headers, name, true) then
          return res:status(400):json({ error = "Header " .. name .. " not allowed" })
        end
      end
      return res:status(204):send("")
    end
    if not contains(methods, req.method) then
      return res:status(405):json({ error = "Method " .. req.method .. " not allowed" })
    end
    return nxt()
  end
end

-- The IP of "ip:port" / "[ip]:port".
local function ip_of(address)
  return address and (address:match("^%[(.*)%]:%d+$") or address:match("^(.*):%d+$")) or address
end

function templates.rate_limited(options)
  options = options or {}
  local window = (options.window_ms or 60000) / 1000
  local max = options.max_requests or 100
  local message, status = options.message or "Too many requests", options.status_code or 429
  local skip, key_of = options.skip, options.key_generator
  if not key_of then
    key_of = function(req)
      -- The proxy appends the address it saw: the last entry is the one a client cannot forge.
      local forwarded = options.trust_proxy and req.headers["x-forwarded-for"]
      return forwarded and forwarded:match("([^,%s]+)%s*$") or ip_of(req.ip)
    end
  end
  local hits, next_sweep = {}, 0
  return function(req, res, nxt)
    if skip and skip(req, res) then return nxt() end
    local now = luna.now()
    if now >= next_sweep then
      -- Forget the windows that ended, so memory follows the clients of one window.
      for key, hit in pairs(hits) do
        if hit.reset <= now then hits[key] = nil end
      end
      next_sweep = now + window
    end
    local key = tostring(key_of(req))
    local hit = hits[key]
    if not hit or hit.reset <= now then
      hit = { count = 0, reset = now + window }
      hits[key] = hit
    end
    hit.count = hit.count + 1
    local left = hit.reset - now
    res:setHeader("X-RateLimit-Limit", tostring(max))
    res:setHeader("X-RateLimit-Remaining", tostring(math.max(max - hit.count, 0)))
    res:setHeader("X-RateLimit-Reset", tostring(os.time() + math.ceil(left)))
    if hit.count > max then
      res:setHeader("Retry-After", tostring(math.ceil(left)))
      return res:status(status):json({ error = message })
    end
    return nxt()
  end
end

function templates.body_parser()
  return function(req, res, nxt)
    local kind = req.headers["content-type"] or ""
    if type(req.body) ~= "string" then
      -- A streaming route's body is the handler's to read.
      return nxt()
    elseif kind:find("application/json", 1, true) then
      local ok, value = pcall(luna.json.decode, req.body)
      if ok then req.body = value end
    elseif kind:find("application/x-www-form-urlencoded", 1, true) then
      req.body = core.form(req.body)
    end
    return nxt()
  end
end

function templates.logger(options)
  options = options or {}
  local format = options.format or ":method :url :status :response-time ms"
  local stream, skip = options.stream, options.skip
  local function write(line)
    if type(stream) == "function" then
      stream(line)
    elseif stream then
      stream:write(line, "\n")
    else
      print(line)
    end
  end
  return function(req, res, nxt)
    local start = luna.now()
    res.on_send = res.on_send or {}
    table.insert(res.on_send, function()
      if skip and skip(req, res) then return end
      local tokens = {
        method = req.method, url = req.target, path = req.path, status = tostring(res.status_code),
        ["response-time"] = ("%.3f"):format((luna.now() - start) * 1000), ip = req.ip or "-",
        ["user-agent"] = req.headers["user-agent"] or "-", ["content-length"] = tostring(#res.body),
      }
      write((format:gsub(":([%a%-]+)", function(t) return tokens[t] end)))
    end)
    return nxt()
  end
end

---------------------------------------------------------------------------------------------
-- Apps

local App = setmetatable({}, { __index = Group })
App.__index = App

local function is_app(self, call)
  check(type(self) == "table" and getmetatable(self) == App, call, "call it with a colon: " .. call)
end

local CONFIG = { name = true, debug = true, no_errors = true, error_handler = true, new_client = true,
  close_client = true, timeout_client = true, error_client = true, compress = true }

-- Calls event `name` of the config, if set.
local function event(app, name, ...)
  local fn = app.config[name]
  if fn then fn(...) end
end

function App:listen(port, host, protocol, ssl)
  local call = "app:listen(port, host, protocol, ssl_config)"
  is_app(self, call)
  check(not self.server, call, "the app is already listening: call app:stop() first")
  port, host, protocol = port or 8080, host or "127.0.0.1", protocol or "http"
  check(protocol == "http" or protocol == "https", call, "'protocol' must be \"http\" or \"https\", got " .. tostring(protocol))
  local tls
  if protocol == "https" then
    check(type(ssl) == "table" and ssl.key and ssl.cert, call, "https needs ssl_config = {key = path, cert = path}")
    tls = { key = ssl.key, cert = ssl.cert }
  end
  local config = self.config
  local clients = self.clients
  self.server = core.serve({
    port = port, host = host, tls = tls,
    max_header_size = self.max_header_size, max_body_size = self.max_body_size, idle_timeout = self.timeout,
    no_errors = config.no_errors ~= false, error_handler = config.error_handler,
    handleRequest = function(req) return dispatch(self, req) end,
    on_open = function(id, address)
      local data = { ip = address, connected_at = luna.now() }
      clients[id] = data
      self.client_count = self.client_count + 1
      event(self, "new_client", address, data)
    end,
    on_close = function(id, reason)
      local data = clients[id]
      if not data then return end
      clients[id] = nil
      self.client_count = self.client_count - 1
      if reason == "timeout" then
        event(self, "timeout_client", data.ip, data, luna.now() - data.connected_at)
      elseif reason == "parse_error" or reason == "socket_error" then
        event(self, "error_client", data.ip, data, reason)
      end
      event(self, "close_client", data.ip, data, reason)
    end,
  })
  self.is_listen = true
  print(("Server listening on %s://%s:%d"):format(protocol, host, self.server.port))
  return self
end

function App:stop()
  is_app(self, "app:stop()")
  if self.server then
    self.server:stop()
    self.server, self.is_listen = nil, false
  end
end

function App:is_running()
  is_app(self, "app:is_running()")
  return self.server ~= nil
end

function App:get_client_count()
  is_app(self, "app:get_client_count()")
  return self.client_count
end

local function setter(field, call, what)
  return function(self, value)
    is_app(self, call)
    check(type(value) == "number" and value > 0, call, "'" .. what .. "' must be a number > 0, got " .. tostring(value))
    self[field] = value
    return self
  end
end

App.set_default_timeout = setter("timeout", "app:set_default_timeout(seconds)", "seconds")
App.set_default_max_header_size = setter("max_header_size", "app:set_default_max_header_size(bytes)", "bytes")
App.set_default_max_body_size = setter("max_body_size", "app:set_default_max_body_size(bytes)", "bytes")

return function(config)
  config = config or {}
  check(type(config) == "table", "luna.new_http_app(config)", "'config' must be a table, got " .. type(config))
  for key in pairs(config) do
    check(CONFIG[key], "luna.new_http_app(config)", "unknown option '" .. tostring(key) .. "'")
  end
  local mime = {}
  for k, v in pairs(MIME_TYPES) do mime[k] = v end
  local app = setmetatable({ config = config, name = config.name, prefix = "", middlewares = {},
    exact = {}, patterns = {}, clients = {}, client_count = 0, is_listen = false,
    timeout = 30, max_header_size = 16 * 1024, max_body_size = 10 * 1024 * 1024,
    STATUS_CODES = STATUS_CODES, MIME_TYPES = mime, templates = templates }, App)
  app.app = app
  if config.debug then
    app:use(function(req, _, nxt)
      print(("[%s] %s %s"):format(os.date("%H:%M:%S"), req.method, req.path))
      return nxt()
    end)
  end
  return app
end
