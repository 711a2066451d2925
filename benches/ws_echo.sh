#!/usr/bin/env bash
# WebSocket echo throughput: Luna (luna-host running benches/ws_echo_server.lua, LuaJIT and Lua 5.4)
# against tokio-tungstenite 0.30 (benches/ws, current_thread runtime, read_buffer_size 4096).
#
# For each payload size the servers alternate (luajit, lua54, peer, luajit, ...), RUNS times each,
# server pinned to CPU 0 and the load generator (benches/ws ws-load: CONNS connections, one message
# in flight each) to CPU 1. Prints every run, then per size the median, min-max and ratio ours/peer,
# with server, client and rest-of-machine CPU % over the measured window (../shared/BENCHMARKING.md).
#
# Environment: SIZES ("32 4096"), RUNS (3), CONNS (50), WARMUP (2 s), DURATION (5 s),
# FLAVOURS ("luajit lua54"), PORT (first port used, 19001; each run takes the next one),
# TLS (unset; TLS=1 runs the same comparison over wss: both servers use the test certificate
# tests/data/server.pem and server.key, ws-load trusts tests/data/ca.pem; rustls on every side).
# Each run first waits (up to QUIET_WAIT, 60 s) until the rest of the machine uses < 15 % of a core,
# and a run that other work disturbed anyway (> 15 %) is repeated up to RETRIES (2) times.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

SIZES=${SIZES:-"32 4096"}
PORT=${PORT:-19001}
TLS=${TLS:-}
if [ -n "$TLS" ]; then
  wss="wss, " # labels the output
  peer_tls=(--tls tests/data/server.pem tests/data/server.key)
  luna_tls=(tests/data/server.pem tests/data/server.key)
  load_tls=(--tls --ca tests/data/ca.pem)
else
  wss=
  peer_tls=() luna_tls=() load_tls=()
fi
print_machine
echo "${wss}conns: $CONNS, one message in flight each; warm-up ${WARMUP} s, measured ${DURATION} s; $RUNS runs each"

for flavour in $FLAVOURS; do build_host "$flavour"; done
cargo build --quiet --release --manifest-path benches/ws/Cargo.toml
ws_bin=${CARGO_TARGET_DIR:-benches/ws/target}/release
echo "load average after the builds: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure)"

bench_setup

# run_one NAME SIZE: one server process, one ws-load run; leaves the record in $record (empty on
# failure).
run_one() {
  local name=$1 size=$2 port
  record=
  next_port
  case $name in
    peer) serve peer tcp "$port" "$ws_bin/ws-peer" --port "$port" "${peer_tls[@]}" ;;
    *) serve "$name" tcp "$port" "$(host_bin "$name")" benches/ws_echo_server.lua "$port" "${luna_tls[@]}" ;;
  esac || return 0
  load "$name" "$size" "" "$ws_bin/ws-load" --port "$port" --conns "$CONNS" --size "$size" \
    --warmup "$WARMUP" --duration "$DURATION" --server-pid "$server_pid" "${load_tls[@]}"
  stop_server
}

alternate "$FLAVOURS peer" "$wss"

echo
echo "WebSocket echo${TLS:+ over wss (TLS)}, $CONNS conns x 1 in flight, medians of $RUNS (min-max); /peer = msgs/s over the peer's;"
echo "others = CPU the rest of the machine used meanwhile (% of one core, includes"
echo "some loopback softirq time): over 15 % in any run marks the group disturbed"
print_table "$SIZES" "peer $FLAVOURS" peer
