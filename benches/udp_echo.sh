#!/usr/bin/env bash
# UDP echo throughput (issue 8): Luna (luna-host running benches/udp_echo_server.lua, an
# on_packet callback doing u:send(data, ip, port)), with LuaJIT and Lua 5.4, against luv
# (Debian lua-luv on Debian's luajit, benches/udp_echo_luv.lua), the C floor (a blocking
# recvfrom/sendto loop: benches/rpc/udp_pingpong.c's server) and a tokio current_thread echo
# (benches/net net-peer --udp), all in this run.
#
# For each payload size the servers alternate (luna-luajit luna-lua54 luv c tokio, then again),
# RUNS times each, the server pinned to CPU 0 and the load generator (benches/net udp-load: CONNS
# sockets bound to 127.0.0.1, one datagram in flight each; a datagram not echoed within
# TIMEOUT_MS is counted lost and the next one sent) to CPU 1. Prints every run, then per size the
# median (min-max) datagrams/s, p50, p99, server / client / rest-of-machine CPU %, lost datagrams,
# and the ratios to luv and to the C floor (../shared/BENCHMARKING.md).
# A server that does not start is reported with the end of its log and left out of later runs.
#
# Environment: SIZES ("32 1200"), RUNS (3), CONNS (50), WARMUP (2 s), DURATION (5 s),
# TIMEOUT_MS (200), FLAVOURS ("luajit lua54"), SERVERS ("luna luv c tokio"), PORT (first port,
# 19401), QUIET_WAIT (60 s) and RETRIES (2) as in ws_echo.sh, READY_WAIT (10 s).
# luajit and lua-luv are installed with apt-get when missing (not under CI).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

SIZES=${SIZES:-"32 1200"}
TIMEOUT_MS=${TIMEOUT_MS:-200}
SERVERS=${SERVERS:-"luna luv c tokio"}
PORT=${PORT:-19401}

print_machine
echo "UDP echo, $CONNS sockets, one datagram in flight each (lost after $TIMEOUT_MS ms); warm-up ${WARMUP} s, measured ${DURATION} s; $RUNS runs each"
bench_setup

names=$(server_names "luna" "luv c tokio")
prepare "$names"

# run_one NAME SIZE: one server process, one udp-load run; leaves the record (with the lost
# datagrams) in $record (empty on failure).
run_one() {
  local name=$1 size=$2 port cmd
  record=
  next_port
  case $name in
    luna-*) cmd=("$(host_bin "${name##*-}")" benches/udp_echo_server.lua "$port") ;;
    luv) cmd=(luajit benches/udp_echo_luv.lua "$port") ;;
    c) cmd=(benches/rpc/bin/udp_pingpong server "$port") ;;
    tokio) cmd=("$net_bin/net-peer" --udp "$port") ;;
  esac
  serve "$name" udp "$port" "${cmd[@]}" || return 0
  load "$name" "$size" lost "$net_bin/udp-load" --addr "127.0.0.1:$port" --conns "$CONNS" --size "$size" \
    --warmup "$WARMUP" --duration "$DURATION" --timeout-ms "$TIMEOUT_MS" --server-pid "$server_pid"
  stop_server
}

alternate "$(runnable "$names")"

echo
echo "UDP echo, $CONNS sockets x 1 datagram in flight, medians of $RUNS (min-max); /luv, /c = median"
echo "datagrams/s over theirs (c: the blocking recvfrom/sendto floor); lost = datagrams not echoed"
echo "within $TIMEOUT_MS ms; others = CPU the rest of the machine used meanwhile (over 15 % marks the group disturbed)"
print_table "$SIZES" "$names" "luv c"
