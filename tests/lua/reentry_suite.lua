-- Re-entrancy: every callback the runtime calls tolerates any API call made inside it (closing or
-- removing its own app, closing every app, creating new ones), and every end of a session or
-- connection is reported exactly once, whoever ends it and from wherever.
--
-- Each cell of the matrix builds a "world" (an RPC server with a connected client, a WebSocket
-- server with a connected client, every callback counted), makes one callback fire, runs one
-- call inside it, then closes everything and checks the books: no error anywhere, each client
-- record got `close_client` once, each session `disconnect_server` once, each WebSocket
-- connection `on_close` once on both sides, and every app name is free again.
return function(T, luna, lunac)
  local serial = 0

  -- Counters of end-of-life callbacks by object (a client record, a ws object, an app).
  local function tally()
    local t = {}
    return function(key)
      t[key] = (t[key] or 0) + 1
      return t[key]
    end, t
  end

  local function world(opts)
    opts = opts or {}
    serial = serial + 1
    local W = {
      n = serial, hooks = {}, errors = {}, expected_errors = 0, fired = {},
      records = {}, ws_objects = {}, extra = {},
    }
    W.rpc_name, W.web_name = "re rpc " .. serial, "re web " .. serial
    W.client_name, W.wclient_name = "re client " .. serial, "re wclient " .. serial
    W.close_client, W.closed_records = tally()
    W.ws_on_close, W.closed_ws = tally()

    -- Runs the hook installed for `name` (the callback under test), if any.
    local function event(name, ...)
      W.fired[name] = (W.fired[name] or 0) + 1
      local hook = W.hooks[name]
      if hook then
        return hook(...)
      end
    end
    local function error_handler(which)
      return function(err)
        if tostring(err):find("boom", 1, true) then
          W.expected_errors = W.expected_errors + 1
        else
          W.errors[#W.errors + 1] = which .. ": " .. tostring(err)
        end
        event(which)
      end
    end

    function W.start()
      W.rpc = luna.new_app({
        name = W.rpc_name, port = 0, debug = false, no_errors = true,
        error_handler = error_handler("error_handler"),
        disconnect_time = opts.disconnect_time,
        new_client = function(client)
          W.records[#W.records + 1] = client
          event("new_client", client)
        end,
        close_client = function(client)
          W.close_client(client)
          event("close_client", client)
        end,
        timeout_client = opts.disconnect_time and function(client) return event("timeout_client", client) end,
        request_listener = function(message, client) event("request_listener", message, client) end,
      })
      local r = W.rpc:new_router({ prefix = "r" })
      r:new({ prefix = "sync", fun = function() event("handler"); return "ok" end })
      r:new({ prefix = "async", async = true, fun = function() luna.sleep(0); event("async_handler"); return "ok" end })
      r:new({ prefix = "boom", fun = function() error("boom") end })
      W.client = lunac.connect_to_app({
        name = W.client_name, host = "127.0.0.1", port = W.rpc.port, no_errors = true, debug = false,
        encryption = not opts.reject,
        error_handler = error_handler("client_error_handler"),
        connect_server = function() event("connect_server") end,
        disconnect_server = function(reason)
          W.disconnects = (W.disconnects or 0) + 1
          W.disconnect_reason = reason
          event("disconnect_server", reason)
        end,
        listener = function(message)
          event("listener", message)
          if message == "boom" then error("boom") end
        end,
      })
      W.web = luna.new_web_app({
        name = W.web_name, host = "127.0.0.1", port = 0, debug = false, no_errors = true,
        error_handler = error_handler("ws_error_handler"),
        protocols = {
          default = function(ws)
            W.ws_objects[#W.ws_objects + 1] = ws
            W.server_ws = ws
            ws.on_close = function()
              W.ws_on_close(ws)
              event("ws_on_close")
            end
            event("ws_handler", ws)
            while true do
              local message = ws:receive()
              if not message then return end
              if message == "boom" then error("boom") end
              ws:send(message)
            end
          end,
        },
      })
      W.wclient = lunac.connect_to_web_app({
        name = W.wclient_name, url = "ws://127.0.0.1:" .. W.web.port .. "/", debug = false, no_errors = true,
        error_handler = error_handler("wclient_error_handler"),
        on_connect = function() event("on_connect") end,
        on_message = function(_, message) event("on_message", message) end,
        on_close = function(_, code, reason)
          W.wclient_closes = (W.wclient_closes or 0) + 1
          event("on_close", code, reason)
        end,
      })
    end

    function W.wait_connected()
      T.wait_until(function()
        return (opts.reject or W.client:is_connected()) and #W.records == (opts.reject and 0 or 1)
          and W.fired.on_connect and W.server_ws
      end, 3, "world " .. W.n .. " connected")
    end

    -- Closes everything and checks that every end was reported exactly once.
    function W.finish()
      for _, other in ipairs(W.extra) do
        other.wait_connected()
      end
      luna.close()
      lunac.close()
      local function settled()
        if (W.disconnects or 0) < 1 or (W.wclient_closes or 0) < 1 then return false end
        for _, rec in ipairs(W.records) do
          if not W.closed_records[rec] then return false end
        end
        for _, ws in ipairs(W.ws_objects) do
          if not W.closed_ws[ws] then return false end
        end
        return true
      end
      T.wait_until(settled, 3, "every end reported in world " .. W.n)
      luna.sleep(0.01) -- a late duplicate would show up now
      T.eq(#W.errors, 0, "errors in world " .. W.n .. ": " .. table.concat(W.errors, "; "))
      T.eq(W.disconnects, 1, "disconnect_server calls (last: " .. tostring(W.disconnect_reason) .. ")")
      T.eq(W.wclient_closes, 1, "web client on_close calls")
      for i, rec in ipairs(W.records) do
        T.eq(W.closed_records[rec], 1, "close_client calls for client record " .. i)
      end
      for i, ws in ipairs(W.ws_objects) do
        T.eq(W.closed_ws[ws], 1, "ws.on_close calls for connection " .. i)
      end
      T.ok((W.fired.connect_server or 0) <= 1, "connect_server at most once")
      T.ok((W.fired.on_connect or 0) <= 1, "on_connect at most once")
      T.eq(select(2, luna.remove_app(W.rpc_name)), "App not found", "RPC app gone")
      T.eq(select(2, luna.remove_web_app(W.web_name)), "App not found", "web app gone")
      T.eq(select(2, lunac.disconnect_to_app(W.client_name)), "App not found", "RPC client gone")
      T.eq(select(2, lunac.disconnect_to_web_app(W.wclient_name)), "App not found", "web client gone")
      for _, other in ipairs(W.extra) do
        other.finish()
      end
    end

    return W
  end

  -- What a callback may do (each runs once, inside the callback under test).
  local calls = {
    { "lunac.close()", function() lunac.close() end },
    { "luna.close()", function() luna.close() end },
    { "disconnect_to_app(own client)", function(W) lunac.disconnect_to_app(W.client) end },
    { "remove_app(own app)", function(W) luna.remove_app(W.rpc) end },
    { "remove_web_app(own app)", function(W) luna.remove_web_app(W.web) end },
    { "disconnect_to_web_app(own client)", function(W) lunac.disconnect_to_web_app(W.wclient) end },
    { "creating new apps", function(W)
      local other = world()
      other.start()
      W.extra[#W.extra + 1] = other
    end },
  }

  -- The callbacks the runtime calls, and how to make each one fire. `opts` configures the world;
  -- `trigger(W)` runs once the world is connected (nil: the callback fires while connecting).
  local function first_record(W) return W.rpc:get_clients()[1] end
  local callbacks = {
    { "new_client" },
    { "connect_server" },
    { "on_connect" },
    { "ws handler", hook = "ws_handler" },
    { "close_client (server closes the client)", hook = "close_client",
      trigger = function(W) first_record(W):close() end },
    { "close_client (client disconnects)", hook = "close_client",
      trigger = function(W) lunac.disconnect_to_app(W.client) end },
    { "close_client (app removed)", hook = "close_client", trigger = function(W) luna.remove_app(W.rpc) end },
    { "timeout_client", opts = { disconnect_time = 0.05 } },
    { "disconnect_server (Closed by server)", hook = "disconnect_server",
      trigger = function(W) first_record(W):close() end },
    { "disconnect_server (Server app removed)", hook = "disconnect_server",
      trigger = function(W) luna.remove_app(W.rpc) end },
    { "disconnect_server (Close server)", hook = "disconnect_server",
      trigger = function(W) lunac.disconnect_to_app(W.client) end },
    { "disconnect_server (handshake rejected)", hook = "disconnect_server", opts = { reject = true } },
    { "listener", trigger = function(W) first_record(W):send("hi") end },
    { "request_listener", trigger = function(W) W.client:noawait_fetch("r/sync", {}) end },
    { "request handler", hook = "handler", trigger = function(W) W.client:noawait_fetch("r/sync", {}) end },
    { "async handler", hook = "async_handler", trigger = function(W) W.client:noawait_fetch("r/async", {}) end },
    { "noawait_fetch callback", hook = "noawait", trigger = function(W)
      W.client:noawait_fetch("r/sync", function() W.hooks.noawait() end, {})
    end },
    { "app error_handler", hook = "error_handler", trigger = function(W) W.client:noawait_fetch("r/boom", {}) end },
    { "client error_handler", hook = "client_error_handler", trigger = function(W) first_record(W):send("boom") end },
    { "on_message", trigger = function(W) W.wclient:send("hello") end },
    { "on_close (client closes)", hook = "on_close", trigger = function(W) W.wclient:close() end },
    { "on_close (server closes)", hook = "on_close", trigger = function(W) W.server_ws:close(4000, "bye") end },
    { "on_close (web app removed)", hook = "on_close", trigger = function(W) luna.remove_web_app(W.web) end },
    { "ws.on_close", hook = "ws_on_close", trigger = function(W) W.wclient:close() end },
    { "web app error_handler", hook = "ws_error_handler", trigger = function(W) W.wclient:send("boom") end },
    { "web client error_handler", hook = "wclient_error_handler", trigger = function(W)
      W.hooks.on_message = function() error("boom") end
      W.wclient:send("x")
    end },
    { "set_timeout callback", hook = "timer", trigger = function(W)
      luna.set_timeout(0, function() W.hooks.timer() end)
    end },
    { "set_interval callback", hook = "timer", trigger = function(W)
      luna.set_interval(0.001, function(timer) timer:cancel(); W.hooks.timer() end)
    end },
    { "luna.set_error_handler handler", hook = "runtime_error", trigger = function(W)
      luna.set_error_handler(function(err)
        T.restore_handler()
        if not tostring(err):find("boom", 1, true) then W.errors[#W.errors + 1] = tostring(err) end
        W.hooks.runtime_error()
      end)
      luna.set_timeout(0, function() error("boom") end)
    end },
  }

  for _, cb in ipairs(callbacks) do
    local label, hook_name = cb[1], cb.hook or cb[1]
    for _, call in ipairs(calls) do
      local call_label, run = call[1], call[2]
      T.test(label .. " calls " .. call_label, function()
        local W = world(cb.opts)
        local done = false
        W.hooks[hook_name] = function()
          if not done then
            done = true
            run(W)
          end
        end
        W.start()
        if cb.trigger then
          W.wait_connected()
          cb.trigger(W)
        end
        T.wait_until(function() return done end, 3, label .. " to fire")
        luna.sleep(0.01) -- what the call set in motion
        W.finish()
      end)
    end
  end

  -- The same for sockets: a TCP server with one connection and a UDP socket; every callback a
  -- socket has, each calling what may close it, its server, or everything; each stream's end is
  -- reported once on both sides.
  local function net_world()
    local N = { hooks = {}, errors = {}, fired = {}, closes = {} }
    local function event(name, ...)
      N.fired[name] = (N.fired[name] or 0) + 1
      local hook = N.hooks[name]
      if hook then return hook(...) end
    end
    local function closed(side, name)
      return function()
        N.closes[side] = (N.closes[side] or 0) + 1
        event(name)
      end
    end
    function N.start()
      N.udp = luna.udp.open({ host = "127.0.0.1", on_packet = function() event("on_packet") end })
      N.srv = luna.tcp.listen({ host = "127.0.0.1", port = 0, on_connection = function(s)
        N.server_s = s
        s.on_close = closed("server", "server on_close")
        s.on_data = function(st, d)
          event("server on_data")
          st:write(d)
        end
        while not N.client do luna.sleep(0) end -- the client object exists before the hook runs
        event("on_connection")
      end })
      luna.tcp.connect("127.0.0.1", N.srv.port, {
        on_connect = function(s)
          N.client = s
          event("on_connect")
        end,
        on_data = function() event("client on_data") end,
        on_drain = function() event("on_drain") end,
        on_close = closed("client", "client on_close"),
      })
    end
    function N.finish()
      luna.close()
      T.wait_until(function() return N.closes.client and N.closes.server end, 3, "both ends reported")
      luna.sleep(0.01)
      T.eq(N.closes.client, 1, "client on_close calls")
      T.eq(N.closes.server, 1, "server on_close calls")
      T.eq(N.srv.running, false, "the server is closed")
      T.eq(select(2, N.udp:receive()), "closed", "the UDP socket is closed")
      if N.extra then T.eq(N.extra.running, false, "the server created inside is closed too") end
    end
    return N
  end

  local net_calls = {
    { "luna.close()", function() luna.close() end },
    { "lunac.close()", function() lunac.close() end },
    { "srv:close(true)", function(N) N.srv:close(true) end },
    { "s:close() of the client", function(N) N.client:close() end },
    { "s:reset() of the server's end", function(N) if N.server_s then N.server_s:reset() end end },
    { "u:close()", function(N) N.udp:close() end },
    { "creating a new server", function(N)
      N.extra = luna.tcp.listen({ host = "127.0.0.1", port = 0, on_connection = function() end })
    end },
  }
  local net_callbacks = {
    { "on_connection" },
    { "on_connect" },
    { "server on_data", trigger = function(N) N.client:write("x") end },
    { "client on_data", trigger = function(N) N.client:write("x") end },
    { "on_drain", trigger = function(N) N.client:write(("d"):rep(4 * 1024 * 1024)) end },
    { "server on_close", trigger = function(N) N.client:close() end },
    { "client on_close", trigger = function(N) N.srv:close(true) end },
    { "on_packet", trigger = function(N)
      local port = tonumber(N.udp.address:match(":(%d+)$"))
      luna.udp.open({ host = "127.0.0.1" }):send("p", "127.0.0.1", port)
    end },
  }
  for _, cb in ipairs(net_callbacks) do
    for _, call in ipairs(net_calls) do
      T.test("socket " .. cb[1] .. " calls " .. call[1], function()
        local N = net_world()
        local done = false
        N.hooks[cb[1]] = function()
          if not done then
            done = true
            call[2](N)
          end
        end
        N.start()
        if cb.trigger then
          T.wait_until(function() return N.server_s and N.fired.on_connect end, 3, "connected")
          cb.trigger(N)
        end
        T.wait_until(function() return done end, 3, cb[1] .. " to fire")
        luna.sleep(0.01)
        N.finish()
      end)
    end
  end

  -- Item 2 of issue 13 in isolation: a session that already ended is not reported again by a
  -- later close, whatever ended it.
  T.test("disconnect_server is not repeated by lunac.close() after the session ended", function()
    local triggers = {
      ["Closed by server"] = function(W) W.rpc:get_clients()[1]:close() end,
      ["Server app removed"] = function(W) luna.remove_app(W.rpc) end,
    }
    for reason, trigger in pairs(triggers) do
      local W = world()
      W.start()
      W.wait_connected()
      trigger(W)
      T.wait_until(function() return W.disconnects end, 2, reason)
      T.eq(W.disconnect_reason, reason, "reason")
      lunac.close()
      lunac.close()
      T.eq(W.disconnects, 1, "reported once after lunac.close() (" .. reason .. ")")
      W.finish()
    end
  end)

  T.test("a web client's on_close sees its name and may reconnect under the same name", function()
    local app = luna.new_web_app({ name = "re again server", host = "127.0.0.1", port = 0, debug = false,
      protocols = { default = function(ws) ws:receive() end } })
    local names, connects, second = {}, 0, nil
    local function connect()
      return lunac.connect_to_web_app({ name = "re again", url = "ws://127.0.0.1:" .. app.port, debug = false,
        on_connect = function() connects = connects + 1 end,
        on_close = function(self)
          names[#names + 1] = self.name
          if #names == 1 then second = connect() end
        end })
    end
    local first = connect()
    T.wait_until(function() return connects == 1 end, 2, "first connect")
    first:close()
    T.wait_until(function() return connects == 2 end, 2, "reconnected from on_close")
    T.eq(names[1], "re again", "self.name in on_close")
    T.eq(second.name, "re again", "the new client")
    lunac.close()
    T.wait_until(function() return #names == 2 end, 2, "second close")
    luna.remove_web_app(app)
  end)

  T.test("disconnect_server is not repeated after a handshake timeout", function()
    local reasons = {}
    -- Nobody answers on this port: the handshake gives up after connect_timeout (5 s).
    local silent = luna.new_web_app({ name = "re silent", host = "127.0.0.1", port = 0, debug = false,
      protocols = { default = function() end } })
    local port = silent.port
    luna.remove_web_app(silent)
    lunac.connect_to_app({ name = "re timeout", host = "127.0.0.1", port = port, debug = false,
      disconnect_server = function(reason)
        reasons[#reasons + 1] = reason
        lunac.close() -- the issue's crash: this recursed until the stack overflowed
      end })
    T.wait_until(function() return #reasons > 0 end, 7, "handshake timeout")
    T.eq(reasons[1], "handshake timeout", "reason")
    lunac.close()
    luna.sleep(0.01)
    T.eq(#reasons, 1, "reported once")
  end, 8)
end
