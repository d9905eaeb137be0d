"""AsyncThrottledClient end to end: the real openai SDK's asyncio client over real HTTP against the fake
server. Each test is a plain function that runs its coroutine with asyncio.run (no pytest plugin)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, List, Set, Tuple, TypeVar

import openai
import pytest

from throttled_openai import (
    AsyncThrottledAzureClient,
    AsyncThrottledClient,
    IncompleteStream,
    Limits,
    MalformedResponse,
    RateLimiter,
    RateLimitTimeout,
    RequestTooLarge,
    Retry,
    ThrottledClient,
)
from throttled_openai.context import current
from throttled_openai.testing import FakeOpenAI

KEY = "sk-async-SECRETKEY-0123456789"
HAS_RESPONSES = hasattr(openai.AsyncOpenAI, "responses")
needs_responses = pytest.mark.skipif(not HAS_RESPONSES, reason="the Responses API came with openai 1.66")
FAST = Retry(backoff_base=0.01, backoff_max=0.05)
MODEL = "gpt-4o-mini"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
USAGE = {"stream": True, "stream_options": {"include_usage": True}}

_R = TypeVar("_R")


def run(body: Callable[[], Awaitable[_R]]) -> _R:
    """Run one test's coroutine on a fresh event loop, as an application would."""
    return asyncio.run(body())  # type: ignore[arg-type]


@pytest.fixture
def server(make_server: Callable[..., FakeOpenAI]) -> FakeOpenAI:
    return make_server(rpm=6000, tpm=1_000_000)


@pytest.fixture
def one_per_second(make_server: Callable[..., FakeOpenAI]) -> FakeOpenAI:
    """A server that allows one request per second and no burst: the second call must wait."""
    return make_server(rpm=60, bucket_seconds=1.0)


def client_for(server: FakeOpenAI, **kwargs: Any) -> AsyncThrottledClient:
    kwargs.setdefault("retry", FAST)
    return AsyncThrottledClient(base_url=server.base_url, api_key=KEY, **kwargs)


def clean(limiter: RateLimiter, model: str = MODEL) -> Tuple[int, int]:
    """(callers waiting, reservations not yet ended) of a model: (0, 0) once every call is over."""
    state = next(s for (_, m), s in limiter._keys.items() if m == model)
    return limiter.snapshot()[model]["waiting"], state.in_flight


# -- the plain path ----------------------------------------------------------------------------------


def test_every_endpoint_passes_the_limiter_and_settles_usage(server: FakeOpenAI) -> None:
    async def body() -> None:
        async with client_for(server, rpm=6000, tpm=1_000_000) as client:
            chat = await client.chat.completions.create(**CHAT)
            assert chat.choices[0].message.content == "echo:hello#0"
            completion = await client.completions.create(
                model="gpt-3.5-turbo-instruct", prompt=["a", "b"], max_tokens=3
            )
            embedding = await client.embeddings.create(model="text-embedding-3-small", input=["x", "y"])
            used = chat.usage.total_tokens + completion.usage.total_tokens + embedding.usage.total_tokens
            if HAS_RESPONSES:
                response = await client.responses.create(model=MODEL, input="hello", max_output_tokens=5)
                assert "echo" in response.output_text
                used += response.usage.total_tokens
            assert (await client.models.list()).data
            stats = client.stats()
            calls = 4 + HAS_RESPONSES
            assert (stats.calls, stats.requests, stats.retries, stats.failures) == (calls, calls, 0, 0)
            assert stats.tokens_used == used and stats.tokens_reserved >= used
            assert set(client.limiter.snapshot()) == {MODEL, "gpt-3.5-turbo-instruct", "text-embedding-3-small", "*"}
            assert clean(client.limiter) == (0, 0)

    run(body)


def test_limits_are_learned_from_headers_and_the_sdk_retries_stay_off(server: FakeOpenAI) -> None:
    async def body() -> None:
        client = client_for(server, retry=FAST.replace(max_retries=1))
        assert client.max_retries == 1
        await client.chat.completions.create(**CHAT)
        state = client.limiter.snapshot()[MODEL]
        assert (state["requests_limit"], state["tokens_limit"]) == (6000, 1_000_000)
        server.inject("500", 5)
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(**CHAT)
        assert server.stats()["requests"] == 1 + 2  # 1 + 1 attempts, not (1 + 1) ** 2
        await client.close()

    run(body)


@pytest.mark.parametrize(("limits", "calls"), [({"rpm": 1200}, 60), ({"tpm": 24_000}, 60)])
def test_many_tasks_stay_under_a_strict_limit(limits: dict, calls: int) -> None:
    """RPM-bound (20 requests a second) and TPM-bound (400 tokens a second, ~13 a call): every task at once."""
    with FakeOpenAI(**limits, bucket_seconds=1.0, latency=0.005) as server:

        async def body() -> None:
            async with client_for(server, **limits) as client:
                # A first call pays the client's set-up (openai 2.x looks up the platform in a thread):
                # then all at once.
                await client.chat.completions.create(**CHAT)
                results = await asyncio.gather(*(client.chat.completions.create(**CHAT) for _ in range(calls)))
                assert len(results) == calls and all(r.choices for r in results)
                assert client.stats().calls == calls + 1 and clean(client.limiter) == (0, 0)

        run(body)
        stats = server.stats()
        assert stats["admitted"] == calls + 1
        # A rare 429 from scheduling jitter on a loaded machine is retried, never lost.
        assert stats["rate_limited"] <= calls // 6


def test_unknown_limits_are_probed_before_a_stampede() -> None:
    with FakeOpenAI(rpm=600, tpm=1_000_000, bucket_seconds=1.0) as server:

        async def body() -> None:
            async with client_for(server) as client:
                await asyncio.gather(*(client.chat.completions.create(**CHAT) for _ in range(30)))

        run(body)
        assert server.stats()["admitted"] == 30 and server.stats()["rate_limited"] <= 3


# -- settling against usage ----------------------------------------------------------------------------


def test_streams_are_settled_against_their_usage_when_they_end(server: FakeOpenAI) -> None:
    async def body() -> None:
        client = client_for(server, limiter=RateLimiter(tpm=100_000, initial_burst=60.0))
        stream = await client.chat.completions.create(**CHAT, **USAGE)
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo:hello#0"
        used = chunks[-1].usage.total_tokens
        assert client.stats().tokens_used == used > 0 and clean(client.limiter) == (0, 0)
        # Without usage in the stream the estimate stays charged: nothing refunded, nothing lost.
        level = client.limiter.snapshot()[MODEL]["tokens_level"]
        async for _ in await client.chat.completions.create(**{**CHAT, "max_tokens": 5000}, stream=True):
            pass
        assert client.stats().tokens_used == used and clean(client.limiter) == (0, 0)
        assert client.limiter.snapshot()[MODEL]["tokens_level"] <= level - 3000
        await client.close()

    run(body)


def test_a_stream_left_early_is_settled_once_without_complaint(server: FakeOpenAI) -> None:
    async def body() -> None:
        client = client_for(server)
        stream = await client.chat.completions.create(**CHAT, stream=True)
        async for _ in stream:
            break
        await stream.close()
        await stream.close()
        stats = client.stats()
        assert (stats.errors, stats.failures) == ({}, 0) and clean(client.limiter) == (0, 0)
        await client.close()

    run(body)


@pytest.mark.parametrize("stream", [False, True])
def test_with_streaming_response_is_settled_when_read(server: FakeOpenAI, stream: bool) -> None:
    async def body() -> None:
        client = client_for(server)
        extra = USAGE if stream else {}
        async with client.chat.completions.with_streaming_response.create(**CHAT, **extra) as response:
            assert b"".join([part async for part in response.iter_bytes()])
        assert client.stats().tokens_used > 0 and clean(client.limiter) == (0, 0)
        # Closed unread: no usage seen, the estimate stays charged.
        async with client.chat.completions.with_streaming_response.create(**CHAT, **extra) as response:
            assert response.status_code == 200
        assert clean(client.limiter) == (0, 0) and client.stats().calls == 2
        await client.close()

    run(body)


class CountingLimiter(RateLimiter):
    """Records each reservation the async face settles."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settled: List[Any] = []

    async def asettle(self, reservation: Any, used_tokens: Any) -> None:
        self.settled.append(reservation)
        await super().asettle(reservation, used_tokens)


def test_every_way_a_stream_ends_settles_it_once_through_the_async_face(server: FakeOpenAI) -> None:
    """However the SDK ends a body (read to its end in 1.x, closed after the final event in 2.x, read a
    second time then closed in 3.57, closed early, never read, cut), it is settled exactly once."""
    limiter = CountingLimiter()

    async def body() -> None:
        client = client_for(server, limiter=limiter)
        chat = client.chat.completions
        async for _ in await chat.create(**CHAT, **USAGE):
            pass
        stream = await chat.create(**CHAT, stream=True)
        async for _ in stream:
            break
        await stream.close()
        async with chat.with_streaming_response.create(**CHAT, **USAGE) as response:
            await response.read()
        async with chat.with_streaming_response.create(**CHAT) as response:
            pass
        server.inject("stream_cut", 1)
        with pytest.raises(IncompleteStream):
            async for _ in await chat.create(**CHAT, **USAGE):
                pass
        await asyncio.sleep(0.1)  # anything left to run in the loop runs (3.57 drains in a task)
        assert clean(limiter) == (0, 0) and client.stats().calls == 5
        await client.close()

    run(body)
    assert len(limiter.settled) == len({id(r) for r in limiter.settled}) == 5


def test_raw_responses_are_checked_and_settled_against_their_usage(server: FakeOpenAI) -> None:
    async def body() -> None:
        client = client_for(server)
        server.inject("html_200", 1)
        raw = await client.chat.completions.with_raw_response.create(**CHAT)
        assert client.stats().tokens_used == raw.parse().usage.total_tokens > 0
        assert client.stats().errors == {"malformed_response": 1}
        await client.close()

    run(body)


@needs_responses
def test_a_streamed_responses_call_is_settled_against_its_usage(server: FakeOpenAI) -> None:
    async def body() -> None:
        client = client_for(server, limiter=RateLimiter(tpm=60_000, initial_burst=60.0))
        stream = await client.responses.create(model=MODEL, input="hello", max_output_tokens=4000, stream=True)
        completed = [e async for e in stream if e.type == "response.completed"]
        used = completed[0].response.usage.total_tokens
        assert client.stats().tokens_used == used > 0
        # The ~4,000 tokens booked were given back, down to what was used.
        assert client.limiter.snapshot()[MODEL]["tokens_level"] >= 60_000 - used - 1500
        await client.close()

    run(body)


def test_a_cut_stream_raises_where_it_is_read(server: FakeOpenAI) -> None:
    async def body() -> None:
        client = client_for(server)
        server.inject("stream_cut", 1)
        stream = await client.chat.completions.create(**CHAT, **USAGE)
        with pytest.raises(IncompleteStream, match="final event"):
            async for _ in stream:
                pass
        stats = client.stats()
        assert (stats.errors, stats.failures, stats.tokens_used) == ({"incomplete_stream": 1}, 1, 0)
        assert clean(client.limiter) == (0, 0)
        await client.close()

    run(body)


# -- failures, retries, waits ----------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["500", "503", "drop", "truncate", "html_200", "429", "429_message_only"])
def test_transient_faults_are_retried(server: FakeOpenAI, fault: str) -> None:
    async def body() -> None:
        client = client_for(server)
        server.inject(fault)
        assert (await client.chat.completions.create(**CHAT)).choices
        assert client.stats().retries == 1 and clean(client.limiter) == (0, 0)
        await client.close()

    run(body)
    bodies = [entry["body"] for entry in server.requests_log]
    assert len(bodies) == 2 and bodies[0] == bodies[1]  # the retry sends the same request


def test_a_bad_body_is_raised_as_malformed_once_the_policy_gives_up(server: FakeOpenAI) -> None:
    async def body() -> None:
        client = client_for(server, retry=Retry(max_retries=1, backoff_base=0.01, backoff_max=0.02))
        server.inject("html_200", 2)
        with pytest.raises(MalformedResponse):
            await client.chat.completions.create(**CHAT)
        assert client.stats().failures == 1 and server.stats()["requests"] == 2
        await client.close()

    run(body)


def test_a_rate_limit_429_pauses_the_key_for_retry_after(server: FakeOpenAI) -> None:
    async def body() -> None:
        client = client_for(server, rpm=6000)
        server.inject("429")  # retry-after-ms: 200
        started = time.monotonic()
        await asyncio.gather(*(client.chat.completions.create(**CHAT) for _ in range(3)))
        assert time.monotonic() - started >= 0.2
        assert client.stats().rate_limited == {"rate_limit_requests": 1}
        await client.close()

    run(body)
    # After the 429, the key was paused: every request sent later came after the server's delay.
    assert server.stats()["requests"] == 4


#: Faults never retried -> what the SDK raises, and its message: insufficient_quota, a "Request too
#: large" 429, a 400.
HOPELESS = {
    "quota": (openai.RateLimitError, "exceeded your current quota"),
    "too_large": (openai.RateLimitError, "Request too large"),
    "400": (openai.BadRequestError, "Invalid request"),
}


@pytest.mark.parametrize("fault", sorted(HOPELESS))
def test_hopeless_errors_are_raised_at_once(server: FakeOpenAI, fault: str) -> None:
    error, text = HOPELESS[fault]

    async def body() -> None:
        client = client_for(server, retry=Retry(max_retries=10))
        server.inject(fault, count=5)
        with pytest.raises(error, match=text):
            await client.chat.completions.create(**CHAT)
        assert client.stats().retries == 0 and client.stats().failures == 1
        await client.close()

    run(body)
    assert server.stats()["requests"] == 1


def test_a_request_larger_than_the_limit_fails_before_sending(server: FakeOpenAI) -> None:
    async def body() -> None:
        client = client_for(server, tpm=1000)
        with pytest.raises(RequestTooLarge, match="gpt-4o-mini"):
            await client.chat.completions.create(**{**CHAT, "max_tokens": 5000})
        assert client.stats().failures == 1
        await client.close()

    run(body)
    assert server.stats()["requests"] == 0


def test_max_wait_raises_rate_limit_timeout_with_a_retry_after_hint(one_per_second: FakeOpenAI) -> None:
    async def body() -> None:
        client = client_for(one_per_second, rpm=60, max_wait=0.2)
        await client.chat.completions.create(**CHAT)
        with pytest.raises(RateLimitTimeout) as info:
            await client.chat.completions.create(**CHAT)
        assert 0.5 < info.value.retry_after <= 1.5
        assert clean(client.limiter) == (0, 0)
        await client.close()

    run(body)
    assert one_per_second.stats()["requests"] == 1


def test_a_429_asking_longer_than_max_wait_raises_rate_limit_timeout(one_per_second: FakeOpenAI) -> None:
    async def body() -> None:
        # Another process used the budget: this client's limiter knows nothing yet, so its call goes and
        # draws the server's 429, asking for about a second.
        async with client_for(one_per_second) as other:
            await other.chat.completions.create(**CHAT)
        async with client_for(one_per_second, max_wait=0.3) as client:
            with pytest.raises(RateLimitTimeout) as info:
                await client.chat.completions.create(**CHAT)
        assert isinstance(info.value.__cause__, openai.RateLimitError) and info.value.retry_after > 0.3

    run(body)
    assert one_per_second.stats()["rate_limited"] == 1


# -- copies, Azure, shared limiters, the client's own HTTP client ------------------------------------------


def test_copies_share_limiter_and_counters(server: FakeOpenAI) -> None:
    async def body() -> None:
        client = client_for(server, rpm=6000)
        quick = client.with_options(timeout=5, max_retries=1)
        assert isinstance(quick, AsyncThrottledClient) and quick.limiter is client.limiter
        assert quick.max_retries == 1 and client.max_retries == FAST.max_retries
        server.inject("500", 5)
        with pytest.raises(openai.InternalServerError):
            await quick.chat.completions.create(**CHAT)
        assert server.stats()["requests"] == 2
        waiting = client.copy(max_wait=3.0)
        assert waiting.max_wait == 3.0 and client.max_wait is None
        await waiting.chat.completions.create(**CHAT)  # the other 3 faults, retried, then served
        assert client.stats().calls == 2 and client.stats().failures == 1
        await client.close()

    run(body)
    assert server.stats()["requests"] == 6


def test_azure_limits_are_keyed_per_deployment() -> None:
    with FakeOpenAI(rpm=600, tpm=100_000, azure=True) as server:
        azure = {"azure_endpoint": server.azure_endpoint, "api_key": KEY, "api_version": "2024-06-01"}

        async def body() -> None:
            client = AsyncThrottledAzureClient(**azure, azure_deployment="my-deployment", rpm=600, tpm=100_000)
            free = AsyncThrottledAzureClient(**azure)
            async with client, free:
                server.inject("429")  # Azure's: retry-after-ms and x-ms-retry-after-ms, no retry-after
                await client.chat.completions.create(**CHAT)
                await free.chat.completions.create(**{**CHAT, "model": "other-deployment"})
                assert client.stats().rate_limited == {"rate_limit_requests": 1}
                assert set(client.limiter.snapshot()) == {"my-deployment"}
                assert set(free.limiter.snapshot()) == {"other-deployment"}
                assert isinstance(free.with_options(timeout=3), AsyncThrottledAzureClient)

        run(body)


def test_one_limiter_serves_threads_and_tasks_together() -> None:
    """A ThrottledClient in 8 threads and an AsyncThrottledClient with 40 tasks, one RateLimiter: the
    server's strict limit (20 requests a second) holds for all of them together."""
    limiter = RateLimiter(limits={MODEL: Limits(rpm=1200, tpm=1_000_000)})
    with FakeOpenAI(rpm=1200, tpm=1_000_000, bucket_seconds=1.0, latency=0.005) as server:
        threaded = ThrottledClient(base_url=server.base_url, api_key=KEY, limiter=limiter, retry=FAST)

        async def tasks() -> None:
            async with client_for(server, limiter=limiter) as client:
                await asyncio.gather(*(client.chat.completions.create(**CHAT) for _ in range(40)))

        with ThreadPoolExecutor(9) as pool:
            looped = pool.submit(run, tasks)
            list(pool.map(lambda _: threaded.chat.completions.create(**CHAT), range(40)))
            looped.result()
        stats = server.stats()
        assert stats["admitted"] == 80 and stats["rate_limited"] <= 8
        assert clean(limiter) == (0, 0)


def test_the_client_closes_the_http_client_it_made_and_leaves_a_given_one_open(server: FakeOpenAI) -> None:
    async def body() -> None:
        async with client_for(server) as client:
            await client.chat.completions.create(**CHAT)
        assert client.is_closed()
        given = openai.DefaultAsyncHttpxClient()
        mine = client_for(server, http_client=given)
        await mine.chat.completions.create(**CHAT)
        assert mine.limiter.snapshot()[MODEL]["requests_limit"] == 6000  # the hooks went on the given client
        del mine
        assert not given.is_closed
        await given.aclose()

    run(body)


def test_an_http_client_of_ours_dropped_unclosed_closes_itself_only_in_a_running_loop(server: FakeOpenAI) -> None:
    async def body() -> None:
        client = client_for(server)
        await client.chat.completions.create(**CHAT)
        http = client._client  # the SDK's attribute for it
        http.__del__()  # what collecting it while the loop runs does: a task closes it
        await asyncio.sleep(0.1)
        assert http.is_closed

    run(body)
    idle = client_for(server)._client
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idle.__del__()  # no loop to close it on: silently nothing
    assert not idle.is_closed


def test_the_key_never_shows(server: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        client = client_for(server, rpm=6000)
        server.inject("500")
        with caplog.at_level(logging.DEBUG, logger="throttled_openai"):
            await client.chat.completions.create(**CHAT)
        assert caplog.records  # the retry was logged
        shown = [repr(client), repr(client.limiter), repr(client.stats()), caplog.text]
        assert not any("SECRETKEY" in text for text in shown)
        await client.close()

    run(body)


# -- the call context and cancellation ---------------------------------------------------------------------


def test_a_hundred_concurrent_calls_each_see_their_own_attempt() -> None:
    """The response hook finds its call's attempt among 100 on one thread: the call context is a
    ContextVar, so each task sees its own."""
    seen: List[Tuple[Any, bool, Any]] = []  # the objects themselves, kept alive: their ids stay unique

    async def spy(response: Any) -> None:  # runs after the client's own hook, in the calling task
        attempt = current.attempt
        seen.append((attempt, attempt.response is response, attempt.reservation))

    with FakeOpenAI(latency=0.05) as server:

        async def body() -> None:
            http = openai.DefaultAsyncHttpxClient()
            client = client_for(server, http_client=http)
            http.event_hooks = {
                "request": http.event_hooks["request"],
                "response": [*http.event_hooks["response"], spy],
            }
            prompts = [f"p{i}" for i in range(100)]
            replies = await asyncio.gather(
                *(
                    client.chat.completions.create(**{**CHAT, "messages": [{"role": "user", "content": p}]})
                    for p in prompts
                )
            )
            assert [r.choices[0].message.content for r in replies] == [f"echo:{p}#0" for p in prompts]
            await http.aclose()
            assert clean(client.limiter) == (0, 0)

        run(body)
    assert len(seen) == 100 and all(own for _, own, _ in seen)
    attempts: Set[int] = {id(attempt) for attempt, _, _ in seen}
    reservations = {id(reservation) for _, _, reservation in seen}
    assert len(attempts) == len(reservations) == 100


def test_context_fields_are_per_task() -> None:
    async def one(i: int) -> Tuple[int, float]:
        current.cost = i
        current.waited += i
        await asyncio.sleep(0.01)
        return current.cost or 0, current.waited

    async def body() -> List[Tuple[int, float]]:
        return list(await asyncio.gather(*(one(i) for i in range(100))))

    waited = current.waited
    assert run(body) == [(i, waited + i) for i in range(100)]  # each task starts from a copy of ours
    assert current.cost is None and current.waited == waited  # and what it sets stays its own


@pytest.mark.parametrize("how", ["cancel", "wait_for"])
def test_a_task_cancelled_in_line_gives_its_place_to_the_next(how: str) -> None:
    """One request every two seconds: the first goes, A waits for the next turn, B for the one after.
    A is cancelled: B takes A's turn (at ~2 s, not ~4 s), and the limiter's line is empty after."""
    limiter = RateLimiter(rpm=30)
    with FakeOpenAI() as server:

        async def body() -> float:
            client = client_for(server, limiter=limiter)
            await client.chat.completions.create(**CHAT)
            started = time.monotonic()
            a = asyncio.ensure_future(client.chat.completions.create(**CHAT))
            await asyncio.sleep(0.05)
            b = asyncio.ensure_future(client.chat.completions.create(**CHAT))
            await asyncio.sleep(0.1)
            assert clean(limiter) == (2, 0)  # A and B wait in line; the first call's reservation ended
            if how == "cancel":
                a.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await a
            else:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(a, 0.01)
            assert a.cancelled()
            await b
            took = time.monotonic() - started
            assert client.stats().failures == 1 and clean(limiter) == (0, 0)
            await client.close()
            return took

        took = run(body)
    assert took < 3.5  # B's own turn, not the one after A's (~4 s)
    assert server.stats()["requests"] == 2


def test_a_task_cancelled_before_its_request_left_gives_everything_back() -> None:
    """The request hooks run just before a request leaves. Cancelled before that (here: stalled in a
    hook of the user's that comes first), nothing was sent: the reservation is cancelled, not charged."""
    limiter = RateLimiter(rpm=6, initial_burst=60.0)  # 6 requests at once, then one every 10 s

    async def stall(request: Any) -> None:
        await asyncio.sleep(30)

    with FakeOpenAI() as server:

        async def body() -> None:
            http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [stall]})
            client = client_for(server, limiter=limiter, http_client=http)
            task = asyncio.ensure_future(client.chat.completions.create(**CHAT))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            levels = limiter.snapshot()[MODEL]
            assert levels["requests_level"] > levels["requests_burst"] - 0.5  # full: the request is back
            assert clean(limiter) == (0, 0) and client.stats().failures == 1
            await http.aclose()

        run(body)
        assert server.stats()["requests"] == 0


class Patient(Retry):
    """Backs off 30 s before every retry (no jitter): a test can catch a call while it sleeps."""

    def backoff(self, retry_number: int, rng: Any = None) -> float:
        return 30.0


@pytest.mark.parametrize("where", ["in_flight", "backoff"])
def test_a_task_cancelled_after_sending_keeps_the_estimate_charged(where: str) -> None:
    """Cancelled while its request is on the wire, or while it backs off after a 500: CancelledError
    propagates, the call counts as failed, and a request that may have reached the server stays
    charged (the one backing off was settled when its 500 came)."""
    limiter = RateLimiter(tpm=6000, initial_burst=60.0)  # 6,000 tokens at once, then 100 a second
    with FakeOpenAI(latency=2.0 if where == "in_flight" else 0.0) as server:

        async def body() -> None:
            client = client_for(server, limiter=limiter, retry=Patient())
            if where == "backoff":
                server.inject("500")
            task = asyncio.ensure_future(client.chat.completions.create(**{**CHAT, "max_tokens": 3000}))
            while server.stats()["requests"] == 0:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            stats = client.stats()
            assert stats.failures == 1 and stats.tokens_used == 0 and clean(limiter) == (0, 0)
            if where == "in_flight":  # (a 500 shows the server's own level, which the limiter adopts)
                assert limiter.snapshot()[MODEL]["tokens_level"] <= 6000 - 3000 + 1000  # still charged
            await client.close()

        run(body)


def test_help_reads_as_plain_text() -> None:
    import pydoc

    for cls in (AsyncThrottledClient, AsyncThrottledAzureClient):
        text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
        for marker in ("``", ":class:", ":meth:", "_stats", "_counter", "<object object"):
            assert marker not in text, f"help({cls.__name__}) shows {marker!r}"
        assert "max_wait" in text


def test_bad_arguments_fail_at_once_naming_the_argument() -> None:
    for kwargs, error, name in [
        ({"rpm": 0}, ValueError, "rpm"),
        ({"retry": "yes"}, TypeError, "retry"),
        ({"max_wait": -1}, ValueError, "max_wait"),
        ({"limiter": RateLimiter(), "rpm": 5}, ValueError, "limiter"),
    ]:
        with pytest.raises(error, match=name):
            AsyncThrottledClient(base_url="http://127.0.0.1:9/v1", api_key=KEY, **kwargs)


def test_threads_keep_their_own_context() -> None:
    values: List[Any] = []

    def other() -> None:
        values.append(current.cost)
        current.cost = 8

    current.cost = 7
    try:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert values == [None] and current.cost == 7
    finally:
        current.cost = None
