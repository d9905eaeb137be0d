"""ThrottledClient (an openai.OpenAI) and AsyncThrottledClient (an openai.AsyncOpenAI): every request
waits its turn under RPM and TPM limits.

How it hooks into the SDK, and why:

- request() is the one method every resource call (chat.completions.create, embeddings,
  responses, pagination, ...) goes through, with the request body still a dict. Overriding it lets
  one straight function estimate the cost, wait for capacity, call the SDK, settle the usage and
  retry, with the SDK's own retries turned off so the two never multiply.
- That function (_ThrottledCore._steps) is written once, for both kinds of client: a generator that
  yields each step that waits (acquire, send, settle, learn, pause, sleep) and is sent its outcome,
  as the limiter's own operations are (waiting.py). Each step says how a thread does it (block) and
  how a task does (wait); ThrottledClient.request runs the steps with waiting.drive,
  AsyncThrottledClient.request with waiting.adrive. Nothing else differs.
- The response headers (x-ratelimit-*) are read by an httpx response *event hook*, a public
  extension point of httpx and httpx2 that also works on an http_client the user brings (an
  AsyncClient awaits its hooks: the async client installs coroutine hooks).
- copy()/with_options() hand the limiter, counters and policy to the new client through the
  SDK's _extra_kwargs, so copies share one budget.
tests/test_sdk_contract.py fails loudly if a release of the SDK changes any of these.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import math
import re
import sys
import threading
import time
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    TypeVar,
    Union,
)

import openai

from . import batch_api, mapping
from .amapping import _AsyncBulkMixin
from .batching import MAX_INPUTS_PER_EMBEDDING, MAX_PROMPTS_PER_COMPLETION
from .context import current
from .errors import Cancelled, IncompleteStream, MalformedResponse, RateLimitTimeout, RequestTooLarge
from .headers import parse_limit_message, parse_rate_limit_headers
from .limiter import LimitKey, Limits, RateLimiter, Reservation
from .mapping import BulkTarget, ProgressArg
from .retry import Retry
from .stats import Stats, StatsSnapshot
from .tokens import TokenCounter, assumed_output_cap, endpoint_of, estimate_cost, usage_tokens
from .waiting import Step, Steps, adrive, drive

NOT_GIVEN: Any = openai.NOT_GIVEN  # "left out", as in the SDK's own copy(): None means "no limit" here

__all__ = ["AsyncThrottledAzureClient", "AsyncThrottledClient", "ThrottledAzureClient", "ThrottledClient"]

log = logging.getLogger("throttled_openai")

_T = TypeVar("_T", bound="_ThrottledCore")
_UNSET: Any = object()


class _Attempt:
    """The attempt in flight in this thread or task: what the HTTP hooks report the request's departure,
    its headers and the end of a stream to, and where they leave the response for the checks that follow."""

    __slots__ = ("endpoint", "limiter", "reservation", "response", "sent", "stats", "stream")

    def __init__(
        self, limiter: RateLimiter, reservation: Reservation, stream: bool, stats: Stats, endpoint: Optional[str]
    ) -> None:
        self.limiter = limiter
        self.reservation = reservation
        self.stream = stream
        self.stats = stats
        self.endpoint = endpoint
        self.response: Any = None  # the HTTP response, once its headers are in
        self.sent = False  # the request left for the server: a failure from then on may have cost it

    def failed_late(self, kind: str) -> None:
        """The call failed after it returned, while its stream was read: ``incomplete_stream`` (it
        ended without its final event) or ``stream_error`` (the server sent an error event)."""
        self.stats.failed_attempt(kind, False, False)
        self.stats.failed_call()


# -- the HTTP hooks: one shared part, a sync and an async face -----------------------------------------


def _on_request(request: Any) -> None:
    """httpx request hook: this thread's (or task's) attempt is leaving. Until it does, a call stopped
    on its way (Ctrl-C, a cancelled task) gives its reservation back instead of keeping it charged."""
    attempt: Optional[_Attempt] = current.attempt
    if attempt is not None:
        attempt.sent = True
        attempt.limiter.sent(attempt.reservation)


async def _on_request_async(request: Any) -> None:
    """_on_request for an httpx/httpx2 AsyncClient, which awaits its hooks."""
    _on_request(request)


def _answered(response: Any) -> Optional[_Attempt]:
    """The attempt a response answers (None: not a call of a throttled client), the response left on it."""
    attempt: Optional[_Attempt] = current.attempt
    if attempt is not None:
        attempt.response = response
    return attempt


def _on_response(response: Any) -> None:
    """httpx response hook: feed this thread's attempt the rate-limit headers, before the body is read.
    A successful stream (stream=True or with_streaming_response) is settled when it ends,
    against the usage its body carries."""
    attempt = _answered(response)
    if attempt is not None:
        attempt.limiter.observe(attempt.reservation, parse_rate_limit_headers(response.headers), response.status_code)
        _scan_body(response, attempt, _SyncUsageScanner)


async def _on_response_async(response: Any) -> None:
    """_on_response for an AsyncClient: the same, through the limiter's asyncio face. The task's own
    attempt is found among many on one thread because the call context is a ContextVar."""
    attempt = _answered(response)
    if attempt is not None:
        await attempt.limiter.aobserve(
            attempt.reservation, parse_rate_limit_headers(response.headers), response.status_code
        )
        _scan_body(response, attempt, _AsyncUsageScanner)


def _scan_body(response: Any, attempt: _Attempt, face: type) -> None:
    """Wrap a successful streamed body in the usage scanner of the hook's face (sync or async)."""
    if attempt.stream and 200 <= response.status_code < 300:
        sse = response.headers.get("content-type", "").startswith("text/event-stream")
        # Streams of these endpoints end with a final event; one that ends without it was cut short.
        checked = sse and attempt.endpoint in ("chat", "completions", "responses")
        response.stream = _scanner_for(response, face)(response.stream, attempt, sse, checked)


_SCANNERS: Dict[Tuple[type, type], type] = {}


def _scanner_for(response: Any, face: type) -> Any:
    """A scanner face as a subclass of the byte stream class it stands for in the response's HTTP
    library (httpx or httpx2's SyncByteStream or AsyncByteStream): httpx refuses to iterate a stream
    that is not one."""
    library = sys.modules[type(response).__module__.split(".")[0]]
    base: type = getattr(library, face._BASE)  # type: ignore[attr-defined]
    scanner = _SCANNERS.get((face, base))
    if scanner is None:
        scanner = _SCANNERS[face, base] = type("_UsageScanner", (face, base), {})
    return scanner


#: Server-sent events that end a stream: chat and completions end with data: [DONE], the
#: Responses API with one of these event types (error: the server reports a failure mid-stream).
_FINAL_EVENTS = frozenset([b"response.completed", b"response.failed", b"response.incomplete", b"error"])
_USAGE = re.compile(rb'"usage"\s*:\s*(?=\{)')


class _UsageScanner:
    """Wraps a streamed response body (httpx's Response.stream) and, when it ends or is closed,
    reports the token usage it carried (None when there is none, e.g. a chat stream without
    stream_options={"include_usage": True}: then the estimate stays charged).

    Server-sent events are read line by line: usage comes in the last chat chunk, or inside the
    response of the Responses API's response.completed. Another body (with_streaming_response
    of a JSON answer) has its usage object near the end. A checked stream that ends without its
    final event raises IncompleteStream where the caller reads it, instead of passing for whole.

    The scanning is here; _SyncUsageScanner and _AsyncUsageScanner are the two faces a body has,
    and settle through the limiter's sync or async face. Whichever way a body ends (read to its end,
    closed, both, read twice), it is settled once.
    """

    _TAIL = 65_536  # bytes of a JSON body kept from its end, where usage is

    def __init__(self, inner: Any, attempt: _Attempt, sse: bool, checked: bool) -> None:
        self._inner = inner
        self._attempt = attempt
        self._sse = sse
        self._checked = checked
        self._line = b""  # SSE: the line being received; else: the body's tail
        self._used: Optional[int] = None
        self._final = False
        self._errored = False  # an error event: the SDK raises it to the reader
        self._reported = False

    def _take(self, chunk: bytes) -> None:
        """Look at one chunk of the body on its way to the reader."""
        if self._sse:
            self._scan(chunk)
        else:
            self._line = (self._line + chunk)[-self._TAIL :]

    def _cut(self) -> bool:
        """At the end of the body: whether it is a checked stream that ended without its final event."""
        if self._sse:
            self._scan(b"\n")
        return self._checked and not self._final

    def _incomplete(self) -> IncompleteStream:
        return IncompleteStream(self._attempt.response, "ended without its final event")

    def _scan(self, chunk: bytes) -> None:
        lines = (self._line + chunk).split(b"\n")
        self._line = lines.pop()
        for line in lines:
            if line.startswith(b"data:"):
                data = line[5:].strip()
                if data == b"[DONE]":
                    self._final = True
                elif data.startswith(b'{"error"') or (
                    b'"usage"' in data and b'"usage":null' not in data and b'"usage": null' not in data
                ):
                    self._read_event(data)
            elif line.startswith(b"event:") and line[6:].strip() in _FINAL_EVENTS:
                self._final = True
                self._errored = self._errored or line[6:].strip() in (b"error", b"response.failed")

    def _read_event(self, data: bytes) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if isinstance(event.get("type"), str) and event["type"].encode() in _FINAL_EVENTS:
            self._final = True
            self._errored = event["type"] in ("error", "response.failed")
        elif "error" in event and "type" not in event:  # chat's {"error": {...}} in the middle of a stream
            self._errored = True
        usage = event.get("usage")
        inner = event.get("response")
        if usage is None and isinstance(inner, dict):
            usage = inner.get("usage")
        used = usage_tokens(usage)
        if used is not None:
            self._used = used

    def _report(self, cut: bool) -> bool:
        """Count how the body ended, the first time it does: then True, and _used holds the tokens to
        settle the reservation with (None keeps the estimate charged). Later: False."""
        if self._reported:
            return False
        self._reported = True
        if not self._sse:
            self._used = _usage_in_tail(self._line)
        if cut or self._errored:
            self._attempt.failed_late("incomplete_stream" if cut else "stream_error")
        if cut:
            self._used = None
        if self._used is not None:
            self._attempt.stats.used(self._used)
        return True


class _SyncUsageScanner(_UsageScanner):
    """The scanner as a SyncByteStream: iterated by httpx's iter_raw, closed by Response.close."""

    _BASE = "SyncByteStream"

    def __iter__(self) -> Iterator[bytes]:
        cut = False
        try:
            for chunk in self._inner:
                self._take(chunk)
                yield chunk
            cut = self._cut()
            if cut:
                raise self._incomplete()
        finally:
            self._settle(cut)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._settle(False)

    def _settle(self, cut: bool) -> None:
        if self._report(cut):
            self._attempt.limiter.settle(self._attempt.reservation, self._used)


class _AsyncUsageScanner(_UsageScanner):
    """The scanner as an AsyncByteStream. Its own iterator, not an async generator, so that nothing is
    left for the garbage collector to finish. How the SDK ends a body differs by version: 1.x reads it
    to its end, 2.x and 3.0 call aclose() after the final event, 3.57 iterates the body a second time
    (to drain it) before aclose(). Each new iteration reads on from where the body is."""

    _BASE = "AsyncByteStream"

    def __aiter__(self) -> _AsyncUsageScanner:
        self._chunks: AsyncIterator[bytes] = self._inner.__aiter__()
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            cut = self._cut()
            await self._settle(cut)
            if cut:
                raise self._incomplete() from None
            raise
        except BaseException:  # the connection broke, the task was cancelled: what was seen is all
            await self._settle(False)
            raise
        self._take(chunk)
        return chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            await self._settle(False)

    async def _settle(self, cut: bool) -> None:
        if self._report(cut):
            await self._attempt.limiter.asettle(self._attempt.reservation, self._used)


def _usage_in_tail(tail: bytes) -> Optional[int]:
    """The tokens of the last "usage": {...} object in the end of a JSON body, if it is there whole."""
    found = None
    for found in _USAGE.finditer(tail):  # noqa: B007  # the last one
        pass
    if found is None:
        return None
    try:
        usage, _ = json.JSONDecoder().raw_decode(tail[found.end() :].decode("utf-8", "replace"))
    except ValueError:
        return None
    return usage_tokens(usage)


def _http_library() -> Any:
    """The HTTP library of the SDK's own client: httpx, or httpx2 for openai 3.x (which has no httpx),
    whose exceptions (TimeoutException, ...) and transports the SDK uses."""
    for cls in openai.DefaultHttpxClient.__mro__:
        root = cls.__module__.split(".")[0]
        if root.startswith("httpx"):
            return sys.modules[root]
    return importlib.import_module("httpx")  # an SDK whose default client is not a subclass of one


class _OwnedHttpClient(openai.DefaultHttpxClient):  # type: ignore[misc, valid-type]
    """The HTTP client a throttled client makes for itself. The SDK closes the one it makes when it is
    garbage collected, but takes any client it is given for the user's; this one closes itself too."""

    def __del__(self) -> None:
        if not self.is_closed:
            with contextlib.suppress(Exception):  # at interpreter exit: nothing left to tell
                self.close()


class _OwnedAsyncHttpClient(openai.DefaultAsyncHttpxClient):  # type: ignore[misc, valid-type]
    """The async HTTP client an async throttled client makes for itself: closed by ``await
    client.close()`` or at the end of ``async with``, as the SDK's own is. Closing needs the event loop
    its connections belong to, so when dropped unclosed it closes itself only while a loop runs (as
    the SDK's own does); otherwise it stays silent."""

    def __del__(self) -> None:
        if not self.is_closed:
            with contextlib.suppress(Exception):  # no running loop: nothing can close it from here
                asyncio.get_running_loop().create_task(self.aclose())


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


# -- the steps of a call that wait: each says how a thread does it (block) and how a task does (wait) ---


class _Send(Step):
    """Send the request through the SDK: its own request(), the method the throttled clients override."""

    __slots__ = ("args", "client", "kwargs")

    def __init__(self, client: _ThrottledCore, args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        self.client = client
        self.args = args  # (cast_to, options, ...)
        self.kwargs = kwargs

    def block(self) -> Any:
        return super(_ThrottledMixin, self.client).request(*self.args, **self.kwargs)  # type: ignore[misc]

    async def wait(self) -> Any:
        return await super(_AsyncThrottledMixin, self.client).request(*self.args, **self.kwargs)  # type: ignore[misc]


class _Acquire(Step):
    """Wait for the limiter's capacity: a reservation, or its error. A bulk run's cancel event stops the
    wait (a thread's or a task's: the run stops sending after its first failure)."""

    __slots__ = ("cancel", "key", "limiter", "timeout", "tokens")

    def __init__(
        self,
        limiter: RateLimiter,
        key: LimitKey,
        tokens: int,
        timeout: Optional[float],
        cancel: Optional[threading.Event],
    ) -> None:
        self.limiter, self.key, self.tokens, self.timeout, self.cancel = limiter, key, tokens, timeout, cancel

    def block(self) -> Reservation:
        return self.limiter.acquire(self.key, self.tokens, timeout=self.timeout, cancel=self.cancel)

    async def wait(self) -> Reservation:
        return await self.limiter.aacquire(self.key, self.tokens, timeout=self.timeout, cancel=self.cancel)


class _Limiter(Step):
    """Call a RateLimiter method that ends or teaches a reservation (settle, cancel, learn_from_message,
    pause): on a thread the method itself, in a task its asyncio face ("a" + its name)."""

    __slots__ = ("args", "limiter", "name")

    def __init__(self, limiter: RateLimiter, name: str, *args: Any) -> None:
        self.limiter, self.name, self.args = limiter, name, args

    def block(self) -> None:
        getattr(self.limiter, self.name)(*self.args)

    async def wait(self) -> None:
        await getattr(self.limiter, "a" + self.name)(*self.args)


class _Sleep(Step):
    """Back off before a retry. The outcome is True when a bulk run's cancel event cut it short (looked
    at every quarter second by a task)."""

    __slots__ = ("cancel", "seconds")

    def __init__(self, seconds: float, cancel: Optional[threading.Event]) -> None:
        self.seconds, self.cancel = seconds, cancel

    def block(self) -> bool:
        if self.cancel is None:
            time.sleep(self.seconds)
            return False
        return self.cancel.wait(self.seconds)

    async def wait(self) -> bool:
        if self.cancel is None:
            await asyncio.sleep(self.seconds)
            return False
        end = time.monotonic() + self.seconds
        while not self.cancel.is_set() and time.monotonic() < end:
            await asyncio.sleep(min(0.25, end - time.monotonic()))
        return self.cancel.is_set()


class _ThrottledCore:
    """What the sync and async throttled clients share: arguments, the public surface, and one call's
    logic (_steps). Each face adds request(), which carries the steps out its own way."""

    # No class-level annotations: pydoc on Python 3.9 would show them in help() as __annotations__.

    def __init__(
        self,
        *,
        rpm: Optional[float] = None,
        tpm: Optional[float] = None,
        limits: Optional[Mapping[str, Limits]] = None,
        limiter: Optional[RateLimiter] = None,
        retry: Union[Retry, int, None] = None,
        max_wait: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        # What copy() hands its copy to share (through the SDK's _extra_kwargs): not user arguments.
        shared_stats: Optional[Stats] = kwargs.pop("_stats", None)
        shared_counter: Optional[TokenCounter] = kwargs.pop("_counter", None)
        if limiter is not None:
            if not isinstance(limiter, RateLimiter):
                raise TypeError(f"limiter must be a throttled_openai.RateLimiter, got {type(limiter).__name__}")
            if rpm is not None or tpm is not None or limits:
                raise ValueError("give either limiter or rpm/tpm/limits: a shared limiter carries its own limits")
        else:
            limiter = RateLimiter(rpm, tpm, limits=limits)
        self._limiter: RateLimiter = limiter
        self._retry: Retry = _make_retry(retry, kwargs.pop("max_retries", _UNSET))
        self._max_wait: Optional[float] = _check_max_wait(max_wait)
        self._stats: Stats = shared_stats or Stats()
        self._counter: TokenCounter = shared_counter or TokenCounter()
        # With no client given, one of ours, closed with this client (and every copy sharing it), as the
        # SDK does with the one it makes; a client the user passes is the user's to close.
        kwargs["http_client"] = self._hooked_http_client(kwargs.get("http_client"))
        key_provider = kwargs.get("api_key") if callable(kwargs.get("api_key")) else None
        # Our retry loop replaces the SDK's (each request is sent with the SDK's retries at 0, see
        # _steps()); the SDK's max_retries attribute reports the policy's.
        super().__init__(max_retries=self._retry.max_retries, **kwargs)  # type: ignore[call-arg]
        secret = key_provider or getattr(self, "api_key", None)
        self._account: str = _account_hash(secret, getattr(self, "base_url", ""))
        # The SDK imports a resource's module on its first use, a third of a second of CPU: done here, not
        # during the first calls, where it would stall an event loop while the limiter grants requests
        # that would then leave together.
        for resource in ("chat", "completions", "embeddings", "responses"):
            getattr(self, resource, None)

    if TYPE_CHECKING:  # each face provides it: the sync one an httpx Client, the async one an AsyncClient

        def _hooked_http_client(self, given: Any) -> Any:
            """The HTTP client to send with, its event hooks reporting to this client's calls."""

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
    def max_retries(self) -> int:
        """The retry policy's max_retries: retries after the first attempt (the SDK's own are off)."""
        return self._retry.max_retries

    @max_retries.setter
    def max_retries(self, value: int) -> None:
        # The SDK's __init__ sets it (to the policy's value, see __init__); a user setting it changes
        # the policy, as max_retries= does.
        if value != self._retry.max_retries:
            self._retry = self._retry.replace(max_retries=value)

    @property
    def max_wait(self) -> Optional[float]:
        """Longest time in seconds one call may spend waiting (for capacity or backoff); None: no limit."""
        return self._max_wait

    def stats(self) -> StatsSnapshot:
        """Counters of this client and every copy made from it, with the limiter's view of each model's
        limits (limits: see RateLimiter.snapshot(): windows, sources, budgets, cost factor)."""
        return dataclasses.replace(self._stats.snapshot(), limits=self._limiter.snapshot())

    def copy(
        self: _T, *, retry: Union[Retry, int, None] = None, max_wait: Optional[float] = NOT_GIVEN, **kwargs: Any
    ) -> _T:
        """The SDK's copy(), plus retry and max_wait (left out: this client's); the copy shares this
        client's limiter and counters.

        max_retries given here sets the retry policy's max_retries (the SDK's own retries stay off).
        """
        max_retries = kwargs.pop("max_retries", _UNSET)
        if retry is None:
            given = max_retries is not _UNSET and not isinstance(max_retries, openai.NotGiven)
            retry = self._retry.replace(max_retries=max_retries) if given else self._retry
        extra = dict(kwargs.pop("_extra_kwargs", None) or {})
        extra.update(
            limiter=self._limiter,
            retry=retry,
            max_wait=self._max_wait if isinstance(max_wait, openai.NotGiven) else max_wait,
            _stats=self._stats,
            _counter=self._counter,
        )
        return super().copy(_extra_kwargs=extra, **kwargs)  # type: ignore[misc, no-any-return]

    with_options = copy

    def __repr__(self) -> str:
        return f"<{type(self).__name__} base_url={str(getattr(self, 'base_url', ''))!r} limiter={self._limiter!r}>"

    def _bulk_target(self, endpoint: str, model: str, method: str) -> BulkTarget:
        """The part of this client the bulk engines use, for model on endpoint: the sync one (mapping.py)
        and the asyncio one (amapping.py), whose create is a coroutine function."""
        if not isinstance(model, str) or not model:
            raise TypeError(f"{method}() needs model= as a non-empty str, got {model!r}")
        resource = {"completions": "completions", "chat": "chat.completions", "embeddings": "embeddings"}[endpoint]
        create: Any = self
        for name in resource.split("."):
            create = getattr(create, name)
        return BulkTarget(
            limiter=self._limiter,
            key=(self._account, self._limit_model({"model": model})),
            counter=self._counter,
            stats=self._stats.snapshot,
            model=model,
            create=create.create,
            method=method,
        )

    # -- one call --------------------------------------------------------------------------------

    def _limit_model(self, body: Mapping[str, Any]) -> str:
        """The model whose limit a request counts against (* if none); for Azure, the deployment."""
        if isinstance(self, (openai.AzureOpenAI, openai.AsyncAzureOpenAI)):
            path = str(getattr(self, "base_url", ""))
            if "/deployments/" in path:
                return path.split("/deployments/", 1)[1].split("/", 1)[0]
        model = body.get("model")
        return model if isinstance(model, str) and model else "*"

    def _steps(self, cast_to: Any, options: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Steps[Any]:
        """One API request under the limiter: estimate, wait, send, settle; retry by policy.

        Written once for both clients: each step that waits (_Acquire, _Send, _Limiter, _Sleep) is
        yielded, and request() runs the whole with waiting.drive (blocking this thread in each step) or
        waiting.adrive (awaiting it), which sends back its outcome or throws in its exception. Returns
        what the SDK returned.
        """
        limiter = self._limiter
        body = options.json_data if isinstance(options.json_data, Mapping) else {}
        endpoint = endpoint_of(str(options.url))
        key: LimitKey = (self._account, self._limit_model(body))
        cost = current.cost  # a bulk helper's count, made while packing the batch
        if cost is None:
            cost = estimate_cost(endpoint, body, self._counter) if endpoint else 0
        current.cost = None
        cancel = current.cancel  # set while a bulk worker runs this call
        # A bulk call waits its turn: the run has its own deadline (run_timeout), max_wait is for
        # callers that would rather fail fast (a web view).
        max_wait = None if cancel is not None else self._max_wait
        policy, stats = self._retry, self._stats
        # Settled when the body has been read, by the response hook, for streams and streamed raw bodies.
        streaming = bool(kwargs.get("stream")) or _streams_raw(options)
        options.max_retries = 0  # our loop retries; the SDK's would multiply every attempt of ours
        stats.call()
        waited_total, retries = 0.0, 0
        started = time.monotonic()
        try:
            while True:
                # 1. Wait for capacity, within what is left of max_wait and the policy's deadline.
                allowed = _remaining(max_wait, waited_total, policy.deadline, started)
                before = time.monotonic()
                try:
                    reservation: Reservation = yield _Acquire(limiter, key, cost, allowed, cancel)
                except RequestTooLarge as error:
                    assumed = assumed_output_cap(endpoint, body) if endpoint else None
                    if assumed is None:
                        raise
                    raise error.with_detail(f"{assumed:,} output tokens assumed: pass max_tokens") from None
                attempt = _Attempt(limiter, reservation, streaming, stats, endpoint)
                try:
                    waited = time.monotonic() - before
                    waited_total += waited
                    stats.attempt(cost, waited)
                    current.waited += waited
                    # 2. Send through the SDK; the response hook reports the headers to the limiter.
                    current.attempt = attempt
                    try:
                        result = yield _Send(self, (cast_to, options, *args), kwargs)
                    except _PARSE_ERRORS as error:  # a 2xx whose body the SDK could not parse, or a parse of ours
                        problem = _bad_body(attempt.response)
                        if problem is None:  # a whole JSON answer: the error is the caller's (a parse() schema)
                            raise
                        raise MalformedResponse(attempt.response, problem) from error
                    finally:
                        current.attempt = None
                    used = None if streaming else _examine(result, cast_to, attempt.response, endpoint)
                except (openai.APIStatusError, openai.APIConnectionError, MalformedResponse) as error:
                    # 3a. Failed: charge what the server likely counted, then ask the policy.
                    status = getattr(error, "status_code", None)
                    refused = status is not None and status < 500 and not isinstance(error, MalformedResponse)
                    yield _Limiter(limiter, "settle", reservation, 0 if refused else None)
                    if status == 429:  # "... per min (RPM): Limit 3, Used 3, Requested 1": learn that limit
                        message = parse_limit_message(getattr(error, "message", None) or str(error))
                        if message is not None:
                            yield _Limiter(limiter, "learn_from_message", reservation, message)
                    retries += 1
                    decision = policy.decide(error, retries)
                    if decision.pause_all:
                        yield _Limiter(limiter, "pause", reservation, decision.delay, decision.kind.rpartition("_")[2])
                    left = _remaining(max_wait, waited_total, policy.deadline, started)
                    retry = decision.retry and (left is None or decision.delay <= left)
                    stats.failed_attempt(decision.kind, status == 429, retry)
                    if not retry:
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
                        if (yield _Sleep(decision.delay, cancel)):
                            raise Cancelled("the bulk call stopped while this request waited to retry") from error
                        waited_total += decision.delay
                        stats.waited(decision.delay)
                        current.waited += decision.delay
                    continue
                except BaseException as error:
                    # Stopped on its way (Ctrl-C, a cancelled task) or an error the policy does not judge:
                    # what never left is given back, what may have reached the server stays charged.
                    if attempt.sent:
                        ending = _Limiter(limiter, "settle", reservation, None)
                    else:
                        ending = _Limiter(limiter, "cancel", reservation)
                    if isinstance(error, GeneratorExit):  # closed between two steps: end it without one
                        ending.block()
                    else:
                        yield ending
                    raise
                # 3b. Done: charge the real usage instead of the estimate (a stream, when it ends).
                if not streaming:
                    yield _Limiter(limiter, "settle", reservation, used)
                    if used is not None:
                        stats.used(used)
                return result
        except BaseException:
            stats.failed_call()
            raise


def _with_hooks(http_client: Any, on_request: Callable[[Any], Any], on_response: Callable[[Any], Any]) -> Any:
    """``http_client`` with our request and response hooks added to its own (once)."""
    hooks = http_client.event_hooks
    for event, hook in (("request", on_request), ("response", on_response)):
        if hook not in hooks[event]:
            hooks[event] = [*hooks[event], hook]
    http_client.event_hooks = hooks
    return http_client


class _ThrottledMixin(_ThrottledCore):
    """The throttling of ThrottledClient and ThrottledAzureClient: the steps carried out by blocking
    this thread, and the bulk helpers, which run calls on a pool of threads."""

    def _hooked_http_client(self, given: Any) -> Any:
        return _with_hooks(_OwnedHttpClient() if given is None else given, _on_request, _on_response)

    def request(self, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        """Send one API request under the limiter (see _steps), blocking this thread while it waits."""
        return drive(self._steps(cast_to, options, args, kwargs))

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
        run_timeout: Optional[float] = None,
        **kwargs: Any,
    ) -> List[Any]:
        """Complete every prompt with the legacy completions API; result[i] answers prompts[i].

        Up to batch_size prompts share one request (prompt as a list; 20 is the documented
        maximum), within the token budget the limiter can pass at once. Each result is the SDK's
        choice (a list of n choices when n > 1), its index rewritten to i * n + j.

        Other keyword arguments go to every completions.create() call (max_tokens, temperature,
        timeout for one request, ...). Every prompt and argument is checked before anything is sent:
        TypeError names the first bad prompt, an argument completions.create() does not take, or
        prompt= (the prompts are the first argument).

        max_workers: requests in flight at once; None derives it from the limit and the latency.
        return_exceptions: put a failed prompt's exception in its slot, like asyncio.gather;
        otherwise the first failure stops the run with BulkError, which carries the results and
        errors so far. A batch refused with a 400 is split until the prompt at fault fails alone.
        progress: True for a tqdm bar, or a callable given a Progress after each request.
        run_timeout: seconds the whole run may take, then BulkTimeout; None: no limit.

        Each request waits its turn: the client's max_wait (meant for callers that would rather
        fail fast, like a web view) does not apply to bulk work; run_timeout bounds it instead.
        Ctrl-C stops within a couple of seconds with the KeyboardInterrupt itself, its results
        and errors attributes holding what was obtained so far.
        """
        target = self._bulk_target("completions", model, "map_completions")
        return mapping.bulk_map(
            "completions", target, prompts, batch_size, max_workers, return_exceptions, progress, run_timeout, kwargs
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
        run_timeout: Optional[float] = None,
        **kwargs: Any,
    ) -> Iterator[Tuple[int, Any]]:
        """Like map_completions() over any iterable (a generator over a huge file included),
        yielding (i, result): in input order, or as results finish with ordered=False. Only a
        bounded window of the input is read ahead, so memory stays flat however long the input.

        A failure (without return_exceptions), run_timeout or Ctrl-C drains the requests on their
        way; the BulkError, BulkTimeout or KeyboardInterrupt carries, in results, every result
        obtained and not yet yielded (aligned with the input; yielded ones are not kept)."""
        target = self._bulk_target("completions", model, "imap_completions")
        return mapping.bulk_imap(
            "completions", target, prompts, batch_size, max_workers, ordered, return_exceptions,
            progress, run_timeout, kwargs,
        )  # fmt: skip

    def map_chat_completions(
        self,
        conversations: Iterable[Any],
        *,
        model: str,
        max_workers: Optional[int] = None,
        return_exceptions: bool = False,
        progress: ProgressArg = False,
        run_timeout: Optional[float] = None,
        **kwargs: Any,
    ) -> List[Any]:
        """One chat completion per conversation (a list of message dicts), run in parallel (the API
        cannot batch conversations); result[i] is the SDK's ChatCompletion for conversations[i].
        Other keyword arguments go to chat.completions.create() (messages= is refused: the
        conversations are the first argument); the rest as in map_completions()."""
        target = self._bulk_target("chat", model, "map_chat_completions")
        return mapping.bulk_map(
            "chat", target, conversations, 1, max_workers, return_exceptions, progress, run_timeout, kwargs
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
        run_timeout: Optional[float] = None,
        **kwargs: Any,
    ) -> Iterator[Tuple[int, Any]]:
        """Lazy map_chat_completions(), yielding (i, ChatCompletion); see imap_completions()."""
        target = self._bulk_target("chat", model, "imap_chat_completions")
        return mapping.bulk_imap(
            "chat", target, conversations, 1, max_workers, ordered, return_exceptions, progress, run_timeout, kwargs
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
        run_timeout: Optional[float] = None,
        **kwargs: Any,
    ) -> List[Any]:
        """Embed every input; result[i] is the vector for inputs[i]. Up to batch_size inputs (2,048
        at most) and 300,000 tokens share a request. Other keyword arguments go to
        embeddings.create() (input= is refused); the rest as in map_completions()."""
        target = self._bulk_target("embeddings", model, "map_embeddings")
        return mapping.bulk_map(
            "embeddings", target, inputs, batch_size, max_workers, return_exceptions, progress, run_timeout, kwargs
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
        run_timeout: Optional[float] = None,
        **kwargs: Any,
    ) -> Iterator[Tuple[int, Any]]:
        """Lazy map_embeddings(), yielding (i, vector); see imap_completions()."""
        target = self._bulk_target("embeddings", model, "imap_embeddings")
        return mapping.bulk_imap(
            "embeddings", target, inputs, batch_size, max_workers, ordered, return_exceptions,
            progress, run_timeout, kwargs,
        )  # fmt: skip

    # -- the Batch API ---------------------------------------------------------------------------

    def batch_completions(
        self,
        prompts: Iterable[Any],
        *,
        model: str,
        state: str,
        batch_size: int = MAX_PROMPTS_PER_COMPLETION,
        **kwargs: Any,
    ) -> batch_api.BatchJob:
        """map_completions() through OpenAI's Batch API: half the price, done within 24 hours.

        Submits the prompts as batches (batch_size prompts a request) and returns the BatchJob at
        once; job.wait(progress=True) drives it to the end, job.results() gives one choice per prompt
        in input order, as map_completions() does. state is the job's state file: calling again with
        the same state, prompts and arguments picks up the same job (after a crash, say) instead of
        submitting it again; other inputs on that state raise ValueError.

        Keyword arguments named in BatchJob (poll_interval, max_poll_interval, queue_tokens,
        max_requests, fallback, max_rounds, max_workers) configure the job; the rest go into every
        request's body (max_tokens, temperature, ...).
        """
        return batch_api.start(self, "completions", prompts, state, model, batch_size, kwargs)

    def batch_chat_completions(
        self, conversations: Iterable[Any], *, model: str, state: str, **kwargs: Any
    ) -> batch_api.BatchJob:
        """map_chat_completions() through the Batch API; job.results() gives a ChatCompletion per
        conversation. See batch_completions()."""
        return batch_api.start(self, "chat", conversations, state, model, 1, kwargs)

    def batch_embeddings(
        self, inputs: Iterable[Any], *, model: str, state: str, batch_size: int = 100, **kwargs: Any
    ) -> batch_api.BatchJob:
        """map_embeddings() through the Batch API (batch_size inputs a request); job.results() gives a
        vector per input. See batch_completions()."""
        return batch_api.start(self, "embeddings", inputs, state, model, batch_size, kwargs)

    def batch_requests(
        self, requests: Iterable[Any], *, state: str, model: Optional[str] = None, **kwargs: Any
    ) -> batch_api.BatchJob:
        """Any request bodies through the Batch API; job.results() gives each response body (a dict).
        The endpoint comes from a body's shape (prompt, messages, input), or give Batch API lines
        ({"url": "/v1/responses", "body": {...}}); model= fills in bodies that name none. Other keyword
        arguments configure the job, as in batch_completions()."""
        unknown = set(kwargs) - batch_api.JOB_OPTIONS
        if unknown:
            raise TypeError(f"batch_requests() got unexpected keyword arguments {sorted(unknown)}")
        return batch_api.start(self, "requests", requests, state, model, 1, kwargs)


#: What the SDK raises when a 2xx body is not what it parses: JSONDecodeError (a ValueError) for JSON cut
#: short or empty, AttributeError/TypeError/KeyError from a parser handed an error object or a page.
_PARSE_ERRORS = (ValueError, TypeError, AttributeError, KeyError)


def _bad_body(response: Any) -> Optional[str]:
    """What is wrong with a 2xx response's body, for the error message (never the body itself); None
    when it is a whole JSON object that is not an error: then a failed parse is the caller's (a schema
    given to parse(), say), not the server's fault."""
    if response is None or not 200 <= response.status_code < 300:
        return None
    kind = response.headers.get("content-type", "")
    try:
        content = response.content
    except Exception:  # not read
        return None
    if not content:
        return "is empty"
    try:
        body = json.loads(content)
    except ValueError:
        return (
            f"is {kind or 'untyped'}, not JSON" if "json" not in kind else f"is not valid JSON ({len(content)} bytes)"
        )
    if not isinstance(body, dict):
        return "is JSON but not an object"
    if "error" in body and "id" not in body:
        return f"is an error object: {_error_text(body['error'])}"
    return None


def _streams_raw(options: Any) -> bool:
    """Whether the SDK will hand the body over unread (with_streaming_response): it marks such a
    request with this header."""
    headers = options.headers if isinstance(options.headers, Mapping) else {}
    return any(k.lower() == "x-stainless-raw-response" and v == "stream" for k, v in headers.items())


def _examine(result: Any, cast_to: Any, response: Any, endpoint: Optional[str]) -> Optional[int]:
    """Tokens used according to a call's result (a parsed model, a dict with cast_to=object, or a
    raw response already read), after checking it is what the endpoint returns: a 2xx whose body is an
    HTML page or an error object raises MalformedResponse, to be retried. Only the token-bearing
    endpoints (always JSON) and HTML pages are judged: others may answer text (an SRT transcript)."""
    http_response = getattr(result, "http_response", None)  # with_raw_response: the body is read
    if http_response is not None and not isinstance(result, openai.BaseModel):
        judged = endpoint is not None or http_response.headers.get("content-type", "").startswith("text/html")
        problem = _bad_body(http_response) if judged else None
        if problem is not None:
            raise MalformedResponse(http_response, problem)
        try:
            result = json.loads(http_response.content)
        except ValueError:
            return None  # a file, audio, text: nothing to read
    if isinstance(result, str) and cast_to is not str and response is not None:
        # The SDK hands back the text of a body that is not JSON (a proxy's HTML page, say).
        page = response.headers.get("content-type", "").startswith("text/html")
        problem = _bad_body(response) if endpoint is not None or page or not result else None
        if problem is not None:
            raise MalformedResponse(response, problem)
    if isinstance(result, Mapping):
        error, identity, usage = result.get("error"), result.get("id"), result.get("usage")
    else:
        error, identity = getattr(result, "error", None), getattr(result, "id", None)
        usage = getattr(result, "usage", None)
    if error is not None and identity is None and response is not None:
        raise MalformedResponse(response, f"is an error object: {_error_text(error)}")
    return usage_tokens(usage) if usage is not None else None


def _error_text(error: Any) -> str:
    message = error.get("message") if isinstance(error, Mapping) else getattr(error, "message", None)
    return str(message or error)[:200]


def _remaining(max_wait: Optional[float], waited: float, deadline: Optional[float], started: float) -> Optional[float]:
    """Seconds this call may still wait: the tighter of max_wait and the deadline; None: unbounded."""
    bounds = []
    if max_wait is not None:
        bounds.append(max(0.0, max_wait - waited))
    if deadline is not None:
        bounds.append(max(0.0, deadline - (time.monotonic() - started)))
    return min(bounds) if bounds else None


class _AsyncThrottledMixin(_ThrottledCore):
    """The throttling of AsyncThrottledClient and AsyncThrottledAzureClient: the same steps, awaited, so
    that a waiting call blocks no thread and holds up no other task."""

    def _hooked_http_client(self, given: Any) -> Any:
        return _with_hooks(_OwnedAsyncHttpClient() if given is None else given, _on_request_async, _on_response_async)

    async def request(self, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        """Send one API request under the limiter (see _steps), awaiting while it waits: no thread is
        blocked. A task cancelled on its way (in line, backing off, in flight) gives back what it
        reserved and never sent, keeps charged what may have reached the server, and raises
        CancelledError."""
        return await adrive(self._steps(cast_to, options, args, kwargs))


class ThrottledClient(_ThrottledMixin, openai.OpenAI):
    """openai.OpenAI with every request held under requests- and tokens-per-minute limits.

    Accepts every openai.OpenAI argument, plus:

    - rpm, tpm: per-minute limits for every model. limits: per-model overrides, e.g.
      {"gpt-4o": Limits(rpm=500)}; what an override leaves out keeps rpm/tpm. Limits left out
      altogether are learned from the server's headers.
    - limiter: a RateLimiter to share with other clients, or a RedisRateLimiter to share with other
      processes (instead of the above).
    - retry: a Retry policy (or an int: its max_retries); replaces the SDK's retries. max_retries
      is accepted too, as the policy's max_retries, and client.max_retries reports it.
    - max_wait: seconds one plain call may spend waiting for capacity and backoff. Past it the call
      raises RateLimitTimeout when the rate limit is what it waits for (in the limiter, or after a
      429), else the error it was backing off from (a 500, a timeout). None (default) waits as long
      as needed. The bulk helpers (map_*, imap_*) wait their turn whatever max_wait says; their
      run_timeout bounds a whole run.

    Thread-safe: share one client between threads. copy()/with_options() share its limiter and
    counters. Like openai.OpenAI, it closes the HTTP client it made on close(), at the end of a
    with block, or when garbage collected; an http_client you pass stays yours.
    """


class ThrottledAzureClient(_ThrottledMixin, openai.AzureOpenAI):
    """openai.AzureOpenAI with the same throttling; limits are keyed per deployment.

    Azure's retry-after-ms/x-ms-retry-after-ms headers are honoured, and its partial or odd
    x-ratelimit-* headers are tolerated. Give rpm/tpm (your deployment's quota): Azure does
    not always send the limits themselves.
    """


class AsyncThrottledClient(_AsyncBulkMixin, _AsyncThrottledMixin, openai.AsyncOpenAI):
    """openai.AsyncOpenAI with every request held under requests- and tokens-per-minute limits.

    Takes the same arguments as ThrottledClient (every openai.AsyncOpenAI argument, plus rpm, tpm,
    limits, limiter, retry, max_wait) and behaves the same way; a call waiting for capacity or backoff
    awaits, blocking no thread. Share one client between the tasks of its event loop; share its
    limiter (client.limiter, or a RateLimiter given to both) with ThrottledClients in threads and with
    clients on other loops: they all stay under the limits together, first come, first served.

    A cancelled task (task.cancel(), asyncio.wait_for, asyncio.timeout) leaves the line at once,
    gives back what it reserved and did not send, and lets the next caller go; CancelledError
    propagates as always.

    Like openai.AsyncOpenAI, it is bound to the event loop that first uses it: create it in that loop
    (in a FastAPI lifespan, say). It closes the HTTP client it made on await client.close() or at the
    end of an async with block; an http_client you pass stays yours.
    """


class AsyncThrottledAzureClient(_AsyncBulkMixin, _AsyncThrottledMixin, openai.AsyncAzureOpenAI):
    """openai.AsyncAzureOpenAI with the throttling of AsyncThrottledClient; limits are keyed per
    deployment, and Azure's headers are read as ThrottledAzureClient reads them."""
