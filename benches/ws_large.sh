#!/usr/bin/env bash
# Large WebSocket messages (issue 9): one SIZE-byte binary message echoed, sent as one frame and
# in 64 KiB, 1 KiB and 64 B frames (pre-built and written in one burst, as Autobahn's 9.* cases
# send them; benches/ws_large/client.py), by Luna (luna-host, LuaJIT, benches/ws_echo_server.lua),
# Python websockets (newest from PyPI, in a virtualenv) and Node ws (npm), the servers alternating,
# server on CPU 0 and client on CPU 1. Each run times REPS echoes on one connection; prints every
# run's median and, per frame size, the median of the runs and each server's ratio to the faster
# peer (above 1.0 = Luna is faster), then the CPU time each server spent per echo (from
# /proc/PID/stat, 10 ms ticks over the run). The peers are installed here, not in CI.
#
# Environment: SIZE (4194304), FRAGS ("0 65536 1024 64"; 0 = one frame), RUNS (3), REPS (20),
# PORT (first port, 19301).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

SIZE=${SIZE:-4194304}
FRAGS=${FRAGS:-"0 65536 1024 64"}
REPS=${REPS:-20}
PORT=${PORT:-19301}
print_machine
build_host luajit
host=$(host_bin luajit)
need_node_ws
[ -x "$peers/venv/bin/python3" ] || python3 -m venv "$peers/venv"
"$peers/venv/bin/python3" -m pip install --quiet --upgrade websockets
cp benches/ws_large/server.js "$peers/server.js"
echo "websockets $("$peers/venv/bin/python3" -c 'import websockets; print(websockets.__version__)'), $node_ws; $SIZE bytes, $REPS echoes per run, $RUNS runs"

bench_setup
# cpu_ticks PID: user + system CPU time PID has used, in clock ticks.
cpu_ticks() {
  awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
# start NAME: the server NAME on the next free port ($port), pinned to CPU 0 (lib.sh's serve).
start() {
  next_port
  case $1 in
    luna) serve luna tcp "$port" env WS_MAX_MESSAGE_SIZE=$((64 << 20)) "$host" benches/ws_echo_server.lua "$port" ;;
    websockets) serve websockets tcp "$port" "$peers/venv/bin/python3" benches/ws_large/server.py "$port" ;;
    node) serve node tcp "$port" node "$peers/server.js" "$port" ;;
  esac
}
for frag in $FRAGS; do
  if [ "$frag" = 0 ]; then echo "== one frame"; else echo "== frames of $frag bytes"; fi
  for run in $(seq "$RUNS"); do
    for server in luna websockets node; do
      start "$server" || continue
      before=$(cpu_ticks "$server_pid")
      result=$(taskset -c 1 "$peers/venv/bin/python3" benches/ws_large/client.py "$port" "$SIZE" "$frag" "$REPS" | grep RESULT || echo "RESULT failed")
      cpu=
      # Only a run that echoed every message has a CPU figure (a peer that refused may be gone).
      if [[ $result == *median_ms=* ]] && after=$(cpu_ticks "$server_pid" 2>/dev/null); then
        cpu=cpu=$(awk -v t="$((after - before))" -v r="$REPS" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", t * 1000 / hz / r }')
      fi
      stop_server
      echo "  run $run $server: ${result#RESULT } $cpu"
      echo "$frag $server ${result#RESULT } $cpu" >>"$results"
    done
  done
done

# table KEY RATIO: per frame size, the median over the runs of each server's KEY value (RATIO=1
# adds the faster peer's value / Luna's; a run without KEY shows as its close code).
table() {
  local frag
  for frag in $FRAGS; do
    awk -v frag="$frag" -v key="$1" -v ratio="$2" '
      function med(a, k,   i, j, t) { for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t } return a[int((k + 1) / 2)] }
      $1 == frag { for (f = 3; f <= NF; f++) { split($f, kv, "="); if (kv[1] == key) { n[$2]++; v[$2, n[$2]] = kv[2] } else if (kv[1] == "closed") closed[$2] = kv[2] } }
      function show(s) { return s in m ? sprintf("%.1f", m[s]) : s in closed ? "closed " closed[s] : "failed" }
      END {
        for (s in n) { k = 0; for (i = 1; i <= n[s]; i++) a[++k] = v[s, i]; m[s] = med(a, k); delete a }
        best = -1
        for (s in m) if (s != "luna" && (best < 0 || m[s] < best)) best = m[s]
        r = ("luna" in m && best > 0) ? sprintf("%.2f", best / m["luna"]) : "-"
        printf "%-10s %-10s %-12s %-10s %-8s\n", frag == 0 ? "one" : frag, show("luna"), show("websockets"), show("node"), ratio ? r : ""
      }' "$results"
  done
}
echo
echo "$SIZE-byte echo time, median over $RUNS runs of each run's median (ms); ratio = faster peer's time / Luna's"
printf '%-10s %-10s %-12s %-10s %-8s\n' frames luna websockets node ratio
table median_ms 1
echo
echo "server CPU per echo (ms), median over $RUNS runs; ratio = the leaner peer's / Luna's"
printf '%-10s %-10s %-12s %-10s %-8s\n' frames luna websockets node ratio
table cpu 1
