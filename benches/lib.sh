# Shell helpers shared by the benchmark scripts (sourced, not run).

# Stops the server started in the background whose pid is in $server_pid.
server_pid=
stop_server() {
  [ -n "$server_pid" ] || return 0
  kill "$server_pid" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
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
