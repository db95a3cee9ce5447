#!/usr/bin/env bash
# Builds kube-apiserver, kubectl, etcd and helm from Go modules into a cache outside the repo,
# keyed by version, so later runs reuse them. Prints progress; safe to run concurrently (flock).
set -euo pipefail

# Pinned versions live in versions.env (shared with the Rust harness); env vars override.
_k8s=${K8S_VERSION:-} _etcd=${ETCD_VERSION:-} _helm=${HELM_VERSION:-}
# shellcheck source=versions.env
source "$(dirname "${BASH_SOURCE[0]}")/versions.env"
K8S_VERSION=${_k8s:-$K8S_VERSION}
ETCD_VERSION=${_etcd:-$ETCD_VERSION}
HELM_VERSION=${_helm:-$HELM_VERSION}
CACHE=${KEYBRAKE_CACHE:-$HOME/.cache/keybrake}
BIN="$CACHE/bin"
mkdir -p "$BIN" "$CACHE/build"
exec 9>"$CACHE/build.lock"
flock 9

minor=$(echo "$K8S_VERSION" | cut -d. -f2)
log() { printf '[build-k8s %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

build_k8s() {
  local out="$BIN/k8s-v$K8S_VERSION"
  if [[ -x "$out/kube-apiserver" && -x "$out/kubectl" ]]; then return; fi
  log "building kube-apiserver + kubectl v$K8S_VERSION (one time, 10-20 min on 2 cores)"
  local start=$SECONDS
  local dir="$CACHE/build/k8s-v$K8S_VERSION"
  rm -rf "$dir" && mkdir -p "$dir" "$out" && cd "$dir"
  go mod init keybrake.local/k8sbuild >/dev/null 2>&1
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  # Every staging module k8s pins at v0.0.0 is served as v0.<minor>.<patch>.
  local staged
  staged=$(grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk '{print $1}' | sort -u)
  local patch=${K8S_VERSION##*.}
  {
    echo "require k8s.io/kubernetes v$K8S_VERSION"
    for m in $staged; do echo "replace $m => $m v0.$minor.$patch"; done
  } >>go.mod
  cat >tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  go mod tidy
  local ld=""
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  go build -ldflags "$ld" -o "$out/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
  log "kube-apiserver built ($((SECONDS - start)) s)"
  go build -ldflags "$ld" -o "$out/kubectl" k8s.io/kubernetes/cmd/kubectl
  log "kubectl built ($((SECONDS - start)) s total)"
}

build_etcd() {
  local out="$BIN/etcd-v$ETCD_VERSION"
  if [[ -x "$out/etcd" ]]; then return; fi
  log "building etcd v$ETCD_VERSION"
  local dir="$CACHE/build/etcd-v$ETCD_VERSION"
  rm -rf "$dir" && mkdir -p "$dir" "$out" && cd "$dir"
  go mod init keybrake.local/etcdbuild >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >/dev/null 2>&1
  go build -o "$out/etcd" go.etcd.io/etcd/server/v3
  log "etcd built"
}

build_helm() {
  local out="$BIN/helm-v$HELM_VERSION"
  if [[ -x "$out/helm" ]]; then return; fi
  log "building helm v$HELM_VERSION"
  mkdir -p "$out"
  GOBIN="$out" go install "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
  log "helm built"
}

what=${1:-all}
case "$what" in
  k8s) build_k8s ;;
  etcd) build_etcd ;;
  helm) build_helm ;;
  all) build_etcd; build_k8s; build_helm ;;
  *) echo "usage: $0 [k8s|etcd|helm|all]" >&2; exit 2 ;;
esac
