"""``throttled-openai run --batch-api``: the same job through the Batch API, against FakeOpenAI, with
``kill -9`` in each phase (upload, create, poll, download) and a rerun that never submits twice."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from throttled_openai import cli
from throttled_openai.testing import FakeOpenAI

KEY = "sk-test-batch-cli-secret"
INSTRUCT = "gpt-3.5-turbo-instruct"
SPEEDS = {"batch_speed": 5000.0, "batch_validation_seconds": 0.02, "batch_finalizing_seconds": 0.02}
POLL = ["--poll-interval", "0.02", "--max-poll-interval", "0.1"]


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(**SPEEDS) as fake:  # type: ignore[arg-type]
        yield fake


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def completion(i: int) -> Dict[str, Any]:
    return {"model": INSTRUCT, "prompt": f"prompt {i}", "max_tokens": 4}


def chat(i: int) -> Dict[str, Any]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"chat {i}"}], "max_tokens": 4}
    return {**body, "metadata": {"row": i}}


def mixed(count: int) -> List[Any]:
    return [chat(i) if i % 2 else completion(i) for i in range(count)]


def write_lines(path: Path, lines: List[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def records(path: Path) -> List[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def text_of(record: Dict[str, Any]) -> str:
    choice = record["response"]["choices"][0]
    return str(choice.get("text", choice.get("message", {}).get("content")))


def run(tmp_path: Path, server: FakeOpenAI, *args: str) -> int:
    base = [str(tmp_path / "requests.jsonl"), "-o", str(tmp_path / "results.jsonl"), "--no-progress", *POLL]
    return cli.main([*base, "--api-key", KEY, "--base-url", server.base_url, "--batch-api", *args])


def assert_one_good_result_per_line(path: Path, count: int) -> None:
    out = records(path)
    assert sorted(r["line"] for r in out) == list(range(1, count + 1))
    for record in out:
        assert text_of(record).endswith(f" {record['line'] - 1}#0"), record


def test_the_same_job_gives_the_same_output_on_both_routes(
    tmp_path: Path, server: FakeOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lines(tmp_path / "requests.jsonl", [*mixed(50), "not json"])
    assert run(tmp_path, server, "--ordered") == 1  # the bad line fails, as on the ordinary route
    err = capsys.readouterr().err
    batch = records(tmp_path / "results.jsonl")
    assert [r["line"] for r in batch] == list(range(1, 52))
    assert batch[-1]["error"]["type"] == "invalid_json"
    assert batch[1]["metadata"] == {"row": 1} and batch[2]["batch_lines"][:2] == [1, 3]
    # 25 completions lines share 2 requests (20 + 5), the 25 chat lines one each: 27 request lines.
    assert server.stats()["batch_lines"] == 27 and server.stats()["batches_created"] == 2
    used = int(re.search(r"tokens used (\d+)", err).group(1))  # type: ignore[union-attr]
    assert used == server.stats()["batch_tokens_used"] > 0 and "Batch API: 2 batches" in err
    sync = tmp_path / "sync.jsonl"
    base = [str(tmp_path / "requests.jsonl"), "-o", str(sync), "--no-progress", "--ordered"]
    assert cli.main([*base, "--api-key", KEY, "--base-url", server.base_url]) == 1
    assert int(re.search(r"tokens used (\d+)", capsys.readouterr().err).group(1)) == used  # type: ignore[union-attr]
    for a, b in zip(batch, records(sync)):
        assert {k: v for k, v in a.items() if k != "response"} == {k: v for k, v in b.items() if k != "response"}
        if "response" in a:
            assert text_of(a) == text_of(b)


def test_cookbook_format_and_a_rerun_of_a_finished_job_sends_nothing(
    tmp_path: Path, server: FakeOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lines(tmp_path / "requests.jsonl", mixed(30))
    assert run(tmp_path, server, "--format", "cookbook", "--ordered") == 0
    out = records(tmp_path / "results.jsonl")
    assert len(out) == 30 and out[1][2] == {"row": 1} and out[0][0]["prompt"] == "prompt 0"
    requests = server.stats()["requests"]
    assert run(tmp_path, server, "--format", "cookbook", "--ordered") == 0
    assert server.stats()["requests"] == requests
    assert "30 from earlier runs" in capsys.readouterr().err


def test_failed_lines_are_rerun_with_retry_failed(tmp_path: Path, server: FakeOpenAI) -> None:
    lines = mixed(10)
    lines[3] = {**chat(3), "n": 0}  # the endpoint refuses it
    write_lines(tmp_path / "requests.jsonl", lines)
    assert run(tmp_path, server) == 1
    failed = [r for r in records(tmp_path / "results.jsonl") if "error" in r]
    assert [r["line"] for r in failed] == [4] and failed[0]["error"]["status"] == 400
    created = server.stats()["batches_created"]
    lines[3] = chat(3)
    write_lines(tmp_path / "requests.jsonl", lines)  # fixed: its hash changed, so it is redone
    assert run(tmp_path, server) == 0
    assert server.stats()["batches_created"] == created + 1
    assert_one_good_result_per_line(tmp_path / "results.jsonl", 10)
    lines[5] = {**chat(5), "n": 0}
    write_lines(tmp_path / "requests.jsonl", lines)
    assert run(tmp_path, server) == 1
    assert run(tmp_path, server) == 1  # an error that stands is not sent again...
    assert server.stats()["batches_created"] == created + 2
    assert run(tmp_path, server, "--retry-failed") == 1  # ...until asked
    assert server.stats()["batches_created"] == created + 3


def test_usage_errors(tmp_path: Path, server: FakeOpenAI, capsys: pytest.CaptureFixture[str]) -> None:
    write_lines(tmp_path / "requests.jsonl", mixed(2))
    base = [str(tmp_path / "requests.jsonl"), "-o", str(tmp_path / "results.jsonl"), "--api-key", KEY]
    for extra in (["--cancel"], ["--queue-tokens", "5"], ["--fallback", "sync"]):
        with pytest.raises(SystemExit) as exited:
            cli.main([*base, "--base-url", server.base_url, *extra])
        assert exited.value.code == 2 and "--batch-api" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main([*base, "--base-url", server.base_url, "--batch-api", "--cancel"])
    assert exited.value.code == 2 and "no batch job to cancel" in capsys.readouterr().err
    assert server.stats()["requests"] == 0


# -- kill -9 in each phase, then the same command again -------------------------------------------


def command(tmp_path: Path, server: FakeOpenAI, *extra: str) -> List[str]:
    requests, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    args = [str(requests), "-o", str(results), "--batch-api", "--no-progress", *POLL, *extra]
    return [sys.executable, "-m", "throttled_openai.cli", *args, "--base-url", server.base_url]


def environment() -> Dict[str, str]:
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cli.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def wait_for_request(server: FakeOpenAI, child: subprocess.Popen[Any], method: str, path: str) -> None:
    """Until the server has received ``method path`` (a regular expression)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(e["method"] == method and re.fullmatch(path, e["path"]) for e in server.requests_log):
            return
        assert child.poll() is None, "the job ended before it could be killed"
        time.sleep(0.01)
    raise AssertionError(f"no {method} {path} within 60 s")


@pytest.mark.parametrize(
    "phase, method, path",
    [
        ("upload", "POST", "/v1/files"),
        ("create", "POST", "/v1/batches"),
        ("poll", "GET", "/v1/batches/batch_[0-9a-f]+"),
        ("content", "GET", "/v1/files/file-[0-9a-f]+/content"),  # the download
    ],
)
def test_kill_9_in_each_phase_then_rerun_never_submits_a_chunk_twice(
    tmp_path: Path, phase: str, method: str, path: str
) -> None:
    write_lines(tmp_path / "requests.jsonl", mixed(40))
    with FakeOpenAI(slow_seconds=60, **SPEEDS) as server:  # type: ignore[arg-type]
        if phase == "poll":
            server.batch_speed = 0  # the batches stay in_progress
        else:  # the call is carried out, and its answer never comes before the kill
            server.inject("slow", phase=phase)
        child = subprocess.Popen(
            command(tmp_path, server), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for_request(server, child, method, path)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert os.path.exists(tmp_path / "results.jsonl.batch.json")
        server.batch_speed = 5000
        rerun = subprocess.run(
            command(tmp_path, server), env=environment(), capture_output=True, text=True, timeout=120, check=False
        )
        assert rerun.returncode == 0, rerun.stderr
        stats = server.stats()
        metadata = [
            (b["metadata"]["throttled_openai_chunk"], b["metadata"]["throttled_openai_attempt"])
            for b in server.batches()
        ]
    assert_one_good_result_per_line(tmp_path / "results.jsonl", 40)
    assert len(metadata) == len(set(metadata)) == stats["batches_created"] == 2  # one per chunk (2 models)
    assert stats["batch_lines"] == 21  # 20 chat lines, and one request for the 20 completions lines: once each
    assert KEY not in rerun.stderr


def test_ctrl_c_leaves_the_batches_running_and_cancel_cancels_them(tmp_path: Path) -> None:
    write_lines(tmp_path / "requests.jsonl", mixed(40))
    with FakeOpenAI(**SPEEDS) as server:  # type: ignore[arg-type]
        server.batch_speed = 0
        child = subprocess.Popen(
            command(tmp_path, server), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        wait_for_request(server, child, "GET", "/v1/batches/batch_[0-9a-f]+")
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
        assert child.returncode == 130
        assert "keep running" in err and "--cancel" in err
        assert {b["status"] for b in server.batches()} == {"in_progress"}
        cancel = subprocess.run(
            command(tmp_path, server, "--cancel"), env=environment(), capture_output=True, text=True, timeout=60
        )
        assert cancel.returncode == 1, cancel.stderr
        assert {b["status"] for b in server.batches()} == {"cancelled"}
        # Cancelled lines have no result: a later run submits them again.
        server.batch_speed = 5000
        again = subprocess.run(command(tmp_path, server), env=environment(), capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
    assert_one_good_result_per_line(tmp_path / "results.jsonl", 40)


def test_a_batch_refused_by_the_queue_waits_and_the_summary_counts_every_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lines(tmp_path / "requests.jsonl", [chat(i) for i in range(40)])
    with FakeOpenAI(batch_queue_tokens=200, **SPEEDS) as server:  # type: ignore[arg-type]
        code = run(tmp_path, server, "--queue-tokens", "200")
        refused: Optional[int] = sum(b["status"] == "failed" for b in server.batches())
    assert code == 0 and refused == 0
    assert_one_good_result_per_line(tmp_path / "results.jsonl", 40)
    assert "Batch API:" in capsys.readouterr().err


def test_an_error_every_call_would_get_stops_the_job_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lines(tmp_path / "requests.jsonl", mixed(4))
    with FakeOpenAI(api_keys=["sk-the-right-one"], **SPEEDS) as server:  # type: ignore[arg-type]
        assert run(tmp_path, server) == 1
    err = capsys.readouterr().err
    assert "stopped:" in err and "401" in err and "rerun the same command" in err
    assert "Traceback" not in err and KEY not in err


def test_a_line_edited_while_its_batch_runs_is_sent_again_and_gets_its_own_result(tmp_path: Path) -> None:
    lines = [chat(i) for i in range(3)]
    write_lines(tmp_path / "requests.jsonl", lines)
    with FakeOpenAI(**SPEEDS) as server:  # type: ignore[arg-type]
        server.batch_speed = 0
        child = subprocess.Popen(
            command(tmp_path, server), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for_request(server, child, "GET", "/v1/batches/batch_[0-9a-f]+")
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        lines[1] = {**chat(1), "messages": [{"role": "user", "content": "edited 1"}]}
        write_lines(tmp_path / "requests.jsonl", lines)
        server.batch_speed = 5000
        assert run(tmp_path, server) == 0
        assert server.stats()["batches_created"] == 2  # the first batch, and one for the edited line
    out = {r["line"]: text_of(r) for r in records(tmp_path / "results.jsonl")}
    assert out == {1: "echo:chat 0#0", 2: "echo:edited 1#0", 3: "echo:chat 2#0"}


def test_two_runs_of_one_job_at_once_are_refused(tmp_path: Path, server: FakeOpenAI) -> None:
    from throttled_openai.batch_api import _Store

    write_lines(tmp_path / "requests.jsonl", mixed(4))
    with _Store(cli.batch_state_path(str(tmp_path / "results.jsonl"))).locked(), pytest.raises(SystemExit) as exited:
        run(tmp_path, server)
    assert exited.value.code == 2 and server.stats()["requests"] == 0
