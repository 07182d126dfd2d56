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
. "$root/benches/bench_config.sh"
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
# The harness's fixed ports: the upstream (18001, 18002) and HAProxy's frontends (18201
# HTTP/1.1, 18203 h2c). A harness run beside this one would share them: refuse.
for port in 18001 18002 18201 18203; do
  ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null \
    || { echo "paced_cpu.sh: 127.0.0.1:$port is in use (a harness run?)" >&2; exit 2; }
done
mkdir -p "$tmp/up/tmp"
taskset -c 1 nginx -p "$tmp/up/" -c "$harness/conf/upstream-nginx.conf" -e "$tmp/up.err" >"$tmp/up.log" 2>&1 & pids+=($!)
for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:18001/ && break; sleep 0.05; done
curl -sf -o /dev/null http://127.0.0.1:18001/ || { cat "$tmp/up.err" "$tmp/up.log" >&2; echo "paced_cpu.sh: the nginx upstream did not start" >&2; exit 1; }
# utime + stime of the whole process (exited threads included), fields 14 and 15 of
# /proc/PID/stat counted after the command name, which may hold spaces.
ticks() { local st; st=$(</proc/"$1"/stat); awk '{print $12 + $13}' <<<"${st##*) }"; }
hz=$(getconf CLK_TCK)
lines=$tmp/lines
{
  echo "# benches/paced_cpu.sh $(date -u +%FT%TZ), repository at $(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# oha -q $rate -z ${secs}s -c 64 --latency-correction; rounds $rounds; protocols $protos"
  for t in "${targets[@]}"; do
    [ "$t" = haproxy ] && echo "# haproxy: $(haproxy -v 2>&1 | sed -n 1p)" || echo "# $t: sha256 $(sha256sum "$t" | cut -c1-16)"
  done
  echo "# round, protocol, target, CPU µs per answer, answers, p99 (tab-separated)"
} | tee "$lines"
# run TARGET PROTO ROUND: one line of the table above
run() {
  local target=$1 proto=$2 round=$3 p url name
  if [ "$target" = haproxy ]; then
    taskset -c 0 haproxy -db -f "$harness/conf/haproxy.cfg" >"$tmp/proxy.log" 2>&1 & p=$!
    url=http://127.0.0.1:18201/; [ "$proto" = h2c ] && url=http://127.0.0.1:18203/
    name=haproxy
  else
    local data admin; data=$(port); admin=$(port); rm -rf "$tmp/state"
    bench_config "$data" "$admin" "$tmp/state" > "$tmp/rg.yaml"
    taskset -c 0 "$target" run -c "$tmp/rg.yaml" >"$tmp/proxy.log" 2>&1 & p=$!
    url=http://127.0.0.1:$data/; name=$target
  fi
  pids+=("$p")
  local ready=0
  local probe=${url/18203/18201} # HAProxy's h2c frontend speaks h2 only; its HTTP/1.1 one is up with it
  for _ in $(seq 1 400); do curl -sf -o /dev/null "$probe" && { ready=1; break; }; sleep 0.05; done
  [ "$ready" = 1 ] || { cat "$tmp/proxy.log" >&2; echo "paced_cpu.sh: $name does not answer on $url" >&2; exit 1; }
  local flags=(--no-tui -c 64); [ "$proto" = h2c ] && flags+=(--http2)
  taskset -c 1 "$oha" "${flags[@]}" -z 1s "$url" >/dev/null 2>&1
  local t0 t1 out n p99 want=$((rate * secs * 99 / 100))
  t0=$(ticks "$p")
  out=$(taskset -c 1 "$oha" "${flags[@]}" -z "${secs}s" -q "$rate" --latency-correction "$url" 2>&1) \
    || { echo "$out" >&2; echo "paced_cpu.sh: oha failed against $name" >&2; exit 1; }
  t1=$(ticks "$p")
  kill "$p"; wait "$p" 2>/dev/null || true
  pids=("${pids[@]:0:${#pids[@]}-1}")
  n=$(awk '/\[200\] .* responses/ {print $2}' <<<"$out")
  p99=$(awk '/99.00% in/ {print $3 $4}' <<<"$out")
  # Every answer a 200, and the rate held: otherwise the CPU is not that of RATE req/s.
  local codes; codes=$(sed -n '/Status code distribution/,/^$/p' <<<"$out" | grep -c '\[') || true
  [ "$codes" = 1 ] || { echo "$out" >&2; echo "paced_cpu.sh: answers other than 200 from $name" >&2; exit 1; }
  [ -n "$n" ] && [ "$n" -ge "$want" ] \
    || { echo "$out" >&2; echo "paced_cpu.sh: $name answered ${n:-0} times, fewer than $want" >&2; exit 1; }
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$proto" "$name" \
    "$(python3 -c "print(round(($t1-$t0)*1e6/$hz/$n, 2))")" "$n" "$p99" | tee -a "$lines"
}
# The order of the targets rotates from round to round, so none always runs first.
count=${#targets[@]}
for r in $(seq 1 "$rounds"); do for proto in $protos; do for i in $(seq 0 $((count - 1))); do
  run "${targets[$(((i + r - 1) % count))]}" "$proto" "$r"
done; done; done
[ -n "${OUT:-}" ] && cp "$lines" "$OUT"
python3 - "$lines" <<'PY'
import sys, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if not l.startswith("#")]
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
