"""Tests of FakeOpenAI's Files and Batch APIs: the real openai SDK over real HTTP, no mocks.

Only SDK surfaces that openai 1.40 has: ``usage`` and ``model`` of a Batch are read from
``to_dict()`` (older SDKs keep unknown fields as extras), errors from the HTTP response's JSON.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import openai
import pytest

from throttled_openai.testing import FakeOpenAI

KEY = "sk-test-0123456789abcdef"
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
BATCH_FIELDS = {
    "id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status", "output_file_id",
    "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
    "expired_at", "cancelling_at", "cancelled_at", "request_counts", "metadata", "model", "usage",
}  # fmt: skip

pytestmark = pytest.mark.timeout(60)


def client(server: FakeOpenAI, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)


def chat_line(i: int, text: Optional[str] = None, model: str = "gpt-4o-mini", **body: Any) -> Dict[str, Any]:
    messages = [{"role": "user", "content": f"hello {i}" if text is None else text}]
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": messages, "max_tokens": 10, **body},
    }


def jsonl(lines: Iterable[Any]) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def upload(c: openai.OpenAI, data: bytes, name: str = "in.jsonl") -> str:
    return c.files.create(file=(name, data, "application/jsonl"), purpose="batch").id


def submit(c: openai.OpenAI, lines: Iterable[Any], endpoint: str = "/v1/chat/completions", **kwargs: Any) -> Any:
    """Upload ``lines`` and create a batch on them."""
    file_id = upload(c, jsonl(lines))
    return c.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h", **kwargs)  # type: ignore[arg-type]


def wait_for(c: openai.OpenAI, batch_id: str, statuses: Iterable[str], timeout: float = 10.0) -> Any:
    """Poll (every 10 ms) until the batch reaches one of ``statuses``; returns it."""
    wanted = set(statuses)
    deadline = time.monotonic() + timeout
    while True:
        batch = c.batches.retrieve(batch_id)
        if batch.status in wanted:
            return batch
        assert batch.status not in FINAL, f"ended {batch.status}, waiting for {wanted}"
        assert time.monotonic() < deadline, f"still {batch.status}, waiting for {wanted}"
        time.sleep(0.01)


def read_lines(c: openai.OpenAI, file_id: Optional[str]) -> List[Dict[str, Any]]:
    assert file_id is not None
    return [json.loads(line) for line in c.files.content(file_id).content.splitlines()]


def by_id(lines: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {line["custom_id"]: line for line in lines}


def error_of(exc: openai.APIStatusError) -> Dict[str, Any]:
    error: Dict[str, Any] = exc.response.json()["error"]
    return error


# ----------------------------------------------------------------------------- files


def test_files_upload_retrieve_content_list_delete(make_server: Callable[..., FakeOpenAI], tmp_path: Any) -> None:
    server = make_server()
    c = client(server)
    data = jsonl([chat_line(0), chat_line(1)])
    first = c.files.create(file=("x.jsonl", data, "application/jsonl"), purpose="batch")
    assert re.fullmatch(r"file-[0-9a-f]{24}", first.id)
    assert (first.object, first.bytes, first.filename, first.purpose, first.status) == (
        "file", len(data), "x.jsonl", "batch", "processed"
    )  # fmt: skip
    assert first.to_dict()["expires_at"] == first.created_at + 2_592_000
    assert first.to_dict()["status_details"] is None
    path = tmp_path / "from_disk.jsonl"
    path.write_bytes(b'{"no": "validation at upload"}\r\nnot json either\n')
    with open(path, "rb") as handle:
        second = c.files.create(file=handle, purpose="batch")
    assert second.filename == "from_disk.jsonl" and second.bytes == path.stat().st_size
    assert c.files.retrieve(first.id).to_dict() == first.to_dict()
    assert c.files.content(second.id).content == path.read_bytes()  # byte for byte, CRs included
    raw = c.files.with_raw_response.content(first.id)
    assert raw.headers["content-type"] == "application/octet-stream"
    assert server.file_content(first.id) == data
    assert [f.id for f in c.files.list()] == [second.id, first.id]  # newest first
    assert [f.id for f in c.files.list(purpose="batch_output")] == []
    deleted = c.files.delete(first.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (first.id, "file", True)
    for call in (c.files.retrieve, c.files.content, c.files.delete):
        with pytest.raises(openai.NotFoundError) as info:
            call(first.id)
        assert error_of(info.value)["message"] == f"No such File object: {first.id}"
        assert error_of(info.value)["type"] == "invalid_request_error"
    with pytest.raises(KeyError):
        server.file_content(first.id)
    assert server.stats()["files_uploaded"] == 2


def test_batch_upload_must_be_jsonl(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server()
    c = client(server)
    with pytest.raises(openai.BadRequestError) as info:
        c.files.create(file=("notes.txt", b"hello", "text/plain"), purpose="batch")
    error = error_of(info.value)
    assert error["message"] == "Invalid file format for Batch API. Must be .jsonl" and error["code"] is None
    assert (
        c.files.create(file=("notes.txt", b"hello", "text/plain"), purpose="assistants").to_dict()["expires_at"] is None
    )
    assert server.stats()["files_uploaded"] == 1


def test_no_key_gets_401(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(api_keys=[KEY])
    for path in ("/v1/batches", "/v1/files", "/v1/files/file-x/content"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(server.url + path, timeout=10)
        assert info.value.code == 401
    with pytest.raises(openai.AuthenticationError):
        client(server, key="sk-wrong-000000000000").files.create(file=("x.jsonl", b"{}\n"), purpose="batch")
    assert server.stats()["files_uploaded"] == 0


# ----------------------------------------------------------------------------- a batch's life


def test_batch_passes_every_status_to_completed(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(batch_speed=0, batch_finalizing_seconds=0.5)
    c = client(server)
    created = submit(c, [chat_line(i) for i in range(30)], metadata={"job": "nightly"})
    record = created.to_dict()
    assert set(record) >= BATCH_FIELDS
    assert re.fullmatch(r"batch_[0-9a-f]{32}", created.id)
    assert created.status == "validating" and created.errors is None and created.output_file_id is None
    assert record["model"] is None and record["usage"]["total_tokens"] == 0
    assert record["expires_at"] == created.created_at + 86_400
    assert created.request_counts is not None and created.request_counts.total == 0
    assert created.metadata == {"job": "nightly"}

    running = wait_for(c, created.id, ["in_progress"])  # held there: batch_speed is 0
    assert running.request_counts.total == 30 and running.to_dict()["model"] == "gpt-4o-mini"
    time.sleep(0.1)
    held = c.batches.retrieve(created.id)
    assert held.status == "in_progress" and held.request_counts.completed == 0

    server.batch_speed = float("inf")
    assert c.batches.retrieve(created.id).status == "finalizing"
    done = wait_for(c, created.id, ["completed"])
    assert done.request_counts.to_dict() == {"total": 30, "completed": 30, "failed": 0}
    assert done.error_file_id is None and done.errors is None
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.failed_at is None and done.expired_at is None and done.cancelled_at is None

    results = read_lines(c, done.output_file_id)
    usage = done.to_dict()["usage"]
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in results)
    completion = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in results)
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (
        prompt, completion, prompt + completion
    )  # fmt: skip
    assert usage["input_tokens_details"] == {"cached_tokens": 0}
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    output = c.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output" and output.filename == f"{done.id}_output.jsonl"
    stats = server.stats()
    assert (stats["batches_created"], stats["batch_lines"], stats["batch_tokens_used"]) == (1, 30, prompt + completion)
    assert stats["admitted"] == 0 and stats["tokens_used"] == 0  # batches are not rate limited
    assert server.batches() == [c.batches.retrieve(created.id).to_dict()]


def test_speed_change_first_runs_at_the_old_speed(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(batch_speed=0)
    c = client(server)
    batch = submit(c, [chat_line(i) for i in range(1000)])
    wait_for(c, batch.id, ["in_progress"])
    server.batch_speed = 100.0
    time.sleep(0.1)
    server.batch_speed = 0
    ran = c.batches.retrieve(batch.id).request_counts.completed
    assert 9 <= ran < 1000  # 0.1 s or more at 100 lines/s
    time.sleep(0.05)
    assert c.batches.retrieve(batch.id).request_counts.completed == ran
    with pytest.raises(ValueError):
        server.batch_speed = -1


def chat_body(i: int) -> Dict[str, Any]:
    return chat_line(i)["body"]


@pytest.mark.parametrize(
    "endpoint, body, answer",
    [
        ("/v1/chat/completions", chat_body, lambda r, i: r["choices"][0]["message"]["content"] == f"echo:hello {i}#0"),
        (
            "/v1/completions",
            lambda i: {"model": "gpt-3.5-turbo-instruct", "prompt": [f"a{i}", f"b{i}"], "max_tokens": 3},
            lambda r, i: {c["index"]: c["text"] for c in r["choices"]} == {0: f" echo:a{i}#0", 1: f" echo:b{i}#0"},
        ),
        (
            "/v1/embeddings",
            lambda i: {"model": "text-embedding-3-small", "input": [f"x{i}", "y"], "dimensions": 4},
            lambda r, i: sorted(d["index"] for d in r["data"]) == [0, 1] and len(r["data"][0]["embedding"]) == 4,
        ),
        (
            "/v1/responses",
            lambda i: {"model": "gpt-4o-mini", "input": f"hi {i}"},
            lambda r, i: r["object"] == "response" and r["output"][0]["content"][0]["text"] == f"echo:hi {i}",
        ),
        (
            "/v1/moderations",
            lambda i: {"model": "omni-moderation-latest", "input": f"text {i}"},
            lambda r, i: r["results"][0]["flagged"] is False,
        ),
    ],
)
def test_output_is_shuffled_and_matched_by_custom_id(
    make_server: Callable[..., FakeOpenAI],
    endpoint: str,
    body: Callable[[int], Dict[str, Any]],
    answer: Callable[[Dict[str, Any], int], bool],
) -> None:
    server = make_server(batch_speed=float("inf"), batch_validation_seconds=0, batch_finalizing_seconds=0)
    c = client(server)
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": endpoint, "body": body(i)} for i in range(40)]
    batch = wait_for(c, submit(c, lines, endpoint).id, ["completed"])
    results = read_lines(c, batch.output_file_id)
    assert [r["custom_id"] for r in results] != [f"c{i}" for i in range(40)]  # shuffled
    assert sorted(r["custom_id"] for r in results) == sorted(f"c{i}" for i in range(40))
    assert len({r["id"] for r in results}) == 40
    for r in results:
        assert re.fullmatch(r"batch_req_[0-9a-f]{32}", r["id"]) and r["error"] is None
        assert r["response"]["status_code"] == 200 and re.fullmatch(r"[0-9a-f]{32}", r["response"]["request_id"])
        assert answer(r["response"]["body"], int(r["custom_id"][1:]))
    assert batch.error_file_id is None and batch.to_dict()["model"] == lines[0]["body"]["model"]


def test_unshuffled_output_keeps_input_order(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(shuffle=False, batch_speed=float("inf"))
    c = client(server)
    batch = wait_for(c, submit(c, [chat_line(i) for i in range(20)]).id, ["completed"])
    assert [r["custom_id"] for r in read_lines(c, batch.output_file_id)] == [f"req-{i}" for i in range(20)]


def test_per_line_400s_and_500s_go_to_the_error_file(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(batch_speed=float("inf"), batch_error_rate=0.3, context_length=40, seed=3)
    c = client(server)
    lines = [
        {"custom_id": f"ok-{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "gpt-3.5-turbo-instruct", "prompt": f"p{i}", "max_tokens": 5}}
        for i in range(60)
    ]  # fmt: skip
    lines.append({**lines[0], "custom_id": "long", "body": {**lines[0]["body"], "prompt": "word " * 50}})
    lines.append({**lines[0], "custom_id": "bad-n", "body": {**lines[0]["body"], "n": 0}})
    lines.append({**lines[0], "custom_id": "stream", "body": {**lines[0]["body"], "stream": True}})
    batch = wait_for(c, submit(c, lines, "/v1/completions").id, ["completed"])
    counts = batch.request_counts
    outputs, errors = by_id(read_lines(c, batch.output_file_id)), by_id(read_lines(c, batch.error_file_id))
    assert (counts.total, counts.completed, counts.failed) == (63, len(outputs), len(errors))
    assert set(outputs) | set(errors) == {line["custom_id"] for line in lines} and not set(outputs) & set(errors)
    for custom_id, param, text in [("long", "prompt", "maximum context length is 40 tokens"), ("bad-n", "n", "'n'"),
                                   ("stream", "stream", "Streaming")]:  # fmt: skip
        line = errors.pop(custom_id)
        assert line["error"] is None and line["response"]["status_code"] == 400
        error = line["response"]["body"]["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and text in error["message"]
    assert 5 <= len(errors) <= 35  # about 30% of the 60 good lines
    for line in errors.values():
        assert line["error"] is None and line["response"]["status_code"] == 500
        assert re.fullmatch(r"[0-9a-f]{32}", line["response"]["request_id"])
        assert line["response"]["body"] == {"error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error", "param": None, "code": None}}  # fmt: skip
    assert batch.to_dict()["usage"]["total_tokens"] == sum(
        r["response"]["body"]["usage"]["total_tokens"] for r in outputs.values()
    )
    assert server.stats()["batch_lines"] == 63


def test_completed_with_every_line_failed(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(batch_speed=float("inf"))
    c = client(server)
    batch = wait_for(c, submit(c, [chat_line(i, n=0) for i in range(5)]).id, ["completed"])
    assert batch.output_file_id is None and batch.error_file_id is not None
    assert batch.request_counts.to_dict() == {"total": 5, "completed": 0, "failed": 5}
    assert batch.to_dict()["usage"]["total_tokens"] == 0


def test_expiry_returns_finished_work_and_batch_expired_lines(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(batch_speed=50, batch_window_seconds=0.5)
    c = client(server)
    batch = wait_for(c, submit(c, [chat_line(i) for i in range(200)]).id, ["expired"])
    assert batch.expired_at is not None and batch.finalizing_at is None and batch.completed_at is None
    counts = batch.request_counts
    assert counts.total == 200 and 0 < counts.completed < 200 and counts.completed + counts.failed == 200
    done = by_id(read_lines(c, batch.output_file_id))
    expired = read_lines(c, batch.error_file_id)
    assert len(done) == counts.completed and len(expired) == counts.failed
    assert {line["custom_id"] for line in expired} == {f"req-{i}" for i in range(200)} - set(done)
    for line in expired:
        assert re.fullmatch(r"batch_req_[0-9a-f]{32}", line["id"]) and line["response"] is None
        assert line["error"] == {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        }
    assert batch.to_dict()["expires_at"] == batch.created_at + 1  # the window, rounded up


def test_cancel_keeps_lines_run_before_it(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(batch_speed=50, batch_finalizing_seconds=0.2)
    c = client(server)
    batch = submit(c, [chat_line(i) for i in range(500)])
    deadline = time.monotonic() + 10
    while c.batches.retrieve(batch.id).request_counts.completed == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cancelling = c.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    assert c.batches.cancel(batch.id).status == "cancelling"  # again: no error
    ran = cancelling.request_counts.completed
    time.sleep(0.05)
    assert c.batches.retrieve(batch.id).request_counts.completed == ran  # nothing runs once cancelling
    cancelled = wait_for(c, batch.id, ["cancelled"])
    assert cancelled.cancelled_at is not None and cancelled.error_file_id is None
    assert cancelled.request_counts.to_dict() == {"total": 500, "completed": ran, "failed": 0}
    assert len(read_lines(c, cancelled.output_file_id)) == ran < 500
    with pytest.raises(openai.BadRequestError) as info:
        c.batches.cancel(batch.id)
    assert error_of(info.value)["message"] == "Cannot cancel a batch with status 'cancelled'."


def test_cancel_while_validating_and_after_completion(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(batch_validation_seconds=30, batch_finalizing_seconds=0)
    c = client(server)
    batch = submit(c, [chat_line(0)])
    assert c.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    cancelled = wait_for(c, batch.id, ["cancelled"])
    assert cancelled.output_file_id is None and cancelled.in_progress_at is None
    assert cancelled.request_counts.total == 0
    fast = make_server(batch_speed=float("inf"))
    c = client(fast)
    done = wait_for(c, submit(c, [chat_line(0)]).id, ["completed"])
    with pytest.raises(openai.BadRequestError) as info:
        c.batches.cancel(done.id)
    assert error_of(info.value)["message"] == "Cannot cancel a batch with status 'completed'."


def test_enqueued_token_limit_fails_the_batch_after_create(make_server: Callable[..., FakeOpenAI]) -> None:
    probe = make_server()
    text = "count these tokens please"
    one = client(probe).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}], max_tokens=1
    )
    assert one.usage is not None
    per_line = one.usage.prompt_tokens
    limit = 150 * per_line  # 100 lines fit; 200 do not; max_tokens is never counted
    server = make_server(batch_speed=0, batch_queue_tokens=limit)
    c = client(server)
    first = submit(c, [chat_line(i, text, max_tokens=100_000) for i in range(100)])
    wait_for(c, first.id, ["in_progress"])
    second = submit(c, [chat_line(i, text) for i in range(100)])
    assert second.status == "validating"  # create never refuses it
    failed = wait_for(c, second.id, ["failed"])
    assert failed.failed_at is not None and failed.in_progress_at is None
    assert failed.request_counts.to_dict() == {"total": 0, "completed": 0, "failed": 0}
    assert failed.errors is not None and failed.errors.object == "list"
    [error] = failed.errors.data
    assert (error.code, error.line, error.param) == ("token_limit_exceeded", None, None)
    assert error.message == (
        f"Enqueued token limit reached for gpt-4o-mini in organization org-fake. Limit: {limit:,} enqueued tokens. "
        "Please try again once some in_progress batches have been completed."
    )
    assert "," in f"{limit:,}"
    other_key = submit(client(server, key="sk-other-key-0000000000"), [chat_line(i, text) for i in range(100)])
    other_model = submit(c, [chat_line(i, text, model="gpt-4o") for i in range(100)])
    for batch in (other_key, other_model):  # the queue is per (key, model)
        wait_for(c, batch.id, ["in_progress"])
    server.batch_speed = float("inf")
    wait_for(c, first.id, ["completed"])
    again = submit(c, [chat_line(i, text) for i in range(100)])
    assert wait_for(c, again.id, ["completed"]).request_counts.completed == 100


# ----------------------------------------------------------------------------- validation


def validation_errors(c: openai.OpenAI, data: bytes, endpoint: str = "/v1/chat/completions") -> List[Tuple[Any, ...]]:
    """(code, line, param) of each error of a batch on ``data``, which must fail validation."""
    file_id = upload(c, data)
    batch = c.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    failed = wait_for(c, batch.id, ["failed"])
    assert failed.failed_at is not None and failed.output_file_id is None and failed.error_file_id is None
    assert failed.request_counts.total == 0 and failed.in_progress_at is None
    assert failed.errors is not None
    for error in failed.errors.data:
        assert error.message
    return [(e.code, e.line, e.param) for e in failed.errors.data]


def test_validation_failures(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(batch_validation_seconds=0)
    c = client(server)
    ok = chat_line(0)
    assert validation_errors(c, jsonl([ok, b"{not json", chat_line(2), b"[1, 2]"])) == [
        ("invalid_json_line", 2, None),
        ("invalid_json_line", 4, None),
    ]
    missing = {k: v for k, v in chat_line(1).items() if k != "custom_id"}
    assert validation_errors(c, jsonl([ok, missing])) == [("missing_required_parameter", 2, "custom_id")]
    assert validation_errors(c, jsonl([ok, chat_line(1), chat_line(0)])) == [("duplicate_custom_id", 3, "custom_id")]
    assert validation_errors(c, jsonl([ok, {**chat_line(1), "method": "GET"}]))[0][1:] == (2, "method")
    wrong_url = {**chat_line(1), "url": "/v1/completions"}
    assert validation_errors(c, jsonl([ok, wrong_url])) == [("url_mismatch", 2, "url")]
    assert validation_errors(c, jsonl([ok, chat_line(1, model="gpt-4o")])) == [("model_mismatch", 2, "body.model")]
    assert validation_errors(c, b"") == [("empty_file", None, None)]
    assert validation_errors(c, b"\n  \n") == [("empty_file", None, None)]
    assert validation_errors(c, jsonl([b"{}"] * 50_001)) == [("too_many_tasks", None, None)]
    many = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "text-embedding-3-small", "input": ["a"] * 25_001}}
        for i in range(2)
    ]  # fmt: skip
    assert validation_errors(c, jsonl(many), "/v1/embeddings") == [("too_many_tasks", None, None)]
    assert len(validation_errors(c, jsonl([b"x"] * 300))) == 100  # every bad line, up to 100
    # blank lines are skipped, CRLF line ends are fine, and line numbers count every line
    crlf = json.dumps(chat_line(5)).encode() + b"\r\n\r\n" + json.dumps(chat_line(6)).encode() + b"\r\n"
    fast = make_server(batch_speed=float("inf"), batch_validation_seconds=0)
    good = wait_for(client(fast), submit(client(fast), [ok]).id, ["completed"])
    assert good.request_counts.completed == 1
    batch = client(fast).batches.create(
        input_file_id=upload(client(fast), crlf), endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_for(client(fast), batch.id, ["completed"]).request_counts.completed == 2


def test_create_refuses_bad_requests(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server()
    c = client(server)
    file_id = upload(c, jsonl([chat_line(0)]))
    text_id = c.files.create(file=("notes.txt", b"hi", "text/plain"), purpose="assistants").id

    def refused(param: str, **changes: Any) -> None:
        args: Dict[str, Any] = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        with pytest.raises(openai.BadRequestError) as info:
            c.batches.create(**{**args, **changes})
        error = error_of(info.value)
        assert error["type"] == "invalid_request_error" and error["param"] == param, error

    refused("input_file_id", input_file_id="file-000000000000000000000000")
    refused("input_file_id", input_file_id=text_id)
    refused("completion_window", completion_window="48h")
    refused("endpoint", endpoint="/v1/audio/speech")
    refused("metadata", metadata={f"k{i}": "v" for i in range(17)})
    refused("metadata", metadata={"k" * 65: "v"})
    refused("metadata.k", metadata={"k": "v" * 513})
    refused("metadata.k", metadata={"k": 1})
    assert server.batches() == [] and server.stats()["batches_created"] == 0
    limits = {f"{i:064d}": "v" * 512 for i in range(16)}
    assert (
        c.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", metadata=limits
        ).metadata
        == limits
    )
    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch_00000000000000000000000000000000")
    with pytest.raises(openai.NotFoundError):
        c.batches.cancel("batch_00000000000000000000000000000000")


# ----------------------------------------------------------------------------- listing and downloading


def test_list_pages_through_every_batch(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(batch_speed=float("inf"))
    c = client(server)
    file_id = upload(c, jsonl([chat_line(0)]))
    ids = [
        c.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(130)
    ]
    assert [b.id for b in c.batches.list(limit=100)] == ids[::-1]  # the auto-pager, newest first
    page = c.batches.list()
    assert len(page.data) == 20 and page.has_more
    raw = c.batches.with_raw_response.list(limit=30, after=ids[-20]).http_response.json()
    assert [b["id"] for b in raw["data"]] == ids[-21:-51:-1]
    assert (raw["object"], raw["first_id"], raw["last_id"], raw["has_more"]) == ("list", ids[-21], ids[-50], True)
    last = c.batches.with_raw_response.list(limit=100, after=ids[50]).http_response.json()
    assert [b["id"] for b in last["data"]] == ids[49::-1] and last["has_more"] is False
    for bad in (0, 101):
        with pytest.raises(openai.BadRequestError):
            c.batches.list(limit=bad)
    assert len(server.batches()) == 130 and server.stats()["batches_created"] == 130


def test_download_with_streaming_response(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(batch_speed=float("inf"))
    c = client(server)
    batch = wait_for(c, submit(c, [chat_line(i) for i in range(300)]).id, ["completed"])
    assert batch.output_file_id is not None
    with c.files.with_streaming_response.content(batch.output_file_id) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(300))
    assert server.file_content(batch.output_file_id) == c.files.content(batch.output_file_id).content


def test_fifty_thousand_lines_run_in_seconds(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(batch_speed=float("inf"), batch_validation_seconds=0, batch_finalizing_seconds=0)
    c = client(server)
    body = {"model": "text-embedding-3-small", "input": "same text", "dimensions": 1}
    lines = [{"custom_id": str(i), "method": "POST", "url": "/v1/embeddings", "body": body} for i in range(50_000)]
    started = time.monotonic()
    batch = wait_for(c, submit(c, lines, "/v1/embeddings").id, ["completed"], timeout=30)
    assert batch.request_counts.completed == 50_000
    assert time.monotonic() - started < 20  # about 1 s on a laptop
    assert len(c.files.content(batch.output_file_id).content.splitlines()) == 50_000


# ----------------------------------------------------------------------------- faults


def call_phase(c: openai.OpenAI, phase: str, ids: Dict[str, str]) -> Any:
    """Make the Files/Batch API call named ``phase``."""
    calls: Dict[str, Callable[[], Any]] = {
        "upload": lambda: c.files.create(file=("x.jsonl", jsonl([chat_line(0)])), purpose="batch"),
        "list_files": lambda: c.files.list(),
        "retrieve_file": lambda: c.files.retrieve(ids["file"]),
        "content": lambda: c.files.content(ids["file"]).content,
        "delete": lambda: c.files.delete(ids["spare"]),
        "create": lambda: c.batches.create(
            input_file_id=ids["file"], endpoint="/v1/chat/completions", completion_window="24h"
        ),
        "list": lambda: c.batches.list().data,
        "retrieve": lambda: c.batches.retrieve(ids["batch"]),
        "cancel": lambda: c.batches.cancel(ids["batch"]),
    }
    return calls[phase]()


PHASES = ["upload", "list_files", "retrieve_file", "content", "delete", "create", "list", "retrieve", "cancel"]


@pytest.mark.parametrize("phase", PHASES)
def test_fault_on_each_phase(make_server: Callable[..., FakeOpenAI], phase: str) -> None:
    server = make_server(batch_validation_seconds=30)
    c = client(server)
    ids = {"file": upload(c, jsonl([chat_line(0)])), "spare": upload(c, b"{}\n")}
    ids["batch"] = c.batches.create(
        input_file_id=ids["file"], endpoint="/v1/chat/completions", completion_window="24h"
    ).id
    before = (server.stats()["files_uploaded"], len(server.batches()))
    for other in PHASES:  # faults aimed at other calls leave this one alone
        if other != phase:
            server.inject("503", phase=other)
    server.inject("500", phase=phase)
    with pytest.raises(openai.InternalServerError) as info:
        call_phase(c, phase, ids)
    assert info.value.status_code == 500
    assert (server.stats()["files_uploaded"], len(server.batches())) == before  # the call was not carried out
    assert server.batches()[0]["status"] == "validating"
    call_phase(c, phase, ids)  # the fault is spent
    assert server.stats()["faults"] == 1


@pytest.mark.parametrize(
    "fault, error, status",
    [
        ("500", openai.InternalServerError, 500),
        ("503", openai.InternalServerError, 503),
        ("502_html", openai.InternalServerError, 502),
        ("504_html", openai.InternalServerError, 504),
        ("429", openai.RateLimitError, 429),
        ("400", openai.BadRequestError, 400),
        ("drop", openai.APIConnectionError, None),
        ("truncate", openai.APIConnectionError, None),
    ],
)
def test_fault_kinds_on_create(
    make_server: Callable[..., FakeOpenAI], fault: str, error: type, status: Optional[int]
) -> None:
    server = make_server()
    c = client(server)
    file_id = upload(c, jsonl([chat_line(0)]))
    server.inject(fault, phase="create")
    with pytest.raises(error) as info:
        c.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    if status is not None:
        assert info.value.status_code == status
    if fault == "429":
        assert info.value.response.headers["retry-after-ms"] == "200"
    assert len(server.batches()) == (1 if fault == "truncate" else 0)  # truncate: the reply is lost after the work


@pytest.mark.parametrize("fault", ["500", "drop"])
def test_fault_after_create_leaves_the_batch_created(make_server: Callable[..., FakeOpenAI], fault: str) -> None:
    server = make_server(batch_speed=float("inf"))
    c = client(server)
    file_id = upload(c, jsonl([chat_line(0)]))
    server.inject(fault, phase="create", after=True)
    with pytest.raises(openai.InternalServerError if fault == "500" else openai.APIConnectionError):
        c.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "r1"}
        )
    [batch] = c.batches.list().data  # yet it exists, and runs
    assert batch.metadata == {"run": "r1"}
    assert wait_for(c, batch.id, ["completed"]).request_counts.completed == 1
    assert server.stats()["batches_created"] == 1


def test_fault_after_upload_and_cancel(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(batch_validation_seconds=30)
    c = client(server)
    server.inject("503", phase="upload", after=True)
    with pytest.raises(openai.InternalServerError):
        upload(c, jsonl([chat_line(0)]))
    [file] = c.files.list().data
    batch = c.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    server.inject("500", phase="cancel", after=True)
    with pytest.raises(openai.InternalServerError):
        c.batches.cancel(batch.id)
    assert c.batches.retrieve(batch.id).status in ("cancelling", "cancelled")


def test_slow_fault_and_path_faults(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server(slow_seconds=0.2)
    c = client(server)
    server.inject("slow", phase="upload")
    started = time.monotonic()
    file_id = upload(c, jsonl([chat_line(0)]))
    assert time.monotonic() - started >= 0.2
    server.inject("503", path="/batches")  # a path suffix, as for the other endpoints
    c.files.list()
    with pytest.raises(openai.InternalServerError):
        c.batches.list()
    server.inject("missing_choice")  # a fault the Batch API cannot take waits for a request that can
    c.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    completion = c.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], max_tokens=1, n=2
    )
    assert len(completion.choices) == 1
    server.inject("500")  # any fault the Batch API can take hits its next call
    with pytest.raises(openai.InternalServerError):
        c.files.list()
    assert server.stats()["faults"] == 4


def test_fault_rates_apply_to_batch_calls(make_server: Callable[..., FakeOpenAI]) -> None:
    c = client(make_server(fault_rates={"503": 1.0}))
    with pytest.raises(openai.InternalServerError):
        c.files.list()
    server = make_server(fault_rates={"empty_200": 1.0})  # means nothing to the Batch API
    assert client(server).files.list().data == []


def test_inject_checks_phase_and_after(make_server: Callable[..., FakeOpenAI]) -> None:
    server = make_server()
    with pytest.raises(ValueError):
        server.inject("500", phase="upload_file")
    with pytest.raises(ValueError):
        server.inject("500", after=True)
    with pytest.raises(ValueError):
        server.inject("missing_choice", phase="create")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_speed": -1},
        {"batch_validation_seconds": -0.1},
        {"batch_finalizing_seconds": -0.1},
        {"batch_window_seconds": 0},
        {"batch_queue_tokens": 0},
        {"batch_error_rate": 1.5},
    ],
)
def test_batch_options_are_checked(kwargs: Dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FakeOpenAI(**kwargs)


def test_statuses_seen_by_polling(make_server: Callable[..., FakeOpenAI]) -> None:
    """A batch polled all the way through passes the statuses in their order."""
    server = make_server(batch_speed=100, batch_validation_seconds=1.0, batch_finalizing_seconds=0.3)  # slow-CI room
    c = client(server)
    batch = submit(c, [chat_line(i) for i in range(40)])
    seen: List[str] = []
    counts: Set[int] = set()
    deadline = time.monotonic() + 10
    while not seen or seen[-1] != "completed":
        assert time.monotonic() < deadline
        now = c.batches.retrieve(batch.id)
        if not seen or seen[-1] != now.status:
            seen.append(now.status)
        counts.add(now.request_counts.completed)
        time.sleep(0.005)
    order = ["validating", "in_progress", "finalizing", "completed"]
    assert seen == [status for status in order if status in seen]  # in order; a slow poll may miss finalizing
    assert seen[:2] == ["validating", "in_progress"] and len(counts) > 2  # progress was visible in_progress
