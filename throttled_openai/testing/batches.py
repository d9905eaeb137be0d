"""The Files and Batch APIs: uploads, and batches that validate, run and finalize in simulated time.

What the fake does follows ``docs/batch-api-facts.md`` (the real service's behaviour, with sources):

- ``POST /v1/files`` (multipart: ``purpose``, ``file``), ``GET /v1/files`` (``purpose``, ``limit``,
  ``after``, ``order``), ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content`` (the raw bytes),
  ``DELETE /v1/files/{id}``.  A batch-purpose upload must be named ``*.jsonl``; its lines are not
  looked at until a batch validates them.
- ``POST /v1/batches``, ``GET /v1/batches`` (``limit`` 1..100, default 20, ``after``; newest first),
  ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``.  Create refuses (400) only a bad
  request (unknown input file, ``completion_window`` other than ``"24h"``, an endpoint the Batch API
  does not serve, metadata over its limits); everything about the file's content, and the
  enqueued-token limit, comes later as a ``failed`` batch, as in the real service.

A batch's life, in seconds of ``time.monotonic()``: ``validating`` for ``validation_s``; then
``failed`` (``errors``) or ``in_progress``, running ``speed`` lines per second; ``finalizing`` for
``finalizing_s`` once every line ran; ``completed``.  Unfinished ``window_s`` after creation:
``expired``.  Cancelled: ``cancelling`` for ``finalizing_s``, then ``cancelled``.  Output files
(purpose ``batch_output``) appear when a batch ends: successes in the output file, per-request
failures in the error file, each in shuffled order.

Nothing runs in the background: every call first brings every batch up to now (:meth:`_Batches.advance`),
replaying the events of all batches in time order, so the outcome depends on the clock alone, never
on a thread's timing.  Lines run through the synchronous endpoints' own handlers (``_JOBS``), so a
line gets exactly the body (or the 400) the same request would get from ``POST /v1/...``.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import math
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from .counting import count_tokens
from .endpoints import _JOBS, _BadRequest, _Env
from .faults import _FAULT_RETRY_S, _SERVER_ERROR, _plain_fault_reply
from .formats import JSONDict, _error, _rate_limit_error
from .model import _admission_cost, _Job
from .replies import _json_reply, _Reply

__all__ = ["BATCH_FAULTS", "BATCH_PHASES"]

#: Names of the Files/Batch API calls, for ``FakeOpenAI.inject(..., phase=...)``: "upload" (``POST
#: /files``), "list_files" (``GET /files``), "retrieve_file" (``GET /files/{id}``), "content" (``GET
#: /files/{id}/content``), "delete" (``DELETE /files/{id}``), "create" (``POST /batches``), "list"
#: (``GET /batches``), "retrieve" (``GET /batches/{id}``), "cancel" (``POST /batches/{id}/cancel``).
BATCH_PHASES = frozenset(
    {"upload", "list_files", "retrieve_file", "content", "delete", "create", "list", "retrieve", "cancel"}
)
#: The faults that Files/Batch API routes can suffer (the others make no sense there and are
#: skipped: an injected one waits for a request it fits, a drawn one counts as no fault).
#: "slow" and "truncate" always come after the call was carried out; so does any of them
#: injected with ``after=True``.
BATCH_FAULTS = frozenset(
    {"500", "503", "502_html", "504_html", "429", "429_message_only", "400", "drop", "slow", "truncate"}
)

_BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/moderations")
_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
_PREFIXES = ("/openai/v1/", "/openai/", "/v1/")
_ACTIVE = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
_QUEUED = frozenset({"in_progress", "finalizing", "cancelling"})  # states whose tokens fill the queue
_FILE_TTL_S = 2_592_000  # 30 days: expires_at - created_at of batch files
_MAX_TASKS = 50_000  # requests per batch
_MAX_EMBEDDING_INPUTS = 50_000  # embedding inputs summed over a batch
_MAX_REPORTED = 100  # errors.data entries kept for a batch that failed validation
_LIST_LIMIT = (1, 100, 20)  # GET /batches limit: min, max, default
_FILES_LIMIT = (1, 10_000, 10_000)  # GET /files limit
_EXPIRED_LINE = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
_MODERATION_CATEGORIES = ("harassment", "hate", "illicit", "self-harm", "sexual", "violence")


_ROUTES = {
    ("POST", "files"): "upload",
    ("GET", "files"): "list_files",
    ("GET", "files/{id}"): "retrieve_file",
    ("GET", "files/{id}/content"): "content",
    ("DELETE", "files/{id}"): "delete",
    ("POST", "batches"): "create",
    ("GET", "batches"): "list",
    ("GET", "batches/{id}"): "retrieve",
    ("POST", "batches/{id}/cancel"): "cancel",
}


class _Call(NamedTuple):
    """A Files/Batch API request: which call (one of :data:`BATCH_PHASES`) on which object."""

    phase: str
    object_id: str  # "" for calls on a collection


def _batch_call(method: str, path: str) -> Optional[_Call]:
    """The Files/Batch API call for a method and path (``/v1/``, Azure's ``/openai/`` or
    ``/openai/v1/`` prefix), or None when it is none (the ordinary router then answers 404)."""
    p = path.rstrip("/")
    prefix = next((x for x in _PREFIXES if p.startswith(x)), None)
    if prefix is None:
        return None
    parts = [urllib.parse.unquote(x) for x in p[len(prefix) :].split("/")]
    if len(parts) > 3 or not all(parts):
        return None
    shape = "/".join([parts[0], *["{id}"][: len(parts) - 1], *parts[2:]])
    phase = _ROUTES.get((method, shape))
    return None if phase is None else _Call(phase, parts[1] if len(parts) > 1 else "")


def _fault_reply(fault: str, headers: List[Tuple[str, str]], retry_headers: List[Tuple[str, str]]) -> _Reply:
    """The reply for a fault that replaces a Files/Batch API reply (see :data:`BATCH_FAULTS`)."""
    plain = _plain_fault_reply(fault, headers)
    if plain is not None:
        return plain
    # "429", "429_message_only"
    payload = _rate_limit_error("requests", "RPM", 1000, 1000, 1, _FAULT_RETRY_S)
    return _json_reply(429, payload, headers + (retry_headers if fault == "429" else []))


class _Refused(Exception):
    """A Files/Batch API request answered with an OpenAI error (400 or 404)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.reply = _json_reply(status, _error(message, "invalid_request_error", code=code, param=param))


def _not_found(kind: str, object_id: str) -> _Refused:
    if kind == "file":
        return _Refused(404, f"No such File object: {object_id}", "id")
    return _Refused(404, f"No batch found with id '{object_id}'.", "batch_id")


@dataclass
class _File:
    id: str
    data: bytes
    filename: str
    purpose: str
    created_at: int  # unix seconds

    def to_dict(self) -> JSONDict:
        batchy = self.purpose in ("batch", "batch_output")
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": self.created_at + _FILE_TTL_S if batchy else None,
            "status_details": None,
        }


@dataclass
class _Line:
    """One request of a batch that passed validation."""

    custom_id: str
    job: Optional[_Job]  # None when the endpoint refused the body: then ``refusal`` says why
    refusal: Optional[_BadRequest]
    has_usage: bool  # False for moderations, whose responses report no usage


@dataclass
class _Batch:
    """A batch's state; times are ``time.monotonic()`` seconds, keyed by the Batch object's field."""

    id: str
    key: str  # the API key that created it: the enqueued-token limit is per (key, model)
    endpoint: str
    input_file_id: str
    data: bytes  # the input file's content when the batch was created
    metadata: Optional[Dict[str, str]]
    created: float
    deadline: float  # created + window: unfinished then, it expires
    status: str = "validating"
    times: Dict[str, float] = field(default_factory=dict)
    errors: Optional[List[JSONDict]] = None
    model: Optional[str] = None
    lines: List[_Line] = field(default_factory=list)
    total: int = 0
    queued_tokens: int = 0  # enqueued input tokens, counted against the queue limit
    progress: float = 0.0  # lines run, with the fraction of the next one
    done: int = 0  # lines run: floor(progress)
    t_last: float = 0.0  # when progress was last brought up to date
    outputs: List[bytes] = field(default_factory=list)  # output-file lines, then the error file's
    failures: List[bytes] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    output_file_id: Optional[str] = None
    error_file_id: Optional[str] = None


@dataclass
class _Settings:
    """The Batch API's knobs (see FakeOpenAI's docstring for each)."""

    validation_s: float
    finalizing_s: float
    window_s: float
    queue_tokens: Optional[int]
    error_rate: float
    shuffle: bool
    cost_model: str
    completion_tokens: int
    context_length: Optional[int]
    reject: Optional[Callable[[JSONDict], Optional[str]]] = None


class _Batches:
    """Every file and batch of one fake server, under one lock that is held for whole calls."""

    def __init__(
        self,
        settings: _Settings,
        speed: float,
        seed: int,
        next_id: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._speed = speed
        self._clock = clock
        self._lock = threading.Lock()
        self._rng = random.Random(f"batches:{seed}")
        self._env = _Env(settings.completion_tokens, settings.context_length, next_id, self._shuffled)
        self._wall0, self._mono0 = time.time(), clock()
        self._files: Dict[str, _File] = {}  # in creation order
        self._batches: Dict[str, _Batch] = {}  # in creation order
        self._active: List[_Batch] = []  # batches not yet in a final state
        self._stats = dict.fromkeys(["files_uploaded", "batches_created", "batch_lines", "batch_tokens_used"], 0)

    def __repr__(self) -> str:
        with self._lock:
            states: Dict[str, int] = {}
            for b in self._batches.values():
                states[b.status] = states.get(b.status, 0) + 1
            return f"<_Batches speed={self._speed:g}/s files={len(self._files)} batches={states}>"

    # ----------------------------------------------------------------- public face (FakeOpenAI's)

    @property
    def speed(self) -> float:
        return self._speed

    def set_speed(self, speed: float) -> None:
        """Lines per second from now on; batches are first brought up to now at the old speed."""
        if not speed >= 0:
            raise ValueError(f"batch_speed must be >= 0, got {speed!r}")
        with self._lock:
            self.advance(self._clock())
            self._speed = float(speed)

    def stats(self) -> Dict[str, int]:
        with self._lock:
            self.advance(self._clock())
            return dict(self._stats)

    def reset_stats(self) -> None:
        with self._lock:
            for name in self._stats:
                self._stats[name] = 0

    def snapshot(self) -> List[JSONDict]:
        with self._lock:
            self.advance(self._clock())
            return [self._batch_dict(b) for b in self._batches.values()]

    def file_content(self, file_id: str) -> bytes:
        with self._lock:
            self.advance(self._clock())
            if file_id not in self._files:
                raise KeyError(file_id)
            return self._files[file_id].data

    def handle(self, call: _Call, target: str, headers: Dict[str, str], raw: bytes, key: str) -> _Reply:
        """Carry out one Files/Batch API call (authentication and faults are the caller's)."""
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(target.partition("?")[2]).items()}
        with self._lock:
            now = self._clock()
            self.advance(now)
            try:
                if call.phase == "upload":
                    return _json_reply(200, self._upload(headers.get("content-type", ""), raw, now).to_dict())
                if call.phase == "list_files":
                    return _json_reply(200, self._list_files(query))
                if call.phase == "create":
                    return _json_reply(200, self._batch_dict(self._create(raw, key, now)))
                if call.phase == "list":
                    return _json_reply(200, self._list(query))
                if call.phase in ("retrieve", "cancel"):
                    batch = self._batches.get(call.object_id)
                    if batch is None:
                        raise _not_found("batch", call.object_id)
                    if call.phase == "cancel":
                        self._cancel(batch, now)
                    return _json_reply(200, self._batch_dict(batch))
                file = self._files.get(call.object_id)
                if file is None:
                    raise _not_found("file", call.object_id)
                if call.phase == "content":
                    return _Reply(200, file.data, content_type="application/octet-stream")
                if call.phase == "delete":
                    del self._files[file.id]
                    return _json_reply(200, {"id": file.id, "object": "file", "deleted": True})
                return _json_reply(200, file.to_dict())
            except _Refused as exc:
                return exc.reply

    # ----------------------------------------------------------------- files

    def _unix(self, t: float) -> int:
        return int(self._wall0 + (t - self._mono0))

    def _hex(self, digits: int) -> str:
        return f"{self._rng.getrandbits(4 * digits):0{digits}x}"

    def _add_file(self, data: bytes, filename: str, purpose: str, t: float) -> _File:
        file = _File(f"file-{self._hex(24)}", data, filename, purpose, self._unix(t))
        self._files[file.id] = file
        return file

    def _upload(self, content_type: str, raw: bytes, now: float) -> _File:
        if not content_type.lower().startswith("multipart/form-data"):
            raise _Refused(400, "The request must be multipart/form-data with 'purpose' and 'file' parts.")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw
        )
        parts: Dict[str, Tuple[Optional[str], bytes]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(payload, bytes):
                parts[name] = (part.get_filename(), payload)
        if "purpose" not in parts:
            raise _Refused(400, "Missing required parameter: 'purpose'.", "purpose")
        if "file" not in parts:
            raise _Refused(400, "Missing required parameter: 'file'.", "file")
        purpose = parts["purpose"][1].decode("utf-8", "replace")
        if purpose not in _PURPOSES:
            expected = ", ".join(f"'{p}'" for p in sorted(_PURPOSES))
            raise _Refused(
                400, f"Invalid value: '{purpose}'. Supported values are: {expected}.", "purpose", "invalid_value"
            )
        filename, data = parts["file"]
        filename = filename or "upload"
        if purpose == "batch" and not filename.lower().endswith(".jsonl"):
            raise _Refused(400, "Invalid file format for Batch API. Must be .jsonl")
        self._stats["files_uploaded"] += 1
        return self._add_file(data, filename, purpose, now)

    def _list_files(self, query: Dict[str, str]) -> JSONDict:
        files = [f for f in self._files.values() if query.get("purpose") in (None, f.purpose)]
        if query.get("order", "desc") != "asc":
            files.reverse()
        return _page([f.to_dict() for f in files], query, _FILES_LIMIT)

    # ----------------------------------------------------------------- batches: requests

    def _create(self, raw: bytes, key: str, now: float) -> _Batch:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise _Refused(
                400, "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload."
            )
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                raise _Refused(400, f"Missing required parameter: '{name}'.", name)
        if body["completion_window"] != "24h":
            msg = f"Invalid value: '{body['completion_window']}'. Supported values are: '24h'."
            raise _Refused(400, msg, "completion_window", "invalid_value")
        if body["endpoint"] not in _BATCH_ENDPOINTS:
            expected = ", ".join(f"'{e}'" for e in _BATCH_ENDPOINTS)
            raise _Refused(
                400,
                f"Invalid value: '{body['endpoint']}'. Supported values are: {expected}.",
                "endpoint",
                "invalid_value",
            )
        metadata = _check_metadata(body.get("metadata"))
        file = self._files.get(body["input_file_id"])
        if file is None:
            msg = f"Invalid 'input_file_id': '{body['input_file_id']}'. File does not exist."
            raise _Refused(400, msg, "input_file_id")
        if file.purpose != "batch":
            msg = f"Invalid 'input_file_id': '{file.id}' has purpose '{file.purpose}', not 'batch'."
            raise _Refused(400, msg, "input_file_id")
        batch = _Batch(
            f"batch_{self._hex(32)}",
            key,
            body["endpoint"],
            file.id,
            file.data,
            metadata,
            now,
            now + self._settings.window_s,
        )
        self._batches[batch.id] = batch
        self._active.append(batch)
        self._stats["batches_created"] += 1
        return batch

    def _cancel(self, batch: _Batch, now: float) -> None:
        if batch.status == "cancelling":
            return
        if batch.status not in ("validating", "in_progress"):
            raise _Refused(400, f"Cannot cancel a batch with status '{batch.status}'.")
        batch.status = "cancelling"
        batch.times["cancelling_at"] = now

    def _list(self, query: Dict[str, str]) -> JSONDict:
        batches = list(self._batches.values())
        batches.reverse()
        return _page([self._batch_dict(b) for b in batches], query, _LIST_LIMIT)

    def _batch_dict(self, b: _Batch) -> JSONDict:
        def at(name: str) -> Optional[int]:
            t = b.times.get(name)
            return None if t is None else self._unix(t)

        created_at = self._unix(b.created)
        return {
            "id": b.id,
            "object": "batch",
            "endpoint": b.endpoint,
            "errors": None if b.errors is None else {"object": "list", "data": b.errors},
            "input_file_id": b.input_file_id,
            "completion_window": "24h",
            "status": b.status,
            "output_file_id": b.output_file_id,
            "error_file_id": b.error_file_id,
            "created_at": created_at,
            "in_progress_at": at("in_progress_at"),
            "expires_at": created_at + math.ceil(self._settings.window_s),
            "finalizing_at": at("finalizing_at"),
            "completed_at": at("completed_at"),
            "failed_at": at("failed_at"),
            "expired_at": at("expired_at"),
            "cancelling_at": at("cancelling_at"),
            "cancelled_at": at("cancelled_at"),
            "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
            "metadata": b.metadata,
            "model": b.model,
            "usage": {
                "input_tokens": b.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": b.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": b.input_tokens + b.output_tokens,
            },
        }

    # ----------------------------------------------------------------- batches: simulated time

    def advance(self, now: float) -> None:
        """Bring every batch up to ``now``: replay the state changes of all batches in time order
        (so a batch validating at t sees the queue as it was at t), then run the lines due by
        ``now``.  Called under the lock."""
        while self._active:
            t, batch = min(((self._next_event(b), b) for b in self._active), key=lambda e: e[0])
            if t > now:
                break
            self._step(batch, t)
            if batch.status not in _ACTIVE:
                self._active.remove(batch)
        for batch in self._active:
            if batch.status == "in_progress":
                self._run(batch, now)

    def _next_event(self, b: _Batch) -> float:
        """When ``b`` next changes state, at the current speed (with speed 0: its deadline)."""
        s = self._settings
        if b.status == "validating":
            return min(b.created + s.validation_s, b.deadline)
        if b.status == "in_progress":
            left = b.total - b.progress
            finish = b.t_last if left <= 0 else b.t_last + left / self._speed if self._speed > 0 else math.inf
            return min(finish, b.deadline)
        return b.times["finalizing_at" if b.status == "finalizing" else "cancelling_at"] + s.finalizing_s

    def _step(self, b: _Batch, t: float) -> None:
        """Take ``b``'s state change due at ``t``."""
        if b.status == "validating":
            if t >= b.deadline:
                self._end(b, "expired", t)
            else:
                self._validate(b, t)
        elif b.status == "in_progress":
            self._run(b, t)
            if b.done < b.total and t < b.deadline:  # the finish event, short of a float's last bit
                self._run(b, t, finish=True)
            if b.done == b.total:
                b.status = "finalizing"
                b.times["finalizing_at"] = t
            else:
                for line in b.lines[b.done :]:
                    b.failures.append(_line_json(self._hex(32), line.custom_id, None, _EXPIRED_LINE))
                b.failed += b.total - b.done
                self._end(b, "expired", t)
        else:
            self._end(b, "completed" if b.status == "finalizing" else "cancelled", t)

    def _end(self, b: _Batch, status: str, t: float) -> None:
        """Put ``b`` in a final state at ``t``, writing its output and error files."""
        b.status = status
        b.times[f"{status}_at"] = t
        for lines, attr, suffix in ((b.outputs, "output_file_id", "output"), (b.failures, "error_file_id", "error")):
            if lines:
                self._shuffled(lines)
                file = self._add_file(b"\n".join(lines) + b"\n", f"{b.id}_{suffix}.jsonl", "batch_output", t)
                setattr(b, attr, file.id)
        b.lines, b.outputs, b.failures, b.data = [], [], [], b""

    def _fail(self, b: _Batch, t: float, errors: List[JSONDict]) -> None:
        b.status = "failed"
        b.times["failed_at"] = t
        b.errors = errors[:_MAX_REPORTED]
        b.data = b""

    def _validate(self, b: _Batch, t: float) -> None:
        """End ``b``'s validation at ``t``: ``failed`` with ``errors``, or ``in_progress``."""
        numbered = [(n, line) for n, line in enumerate(b.data.split(b"\n"), 1) if line.strip()]
        if not numbered:
            return self._fail(b, t, [_batch_error("empty_file", "The batch input file is empty.")])
        if len(numbered) > _MAX_TASKS:
            msg = f"The batch input file has {len(numbered):,} requests; a batch may have at most {_MAX_TASKS:,}."
            return self._fail(b, t, [_batch_error("too_many_tasks", msg)])
        errors: List[JSONDict] = []
        seen: Dict[str, int] = {}
        requests: List[Tuple[str, JSONDict]] = []
        for n, text in numbered:
            problem, request = _check_line(text, b.endpoint, seen, n)
            if problem is None:
                model = request["body"].get("model")
                if not isinstance(model, str) or not model:  # only moderations may leave it out
                    model = "omni-moderation-latest"
                if b.model is None:
                    b.model = model
                elif model != b.model:
                    msg = (f"The model '{model}' of this request does not match the model '{b.model}' of the "
                           "batch's other requests; a batch takes requests to a single model.")  # fmt: skip
                    problem = _batch_error("model_mismatch", msg, "body.model", n)
            rejected = self._settings.reject(request["body"]) if problem is None and self._settings.reject else None
            if rejected:
                problem = _batch_error("invalid_request", rejected, "body", n)
            if problem is not None:
                errors.append(problem)
            elif not errors:
                requests.append((request["custom_id"], request["body"]))
        if not errors and b.endpoint == "/v1/embeddings":
            inputs = sum(_input_count(body.get("input")) for _, body in requests)
            if inputs > _MAX_EMBEDDING_INPUTS:
                msg = f"The batch has {inputs:,} embedding inputs; a batch may have at most {_MAX_EMBEDDING_INPUTS:,}."
                errors.append(_batch_error("too_many_tasks", msg))
        if errors:
            return self._fail(b, t, errors)
        assert b.model is not None
        b.lines = [self._line(b.endpoint, b.model, custom_id, body) for custom_id, body in requests]
        b.queued_tokens = sum(self._queue_cost(line, body) for line, (_, body) in zip(b.lines, requests))
        limit = self._settings.queue_tokens
        if limit is not None:
            queued = sum(
                x.queued_tokens for x in self._active if x.key == b.key and x.model == b.model and x.status in _QUEUED
            )
            if queued + b.queued_tokens > limit:
                b.lines = []
                msg = (
                    f"Enqueued token limit reached for {b.model} in organization org-fake. Limit: {limit:,} enqueued "
                    "tokens. Please try again once some in_progress batches have been completed."
                )
                return self._fail(b, t, [_batch_error("token_limit_exceeded", msg)])
        b.status = "in_progress"
        b.times["in_progress_at"] = t
        b.total, b.t_last, b.data = len(b.lines), t, b""
        return None

    def _line(self, endpoint: str, model: str, custom_id: str, body: JSONDict) -> _Line:
        moderation = endpoint == "/v1/moderations"
        try:
            if body.get("stream"):
                raise _BadRequest("Streaming is not supported in the Batch API.", "stream")
            job = _moderations(body, model, self._env) if moderation else _JOBS[endpoint[4:]](body, model, self._env)
        except _BadRequest as exc:
            return _Line(custom_id, None, exc, not moderation)
        return _Line(custom_id, job, None, not moderation)

    def _queue_cost(self, line: _Line, body: JSONDict) -> int:
        """The line's input tokens, as the admission cost's input part counts them (0 when refused)."""
        if line.job is None:
            return 0
        raw = json.dumps(body).encode() if self._settings.cost_model == "json_bytes" else b""
        return _admission_cost(self._settings.cost_model, line.job, raw) - line.job.output_tokens

    def _run(self, b: _Batch, t: float, finish: bool = False) -> None:
        """Run ``b``'s lines due by ``t`` at the current speed (``finish``: all that are left)."""
        if t > b.t_last and self._speed > 0:
            b.progress += (t - b.t_last) * self._speed
        b.t_last = max(b.t_last, t)
        if finish or b.progress >= b.total:
            b.progress = float(b.total)
        due = min(b.total, int(b.progress))
        for line in b.lines[b.done : due]:
            self._run_line(b, line)
        b.done = max(b.done, due)

    def _run_line(self, b: _Batch, line: _Line) -> None:
        request_id = self._hex(32)
        self._stats["batch_lines"] += 1
        if line.job is None:
            assert line.refusal is not None
            body = _error(line.refusal.message, "invalid_request_error", param=line.refusal.param)
            b.failures.append(_line_json(self._hex(32), line.custom_id, _response(400, request_id, body)))
            b.failed += 1
        elif self._settings.error_rate and self._rng.random() < self._settings.error_rate:
            body = _error(_SERVER_ERROR, "server_error")
            b.failures.append(_line_json(self._hex(32), line.custom_id, _response(500, request_id, body)))
            b.failed += 1
        else:
            rendered = line.job.render("").body
            prefix = b'{"status_code":200,"request_id":"' + request_id.encode() + b'","body":'
            b.outputs.append(_line_json(self._hex(32), line.custom_id, prefix + rendered + b"}"))
            b.completed += 1
            if line.has_usage:
                b.input_tokens += line.job.input_tokens
                b.output_tokens += line.job.usage_total - line.job.input_tokens
                self._stats["batch_tokens_used"] += line.job.usage_total

    def _shuffled(self, items: List[Any]) -> List[Any]:
        if self._settings.shuffle and len(items) > 1:
            self._rng.shuffle(items)
        return items


# --------------------------------------------------------------------- formats and checks


def _page(items: List[JSONDict], query: Dict[str, str], limits: Tuple[int, int, int]) -> JSONDict:
    """One page of a cursor-paged list: ``limit`` items after the one whose id is ``after``."""
    low, high, default = limits
    try:
        limit = int(query.get("limit", default))
    except ValueError:
        raise _Refused(400, f"Invalid 'limit': expected an integer, got '{query['limit']}'.", "limit") from None
    if not low <= limit <= high:
        raise _Refused(400, f"Invalid 'limit': expected a value between {low} and {high}, got {limit}.", "limit")
    start = 0
    if "after" in query:
        start = next((i + 1 for i, item in enumerate(items) if item["id"] == query["after"]), len(items))
    data = items[start : start + limit]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": start + limit < len(items)}


def _check_metadata(metadata: Any) -> Optional[Dict[str, str]]:
    """``metadata`` if it keeps the limits (at most 16 pairs, keys <= 64 and values <= 512
    characters, strings only), else a 400."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise _Refused(400, "Invalid type for 'metadata': expected an object.", "metadata", "invalid_type")
    if len(metadata) > 16:
        msg = (f"Invalid 'metadata': too many properties. Expected an object with at most 16 properties, but got "
               f"an object with {len(metadata)} properties instead.")  # fmt: skip
        raise _Refused(400, msg, "metadata", "object_above_max_properties")
    for key, value in metadata.items():
        if len(key) > 64:
            msg = (f"Invalid 'metadata': key too long. Expected a key with maximum length 64, but got a key with "
                   f"length {len(key)} instead.")  # fmt: skip
            raise _Refused(400, msg, "metadata", "string_above_max_length")
        if not isinstance(value, str):
            raise _Refused(
                400, f"Invalid type for 'metadata.{key}': expected a string.", f"metadata.{key}", "invalid_type"
            )
        if len(value) > 512:
            msg = (f"Invalid 'metadata.{key}': string too long. Expected a string with maximum length 512, but got a "
                   f"string with length {len(value)} instead.")  # fmt: skip
            raise _Refused(400, msg, f"metadata.{key}", "string_above_max_length")
    return dict(metadata)


def _batch_error(code: str, message: str, param: Optional[str] = None, line: Optional[int] = None) -> JSONDict:
    """An entry of a failed batch's ``errors.data``; ``line`` is 1-based."""
    return {"code": code, "message": message, "param": param, "line": line}


def _check_line(text: bytes, endpoint: str, seen: Dict[str, int], n: int) -> Tuple[Optional[JSONDict], JSONDict]:
    """(the validation error of input line ``n``, or None; the parsed request).  ``seen`` maps the
    custom_ids met so far to their line."""
    try:
        request = json.loads(text)
    except ValueError:
        request = None
    if not isinstance(request, dict):
        return _batch_error("invalid_json_line", "This line is not parseable as valid JSON.", None, n), {}
    for name in ("custom_id", "method", "url", "body"):
        if request.get(name) is None:
            return _batch_error(
                "missing_required_parameter", f"Missing required parameter: '{name}'.", name, n
            ), request
    custom_id = request["custom_id"]
    if not isinstance(custom_id, str):
        return _batch_error("invalid_type", "Invalid type for 'custom_id': expected a string.", "custom_id", n), request
    if custom_id in seen:
        msg = (f"The custom_id '{custom_id}' was already used on line {seen[custom_id]}; each request of a batch "
               "needs a unique custom_id.")  # fmt: skip
        return _batch_error("duplicate_custom_id", msg, "custom_id", n), request
    seen[custom_id] = n
    if request["method"] != "POST":
        msg = f"Invalid value: '{request['method']}'. Supported values are: 'POST'."
        return _batch_error("invalid_value", msg, "method", n), request
    if request["url"] != endpoint:
        msg = f"The URL '{request['url']}' of this request does not match the batch's endpoint '{endpoint}'."
        return _batch_error("url_mismatch", msg, "url", n), request
    body = request["body"]
    if not isinstance(body, dict):
        return _batch_error("invalid_type", "Invalid type for 'body': expected an object.", "body", n), request
    if endpoint != "/v1/moderations" and not (isinstance(body.get("model"), str) and body["model"]):
        return _batch_error(
            "missing_required_parameter", "Missing required parameter: 'body.model'.", "body.model", n
        ), request
    return None, request


def _input_count(value: Any) -> int:
    """Embedding inputs in an ``input``: a string or a list of token ids is one."""
    if isinstance(value, list) and value and not all(isinstance(x, int) for x in value):
        return len(value)
    return 1


def _response(status: int, request_id: str, body: JSONDict) -> bytes:
    return json.dumps({"status_code": status, "request_id": request_id, "body": body}, separators=(",", ":")).encode()


def _line_json(line_id: str, custom_id: str, response: Optional[bytes], error: Optional[JSONDict] = None) -> bytes:
    """An output/error file line; ``response`` is its JSON, already encoded."""
    return b"".join(
        [
            b'{"id":"batch_req_' + line_id.encode() + b'","custom_id":',
            json.dumps(custom_id).encode(),
            b',"response":',
            b"null" if response is None else response,
            b',"error":',
            json.dumps(error, separators=(",", ":")).encode(),
            b"}",
        ]
    )


def _moderations(body: JSONDict, model: str, env: _Env) -> _Job:
    """A moderation request (only the Batch API serves them here): nothing is ever flagged."""
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
        raise _BadRequest("Missing required parameter: 'input'.", "input")
    texts: List[str] = inputs
    tokens = sum(count_tokens(text) for text in texts)

    def render(fault: str) -> _Reply:
        result = {
            "flagged": False,
            "categories": dict.fromkeys(_MODERATION_CATEGORIES, False),
            "category_scores": dict.fromkeys(_MODERATION_CATEGORIES, 0.0),
        }
        return _json_reply(200, {"id": f"modr-{env.next_id()}", "model": model, "results": [result for _ in texts]})

    return _Job(model, tokens, sum(len(t) for t in texts), 0, 0, tokens, render)
