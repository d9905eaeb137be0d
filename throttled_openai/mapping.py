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

All of that is written once, in pieces that do no I/O: the checks, :class:`_Plan` (inputs to requests,
responses to results), :class:`_Exchange` (one batch, split when refused), :class:`_Run` (the window,
counts, sizing, progress) and :class:`_Results` (what a call hands back). :class:`_ThreadRun` drives
them on threads; :mod:`throttled_openai.amapping` drives the same pieces with asyncio tasks.
"""

from __future__ import annotations

import inspect
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Generator,
    Generic,
    Hashable,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
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


#: For each endpoint, the arguments of ``create`` that the bulk call fills in from its inputs.
_FILLED = {"completions": ("model", "prompt"), "chat": ("model", "messages"), "embeddings": ("model", "input")}
_SDK_METHOD = {
    "completions": "completions.create",
    "chat": "chat.completions.create",
    "embeddings": "embeddings.create",
}


def _check_common(
    target: BulkTarget,
    endpoint: str,
    kwargs: Mapping[str, Any],
    concurrency: Optional[int],
    run_timeout: Any,
    concurrency_name: str = "max_workers",
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
    _check_positive_int(concurrency_name, concurrency, allow_none=True)
    if run_timeout is not None:
        if isinstance(run_timeout, bool) or not isinstance(run_timeout, (int, float)):
            raise TypeError(f"run_timeout must be a number of seconds or None, got {run_timeout!r}")
        if not run_timeout > 0:
            raise ValueError(f"run_timeout must be > 0 seconds or None, got {run_timeout!r}")


def _planned(
    endpoint: str,
    target: BulkTarget,
    inputs: Any,
    batch_size: int,
    concurrency: Optional[int],
    progress: ProgressArg,
    run_timeout: Any,
    kwargs: Dict[str, Any],
    concurrency_name: str = "max_workers",
) -> _Plan:
    """The call's plan, once everything about the call itself is checked (nothing read, nothing sent)."""
    if isinstance(inputs, (str, bytes)):
        raise TypeError("inputs must be a list (or iterable) of inputs, not a single str")
    _check_common(target, endpoint, kwargs, concurrency, run_timeout, concurrency_name)
    _check_progress(progress)
    return PLANS[endpoint](target, target.model, batch_size, kwargs)


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


def _all_checked(plan: _Plan, inputs: Iterable[Any]) -> Sequence[Any]:
    """The inputs as a sequence, every one checked (TypeError names the first bad one)."""
    items = inputs if isinstance(inputs, Sequence) else list(inputs)
    for position, value in enumerate(items):
        plan.validate(position, value)
    return items


def _is_prompt(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(token, int) and not isinstance(token, bool) for token in value)
    )


# -- what to send: inputs to requests, responses to results (no I/O) ----------------------------


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class _Plan:
    """How one endpoint's inputs become requests and its responses become results.

    ``check`` / ``what``: what one input must be; ``cost``: an input's token estimate, for packing;
    ``prepare``: the input as it goes into a request; ``request``: ``create()``'s keyword arguments
    for a batch of prepared inputs; ``answers``: a response's indexed answers (``n`` per input);
    ``result``: what the caller gets for the input at ``position`` from its answers; ``batch_size``:
    most inputs in one request; ``ceiling``: most tokens in one request besides the limiter's burst
    (``None``: the burst alone); ``kind``: inputs of one request must be of one kind.
    """

    check: Callable[[Any], bool]
    what: str
    cost: Callable[[Any], int]
    request: Callable[[List[Any]], Dict[str, Any]]
    answers: Callable[[Any], Sequence[Any]]
    result: Callable[[Any, List[Any], int], Any]
    batch_size: int
    n: int = 1
    ceiling: Optional[int] = None
    kind: Optional[Callable[[Any], Hashable]] = None
    prepare: Callable[[Any], Any] = _same

    def validate(self, position: int, value: Any) -> None:
        if not self.check(value):
            raise TypeError(f"input {position} must be {self.what}, got {type(value).__name__}")

    def item(self, position: int, value: Any) -> Tuple[int, Any, int]:
        """``(position, prepared input, cost)`` for the packer; TypeError for a bad input."""
        self.validate(position, value)
        return position, self.prepare(value), self.cost(value)

    def budget(self, known: bool, burst: Optional[float]) -> Optional[int]:
        """The most tokens one request may cost, given whether the limits are ``known`` and the
        limiter's token ``burst``: what it lets through at once, within ``ceiling``. While the limits
        are unknown, 0: one input per request (only one is in flight then)."""
        if not known:
            return 0
        if burst is None:
            return self.ceiling
        return max(1, int(burst)) if self.ceiling is None else min(self.ceiling, max(1, int(burst)))


class _Exchange:
    """One batch's requests, as steps that do no I/O, so that a thread and a task send it alike.

    Iterate for the keyword arguments of each ``create()`` call to make (``current.cost`` is set for
    it), and :meth:`answer` each with its response or the exception it raised: a refusal about one
    input splits the batch to find it; an input whose answers are missing or repeated is asked again
    once, alone. Then :attr:`outcomes` holds a result or an exception for each input of the batch.
    Given ``fatal`` (an error every request would get), nothing is sent and every input gets it.
    """

    def __init__(self, plan: _Plan, batch: Batch[Any], fatal: Optional[BaseException] = None) -> None:
        self.plan = plan
        self.sent = 0
        self.outcomes: List[Any] = [] if fatal is None else [fatal] * len(batch.items)
        self._steps = None if fatal is not None else self._send(batch, again=True)
        self._reply: Any = None

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        while self._steps is not None:
            try:
                batch = self._steps.send(self._reply)
            except StopIteration as end:
                self.outcomes, self._steps = end.value, None
                return
            current.cost = batch.cost  # already counted while packing: spare the client a second count
            self.sent += 1
            yield self.plan.request(list(batch.items))

    def answer(self, reply: Any) -> None:
        """The response to the request last handed out, or the exception its ``create()`` raised."""
        if isinstance(reply, BaseException):
            current.cost = None  # unread if the call failed before its request was made
        self._reply = reply

    def _send(self, batch: Batch[Any], again: bool) -> Generator[Batch[Any], Any, List[Any]]:
        """Yields each batch to send and receives its reply; returns the batch's outcomes."""
        plan = self.plan
        reply = yield batch
        if isinstance(reply, BaseException):
            if len(batch.items) > 1 and _about_one_input(reply):
                left, right = batch.halves(plan.cost)
                return (yield from self._send(left, again)) + (yield from self._send(right, again))
            return [reply] * len(batch.items)
        outcomes: List[Any] = []
        for k, found in enumerate(split_choices(plan.answers(reply), len(batch.items), plan.n)):
            if not isinstance(found, IncompleteResponse):
                outcomes.append(plan.result(reply, found, batch.positions[k]))
            elif again:
                alone = Batch((batch.positions[k],), (batch.items[k],), plan.cost(batch.items[k]))
                outcomes.extend((yield from self._send(alone, False)))
            else:
                outcomes.append(found)
        return outcomes


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


def _prompts_plan(
    cost: Callable[[Any], int],
    request: Callable[[List[Any]], Dict[str, Any]],
    answers: Callable[[Any], Sequence[Any]],
    result: Callable[[Any, List[Any], int], Any],
    batch_size: int,
    n: int = 1,
    ceiling: Optional[int] = None,
) -> _Plan:
    """A plan whose inputs are prompts: a str or a list of token ids, never both in one request."""
    what = "a str or a list of token ids"
    return _Plan(_is_prompt, what, cost, request, answers, result, batch_size, n, ceiling, kind=_is_text)


def _is_text(prompt: Any) -> bool:
    return isinstance(prompt, str)


def _completions_plan(target: BulkTarget, model: str, batch_size: int, kwargs: Dict[str, Any]) -> _Plan:
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

    request = lambda prompts: {"model": model, "prompt": prompts, **kwargs}  # noqa: E731
    return _prompts_plan(cost, request, lambda response: response.choices, result, batch_size, n=n)


def _embeddings_plan(target: BulkTarget, model: str, batch_size: int, kwargs: Dict[str, Any]) -> _Plan:
    _check_positive_int("batch_size", batch_size, upper=MAX_INPUTS_PER_EMBEDDING)

    def cost(text: Any) -> int:
        return estimate_cost("embeddings", {"model": model, "input": text}, target.counter)

    request = lambda texts: {"model": model, "input": texts, **kwargs}  # noqa: E731
    embedding = lambda response, found, position: found[0].embedding  # noqa: E731
    return _prompts_plan(cost, request, lambda r: r.data, embedding, batch_size, ceiling=MAX_TOKENS_PER_EMBEDDING)


def _is_conversation(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(message, Mapping) or hasattr(message, "role") for message in value)
    )


def _chat_plan(target: BulkTarget, model: str, batch_size: int, kwargs: Dict[str, Any]) -> _Plan:
    n = kwargs.get("n", 1)
    _check_positive_int("n", n, upper=128)
    priced = {k: v for k, v in kwargs.items() if k in ("max_tokens", "max_completion_tokens", "n")}

    def cost(messages: Any) -> int:
        return estimate_cost("chat", {"model": model, "messages": messages, **priced}, target.counter)

    def result(response: Any, choices: List[Any], position: int) -> Any:
        response.choices = choices  # in index order
        return response

    # The API takes one conversation per request: its n choices are checked like a batch of one input.
    return _Plan(
        check=_is_conversation,
        what="a non-empty list of messages",
        cost=cost,
        request=lambda conversations: {"model": model, "messages": conversations[0], **kwargs},
        answers=lambda response: response.choices,
        result=result,
        batch_size=1,
        n=n,
        prepare=list,
    )


#: For each endpoint: how its inputs are planned into requests (``batch_size`` is unused for chat).
PLANS: Dict[str, Callable[[BulkTarget, str, int, Dict[str, Any]], _Plan]] = {
    "completions": _completions_plan,
    "embeddings": _embeddings_plan,
    "chat": _chat_plan,
}


# -- the run, as both engines keep it -----------------------------------------------------------


class _Pending(Protocol):
    """A request's outcomes to come: a thread's ``Future`` or an asyncio ``Task``."""

    def done(self) -> bool: ...

    def cancelled(self) -> bool: ...

    def result(self) -> List[Any]: ...


F = TypeVar("F", bound=_Pending)


class _DeadlinePassed(Exception):
    pass


def _outcomes(future: _Pending, size: int) -> List[Any]:
    try:
        return future.result()
    except BaseException as exc:  # the whole request failed: every input of it did
        return [exc] * size


def _is_fatal(outcome: Any) -> bool:
    """An error every later request would get too: no quota left, a bad key, no permission."""
    if isinstance(outcome, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return True
    return isinstance(outcome, openai.RateLimitError) and Retry.classify(outcome)[0] == "quota"


class _Window(Generic[F]):
    """The requests handed out and not yet reported, in input order, each with its pending outcomes."""

    def __init__(self) -> None:
        self.handed_out: Deque[Tuple[Batch[Any], F]] = deque()

    def __len__(self) -> int:
        return len(self.handed_out)

    def room(self, target: int) -> int:
        """How many more requests to hand out now, to keep ``target`` in flight: at most ``_LOOKAHEAD``
        times as many handed out, so that ordered output carries on past one slow request."""
        running = sum(not future.done() for _, future in self.handed_out)
        return max(0, min(target - running, _LOOKAHEAD * target - len(self.handed_out)))

    def add(self, batch: Batch[Any], future: F) -> None:
        self.handed_out.append((batch, future))

    def unfinished(self) -> List[F]:
        return [future for _, future in self.handed_out if not future.done()]

    def take_ready(self, ordered: bool) -> List[Tuple[Batch[Any], F]]:
        """Remove and return the finished requests that may be reported now: all of them, or in
        order, those at the head."""
        ready: List[Tuple[Batch[Any], F]] = []
        if ordered:
            while self.handed_out and self.handed_out[0][1].done():
                ready.append(self.handed_out.popleft())
            return ready
        waiting: Deque[Tuple[Batch[Any], F]] = deque()
        for pair in self.handed_out:
            (ready if pair[1].done() else waiting).append(pair)
        self.handed_out = waiting
        return ready

    def leftovers(self) -> Iterator[Tuple[int, Any]]:
        """``(position, result or exception)`` of the requests that finished but were never reported:
        what a run stopped by its deadline or Ctrl-C still obtained."""
        for batch, future in self.handed_out:
            if future.done() and not future.cancelled():
                for position, outcome in zip(batch.positions, _outcomes(future, len(batch.items))):
                    if not isinstance(outcome, Cancelled):
                        yield position, outcome


class _Run(Generic[F]):
    """One bulk run, as both engines keep it: the plan, the window of requests, the counts, the error
    that ends every remaining input, the latency seen, the concurrency derived from them, progress,
    and the stop signal. Subclasses schedule the requests and wait for them."""

    #: Most requests in flight at once when the concurrency is derived.
    ceiling = _MAX_DERIVED_WORKERS

    def __init__(
        self,
        target: BulkTarget,
        plan: _Plan,
        concurrency: Optional[int],
        progress: ProgressArg,
        timeout: Optional[float],
        total: Optional[int],
    ) -> None:
        self.limiter = target.limiter
        self.key = target.key
        self.create = target.create
        self.plan = plan
        self.fixed = concurrency
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
        self.window: _Window[F] = _Window()
        self.progress = progress
        self._report, self._close_progress = _progress_reporter(False, None)

    def start(self) -> float:
        """Start the clock and the progress display; returns the deadline (``math.inf``: none)."""
        self.started = time.monotonic()
        self._report, self._close_progress = _progress_reporter(self.progress, self.total)
        return math.inf if self.timeout is None else self.started + self.timeout

    def concurrency(self, known: bool, rate: Optional[float]) -> int:
        """Requests to keep in flight, given whether the limits are ``known`` and the request ``rate``
        (per second): the rate times the latency, with a quarter to spare. One, while the limits are
        unknown: the first answer tells the budget batches must fit."""
        if not known:
            return 1
        if self.fixed is not None:
            return self.fixed
        if rate is None or self.latency == 0.0:
            return 8
        return max(2, min(self.ceiling, math.ceil(rate * self.latency * 1.25) + 1))

    @contextmanager
    def sending(self, batch: Batch[Any]) -> Iterator[_Exchange]:
        """Around one batch's exchange, in the thread or task that sends it: nothing goes out after the
        stop, and the time its requests spent on the wire (waits excluded) feeds the latency."""
        if self.fatal is None and self.stop.is_set():
            raise Cancelled("the bulk call stopped before this request was sent")
        exchange = _Exchange(self.plan, batch, self.fatal)
        current.cancel = self.stop  # also: the client's max_wait does not apply, the run's deadline does
        current.waited = 0.0
        started = time.monotonic()
        try:
            yield exchange
        finally:
            current.cancel = None
            if exchange.sent:
                spent = time.monotonic() - started - current.waited
                self.latency = spent if self.latency == 0.0 else 0.8 * self.latency + 0.2 * spent

    def ready(self, ordered: bool, deadline: float) -> Tuple[List[Tuple[Batch[Any], F]], float]:
        """The finished requests that may be reported now (removed from the window) and the seconds
        left before ``deadline``; :class:`_DeadlinePassed` when none is ready and none are left."""
        ready = self.window.take_ready(ordered)
        left = deadline - time.monotonic()
        if not ready and left <= 0:
            raise _DeadlinePassed
        return ready, left

    def record(self, batch: Batch[Any], future: F) -> List[Tuple[int, Any]]:
        """Count a finished request's outcomes and report progress; returns ``(position, outcome)``
        for each of its inputs that was sent."""
        reported = []
        for position, outcome in zip(batch.positions, _outcomes(future, len(batch.items))):
            if isinstance(outcome, Cancelled):
                continue  # never sent: neither a result nor an error
            self.done += 1
            if isinstance(outcome, BaseException):
                self.failed += 1
                if self.fatal is None and _is_fatal(outcome):
                    self.fatal = outcome
            reported.append((position, outcome))
        self._report(self)
        return reported


Reporter = Tuple[Callable[["_Run[Any]"], None], Callable[[], None]]


def _progress_reporter(progress: ProgressArg, total: Optional[int]) -> Reporter:
    """``(update after each request, close at the end)`` for the ``progress`` argument."""
    if not progress:
        return (lambda run: None), (lambda: None)
    if callable(progress):
        callback = progress

        def report(run: _Run[Any]) -> None:
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

    def update(run: _Run[Any]) -> None:
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


class _Results:
    """What a bulk call hands back besides what it yields: the results obtained, by input position,
    and the exception each failed input ended with."""

    def __init__(self, return_exceptions: bool) -> None:
        self.return_exceptions = return_exceptions
        self.kept: Dict[int, Any] = {}
        self.errors: Dict[int, BaseException] = {}

    def failure(self, position: int, outcome: Any) -> bool:
        """Whether ``outcome`` is a failure that stops the run (an exception, without
        ``return_exceptions``); if so, it is kept as the input's error."""
        if isinstance(outcome, BaseException) and not self.return_exceptions:
            self.errors[position] = outcome
            return True
        return False

    def take(self, position: int, outcome: Any) -> bool:
        """Keep an outcome as the caller asked; returns whether it stops the run."""
        if self.failure(position, outcome):
            return True
        self.kept[position] = outcome
        return False

    def drained(self, outcomes: Iterable[Tuple[int, Any]]) -> None:
        """Keep what came back after the run stopped: each exception as an error."""
        for position, outcome in outcomes:
            if isinstance(outcome, BaseException):
                self.errors[position] = outcome
            else:
                self.kept[position] = outcome

    def laid_out(self, size: Optional[int] = None) -> List[Any]:
        """The results aligned with the input (``None`` where there is none), ``size`` long, or up to
        the last input with an outcome."""
        if size is None:
            size = max([*self.kept, *self.errors], default=-1) + 1
        results: List[Any] = [None] * size
        for position, outcome in self.kept.items():
            results[position] = outcome
        return results

    def final(self, run: _Run[Any], size: int) -> List[Any]:
        """The results of a run that went to its end; BulkError if an input failed."""
        results = self.laid_out(size)
        if self.errors:
            first = min(self.errors)
            raise BulkError(
                f"{len(self.errors)} of {size} inputs failed, the first (input {first}) with {self.errors[first]!r}; "
                f"{run.done - run.failed} done, the rest not sent",
                results,
                self.errors,
            )
        return results

    def failed_at(self, position: int, laid_out: List[Any]) -> BulkError:
        """The error of a lazy run stopped by the failure of input ``position``."""
        return BulkError(f"input {position} failed: {self.errors[position]!r}", laid_out, self.errors)

    def timed_out(self, run: _Run[Any], size: Optional[int], laid_out: List[Any]) -> BulkTimeout:
        of = "" if size is None else f" of {size}"
        return BulkTimeout(f"run_timeout passed with {run.done}{of} inputs done", laid_out, self.errors)


# -- the thread engine -------------------------------------------------------------------------


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


class _ThreadRun(_Run["Future[List[Any]]"]):
    """A run on worker threads, the main thread waiting for them in short slices (Ctrl-C)."""

    def target(self) -> int:
        known = self.limiter.limits_known(self.key)
        return self.concurrency(known, self.limiter.request_rate(self.key) if known else None)

    def budget(self) -> Optional[int]:
        known = self.limiter.limits_known(self.key)
        return self.plan.budget(known, self.limiter.token_burst(self.key) if known else None)

    def batches(self, inputs: Iterable[Any]) -> Iterator[Batch[Any]]:
        """The input packed into requests, lazily; each input checked as it is read."""
        items = (self.plan.item(position, value) for position, value in enumerate(inputs))
        return pack(items, self.plan.batch_size, self.budget, self.plan.kind)

    def _work(self, batch: Batch[Any]) -> List[Any]:
        with self.sending(batch) as exchange:
            for kwargs in exchange:
                try:
                    exchange.answer(self.create(**kwargs))
                except Exception as exc:
                    exchange.answer(exc)
        return exchange.outcomes

    def results(self, batches: Iterator[Batch[Any]], ordered: bool) -> Generator[Tuple[int, Any], None, None]:
        """Yield ``(position, result or exception)`` for every input of ``batches`` that was sent.

        After ``stop`` is set nothing more is handed out, and what was handed out is drained (its
        unsent part ends as :class:`Cancelled`). An error from the input iterable is raised after
        every result already obtained has been yielded.
        """
        deadline = self.start()
        pool = _Pool(self.fixed or self.ceiling)
        window = self.window
        source_error: Optional[BaseException] = None
        exhausted = False
        try:
            while True:
                for _ in range(0 if exhausted or self.stop.is_set() else window.room(self.target())):
                    try:
                        batch = next(batches, None)
                    except Exception as exc:  # the caller's iterable failed: finish what was sent first
                        source_error, batch = exc, None
                    if batch is None:
                        exhausted = True
                        break
                    window.add(batch, pool.submit(self._work, batch))
                if not window:
                    break
                ready, left = self.ready(ordered, deadline)
                if not ready:
                    # In slices: Ctrl-C reaches the main thread only between waits on some platforms.
                    wait(window.unfinished(), timeout=min(left, _WAIT_SLICE), return_when=FIRST_COMPLETED)
                for batch, future in ready:
                    yield from self.record(batch, future)
            if source_error is not None:
                raise source_error
        finally:
            self.stop.set()
            for _, future in window.handed_out:
                future.cancel()  # not started yet: never sent
            pool.shutdown()
            # Workers waiting in the limiter notice the stop within a quarter second; a request on
            # the wire cannot be recalled and its (daemon) thread finishes it alone.
            wait([future for _, future in window.handed_out if not future.cancelled()], timeout=_STOP_GRACE)
            self._close_progress()


def _collect(run: _ThreadRun, batches: Iterator[Batch[Any]], size: int, return_exceptions: bool) -> List[Any]:
    """Drive ``run`` to the end and return results aligned with the input; see ``map_completions``."""
    results = _Results(return_exceptions)
    try:
        with closing(run.results(batches, ordered=False)) as outcomes:
            for position, outcome in outcomes:
                if results.take(position, outcome):
                    run.stop.set()  # send nothing more, but keep what is already on its way
    except (_DeadlinePassed, KeyboardInterrupt) as stop:
        results.drained(run.window.leftovers())
        if isinstance(stop, KeyboardInterrupt):
            _interrupted(stop, results.laid_out(size), results.errors)
            raise
        raise results.timed_out(run, size, results.laid_out(size)) from None
    return results.final(run, size)


def _iterate(
    run: _ThreadRun, batches: Iterator[Batch[Any]], ordered: bool, return_exceptions: bool
) -> Iterator[Tuple[int, Any]]:
    """Yield from ``run``; on a failure (without ``return_exceptions``), a timeout or Ctrl-C, drain what
    is already on its way and raise with every result the caller has not been given: ``results`` is
    aligned with the input up to the last input read (results already yielded are not kept twice:
    keeping them all would break the flat memory an unbounded input needs)."""
    outcomes = run.results(batches, ordered)
    results = _Results(return_exceptions)

    def drain() -> List[Any]:
        """Stop sending, wait for what is in flight, and lay out what was obtained."""
        run.stop.set()
        try:
            results.drained(outcomes)
        except _DeadlinePassed:
            pass
        finally:
            outcomes.close()
        results.drained(run.window.leftovers())  # finished, never reported: a deadline or Ctrl-C came first
        return results.laid_out()

    try:
        for position, outcome in outcomes:
            if results.failure(position, outcome):
                raise results.failed_at(position, drain())
            yield position, outcome
    except _DeadlinePassed:
        raise results.timed_out(run, None, drain()) from None
    except KeyboardInterrupt as stop:
        _interrupted(stop, drain(), results.errors)
        raise
    finally:
        outcomes.close()


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
    plan = _planned(endpoint, target, inputs, batch_size, max_workers, progress, run_timeout, kwargs)
    items = _all_checked(plan, inputs)
    if not items:
        return []
    run = _ThreadRun(target, plan, max_workers, progress, run_timeout, len(items))
    return _collect(run, run.batches(items), len(items), return_exceptions)


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
    plan = _planned(endpoint, target, inputs, batch_size, max_workers, progress, run_timeout, kwargs)
    total = len(inputs) if isinstance(inputs, Sequence) else None
    run = _ThreadRun(target, plan, max_workers, progress, run_timeout, total)
    return _iterate(run, run.batches(inputs), ordered, return_exceptions)
