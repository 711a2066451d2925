-- HTTP apps (luna.new_http_app) and luna.json: our server and a raw luna.tcp client in one
-- process, over real sockets on 127.0.0.1. Tests named "bug" fail on the original Luna.
return function(T, luna)
  local client = require("http_client")(luna)
  local exchange, get = client.exchange, client.get

  local function app_on(config, setup)
    local errors = {}
    config = config or {}
    config.error_handler = config.error_handler or function(e) errors[#errors + 1] = e end
    local app = luna.new_http_app(config)
    if setup then setup(app) end
    app:listen(0)
    return app, app.server.port, errors
  end

  local function request(port, method, path, extra, body)
    body = body or ""
    local raw = method .. " " .. path .. " HTTP/1.1\r\nHost: t\r\n" .. (extra or "")
    if body ~= "" then raw = raw .. "Content-Length: " .. #body .. "\r\n" end
    local rs, s = exchange(port, raw .. "\r\n" .. body)
    s:close()
    return rs[1]
  end

  T.test("http app: routes, parameters, wildcards, trailing slashes, 404 and 405 with Allow", function()
    local app, port = app_on(nil, function(app)
      app:get("/hello", function(_, res) res:send("hi") end)
      app:get("/users/:id", function(req, res) res:send("user " .. req.params.id) end)
      app:get("/users/:id/posts/:post", function(req, res) res:send(req.params.id .. "/" .. req.params.post) end)
      app:get("/files/*path", function(req, res) res:send("file " .. req.params.path) end)
      app:post("/hello", function(req, res) res:status(201):send("posted " .. req.body) end)
      app:get("/returns", function() return "a returned string" end)
    end)
    T.eq(get(port, "/hello").body, "hi", "exact route")
    T.eq(get(port, "/users/42").body, "user 42", "a parameter")
    T.eq(get(port, "/users/a%20b").body, "user a b", "parameters are decoded")
    T.eq(get(port, "/users/7/posts/9").body, "7/9", "two parameters")
    T.eq(get(port, "/files/a/b/c.txt").body, "file a/b/c.txt", "a wildcard takes the rest")
    T.eq(get(port, "/returns").body, "a returned string", "a handler may return the body")
    local missing = get(port, "/hello/")
    T.eq(missing.status, 404, "a trailing slash is another path")
    T.eq(missing.body, "Not Found: /hello/", "the original's 404 text")
    T.eq(missing.headers["content-type"], "text/plain; charset=utf-8", "as plain text (no markup from the path)")
    T.eq(get(port, "/users/").status, 404, "an empty parameter does not match")
    local posted = request(port, "POST", "/hello", nil, "data")
    T.eq(posted.status, 201, "status chained")
    T.eq(posted.body, "posted data", "POST body")
    local wrong = request(port, "DELETE", "/hello")
    T.eq(wrong.status, 405, "known path, other method")
    T.eq(wrong.headers.allow, "GET, POST, HEAD, OPTIONS", "Allow lists the methods")
    local options = request(port, "OPTIONS", "/users/1")
    T.eq(options.status, 204, "OPTIONS answered from the routes")
    T.eq(options.headers.allow, "GET, HEAD, OPTIONS", "with Allow")
    app:stop()
  end)

  T.test("http app: HEAD from GET, the body awaited, empty and 204 answers, keep-alive (bugs)", function()
    local app, port = app_on(nil, function(app)
      app:get("/page", function(_, res) res:send("twelve bytes") end)
      app:post("/echo", function(req, res) res:send(#req.body .. ":" .. req.body:sub(-3)) end)
      app:delete("/thing", function(_, res) res:status(204):send("") end)
      app:get("/empty", function(_, res) res:send("") end)
    end)
    local s = assert(luna.tcp.connect("127.0.0.1", port))
    s:write("HEAD /page HTTP/1.1\r\nHost: t\r\n\r\n")
    local head, rest = client.read_response(s, "", true)
    T.eq(head.status, 200, "HEAD routed to GET")
    T.eq(head.headers["content-length"], "12", "with GET's length")
    -- A body in a later segment than its head (the original parsed what had arrived).
    local body = ("x"):rep(3000) .. "end"
    s:write("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body:sub(1, 100))
    luna.sleep(0.02)
    s:write(body:sub(101))
    local echoed
    echoed, rest = client.read_response(s, rest)
    T.eq(echoed.body, "3003:end", "the whole body reached the handler")
    s:write("DELETE /thing HTTP/1.1\r\nHost: t\r\n\r\nGET /empty HTTP/1.1\r\nHost: t\r\n\r\n")
    local deleted
    deleted, rest = client.read_response(s, rest)
    T.eq(deleted.status, 204, "a 204 is sent (the original never sent it)")
    local empty = client.read_response(s, rest)
    T.eq(empty.status, 200, "an empty body is sent")
    T.eq(empty.headers["content-length"], "0", "with length 0")
    T.eq(empty.headers.connection, nil, "and the connection kept (one socket for four requests)")
    s:close()
    app:stop()
  end)

  T.test("http app: nested groups, routes added after listen, group middleware (bugs)", function()
    local seen = {}
    local app, port = app_on()
    local api = app:group("/api")
    local v2 = api:group("/v2")
    v2:use(function(req, _, nxt) seen[#seen + 1] = "v2 " .. req.path; nxt() end)
    v2:get("/x", function(_, res) res:send("v2 x") end)
    api:get("/", function(_, res) res:send("api root") end)
    T.eq(get(port, "/api/v2/x").body, "v2 x", "a nested group's route (lost in the original)")
    T.eq(get(port, "/api").body, "api root", "a group's '/' is its prefix")
    app:get("/late", function(_, res) res:send("late") end)
    api:get("/later", function(_, res) res:send("later") end)
    T.eq(get(port, "/late").body, "late", "a route added after listen")
    T.eq(get(port, "/api/later").body, "later", "a group route added after listen")
    T.eq(#seen, 1, "the group's middleware ran for its route only")
    T.eq(seen[1], "v2 /api/v2/x", "with the request")
    app:stop()
  end)

  T.test("http app: middleware order, next, async middleware, errors give 500 (bugs)", function()
    local order = {}
    local handled = 0
    local app, port, errors = app_on(nil, function(app)
      app:use(function(req, res, nxt)
        order[#order + 1] = "first"
        if req.path == "/deny" then return res:status(403):send("denied") end
        if req.path == "/silent" then return end
        nxt()
        order[#order + 1] = "first after"
      end)
      app:use(function(req, _, nxt)
        order[#order + 1] = "second"
        if req.path == "/boom" then error("second middleware failed") end
        if req.path == "/twice" then nxt(); nxt() end
        luna.sleep(0.01)
        nxt()
      end)
      for _, p in ipairs({ "/ok", "/deny", "/silent", "/boom", "/twice" }) do
        app:get(p, function(_, res) handled = handled + 1; res:send("handled") end)
      end
    end)
    T.eq(get(port, "/ok").body, "handled", "through both middlewares")
    T.eq(table.concat(order, ","), "first,second,first after", "in order, after next returns")
    T.eq(get(port, "/deny").status, 403, "a middleware answers")
    T.eq(handled, 1, "and the handler did not run")
    local silent = get(port, "/silent")
    T.eq(silent.status, 200, "a middleware that neither sends nor calls next: what it set")
    T.eq(handled, 1, "the handler did not run (it did in the original)")
    local boom = get(port, "/boom")
    T.eq(boom.status, 500, "an error in a later middleware gives 500 (swallowed in the original)")
    T.ok(errors[1] and errors[1]:find("second middleware failed", 1, true), tostring(errors[1]))
    T.eq(get(port, "/twice").status, 500, "next() twice is an error")
    T.ok(errors[2] and errors[2]:find("next() twice", 1, true), tostring(errors[2]))
    app:stop()
  end)

  T.test("http app: response calls, cookies, json, redirect, sendFile", function()
    local file = os.tmpname()
    local f = assert(io.open(file .. ".txt", "wb"))
    f:write("file body")
    f:close()
    local app, port, errors = app_on(nil, function(app)
      app:get("/cookies", function(req, res)
        res:cookie("session", "a b;c", { path = "/", http_only = true, max_age = 60, same_site = "Lax" })
          :cookie("theme", "dark")
        res:send((req.cookies.a or "-") .. "," .. (req.cookies.b or "-"))
      end)
      app:get("/json", function(_, res) res:json({ ok = true, list = { 1, 2, 3 } }) end)
      app:get("/raw-json", function(_, res) res:json('{"verbatim":1}') end)
      app:get("/go", function(_, res) res:redirect("/there", 301) end)
      app:get("/file", function(_, res) res:sendFile(file .. ".txt") end)
      app:get("/nofile", function(_, res) res:sendFile(file .. ".missing") end)
      app:get("/headers", function(_, res)
        res:setHeader("X-One", "1"):setHeader("x-one", "2"):setHeader("X-List", { "a", "b" })
        res:send("h")
      end)
      app:get("/again", function(_, res) res:send("a"); res:send("b") end)
    end)
    local c = get(port, "/cookies", "Cookie: a=1; b=two%20words\r\n")
    T.eq(c.body, "1,two words", "req.cookies, decoded")
    T.eq(#c.headers["set-cookie"], 2, "two Set-Cookie fields")
    local session = c.headers["set-cookie"][1]
    T.ok(session:find("^session=a%%20b%%3Bc"), "the value percent-encoded: " .. session)
    T.ok(session:find("HttpOnly", 1, true) and session:find("Max-Age=60", 1, true)
      and session:find("SameSite=Lax", 1, true) and session:find("Path=/", 1, true), session)
    local j = get(port, "/json")
    T.eq(j.headers["content-type"], "application/json", "json type")
    local decoded = luna.json.decode(j.body)
    T.eq(decoded.ok, true, "json body")
    T.eq(#decoded.list, 3, "json array")
    T.eq(get(port, "/raw-json").body, '{"verbatim":1}', "a string is sent as is")
    local go = get(port, "/go")
    T.eq(go.status, 301, "redirect status")
    T.eq(go.headers.location, "/there", "Location")
    local sent = get(port, "/file")
    T.eq(sent.body, "file body", "sendFile")
    T.eq(sent.headers["content-type"], "text/plain; charset=utf-8", "its type from the extension")
    local none = get(port, "/nofile")
    T.eq(none.status, 404, "a missing file")
    T.eq(none.body, "File not found", "the original's text")
    local h = get(port, "/headers")
    T.eq(h.headers["x-one"], "2", "header names are case-insensitive: the last set wins")
    T.eq(#h.headers["x-list"], 2, "a list gives repeated fields")
    T.eq(get(port, "/again").status, 500, "sending twice is an error")
    T.ok(errors[1]:find("already sent", 1, true), errors[1])
    os.remove(file .. ".txt")
    os.remove(file)
    app:stop()
  end)

  -- A directory with index.html, a file, a subdirectory, and a secret outside it (plus
  -- symlinks pointing at the secret, absolute and relative, and one that stays inside).
  local function static_tree()
    local base = os.tmpname()
    os.remove(base)
    assert(os.execute("mkdir -p '" .. base .. "/root/sub' && ln -s '" .. base .. "/secret.txt' '" .. base .. "/root/link.txt'"
      .. " && ln -s ../secret.txt '" .. base .. "/root/rel.txt' && ln -s ../data.json '" .. base .. "/root/sub/alias.json'"))
    local function write(path, text)
      local f = assert(io.open(base .. "/" .. path, "wb"))
      f:write(text)
      f:close()
    end
    write("secret.txt", "SECRET")
    write("root/index.html", "<h1>home</h1>")
    write("root/data.json", '{"a":1}')
    write("root/sub/index.html", "sub home")
    write("root/big.bin", ("0123456789"):rep(100))
    write("root/.hidden", "dot")
    return base
  end

  T.test("http app: static files, traversal refused, conditional and range requests (bug)", function()
    local base = static_tree()
    local app, port = app_on(nil, function(app)
      app:use(app.templates.static(base .. "/root"))
      app:get("/api", function(_, res) res:send("route") end)
    end)
    local home = get(port, "/")
    T.eq(home.body, "<h1>home</h1>", "/ serves index.html")
    T.eq(home.headers["content-type"], "text/html; charset=utf-8", "html type")
    T.eq(get(port, "/sub/").body, "sub home", "a directory's index.html")
    T.eq(get(port, "/data.json").headers["content-type"], "application/json; charset=utf-8", "json type")
    T.eq(get(port, "/api").body, "route", "no file: the routes answer")
    T.eq(get(port, "/sub/alias.json").body, '{"a":1}', "a symlink that stays inside is followed")
    for _, attack in ipairs({ "/..././secret.txt", "/../secret.txt", "/%2e%2e/secret.txt", "/sub/..%2f..%2fsecret.txt",
      "/..%5csecret.txt", "/index.html%00.txt", "/link.txt", "/rel.txt", "//../secret.txt" }) do
      local r = get(port, attack)
      T.ok(r.status == 403 or r.status == 404, attack .. " → " .. tostring(r.status))
      T.ok(not r.body:find("SECRET", 1, true), attack .. " must not reach the secret")
    end
    local etag, modified = home.headers.etag, home.headers["last-modified"]
    T.ok(etag and modified, "ETag and Last-Modified")
    local cached = get(port, "/", "If-None-Match: " .. etag .. "\r\n")
    T.eq(cached.status, 304, "If-None-Match → 304")
    T.eq(cached.body, "", "without a body")
    T.eq(get(port, "/", "If-Modified-Since: " .. modified .. "\r\n").status, 304, "If-Modified-Since → 304")
    T.eq(get(port, "/", 'If-None-Match: "other"\r\n').status, 200, "another tag → 200")
    T.eq(get(port, "/big.bin", "Range: bytes=5-2\r\n").status, 200, "an invalid range is ignored")
    T.eq(get(port, "/.hidden").status, 404, "dotfiles are not served")
    local part = get(port, "/big.bin", "Range: bytes=10-14\r\n")
    T.eq(part.status, 206, "a range → 206")
    T.eq(part.body, "01234", "the bytes asked for")
    T.eq(part.headers["content-range"], "bytes 10-14/1000", "Content-Range")
    T.eq(get(port, "/big.bin", "Range: bytes=-3\r\n").body, "789", "a suffix range")
    local bad = get(port, "/big.bin", "Range: bytes=5000-\r\n")
    T.eq(bad.status, 416, "past the end → 416")
    T.eq(bad.headers["content-range"], "bytes */1000", "with the size")
    local s = assert(luna.tcp.connect("127.0.0.1", port))
    s:write("HEAD /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    local head = client.read_response(s, "", true)
    T.eq(head.headers["content-length"], "1000", "HEAD: the file's length")
    s:close()
    os.execute("rm -rf '" .. base .. "'")
    app:stop()
  end)

  T.test("http app: a large file streams, pipelined requests wait behind it, stop lets it finish", function()
    local base = os.tmpname()
    local f = assert(io.open(base, "wb"))
    local block = ("0123456789abcdef"):rep(4096)
    for i = 1, 160 do f:write(block:sub(1, -2), string.char(65 + i % 26)) end -- 10 MiB
    f:close()
    local app, port = app_on(nil, function(app)
      app:get("/big", function(_, res) res:sendFile(base, "application/octet-stream") end)
      app:get("/after", function(_, res) res:send("after") end)
    end)
    local s = assert(luna.tcp.connect("127.0.0.1", port))
    s:write("GET /big HTTP/1.1\r\nHost: t\r\n\r\nGET /after HTTP/1.1\r\nHost: t\r\n\r\n")
    local big, rest = client.read_response(s)
    T.eq(#big.body, 160 * 65536, "all 10 MiB")
    T.eq(big.body:sub(65536, 65536), "B", "the first block's mark")
    T.eq(big.body:sub(-1), string.char(65 + 160 % 26), "the last block's mark")
    T.eq(client.read_response(s, rest).body, "after", "then the pipelined request")
    s:write("GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
    local first = s:read()
    T.ok(first and first:find("^HTTP/1.1 200"), "the download started")
    app:stop()
    local got = #first - first:find("\r\n\r\n", 1, true) - 3
    while true do
      local chunk = s:read()
      if not chunk then break end
      got = got + #chunk
    end
    T.eq(got, 160 * 65536, "a stopped server finishes the file, then closes")
    os.remove(base)
  end, 20)

  T.test("http app: answers sent piece by piece (Moonbridge's send_data, flush, finish)", function()
    local flushed, kept
    local app, port, errors = app_on(nil, function(app)
      app:get("/chunked", function(_, res)
        res:send_status(201):send_header("X-Part", "1"):send_header("X-Part", "2")
        res:send_data("one ", "two ")
        res:send_data(3)
        res:finish()
      end)
      app:get("/length", function(_, res)
        res:send_header("Content-Length", "10")
        res:send_data("0123456789")
      end)
      app:get("/big", function(_, res)
        for _ = 1, 512 do assert(res:send_data(("x"):rep(65536))) end
        flushed = res:flush()
      end)
      app:get("/close", function(_, res)
        res:close_after_finish()
        res:send_data("bye")
      end)
      app:get("/fail", function(_, res)
        res:send_data("partial")
        error("failed half-way")
      end)
      app:get("/tick", function(_, res)
        res:send_data("data: 1\n\n")
        flushed = res:flush() -- a small piece the socket takes at once
        res:send_data("data: 2\n\n")
      end)
      app:get("/keep", function(_, res)
        kept = res
        res:send("answered")
      end)
    end)
    local s = assert(luna.tcp.connect("127.0.0.1", port))
    s:write("GET /chunked HTTP/1.1\r\nHost: t\r\n\r\nGET /length HTTP/1.1\r\nHost: t\r\n\r\n")
    local raw = ""
    while not raw:find("0123456789", 1, true) do raw = raw .. assert(s:read()) end
    T.ok(raw:find("^HTTP/1.1 201 Created\r\n"), raw)
    T.ok(raw:find("transfer-encoding: chunked\r\n", 1, true), "chunked without a length")
    T.ok(raw:find("x-part: 1\r\nx-part: 2\r\n", 1, true), "repeated send_header")
    T.ok(raw:find("\r\n\r\n4\r\none \r\n4\r\ntwo \r\n1\r\n3\r\n0\r\n\r\nHTTP/1.1 200 OK", 1, true), raw)
    T.ok(raw:find("content-length: 10\r\n", 1, true) and raw:find("\r\n\r\n0123456789$"), "a length given first")
    s:close()
    -- A client that reads slowly: the handler waits in send_data and flush, memory stays bounded.
    s = assert(luna.tcp.connect("127.0.0.1", port))
    s:write("GET /big HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    luna.sleep(0.2)
    T.eq(flushed, nil, "the handler still waits for the client")
    local got = 0
    while true do
      local chunk = s:read()
      if not chunk then break end
      got = got + #chunk
    end
    T.ok(got > 512 * 65536, "all 32 MiB arrived: " .. got)
    T.wait_until(function() return flushed end, 2, "flush returned")
    local closing = exchange(port, "GET /close HTTP/1.1\r\nHost: t\r\n\r\n")
    T.eq(closing[1] and closing[1].headers.connection, "close", "close_after_finish")
    s = assert(luna.tcp.connect("127.0.0.1", port))
    s:write("GET /fail HTTP/1.1\r\nHost: t\r\n\r\n")
    raw = ""
    while true do
      local chunk = s:read()
      if not chunk then break end
      raw = raw .. chunk
    end
    -- What was queued may or may not have left before the cut; it is never ended as if whole.
    T.ok(not raw:find("0\r\n\r\n", 1, true) and not raw:find(" 500 ", 1, true), "cut: " .. raw)
    T.ok(errors[1] and errors[1]:find("failed half-way", 1, true), tostring(errors[1]))
    flushed = nil
    s = assert(luna.tcp.connect("127.0.0.1", port))
    s:write("GET /tick HTTP/1.1\r\nHost: t\r\n\r\nGET /keep HTTP/1.1\r\nHost: t\r\n\r\n")
    raw = ""
    while not raw:find("answered", 1, true) do raw = raw .. assert(s:read()) end
    T.ok(raw:find("data: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n", 1, true), raw)
    T.eq(flushed, true, "flush after a small piece returned (the socket took it at once)")
    T.eq(select(2, kept:send_data("late")), "the request was answered", "a res kept past its handler writes nothing")
    s:close()
    app:stop()
  end)

  T.test("http app: Moonbridge's GET and POST parameters, urlencoded and multipart", function()
    local seen
    local app, port = app_on(nil, function(app)
      app:use(app.templates.body_parser())
      app:post("/form", function(req, res)
        seen = req
        res:send("ok")
      end)
    end)
    request(port, "POST", "/form?a=1&a=2&b=x%20y", "Content-Type: application/x-www-form-urlencoded\r\n", "n=1&n=2&m=%C3%A9")
    T.eq(seen.get_params.b, "x y", "get_params")
    T.eq(table.concat(seen.get_params_list.a, ","), "1,2", "get_params_list")
    T.eq(seen.post_params.m, "é", "post_params")
    T.eq(table.concat(seen.post_params_list.n, ","), "1,2", "post_params_list")
    T.eq(type(seen.body), "table", "body_parser replaced req.body")
    T.eq(seen.raw_body, "n=1&n=2&m=%C3%A9", "raw_body keeps the text")
    local b = "XyZ"
    local body = "--" .. b .. "\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nhello\r\n"
      .. "--" .. b .. "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\n"
      .. "Content-Type: application/octet-stream\r\n\r\n\0\1\2\r\n"
      .. "--" .. b .. "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.txt\"\r\n\r\nsecond\r\n"
      .. "--" .. b .. "--\r\n"
    request(port, "POST", "/form", "Content-Type: multipart/form-data; boundary=" .. b .. "\r\n", body)
    T.eq(seen.post_params.title, "hello", "a text field")
    T.eq(seen.post_params_list.file[1], "\0\1\2", "a file's bytes")
    T.eq(seen.post_metadata_list.file[1].file_name, "a.bin", "its file name")
    T.eq(seen.post_metadata_list.file[1].content_type, "application/octet-stream", "its type")
    T.eq(seen.post_metadata.file.file_name, "b.txt", "the last of a repeated name")
    request(port, "POST", "/form", "Content-Type: multipart/form-data; boundary=" .. b .. "\r\n", "--" .. b .. "\r\ngarbage")
    T.ok(seen.post_error, "a malformed body says why")
    T.eq(next(seen.post_params), nil, "and has no fields")
    app:stop()
  end)

  T.test("http app: gzip when asked, accepted and worth it", function()
    local text = ("Luna compresses text. "):rep(200)
    local app, port = app_on({ compress = true }, function(app)
      app:get("/text", function(_, res) res:send(text) end)
      app:get("/small", function(_, res) res:send("tiny") end)
      app:get("/png", function(_, res) res:setHeader("Content-Type", "image/png"):send(text) end)
      app:get("/off", function(_, res) res:compress(false):send(text) end)
    end)
    local gz = get(port, "/text", "Accept-Encoding: br;q=1, gzip;q=0.5\r\n")
    T.eq(gz.headers["content-encoding"], "gzip", "compressed")
    T.eq(gz.headers.vary, "Accept-Encoding", "Vary")
    T.ok(#gz.body < #text / 5 and gz.body:sub(1, 2) == "\31\139", "a gzip stream, smaller: " .. #gz.body)
    T.eq(get(port, "/text").body, text, "not without Accept-Encoding")
    T.eq(get(port, "/text", "Accept-Encoding: gzip;q=0\r\n").body, text, "not when refused (q=0)")
    T.eq(get(port, "/small", "Accept-Encoding: gzip\r\n").headers["content-encoding"], nil, "not for a tiny body")
    T.eq(get(port, "/png", "Accept-Encoding: gzip\r\n").headers["content-encoding"], nil, "not for images")
    T.eq(get(port, "/off", "Accept-Encoding: gzip\r\n").headers["content-encoding"], nil, "not when turned off")
    app:stop()
  end)

  T.test("http app: cors, rate_limited, body_parser, logger templates", function()
    local lines = {}
    local app, port = app_on(nil, function(app)
      local t = app.templates
      app:use(t.logger({ stream = function(line) lines[#lines + 1] = line end }))
      app:use(t.cors({ origins = { "https://game.example" }, methods = { "GET", "POST", "OPTIONS" }, credentials = true }))
      app:use(t.rate_limited({ max_requests = 1, window_ms = 60000 }))
      app:use(t.body_parser())
      app:post("/parse", function(req, res)
        res:json({ kind = type(req.body), name = type(req.body) == "table" and req.body.name or req.body })
      end)
    end)
    local pre = request(port, "OPTIONS", "/parse", "Origin: https://game.example\r\nAccess-Control-Request-Method: POST\r\n"
      .. "Access-Control-Request-Headers: content-type\r\n")
    T.eq(pre.status, 204, "preflight")
    T.eq(pre.headers["access-control-allow-origin"], "https://game.example", "the listed origin")
    T.eq(pre.headers["access-control-allow-credentials"], "true", "credentials")
    T.eq(request(port, "OPTIONS", "/parse", "Access-Control-Request-Method: DELETE\r\n").status, 405, "method refused")
    local j = request(port, "POST", "/parse", "Content-Type: application/json\r\nX-Forwarded-For: 1.2.3.4\r\n", '{"name":"ada"}')
    T.eq(luna.json.decode(j.body).name, "ada", "a JSON body parsed")
    T.eq(j.headers["access-control-allow-origin"], "null", "an unlisted origin (none sent)")
    T.eq(j.headers["x-ratelimit-remaining"], "0", "preflights are answered before the limiter")
    local limited = request(port, "POST", "/parse", "Content-Type: application/json\r\nX-Forwarded-For: 9.9.9.9\r\n", "{}")
    T.eq(limited.status, 429, "the second is limited: X-Forwarded-For is not trusted by default")
    T.ok(tonumber(limited.headers["retry-after"]) > 0, "Retry-After")
    T.eq(luna.json.decode(limited.body).error, "Too many requests", "the message")
    T.eq(#lines, 4, "the logger logged each request")
    T.ok(lines[3]:find("^POST /parse 200 [%d.]+ ms$"), lines[3])
    app:stop()
    local app2, port2 = app_on(nil, function(a)
      a:use(a.templates.body_parser())
      a:post("/", function(req, res) res:send(type(req.body) == "table" and req.body.x .. "+" .. req.body.y or req.body) end)
    end)
    T.eq(request(port2, "POST", "/", "Content-Type: application/x-www-form-urlencoded\r\n", "x=a%20b&y=c").body,
      "a b+c", "a form parsed")
    T.eq(request(port2, "POST", "/", "Content-Type: application/json\r\n", "{broken").body, "{broken",
      "bad JSON stays a string")
    app2:stop()
  end)

  T.test("http app: client events, counts, timeouts, stop", function()
    local events = {}
    local app, port = app_on({
      new_client = function(ip, data) events[#events + 1] = "new " .. tostring(ip == data.ip) end,
      close_client = function(_, _, reason) events[#events + 1] = "close " .. reason end,
      timeout_client = function(_, _, idle) events[#events + 1] = "timeout " .. tostring(idle > 0) end,
    }, function(app)
      app:set_default_timeout(0.2)
      app:get("/", function(req, res) res:send(tostring(req.client_data.ip == req.ip)) end)
    end)
    T.ok(app:is_running(), "running")
    local s = assert(luna.tcp.connect("127.0.0.1", port))
    s:write("GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    T.eq(client.read_response(s).body, "true", "client_data per connection")
    T.eq(app:get_client_count(), 1, "one client")
    T.wait_until(function() return #events >= 3 end, 2, "the idle timeout")
    T.eq(table.concat(events, ","), "new true,timeout true,close timeout", "events in order")
    T.eq(app:get_client_count(), 0, "none left")
    s:close()
    local r = exchange(port, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")[1]
    T.eq(r.headers.connection, "close", "Connection: close honoured")
    T.wait_until(function() return #events >= 5 end, 2, "close event")
    T.eq(events[5], "close response_sent", "reason")
    app:stop()
    T.ok(not app:is_running(), "stopped")
  end)

  T.test("http app: WebSocket routes on the same port, with middleware, groups and 426", function()
    local lunac = require("lunac")
    local seen = {}
    local app, port = app_on(nil, function(app)
      app:use(function(req, res, nxt)
        seen[#seen + 1] = req.path
        if req.query.token ~= "ok" then return res:status(401):send("no token") end
        nxt()
      end)
      app:get("/page", function(_, res) res:send("a page") end)
      app:websocket("/chat", function(ws)
        while true do
          local message = ws:receive()
          if not message then return end
          ws:broadcast("all: " .. message)
          ws:send("echo: " .. message)
        end
      end)
    end)
    local log = { messages = {} }
    local c = lunac.connect_to_web_app({ name = "app chat client", url = "ws://127.0.0.1:" .. port .. "/chat?token=ok",
      debug = false,
      on_connect = function() log.connected = true end,
      on_message = function(_, message) log.messages[#log.messages + 1] = message end,
      on_close = function(_, code) log.closed = code end })
    T.wait_until(function() return log.connected end, 2, "the upgrade")
    T.eq(app:get_client_count(), 0, "an upgraded connection is no HTTP client any more")
    c:send("hi")
    T.wait_until(function() return #log.messages == 2 end, 2, "two answers")
    T.eq(log.messages[1], "all: hi", "broadcast to the route's group")
    T.eq(log.messages[2], "echo: hi", "the ws object")
    T.eq(get(port, "/page?token=ok").body, "a page", "plain HTTP on the same port")
    local plain = get(port, "/chat?token=ok")
    T.eq(plain.status, 426, "a plain request to a WebSocket route")
    T.eq(plain.headers.upgrade, "websocket", "with Upgrade")
    local refused = { messages = {} }
    lunac.connect_to_web_app({ name = "refused client", url = "ws://127.0.0.1:" .. port .. "/chat", debug = false,
      on_close = function(_, code) refused.closed = code or true end })
    T.wait_until(function() return refused.closed end, 2, "the refusal")
    T.eq(seen[#seen], "/chat", "middleware saw the upgrade request")
    lunac.disconnect_to_web_app(c)
    T.wait_until(function() return log.closed end, 2, "closed")
    app:stop()
  end)

  T.test("http app: a refused WebSocket upgrade is answered and closed", function()
    local app, port = app_on(nil, function(app)
      app:websocket("/ws", function(ws) ws:send("never") end)
    end)
    for _, raw in ipairs({ "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
      "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        .. "Sec-WebSocket-Key: bad\r\n\r\n" }) do
      local s = assert(luna.tcp.connect("127.0.0.1", port))
      s:write(raw)
      local answer = ""
      while true do
        local chunk = s:read()
        if not chunk then break end
        answer = answer .. chunk
      end
      T.ok(answer:find("^HTTP/1.1 4%d%d"), "refused: " .. answer)
      s:close()
    end
    app:stop()
  end)

  T.test("luna.serve: handleWebSocket takes every upgrade", function()
    local lunac = require("lunac")
    local server = luna.serve({ port = 0, handleRequest = function() return "http" end,
      handleWebSocket = function(ws)
        local message = ws:receive()
        ws:send("got " .. message)
        ws:close(1000, "done")
      end })
    local log = { messages = {} }
    local c = lunac.connect_to_web_app({ name = "serve ws client", url = "ws://127.0.0.1:" .. server.port .. "/any",
      debug = false,
      on_connect = function(self) self:send("x") end,
      on_message = function(_, message) log.messages[#log.messages + 1] = message end,
      on_close = function(_, code) log.closed = code end })
    T.wait_until(function() return log.closed end, 2, "the session")
    T.eq(log.messages[1], "got x", "handled")
    T.eq(log.closed, 1000, "closed by the handler")
    T.eq(get(server.port, "/").body, "http", "other requests go to handleRequest")
    server:stop()
  end)

  T.main("http app: misuse names the call and the fix", function()
    T.raises({ "luna.new_http_app(config)", "unknown option 'nmae'" }, luna.new_http_app, { nmae = "x" })
    local app = luna.new_http_app()
    T.raises({ "app:get(path, handler)", "call it with a colon" }, app.get, nil, "/", function() end)
    T.raises({ "app:get(path, handler, options)", "starting with '/'" }, app.get, app, "nope", function() end)
    T.raises({ "app:post(path, handler, options)", "'handler' must be a function" }, app.post, app, "/", 1)
    T.raises({ "app:group(prefix)" }, app.group, app, 5)
    T.raises({ "app:listen", "\"http\" or \"https\"" }, app.listen, app, 0, nil, "ftp")
    T.raises({ "app:listen", "ssl_config" }, app.listen, app, 0, nil, "https")
    T.raises({ "app:set_default_timeout(seconds)" }, app.set_default_timeout, app, -1)
    T.raises({ "wildcard", "last segment" }, app.get, app, "/a/*rest/b", function() end)
  end)

  T.test("http app: a streaming route reads its body as it arrives", function()
    local pieces, seen = {}, {}
    local app, port, errors = app_on(nil, function(app)
      app:put("/up", function(req, res)
        T.eq(req.body, nil, "no req.body on a streaming route")
        local ok, why = req:stream_request_body(function(piece) pieces[#pieces + 1] = piece end)
        return ("%s %s %d"):format(tostring(ok), tostring(why), #table.concat(pieces))
      end, { stream_body = true })
      app:post("/whole", function(req) return "whole " .. req.body end)
      app:post("/read", function(req)
        seen.before = req.body
        seen.body = req:read_body()
        seen.again = req:read_body()
        return "read"
      end, { stream_body = true })
    end)
    local s = assert(luna.tcp.connect("127.0.0.1", port))
    s:write("PUT /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
    T.wait_until(function() return #pieces == 1 end, 2, "the first piece before the rest is sent")
    T.eq(pieces[1], "first", "the first piece")
    s:write("6\r\nsecond\r\n0\r\n\r\n")
    local r = client.read_response(s)
    T.eq(r.body, "true nil 11", "the whole body, in pieces")
    -- The same connection goes on; a route that does not stream awaits a body that comes late.
    s:write("POST /whole HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nab")
    luna.sleep(0.05)
    s:write("cd")
    T.eq(client.read_response(s).body, "whole abcd", "read whole before the handler")
    s:write("POST /read HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nabc")
    luna.sleep(0.05)
    s:write("def")
    T.eq(client.read_response(s).body, "read", "answered")
    T.eq(seen.before, nil, "req.body is nil until read")
    T.eq(seen.body, "abcdef", "req:read_body() waits for all of it")
    T.eq(seen.again, "abcdef", "and gives it again")
    s:close()
    T.eq(#errors, 0, tostring(errors[1]))
    app:stop()
  end)

  T.test("http app: an answer before the body, 100-continue when the body is read", function()
    local app, port = app_on(nil, function(app)
      app:post("/no", function(_, res) res:status(403):send("no thanks") end, { stream_body = true })
      app:post("/yes", function(req) return "got " .. req:read_body() end, { stream_body = true })
      app:post("/plain", function(req) return "plain " .. req.body end)
    end)
    -- The body is on its way: the answer goes first, the rest is read and dropped, and the
    -- connection serves the next request.
    local s = assert(luna.tcp.connect("127.0.0.1", port))
    s:write("POST /no HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n01234")
    local r, rest = client.read_response(s)
    T.eq(r.status, 403, "answered before the body arrived")
    T.eq(r.headers.connection, nil, "and kept alive")
    s:write("56789POST /plain HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx")
    T.eq(client.read_response(s, rest).body, "plain x", "the next request after the dropped rest")
    s:close()
    -- The client waits for 100 Continue: it goes out when the handler reads the body.
    s = assert(luna.tcp.connect("127.0.0.1", port))
    s:write("POST /yes HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    local buf = ""
    while not buf:find("\r\n\r\n", 1, true) do buf = buf .. assert(s:read()) end
    T.eq(buf, "HTTP/1.1 100 Continue\r\n\r\n", "100 Continue first")
    s:write("ok")
    T.eq(client.read_response(s).body, "got ok", "then the answer")
    s:close()
    -- A handler that answers without it: no 100, and the connection closes after the answer.
    s = assert(luna.tcp.connect("127.0.0.1", port))
    s:write("POST /no HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    r = client.read_response(s)
    T.eq(r.status, 403, "the answer, not 100")
    T.eq(r.headers.connection, "close", "closing: the body will never come")
    T.eq(s:read(), nil, "closed")
    s:close()
    app:stop()
  end)

  T.test("http app: streamed POST fields, limits and misuse", function()
    local streamed, meta = {}, nil
    local app, port = app_on(nil, function(app)
      app:post("/form", function(req)
        req:stream_post_param("file", function(chunk, m)
          if chunk then streamed[#streamed + 1] = chunk else meta = m end
        end)
        local ok, why = req:process_request_body()
        return ("%s %s title=%s file=%s"):format(tostring(ok), tostring(why), tostring(req.post_params.title),
          tostring(req.post_params.file))
      end, { stream_body = true })
      app:post("/early_fields", function(req) return tostring(req.post_params.x) end, { stream_body = true })
      app:post("/small", function(req)
        local ok, why = req:stream_request_body(function() end)
        return tostring(ok) .. " " .. tostring(why)
      end, { stream_body = true, max_body_size = 8 })
    end)
    local file = ("0123456789"):rep(20000)
    local body = "--B\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nhello\r\n"
      .. "--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\n"
      .. file .. "\r\n--B--\r\n"
    local s = assert(luna.tcp.connect("127.0.0.1", port))
    s:write("POST /form HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=B\r\nContent-Length: "
      .. #body .. "\r\n\r\n")
    for i = 1, #body, 16384 do
      s:write(body:sub(i, i + 16383))
      luna.sleep(0.002)
    end
    local r = client.read_response(s)
    T.eq(r.body, "true nil title=hello file=nil", "the streamed field is not in post_params")
    T.eq(table.concat(streamed), file, "the file, whole, through the stream")
    T.ok(#streamed > 1, "in more than one piece (" .. #streamed .. ")")
    T.eq(meta and meta.file_name, "a.txt", "its metadata")
    T.eq(meta and meta.content_type, "text/plain", "its type")
    s:close()
    r = request(port, "POST", "/early_fields", "Content-Type: application/x-www-form-urlencoded\r\n", "x=1")
    T.eq(r.status, 500, "post_params on a streaming route before the body was read")
    T.eq(request(port, "POST", "/small", nil, "123456789").status, 413, "a length over the route's limit")
    local rs, c = exchange(port, "POST /small HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    c:close()
    T.eq(rs[1] and rs[1].body, "true nil", "an empty chunked body")
    rs, c = exchange(port, "POST /small HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n123456789\r\n0\r\n\r\n")
    c:close()
    T.eq(rs[1] and rs[1].status, 413, "chunks over the route's limit")
    T.raises({ "app:post(path, handler, options)", "unknown option 'stream'" }, app.post, app, "/x", print, { stream = true })
    T.raises({ "'max_body_size' must be a whole number > 0" }, app.post, app, "/x", print, { max_body_size = -1 })
    app:stop()
  end)

  T.test("http app: bodies read the same however they arrive", function()
    local seen = {}
    local app, port = app_on(nil, function(app)
      app:use(function(req, res, nxt)
        if req.path == "/proxy" then return res:send("mw got " .. tostring(req.body)) end
        return nxt()
      end)
      app:post("/s", function(req)
        local ok, why = req:stream_request_body(function() end)
        local again, why2 = req:read_body()
        seen.s = ("%s %s %s %s"):format(tostring(ok), tostring(why), tostring(again), tostring(why2))
        return seen.s
      end, { stream_body = true, max_body_size = 8 })
      app:post("/form", function(req)
        seen.body = req:read_body()
        return tostring(req.post_params.a)
      end, { stream_body = true })
    end)
    -- With its head, or after it: the same answers.
    for _, late in ipairs({ false, true }) do
      local function send(raw, body)
        local s = assert(luna.tcp.connect("127.0.0.1", port))
        s:write(raw)
        if late then luna.sleep(0.03) end
        s:write(body)
        local r = client.read_response(s)
        s:close()
        return r
      end
      local how = late and " (body after the head)" or " (body with the head)"
      T.eq(send("POST /proxy HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\n", "abc").body, "mw got abc",
        "a middleware answering a path without a route sees the body" .. how)
      T.eq(send("POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\n", "123456789").status, 413,
        "a length over the route's limit" .. how)
      T.eq(send("POST /form HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        .. "Content-Length: 3\r\n\r\n", "a=1").body, "1",
        "post_params after req:read_body()" .. how)
    end
    -- A failed read: later reads say why, too.
    local s = assert(luna.tcp.connect("127.0.0.1", port))
    s:write("POST /s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n123456789\r\n0\r\n\r\n")
    T.eq(client.read_response(s).status, 413, "chunks past the limit")
    s:close()
    T.wait_until(function() return seen.s end, 2, "the handler")
    T.eq(seen.s, "nil too_large nil too_large", "the handler learnt why, twice")
    T.raises({ "'max_body_size' must be a whole number > 0" }, app.post, app, "/x", print, { max_body_size = 1.5 })
    T.raises({ "'max_body_size' must be a whole number > 0" }, app.post, app, "/x", print, { max_body_size = math.huge })
    app:stop()
  end)

  T.main("json: encode and decode", function()
    local json = luna.json
    local text = json.encode({ b = { 1, 2, { c = "x" } }, a = true, n = 1.5, s = "é\n\"" }, { sort_keys = true })
    T.eq(text, '{"a":true,"b":[1,2,{"c":"x"}],"n":1.5,"s":"é\\n\\""}', "sorted keys")
    local v = json.decode('{"list":[],"obj":{},"nothing":null,"big":12345678901,"neg":-0.25}')
    T.eq(v.nothing, json.null, "null is json.null")
    T.eq(v.big, 12345678901, "a large integer")
    T.eq(v.neg, -0.25, "a negative fraction")
    T.eq(json.encode(v.list), "[]", "an empty array stays an array")
    T.eq(json.encode(v.obj), "{}", "an empty object stays an object")
    T.eq(json.encode(json.array()), "[]", "json.array marks a table")
    T.eq(json.encode({ json.null, 2 }), "[null,2]", "json.null encodes as null")
    T.ok(json.encode({ a = 1 }, { pretty = true }):find("\n", 1, true), "pretty")
    T.raises({ "luna.json.decode(text)", "line 1" }, json.decode, "{oops")
    T.raises({ "luna.json.encode(value, options)" }, json.encode, { f = print })
    local loop = {}
    loop.self = loop
    T.raises({ "luna.json.encode(value, options)", "recursive" }, json.encode, loop)
    T.raises({ "luna.json.encode(value, options)", "unknown" }, json.encode, {}, { prety = true })
  end)
end
