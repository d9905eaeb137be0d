"""Property-based tests: the header parser, the limiter's arithmetic and the reordering of answers.

Complements ``test_headers.py`` and ``test_limiter.py``: here every header the parser reads gets any
value, the limiter's operations (acquire, settle, cancel, refusals, pauses, double endings) come in any
order, real threads race on it, and answers come back in any order, missing or repeated.
"""

from __future__ import annotations

import math
import random
import threading
import time
from typing import Any, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from throttled_openai import RateLimiter, RateLimitHeaders, RateLimitTimeout
from throttled_openai.batching import IncompleteResponse, pack, split_choices
from throttled_openai.errors import Cancelled
from throttled_openai.headers import parse_duration, parse_rate_limit_headers, parse_retry_after, parse_try_again

KEY = ("acct", "gpt-prop")

# -- the header parser --------------------------------------------------------------------------

HEADER_NAMES = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "retry-after",
    "retry-after-ms",
    "x-ms-retry-after-ms",
]
NASTY = [
    "banana",
    "-1",
    "-0",
    "0",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "Infinity",
    "1e999",
    "1e-999",
    "",
    " ",
    "1_000",
    "0x10",
    "٣",
    "12ms",
    "6m0s",
    "1h2m3.5s",
    "-1s",
    "1.2.3s",
    "5 s",
    "9" * 400,
    "Wed, 21 Oct 2015 07:28:00 GMT",
]
header_values = st.one_of(
    st.sampled_from(NASTY),
    st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(HEADER_NAMES), header_values))
def test_every_header_value_parses_to_a_usable_number_or_none(headers: dict) -> None:
    parsed = parse_rate_limit_headers(headers)
    for name, value in vars(parsed).items():
        assert value is None or (math.isfinite(value) and value >= 0), (name, value)
    assert parsed.limit_requests is None or parsed.limit_requests > 0
    assert parsed.limit_tokens is None or parsed.limit_tokens > 0
    assert parsed.retry_after is None or parsed.retry_after <= 7200  # nothing past two hours is waited for
    for name in ("reset_requests", "reset_tokens"):  # long-window resets are real (33h57m29.556s)
        value = getattr(parsed, name)
        assert value is None or value <= 400 * 86400


def go_duration(seconds: float) -> str:
    """Go's time.Duration formatting, as OpenAI sends it (``12ms``, ``1.5s``, ``6m0s``, ``1h2m3s``)."""
    ms = round(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    sec = (f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)) + "s"
    if hours:
        return f"{hours}h{minutes}m{sec}"
    return f"{minutes}m{sec}" if minutes else sec


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(min_value=0, max_value=7_200_000))
def test_go_durations_round_trip_in_headers_and_messages(ms: int) -> None:
    seconds = ms / 1000
    text = go_duration(seconds)
    assert parse_duration(text) == pytest.approx(seconds, abs=1e-9)
    parsed = parse_rate_limit_headers({"x-ratelimit-reset-tokens": text})
    assert parsed.reset_tokens == pytest.approx(seconds, abs=1e-9)
    message = f"Rate limit reached for gpt-4o on tokens per min (TPM): Limit 30000. Please try again in {text}. Visit"
    assert parse_try_again(message) == pytest.approx(seconds, abs=1e-9)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    ms=st.one_of(st.none(), header_values, st.integers(0, 7_200_000).map(str)),
    seconds=st.one_of(st.none(), header_values, st.integers(0, 7200).map(str)),
)
def test_retry_after_ms_wins_when_usable(ms: Optional[str], seconds: Optional[str]) -> None:
    headers = {name: value for name, value in (("retry-after-ms", ms), ("retry-after", seconds)) if value is not None}
    delay = parse_retry_after(headers)
    from_ms = parse_retry_after({"retry-after-ms": ms}) if ms is not None else None
    from_seconds = parse_retry_after({"retry-after": seconds}) if seconds is not None else None
    # The first positive hint wins; a zero never overrides a positive one (Azure AI Foundry sent both).
    positive = [value for value in (from_ms, from_seconds) if value]
    expected = positive[0] if positive else (0.0 if 0.0 in (from_ms, from_seconds) else None)
    assert delay == expected
    if ms is not None and ms.isdigit() and int(ms) <= 7_200_000:
        assert from_ms == pytest.approx(int(ms) / 1000)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(max_size=80), st.integers(min_value=0, max_value=10**9))
def test_remaining_values_are_read_exactly(noise: str, number: int) -> None:
    parsed = parse_rate_limit_headers({"x-ratelimit-remaining-tokens": f" {number} ", "x-unrelated": noise})
    assert parsed.remaining_tokens == number


# -- the limiter's arithmetic -------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.floats(0, 1)),  # cost as a fraction of the burst
        st.tuples(st.just("settle"), st.floats(0, 1.5)),  # usage as a fraction of the cost
        st.tuples(st.just("settle_unknown"), st.just(0.0)),  # usage unknown (timeout): keep the estimate
        st.tuples(st.just("cancel"), st.just(0.0)),  # never sent
        st.tuples(st.just("refused"), st.just(0.0)),  # a 4xx with headers, then settle(0)
        st.tuples(st.just("again"), st.just(0.0)),  # end an already ended reservation once more
        st.tuples(st.just("idle"), st.floats(0, 3)),
        st.tuples(st.just("pause"), st.floats(0, 2)),
    ),
    min_size=1,
    max_size=50,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(ops=OPS, tpm=st.integers(min_value=600, max_value=200_000))
def test_refunds_never_create_budget_out_of_nothing(ops: List[Tuple[str, float]], tpm: int) -> None:
    """With the clock standing still, the token level never rises above the full bucket less what
    every reservation finally costs (its usage, its estimate, or nothing if it was never sent or was
    refused), whatever order reservations end in and however often an ending is repeated."""
    clock = FakeClock()
    limiter = RateLimiter(rpm=10**6, tpm=tpm, headroom=0.0, clock=clock, sleep=clock.sleep)
    burst = limiter.token_burst(KEY)
    assert burst is not None
    charged = 0.0
    open_: List[Tuple[Any, int]] = []
    ended: List[Any] = []
    for op, x in ops:
        if op == "acquire":
            cost = int(x * burst)
            level = limiter.snapshot()[KEY[1]]["tokens_level"]
            assert level is not None
            if cost > level:
                continue  # would have to wait: the clock stands still in this test
            open_.append((limiter.acquire(KEY, cost, timeout=0), cost))
            charged += cost
        elif op in ("settle", "settle_unknown", "cancel", "refused") and open_:
            reservation, cost = open_.pop(0)
            if op == "settle":
                used = int(x * cost)
                limiter.settle(reservation, used)
                charged += used - cost
            elif op == "settle_unknown":
                limiter.settle(reservation, None)
            elif op == "cancel":
                limiter.cancel(reservation)
                charged -= cost
            else:
                limiter.observe(reservation, RateLimitHeaders(remaining_tokens=0, remaining_requests=0), 400)
                limiter.settle(reservation, 0)
                charged -= cost
            ended.append(reservation)
        elif op == "again" and ended:
            reservation = ended[0]
            limiter.settle(reservation, 0)
            limiter.cancel(reservation)
        level = limiter.snapshot()[KEY[1]]["tokens_level"]
        assert level is not None and math.isfinite(level)
        assert level <= burst + 1e-6
        assert level <= burst - charged + 1e-6, (op, level, burst, charged)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(ops=OPS, rpm=st.integers(1, 3000), tpm=st.integers(100, 100_000))
def test_never_exceeds_the_limit_with_cancels_refusals_and_pauses(
    ops: List[Tuple[str, float]], rpm: int, tpm: int
) -> None:
    """Over any window of the fake clock, the tokens finally charged by reservations that began in it
    stay within the burst (or the largest single call) plus the rate times the window, plus the usage
    above the estimate of the calls not yet settled when the window's last call went; requests too."""
    clock = FakeClock()
    limiter = RateLimiter(rpm=rpm, tpm=tpm, headroom=0.0, initial_burst=1.15, clock=clock, sleep=clock.sleep)
    burst_t = limiter.token_burst(KEY) or 0.0
    # [start, tokens finally charged, excess over the estimate, cost, request charged, step acquired,
    #  step settled]
    events: List[List[float]] = []
    open_: List[Tuple[Any, int, int]] = []
    last: Any = None
    for step, (op, x) in enumerate(ops):
        if op == "pause":
            if last is not None:  # a 429 for the latest call: everyone waits, the burst halves
                limiter.pause(last, x, "tokens")
            continue
        if op == "acquire":
            cost = int(x * burst_t)
            reservation = last = limiter.acquire(KEY, cost)
            open_.append((reservation, cost, len(events)))
            events.append([reservation.ready_at, float(cost), 0.0, float(cost), 1.0, step, math.inf])
        elif op in ("settle", "settle_unknown", "cancel", "refused") and open_:
            reservation, cost, k = open_.pop(0)
            if op == "settle":
                used = int(x * cost)
                limiter.settle(reservation, used)
                events[k][1], events[k][2], events[k][6] = used, max(0, used - cost), step
            elif op == "settle_unknown":
                limiter.settle(reservation, None)
            elif op == "cancel":  # never sent: the request and its tokens come back
                limiter.cancel(reservation)
                events[k][1] = events[k][4] = 0.0
            else:  # refused by the server, which says nothing remains
                limiter.observe(reservation, RateLimitHeaders(remaining_tokens=0, remaining_requests=0), 429)
                limiter.settle(reservation, 0)
                events[k][1] = 0.0
        elif op == "idle":
            clock.now += x
    rate_t, rate_r = tpm / 60, rpm / 60
    burst_r = max(rate_r, 1.0)
    for i in range(len(events)):
        for j in range(i, len(events)):
            width = events[j][0] - events[i][0]
            window = events[i : j + 1]
            tokens = sum(e[1] for e in window)
            biggest = max(e[3] for e in window)
            # Usage above an estimate is charged when the call settles: the calls in the window that had
            # not settled when its last call went may have overrun unseen by it.
            unseen = sum(e[2] for e in window if e[6] > events[j][5])
            assert tokens <= max(burst_t, biggest) + rate_t * width + unseen + 1e-6 * tpm
            assert sum(e[4] for e in window) <= burst_r + rate_r * width + 1e-6


def test_a_call_larger_than_a_shrunk_burst_waits_its_turn() -> None:
    clock = FakeClock()
    limiter = RateLimiter(tpm=6000, headroom=0.0, initial_burst=1.15, clock=clock, sleep=clock.sleep)
    assert limiter.token_burst(KEY) == pytest.approx(100)  # 100 tokens per second, a burst of 100
    first = limiter.acquire(KEY, 100)
    limiter.pause(first, 0.0, "tokens")  # a 429 arrived: the burst halves
    second = limiter.acquire(KEY, 100)
    # 200 tokens within a window of w seconds need w >= (200 - 100) / 100
    assert second.ready_at - first.ready_at >= 1.0 - 1e-9


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    plans=st.lists(
        st.lists(
            st.tuples(
                st.integers(0, 40),  # tokens
                st.sampled_from([None, 0.0, 0.05]),  # timeout
                st.sampled_from(["settle", "cancel", "unknown", "refused"]),
                st.booleans(),  # give up through a cancel event
            ),
            min_size=1,
            max_size=5,
        ),
        min_size=2,
        max_size=6,
    ),
    seed=st.integers(0, 2**16),
)
def test_the_limiter_never_deadlocks_under_racing_threads(plans: List[List[Any]], seed: int) -> None:
    """Threads acquiring with timeouts and cancel events, ending reservations every way, on a real
    clock: all finish, nobody is left in line, and the limiter still serves a caller at once."""
    limiter = RateLimiter(rpm=1200, tpm=12_000, initial_burst=0.2)  # a short burst: a line forms
    rng = random.Random(seed)
    errors: List[BaseException] = []

    def worker(plan: List[Any]) -> None:
        for tokens, timeout, ending, use_cancel in plan:
            cancel = threading.Event() if use_cancel else None
            if cancel is not None and rng.random() < 0.5:
                threading.Timer(0.02, cancel.set).start()
            try:
                reservation = limiter.acquire(KEY, tokens, timeout=timeout, cancel=cancel)
            except (RateLimitTimeout, Cancelled):
                continue
            except BaseException as exc:  # anything else is a bug
                errors.append(exc)
                return
            if ending == "settle":
                limiter.settle(reservation, tokens // 2)
            elif ending == "cancel":
                limiter.cancel(reservation)
            elif ending == "unknown":
                limiter.settle(reservation, None)
            else:
                limiter.observe(reservation, RateLimitHeaders(remaining_tokens=0), 429)
                limiter.settle(reservation, 0)

    threads = [threading.Thread(target=worker, args=(plan,), daemon=True) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads), "deadlock: a caller never got through"
    assert not errors, errors
    assert limiter.snapshot()[KEY[1]]["waiting"] == 0
    started = time.monotonic()
    limiter.cancel(limiter.acquire(KEY, 0, timeout=5))  # still serves
    assert time.monotonic() - started < 5


# -- reordering: split_choices and pack ----------------------------------------------------------


class Choice:
    def __init__(self, index: Any, tag: Tuple[int, int]) -> None:
        self.index = index
        self.tag = tag  # (input, sample) it truly answers


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    inputs=st.integers(1, 12),
    n=st.integers(1, 4),
    data=st.data(),
)
def test_split_choices_never_hands_an_input_a_neighbours_answer(inputs: int, n: int, data: Any) -> None:
    choices = [Choice(i * n + j, (i, j)) for i in range(inputs) for j in range(n)]
    dropped = data.draw(st.sets(st.integers(0, len(choices) - 1)))
    repeated = data.draw(st.sets(st.integers(0, len(choices) - 1)))
    kept = [c for k, c in enumerate(choices) if k not in dropped]
    kept += [Choice(choices[k].index, choices[k].tag) for k in repeated]
    junk = data.draw(st.lists(st.sampled_from([-1, inputs * n, inputs * n + 7, None, "0", 1.0]), max_size=3))
    kept += [Choice(index, (-1, -1)) for index in junk]
    kept = data.draw(st.permutations(kept))

    out = split_choices(kept, inputs, n)
    assert len(out) == inputs
    sent = [c.index for c in kept if type(c.index) is int]  # 1.0 and "0" are not indexes
    for i, slot in enumerate(out):
        whole = all(sent.count(i * n + j) == 1 for j in range(n))
        if whole:  # exactly its own answers, in sample order
            assert isinstance(slot, list) and [c.tag for c in slot] == [(i, j) for j in range(n)]
        else:  # something of it missing or repeated: never a guess
            assert isinstance(slot, IncompleteResponse)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    costs=st.lists(st.integers(0, 50), max_size=60),
    max_items=st.integers(1, 8),
    budget=st.one_of(st.none(), st.integers(1, 120)),
    kinds=st.data(),
)
def test_pack_keeps_every_input_once_in_order_within_limits(
    costs: List[int], max_items: int, budget: Optional[int], kinds: Any
) -> None:
    flags = kinds.draw(st.lists(st.booleans(), min_size=len(costs), max_size=len(costs)))
    items = [(position, (flags[position], position), cost) for position, cost in enumerate(costs)]
    batches = list(pack(iter(items), max_items, lambda: budget, kind=lambda item: item[0]))
    positions = [p for batch in batches for p in batch.positions]
    assert positions == list(range(len(costs)))
    for batch in batches:
        assert 1 <= len(batch.items) <= max_items
        assert [item[1] for item in batch.items] == list(batch.positions)
        assert batch.cost == sum(costs[p] for p in batch.positions)
        assert len({item[0] for item in batch.items}) == 1  # one kind per request
        if budget is not None and len(batch.items) > 1:
            assert batch.cost <= budget
