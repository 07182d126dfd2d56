#!/usr/bin/env bash
# CPU per request at a fixed rate, rollgate builds and HAProxy side by side, interleaved.
#   benches/paced_cpu.sh BIN|haproxy ...        # e.g. target/release/rollgate target/pgo/rollgate haproxy
# For each round (ROUNDS, default 4), each protocol (PROTOS, default "h1 h2c") and each
# target in turn: the target on core 0 (rollgate with the config of cpu_per_request.sh,
# HAProxy with ../shared/bench/peers/conf/haproxy.cfg), the harness's nginx upstream and
# the load generator on core 1; a 1 s warm-up, then `oha -q RATE -z SECS -c 64
# --latency-correction` (`--http2` for h2c); the CPU the target's whole process used
# (utime + stime of every thread, from /proc) over the run, divided by the answers.
# Prints one line per run and, at the end, each target's ratio to HAProxy per round.
#   RATE=5000 SECS=8 ROUNDS=4 PROTOS="h1 h2c" OUT=FILE (a copy of the lines)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
harness=${HARNESS:-$root/../shared/bench/peers}
rate=${RATE:-5000}; secs=${SECS:-8}; rounds=${ROUNDS:-4}; protos=${PROTOS:-h1 h2c}
oha=$(command -v oha || echo "$HOME/.cargo/bin/oha")
[ -x "$oha" ] || { echo "paced_cpu.sh: oha not found ($harness/setup.sh)" >&2; exit 2; }
[ $# -gt 0 ] || { echo "usage: benches/paced_cpu.sh BIN|haproxy ..." >&2; exit 2; }
targets=()
for t in "$@"; do
  if [ "$t" = haproxy ]; then targets+=(haproxy); else
    [ -x "$t" ] || { echo "paced_cpu.sh: $t is not an executable" >&2; exit 2; }
    targets+=("$(realpath "$t")")
  fi
done
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
tmp=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
mkdir -p "$tmp/up/tmp"
taskset -c 1 nginx -p "$tmp/up/" -c "$harness/conf/upstream-nginx.conf" -e "$tmp/up.err" >/dev/null 2>&1 & pids+=($!)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { awk '{t += $14 + $15} END {print t}' /proc/"$1"/task/*/stat; }
hz=$(getconf CLK_TCK)
lines=$tmp/lines
# run TARGET PROTO ROUND: one line "ROUND PROTO NAME µs_per_request requests p99_ms"
run() {
  local target=$1 proto=$2 round=$3 p url name
  if [ "$target" = haproxy ]; then
    taskset -c 0 haproxy -db -f "$harness/conf/haproxy.cfg" >"$tmp/proxy.log" 2>&1 & p=$!
    url=http://127.0.0.1:18201/; name=haproxy
  else
    local data admin; data=$(port); admin=$(port); rm -rf "$tmp/state"
    cat > "$tmp/rg.yaml" <<YAML
listen: 127.0.0.1:$data
admin: {listen: 127.0.0.1:$admin}
state_dir: $tmp/state
versions:
  a: {endpoints: [http://127.0.0.1:18001]}
  b: {endpoints: [http://127.0.0.1:18002]}
routes:
  - {name: bench, match: {path_prefix: /}, baseline: a, split: {a: 95, b: 5}}
YAML
    taskset -c 0 "$target" run -c "$tmp/rg.yaml" >"$tmp/proxy.log" 2>&1 & p=$!
    url=http://127.0.0.1:$data/; name=$target
  fi
  for _ in $(seq 1 400); do curl -s -o /dev/null "$url" && break; sleep 0.05; done
  local flags=(--no-tui -c 64); [ "$proto" = h2c ] && flags+=(--http2)
  taskset -c 1 "$oha" "${flags[@]}" -z 1s "$url" >/dev/null 2>&1
  local t0 t1 out n p99
  t0=$(ticks "$p")
  out=$(taskset -c 1 "$oha" "${flags[@]}" -z "${secs}s" -q "$rate" --latency-correction "$url" 2>&1)
  t1=$(ticks "$p")
  kill "$p"; wait "$p" 2>/dev/null || true
  n=$(awk '/\[200\] .* responses/ {print $2}' <<<"$out")
  p99=$(awk '/99.00% in/ {print $3 $4}' <<<"$out")
  [ -n "$n" ] && [ "$n" -gt 0 ] || { echo "$out" >&2; echo "paced_cpu.sh: no 200 answers from $name" >&2; exit 1; }
  echo "$round $proto $name $(python3 -c "print(round(($t1-$t0)*1e6/$hz/$n, 2))") $n $p99" | tee -a "$lines"
}
echo "# round proto target cpu_us_per_request answers p99_ms (oha -q $rate -z ${secs}s -c 64)"
for r in $(seq 1 "$rounds"); do for proto in $protos; do for t in "${targets[@]}"; do
  run "$t" "$proto" "$r"
done; done; done
[ -n "${OUT:-}" ] && cp "$lines" "$OUT"
python3 - "$lines" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
cpu = {(r, p, t): float(c) for r, p, t, c, *_ in rows}
hap = {(r, p): c for (r, p, t), c in cpu.items() if t == "haproxy"}
if not hap:
    sys.exit(0)
for proto in sorted({p for _, p, _ in cpu}):
    for target in sorted({t for _, _, t in cpu} - {"haproxy"}):
        ratios = [cpu[(r, p, t)] / hap[(r, p)] for (r, p, t) in cpu
                  if p == proto and t == target and (r, p) in hap]
        print(f"{proto} {target}: to HAProxy per round " + ", ".join(f"{x:.2f}" for x in ratios)
              + f"; median {statistics.median(ratios):.3f}")
PY
