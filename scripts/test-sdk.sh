#!/usr/bin/env bash
# The official vendor SDKs from PyPI (stripe, openai, twilio, resend) against the real sidecar:
# allowed calls succeed, denied ones raise each SDK's own auth/permission error.
# Creates a venv under target/, builds the sidecar and the fake vendors, uses stripe-mock as the
# Stripe upstream when it builds (scripts/build-stripe-mock.sh), else the testkit's fake Stripe.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO=${CARGO:-cargo}
VENV=target/sdk-venv
PYTHON=${PYTHON:-python3}

if [[ ! -x "$VENV/bin/pytest" ]]; then
  echo "[test-sdk] creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check stripe openai twilio resend pytest
fi

$CARGO build -p keybrake-sidecar -p keybrake-testkit --bins
target_dir=$($CARGO metadata --format-version 1 --no-deps | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
export KEYBRAKE_BIN_DIR="$target_dir/debug"

if STRIPE_MOCK_BIN=$(scripts/build-stripe-mock.sh); then
  export STRIPE_MOCK_BIN
  echo "[test-sdk] Stripe upstream: stripe-mock ($STRIPE_MOCK_BIN)"
else
  unset STRIPE_MOCK_BIN
  echo "[test-sdk] Stripe upstream: testkit fake (stripe-mock did not build)"
fi

cd sdk-tests
exec "../$VENV/bin/pytest" -q -p no:cacheprovider "$@"
