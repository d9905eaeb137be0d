"""Which window a limit in the headers covers, and what the server charged for a request.

The ``x-ratelimit-limit-*`` headers do not say their window. Usually it is a minute, but recorded
responses show per-day and longer limits there too (``limit-requests: 10000``, ``remaining: 9999``,
``reset: 8.64s`` is 10,000 requests per day, not per minute). The reset gives it away: the server's
bucket holds the whole limit and refills continuously over its window, so after using
``limit - remaining`` units the bucket is full again in ``reset = window × (limit - remaining) /
limit``. :func:`estimate_window` turns that around; :class:`WindowVote` takes the median of the last
few estimates, so that one response skewed by concurrency, refill or rounding does not flip a limit.

A window well above a minute makes that limit a *budget* of the limiter (never sent past); a window of
about a minute or less (a server that enforces in one-second slices shows resets under a second) is a
per-minute limit, as the headers are documented.

The same reset tells what one request cost the server: right after a request sent into a full bucket,
``reset × limit / window`` units are missing, and that is the server's own count of its cost, whatever
that count is based on (characters, JSON bytes). :class:`Calibration` keeps the ratio of that count to
our estimate.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Deque, Optional, Tuple

__all__ = ["LONG_WINDOW_SECONDS", "MINUTE", "Calibration", "Refunds", "WindowVote", "estimate_window"]

MINUTE = 60.0
#: A window estimate at or above this many seconds makes a limit a long-window budget. Per-minute limits
#: estimate at 60 s (or less when the server enforces in slices); per-day ones at about 86,400 s.
LONG_WINDOW_SECONDS = 120.0
_VOTES = 5  # estimates a window vote keeps
_SAMPLES = 9  # cost ratios a calibration keeps
#: The calibration factor stays within these bounds: a wrong sample must not stop (or flood) a limit.
MIN_FACTOR, MAX_FACTOR = 0.8, 4.0
_NEAR_FULL = 0.8  # a bucket above this share of full may have lost refill: no refund sample spans it
_MIN_SAMPLE = 0.5  # a ratio below this is noise (a server that had not counted the request yet)


def estimate_window(limit: float, remaining: Optional[float], reset: Optional[float]) -> Optional[float]:
    """Seconds the limit's bucket takes to refill from empty: ``reset × limit / (limit - remaining)``.

    ``None`` when it cannot be told: no reset or remaining, or nothing used (``remaining >= limit``).
    """
    if remaining is None or reset is None or remaining >= limit:
        return None
    return reset * limit / (limit - remaining)


class WindowVote:
    """The window of one header limit (requests or tokens of one model), from its last few estimates.

    Not thread-safe: the limiter calls it under its lock.
    """

    __slots__ = ("_estimates",)

    def __init__(self) -> None:
        self._estimates: Deque[float] = deque(maxlen=_VOTES)

    def add(self, estimate: Optional[float]) -> None:
        if estimate is not None and math.isfinite(estimate):
            self._estimates.append(estimate)

    @property
    def window(self) -> Optional[float]:
        """The median estimate in seconds, or ``None`` before any."""
        return _median(self._estimates) if self._estimates else None

    @property
    def long(self) -> bool:
        """Whether the limit covers a window well above a minute (a budget, not a rate)."""
        window = self.window
        return window is not None and window >= LONG_WINDOW_SECONDS


class Calibration:
    """The ratio of the server's count of a request's tokens to our estimate of it, per model.

    Samples come from requests the server counted alone (sent into a full per-minute bucket, nothing
    else of ours in flight, so no refund of ours is pending either): their cost is what the reset shows
    missing. A 429 message's ``Requested N`` is a sample too. :attr:`factor` is the median of the last
    few, within [0.8, 4]; 1.0 before any sample. Other processes spending the same limit can only make
    a sample higher (more missing than we sent), which errs on the safe side; a ratio outside [0.5, 4]
    is taken for such noise and dropped, and the median keeps one skewed sample from moving the factor.

    Not thread-safe: the limiter calls it under its lock.
    """

    __slots__ = ("_samples", "factor")

    def __init__(self) -> None:
        self._samples: Deque[float] = deque(maxlen=_SAMPLES)
        self.factor = 1.0

    @property
    def samples(self) -> int:
        return len(self._samples)

    def add(self, charged: float, estimated: float) -> None:
        """Record that the server counted ``charged`` tokens for a request we estimated at ``estimated``."""
        if not (estimated > 0 and charged > 0 and math.isfinite(charged)):
            return
        ratio = charged / estimated
        if not _MIN_SAMPLE <= ratio <= MAX_FACTOR:
            return
        self._samples.append(ratio)
        self.factor = min(MAX_FACTOR, max(MIN_FACTOR, _median(self._samples)))

    def charge(self, estimated: int) -> int:
        """Our estimate in the server's units: what the limiter books."""
        return estimated if self.factor == 1.0 else math.ceil(estimated * self.factor)


class Refunds:
    """Whether the server gives back what a request's estimate over-booked once its usage is known.

    OpenAI-compatible servers differ: some charge the estimate and refund the unused output cap when the
    response ends, others keep the estimate charged. Settling against ``usage`` must follow the server,
    or the client's view drifts above the server's and draws 429s. Over a stretch of a few seconds the
    server's own count of what it consumed is ``remaining`` then, minus ``remaining`` now, plus its
    refill; against what we booked (``A``) and what our settlements would give back (``G``), the share
    refunded is ``(A - consumed) / G``. Other processes spending the same limit, and a bucket that was
    full for a while, make a sample lower, which errs on the safe side. :attr:`share` is the median of
    the last few samples (1.0, a refunding server, before any).

    Not thread-safe: the limiter calls it under its lock.
    """

    __slots__ = ("_anchor", "_samples", "share")

    #: Seconds a sample spans at least: long enough that requests in flight at its ends do not matter.
    SPAN = 2.0

    def __init__(self) -> None:
        self._samples: Deque[float] = deque(maxlen=5)
        self._anchor: Optional[Tuple[float, float, float, float]] = None  # when, remaining, booked, overbooked
        self.share = 1.0

    @property
    def seen_refunding(self) -> bool:
        """Whether samples show the server refunding (most of) what was over-booked."""
        return bool(self._samples) and self.share >= 0.5

    def observe(
        self, when: float, remaining: float, booked: float, overbooked: float, rate: float, full: Optional[float]
    ) -> None:
        """A response: ``remaining`` tokens at the server when it counted a request sent at ``when``;
        ``booked`` and ``overbooked``: our running totals of tokens booked and of over-booking settled
        by then; ``rate``: the server's refill in tokens per second; ``full``: what its bucket holds when
        full (``None``: unknown). A span that starts or ends near full is no sample: the refill lost to a
        full bucket would read as a refund withheld."""
        anchor = self._anchor
        near_full = full is not None and remaining > _NEAR_FULL * full
        if anchor is None or when < anchor[0] or near_full:
            self._anchor = None if near_full else (when, remaining, booked, overbooked)
            return
        span = when - anchor[0]
        if span < self.SPAN:
            return
        self._anchor = (when, remaining, booked, overbooked)
        given = overbooked - anchor[3]
        booked_between = booked - anchor[2]
        if given < max(1.0, 0.1 * booked_between):  # too little over-booking settled to tell
            return
        consumed = anchor[1] - remaining + rate * span
        self._samples.append(min(1.0, max(0.0, (booked_between - consumed) / given)))
        self.share = _median(self._samples)


def _median(values: Deque[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
