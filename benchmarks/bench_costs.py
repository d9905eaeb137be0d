"""How close the client gets to the server's ceiling when the server counts costs its own way.

A table of cells, each one run against the fake server (in its own process, 30-60 ms latency):

- the server's cost model: ``tiktoken`` (our own count), ``chars`` (OpenAI's documented estimate from
  the request's characters) and ``json_bytes`` (OpenAI-compatible servers: the JSON body's bytes / 4);
- its bucket: 1 s of budget (a server enforcing in slices), or the full minute (OpenAI's headers);
- the workload: chat completions, legacy completions, embeddings of short inputs;
- the client: ``ThrottledClient`` with 32 threads of single calls, or the ``map_*`` helper; each with
  the limits given, and with none (learned from the headers).

Each cell reports the *utilization*: what the server let through on its binding dimension (requests
admitted; tokens charged, after its refunds) over what it could have over the whole run, start-up
included: ``(bucket capacity + limit / 60 × seconds)``. Also 429s per request, and inputs lost (no
result or an error). Target: ≥ 0.95, ≤ 1 % 429s, nothing lost.

Then a zero-config run against headers that report a per-day limit: the most requests sent (by the
client, refused ones included) in any one second, against what the per-minute limit allows in one.

    python benchmarks/bench_costs.py            # the whole table, about 35 minutes
    python benchmarks/bench_costs.py --quick    # 1 s buckets only, shorter runs, about 6 minutes
    python benchmarks/bench_costs.py --only "60 s | json_bytes"    # the cells whose row contains this
"""

from __future__ import annotations

import argparse
import bisect
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import openai

from throttled_openai import ThrottledClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import ServerProcess

THREADS = 32
LATENCY = {"latency": 0.03, "latency_jitter": 0.03}
MODELS = {"chat": "gpt-4o-mini", "completions": "gpt-3.5-turbo-instruct", "embeddings": "text-embedding-3-small"}
# Net tokens (after the server's refund) one input roughly costs: only sizes the runs.
NET_COST = {"chat": 24, "completions": 9, "embeddings": 3}


@dataclass(frozen=True)
class Cell:
    bucket: float  # seconds of budget the server's buckets hold
    cost_model: str
    workload: str
    helper: bool  # map_* rather than threads of single calls
    given: bool  # limits given to the client, else learned
    rpm: float
    tpm: float
    seconds: float  # how long the run should take at the ceiling


@dataclass
class Outcome:
    utilization: float
    binding: str
    rate_limited: float
    lost: int
    wall: float


def inputs_for(cell: Cell) -> List[str]:
    capacity = cell.tpm * cell.bucket / 60 + cell.tpm / 60 * cell.seconds
    tokens_bound = capacity / NET_COST[cell.workload]
    requests_bound = (cell.rpm * cell.bucket / 60 + cell.rpm / 60 * cell.seconds) * (
        20 if cell.helper and cell.workload == "completions" else 300 if cell.helper else 1
    )  # fmt: skip
    count = int(min(tokens_bound, requests_bound))
    if cell.workload == "chat":
        return [f"Write a short line about the number {i}." for i in range(count)]
    if cell.workload == "completions":
        return [f"Item {i}:" for i in range(count)]
    return [f"item {i}" for i in range(count)]


def run_cell(cell: Cell) -> Outcome:
    items = inputs_for(cell)
    model = MODELS[cell.workload]
    server_kwargs: Dict[str, Any] = dict(rpm=cell.rpm, tpm=cell.tpm, bucket_seconds=cell.bucket, **LATENCY)
    with ServerProcess(cost_model=cell.cost_model, seed=3, **server_kwargs) as server:
        limits = {"rpm": cell.rpm, "tpm": cell.tpm} if cell.given else {}
        client = ThrottledClient(base_url=server.base_url, api_key="sk-bench", **limits)
        start = time.monotonic()
        results = _run(client, cell, model, items)
        wall = time.monotonic() - start
        served = server.stats()
    lost = sum(1 for result in results if result is None or isinstance(result, BaseException))
    requests_ceiling = cell.rpm * cell.bucket / 60 + cell.rpm / 60 * wall
    tokens_ceiling = cell.tpm * cell.bucket / 60 + cell.tpm / 60 * wall
    by_requests = served["admitted"] / requests_ceiling
    by_tokens = served["tokens_charged"] / tokens_ceiling
    return Outcome(
        utilization=max(by_requests, by_tokens),
        binding="requests" if by_requests >= by_tokens else "tokens",
        rate_limited=served["rate_limited"] / max(1, served["requests"]),
        lost=lost,
        wall=wall,
    )


def _run(client: ThrottledClient, cell: Cell, model: str, items: List[str]) -> List[Any]:
    if cell.helper:
        if cell.workload == "chat":
            conversations = [[{"role": "user", "content": text}] for text in items]
            return client.map_chat_completions(conversations, model=model, max_tokens=40, return_exceptions=True)
        if cell.workload == "completions":
            return client.map_completions(items, model=model, max_tokens=40, return_exceptions=True)
        return client.map_embeddings(items, model=model, return_exceptions=True)

    def one(text: str) -> Any:
        try:
            if cell.workload == "chat":
                messages = [{"role": "user", "content": text}]
                return client.chat.completions.create(model=model, messages=messages, max_tokens=40)
            if cell.workload == "completions":
                return client.completions.create(model=model, prompt=text, max_tokens=40)
            return client.embeddings.create(model=model, input=text)
        except Exception as error:
            return error

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(one, items))


def per_day_headers(bucket: float, calls: int) -> str:
    """Zero config against headers that show 10,000 requests per day; the real per-minute limit is 600."""
    sent: List[float] = []
    lock = threading.Lock()

    def on_request(request: Any) -> None:
        with lock:
            sent.append(time.monotonic())

    with ServerProcess(
        rpm=600, tpm=10_000_000, rpd=10_000, headers_report="day", bucket_seconds=bucket, **LATENCY
    ) as server:
        http = openai.DefaultHttpxClient(event_hooks={"request": [on_request], "response": []})
        client = ThrottledClient(base_url=server.base_url, api_key="sk-bench", http_client=http)
        conversation = [{"role": "user", "content": "hi"}]
        start = time.monotonic()
        with ThreadPoolExecutor(THREADS) as pool:
            results = list(
                pool.map(
                    lambda _: _safe(lambda: client.chat.completions.create(
                        model="gpt-4o-mini", messages=conversation, max_tokens=5)),
                    range(calls),
                )
            )  # fmt: skip
        wall = time.monotonic() - start
        served = server.stats()
        state = client.stats().limits["gpt-4o-mini"]
    sent.sort()
    most = max((bisect.bisect_left(sent, t + 1.0) - i for i, t in enumerate(sent)), default=0)
    allowed = 600 * bucket / 60 + 600 / 60  # what the server's bucket holds plus one second's refill
    lost = sum(isinstance(result, BaseException) for result in results)
    return (
        f"| {bucket:g} s | {calls} | {most} | {allowed:.0f} "
        f"| {served['rate_limited'] / max(1, served['requests']):.2%} "
        f"| {lost} | {state['requests_limit']:g} ({state['requests_source']}) | {state.get('requests_budget_limit')} "
        f"| {wall:.1f} |"
    )


def _safe(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as error:
        return error


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s buckets only, shorter runs")
    parser.add_argument("--only", default="", help="run only cells whose label contains this text")
    args = parser.parse_args(argv)
    # (bucket seconds, RPM, TPM, seconds a run takes at the ceiling): long enough that start-up (the
    # first connection, loading the tokenizer) is a few per cent of it, as it is of a real job.
    buckets = [(1.0, 3000.0, 60_000.0, 6.0 if args.quick else 20.0)]
    if not args.quick:
        buckets.append((60.0, 3000.0, 12_000.0, 25.0))
    print("| bucket | server counts | workload | client | limits | utilization | binds | 429s/request | lost | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = 1.0
    for bucket, rpm, tpm, seconds in buckets:
        for cost_model in ("tiktoken", "chars", "json_bytes"):
            for workload in ("chat", "completions", "embeddings"):
                for helper in (False, True):
                    for given in (True, False):
                        cell = Cell(bucket, cost_model, workload, helper, given, rpm, tpm, seconds)
                        label = (
                            f"| {bucket:g} s | {cost_model} | {workload} | "
                            f"{'map_*' if helper else f'{THREADS} threads'} | {'given' if given else 'learned'} |"
                        )
                        if args.only and args.only not in label:
                            continue
                        out = run_cell(cell)
                        worst = min(worst, out.utilization)
                        print(
                            f"{label} {out.utilization:.3f} | {out.binding} | {out.rate_limited:.2%} | {out.lost} "
                            f"| {out.wall:.1f} |",
                            flush=True,
                        )
    print(f"\nLowest utilization: {worst:.3f}\n")
    if args.only:
        return
    print("Zero config, headers showing 10,000 requests per day; the per-minute limit is 600.\n")
    print("| bucket | calls | most sent in 1 s | allowed in 1 s | 429s/request | lost | rpm learned | budget | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bucket in (1.0, 60.0):
        print(per_day_headers(bucket, 300 if args.quick else 1000), flush=True)


if __name__ == "__main__":
    main()
