#!/usr/bin/env bash
# Builds Stripe's own mock API server (github.com/stripe/stripe-mock) from the Go module proxy
# into a cache outside the repo, keyed by version, so later runs reuse it. Prints the binary's
# path on stdout; exits non-zero (with the Go error on stderr) when it cannot be built.
set -euo pipefail

STRIPE_MOCK_VERSION=${STRIPE_MOCK_VERSION:-v0.203.0}
CACHE=${KEYBRAKE_CACHE:-$HOME/.cache/keybrake}
OUT="$CACHE/bin/stripe-mock-$STRIPE_MOCK_VERSION"
mkdir -p "$OUT"
exec 8>"$CACHE/stripe-mock.lock"
flock 8

if [[ -x "$OUT/stripe-mock" ]]; then
  echo "$OUT/stripe-mock"
  exit 0
fi
# A failed attempt is remembered so every test run does not retry a slow, doomed build.
if [[ -f "$OUT/FAILED" && -z "${STRIPE_MOCK_RETRY:-}" ]]; then
  echo "stripe-mock $STRIPE_MOCK_VERSION failed to build before (see $OUT/FAILED); set STRIPE_MOCK_RETRY=1 to retry" >&2
  exit 1
fi
echo "[build-stripe-mock] go install github.com/stripe/stripe-mock@$STRIPE_MOCK_VERSION" >&2
if GOBIN="$OUT" go install "github.com/stripe/stripe-mock@$STRIPE_MOCK_VERSION" 2>"$OUT/build.log"; then
  rm -f "$OUT/FAILED"
  echo "$OUT/stripe-mock"
else
  cp "$OUT/build.log" "$OUT/FAILED"
  cat "$OUT/build.log" >&2
  exit 1
fi
