#!/usr/bin/env bash
# Renders the chart with default values into manifests/keybrake.yaml (CRDs included, preceded by
# the keybrake-system Namespace) for `kubectl apply -f manifests/`. `make manifests` runs this.
# --check: render to a temp file and fail if manifests/keybrake.yaml differs (CI drift check).
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/scripts/versions.env
HELM=${HELM:-${KEYBRAKE_CACHE:-$HOME/.cache/keybrake}/bin/helm-v$HELM_VERSION/helm}
[[ -x "$HELM" ]] || { echo "helm not found at $HELM: run 'make e2e-deps'" >&2; exit 1; }
NAMESPACE=keybrake-system
OUT=manifests/keybrake.yaml

render() {
  cat <<YAML
# Keybrake, rendered from charts/keybrake with default values by scripts/render-manifests.sh.
# Do not edit: change the chart and run 'make manifests'. Install: kubectl apply -f manifests/
---
apiVersion: v1
kind: Namespace
metadata:
  name: $NAMESPACE
  labels:
    app.kubernetes.io/name: keybrake
    # The controller runs under the strictest Pod Security level.
    pod-security.kubernetes.io/enforce: restricted
YAML
  # Fixed kube version so the output does not depend on the machine; no cluster is contacted.
  "$HELM" template keybrake charts/keybrake --namespace "$NAMESPACE" --include-crds \
    --kube-version 1.35.4
}

if [[ "${1:-}" == "--check" ]]; then
  scripts/sync-chart-files.sh --check
  tmp=$(mktemp)
  trap 'rm -f "$tmp"' EXIT
  render >"$tmp"
  diff -u "$OUT" "$tmp" >&2 || { echo "$OUT is stale: run 'make manifests' and commit it" >&2; exit 1; }
  echo "$OUT is up to date"
  exit 0
fi

scripts/sync-chart-files.sh
mkdir -p manifests
render >"$OUT"
echo "wrote $OUT"
