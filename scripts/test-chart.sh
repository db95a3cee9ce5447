#!/usr/bin/env bash
# Chart checks (`make test-chart`):
#   1. chart copies of crds/ and monitoring/ in sync; manifests/keybrake.yaml up to date
#   2. helm lint --strict, default and production-like values; the schema refuses bad values
#   3. golden tests of helm template (UPDATE_GOLDEN=1 rewrites the goldens)
#   4. against a real kube-apiserver (the e2e harness): helm install (no --wait) creates every
#      object, and kubectl apply --dry-run=server accepts manifests/.
# The apiserver: KEYBRAKE_CHART_KUBECONFIG if set, else the plane `make cluster` left running
# (target/e2e/env), else one started here with e2e/scripts/cluster.sh and stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/scripts/versions.env
BIN=${KEYBRAKE_CACHE:-$HOME/.cache/keybrake}/bin
HELM=${HELM:-$BIN/helm-v$HELM_VERSION/helm}
KUBECTL=${KUBECTL:-$BIN/k8s-v$K8S_VERSION/kubectl}
CHART=charts/keybrake
GOLDEN=$CHART/tests/golden
for tool in "$HELM" "$KUBECTL"; do
  [[ -x "$tool" ]] || { echo "FAIL: $tool not found: run 'make e2e-deps'" >&2; exit 1; }
done
step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

step "chart copies and rendered manifests are in sync"
scripts/render-manifests.sh --check

step "helm lint --strict"
"$HELM" lint --strict "$CHART"
"$HELM" lint --strict "$CHART" -f "$CHART/tests/values-production.yaml"

step "the schema refuses bad values"
refuse() { # description, helm args...
  local what=$1; shift
  if out=$("$HELM" lint --strict "$CHART" "$@" 2>&1); then
    fail "lint accepted $what"
  fi
  echo "refused: $what ($(grep -m1 -o "at '[^']*'[^\"]*" <<<"$out" || echo "${out##*$'\n'}"))"
}
refuse "postgres sink without a URL Secret" --set audit.sink=postgres
refuse "zero replicas" --set controller.replicas=0
refuse "an unknown key" --set controler.replicas=2
refuse "an unknown failure policy" --set injection.failurePolicy=Maybe
refuse "an invalid excluded namespace" --set 'injection.excludedNamespaces={Bad_NS}'
refuse "a negative sidecar connection cap" --set injection.sidecar.upstreamMaxConnections=-1
refuse "a key mapping for the client certificate Secret (the chart reads its tls.crt and tls.key)" \
  -f "$CHART/tests/values-production.yaml" --set audit.postgres.clientCertSecret.key=client.crt

step "golden helm template output"
render() { "$HELM" template keybrake "$CHART" --namespace keybrake-system --kube-version 1.35.4 "$@"; }
mkdir -p "$GOLDEN"
tmp=$(mktemp -d)
cleanup_tmp() { rm -rf "$tmp"; }
trap cleanup_tmp EXIT
render >"$tmp/default.yaml"
render -f "$CHART/tests/values-production.yaml" >"$tmp/production.yaml"
for name in default production; do
  if [[ "${UPDATE_GOLDEN:-}" == 1 ]]; then
    cp "$tmp/$name.yaml" "$GOLDEN/$name.yaml"
    echo "updated $GOLDEN/$name.yaml"
  else
    diff -u "$GOLDEN/$name.yaml" "$tmp/$name.yaml" >&2 \
      || fail "$GOLDEN/$name.yaml differs from helm template: review, then UPDATE_GOLDEN=1 $0"
    echo "$name: matches $GOLDEN/$name.yaml"
  fi
done

# The runbook URL reaches the dashboard's link as well as the alerts (production values set it).
grep -q '"url": "https://docs.example.com/keybrake/runbook.md"' "$tmp/production.yaml" \
  || fail "monitoring.runbookUrl is not applied to the dashboard's runbook link"

step "helm package carries the copied files"
"$HELM" package "$CHART" --destination "$tmp" >/dev/null
package=$(ls "$tmp"/keybrake-*.tgz)
tar -tzf "$package" >"$tmp/package.list" # a file, not a pipe: grep -q would SIGPIPE tar
grep -qx 'keybrake/crds/vaultkey.yaml' "$tmp/package.list" || fail "package lacks crds/vaultkey.yaml"
grep -qx 'keybrake/files/keybrake.rules.yaml' "$tmp/package.list" || fail "package lacks the rules"
if grep -q '^keybrake/tests/' "$tmp/package.list"; then fail "package ships tests/ (see .helmignore)"; fi
"$HELM" template keybrake "$package" --namespace keybrake-system --kube-version 1.35.4 \
  -f "$CHART/tests/values-production.yaml" >"$tmp/packaged.yaml"
diff -u "$GOLDEN/production.yaml" "$tmp/packaged.yaml" >&2 \
  || fail "the packaged chart renders differently from the directory"
echo "$(basename "$package"): $(wc -l <"$tmp/package.list") files, renders like the directory"

step "a real kube-apiserver"
started_here=""
if [[ -n "${KEYBRAKE_CHART_KUBECONFIG:-}" ]]; then
  export KUBECONFIG=$KEYBRAKE_CHART_KUBECONFIG
elif [[ -x e2e/scripts/cluster.sh ]]; then
  if [[ "$(e2e/scripts/cluster.sh status)" != running* ]]; then
    e2e/scripts/cluster.sh up
    started_here=1
  fi
  source target/e2e/env
else
  fail "no apiserver: run 'make cluster' (e2e/scripts/cluster.sh), or set KEYBRAKE_CHART_KUBECONFIG"
fi
"$KUBECTL" get --raw /readyz >/dev/null || fail "the apiserver at KUBECONFIG=$KUBECONFIG is not ready"
"$KUBECTL" version -o json >"$tmp/version.json"
echo "apiserver: $(grep -m1 gitVersion "$tmp/version.json" | tr -d ' ,"')"

# Namespaces never finish deleting without kube-controller-manager: a fresh one per run, and a
# release name of its own so cluster-scoped objects (ClusterRole, webhook configuration) are too.
suffix=$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')
release="keybrake-t$suffix"
namespace="keybrake-chart-$suffix"
cleanup() {
  for r in "$release" "${prod_release:-}"; do
    [[ -n "$r" ]] && "$HELM" uninstall "$r" --namespace "$namespace" >/dev/null 2>&1 || true
  done
  [[ -n "$started_here" ]] && e2e/scripts/cluster.sh down || true
  cleanup_tmp
}
trap cleanup EXIT

step "helm install (no --wait) creates every object"
"$HELM" install "$release" "$CHART" --namespace "$namespace" --create-namespace >"$tmp/install.out"
head -n 6 "$tmp/install.out"
grep -q "Revoke it" "$tmp/install.out" || fail "NOTES.txt did not render the revoke instructions"
expected=$("$HELM" get manifest "$release" --namespace "$namespace" | grep -c '^kind:')
found=$("$HELM" get manifest "$release" --namespace "$namespace" | "$KUBECTL" get -f - -o name | tee "$tmp/objects" | wc -l)
cat "$tmp/objects"
[[ "$found" == "$expected" && "$expected" -gt 0 ]] || fail "release has $expected objects, apiserver has $found"
"$KUBECTL" get crd vaultkeys.keybrake.dev -o name
echo "all $expected objects stored"

step "the controller's ServiceAccount can do its job and nothing more (kubectl auth can-i)"
sa="system:serviceaccount:$namespace:$release-controller"
can() { # expected(yes|no) verb resource [flags...]
  local expected=$1; shift
  local got
  got=$("$KUBECTL" auth can-i --as="$sa" "$@" 2>/dev/null || true)
  [[ "$got" == "$expected" ]] || fail "can-i $* as the controller: expected $expected, got '$got'"
  printf '  %-3s %s\n' "$expected" "$*"
}
can yes watch vaultkeys.keybrake.dev --all-namespaces
can yes patch vaultkeys.keybrake.dev --subresource=status -n agents
can yes delete vaultkeys.keybrake.dev -n agents
can yes list secrets --all-namespaces
can yes create secrets -n agents
can yes create tokenreviews.authentication.k8s.io
can yes create events -n agents
can yes create events.events.k8s.io -n agents
can yes update leases.coordination.k8s.io/"$release-controller" -n "$namespace"
can yes patch mutatingwebhookconfigurations.admissionregistration.k8s.io/"$release-sidecar-injector"
can yes update configmaps/keybrake-ca -n agents
can yes update secrets/"$release-tls" -n "$namespace"
can no update secrets -n agents
can no delete secrets -n agents
can no update vaultkeys.keybrake.dev -n agents
can no update leases.coordination.k8s.io/other-lease -n "$namespace"
can yes patch leases.coordination.k8s.io/"$release-controller-replica-0" -n "$namespace"
can yes watch leases.coordination.k8s.io -n "$namespace"
can no patch leases.coordination.k8s.io -n agents
can no patch mutatingwebhookconfigurations.admissionregistration.k8s.io/someone-elses
can no update configmaps/app-config -n agents
can no create pods -n agents
can no list pods --all-namespaces
can no create clusterroles.rbac.authorization.k8s.io
can no create serviceaccounts/token -n agents

step "helm install, production-like values (PostgreSQL sink: a Deployment)"
# The test plane has no cert-manager or Prometheus Operator CRDs: those objects are covered by
# the production golden; everything else is installed for real.
prod_release="keybrake-p$suffix"
"$HELM" install "$prod_release" "$CHART" --namespace "$namespace" \
  -f "$CHART/tests/values-production.yaml" --set tls.mode=controller \
  --set monitoring.prometheusRule.enabled=false,monitoring.serviceMonitor.enabled=false,monitoring.podMonitor.enabled=false \
  >/dev/null
"$KUBECTL" -n "$namespace" get deployment "$prod_release-controller" -o name
prod_expected=$("$HELM" get manifest "$prod_release" --namespace "$namespace" | grep -c '^kind:')
prod_found=$("$HELM" get manifest "$prod_release" --namespace "$namespace" | "$KUBECTL" get -f - -o name | wc -l)
[[ "$prod_found" == "$prod_expected" ]] || fail "production release has $prod_expected objects, apiserver has $prod_found"
echo "all $prod_expected objects stored"

step "kubectl apply --dry-run=server -f manifests/"
# Dry-run does not create the Namespace the other objects live in; make sure it exists, with the
# Pod Security level manifests/keybrake.yaml gives it, so the apiserver checks the pod template.
"$KUBECTL" create namespace keybrake-system --dry-run=client -o yaml | "$KUBECTL" apply -f - >/dev/null
"$KUBECTL" label namespace keybrake-system --overwrite \
  pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/warn=restricted >/dev/null
"$KUBECTL" apply --dry-run=server -f manifests/ 2>&1 | tee "$tmp/apply.out"
[[ ${PIPESTATUS[0]} == 0 ]] || fail "kubectl apply --dry-run=server -f manifests/ failed"
if grep -q "would violate PodSecurity" "$tmp/apply.out"; then
  fail "the controller's pod template violates Pod Security 'restricted'"
fi
echo "pod template passes Pod Security 'restricted'"
echo
echo "test-chart: all checks passed"
