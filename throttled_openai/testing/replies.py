"""What the server sends for a request: a status, headers and a JSON body, or server-sent events."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple


@dataclass
class _Reply:
    """One HTTP response: ``body`` with a Content-Length, or ``chunks`` sent chunked."""

    status: int
    body: bytes = b""
    headers: List[Tuple[str, str]] = field(default_factory=list)
    chunks: Optional[List[bytes]] = None  # SSE events, sent with chunked transfer encoding
    action: str = ""  # "", "drop", "slow" or "truncate"
    settle: Optional[Tuple[Tuple[str, str], int]] = None  # (pair key, token refund) applied before sending
    content_type: str = "application/json"


_SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
_HTML_CONTENT_TYPE = "text/html; charset=utf-8"


def _json_reply(status: int, payload: Any, headers: Optional[List[Tuple[str, str]]] = None) -> _Reply:
    return _Reply(status, json.dumps(payload, separators=(",", ":")).encode(), headers or [])


def _sse_reply(chunks: List[bytes]) -> _Reply:
    return _Reply(200, headers=[("Cache-Control", "no-cache")], chunks=chunks, content_type=_SSE_CONTENT_TYPE)


def _sse(data: Any, event: Optional[str] = None) -> bytes:
    """One server-sent event: ``event: <event>`` (if given) and ``data: <compact JSON>``."""
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    return head + b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
