import pytest
import resend
from resend.exceptions import InvalidApiKeyError, MissingApiKeyError, ResendError

from conftest import token

EMAIL = {"from": "agent@example.dev", "to": ["ops@acme.com"], "subject": "Report", "html": "<p>done</p>"}


@pytest.fixture
def as_key(stack, monkeypatch):
    def use(name, base=None):
        monkeypatch.setattr(resend, "api_key", token(name))
        monkeypatch.setattr(resend, "api_url", base or stack.proxy + "/resend")
    return use


def test_allowed_email_is_sent(as_key):
    as_key("resend-ok")
    sent = resend.Emails.send(EMAIL)
    assert sent["id"]


def test_vendor_port_without_prefix(stack, as_key):
    as_key("resend-ok", base=stack.vendor_port["resend"])
    assert resend.Emails.send(EMAIL)["id"]


def test_revoked_key_raises_the_sdks_auth_error(as_key):
    as_key("resend-revoked")
    with pytest.raises(MissingApiKeyError) as err:
        resend.Emails.send(EMAIL)
    assert str(err.value.code) == "401"
    # This SDK class replaces the message with its own text; the verdict travels in the header.
    assert err.value.headers["keybrake-verdict"] == "key_revoked"


def test_recipient_domain_outside_allowlist_raises_403(as_key):
    as_key("resend-ok")
    with pytest.raises(InvalidApiKeyError) as err:
        resend.Emails.send(dict(EMAIL, to=["ops@acme.com", "someone@evil.io"]))
    assert str(err.value.code) == "403"
    assert err.value.headers["keybrake-verdict"] == "customer_denied"


def test_operation_outside_allowlist_raises_403(as_key):
    as_key("resend-ok")
    with pytest.raises(ResendError) as err:
        resend.Batch.send([EMAIL])
    assert str(err.value.code) == "403"
    assert err.value.headers["keybrake-verdict"] == "operation_denied"
