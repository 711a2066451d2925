"""Our HTTP server (luna.serve and an HTTP app under luna-host) against independent clients: curl (keep-alive,
chunked upload, Expect: 100-continue, HEAD, https with the test CA), Python's http.client, raw
sockets (pipelining, slowloris, garbage, a client that never reads) and 200 concurrent
connections. Prints one line per check and "N passed, M failed"."""

import hashlib
import queue
import shutil
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import http.client
import json

from peer_common import DATA, HOST_BIN, PEERS, check, free_port, summary




def curl(*args):
    out = subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, timeout=20)
    return out.returncode, out.stdout, out.stderr.decode(errors="replace")


def body_sum(data):
    return sum(data[i] for i in range(0, len(data), 97))


def read_responses(sock, n, timeout=5):
    """Reads n responses (Content-Length framed) from sock; returns [(status, body)]."""
    sock.settimeout(timeout)
    buf, out = b"", []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        while len(buf) < length:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            buf += chunk
        out.append((int(lines[0].split()[1]), buf[:length]))
        buf = buf[length:]
    return out


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def curl_checks(port, tls_port):
    base = f"http://127.0.0.1:{port}"
    rc, out, _ = curl(f"{base}/hello")
    check("curl: GET", rc == 0 and out == b"Hello, World!", (rc, out))
    rc, out, err = curl("-v", f"{base}/hello", f"{base}/hello")
    check("curl: keep-alive (the second request reuses the connection)",
          rc == 0 and out == b"Hello, World!" * 2 and "Re-using existing connection" in err, err[-300:])
    payload = os.urandom(3 << 20)
    with tempfile.NamedTemporaryFile() as f:
        f.write(payload)
        f.flush()
        rc, out, _ = curl("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{f.name}", f"{base}/echo")
        want = f"POST {len(payload)} {body_sum(payload)}".encode()
        check("curl: chunked upload of 3 MiB", rc == 0 and out == want, (rc, out, want))
        rc, out, err = curl("-v", "-X", "PUT", "-H", "Expect: 100-continue", "--data-binary", f"@{f.name}", f"{base}/echo")
        check("curl: Expect: 100-continue", rc == 0 and "HTTP/1.1 100 Continue" in err
              and out == f"PUT {len(payload)} {body_sum(payload)}".encode(), (rc, out, err[-300:]))
    rc, out, _ = curl("-I", f"{base}/hello")
    check("curl: HEAD (the length GET would have)", rc == 0 and out.startswith(b"HTTP/1.1 200 OK")
          and b"content-length: 13" in out, out)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"HEAD /hello HTTP/1.1\r\nHost: t\r\n\r\nGET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        check("HEAD sends no body (the next answer follows its head)",
              got.count(b"HTTP/1.1 200 OK") == 2 and got.endswith(b"\r\n\r\nHello, World!")
              and got.count(b"Hello, World!") == 1, got)
    rc, out, _ = curl("-o", "/dev/null", "-w", "%{http_code} %{size_download}", f"{base}/big")
    check("curl: a 1 MiB answer", out == b"200 1048576", out)
    rc, out, err = curl("--cacert", os.path.join(DATA, "ca.pem"), f"https://localhost:{tls_port}/hello")
    check("curl: https verified against the test CA", rc == 0 and out == b"Hello, World!", (rc, out, err))
    rc, out, _ = curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/nothing")
    check("curl: 404 from the handler", out == b"404", out)


def python_checks(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    ok = True
    for i in range(100):
        conn.request("POST", "/echo", body=b"x" * i)
        r = conn.getresponse()
        ok &= r.status == 200 and r.read() == f"POST {i} {body_sum(b'x' * i)}".encode()
    sock_reused = conn.sock is not None
    conn.close()
    check("python http.client: 100 requests on one keep-alive connection", ok and sock_reused)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        paths = [f"/echo?{i}" if i % 3 else "/slow" for i in range(30)]
        s.sendall(b"".join(f"GET {p} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for p in paths))
        got = read_responses(s, len(paths))
        check("raw socket: 30 pipelined requests answered in order",
              [st for st, _ in got] == [200] * 30 and [b for _, b in got][:2] == [b"slow", b"GET 0 0"], got[:3])


def hostile_checks(port, server):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        t = time.monotonic()
        got = s.recv(1000)
        took = time.monotonic() - t
        check("slowloris: a head not finished in time gets 408 and a close",
              got.startswith(b"HTTP/1.1 408") and 0.5 < took < 3, (got[:40], took))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(os.urandom(4096))
        got = s.recv(1000)
        check("garbage: 400 and a close", got.startswith(b"HTTP/1.1 400"), got[:40])
    for shape in [b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                  b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(shape)
            got = s.recv(1000)
            what = shape.split(b"\r\n")[2].decode()
            check(f"smuggling shape refused: {what}", got.startswith(b"HTTP/1.1 400"), got[:40])
    # A client that asks for 1 MiB answers and never reads them: the server's memory stays put.
    before = rss_kb(server.pid)
    lazy = socket.create_connection(("127.0.0.1", port), timeout=5)
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        lazy.setblocking(False)
        req = b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n"
        sent = 0
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                sent += lazy.send(req * 64)
            except BlockingIOError:
                time.sleep(0.01)
        grown = rss_kb(server.pid) - before
        rc, out, _ = curl(f"http://127.0.0.1:{port}/hello")
        check(f"a client that never reads ({sent // len(req)} requests sent): server memory grew {grown} KiB (< 16 MiB)"
              " and others are served", grown < 16384 and out == b"Hello, World!", (grown, out))
    finally:
        lazy.close()
    results_lock = threading.Lock()
    answers = []

    def one():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                got = read_responses(s, 1, timeout=10)
        except OSError as e:
            got = [(0, str(e).encode())]
        with results_lock:
            answers.append(got[:1] == [(200, b"Hello, World!")])

    threads = [threading.Thread(target=one) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check("200 concurrent connections all answered", answers.count(True) == 200, answers.count(True))
    check("the server survived everything", server.poll() is None)


# Loaded from our static server; talks WebSocket to the same origin and posts what it got.
BROWSER_PAGE = """<!doctype html><meta charset="utf-8"><body>waiting<script>
const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/chat");
const report = text => fetch("/result", {method: "POST", body: text}).then(() => document.body.textContent = text);
ws.onopen = () => ws.send("ping");
ws.onmessage = e => report(e.data);
ws.onerror = () => report("error");
</script>"""


def server_lines(server):
    """The server's later output lines, as a queue filled by a thread."""
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l.strip()) for l in server.stdout], daemon=True).start()
    return lines


def browser_check(port, tls_port, lines):
    """Headless Chromium loads a page from the app's static directory (http and https) whose
    script opens a WebSocket to the same port; the server prints what the page reports."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        check("chromium is installed (.ci/run installs it)", False)
        return
    for protocol, p in (("http", port), ("https", tls_port)):
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
            browser = subprocess.Popen(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--ignore-certificate-errors", f"--user-data-dir={profile}",
                 f"{protocol}://127.0.0.1:{p}/ws.html"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            line, deadline = "", time.time() + 60
            try:
                while time.time() < deadline and not line.startswith("result"):
                    try:
                        line = lines.get(timeout=max(0.1, deadline - time.time()))
                    except queue.Empty:
                        break
            finally:
                os.killpg(browser.pid, 9)
                browser.wait(5)
        check(f"Chromium over {protocol}: a page from static, a WebSocket to the same port",
              line == f"result {protocol} pong ping", line)


def static_tree(base):
    """A static root with index.html and a 64 MiB file, and a secret beside it."""
    root = os.path.join(base, "root")
    os.makedirs(root)
    with open(os.path.join(base, "secret.txt"), "w") as f:
        f.write("SECRET")
    with open(os.path.join(root, "index.html"), "w") as f:
        f.write("<p>home</p>")
    with open(os.path.join(root, "ws.html"), "w") as f:
        f.write(BROWSER_PAGE)
    big = os.path.join(root, "big.bin")
    with open(big, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    return root, big


def streamed_upload_checks(base, server, big):
    """Uploads of the 64 MiB file to streaming routes: memory stays flat, nothing is lost."""
    with open(big, "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    saved = os.path.join(os.path.dirname(os.path.dirname(big)), "saved.bin")
    before = rss_kb(server.pid)
    rc, out, err = curl("--max-time", "60", "-F", "title=big", "-F", f"file=@{big}", f"{base}/save")
    got = json.loads(out) if rc == 0 else None
    with open(saved, "rb") as f:
        same = hashlib.sha256(f.read()).hexdigest() == want
    check("curl -F: a 64 MiB file field streamed to disk, whole", same and got == {
        "ok": True, "title": "big", "name": "big.bin", "size": 64 << 20}, (rc, out[:200], err[-200:]))
    rc, out, err = curl("--max-time", "60", "-T", big, "-H", "Transfer-Encoding: chunked", f"{base}/count")
    ok, size = out.split()[0:1], out.split()[2:3]
    check("curl -T chunked: a 64 MiB body streamed piece by piece", rc == 0 and ok == [b"true"]
          and size == [str(64 << 20).encode()], (rc, out[:100], err[-200:]))
    grown = rss_kb(server.pid) - before
    check("the streamed uploads grew the server by under 16 MiB", grown < 16 << 10, f"{grown} KiB")
    started = time.monotonic()
    rc, out, err = curl("-v", "--max-time", "20", "-F", f"file=@{big}", f"{base}/refuse")
    check("curl -F to a route that answers first: the answer, without the upload",
          rc == 0 and out == b"no uploads here" and "< HTTP/1.1 403" in err and "100 Continue" not in err
          and time.monotonic() - started < 5, (rc, out[:100], err[-300:]))


def requests_checks(base, big):
    """Python requests, the client most Python code uses, against the app."""
    try:
        import requests
    except ImportError:
        check("Python requests is installed (.ci/run installs it)", False)
        return
    with open(big, "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    with requests.Session() as session:
        r = session.post(f"{base}/form", json={"a": [1, 2], "b": "é"}, timeout=10)
        check("requests: a JSON body through body_parser, answered as JSON",
              r.status_code == 200 and r.json() == {"a": [1, 2], "b": "é"}, r.text[:200])
        r = session.post(f"{base}/upload", data={"title": "t"}, files={"file": ("f.txt", b"x" * 100000)}, timeout=10)
        check("requests: files= multipart upload on the same session",
              r.json() == {"title": "t", "name": "f.txt", "size": 100000}, r.text[:200])
        r = session.put(f"{base}/count", data=(b"y" * 10000 for _ in range(100)), timeout=10)
        check("requests: a generator body goes chunked, streamed by the route",
              r.text.split()[0:1] == ["true"] and r.text.split()[2:3] == ["1000000"], r.text)
        digest = hashlib.sha256()
        with session.get(f"{base}/big.bin", stream=True, timeout=30) as r:
            for piece in r.iter_content(1 << 16):
                digest.update(piece)
        check("requests: a streamed download of the 64 MiB file", digest.hexdigest() == want)
        r = session.get(f"{base}/api/items/7", timeout=10)
        check("requests: still the same session, JSON", r.json() == {"id": "7"}, r.text)


def app_checks(port, server, big):
    base = f"http://127.0.0.1:{port}"
    with open(big, "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    before = rss_kb(server.pid)
    with tempfile.NamedTemporaryFile() as out:
        rc, _, err = curl("--max-time", "60", "-o", out.name, f"{base}/big.bin")
        got = hashlib.sha256(open(out.name, "rb").read()).hexdigest()
    grown = rss_kb(server.pid) - before
    check("curl: a 64 MiB static file arrives whole", rc == 0 and got == want, (rc, err[-200:]))
    check("serving it grew the server by under 16 MiB", grown < 16 << 10, f"{grown} KiB")
    rc, out, _ = curl("-r", "1000-1009", f"{base}/big.bin")
    with open(big, "rb") as f:
        f.seek(1000)
        check("curl: a range", rc == 0 and out == f.read(10), out)
    rc, out, err = curl("-v", f"{base}/")
    etag = next((line.split(":", 1)[1].strip() for line in err.splitlines() if line.lower().startswith("< etag:")), "")
    check("curl: / is index.html, with an ETag", rc == 0 and out == b"<p>home</p>" and etag, err[-300:])
    rc, out, err = curl("-v", "-H", f"If-None-Match: {etag}", f"{base}/")
    check("curl: If-None-Match gives 304", rc == 0 and "< HTTP/1.1 304" in err and out == b"", err[-300:])
    for attack in ["/../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt", "/..././secret.txt"]:
        rc, out, _ = curl("--path-as-is", f"{base}{attack}")
        check(f"curl --path-as-is {attack}: refused", b"SECRET" not in out, out[:80])
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(os.urandom(3 << 20))
        f.flush()
        rc, out, _ = curl("-F", "title=a game", "-F", f"file=@{f.name}", f"{base}/upload")
        got = json.loads(out) if rc == 0 else None
        check("curl -F: a 3 MiB multipart upload", got == {"title": "a game", "name": os.path.basename(f.name),
                                                          "size": 3 << 20}, out[:200])
    streamed_upload_checks(base, server, big)
    requests_checks(base, big)
    rc, out, err = curl("-v", "--compressed", f"{base}/text")
    check("curl --compressed: a gzip answer, decoded by curl", rc == 0 and out == b"gzip me " * 4096
          and "< content-encoding: gzip" in err, err[-300:])
    rc, out, _ = curl(f"{base}/api/items/a%20b")
    check("curl: a route parameter in a group, as JSON", rc == 0 and out == b'{"id":"a b"}', out)
    rc, out, _ = curl("-d", "name=ada&lang=lua", f"{base}/form")
    got = json.loads(out) if rc == 0 else None
    check("curl: a urlencoded form through body_parser", got == {"name": "ada", "lang": "lua"}, out)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("DELETE", "/api/items/1")
    r = conn.getresponse()
    r.read()
    check("http.client: 405 with Allow", r.status == 405 and r.getheader("Allow") == "GET, HEAD, OPTIONS",
          (r.status, r.getheader("Allow")))
    conn.request("HEAD", "/big.bin")
    r = conn.getresponse()
    r.read()
    check("http.client: HEAD of the big file on the same connection",
          r.status == 200 and r.getheader("Content-Length") == str(64 << 20), r.getheader("Content-Length"))
    conn.close()


def main():
    port, tls_port, app_port, app_tls_port = free_port(), free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory() as base:
        root, big = static_tree(base)
        server = subprocess.Popen([HOST_BIN, os.path.join(PEERS, "http_server.lua"), str(port), str(tls_port), DATA,
                                   str(app_port), str(app_tls_port), root],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            # The apps print where they listen first.
            ready = any(server.stdout.readline().strip() == "ready" for _ in range(4))
            check("the server starts", ready)
            if ready:
                curl_checks(port, tls_port)
                python_checks(port)
                app_checks(app_port, server, big)
                browser_check(app_port, app_tls_port, server_lines(server))
                hostile_checks(port, server)
        finally:
            server.terminate()
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
    sys.exit(summary())


if __name__ == "__main__":
    main()
