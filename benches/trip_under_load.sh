#!/usr/bin/env bash
# Trip-to-swap while serving at full load: rollgate pinned to core 0 (evaluator on, 95/5
# split over two `rollgate mock-model` upstreams), wrk -c64 saturating it from core 1, and
# DRILLS rollback drills in a row (`rollgate drill`: inject a 50 % error fault on the canary,
# wait for the automatic rollback, restore). Prints each drill's trip-to-swap (from its audit
# record) and p50 / p99 / max, plus wrk's totals. Loopback only; stops everything it started.
#
#   benches/trip_under_load.sh            # DRILLS=20
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${ROLLGATE_BIN:-$root/target/release/rollgate}
[ -x "$bin" ] || cargo build --release --manifest-path "$root/Cargo.toml"
command -v wrk >/dev/null || { echo "trip_under_load: needs wrk (apt-get install wrk)" >&2; exit 2; }
drills=${DRILLS:-20}
tmp=$(mktemp -d)
[ -n "${KEEP:-}" ] && echo "keeping $tmp"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$tmp"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
a=$(port); b=$(port); data=$(port); admin=$(port)
taskset -c 1 "$bin" mock-model --listen "127.0.0.1:$a" --name a >/dev/null 2>&1 & pids+=($!)
taskset -c 1 "$bin" mock-model --listen "127.0.0.1:$b" --name b >/dev/null 2>&1 & pids+=($!)
wait_port "$a"; wait_port "$b"
cat > "$tmp/rollgate.yaml" <<YAML
listen: 127.0.0.1:$data
admin: {listen: 127.0.0.1:$admin}
state_dir: $tmp/state
versions:
  a: {endpoints: [http://127.0.0.1:$a]}
  b: {endpoints: [http://127.0.0.1:$b]}
routes:
  - {name: chat, owner: bench, match: {path_prefix: /}, baseline: a, split: {a: 95, b: 5}}
YAML
taskset -c 0 "$bin" run -c "$tmp/rollgate.yaml" >"$tmp/rollgate.log" 2>&1 & pids+=($!)
wait_port "$data"
taskset -c 1 wrk -t1 -c64 -d$((drills * 10 + 30))s "http://127.0.0.1:$data/v1/models" >"$tmp/wrk.out" 2>&1 & wrk=$!
pids+=($wrk)
sleep 3 # wrk at full rate before the first drill
for i in $(seq 1 "$drills"); do
  "$bin" drill --version b --fault error=0.5 --timeout 20s --admin "http://127.0.0.1:$admin" --json \
    > "$tmp/drill-$i.json" || { echo "drill $i failed:"; cat "$tmp/drill-$i.json"; exit 1; }
done
kill -INT "$wrk" 2>/dev/null || true; wait "$wrk" 2>/dev/null || true
python3 - "$tmp" "$drills" <<'PY'
import json, sys, re
tmp, n = sys.argv[1], int(sys.argv[2])
us = sorted(json.load(open(f"{tmp}/drill-{i}.json"))["trip_to_swap_us"] for i in range(1, n + 1))
pct = lambda p: us[min(len(us) - 1, round((len(us) - 1) * p))]
print("trip-to-swap under full load, %d drills (µs): %s" % (n, " ".join(map(str, us))))
print("p50 %d µs, p99 %d µs, max %d µs" % (pct(0.5), pct(0.99), us[-1]))
wrk = open(f"{tmp}/wrk.out").read()
m = re.search(r"Requests/sec:\s+([\d.]+)", wrk)
print("load meanwhile: wrk -c64, %s req/s; %s" % (m.group(1) if m else "?",
      (re.search(r"Non-2xx or 3xx responses: \d+", wrk) or ["no non-2xx responses"])[0]))
PY
