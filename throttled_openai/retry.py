"""What to retry, and after how long.

:class:`Retry` is an immutable policy in the spirit of urllib3's ``Retry``: it holds configuration only,
so one instance can be shared by every thread and client. The state of one call (attempt number, start
time) lives in the caller's locals. The policy answers three questions about a failed attempt: may it
be retried (:meth:`Retry.decide`), how long to wait first (Retry-After beats backoff), and whether every
thread sharing the limiter should wait too (a rate-limit 429 means the shared budget is gone).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any, Optional

import openai

from .errors import IncompleteStream, MalformedResponse
from .headers import parse_retry_after, parse_try_again

__all__ = ["NEVER_RETRY_CODES", "RETRY_STATUS_CODES", "Decision", "Retry"]

#: Statuses below 500 worth another attempt (every 5xx is): timeout, conflict, rate limit.
RETRY_STATUS_CODES = frozenset([408, 409, 429])

#: 429 codes that no amount of waiting fixes: the account has no quota or money left.
NEVER_RETRY_CODES = frozenset(
    [
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
        "project_usage_limit_exceeded",
        "billing_hard_limit_reached",
        "billing_not_active",
        "access_terminated",
    ]
)


@dataclass(frozen=True)
class Decision:
    """The verdict on one failed attempt.

    ``retry``: send again. ``delay``: seconds to wait first (already includes jitter). ``pause_all``:
    the server said the shared budget is exhausted, so every caller of the same limit waits ``delay``.
    ``kind``: a short label for counters and logs, e.g. ``"rate_limit_tokens"``, ``"server_error"``.
    """

    retry: bool
    delay: float
    pause_all: bool
    kind: str


def _error_code(error: openai.APIStatusError) -> str:
    code = getattr(error, "code", None)
    if code:
        return str(code)
    body = error.body if isinstance(error.body, dict) else {}
    return str(body.get("code") or body.get("type") or "")


def _error_type(error: openai.APIStatusError) -> str:
    kind = getattr(error, "type", None)
    if kind:
        return str(kind)
    body = error.body if isinstance(error.body, dict) else {}
    return str(body.get("type") or "")


@dataclass(frozen=True)
class Retry:
    """Retry policy: exponential backoff with full jitter, a cap, an attempt limit and a deadline.

    - ``max_retries``: attempts after the first; ``0`` disables retrying. Default 6.
    - ``backoff_base`` / ``backoff_max`` (seconds): before retry *k* (1-based) with no server hint the
      wait is uniform in ``[0, min(backoff_max, backoff_base * 2 ** (k - 1))]`` ("full jitter"), so
      with the defaults the caps run 0.5 s, 1 s, 2 s, 4 s, 8 s, 16 s, 30 s, 30 s, ...
    - ``deadline`` (seconds): the whole call, waits for capacity and backoff included, gives up once it
      would end later than this after the call started. ``None``: no deadline, only ``max_retries``.
    - ``respect_retry_after``: a ``retry-after-ms``/``retry-after`` header, or the "try again in 1.4s"
      of a 429 message, replaces the backoff (plus up to 10 % jitter so threads don't return in step).
      Values above ``max_retry_after`` seconds are not waited for: the error is raised.

    Retried as transient faults: 5xx (``server_error``; ``gateway_error`` when the body is a proxy's
    page, not OpenAI's JSON), timeouts and connection errors, and 2xx responses whose body is not
    what the endpoint returns (``malformed_response``: cut short, empty, HTML, an ``error`` object).

    Never retried, whatever the settings: quota and billing 429s (:data:`NEVER_RETRY_CODES`), "Request
    too large" 429s, and 4xx other than 408/409/429 (bad input, auth, not found). A server that sends
    ``x-should-retry: false`` is obeyed.
    """

    max_retries: int = 6
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    deadline: Optional[float] = None
    respect_retry_after: bool = True
    max_retry_after: float = 120.0

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise TypeError(f"max_retries must be an int, got {self.max_retries!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        for name in ("backoff_base", "backoff_max", "max_retry_after"):
            _check_seconds(name, getattr(self, name), allow_none=False)
        _check_seconds("deadline", self.deadline, allow_none=True)
        if self.backoff_base == 0:
            raise ValueError("backoff_base must be > 0 seconds: 0 would retry at once, in a burst")
        if self.backoff_max < self.backoff_base:
            raise ValueError(
                f"backoff_max ({self.backoff_max!r} s) must be >= backoff_base ({self.backoff_base!r} s): "
                "it caps the backoff that starts at backoff_base"
            )

    def replace(self, **changes: Any) -> Retry:
        """A copy with some fields changed (policies are immutable)."""
        return replace(self, **changes)

    def backoff(self, retry_number: int, rng: Optional[random.Random] = None) -> float:
        """Seconds to wait before retry ``retry_number`` (1-based) when the server gave no hint."""
        cap = min(self.backoff_max, self.backoff_base * 2 ** min(retry_number - 1, 62))
        return (rng or random).uniform(0.0, cap)

    def server_delay(self, error: BaseException) -> Optional[float]:
        """Seconds the server asked for, from headers or the error message; ``None`` if it didn't say."""
        if not self.respect_retry_after or not isinstance(error, openai.APIStatusError):
            return None
        delay = parse_retry_after(error.response.headers)
        if delay is None:
            delay = parse_try_again(getattr(error, "message", None) or str(error))
        return delay

    def decide(self, error: BaseException, retry_number: int, rng: Optional[random.Random] = None) -> Decision:
        """Whether to send attempt ``retry_number + 1`` after ``error``, and how long to wait first.

        ``retry_number`` counts retries including this one (1 for the first retry). Exhaustion of
        ``max_retries`` is part of the verdict; the deadline is the caller's to check against ``delay``.
        """
        kind, retryable, rate_limited = self.classify(error)
        if not retryable:
            return Decision(False, 0.0, False, kind)
        delay = self.server_delay(error)
        if delay is not None and delay > self.max_retry_after:
            # Not worth waiting (e.g. a per-day limit): raise, and hold nobody else up for it either.
            return Decision(False, delay, False, kind)
        if retry_number > self.max_retries:
            # This call gives up, but a rate limit still holds for everyone sharing it.
            return Decision(False, delay or 0.0, rate_limited and delay is not None, kind)
        if delay is None:
            delay = self.backoff(retry_number, rng)
        else:
            delay += (rng or random).uniform(0.0, 0.1 * delay)
        return Decision(True, delay, rate_limited, kind)

    @staticmethod
    def classify(error: BaseException) -> tuple[str, bool, bool]:
        """``(kind, retryable, rate_limited)`` for an error raised by the SDK (or a 2xx found malformed)."""
        if isinstance(error, IncompleteStream):
            return "incomplete_stream", True, False
        if isinstance(error, MalformedResponse):
            return "malformed_response", True, False
        if isinstance(error, openai.APITimeoutError):
            return "timeout", True, False
        if isinstance(error, openai.APIConnectionError):
            return "connection", True, False
        if not isinstance(error, openai.APIStatusError):
            return type(error).__name__, False, False
        status = error.status_code
        should_retry = error.response.headers.get("x-should-retry", "").lower()
        if status == 429:
            code, kind = _error_code(error), _error_type(error)
            if code in NEVER_RETRY_CODES or kind in NEVER_RETRY_CODES:
                return "quota", False, False
            if "request too large" in (getattr(error, "message", "") or "").lower():
                return "too_large", False, False
            label = "rate_limit_" + (kind if kind in ("requests", "tokens") else "other")
            return label, should_retry != "false", True
        if should_retry in ("true", "false"):
            return f"status_{status}", should_retry == "true", False
        if status >= 500:
            # Not OpenAI's JSON error but a page (HTML) from a proxy, gateway or load balancer in between.
            return ("server_error" if isinstance(error.body, (dict, type(None))) else "gateway_error"), True, False
        if status in RETRY_STATUS_CODES:
            return f"status_{status}", True, False
        return f"status_{status}", False, False


def _check_seconds(name: str, value: Optional[float], *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
