"""RedisRateLimiter against one RateLimiter per process: several processes sharing one limit.

1. Shared limit: 4 processes x 8 threads call chat completions against ONE fake-server limit (its own
   process; a 1 s bucket, 50-70 ms latency). Every process uses either one ``RedisRateLimiter`` pointed
   at one private redis-server, or its own in-process ``RateLimiter`` (the ``ThrottledClient`` default),
   each with the true limits given or with no limits (learned from the headers). Fresh server and Redis
   for every run. Reported per run, pooled over the processes:

   - successful calls/s over the whole run (go to last completion) and in the steady state (between the
     10th and the 90th percentile completion, which leaves out the initial burst and the tail), divided
     by the ceiling: the limit's rate (TPM-bound: in calls at the tokens a call really uses, as the server
     refunds the rest of its reservation). The limiters keep 2 % headroom: 0.98 is what holding the
     limit exactly looks like;
   - 429s per HTTP request, overall and for requests received after the first 5 s (server's counters);
   - calls that failed (after the client's retries), by exception;
   - the most requests the server admitted in any 1 s window, against what it allows (a full bucket plus
     1 s of refill; TPM-bound: approximate, in calls at the tokens used per call), and the most HTTP
     requests the clients sent in any 1 s window (429s included: the load offered);
   - the workers' CPU per successful call.

2. Cost per reservation, one thread, this process: ``acquire`` + ``settle`` (a refund, as in a real
   call) and ``acquire`` + ``observe`` + ``settle`` (the limiter's whole share of a call), on limits
   never reached, with a ``RedisRateLimiter`` (local redis-server over TCP) and a ``RateLimiter``: µs
   per reservation (wall, this process's CPU, redis-server's CPU from ``INFO cpu``), the median of 5
   rounds; a bare redis-py PING round trip for scale.
3. CPU per call of one ``ThrottledClient`` process (8 threads, limits never reached) with a
   ``RedisRateLimiter`` and with its in-process limiter; redis-server's own CPU per call beside it.
4. Failover: as in 1, every process with a ``RedisRateLimiter(on_error="local")``; redis-server is killed
   6 s after the go and started again (empty) 3 s later. Reported: 429s per HTTP request over the run
   and in each phase (before the kill; Redis down; the 5 s after the restart), calls lost (failed after
   the client's retries, or never completed), successful calls/s while Redis was down against the
   ceiling, and the most requests sent in any 0.3 s from the kill to 5 s after the restart, against
   0.3 s of the ceiling (a burst shows there).

    python benchmarks/bench_redis.py            # about 7 minutes
    python benchmarks/bench_redis.py --quick    # about 3.5 minutes
    python benchmarks/bench_redis.py --scenario rpm --no-learned --no-overhead --no-failover   # core comparison, ~1 min
    python benchmarks/bench_redis.py --only-failover --no-learned   # the failover runs, ~1 minute
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import redis

from throttled_openai import RateLimiter, RedisRateLimiter, ThrottledClient, parse_rate_limit_headers
from throttled_openai.testing import RedisServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_redis_worker.py"
MODEL = "gpt-4o-mini"
PROCESSES = 4
THREADS = 8
WARMUP_SECONDS = 5.0
SERVER = {"bucket_seconds": 1.0, "latency": 0.05, "latency_jitter": 0.02, "seed": 1}


@dataclass
class Scenario:
    name: str
    rpm: float
    tpm: float
    calls: int  # in all, split evenly over the processes
    max_tokens: int
    rpm_bound: bool


@dataclass
class Mode:
    label: str
    redis: bool
    given: bool  # the true limits are configured; otherwise learned from the headers


MODES = [
    Mode("Redis, limits given", redis=True, given=True),
    Mode("Redis, limits learned", redis=True, given=False),
    Mode("in-process, limits given", redis=False, given=True),
    Mode("in-process, limits learned", redis=False, given=False),
]


@dataclass
class Result:
    mode: Mode
    completed: int
    failures: Dict[str, int]
    wall: float  # from the go to the last completion, seconds
    steady: float  # calls/s between the 10th and 90th percentile completion
    ceiling: float  # calls/s
    tokens_per_call: float
    requests: int
    rate_limited: int
    late_requests: int
    late_rate_limited: int
    admitted_window: int  # most requests admitted in any 1 s window
    sent_window: int  # most HTTP requests sent (by all clients) in any 1 s window
    cpu_ms: float  # worker CPU per successful call
    notes: List[str]

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def row(self, allowed: int) -> str:
        overall = self.completed / max(1e-9, self.wall)
        late = f"{self.late_rate_limited / self.late_requests:.2%}" if self.late_requests else "(ended)"
        failed = str(self.failed) + (f" ({', '.join(sorted(self.failures))})" if self.failures else "")
        return (
            f"| {self.mode.label} | {overall:.1f} | {overall / self.ceiling:.3f} | {self.steady / self.ceiling:.3f} "
            f"| {self.rate_limited / max(1, self.requests):.2%} | {late} | {failed} "
            f"| {self.admitted_window} / {allowed} | {self.sent_window} | {self.cpu_ms:.2f} |"
        )


# -- 1. processes sharing one limit ----------------------------------------------------------------


def run_shared(scenario: Scenario, mode: Mode) -> Result:
    with contextlib.ExitStack() as stack:
        # 1. A fresh fake server (and Redis): nothing learned or spent by an earlier run carries over.
        server = stack.enter_context(ServerProcess(rpm=scenario.rpm, tpm=scenario.tpm, **SERVER))
        redis_server = stack.enter_context(RedisServer()) if mode.redis else None
        redis_url = redis_server.url if redis_server else None
        identity = _redis_identity(redis_url)
        config = _worker_config(scenario, mode, server.base_url, redis_url)
        # 2. Start the workers and wait until each has built its client, then let them go together.
        workers = _start_workers(config)
        for worker in workers:
            stack.callback(_kill, worker)
        early: Dict[str, int] = {}  # the server's counters after the warm-up
        timer = threading.Timer(WARMUP_SECONDS, lambda: early.update(server.stats()))
        go = time.monotonic()
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        timer.start()
        # 3. Collect every worker's report, then the server's view.
        reports = [_report(worker, go) for worker in workers]
        timer.cancel()
        timer.join()
        served = server.stats()
        admitted_window, _ = server.max_admitted_in_window(1.0)
        notes = []
        if redis_server is not None and (not redis_server.running or _redis_identity(redis_url) != identity):
            notes.append("our redis-server died or was replaced during the run: this run is void")
    # 4. Pool the processes' completions: rates, windows, failures.
    done_at = sorted(t for report in reports for t in report["done_at"])
    sent_at = sorted(t for report in reports for t in report["sent_at"])
    used = [n for report in reports for n in report["used"]]
    failures: Dict[str, int] = {}
    for report in reports:
        for name in report["failures"]:
            failures[name] = failures.get(name, 0) + 1
    tokens_per_call = sum(used) / max(1, len(used))
    ceiling = min(scenario.rpm / 60.0, scenario.tpm / 60.0 / max(1.0, tokens_per_call))
    return Result(
        mode=mode,
        completed=len(done_at),
        failures=failures,
        wall=(done_at[-1] - go) if done_at else 0.0,
        steady=_steady_rate(done_at),
        ceiling=ceiling,
        tokens_per_call=tokens_per_call,
        requests=served["requests"],
        rate_limited=served["rate_limited"],
        late_requests=served["requests"] - early.get("requests", served["requests"]),
        late_rate_limited=served["rate_limited"] - early.get("rate_limited", served["rate_limited"]),
        admitted_window=admitted_window,
        sent_window=_most_in_window(sent_at, 1.0),
        cpu_ms=sum(report["cpu"] for report in reports) / max(1, len(done_at)) * 1000,
        notes=notes,
    )


def _worker_config(
    scenario: Scenario, mode: Mode, base_url: str, redis_url: Optional[str], **extra: Any
) -> Dict[str, Any]:
    """What each worker process is told: where the servers are, the limits it is given, its share."""
    return {
        "base_url": base_url,
        "redis_url": redis_url,
        "rpm": scenario.rpm if mode.given else None,
        "tpm": scenario.tpm if mode.given else None,
        "threads": THREADS,
        "calls": scenario.calls // PROCESSES,
        "max_tokens": scenario.max_tokens,
        **extra,
    }


def _start_workers(config: Dict[str, Any]) -> List[subprocess.Popen[str]]:
    """Start the worker processes; return once each has printed ``ready``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(WORKER), json.dumps(config)]
    pipe = subprocess.PIPE
    workers = [
        subprocess.Popen(command, stdin=pipe, stdout=pipe, stderr=pipe, text=True, env=env) for _ in range(PROCESSES)
    ]
    for worker in workers:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        if line.strip() != "ready":
            for other in workers:
                _kill(other)
            raise RuntimeError(f"worker did not start: {line!r} {worker.communicate()[1]}")
    return workers


def _report(worker: subprocess.Popen[str], go: float) -> Dict[str, Any]:
    """A worker's JSON report; the first error of each kind and its warnings go to stderr."""
    stdout, stderr = worker.communicate(timeout=600)
    if worker.returncode != 0:
        raise RuntimeError(f"worker failed ({worker.returncode}): {stderr}")
    report: Dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    for name, message in report["first_error"].items():
        at, _, text = message.partition(" ")
        print(f"    worker {worker.pid}: first {name} at {float(at) - go:.2f} s: {text}", file=sys.stderr)
    for line in stderr.splitlines()[:3]:
        print(f"    worker {worker.pid} stderr: {line}", file=sys.stderr)
    return report


def _redis_identity(url: Optional[str]) -> str:
    """Which redis-server answers at ``url`` (its pid and run id), to notice one dying or replaced."""
    if url is None:
        return ""
    try:
        info = redis.Redis.from_url(url, socket_timeout=5).info("server")
    except redis.RedisError as error:
        return f"unreachable: {error}"
    return f"{info['process_id']}/{info['run_id']}"


def _kill(worker: subprocess.Popen[str]) -> None:
    if worker.poll() is None:
        worker.kill()
        worker.wait(10)


def _steady_rate(done_at: List[float]) -> float:
    """Completions per second between the 10th and 90th percentile completion times."""
    if len(done_at) < 10:
        return 0.0
    lo, hi = len(done_at) // 10, len(done_at) * 9 // 10
    return (hi - lo) / max(1e-9, done_at[hi] - done_at[lo])


def _most_in_window(times: List[float], seconds: float) -> int:
    """Most of the sorted ``times`` that differ by less than ``seconds`` (as the fake server counts)."""
    best = left = 0
    for right, t in enumerate(times):
        while t - times[left] >= seconds:
            left += 1
        best = max(best, right - left + 1)
    return best


def allowed_in_window(scenario: Scenario, tokens_per_call: float) -> int:
    """Requests the server can admit in a 1 s window: a full bucket (1 s of budget) plus 1 s of refill.
    TPM-bound: in tokens used per call, as the server refunds each call's unused reservation."""
    per_second = scenario.rpm / 60.0 if scenario.rpm_bound else scenario.tpm / 60.0 / max(1.0, tokens_per_call)
    return math.floor(2 * per_second)


def shared_limit(scenarios: List[Scenario], modes: List[Mode]) -> List[str]:
    lines = []
    for scenario in scenarios:
        results = []
        for mode in modes:
            started = time.monotonic()
            result = run_shared(scenario, mode)
            results.append(result)
            print(f"  {scenario.name} / {mode.label}: {time.monotonic() - started:.1f} s", file=sys.stderr)
        tokens_per_call = results[0].tokens_per_call
        allowed = allowed_in_window(scenario, tokens_per_call)
        unit = "" if scenario.rpm_bound else f" (≈, at {tokens_per_call:.0f} tokens used per call)"
        lines.append(
            f"### {scenario.name}, {scenario.calls} calls, {PROCESSES} processes x {THREADS} threads, "
            f"ceiling {results[0].ceiling:.1f} calls/s\n"
        )
        lines.append(
            "| limiter | successful calls/s | / ceiling | steady / ceiling | 429s per request "
            f"| 429s per request after {WARMUP_SECONDS:.0f} s | failed calls "
            f"| most admitted in 1 s / server allows{unit} | most sent in 1 s | worker CPU ms/call |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        lines.extend(result.row(allowed) for result in results)
        lines.extend(f"\nNote, {result.mode.label}: {note}." for result in results for note in result.notes)
        for result in results:
            if result.mode.redis and result.mode.given:
                ok = (
                    result.steady / result.ceiling >= 0.9
                    and result.rate_limited / max(1, result.requests) <= 0.01
                    and result.failed == 0
                )
                verdict = "met" if ok else "MISSED"
                lines.append(
                    f"\nTarget for Redis, limits given (steady ≥ 0.9 of ceiling, ≤ 1 % 429s, none failed): {verdict}."
                )
        lines.append("")
    return lines


# -- 2. one reservation ----------------------------------------------------------------------------


HEADERS = parse_rate_limit_headers(
    {
        "x-ratelimit-limit-requests": "1000000000",
        "x-ratelimit-remaining-requests": "999999999",
        "x-ratelimit-limit-tokens": "1000000000000",
        "x-ratelimit-remaining-tokens": "999999999000",
    }
)


ROUNDS = 5  # each figure of part 2 is the median of this many rounds, as other load on the machine comes and goes


@dataclass
class Cost:
    """Per reservation, in µs: wall time, this process's CPU, redis-server's CPU (0 in-process)."""

    wall: float
    cpu: float
    redis_cpu: float


def reservation_cost(limiter: RateLimiter, count: int, observe: bool, server: Optional[redis.Redis]) -> Cost:
    """Acquire 100 tokens, [observe the headers,] settle at 40 used, ``count`` times in a row; the median
    of :data:`ROUNDS` rounds of ``count // ROUNDS``."""
    key = ("bench-account", MODEL)

    def one() -> None:
        reservation = limiter.acquire(key, 100)
        if observe:
            limiter.observe(reservation, HEADERS, 200)
        limiter.settle(reservation, 40)

    for _ in range(200):  # load the scripts, open the connection
        one()
    rounds = []
    per_round = max(1, count // ROUNDS)
    for _ in range(ROUNDS):
        redis_cpu, cpu, wall = _cpu_seconds(server), time.process_time(), time.perf_counter()
        for _ in range(per_round):
            one()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        redis_cpu = _cpu_seconds(server) - redis_cpu
        rounds.append(Cost(wall / per_round * 1e6, cpu / per_round * 1e6, redis_cpu / per_round * 1e6))
    return Cost(
        statistics.median(r.wall for r in rounds),
        statistics.median(r.cpu for r in rounds),
        statistics.median(r.redis_cpu for r in rounds),
    )


def ping_cost(url: str, count: int) -> float:
    """µs per redis-py PING round trip (the median of :data:`ROUNDS` rounds)."""
    client = redis.Redis.from_url(url)
    for _ in range(200):
        client.ping()
    rounds = []
    for _ in range(ROUNDS):
        wall = time.perf_counter()
        for _ in range(count // ROUNDS):
            client.ping()
        rounds.append((time.perf_counter() - wall) / (count // ROUNDS) * 1e6)
    return statistics.median(rounds)


def reservations(count: int) -> List[str]:
    lines = [
        f"### One reservation, single thread, {count:,} in a row (median of {ROUNDS} rounds), limits never reached\n",
        "| limiter | acquire + settle µs | its CPU µs | redis-server CPU µs "
        "| acquire + observe + settle µs | its CPU µs | redis-server CPU µs |",
        "|---|---|---|---|---|---|---|",
    ]
    with RedisServer() as server:
        probe = redis.Redis.from_url(server.url)
        rows = []
        makers: List[Tuple[str, Callable[[], RateLimiter], Optional[redis.Redis]]] = [
            ("RateLimiter (in-process)", lambda: RateLimiter(10**9, 10**12), None),
            ("RedisRateLimiter (local redis-server, TCP)", lambda: RedisRateLimiter(server.url, 10**9, 10**12), probe),
        ]
        for label, make, watched in makers:
            pair = reservation_cost(make(), count, False, watched)
            triple = reservation_cost(make(), count, True, watched)
            rows.append((pair, triple))
            lines.append(
                f"| {label} | {pair.wall:.1f} | {pair.cpu:.1f} | {pair.redis_cpu:.1f} "
                f"| {triple.wall:.1f} | {triple.cpu:.1f} | {triple.redis_cpu:.1f} |"
            )
        (local_pair, local_triple), (redis_pair, redis_triple) = rows
        lines.append(
            f"| ratio Redis / in-process (wall) | {redis_pair.wall / local_pair.wall:.0f}× | | "
            f"| {redis_triple.wall / local_triple.wall:.0f}× | | |"
        )
        ping = ping_cost(server.url, count)
    lines.append(f"\nA bare redis-py PING round trip to the same server: {ping:.1f} µs.\n")
    return lines


# -- 3. CPU per call --------------------------------------------------------------------------------


def cpu_per_call(calls: int) -> List[str]:
    lines = [
        f"### CPU per call: one process, 8 threads, {calls} chat calls, limits never reached\n",
        "| limiter | client CPU ms/call | redis-server CPU ms/call | calls/s |",
        "|---|---|---|---|",
    ]
    with ServerProcess(rpm=10**6, tpm=10**9, latency=0.01) as server, RedisServer() as redis_server:
        probe = redis.Redis.from_url(redis_server.url)
        makers: List[Tuple[str, Callable[[], ThrottledClient], Optional[redis.Redis]]] = [
            (
                "in-process RateLimiter",
                lambda: ThrottledClient(base_url=server.base_url, api_key="sk-bench", rpm=10**6, tpm=10**9),
                None,
            ),
            (
                "RedisRateLimiter",
                lambda: ThrottledClient(
                    base_url=server.base_url,
                    api_key="sk-bench",
                    limiter=RedisRateLimiter(redis_server.url, 10**6, 10**9),
                ),
                probe,
            ),
        ]
        for label, make, watched in makers:
            client = make()

            def one(i: int, client: ThrottledClient = client) -> None:
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=5
                )

            for i in range(20):  # warm up connections and encoders
                one(i)
            redis_cpu = _cpu_seconds(watched)
            cpu, wall = time.process_time(), time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(calls)))
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            redis_ms = f"{(_cpu_seconds(watched) - redis_cpu) / calls * 1000:.3f}" if watched else "-"
            lines.append(f"| {label} | {cpu / calls * 1000:.2f} | {redis_ms} | {calls / wall:.0f} |")
    lines.append("")
    return lines


def _cpu_seconds(server: Optional[redis.Redis]) -> float:
    """CPU seconds redis-server has used (``INFO cpu``), 0 for none."""
    if server is None:
        return 0.0
    info = server.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


# -- 4. failover -----------------------------------------------------------------------------------

KILL_AT = 6.0  # seconds after the go, redis-server is killed
DOWN_FOR = 3.0  # seconds until it is started again, empty
AFTER_RESTART = 5.0  # seconds after the restart that count as its phase
BURST_WINDOW = 0.3  # seconds: the window in which a burst at failover or restart shows


@dataclass
class Failover:
    mode: Mode
    calls: int
    completed: int
    failures: Dict[str, int]
    requests: int
    rate_limited: int
    phases: List[Tuple[int, int]]  # (requests, 429s): before the kill, Redis down, after the restart
    burst: int  # most requests sent in any BURST_WINDOW from the kill to AFTER_RESTART after the restart
    ceiling: float  # calls/s (TPM-bound: at the tokens a call really uses)
    down_rate: float  # successful calls/s while Redis was down
    notes: List[str]

    @property
    def lost(self) -> int:
        return self.calls - self.completed

    def row(self) -> str:
        phases = " | ".join(
            f"{limited / max(1, requests):.2%} ({limited}/{requests})" for requests, limited in self.phases
        )
        failed = ", ".join(f"{name} {count}" for name, count in sorted(self.failures.items()))
        overall = f"{self.rate_limited / max(1, self.requests):.2%} ({self.rate_limited}/{self.requests})"
        return (
            f"| {self.mode.label} | {overall} | {phases} | {self.lost}{f' ({failed})' if failed else ''} "
            f"| {self.down_rate / self.ceiling:.2f} | {self.burst} / {self.ceiling * BURST_WINDOW:.0f} |"
        )


def run_failover(scenario: Scenario, mode: Mode) -> Failover:
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(ServerProcess(rpm=scenario.rpm, tpm=scenario.tpm, **SERVER))
        redis_server = stack.enter_context(RedisServer())
        config = _worker_config(scenario, mode, server.base_url, redis_server.url, on_error="local")
        workers = _start_workers(config)
        for worker in workers:
            stack.callback(_kill, worker)
        # The server's counters at the kill, the restart and the end of the restart's phase; the
        # times of the kill and the restart. One thread talks to the server while the main one waits.
        marks: List[Dict[str, int]] = []
        times: List[float] = []

        def outage() -> None:
            time.sleep(max(0.0, go + KILL_AT - time.monotonic()))
            marks.append(server.stats())
            times.append(time.monotonic())
            redis_server.kill()
            time.sleep(DOWN_FOR)
            marks.append(server.stats())
            times.append(time.monotonic())
            redis_server.start()
            time.sleep(AFTER_RESTART)
            marks.append(server.stats())

        controller = threading.Thread(target=outage)
        go = time.monotonic()
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        controller.start()
        reports = [_report(worker, go) for worker in workers]
        controller.join()
        served = server.stats()
    done_at = sorted(t for report in reports for t in report["done_at"])
    sent_at = sorted(t for report in reports for t in report["sent_at"])
    used = [n for report in reports for n in report["used"]]
    failures: Dict[str, int] = {}
    for report in reports:
        for name in report["failures"]:
            failures[name] = failures.get(name, 0) + 1
    ceiling = min(scenario.rpm / 60.0, scenario.tpm / 60.0 / max(1.0, sum(used) / max(1, len(used))))
    notes = []
    if done_at and done_at[-1] < times[1] + AFTER_RESTART:
        notes.append("the run ended before the restart's phase did: give it more calls")
    edges = [{"requests": 0, "rate_limited": 0}, *marks]
    phases = [
        (after["requests"] - before["requests"], after["rate_limited"] - before["rate_limited"])
        for before, after in zip(edges, edges[1:])
    ]
    window = [t for t in sent_at if times[0] <= t <= times[1] + AFTER_RESTART]
    return Failover(
        mode=mode,
        calls=scenario.calls // PROCESSES * PROCESSES,
        completed=len(done_at),
        failures=failures,
        requests=served["requests"],
        rate_limited=served["rate_limited"],
        phases=phases,
        burst=_most_in_window(window, BURST_WINDOW),
        ceiling=ceiling,
        down_rate=sum(times[0] <= t < times[1] for t in done_at) / (times[1] - times[0]),
        notes=notes,
    )


def failover(scenarios: List[Scenario], modes: List[Mode]) -> List[str]:
    lines = []
    for scenario in scenarios:
        results = []
        for mode in modes:
            started = time.monotonic()
            results.append(run_failover(scenario, mode))
            print(f"  failover, {scenario.name} / {mode.label}: {time.monotonic() - started:.1f} s", file=sys.stderr)
        lines.append(
            f"### Failover, {scenario.name}, {scenario.calls} calls, {PROCESSES} processes x {THREADS} threads, "
            f'on_error="local": Redis killed at {KILL_AT:g} s, back (empty) {DOWN_FOR:g} s later\n'
        )
        lines.append(
            "| limiter | 429s per request | before the kill | Redis down | "
            f"{AFTER_RESTART:g} s after the restart | calls lost | successful calls/s while down / ceiling "
            f"| most sent in {BURST_WINDOW:g} s (kill to restart + {AFTER_RESTART:g} s) "
            f"/ {BURST_WINDOW:g} s of ceiling |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        lines.extend(result.row() for result in results)
        lines.extend(f"\nNote, {result.mode.label}: {note}." for result in results for note in result.notes)
        for result in results:
            ok = result.rate_limited / max(1, result.requests) <= 0.02 and result.lost == 0
            lines.append(f"\nTarget for {result.mode.label} (≤ 2 % 429s, no call lost): {'met' if ok else 'MISSED'}.")
        lines.append("")
    return lines


# -- main -----------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 10 s per mode)")
    parser.add_argument("--scenario", choices=("rpm", "tpm", "both"), default="both", help="shared-limit scenarios")
    parser.add_argument("--no-learned", action="store_true", help="only the shared-limit runs with the limits given")
    parser.add_argument("--no-overhead", action="store_true", help="skip the reservation and CPU measurements")
    parser.add_argument("--no-failover", action="store_true", help="skip the runs with Redis killed mid-run")
    parser.add_argument("--only-failover", action="store_true", help="only the runs with Redis killed mid-run")
    args = parser.parse_args(argv)
    scale = 0.4 if args.quick else 1.0
    scenarios = [
        # RPM binds: 20 requests/s, a 20-request bucket; tokens plentiful.
        Scenario(
            "RPM-bound: 1,200 RPM", rpm=1200, tpm=10_000_000, calls=int(500 * scale), max_tokens=20, rpm_bound=True
        ),
        # TPM binds: 1,000 tokens/s; each call reserves ~57 tokens and uses ~22 (the server refunds the rest).
        Scenario(
            "TPM-bound: 60,000 TPM", rpm=100_000, tpm=60_000, calls=int(1400 * scale), max_tokens=40, rpm_bound=False
        ),
    ]
    scenarios = [s for s in scenarios if args.scenario in ("both", "rpm" if s.rpm_bound else "tpm")]
    modes = [mode for mode in MODES if mode.given or not args.no_learned]
    started = time.monotonic()
    lines = [
        f"Chat completions, fake server in its own process: 1 s bucket, {SERVER['latency'] * 1000:.0f}-"
        f"{(SERVER['latency'] + SERVER['latency_jitter']) * 1000:.0f} ms latency. "
        "Redis: one private redis-server on 127.0.0.1.\n"
    ]
    if not args.only_failover:
        lines += shared_limit(scenarios, modes)
        if not args.no_overhead:
            lines += reservations(2000 if args.quick else 10_000)
            lines += cpu_per_call(300 if args.quick else 1000)
    if not args.no_failover:
        # Long enough that the run goes on past the restart's phase (KILL_AT + DOWN_FOR + AFTER_RESTART).
        lines += failover(
            [replace(s, calls=max(s.calls, int(s.calls / scale))) for s in scenarios],
            [mode for mode in modes if mode.redis],
        )
    print("\n".join(lines))
    print(f"Total run time: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
