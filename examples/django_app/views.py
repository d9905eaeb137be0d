"""POST /chat, POST /embed and GET /healthz. Errors are raised, and answered by
``throttling.ThrottledOpenAIMiddleware``."""

from __future__ import annotations

import json
import os
from typing import Any, Dict

from django.conf import settings
from django.core.exceptions import BadRequest
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from .throttling import get_client

MAX_TEXTS = 2048  # the embeddings endpoint's limit on inputs per request


@csrf_exempt
@require_POST
def chat(request: HttpRequest) -> JsonResponse:
    """{"message": "..."} -> {"reply": "...", "usage": {...}}."""
    message = _json_body(request).get("message")
    if not isinstance(message, str) or not message.strip():
        raise BadRequest('"message" must be a non-empty string')
    config = settings.THROTTLED_OPENAI
    completion = get_client().chat.completions.create(
        model=config["MODEL"],
        messages=[{"role": "user", "content": message}],
        max_tokens=config["MAX_TOKENS"],  # the limiter books this cap until the usage settles it
    )
    usage = completion.usage.model_dump() if completion.usage is not None else None
    return JsonResponse({"reply": completion.choices[0].message.content, "usage": usage})


@csrf_exempt
@require_POST
def embed(request: HttpRequest) -> JsonResponse:
    """{"texts": ["...", ...]} -> {"vectors": [[...], ...], "usage": {...}}; vectors[i] embeds texts[i]."""
    texts = _json_body(request).get("texts")
    if not isinstance(texts, list) or not texts or len(texts) > MAX_TEXTS:
        raise BadRequest(f'"texts" must be a list of 1 to {MAX_TEXTS} non-empty strings')
    if not all(isinstance(text, str) and text for text in texts):
        raise BadRequest('every item of "texts" must be a non-empty string')
    result = get_client().embeddings.create(model=settings.THROTTLED_OPENAI["EMBEDDING_MODEL"], input=texts)
    vectors = [item.embedding for item in sorted(result.data, key=lambda item: item.index)]
    return JsonResponse({"vectors": vectors, "usage": result.usage.model_dump()})


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness for a load balancer; calls nothing upstream (and builds no client)."""
    return JsonResponse({"ok": True, "pid": os.getpid()})


def _json_body(request: HttpRequest) -> Dict[str, Any]:
    try:
        body = json.loads(request.body)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object")
    return body
