"""A Flask app whose views call OpenAI through one ThrottledClient per process.

From the repository root (``pip install -e .`` and Flask first; gunicorn for production):

    export OPENAI_API_KEY=sk-...  REDIS_URL=redis://127.0.0.1:6379/0  OPENAI_RPM=500  OPENAI_TPM=200000
    gunicorn -w 4 --threads 8 -b 127.0.0.1:8000 'examples.flask_app:create_app()'
    flask --app examples.flask_app run --port 8000        # development server
    python examples/flask_app.py 8000                     # the same (the port is optional)
    curl -X POST localhost:8000/chat -H 'Content-Type: application/json' -d '{"message": "Hi"}'

``GET /healthz`` answers without calling OpenAI.

Why it is built this way:

- One client per process, made by ``create_app`` and kept in ``app.extensions["throttled_openai"]``: all
  request threads of a worker share its limiter and its connection pool. (Gunicorn calls the factory in
  each worker; without ``--preload`` nothing is shared by ``fork``.)
- Gunicorn's workers are separate processes. With ``REDIS_URL`` their limiters keep one budget in Redis,
  so 4 workers together stay under the limit; without it each worker has the whole limit to itself.
- A short ``max_wait`` (``OPENAI_MAX_WAIT``, 2 seconds) keeps worker threads free: when the limit is
  saturated a view answers 503 with ``Retry-After`` at once, instead of holding a thread for a minute.

Settings come from ``app.config`` (``create_app({...})``), else from environment variables of the same
name: ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``, ``REDIS_URL``, ``THROTTLED_OPENAI_ON_ERROR`` (``local``:
limit in-process while Redis is down; ``raise``: answer 503), ``OPENAI_RPM``, ``OPENAI_TPM`` (per minute;
unset: learned from the response headers), ``OPENAI_MAX_WAIT`` (seconds), ``OPENAI_MODEL``,
``OPENAI_EMBEDDING_MODEL``, ``OPENAI_MAX_TOKENS`` (the completion cap the limiter books per chat call).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

import openai
from flask import Flask, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from throttled_openai import (
    LimiterUnavailable,
    RateLimiter,
    RateLimitTimeout,
    RedisRateLimiter,
    RequestTooLarge,
    ThrottledClient,
)

EXTENSION = "throttled_openai"
DEFAULTS: Dict[str, Any] = {
    "OPENAI_API_KEY": None,
    "OPENAI_BASE_URL": None,
    "REDIS_URL": None,
    "THROTTLED_OPENAI_ON_ERROR": "local",
    "OPENAI_RPM": None,
    "OPENAI_TPM": None,
    "OPENAI_MAX_WAIT": 2.0,
    "OPENAI_MODEL": "gpt-4o-mini",
    "OPENAI_EMBEDDING_MODEL": "text-embedding-3-small",
    "OPENAI_MAX_TOKENS": 256,
}
MAX_TEXTS = 2048  # the embeddings endpoint's limit on inputs per request


class BadRequest(Exception):
    """The request body is not what the view expects: answered with 400."""


def create_app(config: Optional[Mapping[str, Any]] = None) -> Flask:
    """The app, with its ThrottledClient built from ``config``, ``app.config`` and the environment."""
    app = Flask(__name__)
    app.config.from_mapping({name: os.environ.get(name) or default for name, default in DEFAULTS.items()})
    if config:
        app.config.update(config)
    app.extensions[EXTENSION] = build_client(app.config)

    app.add_url_rule("/chat", view_func=chat, methods=["POST"])
    app.add_url_rule("/embed", view_func=embed, methods=["POST"])
    app.add_url_rule("/healthz", view_func=healthz, methods=["GET"])
    app.register_error_handler(BadRequest, lambda e: error_response(400, "bad_request", str(e)))
    app.register_error_handler(RequestTooLarge, lambda e: error_response(400, "request_too_large", str(e)))
    app.register_error_handler(RateLimitTimeout, rate_limited)
    app.register_error_handler(LimiterUnavailable, limiter_unavailable)
    app.register_error_handler(openai.APIError, upstream_error)
    return app


def build_client(config: Mapping[str, Any]) -> ThrottledClient:
    """One ThrottledClient for this process, limited in Redis when ``REDIS_URL`` is set."""
    rpm, tpm = _number(config["OPENAI_RPM"]), _number(config["OPENAI_TPM"])
    limiter: RateLimiter
    if config["REDIS_URL"]:
        limiter = RedisRateLimiter(config["REDIS_URL"], rpm, tpm, on_error=config["THROTTLED_OPENAI_ON_ERROR"])
    else:
        # In-process only: each gunicorn worker gets the whole limit, so `-w 4` may send 4 times the
        # limit together (and draw 429s). Set REDIS_URL, or divide OPENAI_RPM/OPENAI_TPM by the workers.
        limiter = RateLimiter(rpm, tpm)
    return ThrottledClient(
        api_key=config["OPENAI_API_KEY"],
        base_url=config["OPENAI_BASE_URL"] or None,
        limiter=limiter,
        max_wait=_number(config["OPENAI_MAX_WAIT"]),
    )


def client() -> ThrottledClient:
    """The app's client, for use inside a request."""
    return current_app.extensions[EXTENSION]  # type: ignore[no-any-return]


# -- views ---------------------------------------------------------------------------------------


def chat() -> ResponseReturnValue:
    """POST {"message": "..."} -> {"reply": "...", "usage": {...}}."""
    message = _json_body().get("message")
    if not isinstance(message, str) or not message.strip():
        raise BadRequest('"message" must be a non-empty string')
    config = current_app.config
    completion = client().chat.completions.create(
        model=config["OPENAI_MODEL"],
        messages=[{"role": "user", "content": message}],
        max_tokens=int(config["OPENAI_MAX_TOKENS"]),  # the limiter books this cap until usage settles it
    )
    usage = completion.usage.model_dump() if completion.usage is not None else None
    return jsonify(reply=completion.choices[0].message.content, usage=usage)


def embed() -> ResponseReturnValue:
    """POST {"texts": ["...", ...]} -> {"vectors": [[...], ...], "usage": {...}}; vectors[i] embeds texts[i]."""
    texts = _json_body().get("texts")
    if not isinstance(texts, list) or not texts or len(texts) > MAX_TEXTS:
        raise BadRequest(f'"texts" must be a list of 1 to {MAX_TEXTS} non-empty strings')
    if not all(isinstance(text, str) and text for text in texts):
        raise BadRequest('every item of "texts" must be a non-empty string')
    result = client().embeddings.create(model=current_app.config["OPENAI_EMBEDDING_MODEL"], input=texts)
    vectors = [item.embedding for item in sorted(result.data, key=lambda item: item.index)]
    return jsonify(vectors=vectors, usage=result.usage.model_dump())


def healthz() -> ResponseReturnValue:
    """Liveness for a load balancer; calls nothing upstream."""
    return jsonify(ok=True, pid=os.getpid())


# -- errors --------------------------------------------------------------------------------------


def rate_limited(error: RateLimitTimeout) -> ResponseReturnValue:
    """Capacity is further away than max_wait: nothing was sent; tell the caller when to come back."""
    return error_response(503, "rate_limited", "the OpenAI rate limit is saturated", retry_after(error.retry_after))


def limiter_unavailable(error: LimiterUnavailable) -> ResponseReturnValue:
    """Redis is down and THROTTLED_OPENAI_ON_ERROR=raise: nothing was sent."""
    return error_response(503, "limiter_unavailable", "the rate limiter is unavailable", retry_after(error.retry_after))


def upstream_error(error: openai.APIError) -> ResponseReturnValue:
    """OpenAI refused the call (quota, a 400, 5xx after the retries) or could not be reached: 502. (A
    rate-limit 429 whose wait does not fit in max_wait raises RateLimitTimeout: a 503 above.)"""
    return error_response(502, "upstream_error", error.message, upstream_status=getattr(error, "status_code", None))


def retry_after(seconds: float) -> int:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1 (``0`` would invite a busy loop)."""
    return max(1, math.ceil(seconds)) if math.isfinite(seconds) else 60


def error_response(status: int, kind: str, message: str, retry: Optional[int] = None, **extra: Any) -> Tuple[Any, ...]:
    body: Dict[str, Any] = {"type": kind, "message": message, **extra}
    if retry is None:
        return jsonify(error=body), status
    body["retry_after"] = retry
    return jsonify(error=body), status, {"Retry-After": str(retry)}


def _json_body() -> Dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object with Content-Type: application/json")
    return body


def _number(value: Any) -> Optional[float]:
    """A setting as a number: ``None`` or ``""`` (an unset variable) is None; strings are parsed."""
    if value is None or value == "":
        return None
    return float(value)


if __name__ == "__main__":  # development server only; use gunicorn (see the top) in production
    create_app().run(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000, threaded=True)
