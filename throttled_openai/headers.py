"""Parsing of OpenAI's ``x-ratelimit-*`` and ``retry-after`` headers, and of its 429 messages.

Servers differ: OpenAI sends Go durations (``12ms``, ``1.146s``, ``33h57m29.556s``); Azure may send
bare integers (milliseconds in a reset), ``-1``/``0``, a ``retry-after-ms: 0`` beside a ``retry-after:
1``, or nothing at all. Every parser here returns ``None`` for a value it cannot use instead of
raising, because a malformed header must never fail a request that succeeded. What a value *means*
(which window a limit covers) is decided by the limiter, from several responses: see ``windows.py``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional

__all__ = [
    "LimitMessage",
    "RateLimitHeaders",
    "parse_duration",
    "parse_limit_message",
    "parse_rate_limit_headers",
    "parse_retry_after",
    "parse_try_again",
]

_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_TRY_AGAIN = re.compile(r"try again in\s+([0-9][0-9.hmsµun]*)", re.IGNORECASE)
# Anything past two hours is no wait we can act on; treat it as unusable.
_MAX_SECONDS = 7200.0
# Resets of long-window limits (a day, a month) are real: seen up to `33h57m29.556s`.
_MAX_RESET_SECONDS = 400 * 86400.0
_BARE_INTEGER = re.compile(r"\d+")


def parse_duration(value: Optional[str], max_seconds: float = _MAX_SECONDS) -> Optional[float]:
    """Seconds in a Go duration (``1m2.5s``, ``120ms``) or a bare number of seconds (``"7"``, ``"0.5"``).

    Returns ``None`` for missing, empty, negative, non-finite or malformed values, and for durations
    above ``max_seconds`` (two hours by default), so ``-1`` (seen on Azure) and ``banana`` mean
    "unknown", never an error.
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
    if not math.isfinite(seconds) or seconds < 0 or seconds > max_seconds:
        return None
    return seconds


def _reset(value: Optional[str]) -> Optional[float]:
    """Seconds in an ``x-ratelimit-reset-*`` value: a Go duration of any length, or a bare integer of
    *milliseconds* (Azure sends ``"500"`` and ``"7"`` on a 120 RPM deployment: as seconds they would
    be absurd). A bare decimal (``"0.5"``) is seconds."""
    if value is not None and _BARE_INTEGER.fullmatch(value.strip()):
        milliseconds = float(value.strip())
        return milliseconds / 1000.0 if milliseconds / 1000.0 <= _MAX_RESET_SECONDS else None
    return parse_duration(value, _MAX_RESET_SECONDS)


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
    """A limit: at least 1 and finite, else ``None`` (a limit below one per window is junk)."""
    number = _number(value)
    return number if number is not None and number >= 1 else None


@dataclass(frozen=True)
class RateLimitHeaders:
    """What one response said about its rate limit. Every field is ``None`` when not sent or unusable.

    ``limit_*`` are the limits the server chose to show: usually per minute, but sometimes a per-day
    (or longer) limit, which only ``reset_*`` against ``limit - remaining`` tells apart;
    ``remaining_*`` what the server had left after this request; ``reset_*`` seconds until the bucket is
    full again; ``retry_after`` seconds the server asked to wait.
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

    The first *positive* value in that order wins: a zero never overrides a positive hint (an Azure AI
    Foundry 429 sent ``retry-after-ms: 0`` beside ``retry-after: 1``). Zero is returned only when no
    header says more. ``retry-after`` as an HTTP date is ignored: API servers send seconds, and a date
    needs a clock shared with the server.
    """
    zero: Optional[float] = None
    for name, scale in (("retry-after-ms", 1e-3), ("x-ms-retry-after-ms", 1e-3), ("retry-after", 1.0)):
        number = _number(headers.get(name))
        if number is None or number * scale > _MAX_SECONDS:
            continue
        if number > 0:
            return number * scale
        zero = 0.0
    return zero


def parse_rate_limit_headers(headers: Mapping[str, str]) -> RateLimitHeaders:
    """Read every ``x-ratelimit-*`` header we understand from a case-insensitive mapping."""
    return RateLimitHeaders(
        limit_requests=_limit(headers.get("x-ratelimit-limit-requests")),
        limit_tokens=_limit(headers.get("x-ratelimit-limit-tokens")),
        remaining_requests=_number(headers.get("x-ratelimit-remaining-requests")),
        remaining_tokens=_number(headers.get("x-ratelimit-remaining-tokens")),
        reset_requests=_reset(headers.get("x-ratelimit-reset-requests")),
        reset_tokens=_reset(headers.get("x-ratelimit-reset-tokens")),
        retry_after=parse_retry_after(headers),
    )


def parse_try_again(message: Optional[str]) -> Optional[float]:
    """Seconds from "Please try again in 1.4s" (or ``634ms``, ``28m48s``, ``8h9m``) in an error message.

    Long waits are returned as they are (a per-day limit): whether to wait is the retry policy's call."""
    if not message:
        return None
    match = _TRY_AGAIN.search(message)
    if match is None:
        return None
    return parse_duration(match.group(1).rstrip("."), _MAX_RESET_SECONDS)  # "28m48s", "8h9m" too


_NUMBER = r"([0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?)"  # 40000, 2,000,000, 1.5
_LIMIT_MESSAGE = re.compile(
    rf"on (requests|tokens) per (min|day)\b[^:]*:\s*Limit\s+{_NUMBER}"
    rf"(?:,\s*Used\s+{_NUMBER})?(?:,\s*Requested\s+{_NUMBER})?",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class LimitMessage:
    """The numbers in a 429's message, e.g. "... on tokens per min (TPM): Limit 40000, Used 39000,
    Requested 2000. Please try again in 1.5s.".

    ``kind``: ``"requests"`` or ``"tokens"``; ``window``: seconds the limit covers (60 for "per min",
    86,400 for "per day"); ``limit``; ``used`` and ``requested`` (``None`` when not stated; older
    messages have no ``Used``); ``too_large``: "Request too large": ``requested`` exceeds the whole limit.
    """

    kind: str
    window: float
    limit: float
    used: Optional[float] = None
    requested: Optional[float] = None
    too_large: bool = False


def parse_limit_message(message: Optional[str]) -> Optional[LimitMessage]:
    """The limit a rate-limit 429's message names (RPM, TPM, RPD or TPD), or ``None``."""
    if not message:
        return None
    match = _LIMIT_MESSAGE.search(message)
    if match is None:
        return None
    kind, per, limit, used, requested = match.groups()

    def number(text: Optional[str]) -> Optional[float]:
        return None if text is None else float(text.replace(",", ""))

    value = number(limit)
    if value is None or not math.isfinite(value) or value < 1:
        return None
    return LimitMessage(
        kind=kind.lower(),
        window=60.0 if per.lower() == "min" else 86400.0,
        limit=value,
        used=number(used),
        requested=number(requested),
        too_large="request too large" in message.lower(),
    )
