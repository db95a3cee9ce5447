#!/usr/bin/env bash
# `make demo`: the 2am incident, replayed end to end on this machine.
#
# A local kube-apiserver + etcd (the e2e harness), the VaultKey CRD, keybrake-controller, one
# keybrake-sidecar in controller mode, stripe-mock as Stripe, and an agent (the official Stripe
# Python SDK) issuing refunds through the sidecar. The demo measures the spike on /metrics and
# proves the alert rule with promtool, revokes with `kubectl patch`, times the revoke, runs the
# morning-after audit queries and compares the revoke with rotating the key at the vendor.
#
# Environment:
#   DEMO_FAST=1                 short run for CI (6 s of traffic instead of 20 s)
#   DEMO_SPIKE_SECONDS=N        seconds of agent traffic before the revoke
#   DEMO_CALL_INTERVAL_MS=N     the agent's cadence (default 400)
#   DEMO_BASELINE_PER_MIN=N     the simulated baseline the spike rule compares with (default 12)
# Logs, the agent's call log, the promtool test and audit.db stay in target/demo/run afterwards.
# Exit status: 0 when the revoke was enforced (denied within the tolerance, no late leak,
# `kubectl get vk` shows Revoked and 1/1 sidecars, the spike rule agrees); non-zero otherwise.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

FAST=${DEMO_FAST:-0}
INTERVAL_MS=${DEMO_CALL_INTERVAL_MS:-400}
if [[ $FAST == 1 ]]; then SPIKE_SECONDS=${DEMO_SPIKE_SECONDS:-6}; else SPIKE_SECONDS=${DEMO_SPIKE_SECONDS:-20}; fi
BASELINE=${DEMO_BASELINE_PER_MIN:-12}
TOLERANCE_MS=1000 # DESIGN.md: a revoke is enforced in under one second
NS=keybrake-demo
VK=refund-agent-run-42
SA=refund-agent
CARGO=${CARGO:-cargo}
CACHE=${KEYBRAKE_CACHE:-$HOME/.cache/keybrake}
RUN=$ROOT/target/demo/run
VENV=$ROOT/target/demo-venv
PROBLEMS=()

# ------------------------------------------------------------------ output

START_MS=$(date +%s%3N)
if [[ -t 1 ]]; then B=$'\e[1m' D=$'\e[2m' R=$'\e[0m'; else B='' D='' R=''; fi
stamp() { local e=$(( $(date +%s%3N) - START_MS )); printf '%02d:%02d' $((e / 60000)) $((e / 1000 % 60)); }
STEP=0
step() { STEP=$((STEP + 1)); printf '\n%s[%s] %d/7  %s%s\n' "$B" "$(stamp)" "$STEP" "$*" "$R"; }
say() { printf '  %s\n' "$*"; }
indent() { sed 's/^/    /'; }
fail() { PROBLEMS+=("$1"); say "FAIL: $1"; }
die() { say "ERROR: $*" >&2; exit 1; }
took() { local s=$(( ($(date +%s%3N) - $1) )); printf '%d.%01d s' $((s / 1000)) $((s % 1000 / 100)); }

# ------------------------------------------------------------------ processes and cleanup
#
# Every long-running process is started by `spawn` in a session (process group) of its own,
# under a small guard that also stops it when this script dies without running its trap
# (SIGKILL): the guard reads the "lifeline" FIFO, whose only writer is this script's fd 9.

SPAWNED=() # "name:pgid", in start order
spawn() {
  local name=$1
  shift
  setsid bash -c '
    out=$1; shift
    exec 3<&0 # the lifeline (a background job would get /dev/null as its stdin)
    "$@" >"$out.out" 2>"$out.log" </dev/null 3<&- & child=$!
    cat <&3 >/dev/null & lifeline=$!
    wait -n "$child" "$lifeline" || true
    kill -TERM "$child" "$lifeline" 2>/dev/null || true
    wait "$child" 2>/dev/null' guard "$RUN/$name" "$@" <"$RUN/lifeline" 9>&- &
  SPAWNED+=("$name:$!")
}
pid_of() { local e; for e in "${SPAWNED[@]}"; do [[ ${e%%:*} == "$1" ]] && { echo "${e##*:}"; return; }; done; }
alive() { local p; p=$(pid_of "$1"); [[ -n $p ]] && kill -0 "$p" 2>/dev/null; }

stop_group() { # stop_group PGID DEADLINE_S
  local pgid=$1 deadline=$((SECONDS + $2))
  kill -TERM -- "-$pgid" 2>/dev/null || return 0
  while kill -0 -- "-$pgid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then kill -KILL -- "-$pgid" 2>/dev/null || true; break; fi
    sleep 0.05 # polling interval of a bounded wait
  done
}

CLEANED=0
cleanup() {
  ((CLEANED)) && return 0
  CLEANED=1
  local t0 i names=()
  t0=$(date +%s%3N)
  for ((i = ${#SPAWNED[@]} - 1; i >= 0; i--)); do
    stop_group "${SPAWNED[i]##*:}" 20
    names+=("${SPAWNED[i]%%:*}")
  done
  exec 9>&- 2>/dev/null || true
  if ((${#names[@]})); then
    say "stopped ${names[*]} in $(took "$t0"); nothing left running (logs: ${RUN#"$ROOT"/})"
  fi
}
on_exit() {
  local rc=$?
  if ((!CLEANED)); then
    printf '\n[%s] cleaning up after %s\n' "$(stamp)" "$([[ $rc == 0 ]] && echo exit || echo "exit status $rc")"
    cleanup
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Bounded poll: poll DESCRIPTION SECONDS COMMAND... (quiet; returns 1 on timeout).
poll() {
  local what=$1 deadline=$(($(date +%s%3N) + $2 * 1000))
  shift 2
  until "$@" >/dev/null 2>&1; do
    if (($(date +%s%3N) >= deadline)); then say "timed out waiting for $what"; return 1; fi
    sleep 0.05 # polling interval of a bounded wait
  done
}
# Bounded wait for a process started by `spawn`: fails at once if it exits.
# started NAME DESCRIPTION SECONDS COMMAND...
started() {
  local name=$1 what=$2 deadline=$(($(date +%s%3N) + $3 * 1000))
  shift 3
  until "$@" >/dev/null 2>&1; do
    if ! alive "$name"; then say "$name exited while starting (log: ${RUN#"$ROOT"/}/$name.log):"; tail -n 15 "$RUN/$name.log" "$RUN/$name.out" 2>/dev/null | indent; return 1; fi
    if (($(date +%s%3N) >= deadline)); then say "timed out waiting for $what"; tail -n 15 "$RUN/$name.log" | indent; return 1; fi
    sleep 0.05 # polling interval of a bounded wait
  done
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ------------------------------------------------------------------ 0. build

printf '%sKeybrake demo: the 2am incident, replayed on this machine%s %s(%s)%s\n' "$B" "$R" "$D" \
  "$([[ $FAST == 1 ]] && echo "fast mode: ${SPIKE_SECONDS} s of traffic" || echo "${SPIKE_SECONDS} s of traffic; DEMO_FAST=1 for a short run")" "$R"

rm -rf "$RUN"
mkdir -p "$RUN/bin"
mkfifo "$RUN/lifeline"
exec 9<>"$RUN/lifeline"

printf '\n%s[%s] build what the demo needs%s\n' "$B" "$(stamp)" "$R"
# shellcheck source=../e2e/scripts/versions.env
source e2e/scripts/versions.env
k8s_bins=("$CACHE/bin/etcd-v$ETCD_VERSION/etcd" "$CACHE/bin/k8s-v$K8S_VERSION/kube-apiserver"
  "$CACHE/bin/k8s-v$K8S_VERSION/kubectl" "$CACHE/bin/helm-v$HELM_VERSION/helm")
missing=0
for b in "${k8s_bins[@]}"; do [[ -x $b ]] || missing=1; done
if ((missing)); then
  say "Kubernetes test binaries: not cached yet, building etcd $ETCD_VERSION, kube-apiserver + kubectl $K8S_VERSION"
  say "and helm $HELM_VERSION from Go modules (ONE TIME: about 5 min on 2 cores; cached in ${CACHE/#"$HOME"/\~}/bin)"
  t=$(date +%s%3N)
  e2e/scripts/build-k8s.sh all 2>&1 | indent
  say "one-time Kubernetes build took $(took "$t")"
else
  say "Kubernetes test binaries: cached (etcd $ETCD_VERSION, kube-apiserver/kubectl $K8S_VERSION, helm $HELM_VERSION;"
  say "the one-time build from Go modules took about 5 min on 2 cores, see e2e/README.md)"
fi

t=$(date +%s%3N)
if STRIPE_MOCK=$(scripts/build-stripe-mock.sh 2> >(indent >&2)); then
  STRIPE_KIND=stripe-mock
  say "Stripe upstream: stripe-mock, Stripe's own mock API server, built from its Go module ($(took "$t"))"
else
  STRIPE_KIND=fake
  say "Stripe upstream: stripe-mock did not build; using the testkit's faithful fake Stripe"
fi

t=$(date +%s%3N)
PROMTOOL=$(scripts/install-promtool.sh)
say "promtool: ${PROMTOOL/#"$HOME"/\~} ($(took "$t"))"

t=$(date +%s%3N)
say "cargo build: keybrake-controller, keybrake-sidecar, keybrake-cluster, keybrake-demo-audit"
build_pkgs=(-p keybrake-controller -p keybrake-sidecar -p keybrake-e2e -p keybrake-demo)
[[ $STRIPE_KIND == fake ]] && build_pkgs+=(-p keybrake-testkit)
$CARGO build -q "${build_pkgs[@]}" --bins 2>&1 | indent
target_dir=$($CARGO metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
# Copies, so a parallel `cargo build` cannot swap a binary under a running demo.
for b in keybrake-controller keybrake-sidecar keybrake-cluster keybrake-demo-audit; do
  cp "$target_dir/debug/$b" "$RUN/bin/"
done
[[ $STRIPE_KIND == fake ]] && cp "$target_dir/debug/fake-vendor" "$RUN/bin/"
say "binaries ready ($(took "$t"))"

t=$(date +%s%3N)
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import stripe, yaml' 2>/dev/null; then
  say "Python venv ${VENV#"$ROOT"/}: installing the official Stripe SDK (and PyYAML) from PyPI"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check stripe pyyaml 2>&1 | indent
fi
PY=$VENV/bin/python
say "agent runtime: official Stripe Python SDK $("$PY" -c 'import stripe; print(stripe.VERSION)') ($(took "$t"))"
# The demo's own judgement is tested first: a demo that cannot fail proves nothing.
"$PY" -m unittest -q demo/test_report.py 2>"$RUN/report-selftest.log" ||
  { indent <"$RUN/report-selftest.log"; die "demo/test_report.py failed"; }
say "verdict logic self-test (demo/test_report.py): passed"

# ------------------------------------------------------------------ 1. control plane + keys

step "start the local control plane, the controller, stripe-mock and the agent's sidecar"
t=$(date +%s%3N)
spawn control-plane "$RUN/bin/keybrake-cluster" serve --dir "$RUN/plane" --env-file "$RUN/plane.env" \
  --pid-file "$RUN/plane.pid"
started control-plane "the control plane" 180 test -s "$RUN/plane.env" || die "the control plane did not start"
# shellcheck disable=SC1091
source "$RUN/plane.env"
say "kube-apiserver $K8S_VERSION + etcd $ETCD_VERSION on 127.0.0.1: ready in $(took "$t")"

kubectl apply -f crds/vaultkey.yaml | indent
kubectl wait --for=condition=Established crd/vaultkeys.keybrake.dev --timeout=30s >/dev/null

STRIPE_PORT=$(free_port)
if [[ $STRIPE_KIND == stripe-mock ]]; then
  # Both listeners on free loopback ports (stripe-mock otherwise also binds :12112 for HTTPS).
  spawn stripe-mock "$STRIPE_MOCK" -http-addr "127.0.0.1:$STRIPE_PORT" -https-addr "127.0.0.1:$(free_port)"
  STRIPE_URL=http://127.0.0.1:$STRIPE_PORT
  started stripe-mock "stripe-mock to listen" 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$STRIPE_PORT" || die "stripe-mock did not start"
else
  spawn stripe-mock "$RUN/bin/fake-vendor" --vendor stripe --secret sk_test_51KeybrakeDemoUpstreamSecret
  started stripe-mock "the fake Stripe" 30 grep -q '^http://127.0.0.1:' "$RUN/stripe-mock.out" || die "the fake Stripe did not start"
  STRIPE_URL=$(head -n 1 "$RUN/stripe-mock.out")
fi
say "Stripe upstream ($STRIPE_KIND) at $STRIPE_URL"

sed -e "s|\${NAMESPACE}|$NS|g" -e "s|\${STRIPE_MOCK_URL}|$STRIPE_URL|g" demo/incident.yaml >"$RUN/incident.yaml"
kubectl apply -f "$RUN/incident.yaml" | indent

t=$(date +%s%3N)
spawn controller "$RUN/bin/keybrake-controller" --stream-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 \
  --tls-ca-out "$RUN/controller-ca.pem" --lease-namespace "$NS" --watch-namespace "$NS" \
  --audit-sink "sqlite://$RUN/audit.db"
started controller "the controller" 30 grep -q 'listening stream=' "$RUN/controller.out" || die "the controller did not start"
CONTROLLER_STREAM=$(sed -n 's/.*listening stream=\([^ ]*\).*/\1/p' "$RUN/controller.out")
CONTROLLER_ADMIN=$(sed -n 's/.*admin=\([^ ]*\).*/\1/p' "$RUN/controller.out")
started controller "the controller's /ready" 30 curl -sf "http://$CONTROLLER_ADMIN/ready" || die "the controller never became ready"
say "keybrake-controller: streams https://$CONTROLLER_STREAM, admin http://$CONTROLLER_ADMIN ($(took "$t"))"

token_b64() { kubectl get secret "$VK-token" -n "$NS" -o jsonpath='{.data.VAULT_KEY}'; }
poll "the controller to mint the vault key" 30 bash -c "[[ -n \$(kubectl get secret $VK-token -n $NS -o jsonpath='{.data.VAULT_KEY}') ]]" ||
  die "no $VK-token Secret"
(umask 077 && token_b64 | base64 -d >"$RUN/vault-key")
say "vault key minted into Secret $VK-token: vault_key_… ($(wc -c <"$RUN/vault-key") chars; never printed, never in a log)"
(umask 077 && kubectl create token "$SA" -n "$NS" --audience keybrake --duration 1h >"$RUN/sa-token")
say "sidecar identity: kubectl create token $SA --audience keybrake (TokenReview'd by the controller)"

# Audit rows: shipped by the sidecar to the controller's POST /v1/audit, written by the controller
# into SQLite. A sidecar without that pipeline prints them as JSON lines instead, and the demo
# loads those into the same SQLite store with the controller's ingest code.
if "$RUN/bin/keybrake-sidecar" --help 2>/dev/null | grep -q -- '--audit-flush-timeout'; then
  AUDIT_VIA=controller
  audit_args=(--audit controller --spool-dir "$RUN/audit-spool")
else
  AUDIT_VIA=stdout
  audit_args=(--audit stdout)
fi
t=$(date +%s%3N)
spawn sidecar "$RUN/bin/keybrake-sidecar" \
  --controller-url "https://$CONTROLLER_STREAM" --token-file "$RUN/sa-token" --ca-file "$RUN/controller-ca.pem" \
  --proxy-port 0 --stripe-port 0 --openai-port 0 --twilio-port 0 --resend-port 0 --admin-port 0 \
  --addr-file "$RUN/sidecar-addrs.json" "${audit_args[@]}" --pod-name refund-agent-7d9f-demo
started sidecar "the sidecar" 30 test -s "$RUN/sidecar-addrs.json" || die "the sidecar did not start"
read -r SIDECAR_STRIPE SIDECAR_ADMIN < <("$PY" -c '
import json, sys
a = json.load(open(sys.argv[1]))
print(dict(a["vendors"])["stripe"], a["admin"])' "$RUN/sidecar-addrs.json")
started sidecar "the sidecar to receive the key (status 1/1)" 30 \
  bash -c "[[ \$(kubectl get vaultkey $VK -n $NS -o jsonpath='{.status.enforcement.summary}') == 1/1 ]]" ||
  die "the sidecar never acknowledged the key"
say "keybrake-sidecar for $SA: Stripe listener http://$SIDECAR_STRIPE, admin http://$SIDECAR_ADMIN; holds the key ($(took "$t"))"
kubectl get vk -n "$NS" | indent

# ------------------------------------------------------------------ 2 + 3. the agent and the spike

step "the agent goes into a loop: a refund every ${INTERVAL_MS} ms through the sidecar"
say "official Stripe SDK: stripe.StripeClient(vault_key, base_addresses={\"api\": \"http://$SIDECAR_STRIPE\"})"
say "key policy: refunds.create only, dailyUsdCap \$5000, perCallUsdMax \$50, callsPerMinute 600"
say "calls/min since the agent started (baseline: $BASELINE calls/min, simulated; the spike alert is at 5x):"
spawn agent "$PY" demo/agent.py --base-url "http://$SIDECAR_STRIPE" --key-file "$RUN/vault-key" \
  --interval-ms "$INTERVAL_MS" --log "$RUN/agent-calls.jsonl" --stop-file "$RUN/agent.stop" --max-seconds 600
"$PY" demo/report.py watch-spike --metrics "http://$SIDECAR_ADMIN/metrics" --key "$VK" \
  --seconds "$SPIKE_SECONDS" --print-every "$([[ $FAST == 1 ]] && echo 1 || echo 2)" --baseline "$BASELINE" \
  --out "$RUN/spike-samples.json"
alive agent || { tail -n 20 "$RUN/agent.log" | indent; die "the agent died"; }

step "the page: calls per minute for $NS/$VK against its baseline (KeybrakeCallRateSpike)"
"$PY" demo/report.py spike --samples "$RUN/spike-samples.json" --rules monitoring/rules/keybrake.rules.yaml \
  --promtool "$PROMTOOL" --baseline "$BASELINE" --out "$RUN/spike-test.yaml" ||
  fail "the spike rule did not behave as its numbers say (promtool test rules $RUN/spike-test.yaml)"

# ------------------------------------------------------------------ 4. revoke

step "revoke: kubectl patch vaultkey $VK --type merge -p '{\"spec\":{\"state\":\"Revoked\"}}'"
PATCH_SENT_MS=$(date +%s%3N)
PATCH_SENT_ISO=$(date -u -d "@${PATCH_SENT_MS:0:-3}.${PATCH_SENT_MS: -3}" +%H:%M:%S.%3N)
kubectl patch vaultkey "$VK" -n "$NS" --type merge -p '{"spec":{"state":"Revoked"}}' >"$RUN/patch.out"
PATCH_RETURNED_MS=$(date +%s%3N)
PATCH_RETURNED_ISO=$(date -u -d "@${PATCH_RETURNED_MS:0:-3}.${PATCH_RETURNED_MS: -3}" +%H:%M:%S.%3N)
indent <"$RUN/patch.out"
"$PY" demo/report.py wait-denied --log "$RUN/agent-calls.jsonl" --since-ms "$PATCH_SENT_MS" --count 3 --deadline 10 ||
  true # judged below from the log
touch "$RUN/agent.stop"
poll "the agent to stop" 10 bash -c "! kill -0 $(pid_of agent) 2>/dev/null" || true

STATUS_OK=0
revoked_and_enforced() {
  kubectl get vaultkey "$VK" -n "$NS" -o json >"$RUN/vk.json" &&
    "$PY" -c '
import json, sys
s = json.load(open(sys.argv[1])).get("status") or {}
e = s.get("enforcement") or {}
propagated = any(c.get("type") == "Propagated" and c.get("status") == "True" for c in s.get("conditions") or [])
sys.exit(0 if s.get("phase") == "Revoked" and e.get("sidecars") == 1 and e.get("acknowledged") == 1 and propagated else 1)' "$RUN/vk.json"
}
if poll "kubectl get vk to show Revoked, enforced by 1/1 (Propagated)" 30 revoked_and_enforced; then STATUS_OK=1; fi
kubectl get vaultkey "$VK" -n "$NS" -o json >"$RUN/vk.json"
"$PY" demo/report.py timeline --log "$RUN/agent-calls.jsonl" --patch-sent-ms "$PATCH_SENT_MS" \
  --patch-returned-ms "$PATCH_RETURNED_MS" --patch-sent-iso "$PATCH_SENT_ISO" --patch-returned-iso "$PATCH_RETURNED_ISO" \
  --interval-ms "$INTERVAL_MS" --tolerance-ms "$TOLERANCE_MS" --vk-json "$RUN/vk.json" --status-ok "$STATUS_OK" \
  --out "$RUN/summary.json"
echo
say "\$ kubectl get vk -n $NS"
kubectl get vk -n "$NS" | indent
if ((STATUS_OK)); then
  say "condition Propagated: $(kubectl get vaultkey "$VK" -n "$NS" -o jsonpath='{.status.conditions[?(@.type=="Propagated")].message}')"
fi

# ------------------------------------------------------------------ 5. morning after

step "the morning after: the audit trail (agent_call_audit in SQLite)"
CALLS=$(grep -c . "$RUN/agent-calls.jsonl" || true)
REL_RUN=${RUN#"$ROOT"/}
if [[ $AUDIT_VIA == controller ]]; then
  if "$PY" demo/report.py wait-rows --db "$RUN/audit.db" --count "$CALLS" --deadline 20; then
    say "every call has its audit row: $CALLS calls, $CALLS rows (sidecar → HTTP/2 POST /v1/audit → controller → SQLite)"
  else
    fail "audit rows missing: the agent made $CALLS calls (see $REL_RUN/sidecar.log, controller.log)"
  fi
else
  say "(this sidecar build has no audit shipper: rows come from its --audit stdout JSON lines)"
  if "$PY" demo/report.py wait-rows --rows "$RUN/sidecar.out" --count "$CALLS" --deadline 10; then
    say "every call has its audit row: $CALLS calls, $CALLS rows (sidecar → JSON lines → ingest → SQLite)"
  else
    fail "audit rows missing: the agent made $CALLS calls"
  fi
  (cd "$ROOT" && "$RUN/bin/keybrake-demo-audit" load --db "$REL_RUN/audit.db" "$REL_RUN/sidecar.out") | indent
fi
say "queries from docs/audit.md (audit/src/queries.rs), run unchanged; by hand: sqlite3 $REL_RUN/audit.db"
echo
"$RUN/bin/keybrake-demo-audit" playbook --db "$RUN/audit.db" --key "$NS/$VK" --max-rows 8 | indent

# ------------------------------------------------------------------ 6. revoke vs rotate

step "revoke vs rotate: how long the leaked credential keeps working"
"$PY" demo/report.py compare --summary "$RUN/summary.json" --table-only

# ------------------------------------------------------------------ 7. clean up + verdict

step "clean up"
cleanup
verdict_args=()
for p in "${PROBLEMS[@]}"; do verdict_args+=(--problem "$p"); done
echo
"$PY" demo/report.py compare --summary "$RUN/summary.json" --verdict-only --tolerance-ms "$TOLERANCE_MS" \
  --spike-result "$RUN/spike-test.result" "${verdict_args[@]}"
