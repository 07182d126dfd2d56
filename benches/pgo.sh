#!/usr/bin/env bash
# A profile-guided (PGO) release build of rollgate, trained on loopback traffic.
#   benches/pgo.sh [OUT]       # OUT defaults to target/pgo/rollgate
# 1. builds rollgate with -Cprofile-generate (release profile, its own target dir);
# 2. runs two instrumented proxies in front of two `rollgate mock-model` upstreams and sends
#    them what rollgate serves in production, every request answered 2xx: HTTP/1.1 GETs and
#    1 KiB chat-completion POSTs, sticky keys, pins, routing by model, h2c, SSE streams,
#    shadow copies to an h2c:// (gRPC-style) upstream, an https upstream and a TLS listener
#    (the second proxy), the access log, the evaluator ticking, a config reload;
# 3. merges the profiles (llvm-profdata of rustup's llvm-tools component, added when
#    missing), builds again with -Cprofile-use, runs the result once (`demo`) and copies it.
# Needs: h2load, curl, openssl, python3 (../shared/bench/peers/setup.sh installs the load
# tools; the Dockerfile all of them). Loopback only. About 20 minutes on 2 cores; every run
# rebuilds all crates twice (the profile differs, so do the flags cargo fingerprints).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/target/pgo/rollgate}
work=$root/target/pgo
mkdir -p "$work"
log() { echo "pgo.sh: $*" >&2; }
die() { log "$*"; exit 1; }
# One run at a time: runs share $work (and the image build's cache mount).
# The processes it starts close the descriptor (9>&-), so an orphan cannot keep the lock.
exec 9>"$work/.lock"
flock -n 9 || { log "waiting for another pgo.sh run to finish"; flock -w 3600 9 || die "$work/.lock still held after an hour"; }
# The training talks to 127.0.0.1 only; a builder's HTTP proxy must not get in the way.
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
[ -z "${CARGO_ENCODED_RUSTFLAGS:-}" ] || die "unset CARGO_ENCODED_RUSTFLAGS (it would replace the profile flags)"
sysroot=$(rustc --print sysroot)
host=$(rustc -vV | awk '/^host:/ {print $2}')
profdata=$sysroot/lib/rustlib/$host/bin/llvm-profdata
[ -x "$profdata" ] || rustup component add llvm-tools
[ -x "$profdata" ] || die "no llvm-profdata at $profdata after adding llvm-tools"
for tool in h2load curl openssl python3; do
  command -v "$tool" >/dev/null || die "$tool not found (../shared/bench/peers/setup.sh)"
done
# cargo FLAGS...: a release build of rollgate with the user's RUSTFLAGS and FLAGS, passed as
# CARGO_ENCODED_RUSTFLAGS so that a path with spaces stays one argument.
build() {
  local dir=$1; shift
  local flags=() f
  read -r -a flags <<<"${RUSTFLAGS:-}"
  flags+=("$@")
  local IFS=$'\x1f'
  CARGO_ENCODED_RUSTFLAGS="${flags[*]}" CARGO_TARGET_DIR=$dir RUSTFLAGS='' \
    cargo build --release --locked --bin rollgate --manifest-path "$root/Cargo.toml"
}

raw=$work/raw; rm -rf "$raw"; mkdir -p "$raw"
log "1/3 instrumented build"
build "$work/gen" "-Cprofile-generate=$raw"
gen=$work/gen/release/rollgate
grep -q LLVM_PROFILE_FILE "$gen" || die "$gen is not instrumented (RUSTFLAGS or .cargo/config overriding?)"

log "2/3 training run"
tmp=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # URL LOG: 200 within 20 s, or the log and exit
  for _ in $(seq 1 400); do curl -sfk -o /dev/null "$1" && return 0; sleep 0.05; done
  cat "$2" >&2; die "no answer from $1"
}
up_a=$(port); up_b=$(port); data=$(port); admin=$(port); edge=$(port); edge_admin=$(port)
# The upstreams are the same binary; their profiles go elsewhere (only the proxies' count).
for v in a b; do
  p=up_$v
  LLVM_PROFILE_FILE="$tmp/discard-%p.profraw" "$gen" mock-model --listen "127.0.0.1:${!p}" \
    --name "$v" --chunks 20 --chunk-interval 1ms >"$tmp/$v.log" 2>&1 9>&- & pids+=($!)
done
wait_for "http://127.0.0.1:$up_a/health/ready" "$tmp/a.log"
wait_for "http://127.0.0.1:$up_b/health/ready" "$tmp/b.log"

# A private CA and a certificate for 127.0.0.1: the edge proxy's TLS listener, and the https
# version the main proxy reaches it through.
(
  cd "$tmp"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=pgo-ca -keyout ca.key -out ca.pem
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=127.0.0.1 \
    -keyout tls.key -out tls.csr
  printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >ext
  openssl x509 -req -in tls.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out tls.crt
) >"$tmp/openssl.log" 2>&1 || { cat "$tmp/openssl.log" >&2; die "openssl failed"; }
cat >"$tmp/edge.yaml" <<YAML
listen: 127.0.0.1:$edge
tls: {cert: $tmp/tls.crt, key: $tmp/tls.key}
admin: {listen: 127.0.0.1:$edge_admin}
state_dir: $tmp/edge-state
versions:
  a: {endpoints: [http://127.0.0.1:$up_a]}
routes:
  - {name: edge, match: {path_prefix: /}, baseline: a, split: {a: 100}}
YAML
config() { # WEIGHT_A: the main proxy's config
  cat <<YAML
listen: 127.0.0.1:$data
admin: {listen: 127.0.0.1:$admin}
state_dir: $tmp/state
access_log: {path: $tmp/access.log, sample: 0.5}
versions:
  a: {endpoints: [http://127.0.0.1:$up_a], set_headers: {x-prompt-version: p1}}
  b: {endpoints: [http://127.0.0.1:$up_b]}
  g: {endpoints: ["h2c://127.0.0.1:$up_b"]}
  t: {endpoints: ["https://127.0.0.1:$edge"], ca_file: $tmp/ca.pem}
routes:
  - name: big-model
    match: {path_prefix: /v1/chat/completions, model: [big]}
    baseline: t
    split: {t: 100}
  - name: sticky
    match: {path_prefix: /v1/completions}
    baseline: a
    split: {a: $1, b: $((100 - $1))}
    sticky: {header: x-user-id}
  - name: chat
    match: {path_prefix: /}
    baseline: a
    split: {a: $1, b: $((100 - $1))}
    shadow: {version: g, percent: 10}
YAML
}
config 95 >"$tmp/rg.yaml"
proxy() { # NAME CONFIG: an instrumented proxy; its profile is kept
  LLVM_PROFILE_FILE="$raw/rollgate-%p-%m.profraw" "$gen" run -c "$2" >"$tmp/$1.log" 2>&1 9>&- & pids+=($!)
  eval "pid_$1=$!"
}
proxy edge "$tmp/edge.yaml"
proxy main "$tmp/rg.yaml"
wait_for "http://127.0.0.1:$edge_admin/readyz" "$tmp/edge.log"
wait_for "http://127.0.0.1:$admin/readyz" "$tmp/main.log"

body=$tmp/chat.json; stream=$tmp/stream.json; big=$tmp/big.json
python3 - "$body" "$stream" "$big" <<'PY'
import json, sys
words = " ".join(["word"] * 170)  # about 1 KiB
chat = {"model": "m", "messages": [{"role": "user", "content": words}]}
json.dump(chat, open(sys.argv[1], "w"))
json.dump(dict(chat, stream=True), open(sys.argv[2], "w"))
json.dump(dict(chat, model="big"), open(sys.argv[3], "w"))
PY
url=http://127.0.0.1:$data
json=(-H 'content-type: application/json')
# load N ARGS...: h2load, N requests, every one a 2xx (a profile of error paths would
# optimise the wrong code).
load() {
  local n=$1; shift
  local out; out=$(h2load -n "$n" "$@" 2>&1) || true
  grep -q "^status codes: $n 2xx" <<<"$out" || { echo "$out" >&2; die "training load failed: h2load -n $n $*"; }
  log "$(grep -E '^finished in' <<<"$out") (-n $n $*)"
}
load 60000 --h1 -c64 "$url/v1/models"
load 20000 --h1 -c16 -d "$body" "${json[@]}" "$url/v1/chat/completions"
load 30000 -c16 -m4 "$url/v1/models"
load 10000 -c16 -m4 -d "$body" "${json[@]}" "$url/v1/chat/completions"
load 2000 --h1 -c32 -d "$stream" "${json[@]}" "$url/v1/chat/completions"
load 10000 --h1 -c16 -d "$body" "${json[@]}" -H 'x-user-id: user-1' "$url/v1/completions"
load 5000 --h1 -c16 -H 'x-rollgate-version: b' "$url/v1/models"
load 5000 --h1 -c16 -d "$big" "${json[@]}" "$url/v1/chat/completions"
load 5000 -c16 -m4 -d "$big" "${json[@]}" "$url/v1/chat/completions"
load 5000 --h1 -c16 "https://127.0.0.1:$edge/v1/models"
load 5000 -c16 -m4 "https://127.0.0.1:$edge/v1/models"
# A reload from the watched file: wait until it is applied.
config 80 >"$tmp/rg.yaml.new" && mv "$tmp/rg.yaml.new" "$tmp/rg.yaml"
reloaded() { # a here-string, not a pipe: grep -q stopping early would fail curl (pipefail)
  local m; m=$(curl -sf "127.0.0.1:$admin/metrics") || return 1
  grep -q '^rollgate_config_reloads_total{result="ok"} [1-9]' <<<"$m"
}
for _ in $(seq 1 200); do reloaded && break; sleep 0.05; done
reloaded || die "the config reload was not applied"
load 10000 --h1 -c16 "$url/v1/models"
# A 2xx status says nothing of the body: a stream cut short, or shadow copies that failed,
# would profile error paths. The proxy's own count must show every answer a success, the
# h2c shadow's copies included.
for a in "$edge_admin" "$admin"; do
  m=$(curl -sf "127.0.0.1:$a/metrics") || die "no metrics from the proxy with admin port $a"
  failed=$(awk '/^rollgate_requests_total\{/ && !/classification="success"/ && $NF > 0' <<<"$m")
  [ -z "$failed" ] || die "training requests that did not succeed: $failed"
done
grep -q '^rollgate_requests_total{route="chat",version="g",[^}]*classification="success"} [1-9]' <<<"$m" \
  || die "no shadow copy to the h2c:// version succeeded"
# Stop the proxies: each writes its profile when it exits, and must exit cleanly.
for name in main edge; do
  pid=pid_$name
  kill -TERM "${!pid}"
  # drain_timeout (25 s) plus the shutdown budget (10 s), with a margin
  status=0; timeout 45 tail --pid="${!pid}" -f /dev/null || die "$name did not exit within 45 s"
  wait "${!pid}" || status=$?
  keep=(); for p in "${pids[@]}"; do [ "$p" = "${!pid}" ] || keep+=("$p"); done
  pids=("${keep[@]}") # reaped: cleanup must not signal a reused PID
  [ "$status" = 0 ] || { cat "$tmp/$name.log" >&2; die "$name exited with $status"; }
  ! grep -q "LLVM Profile Error" "$tmp/$name.log" || { cat "$tmp/$name.log" >&2; die "$name could not write its profile"; }
  compgen -G "$raw/rollgate-${!pid}-*.profraw" >/dev/null || die "$name (pid ${!pid}) left no profile"
done

log "3/3 optimised build"
# Only the proxies' profiles: with RUSTFLAGS the build scripts were instrumented too and left
# theirs in the same directory.
rm -f "$work"/*.profdata
"$profdata" merge -o "$work/merged.profdata" "$raw"/rollgate-*.profraw
# An empty or truncated profile would build a binary optimised for nothing, silently.
covered=$("$profdata" show --covered "$work/merged.profdata" | wc -l)
[ "$covered" -ge 1000 ] || die "the profile has $covered functions that ran; expected thousands"
log "profile: $covered functions ran"
# Named by its content: cargo tracks the flags, not the file they point at, so a new
# profile under the same name would leave crates built with the old one.
prof=$work/rollgate-$(sha256sum "$work/merged.profdata" | cut -c1-16).profdata
mv "$work/merged.profdata" "$prof"
build "$work/use" "-Cprofile-use=$prof"
# Run what was built once before it ships: the demo's canary, rollback and audit record.
(cd "$tmp" && timeout 120 "$work/use/release/rollgate" demo --duration 6s >"$tmp/demo.log" 2>&1) \
  || { cat "$tmp/demo.log" >&2; die "the optimised binary failed its demo run"; }
grep -q "ROLLBACK:" "$tmp/demo.log" || { cat "$tmp/demo.log" >&2; die "the demo did not roll back"; }
# Beside, then renamed: a running copy of OUT keeps its file, and nobody starts half of one.
mkdir -p "$(dirname "$out")"
install -m 0755 "$work/use/release/rollgate" "$out.new.$$"
mv -f "$out.new.$$" "$out"
log "built $out"
