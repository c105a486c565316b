#!/usr/bin/env bash
# Builds the linearizability checker (tests/e2e/tools/lincheck: Porcupine v1.3.1 from the
# Go module proxy, local Go toolchain) into a cache outside the repository, keyed by a
# hash of its sources. Prints the binary's path. Safe to run repeatedly: built once.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)/lincheck"
CACHE="${GRANARY_TOOLS_CACHE:-$HOME/.cache/granary-tools}"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod GOPATH="$CACHE/gopath" GOMODCACHE="$CACHE/gomodcache" GOCACHE="$CACHE/gocache"
sum=$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" | sha256sum | cut -c1-12)
out="$CACHE/lincheck-$sum/lincheck"
if [ ! -x "$out" ]; then
  echo "lincheck: building the Porcupine checker (first time only)" >&2
  mkdir -p "$(dirname "$out")"
  (cd "$here" && go build -o "$out.tmp" . && mv "$out.tmp" "$out")
fi
echo "$out"
