"""From a loop of openai.Completion.create calls to one map_completions call.

Before (openai<1, one request per prompt, a retry decorator, 429 -> sleep -> 429):

    for prompt in prompts:
        response = completion_with_backoff(model="gpt-3.5-turbo-instruct", prompt=prompt, max_tokens=20)
        answers.append(response["choices"][0]["text"])

After: prompts are packed 20 to a request, sent as fast as the limits allow from a thread pool,
and put back in input order by each choice's index. Without OPENAI_API_KEY this runs against the
built-in fake server.

    python examples/completion_loop_to_map.py
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack

from throttled_openai import ThrottledClient
from throttled_openai.testing import FakeOpenAI

prompts = [f"Write a tagline for an ice cream shop, version {i}:" for i in range(200)]

with ExitStack() as stack:
    if os.environ.get("OPENAI_API_KEY"):
        client = ThrottledClient(rpm=3_500, tpm=90_000)
    else:
        server = stack.enter_context(FakeOpenAI(rpm=120, tpm=90_000, bucket_seconds=1.0, latency=0.05))
        client = ThrottledClient(base_url=server.base_url, api_key="sk-fake", rpm=120, tpm=90_000)

    started = time.monotonic()
    choices = client.map_completions(prompts, model="gpt-3.5-turbo-instruct", max_tokens=20)
    answers = [choice.text.strip() for choice in choices]  # answers[i] belongs to prompts[i]

    stats = client.stats()
    print(
        f"{len(answers)} answers in {time.monotonic() - started:.1f}s with {stats.requests} requests "
        f"(one per prompt would have been {len(prompts)}), {stats.total_429s} 429s"
    )
    print("first:", answers[0])
