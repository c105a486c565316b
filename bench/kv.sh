#!/usr/bin/env bash
# Side-by-side KV benchmark: a 3-node Granary (`granary-node dev --nodes 3`: factor 3,
# minInSync 2, fsync on) against a 3-node etcd v3.7.3 cluster (fsync on), both on
# loopback, driven by the same client program (bench/kvbench: Granary over HTTP with
# SigV4, etcd through its official v3 client). The client talks to node 1 of each.
# Workloads: put (random keys), get (linearizable, preloaded keys), cas (compare-and-set
# on the client's own key), 256-byte values, concurrency 16.
#
#   bench/kv.sh
#   BENCH_SECONDS=30 BENCH_CONCURRENCY=64 bench/kv.sh
#
# etcd's own `benchmark` tool is in the root module go.etcd.io/etcd/v3, which the Go
# module proxy here refuses (403), so both sides use kvbench.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN="${BENCH_SECONDS:-15}"
CONC="${BENCH_CONCURRENCY:-16}"
SIZE="${BENCH_VALUE_SIZE:-256}"
OPS="${BENCH_OPS:-put get cas}"
CACHE="${GRANARY_TOOLS_CACHE:-$HOME/.cache/granary-tools}"

echo "==> building granary-node (release)" >&2
cargo build -q --release -p granary-storage-node
TARGET="${CARGO_TARGET_DIR:-$PWD/target}/release"
echo "==> etcd (built once into the cache)" >&2
K8S_BIN=$(tests/e2e/tools/k8s-tools.sh)
ETCD="$K8S_BIN/etcd"
sum=$(cat bench/kvbench/go.mod bench/kvbench/main.go | sha256sum | cut -c1-12)
KVBENCH="$CACHE/kvbench-$sum/kvbench"
if [ ! -x "$KVBENCH" ]; then
  echo "==> building kvbench (first time only)" >&2
  mkdir -p "$(dirname "$KVBENCH")"
  (export GOTOOLCHAIN=local GOFLAGS=-mod=mod GOPATH="$CACHE/gopath" GOMODCACHE="$CACHE/gomodcache" GOCACHE="$CACHE/gocache"
   cd bench/kvbench && go build -o "$KVBENCH.tmp" . && mv "$KVBENCH.tmp" "$KVBENCH")
fi

. bench/lib.sh
bench_setup kvbench

echo "==> starting granary-node dev --nodes 3 in $WORK/granary" >&2
B=$(portblock)
"$TARGET/granary-node" dev --nodes 3 --data-dir "$WORK/granary" --s3-listen "127.0.0.1:$B" \
  --kv-listen "127.0.0.1:$((B + 10))" --admin-listen "127.0.0.1:$((B + 20))" \
  --rpc-listen "127.0.0.1:$((B + 30))" > "$WORK/granary.out" 2> "$WORK/granary.err" &
PIDS+=($!)
for _ in $(seq 1200); do grep -q "Secret key" "$WORK/granary.out" 2>/dev/null && break; sleep 0.1; done
G_AK=$(awk '/Access key id/ {print $4}' "$WORK/granary.out")
G_SK=$(awk '/Secret key/ {print $3}' "$WORK/granary.out")
[ -n "$G_SK" ] || { echo "granary did not start:" >&2; cat "$WORK/granary.out" "$WORK/granary.err" >&2; exit 1; }
G_KV="http://127.0.0.1:$((B + 10))"

echo "==> starting a 3-member etcd cluster in $WORK/etcd*" >&2
CLUSTER=""; CLIENTS=(); PEERS=()
for i in 1 2 3; do
  CLIENTS+=("$(port)"); PEERS+=("$(port)")
  CLUSTER+="${CLUSTER:+,}e$i=http://127.0.0.1:${PEERS[$((i - 1))]}"
done
for i in 1 2 3; do
  c=${CLIENTS[$((i - 1))]}; p=${PEERS[$((i - 1))]}
  "$ETCD" --name "e$i" --data-dir "$WORK/etcd$i" \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token granary-bench \
    --quota-backend-bytes $((8 << 30)) --log-level error > "$WORK/etcd$i.log" 2>&1 &
  PIDS+=($!)
done
E_EP="http://127.0.0.1:${CLIENTS[0]}"
for _ in $(seq 100); do
  "$KVBENCH" -target etcd -endpoint "$E_EP" -op put -seconds 0.2 -concurrency 1 -label warmup >/dev/null 2>&1 && break
  sleep 0.3
done

# Leaders and primaries settle before anything is measured.
"$KVBENCH" -target granary -endpoint "$G_KV" -access-key "$G_AK" -secret-key "$G_SK" -op put -seconds 3 -concurrency "$CONC" -label warmup >/dev/null
run() { # target endpoint op namespaces
  "$KVBENCH" -target "$1" -endpoint "$2" -access-key "$G_AK" -secret-key "$G_SK" -op "$3" \
    -seconds "$SECONDS_PER_RUN" -concurrency "$CONC" -value-size "$SIZE" -label "$1" -namespaces "$4"
}
# Granary partitions KV by namespace: one namespace is one partition (one primary, one
# commit and replication stream), the shape of etcd's single keyspace; keys spread over
# SPREAD namespaces show the partitions working in parallel. etcd has one keyspace.
SPREAD="${BENCH_NAMESPACES:-16}"
echo
printf '%-4s %3s | %10s %8s %8s | %10s %8s %8s | %8s %8s\n' op ns "G ops/s" "G p50ms" "G p99ms" "E ops/s" "E p50ms" "E p99ms" "ops x" "p99 x"
for op in $OPS; do
  e=$(run etcd "$E_EP" "$op" 1)
  for ns in 1 "$SPREAD"; do
    g=$(run granary "$G_KV" "$op" "$ns")
    python3 - "$g" "$e" <<'PY'
import json, sys
g, e = json.loads(sys.argv[1]), json.loads(sys.argv[2])
r = lambda a, b: a / b if b else float("nan")
print(f'{g["op"]:<4} {g["namespaces"]:3d} | {g["ops_per_s"]:10.1f} {g["p50_ms"]:8.2f} {g["p99_ms"]:8.2f} | '
      f'{e["ops_per_s"]:10.1f} {e["p50_ms"]:8.2f} {e["p99_ms"]:8.2f} | '
      f'{r(g["ops_per_s"], e["ops_per_s"]):8.2f} {r(g["p99_ms"], e["p99_ms"]):8.2f}'
      + (f'   (errors: granary {g["errors"]}, etcd {e["errors"]})' if g["errors"] or e["errors"] else ''))
PY
  done
done
