"""``throttled-openai run`` against one request per line (the Cookbook's way), in one run.

The fake server runs in its own process: 600 RPM, a 1 s bucket (10 requests/s at most), high TPM,
50-100 ms latency. The input: 4,000 single-prompt completions lines (max_tokens 4). The CLI packs 20
lines per request (ceiling 200 lines/s); one request per line on 32 threads with the plain SDK and a
simple retry on 429 (ceiling 10 lines/s) runs on the first 400 lines, as the whole file would take
7 minutes; its time for 4,000 is projected from its rate. Every result is checked. Then the CLI's
command is run again on its finished output, as a resume would: it reads the output, compares each
line's hash with the input's, and sends nothing; its time is the cost of resuming.

    python benchmarks/bench_cli.py            # about 1.5 minutes
    python benchmarks/bench_cli.py --full     # the Cookbook way on all 4,000 lines too (~8 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gpt-3.5-turbo-instruct"
SERVER = {"rpm": 600, "tpm": 10_000_000, "bucket_seconds": 1.0, "latency": 0.05, "latency_jitter": 0.05}


def requests_file(folder: Path, count: int) -> Path:
    path = folder / "requests.jsonl"
    with path.open("w") as file:
        for i in range(count):
            body = {"model": MODEL, "prompt": f"Classify item {i}: yes or no?", "max_tokens": 4, "metadata": i}
            file.write(json.dumps(body) + "\n")
    return path


def correct(path: Path, count: int) -> int:
    """Lines with exactly one result, and the right one."""
    seen: Dict[int, int] = {}
    good = 0
    for raw in path.read_text().splitlines():
        record = json.loads(raw)
        seen[record["line"]] = seen.get(record["line"], 0) + 1
        prompt = f"Classify item {record['line'] - 1}: yes or no?"
        good += "response" in record and record["response"]["choices"][0]["text"] == f" echo:{prompt[:40]}#0"
    return good if sorted(seen) == list(range(1, count + 1)) and set(seen.values()) == {1} else -1


def run_cli(folder: Path, count: int) -> Dict[str, Any]:
    requests = requests_file(folder, count)
    output = folder / "results.jsonl"
    with ServerProcess(**SERVER) as server:
        env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": server.base_url, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "throttled_openai.cli", str(requests), "-o", str(output), "--rpm", "600"]
        started = time.monotonic()
        done = subprocess.run([*command, "--no-progress"], env=env, capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
        served = server.stats()
        assert done.returncode == 0, done.stderr
        started = time.monotonic()
        again = subprocess.run([*command, "--no-progress"], env=env, capture_output=True, text=True, check=False)
        resume = time.monotonic() - started
        assert again.returncode == 0 and server.stats()["requests"] == served["requests"], again.stderr
    return {"lines": count, "wall": wall, "served": served, "good": correct(output, count), "resume": resume}


def run_per_line(folder: Path, count: int) -> Dict[str, Any]:
    lines = [json.loads(raw) for raw in requests_file(folder, count).read_text().splitlines()]
    output = folder / "per_line.jsonl"
    with ServerProcess(**SERVER) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-bench", max_retries=0)

        def one(number: int, body: Dict[str, Any]) -> Dict[str, Any]:
            request = {k: v for k, v in body.items() if k != "metadata"}
            for attempt in range(6):  # a simple retry: exponential backoff with jitter, on 429 only
                try:
                    response = client.completions.create(**request)
                    return {"line": number, "request": request, "response": response.to_dict()}
                except openai.RateLimitError as exc:
                    error = exc
                    time.sleep(random.uniform(0, min(60, 2**attempt)))
            return {"line": number, "request": request, "error": {"type": "rate_limit", "message": str(error)}}

        started = time.monotonic()
        with ThreadPoolExecutor(32) as pool, output.open("w") as file:
            for record in pool.map(one, range(1, count + 1), lines):
                file.write(json.dumps(record) + "\n")
        wall = time.monotonic() - started
        served = server.stats()
    return {"lines": count, "wall": wall, "served": served, "good": max(0, correct(output, count))}


def row(how: str, result: Dict[str, Any], total: int) -> str:
    rate = result["lines"] / result["wall"]
    served = result["served"]
    projected = f"{total / rate:.0f} s" + ("" if result["lines"] == total else " (projected)")
    return (
        f"| {how} | {result['lines']:,} | {result['wall']:.1f} s | {rate:.1f} | {projected} | {served['requests']:,} "
        f"| {served['rate_limited'] / max(1, served['requests']):.1%} | {result['lines'] - result['good']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=4000)
    parser.add_argument("--full", action="store_true", help="one request per line on every line too")
    args = parser.parse_args()
    subset = args.lines if args.full else max(40, args.lines // 10)
    with tempfile.TemporaryDirectory() as folder:
        cli = run_cli(Path(folder), args.lines)
        per_line = run_per_line(Path(folder), subset)
    rows: List[str] = [
        "| how | lines run | wall time | lines/s | time for all lines | HTTP requests | 429s per request "
        "| lost or wrong |",
        "|---|---|---|---|---|---|---|---|",
        row("`throttled-openai run` (20 lines per request)", cli, args.lines),
        row("one request per line, 32 threads + retry (the Cookbook way)", per_line, args.lines),
    ]
    print(f"RPM-bound: {args.lines:,} single-prompt completions lines, 600 RPM, 1 s bucket, 50-100 ms latency\n")
    print("\n".join(rows))
    print(f"\nspeed-up: {(cli['lines'] / cli['wall']) / (per_line['lines'] / per_line['wall']):.1f}x")
    print(f"rerunning the finished job (a resume with nothing to send): {cli['resume']:.2f} s, no request sent")


if __name__ == "__main__":
    main()
