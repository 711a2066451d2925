-- RPC apps end to end over real UDP on 127.0.0.1: luna.new_app / lunac.connect_to_app, the
-- documentation's examples, fetch (yielding and blocking), noawait_fetch, pushes, validation,
-- middlewares, async handlers, penalties, idle clients, disconnects, reconnects, encryption,
-- server key pinning and misuse errors. Every app listens on port 0 (a free port).
return function(T, luna, lunac)
  local serial = 0
  local function server(cfg)
    serial = serial + 1
    cfg = cfg or {}
    cfg.name = cfg.name or ("rpc test server " .. serial)
    cfg.host = cfg.host or "127.0.0.1"
    cfg.port = cfg.port or 0
    if cfg.debug == nil then
      cfg.debug = false
    end
    if cfg.no_errors == nil then
      cfg.no_errors = true
      cfg.error_handler = cfg.error_handler or function() end
    end
    return luna.new_app(cfg)
  end

  local function connect(app, cfg)
    cfg = cfg or {}
    cfg.name = cfg.name or ("rpc test client " .. serial)
    cfg.host = cfg.host or "127.0.0.1"
    cfg.port = cfg.port or app.port
    if cfg.encryption == nil then
      cfg.encryption = app.encryption
    end
    if cfg.debug == nil then
      cfg.debug = false
    end
    return lunac.connect_to_app(cfg)
  end

  local function connected(client)
    T.wait_until(function() return client:is_connected() end, 3, "connection")
    return client
  end

  local function ping_and_echo(app)
    -- The documentation's ping router and echo router.
    local default_router = app:new_router({ prefix = "default" })
    default_router:new({ prefix = "ping", fun = function(args, client) end })
    local api_router = app:new_router({ prefix = "api", no_errors = true })
    api_router:new({
      prefix = "echo",
      validate = { text = { "string", "nil" } },
      response_validate = { "string" },
      fun = function(args, client)
        return args.text or "no text provided"
      end,
    })
    return api_router
  end

  -- Blocking fetch outside a coroutine, server in the same process, without `server = luna`.
  T.main("fetch outside a coroutine blocks while the local server keeps serving", function()
    local app = server({ encryption = false })
    ping_and_echo(app)
    local client = connect(app, { encryption = false })
    local t0 = luna.now()
    T.eq(client:fetch("api/echo", { text = "Hello" }, 3), "Hello", "echo")
    T.eq(client:fetch("api/echo", {}), "no text provided", "echo without text")
    local res, err = client:fetch("default/ping", {})
    T.eq(res, nil, "ping result")
    T.eq(err, nil, "ping error")
    T.ok(luna.now() - t0 < 2, "answers came quickly")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end)

  T.test("the documentation's examples: ping, echo with validate/response_validate, client config", function()
    local app = server({ name = "My Server", max_ip_connected = 20 })
    ping_and_echo(app)
    local got = {}
    local client = lunac.connect_to_app({
      name = "My Client",
      host = "127.0.0.1",
      port = app.port,
      no_errors = true,
      reconnect_time = 5,
      listener = function(message) got.listener = message end,
      server = luna,
      connect_server = function() got.connected = true end,
      disconnect_server = function(err) got.disconnected = err end,
    })
    T.wait_until(function() return got.connected end, 3, "connect_server")
    T.eq(client:fetch("api/echo", { text = "Hello" }, 3), "Hello", "echo")
    local res, err = client:fetch("api/echo", { text = 42 })
    T.eq(res, nil, "validate failure result")
    T.eq(err, "Argument 'text' expected to be string or nil, got number (42)", "validate text")
    T.eq(client:fetch("default/ping", {}), nil, "ping completes with nil")
    T.eq(#app:get_clients(), 1, "one client")
    T.eq(lunac.disconnect_to_app("My Client"), true, "disconnect by name")
    T.eq(got.disconnected, "Close server", "disconnect_server reason")
    T.eq(luna.remove_app("My Server"), true, "remove by name")
    local ok, e = luna.remove_app("My Server")
    T.eq(ok, false, "second remove")
    T.eq(e, "App not found", "second remove error")
  end)

  T.test("fetch in a coroutine yields: the frame is not blocked", function()
    local app = server()
    app:new_router({ prefix = "slow" }):new({
      prefix = "op",
      async = true,
      fun = function(args)
        luna.sleep(0.2)
        return args.n * 2
      end,
    })
    local client = connected(connect(app))
    local frames = 0
    local done = false
    luna.spawn(function()
      while not done do
        frames = frames + 1
        luna.sleep(0.01)
      end
    end)
    local t0 = luna.now()
    T.eq(client:fetch("slow/op", { n = 21 }), 42, "async result")
    done = true
    T.ok(luna.now() - t0 >= 0.19, "the handler slept")
    T.ok(frames >= 5, "other coroutines ran meanwhile (" .. frames .. ")")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end)

  T.test("values round-trip: binary strings, integers, floats, booleans, nested tables", function()
    local app = server()
    app:new_router({ prefix = "v" }):new({ prefix = "echo", fun = function(args) return args end })
    local client = connected(connect(app))
    local bin = "a\0b\255\254" .. string.rep("x", 3000)
    local v = {
      s = bin, i = -123456789, f = 1.5, t = true, f2 = false,
      list = { 1, 2, { 3, "four" } }, map = { a = { b = { c = "deep" } } },
    }
    local r = client:fetch("v/echo", v)
    T.eq(r.s, bin, "binary string")
    T.eq(r.i, -123456789, "integer")
    T.eq(r.f, 1.5, "float")
    T.eq(r.t, true, "true")
    T.eq(r.f2, false, "false")
    T.eq(r.list[3][2], "four", "nested array")
    T.eq(#r.list, 3, "array length")
    T.eq(r.map.a.b.c, "deep", "nested map")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end)

  T.test("noawait_fetch delivers to its callback; push via client:send reaches listener", function()
    local got = {}
    local app
    app = server({
      new_client = function(c) c:send({ hello = "Welcome to the server!" }) end,
    })
    app:new_router({ prefix = "api" }):new({ prefix = "add", fun = function(a) return a.x + a.y end })
    app:new_router({ prefix = "default" }):new({ prefix = "ping", fun = function() end })
    local client = connect(app, { listener = function(m) got.push = m end })
    client:noawait_fetch("api/add", function(data, err) got.data, got.err, got.called = data, err, true end,
      { x = 1, y = 2 })
    client:noawait_fetch("default/ping", function(data, err) got.ping = { data, err } end, {})
    client:noawait_fetch("api/log", { message = "Debug info" }) -- the documentation's form
    T.wait_until(function() return got.called and got.push and got.ping end, 3, "callbacks")
    T.eq(got.data, 3, "noawait result")
    T.eq(got.err, nil, "noawait error")
    T.eq(got.push.hello, "Welcome to the server!", "pushed message")
    T.eq(got.ping[1], nil, "ping result")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end)

  T.test("errors reach the caller: unknown route, handler error, response_validate, precedence", function()
    local seen = {}
    local app = server({ error_handler = function(e) seen.app = e end })
    local r = app:new_router({ prefix = "r", error_handler = function(e) seen.router = e end })
    r:new({ prefix = "boom", fun = function() error("kaput") end })
    r:new({ prefix = "own", fun = function() error("mine") end, error_handler = function(e) seen.handler = e end })
    r:new({ prefix = "bad", response_validate = { "string" }, fun = function() return 5 end })
    app:new_router({ prefix = "plain" }):new({ prefix = "boom", fun = function() error("plain") end })
    local client = connected(connect(app))
    local res, err = client:fetch("nope/x", {})
    T.eq(res, nil, "unknown route result")
    T.eq(err, "Unknown route 'nope/x'", "unknown route error")
    res, err = client:fetch("r/boom")
    T.ok(res == nil and err:find("kaput", 1, true), "handler error text: " .. tostring(err))
    T.ok(seen.router and seen.router:find("kaput", 1, true), "router error_handler got it")
    res, err = client:fetch("r/own")
    T.ok(err:find("mine", 1, true), "handler error")
    T.ok(seen.handler and seen.handler:find("mine", 1, true), "handler error_handler wins")
    T.ok(not (seen.router or ""):find("mine", 1, true), "router handler not called for 'own'")
    res, err = client:fetch("r/bad")
    T.eq(err, "Response expected to be string, got number (5)", "response_validate text")
    res, err = client:fetch("plain/boom")
    T.ok(err:find("plain", 1, true), "plain error reaches client")
    T.ok(seen.app and seen.app:find("plain", 1, true), "app error_handler is last")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end)

  T.test("validate: 'number' means a real number, not a numeric string", function()
    local app = server()
    app:new_router({ prefix = "m" }):new({
      prefix = "sq", validate = { n = { "number" } }, fun = function(a) return a.n * a.n end,
    })
    local client = connected(connect(app))
    T.eq(client:fetch("m/sq", { n = 7 }), 49, "number accepted")
    local res, err = client:fetch("m/sq", { n = "40" })
    T.eq(res, nil, "string refused")
    T.eq(err, "Argument 'n' expected to be number, got string (40)", "validate text")
    res, err = client:fetch("m/sq", {})
    T.eq(err, "Argument 'n' expected to be number, got nil (nil)", "missing argument")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end)

  T.test("validate checks names in sorted order: the same bad input always names the same argument", function()
    local app = server()
    local r = app:new_router({ prefix = "v" })
    local sets = {
      { "zeta", "alpha", "mid", "beta", "omega", "kappa" },
      { "b", "d", "a", "f", "c", "e" },
      { "y", "x", "w", "v", "u", "t" },
      { "name", "age", "city", "zip", "email", "phone" },
    }
    for i, names in ipairs(sets) do
      local validate = {}
      for _, name in ipairs(names) do validate[name] = { "number" } end
      r:new({ prefix = "h" .. i, validate = validate, fun = function() return "ok" end })
    end
    r:new({ prefix = "mixed", validate = { [2] = { "number" }, [1] = { "number" }, text = { "string" } },
      fun = function() return "ok" end })
    local client = connected(connect(app))
    for i, names in ipairs(sets) do
      local first = {}
      for _, name in ipairs(names) do first[#first + 1] = name end
      table.sort(first)
      local _, err = client:fetch("v/h" .. i, {})
      T.eq(err, ("Argument '%s' expected to be number, got nil (nil)"):format(first[1]), "set " .. i)
      local args = {}
      args[first[1]] = 1
      _, err = client:fetch("v/h" .. i, args)
      T.eq(err, ("Argument '%s' expected to be number, got nil (nil)"):format(first[2]), "set " .. i .. ", second")
    end
    local _, err = client:fetch("v/mixed", { "x", "y" })
    T.eq(err, "Argument '1' expected to be number, got string (x)", "numbers first")
    _, err = client:fetch("v/mixed", { 1, 2 })
    T.eq(err, "Argument 'text' expected to be string, got nil (nil)", "then names")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end)

  T.test("middlewares change args and the response, and can stop a request", function()
    local app = server()
    local calls = 0
    app:new_router({ prefix = "mw" }):new({
      prefix = "x",
      middlewares = {
        function(ctx, is_pre)
          if is_pre then
            if ctx.request.args.block then
              ctx.stop = true
              return nil
            end
            if ctx.request.args.custom then
              ctx.stop = true
              return "custom answer"
            end
            ctx.request.args.v = (ctx.request.args.v or 0) + 1
          else
            return ctx.response .. "!"
          end
        end,
      },
      fun = function(args)
        calls = calls + 1
        return "v=" .. args.v
      end,
    })
    local client = connected(connect(app))
    T.eq(client:fetch("mw/x", { v = 1 }), "v=2!", "args and response changed")
    local res, err = client:fetch("mw/x", { block = true })
    T.eq(err, "Request stopped by middleware", "stopped")
    T.eq(client:fetch("mw/x", { custom = true }), "custom answer", "stop with an answer")
    T.eq(calls, 1, "handler ran only once")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end)

  T.test("a middleware that raises, before or after the handler, answers the error and reports it", function()
    local app = server()
    local calls, reported = 0, {}
    app:new_router({ prefix = "mw" }):new({
      prefix = "boom",
      error_handler = function(msg) reported[#reported + 1] = msg end,
      middlewares = {
        function(ctx, is_pre)
          if is_pre == (ctx.request.args.when == "pre") then
            error("bad " .. ctx.request.args.when, 0)
          end
        end,
      },
      fun = function()
        calls = calls + 1
        return "ran"
      end,
    })
    local client = connected(connect(app))
    local res, err = client:fetch("mw/boom", { when = "pre" })
    T.eq(res, nil, "no result before")
    T.eq(err, "Middleware error: bad pre", "error before")
    T.eq(calls, 0, "the handler did not run")
    res, err = client:fetch("mw/boom", { when = "post" })
    T.eq(res, nil, "no result after")
    T.eq(err, "Middleware error: bad post", "error after")
    T.eq(calls, 1, "the handler ran once")
    T.eq(#reported, 2, "both reported")
    T.eq(reported[1], "Middleware error: bad pre", "first report")
    T.eq(reported[2], "Middleware error: bad post", "second report")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end)

  T.test("async handler may fetch from another server while waiting", function()
    local back = server()
    back:new_router({ prefix = "b" }):new({ prefix = "v", fun = function(a) return a.x + 100 end })
    local front = server()
    local upstream = connected(connect(back))
    front:new_router({ prefix = "f" }):new({
      prefix = "v",
      async = true,
      fun = function(a)
        luna.sleep(0.05)
        return upstream:fetch("b/v", { x = a.x })
      end,
    })
    local client = connected(connect(front))
    T.eq(client:fetch("f/v", { x = 5 }), 105, "chained result")
    lunac.disconnect_to_app(client)
    lunac.disconnect_to_app(upstream)
    luna.remove_app(front)
    luna.remove_app(back)
  end)

  T.test("penalty 'timeout' blocks the IP for timeout_duration", function()
    local app = server()
    local r = app:new_router({ prefix = "p" })
    r:new({ prefix = "small", max_message_size = 20, timeout_duration = 0.3, fun = function() return "ok" end })
    r:new({ prefix = "other", fun = function() return "fine" end })
    local client = connected(connect(app))
    T.eq(client:fetch("p/small", { s = "x" }), "ok", "small message")
    local res, err = client:fetch("p/small", { s = string.rep("x", 100) })
    T.eq(err, "Message size exceeds limit of 20 bytes Timed out for 0.3 seconds", "penalty text")
    res, err = client:fetch("p/other", {})
    T.eq(err, "Client IP 127.0.0.1 is temporarily blocked", "blocked")
    luna.sleep(0.35)
    T.eq(client:fetch("p/other", {}), "fine", "unblocked")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end)

  T.test("penalty 'closed' disconnects and keeps the IP out for a while", function()
    local app = server()
    app:new_router({ prefix = "p" }):new({
      prefix = "small", max_message_size = 20, message_penalty = "closed", timeout_duration = 0.5,
      fun = function() return "ok" end,
    })
    local reason
    local client = connected(connect(app, { disconnect_server = function(r) reason = r end }))
    local res, err = client:fetch("p/small", { s = string.rep("x", 100) })
    T.eq(err, "Message size exceeds limit of 20 bytes", "penalty text")
    T.wait_until(function() return reason end, 2, "disconnect_server")
    T.eq(reason, "Message size exceeds limit of 20 bytes", "close reason")
    local again_reason
    local again = connect(app, { disconnect_server = function(r) again_reason = r end })
    T.wait_until(function() return again_reason end, 2, "refused while banned")
    T.eq(again_reason, "Client IP is temporarily banned", "ban reason")
    luna.sleep(0.5)
    local later = connected(connect(app))
    T.eq(later:fetch("p/small", {}), "ok", "served after the ban")
    lunac.disconnect_to_app(client)
    lunac.disconnect_to_app(again)
    lunac.disconnect_to_app(later)
    luna.remove_app(app)
  end)

  T.test("idle clients: disconnect_time, timeout_client returning false keeps them", function()
    local offered = 0
    local keep = true
    local closed = false
    local app = server({
      disconnect_time = 0.2,
      timeout_client = function(client, idle, dt)
        offered = offered + 1
        T.ok(idle >= 0.2 and dt == 0.2, "idle " .. idle .. " dt " .. dt)
        if keep then return false end
      end,
      close_client = function() closed = true end,
    })
    local reason
    local client = connected(connect(app, { disconnect_server = function(r) reason = r end }))
    T.wait_until(function() return offered >= 2 end, 2, "timeout_client offered twice")
    T.ok(not closed, "kept")
    keep = false
    T.wait_until(function() return closed and reason end, 2, "closed after idling")
    T.eq(reason, "idle timeout", "reason")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end, 6)

  T.test("remove_app tells clients (disconnect_server fires)", function()
    local app = server()
    local reason
    local client = connected(connect(app, { disconnect_server = function(r) reason = r end }))
    T.wait_until(function() return #app:get_clients() == 1 end, 2, "the server knows the client")
    luna.remove_app(app)
    T.wait_until(function() return reason end, 2, "disconnect_server")
    T.eq(reason, "Server app removed", "reason")
    local res, err = client:fetch("a/b", {})
    T.eq(err, "Not connected to server", "fetch after the server left")
    lunac.disconnect_to_app(client)
  end)

  T.test("calls pending at disconnect_to_app end with 'Disconnected: Close server'", function()
    local app = server()
    app:new_router({ prefix = "s" }):new({ prefix = "slow", async = true, fun = function() luna.sleep(1) end })
    local client = connected(connect(app))
    local waited, called
    luna.spawn(function() waited = { client:fetch("s/slow", {}) } end)
    client:noawait_fetch("s/slow", function(_, err) called = err end, {})
    luna.sleep(0.05)
    lunac.disconnect_to_app(client)
    T.wait_until(function() return waited and called end, 1, "both calls ended")
    T.eq(waited[2], "Disconnected: Close server", "fetch")
    T.eq(called, "Disconnected: Close server", "noawait_fetch callback")
    luna.remove_app(app)
  end)

  T.test("disconnect_to_app tells the server (close_client fires)", function()
    local closed
    local app = server({ close_client = function(c) closed = c end })
    local client = connected(connect(app))
    T.wait_until(function() return #app:get_clients() == 1 end, 2, "client record")
    local rec = app:get_clients()[1]
    local ip, port = rec:getpeername()
    T.eq(ip, "127.0.0.1", "ip")
    T.eq(rec.ip, ip, "client.ip")
    T.eq(rec.port, port, "client.port")
    lunac.disconnect_to_app(client)
    T.wait_until(function() return closed end, 2, "close_client")
    T.eq(closed, rec, "the same client object")
    T.eq(#app:get_clients(), 0, "no clients left")
    luna.remove_app(app)
  end)

  T.test("server-side client:close() and reconnect_time", function()
    local app = server()
    app:new_router({ prefix = "a" }):new({ prefix = "b", fun = function() return 1 end })
    local connects, drops = 0, 0
    local client = connect(app, {
      reconnect_time = 0.2,
      connect_server = function() connects = connects + 1 end,
      disconnect_server = function() drops = drops + 1 end,
    })
    T.wait_until(function() return connects == 1 and #app:get_clients() == 1 end, 2, "first connect")
    app:get_clients()[1]:close()
    T.wait_until(function() return drops == 1 end, 2, "dropped")
    T.wait_until(function() return connects == 2 end, 3, "reconnected")
    T.eq(client:fetch("a/b", {}), 1, "works after reconnecting")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end)

  T.test("encryption on and off; a mismatch is refused with a reason", function()
    for _, enc in ipairs({ true, false }) do
      local app = server({ encryption = enc })
      app:new_router({ prefix = "e" }):new({ prefix = "x", fun = function(a) return a.s end })
      local client = connected(connect(app, { encryption = enc }))
      T.eq(client:fetch("e/x", { s = "secret" }), "secret", "encryption " .. tostring(enc))
      lunac.disconnect_to_app(client)
      local reason
      connect(app, { encryption = not enc, disconnect_server = function(r) reason = r end })
      T.wait_until(function() return reason end, 3, "mismatch refused")
      T.ok(reason:find("rejected", 1, true), "reason: " .. reason)
      luna.remove_app(app)
    end
    lunac.close()
  end, 8)

  T.test("server_key pinning: the right key connects, a wrong one is refused", function()
    local app = server()
    app:new_router({ prefix = "k" }):new({ prefix = "x", fun = function() return "pinned" end })
    T.eq(#app.public_key, 64, "hex public key")
    local good = connected(connect(app, { server_key = app.public_key }))
    T.eq(good:fetch("k/x", {}), "pinned", "pinned call")
    local reason
    local bad = connect(app, { server_key = string.rep("ab", 32), disconnect_server = function(r) reason = r end })
    local res, err = bad:fetch("k/x", {}, 3)
    T.eq(res, nil, "no result")
    T.eq(err, "Disconnected: server key mismatch", "fetch error")
    T.eq(reason, "server key mismatch", "disconnect reason")
    lunac.disconnect_to_app(good)
    lunac.disconnect_to_app(bad)
    luna.remove_app(app)
  end)

  T.test("secret_key keeps the public key across restarts; '*' serves IPv4 and IPv6", function()
    local secret = ("5a"):rep(32)
    local first = server({ secret_key = secret, host = "*" })
    local key = first.public_key
    luna.remove_app(first)
    local app = server({ secret_key = secret, host = "*" })
    T.eq(app.public_key, key, "same identity after a restart")
    app:new_router({ prefix = "d" }):new({ prefix = "ip", fun = function(args, client) return client.ip end })
    local v4 = connected(connect(app, { server_key = key }))
    local v6 = connected(connect(app, { host = "::1", name = "v6 client" }))
    T.eq(v4:fetch("d/ip", {}), "127.0.0.1", "IPv4 client seen as plain IPv4")
    T.eq(v6:fetch("d/ip", {}), "::1", "IPv6 client")
    T.wait_until(function() return #app:get_clients() == 2 end, 2, "both records")
    local lines = {}
    local real_print = print
    print = function(line) lines[#lines + 1] = tostring(line) end
    local logged = server({ host = "*", debug = true })
    connected(connect(logged, { name = "logged v4" }))
    T.wait_until(function() return #logged:get_clients() == 1 end, 2, "the logged app's record")
    luna.remove_app(logged)
    print = real_print
    local log = table.concat(lines, "\n")
    T.ok(log:find("client 127.0.0.1:%d+ connected"), "connect log: " .. log)
    T.ok(log:find("client 127.0.0.1:%d+ disconnected"), "disconnect log: " .. log)
    T.ok(not log:find("::ffff:", 1, true), "no IPv4-mapped address in the log: " .. log)
    for _, rec in ipairs(app:get_clients()) do
      T.ok(rec:getpeername() == rec.ip and not rec.ip:find("::ffff:", 1, true), "record ip " .. rec.ip)
    end
    lunac.disconnect_to_app(v4)
    lunac.disconnect_to_app(v6)
    luna.remove_app(app)
    T.raises({ "luna.new_app(config)", "'secret_key' must be 64 hex digits" }, luna.new_app,
      { name = "bad key", port = 0, secret_key = "xyz" })
  end)

  T.test("host names resolve without stalling", function()
    local app = server()
    app:new_router({ prefix = "h" }):new({ prefix = "x", fun = function() return "by name" end })
    local client = connect(app, { host = "localhost" })
    T.eq(client:fetch("h/x", {}), "by name", "fetch via localhost")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end)

  T.test("fetch timeout and set_* knobs", function()
    local app = server()
    app:new_router({ prefix = "t" }):new({ prefix = "slow", async = true, fun = function() luna.sleep(1) return 1 end })
    app:set_max_message_size(4096)
    app.set_max_retries(5)
    app:set_message_timeout(1)
    app.set_disconnect_time(15)
    local client = connected(connect(app))
    client:set_max_message_size(4096)
    client.set_max_retries(5)
    client:set_message_timeout(1)
    local t0 = luna.now()
    local res, err = client:fetch("t/slow", {}, 0.2)
    T.eq(err, "Request timed out", "timeout")
    T.ok(luna.now() - t0 < 0.6, "gave up in time")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end)

  T.test("max_ip_connected refuses sessions over the limit with a reason", function()
    local app = server({ max_ip_connected = 1 })
    local first = connected(connect(app))
    T.wait_until(function() return #app:get_clients() == 1 end, 2, "the server knows the first client")
    local reason
    local second = connect(app, { disconnect_server = function(r) reason = r end })
    T.wait_until(function() return reason end, 3, "refused")
    T.ok(reason:find("rejected", 1, true), "reason: " .. reason)
    T.eq(#app:get_clients(), 1, "one client")
    lunac.disconnect_to_app(first)
    lunac.disconnect_to_app(second)
    luna.remove_app(app)
  end)

  T.test("remove_router and router:remove", function()
    local app = server()
    local r = app:new_router({ prefix = "r" })
    local h = r:new({ prefix = "x", fun = function() return 1 end })
    r:new({ prefix = "y", fun = function() return 2 end })
    local client = connected(connect(app))
    T.eq(client:fetch("r/x", {}), 1, "before")
    T.eq(r:remove(h), true, "remove handler object")
    local _, err = client:fetch("r/x", {})
    T.eq(err, "Unknown route 'r/x'", "handler gone")
    T.eq(client:fetch("r/y", {}), 2, "other handler stays")
    T.eq(app:remove_router("r"), true, "remove router by prefix")
    _, err = client:fetch("r/y", {})
    T.eq(err, "Unknown route 'r/y'", "router gone")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end)

  T.test("config keys other Luna apps accept work here too (debug, max_message_size); typos raise", function()
    local lines = {}
    local real_print = print
    print = function(...)
      local parts = {}
      for i = 1, select("#", ...) do parts[i] = tostring(select(i, ...)) end
      lines[#lines + 1] = table.concat(parts, " ")
    end
    local app = server({ max_message_size = 200 })
    app:new_router({ prefix = "m" }):new({ prefix = "echo", fun = function(a) return a.s end })
    -- Code written for the original passes `debug` to the client too: it logs the session here.
    local client = connected(connect(app, { name = "chatty", debug = true, max_message_size = 100 }))
    local big, small = string.rep("x", 150), string.rep("y", 20)
    local echoed = client:fetch("m/echo", { s = small })
    local _, too_big_here = client:fetch("m/echo", { s = big })
    lunac.disconnect_to_app(client)
    local sender = connected(connect(app, { max_message_size = 1000 }))
    local _, too_big_there = sender:fetch("m/echo", { s = string.rep("z", 300) }, 0.3)
    lunac.disconnect_to_app(sender)
    print = real_print
    T.eq(echoed, small, "a small message passes")
    T.ok(tostring(too_big_here):find("too large", 1, true), "the client refuses to send: " .. tostring(too_big_here))
    T.eq(too_big_there, "Request timed out", "the server drops what is over its limit")
    local log = table.concat(lines, "\n")
    T.ok(log:find("[luna] client app 'chatty': connected to 127.0.0.1:" .. app.port, 1, true), log)
    T.ok(log:find("[luna] client app 'chatty': disconnected: Close server", 1, true), log)
    luna.remove_app(app)
    T.raises({ "lunac.connect_to_app(config)", "unknown option 'debgu'", "debug" }, lunac.connect_to_app,
      { host = "127.0.0.1", port = 1, debgu = true })
    T.raises({ "luna.new_app(config)", "'max_message_size' must be a whole number of bytes" }, luna.new_app,
      { port = 0, max_message_size = 0 })
  end)

  T.main("misuse errors name the call and the problem", function()
    T.raises({ "luna.new_app(config)", "unknown option 'prot'" }, luna.new_app, { port = 0, prot = 1 })
    -- Several mistakes: always the same one is named (the first in sorted order).
    for _, keys in ipairs({ { "zz", "aa", "mm", "qq" }, { "yy", "bb", "xx", "cc", "ab" } }) do
      local config = { port = 0 }
      for _, k in ipairs(keys) do config[k] = 1 end
      table.sort(keys)
      T.raises({ "unknown option '" .. keys[1] .. "'" }, luna.new_app, config)
    end
    T.raises({ "luna.new_app(config)", "'port' must be a number, got string" }, luna.new_app, { port = "x" })
    T.raises({ "luna.new_app(config)", "'port' is required" }, luna.new_app, { name = "x" })
    T.raises({ "luna.new_app(config)", "'new_client' must be a function, got number" }, luna.new_app,
      { port = 0, new_client = 1 })
    T.raises({ "lunac.connect_to_app(config)", "'host' is required" }, lunac.connect_to_app, { port = 1 })
    T.raises({ "lunac.connect_to_app(config)", "'server_key' must be" }, lunac.connect_to_app,
      { host = "127.0.0.1", port = 1, server_key = "zz" })
    local app = luna.new_app({ name = "misuse", port = 0, debug = false })
    T.raises({ "luna.new_app(config)", "an app named 'misuse' already exists" }, luna.new_app,
      { name = "misuse", port = 0, debug = false })
    local r = app:new_router({ prefix = "m" })
    T.raises({ "router:new(config)", "'fun' is required" }, r.new, r, { prefix = "x" })
    T.raises({ "router:new(config)", "unknown option 'fn'" }, r.new, r, { prefix = "x", fn = print })
    T.raises({ "router:new(config)", "'validate' entries must be lists of type names, got number" }, r.new, r,
      { prefix = "x", fun = print, validate = { zeta = "x", alpha = 5, mu = true, beta = 7 } })
    T.raises({ "router:new(config)", "'validate' entry for a must list type names" }, r.new, r,
      { prefix = "x", fun = print, validate = { z = { 1 }, a = { "nope" }, q = { false } } })
    T.raises({ "router:new(config)", "'message_penalty' must be" }, r.new, r,
      { prefix = "x", fun = print, message_penalty = "jail" })
    T.raises({ "app:new_router(config)", "unknown option 'prefx'" }, app.new_router, app, { prefx = "a" })
    local client = lunac.connect_to_app({ host = "127.0.0.1", port = app.port, encryption = true })
    T.raises({ "client:fetch(path, args, timeout)", "cannot encode 'args'", "function" }, client.fetch, client,
      "m/x", { f = print })
    local cyclic = {}
    cyclic.self = cyclic
    T.raises({ "client:fetch(path, args, timeout)", "cyclic table" }, client.fetch, client, "m/x", cyclic)
    T.raises({ "client:fetch(path, args, timeout)", "'path' must be a string, got number" }, client.fetch,
      client, 5)
    T.raises({ "client:noawait_fetch(path, callback, args)", "'callback' must be a function or nil" },
      client.noawait_fetch, client, "m/x", 5)
    T.raises({ "client:set_max_retries(n)", "'n' must be a number" }, client.set_max_retries, client, "x")
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
  end)

  T.test("luna.stats counts calls, bytes, sessions and handler errors; client:rtt is measured on both ends", function()
    local app = server()
    local seen_client
    app:new_router({ prefix = "s" }):new({ prefix = "echo", fun = function(args, client)
      seen_client = client
      if args[1] == "boom" then error("boom") end
      return args[1]
    end })
    local client = connected(connect(app))
    T.eq(client:rtt(), nil, "no RTT before the first answer")
    local before = luna.stats()
    T.eq(type(before.update.count), "number", "update.count")
    for i = 1, 20 do
      T.eq(client:fetch("s/echo", { i }), i, "echo " .. i)
    end
    T.eq(client:fetch("s/echo", { "boom" }), nil, "a raising handler answers nil, err")
    local t = {}
    local after = lunac.stats(t)
    T.eq(after, t, "stats fills the table it is given")
    T.ok(after.rpc.messages_out - before.rpc.messages_out >= 42, "calls and answers out: " .. after.rpc.messages_out)
    T.ok(after.rpc.messages_in - before.rpc.messages_in >= 42, "requests and answers in")
    T.ok(after.messages_in >= after.rpc.messages_in, "messages_in covers RPC")
    T.ok(after.datagrams_in > before.datagrams_in and after.bytes_out > before.bytes_out, "datagrams and bytes")
    T.ok(after.connections.rpc_sessions >= 1 and after.connections.rpc_clients >= 1, "sessions and clients")
    T.eq(after.handler_errors - before.handler_errors, 1, "the raising handler counted once")
    T.ok(after.update.max >= after.update.avg, "update times since the last call")
    T.eq(type(after.dropped.oversize), "number", "dropped.oversize")
    local srtt, rttvar = client:rtt()
    T.ok(srtt > 0 and srtt < 1 and rttvar >= 0, "client RTT " .. tostring(srtt) .. " / " .. tostring(rttvar))
    local s_srtt = seen_client:rtt()
    T.ok(s_srtt and s_srtt > 0 and s_srtt < 1, "server-side RTT " .. tostring(s_srtt))
    -- Junk to the server's port is dropped as malformed, and stays counted once the app is gone.
    local u = luna.udp.open({ host = "127.0.0.1" })
    local malformed_before = luna.stats(t).dropped.malformed
    for _ = 1, 5 do u:send("\255junk", "127.0.0.1", app.port) end
    T.wait_until(function() return luna.stats(t).dropped.malformed >= malformed_before + 5 end, 2,
      "junk counted as malformed")
    local malformed = t.dropped.malformed
    u:close()
    lunac.disconnect_to_app(client)
    luna.remove_app(app)
    T.ok(luna.stats(t).dropped.malformed >= malformed, "counts survive the app's removal")
  end)

  T.test("calls made just before disconnect_to_app still reach the server", function()
    local app = server()
    local got = 0
    app:new_router({ prefix = "q" }):new({ prefix = "note", fun = function() got = got + 1 end })
    local client = connected(connect(app))
    for _ = 1, 3 do client:noawait_fetch("q/note", {}) end
    lunac.disconnect_to_app(client)
    T.wait_until(function() return got == 3 end, 2, "the three calls handled")
    luna.remove_app(app)
  end)
end
