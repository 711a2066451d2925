#!/usr/bin/env bash
# WebSocket echo with permessage-deflate (issue 9): Luna (luna-host, LuaJIT,
# benches/ws_echo_server.lua with WS_COMPRESSION=LEVEL: default level 1, threshold 64 B, context
# takeover)
# against Node ws 8 with the same settings (benches/ws_deflate/server.js), servers alternating,
# server on CPU 0, the load generator (Node ws, benches/ws_deflate/client.js: CONNS connections,
# one game-state JSON message of SIZE bytes in flight each, compressed both ways) on CPU 1.
# Prints every run (msgs/s, server CPU % over the run and CPU µs per message, wire bytes /
# message bytes) and per size the medians and Luna's ratios to Node. One client core compresses
# and inflates as much as the server does, so the client may be what limits msgs/s: the server's
# CPU per message is the figure that compares the servers then. Node ws is installed here (npm), not in CI.
#
# Environment: SIZES ("256 8192"), RUNS (3), CONNS (50), WARMUP (2), DURATION (5), PORT (19501),
# LEVEL (1: Luna's zlib level; Node runs level 1 throughout).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

SIZES=${SIZES:-"256 8192"}
PORT=${PORT:-19501}
print_machine
build_host luajit
host=$(host_bin luajit)
need_node_ws
cp benches/ws_deflate/server.js benches/ws_deflate/client.js "$peers/"
echo "$node_ws; conns $CONNS, warm-up $WARMUP s, measured $DURATION s, $RUNS runs"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
bench_setup
# start NAME: the server NAME on the next free port ($port), pinned to CPU 0 (lib.sh's serve).
start() {
  next_port
  case $1 in
    luna) serve luna tcp "$port" env WS_COMPRESSION="${LEVEL:-1}" "$host" benches/ws_echo_server.lua "$port" ;;
    node) serve node tcp "$port" node "$peers/server.js" "$port" ;;
  esac
}
for size in $SIZES; do
  echo "== $size-byte messages"
  for run in $(seq "$RUNS"); do
    for server in luna node; do
      start "$server" || continue
      t0=$(date +%s.%N) c0=$(cpu_ticks "$server_pid")
      result=$(taskset -c 1 node "$peers/client.js" "$port" "$size" "$CONNS" "$WARMUP" "$DURATION" | grep RESULT || echo "RESULT failed")
      t1=$(date +%s.%N) c1=$(cpu_ticks "$server_pid")
      cpu=$(echo "$c0 $c1 $t0 $t1 $(getconf CLK_TCK)" | awk '{printf "%.0f", 100 * ($2 - $1) / $5 / ($4 - $3)}')
      rate=$(echo "$result" | sed -n 's/.*msgs_per_s=\([0-9]*\).*/\1/p')
      # Server CPU time per echoed message (warm-up and measured window alike).
      us=$(awk -v cpu="$cpu" -v rate="${rate:-0}" 'BEGIN { printf "%.1f", (rate > 0 ? cpu * 1e4 / rate : 0) }')
      stop_server
      echo "  run $run $server: ${result#RESULT } server_cpu=${cpu}% server_us_per_msg=$us"
      echo "$size $server ${result#RESULT } $us" >>"$results"
    done
  done
done

echo
echo "permessage-deflate echo, msgs/s: median over $RUNS runs (min-max); ratio = Luna / Node; server CPU"
echo "µs per echoed message (medians), cpu ratio = Node's / Luna's (above 1.0: Luna spends less)"
printf '%-8s %-22s %-22s %-6s %-10s %-10s %s\n' size luna node ratio luna_us node_us cpu_ratio
for size in $SIZES; do
  awk -v size="$size" '
    function sort(a, k,   i, j, t) { for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t } }
    $1 == size { split($3, kv, "="); n[$2]++; v[$2, n[$2]] = kv[2]; u[$2, n[$2]] = $5 }
    END {
      for (s in n) {
        for (i = 1; i <= n[s]; i++) { a[i] = v[s, i]; b[i] = u[s, i] }
        sort(a, n[s]); sort(b, n[s]); k = int((n[s] + 1) / 2)
        m[s] = a[k]; lo[s] = a[1]; hi[s] = a[n[s]]; us[s] = b[k]; delete a; delete b
      }
      printf "%-8s %-22s %-22s %-6s %-10s %-10s %s\n", size, m["luna"] " (" lo["luna"] "-" hi["luna"] ")", m["node"] " (" lo["node"] "-" hi["node"] ")", (m["node"] > 0 ? sprintf("%.2f", m["luna"] / m["node"]) : "-"), us["luna"], us["node"], (us["luna"] > 0 ? sprintf("%.2f", us["node"] / us["luna"]) : "-")
    }' "$results"
done
