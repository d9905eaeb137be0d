"""ThrottledClient end to end: the real openai SDK over real HTTP against the fake server."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, List

import openai
import pytest

from throttled_openai import (
    Limits,
    RateLimiter,
    RateLimitTimeout,
    RequestTooLarge,
    Retry,
    ThrottledAzureClient,
    ThrottledClient,
)
from throttled_openai.testing import FakeOpenAI

KEY = "sk-test-SECRETKEY-0123456789"
HAS_RESPONSES = hasattr(openai.OpenAI, "responses")
FAST = Retry(backoff_base=0.01, backoff_max=0.05)
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(rpm=6000, tpm=1_000_000) as fake:
        yield fake


def client_for(server: FakeOpenAI, **kwargs: Any) -> ThrottledClient:
    kwargs.setdefault("retry", FAST)
    return ThrottledClient(base_url=server.base_url, api_key=KEY, **kwargs)


def test_every_endpoint_passes_the_limiter_and_settles_usage(server: FakeOpenAI) -> None:
    client = client_for(server, rpm=6000, tpm=1_000_000)
    chat = client.chat.completions.create(**CHAT)
    assert chat.choices[0].message.content == "echo:hello#0"
    completion = client.completions.create(model="gpt-3.5-turbo-instruct", prompt=["a", "b"], max_tokens=3)
    assert sorted(c.index for c in completion.choices) == [0, 1]
    embedding = client.embeddings.create(model="text-embedding-3-small", input=["x", "y"])
    assert len(embedding.data) == 2
    used = chat.usage.total_tokens + completion.usage.total_tokens + embedding.usage.total_tokens
    if HAS_RESPONSES:  # the Responses API came with openai 1.66
        response = client.responses.create(model="gpt-4o-mini", input="hello", max_output_tokens=5)
        assert "echo" in response.output_text
        used += response.usage.total_tokens
    models = client.models.list()
    assert models.data
    stats = client.stats()
    calls = 4 + HAS_RESPONSES
    assert stats.calls == calls and stats.requests == calls and stats.retries == 0
    # usage of the token-bearing calls was reported and settled
    assert stats.tokens_used == used
    assert stats.tokens_reserved >= stats.tokens_used
    levels = client.limiter.snapshot()
    assert set(levels) == {"gpt-4o-mini", "gpt-3.5-turbo-instruct", "text-embedding-3-small", "*"}


def test_limits_are_learned_from_headers_when_none_are_given(server: FakeOpenAI) -> None:
    client = client_for(server)
    client.chat.completions.create(**CHAT)
    state = client.limiter.snapshot()["gpt-4o-mini"]
    assert state["requests_limit"] == 6000 and state["tokens_limit"] == 1_000_000
    # a minute's worth is there, as the headers said: the burst is not stuck at one second's worth
    assert state["requests_burst"] is not None and state["requests_burst"] > 1000


def test_many_threads_stay_under_a_strict_limit() -> None:
    # 1,200 RPM with a bucket holding one second (20 requests): 32 threads fire 120 calls.
    with FakeOpenAI(rpm=1200, tpm=1_000_000, bucket_seconds=1.0, latency=0.005) as server:
        client = client_for(server, rpm=1200, tpm=1_000_000)
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda _: client.chat.completions.create(**CHAT), range(120)))
        assert len(results) == 120 and all(r.choices for r in results)
        stats = server.stats()
        assert stats["admitted"] == 120
        # The limiter paces sends under the server's bucket; a rare 429 from scheduling jitter on a
        # loaded machine is retried, never lost. The benchmark measures the exact rate.
        assert stats["rate_limited"] <= 12
        assert client.stats().calls == 120


def test_unknown_limits_are_probed_before_a_stampede() -> None:
    # No limits given; a strict server (10 requests of burst). 32 threads start at once: one probe
    # learns the limits from its headers, then everyone stays under them.
    with FakeOpenAI(rpm=600, tpm=1_000_000, bucket_seconds=1.0) as server:
        client = client_for(server)
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda _: client.chat.completions.create(**CHAT), range(40)))
        assert server.stats()["admitted"] == 40
        assert server.stats()["rate_limited"] <= 4


def test_a_failed_probe_does_not_release_a_stampede() -> None:
    with FakeOpenAI(rpm=600, bucket_seconds=1.0, latency=0.05) as server:
        client = client_for(server, retry=0)
        server.inject("500")  # the probe's answer carries no limits

        def one(_: int) -> str:
            try:
                client.chat.completions.create(**CHAT)
            except openai.InternalServerError:
                return "500"
            return "ok"

        with ThreadPoolExecutor(20) as pool:
            outcomes = list(pool.map(one, range(20)))
        assert sorted(outcomes) == ["500"] + ["ok"] * 19
        assert server.stats()["rate_limited"] == 0


def test_raw_responses_are_settled_against_their_usage(server: FakeOpenAI) -> None:
    client = client_for(server, tpm=1_000_000)
    raw = client.chat.completions.with_raw_response.create(**CHAT)
    assert raw.parse().usage.total_tokens == client.stats().tokens_used > 0


def test_key_providers_are_separate_accounts(server: FakeOpenAI) -> None:
    if "api_key" not in __import__("inspect").signature(openai.OpenAI).parameters:
        pytest.skip("no api_key parameter")
    try:
        first = ThrottledClient(base_url=server.base_url, api_key=lambda: "sk-one")
        second = ThrottledClient(base_url=server.base_url, api_key=lambda: "sk-two")
    except Exception:
        pytest.skip("this SDK version takes no key provider")
    assert first._account != second._account


def test_the_retry_deadline_bounds_the_whole_call(server: FakeOpenAI) -> None:
    client = client_for(server, retry=Retry(max_retries=100, backoff_base=0.2, backoff_max=0.4, deadline=1.0))
    server.inject("500", count=1000)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(**CHAT)
    assert time.monotonic() - started < 3.0
    assert 2 <= server.stats()["requests"] < 100


def test_server_errors_are_retried(server: FakeOpenAI) -> None:
    client = client_for(server)
    server.inject("500", count=2)
    result = client.chat.completions.create(**CHAT)
    assert result.choices
    assert server.stats()["requests"] == 3
    stats = client.stats()
    assert stats.retries == 2 and stats.errors == {"server_error": 2}
    bodies = [entry["body"] for entry in server.requests_log]
    assert bodies == [bodies[0]] * 3  # each retry sends the same request


@pytest.mark.parametrize("fault", ["503", "drop", "truncate", "429", "429_message_only"])
def test_transient_faults_are_retried(server: FakeOpenAI, fault: str) -> None:
    client = client_for(server)
    server.inject(fault)
    assert client.chat.completions.create(**CHAT).choices
    assert client.stats().retries == 1


def test_slow_responses_time_out_and_are_retried() -> None:
    with FakeOpenAI(slow_seconds=3.0) as server:
        client = client_for(server, timeout=0.5)
        server.inject("slow")
        assert client.chat.completions.create(**CHAT).choices
        assert client.stats().errors == {"timeout": 1}


def test_a_rate_limit_429_pauses_the_key_for_retry_after(server: FakeOpenAI) -> None:
    client = client_for(server, rpm=6000)
    server.inject("429")  # retry-after-ms: 200
    started = time.monotonic()
    client.chat.completions.create(**CHAT)
    assert time.monotonic() - started >= 0.2
    assert client.stats().rate_limited == {"rate_limit_requests": 1}


@pytest.mark.parametrize(
    ("fault", "error", "text"),
    [
        ("quota", openai.RateLimitError, "exceeded your current quota"),
        ("too_large", openai.RateLimitError, "Request too large"),
        ("400", openai.BadRequestError, "Invalid request"),
    ],
)
def test_hopeless_errors_are_raised_at_once(server: FakeOpenAI, fault: str, error: type, text: str) -> None:
    client = client_for(server, retry=Retry(max_retries=10))
    server.inject(fault, count=5)
    with pytest.raises(error, match=text):
        client.chat.completions.create(**CHAT)
    assert server.stats()["requests"] == 1
    assert client.stats().retries == 0 and client.stats().failures == 1


def test_retries_run_out_and_the_last_error_is_raised(server: FakeOpenAI) -> None:
    client = client_for(server, retry=FAST.replace(max_retries=2))
    server.inject("500", count=5)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(**CHAT)
    assert server.stats()["requests"] == 3


def test_request_larger_than_the_limit_fails_before_sending(server: FakeOpenAI) -> None:
    client = client_for(server, tpm=1000)
    with pytest.raises(RequestTooLarge, match="gpt-4o-mini"):
        client.chat.completions.create(**{**CHAT, "max_tokens": 5000})
    assert server.stats()["requests"] == 0


@pytest.fixture
def one_per_second() -> Iterator[FakeOpenAI]:
    """A server that allows one request per second and no burst: the second call must wait."""
    with FakeOpenAI(rpm=60, bucket_seconds=1.0) as fake:
        yield fake


def test_max_wait_raises_quickly_with_a_retry_after_hint(one_per_second: FakeOpenAI) -> None:
    client = client_for(one_per_second, rpm=60, max_wait=0.2)
    client.chat.completions.create(**CHAT)
    started = time.monotonic()
    with pytest.raises(RateLimitTimeout) as info:
        client.chat.completions.create(**CHAT)
    assert time.monotonic() - started < 0.5
    assert 0.5 < info.value.retry_after <= 1.5
    assert one_per_second.stats()["requests"] == 1


def test_a_429_asking_longer_than_max_wait_raises_rate_limit_timeout(one_per_second: FakeOpenAI) -> None:
    # Another process used the budget: this client's limiter knows nothing yet, so its call goes and
    # draws the server's 429, asking for about a second.
    client_for(one_per_second).chat.completions.create(**CHAT)
    with pytest.raises(RateLimitTimeout) as info:
        client_for(one_per_second, max_wait=0.3).chat.completions.create(**CHAT)
    assert isinstance(info.value.__cause__, openai.RateLimitError)
    assert info.value.retry_after > 0.3
    assert one_per_second.stats()["rate_limited"] == 1


def test_copies_share_limiter_and_counters_and_keep_sdk_retries_off(server: FakeOpenAI) -> None:
    client = client_for(server, rpm=6000)
    quick = client.with_options(timeout=5, max_retries=1)
    assert isinstance(quick, ThrottledClient)
    assert quick.limiter is client.limiter
    assert quick.retry.max_retries == 1 and client.retry.max_retries == FAST.max_retries
    # max_retries reports the policy; the SDK's own retries stay off: 1 + 1 attempts, not (1 + 1) ** 2
    assert quick.max_retries == 1 and client.max_retries == FAST.max_retries
    server.inject("500", 5)
    with pytest.raises(openai.InternalServerError):
        quick.chat.completions.create(**CHAT)
    assert server.stats()["requests"] == 2
    client.copy(max_wait=3.0).chat.completions.create(**CHAT)  # the other 3 faults, retried, then served
    assert client.stats().calls == 2 and server.stats()["requests"] == 6


def test_max_retries_reports_the_policy_and_setting_it_changes_the_policy(server: FakeOpenAI) -> None:
    client = ThrottledClient(base_url=server.base_url, api_key=KEY, max_retries=5)
    assert client.max_retries == 5 == client.retry.max_retries
    assert ThrottledClient(base_url=server.base_url, api_key=KEY).max_retries == Retry().max_retries
    client.max_retries = 2
    assert client.retry.max_retries == 2 and client.copy().max_retries == 2


def test_a_limiter_can_be_shared_between_clients(server: FakeOpenAI) -> None:
    limiter = RateLimiter(limits={"gpt-4o-mini": Limits(rpm=6000, tpm=100_000)})
    first = client_for(server, limiter=limiter)
    second = client_for(server, limiter=limiter)
    first.chat.completions.create(**CHAT)
    second.chat.completions.create(**CHAT)
    assert limiter.snapshot()["gpt-4o-mini"]["tokens_limit"] == 100_000


def test_streaming_calls_are_throttled(server: FakeOpenAI) -> None:
    client = client_for(server, rpm=6000, tpm=100_000)
    stream = client.chat.completions.create(**CHAT, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "echo:hello#0"
    assert client.stats().calls == 1
    assert client.limiter.snapshot()["gpt-4o-mini"]["tokens_level"] is not None


def test_a_stream_is_settled_against_its_usage_when_it_ends(server: FakeOpenAI) -> None:
    client = client_for(server, rpm=6000, tpm=100_000)
    stream = client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and client.stats().tokens_used == usage[0].total_tokens > 0
    # Without usage in the stream the estimate stays charged: nothing is refunded, nothing lost.
    level = client.limiter.snapshot()["gpt-4o-mini"]["tokens_level"]
    for _ in client.chat.completions.create(**{**CHAT, "max_tokens": 5000}, stream=True):
        pass
    assert client.stats().tokens_used == usage[0].total_tokens
    # ~5,000 tokens booked stay booked (a settlement would have given back all but ~12); a second's refill
    # (1,667 at 100,000 TPM) cannot hide that.
    assert client.limiter.snapshot()["gpt-4o-mini"]["tokens_level"] <= level - 3000


def test_user_supplied_http_client_gets_the_hook(server: FakeOpenAI) -> None:
    client = client_for(server, http_client=openai.DefaultHttpxClient())
    client.chat.completions.create(**CHAT)
    assert client.limiter.snapshot()["gpt-4o-mini"]["requests_limit"] == 6000


def test_azure_limits_are_keyed_per_deployment() -> None:
    with FakeOpenAI(rpm=600, tpm=100_000, azure=True) as server:
        client = ThrottledAzureClient(
            azure_endpoint=server.azure_endpoint,
            api_key=KEY,
            api_version="2024-06-01",
            azure_deployment="my-deployment",
            rpm=600,
            tpm=100_000,
            retry=FAST,
        )
        server.inject("429")
        client.chat.completions.create(**CHAT)
        assert set(client.limiter.snapshot()) == {"my-deployment"}
        assert client.stats().rate_limited == {"rate_limit_requests": 1}
        free = ThrottledAzureClient(azure_endpoint=server.azure_endpoint, api_key=KEY, api_version="2024-06-01")
        free.chat.completions.create(**{**CHAT, "model": "other-deployment"})
        assert set(free.limiter.snapshot()) == {"other-deployment"}


def test_the_key_never_shows(server: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    client = client_for(server, rpm=6000)
    server.inject("500")
    with caplog.at_level(logging.DEBUG):
        client.chat.completions.create(**CHAT)
    assert caplog.records  # the retry was logged
    shown = [repr(client), repr(client.limiter), repr(client.stats()), caplog.text, str(client.limiter.snapshot())]
    assert not any("SECRETKEY" in text for text in shown)
    bad = ThrottledClient(base_url=server.base_url, api_key="sk-wrong-SECRETKEY-999", retry=FAST)
    server_with_keys = FakeOpenAI(api_keys=[KEY]).start()
    try:
        bad = ThrottledClient(base_url=server_with_keys.base_url, api_key="sk-wrong-SECRETKEY-999", retry=FAST)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert "SECRETKEY" not in str(info.value)
    finally:
        server_with_keys.stop()


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"rpm": 0}, ValueError, "rpm"),
        ({"tpm": -1}, ValueError, "tpm"),
        ({"rpm": "fast"}, TypeError, "rpm"),
        ({"tpm": float("nan")}, ValueError, "tpm"),
        ({"retry": "yes"}, TypeError, "retry"),
        ({"retry": Retry, "rpm": 1}, TypeError, "retry"),
        ({"max_wait": -1}, ValueError, "max_wait"),
        ({"max_wait": "1"}, TypeError, "max_wait"),
        ({"limiter": object()}, TypeError, "limiter"),
        ({"limiter": RateLimiter(), "rpm": 5}, ValueError, "limiter"),
        ({"limits": {"gpt-4o": (1, 2)}}, TypeError, "limits"),
        ({"max_retries": -1}, ValueError, "max_retries"),
    ],
)
def test_bad_arguments_fail_at_once_naming_the_argument(kwargs: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        ThrottledClient(base_url="http://127.0.0.1:9/v1", api_key=KEY, **kwargs)


def test_ctrl_c_while_waiting_gives_the_reservation_back(one_per_second: FakeOpenAI) -> None:
    server = one_per_second
    client = client_for(server, rpm=60)
    client.chat.completions.create(**CHAT)
    interrupted: List[BaseException] = []

    def worker() -> None:
        try:
            client.limiter._sleep = _raise_interrupt  # what Ctrl-C does to a sleeping main thread
            client.chat.completions.create(**CHAT)
        except KeyboardInterrupt as exc:
            interrupted.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(5)
    assert interrupted and server.stats()["requests"] == 1
    assert client.stats().failures == 1


def _raise_interrupt(seconds: float) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("cls", [ThrottledClient, ThrottledAzureClient])
def test_help_reads_as_plain_text(cls: type) -> None:
    """help(ThrottledClient) shows our docstrings as written: no reST roles or literals, no private
    parameters, no sentinel's address."""
    import pydoc

    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    for marker in ("``", ":class:", ":meth:", ":data:", ":attr:", "_stats", "_counter", "<object object"):
        assert marker not in text, f"help({cls.__name__}) shows {marker!r}"
    assert "run_timeout" in text and "max_wait" in text
