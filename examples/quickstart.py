"""The smallest useful program: one ThrottledClient, a loop of calls, never a 429.

With OPENAI_API_KEY set it calls OpenAI; without, it starts the built-in fake server so it runs anywhere.

    python examples/quickstart.py
"""

from __future__ import annotations

import os
from contextlib import ExitStack

from throttled_openai import ThrottledClient
from throttled_openai.testing import FakeOpenAI

with ExitStack() as stack:
    if os.environ.get("OPENAI_API_KEY"):
        client = ThrottledClient(rpm=500, tpm=200_000)  # your tier's limits for the model
    else:
        server = stack.enter_context(FakeOpenAI(rpm=120, tpm=20_000, bucket_seconds=1.0))
        client = ThrottledClient(base_url=server.base_url, api_key="sk-fake", rpm=120, tpm=20_000)

    for word in ["rate", "limit", "token", "bucket", "retry"]:
        reply = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"Define '{word}' in five words."}],
            max_tokens=20,
        )
        print(word, "->", reply.choices[0].message.content)

    print(client.stats())
