#!/usr/bin/env bash
# Builds the Granary container images without a container engine: a minimal Debian
# runtime root file system from Debian's packages (mmdebstrap), the granary-node and
# granary-operator binaries added, packed as OCI images (umoci) and exported as OCI and
# docker archives (skopeo) that `docker load`, `kind load image-archive` and
# `ctr images import` accept. The same images as the `Dockerfile` builds with an engine.
#
#   scripts/images.sh                 # release binaries (cargo build --release)
#   scripts/images.sh --bin-dir DIR   # binaries already built in DIR (no cargo build)
#
# Output (IMAGES_OUT, default target/images):
#   oci/                              OCI layout with the tags granary-node, granary-operator
#   granary-node.docker.tar           docker archive, tagged $REGISTRY/granary-node:$VERSION
#   granary-node.oci.tar              OCI archive, same reference
#   granary-operator.{docker,oci}.tar
#
# Cached by content: the Debian root file system is built once per recipe into
# ~/.cache/granary-tools/images (GRANARY_TOOLS_CACHE), and an image is repacked only when
# its binary or the base changed. Installs mmdebstrap, umoci and skopeo when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# Progress goes to stderr; stdout carries only the output directory (last line).
exec 3>&1 1>&2

BIN_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) BIN_DIR="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0" >&3; exit 0 ;;
    *) echo "images.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

OUT="${IMAGES_OUT:-$PWD/target/images}"
CACHE="${GRANARY_TOOLS_CACHE:-$HOME/.cache/granary-tools}/images"
REGISTRY="${IMAGE_REGISTRY:-ghcr.io/granary-dev}"
VERSION="${IMAGE_VERSION:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' helm/granary/Chart.yaml)}"
# Debian release of the runtime base and what it holds: the C library and libgcc (the
# binaries' only shared libraries), CA certificates (TLS to Postgres, object stores and
# OTLP collectors), time zones and /etc/services.
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES=base-files,libc6,libgcc-s1,ca-certificates,netbase,tzdata
# Timestamps inside the images (files, history, config): fixed, so equal inputs give
# equal layers.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1767225600}"
CREATED=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
UID_GID=65532 # the distroless "nonroot" user
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
for tool in mmdebstrap umoci skopeo; do
  command -v "$tool" >/dev/null || need+=("$tool")
done
command -v strip >/dev/null || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} (Debian packages)" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# umoci unpacks as the calling user; without root it maps ownership (--rootless).
ROOTLESS=()
[ "$(id -u)" -eq 0 ] || ROOTLESS=(--rootless)

if [ -z "$BIN_DIR" ]; then
  echo "building release binaries" >&2
  cargo build --release -p granary-storage-node --bin granary-node \
    -p granary-operator --bin granary-operator >&2
  BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/release"
fi
for b in granary-node granary-operator; do
  [ -x "$BIN_DIR/$b" ] || { echo "images.sh: $BIN_DIR/$b is missing" >&2; exit 1; }
done

mkdir -p "$CACHE" "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/granary-images.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- the runtime base, once per recipe --------------------------------------------------
recipe="$SUITE $MIRROR $PACKAGES $UID_GID $SOURCE_DATE_EPOCH $(sed -n '/^base_rootfs()/,/^}/p' "$0" | sha256sum)"
base_key=$(printf '%s' "$recipe" | sha256sum | cut -c1-16)
BASE="$CACHE/base-$SUITE-$base_key.tar"
base_rootfs() {
  local root="$1"
  mmdebstrap --quiet --variant=extract --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >&2
  # The extract variant runs no maintainer scripts: what they would make is made here.
  cat "$root"/usr/share/ca-certificates/mozilla/*.crt >"$root/etc/ssl/certs/ca-certificates.crt"
  printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nnonroot:x:%s:%s:nonroot:/home/nonroot:/usr/sbin/nologin\n' \
    "$UID_GID" "$UID_GID" >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:%s:\n' "$UID_GID" >"$root/etc/group"
  mkdir -p "$root/home/nonroot" "$root/var/lib/granary" "$root/etc/granary" "$root/tmp"
  chown "$UID_GID:$UID_GID" "$root/home/nonroot" "$root/var/lib/granary"
  chmod 1777 "$root/tmp"
  # No package manager, shell helpers or documentation in the runtime image.
  rm -rf "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/info \
    "$root"/usr/share/locale "$root"/usr/share/lintian "$root"/usr/lib/x86_64-linux-gnu/gconv \
    "$root"/var/lib/apt "$root"/var/cache/apt "$root"/var/log/* "$root"/etc/apt \
    "$root"/var/lib/dpkg "$root"/etc/dpkg "$root"/dev/*
  find "$root" -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
}
if [ ! -s "$BASE" ]; then
  echo "building the Debian $SUITE runtime base ($PACKAGES)" >&2
  started=$SECONDS
  base_rootfs "$WORK/base"
  tar --sort=name --numeric-owner -C "$WORK/base" -cf "$BASE.tmp" .
  mv "$BASE.tmp" "$BASE"
  rm -rf "$WORK/base"
  echo "base: $(du -h "$BASE" | cut -f1) in $((SECONDS - started)) s" >&2
fi

# --- the images ---------------------------------------------------------------------------
LAYOUT="$OUT/oci"
[ -f "$LAYOUT/index.json" ] || { rm -rf "$LAYOUT"; umoci init --layout "$LAYOUT"; }

image() {
  local name="$1" bin="$2" description="$3" ports="$4"; shift 4 # then: the default command
  local ref="$REGISTRY/$name:$VERSION"
  local key
  key=$( { sha256sum "$BIN_DIR/$bin" | cut -d' ' -f1; echo "$base_key $ref $REVISION $* $(sed -n '/^image()/,/^}/p' "$0" | sha256sum)"; } | sha256sum | cut -c1-32)
  if [ "$(cat "$OUT/$name.key" 2>/dev/null)" = "$key" ] && [ -s "$OUT/$name.docker.tar" ]; then
    echo "$name: unchanged ($ref)" >&2
    return
  fi
  local started=$SECONDS
  umoci new --image "$LAYOUT:$name-base"
  umoci unpack "${ROOTLESS[@]}" --image "$LAYOUT:$name-base" "$WORK/$name"
  tar -C "$WORK/$name/rootfs" -xf "$BASE"
  umoci repack --image "$LAYOUT:$name-with-base" --history.created "$CREATED" \
    --history.created_by "mmdebstrap $SUITE: $PACKAGES" "$WORK/$name"
  rm -rf "$WORK/$name"
  umoci unpack "${ROOTLESS[@]}" --image "$LAYOUT:$name-with-base" "$WORK/$name"
  install -D -m 0755 "$BIN_DIR/$bin" "$WORK/$name/rootfs/usr/local/bin/$bin"
  # Debug sections stay in target/: the image carries what runs.
  strip --strip-debug "$WORK/$name/rootfs/usr/local/bin/$bin"
  touch -d "@$SOURCE_DATE_EPOCH" "$WORK/$name/rootfs/usr/local/bin/$bin"
  umoci repack --image "$LAYOUT:$name" --history.created "$CREATED" \
    --history.created_by "COPY $bin /usr/local/bin/$bin" "$WORK/$name"
  rm -rf "$WORK/$name"
  local cmd=()
  for a in "$@"; do cmd+=(--config.cmd "$a"); done
  for p in $ports; do cmd+=(--config.exposedports "$p/tcp"); done
  umoci config --image "$LAYOUT:$name" --created "$CREATED" --author "Granary" \
    --os linux --architecture amd64 --no-history \
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
