"""Faults that end a response badly, measured side by side in one run against the fake server.

The fake server (in its own process) injects, at seeded random, the faults of issue 11 beside the
usual ones: a 200 whose JSON is cut short, an empty 200, a proxy's HTML page with status 200, a 200
whose body is an error object, 502/504 HTML pages from a gateway, plus 500s, 503s, dropped
connections and 429s. Each scenario counts, for every input: its own right result, a wrong one, or
an exception (lost, unless it names the fault and the policy gave up).

1. plain: 600 chat calls from 16 threads on one client (2 % of each fault kind: 20 % of requests), ThrottledClient
   against the bare SDK (its own retries: 2).
2. bulk: map_completions over 2,000 prompts, 20 per request (a heavier mix: 3 % of each kind).
3. streams: 300 streamed chat calls, 5 % cut before their final event: every cut one must raise
   (IncompleteStream) where it is read; none may pass for whole.

    python benchmarks/bench_faults.py     # about 1 minute
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import openai

from throttled_openai import Retry, ThrottledClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import ServerProcess

KINDS = ("stream_cut", "empty_200", "html_200", "error_200", "502_html", "504_html", "500", "503", "drop", "429")
CHAT = "gpt-4o-mini"
INSTRUCT = "gpt-3.5-turbo-instruct"
POLICY = Retry(backoff_base=0.05, backoff_max=0.5)  # the default 6 retries, with short waits


def _count(outcomes: List[Any], ok: Callable[[int, Any], bool]) -> Tuple[int, int, Dict[str, int]]:
    """(right, wrong, exceptions by type) over the outcomes of one run."""
    right = wrong = 0
    raised: Dict[str, int] = {}
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            raised[type(outcome).__name__] = raised.get(type(outcome).__name__, 0) + 1
        elif ok(i, outcome):
            right += 1
        else:
            wrong += 1
    return right, wrong, raised


def _row(name: str, total: int, right: int, wrong: int, raised: Dict[str, int], served: Dict[str, int]) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in sorted(raised.items())) or "none"
    return (
        f"| {name} | {total} | {right} | {wrong} | {total - right - wrong} ({errors}) | "
        f"{served['requests']} | {served['faults']} |"
    )


def plain(calls: int, rate: float, seed: int) -> List[str]:
    rows = []
    for name in ("ThrottledClient", "openai.OpenAI"):
        with ServerProcess(fault_rates=dict.fromkeys(KINDS, rate), seed=seed, latency=0.005) as server:
            if name == "ThrottledClient":
                client: Any = ThrottledClient(base_url=server.base_url, api_key="sk-bench", retry=POLICY)
            else:
                client = openai.OpenAI(base_url=server.base_url, api_key="sk-bench")

            def call(i: int, client: Any = client) -> Any:
                try:
                    return client.chat.completions.create(
                        model=CHAT, messages=[{"role": "user", "content": f"call {i}"}], max_tokens=2
                    )
                except Exception as exc:
                    return exc

            with ThreadPoolExecutor(16) as pool:
                outcomes = list(pool.map(call, range(calls)))
            served = server.stats()
            client.close()

        def ok(i: int, reply: Any) -> bool:
            try:
                return bool(reply.choices[0].message.content == f"echo:call {i}#0")
            except Exception:
                return False

        rows.append(_row(f"plain calls, {name}", calls, *_count(outcomes, ok), served))
    return rows


def bulk(prompts: int, rate: float, seed: int) -> List[str]:
    texts = [f"prompt {i}" for i in range(prompts)]
    with ServerProcess(fault_rates=dict.fromkeys(KINDS, rate), seed=seed, latency=0.005) as server:
        client = ThrottledClient(base_url=server.base_url, api_key="sk-bench", retry=POLICY)
        outcomes = client.map_completions(texts, model=INSTRUCT, max_tokens=2, return_exceptions=True)
        served = server.stats()
        client.close()

    def ok(i: int, choice: Any) -> bool:
        return bool(choice.text == f" echo:{texts[i][:40]}#0" and choice.index == i)

    return [_row("map_completions, ThrottledClient", prompts, *_count(outcomes, ok), served)]


def streams(calls: int, rate: float, seed: int) -> List[str]:
    with ServerProcess(fault_rates={"stream_cut": rate}, seed=seed, latency=0.005) as server:
        client = ThrottledClient(base_url=server.base_url, api_key="sk-bench", retry=POLICY)
        whole = cut_raised = 0
        for i in range(calls):
            text, raised = "", False
            try:
                for chunk in client.chat.completions.create(
                    model=CHAT, messages=[{"role": "user", "content": f"s{i}"}], max_tokens=2, stream=True
                ):
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
            except openai.APIError:
                raised = True
            if raised:
                cut_raised += 1
            elif text == f"echo:s{i}#0":
                whole += 1
        served = server.stats()
        client.close()
    # A cut that kept the whole (short) text still lost its usage and [DONE]: only raising tells.
    return [
        f"| {calls} | {served['faults']} | {whole} | {cut_raised} | {served['faults'] - cut_raised} | "
        f"{client.stats().errors.get('incomplete_stream', 0)} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    started = time.monotonic()
    print("| run | inputs | right | wrong | lost (exceptions) | requests | faults injected |")
    print("|---|---|---|---|---|---|---|")
    for row in plain(600, 0.02, args.seed) + bulk(2000, 0.03, args.seed):
        print(row)
    print()
    print("| streams | cut by the server | right text, no error | cut, raised | cut, not raised | counted |")
    print("|---|---|---|---|---|---|")
    for row in streams(300, 0.05, args.seed):
        print(row)
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
