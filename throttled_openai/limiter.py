"""The in-process rate limiter: requests and tokens per minute, per (account, model), shared by threads.

Each limit is a bucket that holds up to ``capacity`` units and refills continuously at ``limit / 60``
units per second. A call *reserves* one request and its token cost from both buckets at once, under one
short lock: the levels may go negative (debt), and the reservation records when the debt will have
refilled. The caller then sleeps once, outside the lock, until that moment. Later callers see the debt
and are booked after it, so callers go first-come-first-served with no waiter list and no polling (the
design of Go's ``x/time/rate``). Cancelling a reservation or settling it against the real usage gives
back what was not used.

The limiter also learns from what the server says (:meth:`RateLimiter.observe`): the limits themselves
when none were given, the burst the server allows, and what remains when other processes share the
limit. After a rate-limit 429 it pauses every caller of that limit and allows itself a smaller burst.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

from .errors import RateLimitTimeout, RequestTooLarge
from .headers import RateLimitHeaders

__all__ = ["LimitKey", "Limits", "RateLimiter", "Reservation"]

#: ``(account, model)``: ``account`` is a hash of the API key and base URL, never the key itself.
LimitKey = Tuple[str, str]

# Seconds of budget kept back from the server's burst to absorb jitter between our clock and its.
_JITTER_SECONDS = 0.15
# Smallest burst, in seconds of budget, that repeated 429s may shrink a bucket to.
_MIN_BURST_SECONDS = 0.2


def _check_limit(name: str, value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number per minute or None, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 per minute, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Limits:
    """Per-minute limits of one model: ``rpm`` requests and ``tpm`` tokens. ``None``: learn it from the
    server's ``x-ratelimit-limit-*`` headers (until then that dimension is not limited)."""

    rpm: Optional[float] = None
    tpm: Optional[float] = None

    def __post_init__(self) -> None:
        _check_limit("rpm", self.rpm)
        _check_limit("tpm", self.tpm)


class _Bucket:
    """One budget, as a virtual schedule: ``level`` units are available at time ``stamp``.

    ``stamp`` moves into the future as calls are booked: a call is charged at the moment it may go, so
    the bucket refills only up to then. (Charging at booking time instead would let one bucket refill
    for free while the call waits on the other.) ``level`` is negative only after a call larger than
    the burst, or a usage above its estimate: debt that later calls wait out.
    """

    __slots__ = ("booked", "capacity", "ceiling", "configured", "level", "limit", "rate", "stamp")

    def __init__(self, configured: Optional[float], headroom: float, initial_burst: float, now: float) -> None:
        self.configured = configured
        self.limit: Optional[float] = None
        self.rate = 0.0  # units per second
        self.capacity = 0.0
        self.ceiling = math.inf
        self.level = 0.0
        self.stamp = now
        self.booked = 0.0  # running total of units taken, to reconcile with the server's `remaining`
        if configured is not None:
            self.set_limit(configured, headroom)
            self.capacity = self.level = max(self.rate * initial_burst, 1.0)

    @property
    def active(self) -> bool:
        return self.limit is not None

    def set_limit(self, limit: float, headroom: float) -> None:
        self.limit = limit
        self.rate = limit / 60.0 * (1.0 - headroom)
        self.ceiling = min(self.ceiling, limit)

    def level_at(self, when: float) -> float:
        if when <= self.stamp:
            return self.level
        return min(self.capacity, self.level + (when - self.stamp) * self.rate)

    def move_to(self, when: float) -> None:
        """Carry the level forward to ``when`` (never backwards)."""
        if when > self.stamp:
            self.level = self.level_at(when)
            self.stamp = when

    def earliest(self, units: float, now: float) -> float:
        """The first moment from ``now`` on when ``units`` may be taken (a full bucket, if larger)."""
        if not self.active:
            return now
        start = max(now, self.stamp)
        missing = min(units, self.capacity) - self.level_at(start)
        return start if missing <= 0 else start + missing / self.rate

    def take_at(self, units: float, when: float) -> None:
        """Charge ``units`` at ``when`` (at or after :meth:`earliest`), or as debt at the last booking."""
        if self.active:
            self.move_to(when)
            self.level -= units
            self.booked += units

    def give_back(self, units: float) -> None:
        if self.active:
            self.level = min(self.capacity, self.level + units)

    def unbook(self, units: float, mark: float, prev_stamp: float) -> None:
        """Undo a booking of ``units`` that was never used. If it was the last one booked, the schedule
        moves back to where it stood before it, so a call cancelled far in the future holds nobody up."""
        if not self.active:
            return
        if self.booked == mark and prev_stamp < self.stamp:
            self.level = min(self.capacity, self.level + units - (self.stamp - prev_stamp) * self.rate)
            self.stamp = prev_stamp
        else:
            self.give_back(units)


class _KeyState:
    __slots__ = ("learned", "paused_until", "probe", "requests", "shrunk_at", "tokens")

    def __init__(self, limits: Limits, headroom: float, initial_burst: float, now: float) -> None:
        self.requests = _Bucket(limits.rpm, headroom, initial_burst, now)
        self.tokens = _Bucket(limits.tpm, headroom, initial_burst, now)
        # With no limit given at all, one request (the probe) goes first to learn them from headers,
        # so that 64 threads starting at once don't all hit an unknown limit.
        self.learned = limits.rpm is not None or limits.tpm is not None
        self.probe: Optional[Reservation] = None
        self.paused_until = -math.inf
        self.shrunk_at = -math.inf


class Reservation:
    """A booked place in line: one request and ``tokens`` tokens, usable from ``ready_at`` on.

    Obtained from :meth:`RateLimiter.acquire`; end it with :meth:`RateLimiter.settle` once the request
    was sent, or :meth:`RateLimiter.cancel` if it never was.
    """

    __slots__ = ("booked_at", "done", "key", "marks", "prev_stamps", "probe", "ready_at", "tokens")

    def __init__(
        self,
        key: LimitKey,
        tokens: int,
        ready_at: float,
        booked_at: float,
        marks: Tuple[float, float],
        prev_stamps: Tuple[float, float],
    ) -> None:
        self.key = key
        self.tokens = tokens
        self.ready_at = ready_at
        self.booked_at = booked_at
        self.marks = marks  # each bucket's `booked` total right after this booking
        self.prev_stamps = prev_stamps  # each bucket's `stamp` right before it
        self.probe = False
        self.done = False

    def __repr__(self) -> str:
        return f"<Reservation model={self.key[1]!r} tokens={self.tokens} ready_at={self.ready_at:.3f}>"


class RateLimiter:
    """Thread-safe RPM + TPM limiter shared by every client and thread that holds it.

    - ``rpm`` / ``tpm``: per-minute defaults for every model; ``limits``: per-model overrides
      (``{"gpt-4o": Limits(rpm=500, tpm=30_000)}``). A limit left ``None`` is learned from the server's
      headers. Limits are per minute; the server's own (lower) limit wins once it is known.
    - ``headroom``: fraction of each rate left unused to absorb clock and network jitter (default 0.02).
    - ``initial_burst``: seconds of budget that may be spent at once before the server's headers show
      that more is available (default 1.0: start conservatively, as servers may enforce per second).
    - ``clock`` / ``sleep``: injectable for tests; ``clock`` must be monotonic, in seconds.
    """

    def __init__(
        self,
        rpm: Optional[float] = None,
        tpm: Optional[float] = None,
        *,
        limits: Optional[Mapping[str, Limits]] = None,
        headroom: float = 0.02,
        initial_burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._default = Limits(rpm=rpm, tpm=tpm)
        self._limits: Dict[str, Limits] = {}
        for model, model_limits in (limits or {}).items():
            if not isinstance(model, str) or not isinstance(model_limits, Limits):
                raise TypeError(f"limits must map model names to Limits, got {model!r}: {model_limits!r}")
            self._limits[model] = model_limits
        if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
            raise ValueError(f"headroom must be a fraction in [0, 1), got {headroom!r}")
        if (
            isinstance(initial_burst, bool)
            or not isinstance(initial_burst, (int, float))
            or not (math.isfinite(initial_burst) and initial_burst > 0)
        ):
            raise ValueError(f"initial_burst must be a number of seconds > 0, got {initial_burst!r}")
        self._headroom = float(headroom)
        self._initial_burst = float(initial_burst)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._probe_done = threading.Condition(self._lock)
        self._keys: Dict[LimitKey, _KeyState] = {}

    def limits_for(self, model: str) -> Limits:
        """The configured limits of ``model`` (its override, else the defaults)."""
        return self._limits.get(model, self._default)

    def _state(self, key: LimitKey, now: float) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            limits = self.limits_for(key[1])
            state = self._keys[key] = _KeyState(limits, self._headroom, self._initial_burst, now)
        return state

    # -- taking capacity -------------------------------------------------------------------------

    def acquire(self, key: LimitKey, tokens: int, *, timeout: Optional[float] = None) -> Reservation:
        """Reserve one request and ``tokens`` tokens, and wait until they may be used.

        ``timeout`` (seconds): the longest this call may wait; ``None`` waits as long as needed. When
        capacity is further away than that, :class:`RateLimitTimeout` is raised at once, without waiting,
        and nothing stays booked. A cost above the whole per-minute token limit raises
        :class:`RequestTooLarge` at once. An interrupted wait (Ctrl-C) gives the reservation back.
        """
        start = self._clock()
        deadline = math.inf if timeout is None else start + timeout
        with self._lock:
            state = self._state(key, start)
            while not state.learned and state.probe is not None:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise RateLimitTimeout(key[1], retry_after=1.0, max_wait=timeout or 0.0)
                self._probe_done.wait(None if remaining == math.inf else remaining)
            reservation = self._reserve_locked(key, state, tokens)
        try:
            self._wait(reservation, deadline, timeout)
        except BaseException:
            self.cancel(reservation)
            raise
        return reservation

    def _reserve_locked(self, key: LimitKey, state: _KeyState, tokens: int) -> Reservation:
        now = self._clock()
        limit = state.tokens.limit
        if limit is not None and tokens > limit:
            raise RequestTooLarge(key[1], tokens, limit)
        ready_at = max(state.requests.earliest(1, now), state.tokens.earliest(tokens, now), state.paused_until)
        prev_stamps = (state.requests.stamp, state.tokens.stamp)
        state.requests.take_at(1, ready_at)
        state.tokens.take_at(tokens, ready_at)
        marks = (state.requests.booked, state.tokens.booked)
        reservation = Reservation(key, tokens, ready_at, now, marks, prev_stamps)
        if not state.learned:
            state.probe = reservation
            reservation.probe = True
        return reservation

    def _wait(self, reservation: Reservation, deadline: float, timeout: Optional[float]) -> None:
        state = self._keys[reservation.key]
        while True:
            # A 429 elsewhere may have paused the key since we booked: look again after each sleep.
            target = max(reservation.ready_at, state.paused_until)
            delay = target - self._clock()
            if delay <= 0:
                return
            if target > deadline:
                raise RateLimitTimeout(reservation.key[1], retry_after=delay, max_wait=timeout or 0.0)
            self._sleep(delay)

    # -- ending a reservation --------------------------------------------------------------------

    def cancel(self, reservation: Reservation) -> None:
        """Give back a reservation that was never sent. Calling it twice does nothing."""
        with self._lock:
            if reservation.done:
                return
            reservation.done = True
            state = self._keys[reservation.key]
            state.requests.unbook(1.0, reservation.marks[0], reservation.prev_stamps[0])
            state.tokens.unbook(float(reservation.tokens), reservation.marks[1], reservation.prev_stamps[1])
            self._end_probe(state, reservation, learned=False)

    def settle(self, reservation: Reservation, used_tokens: Optional[int]) -> None:
        """End a sent request: charge its real token usage instead of the estimate.

        ``used_tokens`` ``None`` keeps the estimate (the usage is unknown, e.g. after a timeout); ``0``
        refunds every token (the server refused the request). Calling it twice does nothing.
        """
        with self._lock:
            if reservation.done:
                return
            reservation.done = True
            state = self._keys[reservation.key]
            if used_tokens is not None and state.tokens.active:
                state.tokens.move_to(self._clock())
                extra = used_tokens - reservation.tokens
                if extra > 0:
                    state.tokens.take_at(extra, state.tokens.stamp)
                else:
                    state.tokens.give_back(-extra)
            self._end_probe(state, reservation, learned=False)

    def _end_probe(self, state: _KeyState, reservation: Reservation, *, learned: bool) -> None:
        if state.probe is reservation:
            state.probe = None
            state.learned = state.learned or learned
            self._probe_done.notify_all()

    # -- learning from the server ----------------------------------------------------------------

    def observe(self, reservation: Reservation, headers: RateLimitHeaders) -> None:
        """Update the limit of ``reservation``'s key from the headers of the response to it.

        Learns the per-minute limits (the lower of the configured and the server's wins), the burst the
        server allows (at least ``remaining`` + this request's cost), and lowers or raises the level to
        what the server says remains, minus what we booked after this request was booked.
        """
        with self._lock:
            state = self._keys[reservation.key]
            now = self._clock()
            pairs = (
                (state.requests, headers.limit_requests, headers.remaining_requests, 1.0, reservation.marks[0]),
                (
                    state.tokens,
                    headers.limit_tokens,
                    headers.remaining_tokens,
                    float(reservation.tokens),
                    reservation.marks[1],
                ),
            )
            for bucket, limit, remaining, cost, mark in pairs:
                bucket.move_to(now)
                if limit is not None and limit != bucket.limit:
                    was_active = bucket.active
                    bucket.set_limit(min(limit, bucket.configured or math.inf), self._headroom)
                    if not was_active:
                        bucket.capacity = bucket.level = min(
                            bucket.ceiling, max(bucket.rate * self._initial_burst, 1.0)
                        )
                if remaining is None or not bucket.active:
                    continue
                margin = bucket.rate * _JITTER_SECONDS
                bucket.capacity = min(bucket.ceiling, max(bucket.capacity, remaining + cost - margin))
                # What the server had left, less what we booked since, refilled up to our last booking.
                seen = remaining - margin - (bucket.booked - mark) + (bucket.stamp - now) * bucket.rate
                bucket.level = min(bucket.capacity, seen)
            # Any answer from the server ends the probe: with headers the limits are now known, and a
            # server that sends none will not send them later either.
            self._end_probe(state, reservation, learned=True)

    def pause(self, reservation: Reservation, seconds: float, kind: str = "") -> None:
        """The server refused ``reservation`` with a rate-limit 429: every caller of its key waits
        ``seconds``, and the bucket named by ``kind`` (``"requests"``/``"tokens"``, else both) allows
        itself half the burst from now on. Several 429s from one burst shrink it only once."""
        with self._lock:
            state = self._keys[reservation.key]
            now = self._clock()
            state.paused_until = max(state.paused_until, now + seconds)
            if reservation.booked_at <= state.shrunk_at:
                return
            state.shrunk_at = now
            buckets = {"requests": (state.requests,), "tokens": (state.tokens,)}.get(
                kind, (state.requests, state.tokens)
            )
            for bucket in buckets:
                if not bucket.active:
                    continue
                bucket.move_to(now)
                floor = max(bucket.rate * _MIN_BURST_SECONDS, 1.0)
                bucket.ceiling = max(floor, bucket.capacity / 2)
                bucket.capacity = min(bucket.capacity, bucket.ceiling)
                bucket.level = min(bucket.level, 0.0)

    # -- looking at it ---------------------------------------------------------------------------

    def snapshot(self) -> Dict[str, Dict[str, Optional[float]]]:
        """Per-model state for debugging: limits, rates per second, burst, level and pause."""
        with self._lock:
            now = self._clock()
            out: Dict[str, Dict[str, Optional[float]]] = {}
            for (_, model), state in self._keys.items():
                entry: Dict[str, Optional[float]] = {"paused_for": max(0.0, state.paused_until - now)}
                for name, bucket in (("requests", state.requests), ("tokens", state.tokens)):
                    entry[f"{name}_limit"] = bucket.limit
                    entry[f"{name}_burst"] = bucket.capacity if bucket.active else None
                    # The level now; while calls are queued, what is left after the last booked one.
                    entry[f"{name}_level"] = bucket.level_at(now) if bucket.active else None
                out[model] = entry
            return out

    def __repr__(self) -> str:
        parts = []
        for model, entry in self.snapshot().items():
            parts.append(
                f"{model}: rpm={entry['requests_limit']} level={_fmt(entry['requests_level'])}, "
                f"tpm={entry['tokens_limit']} level={_fmt(entry['tokens_level'])}"
                + (f", paused {entry['paused_for']:.2f}s" if entry["paused_for"] else "")
            )
        default = f"rpm={self._default.rpm} tpm={self._default.tpm}"
        return f"<RateLimiter {default} [{'; '.join(parts)}]>"


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"
