#!/usr/bin/env bash
# Raw TCP echo throughput (issue 8): Luna's stream server, luna-host running
# benches/tcp_echo_server.lua (a library coroutine per connection doing s:write(s:read())) and
# benches/tcp_echo_server_on_data.lua (an on_data callback), with LuaJIT and Lua 5.4, against
# luv (Debian lua-luv on Debian's luajit, benches/tcp_echo_luv.lua) and a tokio current_thread
# echo (benches/net net-peer: 64 KiB read buffer per connection, write_all), all in this run.
#
# For each payload size the servers alternate (luna-coro-luajit luna-coro-lua54
# luna-on_data-luajit luna-on_data-lua54 luv tokio, then again), RUNS times each, the server pinned
# to CPU 0 and the load generator (benches/net tcp-load: CONNS connections, TCP_NODELAY, one
# message in flight each, the echo checked byte for byte) to CPU 1. Prints every run, then per size
# the median (min-max) msgs/s, p50, p99, server / client / rest-of-machine CPU % and the ratios to
# luv and tokio (../shared/BENCHMARKING.md). Targets: Luna >= 1.2x luv and >= 0.8x tokio.
# A server that does not start is reported with the end of its log and left out of later runs.
#
# Environment: SIZES ("32 4096"), RUNS (3), CONNS (50), WARMUP (2 s), DURATION (5 s),
# FLAVOURS ("luajit lua54": the Lua of the Luna servers; luv always runs on Debian's LuaJIT),
# SERVERS ("luna-coro luna-on_data luv tokio"), UNIX (unset; UNIX=1: every server listens on a
# Unix-domain socket instead of 127.0.0.1), PORT (first port, 19301), QUIET_WAIT (60 s) and
# RETRIES (2) as in ws_echo.sh, READY_WAIT (10 s for a server to listen).
# luajit and lua-luv are installed with apt-get when missing (not under CI).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

SIZES=${SIZES:-"32 4096"}
SERVERS=${SERVERS:-"luna-coro luna-on_data luv tokio"}
UNIX=${UNIX:-}
PORT=${PORT:-19301}

print_machine
transport=TCP
[ -z "$UNIX" ] || transport="Unix-domain socket"
echo "$transport echo, $CONNS conns, one message in flight each; warm-up ${WARMUP} s, measured ${DURATION} s; $RUNS runs each"
bench_setup

# The servers of this run, in the order they alternate; what they need is built or installed.
names=$(server_names "luna-coro luna-on_data" "luv tokio")
prepare "$names"

# run_one NAME SIZE: one server process, one tcp-load run; leaves the record in $record (empty on
# failure).
run_one() {
  local name=$1 size=$2 port addr kind=tcp target cmd
  record=
  next_port
  if [ -n "$UNIX" ]; then
    kind=unix addr=$bench_tmp/$port.sock target=(--unix "$addr")
  else
    addr=$port target=(--addr "127.0.0.1:$port")
  fi
  case $name in
    luna-coro-*) cmd=("$(host_bin "${name##*-}")" benches/tcp_echo_server.lua "$addr") ;;
    luna-on_data-*) cmd=("$(host_bin "${name##*-}")" benches/tcp_echo_server_on_data.lua "$addr") ;;
    luv) cmd=(luajit benches/tcp_echo_luv.lua "$addr") ;;
    tokio) cmd=("$net_bin/net-peer" "--$kind" "$addr") ;;
  esac
  serve "$name" "$kind" "$addr" "${cmd[@]}" || return 0
  load "$name" "$size" "" "$net_bin/tcp-load" "${target[@]}" --conns "$CONNS" --size "$size" \
    --warmup "$WARMUP" --duration "$DURATION" --server-pid "$server_pid"
  stop_server
}

alternate "$(runnable "$names")"

echo
echo "$transport echo, $CONNS conns x 1 in flight, medians of $RUNS (min-max); /luv, /tokio = median msgs/s over"
echo "theirs (targets for Luna: >= 1.20 /luv, >= 0.80 /tokio); others = CPU the rest of the machine used"
echo "meanwhile (% of one core, includes some loopback softirq time): over 15 % in any run marks the group disturbed"
print_table "$SIZES" "$names" "luv tokio"
