#!/usr/bin/env bash
# Cold-tier benchmark: transition throughput to a local-directory cold tier and to an
# S3 cold tier (another granary-node dev), its cost to a foreground tenant's 4 KiB GET
# latency, and GET throughput and time to first byte of cold objects against the same
# objects hot. Figures in docs/benchmarks.md.
#
#   bench/cold.sh                       # 8 objects of 64 MiB per tier
#   COLD_BENCH_OBJECTS=4 COLD_BENCH_SIZE=16777216 bench/cold.sh
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> building granary-node (release)" >&2
cargo build -q --release -p granary-storage-node
TARGET="${CARGO_TARGET_DIR:-$PWD/target}/release"
python3 -c 'import boto3' 2>/dev/null || python3 -m pip install -q boto3
. bench/lib.sh
bench_setup coldbench

# start NAME EXTRA-ARGS...: a dev node under $WORK/NAME; sets EP, AK, SK.
start() {
  local name=$1; shift
  local sp; sp=$(port)
  "$TARGET/granary-node" dev --data-dir "$WORK/$name" --s3-listen "127.0.0.1:$sp" \
    --kv-listen "127.0.0.1:$(port)" --admin-listen "127.0.0.1:$(port)" \
    --rpc-listen "127.0.0.1:$(port)" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err" &
  PIDS+=($!)
  for _ in $(seq 200); do grep -q "Secret key" "$WORK/$name.out" 2>/dev/null && break; sleep 0.1; done
  EP="http://127.0.0.1:$sp"
  AK=$(awk '/Access key/ {print $NF}' "$WORK/$name.out")
  SK=$(awk '/Secret key/ {print $NF}' "$WORK/$name.out")
}

echo "==> local directory cold tier" >&2
start local --cold-tier "file://$WORK/cold" --cold-tier-period-secs 1 --cold-tier-rate 0
python3 bench/cold.py "$EP" "$AK" "$SK" "file://"

echo "==> S3 cold tier (another granary-node dev)" >&2
start target
TEP=$EP; TAK=$AK; TSK=$SK
python3 -c "import boto3; boto3.client('s3', endpoint_url='$TEP', aws_access_key_id='$TAK', aws_secret_access_key='$TSK', region_name='us-east-1').create_bucket(Bucket='cold')"
AWS_ACCESS_KEY_ID=$TAK AWS_SECRET_ACCESS_KEY=$TSK AWS_ENDPOINT=$TEP AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
  start s3 --cold-tier "s3://cold/tier" --cold-tier-period-secs 1 --cold-tier-rate 0
python3 bench/cold.py "$EP" "$AK" "$SK" "s3://"
