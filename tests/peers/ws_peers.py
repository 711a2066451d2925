"""WebSocket conformance against independent peers: the Python `websockets` library as client
of our server (ws and wss) and as server for our client, plus hostile raw-socket input.
Prints one line per check and a final "N passed, M failed"."""

import asyncio
import base64
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import time

import websockets

from peer_common import DATA, HOST_BIN, ROOT, check, free_port, summary




def raw_upgrade(port, extra=b"", key=b"dGhlIHNhbXBsZSBub25jZQ==", version=b"13"):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    req = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: " + version + b"\r\n" + extra + b"\r\n")
    s.sendall(req)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return s, head


def frame(opcode, payload, mask=True, fin=True):
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        hdr = struct.pack("!BB", b0, (0x80 if mask else 0) | n)
    elif n < 65536:
        hdr = struct.pack("!BBH", b0, (0x80 if mask else 0) | 126, n)
    else:
        hdr = struct.pack("!BBQ", b0, (0x80 if mask else 0) | 127, n)
    if not mask:
        return hdr + payload
    key = os.urandom(4)
    return hdr + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def server_frames(s):
    """Yields the frames a server sends (unmasked) as (fin, opcode, payload) until the
    connection ends."""
    buf = b""
    while True:
        while len(buf) < 2 or len(buf) < 2 + {126: 2, 127: 8}.get(buf[1] & 0x7F, 0):
            chunk = s.recv(1 << 20)
            if not chunk:
                return
            buf += chunk
        n, off = buf[1] & 0x7F, 2
        if n == 126:
            n, off = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            n, off = struct.unpack("!Q", buf[2:10])[0], 10
        while len(buf) < off + n:
            chunk = s.recv(1 << 20)
            if not chunk:
                return
            buf += chunk
        yield buf[0] & 0x80, buf[0] & 0x0F, buf[off:off + n]
        buf = buf[off + n:]


def read_close_code(s):
    """Reads frames until a close frame; returns its code (None on EOF without one)."""
    s.settimeout(5)
    for _, op, payload in server_frames(s):
        if op == 8:
            return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
    return None


async def client_checks(port, tls_port):
    url = f"ws://127.0.0.1:{port}/"
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send("hello")
        check("text echo", await ws.recv() == "hello")
        await ws.send(b"\x00\x01\xff")
        check("binary echo", await ws.recv() == b"\x00\x01\xff")
        await ws.send(["frag", "mented ", "message"])
        check("fragmented message reassembled", await ws.recv() == "fragmented message")
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 2)
        check("automatic pong", True)
        await ws.send("héllo wörld ✓")
        check("utf-8 text round trip", await ws.recv() == "héllo wörld ✓")
        await ws.send("close:4001:bye")
        try:
            await asyncio.wait_for(ws.recv(), 2)
        except websockets.ConnectionClosed:
            pass
        check("server close code and reason", (ws.close_code, ws.close_reason) == (4001, "bye"),
              f"{ws.close_code} {ws.close_reason}")
    async with websockets.connect(url, subprotocols=["foo", "chat"]) as ws:
        check("subprotocol: first offered handler wins", ws.subprotocol == "chat", ws.subprotocol)
        await ws.send("protocol?")
        check("handler sees the protocol", await ws.recv() == "chat")
    async with websockets.connect(url, subprotocols=["unknown"]) as ws:
        check("subprotocol: fallback to default without echo", ws.subprotocol is None, ws.subprotocol)
    async with websockets.connect(url) as ws:
        await ws.close(4000, "client done")
        check("client close handshake completes", ws.close_code == 4000, ws.close_code)
    ctx = ssl.create_default_context(cafile=os.path.join(DATA, "ca.pem"))
    async with websockets.connect(f"wss://localhost:{tls_port}/", ssl=ctx) as ws:
        await ws.send("secure")
        check("wss echo with the test CA", await ws.recv() == "secure")
    try:
        async with websockets.connect(f"wss://localhost:{tls_port}/", ssl=ssl.create_default_context()):
            check("wss refused without the CA", False, "connected")
    except ssl.SSLCertVerificationError:
        check("wss refused without the CA", True)


def hostile_checks(port):
    s, head = raw_upgrade(port, key=b"")
    check("upgrade without a key is refused with 400", head.startswith(b"HTTP/1.1 400"), head[:40])
    s.close()
    s, head = raw_upgrade(port, version=b"8")
    check("wrong version is refused with 426", head.startswith(b"HTTP/1.1 426"), head[:40])
    s.close()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"\x16\x03\x01garbage that is not http\r\n\r\n")
    check("garbage instead of an upgrade gets 400", s.recv(100).startswith(b"HTTP/1.1 400"))
    s.close()
    s, head = raw_upgrade(port)
    s.sendall(frame(1, b"unmasked", mask=False))
    check("unmasked client frame closes with 1002", read_close_code(s) == 1002)
    s.close()
    s, head = raw_upgrade(port)
    s.sendall(frame(1, b"\xff\xfe invalid"))
    check("invalid UTF-8 text closes with 1007", read_close_code(s) == 1007)
    s.close()
    s, head = raw_upgrade(port)
    s.sendall(frame(2, b"x" * 70000))
    check("oversized message closes with 1009", read_close_code(s) == 1009)
    s.close()
    s, head = raw_upgrade(port)
    s.sendall(frame(1, b"ab", fin=False) + frame(9, b"PI") + frame(0, b"cd"))
    s.settimeout(5)
    got = b""
    while len(got) < 10:
        chunk = s.recv(100)
        if not chunk:
            break
        got += chunk
    check("ping inside a fragmented message: pong, then the whole message",
          got == b"\x8a\x02PI\x81\x04abcd", got)
    s.close()


def backpressure_check(port, server):
    s, head = raw_upgrade(port)
    s.sendall(frame(1, b"flood"))
    line = server.stdout.readline().strip()
    sent = int(line.split()[2]) if line.startswith("backpressure after") else -1
    check("send reports backpressure to a client that does not read", 0 < sent < 1000, line)
    s.close()


async def keepalive_checks(port):
    # websockets answers pings by itself: the connection outlives many ping intervals.
    async with websockets.connect(f"ws://127.0.0.1:{port}/", ping_interval=None) as ws:
        await asyncio.sleep(1.5)
        await ws.send("still here")
        check("keep-alive: a peer that answers pings stays connected", await ws.recv() == "still here")
    # A raw client that never answers is dropped after ping_interval + ping_timeout.
    s, head = raw_upgrade(port)
    start = time.time()
    s.settimeout(5)
    got, pinged = b"", False
    try:
        while True:
            chunk = s.recv(100)
            if not chunk:
                break
            got += chunk
            pinged = pinged or got.startswith(b"\x89")
    except (ConnectionResetError, socket.timeout):
        pass
    took = time.time() - start
    check("keep-alive: a silent peer is pinged, then dropped", pinged and 0.5 < took < 2.5,
          f"pinged={pinged} after {took:.2f}s: {got[:20]!r}")
    s.close()


def slowloris_check(port):
    start = time.time()
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    try:
        data = s.recv(100)
    except (ConnectionResetError, socket.timeout):
        data = b"timeout"
    took = time.time() - start
    check("a stalled upgrade is dropped after the upgrade timeout", data == b"" and 9 < took < 16,
          f"{data!r} after {took:.1f}s")


async def our_client_against_python_server():
    async def handler(ws):
        async for message in ws:
            if message == "bye":
                await ws.close(4002, "server bye")
                return
            await ws.send(message)

    port = free_port()
    async with websockets.serve(handler, "127.0.0.1", port, subprotocols=["chat"], max_size=None):
        proc = await asyncio.create_subprocess_exec(
            HOST_BIN, os.path.join(ROOT, "tests", "peers", "ws_client.lua"), f"ws://localhost:{port}/chat?x=1",
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    lines = out.decode(errors="replace").splitlines()
    check("our client connects to websockets (hostname, path, query, subprotocol list)",
          lines[:1] == ["connected"], lines)
    check("our client: text echo", "message 1 opcode 1 hello text" in lines, lines)
    check("our client: binary echo", any(l.startswith("message 2 opcode 2 ") for l in lines), lines)
    check("our client: 100 kB message", any(l.startswith("message 3 opcode 1 xxxx") for l in lines))
    check("our client: on_close gets the server's code and reason", "closed 4002 server bye" in lines, lines)
    check("our client exits cleanly", proc.returncode == 0, proc.returncode)


def read_message(s, limit):
    """Reads server frames (unmasked) until one with FIN; returns the payload length, or None
    when the connection ends or `limit` seconds pass first."""
    got = 0
    s.settimeout(limit)
    try:
        for fin, _, payload in server_frames(s):
            got += len(payload)
            if fin:
                return got
    except socket.timeout:
        pass
    return None


async def large_checks(port):
    """4 MiB messages as one frame and in fragments of 64 KiB, 1 KiB and (sent in one burst, as
    Autobahn's 9.* cases do) 64 B, to a server whose max_message_size is 64 MiB: each echo must
    come back whole and soon (a stall shows as a timeout). A frame declared over the limit is
    refused with 1009 before its payload arrives."""
    size = 4 << 20
    data = os.urandom(size)
    async with websockets.connect(f"ws://127.0.0.1:{port}/", max_size=None, compression=None) as ws:
        for frag in [size, 65536, 1024]:
            t = time.time()
            await ws.send(data if frag == size else [data[i:i + frag] for i in range(0, size, frag)])
            got = await asyncio.wait_for(ws.recv(), 20)
            check(f"4 MiB message in {frag}-byte frames echoed ({time.time() - t:.2f} s)", got == data)
    s, head = raw_upgrade(port)
    burst = b"".join(
        bytes([(0x80 if i == size // 64 - 1 else 0) | (2 if i == 0 else 0), 0x80 | 64]) + b"\0\0\0\0" + b"y" * 64
        for i in range(size // 64))
    t = time.time()
    s.sendall(burst)
    got = read_message(s, 20)
    check(f"4 MiB message in 65,536 frames of 64 B sent in one burst echoed ({time.time() - t:.2f} s)",
          got == size, f"{got} bytes")
    s.close()
    s, head = raw_upgrade(port)
    s.sendall(bytes([0x82, 0x80 | 127]) + struct.pack("!Q", (64 << 20) + 1) + b"\0\0\0\0" + b"z" * 1000)
    check("a frame declared over max_message_size is refused with 1009", read_close_code(s) == 1009)
    s.close()


def negotiated(ws):
    """Names of the extensions a websockets connection negotiated (legacy and new API)."""
    exts = getattr(ws, "extensions", None)
    return [e.name for e in (ws.protocol.extensions if exts is None else exts)]


async def deflate_checks(port):
    """permessage-deflate against websockets (which offers it by default): negotiated, messages
    echoed whole and compressed on the wire (the server's bytes_in), every parameter
    combination websockets can offer, and a compressed bomb refused with 1009."""
    url = f"ws://127.0.0.1:{port}/"
    text = ("{\"player\": \"luna\", \"pos\": [1.5, 2.5, 3.5], \"hp\": 100}, " * 4000)[:150000]
    async with websockets.connect(url, max_size=None) as ws:
        check("websockets negotiates permessage-deflate with our server",
              negotiated(ws) == ["permessage-deflate"], negotiated(ws))
        await ws.send("bytes_in?")
        before = int(await ws.recv())
        ok = True
        for i in range(5):
            await ws.send(text)
            ok = ok and await ws.recv() == text
        await ws.send(text.encode())
        ok = ok and await ws.recv() == text.encode()
        check("compressed text and binary messages echoed whole", ok)
        await ws.send("bytes_in?")
        wire = int(await ws.recv()) - before
        check(f"compressed on the wire ({wire} bytes for {6 * len(text)})", wire < 6 * len(text) / 20, wire)
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
    for params in [dict(server_no_context_takeover=True, client_no_context_takeover=True),
                   dict(server_max_window_bits=9, client_max_window_bits=9),
                   dict(server_max_window_bits=12, client_no_context_takeover=True)]:
        factory = ClientPerMessageDeflateFactory(**params)
        async with websockets.connect(url, max_size=None, compression=None, extensions=[factory]) as ws:
            ok = negotiated(ws) == ["permessage-deflate"]
            for n in [10, 1000, 100000]:
                await ws.send(text[:n])
                ok = ok and await ws.recv() == text[:n]
            check(f"deflate with {params}: echoed", ok, negotiated(ws))
    s, head = raw_upgrade(port, b"Sec-WebSocket-Extensions: permessage-deflate\r\n")
    check("raw upgrade with a deflate offer answered with the extension",
          b"sec-websocket-extensions: permessage-deflate" in head.lower(), head)
    import zlib
    z = zlib.compressobj(wbits=-15)
    bomb = z.compress(b"\0" * (64 << 20)) + z.flush(zlib.Z_SYNC_FLUSH)
    frame_bytes = frame(2, bomb[:-4])
    s.sendall(bytes([frame_bytes[0] | 0x40]) + frame_bytes[1:])
    check(f"a {len(bomb) // 1024} KiB compressed frame inflating to 64 MiB is refused with 1009",
          read_close_code(s) == 1009)
    s.close()


async def our_deflate_client_against_python_server():
    """Our client offers permessage-deflate (compression = true) to a websockets server."""
    async def handler(ws):
        await ws.send("deflate " + ",".join(negotiated(ws)))
        async for message in ws:
            await ws.send(message)

    port = free_port()
    script = os.path.join(ROOT, "tests", "peers", "ws_deflate_client.lua")
    async with websockets.serve(handler, "127.0.0.1", port, max_size=None):
        proc = await asyncio.create_subprocess_exec(
            HOST_BIN, script, f"ws://127.0.0.1:{port}/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    lines = out.decode(errors="replace").splitlines()
    check("our client negotiates permessage-deflate with websockets", "deflate permessage-deflate" in lines, lines)
    check("our client: compressed messages echoed whole", "echoed 3" in lines, lines)


def browser_check():
    """Headless Chromium (which always offers permessage-deflate) against our server
    (ws_browser.lua): the page reports the negotiated extension, sends a JSON text of ~170 kB
    and checks its echo; the server's byte count shows it arrived compressed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        check("chromium is installed (.ci/run installs it)", False)
        return
    import tempfile
    port = free_port()
    server = subprocess.Popen([HOST_BIN, os.path.join(ROOT, "tests", "peers", "ws_browser.lua"), str(port)],
                              stdout=subprocess.PIPE, text=True)
    lines = []
    # Chromium's helper processes may still write the profile while they go.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        browser = None
        try:
            if server.stdout.readline().strip() == "ready":
                page = os.path.join(ROOT, "tests", "peers", "ws_browser.html")
                browser = subprocess.Popen(
                    [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     f"--user-data-dir={profile}", f"file://{page}#{port}"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                import queue
                import threading
                got = queue.Queue()
                threading.Thread(target=lambda: [got.put(l.strip()) for l in server.stdout], daemon=True).start()
                deadline = time.time() + 60
                while time.time() < deadline and not (lines and lines[-1].startswith("echo")):
                    try:
                        lines.append(got.get(timeout=max(0.1, deadline - time.time())))
                    except queue.Empty:
                        break
        finally:
            if browser:
                # The browser and its helper processes (its own session).
                os.killpg(browser.pid, 9)
                browser.wait(5)
            server.terminate()
            server.wait(5)
    check("Chromium negotiates permessage-deflate with our server", "extensions permessage-deflate" in lines, lines)
    check("Chromium: its JSON message echoed whole", "echo ok" in lines, lines)
    wire = [l.split() for l in lines if l.startswith("bytes ")]
    check(f"Chromium's message arrived compressed ({' '.join(wire[0]) if wire else lines})",
          bool(wire) and int(wire[0][1]) * 5 < int(wire[0][3]), lines)


def main():
    port, tls_port, keepalive_port, large_port = free_port(), free_port(), free_port(), free_port()
    deflate_port = free_port()
    server = subprocess.Popen([HOST_BIN, os.path.join(ROOT, "tests", "peers", "ws_server.lua"),
                               str(port), str(tls_port), DATA, str(keepalive_port), str(large_port),
                               str(deflate_port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        check("server starts", server.stdout.readline().strip() == "ready")
        import threading
        slow = threading.Thread(target=slowloris_check, args=(port,))
        slow.start()
        asyncio.run(client_checks(port, tls_port))
        hostile_checks(port)
        backpressure_check(port, server)
        asyncio.run(keepalive_checks(keepalive_port))
        asyncio.run(large_checks(large_port))
        asyncio.run(deflate_checks(deflate_port))
        browser_check()
        slow.join()
        asyncio.run(client_checks(port, tls_port))
        check("server survived hostile input", server.poll() is None)
        asyncio.run(our_client_against_python_server())
        asyncio.run(our_deflate_client_against_python_server())
    finally:
        server.terminate()
        server.wait(5)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
