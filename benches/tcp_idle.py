"""Memory per idle TCP connection and the idle luna.update() cost with them open (benches/tcp_idle.sh).

Opens one control connection and then N idle ones (default 10000) from this helper process to a
server started by the caller on 127.0.0.1:PORT, waits until the server holds them all (its
descriptor count), and reads the server's resident memory from /proc before and 2 s after.
With --measure-update it then sends "measure\\n" on the control connection and prints the answer
(ns per idle luna.update() call, benches/tcp_idle_server.lua). Every connection is closed with
a reset (SO_LINGER 0), so no TIME_WAIT is left behind; every wait is bounded.
With --http each idle connection first makes one HTTP/1.1 request and reads its answer (an idle
keep-alive connection), and the measurement is asked for with "GET /measure" (benches/http_idle.sh).
usage: tcp_idle.py PORT SERVER_PID N [--measure-update] [--http]"""

import os
import resource
import socket
import struct
import sys
import time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def connect(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def http_get(s, path):
    """Sends one GET on s and returns the answer's body (Content-Length framed)."""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: idle\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += s.recv(4096)
    return body


def main(port, pid, n, measure, http):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if n + 64 > hard:
        sys.exit(f"tcp_idle.py: {n} connections need more than the {hard} descriptors a process may hold")
    low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    if n + 64 > high - low:
        sys.exit(f"tcp_idle.py: {n} connections need more than the {high - low} ephemeral ports of 127.0.0.1")
    first = connect(port)
    time.sleep(0.5)
    before, fds_before = rss_kb(pid), fds(pid)
    deadline = time.monotonic() + 120
    conns = []
    for i in range(n):
        if time.monotonic() > deadline:
            sys.exit(f"tcp_idle.py: only {i} of {n} connections in 120 s")
        conns.append(connect(port))
        if http:
            http_get(conns[-1], "/")
    deadline = time.monotonic() + 60
    while fds(pid) < fds_before + n:
        if time.monotonic() > deadline:
            sys.exit(f"tcp_idle.py: the server holds {fds(pid) - fds_before} of the {n} connections after 60 s")
        time.sleep(0.1)
    time.sleep(2)
    after, fds_after = rss_kb(pid), fds(pid)
    per = (after - before) * 1024 / n
    print(f"connections={n} rss_before_kb={before} rss_after_kb={after} bytes_per_conn={per:.0f} "
          f"server_fds_before={fds_before} server_fds_after={fds_after}")
    if measure and http:
        first.settimeout(60)
        print(f"idle_update_ns={http_get(first, '/measure').decode().strip()}")
    elif measure:
        first.settimeout(60)
        first.sendall(b"measure\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = first.recv(64)
            if not chunk:
                sys.exit("tcp_idle.py: the server closed the control connection")
            answer += chunk
        print(f"idle_update_ns={answer.decode().strip()}")
    sys.stdout.flush()
    for c in conns + [first]:
        c.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 10000,
         "--measure-update" in sys.argv, "--http" in sys.argv)
