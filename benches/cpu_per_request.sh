#!/usr/bin/env bash
# CPU cost per request of a rollgate binary, and instructions per request under callgrind.
#   benches/cpu_per_request.sh [BIN] [KEY=VALUE env for rollgate...]
# Starts the harness's nginx upstream (../shared/bench/peers/conf/upstream-nginx.conf) on
# core 1 and rollgate on core 0 (95/5 split over the two upstream ports, evaluator on), then:
#   cpu: wrk -t1 -c64 for 4 s from core 1; CPU µs per request = (utime+stime of rollgate,
#        from /proc) / requests. Robust to other load on the machine, unlike req/s.
#   Ir:  with CALLGRIND=1, rollgate under valgrind --tool=callgrind, 20,000 HTTP/1.1 requests
#        (h2load --h1 -c16) after a warm-up; instructions per request from the dump.
#   PROTO=h2c: the client speaks h2c instead (h2load -c16 -m4: 4 s for the CPU measure,
#        20,000 requests for Ir); the upstream stays HTTP/1.1. PROTO=h1 is the default.
set -euo pipefail
case ${PROTO:=h1} in h1|h2c) ;; *) echo "PROTO must be h1 or h2c, not '$PROTO'" >&2; exit 2;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/benches/bench_config.sh"
bin=${1:-$root/target/release/rollgate}; shift || true
conf=${HARNESS:-$root/../shared/bench/peers}/conf/upstream-nginx.conf
tmp=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
mkdir -p "$tmp/up/tmp" "$tmp/state"
taskset -c 1 nginx -p "$tmp/up/" -c "$conf" -e "$tmp/up.err" >/dev/null 2>&1 & pids+=($!)
data=$(port); admin=$(port)
bench_config "$data" "$admin" "$tmp/state" > "$tmp/rg.yaml"
ready() { for _ in $(seq 1 400); do curl -sf -o /dev/null "127.0.0.1:$admin/readyz" && return 0; sleep 0.05; done; return 1; }
env "$@" taskset -c 0 "$bin" run -c "$tmp/rg.yaml" >"$tmp/rg.log" 2>&1 & p=$!; pids+=($p)
ready
if [ "$PROTO" = h2c ]; then
  taskset -c 1 h2load -D 1 -c16 -m4 "http://127.0.0.1:$data/" >/dev/null
  t0=$(awk '{print $14+$15}' /proc/$p/stat)
  out=$(taskset -c 1 h2load -D 4 -c16 -m4 "http://127.0.0.1:$data/")
  t1=$(awk '{print $14+$15}' /proc/$p/stat)
  n=$(echo "$out" | awk '/^requests:/ {print $8}') # succeeded
  rate=$(echo "$out" | awk '/^finished in/ {print $4}')
  h2load_flags=(-m4)
else
  taskset -c 1 wrk -t1 -c64 -d1s "http://127.0.0.1:$data/" >/dev/null
  t0=$(awk '{print $14+$15}' /proc/$p/stat)
  out=$(taskset -c 1 wrk -t1 -c64 -d4s "http://127.0.0.1:$data/")
  t1=$(awk '{print $14+$15}' /proc/$p/stat)
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  rate=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  h2load_flags=(--h1)
fi
echo "cpu: $rate req/s, $(python3 -c "print(round(($t1-$t0)*1e6/$(getconf CLK_TCK)/$n,2))") µs CPU per request"
kill "$p"; wait "$p" 2>/dev/null || true
if [ "${CALLGRIND:-0}" = 1 ]; then
  env "$@" valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out" "$bin" run -c "$tmp/rg.yaml" >"$tmp/cg.log" 2>&1 & v=$!; pids+=($v)
  ready
  h2load "${h2load_flags[@]}" -n 1000 -c 16 "http://127.0.0.1:$data/" >/dev/null
  callgrind_control -z "$v" >/dev/null
  h2load "${h2load_flags[@]}" -n 20000 -c 16 "http://127.0.0.1:$data/" | grep -E "^requests:"
  callgrind_control -d "$v" >/dev/null
  total=$(callgrind_annotate "$tmp/cg.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}')
  echo "Ir: $((total / 20000)) instructions per request (user space, 20,000 $PROTO requests)"
fi
