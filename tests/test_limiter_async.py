"""The limiter's asyncio face: one line for threads and for tasks of any event loop, waited in without
a thread per caller, and left at once (giving back what was held) by a task that is cancelled."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

import pytest

from throttled_openai import RateLimiter, RateLimitTimeout, Reservation
from throttled_openai.waiting import TaskWaiter

KEY = ("acct", "gpt-test")


def waiting(limiter: RateLimiter) -> int:
    """Callers in line, the head included."""
    return int(limiter.snapshot().get(KEY[1], {}).get("waiting", 0))


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


async def await_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_threads_and_tasks_of_two_loops_share_one_budget() -> None:
    rate = 20.0  # requests per second
    limiter = RateLimiter(rpm=rate * 60, headroom=0.0, initial_burst=0.3)
    taken: List[Reservation] = []
    lock = threading.Lock()

    def thread_calls() -> None:
        for _ in range(8):
            reservation = limiter.acquire(KEY, 0)
            with lock:
                taken.append(reservation)

    async def task_calls() -> None:
        async def one() -> None:
            reservation = await limiter.aacquire(KEY, 0)
            with lock:
                taken.append(reservation)

        await asyncio.gather(*(one() for _ in range(8)))

    workers = [threading.Thread(target=thread_calls) for _ in range(2)]
    workers += [threading.Thread(target=asyncio.run, args=(task_calls(),)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(taken) == 32
    stamps = sorted(r.ready_at for r in taken)
    burst = max(rate * 0.3 - 0.15 * rate, 1.0) + 1  # the first burst, and one for rounding
    for i, stamp in enumerate(stamps):  # never more than the burst plus the refill since the first
        assert i + 1 <= burst + (stamp - stamps[0]) * rate + 1e-6
    assert waiting(limiter) == 0


def test_a_thread_and_a_task_are_served_in_the_order_they_came() -> None:
    limiter = RateLimiter(rpm=120, headroom=0.0, initial_burst=0.5)  # 2 per second, a burst of 1
    limiter.acquire(KEY, 0)  # the burst is spent: the next ones wait, in line
    order: List[str] = []

    def thread_call() -> None:
        limiter.acquire(KEY, 0)
        order.append("thread")

    thread = threading.Thread(target=thread_call)
    thread.start()
    wait_until(lambda: waiting(limiter) == 1)

    async def task_call() -> None:
        await limiter.aacquire(KEY, 0)
        order.append("task")

    asyncio.run(task_call())
    thread.join(30)
    assert order == ["thread", "task"]


def test_a_cancelled_task_leaves_the_line_at_once_and_the_next_goes() -> None:
    limiter = RateLimiter(rpm=60, headroom=0.0, initial_burst=0.5)  # 1 per second, a burst of 1

    async def main() -> Tuple[float, int]:
        limiter.acquire(KEY, 0)
        head = asyncio.ensure_future(limiter.aacquire(KEY, 0))  # waits about a second, at the head
        behind = asyncio.ensure_future(limiter.aacquire(KEY, 0))  # in line behind it
        await await_until(lambda: waiting(limiter) == 2)
        behind.cancel()
        with pytest.raises(asyncio.CancelledError):
            await behind
        left = waiting(limiter)
        head.cancel()  # the head too, while it waits for the refill
        with pytest.raises(asyncio.CancelledError):
            await head
        started = time.monotonic()
        await limiter.aacquire(KEY, 0)  # nothing was taken by the two: one request's refill away at most
        return time.monotonic() - started, left

    took, left = asyncio.run(main())
    assert left == 1
    assert took < 1.5
    assert waiting(limiter) == 0


def test_wait_for_and_timeout_take_nothing() -> None:
    limiter = RateLimiter(tpm=6_000, headroom=0.0, initial_burst=1.15)  # 100 tokens per second, a burst of 100

    async def main() -> None:
        await limiter.aacquire(KEY, 100)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(limiter.aacquire(KEY, 100), 0.2)
        with pytest.raises(RateLimitTimeout):  # a whole second away: refused at once
            await limiter.aacquire(KEY, 100, timeout=0.1)

    asyncio.run(main())
    assert waiting(limiter) == 0
    level = limiter.snapshot()[KEY[1]]["tokens_level"]
    assert level > -1  # the timed-out calls took no tokens


def test_a_turn_granted_to_a_task_cancelled_in_the_same_loop_turn_is_passed_on() -> None:
    limiter = RateLimiter(rpm=60, headroom=0.0, initial_burst=0.5)

    async def main() -> None:
        first = await limiter.aacquire(KEY, 0)
        head = asyncio.ensure_future(limiter.aacquire(KEY, 0))
        second = asyncio.ensure_future(limiter.aacquire(KEY, 0))
        third = asyncio.ensure_future(limiter.aacquire(KEY, 0))
        await await_until(lambda: waiting(limiter) == 3)
        head.cancel()  # the head gives its turn to `second` as it leaves ...
        with pytest.raises(asyncio.CancelledError):
            await head
        state = limiter._keys[KEY]
        with limiter._lock:  # ... and `second` is granted, then cancelled before it runs
            assert len(state.line) == 1
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        limiter.cancel(first)
        assert isinstance(await asyncio.wait_for(third, 10), Reservation)  # the turn reached it

    asyncio.run(main())
    assert waiting(limiter) == 0


def test_no_thread_is_blocked_per_waiting_task() -> None:
    limiter = RateLimiter(rpm=60, headroom=0.0, initial_burst=0.5)
    threads_before = threading.active_count()

    async def main() -> int:
        await limiter.aacquire(KEY, 0)
        tasks = [asyncio.ensure_future(limiter.aacquire(KEY, 0)) for _ in range(200)]
        await await_until(lambda: waiting(limiter) == 200)
        during = threading.active_count()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return during

    assert asyncio.run(main()) <= threads_before + 1  # (an executor thread, at most)
    assert waiting(limiter) == 0


def test_a_settle_from_a_thread_wakes_a_task_at_the_head() -> None:
    limiter = RateLimiter(tpm=600, headroom=0.0, initial_burst=1.15)  # 10 tokens per second, a burst of 10
    reservation = limiter.acquire(KEY, 10)  # all of it, on the main thread

    async def main() -> float:
        started = time.monotonic()
        waiter = asyncio.ensure_future(limiter.aacquire(KEY, 10))  # 1 s away, unless the estimate is refunded
        await await_until(lambda: waiting(limiter) == 1)
        threading.Thread(target=limiter.settle, args=(reservation, 0)).start()  # used nothing: refund it all
        await waiter
        return time.monotonic() - started

    assert asyncio.run(main()) < 0.8


def test_a_waiter_of_a_closed_loop_is_skipped_when_the_turn_passes() -> None:
    async def make() -> TaskWaiter:
        return TaskWaiter()

    loop = asyncio.new_event_loop()
    dead = loop.run_until_complete(make())
    loop.close()
    assert dead.set() is False  # nobody can ever wake on it

    limiter = RateLimiter(rpm=60, headroom=0.0, initial_burst=0.5)
    first = limiter.acquire(KEY, 0)
    got: List[Optional[Reservation]] = []

    def thread_call() -> None:
        got.append(limiter.acquire(KEY, 0, timeout=20))

    from throttled_openai.limiter import _Ticket

    state = limiter._keys[KEY]
    with limiter._lock:  # a task of a loop that was closed while it waited, ahead in line
        state.head = True
        state.line.append(_Ticket(0, dead))
    thread = threading.Thread(target=thread_call)
    thread.start()
    wait_until(lambda: len(state.line) == 2)
    with limiter._lock:
        limiter._pass_head(state)  # the head leaves: the dead ticket is skipped
    thread.join(20)
    assert got and isinstance(got[0], Reservation)
    limiter.cancel(first)


def test_the_async_faces_of_the_bookkeeping_agree_with_the_sync_ones() -> None:
    sync_limiter = RateLimiter(rpm=600, tpm=60_000)
    async_limiter = RateLimiter(rpm=600, tpm=60_000)

    async def run_async() -> Any:
        r = await async_limiter.aacquire(KEY, 500)
        await async_limiter.asettle(r, 100)
        c = await async_limiter.aacquire(KEY, 200)
        await async_limiter.acancel(c)
        return (
            await async_limiter.arequest_rate(KEY),
            await async_limiter.alimits_known(KEY),
            await async_limiter.atoken_burst(KEY),
        )

    r = sync_limiter.acquire(KEY, 500)
    sync_limiter.settle(r, 100)
    sync_limiter.cancel(sync_limiter.acquire(KEY, 200))
    expected = (sync_limiter.request_rate(KEY), sync_limiter.limits_known(KEY), sync_limiter.token_burst(KEY))
    assert asyncio.run(run_async()) == expected
    sync_level = sync_limiter.snapshot()[KEY[1]]["tokens_level"]
    async_level = async_limiter.snapshot()[KEY[1]]["tokens_level"]
    assert async_level == pytest.approx(sync_level, abs=50)  # the same, up to the refill between the two


def test_a_task_skipped_because_its_loop_closed_never_passes_the_head_again() -> None:
    limiter = RateLimiter(rpm=60, headroom=0.0, initial_burst=0.5)  # 1 per second, a burst of 1
    limiter.acquire(KEY, 0)
    state = limiter._keys[KEY]
    order: List[str] = []

    def call(name: str) -> None:
        limiter.acquire(KEY, 0, timeout=20)
        order.append(name)

    first = threading.Thread(target=call, args=("first",))
    first.start()  # the head, for a second
    wait_until(lambda: waiting(limiter) == 1)
    loop = asyncio.new_event_loop()
    task = loop.create_task(limiter.aacquire(KEY, 0))  # in line behind it, then its loop is closed
    loop.run_until_complete(asyncio.sleep(0.05))
    loop.close()
    second = threading.Thread(target=call, args=("second",))
    second.start()
    wait_until(lambda: waiting(limiter) == 3)
    first.join(20)  # the turn skips the task of the closed loop: `second` is the head now, for a second
    del task, loop
    gc.collect()  # the task's clean-up runs now: it never held the head and must not pass it on
    assert state.head
    third = threading.Thread(target=call, args=("third",))
    third.start()
    wait_until(lambda: len(state.line) == 1 or bool(order[1:]), timeout=10)  # in line behind `second`
    second.join(20)
    third.join(20)
    assert order == ["first", "second", "third"]
    assert waiting(limiter) == 0


def test_a_head_task_whose_loop_was_closed_under_it_gives_way() -> None:
    limiter = RateLimiter(rpm=60, headroom=0.0, initial_burst=0.5)  # 1 per second, a burst of 1
    limiter.acquire(KEY, 0)
    loop = asyncio.new_event_loop()
    head = loop.create_task(limiter.aacquire(KEY, 0))  # the head, waiting for the refill; then its loop closes
    loop.run_until_complete(asyncio.sleep(0.05))
    loop.close()
    started = time.monotonic()
    limiter.acquire(KEY, 0, timeout=10)  # goes when capacity is back, not never
    assert time.monotonic() - started < 5
    assert waiting(limiter) == 0 and not head.done()
