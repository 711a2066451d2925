# Shell helpers shared by the benchmark scripts (sourced from the repo root, not run).
#
# A comparison script (ws_echo.sh, tcp_echo.sh, udp_echo.sh) is: print_machine; bench_setup;
# builds; `alternate NAMES`, which measures `run_one NAME SIZE` for every server in turn, where
# run_one starts the server with `serve` (pinned to CPU 0), runs the load generator with `load`
# (pinned to CPU 1) and stops the server; then print_table. See ../shared/BENCHMARKING.md.

# The measurement knobs every comparison takes, and their defaults: RUNS (3 runs of each server,
# alternating), CONNS (50), WARMUP (2 s), DURATION (5 s measured), FLAVOURS ("luajit lua54": the
# Lua of the Luna servers); QUIET_WAIT (60 s) and RETRIES (2) are read by wait_quiet and measure.
RUNS=${RUNS:-3} CONNS=${CONNS:-50} WARMUP=${WARMUP:-2} DURATION=${DURATION:-5}
FLAVOURS=${FLAVOURS:-"luajit lua54"}

# The machine and the date, with the load average before the builds.
print_machine() {
  echo "machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "date: $(date -u '+%F %H:%M') UTC; load average before the builds: $(cut -d' ' -f1-3 /proc/loadavg)"
}

# Luna hosts: the LuaJIT one is the default build (target/release/luna-host); the Lua 5.4 one goes
# to its own target directory so it does not replace it.
luna_target=${CARGO_TARGET_DIR:-target}
host_bin() {
  case $1 in
    luajit) echo "$luna_target/release/luna-host" ;;
    lua54) echo "$luna_target-lua54/release/luna-host" ;;
  esac
}
# build_host FLAVOUR: builds luna-host for FLAVOUR (luajit, lua54); an unknown one exits 2.
build_host() {
  case $1 in
    luajit) cargo build --quiet --release --bin luna-host ;;
    lua54)
      cargo build --quiet --release --no-default-features --features lua54,vendored --bin luna-host \
        --target-dir "$luna_target-lua54"
      ;;
    *) echo "unknown flavour '$1' (luajit, lua54)" >&2 && exit 2 ;;
  esac
}

# server_names "LUNA" "PEERS": the names of this run's servers, in the order of $SERVERS: a Luna
# server (one of LUNA) once per flavour of $FLAVOURS as NAME-FLAVOUR, a peer (one of PEERS) as is;
# an unknown one exits 2.
server_names() {
  local server flavour names=
  for server in $SERVERS; do
    if [[ " $1 " == *" $server "* ]]; then
      for flavour in $FLAVOURS; do names+=" $server-$flavour"; done
    elif [[ " $2 " == *" $server "* ]]; then
      names+=" $server"
    else
      echo "unknown server '$server' ($1 $2)" >&2 && exit 2
    fi
  done
  echo "$names"
}

# build_hosts "FLAVOURS": builds luna-host for each flavour (after bench_setup) and sets $built to
# the flavours that did build; a failed build is reported with the end of its output and left out
# (the comparison goes on with the other servers).
build_hosts() {
  local flavour
  built=
  for flavour in $1; do
    if build_host "$flavour" >"$bench_tmp/build-$flavour.log" 2>&1; then
      built+=" $flavour"
    else
      echo "luna-host ($flavour) did not build, no $flavour rows: $(tail -n 5 "$bench_tmp/build-$flavour.log" | paste -sd ' ')"
    fi
  done
}

# prepare "NAMES": builds or installs what the servers NAMES (server_names) and the load
# generators need: luna-host for each flavour of $FLAVOURS when a luna-* is among them
# (build_hosts), benches/net (tcp-load, udp-load, net-peer; $net_bin), the C floor for "c"
# (benches/rpc/bin/udp_pingpong), luv for "luv" (need_luv); then prints the load average.
prepare() {
  [[ " $1" != *" luna-"* ]] || build_hosts "$FLAVOURS"
  cargo build --quiet --release --manifest-path benches/net/Cargo.toml
  net_bin=${CARGO_TARGET_DIR:-benches/net/target}/release
  [[ " $1 " != *" c "* ]] || benches/rpc/build.sh udp_pingpong
  if [[ " $1 " == *" luv "* ]] && need_luv; then luv_version; fi
  echo "load average after the builds: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure)"
}

# need_luv: makes sure Debian's luajit can `require "luv"` (Debian lua-luv, the libuv binding),
# installing luajit and lua-luv with apt-get when missing, except under CI. Returns 1 (with a
# message) when luv is not there.
need_luv() {
  luajit -e 'require "luv"' 2>/dev/null && return 0
  if [ -n "${CI:-}" ]; then
    echo "luv: not installed (not installing under CI): no luv rows"
    return 1
  fi
  echo "installing luajit and lua-luv (apt-get, log in /tmp/bench-apt.log)"
  # Waits for another apt/dpkg run instead of failing on its lock.
  local apt=(apt-get -o DPkg::Lock::Timeout=600 -y -q)
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" install luajit lua-luv >/tmp/bench-apt.log 2>&1 ||
    { "${apt[@]}" update >>/tmp/bench-apt.log 2>&1 &&
      DEBIAN_FRONTEND=noninteractive "${apt[@]}" install luajit lua-luv >>/tmp/bench-apt.log 2>&1; } || true
  luajit -e 'require "luv"' 2>/dev/null && return 0
  echo "luv: could not be installed (see /tmp/bench-apt.log): no luv rows"
  return 1
}
# need_node_ws: Node's ws 8 from npm in $peers (target/bench-peers: peers are installed by the
# benchmarks, never in CI); sets $node_ws (its version and Node's, for the header).
need_node_ws() {
  peers=$(realpath -m "${CARGO_TARGET_DIR:-target}/bench-peers")
  mkdir -p "$peers"
  [ -d "$peers/node_modules/ws" ] || npm install --silent --prefix "$peers" ws@8 >/dev/null
  node_ws="node ws $(node -p "require('$peers/node_modules/ws/package.json').version"), $(node -v)"
}

# The installed luv and LuaJIT versions, for the header.
luv_version() {
  echo "luv: Debian lua-luv $(dpkg-query -W -f '${Version}' lua-luv 2>/dev/null || echo '?'), libuv $(luajit -e 'io.write(require("luv").version_string())' 2>/dev/null || echo '?')," \
    "run by $(luajit -v 2>/dev/null | cut -d" " -f1-2)"
}

# bench_setup: a scratch directory $bench_tmp (server logs, Unix sockets) and an empty results
# file $results in it; on exit (or INT/TERM) the server is stopped and both go.
server_pid= built=
bench_setup() {
  bench_tmp=$(mktemp -d)
  results=$bench_tmp/results
  : >"$results"
  trap 'stop_server; rm -rf "$bench_tmp"' EXIT
  trap 'exit 130' INT TERM
}

# stop_pid PID: TERM, up to 5 s to exit, then KILL; reaps it.
stop_pid() {
  kill "$1" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$1" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
# Stops the server started in the background whose pid is in $server_pid.
stop_server() {
  [ -z "$server_pid" ] || stop_pid "$server_pid"
  server_pid=
}

# listening KIND ADDR [PID]: whether a socket listens (tcp, unix) or is bound (udp) at ADDR (a
# port on 127.0.0.1, or a Unix socket path), held by process PID when given.
listening() {
  local filter
  case $1 in
    tcp) filter=(-Hltnp "src 127.0.0.1:$2") ;;
    udp) filter=(-Hlunp "src 127.0.0.1:$2") ;;
    unix) filter=(-Hlxp src "$2") ;;
  esac
  ss "${filter[@]}" | grep -q "${3:+pid=$3,}"
}

# next_port: sets $port to the next port from $PORT on that no TCP or UDP socket of the machine
# holds, and moves $PORT past it (each run takes a port of its own).
next_port() {
  while ss -Htuna "sport = :$PORT" | grep -q .; do PORT=$((PORT + 1)); done
  port=$PORT
  PORT=$((PORT + 1))
}

# serve NAME KIND ADDR COMMAND...: starts COMMAND pinned to CPU 0 in the background (its output in
# $bench_tmp, NAME.log) and waits up to READY_WAIT (10) s until it listens at KIND ADDR (as for
# `listening`); sets $server_pid. A server that exits or does not listen by then is reported
# ("NAME: server did not start: <the end of its log>"), stopped and remembered: this and every later
# call for NAME return 1 (the caller carries on with the other servers).
not_started=" "
serve() {
  local name=$1 kind=$2 addr=$3 log deadline
  shift 3
  [[ $not_started != *" $name "* ]] || return 1
  log=$bench_tmp/${name//\//_}.log
  [ "$kind" != unix ] || rm -f "$addr"
  taskset -c 0 "$@" >"$log" 2>&1 &
  server_pid=$!
  deadline=$((SECONDS + ${READY_WAIT:-10}))
  until listening "$kind" "$addr" "$server_pid"; do
    if ! kill -0 "$server_pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      kill -0 "$server_pid" 2>/dev/null && echo "(not listening after ${READY_WAIT:-10} s)" >>"$log"
      echo "  $name: server did not start: $(tail -n 8 "$log" | cut -c1-300 | sed 's/^[[:space:]]*//' | paste -sd '|' | sed 's/|/ | /g')"
      echo "  ($name is left out of the remaining runs)"
      stop_server
      not_started+="$name "
      return 1
    fi
    sleep 0.05
  done
}

# load NAME SIZE "KEYS" COMMAND...: runs the load generator COMMAND pinned to CPU 1 (for at most
# WARMUP + DURATION + 60 s); prints its human line as NAME's and leaves in $record the record
# "SIZE NAME msgs/s p50 p99 client_cpu server_cpu others_cpu" followed by the values of its
# RESULT keys KEYS (e.g. "lost"), or nothing when it failed.
load() {
  local name=$1 size=$2 keys=$3 out limit
  shift 3
  record=
  limit=$(awk -v w="$WARMUP" -v d="$DURATION" 'BEGIN { printf "%d", w + d + 60 }')
  if out=$(timeout "$limit" taskset -c 1 "$@" 2>&1); then
    echo "$out" | grep -v '^RESULT' | sed "s/^[a-z]*-load:/  $name:/"
    record=$(echo "$out" | awk -v s="$size" -v n="$name" -v keys="msgs_per_s p50_us p99_us client_cpu server_cpu others_cpu $keys" '
      /^RESULT/ {
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        line = s " " n
        k = split(keys, key, " ")
        for (i = 1; i <= k; i++) line = line " " v[key[i]]
        print line }')
  else
    echo "  $name: load generator failed: $(echo "$out" | tail -n 3 | paste -sd ' ')"
  fi
}

# CPU the whole machine uses over half a second, in % of one core (from /proc/stat).
machine_busy() {
  local a b
  a=$(head -1 /proc/stat)
  sleep 0.5
  b=$(head -1 /proc/stat)
  echo "$a $b" | awk -v hz="$(getconf CLK_TCK)" '{
    busy = ($13 + $14 + $15 + $18 + $19 + $20) - ($2 + $3 + $4 + $7 + $8 + $9)
    printf "%d", 100 * busy / hz / 0.5 }'
}

# Waits (at most QUIET_WAIT, 60 s) until the rest of the machine uses < 15 % of a core.
wait_quiet() {
  local deadline=$((SECONDS + ${QUIET_WAIT:-60})) busy
  while busy=$(machine_busy) && [ "$busy" -gt 15 ]; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "  (machine still busy, $busy % of a core: running anyway)"
      return
    fi
  done
}

# measure COMMAND...: runs COMMAND (e.g. `run_one NAME SIZE`, which leaves a `load` record in
# $record, or none) after a quiet wait, again (up to RETRIES, 2, times) while other work disturbed
# it (others_cpu, the record's 8th field, over 15 %); appends the last record to $results.
measure() {
  local attempt
  for attempt in $(seq 0 "${RETRIES:-2}"); do
    wait_quiet
    "$@"
    [ -n "$record" ] || return 0
    [ "$(echo "$record" | awk '{ print ($8 + 0 > 15) }')" = 1 ] && [ "$attempt" -lt "${RETRIES:-2}" ] || break
    echo "  (disturbed by other work: again)"
  done
  echo "$record" >>"$results"
}

# runnable "NAMES": the servers among NAMES that can run: luna-...-FLAVOUR only when FLAVOUR is in
# $built (build_hosts), luv only when luajit has luv. The others' rows say "no results".
runnable() {
  local name can=
  for name in $1; do
    case $name in
      luna-*) [[ " $built " == *" ${name##*-} "* ]] || continue ;;
      luv) luajit -e 'require "luv"' 2>/dev/null || continue ;;
    esac
    can+=" $name"
  done
  echo "$can"
}

# alternate "NAMES" [LABEL]: for each size in $SIZES, RUNS times, `measure run_one NAME SIZE` for
# each NAME in turn (A B C A B C ...); LABEL prefixes the size headings.
alternate() {
  local size name
  for size in $SIZES; do
    echo
    echo "== ${2:-}$size B payload"
    for _ in $(seq "$RUNS"); do
      for name in $1; do
        measure run_one "$name" "$size"
      done
    done
  done
}

# not_run NAME: why NAME has no results, when the harness knows (": server did not start", ...).
not_run() {
  if [[ $not_started == *" $1 "* ]]; then
    echo ": server did not start"
  elif [ -z "$(runnable "$1")" ]; then
    case $1 in
      luv) echo ": luv is missing" ;;
      *) echo ": luna-host (${1##*-}) did not build" ;;
    esac
  fi
}

# summarize FROM TO < rows: for each column FROM..TO of the rows on stdin prints
# "median min max " (one line), or "none" when there is no row.
summarize() {
  awk -v from="$1" -v to="$2" '
    { for (c = from; c <= to; c++) col[c, NR] = $c } END {
      if (NR == 0) { print "none"; exit }
      for (c = from; c <= to; c++) {
        for (i = 1; i <= NR; i++) a[i] = col[c, i]
        for (i = 2; i <= NR; i++) for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
        med = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
        printf "%s %s %s ", med, a[1], a[NR]
      }
      print "" }'
}

# ratio A B: A / B with two decimals, "-" when B is 0.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

# size_stats SIZE NAME: summarize over the records of NAME at SIZE in $results (msgs/s .. others, lost).
size_stats() { awk -v s="$1" -v n="$2" '$1 == s && $2 == n' "$results" | summarize 3 9; }

# print_table "SIZES" "NAMES" "REFS": per size and server, the medians over the runs in $results
# (min-max) of msgs/s, p50, p99, server / client / others CPU % (and lost datagrams when the
# records carry them), and the ratio of the median msgs/s to each REF's ("/REF" columns).
# Labels: "client-bound" (server under 95 % CPU), "disturbed" (others over 15 % in some run).
print_table() {
  local sizes=$1 names=$2 refs=$3 size name ref row lossy
  lossy=$(awk 'NF > 8 { print 1; exit }' "$results")
  printf '%-6s %-19s %-24s %-8s %-8s %-14s %-14s %-13s' size server "msgs/s (min-max)" "p50 us" "p99 us" \
    "server CPU %" "client CPU %" "others %"
  [ -z "$lossy" ] || printf ' %-12s' "lost (max)"
  for ref in $refs; do printf ' %-8s' "/$ref"; done
  echo
  for size in $sizes; do
    declare -A base=()
    for ref in $refs; do
      row=$(size_stats "$size" "$ref")
      base[$ref]=${row%% *}
      [ "$row" != none ] || base[$ref]=0
    done
    for name in $names; do
      row=$(size_stats "$size" "$name")
      if [ "$row" = none ]; then
        printf '%-6s %-19s no results%s\n' "$size" "$name" "$(not_run "$name")"
        continue
      fi
      read -r rate rmin rmax p50 _ _ p99 _ _ ccpu cmin cmax scpu smin smax ocpu _ omax lost _ lmax <<<"$row"
      printf '%-6s %-19s %-24s %-8s %-8s %-14s %-14s %-13s' "$size" "$name" \
        "$(printf '%.0f (%.0f-%.0f)' "$rate" "$rmin" "$rmax")" "$p50" "$p99" "$scpu ($smin-$smax)" \
        "$ccpu ($cmin-$cmax)" "$ocpu (max $omax)"
      [ -z "$lossy" ] || printf ' %-12s' "$lost (max $lmax)"
      for ref in $refs; do printf ' %-8s' "$(ratio "$rate" "${base[$ref]}")"; done
      awk -v c="$scpu" -v o="$omax" 'BEGIN {
        l = (c + 0 < 95) ? "client-bound" : ""; if (o + 0 > 15) l = l (l ? ", " : "") "disturbed"; print " " l }'
    done
  done
}
