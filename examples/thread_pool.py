"""Many threads, one client: the shared limiter keeps all of them under the limit together.

This is the shape of a bulk job written with concurrent.futures, or of a web app whose request
threads share one client. ``max_wait`` bounds how long any call may wait for capacity: in a web view,
catch RateLimitTimeout and answer 503 with ``Retry-After: exc.retry_after``.

    python examples/thread_pool.py
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

from throttled_openai import RateLimitTimeout, ThrottledClient
from throttled_openai.testing import FakeOpenAI

with ExitStack() as stack:
    if os.environ.get("OPENAI_API_KEY"):
        client = ThrottledClient(max_wait=30)  # limits learned from the response headers
    else:
        server = stack.enter_context(FakeOpenAI(rpm=3_000, tpm=300_000, bucket_seconds=1.0, latency=0.05))
        client = ThrottledClient(base_url=server.base_url, api_key="sk-fake", max_wait=30)

    def classify(text: str) -> str:
        try:
            reply = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[
                    {"role": "system", "content": "Answer positive, negative or neutral."},
                    {"role": "user", "content": text},
                ],
                max_tokens=3,
            )
        except RateLimitTimeout as exc:
            return f"busy, retry in {exc.retry_after:.1f}s"
        return reply.choices[0].message.content or ""

    reviews = [f"Review number {i}: it was fine." for i in range(100)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        labels = list(pool.map(classify, reviews))

    stats = client.stats()
    print(
        f"{len(labels)} labels, {stats.requests} requests, {stats.total_429s} 429s, "
        f"{stats.wait_seconds:.1f}s spent waiting in total"
    )
