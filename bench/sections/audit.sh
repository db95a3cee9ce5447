#!/usr/bin/env bash
# Audit sink throughput (issue 5): rows/s into SQLite and PostgreSQL (binary COPY; 2 and 1
# connections, UUIDv7 and UUIDv4 ids), the controller's ingest path, and a primary-key-only
# PostgreSQL baseline, from
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
  echo "keeps the previous runs' rows. Row ids are UUIDv7 as the sidecar makes them (time-ordered); the"
  echo "UUIDv4 line shows what random ids cost the primary-key index. The PostgreSQL sink splits each"
  echo "batch over its connections (default 2, one transaction each); the 1-connection line is the sink"
  echo "as it was before. Every table also carries the STORED generated dollar columns of migration 2."
  echo "PostgreSQL is the Debian package with default settings (fsync on, synchronous_commit on,"
  echo "shared_buffers 128 MB), on the same 2-core machine as the benchmark client. The baseline line"
  echo "is the same sink and table with only the primary key."
  echo
  cat "$BENCH_OUT/table.md"
} > "$BENCH_OUT/fragment.md"
