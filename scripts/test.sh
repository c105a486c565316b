#!/usr/bin/env bash
# The whole Granary test suite: formatting, lints, unit tests and the end-to-end tests
# (real granary-node processes, a private Postgres, the AWS SDK, boto3, the AWS CLI).
# Installs what it needs when missing: Debian's postgresql, curl, boto3 and awscli (and
# fuse3 when not run as root). The power-loss tests need /dev/fuse; without it they fail.
set -euo pipefail
cd "$(dirname "$0")/.."
# Incremental caches roughly doubled target/ for a one-shot run; CI disks are not large.
export CARGO_INCREMENTAL=0

step() { printf '\n==> %s\n' "$*"; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    $SUDO apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

step "checking test dependencies"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "installing Debian's postgresql (for the catalog tests)"
  apt_install postgresql
fi
command -v curl >/dev/null || apt_install curl
command -v openssl >/dev/null || apt_install openssl
command -v runuser >/dev/null || apt_install util-linux
command -v ip >/dev/null || apt_install iproute2
# The power-loss file system (tests/powerloss-fs) mounts FUSE itself when root; others
# go through fusermount3. It must not be skipped: no /dev/fuse is an error.
if [ ! -c /dev/fuse ]; then
  echo "error: /dev/fuse is missing; the power-loss tests need FUSE (modprobe fuse, or give the container /dev/fuse)" >&2
  exit 1
fi
[ "$(id -u)" -eq 0 ] || command -v fusermount3 >/dev/null || apt_install fuse3
command -v umount >/dev/null || apt_install mount
if ! python3 -c 'import boto3' 2>/dev/null; then
  echo "installing boto3"
  python3 -m pip install -q boto3
fi
if ! command -v aws >/dev/null || ! aws --version >/dev/null 2>&1; then
  echo "installing the AWS CLI"
  python3 -m pip install -q awscli
fi

step "Kubernetes test tools (kube-apiserver, kube-controller-manager, kubectl, kubelet, kube-scheduler, kube-proxy, etcd, helm; built once into the cache)"
K8S_BIN=$(tests/e2e/tools/k8s-tools.sh)
export GRANARY_K8S_BIN_DIR="$K8S_BIN"
echo "using $K8S_BIN"

step "real-node tools (containerd, CNI plugins, CoreDNS, pause image; built once into the cache)"
command -v iptables >/dev/null || apt_install iptables
command -v umoci >/dev/null || apt_install umoci
command -v skopeo >/dev/null || apt_install skopeo
command -v runc >/dev/null || apt_install runc
command -v flock >/dev/null || apt_install util-linux
GRANARY_NODE_TOOLS_DIR=$(tests/e2e/tools/node-tools.sh)
export GRANARY_NODE_TOOLS_DIR
echo "using $GRANARY_NODE_TOOLS_DIR"

step "linearizability checker (Porcupine v1.3.1; built once into the cache)"
GRANARY_LINCHECK_BIN=$(tests/e2e/tools/lincheck.sh)
export GRANARY_LINCHECK_BIN
echo "using $GRANARY_LINCHECK_BIN"

step "actionlint (the release workflow; actionlint v1.7.12 built once into the cache)"
"$(tests/e2e/tools/actionlint.sh)" .github/workflows/*.yml

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

# One build of every target, so the binaries the end-to-end tests start and the tests
# themselves share one feature resolution (two cargo invocations with different target
# sets compiled dependencies twice: double the disk, and once two rustls backends).
step "cargo build --workspace --all-targets"
cargo build --workspace --all-targets
export GRANARY_NODE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/granary-node"
export GRANARY_OPERATOR_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/granary-operator"
export GRANARY_POWERLOSS_FS_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/granary-powerloss-fs"

step "container images (scripts/images.sh from the debug binaries; the Debian base is built once into the cache)"
command -v runc >/dev/null || apt_install runc
GRANARY_IMAGES_DIR=$(IMAGES_OUT="${CARGO_TARGET_DIR:-$PWD/target}/images" \
  scripts/images.sh --bin-dir "${CARGO_TARGET_DIR:-$PWD/target}/debug")
export GRANARY_IMAGES_DIR
echo "images in $GRANARY_IMAGES_DIR"

# Network namespaces and bridges of multi-node tests that were killed before their
# cleanup ran (names: gr<5 hex>n<i>, grb<5 hex>); nothing else uses those names.
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^gr[0-9a-f]{5}n[0-9]+$'); do
  ip netns del "$ns" || true
done
for br in $(ip -o link show type bridge 2>/dev/null | awk -F': ' '{print $2}' | grep -E '^grb[0-9a-f]{5}$'); do
  ip link del "$br" || true
done

# Containers of the image tests whose run was killed before their cleanup ran.
if command -v runc >/dev/null; then
  for id in $(runc --root /run/granary-e2e-runc list -q 2>/dev/null | grep -E '^granary-e2e-' || true); do
    runc --root /run/granary-e2e-runc delete --force "$id" || true
  done
fi

step "cargo test --workspace"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo
echo "granary: $passed passed, $failed failed"
exit "$status"
