"""Exceptions raised by throttled_openai.

Everything derives from :class:`ThrottledOpenAIError`, itself an :class:`openai.OpenAIError`, so code
that already catches the SDK's base error keeps working. Errors that come from the API (a 400, a quota
429, a 500 after the last retry) are raised as the SDK's own exception types, unchanged.
"""

from __future__ import annotations

from typing import Any, Optional

import openai

__all__ = [
    "BudgetExhausted",
    "Cancelled",
    "IncompleteStream",
    "LimiterUnavailable",
    "MalformedResponse",
    "RateLimitTimeout",
    "RequestTooLarge",
    "ThrottledOpenAIError",
    "describe_window",
]


def describe_window(seconds: float) -> str:
    """A limit's window in words: ``"minute"``, ``"day"``, else a duration (``"30d"``, ``"5m"``)."""
    if abs(seconds - 60.0) < 1.0:
        return "minute"
    if abs(seconds - 86400.0) / 86400.0 < 0.05:
        return "day"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:  # an estimate: whole units say enough
            return f"{seconds / size:.0f}{unit}"
    return _duration(seconds)


def _duration(seconds: float) -> str:
    """``7m12s``, ``2h50m``, ``1.5s``: seconds in the largest two units that fit."""
    if seconds < 60:
        return f"{seconds:.3g}s"
    for unit, size, smaller, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            whole, rest = divmod(round(seconds), size)
            return f"{whole}{unit}" + (f"{rest // small_size}{smaller}" if rest // small_size else "")
    return f"{seconds:.0f}s"  # pragma: no cover


class ThrottledOpenAIError(openai.OpenAIError):
    """Base class of the errors this library raises itself."""


class RateLimitTimeout(ThrottledOpenAIError):
    """Capacity would not be available within the allowed wait (``max_wait`` or the retry deadline).

    Nothing was sent, or the server answered a rate-limit 429 asking for a longer wait than is left (that
    429 is the ``__cause__``). ``retry_after`` is how many seconds from now capacity is expected, a good
    value for an HTTP ``Retry-After`` header when a web view answers 503.
    """

    def __init__(self, model: str, retry_after: float, max_wait: float) -> None:
        self.model = model
        self.retry_after = retry_after
        self.max_wait = max_wait
        super().__init__(
            f"rate limit for model {model!r} has no capacity for {retry_after:.3f}s, "
            f"longer than the allowed wait of {max_wait:.3f}s"
        )


class RequestTooLarge(ThrottledOpenAIError, ValueError):
    """The request costs more tokens than a whole token limit (per minute, or a per-day budget): it can
    never be sent.

    Raised before anything is sent, instead of waiting forever, and also while waiting in line when the
    limit is learned only then. Reduce the prompt or ``max_tokens``. ``detail`` says, for instance,
    which output cap was assumed when the request gave none.
    """

    def __init__(
        self, model: str, tokens: int, limit: float, detail: Optional[str] = None, window: float = 60.0
    ) -> None:
        self.model = model
        self.tokens = tokens
        self.limit = limit
        self.window = window
        self.detail = detail
        message = (
            f"request for model {model!r} needs {tokens} tokens, more than its whole limit of "
            f"{limit:g} tokens per {describe_window(window)}; reduce the input or max_tokens"
        )
        super().__init__(message + (f" ({detail})" if detail else ""))

    def with_detail(self, detail: str) -> RequestTooLarge:
        """The same error, saying more (e.g. ``"1,024 output tokens assumed: pass max_tokens"``)."""
        return RequestTooLarge(self.model, self.tokens, self.limit, detail, self.window)


class BudgetExhausted(RateLimitTimeout):
    """A long-window limit (per day or longer) has too little left for this call, and will not refill
    within the allowed wait (``max_wait``; two minutes when it is ``None``).

    Raised at once, before anything is sent. ``kind`` is ``"requests"`` or ``"tokens"``; ``limit`` and
    ``window`` (seconds) name the budget, ``source`` where it was learned (``"headers"``, ``"429"``);
    ``retry_after`` is how many seconds from now it holds this call again.
    """

    def __init__(
        self,
        model: str,
        kind: str,
        limit: float,
        window: float,
        source: str,
        retry_after: float,
        max_wait: float,
    ) -> None:
        self.kind = kind
        self.limit = limit
        self.window = window
        self.source = source
        ThrottledOpenAIError.__init__(
            self,
            f"the {kind} per {describe_window(window)} limit of model {model!r} ({limit:g}, learned from "
            f"{'a 429 message' if source == '429' else source}) is used up: it holds this call again in "
            f"{_duration(retry_after)}, longer than the allowed wait of {_duration(max_wait)}",
        )
        self.model = model
        self.retry_after = retry_after
        self.max_wait = max_wait


class Cancelled(ThrottledOpenAIError):
    """The call was given up before it was sent, because the bulk call it belonged to stopped."""


class LimiterUnavailable(ThrottledOpenAIError):
    """The shared limiter's store (Redis) did not answer, and the limiter was told to raise
    (``on_error="raise"``) rather than fall back to limiting in this process alone.

    Nothing was sent. A web view can answer 503 with ``retry_after`` seconds.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class MalformedResponse(ThrottledOpenAIError, openai.APIResponseValidationError):
    """A 2xx response whose body is not what the endpoint returns: JSON cut short or empty (a proxy or
    load balancer dropped the end), an HTML page, or an ``error`` object sent with status 200.

    A transient fault: retried under the client's :class:`Retry` policy (counted as
    ``malformed_response`` in ``stats().errors``), raised once the policy gives up. The server may
    have done (and billed) the work. ``response`` and ``status_code`` are the HTTP response's.
    """

    def __init__(self, response: Any, problem: str) -> None:
        super().__init__(response, None, message=f"the server's {response.status_code} response {problem}")


class IncompleteStream(MalformedResponse):
    """A stream that ended without its final event (``data: [DONE]``, or the Responses API's
    ``response.completed``): the connection closed cleanly, but the answer is cut short.

    Raised where the stream is read, after the chunks that did arrive: they were already handed over,
    so the call cannot be retried for you. Counted as ``incomplete_stream`` in ``stats().errors``; the
    call's estimate stays charged.
    """
