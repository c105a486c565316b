#!/usr/bin/env bash
# Builds the benchmark peers from the Go module proxy into a cache outside the repo,
# keyed by version: warp (load generator) and MinIO (the peer we compare against).
# Usage: bench/tools.sh   -> prints the two binary paths.
set -euo pipefail
CACHE="${GRANARY_TOOLS_CACHE:-$HOME/.cache/granary-tools}"
WARP_VERSION="${WARP_VERSION:-v1.6.1}"
MINIO_VERSION="${MINIO_VERSION:-latest}"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod

build() { # name module version
  local name=$1 module=$2 version=$3 dir
  dir="$CACHE/$name-$version"
  if [ ! -x "$dir/bin/$name" ]; then
    echo "building $module@$version into $dir (first time only; several minutes)" >&2
    mkdir -p "$dir"
    GOBIN="$dir/bin" GOPATH="$CACHE/gopath" GOMODCACHE="$CACHE/gomodcache" go install "$module@$version" >&2
  fi
  echo "$dir/bin/$name"
}

build warp github.com/minio/warp "$WARP_VERSION"
build minio github.com/minio/minio "$MINIO_VERSION"
