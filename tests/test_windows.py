"""Reading the server as it is: per-day limits in the headers, limits named by 429 messages, the
server's own count of a request's cost, and retry hints as real servers send them. The values are
from responses recorded from api.openai.com and Azure (../shared/openai-rate-limits.md)."""

from __future__ import annotations

import threading
import time
from typing import List, Optional

import pytest
from test_limiter import FakeClock  # the same fake clock: it only moves when someone sleeps

from throttled_openai import BudgetExhausted, RateLimiter, RateLimitHeaders, RequestTooLarge
from throttled_openai.headers import LimitMessage, parse_limit_message, parse_rate_limit_headers, parse_retry_after
from throttled_openai.windows import Calibration, Refunds, WindowVote, estimate_window

KEY = ("acct", "gpt-test")


def make(clock: FakeClock, **kwargs: object) -> RateLimiter:
    kwargs.setdefault("headroom", 0.0)
    return RateLimiter(clock=clock, sleep=clock.sleep, **kwargs)  # type: ignore[arg-type]


def headers(**values: str) -> RateLimitHeaders:
    return parse_rate_limit_headers({f"x-ratelimit-{k.replace('_', '-')}": v for k, v in values.items()})


# -- which window a header limit covers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "remaining", "reset", "window"),
    [
        ("10000", "9999", "8.64s", 86400.0),  # tier 1, gpt-3.5-turbo: 10,000 requests per day
        ("200", "196", "28m27.891s", 85394.55),  # free tier: 200 requests per day
        ("100000", "95283", "33h57m29.556s", 2_591_680.0),  # gpt-4.1-mini tokens: about a month
        ("160000", "159976", "9ms", 60.0),  # per minute: 24 tokens refill in 9 ms
        ("60", "59", "1s", 60.0),
    ],
)
def test_window_estimates_from_recorded_headers(limit: str, remaining: str, reset: str, window: float) -> None:
    parsed = headers(limit_requests=limit, remaining_requests=remaining, reset_requests=reset)
    assert parsed.limit_requests is not None
    estimate = estimate_window(parsed.limit_requests, parsed.remaining_requests, parsed.reset_requests)
    assert estimate == pytest.approx(window, rel=0.01)


def test_a_vote_is_not_flipped_by_one_skewed_response() -> None:
    vote = WindowVote()
    for estimate in (86400.0, 57776.0, 86400.0):  # 10000/9997/17.333s: concurrency and refill skew one
        vote.add(estimate)
    assert vote.long
    vote.add(30.0)  # one odd reading
    assert vote.long
    assert not WindowVote().long and WindowVote().window is None


def test_per_day_headers_become_a_budget_not_a_per_minute_rate() -> None:
    clock = FakeClock()
    limiter = make(clock)
    probe = limiter.acquire(KEY, 0)
    limiter.observe(probe, headers(limit_requests="10000", remaining_requests="9999", reset_requests="8.64s"))
    limiter.settle(probe, 0)
    state = limiter.snapshot()["gpt-test"]
    # Not 10,000 per minute: the per-minute limit is unknown, and requests go at a provisional rate.
    assert (state["requests_limit"], state["requests_source"]) == (60, "provisional")
    assert state["requests_budget_limit"] == 10000
    assert state["requests_budget_window"] == pytest.approx(86400, rel=0.01)
    assert state["requests_budget_source"] == "headers"
    assert state["requests_budget_level"] == pytest.approx(9999, abs=1)
    assert state["requests_window"] == 60 and state["tokens_window"] is None
    assert "budget=10000/day (headers)" in repr(limiter)


def test_a_limit_first_read_as_per_minute_moves_to_the_budget_when_the_resets_say_day() -> None:
    clock = FakeClock()
    limiter = make(clock)
    first = limiter.acquire(KEY, 0)
    limiter.observe(first, headers(limit_requests="10000", remaining_requests="10000", reset_requests="0s"))
    limiter.settle(first, 0)
    assert limiter.snapshot()["gpt-test"]["requests_limit"] == 10000  # nothing used yet: no evidence
    for remaining in ("9998", "9997", "9996"):
        reservation = limiter.acquire(KEY, 0)
        used = 10000 - int(remaining)
        limiter.observe(reservation, headers(limit_requests="10000", remaining_requests=remaining,
                                             reset_requests=f"{8.64 * used:.3f}s"))  # fmt: skip
        limiter.settle(reservation, 0)
    state = limiter.snapshot()["gpt-test"]
    assert state["requests_source"] == "provisional" and state["requests_budget_limit"] == 10000


def test_the_provisional_request_rate_doubles_until_a_429_names_the_limit() -> None:
    clock = FakeClock()
    limiter = make(clock)
    day = {"limit_requests": "10000", "reset_requests": "24h"}
    probe = limiter.acquire(KEY, 0)
    limiter.observe(probe, headers(remaining_requests="9999", **day))
    limiter.settle(probe, 0)
    seen = []
    for _ in range(3):
        clock.now += 5.0
        reservation = limiter.acquire(KEY, 0)
        limiter.observe(reservation, headers(remaining_requests="9000", **day))
        limiter.settle(reservation, 0)
        seen.append(limiter.snapshot()["gpt-test"]["requests_limit"])
    assert seen == [120, 240, 480]
    refused = limiter.acquire(KEY, 0)
    limiter.learn_from_message(refused, LimitMessage("requests", 60.0, 3500.0, 3500.0, 1.0))
    limiter.settle(refused, 0)
    clock.now += 10.0
    reservation = limiter.acquire(KEY, 0)
    limiter.observe(reservation, headers(remaining_requests="8000", **day))
    limiter.settle(reservation, 0)
    state = limiter.snapshot()["gpt-test"]
    assert (state["requests_limit"], state["requests_source"]) == (3500, "429")  # learned, not doubled


def test_the_budget_is_never_sent_past_and_raises_at_once_when_it_cannot_refill_in_time() -> None:
    clock = FakeClock()
    limiter = make(clock, rpm=600)
    probe = limiter.acquire(KEY, 0)
    # 200 per day with 1 left after this request.
    limiter.observe(probe, headers(limit_requests="200", remaining_requests="1", reset_requests="23h52m48s"))
    limiter.settle(probe, 0)
    limiter.acquire(KEY, 0)  # the last one left
    clock.slept.clear()
    with pytest.raises(BudgetExhausted) as caught:
        limiter.acquire(KEY, 0, timeout=60)
    assert clock.slept == []  # at once, not after waiting
    error = caught.value
    assert (error.kind, error.limit, error.source) == ("requests", 200, "headers")
    assert error.retry_after == pytest.approx(432, rel=0.05)  # one request refills in 86,400 / 200 s
    assert "requests per day" in str(error) and "'gpt-test'" in str(error) and "7m12s" in str(error)
    with pytest.raises(BudgetExhausted):  # max_wait None: a budget is waited for up to 2 minutes only
        limiter.acquire(KEY, 0)
    assert limiter.acquire(KEY, 0, timeout=500).ready_at == pytest.approx(1000 + 432, rel=0.01)  # fits: waits


def test_a_budget_that_refills_soon_is_waited_for() -> None:
    clock = FakeClock()
    limiter = make(clock, rpm=6000)
    probe = limiter.acquire(KEY, 0)
    limiter.observe(probe, headers(limit_requests="10000", remaining_requests="0", reset_requests="24h"))
    limiter.settle(probe, 0)
    start = clock.now
    limiter.acquire(KEY, 0)  # 8.64 s away: well within the two minutes
    assert clock.now - start == pytest.approx(8.64, rel=0.02)


def test_a_token_budget_too_small_for_a_call_raises_request_too_large() -> None:
    clock = FakeClock()
    limiter = make(clock, tpm=1_000_000)
    probe = limiter.acquire(KEY, 10)
    limiter.observe(probe, headers(limit_tokens="100000", remaining_tokens="95283", reset_tokens="33h57m29.556s"))
    limiter.settle(probe, 10)
    with pytest.raises(RequestTooLarge, match="per 30d"):
        limiter.acquire(KEY, 150_000)
    with pytest.raises(BudgetExhausted, match="tokens per 30d"):
        limiter.acquire(KEY, 96_000)  # fits the limit, not what is left of it


# -- limits named by 429 messages -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "Rate limit reached for gpt-3.5-turbo in organization org-x on requests per min (RPM): Limit 3, "
            "Used 3, Requested 1. Please try again in 20s. Visit https://platform.openai.com/account/rate-limits",
            LimitMessage("requests", 60.0, 3.0, 3.0, 1.0),
        ),
        (
            "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): Limit 40000, Used 39000, "
            "Requested 2000. Please try again in 1.5s.",
            LimitMessage("tokens", 60.0, 40000.0, 39000.0, 2000.0),
        ),
        (
            "Rate limit reached for default-text-davinci-003 in organization org-x on requests per min. Limit: 3 / min."
            " Please try again in 20s.",
            None,  # an older wording without the numbers in this form: no limit learned, no error
        ),
        (
            "Rate limit reached for gpt-3.5-turbo on requests per min (RPM): Limit 3, Requested 1. Please try again",
            LimitMessage("requests", 60.0, 3.0, None, 1.0),
        ),
        (
            "Rate limit reached for gpt-3.5-turbo in organization org-x on requests per day (RPD): Limit 200, "
            "Used 200, Requested 1. Please try again in 7m12s.",
            LimitMessage("requests", 86400.0, 200.0, 200.0, 1.0),
        ),
        (
            "Rate limit reached for gpt-4o-mini on tokens per day (TPD): Limit 2,000,000, Used 1,999,100, "
            "Requested 1,200. Please try again in 1m26.4s.",
            LimitMessage("tokens", 86400.0, 2_000_000.0, 1_999_100.0, 1200.0),
        ),
        (
            "Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Requested "
            "34307. The input or output tokens must be reduced in order to run successfully.",
            LimitMessage("tokens", 60.0, 30000.0, None, 34307.0, too_large=True),
        ),
        ("You exceeded your current quota, please check your plan and billing details.", None),
        (None, None),
    ],
)
def test_limit_messages(message: Optional[str], expected: Optional[LimitMessage]) -> None:
    assert parse_limit_message(message) == expected


def test_a_per_minute_limit_from_a_429_wins_over_headers_that_show_the_day() -> None:
    clock = FakeClock()
    limiter = make(clock)
    probe = limiter.acquire(KEY, 0)
    # Free tier: headers say 200 (per day), and a 429 says 3 per minute.
    limiter.observe(probe, headers(limit_requests="200", remaining_requests="199", reset_requests="7m12s"))
    limiter.settle(probe, 0)
    refused = limiter.acquire(KEY, 0)
    limiter.learn_from_message(refused, LimitMessage("requests", 60.0, 3.0, 3.0, 1.0))
    limiter.settle(refused, 0)
    nxt = limiter.acquire(KEY, 0)
    # Even a response whose reset alone could not tell the window keeps 200 out of the per-minute limit.
    limiter.observe(nxt, headers(limit_requests="200", remaining_requests="198"))
    limiter.settle(nxt, 0)
    state = limiter.snapshot()["gpt-test"]
    assert (state["requests_limit"], state["requests_source"]) == (3, "429")
    assert (state["requests_budget_limit"], state["requests_budget_source"]) == (200, "headers")
    assert "rpm=3.0 (429)" in repr(limiter)


def test_a_per_day_429_message_empties_the_budget() -> None:
    clock = FakeClock()
    limiter = make(clock, rpm=600)
    refused = limiter.acquire(KEY, 0)
    limiter.learn_from_message(refused, LimitMessage("requests", 86400.0, 200.0, 200.0, 1.0))
    limiter.settle(refused, 0)
    with pytest.raises(BudgetExhausted, match="learned from a 429 message"):
        limiter.acquire(KEY, 0)


# -- too large as soon as the limit is known ------------------------------------------------------


def test_waiting_callers_fail_as_soon_as_a_limit_shows_they_can_never_fit() -> None:
    limiter = RateLimiter()  # nothing configured: the first call is the probe, the others wait for it
    probe = limiter.acquire(KEY, 100)
    errors: List[BaseException] = []

    def call(tokens: int) -> None:
        try:
            limiter.acquire(KEY, tokens, timeout=30)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=call, args=(tokens,)) for tokens in (9000, 8000)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # the first becomes head, the second waits in line behind it
    started = time.monotonic()
    limiter.observe(probe, headers(limit_tokens="6000", remaining_tokens="5900", reset_tokens="1s"))
    limiter.settle(probe, 100)
    for thread in threads:
        thread.join(10)
    assert time.monotonic() - started < 5  # not a minute's wait for capacity that can never suffice
    assert len(errors) == 2 and all(isinstance(error, RequestTooLarge) for error in errors), errors
    assert limiter.snapshot()["gpt-test"]["waiting"] == 0


def test_a_429_that_names_a_lower_limit_fails_the_callers_it_cannot_hold() -> None:
    clock = FakeClock()
    limiter = make(clock, tpm=100_000)
    refused = limiter.acquire(KEY, 100)
    limiter.learn_from_message(refused, LimitMessage("tokens", 60.0, 30000.0, None, 34307.0, too_large=True))
    limiter.settle(refused, 0)
    with pytest.raises(RequestTooLarge):
        limiter.acquire(KEY, 31000)


# -- the server's count of a request's cost -------------------------------------------------------


def test_calibration_takes_the_median_within_bounds() -> None:
    calibration = Calibration()
    assert calibration.charge(100) == 100
    for charged in (130, 125, 400000, 128):  # one sample skewed by another process: dropped
        calibration.add(charged, 100)
    assert calibration.factor == pytest.approx(1.28, abs=0.03)
    assert calibration.charge(100) == 128
    calibration.add(10, 100)  # below any plausible ratio: dropped
    assert calibration.samples == 3


def test_a_request_counted_alone_calibrates_what_later_calls_book() -> None:
    clock = FakeClock()
    limiter = make(clock, tpm=60_000)  # 1,000 tokens per second
    quiet = limiter.acquire(KEY, 100)
    assert quiet.quiet
    # The server counted 150 for it: its bucket is full again 150 ms later.
    limiter.observe(quiet, headers(limit_tokens="60000", remaining_tokens="59850", reset_tokens="150ms"))
    limiter.settle(quiet, 100)
    assert limiter.cost_factor(KEY) == pytest.approx(1.5)
    busy = limiter.acquire(KEY, 100)
    assert busy.tokens == 150 and busy.estimate == 100
    burst = limiter.token_burst(KEY)
    assert burst is not None and burst == pytest.approx(limiter.snapshot()["gpt-test"]["tokens_burst"] / 1.5)
    with pytest.raises(RequestTooLarge):
        limiter.acquire(KEY, 41_000)  # 61,500 by the server's count: more than 60,000
    assert "cost x1.50" in repr(limiter)


def test_requests_sent_while_others_are_in_flight_do_not_calibrate() -> None:
    clock = FakeClock()
    limiter = make(clock, tpm=60_000)
    first = limiter.acquire(KEY, 100)
    second = limiter.acquire(KEY, 100)
    assert first.quiet and not second.quiet
    limiter.observe(second, headers(limit_tokens="60000", remaining_tokens="59500", reset_tokens="500ms"))
    limiter.settle(second, 100)
    assert limiter.cost_factor(KEY) == 1.0


def test_a_tokens_429_message_is_the_servers_own_count() -> None:
    clock = FakeClock()
    limiter = make(clock, tpm=60_000)
    reservation = limiter.acquire(KEY, 1000)
    limiter.learn_from_message(reservation, LimitMessage("tokens", 60.0, 60000.0, 59000.0, 1300.0))
    limiter.settle(reservation, 0)
    assert limiter.cost_factor(KEY) == pytest.approx(1.3)


# -- retry hints as real servers send them --------------------------------------------------------


def test_a_zero_hint_never_overrides_a_positive_one() -> None:
    # An Azure AI Foundry 429: retry-after 1 with retry-after-ms 0. Read as "now", three retries took 45 ms.
    assert parse_retry_after({"retry-after": "1", "retry-after-ms": "0"}) == 1.0
    assert parse_retry_after({"retry-after": "0", "retry-after-ms": "0"}) == 0.0
    assert parse_retry_after({"retry-after-ms": "0"}) == 0.0
    assert parse_retry_after({"retry-after": "2", "retry-after-ms": "1500"}) == 1.5


def test_bare_integer_resets_are_milliseconds() -> None:
    # Azure, a 120 RPM deployment: "500" and "7" fit milliseconds; as seconds they would be absurd.
    parsed = headers(reset_requests="500", reset_tokens="7")
    assert parsed.reset_requests == pytest.approx(0.5)
    assert parsed.reset_tokens == pytest.approx(0.007)
    assert headers(reset_requests="0.5").reset_requests == pytest.approx(0.5)  # a decimal is seconds
    assert headers(reset_tokens="33h57m29.556s").reset_tokens == pytest.approx(122249.556)


def test_the_burst_is_learned_from_the_servers_reset_not_from_our_count_of_the_cost() -> None:
    # A server that counts a request as 639 while we booked 852: "remaining + what we booked" would claim
    # a bucket of 1,311 where the server holds 1,000 (a one-second slice of 60,000 TPM), and the next
    # batch packed to that burst would draw a 429. The reset says how much is missing in its own units.
    clock = FakeClock()
    limiter = make(clock, tpm=60_000)
    reservation = limiter.acquire(KEY, 852)
    limiter.observe(reservation, headers(limit_tokens="60000", remaining_tokens="361", reset_tokens="639ms"))
    limiter.settle(reservation, 852)
    burst = limiter.snapshot()["gpt-test"]["tokens_burst"]
    assert burst <= 1000


def test_refunds_are_learned_from_what_the_server_consumed() -> None:
    # 100 tokens booked per request, 60 of them over-booked; the server refills 10 per second.
    refunding, keeping = Refunds(), Refunds()
    assert refunding.share == 1.0 and not refunding.seen_refunding
    for second in range(7):
        booked, overbooked = 100.0 * second, 60.0 * second
        # A refunding server consumed 40 per request, one that keeps the estimate 100; both refill 10/s.
        refunding.observe(float(second), 700 - 40 * second + 10 * second, booked, overbooked, 10.0, 1000.0)
        keeping.observe(float(second), 700 - 100 * second + 10 * second, booked, overbooked, 10.0, None)
    assert refunding.share == pytest.approx(1.0) and refunding.seen_refunding
    assert keeping.share == pytest.approx(0.0) and not keeping.seen_refunding
    idle = Refunds()  # a bucket near full loses refill: that must not read as refunds withheld
    for second in range(7):
        idle.observe(float(second), 990.0, 100.0 * second, 60.0 * second, 10.0, 1000.0)
    assert idle.share == 1.0 and not idle.seen_refunding


@pytest.mark.parametrize("refunds", [True, False])
def test_settling_follows_whether_the_server_refunds(refunds: bool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from throttled_openai import ThrottledClient
    from throttled_openai.testing import FakeOpenAI

    with FakeOpenAI(rpm=6000, tpm=30_000, bucket_seconds=1.0, settle_usage=refunds, latency=0.02) as server:
        client = ThrottledClient(base_url=server.base_url, api_key="sk-test", rpm=6000, tpm=30_000)

        def call(i: int) -> object:
            messages = [{"role": "user", "content": f"line {i}"}]
            return client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=60)

        deadline = time.monotonic() + 5.0
        with ThreadPoolExecutor(8) as pool:
            while time.monotonic() < deadline:
                list(pool.map(call, range(16)))
        share = client.limiter.snapshot()["gpt-4o-mini"]["refund_share"]
        rate_limited, requests = server.stats()["rate_limited"], server.stats()["requests"]
    assert share == (pytest.approx(1.0, abs=0.2) if refunds else pytest.approx(0.0, abs=0.2))
    # Settling that ignored a server keeping estimates charged drew 22 % 429s. Until the share is learned
    # (a few seconds) settling assumes refunds, so a slow run (52 requests on a loaded CI machine) may
    # draw a few at its start: a bound well under the defect's rate, with room for that warm-up.
    assert rate_limited <= max(6, 0.1 * requests), (rate_limited, requests)
