"""The Batch API route's Python face: client.batch_* and BatchJob, against FakeOpenAI's Files and
Batches APIs over real HTTP, with the real SDK."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, List

import pytest

from throttled_openai import BatchJob, BatchRequestError, BulkError, ThrottledClient
from throttled_openai.testing import FakeOpenAI

CHAT = "gpt-4o-mini"
FAST = {"poll_interval": 0.02, "max_poll_interval": 0.1}


def fake(**kwargs: Any) -> FakeOpenAI:
    settings = {"batch_speed": 5000.0, "batch_validation_seconds": 0.02, "batch_finalizing_seconds": 0.02}
    return FakeOpenAI(**{**settings, **kwargs})


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with fake() as running:
        yield running


def client_for(server: FakeOpenAI, **kwargs: Any) -> ThrottledClient:
    return ThrottledClient(base_url=server.base_url, api_key="sk-test-batch-secret", **kwargs)


def conversations(count: int) -> List[Any]:
    return [[{"role": "user", "content": f"question {i}"}] for i in range(count)]


def test_chat_results_come_back_in_input_order_from_several_batches(server: FakeOpenAI, tmp_path: Path) -> None:
    client = client_for(server)
    job = client.batch_chat_completions(
        conversations(120), model=CHAT, state=str(tmp_path / "job.json"), max_tokens=5, max_requests=50, **FAST
    )
    results = job.wait().results()
    assert [r.choices[0].message.content for r in results] == [f"echo:question {i}#0" for i in range(120)]
    stats = server.stats()
    assert stats["batches_created"] == 3 and stats["files_uploaded"] == 3 and stats["batch_lines"] == 120
    assert job.tokens_used == stats["batch_tokens_used"] > 0
    assert all(b["metadata"]["throttled_openai_job"] == job.job_id for b in server.batches())


def test_completions_share_requests_and_are_split_by_index(server: FakeOpenAI, tmp_path: Path) -> None:
    client = client_for(server)
    prompts = [f"prompt {i}" for i in range(45)]
    job = client.batch_completions(
        prompts, model="gpt-3.5-turbo-instruct", state=str(tmp_path / "j"), max_tokens=3, **FAST
    )
    results = job.wait().results()
    assert [choice.text for choice in results] == [f" echo:prompt {i}#0" for i in range(45)]
    assert server.stats()["batch_lines"] == 3  # 20 + 20 + 5 prompts a request
    two = client.batch_completions(prompts[:5], model="gpt-3.5-turbo-instruct", state=str(tmp_path / "n"), n=2, **FAST)
    samples = two.wait().results()
    assert [[c.text for c in pair] for pair in samples] == [
        [f" echo:prompt {i}#{j}" for j in range(2)] for i in range(5)
    ]
    assert all(c.index == j for pair in samples for j, c in enumerate(pair))


def test_embeddings_come_back_as_vectors_in_input_order(server: FakeOpenAI, tmp_path: Path) -> None:
    client = client_for(server)
    inputs = [f"text {i}" for i in range(250)]
    vectors = client.batch_embeddings(inputs, model="text-embedding-3-small", state=str(tmp_path / "e"), **FAST)
    results = vectors.wait().results()
    alone = client.embeddings.create(model="text-embedding-3-small", input=inputs[137]).data[0].embedding
    assert len(results) == 250 and results[137] == alone
    assert server.stats()["batch_lines"] == 3  # 100 inputs a request


def test_the_same_call_on_the_same_state_picks_the_job_up_instead_of_submitting_it_again(
    server: FakeOpenAI, tmp_path: Path
) -> None:
    state = str(tmp_path / "job.json")
    server.batch_speed = 0  # the batches stay in_progress
    first = client_for(server).batch_chat_completions(conversations(30), model=CHAT, state=state, max_tokens=5, **FAST)
    created = server.stats()["batches_created"]
    assert created == 1
    # A new process, say, after a crash: the same call finds the job in its state file.
    again = client_for(server).batch_chat_completions(conversations(30), model=CHAT, state=state, max_tokens=5, **FAST)
    assert again.job_id == first.job_id
    server.batch_speed = 5000
    assert len(again.wait().results()) == 30
    assert server.stats()["batches_created"] == created and server.stats()["batch_lines"] == 30
    opened = BatchJob.open(client_for(server), state)
    assert [r.choices[0].message.content for r in opened.wait().results()][:2] == [
        "echo:question 0#0",
        "echo:question 1#0",
    ]
    with pytest.raises(ValueError, match="holds another job"):
        client_for(server).batch_chat_completions(conversations(31), model=CHAT, state=state, max_tokens=5)
    with pytest.raises(FileNotFoundError):
        BatchJob.open(client_for(server), str(tmp_path / "none.json"))


@pytest.mark.parametrize("fault", ["500", "drop"])
def test_a_create_whose_answer_is_lost_adopts_the_batch_instead_of_making_another(
    server: FakeOpenAI, tmp_path: Path, fault: str
) -> None:
    server.inject(fault, phase="create", after=True)  # the batch is created, the answer lost
    job = client_for(server).batch_chat_completions(conversations(10), model=CHAT, state=str(tmp_path / "j"), **FAST)
    assert len(job.wait().results()) == 10
    assert server.stats()["batches_created"] == 1 and server.stats()["batch_lines"] == 10


def test_faults_on_upload_retrieve_and_download_are_retried(server: FakeOpenAI, tmp_path: Path) -> None:
    server.inject("500", phase="upload")
    server.inject("503", 2, phase="retrieve")
    server.inject("502_html", phase="content")
    server.inject("500", phase="create")  # refused before creating: created once, later
    job = client_for(server).batch_chat_completions(conversations(10), model=CHAT, state=str(tmp_path / "j"), **FAST)
    assert len(job.wait().results()) == 10
    assert server.stats()["batches_created"] == 1


def test_expired_requests_go_again_in_new_batches_and_none_runs_twice(tmp_path: Path) -> None:
    with fake(batch_speed=100.0, batch_window_seconds=0.4) as server:
        job = client_for(server).batch_chat_completions(
            conversations(100), model=CHAT, state=str(tmp_path / "j"), **FAST
        )
        results = job.wait().results()
        assert [r.choices[0].message.content for r in results] == [f"echo:question {i}#0" for i in range(100)]
        assert server.stats()["batches_created"] >= 2
        assert server.stats()["batch_lines"] == 100  # every line ran exactly once
        assert {b["status"] for b in server.batches()} >= {"expired"}


def test_requests_still_expiring_after_the_last_round_end_with_batch_expired(tmp_path: Path) -> None:
    with fake(batch_speed=100.0, batch_window_seconds=0.3) as server:
        state = str(tmp_path / "j")
        job = client_for(server).batch_chat_completions(
            conversations(100), model=CHAT, state=state, max_rounds=1, **FAST
        )
        results = job.wait().results(return_exceptions=True)
        failed = [r for r in results if isinstance(r, BatchRequestError)]
        assert failed and all(r.type == "batch_expired" for r in failed)
        assert len(results) - len(failed) == server.stats()["batch_lines"]
        with pytest.raises(BulkError) as caught:
            job.results()
        assert set(caught.value.errors) == {i for i, r in enumerate(results) if isinstance(r, BatchRequestError)}


def test_fallback_sync_sends_what_expired_through_the_client(tmp_path: Path) -> None:
    with fake(batch_speed=100.0, batch_window_seconds=0.3) as server:
        job = client_for(server).batch_chat_completions(
            conversations(100), model=CHAT, state=str(tmp_path / "j"), fallback="sync", max_tokens=5, **FAST
        )
        results = job.wait().results()
        assert [r.choices[0].message.content for r in results] == [f"echo:question {i}#0" for i in range(100)]
        stats = server.stats()
        assert stats["batches_created"] == 1 and stats["batch_lines"] + stats["admitted"] == 100


def test_server_errors_per_line_are_sent_again_and_a_bad_request_ends_with_its_error(tmp_path: Path) -> None:
    with fake(batch_error_rate=0.2) as server:
        bodies: List[Any] = [{"model": CHAT, "messages": m, "max_tokens": 5} for m in conversations(60)]
        bodies[7] = {"model": CHAT, "messages": bodies[7]["messages"], "n": 0}  # the endpoint refuses n=0
        job = client_for(server).batch_requests(bodies, state=str(tmp_path / "j"), max_rounds=10, **FAST)
        results = job.wait().results(return_exceptions=True)
        error = results[7]
        assert isinstance(error, BatchRequestError) and error.status == 400 and error.type == "status_400"
        assert "n" in str(error)
        assert [r["choices"][0]["message"]["content"] for i, r in enumerate(results) if i != 7] == [
            f"echo:question {i}#0" for i in range(60) if i != 7
        ]
        assert server.stats()["batches_created"] >= 2


def test_the_queue_limit_is_learned_and_later_chunks_wait_for_earlier_ones(tmp_path: Path) -> None:
    # Each chunk of 20 conversations holds 200 input tokens; the queue takes 400: two at a time. The
    # three are created before the limit is known, and run 0.5 s each: the third is refused, then waits.
    with fake(batch_queue_tokens=400, batch_speed=40.0) as server:
        job = client_for(server).batch_chat_completions(
            conversations(60), model=CHAT, state=str(tmp_path / "j.json"), max_requests=20, **FAST
        )
        results = job.wait().results()
        assert len(results) == 60
        state = json.loads((tmp_path / "j.json").read_text())
        assert state["queue"][CHAT]["token"] == 400
        refused = [b for b in server.batches() if b["status"] == "failed"]
        assert refused and all(b["errors"]["data"][0]["code"] == "token_limit_exceeded" for b in refused)
        assert server.stats()["batch_lines"] == 60


def test_a_given_queue_limit_cuts_chunks_to_fit_and_submits_them_in_turn(tmp_path: Path) -> None:
    with fake(batch_queue_tokens=400, batch_speed=400.0) as server:
        job = client_for(server).batch_chat_completions(
            conversations(60), model=CHAT, state=str(tmp_path / "j.json"), queue_tokens=400, **FAST
        )
        assert len(job.wait().results()) == 60
        assert [b["status"] for b in server.batches()].count("failed") == 0
        assert server.stats()["batches_created"] == 2  # 60 conversations hold ~540 tokens


def test_a_chunk_the_queue_refuses_alone_is_split_until_it_fits(tmp_path: Path) -> None:
    with fake(batch_queue_tokens=150) as server:
        job = client_for(server).batch_chat_completions(
            conversations(40), model=CHAT, state=str(tmp_path / "j"), **FAST
        )
        assert len(job.wait(timeout=60).results()) == 40
        assert server.stats()["batch_lines"] == 40


def test_cancel_stops_the_batches_and_what_did_not_run_has_no_result(server: FakeOpenAI, tmp_path: Path) -> None:
    server.batch_speed = 0
    job = client_for(server).batch_chat_completions(conversations(20), model=CHAT, state=str(tmp_path / "j"), **FAST)
    job.cancel()
    results = job.wait(timeout=30).results(return_exceptions=True)
    assert all(isinstance(r, BatchRequestError) and r.type == "batch_cancelled" for r in results)
    assert [b["status"] for b in server.batches()] == ["cancelled"]


def test_wait_times_out_and_the_job_carries_on_later(server: FakeOpenAI, tmp_path: Path) -> None:
    server.batch_speed = 0
    job = client_for(server).batch_chat_completions(conversations(5), model=CHAT, state=str(tmp_path / "j"), **FAST)
    with pytest.raises(TimeoutError):
        job.wait(timeout=0.2)
    with pytest.raises(RuntimeError, match="not done"):
        job.results()
    server.batch_speed = 5000
    assert len(job.wait(timeout=30).results()) == 5


def test_progress_reports_each_poll(server: FakeOpenAI, tmp_path: Path) -> None:
    seen: List[int] = []
    job = client_for(server).batch_chat_completions(conversations(10), model=CHAT, state=str(tmp_path / "j"), **FAST)
    job.wait(progress=lambda j: seen.append(j.finished_inputs()))
    assert seen and seen[-1] == 10


def test_bad_arguments_fail_before_anything_is_sent(server: FakeOpenAI, tmp_path: Path) -> None:
    client = client_for(server)
    state = str(tmp_path / "j")
    with pytest.raises(TypeError, match="messages"):
        client.batch_chat_completions(conversations(2), model=CHAT, state=state, messages=[])
    with pytest.raises(TypeError, match="conversation 1"):
        client.batch_chat_completions([[{"role": "user", "content": "x"}], "oops"], model=CHAT, state=state)
    with pytest.raises(TypeError, match="model"):
        client.batch_completions(["a"], model="", state=state)
    with pytest.raises(ValueError, match="fallback"):
        client.batch_completions(["a"], model="m", state=state, fallback="later")
    with pytest.raises(ValueError, match="no model"):
        client.batch_requests([{"messages": []}], state=state)
    with pytest.raises(TypeError, match="unexpected"):
        client.batch_requests([{"messages": []}], state=state, max_tokens=3)
    assert server.stats()["requests"] == 0 and not os.path.exists(state)


def test_the_api_key_is_not_in_the_state_files(server: FakeOpenAI, tmp_path: Path) -> None:
    job = client_for(server).batch_chat_completions(
        conversations(5), model=CHAT, state=str(tmp_path / "j.json"), **FAST
    )
    job.wait()
    written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not any(b"batch-secret" in data for data in written)
    assert "batch-secret" not in repr(job)


def test_lines_the_batch_api_rejects_get_errors_naming_the_reason_and_the_rest_runs(tmp_path: Path) -> None:
    def reject(body: Any) -> Any:
        return "this model cannot run in a batch today" if body["messages"][0]["content"] == "question 3" else None

    with fake(batch_reject=reject) as server:
        job = client_for(server).batch_chat_completions(
            conversations(10), model=CHAT, state=str(tmp_path / "j"), **FAST
        )
        results = job.wait().results(return_exceptions=True)
        error = results[3]
        assert isinstance(error, BatchRequestError) and error.type == "batch_rejected"
        assert "invalid_request: this model cannot run in a batch today" in str(error)
        assert [r.choices[0].message.content for i, r in enumerate(results) if i != 3] == [
            f"echo:question {i}#0" for i in range(10) if i != 3
        ]
        assert [b["status"] for b in server.batches()] == ["failed", "completed"]


def test_a_batch_rejected_as_a_whole_fails_every_input_with_the_reason(tmp_path: Path) -> None:
    with fake() as server:
        server.inject("400", phase="create")  # refused: never created, and never will be
        job = client_for(server).batch_chat_completions(conversations(4), model=CHAT, state=str(tmp_path / "j"), **FAST)
        results = job.wait().results(return_exceptions=True)
        assert all(isinstance(r, BatchRequestError) and r.type == "batch_rejected" and r.status == 400 for r in results)
        assert server.stats()["batches_created"] == 0


def test_chunks_stay_within_the_file_size_and_embedding_input_limits(
    server: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from throttled_openai import batch_api

    monkeypatch.setattr(batch_api, "MAX_BATCH_FILE_BYTES", 3000)
    job = client_for(server).batch_chat_completions(conversations(60), model=CHAT, state=str(tmp_path / "c"), **FAST)
    sizes = [chunk.size for chunk in job._chunks]
    assert len(sizes) > 3 and max(sizes) <= 3000 and sum(chunk.keys for chunk in job._chunks) == 60
    assert len(job.wait().results()) == 60
    monkeypatch.setattr(batch_api, "MAX_EMBEDDING_INPUTS_PER_BATCH", 250)
    inputs = [f"text {i}" for i in range(700)]
    vectors = client_for(server).batch_embeddings(
        inputs, model="text-embedding-3-small", state=str(tmp_path / "e"), **FAST
    )
    assert [chunk.keys for chunk in vectors._chunks] == [200, 200, 200, 100]  # whole requests of 100 inputs
    assert len(vectors.wait().results()) == 700


def test_polling_backs_off_while_nothing_changes(server: FakeOpenAI, tmp_path: Path) -> None:
    server.batch_speed = 0
    job = client_for(server).batch_chat_completions(
        conversations(3), model=CHAT, state=str(tmp_path / "j"), poll_interval=0.02, max_poll_interval=0.5
    )
    with pytest.raises(TimeoutError):
        job.wait(timeout=1.5)
    polls = sum(1 for e in server.requests_log if e["method"] == "GET" and e["path"].startswith("/v1/batches/"))
    assert 3 <= polls <= 15  # at a steady 0.02 s: 75


def test_a_request_larger_than_the_whole_queue_fails_instead_of_waiting_forever(tmp_path: Path) -> None:
    with fake(batch_queue_tokens=5) as server:  # each conversation holds ~9 input tokens
        job = client_for(server).batch_chat_completions(conversations(2), model=CHAT, state=str(tmp_path / "j"), **FAST)
        results = job.wait(timeout=60).results(return_exceptions=True)
        assert all(
            isinstance(r, BatchRequestError) and "exceed the model's batch queue limit of 5" in str(r) for r in results
        )
        assert server.stats()["batch_lines"] == 0


def test_a_rejected_key_stops_the_job_instead_of_failing_its_inputs(tmp_path: Path) -> None:
    import openai

    with fake(api_keys=["sk-only-this"]) as server:
        refused = ThrottledClient(base_url=server.base_url, api_key="sk-not-it")
        with pytest.raises(openai.AuthenticationError):
            refused.batch_chat_completions(conversations(2), model=CHAT, state=str(tmp_path / "k"), **FAST)
        assert server.stats()["batches_created"] == 0


# -- found in review: each failed before its fix ----------------------------------------------------

SHARED_400 = {"context_length": 60}  # the fake refuses a whole completions request with a prompt too long
PROMPTS = ["short"] * 5 + ["word " * 200] + ["short"] * 5


@pytest.mark.parametrize("fallback", ["batch", "sync"])
def test_a_shared_request_refused_for_one_prompt_fails_that_prompt_alone(tmp_path: Path, fallback: str) -> None:
    with fake(**SHARED_400) as server:
        job = client_for(server).batch_completions(
            PROMPTS, model="gpt-3.5-turbo-instruct", state=str(tmp_path / "j"), max_tokens=3, fallback=fallback, **FAST
        )
        results = job.wait(timeout=30).results(return_exceptions=True)
        assert [i for i, r in enumerate(results) if isinstance(r, BatchRequestError)] == [5]
        assert results[5].status == 400  # type: ignore[union-attr]
        assert [r.text for i, r in enumerate(results) if i != 5] == [" echo:short#0"] * 10  # type: ignore[union-attr]


def test_cancel_after_a_batch_ended_still_lets_wait_finish(tmp_path: Path) -> None:
    with fake(**SHARED_400) as server:
        job = client_for(server).batch_completions(
            PROMPTS, model="gpt-3.5-turbo-instruct", state=str(tmp_path / "j"), max_tokens=3, **FAST
        )
        while server.batches()[0]["status"] != "completed":  # it ends on the server; the job has not looked
            time.sleep(0.01)
        job.cancel()
        results = job.wait(timeout=10).results(return_exceptions=True)  # the 400 would have split it again
        assert all(isinstance(r, BatchRequestError) and r.type == "batch_cancelled" for r in results)
        assert server.stats()["batches_created"] == 1


def test_too_many_creates_wait_and_create_once(server: FakeOpenAI, tmp_path: Path) -> None:
    server.inject("429", 3, phase="create")  # nothing created: no listing, no failure, a later try
    job = client_for(server).batch_chat_completions(conversations(5), model=CHAT, state=str(tmp_path / "j"), **FAST)
    assert len(job.wait(timeout=30).results()) == 5
    assert server.stats()["batches_created"] == 1


def test_a_chunk_refused_while_another_runs_waits_for_it_instead_of_retrying_each_poll(tmp_path: Path) -> None:
    # The server counts more tokens than the job estimates (raw JSON bytes): the queue refuses chunk 2
    # while chunk 1 runs. It must wait for chunk 1 to end, not be created again at every poll.
    settings = {"batch_speed": 20.0, "batch_queue_tokens": 1500, "cost_model": "json_bytes"}
    with fake(**settings) as server:
        conversations_ = [[{"role": "user", "content": f"question number {i}"}] for i in range(100)]
        job = client_for(server).batch_chat_completions(
            conversations_,
            model=CHAT,
            state=str(tmp_path / "j"),
            max_tokens=2,
            max_requests=50,
            queue_tokens=1500,
            **FAST,
        )
        assert len(job.wait(timeout=60).results()) == 100
        assert server.stats()["batches_created"] <= 4  # was 23


def test_one_process_at_a_time_drives_a_job(server: FakeOpenAI, tmp_path: Path) -> None:
    state = str(tmp_path / "j")
    job = client_for(server).batch_chat_completions(conversations(3), model=CHAT, state=state, **FAST)
    with job._store.locked(), pytest.raises(RuntimeError, match="another process"):  # as another process would
        BatchJob.open(client_for(server), state, **FAST).wait()
    assert len(job.wait(timeout=30).results()) == 3


def test_ctrl_c_in_wait_leaves_the_batches_running_and_says_how_to_carry_on(
    server: FakeOpenAI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.batch_speed = 0
    job = client_for(server).batch_chat_completions(conversations(3), model=CHAT, state=str(tmp_path / "j"), **FAST)

    def interrupt(_: BatchJob) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        job.wait(progress=interrupt)
    assert "keep running" in caplog.text and "BatchJob.open" in caplog.text
    assert [b["status"] for b in server.batches()] in (["validating"], ["in_progress"])  # not cancelled
    server.batch_speed = 5000
    assert len(BatchJob.open(client_for(server), str(tmp_path / "j"), **FAST).wait(timeout=30).results()) == 3
