"""Raw sockets against independent peers: Python's socket and ssl modules as clients of our
TCP, TLS, Unix and UDP servers and as servers for our client, openssl s_client / s_server, and
hostile peers (connection floods past max_connections and past the descriptor limit, half-open
peers, resets mid-write, a UDP flood). Prints one line per check and "N passed, M failed"."""

import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time

from peer_common import DATA, HOST_BIN, PEERS, check, free_port, summary




def start_server(tcp, tls, unix, udp, max_connections=None, prefix=()):
    args = list(prefix) + [HOST_BIN, os.path.join(PEERS, "net_server.lua"), str(tcp), str(tls), unix, str(udp), DATA]
    if max_connections:
        args.append(str(max_connections))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready = proc.stdout.readline().strip() == "ready"
    return proc, ready


def echo_once(sock, payload):
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def our_client(*args):
    out = subprocess.run([HOST_BIN, os.path.join(PEERS, "net_client.lua"), *map(str, args)],
                         capture_output=True, text=True, timeout=30)
    return (out.stdout.strip().splitlines() or [out.stderr.strip()])[-1]


def python_clients(tcp, tls, unix, udp):
    with socket.create_connection(("127.0.0.1", tcp), timeout=5) as s:
        big = os.urandom(1 << 20)
        check("python tcp client: echo of 1 MiB", echo_once(s, big) == big)
    ctx = ssl.create_default_context(cafile=os.path.join(DATA, "ca.pem"))
    with socket.create_connection(("127.0.0.1", tls), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            check("python ssl client: handshake verified against the test CA", s.version() in ("TLSv1.3", "TLSv1.2"),
                  s.version())
            check("python ssl client: echo", echo_once(s, b"over tls " * 1000) == b"over tls " * 1000)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(unix)
        check("python unix client: echo", echo_once(s, b"unix!") == b"unix!")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        u.sendto(b"datagram", ("127.0.0.1", udp))
        data, addr = u.recvfrom(100)
        check("python udp client: echo, reply from the port it sent to", data == b"datagram" and addr[1] == udp,
              (data, addr))
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        u.sendto(b"v6", ("::1", udp))
        data, _ = u.recvfrom(100)
        check("python udp client over IPv6 (the socket is dual-stack)", data == b"v6")


class PyServer:
    """A Python echo server (plain or TLS with the given certificate) on a free port, reversing
    nothing: it echoes each line."""

    def __init__(self, cert=None):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.ctx = None
        if cert:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(os.path.join(DATA, cert + ".pem"), os.path.join(DATA, cert + ".key"))
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        try:
            conn.settimeout(10)
            if self.ctx:
                conn = self.ctx.wrap_socket(conn, server_side=True)
            buf = b""
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    conn.sendall(b"py: " + line + b"\n")
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def close(self):
        self.sock.close()


def our_client_checks():
    plain = PyServer()
    check("our tcp client against a python server", our_client("tcp", "127.0.0.1", plain.port, "hi") == "ok py: hi")
    check("our client tries every address of a name (localhost)",
          our_client("tcp", "localhost", plain.port, "name") == "ok py: name")
    plain.close()
    good = PyServer("server")
    ca = os.path.join(DATA, "ca.pem")
    check("our tls client against python ssl (test CA)",
          our_client("tls", "127.0.0.1", good.port, "secure", ca, "localhost") == "ok py: secure")
    got = our_client("tls", "127.0.0.1", good.port, "x", "", "localhost")
    check("unknown CA: a readable reason", got.startswith("err") and "UnknownIssuer" in got, got)
    got = our_client("tls", "127.0.0.1", good.port, "x", ca, "example.com")
    check("wrong host: a readable reason", got.startswith("err") and "example.com" in got
          and "certificate verify failed" in got, got)
    got = our_client("tls", "127.0.0.1", good.port, "opt out", "", "example.com", "false")
    check("verify = false is needed to accept them", got == "ok py: opt out", got)
    good.close()
    old = PyServer("expired")
    got = our_client("tls", "127.0.0.1", old.port, "x", ca, "localhost")
    check("expired certificate: a readable reason", got.startswith("err") and "xpired" in got, got)
    old.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("0.0.0.0", 0))
        u.settimeout(5)
        port = u.getsockname()[1]

        def answer():
            try:
                data, addr = u.recvfrom(100)
                u.sendto(b"bcast: " + data, addr)
            except OSError:
                pass
        t = threading.Thread(target=answer)
        t.start()
        got = our_client("broadcast", "127.255.255.255", port, "anyone?")
        t.join()
        check("our udp client sends to a broadcast address (broadcast = true)", got == "ok bcast: anyone?", got)


def openssl_checks(tls):
    if not shutil.which("openssl"):
        check("openssl is installed", False, "openssl not found")
        return
    client = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{tls}", "-servername", "localhost",
                               "-CAfile", os.path.join(DATA, "ca.pem"), "-verify_return_error", "-quiet"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    timer = threading.Timer(20, client.kill)
    timer.start()
    try:
        client.stdin.write(b"from openssl\n")
        client.stdin.flush()
        line = client.stdout.readline()
    finally:
        timer.cancel()
        client.kill()
        client.wait()
    check("openssl s_client against our TLS server (verified)", line == b"from openssl\n", line)
    port = free_port()
    server = subprocess.Popen(["openssl", "s_server", "-accept", str(port), "-cert", os.path.join(DATA, "server.pem"),
                               "-key", os.path.join(DATA, "server.key"), "-rev", "-quiet"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        got = our_client("tls", "127.0.0.1", port, "abc", os.path.join(DATA, "ca.pem"), "localhost")
        check("our tls client against openssl s_server", got == "ok cba", got)
    finally:
        server.kill()
        server.wait()


def hostile_checks(tcp, tls, udp, server):
    keep = socket.create_connection(("127.0.0.1", tcp), timeout=5)
    check("flood: a first connection is served", echo_once(keep, b"first") == b"first")
    flood = []
    for _ in range(120):
        try:
            flood.append(socket.create_connection(("127.0.0.1", tcp), timeout=5))
        except OSError:
            break
    time.sleep(0.5)
    closed = 0
    for s in flood:
        s.settimeout(0.5)
        try:
            if s.recv(1) == b"":
                closed += 1
        except ConnectionResetError:
            closed += 1
        except socket.timeout:
            pass
    check("flood past max_connections: the extra connections are closed", closed >= len(flood) - 50,
          f"{closed} of {len(flood)} closed")
    check("flood: the kept connection is still served", echo_once(keep, b"still") == b"still")
    for s in flood:
        s.close()
    keep.close()
    time.sleep(0.5)  # the server notices they are gone (below max_connections again)

    # A half-open peer: it sends, then shuts its sending side; it still gets the echo, then EOF.
    with socket.create_connection(("127.0.0.1", tcp), timeout=5) as s:
        s.sendall(b"half")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = s.recv(100)
            if not chunk:
                break
            got += chunk
        check("a half-open peer gets its echo, then the end of the stream", got == b"half", got)

    # A silent peer that never sends does not disturb the others.
    silent = socket.create_connection(("127.0.0.1", tls), timeout=5)

    # A reset in the middle of a large answer.
    s = socket.create_connection(("127.0.0.1", tcp), timeout=5)
    s.sendall(b"FLOOD 50000000\n")
    s.recv(100000)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", tcp), timeout=5) as s:
        check("after a reset mid-write the server goes on", echo_once(s, b"alive") == b"alive")
    silent.close()

    # A UDP flood: frames keep coming (the longest gap between two updates stays short).
    with socket.create_connection(("127.0.0.1", tcp), timeout=5) as s:
        s.sendall(b"FRAME?\n")
        s.recv(100)  # resets the measure
    blaster = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"u" * 200
    end = time.time() + 2
    sent = 0
    while time.time() < end:
        for _ in range(100):
            try:
                blaster.sendto(payload, ("127.0.0.1", udp))
                sent += 1
            except OSError:
                pass
    blaster.close()
    with socket.create_connection(("127.0.0.1", tcp), timeout=5) as s:
        s.sendall(b"FRAME?\n")
        gap = float(s.recv(100).decode().strip())
    check(f"udp flood ({sent} datagrams in 2 s): the longest frame gap ({gap:.0f} ms) stays under 100 ms", gap < 100,
          f"{gap} ms")
    check("the server survived everything", server.poll() is None)


def descriptor_limit_checks():
    """A server with 64 file descriptors and more connections than that: it keeps serving the
    ones it has, and serves new ones once the others are gone."""
    if not shutil.which("prlimit"):
        check("prlimit is installed", False, "prlimit not found")
        return
    tcp, tls, udp = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    unix = os.path.join(tempfile.mkdtemp(), "limited.sock")
    server, ready = start_server(tcp, tls, unix, udp, prefix=["prlimit", "--nofile=64:64"])
    check("a server limited to 64 descriptors starts", ready)
    if not ready:
        server.kill()
        return
    first = socket.create_connection(("127.0.0.1", tcp), timeout=5)
    echo_once(first, b"x")
    many = []
    for _ in range(150):
        try:
            many.append(socket.create_connection(("127.0.0.1", tcp), timeout=2))
        except OSError:
            break
    time.sleep(1)
    check("past the descriptor limit, a connection it has is still served", echo_once(first, b"ok") == b"ok")
    check("past the descriptor limit, the server is alive", server.poll() is None)
    for s in many:
        s.close()
    time.sleep(1.5)  # the accept back-off reaches at most 1 s
    with socket.create_connection(("127.0.0.1", tcp), timeout=5) as s:
        s.settimeout(5)
        try:
            got = echo_once(s, b"recovered")
        except OSError as e:
            got = repr(e)
        check("after the flood, new connections are served again", got == b"recovered", got)
    first.close()
    server.terminate()
    server.wait(5)


def main():
    tcp, tls, udp = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    unix = os.path.join(tempfile.mkdtemp(), "peers.sock")
    server, ready = start_server(tcp, tls, unix, udp, max_connections=50)
    try:
        check("server starts", ready)
        python_clients(tcp, tls, unix, udp)
        openssl_checks(tls)
        our_client_checks()
        hostile_checks(tcp, tls, udp, server)
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
    descriptor_limit_checks()
    return summary()


if __name__ == "__main__":
    sys.exit(main())
