"""The in-process rate limiter: requests and tokens per minute, per (account, model), shared by threads.

Each limit is a bucket that holds up to ``capacity`` units and refills continuously at ``limit / 60``
units per second. Callers of one key form a first-come-first-served line. Only the caller at the head
waits on the clock: it computes, under one short lock, the moment both buckets hold its cost, waits
once until then, and takes one request and its tokens from both buckets together at the moment it
goes. The others wait on their own event until the head hands over, so nobody polls and one call
wakes one thread. The head's wait ends early when capacity comes back sooner: a call settled against
its real usage refunds what its estimate over-booked, and in a TPM-bound workload those refunds are
most of the budget, so the head must see them at once rather than at a time booked in advance.

The limiter also learns from what the server says (:meth:`RateLimiter.observe`): the limits themselves
when none were given, the burst the server allows, and what remains when other processes share the
limit. After a rate-limit 429 it pauses every caller of that limit and allows itself a smaller burst.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, Mapping, Optional, Tuple

from .errors import Cancelled, RateLimitTimeout, RequestTooLarge
from .headers import RateLimitHeaders

__all__ = ["LimitKey", "Limits", "RateLimiter", "Reservation"]

#: ``(account, model)``: ``account`` is a hash of the API key and base URL, never the key itself.
LimitKey = Tuple[str, str]

# Seconds of budget kept back from the server's burst, to absorb jitter between our sends and its clock.
_JITTER_SECONDS = 0.15
# With a cancel event, waits are cut into slices this long (seconds) to notice it.
_CANCEL_CHECK_SECONDS = 0.25
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
    """One budget: ``level`` units were available at ``stamp``; refills at ``rate`` per second up to
    ``capacity``. ``level`` goes negative only after a call larger than the burst or a usage above
    its estimate: debt that the next caller waits out."""

    __slots__ = ("booked", "capacity", "ceiling", "configured", "hold", "level", "limit", "rate", "stamp")

    def __init__(self, configured: Optional[float], headroom: float, initial_burst: float, now: float) -> None:
        self.configured = configured
        self.limit: Optional[float] = None
        self.rate = 0.0  # units per second
        self.capacity = 0.0
        self.ceiling = math.inf  # the most burst we allow ourselves; only shrinks, after 429s
        self.level = 0.0
        self.stamp = now
        self.booked = 0.0  # running total of units taken, to reconcile with the server's `remaining`
        # The cost of a call bigger than the burst that is waiting at the head: while it waits, the level
        # may fill up to it, so it goes once its whole cost has refilled (not a burst's worth).
        self.hold = 0.0
        if configured is not None:
            self.set_limit(configured, headroom)
            self.start(initial_burst)

    @property
    def active(self) -> bool:
        return self.limit is not None

    def set_limit(self, limit: float, headroom: float) -> None:
        self.limit = limit
        self.rate = limit / 60.0 * (1.0 - headroom)
        self.ceiling = min(self.ceiling, limit)

    def learn(self, limit: float, headroom: float, initial_burst: float) -> None:
        """Take the server's ``limit`` (the configured one still wins if lower); start if it was off."""
        if limit != self.limit:
            was_active = self.active
            self.set_limit(min(limit, self.configured or math.inf), headroom)
            if not was_active:
                self.start(initial_burst)

    def start(self, initial_burst: float) -> None:
        burst = self.rate * max(initial_burst - _JITTER_SECONDS, initial_burst / 2)
        self.capacity = self.level = min(self.ceiling, max(burst, 1.0))

    @property
    def room(self) -> float:
        """How high the level may fill: the burst, or the cost of the big call waiting for it."""
        return max(self.capacity, self.hold)

    def advance(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.room, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def earliest(self, units: float, now: float) -> float:
        """When ``units`` may be taken (a full bucket, if more than it holds). Call :meth:`advance` first."""
        if not self.active:
            return now
        missing = min(units, self.room) - self.level
        return now if missing <= 0 else now + missing / self.rate

    def take(self, units: float) -> None:
        if self.active:
            self.level -= units
            self.booked += units

    def give_back(self, units: float) -> None:
        if self.active:
            self.level = min(self.room, self.level + units)


class _Ticket:
    """A caller waiting in line behind the head; the head sets ``turn`` when it is this caller's go."""

    __slots__ = ("turn",)

    def __init__(self) -> None:
        self.turn = threading.Event()


class _KeyState:
    __slots__ = (
        "answered",
        "head",
        "learned",
        "line",
        "paused_until",
        "probe",
        "requests",
        "shrunk_at",
        "tokens",
        "wakeup",
    )

    def __init__(self, limits: Limits, headroom: float, initial_burst: float, now: float, lock: threading.Lock) -> None:
        self.requests = _Bucket(limits.rpm, headroom, initial_burst, now)
        self.tokens = _Bucket(limits.tpm, headroom, initial_burst, now)
        # With no limit given at all, one request (the probe) goes first to learn them from headers,
        # so that 64 threads starting at once don't all hit an unknown limit.
        self.learned = limits.rpm is not None or limits.tpm is not None
        self.probe: Optional[Reservation] = None
        self.answered = False  # the server has answered a request of this key (and so shown its limits)
        self.paused_until = -math.inf
        self.shrunk_at = -math.inf
        self.head = False  # someone is at the head of the line
        self.line: Deque[_Ticket] = deque()
        self.wakeup = threading.Condition(lock)  # the head waits here; refunds and answers notify it


class Reservation:
    """One request and ``tokens`` tokens taken from a key's budget at ``ready_at`` (monotonic seconds).

    Obtained from :meth:`RateLimiter.acquire`; end it with :meth:`RateLimiter.settle` once the request
    was sent, or :meth:`RateLimiter.cancel` if it never was.
    """

    __slots__ = ("done", "key", "marks", "probe", "ready_at", "refused", "tokens")

    def __init__(self, key: LimitKey, tokens: int, ready_at: float, marks: Tuple[float, float]) -> None:
        self.key = key
        self.tokens = tokens
        self.ready_at = ready_at
        self.marks = marks  # each bucket's `booked` total right after this reservation
        self.probe = False
        self.done = False
        self.refused = False  # the server answered with an error: it took none of our tokens

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
    - ``clock``: monotonic seconds. ``sleep``: for tests with a fake clock, how the head waits; by
      default it waits on a condition that refunds and pauses can cut short.
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
        sleep: Optional[Callable[[float], None]] = None,
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
        self._keys: Dict[LimitKey, _KeyState] = {}

    def limits_for(self, model: str) -> Limits:
        """The configured limits of ``model`` (its override, else the defaults)."""
        return self._limits.get(model, self._default)

    def _state(self, key: LimitKey, now: float) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            limits = self.limits_for(key[1])
            state = self._keys[key] = _KeyState(limits, self._headroom, self._initial_burst, now, self._lock)
        return state

    # -- taking capacity -------------------------------------------------------------------------

    def acquire(
        self,
        key: LimitKey,
        tokens: int,
        *,
        timeout: Optional[float] = None,
        cancel: Optional[threading.Event] = None,
    ) -> Reservation:
        """Wait for one request and ``tokens`` tokens of ``key``'s budget, and take them.

        Callers are served first come, first served. ``timeout`` (seconds): the longest this call may
        wait; ``None`` waits as long as needed. When capacity is known to be further away than that,
        :class:`RateLimitTimeout` is raised at once rather than after waiting. A cost above the whole
        per-minute token limit raises :class:`RequestTooLarge` at once. ``cancel``: when this event is
        set, the wait ends within a quarter of a second with :class:`Cancelled`. A wait that ends in an
        exception (a timeout, a cancel, Ctrl-C) takes nothing.
        """
        if isinstance(tokens, bool) or not isinstance(tokens, int):
            raise TypeError(f"tokens must be an int, got {tokens!r}")
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        start = self._clock()
        deadline = math.inf if timeout is None else start + timeout
        ticket: Optional[_Ticket] = None
        with self._lock:
            state = self._state(key, start)
            limit = state.tokens.limit
            if limit is not None and tokens > limit:
                raise RequestTooLarge(key[1], tokens, limit)
            if state.head or state.line:
                soonest = self._projected_turn(key, state, start)
                if soonest > deadline:
                    raise RateLimitTimeout(key[1], retry_after=soonest - start, max_wait=timeout or 0.0)
                ticket = _Ticket()
                state.line.append(ticket)
            else:
                state.head = True
        try:
            if ticket is not None:
                while not ticket.turn.wait(_slice(deadline - self._clock(), cancel)):
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"wait for model {key[1]!r} cancelled")
                    now = self._clock()
                    if now >= deadline:
                        with self._lock:  # when the line would have let this caller go, by projection
                            soonest = self._projected_turn(key, state, now)
                        retry_after = max(soonest - now, _CANCEL_CHECK_SECONDS)
                        raise RateLimitTimeout(key[1], retry_after=retry_after, max_wait=timeout or 0.0)
            with self._lock:
                try:
                    return self._wait_and_take(key, state, tokens, deadline, timeout, cancel)
                finally:
                    state.tokens.hold = 0.0
        finally:
            # However this ends (taken, timed out, interrupted): leave the line, or pass the head role on.
            with self._lock:
                if ticket is not None and ticket in state.line:
                    state.line.remove(ticket)  # never became head
                elif state.line:
                    state.line.popleft().turn.set()  # `head` stays True: the next caller holds it
                else:
                    state.head = False

    def _projected_turn(self, key: LimitKey, state: _KeyState, now: float) -> float:
        """When a caller joining the line now could go, if every caller ahead takes one request: a
        projection (callers ahead may give up), used to refuse at once a wait that ``timeout`` forbids."""
        bucket = state.requests
        if not bucket.active:
            return state.paused_until
        bucket.advance(now)
        ahead = len(state.line) + 1  # the line plus the head
        return max(now + max(0.0, ahead + 1 - bucket.level) / bucket.rate, state.paused_until)

    def _wait_and_take(
        self,
        key: LimitKey,
        state: _KeyState,
        tokens: int,
        deadline: float,
        timeout: Optional[float],
        cancel: Optional[threading.Event],
    ) -> Reservation:
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"wait for model {key[1]!r} cancelled")
            now = self._clock()
            # A call bigger than the burst waits for its whole cost, not for a full (smaller) bucket.
            state.tokens.hold = tokens if tokens > state.tokens.capacity else 0.0
            if not state.learned and state.probe is not None:
                go_at = deadline  # until the probe's answer arrives; its end wakes us
                if now >= deadline:
                    raise RateLimitTimeout(key[1], retry_after=1.0, max_wait=timeout or 0.0)
            else:
                state.requests.advance(now)
                state.tokens.advance(now)
                go_at = max(state.requests.earliest(1, now), state.tokens.earliest(tokens, now), state.paused_until)
                if go_at <= now:
                    state.requests.take(1)
                    state.tokens.take(tokens)
                    reservation = Reservation(key, tokens, now, (state.requests.booked, state.tokens.booked))
                    if not state.learned:
                        state.probe = reservation
                        reservation.probe = True
                    return reservation
                if go_at > deadline:
                    raise RateLimitTimeout(key[1], retry_after=go_at - now, max_wait=timeout or 0.0)
            self._wait_locked(state, go_at - now if cancel is None else min(go_at - now, _CANCEL_CHECK_SECONDS))

    def _wait_locked(self, state: _KeyState, seconds: float) -> None:
        """Wait (the lock held on entry and exit) up to ``seconds``, or less if notified."""
        if self._sleep is None:
            state.wakeup.wait(None if seconds == math.inf else seconds)
            return
        self._lock.release()
        try:
            self._sleep(seconds)
        finally:
            self._lock.acquire()

    # -- ending a reservation --------------------------------------------------------------------

    def cancel(self, reservation: Reservation) -> None:
        """Give back a reservation that was never sent. Calling it twice does nothing."""
        with self._lock:
            if reservation.done:
                return
            reservation.done = True
            state = self._keys[reservation.key]
            now = self._clock()
            for bucket, units in ((state.requests, 1.0), (state.tokens, float(reservation.tokens))):
                bucket.advance(now)
                bucket.give_back(units)
            self._end_probe(state, reservation, learned=False)
            state.wakeup.notify()

    def settle(self, reservation: Reservation, used_tokens: Optional[int]) -> None:
        """End a sent request: charge its real token usage instead of the estimate.

        ``used_tokens`` ``None`` keeps the estimate (the usage is unknown, e.g. after a timeout); ``0``
        refunds every token (the server refused the request). Calling it twice does nothing.
        """
        if isinstance(used_tokens, bool) or not isinstance(used_tokens, (int, type(None))) or (used_tokens or 0) < 0:
            used_tokens = None  # not a count we can use: keep the estimate
        with self._lock:
            if reservation.done:
                return
            reservation.done = True
            state = self._keys[reservation.key]
            # A refusal whose headers were observed already left our tokens out of the level.
            if used_tokens is not None and state.tokens.active and not reservation.refused:
                state.tokens.advance(self._clock())
                extra = used_tokens - reservation.tokens
                if extra > 0:
                    state.tokens.take(extra)
                else:
                    state.tokens.give_back(-extra)
                    state.wakeup.notify()
            self._end_probe(state, reservation, learned=False)

    def _end_probe(self, state: _KeyState, reservation: Reservation, *, learned: bool) -> None:
        if state.probe is reservation:
            state.probe = None
            state.learned = state.learned or learned
            state.wakeup.notify()

    # -- learning from the server ----------------------------------------------------------------

    def observe(self, reservation: Reservation, headers: RateLimitHeaders, status: int = 200) -> None:
        """Update the limit of ``reservation``'s key from the headers of the response to it.

        Learns the per-minute limits (the lower of the configured and the server's wins) and the burst
        the server allows (at least ``remaining`` + this request's cost). The level only goes *down* to
        what the server says remains (plus its refill since this request, less what we took after it
        and a jitter margin): other processes sharing the limit show up there. It goes up only by
        burst newly discovered. ``status``: the response's HTTP status; a refusal took no tokens.
        """
        with self._lock:
            state = self._keys[reservation.key]
            state.answered = True
            now = self._clock()
            accepted = 200 <= status < 300
            reservation.refused = not accepted
            elapsed = max(0.0, now - reservation.ready_at)
            if not accepted:  # the server took none of our tokens (`settle` will not refund them again)
                state.tokens.advance(now)
                state.tokens.give_back(reservation.tokens)
            pairs = (
                (state.requests, headers.limit_requests, headers.remaining_requests, 1.0, reservation.marks[0]),
                (
                    state.tokens,
                    headers.limit_tokens,
                    headers.remaining_tokens,
                    reservation.tokens,
                    reservation.marks[1],
                ),
            )
            for bucket, limit, remaining, cost, mark in pairs:
                bucket.advance(now)
                if limit is not None:
                    bucket.learn(limit, self._headroom, self._initial_burst)
                if remaining is None or not bucket.active:
                    continue
                margin = bucket.rate * _JITTER_SECONDS
                taken = cost if accepted else 0.0
                grown = max(0.0, min(bucket.ceiling, remaining + taken - margin) - bucket.capacity)
                bucket.capacity += grown
                seen = remaining + bucket.rate * elapsed - margin - (bucket.booked - mark)
                bucket.level = min(bucket.level + grown, bucket.room, seen)
            # A success ends the probe: with headers the limits are now known, and a server that sends
            # none will not send them later either. An error without limits lets the next caller probe.
            learned = accepted or headers.limit_requests is not None or headers.limit_tokens is not None
            self._end_probe(state, reservation, learned=learned)
            state.wakeup.notify()

    def pause(self, reservation: Reservation, seconds: float, kind: str = "") -> None:
        """The server refused ``reservation`` with a rate-limit 429: every caller of its key waits
        ``seconds``, and the bucket named by ``kind`` (``"requests"``/``"tokens"``, else both) allows
        itself half the burst from now on. Several 429s from one burst shrink it only once."""
        with self._lock:
            state = self._keys[reservation.key]
            now = self._clock()
            state.paused_until = max(state.paused_until, now + seconds)
            if reservation.ready_at <= state.shrunk_at:
                return
            state.shrunk_at = now
            named = {"requests": (state.requests,), "tokens": (state.tokens,)}
            for bucket in named.get(kind, (state.requests, state.tokens)):
                if not bucket.active:
                    continue
                bucket.advance(now)
                floor = max(bucket.rate * _MIN_BURST_SECONDS, 1.0)
                bucket.ceiling = max(floor, bucket.capacity / 2)
                bucket.capacity = min(bucket.capacity, bucket.ceiling)
                bucket.level = min(bucket.level, 0.0)

    # -- what the bulk helpers plan with ---------------------------------------------------------

    def request_rate(self, key: LimitKey) -> Optional[float]:
        """Requests per second ``key`` may send (``None`` while unknown)."""
        with self._lock:
            bucket = self._state(key, self._clock()).requests
            return bucket.rate if bucket.active else None

    def limits_known(self, key: LimitKey) -> bool:
        """Whether ``key``'s token limit is known or was configured, or the server has answered (and so
        shown whatever limits it has): then :meth:`token_burst` can be planned with."""
        with self._lock:
            state = self._state(key, self._clock())
            return state.tokens.configured is not None or state.answered

    def token_burst(self, key: LimitKey) -> Optional[float]:
        """Most tokens one call of ``key`` may take at once without waiting for a full bucket
        (``None`` while no token limit is known)."""
        with self._lock:
            bucket = self._state(key, self._clock()).tokens
            return bucket.capacity if bucket.active else None

    # -- looking at it ---------------------------------------------------------------------------

    def snapshot(self) -> Dict[str, Dict[str, Optional[float]]]:
        """Per-model state for debugging: limits, burst, level now, callers waiting, pause left."""
        with self._lock:
            now = self._clock()
            out: Dict[str, Dict[str, Optional[float]]] = {}
            for (_, model), state in self._keys.items():
                entry: Dict[str, Optional[float]] = {
                    "paused_for": max(0.0, state.paused_until - now),
                    "waiting": len(state.line) + int(state.head),
                }
                for name, bucket in (("requests", state.requests), ("tokens", state.tokens)):
                    bucket.advance(now)
                    entry[f"{name}_limit"] = bucket.limit
                    entry[f"{name}_burst"] = bucket.capacity if bucket.active else None
                    entry[f"{name}_level"] = bucket.level if bucket.active else None
                out[model] = entry
            return out

    def __repr__(self) -> str:
        parts = []
        for model, entry in self.snapshot().items():
            parts.append(
                f"{model}: rpm={entry['requests_limit']} level={_fmt(entry['requests_level'])}, "
                f"tpm={entry['tokens_limit']} level={_fmt(entry['tokens_level'])}, waiting={entry['waiting']:.0f}"
                + (f", paused {entry['paused_for']:.2f}s" if entry["paused_for"] else "")
            )
        default = f"rpm={self._default.rpm} tpm={self._default.tpm}"
        return f"<RateLimiter {default} [{'; '.join(parts)}]>"


def _slice(left: float, cancel: Optional[threading.Event]) -> Optional[float]:
    """How long to wait for an event: what is ``left`` (``inf``: no bound), cut short to notice
    ``cancel``; ``None`` means wait with no timeout."""
    if cancel is not None:
        left = min(left, _CANCEL_CHECK_SECONDS)
    return None if left == math.inf else max(0.0, left)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"
