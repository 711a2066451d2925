#!/usr/bin/env bash
# Memory per idle TCP connection and idle luna.update() cost (issue 8): N (10,000) idle
# connections held by a helper process (benches/tcp_idle.py, pinned to CPU 1; a process may hold
# at most 20,000 descriptors) to a server pinned to CPU 0; the server's resident memory (VmRSS)
# is read from /proc before and 2 s after they are all accepted (its descriptor count shows it).
#
# Servers, alternating RUNS times: Luna (luna-host running benches/tcp_idle_server.lua, LuaJIT
# and Lua 5.4) with each connection's coroutine waiting in s:read() (luna-coro) or with an
# on_data callback and no coroutine left (luna-on_data); for Luna, with the connections open,
# the script's update() also times 200,000 luna.update() calls when asked over the control
# connection (ns per call, CPU time). For orientation, the same memory figure for luv
# (benches/tcp_echo_luv.lua, read_start on every connection) and the tokio echo (benches/net
# net-peer: one task per connection; its 64 KiB read buffer comes with the first bytes).
# Targets for Luna: <= 2 KiB per idle connection, idle update <= 1 us.
#
# Environment: N (10000), RUNS (3), FLAVOURS ("luajit lua54"), SERVERS ("luna-coro luna-on_data
# luv tokio"), PORT (first port, 19501), QUIET_WAIT (60 s, before each Luna run), READY_WAIT (10 s).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

N=${N:-10000}
SERVERS=${SERVERS:-"luna-coro luna-on_data luv tokio"}
PORT=${PORT:-19501}

print_machine
echo "$N idle TCP connections from a helper process; $RUNS runs each"
bench_setup

names=$(server_names "luna-coro luna-on_data" "luv tokio")
prepare "$names"

# run_one NAME: one server, one helper run; appends "NAME bytes_per_conn idle_ns rss_before_kb
# rss_after_kb" to $results (idle_ns "-" for the peers).
run_one() {
  local name=$1 port cmd measure= out
  next_port
  case $name in
    luna-coro-* | luna-on_data-*)
      local style=${name#luna-}
      cmd=("$(host_bin "${name##*-}")" benches/tcp_idle_server.lua "$port" "${style%-*}")
      measure=--measure-update
      wait_quiet
      ;;
    luv) cmd=(luajit benches/tcp_echo_luv.lua "$port") ;;
    tokio) cmd=("$net_bin/net-peer" --tcp "$port") ;;
  esac
  serve "$name" tcp "$port" "${cmd[@]}" || return 0
  if out=$(timeout 300 taskset -c 1 python3 benches/tcp_idle.py "$port" "$server_pid" "$N" $measure 2>&1); then
    echo "  $name: $(echo "$out" | paste -sd ' ')"
    echo "$out" | awk -v n="$name" '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } }
      END { print n, v["bytes_per_conn"], (v["idle_update_ns"] == "" ? "-" : v["idle_update_ns"]), v["rss_before_kb"], v["rss_after_kb"] }' >>"$results"
  else
    echo "  $name: helper failed: $(echo "$out" | tail -n 3 | paste -sd ' ')"
  fi
  stop_server
}

echo
echo "== $N idle connections"
for _ in $(seq "$RUNS"); do
  for name in $(runnable "$names"); do run_one "$name"; done
done

echo
echo "Idle TCP connections ($N, held by another process), medians of $RUNS (min-max): server RSS growth"
echo "per connection (targets for Luna: <= 2048 B), idle luna.update() with them open (<= 1000 ns, CPU time)"
printf '%-20s %-24s %-24s %s\n' server "bytes/conn (min-max)" "idle update ns (min-max)" "RSS before -> after KiB (median)"
for name in $names; do
  row=$(awk -v n="$name" '$1 == n' "$results" | summarize 2 5)
  if [ "$row" = none ]; then
    printf '%-20s no results%s\n' "$name" "$(not_run "$name")"
    continue
  fi
  read -r per pmin pmax ns nmin nmax before _ _ after _ _ <<<"$row"
  ns="$ns ($nmin-$nmax)"
  [[ $name == luna-* ]] || ns=-
  printf '%-20s %-24s %-24s %s\n' "$name" "$per ($pmin-$pmax)" "$ns" "$before -> $after"
done
