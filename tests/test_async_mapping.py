"""amap_* / aimap_*: batching, reordering, input order, nothing lost, stopping — the real SDK's asyncio
client over real HTTP against the fake server. Each test is a plain function that runs its coroutine
with asyncio.run (no pytest plugin)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, Callable, List, Optional, Set, TypeVar

import openai
import pytest
from test_mapping import expected_text, prompts_sent  # what the fake answers, and the prompts per request

from throttled_openai import (
    AsyncThrottledClient,
    BulkError,
    BulkTimeout,
    IncompleteResponse,
    Progress,
    RateLimiter,
    Retry,
)
from throttled_openai.testing import FakeOpenAI

MODEL = "gpt-3.5-turbo-instruct"
CHAT_MODEL = "gpt-4o-mini"
FAST = Retry(backoff_base=0.01, backoff_max=0.05)

_R = TypeVar("_R")
MakeServer = Callable[..., FakeOpenAI]  # the make_server fixture (conftest)


def run(body: Callable[[], Awaitable[_R]]) -> _R:
    """Run one test's coroutine on a fresh event loop, as an application would."""
    return asyncio.run(body())  # type: ignore[arg-type]


@pytest.fixture
def server(make_server: MakeServer) -> FakeOpenAI:
    return make_server(rpm=60_000, tpm=10_000_000)


def client_for(server: FakeOpenAI, **kwargs: Any) -> AsyncThrottledClient:
    kwargs.setdefault("retry", FAST)
    return AsyncThrottledClient(base_url=server.base_url, api_key="sk-amap", **kwargs)


def others() -> Set[asyncio.Task[Any]]:
    """The tasks of this loop besides the test's own."""
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}


async def settled(client: AsyncThrottledClient, model: str = MODEL) -> None:
    """Assert nothing is left running: no other task, no caller waiting, no reservation open."""
    for _ in range(20):  # a generator left by break is closed by the loop a step or two later
        if not others():
            break
        await asyncio.sleep(0.01)
    assert not others()
    limiter: RateLimiter = client.limiter
    states = [state for (_, name), state in limiter._keys.items() if name == model]
    assert all(state.in_flight == 0 for state in states)
    assert all(info["waiting"] == 0 for name, info in limiter.snapshot().items() if name == model)


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        await asyncio.sleep(0.01)


async def requests_once_quiet(server: FakeOpenAI, quiet: float = 0.3, seconds: float = 10.0) -> int:
    """The server's request count once it stopped changing for ``quiet`` seconds: a request the client sent
    before it stopped may reach the server's count a little later on a loaded machine."""
    deadline = time.monotonic() + seconds
    last, since = server.stats()["requests"], time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "requests kept coming"
        await asyncio.sleep(0.05)
        count = server.stats()["requests"]
        if count != last:
            last, since = count, time.monotonic()
    return int(last)


class _aclosing:
    """contextlib.aclosing (Python 3.10+), for 3.9."""

    def __init__(self, agen: Any) -> None:
        self.agen = agen

    async def __aenter__(self) -> Any:
        return self.agen

    async def __aexit__(self, *exc: Any) -> None:
        await self.agen.aclose()


async def each(values: List[Any]) -> AsyncIterator[Any]:
    for value in values:
        await asyncio.sleep(0)
        yield value


# -- results ----------------------------------------------------------------------------------------


def test_prompts_are_batched_and_answers_come_back_in_input_order(server: FakeOpenAI) -> None:
    async def body() -> None:
        async with client_for(server, tpm=10_000_000) as client:
            prompts = [f"question {i}" for i in range(95)]
            choices = await client.amap_completions(prompts, model=MODEL, max_tokens=3)
            assert [c.text for c in choices] == [expected_text(p) for p in prompts]  # the server shuffles
            assert [c.index for c in choices] == list(range(95))
            assert sorted(prompts_sent(server)) == [15, 20, 20, 20, 20]
            await settled(client)

    run(body)


def test_with_unknown_limits_one_prompt_goes_first_to_learn_the_budget(server: FakeOpenAI) -> None:
    async def body() -> None:
        async with client_for(server) as client:
            await client.amap_completions([f"q{i}" for i in range(41)], model=MODEL, max_tokens=3)
            sent = prompts_sent(server)
            assert sent[0] == 1 and sorted(sent[1:]) == [20, 20]

    run(body)


def test_n_samples_per_prompt_come_back_as_lists_in_sample_order(server: FakeOpenAI) -> None:
    async def body() -> None:
        async with client_for(server) as client:
            results = await client.amap_completions(["a", "b", "c"], model=MODEL, n=3, max_tokens=2, batch_size=2)
            assert [[c.text for c in samples] for samples in results] == [
                [expected_text(p, j) for j in range(3)] for p in "abc"
            ]

    run(body)


def test_chat_and_embeddings_in_input_order(server: FakeOpenAI) -> None:
    async def body() -> None:
        async with client_for(server, tpm=10_000_000) as client:
            conversations = [[{"role": "user", "content": f"c{i}"}] for i in range(30)]
            replies = await client.amap_chat_completions(conversations, model=CHAT_MODEL, max_tokens=4)
            assert [r.choices[0].message.content for r in replies] == [f"echo:c{i}#0" for i in range(30)]
            texts = [f"text {i}" for i in range(50)]
            vectors = await client.amap_embeddings(texts, model="text-embedding-3-small", batch_size=16)
            single = await client.embeddings.create(model="text-embedding-3-small", input=texts[7])
            assert len(vectors) == 50 and vectors[7] == single.data[0].embedding
            assert server.stats()["admitted"] == 30 + 4 + 1

    run(body)


def test_an_async_iterable_is_read_as_input(server: FakeOpenAI) -> None:
    async def body() -> None:
        async with client_for(server) as client:
            prompts = [f"a{i}" for i in range(45)]
            listed = await client.amap_completions(each(prompts), model=MODEL, max_tokens=1)
            assert [c.text for c in listed] == [expected_text(p) for p in prompts]
            lazily = [pair async for pair in client.aimap_completions(each(prompts), model=MODEL, max_tokens=1)]
            assert [(i, c.text) for i, c in lazily] == [(i, expected_text(p)) for i, p in enumerate(prompts)]

    run(body)


def test_aimap_unordered_yields_every_position_once(server: FakeOpenAI) -> None:
    async def body() -> None:
        async with client_for(server) as client:
            prompts = (f"u{i}" for i in range(250))
            got = [pair async for pair in client.aimap_completions(prompts, model=MODEL, max_tokens=1, ordered=False)]
            assert sorted(i for i, _ in got) == list(range(250))
            assert all(choice.text == expected_text(f"u{i}") for i, choice in got)
            await settled(client)

    run(body)


def test_empty_input_is_an_empty_result(server: FakeOpenAI) -> None:
    async def body() -> None:
        async with client_for(server) as client:
            assert await client.amap_completions([], model=MODEL) == []
            assert await client.amap_embeddings(each([]), model="e") == []
            assert [pair async for pair in client.aimap_chat_completions(iter([]), model="c")] == []
            assert server.stats()["requests"] == 0

    run(body)


# -- failures ---------------------------------------------------------------------------------------


def with_one_too_long(count: int, bad: int) -> List[str]:
    """``count`` prompts, the one at ``bad`` too long for a context of 50: its whole batch gets a 400."""
    return [("word " * 100) if i == bad else f"fine {i}" for i in range(count)]


def test_a_bad_prompt_is_isolated_by_splitting_its_batch(make_server: MakeServer) -> None:
    server = make_server(context_length=50)

    async def body() -> None:
        async with client_for(server) as client:
            prompts = with_one_too_long(20, 13)
            results = await client.amap_completions(prompts, model=MODEL, max_tokens=5, return_exceptions=True)
            assert isinstance(results[13], openai.BadRequestError)
            assert [r.text for i, r in enumerate(results) if i != 13] == [
                expected_text(p) for i, p in enumerate(prompts) if i != 13
            ]

    run(body)


def test_the_first_failure_raises_bulk_error_with_everything_obtained(make_server: MakeServer) -> None:
    server = make_server(context_length=50)

    async def body() -> None:
        async with client_for(server) as client:
            prompts = with_one_too_long(40, 25)
            with pytest.raises(BulkError) as info:
                await client.amap_completions(prompts, model=MODEL, max_tokens=5, max_concurrency=1)
            error = info.value
            assert list(error.errors) == [25] and isinstance(error.errors[25], openai.BadRequestError)
            assert [r.text for r in error.results[:20]] == [expected_text(p) for p in prompts[:20]]
            assert sum(r is not None for r in error.results) == 39 and len(error.results) == 40
            await settled(client)

    run(body)


def test_after_the_first_failure_nothing_more_is_sent(make_server: MakeServer) -> None:
    # 20 requests may wait in the limiter when input 3 fails: they give up instead of going out one by one.
    server = make_server(rpm=240, tpm=10_000_000, bucket_seconds=1.0, context_length=50)
    prompts = [f"fine {i}" for i in range(3)] + ["word " * 100] + [f"fine {i}" for i in range(36)]

    async def body() -> None:
        async with client_for(server, rpm=240, tpm=10_000_000) as client:
            with pytest.raises(BulkError) as info:
                await client.amap_completions(prompts, model=MODEL, max_tokens=3, batch_size=1, max_concurrency=20)
            assert list(info.value.errors) == [3]
            await settled(client)

    run(body)
    assert server.stats()["requests"] <= 10  # the first few, and those already on their way


def test_a_missing_answer_is_asked_again_then_fails_alone(server: FakeOpenAI) -> None:
    async def body() -> None:
        async with client_for(server, tpm=10_000_000) as client:
            server.inject("missing_choice")
            results = await client.amap_completions([f"q{i}" for i in range(5)], model=MODEL, max_tokens=2)
            assert [r.text for r in results] == [expected_text(f"q{i}") for i in range(5)]
            assert prompts_sent(server) == [5, 1]  # only the prompt without an answer was sent again
            server.inject("duplicate_choice", count=2)
            results = await client.amap_completions(["x", "y"], model=MODEL, max_tokens=2, return_exceptions=True)
            assert sum(isinstance(r, IncompleteResponse) for r in results) == 1

    run(body)


def test_quota_ends_the_run_without_sending_more(server: FakeOpenAI) -> None:
    async def body() -> None:
        async with client_for(server, tpm=10_000_000) as client:
            server.inject("quota")
            prompts = [f"r{i}" for i in range(40)]
            results = await client.amap_completions(
                prompts, model=MODEL, max_tokens=2, return_exceptions=True, max_concurrency=1
            )
            assert all(isinstance(r, openai.RateLimitError) and "quota" in str(r) for r in results)
            assert server.stats()["requests"] == 1

    run(body)


def test_aimap_bulk_error_carries_what_was_obtained_and_not_yielded(make_server: MakeServer) -> None:
    server = make_server(latency=0.1)

    async def body() -> None:
        async with client_for(server, rpm=60_000) as client:
            prompts = [f"x{i}" for i in range(40)]
            yielded: List[int] = []
            with pytest.raises(BulkError) as info:
                results = client.aimap_completions(prompts, model=MODEL, max_tokens=1, batch_size=1, max_concurrency=8)
                async for position, _ in results:
                    yielded.append(position)
                    if len(yielded) == 3:  # the next request fails (a 400 is not retried)
                        server.inject("400", 1)
            error = info.value
            assert len(error.errors) == 1
            obtained = {i: r for i, r in enumerate(error.results) if r is not None}
            assert all(r.text == expected_text(prompts[i]) for i, r in obtained.items())
            assert not set(obtained) & set(yielded) and not set(obtained) & set(error.errors)
            await settled(client)

    run(body)


def test_run_timeout_bounds_the_whole_run(make_server: MakeServer) -> None:
    server = make_server(latency=0.3)

    async def body() -> None:
        async with client_for(server) as client:
            with pytest.raises(BulkTimeout) as info:
                await client.amap_completions(
                    [f"t{i}" for i in range(200)], model=MODEL, max_tokens=1, batch_size=1, run_timeout=0.5
                )
            assert len(info.value.results) == 200
            await settled(client)
            with pytest.raises(BulkTimeout):
                async for _ in client.aimap_completions(["slow"] * 50, model=MODEL, batch_size=1, run_timeout=0.3):
                    pass
            await settled(client)

    run(body)


def test_a_web_client_with_max_wait_still_waits_its_turn_in_bulk(make_server: MakeServer) -> None:
    server = make_server(rpm=120, tpm=10_000_000, bucket_seconds=1.0)

    async def body() -> None:
        async with client_for(server, rpm=120, max_wait=0.05) as client:
            conversations = [[{"role": "user", "content": f"c{i}"}] for i in range(6)]
            replies = await client.amap_chat_completions(conversations, model=CHAT_MODEL, max_tokens=2)
            assert [r.choices[0].message.content for r in replies] == [f"echo:c{i}#0" for i in range(6)]

    run(body)


def test_a_generator_that_raises_halfway_stops_the_run_cleanly(server: FakeOpenAI) -> None:
    async def prompts() -> AsyncIterator[str]:
        for i in range(50):
            yield f"h{i}"
        raise OSError("disk went away")

    async def body() -> None:
        async with client_for(server) as client:
            got: List[int] = []
            with pytest.raises(OSError, match="disk went away"):
                async for position, _ in client.aimap_completions(prompts(), model=MODEL, max_tokens=1):
                    got.append(position)
            assert got == list(range(50))  # everything read before the failure was sent and yielded
            await settled(client)

    run(body)


# -- checked before anything is sent ----------------------------------------------------------------

CONVERSATION = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    ("call", "error", "text"),
    [
        (lambda c: c.amap_completions(["ok", 7], model=MODEL), TypeError, "input 1"),
        (lambda c: c.amap_completions(each(["ok", 7]), model=MODEL), TypeError, "input 1"),
        (lambda c: c.amap_completions("a single string", model=MODEL), TypeError, "not a single str"),
        (lambda c: c.amap_completions(["ok"], model=MODEL, n=0), ValueError, "n must be"),
        (lambda c: c.amap_completions(["ok"], model=MODEL, batch_size=0), ValueError, "batch_size"),
        (lambda c: c.amap_completions(["ok"], model=MODEL, max_concurrency=0), ValueError, "max_concurrency"),
        (lambda c: c.amap_completions(["ok"], model=MODEL, stream=True), ValueError, "stream"),
        (lambda c: c.amap_completions(["ok"], model=MODEL, run_timeout="5"), TypeError, "run_timeout"),
        (lambda c: c.amap_completions(["ok"], model=MODEL, prompt="x"), TypeError, "prompt=.*first argument"),
        (lambda c: c.amap_completions(["ok"], model=MODEL, max_tokenz=3), TypeError, "'max_tokenz'.*completions"),
        (lambda c: c.amap_completions(["ok"], model=""), TypeError, "model="),
        (lambda c: c.amap_chat_completions([CONVERSATION], model="c", messages=[]), TypeError, "messages="),
        (lambda c: c.amap_chat_completions([CONVERSATION, "hi"], model="c"), TypeError, "input 1"),
        (lambda c: c.amap_embeddings(["ok"], model="e", batch_size=5000), ValueError, "batch_size"),
        (lambda c: c.amap_completions(["ok"], model=MODEL, progress="yes"), TypeError, "progress"),
    ],
)
def test_bad_calls_fail_before_anything_is_sent(server: FakeOpenAI, call: Any, error: type, text: str) -> None:
    async def body() -> None:
        async with client_for(server) as client:
            with pytest.raises(error, match=text):
                await call(client)
            await settled(client)

    run(body)
    assert server.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("call", "error", "text"),
    [
        (lambda c: c.aimap_completions(["ok"], model=MODEL, n=200), ValueError, "n must be"),
        (lambda c: c.aimap_embeddings(["ok"], model="e", inputs=["x"]), TypeError, "'inputs'"),
        (lambda c: c.aimap_chat_completions([CONVERSATION], model="c", messages=[]), TypeError, "messages="),
        (lambda c: c.aimap_completions("one", model=MODEL), TypeError, "not a single str"),
        (lambda c: c.aimap_completions(["ok"], model=MODEL, max_concurrency=2.5), TypeError, "max_concurrency"),
    ],
)
def test_aimap_checks_the_call_at_once(server: FakeOpenAI, call: Any, error: type, text: str) -> None:
    async def body() -> None:
        async with client_for(server) as client:
            with pytest.raises(error, match=text):
                call(client)  # no iteration needed: the call itself raises

    run(body)
    assert server.stats()["requests"] == 0


# -- concurrency, the window, stopping --------------------------------------------------------------


def test_concurrency_is_bounded_not_one_task_per_input(make_server: MakeServer) -> None:
    server = make_server(rpm=1200, tpm=10_000_000, bucket_seconds=1.0, latency=0.05)

    async def body() -> None:
        async with client_for(server, rpm=1200) as client:
            peak: List[int] = []
            conversations = [[{"role": "user", "content": f"p{i}"}] for i in range(60)]
            await client.amap_chat_completions(
                conversations, model=CHAT_MODEL, max_tokens=1, progress=lambda _: peak.append(len(others()))
            )
            assert len(peak) == 60 and max(peak) <= 20  # sized from the limit, not one task per input
            peak.clear()
            await client.amap_chat_completions(
                conversations[:20],
                model=CHAT_MODEL,
                max_tokens=1,
                max_concurrency=2,
                progress=lambda _: peak.append(len(others())),
            )
            assert max(peak) <= 2
            await settled(client, CHAT_MODEL)

    run(body)


def test_aimap_reads_an_endless_input_lazily_and_stops_when_closed(server: FakeOpenAI) -> None:
    consumed: List[int] = []

    async def endless() -> AsyncIterator[str]:
        i = 0
        while True:
            consumed.append(i)
            yield f"g{i}"
            i += 1

    async def body() -> None:
        async with client_for(server) as client:
            results = client.aimap_completions(endless(), model=MODEL, max_tokens=1, max_concurrency=2)
            async with _aclosing(results):
                first = [await results.__anext__() for _ in range(3)]
            assert [i for i, _ in first] == [0, 1, 2] and first[2][1].text == expected_text("g2")
            assert len(consumed) <= 2 * 8 * 20 + 1  # a bounded window (tasks × look-ahead × batch)
            await settled(client)
            sent = await requests_once_quiet(server)
            await asyncio.sleep(0.2)
            assert server.stats()["requests"] == sent

    run(body)


def test_breaking_out_of_aimap_cancels_what_is_in_flight(make_server: MakeServer) -> None:
    server = make_server(latency=0.5)

    async def body() -> None:
        async with client_for(server, rpm=60_000, tpm=10_000_000) as client:
            async for _position, _ in client.aimap_completions(
                [f"b{i}" for i in range(100)], model=MODEL, max_tokens=1, batch_size=1, ordered=False
            ):
                break
            await settled(client)  # the abandoned generator is closed by the loop, its tasks cancelled
            sent = await requests_once_quiet(server)
            await asyncio.sleep(0.3)
            assert server.stats()["requests"] == sent

    run(body)


def test_cancelling_the_awaiting_task_cancels_the_requests_and_gives_back_reservations(
    make_server: MakeServer,
) -> None:
    server = make_server(latency=2.0)

    async def body() -> None:
        async with client_for(server, rpm=60_000, tpm=10_000_000) as client:
            prompts = [f"k{i}" for i in range(100)]
            task = asyncio.ensure_future(client.amap_completions(prompts, model=MODEL, max_tokens=1, batch_size=1))
            await until(lambda: server.stats()["requests"] >= 2)  # requests on the wire
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await settled(client)  # every request task ended, nothing waiting, nothing reserved
            sent = await requests_once_quiet(server)
            await asyncio.sleep(0.3)
            assert server.stats()["requests"] == sent < 100

    run(body)


def test_progress_callable_sees_every_input(server: FakeOpenAI) -> None:
    async def body() -> None:
        async with client_for(server) as client:
            seen: List[Progress] = []
            await client.amap_completions([f"p{i}" for i in range(45)], model=MODEL, max_tokens=1, progress=seen.append)
            assert seen[-1].done == 45 and seen[-1].total == 45 and seen[-1].failed == 0
            assert [p.done for p in seen] == sorted(p.done for p in seen)
            seen.clear()
            async for _ in client.aimap_embeddings(each(["a", "b", "c"]), model="e", progress=seen.append):
                pass
            assert seen[-1].done == 3 and seen[-1].total is None

    run(body)


def test_progress_bar(server: FakeOpenAI, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")

    async def body() -> None:
        async with client_for(server) as client:
            await client.amap_completions([f"p{i}" for i in range(30)], model=MODEL, max_tokens=1, progress=True)

    run(body)
    assert "30/30" in capsys.readouterr().err


def test_no_thread_is_started(server: FakeOpenAI) -> None:
    import threading

    async def body() -> Optional[int]:
        async with client_for(server, rpm=60_000, tpm=10_000_000) as client:
            before = {t.ident for t in threading.enumerate()}
            await client.amap_completions([f"n{i}" for i in range(100)], model=MODEL, max_tokens=1, batch_size=1)
            started = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("throttled")]
            return len(started)

    assert run(body) == 0


def test_a_redis_limiter_plans_the_run_through_its_async_faces(server: FakeOpenAI) -> None:
    """Batches and concurrency are planned with RedisRateLimiter's async faces, from a task."""
    pytest.importorskip("redis")
    from throttled_openai import RedisRateLimiter
    from throttled_openai.testing import RedisServer

    if not RedisServer.available():
        pytest.skip("no redis-server on PATH")

    async def body(url: str) -> None:
        limiter = RedisRateLimiter(url, rpm=60_000, tpm=10_000_000)
        async with client_for(server, limiter=limiter) as client:
            prompts = [f"r{i}" for i in range(45)]
            got = [pair async for pair in client.aimap_completions(prompts, model=MODEL, max_tokens=1)]
            assert [(i, c.text) for i, c in got] == [(i, expected_text(p)) for i, p in enumerate(prompts)]
            assert sorted(prompts_sent(server)) == [5, 20, 20]
            await settled(client)

    with RedisServer() as redis_server:
        asyncio.run(body(redis_server.url))
