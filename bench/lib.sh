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
