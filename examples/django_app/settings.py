"""Settings of the example project, from environment variables; only what its two views need.

``THROTTLED_OPENAI`` holds everything ``throttling.build_client`` reads. ``RPM``/``TPM`` are per minute
(``None``: learned from the response headers); ``MAX_WAIT`` is in seconds; ``ON_ERROR`` is what a Redis
outage does: ``local`` limits in-process meanwhile, ``raise`` answers 503.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional


def _number(name: str, default: Optional[float] = None) -> Optional[float]:
    value = os.environ.get(name)
    return float(value) if value else default


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "insecure-example-key: set DJANGO_SECRET_KEY in production")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",")
ROOT_URLCONF = "examples.django_app.urls"
WSGI_APPLICATION = "examples.django_app.wsgi.application"
INSTALLED_APPS: List[str] = []
# No sessions or cookies: a JSON API. Add CsrfViewMiddleware (and drop csrf_exempt) if it ever uses them.
MIDDLEWARE = ["examples.django_app.throttling.ThrottledOpenAIMiddleware"]
DATABASES: Dict[str, Any] = {}
USE_TZ = True

THROTTLED_OPENAI: Dict[str, Any] = {
    "API_KEY": os.environ.get("OPENAI_API_KEY"),
    "BASE_URL": os.environ.get("OPENAI_BASE_URL") or None,
    "REDIS_URL": os.environ.get("REDIS_URL") or None,
    "ON_ERROR": os.environ.get("THROTTLED_OPENAI_ON_ERROR", "local"),
    "RPM": _number("OPENAI_RPM"),
    "TPM": _number("OPENAI_TPM"),
    "MAX_WAIT": _number("OPENAI_MAX_WAIT", 2.0),
    "MODEL": os.environ.get("OPENAI_MODEL", "gpt-4o-mini"),
    "EMBEDDING_MODEL": os.environ.get("OPENAI_EMBEDDING_MODEL", "text-embedding-3-small"),
    "MAX_TOKENS": int(os.environ.get("OPENAI_MAX_TOKENS", "256")),  # the completion cap booked per chat call
}
