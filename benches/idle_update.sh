#!/usr/bin/env bash
# Idle luna.update() cost at 0 / 1,000 / 10,000 open sockets vs the mio poll(0) floor, in
# vendored LuaJIT and Lua 5.4, pinned to one core (see ../shared/BENCHMARKING.md).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "date: $(date -u +%F)"
for flavour in "luajit,vendored" "lua54,vendored"; do
  cargo build --quiet --release --no-default-features --features "$flavour" --example bench_idle_update
  taskset -c 0 "${CARGO_TARGET_DIR:-target}/release/examples/bench_idle_update"
done
