-- The HTTP client's Lua half: config tables, redirects, streaming callbacks, downloads to a
-- file, callback-style requests and the original Luna client's API. One exchange (head, body
-- pieces, pooled connection) is Rust's (`src/bind/http/client.rs`); this file waits on it.
local core, spawn, join_fields = ...
local PARK = core.PARK
local yield, running = coroutine.yield, coroutine.running
local unpack = unpack or table.unpack
local start, next_piece, write = core.http_client_start, core.http_client_next, core.http_client_write
local cancel, url_join = core.http_client_cancel, core.http_url_join

local http = {}

local REQUEST = "luna.http.request(config)"

local KNOWN = {
  url = "string", method = "string", headers = "table", query = "table", body = true,
  content_length = "number", options = "table", timeout = "number", connect_timeout = "number",
  stall_timeout = "number", follow_redirects = "boolean", max_redirects = "number",
  allow_insecure_redirects = "boolean", tls = "table", max_body_size = "number",
  on_progress = "function", on_chunk = "function", save_to = "string", proxy = true,
}

-- Defaults every request starts from (`lunac.http.init` sets them).
local defaults = {}

local function known_list()
  local names = {}
  for name in pairs(KNOWN) do
    names[#names + 1] = name
  end
  table.sort(names)
  return table.concat(names, ", ")
end

local function check(call, config)
  for key, value in pairs(config) do
    local want = KNOWN[key]
    if want == nil then
      error(call .. ": unknown option '" .. tostring(key) .. "' (known: " .. known_list() .. ")", 4)
    end
    if want ~= true and type(value) ~= want then
      error(call .. ": '" .. key .. "' must be a " .. want .. ", got " .. type(value), 4)
    end
  end
  if config.proxy ~= nil and config.proxy ~= false and type(config.proxy) ~= "string" then
    error(call .. ": 'proxy' must be a proxy URL (\"http://host:port\") or false, got " .. type(config.proxy), 4)
  end
  local body = config.body
  if body ~= nil and type(body) ~= "string" and type(body) ~= "function" then
    error(call .. ": 'body' must be a string or a function returning the next piece (nil at the end), got "
      .. type(body), 4)
  end
end

local function need_coroutine(call)
  local co, is_main = running()
  if co == nil or is_main then
    error(call .. " must be called inside a coroutine: wrap the code in luna.spawn(function() ... end)"
      .. " or use luna.http.request_async(config, callback)", 3)
  end
  return co
end

-- Calls `fn(...)`; an error cancels request `id` and raises again.
local function guarded(id, fn, ...)
  local ok, err = pcall(fn, ...)
  if not ok then
    cancel(id)
    error(err, 0)
  end
  return err
end

-- `response.header_list` is built when first read (most callers never do).
local fields_of = setmetatable({}, { __mode = "k" })
local RESPONSE = {
  __index = function(response, key)
    local fields = fields_of[response]
    if key ~= "header_list" or not fields then
      return nil
    end
    local list = {}
    for i = 1, #fields, 2 do
      list[#list + 1] = { fields[i], fields[i + 1] }
    end
    rawset(response, "header_list", list)
    return list
  end,
}

local function origin(url)
  return (url:match("^(%a[%w+.-]*://[^/?#]*)") or url):lower()
end

-- An environment variable, nil when unset or empty.
local function getenv(name)
  local value = os.getenv(name)
  return value ~= "" and value or nil
end

-- A host or NO_PROXY entry without its port and IPv6 brackets, lower-case.
local function bare_host(h)
  h = h:lower()
  return h:match("^%[(.-)%]") or (h:find(":", 1, true) == h:find(":[^:]*$") and h:gsub(":%d*$", "")) or h
end

-- The environment's proxies, read once (as curl reads them: `http_proxy` lower-case only, so a
-- CGI-style `Proxy:` header cannot choose it; `HTTPS_PROXY` either case) and NO_PROXY's hosts.
local env_proxy = { http = getenv("http_proxy"), https = getenv("https_proxy") or getenv("HTTPS_PROXY") }
local no_proxy = {}
for entry in (getenv("no_proxy") or getenv("NO_PROXY") or ""):gmatch("[^,%s]+") do
  no_proxy[#no_proxy + 1] = (bare_host(entry):gsub("^%*?%.", ""))
end

-- The proxy for `url`: the config's (false: none), else the environment's unless NO_PROXY names
-- the host (a suffix match; "*" for every host).
local function proxy_for(config, url)
  if config.proxy ~= nil then
    return config.proxy or nil
  end
  if not env_proxy.http and not env_proxy.https then
    return nil
  end
  local scheme, host = url:lower():match("^(%a+)://([^/?#]*)")
  local env = scheme and env_proxy[scheme]
  if not env then
    return nil
  end
  host = bare_host(host:gsub("^.*@", ""))
  for _, entry in ipairs(no_proxy) do
    if entry == "*" or host == entry or host:sub(-#entry - 1) == "." .. entry then
      return nil
    end
  end
  if not env:find("://", 1, true) then
    env = "http://" .. env
  end
  return env
end

local REDIRECTS = { [301] = true, [302] = true, [303] = true, [307] = true, [308] = true }

-- One exchange of `config` (a prepared copy): the response, `"redirect", response`, or nil, err.
local function exchange(config, co, follow, hop, state)
  local streamed = type(config.body) == "function"
  local options = config.options or {}
  local decompress = options.decompress ~= false
  local whole = config.on_chunk == nil and config.save_to == nil and config.on_progress == nil
  local max_body = config.max_body_size
  if max_body == nil and config.on_chunk == nil and config.save_to == nil then
    max_body = 64 * 1024 * 1024
  end
  local id, err = start(config.url, config.method, config.headers, hop == 0 and config.query or nil,
    not streamed and config.body or nil, streamed, config.content_length, decompress, max_body,
    config.timeout, config.connect_timeout, config.stall_timeout, config.tls, whole,
    proxy_for(config, config.url))
  if not id then
    return nil, err
  end
  if state then
    state.id = id
  end
  if streamed then
    local source = config.body
    while true do
      local piece = guarded(id, source)
      if piece ~= nil and type(piece) ~= "string" then
        cancel(id)
        error(REQUEST .. ": the body function must return strings (nil at the end), got " .. type(piece), 0)
      end
      local ok, werr
      repeat
        ok, werr = write(id, co, piece)
        if ok == PARK then
          yield(PARK)
        end
      until ok ~= PARK
      if not ok then
        -- The answer may have come before the whole body went (a refusal): read it.
        break
      end
      if piece == nil then
        break
      end
    end
  end
  local response, file, received, total
  while true do
    local kind, a, b, c, d, e, f = next_piece(id, co)
    if kind == PARK then
      yield(PARK)
    elseif kind == nil then
      if file then
        file:close()
        os.remove(config.save_to)
      end
      return nil, a
    elseif kind == "head" then
      response = setmetatable({
        ok = a >= 200 and a < 300, status_code = a, status_message = b, headers = join_fields(c, "set-cookie", "\n"),
        version = "1." .. d, url = config.url, body = "",
      }, RESPONSE)
      fields_of[response] = c
      if follow and REDIRECTS[a] and response.headers.location then
        cancel(id)
        return "redirect", response
      end
      if e then
        response.body, response.timings = e, f
        return response
      end
      received = 0
      total = tonumber(response.headers["content-length"] or "")
      if decompress and response.headers["content-encoding"] then
        total = nil
      end
      if config.save_to then
        local ferr
        file, ferr = io.open(config.save_to, "wb")
        if not file then
          cancel(id)
          return nil, "cannot open '" .. config.save_to .. "' for writing: " .. tostring(ferr)
        end
      end
    elseif kind == "data" then
      received = received + #a
      if file then
        local ok, ferr = file:write(a)
        if not ok then
          cancel(id)
          file:close()
          os.remove(config.save_to)
          return nil, "cannot write '" .. config.save_to .. "': " .. tostring(ferr)
        end
      elseif config.on_chunk then
        guarded(id, config.on_chunk, a)
      else
        local parts = response.parts or {}
        parts[#parts + 1] = a
        response.parts = parts
      end
      if config.on_progress then
        guarded(id, config.on_progress, received, total)
      end
    else -- done
      if file then
        file:close()
      end
      if a then
        response.body = a
      elseif response.parts then
        response.body = table.concat(response.parts)
      end
      response.parts = nil
      response.timings = b
      return response
    end
  end
end

local function prepare(call, config)
  if type(config) == "string" then
    -- The common case: nothing to merge or check.
    if next(defaults) == nil then
      return { url = config }
    end
    config = { url = config }
  elseif type(config) ~= "table" then
    error(call .. ": pass a URL string or a config table {url = ..., method, headers, body, ...}, got "
      .. type(config), 3)
  end
  local merged = {}
  for k, v in pairs(defaults) do
    merged[k] = v
  end
  for k, v in pairs(config) do
    merged[k] = v
  end
  check(call, merged)
  if type(merged.url) ~= "string" then
    error(call .. ": 'url' is required (a string such as \"https://example.com/\")", 3)
  end
  if merged.headers then
    local headers = {}
    for k, v in pairs(merged.headers) do
      headers[k] = v
    end
    merged.headers = headers
  end
  return merged
end

-- Follows redirects (RFC 9110 §15.4): 303, and 301/302 after a POST, become GET without a
-- body; 307/308 keep both; credentials (and a Host set by hand) do not cross origins; https
-- never goes to http unless allowed.
local function request(config, co, state)
  local follow = config.follow_redirects ~= false
  local max = config.max_redirects or 5
  local hop = 0
  while true do
    local response, err = exchange(config, co, follow and hop <= max, hop, state)
    if response ~= "redirect" then
      return response, err
    end
    response = err
    local status = response.status_code
    if hop == max then
      return nil, "too many redirects (more than " .. max .. ")"
    end
    local target, jerr = url_join(config.url, response.headers.location)
    if not target then
      return nil, jerr
    end
    if config.url:lower():match("^https:") and target:lower():match("^http:") and not config.allow_insecure_redirects then
      return nil, "refused a redirect from https to http (" .. target .. "); set allow_insecure_redirects = true to follow it"
    end
    local method = (config.method or "GET"):upper()
    if status == 303 and method ~= "HEAD" or (status == 301 or status == 302) and method == "POST" then
      config.method, config.body, config.content_length = "GET", nil, nil
      if config.headers then
        for name in pairs(config.headers) do
          local lower = name:lower()
          if lower == "content-type" or lower == "content-length" then
            config.headers[name] = nil
          end
        end
      end
    elseif type(config.body) == "function" then
      -- A streamed body cannot be sent twice: the redirect is the answer.
      return response
    end
    if origin(target) ~= origin(config.url) and config.headers then
      for name in pairs(config.headers) do
        local lower = name:lower()
        if lower == "authorization" or lower == "cookie" or lower == "proxy-authorization" or lower == "host" then
          config.headers[name] = nil
        end
      end
    end
    config.url = target
    hop = hop + 1
  end
end

function http.request(config)
  local co = need_coroutine(REQUEST)
  return request(prepare(REQUEST, config), co)
end

function http.request_async(config, callback)
  local call = "luna.http.request_async(config, callback)"
  if type(callback) ~= "function" then
    error(call .. ": 'callback' must be a function(response, err), got " .. type(callback), 2)
  end
  config = prepare(call, config)
  local state, cancelled = {}, false
  spawn(function()
    local response, err = request(config, running(), state)
    if not cancelled then
      callback(response, err)
    end
  end)
  return {
    cancel = function()
      if not cancelled and state.id then
        cancel(state.id)
      end
      cancelled = true
    end,
  }
end

-- Runs `fn` in a coroutine and, outside one, pumps the runtime (sleeping in the poll) until it
-- finished: the original client's blocking calls, without blocking anything else.
local function await(fn)
  local co, is_main = running()
  if co ~= nil and not is_main then
    return fn(co)
  end
  local results
  local thread = spawn(function()
    results = { fn(running()) }
  end)
  -- An error ends the coroutine without results (it went to the error policy).
  while not results and coroutine.status(thread) ~= "dead" do
    core.pump(0.05)
  end
  if not results then
    return nil, "the request failed with an error (see the error handler)"
  end
  return unpack(results)
end

-- LuaSocket's `http.request` options in the new config's terms.
local function legacy(call, url, options)
  if type(url) ~= "string" then
    error(call .. ": 'url' must be a string, got " .. type(url), 3)
  end
  if options ~= nil and type(options) ~= "table" then
    error(call .. ": 'options' must be a table or nil, got " .. type(options), 3)
  end
  local config, sink = { url = url }, nil
  for k, v in pairs(options or {}) do
    if k == "redirect" then
      config.follow_redirects = v ~= false
    elseif k == "timeout" and type(v) == "table" then
      -- LuaSocket's {connect, send, receive}.
      config.connect_timeout = v.connect
      local send, receive = v.send or v.receive, v.receive or v.send
      config.stall_timeout = send and math.max(send, receive) or nil
    elseif k == "timeout" then
      config.stall_timeout = v
    elseif k == "step" or k == "uri" or k == "create" then
      -- LuaSocket's plumbing: the runtime moves the bytes.
    elseif k == "source" then
      config.body = v
    elseif k == "sink" then
      sink = v
    else
      config[k] = v
    end
  end
  if sink then
    config.on_chunk = function(piece)
      local ok, err = sink(piece)
      if not ok then
        error("the sink failed: " .. tostring(err), 0)
      end
    end
  end
  config = prepare(call, config)
  return config, sink
end

local function status_line(response)
  return "HTTP/" .. response.version .. " " .. response.status_code .. " " .. response.status_message
end

function http.fetch(url, options)
  local config, sink = legacy("lunac.http.fetch(url, options)", url, options)
  return await(function(co)
    local response, err = request(config, co)
    if not response then
      return nil, err
    end
    if sink then
      sink(nil)
    end
    return sink and 1 or response.body, response.status_code, response.headers, status_line(response)
  end)
end

function http.noawait_fetch(url, options, callback)
  local call = "lunac.http.noawait_fetch(url, options, callback)"
  if type(options) == "function" and callback == nil then
    options, callback = nil, options
  end
  if type(callback) ~= "function" then
    error(call .. ": 'callback' must be a function(body, code, headers, status_line), got " .. type(callback), 2)
  end
  local config = legacy(call, url, options)
  spawn(function()
    local response, err = request(config, running())
    if response then
      callback(response.body, response.status_code, response.headers, status_line(response))
    else
      callback(nil, err)
    end
  end)
end

function http.init(config)
  if config ~= nil and type(config) ~= "table" then
    error("lunac.http.init(config): 'config' must be a table or nil, got " .. type(config), 2)
  end
  local kept = {}
  for k, v in pairs(config or {}) do
    -- The original's {luna = ..., lunac = ...}: modules to pump, which the runtime does anyway.
    if k ~= "luna" and k ~= "lunac" then
      kept[k] = v
    end
  end
  check("lunac.http.init(config)", kept)
  defaults = kept
end

function http.close()
  core.http_client_close_idle()
end

return http
