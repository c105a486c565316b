#!/usr/bin/env bash
# Side-by-side S3 benchmark: Granary (`granary-node dev`) against a peer on the same
# disk, driven by the same load generator (bench/src/main.rs, AWS SDK for Rust).
# Workloads: put, get, mixed x 4 KiB, 1 MiB, 64 MiB, concurrency 16.
# Prints ops/s, MiB/s, p50 and p99 per workload and the Granary/peer ratios.
#
#   bench/run.sh                 # peer: Garage (built once from crates.io into the cache)
#   BENCH_SECONDS=30 bench/run.sh
#   BENCH_NODES=3 bench/run.sh   # 3-node clusters, 3 copies of everything: `granary-node dev
#                                # --nodes 3` (factor 3, minInSync 2) against 3 Garage nodes
#                                # (replication_factor 3); the client talks to node 1 of each
#   BENCH_PEER=seaweedfs BENCH_NODES=3 bench/run.sh
#                                # the peer is SeaweedFS (bench/seaweedfs.sh builds it):
#                                # master + 3 volume servers + filer + S3 gateway,
#                                # replication 002 (three copies on three volume servers)
#
# MinIO and warp (the peers named in the plan) cannot be built here: the Go module proxy
# refuses their modules (see docs/benchmarks.md), so the peer is Garage, configured
# with data_fsync and metadata_fsync on so both servers acknowledge only durable writes.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN="${BENCH_SECONDS:-15}"
CONC="${BENCH_CONCURRENCY:-16}"
SIZES="${BENCH_SIZES:-4096 1048576 67108864}"
OPS="${BENCH_OPS:-put get mixed}"
CACHE="${GRANARY_TOOLS_CACHE:-$HOME/.cache/granary-tools}"
GARAGE_VERSION="${GARAGE_VERSION:-2.5.0}"
NODES="${BENCH_NODES:-1}"
PEER="${BENCH_PEER:-garage}"
case "$PEER" in garage|seaweedfs) ;; *) echo "BENCH_PEER must be garage or seaweedfs" >&2; exit 2 ;; esac
case "$NODES" in 1|3) ;; *) echo "BENCH_NODES must be 1 or 3" >&2; exit 2 ;; esac

echo "==> building granary-node and s3bench (release)" >&2
cargo build -q --release -p granary-storage-node -p granary-bench
TARGET="${CARGO_TARGET_DIR:-$PWD/target}/release"
GARAGE="$CACHE/garage-$GARAGE_VERSION/bin/garage"
if [ "$PEER" = seaweedfs ]; then
  WEED=$(bench/seaweedfs.sh)
elif [ ! -x "$GARAGE" ]; then
  echo "==> building Garage $GARAGE_VERSION from crates.io into $CACHE (first time only; ~20 min)" >&2
  cargo install -q garage --version "$GARAGE_VERSION" --locked --root "$CACHE/garage-$GARAGE_VERSION"
fi

. bench/lib.sh
bench_setup bench

if [ "$NODES" = 1 ]; then
  echo "==> starting granary-node dev in $WORK/granary" >&2
  GP=$(port)
  "$TARGET/granary-node" dev --data-dir "$WORK/granary" --s3-listen "127.0.0.1:$GP" \
    --kv-listen "127.0.0.1:$(port)" --admin-listen "127.0.0.1:$(port)" --rpc-listen "127.0.0.1:$(port)" > "$WORK/granary.out" 2> "$WORK/granary.err" &
  PIDS+=($!)
  for _ in $(seq 100); do grep -q "Secret key" "$WORK/granary.out" 2>/dev/null && break; sleep 0.1; done
else
  echo "==> starting granary-node dev --nodes 3 in $WORK/granary" >&2
  B=$(portblock); GP=$B
  "$TARGET/granary-node" dev --nodes 3 --data-dir "$WORK/granary" --s3-listen "127.0.0.1:$B" \
    --kv-listen "127.0.0.1:$((B + 10))" --admin-listen "127.0.0.1:$((B + 20))" \
    --rpc-listen "127.0.0.1:$((B + 30))" > "$WORK/granary.out" 2> "$WORK/granary.err" &
  PIDS+=($!)
  for _ in $(seq 1200); do grep -q "Secret key" "$WORK/granary.out" 2>/dev/null && break; sleep 0.1; done
fi
G_AK=$(awk '/Access key id/ {print $4}' "$WORK/granary.out")
G_SK=$(awk '/Secret key/ {print $3}' "$WORK/granary.out")
[ -n "$G_SK" ] || { echo "granary did not start:" >&2; cat "$WORK/granary.out" "$WORK/granary.err" >&2; exit 1; }


# SeaweedFS: one master, NODES volume servers (replication 00(NODES-1): every copy on a
# different volume server), a filer (leveldb2 store) and the S3 gateway in front of it.
# Writes under /buckets/ fsync (filer storage rule, `fs.configure -fsync`), so it too
# acknowledges only what is on disk.
# N distinct free ports p below 50000, each with p + 10000 free too (SeaweedFS's gRPC
# port is its HTTP port + 10000, and its clients assume so), all held until all are
# chosen so none is handed out twice.
weedports() { python3 -c '
import random, socket, sys
held, out = [], []
while len(out) < int(sys.argv[1]):
    p = random.randrange(20000, 50000)
    if any(abs(p - q) in (0, 10000) for q in out):
        continue
    try:
        a = socket.socket(); a.bind(("127.0.0.1", p)); b = socket.socket(); b.bind(("127.0.0.1", p + 10000))
        held += [a, b]; out.append(p)
    except OSError:
        pass
print(" ".join(map(str, out)))
' "$1"; }

start_seaweedfs() {
  echo "==> starting SeaweedFS (master, $NODES volume server(s), filer, S3) in $WORK/weed*" >&2
  local mp fp d i ports
  read -r -a ports <<< "$(weedports $((NODES + 3)))"
  mp=${ports[0]}; fp=${ports[1]}; SP=${ports[2]}
  mkdir -p "$WORK/weed-master" "$WORK/weed-filer"
  "$WEED" master -ip=127.0.0.1 -port="$mp" -port.grpc=$((mp + 10000)) -mdir="$WORK/weed-master" \
    -defaultReplication="00$((NODES - 1))" -volumeSizeLimitMB=1024 > "$WORK/weed-master.log" 2>&1 &
  PIDS+=($!)
  for i in $(seq 1 "$NODES"); do
    d="$WORK/weed-volume$i"; mkdir -p "$d"
    local vp=${ports[$((i + 2))]}
    "$WEED" volume -ip=127.0.0.1 -port="$vp" -port.grpc=$((vp + 10000)) -dir="$d" -max=64 \
      -mserver="127.0.0.1:$mp" > "$d.log" 2>&1 &
    PIDS+=($!)
  done
  P_AK=GRANARYBENCHKEY0000; P_SK=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  cat > "$WORK/weed-s3.json" <<JSON
{"identities": [{"name": "bench", "credentials": [{"accessKey": "$P_AK", "secretKey": "$P_SK"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
  "$WEED" filer -ip=127.0.0.1 -port="$fp" -port.grpc=$((fp + 10000)) -master="127.0.0.1:$mp" \
    -defaultStoreDir="$WORK/weed-filer" > "$WORK/weed-filer.log" 2>&1 &
  PIDS+=($!)
  "$WEED" s3 -ip.bind=127.0.0.1 -port="$SP" -filer="127.0.0.1:$fp" -config="$WORK/weed-s3.json" \
    -port.iceberg=0 -port.lance=0 \
    > "$WORK/weed-s3.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 150); do
    curl -sf "http://127.0.0.1:$mp/cluster/status" 2>/dev/null | grep -q '"IsLeader":true' \
      && curl -s -o /dev/null "http://127.0.0.1:$SP/" && break
    sleep 0.2
  done
  # Volumes are grown on first write; wait until the master knows every volume server.
  for _ in $(seq 150); do
    [ "$(curl -sf "http://127.0.0.1:$mp/dir/status" | python3 -c 'import json,sys; t=json.load(sys.stdin)["Topology"]; print(sum(len(r["DataNodes"]) for dc in t["DataCenters"] for r in dc["Racks"]))' 2>/dev/null)" = "$NODES" ] && break
    sleep 0.2
  done
  echo "fs.configure -locationPrefix=/buckets/ -fsync -replication=00$((NODES - 1)) -apply" \
    | "$WEED" shell -master="127.0.0.1:$mp" -filer="127.0.0.1:$fp" > "$WORK/weed-shell.log" 2>&1 \
    || { echo "weed shell fs.configure failed:" >&2; cat "$WORK/weed-shell.log" >&2; exit 1; }
  grep -q '"fsync": true' "$WORK/weed-shell.log" \
    || { echo "SeaweedFS did not take the fsync rule:" >&2; cat "$WORK/weed-shell.log" >&2; exit 1; }
}

if [ "$PEER" = seaweedfs ]; then start_seaweedfs; else start_garage; fi

run() { # endpoint ak sk op size label
  "$TARGET/s3bench" --endpoint "$1" --access-key "$2" --secret-key "$3" --op "$4" --size "$5" \
    --concurrency "$CONC" --seconds "$SECONDS_PER_RUN" --label "$6"
}
# Warm-up, not measured: primaries settle, the peer creates its first volumes.
run "http://127.0.0.1:$GP" "$G_AK" "$G_SK" put 4096 warmup >/dev/null
run "http://127.0.0.1:$SP" "$P_AK" "$P_SK" put 4096 warmup >/dev/null
echo; echo "granary vs $PEER ($NODES node(s))"
printf '%-6s %9s | %10s %9s %8s %8s | %10s %9s %8s %8s | %8s %8s\n' op size "G ops/s" "G MiB/s" "G p50ms" "G p99ms" "P ops/s" "P MiB/s" "P p50ms" "P p99ms" "ops x" "MiB/s x"
for size in $SIZES; do
  for op in $OPS; do
    g=$(run "http://127.0.0.1:$GP" "$G_AK" "$G_SK" "$op" "$size" granary)
    p=$(run "http://127.0.0.1:$SP" "$P_AK" "$P_SK" "$op" "$size" garage)
    python3 - "$g" "$p" <<'PY'
import json, sys
g, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
r = lambda a, b: a / b if b else float("nan")
size = {4096: "4KiB", 1048576: "1MiB", 67108864: "64MiB"}.get(g["size"], str(g["size"]))
print(f'{g["op"]:<6} {size:>9} | {g["ops_per_s"]:10.1f} {g["mib_per_s"]:9.1f} {g["p50_ms"]:8.2f} {g["p99_ms"]:8.2f} | '
      f'{p["ops_per_s"]:10.1f} {p["mib_per_s"]:9.1f} {p["p50_ms"]:8.2f} {p["p99_ms"]:8.2f} | '
      f'{r(g["ops_per_s"], p["ops_per_s"]):8.2f} {r(g["mib_per_s"], p["mib_per_s"]):8.2f}'
      + (f'   (errors: granary {g["errors"]}, peer {p["errors"]})' if g["errors"] or p["errors"] else ''))
PY
  done
done
