"""``throttled-openai run``: a JSONL job against the fake server, over real HTTP with the real SDK."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import openai
import pytest
from conftest import BlackHole

from throttled_openai import cli
from throttled_openai.client import ThrottledClient
from throttled_openai.retry import Retry
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


@pytest.mark.parametrize("crash_after", [1, 2, 3, 4])
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
    raw = (tmp_path / "requests.jsonl").read_bytes().splitlines()
    assert (tmp_path / "results.jsonl.hashes").read_text().split() == [cli.line_digest(line) for line in raw]
    files = ["requests.jsonl", "results.jsonl", "results.jsonl.hashes", "results.jsonl.lines"]
    assert sorted(p.name for p in tmp_path.iterdir()) == files


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


# -- issue 11, section D: the command line ---------------------------------------------------------


def summary_counts(err: str) -> Tuple[int, int]:
    """``(lines that have a result, written now)`` from the summary."""
    found = re.search(r"run: (?:interrupted, )?(\d+) (?:of \d+ )?lines have a result in .* \((\d+) written now", err)
    assert found, err
    return int(found.group(1)), int(found.group(2))


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two retries a few milliseconds apart instead of six over about 30 s: a line that gets no answer
    fails at once."""
    quick = Retry(max_retries=2, backoff_base=0.001, backoff_max=0.001)
    monkeypatch.setattr(cli, "ThrottledClient", functools.partial(ThrottledClient, retry=quick))


def refused_port() -> int:
    """A port nothing listens on: bound to learn a free one, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("case", ["missing_directory", "output_is_a_directory", "directory_is_a_file", "input_dir"])
@pytest.mark.parametrize("fmt", ["native", "cookbook"])
def test_unusable_paths_are_usage_errors_before_anything_is_sent(
    tmp_path: Path, server: FakeOpenAI, capsys: pytest.CaptureFixture[str], case: str, fmt: str
) -> None:
    requests = write_lines(tmp_path / "requests.jsonl", [chat(i) for i in range(5)])
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    source, output, message = {
        "missing_directory": (requests, tmp_path / "nowhere" / "out.jsonl", "the output's directory does not exist"),
        "output_is_a_directory": (requests, tmp_path / "folder", "the output is a directory"),
        "directory_is_a_file": (requests, tmp_path / "file" / "out.jsonl", "the output's directory is a file"),
        "input_dir": (tmp_path / "folder", tmp_path / "out.jsonl", "the input is a directory, not a file"),
    }[case]
    args = [str(source), "-o", str(output), "--no-progress", "--api-key", KEY, "--base-url", server.base_url]
    with pytest.raises(SystemExit) as info:  # before the fix: a traceback after the requests went out
        cli.main([*args, "--format", fmt])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"throttled-openai run: error: {message}: ") and err.count("\n") == 1, err
    assert server.stats()["requests"] == 0
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("content", ["", "\n \n\t\n"])
@pytest.mark.parametrize("fmt", ["native", "cookbook"])
def test_an_empty_input_writes_an_empty_output_and_says_so(
    tmp_path: Path, server: FakeOpenAI, capsys: pytest.CaptureFixture[str], content: str, fmt: str
) -> None:
    (tmp_path / "requests.jsonl").write_text(content)
    for _ in range(2):  # and again, resuming it
        assert run(tmp_path, server, "--format", fmt) == 0
        assert (tmp_path / "results.jsonl").read_bytes() == b""
        err = capsys.readouterr().err
        assert "no requests in" in err and "(0 records)" in err and "wrote an empty" in err, err
    assert server.stats()["requests"] == 0


def test_a_base_url_that_refuses_connections_stops_the_job(
    tmp_path: Path, quick_retries: None, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lines(tmp_path / "requests.jsonl", [chat(i) for i in range(100)])
    port = refused_port()
    args = [str(tmp_path / "requests.jsonl"), "-o", str(tmp_path / "results.jsonl"), "--no-progress"]
    args += ["--api-key", KEY, "--max-workers", "4"]
    base_url = f"http://user:secret@127.0.0.1:{port}/v1/private-path?token=x"
    assert cli.main([*args, "--base-url", base_url, "--max-connection-failures", "5"]) == 1
    err = capsys.readouterr().err
    assert f"stopped after 5 requests in a row got no answer from http://127.0.0.1:{port} (the last, line " in err
    assert "secret" not in err and "private-path" not in err and "token=" not in err
    assert "Check --base-url and the network, then rerun with --retry-failed" in err
    out = records(tmp_path / "results.jsonl")
    assert 5 <= len(out) <= 5 + 2 * 4  # those in flight when it stopped at most; the rest left for a rerun
    assert {r["error"]["type"] for r in out} == {"connection"}
    assert summary_counts(err) == (len(out), len(out))
    with FakeOpenAI() as server:  # the server is back: a rerun does the rest and redoes the failures
        assert cli.main([*args, "--base-url", server.base_url, "--retry-failed"]) == 0
        assert server.stats()["requests"] == 100
    out = records(tmp_path / "results.jsonl")
    assert [r["line"] for r in out] == list(range(1, 101)) and all("response" in r for r in out)


def test_a_server_that_drops_every_connection_stops_the_job(
    tmp_path: Path, quick_retries: None, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lines(tmp_path / "requests.jsonl", [chat(i) for i in range(300)])
    with FakeOpenAI(fault_rates={"drop": 1.0}) as server:
        assert run(tmp_path, server) == 1  # the default: 20 requests in a row, 32 workers
        sent = server.stats()["requests"]
    err = capsys.readouterr().err
    assert "stopped after 20 requests in a row got no answer from http://127.0.0.1:" in err, err
    out = records(tmp_path / "results.jsonl")
    assert 20 <= len(out) <= 20 + 2 * 32 and {r["error"]["type"] for r in out} == {"connection"}
    assert sent <= 3 * (20 + 2 * 32)  # three attempts a line: the rest was never sent


@pytest.mark.parametrize("limits", [[], ["--rpm", "600", "--tpm", "100000"]], ids=["limits_unknown", "limits_given"])
def test_a_base_url_that_never_answers_stops_the_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], limits: List[str]
) -> None:
    """A black-holed proxy accepts connections and never answers. Each attempt used to wait the SDK's
    600 s and each line made 7 of them (limits unknown: one at a time) before the job counted one
    failure; now every attempt that times out counts, and the job stops after 5 timeouts of 0.3 s.
    The client's own retry policy (7 attempts, backoff up to 16 s): the stop must not wait for it."""
    write_lines(tmp_path / "requests.jsonl", [chat(i) for i in range(100)])
    args = [str(tmp_path / "requests.jsonl"), "-o", str(tmp_path / "results.jsonl"), "--no-progress"]
    args += ["--api-key", KEY, "--max-workers", "4"]
    with BlackHole() as hole:
        started = time.monotonic()
        code = cli.main([*args, "--base-url", hole.url + "/v1", "--timeout", "0.3", "--max-connection-failures", "5"])
        elapsed = time.monotonic() - started
        connections = len(hole.held)
    assert code == 1 and elapsed < 15, elapsed
    assert 1 <= connections <= 5 + 2 * 4  # it was reached, and little more was sent after the fifth timeout
    err = capsys.readouterr().err
    assert f"stopped after 5 attempts in a row got no answer from {hole.url} within --timeout 0.3 s" in err, err
    assert "Check --base-url and the network (or give a longer --timeout), then rerun the same command" in err
    out = records(tmp_path / "results.jsonl")  # a line fails only once its 7 attempts timed out: none did
    assert out == [] and summary_counts(err) == (0, 0)
    with FakeOpenAI() as server:  # the server is back: a rerun does every line
        assert cli.main([*args, "--base-url", server.base_url]) == 0
        assert server.stats()["requests"] == 100
    out = records(tmp_path / "results.jsonl")
    assert sorted(r["line"] for r in out) == list(range(1, 101)) and all("response" in r for r in out)


def test_timeout_must_be_a_positive_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_lines(tmp_path / "requests.jsonl", [chat(0)])
    for value in ("0", "-1", "nan", "inf"):
        args = [str(tmp_path / "requests.jsonl"), "-o", str(tmp_path / "results.jsonl"), "--api-key", KEY]
        with pytest.raises(SystemExit) as info:
            cli.main([*args, "--base-url", f"http://127.0.0.1:{refused_port()}/v1", "--timeout", value])
        assert info.value.code == 2
        assert "--timeout must be a finite number of seconds > 0" in capsys.readouterr().err


def test_a_batch_that_gets_no_answer_counts_once(
    tmp_path: Path, quick_retries: None, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lines(tmp_path / "requests.jsonl", [completion(i) for i in range(200)])
    base_url = f"http://127.0.0.1:{refused_port()}/v1"
    args = [str(tmp_path / "requests.jsonl"), "-o", str(tmp_path / "results.jsonl"), "--no-progress"]
    args += ["--api-key", KEY, "--base-url", base_url, "--max-workers", "1", "--rpm", "600", "--tpm", "100000"]
    assert cli.main([*args, "--max-connection-failures", "2"]) == 1
    assert "stopped after 2 requests in a row got no answer" in capsys.readouterr().err
    out = records(tmp_path / "results.jsonl")
    assert 40 <= len(out) <= 80 and {r["error"]["type"] for r in out} == {"connection"}  # 20 lines a request


def test_answers_in_between_keep_the_job_going(tmp_path: Path, quick_retries: None) -> None:
    lines = [chat(i) if i % 2 == 0 else {"model": "text-embedding-3-small", "input": f"v{i}"} for i in range(30)]
    write_lines(tmp_path / "requests.jsonl", lines)
    with FakeOpenAI() as server:
        server.inject("drop", count=10_000, path="/chat/completions")  # every chat line fails, embeddings don't
        assert run(tmp_path, server, "--max-workers", "1", "--max-connection-failures", "3") == 1
    out = {r["line"]: r for r in records(tmp_path / "results.jsonl")}
    assert sorted(out) == list(range(1, 31))
    assert all(("error" in out[n]) == (n % 2 == 1) for n in out)


def test_edited_lines_are_redone_and_counted(
    tmp_path: Path, server: FakeOpenAI, capsys: pytest.CaptureFixture[str]
) -> None:
    lines: List[Any] = [{**chat(i), "metadata": {"id": i}} for i in range(10)]
    requests = write_lines(tmp_path / "requests.jsonl", lines)
    assert run(tmp_path, server) == 0
    capsys.readouterr()
    # the same requests, keys reordered and spaced out: no change
    requests.write_text("".join(json.dumps(dict(reversed(list(line.items()))), indent=1).replace("\n", " ") + "\n"
                                for line in lines))  # fmt: skip
    server.reset_stats()
    assert run(tmp_path, server) == 0 and server.stats()["requests"] == 0
    assert "changed" not in capsys.readouterr().err
    lines[2]["messages"][0]["content"] = "edited"
    lines[4]["max_tokens"] = 5
    lines[6]["metadata"] = {"id": "sixty"}  # passed through, not sent: still a change to its result
    write_lines(requests, lines)
    assert run(tmp_path, server) == 0  # before the fix: nothing redone
    assert server.stats()["requests"] == 3
    err = capsys.readouterr().err
    assert "3 lines changed since the last run: redone" in err and summary_counts(err) == (10, 3)
    out = records(tmp_path / "results.jsonl")
    assert [r["line"] for r in out] == list(range(1, 11))  # one record per line again
    assert out[2]["request"]["messages"][0]["content"] == "edited"
    assert out[2]["response"]["choices"][0]["message"]["content"] == "echo:edited#0"
    assert out[6]["metadata"] == {"id": "sixty"}
    assert [r["line_hash"] for r in out] == [cli.line_digest(raw) for raw in requests.read_bytes().splitlines()]


@pytest.mark.parametrize("fmt", ["native", "cookbook"])
def test_a_shifted_input_redoes_the_shifted_lines(
    tmp_path: Path, server: FakeOpenAI, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    lines: List[Any] = [chat(i) for i in range(8)]
    requests = write_lines(tmp_path / "requests.jsonl", lines)
    assert run(tmp_path, server, "--format", fmt) == 0
    capsys.readouterr()
    server.reset_stats()
    write_lines(requests, [*lines[:5], chat(100), *lines[5:]])  # a line inserted: 6, 7, 8 move down
    assert run(tmp_path, server, "--format", fmt) == 0
    assert server.stats()["requests"] == 4  # 6, 7, 8 changed, 9 is new
    err = capsys.readouterr().err
    assert "3 lines changed since the last run: redone" in err and summary_counts(err) == (9, 4)

    def content(record: Any) -> str:
        response = record["response"] if fmt == "native" else record[1]
        return str(response["choices"][0]["message"]["content"])

    out = records(tmp_path / "results.jsonl")
    assert [content(r) for r in out] == [f"echo:chat {i}#0" for i in [0, 1, 2, 3, 4, 100, 5, 6, 7]]
    if fmt == "cookbook":
        assert (tmp_path / "results.jsonl.lines").read_text().split() == [str(n) for n in range(1, 10)]
        digests = [cli.line_digest(raw) for raw in requests.read_bytes().splitlines()]
        assert (tmp_path / "results.jsonl.hashes").read_text().split() == digests
    server.reset_stats()
    write_lines(requests, lines[:4])  # shortened: the results past its end are kept, not counted
    assert run(tmp_path, server, "--format", fmt) == 0 and server.stats()["requests"] == 0
    err = capsys.readouterr().err
    assert "5 results in" in err and "for lines the input no longer has (5, 6, 7, 8, 9): kept, not counted" in err
    assert summary_counts(err) == (4, 0) and len(records(tmp_path / "results.jsonl")) == 9


@pytest.mark.parametrize("fmt", ["native", "cookbook"])
def test_an_output_without_hashes_resumes_by_line_number(tmp_path: Path, server: FakeOpenAI, fmt: str) -> None:
    lines: List[Any] = [chat(i) for i in range(6)]
    requests = write_lines(tmp_path / "requests.jsonl", lines)
    results = tmp_path / "results.jsonl"
    assert run(tmp_path, server, "--format", fmt, "--max-workers", "1") == 0
    if fmt == "native":  # as an older version wrote it
        results.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "line_hash"}) + "\n"
                                   for r in records(results)))  # fmt: skip
    else:
        (tmp_path / "results.jsonl.hashes").unlink()
    lines[1]["messages"][0]["content"] = "edited"
    write_lines(requests, [*lines, chat(6)])
    server.reset_stats()
    assert run(tmp_path, server, "--format", fmt) == 0
    assert server.stats()["requests"] == 1  # the new line only: the old results have no hash to compare
    if fmt == "cookbook":  # the side files still pair up, so the next change is seen
        assert (tmp_path / "results.jsonl.hashes").read_text().split() == ["-"] * 6 + [cli.line_digest(
            requests.read_bytes().splitlines()[6])]  # fmt: skip
    lines[6:] = [chat(7)]
    write_lines(requests, lines)
    assert run(tmp_path, server, "--format", fmt) == 0 and server.stats()["requests"] == 2


def test_a_line_nested_too_deeply_is_a_bad_line(tmp_path: Path, server: FakeOpenAI) -> None:
    write_lines(tmp_path / "requests.jsonl", [chat(0), "[" * 100_000 + "]" * 100_000, chat(2)])
    assert run(tmp_path, server) == 1  # before the fix: RecursionError, the job died
    out = {r["line"]: r for r in records(tmp_path / "results.jsonl")}
    assert out[2]["error"]["type"] == "invalid_json" and "nested too deeply" in out[2]["error"]["message"]
    assert "response" in out[1] and "response" in out[3]
    server.reset_stats()
    assert run(tmp_path, server) == 1 and server.stats()["requests"] == 0


def test_progress_counts_requests_not_newlines(
    tmp_path: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    auto = pytest.importorskip("tqdm.auto")
    bars: List[Any] = []

    class Bar:
        def __init__(self, total: int, initial: int = 0, **_: Any) -> None:
            self.total, self.n = total, initial
            bars.append(self)

        def update(self, count: int) -> None:
            self.n += count

        def close(self) -> None:
            pass

    monkeypatch.setattr(auto, "tqdm", Bar)
    body = [json.dumps(chat(i)) for i in range(8)]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join([*body[:3], "", *body[3:6], "  ", "", *body[6:]]))  # blanks, no final newline
    args = [str(requests), "-o", str(tmp_path / "results.jsonl"), "--api-key", KEY, "--base-url", server.base_url]
    assert cli.main([*args, "--max-workers", "1"]) == 0
    assert (bars[-1].total, bars[-1].n) == (8, 8)  # before the fix: 8 of 10
    requests.write_text(requests.read_text() + "\n" + json.dumps(chat(8)) + "\n")
    assert cli.main(args) == 0
    assert (bars[-1].total, bars[-1].n) == (9, 9)


def test_ctrl_c_right_after_a_write_is_counted(
    tmp_path: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lines(tmp_path / "requests.jsonl", [completion(i) for i in range(200)])
    real_append, appended = cli.Output.append, []

    def append_then_ctrl_c(self: cli.Output, result: cli.Result) -> None:
        real_append(self, result)
        appended.append(result.line)
        if len(appended) == 30:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C lands between writing a result and counting it

    monkeypatch.setattr(cli.Output, "append", append_then_ctrl_c)
    assert run(tmp_path, server, "--max-workers", "1") == 130
    lines = (tmp_path / "results.jsonl").read_bytes().count(b"\n")
    assert summary_counts(capsys.readouterr().err) == (lines, lines)  # before the fix: one fewer than the file
    assert 30 <= lines < 200


def test_ctrl_c_in_a_subprocess_summary_matches_the_file(tmp_path: Path) -> None:
    requests = write_lines(tmp_path / "requests.jsonl", [completion(i) for i in range(2000)])
    results = tmp_path / "results.jsonl"
    with FakeOpenAI(latency=0.05) as server:
        command = [sys.executable, "-m", "throttled_openai.cli", str(requests), "-o", str(results), "--no-progress"]
        command += ["--max-workers", "2", "--rpm", "60000", "--tpm", "10000000"]
        env = {**os.environ, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": server.base_url}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(cli.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:
            if results.exists() and results.read_bytes().count(b"\n") >= 200:
                break
            time.sleep(0.005)
        assert child.poll() is None, "the job ended before it could be interrupted"
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
        assert child.returncode == 130, err
        lines = results.read_bytes().count(b"\n")
        assert summary_counts(err) == (lines, lines) and lines < 2000
        assert len({r["line"] for r in records(results)}) == lines
        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert summary_counts(rerun.stderr) == (2000, 2000 - lines)
    assert sorted(r["line"] for r in records(results)) == list(range(1, 2001))


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["demo", "--help"]])
def test_help_is_plain_text(argv: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    from throttled_openai.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: throttled-openai")
    assert "``" not in text and not re.search(r":[a-z]+:`", text) and "\\" not in text, text
    if argv[0] == "run":
        assert "--max-connection-failures" in text and "Exit codes" in text
        with pytest.raises(SystemExit):
            cli.main(["--help"])
        assert capsys.readouterr().out.replace("usage: throttled-openai run", "", 1) == text.replace(
            "usage: throttled-openai run", "", 1
        )


def test_demo_reports_waiting_per_call_and_summed_over_threads(capsys: pytest.CaptureFixture[str]) -> None:
    from throttled_openai.__main__ import demo

    assert demo(requests=60, threads=4, rpm=6000, tpm=150_000, latency=0.0) == 0
    out = capsys.readouterr().out
    found = re.search(
        r"waiting for capacity +(\d+\.\d+) s per call on average \((\d+\.\d) s summed over 4 threads\), "
        r"(\d+\.\d+) s at most",
        out,
    )
    assert found, out
    mean, total, longest = (float(value) for value in found.groups())
    assert mean == pytest.approx(total / 60, abs=0.01) and longest >= mean


def test_line_hashes_take_any_line_number() -> None:
    hashes = cli.LineHashes()
    digests = {line: cli.line_digest(b'{"n": %d}' % line) for line in [1, 2, 5000, 3, 10**12, -4, 0]}
    for line, digest in digests.items():
        hashes.set(line, digest)
    assert all(hashes.get(line) == int(digest, 16) for line, digest in digests.items())
    hashes.set(2, None)  # a later record without a hash wins
    hashes.set(10**12, "not a hash")
    assert hashes.get(2) == hashes.get(10**12) == hashes.get(4) == hashes.get(10**15) == 0
    assert hashes.get(1) == int(digests[1], 16)


def test_a_bad_answer_is_an_answer_for_the_connection_failure_count() -> None:
    """A captive portal answering 200 HTML to every line is a server that answers (each line fails as
    malformed_response), not one that is down: it does not stop the job as a dead server does."""
    from throttled_openai import MalformedResponse
    from throttled_openai.cli import _answered

    http = next(
        sys.modules[c.__module__.split(".")[0]]
        for c in openai.DefaultHttpxClient.__mro__
        if c.__module__.startswith("httpx")
    )
    page = http.Response(200, html="<html>log in</html>", request=http.Request("POST", "http://127.0.0.1/v1/x"))
    assert _answered(MalformedResponse(page, "is text/html, not JSON")) is True
    assert _answered(openai.APIConnectionError(request=page.request)) is False
