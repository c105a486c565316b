#!/usr/bin/env bash
# Builds the Granary container images without a container engine: a minimal Debian
# runtime root file system from Debian's packages (mmdebstrap), the granary-node and
# granary-operator binaries added, packed as OCI images (umoci) and exported as OCI and
# docker archives (skopeo) that `docker load`, `kind load image-archive` and
# `ctr images import` accept. The Dockerfile builds the same images with an engine (its
# runtime stage is this script's --rootfs).
#
#   scripts/images.sh                 # release binaries (cargo build --release)
#   scripts/images.sh --bin-dir DIR   # binaries already built in DIR (no cargo build)
#   scripts/images.sh --rootfs DIR    # only the runtime root file system, into DIR
#
# Output (IMAGES_OUT, default target/images):
#   oci/                              OCI layout with the tags granary-node, granary-operator
#   granary-node.docker.tar           docker archive, tagged $REGISTRY/granary-node:$VERSION
#   granary-node.oci.tar              OCI archive, same reference
#   granary-operator.{docker,oci}.tar
#
# Cached by content: the Debian root file system is built once per recipe and ISO week
# (so security updates arrive weekly) into ~/.cache/granary-tools/images
# (GRANARY_TOOLS_CACHE); an image is repacked only when its binary, the base or this
# script changed. Needs root (file ownership in the images). Installs mmdebstrap, umoci,
# skopeo and binutils when missing.
set -euo pipefail
export LC_ALL=C
SELF=$(realpath "$0")
CALLER_DIR=$PWD
# Progress goes to stderr; stdout carries only the output directory (last line).
exec 3>&1 1>&2
abs() { case "$1" in /*) echo "$1" ;; *) echo "$CALLER_DIR/$1" ;; esac; }

BIN_DIR=""
ROOTFS_ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) BIN_DIR=$(abs "$2"); shift 2 ;;
    --rootfs) ROOTFS_ONLY=$(abs "$2"); shift 2 ;;
    -h|--help) sed -n '2,23p' "$SELF" >&3; exit 0 ;;
    *) echo "images.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "images.sh: run as root (the images keep file ownership: root-owned system files, uid 65532 for the data directory)" >&2
  exit 1
fi
need=()
for tool in mmdebstrap umoci skopeo; do
  [ -n "$ROOTFS_ONLY" ] && [ "$tool" != mmdebstrap ] && continue
  command -v "$tool" >/dev/null || need+=("$tool")
done
[ -n "$ROOTFS_ONLY" ] || command -v strip >/dev/null || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} (Debian packages)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The runtime base: Debian bookworm's C library and libgcc (the binaries' only shared
# libraries), CA certificates (TLS to Postgres, object stores and OTLP collectors), time
# zones and /etc/services, with the security and stable updates.
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
PACKAGES=base-files,libc6,libgcc-s1,ca-certificates,netbase,tzdata
# Pulled in by ca-certificates' dependencies, needed only by its maintainer scripts
# (which the extract variant does not run): their files are removed.
DROP_PACKAGES="debconf mawk openssl"
# The target's Debian architecture (the binaries' for images; any for --rootfs).
ARCH="${IMAGE_ARCH:-$(dpkg --print-architecture)}"
case "$ARCH" in
  amd64) TRIPLET=x86_64-linux-gnu ;;
  arm64) TRIPLET=aarch64-linux-gnu ;;
  *) echo "images.sh: unsupported architecture $ARCH" >&2; exit 1 ;;
esac
# Timestamps inside the images (files, history, config): fixed, so equal inputs give
# equal layers.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1767225600}"
UID_GID=65532 # the distroless "nonroot" user

# Runs as mmdebstrap's extract hook ($1: the root): what the packages' maintainer
# scripts would have made, a distroless-style package list for image scanners
# (/var/lib/dpkg/status.d), and nothing a runtime image does not need.
extract_hook() {
  local root="$1" deb pkg
  mkdir -p "$root/var/lib/dpkg/status.d"
  for deb in "$root"/var/cache/apt/archives/*.deb; do
    pkg=$(dpkg-deb -f "$deb" Package)
    if [[ " $DROP_PACKAGES " == *" $pkg "* ]]; then
      dpkg-deb --fsys-tarfile "$deb" | tar -t | while read -r f; do
        f="${f#./}"
        if [ -f "$root/$f" ] || [ -L "$root/$f" ]; then rm -f "$root/$f"; fi
      done
      continue
    fi
    { dpkg-deb -f "$deb"; echo "Status: install ok installed"; } >"$root/var/lib/dpkg/status.d/$pkg"
  done
}
base_rootfs() {
  local root="$1"
  local hook="$WORK/extract-hook"
  { echo '#!/bin/bash'; echo 'set -euo pipefail'; declare -p DROP_PACKAGES; declare -f extract_hook; echo 'extract_hook "$1"'; } >"$hook"
  chmod +x "$hook"
  mmdebstrap --quiet --variant=extract --architectures="$ARCH" --include="$PACKAGES" \
    --extract-hook="$hook" \
    "$SUITE" "$root" \
    "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY_MIRROR $SUITE-security main"
  cat "$root"/usr/share/ca-certificates/mozilla/*.crt >"$root/etc/ssl/certs/ca-certificates.crt"
  printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nnonroot:x:%s:%s:nonroot:/home/nonroot:/usr/sbin/nologin\n' \
    "$UID_GID" "$UID_GID" >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:%s:\n' "$UID_GID" >"$root/etc/group"
  # /etc/hosts before DNS (a sidecar at localhost), as base-files' postinst would set.
  printf 'passwd: files\ngroup: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n' \
    >"$root/etc/nsswitch.conf"
  # The runtime provides these (kubelet, runc); the build host's must not leak in.
  : >"$root/etc/resolv.conf"
  : >"$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
  chmod 0644 "$root/etc/resolv.conf" "$root/etc/hostname" "$root/etc/hosts"
  mkdir -p "$root/home/nonroot" "$root/var/lib/granary" "$root/etc/granary" "$root/tmp"
  chown "$UID_GID:$UID_GID" "$root/home/nonroot" "$root/var/lib/granary"
  chmod 1777 "$root/tmp"
  rm -rf "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/info \
    "$root"/usr/share/locale "$root"/usr/share/lintian "$root/usr/lib/$TRIPLET/gconv" \
    "$root"/var/lib/apt "$root"/var/cache/apt "$root"/var/log/* "$root"/etc/apt \
    "$root"/var/lib/dpkg/info "$root"/var/lib/dpkg/status "$root"/etc/dpkg \
    "$root"/etc/debconf.conf "$root"/usr/share/debconf "$root"/dev/*
  find "$root" -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/granary-images.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [ -n "$ROOTFS_ONLY" ]; then
  base_rootfs "$ROOTFS_ONLY"
  echo "$ROOTFS_ONLY" >&3
  exit 0
fi

cd "$(dirname "$SELF")/.."
OUT=$(abs "${IMAGES_OUT:-$PWD/target/images}")
CACHE="${GRANARY_TOOLS_CACHE:-$HOME/.cache/granary-tools}/images"
REGISTRY="${IMAGE_REGISTRY:-ghcr.io/granary-dev}"
VERSION="${IMAGE_VERSION:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' helm/granary/Chart.yaml)}"
[ -n "$VERSION" ] || { echo "images.sh: no appVersion in helm/granary/Chart.yaml (or IMAGE_VERSION)" >&2; exit 1; }
CREATED=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)

if [ -z "$BIN_DIR" ]; then
  echo "building release binaries" >&2
  cargo build --release -p granary-storage-node --bin granary-node \
    -p granary-operator --bin granary-operator >&2
  BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/release"
  BIN_DIR=$(abs "$BIN_DIR")
fi
for b in granary-node granary-operator; do
  [ -x "$BIN_DIR/$b" ] || { echo "images.sh: $BIN_DIR/$b is missing" >&2; exit 1; }
done

mkdir -p "$CACHE" "$OUT"

# --- the runtime base, once per recipe and week ------------------------------------------
recipe="$SUITE $ARCH $MIRROR $SECURITY_MIRROR $PACKAGES $DROP_PACKAGES $UID_GID $SOURCE_DATE_EPOCH $(date -u +%G-W%V) $(sed -n '/^extract_hook()/,/^}/p;/^base_rootfs()/,/^}/p' "$SELF" | sha256sum)"
base_key=$(printf '%s' "$recipe" | sha256sum | cut -c1-16)
BASE="$CACHE/base-$SUITE-$ARCH-$base_key.tar"
if [ ! -s "$BASE" ]; then
  echo "building the Debian $SUITE runtime base ($PACKAGES, $ARCH)" >&2
  started=$SECONDS
  base_rootfs "$WORK/base"
  tmp=$(mktemp "$CACHE/.base.XXXXXX")
  tar --sort=name --numeric-owner -C "$WORK/base" -cf "$tmp" .
  mv "$tmp" "$BASE"
  rm -rf "$WORK/base"
  find "$CACHE" -maxdepth 1 -name "base-$SUITE-$ARCH-*.tar" ! -name "$(basename "$BASE")" -mtime +14 -delete
  echo "base: $(du -h "$BASE" | cut -f1) in $((SECONDS - started)) s" >&2
fi

# --- the images ---------------------------------------------------------------------------
LAYOUT="$OUT/oci"
[ -f "$LAYOUT/index.json" ] || { rm -rf "$LAYOUT"; umoci init --layout "$LAYOUT"; }

image() {
  local name="$1" bin="$2" description="$3" ports="$4"
  local ref="$REGISTRY/$name:$VERSION"
  local key
  key=$( { sha256sum "$BIN_DIR/$bin" | cut -d' ' -f1; echo "$base_key $ref $REVISION $ARCH $*"; sha256sum "$SELF"; } | sha256sum | cut -c1-32)
  shift 4 # the rest: the default command
  if [ "$(cat "$OUT/$name.key" 2>/dev/null)" = "$key" ] && [ -s "$OUT/$name.docker.tar" ] \
    && [ -s "$OUT/$name.oci.tar" ] && umoci stat --image "$LAYOUT:$name" >/dev/null 2>&1; then
    echo "$name: unchanged ($ref)" >&2
    return
  fi
  local started=$SECONDS
  umoci new --image "$LAYOUT:$name-base"
  umoci unpack --image "$LAYOUT:$name-base" "$WORK/$name"
  tar -C "$WORK/$name/rootfs" -xf "$BASE"
  umoci repack --image "$LAYOUT:$name-with-base" --history.created "$CREATED" \
    --history.created_by "mmdebstrap $SUITE: $PACKAGES" "$WORK/$name"
  rm -rf "$WORK/$name"
  umoci unpack --image "$LAYOUT:$name-with-base" "$WORK/$name"
  install -D -m 0755 "$BIN_DIR/$bin" "$WORK/$name/rootfs/usr/local/bin/$bin"
  # Debug sections stay in target/: the image carries what runs.
  strip --strip-debug "$WORK/$name/rootfs/usr/local/bin/$bin"
  find "$WORK/$name/rootfs" -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  umoci repack --image "$LAYOUT:$name" --history.created "$CREATED" \
    --history.created_by "COPY $bin /usr/local/bin/$bin" "$WORK/$name"
  rm -rf "$WORK/$name"
  local cmd=()
  for a in "$@"; do cmd+=(--config.cmd "$a"); done
  for p in $ports; do cmd+=(--config.exposedports "$p/tcp"); done
  umoci config --image "$LAYOUT:$name" --created "$CREATED" --author "Granary" \
    --os linux --architecture "$ARCH" --no-history \
    --config.user "$UID_GID:$UID_GID" --config.workingdir /var/lib/granary \
    --config.entrypoint "/usr/local/bin/$bin" --clear config.cmd "${cmd[@]}" \
    --config.env PATH=/usr/local/bin:/usr/bin:/bin \
    --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --config.label "org.opencontainers.image.title=$name" \
    --config.label "org.opencontainers.image.description=$description" \
    --config.label "org.opencontainers.image.version=$VERSION" \
    --config.label "org.opencontainers.image.revision=$REVISION" \
    --config.label "org.opencontainers.image.source=https://github.com/granary-dev/granary" \
    --config.label "org.opencontainers.image.licenses=Apache-2.0" \
    --config.label "org.opencontainers.image.created=$CREATED"
  umoci rm --image "$LAYOUT:$name-base"
  umoci rm --image "$LAYOUT:$name-with-base"
  umoci gc --layout "$LAYOUT"
  rm -f "$OUT/$name.docker.tar" "$OUT/$name.oci.tar"
  skopeo copy --quiet "oci:$LAYOUT:$name" "docker-archive:$OUT/$name.docker.tar:$ref"
  skopeo copy --quiet "oci:$LAYOUT:$name" "oci-archive:$OUT/$name.oci.tar:$ref"
  echo "$key" >"$OUT/$name.key"
  echo "$name: $ref, $(du -h "$OUT/$name.docker.tar" | cut -f1) in $((SECONDS - started)) s" >&2
}

# Entrypoints, default commands, ports and labels as in the Dockerfile.
image granary-node granary-node "Granary storage node: S3 and KV endpoints of a multi-tenant store" \
  "9000 9100 9200 9300" serve --config /etc/granary/node.toml
image granary-operator granary-operator "Granary Kubernetes operator" "" run
echo "$OUT" >&3
