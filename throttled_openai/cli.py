"""``throttled-openai run``: a JSONL file of API requests in, a JSONL file of results out.

Reads the OpenAI Cookbook's ``api_request_parallel_processor.py`` input as is: one request body per
line, an optional ``"metadata"`` passed through. The endpoint comes from the body (``prompt`` →
completions, ``messages`` → chat, ``input`` → embeddings) unless ``--endpoint`` says. Every request
goes through one :class:`ThrottledClient`, so the job runs at the limits and no faster.

How it stays correct when killed or edited:

- Each result is appended to the output as one line, flushed as soon as it is known. A rerun reads the
  output, cuts off a torn last line (a crash mid-write) and skips every input line that has a result;
  ``--retry-failed`` also reruns the lines whose result is an error. When a line ends up with more than
  one record (a retried failure), the output is rewritten with one record per line, the last, in line
  order, through a temporary file and ``os.replace`` so a crash leaves the old or the new file.
- Each result carries a short hash of its input line (:func:`line_digest`: sha256 of the line's JSON in
  canonical form, metadata included, before ``--model`` fills anything in). A rerun redoes a line whose
  hash differs (the input was edited or shifted); a result without one (an older output) is matched by
  line number alone. Results for lines the input no longer has are kept but not counted.
- The native format carries its line number and hash (``"line"``, ``"line_hash"``); the Cookbook's
  ``[request, response, metadata]`` arrays do not, so ``--format cookbook`` keeps them in side files,
  one line per result: the numbers in ``<output>.lines`` (as before), the hashes in ``<output>.hashes``
  (``-`` for none). Compaction first writes both to ``<output>.lines.next`` with the new output's size
  and CRC, then replaces the output, then the side files; a rerun adopts a ``.lines.next`` only if the
  output matches it.
- An error every later request would get too (no quota left, a rejected key, no permission) stops the
  job, and so does a server that does not answer: ``--max-connection-failures`` requests in a row that
  got no answer at all after their retries (connection refused or dropped, timeouts), or as many
  attempts in a row that got none within ``--timeout`` (a black-holed address or proxy, where every
  attempt costs a whole timeout): nothing more is sent, the lines not sent stay undone, and the exit
  code is 1. Ctrl-C stops at the next result (requests on the wire are abandoned;
  a second Ctrl-C stops at once), with exit code 130; a rerun continues either way.
- Usage errors (exit code 2, one line on stderr) are found before anything is sent: a missing or
  unreadable input, an output that is a directory or in a directory that does not exist.

Single-prompt completions lines whose bodies differ only in ``prompt`` share one request (up to 20
prompts, within the token burst the limiter allows); their answers are matched back by ``index``.

``--batch-api`` sends the same job through OpenAI's Batch API instead (:mod:`.batch_run`), with the same
output, summary and exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import zlib
from array import array
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from types import FrameType
from typing import Any, BinaryIO, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Type, Union

import openai

from .batching import MAX_PROMPTS_PER_COMPLETION
from .client import ThrottledClient, _http_library
from .context import current
from .errors import Cancelled, MalformedResponse
from .mapping import BulkTarget, _about_one_input, _is_fatal, _Pool
from .retry import Retry
from .tokens import estimate_cost, usage_tokens

__all__ = ["add_parser", "execute", "line_digest", "main"]

#: API path of each endpoint a line may target.
PATHS = {"completions": "/completions", "chat": "/chat/completions", "embeddings": "/embeddings"}
# Body field that tells the endpoint, in the order they are tried.
_SHAPES = (("prompt", "completions"), ("messages", "chat"), ("input", "embeddings"))
# Lines a completions line may wait, unsent, for compatible lines to share its request.
_HOLD_LINES = 1000
_DEFAULT_WORKERS = 32
# Requests in a row that got no answer at all (connection refused or dropped, timeouts) before the job stops.
_DEFAULT_CONNECTION_FAILURES = 20
# Seconds an attempt waits for its answer (--timeout). A request that is not streamed is answered whole,
# once generated: a few thousand tokens from a slower model take a minute or more, and an attempt given up
# may be billed and is sent again, so not much less than 2 minutes. A server that never answers costs a
# timeout per attempt: the job stops after about 2 minutes with limits known (the first attempts time out
# together), 40 at worst (limits not known yet: one attempt at a time), where the SDK's 600 s took hours.
_DEFAULT_TIMEOUT = 120.0
# Seconds to connect, at most (the SDK's): an address that drops what is sent to it fails fast.
_CONNECT_TIMEOUT = 5.0
# Seconds the main thread waits at a time, so Ctrl-C is noticed promptly.
_WAIT_SLICE = 0.25


class UsageError(Exception):
    """Bad arguments or an output that cannot be resumed: exit code 2."""


# -- one result ---------------------------------------------------------------------------------


@dataclass
class Task:
    """One input line to send. ``request`` is the body as sent (``metadata`` removed, model filled)."""

    line: int
    request: Dict[str, Any]
    endpoint: str
    metadata: Any
    has_metadata: bool
    digest: Optional[str] = None  # line_digest() of the input line

    def done(self, response: Dict[str, Any], batch: Optional[List[int]] = None) -> Result:
        return Result(
            self.line,
            self.request,
            self.metadata,
            self.has_metadata,
            response=response,
            batch=batch,
            digest=self.digest,
            answered=True,
        )

    def failed(self, error: BaseException) -> Result:
        result = Result(
            self.line, self.request, self.metadata, self.has_metadata, error=_describe(error), digest=self.digest
        )
        result.fatal = _is_fatal(error)
        result.unsent = isinstance(error, Cancelled)
        result.answered = _answered(error)
        return result


@dataclass
class Result:
    """What one input line ended with: a response or an error (``{"type", "message"[, "status"]}``)."""

    line: int
    request: Any
    metadata: Any = None
    has_metadata: bool = False
    response: Optional[Dict[str, Any]] = None
    error: Optional[Dict[str, Any]] = None
    batch: Optional[List[int]] = None  # lines that shared the request, when batched
    fatal: bool = False  # an error every later request would get too: the job stops
    unsent: bool = False  # the job stopped before the request went out: no result, the line stays undone
    digest: Optional[str] = None  # line_digest() of the input line, to tell an edited input on a rerun
    answered: Optional[bool] = None  # the server answered (True), never did (False), not asked (None)

    def encode(self, fmt: str) -> bytes:
        """The output line, ``\\n`` included."""
        try:
            return _encode(self._record(fmt))
        except (TypeError, ValueError) as exc:  # cannot happen with JSON data; never lose the line
            return _encode(Result(self.line, repr(self.request), error=_describe(exc), digest=self.digest)._record(fmt))

    def _record(self, fmt: str) -> Any:
        record: Any
        if fmt == "cookbook":  # [request, response or [error message], metadata?]
            outcome = self.response if self.error is None else [self.error["message"]]
            record = [self.request, outcome, self.metadata] if self.has_metadata else [self.request, outcome]
        else:
            record = {"line": self.line}
            if self.digest is not None:
                record["line_hash"] = self.digest
            record["request"] = self.request
            record.update({"response": self.response} if self.error is None else {"error": self.error})
            if self.has_metadata:
                record["metadata"] = self.metadata
            if self.batch:
                record["batch_lines"] = self.batch
        return record


def _encode(record: Any) -> bytes:
    """One JSON line; UTF-8 as is, or ``\\u`` escapes where a lone surrogate (valid JSON) has no UTF-8."""
    try:
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    except UnicodeEncodeError:
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _describe(error: BaseException) -> Dict[str, Any]:
    """An error as ``{"type", "message"[, "status"]}``; ``type`` is the retry policy's label
    (``quota``, ``rate_limit_requests``, ``status_400``, ``server_error``, ``timeout``, ...)."""
    described: Dict[str, Any] = {"type": Retry.classify(error)[0], "message": str(error)}
    if isinstance(error, openai.APIStatusError):
        described["status"] = error.status_code
    return described


def _answered(error: BaseException) -> Optional[bool]:
    """Whether the server answered the request that failed with ``error``: ``False`` for no answer at
    all (connection refused, reset or dropped, a timeout), ``None`` when nothing was sent or it is not
    known."""
    if isinstance(error, openai.APIConnectionError):  # APITimeoutError included
        return False
    if isinstance(error, (openai.APIStatusError, UnexpectedResponse, MalformedResponse)):
        return True  # an answer, if a bad one (a captive portal's page, say): not a dead server
    return None


def _bad_line(line: int, request: Any, kind: str, message: str) -> Result:
    return Result(line, request, error={"type": kind, "message": f"line {line}: {message}"})


# -- reading the input --------------------------------------------------------------------------


def line_digest(raw: bytes) -> str:
    """A short hash of one input line: the first 16 hex digits of the sha256 of its JSON in canonical form
    (keys sorted, no spaces, ASCII), so that re-indenting a line or reordering its keys is no change; of
    its bytes, surrounding whitespace cut, when it is not JSON. The line as written, ``metadata``
    included: ``--model`` and the other options are not part of it."""
    try:
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    except (ValueError, RecursionError):
        canonical = raw.strip()
    return hashlib.sha256(canonical).hexdigest()[:16]


def read_tasks(
    path: str, skip: Callable[[int], bool], endpoint: Optional[str], model: Optional[str]
) -> Iterator[Union[Task, Result]]:
    """Stream the input: a :class:`Task` per line to send, a :class:`Result` per bad line, each with its
    :func:`line_digest`. Lines are numbered from 1 as in an editor; blank lines are not requests and get
    no result."""
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if raw.strip() and not skip(number):
                item = _parse(number, raw, endpoint, model)
                item.digest = line_digest(raw)
                yield item


class LineHashes:
    """Line number → the :func:`line_digest` its result was made for, as a 64-bit number (0: none), in
    8 bytes a line: an array indexed by line number, a dict for numbers far past the others."""

    def __init__(self) -> None:
        self._dense = array("Q")
        self._sparse: Dict[int, int] = {}

    def set(self, line: int, digest: Optional[str]) -> None:
        value = _hash_value(digest)
        if 0 <= line < len(self._dense):
            self._dense[line] = value
        elif 0 <= line <= 2 * len(self._dense) + 4096:
            self._dense.frombytes(bytes(8 * (line + 1 - len(self._dense))))
            self._dense[line] = value
        elif value:
            self._sparse[line] = value
        else:
            self._sparse.pop(line, None)

    def get(self, line: int) -> int:
        """The hash of ``line``'s result as a number; 0 when it has none."""
        if 0 <= line < len(self._dense):
            return self._dense[line]
        return self._sparse.get(line, 0)


def _hash_value(digest: Optional[str]) -> int:
    """A :func:`line_digest` as a number, never 0; 0 for none (or one that is not 16 hex digits)."""
    if digest is None or len(digest) != 16:
        return 0
    try:
        return int(digest, 16) or 1
    except ValueError:
        return 0


@dataclass
class InputScan:
    """What a first pass over the input found: the requests it holds, and how it compares with the
    results already in the output."""

    records: int  # non-blank lines: one result each
    changed: Set[int]  # lines whose result was made for a different line (their hashes differ)
    orphans: Set[int]  # lines with a result that are blank now, or past the input's end


def scan_input(path: str, results: Dict[int, Optional[str]], hashes: LineHashes) -> InputScan:
    """Count the requests in the input and compare each line that has a result (``results``) with the
    hash that result was made for (``hashes``; a line missing from it is taken as unchanged)."""
    records, last = 0, 0
    changed: Set[int] = set()
    blank: Set[int] = set()
    with open(path, "rb") as lines:
        for last, raw in enumerate(lines, start=1):  # last: the number of lines, in the end
            if not raw.strip():
                if last in results:
                    blank.add(last)
                continue
            records += 1
            stored = hashes.get(last)
            if stored and stored != _hash_value(line_digest(raw)):
                changed.add(last)
    return InputScan(records, changed, blank | {line for line in results if line > last})


def _parse(number: int, raw: bytes, endpoint: Optional[str], model: Optional[str]) -> Union[Task, Result]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        message = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
        return _bad_line(number, raw.decode("utf-8", "replace").rstrip("\r\n"), "invalid_json", message)
    if not isinstance(body, dict):
        return _bad_line(number, body, "unknown_shape", "a request must be a JSON object")
    has_metadata = "metadata" in body
    metadata = body.pop("metadata", None)
    kind = endpoint or next((name for field, name in _SHAPES if field in body), None)
    if kind is None:
        return _bad_line(number, body, "unknown_shape", "no prompt, messages or input (or give --endpoint)")
    if body.get("model") is not None and not isinstance(body["model"], str):
        return _bad_line(number, body, "invalid_model", "model must be a string")
    if not body.get("model"):
        if not model:
            return _bad_line(number, body, "missing_model", "no model in the line (or give --model)")
        body["model"] = model
    if body.get("stream"):
        return _bad_line(number, body, "unsupported", "stream is not supported in a bulk job")
    return Task(number, body, kind, metadata, has_metadata)


# -- sending ------------------------------------------------------------------------------------


class UnexpectedResponse(Exception):
    """The server answered 200 with a body that is not a JSON object."""


def _as_dict(result: Any) -> Dict[str, Any]:
    converted = result.to_dict() if hasattr(result, "to_dict") else result
    if not isinstance(converted, dict):
        raise UnexpectedResponse(f"the response is not a JSON object: {str(converted)[:200]!r}")
    return converted


def _post(client: ThrottledClient, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
    cancel = current.cancel
    if cancel is not None and cancel.is_set():
        raise Cancelled("the job stopped before this request was sent")
    # cast_to=object: the SDK returns the JSON as is, with no model to build (and none to fail).
    return _as_dict(client.post(path, body=body, cast_to=object))


def send_one(client: ThrottledClient, task: Task) -> List[Result]:
    """One line, one request; the body goes as is, unknown fields included."""
    try:
        response = _post(client, PATHS[task.endpoint], task.request)
    except Exception as exc:
        return [task.failed(exc)]
    return [task.done(response)]


def send_batch(client: ThrottledClient, tasks: List[Task]) -> List[Result]:
    """Compatible completions lines in one request (``prompt`` as a list). A 400, or a refusal as too
    large for the token limit, splits the batch until the line at fault fails alone; a line whose answer
    is missing or repeated is asked again alone."""
    if len(tasks) == 1:
        return send_one(client, tasks[0])
    n = tasks[0].request.get("n") or 1
    body = {**tasks[0].request, "prompt": [task.request["prompt"] for task in tasks]}
    try:
        response = _post(client, PATHS["completions"], body)
        answers = _by_index(response.get("choices"), len(tasks), n if isinstance(n, int) and n > 0 else 1)
    except Exception as exc:
        if isinstance(exc, openai.BadRequestError) or _about_one_input(exc) or _local_body_error(exc):
            middle = len(tasks) // 2
            return send_batch(client, tasks[:middle]) + send_batch(client, tasks[middle:])
        return [task.failed(exc) for task in tasks]
    lines = [task.line for task in tasks]
    results: List[Result] = []
    usage = response.get("usage")  # reported once, on the first line answered from the batch
    for task, choices in zip(tasks, answers):
        if choices is None:
            results.extend(send_one(client, task))
        else:  # as if sent alone
            results.append(task.done({**response, "choices": choices, "usage": usage}, lines))
            usage = None
    return results


def _local_body_error(error: BaseException) -> bool:
    """The SDK could not even encode the body (a lone surrogate, ...): one prompt's fault, likely."""
    return isinstance(error, (UnicodeError, TypeError, ValueError)) and not isinstance(error, openai.OpenAIError)


def _by_index(choices: Any, inputs: int, n: int) -> List[Optional[List[Dict[str, Any]]]]:
    """Choice ``j`` of input ``i`` has ``index == i * n + j``; each input's ``n`` choices with
    ``index`` set back to ``j``, or ``None`` where one is missing or repeated."""
    slots: List[List[Any]] = [[None] * n for _ in range(inputs)]
    broken: Set[int] = set()
    for choice in choices if isinstance(choices, list) else []:
        index = choice.get("index") if isinstance(choice, dict) else None
        if not isinstance(index, int) or not 0 <= index < inputs * n:
            continue
        i, j = divmod(index, n)
        if slots[i][j] is not None:
            broken.add(i)
        slots[i][j] = {**choice, "index": j}
    return [None if i in broken or None in slot else slot for i, slot in enumerate(slots)]


def batch_key(task: Task) -> Optional[str]:
    """Lines with the same key may share a request: single-prompt completions whose bodies differ only
    in ``prompt``. ``None``: the line goes alone."""
    if task.endpoint != "completions" or not isinstance(task.request.get("prompt"), str):
        return None
    n = task.request.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        return None  # the server will say what is wrong with it, about this line alone
    return json.dumps({k: v for k, v in task.request.items() if k != "prompt"}, sort_keys=True)


# -- the output file ----------------------------------------------------------------------------


class Output:
    """The results file: what it already holds (to resume), appending, and compaction."""

    def __init__(self, path: str, fmt: str) -> None:
        self.path = path
        self.fmt = fmt
        self.index_path = path + ".lines" if fmt == "cookbook" else None
        self.hashes_path = path + ".hashes" if fmt == "cookbook" else None
        self.next_path = path + ".lines.next"  # compaction's new side files, until all three files are in
        self.untidy = False  # a line has several records, or a record is unreadable
        self.hashes = LineHashes()  # the line_digest() each line's last record was made for, if any
        self._out: Optional[BinaryIO] = None
        self._index: Optional[BinaryIO] = None
        self._hashes: Optional[BinaryIO] = None

    def load(self) -> Dict[int, Optional[str]]:
        """Line → ``None`` (done) or its error type, last record winning (its hash, if it has one, in
        :attr:`hashes`); cuts off torn last lines."""
        state: Dict[int, Optional[str]] = {}
        self._recover()
        for line, digest, record in self._records():
            if line in state:
                self.untidy = True
            state[line] = _error_type(record)
            self.hashes.set(line, digest)
        return state

    def _recover(self) -> None:
        """Finish or undo a compaction a crash interrupted: a ``.lines.next`` made for the output that
        is now in place (same size and CRC) becomes the side files; one made for an output that never
        got in place is dropped, the old output and side files still belonging together."""
        leftovers = [self.path + ".tmp", self.next_path + ".tmp"]
        for side in (self.index_path, self.hashes_path):
            if side is not None:
                leftovers.append(side + ".tmp")
        for leftover in leftovers:
            if os.path.exists(leftover):
                os.remove(leftover)
        if self.index_path is None or not os.path.exists(self.next_path):
            return
        with open(self.next_path, "rb") as file:
            header, _, entries = file.read().partition(b"\n")
        if os.path.exists(self.path) and header == _signature(self.path):
            self._write_side_files(entries)
        os.remove(self.next_path)

    def _write_side_files(self, entries: bytes) -> None:
        """``.lines`` and ``.hashes`` from compaction's ``number hash`` lines (``.lines.next``)."""
        assert self.index_path is not None and self.hashes_path is not None
        numbers, digests = [], []
        for entry in entries.splitlines():
            number, _, digest = entry.partition(b" ")
            numbers.append(number + b"\n")
            digests.append((digest or b"-") + b"\n")
        _replace(self.index_path, iter(numbers))
        _replace(self.hashes_path, iter(digests))

    def _side_hashes(self, count: int) -> List[Optional[str]]:
        """The hashes of the first ``count`` records (cookbook format), ``None`` where there is none. The
        file is made to hold exactly ``count`` entries, ``-`` for none (an older output, or a crash
        between a result's line number and its hash), so that the next one appended is in its place."""
        assert self.hashes_path is not None
        path = self.hashes_path
        entries = _complete_lines(path) if os.path.exists(path) else []
        if len(entries) > count:
            os.truncate(path, entries[count][0])
            entries = entries[:count]
        if len(entries) < count:
            with open(path, "ab") as file:
                _write_all(file, b"-\n" * (count - len(entries)))
        digests: List[Optional[str]] = []
        for _, raw in entries:
            digest = raw.strip().decode("ascii", "replace")
            digests.append(None if digest in ("", "-") else digest)
        return digests + [None] * (count - len(entries))

    def _records(self) -> Iterator[Tuple[int, Optional[str], Any]]:
        """``(line, hash or None, record)`` of every readable record, in file order."""
        if not os.path.exists(self.path):
            return
        numbers: Optional[List[Tuple[int, Optional[str]]]] = None
        if self.index_path is not None:
            if not os.path.exists(self.index_path) and os.path.getsize(self.path):
                raise UsageError(f"{self.path} was not written with --format cookbook (no {self.index_path})")
            raw = _complete_lines(self.index_path) if os.path.exists(self.index_path) else []
            numbers = list(zip(_line_numbers(self.index_path, raw), self._side_hashes(len(raw))))
        lines = _complete_lines(self.path)
        if numbers is not None:
            if len(numbers) > len(lines):
                raise UsageError(f"{self.index_path} lists more results than {self.path} holds; remove both to restart")
            if len(numbers) < len(lines):  # killed between the result and its line number: redo it
                os.truncate(self.path, lines[len(numbers)][0])
                lines = lines[: len(numbers)]
        for k, (_, raw_line) in enumerate(lines):
            try:
                record = json.loads(raw_line)
            except ValueError:
                self.untidy = True
                continue
            if numbers is None and isinstance(record, list):
                raise UsageError(f"{self.path} holds --format cookbook results; rerun with --format cookbook")
            line: Any = None
            digest: Any = None
            if numbers is not None:
                line, digest = numbers[k]
            elif isinstance(record, dict):
                line, digest = record.get("line"), record.get("line_hash")
            if isinstance(line, int) and not isinstance(line, bool):
                yield line, digest if isinstance(digest, str) else None, record
            else:
                self.untidy = True

    def open_files(self) -> None:
        """Open the output (and side files) for appending, creating them: before anything is sent, so
        that an output that cannot be written is a usage error, not a failure after requests went out."""
        if self._out is None:
            self._out = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
            if self.index_path is not None and self.hashes_path is not None:
                self._index = open(self.index_path, "ab", buffering=0)  # noqa: SIM115
                self._hashes = open(self.hashes_path, "ab", buffering=0)  # noqa: SIM115

    def append(self, result: Result) -> None:
        """The result, then (cookbook format) its line number, then its hash: a crash in between leaves
        a result without a number (redone) or a number without a hash (matched by number alone)."""
        self.open_files()
        assert self._out is not None
        _write_all(self._out, result.encode(self.fmt))
        if self._index is not None and self._hashes is not None:
            _write_all(self._index, b"%d\n" % result.line)
            _write_all(self._hashes, (result.digest or "-").encode() + b"\n")

    def close(self) -> None:
        for file in (self._out, self._index, self._hashes):
            if file is not None:
                file.close()
        self._out = self._index = self._hashes = None

    def compact(self) -> None:
        """Rewrite with one record per line (the last), in line order; a crash at any point leaves
        the old pair or the new one (see :meth:`_recover`)."""
        self.close()
        last: Dict[int, Tuple[bytes, Optional[str]]] = {}
        for line, digest, record in self._records():
            last[line] = (_encode(record), digest)
        lines = sorted(last)
        if self.index_path is None:
            _replace(self.path, (last[line][0] for line in lines))
        else:
            temporary = _write_synced(self.path + ".tmp", (last[line][0] for line in lines))
            entries = b"".join(b"%d %s\n" % (line, (last[line][1] or "-").encode()) for line in lines)
            _replace(self.next_path, iter([_signature(temporary) + b"\n", entries]))
            os.replace(temporary, self.path)
            self._write_side_files(entries)
            os.remove(self.next_path)
        self.untidy = False


def _line_numbers(path: str, entries: List[Tuple[int, bytes]]) -> List[int]:
    """The numbers in a ``.lines`` side file."""
    numbers = []
    for k, (_, raw) in enumerate(entries):
        try:
            numbers.append(int(raw))
        except ValueError:
            raise UsageError(f"{path} is damaged at line {k + 1}; remove it and its output to start over") from None
    return numbers


def _error_type(record: Any) -> Optional[str]:
    if isinstance(record, dict):
        error = record.get("error")
        return None if error is None else str(error.get("type") if isinstance(error, dict) else "error")
    failed = isinstance(record, list) and len(record) >= 2 and isinstance(record[1], list)
    return "error" if failed else None


def _complete_lines(path: str) -> List[Tuple[int, bytes]]:
    """``(offset, line)`` of every line ending in ``\\n``; a torn last line is cut off the file."""
    lines: List[Tuple[int, bytes]] = []
    offset = 0
    with open(path, "rb") as file:
        for raw in file:
            if not raw.endswith(b"\n"):
                break
            lines.append((offset, raw))
            offset += len(raw)
    if offset != os.path.getsize(path):
        os.truncate(path, offset)
    return lines


def _write_all(file: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[file.write(view) or 0 :]


def _write_synced(path: str, chunks: Iterator[bytes]) -> str:
    with open(path, "wb") as file:
        for chunk in chunks:
            _write_all(file, chunk)
        file.flush()
        os.fsync(file.fileno())
    return path


def _replace(path: str, chunks: Iterator[bytes]) -> None:
    os.replace(_write_synced(path + ".tmp", chunks), path)


def _signature(path: str) -> bytes:
    """``size crc32`` of a file's content."""
    crc, size = 0, 0
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return b"%d %08x" % (size, crc)


class Writer:
    """Appends results as they come (or in input order with ``ordered``) and keeps the tally."""

    def __init__(self, output: Output, ordered: bool, state: Dict[int, Optional[str]], progress: Any) -> None:
        self.output = output
        self.ordered = ordered
        self.state = state
        self.progress = progress
        self.expected: Deque[int] = deque()
        self.ready: Dict[int, Result] = {}
        self.written = 0
        self.failed: Counter[str] = Counter()
        self.tokens = 0  # the written results' usage

    def expect(self, line: int) -> None:
        if self.ordered:
            self.expected.append(line)

    def put(self, result: Result) -> None:
        if not self.ordered:
            self._write(result)
            return
        self.ready[result.line] = result
        while self.expected and self.expected[0] in self.ready:
            self._write(self.ready.pop(self.expected.popleft()))

    def flush(self) -> None:
        """The job stopped early: write what waits for an earlier line that will not come (a rerun puts
        the output back in order)."""
        for line in sorted(self.ready):
            self._write(self.ready.pop(line))
        self.expected.clear()

    def _write(self, result: Result) -> None:
        self.output.append(result)
        self.written += 1
        if result.line in self.state:
            self.output.untidy = True  # a retried line now has two records
        self.state[result.line] = None if result.error is None else str(result.error["type"])
        if result.error is not None:
            self.failed[str(result.error["type"])] += 1
        elif result.response is not None:
            self.tokens += usage_tokens(result.response.get("usage")) or 0
        if self.progress is not None:
            self.progress.update(1)


# -- is anyone there? ----------------------------------------------------------------------------


_TIMEOUTS: Tuple[Type[BaseException], ...] = (_http_library().TimeoutException,)


class Silence:
    """Counts the HTTP attempts in a row (every request the job's client sends, retries included, in
    the order they end) that timed out with no answer; any answer, even an error status, resets the
    count. A server that accepts connections and never answers (a black-holed proxy) costs a whole
    timeout per attempt, so the job stops after ``limit`` of them (0: never) instead of waiting out
    every request's retries. A connection refused or dropped is no timeout: it fails in milliseconds,
    its request's retries ride out a short outage, and the job counts it by request (:func:`process`).
    Thread-safe; :attr:`tripped` is set once ``limit`` is reached."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.tripped = threading.Event()
        self._lock = threading.Lock()

    def answered(self) -> None:
        with self._lock:
            self.count = 0

    def timed_out(self) -> None:
        with self._lock:
            self.count += 1
            if self.limit and self.count >= self.limit:
                self.tripped.set()


class _WatchedHttpClient(openai.DefaultHttpxClient):  # type: ignore[misc, valid-type]
    """The job's HTTP client: the SDK's default, telling :class:`Silence` how each attempt ended (the
    SDK sends each through ``send``; the throttled client's retries are attempts of their own). Closed
    with the client, or when dropped, as the SDK's own is."""

    def __init__(self, silence: Silence, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._silence = silence

    def send(self, *args: Any, **kwargs: Any) -> Any:
        try:
            response = super().send(*args, **kwargs)
        except _TIMEOUTS:
            self._silence.timed_out()
            raise
        self._silence.answered()
        return response

    def __del__(self) -> None:
        if not self.is_closed:
            with contextlib.suppress(Exception):  # at interpreter exit: nothing left to tell
                self.close()


# -- the job ------------------------------------------------------------------------------------


@dataclass
class Stop:
    """Why the job stopped before the end: ``"fatal"`` (an error every request would get: no quota, a
    rejected key, no permission), ``"unanswered"`` (``count`` requests in a row got no answer at all) or
    ``"silent"`` (``count`` attempts in a row timed out, see :class:`Silence`)."""

    reason: str
    result: Optional[Result]  # the line that stopped it; None for "silent" (an attempt, not a line)
    count: int = 1


class _CtrlC:
    """While in use, Ctrl-C sets :attr:`pressed` instead of raising ``KeyboardInterrupt`` wherever the main
    thread happens to be (halfway through writing a result, say): the job checks it between results and
    stops there. A second Ctrl-C raises at once. Only in the main thread, and only where Ctrl-C has
    Python's default behaviour (not ignored, no handler of the application's own)."""

    def __init__(self) -> None:
        self.pressed = threading.Event()
        self._installed = False

    def __enter__(self) -> threading.Event:
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self.pressed

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.pressed.is_set():
            raise KeyboardInterrupt
        self.pressed.set()

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._installed = False


def process(
    client: ThrottledClient,
    items: Iterator[Union[Task, Result]],
    writer: Writer,
    workers: int,
    max_unanswered: int = _DEFAULT_CONNECTION_FAILURES,
    interrupt: Optional[threading.Event] = None,
    silence: Optional[Silence] = None,
) -> Optional[Stop]:
    """Send every task on ``workers`` threads, batching compatible completions lines; results go to
    ``writer`` from this thread only. Returns why the job stopped early, if it did: a fatal result (no
    quota, a rejected key, no permission), ``max_unanswered`` requests in a row (0: no limit) that got
    no answer from the server after their retries (refused or dropped connections, timeouts; a request
    the server answered, even with an error, resets the count), or ``silence`` tripped (attempts in a
    row that timed out). Then nothing more is sent, retries waiting their turn give up, and the lines
    not sent stay undone.
    Ctrl-C (``KeyboardInterrupt``, or ``interrupt`` set) stops at once: finished results are written, the
    requests still on the wire are abandoned to their daemon threads, and ``KeyboardInterrupt`` is
    raised (again)."""
    stop = threading.Event()
    pool = _Pool(workers)
    inflight: Set[Future[List[Any]]] = set()
    groups: Dict[str, List[Task]] = {}  # batches being filled, oldest first
    costs: Dict[str, int] = {}
    targets: Dict[str, BulkTarget] = {}  # by model
    stopped: List[Stop] = []
    unanswered = [0]  # requests in a row, in the order they finished, that got no answer

    def check_interrupt() -> None:
        if interrupt is not None and interrupt.is_set():
            raise KeyboardInterrupt
        if silence is not None and silence.tripped.is_set() and not stopped:
            stopped.append(Stop("silent", None, silence.count))
            stop.set()

    def work(job: Tuple[Callable[[ThrottledClient, Any], List[Result]], Any]) -> List[Result]:
        send, what = job
        if stop.is_set():
            return []  # never sent: the line stays undone
        current.cancel = stop  # lets a worker waiting in the limiter give up when the job stops
        try:
            return send(client, what)
        except Exception as exc:  # a bug or an odd answer: that request's lines fail, the job goes on
            return [task.failed(exc) for task in (what if isinstance(what, list) else [what])]
        finally:
            current.cancel = None

    def take(future: Future[List[Any]]) -> None:
        inflight.discard(future)
        try:
            results = future.result()
        except BaseException:  # the worker was stopped: its lines stay undone
            return
        heard: List[Result] = []  # results that tell whether the server answered
        for result in results:
            if result.unsent:
                continue
            writer.put(result)
            if result.fatal and not stopped:
                stopped.append(Stop("fatal", result))
            if result.answered is not None:
                heard.append(result)
        # One request (a batch: one for all its lines), or a few when a batch was split.
        if any(result.answered for result in heard):
            unanswered[0] = 0
        elif heard:
            unanswered[0] += 1
            if max_unanswered and unanswered[0] >= max_unanswered and not stopped:
                stopped.append(Stop("unanswered", heard[-1], unanswered[0]))
        if stopped:
            stop.set()

    def drain(block: bool) -> None:
        while True:
            check_interrupt()
            done, _ = wait(inflight, timeout=_WAIT_SLICE if block else 0, return_when=FIRST_COMPLETED)
            if done or not block:
                break
        for future in done:
            take(future)

    def submit(send: Callable[[ThrottledClient, Any], List[Result]], what: Any) -> None:
        while len(inflight) >= 2 * workers:  # read ahead no further than the pool can use
            drain(block=True)
        if not stop.is_set():
            inflight.add(pool.submit(work, (send, what)))

    def flush(key: str) -> None:
        costs.pop(key)
        submit(send_batch, groups.pop(key))

    def add(item: Task) -> None:
        key = batch_key(item)
        if key is None:
            submit(send_one, item)
            return
        model = item.request["model"]  # a non-empty str: read_tasks sees to it
        target = targets.get(model)
        if target is None:  # the client's bulk interface: its counter, and where the model's requests wait
            target = targets[model] = client._bulk_target("completions", model, "throttled-openai run")
        cost = estimate_cost("completions", item.request, target.counter)
        burst = target.limiter.token_burst(target.key)
        if key in groups and burst is not None and costs[key] + cost > burst:
            flush(key)
        groups.setdefault(key, []).append(item)
        costs[key] = costs.get(key, 0) + cost
        if len(groups[key]) >= MAX_PROMPTS_PER_COMPLETION:
            flush(key)

    try:
        for item in items:
            check_interrupt()
            if stop.is_set():
                break
            writer.expect(item.line)
            if isinstance(item, Result):
                writer.put(item)
                continue
            try:
                add(item)
            except Exception as exc:  # something about this line: its error, not the job's end
                writer.put(item.failed(exc))
            while groups and item.line - groups[next(iter(groups))][0].line > _HOLD_LINES:
                flush(next(iter(groups)))
            drain(block=False)
        while groups and not stop.is_set():
            flush(next(iter(groups)))
        while inflight:
            drain(block=True)
    except KeyboardInterrupt:
        stop.set()
        for future in list(inflight):
            if future.done():
                take(future)
        raise
    finally:
        stop.set()
        for future in inflight:
            future.cancel()
        pool.shutdown()
        writer.flush()
    return stopped[0] if stopped else None


@dataclass(frozen=True)
class Options:
    """The ``run`` command's arguments; see :func:`add_arguments` for their meaning."""

    input: str
    output: str
    model: Optional[str] = None
    rpm: Optional[float] = None
    tpm: Optional[float] = None
    endpoint: Optional[str] = None
    ordered: bool = False
    format: str = "native"
    retry_failed: bool = False
    max_workers: int = _DEFAULT_WORKERS
    progress: bool = True
    api_key: Optional[str] = None
    base_url: Optional[str] = None
    max_connection_failures: int = _DEFAULT_CONNECTION_FAILURES
    timeout: float = _DEFAULT_TIMEOUT
    batch_api: bool = False  # the Batch API route (batch_run.py); the options below are its own
    queue_tokens: Optional[int] = None
    fallback: str = "batch"
    cancel: bool = False
    poll_interval: float = 5.0
    max_poll_interval: float = 60.0


@dataclass
class Prepared:
    """A job ready to run, on either route: its output and what it holds, the input's scan, the client."""

    output: Output
    state: Dict[int, Optional[str]]  # line → None (done) or its error type: what the output holds
    scan: InputScan
    redo: Set[int]  # lines with a failed result to run again (--retry-failed)
    client: ThrottledClient
    resumed: bool
    started: float
    earlier: int  # lines a result from an earlier run stands for
    silence: Silence  # the client's attempts that timed out in a row

    def skip(self, line: int) -> bool:
        """The line has a result that stands: it is not sent."""
        return line in self.state and line not in self.redo


def run(options: Options) -> int:
    """Run the job; return the exit code: 0 every line has a response, 1 some failed (or the job stopped
    early: an error every request would get, or a server that does not answer), 130 Ctrl-C. Raises
    :class:`UsageError` before anything is sent when the input or the output cannot be used."""
    job = prepare(options)
    if isinstance(job, int):
        return job
    if options.batch_api:
        from .batch_run import run_batch

        return run_batch(options, job)
    return _run_sync(options, job)


def prepare(options: Options) -> Union[Prepared, int]:
    """Read the output and scan the input, make the client, open the output for appending; the exit code
    instead when the input holds no request (an empty output is written). Raises :class:`UsageError`."""
    started = time.monotonic()
    output = Output(options.output, options.format)
    try:
        state = output.load()
    except OSError as exc:
        raise UsageError(f"cannot read the output {options.output}: {_reason(exc)}") from None
    try:
        scan = scan_input(options.input, state, output.hashes)
    except OSError as exc:
        raise UsageError(f"cannot read the input {options.input}: {_reason(exc)}") from None
    resumed = bool(state)
    for line in scan.changed | scan.orphans:  # no result stands for these lines now
        del state[line]
    if scan.changed:
        output.untidy = True  # their old records go when compaction keeps each line's last
    redo = {line for line, error in state.items() if error is not None} if options.retry_failed else set()
    silence = Silence(options.max_connection_failures)
    client = ThrottledClient(
        api_key=options.api_key,
        base_url=options.base_url,
        rpm=options.rpm,
        tpm=options.tpm,
        timeout=openai.Timeout(options.timeout, connect=min(options.timeout, _CONNECT_TIMEOUT)),
        http_client=_WatchedHttpClient(silence),
    )
    try:
        output.open_files()
    except OSError as exc:
        raise UsageError(f"cannot write the output {options.output}: {_reason(exc)}") from None
    if scan.records == 0:
        output.close()
        notes = [f"throttled-openai run: no requests in {options.input} (0 records): nothing was sent"]
        if not scan.orphans:
            notes.append(f"  wrote an empty {options.output}")
        notes.extend(_scan_notes(options, scan, state))
        print("\n".join(notes), file=sys.stderr)
        return 0
    return Prepared(output, state, scan, redo, client, resumed, started, len(state) - len(redo), silence)


def _run_sync(options: Options, job: Prepared) -> int:
    """The ordinary route: every request through the throttled client, on ``max_workers`` threads."""
    output, state, scan, client = job.output, job.state, job.scan, job.client
    progress = _progress_bar(scan.records, job.earlier) if options.progress else None
    writer = Writer(output, options.ordered, state, progress)
    items = read_tasks(options.input, job.skip, options.endpoint, options.model)
    interrupted = False
    stopped: Optional[Stop] = None
    with _CtrlC() as pressed:  # from here on, Ctrl-C never lands halfway through writing a result
        try:
            stopped = process(
                client,
                items,
                writer,
                options.max_workers,
                options.max_connection_failures,
                interrupt=pressed,
                silence=job.silence,
            )
        except KeyboardInterrupt:
            interrupted = True
        finally:
            output.close()
            if progress is not None:
                progress.close()
        if not interrupted and (output.untidy or (options.ordered and job.resumed and writer.written)):
            output.compact()
        _summary(options, writer, client, job, interrupted)
        if stopped is not None:
            print(_stop_notice(stopped, client, options.timeout), file=sys.stderr)
            return 1
    if interrupted:
        return 130
    return 1 if any(error is not None for error in state.values()) else 0


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _progress_bar(total: int, initial: int) -> Any:
    """A tqdm bar on stderr (shown on a terminal only), or ``None`` when tqdm is not installed. ``total``
    counts the input's requests (its non-blank lines), ``initial`` those a result from an earlier run
    stands for."""
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="line", file=sys.stderr, disable=None, dynamic_ncols=True)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _scan_notes(options: Options, scan: InputScan, state: Dict[int, Optional[str]]) -> List[str]:
    """Summary lines about how the input compares with the results of earlier runs."""
    notes = []
    if scan.changed:
        redone = sum(1 for line in scan.changed if line in state)
        left = len(scan.changed) - redone
        outcome = "redone" if not left else f"{redone} redone, {left} left for a rerun"
        notes.append(f"  {_plural(len(scan.changed), 'line')} changed since the last run: {outcome}")
    if scan.orphans:
        shown = sorted(scan.orphans)
        listed = ", ".join(str(line) for line in shown[:5]) + (", ..." if len(shown) > 5 else "")
        notes.append(
            f"  {_plural(len(shown), 'result')} in {options.output} for lines the input no longer has "
            f"({listed}): kept, not counted"
        )
    return notes


def _summary(
    options: Options,
    writer: Writer,
    client: ThrottledClient,
    job: Prepared,
    interrupted: bool,
    extra: Sequence[str] = (),
) -> None:
    """Print what happened on stderr: results, failures by reason, tokens, 429s, time, changed lines."""
    state, scan, earlier, seconds = writer.state, job.scan, job.earlier, time.monotonic() - job.started
    failed = Counter(error for error in state.values() if error is not None)
    stats = client.stats()
    reasons = ", ".join(f"{reason} {count}" for reason, count in failed.most_common()) or "none"
    lines = [
        f"throttled-openai run: {'interrupted, ' if interrupted else ''}{len(state)} of {scan.records} lines have "
        f"a result in {options.output} ({writer.written} written now, {earlier} from earlier runs)",
        f"  done {len(state) - sum(failed.values())}, failed {sum(failed.values())} ({reasons})",
        f"  tokens used {writer.tokens} (the results' usage), HTTP requests {stats.requests}, "
        f"429s {stats.total_429s}, time {seconds:.1f} s",
        *extra,
        *_scan_notes(options, scan, state),
    ]
    if failed and not options.retry_failed:
        lines.append("  rerun with --retry-failed to retry the failed lines")
    if interrupted:
        lines.append("  rerun the same command to finish: lines already written are skipped")
    print("\n".join(lines), file=sys.stderr)


def _stop_notice(stop: Stop, client: ThrottledClient, timeout: float) -> str:
    """Why the job stopped early, and what to do (after the summary)."""
    retry = " rerun with --retry-failed: the lines that got this error are retried and the rest is done."
    url = client.base_url  # scheme, host and port: what a connection needs (never a password, path or query)
    where = f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"
    if stop.result is None:  # "silent": attempts, not lines
        return (
            f"throttled-openai run: stopped after {stop.count} attempts in a row got no answer from {where}"
            f" within --timeout {timeout:g} s\n"
            "  the server accepts connections but does not answer (a black-holed address or proxy), or takes"
            " longer than --timeout, so the remaining lines were not sent.\n"
            "  Check --base-url and the network (or give a longer --timeout), then rerun the same command: the"
            " lines not sent are done (and with --retry-failed, any that failed)."
        )
    error = stop.result.error or {"type": "error", "message": ""}
    if stop.reason == "fatal":
        return (
            f"throttled-openai run: stopped at line {stop.result.line}: {error['message']}\n"
            f"  every further request would fail the same way ({error['type']}), so the remaining lines"
            f" were not sent.\n  Fix it, then{retry}"
        )
    return (
        f"throttled-openai run: stopped after {stop.count} requests in a row got no answer from {where}"
        f" (the last, line {stop.result.line}: {error['message']})\n"
        "  the server refuses or drops the connections, or does not answer, so the remaining lines were not"
        f" sent.\n  Check --base-url and the network, then{retry}"
    )


# -- command line -------------------------------------------------------------------------------

#: The ``run`` command's description in ``--help``: plain text (the module docstring is reST).
DESCRIPTION = f"""\
Run a JSONL file of OpenAI API requests under the rate limits, and write one
result per request.

The input is the OpenAI Cookbook's api_request_parallel_processor.py format:
one request body per line, with an optional "metadata" that is copied to the
result. The endpoint comes from the body ("prompt": completions, "messages":
chat, "input": embeddings) unless --endpoint says. Single-prompt completions
lines that differ only in their prompt share a request (20 at most).

Each result is written as soon as it is known. Rerun the same command after a
crash or Ctrl-C: lines that already have a result are skipped, lines that
changed since that result was made are redone, and with --retry-failed the
lines that failed are redone too.

The job stops early, leaving the rest for a rerun, on an error every request
would get (no quota left, a rejected key, no permission), and when the server
does not answer: --max-connection-failures requests in a row (default {_DEFAULT_CONNECTION_FAILURES})
get no answer at all after their retries, or as many attempts in a row get
none within --timeout (default {_DEFAULT_TIMEOUT:g} s). A server that accepts connections
and never answers (a black-holed proxy) stops the job after about
--max-connection-failures timeouts.

With --batch-api the same job goes through OpenAI's Batch API: half the
price, its own limit pool, results within 24 hours. Batches are submitted as
the model's batch queue allows, polled, and their results written as they
come. Ctrl-C leaves the batches running: rerun the same command to collect
them (the job is kept in OUTPUT.batch.json), or add --cancel to cancel them.

Exit codes: 0 every line has a response; 1 some line failed, or the job
stopped early; 2 usage error (nothing was sent); 130 interrupted (Ctrl-C).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``run`` command's arguments."""
    parser.add_argument("input", help="JSONL file, one request body per line (the Cookbook's format)")
    parser.add_argument("-o", "--output", required=True, help="JSONL file of results; rerunning resumes it")
    parser.add_argument("--model", help="model for lines that name none")
    parser.add_argument("--rpm", type=float, help="requests per minute (default: learned from the headers)")
    parser.add_argument("--tpm", type=float, help="tokens per minute (default: learned from the headers)")
    parser.add_argument("--endpoint", choices=sorted(PATHS), help="endpoint of every line (default: from the body)")
    parser.add_argument("--ordered", action="store_true", help="write results in input order")
    parser.add_argument(
        "--format",
        choices=("native", "cookbook"),
        default="native",
        help="native: {line, line_hash, request, response|error, metadata}; cookbook: [request, response, "
        "metadata], with line numbers in OUTPUT.lines and hashes in OUTPUT.hashes",
    )
    parser.add_argument("--retry-failed", action="store_true", help="also rerun lines whose result is an error")
    parser.add_argument(
        "--max-workers", type=int, default=_DEFAULT_WORKERS, help=f"requests in flight (default {_DEFAULT_WORKERS})"
    )
    parser.add_argument(
        "--max-connection-failures",
        type=int,
        default=_DEFAULT_CONNECTION_FAILURES,
        metavar="N",
        help="stop after N requests in a row got no answer from the server, after their retries (connection"
        " refused or dropped, timeouts), or after N attempts in a row (retries included) got none within"
        f" --timeout; any answer resets both counts (default {_DEFAULT_CONNECTION_FAILURES}; 0: never stop)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=_DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="seconds an attempt waits for the server before it is given up and retried: to connect"
        f" ({_CONNECT_TIMEOUT:g} at most), then for each part of the answer (default {_DEFAULT_TIMEOUT:g}). A"
        " request that is not streamed gets its answer whole, once generated: allow for the longest, as an"
        " attempt given up may be billed all the same",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    batch = parser.add_argument_group(
        "Batch API route", "send the job as OpenAI batches: half the price, results within 24 hours"
    )
    batch.add_argument(
        "--batch-api",
        action="store_true",
        help="run the job through the Batch API; its state is kept in OUTPUT.batch.json, and rerunning the same"
        " command collects the batches already created",
    )
    batch.add_argument(
        "--queue-tokens",
        type=int,
        metavar="N",
        help="each model's batch queue limit, in enqueued input tokens (default: learned when the queue refuses a"
        " batch)",
    )
    batch.add_argument(
        "--fallback",
        choices=("batch", "sync"),
        default="batch",
        help="requests that expired or failed on the server's side: sent again in a new batch (default), or at"
        " once through the rate-limited client at full price (sync)",
    )
    batch.add_argument(
        "--cancel", action="store_true", help="cancel the job's running batches and collect what finished"
    )
    batch.add_argument(
        "--poll-interval",
        type=float,
        metavar="S",
        help="seconds between polls at first; it grows by half while nothing changes (default 5)",
    )
    batch.add_argument("--max-poll-interval", type=float, metavar="S", help="longest wait between polls (default 60)")
    parser.add_argument("--api-key", help="API key (default: $OPENAI_API_KEY); never printed or written")
    parser.add_argument("--base-url", help="API base URL (default: $OPENAI_BASE_URL, else OpenAI's)")


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``run`` to an ``add_subparsers()`` object (``__main__`` uses this)."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "run",
        help="run a JSONL file of requests under the rate limits, resumably",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run_parser=parser)
    return parser


def batch_state_path(output: str) -> str:
    """Where ``--batch-api`` keeps the job of ``output``: ``OUTPUT.batch.json`` (and a folder beside it)."""
    return output + ".batch.json"


def _check_input(path: str) -> None:
    if os.path.isdir(path):
        raise UsageError(f"the input is a directory, not a file: {path}")
    if not os.path.exists(path):
        raise UsageError(f"input file not found: {path}")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot read the input {path}: {_reason(exc)}") from None


def _check_output(path: str, input_path: str) -> None:
    if os.path.isdir(path):
        example = os.path.join(path, "results.jsonl")
        raise UsageError(f"the output is a directory: {path} (give a file name, such as {example})")
    folder = os.path.dirname(path) or os.curdir
    if not os.path.isdir(folder):
        problem = "is a file" if os.path.exists(folder) else "does not exist"
        raise UsageError(f"the output's directory {problem}: {folder}")
    if os.path.abspath(input_path) == os.path.abspath(path) or (
        os.path.exists(path) and os.path.samefile(input_path, path)
    ):
        raise UsageError("the output must not be the input file")


def options_from(args: argparse.Namespace) -> Options:
    """Checked :class:`Options` from parsed arguments; raises :class:`UsageError`."""
    _check_input(args.input)
    _check_output(args.output, args.input)
    for name in ("rpm", "tpm"):
        value = getattr(args, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UsageError(f"--{name} must be a finite number > 0")
    if args.max_workers < 1:
        raise UsageError("--max-workers must be >= 1")
    if args.max_connection_failures < 0:
        raise UsageError("--max-connection-failures must be >= 0")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise UsageError("--timeout must be a finite number of seconds > 0")
    batch_only = (args.cancel, args.queue_tokens, args.fallback != "batch", args.poll_interval, args.max_poll_interval)
    if any(value not in (None, False) for value in batch_only) and not args.batch_api:
        raise UsageError("--cancel, --queue-tokens, --fallback and the poll intervals go with --batch-api")
    if args.cancel and not os.path.exists(batch_state_path(args.output)):
        raise UsageError(f"no batch job to cancel: {batch_state_path(args.output)} does not exist")
    if args.queue_tokens is not None and args.queue_tokens < 1:
        raise UsageError("--queue-tokens must be >= 1")
    poll = 5.0 if args.poll_interval is None else args.poll_interval
    longest = max(60.0, poll) if args.max_poll_interval is None else args.max_poll_interval
    if not (poll > 0 and math.isfinite(poll)):
        raise UsageError("--poll-interval must be a finite number > 0")
    if not (longest >= poll and math.isfinite(longest)):
        raise UsageError("--max-poll-interval must be a finite number >= --poll-interval")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if not api_key:
        raise UsageError("no API key: set OPENAI_API_KEY or pass --api-key")
    return Options(
        input=args.input,
        output=args.output,
        model=args.model,
        rpm=args.rpm,
        tpm=args.tpm,
        endpoint=args.endpoint,
        ordered=args.ordered,
        format=args.format,
        retry_failed=args.retry_failed,
        max_workers=args.max_workers,
        progress=not args.no_progress,
        api_key=api_key,
        base_url=args.base_url or os.environ.get("OPENAI_BASE_URL") or None,
        max_connection_failures=args.max_connection_failures,
        timeout=args.timeout,
        batch_api=args.batch_api,
        queue_tokens=args.queue_tokens,
        fallback=args.fallback,
        cancel=args.cancel,
        poll_interval=poll,
        max_poll_interval=longest,
    )


def execute(args: argparse.Namespace) -> int:
    """Run from parsed arguments. A usage error exits with code 2 and one line on stderr, before anything
    is sent; Ctrl-C outside the job itself (reading a large input or output first) returns 130."""
    parser: argparse.ArgumentParser = args.run_parser
    try:
        return run(options_from(args))
    except UsageError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m throttled_openai.cli INPUT -o OUTPUT ...``: the ``run`` command on its own."""
    parser = argparse.ArgumentParser(
        prog="throttled-openai run", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    parser.set_defaults(run_parser=parser)
    return execute(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
