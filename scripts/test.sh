#!/usr/bin/env bash
# Every check, in order of cost. Assumes the tools .ci/run installs. Ends with one line
# "summary: N passed, M failed" counting Rust tests and Lua tests together.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --quiet --all-targets -- -D warnings
cargo clippy --quiet --no-default-features --lib --tests -- -D warnings

echo "== Rust tests + Lua suites in vendored LuaJIT"
cargo test --quiet 2>&1 | tee -a "$log"

echo "== Lua suites, host and RPC network tests in vendored Lua 5.4"
cargo test --quiet --no-default-features --features lua54,vendored --test lua_suites --test host --test rpc_network 2>&1 | tee -a "$log"

echo "== real hosts: Debian luajit, lua5.1, LÖVE 11.4 headless"
tests/hosts/run.sh 2>&1 | tee -a "$log"

echo "== independent peers: Python websockets against luna-host, and our client against it"
cargo build --quiet --release
# .ci/run exports LUNA_PYTHON (a Python 3 with websockets); run directly, its virtualenv is used.
python=${LUNA_PYTHON:-python3}
venv_python="${CARGO_TARGET_DIR:-target}/ci-venv/bin/python3"
if [ -z "${LUNA_PYTHON:-}" ] && [ -x "$venv_python" ]; then python=$venv_python; fi
LUNA_HOST="${CARGO_TARGET_DIR:-target}/release/luna-host" "$python" tests/peers/ws_peers.py 2>&1 | tee -a "$log"

echo "== independent peers: Python socket/ssl, openssl s_client/s_server, hostile peers against luna-host"
LUNA_HOST="${CARGO_TARGET_DIR:-target}/release/luna-host" "$python" tests/peers/net_peers.py 2>&1 | tee -a "$log"

echo "== independent peers: curl, Python http.client and hostile raw sockets against luna.serve"
LUNA_HOST="${CARGO_TARGET_DIR:-target}/release/luna-host" "$python" tests/peers/http_peers.py 2>&1 | tee -a "$log"

echo "== independent peers: the HTTP client against nginx (files, gzip, https, 50 in flight in a frame loop)"
LUNA_HOST="${CARGO_TARGET_DIR:-target}/release/luna-host" "$python" tests/peers/http_client_peers.py 2>&1 | tee -a "$log"

echo "== Autobahn|Testsuite: our WebSocket server and client (scripts/autobahn.sh; every case but the"
echo "   heaviest permessage-deflate ones, which take the suite ~20 min: docs/conformance.md has them)"
heavy=$(for g in 12.{1..5} 13.{1..7}; do for i in {10..18}; do printf '"%s.%d", ' "$g" "$i"; done; done)
EXCLUDE=${heavy%, } scripts/autobahn.sh 2>&1 | grep -v DEPRECATION | tee -a "$log"

awk '/^test result: ok\./ { p += $4 } /^[0-9]+ passed, [0-9]+ failed$/ { p += $1; f += $3 }
     END { printf "summary: %d passed, %d failed\n", p, f; exit (f > 0) }' "$log"
