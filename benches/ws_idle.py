"""Memory per idle WebSocket connection and the idle luna.update() cost with them open.

Opens N idle connections (default 5000) from this helper process to a server started by the
caller, and reads the server's resident memory from /proc before and after.
usage: ws_idle.py PORT SERVER_PID N [--measure-update]"""

import asyncio
import resource
import sys

import websockets


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def main(port, pid, n, measure):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    url = f"ws://127.0.0.1:{port}/"
    first = await websockets.connect(url, ping_interval=None, compression=None)
    await asyncio.sleep(0.5)
    before = rss_kb(pid)
    conns = []
    for start in range(0, n - 1, 250):
        batch = [websockets.connect(url, ping_interval=None, compression=None, open_timeout=30)
                 for _ in range(min(250, n - 1 - start))]
        conns += await asyncio.gather(*batch)
    await asyncio.sleep(2)
    after = rss_kb(pid)
    per = (after - before) * 1024 / len(conns)
    print(f"connections={len(conns) + 1} rss_before_kb={before} rss_after_kb={after} bytes_per_conn={per:.0f}")
    if measure:
        await first.send("measure")
        ns = await asyncio.wait_for(first.recv(), 60)
        print(f"idle_update_ns={ns}")
    for c in conns + [first]:
        c.transport.abort()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), "--measure-update" in sys.argv))
