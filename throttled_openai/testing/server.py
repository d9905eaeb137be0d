"""HTTP/1.1 plumbing: the threaded server and the handler that reads requests and sends replies."""

from __future__ import annotations

import http
import http.server
import socket
import sys
import threading
import traceback
from typing import Any, Dict, Protocol, cast

from .formats import _error
from .replies import _json_reply, _Reply


class _App(Protocol):
    """What the handler needs from the server's application (FakeOpenAI)."""

    _stop_event: threading.Event

    def _process(self, method: str, target: str, headers: Dict[str, str], raw: bytes) -> _Reply: ...
    def _settle(self, reply: _Reply) -> None: ...
    def _delay(self, reply: _Reply) -> float: ...
    def _track(self, conn: socket.socket, add: bool) -> None: ...


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 refuses connections under bursts
    fake: _App

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # client went away: expected, not a bug
            return
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOpenAI/1.0"
    sys_version = ""
    disable_nagle_algorithm = True  # responses are small; do not wait for delayed ACKs

    def _fake(self) -> _App:
        return cast(_Server, self.server).fake

    def setup(self) -> None:
        super().setup()
        self._fake()._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._fake()._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logging to stderr."""

    def do_GET(self) -> None:
        fake = self._fake()
        reply = self._reply(fake)
        try:
            self._send(fake, reply)
        except OSError:  # the client went away
            self.close_connection = True
        finally:
            fake._settle(reply)

    def _reply(self, fake: _App) -> _Reply:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            return _json_reply(400, _error("Chunked request bodies are not supported.", "invalid_request_error"))
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            return _json_reply(400, _error("Invalid Content-Length.", "invalid_request_error"))
        raw = self.rfile.read(length) if length > 0 else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            return fake._process(self.command, self.path, headers, raw)
        except Exception as exc:  # a bug in the fake: answer rather than leave the client hanging
            traceback.print_exc()
            return _json_reply(500, _error(f"FakeOpenAI internal error: {exc!r}", "server_error"))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _send(self, fake: _App, reply: _Reply) -> None:
        if reply.action == "drop":
            self.close_connection = True
            return
        delay = fake._delay(reply)
        if delay > 0 and fake._stop_event.wait(delay):
            self.close_connection = True  # stopping: abandon the response
            return
        fake._settle(reply)
        lines = [f"HTTP/1.1 {reply.status} {http.HTTPStatus(reply.status).phrase}"]
        lines += [f"{name}: {value}" for name, value in reply.headers]
        lines.append(f"Content-Type: {reply.content_type}")
        if reply.chunks is None:
            lines.append(f"Content-Length: {len(reply.body)}")
            payload = reply.body
        else:
            lines.append("Transfer-Encoding: chunked")
            payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in reply.chunks) + b"0\r\n\r\n"
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if reply.action == "truncate":
            self.close_connection = True
            if reply.chunks is not None:
                payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in reply.chunks[: len(reply.chunks) // 2])
            else:
                payload = payload[: len(payload) // 2]
        self.wfile.write(head + payload)
