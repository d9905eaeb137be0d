"""Tests of throttled_openai.testing.FakeOpenAI: the real openai SDK over real HTTP, no mocks."""

from __future__ import annotations

import base64
import json
import re
import struct
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type

import openai
import pytest

from throttled_openai.testing import FAULTS, FakeOpenAI, _go_duration, count_tokens

KEY = "sk-test-0123456789abcdef"
GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s)?$|^\d+(\.\d+)?ms$")

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def make_server() -> Iterator[Callable[..., FakeOpenAI]]:
    """Factory: start a FakeOpenAI with the given keyword arguments; all are stopped at teardown."""
    servers: List[FakeOpenAI] = []

    def make(**kwargs: Any) -> FakeOpenAI:
        server = FakeOpenAI(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


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
