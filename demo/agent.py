"""The demo's agent: the official Stripe Python SDK, pointed at the Keybrake sidecar, issuing a
refund every --interval-ms with the vault key it was given (never the Stripe secret).

One JSON line per call goes to --log: sequence number, wall-clock send/answer times in ms
(the same clock scripts/demo.sh reads around `kubectl patch`), the verdict (`allow`, or the
sidecar's `keybrake-verdict` header), HTTP status, amount and customer. Runs until --stop-file
appears or --max-seconds pass, whichever comes first.
"""
import argparse
import json
import os
import random
import sys
import time

import stripe

CUSTOMERS = ["cus_Acme", "cus_Globex", "cus_Initech", "cus_Umbrella"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True, help="the sidecar's Stripe listener, http://127.0.0.1:PORT")
    p.add_argument("--interval-ms", type=int, default=int(os.environ.get("DEMO_CALL_INTERVAL_MS", "400")))
    p.add_argument("--log", required=True)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--max-seconds", type=float, default=300)
    p.add_argument("--key-file", required=True, help="the vault key, as read from the <vaultkey>-token Secret")
    args = p.parse_args()

    # A file, not argv or a log line: the vault key is a credential too.
    vault_key = open(args.key_file).read().strip()
    # The one line of client configuration that points the official SDK at the sidecar.
    client = stripe.StripeClient(vault_key, base_addresses={"api": args.base_url}, max_network_retries=0)
    rng = random.Random(42)
    start = time.monotonic()
    seq = 0
    with open(args.log, "a", buffering=1) as log:
        while time.monotonic() - start < args.max_seconds and not os.path.exists(args.stop_file):
            seq += 1
            due = start + seq * args.interval_ms / 1000.0
            customer = CUSTOMERS[rng.randrange(len(CUSTOMERS))]
            amount = rng.randrange(500, 2500, 5)  # cents
            sent = time.time()
            entry = {"seq": seq, "sent_ms": round(sent * 1000, 1), "customer": customer, "amount": amount}
            try:
                refund = client.v1.refunds.create(
                    params={"charge": "ch_3Demo42", "amount": amount, "currency": "usd", "customer": customer,
                            "metadata": {"agent_run": "run-42"}})
                entry.update(verdict="allow", status=200, refund=refund.id)
            except stripe.StripeError as e:
                headers = e.headers or {}
                entry.update(verdict=headers.get("keybrake-verdict") or f"vendor:{e.code}",
                             status=e.http_status or 0, error=type(e).__name__)
            except Exception as e:  # connection refused etc.: logged, the loop goes on
                entry.update(verdict="transport_error", status=0, error=f"{type(e).__name__}: {e}")
            entry["answered_ms"] = round(time.time() * 1000, 1)
            log.write(json.dumps(entry) + "\n")
            # Pace the loop (this is the agent's cadence, not a synchronisation wait).
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
