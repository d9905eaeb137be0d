"""One process of ``bench_redis.py``: threads making chat calls through one ThrottledClient.

Run as ``python benchmarks/_redis_worker.py CONFIG_JSON``. CONFIG_JSON holds ``base_url``, ``redis_url``
(``null``: the client's own in-process ``RateLimiter``), ``rpm`` and ``tpm`` (``null``: learned from the
server's headers), ``threads``, ``calls`` (this process's share), ``max_tokens`` and, optionally,
``on_error`` (the ``RedisRateLimiter``'s, default ``"raise"``). It sets up, prints
``ready``, waits for a line on stdin (so that every process starts together), then prints one JSON line:
the ``time.monotonic()`` of every completion and of every HTTP request sent (CLOCK_MONOTONIC is one clock
for every process on Linux), the tokens each completed call used, the names of the exceptions of failed
calls (and the first message of each kind, with its time), and the CPU seconds this process spent between
the go and the last call. The library's warnings go to stderr.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import openai

from throttled_openai import RateLimiter, RedisRateLimiter, ThrottledClient, TokenCounter

MODEL = "gpt-4o-mini"


def main() -> None:
    config: Dict[str, Any] = json.loads(sys.argv[1])
    rpm: Optional[float] = config["rpm"]
    tpm: Optional[float] = config["tpm"]
    sent: List[float] = []
    http_client = openai.DefaultHttpxClient(event_hooks={"request": [lambda _request: sent.append(time.monotonic())]})
    if config["redis_url"]:
        limiter: RateLimiter = RedisRateLimiter(config["redis_url"], rpm, tpm, on_error=config.get("on_error", "raise"))
    else:
        limiter = RateLimiter(rpm, tpm)
    client = ThrottledClient(base_url=config["base_url"], api_key="sk-bench", limiter=limiter, http_client=http_client)
    TokenCounter().count("warm up", MODEL)  # load tiktoken's encoding now, not in the first timed call

    done_at: List[float] = []
    used: List[int] = []
    failures: List[str] = []
    first_error: Dict[str, str] = {}  # exception name -> the first message of that kind
    lock = threading.Lock()
    left = [int(config["calls"])]

    def work() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
                number = left[0]
            try:
                reply = client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"Write a short line about the number {number}."}],
                    max_tokens=config["max_tokens"],
                )
            except Exception as error:
                with lock:
                    failures.append(type(error).__name__)
                    first_error.setdefault(type(error).__name__, f"{time.monotonic():.3f} {error}")
                continue
            with lock:
                done_at.append(time.monotonic())
                used.append(reply.usage.total_tokens if reply.usage else 0)

    print("ready", flush=True)
    sys.stdin.readline()
    cpu = time.process_time()
    threads = [threading.Thread(target=work) for _ in range(int(config["threads"]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu = time.process_time() - cpu
    report = {"done_at": done_at, "sent_at": sent, "used": used, "failures": failures, "cpu": cpu}
    report["first_error"] = first_error
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
