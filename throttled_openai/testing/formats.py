"""OpenAI's formats: durations, numbers, masked keys, and its error bodies and rate-limit messages."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

JSONDict = Dict[str, Any]

_EPS = 1e-6  # tolerance, in bucket units, so a client that waits exactly "try again in" gets in
_RL_DOCS = "Visit https://platform.openai.com/account/rate-limits to learn more."
# bucket unit -> (error "type", the words OpenAI's 429 messages use for it)
_UNITS = {
    "RPM": ("requests", "requests per min (RPM)"),
    "TPM": ("tokens", "tokens per min (TPM)"),
    "RPD": ("requests", "requests per day (RPD)"),
    "TPD": ("tokens", "tokens per day (TPD)"),
}


def _go_duration(seconds: float) -> str:
    """Format a non-negative duration like Go's time.Duration (``12ms``, ``1.146s``, ``6m0s``).

    OpenAI's reset headers and "try again in" messages use this format.  Rounded *up* to whole
    milliseconds so that waiting the advertised time is always enough.
    """
    ms = math.ceil(seconds * 1000 - _EPS) if seconds > 0 else 0
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rem = divmod(ms, 3_600_000)
    minutes, rem = divmod(rem, 60_000)
    secs, frac = divmod(rem, 1000)
    sec = (f"{secs}.{frac:03d}".rstrip("0") if frac else str(secs)) + "s"
    if hours:
        return f"{hours}h{minutes}m{sec}"
    return f"{minutes}m{sec}" if minutes else sec


def _ms(seconds: float) -> int:
    """Whole milliseconds, rounded up (with the same tolerance as :func:`_go_duration`), >= 0."""
    return max(0, math.ceil(seconds * 1000 - _EPS))


def _num(value: float) -> str:
    """Render a limit: ``600`` rather than ``600.0``."""
    return str(int(value)) if float(value).is_integer() else str(round(value, 3))


def _mask_key(key: str) -> str:
    """Mask an API key the way OpenAI does (``sk-te***********1234``); short keys fully."""
    if len(key) < 13:
        return "*" * len(key)
    return key[:5] + "*" * (len(key) - 9) + key[-4:]


def _error(message: str, type_: str, code: Optional[str] = None, param: Optional[str] = None) -> JSONDict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _quota_error() -> JSONDict:
    return _error(
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
        "insufficient_quota",
        code="insufficient_quota",
    )


def _too_large_error(model: str, unit: str, limit: float, cost: int) -> JSONDict:
    """OpenAI's 429 for a request above a whole token limit; ``unit`` is "TPM" or "TPD"."""
    return _error(
        f"Request too large for {model} in organization org-fake on {_UNITS[unit][1]}: Limit {_num(limit)}, "
        f"Requested {cost}. The input or output tokens must be reduced in order to run successfully. {_RL_DOCS}",
        "tokens",
        code="rate_limit_exceeded",
    )


def _rate_limit_error(
    model: str, unit: str, limit: float, used: Optional[float], requested: int, wait: float
) -> JSONDict:
    """OpenAI's rate-limit 429 body for the bucket ``unit`` (see _UNITS); ``used`` None omits "Used N, "."""
    kind, words = _UNITS[unit]
    used_part = "" if used is None else f"Used {_num(used)}, "
    return _error(
        f"Rate limit reached for {model} in organization org-fake on {words}: Limit {_num(limit)}, "
        f"{used_part}Requested {requested}. Please try again in {_go_duration(wait)}. {_RL_DOCS}",
        kind,
        code="rate_limit_exceeded",
    )
