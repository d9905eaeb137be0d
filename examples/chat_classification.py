"""Classify texts with chat completions, many in parallel, nothing lost.

Chat conversations cannot share a request, so map_chat_completions runs them in parallel, as many at
once as the limits allow. return_exceptions=True keeps going past a failed input and leaves its
exception in its slot. Without OPENAI_API_KEY it runs against the built-in fake server.

    python examples/chat_classification.py
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import ExitStack

from throttled_openai import ThrottledClient
from throttled_openai.testing import FakeOpenAI

tickets = [f"Ticket {i}: my {'invoice' if i % 2 else 'password'} does not work" for i in range(150)]
conversations = [
    [
        {"role": "system", "content": "Label the ticket: billing, account or other. Answer with the label."},
        {"role": "user", "content": ticket},
    ]
    for ticket in tickets
]

with ExitStack() as stack:
    if os.environ.get("OPENAI_API_KEY"):
        client = ThrottledClient(rpm=500, tpm=200_000)
    else:
        server = stack.enter_context(FakeOpenAI(rpm=3_000, tpm=500_000, bucket_seconds=1.0, latency=0.05))
        server.inject("500", count=3)  # a few server errors: retried, not lost
        client = ThrottledClient(base_url=server.base_url, api_key="sk-fake", rpm=3_000, tpm=500_000)

    replies = client.map_chat_completions(
        conversations, model="gpt-4o-mini", max_tokens=3, temperature=0, return_exceptions=True
    )
    labels = [
        f"error: {reply!r}" if isinstance(reply, Exception) else (reply.choices[0].message.content or "").strip()
        for reply in replies
    ]
    stats = client.stats()
    print(
        f"{len(labels)} labels, {sum(isinstance(r, Exception) for r in replies)} failed, "
        f"{stats.retries} retries, {stats.total_429s} 429s"
    )
    print(Counter(label.split("#")[0] for label in labels).most_common(3))
