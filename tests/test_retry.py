"""The retry policy on its own: backoff arithmetic and what is (never) retried."""

from __future__ import annotations

import random
from typing import Any, Dict, Optional

import openai
import pytest

from throttled_openai import Retry

try:  # the HTTP library this SDK major builds on: httpx2 for openai 3.x, httpx before
    import httpx2 as http
except ImportError:
    import httpx as http  # type: ignore[no-redef]


def status_error(status: int, body: Optional[Dict[str, Any]] = None, headers: Optional[Dict[str, str]] = None):
    request = http.Request("POST", "http://127.0.0.1/v1/chat/completions")
    response = http.Response(status, headers=headers or {}, request=request)
    error = (body or {}).get("error")
    message = (error or {}).get("message", f"status {status}")
    cls = {429: openai.RateLimitError, 500: openai.InternalServerError, 400: openai.BadRequestError}.get(
        status, openai.APIStatusError
    )
    return cls(message, response=response, body=error)


def rate_limit(
    kind: str = "tokens",
    code: str = "rate_limit_exceeded",
    message: str = "Rate limit reached. Please try again in 1.5s.",
    **headers: str,
):
    return status_error(429, {"error": {"message": message, "type": kind, "code": code}}, headers)


def test_full_jitter_backoff_stays_under_the_cap() -> None:
    policy = Retry(backoff_base=0.5, backoff_max=4.0)
    rng = random.Random(1)
    for retry_number, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (80, 4.0)]:
        samples = [policy.backoff(retry_number, rng) for _ in range(200)]
        assert all(0 <= s <= cap for s in samples)
        assert max(samples) > cap * 0.8  # full jitter spreads over the whole range


def test_retry_after_header_beats_backoff() -> None:
    policy = Retry()
    decision = policy.decide(rate_limit(**{"retry-after-ms": "2000"}), 1, random.Random(0))
    assert decision.retry and decision.pause_all
    assert 2.0 <= decision.delay <= 2.2
    assert decision.kind == "rate_limit_tokens"


def test_try_again_message_when_headers_are_missing() -> None:
    decision = Retry().decide(rate_limit(kind="requests"), 1, random.Random(0))
    assert 1.5 <= decision.delay <= 1.65 and decision.kind == "rate_limit_requests"


@pytest.mark.parametrize(
    "code",
    [
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
    ],
)
def test_quota_errors_are_never_retried(code: str) -> None:
    decision = Retry(max_retries=100).decide(rate_limit(kind=code, code=code, message="You exceeded your quota"), 1)
    assert not decision.retry and decision.kind == "quota" and not decision.pause_all


def test_request_too_large_is_never_retried() -> None:
    error = rate_limit(
        message="Request too large for gpt-4o in organization org-x on tokens per min (TPM): "
        "Limit 30000, Requested 34307. The input or output tokens must be reduced"
    )
    decision = Retry().decide(error, 1)
    assert not decision.retry and decision.kind == "too_large"


@pytest.mark.parametrize(
    ("status", "retry"),
    [
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (422, False),
        (408, True),
        (409, True),
        (500, True),
        (502, True),
        (503, True),
        (520, True),
        (529, True),
    ],
)
def test_statuses(status: int, retry: bool) -> None:
    assert Retry().decide(status_error(status), 1).retry is retry


def test_x_should_retry_is_obeyed() -> None:
    assert not Retry().decide(status_error(503, headers={"x-should-retry": "false"}), 1).retry
    assert Retry().decide(status_error(400, headers={"x-should-retry": "true"}), 1).retry


def test_connection_errors_and_timeouts_are_retried() -> None:
    request = http.Request("POST", "http://127.0.0.1/v1/completions")
    assert Retry().decide(openai.APIConnectionError(request=request), 1).retry
    assert Retry().decide(openai.APITimeoutError(request=request), 1).kind == "timeout"


def test_attempts_run_out() -> None:
    policy = Retry(max_retries=2)
    error = status_error(500)
    assert policy.decide(error, 2).retry and not policy.decide(error, 3).retry
    assert not Retry(max_retries=0).decide(error, 1).retry


def test_too_long_retry_after_is_not_waited_for() -> None:
    decision = Retry(max_retry_after=10).decide(rate_limit(**{"retry-after": "60"}), 1)
    assert not decision.retry and not decision.pause_all
    per_day = rate_limit(kind="requests", message="... requests per day (RPD) ... Please try again in 28m48s.")
    decision = Retry().decide(per_day, 1)
    assert not decision.retry and not decision.pause_all  # nobody else is held up for half an hour


def test_the_last_rate_limit_still_pauses_the_others() -> None:
    decision = Retry(max_retries=1).decide(rate_limit(), 2)
    assert not decision.retry and decision.pause_all and decision.delay == pytest.approx(1.5)


def test_policy_is_immutable_and_validated() -> None:
    policy = Retry()
    with pytest.raises(AttributeError):
        policy.max_retries = 3  # type: ignore[misc]
    assert policy.replace(max_retries=1).max_retries == 1 and policy.max_retries == 6
    for bad, error in [
        ({"max_retries": -1}, ValueError),
        ({"max_retries": 1.5}, TypeError),
        ({"deadline": -1}, ValueError),
        ({"backoff_max": float("inf")}, ValueError),
        ({"backoff_base": "1"}, TypeError),
    ]:
        with pytest.raises(error):
            Retry(**bad)
