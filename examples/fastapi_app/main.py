"""A FastAPI service whose endpoints await OpenAI through one AsyncThrottledClient per worker process.

From the repository root (``pip install -e . fastapi uvicorn`` first):

    export OPENAI_API_KEY=sk-...  REDIS_URL=redis://127.0.0.1:6379/0  OPENAI_RPM=500  OPENAI_TPM=200000
    uvicorn examples.fastapi_app.main:app --workers 4 --port 8000
    python examples/fastapi_app/main.py 8000              # one process, for development (the port is optional)
    curl -X POST localhost:8000/chat -H 'Content-Type: application/json' -d '{"message": "Hi"}'

``GET /healthz`` answers without calling OpenAI; ``GET /stats`` shows the client's counters of the
worker that answers (each worker has its own; ``pid`` says which).

Why it is built this way:

- One client per worker, created in the app's lifespan and closed there: every request a worker serves
  shares its limiter and its connection pool, and an async client belongs to the event loop it was
  created on (the lifespan runs on the loop that serves the requests; a module-level client would not).
- ``uvicorn --workers N`` starts N processes, each running its own lifespan. With ``REDIS_URL`` their
  limiters keep one budget in Redis, so the workers together stay under the limit; without it each
  worker has the whole limit to itself.
- A short ``max_wait`` (``OPENAI_MAX_WAIT``, 2 seconds): when the limit is saturated an endpoint answers
  503 with ``Retry-After`` at once, instead of holding the request (and the caller) for a minute. Such a
  503 is always JSON, ``{"error": {"type": "rate_limited", "retry_after": N, ...}}``, with a
  ``Retry-After`` header; uvicorn's own 503 (``--limit-concurrency``: too many connections) is
  ``text/plain`` without one, so a caller can tell "come back in N seconds" from "this server is full".

Settings come from ``create_app({...})``, else from environment variables of the same name, read when
a worker starts: ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``, ``REDIS_URL``, ``THROTTLED_OPENAI_ON_ERROR``
(``local``: limit in-process while Redis is down; ``raise``: answer 503), ``OPENAI_RPM``, ``OPENAI_TPM``
(per minute; unset: learned from the response headers), ``OPENAI_MAX_WAIT`` (seconds), ``OPENAI_MODEL``,
``OPENAI_EMBEDDING_MODEL``, ``OPENAI_MAX_TOKENS`` (the completion cap the limiter books per chat call).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from typing import Annotated, Any, AsyncIterator, Dict, List, Mapping, Optional

import openai
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from throttled_openai import (
    AsyncThrottledClient,
    LimiterUnavailable,
    RateLimiter,
    RateLimitTimeout,
    RedisRateLimiter,
    RequestTooLarge,
)

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
    """The request body is not what the endpoint expects: answered with 400."""


class ChatIn(BaseModel):
    message: str


class EmbedIn(BaseModel):
    texts: List[str]


def create_app(config: Optional[Mapping[str, Any]] = None) -> FastAPI:
    """The app. Its client is built in the lifespan, from ``config`` over the environment."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Runs in each worker, on the event loop that serves its requests: the client is made for it.
        settings = {name: os.environ.get(name) or default for name, default in DEFAULTS.items()}
        settings.update(config or {})
        async with build_client(settings) as openai_client:  # closed (its connections) at shutdown
            app.state.settings = settings
            app.state.openai = openai_client
            # The SDK imports its resources on first use (about half a second of CPU for chat): do it
            # now, or the first requests a fresh worker serves all wait for it.
            _ = openai_client.chat.completions, openai_client.embeddings
            try:
                yield
            finally:
                if isinstance(openai_client.limiter, RedisRateLimiter):
                    await openai_client.limiter.aclose()  # its Redis connections made on this loop

    app = FastAPI(lifespan=lifespan)
    app.post("/chat")(chat)
    app.post("/embed")(embed)
    app.get("/healthz")(healthz)
    app.get("/stats")(stats)
    answered = (
        BadRequest,
        RequestValidationError,
        RequestTooLarge,
        RateLimitTimeout,
        LimiterUnavailable,
        openai.APIError,
    )
    for error in answered:
        app.add_exception_handler(error, error_answer)
    return app


def build_client(settings: Mapping[str, Any]) -> AsyncThrottledClient:
    """One AsyncThrottledClient for this worker, limited in Redis when ``REDIS_URL`` is set."""
    rpm, tpm = _number(settings["OPENAI_RPM"]), _number(settings["OPENAI_TPM"])
    limiter: RateLimiter
    if settings["REDIS_URL"]:
        limiter = RedisRateLimiter(settings["REDIS_URL"], rpm, tpm, on_error=settings["THROTTLED_OPENAI_ON_ERROR"])
    else:
        # In-process only: each uvicorn worker gets the whole limit, so `--workers 4` may send 4 times
        # the limit together (and draw 429s). Set REDIS_URL, or divide OPENAI_RPM/OPENAI_TPM by the workers.
        limiter = RateLimiter(rpm, tpm)
    return AsyncThrottledClient(
        api_key=settings["OPENAI_API_KEY"],
        base_url=settings["OPENAI_BASE_URL"] or None,
        limiter=limiter,
        max_wait=_number(settings["OPENAI_MAX_WAIT"]),
    )


def client(request: Request) -> AsyncThrottledClient:
    """The worker's client (a dependency of the endpoints)."""
    return request.app.state.openai  # type: ignore[no-any-return]


Client = Annotated[AsyncThrottledClient, Depends(client)]


# -- endpoints -----------------------------------------------------------------------------------


async def chat(body: ChatIn, request: Request, openai_client: Client) -> Any:
    """POST {"message": "..."} -> {"reply": "...", "usage": {...}}."""
    if not body.message.strip():
        raise BadRequest('"message" must be a non-empty string')
    settings = request.app.state.settings
    completion = await openai_client.chat.completions.create(
        model=settings["OPENAI_MODEL"],
        messages=[{"role": "user", "content": body.message}],
        max_tokens=int(settings["OPENAI_MAX_TOKENS"]),  # the limiter books this cap until usage settles it
    )
    usage = completion.usage.model_dump() if completion.usage is not None else None
    return {"reply": completion.choices[0].message.content, "usage": usage}


async def embed(body: EmbedIn, request: Request, openai_client: Client) -> Any:
    """POST {"texts": ["...", ...]} -> {"vectors": [[...], ...], "usage": {...}}; vectors[i] embeds texts[i]."""
    if not body.texts or len(body.texts) > MAX_TEXTS or not all(body.texts):
        raise BadRequest(f'"texts" must be a list of 1 to {MAX_TEXTS} non-empty strings')
    result = await openai_client.embeddings.create(
        model=request.app.state.settings["OPENAI_EMBEDDING_MODEL"], input=body.texts
    )
    vectors = [item.embedding for item in sorted(result.data, key=lambda item: item.index)]
    return {"vectors": vectors, "usage": result.usage.model_dump()}


async def healthz() -> Any:
    """Liveness for a load balancer; calls nothing upstream."""
    return {"ok": True, "pid": os.getpid()}


async def stats(openai_client: Client) -> Any:
    """This worker's ``client.stats()``: calls, HTTP requests, 429s by kind, time spent waiting, and what
    its limiter knows of each model's limits. Each worker has its own: ``pid`` says whose they are."""
    return {"pid": os.getpid(), **dataclasses.asdict(openai_client.stats())}


# -- errors --------------------------------------------------------------------------------------


async def error_answer(request: Request, error: Exception) -> JSONResponse:
    """The errors an endpoint raises, as JSON: 503 with ``Retry-After`` when there is no capacity within
    ``max_wait`` or Redis is down (nothing was sent), 400 for a bad body or a request larger than
    the whole limit, 502 when OpenAI refused otherwise or could not be reached."""
    if isinstance(error, RateLimitTimeout):  # capacity is further away than max_wait: come back later
        return error_response(503, "rate_limited", "the OpenAI rate limit is saturated", retry_after(error.retry_after))
    if isinstance(error, LimiterUnavailable):  # Redis is down and THROTTLED_OPENAI_ON_ERROR=raise
        return error_response(
            503, "limiter_unavailable", "the rate limiter is unavailable", retry_after(error.retry_after)
        )
    if isinstance(error, RequestValidationError):  # FastAPI's own check of the body: a 422 by default
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:]) or "body"
        return error_response(400, "bad_request", f"{where}: {first['msg']}")
    if isinstance(error, BadRequest):
        return error_response(400, "bad_request", str(error))
    if isinstance(error, RequestTooLarge):  # more tokens than the whole limit: no wait will make it fit
        return error_response(400, "request_too_large", str(error))
    if isinstance(error, openai.APIError):  # quota, a 400, 5xx after the retries, no connection
        # (A rate-limit 429 whose retry does not fit in max_wait raises RateLimitTimeout: a 503 above.)
        return error_response(502, "upstream_error", error.message, upstream_status=getattr(error, "status_code", None))
    raise error  # registered for the types above only


def retry_after(seconds: float) -> int:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1 (``0`` would invite a busy loop)."""
    return max(1, math.ceil(seconds)) if math.isfinite(seconds) else 60


def error_response(status: int, kind: str, message: str, retry: Optional[int] = None, **extra: Any) -> JSONResponse:
    body: Dict[str, Any] = {"type": kind, "message": message, **extra}
    if retry is None:
        return JSONResponse({"error": body}, status_code=status)
    body["retry_after"] = retry
    return JSONResponse({"error": body}, status_code=status, headers={"Retry-After": str(retry)})


def _number(value: Any) -> Optional[float]:
    """A setting as a number: ``None`` or ``""`` (an unset variable) is None; strings are parsed."""
    if value is None or value == "":
        return None
    return float(value)


app = create_app()  # what `uvicorn examples.fastapi_app.main:app` imports, in each worker

if __name__ == "__main__":  # one process, for development; use `uvicorn --workers N` (see the top) in production
    import uvicorn

    uvicorn.run(app, port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
