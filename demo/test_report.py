"""Unit tests of demo/report.py's judgement: the demo must fail when the revoke was not enforced.
Run: target/demo-venv/bin/python -m unittest demo/test_report.py (scripts/demo.sh creates the venv)."""
import contextlib
import io
import json
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

T = 1_700_000_000_000.0  # patch returned (ms)


def call(seq, sent_rel, verdict, amount=1000):
    return {"seq": seq, "sent_ms": T + sent_rel, "answered_ms": T + sent_rel + 5, "verdict": verdict,
            "status": 200 if verdict == "allow" else 401, "amount": amount, "customer": "cus_A"}


class Judgement(unittest.TestCase):
    def run_report(self, calls, status_ok=True, spike=True, extra=()):
        d = Path(tempfile.mkdtemp())
        (d / "calls.jsonl").write_text("".join(json.dumps(c) + "\n" for c in calls))
        (d / "vk.json").write_text(json.dumps({"status": {"phase": "Revoked", "enforcement": {
            "sidecars": 1, "acknowledged": 1, "summary": "1/1", "lastPropagationMs": 4}}}))
        if spike:
            (d / "spike.result").write_text("{}")
        argv = ["timeline", "--log", str(d / "calls.jsonl"), "--patch-sent-ms", str(T - 60),
                "--patch-returned-ms", str(T), "--patch-sent-iso", "x", "--patch-returned-iso", "y",
                "--interval-ms", "400", "--vk-json", str(d / "vk.json"), "--status-ok", str(int(status_ok)),
                "--out", str(d / "summary.json")]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            sys.argv = ["report.py", *argv]
            report.main()
            sys.argv = ["report.py", "compare", "--summary", str(d / "summary.json"), "--verdict-only",
                        "--spike-result", str(d / "spike.result")] + [a for p in extra for a in ("--problem", p)]
            rc = report.main()
        return rc, out.getvalue(), json.loads((d / "summary.json").read_text())

    def test_enforced_revoke_passes(self):
        rc, out, s = self.run_report([call(1, -800, "allow"), call(2, -400, "allow"), call(3, 0.5, "key_revoked")])
        self.assertEqual(rc, 0, out)
        self.assertIn("VERDICT: PASS", out)
        self.assertEqual(s["leaked"], 0)
        self.assertAlmostEqual(s["revoke_ms"], 65.5)

    def test_a_call_allowed_long_after_the_patch_fails(self):
        rc, out, s = self.run_report([call(1, -400, "allow"), call(2, 1500, "allow"), call(3, 1900, "key_revoked")])
        self.assertEqual(rc, 1)
        self.assertIn("allowed more than 1000 ms after the patch", out)
        self.assertEqual((s["leaked"], s["leaked_late"]), (1, 1))

    def test_a_leak_within_the_tolerance_is_counted_but_passes(self):
        rc, out, s = self.run_report([call(1, 300, "allow"), call(2, 700, "key_revoked")])
        self.assertEqual(rc, 0, out)
        self.assertEqual((s["leaked"], s["leaked_late"]), (1, 0))

    def test_no_denied_call_fails(self):
        rc, out, _ = self.run_report([call(1, -400, "allow"), call(2, 0, "allow")])
        self.assertEqual(rc, 1)
        self.assertIn("no call was denied after the patch", out)

    def test_status_never_one_of_one_fails(self):
        rc, out, _ = self.run_report([call(1, 10, "key_revoked")], status_ok=False)
        self.assertEqual(rc, 1)
        self.assertIn("never showed Revoked and 1/1", out)

    def test_unproven_spike_rule_and_other_problems_fail(self):
        rc, out, _ = self.run_report([call(1, 10, "key_revoked")], spike=False, extra=["audit rows missing"])
        self.assertEqual(rc, 1)
        self.assertIn("spike rule was not proven", out)
        self.assertIn("audit rows missing", out)


class Annotations(unittest.TestCase):
    def test_rendering_matches_promtool_templates(self):
        labels = {"namespace": "ns", "vault_key": "k", "agent": "a"}
        text = report.render_annotation('Key {{ $labels.namespace }}/{{ $labels.vault_key }} at {{ $value | printf "%.0f" }}/min', labels, 152)
        self.assertEqual(text, "Key ns/k at 152/min")
        with self.assertRaises(SystemExit):
            report.render_annotation("{{ $value | humanize }}", labels, 1)


if __name__ == "__main__":
    unittest.main()
