"""Reliability: a fault matrix, deadlines and a stress run, over real HTTP with the real SDK.

Every cell of the matrix runs one kind of bulk or concurrent work against a :class:`FakeOpenAI` that
injects one kind of fault (or a seeded mix), and checks the library's promise: every input ends with
its own result or an exception of an expected type, nothing is delivered twice or to the wrong input,
no thread is left running, and the cell ends in bounded time. ``docs/reliability.md`` lists the cells.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Sequence, Set, Tuple

import openai
import pytest

from throttled_openai import (
    BulkError,
    BulkTimeout,
    IncompleteResponse,
    MalformedResponse,
    RateLimiter,
    RateLimitTimeout,
    Retry,
    ThrottledClient,
)
from throttled_openai.testing import FakeOpenAI

KEY = "sk-reliability-0123456789"
INSTRUCT = "gpt-3.5-turbo-instruct"
CHAT = "gpt-4o-mini"
EMBED = "text-embedding-3-small"
FAST = Retry(backoff_base=0.01, backoff_max=0.05)
# Generous limits: the matrix is about faults, not throttling (the stress test is about throttling).
SERVER_LIMITS: Dict[str, Any] = {"rpm": 60_000, "tpm": 10_000_000, "bucket_seconds": 60.0, "latency": 0.003}
CLIENT_LIMITS: Dict[str, Any] = {"rpm": 60_000, "tpm": 10_000_000}
CELL_SECONDS = 20.0  # wall-time bound of one cell; each takes well under 2 s on an idle machine
THREAD_GRACE = 5.0  # seconds a finished run's worker threads get to end

# Errors a transient fault may leave behind once the retries are spent (rare with these counts).
TRANSIENT = (openai.APIStatusError, openai.APIConnectionError, IncompleteResponse)


# -- the work ------------------------------------------------------------------------------------


def completion_ok(prompt: str, result: Any, position: int) -> bool:
    return result.text == f" echo:{prompt[:40]}#0" and result.index == position


def chat_ok(content: str, result: Any) -> bool:
    return len(result.choices) == 1 and result.choices[0].message.content == f"echo:{content}#0"


_REFERENCE: Dict[str, List[float]] = {}


def reference_vectors(texts: Sequence[str]) -> Dict[str, List[float]]:
    """The vectors a fault-free server gives, fetched once with the plain SDK."""
    missing = [text for text in texts if text not in _REFERENCE]
    if missing:
        with FakeOpenAI() as server:
            plain = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
            for item in plain.embeddings.create(model=EMBED, input=missing).data:
                _REFERENCE[missing[item.index]] = item.embedding
            plain.close()
    return _REFERENCE


@dataclass
class Outcome:
    """What one run delivered: ``slots[i]`` is input i's result or exception."""

    slots: List[Any]
    wrong: List[int] = field(default_factory=list)  # positions whose result is not theirs


def run_map_completions(client: ThrottledClient, size: int) -> Outcome:
    prompts = [f"prompt {i}" for i in range(size)]
    results = client.map_completions(prompts, model=INSTRUCT, max_tokens=2, batch_size=5, return_exceptions=True)
    assert len(results) == size
    wrong = [
        i for i, r in enumerate(results) if not isinstance(r, BaseException) and not completion_ok(prompts[i], r, i)
    ]
    return Outcome(results, wrong)


def run_imap_completions(client: ThrottledClient, size: int) -> Outcome:
    """Unordered and lazy over a generator: each position must be yielded exactly once."""
    prompts = [f"lazy {i}" for i in range(size)]
    seen: Dict[int, Any] = {}
    repeated: List[int] = []
    stream = client.imap_completions(
        (p for p in prompts), model=INSTRUCT, max_tokens=2, batch_size=4, ordered=False, return_exceptions=True
    )
    for position, result in stream:
        if position in seen:
            repeated.append(position)
        seen[position] = result
    assert sorted(seen) == list(range(size)), "every input yielded"
    results = [seen[i] for i in range(size)]
    wrong = [
        i for i, r in enumerate(results) if not isinstance(r, BaseException) and not completion_ok(prompts[i], r, i)
    ]
    return Outcome(results, wrong + repeated)


def run_map_chat(client: ThrottledClient, size: int) -> Outcome:
    contents = [f"chat {i}" for i in range(size)]
    conversations = [[{"role": "user", "content": c}] for c in contents]
    results = client.map_chat_completions(conversations, model=CHAT, max_tokens=2, return_exceptions=True)
    assert len(results) == size
    wrong = [i for i, r in enumerate(results) if not isinstance(r, BaseException) and not chat_ok(contents[i], r)]
    return Outcome(results, wrong)


def run_map_embeddings(client: ThrottledClient, size: int) -> Outcome:
    texts = [f"text {i}" for i in range(size)]
    expected = reference_vectors(texts)
    results = client.map_embeddings(texts, model=EMBED, batch_size=5, return_exceptions=True)
    assert len(results) == size
    wrong = [i for i, r in enumerate(results) if not isinstance(r, BaseException) and r != expected[texts[i]]]
    return Outcome(results, wrong)


def run_threads(client: ThrottledClient, size: int, threads: int = 8) -> Outcome:
    """Plain ``chat.completions.create`` calls from several threads, each recording what it got. A
    plain call hands over the server's response as it is, so a choice missing or repeated by the
    server shows as such; every choice present must still answer this call's own prompt."""
    slots: List[Any] = [None] * size
    wrong: List[int] = []

    def worker(start: int) -> None:
        for i in range(start, size, threads):
            content = f"call {i}"
            try:
                reply = client.chat.completions.create(
                    model=CHAT, messages=[{"role": "user", "content": content}], max_tokens=2
                )
            except Exception as exc:
                slots[i] = exc
                continue
            slots[i] = reply
            if not all(choice.message.content == f"echo:{content}#0" for choice in reply.choices):
                wrong.append(i)

    workers = [threading.Thread(target=worker, args=(k,), name=f"cell-worker-{k}") for k in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(CELL_SECONDS)
    assert not any(thread.is_alive() for thread in workers), "a plain call hung"
    return Outcome(slots, wrong)


OPERATIONS: Dict[str, Tuple[Callable[[ThrottledClient, int], Outcome], int]] = {
    "map_completions": (run_map_completions, 24),
    "imap_completions": (run_imap_completions, 16),
    "map_chat": (run_map_chat, 10),
    "map_embeddings": (run_map_embeddings, 24),
    "threads": (run_threads, 16),
}


# -- the faults ----------------------------------------------------------------------------------

# Tokens the account may spend in the quota cells: about a third of what each operation uses in all.
QUOTA_TOKENS = {"map_completions": 40, "imap_completions": 25, "map_chat": 40, "map_embeddings": 20, "threads": 60}


@dataclass(frozen=True)
class Fault:
    """How the server misbehaves, what the client is given, and which errors inputs may end with.

    ``all_succeed``: the fault is transient and rare enough that the retries must deliver every input.
    ``quota``: the account's quota runs out mid-run: some inputs succeed, later ones fail with
    ``insufficient_quota``.
    """

    inject: Tuple[Tuple[str, int], ...] = ()
    server: Tuple[Tuple[str, Any], ...] = ()
    client: Tuple[Tuple[str, Any], ...] = ()
    allowed: Tuple[type, ...] = ()
    all_succeed: bool = True
    quota: bool = False


MIXED_RATES = {
    "500": 0.04,
    "503": 0.04,
    "429": 0.04,
    "429_message_only": 0.03,
    "drop": 0.04,
    "truncate": 0.04,
    "missing_choice": 0.04,
    "duplicate_choice": 0.04,
    "slow": 0.02,
}
# The heavier mix of issue 11, where a 200 with a broken body lost whole batches before it was retried.
MIXED_BODY_RATES = {
    "stream_cut": 0.04,
    "empty_200": 0.04,
    "html_200": 0.04,
    "error_200": 0.04,
    "502_html": 0.04,
    "504_html": 0.04,
    "500": 0.03,
    "drop": 0.03,
}
SLOW = (("slow_seconds", 0.8),)
SHORT_TIMEOUT = (("timeout", 0.3),)

FAULTS: Dict[str, Fault] = {
    "500": Fault(inject=(("500", 3),)),
    "503": Fault(inject=(("503", 3),)),
    "429_retry_after": Fault(inject=(("429", 1),)),
    "429_no_retry_after": Fault(inject=(("429", 1),), server=(("retry_after", False),)),
    "429_message_only": Fault(inject=(("429_message_only", 1),)),
    "drop": Fault(inject=(("drop", 3),)),
    "slow": Fault(inject=(("slow", 1),), server=SLOW, client=SHORT_TIMEOUT),
    "truncate": Fault(inject=(("truncate", 3),)),
    # 2xx bodies that are not what they should be, and a proxy's error pages: retried like a 5xx.
    "cut_json_200": Fault(inject=(("stream_cut", 3),)),
    "empty_200": Fault(inject=(("empty_200", 3),)),
    "html_200": Fault(inject=(("html_200", 3),)),
    "error_200": Fault(inject=(("error_200", 3),)),
    "502_html": Fault(inject=(("502_html", 3),)),
    "504_html": Fault(inject=(("504_html", 3),)),
    "missing_choice": Fault(inject=(("missing_choice", 1),)),
    "duplicate_choice": Fault(inject=(("duplicate_choice", 1),)),
    "missing_twice": Fault(inject=(("missing_choice", 2),), allowed=(IncompleteResponse,), all_succeed=False),
    "quota_mid_run": Fault(server=(), allowed=(openai.RateLimitError,), all_succeed=False, quota=True),
    "mixed": Fault(
        server=(("fault_rates", MIXED_RATES), ("seed", 7), *SLOW),
        client=SHORT_TIMEOUT,
        allowed=TRANSIENT,
        all_succeed=False,
    ),
    "mixed_bodies": Fault(
        server=(("fault_rates", MIXED_BODY_RATES), ("seed", 5)),
        allowed=(*TRANSIENT, MalformedResponse),
        all_succeed=False,
    ),
    "mixed_and_quota": Fault(
        server=(("fault_rates", MIXED_RATES), ("seed", 11), *SLOW),
        client=SHORT_TIMEOUT,
        allowed=TRANSIENT,
        all_succeed=False,
        quota=True,
    ),
}


# -- checks --------------------------------------------------------------------------------------


def library_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("throttled_openai") and t.is_alive()]


def assert_no_thread_left(before: Set[threading.Thread]) -> None:
    """No new non-daemon thread is alive, and the library's workers have all ended."""
    deadline = time.monotonic() + THREAD_GRACE
    while library_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not library_threads(), f"library threads left running: {library_threads()}"
    extra = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    assert not extra, f"non-daemon threads left running: {extra}"


def assert_limiter_idle(limiter: RateLimiter) -> None:
    for model, entry in limiter.snapshot().items():
        assert entry["waiting"] == 0, f"callers still in line for {model}"


def is_quota(error: BaseException) -> bool:
    return isinstance(error, openai.RateLimitError) and getattr(error, "code", None) == "insufficient_quota"


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_fault_matrix(operation: str, fault: str) -> None:
    spec = FAULTS[fault]
    run, size = OPERATIONS[operation]
    before = set(threading.enumerate())
    server_kwargs = {**SERVER_LIMITS, **dict(spec.server)}
    if spec.quota:
        # Faults after admission (truncate, slow, a missing answer) spend quota too: allow for them.
        server_kwargs["quota_tokens"] = QUOTA_TOKENS[operation] * (2 if spec.inject or spec.server else 1)
    with FakeOpenAI(**server_kwargs) as server:
        for name, count in spec.inject:
            server.inject(name, count)
        client = ThrottledClient(
            base_url=server.base_url, api_key=KEY, retry=FAST, **CLIENT_LIMITS, **dict(spec.client)
        )
        started = time.monotonic()
        outcome = run(client, size)
        elapsed = time.monotonic() - started
        client.close()
    assert elapsed < CELL_SECONDS

    # Every input accounted for: its own result, or an exception of an expected type.
    assert len(outcome.slots) == size
    assert not [i for i, slot in enumerate(outcome.slots) if slot is None], "inputs without an outcome"
    errors = {i: slot for i, slot in enumerate(outcome.slots) if isinstance(slot, BaseException)}
    unexpected = {i: repr(e) for i, e in errors.items() if not isinstance(e, spec.allowed)}
    assert not unexpected, f"unexpected exception types: {unexpected}"
    # Nothing delivered to the wrong input, nothing delivered twice.
    assert not outcome.wrong, f"inputs given a result that is not theirs (or twice): {outcome.wrong}"
    delivered = [id(slot) for slot in outcome.slots if not isinstance(slot, BaseException)]
    if operation != "map_embeddings":  # vectors are plain lists; equal ones may be distinct inputs'
        assert len(set(delivered)) == len(delivered), "one result object handed to two inputs"
    if spec.all_succeed:
        assert not errors, f"transient faults must be absorbed by the retries: {errors}"
    if spec.quota:
        successes = size - len(errors)
        assert successes > 0, "the quota ran out mid-run, not before it"
        assert any(is_quota(e) for e in errors.values()), "the quota ran out mid-run"
        if fault == "quota_mid_run":
            assert all(is_quota(e) for e in errors.values())
    if fault == "missing_twice" and operation != "threads":
        # The second fault may hit the batch's re-ask: then only that one input fails.
        assert len(errors) <= 1
    assert_limiter_idle(client.limiter)
    assert_no_thread_left(before)


def test_fault_matrix_cells_fail_fast_without_return_exceptions() -> None:
    """``return_exceptions=False``: the quota error raises ``BulkError``; what it carries is right."""
    before = set(threading.enumerate())
    with FakeOpenAI(**SERVER_LIMITS, quota_tokens=40) as server:
        client = ThrottledClient(base_url=server.base_url, api_key=KEY, retry=FAST, **CLIENT_LIMITS)
        prompts = [f"prompt {i}" for i in range(40)]
        with pytest.raises(BulkError) as info:
            client.map_completions(prompts, model=INSTRUCT, max_tokens=2, batch_size=5)
        error = info.value
        assert len(error.results) == 40 and error.errors
        assert all(is_quota(e) for e in error.errors.values())
        for i, result in enumerate(error.results):
            assert result is None or completion_ok(prompts[i], result, i)
            assert result is None or i not in error.errors  # never both a result and an error
        assert any(result is not None for result in error.results)
        client.close()
    assert_no_thread_left(before)


# -- deadlines -----------------------------------------------------------------------------------

MARGIN = 2.5  # seconds allowed past a deadline: the stop grace (1 s) and wake-up slices, on a slow box


@pytest.fixture
def strict() -> Iterator[FakeOpenAI]:
    """One request per second, a bucket of one: the second call in a second must wait."""
    with FakeOpenAI(rpm=60, tpm=1_000_000, bucket_seconds=1.0) as server:
        yield server


def test_map_timeout_while_waiting_for_capacity(strict: FakeOpenAI) -> None:
    client = ThrottledClient(base_url=strict.base_url, api_key=KEY, retry=FAST, rpm=60)
    conversations = [[{"role": "user", "content": f"wait {i}"}] for i in range(10)]
    started = time.monotonic()
    with pytest.raises(BulkTimeout) as info:
        client.map_chat_completions(conversations, model=CHAT, max_tokens=2, run_timeout=0.6)
    assert time.monotonic() - started < 0.6 + MARGIN
    assert isinstance(info.value, TimeoutError)
    results = info.value.results
    assert len(results) == 10 and sum(r is not None for r in results) < 10
    assert all(r is None or chat_ok(f"wait {i}", r) for i, r in enumerate(results))
    assert strict.stats()["rate_limited"] == 0


def test_map_timeout_while_backing_off() -> None:
    with FakeOpenAI(**SERVER_LIMITS) as server:
        server.inject("503", 1000)
        slow_retry = Retry(max_retries=50, backoff_base=3.0, backoff_max=3.0)
        client = ThrottledClient(base_url=server.base_url, api_key=KEY, retry=slow_retry, **CLIENT_LIMITS)
        started = time.monotonic()
        with pytest.raises(BulkTimeout):
            client.map_completions([f"b{i}" for i in range(20)], model=INSTRUCT, max_tokens=2, run_timeout=0.6)
        assert time.monotonic() - started < 0.6 + MARGIN
        assert_no_thread_left(set(threading.enumerate()))


def test_map_timeout_while_paused_by_a_long_retry_after() -> None:
    """The client believes in 600 RPM; the server allows 6 and asks for ~10 s after a 429."""
    with FakeOpenAI(rpm=6, tpm=1_000_000, bucket_seconds=1.0) as server:
        client = ThrottledClient(base_url=server.base_url, api_key=KEY, retry=FAST, rpm=600)
        started = time.monotonic()
        with pytest.raises(BulkTimeout) as info:
            client.map_embeddings([f"e{i}" for i in range(6)], model=EMBED, batch_size=1, run_timeout=0.8)
        assert time.monotonic() - started < 0.8 + MARGIN
        assert sum(r is not None for r in info.value.results) >= 1


def test_max_wait_while_backing_off() -> None:
    with FakeOpenAI(**SERVER_LIMITS) as server:
        server.inject("500", 1000)
        policy = Retry(max_retries=100, backoff_base=0.4, backoff_max=0.4)
        client = ThrottledClient(base_url=server.base_url, api_key=KEY, retry=policy, max_wait=0.5, **CLIENT_LIMITS)
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert time.monotonic() - started < 0.5 + 1.5
        assert client.stats().wait_seconds <= 0.5 + 1e-6


def test_max_wait_while_paused_and_while_in_line() -> None:
    """A 429 asking for ~10 s: the call that got it raises at once, and callers arriving during the
    pause give up at once with ``RateLimitTimeout`` rather than sleep through it."""
    with FakeOpenAI(rpm=6, tpm=1_000_000, bucket_seconds=1.0) as server:
        client = ThrottledClient(base_url=server.base_url, api_key=KEY, retry=FAST, rpm=600, max_wait=0.5)
        ask = {"model": CHAT, "messages": [{"role": "user", "content": "p"}], "max_tokens": 2}
        client.chat.completions.create(**ask)
        started = time.monotonic()
        with pytest.raises((openai.RateLimitError, RateLimitTimeout)):
            client.chat.completions.create(**ask)
        outcomes: List[BaseException] = []

        def caller() -> None:
            try:
                client.chat.completions.create(**ask)
            except BaseException as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=caller) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert time.monotonic() - started < 0.5 + 2.0
        assert len(outcomes) == 6 and all(isinstance(e, (RateLimitTimeout, openai.RateLimitError)) for e in outcomes)
        assert server.stats()["requests"] <= 3  # nobody hammered the server during the pause
        assert_limiter_idle(client.limiter)


def test_max_wait_with_many_threads_in_line(strict: FakeOpenAI) -> None:
    client = ThrottledClient(base_url=strict.base_url, api_key=KEY, retry=FAST, rpm=60, max_wait=0.3)
    got: List[Any] = []
    lock = threading.Lock()

    def caller(i: int) -> None:
        t0 = time.monotonic()
        try:
            outcome: Any = client.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": f"line {i}"}], max_tokens=2
            )
        except BaseException as exc:
            outcome = exc
        with lock:
            got.append((time.monotonic() - t0, outcome))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(got) == 12
    successes = [o for _, o in got if not isinstance(o, BaseException)]
    assert 1 <= len(successes) <= 3
    assert all(isinstance(o, RateLimitTimeout) for _, o in got if isinstance(o, BaseException))
    assert max(seconds for seconds, _ in got) < 0.3 + 1.5
    assert strict.stats()["rate_limited"] == 0
    assert_limiter_idle(client.limiter)


# -- stress --------------------------------------------------------------------------------------


def test_stress_64_threads_several_clients_one_limiter() -> None:
    """64 threads over 4 clients sharing one limiter, mixing endpoints, against a server that sends
    no rate-limit headers (so only our limiter holds the load back). The load the server admitted in
    any window stays within the limiter's burst plus its rate over the window, plus scheduling slack."""
    rpm, tpm = 3000, 90_000
    limiter = RateLimiter(rpm=rpm, tpm=tpm)
    before = set(threading.enumerate())
    with FakeOpenAI(latency=0.005, latency_jitter=0.01, seed=3, completion_tokens=20) as server:
        clients = [
            ThrottledClient(base_url=server.base_url, api_key=KEY, retry=FAST, limiter=limiter) for _ in range(4)
        ]
        failures: List[BaseException] = []
        wrong: List[str] = []

        def worker(k: int) -> None:
            client = clients[k % 4]
            for j in range(3):
                text = f"s{k}-{j}"
                try:
                    if (k + j) % 3 == 0:
                        reply = client.completions.create(model=CHAT, prompt=text, max_tokens=20)
                        ok = reply.choices[0].text == f" echo:{text}#0"
                    elif (k + j) % 3 == 1:
                        chat = client.chat.completions.create(
                            model=CHAT, messages=[{"role": "user", "content": text}], max_tokens=20
                        )
                        ok = chat_ok(text, chat)
                    else:
                        vectors = client.embeddings.create(model=CHAT, input=[text, text + "!"])
                        ok = [item.index for item in sorted(vectors.data, key=lambda d: d.index)] == [0, 1]
                    if not ok:
                        wrong.append(text)
                except BaseException as exc:
                    failures.append(exc)

        started = time.monotonic()
        threads = [threading.Thread(target=worker, args=(k,), name=f"stress-{k}") for k in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        elapsed = time.monotonic() - started
        assert not any(thread.is_alive() for thread in threads)
        assert not failures and not wrong
        admitted = server.admitted
        assert len(admitted) == 64 * 3
        rate_r, rate_t = rpm / 60, tpm / 60
        burst_r, burst_t = rate_r, rate_t  # the default initial burst: at most one second's budget
        slack = 0.25  # seconds: threads scheduled late/early between the limiter and the server
        biggest = max(cost for _, _, cost in admitted)
        for window in (0.1, 0.5, 1.0, 2.0):
            requests, tokens = server.max_admitted_in_window(window)
            assert requests <= burst_r + rate_r * (window + slack) + 1, (window, requests)
            assert tokens <= max(burst_t, biggest) + rate_t * (window + slack) + biggest, (window, tokens)
        assert elapsed < 30
        for client in clients:
            client.close()
    assert_limiter_idle(limiter)
    assert_no_thread_left(before)
