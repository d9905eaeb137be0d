"""One process of a shared-limit test: threads making chat calls through a RedisRateLimiter.

Run as ``python tests/redis_worker.py BASE_URL REDIS_URL THREADS CALLS ON_ERROR``. It prints ``ready`` once
imported, waits for a line on stdin (so every process starts together), then prints one JSON line: how
many calls succeeded, and the names of the exceptions of those that failed. Log lines go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import Counter
from typing import Counter as CounterType

from throttled_openai import RedisRateLimiter, ThrottledClient


def main() -> None:
    base_url, redis_url, threads, calls, on_error = sys.argv[1:6]
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    limiter = RedisRateLimiter(redis_url, on_error=on_error, retry_interval=0.3, timeout=0.5)
    client = ThrottledClient(api_key="sk-shared-test", base_url=base_url, limiter=limiter, max_wait=60)
    outcomes: CounterType[str] = Counter()
    lock = threading.Lock()

    def work() -> None:
        for _ in range(int(calls)):
            try:
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
                )
                outcome = "ok"
            except Exception as error:
                outcome = type(error).__name__
            with lock:
                outcomes[outcome] += 1

    print("ready", flush=True)
    sys.stdin.readline()
    workers = [threading.Thread(target=work) for _ in range(int(threads))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stats = client.stats()
    print(json.dumps({"outcomes": dict(outcomes), "rate_limited": sum(stats.rate_limited.values())}), flush=True)


if __name__ == "__main__":
    main()
