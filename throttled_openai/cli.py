"""``throttled-openai run``: a JSONL file of API requests in, a JSONL file of results out.

Reads the OpenAI Cookbook's ``api_request_parallel_processor.py`` input as is: one request body per
line, an optional ``"metadata"`` passed through. The endpoint comes from the body (``prompt`` →
completions, ``messages`` → chat, ``input`` → embeddings) unless ``--endpoint`` says. Every request
goes through one :class:`ThrottledClient`, so the job runs at the limits and no faster.

How it stays correct when killed:

- Each result is appended to the output as one line, flushed as soon as it is known. A rerun reads the
  output, cuts off a torn last line (a crash mid-write) and skips every input line that has a result;
  ``--retry-failed`` also reruns the lines whose result is an error. When a line ends up with more than
  one record (a retried failure), the output is rewritten with one record per line, the last, in line
  order, through a temporary file and ``os.replace`` so a crash leaves the old or the new file.
- The native format carries its line number; the Cookbook's ``[request, response, metadata]`` arrays do
  not, so ``--format cookbook`` keeps the line numbers in a side file, ``<output>.lines``. Compaction
  first writes the new numbers to ``<output>.lines.next`` with the new output's size and CRC, then
  replaces the output, then the side file; a rerun adopts a ``.lines.next`` only if the output matches it.
- An error every later request would get too (no quota left, a rejected key, no permission) stops the
  job: nothing more is sent, the lines not sent stay undone, and the exit code is 1. Ctrl-C stops at
  once (requests on the wire are abandoned), with exit code 130; a rerun continues either way.

Single-prompt completions lines whose bodies differ only in ``prompt`` share one request (up to 20
prompts, within the token burst the limiter allows); their answers are matched back by ``index``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
import zlib
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import openai

from .batching import MAX_PROMPTS_PER_COMPLETION
from .client import ThrottledClient, _current
from .errors import Cancelled
from .mapping import _about_one_input, _is_fatal, _Pool
from .retry import Retry
from .tokens import estimate_cost

__all__ = ["add_parser", "execute", "main"]

#: API path of each endpoint a line may target.
PATHS = {"completions": "/completions", "chat": "/chat/completions", "embeddings": "/embeddings"}
# Body field that tells the endpoint, in the order they are tried.
_SHAPES = (("prompt", "completions"), ("messages", "chat"), ("input", "embeddings"))
# Lines a completions line may wait, unsent, for compatible lines to share its request.
_HOLD_LINES = 1000
_DEFAULT_WORKERS = 32
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

    def done(self, response: Dict[str, Any], batch: Optional[List[int]] = None) -> Result:
        return Result(self.line, self.request, self.metadata, self.has_metadata, response=response, batch=batch)

    def failed(self, error: BaseException) -> Result:
        result = Result(self.line, self.request, self.metadata, self.has_metadata, error=_describe(error))
        result.fatal = _is_fatal(error)
        result.unsent = isinstance(error, Cancelled)
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

    def encode(self, fmt: str) -> bytes:
        """The output line, ``\\n`` included."""
        try:
            return _encode(self._record(fmt))
        except (TypeError, ValueError) as exc:  # cannot happen with JSON data; never lose the line
            return _encode(Result(self.line, repr(self.request), error=_describe(exc))._record(fmt))

    def _record(self, fmt: str) -> Any:
        record: Any
        if fmt == "cookbook":  # [request, response or [error message], metadata?]
            outcome = self.response if self.error is None else [self.error["message"]]
            record = [self.request, outcome, self.metadata] if self.has_metadata else [self.request, outcome]
        else:
            record = {"line": self.line, "request": self.request}
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


def _bad_line(line: int, request: Any, kind: str, message: str) -> Result:
    return Result(line, request, error={"type": kind, "message": f"line {line}: {message}"})


# -- reading the input --------------------------------------------------------------------------


def read_tasks(
    path: str, skip: Callable[[int], bool], endpoint: Optional[str], model: Optional[str]
) -> Iterator[Union[Task, Result]]:
    """Stream the input: a :class:`Task` per line to send, a :class:`Result` per bad line. Lines are
    numbered from 1 as in an editor; blank lines are not requests and get no result."""
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if raw.strip() and not skip(number):
                yield _parse(number, raw, endpoint, model)


def _parse(number: int, raw: bytes, endpoint: Optional[str], model: Optional[str]) -> Union[Task, Result]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return _bad_line(number, raw.decode("utf-8", "replace").rstrip("\r\n"), "invalid_json", str(exc))
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
    cancel = getattr(_current, "cancel", None)
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
        self.next_path = path + ".lines.next"  # compaction's new line numbers, until both files are in
        self.untidy = False  # a line has several records, or a record is unreadable
        self._out: Optional[BinaryIO] = None
        self._index: Optional[BinaryIO] = None

    def load(self) -> Dict[int, Optional[str]]:
        """Line → ``None`` (done) or its error type, last record winning; cuts off torn last lines."""
        state: Dict[int, Optional[str]] = {}
        self._recover()
        for line, record in self._records():
            if line in state:
                self.untidy = True
            state[line] = _error_type(record)
        return state

    def _recover(self) -> None:
        """Finish or undo a compaction a crash interrupted: a ``.lines.next`` made for the output that
        is now in place (same size and CRC) becomes the side file; one made for an output that never
        got in place is dropped, the old output and side file still belonging together."""
        leftovers = [self.path + ".tmp", self.next_path + ".tmp"]
        if self.index_path is not None:
            leftovers.append(self.index_path + ".tmp")
        for leftover in leftovers:
            if os.path.exists(leftover):
                os.remove(leftover)
        if self.index_path is None or not os.path.exists(self.next_path):
            return
        with open(self.next_path, "rb") as file:
            header, _, numbers = file.read().partition(b"\n")
        if os.path.exists(self.path) and header == _signature(self.path):
            _replace(self.index_path, iter([numbers]))
        os.remove(self.next_path)

    def _records(self) -> Iterator[Tuple[int, Any]]:
        if not os.path.exists(self.path):
            return
        numbers: Optional[List[int]] = None
        if self.index_path is not None:
            if not os.path.exists(self.index_path) and os.path.getsize(self.path):
                raise UsageError(f"{self.path} was not written with --format cookbook (no {self.index_path})")
            raw = _complete_lines(self.index_path) if os.path.exists(self.index_path) else []
            numbers = [int(number) for _, number in raw]
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
            line = numbers[k] if numbers is not None else record.get("line") if isinstance(record, dict) else None
            if isinstance(line, int):
                yield line, record
            else:
                self.untidy = True

    def append(self, result: Result) -> None:
        if self._out is None:
            self._out = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
            if self.index_path is not None:
                self._index = open(self.index_path, "ab", buffering=0)  # noqa: SIM115
        _write_all(self._out, result.encode(self.fmt))
        if self._index is not None:
            _write_all(self._index, b"%d\n" % result.line)

    def close(self) -> None:
        for file in (self._out, self._index):
            if file is not None:
                file.close()
        self._out = self._index = None

    def compact(self) -> None:
        """Rewrite with one record per line (the last), in line order; a crash at any point leaves
        the old pair or the new one (see :meth:`_recover`)."""
        self.close()
        last: Dict[int, bytes] = {}
        for line, record in self._records():
            last[line] = _encode(record)
        lines = sorted(last)
        if self.index_path is None:
            _replace(self.path, (last[line] for line in lines))
        else:
            temporary = _write_synced(self.path + ".tmp", (last[line] for line in lines))
            numbers = b"".join(b"%d\n" % line for line in lines)
            _replace(self.next_path, iter([_signature(temporary) + b"\n", numbers]))
            os.replace(temporary, self.path)
            _replace(self.index_path, iter([numbers]))
            os.remove(self.next_path)
        self.untidy = False


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
        if self.progress is not None:
            self.progress.update(1)


# -- the job ------------------------------------------------------------------------------------


def process(
    client: ThrottledClient, items: Iterator[Union[Task, Result]], writer: Writer, workers: int
) -> Optional[Result]:
    """Send every task on ``workers`` threads, batching compatible completions lines; results go to
    ``writer`` from this thread only. Returns the first fatal result (no quota, a rejected key, no
    permission) if one stopped the job: then nothing more is sent and the lines not sent stay undone.
    Ctrl-C (``KeyboardInterrupt``) stops at once: finished results are written, the requests still on the
    wire are abandoned to their daemon threads, and the interrupt is raised again."""
    stop = threading.Event()
    pool = _Pool(workers)
    inflight: Set[Future[List[Any]]] = set()
    groups: Dict[str, List[Task]] = {}  # batches being filled, oldest first
    costs: Dict[str, int] = {}
    fatal: List[Result] = []

    def work(job: Tuple[Callable[[ThrottledClient, Any], List[Result]], Any]) -> List[Result]:
        send, what = job
        if stop.is_set():
            return []  # never sent: the line stays undone
        _current.cancel = stop  # lets a worker waiting in the limiter give up when the job stops
        try:
            return send(client, what)
        except Exception as exc:  # a bug or an odd answer: that request's lines fail, the job goes on
            return [task.failed(exc) for task in (what if isinstance(what, list) else [what])]
        finally:
            _current.cancel = None

    def take(future: Future[List[Any]]) -> None:
        inflight.discard(future)
        try:
            results = future.result()
        except BaseException:  # the worker was stopped: its lines stay undone
            return
        for result in results:
            if result.unsent:
                continue
            writer.put(result)
            if result.fatal and not fatal:
                fatal.append(result)
                stop.set()

    def drain(block: bool) -> None:
        while True:
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
        cost = estimate_cost("completions", item.request, client._counter)
        burst = client.limiter.token_burst((client._account, client._limit_model(item.request)))
        if key in groups and burst is not None and costs[key] + cost > burst:
            flush(key)
        groups.setdefault(key, []).append(item)
        costs[key] = costs.get(key, 0) + cost
        if len(groups[key]) >= MAX_PROMPTS_PER_COMPLETION:
            flush(key)

    try:
        for item in items:
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
    return fatal[0] if fatal else None


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


def run(options: Options) -> int:
    """Run the job; return the exit code: 0 every line has a response, 1 some failed (or an error every
    request would get stopped the job), 130 Ctrl-C."""
    started = time.monotonic()
    output = Output(options.output, options.format)
    state = output.load()
    resumed = bool(state)
    redo = {line for line, error in state.items() if error is not None} if options.retry_failed else set()

    def skip(line: int) -> bool:
        return line in state and line not in redo

    client = ThrottledClient(api_key=options.api_key, base_url=options.base_url, rpm=options.rpm, tpm=options.tpm)
    earlier = len(state) - len(redo)  # lines a result from an earlier run stands for
    progress = _progress_bar(options, earlier) if options.progress else None
    writer = Writer(output, options.ordered, state, progress)
    items = read_tasks(options.input, skip, options.endpoint, options.model)
    interrupted = False
    fatal: Optional[Result] = None
    try:
        fatal = process(client, items, writer, options.max_workers)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        output.close()
        if progress is not None:
            progress.close()
    if not interrupted and (output.untidy or (options.ordered and resumed and writer.written)):
        output.compact()
    _summary(options, writer, client, earlier, time.monotonic() - started, interrupted)
    if fatal is not None and fatal.error is not None:
        print(
            f"throttled-openai run: stopped at line {fatal.line}: {fatal.error['message']}\n"
            f"  every further request would fail the same way ({fatal.error['type']}), so the remaining lines"
            " were not sent.\n  Fix it, then rerun with --retry-failed: the lines that got this error are"
            " retried and the rest is done.",
            file=sys.stderr,
        )
        return 1
    if interrupted:
        return 130
    return 1 if any(error is not None for error in state.values()) else 0


def _progress_bar(options: Options, initial: int) -> Any:
    """A tqdm bar on stderr (shown on a terminal only), or ``None`` when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return None
    with open(options.input, "rb") as file:
        total = sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))
    return tqdm(total=total, initial=initial, unit="line", file=sys.stderr, disable=None, dynamic_ncols=True)


def _summary(
    options: Options, writer: Writer, client: ThrottledClient, earlier: int, seconds: float, interrupted: bool
) -> None:
    """Print what happened on stderr: results, failures by reason, tokens, 429s, time."""
    state = writer.state
    failed = Counter(error for error in state.values() if error is not None)
    stats = client.stats()
    reasons = ", ".join(f"{reason} {count}" for reason, count in failed.most_common()) or "none"
    lines = [
        f"throttled-openai run: {'interrupted, ' if interrupted else ''}{len(state)} lines have a result in "
        f"{options.output} ({writer.written} written now, {earlier} from earlier runs)",
        f"  done {len(state) - sum(failed.values())}, failed {sum(failed.values())} ({reasons})",
        f"  tokens used {stats.tokens_used}, HTTP requests {stats.requests}, 429s {stats.total_429s}, "
        f"time {seconds:.1f} s",
    ]
    if failed and not options.retry_failed:
        lines.append("  rerun with --retry-failed to retry the failed lines")
    if interrupted:
        lines.append("  rerun the same command to finish: lines already written are skipped")
    print("\n".join(lines), file=sys.stderr)


# -- command line -------------------------------------------------------------------------------


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
        help="native: {line, request, response|error, metadata}; cookbook: [request, response, metadata]",
    )
    parser.add_argument("--retry-failed", action="store_true", help="also rerun lines whose result is an error")
    parser.add_argument(
        "--max-workers", type=int, default=_DEFAULT_WORKERS, help=f"requests in flight (default {_DEFAULT_WORKERS})"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--api-key", help="API key (default: $OPENAI_API_KEY); never printed or written")
    parser.add_argument("--base-url", help="API base URL (default: $OPENAI_BASE_URL, else OpenAI's)")


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``run`` to an ``add_subparsers()`` object (``__main__`` uses this)."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "run", help="run a JSONL file of requests under the rate limits, resumably", description=__doc__
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_arguments(parser)
    parser.set_defaults(run_parser=parser)
    return parser


def options_from(args: argparse.Namespace) -> Options:
    """Checked :class:`Options` from parsed arguments; raises :class:`UsageError`."""
    if not os.path.isfile(args.input):
        raise UsageError(f"input file not found: {args.input}")
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise UsageError("the output must not be the input file")
    for name in ("rpm", "tpm"):
        value = getattr(args, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UsageError(f"--{name} must be a finite number > 0")
    if args.max_workers < 1:
        raise UsageError("--max-workers must be >= 1")
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
    )


def execute(args: argparse.Namespace) -> int:
    """Run from parsed arguments; a usage error exits with code 2 through the parser."""
    parser: argparse.ArgumentParser = args.run_parser
    try:
        return run(options_from(args))
    except UsageError as exc:
        parser.error(str(exc))  # exits with code 2
        raise  # unreachable


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m throttled_openai.cli INPUT -o OUTPUT ...``: the ``run`` command on its own."""
    parser = argparse.ArgumentParser(
        prog="throttled-openai run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    parser.set_defaults(run_parser=parser)
    return execute(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
