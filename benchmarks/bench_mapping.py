"""Bulk helpers, measured side by side in one run against the fake server (in its own process).

1. RPM-bound: 600 RPM, high TPM, 4,000 short prompts, max_tokens 4, a 1 s bucket. ``map_completions``
   (20 prompts per request) against one request per prompt on a thread pool with tenacity backoff,
   the Cookbook's way (run on the first 400 prompts: at 10 requests/s the whole set takes 7 minutes).
2. TPM-bound: 120,000 TPM, 600 prompts of 100-600 characters, max_tokens 40, a 1 s bucket.
3. Memory: ``imap_completions`` over 10,000 and over 1,000,000 prompts from a generator (no limits,
   no latency), each in a fresh process: peak RSS.
4. Overhead: client CPU per request, ThrottledClient against the bare SDK, same chat requests.

Every run checks that each prompt got its own answer (nothing lost, nothing misplaced).

    python benchmarks/bench_mapping.py            # about 4 minutes
    python benchmarks/bench_mapping.py --quick    # smaller sets, about 1.5 minutes
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, List, Optional

import openai

from throttled_openai import ThrottledClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import ServerProcess

MODEL = "gpt-3.5-turbo-instruct"


def _answer_ok(prompt: str, choice: Any) -> bool:
    return bool(choice.text == f" echo:{prompt[:40]}#0")


def rpm_bound(count: int) -> List[str]:
    prompts = [f"Classify item {i}: yes or no?" for i in range(count)]
    rows = []
    with ServerProcess(rpm=600, tpm=10_000_000, bucket_seconds=1.0, latency=0.05, latency_jitter=0.05) as server:
        client = ThrottledClient(base_url=server.base_url, api_key="sk-bench", rpm=600, tpm=10_000_000)
        start = time.monotonic()
        choices = client.map_completions(prompts, model=MODEL, max_tokens=4)
        wall = time.monotonic() - start
        served = server.stats()
    ceiling = 600 / 60 * 20  # requests per second × prompts per request
    good = sum(_answer_ok(p, c) for p, c in zip(prompts, choices))
    rows.append(
        f"| map_completions | {count} | {count / wall:.1f} | {count / wall / ceiling:.3f} | "
        f"{served['rate_limited'] / max(1, served['requests']):.2%} | {count - good} |"
    )

    import tenacity

    subset = prompts[: max(40, count // 10)]
    with ServerProcess(rpm=600, tpm=10_000_000, bucket_seconds=1.0, latency=0.05, latency_jitter=0.05) as server:
        plain = openai.OpenAI(base_url=server.base_url, api_key="sk-bench", max_retries=0)

        @tenacity.retry(
            retry=tenacity.retry_if_exception_type(openai.RateLimitError),
            wait=tenacity.wait_random_exponential(min=1, max=60),
            stop=tenacity.stop_after_attempt(6),
        )
        def one(prompt: str) -> Any:
            return plain.completions.create(model=MODEL, prompt=prompt, max_tokens=4).choices[0]

        def guarded(prompt: str) -> Optional[Any]:
            try:
                return one(prompt)
            except Exception:
                return None

        start = time.monotonic()
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(guarded, subset))
        wall = time.monotonic() - start
        served = server.stats()
    good = sum(a is not None and _answer_ok(p, a) for p, a in zip(subset, answers))
    rows.append(
        f"| one request per prompt, 32 threads + tenacity | {len(subset)} | {good / wall:.1f} | "
        f"{good / wall / ceiling:.3f} | {served['rate_limited'] / max(1, served['requests']):.2%} | "
        f"{len(subset) - good} |"
    )
    return rows


def tpm_bound(count: int) -> List[str]:
    rng = random.Random(3)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]
    prompts = []
    for i in range(count):
        text = f"{i}: "
        target = rng.randint(100, 600)
        while len(text) < target:
            text += rng.choice(words) + " "
        prompts.append(text[:target])
    with ServerProcess(rpm=100_000, tpm=120_000, bucket_seconds=1.0, latency=0.05, latency_jitter=0.05) as server:
        client = ThrottledClient(base_url=server.base_url, api_key="sk-bench", rpm=100_000, tpm=120_000)
        start = time.monotonic()
        choices = client.map_completions(prompts, model=MODEL, max_tokens=40)
        wall = time.monotonic() - start
        served = server.stats()
    used = served["tokens_charged"]  # the server refunds what was reserved but not generated
    ceiling_tokens = 120_000 / 60
    good = sum(_answer_ok(p, c) for p, c in zip(prompts, choices))
    return [
        f"| map_completions | {count} | {count / wall:.1f} | {used / wall / ceiling_tokens:.3f} | "
        f"{served['rate_limited'] / max(1, served['requests']):.2%} | {count - good} |"
    ]


def memory_child(count: int) -> None:
    """Run in a fresh process: imap over a generator, print peak RSS in MiB as JSON."""
    with ServerProcess() as server:
        client = ThrottledClient(base_url=server.base_url, api_key="sk-bench")
        prompts = (f"line {i}" for i in range(count))
        seen = bad = 0
        for i, choice in client.imap_completions(prompts, model=MODEL, max_tokens=1, batch_size=200):
            bad += i != seen or choice.text != f" echo:line {i}#0"
            seen += 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"count": count, "seen": seen, "bad": bad, "peak_mib": peak}))


def memory(big: int) -> List[str]:
    rows = []
    for count in (10_000, big):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(count)], capture_output=True, text=True, check=True
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(result)
    ratio = rows[1]["peak_mib"] / rows[0]["peak_mib"]
    return [
        f"| imap_completions, {r['count']:,} prompts | {r['peak_mib']:.0f} MiB | {r['count'] - r['seen'] + r['bad']} |"
        for r in rows
    ] + [f"| ratio | {ratio:.2f}× | |"]


def overhead(calls: int) -> List[str]:
    rows = []
    with ServerProcess() as server:
        for label, client in (
            ("openai.OpenAI", openai.OpenAI(base_url=server.base_url, api_key="sk-bench", max_retries=0)),
            ("ThrottledClient (limits learned)", ThrottledClient(base_url=server.base_url, api_key="sk-bench")),
            (
                "ThrottledClient (rpm/tpm given)",
                ThrottledClient(base_url=server.base_url, api_key="sk-bench", rpm=10**6, tpm=10**9),
            ),
        ):

            def one(i: int, client: Any = client) -> None:
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=5
                )

            for i in range(20):  # warm up connections and encoders
                one(i)
            cpu0, wall0 = time.process_time(), time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(calls)))
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            rows.append((label, cpu / calls * 1000, calls / wall))
    base = rows[0][1]
    return [f"| {label} | {ms:.2f} | {ms / base:.2f}× | {rate:.0f} |" for label, ms, rate in rows]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    quick = args.quick
    print("### RPM-bound: 600 RPM, 1 s bucket, max_tokens 4 (ceiling 200 prompts/s at 20 prompts/request)\n")
    print("| how | prompts | prompts/s | / ceiling | 429s per request | lost or misplaced |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rpm_bound(1000 if quick else 4000)))
    print("\n### TPM-bound: 120,000 TPM, 1 s bucket, prompts of 100-600 characters, max_tokens 40\n")
    print("| how | prompts | prompts/s | tokens used / TPM ceiling | 429s per request | lost or misplaced |")
    print("|---|---|---|---|---|---|")
    print("\n".join(tpm_bound(300 if quick else 600)))
    print("\n### Memory: imap_completions over a generator (no limits, 200 prompts/request)\n")
    print("| run | peak RSS | lost or misplaced |")
    print("|---|---|---|")
    print("\n".join(memory(200_000 if quick else 1_000_000)))
    print("\n### Overhead: client CPU per chat request (8 threads, no limits reached)\n")
    print("| client | CPU ms/request | vs bare SDK | requests/s |")
    print("|---|---|---|---|")
    print("\n".join(overhead(500 if quick else 2000)))


if __name__ == "__main__":
    main()
