"""Run the fake OpenAI server in a child process, so the client's CPU and GIL are measured alone."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.connection import Connection
from typing import Any, Dict, Tuple


def _serve(conn: Connection, kwargs: Dict[str, Any]) -> None:
    from throttled_openai.testing import FakeOpenAI

    with FakeOpenAI(**kwargs) as server:
        conn.send(server.base_url)
        while True:
            command, argument = conn.recv()
            if command == "stop":
                return
            if command == "stats":
                conn.send(server.stats())
            elif command == "window":
                conn.send(server.max_admitted_in_window(argument))
            elif command == "reset":
                server.reset_stats()
                conn.send(None)
            elif command == "set":  # a settable attribute, such as batch_speed
                setattr(server, *argument)
                conn.send(None)


class ServerProcess:
    """``with ServerProcess(rpm=..., ...) as server: server.base_url, server.stats()``."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs

    def __enter__(self) -> ServerProcess:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, self._kwargs), daemon=True)
        self._process.start()
        self.base_url: str = self._conn.recv()
        return self

    def _ask(self, command: str, argument: Any = None) -> Any:
        self._conn.send((command, argument))
        return self._conn.recv()

    def stats(self) -> Dict[str, int]:
        return self._ask("stats")  # type: ignore[no-any-return]

    def max_admitted_in_window(self, seconds: float) -> Tuple[int, int]:
        return self._ask("window", seconds)  # type: ignore[no-any-return]

    def set(self, name: str, value: Any) -> None:
        """Set one of the server's settable attributes while it runs: ``server.set("batch_speed", 0)``."""
        self._ask("set", (name, value))

    def __exit__(self, *exc: object) -> None:
        self._conn.send(("stop", None))
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
