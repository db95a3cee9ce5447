#!/usr/bin/env bash
# Control-plane benchmark (issue 4): revocation propagation from one keybrake-controller
# (release build) to 1,000 simulated sidecar streams held by one process
# (bench-stream-swarm), with 10,000 VaultKeys, against the e2e harness's real kube-apiserver +
# etcd (keybrake-cluster serve, in this section's own directory, so it never touches a plane
# started by `make cluster`). Run through bench/run.sh. Whole section bounded by
# BENCH_CP_TIMEOUT (600 s).
# Knobs: BENCH_CP_KEYS (10000), BENCH_CP_STREAMS (1000), BENCH_CP_REVOCATIONS (40),
# BENCH_CP_NAMESPACES (10), BENCH_CP_SERVICE_ACCOUNTS (2 per namespace), BENCH_CP_TIMEOUT (600),
# BENCH_CONTROLLER_BIN (a prebuilt release keybrake-controller instead of building this tree's).
set -euo pipefail
: "${BENCH_OUT:?run through bench/run.sh}" "${BENCH_BIN:?}" "${BENCH_ROOT:?}"
cd "$BENCH_ROOT"

KEYS="${BENCH_CP_KEYS:-10000}"
STREAMS="${BENCH_CP_STREAMS:-1000}"
REVOCATIONS="${BENCH_CP_REVOCATIONS:-40}"
NAMESPACES="${BENCH_CP_NAMESPACES:-10}"
SERVICE_ACCOUNTS="${BENCH_CP_SERVICE_ACCOUNTS:-2}"
TIMEOUT="${BENCH_CP_TIMEOUT:-600}"
STREAM_PORT=18443 ADMIN_PORT=18480
TARGET_DIR="${CARGO_TARGET_DIR:-$BENCH_ROOT/target}"
LOG="$BENCH_OUT/log"
mkdir -p "$LOG"

say() { echo "controlplane: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# 1,000 TLS streams: one descriptor each in the swarm and in the controller, plus the
# apiserver's own. Raise the soft limit (children inherit it) or stop with the fix.
NEED_FDS=$((STREAMS * 2 + 4096))
if (($(ulimit -n) < NEED_FDS)); then
  ulimit -n "$NEED_FDS" 2>/dev/null ||
    die "open-file limit $(ulimit -n) (hard $(ulimit -Hn)) < $NEED_FDS: raise it (ulimit -Hn / limits.conf)"
fi
say "open-file limit $(ulimit -n)"

# ---- processes: every one started here is recorded and stopped on exit -----------------
CLUSTER_PID="" CONTROLLER_PID=""
stop_pid() { # stop_pid PID SECONDS: TERM, wait, then KILL
  local pid="$1" i
  [[ -n "$pid" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  stop_pid "$CONTROLLER_PID" 10
  # keybrake-cluster stops kube-apiserver and etcd itself on TERM and removes its directory.
  stop_pid "$CLUSTER_PID" 30
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for port in $STREAM_PORT $ADMIN_PORT; do
  [[ -z "$(ss -ltnH "sport = :$port" 2>/dev/null)" ]] || die "port $port is in use"
done

CONTROLLER="${BENCH_CONTROLLER_BIN:-$BENCH_BIN/keybrake-controller}"
if [[ -z "${BENCH_CONTROLLER_BIN:-}" ]]; then
  say "building keybrake-controller (release)"
  cargo build --release -q -p keybrake-controller
fi
[[ -x "$CONTROLLER" ]] || die "$CONTROLLER missing"
cargo build -q -p keybrake-e2e --bin keybrake-cluster
SWARM="$BENCH_BIN/bench-stream-swarm"
[[ -x "$SWARM" ]] || die "$SWARM missing: cargo build --release -p keybrake-bench"

# ---- the plane -----------------------------------------------------------------------------
plane="$BENCH_OUT/cluster" env_file="$BENCH_OUT/cluster.env"
setsid "$TARGET_DIR/debug/keybrake-cluster" serve --dir "$plane" --env-file "$env_file" \
  --pid-file "$BENCH_OUT/cluster.pid" </dev/null >"$LOG/cluster.log" 2>&1 &
CLUSTER_PID=$!
for ((i = 0; i < 1800; i++)); do
  [[ -s "$env_file" ]] && break
  kill -0 "$CLUSTER_PID" 2>/dev/null || { tail -n 30 "$LOG/cluster.log" >&2; die "plane failed to start (run make e2e-deps?)"; }
  sleep 0.1
done
[[ -s "$env_file" ]] || die "plane not ready after 180 s"
# shellcheck disable=SC1090
source "$env_file"
say "$(head -n1 "$LOG/cluster.log")"
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for condition=established --timeout=60s crd/vaultkeys.keybrake.dev >/dev/null
kubectl create namespace keybrake-system >/dev/null

# ---- the controller --------------------------------------------------------------------------
"$CONTROLLER" --stream-addr "127.0.0.1:$STREAM_PORT" --admin-addr "127.0.0.1:$ADMIN_PORT" \
  --tls-ca-out "$BENCH_OUT/controller-ca.pem" --lease-namespace keybrake-system \
  --identity bench-controller </dev/null >"$LOG/controller.out" 2>"$LOG/controller.log" &
CONTROLLER_PID=$!
for ((i = 0; i < 300; i++)); do
  [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ADMIN_PORT/ready" || true)" == 200 ]] && break
  kill -0 "$CONTROLLER_PID" 2>/dev/null || { tail -n 30 "$LOG/controller.log" >&2; die "controller exited"; }
  sleep 0.1
done
[[ -s "$BENCH_OUT/controller-ca.pem" ]] || die "controller not ready after 30 s (log: $LOG/controller.log)"
say "controller ready (pid $CONTROLLER_PID)"

# ---- the swarm -------------------------------------------------------------------------------
remaining=$((TIMEOUT - SECONDS))
((remaining > 60)) || die "no time left for the swarm (BENCH_CP_TIMEOUT=$TIMEOUT)"
say "swarm: $KEYS keys, $STREAMS streams, $REVOCATIONS revocations (bounded by ${remaining} s)"
timeout --foreground "$remaining" "$SWARM" \
  --controller-url "https://127.0.0.1:$STREAM_PORT" --ca "$BENCH_OUT/controller-ca.pem" \
  --controller-admin "127.0.0.1:$ADMIN_PORT" --controller-pid "$CONTROLLER_PID" \
  --clk-tck "$(getconf CLK_TCK)" --keys "$KEYS" --streams "$STREAMS" \
  --revocations "$REVOCATIONS" --namespaces "$NAMESPACES" --phase-timeout-secs "$remaining" \
  --service-accounts-per-namespace "$SERVICE_ACCOUNTS" \
  --fragment "$BENCH_OUT/fragment.md" --results "$BENCH_OUT/results.json" \
  2> >(tee "$LOG/swarm.log" >&2)
kill -0 "$CONTROLLER_PID" 2>/dev/null || die "the controller died during the run (log: $LOG/controller.log)"
grep -q '^| PATCH returned' "$BENCH_OUT/fragment.md" || die "the swarm wrote no table"
if [[ -n "${BENCH_CONTROLLER_BIN:-}" ]]; then
  printf '\nController binary: prebuilt `%s` (BENCH_CONTROLLER_BIN, sha256 %.12s), not built from the commit above.\n' \
    "$CONTROLLER" "$(sha256sum "$CONTROLLER" | cut -d' ' -f1)" >> "$BENCH_OUT/fragment.md"
fi
