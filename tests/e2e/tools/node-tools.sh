#!/usr/bin/env bash
# Builds the container runtime of the real-node stage (tests/e2e/tests/kubelet.rs) from
# pinned Go modules (module proxy only, local Go toolchain) into a cache outside the
# repository, keyed by version:
#   containerd, containerd-shim-runc-v2, ctr   (github.com/containerd/containerd/v2)
#   bridge, host-local, loopback               (github.com/containernetworking/plugins)
#   coredns                                    (github.com/coredns/coredns, 3 plugins)
#   pause-<tag>.tar                            (a static sandbox binary packed as an OCI
#                                               archive: no registry means no pause image)
# kubelet, kube-scheduler and kube-proxy come from k8s-tools.sh. runc is Debian's.
# Prints the directory holding the binaries. Safe to run repeatedly: built once.
set -euo pipefail
CACHE="${GRANARY_TOOLS_CACHE:-$HOME/.cache/granary-tools}"
CONTAINERD_VERSION="${CONTAINERD_VERSION:-v2.4.2}"
CNI_VERSION="${CNI_VERSION:-v1.10.0}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.15.0}"
PAUSE_TAG="3.10-granary1"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod GOPATH="$CACHE/gopath" GOMODCACHE="$CACHE/gomodcache" GOCACHE="$CACHE/gocache"
OUT="$CACHE/node-containerd-$CONTAINERD_VERSION-cni-$CNI_VERSION-coredns-$COREDNS_VERSION"
mkdir -p "$OUT/bin" "$OUT/cni"
log() { echo "node-tools: $*" >&2; }
# Progress goes to stderr; stdout carries only the output directory (last line).
exec 3>&1 1>&2
exec 9>"$CACHE/node-tools.lock"
flock 9
# One Go build at a time in the shared caches (k8s-tools.sh takes the same lock and
# both clear the caches when done).
exec 8>"$CACHE/go.lock"
flock 8

built=0
if [ ! -x "$OUT/bin/containerd" ] || [ ! -x "$OUT/bin/containerd-shim-runc-v2" ] || [ ! -x "$OUT/bin/ctr" ]; then
  w="$OUT/src/containerd"
  mkdir -p "$w"
  printf 'module granary.dev/containerd-tools\n\ngo 1.25\n\nrequire github.com/containerd/containerd/v2 %s\n' "$CONTAINERD_VERSION" > "$w/go.mod"
  cat > "$w/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
GO
  (cd "$w" && log "resolving containerd $CONTAINERD_VERSION" && go mod tidy -e >/dev/null 2>&1 || true)
  # No btrfs, devmapper or zfs snapshotters (overlayfs is used; their cgo headers are not
  # installed); the shim is static like upstream's.
  tags="no_btrfs no_devmapper no_zfs"
  for cmd in containerd containerd-shim-runc-v2 ctr; do
    if [ ! -x "$OUT/bin/$cmd" ]; then
      log "building $cmd $CONTAINERD_VERSION (first time only)"
      built=1
      (cd "$w" && CGO_ENABLED=0 go build -tags "tools $tags" -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
        -o "$OUT/bin/.$cmd.tmp" "github.com/containerd/containerd/v2/cmd/$cmd")
      mv "$OUT/bin/.$cmd.tmp" "$OUT/bin/$cmd"
    fi
  done
fi

if [ ! -x "$OUT/cni/bridge" ] || [ ! -x "$OUT/cni/host-local" ] || [ ! -x "$OUT/cni/loopback" ]; then
  w="$OUT/src/cni"
  mkdir -p "$w"
  printf 'module granary.dev/cni-tools\n\ngo 1.25\n\nrequire github.com/containernetworking/plugins %s\n' "$CNI_VERSION" > "$w/go.mod"
  cat > "$w/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "github.com/containernetworking/plugins/plugins/ipam/host-local"
	_ "github.com/containernetworking/plugins/plugins/main/bridge"
	_ "github.com/containernetworking/plugins/plugins/main/loopback"
)
GO
  (cd "$w" && log "resolving CNI plugins $CNI_VERSION" && go mod tidy -e >/dev/null 2>&1 || true)
  for p in main/bridge ipam/host-local main/loopback; do
    name=${p#*/}
    log "building CNI plugin $name $CNI_VERSION"
    built=1
    (cd "$w" && CGO_ENABLED=0 go build -tags tools -ldflags "-s -w" -o "$OUT/cni/.$name.tmp" "github.com/containernetworking/plugins/plugins/$p")
    mv "$OUT/cni/.$name.tmp" "$OUT/cni/$name"
  done
fi

# Cluster DNS for the pods (StatefulSet pod names, Services): CoreDNS with only the
# plugins the stage needs, run by the harness as a host process on the node address.
if [ ! -x "$OUT/bin/coredns" ]; then
  w="$OUT/src/coredns"
  mkdir -p "$w"
  printf 'module granary.dev/coredns-tool\n\ngo 1.25\n\nrequire github.com/coredns/coredns %s\n' "$COREDNS_VERSION" > "$w/go.mod"
  cat > "$w/main.go" <<'GO'
// Command coredns is CoreDNS with the bind, errors and kubernetes plugins only.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
)

func init() {
	dnsserver.Directives = []string{"bind", "errors", "kubernetes"}
}

func main() { coremain.Run() }
GO
  log "building coredns $COREDNS_VERSION"
  built=1
  (cd "$w" && go mod tidy >/dev/null 2>&1 && CGO_ENABLED=0 go build -ldflags "-s -w" -o "$OUT/bin/.coredns.tmp" .)
  mv "$OUT/bin/.coredns.tmp" "$OUT/bin/coredns"
fi

# The sandbox ("pause") image: a static binary that sleeps until SIGINT/SIGTERM and reaps
# children, alone in one layer, referenced as localhost/pause:$PAUSE_TAG.
if [ ! -s "$OUT/pause-$PAUSE_TAG.tar" ]; then
  for tool in umoci skopeo; do
    command -v "$tool" >/dev/null || { echo "node-tools: $tool is missing (Debian package $tool; the test command installs it)" >&2; exit 1; }
  done
  w="$OUT/src/pause"
  rm -rf "$w"; mkdir -p "$w"
  printf 'module granary.dev/pause\n\ngo 1.25\n' > "$w/go.mod"
  cat > "$w/main.go" <<'GO'
// Command pause holds a pod sandbox's namespaces: it waits for SIGINT or SIGTERM and
// reaps any child that is re-parented to it.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s == syscall.SIGCHLD {
			for {
				var ws syscall.WaitStatus
				pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
GO
  log "building the pause image"
  (cd "$w" && CGO_ENABLED=0 go build -ldflags "-s -w" -o "$w/pause" .)
  lay="$w/layout"
  umoci init --layout "$lay"
  umoci new --image "$lay:pause"
  umoci unpack --image "$lay:pause" "$w/bundle" >/dev/null
  install -m 0755 "$w/pause" "$w/bundle/rootfs/pause"
  umoci repack --image "$lay:pause" "$w/bundle"
  umoci config --image "$lay:pause" --config.entrypoint /pause --config.user 65535:65535 \
    --os linux --architecture "$(go env GOARCH)"
  # skopeo refuses to write into an existing archive (one a killed run left).
  rm -f "$OUT/pause.tar.tmp"
  skopeo copy -q "oci:$lay:pause" "docker-archive:$OUT/pause.tar.tmp:localhost/pause:$PAUSE_TAG"
  mv "$OUT/pause.tar.tmp" "$OUT/pause-$PAUSE_TAG.tar"
  rm -rf "$w/bundle"
fi
if [ "$built" -eq 1 ]; then
  log "runtime tools built; removing the Go build and module caches"
  go clean -cache -modcache >/dev/null 2>&1 || true
fi
echo "$OUT" >&3
