"""map_* / imap_*: batching, reordering, input order, nothing lost, stopping — over real HTTP."""

from __future__ import annotations

import _thread
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator, List

import openai
import pytest

from throttled_openai import (
    BulkError,
    BulkInterrupted,
    BulkTimeout,
    IncompleteResponse,
    Progress,
    RateLimitTimeout,
    Retry,
    ThrottledClient,
)
from throttled_openai.testing import FakeOpenAI

MODEL = "gpt-3.5-turbo-instruct"
FAST = Retry(backoff_base=0.01, backoff_max=0.05)


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(rpm=60_000, tpm=10_000_000) as fake:
        yield fake


def client_for(server: FakeOpenAI, **kwargs: Any) -> ThrottledClient:
    kwargs.setdefault("retry", FAST)
    return ThrottledClient(base_url=server.base_url, api_key="sk-map", **kwargs)


def prompts_sent(server: FakeOpenAI) -> List[int]:
    return [len(entry["body"]["prompt"]) for entry in server.requests_log if entry["path"].endswith("/completions")]


def expected_text(prompt: str, sample: int = 0) -> str:
    return f" echo:{prompt[:40]}#{sample}"


def test_prompts_are_batched_and_answers_come_back_in_input_order(server: FakeOpenAI) -> None:
    client = client_for(server, tpm=10_000_000)
    prompts = [f"question {i}" for i in range(95)]
    choices = client.map_completions(prompts, model=MODEL, max_tokens=3)
    assert [c.text for c in choices] == [expected_text(p) for p in prompts]  # the server shuffles
    assert [c.index for c in choices] == list(range(95))
    assert sorted(prompts_sent(server)) == [15, 20, 20, 20, 20]


def test_with_unknown_limits_one_prompt_goes_first_to_learn_the_budget(server: FakeOpenAI) -> None:
    client = client_for(server)
    client.map_completions([f"q{i}" for i in range(41)], model=MODEL, max_tokens=3)
    sent = prompts_sent(server)
    assert sent[0] == 1 and sorted(sent[1:]) == [20, 20]


def test_n_samples_per_prompt_come_back_as_lists(server: FakeOpenAI) -> None:
    client = client_for(server)
    results = client.map_completions(["a", "b", "c"], model=MODEL, n=3, max_tokens=2, batch_size=2)
    assert [[c.text for c in samples] for samples in results] == [
        [expected_text(p, j) for j in range(3)] for p in "abc"
    ]


def test_batches_stay_within_the_token_burst() -> None:
    # 1-second bucket of 6,000 tokens per minute: 100 tokens of burst; each prompt costs ~2 + 20.
    with FakeOpenAI(rpm=60_000, tpm=6000, bucket_seconds=1.0) as server:
        client = client_for(server, rpm=60_000, tpm=6000)
        results = client.map_completions([f"p{i}" for i in range(12)], model=MODEL, max_tokens=20)
        assert len(results) == 12
        assert server.stats()["too_large"] == 0
        assert max(prompts_sent(server)) <= 4


def test_rpm_bound_work_is_many_prompts_per_request() -> None:
    with FakeOpenAI(rpm=120, tpm=10_000_000, bucket_seconds=1.0) as server:
        client = client_for(server, rpm=120, tpm=10_000_000)
        results = client.map_completions([f"p{i}" for i in range(100)], model=MODEL, max_tokens=1)
        assert len(results) == 100 and server.stats()["admitted"] == 5


def test_a_bad_prompt_is_isolated_and_the_rest_succeed() -> None:
    with FakeOpenAI(context_length=50) as server:
        client = client_for(server)
        prompts = [f"fine {i}" for i in range(20)]
        prompts[13] = "word " * 100  # too long for the context: the whole batch gets a 400
        results = client.map_completions(prompts, model=MODEL, max_tokens=5, return_exceptions=True)
        assert isinstance(results[13], openai.BadRequestError)
        assert "maximum context length" in str(results[13])
        assert [r.text for i, r in enumerate(results) if i != 13] == [
            expected_text(p) for i, p in enumerate(prompts) if i != 13
        ]


def test_the_first_failure_raises_with_everything_obtained_so_far() -> None:
    with FakeOpenAI(context_length=50) as server:
        client = client_for(server)
        prompts = [f"fine {i}" for i in range(40)]
        prompts[25] = "word " * 100
        with pytest.raises(BulkError) as info:
            client.map_completions(prompts, model=MODEL, max_tokens=5, max_workers=1)
        error = info.value
        assert list(error.errors) == [25] and isinstance(error.errors[25], openai.BadRequestError)
        assert [r.text for r in error.results[:20]] == [expected_text(p) for p in prompts[:20]]
        # the rest of the failing batch was still answered (the split went on), and is kept
        assert sum(r is not None for r in error.results) == 39 and len(error.results) == 40


def test_a_missing_answer_is_asked_again(server: FakeOpenAI) -> None:
    client = client_for(server, tpm=10_000_000)
    server.inject("missing_choice")
    results = client.map_completions([f"q{i}" for i in range(5)], model=MODEL, max_tokens=2)
    assert [r.text for r in results] == [expected_text(f"q{i}") for i in range(5)]
    assert prompts_sent(server) == [5, 1]  # only the prompt without an answer was sent again


@pytest.mark.parametrize("fault", ["missing_choice", "duplicate_choice"])
def test_an_answer_missing_twice_is_an_error_for_that_prompt_only(server: FakeOpenAI, fault: str) -> None:
    client = client_for(server)
    server.inject(fault, count=2)
    results = client.map_completions(["x", "y"], model=MODEL, max_tokens=2, return_exceptions=True)
    failed = [i for i, r in enumerate(results) if isinstance(r, IncompleteResponse)]
    assert len(failed) == 1
    assert all(results[i].text == expected_text("xy"[i]) for i in range(2) if i not in failed)


def test_a_batch_refused_for_a_reason_not_about_one_prompt_is_not_split(server: FakeOpenAI) -> None:
    client = client_for(server, tpm=10_000_000)
    server.inject("400")  # an invalid request as a whole: splitting would only repeat it
    results = client.map_completions([f"s{i}" for i in range(20)], model=MODEL, max_tokens=1, return_exceptions=True)
    assert all(isinstance(r, openai.BadRequestError) for r in results)
    assert server.stats()["requests"] == 1


def test_batches_too_large_for_an_unknown_limit_are_split_not_lost() -> None:
    # No limits given; the server allows 2,000 tokens at once. The first answer teaches the budget.
    with FakeOpenAI(rpm=100_000, tpm=120_000, bucket_seconds=1.0) as server:
        client = client_for(server)
        prompts = [("word " * 150) + str(i) for i in range(60)]
        results = client.map_completions(prompts, model=MODEL, max_tokens=40)
        assert [r.text for r in results] == [expected_text(p) for p in prompts]


@pytest.mark.parametrize("fault", ["missing_choice", "duplicate_choice"])
def test_chat_answers_are_checked_like_batches(server: FakeOpenAI, fault: str) -> None:
    client = client_for(server)
    server.inject(fault)
    conversations = [[{"role": "user", "content": "one"}]]
    [reply] = client.map_chat_completions(conversations, model="gpt-4o-mini", n=2, max_tokens=3)
    assert [c.index for c in reply.choices] == [0, 1]  # asked again, in index order
    server.inject(fault, count=2)
    [failed] = client.map_chat_completions(conversations, model="gpt-4o-mini", n=2, return_exceptions=True)
    assert isinstance(failed, IncompleteResponse)


def test_server_errors_are_retried_inside_the_map(server: FakeOpenAI) -> None:
    client = client_for(server)
    server.inject("500", count=2)
    server.inject("drop")
    assert len(client.map_completions([f"r{i}" for i in range(60)], model=MODEL, max_tokens=2)) == 60
    assert client.stats().retries == 3


def test_quota_ends_the_run_without_sending_more(server: FakeOpenAI) -> None:
    client = client_for(server, tpm=10_000_000)
    server.inject("quota")
    results = client.map_completions(
        [f"r{i}" for i in range(40)], model=MODEL, max_tokens=2, return_exceptions=True, max_workers=1
    )
    # Every later request would be refused too: each input ends with the quota error, sent once.
    assert all(isinstance(r, openai.RateLimitError) and "quota" in str(r) for r in results)
    assert server.stats()["requests"] == 1


def test_chat_conversations_run_in_parallel_in_order(server: FakeOpenAI) -> None:
    client = client_for(server)
    conversations = [[{"role": "user", "content": f"c{i}"}] for i in range(30)]
    replies = client.map_chat_completions(conversations, model="gpt-4o-mini", max_tokens=4)
    assert [r.choices[0].message.content for r in replies] == [f"echo:c{i}#0" for i in range(30)]
    assert server.stats()["admitted"] == 30


def test_embeddings_are_batched_and_aligned(server: FakeOpenAI) -> None:
    client = client_for(server, tpm=10_000_000)
    texts = [f"text {i}" for i in range(50)]
    vectors = client.map_embeddings(texts, model="text-embedding-3-small", batch_size=16)
    singles = [client.embeddings.create(model="text-embedding-3-small", input=t).data[0].embedding for t in texts[:5]]
    assert vectors[:5] == singles
    assert len(vectors) == 50 and server.stats()["admitted"] == 4 + 5


def test_imap_reads_a_generator_lazily_and_yields_in_order(server: FakeOpenAI) -> None:
    client = client_for(server)
    consumed: List[int] = []

    def prompts() -> Iterator[str]:
        for i in range(10_000):
            consumed.append(i)
            yield f"g{i}"

    results = client.imap_completions(prompts(), model=MODEL, max_tokens=1, max_workers=2)
    first = [next(results) for _ in range(3)]
    assert [i for i, _ in first] == [0, 1, 2] and first[2][1].text == expected_text("g2")
    assert len(consumed) <= 2 * 4 * 20 + 1  # a bounded window (workers × look-ahead × batch), not 10,000
    results.close()  # stopping early cancels the rest


def test_imap_unordered_yields_every_position_once(server: FakeOpenAI) -> None:
    client = client_for(server)
    got = list(client.imap_completions((f"u{i}" for i in range(250)), model=MODEL, max_tokens=1, ordered=False))
    assert sorted(i for i, _ in got) == list(range(250))
    assert all(choice.text == expected_text(f"u{i}") for i, choice in got)


def test_progress_callable_sees_every_input(server: FakeOpenAI) -> None:
    client = client_for(server)
    seen: List[Progress] = []
    client.map_completions([f"p{i}" for i in range(45)], model=MODEL, max_tokens=1, progress=seen.append)
    assert seen[-1].done == 45 and seen[-1].total == 45 and seen[-1].failed == 0
    assert [p.done for p in seen] == sorted(p.done for p in seen)


def test_progress_bar(server: FakeOpenAI, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    client = client_for(server)
    client.map_completions([f"p{i}" for i in range(30)], model=MODEL, max_tokens=1, progress=True)
    assert "30/30" in capsys.readouterr().err


def test_run_timeout_bounds_the_whole_run() -> None:
    with FakeOpenAI(latency=0.3) as server:
        client = client_for(server)
        started = time.monotonic()
        with pytest.raises(BulkTimeout) as info:
            client.map_completions(
                [f"t{i}" for i in range(200)], model=MODEL, max_tokens=1, batch_size=1, run_timeout=0.5
            )
        assert time.monotonic() - started < 3.0
        assert len(info.value.results) == 200


def test_timeout_means_one_request_as_in_the_sdk() -> None:
    """``timeout=`` goes to every request, as on ``create()``; it does not bound the run."""
    with FakeOpenAI(latency=1.0) as server:
        client = client_for(server, retry=Retry(max_retries=1, backoff_base=0.01, backoff_max=0.02))
        outcomes = client.map_completions(["a", "b"], model=MODEL, max_tokens=1, timeout=0.2, return_exceptions=True)
        assert all(isinstance(outcome, openai.APITimeoutError) for outcome in outcomes)
        fast = client.map_completions(["a", "b"], model=MODEL, max_tokens=1, timeout=30)
        assert [c.text for c in fast] == [expected_text("a"), expected_text("b")]


def test_a_web_client_with_max_wait_still_waits_its_turn_in_bulk() -> None:
    """max_wait is for callers that would rather fail fast; a bulk call waits its turn (run_timeout
    bounds the run), so a client built for a web app can run bulk work too."""
    with FakeOpenAI(rpm=120, tpm=10_000_000, bucket_seconds=1.0) as server:
        client = client_for(server, rpm=120, max_wait=0.05)
        conversations = [[{"role": "user", "content": f"c{i}"}] for i in range(8)]
        replies = client.map_chat_completions(conversations, model="gpt-4o-mini", max_tokens=2)
        assert [r.choices[0].message.content for r in replies] == [f"echo:c{i}#0" for i in range(8)]
        with pytest.raises(RateLimitTimeout):  # a plain call of the same client still fails fast
            for _ in range(4):
                client.chat.completions.create(model="gpt-4o-mini", messages=conversations[0], max_tokens=2)


def test_ctrl_c_returns_quickly_with_the_results_so_far() -> None:
    with FakeOpenAI(rpm=600, bucket_seconds=1.0, latency=0.1) as server:
        client = client_for(server, rpm=600)
        timer = threading.Timer(1.0, _thread.interrupt_main)
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(BulkInterrupted) as info:
                client.map_completions([f"k{i}" for i in range(2000)], model=MODEL, max_tokens=1, batch_size=1)
        finally:
            timer.cancel()
        assert time.monotonic() - started < 4.0
        obtained = [r for r in info.value.results if r is not None]
        assert 0 < len(obtained) < 2000
        time.sleep(0.5)
        assert not [t for t in threading.enumerate() if t.name.startswith("throttled_openai")]
        sent = server.stats()["requests"]
        time.sleep(0.5)
        assert server.stats()["requests"] == sent  # nothing more goes out after the interrupt


def test_ctrl_c_is_not_held_up_by_a_slow_request() -> None:
    with FakeOpenAI(latency=5.0) as server:
        client = client_for(server)
        timer = threading.Timer(0.5, _thread.interrupt_main)
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(BulkInterrupted):
                client.map_completions(["slow"], model=MODEL, max_tokens=1)
        finally:
            timer.cancel()
        assert time.monotonic() - started < 3.0
        # the request still on the wire is finished by a daemon thread: it cannot keep the program alive
        assert all(t.daemon for t in threading.enumerate() if t.name.startswith("throttled_openai"))


def test_ctrl_c_in_a_script_exits_as_an_interrupted_program(tmp_path: Any) -> None:
    """Status 130 in a shell (killed by SIGINT), as for any Python program stopped by Ctrl-C; the
    partial results ride on the KeyboardInterrupt itself."""
    script = tmp_path / "bulk.py"
    with FakeOpenAI(latency=0.05, rpm=600, bucket_seconds=1.0) as server:
        script.write_text(
            "from throttled_openai import BulkInterrupted, ThrottledClient\n"
            f"client = ThrottledClient(base_url={server.base_url!r}, api_key='sk-x', rpm=600)\n"
            "print('started', flush=True)\n"
            "try:\n"
            "    client.map_completions([f'p{i}' for i in range(5000)], model='gpt-3.5-turbo-instruct',"
            " max_tokens=1, batch_size=1)\n"
            "except BulkInterrupted as stop:\n"
            "    print('obtained', sum(r is not None for r in stop.results), type(stop).__name__, flush=True)\n"
            "    raise\n"
        )
        child = subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "started"
        time.sleep(1.0)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGINT, (child.returncode, err)
    words = out.split()
    assert words[0] == "obtained" and int(words[1]) > 0 and words[2] == "KeyboardInterrupt"
    assert "KeyboardInterrupt" in err


def test_imap_bulk_error_carries_what_was_obtained_and_not_yielded() -> None:
    with FakeOpenAI(latency=0.2) as server:
        client = client_for(server, rpm=60_000, max_wait=None)
        prompts = [f"x{i}" for i in range(40)]
        yielded: List[int] = []
        with pytest.raises(BulkError) as info:
            for position, _ in client.imap_completions(prompts, model=MODEL, max_tokens=1, batch_size=1, max_workers=8):
                yielded.append(position)
                if len(yielded) == 3:  # the next request fails (a 400 is not retried), others are on the wire
                    server.inject("400", 1)
        error = info.value
        assert len(error.errors) == 1
        obtained = {i: r for i, r in enumerate(error.results) if r is not None}
        assert obtained, "the requests in flight when the failure came were drained into .results"
        assert all(r.text == expected_text(prompts[i]) for i, r in obtained.items())
        assert not set(obtained) & set(yielded) and not set(obtained) & set(error.errors)


def test_imap_timeout_carries_what_finished_behind_a_slow_head() -> None:
    """In input order, a slow first request holds back those behind it; when run_timeout passes, the
    BulkTimeout carries every result that had come back meanwhile."""
    with FakeOpenAI(slow_seconds=4.0) as server:
        client = client_for(server, rpm=60_000, tpm=10_000_000)
        client.map_completions(["warm"], model=MODEL, max_tokens=1)  # limits known: requests go in parallel
        server.inject("slow", 1)
        prompts = [f"s{i}" for i in range(6)]
        with pytest.raises(BulkTimeout) as info:
            for _ in client.imap_completions(prompts, model=MODEL, max_tokens=1, batch_size=1, run_timeout=1.5):
                pass
        obtained = {i: r for i, r in enumerate(info.value.results) if r is not None}
        assert len(obtained) >= 3 and 0 not in obtained
        assert all(r.text == expected_text(prompts[i]) for i, r in obtained.items())


def test_many_threads_mapping_on_one_client_share_it() -> None:
    with FakeOpenAI(rpm=1200, tpm=10_000_000, bucket_seconds=1.0) as server:
        client = client_for(server, rpm=1200)
        outcomes: List[int] = []

        def job(tag: int) -> None:
            results = client.map_completions(
                [f"{tag}-{i}" for i in range(100)], model=MODEL, max_tokens=1, batch_size=5
            )
            outcomes.append(sum(r.text == expected_text(f"{tag}-{i}") for i, r in enumerate(results)))

        threads = [threading.Thread(target=job, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert outcomes == [100] * 4
        assert server.stats()["rate_limited"] <= 2


def test_empty_input_is_an_empty_result(server: FakeOpenAI) -> None:
    client = client_for(server)
    assert client.map_completions([], model=MODEL) == []
    assert client.map_embeddings([], model="e") == []
    assert client.map_chat_completions([], model="c") == []
    assert list(client.imap_completions(iter([]), model=MODEL)) == []


@pytest.mark.parametrize(
    ("call", "error", "text"),
    [
        (lambda c: c.map_completions(["ok", 7], model=MODEL), TypeError, "input 1"),
        (lambda c: c.map_completions(["ok", b"bytes"], model=MODEL), TypeError, "input 1"),
        (lambda c: c.map_completions("a single string", model=MODEL), TypeError, "not a single str"),
        (lambda c: c.map_completions(["ok"], model=MODEL, n=0), ValueError, "n must be"),
        (lambda c: c.map_completions(["ok"], model=MODEL, batch_size=0), ValueError, "batch_size"),
        (lambda c: c.map_completions(["ok"], model=MODEL, max_workers=0), ValueError, "max_workers"),
        (lambda c: c.map_completions(["ok"], model=MODEL, max_workers=2.5), TypeError, "max_workers"),
        (lambda c: c.map_completions(["ok"], model=MODEL, stream=True), ValueError, "stream"),
        (lambda c: c.map_completions(["ok"], model=MODEL, run_timeout=-1), ValueError, "run_timeout"),
        (lambda c: c.map_completions(["ok"], model=MODEL, run_timeout="5"), TypeError, "run_timeout"),
        (lambda c: c.map_completions(["ok"], model=MODEL, timeout="5"), TypeError, "timeout"),
        (lambda c: c.map_completions(["ok"], model=MODEL, timeout=0), ValueError, "timeout"),
        (lambda c: c.map_completions(["ok"], model=MODEL, prompt="x"), TypeError, "prompt=.*first argument"),
        (lambda c: c.map_completions(["ok"], model=MODEL, max_tokenz=3), TypeError, "'max_tokenz'.*completions"),
        (
            lambda c: c.map_chat_completions([[{"role": "user", "content": "x"}]], model="c", messages=[]),
            TypeError,
            "messages=",
        ),
        (
            lambda c: c.map_chat_completions([[{"role": "user", "content": "x"}]], model="c", prompt="x"),
            TypeError,
            "'prompt'.*chat.completions.create",
        ),
        (lambda c: c.map_embeddings(["ok"], model="e", input=["x"]), TypeError, "input="),
        (lambda c: c.imap_embeddings(["ok"], model="e", inputs=["x"]), TypeError, "'inputs'"),
        (
            lambda c: c.imap_chat_completions([[{"role": "user", "content": "x"}]], model="c", messages=[]),
            TypeError,
            "messages=",
        ),
        (lambda c: c.map_embeddings(["ok", None], model="e"), TypeError, "input 1"),
        (lambda c: c.map_embeddings(["ok"], model="e", batch_size=5000), ValueError, "batch_size"),
        (lambda c: c.map_chat_completions([[{"role": "user", "content": "x"}], "hi"], model="c"), TypeError, "input 1"),
        (lambda c: c.imap_completions(["ok"], model=MODEL, n=200), ValueError, "n must be"),
    ],
)
def test_bad_input_fails_before_anything_is_sent(server: FakeOpenAI, call: Any, error: type, text: str) -> None:
    client = client_for(server)
    with pytest.raises(error, match=text):
        call(client)
    assert server.stats()["requests"] == 0


def test_a_generator_that_raises_halfway_stops_the_run_cleanly(server: FakeOpenAI) -> None:
    client = client_for(server)

    def prompts() -> Iterator[str]:
        yield from (f"h{i}" for i in range(50))
        raise OSError("disk went away")

    got: List[int] = []
    with pytest.raises(OSError, match="disk went away"):
        for position, _ in client.imap_completions(prompts(), model=MODEL, max_tokens=1):
            got.append(position)
    assert got == list(range(50))  # everything read before the failure was sent and yielded
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name.startswith("throttled_openai") and t.is_alive()]
