#!/usr/bin/env bash
# Builds SeaweedFS's `weed` (github.com/seaweedfs/seaweedfs at the pinned pseudo-version,
# from the Go module proxy, local Go toolchain) into the tools cache, once. Prints the
# binary's path. A wrapper module copies SeaweedFS's one replace directive (go-bip39 ->
# cosmos/go-bip39), which `go install` of the module itself would refuse. ~5 minutes.
set -euo pipefail
VERSION=v0.0.0-20261109003541-7506e5f91cd6
CACHE="${GRANARY_TOOLS_CACHE:-$HOME/.cache/granary-tools}"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod GOPATH="$CACHE/gopath" GOMODCACHE="$CACHE/gomodcache" GOCACHE="$CACHE/gocache"
out="$CACHE/seaweedfs-$VERSION/weed"
if [ ! -x "$out" ]; then
  echo "seaweedfs: building weed $VERSION (first time only, about 5 minutes)" >&2
  w="$CACHE/seaweedfs-$VERSION/src"
  mkdir -p "$w"
  cat >"$w/go.mod" <<MOD
module granary.dev/weed-tool

go 1.25

require github.com/seaweedfs/seaweedfs $VERSION

replace github.com/tyler-smith/go-bip39 => github.com/cosmos/go-bip39 v1.0.0
MOD
  cat >"$w/tools.go" <<'GO'
//go:build tools

package tools

import _ "github.com/seaweedfs/seaweedfs/weed"
GO
  (cd "$w" && go mod tidy >/dev/null && go build -o "$out.tmp" github.com/seaweedfs/seaweedfs/weed && mv "$out.tmp" "$out")
fi
echo "$out"
