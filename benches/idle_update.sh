#!/usr/bin/env bash
# Idle luna.update() cost at 0 / 1,000 / 10,000 open sockets vs the mio poll(0) floor, in
# vendored LuaJIT and Lua 5.4, pinned to one core (see ../shared/BENCHMARKING.md).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "date: $(date -u +%F)"
for flavour in "luajit,vendored" "lua54,vendored"; do
  # Built with the bench profile; the executable's name carries a hash, so ask Cargo for it.
  exe=$(cargo bench --quiet --no-run --no-default-features --features "$flavour" --bench idle_update \
    --message-format=json | grep '"name":"idle_update"' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
  taskset -c 0 "$exe"
done
