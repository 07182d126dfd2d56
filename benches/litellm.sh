#!/usr/bin/env bash
# rollgate vs LiteLLM's proxy for a weighted split across two deployments of one model.
#   benches/litellm.sh [ROLLGATE_BIN]
# Not part of CI. Loopback only; every process started here is stopped on exit.
#
# Layout (2 cores): the proxy under test pinned to core 0 (PROXY_CPU); the two mock OpenAI
# upstreams (`rollgate mock-model --name a|b`) and the load generator on core 1 (LOAD_CPU).
# The proxies run one after the other, never together.
#   LiteLLM: `litellm --config <tmp> --host 127.0.0.1 --num_workers 1`, model_list with two
#            deployments of model_name `chat` (openai/a -> mock a, openai/b -> mock b),
#            weight 95/5, routing_strategy simple-shuffle, offline (no cost map fetch etc.).
#   rollgate: versions a/b, one route `split: {a: 95, b: 5}`, evaluator on (the default).
# Per proxy, with the same 1 KiB `POST /v1/chat/completions` body:
#   warm-up      WARMUP s closed loop, 16 connections (not reported)
#   closed loop  DURATION s, CONNS keep-alive connections: req/s, p50, p99
#   fixed rate   RATE req/s for DURATION s (open loop, latency from the scheduled send time):
#                p50, p99
#   CPU          utime+stime(+cutime+cstime) from /proc, summed over the proxy's process tree,
#                over each measured run / responses in that run
#   split        SPLIT_N sequential requests, counted by the version the mock says served it
#                (`x-mock-version`, or LiteLLM's `llm_provider-x-mock-version`, or `model`)
# Load generator: oha (~/.cargo/bin/oha, from ../shared/bench/peers/setup.sh); h2load --h1 if
# oha is absent (then the fixed-rate run opens one connection per request: h2load has no
# request-rate mode on kept-alive connections).
#
# Knobs: LITELLM_VENV (default ~/.cache/rollgate-litellm), LITELLM_VERSION (default 1.106.2,
# see below), DURATION=10 WARMUP=3 CONNS=16 RATE=30 SPLIT_N=400 PROXY_CPU=0 LOAD_CPU=1,
# TARGETS="litellm rollgate", LITELLM_READY_SECS=180, LOADGEN=auto|h2load.
#
# LITELLM_VERSION: the default is pinned on purpose. LiteLLM's PyPI releases 1.82.7/1.82.8
# (2026-03) and 1.107.0 (2026-10-21) were compromised (credential stealers run at Python
# start); LiteLLM's own notice of the second asks users to pin 1.106.2. The install refuses
# those versions and checks the venv for the implant files those notices name.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$root/target/release/rollgate}
VENV=${LITELLM_VENV:-$HOME/.cache/rollgate-litellm}
LITELLM_VERSION=${LITELLM_VERSION:-1.106.2}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
CONNS=${CONNS:-16}
RATE=${RATE:-30}
SPLIT_N=${SPLIT_N:-400}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
TARGETS=${TARGETS:-"litellm rollgate"}
LITELLM_READY_SECS=${LITELLM_READY_SECS:-180}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ -x "$bin" ] || die "no rollgate binary at $bin (cargo build --release)"
for t in taskset curl python3; do command -v "$t" >/dev/null || die "$t not found"; done

# ------------------------------------------------------------------ load generator
OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")
[ -x "$OHA" ] || OHA=""
[ "${LOADGEN:-auto}" = h2load ] && OHA=""
if [ -z "$OHA" ]; then
  command -v h2load >/dev/null || die "neither oha nor h2load found (../shared/bench/peers/setup.sh)"
  log "oha not found: using h2load --h1"
fi

# ------------------------------------------------------------------ LiteLLM install
case $LITELLM_VERSION in
  1.82.7 | 1.82.8 | 1.107.0) die "litellm $LITELLM_VERSION is a compromised release; pick another" ;;
esac
check_venv() { # the implant files named in LiteLLM's security notices
  local sp bad
  sp=$("$VENV/bin/python" -I -S -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
  bad=$(find "$sp" -maxdepth 2 \( -name litellm_init.pth -o -name cook.pth -o -name cook.py \
        -o -name sitecustomize.py -o -name 'litellm-1.107.0.dist-info' -o -name 'litellm-1.82.[78].dist-info' \) 2>/dev/null)
  [ -z "$bad" ] || die "suspicious files in $VENV: $bad (delete the venv; do not run it)"
}
installed_version() { # from the dist-info name: runs no Python in the venv before check_venv
  find "$VENV"/lib/python*/site-packages -maxdepth 1 -name 'litellm-*.dist-info' 2>/dev/null \
    | sed -n 's|.*/litellm-\(.*\)\.dist-info$|\1|p' | head -1
}
[ -x "$VENV/bin/python" ] && check_venv
if [ ! -x "$VENV/bin/litellm" ] || [ "$(installed_version)" != "$LITELLM_VERSION" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    if ! python3 -m venv "$VENV" 2>/dev/null; then
      log "python3 -m venv failed (no ensurepip?): installing python3-venv"
      rm -rf "$VENV"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$VENV"
    fi
  fi
  log "installing litellm[proxy]==$LITELLM_VERSION into $VENV"
  "$VENV/bin/pip" install -q "litellm[proxy]==$LITELLM_VERSION" >&2
fi
check_venv
LITELLM_VER=$(installed_version)
[ "$LITELLM_VER" = "$LITELLM_VERSION" ] || die "litellm $LITELLM_VER installed, wanted $LITELLM_VERSION"

# ------------------------------------------------------------------ processes
tmp=$(mktemp -d /tmp/rollgate-litellm.XXXXXX)
pids=()
stop_tree() { # TERM a process and its descendants, KILL what is left after 5 s
  local p=$1 all k
  kill -0 "$p" 2>/dev/null || return 0
  all="$p $(tree_pids "$p")"
  kill -TERM $all 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  for k in $all; do kill -0 "$k" 2>/dev/null && kill -KILL "$k" 2>/dev/null; done
  wait "$p" 2>/dev/null || true
}
cleanup() {
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_tree "${pids[$i]}"; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

tree_pids() { # all descendants of $1
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$c"; tree_pids "$c"; done
}
cpu_ticks() { # utime+stime+cutime+cstime over the live process tree of $1
  local p s=0 f
  for p in "$1" $(tree_pids "$1"); do
    f=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    f=${f##*) }  # fields from 3 on (the command name may hold spaces)
    s=$((s + $(echo "$f" | awk '{print $12 + $13 + $14 + $15}')))
  done
  echo "$s"
}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # wait_http URL SECS PID
  local i
  for i in $(seq $(($2 * 10))); do
    curl -sf -o /dev/null --max-time 2 "$1" && return 0
    kill -0 "$3" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

port_a=$(port); port_b=$(port)
# LiteLLM refuses to start without a master key (and then checks it on every request): a
# random one per run, sent as `Authorization: Bearer` to both proxies (rollgate forwards it).
MASTER_KEY=sk-bench-$(python3 -c 'import secrets; print(secrets.token_hex(16))')
AUTH="authorization: Bearer $MASTER_KEY"
for v in a b; do
  p=port_$v
  taskset -c "$LOAD_CPU" "$bin" mock-model --listen "127.0.0.1:${!p}" --name "$v" >"$tmp/mock-$v.log" 2>&1 &
  pids+=($!)
done
for v in a b; do
  p=port_$v
  wait_http "http://127.0.0.1:${!p}/v1/models" 20 "${pids[-1]}" || die "mock $v did not start: $(tail -5 "$tmp/mock-$v.log")"
done

# ~1 KiB chat-completions body
python3 - "$tmp/body.json" <<'PY'
import json, sys
msg = {"model": "chat", "max_tokens": 16, "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": ""}]}
base = len(json.dumps(msg, separators=(",", ":")))
msg["messages"][1]["content"] = ("Summarise the weather report for the week. " * 30)[:1024 - base]
body = json.dumps(msg, separators=(",", ":"))
assert len(body) == 1024, len(body)
open(sys.argv[1], "w").write(body)
PY

# ------------------------------------------------------------------ load runs
# run_load NAME URL MODE(closed|rate|warm) SECS -> writes $tmp/NAME.json (oha) or .log (h2load)
run_load() {
  local name=$1 url=$2 mode=$3 secs=$4 args=()
  if [ -n "$OHA" ]; then
    args=(-z "${secs}s" -m POST -D "$tmp/body.json" -H 'content-type: application/json' -H "$AUTH" --no-tui)
    case $mode in
      closed | warm) args+=(-c "$CONNS" -w) ;;
      rate) args+=(-c "$CONNS" -q "$RATE" --latency-correction -w) ;;
    esac
    if "$OHA" --help | grep -q -- '--output-format'; then args+=(--output-format json); else args+=(-j); fi
    taskset -c "$LOAD_CPU" "$OHA" "${args[@]}" "$url" >"$tmp/$name.json" 2>"$tmp/$name.err" || true
  else
    args=(--h1 -H 'content-type: application/json' -H "$AUTH" -d "$tmp/body.json" --log-file "$tmp/$name.log")
    case $mode in
      closed | warm) args+=(-c "$CONNS" -D "$secs") ;;
      rate) args+=(-c $((RATE * secs)) -n $((RATE * secs)) --rate "$RATE" --rate-period 1s) ;;
    esac
    taskset -c "$LOAD_CPU" h2load "${args[@]}" "$url" >"$tmp/$name.out" 2>&1 || true
  fi
}
# summary NAME -> "requests ok rps p50ms p99ms"
summary() {
  python3 - "$tmp" "$1" "${OHA:+oha}" <<'PY'
import json, os, sys
tmp, name, tool = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""
if tool == "oha":
    d = json.load(open(os.path.join(tmp, name + ".json")))
    s, p = d["summary"], d["latencyPercentiles"]
    codes = d.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    n = sum(codes.values()) + sum(d.get("errorDistribution", {}).values())
    rps = ok / s["total"] if s.get("total") else 0.0
    p50, p99 = (p.get("p50") or 0) * 1e3, (p.get("p99") or 0) * 1e3
else:  # h2load --log-file: start_us, status, duration_us
    rows = [l.split("\t") for l in open(os.path.join(tmp, name + ".log")) if l.strip()]
    lat = sorted(int(r[2]) / 1e3 for r in rows if r[1].startswith("2"))
    n, ok = len(rows), len(lat)
    starts = [int(r[0]) for r in rows]
    span = (max(int(r[0]) + int(r[2]) for r in rows) - min(starts)) / 1e6 if rows else 0
    rps = ok / span if span else 0.0
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] if lat else 0.0
    p50, p99 = q(0.50), q(0.99)
print(n, ok, f"{rps:.1f}", f"{p50:.2f}", f"{p99:.2f}")
PY
}
# measure TARGET URL PID: warm-up, closed loop, fixed rate, split sample -> $tmp/TARGET.row
measure() {
  local t=$1 url=$2 pid=$3 c0 c1 r0 r1 closed rate split hz
  hz=$(getconf CLK_TCK)
  log "$t: warm-up ${WARMUP}s"
  run_load "$t-warm" "$url" warm "$WARMUP"
  log "$t: closed loop, $CONNS connections, ${DURATION}s"
  c0=$(cpu_ticks "$pid"); run_load "$t-closed" "$url" closed "$DURATION"; c1=$(cpu_ticks "$pid")
  closed=$(summary "$t-closed")
  log "$t: fixed rate $RATE req/s, ${DURATION}s"
  r0=$(cpu_ticks "$pid"); run_load "$t-rate" "$url" rate "$DURATION"; r1=$(cpu_ticks "$pid")
  rate=$(summary "$t-rate")
  log "$t: split sample, $SPLIT_N requests"
  split=$(taskset -c "$LOAD_CPU" python3 - "$url" "$tmp/body.json" "$SPLIT_N" "$MASTER_KEY" <<'PY'
import http.client, json, sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1]); body = open(sys.argv[2], "rb").read(); n = int(sys.argv[3])
hdrs = {"content-type": "application/json", "authorization": "Bearer " + sys.argv[4]}
c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
seen = {}
for _ in range(n):
    c.request("POST", u.path, body, hdrs)
    r = c.getresponse(); data = r.read()
    v = r.getheader("x-mock-version") or r.getheader("llm_provider-x-mock-version")
    if v is None:
        try: v = json.loads(data).get("model")
        except Exception: v = None
    v = v if r.status == 200 else f"http {r.status}"
    seen[v] = seen.get(v, 0) + 1
print(json.dumps(seen, sort_keys=True))
PY
)
  echo "$t|$closed|$rate|$c0 $c1 $r0 $r1 $hz|$split" >"$tmp/$t.row"
  log "$t: closed [$closed] rate [$rate] cpu ticks [$c0 $c1 $r0 $r1] split $split"
}

loadavg0=$(cut -d' ' -f1-3 /proc/loadavg)

for t in $TARGETS; do
  case $t in
    litellm)
      lport=$(port)
      cat >"$tmp/litellm.yaml" <<YAML
model_list:
  - model_name: chat
    litellm_params: {model: openai/a, api_base: "http://127.0.0.1:$port_a/v1", api_key: sk-dummy, weight: 95}
  - model_name: chat
    litellm_params: {model: openai/b, api_base: "http://127.0.0.1:$port_b/v1", api_key: sk-dummy, weight: 5}
router_settings:
  routing_strategy: simple-shuffle
litellm_settings:
  telemetry: False
general_settings:
  master_key: $MASTER_KEY
YAML
      log "litellm $LITELLM_VER: starting on 127.0.0.1:$lport (core $PROXY_CPU, 1 worker)"
      (cd "$tmp" && exec env -u OPENAI_API_KEY LITELLM_OFFLINE_MODE=true LITELLM_LOCAL_MODEL_COST_MAP=True \
        LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS=True LITELLM_LOCAL_AUTOROUTER_PRESETS=True \
        LITELLM_LOCAL_BLOG_POSTS=True LITELLM_LOCAL_POLICY_TEMPLATES=True \
        DISABLE_SCHEMA_UPDATE=True LITELLM_LOG=ERROR \
        taskset -c "$PROXY_CPU" "$VENV/bin/litellm" --config "$tmp/litellm.yaml" \
        --host 127.0.0.1 --port "$lport" --num_workers 1) >"$tmp/litellm.log" 2>&1 &
      lpid=$!; pids+=($lpid)
      t0=$(date +%s)
      wait_http "http://127.0.0.1:$lport/health/liveliness" "$LITELLM_READY_SECS" "$lpid" \
        || die "litellm did not become ready in ${LITELLM_READY_SECS}s: $(tail -20 "$tmp/litellm.log")"
      log "litellm ready after $(($(date +%s) - t0)) s"
      measure litellm "http://127.0.0.1:$lport/v1/chat/completions" "$lpid"
      stop_tree "$lpid"
      ;;
    rollgate)
      rport=$(port); aport=$(port)
      mkdir -p "$tmp/state"
      cat >"$tmp/rollgate.yaml" <<YAML
listen: 127.0.0.1:$rport
admin: {listen: 127.0.0.1:$aport}
state_dir: $tmp/state
versions:
  a: {endpoints: [http://127.0.0.1:$port_a]}
  b: {endpoints: [http://127.0.0.1:$port_b]}
routes:
  - {name: chat, match: {path_prefix: /}, baseline: a, split: {a: 95, b: 5}}
YAML
      log "rollgate: starting on 127.0.0.1:$rport (core $PROXY_CPU)"
      taskset -c "$PROXY_CPU" "$bin" run -c "$tmp/rollgate.yaml" >"$tmp/rollgate.log" 2>&1 &
      rpid=$!; pids+=($rpid)
      wait_http "http://127.0.0.1:$aport/readyz" 20 "$rpid" || die "rollgate did not become ready: $(tail -20 "$tmp/rollgate.log")"
      measure rollgate "http://127.0.0.1:$rport/v1/chat/completions" "$rpid"
      stop_tree "$rpid"
      ;;
    *) die "unknown target $t" ;;
  esac
done

# ------------------------------------------------------------------ report
gen=${OHA:+oha $("$OHA" --version 2>/dev/null | awk '{print $2}')}
gen=${gen:-$(h2load --version | head -1)}
echo
echo "LiteLLM $LITELLM_VER (1 worker) vs $("$bin" --version) ($bin); $gen; load avg at start $loadavg0, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "closed loop: $CONNS connections, ${DURATION}s; fixed rate: $RATE req/s, ${DURATION}s; 1 KiB POST /v1/chat/completions; split 95/5 over mock-model a/b; split sample $SPLIT_N requests"
echo
echo "| proxy | req/s (closed loop, $CONNS conns) | p50 ms | p99 ms | CPU ms per request | p50 ms at $RATE req/s | p99 ms at $RATE req/s | CPU ms per request at $RATE req/s | failed (closed / rate) | share of b |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for t in $TARGETS; do
  IFS='|' read -r _ closed rate cpu split <"$tmp/$t.row"
  python3 - "$t" "$closed" "$rate" "$cpu" "$split" "$LITELLM_VER" <<'PY'
import json, sys
t, closed, rate, cpu, split, ver = sys.argv[1:7]
cn, cok, crps, cp50, cp99 = closed.split()
rn, rok, _, rp50, rp99 = rate.split()
c0, c1, r0, r1, hz = map(int, cpu.split())
def cpu_ms(ticks, n):  # /proc ticks are 10 ms: a run's total is +-1 tick
    if not int(n): return "-"
    v = ticks / hz * 1e3 / int(n)
    return f"{v:.3f}" if v < 1 else f"{v:.1f}"
seen = json.loads(split)
total = sum(seen.values())
b = seen.get("b", 0)
other = {k: v for k, v in seen.items() if k not in ("a", "b")}
share = f"{100 * b / total:.1f} % ({b}/{total})" + (f", other {other}" if other else "")
name = f"LiteLLM {ver}" if t == "litellm" else "**rollgate**"
fails = f"{int(cn) - int(cok)} / {int(rn) - int(rok)}"
print(f"| {name} | {float(crps):,.0f} | {cp50} | {cp99} | {cpu_ms(c1 - c0, cok)} | {rp50} | {rp99} | {cpu_ms(r1 - r0, rok)} | {fails} | {share} |")
PY
done
