"""The openai SDK surfaces ThrottledClient relies on. If one of these fails after an SDK upgrade, the
throttling would silently stop working: fix client.py before anything else.

- ``OpenAI.request(cast_to, options, *, stream, stream_cls)``: every resource call goes through it.
- ``options.json_data`` / ``options.url``: the request body (a dict) and path, read to price the call.
- ``copy(..., _extra_kwargs=...)``: how copies receive the shared limiter, policy and counters.
- ``http_client.event_hooks["response"]``: public httpx/httpx2 API, where the headers are read.
- ``response.stream``: public httpx/httpx2 API (the body stream), wrapped to read a stream's usage.
"""

from __future__ import annotations

import inspect

import openai
import pytest
from openai._models import FinalRequestOptions

from throttled_openai import ThrottledClient
from throttled_openai.testing import FakeOpenAI


def test_request_signature() -> None:
    params = inspect.signature(openai.OpenAI.request).parameters
    assert list(params)[:3] == ["self", "cast_to", "options"], "SDK changed OpenAI.request's positional arguments"
    assert "stream" in params and params["stream"].kind is inspect.Parameter.KEYWORD_ONLY


def test_request_options_fields() -> None:
    fields = getattr(FinalRequestOptions, "model_fields", None) or FinalRequestOptions.__fields__
    for name in ("json_data", "url", "method"):
        assert name in fields, f"SDK's FinalRequestOptions lost {name!r}"


@pytest.mark.parametrize("cls", [openai.OpenAI, openai.AzureOpenAI])
def test_copy_accepts_extra_kwargs(cls: type) -> None:
    params = inspect.signature(cls.copy).parameters
    assert "_extra_kwargs" in params, f"{cls.__name__}.copy no longer takes _extra_kwargs"
    assert cls.with_options is cls.copy


def test_default_http_client_has_settable_event_hooks() -> None:
    client = openai.DefaultHttpxClient()
    hooks = client.event_hooks
    assert "response" in hooks
    client.event_hooks = {**hooks, "response": [*hooks["response"], print]}
    assert print in client.event_hooks["response"]
    client.close()


def test_the_override_and_the_hook_are_both_reached() -> None:
    with FakeOpenAI(rpm=1234, tpm=56789) as server:
        client = ThrottledClient(base_url=server.base_url, api_key="sk-contract")
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert client.stats().calls == 1, "ThrottledClient.request was bypassed by the SDK"
        state = client.limiter.snapshot()["m"]
        assert (state["requests_limit"], state["tokens_limit"]) == (1234, 56789), "the response hook never ran"
        copied = client.with_options(timeout=3)
        assert copied.limiter is client.limiter, "copy() did not pass the limiter on"
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        used = [chunk.usage.total_tokens for chunk in stream if chunk.usage is not None]
        assert client.stats().tokens_used == 2 * used[0] if used else False, "the stream's body was not scanned"
