"""FakeOpenAI: the fake OpenAI API server, its settings, routing, faults and admission."""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import math
import random
import socket
import threading
import time
import urllib.parse
from typing import Any, Callable, Collection, Deque, Dict, List, Mapping, Optional, Set, Tuple, Union

from .batches import BATCH_FAULTS, BATCH_PHASES, _batch_call, _Batches, _Call, _fault_reply, _Settings
from .counting import _encoder
from .endpoints import _JOBS, _BadRequest, _Env
from .faults import _FAULT_RETRY_S, _REJECTING_FAULTS, FAULTS, _after_admission, _plain_fault_reply
from .formats import (
    _EPS,
    JSONDict,
    _error,
    _go_duration,
    _mask_key,
    _ms,
    _num,
    _quota_error,
    _rate_limit_error,
    _too_large_error,
)
from .model import COST_MODELS, _admission_cost, _Job, _Pair
from .replies import _json_reply, _Reply
from .server import _Handler, _Server

__all__ = ["FakeOpenAI"]

_ENDPOINTS = frozenset({*_JOBS, "models"})
_MODELS = ("gpt-4o-mini", "gpt-3.5-turbo-instruct", "text-embedding-3-small")
_HEADERS_REPORTS = frozenset({"minute", "day"})


_UNCONFIGURED_RPM = 10_000  # the limit an injected 429 names when the server has no RPM configured


class FakeOpenAI:
    """A fake OpenAI API server with OpenAI-style rate limits, quota and injectable faults.

    Serves ``/v1/completions``, ``/v1/chat/completions`` (also ``stream``), ``/v1/embeddings``,
    ``/v1/responses`` (also ``stream``), ``GET /v1/models`` and the Azure
    ``/openai/deployments/{name}/...`` routes over real HTTP/1.1 with keep-alive, so the real
    ``openai`` SDK can be pointed at :attr:`base_url`.  Each generated text is
    ``echo:<prompt prefix>#<sample>``.

    Every (api key, model) pair has a requests bucket (cost 1) and a tokens bucket (cost: the
    admission cost, an input estimate + the most output tokens the request may generate, see
    ``cost_model``) per minute, and optionally per day.  A request is admitted when every
    bucket holds its cost, or is full when the cost exceeds the bucket's capacity (the level
    then goes negative: debt); all buckets are taken together.  Otherwise it gets a 429 like
    OpenAI's, with ``x-ratelimit-*`` headers, ``retry-after`` and the exact "try again in",
    naming the bucket that needs the longest wait.  A cost above a whole token limit (TPM or
    TPD) gets "Request too large", which no wait can cure.

    It also serves the Files API (``/v1/files``: upload, list, retrieve, content, delete) and
    the Batch API (``/v1/batches``: create, list, retrieve, cancel), as :mod:`.batches`
    describes.  A batch is ``validating`` for ``batch_validation_seconds``, then ``failed``
    (bad input lines, or over ``batch_queue_tokens``) or ``in_progress``, running
    ``batch_speed`` request lines per second through the same handlers as the synchronous
    endpoints, then ``finalizing`` for ``batch_finalizing_seconds``, then ``completed`` with an
    output file (successes) and an error file (per-request 400s and 500s), each in shuffled
    order with ``shuffle``.  Unfinished ``batch_window_seconds`` after creation, it is
    ``expired`` (each line not run gets a ``batch_expired`` error line); cancelled, it is
    ``cancelling`` for ``batch_finalizing_seconds``, then ``cancelled`` (lines not run are in
    neither file).  Time is simulated lazily: each Files/Batch API call (and :meth:`batches`,
    :meth:`file_content`, :meth:`stats`) first brings every batch up to ``time.monotonic()``,
    so nothing happens between calls and no thread runs in the background.  These calls need
    an API key like any other, are never rate limited, and take only the faults of
    :data:`.batches.BATCH_FAULTS` (see :meth:`inject` for faults aimed at one call, before or
    after it is carried out).

    Args (keyword-only):
        rpm, tpm: requests / tokens per minute for every (api key, model) pair; None = unlimited
            (and no per-minute ``x-ratelimit-*`` headers for that resource).
        limits: per-model ``(rpm, tpm)`` overrides (for Azure the deployment name is the model).
        bucket_seconds: seconds of budget a per-minute bucket holds: capacity = limit *
            bucket_seconds / 60 (the request bucket holds at least 1 request), refilled
            continuously at limit / 60 per second, starting full.  60 models OpenAI's headers;
            1.0 is a strict server allowing only about one second of burst.  A request costing
            more than the capacity but at most the limit is admitted only into a full bucket.
        rpd, tpd: requests / tokens per day for every (api key, model) pair; None = no daily
            limit.  Each is a bucket holding the whole limit, refilled continuously at
            limit / ``day_seconds`` per second, starting full.  Refusals say "requests per day
            (RPD)" / "tokens per day (TPD)".
        day_seconds: seconds in a "day" of the daily buckets (shrink it in tests).
        headers_report: which buckets the ``x-ratelimit-limit/remaining/reset-*`` headers
            describe: "minute", or "day" (the daily bucket where there is one, else the
            per-minute one; limit = the daily limit, reset = (limit - remaining) * day_seconds
            / limit, e.g. ``7m12s`` after 1 of 200 requests), as real headers sometimes do.
        cost_model: how the admission cost's input part is counted (the output part is always
            n * max_tokens, per prompt): "tiktoken", the cl100k count with chat's per-message
            overhead; "chars", OpenAI's documented estimate: ceil(characters of the text fields
            / 4) + one per token id of token-id inputs; "json_bytes", as OpenAI-compatible
            servers do: ceil(bytes of the raw JSON body / 4).  ``usage`` in responses is always
            the tiktoken count.
        latency: seconds slept before every response (outside any lock).
        latency_jitter: extra uniform 0..latency_jitter seconds per response.
        seed: seed of the single ``random.Random`` behind jitter, shuffling and ``fault_rates``.
        shuffle: return choices (and embedding ``data``) in shuffled order, as OpenAI may.
        completion_tokens: tokens each generated choice uses: min(max_tokens, completion_tokens).
        context_length: if given, a legacy completions request with any prompt whose tokens plus
            ``max_tokens`` exceed it gets OpenAI's 400 "maximum context length" error (the whole
            request fails, as a batch with one bad prompt does).
        settle_usage: after admission, refund (admission cost - reported total usage) to the
            token buckets (capped at capacity; negative when the usage is the larger) just
            before the response is sent; False keeps the admission cost charged.
        quota_tokens: total tokens (by reported usage) a key may spend over the server's life;
            once spent every request of that key gets 429 ``insufficient_quota``.
        count_rejected: a rate-limited request still takes one request from its per-minute
            bucket (never below zero), punishing clients that retry without waiting.
        retry_after: send ``retry-after`` (whole seconds, rounded up, at least 1) and
            ``retry-after-ms`` on rate-limit 429s.
        azure: Azure quirks: 429s send ``retry-after-ms`` and ``x-ms-retry-after-ms`` (no
            ``retry-after``); rate-limit headers are only ``x-ratelimit-remaining-requests`` and
            ``x-ratelimit-remaining-tokens`` (and the resets with ``integer_resets``).
        message_used: 429 messages include "Used N, " (False: ``Limit 3, Requested 1.``, as
            older real bodies do).
        integer_resets: send ``x-ratelimit-reset-requests`` / ``-tokens`` as bare integer
            milliseconds, rounded up (``"500"``), as Azure does, instead of Go durations; also
            with ``azure``.
        extra_429_headers: headers added to every rate-limit 429 (refusals and the injected
            ``"429"`` fault, not "Request too large", quota or ``"429_message_only"``),
            replacing same-named ones (case-insensitive), e.g. ``{"retry-after-ms": "0"}``.
        batch_speed: request lines each ``in_progress`` batch runs per second, every batch at
            that speed at once (1000: 50,000 lines take 50 s; ``math.inf``: all lines at the
            first call after validation).  0 holds every batch where it is.  Settable while
            running: :attr:`batch_speed`.
        batch_validation_seconds: seconds a new batch stays ``validating``.
        batch_finalizing_seconds: seconds a batch stays ``finalizing`` (and ``cancelling``).
        batch_window_seconds: seconds after its creation at which a batch not yet
            ``finalizing`` becomes ``expired`` (the real window: 24 h, 86,400 s).  The Batch
            object's ``expires_at`` is ``created_at`` + this, rounded up.
        batch_queue_tokens: enqueued-token limit per (api key, model): a batch whose input tokens
            (the admission cost's input part, by ``cost_model``; never ``max_tokens``), with
            those of the key's batches of that model that passed validation and have not ended
            (``in_progress``, ``finalizing``, ``cancelling``), exceed it ends its validation
            ``failed`` with ``token_limit_exceeded``, as the real service reports it
            (asynchronously: create never refuses it).  None = no limit.
        batch_error_rate: probability (0..1, drawn per request line from a generator seeded
            with ``seed``) that a batch request line that would succeed fails with a 500
            ``server_error`` in the error file instead.
        batch_reject: a check of the test's own, standing for the validation rules of the real
            service the fake does not model: given each request line's ``body``, a message to
            fail the batch's validation with for that line (code ``invalid_request``, its
            1-based ``line``), or None to let it pass.
        api_keys: accepted keys; other keys get 401 ``invalid_api_key`` (the key is masked in the
            message).  A request without a key always gets 401.
        fault_rates: fault name -> probability per API request (see :data:`FAULTS`), drawn from
            the seeded random generator.
        slow_seconds: seconds the ``"slow"`` fault sleeps before answering.
        host, port: where to listen; port 0 picks a free port.
        log_size: entries kept in :attr:`requests_log` and :attr:`admitted`.

    ``GET /v1/models`` is never rate limited or faulted.  Faults and limits apply only to API
    requests that passed routing, authentication and validation.
    """

    def __init__(
        self,
        *,
        rpm: Optional[float] = None,
        tpm: Optional[float] = None,
        limits: Optional[Mapping[str, Tuple[Optional[float], Optional[float]]]] = None,
        bucket_seconds: float = 60.0,
        latency: float = 0.0,
        latency_jitter: float = 0.0,
        seed: int = 0,
        shuffle: bool = True,
        completion_tokens: int = 5,
        context_length: Optional[int] = None,
        settle_usage: bool = True,
        quota_tokens: Optional[int] = None,
        count_rejected: bool = False,
        retry_after: bool = True,
        azure: bool = False,
        api_keys: Optional[Collection[str]] = None,
        fault_rates: Optional[Mapping[str, float]] = None,
        slow_seconds: float = 5.0,
        cost_model: str = "tiktoken",
        rpd: Optional[float] = None,
        tpd: Optional[float] = None,
        day_seconds: float = 86_400.0,
        headers_report: str = "minute",
        message_used: bool = True,
        integer_resets: bool = False,
        extra_429_headers: Optional[Mapping[str, str]] = None,
        batch_speed: float = 1000.0,
        batch_validation_seconds: float = 0.05,
        batch_finalizing_seconds: float = 0.05,
        batch_window_seconds: float = 86_400.0,
        batch_queue_tokens: Optional[int] = None,
        batch_error_rate: float = 0.0,
        batch_reject: Optional[Callable[[JSONDict], Optional[str]]] = None,
        host: str = "127.0.0.1",
        port: int = 0,
        log_size: int = 10_000,
    ) -> None:
        for name, pair in [("default", (rpm, tpm)), ("per day", (rpd, tpd)), *(limits or {}).items()]:
            for value in pair:
                if value is not None and not value > 0:
                    raise ValueError(f"limits must be positive or None, got {value!r} for {name}")
        if not bucket_seconds > 0 or not day_seconds > 0:
            raise ValueError("bucket_seconds and day_seconds must be positive")
        if cost_model not in COST_MODELS:
            raise ValueError(f"unknown cost_model {cost_model!r}; expected one of {sorted(COST_MODELS)}")
        if headers_report not in _HEADERS_REPORTS:
            raise ValueError(f"unknown headers_report {headers_report!r}; expected 'minute' or 'day'")
        if latency < 0 or latency_jitter < 0 or slow_seconds < 0:
            raise ValueError("latency, latency_jitter and slow_seconds must be >= 0")
        if not (batch_validation_seconds >= 0 and batch_finalizing_seconds >= 0 and batch_window_seconds > 0):
            raise ValueError(
                "batch_validation_seconds and batch_finalizing_seconds must be >= 0, batch_window_seconds > 0"
            )
        if batch_queue_tokens is not None and not batch_queue_tokens > 0:
            raise ValueError(f"batch_queue_tokens must be positive or None, got {batch_queue_tokens!r}")
        if not 0.0 <= batch_error_rate <= 1.0:
            raise ValueError(f"batch_error_rate must be between 0 and 1, got {batch_error_rate!r}")
        self._default_limits: Tuple[Optional[float], Optional[float]] = (rpm, tpm)
        self._limits = dict(limits or {})
        self._bucket_seconds = float(bucket_seconds)
        self._day_limits = (rpd, tpd)
        self._day_seconds = float(day_seconds)
        self._cost_model = cost_model
        self._headers_report = headers_report
        self._message_used = message_used
        self._integer_resets = integer_resets
        self._extra_429_headers = dict(extra_429_headers or {})
        self._latency = float(latency)
        self._jitter = float(latency_jitter)
        self._shuffle = shuffle
        self._completion_tokens = completion_tokens
        self._context_length = context_length
        self._settle_usage = settle_usage
        self._quota = quota_tokens
        self._count_rejected = count_rejected
        self._retry_after = retry_after
        self._azure = azure
        self._api_keys = frozenset(api_keys) if api_keys is not None else None
        for fault in fault_rates or {}:
            self._check_fault(fault)
        self._fault_rates = list((fault_rates or {}).items())
        self._slow_seconds = float(slow_seconds)
        self._host = host
        self._port = port
        self._log_size = log_size

        self._lock = threading.Lock()  # guards everything below; held only for bookkeeping
        self._rng = random.Random(seed)
        self._pairs: Dict[Tuple[str, str], _Pair] = {}
        self._spent: Dict[str, int] = {}
        # [fault, remaining count, path suffix or None, Batch API phase or None, after]
        self._faults: List[List[Any]] = []
        counters = ["requests", "admitted", "rate_limited", "too_large", "quota", "faults", "bad_requests"]
        self._stats = dict.fromkeys([*counters, "tokens_admitted", "tokens_charged", "tokens_used"], 0)
        self._admitted: Deque[Tuple[float, str, int]] = collections.deque(maxlen=log_size)
        self._requests: Deque[JSONDict] = collections.deque(maxlen=log_size)
        self._ids = itertools.count(1)
        self._env = _Env(completion_tokens, context_length, self._ids.__next__, self._shuffled)
        batch_settings = _Settings(
            validation_s=float(batch_validation_seconds),
            finalizing_s=float(batch_finalizing_seconds),
            window_s=float(batch_window_seconds),
            queue_tokens=batch_queue_tokens,
            error_rate=float(batch_error_rate),
            shuffle=shuffle,
            cost_model=cost_model,
            completion_tokens=completion_tokens,
            context_length=context_length,
            reject=batch_reject,
        )
        self._batches = _Batches(batch_settings, 0.0, seed, self._ids.__next__)
        self._batches.set_speed(batch_speed)  # checks it

        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._stop_event = threading.Event()
        self._conns: Set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> FakeOpenAI:
        """Bind and serve in a daemon thread; returns self so ``FakeOpenAI().start()`` chains."""
        _encoder()  # load the encoding now, not inside the first (timed) request
        with self._lock:
            if self._server is not None:
                raise RuntimeError("FakeOpenAI is already running")
            self._stop_event = threading.Event()
            server = _Server((self._host, self._port), _Handler)
            server.fake = self
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="FakeOpenAI", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open keep-alive connections and wake pending sleeps (idempotent)."""
        with self._lock:
            server, self._server = self._server, None
            thread, self._thread = self._thread, None
        if server is None:
            return
        self._stop_event.set()
        server.shutdown()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the running server."""
        server = self._server
        if server is None:
            raise RuntimeError("FakeOpenAI is not running; call start() or use it as a context manager")
        return f"http://{self._host}:{server.server_address[1]}"

    @property
    def base_url(self) -> str:
        """``base_url`` for ``openai.OpenAI``: ``http://HOST:PORT/v1``."""
        return self.url + "/v1"

    @property
    def azure_endpoint(self) -> str:
        """``azure_endpoint`` for ``openai.AzureOpenAI``: ``http://HOST:PORT``."""
        return self.url

    # ----------------------------------------------------------------- faults

    @staticmethod
    def _check_fault(fault: str) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULTS)}")

    def inject(
        self,
        fault: str,
        count: int = 1,
        *,
        path: Optional[str] = None,
        phase: Optional[str] = None,
        after: bool = False,
    ) -> None:
        """Make the next ``count`` API requests (whose path ends with ``path``, if given) fail.

        ``fault`` is one of :data:`FAULTS`.  Queued faults are used in order before
        ``fault_rates`` are consulted.  Files/Batch API requests take only the faults of
        :data:`.batches.BATCH_FAULTS`; a queued fault they cannot take waits for a request
        that can.

        ``phase`` (one of :data:`.batches.BATCH_PHASES`, e.g. "create" for ``POST
        /v1/batches``) limits the fault to that Files/Batch API call.  ``after=True`` (Files/Batch
        API calls only, so it needs ``phase``) carries the call out first and then replaces its
        reply by the fault: ``inject("500", phase="create", after=True)`` creates the batch and
        answers 500 (with "drop", the connection closes without a reply), as when a real
        reply is lost on its way back, which is how a retrying client makes duplicate batches.
        """
        self._check_fault(fault)
        if phase is not None and phase not in BATCH_PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {sorted(BATCH_PHASES)}")
        if after and phase is None:
            raise ValueError("after=True needs a phase")
        if phase is not None and fault not in BATCH_FAULTS:
            raise ValueError(f"fault {fault!r} cannot happen on the Batch API; expected one of {sorted(BATCH_FAULTS)}")
        if count > 0:
            with self._lock:
                self._faults.append([fault, count, path, phase, after])

    def _pick_fault(self, path: str) -> str:
        """Called under the lock."""
        for entry in self._faults:
            if entry[3] is None and (entry[2] is None or path.endswith(entry[2])):
                entry[1] -= 1
                if entry[1] <= 0:
                    self._faults.remove(entry)
                return str(entry[0])
        if self._fault_rates:
            u = self._rng.random()
            for fault, p in self._fault_rates:
                u -= p
                if u < 0:
                    return fault
        return ""

    def _pick_batch_fault(self, path: str, phase: str) -> Tuple[str, bool]:
        """(fault or "", after) for a Files/Batch API call; called under the lock."""
        for entry in self._faults:
            fault, _, suffix, entry_phase, after = entry
            if entry_phase not in (None, phase) or (suffix is not None and not path.endswith(suffix)):
                continue
            if fault in BATCH_FAULTS:
                entry[1] -= 1
                if entry[1] <= 0:
                    self._faults.remove(entry)
                return str(fault), bool(after)
        if self._fault_rates:
            u = self._rng.random()
            for fault, p in self._fault_rates:
                u -= p
                if u < 0:
                    return (fault if fault in BATCH_FAULTS else ""), False
        return "", False

    # ----------------------------------------------------------------- observability

    def stats(self) -> Dict[str, int]:
        """Counters: ``requests`` (HTTP requests received), ``admitted``, ``rate_limited``
        (rate-limit 429s incl. injected), ``too_large``, ``quota``, ``faults`` (faults applied),
        ``bad_requests`` (400, 401 and 404 responses), and tokens of admitted requests:
        ``tokens_admitted`` (admission costs, in ``cost_model`` units), ``tokens_charged``
        (what the token buckets keep: admission costs minus settlement refunds; equals
        ``tokens_used`` once all settled with ``settle_usage``) and ``tokens_used`` (reported
        ``usage`` totals).  Throughput in the server's units: ``tokens_charged`` / seconds.

        The Batch API's: ``files_uploaded`` (``POST /v1/files`` that succeeded),
        ``batches_created``, ``batch_lines`` (batch request lines run: succeeded, or failed with
        a 400 or 500; not those that expired or were never run) and ``batch_tokens_used``
        (``usage`` totals of the lines that succeeded).  Batch API calls count in ``requests``,
        ``faults`` and ``bad_requests`` (400 and 404), never in the other counters."""
        batch_stats = self._batches.stats()
        with self._lock:
            return {**self._stats, **batch_stats}

    def reset_stats(self) -> None:
        """Zero the counters and clear both logs; buckets and quota are left as they are."""
        self._batches.reset_stats()
        with self._lock:
            for name in self._stats:
                self._stats[name] = 0
            self._admitted.clear()
            self._requests.clear()

    @property
    def admitted(self) -> List[Tuple[float, str, int]]:
        """Snapshot of the last ``log_size`` admissions: (time.monotonic(), model, admission cost
        in ``cost_model`` units, before any settlement)."""
        with self._lock:
            return list(self._admitted)

    @property
    def requests_log(self) -> Deque[JSONDict]:
        """Snapshot of the last ``log_size`` HTTP requests: dicts with ``path``, ``method``,
        ``body`` (parsed JSON or None) and ``headers`` (lower-case, without credentials)."""
        with self._lock:
            return collections.deque(self._requests, maxlen=self._log_size)

    def batches(self) -> List[JSONDict]:
        """Snapshot of every batch, oldest first, as the Batch objects ``GET /v1/batches/{id}``
        would return now."""
        return self._batches.snapshot()

    def file_content(self, file_id: str) -> bytes:
        """The content of a file (uploaded, or a batch's output or error file); KeyError when
        there is no such file (never uploaded, or deleted)."""
        return self._batches.file_content(file_id)

    @property
    def batch_speed(self) -> float:
        """Request lines each ``in_progress`` batch runs per second; settable while the server
        runs (0 holds every batch where it is; batches first run up to now at the old speed)."""
        return self._batches.speed

    @batch_speed.setter
    def batch_speed(self, speed: float) -> None:
        self._batches.set_speed(speed)

    def max_admitted_in_window(self, window_s: float, model: Optional[str] = None) -> Tuple[int, int]:
        """Most requests and most tokens (admission costs) admitted in any window of ``window_s``
        seconds (two admissions share a window when their times differ by less than
        ``window_s``), optionally only for ``model``.  The two maxima may come from different
        windows.  Use it to check that a client never exceeded a limit."""
        entries = [(t, cost) for t, m, cost in self.admitted if model is None or m == model]
        best_n = best_tokens = tokens = left = 0
        for right, (t, cost) in enumerate(entries):
            tokens += cost
            while t - entries[left][0] >= window_s:
                tokens -= entries[left][1]
                left += 1
            best_n = max(best_n, right - left + 1)
            best_tokens = max(best_tokens, tokens)
        return best_n, best_tokens

    # ----------------------------------------------------------------- request processing

    def _process(self, method: str, target: str, headers: Dict[str, str], raw: bytes) -> _Reply:
        """Turn one HTTP request into a reply, doing admission; runs in the handler thread."""
        path = target.split("?", 1)[0]
        body: Any = None
        bad_json = False
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                bad_json = True
        logged = {k: v for k, v in headers.items() if k not in ("authorization", "api-key")}
        with self._lock:
            self._stats["requests"] += 1
            self._requests.append({"path": path, "method": method, "body": body, "headers": logged})

        call = _batch_call(method, path)
        if call is not None:
            return self._batch_request(call, target, headers, raw)
        route = self._route(method, path)
        if route is None:
            return self._bad(404, _error(f"Invalid URL ({method} {path})", "invalid_request_error"))
        endpoint, deployment = route
        key = self._auth(headers)
        if isinstance(key, _Reply):
            return key
        if endpoint == "models":
            created = int(time.time())
            names = dict.fromkeys([*_MODELS, *self._limits])
            data = [{"id": m, "object": "model", "created": created, "owned_by": "openai"} for m in names]
            return _json_reply(200, {"object": "list", "data": data}, [("x-request-id", self._request_id())])
        try:
            if bad_json or not isinstance(body, dict):
                raise _BadRequest(
                    "We could not parse the JSON body of your request. (HINT: This likely means you "
                    "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
                )
            model = deployment or body.get("model")
            if not isinstance(model, str) or not model:
                raise _BadRequest("you must provide a model parameter", "model")
            job = _JOBS[endpoint](body, model, self._env)
        except _BadRequest as exc:
            return self._bad(400, _error(exc.message, "invalid_request_error", param=exc.param))
        job.cost = _admission_cost(self._cost_model, job, raw)
        return self._admit(key, path, job)

    def _batch_request(self, call: _Call, target: str, headers: Dict[str, str], raw: bytes) -> _Reply:
        """A Files/Batch API call: authentication, a fault before or after it, the call itself.
        Never rate limited."""
        key = self._auth(headers)
        if isinstance(key, _Reply):
            return key
        with self._lock:
            fault, after = self._pick_batch_fault(target.split("?", 1)[0], call.phase)
            if fault:
                self._stats["faults"] += 1
        headers_out = [("x-request-id", self._request_id())]
        if fault and not after and fault not in ("slow", "truncate"):
            return _fault_reply(fault, headers_out, self._retry_headers(_FAULT_RETRY_S))
        reply = self._batches.handle(call, target, headers, raw, key)
        reply.headers = headers_out + reply.headers
        if reply.status in (400, 404):
            with self._lock:
                self._stats["bad_requests"] += 1
        if fault in ("slow", "truncate"):
            reply.action = fault
        elif fault:
            reply = _fault_reply(fault, headers_out, self._retry_headers(_FAULT_RETRY_S))
        return reply

    @staticmethod
    def _route(method: str, path: str) -> Optional[Tuple[str, Optional[str]]]:
        """(endpoint, Azure deployment or None) for a path, or None when not found."""
        p = path.rstrip("/")
        deployment: Optional[str] = None
        if p.startswith("/openai/deployments/"):
            deployment, _, endpoint = p[len("/openai/deployments/") :].partition("/")
            deployment = urllib.parse.unquote(deployment)
            if not deployment:
                return None
        elif p.startswith("/openai/v1/"):
            endpoint = p[len("/openai/v1/") :]
        elif p.startswith("/openai/"):
            endpoint = p[len("/openai/") :]
        elif p.startswith("/v1/"):
            endpoint = p[len("/v1/") :]
        else:
            return None
        if endpoint not in _ENDPOINTS or method != ("GET" if endpoint == "models" else "POST"):
            return None
        return endpoint, deployment

    def _auth(self, headers: Dict[str, str]) -> Union[str, _Reply]:
        auth = headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        key = key or headers.get("api-key", "").strip()
        if not key:
            return self._bad(
                401,
                _error(
                    "You didn't provide an API key. You need to provide your API key in an Authorization "
                    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                    "invalid_request_error",
                ),
            )
        if self._api_keys is not None and key not in self._api_keys:
            return self._bad(
                401,
                _error(
                    f"Incorrect API key provided: {_mask_key(key)}. You can find your API key at "
                    "https://platform.openai.com/account/api-keys.",
                    "invalid_request_error",
                    code="invalid_api_key",
                ),
            )
        return key

    def _bad(self, status: int, payload: JSONDict) -> _Reply:
        with self._lock:
            self._stats["bad_requests"] += 1
        return _json_reply(status, payload, [("x-request-id", self._request_id())])

    def _request_id(self) -> str:
        return f"req_{next(self._ids):024x}"

    def _shuffled(self, items: List[Any]) -> List[Any]:
        if self._shuffle and len(items) > 1:
            with self._lock:
                self._rng.shuffle(items)
        return items

    # ----------------------------------------------------------------- admission

    def _pair(self, key: str, model: str, now: float) -> _Pair:
        """Refilled bucket state of (key, model); called under the lock."""
        pair = self._pairs.get((key, model))
        if pair is None:
            minute = self._limits.get(model, self._default_limits)
            pair = _Pair.full(minute, self._day_limits, self._bucket_seconds, self._day_seconds, now)
            self._pairs[(key, model)] = pair
        pair.refill(now)
        return pair

    def _rl_headers(self, pair: _Pair) -> List[Tuple[str, str]]:
        """``x-ratelimit-*`` headers describing the pair's current state; called under the lock."""
        day = self._headers_report == "day"
        headers = []
        for suffix, minute, daily in (("requests", pair.req, pair.req_day), ("tokens", pair.tok, pair.tok_day)):
            bucket = daily if day and daily is not None else minute
            if bucket is None:
                continue
            remaining = str(max(0, math.floor(bucket.level + _EPS)))
            if self._integer_resets:
                reset: Optional[str] = str(_ms(bucket.reset_in()))
            else:
                reset = None if self._azure else _go_duration(bucket.reset_in())
            if not self._azure:
                headers.append((f"x-ratelimit-limit-{suffix}", _num(bucket.limit)))
            headers.append((f"x-ratelimit-remaining-{suffix}", remaining))
            if reset is not None:
                headers.append((f"x-ratelimit-reset-{suffix}", reset))
        return headers

    def _retry_headers(self, wait: float) -> List[Tuple[str, str]]:
        if not self._retry_after:
            return []
        ms = str(max(1, _ms(wait)))
        if self._azure:
            return [("retry-after-ms", ms), ("x-ms-retry-after-ms", ms)]
        return [("retry-after", str(max(1, math.ceil(wait - _EPS)))), ("retry-after-ms", ms)]

    def _limited(self, pair: _Pair, payload: JSONDict, wait: float, headers: List[Tuple[str, str]]) -> _Reply:
        """A rate-limit 429: ``x-ratelimit-*`` and retry headers, then ``extra_429_headers``; under the lock."""
        headers = headers + self._rl_headers(pair) + self._retry_headers(wait)
        if self._extra_429_headers:
            names = {name.lower() for name in self._extra_429_headers}
            headers = [h for h in headers if h[0].lower() not in names] + list(self._extra_429_headers.items())
        return _json_reply(429, payload, headers)

    def _admit(self, key: str, path: str, job: _Job) -> _Reply:
        """Fault decision, quota and every bucket, under one brief lock acquisition."""
        model, cost = job.model, job.cost
        headers = [("x-request-id", self._request_id())]
        with self._lock:
            now = time.monotonic()
            fault = self._pick_fault(path)
            if fault:
                self._stats["faults"] += 1
            pair = self._pair(key, model, now)
            if fault in _REJECTING_FAULTS:
                return self._fault_reply(fault, pair, job, headers)
            if self._quota is not None and self._spent.get(key, 0) >= self._quota:
                self._stats["quota"] += 1
                return _json_reply(429, _quota_error(), headers)
            too_large = pair.too_large(cost)
            if too_large is not None:  # more tokens than a whole limit: can never succeed
                self._stats["too_large"] += 1
                payload = _too_large_error(model, too_large.unit, too_large.limit, cost)
                return _json_reply(429, payload, headers + self._rl_headers(pair))
            if not pair.fits(cost):
                self._stats["rate_limited"] += 1
                if self._count_rejected and pair.req is not None:
                    pair.req.level = max(0.0, pair.req.level - 1)
                wait, bucket, amount = pair.longest_wait(cost)  # the message names that bucket
                used = max(0, round(bucket.capacity - bucket.level)) if self._message_used else None
                payload = _rate_limit_error(model, bucket.unit, bucket.limit, used, amount, wait)
                return self._limited(pair, payload, wait, headers)
            pair.take(cost)
            self._stats["admitted"] += 1
            self._stats["tokens_admitted"] += cost
            self._stats["tokens_charged"] += cost
            self._stats["tokens_used"] += job.usage_total
            self._admitted.append((now, model, cost))
            self._spent[key] = self._spent.get(key, 0) + job.usage_total
            headers += self._rl_headers(pair)
        reply = job.render(fault)
        reply.headers = headers + reply.headers
        reply = _after_admission(fault, reply)
        if self._settle_usage and cost != job.usage_total:
            reply.settle = ((key, model), cost - job.usage_total)
        return reply

    def _fault_reply(self, fault: str, pair: _Pair, job: _Job, headers: List[Tuple[str, str]]) -> _Reply:
        """Reply for a fault that replaces admission; called under the lock."""
        plain = _plain_fault_reply(fault, headers)
        if plain is not None:
            if fault == "400":
                self._stats["bad_requests"] += 1
            return plain
        if fault == "quota":
            self._stats["quota"] += 1
            return _json_reply(429, _quota_error(), headers)
        if fault == "too_large":
            self._stats["too_large"] += 1
            limit = pair.tok.limit if pair.tok is not None else max(1, job.cost - 1)
            payload = _too_large_error(job.model, "TPM", limit, job.cost)
            return _json_reply(429, payload, headers + self._rl_headers(pair))
        self._stats["rate_limited"] += 1
        # A real 429 names the account's real limit; with none configured here, a tier-1-like 10,000 RPM
        # (naming 1 made a client that believes 429 messages crawl at one request a minute).
        limit = pair.req.limit if pair.req is not None else _UNCONFIGURED_RPM
        used = limit if self._message_used else None
        payload = _rate_limit_error(job.model, "RPM", limit, used, 1, _FAULT_RETRY_S)
        if fault == "429":
            return self._limited(pair, payload, _FAULT_RETRY_S, headers)
        return _json_reply(429, payload, headers)

    def _settle(self, reply: _Reply) -> None:
        """Refund the unused part of the admission estimate to the token buckets (a negative
        refund, when the usage exceeds the estimate, charges the difference)."""
        if reply.settle is None:
            return
        (key, model), refund = reply.settle
        reply.settle = None
        with self._lock:
            self._stats["tokens_charged"] -= refund
            self._pair(key, model, time.monotonic()).refund(refund)

    def _delay(self, reply: _Reply) -> float:
        """Seconds to sleep before sending ``reply``."""
        delay = self._latency + (self._slow_seconds if reply.action == "slow" else 0.0)
        if self._jitter:
            with self._lock:
                delay += self._rng.uniform(0.0, self._jitter)
        return delay

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)
