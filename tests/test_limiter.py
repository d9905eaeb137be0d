"""The limiter's arithmetic, with an injected clock: no real waiting, no timing flakiness."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from throttled_openai import Limits, RateLimiter, RateLimitHeaders, RateLimitTimeout, RequestTooLarge

KEY = ("acct", "gpt-test")


class FakeClock:
    """A monotonic clock that only moves when someone sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: List[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def make(clock: FakeClock, **kwargs: object) -> RateLimiter:
    kwargs.setdefault("headroom", 0.0)
    kwargs.setdefault("initial_burst", 1.15)  # one second's budget, after the 0.15 s jitter margin
    return RateLimiter(clock=clock, sleep=clock.sleep, **kwargs)  # type: ignore[arg-type]


def test_burst_then_paced_at_the_rate() -> None:
    clock = FakeClock()
    limiter = make(clock, rpm=60)  # 1 request per second, initial burst of 1 s = 1 request
    times = []
    for _ in range(5):
        limiter.acquire(KEY, 0)
        times.append(clock.now - 1000.0)
    assert times == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])


def test_requests_and_tokens_are_taken_together() -> None:
    clock = FakeClock()
    limiter = make(clock, rpm=6000, tpm=600)  # tokens bind: 10 tokens per second
    first = limiter.acquire(KEY, 10)
    second = limiter.acquire(KEY, 10)
    assert first.ready_at == pytest.approx(1000.0)
    assert second.ready_at == pytest.approx(1001.0)  # waits for tokens, though requests were free


def test_callers_are_served_first_come_first_served() -> None:
    """Small calls do not overtake a large one that came first: no caller can starve."""
    limiter = RateLimiter(tpm=6000, headroom=0, initial_burst=1.15)  # 100 tokens per second, burst 100
    limiter.acquire(KEY, 100)  # empties the bucket
    order: List[int] = []
    threads = []
    for cost in [50, 1, 80, 1]:
        waiting = limiter.snapshot()["gpt-test"]["waiting"] or 0
        thread = threading.Thread(target=lambda c=cost: (limiter.acquire(KEY, c), order.append(c)))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 5
        while (limiter.snapshot()["gpt-test"]["waiting"] or 0) <= waiting and time.monotonic() < deadline:
            time.sleep(0.005)  # test only: wait until this caller has joined the line
    for thread in threads:
        thread.join(10)
    assert order == [50, 1, 80, 1]


def test_a_refund_lets_the_waiting_head_go_early() -> None:
    limiter = RateLimiter(tpm=600, headroom=0, initial_burst=1.15)  # 10 tokens per second, burst 10
    first = limiter.acquire(KEY, 10)
    went: List[float] = []
    thread = threading.Thread(target=lambda: (limiter.acquire(KEY, 10), went.append(time.monotonic())))
    thread.start()
    time.sleep(0.1)
    settled = time.monotonic()
    limiter.settle(first, 0)  # the server used nothing: the head needs not wait the full second
    thread.join(5)
    assert went and went[0] - settled < 0.5


def test_cost_above_the_whole_minute_fails_at_once() -> None:
    clock = FakeClock()
    limiter = make(clock, tpm=1000)
    with pytest.raises(RequestTooLarge, match=r"1001 tokens.*1000 tokens per minute"):
        limiter.acquire(KEY, 1001)
    assert clock.slept == []
    limiter.acquire(KEY, 1000)  # exactly the limit can pass, after waiting for the bucket to fill


def test_callers_giving_up_never_leave_the_line_without_a_head() -> None:
    """Many callers with tiny timeouts come and go while the head role is handed over: afterwards the
    line must still work (a lost head would make every later caller wait forever)."""
    import random

    limiter = RateLimiter(rpm=600, headroom=0)
    rng = random.Random(7)
    timeouts = [rng.uniform(0, 0.05) for _ in range(120)]

    def caller(timeout: float) -> None:
        with contextlib.suppress(RateLimitTimeout):
            limiter.acquire(KEY, 0, timeout=timeout)

    threads = [threading.Thread(target=caller, args=(t,)) for t in timeouts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    state = limiter._keys[KEY]
    assert not state.head and not state.line
    done = threading.Event()
    threading.Thread(target=lambda: (limiter.acquire(KEY, 0), done.set()), daemon=True).start()
    assert done.wait(5)


def test_timeout_raises_without_waiting_and_gives_the_reservation_back() -> None:
    clock = FakeClock()
    limiter = make(clock, rpm=60)
    limiter.acquire(KEY, 0)
    with pytest.raises(RateLimitTimeout) as info:
        limiter.acquire(KEY, 0, timeout=0.5)
    assert info.value.retry_after == pytest.approx(1.0)
    assert clock.slept == []
    # The refused reservation left no debt: the next caller still goes after one second, not two.
    assert limiter.acquire(KEY, 0).ready_at == pytest.approx(1001.0)


def test_interrupted_wait_gives_the_reservation_back() -> None:
    clock = FakeClock()

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    limiter = RateLimiter(rpm=60, headroom=0, clock=clock, sleep=interrupted)
    limiter.acquire(KEY, 0)
    with pytest.raises(KeyboardInterrupt):
        limiter.acquire(KEY, 0)
    assert limiter.snapshot()["gpt-test"]["requests_level"] == pytest.approx(0.0)


def test_settle_refunds_over_estimates_and_charges_under_estimates() -> None:
    clock = FakeClock()
    limiter = make(clock, tpm=6000)  # 100 tokens/s, burst 100
    reservation = limiter.acquire(KEY, 80)
    limiter.settle(reservation, 30)
    assert limiter.snapshot()["gpt-test"]["tokens_level"] == pytest.approx(70.0)
    reservation = limiter.acquire(KEY, 10)
    limiter.settle(reservation, 50)
    assert limiter.snapshot()["gpt-test"]["tokens_level"] == pytest.approx(20.0)
    limiter.settle(reservation, 0)  # a second settle of the same reservation changes nothing
    assert limiter.snapshot()["gpt-test"]["tokens_level"] == pytest.approx(20.0)


def test_cancel_gives_everything_back() -> None:
    clock = FakeClock()
    limiter = make(clock, rpm=60, tpm=600)
    reservation = limiter.acquire(KEY, 10)
    limiter.cancel(reservation)
    limiter.cancel(reservation)  # twice: nothing more
    state = limiter.snapshot()["gpt-test"]
    assert state["requests_level"] == pytest.approx(1.0) and state["tokens_level"] == pytest.approx(10.0)


def test_refunds_never_exceed_the_burst() -> None:
    clock = FakeClock()
    limiter = make(clock, tpm=6000)
    reservation = limiter.acquire(KEY, 10)
    clock.now += 100  # long idle: the bucket is full again
    limiter.settle(reservation, 0)
    assert limiter.snapshot()["gpt-test"]["tokens_level"] == pytest.approx(100.0)


def test_limits_are_learned_from_headers() -> None:
    clock = FakeClock()
    limiter = make(clock)
    probe = limiter.acquire(KEY, 10)
    headers = RateLimitHeaders(limit_requests=60, limit_tokens=6000, remaining_requests=59, remaining_tokens=5990)
    limiter.observe(probe, headers)
    limiter.settle(probe, 10)
    state = limiter.snapshot()["gpt-test"]
    assert state["requests_limit"] == 60 and state["tokens_limit"] == 6000
    # The server said nearly the whole minute is there: the burst grows to it instead of crawling.
    assert state["requests_burst"] == pytest.approx(59 + 1 - 0.15)
    for _ in range(50):
        limiter.acquire(KEY, 10)
    assert clock.slept == []


def test_configured_limit_never_exceeds_what_the_server_says() -> None:
    clock = FakeClock()
    limiter = make(clock, rpm=600, tpm=60000)
    reservation = limiter.acquire(KEY, 100)
    limiter.observe(reservation, RateLimitHeaders(limit_requests=60, remaining_requests=0))
    assert limiter.snapshot()["gpt-test"]["requests_limit"] == 60
    nxt = limiter.acquire(KEY, 100)
    assert nxt.ready_at > clock.now - 0.01 and clock.slept  # someone else used the budget: we wait


def test_observe_counts_the_refill_during_the_request() -> None:
    clock = FakeClock()
    limiter = make(clock, rpm=600)  # 10 per second, burst 10
    first = limiter.acquire(KEY, 0)
    clock.now += 3.0  # a 3-second call; meanwhile the server refilled 30 requests' worth
    limiter.observe(first, RateLimitHeaders(limit_requests=600, remaining_requests=0))
    # remaining 0 at admission + 30 refilled - 1.5 margin, capped at the burst: not 0 - margin
    assert limiter.snapshot()["gpt-test"]["requests_level"] == pytest.approx(10.0)


def test_headers_only_lower_the_level_unless_the_burst_grows() -> None:
    clock = FakeClock()
    limiter = make(clock, rpm=600)
    first = limiter.acquire(KEY, 0)
    limiter.observe(first, RateLimitHeaders(limit_requests=600, remaining_requests=9))
    level = limiter.snapshot()["gpt-test"]["requests_level"]
    second = limiter.acquire(KEY, 0)
    limiter.observe(second, RateLimitHeaders(limit_requests=600, remaining_requests=9))  # stale and rosy
    assert limiter.snapshot()["gpt-test"]["requests_level"] == pytest.approx(level - 1)


def test_a_refusal_with_headers_gives_the_tokens_back_once() -> None:
    clock = FakeClock()
    limiter = make(clock, tpm=6000)  # 100 tokens per second, burst 100
    refused = limiter.acquire(KEY, 60)
    limiter.observe(refused, RateLimitHeaders(limit_tokens=6000, remaining_tokens=100), status=429)
    limiter.settle(refused, 0)
    state = limiter.snapshot()["gpt-test"]
    assert state["tokens_burst"] == pytest.approx(100.0)  # not 100 + 60: the server never took them
    # given back once, then held to what the server said remains less the 0.15 s jitter margin
    assert state["tokens_level"] == pytest.approx(100.0 - 15.0)


def test_an_error_without_limits_does_not_end_probing() -> None:
    limiter = RateLimiter()
    probe = limiter.acquire(KEY, 1)
    limiter.observe(probe, RateLimitHeaders(), status=500)  # no headers: learned nothing
    limiter.settle(probe, None)
    second = limiter.acquire(KEY, 1, timeout=1)
    assert second.probe  # the next caller probes again instead of releasing everyone


def test_only_one_probe_goes_first_when_limits_are_unknown() -> None:
    limiter = RateLimiter()
    probe = limiter.acquire(KEY, 1)
    started = threading.Event()
    got: List[float] = []

    def second() -> None:
        started.set()
        limiter.acquire(KEY, 1)
        got.append(time.monotonic())

    thread = threading.Thread(target=second)
    thread.start()
    started.wait(5)
    time.sleep(0.2)
    assert got == []  # still held behind the probe
    released = time.monotonic()
    limiter.observe(probe, RateLimitHeaders())  # an answer with no headers: nothing to learn, go
    thread.join(5)
    assert got and got[0] >= released


def test_probe_wait_respects_timeout() -> None:
    limiter = RateLimiter()
    limiter.acquire(KEY, 1)
    with pytest.raises(RateLimitTimeout):
        limiter.acquire(KEY, 1, timeout=0.05)


def test_a_429_pauses_everyone_and_shrinks_the_burst_once_per_burst() -> None:
    clock = FakeClock()
    limiter = make(clock, rpm=600, initial_burst=6.15)  # burst of 60 requests
    burst = [limiter.acquire(KEY, 0) for _ in range(10)]
    limiter.pause(burst[0], 2.0, "requests")
    limiter.pause(burst[1], 2.0, "requests")  # same burst: no second shrink
    assert limiter.snapshot()["gpt-test"]["requests_burst"] == pytest.approx(30.0)
    nxt = limiter.acquire(KEY, 0)
    assert nxt.ready_at >= 1002.0
    later = limiter.acquire(KEY, 0)
    limiter.pause(later, 1.0, "requests")  # a request booked after the shrink: evidence again
    assert limiter.snapshot()["gpt-test"]["requests_burst"] == pytest.approx(15.0)


def test_a_pause_also_holds_callers_already_asleep() -> None:
    clock = FakeClock()
    limiter = make(clock, rpm=60)
    first = limiter.acquire(KEY, 0)
    woke: List[float] = []

    def sleep(seconds: float) -> None:
        clock.now += seconds
        woke.append(clock.now)
        if len(woke) == 1:  # while the second caller sleeps, a 429 arrives
            limiter.pause(first, 5.0)

    limiter._sleep = sleep
    limiter.acquire(KEY, 0)
    assert clock.now >= 1001.0 + 5.0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"rpm": 0}, ValueError),
        ({"rpm": -5}, ValueError),
        ({"tpm": math.nan}, ValueError),
        ({"tpm": math.inf}, ValueError),
        ({"rpm": "500"}, TypeError),
        ({"rpm": True}, TypeError),
        ({"headroom": 1.0}, ValueError),
        ({"initial_burst": 0}, ValueError),
        ({"limits": {"gpt-4o": (500, 30000)}}, TypeError),
    ],
)
def test_bad_limits_fail_with_the_argument_named(kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        RateLimiter(**kwargs)


def test_limits_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="tpm"):
        Limits(tpm=-1)


@settings(max_examples=60, deadline=None)
@given(
    rpm=st.integers(min_value=1, max_value=5000),
    tpm=st.integers(min_value=100, max_value=100_000),
    steps=st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=5),  # idle before the call, seconds
            st.floats(min_value=0, max_value=1),  # cost, as a fraction of the limit
            st.floats(min_value=0, max_value=1.5),  # real usage, as a fraction of the cost
        ),
        min_size=1,
        max_size=60,
    ),
)
def test_never_exceeds_the_limit_over_any_window(rpm: int, tpm: int, steps: list) -> None:
    """Whatever the costs, idles and settlements: in every window of length w, the tokens used by calls
    that started in it stay within burst + rate × w (the bucket's promise), and so do the requests."""
    clock = FakeClock()
    limiter = make(clock, rpm=rpm, tpm=tpm)
    events = []  # (start time, tokens used, tokens used beyond the estimate)
    for idle, fraction, used_fraction in steps:
        clock.now += idle
        cost = int(fraction * tpm)
        reservation = limiter.acquire(KEY, cost)
        used = int(cost * used_fraction)
        limiter.settle(reservation, used)
        events.append((reservation.ready_at, used, max(0, used - cost), cost))
    rate_t, rate_r = tpm / 60, rpm / 60
    burst_t, burst_r = max(rate_t, 1.0), max(rate_r, 1.0)
    for i, (start, _, _, _) in enumerate(events):
        for j in range(i, len(events)):
            width = events[j][0] - start
            tokens = sum(used for _, used, _, _ in events[i : j + 1])
            # A call bigger than the burst goes once the bucket is full and leaves debt behind, so the
            # burst is effectively the largest call; usage beyond the estimate is charged after the call
            # (as debt), so only the last call's excess can be unpaid.
            biggest = max(cost for _, _, _, cost in events[i : j + 1])
            allowance = max(burst_t, biggest) + rate_t * width + events[j][2]
            assert tokens <= allowance + 1e-6 * tpm
            assert (j - i + 1) <= burst_r + rate_r * width + 1e-6


def test_a_partial_override_keeps_the_defaults_it_does_not_name() -> None:
    limiter = RateLimiter(rpm=100, tpm=30_000, limits={"gpt-4o": Limits(rpm=500), "o1": Limits(tpm=9_000)})
    assert limiter.limits_for("gpt-4o") == Limits(rpm=500, tpm=30_000)
    assert limiter.limits_for("o1") == Limits(rpm=100, tpm=9_000)
    assert limiter.limits_for("other") == Limits(rpm=100, tpm=30_000)
    limiter.cancel(limiter.acquire(("acct", "gpt-4o"), 10))
    assert limiter.snapshot()["gpt-4o"]["tokens_limit"] == 30_000
    assert RateLimiter(limits={"m": Limits(rpm=5)}).limits_for("m") == Limits(rpm=5, tpm=None)  # learned
