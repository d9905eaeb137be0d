"""The process's ThrottledClient, and the middleware that turns "no capacity" into a 503.

The client is built lazily, once per process, under a lock: gunicorn workers each build their own on
their first request (nothing is shared by ``fork``), and management commands never connect to Redis.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Dict, Mapping, Optional

import openai
from django.conf import settings
from django.core.exceptions import BadRequest
from django.core.signals import setting_changed
from django.http import HttpRequest, HttpResponse, JsonResponse

from throttled_openai import (
    LimiterUnavailable,
    RateLimiter,
    RateLimitTimeout,
    RedisRateLimiter,
    RequestTooLarge,
    ThrottledClient,
)

_lock = threading.Lock()
_client: Optional[ThrottledClient] = None


def get_client() -> ThrottledClient:
    """This process's client, built from ``settings.THROTTLED_OPENAI`` on first use."""
    global _client
    client = _client
    if client is None:
        with _lock:
            if _client is None:
                _client = build_client(settings.THROTTLED_OPENAI)
            client = _client
    return client


def _drop_client(*, setting: str, **kwargs: Any) -> None:
    """Rebuild the client when ``THROTTLED_OPENAI`` changes (``override_settings`` in tests)."""
    global _client
    if setting == "THROTTLED_OPENAI":
        with _lock:
            _client = None


setting_changed.connect(_drop_client)


def build_client(config: Mapping[str, Any]) -> ThrottledClient:
    """A ThrottledClient limited in Redis when ``REDIS_URL`` is set."""
    limiter: RateLimiter
    if config.get("REDIS_URL"):
        limiter = RedisRateLimiter(
            config["REDIS_URL"], config.get("RPM"), config.get("TPM"), on_error=config.get("ON_ERROR", "local")
        )
    else:
        # In-process only: each gunicorn worker gets the whole limit, so `-w 4` may send 4 times the
        # limit together (and draw 429s). Set REDIS_URL, or divide RPM/TPM by the number of workers.
        limiter = RateLimiter(config.get("RPM"), config.get("TPM"))
    return ThrottledClient(
        api_key=config.get("API_KEY"), base_url=config.get("BASE_URL"), limiter=limiter, max_wait=config.get("MAX_WAIT")
    )


class ThrottledOpenAIMiddleware:
    """Answers the limiter's and OpenAI's errors raised by a view as JSON: 503 with ``Retry-After`` when
    there is no capacity within ``MAX_WAIT`` or Redis is down (nothing was sent) or OpenAI's own rate
    limit refused the call, 400 for bad input, 502 when OpenAI refused otherwise or could not be reached."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> Optional[HttpResponse]:
        if isinstance(exception, RateLimitTimeout):
            return error_response(
                503, "rate_limited", "the OpenAI rate limit is saturated", retry_after(exception.retry_after)
            )
        if isinstance(exception, LimiterUnavailable):
            return error_response(
                503, "limiter_unavailable", "the rate limiter is unavailable", retry_after(exception.retry_after)
            )
        if isinstance(exception, BadRequest):
            return error_response(400, "bad_request", str(exception))
        if isinstance(exception, RequestTooLarge):  # more tokens than the whole per-minute limit: never sendable
            return error_response(400, "request_too_large", str(exception))
        if isinstance(exception, openai.APIError):  # OpenAI refused (quota, a 400, 5xx after retries)
            status = getattr(exception, "status_code", None)
            return error_response(502, "upstream_error", exception.message, upstream_status=status)
        return None  # Django's own handling


def retry_after(seconds: float) -> int:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1 (``0`` would invite a busy loop)."""
    return max(1, math.ceil(seconds)) if math.isfinite(seconds) else 60


def error_response(status: int, kind: str, message: str, retry: Optional[int] = None, **extra: Any) -> JsonResponse:
    body: Dict[str, Any] = {"type": kind, "message": message, **extra}
    if retry is not None:
        body["retry_after"] = retry
    response = JsonResponse({"error": body}, status=status)
    if retry is not None:
        response["Retry-After"] = str(retry)
    return response
