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

SIZES=${SIZES:-"32 4096"}
RUNS=${RUNS:-3}
CONNS=${CONNS:-50}
WARMUP=${WARMUP:-2}
DURATION=${DURATION:-5}
FLAVOURS=${FLAVOURS:-"luajit lua54"}
PORT=${PORT:-19001}
QUIET_WAIT=${QUIET_WAIT:-60}
RETRIES=${RETRIES:-2}
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
limit=$(awk -v w="$WARMUP" -v d="$DURATION" 'BEGIN { printf "%d", w + d + 60 }') # seconds per ws-load run

echo "machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "date: $(date -u '+%F %H:%M') UTC; load average before the builds: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "${wss}conns: $CONNS, one message in flight each; warm-up ${WARMUP} s, measured ${DURATION} s; $RUNS runs each"

# Builds. The LuaJIT host is the default build (target/release/luna-host); the Lua 5.4 host goes
# to its own target directory so it does not replace it.
target=${CARGO_TARGET_DIR:-target}
host_bin() {
  case $1 in
    luajit) echo "$target/release/luna-host" ;;
    lua54) echo "$target-lua54/release/luna-host" ;;
  esac
}
for flavour in $FLAVOURS; do
  case $flavour in
    luajit) cargo build --quiet --release --bin luna-host ;;
    lua54)
      cargo build --quiet --release --no-default-features --features lua54,vendored --bin luna-host \
        --target-dir "$target-lua54"
      ;;
    *) echo "unknown flavour '$flavour' (luajit, lua54)" >&2 && exit 2 ;;
  esac
done
cargo build --quiet --release --manifest-path benches/ws/Cargo.toml
ws_bin=${CARGO_TARGET_DIR:-benches/ws/target}/release
echo "load average after the builds: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure)"

source benches/lib.sh
results=$(mktemp)
trap 'stop_server; rm -f "$results"' EXIT

# CPU the whole machine uses over half a second, in % of one core (from /proc/stat).
machine_busy() {
  local a b
  a=$(head -1 /proc/stat)
  sleep 0.5
  b=$(head -1 /proc/stat)
  echo "$a $b" | awk -v hz="$(getconf CLK_TCK)" '{
    busy = ($13 + $14 + $15 + $18 + $19 + $20) - ($2 + $3 + $4 + $7 + $8 + $9)
    printf "%d", 100 * busy / hz / 0.5 }'
}

# Waits (at most QUIET_WAIT seconds) until the rest of the machine is quiet.
wait_quiet() {
  local deadline=$((SECONDS + QUIET_WAIT)) busy
  while busy=$(machine_busy) && [ "$busy" -gt 15 ]; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "  (machine still busy, $busy % of a core: running anyway)"
      return
    fi
  done
}

# run_one NAME SIZE: one server process, one ws-load run; prints the ws-load line and leaves the
# record "size name rate p50 p99 client_cpu server_cpu others_cpu" in $record (empty on failure).
run_one() {
  local name=$1 size=$2 port=$PORT out
  record=
  PORT=$((PORT + 1))
  case $name in
    peer) taskset -c 0 "$ws_bin/ws-peer" --port "$port" "${peer_tls[@]}" & ;;
    *) taskset -c 0 "$(host_bin "$name")" benches/ws_echo_server.lua "$port" "${luna_tls[@]}" & ;;
  esac
  server_pid=$!
  for _ in $(seq 100); do # up to 5 s for the listener
    ss -Hltn "sport = :$port" | grep -q . && break
    sleep 0.05
  done
  if out=$(timeout "$limit" taskset -c 1 "$ws_bin/ws-load" --port "$port" \
    --conns "$CONNS" --size "$size" --warmup "$WARMUP" --duration "$DURATION" --server-pid "$server_pid" "${load_tls[@]}"); then
    echo "$out" | grep -v '^RESULT' | sed "s/^ws-load:/  $name/"
    record=$(echo "$out" | awk -v s="$size" -v n="$name" '/^RESULT/ {
      for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      print s, n, v["msgs_per_s"], v["p50_us"], v["p99_us"], v["client_cpu"], v["server_cpu"], v["others_cpu"] }')
  else
    echo "  $name: ws-load failed" >&2
  fi
  stop_server
}

# measure NAME SIZE: run_one after a quiet wait, repeated (up to RETRIES times) while other work
# disturbed it; records the last attempt.
measure() {
  local attempt
  for attempt in $(seq 0 "$RETRIES"); do
    wait_quiet
    run_one "$1" "$2"
    [ -n "$record" ] || return 0
    [ "$(echo "$record" | awk '{ print ($8 + 0 > 15) }')" = 1 ] && [ "$attempt" -lt "$RETRIES" ] || break
    echo "  (disturbed by other work: again)"
  done
  echo "$record" >>"$results"
}

for size in $SIZES; do
  echo
  echo "== $wss$size B payload"
  for _ in $(seq "$RUNS"); do
    for name in $FLAVOURS peer; do
      measure "$name" "$size"
    done
  done
done

echo
echo "WebSocket echo${TLS:+ over wss (TLS)}, $CONNS conns x 1 in flight, medians of $RUNS (min-max); ratio = ours / peer msgs/s;"
echo "others = CPU the rest of the machine used meanwhile (% of one core, includes"
echo "some loopback softirq time): over 15 % in any run marks the group disturbed"
printf '%-6s %-7s %-24s %-8s %-8s %-14s %-14s %-12s %s\n' size server "msgs/s (min-max)" "p50 us" "p99 us" \
  "server CPU %" "client CPU %" "others %" ratio
for size in $SIZES; do
  peer_median=
  for name in peer $FLAVOURS; do
    row=$(awk -v s="$size" -v n="$name" '$1 == s && $2 == n' "$results" | summarize 3 8)
    if [ "$row" = none ]; then
      printf '%-6s %-7s no results\n' "$size" "$name"
      continue
    fi
    read -r rate rmin rmax p50 _ _ p99 _ _ ccpu cmin cmax scpu smin smax ocpu _ omax <<<"$row"
    [ "$name" = peer ] && peer_median=$rate
    ratio=$(ratio "$rate" "${peer_median:-0}")
    label=$(awk -v c="$scpu" -v o="$omax" 'BEGIN {
      l = (c + 0 < 95) ? "client-bound" : ""; if (o + 0 > 15) l = l (l ? ", " : "") "disturbed"; print l }')
    printf '%-6s %-7s %-24s %-8s %-8s %-14s %-14s %-12s %s %s\n' "$size" "$name" \
      "$(printf '%.0f (%.0f-%.0f)' "$rate" "$rmin" "$rmax")" "$p50" "$p99" "$scpu ($smin-$smax)" \
      "$ccpu ($cmin-$cmax)" "$ocpu (max $omax)" "$ratio" "$label"
  done
done
