#!/usr/bin/env bash
# Audit overhead (issue 5): the latency auditing adds to a proxied call at 1,000 calls/s.
# The release sidecar in standalone mode (one worker thread, alone on core 1) proxies to
# bench-upstream; bench-loadgen (open loop, corrected for coordinated omission) measures p50/p99
# with --audit none (the baseline), a SQLite file and PostgreSQL, interleaved over rounds.
# Every audited run must have written one row per request and dropped none, or the section fails.
# Run through bench/run.sh; it re-runs itself under scripts/with-postgres.sh (PostgreSQL, like
# the upstream and the load generator, on core 0). Knobs: BENCH_AUDIT_OVERHEAD_ROUNDS (3),
# BENCH_AUDIT_OVERHEAD_SECONDS (10), BENCH_AUDIT_OVERHEAD_RATE (1000),
# BENCH_AUDIT_OVERHEAD_KEYS (1000), BENCH_AUDIT_OVERHEAD_TARGETS ("none sqlite postgres").
set -euo pipefail
: "${BENCH_OUT:?run through bench/run.sh}" "${BENCH_BIN:?}" "${BENCH_ROOT:?}"
cd "$BENCH_ROOT"

say() { echo "auditoverhead: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

LOAD_CORE=0 PROXY_CORE=1
LOG="$BENCH_OUT/log"
mkdir -p "$LOG"
if [[ -z "${KEYBRAKE_TEST_POSTGRES_URL:-}" ]]; then
  [[ $(nproc) -ge 2 ]] || die "needs 2 cores (load on core $LOAD_CORE, sidecar on core $PROXY_CORE)"
  say "building keybrake-sidecar (release)"
  cargo build --release -q -p keybrake-sidecar -p keybrake-bench > "$LOG/build.log" 2>&1 \
    || { tail -20 "$LOG/build.log" >&2; die "the sidecar does not build (log: $LOG/build.log)"; }
  exec taskset -c "$LOAD_CORE" scripts/with-postgres.sh "$0" "$@"
fi

ROUNDS="${BENCH_AUDIT_OVERHEAD_ROUNDS:-3}"
SECONDS_MEASURED="${BENCH_AUDIT_OVERHEAD_SECONDS:-10}"
WARMUP=2
RATE="${BENCH_AUDIT_OVERHEAD_RATE:-1000}"
CONNECTIONS=16
KEYS="${BENCH_AUDIT_OVERHEAD_KEYS:-1000}"
read -r -a TARGETS <<< "${BENCH_AUDIT_OVERHEAD_TARGETS:-none sqlite postgres}"
UPSTREAM_PORT=18280 SIDECAR_PORT=18282 SIDECAR_ADMIN_PORT=18283
UPSTREAM_SECRET="sk_test_upstream"
ROUTE="/v1/customers/cus_bench"
RESULTS="$BENCH_OUT/runs.tsv"
: > "$RESULTS"

PIDS=()
stop_pid() { # stop_pid PID: TERM, wait up to 10 s, then KILL
  local pid="$1" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in curl taskset sqlite3 psql; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install -y curl util-linux sqlite3 postgresql-client"
done
port_free() { [[ -z "$(ss -ltnH "sport = :$1" 2>/dev/null)" ]]; }
for port in $UPSTREAM_PORT $SIDECAR_PORT $SIDECAR_ADMIN_PORT; do
  port_free "$port" || die "port $port is in use; stop whatever holds it (ss -ltnp 'sport = :$port')"
done
wait_port() { # wait_port PORT PID: until something listens, or the process died, or 15 s
  local port="$1" pid="$2" i
  for ((i = 0; i < 150; i++)); do
    kill -0 "$pid" 2>/dev/null || return 1
    (exec 3<> "/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

taskset -c "$LOAD_CORE" "$BENCH_BIN/bench-upstream" --listen "127.0.0.1:$UPSTREAM_PORT" \
  --expect-authorization "Bearer $UPSTREAM_SECRET" > "$LOG/upstream.log" 2>&1 &
PIDS+=("$!")
wait_port "$UPSTREAM_PORT" "$!" || die "upstream did not start: $(cat "$LOG/upstream.log")"

export KEYBRAKE_BENCH_UPSTREAM_SECRET="$UPSTREAM_SECRET"
VAULT_KEY="$("$BENCH_BIN/bench-sidecar-config" --keys "$KEYS" --bench-index $((KEYS / 2)) \
  --upstream-url "http://127.0.0.1:$UPSTREAM_PORT" --out "$BENCH_OUT/sidecar-policy.json")"

PG_URL="$KEYBRAKE_TEST_POSTGRES_URL"
# PostgreSQL stands in for a database on another machine: it shares core 0 with the load
# generator and the upstream, so it runs at nice 10 to not delay them (backends inherit it).
PG_PORT="${PG_URL##*:}"; PG_PORT="${PG_PORT%%/*}"
PG_PID="$(ss -ltnpH "sport = :$PG_PORT" | grep -oE 'pid=[0-9]+' | head -1 | cut -d= -f2)"
[[ -n "$PG_PID" ]] || die "cannot find the PostgreSQL server listening on port $PG_PORT"
renice -n 10 -p "$PG_PID" $(pgrep -P "$PG_PID") > /dev/null
pg_rows() { psql -X -At "$PG_URL" -c "SELECT count(*) FROM agent_call_audit" 2>/dev/null || echo 0; }

# cpu_ticks PID: user + system CPU time of a process, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
TICKS_PER_SECOND="$(getconf CLK_TCK)"

# run_sidecar TARGET ROUND: start the sidecar with that audit destination, load it, stop it
# (which flushes the audit queue), then check the rows and record one line in $RESULTS.
run_sidecar() {
  local target="$1" round="$2" audit rows_before=0 rows_after pid out dropped i
  case "$target" in
    none) audit=none ;;
    sqlite) audit="sqlite://$BENCH_OUT/audit-r$round.db" ;;
    postgres) audit="$PG_URL"; rows_before="$(pg_rows)" ;;
    *) die "unknown target $target" ;;
  esac
  taskset -c "$PROXY_CORE" "$BENCH_BIN/keybrake-sidecar" --config "$BENCH_OUT/sidecar-policy.json" \
    --worker-threads 1 --listen-addr 127.0.0.1 --proxy-port "$SIDECAR_PORT" \
    --admin-port "$SIDECAR_ADMIN_PORT" --stripe-port 0 --openai-port 0 --twilio-port 0 \
    --resend-port 0 --audit "$audit" > "$LOG/sidecar-$target-r$round.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  wait_port "$SIDECAR_PORT" "$pid" || die "sidecar did not start: $(tail -20 "$LOG/sidecar-$target-r$round.log")"
  for ((i = 0; i < 150; i++)); do
    [[ "$(curl -s -o /dev/null -m 1 -w '%{http_code}' "http://127.0.0.1:$SIDECAR_ADMIN_PORT/ready")" == 200 ]] && break
    sleep 0.1
  done
  [[ $i -lt 150 ]] || die "sidecar ($target) never became ready"
  out="$LOG/loadgen-$target-r$round.json"
  local cpu_before cpu_after
  cpu_before="$(cpu_ticks "$pid")"
  timeout --foreground $((WARMUP + SECONDS_MEASURED + 60)) taskset -c "$LOAD_CORE" "$BENCH_BIN/bench-loadgen" \
    --url "http://127.0.0.1:$SIDECAR_PORT/stripe$ROUTE" -H "Authorization: Bearer $VAULT_KEY" \
    --expect-body 1024 --rate "$RATE" --connections "$CONNECTIONS" --warmup "$WARMUP" \
    --duration "$SECONDS_MEASURED" --via sidecar --round "$round" > "$out" 2> "$out.err" \
    || die "loadgen failed ($target): $(cat "$out.err")"
  cpu_after="$(cpu_ticks "$pid")"
  dropped="$(curl -s -m 5 "http://127.0.0.1:$SIDECAR_ADMIN_PORT/metrics" \
    | awk '$1 == "keybrake_audit_dropped_rows_total" { print $2 }')"
  stop_pid "$pid"
  wait "$pid" 2>/dev/null || true
  case "$target" in
    none) rows_after=0 ;;
    sqlite) rows_after="$(sqlite3 "$BENCH_OUT/audit-r$round.db" 'SELECT count(*) FROM agent_call_audit')" ;;
    postgres) rows_after="$(pg_rows)" ;;
  esac
  local rows=$((rows_after - rows_before))
  local ok errors p50 p99
  ok="$(grep -oE '"ok":[0-9]+' "$out" | cut -d: -f2)"
  errors="$(grep -oE '"errors":[0-9]+' "$out" | cut -d: -f2)"
  p50="$(grep -oE '"p50_us":[0-9.]+' "$out" | cut -d: -f2)"
  p99="$(grep -oE '"p99_us":[0-9.]+' "$out" | cut -d: -f2)"
  [[ -n "$p99" && "$errors" == 0 ]] || die "$target round $round: $errors errors ($(cat "$out"))"
  if [[ "$target" != none ]]; then
    # Warm-up requests are audited too, so there are at least as many rows as measured calls.
    [[ "$rows" -ge "$ok" ]] || die "$target round $round: $rows audit rows for $ok measured calls"
    [[ "${dropped:-missing}" == 0 ]] || die "$target round $round: keybrake_audit_dropped_rows_total = ${dropped:-missing}"
  fi
  # Sidecar CPU per call over the load (warm-up included): scheduling noise barely moves it.
  local cpu_us
  cpu_us="$(awk -v ticks=$((cpu_after - cpu_before)) -v hz="$TICKS_PER_SECOND" -v calls="$(( (WARMUP + SECONDS_MEASURED) * ${RATE%.*} ))" \
    'BEGIN { printf "%.1f", ticks * 1e6 / hz / calls }')"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$round" "$p50" "$p99" "$ok" "$rows" "$cpu_us" >> "$RESULTS"
  say "  round $round $target: p50 ${p50} µs, p99 ${p99} µs, $ok calls, $rows rows, sidecar CPU ${cpu_us} µs/call"
}

rotate() { local r="$1"; shift; local a=("$@") n=$#; for ((k = 0; k < n; k++)); do echo "${a[(k + r) % n]}"; done; }
say "${TARGETS[*]} x $ROUNDS rounds x (${WARMUP}+${SECONDS_MEASURED})s at $RATE req/s"
for ((round = 0; round < ROUNDS; round++)); do
  for target in $(rotate "$round" "${TARGETS[@]}"); do
    run_sidecar "$target" "$round"
  done
done

describe() {
  case "$1" in
    none) echo 'none (`--audit none`, baseline)' ;;
    sqlite) echo 'SQLite file (`--audit sqlite:///…`)' ;;
    postgres) echo 'PostgreSQL (`--audit postgres://…`, same machine)' ;;
  esac
}
{
  echo "Target: auditing adds ≤ 10 % to a proxied call's p99 at ${RATE} calls/s (ratio ≤ 1.10)."
  echo "keybrake-sidecar in standalone mode (\`--worker-threads 1\`, alone on core $PROXY_CORE, $KEYS keys,"
  echo "\`GET /stripe$ROUTE\`), restarted for each run with the audit destination below; bench-upstream"
  echo "(1 KB body), bench-loadgen (open loop, $CONNECTIONS connections, ${WARMUP} s warm-up + ${SECONDS_MEASURED} s) and"
  echo "PostgreSQL $(psql -X -At "$PG_URL" -c 'SHOW server_version' 2>/dev/null | cut -d' ' -f1 || echo '?') (scripts/with-postgres.sh, default settings) on core $LOAD_CORE at nice 10 (it stands in for a database on another machine)."
  echo "Each audited run wrote one row per call (checked) and dropped none. Medians over $ROUNDS interleaved rounds;"
  echo "latency is from each request's intended send time. Sidecar CPU = its user+system time over the load"
  echo "(/proc, ${TICKS_PER_SECOND} ticks/s) ÷ calls: on a busy shared machine it moves far less than p99."
  echo "Raw: \`target/bench/auditoverhead/runs.tsv\`."
  echo
  echo "| audit destination | p50 µs | p99 µs | p50 ratio | p99 ratio (target ≤ 1.10) | sidecar CPU µs/call (ratio) | p99 each round µs |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | --- |"
  for target in "${TARGETS[@]}"; do
    awk -F'\t' -v t="$target" -v label="$(describe "$target")" '
      function median(a, n,   i, j, x) {
        for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
      }
      $1 == "none" { bn++; b50[bn] = $3; b99[bn] = $4; bcpu[bn] = $7 }
      $1 == t { n++; p50[n] = $3; p99[n] = $4; cpu[n] = $7; each = each (n > 1 ? ", " : "") $4 }
      END {
        m50 = median(p50, n); m99 = median(p99, n); mcpu = median(cpu, n)
        r50 = bn ? sprintf("%.2f", m50 / median(b50, bn)) : "n/a"
        r99 = bn ? sprintf("%.2f", m99 / median(b99, bn)) : "n/a"
        bc = bn ? median(bcpu, bn) : 0
        rcpu = bc > 0 ? sprintf("%.2f", mcpu / bc) : "n/a"
        printf "| %s | %.1f | %.1f | %s | %s | %.1f (%s) | %s |\n", label, m50, m99, r50, r99, mcpu, rcpu, each
      }' "$RESULTS"
  done
} > "$BENCH_OUT/fragment.md"
cat "$BENCH_OUT/fragment.md" >&2
say "done"
