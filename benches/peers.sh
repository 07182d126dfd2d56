#!/usr/bin/env bash
# The peer comparison in one command: rollgate (evaluator and telemetry on, as in
# production) against nginx, HAProxy and Pingora, in the same run of the shared harness
# (../shared/bench/peers: proxy pinned to core 0; upstream and load generator on core 1).
#
#   benches/peers.sh                  # quick: fast scenario, 1 round, 5 s runs (~4 min)
#   FULL=1 benches/peers.sh           # the harness's full run: 2 scenarios x 3 rounds (~15 min)
#   ROLLGATE_BIN=/abs/path ...        # that binary, not built here
#   PGO=1 ...                         # rollgate built by benches/pgo.sh (as the image ships it;
#                                     # +20 min for the two builds and the training run)
#
# Any of the harness's knobs (TARGETS, SCENARIOS, ROUNDS, DURATION, OHA, ...) pass through.
# Results: benches/results/peers-<timestamp>/report.md (and the harness's raw files).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
harness=${HARNESS:-$root/../shared/bench/peers}
[ -x "$harness/run.sh" ] || { echo "peers.sh: no harness at $harness (set HARNESS)" >&2; exit 2; }

if [ -n "${ROLLGATE_BIN:-}" ]; then
  # A binary built elsewhere (a worktree, an earlier pgo.sh run), used as it is.
  [ "${PGO:-0}" = 1 ] && { echo "peers.sh: PGO=1 and ROLLGATE_BIN: choose one" >&2; exit 2; }
  [ -x "$ROLLGATE_BIN" ] || { echo "peers.sh: ROLLGATE_BIN=$ROLLGATE_BIN is not an executable" >&2; exit 2; }
  ROLLGATE_BIN=$(realpath "$ROLLGATE_BIN") # the harness runs it from its own directory
  export ROLLGATE_BIN
elif [ "${PGO:-0}" = 1 ]; then
  "$root/benches/pgo.sh"
  export ROLLGATE_BIN=$root/target/pgo/rollgate
else
  cargo build --release --manifest-path "$root/Cargo.toml"
  export ROLLGATE_BIN=$root/target/release/rollgate
fi
# Peers and tools: nginx, haproxy, wrk, h2load, the Pingora peer (setup.sh is idempotent).
if ! command -v haproxy >/dev/null || ! command -v wrk >/dev/null || ! command -v h2load >/dev/null; then
  (cd "$harness" && OHA=0 ./setup.sh)
fi

if [ "${FULL:-0}" != 1 ]; then
  : "${TARGETS:=direct nginx haproxy pingora}" "${SCENARIOS:=fast}" "${ROUNDS:=1}" "${DURATION:=5}"
  export TARGETS SCENARIOS ROUNDS DURATION
fi
export PROJECT_CMD='exec ./rollgate.sh' PROJECT_NAME=rollgate PROJECT_H2=1
export OUT=${OUT:-$root/benches/results/peers-$(date +%Y%m%d-%H%M%S)}
cd "$harness"
./run.sh
# Which rollgate ran: the harness records the peers' versions, not the project's binary.
build=$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)
line="rollgate binary: $ROLLGATE_BIN (sha256 $(sha256sum "$ROLLGATE_BIN" | cut -c1-16); repository at $build)"
echo "$line" >> "$OUT/env.txt"
printf '\n%s\n' "$line" >> "$OUT/report.md"
echo "report: $OUT/report.md"
