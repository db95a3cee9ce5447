import openai
import pytest

from conftest import metrics, token


def client(stack, name, **kw):
    return openai.OpenAI(api_key=token(name), base_url=stack.proxy + "/openai/v1", **kw)


def test_allowed_chat_completion_succeeds(stack):
    reply = client(stack, "openai-ok", max_retries=0).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=50)
    assert reply.choices[0].message.content == "Hello from the fake."
    assert reply.usage.total_tokens == 17


def test_streaming_arrives_chunk_by_chunk(stack):
    stream = client(stack, "openai-ok", max_retries=0).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake."
    assert len(chunks) >= 4


def test_per_vendor_port_and_other_operations(stack):
    c = openai.OpenAI(api_key=token("openai-ok"), base_url=stack.vendor_port["openai"] + "/v1", max_retries=0)
    assert c.models.list().data[0].id == "gpt-4o-mini"
    assert len(c.embeddings.create(model="text-embedding-3-small", input="hi").data) == 1
    assert c.responses.create(model="gpt-4o-mini", input="hi").output_text == "Hello from the fake."


def test_revoked_key_raises_authentication_error(stack):
    with pytest.raises(openai.AuthenticationError) as err:
        client(stack, "openai-revoked").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 401
    assert err.value.code == "key_revoked"
    assert err.value.response.headers["keybrake-verdict"] == "key_revoked"


def test_operation_outside_allowlist_raises_permission_denied(stack):
    # Default retries: the sidecar's x-should-retry: false stops the SDK from retrying.
    with pytest.raises(openai.PermissionDeniedError) as err:
        client(stack, "openai-chat-only").embeddings.create(model="text-embedding-3-small", input="hi")
    assert err.value.status_code == 403
    assert err.value.code == "operation_denied"


def test_rate_limit_is_a_429(stack):
    c = client(stack, "openai-rate", max_retries=0)
    c.models.list()
    with pytest.raises(openai.RateLimitError) as err:
        c.models.list()
    assert err.value.code == "rate_limited"
    assert 'vault_key="openai-rate",vendor="openai",verdict="rate_limited"} 1' in metrics(stack)
