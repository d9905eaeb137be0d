"""Classify reviews through OpenAI's Batch API: half the price, results within 24 hours, resumable.

    python examples/batch_job.py [state.json]

With OPENAI_API_KEY set, run it, stop it (Ctrl-C, or kill it), and run it again with the same state
file: the second run finds the batches the first one created and collects them, instead of submitting
(and paying for) them again. Without a key it runs against the built-in fake server, whose batches
finish in a second (a new fake each run: its batches do not outlive it).
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import ExitStack

from throttled_openai import BatchRequestError, ThrottledClient
from throttled_openai.testing import FakeOpenAI

state = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(prefix="batch-example-"), "job.json")
reviews = [f"Review {i}: the product was {'great' if i % 3 else 'poor'}." for i in range(500)]
conversations = [
    [{"role": "system", "content": "Answer positive or negative."}, {"role": "user", "content": review}]
    for review in reviews
]

with ExitStack() as stack:
    if os.environ.get("OPENAI_API_KEY"):
        client = ThrottledClient()
        polling = {}  # every 5 s at first, then less often, up to once a minute
    else:
        server = stack.enter_context(FakeOpenAI(batch_speed=2_000))
        client = ThrottledClient(base_url=server.base_url, api_key="sk-fake")
        polling = {"poll_interval": 0.1, "max_poll_interval": 0.5}

    # Submits the batches now (or, with a state file from an earlier run, picks that job up).
    job = client.batch_chat_completions(conversations, model="gpt-4o-mini", state=state, max_tokens=3, **polling)
    print(job)
    job.wait(progress=True)  # Ctrl-C here leaves the batches running: run again to collect them
    answers = job.results(return_exceptions=True)

failed = sum(isinstance(answer, BatchRequestError) for answer in answers)
print(f"{len(answers) - failed} answers, {failed} failed, {job.tokens_used} tokens billed at the Batch API's price")
print("first:", answers[0].choices[0].message.content if not failed else answers[0])
