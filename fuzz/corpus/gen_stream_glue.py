#!/usr/bin/env python3
"""Writes the seed scripts of the stream_glue fuzz target (see src/proto/fuzzing.rs for the
operation encoding). Run from anywhere: python3 fuzz/corpus/gen_stream_glue.py"""
import os

RAW, SERVER, CLIENT = 0, 1, 2
READY, EOF, ERROR, DRAIN = b"\xc0", b"\xc1", b"\xc2", b"\xe0"


def feed(data):
    out = b""
    for i in range(0, len(data), 32):
        piece = data[i:i + 32]
        out += bytes([len(piece) - 1]) + piece
    return out


def above(arg):
    return bytes([0x80 | arg])


def wait(quarter_seconds):
    return bytes([0xa0 | quarter_seconds])


MINUTE = b"\xbf"


def frame(opcode, payload, masked):
    head = bytes([0x80 | opcode])
    mask = 0x80 if masked else 0
    if len(payload) < 126:
        head += bytes([mask | len(payload)])
    else:
        head += bytes([mask | 126]) + len(payload).to_bytes(2, "big")
    if not masked:
        return head + payload
    key = b"\x11\x22\x33\x44"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


UPGRADE = (b"GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat\r\n\r\n")
RESPONSE = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: CdXSYUsvsaMthlEXWDNURGWA/1o=\r\n\r\n")
CLOSE = (1000).to_bytes(2, "big") + b"bye"

seeds = {
    "raw_echo": bytes([RAW]) + feed(b"hello\n") + above(7) + above(1) + DRAIN + READY + feed(b"more") + EOF,
    "raw_backpressure": bytes([RAW]) + READY + above(0xf9) + above(0xf9) + above(0xf9) + b"\x63" + above(2)
    + DRAIN + above(1) + above(3) + b"\x61",
    "raw_full_input": bytes([RAW]) + READY + feed(bytes(range(100))) + above(0) + feed(b"x" * 40) + above(7)
    + above(5),
    "raw_reset_mid_write": bytes([RAW]) + READY + above(0xf9) + b"\x62" + ERROR + above(1),
    "raw_starting_abort": bytes([RAW]) + above(1) + above(4) + READY,
    "ws_server_echo": bytes([SERVER]) + feed(UPGRADE) + DRAIN + above(6) + feed(frame(1, b"hi", True))
    + above(0) + above(2) + DRAIN + feed(frame(8, CLOSE, True)) + DRAIN + EOF,
    "ws_server_keepalive": bytes([SERVER]) + feed(UPGRADE) + DRAIN + wait(6) + DRAIN + wait(12) + MINUTE,
    "ws_server_slowloris": bytes([SERVER]) + feed(UPGRADE[:40]) + wait(20) + wait(20) + MINUTE + feed(UPGRADE[40:]),
    "ws_server_reject": bytes([SERVER]) + feed(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n") + b"\x61" + wait(4),
    "ws_server_too_big": bytes([SERVER]) + feed(UPGRADE) + DRAIN + feed(frame(2, b"z" * 1500, True)) + DRAIN
    + above(1),
    "ws_server_close_unread": bytes([SERVER]) + feed(UPGRADE) + DRAIN + feed(frame(1, b"a", True) * 4)
    + above(4) + feed(frame(8, CLOSE, True)) + b"\x63" + wait(30) + DRAIN,
    "ws_server_stalled_reader": bytes([SERVER]) + feed(UPGRADE) + above(3) * 12 + feed(frame(9, b"p", True) * 6)
    + MINUTE,
    "ws_client_echo": bytes([CLIENT]) + READY + DRAIN + feed(RESPONSE) + above(6) + feed(frame(1, b"hey", False))
    + above(7) + above(2) + DRAIN + above(4) + DRAIN + feed(frame(8, CLOSE, False)) + EOF,
    "ws_client_bad_accept": bytes([CLIENT]) + READY + DRAIN + feed(RESPONSE.replace(b"Cd", b"Xx")) + DRAIN,
    "ws_client_connect_timeout": bytes([CLIENT]) + MINUTE + READY,
    "ws_client_eof_in_upgrade": bytes([CLIENT]) + READY + DRAIN + feed(RESPONSE[:20]) + EOF + wait(8),
}

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stream_glue")
os.makedirs(here, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(here, name), "wb") as f:
        f.write(data)
print(f"{len(seeds)} seeds in {here}")
