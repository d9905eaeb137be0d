"""Label and embed support tickets from asyncio code: results in input order, nothing lost.

    python examples/async_bulk.py [output.jsonl]

``amap_chat_completions`` sends the conversations in parallel, as many at once as the limits allow, and
returns a list aligned with them; ``return_exceptions=True`` keeps going past a failed input and leaves
its exception in its slot. ``aimap_embeddings`` takes any iterable or async iterable (here an async
generator), packs the texts into batches, reads only a bounded window ahead and yields ``(i, vector)``
in input order, so the output can be written as results arrive. Both wait their turn in the client's
one limiter; ``max_wait`` does not apply to bulk calls.

Without OPENAI_API_KEY it runs against the built-in fake server. With it, against OpenAI (or the server
at OPENAI_BASE_URL), at OPENAI_RPM and OPENAI_TPM per minute (default 500 and 200,000).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, AsyncIterator

from throttled_openai import AsyncThrottledClient
from throttled_openai.testing import FakeOpenAI

TICKETS = [f"Ticket {i}: my {'invoice' if i % 2 else 'password'} does not work" for i in range(100)]
SYSTEM = {"role": "system", "content": "Label the ticket: billing, account or other. Answer with the label."}


async def tickets() -> AsyncIterator[str]:
    """The tickets as an async source gives them (a database cursor, a queue): read as they are needed."""
    for ticket in TICKETS:
        yield ticket


def label_of(reply: Any) -> str:
    """A reply's label, or what went wrong (``return_exceptions=True`` leaves the exception in its slot)."""
    if isinstance(reply, Exception):
        return f"error: {reply!r}"
    return (reply.choices[0].message.content or "").strip()


async def main(target: Path) -> None:
    with ExitStack() as stack:
        if os.environ.get("OPENAI_API_KEY"):  # the SDK reads OPENAI_API_KEY and OPENAI_BASE_URL itself
            rpm, tpm = float(os.environ.get("OPENAI_RPM", 500)), float(os.environ.get("OPENAI_TPM", 200_000))
            client = AsyncThrottledClient(rpm=rpm, tpm=tpm)
        else:
            server = stack.enter_context(FakeOpenAI(rpm=3_000, tpm=500_000, bucket_seconds=1.0, latency=0.05))
            server.inject("500", count=3)  # a few server errors: retried, not lost
            client = AsyncThrottledClient(base_url=server.base_url, api_key="sk-fake", rpm=3_000, tpm=500_000)

        async with client:  # closes its connections at the end
            conversations = [[SYSTEM, {"role": "user", "content": ticket}] for ticket in TICKETS]
            replies = await client.amap_chat_completions(
                conversations, model="gpt-4o-mini", max_tokens=3, temperature=0, return_exceptions=True
            )
            labels = [label_of(reply) for reply in replies]

            written = 0
            with target.open("w") as out:
                async for i, vector in client.aimap_embeddings(tickets(), model="text-embedding-3-small"):
                    row = {"i": i, "ticket": TICKETS[i], "label": labels[i], "embedding": vector}
                    out.write(json.dumps(row) + "\n")
                    written += 1
            stats = client.stats()

    failed = sum(isinstance(reply, Exception) for reply in replies)
    print(f"{len(labels)} labels, {failed} failed; wrote {written} embeddings to {target}")
    print(f"{stats.calls} calls, {stats.requests} requests, {stats.retries} retries, {stats.total_429s} 429s")


if __name__ == "__main__":
    default = Path(tempfile.mkdtemp(prefix="async-bulk-")) / "tickets.jsonl"
    asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else default))
