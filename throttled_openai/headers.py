"""Parsing of OpenAI's ``x-ratelimit-*`` and ``retry-after`` headers, and of "try again in" messages.

Servers differ: OpenAI sends Go durations (``12ms``, ``1.146s``, ``6m0s``); Azure may send integer
seconds, ``-1``/``0``, or nothing at all. Every parser here returns ``None`` for a value it cannot use
instead of raising, because a malformed header must never fail a request that succeeded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional

__all__ = ["RateLimitHeaders", "parse_duration", "parse_rate_limit_headers", "parse_retry_after", "parse_try_again"]

_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_TRY_AGAIN = re.compile(r"try again in\s+([0-9][0-9.hmsµun]*)", re.IGNORECASE)
# Anything past two hours is not a per-minute reset we can act on; treat it as unusable.
_MAX_SECONDS = 7200.0


def parse_duration(value: Optional[str]) -> Optional[float]:
    """Seconds in a Go duration (``1m2.5s``, ``120ms``) or a bare number of seconds (``"7"``, ``"0.5"``).

    Returns ``None`` for missing, empty, negative, non-finite or malformed values, so ``-1`` (seen on
    Azure) and ``banana`` mean "unknown", never an error.
    """
    if value is None:
        return None
    text = value.strip().lower()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pos, total = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                return None
            total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(text) or pos == 0:
            return None
        seconds = total
    if not math.isfinite(seconds) or seconds < 0 or seconds > _MAX_SECONDS:
        return None
    return seconds


def _number(value: Optional[str]) -> Optional[float]:
    """A non-negative finite number, or ``None``."""
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(number) or number < 0:
        return None
    return number


def _limit(value: Optional[str]) -> Optional[float]:
    """A per-minute limit: at least 1 and finite, else ``None`` (a limit below one a minute is junk)."""
    number = _number(value)
    return number if number is not None and number >= 1 else None


@dataclass(frozen=True)
class RateLimitHeaders:
    """What one response said about its rate limit. Every field is ``None`` when not sent or unusable.

    ``limit_*`` are per-minute limits; ``remaining_*`` what the server had left after this request;
    ``reset_*`` seconds until the bucket is full again; ``retry_after`` seconds the server asked to wait.
    """

    limit_requests: Optional[float] = None
    limit_tokens: Optional[float] = None
    remaining_requests: Optional[float] = None
    remaining_tokens: Optional[float] = None
    reset_requests: Optional[float] = None
    reset_tokens: Optional[float] = None
    retry_after: Optional[float] = None

    @property
    def empty(self) -> bool:
        """True when the response carried no usable rate-limit information at all."""
        return all(value is None for value in vars(self).values())


def parse_retry_after(headers: Mapping[str, str]) -> Optional[float]:
    """Seconds to wait from ``retry-after-ms``, ``x-ms-retry-after-ms`` or ``retry-after``, else ``None``.

    ``retry-after`` as an HTTP date is ignored: API servers send seconds, and a date needs a clock
    shared with the server.
    """
    for name, scale in (("retry-after-ms", 1e-3), ("x-ms-retry-after-ms", 1e-3), ("retry-after", 1.0)):
        number = _number(headers.get(name))
        if number is not None and number * scale <= _MAX_SECONDS:
            return number * scale
    return None


def parse_rate_limit_headers(headers: Mapping[str, str]) -> RateLimitHeaders:
    """Read every ``x-ratelimit-*`` header we understand from a case-insensitive mapping."""
    return RateLimitHeaders(
        limit_requests=_limit(headers.get("x-ratelimit-limit-requests")),
        limit_tokens=_limit(headers.get("x-ratelimit-limit-tokens")),
        remaining_requests=_number(headers.get("x-ratelimit-remaining-requests")),
        remaining_tokens=_number(headers.get("x-ratelimit-remaining-tokens")),
        reset_requests=parse_duration(headers.get("x-ratelimit-reset-requests")),
        reset_tokens=parse_duration(headers.get("x-ratelimit-reset-tokens")),
        retry_after=parse_retry_after(headers),
    )


def parse_try_again(message: Optional[str]) -> Optional[float]:
    """Seconds from "Please try again in 1.4s" (or ``634ms``, ``28m48s``) in an error message."""
    if not message:
        return None
    match = _TRY_AGAIN.search(message)
    if match is None:
        return None
    return parse_duration(match.group(1).rstrip("."))
