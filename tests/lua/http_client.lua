-- A raw HTTP/1.1 client for the HTTP suites: requests written by hand on a luna.tcp stream, so
-- the tests see exactly what our server sends. Call from a coroutine.
return function(luna)
  local tcp = luna.tcp

  -- Reads one response from stream `s`: status, headers (lower-case names, repeated ones in a
  -- list), body (by content-length, none with `no_body`: a HEAD's). `buf` carries bytes read
  -- past it; returns the response and what was read past it.
  local function read_response(s, buf, no_body)
    buf = buf or ""
    while not buf:find("\r\n\r\n", 1, true) do
      local chunk = s:read()
      if not chunk then return nil, "closed before a head" end
      buf = buf .. chunk
    end
    local head_end = buf:find("\r\n\r\n", 1, true)
    local head = buf:sub(1, head_end - 1)
    buf = buf:sub(head_end + 4)
    local status = tonumber(head:match("^HTTP/1%.1 (%d%d%d)"))
    local headers = {}
    for name, value in head:gmatch("\r\n([^:\r\n]+): ([^\r\n]*)") do
      name = name:lower()
      if headers[name] then
        if type(headers[name]) ~= "table" then headers[name] = { headers[name] } end
        table.insert(headers[name], value)
      else
        headers[name] = value
      end
    end
    local length = no_body and 0 or tonumber(headers["content-length"] or 0)
    while #buf < length do
      local chunk = s:read()
      if not chunk then return nil, "closed in a body" end
      buf = buf .. chunk
    end
    return { status = status, headers = headers, body = buf:sub(1, length) }, buf:sub(length + 1)
  end

  -- Sends `raw` on a new connection and reads `n` responses (default 1).
  local function exchange(port, raw, n)
    local s = assert(tcp.connect("127.0.0.1", port))
    s:write(raw)
    local responses, rest = {}, ""
    for i = 1, n or 1 do
      local r
      r, rest = read_response(s, rest)
      if not r then break end
      responses[i] = r
    end
    return responses, s
  end

  local function get(port, path, extra)
    return exchange(port, "GET " .. path .. " HTTP/1.1\r\nHost: t\r\n" .. (extra or "") .. "\r\n")[1]
  end

  return { read_response = read_response, exchange = exchange, get = get }
end
