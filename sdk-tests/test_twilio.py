import pytest
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from conftest import TWILIO_SID, token


def client(stack, name, base=None):
    c = Client(TWILIO_SID, token(name))
    c.api.base_url = base or stack.proxy + "/twilio"
    return c


def send(stack, name, to="+15550001111", base=None):
    return client(stack, name, base).messages.create(to=to, from_="+15559990000", body="Your code is 1234")


def test_allowed_message_succeeds(stack):
    message = send(stack, "twilio-ok")
    assert message.sid.startswith("SM")
    assert message.status == "queued"
    assert message.to == "+15550001111"


def test_vendor_port_without_prefix(stack):
    assert send(stack, "twilio-ok", base=stack.vendor_port["twilio"]).sid.startswith("SM")


def test_unknown_key_raises_401(stack):
    with pytest.raises(TwilioRestException) as err:
        send(stack, "nobody")
    assert err.value.status == 401
    assert err.value.code == 20003
    assert "key_unknown" in err.value.msg


def test_suspended_key_raises_403(stack):
    with pytest.raises(TwilioRestException) as err:
        send(stack, "twilio-suspended")
    assert err.value.status == 403
    assert "key_suspended" in err.value.msg


def test_customer_outside_allowlist_raises_403(stack):
    with pytest.raises(TwilioRestException) as err:
        send(stack, "twilio-ok", to="+15550009999")
    assert err.value.status == 403
    assert "customer_denied" in err.value.msg
