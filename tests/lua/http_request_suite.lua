-- The HTTP client (luna.http / lunac.http) against our own server (luna.serve) and against
-- scripted raw TCP servers that send exactly the bytes a test needs (stalls, drips, bad
-- framing, resets, close-delimited bodies), all over real sockets on 127.0.0.1.
return function(T, luna, lunac)
  local http = luna.http
  local data = (os.getenv("LUNA_TEST_DATA") or "tests/data") .. "/"

  -- A raw server: `script(s, head)` runs for each request head read from a connection.
  local function scripted(script)
    local seen = { connections = 0, requests = {} }
    seen.server = luna.tcp.listen{ host = "127.0.0.1", port = 0, on_connection = function(s)
      seen.connections = seen.connections + 1
      while true do
        local head = s:read_until("\r\n\r\n", 65536)
        if not head then
          return
        end
        seen.requests[#seen.requests + 1] = head
        if script(s, head, #seen.requests) == "close" then
          s:close()
          return
        end
      end
    end }
    seen.url = "http://127.0.0.1:" .. seen.server.port
    return seen
  end

  local function app(handler)
    local server = luna.serve({ port = 0, host = "127.0.0.1", handleRequest = handler })
    return server, server.address
  end

  T.test("request: GET, POST, headers, query, keep-alive reuse, timings", function()
    local seen = {}
    local server, base = app(function(req)
      seen[#seen + 1] = req
      return { status = req.path == "/missing" and 404 or 200,
        headers = { ["X-Rep"] = { "1", "2" }, ["Set-Cookie"] = { "a=1", "b=2" } },
        body = req.method .. " " .. req.path .. " " .. (req.body or "") }
    end)
    local r = assert(http.request(base .. "/one"))
    T.eq(r.ok, true, "ok")
    T.eq(r.status_code, 200, "status")
    T.eq(r.status_message, "OK", "reason")
    T.eq(r.body, "GET /one ", "body")
    T.eq(r.headers["x-rep"], "1, 2", "repeated headers joined")
    T.eq(r.headers["set-cookie"], "a=1\nb=2", "cookies kept apart")
    T.eq(#r.header_list > 4, true, "every field in header_list")
    T.eq(r.url, base .. "/one", "url")
    T.ok(r.timings.total >= 0 and r.timings.connect and not r.timings.reused, "first request connects")
    T.eq(seen[1].headers["user-agent"]:match("^luna/") ~= nil, true, "a user agent")
    T.eq(seen[1].headers["accept-encoding"], "gzip, deflate, br", "compressed answers accepted")
    r = assert(http.request({ url = base .. "/two", method = "post", body = "payload",
      headers = { ["Content-Type"] = "text/plain", ["X-List"] = { "a", "b" } }, query = { q = "a b&c" } }))
    T.eq(r.body, "POST /two payload", "POST with a body")
    T.eq(r.timings.reused, true, "the pooled connection was reused")
    T.eq(seen[2].query.q, "a b&c", "query encoded")
    T.eq(seen[2].headers["x-list"], "a, b", "a header list sends each value")
    T.eq(seen[2].headers["content-length"], "7", "a length")
    r = assert(http.request({ url = base .. "/missing" }))
    T.eq(r.ok, false, "an error status is a response")
    T.eq(r.status_code, 404, "404")
    r = assert(http.request({ url = base .. "/h", method = "HEAD" }))
    T.eq(r.body, "", "HEAD has no body")
    server:stop()
  end)

  T.test("request: misuse raises naming the call, network errors return nil, err", function()
    T.raises({ "unknown option 'bogus'" }, http.request, { url = "http://x/", bogus = 1 })
    T.raises({ "'url' is required" }, http.request, {})
    T.raises({ "not a valid header name" }, http.request, { url = "http://127.0.0.1:1/", headers = { ["a b"] = "1" } })
    T.raises({ "line break" }, http.request, { url = "http://127.0.0.1:1/", headers = { x = "1\r\nInjected: yes" } })
    local r, err = http.request("http://127.0.0.1:1/")
    T.eq(r, nil, "refused")
    T.ok(err:find("refused"), err)
    r, err = http.request("ftp://example.com/")
    T.ok(err:find("unsupported URL scheme"), err)
    r, err = http.request("http://no-such-host.invalid/")
    T.ok(err:find("resolve"), err)
  end)

  T.main("lunac.http.fetch outside a coroutine pumps the runtime until the answer", function()
    local server = luna.serve({ port = 0, host = "127.0.0.1", handleRequest = function(req)
      luna.sleep(0.01)
      return "blocking " .. req.path
    end })
    local body, code = lunac.http.fetch(server.address .. "/main")
    T.eq(body, "blocking /main", "body")
    T.eq(code, 200, "code")
    server:stop()
  end)

  T.main("request: outside a coroutine it raises", function()
    T.raises({ "luna.http.request(config) must be called inside a coroutine" }, http.request, "http://127.0.0.1:1/")
  end)

  T.test("request: redirects followed, methods rewritten, credentials dropped across origins", function()
    local seen = {}
    local other, other_base = app(function(req)
      seen.other = req
      return "other " .. req.method
    end)
    local server, base = app(function(req)
      seen[req.path] = req
      if req.path == "/303" then return { status = 303, headers = { location = "/end" } } end
      if req.path == "/307" then return { status = 307, headers = { location = "end" } } end
      if req.path == "/away" then return { status = 302, headers = { location = other_base .. "/x" } } end
      if req.path == "/loop" then return { status = 302, headers = { location = "/loop" } } end
      return req.method .. " " .. (req.body or "")
    end)
    local r = assert(http.request({ url = base .. "/303", method = "POST", body = "data" }))
    T.eq(r.body, "GET ", "303 becomes GET without the body")
    T.eq(r.url, base .. "/end", "final url")
    r = assert(http.request({ url = base .. "/307", method = "PUT", body = "data" }))
    T.eq(r.body, "PUT data", "307 keeps method and body")
    r = assert(http.request({ url = base .. "/away", headers = { Authorization = "secret", Cookie = "c=1", ["X-Keep"] = "1" } }))
    T.eq(r.body, "other GET", "to another origin")
    T.eq(seen.other.headers.authorization, nil, "Authorization dropped across origins")
    T.eq(seen.other.headers.cookie, nil, "Cookie dropped across origins")
    T.eq(seen.other.headers["x-keep"], "1", "other headers kept")
    local _, err = http.request(base .. "/loop")
    T.ok(err:find("too many redirects"), err)
    r = assert(http.request({ url = base .. "/303", follow_redirects = false }))
    T.eq(r.status_code, 303, "not followed when asked")
    T.eq(r.headers.location, "/end", "location given")
    server:stop()
    other:stop()
  end)

  T.test("request: gzip and deflate bodies are decoded, the limit applies to what is decoded", function()
    -- luna.new_http_app compresses when asked to.
    local a = luna.new_http_app({ name = "gz", compress = true })
    a:get("/", function(req, res) res:setHeader("Content-Type", "text/plain"); res:send(("compress me "):rep(2000)) end)
    a:listen(0, "127.0.0.1")
    local url = "http://127.0.0.1:" .. a.server.port .. "/"
    local r = assert(http.request(url))
    T.eq(r.headers["content-encoding"], "gzip", "sent compressed")
    T.eq(r.body, ("compress me "):rep(2000), "decoded")
    r = assert(http.request({ url = url, options = { decompress = false } }))
    T.eq(r.headers["content-encoding"], nil, "not asked for compression")
    local _, err = http.request({ url = url, max_body_size = 1000 })
    T.ok(err and err:find("too large"), tostring(err))
    -- Bodies that decode to many times the read-ahead, whole and in pieces, kept alive or
    -- closed right after (the end comes while compressed bytes still wait to be decoded).
    local big = ("a line of text that compresses well\n"):rep(120000)
    a:get("/big", function(req, res) res:setHeader("Content-Type", "text/plain"); res:send(big) end)
    a:get("/bigclose", function(req, res)
      res:setHeader("Content-Type", "text/plain")
      res:setHeader("Connection", "close")
      res:send(big)
    end)
    for _, path in ipairs({ "big", "bigclose" }) do
      r, err = http.request({ url = url .. path, timeout = 5 })
      T.eq(r and r.headers["content-encoding"], "gzip", path .. ": compressed " .. tostring(err))
      T.eq(r and #r.body, #big, path .. ": whole")
      local got = 0
      r, err = http.request({ url = url .. path, timeout = 5, on_chunk = function(piece) got = got + #piece end })
      T.eq(got, #big, path .. ": in pieces " .. tostring(err))
    end
    a:stop()
  end)

  T.test("request: chunked and close-delimited bodies, 1xx skipped, on_chunk and on_progress", function()
    local raw = scripted(function(s, head, n)
      if head:find("^GET /chunked") then
        s:write("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
          .. "5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n")
      else
        s:write("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        return "close"
      end
    end)
    local r = assert(http.request(raw.url .. "/chunked"))
    T.eq(r.body, "hello world", "chunked")
    T.eq(r.status_code, 200, "after a 100")
    r = assert(http.request(raw.url .. "/closing"))
    T.eq(r.body, "until the end", "close-delimited")
    T.eq(r.version, "1.0", "version")
    local pieces, progress = {}, {}
    r = assert(http.request({ url = raw.url .. "/chunked",
      on_chunk = function(piece) pieces[#pieces + 1] = piece end,
      on_progress = function(got, total) progress[#progress + 1] = got end }))
    T.eq(table.concat(pieces), "hello world", "pieces")
    T.eq(r.body, "", "on_chunk keeps no body")
    T.eq(progress[#progress], 11, "progress counts bytes")
    raw.server:close()
  end)

  T.test("request: stalls, timeouts, resets, bad framing and huge heads fail with a reason", function()
    local raw = scripted(function(s, head)
      local path = head:match("^%u+ (%S+)")
      if path == "/stall" then
        s:write("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
      elseif path == "/slow" then
        s:write("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for i = 1, 5 do s:write("x"); luna.sleep(0.05) end
      elseif path == "/reset" then
        s:write("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        luna.sleep(0.02)
        s:reset()
        return "close"
      elseif path == "/badchunk" then
        s:write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
      elseif path == "/huge" then
        s:write("HTTP/1.1 200 OK\r\nX: " .. ("a"):rep(70000) .. "\r\n\r\n")
      elseif path == "/short" then
        s:write("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        return "close"
      elseif path == "/garbage" then
        s:write("SSH-2.0-OpenSSH\r\n\r\n")
      end
    end)
    local _, err = http.request({ url = raw.url .. "/stall", stall_timeout = 0.2 })
    T.ok(err and err:find("no data for 0.2 s while waiting for the body"), tostring(err))
    _, err = http.request({ url = raw.url .. "/slow", timeout = 0.12 })
    T.ok(err and err:find("took longer than its 'timeout'"), tostring(err))
    _, err = http.request(raw.url .. "/reset")
    T.ok(err and (err:find("reset") or err:find("closed")), tostring(err))
    _, err = http.request(raw.url .. "/badchunk")
    T.ok(err and err:find("malformed chunked"), tostring(err))
    _, err = http.request(raw.url .. "/huge")
    T.ok(err and err:find("too large"), tostring(err))
    _, err = http.request(raw.url .. "/short")
    T.ok(err and err:find("before the body ended"), tostring(err))
    _, err = http.request(raw.url .. "/garbage")
    T.ok(err and err:find("malformed response"), tostring(err))
    raw.server:close()
  end, 10)

  T.test("request: zlib and raw deflate in chunks, brotli, a flood of 1xx heads cut", function()
    local raw = scripted(function(s, head)
      local path = head:match("^%u+ (%S+)")
      if path == "/zlib" then
        -- zlib.compress(b"hello hello hello"), sent chunked in two pieces.
        local z = "\120\156\203\72\205\201\201\87\200\64\144\0\58\46\6\125"
        s:write("HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n\r\n"
          .. ("%x\r\n"):format(3) .. z:sub(1, 3) .. "\r\n" .. ("%x\r\n"):format(#z - 3) .. z:sub(4) .. "\r\n0\r\n\r\n")
      elseif path == "/br" then
        -- brotli for "hello", and the same stream cut short.
        local b = "\11\2\128\104\101\108\108\111\3"
        s:write("HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: " .. #b .. "\r\n\r\n" .. b)
      elseif path == "/brcut" then
        local b = "\11\2\128\104\101"
        s:write("HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: " .. #b .. "\r\n\r\n" .. b)
      elseif path == "/raw" then
        -- The same without the zlib wrapper (what some servers send as "deflate").
        local d = "\203\72\205\201\201\87\200\64\144\0"
        s:write("HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: " .. #d .. "\r\n\r\n" .. d)
      else
        for _ = 1, 100 do s:write("HTTP/1.1 102 Processing\r\n\r\n") end
      end
    end)
    local r, err = http.request(raw.url .. "/zlib")
    T.eq(r and r.body, "hello hello hello", tostring(err))
    r, err = http.request(raw.url .. "/raw")
    T.eq(r and r.body, "hello hello hello", tostring(err))
    r, err = http.request(raw.url .. "/br")
    T.eq(r and r.body, "hello", tostring(err))
    _, err = http.request(raw.url .. "/brcut")
    T.ok(err and err:find("does not decompress"), tostring(err))
    local _, ferr = http.request(raw.url .. "/flood")
    T.ok(ferr and ferr:find("too many 1xx"), tostring(ferr))
    raw.server:close()
  end)

  T.test("request: cancelled and failed requests give their connection slots back", function()
    local raw = scripted(function(s, head)
      if head:find("^GET /slow") then luna.sleep(0.3) end
      s:write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    end)
    for _ = 1, 12 do
      http.request_async(raw.url .. "/slow", function() end).cancel()
    end
    for _ = 1, 12 do
      local _, err = http.request({ url = raw.url .. "/slow", timeout = 0.05 })
      T.ok(err and err:find("timeout"), tostring(err))
    end
    local r, err = http.request({ url = raw.url .. "/fast", timeout = 2 })
    T.eq(r and r.body, "ok", tostring(err))
    raw.server:close()
  end, 10)

  T.test("request: a streamed upload queued behind busy connections goes when one frees", function()
    local server, base = app(function(req)
      if req.path == "/slow" then luna.sleep(0.1) end
      return "got " .. #req.body
    end)
    local done = 0
    for _ = 1, 6 do
      luna.spawn(function() assert(http.request(base .. "/slow")); done = done + 1 end)
    end
    local parts = { "ab", "cd" }
    local r, err = http.request({ url = base .. "/up", method = "POST", body = function() return table.remove(parts, 1) end,
      stall_timeout = 2 })
    T.eq(r and r.body, "got 4", tostring(err))
    T.ok(r.timings.total < 1, "without waiting for a stall: " .. r.timings.total)
    T.wait_until(function() return done == 6 end, 2, "the slow ones")
    server:stop()
  end)

  T.test("request: a pooled connection the server closed is replaced without an error", function()
    local raw = scripted(function(s, head, n)
      s:write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
      -- Close right after answering while the client thinks it may reuse the connection.
      if n == 1 then
        luna.sleep(0.01)
        return "close"
      end
    end)
    assert(http.request(raw.url .. "/a"))
    luna.sleep(0.05)
    local r, err = http.request(raw.url .. "/b")
    T.eq(r and r.body, "ok", tostring(err))
    T.eq(raw.connections, 2, "a new connection")
    raw.server:close()
  end)

  T.test("request: many in flight at once, at most 6 connections to one origin", function()
    local live, most = 0, 0
    local raw = scripted(function(s)
      live = live + 1
      most = math.max(most, live)
      luna.sleep(0.02)
      live = live - 1
      s:write("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!")
    end)
    local done = 0
    for i = 1, 30 do
      luna.spawn(function()
        local r = assert(http.request(raw.url .. "/" .. i))
        T.eq(r.body, "!", "body")
        done = done + 1
      end)
    end
    T.wait_until(function() return done == 30 end, 5, "30 requests")
    T.eq(raw.connections, 6, "six connections")
    T.eq(most, 6, "six at a time")
    raw.server:close()
  end)

  T.test("request: streamed uploads, save_to downloads, request_async and cancel", function()
    local server, base = app(function(req)
      if req.path == "/big" then return ("0123456789"):rep(100000) end
      return "got " .. #req.body .. " " .. tostring(req.headers["transfer-encoding"] or req.headers["content-length"])
    end)
    local parts = { ("a"):rep(100000), ("b"):rep(100000), "c" }
    local r = assert(http.request({ url = base .. "/up", method = "POST", body = function() return table.remove(parts, 1) end }))
    T.eq(r.body, "got 200001 chunked", "a streamed upload is chunked")
    parts = { "ab", "cd" }
    r = assert(http.request({ url = base .. "/up", method = "PUT", content_length = 4,
      body = function() return table.remove(parts, 1) end }))
    T.eq(r.body, "got 4 4", "with a known length")
    local path = os.tmpname()
    r = assert(http.request({ url = base .. "/big", save_to = path }))
    local f = assert(io.open(path, "rb"))
    T.eq(#f:read("*a"), 1000000, "saved to the file")
    f:close()
    os.remove(path)
    local got
    http.request_async({ url = base .. "/async" }, function(response, err) got = response or err end)
    T.wait_until(function() return got end, 2, "the callback")
    T.eq(got.body, "got 0 nil", "callback style")
    local called = false
    local handle = http.request_async(base .. "/big", function() called = true end)
    handle.cancel()
    luna.sleep(0.1)
    T.eq(called, false, "a cancelled request calls nothing")
    server:stop()
  end)

  T.test("https: verified against the CA, refusals say why, verify = false opts out", function()
    local function tls_app(cert, key)
      return luna.serve({ port = 0, host = "127.0.0.1", tls = { cert = data .. cert, key = data .. key },
        handleRequest = function(req) return "secure " .. req.path end })
    end
    local server = tls_app("server.pem", "server.key")
    local url = "https://127.0.0.1:" .. server.port
    local r, err = http.request({ url = url .. "/a", tls = { ca = data .. "ca.pem" } })
    T.eq(r and r.body, "secure /a", tostring(err))
    r = assert(http.request({ url = url .. "/b", tls = { ca = data .. "ca.pem" } }))
    T.eq(r.timings.reused, true, "TLS connections are pooled too")
    r, err = http.request(url .. "/")
    T.eq(r, nil, "unknown issuer refused")
    T.ok(err:find("certificate verify failed", 1, true) and err:find("UnknownIssuer", 1, true), err)
    r, err = http.request({ url = url .. "/", tls = { ca = data .. "ca.pem", server_name = "example.com" } })
    T.ok(err and err:find("example.com", 1, true), tostring(err))
    r = assert(http.request({ url = url .. "/c", tls = { verify = false } }))
    T.eq(r.body, "secure /c", "verify = false")
    server:stop()
    local old = tls_app("expired.pem", "expired.key")
    r, err = http.request({ url = "https://localhost:" .. old.port .. "/", tls = { ca = data .. "ca.pem" } })
    T.ok(err and err:lower():find("expired", 1, true), tostring(err))
    old:stop()
  end)

  T.test("proxy: http forwarded in absolute form, https through a CONNECT tunnel, refusals", function()
    local forward = scripted(function(s, head)
      s:write("HTTP/1.1 200 OK\r\nContent-Length: " .. #head .. "\r\n\r\n" .. head)
    end)
    local r, err = http.request({ url = "http://example.invalid:8080/a?b=1#frag", proxy = "http://ann:s%20cret@127.0.0.1:" .. forward.server.port })
    T.ok(r, tostring(err))
    T.ok(r.body:find("^GET http://example.invalid:8080/a%?b=1 HTTP/1.1\r\n"), r.body)
    T.ok(r.body:find("proxy-authorization: Basic YW5uOnMgY3JldA==", 1, true), "credentials from the proxy URL")
    T.ok(r.body:find("host: example.invalid:8080", 1, true), "Host is the origin")
    forward.server:close()

    local target = luna.serve({ port = 0, host = "127.0.0.1", tls = { cert = data .. "server.pem", key = data .. "server.key" },
      handleRequest = function(req) return "tunnelled " .. req.path end })
    local seen = {}
    local tunnel = luna.tcp.listen{ host = "127.0.0.1", port = 0, on_connection = function(s)
      local head = s:read_until("\r\n\r\n", 8192)
      seen[#seen + 1] = head
      local host, port = head:match("^CONNECT ([^%s:]+):(%d+) HTTP/1.1")
      -- "refuse:" in base64: the credentials of the refused case.
      if head:find("cmVmdXNlOg==", 1, true) or not host then
        s:write("HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
        return
      end
      local up = assert(luna.tcp.connect(host, tonumber(port)))
      s:write("HTTP/1.1 200 Connection established\r\n\r\n")
      luna.spawn(function()
        while true do
          local data = up:read()
          if not data then s:close(); return end
          s:write(data)
        end
      end)
      while true do
        local data = s:read()
        if not data then up:close(); return end
        up:write(data)
      end
    end }
    local proxy = "http://127.0.0.1:" .. tunnel.port
    local url = "https://127.0.0.1:" .. target.port
    r, err = http.request({ url = url .. "/one", proxy = proxy, tls = { ca = data .. "ca.pem" } })
    T.eq(r and r.body, "tunnelled /one", tostring(err))
    T.ok(seen[1]:find("^CONNECT 127.0.0.1:" .. target.port .. " HTTP/1.1"), seen[1])
    r = assert(http.request({ url = url .. "/two", proxy = proxy, tls = { ca = data .. "ca.pem" } }))
    T.eq(r.timings.reused, true, "the tunnel is pooled")
    T.eq(#seen, 1, "one CONNECT for both")
    local _, terr = http.request({ url = url .. "/", proxy = proxy })
    T.ok(terr and terr:find("UnknownIssuer", 1, true), "verified end to end: " .. tostring(terr))
    _, terr = http.request({ url = url .. "/", proxy = "http://refuse@127.0.0.1:" .. tunnel.port, tls = { ca = data .. "ca.pem" } })
    T.ok(terr and terr:find("the proxy refused the tunnel: 407", 1, true), tostring(terr))
    T.raises({ "'proxy' must be a proxy URL" }, http.request, { url = url, proxy = 3 })
    _, terr = http.request({ url = url, proxy = "socks5://127.0.0.1:1" })
    T.ok(terr and terr:find("http:// proxies only", 1, true), tostring(terr))
    target:stop()
    tunnel:close()
  end)

  T.test("lunac.http: the original client's fetch and noawait_fetch", function()
    local server, base = app(function(req) return { status = 201, body = "made " .. req.method } end)
    local body, code, headers, status = lunac.http.fetch(base .. "/x", { method = "POST", body = "1" })
    T.eq(body, "made POST", "body")
    T.eq(code, 201, "code")
    T.eq(headers["content-length"], "9", "headers")
    T.eq(status, "HTTP/1.1 201 Created", "status line")
    local sunk = {}
    T.eq(lunac.http.fetch(base .. "/x", { sink = function(piece) sunk[#sunk + 1] = piece; return 1 end }), 1, "ltn12 sink")
    T.eq(table.concat(sunk), "made GET", "sink got the body")
    local got
    lunac.http.noawait_fetch(base .. "/y", nil, function(b, c) got = { b, c } end)
    T.wait_until(function() return got end, 2, "noawait")
    T.eq(got[1], "made GET", "noawait body")
    lunac.http.init({ luna = luna, lunac = lunac, headers = { ["X-Default"] = "yes" } })
    local echoed = lunac.http.fetch(base .. "/x", { timeout = { connect = 2, receive = 5 }, step = function() end })
    T.eq(echoed, "made GET", "LuaSocket's timeout table and step are taken")
    lunac.http.init()
    local nb, nerr = lunac.http.fetch("http://127.0.0.1:1/")
    T.eq(nb, nil, "error")
    T.ok(nerr:find("refused"), nerr)
    server:stop()
  end)
end
