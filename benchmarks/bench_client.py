"""ThrottledClient against the bare SDK, side by side, under strict limits (a bucket holding ~1 s).

32 threads call chat completions against the fake server (in its own process). For each scenario it
reports, for ``ThrottledClient`` and for a plain ``openai.OpenAI`` with its default retries:
throughput / the limits' ceiling (overall, and steady state between 10 % and 90 % of completions),
429s per HTTP request (overall and after the first 5 s), calls that failed, and client CPU per call.

    python benchmarks/bench_client.py            # about 2-3 minutes
    python benchmarks/bench_client.py --quick    # a shorter run
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import openai

from throttled_openai import ThrottledClient

try:
    from benchmarks._server import ServerProcess
except ImportError:  # run as a script from benchmarks/
    from _server import ServerProcess  # type: ignore[no-redef]

THREADS = 32
WARMUP_SECONDS = 5.0


@dataclass
class Scenario:
    name: str
    rpm: float
    tpm: float
    calls: int
    max_tokens: int


@dataclass
class Result:
    label: str
    completed: int
    failed: int
    wall: float
    steady: float
    ceiling: float
    http_requests: int
    rate_limited: int
    rate_limited_late: int
    late_requests: int
    cpu_per_call_ms: float

    def row(self) -> str:
        overall = self.completed / self.wall
        late = f"{self.rate_limited_late / max(1, self.late_requests):.2%}" if self.late_requests else "(ended)"
        return (
            f"| {self.label} | {overall:.1f} | {overall / self.ceiling:.3f} | {self.steady / self.ceiling:.3f} "
            f"| {self.rate_limited / max(1, self.http_requests):.2%} | {late} "
            f"| {self.failed} | {self.cpu_per_call_ms:.2f} |"
        )


def scenarios(quick: bool = False) -> List[Scenario]:
    """The two scenarios, shared with bench_async.py; ``quick`` runs 0.4 of the calls."""
    scale = 0.4 if quick else 1.0
    return [
        # RPM binds: 20 requests/s, tokens plentiful.
        Scenario("RPM-bound: 1,200 RPM", rpm=1200, tpm=10_000_000, calls=int(600 * scale), max_tokens=20),
        # TPM binds: 1,000 tokens/s; each call reserves ~60 tokens and uses ~21.
        Scenario("TPM-bound: 60,000 TPM", rpm=100_000, tpm=60_000, calls=int(1000 * scale), max_tokens=40),
    ]


def server_for(scenario: Scenario) -> ServerProcess:
    """The fake server of a scenario (its own process): a 1 s bucket, 30-60 ms latency."""
    return ServerProcess(
        rpm=scenario.rpm, tpm=scenario.tpm, bucket_seconds=1.0, latency=0.03, latency_jitter=0.03, seed=1
    )


def request(i: int, scenario: Scenario) -> Dict[str, Any]:
    """The arguments of call ``i``'s ``chat.completions.create``."""
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"Write a short line about the number {i}."}],
        "max_tokens": scenario.max_tokens,
    }


def ceiling(scenario: Scenario, tokens_per_call: float) -> float:
    """Calls/s the limits allow, with the tokens a call really uses (the server refunds the rest)."""
    return min(scenario.rpm / 60.0, scenario.tpm / 60.0 / max(1.0, tokens_per_call))


def run(label: str, scenario: Scenario, make_client: Callable[[str], Any]) -> Result:
    with server_for(scenario) as server:
        client = make_client(server.base_url)
        done_at: List[float] = []
        usage: List[int] = []
        failures: List[BaseException] = []
        lock = threading.Lock()
        early: Dict[str, int] = {}

        def one(i: int) -> None:
            try:
                reply = client.chat.completions.create(**request(i, scenario))
            except Exception as exc:
                with lock:
                    failures.append(exc)
                return
            with lock:
                done_at.append(time.monotonic())
                usage.append(reply.usage.total_tokens if reply.usage else 0)

        def snapshot_after_warmup() -> None:
            early.update(server.stats())

        timer = threading.Timer(WARMUP_SECONDS, snapshot_after_warmup)
        cpu0 = time.process_time()
        start = time.monotonic()
        timer.start()
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(one, range(scenario.calls)))
        wall = time.monotonic() - start
        cpu = time.process_time() - cpu0
        timer.cancel()
        served = server.stats()
    tokens_per_call = sum(usage) / max(1, len(usage))
    done_at.sort()
    steady = _steady_rate(done_at)
    return Result(
        label=label,
        completed=len(done_at),
        failed=len(failures),
        wall=wall,
        steady=steady,
        ceiling=ceiling(scenario, tokens_per_call),
        http_requests=served["requests"],
        rate_limited=served["rate_limited"],
        rate_limited_late=served["rate_limited"] - early.get("rate_limited", served["rate_limited"]),
        late_requests=served["requests"] - early.get("requests", served["requests"]),
        cpu_per_call_ms=cpu / max(1, scenario.calls) * 1000,
    )


def _steady_rate(done_at: List[float]) -> float:
    """Completions per second between the 10th and 90th percentile completion times."""
    if len(done_at) < 10:
        return 0.0
    lo, hi = len(done_at) // 10, len(done_at) * 9 // 10
    return (hi - lo) / max(1e-9, done_at[hi] - done_at[lo])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls per scenario")
    args = parser.parse_args(argv)
    print(f"{THREADS} threads, chat completions, fake server with a 1 s bucket and 30-60 ms latency.\n")
    for scenario in scenarios(args.quick):
        throttled = run(
            "ThrottledClient",
            scenario,
            lambda url, s=scenario: ThrottledClient(base_url=url, api_key="sk-bench", rpm=s.rpm, tpm=s.tpm),
        )
        plain = run(
            "openai.OpenAI (max_retries=2)", scenario, lambda url: openai.OpenAI(base_url=url, api_key="sk-bench")
        )
        print(f"### {scenario.name}, {scenario.calls} calls, ceiling {throttled.ceiling:.1f} calls/s\n")
        print(
            "| client | successful calls/s | / ceiling | steady / ceiling | 429s per request "
            "| 429s per request after 5 s | failed calls | client CPU ms/call |"
        )
        print("|---|---|---|---|---|---|---|---|")
        print(throttled.row())
        print(plain.row())
        print()


if __name__ == "__main__":
    main()
