#!/usr/bin/env bash
# Memory per idle WebSocket connection (5,000 held from a helper process) for luna-host and,
# when benches/ws has been built, the tokio-tungstenite peer; plus luna's idle update cost with
# the connections open. Server pinned to CPU 0, helper to CPU 1.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${N:-5000}
target=${CARGO_TARGET_DIR:-target}
cargo build --quiet --release
echo "machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); date: $(date -u +%F)"

run() { # label, command...
  local label=$1; shift
  local port=$((20000 + RANDOM % 20000))
  taskset -c 0 "$@" "$port" > /tmp/ws_idle_server.log 2>&1 &
  local pid=$!
  sleep 1
  echo "== $label ($n idle connections)"
  taskset -c 1 python3 benches/ws_idle.py "$port" "$pid" "$n" ${MEASURE:-}
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

MEASURE=--measure-update run "luna-host (LuaJIT)" "$target/release/luna-host" benches/ws_idle_server.lua
if [ -x benches/ws/target/release/ws-peer ]; then
  MEASURE= run "tokio-tungstenite, read_buffer_size 4096" benches/ws/target/release/ws-peer --port
fi
