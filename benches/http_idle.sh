#!/usr/bin/env bash
# Memory per idle HTTP keep-alive connection and idle luna.update() cost (issue 10): N (10,000)
# connections, each having made one request, held by benches/tcp_idle.py --http (CPU 1) to
# luna-host running benches/http/idle_server.lua (CPU 0, LuaJIT); the server's resident memory
# is read before and 2 s after, then 200,000 idle luna.update() calls are timed with them open.
# Targets: <= 4 KiB per idle keep-alive connection, idle update <= 1 us.
#
# Environment: N (10000), RUNS (3), PORT (first port, 19701).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
N=${N:-10000}
PORT=${PORT:-19701}
print_machine
bench_setup
build_host luajit
for run in $(seq "$RUNS"); do
  next_port
  serve luna tcp "$port" "$(host_bin luajit)" benches/http/idle_server.lua "$port" || exit 1
  out=$(timeout 300 taskset -c 1 python3 benches/tcp_idle.py "$port" "$server_pid" "$N" --measure-update --http 2>&1) ||
    echo "  helper failed: $(echo "$out" | tail -n 3 | paste -sd ' ')"
  stop_server
  echo "  run $run: $(echo "$out" | paste -sd ' ')"
  echo "$out" | paste -sd ' ' >>"$results"
done
echo
echo "$N idle keep-alive connections, $RUNS runs: bytes per connection and idle update ns, median (min-max)"
for key in bytes_per_conn idle_update_ns; do
  tr ' ' '\n' <"$results" | awk -F= -v k="$key" '$1 == k { print $2 }' | sort -n |
    awk -v k="$key" '{ v[NR] = $1 } END { printf "%s: %s (%s-%s)\n", k, v[int((NR + 1) / 2)], v[1], v[NR] }'
done
