#!/usr/bin/env bash
# A profile-guided (PGO) release build of rollgate, trained on loopback traffic.
#   benches/pgo.sh [OUT]       # OUT defaults to target/pgo/rollgate
# 1. builds rollgate with -Cprofile-generate (release profile, its own target dir);
# 2. runs it in front of two `rollgate mock-model` upstreams and sends it the traffic it
#    serves in production: HTTP/1.1 GETs and 1 KiB chat-completion POSTs (wrk, h2load
#    --h1), h2c (h2load -m4), SSE streams, the evaluator ticking, a config reload;
# 3. merges the profile (llvm-profdata of the toolchain's llvm-tools component) and builds
#    again with -Cprofile-use.
# Needs: wrk, h2load, curl (../shared/bench/peers/setup.sh installs them) and the rustup
# component llvm-tools (added when missing). Loopback only; about 15 minutes on 2 cores.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/target/pgo/rollgate}
work=$root/target/pgo
mkdir -p "$work"
sysroot=$(rustc --print sysroot)
host=$(rustc -vV | awk '/^host:/ {print $2}')
profdata=$sysroot/lib/rustlib/$host/bin/llvm-profdata
[ -x "$profdata" ] || rustup component add llvm-tools
for tool in wrk h2load curl; do
  command -v "$tool" >/dev/null || { echo "pgo.sh: $tool not found (../shared/bench/peers/setup.sh)" >&2; exit 2; }
done

raw=$work/raw; rm -rf "$raw"; mkdir -p "$raw"
log() { echo "pgo.sh: $*" >&2; }
log "1/3 instrumented build"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$raw" CARGO_TARGET_DIR=$work/gen \
  cargo build --release --locked --bin rollgate --manifest-path "$root/Cargo.toml"
gen=$work/gen/release/rollgate

log "2/3 training run"
tmp=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up_a=$(port); up_b=$(port); data=$(port); admin=$(port)
# The upstreams are the same binary; their profiles go elsewhere (only the proxy's is wanted).
for v in a b; do
  p=up_$v
  LLVM_PROFILE_FILE="$tmp/discard-%p.profraw" "$gen" mock-model --listen "127.0.0.1:${!p}" --name $v --chunks 20 --chunk-interval 1ms \
    >"$tmp/$v.log" 2>&1 & pids+=($!)
done
config() {
  cat <<YAML
listen: 127.0.0.1:$data
admin: {listen: 127.0.0.1:$admin}
state_dir: $tmp/state
versions:
  a: {endpoints: [http://127.0.0.1:$up_a]}
  b: {endpoints: [http://127.0.0.1:$up_b]}
routes:
  - name: sticky
    match: {path_prefix: /v1/completions}
    baseline: a
    split: {a: $1, b: $((100 - $1))}
    sticky: {header: x-user-id}
  - {name: chat, match: {path_prefix: /}, baseline: a, split: {a: $1, b: $((100 - $1))}}
YAML
}
config 95 >"$tmp/rg.yaml"
LLVM_PROFILE_FILE="$raw/rollgate-%p-%m.profraw" "$gen" run -c "$tmp/rg.yaml" >"$tmp/rg.log" 2>&1 & rg=$!; pids+=("$rg")
for _ in $(seq 1 400); do curl -sf -o /dev/null "127.0.0.1:$admin/readyz" && break; sleep 0.05; done
curl -sf -o /dev/null "127.0.0.1:$admin/readyz" || { cat "$tmp/rg.log" >&2; exit 1; }
body=$tmp/chat.json; stream=$tmp/stream.json
python3 - "$body" "$stream" <<'PY'
import json, sys
words = " ".join(["word"] * 170)  # about 1 KiB
chat = {"model": "m", "messages": [{"role": "user", "content": words}]}
json.dump(chat, open(sys.argv[1], "w"))
json.dump(dict(chat, stream=True), open(sys.argv[2], "w"))
PY
url=http://127.0.0.1:$data
json=(-H 'content-type: application/json')
# h2load N ARGS...: N requests, every one must succeed with a 2xx (a profile of error paths
# would optimise the wrong code).
load() {
  local n=$1; shift
  local out; out=$(h2load -n "$n" "$@")
  echo "$out" | grep -q "^status codes: $n 2xx" || { echo "$out" >&2; log "training load failed: h2load $*"; exit 1; }
  log "$(echo "$out" | grep -E '^finished in') ($*)"
}
wrk -t1 -c64 -d5s "$url/v1/models" | grep -E 'Requests/sec|Non-2xx' >&2
load 20000 --h1 -c16 -d "$body" "${json[@]}" "$url/v1/chat/completions"
load 30000 -c16 -m4 "$url/v1/models"
load 10000 -c16 -m4 -d "$body" "${json[@]}" "$url/v1/chat/completions"
load 2000 --h1 -c32 -d "$stream" "${json[@]}" "$url/v1/chat/completions"
load 10000 --h1 -c16 -d "$body" "${json[@]}" -H 'x-user-id: user-1' "$url/v1/completions"
config 80 >"$tmp/rg.yaml.new" && mv "$tmp/rg.yaml.new" "$tmp/rg.yaml"
curl -sf -X POST -H 'content-type: application/json' -o /dev/null "127.0.0.1:$admin/api/v1/reload" || { log "reload failed"; exit 1; }
load 10000 --h1 -c16 "$url/v1/models"
kill -TERM "$rg"; wait "$rg" 2>/dev/null || true

log "3/3 optimised build"
# Only the proxy's profile: with RUSTFLAGS the build scripts were instrumented too and left
# theirs in the same directory.
"$profdata" merge -o "$work/merged.profdata" "$raw"/rollgate-*.profraw
# Named by its content: cargo tracks RUSTFLAGS, not the file they point at, so a new
# profile under the same name would leave crates built with the old one.
prof=$work/rollgate-$(sha256sum "$work/merged.profdata" | cut -c1-16).profdata
rm -f "$work"/rollgate-*.profdata
mv "$work/merged.profdata" "$prof"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$prof" CARGO_TARGET_DIR=$work/use \
  cargo build --release --locked --bin rollgate --manifest-path "$root/Cargo.toml"
mkdir -p "$(dirname "$out")"
cp "$work/use/release/rollgate" "$out"
log "built $out"
