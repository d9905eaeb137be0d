"""``ThrottledClient``: an ``openai.OpenAI`` whose every request waits its turn under RPM and TPM limits.

How it hooks into the SDK, and why:

- ``request()`` is the one method every resource call (``chat.completions.create``, ``embeddings``,
  ``responses``, pagination, ...) goes through, with the request body still a dict. Overriding it lets
  one straight function estimate the cost, wait for capacity, call the SDK, settle the usage and
  retry, with the SDK's own retries turned off so the two never multiply.
- The response headers (``x-ratelimit-*``) are read by an httpx response *event hook*, a public
  extension point of httpx and httpx2 that also works on an ``http_client`` the user brings.
- ``copy()``/``with_options()`` hand the limiter, counters and policy to the new client through the
  SDK's ``_extra_kwargs``, so copies share one budget.
``tests/test_sdk_contract.py`` fails loudly if a release of the SDK changes any of these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, TypeVar, Union

import openai

from . import mapping
from .batching import MAX_INPUTS_PER_EMBEDDING, MAX_PROMPTS_PER_COMPLETION
from .errors import Cancelled, RateLimitTimeout, RequestTooLarge
from .headers import parse_limit_message, parse_rate_limit_headers
from .limiter import LimitKey, Limits, RateLimiter, Reservation
from .mapping import ProgressArg
from .retry import Retry
from .stats import Stats, StatsSnapshot
from .tokens import TokenCounter, assumed_output_cap, endpoint_of, estimate_cost, usage_tokens

__all__ = ["ThrottledAzureClient", "ThrottledClient"]

log = logging.getLogger("throttled_openai")

_T = TypeVar("_T", bound="_ThrottledMixin")
_UNSET: Any = object()


class _Attempt:
    """The attempt in flight on this thread, for the response hook to report headers to."""

    __slots__ = ("limiter", "reservation", "stats", "stream")

    def __init__(self, limiter: RateLimiter, reservation: Reservation, stream: bool, stats: Stats) -> None:
        self.limiter = limiter
        self.reservation = reservation
        self.stream = stream
        self.stats = stats

    def settle(self, used: Optional[int]) -> None:
        self.limiter.settle(self.reservation, used)
        if used is not None:
            self.stats.used(used)


_current = threading.local()


def _on_response(response: Any) -> None:
    """httpx response hook: feed this thread's attempt the rate-limit headers, before the body is read.
    A successful stream is settled when it ends, against the ``usage`` its last events may carry."""
    attempt: Optional[_Attempt] = getattr(_current, "attempt", None)
    if attempt is None:
        return
    attempt.limiter.observe(attempt.reservation, parse_rate_limit_headers(response.headers), response.status_code)
    if attempt.stream and 200 <= response.status_code < 300:
        response.stream = _scanner_for(response)(response.stream, attempt.settle)


_SCANNERS: Dict[type, type] = {}


def _scanner_for(response: Any) -> Any:
    """:class:`_UsageScanner` as a subclass of the ``SyncByteStream`` of the response's HTTP library
    (httpx or httpx2): httpx refuses to iterate a stream that is not one."""
    library = sys.modules[type(response).__module__.split(".")[0]]
    base: type = library.SyncByteStream
    scanner = _SCANNERS.get(base)
    if scanner is None:
        scanner = _SCANNERS[base] = type("_UsageScanner", (_UsageScanner, base), {})
    return scanner


class _UsageScanner:
    """Wraps a streamed response body (httpx's ``Response.stream``) and, when it ends or is closed,
    reports the token ``usage`` found in its last server-sent events (``None`` when there is none, e.g.
    without ``stream_options={"include_usage": True}``: then the estimate stays charged)."""

    _TAIL = 16_384  # bytes kept from the end of the stream: usage comes in the last events

    def __init__(self, inner: Any, report: Callable[[Optional[int]], None]) -> None:
        self._inner = inner
        self._report = report
        self._tail = b""
        self._reported = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._inner:
                self._tail = (self._tail + chunk)[-self._TAIL :]
                yield chunk
        finally:
            self._finish()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._reported:
            return
        self._reported = True
        used = None
        for line in reversed(self._tail.split(b"\n")):
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    used = usage_tokens(json.loads(line[5:]).get("usage"))
                except (ValueError, AttributeError):
                    used = None
                if used is not None:
                    break
        self._report(used)


def _account_hash(api_key: object, base_url: object) -> str:
    """Who the limits belong to, as 16 hex digits: a key must never appear in keys, logs or reprs."""
    secret = api_key if isinstance(api_key, str) else f"provider:{id(api_key)}"
    return hashlib.sha256(f"{base_url}\0{secret}".encode()).hexdigest()[:16]


def _check_max_wait(max_wait: Optional[float]) -> Optional[float]:
    if max_wait is None:
        return None
    if isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)):
        raise TypeError(f"max_wait must be a number of seconds or None, got {max_wait!r}")
    if math.isnan(max_wait) or max_wait < 0:
        raise ValueError(f"max_wait must be >= 0 seconds or None, got {max_wait!r}")
    return float(max_wait)


def _make_retry(retry: Union[Retry, int, None], max_retries: Any) -> Retry:
    if isinstance(retry, Retry):
        return retry
    if retry is None:
        given = not isinstance(max_retries, openai.NotGiven) and max_retries is not _UNSET
        return Retry(max_retries=max_retries) if given else Retry()
    if isinstance(retry, int) and not isinstance(retry, bool):
        return Retry(max_retries=retry)
    raise TypeError(f"retry must be a throttled_openai.Retry, an int or None, got {type(retry).__name__}")


class _ThrottledMixin:
    """The throttling shared by :class:`ThrottledClient` and :class:`ThrottledAzureClient`."""

    _limiter: RateLimiter
    _retry: Retry
    _max_wait: Optional[float]
    _stats: Stats
    _counter: TokenCounter
    _account: str

    def __init__(
        self,
        *,
        rpm: Optional[float] = None,
        tpm: Optional[float] = None,
        limits: Optional[Mapping[str, Limits]] = None,
        limiter: Optional[RateLimiter] = None,
        retry: Union[Retry, int, None] = None,
        max_wait: Optional[float] = None,
        _stats: Optional[Stats] = None,
        _counter: Optional[TokenCounter] = None,
        **kwargs: Any,
    ) -> None:
        if limiter is not None:
            if not isinstance(limiter, RateLimiter):
                raise TypeError(f"limiter must be a throttled_openai.RateLimiter, got {type(limiter).__name__}")
            if rpm is not None or tpm is not None or limits:
                raise ValueError("give either limiter or rpm/tpm/limits: a shared limiter carries its own limits")
        else:
            limiter = RateLimiter(rpm, tpm, limits=limits)
        self._limiter = limiter
        self._retry = _make_retry(retry, kwargs.pop("max_retries", _UNSET))
        self._max_wait = _check_max_wait(max_wait)
        self._stats = _stats or Stats()
        self._counter = _counter or TokenCounter()
        http_client = kwargs.get("http_client")
        if http_client is None:
            http_client = kwargs["http_client"] = openai.DefaultHttpxClient()
        hooks = http_client.event_hooks
        if _on_response not in hooks["response"]:
            hooks["response"] = [*hooks["response"], _on_response]
            http_client.event_hooks = hooks
        key_provider = kwargs.get("api_key") if callable(kwargs.get("api_key")) else None
        # Our retry loop replaces the SDK's: with both, every attempt of ours would be up to 3 of theirs.
        super().__init__(max_retries=0, **kwargs)  # type: ignore[call-arg]
        secret = key_provider or getattr(self, "api_key", None)
        self._account = _account_hash(secret, getattr(self, "base_url", ""))

    # -- public surface --------------------------------------------------------------------------

    @property
    def limiter(self) -> RateLimiter:
        """The limiter this client (and its copies) waits on; pass it to another client to share it."""
        return self._limiter

    @property
    def retry(self) -> Retry:
        """The retry policy of this client."""
        return self._retry

    @property
    def max_wait(self) -> Optional[float]:
        """Longest time in seconds one call may spend waiting (for capacity or backoff); None: no limit."""
        return self._max_wait

    def stats(self) -> StatsSnapshot:
        """Counters of this client and every copy made from it, with the limiter's view of each model's
        limits (``limits``: see :meth:`RateLimiter.snapshot`: windows, sources, budgets, cost factor)."""
        return dataclasses.replace(self._stats.snapshot(), limits=self._limiter.snapshot())

    def copy(
        self: _T, *, retry: Union[Retry, int, None] = None, max_wait: Optional[float] = _UNSET, **kwargs: Any
    ) -> _T:
        """The SDK's ``copy``, plus ``retry`` and ``max_wait``; the copy shares limiter and counters.

        ``max_retries`` given here changes the retry policy's ``max_retries``, not the SDK's.
        """
        max_retries = kwargs.pop("max_retries", _UNSET)
        if retry is None:
            given = max_retries is not _UNSET and not isinstance(max_retries, openai.NotGiven)
            retry = self._retry.replace(max_retries=max_retries) if given else self._retry
        extra = dict(kwargs.pop("_extra_kwargs", None) or {})
        extra.update(
            limiter=self._limiter,
            retry=retry,
            max_wait=self._max_wait if max_wait is _UNSET else max_wait,
            _stats=self._stats,
            _counter=self._counter,
        )
        return super().copy(_extra_kwargs=extra, **kwargs)  # type: ignore[misc, no-any-return]

    with_options = copy

    def __repr__(self) -> str:
        return f"<{type(self).__name__} base_url={str(getattr(self, 'base_url', ''))!r} limiter={self._limiter!r}>"

    # -- bulk ------------------------------------------------------------------------------------

    def map_completions(
        self,
        prompts: Iterable[Any],
        *,
        model: str,
        batch_size: int = MAX_PROMPTS_PER_COMPLETION,
        max_workers: Optional[int] = None,
        return_exceptions: bool = False,
        progress: ProgressArg = False,
        timeout: Optional[float] = None,
        **kwargs: Any,
    ) -> List[Any]:
        """Complete every prompt with the legacy completions API; ``result[i]`` answers ``prompts[i]``.

        Up to ``batch_size`` prompts share one request (``prompt`` as a list; 20 is the documented
        maximum), within the token budget the limiter can pass at once. Each result is the SDK's
        choice (a list of ``n`` choices when ``n > 1``), its ``index`` rewritten to ``i * n + j``.
        ``kwargs`` go to every ``completions.create`` (``max_tokens``, ``temperature``, ...).

        Every prompt is checked before anything is sent (``TypeError`` names the first bad one).
        ``max_workers``: requests in flight at once; ``None`` derives it from the limit and the
        latency. ``return_exceptions``: put a failed prompt's exception in its slot, like
        ``asyncio.gather``; otherwise the first failure stops the run with :class:`BulkError`, which
        carries the results and errors so far. A batch refused with a 400 is split until the prompt
        at fault fails alone. ``progress``: ``True`` for a tqdm bar, or a callable given a
        :class:`Progress`. ``timeout`` (seconds) bounds the whole run (:class:`BulkTimeout`). Ctrl-C
        stops within a couple of seconds with :class:`BulkInterrupted`, carrying the results so far.
        """
        return mapping.bulk_map(
            "completions", self, prompts, model, batch_size, max_workers, return_exceptions, progress, timeout, kwargs
        )

    def imap_completions(
        self,
        prompts: Iterable[Any],
        *,
        model: str,
        batch_size: int = MAX_PROMPTS_PER_COMPLETION,
        max_workers: Optional[int] = None,
        ordered: bool = True,
        return_exceptions: bool = False,
        progress: ProgressArg = False,
        timeout: Optional[float] = None,
        **kwargs: Any,
    ) -> Iterator[Tuple[int, Any]]:
        """Like :meth:`map_completions` over any iterable (a generator over a huge file included),
        yielding ``(i, result)``: in input order, or as results finish with ``ordered=False``. Only a
        bounded window of the input is read ahead, so memory stays flat however long the input."""
        return mapping.bulk_imap(
            "completions", self, prompts, model, batch_size, max_workers, ordered, return_exceptions,
            progress, timeout, kwargs,
        )  # fmt: skip

    def map_chat_completions(
        self,
        conversations: Iterable[Any],
        *,
        model: str,
        max_workers: Optional[int] = None,
        return_exceptions: bool = False,
        progress: ProgressArg = False,
        timeout: Optional[float] = None,
        **kwargs: Any,
    ) -> List[Any]:
        """One chat completion per conversation (a list of message dicts), run in parallel (the API
        cannot batch conversations); ``result[i]`` is the SDK's ``ChatCompletion`` for
        ``conversations[i]``. Other arguments as in :meth:`map_completions`."""
        return mapping.bulk_map(
            "chat", self, conversations, model, 1, max_workers, return_exceptions, progress, timeout, kwargs
        )

    def imap_chat_completions(
        self,
        conversations: Iterable[Any],
        *,
        model: str,
        max_workers: Optional[int] = None,
        ordered: bool = True,
        return_exceptions: bool = False,
        progress: ProgressArg = False,
        timeout: Optional[float] = None,
        **kwargs: Any,
    ) -> Iterator[Tuple[int, Any]]:
        """Lazy :meth:`map_chat_completions`, yielding ``(i, ChatCompletion)``; see :meth:`imap_completions`."""
        return mapping.bulk_imap(
            "chat", self, conversations, model, 1, max_workers, ordered, return_exceptions, progress, timeout, kwargs
        )

    def map_embeddings(
        self,
        inputs: Iterable[Any],
        *,
        model: str,
        batch_size: int = MAX_INPUTS_PER_EMBEDDING,
        max_workers: Optional[int] = None,
        return_exceptions: bool = False,
        progress: ProgressArg = False,
        timeout: Optional[float] = None,
        **kwargs: Any,
    ) -> List[Any]:
        """Embed every input; ``result[i]`` is the vector for ``inputs[i]``. Up to ``batch_size``
        inputs (2,048 at most) and 300,000 tokens share a request. Other arguments as in
        :meth:`map_completions`."""
        return mapping.bulk_map(
            "embeddings", self, inputs, model, batch_size, max_workers, return_exceptions, progress, timeout, kwargs
        )

    def imap_embeddings(
        self,
        inputs: Iterable[Any],
        *,
        model: str,
        batch_size: int = MAX_INPUTS_PER_EMBEDDING,
        max_workers: Optional[int] = None,
        ordered: bool = True,
        return_exceptions: bool = False,
        progress: ProgressArg = False,
        timeout: Optional[float] = None,
        **kwargs: Any,
    ) -> Iterator[Tuple[int, Any]]:
        """Lazy :meth:`map_embeddings`, yielding ``(i, vector)``; see :meth:`imap_completions`."""
        return mapping.bulk_imap(
            "embeddings", self, inputs, model, batch_size, max_workers, ordered, return_exceptions,
            progress, timeout, kwargs,
        )  # fmt: skip

    # -- one call --------------------------------------------------------------------------------

    def _limit_model(self, body: Mapping[str, Any]) -> str:
        """The model (or Azure deployment) whose limit a request counts against; ``*`` if none."""
        model = body.get("model")
        return model if isinstance(model, str) and model else "*"

    def request(self, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        """Send one API request under the limiter: estimate, wait, send, settle; retry by policy."""
        body = options.json_data if isinstance(options.json_data, Mapping) else {}
        endpoint = endpoint_of(str(options.url))
        key: LimitKey = (self._account, self._limit_model(body))
        cost = getattr(_current, "cost", None)  # a bulk helper's count, made while packing the batch
        if cost is None:
            cost = estimate_cost(endpoint, body, self._counter) if endpoint else 0
        _current.cost = None
        cancel = getattr(_current, "cancel", None)  # set while a bulk helper's worker runs this call
        policy, max_wait, limiter, stats = self._retry, self._max_wait, self._limiter, self._stats
        stats.call()
        waited_total, retries = 0.0, 0
        started = time.monotonic()
        while True:
            # 1. Wait for capacity, within what is left of max_wait and the policy's deadline.
            allowed = _remaining(max_wait, waited_total, policy.deadline, started)
            before = time.monotonic()
            try:
                reservation = limiter.acquire(key, cost, timeout=allowed, cancel=cancel)
            except RequestTooLarge as error:
                stats.failed_call()
                assumed = assumed_output_cap(endpoint, body) if endpoint else None
                if assumed is None:
                    raise
                raise error.with_detail(f"{assumed:,} output tokens assumed: pass max_tokens") from None
            except BaseException:
                stats.failed_call()
                raise
            try:
                waited = time.monotonic() - before
                waited_total += waited
                stats.attempt(cost, waited)
                _current.waited = getattr(_current, "waited", 0.0) + waited
                # 2. Send through the SDK; the response hook reports the headers to the limiter.
                streaming = bool(kwargs.get("stream"))
                _current.attempt = _Attempt(limiter, reservation, streaming, stats)
                result = super().request(cast_to, options, *args, **kwargs)  # type: ignore[misc]
            except (openai.APIStatusError, openai.APIConnectionError) as error:
                # 3a. Failed: charge what the server likely counted, then ask the policy.
                status = getattr(error, "status_code", None)
                limiter.settle(reservation, 0 if status is not None and status < 500 else None)
                if status == 429:  # "... per min (RPM): Limit 3, Used 3, Requested 1": learn that limit
                    message = parse_limit_message(getattr(error, "message", None) or str(error))
                    if message is not None:
                        limiter.learn_from_message(reservation, message)
                retries += 1
                decision = policy.decide(error, retries)
                if decision.pause_all:
                    limiter.pause(reservation, decision.delay, decision.kind.rpartition("_")[2])
                left = _remaining(max_wait, waited_total, policy.deadline, started)
                retry = decision.retry and (left is None or decision.delay <= left)
                stats.failed_attempt(decision.kind, decision.pause_all, retry)
                if not retry:
                    stats.failed_call()
                    if decision.retry and decision.pause_all:
                        # The server's limit has room again later than max_wait allows: the same
                        # answer as when the limiter sees that far ahead, with the 429 as its cause.
                        raise RateLimitTimeout(key[1], decision.delay, left or 0.0) from error
                    raise
                log.info(
                    "throttled_openai: %s on model %r, retry %d of %d in %.2fs",
                    decision.kind,
                    key[1],
                    retries,
                    policy.max_retries,
                    decision.delay,
                )
                if not decision.pause_all:  # a pause is waited out in the limiter, by everyone
                    if cancel is None:
                        time.sleep(decision.delay)
                    elif cancel.wait(decision.delay):
                        stats.failed_call()
                        raise Cancelled("the bulk call stopped while this request waited to retry") from error
                    waited_total += decision.delay
                    stats.waited(decision.delay)
                    _current.waited = getattr(_current, "waited", 0.0) + decision.delay
                continue
            except BaseException:
                limiter.settle(reservation, None)  # may have been sent: keep it charged
                stats.failed_call()
                raise
            finally:
                _current.attempt = None
            # 3b. Done: charge the real usage instead of the estimate (a stream, when it ends).
            if not streaming:
                used = _usage_of(result)
                limiter.settle(reservation, used)
                if used is not None:
                    stats.used(used)
            return result


def _usage_of(result: Any) -> Optional[int]:
    """Tokens used according to a call's result: a parsed model, a dict (``cast_to=object``), or a raw
    response already read."""
    usage = result.get("usage") if isinstance(result, Mapping) else getattr(result, "usage", None)
    if usage is not None:
        return usage_tokens(usage)
    http_response = getattr(result, "http_response", None)  # with_raw_response
    if http_response is None:
        return None
    try:
        body = json.loads(http_response.content)  # raises if the body was not read (streaming)
    except Exception:
        return None
    return usage_tokens(body.get("usage")) if isinstance(body, dict) else None


def _remaining(max_wait: Optional[float], waited: float, deadline: Optional[float], started: float) -> Optional[float]:
    """Seconds this call may still wait: the tighter of max_wait and the deadline; None: unbounded."""
    bounds = []
    if max_wait is not None:
        bounds.append(max(0.0, max_wait - waited))
    if deadline is not None:
        bounds.append(max(0.0, deadline - (time.monotonic() - started)))
    return min(bounds) if bounds else None


class ThrottledClient(_ThrottledMixin, openai.OpenAI):
    """``openai.OpenAI`` with every request held under requests- and tokens-per-minute limits.

    Accepts every ``openai.OpenAI`` argument, plus:

    - ``rpm``, ``tpm``: per-minute limits for every model; ``limits``: per-model overrides, e.g.
      ``{"gpt-4o": Limits(rpm=500, tpm=30_000)}``. Left out, they are learned from the server's headers.
    - ``limiter``: a :class:`RateLimiter` to share with other clients, or a :class:`RedisRateLimiter`
      to share with other processes (instead of the above).
    - ``retry``: a :class:`Retry` policy (or an int: its ``max_retries``); replaces the SDK's retries.
      ``max_retries`` is accepted too, as the policy's ``max_retries``.
    - ``max_wait``: seconds one call may spend waiting for capacity and backoff. Past it a call raises
      :class:`RateLimitTimeout` when the rate limit is what it waits for (in the limiter, or after a
      429), else the error it was backing off from; ``None`` (default) waits as long as needed.

    Thread-safe: share one client between threads. ``copy()``/``with_options()`` share its limiter.
    """


class ThrottledAzureClient(_ThrottledMixin, openai.AzureOpenAI):
    """``openai.AzureOpenAI`` with the same throttling; limits are keyed per deployment.

    Azure's ``retry-after-ms``/``x-ms-retry-after-ms`` headers are honoured, and its partial or odd
    ``x-ratelimit-*`` headers are tolerated. Give ``rpm``/``tpm`` (your deployment's quota): Azure does
    not always send the limits themselves.
    """

    def _limit_model(self, body: Mapping[str, Any]) -> str:
        path = str(getattr(self, "base_url", ""))
        if "/deployments/" in path:
            return path.split("/deployments/", 1)[1].split("/", 1)[0]
        return super()._limit_model(body)
