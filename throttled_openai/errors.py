"""Exceptions raised by throttled_openai.

Everything derives from :class:`ThrottledOpenAIError`, itself an :class:`openai.OpenAIError`, so code
that already catches the SDK's base error keeps working. Errors that come from the API (a 400, a quota
429, a 500 after the last retry) are raised as the SDK's own exception types, unchanged.
"""

from __future__ import annotations

from typing import Optional

import openai

__all__ = ["Cancelled", "LimiterUnavailable", "RateLimitTimeout", "RequestTooLarge", "ThrottledOpenAIError"]


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
    """The request costs more tokens than the whole per-minute limit: it can never be sent.

    Raised before anything is sent, instead of waiting forever. Reduce the prompt or ``max_tokens``.
    """

    def __init__(self, model: str, tokens: int, limit: float, detail: Optional[str] = None) -> None:
        self.model = model
        self.tokens = tokens
        self.limit = limit
        message = (
            f"request for model {model!r} needs {tokens} tokens, more than its whole limit of "
            f"{limit:g} tokens per minute; reduce the input or max_tokens"
        )
        super().__init__(message + (f" ({detail})" if detail else ""))


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
