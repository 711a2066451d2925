"""What the independent-peer test scripts share: where things are, one line per check, free
ports and the closing "N passed, M failed" line (scripts/test.sh counts it)."""

import os
import socket

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST_BIN = os.environ.get("LUNA_HOST", os.path.join(ROOT, "target", "release", "luna-host"))
DATA = os.path.join(ROOT, "tests", "data")
PEERS = os.path.join(ROOT, "tests", "peers")
results = []


def check(name, ok, detail=""):
    results.append(bool(ok))
    print(("ok - " if ok else "not ok - ") + name + ("" if ok else f": {detail}"), flush=True)


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary():
    """Prints the closing line; the exit status for it."""
    failed = results.count(False)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0
