#!/usr/bin/env bash
# agentgateway's published protocol, rollgate and HAProxy side by side: what each adds over
# direct at a fixed rate with 1 KiB OpenAI chat-completion bodies.
#   benches/openai_peers.sh [ROLLGATE_BIN]
# Not part of CI. Loopback only; every process started here is stopped on exit.
#
# Layout (2 cores): the proxies pinned to core 0 (PROXY_CPU), both started once and measured
# one after the other, never loaded together; one upstream, `rollgate mock-model --latency
# 0ms`, and the load generator on core 1 (LOAD_CPU).
#   rollgate: one version, route `split: {a: 100}`, evaluator and telemetry on (defaults).
#   HAProxy:  nbthread 1, http-keep-alive, http-reuse safe (../shared/bench/peers/conf).
# Per rate (RATES, default "1000 3000") and round (ROUNDS, default 3), rows interleaved
# direct, rollgate, haproxy: `oha -q RATE -z DURATION -c CONNS --latency-correction` (open
# loop: latency from each request's scheduled send time), POST /v1/chat/completions with a
# 1 KiB JSON body. Printed per row: req/s, success rate, p50 and p99 in µs, and the proxy's
# CPU (utime+stime from /proc over the row) per request. "Added" = the row minus the same
# round's direct row; compare medians over rounds.
#
# Knobs: RATES="1000 3000" ROUNDS=3 DURATION=10 CONNS=32 PROXY_CPU=0 LOAD_CPU=1.
# Needs oha (~/.cargo/bin/oha) and haproxy (../shared/bench/peers/setup.sh installs both).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$root/target/release/rollgate}
RATES=${RATES:-1000 3000}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
oha=$(command -v oha || echo "$HOME/.cargo/bin/oha")
[ -x "$bin" ] || { echo "no rollgate binary at $bin (cargo build --release)" >&2; exit 2; }
[ -x "$oha" ] || { echo "oha not found (../shared/bench/peers/setup.sh)" >&2; exit 2; }
command -v haproxy >/dev/null || { echo "haproxy not found (../shared/bench/peers/setup.sh)" >&2; exit 2; }

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1 after 10 s" >&2; exit 1
}
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

python3 - > "$tmp/body.json" <<'PY'
import json
body = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": ""}]}
pad = 1024 - len(json.dumps(body))
body["messages"][0]["content"] = "x" * pad
print(json.dumps(body), end="")
PY

up=$(free_port); rg=$(free_port); admin=$(free_port); hp=$(free_port)
taskset -c "$LOAD_CPU" "$bin" mock-model --listen "127.0.0.1:$up" --name a --latency 0ms \
  > "$tmp/mock.log" 2>&1 & pids+=($!)
cat > "$tmp/rollgate.yaml" <<YAML
listen: 127.0.0.1:$rg
admin: {listen: 127.0.0.1:$admin}
state_dir: $tmp/state
versions:
  a: {endpoints: [http://127.0.0.1:$up]}
routes:
  - {name: r, match: {path_prefix: /}, baseline: a, split: {a: 100}}
YAML
cat > "$tmp/haproxy.cfg" <<CFG
global
  nbthread 1
defaults
  mode http
  timeout client 30s
  timeout server 30s
  timeout connect 5s
  option http-keep-alive
  http-reuse safe
frontend f
  bind 127.0.0.1:$hp
  default_backend b
backend b
  server a 127.0.0.1:$up
CFG
taskset -c "$PROXY_CPU" "$bin" run --workers 1 -c "$tmp/rollgate.yaml" > "$tmp/rollgate.log" 2>&1 & rg_pid=$!
pids+=("$rg_pid")
taskset -c "$PROXY_CPU" haproxy -f "$tmp/haproxy.cfg" > "$tmp/haproxy.log" 2>&1 & hp_pid=$!
pids+=("$hp_pid")
wait_port "$up"; wait_port "$rg"; wait_port "$hp"

load() { # port rate seconds
  taskset -c "$LOAD_CPU" "$oha" --no-tui -q "$2" -z "${3}s" -c "$CONNS" --latency-correction \
    -m POST -T application/json -D "$tmp/body.json" "http://127.0.0.1:$1/v1/chat/completions"
}
row() { # name port rate pid|-
  local t0=0 t1=0 out
  [ "$4" = - ] || t0=$(ticks "$4")
  out=$(load "$2" "$3" "$DURATION")
  [ "$4" = - ] || t1=$(ticks "$4")
  echo "$out" | awk -v name="$1" -v rate="$3" -v cpu=$((t1 - t0)) -v secs="$DURATION" \
    -v hz="$(getconf CLK_TCK)" '
    /Success rate/ {ok=$3} /Requests\/sec/ {rps=$2}
    function us(v, unit) { return unit ~ /^s/ ? v * 1e6 : unit == "ms" ? v * 1e3 : v }
    /50.00% in/ {p50=us($3, $4)} /99.00% in/ {p99=us($3, $4)}
    END {
      per = (name == "direct") ? "-" : sprintf("%.0f", cpu / hz * 1e6 / (rps * secs))
      printf "| %s | %d | %.0f | %s | %.0f | %.0f | %s |\n", name, rate, rps, ok, p50, p99, per
    }'
}

echo "# benches/openai_peers.sh: $(date -u '+%F %T') UTC, $(nproc) CPUs, rollgate $bin"
echo "# $(haproxy -v | head -1)"
echo
echo "| row | rate | req/s | success | p50 µs | p99 µs | proxy CPU µs/request |"
echo "|---|---:|---:|---|---:|---:|---:|"
for rate in $RATES; do
  for port in "$up" "$rg" "$hp"; do load "$port" "$rate" 2 > /dev/null; done
  for _ in $(seq "$ROUNDS"); do
    row direct "$up" "$rate" -
    row rollgate "$rg" "$rate" "$rg_pid"
    row haproxy "$hp" "$rate" "$hp_pid"
  done
done
