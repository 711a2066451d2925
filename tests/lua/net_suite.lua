-- Raw sockets: luna.tcp, luna.unix, luna.udp, our servers and our clients in one process, over
-- real sockets on 127.0.0.1 (and a Unix socket in /tmp).
return function(T, luna, lunac)
  local data = (os.getenv("LUNA_TEST_DATA") or "tests/data") .. "/"
  local tcp, udp, unix = luna.tcp, luna.udp, luna.unix

  -- An echo server (coroutine style) on a free port.
  local function echo_server(extra)
    local config = {
      host = "127.0.0.1", port = 0,
      on_connection = function(s)
        while true do
          local chunk = s:read()
          if not chunk then return end
          s:write(chunk)
        end
      end,
    }
    for k, v in pairs(extra or {}) do config[k] = v end
    return tcp.listen(config)
  end

  -- Reads exactly n bytes, whatever the segmentation.
  local function read_n(s, n)
    local got = {}
    local have = 0
    while have < n do
      local chunk, err = s:read(n - have)
      if not chunk then return nil, err end
      got[#got + 1] = chunk
      have = have + #chunk
    end
    return table.concat(got)
  end

  T.test("tcp: connect, write, read back, addresses", function()
    local srv = echo_server()
    T.ok(srv.port > 0 and srv.running, "listening on a free port")
    T.eq(srv.address, "127.0.0.1:" .. srv.port, "server address")
    local s, err = tcp.connect("127.0.0.1", srv.port)
    T.ok(s, err)
    T.ok(s.connected, "connected")
    T.eq(s.peer_address, "127.0.0.1:" .. srv.port, "peer address")
    local ip, port = s:getsockname()
    T.eq(ip, "127.0.0.1", "local ip")
    T.eq(s.address, "127.0.0.1:" .. port, "local address")
    local pip, pport = s:getpeername()
    T.eq(pip .. ":" .. pport, s.peer_address, "getpeername")
    T.eq(s:write("hello"), true, "write queues")
    T.eq(read_n(s, 5), "hello", "echo")
    local big = ("0123456789"):rep(30000)
    T.eq(s:write(big), true, "a 300 KB write")
    T.eq(read_n(s, #big), big, "300 KB echo")
    T.eq(s.tls, nil, "plain stream")
    T.eq(#srv:connections(), 1, "one connection")
    s:close()
    T.wait_until(function() return #srv:connections() == 0 end, 2, "the server's end closes too")
    srv:close()
    T.eq(srv.running, false, "closed server")
  end)

  T.test("tcp: read_until and read_exact, and what is left at the end", function()
    local got = {}
    local srv = tcp.listen{host = "127.0.0.1", port = 0, on_connection = function(s)
      got.line = s:read_until("\n")
      got.exact = s:read_exact(3)
      got.tail, got.err, got.partial = s:read_until("\n")
      got.after = { s:read() }
    end}
    local s = tcp.connect("127.0.0.1", srv.port)
    s:write("first line\nabc")
    luna.sleep(0.02)
    s:write("de")
    s:close()
    T.wait_until(function() return got.after end, 2, "server read everything")
    T.eq(got.line, "first line\n", "read_until keeps the delimiter")
    T.eq(got.exact, "abc", "read_exact")
    T.eq(got.tail, nil, "no delimiter before the end")
    T.eq(got.err, "closed", "clean end")
    T.eq(got.partial, "de", "the partial line is returned")
    T.eq(got.after[1], nil, "then nothing")
    T.eq(got.after[2], "closed", "still closed")
    srv:close()
  end)

  T.test("on_data: unconsumed bytes come again, split at every byte or coalesced", function()
    local seen = {}
    local srv = tcp.listen{host = "127.0.0.1", port = 0, on_connection = function(s)
      -- Length-prefixed messages: 1 byte length, then the payload.
      s.on_data = function(s, chunk)
        local pos = 1
        while pos <= #chunk do
          local len = chunk:byte(pos)
          if pos + len > #chunk then break end
          seen[#seen + 1] = chunk:sub(pos + 1, pos + len)
          pos = pos + 1 + len
        end
        return #chunk - pos + 1
      end
    end}
    local s = tcp.connect("127.0.0.1", srv.port)
    local wire, want = {}, {}
    for i = 1, 40 do
      local msg = ("m%02d:"):format(i) .. ("x"):rep(i % 7)
      want[#want + 1] = msg
      wire[#wire + 1] = string.char(#msg) .. msg
    end
    local all = table.concat(wire)
    -- First half one byte per update (each its own segment), the rest in one write.
    local half = math.floor(#all / 2)
    for i = 1, half do
      s:write(all:sub(i, i))
      luna.sleep(0)
    end
    s:write(all:sub(half + 1))
    T.wait_until(function() return #seen >= #want end, 5, "every message")
    T.eq(#seen, #want, "each message exactly once")
    for i = 1, #want do T.eq(seen[i], want[i], "message " .. i) end
    s:close()
    srv:close()
  end)

  T.test("on_data keeping the whole input limit closes the stream with the reason", function()
    local reason
    local srv = tcp.listen{host = "127.0.0.1", port = 0, max_input = 16, on_connection = function(s)
      s.on_data = function(_, chunk) return #chunk end -- never consumes
      s.on_close = function(_, why) reason = why end
    end}
    local s = tcp.connect("127.0.0.1", srv.port)
    s:write(("y"):rep(64))
    T.wait_until(function() return reason end, 2, "closed")
    T.ok(reason:find("max_input", 1, true), reason)
    srv:close()
  end)

  T.test("backpressure: write refuses past max_queued, memory stays bounded, drain resumes", function()
    local reader
    local go = false
    local srv = tcp.listen{host = "127.0.0.1", port = 0, on_connection = function(s)
      while not go do luna.sleep(0.01) end
      local total = 0
      while true do
        local chunk = s:read()
        if not chunk then break end
        total = total + #chunk
        reader = total
      end
    end}
    local drained = 0
    local s = tcp.connect("127.0.0.1", srv.port, {max_queued = 256 * 1024,
      on_drain = function() drained = drained + 1 end})
    local chunk = ("z"):rep(64 * 1024)
    local sent, refused = 0, nil
    for _ = 1, 400 do
      local ok, err = s:write(chunk)
      if not ok then refused = err break end
      sent = sent + #chunk
      luna.sleep(0)
    end
    T.eq(refused, "backpressure", "the write is refused, not queued")
    T.ok(s.queued <= 256 * 1024 + #chunk, "queued " .. s.queued)
    go = true
    T.eq(s:drain(), true, "drain returns once the peer reads")
    T.eq(s.queued, 0, "nothing queued")
    T.ok(drained >= 1, "on_drain ran")
    T.wait_until(function() return reader == sent end, 5, "the peer got every byte")
    s:close()
    srv:close()
  end)

  T.test("connect failures: refused, unknown host, TLS to a plain server times out", function()
    local port
    do
      local probe = echo_server()
      port = probe.port
      probe:close()
    end
    local s, err = tcp.connect("127.0.0.1", port)
    T.eq(s, nil, "refused")
    T.ok(err:find("refused", 1, true), err)
    s, err = tcp.connect("no-such-host.invalid", 80)
    T.eq(s, nil, "unknown host")
    T.ok(err:find("cannot resolve", 1, true), err)
    local silent = tcp.listen{host = "127.0.0.1", port = 0, on_connection = function(c) c.on_data = function() end end}
    s, err = tcp.connect("127.0.0.1", silent.port, {tls = {ca = data .. "ca.pem"}, timeout = 0.3})
    T.eq(s, nil, "no TLS server there")
    T.ok(err:find("TLS handshake timed out", 1, true), err)
    silent:close()
  end)

  -- Outside a coroutine (T.main runs at load time, on the main thread) connect returns at once.
  local outside = {}
  T.main("outside a coroutine connect returns the stream before it connects", function()
    outside.srv = echo_server()
    outside.s = tcp.connect("127.0.0.1", outside.srv.port, {
      on_connect = function(st) outside.connected = st.connected; st:write("ping") end,
      on_data = function(_, d) outside.data = (outside.data or "") .. d end,
      on_close = function(_, why) outside.closed = why or "clean" end,
    })
    T.ok(outside.s and not outside.s.connected, "a stream, not connected yet")
  end)

  T.test("... and reports through its callbacks", function()
    T.wait_until(function() return outside.data == "ping" end, 2, "echo through on_data")
    T.eq(outside.connected, true, "on_connect saw it connected")
    outside.srv:close(true)
    T.wait_until(function() return outside.closed end, 2, "on_close")
    T.eq(outside.closed, "clean", "closed by the server: a clean end")
  end)

  T.test("tls: our client and server, with the test CA", function()
    local srv = echo_server({tls = {cert = data .. "server.pem", key = data .. "server.key"}})
    -- "localhost" may resolve to ::1 first: the listener is IPv4 only, the next address is tried.
    local s, err = tcp.connect("localhost", srv.port, {tls = {ca = data .. "ca.pem"}})
    T.ok(s, err)
    T.ok(s.tls, "TLS info")
    T.ok(s.tls.version:find("TLS", 1, true), s.tls.version)
    T.ok(s.tls.cipher, "cipher")
    T.ok(s.tls.peer_subject:find("localhost", 1, true), s.tls.peer_subject)
    s:write("secret")
    T.eq(read_n(s, 6), "secret", "echo over TLS")
    s:close()
    srv:close()
  end)

  T.test("tls: certificate errors are readable and verify = false opts out", function()
    local srv = echo_server({tls = {cert = data .. "server.pem", key = data .. "server.key"}})
    local s, err = tcp.connect("127.0.0.1", srv.port, {tls = true})
    T.eq(s, nil, "unknown CA")
    T.ok(err:find("certificate verify failed", 1, true) and err:find("UnknownIssuer", 1, true), err)
    s, err = tcp.connect("127.0.0.1", srv.port, {tls = {ca = data .. "ca.pem", server_name = "example.com"}})
    T.eq(s, nil, "wrong name")
    T.ok(err:find("certificate verify failed", 1, true) and err:find("example.com", 1, true), err)
    s = tcp.connect("127.0.0.1", srv.port, {tls = {verify = false, server_name = "example.com"}})
    T.ok(s, "verify = false accepts it")
    s:write("x")
    T.eq(read_n(s, 1), "x", "and works")
    s:close()
    srv:close()
    local old = echo_server({tls = {cert = data .. "expired.pem", key = data .. "expired.key"}})
    s, err = tcp.connect("127.0.0.1", old.port, {tls = {ca = data .. "ca.pem"}})
    T.eq(s, nil, "expired")
    T.ok(err:lower():find("expired", 1, true), err)
    old:close()
  end)

  T.test("starttls upgrades a plain stream on both sides", function()
    local srv = tcp.listen{host = "127.0.0.1", port = 0, on_connection = function(s)
      T.eq(s:read_until("\n"), "STARTTLS\n", "command")
      s:write("GO\n")
      local ok, err = s:starttls({cert = data .. "server.pem", key = data .. "server.key"})
      T.ok(ok, err)
      local line = s:read_until("\n")
      s:write("secure " .. line)
    end}
    local s = tcp.connect("127.0.0.1", srv.port)
    s:write("STARTTLS\n")
    T.eq(s:read_until("\n"), "GO\n", "answer")
    T.eq(s.tls, nil, "still plain")
    local ok, err = s:starttls({ca = data .. "ca.pem"})
    T.ok(ok, err)
    T.ok(s.tls, "now TLS")
    s:write("hello\n")
    T.eq(s:read_until("\n"), "secure hello\n", "over TLS")
    s:close()
    srv:close()
  end)

  T.test("max_connections: the extra connection is closed, the others keep being served", function()
    local srv = echo_server({max_connections = 2})
    local a = tcp.connect("127.0.0.1", srv.port)
    local b = tcp.connect("127.0.0.1", srv.port)
    T.wait_until(function() return #srv:connections() == 2 end, 2, "two served")
    local c = tcp.connect("127.0.0.1", srv.port)
    if c then
      local got, err = c:read()
      T.eq(got, nil, "the third is closed")
      T.ok(err, "with a reason")
    end
    a:write("a")
    T.eq(read_n(a, 1), "a", "the first still served")
    b:close()
    T.wait_until(function() return #srv:connections() == 1 end, 2, "one left")
    local d = tcp.connect("127.0.0.1", srv.port)
    d:write("d")
    T.eq(read_n(d, 1), "d", "a new one is served again")
    a:close()
    d:close()
    srv:close()
  end)

  T.test("an error in on_connection goes to the error handler and resets the stream", function()
    local caught
    luna.set_error_handler(function(e) caught = e end)
    local srv = tcp.listen{host = "127.0.0.1", port = 0, on_connection = function(s)
      s:read()
      error("handler broke")
    end}
    local s = tcp.connect("127.0.0.1", srv.port)
    s:write("x")
    local got, err = s:read()
    T.restore_handler()
    T.eq(got, nil, "the connection ends")
    T.ok(err, "with a reason")
    T.ok(tostring(caught):find("handler broke", 1, true), tostring(caught))
    srv:close()
  end)

  T.test("unix sockets: echo, stale file replaced, live one refused", function()
    local path = os.tmpname()
    os.remove(path)
    path = path .. ".sock"
    local srv = unix.listen{path = path, on_connection = function(s)
      -- The second listen's liveness probe connects too, and leaves at once.
      local line = s:read_until("\n")
      if line then s:write("unix " .. line) end
    end}
    T.eq(srv.path, path, "path")
    T.raises({ "luna.unix.listen(config)", "already listening" }, unix.listen,
      {path = path, on_connection = function() end})
    local s, err = unix.connect(path)
    T.ok(s, err)
    s:write("hi\n")
    T.eq(s:read_until("\n"), "unix hi\n", "echo")
    s:close()
    srv:close()
    T.eq(io.open(path) ~= nil, false, "the socket file is removed")
    s, err = unix.connect(path)
    T.eq(s, nil, "nobody there")
    T.ok(err, "a reason")
  end)

  T.test("udp: send, receive, on_packet, connect, oversize dropped and counted", function()
    local a = udp.open{host = "127.0.0.1", max_size = 8}
    local b = udp.open{host = "127.0.0.1"}
    local bport = tonumber(b.address:match(":(%d+)$"))
    local aport = tonumber(a.address:match(":(%d+)$"))
    T.eq(a:send("hello", "127.0.0.1", bport), true, "send")
    local msg, ip, port = b:receive()
    T.eq(msg, "hello", "received")
    T.eq(ip, "127.0.0.1", "from ip")
    T.eq(port, aport, "from port")
    local packets = {}
    a.on_packet = function(u, d, pip, pport) packets[#packets + 1] = d end
    b:send("short", "127.0.0.1", aport)
    b:send("this one is too long", "127.0.0.1", aport)
    b:send("last", "127.0.0.1", aport)
    T.wait_until(function() return #packets == 2 end, 2, "two packets")
    T.eq(packets[1], "short", "first")
    T.eq(packets[2], "last", "oversize dropped")
    T.eq(a.dropped.oversize, 1, "counted")
    T.eq(b:connect("127.0.0.1", aport), true, "connect")
    T.eq(b.peer_address, "127.0.0.1:" .. aport, "peer address")
    b:send("default")
    T.wait_until(function() return #packets == 3 end, 2, "sent to the connected peer")
    T.eq(packets[3], "default", "connected send")
    T.raises({ "u:send(data[, host, port])", "no destination" }, a.send, a, "x")
    a:close()
    b:close()
    T.eq(select(2, a:receive()), "closed", "closed socket")
  end)

  T.test("misuse names the call and the fix", function()
    T.raises({ "luna.tcp.connect(host, port[, opts])", "'host' must be a string" }, tcp.connect, nil, 80)
    T.raises({ "luna.tcp.connect(host, port[, opts])", "'port' must be a port number" }, tcp.connect, "127.0.0.1", 0)
    T.raises({ "luna.tcp.connect(host, port[, opts])", "unknown option 'colour'" }, tcp.connect, "127.0.0.1", 1, {colour = 1})
    T.raises({ "luna.tcp.listen(config)", "'on_connection' is required" }, tcp.listen, {port = 0})
    T.raises({ "luna.tcp.listen(config)", "unknown option" }, tcp.listen, {port = 0, prot = 1, on_connection = print})
    T.raises({ "luna.tcp.listen(config)", "cannot read certificate file" }, tcp.listen,
      {port = 0, tls = {cert = "nope.pem", key = "nope.key"}, on_connection = print})
    T.raises({ "luna.udp.open(config)", "'host' must be an IP address" }, udp.open, {host = "example.com"})
    local srv = echo_server()
    local s = tcp.connect("127.0.0.1", srv.port)
    T.raises({ "s:write(data)", "'data' must be a string, got table" }, s.write, s, {})
    T.raises({ "s:read_until(delimiter[, max])", "'delimiter' must be a non-empty string" }, s.read_until, s, "")
    T.raises({ "s:read([max])", "'max' must be a whole number" }, s.read, s, 0)
    s:close()
    T.eq(select(2, s:write("late")), "closed", "writing to a closed stream")
    srv:close()
  end)

  T.main("reads outside a coroutine raise a clear error", function()
    local fake = luna.tcp.connect("127.0.0.1", 9, {}) -- refused later; the object exists now
    T.raises({ "s:read([max]) must be called inside a coroutine", "luna.spawn" }, fake.read, fake)
    fake:close()
  end)
end
