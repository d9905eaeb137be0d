"""The ``openai<1`` interface, throttled: ``import throttled_openai.legacy as openai`` runs v0 code.

Code written for the v0 SDK (``openai.Completion.create(...)``, ``except openai.error.RateLimitError``)
raises ``APIRemovedInV1`` under openai>=1. This module offers the same names:

- ``Completion``, ``ChatCompletion``, ``Embedding``, ``Moderation`` with ``create(**params)``, taking
  v0's keywords: ``engine`` (an alias of ``model``), ``api_key``, ``api_base``, ``organization``,
  ``request_timeout`` (seconds, or a ``(connect, read)`` pair), ``headers``. The body goes to the API
  as given, so any parameter the API knows works.
- module settings ``api_key``, ``api_base``, ``organization``, read at every call; unset, the
  environment's ``OPENAI_API_KEY``, ``OPENAI_API_BASE`` (or ``OPENAI_BASE_URL``), ``OPENAI_ORGANIZATION``.
- results are :class:`OpenAIObject`: a dict with attribute access, like v0's (``resp["choices"][0]``
  and ``resp.choices[0]``; ``to_dict()``; ``json.dumps(resp)``).
- ``error.RateLimitError``, ``error.InvalidRequestError``, ... raised ``from`` the v1 exception, with
  v0's ``http_status``, ``code``, ``request_id``, ``organization``, ... attributes.
- ``request_timeout`` given: a timeout or connection error is raised at once, as v0 did, not retried
  (v0 code wraps its own retries around ``create``); rate limits and 5xx are still retried.

Every call goes through one shared :class:`ThrottledClient`, created at the first call from the
module settings and environment only, with the module's ``rpm`` / ``tpm`` (``None``: learned from the
response headers), or the one given to :func:`set_client` (whose own key, base URL and organization
then stand for unset settings). A call whose key, base URL or organization differ uses a copy of it,
which shares its limiter: per-call values apply to that call only. Not supported: ``stream=True``,
``acreate``, other v0 resources (``Image``, ``File``, ...).
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import threading
import types
from typing import Any, ClassVar, Dict, Optional, Tuple

import openai as _v1

from .client import ThrottledClient
from .errors import RateLimitTimeout, RequestTooLarge
from .retry import Decision, Retry

__all__ = [
    "ChatCompletion",
    "Completion",
    "Embedding",
    "Moderation",
    "OpenAIObject",
    "error",
    "get_client",
    "set_client",
]

#: Settings read at each call; ``None`` falls back to the environment (or the SDK's default).
api_key: Optional[str] = None
api_base: Optional[str] = None
organization: Optional[str] = None
#: Limits of the shared client this module creates (requests / tokens per minute); ``None``: learned.
rpm: Optional[float] = None
tpm: Optional[float] = None

# v0 keywords about the transport that have no meaning here: accepted and dropped.
_IGNORED = ("api_type", "api_version", "request_id", "timeout", "user_agent")
# The SDK's base URL when none is set anywhere.
_DEFAULT_BASE = "https://api.openai.com/v1"


# -- results ------------------------------------------------------------------------------------


class OpenAIObject(Dict[str, Any]):
    """A response as v0 returned it: a dict whose keys are also attributes, nested all the way down."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> Dict[str, Any]:
        """A plain ``dict`` copy, nested objects included."""
        return _plain(self)  # type: ignore[no-any-return]

    to_dict_recursive = to_dict

    def __repr__(self) -> str:
        kind = f" {self['object']}" if isinstance(self.get("object"), str) else ""
        ident = f" id={self['id']}" if isinstance(self.get("id"), str) else ""
        return f"<{type(self).__name__}{kind}{ident} at {hex(id(self))}> JSON: {dict.__repr__(self)}"


def convert(value: Any) -> Any:
    """JSON data with every dict turned into an :class:`OpenAIObject`."""
    if isinstance(value, dict):
        return OpenAIObject({key: convert(item) for key, item in value.items()})
    if isinstance(value, list):
        return [convert(item) for item in value]
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


# -- errors -------------------------------------------------------------------------------------


class OpenAIError(Exception):
    """Base of the v0 errors. ``http_status``, ``json_body`` (the parsed error body), ``headers``,
    ``code``, ``error`` (the body's ``error`` object), ``request_id`` and ``organization`` (from the
    response headers) as v0 had them, when the server answered."""

    def __init__(
        self,
        message: Optional[str] = None,
        http_body: Optional[str] = None,
        http_status: Optional[int] = None,
        json_body: Optional[Any] = None,
        headers: Optional[Any] = None,
        code: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self._message = message
        self.http_body = http_body
        self.http_status = http_status
        self.json_body = json_body
        self.headers = dict(headers or {})
        self.code = code
        lowered = {str(name).lower(): value for name, value in self.headers.items()}
        self.request_id: Optional[str] = lowered.get("request-id") or lowered.get("x-request-id")
        self.organization: Optional[str] = lowered.get("openai-organization")
        self.error = convert(json_body.get("error", json_body)) if isinstance(json_body, dict) else None

    @property
    def user_message(self) -> Optional[str]:
        return self._message

    def __str__(self) -> str:
        return self._message or "<empty message>"


class APIError(OpenAIError):
    """The server failed (a 5xx other than 503, or an unexpected status)."""


class TryAgain(OpenAIError):
    """409: the server asks to try again (after this client's own retries)."""


class Timeout(OpenAIError):
    """The request timed out."""


class APIConnectionError(OpenAIError):
    """The server could not be reached."""


class InvalidRequestError(OpenAIError):
    """400, 404, 415, 422: the request is wrong and retrying it cannot help. ``param`` names the field."""

    def __init__(self, message: Optional[str] = None, param: Optional[str] = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        self.param = param


class AuthenticationError(OpenAIError):
    """401, or no API key at all."""


class PermissionError(OpenAIError):  # v0's name, shadowing the builtin here only
    """403."""


class RateLimitError(OpenAIError):
    """429: a rate limit (after this client's own retries) or an exhausted quota (``code``
    ``insufficient_quota``), as v0 reported both."""


class ServiceUnavailableError(OpenAIError):
    """503: the server is overloaded."""


#: ``openai.error`` as v0 had it; ``import throttled_openai.legacy.error`` works too.
error = types.ModuleType(__name__ + ".error", "v0's ``openai.error``: the exceptions of the legacy interface.")
for _cls in (
    OpenAIError,
    APIError,
    TryAgain,
    Timeout,
    APIConnectionError,
    InvalidRequestError,
    AuthenticationError,
    PermissionError,
    RateLimitError,
    ServiceUnavailableError,
):
    setattr(error, _cls.__name__, _cls)
sys.modules[error.__name__] = error

_BY_STATUS = {
    401: AuthenticationError,
    403: PermissionError,
    409: TryAgain,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def translate(exc: BaseException) -> OpenAIError:
    """The v0 error for a v1 (or throttled_openai) error; raise it ``from`` the original."""
    if isinstance(exc, _v1.APIStatusError):
        status = exc.status_code
        body = exc.body if isinstance(exc.body, dict) else None
        json_body = {"error": body} if body is not None else None
        code = getattr(exc, "code", None)
        message = body.get("message") if body is not None and isinstance(body.get("message"), str) else exc.message
        if status in _BY_STATUS:
            cls = _BY_STATUS[status]
        elif status in (400, 404, 415, 422):
            param = getattr(exc, "param", None)
            return InvalidRequestError(message, param, exc.response.text, status, json_body, exc.response.headers, code)
        else:
            cls = APIError
        return cls(message, exc.response.text, status, json_body, exc.response.headers, code)
    if isinstance(exc, _v1.APITimeoutError):
        return Timeout(str(exc))
    if isinstance(exc, _v1.APIConnectionError):
        return APIConnectionError(str(exc))
    if isinstance(exc, RateLimitTimeout):
        return RateLimitError(str(exc))
    if isinstance(exc, RequestTooLarge):
        return InvalidRequestError(str(exc))
    if isinstance(exc, _v1.OpenAIError) and "api_key" in str(exc):
        return AuthenticationError(str(exc))  # the SDK's "api_key client option must be set"
    return OpenAIError(str(exc))


# -- the shared client --------------------------------------------------------------------------

_lock = threading.Lock()
_shared: Optional[ThrottledClient] = None
_built_for: Optional[Tuple[Optional[float], Optional[float]]] = None  # (rpm, tpm); None: set_client's
_copies: Dict[Tuple[str, str, Optional[str], bool], ThrottledClient] = {}


@dataclasses.dataclass(frozen=True)
class _NoTransportRetry(Retry):
    """The client's policy, except that timeouts and connection errors are raised at once (v0 with a
    ``request_timeout``)."""

    def decide(self, error: BaseException, retry_number: int, rng: Optional[random.Random] = None) -> Decision:
        if isinstance(error, _v1.APIConnectionError):  # APITimeoutError included
            return Decision(False, 0.0, False, self.classify(error)[0])
        return super().decide(error, retry_number, rng)


def set_client(client: Optional[ThrottledClient]) -> None:
    """Send every call through ``client`` (``None``: go back to a client created at the next call)."""
    global _shared, _built_for
    with _lock:
        _shared, _built_for = client, None
        _copies.clear()


def get_client() -> Optional[ThrottledClient]:
    """The shared client (for ``stats()`` or its limiter); ``None`` before the first call."""
    return _shared


def _settings() -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """Key, base URL and organization from the module settings, else the environment."""
    return (
        api_key or os.environ.get("OPENAI_API_KEY") or None,
        api_base or os.environ.get("OPENAI_API_BASE") or os.environ.get("OPENAI_BASE_URL") or None,
        organization or os.environ.get("OPENAI_ORGANIZATION") or None,
    )


def _client_for(params: Dict[str, Any], strict_timeout: bool) -> ThrottledClient:
    """The client for one call: the shared one, or a copy of it for the key / base URL / organization
    the call wants (its own values, else the module's or the environment's, else the shared client's
    own when :func:`set_client` gave it). The shared client is created once, under a lock, at the first
    call, from the module settings and environment only; recreated when ``rpm``/``tpm`` change."""
    global _shared, _built_for
    setting_key, setting_base, setting_org = _settings()
    key = params.pop("api_key", None) or setting_key
    base = params.pop("api_base", None) or setting_base
    org = params.pop("organization", None) or setting_org
    with _lock:
        client = _shared
        if client is None or (_built_for is not None and _built_for != (rpm, tpm)):
            if setting_key is None and key is None:
                raise AuthenticationError(
                    "No API key provided. Set openai.api_key = <API-KEY>, or the OPENAI_API_KEY environment variable."
                )
            # Any key builds it: what each call uses is decided below, from the call's own values.
            client = ThrottledClient(
                api_key=setting_key or key, base_url=setting_base, organization=setting_org, rpm=rpm, tpm=tpm
            )
            _shared, _built_for = client, (rpm, tpm)
            _copies.clear()
        if _built_for is None:  # set_client's: its own settings stand for the unset ones
            key = key or client.api_key
            base = base or str(client.base_url)
            org = org or client.organization
        if not key:
            raise AuthenticationError(
                "No API key provided. Set openai.api_key = <API-KEY>, or the OPENAI_API_KEY environment variable."
            )
        wanted = (key, (base or _DEFAULT_BASE).rstrip("/"), org, strict_timeout)
        have = (client.api_key, str(client.base_url).rstrip("/"), client.organization, False)
        if wanted == have:
            return client
        copy = _copies.get(wanted)
        if copy is None:
            retry = client.retry
            if strict_timeout:
                retry = _NoTransportRetry(**{f.name: getattr(retry, f.name) for f in dataclasses.fields(Retry)})
            copy = client.with_options(api_key=key, base_url=wanted[1], organization=org, retry=retry)
            copy.organization = org  # the SDK's copy keeps the original's when given None
            _copies[wanted] = copy
        return copy


def _timeout(value: Any) -> Any:
    """v0's ``request_timeout``: seconds, or a ``(connect, read)`` pair."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return _v1.Timeout(value[1], connect=value[0])
    return value


def request(path: str, params: Dict[str, Any]) -> OpenAIObject:
    """Send one v0-style call to ``path`` (``/completions``, ...) and return the v0-style result."""
    body = dict(params)
    settings = {name: body.pop(name, None) for name in ("api_key", "api_base", "organization")}
    timeout = body.pop("request_timeout", None)
    headers = body.pop("headers", None)
    for name in _IGNORED:
        body.pop(name, None)
    engine = body.pop("engine", None)
    if engine is not None and not body.get("model"):
        body["model"] = engine
    if body.get("stream"):
        raise InvalidRequestError("stream=True is not supported by throttled_openai.legacy", "stream")
    options: Any = {}  # the SDK's RequestOptions
    if timeout is not None:
        options["timeout"] = _timeout(timeout)
    if headers:
        options["headers"] = dict(headers)
    try:
        client = _client_for(settings, strict_timeout=timeout is not None)
        # cast_to=object: the JSON as is; no pydantic model is built on the way.
        result = client.post(path, body=body, cast_to=object, options=options)
    except OpenAIError:
        raise
    except Exception as exc:
        raise translate(exc) from exc
    if not isinstance(result, dict):
        raise APIError(f"the response is not a JSON object: {str(result)[:200]!r}")
    return convert(result)  # type: ignore[no-any-return]


class _Resource:
    path: ClassVar[str]

    @classmethod
    def create(cls, **params: Any) -> OpenAIObject:
        """v0's ``create``: the API's parameters, plus ``engine``, ``api_key``, ``api_base``,
        ``organization``, ``request_timeout`` (seconds) and ``headers``."""
        return request(cls.path, params)


class Completion(_Resource):
    """Legacy completions: ``Completion.create(model=..., prompt=... or [...], max_tokens=...)``."""

    path = "/completions"


class ChatCompletion(_Resource):
    """``ChatCompletion.create(model=..., messages=[...])``."""

    path = "/chat/completions"


class Embedding(_Resource):
    """``Embedding.create(model=..., input=... or [...])``; vectors as lists of floats."""

    path = "/embeddings"


class Moderation(_Resource):
    """``Moderation.create(input=...)`` (counted as one request and no tokens)."""

    path = "/moderations"
