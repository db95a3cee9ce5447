import pytest
import stripe

from conftest import metrics, token


def client(stack, name, base=None, **kw):
    return stripe.StripeClient(token(name), base_addresses={"api": base or stack.proxy + "/stripe"}, max_network_retries=0, **kw)


def test_allowed_charge_succeeds(stack):
    charge = client(stack, "stripe-ok").v1.charges.create(params={"amount": 500, "currency": "usd", "source": "tok_visa"})
    assert charge.object == "charge"
    assert charge.id.startswith("ch_")


def test_vendor_port_without_prefix(stack):
    # The Stripe Node SDK can only change host and port: the per-vendor listener serves that.
    customer = client(stack, "stripe-ok", base=stack.vendor_port["stripe"]).v1.customers.retrieve("cus_123")
    assert customer.object == "customer"


def test_revoked_key_raises_authentication_error(stack):
    with pytest.raises(stripe.AuthenticationError) as err:
        client(stack, "stripe-revoked").v1.charges.create(params={"amount": 500, "currency": "usd"})
    assert err.value.http_status == 401
    assert err.value.error.code == "key_revoked"
    assert err.value.headers["keybrake-verdict"] == "key_revoked"


def test_unknown_key_raises_authentication_error(stack):
    with pytest.raises(stripe.AuthenticationError) as err:
        client(stack, "nobody").v1.charges.create(params={"amount": 500, "currency": "usd"})
    assert err.value.error.code == "key_unknown"


def test_operation_outside_allowlist_raises_permission_error(stack):
    with pytest.raises(stripe.PermissionError) as err:
        client(stack, "stripe-readonly").v1.charges.create(params={"amount": 500, "currency": "usd"})
    assert err.value.http_status == 403
    assert err.value.error.code == "operation_denied"


def test_per_call_cap_is_a_402_not_a_retryable_429(stack):
    with pytest.raises(stripe.CardError) as err:
        client(stack, "stripe-capped").v1.charges.create(params={"amount": 5000, "currency": "usd", "source": "tok_visa"})
    assert err.value.http_status == 402
    assert err.value.code == "per_call_cap"
    assert err.value.headers.get("stripe-should-retry") == "false"
    # Under the cap the same key works.
    ok = client(stack, "stripe-capped").v1.charges.create(params={"amount": 999, "currency": "usd", "source": "tok_visa"})
    assert ok.amount == 999


def test_calls_are_counted(stack):
    text = metrics(stack)
    assert 'vault_key="stripe-revoked",vendor="stripe",verdict="key_revoked"' in text
