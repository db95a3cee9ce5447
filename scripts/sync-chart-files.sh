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

for pair in "${PAIRS[@]}"; do
  read -r _ _ dst <<<"$pair"
  rm -rf "$dst"
  mkdir -p "$dst"
  cp -R "$tmp/$dst/." "$dst/"
done
echo "synced chart copies into $CHART/{crds,files}"
