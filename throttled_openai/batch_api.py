"""The Batch API route: a bulk job sent as OpenAI batches, resumable, and never submitted twice.

For work that can wait, OpenAI's Batch API costs half as much, draws on its own (much larger) limit
and finishes within 24 hours. A :class:`BatchJob` drives it from start to end: it writes the requests
into batch input files (chunks: one model and endpoint each, within 50,000 requests and 200 MB, and
within the model's queue limit when known), uploads them, creates the batches as the queue allows,
polls them with a growing interval, downloads the results, matches them to the inputs by ``custom_id``
and sends again what expired or failed. Every input ends with its result or an error naming why.

How it survives ``kill -9`` at any moment:

- What the job knows lives in a state file (JSON, replaced atomically at each step) and a folder beside
  it, ``<state>.d/``: each chunk's input file (as uploaded), its keys (which inputs each request
  answers) and, once settled, its results in input order.
- A chunk is on disk before it is uploaded; a rerun that finds no file id for it uploads it again (an
  upload cut short leaves at most an unused file on the server, never a batch).
- Before ``batches.create`` the state records "creating chunk N, attempt A"; the batch carries the job,
  the chunk and the attempt in its metadata. The create is sent once (the SDK would retry it, and it
  sends no idempotency key). When it fails without a clear refusal, or a rerun finds that record, the
  job lists the batches and adopts the one with that metadata; only when there is none does it create.
- Results are downloaded to temporary files and renamed; settling a chunk writes its results, then (in
  one state write) marks it done and adds the chunk that resubmits its unfinished requests.
- Requests sent through the client instead (``fallback="sync"``) are recorded one by one as they end,
  so a rerun never sends one twice.

The queue limit ("enqueued tokens" per model) is given, or learned from the message of a batch that
failed validation for it; then chunks wait for earlier batches to finish. A chunk the queue refuses
while none of the job's batches runs is split in two (an estimate below the server's count), or, once
alone, tried again later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from array import array
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple, Union

import openai

from .batching import split_choices
from .errors import MalformedResponse, ThrottledOpenAIError
from .mapping import BulkError
from .retry import NEVER_RETRY_CODES, RETRY_STATUS_CODES, Retry
from .tokens import TokenCounter, endpoint_of, input_tokens, usage_tokens

__all__ = ["BatchJob", "BatchRequestError", "KeyResult"]

log = logging.getLogger("throttled_openai")

#: Limits of one batch (OpenAI's Batch API guide): requests, input file bytes, embedding inputs.
MAX_REQUESTS_PER_BATCH = 50_000
MAX_BATCH_FILE_BYTES = 200 * 1024 * 1024
MAX_EMBEDDING_INPUTS_PER_BATCH = 50_000
#: The API path of each endpoint a batch can target, by the name ``tokens.endpoint_of`` gives it.
BATCH_URLS = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
    "embeddings": "/v1/embeddings",
    "responses": "/v1/responses",
    "moderations": "/v1/moderations",
}
#: Statuses after which a batch changes no more.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: Metadata keys that tag a batch with the job, chunk and attempt it belongs to.
META_JOB, META_CHUNK, META_ATTEMPT = "throttled_openai_job", "throttled_openai_chunk", "throttled_openai_attempt"
#: "Enqueued token limit reached for gpt-4o-mini in organization org-.... Limit: 2,000,000 enqueued tokens."
_QUEUE_MESSAGE = re.compile(r"Enqueued (token|request) limit reached.*?Limit:\s*([\d,]+)\s*enqueued", re.I | re.S)
_STATE_FORMAT = "throttled_openai.batch/1"
# Rounds of resubmission after which a request that keeps expiring or failing on the server's side
# ends with its last error.
_DEFAULT_MAX_ROUNDS = 4
# Batch API calls (upload, create, retrieve, download) failing, after the client's retries, in a row and
# for this long, before the job gives up (it can be run again later).
_MAX_PHASE_FAILURES = 10
_MAX_FAILING_S = 900.0
# The longest a chunk refused by the queue, with none of the job's batches running, waits to try again;
# and how often one request is refused so before it fails (other jobs may hold the queue for hours).
_MAX_QUEUE_RETRY_S = 600.0
_MAX_QUEUE_REFUSALS = 12


class BatchRequestError(ThrottledOpenAIError):
    """One input of a Batch API job ended with an error.

    ``type``: what kind (``status_400``, ``batch_expired``, ``batch_rejected``, ``batch_cancelled``,
    ``server_error``, ...); ``status``: the HTTP status the request got, if it ran; ``code``: OpenAI's
    error code, if any.
    """

    def __init__(self, message: str, type: str, status: Optional[int] = None, code: Any = None) -> None:
        super().__init__(message)
        self.type = type
        self.status = status
        self.code = code

    @classmethod
    def from_record(cls, error: Dict[str, Any]) -> BatchRequestError:
        return cls(str(error.get("message")), str(error.get("type")), error.get("status"), error.get("code"))


@dataclass
class KeyResult:
    """The final outcome of one input (``key``): the ``response`` body, or an ``error`` dict (``type``,
    ``message``, and ``status``/``code`` when known). ``request`` is the body this input was sent as;
    ``note`` what the caller attached to it; ``shared``: the keys that shared its request, if several."""

    key: int
    request: Any
    note: Any = None
    response: Optional[Dict[str, Any]] = None
    error: Optional[Dict[str, Any]] = None
    shared: Optional[List[int]] = None

    def encode(self) -> bytes:
        record = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass") + b"\n"


@dataclass
class Chunk:
    """One batch input file and the batch that runs it. ``phase``: planned (on disk) → uploaded →
    creating (``batches.create`` may have happened) → submitted → downloaded → done."""

    n: int
    url: str
    model: str
    requests: int
    keys: int
    tokens: int  # input tokens, as the queue counts them (our estimate)
    size: int  # bytes of the input file
    round: int = 1  # 1, then one more each time unfinished requests are resubmitted
    phase: str = "planned"
    attempt: int = 0  # batches created (or being created) for it: a queue refusal makes another
    file_id: Optional[str] = None
    batch_id: Optional[str] = None
    status: Optional[str] = None  # the batch's status when last seen
    finished: int = 0  # requests the batch reports completed or failed
    total: int = 0
    tokens_used: int = 0  # usage of its results
    results: int = 0  # inputs with a final result from it
    retry_at: float = 0.0  # unix time before which a refused chunk is not submitted again
    refusals: int = 0  # times the model's batch queue refused it
    after: List[int] = field(default_factory=list)  # refused while these ran: waits for one of them to end
    note: str = ""

    @property
    def active(self) -> bool:
        """Its batch may be holding queue capacity."""
        return self.phase == "creating" or (self.phase == "submitted" and self.status not in TERMINAL)


@dataclass
class _Request:
    """One line of a chunk's input file, with what the job keeps beside it."""

    custom_id: str
    keys: List[int]
    notes: Optional[List[Any]]
    body: Dict[str, Any]

    def alone(self, i: int, field_name: Optional[str]) -> _Request:
        """The request input ``i`` of this shared one would have been alone, with an id of its own."""
        body = _part(self.body, field_name, i, len(self.keys))
        notes = [self.notes[i]] if self.notes else None
        return _Request(f"{self.custom_id}.{i}", [self.keys[i]], notes, body)


class _Store:
    """The state file and its folder. Every write goes to a temporary file that replaces the old one."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.folder = self.path + ".d"

    def file(self, n: int, what: str) -> str:
        return os.path.join(self.folder, f"{n:05d}.{what}.jsonl")

    def load(self) -> Optional[Dict[str, Any]]:
        if not os.path.exists(self.path):
            return None
        with open(self.path, encoding="utf-8") as file:
            state: Dict[str, Any] = json.load(file)
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"{self.path} is not a throttled_openai batch job state file")
        return state

    def save(self, state: Dict[str, Any]) -> None:
        os.makedirs(self.folder, exist_ok=True)
        data = json.dumps(state, indent=1, sort_keys=True).encode()
        replace_file(self.path, data)

    def remove(self, *paths: str) -> None:
        for path in paths:
            if os.path.exists(path):
                os.remove(path)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``<state>.lock`` (``flock``, where the platform has it): two processes driving one job
        would both plan and submit the same inputs."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".lock", "a") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise RuntimeError(f"another process is running the batch job {self.path}") from None
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def replace_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old content or the new, never a mix."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _line(record: Any) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass") + b"\n"


def _read_jsonl(path: str) -> Iterator[Any]:
    with open(path, "rb") as file:
        for raw in file:
            if raw.strip():
                yield json.loads(raw)


def _requests_of(store: _Store, chunk: Chunk) -> Iterator[_Request]:
    """A chunk's requests, from its input file and keys file, in file order."""
    with open(store.file(chunk.n, "input"), "rb") as inputs, open(store.file(chunk.n, "keys"), "rb") as keys:
        for raw, raw_keys in zip(inputs, keys):
            line, (custom_id, numbers, notes) = json.loads(raw), json.loads(raw_keys)
            yield _Request(custom_id, numbers, notes, line["body"])


def _part(body: Dict[str, Any], field_name: Optional[str], i: int, shared: int) -> Dict[str, Any]:
    """The body one input of a shared request would have had alone."""
    if shared == 1 or field_name is None:
        return body
    return {**body, field_name: body[field_name][i]}


def _split(requests: List[Tuple[_Request, bool]], field_name: Optional[str]) -> Iterator[_Request]:
    """The requests, those marked ``alone`` cut into one request per input."""
    for request, alone in requests:
        if alone and len(request.keys) > 1 and field_name is not None:
            yield from (request.alone(i, field_name) for i in range(len(request.keys)))
        else:
            yield request


def _shared_field(url: str) -> Optional[str]:
    """The body field that holds several inputs, when a request answers more than one."""
    return {"/v1/completions": "prompt", "/v1/embeddings": "input"}.get(url)


# -- planning ------------------------------------------------------------------------------------


class _Planner:
    """Writes requests into chunk files: one open chunk per (endpoint, model), cut at the per-batch
    limits and at the model's queue limit, when known."""

    def __init__(self, job: BatchJob, round: int = 1) -> None:
        self.job = job
        self.round = round
        self.open: Dict[Tuple[str, str], Tuple[Chunk, BinaryIO, BinaryIO, List[int]]] = {}
        self.chunks: List[Chunk] = []

    def add(self, url: str, body: Dict[str, Any], keys: List[int], notes: Optional[List[Any]] = None) -> None:
        model = str(body.get("model") or "")
        tokens = input_tokens(endpoint_of(url), body, self.job._counter)
        inputs = len(body["input"]) if url == "/v1/embeddings" and isinstance(body.get("input"), list) else 1
        place = (url, model)
        entry = self.open.get(place)
        if entry is not None:
            chunk, _, _, counted = entry
            limit = self.job._queue_limit(model, "token")
            full = (
                chunk.requests >= self.job.max_requests
                or chunk.size + len(json.dumps(body)) + 200 > MAX_BATCH_FILE_BYTES
                or (url == "/v1/embeddings" and counted[0] + inputs > MAX_EMBEDDING_INPUTS_PER_BATCH)
                or (limit is not None and chunk.tokens + tokens > limit)
            )
            if full:
                self._close(place)
                entry = None
        if entry is None:
            n = self.job._state["next"]
            self.job._state["next"] = n + 1
            chunk = Chunk(n, url, model, 0, 0, 0, 0, round=self.round)
            os.makedirs(self.job._store.folder, exist_ok=True)
            entry = (
                chunk,
                open(self.job._store.file(n, "input"), "wb"),  # noqa: SIM115 - closed in _close()
                open(self.job._store.file(n, "keys"), "wb"),  # noqa: SIM115
                [0],
            )
            self.open[place] = entry
        chunk, inputs_file, keys_file, counted = entry
        custom_id = f"{chunk.n}-{chunk.requests}"
        line = _line({"custom_id": custom_id, "method": "POST", "url": url, "body": body})
        inputs_file.write(line)
        keys_file.write(_line([custom_id, keys, notes]))
        chunk.requests += 1
        chunk.keys += len(keys)
        chunk.tokens += tokens
        chunk.size += len(line)
        counted[0] += inputs

    def _close(self, place: Tuple[str, str]) -> None:
        chunk, inputs_file, keys_file, _ = self.open.pop(place)
        for file in (inputs_file, keys_file):
            file.flush()
            os.fsync(file.fileno())
            file.close()
        self.chunks.append(chunk)

    def close(self) -> List[Chunk]:
        """Finish every open chunk; the chunks, in the order they were started."""
        for place in list(self.open):
            self._close(place)
        return sorted(self.chunks, key=lambda chunk: chunk.n)


# -- the job -------------------------------------------------------------------------------------


class BatchJob:
    """A bulk job on the Batch API, kept in a state file so that it survives any crash.

    Made by ``client.batch_completions()``, ``batch_chat_completions()``, ``batch_embeddings()`` or
    ``batch_requests()`` (which submit it, or pick up the job their state file holds), or opened with
    :meth:`open`. :meth:`wait` drives it to the end; :meth:`results` gives one result per input, in
    input order. The batches run on OpenAI's side whether or not anything waits for them: Ctrl-C or a
    crash leaves them running, and the same call (or :meth:`open`) later carries on.

    Args:
        client: a ``ThrottledClient``; every Batch and Files API call goes through it.
        state: path of the state file; ``<state>.d/`` beside it holds the chunk files.
        poll_interval, max_poll_interval: seconds between polls: the interval starts at
            ``poll_interval`` and grows by half each poll that sees no change, up to
            ``max_poll_interval``; any change brings it back.
        queue_tokens: each model's batch queue limit, in enqueued input tokens (``None``: learned from
            a batch the queue refuses). Chunks are cut to fit it, and submitted as it allows.
        max_requests: requests per batch (50,000 at most).
        fallback: what happens to requests that expired or failed on the server's side (a 5xx): sent
            again in a new batch (``"batch"``), up to ``max_rounds`` rounds, or through the client at
            once (``"sync"``: full price, no waiting).
        max_workers: requests in flight for ``fallback="sync"``.
    """

    def __init__(
        self,
        client: Any,
        state: str,
        *,
        poll_interval: float = 5.0,
        max_poll_interval: float = 60.0,
        queue_tokens: Optional[int] = None,
        max_requests: int = MAX_REQUESTS_PER_BATCH,
        fallback: str = "batch",
        max_rounds: int = _DEFAULT_MAX_ROUNDS,
        max_workers: int = 32,
    ) -> None:
        if not isinstance(state, (str, os.PathLike)):
            raise TypeError(f"state must be a path, got {type(state).__name__}")
        if not (isinstance(poll_interval, (int, float)) and poll_interval > 0):
            raise ValueError(f"poll_interval must be > 0 seconds, got {poll_interval!r}")
        if not (isinstance(max_poll_interval, (int, float)) and max_poll_interval >= poll_interval):
            raise ValueError(f"max_poll_interval must be >= poll_interval, got {max_poll_interval!r}")
        if queue_tokens is not None and not (isinstance(queue_tokens, int) and queue_tokens > 0):
            raise ValueError(f"queue_tokens must be a positive int or None, got {queue_tokens!r}")
        if not (isinstance(max_requests, int) and 1 <= max_requests <= MAX_REQUESTS_PER_BATCH):
            raise ValueError(f"max_requests must be an int from 1 to {MAX_REQUESTS_PER_BATCH}, got {max_requests!r}")
        if fallback not in ("batch", "sync"):
            raise ValueError(f"fallback must be 'batch' or 'sync', got {fallback!r}")
        if not (isinstance(max_rounds, int) and max_rounds >= 1):
            raise ValueError(f"max_rounds must be an int >= 1, got {max_rounds!r}")
        if not (isinstance(max_workers, int) and max_workers >= 1):
            raise ValueError(f"max_workers must be an int >= 1, got {max_workers!r}")
        self._client = client
        self._store = _Store(os.fspath(state))
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        self.queue_tokens = queue_tokens
        self.max_requests = max_requests
        self.fallback = fallback
        self.max_rounds = max_rounds
        self.max_workers = max_workers
        # The client's token counter (encodings loaded once), from its bulk interface; a plain SDK client has none.
        bulk = getattr(client, "_bulk_target", None)
        self._counter: TokenCounter = bulk("chat", "*", "BatchJob").counter if bulk is not None else TokenCounter()
        self._state: Dict[str, Any] = {}
        self._chunks: List[Chunk] = []
        self._failures = 0  # Batch API calls failed in a row (after the client's retries)
        self._failing_since = 0.0
        self._lock_depth = 0
        # Called with each chunk's results as it settles, before it is marked done (so after a crash,
        # perhaps again). Without _keep_results, a settled chunk's files go: the caller has its results.
        self.on_results: Optional[Callable[[Chunk, Iterator[KeyResult]], None]] = None
        self._keep_results = True

    # -- the state file ------------------------------------------------------------------------

    @property
    def state_path(self) -> str:
        return self._store.path

    @property
    def job_id(self) -> str:
        """The id the job's batches carry in their metadata (``throttled_openai_job``)."""
        return str(self._state.get("job", ""))

    def _load(self) -> bool:
        """Read the state file, if there is one; whether there was."""
        state = self._store.load()
        if state is None:
            return False
        self._state = state
        names = {f.name for f in fields(Chunk)}
        self._chunks = [Chunk(**{k: v for k, v in c.items() if k in names}) for c in state["chunks"]]
        return True

    def _new(self, kind: str, fingerprint: Optional[str]) -> None:
        self._state = {
            "format": _STATE_FORMAT,
            "job": uuid.uuid4().hex[:16],
            "kind": kind,
            "fingerprint": fingerprint,
            "created_at": time.time(),
            "next": 1,
            "queue": {},
            "cancelled": False,
            "chunks": [],
        }
        self._chunks = []

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This process alone drives the job meanwhile (re-entrant)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with self._store.locked():
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    def _save(self) -> None:
        self._state["chunks"] = [asdict(chunk) for chunk in self._chunks]
        self._store.save(self._state)

    @classmethod
    def open(cls, client: Any, state: str, **options: Any) -> BatchJob:
        """The job a state file holds, to wait for, read or cancel; FileNotFoundError if there is none."""
        job = cls(client, state, **options)
        if not job._load():
            raise FileNotFoundError(f"no batch job state file at {job.state_path}")
        return job

    # -- submitting ----------------------------------------------------------------------------

    def _plan(self, items: Iterable[Tuple[str, Dict[str, Any], List[int], Optional[List[Any]]]]) -> List[Chunk]:
        """Write ``(url, body, keys, notes)`` requests into new chunks, then save them to the state."""
        planner = _Planner(self)
        try:
            for url, body, keys, notes in items:
                planner.add(url, body, keys, notes)
        finally:
            chunks = planner.close()
        self._chunks.extend(chunks)
        self._save()
        return chunks

    def _queue_limit(self, model: str, unit: str) -> Optional[int]:
        """The model's queue limit in ``unit`` (``token`` or ``request``): given, else learned."""
        if unit == "token" and self.queue_tokens is not None:
            return self.queue_tokens
        learned = self._state.get("queue", {}).get(model, {}).get(unit)
        return int(learned) if learned is not None else None

    def _queue_allows(self, chunk: Chunk) -> bool:
        if chunk.retry_at > time.time():
            return False
        waited = [c for c in self._chunks if c.n in chunk.after]
        if waited and all(c.active for c in waited):  # refused while they ran: one must end first
            return False
        running = [c for c in self._chunks if c.active and c.model == chunk.model and c is not chunk]
        if not running:
            return True
        tokens, requests = self._queue_limit(chunk.model, "token"), self._queue_limit(chunk.model, "request")
        if tokens is not None and sum(c.tokens for c in running) + chunk.tokens > tokens:
            return False
        return requests is None or sum(c.requests for c in running) + chunk.requests <= requests

    def _submit(self, chunk: Chunk) -> None:
        """Upload the chunk's file if it has none on the server, then create its batch (once)."""
        if chunk.file_id is None:
            with open(self._store.file(chunk.n, "input"), "rb") as file:
                name = f"throttled_openai-{self.job_id}-{chunk.n}.jsonl"
                uploaded = self._client.files.create(file=(name, file, "application/jsonl"), purpose="batch")
            chunk.file_id, chunk.phase = uploaded.id, "uploaded"
            self._save()
        chunk.attempt += 1
        chunk.phase = "creating"
        self._save()  # from here on, a batch may exist: a rerun looks for it before creating one
        self._create(chunk)

    def _metadata(self, chunk: Chunk) -> Dict[str, str]:
        return {META_JOB: self.job_id, META_CHUNK: str(chunk.n), META_ATTEMPT: str(chunk.attempt)}

    def _create(self, chunk: Chunk) -> None:
        try:
            batch = self._client.with_options(max_retries=0).batches.create(
                input_file_id=chunk.file_id,
                endpoint=chunk.url,
                completion_window="24h",
                metadata=self._metadata(chunk),
            )
        except openai.APIStatusError as error:
            status = error.status_code
            if Retry.classify(error)[0] == "quota" or status in (401, 403):  # so would every call: the job stops
                raise
            if status in (408, 409) or status >= 500:  # perhaps created, and the answer lost
                self._lost_create(chunk, error)
            elif status == 429:  # too many batches created lately: none was made; the same file, later
                chunk.attempt -= 1
                chunk.phase = "uploaded"
                chunk.retry_at = time.time() + max(self.poll_interval, Retry().decide(error, 1).delay)
                self._save()
            else:  # refused, so not created, and never will be
                self._reject(chunk, f"batches.create refused the chunk: {error}", status)
            return
        except openai.APIConnectionError as error:  # a timeout, a dropped connection: perhaps created
            self._lost_create(chunk, error)
            return
        self._submitted(chunk, batch)

    def _lost_create(self, chunk: Chunk, error: BaseException) -> None:
        """A create whose answer did not come: adopt the batch if it was made; else the chunk stays
        ``creating``, and the next poll looks for it again before it creates one."""
        if not self._adopt([chunk]):
            self._failed_call(error)

    def _submitted(self, chunk: Chunk, batch: Any) -> None:
        chunk.batch_id, chunk.status, chunk.phase = batch.id, batch.status, "submitted"
        chunk.note = ""
        self._save()

    def _adopt(self, chunks: List[Chunk]) -> bool:
        """Find the batches created for ``chunks`` (phase ``creating``) by listing the account's batches
        and matching their metadata; adopt each one found. Whether all were found."""
        wanted = {(str(c.n), str(c.attempt)): c for c in chunks}
        for batch in self._client.batches.list(limit=100):
            metadata = batch.metadata or {}
            if metadata.get(META_JOB) != self.job_id:
                continue
            chunk = wanted.pop((str(metadata.get(META_CHUNK)), str(metadata.get(META_ATTEMPT))), None)
            if chunk is not None:
                log.info("throttled_openai: chunk %d already has batch %s; adopting it", chunk.n, batch.id)
                self._submitted(chunk, batch)
            if not wanted:
                break
        return not wanted

    # -- polling and results ---------------------------------------------------------------------

    def _poll(self, chunk: Chunk) -> bool:
        """Retrieve the chunk's batch; whether anything changed."""
        batch = self._client.batches.retrieve(chunk.batch_id)
        counts = batch.request_counts
        finished = (counts.completed + counts.failed) if counts is not None else 0
        total = counts.total if counts is not None else 0
        changed = (batch.status, finished, total) != (chunk.status, chunk.finished, chunk.total)
        chunk.status, chunk.finished, chunk.total = batch.status, finished, total
        if batch.status == "failed":
            self._failed(chunk, batch)
        elif batch.status in TERMINAL:
            self._download(chunk, batch)
        elif changed:
            self._save()
        return changed

    def _failed(self, chunk: Chunk, batch: Any) -> None:
        """The batch failed validation: nothing ran. The queue was full, or some lines are at fault."""
        errors = list(batch.errors.data) if batch.errors is not None and batch.errors.data else []
        for error in errors:
            match = _QUEUE_MESSAGE.search(error.message or "")
            if error.code == "token_limit_exceeded" or match:
                self._queue_refused(chunk, match)
                return
        if not errors:  # nothing ran and nothing says why: like a batch that expired before it ran
            unrun, retry = self._unrun(
                chunk, {"type": "batch_failed", "message": "the batch failed, for no reason given"}
            )
            self._settle(chunk, unrun, retry, "failed for no reason given")
            return
        by_line: Dict[int, str] = {}
        reasons: List[str] = []
        for entry in errors:
            said = f"{entry.code}: {entry.message}" if entry.code else str(entry.message)
            reasons.append(said)
            if isinstance(entry.line, int) and 1 <= entry.line <= chunk.requests:
                by_line[entry.line] = said
        if not by_line:  # the batch as a whole, or lines it does not have: nothing to single out
            self._reject(chunk, f"the Batch API rejected the batch: {'; '.join(reasons)}", None)
            return
        results: List[KeyResult] = []
        again: List[Tuple[_Request, bool]] = []
        others = {"type": "batch_rejected", "message": "other lines of its batch failed validation"}
        for number, request in enumerate(_requests_of(self._store, chunk), start=1):
            if number in by_line:
                rejected = {"type": "batch_rejected", "message": f"the Batch API rejected this line: {by_line[number]}"}
                results.extend(self._errors(chunk, request, rejected))
            else:
                settled, retry = self._transient(chunk, request, others)
                results.extend(settled)
                again.extend(retry)
        self._settle(chunk, results, again, "validation failed for some lines", sync=False)

    def _unrun(self, chunk: Chunk, reason: Dict[str, Any]) -> Tuple[List[KeyResult], List[Tuple[_Request, bool]]]:
        """A chunk none of whose requests ran: each goes again (see :meth:`_transient`)."""
        results: List[KeyResult] = []
        again: List[Tuple[_Request, bool]] = []
        for request in _requests_of(self._store, chunk):
            settled, retry = self._transient(chunk, request, reason)
            results.extend(settled)
            again.extend(retry)
        return results, again

    def _queue_refused(self, chunk: Chunk, match: Optional[re.Match[str]]) -> None:
        """The model's queue was full: learn its limit. With some of the job's batches running, wait for
        one of them to end; with none, the queue is held by other work, or the server counts more than
        we estimate: split a chunk near the limit in two, or try later. Every refusal backs off."""
        if match is not None:
            unit = match.group(1).lower()
            self._state.setdefault("queue", {}).setdefault(chunk.model, {})[unit] = int(match.group(2).replace(",", ""))
        running = [c for c in self._chunks if c.active and c.model == chunk.model and c is not chunk]
        chunk.phase, chunk.batch_id, chunk.status = "uploaded", None, None
        chunk.refusals += 1
        chunk.retry_at = time.time() + min(_MAX_QUEUE_RETRY_S, self.poll_interval * 2 ** min(chunk.refusals, 16))
        chunk.after = [c.n for c in running]
        if self._state.get("cancelled"):
            chunk.phase, chunk.note = "done", "cancelled before it was submitted"
        elif running:
            chunk.note = "the model's batch queue is full: waits for one of the job's running batches to end"
        else:
            limit = self._queue_limit(chunk.model, "token")
            if chunk.requests == 1 and limit is not None and chunk.tokens > limit:
                reason = f"its ~{chunk.tokens:,} input tokens exceed the model's batch queue limit of {limit:,}"
                self._reject(chunk, f"queue_limit: {reason}", None)
                return
            if chunk.requests > 1 and (limit is None or chunk.tokens > limit // 2):
                requests = [(request, False) for request in _requests_of(self._store, chunk)]
                middle = len(requests) // 2
                halves = self._settle(
                    chunk, [], requests[:middle], "split: the queue refused it whole", requests[middle:]
                )
                for half in halves:
                    half.refusals, half.retry_at = chunk.refusals, chunk.retry_at
                self._save()
                return
            if chunk.refusals > _MAX_QUEUE_REFUSALS:
                reason = (
                    f"the model's batch queue refused it {chunk.refusals} times, with none of the job's batches running"
                )
                self._reject(chunk, f"queue_limit: {reason}", None)
                return
            chunk.note = "the model's batch queue is held by other work: tries again later"
        self._save()

    def _download(self, chunk: Chunk, batch: Any) -> None:
        """Fetch the output and error files (each to a temporary file, then renamed)."""
        for what, file_id in (("output", batch.output_file_id), ("errors", batch.error_file_id)):
            target = self._store.file(chunk.n, what)
            if file_id is None:
                self._store.remove(target)
                continue
            try:
                with self._client.files.with_streaming_response.content(file_id) as response:  # noqa: SIM117
                    with open(target + ".tmp", "wb") as file:  # (both in one `with`, wrapped: 3.10 syntax)
                        for block in response.iter_bytes():
                            file.write(block)
                        file.flush()
                        os.fsync(file.fileno())
            except openai.NotFoundError:  # gone (output files live 30 days): its requests count as not run
                self._store.remove(target, target + ".tmp")
                continue
            os.replace(target + ".tmp", target)
        chunk.phase = "downloaded"
        self._save()

    def _outcomes(self, chunk: Chunk) -> Tuple[List[str], array[int], array[int]]:
        """Where each request's result line is in the downloaded files: ``(paths, file, offset)``, the
        two arrays indexed by the request's place in the chunk (its ``custom_id`` is ``<chunk>-<k>``),
        ``file[k]`` an index into ``paths``, -1 for none. A request in both files: the output wins.
        9 bytes a request, whatever the size of the results."""
        paths = [self._store.file(chunk.n, what) for what in ("errors", "output")]
        which, offsets = array("b", [-1]) * chunk.requests, array("q", [0]) * chunk.requests
        prefix = f"{chunk.n}-"
        for index, path in enumerate(paths):
            if not os.path.exists(path):
                continue
            offset = 0
            with open(path, "rb") as file:
                for raw in file:
                    k = -1
                    if raw.strip():
                        try:
                            custom_id = json.loads(raw).get("custom_id")
                            if isinstance(custom_id, str) and custom_id.startswith(prefix):
                                k = int(custom_id[len(prefix) :])
                        except (ValueError, AttributeError):
                            pass
                    if 0 <= k < chunk.requests:
                        which[k], offsets[k] = index, offset
                    offset += len(raw)
        return paths, which, offsets

    def _read_settled(self, chunk: Chunk) -> None:
        """Match the downloaded results to the chunk's requests, in file order, one at a time: only an
        index of offsets by ``custom_id`` is held in memory, never the results."""
        paths, which, offsets = self._outcomes(chunk)
        again: List[Tuple[_Request, bool]] = []

        def results() -> Iterator[KeyResult]:
            handles: Dict[str, BinaryIO] = {}
            try:
                for k, request in enumerate(_requests_of(self._store, chunk)):
                    line: Any = None
                    if which[k] >= 0:
                        path = paths[which[k]]
                        if path not in handles:
                            handles[path] = open(path, "rb")  # noqa: SIM115 - closed below
                        handles[path].seek(offsets[k])
                        line = json.loads(handles[path].readline())
                    settled, retry = self._outcome(chunk, request, line)
                    yield from settled
                    again.extend(retry)
            finally:
                for handle in handles.values():
                    handle.close()

        self._settle(chunk, results(), again, f"batch {chunk.status}")

    def _outcome(
        self, chunk: Chunk, request: _Request, line: Any, final: bool = False
    ) -> Tuple[List[KeyResult], List[Tuple[_Request, bool]]]:
        """A request's outcome in its batch: results, or the request to send again (and whether alone);
        ``final``: nothing is sent again, what failed has its error."""
        response = line.get("response") if isinstance(line, dict) else None
        error = line.get("error") if isinstance(line, dict) else None
        status = response.get("status_code") if isinstance(response, dict) else None
        body = response.get("body") if isinstance(response, dict) else None
        if line is None:  # the batch ended before it ran (cancelled, expired)
            reason = {"type": "no_result", "message": f"the batch ended ({chunk.status}) with no result for it"}
            return self._transient(chunk, request, reason, final)
        if isinstance(error, dict) or not isinstance(status, int):
            code = str(error.get("code") if isinstance(error, dict) else "malformed_result")
            message = str(error.get("message") if isinstance(error, dict) else "the result line has no status")
            return self._transient(chunk, request, {"type": code, "message": message}, final)
        if status >= 300 or not isinstance(body, dict):
            detail: Dict[str, Any] = {}
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                detail = body["error"]
            described = {"type": _kind(status, detail), "message": str(detail.get("message") or body), "status": status}
            if detail.get("code"):
                described["code"] = detail["code"]
            if status in (400, 404, 413, 422) and len(request.keys) > 1 and not final:
                return [], [(request, True)]  # one input's fault, likely: each goes alone next time
            if status >= 500 or (status in RETRY_STATUS_CODES and detail.get("code") not in NEVER_RETRY_CODES):
                return self._transient(chunk, request, described, final)
            return self._errors(chunk, request, described), []
        return self._answers(chunk, request, body)

    def _answers(
        self, chunk: Chunk, request: _Request, body: Dict[str, Any]
    ) -> Tuple[List[KeyResult], List[Tuple[_Request, bool]]]:
        """The results of a request that succeeded: one per key, a shared request's split by index."""
        chunk.tokens_used += usage_tokens(body.get("usage")) or 0
        keys = request.keys
        if len(keys) == 1:
            note = request.notes[0] if request.notes else None
            return [KeyResult(keys[0], request.body, note, response=body)], []
        field_name = _shared_field(chunk.url)
        listed = "choices" if field_name == "prompt" else "data"
        n = request.body.get("n") if field_name == "prompt" else 1
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        answers = split_choices(body.get(listed) or [], len(keys), n)
        results: List[KeyResult] = []
        alone: List[int] = []
        usage = body.get("usage")
        for i, (key, answer) in enumerate(zip(keys, answers)):
            if not isinstance(answer, list):
                alone.append(i)
                continue
            parts = [{**item, "index": j} for j, item in enumerate(answer)]
            note = request.notes[i] if request.notes else None
            part = _part(request.body, field_name, i, len(keys))
            results.append(KeyResult(key, part, note, {**body, listed: parts, "usage": usage}, shared=list(keys)))
            usage = None
        # Answers missing or repeated: those inputs go again, each alone.
        return results, [(request.alone(i, field_name), False) for i in alone]

    def _errors(self, chunk: Chunk, request: _Request, error: Dict[str, Any]) -> List[KeyResult]:
        field_name = _shared_field(chunk.url)
        shared = list(request.keys) if len(request.keys) > 1 else None
        return [
            KeyResult(
                key,
                _part(request.body, field_name, i, len(request.keys)),
                request.notes[i] if request.notes else None,
                error=dict(error),
                shared=shared,
            )
            for i, key in enumerate(request.keys)
        ]

    def _transient(
        self, chunk: Chunk, request: _Request, error: Dict[str, Any], final: bool = False
    ) -> Tuple[List[KeyResult], List[Tuple[_Request, bool]]]:
        """A failure on the server's side (expired, a 5xx, not run): sent again, unless the job is
        cancelled (then it stays without a result) or this was its last try (then this is its result)."""
        if self._state.get("cancelled"):
            return [], []
        if final or (chunk.round >= self.max_rounds and self.fallback == "batch"):
            tries = "through the client" if final else f"after {chunk.round} batches"
            return self._errors(chunk, request, {**error, "message": f"{error['message']} ({tries})"}), []
        return [], [(request, False)]

    def _settle(
        self,
        chunk: Chunk,
        results: Iterable[KeyResult],
        again: List[Tuple[_Request, bool]],
        why: str,
        halves: Optional[List[Tuple[_Request, bool]]] = None,
        sync: bool = True,
    ) -> List[Chunk]:
        """Write the chunk's results; put what is left (``again``, complete once ``results`` has been
        read; ``alone``: each input on its own) into new chunks, or, with the sync fallback and
        ``sync``, send it now; mark the chunk done, all in one state write. ``halves``: the chunk is
        split, ``again`` and ``halves`` becoming one chunk each, of the same round. The new chunks."""
        target = self._store.file(chunk.n, "results")
        count = 0
        with open(target + ".tmp", "wb") as file:
            for result in results:
                file.write(result.encode())
                count += 1
            cancelled = bool(self._state.get("cancelled"))
            if cancelled:  # nothing more is submitted: what is left stays without a result
                again, halves = [], None
            if again and sync and halves is None and self.fallback == "sync":
                for result in self._send_sync(chunk, again):
                    file.write(result.encode())
                    count += 1
                again = []
            file.flush()
            os.fsync(file.fileno())
        os.replace(target + ".tmp", target)
        chunk.results = count
        new: List[Chunk] = []
        for group in (again, halves or []):
            if group:
                new.extend(self._replan(chunk, group, chunk.round if halves is not None else chunk.round + 1))
        if self.on_results is not None:  # before the chunk is marked done: a crash here delivers again
            self.on_results(chunk, (KeyResult(**record) for record in _read_jsonl(target)))
        chunk.phase = "done"
        chunk.note = why + (f"; {sum(c.keys for c in new)} inputs sent again in chunk(s) "
                            f"{', '.join(str(c.n) for c in new)}" if new else "")  # fmt: skip
        self._chunks.extend(new)
        self._save()
        spent = ["output", "errors", "sync"] + ([] if self._keep_results else ["input", "keys", "results"])
        self._store.remove(*(self._store.file(chunk.n, what) for what in spent))
        return new

    def _replan(self, chunk: Chunk, requests: List[Tuple[_Request, bool]], round: int) -> List[Chunk]:
        """New chunks (of ``round``) for requests to send again; ``alone``: each input on its own."""
        planner = _Planner(self, round)
        try:
            for request in _split(requests, _shared_field(chunk.url)):
                planner.add(chunk.url, request.body, request.keys, request.notes)
        finally:
            chunks = planner.close()
        return chunks

    def _reject(self, chunk: Chunk, message: str, status: Optional[int]) -> None:
        """Every request of the chunk ends with ``message``: it can never run as it is."""
        error: Dict[str, Any] = {"type": "batch_rejected", "message": message}
        if status is not None:
            error["status"] = status
        results = (r for request in _requests_of(self._store, chunk) for r in self._errors(chunk, request, error))
        self._settle(chunk, results, [], "rejected")

    def _send_sync(self, chunk: Chunk, requests: List[Tuple[_Request, bool]]) -> List[KeyResult]:
        """Send requests through the client (``fallback="sync"``; ``alone``: each input on its own),
        recording each outcome as it arrives, so that a rerun sends none twice (one on the wire when
        the process dies is lost, and sent again). An error every call would get stops the job."""
        path = self._store.file(chunk.n, "sync")
        done: Dict[str, Any] = {}
        if os.path.exists(path):
            for record in _read_jsonl(path):
                done[record["custom_id"]] = record
        split = list(_split(requests, _shared_field(chunk.url)))
        route = chunk.url[len("/v1") :]

        def send(request: _Request) -> Dict[str, Any]:
            try:
                body = self._client.post(route, body=request.body, cast_to=object)
                return {"custom_id": request.custom_id, "response": {"status_code": 200, "body": body}}
            except openai.APIStatusError as error:
                if Retry.classify(error)[0] == "quota" or error.status_code in (401, 403):
                    raise
                payload = error.body if isinstance(error.body, dict) else {"message": str(error)}
                payload = payload if "error" in payload else {"error": payload}
                return {"custom_id": request.custom_id, "response": {"status_code": error.status_code, "body": payload}}
            except Exception as error:  # no answer (connection, timeout) or an odd one
                return {
                    "custom_id": request.custom_id,
                    "error": {"code": Retry.classify(error)[0], "message": str(error)},
                }

        pending = [request for request in split if request.custom_id not in done]
        if pending:
            with open(path, "ab") as file, ThreadPoolExecutor(self.max_workers) as pool:
                for future in as_completed([pool.submit(send, request) for request in pending]):
                    record = future.result()
                    file.write(_line(record))
                    file.flush()
                    done[record["custom_id"]] = record
        results: List[KeyResult] = []
        for request in split:
            settled, _ = self._outcome(chunk, request, done.get(request.custom_id), final=True)
            results.extend(settled)
        return results

    # -- driving -------------------------------------------------------------------------------

    def _step(self) -> bool:
        """One pass: settle what is downloaded, adopt or create what is being created, poll what runs,
        submit what the queue allows. Whether anything changed."""
        changed = False
        creating = [chunk for chunk in self._chunks if chunk.phase == "creating"]
        if creating and not self._adopt(creating):
            for chunk in creating:
                if chunk.phase != "creating":
                    continue
                if self._state.get("cancelled"):  # no batch was made for it: none will be
                    chunk.phase, chunk.note = "done", "cancelled before it was submitted"
                    self._save()
                else:
                    self._create(chunk)
            changed = True
        for chunk in list(self._chunks):
            if chunk.phase == "submitted":
                changed |= self._poll(chunk)
        if not self._state.get("cancelled"):
            for chunk in list(self._chunks):
                if chunk.phase in ("planned", "uploaded") and self._queue_allows(chunk):
                    self._submit(chunk)
                    changed = True
        for chunk in list(self._chunks):
            if chunk.phase == "downloaded":
                self._read_settled(chunk)
                changed = True
        return changed

    def _round(self) -> bool:
        """:meth:`_step`, with transient failures (the client's retries spent) counted, not raised,
        until calls have failed ``_MAX_PHASE_FAILURES`` times in a row over ``_MAX_FAILING_S``."""
        failures = self._failures
        try:
            changed = self._step()
        except (openai.APIConnectionError, openai.APIStatusError, MalformedResponse) as error:
            if not Retry.classify(error)[1]:
                raise
            self._failed_call(error)
            return False
        if self._failures == failures:
            self._failures = 0
        return changed

    def _failed_call(self, error: BaseException) -> None:
        """A Batch API call failed after the client's retries: the next poll tries again. Raised once
        calls have failed ``_MAX_PHASE_FAILURES`` times in a row, for ``_MAX_FAILING_S`` or more."""
        now = time.monotonic()
        if self._failures == 0:
            self._failing_since = now
        self._failures += 1
        if self._failures >= _MAX_PHASE_FAILURES and now - self._failing_since >= _MAX_FAILING_S:
            raise error
        log.warning("throttled_openai: batch job %s: %s; trying again at the next poll", self.job_id, error)

    @property
    def done(self) -> bool:
        """Every chunk is settled: each input has its result (or, after :meth:`cancel`, none)."""
        return bool(self._state) and all(chunk.phase == "done" for chunk in self._chunks)

    def wait(
        self, progress: Union[bool, Callable[[BatchJob], None]] = False, timeout: Optional[float] = None
    ) -> BatchJob:
        """Drive the job until every input has its result; returns the job.

        progress: True for a tqdm bar of finished inputs, with the batches' statuses (tqdm must be
        installed), or a callable given the job after each poll.
        timeout: seconds to wait, then ``TimeoutError`` (the batches keep running; wait again later);
        None: no limit. Ctrl-C raises ``KeyboardInterrupt`` and leaves the batches running.
        """
        if not self._state:
            raise RuntimeError("no job to wait for: use client.batch_*() or BatchJob.open()")
        with self._exclusive():
            return self._wait(progress, timeout)

    def _wait(self, progress: Union[bool, Callable[[BatchJob], None]], timeout: Optional[float]) -> BatchJob:
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _bar(self) if progress is True else None
        report = progress if callable(progress) else None
        interval = self.poll_interval
        try:
            while True:
                changed = self._round()
                if bar is not None:
                    _show(bar, self)
                if report is not None:
                    report(self)
                if self.done:
                    return self
                interval = self.poll_interval if changed else min(interval * 1.5, self.max_poll_interval)
                pause = interval
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"batch job {self.job_id} is not done after {timeout} s; it keeps running")
                    pause = min(pause, left)
                time.sleep(pause)
        except KeyboardInterrupt:
            if self._keep_results:  # the Python API (the command line says it in its own summary)
                log.warning(
                    "throttled_openai: batch job %s interrupted; its batches keep running: wait() again, or open "
                    "the job later with BatchJob.open(client, %r) or the same batch_*() call",
                    self.job_id,
                    self.state_path,
                )
            raise
        finally:
            if bar is not None:
                bar.close()

    def cancel(self) -> None:
        """Cancel the job's running batches, and submit nothing more. :meth:`wait` then collects what
        finished before the cancel; the inputs that did not run get no result (a ``batch_cancelled``
        error in :meth:`results`)."""
        with self._exclusive():
            self._cancel()

    def _cancel(self) -> None:
        self._state["cancelled"] = True
        self._save()
        creating = [chunk for chunk in self._chunks if chunk.phase == "creating"]
        if creating:  # a batch may exist for them: cancel it too (the rest are settled by wait())
            self._adopt(creating)
        for chunk in self._chunks:
            if chunk.phase == "submitted" and chunk.status not in TERMINAL and chunk.status != "cancelling":
                try:
                    batch = self._client.batches.cancel(chunk.batch_id)
                except openai.BadRequestError:  # it ended meanwhile
                    continue
                chunk.status = batch.status
        for chunk in self._chunks:
            if chunk.phase in ("planned", "uploaded"):
                chunk.phase, chunk.note = "done", "cancelled before it was submitted"
        self._save()

    def status_line(self) -> str:
        """:meth:`status` as text: ``"in_progress 2, validating 1"``."""
        return ", ".join(f"{name} {count}" for name, count in sorted(self.status().items()))

    def status(self) -> Dict[str, int]:
        """Chunks by status: their batch's status once submitted, else the phase (``planned`` ...)."""
        counts: Dict[str, int] = {}
        for chunk in self._chunks:
            name = "done" if chunk.phase == "done" else chunk.status or chunk.phase
            counts[name] = counts.get(name, 0) + 1
        return counts

    @property
    def tokens_used(self) -> int:
        """Tokens of the results' ``usage`` so far (billed at the Batch API's price)."""
        return sum(chunk.tokens_used for chunk in self._chunks)

    def finished_inputs(self) -> int:
        """Inputs with a result so far, counting those of running batches by their request counts."""
        total = 0
        for chunk in self._chunks:
            if chunk.phase == "done":
                total += chunk.results
            elif chunk.requests:
                total += chunk.keys * chunk.finished // chunk.requests
        return total

    def settled(self) -> Iterator[KeyResult]:
        """Every result written so far (by settled chunk, a later chunk's result for a key winning)."""
        for chunk in self._chunks:
            path = self._store.file(chunk.n, "results")
            if chunk.phase == "done" and os.path.exists(path):
                for record in _read_jsonl(path):
                    yield KeyResult(**record)

    def results(self, return_exceptions: bool = False) -> List[Any]:
        """One result per input, in input order, as ``map_*`` gives them: a ``ChatCompletion``, a
        completion choice (a list of ``n``), an embedding vector, or the response body (a dict).

        An input that failed raises :class:`BulkError` (its ``results`` and ``errors`` set), or with
        ``return_exceptions`` has a :class:`BatchRequestError` in its place. Call after :meth:`wait`."""
        if not self.done:
            raise RuntimeError(f"batch job {self.job_id} is not done yet: call wait() first")
        size = int(self._state.get("inputs", 0))
        slots: List[Any] = [None] * size
        errors: Dict[int, BaseException] = {}
        seen: Set[int] = set()
        kind = self._state.get("kind", "requests")
        for result in self.settled():
            seen.add(result.key)
            if result.error is not None:
                errors[result.key] = BatchRequestError.from_record(result.error)
            else:
                errors.pop(result.key, None)
                slots[result.key] = _convert(kind, result.response or {})
        for key in range(size):
            if key not in seen:
                errors[key] = BatchRequestError("the job was cancelled before this input ran", "batch_cancelled")
        if return_exceptions:
            for key, error in errors.items():
                slots[key] = error
            return slots
        if errors:
            first = min(errors)
            raise BulkError(
                f"{len(errors)} of {size} inputs failed; the first, {first}: {errors[first]}", slots, errors
            )
        return slots

    def __repr__(self) -> str:
        return f"<BatchJob {self.job_id} state={self.state_path!r} chunks: {self.status_line() or 'none'}>"


def _kind(status: int, detail: Dict[str, Any]) -> str:
    """A failed request's label, as the retry policy names it (``status_400``, ``server_error``, ...)."""
    if status == 429:
        return "quota" if detail.get("code") == "insufficient_quota" else "rate_limited"
    return "server_error" if status >= 500 else f"status_{status}"


def _convert(kind: str, body: Dict[str, Any]) -> Any:
    """A response body as the SDK type ``map_*`` would give for it."""
    if kind == "chat":
        from openai.types.chat import ChatCompletion

        return ChatCompletion.construct(**body)
    if kind == "completions":
        from openai.types import CompletionChoice

        choices = [CompletionChoice.construct(**choice) for choice in body.get("choices") or []]
        return choices[0] if len(choices) == 1 else choices
    if kind == "embeddings":
        data = body.get("data") or [{}]
        return data[0].get("embedding")
    return body


def _bar(job: BatchJob) -> Any:
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ImportError("progress=True needs tqdm: pip install tqdm") from exc
    return tqdm(total=int(job._state.get("inputs", 0)) or None, unit="input", dynamic_ncols=True)


def _show(bar: Any, job: BatchJob) -> None:
    bar.n = job.finished_inputs()
    bar.set_postfix_str(job.status_line(), refresh=False)
    bar.refresh()


def fingerprint(requests: Iterable[Tuple[str, Dict[str, Any]]]) -> str:
    """A hash of a job's requests, to tell a rerun of the same job from another job on one state file."""
    digest = hashlib.sha256()
    for url, body in requests:
        digest.update(url.encode() + b"\0" + json.dumps(body, sort_keys=True).encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()[:32]


# -- making jobs -----------------------------------------------------------------------------------

#: Keyword arguments of the ``client.batch_*`` methods that configure the job (see :class:`BatchJob`);
#: every other one goes into each request's body.
JOB_OPTIONS = frozenset(
    {"poll_interval", "max_poll_interval", "queue_tokens", "max_requests", "fallback", "max_rounds", "max_workers"}
)
# The body field each kind of job fills from its inputs.
_INPUT_FIELDS = {"completions": "prompt", "chat": "messages", "embeddings": "input"}
Planned = Tuple[str, Dict[str, Any], List[int], Optional[List[Any]]]


def start(
    client: Any,
    kind: str,
    inputs: Iterable[Any],
    state: str,
    model: Optional[str],
    batch_size: int,
    kwargs: Dict[str, Any],
) -> BatchJob:
    """A job for ``inputs`` (``kind``: completions, chat, embeddings or requests): submitted now, or,
    when ``state`` already holds this same job, picked up where it is."""
    options = {name: kwargs.pop(name) for name in list(kwargs) if name in JOB_OPTIONS}
    job = BatchJob(client, state, **options)
    items = list(inputs)
    make = _requests_for(kind, items, model, batch_size, kwargs)
    digest = fingerprint((url, body) for url, body, _, _ in make())
    with job._exclusive():
        if job._load():
            if job._state.get("fingerprint") != digest:
                raise ValueError(
                    f"{job.state_path} holds another job (other inputs or arguments): pass another state path, "
                    "or BatchJob.open() it"
                )
            return job
        job._new(kind, digest)
        job._state["inputs"] = len(items)
        job._plan(make())
        job._round()  # submit what the queue allows now; wait() does the rest
    return job


def _requests_for(
    kind: str, items: List[Any], model: Optional[str], batch_size: int, kwargs: Dict[str, Any]
) -> Callable[[], Iterator[Planned]]:
    """Check the inputs and arguments (TypeError/ValueError before anything is sent); a function that
    yields the job's requests, ``batch_size`` inputs a request where the endpoint takes several."""
    if kind == "requests":
        bodies = [_checked_body(i, body, model) for i, body in enumerate(items)]

        def requests() -> Iterator[Planned]:
            for i, (url, body) in enumerate(bodies):
                yield url, body, [i], None

        return requests
    if not isinstance(model, str) or not model:
        raise TypeError(f"model= must be a non-empty str, got {model!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    field_name = _INPUT_FIELDS[kind]
    if field_name in kwargs or "model" in kwargs or kwargs.get("stream"):
        clash = field_name if field_name in kwargs else "model" if "model" in kwargs else "stream"
        raise TypeError(f"{clash}= is not an argument here: the inputs are the first argument, model= names the model")
    for i, item in enumerate(items):
        if kind == "chat" and not (isinstance(item, list) and all(isinstance(m, dict) for m in item)):
            raise TypeError(f"conversation {i} must be a list of message dicts, got {type(item).__name__}")
        if kind != "chat" and not isinstance(item, (str, list)):
            raise TypeError(f"input {i} must be a str or a list of token ids, got {type(item).__name__}")
    url = BATCH_URLS[kind]
    size = 1 if kind == "chat" else batch_size

    def grouped() -> Iterator[Planned]:
        for start_at in range(0, len(items), size):
            group = items[start_at : start_at + size]
            value = group[0] if len(group) == 1 else group
            yield url, {**kwargs, "model": model, field_name: value}, list(range(start_at, start_at + len(group))), None

    return grouped


def _checked_body(i: int, body: Any, model: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """``(url, body)`` of one request of ``batch_requests``: the endpoint from the body's shape."""
    if not isinstance(body, dict):
        raise TypeError(f"request {i} must be a dict (a request body), got {type(body).__name__}")
    url = body.get("url") if isinstance(body.get("url"), str) and isinstance(body.get("body"), dict) else None
    if url is not None:  # a Batch API line: {"url": ..., "body": ...}
        body = body["body"]
    else:
        shape = next(
            (
                name
                for field, name in (("prompt", "completions"), ("messages", "chat"), ("input", "embeddings"))
                if field in body
            ),
            None,
        )
        if shape is None:
            raise ValueError(f"request {i} has no prompt, messages or input: give {{'url': ..., 'body': ...}}")
        url = BATCH_URLS[shape]
    if url not in BATCH_URLS.values():
        raise ValueError(f"request {i}: the Batch API takes {sorted(BATCH_URLS.values())}, not {url!r}")
    if not body.get("model"):
        if not model:
            raise ValueError(f"request {i} names no model (or pass model=)")
        body = {**body, "model": model}
    if body.get("stream"):
        raise ValueError(f"request {i}: a batch request cannot stream")
    return url, body
