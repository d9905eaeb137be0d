"""``throttled-openai run --batch-api``: the same job as ``run``, sent through OpenAI's Batch API.

Same input, same output (``--ordered`` and ``--format cookbook`` included), same summary and exit
codes; half the price, its own limit pool, results within 24 hours. The lines go into batch input
files by endpoint and model (single-prompt completions lines that differ only in their prompt share a
request, 20 at most); a :class:`~throttled_openai.batch_api.BatchJob` keeps the job in
``<output>.batch.json`` (and the folder ``<output>.batch.json.d/``) beside the output, so a rerun after
a crash or Ctrl-C picks up the batches already created instead of submitting them again. Each settled
batch's results are appended to the output as they come; a rerun skips lines that have one, as ``run``
does, and plans the lines no batch covers into new batches.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import openai

from . import batch_api
from .batch_api import BatchJob, KeyResult
from .batching import MAX_PROMPTS_PER_COMPLETION
from .cli import (
    _HOLD_LINES,
    LineHashes,
    Options,
    Prepared,
    Result,
    Task,
    UsageError,
    Writer,
    _hash_value,
    _progress_bar,
    _summary,
    batch_key,
    batch_state_path,
    read_tasks,
)

__all__ = ["run_batch"]


def run_batch(options: Options, job: Prepared) -> int:
    """Run the job through the Batch API; the exit code as :func:`throttled_openai.cli.run` gives it."""
    output, state, client = job.output, job.state, job.client
    batch = BatchJob(
        client,
        batch_state_path(options.output),
        poll_interval=options.poll_interval,
        max_poll_interval=options.max_poll_interval,
        queue_tokens=options.queue_tokens,
        fallback=options.fallback,
        max_workers=options.max_workers,
    )
    try:
        with batch._exclusive():
            existed = batch._load()
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot use the batch job {batch.state_path}: {exc}") from None
    if options.cancel and not existed:
        raise UsageError(f"no batch job to cancel: {batch.state_path} does not exist")
    if not existed:
        batch._new("requests", None)
    progress = _progress_bar(job.scan.records, job.earlier) if options.progress else None
    writer = Writer(output, False, state, progress)
    current = LineHashes()  # each input line's hash now: a result made for another version is not written
    batch.on_results = lambda chunk, results: _deliver(results, writer, current)
    batch._keep_results = False  # the output holds them
    interrupted = False
    stopped: Optional[BaseException] = None
    try:
        with batch._exclusive():
            pending = _pending_lines(batch)
            if options.cancel:
                for task in read_tasks(options.input, job.skip, options.endpoint, options.model):
                    current.set(task.line, task.digest)
                batch.cancel()
            else:
                batch._state["cancelled"] = False
                batch._plan(_requests(options, job, pending, writer, current))
            batch.wait(progress=lambda _: _show(progress, batch, writer, job))
    except KeyboardInterrupt:
        interrupted = True
    except openai.OpenAIError as error:  # no quota, a rejected key, a service down for longer than the retries
        stopped = error
    except RuntimeError as error:  # another process runs this job
        raise UsageError(str(error)) from None
    finally:
        output.close()
        if progress is not None:
            progress.close()
    if not interrupted and stopped is None and (output.untidy or options.ordered):
        output.compact()
    chunks = batch._chunks
    batches = sum(chunk.attempt for chunk in chunks)
    extra = [
        f"  Batch API: {batches} batches for {len(chunks)} chunks ({batch.status_line()}); its tokens are billed at"
        " half price"
    ]
    if interrupted:
        extra.append(
            f"  the batches keep running on OpenAI's side: rerun the same command to collect them, or add --cancel to"
            f" cancel them (the job: {batch.state_path})"
        )
    _summary(options, writer, client, job, interrupted, extra)
    if stopped is not None:
        print(
            f"throttled-openai run: stopped: {stopped}\n  the batches already created keep running; fix it, then rerun"
            " the same command to collect them and submit the rest",
            file=sys.stderr,
        )
        return 1
    if interrupted:
        return 130
    if options.cancel:
        return 1 if len(state) < job.scan.records or any(e is not None for e in state.values()) else 0
    return 1 if any(error is not None for error in state.values()) else 0


def _show(progress: Any, batch: BatchJob, writer: Writer, job: Prepared) -> None:
    if progress is None:
        return
    running = sum(chunk.keys * chunk.finished // chunk.requests for chunk in batch._chunks if chunk.phase != "done")
    progress.n = min(job.scan.records, len(writer.state) + running)
    progress.set_postfix_str(batch.status_line(), refresh=False)
    progress.refresh()


def _pending_lines(batch: BatchJob) -> Dict[int, int]:
    """Line → the hash (as :func:`~throttled_openai.cli._hash_value`) of the version a chunk not yet
    settled holds a request for."""
    lines: Dict[int, int] = {}
    for chunk in batch._chunks:
        if chunk.phase != "done":
            with open(batch._store.file(chunk.n, "keys"), "rb") as keys:
                for raw in keys:
                    _, numbers, notes = json.loads(raw)
                    for line, note in zip(numbers, notes or [None] * len(numbers)):
                        lines[line] = _hash_value(note[0] if isinstance(note, list) else None)
    return lines


def _requests(
    options: Options, job: Prepared, pending: Dict[int, int], writer: Writer, current: LineHashes
) -> Iterator[batch_api.Planned]:
    """The input's lines to send, as Batch API requests: ``(url, body, lines, notes)``, but for lines a
    pending request stands for (made for this very version of the line); a bad line's error result goes
    straight to the output. Records each line's hash in ``current``. Compatible single-prompt
    completions lines share a request (up to 20, within ``_HOLD_LINES`` lines of the first)."""
    groups: Dict[str, List[Task]] = {}

    def shared(tasks: List[Task]) -> batch_api.Planned:
        body = (
            tasks[0].request
            if len(tasks) == 1
            else {**tasks[0].request, "prompt": [t.request["prompt"] for t in tasks]}
        )
        return batch_api.BATCH_URLS["completions"], body, [t.line for t in tasks], [_note(t) for t in tasks]

    for item in read_tasks(options.input, job.skip, options.endpoint, options.model):
        current.set(item.line, item.digest)
        if item.line in pending and pending[item.line] == _hash_value(item.digest):
            continue  # its request is in a batch already
        if isinstance(item, Result):
            writer.put(item)
            continue
        key = batch_key(item)
        if key is None:
            yield batch_api.BATCH_URLS[item.endpoint], item.request, [item.line], [_note(item)]
        else:
            groups.setdefault(key, []).append(item)
            if len(groups[key]) >= MAX_PROMPTS_PER_COMPLETION:
                yield shared(groups.pop(key))
        while groups and item.line - groups[next(iter(groups))][0].line > _HOLD_LINES:
            yield shared(groups.pop(next(iter(groups))))
    for key in list(groups):
        yield shared(groups.pop(key))


def _note(task: Task) -> Tuple[Optional[str], bool, Any]:
    """What a line's result needs beside the request and response: its hash and metadata."""
    return (task.digest, task.has_metadata, task.metadata)


def _deliver(results: Iterator[KeyResult], writer: Writer, current: LineHashes) -> None:
    """A settled chunk's results into the output, but for lines that already have a response, and for
    lines that changed (or went) since their request was made: those were planned anew."""
    for result in results:
        if writer.state.get(result.key, "missing") is None:
            continue  # written before a crash that came before the chunk was marked settled
        digest, has_metadata, metadata = result.note if isinstance(result.note, list) else (None, False, None)
        if current.get(result.key) != _hash_value(digest):
            continue
        writer.put(
            Result(
                result.key,
                result.request,
                metadata,
                bool(has_metadata),
                response=result.response,
                error=result.error,
                batch=result.shared,
                digest=digest,
            )
        )
