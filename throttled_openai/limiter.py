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
limit. After a rate-limit 429 it pauses every caller of that limit and allows itself a smaller burst,
and learns the limit the 429's message names (:meth:`RateLimiter.learn_from_message`).

Two more things come from the server (``windows.py`` says how they are read):

- A limit in the headers may cover a day or longer. Such a limit is a *budget*: another bucket, as
  big as the limit and refilled over its window, that a call must fit besides the per-minute ones. A
  call that would wait past its allowed wait for a budget raises :class:`BudgetExhausted` at once.
- The server counts a request's tokens its own way (by characters, by JSON bytes). The ratio of its
  count to our estimate (the *cost factor*) scales what each call books, the burst the bulk helpers
  pack for, and the check that a call can ever fit.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Mapping, Optional, Tuple, Union

from .errors import BudgetExhausted, Cancelled, RateLimitTimeout, RequestTooLarge, describe_window
from .headers import LimitMessage, RateLimitHeaders
from .waiting import Steps, TaskWaiter, ThreadWaiter, Wait, Waiter, adrive, drive
from .windows import MINUTE, Calibration, Refunds, WindowVote, estimate_window

__all__ = ["LimitKey", "Limits", "RateLimiter", "Reservation"]

#: ``(account, model)``: ``account`` is a hash of the API key and base URL, never the key itself.
LimitKey = Tuple[str, str]

# Seconds of budget kept back from the server's burst, to absorb jitter between our sends and its clock.
_JITTER_SECONDS = 0.15
# With a cancel event, waits are cut into slices this long (seconds) to notice it.
_CANCEL_CHECK_SECONDS = 0.25
# Share of a bucket's burst also kept back from the server's view: with a minute's burst, 0.15 s of
# refill is less than one request, and many requests in flight round that many times.
_MARGIN_SHARE = 0.01
# Smallest burst, in seconds of budget, that repeated 429s may shrink a bucket to.
_MIN_BURST_SECONDS = 0.2
# Returns (refunds, cancels, refusals) a bucket remembers, to tell which came after a response's headers.
_RETURNS_KEPT = 1024
# With ``max_wait=None``, the longest a call waits for a long-window budget (per day) to refill, in
# seconds, before it raises BudgetExhausted: a job should not sit silent for hours.
_MAX_BUDGET_WAIT = 120.0
# Where a limit came from, as shown by snapshot() and repr().
CONFIGURED, HEADERS, MESSAGE, PROVISIONAL = "configured", "headers", "429", "provisional"
# When the headers show only a long-window request limit, the per-minute one is unknown until a 429
# names it. Until then requests go at a provisional rate: this many per minute, doubled every
# _PROVISIONAL_DOUBLING seconds, so that a daily limit read from the headers never turns into a flood.
_PROVISIONAL_RPM = 60.0
_PROVISIONAL_DOUBLING = 5.0
_KINDS = ("requests", "tokens")


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


class _Ledger:
    """A running total with a log of when it grew, to tell how much it grew after a given moment."""

    __slots__ = ("log", "total")

    def __init__(self) -> None:
        self.total = 0.0
        self.log: Deque[Tuple[float, float]] = deque(maxlen=_RETURNS_KEPT)  # (when, total then)

    def add(self, when: float, units: float) -> None:
        self.total += units
        self.log.append((when, self.total))

    def since(self, moment: float) -> float:
        """How much was added after ``moment`` (monotonic seconds), as far as the log reaches back."""
        before: Optional[float] = None
        after: Optional[float] = None
        for stamp, total in reversed(self.log):
            if stamp <= moment:
                before = total
                break
            after = total
        if after is None:
            return 0.0
        if before is None:  # every logged addition came after `moment`: from the log's start, if it has one
            before = 0.0 if len(self.log) < _RETURNS_KEPT else after
        return self.total - before


class _Bucket:
    """One budget: ``level`` units were available at ``stamp``; refills at ``rate`` per second up to
    ``capacity``. ``level`` goes negative only after a call larger than the burst or a usage above
    its estimate: debt that the next caller waits out. ``window``: seconds the limit covers (60 for a
    per-minute limit); ``source``: where the limit came from (configured, headers or a 429)."""

    __slots__ = (
        "booked", "capacity", "ceiling", "configured", "hold", "level", "limit", "rate", "returns", "source",
        "stamp", "window",
    )  # fmt: skip

    def __init__(self, configured: Optional[float], headroom: float, initial_burst: float, now: float) -> None:
        self.configured = configured
        self.limit: Optional[float] = None
        self.window = MINUTE
        self.source: Optional[str] = None
        self.rate = 0.0  # units per second
        self.capacity = 0.0
        self.ceiling = math.inf  # the most burst we allow ourselves; only shrinks, after 429s
        self.level = 0.0
        self.stamp = now
        self.booked = 0.0  # running total of units taken, to reconcile with the server's `remaining`
        self.returns = _Ledger()  # units given back (refunds, cancels, refusals)
        # The cost of a call bigger than the burst that is waiting at the head: while it waits, the level
        # may fill up to it, so it goes once its whole cost has refilled (not a burst's worth).
        self.hold = 0.0
        if configured is not None:
            self.set_limit(configured, headroom)
            self.source = CONFIGURED
            self.start(initial_burst)

    @property
    def active(self) -> bool:
        return self.limit is not None

    def set_limit(self, limit: float, headroom: float, window: float = MINUTE) -> None:
        self.limit = limit
        self.window = window
        self.rate = limit / window * (1.0 - headroom)
        self.ceiling = min(self.ceiling, limit)

    def learn(self, limit: float, headroom: float, initial_burst: float, source: str = HEADERS) -> bool:
        """Take the server's per-minute ``limit`` (the configured one still wins if lower); start if it
        was off. Returns whether the limit went down (or became known)."""
        if limit == self.limit:
            return False
        was_active, before = self.active, self.limit
        if self.configured is not None and self.configured <= limit:
            limit, source = self.configured, CONFIGURED
        self.set_limit(limit, headroom)
        self.source = source
        if not was_active:
            self.start(initial_burst)
        return before is None or limit < before

    def forget(self) -> None:
        """Drop a limit learned from the headers that turned out to cover a longer window."""
        if self.source == HEADERS:
            self.limit, self.source, self.rate = None, None, 0.0
            self.ceiling = math.inf

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
        self.booked += units  # counted even while inactive: observe() compares it with the server's view
        if self.active:
            self.level -= units

    def give_back(self, units: float) -> None:
        """Return ``units`` (call :meth:`advance` first: the return is logged at its time)."""
        if self.active:
            self.level = min(self.room, self.level + units)
            self.returns.add(self.stamp, units)


class _Ticket:
    """A caller waiting in line behind the head; the head sets ``turn`` (the caller's waiter: a thread's
    event or a task's future) when it is this caller's go. ``too_large``: set (with ``turn``) when a
    limit learned meanwhile is below the caller's cost."""

    __slots__ = ("tokens", "too_large", "turn")

    def __init__(self, tokens: int, turn: Waiter) -> None:
        self.tokens = tokens
        self.too_large: Optional[RequestTooLarge] = None
        self.turn = turn


class _KeyState:
    __slots__ = (
        "answered",
        "budgets",
        "calibration",
        "full_at",
        "head",
        "in_flight",
        "judged",
        "learned",
        "line",
        "message_limits",
        "overbooked",
        "paused_until",
        "probe",
        "provisional_at",
        "refunds",
        "requests",
        "shrunk_at",
        "tokens",
        "votes",
        "waiter",
    )

    def __init__(self, limits: Limits, headroom: float, initial_burst: float, now: float) -> None:
        self.requests = _Bucket(limits.rpm, headroom, initial_burst, now)
        self.tokens = _Bucket(limits.tpm, headroom, initial_burst, now)
        # Long-window limits (per day or longer) by kind, learned from headers or 429 messages.
        self.budgets: Dict[str, _Bucket] = {}
        self.votes = {kind: WindowVote() for kind in _KINDS}
        self.message_limits: Dict[str, float] = {}  # per-minute limits named by 429 messages
        self.provisional_at = now  # when the provisional per-minute request limit last doubled
        self.calibration = Calibration()
        self.refunds = Refunds()  # whether the server refunds what an estimate over-booked
        self.overbooked = _Ledger()  # what settlements found over-booked, refunded by the server or not
        self.in_flight = 0  # reservations taken and not yet ended
        self.full_at = now  # when the server's token bucket is full again, by the last reset it sent
        # With no limit given at all, one request (the probe) goes first to learn them from headers,
        # so that 64 threads starting at once don't all hit an unknown limit.
        self.learned = limits.rpm is not None or limits.tpm is not None
        self.probe: Optional[Reservation] = None
        self.judged: Tuple[Optional[float], ...] = ()  # the token limits the line was last checked against
        self.answered = False  # the server has answered a request of this key (and so shown its limits)
        self.paused_until = -math.inf
        self.shrunk_at = -math.inf
        self.head = False  # someone is at the head of the line
        self.line: Deque[_Ticket] = deque()
        self.waiter: Optional[Waiter] = None  # the head's, while it waits: refunds and answers wake it

    def minute(self, kind: str) -> _Bucket:
        return self.requests if kind == "requests" else self.tokens

    def buckets(self, kind: str) -> Tuple[_Bucket, ...]:
        """The per-minute bucket of ``kind`` and its long-window budget, if any."""
        budget = self.budgets.get(kind)
        return (self.minute(kind),) if budget is None else (self.minute(kind), budget)

    def too_large(self, model: str, tokens: int) -> Optional[RequestTooLarge]:
        """The error for a call of ``tokens`` that can never fit a known token limit, else ``None``."""
        for bucket in self.buckets("tokens"):
            if bucket.limit is not None and tokens > bucket.limit:
                return RequestTooLarge(model, tokens, bucket.limit, window=bucket.window)
        return None


class Reservation:
    """One request and ``tokens`` tokens taken from a key's budget at ``ready_at`` (monotonic seconds).

    ``tokens`` is in the server's units (the estimate times the key's cost factor); ``estimate`` is the
    caller's own count. Obtained from :meth:`RateLimiter.acquire`; end it with
    :meth:`RateLimiter.settle` once the request was sent, or :meth:`RateLimiter.cancel` if it never was.
    """

    __slots__ = (
        "done", "estimate", "key", "marks", "observed", "probe", "quiet", "ready_at", "refused", "sent_at", "tokens",
    )  # fmt: skip

    def __init__(self, key: LimitKey, tokens: int, ready_at: float, marks: Tuple[float, float]) -> None:
        self.key = key
        self.tokens = tokens
        self.estimate = tokens
        self.ready_at = ready_at
        self.sent_at = ready_at  # when its request left, if told (RateLimiter.sent)
        self.marks = marks  # each bucket's `booked` total right after this reservation
        self.probe = False
        self.quiet = False  # sent alone into a full bucket: its headers show its own cost
        self.done = False
        self.observed = False  # the server's headers for it were seen
        self.refused = False  # the server answered with an error: it took none of our tokens

    def __repr__(self) -> str:
        return f"<Reservation model={self.key[1]!r} tokens={self.tokens} ready_at={self.ready_at:.3f}>"


class RateLimiter:
    """Thread-safe RPM + TPM limiter shared by every client and thread that holds it.

    - ``rpm`` / ``tpm``: per-minute defaults for every model; ``limits``: per-model overrides
      (``{"gpt-4o": Limits(rpm=500, tpm=30_000)}``); what an override leaves ``None`` keeps the default
      (``Limits(rpm=500)`` with ``tpm=30_000`` given is 500 RPM and 30,000 TPM). A limit ``None`` in
      both is learned from the server's headers. Limits are per minute; the server's own (lower)
      limit wins once it is known.
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
            # An override names what differs: the defaults it leaves out still hold.
            self._limits[model] = Limits(
                rpm=self._default.rpm if model_limits.rpm is None else model_limits.rpm,
                tpm=self._default.tpm if model_limits.tpm is None else model_limits.tpm,
            )
        for name, value in (("headroom", headroom), ("initial_burst", initial_burst)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not 0 <= headroom < 1:
            raise ValueError(f"headroom must be a fraction in [0, 1), got {headroom!r}")
        if not (math.isfinite(initial_burst) and initial_burst > 0):
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
            state = self._keys[key] = _KeyState(limits, self._headroom, self._initial_burst, now)
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

        ``tokens`` is the caller's estimate; what is booked is that times the key's cost factor (the
        server's count of a request against ours, learned from its headers). Callers are served first
        come, first served. ``timeout`` (seconds): the longest this call may wait; ``None`` waits as long
        as needed, except for a long-window budget (per day): that is waited for up to two minutes, then
        :class:`BudgetExhausted` is raised. When capacity is known to be further away than allowed,
        :class:`RateLimitTimeout` (or :class:`BudgetExhausted`) is raised at once rather than after
        waiting. A cost above a whole token limit raises :class:`RequestTooLarge` at once, also while
        waiting in line when the limit is learned only then. ``cancel``: when this event is set, the
        wait ends within a quarter of a second with :class:`Cancelled`. A wait that ends in an exception
        (a timeout, a cancel, Ctrl-C) takes nothing.
        """
        return drive(self._acquiring(key, tokens, timeout, cancel, ThreadWaiter()))

    async def aacquire(
        self,
        key: LimitKey,
        tokens: int,
        *,
        timeout: Optional[float] = None,
        cancel: Optional[threading.Event] = None,
    ) -> Reservation:
        """:meth:`acquire` for a coroutine: the same line (threads and tasks of any loop share it),
        waited in without blocking the event loop. Cancelling the task (``task.cancel()``,
        ``asyncio.wait_for``) leaves the line at once and takes nothing; the next caller goes. ``cancel``
        as for :meth:`acquire` (an event another thread or task may set, looked at every quarter second).
        A task must not be left waiting when its event loop closes: ``asyncio.run`` cancels it first; a
        loop closed under it is noticed when the line moves, and its place passes on."""
        return await adrive(self._acquiring(key, tokens, timeout, cancel, TaskWaiter()))

    def _acquiring(
        self, key: LimitKey, tokens: int, timeout: Optional[float], cancel: Optional[threading.Event], waiter: Waiter
    ) -> Steps[Reservation]:
        """:meth:`acquire` as steps (see ``waiting.py``): join the line, wait for the turn, take at the head."""
        if isinstance(tokens, bool) or not isinstance(tokens, int):
            raise TypeError(f"tokens must be an int, got {tokens!r}")
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        start = self._clock()
        deadline = math.inf if timeout is None else start + timeout
        ticket: Optional[_Ticket] = None
        with self._lock:
            state = self._state(key, start)
            charge = state.calibration.charge(tokens)
            too_large = state.too_large(key[1], charge)
            if too_large is not None:
                raise too_large
            if state.waiter is not None and state.waiter.dead():  # a head whose event loop was closed
                self._depose(state, state.waiter)
            if state.head or state.line:
                soonest = self._projected_turn(key, state, start)
                if soonest > deadline:
                    raise RateLimitTimeout(key[1], retry_after=soonest - start, max_wait=timeout or 0.0)
                ticket = _Ticket(charge, waiter)
                state.line.append(ticket)
            else:
                state.head = True
        try:
            if ticket is not None:
                while not (yield Wait(waiter, _slice(deadline - self._clock(), cancel))):
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"wait for model {key[1]!r} cancelled")
                    now = self._clock()
                    if now >= deadline:
                        with self._lock:  # when the line would have let this caller go, by projection
                            soonest = self._projected_turn(key, state, now)
                        retry_after = max(soonest - now, _CANCEL_CHECK_SECONDS)
                        raise RateLimitTimeout(key[1], retry_after=retry_after, max_wait=timeout or 0.0)
                if ticket.too_large is not None:  # taken out of the line by a limit learned meanwhile
                    raise ticket.too_large
            with self._lock:
                # The line may have waited long for that turn, and the factor moved: count again.
                charge = state.calibration.charge(tokens)
            try:
                reservation = yield from self._taking(key, state, charge, deadline, timeout, cancel, waiter)
            finally:
                with self._lock:
                    if not waiter.deposed:
                        state.tokens.hold = 0.0
                    if state.waiter is waiter:
                        state.waiter = None
            with self._lock:
                reservation.estimate = tokens
                reservation.quiet = state.in_flight == 0 and reservation.ready_at >= state.full_at
                state.in_flight += 1
                return reservation
        finally:
            # However this ends (taken, timed out, interrupted, cancelled): leave the line, or pass the
            # head role on.
            with self._lock:
                if ticket is not None and ticket in state.line:
                    state.line.remove(ticket)  # never became head
                elif ticket is not None and ticket.too_large is not None:
                    pass  # taken out of the line as too large: never became head
                elif waiter.deposed:
                    pass  # given up on (its loop was closed): its turn went on already
                else:
                    self._pass_head(state)

    @staticmethod
    def _pass_head(state: _KeyState) -> None:
        """Give the head role to the next caller in line that can still wake (``head`` stays True), or
        free it. A task whose event loop was closed meanwhile can never take its turn: it is skipped."""
        while state.line:
            turn = state.line.popleft().turn
            if turn.set():
                return
            turn.deposed = True
        state.head = False

    def _depose(self, state: _KeyState, waiter: Waiter) -> None:
        """Give up on the head ``waiter``, whose event loop was closed under it: pass the head on."""
        waiter.deposed = True
        state.waiter = None
        self._pass_head(state)

    def _projected_turn(self, key: LimitKey, state: _KeyState, now: float) -> float:
        """When a caller joining the line now could go, if every caller ahead takes one request: a
        projection (callers ahead may give up), used to refuse at once a wait that ``timeout`` forbids."""
        bucket = state.requests
        if not bucket.active:
            return state.paused_until
        bucket.advance(now)
        ahead = len(state.line) + 1  # the line plus the head
        return max(now + max(0.0, ahead + 1 - bucket.level) / bucket.rate, state.paused_until)

    def _taking(
        self,
        key: LimitKey,
        state: _KeyState,
        tokens: int,
        deadline: float,
        timeout: Optional[float],
        cancel: Optional[threading.Event],
        waiter: Waiter,
    ) -> Steps[Reservation]:
        """The head's part: wait until both buckets hold the call, then take. Woken early by refunds,
        answers and pauses (:meth:`_wake`), to count again."""
        while True:
            with self._lock:
                self._watch(state, waiter)
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"wait for model {key[1]!r} cancelled")
                taken = self._try_take(key, state, tokens, deadline, timeout)
                if isinstance(taken, Reservation):
                    return taken
                wait = taken - self._clock()
            yield Wait(waiter, wait if cancel is None else min(wait, _CANCEL_CHECK_SECONDS), self._sleep)

    @staticmethod
    def _watch(state: _KeyState, waiter: Waiter) -> None:
        """Make ``waiter`` the one woken when ``state`` changes, from now on (under the lock, before
        looking at the state: a change after the look wakes it)."""
        state.waiter = waiter
        waiter.clear()

    def _try_take(
        self, key: LimitKey, state: _KeyState, tokens: int, deadline: float, timeout: Optional[float]
    ) -> Union[Reservation, float]:
        """Take one request and ``tokens`` now if both buckets (and the budgets) hold them, else return
        when to look again (``math.inf``: only when woken). Raises when that is past ``deadline``, or
        when a limit learned meanwhile can never hold the call. Called under the lock, by the head."""
        too_large = state.too_large(key[1], tokens)
        if too_large is not None:
            raise too_large
        now = self._clock()
        # A call bigger than the burst waits for its whole cost, not for a full (smaller) bucket.
        state.tokens.hold = tokens if tokens > state.tokens.capacity else 0.0
        if not state.learned and state.probe is not None:
            if now >= deadline:
                raise RateLimitTimeout(key[1], retry_after=1.0, max_wait=timeout or 0.0)
            return deadline  # until the probe's answer arrives; its end wakes us
        state.requests.advance(now)
        state.tokens.advance(now)
        go_at = max(
            state.requests.earliest(1, now),
            state.tokens.earliest(tokens, now),
            state.paused_until,
            self._budgets_ready(key, state, tokens, now, deadline, timeout),
        )
        if go_at > now:
            if go_at > deadline:
                raise RateLimitTimeout(key[1], retry_after=go_at - now, max_wait=timeout or 0.0)
            return go_at
        for kind, units in (("requests", 1), ("tokens", tokens)):
            for bucket in state.buckets(kind):
                bucket.take(units)
        reservation = Reservation(key, tokens, now, (state.requests.booked, state.tokens.booked))
        if not state.learned:
            state.probe = reservation
            reservation.probe = True
        return reservation

    @staticmethod
    def _budgets_ready(
        key: LimitKey, state: _KeyState, tokens: int, now: float, deadline: float, timeout: Optional[float]
    ) -> float:
        """When the long-window budgets hold this call (``now`` if there are none); raises
        :class:`BudgetExhausted` when that is past the allowed wait (two minutes when ``timeout`` is
        ``None``). Called under the lock."""
        bound = min(deadline, now + _MAX_BUDGET_WAIT) if timeout is None else deadline
        ready = now
        for kind, units in (("requests", 1), ("tokens", tokens)):
            budget = state.budgets.get(kind)
            if budget is None:
                continue
            budget.advance(now)
            at = budget.earliest(units, now)
            if at > bound:
                raise BudgetExhausted(
                    key[1], kind, budget.limit or 0.0, budget.window, budget.source or HEADERS,
                    retry_after=at - now, max_wait=_MAX_BUDGET_WAIT if timeout is None else timeout,
                )  # fmt: skip
            ready = max(ready, at)
        return ready

    @staticmethod
    def _ended(state: _KeyState, reservation: Reservation, now: float, sent: bool) -> None:
        """Bookkeeping of a reservation's end shared by both limiters. Called under the lock."""
        reservation.done = True
        state.in_flight -= 1
        if sent and not reservation.observed:  # what it cost the server was never seen
            state.full_at = max(state.full_at, now + MINUTE)

    @staticmethod
    def _settled_extra(state: _KeyState, reservation: Reservation, used_tokens: int, now: float) -> float:
        """Tokens to charge (negative: give back) when a request used ``used_tokens``: all of what it used
        beyond its booking, and of what it over-booked the share the server is seen to refund."""
        extra = used_tokens - reservation.tokens
        if extra >= 0:
            return float(extra)
        state.overbooked.add(now, -extra)
        return extra * state.refunds.share

    @staticmethod
    def _charge_usage(buckets: Tuple[_Bucket, ...], extra: float, now: float) -> None:
        """Charge ``extra`` tokens used beyond a reservation (or give back what it over-booked)."""
        for bucket in buckets:
            if bucket.active:
                bucket.advance(now)
                if extra > 0:
                    bucket.take(extra)
                else:
                    bucket.give_back(-extra)

    def _wake(self, state: _KeyState) -> None:
        """Tell the head of ``state``'s line that something changed (a refund, an answer, a pause): it
        counts again. Called under the lock, from any thread."""
        if state.waiter is not None and not state.waiter.set():
            self._depose(state, state.waiter)

    # -- ending a reservation --------------------------------------------------------------------

    def cancel(self, reservation: Reservation) -> None:
        """Give back a reservation that was never sent. Calling it twice does nothing."""
        with self._lock:
            if reservation.done:
                return
            state = self._keys[reservation.key]
            now = self._clock()
            self._ended(state, reservation, now, sent=False)
            for kind, units in (("requests", 1.0), ("tokens", float(reservation.tokens))):
                for bucket in state.buckets(kind):
                    bucket.advance(now)
                    bucket.give_back(units)
            self._end_probe(state, reservation, learned=False)
            self._wake(state)

    def sent(self, reservation: Reservation) -> None:
        """The request of ``reservation`` leaves now (the client's request hook says so). What the
        server's headers then say remains is reckoned from this moment, not from when it was taken."""
        reservation.sent_at = self._clock()

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
            state = self._keys[reservation.key]
            now = self._clock()
            self._ended(state, reservation, now, sent=True)
            # A refusal whose headers were observed already left our tokens out of the level.
            if used_tokens is not None and not reservation.refused:
                extra = self._settled_extra(state, reservation, used_tokens, now)
                self._charge_usage(state.buckets("tokens"), extra, now)
                if extra < 0:
                    self._wake(state)
            self._end_probe(state, reservation, learned=False)

    def _end_probe(self, state: _KeyState, reservation: Reservation, *, learned: bool) -> None:
        if state.probe is reservation:
            state.probe = None
            state.learned = state.learned or learned
            self._wake(state)

    # -- learning from the server ----------------------------------------------------------------

    def observe(self, reservation: Reservation, headers: RateLimitHeaders, status: int = 200) -> None:
        """Update the limit of ``reservation``'s key from the headers of the response to it.

        Learns the per-minute limits (the lower of the configured and the server's wins) and the burst
        the server allows (at least ``remaining`` + this request's cost). The level only goes *down* to
        what the server says remains (plus its refill since this request, less what we took after it
        and a jitter margin): other processes sharing the limit show up there. It goes up only by
        burst newly discovered. A limit whose reset shows a window well above a minute becomes a
        budget instead, and a request counted alone calibrates the cost factor (``windows.py``).
        ``status``: the response's HTTP status; a refusal took no tokens.
        """
        with self._lock:
            state = self._keys[reservation.key]
            state.answered = True
            now = self._clock()
            accepted = 200 <= status < 300
            reservation.refused = not accepted
            if not accepted:  # the server took none of our tokens (`settle` will not refund them again)
                for bucket in state.buckets("tokens"):
                    bucket.advance(now)
                    bucket.give_back(reservation.tokens)
            headers = self._read_windows(state, reservation, headers, accepted, now)
            # The server counted it after it was sent: what refilled since is reckoned from then. A request
            # that left late (a busy event loop, say) would otherwise be credited refill the server never saw.
            sent = max(reservation.ready_at, reservation.sent_at)
            elapsed = max(0.0, now - sent)
            for kind, mark in zip(_KINDS, reservation.marks):
                bucket = state.minute(kind)
                limit, remaining = getattr(headers, f"limit_{kind}"), getattr(headers, f"remaining_{kind}")
                bucket.advance(now)
                if limit is not None:
                    bucket.learn(limit, self._headroom, self._initial_burst)
                if remaining is None or not bucket.active:
                    continue
                margin = max(bucket.rate * _JITTER_SECONDS, _MARGIN_SHARE * bucket.capacity)
                # What the server's bucket holds when full: by its reset (exact, in its own units), else at
                # least what it had before this request (in ours: too high if the cost factor is).
                full = _server_full(bucket, remaining, getattr(headers, f"reset_{kind}"))
                if full is None:
                    full = remaining + (1.0 if kind == "requests" else reservation.tokens) * accepted
                grown = max(0.0, min(bucket.ceiling, full - margin) - bucket.capacity)
                bucket.capacity += grown
                # What the server holds now: what it had left after this request, refilled since, less what
                # we took after it, plus what came back after it was counted (a refund that happened
                # while this request was in flight is not in its `remaining`). When the server counted it
                # is not known; half-way through its round trip is the conservative guess.
                if kind == "tokens" and accepted and bucket.limit is not None:
                    overbooked = state.overbooked.total - state.overbooked.since(reservation.ready_at)
                    rate = bucket.limit / bucket.window
                    full_now = _server_full(bucket, remaining, getattr(headers, f"reset_{kind}"))
                    state.refunds.observe(reservation.ready_at, remaining, mark, overbooked, rate, full_now)
                returned = bucket.returns.since(sent + elapsed / 2)
                seen = remaining + bucket.rate * elapsed - margin - (bucket.booked - mark) + returned
                # The level goes down to what the server holds; up to it only once the server is seen to
                # refund (then our view lags it by the refunds made early in each request's flight).
                raise_to = seen if kind == "tokens" and state.refunds.seen_refunding else bucket.level + grown
                bucket.level = min(raise_to, bucket.room, seen)
            # A success ends the probe: with headers the limits are now known, and a server that sends
            # none will not send them later either. An error without limits lets the next caller probe.
            learned = accepted or headers.limit_requests is not None or headers.limit_tokens is not None
            self._end_probe(state, reservation, learned=learned)
            self._reject_too_large(reservation.key, state)
            self._wake(state)

    def _read_windows(
        self, state: _KeyState, reservation: Reservation, headers: RateLimitHeaders, accepted: bool, now: float
    ) -> RateLimitHeaders:
        """Take from ``headers`` what covers a long window (into the key's budgets) and what shows the
        server's cost of a quiet request (into its calibration); return the per-minute rest. Called
        under the lock, by both limiters (Redis keeps only the per-minute buckets)."""
        reservation.observed = True
        elapsed = max(0.0, now - reservation.ready_at)
        minute: Dict[str, Optional[float]] = {}
        for kind, mark in zip(_KINDS, reservation.marks):
            limit = getattr(headers, f"limit_{kind}")
            remaining = getattr(headers, f"remaining_{kind}")
            reset = getattr(headers, f"reset_{kind}")
            vote = state.votes[kind]
            if limit is not None:
                vote.add(estimate_window(limit, remaining, reset))
            named = state.message_limits.get(kind)  # a 429 named the per-minute limit: this is another
            long_window = limit is not None and (vote.long or (named is not None and abs(limit - named) >= 1))
            if not long_window:
                minute[f"limit_{kind}"], minute[f"remaining_{kind}"] = limit, remaining
                if kind == "tokens" and reset is not None and limit is not None:
                    self._calibrate(state, reservation, _missing(limit, remaining, reset), now + reset, accepted)
                continue
            assert limit is not None
            window = vote.window if vote.long else None
            budget = self._budget(state, kind, limit, window or 86400.0, HEADERS, now)
            bucket = state.minute(kind)
            bucket.forget()
            if kind == "requests" and bucket.limit is None:
                bucket.learn(_PROVISIONAL_RPM, self._headroom, self._initial_burst, PROVISIONAL)
                state.provisional_at = now
            elif bucket.source == PROVISIONAL and accepted and now - state.provisional_at >= _PROVISIONAL_DOUBLING:
                bucket.learn(2 * (bucket.limit or _PROVISIONAL_RPM), self._headroom, self._initial_burst, PROVISIONAL)
                state.provisional_at = now
            if remaining is not None:  # a budget follows the server's count both ways, less what we sent since
                seen = remaining + budget.rate * elapsed - (state.minute(kind).booked - mark)
                budget.level = min(budget.capacity, seen)
        return RateLimitHeaders(
            limit_requests=minute.get("limit_requests"),
            limit_tokens=minute.get("limit_tokens"),
            remaining_requests=minute.get("remaining_requests"),
            remaining_tokens=minute.get("remaining_tokens"),
            reset_requests=headers.reset_requests,
            reset_tokens=headers.reset_tokens,
            retry_after=headers.retry_after,
        )

    def _budget(self, state: _KeyState, kind: str, limit: float, window: float, source: str, now: float) -> _Bucket:
        """The long-window budget of ``kind``, created or updated to ``limit`` per ``window`` seconds."""
        budget = state.budgets.get(kind)
        if budget is None:
            budget = state.budgets[kind] = _Bucket(None, self._headroom, self._initial_burst, now)
            budget.level = limit
        if budget.limit != limit or budget.window != window:
            budget.set_limit(limit, self._headroom, window)
            budget.capacity = limit
            budget.level = min(budget.level, limit)
        budget.source = source
        return budget

    @staticmethod
    def _calibrate(
        state: _KeyState, reservation: Reservation, missing: Optional[float], full_at: float, accepted: bool
    ) -> None:
        """``missing``: tokens the server's bucket lacked right after this request (see :func:`_missing`).
        For a request sent alone into a full bucket, and answered before any other was sent, that is
        the server's count of its cost."""
        # Alone until answered: a call booked after it may have reached the server first.
        alone = reservation.quiet and state.requests.booked == reservation.marks[0]
        if accepted and alone and reservation.estimate > 0 and missing is not None and missing > 0:
            state.calibration.add(missing, reservation.estimate)
        state.full_at = max(state.full_at, full_at)

    def learn_from_message(self, reservation: Reservation, message: LimitMessage) -> None:
        """Learn the limit a 429's message names: a per-minute limit (``... per min (RPM): Limit 3``)
        replaces what the headers showed, which then was a longer window; a per-day one (``RPD``,
        ``TPD``) becomes a budget with ``limit - used`` left. ``Requested N`` of a token limit is the
        server's own count of this request, a calibration sample. Waiting callers that can now never
        fit raise :class:`RequestTooLarge`."""
        with self._lock:
            state = self._keys[reservation.key]
            now = self._clock()
            if message.kind == "tokens" and message.requested is not None:
                state.calibration.add(message.requested, reservation.estimate)
            if message.window <= MINUTE:
                state.message_limits[message.kind] = message.limit
                bucket = state.minute(message.kind)
                bucket.advance(now)
                if bucket.learn(message.limit, self._headroom, self._initial_burst, MESSAGE):
                    bucket.capacity = min(bucket.capacity, bucket.ceiling)
                    bucket.level = min(bucket.level, bucket.capacity)
            else:
                budget = self._budget(state, message.kind, message.limit, message.window, MESSAGE, now)
                budget.advance(now)
                left = message.limit - message.used if message.used is not None else 0.0
                budget.level = min(budget.level, max(0.0, left))
            self._reject_too_large(reservation.key, state)
            self._wake(state)

    @staticmethod
    def _reject_too_large(key: LimitKey, state: _KeyState) -> None:
        """Take out of the line, with :class:`RequestTooLarge`, every caller a known limit can never hold
        (the head checks itself when woken). Only when a token limit changed since the last look: every
        response comes here, and the line may hold hundreds of tasks."""
        limits = tuple(bucket.limit for bucket in state.buckets("tokens"))
        if limits == state.judged:
            return
        state.judged = limits
        for ticket in [t for t in state.line if state.too_large(key[1], t.tokens) is not None]:
            state.line.remove(ticket)
            ticket.too_large = state.too_large(key[1], ticket.tokens)
            ticket.turn.set()  # (a task whose loop is closed will never look)

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
        """Most tokens (by our estimate) one call of ``key`` may take at once without waiting for a full
        bucket: the burst over the cost factor (``None`` while no token limit is known)."""
        with self._lock:
            state = self._state(key, self._clock())
            bucket = state.tokens
            return bucket.capacity / state.calibration.factor if bucket.active else None

    def cost_factor(self, key: LimitKey) -> float:
        """The server's count of a request's tokens over our estimate, as learned so far (1.0 at first)."""
        with self._lock:
            return self._state(key, self._clock()).calibration.factor

    # -- the asyncio face: what never waits is the same call ----------------------------------------

    async def acancel(self, reservation: Reservation) -> None:
        """:meth:`cancel` for a coroutine."""
        self.cancel(reservation)

    async def asettle(self, reservation: Reservation, used_tokens: Optional[int]) -> None:
        """:meth:`settle` for a coroutine."""
        self.settle(reservation, used_tokens)

    async def aobserve(self, reservation: Reservation, headers: RateLimitHeaders, status: int = 200) -> None:
        """:meth:`observe` for a coroutine."""
        self.observe(reservation, headers, status)

    async def alearn_from_message(self, reservation: Reservation, message: LimitMessage) -> None:
        """:meth:`learn_from_message` for a coroutine."""
        self.learn_from_message(reservation, message)

    async def apause(self, reservation: Reservation, seconds: float, kind: str = "") -> None:
        """:meth:`pause` for a coroutine."""
        self.pause(reservation, seconds, kind)

    async def arequest_rate(self, key: LimitKey) -> Optional[float]:
        """:meth:`request_rate` for a coroutine."""
        return self.request_rate(key)

    async def alimits_known(self, key: LimitKey) -> bool:
        """:meth:`limits_known` for a coroutine."""
        return self.limits_known(key)

    async def atoken_burst(self, key: LimitKey) -> Optional[float]:
        """:meth:`token_burst` for a coroutine."""
        return self.token_burst(key)

    # -- looking at it ---------------------------------------------------------------------------

    def snapshot(self) -> Dict[str, Dict[str, Any]]:
        """Per-model state for debugging: for ``requests`` and ``tokens``, the per-minute limit (its
        ``*_window`` is 60 seconds), where it
        came from (``"configured"``, ``"headers"``, ``"429"``, or ``"provisional"``: a request rate that
        starts at 60 a minute and doubles every 5 s while only a long-window limit is known), burst and
        level now, and any long-window budget (``*_budget_limit``, ``*_budget_window`` in seconds, ``*_budget_level``,
        ``*_budget_source``); callers waiting, pause left, and the cost factor."""
        with self._lock:
            now = self._clock()
            out: Dict[str, Dict[str, Any]] = {}
            for (_, model), state in self._keys.items():
                entry: Dict[str, Any] = {
                    "paused_for": max(0.0, state.paused_until - now),
                    "waiting": len(state.line) + int(state.head),
                    "cost_factor": state.calibration.factor,
                    "refund_share": state.refunds.share,
                }
                for name in _KINDS:
                    bucket = state.minute(name)
                    bucket.advance(now)
                    entry[f"{name}_limit"] = bucket.limit
                    entry[f"{name}_window"] = bucket.window if bucket.active else None
                    entry[f"{name}_source"] = bucket.source
                    entry[f"{name}_burst"] = bucket.capacity if bucket.active else None
                    entry[f"{name}_level"] = bucket.level if bucket.active else None
                    budget = state.budgets.get(name)
                    if budget is not None:
                        budget.advance(now)
                        entry[f"{name}_budget_limit"] = budget.limit
                        entry[f"{name}_budget_window"] = budget.window
                        entry[f"{name}_budget_level"] = budget.level
                        entry[f"{name}_budget_source"] = budget.source
                out[model] = entry
            return out

    def __repr__(self) -> str:
        parts = []
        for model, entry in self.snapshot().items():
            parts.append(
                f"{model}: {_describe_limits(entry, levels=True)}, waiting={entry['waiting']:.0f}"
                + (f", cost x{entry['cost_factor']:.2f}" if entry["cost_factor"] != 1.0 else "")
                + (f", refunds {entry['refund_share']:.0%}" if entry["refund_share"] != 1.0 else "")
                + (f", paused {entry['paused_for']:.2f}s" if entry["paused_for"] else "")
            )
        default = f"rpm={self._default.rpm} tpm={self._default.tpm}"
        return f"<RateLimiter {default} [{'; '.join(parts)}]>"


def _server_full(bucket: _Bucket, remaining: Optional[float], reset: Optional[float]) -> Optional[float]:
    """What the server's per-minute bucket holds when full, in its own units: ``remaining`` plus what
    its ``reset`` shows refilling (``None`` when either is unknown)."""
    if remaining is None or reset is None or bucket.limit is None:
        return None
    return remaining + reset * bucket.limit / bucket.window


def _missing(limit: float, remaining: Optional[float], reset: float) -> Optional[float]:
    """Tokens a per-minute bucket lacks, from its headers: ``limit - remaining`` when the bucket holds
    the whole limit (OpenAI's do: exact), else what the reset shows refilling at ``limit / 60`` per
    second (a server that holds less, e.g. one second's worth). Resets come in whole milliseconds, so
    a reset too short to tell the cost within a few per cent says nothing (``None``)."""
    rate = limit / MINUTE
    if remaining is not None and limit - remaining <= (reset + 0.001) * rate:
        return limit - remaining
    return reset * rate - rate * 0.0005 if reset >= 0.02 else None


def _slice(left: float, cancel: Optional[threading.Event]) -> Optional[float]:
    """How long to wait for an event: what is ``left`` (``inf``: no bound), cut short to notice
    ``cancel``; ``None`` means wait with no timeout."""
    if cancel is not None:
        left = min(left, _CANCEL_CHECK_SECONDS)
    return None if left == math.inf else max(0.0, left)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def _describe_limits(entry: Mapping[str, Any], *, levels: bool) -> str:
    """One model's limits in a repr, from its snapshot entry: each limit, where it came from, its level
    (``levels``) and its long-window budget."""
    limits = []
    for name, unit in (("requests", "rpm"), ("tokens", "tpm")):
        text = f"{unit}={entry[f'{name}_limit']}"
        if entry[f"{name}_source"] not in (None, CONFIGURED):
            text += f" ({entry[f'{name}_source']})"
        if levels:
            text += f" level={_fmt(entry[f'{name}_level'])}"
        if f"{name}_budget_limit" in entry:
            text += (
                f" budget={entry[f'{name}_budget_limit']:g}/{describe_window(entry[f'{name}_budget_window'])}"
                f" ({entry[f'{name}_budget_source']}) left={_fmt(entry[f'{name}_budget_level'])}"
            )
        limits.append(text)
    return ", ".join(limits)
