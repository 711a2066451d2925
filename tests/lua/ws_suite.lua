-- WebSocket apps: our server and our client in one process, ws:// and wss://.
return function(T, luna, lunac)
  local data = (os.getenv("LUNA_TEST_DATA") or "tests/data") .. "/"

  -- Connects a client and collects its events; returns the app and the event log.
  local function client(url, extra)
    local log = { messages = {} }
    local config = {
      name = "client " .. tostring(log),
      url = url,
      debug = false,
      on_connect = function(self) log.connected = true end,
      on_message = function(self, message, opcode)
        log.messages[#log.messages + 1] = { message, opcode }
      end,
      on_close = function(self, code, reason) log.closed = { code = code, reason = reason } end,
    }
    for k, v in pairs(extra or {}) do config[k] = v end
    return lunac.connect_to_web_app(config), log
  end

  T.test("the documentation's counter server works with our client", function()
    local inc = {}
    local app
    app = luna.new_web_app({
      name = "counter", host = "127.0.0.1", port = 0, debug = false, no_errors = true,
      protocols = {
        default = function(ws)
          inc[ws] = 0
          while true do
            local message, opcode = ws:receive()
            if not message then
              ws:close()
              inc[ws] = nil
              return
            end
            if opcode == app.opcodes.TEXT then
              if message:match("reset") then inc[ws] = 0 end
              ws:send(tostring(inc[ws]))
            end
          end
        end,
      },
    })
    T.ok(app.port > 0, "bound an ephemeral port")
    local c, log = client("ws://127.0.0.1:" .. app.port .. "/")
    T.wait_until(function() return log.connected end, 2, "connect")
    for _ = 1, 3 do
      for ws, n in pairs(inc) do inc[ws] = n + 1 end
      c:send("hello")
      luna.sleep(0.02)
    end
    T.wait_until(function() return #log.messages == 3 end, 2, "three answers")
    T.eq(log.messages[3][1], "3", "counter")
    T.eq(log.messages[3][2], c.opcodes.TEXT, "text opcode")
    c:send("reset")
    T.wait_until(function() return #log.messages == 4 end, 2, "reset answer")
    T.eq(log.messages[4][1], "0", "reset")
    -- The documentation sends from love.update, outside any handler.
    for ws, n in pairs(inc) do
      T.eq(ws:send("tick " .. n), true, "send from outside the handler")
    end
    T.wait_until(function() return #log.messages == 5 end, 2, "tick")
    T.eq(log.messages[5][1], "tick 0", "tick payload")
    lunac.disconnect_to_web_app(c)
    T.wait_until(function() return log.closed end, 2, "closed")
    T.eq(log.closed.code, 1000, "close code")
    T.eq(luna.remove_web_app("counter"), true, "removed")
    T.eq(select(2, luna.remove_web_app("counter")), "App not found", "second removal")
  end)

  T.test("a plain HTTP request to a web app gets 426 Upgrade Required", function()
    local app = luna.new_web_app({ name = "plain", host = "127.0.0.1", port = 0, debug = false,
      protocols = { default = function() end } })
    local s = assert(luna.tcp.connect("127.0.0.1", app.port))
    s:write("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    local answer = s:read_until("\r\n\r\n")
    T.ok(answer and answer:find("^HTTP/1.1 426 Upgrade Required\r\n"), tostring(answer))
    T.ok(answer:find("Upgrade: websocket\r\n", 1, true), "says what to use")
    s:close()
    luna.remove_web_app("plain")
  end)

  T.test("echo of text and binary, close codes both ways, on_close gets code and reason", function()
    local server_saw = {}
    local app = luna.new_web_app({
      name = "echo", host = "127.0.0.1", port = 0, debug = false,
      protocols = {
        default = function(ws)
          ws.on_close = function(code, reason) server_saw.on_close = { code, reason } end
          T.eq(ws.raw_socket.peer_ip, "127.0.0.1", "raw_socket peer")
          T.eq(type(ws.raw_socket.fd), "number", "raw_socket fd")
          local ip, port = ws:getpeername()
          T.eq(ip, "127.0.0.1", "getpeername ip")
          T.ok(port > 0, "getpeername port")
          while true do
            local message, opcode, clean, code, reason = ws:receive()
            if not message then
              server_saw.receive_end = { clean, code, reason }
              return
            end
            if message == "close me" then
              ws:close(4001, "bye")
            else
              ws:send(message, opcode)
            end
          end
        end,
      },
    })
    local c, log = client("ws://127.0.0.1:" .. app.port)
    T.wait_until(function() return log.connected end, 2, "connect")
    local binary = "\0\1\2\255"
    c:send("héllo")
    c:send(binary, c.opcodes.BINARY)
    T.wait_until(function() return #log.messages == 2 end, 2, "echoes")
    T.eq(log.messages[1][1], "héllo", "text")
    T.eq(log.messages[2][1], binary, "binary payload")
    T.eq(log.messages[2][2], 2, "binary opcode")
    c:send("close me")
    T.wait_until(function() return log.closed and server_saw.receive_end end, 2, "server close")
    T.eq(log.closed.code, 4001, "client on_close code")
    T.eq(log.closed.reason, "bye", "client on_close reason")

    local c2, log2 = client("ws://127.0.0.1:" .. app.port)
    T.wait_until(function() return log2.connected end, 2, "second connect")
    c2:close(4002, "client says bye")
    T.wait_until(function() return server_saw.on_close and server_saw.on_close[1] == 4002 end, 2, "server on_close")
    T.eq(server_saw.on_close[2], "client says bye", "server on_close reason")
    T.eq(server_saw.receive_end[1], true, "clean close")
    T.eq(server_saw.receive_end[2], 4002, "receive returns the code")
    luna.remove_web_app(app)
  end)

  T.test("messages wait for a busy handler, in order; on_close gets the code with messages queued", function()
    local got, seen = {}, {}
    local app = luna.new_web_app({
      name = "busy", host = "127.0.0.1", port = 0, debug = false,
      protocols = {
        default = function(ws)
          ws.on_close = function(code, reason) seen.on_close = { code, reason } end
          T.eq(ws:receive(), "start", "first message")
          luna.sleep(0.3) -- the client sends five messages and closes meanwhile
          while true do
            local message, _, clean, code, reason = ws:receive()
            if not message then
              seen.ended = { clean, code, reason }
              return
            end
            got[#got + 1] = message
          end
        end,
      },
    })
    local c, log = client("ws://127.0.0.1:" .. app.port)
    T.wait_until(function() return log.connected end, 2, "connect")
    c:send("start")
    for i = 1, 5 do c:send("m" .. i) end
    c:close(4003, "done")
    T.wait_until(function() return seen.ended end, 3, "handler saw the end")
    T.eq(table.concat(got, ","), "m1,m2,m3,m4,m5", "every message, in order")
    T.eq(seen.ended[2], 4003, "receive returns the code")
    T.eq(seen.on_close and seen.on_close[1], 4003, "on_close code")
    T.eq(seen.on_close and seen.on_close[2], "done", "on_close reason")
    luna.remove_web_app(app)
  end)

  T.test("a second coroutine receiving on a ws and a stray resume of the handler lose nothing", function()
    local by_handler, by_helper, handler_co = {}, {}, nil
    local app = luna.new_web_app({
      name = "shared", host = "127.0.0.1", port = 0, debug = false,
      protocols = {
        default = function(ws)
          handler_co = coroutine.running()
          luna.spawn(function()
            while true do
              local message = ws:receive()
              if not message then return end
              by_helper[#by_helper + 1] = message
            end
          end)
          while true do
            local message = ws:receive()
            if not message then return end
            by_handler[#by_handler + 1] = message
          end
        end,
      },
    })
    local c, log = client("ws://127.0.0.1:" .. app.port)
    T.wait_until(function() return log.connected and handler_co end, 2, "connect")
    -- Someone resumes the parked handler by hand: it must go back to waiting.
    T.eq(coroutine.resume(handler_co, "junk", 1), true, "stray resume")
    for i = 1, 20 do c:send(tostring(i)) end
    T.wait_until(function() return #by_handler + #by_helper == 20 end, 3, "twenty messages")
    local all = {}
    for _, m in ipairs(by_handler) do all[#all + 1] = tonumber(m) end
    for _, m in ipairs(by_helper) do all[#all + 1] = tonumber(m) end
    table.sort(all)
    for i = 1, 20 do T.eq(all[i], i, "message " .. i .. " exactly once") end
    for i = 2, #by_handler do T.ok(tonumber(by_handler[i]) > tonumber(by_handler[i - 1]), "handler in order") end
    T.ok(#by_handler > 0, "the handler got messages")
    luna.remove_web_app(app)
  end)

  T.test("ws:send misuse names the call; sends after the end report it", function()
    local checked
    local app = luna.new_web_app({
      name = "misuse", host = "127.0.0.1", port = 0, debug = false,
      protocols = {
        default = function(ws)
          local ok, err = pcall(ws.send, ws, {}, 1)
          T.ok(not ok and err:find("ws:send(data, opcode): 'data' must be a string, got table", 1, true), err)
          ok, err = pcall(ws.send, ws, "x", 7)
          T.ok(not ok and err:find("'opcode' must be opcodes.TEXT (1) or opcodes.BINARY (2)", 1, true), err)
          T.eq(ws:send(42), true, "a number is sent as Lua prints it")
          T.eq(ws:send("bin", 2), true, "binary")
          ws:receive()
          local sent, why = ws:send("late")
          T.eq(sent, nil, "send after the end")
          T.ok(type(why) == "string", "with a reason")
          checked = true
        end,
      },
    })
    local c, log = client("ws://127.0.0.1:" .. app.port)
    T.wait_until(function() return #log.messages == 2 end, 2, "two messages")
    T.eq(log.messages[1][1], "42", "number payload")
    T.eq(log.messages[2][2], 2, "binary opcode")
    c:close()
    T.wait_until(function() return checked end, 2, "handler finished")
    luna.remove_web_app(app)
  end)

  T.test("protocol choice: first offered name that is a handler wins; no default refuses", function()
    local seen = {}
    local app = luna.new_web_app({
      name = "protocols", host = "127.0.0.1", port = 0, debug = false,
      protocols = {
        chat = function(ws) seen[#seen + 1] = "chat:" .. tostring(ws.raw_socket.protocol); ws:receive() end,
        default = function(ws) seen[#seen + 1] = "default:" .. tostring(ws.raw_socket.protocol); ws:receive() end,
      },
    })
    local url = "ws://127.0.0.1:" .. app.port
    local a, la = client(url, { protocol = { "foo", "chat" } })
    local b, lb = client(url, { protocol = "nothing-known" })
    T.wait_until(function() return la.connected and lb.connected and #seen == 2 end, 2, "both connect")
    table.sort(seen)
    T.eq(seen[1], "chat:chat", "chat chosen and echoed")
    T.eq(seen[2], "default:nil", "fallback to default without a protocol header")
    luna.remove_web_app(app)
    T.wait_until(function() return la.closed and lb.closed end, 2, "server removal closes clients")
    T.eq(la.closed.code, 1001, "going away")

    local strict = luna.new_web_app({
      name = "strict", host = "127.0.0.1", port = 0, debug = false,
      protocols = { chat = function(ws) ws:receive() end },
    })
    local c, lc = client("ws://127.0.0.1:" .. strict.port, { protocol = "other" })
    T.wait_until(function() return lc.closed end, 2, "refused")
    T.eq(lc.connected, nil, "never connected")
    T.eq(lc.closed.code, 1006, "abnormal close")
    T.ok(lc.closed.reason:find("400", 1, true), "reason names the HTTP status: " .. lc.closed.reason)
    luna.remove_web_app(strict)
  end)

  T.test("broadcast reaches every connection of the same protocol", function()
    local conns = 0
    local app = luna.new_web_app({
      name = "broadcast", host = "127.0.0.1", port = 0, debug = false,
      protocols = {
        default = function(ws)
          conns = conns + 1
          local message = ws:receive()
          if message == "shout" then
            T.eq(ws:broadcast("to all"), 3, "three recipients")
          end
          ws:receive()
        end,
      },
    })
    local logs = {}
    local first
    for i = 1, 3 do
      local c, log = client("ws://127.0.0.1:" .. app.port)
      logs[i] = log
      first = first or c
    end
    T.wait_until(function()
      return conns == 3 and logs[1].connected and logs[2].connected and logs[3].connected
    end, 2, "three connections")
    T.eq(first:send("shout"), true, "sent")
    T.wait_until(function()
      return #logs[1].messages == 1 and #logs[2].messages == 1 and #logs[3].messages == 1
    end, 2, "everyone got it")
    T.eq(logs[2].messages[1][1], "to all", "payload")
    luna.remove_web_app(app)
  end)

  T.test("wss with a test CA; unknown issuer reaches on_close with a readable reason", function()
    local app = luna.new_web_app({
      name = "secure", host = "127.0.0.1", port = 0, debug = false,
      ssl = { cert = data .. "server.pem", key = data .. "server.key" },
      protocols = {
        default = function(ws)
          local message = ws:receive()
          ws:send("secure " .. tostring(message) .. " " .. tostring(ws.raw_socket.tls.version))
          ws:receive()
        end,
      },
    })
    local c, log = client("wss://localhost:" .. app.port .. "/x?y=1", { ssl = { ca = data .. "ca.pem" } })
    T.wait_until(function() return log.connected end, 3, "tls connect")
    c:send("hi")
    T.wait_until(function() return #log.messages == 1 end, 2, "answer")
    T.ok(log.messages[1][1]:find("^secure hi TLS"), log.messages[1][1])

    local bad, badlog = client("wss://localhost:" .. app.port)
    T.wait_until(function() return badlog.closed end, 3, "verification failure")
    T.ok(badlog.closed.reason:find("UnknownIssuer", 1, true), badlog.closed.reason)

    local insecure, ilog = client("wss://127.0.0.1:" .. app.port, { ssl = { verify = false } })
    T.wait_until(function() return ilog.connected end, 3, "verify = false connects")
    luna.remove_web_app(app)
  end)

  T.test("a handler error goes to the app's error policy and closes with 1011", function()
    local errors = {}
    local app = luna.new_web_app({
      name = "faulty", host = "127.0.0.1", port = 0, debug = false, no_errors = true,
      error_handler = function(err) errors[#errors + 1] = err end,
      protocols = { default = function(ws) ws:receive(); error("handler broke") end },
    })
    local c, log = client("ws://127.0.0.1:" .. app.port)
    T.wait_until(function() return log.connected end, 2, "connect")
    c:send("go")
    T.wait_until(function() return log.closed end, 2, "closed by server")
    T.eq(log.closed.code, 1011, "internal error code")
    T.ok(errors[1] and errors[1]:find("handler broke", 1, true), tostring(errors[1]))
    luna.remove_web_app(app)
  end)

  T.test("host '*' serves IPv4 and IPv6 and reports IPv4 peers as plain IPv4", function()
    local lines = {}
    local real_print = print
    print = function(line) lines[#lines + 1] = tostring(line) end
    local app = luna.new_web_app({
      name = "dual", host = "*", port = 0, debug = true,
      protocols = {
        default = function(ws)
          local ip, port = ws:getpeername()
          local raw = ws.raw_socket
          ws:send(table.concat({ ip, raw.peer_ip, raw.local_ip, tostring(ws), tostring(port == raw.peer_port) }, " "))
          ws:receive()
        end,
      },
    })
    local v6, l6 = client("ws://[::1]:" .. app.port .. "/v6")
    local name, ln = client("ws://localhost:" .. app.port)
    local v4, l4 = client("ws://127.0.0.1:" .. app.port)
    T.wait_until(function() return #l6.messages == 1 and #ln.messages == 1 and #l4.messages == 1 end, 3,
      "three answers")
    luna.remove_web_app(app)
    print = real_print
    T.eq(l6.messages[1][1]:match("^%S+ %S+ %S+"), "::1 ::1 ::1", "IPv6 peer")
    local ip, peer_ip, local_ip, str, same_port = l4.messages[1][1]:match("^(%S+) (%S+) (%S+) (%S+) (%S+)$")
    T.eq(ip, "127.0.0.1", "getpeername of an IPv4 peer")
    T.eq(peer_ip, "127.0.0.1", "raw_socket.peer_ip")
    T.eq(local_ip, "127.0.0.1", "raw_socket.local_ip")
    T.ok(str:find("^luna.ws%(127.0.0.1:%d+%)$"), "tostring(ws): " .. str)
    T.eq(same_port, "true", "raw_socket.peer_port")
    local log = table.concat(lines, "\n")
    T.ok(log:find("client 127.0.0.1:%d+ connected"), "log line: " .. log)
    T.ok(not log:find("::ffff:", 1, true), "no IPv4-mapped address in the log: " .. log)
  end)

  T.test("web clients take the keep-alive keys servers take (ping_interval, ping_timeout)", function()
    local app = luna.new_web_app({
      name = "keepalive", host = "127.0.0.1", port = 0, debug = false, ping_interval = 0.05,
      protocols = { default = function(ws) while true do local m = ws:receive(); if not m then return end; ws:send(m) end end },
    })
    local c, log = client("ws://127.0.0.1:" .. app.port, { ping_interval = 0.05, ping_timeout = 1 })
    T.wait_until(function() return log.connected end, 2, "connect")
    luna.sleep(0.2) -- several pings each way while nothing else is sent
    c:send("still here")
    T.wait_until(function() return #log.messages == 1 end, 2, "echo after the pings")
    T.eq(log.closed, nil, "pings kept the connection")
    T.raises({ "lunac.connect_to_web_app(config)", "unknown option 'ping_intervall'" }, lunac.connect_to_web_app,
      { url = "ws://127.0.0.1:1", ping_intervall = 1 })
    c:close()
    T.wait_until(function() return log.closed end, 2, "closed")
    luna.remove_web_app(app)
  end)

  T.main("web app misuse errors are clear", function()
    T.raises({ "luna.new_web_app(config)", "'protocols' must be a table" }, luna.new_web_app,
      { name = "x", port = 0 })
    T.raises({ "luna.new_web_app(config)", "unknown option 'protocol'" }, luna.new_web_app,
      { name = "x", port = 0, protocol = {} })
    T.raises({ "luna.new_web_app(config)", "ssl:", "nope.pem" }, luna.new_web_app,
      { name = "x", port = 0, ssl = { cert = "nope.pem", key = "nope.key" }, protocols = { default = print } })
    T.raises({ "lunac.connect_to_web_app(config)", "'url'" }, lunac.connect_to_web_app, { url = "http://x" })
    T.raises({ "'port' must be a port number" }, luna.new_web_app, { port = 70000, protocols = {} })
    T.raises({ "'protocols' maps protocol names to handler functions; got number = function" }, luna.new_web_app,
      { port = 0, protocols = { default = print, x = 5, [1] = print, y = true, [2] = "s" } })
    T.raises({ "unknown option 'aa'" }, lunac.connect_to_web_app, { url = "ws://127.0.0.1:1", zz = 1, aa = 1, mm = 1 })
    T.raises({ "luna.new_web_app(config)", "'compression' must be true, false or a table, got string" },
      luna.new_web_app, { port = 0, compression = "yes", protocols = { default = print } })
    T.raises({ "'level' must be a whole number 0-9, got 10" }, luna.new_web_app,
      { port = 0, compression = { level = 10 }, protocols = { default = print } })
    T.raises({ "luna.new_web_app(config)", "'ping_interval' must be a number of seconds > 0 and <= 1e9" }, luna.new_web_app,
      { port = 0, ping_interval = 1e300, protocols = { default = print } })
    T.raises({ "'ping_timeout' must be a number of seconds > 0" }, luna.new_web_app,
      { port = 0, ping_timeout = 0 / 0, protocols = { default = print } })
    T.raises({ "'max_message_size' must be a whole number of bytes from 1 to 1 GiB" }, luna.new_web_app,
      { port = 0, max_message_size = 1e300, protocols = { default = print } })
    T.raises({ "'window_bits' must be a whole number 9-15, got 8" }, luna.new_web_app,
      { port = 0, compression = { window_bits = 8 }, protocols = { default = print } })
    T.raises({ "lunac.connect_to_web_app(config)", "unknown option 'max_contexts'" }, lunac.connect_to_web_app,
      { url = "ws://127.0.0.1:1", compression = { max_contexts = 1 } })
  end)

  T.test("a callback client reads on at once after a compressed burst filled its inbox", function()
    -- 40 messages of 256 KiB compress to a few KiB: one read inflates past the client's 1 MiB
    -- inbox, reading pauses, and must go on as soon as on_message drained it (not on a timer).
    local chunk = ("0123456789abcdef"):rep(16384)
    local app = luna.new_web_app({
      name = "deflate burst", host = "127.0.0.1", port = 0, debug = false, compression = true,
      protocols = { default = function(ws)
        for i = 1, 40 do ws:send(i .. chunk) end
        ws:receive()
      end },
    })
    local c, log = client("ws://127.0.0.1:" .. app.port, { compression = true })
    T.wait_until(function() return log.connected end, 2, "connect")
    local start = luna.now()
    T.wait_until(function() return #log.messages == 40 end, 1.5, "the burst")
    T.ok(luna.now() - start < 1.5, "burst read in " .. (luna.now() - start) .. " s")
    T.eq(log.messages[40][1], 40 .. chunk, "last message whole")
    lunac.disconnect_to_web_app(c)
    luna.remove_web_app(app)
  end)

  T.test("permessage-deflate between our server and client: messages whole, compressed on the wire", function()
    local function serve(name, compression)
      local result = {}
      local app = luna.new_web_app({
        name = name, host = "127.0.0.1", port = 0, debug = false, compression = compression,
        protocols = {
          default = function(ws)
            for _ = 1, 3 do
              local m, op = ws:receive()
              ws:send(m, op)
            end
            result.bytes_in = ws:stats().bytes_in
            ws:close(1000, "done")
          end,
        },
      })
      return app, result
    end
    local text = ('{"hp":100,"name":"luna"},'):rep(4000)
    for _, case in ipairs({ { { level = 6, context_takeover = false }, true }, { nil, false } }) do
      local app, result = serve("deflate " .. tostring(case[2]), case[1])
      local c = lunac.connect_to_web_app({
        name = "deflate client", url = "ws://127.0.0.1:" .. app.port, debug = false, compression = true,
      })
      T.eq(c:wait_connected(), true, "connected")
      local sent = { text, text:upper(), "short" }
      c:send(sent[1])
      c:send(sent[2], c.opcodes.BINARY)
      c:send(sent[3])
      for i = 1, 3 do
        T.eq(c:receive(), sent[i], "echo " .. i)
      end
      T.eq(c:receive(), nil, "closed by the server")
      if case[2] then
        T.ok(result.bytes_in < #text / 20, "compressed on the wire: " .. result.bytes_in .. " bytes in")
      else
        T.ok(result.bytes_in > 2 * #text, "a server without compression gets it plain: " .. result.bytes_in)
      end
      luna.remove_web_app(app)
    end
  end)

  T.test("ws:stats counts one connection's messages and bytes; luna.stats counts WebSocket traffic", function()
    local stats
    local app = luna.new_web_app({
      name = "ws stats", host = "127.0.0.1", port = 0, debug = false,
      protocols = {
        default = function(ws)
          for _ = 1, 3 do
            ws:send(ws:receive())
          end
          stats = ws:stats()
          ws:close(1000, "done")
        end,
      },
    })
    local before = luna.stats()
    local c, log = client("ws://127.0.0.1:" .. app.port)
    T.wait_until(function() return log.connected end, 2, "connect")
    -- (Clients of earlier tests may still be closing: count at least ours.)
    T.ok(luna.stats().connections.ws_clients >= 1, "the client connection is counted")
    for i = 1, 3 do c:send("m" .. i) end
    T.wait_until(function() return log.closed end, 2, "echoes and close")
    T.eq(stats.messages_in, 3, "messages in")
    T.eq(stats.messages_out, 3, "messages out")
    T.ok(stats.bytes_in > 0 and stats.bytes_out > 0 and stats.queued_bytes >= 0, "bytes")
    local after = luna.stats()
    T.ok(after.ws.messages_in - before.ws.messages_in >= 6, "server and client messages in")
    T.ok(after.ws.messages_out - before.ws.messages_out >= 6, "server and client messages out")
    luna.remove_web_app(app)
  end)

  T.test("a client without on_message reads from a coroutine: wait_connected, receive, the end", function()
    local app = luna.new_web_app({
      name = "co client server", host = "127.0.0.1", port = 0, debug = false,
      protocols = {
        default = function(ws)
          ws:send("hello")
          while true do
            local m, op = ws:receive()
            if not m then return end
            if m == "bye" then ws:close(4005, "done") else ws:send(m, op) end
          end
        end,
      },
    })
    local c = lunac.connect_to_web_app({ name = "co client", url = "ws://127.0.0.1:" .. app.port, debug = false })
    T.eq(c:wait_connected(), true, "wait_connected")
    T.eq(c:wait_connected(), true, "wait_connected once open")
    T.eq(c:receive(), "hello", "first message")
    c:send("one")
    c:send("\0\1", c.opcodes.BINARY)
    local m, op = c:receive()
    T.eq(m, "one", "text")
    T.eq(op, 1, "text opcode")
    m, op = c:receive()
    T.eq(m, "\0\1", "binary")
    T.eq(op, 2, "binary opcode")
    c:send("bye")
    local clean, code, reason
    m, op, clean, code, reason = c:receive()
    T.eq(m, nil, "the end")
    T.eq(clean, true, "clean close")
    T.eq(code, 4005, "close code")
    T.eq(reason, "done", "close reason")
    T.eq(select(4, c:receive()), 4005, "the end stays")
    T.eq(c:wait_connected(), true, "wait_connected after the end: it did connect")
    luna.remove_web_app(app)
  end)

  T.test("a coroutine client that reads late gets every message in order, reading held back meanwhile", function()
    local chunk = ("x"):rep(65536)
    local app = luna.new_web_app({
      name = "co client burst", host = "127.0.0.1", port = 0, debug = false,
      protocols = {
        default = function(ws)
          for i = 1, 40 do ws:send(i .. ":" .. chunk) end
          ws:send("last")
          ws:receive()
        end,
      },
    })
    local c = lunac.connect_to_web_app({ name = "co burst", url = "ws://127.0.0.1:" .. app.port, debug = false })
    T.eq(c:wait_connected(), true, "connected")
    luna.sleep(0.3)
    for i = 1, 40 do
      local m = c:receive()
      T.eq(m and m:match("^(%d+):"), tostring(i), "message " .. i)
    end
    T.eq(c:receive(), "last", "the last one")
    lunac.disconnect_to_web_app(c)
    luna.remove_web_app(app)
  end)

  T.main("app:receive and app:wait_connected outside a coroutine name the call and the fix", function()
    local c = lunac.connect_to_web_app({ name = "co outside", url = "ws://127.0.0.1:1", debug = false })
    T.raises({ "app:receive() must be called inside a coroutine", "luna.spawn" }, c.receive, c)
    T.raises({ "app:wait_connected() must be called inside a coroutine" }, c.wait_connected, c)
    lunac.disconnect_to_web_app(c)
  end)

  T.test("app:receive and app:wait_connected report a refused connection; on_message apps cannot receive", function()
    local c = lunac.connect_to_web_app({ name = "co refused", url = "ws://127.0.0.1:1", debug = false })
    local ok, err = c:wait_connected()
    T.eq(ok, nil, "refused")
    T.ok(err:find("1006", 1, true), "reason: " .. tostring(err))
    local m, op, clean, code = c:receive()
    T.eq(m, nil, "receive after a failed connect")
    T.eq(code, 1006, "abnormal end")
    local d = lunac.connect_to_web_app({
      name = "co with callback", url = "ws://127.0.0.1:1", debug = false, on_message = function() end,
    })
    T.raises({ "app:receive()", "on_message" }, d.receive, d)
    lunac.disconnect_to_web_app(d)
  end)

  T.test("a coroutine client reading late gets the messages sent before the server closed, then the end", function()
    local app = luna.new_web_app({
      name = "co client then close", host = "127.0.0.1", port = 0, debug = false,
      protocols = {
        default = function(ws)
          for i = 1, 5 do ws:send("m" .. i) end
          ws:close(4002, "that is all")
        end,
      },
    })
    local closes = 0
    local c = lunac.connect_to_web_app({
      name = "co late", url = "ws://127.0.0.1:" .. app.port, debug = false,
      on_close = function() closes = closes + 1 end,
    })
    T.eq(c:wait_connected(), true, "connected")
    T.wait_until(function() return closes == 1 end, 2, "on_close while the messages are unread")
    T.eq(c.connected, false, "the connection is gone")
    for i = 1, 5 do T.eq(c:receive(), "m" .. i, "message " .. i) end
    local m, _, clean, code, reason = c:receive()
    T.eq(m, nil, "then the end")
    T.eq(code, 4002, "its code")
    T.eq(reason, "that is all", "its reason")
    T.eq(clean, true, "clean")
    T.eq(closes, 1, "on_close once")
    luna.remove_web_app(app)
  end)

  T.test("a client without on_message that never reads still hears the end", function()
    local app = luna.new_web_app({
      name = "co never reads", host = "127.0.0.1", port = 0, debug = false,
      protocols = { default = function(ws) ws:send("welcome"); ws:close(4001, "bye") end },
    })
    local closed
    lunac.connect_to_web_app({
      name = "co deaf", url = "ws://127.0.0.1:" .. app.port, debug = false,
      on_close = function(self, code) closed = code end,
    })
    T.wait_until(function() return closed end, 2, "on_close")
    T.eq(closed, 4001, "the server's code")
    luna.remove_web_app(app)
  end)
end
