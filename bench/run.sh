#!/usr/bin/env bash
# make bench: run benchmark sections and rewrite their parts of docs/BENCHMARKS.md.
#
#   bench/run.sh                 every section, in order
#   bench/run.sh dataplane       one section; the others in the document stay as they were
#
# A section is a script bench/sections/NAME.sh. It is run with BENCH_OUT (its own scratch
# directory under target/bench/NAME), BENCH_BIN (target/release) and BENCH_ROOT set, and must
# write its Markdown (tables, no heading) to "$BENCH_OUT/fragment.md", start nothing it does not
# stop (trap), use loopback only and finish in bounded time. This script adds the heading, the
# machine, the date and the exact command, and splices the result between the section's
# markers in docs/BENCHMARKS.md. A section without a script keeps a "not measured yet" note.
# To add one: create bench/sections/NAME.sh and add NAME and its title to SECTIONS below.
# Sections share fixed loopback ports, so one run at a time: a second run fails at once (flock on
# target/bench/.lock).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

LOCK="${CARGO_TARGET_DIR:-$ROOT/target}/bench/.lock"
mkdir -p "$(dirname "$LOCK")"
exec 9>> "$LOCK"
if ! flock -n 9; then
  echo "bench: another bench/run.sh (pid $(cat "$LOCK" 2>/dev/null || echo '?')) holds $LOCK;" \
    "its sections use the same ports: wait until it ends (or stop it), then run again" >&2
  exit 1
fi
echo $$ > "$LOCK"

# Order = order in the document.
SECTIONS=(dataplane controlplane audit auditoverhead)
declare -A TITLE=(
  [dataplane]="Data plane: sidecar vs nginx vs direct (issue 3)"
  [controlplane]="Control plane: revocation propagation"
  [audit]="Audit ingest"
  [auditoverhead]="Audit overhead on a proxied call"
)

DOC="docs/BENCHMARKS.md"
# Ctrl-C stops everything: the section's own trap stops what it started.
trap 'exit 130' INT TERM
export BENCH_ROOT="$ROOT"
export BENCH_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"

usage() { echo "usage: bench/run.sh [${SECTIONS[*]}]..." >&2; exit 2; }

requested=("$@")
[[ ${#requested[@]} -eq 0 ]] && requested=("${SECTIONS[@]}")
for name in "${requested[@]}"; do
  [[ -n "${TITLE[$name]:-}" ]] || { echo "unknown section: $name" >&2; usage; }
done

command_line="bench/run.sh${*:+ $*}"
[[ -n "${MAKELEVEL:-}" ]] && command_line="make bench (= $command_line)"
overrides="$(env | grep -E '^BENCH_[A-Z_]+=' | grep -vE '^BENCH_(OUT|BIN|ROOT)=' | sort | tr '\n' ' ' || true)"
[[ -n "$overrides" ]] && command_line="$overrides$command_line"

machine_line() {
  local model
  model="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "Machine: nproc $(nproc), CPU \`${model:-unknown}\`, kernel $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min, before the section; the machine is shared). Commit \`$(git rev-parse --short HEAD 2>/dev/null || echo none)$([[ -z "$(git status --porcelain -- sidecar api 2>/dev/null)" ]] || echo ' + uncommitted changes in sidecar/ or api/')\`."
}

echo "bench: building release binaries of keybrake-bench" >&2
cargo build --release -q -p keybrake-bench >&2 9>&-

ensure_doc() {
  if [[ ! -s "$DOC" ]]; then
    mkdir -p "$(dirname "$DOC")"
    cat > "$DOC" <<'HEADER'
# Benchmarks

Written by `make bench` (bench/run.sh); do not edit by hand between the markers. Every number
sits beside its baseline measured in the same run, with the machine, the date and the exact
command that produced it. The machines are shared 2-core boxes: compare within a run, not
across runs. `bench/run.sh SECTION` re-measures one section and leaves the others as they are.
HEADER
  fi
  local name fragment
  for name in "${SECTIONS[@]}"; do
    if ! grep -qF "<!-- bench:$name:begin -->" "$DOC"; then
      fragment="$(mktemp)"
      printf '## %s\n\n_Not measured yet: add bench/sections/%s.sh._\n' "${TITLE[$name]}" "$name" > "$fragment"
      "$BENCH_BIN/bench-report" splice --doc "$DOC" --section "$name" --fragment "$fragment"
      rm -f "$fragment"
    fi
  done
}
ensure_doc

failed=()
for name in "${requested[@]}"; do
  script="bench/sections/$name.sh"
  if [[ ! -x "$script" ]]; then
    echo "bench: section $name has no $script yet; leaving its note in $DOC" >&2
    continue
  fi
  export BENCH_OUT="${CARGO_TARGET_DIR:-$ROOT/target}/bench/$name"
  rm -rf "$BENCH_OUT"
  mkdir -p "$BENCH_OUT"
  started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  machine="$(machine_line)"
  t0=$SECONDS
  echo "bench: === $name ===" >&2
  # 9>&-: only this script holds the lock, not what a section leaves behind by mistake.
  if ! "$script" 9>&-; then
    echo "bench: section $name FAILED; $DOC keeps its previous $name section" >&2
    failed+=("$name")
    continue
  fi
  whole="$BENCH_OUT/section.md"
  {
    printf '## %s\n\n' "${TITLE[$name]}"
    printf 'Command: `%s` · started %s · took %d s.  \n' "$command_line" "$started" "$((SECONDS - t0))"
    printf '%s\n\n' "$machine"
    cat "$BENCH_OUT/fragment.md"
  } > "$whole"
  "$BENCH_BIN/bench-report" splice --doc "$DOC" --section "$name" --fragment "$whole"
  echo "bench: $name written to $DOC" >&2
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "bench: failed sections: ${failed[*]}" >&2
  exit 1
fi
