"""A script written for openai<1, run unchanged but for its import line.

The code below is the Cookbook rate-limit guide's: a tenacity retry around ``Completion.create``, a
loop that used to hit 429s, and a batched ``prompt`` matched back by ``choice.index``. With
``import throttled_openai.legacy as openai`` every call waits its turn under the limits instead.
Without OPENAI_API_KEY this runs against the built-in fake server.

    python examples/legacy_script.py
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any

from tenacity import retry, stop_after_attempt, wait_random_exponential

import throttled_openai.legacy as openai  # was: import openai
from throttled_openai.testing import FakeOpenAI

with ExitStack() as stack:
    if not os.environ.get("OPENAI_API_KEY"):
        server = stack.enter_context(FakeOpenAI(rpm=120, tpm=90_000, bucket_seconds=1.0, latency=0.02))
        openai.api_key, openai.api_base = "sk-fake", server.base_url
    openai.rpm, openai.tpm = 120, 90_000  # the only new lines: your limits (or leave them to be learned)

    @retry(wait=wait_random_exponential(min=1, max=60), stop=stop_after_attempt(6))
    def completion_with_backoff(**kwargs: Any) -> Any:
        return openai.Completion.create(**kwargs)

    for _ in range(10):  # two requests per second allowed: paced, not refused
        response = completion_with_backoff(model="gpt-3.5-turbo-instruct", prompt="Once upon a time,", max_tokens=10)
    print("last story:", "Once upon a time," + response.choices[0].text)

    prompts = [f"Once upon a time, story {i}," for i in range(10)]
    response = openai.Completion.create(model="gpt-3.5-turbo-instruct", prompt=prompts, max_tokens=20)
    stories = [""] * len(prompts)
    for choice in response.choices:
        stories[choice.index] = prompts[choice.index] + choice["text"]
    print("\n".join(stories))

    client = openai.get_client()
    assert client is not None
    print(client.stats())
