"""The faults FakeOpenAI can inject: their names, and what those after admission do to a reply."""

from __future__ import annotations

from typing import List, Optional, Tuple

from .formats import _error
from .replies import _HTML_CONTENT_TYPE, _SSE_CONTENT_TYPE, _json_reply, _Reply, _sse

__all__ = ["FAULTS"]

#: Fault names accepted by :meth:`FakeOpenAI.inject` and ``fault_rates``.
#:
#: Instead of admission (the request is refused and consumes no budget, no quota):
#:
#: - ``"500"``, ``"503"``: OpenAI's JSON 500 / 503 (``server_is_overloaded``).
#: - ``"502_html"``, ``"504_html"``: a proxy's (Cloudflare, nginx) 502 Bad Gateway / 504 Gateway
#:   Time-out: an HTML page, ``Content-Type: text/html``, none of OpenAI's headers (no
#:   ``x-request-id``, no ``x-ratelimit-*``).
#: - ``"429"``: a rate-limit 429 with headers and a 200 ms retry hint; ``"429_message_only"``: the
#:   same 429 with only the message ("Please try again in 200ms.").
#: - ``"quota"``: 429 ``insufficient_quota``; ``"too_large"``: 429 "Request too large".
#: - ``"400"``: a 400 ``invalid_request_error``.
#: - ``"drop"``: the connection is closed without any response.
#:
#: After admission (the request is charged to its buckets and quota like a success, and settled
#: the same way with ``settle_usage``: the client cannot tell whether a garbled answer came after
#: OpenAI did the work, so the fake takes the strict side):
#:
#: - ``"slow"``: the response comes ``slow_seconds`` late.
#: - ``"truncate"``: the connection closes halfway through the body (a JSON body's
#:   ``Content-Length`` is that of the whole body; a stream stops without its terminating chunk):
#:   the client sees a broken connection.
#: - ``"stream_cut"``: the body ends cleanly, but early. A stream sends the first half of its
#:   events (rounded down) and then its terminating chunk, on a connection that stays open: a
#:   chat stream ends without its usage chunk and ``data: [DONE]`` (and without its
#:   ``finish_reason`` chunk unless ``include_usage`` with ``n=1``), a Responses stream before
#:   or among its text deltas, never reaching ``response.completed``.  A JSON body is cut in
#:   half, with a ``Content-Length`` that matches the cut: a 200 whose body is not valid JSON.
#: - ``"empty_200"``: a 200 with ``Content-Type: application/json`` and an empty body.
#: - ``"html_200"``: a 200 with a captive proxy's HTML page, ``Content-Type: text/html``, none of
#:   OpenAI's headers.
#: - ``"error_200"``: a 200 whose JSON body is an OpenAI error object (``"type": "server_error"``);
#:   for a stream, a ``text/event-stream`` with that object as its only event (``data: {"error":
#:   ...}``, as OpenAI reports errors in the middle of a stream).
#: - ``"missing_choice"``, ``"duplicate_choice"``: the last choice (or embedding) is left out /
#:   the first one is sent twice.
FAULTS = frozenset(
    {
        "500",
        "503",
        "502_html",
        "504_html",
        "429",
        "429_message_only",
        "quota",
        "too_large",
        "400",
        "drop",
        "slow",
        "truncate",
        "stream_cut",
        "empty_200",
        "html_200",
        "error_200",
        "missing_choice",
        "duplicate_choice",
    }
)
# Faults that happen instead of admission (they consume no budget).
_REJECTING_FAULTS = frozenset(
    {"500", "503", "502_html", "504_html", "429", "429_message_only", "quota", "too_large", "400", "drop"}
)
_FAULT_RETRY_S = 0.2  # wait advertised by injected 429s, seconds: short so retry tests stay fast


def _proxy_page(status: int, title: str, server: str) -> _Reply:
    """An HTML error page as nginx and Cloudflare send it, without any of OpenAI's headers."""
    page = (
        f"<html>\r\n<head><title>{status} {title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {title}</h1></center>\r\n<hr><center>{server}</center>\r\n</body>\r\n</html>\r\n"
    )
    return _Reply(status, page.encode(), content_type=_HTML_CONTENT_TYPE)


#: OpenAI's 500 message ("... Sorry about that!"), as its error bodies and batch error lines carry it.
_SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"


def _plain_fault_reply(fault: str, headers: List[Tuple[str, str]]) -> Optional[_Reply]:
    """The reply of a fault that needs nothing but its name, on any route: a dropped connection, a
    gateway's page, OpenAI's 500, 503 or 400; ``None`` for the other faults."""
    if fault == "drop":
        return _Reply(0, action="drop")
    if fault == "502_html":
        return _proxy_page(502, "Bad Gateway", "cloudflare")
    if fault == "504_html":
        return _proxy_page(504, "Gateway Time-out", "nginx")
    if fault == "500":
        msg = (_SERVER_ERROR + " You can retry your request, or contact us through our help center at "
               "help.openai.com if the error persists.")  # fmt: skip
        return _json_reply(500, _error(msg, "server_error"), headers)
    if fault == "503":
        msg = "The engine is currently overloaded, please try again later"
        return _json_reply(503, _error(msg, "server_error", code="server_is_overloaded"), headers)
    if fault == "400":
        return _json_reply(400, _error("Invalid request (injected fault).", "invalid_request_error"), headers)
    return None


_CAPTIVE_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Network Login</title></head>\n<body><h1>Sign in to the network</h1>\n"
    b"<p>You must log in to this network before you can access the Internet.</p>\n"
    b'<form method="post" action="/login"><input name="user"><input name="password" type="password">'
    b'<button type="submit">Log in</button></form>\n</body></html>\n'
)


def _after_admission(fault: str, reply: _Reply) -> _Reply:
    """Apply a fault that happens after admission to the successful ``reply`` (see :data:`FAULTS`)."""
    if fault == "empty_200":
        return _Reply(200, b"", reply.headers)
    if fault == "html_200":
        return _Reply(200, _CAPTIVE_PAGE, content_type=_HTML_CONTENT_TYPE)
    if fault == "error_200":
        payload = _error(_SERVER_ERROR, "server_error")
        if reply.chunks is None:
            return _json_reply(200, payload, reply.headers)
        return _Reply(200, headers=reply.headers, chunks=[_sse(payload)], content_type=_SSE_CONTENT_TYPE)
    if fault == "stream_cut":
        if reply.chunks is None:
            reply.body = reply.body[: len(reply.body) // 2]
        else:
            reply.chunks = reply.chunks[: len(reply.chunks) // 2]
    elif fault in ("slow", "truncate"):
        reply.action = fault
    return reply
