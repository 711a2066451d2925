"""Load generator for benches/ws_large.sh: one connection; REPS times, sends one SIZE-byte binary
message cut in FRAG-byte frames (FRAG = 0: one frame), pre-built and written in one burst (as
Autobahn's 9.* cases do), and times until its echo is read back whole.
Prints "RESULT median_ms=… min_ms=… max_ms=…", or "RESULT closed=CODE (reason)" when the server
closes the connection instead (a peer's own limits).
  python3 client.py PORT SIZE FRAG REPS"""
import base64
import os
import socket
import statistics
import struct
import sys
import time

port, size, frag, reps = (int(a) for a in sys.argv[1:5])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(4096)
buf = buf.split(b"\r\n\r\n", 1)[1]


def header(op, fin, n):
    b0 = (0x80 if fin else 0) | op
    if n < 126:
        return struct.pack("!BB", b0, 0x80 | n)
    if n < 65536:
        return struct.pack("!BBH", b0, 0x80 | 126, n)
    return struct.pack("!BBQ", b0, 0x80 | 127, n)


payload = os.urandom(size)
step = frag or size
parts = [payload[i:i + step] for i in range(0, size, step)]
# A zero masking key leaves the payload as is: every server still unmasks it.
burst = b"".join(header(2 if i == 0 else 0, i == len(parts) - 1, len(p)) + b"\0\0\0\0" + p
                 for i, p in enumerate(parts))


def read_message():
    global buf
    got = 0
    while True:
        while len(buf) < 2 or len(buf) < 2 + {126: 2, 127: 8}.get(buf[1] & 0x7F, 0):
            buf += s.recv(1 << 20)
        n, off = buf[1] & 0x7F, 2
        if n == 126:
            n, off = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            n, off = struct.unpack("!Q", buf[2:10])[0], 10
        while len(buf) < off + n:
            chunk = s.recv(1 << 20)
            if not chunk:
                sys.exit("connection closed")
            buf += chunk
        fin, op = buf[0] & 0x80, buf[0] & 0x0F
        if op == 8:
            code = struct.unpack("!H", buf[off:off + 2])[0] if n >= 2 else 1005
            print(f"RESULT closed={code} ({buf[off + 2:off + n].decode(errors='replace')})", flush=True)
            sys.exit(0)
        got += n
        buf = buf[off + n:]
        if fin:
            return got


# Each echo's message differs (its first 8 bytes count the echoes, lowest byte first: LuaJIT hashes a long string from a few 4-byte samples, the first among them): a server must not gain from
# having seen the same bytes before (LuaJIT interns strings, and would find the last one).
first = len(header(2, len(parts) == 1, len(parts[0]))) + 4
times = []
for rep in range(reps):
    message = bytearray(burst)
    message[first:first + 8] = struct.pack("<Q", rep)
    t = time.perf_counter()
    s.sendall(message)
    got = read_message()
    times.append(time.perf_counter() - t)
    assert got == size, got
print("RESULT median_ms=%.1f min_ms=%.1f max_ms=%.1f" % (
    statistics.median(times) * 1e3, min(times) * 1e3, max(times) * 1e3), flush=True)
