#!/usr/bin/env bash
# Noisy neighbour: tenant B runs a light, steady 4 KiB GET/PUT workload at a fixed rate
# (an open loop: latency from the scheduled start) and records p50/p99 alone; then
# tenant A floods the node with concurrent 64 MiB PUTs and GETs while B runs again.
# Prints B's p99 with A flooding over B's p99 alone, and A's throughput, for:
#   granary            A and B with equal QoS (no caps)
#   granary, A capped  A's QoS maxConcurrentRequests=4 (the isolation Granary has today)
#   garage             two keys on Garage, as many nodes as Granary (it has no tenant
#                      isolation)
#   floor              A floods a second granary node (another process, another data
#                      directory) while B runs on the first: what the machine itself
#                      (2 cores shared by clients and servers, one disk) costs B, which
#                      no isolation inside a node can remove
# Single node, fsync on everywhere, all on this machine, same client (s3bench).
# NOISY_NODES=3: Granary is a 3-node cluster (`granary-node dev --nodes 3`: factor 3,
# minInSync 2) and the floor's second Granary is one too; both tenants talk to node 1,
# which forwards to their buckets' primaries. The Garage peer is then three nodes too
# (replication_factor 3), both keys talking to its first node.
#
#   bench/noisy.sh
#   NOISY_SECONDS=30 NOISY_RATE=200 bench/noisy.sh
#   NOISY_NODES=3 NOISY_PEER=none bench/noisy.sh
#   NOISY_PEER=none NOISY_CAPPED=0 NOISY_B_OP=put bench/noisy.sh   (Granary alone, equal
#   QoS only, B's PUTs only: for experiments; the report uses the defaults)
#   NOISY_B_ARGS="--show-slow-ms 200 --max-attempts 1"   (more s3bench options for B:
#   here, print B's slow and failed operations, and count a retry as an error)
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${NOISY_SECONDS:-20}"
RATE="${NOISY_RATE:-100}"
FLOOD="${NOISY_FLOOD_CONCURRENCY:-16}"
PEER="${NOISY_PEER:-garage}"      # garage | none
CAPPED="${NOISY_CAPPED:-1}"       # 0: skip the "A capped" pair
B_OP="${NOISY_B_OP:-mixed}"       # B's operation: mixed | get | put
FLOOR="${NOISY_FLOOR:-1}"         # 0: skip the "floor" pair
GRANARY_NODES="${NOISY_NODES:-1}" # 1 | 3: Granary single-node, or a 3-node cluster
case "$GRANARY_NODES" in 1 | 3) ;; *) echo "NOISY_NODES must be 1 or 3" >&2; exit 2 ;; esac
NODES=$GRANARY_NODES # Garage's
GARAGE_VERSION=2.5.0
CACHE="${GRANARY_TOOLS_CACHE:-$HOME/.cache/granary-tools}"
GARAGE="$CACHE/garage-$GARAGE_VERSION/bin/garage"

echo "==> building granary-node and s3bench (release)" >&2
cargo build -q --release -p granary-storage-node -p granary-bench
TARGET="${CARGO_TARGET_DIR:-$PWD/target}/release"
if [ "$PEER" = garage ] && [ ! -x "$GARAGE" ]; then
  echo "==> building Garage $GARAGE_VERSION from crates.io into $CACHE (first time only; ~20 min)" >&2
  cargo install -q garage --version "$GARAGE_VERSION" --locked --root "$CACHE/garage-$GARAGE_VERSION"
fi

. bench/lib.sh
bench_setup noisy

start_node() { # name -> sets GP (S3 port) and AP (admin port) of node 1 of a dev Granary in $WORK/name
  echo "==> starting granary-node dev --nodes $GRANARY_NODES in $WORK/$1" >&2
  if [ "$GRANARY_NODES" = 1 ]; then
    GP=$(port); AP=$(port); local KP RP; KP=$(port); RP=$(port)
  else
    local B; B=$(portblock)
    GP=$B; local KP=$((B + 10)); AP=$((B + 20)); local RP=$((B + 30))
  fi
  "$TARGET/granary-node" dev --nodes "$GRANARY_NODES" --data-dir "$WORK/$1" --s3-listen "127.0.0.1:$GP" \
    --kv-listen "127.0.0.1:$KP" --admin-listen "127.0.0.1:$AP" --rpc-listen "127.0.0.1:$RP" \
    > "$WORK/$1.out" 2> "$WORK/$1.err" &
  PIDS+=($!)
  for _ in $(seq 600); do grep -q "Secret key" "$WORK/$1.out" 2>/dev/null && break; sleep 0.1; done
  [ -s "$WORK/$1/admin.token" ] || { echo "granary-node $1 did not start:" >&2; cat "$WORK/$1.err" >&2; exit 1; }
}
admin() { # method path [json] (on the node at $AP, data in $WORK/$NODE_DIR)
  curl -sS -f -X "$1" -H "Authorization: Bearer $(cat "$WORK/$NODE_DIR/admin.token")" \
    -H 'content-type: application/json' ${3:+--data "$3"} "http://127.0.0.1:$AP/admin/v1$2"
}
tenant() { # name -> "AK SK"
  admin POST /tenants "{\"name\":\"$1\"}" > /dev/null
  admin POST "/tenants/$1/keys" '{}' | python3 -c 'import json,sys; k=json.load(sys.stdin); print(k["accessKeyId"], k["secretAccessKey"])'
}
if [ "$FLOOR" = 1 ]; then
  start_node floor; NODE_DIR=floor
  FLOOR_PID=${PIDS[-1]}
  FLOOR_EP="http://127.0.0.1:$GP"
  read -r F_AK F_SK < <(tenant noisy-a)
fi
start_node granary; NODE_DIR=granary
read -r A_AK A_SK < <(tenant noisy-a)
read -r B_AK B_SK < <(tenant quiet-b)

if [ "$PEER" = garage ]; then
  start_garage
  $G bucket create quiet >/dev/null
  read -r PB_AK PB_SK < <(garage_key quiet-b quiet)
fi

quiet() { # endpoint ak sk bucket label
  "$TARGET/s3bench" --endpoint "$1" --access-key "$2" --secret-key "$3" --bucket "$4" \
    --op "$B_OP" --size 4096 --concurrency 4 --rate "$RATE" --seconds "$SECS" --label "$5" \
    ${NOISY_B_ARGS:-}
}
flood() { # endpoint ak sk bucket label
  "$TARGET/s3bench" --endpoint "$1" --access-key "$2" --secret-key "$3" --bucket "$4" \
    --op mixed --size 67108864 --concurrency "$FLOOD" --seconds "$((SECS + 8))" --label "$5"
}
# B alone, then B while A floods (A starts first and ends after B).
pair() { # endpoint a_ak a_sk a_bucket b_ak b_sk b_bucket label [A's endpoint]
  local alone flooded a
  alone=$(quiet "$1" "$5" "$6" "$7" "$8-alone")
  flood "${9:-$1}" "$2" "$3" "$4" "$8-flood" > "$WORK/flood.json" &
  local fp=$!
  sleep 4
  flooded=$(quiet "$1" "$5" "$6" "$7" "$8-flooded")
  wait "$fp"
  a=$(cat "$WORK/flood.json")
  python3 - "$8" "$alone" "$flooded" "$a" <<'PY'
import json, sys
name, alone, flooded, a = sys.argv[1], *(json.loads(x) for x in sys.argv[2:])
ratio = flooded["p99_ms"] / alone["p99_ms"] if alone["p99_ms"] else float("nan")
print(f'{name:<20} | B alone p50 {alone["p50_ms"]:7.2f} p99 {alone["p99_ms"]:8.2f} ms | '
      f'B flooded p50 {flooded["p50_ms"]:8.2f} p99 {flooded["p99_ms"]:8.2f} ms | '
      f'p99 x {ratio:6.2f} | A {a["mib_per_s"]:7.1f} MiB/s'
      + (f' | errors B {flooded["errors"]}, A {a["errors"]}' if flooded["errors"] or a["errors"] else ''))
PY
}
echo; echo "noisy neighbour: B $B_OP 4 KiB at $RATE ops/s, A mixed 64 MiB x $FLOOD, ${SECS} s, Granary on $GRANARY_NODES node(s)"
G_EP="http://127.0.0.1:$GP"
pair "$G_EP" "$A_AK" "$A_SK" noisy-a "$B_AK" "$B_SK" quiet-b granary
if [ "$FLOOR" = 1 ]; then
  pair "$G_EP" "$F_AK" "$F_SK" noisy-a "$B_AK" "$B_SK" quiet-b "floor (A elsewhere)" "$FLOOR_EP"
  kill "$FLOOR_PID" 2>/dev/null || true # idle from here on; not part of the other pairs
fi
if [ "$CAPPED" = 1 ]; then
  admin PUT /tenants/noisy-a '{"qos":{"maxConcurrentRequests":4}}' > /dev/null
  sleep 6 # the QoS re-read interval
  pair "$G_EP" "$A_AK" "$A_SK" noisy-a "$B_AK" "$B_SK" quiet-b "granary, A capped 4"
fi
if [ "$PEER" = garage ]; then
  pair "http://127.0.0.1:$SP" "$P_AK" "$P_SK" bench "$PB_AK" "$PB_SK" quiet garage
fi
