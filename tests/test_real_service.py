"""The client against a fake that behaves as the real service was recorded to: per-day limits in the
headers, limits named only in 429 messages, costs counted by characters or JSON bytes, and Azure AI
Foundry's retry hints. The real openai SDK, over real HTTP."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List

import openai
import pytest

from throttled_openai import BudgetExhausted, RequestTooLarge, Retry, ThrottledClient
from throttled_openai.testing import FakeOpenAI
from throttled_openai.tokens import TokenCounter, estimate_cost

KEY = "sk-test-SECRETKEY-0123456789"
FAST = Retry(backoff_base=0.01, backoff_max=0.05)


def chat(client: Any, content: str = "hello", **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 5)
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}], **kwargs
    )


def client_for(server: FakeOpenAI, **kwargs: Any) -> ThrottledClient:
    kwargs.setdefault("retry", FAST)
    return ThrottledClient(base_url=server.base_url, api_key=KEY, **kwargs)


def test_zero_config_reads_per_day_headers_as_a_budget_not_a_rate() -> None:
    # Tier 1, gpt-3.5-turbo as recorded: headers say 10,000 requests (per day: reset 8.64 s after one).
    with FakeOpenAI(rpm=3500, rpd=10_000, headers_report="day") as server:
        client = client_for(server)
        for _ in range(3):
            chat(client)
        state = client.stats().limits["gpt-4o-mini"]
    assert state["requests_budget_limit"] == 10_000
    assert state["requests_budget_window"] == pytest.approx(86400, rel=0.05)
    assert state["requests_budget_level"] == pytest.approx(10_000 - 3, abs=2)
    # The per-minute limit is not 10,000: it is unknown, and requests go at a provisional rate.
    assert (state["requests_limit"], state["requests_source"]) == (60, "provisional")


def test_a_per_minute_limit_is_learned_from_the_429_message() -> None:
    # Free tier as recorded: headers show 200 requests (per day), the 429 body says the RPM.
    with FakeOpenAI(rpm=40, rpd=200, headers_report="day", bucket_seconds=1.0) as server:
        client = client_for(server)
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda i: chat(client, f"q{i}"), range(5)))
        assert len(replies) == 5
        state = client.stats().limits["gpt-4o-mini"]
        assert (state["requests_limit"], state["requests_source"]) == (40, "429")
        assert (state["requests_budget_limit"], state["requests_budget_source"]) == (200, "headers")
        assert server.stats()["rate_limited"] <= 3  # the provisional rate met the real one once
        assert "rpm=40.0 (429)" in repr(client.limiter)


def test_a_used_up_daily_budget_raises_at_once_without_sending() -> None:
    with FakeOpenAI(rpm=6000, rpd=3, headers_report="day") as server:
        client = client_for(server)
        for _ in range(3):
            chat(client)
        started = time.monotonic()
        with pytest.raises(BudgetExhausted) as caught:
            chat(client)
        assert time.monotonic() - started < 5
        assert server.stats()["requests"] == 3  # the fourth was never sent
    error = caught.value
    assert error.kind == "requests" and error.limit == 3 and error.retry_after > 3600
    assert "requests per day" in str(error) and "learned from headers" in str(error)


def test_a_per_day_429_message_stops_the_next_calls_before_they_are_sent() -> None:
    # The headers show the minute; only the 429 body names the daily limit.
    with FakeOpenAI(rpm=6000, rpd=3) as server:
        client = client_for(server)
        for _ in range(3):
            chat(client)
        with pytest.raises(openai.RateLimitError, match="per day"):
            chat(client)  # "try again in" hours: not retried
        with pytest.raises(BudgetExhausted, match="learned from a 429 message"):
            chat(client)
        assert server.stats()["requests"] == 4


def test_a_call_too_large_for_a_limit_learned_while_it_waits_fails_then() -> None:
    with FakeOpenAI(tpm=6000, latency=0.3) as server:
        client = client_for(server)
        errors: List[BaseException] = []
        first = threading.Thread(target=chat, args=(client,))
        first.start()  # the probe: its answer shows the limit
        time.sleep(0.05)
        started = time.monotonic()
        try:
            chat(client, max_tokens=9000)
        except RequestTooLarge as error:
            errors.append(error)
        first.join()
        assert time.monotonic() - started < 5  # not the 31 s wait for a bucket that can never hold it
        assert len(errors) == 1 and "6000 tokens per minute" in str(errors[0])
        assert server.stats()["requests"] == 1  # never sent


def test_too_large_names_the_output_cap_it_assumed() -> None:
    with FakeOpenAI(tpm=1000) as server:
        client = client_for(server, tpm=1000)
        with pytest.raises(RequestTooLarge, match="1,024 output tokens assumed: pass max_tokens"):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(RequestTooLarge) as caught:
            chat(client, max_tokens=1001)
        assert "assumed" not in str(caught.value)


def test_a_request_too_large_by_characters_fails_at_once() -> None:
    # ~5,950 tiktoken tokens but ~6,100 by characters, against 6,000 TPM: refused at once.
    text = "The quick brown fox jumps over the lazy dog. " * 542
    with FakeOpenAI(tpm=6000, cost_model="chars") as server:
        client = client_for(server, tpm=6000)
        started = time.monotonic()
        with pytest.raises(RequestTooLarge):
            chat(client, text, max_tokens=1)
        assert time.monotonic() - started < 2
        assert server.stats()["requests"] == 0


@pytest.mark.parametrize("cost_model", ["chars", "json_bytes"])
def test_the_cost_factor_is_learned_from_how_remaining_moves(cost_model: str) -> None:
    inputs = [f"item {i}" for i in range(50)]  # short inputs: JSON quoting adds a lot per input
    with FakeOpenAI(tpm=600_000, cost_model=cost_model) as server:
        client = client_for(server)
        client.embeddings.create(model="text-embedding-3-small", input=inputs)  # the probe, counted alone
        charged = server.admitted[-1][2]  # the server's own count of that request
        factor = client.limiter.cost_factor((client._account, "text-embedding-3-small"))
    ours = estimate_cost("embeddings", {"model": "text-embedding-3-small", "input": inputs}, TokenCounter())
    assert charged != ours  # the two counts differ: there is something to learn
    assert factor == pytest.approx(max(0.8, charged / ours), rel=0.02)


def test_a_zero_retry_after_ms_does_not_override_retry_after() -> None:
    # An Azure AI Foundry 429 sent retry-after: 1 with retry-after-ms: 0; read as "now", three retries
    # took 45 ms. The positive hint wins.
    with FakeOpenAI(rpm=6000, extra_429_headers={"retry-after-ms": "0"}) as server:
        client = client_for(server, rpm=6000, tpm=1_000_000)
        server.inject("429")
        started = time.monotonic()
        chat(client)
        assert time.monotonic() - started >= 0.95
        assert client.stats().retries == 1
