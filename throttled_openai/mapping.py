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

import math
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
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
    Set,
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
from .errors import Cancelled, ThrottledOpenAIError
from .tokens import estimate_cost

if TYPE_CHECKING:
    from .client import _ThrottledMixin

__all__ = ["BulkError", "BulkInterrupted", "Progress"]

# Ceiling on threads when the concurrency is derived rather than given.
_MAX_DERIVED_WORKERS = 64
# Seconds a stopped run waits for requests already sent before it returns.
_STOP_GRACE = 2.0
# How many requests may be handed out beyond those in flight, as a multiple of the in-flight target:
# lets ordered output carry on past one slow request without reading the whole input.
_LOOKAHEAD = 4


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
    """The bulk call's ``timeout`` passed before every input was done."""


class BulkInterrupted(KeyboardInterrupt):
    """Ctrl-C during a bulk call: what was not sent was cancelled. ``results`` / ``errors`` as in
    :class:`BulkError`. A subclass of ``KeyboardInterrupt``, so it still stops the program."""

    def __init__(self, results: List[Any], errors: Dict[int, BaseException]) -> None:
        super().__init__("interrupted: results obtained so far are in .results")
        self.results = results
        self.errors = errors


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


# -- validation --------------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any, upper: Optional[int] = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1 or (upper is not None and value > upper):
        bound = f"between 1 and {upper}" if upper is not None else ">= 1"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _check_common(kwargs: Mapping[str, Any], max_workers: Optional[int], timeout: Optional[float]) -> None:
    if kwargs.get("stream"):
        raise ValueError("stream=True is not supported by the bulk helpers; call create() for streams")
    _check_positive_int("max_workers", max_workers, allow_none=True)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")


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


class _Run:
    """One bulk run: the thread pool, the window of requests, progress and the stop signal."""

    def __init__(
        self,
        client: _ThrottledMixin,
        model: str,
        send: Callable[[Batch[Any]], List[Any]],
        max_workers: Optional[int],
        progress: ProgressArg,
        timeout: Optional[float],
        total: Optional[int],
    ) -> None:
        self.client = client
        self.key = (client._account, model)
        self.send = send
        self.fixed_workers = max_workers
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.deadline = math.inf if timeout is None else self.started + timeout
        self.total = total
        self.done = 0
        self.failed = 0
        self.latency = 0.0  # moving average of a request's seconds in flight, waits excluded
        self.stats0 = client.stats()
        self.report, self.close_progress = _progress_reporter(progress, total)

    def target(self) -> int:
        """Requests to keep in flight: the request rate times the latency, with a quarter to spare."""
        if self.fixed_workers is not None:
            return self.fixed_workers
        rate = self.client.limiter.request_rate(self.key)  # requests per second, or None
        if rate is None or self.latency == 0.0:
            return 8
        return max(2, min(_MAX_DERIVED_WORKERS, math.ceil(rate * self.latency * 1.25) + 1))

    def _work(self, batch: Batch[Any]) -> List[Any]:
        if self.stop.is_set():
            raise Cancelled("the bulk call stopped before this request was sent")
        from .client import _current

        _current.cancel = self.stop
        started = time.monotonic()
        try:
            return self.send(batch)
        finally:
            _current.cancel = None
            spent = time.monotonic() - started
            self.latency = spent if self.latency == 0.0 else 0.8 * self.latency + 0.2 * spent

    def results(self, batches: Iterator[Batch[Any]], ordered: bool) -> Generator[Tuple[int, Any], None, None]:
        """Yield ``(position, result or exception)`` for every input of ``batches``."""
        cap = self.fixed_workers or _MAX_DERIVED_WORKERS
        executor = ThreadPoolExecutor(max_workers=cap, thread_name_prefix="throttled_openai")
        handed_out: Deque[Tuple[Batch[Any], Future[List[Any]]]] = deque()
        running: Set[Future[List[Any]]] = set()
        exhausted = False
        try:
            while True:
                target = self.target()
                while not exhausted and len(running) < target and len(handed_out) < _LOOKAHEAD * target:
                    batch = next(batches, None)
                    if batch is None:
                        exhausted = True
                        break
                    future = executor.submit(self._work, batch)
                    handed_out.append((batch, future))
                    running.add(future)
                if not handed_out:
                    return
                left = None if self.deadline == math.inf else max(0.0, self.deadline - time.monotonic())
                if ordered:
                    wait([handed_out[0][1]], timeout=left)
                    ready = [handed_out[0]] if handed_out[0][1].done() else []
                else:
                    ready = [pair for pair in handed_out if pair[1].done()]
                    if not ready:
                        wait([future for _, future in handed_out], timeout=left, return_when=FIRST_COMPLETED)
                        ready = [pair for pair in handed_out if pair[1].done()]
                if not ready:
                    raise _DeadlinePassed
                for batch, future in ready:
                    handed_out.remove((batch, future))  # Batch compares by identity
                    outcomes = _outcomes(future, len(batch.items))
                    self.done += len(outcomes)
                    self.failed += sum(isinstance(outcome, BaseException) for outcome in outcomes)
                    yield from zip(batch.positions, outcomes)
                    self.report(self)
                running = {future for _, future in handed_out if not future.done()}
        finally:
            # Stop: nothing more is sent, workers waiting in the limiter give up within a fraction of a
            # second. A request already on the wire cannot be recalled: give it a moment, then leave
            # its thread to finish on its own.
            self.stop.set()
            executor.shutdown(wait=False, cancel_futures=True)
            wait([future for _, future in handed_out], timeout=_STOP_GRACE)
            self.close_progress()


class _DeadlinePassed(Exception):
    pass


def _outcomes(future: Future[List[Any]], size: int) -> List[Any]:
    try:
        return future.result()
    except BaseException as exc:  # the whole request failed: every input of it did
        return [exc] * size


Reporter = Tuple[Callable[["_Run"], None], Callable[[], None]]


def _progress_reporter(progress: ProgressArg, total: Optional[int]) -> Reporter:
    """``(update after each request, close at the end)`` for the ``progress`` argument."""
    if not progress:
        return (lambda run: None), (lambda: None)
    if callable(progress):
        callback = progress

        def report(run: _Run) -> None:
            stats = run.client.stats()
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
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ImportError("progress=True needs tqdm: pip install 'throttled-openai[progress]'") from exc
    bar = tqdm(total=total, unit="input", dynamic_ncols=True)

    def update(run: _Run) -> None:
        stats = run.client.stats()
        bar.update(run.done - bar.n)
        bar.set_postfix(
            failed=run.failed,
            **{"429s": stats.total_429s - run.stats0.total_429s},
            waited=f"{stats.wait_seconds - run.stats0.wait_seconds:.0f}s",
            refresh=False,
        )

    return update, bar.close


def _collect(run: _Run, batches: Iterator[Batch[Any]], size: int, return_exceptions: bool) -> List[Any]:
    """Drive ``run`` to the end and return results aligned with the input; see ``map_completions``."""
    results: List[Any] = [None] * size
    errors: Dict[int, BaseException] = {}
    try:
        with closing(run.results(batches, ordered=False)) as outcomes:
            for position, outcome in outcomes:
                if isinstance(outcome, BaseException) and not return_exceptions:
                    errors[position] = outcome
                    done = run.done - run.failed
                    raise BulkError(f"input {position} failed: {outcome!r} ({done} of {size} done)", results, errors)
                results[position] = outcome
    except _DeadlinePassed:
        raise BulkTimeout(f"timeout passed with {run.done} of {size} inputs done", results, errors) from None
    except KeyboardInterrupt:
        raise BulkInterrupted(results, errors) from None
    return results


def _iterate(
    run: _Run, batches: Iterator[Batch[Any]], ordered: bool, return_exceptions: bool
) -> Iterator[Tuple[int, Any]]:
    try:
        with closing(run.results(batches, ordered)) as outcomes:
            for position, outcome in outcomes:
                if isinstance(outcome, BaseException) and not return_exceptions:
                    raise BulkError(f"input {position} failed: {outcome!r}", [], {position: outcome})
                yield position, outcome
    except _DeadlinePassed:
        raise BulkTimeout(f"timeout passed with {run.done} inputs done", [], {}) from None


# -- what to send -----------------------------------------------------------------------------


def _sender(
    create: Callable[[List[Any]], Any],
    answers: Callable[[Any], Sequence[Any]],
    result: Callable[[List[Any], int], Any],
    cost: Callable[[Any], int],
    n: int = 1,
) -> Callable[[Batch[Any]], List[Any]]:
    """How one batch is sent: ``create(items)`` makes the request, ``answers(response)`` lists its
    indexed answers (``n`` per input), ``result(answers, position)`` is what the caller gets."""

    def send(batch: Batch[Any], again: bool = True) -> List[Any]:
        from .client import _current

        _current.cost = batch.cost  # already counted while packing: spare the client a second count
        try:
            response = create(list(batch.items))
        except openai.BadRequestError as exc:
            _current.cost = None
            if len(batch.items) == 1:
                return [exc]
            left, right = batch.halves(cost)  # find the input the 400 is about
            return send(left, again) + send(right, again)
        except Exception as exc:
            _current.cost = None
            return [exc] * len(batch.items)
        outcomes: List[Any] = []
        for k, found in enumerate(split_choices(answers(response), len(batch.items), n)):
            if not isinstance(found, IncompleteResponse):
                outcomes.append(result(found, batch.positions[k]))
            elif again:  # ask once more, alone
                outcomes.extend(send(Batch((batch.positions[k],), (batch.items[k],), cost(batch.items[k])), False))
            else:
                outcomes.append(found)
        return outcomes

    return send


def _token_budget(client: _ThrottledMixin, model: str, ceiling: Optional[int] = None) -> Callable[[], Optional[int]]:
    """The most tokens one request may cost: what the limiter lets through at once (its burst)."""
    key = (client._account, model)

    def budget() -> Optional[int]:
        burst = client.limiter.token_burst(key)
        if burst is None:
            return ceiling
        return max(1, int(burst)) if ceiling is None else min(ceiling, max(1, int(burst)))

    return budget


def _completions_plan(
    client: _ThrottledMixin, prompts: Iterable[Any], model: str, batch_size: int, kwargs: Dict[str, Any]
) -> Tuple[Iterator[Batch[Any]], Callable[[Batch[Any]], List[Any]]]:
    _check_positive_int("batch_size", batch_size, upper=2048)
    n = kwargs.get("n", 1)
    _check_positive_int("n", n, upper=128)
    priced = {k: v for k, v in kwargs.items() if k in ("max_tokens", "n", "best_of")}

    def cost(prompt: Any) -> int:
        return estimate_cost("completions", {"model": model, "prompt": prompt, **priced}, client._counter)

    def result(choices: List[Any], position: int) -> Any:
        for j, choice in enumerate(choices):
            choice.index = position * n + j  # the index it would have in one request for all inputs
        return choices[0] if n == 1 else choices

    checked = _checked(prompts, _is_prompt, "a str or a list of token ids")
    items = ((position, prompt, cost(prompt)) for position, prompt in checked)
    batches = pack(items, batch_size, _token_budget(client, model), kind=lambda prompt: isinstance(prompt, str))
    create = client.completions.create  # type: ignore[attr-defined]
    send = _sender(lambda ps: create(model=model, prompt=ps, **kwargs), lambda r: r.choices, result, cost, n)
    return batches, send


def _embeddings_plan(
    client: _ThrottledMixin, inputs: Iterable[Any], model: str, batch_size: int, kwargs: Dict[str, Any]
) -> Tuple[Iterator[Batch[Any]], Callable[[Batch[Any]], List[Any]]]:
    _check_positive_int("batch_size", batch_size, upper=MAX_INPUTS_PER_EMBEDDING)

    def cost(text: Any) -> int:
        return estimate_cost("embeddings", {"model": model, "input": text}, client._counter)

    checked = _checked(inputs, _is_prompt, "a str or a list of token ids")
    items = ((position, text, cost(text)) for position, text in checked)
    budget = _token_budget(client, model, MAX_TOKENS_PER_EMBEDDING)
    batches = pack(items, batch_size, budget, kind=lambda text: isinstance(text, str))
    create = client.embeddings.create  # type: ignore[attr-defined]
    send = _sender(
        lambda texts: create(model=model, input=texts, **kwargs),
        lambda r: r.data,
        lambda found, position: found[0].embedding,
        cost,
    )
    return batches, send


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(message, Mapping) for message in value)


def _chat_plan(
    client: _ThrottledMixin, conversations: Iterable[Any], model: str, batch_size: int, kwargs: Dict[str, Any]
) -> Tuple[Iterator[Batch[Any]], Callable[[Batch[Any]], List[Any]]]:
    _check_positive_int("n", kwargs.get("n", 1), upper=128)
    priced = {k: v for k, v in kwargs.items() if k in ("max_tokens", "max_completion_tokens", "n")}

    def cost(messages: Any) -> int:
        return estimate_cost("chat", {"model": model, "messages": messages, **priced}, client._counter)

    checked = _checked(conversations, _is_conversation, "a non-empty list of message dicts")
    items = ((position, messages, cost(messages)) for position, messages in checked)
    batches = pack(items, 1, lambda: None)  # the API takes one conversation per request
    create = client.chat.completions.create  # type: ignore[attr-defined]

    def send(batch: Batch[Any]) -> List[Any]:
        from .client import _current

        _current.cost = batch.cost
        try:
            return [create(model=model, messages=batch.items[0], **kwargs)]
        except Exception as exc:
            _current.cost = None
            return [exc]

    return batches, send


Plan = Callable[
    ["_ThrottledMixin", Iterable[Any], str, int, Dict[str, Any]],
    Tuple[Iterator[Batch[Any]], Callable[[Batch[Any]], List[Any]]],
]

#: For each endpoint: how its inputs are planned into requests, and what one input must be.
PLANS: Dict[str, Tuple[Plan, Callable[[Any], bool], str]] = {
    "completions": (_completions_plan, _is_prompt, "a str or a list of token ids"),
    "embeddings": (_embeddings_plan, _is_prompt, "a str or a list of token ids"),
    "chat": (_chat_plan, _is_conversation, "a non-empty list of message dicts"),
}


def bulk_map(
    endpoint: str,
    client: _ThrottledMixin,
    inputs: Iterable[Any],
    model: str,
    batch_size: int,
    max_workers: Optional[int],
    return_exceptions: bool,
    progress: ProgressArg,
    timeout: Optional[float],
    kwargs: Dict[str, Any],
) -> List[Any]:
    """Every input checked before anything is sent, then run; results aligned with the input."""
    if isinstance(inputs, (str, bytes)):
        raise TypeError("inputs must be a list (or iterable) of inputs, not a single str")
    plan, check, what = PLANS[endpoint]
    items = inputs if isinstance(inputs, Sequence) else list(inputs)
    _check_common(kwargs, max_workers, timeout)
    for position, value in enumerate(items):
        if not check(value):
            raise TypeError(f"input {position} must be {what}, got {type(value).__name__}")
    batches, send = plan(client, items, model, batch_size, kwargs)
    if not items:
        return []
    run = _Run(client, model, send, max_workers, progress, timeout, len(items))
    return _collect(run, batches, len(items), return_exceptions)


def bulk_imap(
    endpoint: str,
    client: _ThrottledMixin,
    inputs: Iterable[Any],
    model: str,
    batch_size: int,
    max_workers: Optional[int],
    ordered: bool,
    return_exceptions: bool,
    progress: ProgressArg,
    timeout: Optional[float],
    kwargs: Dict[str, Any],
) -> Iterator[Tuple[int, Any]]:
    """Lazy: the input is read as requests go out, a bounded window ahead; each input is checked as
    it is read, before its request is sent."""
    if isinstance(inputs, (str, bytes)):
        raise TypeError("inputs must be an iterable of inputs, not a single str")
    _check_common(kwargs, max_workers, timeout)
    batches, send = PLANS[endpoint][0](client, inputs, model, batch_size, kwargs)
    total = len(inputs) if isinstance(inputs, Sequence) else None
    run = _Run(client, model, send, max_workers, progress, timeout, total)
    return _iterate(run, batches, ordered, return_exceptions)
