"""AsyncThrottledClient beside ThrottledClient and a bare AsyncOpenAI, on bench_client.py's scenarios.

For each scenario of ``bench_client.py`` (same fake server, limits, prompts and calls), one run each of:

- **async**: 500 asyncio tasks on one ``AsyncThrottledClient`` (given the limits);
- **sync**: 32 threads on one ``ThrottledClient`` (given the limits);
- **bare**: 500 asyncio tasks on a plain ``openai.AsyncOpenAI`` with its own retries (no limiter).

Every client runs in a fresh process of its own, so its CPU time and peak RSS are its own; the fake
server runs in another (``_server.py``), with a fresh server per run. Reported: throughput over the whole
run against the limits (successful requests/min over RPM, tokens/min the server charged over TPM),
"steady" (10th-90th percentile of completions, as bench_client), 429s per HTTP request, failed calls,
lost calls (inputs with neither a result nor an exception), client CPU per call (process CPU time around
the run only) and peak RSS; then a verdict per row against issue 13's targets.

    python benchmarks/bench_async.py            # about 3 minutes
    python benchmarks/bench_async.py --quick    # a shorter run (fewer calls: the quick RPM run has
                                                # 240 calls, so at most 240 tasks are ever in flight)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_client import THREADS, WARMUP_SECONDS, Scenario, _steady_rate, ceiling, request, scenarios, server_for

TASKS = 500
KINDS = ("async", "sync", "bare")
LABELS = {
    "async": f"AsyncThrottledClient, {TASKS} tasks",
    "sync": f"ThrottledClient, {THREADS} threads",
    "bare": f"openai.AsyncOpenAI (max_retries=2), {TASKS} tasks",
}
# Issue 13's targets for the throttled clients.
MIN_RATIO = 0.95
MAX_429_SHARE = 0.01


@dataclass
class Outcome:
    """What a client's process measured (times relative to its run's start)."""

    completed: int = 0
    failed: int = 0
    lost: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    maxrss_kib: int = 0
    done_at: List[float] = field(default_factory=list)
    errors: Dict[str, int] = field(default_factory=dict)
    unavailable: str = ""  # why the client could not run (AsyncThrottledClient not there yet)


def _run_timeout(scenario: Scenario) -> float:
    """Generous: several times the run's length at the ceiling. Calls still pending then are lost."""
    return max(60.0, 4 * scenario.calls / ceiling(scenario, 25.0))


def _errors(failures: List[BaseException]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for exc in failures:
        counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
    return counts


# ----------------------------------------------------------------- in the client's own process


class _Starter:
    """Tells the parent once that the timed run begins (it starts the 5 s warm-up timer then)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.sent = False

    def __call__(self) -> None:
        if not self.sent:
            self.sent = True
            self.conn.send("started")


def _child(conn: Connection, kind: str, base_url: str, scenario: Scenario) -> None:
    started = _Starter(conn)
    try:
        if kind == "sync":
            outcome = _run_sync(started, base_url, scenario)
        else:
            outcome = asyncio.run(_run_async(started, kind, base_url, scenario))
    except Exception as exc:  # the async client not built yet, say: report it, let the other rows run
        started()
        outcome = Outcome(unavailable=f"{type(exc).__name__}: {exc}")
    outcome.maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    conn.send(outcome)
    conn.close()
    # A call that never ended keeps a worker thread alive; it was counted as lost, don't wait for it.
    os._exit(0)


def _run_sync(started: _Starter, base_url: str, scenario: Scenario) -> Outcome:
    from throttled_openai import ThrottledClient

    client = ThrottledClient(base_url=base_url, api_key="sk-bench", rpm=scenario.rpm, tpm=scenario.tpm)
    done_at: List[float] = []
    failures: List[BaseException] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            client.chat.completions.create(**request(i, scenario))
        except Exception as exc:
            with lock:
                failures.append(exc)
            return
        with lock:
            done_at.append(time.monotonic())

    started()
    cpu0 = time.process_time()
    start = time.monotonic()
    pool = ThreadPoolExecutor(THREADS)
    futures = [pool.submit(one, i) for i in range(scenario.calls)]
    _, pending = wait(futures, timeout=_run_timeout(scenario))
    wall = time.monotonic() - start
    cpu = time.process_time() - cpu0
    pool.shutdown(wait=not pending, cancel_futures=True)
    if not pending:
        client.close()
    return Outcome(
        completed=len(done_at),
        failed=len(failures),
        lost=scenario.calls - len(done_at) - len(failures),
        wall=wall,
        cpu=cpu,
        done_at=sorted(t - start for t in done_at),
        errors=_errors(failures),
    )


async def _run_async(started: _Starter, kind: str, base_url: str, scenario: Scenario) -> Outcome:
    import openai

    if kind == "async":
        from throttled_openai import AsyncThrottledClient

        client: Any = AsyncThrottledClient(base_url=base_url, api_key="sk-bench", rpm=scenario.rpm, tpm=scenario.tpm)
    else:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench")
    done_at: List[float] = []
    failures: List[BaseException] = []
    inputs = iter(range(scenario.calls))  # shared by the workers: one loop, no lock needed

    async def worker() -> None:
        for i in inputs:
            try:
                await client.chat.completions.create(**request(i, scenario))
            except Exception as exc:
                failures.append(exc)
                continue
            done_at.append(time.monotonic())

    started()
    cpu0 = time.process_time()
    start = time.monotonic()
    workers = [asyncio.ensure_future(worker()) for _ in range(min(TASKS, scenario.calls))]
    _, pending = await asyncio.wait(workers, timeout=_run_timeout(scenario))
    wall = time.monotonic() - start
    cpu = time.process_time() - cpu0
    for task in pending:  # a call cancelled here has no result: it counts as lost
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await client.close()
    return Outcome(
        completed=len(done_at),
        failed=len(failures),
        lost=scenario.calls - len(done_at) - len(failures),
        wall=wall,
        cpu=cpu,
        done_at=sorted(t - start for t in done_at),
        errors=_errors(failures),
    )


# ----------------------------------------------------------------- in the parent


@dataclass
class Result:
    kind: str
    scenario: Scenario
    outcome: Outcome
    served: Dict[str, int]
    early: Dict[str, int]

    @property
    def calls_per_s(self) -> float:
        return self.outcome.completed / max(1e-9, self.outcome.wall)

    @property
    def rpm_ratio(self) -> float:
        return self.calls_per_s * 60 / self.scenario.rpm

    @property
    def tpm_ratio(self) -> float:
        return self.served["tokens_charged"] / max(1e-9, self.outcome.wall) * 60 / self.scenario.tpm

    @property
    def binding(self) -> str:
        """The limit that binds: the one whose ceiling in calls/s is lower."""
        return "RPM" if self.scenario.rpm / 60.0 <= self.ceiling else "TPM"

    @property
    def ratio(self) -> float:
        return self.rpm_ratio if self.binding == "RPM" else self.tpm_ratio

    @property
    def ceiling(self) -> float:
        tokens_per_call = self.served["tokens_used"] / max(1, self.served["admitted"])
        return ceiling(self.scenario, tokens_per_call)

    @property
    def share_429(self) -> float:
        return self.served["rate_limited"] / max(1, self.served["requests"])

    @property
    def cpu_ms(self) -> float:
        return self.outcome.cpu / max(1, self.scenario.calls) * 1000

    def row(self) -> str:
        o = self.outcome
        if o.unavailable:
            return f"| {LABELS[self.kind]} | not available: {o.unavailable} |" + " |" * 9
        late_requests = self.served["requests"] - self.early.get("requests", self.served["requests"])
        late_429 = self.served["rate_limited"] - self.early.get("rate_limited", self.served["rate_limited"])
        late = f"{late_429 / late_requests:.2%}" if late_requests else "(ended)"
        steady = _steady_rate(o.done_at) / self.ceiling
        return (
            f"| {LABELS[self.kind]} | {self.calls_per_s:.1f} | {self.rpm_ratio:.3f} | {self.tpm_ratio:.3f} "
            f"| {steady:.3f} | {self.share_429:.2%} | {late} | {o.failed} | {o.lost} "
            f"| {self.cpu_ms:.2f} | {o.maxrss_kib / 1024:.0f} |"
        )

    def verdict(self, sync_cpu_ms: Optional[float]) -> str:
        o = self.outcome
        if o.unavailable:
            return f"- {LABELS[self.kind]}: not run ({o.unavailable})"
        checks = [
            (self.ratio >= MIN_RATIO, f"{self.ratio:.3f} of the {self.binding} ceiling (>= {MIN_RATIO})"),
            (self.share_429 <= MAX_429_SHARE, f"{self.share_429:.2%} 429s (<= 1 %)"),
            (o.lost == 0, f"{o.lost} lost"),
            (o.failed == 0, f"{o.failed} failed" + (f" {o.errors}" if o.errors else "")),
        ]
        if self.kind == "async" and sync_cpu_ms is not None:
            checks.append((self.cpu_ms <= sync_cpu_ms, f"CPU {self.cpu_ms:.2f} ms/call vs sync {sync_cpu_ms:.2f}"))
        passed = all(ok for ok, _ in checks)
        detail = "; ".join(("" if ok else "MISS ") + text for ok, text in checks)
        if self.kind == "bare":  # no limiter: the targets show what it costs, they are not its to meet
            return f"- {LABELS[self.kind]} (reference): {detail}"
        return f"- {LABELS[self.kind]}: {'PASS' if passed else 'FAIL'}: {detail}"


def run(kind: str, scenario: Scenario) -> Result:
    ctx = mp.get_context("spawn")
    with server_for(scenario) as server:
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_child, args=(child, kind, server.base_url, scenario), daemon=True)
        process.start()
        child.close()
        early: Dict[str, int] = {}
        parent.recv()  # "started": the client is built, the timed run begins
        timer = threading.Timer(WARMUP_SECONDS, lambda: early.update(server.stats()))
        timer.start()
        outcome: Outcome = parent.recv()
        timer.cancel()
        timer.join()
        process.join(30)
        served = server.stats()
    return Result(kind, scenario, outcome, served, early)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls per scenario (a smoke test)")
    parser.add_argument("--only", choices=KINDS, action="append", help="run only these clients (repeatable)")
    args = parser.parse_args(argv)
    kinds = args.only or list(KINDS)
    print(
        f"Chat completions, fake server in its own process (1 s bucket, 30-60 ms latency); every client in "
        f"its own process. load average before: {os.getloadavg()[0]:.2f}\n"
    )
    for scenario in scenarios(args.quick):
        results = [run(kind, scenario) for kind in kinds]
        known = [r for r in results if not r.outcome.unavailable]
        ceiling_text = f", ceiling {known[0].ceiling:.1f} calls/s" if known else ""
        print(f"### {scenario.name}, {scenario.calls} calls{ceiling_text}\n")
        print(
            "| client | successful calls/s | requests/min / RPM | server tokens/min / TPM | steady / ceiling "
            "| 429s per request | 429s per request after 5 s | failed calls | lost calls | client CPU ms/call "
            "| peak RSS MiB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for result in results:
            print(result.row())
        print()
        sync = next((r for r in known if r.kind == "sync"), None)
        for result in results:
            print(result.verdict(sync.cpu_ms if sync else None))
        print()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
