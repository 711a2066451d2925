#!/usr/bin/env bash
# HTTP hello world (issue 10): `wrk -t1 -c50` against luna.serve (a Lua handler returning a
# 13-byte body; luna-host with LuaJIT and with Lua 5.4), nginx `return 200` and nginx +
# lua-nginx-module (`content_by_lua_block { ngx.print(...) }`, one worker each), with keep-alive
# and with `Connection: close`, the servers alternating. Server pinned to CPU 0 (its CPU use is
# CPU 0's busy time), wrk to CPU 1. Prints each run and, per mode, the median requests/s and
# Luna's ratios to the two nginx setups. The peers (wrk, nginx, libnginx-mod-http-lua with
# luajit2, which Debian makes replace the luajit package) are installed here, not in CI.
#
# PAGE=static: a 16 KiB file instead, from an HTTP app's `static` template
# (benches/http/static_server.lua) against nginx serving the same directory (sendfile on, as
# Debian's nginx ships); target >= 0.8x nginx.
#
# Environment: RUNS (3), DURATION (10 s per run), CONNS (50), PORT (first port, 19501),
# FLAVOURS ("luajit lua54"), PAGE (hello | static).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
DURATION=${DURATION:-10}
PORT=${PORT:-19501}
PAGE=${PAGE:-hello}

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx)
[ -e /usr/share/nginx/modules-available/mod-http-lua.conf ] || missing+=(libnginx-mod-http-lua luajit2)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
print_machine
bench_setup
build_hosts "$FLAVOURS"
echo "$(wrk --version 2>&1 | head -1 | cut -c1-40); $(nginx -v 2>&1); $CONNS connections, $DURATION s per run, $RUNS runs"
mkdir -p "$bench_tmp/static"
head -c 16384 /dev/urandom >"$bench_tmp/static/file16k.bin"
chmod a+rx "$bench_tmp" "$bench_tmp/static" && chmod a+r "$bench_tmp/static/file16k.bin" # nginx's worker is not root
path=/
luna_script=(benches/http/hello_server.lua)
if [ "$PAGE" = static ]; then
  path=/file16k.bin
  luna_script=(benches/http/static_server.lua "$bench_tmp/static")
  echo "page: a 16 KiB file from $bench_tmp/static"
fi

# cpu0_busy: CPU 0's busy and total jiffies so far.
cpu0_busy() {
  awk '$1 == "cpu0" { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' /proc/stat
}
# start NAME: the server NAME on the next free port(s) ($port).
start() {
  next_port
  case $1 in
    luna-*) serve "$1" tcp "$port" "$(host_bin "${1#luna-}")" "${luna_script[0]}" "$port" "${luna_script[@]:1}" ;;
    nginx|nginx-lua)
      local dir=$bench_tmp/nginx-$port lua_port=$((port + 1)) load_lua=
      mkdir -p "$dir"
      PORT=$((PORT + 1))
      [ "$1" = nginx-lua ] && port=$lua_port
      load_lua=$(grep -h load_module /usr/share/nginx/modules-available/mod-http-ndk.conf /usr/share/nginx/modules-available/mod-http-lua.conf | paste -sd ' ')
      sed -e "s|@DIR@|$dir|g; s|@PORT@|$((lua_port - 1))|g; s|@LUA_PORT@|$lua_port|g; s|@LOAD_LUA@|$load_lua|" \
        -e "s|@STATIC@|$bench_tmp/static|g" \
        benches/http/nginx.conf.in >"$dir/nginx.conf"
      serve "$1" tcp "$port" nginx -c "$dir/nginx.conf" -e "$dir/error.log"
      ;;
  esac
}
servers=""
for f in $built; do servers+=" luna-$f"; done
servers+=" nginx"
[ "$PAGE" = static ] || servers+=" nginx-lua"
for mode in keep-alive close; do
  header=()
  [ "$mode" = close ] && header=(-H "Connection: close")
  echo "== $mode"
  for run in $(seq "$RUNS"); do
    for server in $servers; do
      start "$server" || continue
      taskset -c 1 wrk -t1 -c"$CONNS" -d1s "${header[@]}" "http://127.0.0.1:$port$path" >/dev/null 2>&1 || true
      read -r busy0 total0 < <(cpu0_busy)
      out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" "${header[@]}" "http://127.0.0.1:$port$path" 2>&1 || true)
      read -r busy1 total1 < <(cpu0_busy)
      stop_server
      rps=$(echo "$out" | awk '/^Requests\/sec/ { print $2 }')
      errors=$(echo "$out" | awk '/Non-2xx|Socket errors/ { $1 = $1; printf "%s; ", $0 }')
      cpu=$(awk -v b=$((busy1 - busy0)) -v t=$((total1 - total0)) 'BEGIN { printf "%.0f", t ? 100 * b / t : 0 }')
      p99=$(echo "$out" | awk '/Latency/ { print $2 }')
      echo "  run $run $server: ${rps:-failed} req/s, latency avg $p99, server CPU ${cpu}% ${errors}"
      echo "$mode $server ${rps:-0} $cpu" >>"$results"
    done
  done
done

echo
echo "median requests/s over $RUNS runs (server CPU %); ratio = Luna / peer"
for mode in keep-alive close; do
  awk -v mode="$mode" -v servers="$servers" '
    function med(a, k,   i, j, t) { for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t } return a[int((k + 1) / 2)] }
    $1 == mode { n[$2]++; r[$2, n[$2]] = $3; c[$2, n[$2]] = $4 }
    END {
      split(servers, names, " ")
      for (s in n) { k = 0; for (i = 1; i <= n[s]; i++) { a[++k] = r[s, i]; b[k] = c[s, i] } m[s] = med(a, k); cpu[s] = med(b, k); delete a; delete b }
      line = mode ":"
      for (i = 1; i in names; i++) if (names[i] in m) line = line sprintf("  %s %.0f (%s%%)", names[i], m[names[i]], cpu[names[i]])
      print line
      for (i = 1; i in names; i++) {
        s = names[i]
        if (s !~ /^luna-/ || !(s in m)) continue
        printf "  %s / nginx = %.2f", s, ("nginx" in m) ? m[s] / m["nginx"] : 0
        if ("nginx-lua" in m) printf ", / nginx + Lua = %.2f", m[s] / m["nginx-lua"]
        printf "\n"
      }
    }' "$results"
done
