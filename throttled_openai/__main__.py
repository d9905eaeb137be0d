"""Command line: ``python -m throttled_openai demo|run`` (also installed as ``throttled-openai``).

``run`` processes a JSONL file of request bodies (see :mod:`throttled_openai.cli`). The demo needs
no API key and no network: it starts the fake OpenAI server from
:mod:`throttled_openai.testing` in-process with strict limits, runs a few thousand chat completions
through one :class:`ThrottledClient` from many threads, and prints what happened.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

from . import cli
from .client import ThrottledClient
from .testing import FakeOpenAI

__all__ = ["main"]

#: ``--help``'s description: plain text (the module docstring is reST).
DESCRIPTION = """\
Call the OpenAI API as fast as your rate limits allow, and never faster.

  demo  a throttled burst against a built-in fake server: no API key, no network
  run   a JSONL file of requests under the rate limits, resumably

"throttled-openai COMMAND --help" (or "python -m throttled_openai COMMAND
--help") tells more.
"""


def demo(requests: int, threads: int, rpm: float, tpm: float, latency: float) -> int:
    """Run the demo; return a process exit code (0 when every request got its result)."""
    print(
        f"Fake OpenAI server on 127.0.0.1: {rpm:g} requests/min and {tpm:g} tokens/min, enforced over a "
        f"1-second bucket, {latency * 1000:.0f} ms latency.\n"
        f"Sending {requests} chat completions from {threads} threads through one ThrottledClient "
        f"(no limits given: it learns them from the headers)..."
    )
    with FakeOpenAI(rpm=rpm, tpm=tpm, bucket_seconds=1.0, latency=latency, latency_jitter=latency / 2) as server:
        client = ThrottledClient(base_url=server.base_url, api_key="sk-demo")
        started = time.monotonic()

        def one(i: int) -> str:
            reply = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"Say something about the number {i}."}],
                max_tokens=20,
            )
            return reply.choices[0].message.content or ""

        with ThreadPoolExecutor(threads) as pool:
            replies: List[str] = list(pool.map(one, range(requests)))
        elapsed = time.monotonic() - started
        served = server.stats()
    stats = client.stats()
    # The ceiling: the server's requests per second, or its tokens per second over the tokens one
    # request really uses, whichever binds; plus the one second of budget its bucket starts with.
    tokens_per_request = stats.tokens_used / max(1, stats.calls)
    rate = min(rpm / 60.0, tpm / 60.0 / max(1.0, tokens_per_request))
    ceiling = rate * (1.0 + 1.0 / elapsed)
    achieved = len(replies) / elapsed
    print(
        f"\n  results received       {sum(1 for r in replies if r)} of {requests}\n"
        f"  wall time              {elapsed:.1f} s\n"
        f"  throughput             {achieved:.1f} requests/s\n"
        f"  ceiling of the limits  {ceiling:.1f} requests/s  ->  {achieved / ceiling:.0%} of the ceiling\n"
        f"  HTTP requests sent     {stats.requests}  (retries {stats.retries})\n"
        f"  429s from the server   {served['rate_limited']}  ({served['rate_limited'] / max(1, stats.requests):.2%})\n"
        f"  waiting for capacity   {stats.wait_seconds / max(1, stats.calls):.2f} s per call on average "
        f"({stats.wait_seconds:.1f} s summed over {threads} threads), {stats.max_wait_seconds:.2f} s at most\n"
        f"  tokens reserved / used {stats.tokens_reserved} / {stats.tokens_used}\n"
        f"  limiter                {client.limiter!r}"
    )
    return 0 if all(replies) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="throttled-openai", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "demo",
        help="run a throttled burst against a built-in fake server",
        description="Send chat completions from many threads through one ThrottledClient to a fake OpenAI "
        "server started in this process, with strict limits, and print throughput against the limits' "
        "ceiling, 429s and time spent waiting. Needs no API key and no network.",
    )
    run.add_argument("--requests", type=int, default=1500, help="chat completions to send (default 1500)")
    run.add_argument("--threads", type=int, default=32, help="worker threads (default 32)")
    run.add_argument("--rpm", type=float, default=6000, help="the fake server's requests per minute (default 6000)")
    run.add_argument("--tpm", type=float, default=150_000, help="the fake server's tokens per minute (default 150000)")
    run.add_argument("--latency", type=float, default=0.05, help="the fake server's latency, seconds (default 0.05)")
    cli.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "run":
        return cli.execute(args)
    for name in ("requests", "threads", "rpm", "tpm"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0")
    if args.latency < 0:
        parser.error("--latency must be >= 0")
    return demo(args.requests, args.threads, args.rpm, args.tpm, args.latency)


if __name__ == "__main__":
    sys.exit(main())
