#!/usr/bin/env bash
# RPC round trips: Luna (luna-host running benches/rpc_echo_server.lua / rpc_echo_client.lua, an
# echo handler written in Lua, LuaJIT) with encryption off and on, against ENet 1.3 reliable
# channel 0 (Debian libenet-dev, benches/rpc/enet_echo.c) and the raw UDP ping-pong floor
# (benches/rpc/udp_pingpong.c), all in this one run (see ../shared/BENCHMARKING.md).
#
# 1. Latency, 1 connection x 1 call in flight, for each payload size: the four peers alternate
#    (luna-plain luna-enc enet udp, luna-plain ...), RUNS times each. Server AND client are pinned
#    to CPU 0: a cross-core wake-up costs 55-70 us on these VMs and would swamp the figures. Both
#    sides sleep in poll/recv (nothing busy-spins).
# 2. Pipelined throughput, 1 connection x PIPELINE calls in flight (Luna: PIPELINE coroutines
#    each looping on fetch; ENet: PIPELINE reliable packets outstanding): server on CPU 0, client
#    on CPU 1, luna-plain and enet alternating.
# 3. Idle luna.update() with IDLE_N connected sessions (benches/rpc_idle_server.lua, clients held
#    by benches/rpc_idle_clients.lua in another luna-host on CPU 1).
#
# Payload: SIZE bytes. ENet/UDP send SIZE raw bytes; Luna sends args {data = string} whose
# MessagePack encoding is ~SIZE bytes (31 B for 32, 200 B for 200) plus the path "bench/echo".
#
# Environment: SIZES ("32 200"), RUNS (3), WARMUP (1 s), DURATION (5 s), PIPELINE (64),
# IDLE_N (1000), SECTIONS ("latency pipelined idle"), PORT (first port, 19101).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-"32 200"}
RUNS=${RUNS:-3}
WARMUP=${WARMUP:-1}
DURATION=${DURATION:-5}
PIPELINE=${PIPELINE:-64}
IDLE_N=${IDLE_N:-1000}
SECTIONS=${SECTIONS:-"latency pipelined idle"}
PORT=${PORT:-19101}
limit=$(awk -v w="$WARMUP" -v d="$DURATION" 'BEGIN { printf "%d", w + d + 40 }')

echo "machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "date: $(date -u '+%F %H:%M') UTC; load average before the builds: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --quiet --release --bin luna-host
benches/rpc/build.sh
host=${CARGO_TARGET_DIR:-target}/release/luna-host
bin=benches/rpc/bin
echo "ENet: $(dpkg-query -W -f '${Version}' libenet-dev 2>/dev/null || echo '?') (Debian libenet-dev); Lua: LuaJIT (vendored, luna-host)"
echo "load average after the builds: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure)"
echo "warm-up ${WARMUP} s, measured ${DURATION} s, $RUNS runs each, alternating"

source benches/lib.sh
results=$(mktemp)
trap 'stop_server; rm -f "$results"' EXIT

# run_one MODE NAME SIZE: MODE = lat (both on CPU 0, 1 in flight) or pipe (server CPU 0, client
# CPU 1, PIPELINE in flight). Appends "mode size name rate p50 p99 ccpu scpu others" to $results.
run_one() {
  local mode=$1 name=$2 size=$3 port=$PORT out ccore inflight=1
  PORT=$((PORT + 1))
  if [ "$mode" = pipe ]; then ccore=1; inflight=$PIPELINE; else ccore=0; fi
  case $name in
    luna-plain) taskset -c 0 "$host" benches/rpc_echo_server.lua "$port" off >/dev/null & ;;
    luna-enc) taskset -c 0 "$host" benches/rpc_echo_server.lua "$port" on >/dev/null & ;;
    enet) taskset -c 0 "$bin/enet_echo" server "$port" >/dev/null & ;;
    udp) taskset -c 0 "$bin/udp_pingpong" server "$port" >/dev/null & ;;
  esac
  server_pid=$!
  for _ in $(seq 100); do # up to 5 s for the socket
    ss -Hlun "sport = :$port" | grep -q . && break
    sleep 0.05
  done
  local cmd
  case $name in
    luna-plain | luna-enc)
      local enc=off
      [ "$name" = luna-enc ] && enc=on
      cmd=("$host" benches/rpc_echo_client.lua "$port" "$size" "$WARMUP" "$DURATION" "$server_pid" "$enc" --pipeline "$inflight")
      ;;
    enet) cmd=("$bin/enet_echo" client "$port" "$size" "$WARMUP" "$DURATION" "$server_pid" "$inflight") ;;
    udp) cmd=("$bin/udp_pingpong" client "$port" "$size" "$WARMUP" "$DURATION" "$server_pid") ;;
  esac
  if out=$(timeout "$limit" taskset -c "$ccore" "${cmd[@]}" 2>&1); then
    echo "$out" | grep -v '^RESULT' | grep -v '^disconnected: Close server' | sed "s/^/  /"
    echo "$out" | grep '^RESULT' | sed "s/^RESULT/  $name $size B:/"
    echo "$out" | awk -v m="$mode" -v s="$size" -v n="$name" '/^RESULT/ {
      for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      print m, s, n, v["rate"], v["p50_us"], v["p99_us"], v["client_cpu"], v["server_cpu"], v["others_cpu"] }' >>"$results"
  else
    echo "  $name: client failed: $out" >&2
  fi
  stop_server
}

# stats MODE SIZE NAME -> "rate rmin rmax p50 . . p99 . . ccpu cmin cmax scpu smin smax others omin omax"
stats() {
  awk -v m="$1" -v s="$2" -v n="$3" '$1 == m && $2 == s && $3 == n' "$results" | summarize 4 9
}
median_rate() { local r; r=$(stats "$@"); [ "$r" = none ] && echo 0 || echo "${r%% *}"; }

table() { # MODE NAMES...
  local mode=$1 size name row
  shift
  printf '%-5s %-11s %-26s %-8s %-8s %-12s %-12s %-10s\n' size peer "round trips/s (min-max)" \
    "p50 us" "p99 us" "server CPU%" "client CPU%" "others%"
  for size in $SIZES; do
    [ "$mode" = pipe ] && [ "$size" != "${SIZES%% *}" ] && continue
    for name in "$@"; do
      row=$(stats "$mode" "$size" "$name")
      if [ "$row" = none ]; then printf '%-5s %-11s no results\n' "$size" "$name"; continue; fi
      read -r rate rmin rmax p50 _ _ p99 _ _ ccpu _ _ scpu _ _ oth _ omax <<<"$row"
      printf '%-5s %-11s %-26s %-8s %-8s %-12s %-12s %-10s\n' "$size" "$name" \
        "$(printf '%.0f (%.0f-%.0f)' "$rate" "$rmin" "$rmax")" "$p50" "$p99" "$scpu" "$ccpu" \
        "$oth (max $omax)"
    done
  done
}

if [[ " $SECTIONS " == *" latency "* ]]; then
  for size in $SIZES; do
    echo
    echo "== latency, $size B, 1 call in flight, server and client both pinned to CPU 0"
    for _ in $(seq "$RUNS"); do
      for name in luna-plain luna-enc enet udp; do run_one lat "$name" "$size"; done
    done
  done
fi
if [[ " $SECTIONS " == *" pipelined "* ]]; then
  size=${SIZES%% *}
  echo
  echo "== pipelined, $size B, $PIPELINE calls in flight on 1 connection, server CPU 0, client CPU 1"
  for _ in $(seq "$RUNS"); do
    for name in luna-plain enet; do run_one pipe "$name" "$size"; done
  done
fi

if [[ " $SECTIONS " == *" latency "* ]]; then
  echo
  echo "RPC echo round trips, 1 connection x 1 call in flight, BOTH processes pinned to CPU 0;"
  echo "medians of $RUNS alternating runs (min-max). CPU in % of one core over the measured window;"
  echo "others = the rest of the machine meanwhile (over ~15 % marks the run disturbed)."
  table lat luna-plain luna-enc enet udp
  echo
  echo "ratios of median round trips/s:"
  for size in $SIZES; do
    lp=$(median_rate lat "$size" luna-plain) le=$(median_rate lat "$size" luna-enc)
    en=$(median_rate lat "$size" enet) ud=$(median_rate lat "$size" udp)
    echo "  $size B: luna-plain/enet $(ratio "$lp" "$en") (target >= 0.70)   luna-enc/luna-plain $(ratio "$le" "$lp") (encryption cost $(awk -v a="$le" -v b="$lp" 'BEGIN { if (b > 0) printf "%.0f", (1 - a / b) * 100; else print "-" }') %, target <= 15 %)   luna-plain/udp $(ratio "$lp" "$ud")   luna-enc/udp $(ratio "$le" "$ud")   enet/udp $(ratio "$en" "$ud")"
  done
fi
if [[ " $SECTIONS " == *" pipelined "* ]]; then
  echo
  echo "Pipelined throughput, 1 connection x $PIPELINE calls in flight, server CPU 0, client CPU 1"
  echo "(a server under ~95 % CPU means the figure is client-bound):"
  table pipe luna-plain enet
  size=${SIZES%% *}
  echo "  ratio luna-plain/enet: $(ratio "$(median_rate pipe "$size" luna-plain)" "$(median_rate pipe "$size" enet)")"
fi

if [[ " $SECTIONS " == *" idle "* ]]; then
  echo
  echo "== idle luna.update() with $IDLE_N connected RPC sessions (encrypted; server CPU 0, clients CPU 1)"
  port=$PORT
  taskset -c 0 "$host" benches/rpc_idle_server.lua "$port" "$IDLE_N" 200000 >"$results.idle" 2>/dev/null &
  server_pid=$!
  sleep 0.5
  taskset -c 1 "$host" benches/rpc_idle_clients.lua "$port" "$IDLE_N" >/dev/null 2>&1 &
  helper=$!
  timeout 150 tail --pid="$server_pid" -f /dev/null || true
  kill "$helper" 2>/dev/null || true
  wait "$helper" 2>/dev/null || true
  stop_server
  grep '^IDLE' "$results.idle" | sed 's/^/  /'
  echo "  (target: <= 1000 ns/call with $IDLE_N sessions; ns_per_call is the server's CPU time, os.clock)"
  rm -f "$results.idle"
fi
