"""The measuring and printing half of `make demo` (scripts/demo.sh runs the processes).

Subcommands:
  watch-spike   scrape the sidecar's /metrics while the agent runs; print calls/min as it rises
  spike         evaluate the KeybrakeCallRateSpike rule on the measured rate with promtool
  wait-denied   wait (bounded) until the agent logged N calls denied after a time
  wait-rows     wait (bounded) until an NDJSON file holds N rows
  timeline      the revoke timeline from the agent's log and the patch's timestamps
  compare       measured revoke vs the vendors' rotate tails, and the verdict (exit 1 on FAIL)

Everything here reads files the demo wrote; nothing is simulated except where the output says
so (the key's baseline history for the spike rule).
"""
import argparse
import json
import math
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

METRIC = "keybrake_calls_total"
LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

# Published rotate tails (seconds), from DESIGN.md: how long a leaked vendor key keeps working
# while it is being rotated at the vendor.
VENDORS = [
    ("Stripe: roll the secret key", 45, 192),
    ("Twilio: rotate the auth token", 30, 120),
    ("OpenAI: rotate the project key", 60, 300),
]


# ---------------------------------------------------------------- small helpers

def load_json_lines(path):
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line being written right now; the next poll sees it whole
    return out


def table(headers, rows, right=(), indent="  "):
    """Aligned columns, indented; columns whose index is in `right` are right-aligned."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def fmt(row):
        return indent + "  ".join((c.rjust(widths[i]) if i in right else c.ljust(widths[i])) for i, c in enumerate(row)).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells])


def duration(seconds):
    """45 s, 3m12s, 1 m."""
    if seconds < 60:
        return f"{seconds:g} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} m" if s == 0 else f"{m}m{s:02d}s"


def ms(value):
    return f"{value:,.0f} ms"


def scrape(url, key):
    """Sum of keybrake_calls_total by verdict for vault_key=key, and one label set of its allow series."""
    text = urllib.request.urlopen(url, timeout=2).read().decode()
    by_verdict, labels_of_allow = {}, None
    for line in text.splitlines():
        m = LINE.match(line)
        if not m or m["name"] != METRIC:
            continue
        labels = dict(LABEL.findall(m["labels"]))
        if labels.get("vault_key") != key:
            continue
        verdict = labels.get("verdict", "")
        by_verdict[verdict] = by_verdict.get(verdict, 0) + float(m["value"])
        if verdict == "allow":
            labels_of_allow = labels
    return by_verdict, labels_of_allow


# ---------------------------------------------------------------- watch-spike

def watch_spike(a):
    """Scrapes every --every seconds for --seconds, printing allowed calls and calls/min."""
    samples = []
    start = time.time()
    next_print = 0.0
    labels = None
    while True:
        now = time.time()
        by_verdict, seen = scrape(a.metrics, a.key)
        labels = seen or labels
        allowed = by_verdict.get("allow", 0)
        samples.append({"t_ms": now * 1000, "allowed": allowed})
        elapsed = now - start
        if elapsed >= next_print:
            first = samples[0]
            span = (now * 1000 - first["t_ms"]) / 60000
            rate = (allowed - first["allowed"]) / span if span > 0 else 0
            bar = "#" * min(40, int(rate / 5))
            vs = f"{rate / a.baseline:5.1f}x baseline" if a.baseline else ""
            print(f"  {'+%.1fs' % elapsed:>6}  allowed calls {allowed:4.0f}  {rate:5.0f} calls/min  {vs}  {bar}".rstrip(), flush=True)
            next_print += a.print_every
        if elapsed >= a.seconds:
            break
        time.sleep(a.every)  # the scrape cadence (a sampling interval, not a synchronisation wait)
    Path(a.out).write_text(json.dumps({"samples": samples, "labels": labels}))


# ---------------------------------------------------------------- spike

def render_annotation(template, labels, value):
    text = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)
    text = re.sub(r'\{\{\s*\$value\s*\|\s*printf\s*"%\.0f"\s*\}\}', f"{value:.0f}", text)
    if "{{" in text:
        raise SystemExit(f"demo/report.py cannot render this annotation template: {template!r}")
    return text


def spike(a):
    import yaml  # in the demo venv (scripts/demo.sh installs it)

    data = json.loads(Path(a.samples).read_text())
    samples, labels = data["samples"], data["labels"]
    if not labels or len(samples) < 2:
        print("  FAIL: the sidecar's /metrics never showed an allowed call for this key")
        return 1
    first, last = samples[0], samples[-1]
    minutes = (last["t_ms"] - first["t_ms"]) / 60000
    measured = (last["allowed"] - first["allowed"]) / minutes
    rate = int(round(measured))
    base = a.baseline
    floor = 30
    should_fire = rate >= 5 * base and rate >= floor

    rules = yaml.safe_load(Path(a.rules).read_text())
    rule = next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "KeybrakeCallRateSpike")
    for_minutes = int(str(rule.get("for", "0m")).rstrip("m") or 0)
    key_labels = {k: labels[k] for k in ("namespace", "agent", "vault_key")}
    series = "keybrake_calls_total{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    # Timeline (1 sample/min): 70 minutes of baseline history (simulated), then the measured
    # rate held for 8 minutes. The rule's 1h baseline window ends 10 minutes back (offset 10m).
    history = 70
    spike_from = history + 1
    fire_at = spike_from + for_minutes + 2
    values = f"0+{base}x{history} {history * base + rate}+{rate}x8"
    rec = lambda name: name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(key_labels.items())) + "}"
    exp_alert = {
        "exp_labels": dict(key_labels, **rule.get("labels", {})),
        "exp_annotations": {k: render_annotation(" ".join(v.split()) if isinstance(v, str) else v, key_labels, rate)
                            for k, v in rule.get("annotations", {}).items()},
    }
    test = {
        "rule_files": [str(Path(a.rules).resolve())],
        "evaluation_interval": "1m",
        "tests": [{
            "name": "make demo: the measured call rate against a simulated baseline",
            "interval": "1m",
            "input_series": [{"series": series, "values": values}],
            "promql_expr_test": [
                {"expr": "keybrake:allowed_calls_per_minute:by_key", "eval_time": f"{fire_at}m",
                 "exp_samples": [{"labels": rec("keybrake:allowed_calls_per_minute:by_key"), "value": rate}]},
                {"expr": "keybrake:allowed_calls_per_minute:baseline_by_key", "eval_time": f"{fire_at}m",
                 "exp_samples": [{"labels": rec("keybrake:allowed_calls_per_minute:baseline_by_key"), "value": base}]},
            ],
            "alert_rule_test": [
                {"alertname": "KeybrakeCallRateSpike", "eval_time": f"{history}m", "exp_alerts": []},
                {"alertname": "KeybrakeCallRateSpike", "eval_time": f"{fire_at}m",
                 "exp_alerts": [exp_alert] if should_fire else []},
            ],
        }],
    }
    # yaml.safe_dump folds nothing we rendered, and promtool reads it back exactly.
    test_file = Path(a.out)
    test_file.write_text(yaml.safe_dump(test, sort_keys=False, width=10_000))

    print(f"  measured on the sidecar's /metrics: {last['allowed'] - first['allowed']:.0f} allowed calls in "
          f"{minutes * 60:.1f} s = {measured:.1f} calls/min (keybrake_calls_total, verdict=allow)")
    print(f"  baseline: {base} calls/min  [SIMULATED: 70 minutes of history at one refund every {60 / base:g} s,")
    print(f"            compressed into the promtool input; a real key earns its baseline over an hour or a day]")
    print()
    print(table(["recorded series / rule term", "value", "rule compares"], [
        ["keybrake:allowed_calls_per_minute:by_key", f"{rate}", f">= 5 x baseline = {5 * base}"],
        ["keybrake:allowed_calls_per_minute:baseline_by_key", f"{base}", f"x{rate / base:.1f} above it"],
        ["floor (new keys do not page)", f"{floor}", f"{rate} >= {floor}"],
        ["KeybrakeCallRateSpike expression", "true" if should_fire else "false", f"then for: {for_minutes}m"],
    ], right={1}))
    print()
    cmd = [a.promtool, "test", "rules", str(test_file)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    outcome = "firing" if should_fire else "quiet"
    if res.returncode == 0:
        print(f"  promtool test rules: PASS — quiet at minute {history}, {outcome} at minute {fire_at} "
              f"({for_minutes} min after the spike began), as expected")
        if should_fire:
            print(f"  alert summary: {exp_alert['exp_annotations'].get('summary', '')}")
        Path(a.out).with_suffix(".result").write_text(json.dumps({"rate": rate, "baseline": base, "fired": should_fire}))
        return 0
    print(f"  promtool test rules: FAIL ({' '.join(cmd)})")
    print("\n".join("    " + l for l in (res.stdout + res.stderr).splitlines()[-25:]))
    return 1


# ---------------------------------------------------------------- waits

def wait_denied(a):
    deadline = time.monotonic() + a.deadline
    while time.monotonic() < deadline:
        denied = [c for c in load_json_lines(a.log) if c["sent_ms"] >= a.since_ms and c["verdict"] != "allow"]
        if len(denied) >= a.count:
            return 0
        time.sleep(0.02)  # polling interval of a bounded wait
    print(f"  no {a.count} denied calls within {a.deadline:g} s of the patch")
    return 1


def count_rows(a):
    if a.db:
        import sqlite3
        if not Path(a.db).exists():
            return 0
        try:
            with sqlite3.connect(f"file:{a.db}?mode=ro", uri=True, timeout=1) as conn:
                return conn.execute("SELECT COUNT(*) FROM agent_call_audit").fetchone()[0]
        except sqlite3.Error:
            return 0  # not created or migrated yet
    return len(load_json_lines(a.rows))


def wait_rows(a):
    deadline = time.monotonic() + a.deadline
    n = 0
    while time.monotonic() < deadline:
        n = count_rows(a)
        if n >= a.count:
            return 0
        time.sleep(0.05)  # polling interval of a bounded wait
    print(f"  only {n} of {a.count} audit rows arrived within {a.deadline:g} s")
    return 1


# ---------------------------------------------------------------- timeline

def timeline(a):
    calls = load_json_lines(a.log)
    t = a.patch_returned_ms
    rel = lambda x: f"t{(x - t):+,.0f} ms"
    denied_after = [c for c in calls if c["verdict"] != "allow" and c["sent_ms"] >= a.patch_sent_ms]
    allowed = [c for c in calls if c["verdict"] == "allow"]
    leaked = [c for c in allowed if c["sent_ms"] > t]
    in_flight = [c for c in allowed if c["sent_ms"] <= t < c["answered_ms"]]
    last_allowed = allowed[-1] if allowed else None
    first_denied = denied_after[0] if denied_after else None
    vk = json.loads(Path(a.vk_json).read_text()) if a.vk_json else {}
    enforcement = (vk.get("status") or {}).get("enforcement") or {}

    print(f"  patch sent        {a.patch_sent_iso}   (kubectl patch vaultkey … state=Revoked)")
    print(f"  patch returned    t = {a.patch_returned_iso}   ({a.patch_returned_ms - a.patch_sent_ms:,.0f} ms round trip)")
    print()
    near = [c for c in calls if t - 3 * a.interval_ms <= c["sent_ms"] <= t + 4 * a.interval_ms]
    rows = []
    for c in near:
        mark = ""
        if c is first_denied:
            mark = "<- first denied call"
        elif c in leaked:
            mark = "<- LEAKED (allowed after the patch)"
        elif c in in_flight:
            mark = "in flight at the patch"
        rows.append([c["seq"], rel(c["sent_ms"]), rel(c["answered_ms"]), c["verdict"], c.get("status", ""), mark])
    print(table(["call", "sent", "answered", "verdict", "http", ""], rows, right={0, 1, 2, 4}))
    print()
    x = (first_denied["answered_ms"] - t) if first_denied else None
    summary = {
        "patch_returned_ms": t,
        "first_denied_answered_after_ms": x,
        # What the operator lives through: from running `kubectl patch` to the first denied call.
        # (Measured from the patch's start because the sidecar can deny before kubectl returns.)
        "revoke_ms": (first_denied["answered_ms"] - a.patch_sent_ms) if first_denied else None,
        "first_denied_sent_after_ms": (first_denied["sent_ms"] - t) if first_denied else None,
        "last_allowed_sent_after_ms": (last_allowed["sent_ms"] - t) if last_allowed else None,
        "leaked": len(leaked),
        "leaked_late": len([c for c in leaked if c["sent_ms"] - t > a.tolerance_ms]),
        "in_flight": len(in_flight),
        "calls": len(calls),
        "allowed": len(allowed),
        "denied": len([c for c in calls if c["verdict"] != "allow"]),
        "avg_refund_usd": (sum(c["amount"] for c in allowed) / len(allowed) / 100) if allowed else 0,
        "interval_ms": a.interval_ms,
        "propagation_ms": enforcement.get("lastPropagationMs"),
        "enforced": enforcement.get("summary"),
        "phase": (vk.get("status") or {}).get("phase"),
        "status_ok": bool(a.status_ok),
    }
    lines = [
        ["kubectl patch started", rel(a.patch_sent_ms), ""],
        ["patch returned", "t", ""],
        ["first denied call answered", rel(first_denied["answered_ms"]) if first_denied else "never",
         f"verdict {first_denied['verdict']}, sent at {rel(first_denied['sent_ms'])}" if first_denied else ""],
        ["last allowed call sent", rel(last_allowed["sent_ms"]) if last_allowed else "-",
         "before the patch returned" if last_allowed and last_allowed["sent_ms"] <= t else "AFTER the patch returned"],
        ["calls leaked after the patch", str(len(leaked)), "allowed calls sent after t"],
        ["calls in flight at t", str(len(in_flight)), "sent before t, answered after (allowed before the revoke)"],
        ["controller → sidecar propagation", ms(summary["propagation_ms"]) if summary["propagation_ms"] is not None else "-",
         "status.enforcement.lastPropagationMs: API write → sidecar ack"],
    ]
    print(table(["", "when", ""], lines, right={1}))
    if x is not None and x <= 0:
        print("  (the sidecar denied before kubectl even returned: the controller's watch saw the write first)")
    Path(a.out).write_text(json.dumps(summary))
    return 0


# ---------------------------------------------------------------- compare + verdict

def compare(a):
    s = json.loads(Path(a.summary).read_text())
    spike_result = json.loads(Path(a.spike_result).read_text()) if a.spike_result and Path(a.spike_result).exists() else None
    interval = s["interval_ms"] / 1000
    x = s["revoke_ms"]
    avg = s["avg_refund_usd"]
    rows = []
    if x is not None:
        rows.append(["Keybrake: kubectl patch → first denied call", ms(x), "-", str(s["leaked"]), "-",
                     f"${s['leaked'] * avg:,.2f}", "-"])
    for name, median, p95 in VENDORS:
        lm, lp = math.floor(median / interval), math.floor(p95 / interval)
        rows.append([name, duration(median), duration(p95), str(lm), str(lp), f"${lm * avg:,.2f}", f"${lp * avg:,.2f}"])
    if not a.verdict_only:
        print(table(["how the key is stopped", "median", "p95", "leaked@median", "leaked@p95", "$@median", "$@p95"],
                    rows, right={1, 2, 3, 4, 5, 6}))
        print(f"  leaked = calls the agent completes before the key stops working, at one call per {interval * 1000:.0f} ms;")
        print(f"  $ = those calls at this run's average refund of ${avg:,.2f}. Vendor times: published rotate tails (DESIGN.md).")
    if a.table_only:
        return 0

    problems = []
    if x is None:
        problems.append("no call was denied after the patch")
    if s["leaked_late"]:
        problems.append(f"{s['leaked_late']} call(s) allowed more than {a.tolerance_ms} ms after the patch returned")
    if not s["status_ok"]:
        problems.append(f"kubectl get vk never showed Revoked and 1/1 sidecars (phase {s['phase']}, enforced {s['enforced']})")
    if spike_result is None:
        problems.append("the spike rule was not proven with promtool")
    for extra in a.problem or []:
        problems.append(extra)
    if problems:
        print("VERDICT: FAIL — " + "; ".join(problems))
        return 1
    stripe_leak = math.floor(VENDORS[0][1] / interval)
    prop = f", controller → sidecar {s['propagation_ms']} ms" if s.get("propagation_ms") is not None else ""
    print(f"VERDICT: PASS — revoked in {x:,.0f} ms (kubectl patch → first denied call{prop}), {s['leaked']} calls leaked, "
          f"{s['phase']} and enforced by {s['enforced']} sidecars; rotating at Stripe would have leaked ~{stripe_leak} at its median.")
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch-spike")
    w.add_argument("--metrics", required=True)
    w.add_argument("--key", required=True)
    w.add_argument("--seconds", type=float, required=True)
    w.add_argument("--every", type=float, default=0.5)
    w.add_argument("--print-every", type=float, default=2.0)
    w.add_argument("--baseline", type=float, default=0, help="calls/min to compare with (simulated)")
    w.add_argument("--out", required=True)
    s = sub.add_parser("spike")
    s.add_argument("--samples", required=True)
    s.add_argument("--rules", required=True)
    s.add_argument("--promtool", required=True)
    s.add_argument("--baseline", type=int, default=12)
    s.add_argument("--out", required=True)
    d = sub.add_parser("wait-denied")
    d.add_argument("--log", required=True)
    d.add_argument("--since-ms", type=float, required=True)
    d.add_argument("--count", type=int, default=1)
    d.add_argument("--deadline", type=float, default=10)
    r = sub.add_parser("wait-rows")
    r.add_argument("--rows", help="an NDJSON file of rows")
    r.add_argument("--db", help="a SQLite audit store")
    r.add_argument("--count", type=int, required=True)
    r.add_argument("--deadline", type=float, default=10)
    t = sub.add_parser("timeline")
    t.add_argument("--log", required=True)
    t.add_argument("--patch-sent-ms", type=float, required=True)
    t.add_argument("--patch-returned-ms", type=float, required=True)
    t.add_argument("--patch-sent-iso", required=True)
    t.add_argument("--patch-returned-iso", required=True)
    t.add_argument("--interval-ms", type=float, required=True)
    t.add_argument("--tolerance-ms", type=float, default=1000)
    t.add_argument("--vk-json")
    t.add_argument("--status-ok", type=int, default=0)
    t.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--summary", required=True)
    c.add_argument("--spike-result")
    c.add_argument("--tolerance-ms", type=int, default=1000)
    c.add_argument("--problem", action="append", help="another failed check, to report in the verdict")
    c.add_argument("--table-only", action="store_true")
    c.add_argument("--verdict-only", action="store_true")
    a = p.parse_args()
    fn = {"watch-spike": watch_spike, "spike": spike, "wait-denied": wait_denied, "wait-rows": wait_rows,
          "timeline": timeline, "compare": compare}[a.cmd]
    return fn(a) or 0


if __name__ == "__main__":
    sys.exit(main())
