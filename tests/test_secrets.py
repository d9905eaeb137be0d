"""The API key never shows: not in logs at any level, exception messages, ``repr()``, ``stats()``, the
limiter's keys, nor in the CLI's output, files or summary. One run provokes as many code paths as it can
(retries, rate limits, timeouts, quota, auth failures, bulk failures, the CLI) and greps them all.

``test_client.py::test_the_key_never_shows`` checks a few of these for one call; this goes wide.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Iterator, List

import openai
import pytest

from throttled_openai import (
    BulkError,
    BulkTimeout,
    Limits,
    RateLimiter,
    RateLimitTimeout,
    RequestTooLarge,
    Retry,
    ThrottledAzureClient,
    ThrottledClient,
    cli,
)
from throttled_openai.testing import FakeOpenAI

SECRET = "sk-proj-RELIABILITY7f3a9c2e1d8b4a6f0e5c3b2a1d9f8e7c6b5a4"
# Pieces of the key that would betray it even if cut or masked differently: the key minus its first 5
# and last 4 characters (OpenAI's own mask keeps those) and a few shorter runs.
MIDDLE = SECRET[5:-4]
PIECES = [SECRET, MIDDLE, "RELIABILITY7f3a", "9c2e1d8b4a6f0e5c", "3b2a1d9f8e7c6b5a"]
INSTRUCT = "gpt-3.5-turbo-instruct"
CHAT = "gpt-4o-mini"
FAST = Retry(backoff_base=0.01, backoff_max=0.05)


def leaks(text: str) -> List[str]:
    return [piece for piece in PIECES if piece in text]


class Everything(logging.Handler):
    """Keeps every record of every logger, formatted, with its raw arguments and extras."""

    def __init__(self) -> None:
        super().__init__(level=1)
        self.texts: List[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        self.texts.append(text + " " + repr(record.args) + " " + repr(vars(record)))


@pytest.fixture
def logs() -> Iterator[Everything]:
    """Every logger at its most verbose level (1, below DEBUG) for the duration of the test."""
    handler = Everything()
    root = logging.getLogger()
    names = ["", "throttled_openai", "openai", "httpx", "httpcore", "httpx2", "httpcore2", "urllib3"]
    saved = {name: logging.getLogger(name).level for name in names}
    root.addHandler(handler)
    for name in names:
        logging.getLogger(name).setLevel(1)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def describe(error: BaseException) -> str:
    """All an error can show: str, repr, args, the chain, and a formatted traceback."""
    parts = []
    seen = set()
    current: Any = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current), repr(getattr(current, "args", ())), repr(getattr(current, "body", ""))]
        for attr in ("results", "errors"):
            if hasattr(current, attr):
                parts.append(repr(getattr(current, attr)))
        current = current.__cause__ or current.__context__
    parts.append("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    return "\n".join(parts)


def test_the_key_never_shows_in_logs_errors_reprs_stats_or_limiter_keys(logs: Everything) -> None:
    shown: List[str] = []
    errors: List[BaseException] = []

    def expect(kind: Any, call: Any) -> None:
        try:
            call()
        except kind as exc:
            errors.append(exc)
        else:
            raise AssertionError(f"expected {kind}")

    ask = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with FakeOpenAI(rpm=6000, tpm=1_000_000, bucket_seconds=1.0, quota_tokens=400, slow_seconds=0.6) as server:
        client = ThrottledClient(base_url=server.base_url, api_key=SECRET, retry=FAST, rpm=6000, tpm=1_000_000)
        # successes and every retried fault
        for fault in ("500", "503", "429", "429_message_only", "drop", "truncate"):
            server.inject(fault)
            client.chat.completions.create(**ask)
        server.inject("slow")
        client.with_options(timeout=0.2).chat.completions.create(**ask)
        stream = client.chat.completions.create(**ask, stream=True)
        shown += [repr(chunk) for chunk in stream]
        # errors raised to the caller
        server.inject("500", 2)  # faults are used in order: inject exactly what each call consumes
        expect(openai.InternalServerError, lambda: client.with_options(max_retries=1).chat.completions.create(**ask))
        server.inject("drop", 2)
        expect(openai.APIConnectionError, lambda: client.with_options(max_retries=1).chat.completions.create(**ask))
        server.inject("slow", 1)
        expect(
            openai.APITimeoutError,
            lambda: client.with_options(max_retries=0, timeout=0.1).chat.completions.create(**ask),
        )
        server.inject("400")
        expect(openai.BadRequestError, lambda: client.chat.completions.create(**ask))
        server.inject("too_large")
        expect(openai.RateLimitError, lambda: client.chat.completions.create(**ask))
        expect(RequestTooLarge, lambda: client.completions.create(model=INSTRUCT, prompt=["x"] * 2000, max_tokens=1000))
        with FakeOpenAI() as unlimited:  # sends no limits: the client's own 1 RPM burst holds
            slow = ThrottledClient(base_url=unlimited.base_url, api_key=SECRET, retry=FAST, rpm=60, max_wait=0.1)
            slow.chat.completions.create(**ask)
            expect(RateLimitTimeout, lambda: slow.chat.completions.create(**ask))
        # bulk failures
        server.inject("500", 1)
        expect(
            BulkError,
            lambda: client.with_options(max_retries=0).map_completions(["a", "b"], model=INSTRUCT, max_tokens=1),
        )
        server.inject("missing_choice", 2)
        results = client.map_completions(["c", "d"], model=INSTRUCT, max_tokens=1, return_exceptions=True)
        errors += [r for r in results if isinstance(r, BaseException)]
        with FakeOpenAI(latency=0.3) as lagging:
            late = ThrottledClient(base_url=lagging.base_url, api_key=SECRET, retry=FAST, rpm=6000)
            expect(BulkTimeout, lambda: late.map_chat_completions([ask["messages"]] * 3, model=CHAT, run_timeout=0.1))
            late.close()
        # the quota runs out
        expect(openai.RateLimitError, lambda: [client.chat.completions.create(**ask) for _ in range(200)])
        # what a user looks at
        for c in (client, slow):
            shown += [repr(c), str(c), repr(c.limiter), str(c.limiter), repr(c.stats()), str(c.limiter.snapshot())]
            shown += [repr(key) for key in c.limiter._keys]  # the limiter's keys (what a shared store would use)
            shown += [repr(vars(c.stats())), repr(c.retry)]
        reservation = client.limiter.acquire(next(iter(client.limiter._keys)), 1)
        shown.append(repr(reservation))
        client.limiter.cancel(reservation)
        client.close()
        slow.close()

    # a key the server refuses: its 401 message masks it like OpenAI does; nothing of ours adds it back
    with FakeOpenAI(api_keys=["sk-the-right-one-000000"]) as server:
        refused = ThrottledClient(base_url=server.base_url, api_key=SECRET, retry=FAST)
        expect(openai.AuthenticationError, lambda: refused.chat.completions.create(**ask))
        expect(BulkError, lambda: refused.map_embeddings(["e"], model="text-embedding-3-small"))
        shown += [repr(refused), repr(refused.limiter), repr(refused.stats())]
        azure = ThrottledAzureClient(
            azure_endpoint=server.azure_endpoint, api_key=SECRET, api_version="2024-06-01", retry=FAST, rpm=600
        )
        expect(openai.AuthenticationError, lambda: azure.with_options().chat.completions.create(**ask))
        shown += [repr(azure), repr(azure.limiter), repr(azure.stats())]

    shared = RateLimiter(limits={CHAT: Limits(rpm=600)})
    shown.append(repr(ThrottledClient(base_url="http://127.0.0.1:9/v1", api_key=SECRET, limiter=shared).limiter))

    assert len(errors) >= 14
    assert logs.texts, "the retries above were logged"
    for text in shown:
        assert not leaks(text), text
    for error in errors:
        assert not leaks(describe(error)), describe(error)
    for text in logs.texts:
        assert not leaks(text), text


# -- the CLI ------------------------------------------------------------------------------------


def requests_file(folder: Path) -> Path:
    lines = [{"model": INSTRUCT, "prompt": f"p{i}", "max_tokens": 2, "metadata": {"i": i}} for i in range(25)]
    lines += [{"model": CHAT, "messages": [{"role": "user", "content": "c"}], "max_tokens": 2}]
    lines += [{"model": "text-embedding-3-small", "input": "e"}, {"prompt": "no model"}]
    path = folder / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "{broken\n")
    return path


def all_files(folder: Path) -> str:
    return "\n".join(path.read_text(errors="replace") for path in sorted(folder.rglob("*")) if path.is_file())


@pytest.mark.parametrize("fmt", ["native", "cookbook"])
def test_the_cli_never_prints_or_writes_the_key(
    tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str], logs: Everything
) -> None:
    source = requests_file(tmp_path)
    with FakeOpenAI(rpm=6000, tpm=1_000_000, quota_tokens=60) as server:
        server.inject("500", 2)
        server.inject("429", 1)
        base = [str(source), "-o", str(tmp_path / "out.jsonl"), "--format", fmt, "--base-url", server.base_url]
        assert cli.main([*base, "--api-key", SECRET, "--no-progress"]) == 1  # quota and bad lines fail
        assert cli.main([*base, "--api-key", SECRET, "--no-progress", "--retry-failed", "--ordered"]) == 1
        with pytest.raises(SystemExit):  # a usage error, with the key on the command line
            cli.main([*base, "--api-key", SECRET, "--rpm", "-1"])
    with FakeOpenAI(api_keys=["sk-the-right-one-000000"]) as server:  # the key is refused
        other = [str(source), "-o", str(tmp_path / "refused.jsonl"), "--base-url", server.base_url]
        assert cli.main([*other, "--api-key", SECRET, "--no-progress"]) == 1
    captured = capsys.readouterr()
    written = all_files(tmp_path)
    assert (tmp_path / "out.jsonl").stat().st_size and (tmp_path / "refused.jsonl").stat().st_size
    assert not leaks(captured.out + captured.err)
    assert not leaks(written)
    for text in logs.texts:
        assert not leaks(text), text


def test_the_cli_in_a_subprocess_never_shows_the_key_from_the_environment(tmp_path: Path) -> None:
    source = requests_file(tmp_path)
    with FakeOpenAI(rpm=6000, tpm=1_000_000, api_keys=[SECRET]) as server:
        server.inject("503", 2)
        env = {**os.environ, "OPENAI_API_KEY": SECRET, "OPENAI_BASE_URL": server.base_url}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        done = subprocess.run(
            [sys.executable, "-m", "throttled_openai", "run", str(source), "-o", str(tmp_path / "out.jsonl")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr  # two bad lines
    assert "lines have a result" in done.stderr
    assert not leaks(done.stdout + done.stderr)
    assert not leaks(all_files(tmp_path))


def test_threads_failing_at_once_keep_the_key_out_of_every_message(logs: Everything) -> None:
    """Many threads hitting errors together: concurrent logging and error paths still never show it."""
    with FakeOpenAI(rpm=6000, tpm=1_000_000, fault_rates={"500": 0.3, "429": 0.2, "drop": 0.2}, seed=5) as server:
        client = ThrottledClient(
            base_url=server.base_url, api_key=SECRET, retry=Retry(max_retries=2, backoff_base=0.01, backoff_max=0.02)
        )
        texts: List[str] = []
        lock = threading.Lock()

        def worker(k: int) -> None:
            for j in range(4):
                try:
                    client.chat.completions.create(
                        model=CHAT, messages=[{"role": "user", "content": f"{k}-{j}"}], max_tokens=2
                    )
                except Exception as exc:
                    with lock:
                        texts.append(describe(exc))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        texts += [repr(client), repr(client.limiter), repr(client.stats())]
        client.close()
    for text in texts + logs.texts:
        assert not leaks(text), text
