#!/usr/bin/env bash
# Installs promtool from Debian's `prometheus` package into the Keybrake tool cache and prints its
# path on stdout. Only the package's files are unpacked (`dpkg-deb -x`): the Prometheus service is
# never installed or started. Cached by package version; safe to run concurrently (flock).
#
#   PROMTOOL=$(scripts/install-promtool.sh)
set -euo pipefail

cache_bin="${KEYBRAKE_CACHE:-$HOME/.cache/keybrake}/bin"
mkdir -p "$cache_bin"

log() { echo "install-promtool: $*" >&2; }
die() {
  log "ERROR: $*"
  log "promtool comes from Debian's prometheus package; on Debian/Ubuntu run:"
  log "  sudo apt-get update && scripts/install-promtool.sh"
  log "or put a promtool (2.42 or newer) on PATH and set PROMTOOL=/path/to/promtool."
  exit 1
}

# An explicit override wins (e.g. a promtool the CI image already has).
if [[ -n "${PROMTOOL:-}" ]]; then
  [[ -x "$PROMTOOL" ]] || die "PROMTOOL=$PROMTOOL is not an executable"
  echo "$PROMTOOL"
  exit 0
fi

exec 9>"$cache_bin/.promtool.lock"
flock 9

# Fast path: any cached build. Newest version first, so an upgrade in the cache is picked up.
cached=$(ls -d "$cache_bin"/promtool-*/ 2>/dev/null | sort -V | tail -n 1 || true)
if [[ -n "$cached" && -x "${cached}promtool" ]]; then
  echo "${cached}promtool"
  exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found (not a Debian-family system)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

candidate_version() {
  apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}' | grep -v '(none)' || true
}

work=$(mktemp -d "$cache_bin/.promtool-tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT

version=$(candidate_version)
if [[ -z "$version" ]] || ! (cd "$work" && apt-get download prometheus >&2); then
  log "package lists lack prometheus or the download failed: running apt-get update"
  as_root apt-get update >&2 || die "apt-get update failed"
  version=$(candidate_version)
  [[ -n "$version" ]] || die "no 'prometheus' package in the configured apt sources"
  (cd "$work" && apt-get download prometheus >&2) || die "apt-get download prometheus failed"
fi

deb=$(ls "$work"/prometheus_*.deb 2>/dev/null | head -n 1)
[[ -n "$deb" ]] || die "apt-get download produced no prometheus_*.deb"
dpkg-deb -x "$deb" "$work/root" || die "dpkg-deb -x $deb failed"
[[ -x "$work/root/usr/bin/promtool" ]] || die "$deb does not contain usr/bin/promtool"
"$work/root/usr/bin/promtool" --version >/dev/null 2>&1 || die "the unpacked promtool does not run"

dest="$cache_bin/promtool-$version"
rm -rf "$dest.partial"
mkdir -p "$dest.partial"
mv "$work/root/usr/bin/promtool" "$dest.partial/promtool"
rm -rf "$dest"
mv "$dest.partial" "$dest"
log "installed promtool $version"
echo "$dest/promtool"
