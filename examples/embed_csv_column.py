"""Embed one column of a CSV file and write the vectors next to it, as JSON Lines.

    python examples/embed_csv_column.py [input.csv] [column] [output.jsonl]

With no arguments it writes a small sample CSV first. Without OPENAI_API_KEY it runs against the
built-in fake server. imap_embeddings reads the rows as it goes, so the file can be larger than memory.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from throttled_openai import ThrottledClient
from throttled_openai.testing import FakeOpenAI

args = sys.argv[1:]
if args:
    source, column = Path(args[0]), args[1]
    target = Path(args[2]) if len(args) > 2 else source.with_suffix(".embeddings.jsonl")
else:
    folder = Path(tempfile.mkdtemp(prefix="embed-example-"))
    source, column, target = folder / "reviews.csv", "text", folder / "reviews.embeddings.jsonl"
    with source.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "text"])
        writer.writeheader()
        writer.writerows(
            {"id": i, "text": f"Review {i}: the product was {'great' if i % 3 else 'poor'}."} for i in range(1_000)
        )

with ExitStack() as stack:
    if os.environ.get("OPENAI_API_KEY"):
        client = ThrottledClient(rpm=3_000, tpm=1_000_000)
    else:
        server = stack.enter_context(FakeOpenAI(rpm=3_000, tpm=1_000_000))
        client = ThrottledClient(base_url=server.base_url, api_key="sk-fake")

    with source.open(newline="") as rows, target.open("w") as out:
        texts = (row[column] for row in csv.DictReader(rows))
        written = 0
        for i, vector in client.imap_embeddings(texts, model="text-embedding-3-small"):
            out.write(json.dumps({"row": i, "embedding": vector}) + "\n")
            written += 1

    print(f"wrote {written} embeddings to {target} using {client.stats().requests} requests")
