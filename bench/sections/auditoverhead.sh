#!/usr/bin/env bash
# Audit overhead (issue 5): the latency auditing adds to a proxied call at 1,000 calls/s.
# The release sidecar in standalone mode (one worker thread; the whole process, audit delivery
# thread included, pinned to core 1) proxies to bench-upstream; bench-loadgen (open loop,
# corrected for coordinated omission) measures latency with --audit none (the baseline), a
# SQLite file and PostgreSQL. Many short rounds, the destinations' order rotated each round; the
# headline p99 is taken over ALL samples of a destination pooled (a shared 2-core machine's
# noise moves single 10 s runs by 2x), beside the median of the per-round p99 ratios.
# Every audited run must have written one row per request and dropped none, or the section fails.
# Run through bench/run.sh; it re-runs itself under scripts/with-postgres.sh. PostgreSQL stands
# in for a database on another machine: it runs on core 0 at SCHED_IDLE so it never delays the
# load generator or the upstream there (its CPU is not the sidecar's cost; the sidecar's own
# COPY encoding and I/O run on core 1 and are measured).
# Knobs: BENCH_AUDIT_OVERHEAD_ROUNDS (7), BENCH_AUDIT_OVERHEAD_SECONDS (8),
# BENCH_AUDIT_OVERHEAD_RATE (1000), BENCH_AUDIT_OVERHEAD_KEYS (1000),
# BENCH_AUDIT_OVERHEAD_TARGETS ("none sqlite postgres"),
# BENCH_AUDIT_OVERHEAD_SIDECAR (sidecar binary; default the release build, e.g. an older build
# to compare before/after with the same method).
set -euo pipefail
: "${BENCH_OUT:?run through bench/run.sh}" "${BENCH_BIN:?}" "${BENCH_ROOT:?}"
cd "$BENCH_ROOT"

say() { echo "auditoverhead: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
# stop_pid, cleanup, ensure_tools, port_free, wait_port, rotate:
source bench/sections/lib.sh

LOAD_CORE=0 PROXY_CORE=1
LOG="$BENCH_OUT/log"
mkdir -p "$LOG"
if [[ -z "${KEYBRAKE_TEST_POSTGRES_URL:-}" ]]; then
  [[ $(nproc) -ge 2 ]] || die "needs 2 cores (load on core $LOAD_CORE, sidecar on core $PROXY_CORE)"
  ensure_tools "$LOG/apt.log" curl=curl taskset=util-linux chrt=util-linux sqlite3=sqlite3 psql=postgresql-client
  say "building keybrake-sidecar (release)"
  cargo build --release -q -p keybrake-sidecar -p keybrake-bench > "$LOG/build.log" 2>&1 \
    || { tail -20 "$LOG/build.log" >&2; die "the sidecar does not build (log: $LOG/build.log)"; }
  exec taskset -c "$LOAD_CORE" scripts/with-postgres.sh "$0" "$@"
fi

ROUNDS="${BENCH_AUDIT_OVERHEAD_ROUNDS:-7}"
SECONDS_MEASURED="${BENCH_AUDIT_OVERHEAD_SECONDS:-8}"
WARMUP=1
RATE="${BENCH_AUDIT_OVERHEAD_RATE:-1000}"
CONNECTIONS=16
KEYS="${BENCH_AUDIT_OVERHEAD_KEYS:-1000}"
SIDECAR="${BENCH_AUDIT_OVERHEAD_SIDECAR:-$BENCH_BIN/keybrake-sidecar}"
read -r -a TARGETS <<< "${BENCH_AUDIT_OVERHEAD_TARGETS:-none sqlite postgres}"
UPSTREAM_PORT=18280 SIDECAR_PORT=18282 SIDECAR_ADMIN_PORT=18283
UPSTREAM_SECRET="sk_test_upstream"
ROUTE="/v1/customers/cus_bench"
RESULTS="$BENCH_OUT/runs.tsv"
SAMPLES="$BENCH_OUT/samples"
mkdir -p "$SAMPLES"
: > "$RESULTS"
[[ -x "$SIDECAR" ]] || die "no sidecar binary at $SIDECAR"

PIDS=()
trap cleanup EXIT
trap 'exit 130' INT TERM

for port in $UPSTREAM_PORT $SIDECAR_PORT $SIDECAR_ADMIN_PORT; do
  port_free "$port" || die "port $port is in use; stop whatever holds it (ss -ltnp 'sport = :$port')"
done

taskset -c "$LOAD_CORE" "$BENCH_BIN/bench-upstream" --listen "127.0.0.1:$UPSTREAM_PORT" \
  --expect-authorization "Bearer $UPSTREAM_SECRET" > "$LOG/upstream.log" 2>&1 &
PIDS+=("$!")
wait_port "$UPSTREAM_PORT" "$!" || die "upstream did not start: $(cat "$LOG/upstream.log")"

export KEYBRAKE_BENCH_UPSTREAM_SECRET="$UPSTREAM_SECRET"
VAULT_KEY="$("$BENCH_BIN/bench-sidecar-config" --keys "$KEYS" --bench-index $((KEYS / 2)) \
  --upstream-url "http://127.0.0.1:$UPSTREAM_PORT" --out "$BENCH_OUT/sidecar-policy.json")"

PG_URL="$KEYBRAKE_TEST_POSTGRES_URL"
PG_PORT="${PG_URL##*:}"; PG_PORT="${PG_PORT%%[/?]*}"
PG_PID="$(ss -ltnpH "sport = :$PG_PORT" | grep -oE 'pid=[0-9]+' | head -1 | cut -d= -f2)"
[[ -n "$PG_PID" ]] || die "cannot find the PostgreSQL server listening on port $PG_PORT"
# SCHED_IDLE for the postmaster and every process it has (backends forked later inherit it).
for pid in "$PG_PID" $(pgrep -P "$PG_PID"); do
  chrt --idle -a -p 0 "$pid" > /dev/null || die "chrt --idle refused for PostgreSQL pid $pid"
done
pg_rows() { psql -X -At "$PG_URL" -c "SELECT count(*) FROM agent_call_audit" 2>/dev/null || echo 0; }

TICKS_PER_SECOND="$(getconf CLK_TCK)"
# cpu_ticks PID: user + system CPU time of a process (dead threads included), in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# delivery_ticks PID: the same for its live audit delivery threads (keybrake-audit, keybrake-aud-io).
delivery_ticks() {
  local stat total=0 t
  for stat in /proc/"$1"/task/*/stat; do
    t="$(awk '/\((keybrake-audit|keybrake-aud-io)\)/ { sub(/^.*\) /, ""); print $12 + $13 }' "$stat" 2>/dev/null || true)"
    total=$((total + ${t:-0}))
  done
  echo "$total"
}

# run_sidecar TARGET ROUND: start the sidecar with that audit destination, load it, stop it
# (which flushes the audit queue), then check the rows and record one line in $RESULTS.
run_sidecar() {
  local target="$1" round="$2" audit rows_before=0 rows_after pid out dropped idle i
  case "$target" in
    none) audit=none ;;
    sqlite) audit="sqlite://$BENCH_OUT/audit-r$round.db" ;;
    postgres) audit="$PG_URL"; rows_before="$(pg_rows)" ;;
    *) die "unknown target $target" ;;
  esac
  taskset -c "$PROXY_CORE" "$SIDECAR" --config "$BENCH_OUT/sidecar-policy.json" \
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
  local cpu_before cpu_after delivery_before delivery_after
  cpu_before="$(cpu_ticks "$pid")"
  delivery_before="$(delivery_ticks "$pid")"
  timeout --foreground $((WARMUP + SECONDS_MEASURED + 60)) taskset -c "$LOAD_CORE" "$BENCH_BIN/bench-loadgen" \
    --url "http://127.0.0.1:$SIDECAR_PORT/stripe$ROUTE" -H "Authorization: Bearer $VAULT_KEY" \
    --expect-body 1024 --rate "$RATE" --connections "$CONNECTIONS" --warmup "$WARMUP" \
    --duration "$SECONDS_MEASURED" --via sidecar --round "$round" \
    --latencies-out "$SAMPLES/$target-r$round.txt" > "$out" 2> "$out.err" \
    || die "loadgen failed ($target): $(cat "$out.err")"
  cpu_after="$(cpu_ticks "$pid")"
  delivery_after="$(delivery_ticks "$pid")"
  local metrics
  metrics="$(curl -s -m 5 "http://127.0.0.1:$SIDECAR_ADMIN_PORT/metrics")"
  dropped="$(awk '$1 == "keybrake_audit_dropped_rows_total" { print $2 }' <<< "$metrics")"
  idle="$(awk '$1 == "keybrake_audit_delivery_idle_priority" { print $2 }' <<< "$metrics")"
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
  [[ "$(wc -l < "$SAMPLES/$target-r$round.txt")" == "$ok" ]] || die "$target round $round: sample file does not hold $ok latencies"
  if [[ "$target" != none ]]; then
    # Warm-up requests are audited too, so there are at least as many rows as measured calls.
    [[ "$rows" -ge "$ok" ]] || die "$target round $round: $rows audit rows for $ok measured calls"
    [[ "${dropped:-missing}" == 0 ]] || die "$target round $round: keybrake_audit_dropped_rows_total = ${dropped:-missing}"
  fi
  # Sidecar CPU per call over the load (warm-up included), split into the audit delivery
  # threads and the rest (the request path: proxying, building and queueing the row).
  local calls=$(( (WARMUP + SECONDS_MEASURED) * ${RATE%.*} )) cpu_us delivery_us
  cpu_us="$(awk -v t=$((cpu_after - cpu_before)) -v hz="$TICKS_PER_SECOND" -v n="$calls" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')"
  delivery_us="$(awk -v t=$((delivery_after - delivery_before)) -v hz="$TICKS_PER_SECOND" -v n="$calls" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$round" "$p50" "$p99" "$ok" "$rows" "$cpu_us" "$delivery_us" "${idle:--}" >> "$RESULTS"
  say "  round $round $target: p50 ${p50} µs, p99 ${p99} µs, $ok calls, $rows rows, sidecar CPU ${cpu_us} µs/call (delivery threads ${delivery_us}), idle priority ${idle:--}"
}

say "${TARGETS[*]} x $ROUNDS rounds x (${WARMUP}+${SECONDS_MEASURED})s at $RATE req/s, sidecar $SIDECAR"
for ((round = 0; round < ROUNDS; round++)); do
  for target in $(rotate "$round" "${TARGETS[@]}"); do
    run_sidecar "$target" "$round"
  done
done

# percentile Q FILE...: nearest-rank percentile Q (0-100) over the samples in FILEs pooled.
percentile() {
  local q="$1"
  shift
  sort -m -n "$@" | awk -v q="$q" '
    { v[NR] = $1 }
    END { r = int(q / 100 * NR); if (r < q / 100 * NR) r++; if (r < 1) r = 1; printf "%.1f", v[r] }'
}
# pooled TARGET Q: percentile Q over every sample of TARGET, all rounds.
pooled() { percentile "$2" "$SAMPLES/$1"-r*.txt; }
# The method's own resolution: the baseline against itself, even rounds ÷ odd rounds (pooled p99).
noise_floor() {
  local even=() odd=() f r
  for ((r = 0; r < ROUNDS; r++)); do
    f="$SAMPLES/none-r$r.txt"
    [[ -f "$f" ]] || return 0
    if ((r % 2 == 0)); then even+=("$f"); else odd+=("$f"); fi
  done
  [[ ${#odd[@]} -gt 0 ]] || return 0
  awk -v a="$(percentile 99 "${even[@]}")" -v b="$(percentile 99 "${odd[@]}")" \
    'BEGIN { printf "Noise floor of this run: the baseline against itself, pooled p99 of its even rounds ÷ its odd rounds = %.2f (%.1f ÷ %.1f µs); ratios closer to 1 than that are not resolved.\n", a / b, a, b }'
}
describe() {
  case "$1" in
    none) echo 'none (`--audit none`, baseline)' ;;
    sqlite) echo 'SQLite file (`--audit sqlite:///…`)' ;;
    postgres) echo 'PostgreSQL (`--audit postgres://…`, same machine)' ;;
  esac
}
declare -A P50 P99
for target in "${TARGETS[@]}"; do
  P50[$target]="$(pooled "$target" 50)"
  P99[$target]="$(pooled "$target" 99)"
done
sidecar_note=""
[[ "$SIDECAR" != "$BENCH_BIN/keybrake-sidecar" ]] && sidecar_note=" Sidecar binary: \`$SIDECAR\`."
{
  echo "Target: auditing adds ≤ 10 % to a proxied call's p99 at ${RATE} calls/s (ratio ≤ 1.10)."
  echo "**Headline: the pooled p99 ratio** — p99 over all $ROUNDS rounds' samples of a destination pooled"
  echo "(≈ $((ROUNDS * SECONDS_MEASURED * ${RATE%.*})) calls each), ÷ the same for \`--audit none\`. Beside it, the median of the $ROUNDS per-round"
  echo "p99 ratios (each audited run ÷ the baseline run of the same round) and their range, which shows the noise."
  echo "keybrake-sidecar in standalone mode (\`--worker-threads 1\`, the whole process pinned to core $PROXY_CORE, $KEYS keys,"
  echo "\`GET /stripe$ROUTE\`), restarted for each run with the audit destination below; audit delivery runs on"
  echo "its own thread at \`SCHED_IDLE\` (docs/audit.md). bench-upstream (1 KB body) and bench-loadgen (open loop,"
  echo "$CONNECTIONS connections, ${WARMUP} s warm-up + ${SECONDS_MEASURED} s) on core $LOAD_CORE; PostgreSQL"
  echo "$(psql -X -At "$PG_URL" -c 'SHOW server_version' 2>/dev/null | cut -d' ' -f1 || echo '?') (scripts/with-postgres.sh, default settings) on core $LOAD_CORE at \`SCHED_IDLE\`, standing in"
  echo "for a database on another machine (so it never delays the load generator). Rounds run the destinations"
  echo "in rotated order. Each audited run wrote one row per call (checked) and dropped none.$sidecar_note"
  echo "Latency is from each request's intended send time. Sidecar CPU = its user+system time over the load"
  echo "(/proc, ${TICKS_PER_SECOND} ticks/s) ÷ calls, median over rounds; \"delivery\" = the audit delivery threads' share."
  echo "Raw: \`target/bench/auditoverhead/runs.tsv\`, samples in \`target/bench/auditoverhead/samples/\`."
  echo
  noise_floor
  echo
  echo "| audit destination | pooled p50 µs | pooled p99 µs | pooled p50 ratio | **pooled p99 ratio** (target ≤ 1.10) | per-round p99 ratio: median (min–max) | sidecar CPU µs/call (delivery) | delivery at idle priority |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for target in "${TARGETS[@]}"; do
    awk -F'\t' -v t="$target" -v label="$(describe "$target")" \
      -v p50="${P50[$target]}" -v p99="${P99[$target]}" -v b50="${P50[none]:-}" -v b99="${P99[none]:-}" '
      function median(a, n,   i, j, x) {
        for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
      }
      $1 == "none" { base99[$2] = $4 }
      $1 == t { n++; round[n] = $2; p99r[n] = $4; cpu[n] = $7; dcpu[n] = $8; idle = $9 }
      END {
        k = 0; lo = ""; hi = ""
        for (i = 1; i <= n; i++) if (base99[round[i]] > 0) {
          x = p99r[i] / base99[round[i]]; ratio[++k] = x
          if (lo == "" || x < lo) lo = x; if (hi == "" || x > hi) hi = x
        }
        per_round = (t == "none" || k == 0) ? "—" : sprintf("%.2f (%.2f–%.2f)", median(ratio, k), lo, hi)
        r50 = (b50 > 0) ? sprintf("%.2f", p50 / b50) : "n/a"
        r99 = (b99 > 0) ? sprintf("**%.2f**", p99 / b99) : "n/a"
        printf "| %s | %.1f | %.1f | %s | %s | %s | %.1f (%.1f) | %s |\n", label, p50, p99, r50, r99, per_round, median(cpu, n), median(dcpu, n), (t == "none" ? "—" : idle)
      }' "$RESULTS"
  done
} > "$BENCH_OUT/fragment.md"
cat "$BENCH_OUT/fragment.md" >&2
say "done"
