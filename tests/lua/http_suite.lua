-- HTTP servers (luna.serve): our server and a raw luna.tcp client in one process, over real
-- sockets on 127.0.0.1.
return function(T, luna)
  local tcp = luna.tcp

  local client = require("http_client")(luna)
  local read_response, exchange, get = client.read_response, client.exchange, client.get

  T.test("http: hello, request fields, a free port, the address", function()
    local seen
    local server = luna.serve({ port = 0, handleRequest = function(req)
      seen = req
      return "Hello, World!"
    end })
    T.ok(server.port > 0, "a free port")
    T.eq(server.address, "http://127.0.0.1:" .. server.port, "address")
    local r = exchange(server.port, "POST /a/b?x=1&y=two%20words&x=3 HTTP/1.1\r\nHost: t\r\n"
      .. "X-Rep: 1\r\nx-rep: 2\r\nCookie: a=1\r\nCookie: b=2\r\nContent-Length: 4\r\n\r\nbody")[1]
    T.eq(r.status, 200, "status")
    T.eq(r.body, "Hello, World!", "body")
    T.eq(r.headers["content-type"], "text/plain; charset=utf-8", "a string is plain text")
    T.ok(r.headers.date and r.headers.date:match("GMT$"), "a Date header")
    T.eq(seen.method, "POST", "method")
    T.eq(seen.path, "/a/b", "path")
    T.eq(seen.raw_query, "x=1&y=two%20words&x=3", "raw query")
    T.eq(seen.query.y, "two words", "decoded query")
    T.eq(seen.query.x, "3", "the last of a repeated key")
    T.eq(seen.headers["x-rep"], "1, 2", "repeated headers joined")
    T.eq(seen.headers.cookie, "a=1; b=2", "cookies joined with ;")
    T.eq(seen.body, "body", "body")
    server:stop()
  end)

  T.test("http: table responses, statuses, repeated headers, HEAD and 204", function()
    local server = luna.serve(0, function(req)
      if req.path == "/empty" then return { status = 204 } end
      return { status = 201, headers = { ["Set-Cookie"] = { "a=1", "b=2" }, ["X-N"] = 7 }, body = "made" }
    end)
    local r = get(server.port, "/")
    T.eq(r.status, 201, "status")
    T.eq(r.body, "made", "body")
    T.eq(#r.headers["set-cookie"], 2, "two Set-Cookie fields")
    T.eq(r.headers["x-n"], "7", "a number header")
    local s = assert(tcp.connect("127.0.0.1", server.port))
    s:write("HEAD / HTTP/1.1\r\nHost: t\r\n\r\nGET /empty HTTP/1.1\r\nHost: t\r\n\r\n")
    local head, rest = read_response(s, "", true)
    T.eq(head.status, 201, "HEAD answered")
    T.eq(head.headers["content-length"], "4", "HEAD: the length GET would have")
    local empty = read_response(s, rest)
    T.eq(empty.status, 204, "HEAD sent no body: the next response follows at once")
    T.eq(empty.headers["content-length"], nil, "204: no length")
    s:close()
    server:stop()
  end)

  T.test("http: keep-alive and pipelining answer in order on one connection", function()
    local server = luna.serve(0, function(req)
      if req.path == "/slow" then luna.sleep(0.05) end
      return req.path
    end)
    local raw = ""
    for _, p in ipairs({ "/1", "/slow", "/3" }) do raw = raw .. "GET " .. p .. " HTTP/1.1\r\nHost: t\r\n\r\n" end
    local rs, s = exchange(server.port, raw, 3)
    T.eq(#rs, 3, "three answers")
    T.eq(rs[1].body .. rs[2].body .. rs[3].body, "/1/slow/3", "in request order")
    s:write("GET /again HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    local again = read_response(s)
    T.eq(again.body, "/again", "the connection was kept")
    T.eq(again.headers.connection, "close", "Connection: close answered")
    T.eq(s:read(), nil, "then closed")
    -- Far more pipelined requests than the server buffers, answered at once by the handler.
    local many = ("GET /n HTTP/1.1\r\nHost: t\r\n\r\n"):rep(2000)
    local answers = exchange(server.port, many, 2000)
    T.eq(#answers, 2000, "2000 pipelined requests answered")
    T.eq(answers[2000].body, "/n", "the last one too")
    server:stop()
  end)

  T.test("http: a sleeping handler does not hold other connections", function()
    local server = luna.serve(0, function(req)
      if req.path == "/slow" then luna.sleep(0.3) end
      return "ok " .. req.path
    end)
    local slow_done, t0 = nil, luna.now()
    luna.spawn(function() slow_done = get(server.port, "/slow") and luna.now() end)
    local fast = get(server.port, "/fast")
    local fast_at = luna.now()
    T.eq(fast.body, "ok /fast", "fast answer")
    T.ok(fast_at - t0 < 0.25, "answered while the other handler sleeps")
    T.wait_until(function() return slow_done end, 2, "the slow answer")
    server:stop()
  end)

  T.test("http: chunked bodies, 100-continue, and refusals with their codes", function()
    local server = luna.serve(0, function(req) return "got " .. req.body end)
    local r = get(server.port, "/", "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n")
    T.eq(r.body, "got abcde", "chunked body")
    local s = assert(tcp.connect("127.0.0.1", server.port))
    s:write("PUT / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    local cont = s:read()
    T.eq(cont, "HTTP/1.1 100 Continue\r\n\r\n", "100 Continue before the body")
    s:write("hi")
    T.eq(read_response(s).body, "got hi", "then the answer")
    s:close()
    local cases = {
      { "GET / HTTP/1.1\r\n\r\n", 400 },
      { "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400 },
      { "GET / HTTP/3.0\r\nHost: t\r\n\r\n", 505 },
      { "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999\r\n\r\n", 413 },
      { "GET /" .. ("a"):rep(9000) .. " HTTP/1.1\r\nHost: t\r\n\r\n", 414 },
      { "GET / HTTP/1.1\r\nHost: t\r\nX: " .. ("v"):rep(17000) .. "\r\n\r\n", 431 },
    }
    for _, c in ipairs(cases) do
      local answer = exchange(server.port, c[1])[1]
      T.eq(answer and answer.status, c[2], c[1]:sub(1, 40))
      T.eq(answer.headers.connection, "close", "closes after a refusal")
    end
    server:stop()
  end)

  T.test("http: a failing handler gives 500 and goes to the error handler", function()
    local errors = {}
    local server = luna.serve(0, { error_handler = function(e) errors[#errors + 1] = e end,
      handleRequest = function(req)
        if req.path == "/raise" then error("boom") end
        if req.path == "/nil" then return nil end
        if req.path == "/status" then return { status = 99 } end
        return { headers = { ["x-bad"] = "a\r\nInjected: 1" } }
      end })
    for _, path in ipairs({ "/raise", "/nil", "/status", "/inject" }) do
      local r = get(server.port, path)
      T.eq(r.status, 500, path .. " → 500")
      T.eq(r.headers.injected, nil, "nothing injected")
    end
    T.eq(#errors, 4, "each failure reported")
    T.ok(errors[1]:find("boom", 1, true), errors[1])
    T.ok(errors[2]:find("must return a string or a table", 1, true), errors[2])
    T.ok(errors[3]:find("200-599", 1, true), errors[3])
    T.ok(errors[4]:find("CR, LF or NUL", 1, true), errors[4])
    server:stop()
  end)

  T.test("http: stop answers the request in flight, then refuses connections", function()
    local release
    local server = luna.serve(0, function()
      while not release do luna.sleep(0.005) end
      return "finished"
    end)
    local port, answer = server.port, nil
    luna.spawn(function() answer = get(port, "/") end)
    luna.sleep(0.05)
    server:stop()
    server.stop() -- Lune's form, and a second stop, are fine
    local s = tcp.connect("127.0.0.1", port)
    T.eq(s, nil, "no new connections")
    release = true
    T.wait_until(function() return answer end, 2, "the answer in flight")
    T.eq(answer.body, "finished", "answered")
    T.eq(answer.headers.connection, "close", "and closed")
  end)

  T.test("http: a query of thousands of pairs reaches the handler", function()
    local seen
    local server = luna.serve(0, { max_uri_size = 65536, max_header_size = 65536, handleRequest = function(req)
      seen = req.query
      return "ok"
    end })
    -- 4000 pairs within the default limits (more than a Lua call takes as arguments on LuaJIT).
    T.eq(get(server.port, "/?" .. ("a&"):rep(4000)).status, 200, "4000 pairs answered")
    T.eq(seen.a, "", "a key without a value")
    local pairs_ = {}
    for i = 1, 5000 do pairs_[i] = "k" .. i .. "=" .. i end
    local r = get(server.port, "/?" .. table.concat(pairs_, "&"))
    T.eq(r.status, 200, "answered")
    T.eq(seen.k1, "1", "first pair")
    T.eq(seen.k5000, "5000", "last pair")
    server:stop()
  end)

  T.test("http: a slow reader of a long answer keeps its connection past send_timeout", function()
    local big = ("x"):rep(8 * 1024 * 1024)
    local server = luna.serve(0, { send_timeout = 1, handleRequest = function() return big end })
    local s = assert(tcp.connect("127.0.0.1", server.port, { max_input = 64 * 1024 }))
    s:write("GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    local got, t0 = 0, luna.now()
    while true do
      local chunk = s:read(32 * 1024)
      if not chunk then break end
      got = got + #chunk
      if got >= #big then break end
      luna.sleep(0.008) -- about 4 MB/s: the whole answer takes about two seconds
    end
    T.ok(got >= #big, ("the whole answer arrived (%d of %d bytes)"):format(got, #big))
    T.ok(luna.now() - t0 > 1.5, "well over send_timeout")
    s:close()
    server:stop()
  end, 10)

  T.test("http: a handler may stop its own server; luna.close() stops every server", function()
    local server
    server = luna.serve(0, function(req)
      if req.path == "/stop" then server:stop() end
      return "answered " .. req.path
    end)
    local other = luna.serve(0, function() return "other" end)
    local r = get(server.port, "/stop")
    T.eq(r.body, "answered /stop", "the request that stopped it is answered")
    T.eq(r.headers.connection, "close", "and its connection closed")
    T.eq(tcp.connect("127.0.0.1", server.port), nil, "stopped")
    T.eq(get(other.port, "/").body, "other", "the other server runs")
    luna.close()
    T.eq(tcp.connect("127.0.0.1", other.port), nil, "luna.close() stopped it")
  end)

  T.main("http: url_encode and url_decode (Lune's urlEncode/urlDecode)", function()
    T.eq(luna.url_encode("a b&c=d/é~-._"), "a%20b%26c%3Dd%2F%C3%A9~-._", "unreserved kept, the rest as %XX")
    T.eq(luna.url_decode("a%20b+%26%C3%A9"), "a b+&é", "decoded; + stays")
    T.eq(luna.url_decode(luna.url_encode("round trip: ü?")), "round trip: ü?", "round trip")
    T.eq(luna.url_encode("\255\0", true), "%FF%00", "bytes with binary = true")
    T.eq(luna.url_decode("%FF", true), "\255", "bytes back with binary = true")
    T.eq(luna.url_decode("100%"), "100%", "a lone % stays")
    T.raises({ "luna.url_encode", "binary = true" }, luna.url_encode, "\255")
    T.raises({ "luna.url_decode", "binary = true" }, luna.url_decode, "%FF")
  end)

  T.main("http: misuse names the call and the fix", function()
    T.raises({ "luna.serve", "port" }, luna.serve, "x")
    T.raises({ "luna.serve", "handleRequest" }, luna.serve, 0, {})
    T.raises({ "luna.serve", "unknown option 'max_mesage_size'" }, luna.serve, 0,
      { handleRequest = print, websocket = { max_mesage_size = 1 } })
    T.raises({ "luna.serve", "unknown" }, luna.serve, 0, { handleRequest = print, prot = 1 })
    T.raises({ "luna.serve", "given twice" }, luna.serve, 0, { handleRequest = print, port = 1 })
  end)
end
