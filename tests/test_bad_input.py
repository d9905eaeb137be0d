"""Bad input: a table of wrong things given to the constructor, the limiter, ``create``, ``map_*``, the
CLI, and wrong things said by the server (malformed rate-limit headers).

Each case must end at once with a clear exception, or be handled as a user would expect; none may hang,
and none may spoil the shared client for other threads: while each case runs, a canary thread keeps
calling through the same client and must get its own answers, and afterwards the limiter holds no
waiting caller and no NaN.
"""

from __future__ import annotations

import http.client
import http.server
import json
import math
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import openai
import pytest

from throttled_openai import (
    Limits,
    RateLimiter,
    RateLimitTimeout,
    RequestTooLarge,
    Retry,
    ThrottledClient,
    cli,
)
from throttled_openai.testing import FakeOpenAI

KEY = "sk-bad-input-0123456789"
INSTRUCT = "gpt-3.5-turbo-instruct"
CHAT = "gpt-4o-mini"
EMBED = "text-embedding-3-small"
FAST = Retry(backoff_base=0.01, backoff_max=0.05)
AT_ONCE = 3.0  # seconds: "at once", generously, on a loaded machine
CASE_BOUND = 15.0  # no case may take longer than this


@dataclass
class Shared:
    server: FakeOpenAI
    client: ThrottledClient
    tmp: Path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    with FakeOpenAI(rpm=60_000, tpm=2_000_000, latency=0.002, context_length=4000) as server:
        client = ThrottledClient(base_url=server.base_url, api_key=KEY, retry=FAST, rpm=60_000, tpm=1_000_000)
        yield Shared(server, client, tmp_path_factory.mktemp("bad-input"))
        client.close()


def ask(content: str, **extra: Any) -> Dict[str, Any]:
    return {"model": CHAT, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def sent(s: Shared, path: str) -> int:
    """Requests the server received on ``path`` (the canary only uses chat completions)."""
    return sum(1 for entry in s.server.requests_log if entry["path"] == "/v1/" + path)


# -- what each case does ------------------------------------------------------------------------

Case = Callable[[Shared], Any]


def ctor(**kwargs: Any) -> Case:
    return lambda s: ThrottledClient(base_url=s.server.base_url, api_key=KEY, **kwargs)


def completion(**kwargs: Any) -> Case:
    body = {"model": INSTRUCT, "prompt": "hello", "max_tokens": 2, **kwargs}
    return lambda s: s.client.completions.create(**body)


def map_completions(prompts: Any, **kwargs: Any) -> Case:
    return lambda s: s.client.map_completions(prompts, model=INSTRUCT, max_tokens=2, **kwargs)


def acquire(tokens: Any, **kwargs: Any) -> Case:
    def run(s: Shared) -> Any:
        limiter = RateLimiter(rpm=600, tpm=6000)
        limiter.acquire(("acct", "m"), 100)
        level = limiter.snapshot()["m"]["tokens_level"]
        limiter.acquire(("acct", "m"), tokens, **kwargs)
        after = limiter.snapshot()["m"]["tokens_level"]
        # Whatever it accepts, it must not hand out budget nobody gave back, nor turn it into NaN.
        assert after is not None and math.isfinite(after) and after <= level + 1e-6, (level, after)
        return after

    return run


def generator_raising_halfway(kind: str) -> Iterator[Any]:
    for i in range(10):
        yield [{"role": "user", "content": f"g{i}"}] if kind == "chat" else f"g{i}"
    raise ValueError("the input file went away halfway")


def imap_chat_raising_halfway(s: Shared) -> None:
    got = []
    with pytest.raises(ValueError, match="went away"):
        for position, reply in s.client.imap_chat_completions(
            generator_raising_halfway("chat"), model=CHAT, max_tokens=2
        ):
            assert reply.choices[0].message.content == f"echo:g{position}#0"
            got.append(position)
    assert got == list(range(10))  # everything read before the failure was sent and delivered


def map_embeddings_raising_halfway(s: Shared) -> None:
    before = sent(s, "embeddings")
    with pytest.raises(ValueError, match="went away"):
        s.client.map_embeddings(generator_raising_halfway("text"), model=EMBED)
    assert sent(s, "embeddings") == before  # map_* reads the whole input before sending


def ten_thousand_prompts(s: Shared) -> None:
    prompts = [f"p{i}" for i in range(10_000)]
    reply = s.client.completions.create(model=INSTRUCT, prompt=prompts, max_tokens=1)
    assert sorted(choice.index for choice in reply.choices) == list(range(10_000))
    by_index = {choice.index: choice.text for choice in reply.choices}
    assert all(by_index[i] == f" echo:p{i}#0" for i in (0, 1, 4321, 9999))


def ten_thousand_prompts_over_the_limit(s: Shared) -> None:
    client = ThrottledClient(base_url=s.server.base_url, api_key=KEY, retry=FAST, rpm=60_000, tpm=50_000)
    before = sent(s, "completions")
    with pytest.raises(RequestTooLarge):
        client.completions.create(model=INSTRUCT, prompt=[f"p{i}" for i in range(10_000)], max_tokens=16)
    assert sent(s, "completions") == before


def n_zero_is_not_retried(s: Shared) -> None:
    before = sent(s, "completions")
    with pytest.raises(openai.BadRequestError, match="'n'"):
        s.client.completions.create(model=INSTRUCT, prompt="x", max_tokens=2, n=0)
    assert sent(s, "completions") == before + 1  # not retried


def oversize_prompt_fails_before_sending(s: Shared) -> None:
    client = ThrottledClient(base_url=s.server.base_url, api_key=KEY, retry=FAST, rpm=60_000, tpm=10_000)
    before = sent(s, "completions")
    with pytest.raises(RequestTooLarge, match="more than its whole limit"):
        client.completions.create(model=INSTRUCT, prompt="word " * 20_000, max_tokens=2)
    assert sent(s, "completions") == before


def prompt_over_the_context_fails_alone(s: Shared) -> None:
    prompts = ["short", "word " * 5000, "also short"]
    results = s.client.map_completions(prompts, model=INSTRUCT, max_tokens=2, return_exceptions=True)
    assert results[0].text == " echo:short#0" and results[2].text == " echo:also short#0"
    assert isinstance(results[1], openai.BadRequestError)


def empty_prompt(s: Shared) -> None:
    assert s.client.completions.create(model=INSTRUCT, prompt="", max_tokens=2).choices[0].text == " echo:#0"
    results = s.client.map_completions(["", "x", ""], model=INSTRUCT, max_tokens=2)
    assert [r.text for r in results] == [" echo:#0", " echo:x#0", " echo:#0"]


def unknown_model(s: Shared) -> None:
    """Token counting falls back for a model tiktoken does not know; the server decides the rest."""
    try:
        reply = s.client.completions.create(model="no-such-model-v0", prompt="hi", max_tokens=2)
    except openai.NotFoundError:
        return
    assert reply.choices[0].text == " echo:hi#0"


def non_utf8_bytes_prompt(s: Shared) -> None:
    """Bytes are not text: the SDK may refuse them or send something; neither may hang or leak."""
    try:
        reply = s.client.completions.create(model=INSTRUCT, prompt=b"\xff\xfe\xfa", max_tokens=2)  # type: ignore[arg-type]
    except (TypeError, ValueError, openai.BadRequestError):
        return
    assert len(reply.choices) == 1


def lone_surrogate_prompt(s: Shared) -> None:
    """``'\\udcff'`` (what ``surrogateescape`` makes of a non-UTF-8 byte) cannot be encoded."""
    with pytest.raises(UnicodeEncodeError):
        s.client.completions.create(model=INSTRUCT, prompt="ok \udcff", max_tokens=2)


def map_with_bytes_item(s: Shared) -> None:
    with pytest.raises(TypeError, match="input 1"):
        s.client.map_completions(["fine", b"\xff\xfe"], model=INSTRUCT)


# -- the CLI ------------------------------------------------------------------------------------


def cli_run(s: Shared, lines: List[bytes], *args: str) -> Tuple[int, List[Dict[str, Any]]]:
    folder = s.tmp / f"cli{time.monotonic_ns()}"
    folder.mkdir()
    requests = folder / "requests.jsonl"
    requests.write_bytes(b"".join(line + b"\n" for line in lines))
    output = folder / "results.jsonl"
    base = [str(requests), "-o", str(output), "--no-progress", "--api-key", KEY, "--base-url", s.server.base_url]
    code = cli.main([*base, *args])
    records = [json.loads(line) for line in output.read_text().splitlines()] if output.exists() else []
    return code, records


GOOD_LINE = json.dumps({"model": INSTRUCT, "prompt": "fine", "max_tokens": 2}).encode()


def cli_usage_error(*args: str) -> Case:
    def run(s: Shared) -> None:
        with pytest.raises(SystemExit) as info:
            cli_run(s, [GOOD_LINE], *args)
        assert info.value.code == 2

    return run


def cli_bad_lines_do_not_stop_the_job(s: Shared) -> None:
    lines = [
        GOOD_LINE,
        b'{"model": "gpt-3.5-turbo-instruct", "prompt": "\xff\xfe not utf-8"}',
        json.dumps({"model": INSTRUCT, "prompt": "zero", "n": 0}).encode(),
        json.dumps({"model": CHAT, "messages": "not a list"}).encode(),
        b"[1, 2, 3]",
        json.dumps({"model": INSTRUCT, "prompt": "tail", "max_tokens": 2}).encode(),
    ]
    code, records = cli_run(s, lines)
    assert code == 1
    by_line = {record["line"]: record for record in records}
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6]  # exactly one result per line
    assert by_line[1]["response"]["choices"][0]["text"] == " echo:fine#0"
    assert by_line[6]["response"]["choices"][0]["text"] == " echo:tail#0"
    assert by_line[2]["error"]["type"] == "invalid_json" and "line 2" in by_line[2]["error"]["message"]
    assert by_line[3]["error"]["type"] == "status_400"
    assert by_line[4]["error"]["type"] == "status_400"
    assert by_line[5]["error"]["type"] == "unknown_shape"


def cli_input_is_a_directory(s: Shared) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([str(s.tmp), "-o", str(s.tmp / "out.jsonl"), "--api-key", KEY, "--no-progress"])
    assert info.value.code == 2


# -- the table ----------------------------------------------------------------------------------

Expect = Union[type, Tuple[type, ...], None]  # None: handled (the case checks what it got itself)

BUGS: Dict[str, str] = {}  # cases that show a library bug, marked xfail until it is fixed

CASES: Dict[str, Tuple[Case, Expect]] = {
    # the constructor
    "ctor_rpm_inf": (ctor(rpm=math.inf), ValueError),
    "ctor_tpm_bool": (ctor(tpm=True), TypeError),
    "ctor_limits_negative": (lambda s: ctor(limits={CHAT: Limits(rpm=-1)})(s), ValueError),
    "ctor_limits_key_not_str": (ctor(limits={5: Limits(rpm=1)}), TypeError),
    "ctor_max_wait_nan": (ctor(max_wait=math.nan), ValueError),
    "ctor_max_retries_str": (ctor(max_retries="3"), TypeError),
    "retry_backoff_negative": (lambda s: Retry(backoff_base=-1), ValueError),
    "retry_deadline_inf": (lambda s: Retry(deadline=math.inf), ValueError),
    "retry_backoff_base_zero": (lambda s: Retry(backoff_base=0), ValueError),
    "retry_backoff_max_below_base": (lambda s: Retry(backoff_base=2, backoff_max=1), ValueError),
    "retry_backoff_base_str": (lambda s: Retry(backoff_base="1"), TypeError),
    "ctor_max_wait_str": (ctor(max_wait="2"), TypeError),
    # the limiter
    "limiter_headroom_negative": (lambda s: RateLimiter(headroom=-0.1), ValueError),
    "limiter_initial_burst_inf": (lambda s: RateLimiter(initial_burst=math.inf), ValueError),
    "limiter_headroom_str": (lambda s: RateLimiter(headroom="0.1"), TypeError),
    "limiter_initial_burst_str": (lambda s: RateLimiter(initial_burst="1"), TypeError),
    "limiter_too_large": (acquire(6001), RequestTooLarge),
    "limiter_negative": (acquire(-1000), ValueError),
    "limiter_nan": (acquire(math.nan), TypeError),  # a token count is an int
    "limiter_timeout_zero_when_full": (acquire(10_000 // 2, timeout=0), (RateLimitTimeout, RequestTooLarge)),
    # create
    "create_n_zero": (n_zero_is_not_retried, None),
    "create_empty_prompt": (empty_prompt, None),
    "create_oversize_prompt": (oversize_prompt_fails_before_sending, None),
    "create_unknown_model": (unknown_model, None),
    "create_non_utf8_bytes": (non_utf8_bytes_prompt, None),
    "create_lone_surrogate": (lone_surrogate_prompt, None),
    "create_10000_prompts": (ten_thousand_prompts, None),
    "create_10000_prompts_over_limit": (ten_thousand_prompts_over_the_limit, None),
    "create_n_huge": (completion(n=10**9), RequestTooLarge),
    "create_messages_not_a_list": (
        lambda s: s.client.chat.completions.create(model=CHAT, messages="hi"),
        openai.BadRequestError,
    ),
    # map_*
    "map_n_zero": (map_completions(["a"], n=0), ValueError),
    "map_batch_size_zero": (map_completions(["a"], batch_size=0), ValueError),
    "map_batch_size_huge": (map_completions(["a"], batch_size=5000), ValueError),
    "map_max_workers_bool": (map_completions(["a"], max_workers=True), TypeError),
    "map_run_timeout_nan": (map_completions(["a"], run_timeout=math.nan), ValueError),
    "map_run_timeout_negative": (map_completions(["a"], run_timeout=-1), ValueError),
    "map_run_timeout_str": (map_completions(["a"], run_timeout="5"), TypeError),
    "map_prompt_clash": (map_completions(["a"], prompt="b"), TypeError),
    "map_unknown_argument": (map_completions(["a"], temprature=0.5), TypeError),
    "map_inputs_none": (map_completions(None), TypeError),
    "map_single_string": (map_completions("one prompt"), TypeError),
    "map_bytes_item": (map_with_bytes_item, None),
    "map_chat_dict_not_list": (lambda s: s.client.map_chat_completions([{"role": "user"}], model=CHAT), TypeError),
    "map_progress_not_callable": (map_completions(["a"], progress="yes"), TypeError),
    "map_stream": (map_completions(["a"], stream=True), ValueError),
    "map_embeddings_generator_raises": (map_embeddings_raising_halfway, None),
    "imap_chat_generator_raises": (imap_chat_raising_halfway, None),
    "map_prompt_over_context": (prompt_over_the_context_fails_alone, None),
    # the CLI
    "cli_rpm_inf": (cli_usage_error("--rpm", "inf"), None),
    "cli_tpm_nan": (cli_usage_error("--tpm", "nan"), None),
    "cli_max_workers_negative": (cli_usage_error("--max-workers", "-3"), None),
    "cli_bad_lines": (cli_bad_lines_do_not_stop_the_job, None),
    "cli_input_is_a_directory": (cli_input_is_a_directory, None),
}


def _params() -> List[Any]:
    params = []
    for name in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=BUGS[name])] if name in BUGS else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


class Canary:
    """Calls through the shared client on another thread while a case runs; checks each answer."""

    def __init__(self, client: ThrottledClient) -> None:
        self.client = client
        self.stop = threading.Event()
        self.calls = 0
        self.problems: List[str] = []
        self.thread = threading.Thread(target=self._run, name="canary", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set() or self.calls < 2:
            content = f"canary {self.calls}"
            try:
                reply = self.client.chat.completions.create(**ask(content))
                if reply.choices[0].message.content != f"echo:{content}#0":
                    self.problems.append(f"wrong answer {reply.choices[0].message.content!r}")
            except Exception as exc:
                self.problems.append(repr(exc))
            self.calls += 1
            time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(CASE_BOUND)
        assert not self.thread.is_alive(), "the canary's call hung"
        assert not self.problems, self.problems


def assert_limiter_sane(limiter: RateLimiter) -> None:
    for model, entry in limiter.snapshot().items():
        assert entry["waiting"] == 0, f"callers left in line for {model}"
        for name, value in entry.items():
            if name.endswith("_source"):
                assert value in (None, "configured", "headers", "429", "provisional"), f"{model} {name} = {value}"
            else:
                assert value is None or math.isfinite(value), f"{model} {name} = {value}"


@pytest.mark.parametrize("name", _params())
def test_bad_input(shared: Shared, name: str) -> None:
    case, expect = CASES[name]
    canary = Canary(shared.client)
    outcome: List[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", case(shared)))
        except BaseException as exc:  # SystemExit and pytest's failures too: judged below
            outcome.append(("raised", exc))

    started = time.monotonic()
    worker = threading.Thread(target=run, name=f"case-{name}", daemon=True)
    worker.start()
    worker.join(CASE_BOUND)
    elapsed = time.monotonic() - started
    canary.finish()
    assert not worker.is_alive(), f"{name} hung"
    kind, value = outcome[0]
    if expect is None:
        if kind == "raised":
            raise value
    else:
        assert kind == "raised", f"{name} was accepted ({value!r}); expected {expect}"
        if not isinstance(value, expect):
            raise value
        assert elapsed < AT_ONCE, f"{name} took {elapsed:.1f} s to fail"
        assert str(value), "the exception says what is wrong"
    assert_limiter_sane(shared.client.limiter)


def test_the_table_has_at_least_25_kinds_of_bad_input() -> None:
    assert len(CASES) >= 25


# -- malformed headers from the server ----------------------------------------------------------


class HeaderRewriter:
    """A reverse proxy in front of :class:`FakeOpenAI` that replaces some response headers, so the
    real SDK sees a real server's answers with malformed ``x-ratelimit-*`` values."""

    def __init__(self, upstream: str, headers: Dict[str, str]) -> None:
        target = urllib.parse.urlsplit(upstream)
        overrides = {name.lower(): value for name, value in headers.items()}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
                forwarded = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream_conn.request(self.command, self.path, body=body, headers=forwarded)
                response = upstream_conn.getresponse()
                payload = response.read()
                upstream_conn.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in overrides and name.lower() not in ("content-length", "connection"):
                        self.send_header(name, value)
                for name, value in overrides.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


MALFORMED: Dict[str, Dict[str, str]] = {
    "reset_banana": {"x-ratelimit-reset-tokens": "banana", "x-ratelimit-reset-requests": "banana"},
    "reset_negative": {"x-ratelimit-reset-tokens": "-1", "x-ratelimit-reset-requests": "-1s"},
    "limit_zero": {"x-ratelimit-limit-requests": "0", "x-ratelimit-limit-tokens": "0"},
    "limit_inf_nan": {"x-ratelimit-limit-requests": "inf", "x-ratelimit-limit-tokens": "nan"},
    "remaining_garbage": {"x-ratelimit-remaining-requests": "-5", "x-ratelimit-remaining-tokens": "1e999"},
    "limit_tiny_remaining_huge": {
        "x-ratelimit-limit-requests": "1e-300",
        "x-ratelimit-remaining-requests": "99999999999999999999",
    },
    "retry_after_garbage": {"retry-after": "banana", "retry-after-ms": "-1"},
}


def _malformed_params() -> List[Any]:
    params = []
    for case in sorted(MALFORMED):
        for given in (False, True):
            name = f"{case}-{'configured' if given else 'learned'}"
            params.append(pytest.param(case, given, id=name))
    return params


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(rpm=60_000, tpm=10_000_000) as server:
        yield server


@pytest.mark.parametrize(("case", "given_limits"), _malformed_params())
def test_malformed_rate_limit_headers_never_fail_or_stall_calls(
    upstream: FakeOpenAI, case: str, given_limits: bool
) -> None:
    proxy = HeaderRewriter(upstream.base_url, MALFORMED[case])
    try:
        limits = {"rpm": 6000, "tpm": 1_000_000} if given_limits else {}
        client = ThrottledClient(base_url=proxy.base_url, api_key=KEY, retry=FAST, max_wait=5.0, **limits)
        problems: List[str] = []

        def caller(k: int) -> None:
            for j in range(3):
                content = f"h{k}-{j}"
                try:
                    reply = client.chat.completions.create(**ask(content))
                    if reply.choices[0].message.content != f"echo:{content}#0":
                        problems.append(content)
                except Exception as exc:
                    problems.append(repr(exc))

        started = time.monotonic()
        threads = [threading.Thread(target=caller, args=(k,)) for k in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(CASE_BOUND)
        assert not any(thread.is_alive() for thread in threads), "a call stalled"
        assert not problems, problems
        assert time.monotonic() - started < CASE_BOUND
        assert_limiter_sane(client.limiter)
        results = client.map_completions(["m0", "m1", "m2"], model=INSTRUCT, max_tokens=2)
        assert [r.text for r in results] == [" echo:m0#0", " echo:m1#0", " echo:m2#0"]
        client.close()
    finally:
        proxy.close()


def test_a_refusal_without_rate_limit_headers_gives_its_tokens_back(shared: Shared) -> None:
    """Documented: ``settle(reservation, 0)`` refunds every token of a request the server refused.
    A 400 that carries no ``x-ratelimit-*`` headers (OpenAI's usual 400) must then leave the token
    level where it was."""
    client = ThrottledClient(base_url=shared.server.base_url, api_key=KEY, retry=FAST, rpm=60_000, tpm=60_000)
    client.completions.create(model=INSTRUCT, prompt="warm up", max_tokens=1)
    _refusal_keeps_tokens(client)


def _refusal_keeps_tokens(client: ThrottledClient) -> Optional[float]:
    def level() -> float:
        value = client.limiter.snapshot()[INSTRUCT]["tokens_level"]
        assert value is not None
        return value

    before = level()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=INSTRUCT, prompt="word " * 5000, max_tokens=2)  # over the context
    after = level()
    assert after >= before - 1000, f"the refused request's ~5000 tokens stayed charged: {before:.0f} -> {after:.0f}"
    return after
