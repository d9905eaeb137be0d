"""Bulk calls for asyncio: ``amap_*`` / ``aimap_*`` run many inputs through one async client.

The same run as :mod:`throttled_openai.mapping`'s ``map_*`` / ``imap_*`` — the same checks, batches,
splitting, reordering, counts, concurrency and errors, all taken from there — driven by asyncio tasks
instead of threads: a task per request in flight, as many as the limit and the latency call for (never
one per input), and no thread at all. Only the waiting differs: ``await create(...)`` instead of a
call, a future the next finished request resolves instead of ``concurrent.futures.wait``, and the
limiter's async faces for what the run plans with (``alimits_known``, ``arequest_rate``,
``atoken_burst``: a :class:`~throttled_openai.RedisRateLimiter` may ask Redis).

A plain iterable is read in the event loop's thread: a slow one (a network read) holds up the loop
while it reads; give an async iterable instead.

Stopping is cancelling. Cancelling the task that awaits ``amap_*``, or closing an ``aimap_*`` generator
(``break`` in ``async for``, ``aclose()``), cancels every request in flight and waits until each has
ended, so the client gives back what they had reserved and nothing is left running.
"""

from __future__ import annotations

import asyncio
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Iterable,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from .batching import MAX_INPUTS_PER_EMBEDDING, MAX_PROMPTS_PER_COMPLETION, Batch, Packer
from .mapping import BulkTarget, ProgressArg, _all_checked, _DeadlinePassed, _planned, _Results, _Run

__all__ = ["_AsyncBulkMixin"]

#: Ceiling on tasks in flight when the concurrency is derived: a task costs little, and the SDK's
#: connection pool holds 1,000.
_MAX_DERIVED_TASKS = 512

#: What ``amap_*`` / ``aimap_*`` take as inputs.
Inputs = Union[Iterable[Any], AsyncIterable[Any]]
Outcomes = AsyncGenerator[Tuple[int, Any], None]


class _TaskRun(_Run["asyncio.Task[List[Any]]"]):
    """A run on asyncio tasks: :class:`~throttled_openai.mapping._Run` with awaits for waits."""

    ceiling = _MAX_DERIVED_TASKS

    async def target(self) -> int:
        known = await self.limiter.alimits_known(self.key)
        return self.concurrency(known, await self.limiter.arequest_rate(self.key) if known else None)

    async def budget(self) -> Optional[int]:
        known = await self.limiter.alimits_known(self.key)
        return self.plan.budget(known, await self.limiter.atoken_burst(self.key) if known else None)

    async def batches(self, inputs: Inputs) -> AsyncGenerator[Batch[Any], None]:
        """The input packed into requests as :func:`~throttled_openai.batching.pack` does, reading an
        async input and the limiter's budget with ``await``; each input checked as it is read."""
        packer = Packer(self.plan.batch_size, await self.budget(), self.plan.kind)
        source = inputs if isinstance(inputs, AsyncIterable) else _each(inputs)
        position = 0
        try:
            async for value in source:
                batch = packer.add(*self.plan.item(position, value))
                position += 1
                if batch is not None:
                    yield batch
                    packer.budget = await self.budget()
        except Exception:
            # The input failed (a bad item, a read error): what was read before it still goes out.
            rest = packer.flush()
            if rest is not None:
                yield rest
            raise
        rest = packer.flush()
        if rest is not None:
            yield rest

    async def _work(self, batch: Batch[Any]) -> List[Any]:
        with self.sending(batch) as exchange:
            for kwargs in exchange:
                try:
                    exchange.answer(await self.create(**kwargs))
                except Exception as exc:
                    exchange.answer(exc)
        return exchange.outcomes

    _next: Optional[asyncio.Future[None]] = None  # resolved when a request finishes

    def _finished(self, task: asyncio.Task[List[Any]]) -> None:
        if self._next is not None and not self._next.done():
            self._next.set_result(None)

    async def results(self, batches: AsyncGenerator[Batch[Any], None], ordered: bool) -> Outcomes:
        """Yield ``(position, result or exception)`` for every input of ``batches`` that was sent.

        After ``stop`` is set nothing more is handed out, and what was handed out is drained. An error
        from the input is raised after every result already obtained has been yielded. However it
        ends, every task still running is cancelled and awaited.
        """
        deadline = self.start()
        window = self.window
        source_error: Optional[BaseException] = None
        exhausted = False
        try:
            while True:
                for _ in range(0 if exhausted or self.stop.is_set() else window.room(await self.target())):
                    try:
                        batch = await batches.__anext__()
                    except StopAsyncIteration:
                        exhausted = True
                        break
                    except Exception as exc:  # the caller's input failed: finish what was sent first
                        source_error, exhausted = exc, True
                        break
                    task = asyncio.ensure_future(self._work(batch))
                    task.add_done_callback(self._finished)
                    window.add(batch, task)
                if not window:
                    break
                ready, left = self.ready(ordered, deadline)
                if not ready:
                    # One future for the next request to finish: waiting costs the same with 500 in flight.
                    self._next = asyncio.get_running_loop().create_future()
                    await asyncio.wait([self._next], timeout=left)
                for batch, task in ready:
                    for reported in self.record(batch, task):
                        yield reported
            if source_error is not None:
                raise source_error
        finally:
            self.stop.set()
            try:
                await _cancel(window.unfinished())
            finally:  # even when this task is cancelled again while it waits for them
                self._close_progress()
                await batches.aclose()


async def _each(inputs: Iterable[Any]) -> AsyncIterator[Any]:
    for value in inputs:
        yield value


async def _cancel(tasks: List[asyncio.Task[List[Any]]]) -> None:
    """Cancel ``tasks`` and wait until each has ended: a cancelled call gives back what it reserved as
    it ends, and a run leaves nothing running behind it."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)


async def _collect(run: _TaskRun, inputs: Sequence[Any], return_exceptions: bool) -> List[Any]:
    """Drive ``run`` to the end and return results aligned with the input; see ``amap_completions``."""
    results = _Results(return_exceptions)
    outcomes = run.results(run.batches(inputs), ordered=False)
    try:
        async for position, outcome in outcomes:
            if results.take(position, outcome):
                run.stop.set()  # send nothing more, but keep what is already on its way
    except _DeadlinePassed:
        results.drained(run.window.leftovers())
        raise results.timed_out(run, len(inputs), results.laid_out(len(inputs))) from None
    finally:
        await outcomes.aclose()
    return results.final(run, len(inputs))


async def _iterate(run: _TaskRun, inputs: Inputs, ordered: bool, return_exceptions: bool) -> Outcomes:
    """Yield from ``run``; on a failure (without ``return_exceptions``) or a timeout, drain what is on
    its way and raise with every result not yielded, as ``mapping._iterate`` does."""
    outcomes = run.results(run.batches(inputs), ordered)
    results = _Results(return_exceptions)

    async def drain() -> List[Any]:
        """Stop sending, wait for what is in flight, and lay out what was obtained."""
        run.stop.set()
        try:
            async for reported in outcomes:
                results.drained([reported])
        except _DeadlinePassed:
            pass
        finally:
            await outcomes.aclose()
        results.drained(run.window.leftovers())  # finished, never reported: the deadline came first
        return results.laid_out()

    try:
        async for position, outcome in outcomes:
            if results.failure(position, outcome):
                raise results.failed_at(position, await drain())
            yield position, outcome
    except _DeadlinePassed:
        raise results.timed_out(run, None, await drain()) from None
    finally:
        await outcomes.aclose()


async def bulk_amap(
    endpoint: str,
    target: BulkTarget,
    inputs: Inputs,
    batch_size: int,
    max_concurrency: Optional[int],
    return_exceptions: bool,
    progress: ProgressArg,
    run_timeout: Optional[float],
    kwargs: Any,
) -> List[Any]:
    """Every input checked before anything is sent (an async input is read in full first), then run;
    results aligned with the input."""
    plan = _planned(
        endpoint, target, inputs, batch_size, max_concurrency, progress, run_timeout, kwargs, "max_concurrency"
    )
    items = _all_checked(plan, [value async for value in inputs] if isinstance(inputs, AsyncIterable) else inputs)
    if not items:
        return []
    run = _TaskRun(target, plan, max_concurrency, progress, run_timeout, len(items))
    return await _collect(run, items, return_exceptions)


def bulk_aimap(
    endpoint: str,
    target: BulkTarget,
    inputs: Inputs,
    batch_size: int,
    max_concurrency: Optional[int],
    ordered: bool,
    return_exceptions: bool,
    progress: ProgressArg,
    run_timeout: Optional[float],
    kwargs: Any,
) -> Outcomes:
    """Checks the call at once; the input is read as requests go out, a bounded window ahead, each
    input checked as it is read. Nothing starts before the first ``__anext__()``."""
    plan = _planned(
        endpoint, target, inputs, batch_size, max_concurrency, progress, run_timeout, kwargs, "max_concurrency"
    )
    total = len(inputs) if isinstance(inputs, Sequence) else None
    run = _TaskRun(target, plan, max_concurrency, progress, run_timeout, total)
    return _iterate(run, inputs, ordered, return_exceptions)


class _AsyncBulkMixin:
    """amap_* and aimap_* for an asyncio client, which provides _bulk_target (its limiter, counter,
    stats and the async resource's create for a model and endpoint)."""

    if TYPE_CHECKING:

        def _bulk_target(self, endpoint: str, model: str, method: str) -> BulkTarget: ...

    async def amap_completions(
        self, prompts: Inputs, *, model: str, batch_size: int = MAX_PROMPTS_PER_COMPLETION,
        max_concurrency: Optional[int] = None, return_exceptions: bool = False, progress: ProgressArg = False,
        run_timeout: Optional[float] = None, **kwargs: Any,
    ) -> List[Any]:  # fmt: skip
        """Complete every prompt with the legacy completions API; result[i] answers prompts[i]. As
        map_completions() (batching up to batch_size prompts a request, BulkError, return_exceptions,
        progress, run_timeout, every argument checked before anything is sent), on asyncio tasks.

        prompts: any iterable, or an async iterable (read in full before anything is sent).
        max_concurrency: requests in flight at once; None derives it from the limit and the latency.
        Cancelling the awaiting task cancels every request in flight, and returns once each has ended.
        """
        target = self._bulk_target("completions", model, "amap_completions")
        return await bulk_amap(
            "completions", target, prompts, batch_size, max_concurrency, return_exceptions, progress,
            run_timeout, kwargs,
        )  # fmt: skip

    async def amap_chat_completions(
        self, conversations: Inputs, *, model: str, max_concurrency: Optional[int] = None,
        return_exceptions: bool = False, progress: ProgressArg = False, run_timeout: Optional[float] = None,
        **kwargs: Any,
    ) -> List[Any]:  # fmt: skip
        """One chat completion per conversation, as map_chat_completions(); result[i] is the SDK's
        ChatCompletion for conversations[i]. The rest as in amap_completions()."""
        target = self._bulk_target("chat", model, "amap_chat_completions")
        return await bulk_amap(
            "chat", target, conversations, 1, max_concurrency, return_exceptions, progress, run_timeout, kwargs
        )

    async def amap_embeddings(
        self, inputs: Inputs, *, model: str, batch_size: int = MAX_INPUTS_PER_EMBEDDING,
        max_concurrency: Optional[int] = None, return_exceptions: bool = False, progress: ProgressArg = False,
        run_timeout: Optional[float] = None, **kwargs: Any,
    ) -> List[Any]:  # fmt: skip
        """Embed every input, as map_embeddings(); result[i] is the vector for inputs[i]. The rest as
        in amap_completions()."""
        target = self._bulk_target("embeddings", model, "amap_embeddings")
        return await bulk_amap(
            "embeddings", target, inputs, batch_size, max_concurrency, return_exceptions, progress, run_timeout,
            kwargs,
        )  # fmt: skip

    def aimap_completions(
        self, prompts: Inputs, *, model: str, batch_size: int = MAX_PROMPTS_PER_COMPLETION,
        max_concurrency: Optional[int] = None, ordered: bool = True, return_exceptions: bool = False,
        progress: ProgressArg = False, run_timeout: Optional[float] = None, **kwargs: Any,
    ) -> Outcomes:  # fmt: skip
        """Like amap_completions() over any iterable or async iterable, as an async generator of
        (i, result): in input order, or as results finish with ordered=False. Only a bounded window of
        the input is read ahead. The call and its arguments are checked at once (TypeError, ValueError);
        each input as it is read.

        A failure (without return_exceptions) or run_timeout drains the requests on their way; the
        BulkError or BulkTimeout carries, in results, every result obtained and not yet yielded.
        Leaving early (break, aclose(), a cancelled task) cancels the requests in flight; use
        async with contextlib.aclosing(...) (3.10+) to have that happen at once, not when the
        generator is collected."""
        target = self._bulk_target("completions", model, "aimap_completions")
        return bulk_aimap(
            "completions", target, prompts, batch_size, max_concurrency, ordered, return_exceptions,
            progress, run_timeout, kwargs,
        )  # fmt: skip

    def aimap_chat_completions(
        self, conversations: Inputs, *, model: str, max_concurrency: Optional[int] = None, ordered: bool = True,
        return_exceptions: bool = False, progress: ProgressArg = False, run_timeout: Optional[float] = None,
        **kwargs: Any,
    ) -> Outcomes:  # fmt: skip
        """Lazy amap_chat_completions(), yielding (i, ChatCompletion); see aimap_completions()."""
        target = self._bulk_target("chat", model, "aimap_chat_completions")
        return bulk_aimap(
            "chat", target, conversations, 1, max_concurrency, ordered, return_exceptions, progress, run_timeout,
            kwargs,
        )  # fmt: skip

    def aimap_embeddings(
        self, inputs: Inputs, *, model: str, batch_size: int = MAX_INPUTS_PER_EMBEDDING,
        max_concurrency: Optional[int] = None, ordered: bool = True, return_exceptions: bool = False,
        progress: ProgressArg = False, run_timeout: Optional[float] = None, **kwargs: Any,
    ) -> Outcomes:  # fmt: skip
        """Lazy amap_embeddings(), yielding (i, vector); see aimap_completions()."""
        target = self._bulk_target("embeddings", model, "aimap_embeddings")
        return bulk_aimap(
            "embeddings", target, inputs, batch_size, max_concurrency, ordered, return_exceptions, progress,
            run_timeout, kwargs,
        )  # fmt: skip
