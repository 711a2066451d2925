#!/usr/bin/env bash
# The HTTP client against nginx on 127.0.0.1 (see ../shared/BENCHMARKING.md): sequential
# keep-alive GETs of a 13-byte and a 64 KiB body against the Rust `ureq` client, 50 concurrent
# coroutines against `wrk -c50 -t1`, a new connection per request (no pool), and https (against
# ureq too, both verifying the test CA). nginx is
# pinned to CPU 0, every client to CPU 1; runs alternate. Installs nginx and wrk if missing.
#   RUNS=3 N=20000 benches/http_client.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3} N=${N:-20000} DURATION=${DURATION:-5}
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
nginx=$(command -v nginx || echo /usr/sbin/nginx)
echo "machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "date: $(date -u '+%F %H:%M') UTC; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --quiet --release --bin luna-host
(cd benches/http_client && cargo build --quiet --release)
ureq=benches/http_client/target/release/luna-bench-ureq
host=${CARGO_TARGET_DIR:-target}/release/luna-host
echo "$($nginx -v 2>&1); $(wrk --version 2>&1 | head -1 | cut -c1-30); ureq $(grep -A1 'name = "ureq"' benches/http_client/Cargo.lock | sed -n 's/version = "\(.*\)"/\1/p')"

work=$(mktemp -d)
trap '[ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/static"
head -c 65536 /dev/urandom >"$work/static/64k.bin"
chmod -R a+rX "$work"
port=19611 tls_port=19612
cat >"$work/nginx.conf" <<CONF
daemon on;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
  client_body_temp_path $work/body;
  server {
    listen 127.0.0.1:$port;
    listen 127.0.0.1:$tls_port ssl;
    ssl_certificate $PWD/tests/data/server.pem;
    ssl_certificate_key $PWD/tests/data/server.key;
    location = / { return 200 "Hello, World!"; }
    location / { root $work/static; }
  }
}
CONF
taskset -c 0 "$nginx" -c "$work/nginx.conf" -e "$work/error.log"
sleep 0.5
http=http://127.0.0.1:$port https=https://127.0.0.1:$tls_port
ca=$PWD/tests/data/ca.pem

rate() { sed -n 's/.*rate=\([0-9]*\).*/\1/p'; }
wrk_rate() { awk '/Requests\/sec/ { printf "%.0f", $2 }'; }
# Each case: a name and the command printing its rate; runs alternate between cases of a row.
declare -A results
row() { # name, commands...
  local name=$1; shift
  local i run
  for run in $(seq "$RUNS"); do
    i=0
    for cmd in "$@"; do
      results[$name,$i]+="$(eval "$cmd") "
      i=$((i + 1))
    done
  done
}
median() { tr ' ' '\n' | grep . | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
range() { tr ' ' '\n' | grep . | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { print lo "-" hi }'; }
report() { # name, label a, label b
  local a b
  a=$(echo "${results[$1,0]}" | median) b=$(echo "${results[$1,1]}" | median)
  printf "%-34s %-8s %8s/s (%s)   %-8s %8s/s (%s)   ratio %s\n" "$1" "$2" "$a" "$(echo "${results[$1,0]}" | range)" \
    "$3" "$b" "$(echo "${results[$1,1]}" | range)" "$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", a / b }')"
}
luna_get() { taskset -c 1 "$host" benches/http/client_get.lua "$@" | rate; }
row "sequential 13 B keep-alive" "luna_get $http/ $N" "taskset -c 1 $ureq $http/ $N | rate"
row "sequential 64 KiB keep-alive" "luna_get $http/64k.bin $((N / 4))" "taskset -c 1 $ureq $http/64k.bin $((N / 4)) | rate"
row "50 concurrent 13 B" "luna_get $http/ $((N * 2)) 50" "taskset -c 1 wrk -t1 -c50 -d${DURATION}s $http/ | wrk_rate"
row "sequential 13 B, pool vs close" "luna_get $http/ $((N / 4))" "luna_get $http/ $((N / 4)) 1 close"
row "https sequential 13 B keep-alive" "luna_get $https/ $((N / 2)) 1 keep $ca" "taskset -c 1 $ureq $https/ $((N / 2)) $ca | rate"
row "https sequential 13 B, pool vs close" "luna_get $https/ $((N / 4)) 1 keep $ca" "luna_get $https/ $((N / 20)) 1 close $ca"
echo "medians of $RUNS runs (range); ratio = first / second"
report "sequential 13 B keep-alive" luna ureq
report "sequential 64 KiB keep-alive" luna ureq
report "50 concurrent 13 B" luna wrk
report "sequential 13 B, pool vs close" pool close
report "https sequential 13 B keep-alive" luna ureq
report "https sequential 13 B, pool vs close" pool close
