#!/usr/bin/env bash
# The chart cannot read outside its directory, so it carries copies of files whose source of truth
# lives elsewhere: crds/*.yaml (generated from the Rust types), monitoring/rules/keybrake.rules.yaml
# and monitoring/dashboards/*.json. This script makes the copies; --check fails if any drifted.
# (Copies rather than symlinks: a packaged chart or a checkout on a filesystem without symlinks
# gets real files, and the drift check makes a forgotten sync visible in CI.)
set -euo pipefail
cd "$(dirname "$0")/.."
CHART=charts/keybrake

# source-dir  glob  destination-dir
PAIRS=(
  "crds *.yaml $CHART/crds"
  "monitoring/rules keybrake.rules.yaml $CHART/files"
  "monitoring/dashboards *.json $CHART/files/dashboards"
)

expected_tree() { # builds the expected copies into $1
  local out=$1 src glob dst
  for pair in "${PAIRS[@]}"; do
    read -r src glob dst <<<"$pair"
    mkdir -p "$out/$dst"
    shopt -s nullglob
    for f in "$src"/$glob; do cp "$f" "$out/$dst/"; done
    shopt -u nullglob
  done
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
expected_tree "$tmp"

if [[ "${1:-}" == "--check" ]]; then
  status=0
  for pair in "${PAIRS[@]}"; do
    read -r _ _ dst <<<"$pair"
    mkdir -p "$tmp/$dst" "$dst" # git does not keep empty directories
    if ! diff -ru "$tmp/$dst" "$dst" >&2; then status=1; fi
  done
  if [[ $status != 0 ]]; then
    echo "chart copies are stale: run 'make manifests' (scripts/sync-chart-files.sh) and commit" >&2
    exit 1
  fi
  echo "chart copies of crds/ and monitoring/ are in sync"
  exit 0
fi

# Each copy is written beside its destination and renamed over it, so a chart rendered while this
# runs sees the old file or the new one, never a missing or half-written one. Copies whose source
# is gone are removed afterwards (only files matching the pair's glob: nothing else in the chart).
for pair in "${PAIRS[@]}"; do
  read -r _ glob dst <<<"$pair"
  mkdir -p "$dst"
  shopt -s nullglob
  for f in "$tmp/$dst"/$glob; do
    name=$(basename "$f")
    cp "$f" "$dst/.$name.sync-tmp"
    mv -f "$dst/.$name.sync-tmp" "$dst/$name"
  done
  for f in "$dst"/$glob; do
    [[ -e "$tmp/$dst/$(basename "$f")" ]] || rm -f "$f"
  done
  shopt -u nullglob
done
echo "synced chart copies into $CHART/{crds,files}"
