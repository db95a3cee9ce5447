"""Starts the real keybrake-sidecar (standalone mode) in front of the vendor upstreams:
stripe-mock for Stripe when it was built (else the testkit's fake), the testkit's fakes for
OpenAI, Twilio and Resend. Everything listens on 127.0.0.1 and is stopped at the end."""
import hashlib
import json
import os
import queue
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

BIN_DIR = Path(os.environ.get("KEYBRAKE_BIN_DIR", Path(__file__).resolve().parent.parent / "target" / "debug"))
STRIPE_MOCK = os.environ.get("STRIPE_MOCK_BIN", "")

STRIPE_SECRET = "sk_test_123"
OPENAI_SECRET = "sk-proj-upstream-openai"
TWILIO_SID = "AC0123456789abcdef0123456789abcdef"
TWILIO_SECRET = f"{TWILIO_SID}:upstream_twilio_token"
RESEND_SECRET = "re_upstream_resend"


def token(name):
    """A vault key in the minted format: vault_key_ + 43 base62 characters."""
    body = hashlib.sha256(name.encode()).hexdigest()[:43]
    return "vault_key_" + body


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


def wait_for(predicate, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)  # polling interval of a bounded wait, not synchronisation by sleep
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def require_binary(path, hint):
    if not Path(path).is_file():
        pytest.fail(f"{path} is missing: run `{hint}` (scripts/test-sdk.sh does)")


class Stack:
    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []

    def spawn(self, args, **kw):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
        self.procs.append(proc)
        return proc

    def fake(self, vendor, secret):
        binary = BIN_DIR / "fake-vendor"
        require_binary(binary, "cargo build -p keybrake-testkit")
        proc = self.spawn([str(binary), "--vendor", vendor, "--secret", secret])
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), f"fake-vendor {vendor} did not start: {proc.stderr.read() if proc.poll() is not None else url}"
        return url

    def listening_url(self, proc, prefix, what, timeout=30.0):
        """The http:// URL of the address `proc` prints after `prefix` on stdout."""
        # A reader thread, not select(): select() on the pipe misses lines the text wrapper
        # has already buffered (stripe-mock prints its banner and addresses in one burst).
        lines = queue.Queue()

        def pump():
            for line in iter(proc.stdout.readline, ""):
                lines.put(line)
            lines.put("")  # end of output

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not line:
                break
            seen.append(line.rstrip())
            if line.startswith(prefix):
                return "http://" + line[len(prefix):].strip()
        pytest.fail(f"{what} did not report its address within {timeout}s; stdout: {seen}; "
                    f"exit: {proc.poll()}")

    def stripe_upstream(self):
        if STRIPE_MOCK:
            require_binary(STRIPE_MOCK, "scripts/build-stripe-mock.sh")
            # Both listeners on ports the kernel picks: stripe-mock otherwise also opens HTTPS on
            # the fixed port 12112, which collides between concurrent runs.
            proc = self.spawn([STRIPE_MOCK, "-http-addr", "127.0.0.1:0", "-https-addr", "127.0.0.1:0"])
            return self.listening_url(proc, "Listening for HTTP at address: ", "stripe-mock"), "stripe-mock"
        return self.fake("stripe", STRIPE_SECRET), "fake"

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


KEYS = {
    # name: (upstream, state, allow, customers, limits)
    "stripe-ok": ("stripe", "Active", [{"operation": "charges.create"}, {"operation": "customers.retrieve"}, {"operation": "payment_intents.create"}], [], {}),
    "stripe-revoked": ("stripe", "Revoked", [{"operation": "charges.create"}], [], {}),
    "stripe-readonly": ("stripe", "Active", [{"operation": "customers.retrieve"}], [], {}),
    "stripe-capped": ("stripe", "Active", [{"operation": "charges.create"}], [], {"perCallUsdMax": "10.00"}),
    "openai-ok": ("openai", "Active", [{"operation": "chat.completions.create"}, {"operation": "models.list"}, {"operation": "embeddings.create"}, {"operation": "responses.create"}], [], {}),
    "openai-revoked": ("openai", "Revoked", [{"operation": "chat.completions.create"}], [], {}),
    "openai-chat-only": ("openai", "Active", [{"operation": "chat.completions.create"}], [], {}),
    "openai-rate": ("openai", "Active", [{"operation": "models.list"}], [], {"callsPerMinute": 1}),
    "twilio-ok": ("twilio", "Active", [{"operation": "messages.create"}], ["+15550001111"], {}),
    "twilio-suspended": ("twilio", "Suspended", [{"operation": "messages.create"}], [], {}),
    "resend-ok": ("resend", "Active", [{"operation": "emails.send"}], ["acme.com"], {}),
    "resend-revoked": ("resend", "Revoked", [{"operation": "emails.send"}], [], {}),
}


def write_config(path, upstreams):
    lines = ["# generated by sdk-tests/conftest.py", "upstreams:"]
    for name, (vendor, url, env) in upstreams.items():
        lines += [f"  {name}:", f"    vendor: {vendor}", f"    baseUrl: {url}", f"    secretEnv: {env}"]
    lines.append("keys:")
    for name, (upstream, state, allow, customers, limits) in KEYS.items():
        lines += [
            f"  - name: {name}",
            f"    tokenSha256: {sha256(token(name))}",
            f"    upstream: {upstream}",
            f"    state: {state}",
            f"    agent: {{name: sdk-agent, runId: run-sdk}}",
            f"    allow: {json.dumps(allow)}",
            f"    customers: {json.dumps(customers)}",
            f"    limits: {json.dumps(limits)}",
        ]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keybrake")
    s = Stack(tmp)
    try:
        stripe_url, s.stripe_kind = s.stripe_upstream()
        upstreams = {
            "stripe": ("stripe", stripe_url, "KB_STRIPE_SECRET"),
            "openai": ("openai", s.fake("openai", OPENAI_SECRET), "KB_OPENAI_SECRET"),
            "twilio": ("twilio", s.fake("twilio", TWILIO_SECRET), "KB_TWILIO_SECRET"),
            "resend": ("resend", s.fake("resend", RESEND_SECRET), "KB_RESEND_SECRET"),
        }
        config = tmp / "keybrake.yaml"
        write_config(config, upstreams)
        addr_file = tmp / "addrs.json"
        sidecar = BIN_DIR / "keybrake-sidecar"
        require_binary(sidecar, "cargo build -p keybrake-sidecar")
        env = dict(os.environ, KB_STRIPE_SECRET=STRIPE_SECRET, KB_OPENAI_SECRET=OPENAI_SECRET,
                   KB_TWILIO_SECRET=TWILIO_SECRET, KB_RESEND_SECRET=RESEND_SECRET)
        ports = ["--proxy-port", "0", "--stripe-port", "0", "--openai-port", "0",
                 "--twilio-port", "0", "--resend-port", "0", "--admin-port", "0"]
        proc = s.spawn([str(sidecar), "--config", str(config), "--addr-file", str(addr_file),
                        "--audit", "stdout", *ports], env=env)
        wait_for(lambda: addr_file.exists() or proc.poll() is not None, "the sidecar's address file")
        assert proc.poll() is None, f"sidecar exited: {proc.stderr.read()}"
        addrs = json.loads(addr_file.read_text())
        s.proxy = "http://" + addrs["proxy"]
        s.admin = "http://" + addrs["admin"]
        s.vendor_port = {vendor: "http://" + addr for vendor, addr in addrs["vendors"]}
        ready = lambda: urllib.request.urlopen(s.admin + "/ready", timeout=1).status == 200
        wait_for(ready, "sidecar /ready")
        yield s
    finally:
        s.stop()


def metrics(stack):
    return urllib.request.urlopen(stack.admin + "/metrics", timeout=5).read().decode()
