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
- ``Model.list()``, ``Model.retrieve(id)``, ``Model.delete(id)``, returning :class:`Model` objects.
- v0's other module settings, with v0's defaults: ``api_key_path`` (``OPENAI_API_KEY_PATH``; a file
  holding the key, read at every call, before ``api_key``), ``api_type`` (``OPENAI_API_TYPE`` or
  ``"open_ai"``), ``api_version`` (``None``; sent as v0 did, in an ``OpenAI-Version`` header),
  ``proxy`` (``None``; a URL, or ``{"http": url, "https": url}``, for the client this module creates),
  ``aiosession``, and ``verify_ssl_certs``, ``app_info``, ``enable_telemetry``, ``ca_bundle_path``,
  ``debug``, ``log``, which have no effect (the first three had none in v0 either).

Every call goes through one shared :class:`ThrottledClient`, created at the first call from the
module settings and environment only, with the module's ``rpm`` / ``tpm`` (``None``: learned from the
response headers), or the one given to :func:`set_client` (whose own key, base URL and organization
then stand for unset settings). A call whose key, base URL or organization differ uses a copy of it,
which shares its limiter: per-call values apply to that call only.

Not supported, each raising :class:`NotSupportedError` with a message naming the openai>=1 call to
use instead: ``acreate`` and the other async methods, the other v0 resources (``Image``, ``Audio``,
``File``, ``FineTuningJob``, ``FineTune``, ``Edit``, ``Engine``, ``Deployment``), Azure (``api_type``
``"azure"``, ``deployment_id``) and ``requestssession``. ``stream=True`` raises ``InvalidRequestError``.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import threading
import types
import urllib.parse
from contextvars import ContextVar
from typing import Any, Callable, ClassVar, Dict, NoReturn, Optional, Tuple

import openai as _v1

from .client import ThrottledClient, _http_library, _OwnedHttpClient
from .errors import RateLimitTimeout, RequestTooLarge
from .retry import Decision, Retry

__all__ = [
    "Audio",
    "ChatCompletion",
    "Completion",
    "Deployment",
    "Edit",
    "Embedding",
    "Engine",
    "File",
    "FineTune",
    "FineTuningJob",
    "Image",
    "Model",
    "Moderation",
    "NotSupportedError",
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

# v0's other module settings, with v0's defaults (read from the environment at import, as v0 did).
#: A file holding the API key, read at every call; it takes precedence over ``api_key`` (v0's rule:
#: made for mounted secrets that are rotated in place). A per-call ``api_key=`` still wins.
api_key_path: Optional[str] = os.environ.get("OPENAI_API_KEY_PATH")
#: ``"open_ai"`` (or ``"openai"``). Azure's types raise :class:`NotSupportedError` at the call: use
#: ``throttled_openai.ThrottledAzureClient``.
api_type: str = os.environ.get("OPENAI_API_TYPE", "open_ai")
#: Sent in an ``OpenAI-Version`` header when set, as v0 did (v0's Azure default kept for reading).
api_version: Optional[str] = "2023-03-15-preview" if api_type in ("azure", "azure_ad", "azuread") else None
#: A proxy URL for every request, or ``{"http": url, "https": url}`` (either key), as v0 took it; it
#: replaces the environment's proxy settings. Applies to the client this module creates.
proxy: Optional[Any] = None
#: v0's ``requests`` session hook: not supported (this module speaks httpx); must stay ``None``.
requestssession: Optional[Any] = None
#: v0's aiohttp session for ``acreate``: kept so that setting it works; ``acreate`` is not supported.
aiosession: ContextVar[Optional[Any]] = ContextVar("aiohttp-session", default=None)
#: No effect here (v0 ignored the first three too): kept so that v0 code reading or setting them works.
verify_ssl_certs: bool = True
enable_telemetry: bool = False
ca_bundle_path: Optional[str] = None
app_info: Optional[Dict[str, Any]] = None
debug: bool = False
log: Optional[str] = None

# v0 keywords about the transport that have no meaning here: accepted and dropped.
_IGNORED = ("request_id", "timeout", "user_agent")
# The SDK's base URL when none is set anywhere.
_DEFAULT_BASE = "https://api.openai.com/v1"
# Where unsupported calls send people: OpenAI's v0 -> v1 migration guide.
_GUIDE = "https://github.com/openai/openai-python/discussions/742"
_OPEN_AI_TYPES = ("open_ai", "openai")
_AZURE_TYPES = ("azure", "azure_ad", "azuread")


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


# v0's classes for some ``"object"`` kinds (a model is a :class:`Model`); filled where they are defined.
_OBJECT_CLASSES: Dict[str, Callable[[Dict[str, Any]], OpenAIObject]] = {}


def convert(value: Any) -> Any:
    """JSON data with every dict turned into an :class:`OpenAIObject` (or the v0 class of its ``object``)."""
    if isinstance(value, dict):
        kind = value.get("object")
        cls = _OBJECT_CLASSES.get(kind, OpenAIObject) if isinstance(kind, str) else OpenAIObject
        return cls({key: convert(item) for key, item in value.items()})
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


class InvalidAPIType(OpenAIError):
    """``api_type`` is none of v0's (``open_ai``, ``azure``, ``azure_ad``)."""


class NotSupportedError(NotImplementedError):
    """A v0 call or setting this module does not offer; the message names the openai>=1 way.

    Not an :class:`OpenAIError`, so that v0 code catching those (to retry, or to skip an input) does
    not take it for a failed request."""


def _not_supported(what: str, instead: str) -> NotSupportedError:
    return NotSupportedError(f"throttled_openai.legacy does not support {what}; use {instead} (see {_GUIDE})")


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
    InvalidAPIType,
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
# What the shared client was built for: (rpm, tpm, proxies); None when set_client gave it.
_built_for: Optional[Tuple[Optional[float], Optional[float], Any]] = None
_copies: Dict[Tuple[str, str, Optional[str], bool], ThrottledClient] = {}
_NO_KEY = (
    "No API key provided. Set openai.api_key = <API-KEY>, or the OPENAI_API_KEY environment variable, or "
    "openai.api_key_path = <PATH> to a file holding it."
)
# v0's own message for a proxy of the wrong shape.
_PROXY_ERROR = (
    "'openai.proxy' must be specified as either a string URL or a dict with string URL under the https and/or "
    "http keys."
)


_httpx = _http_library()
# The SDK's connection limits (its DefaultHttpxClient's), for the transports a proxy needs.
_CONNECTION_LIMITS = _httpx.Limits(max_connections=1000, max_keepalive_connections=100)


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


def _key_from_file(path: str) -> str:
    """v0's ``api_key_path``: the file's content, read at every call (a mounted secret may be rotated)."""
    try:
        with open(path, encoding="utf-8") as file:
            key = file.read().strip()
    except OSError as exc:
        raise AuthenticationError(f"openai.api_key_path: cannot read an API key from {path}: {exc}") from exc
    if not key:
        raise AuthenticationError(f"openai.api_key_path: {path} holds no API key (the file is empty)")
    return key


def _settings(read_key_file: bool = True) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """Key, base URL and organization from the module settings, else the environment. ``api_key_path``,
    when set, gives the key before ``api_key`` does (v0's precedence); ``read_key_file=False`` (the call
    brings its own key) leaves the file unread, and the key None."""
    if api_key_path:
        key = _key_from_file(api_key_path) if read_key_file else None
    else:
        key = api_key or os.environ.get("OPENAI_API_KEY") or None
    return (
        key,
        api_base or os.environ.get("OPENAI_API_BASE") or os.environ.get("OPENAI_BASE_URL") or None,
        organization or os.environ.get("OPENAI_ORGANIZATION") or None,
    )


def _proxies(value: Any) -> Optional[Tuple[Tuple[str, str], ...]]:
    """``proxy`` as ``(("http", url), ("https", url))`` (either), checked as v0 checked it; None: unset."""
    if not value:  # None, "" or {}: no proxy, as in v0
        return None
    if isinstance(value, str):
        proxies: Tuple[Tuple[str, str], ...] = (("http", value), ("https", value))
    elif isinstance(value, dict) and all(
        scheme in ("http", "https") and isinstance(url, str) for scheme, url in value.items()
    ):
        proxies = tuple(sorted(value.items()))
    else:
        raise ValueError(_PROXY_ERROR)
    for _, url in proxies:
        try:
            _httpx.Proxy(url)
        except ValueError as exc:  # "proxy:3128", with no scheme, say
            raise ValueError(f"openai.proxy: {exc} (give a URL: http://host:port)") from None
    return proxies


def _http_client(proxies: Tuple[Tuple[str, str], ...]) -> Any:
    """The SDK's default HTTP client with its requests sent through ``proxies``, and not through the
    environment's proxies (``trust_env=False``): a proxy set in code is meant for every request."""
    mounts = {
        f"{scheme}://": _httpx.HTTPTransport(proxy=_httpx.Proxy(url), limits=_CONNECTION_LIMITS)
        for scheme, url in proxies
    }
    return _OwnedHttpClient(mounts=mounts, trust_env=False)  # closed when the client it serves is dropped


def _client_for(
    params: Dict[str, Any], strict_timeout: bool, proxies: Optional[Tuple[Tuple[str, str], ...]] = None
) -> ThrottledClient:
    """The client for one call: the shared one, or a copy of it for the key / base URL / organization
    the call wants (its own values, else the module's or the environment's, else the shared client's
    own when :func:`set_client` gave it). The shared client is created once, under a lock, at the first
    call, from the module settings and environment only; recreated when ``rpm``/``tpm``/``proxy`` change."""
    global _shared, _built_for
    call_key = params.pop("api_key", None)
    setting_key, setting_base, setting_org = _settings(read_key_file=not call_key)
    key = call_key or setting_key
    base = params.pop("api_base", None) or setting_base
    org = params.pop("organization", None) or setting_org
    with _lock:
        client = _shared
        if client is None or (_built_for is not None and _built_for != (rpm, tpm, proxies)):
            if setting_key is None and key is None:
                raise AuthenticationError(_NO_KEY)
            # Any key builds it: what each call uses is decided below, from the call's own values.
            client = ThrottledClient(
                api_key=setting_key or key,
                base_url=setting_base,
                organization=setting_org,
                rpm=rpm,
                tpm=tpm,
                http_client=_http_client(proxies) if proxies else None,
            )
            _shared, _built_for = client, (rpm, tpm, proxies)
            _copies.clear()
        if _built_for is None:  # set_client's: its own settings stand for the unset ones
            if proxies:
                raise _not_supported(
                    "openai.proxy with a client given to set_client()",
                    "that client's own http_client: ThrottledClient(http_client=openai.DefaultHttpxClient(proxy=...))",
                )
            key = key or client.api_key
            base = base or str(client.base_url)
            org = org or client.organization
        if not key:
            raise AuthenticationError(_NO_KEY)
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


def _v1_call(path: str, method: str) -> str:
    """The openai>=1 call that does what a v0 call to ``path`` did, for messages: the resource named, so
    that a ChatCompletion user is not sent to ``completions``."""
    if method == "post":
        resource = next((r for r in (Completion, ChatCompletion, Embedding, Moderation) if r.path == path), None)
        return f"client.{resource.v1}(model=<deployment>, ...)" if resource else f"client.post({path!r}, ...)"
    if path == "/models":
        return "client.models.list()"
    return f"client.models.{'retrieve' if method == 'get' else 'delete'}(...)"


def _check_api_type(value: Any, params: Dict[str, Any], call: str) -> None:
    """OpenAI's API only: Azure's v0 types (or a ``deployment_id``) raise, naming the v1 way (``call``,
    from :func:`_v1_call`)."""
    kind = str(value).lower()
    if kind in _AZURE_TYPES or "deployment_id" in params:
        what = f"api_type={value!r}" if kind in _AZURE_TYPES else "deployment_id (Azure)"
        raise _not_supported(
            what,
            f"{call} from openai>=1, with client = "
            "throttled_openai.ThrottledAzureClient(azure_endpoint=..., api_version=..., rpm=..., tpm=...)",
        )
    if kind not in _OPEN_AI_TYPES:
        raise InvalidAPIType(f"api_type {value!r} is invalid: use 'open_ai' (Azure: ThrottledAzureClient)")


def request(path: str, params: Dict[str, Any], method: str = "post") -> OpenAIObject:
    """Send one v0-style call to ``path`` (``/completions``, ...) and return the v0-style result. The
    parameters are a POST's JSON body, or a GET's or DELETE's query."""
    body = dict(params)
    settings = {name: body.pop(name, None) for name in ("api_key", "api_base", "organization")}
    timeout = body.pop("request_timeout", None)
    headers = dict(body.pop("headers", None) or {})
    _check_api_type(body.pop("api_type", None) or api_type or "open_ai", body, _v1_call(path, method))
    version = body.pop("api_version", None) or api_version
    if version is not None:
        headers.setdefault("OpenAI-Version", str(version))  # as v0 sent it; the call's own headers win
    for name in _IGNORED:
        body.pop(name, None)
    if requestssession is not None:
        raise _not_supported(
            "openai.requestssession (a requests session)",
            "set_client(ThrottledClient(http_client=httpx.Client(...))) with the same settings",
        )
    proxies = _proxies(proxy)
    if method == "post":
        engine = body.pop("engine", None)
        if engine is not None and not body.get("model"):
            body["model"] = engine
        if body.get("stream"):
            raise InvalidRequestError("stream=True is not supported by throttled_openai.legacy", "stream")
    options: Any = {}  # the SDK's RequestOptions
    if timeout is not None:
        options["timeout"] = _timeout(timeout)
    if headers:
        options["headers"] = headers
    if method != "post" and body:
        options["params"] = body
    try:
        client = _client_for(settings, strict_timeout=timeout is not None, proxies=proxies)
        # cast_to=object: the JSON as is; no pydantic model is built on the way.
        if method == "post":
            result = client.post(path, body=body, cast_to=object, options=options)
        elif method == "get":
            result = client.get(path, cast_to=object, options=options)
        else:
            result = client.delete(path, cast_to=object, options=options)
    except (OpenAIError, NotSupportedError):
        raise
    except Exception as exc:
        raise translate(exc) from exc
    if not isinstance(result, dict):
        raise APIError(f"the response is not a JSON object: {str(result)[:200]!r}")
    return convert(result)  # type: ignore[no-any-return]


# -- resources ----------------------------------------------------------------------------------


def _async_not_supported(what: str, sync: str, v1: str) -> NotSupportedError:
    return _not_supported(
        f"{what} (async calls)",
        f"await asyncio.to_thread({sync}, ...), which waits its turn in the same limiter, or await {v1}(...) "
        "from openai>=1, with client = throttled_openai.AsyncThrottledClient() (its own limiter, unless given "
        "limiter=)",
    )


class _Resource:
    path: ClassVar[str]
    v1: ClassVar[str]  # the openai>=1 method, for the message of acreate

    @classmethod
    def create(cls, **params: Any) -> OpenAIObject:
        """v0's ``create``: the API's parameters, plus ``engine``, ``api_key``, ``api_base``,
        ``organization``, ``request_timeout`` (seconds), ``headers``, ``api_type``, ``api_version``."""
        return request(cls.path, params)

    @classmethod
    def acreate(cls, *args: Any, **params: Any) -> NoReturn:
        """Not supported: raises :class:`NotSupportedError` naming the ways to call ``create`` from async code."""
        raise _async_not_supported(f"{cls.__name__}.acreate", f"{cls.__name__}.create", f"client.{cls.v1}")


class Completion(_Resource):
    """Legacy completions: ``Completion.create(model=..., prompt=... or [...], max_tokens=...)``."""

    path = "/completions"
    v1 = "completions.create"


class ChatCompletion(_Resource):
    """``ChatCompletion.create(model=..., messages=[...])``."""

    path = "/chat/completions"
    v1 = "chat.completions.create"


class Embedding(_Resource):
    """``Embedding.create(model=..., input=... or [...])``; vectors as lists of floats."""

    path = "/embeddings"
    v1 = "embeddings.create"


class Moderation(_Resource):
    """``Moderation.create(input=...)`` (counted as one request and no tokens)."""

    path = "/moderations"
    v1 = "moderations.create"


def _model_path(model: Any) -> str:
    if not isinstance(model, str) or model.strip(".") == "":
        raise InvalidRequestError(f"Could not determine which URL to request: invalid model ID {model!r}", "id")
    return "/models/" + urllib.parse.quote(model, safe=":@")


class Model(OpenAIObject):
    """v0's ``openai.Model``: ``Model.list()``, ``Model.retrieve(id)``, ``Model.delete(id)`` (a
    fine-tuned model). A model in a result is a ``Model`` (``model.id``, ``model["owned_by"]``, ...);
    ``list`` returns an :class:`OpenAIObject` whose ``data`` holds them. The keywords of ``create``
    (``api_key``, ``request_timeout``, ...) work here too; others go to the query string."""

    @classmethod
    def list(cls, **params: Any) -> OpenAIObject:
        return request("/models", params, "get")

    @classmethod
    def retrieve(cls, id: str, **params: Any) -> OpenAIObject:
        return request(_model_path(id), params, "get")

    @classmethod
    def delete(cls, sid: str, **params: Any) -> OpenAIObject:
        return request(_model_path(sid), params, "delete")

    @classmethod
    def alist(cls, *args: Any, **params: Any) -> NoReturn:
        raise _async_not_supported("Model.alist", "Model.list", "client.models.list")

    @classmethod
    def aretrieve(cls, *args: Any, **params: Any) -> NoReturn:
        raise _async_not_supported("Model.aretrieve", "Model.retrieve", "client.models.retrieve")

    @classmethod
    def adelete(cls, *args: Any, **params: Any) -> NoReturn:
        raise _async_not_supported("Model.adelete", "Model.delete", "client.models.delete")


_OBJECT_CLASSES["model"] = Model


def _raiser(what: str, instead: str) -> Callable[..., NoReturn]:
    def call(*args: Any, **kwargs: Any) -> NoReturn:
        raise _not_supported(what, instead)

    call.__name__ = what.rpartition(".")[2]
    call.__qualname__ = what
    call.__doc__ = f"Not supported: raises NotSupportedError; use {instead}."
    return call


def _unsupported(name: str, doc: str, methods: Dict[str, str]) -> Any:
    """A v0 resource whose methods (and their async ``a...`` twins) raise :class:`NotSupportedError`,
    each naming the openai>=1 call that replaces it."""
    namespace: Dict[str, Any] = {"__doc__": doc, "__module__": __name__, "__qualname__": name}
    for method, instead in methods.items():
        for prefix in ("", "a"):
            namespace[prefix + method] = staticmethod(_raiser(f"{name}.{prefix}{method}", instead))
    return type(name, (), namespace)


def _use(call: str, note: str = "") -> str:
    return f"{call} from openai>=1{note}, with client = throttled_openai.ThrottledClient() to keep it throttled"


_JOBS = " (the fine-tunes endpoint is gone)"
_ENGINES = " (engines are models now)"

Image = _unsupported(
    "Image",
    "v0's ``openai.Image``: not supported (see the methods' messages).",
    {
        "create": _use("client.images.generate(...)"),
        "create_edit": _use("client.images.edit(...)"),
        "create_variation": _use("client.images.create_variation(...)"),
    },
)
Audio = _unsupported(
    "Audio",
    "v0's ``openai.Audio``: not supported (see the methods' messages).",
    {
        "transcribe": _use("client.audio.transcriptions.create(...)"),
        "transcribe_raw": _use("client.audio.transcriptions.create(...)"),
        "translate": _use("client.audio.translations.create(...)"),
        "translate_raw": _use("client.audio.translations.create(...)"),
    },
)
File = _unsupported(
    "File",
    "v0's ``openai.File``: not supported (see the methods' messages).",
    {
        "create": _use("client.files.create(...)"),
        "list": _use("client.files.list()"),
        "retrieve": _use("client.files.retrieve(...)"),
        "delete": _use("client.files.delete(...)"),
        "download": _use("client.files.content(...)"),
        "find_matching_files": _use("client.files.list()"),
        "wait_for_processing": _use("client.files.wait_for_processing(...)"),
    },
)
FineTuningJob = _unsupported(
    "FineTuningJob",
    "v0's ``openai.FineTuningJob``: not supported (see the methods' messages).",
    {
        "create": _use("client.fine_tuning.jobs.create(...)"),
        "list": _use("client.fine_tuning.jobs.list()"),
        "retrieve": _use("client.fine_tuning.jobs.retrieve(...)"),
        "cancel": _use("client.fine_tuning.jobs.cancel(...)"),
        "list_events": _use("client.fine_tuning.jobs.list_events(...)"),
    },
)
FineTune = _unsupported(
    "FineTune",
    "v0's ``openai.FineTune`` (the legacy fine-tunes endpoint): not supported (see the methods' messages).",
    {
        "create": _use("client.fine_tuning.jobs.create(...)", _JOBS),
        "list": _use("client.fine_tuning.jobs.list()", _JOBS),
        "retrieve": _use("client.fine_tuning.jobs.retrieve(...)", _JOBS),
        "cancel": _use("client.fine_tuning.jobs.cancel(...)", _JOBS),
        "list_events": _use("client.fine_tuning.jobs.list_events(...)", _JOBS),
        "stream_events": _use("client.fine_tuning.jobs.list_events(...)", _JOBS),
    },
)
Edit = _unsupported(
    "Edit",
    "v0's ``openai.Edit`` (the edits endpoint is gone): not supported.",
    {"create": _use("client.chat.completions.create(...)", " (the edits endpoint is gone)")},
)
Engine = _unsupported(
    "Engine",
    "v0's ``openai.Engine`` (engines are models now): not supported; ``Model`` is.",
    {
        "list": "Model.list() here, or " + _use("client.models.list()", _ENGINES),
        "retrieve": "Model.retrieve(id) here, or " + _use("client.models.retrieve(...)", _ENGINES),
        "generate": "Completion.create(model=...) here, or " + _use("client.completions.create(...)", _ENGINES),
        "embeddings": "Embedding.create(model=...) here, or " + _use("client.embeddings.create(...)", _ENGINES),
    },
)
_AZURE_DEPLOYMENTS = (
    "Azure's management API (openai>=1 does not manage deployments); call a deployment with "
    "throttled_openai.ThrottledAzureClient(azure_endpoint=..., api_version=...)"
)
Deployment = _unsupported(
    "Deployment",
    "v0's ``openai.Deployment`` (Azure): not supported.",
    dict.fromkeys(("create", "list", "retrieve", "delete"), _AZURE_DEPLOYMENTS),
)
