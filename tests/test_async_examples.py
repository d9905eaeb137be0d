"""The asyncio examples answer as documented, and uvicorn workers sharing a Redis limiter keep the limit.

``examples/fastapi_app`` runs under uvicorn: in a thread of this process for its answers (the lifespan
builds its client, as in production; there is no test client, whose needs differ by starlette version),
as ``python examples/fastapi_app/main.py`` and as ``uvicorn ... --workers 2`` with both workers sharing
one budget in a real redis-server. ``examples/async_bulk.py`` runs as a user runs it. All of it over real
HTTP against fake OpenAI servers: no network, no API key.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import pytest
from test_web_examples import _command, _free_port, _http, _server, _tail, _user_env

from throttled_openai.testing import FakeOpenAI, RedisServer
from throttled_openai.testing.endpoints import _embedding

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    """An unlimited fake server: these tests set the limits in the app's client."""
    with FakeOpenAI() as server:
        yield server


def _requests_seen(fake: FakeOpenAI) -> int:
    return fake.stats()["requests"]


# -- the app under uvicorn, in a thread of this process ---------------------------------------------


@pytest.fixture
def fastapi_app(fake: FakeOpenAI) -> Iterator[Callable[..., int]]:
    """Serve ``create_app`` (settings over the fake's) with uvicorn in a thread; returns its port."""
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from examples.fastapi_app import main as module

    servers: List[Tuple[Any, threading.Thread]] = []

    def serve(**config: Any) -> int:
        base = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": fake.base_url, "REDIS_URL": None, "OPENAI_RPM": None}
        app = module.create_app({**base, **config})
        options = {"host": "127.0.0.1", "port": 0, "lifespan": "on", "log_config": None, "log_level": "warning"}
        server = uvicorn.Server(uvicorn.Config(app, **options))
        thread = threading.Thread(target=server.run, daemon=True)  # no signal handlers outside the main thread
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 15
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start (see the log above)"
            time.sleep(0.01)  # poll interval while it starts
        port: int = server.servers[0].sockets[0].getsockname()[1]
        return port

    yield serve
    for server, thread in servers:
        server.should_exit = True  # runs the lifespan's shutdown: the client is closed
        thread.join(10)
        assert not thread.is_alive(), "uvicorn did not stop within 10 s"


def test_chat_embed_healthz_and_stats(fastapi_app: Callable[..., int], fake: FakeOpenAI) -> None:
    port = fastapi_app()
    status, _, chat = _http(port, "POST", "/chat", {"message": "Hello there"})
    assert status == 200, chat
    assert chat["reply"] == "echo:Hello there#0" and chat["usage"]["total_tokens"] > 0
    forward = _http(port, "POST", "/embed", {"texts": ["one", "two", "three"]})[2]["vectors"]
    backward = _http(port, "POST", "/embed", {"texts": ["three", "two", "one"]})[2]["vectors"]
    assert len(forward) == 3 and forward == backward[::-1]  # vectors[i] embeds texts[i], whatever the order
    before = _requests_seen(fake)
    assert _http(port, "GET", "/healthz")[2] == {"ok": True, "pid": os.getpid()}
    status, _, stats = _http(port, "GET", "/stats")
    assert status == 200 and stats["pid"] == os.getpid()
    assert (stats["calls"], stats["requests"], stats["failures"]) == (3, 3, 0)  # one client served all three
    assert _requests_seen(fake) == before  # neither endpoint calls upstream


@pytest.mark.parametrize(
    ("path", "data"),
    [
        ("/chat", "not json"),
        ("/chat", json.dumps({"message": ""})),
        ("/chat", json.dumps({"message": "   "})),
        ("/chat", json.dumps({"message": ["not", "text"]})),
        ("/chat", json.dumps(["a list"])),
        ("/embed", json.dumps({"texts": []})),
        ("/embed", json.dumps({"texts": "one string"})),
        ("/embed", json.dumps({"texts": ["ok", ""]})),
        ("/embed", json.dumps({"texts": [1, 2]})),
    ],
)
def test_rejects_bad_input(fastapi_app: Callable[..., int], fake: FakeOpenAI, path: str, data: str) -> None:
    port = fastapi_app()
    before = _requests_seen(fake)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        status, body = response.status, json.loads(response.read())
    finally:
        conn.close()
    assert status == 400, body
    assert body["error"]["type"] == "bad_request" and body["error"]["message"], body
    assert _requests_seen(fake) == before  # refused before anything was sent


def test_request_above_the_whole_limit_is_a_400_as_in_the_other_examples(
    fastapi_app: Callable[..., int], fake: FakeOpenAI
) -> None:
    port = fastapi_app(OPENAI_TPM=100)  # a chat books 256+ tokens: it can never fit
    before = _requests_seen(fake)
    status, headers, body = _http(port, "POST", "/chat", {"message": "hi"})
    assert status == 400 and body["error"]["type"] == "request_too_large", body
    assert "retry-after" not in headers  # waiting will not help
    assert _requests_seen(fake) == before


def test_saturated_limit_answers_503_with_retry_after(fastapi_app: Callable[..., int], fake: FakeOpenAI) -> None:
    # 1 request per minute and no waiting: the first call takes the only request, the second must
    # wait about 60 s and so is refused at once, without being sent.
    port = fastapi_app(OPENAI_RPM=1, OPENAI_MAX_WAIT=0)
    before = _requests_seen(fake)
    assert _http(port, "POST", "/chat", {"message": "first"})[0] == 200
    status, headers, body = _http(port, "POST", "/chat", {"message": "second"})
    assert status == 503, body
    retry_after = int(headers["retry-after"])
    assert 60 <= retry_after <= 63  # a 1-per-minute budget (less 2 % headroom) refills one request in 61.2 s
    assert headers["content-type"] == "application/json"  # not uvicorn's own text/plain 503
    assert body["error"] == {
        "type": "rate_limited",
        "message": "the OpenAI rate limit is saturated",
        "retry_after": retry_after,
    }
    assert _requests_seen(fake) == before + 1


@pytest.mark.parametrize(
    ("fault", "status", "upstream_status"), [("429", 503, None), ("quota", 502, 429), ("400", 502, 400)]
)
def test_upstream_errors(
    fastapi_app: Callable[..., int], fake: FakeOpenAI, fault: str, status: int, upstream_status: Optional[int]
) -> None:
    # max_wait=0 leaves no time to retry the rate-limit 429 (which asks for 0.2 s): it is answered as a
    # saturated limit. A quota 429 or a 400 will not get better by retrying: 502, with OpenAI's status.
    port = fastapi_app(OPENAI_MAX_WAIT=0)
    fake.inject(fault, path="/chat/completions")
    got, headers, body = _http(port, "POST", "/chat", {"message": "hi"})
    assert got == status, body
    error = body["error"]
    if status == 503:
        assert error["type"] == "rate_limited" and int(headers["retry-after"]) == 1  # 0.2 s, rounded up
    else:
        assert error["type"] == "upstream_error" and error["upstream_status"] == upstream_status
        assert "retry-after" not in headers


def test_redis_down_answers_503(fastapi_app: Callable[..., int], fake: FakeOpenAI) -> None:
    pytest.importorskip("redis")
    dead = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there
    port = fastapi_app(REDIS_URL=dead, THROTTLED_OPENAI_ON_ERROR="raise", OPENAI_RPM=600)
    before = _requests_seen(fake)
    status, headers, body = _http(port, "POST", "/chat", {"message": "hi"})
    assert status == 503 and body["error"]["type"] == "limiter_unavailable", body
    assert int(headers["retry-after"]) >= 1
    assert _requests_seen(fake) == before


# -- the documented commands, run as a user runs them ------------------------------------------------


def test_python_main_serves_a_chat(fake: FakeOpenAI) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    command = lambda port: [sys.executable, "examples/fastapi_app/main.py", str(port)]  # noqa: E731
    before = _requests_seen(fake)
    with _server(command, _user_env(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=fake.base_url)) as (port, log):
        status, _, body = _http(port, "POST", "/chat", {"message": "Hello"})
        context = _tail(log)
    assert status == 200 and body["reply"] == "echo:Hello#0", f"{body}\n{context}"
    assert _requests_seen(fake) == before + 1


@contextlib.contextmanager
def _uvicorn(workers: int, env: Dict[str, str], log: IO[bytes]) -> Iterator[Tuple[int, subprocess.Popen[bytes]]]:
    """``uvicorn examples.fastapi_app.main:app --workers N --port 0`` in its own process group, until
    every worker has started; then SIGTERM (each worker runs its lifespan's shutdown), and SIGKILL to
    the whole group for whatever is left: killing the parent alone leaves its workers serving."""
    argv = [_command("uvicorn"), "examples.fastapi_app.main:app", "--workers", str(workers)]
    argv += ["--host", "127.0.0.1", "--port", "0"]  # the parent binds; its log says which port
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            text = _read(log)
            running = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", text)
            if running and text.count("Application startup complete.") >= workers:
                break
            # A worker whose lifespan fails is restarted forever by some uvicorn versions (0.39): the
            # log tells, not the exit code.
            if process.poll() is not None or "startup failed" in text or time.monotonic() > deadline:
                pytest.fail(f"{argv} did not start {workers} workers (status {process.poll()}):\n{text[-4000:]}")
            time.sleep(0.1)  # poll interval while it boots
        yield int(running.group(1)), process
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def _read(log: IO[bytes]) -> str:
    """All of the log so far."""
    log.seek(0)
    return log.read().decode(errors="replace")


def _worker_stats(port: int, workers: int) -> Dict[int, Dict[str, Any]]:
    """``GET /stats`` of every worker: new connections until each pid answered (the kernel chooses the
    worker that accepts a connection, so a few are asked at once, in rounds)."""
    seen: Dict[int, Dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(50):
            for status, _, body in pool.map(lambda _: _http(port, "GET", "/stats"), range(4)):
                assert status == 200, body
                seen[body["pid"]] = body
            if len(seen) >= workers:
                break
    return seen


RPM = 600  # 10 requests per second
OFFERED_PER_SECOND = 3 * RPM / 60  # three times what the limit lets through: more than 2 workers each allowed
LOAD_SECONDS = 3.0
WORKERS = 2


def test_uvicorn_workers_share_the_limit_through_redis() -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("redis")
    if not RedisServer.available():
        if os.environ.get("THROTTLED_OPENAI_REQUIRE_REDIS"):
            pytest.fail("THROTTLED_OPENAI_REQUIRE_REDIS is set but there is no redis-server on PATH")
        pytest.skip("no redis-server or valkey-server on PATH")
    with contextlib.ExitStack() as stack:
        # Half a second of latency: a worker learns what the other spent (the headers' `remaining`)
        # only that late, so two limiters of their own would overrun the limit; a shared one does not.
        server = stack.enter_context(FakeOpenAI(rpm=RPM, bucket_seconds=1.0, latency=0.5))
        redis_server = stack.enter_context(RedisServer())
        env = _user_env(
            OPENAI_API_KEY="sk-test",
            OPENAI_BASE_URL=server.base_url,
            REDIS_URL=redis_server.url,
            THROTTLED_OPENAI_ON_ERROR="raise",  # a Redis failure must show, not hide behind local limits
            OPENAI_RPM=str(RPM),
            OPENAI_MAX_WAIT="0.5",  # a request waits at most this long for its turn, then gets a 503
        )
        log = stack.enter_context(tempfile.TemporaryFile())
        with _uvicorn(WORKERS, env, log) as (port, process):
            total = int(OFFERED_PER_SECOND * LOAD_SECONDS)
            start = time.monotonic()

            def one(i: int) -> Any:
                # Open loop: request i leaves at its time, whatever the others got back; each on a new
                # connection, so the kernel spreads them over the workers.
                time.sleep(max(0.0, start + i / OFFERED_PER_SECOND - time.monotonic()))
                try:
                    return _http(port, "POST", "/chat", {"message": f"question {i}"})
                except Exception as error:  # a timeout (15 s) shows a request that hung
                    return error

            with ThreadPoolExecutor(max_workers=48) as pool:  # ~1 s per request: 30 or so at a time
                results = list(pool.map(one, range(total)))
            elapsed = time.monotonic() - start
            workers = _worker_stats(port, WORKERS)
            fake_stats = server.stats()
            most, _ = server.max_admitted_in_window(1.0)
            context = f"server {fake_stats}\nworkers {workers}\nuvicorn:\n{_tail(log)}"
        log_text = _read(log)  # with the workers' shutdown

    failures = [result for result in results if isinstance(result, BaseException)]
    assert not failures, f"{failures[:3]}\n{context}"
    ok = [body for status, _, body in results if status == 200]
    refused = [(headers, body) for status, headers, body in results if status == 503]
    assert len(ok) + len(refused) == total, f"statuses {sorted({r[0] for r in results})}\n{context}"
    for headers, body in refused:  # the app's 503, never uvicorn's own (text/plain, no Retry-After)
        assert headers["content-type"] == "application/json", (headers, body)
        assert body["error"]["type"] == "rate_limited", (headers, body)
        assert 1 <= int(headers["retry-after"]) == body["error"]["retry_after"] <= 60, (headers, body)
    for i, (status, _, body) in enumerate(results):
        assert status != 200 or body["reply"] == f"echo:question {i}#0", body  # its own answer
    assert len(ok) >= 10 and refused, context  # the burst alone is about 10; three times the limit was offered

    # Both workers served, through their own clients, and together they are everything upstream saw.
    assert len(workers) == WORKERS and process.pid not in workers, context
    assert all(stats["calls"] > 0 and stats["requests"] > 0 for stats in workers.values()), context
    assert sum(stats["requests"] for stats in workers.values()) == fake_stats["requests"], context
    assert fake_stats["admitted"] == len(ok), context

    # Two limiters of their own would each send the whole limit, and draw 429s. The shared budget keeps
    # upstream within it: no more than the burst plus the refill over the run, at most the burst plus
    # one second's refill in any second (plus one for timing jitter), and (almost) no 429s.
    assert fake_stats["admitted"] <= RPM / 60 * (1 + elapsed) + 1, context
    assert most <= 2 * RPM / 60 + 1, context
    assert fake_stats["rate_limited"] <= max(1, 0.01 * fake_stats["requests"]), context
    # Each worker ran its lifespan's shutdown, closing its client.
    assert log_text.count("Application shutdown complete.") == WORKERS, log_text
    assert "Traceback" not in log_text, log_text


# -- the async bulk example ----------------------------------------------------------------------------


@pytest.mark.parametrize("upstream", ["built-in fake", "OPENAI_BASE_URL"])
def test_async_bulk_example(tmp_path: Path, upstream: str) -> None:
    """Without OPENAI_API_KEY the example starts its own fake (with a few 500s); with it, it uses the
    server at OPENAI_BASE_URL (here a fake with a few 500s too). Either way every ticket gets its own label
    and vector, in input order."""
    target = tmp_path / "tickets.jsonl"
    with contextlib.ExitStack() as stack:
        env = _user_env()
        if upstream == "OPENAI_BASE_URL":
            server = stack.enter_context(FakeOpenAI(rpm=6_000, tpm=1_000_000, bucket_seconds=1.0, latency=0.02))
            server.inject("500", count=3, path="/chat/completions")  # retried, not lost
            server.inject("500", count=1, path="/embeddings")
            env.update(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=server.base_url, OPENAI_RPM="6000")
            env.update(OPENAI_TPM="1000000")
        out = subprocess.run(
            [sys.executable, "examples/async_bulk.py", str(target)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if upstream == "OPENAI_BASE_URL":
            assert server.stats()["faults"] == 4, server.stats()  # each injected 500 was met, and retried
    assert out.returncode == 0, out.stderr
    assert f"100 labels, 0 failed; wrote 100 embeddings to {target}" in out.stdout, out.stdout
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [line["i"] for line in lines] == list(range(100))  # in input order, each once
    tickets: Set[str] = set()
    for line in lines:
        ticket = line["ticket"]
        assert line["label"] == f"echo:{ticket[:40]}#0", line  # its own answer, not a neighbour's
        assert line["embedding"] == _embedding(ticket, 8), line
        tickets.add(ticket)
    assert len(tickets) == 100
