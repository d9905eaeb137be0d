"""Bulk calls: ``map_*`` / ``imap_*`` run many inputs through one client on a thread pool.

The shape is ``concurrent.futures.Executor.map``'s: inputs are read lazily and packed into requests
(:mod:`throttled_openai.batching`), at most a bounded window of requests is in flight or waiting to be
handed out, results come out in input order (or as they finish), one deadline covers the whole run,
and a ``finally`` cancels what is left. Every input ends with its result or an exception:

- a request that fails after the client's retries fails each of its inputs with that exception;
- a 400 about a batch is narrowed down by splitting the batch, so one bad prompt fails alone;
- an answer missing or repeated for an input is asked again once, then fails that input.

How many requests run at once is derived from the limit and the latency seen so far (enough to reach
the limit, no more), unless ``max_workers`` says otherwise. The workers wait in the client's limiter
like any other caller, so several maps and plain calls on one client share it fairly.
"""

from __future__ import annotations

import inspect
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import closing
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Generator,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import openai

from .batching import (
    MAX_INPUTS_PER_EMBEDDING,
    MAX_TOKENS_PER_EMBEDDING,
    Batch,
    IncompleteResponse,
    pack,
    split_choices,
)
from .context import current
from .errors import Cancelled, RequestTooLarge, ThrottledOpenAIError
from .limiter import LimitKey, RateLimiter
from .retry import Retry
from .stats import StatsSnapshot
from .tokens import TokenCounter, estimate_cost

__all__ = ["BulkError", "BulkInterrupted", "BulkTarget", "BulkTimeout", "Progress"]

# Ceiling on threads when the concurrency is derived rather than given.
_MAX_DERIVED_WORKERS = 64
# Seconds a stopped run waits for requests already sent before it returns.
_STOP_GRACE = 1.0
# How many requests may be handed out beyond those in flight, as a multiple of the in-flight target:
# lets ordered output carry on past one slow request without reading the whole input.
_LOOKAHEAD = 8
# Seconds the main thread waits at a time, so that Ctrl-C and the deadline are seen promptly.
_WAIT_SLICE = 0.2


class BulkError(ThrottledOpenAIError):
    """Some inputs of a bulk call failed (and ``return_exceptions`` was not set).

    ``results``: a list aligned with the input, holding each result obtained (``None`` elsewhere);
    ``errors``: input position → the exception that input ended with. Inputs in neither were never
    finished (the run stopped at the first failure).
    """

    def __init__(self, message: str, results: List[Any], errors: Dict[int, BaseException]) -> None:
        super().__init__(message)
        self.results = results
        self.errors = errors


class BulkTimeout(BulkError, TimeoutError):
    """The bulk call's ``run_timeout`` passed before every input was done."""


#: Ctrl-C during a bulk call raises the ``KeyboardInterrupt`` itself, so that an interrupted script
#: exits as Python does (status 130; a subclass would exit with 1). Before it leaves the bulk call,
#: what was not sent is cancelled and ``results`` / ``errors`` (as in :class:`BulkError`) are set on it:
#: ``except BulkInterrupted as stop: partial = getattr(stop, "results", None)``. An alias kept for
#: code written against the subclass it used to be.
BulkInterrupted = KeyboardInterrupt


def _interrupted(stop: KeyboardInterrupt, results: List[Any], errors: Dict[int, BaseException]) -> None:
    setattr(stop, "results", results)  # noqa: B010  # KeyboardInterrupt declares no such attribute
    setattr(stop, "errors", errors)  # noqa: B010


@dataclass(frozen=True)
class Progress:
    """What a ``progress`` callable receives after each finished request.

    ``done`` / ``failed``: inputs finished / finished with an exception; ``total``: inputs in all, or
    ``None`` for an iterable of unknown length; ``rate_limited``: 429s the client got; ``wait_seconds``:
    time its calls spent waiting for capacity; ``elapsed``: seconds since the run started.
    """

    done: int
    failed: int
    total: Optional[int]
    rate_limited: int
    wait_seconds: float
    elapsed: float


ProgressArg = Union[bool, Callable[[Progress], None], None]


@dataclass(frozen=True)
class BulkTarget:
    """What the bulk engine needs from a client, for one model and endpoint: the whole interface
    between :mod:`throttled_openai.client` and this module.

    ``limiter`` and ``key``: where the requests wait (the key's limits size the batches and the
    concurrency); ``counter``: the client's token counter, for the packing estimates; ``stats``: the
    client's counters now, for progress; ``create``: the SDK method one request goes through (e.g.
    ``client.chat.completions.create``), with ``model=model``; ``method``: the bulk method's name,
    for messages.
    """

    limiter: RateLimiter
    key: LimitKey
    counter: TokenCounter
    stats: Callable[[], StatsSnapshot]
    model: str
    create: Callable[..., Any]
    method: str


# -- validation --------------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any, upper: Optional[int] = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1 or (upper is not None and value > upper):
        bound = f"between 1 and {upper}" if upper is not None else ">= 1"
        raise ValueError(f"{name} must be {bound}, got {value}")


#: For each endpoint, the arguments of ``create`` that the bulk call fills in from its inputs.
_FILLED = {"completions": ("model", "prompt"), "chat": ("model", "messages"), "embeddings": ("model", "input")}
_SDK_METHOD = {
    "completions": "completions.create",
    "chat": "chat.completions.create",
    "embeddings": "embeddings.create",
}


def _check_common(
    target: BulkTarget, endpoint: str, kwargs: Mapping[str, Any], max_workers: Optional[int], run_timeout: Any
) -> None:
    """Everything about the call itself, checked before any input is read or anything is sent."""
    for name in _FILLED[endpoint]:
        if name in kwargs:
            raise TypeError(
                f"{target.method}() got {name}=, which it fills in itself"
                + (" from each input: pass the inputs as the first argument" if name != "model" else "")
            )
    accepted = _parameters(target.create)
    if accepted is not None:
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise TypeError(
                f"{target.method}() got an unexpected keyword argument {unknown[0]!r}: "
                f"the SDK's {_SDK_METHOD[endpoint]} takes no such argument"
            )
    if kwargs.get("stream"):
        raise ValueError("stream=True is not supported by the bulk helpers; call create() for streams")
    timeout = kwargs.get("timeout")  # the SDK's, for each request: a wrong one would fail every input
    if isinstance(timeout, (bool, str, bytes)):
        raise TypeError(f"timeout (seconds, for each request) must be a number or an httpx Timeout, got {timeout!r}")
    if isinstance(timeout, (int, float)) and not timeout > 0:
        raise ValueError(f"timeout (seconds, for each request) must be > 0, got {timeout!r}")
    _check_positive_int("max_workers", max_workers, allow_none=True)
    if run_timeout is not None:
        if isinstance(run_timeout, bool) or not isinstance(run_timeout, (int, float)):
            raise TypeError(f"run_timeout must be a number of seconds or None, got {run_timeout!r}")
        if not run_timeout > 0:
            raise ValueError(f"run_timeout must be > 0 seconds or None, got {run_timeout!r}")


def _parameters(function: Callable[..., Any]) -> Optional[frozenset[str]]:
    """The keyword arguments ``function`` takes; ``None`` when it takes any (``**kwargs``) or cannot
    be inspected."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return None
    return frozenset(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _is_prompt(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(token, int) and not isinstance(token, bool) for token in value)
    )


def _checked(inputs: Iterable[Any], check: Callable[[Any], bool], what: str) -> Iterator[Tuple[int, Any]]:
    for position, value in enumerate(inputs):
        if not check(value):
            raise TypeError(f"input {position} must be {what}, got {type(value).__name__}")
        yield position, value


# -- the engine --------------------------------------------------------------------------------


class _Pool:
    """Daemon worker threads fed from a queue, started as work arrives, up to ``cap``.

    Not ``ThreadPoolExecutor``: its threads are joined when the interpreter exits, so a request still
    on the wire after Ctrl-C would hold the program for as long as the request takes.
    """

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._queue: queue.SimpleQueue[Optional[Tuple[Future[List[Any]], Callable[[Any], List[Any]], Any]]]
        self._queue = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[Any], List[Any]], arg: Any) -> Future[List[Any]]:
        future: Future[List[Any]] = Future()
        self._queue.put((future, fn, arg))
        with self._lock:
            if self._idle == 0 and len(self._threads) < self._cap:
                thread = threading.Thread(target=self._loop, name=f"throttled_openai_{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            item = self._queue.get()
            with self._lock:
                self._idle -= 1
            if item is None:
                return
            future, fn, arg = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(arg))
            except BaseException as exc:
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Let every thread end once the queue is drained (cancelled work is skipped)."""
        for _ in self._threads:
            self._queue.put(None)


class _DeadlinePassed(Exception):
    pass


def _outcomes(future: Future[List[Any]], size: int) -> List[Any]:
    try:
        return future.result()
    except BaseException as exc:  # the whole request failed: every input of it did
        return [exc] * size


def _is_fatal(outcome: Any) -> bool:
    """An error every later request would get too: no quota left, a bad key, no permission."""
    if isinstance(outcome, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return True
    return isinstance(outcome, openai.RateLimitError) and Retry.classify(outcome)[0] == "quota"


class _Run:
    """One bulk run: the worker threads, the window of requests, progress and the stop signal."""

    def __init__(
        self,
        target: BulkTarget,
        send: Callable[[Batch[Any]], List[Any]],
        max_workers: Optional[int],
        progress: ProgressArg,
        timeout: Optional[float],
        total: Optional[int],
    ) -> None:
        self.limiter = target.limiter
        self.key = target.key
        self.send = send
        self.fixed_workers = max_workers
        self.stop = threading.Event()  # no more requests: set on failure, timeout, Ctrl-C, close()
        self.fatal: Optional[BaseException] = None  # an error every remaining input would get
        self.timeout = timeout
        self.started = time.monotonic()
        self.total = total
        self.done = 0
        self.failed = 0
        self.latency = 0.0  # moving average of a request's seconds on the wire, waits excluded
        self.stats = target.stats
        self.stats0 = target.stats()
        # Requests handed out and not yet reported; after a stop, what finished of them: leftovers().
        self.handed_out: Deque[Tuple[Batch[Any], Future[List[Any]]]] = deque()
        self.progress = progress

    def target(self) -> int:
        """Requests to keep in flight: the request rate times the latency, with a quarter to spare.
        One, while the limits are unknown: the first answer tells the budget batches must fit."""
        if not self.limiter.limits_known(self.key):
            return 1
        if self.fixed_workers is not None:
            return self.fixed_workers
        rate = self.limiter.request_rate(self.key)  # requests per second, or None
        if rate is None or self.latency == 0.0:
            return 8
        return max(2, min(_MAX_DERIVED_WORKERS, math.ceil(rate * self.latency * 1.25) + 1))

    def _work(self, batch: Batch[Any]) -> List[Any]:
        if self.fatal is not None:
            return [self.fatal] * len(batch.items)
        if self.stop.is_set():
            raise Cancelled("the bulk call stopped before this request was sent")
        current.cancel = self.stop  # also: the client's max_wait does not apply, the run's deadline does
        current.waited = 0.0
        started = time.monotonic()
        try:
            return self.send(batch)
        finally:
            current.cancel = None
            spent = time.monotonic() - started - current.waited
            self.latency = spent if self.latency == 0.0 else 0.8 * self.latency + 0.2 * spent

    def results(self, batches: Iterator[Batch[Any]], ordered: bool) -> Generator[Tuple[int, Any], None, None]:
        """Yield ``(position, result or exception)`` for every input of ``batches`` that was sent.

        After ``stop`` is set nothing more is handed out, and what was handed out is drained (its
        unsent part ends as :class:`Cancelled`). An error from the input iterable is raised after
        every result already obtained has been yielded.
        """
        self.started = time.monotonic()
        report, close_progress = _progress_reporter(self.progress, self.total)
        deadline = math.inf if self.timeout is None else time.monotonic() + self.timeout
        pool = _Pool(self.fixed_workers or _MAX_DERIVED_WORKERS)
        handed_out = self.handed_out
        source_error: Optional[BaseException] = None
        exhausted = False
        try:
            while True:
                target = self.target()
                running = sum(not future.done() for _, future in handed_out)
                while (
                    not (exhausted or self.stop.is_set()) and running < target and len(handed_out) < _LOOKAHEAD * target
                ):
                    try:
                        batch = next(batches, None)
                    except Exception as exc:  # the caller's iterable failed: finish what was sent first
                        source_error, batch = exc, None
                    if batch is None:
                        exhausted = True
                        break
                    handed_out.append((batch, pool.submit(self._work, batch)))
                    running += 1
                if not handed_out:
                    break
                ready = _ready(handed_out, ordered)
                if not ready:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _DeadlinePassed
                    # In slices: Ctrl-C reaches the main thread only between waits on some platforms.
                    pending = [future for _, future in handed_out if not future.done()]
                    wait(pending, timeout=min(left, _WAIT_SLICE), return_when=FIRST_COMPLETED)
                    continue
                for pair in ready:
                    handed_out.remove(pair)
                    batch, future = pair
                    outcomes = _outcomes(future, len(batch.items))
                    for position, outcome in zip(batch.positions, outcomes):
                        if isinstance(outcome, Cancelled):
                            continue  # never sent: neither a result nor an error
                        self.done += 1
                        if isinstance(outcome, BaseException):
                            self.failed += 1
                            if self.fatal is None and _is_fatal(outcome):
                                self.fatal = outcome
                        yield position, outcome
                    report(self)
            if source_error is not None:
                raise source_error
        finally:
            self.stop.set()
            for _, future in handed_out:
                future.cancel()  # not started yet: never sent
            pool.shutdown()
            # Workers waiting in the limiter notice the stop within a quarter second; a request on
            # the wire cannot be recalled and its (daemon) thread finishes it alone.
            wait([future for _, future in handed_out if not future.cancelled()], timeout=_STOP_GRACE)
            close_progress()

    def leftovers(self) -> Iterator[Tuple[int, Any]]:
        """``(position, result or exception)`` of the requests that finished but were never reported:
        what a run stopped by its deadline or Ctrl-C still obtained (within the stop grace)."""
        for batch, future in self.handed_out:
            if future.done() and not future.cancelled():
                for position, outcome in zip(batch.positions, _outcomes(future, len(batch.items))):
                    if not isinstance(outcome, Cancelled):
                        yield position, outcome


def _ready(
    handed_out: Deque[Tuple[Batch[Any], Future[List[Any]]]], ordered: bool
) -> List[Tuple[Batch[Any], Future[List[Any]]]]:
    """The finished requests that may be reported now: all of them, or in order, those at the head."""
    if not ordered:
        return [pair for pair in handed_out if pair[1].done()]
    ready = []
    for pair in handed_out:
        if not pair[1].done():
            break
        ready.append(pair)
    return ready


Reporter = Tuple[Callable[["_Run"], None], Callable[[], None]]


def _progress_reporter(progress: ProgressArg, total: Optional[int]) -> Reporter:
    """``(update after each request, close at the end)`` for the ``progress`` argument."""
    if not progress:
        return (lambda run: None), (lambda: None)
    if callable(progress):
        callback = progress

        def report(run: _Run) -> None:
            stats = run.stats()
            callback(
                Progress(
                    done=run.done,
                    failed=run.failed,
                    total=run.total,
                    rate_limited=stats.total_429s - run.stats0.total_429s,
                    wait_seconds=stats.wait_seconds - run.stats0.wait_seconds,
                    elapsed=time.monotonic() - run.started,
                )
            )

        return report, (lambda: None)
    from tqdm.auto import tqdm  # type: ignore[import-untyped]  # presence checked when the call was made

    bar = tqdm(total=total, unit="input", dynamic_ncols=True)

    def update(run: _Run) -> None:
        stats = run.stats()
        bar.update(run.done - bar.n)
        bar.set_postfix(
            failed=run.failed,
            **{"429s": stats.total_429s - run.stats0.total_429s},
            waited=f"{stats.wait_seconds - run.stats0.wait_seconds:.0f}s",
            refresh=False,
        )

    return update, bar.close


def _check_progress(progress: ProgressArg) -> None:
    if progress is True:
        try:
            import tqdm  # type: ignore[import-untyped]  # noqa: F401
        except ImportError as exc:
            raise ImportError("progress=True needs tqdm: pip install 'throttled-openai[progress]'") from exc
    elif progress not in (False, None) and not callable(progress):
        raise TypeError(f"progress must be a bool or a callable, got {type(progress).__name__}")


def _collect(run: _Run, batches: Iterator[Batch[Any]], size: int, return_exceptions: bool) -> List[Any]:
    """Drive ``run`` to the end and return results aligned with the input; see ``map_completions``."""
    results: List[Any] = [None] * size
    errors: Dict[int, BaseException] = {}
    try:
        with closing(run.results(batches, ordered=False)) as outcomes:
            for position, outcome in outcomes:
                if isinstance(outcome, BaseException) and not return_exceptions:
                    errors[position] = outcome
                    run.stop.set()  # send nothing more, but keep what is already on its way
                else:
                    results[position] = outcome
    except (_DeadlinePassed, KeyboardInterrupt) as stop:
        for position, outcome in run.leftovers():
            if isinstance(outcome, BaseException):
                errors[position] = outcome
            else:
                results[position] = outcome
        if isinstance(stop, KeyboardInterrupt):
            _interrupted(stop, results, errors)
            raise
        raise BulkTimeout(f"run_timeout passed with {run.done} of {size} inputs done", results, errors) from None
    if errors:
        first = min(errors)
        raise BulkError(
            f"{len(errors)} of {size} inputs failed, the first (input {first}) with {errors[first]!r}; "
            f"{run.done - run.failed} done, the rest not sent",
            results,
            errors,
        )
    return results


def _iterate(
    run: _Run, batches: Iterator[Batch[Any]], ordered: bool, return_exceptions: bool
) -> Iterator[Tuple[int, Any]]:
    """Yield from ``run``; on a failure (without ``return_exceptions``), a timeout or Ctrl-C, drain what
    is already on its way and raise with every result the caller has not been given: ``results`` is
    aligned with the input up to the last input read (results already yielded are not kept twice:
    keeping them all would break the flat memory an unbounded input needs)."""
    outcomes = run.results(batches, ordered)
    unyielded: Dict[int, Any] = {}
    errors: Dict[int, BaseException] = {}

    def drain() -> List[Any]:
        """Stop sending, wait for what is in flight, and lay out what was obtained."""
        run.stop.set()
        try:
            for position, outcome in outcomes:
                if isinstance(outcome, BaseException):
                    errors[position] = outcome
                else:
                    unyielded[position] = outcome
        except _DeadlinePassed:
            pass
        finally:
            outcomes.close()
        for position, outcome in run.leftovers():  # finished, never reported: a deadline or Ctrl-C came first
            if isinstance(outcome, BaseException):
                errors[position] = outcome
            else:
                unyielded[position] = outcome
        laid_out: List[Any] = [None] * (max([*unyielded, *errors], default=-1) + 1)
        for position, outcome in unyielded.items():
            laid_out[position] = outcome
        return laid_out

    try:
        for position, outcome in outcomes:
            if isinstance(outcome, BaseException) and not return_exceptions:
                errors[position] = outcome
                results = drain()
                raise BulkError(f"input {position} failed: {outcome!r}", results, errors)
            yield position, outcome
    except _DeadlinePassed:
        results = drain()
        raise BulkTimeout(f"run_timeout passed with {run.done} inputs done", results, errors) from None
    except KeyboardInterrupt as stop:
        _interrupted(stop, drain(), errors)
        raise
    finally:
        outcomes.close()


# -- what to send -----------------------------------------------------------------------------


def _about_one_input(error: BaseException) -> bool:
    """Whether a refused batch may owe the refusal to one of its inputs (then it is worth splitting):
    a prompt too long for the context, a request too large for the limit, a bad input value."""
    if isinstance(error, RequestTooLarge):
        return True
    message = str(getattr(error, "message", "") or error).lower()
    if isinstance(error, openai.RateLimitError):
        return "request too large" in message
    if isinstance(error, openai.BadRequestError):
        param = getattr(error, "param", None)
        return (
            getattr(error, "code", None) == "context_length_exceeded"
            or param in ("prompt", "input", "messages")
            or "maximum context length" in message
        )
    return False


def _sender(
    create: Callable[[List[Any]], Any],
    answers: Callable[[Any], Sequence[Any]],
    result: Callable[[Any, List[Any], int], Any],
    cost: Callable[[Any], int],
    n: int = 1,
) -> Callable[[Batch[Any]], List[Any]]:
    """How one batch is sent: ``create(items)`` makes the request, ``answers(response)`` lists its
    indexed answers (``n`` per input), ``result(response, answers, position)`` is what the caller
    gets. A refusal about one input splits the batch to find it; an input whose answers are missing
    or repeated is asked again once, alone."""

    def send(batch: Batch[Any], again: bool = True) -> List[Any]:
        current.cost = batch.cost  # already counted while packing: spare the client a second count
        try:
            response = create(list(batch.items))
        except Exception as exc:
            current.cost = None
            if len(batch.items) > 1 and _about_one_input(exc):
                left, right = batch.halves(cost)
                return send(left, again) + send(right, again)
            return [exc] * len(batch.items)
        outcomes: List[Any] = []
        for k, found in enumerate(split_choices(answers(response), len(batch.items), n)):
            if not isinstance(found, IncompleteResponse):
                outcomes.append(result(response, found, batch.positions[k]))
            elif again:
                outcomes.extend(send(Batch((batch.positions[k],), (batch.items[k],), cost(batch.items[k])), False))
            else:
                outcomes.append(found)
        return outcomes

    return send


def _token_budget(target: BulkTarget, ceiling: Optional[int] = None) -> Callable[[], Optional[int]]:
    """The most tokens one request may cost: what the limiter lets through at once (its burst).
    While the limits are unknown, 0: one input per request (only one is in flight then)."""
    limiter, key = target.limiter, target.key

    def budget() -> Optional[int]:
        if not limiter.limits_known(key):
            return 0
        burst = limiter.token_burst(key)
        if burst is None:
            return ceiling
        return max(1, int(burst)) if ceiling is None else min(ceiling, max(1, int(burst)))

    return budget


def _completions_plan(
    target: BulkTarget, prompts: Iterable[Any], model: str, batch_size: int, kwargs: Dict[str, Any]
) -> Tuple[Iterator[Batch[Any]], Callable[[Batch[Any]], List[Any]]]:
    _check_positive_int("batch_size", batch_size, upper=2048)
    n = kwargs.get("n", 1)
    _check_positive_int("n", n, upper=128)
    best_of = kwargs.get("best_of")
    if best_of is not None:
        _check_positive_int("best_of", best_of, upper=20)
        if best_of < n:
            raise ValueError(f"best_of must be >= n, got best_of={best_of} and n={n}")
    priced = {k: v for k, v in kwargs.items() if k in ("max_tokens", "n", "best_of")}

    def cost(prompt: Any) -> int:
        return estimate_cost("completions", {"model": model, "prompt": prompt, **priced}, target.counter)

    def result(response: Any, choices: List[Any], position: int) -> Any:
        for j, choice in enumerate(choices):
            choice.index = position * n + j  # the index it would have in one request for all inputs
        return choices[0] if n == 1 else choices

    checked = _checked(prompts, _is_prompt, "a str or a list of token ids")
    items = ((position, prompt, cost(prompt)) for position, prompt in checked)
    batches = pack(items, batch_size, _token_budget(target), kind=lambda prompt: isinstance(prompt, str))
    create = target.create
    send = _sender(lambda ps: create(model=model, prompt=ps, **kwargs), lambda r: r.choices, result, cost, n)
    return batches, send


def _embeddings_plan(
    target: BulkTarget, inputs: Iterable[Any], model: str, batch_size: int, kwargs: Dict[str, Any]
) -> Tuple[Iterator[Batch[Any]], Callable[[Batch[Any]], List[Any]]]:
    _check_positive_int("batch_size", batch_size, upper=MAX_INPUTS_PER_EMBEDDING)

    def cost(text: Any) -> int:
        return estimate_cost("embeddings", {"model": model, "input": text}, target.counter)

    checked = _checked(inputs, _is_prompt, "a str or a list of token ids")
    items = ((position, text, cost(text)) for position, text in checked)
    budget = _token_budget(target, MAX_TOKENS_PER_EMBEDDING)
    batches = pack(items, batch_size, budget, kind=lambda text: isinstance(text, str))
    create = target.create
    send = _sender(
        lambda texts: create(model=model, input=texts, **kwargs),
        lambda r: r.data,
        lambda response, found, position: found[0].embedding,
        cost,
    )
    return batches, send


def _is_conversation(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(message, Mapping) or hasattr(message, "role") for message in value)
    )


def _chat_plan(
    target: BulkTarget, conversations: Iterable[Any], model: str, batch_size: int, kwargs: Dict[str, Any]
) -> Tuple[Iterator[Batch[Any]], Callable[[Batch[Any]], List[Any]]]:
    n = kwargs.get("n", 1)
    _check_positive_int("n", n, upper=128)
    priced = {k: v for k, v in kwargs.items() if k in ("max_tokens", "max_completion_tokens", "n")}

    def cost(messages: Any) -> int:
        return estimate_cost("chat", {"model": model, "messages": messages, **priced}, target.counter)

    def result(response: Any, choices: List[Any], position: int) -> Any:
        response.choices = choices  # in index order
        return response

    checked = _checked(conversations, _is_conversation, "a non-empty list of messages")
    items = ((position, list(messages), cost(messages)) for position, messages in checked)
    batches = pack(items, 1, lambda: None)  # the API takes one conversation per request
    create = target.create
    # One conversation per request: its n choices are checked like a batch of one input.
    send = _sender(lambda convs: create(model=model, messages=convs[0], **kwargs), lambda r: r.choices, result, cost, n)
    return batches, send


Plan = Callable[
    [BulkTarget, Iterable[Any], str, int, Dict[str, Any]],
    Tuple[Iterator[Batch[Any]], Callable[[Batch[Any]], List[Any]]],
]

#: For each endpoint: how its inputs are planned into requests, and what one input must be.
PLANS: Dict[str, Tuple[Plan, Callable[[Any], bool], str]] = {
    "completions": (_completions_plan, _is_prompt, "a str or a list of token ids"),
    "embeddings": (_embeddings_plan, _is_prompt, "a str or a list of token ids"),
    "chat": (_chat_plan, _is_conversation, "a non-empty list of messages"),
}


def bulk_map(
    endpoint: str,
    target: BulkTarget,
    inputs: Iterable[Any],
    batch_size: int,
    max_workers: Optional[int],
    return_exceptions: bool,
    progress: ProgressArg,
    run_timeout: Optional[float],
    kwargs: Dict[str, Any],
) -> List[Any]:
    """Every input checked before anything is sent, then run; results aligned with the input."""
    if isinstance(inputs, (str, bytes)):
        raise TypeError("inputs must be a list (or iterable) of inputs, not a single str")
    plan, check, what = PLANS[endpoint]
    _check_common(target, endpoint, kwargs, max_workers, run_timeout)
    _check_progress(progress)
    items = inputs if isinstance(inputs, Sequence) else list(inputs)
    for position, value in enumerate(items):
        if not check(value):
            raise TypeError(f"input {position} must be {what}, got {type(value).__name__}")
    batches, send = plan(target, items, target.model, batch_size, kwargs)
    if not items:
        return []
    run = _Run(target, send, max_workers, progress, run_timeout, len(items))
    return _collect(run, batches, len(items), return_exceptions)


def bulk_imap(
    endpoint: str,
    target: BulkTarget,
    inputs: Iterable[Any],
    batch_size: int,
    max_workers: Optional[int],
    ordered: bool,
    return_exceptions: bool,
    progress: ProgressArg,
    run_timeout: Optional[float],
    kwargs: Dict[str, Any],
) -> Iterator[Tuple[int, Any]]:
    """Lazy: the input is read as requests go out, a bounded window ahead; each input is checked as
    it is read, before its request is sent. Nothing starts before the first ``next()``."""
    if isinstance(inputs, (str, bytes)):
        raise TypeError("inputs must be an iterable of inputs, not a single str")
    _check_common(target, endpoint, kwargs, max_workers, run_timeout)
    _check_progress(progress)
    batches, send = PLANS[endpoint][0](target, inputs, target.model, batch_size, kwargs)
    total = len(inputs) if isinstance(inputs, Sequence) else None
    run = _Run(target, send, max_workers, progress, run_timeout, total)
    return _iterate(run, batches, ordered, return_exceptions)
