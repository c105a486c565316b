#!/usr/bin/env bash
# Long fault runs, kept out of the CI test command (scripts/test.sh): the durability
# suite with many SIGKILL cycles and as many power-loss cycles (the data directory on
# the power-loss file system, tests/powerloss-fs: unsynced data and names discarded at
# each kill; writers of inline and chunked objects, KV keys, buckets and tenants; every
# acknowledged write checked after every restart), power cuts during the first start,
# on-disk corruption, bad input, SIGTERM draining and slow readers, repeated
# SOAK_ROUNDS times; then the cluster nemesis (tests/e2e/tests/linearizability.rs: KV
# and S3 registers through random nodes while nodes are killed, stopped and cut off,
# the history checked by Porcupine) for GRANARY_NEMESIS_SECS (600 s).
#
#   scripts/soak.sh                               # 3 rounds of 50 kill + 50 power-loss cycles
#   SOAK_ROUNDS=10 GRANARY_CRASH_CYCLES=200 scripts/soak.sh
#   SOAK_ROUNDS=0 GRANARY_NEMESIS_SECS=1800 scripts/soak.sh   # only a 30-minute nemesis
#
# Needs what scripts/test.sh installs (run that once first).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL=0
export GRANARY_CRASH_CYCLES="${GRANARY_CRASH_CYCLES:-50}"
ROUNDS="${SOAK_ROUNDS:-3}"

echo "==> building (debug, as the test command does)"
cargo build --workspace --all-targets
export GRANARY_NODE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/granary-node"
export GRANARY_POWERLOSS_FS_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/granary-powerloss-fs"
GRANARY_LINCHECK_BIN=$(tests/e2e/tools/lincheck.sh)
export GRANARY_LINCHECK_BIN
export GRANARY_NEMESIS_SECS="${GRANARY_NEMESIS_SECS:-600}"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
for round in $(seq 1 "$ROUNDS"); do
  echo "==> round $round/$ROUNDS: durability suite, $GRANARY_CRASH_CYCLES SIGKILL and $GRANARY_CRASH_CYCLES power-loss cycles"
  set +e
  cargo test -q -p granary-e2e --test durability -- --test-threads=2 --nocapture 2>&1 \
    | tee "$log" | grep --line-buffered -E "crash test|power-loss test|test result|panicked"
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    echo "soak: round $round failed; full output follows" >&2
    cat "$log" >&2
    exit "$status"
  fi
done
echo "==> nemesis: $GRANARY_NEMESIS_SECS s of faults on a 3-node cluster, history checked by Porcupine"
set +e
cargo test -q -p granary-e2e --test linearizability -- --test-threads=1 --nocapture 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "soak: the nemesis run failed" >&2
  exit "$status"
fi
echo "==> soak: $ROUNDS rounds and the nemesis passed in $(( $(date +%s) - start )) s"
