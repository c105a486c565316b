#!/usr/bin/env bash
# Builds actionlint (github.com/rhysd/actionlint, pinned below, from the Go module proxy
# with the local Go toolchain) into a cache outside the repository, once per version.
# Prints the binary's path.
set -euo pipefail
VERSION=v1.7.12
CACHE="${GRANARY_TOOLS_CACHE:-$HOME/.cache/granary-tools}"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod GOPATH="$CACHE/gopath" GOMODCACHE="$CACHE/gomodcache" GOCACHE="$CACHE/gocache"
out="$CACHE/actionlint-$VERSION/actionlint"
if [ ! -x "$out" ]; then
  echo "actionlint: building $VERSION (first time only)" >&2
  mkdir -p "$(dirname "$out")"
  GOBIN="$(dirname "$out")" go install "github.com/rhysd/actionlint/cmd/actionlint@$VERSION"
fi
echo "$out"
