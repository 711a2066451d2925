#!/usr/bin/env bash
# Autobahn|Testsuite against Luna: its fuzzingclient mode against our server (luna-host running
# benches/ws_echo_server.lua, max_message_size 64 MiB, permessage-deflate allowed), then its fuzzingserver mode against our
# client (scripts/autobahn_client.lua, reading with app:receive). The suite is Python 2.7 only and Debian 12
# has no Python 2: this builds a private root of CPython 2.7 from Debian 11's packages
# (deb.debian.org) with the suite's pinned dependencies from PyPI, under target/autobahn, away
# from the system Python. Prints a table of behaviours per case group for each side and exits 1
# when a case FAILED or closed wrongly (UNIMPLEMENTED ones are counted, not failed); the HTML
# reports are under target/autobahn. Takes ~2 min from scratch.
#
#   scripts/autobahn.sh               # every case (517; groups 12 and 13 are permessage-deflate)
#   CASES='"1.*", "9.1.*"' scripts/autobahn.sh
#   EXCLUDE='"12.1.10", "12.1.11"' scripts/autobahn.sh  # case ids (the suite reads a pattern
#                                                       # with '*' as a regular expression's prefix)
# scripts/test.sh (CI) excludes 12.*.10-18 and 13.*.10-18: 1,000 messages of 128 KiB or cut into
# 256 B frames each, ~10 min per side spent in the suite's own Python.
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${CASES:-'"*"'}
EXCLUDE=${EXCLUDE:-}
PORT=${PORT:-19401}
base=$(realpath -m "${CARGO_TARGET_DIR:-target}/autobahn")
root=$base/py27
mirror=http://deb.debian.org/debian/pool/main
mkdir -p "$base/debs"
command -v curl >/dev/null || apt-get install -y curl >/dev/null

if [ ! -x "$root/usr/bin/wstest" ]; then
  echo "== CPython 2.7 from Debian 11 into $root"
  for deb in p/python2.7/python2.7_2.7.18-8+deb11u1 p/python2.7/python2.7-minimal_2.7.18-8+deb11u1 \
    p/python2.7/libpython2.7-minimal_2.7.18-8+deb11u1 p/python2.7/libpython2.7-stdlib_2.7.18-8+deb11u1 \
    p/python2.7/libpython2.7_2.7.18-8+deb11u1 p/python2.7/libpython2.7-dev_2.7.18-8+deb11u1 \
    p/python2.7/python2.7-dev_2.7.18-8+deb11u1 o/openssl/libssl1.1_1.1.1w-0+deb11u1 libf/libffi/libffi7_3.3-6; do
    file=$base/debs/$(basename "$deb")_amd64.deb
    [ -s "$file" ] || curl -sSf -o "$file" "$mirror/${deb}_amd64.deb"
    dpkg -x "$file" "$root"
  done
  # Debian's Python 2.7 reads dist-packages; pip installs into site-packages.
  echo "import site; site.addsitedir('$root/usr/lib/python2.7/site-packages')" \
    >"$root/usr/lib/python2.7/dist-packages/zz-site-packages.pth"
fi
# The private Python 2.7 (its environment only for it: the system's python3 runs here too).
py27_env=(env LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" PYTHONHOME="$root/usr"
  CFLAGS="-I$root/usr/include/python2.7 -I$root/usr/include" LDFLAGS="-L$root/usr/lib/x86_64-linux-gnu")
py27() { "${py27_env[@]}" "$root/usr/bin/python2.7" "$@"; }
if [ ! -x "$root/usr/bin/wstest" ]; then
  echo "== pip and autobahntestsuite 25.10.1 (its pinned dependencies) from PyPI"
  python3 -m pip download --quiet pip==20.3.4 setuptools==44.1.1 wheel==0.37.1 --python-version 2.7 \
    --only-binary=:all: --no-deps -d "$base/wheels"
  py27 "$base/wheels/pip-20.3.4-py2.py3-none-any.whl/pip" install --quiet --no-index \
    --find-links "$base/wheels" --prefix "$root/usr" pip setuptools wheel
  py27 -m pip install --quiet --prefix "$root/usr" autobahntestsuite==25.10.1
fi

# summary REPORT_DIR: behaviours per group; exits 1 when a case FAILED or closed wrongly.
summary() {
  python3 - "$1/index.json" <<'PY'
import collections, json, sys
cases = json.load(open(sys.argv[1]))["luna"]
groups = collections.defaultdict(collections.Counter)
for case, r in cases.items():
    groups[case.split(".")[0]][r["behavior"] if r["behaviorClose"] in ("OK", "INFORMATIONAL") else
                               r["behavior"] + " (close " + r["behaviorClose"] + ")"] += 1
print("%-6s %s" % ("group", "behaviours"))
for g in sorted(groups, key=int):
    print("%-6s %s" % (g, ", ".join("%s %d" % kv for kv in sorted(groups[g].items()))))
bad = sorted(c for c, r in cases.items() if r["behavior"] == "FAILED" or r["behaviorClose"] not in ("OK", "INFORMATIONAL"))
missing = sum(1 for r in cases.values() if r["behavior"] == "UNIMPLEMENTED")
print("%d cases: %d failed or closed wrongly%s; %d unimplemented" % (
    len(cases), len(bad), (" (" + " ".join(bad[:40]) + ")") if bad else "", missing))
print("%d passed, %d failed" % (len(cases) - len(bad) - missing, len(bad)))
sys.exit(1 if bad else 0)
PY
}

cargo build --quiet --release --bin luna-host
status=0

echo "== our server (fuzzingclient mode): $base/server-report/index.html"
WS_MAX_MESSAGE_SIZE=$((64 << 20)) WS_COMPRESSION=1 target/release/luna-host benches/ws_echo_server.lua "$PORT" >"$base/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
sleep 0.5
cat >"$base/client-spec.json" <<SPEC
{"outdir": "$base/server-report", "servers": [{"agent": "luna", "url": "ws://127.0.0.1:$PORT"}],
 "cases": [$CASES], "exclude-cases": [$EXCLUDE], "exclude-agent-cases": {}}
SPEC
(cd "$base" && py27 "$root/usr/bin/wstest" -m fuzzingclient -s client-spec.json >"$base/fuzzingclient.log" 2>&1)
kill -0 $server 2>/dev/null || { echo "the server died: $(tail -3 "$base/server.log")"; exit 1; }
kill $server
summary "$base/server-report" || status=1

echo "== our client (fuzzingserver mode, scripts/autobahn_client.lua): $base/client-report/index.html"
cat >"$base/server-spec.json" <<SPEC
{"url": "ws://127.0.0.1:$((PORT + 1))", "outdir": "$base/client-report",
 "cases": [$CASES], "exclude-cases": [$EXCLUDE], "exclude-agent-cases": {}}
SPEC
# exec: $! is the fuzzer itself, so killing it leaves nothing holding the port.
(cd "$base" && exec "${py27_env[@]}" "$root/usr/bin/python2.7" "$root/usr/bin/wstest" -m fuzzingserver \
  -s server-spec.json >"$base/fuzzingserver.log" 2>&1) &
fuzzer=$!
trap 'kill $fuzzer 2>/dev/null || true' EXIT
sleep 2
target/release/luna-host scripts/autobahn_client.lua "ws://127.0.0.1:$((PORT + 1))"
# The fuzzer writes its report after the client asked for it and left: wait for the file.
for _ in $(seq 600); do [ -s "$base/client-report/index.json" ] && break; sleep 0.1; done
kill $fuzzer 2>/dev/null || true
summary "$base/client-report" || status=1
exit $status
