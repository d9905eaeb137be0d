"""``throttled-openai run``: a JSONL job against the fake server, over real HTTP with the real SDK."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from throttled_openai import cli
from throttled_openai.testing import FakeOpenAI

KEY = "sk-test-secret-0123456789"
INSTRUCT = "gpt-3.5-turbo-instruct"


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(rpm=6000, tpm=1_000_000, bucket_seconds=1.0, latency=0.005) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def completion(i: int, **extra: Any) -> Dict[str, Any]:
    return {"model": INSTRUCT, "prompt": f"prompt {i}", "max_tokens": 4, **extra}


def chat(i: int) -> Dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"chat {i}"}], "max_tokens": 4}


def write_lines(path: Path, lines: List[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def records(path: Path) -> List[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(tmp_path: Path, server: FakeOpenAI, *args: str) -> int:
    base = [str(tmp_path / "requests.jsonl"), "-o", str(tmp_path / "results.jsonl"), "--no-progress"]
    return cli.main([*base, "--api-key", KEY, "--base-url", server.base_url, *args])


def test_mixed_file_batches_completions_and_reports_bad_lines(
    tmp_path: Path, server: FakeOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    lines: List[Any] = [completion(i, metadata={"row": i}) for i in range(45)]
    lines += [chat(0), {"model": "text-embedding-3-small", "input": "vector me"}, "{not json", "", {"foo": 1}]
    lines += [{"prompt": "no model"}, completion(99, temperature=0.5)]
    write_lines(tmp_path / "requests.jsonl", lines)

    assert run(tmp_path, server) == 1  # bad lines make the job fail, but not stop
    out = {r["line"]: r for r in records(tmp_path / "results.jsonl")}
    assert sorted(out) == [n for n in range(1, len(lines) + 1) if n != 49]  # the blank line is no request
    for i in range(45):
        record = out[i + 1]
        assert record["response"]["choices"] == [
            {"index": 0, "text": f" echo:prompt {i}#0", "logprobs": None, "finish_reason": "length"}
        ]
        assert record["metadata"] == {"row": i} and "metadata" not in record["request"]
    assert out[46]["response"]["choices"][0]["message"]["content"] == "echo:chat 0#0"
    assert len(out[47]["response"]["data"][0]["embedding"]) == 8
    assert out[48]["error"]["type"] == "invalid_json" and out[48]["request"] == "{not json"
    assert out[50]["error"]["type"] == "unknown_shape" and "line 50" in out[50]["error"]["message"]
    assert out[51]["error"]["type"] == "missing_model"
    assert out[52]["response"]["choices"][0]["text"] == " echo:prompt 99#0"  # other params: its own request
    # 45 compatible lines: 3 requests (20 + 20 + 5); usage counted once per batch.
    paths = [entry["path"] for entry in server.requests_log]
    assert paths.count("/v1/completions") == 4 and len(paths) == 6
    assert sum(out[n]["response"]["usage"]["total_tokens"] for n in range(1, 46) if out[n]["response"]["usage"]) > 0
    err = capsys.readouterr().err
    assert "failed 3 (" in err and "invalid_json 1" in err and "429s 0" in err
    assert KEY not in err and KEY not in (tmp_path / "results.jsonl").read_text()


def test_ordered_cookbook_format(tmp_path: Path) -> None:
    lines = [chat(i) if i % 5 == 0 else completion(i, metadata=i) for i in range(60)]
    write_lines(tmp_path / "requests.jsonl", lines)
    with FakeOpenAI(slow_seconds=0.5) as server:
        server.inject("slow", count=1, path="/chat/completions")  # the first chat line finishes last
        assert run(tmp_path, server, "--ordered", "--format", "cookbook") == 0
    out = records(tmp_path / "results.jsonl")
    assert [r[0] for r in out] == [{k: v for k, v in line.items() if k != "metadata"} for line in lines]
    for i, record in enumerate(out):
        if i % 5:
            assert len(record) == 3 and record[2] == i and record[1]["choices"][0]["text"] == f" echo:prompt {i}#0"
        else:
            assert len(record) == 2 and record[1]["choices"][0]["message"]["content"] == f"echo:chat {i}#0"
    assert (tmp_path / "results.jsonl.lines").read_text().split() == [str(n) for n in range(1, 61)]


def test_rerun_skips_done_lines_and_redoes_a_torn_one(tmp_path: Path, server: FakeOpenAI) -> None:
    write_lines(tmp_path / "requests.jsonl", [chat(i) for i in range(10)])
    assert run(tmp_path, server) == 0
    results = tmp_path / "results.jsonl"
    kept = results.read_text().splitlines(keepends=True)
    torn = kept[-1][: len(kept[-1]) // 2]  # as a crash mid-write would leave it
    results.write_text("".join(kept[:-1]) + torn)
    server.reset_stats()
    assert run(tmp_path, server) == 0
    assert server.stats()["requests"] == 1
    out = records(results)
    assert sorted(r["line"] for r in out) == list(range(1, 11))
    server.reset_stats()
    assert run(tmp_path, server) == 0 and server.stats()["requests"] == 0


def test_retry_failed_reruns_only_failures_and_compacts(tmp_path: Path, server: FakeOpenAI) -> None:
    write_lines(tmp_path / "requests.jsonl", [chat(i) for i in range(12)])
    server.inject("400", count=3)  # never retried by the client: three lines fail
    assert run(tmp_path, server, "--max-workers", "1") == 1
    failed = [r["line"] for r in records(tmp_path / "results.jsonl") if "error" in r]
    assert len(failed) == 3
    assert {r["error"]["type"] for r in records(tmp_path / "results.jsonl") if "error" in r} == {"status_400"}
    server.reset_stats()
    assert run(tmp_path, server) == 1  # a plain rerun leaves failures alone
    assert server.stats()["requests"] == 0
    assert run(tmp_path, server, "--retry-failed") == 0
    assert server.stats()["requests"] == 3
    out = records(tmp_path / "results.jsonl")
    assert [r["line"] for r in out] == list(range(1, 13)) and all("response" in r for r in out)


def test_a_400_in_a_batch_fails_only_its_line(tmp_path: Path) -> None:
    lines = [completion(i) for i in range(8)]
    lines[5]["prompt"] = "word " * 80
    write_lines(tmp_path / "requests.jsonl", lines)
    with FakeOpenAI(context_length=50) as server:
        assert run(tmp_path, server) == 1
    out = {r["line"]: r for r in records(tmp_path / "results.jsonl")}
    assert out[6]["error"]["type"] == "status_400" and out[6]["error"]["status"] == 400
    assert all("response" in out[n] for n in out if n != 6)


def test_usage_errors_exit_2(tmp_path: Path, server: FakeOpenAI, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as missing:
        run(tmp_path, server)  # no requests.jsonl
    assert missing.value.code == 2
    write_lines(tmp_path / "requests.jsonl", [chat(0)])
    with pytest.raises(SystemExit) as no_key:
        cli.main([str(tmp_path / "requests.jsonl"), "-o", str(tmp_path / "out.jsonl")])
    assert no_key.value.code == 2 and "OPENAI_API_KEY" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_rpm:
        run(tmp_path, server, "--rpm", "0")
    assert bad_rpm.value.code == 2
    assert run(tmp_path, server) == 0
    with pytest.raises(SystemExit) as other_format:  # never mistake one format's results for the other's
        run(tmp_path, server, "--format", "cookbook")
    assert other_format.value.code == 2 and len(records(tmp_path / "results.jsonl")) == 1


def test_key_and_base_url_from_the_environment(
    tmp_path: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_lines(tmp_path / "requests.jsonl", [chat(0)])
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    assert cli.main([str(tmp_path / "requests.jsonl"), "-o", str(tmp_path / "r.jsonl"), "--no-progress"]) == 0
    assert server.stats()["admitted"] == 1


def test_kill_9_then_rerun_gives_exactly_one_result_per_line(tmp_path: Path) -> None:
    lines = [chat(i) if i % 10 == 0 else completion(i) for i in range(200)]  # 20 chat + 9 batches
    requests = write_lines(tmp_path / "requests.jsonl", lines)
    results = tmp_path / "results.jsonl"
    with FakeOpenAI(rpm=300, tpm=1_000_000, bucket_seconds=1.0, latency=0.01) as server:
        command = [sys.executable, "-m", "throttled_openai.cli", str(requests), "-o", str(results), "--rpm", "300"]
        env = {**os.environ, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": server.base_url}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(cli.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            if results.exists() and results.read_bytes().count(b"\n") >= 30:
                break
            time.sleep(0.02)
        assert child.poll() is None, "the job ended before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait()
        written = results.read_bytes().count(b"\n")
        assert 30 <= written < len(lines)
        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert "from earlier runs" in rerun.stderr and KEY not in rerun.stderr
    out = records(results)
    assert sorted(r["line"] for r in out) == list(range(1, 201))
    for record in out:
        i = record["line"] - 1
        choice = record["response"]["choices"][0]
        assert choice.get("text", choice.get("message", {}).get("content")).endswith(f" {i}#0")


def test_python_dash_m_throttled_openai_run(tmp_path: Path) -> None:
    import throttled_openai.__main__ as entry

    if "cli.add_parser" not in Path(entry.__file__).read_text():
        pytest.skip("`run` is not wired into throttled_openai/__main__.py yet")
    out = subprocess.run(
        [sys.executable, "-m", "throttled_openai", "run", "--help"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and "--retry-failed" in out.stdout


# -- regressions ---------------------------------------------------------------------------------


class _Crash(BaseException):
    """Stands for the process dying right after an ``os.replace``."""


@pytest.mark.parametrize("crash_after", [1, 2, 3])
def test_compaction_crash_at_any_step_keeps_records_and_line_numbers_paired(
    tmp_path: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, crash_after: int
) -> None:
    lines = [{**chat(i), "metadata": i + 1} for i in range(12)]  # metadata: the line number, to check pairing
    write_lines(tmp_path / "requests.jsonl", lines)
    server.inject("400", count=3)
    assert run(tmp_path, server, "--format", "cookbook", "--max-workers", "1") == 1
    real_replace, calls = os.replace, []

    def replace_then_crash(source: Any, target: Any) -> None:
        real_replace(source, target)
        calls.append(target)
        if len(calls) == crash_after:
            raise _Crash

    monkeypatch.setattr(os, "replace", replace_then_crash)
    with pytest.raises(_Crash):  # the 3 failures are redone, then compaction dies part-way
        run(tmp_path, server, "--format", "cookbook", "--retry-failed")
    monkeypatch.setattr(os, "replace", real_replace)
    server.reset_stats()
    assert run(tmp_path, server, "--format", "cookbook", "--retry-failed") == 0
    assert server.stats()["requests"] == 0  # nothing lost, nothing mispaired into a failure
    numbers = [int(n) for n in (tmp_path / "results.jsonl.lines").read_text().split()]
    out = records(tmp_path / "results.jsonl")
    assert numbers == list(range(1, 13)) and [record[2] for record in out] == numbers
    assert all("choices" in record[1] for record in out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requests.jsonl", "results.jsonl", "results.jsonl.lines"]


def test_odd_lines_fail_alone_and_never_stop_the_job(tmp_path: Path, server: FakeOpenAI) -> None:
    lines: List[Any] = [
        completion(1),
        '{"model": "' + INSTRUCT + '", "prompt": "bad \\ud800 x", "max_tokens": 4}',  # lone surrogate: valid JSON
        {"model": [INSTRUCT], "prompt": "x"},
        {"model": {"a": 1}, "prompt": "x"},
        completion(5, n="2"),
        completion(6, max_tokens="5"),
        chat(7),
        completion(8),
    ]
    write_lines(tmp_path / "requests.jsonl", lines)
    assert run(tmp_path, server) == 1
    out = {r["line"]: r for r in records(tmp_path / "results.jsonl")}
    assert sorted(out) == list(range(1, 9))
    assert out[3]["error"]["type"] == out[4]["error"]["type"] == "invalid_model"
    assert "error" in out[2] and out[2]["request"]["prompt"] == "bad \ud800 x"
    assert all("response" in out[n] for n in (1, 7, 8))
    server.reset_stats()
    assert run(tmp_path, server) == 1 and server.stats()["requests"] == 0  # resumes past them


def test_a_200_whose_body_is_not_an_object_fails_its_lines(tmp_path: Path) -> None:
    import http.server
    import threading

    class NullBody(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "4")
            self.end_headers()
            self.wfile.write(b"null")

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NullBody)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    write_lines(tmp_path / "requests.jsonl", [completion(1), completion(2), chat(3)])
    base = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        code = cli.main([str(tmp_path / "requests.jsonl"), "-o", str(tmp_path / "results.jsonl"), "--no-progress",
                         "--api-key", KEY, "--base-url", base, "--rpm", "600", "--tpm", "100000"])  # fmt: skip
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert code == 1
    out = records(tmp_path / "results.jsonl")
    assert sorted(r["line"] for r in out) == [1, 2, 3]
    assert all(r["error"]["type"] == "UnexpectedResponse" for r in out)


def test_a_batch_refused_as_too_large_is_split(tmp_path: Path) -> None:
    write_lines(tmp_path / "requests.jsonl", [completion(i, max_tokens=600) for i in range(12)])
    with FakeOpenAI(rpm=600, tpm=6000) as server:  # the 12 prompts together need ~7,300 tokens at once
        assert run(tmp_path, server) == 0
    out = {r["line"]: r for r in records(tmp_path / "results.jsonl")}
    assert sorted(out) == list(range(1, 13))
    assert all(out[i + 1]["response"]["choices"][0]["text"] == f" echo:prompt {i}#0" for i in range(12))


def test_batch_usage_survives_its_first_line_being_asked_again(tmp_path: Path) -> None:
    write_lines(tmp_path / "requests.jsonl", [completion(i) for i in range(5)])
    with FakeOpenAI(shuffle=False) as server:
        server.inject("duplicate_choice")  # one line's answer is repeated: it is asked again alone
        assert run(tmp_path, server, "--rpm", "6000", "--tpm", "1000000") == 0
        charged = server.stats()["tokens_charged"]
        assert server.stats()["requests"] == 2
    out = records(tmp_path / "results.jsonl")
    assert sum((r["response"]["usage"] or {}).get("total_tokens", 0) for r in out) == charged


@pytest.mark.parametrize("fault", ["quota", "401"])
def test_an_error_every_request_would_get_stops_the_job(
    tmp_path: Path, fault: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lines(tmp_path / "requests.jsonl", [chat(i) for i in range(30)])
    with FakeOpenAI(api_keys=[KEY], rpm=6000, tpm=1_000_000, bucket_seconds=1.0) as server:
        args = [str(tmp_path / "requests.jsonl"), "-o", str(tmp_path / "results.jsonl"), "--no-progress"]
        args += ["--base-url", server.base_url, "--max-workers", "2"]
        if fault == "quota":
            server.inject("quota")
        assert cli.main([*args, "--api-key", KEY if fault == "quota" else "sk-wrong-key-000"]) == 1
        assert "stopped at line" in capsys.readouterr().err
        first = records(tmp_path / "results.jsonl")
        assert len(first) < 30 and server.stats()["requests"] < 30  # the rest was not sent
        assert {r["error"]["type"] for r in first if "error" in r} == {"quota" if fault == "quota" else "status_401"}
        assert cli.main([*args, "--api-key", KEY]) == 1  # a plain rerun does the rest, keeps the failures
        assert len(records(tmp_path / "results.jsonl")) == 30
        assert cli.main([*args, "--api-key", KEY, "--retry-failed"]) == 0
    out = records(tmp_path / "results.jsonl")
    assert [r["line"] for r in out] == list(range(1, 31)) and all("response" in r for r in out)


def test_ctrl_c_does_not_wait_for_requests_on_the_wire(tmp_path: Path) -> None:
    requests = write_lines(tmp_path / "requests.jsonl", [chat(i) for i in range(20)])
    results = tmp_path / "results.jsonl"
    with FakeOpenAI(slow_seconds=30, latency=0.005) as server:
        server.inject("slow", count=2)
        command = [sys.executable, "-m", "throttled_openai.cli", str(requests), "-o", str(results), "--no-progress"]
        env = {**os.environ, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": server.base_url}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(cli.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while server.stats()["requests"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGINT)
        try:  # before the fix it waited for the 30 s request
            _, err = child.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            pytest.fail("Ctrl-C waited for the requests on the wire")
        assert child.returncode == 130 and "interrupted" in err
        server._faults.clear()
        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(r["line"] for r in records(results)) == list(range(1, 21))
