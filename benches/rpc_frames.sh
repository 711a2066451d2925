#!/usr/bin/env bash
# Game-loop cost of RPC (issue 14): two Debian luajit processes running benches/rpc_frames.lua
# with the built module (luajit,module, as LÖVE loads it), each frame-paced at 60 Hz — the server
# on CPU 0 timing every luna.update, the client on CPU 1 issuing N noawait_fetch calls per frame
# (one 11-byte string, encrypted) and timing its frame's networking (the calls + lunac.update, which
# runs the answer callbacks). For each N, RUNS runs of DURATION s (WARMUP s left out); prints
# every run and the median of the per-run p50 / p99 / max, and the client's cost per call (p50
# frame cost / N). Targets: client <= 2 us per call at N = 500 (p50 <= 1 ms, p99 <= 2 ms), server
# update p99 <= 2 ms.
#
# FLAVOURS ("luajit lua54"): luajit is the above; lua54 runs the same script in luna-host built
# with Lua 5.4 (vendored), which waits for the next frame in a busy loop (no ffi to sleep with).
#
# Environment: NS ("100 500"), RUNS (3), DURATION (10 s), WARMUP (2 s), PORT (first port, 19701),
# FLAVOURS. luajit is installed with apt-get when missing (not under CI).
set -euo pipefail
cd "$(dirname "$0")/.."

NS=${NS:-"100 500"}
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
PORT=${PORT:-19701}
FLAVOURS=${FLAVOURS:-"luajit lua54"}

command -v luajit >/dev/null || apt-get install -y luajit >/dev/null
echo "machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "date: $(date -u '+%F %H:%M') UTC; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target=${CARGO_TARGET_DIR:-target}
for flavour in $FLAVOURS; do
  case $flavour in
    luajit)
      CARGO_TARGET_DIR=$target/bench-module cargo build --quiet --release --no-default-features --features luajit,module
      cp "$target/bench-module/release/libluna.so" "$work/luna.so"
      ;;
    lua54)
      cargo build --quiet --release --no-default-features --features lua54,vendored --bin luna-host \
        --target-dir "$target-lua54"
      ;;
    *) echo "unknown flavour '$flavour' (luajit, lua54)" >&2 && exit 2 ;;
  esac
done
echo "$(luajit -v | head -1) / luna-host with Lua 5.4; $RUNS runs of ${DURATION} s per N (first ${WARMUP} s left out), 60 Hz"

# run FLAVOUR CPU ARGS...: the frame script pinned to CPU.
run() {
  local flavour=$1 cpu=$2
  shift 2
  case $flavour in
    luajit) taskset -c "$cpu" luajit benches/rpc_frames.lua "$work" "$@" ;;
    lua54) taskset -c "$cpu" "$target-lua54/release/luna-host" benches/rpc_frames.lua - "$@" ;;
  esac
}

results=$work/results
for flavour in $FLAVOURS; do
  for n in $NS; do
    echo "== $flavour, $n calls per frame"
    for run in $(seq "$RUNS"); do
      port=$PORT
      PORT=$((PORT + 1))
      server_seconds=$((DURATION + 3))
      run "$flavour" 0 server "$port" "$server_seconds" >"$work/server.out" &
      spid=$!
      for _ in $(seq 50); do grep -q ready "$work/server.out" 2>/dev/null && break; sleep 0.1; done
      client=$(run "$flavour" 1 client "$port" "$DURATION" "$n" "$WARMUP" | grep RESULT)
      wait "$spid"
      server=$(grep RESULT "$work/server.out")
      echo "  run $run client: ${client#RESULT }"
      echo "  run $run server: ${server#RESULT }"
      echo "$flavour $n client $client" >>"$results"
      echo "$flavour $n server $server" >>"$results"
    done
  done
done

echo
echo "Frame-paced RPC, medians over $RUNS runs of each run's p50 / p99 / max (ms); client cost per call = p50 / N"
printf '%-7s %-6s %-7s %-10s %-10s %-10s %-14s\n' lua N side p50_ms p99_ms max_ms per_call_us
for flavour in $FLAVOURS; do
  for n in $NS; do
    for side in client server; do
      grep "^$flavour $n $side " "$results" | awk -v f="$flavour" -v n="$n" -v side="$side" '
        function med(a, k,   i, j, t) { for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t } return a[int((k + 1) / 2)] }
        { for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "p50_ms") p50[NR] = kv[2]; if (kv[1] == "p99_ms") p99[NR] = kv[2]; if (kv[1] == "max_ms") mx[NR] = kv[2] } }
        END { m = med(p50, NR); printf "%-7s %-6s %-7s %-10.3f %-10.3f %-10.3f %-14s\n", f, n, side, m, med(p99, NR), med(mx, NR), side == "client" ? sprintf("%.2f", m * 1000 / n) : "-" }'
    done
  done
done
