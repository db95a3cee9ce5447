#!/usr/bin/env bash
# Audit sink throughput (issue 5): rows/s into SQLite and PostgreSQL (binary COPY), the
# controller's ingest path, and a primary-key-only PostgreSQL baseline, from
# bench/audit_ingest.rs against a throwaway PostgreSQL (scripts/with-postgres.sh).
# Run through bench/run.sh. Knobs: BENCH_AUDIT_ROWS (200000), BENCH_AUDIT_BATCH (5000),
# BENCH_AUDIT_RUNS (3).
set -euo pipefail
: "${BENCH_OUT:?run through bench/run.sh}" "${BENCH_ROOT:?}"
cd "$BENCH_ROOT"

export AUDIT_BENCH_ROWS="${BENCH_AUDIT_ROWS:-200000}"
export AUDIT_BENCH_BATCH="${BENCH_AUDIT_BATCH:-5000}"
export AUDIT_BENCH_RUNS="${BENCH_AUDIT_RUNS:-3}"

scripts/with-postgres.sh cargo bench -q -p keybrake-audit --bench audit_ingest > "$BENCH_OUT/table.md"
grep -q '^| SQLite' "$BENCH_OUT/table.md" || { echo "audit: benchmark printed no table" >&2; exit 1; }

{
  echo "Targets: SQLite ≥ 20,000 rows/s, PostgreSQL COPY ≥ 100,000 rows/s (with all playbook indexes)."
  echo "Each run writes ${AUDIT_BENCH_ROWS} new rows in batches of ${AUDIT_BENCH_BATCH} into a table that"
  echo "keeps the previous runs' rows; PostgreSQL is the Debian package with default settings"
  echo "(fsync on, shared_buffers 128 MB), on the same machine as the benchmark client."
  echo
  cat "$BENCH_OUT/table.md"
} > "$BENCH_OUT/fragment.md"
