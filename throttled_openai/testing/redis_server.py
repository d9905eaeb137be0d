"""A throwaway ``redis-server`` for tests of a limiter shared through Redis."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional

__all__ = ["RedisServer"]


class RedisServer:
    """A private ``redis-server`` (or ``valkey-server``) on 127.0.0.1, for tests of a shared limiter.

    It keeps nothing on disk, listens on a free port and can be killed and started again on the same
    port to test a Redis outage::

        with RedisServer() as redis_server:
            limiter = RedisRateLimiter(redis_server.url, rpm=600)
            redis_server.kill(); ...; redis_server.start()

    ``executable``: the server binary; by default the first of ``redis-server`` and ``valkey-server``
    on ``PATH``. :meth:`available` says whether there is one.
    """

    def __init__(self, executable: Optional[str] = None, port: int = 0) -> None:
        self.executable = executable or self.find()
        if self.executable is None:
            raise RuntimeError("no redis-server or valkey-server on PATH (Debian: apt-get install redis-server)")
        self.port = port or _free_port()
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._dir = tempfile.mkdtemp(prefix="throttled-openai-redis-")

    @staticmethod
    def find() -> Optional[str]:
        """The path of ``redis-server`` or ``valkey-server``, or None."""
        return shutil.which("redis-server") or shutil.which("valkey-server")

    @classmethod
    def available(cls) -> bool:
        return cls.find() is not None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server (again, on the same port) and wait until it answers."""
        if self.running:
            raise RuntimeError("RedisServer is already running")
        args = [self.executable or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", self._dir, "--protected-mode", "no"]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.executable} exited at start with status {self._process.returncode}")
            if self._answering_pid() == self._process.pid:  # ours, not another server that had the port
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"{self.executable} did not answer on port {self.port} within {timeout}s")

    def _answering_pid(self) -> Optional[int]:
        """The process id of the server answering on our port, if one answers."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"INFO server\r\n")
                reply = b""
                while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return None
                    reply += chunk
        except OSError:
            return None
        found = re.search(rb"process_id:(\d+)", reply)
        return int(found.group(1)) if found else None

    def kill(self) -> None:
        """Stop the server at once (SIGKILL): an outage, with everything it held lost."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
