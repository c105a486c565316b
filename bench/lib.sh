# Shared by bench/run.sh and bench/kv.sh (sourced): a work directory removed on exit
# with every server whose pid is in PIDS stopped, and free loopback ports.
# bench_setup PREFIX
bench_setup() {
  mkdir -p "${BENCH_DIR:-$PWD/target}"
  WORK=$(mktemp -d -p "${BENCH_DIR:-$PWD/target}" "$1.XXXXXX")
  PIDS=()
  trap bench_cleanup EXIT
}
bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# A base port with base..base+2 free for each of 4 listeners spaced by 10 (the ports of
# `granary-node dev --nodes 3`).
portblock() { python3 -c '
import random, socket
while True:
    b = random.randrange(20000, 60000)
    try:
        socks = []
        for l in range(4):
            for n in range(3):
                s = socket.socket(); s.bind(("127.0.0.1", b + 10 * l + n)); socks.append(s)
        print(b); break
    except OSError:
        pass
'; }

# Garage with $NODES node(s) under $WORK (replication_factor $NODES, fsync on), a bucket
# "bench" and a key "bench-key" with access to it: sets SP (node 1's S3 port), G (the
# admin command), P_AK and P_SK. Needs GARAGE, GARAGE_VERSION, NODES, WORK, PIDS.
start_garage() {
echo "==> starting $NODES Garage $GARAGE_VERSION node(s) in $WORK/garage*" >&2
SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
GARAGE_CFG=()
for i in $(seq 1 "$NODES"); do
  SPi=$(port); RPi=$(port); APi=$(port)
  [ "$i" = 1 ] && SP=$SPi
  d="$WORK/garage$i"
  mkdir -p "$d"
  cat > "$d/garage.toml" <<TOML
metadata_dir = "$d/meta"
data_dir = "$d/data"
db_engine = "lmdb"
metadata_fsync = true
data_fsync = true
replication_factor = $NODES
rpc_bind_addr = "127.0.0.1:$RPi"
rpc_public_addr = "127.0.0.1:$RPi"
rpc_secret = "$SECRET"
[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$SPi"
root_domain = ".s3.garage$i.localhost"
[admin]
api_bind_addr = "127.0.0.1:$APi"
TOML
  GARAGE_CFG+=("$d/garage.toml")
  "$GARAGE" -c "$d/garage.toml" server > "$d/garage.out" 2>&1 &
  PIDS+=($!)
done
G="$GARAGE -c ${GARAGE_CFG[0]}"
for c in "${GARAGE_CFG[@]}"; do
  for _ in $(seq 100); do "$GARAGE" -c "$c" status >/dev/null 2>&1 && break; sleep 0.2; done
done
i=0
for c in "${GARAGE_CFG[@]}"; do
  i=$((i + 1))
  ID=$("$GARAGE" -c "$c" node id -q)
  [ "$i" = 1 ] || $G node connect "$ID" >/dev/null
  $G layout assign -z "dc$i" -c 10G "${ID%@*}" >/dev/null
done
$G layout apply --version 1 >/dev/null
for _ in $(seq 100); do $G bucket create bench >/dev/null 2>&1 && break; sleep 0.3; done
read -r P_AK P_SK < <(garage_key bench-key bench)
}

# garage_key NAME BUCKET: creates a Garage key with full access to BUCKET; prints "AK SK".
garage_key() {
  local out
  out=$($G key create "$1")
  $G bucket allow --read --write --owner "$2" --key "$1" >/dev/null
  echo "$(echo "$out" | awk -F': *' '/Key ID/ {print $2}' | tr -d ' ')" \
    "$(echo "$out" | awk -F': *' '/Secret key/ {print $2}' | tr -d ' ')"
}
