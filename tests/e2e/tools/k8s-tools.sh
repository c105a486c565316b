#!/usr/bin/env bash
# Builds the control-plane test tools from pinned Go modules (module proxy only, local
# Go toolchain) into a cache outside the repository, keyed by version:
#   kube-apiserver, kube-controller-manager, kubectl, (k8s.io/kubernetes, wrapper module)
#   kubelet, kube-scheduler, kube-proxy                (the real-node stage)
#   etcd                                               (go.etcd.io/etcd/server/v3, wrapper module)
#   helm                                               (helm.sh/helm/v3)
# Prints the directory holding the binaries. Safe to run repeatedly: built once.
set -euo pipefail
CACHE="${GRANARY_TOOLS_CACHE:-$HOME/.cache/granary-tools}"
K8S_VERSION="${K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.7.3}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod GOPATH="$CACHE/gopath" GOMODCACHE="$CACHE/gomodcache" GOCACHE="$CACHE/gocache"
OUT="$CACHE/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION"
mkdir -p "$OUT/bin"
log() { echo "k8s-tools: $*" >&2; }
# One Go build at a time in the shared caches (node-tools.sh takes the same lock and
# both clear the caches when done).
exec 8>"$CACHE/go.lock"
flock 8

staging="api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api
cri-client cri-streaming csi-translation-lib dynamic-resource-allocation endpointslice externaljwt
kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
mount-utils pod-security-admission sample-apiserver sample-cli-plugin sample-controller streaming"

built=0
K8S_CMDS="kube-apiserver kube-controller-manager kubectl kubelet kube-scheduler kube-proxy"
missing=""
for cmd in $K8S_CMDS; do [ -x "$OUT/bin/$cmd" ] || missing="$missing $cmd"; done
if [ -n "$missing" ]; then
  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  staging_version="v0.${K8S_VERSION#v1.}"
  w="$OUT/src/kubernetes"
  mkdir -p "$w"
  {
    echo "module granary.dev/k8s-tools"
    echo
    echo "go 1.25"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    for m in $staging; do echo "	k8s.io/$m => k8s.io/$m $staging_version"; done
    echo ")"
  } > "$w/go.mod"
  cat > "$w/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  (cd "$w" && log "resolving k8s.io/kubernetes $K8S_VERSION" && go mod tidy -e >/dev/null 2>&1 || true)
  for cmd in $K8S_CMDS; do
    if [ ! -x "$OUT/bin/$cmd" ]; then
      log "building $cmd $K8S_VERSION (first time only; several minutes)"
      built=1
      (cd "$w" && go build -tags tools -ldflags "$ldflags" -o "$OUT/bin/.$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
      mv "$OUT/bin/.$cmd.tmp" "$OUT/bin/$cmd"
    fi
  done
fi

if [ ! -x "$OUT/bin/etcd" ]; then
  w="$OUT/src/etcd"
  mkdir -p "$w"
  printf 'module granary.dev/etcd-tool\n\ngo 1.25\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > "$w/go.mod"
  cat > "$w/main.go" <<'GO'
// Command etcd runs etcd's server main, built from go.etcd.io/etcd/server/v3.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  log "building etcd $ETCD_VERSION"
  built=1
  (cd "$w" && go mod tidy >/dev/null && go build -o "$OUT/bin/.etcd.tmp" .)
  mv "$OUT/bin/.etcd.tmp" "$OUT/bin/etcd"
fi

if [ ! -x "$OUT/bin/helm" ]; then
  log "building helm $HELM_VERSION"
  built=1
  GOBIN="$OUT/bin" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
# Everything is built: the Go build and module caches (~7 GB after Kubernetes) are not
# needed again, and CI disks are small.
if [ "$built" -eq 1 ]; then
  log "all tools built; removing the Go build and module caches"
  go clean -cache -modcache >/dev/null 2>&1 || true
fi
echo "$OUT/bin"
