"""v0-style code runs against the fake server with nothing changed but ``import throttled_openai.legacy as openai``.

The functions marked "as in the guide" are the shapes of the Cookbook's rate-limit guide
(``../shared/seed/how-to-handle-rate-limits.ko.md``), written for openai<1.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Iterator, List, Type

import backoff
import openai as openai_v1
import pytest
from tenacity import retry, stop_after_attempt, wait_random_exponential

import throttled_openai.legacy as openai
from throttled_openai import ThrottledClient
from throttled_openai.testing import FakeOpenAI

MODEL = "gpt-3.5-turbo-instruct"
GUIDE = "https://github.com/openai/openai-python/discussions/742"
# openai 0.28's module settings besides api_key / api_base / organization, and their defaults when no
# OPENAI_API_KEY_PATH / OPENAI_API_TYPE is set (aiosession, a ContextVar, is checked on its own).
V0_DEFAULTS: Dict[str, Any] = {
    "api_key_path": None,
    "api_type": "open_ai",
    "api_version": None,
    "proxy": None,
    "requestssession": None,
    "verify_ssl_certs": True,
    "enable_telemetry": False,
    "ca_bundle_path": None,
    "app_info": None,
    "debug": False,
    "log": None,
}


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    for name in ("OPENAI_API_KEY", "OPENAI_API_BASE", "OPENAI_BASE_URL", "OPENAI_ORGANIZATION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in V0_DEFAULTS.items():  # v0's other settings start at their defaults, and are restored
        monkeypatch.setattr(openai, name, value, raising=False)
    with FakeOpenAI(rpm=600, tpm=200_000, bucket_seconds=1.0, latency=0.01, api_keys={"sk-test", "sk-other"}) as fake:
        openai.set_client(None)
        openai.api_key, openai.api_base, openai.organization = "sk-test", fake.base_url, None
        openai.rpm, openai.tpm = 600, 200_000
        yield fake
    openai.set_client(None)
    openai.api_key = openai.api_base = None
    openai.rpm = openai.tpm = None


# -- the guide's shapes -------------------------------------------------------------------------


@retry(wait=wait_random_exponential(min=1, max=60), stop=stop_after_attempt(6))  # as in the guide
def completion_with_backoff(**kwargs: Any) -> Any:
    return openai.Completion.create(**kwargs)


@backoff.on_exception(backoff.expo, openai.error.RateLimitError)  # as in the guide
def completions_with_backoff(**kwargs: Any) -> Any:
    return openai.Completion.create(**kwargs)


def retry_with_exponential_backoff(  # as in the guide
    func: Any,
    initial_delay: float = 1,
    exponential_base: float = 2,
    jitter: bool = True,
    max_retries: int = 10,
    errors: tuple = (openai.error.RateLimitError,),  # type: ignore[type-arg]
) -> Any:
    """Retry a function with exponential backoff."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        num_retries = 0
        delay = initial_delay
        while True:
            try:
                return func(*args, **kwargs)
            except errors:
                num_retries += 1
                if num_retries > max_retries:
                    raise Exception(f"Maximum number of retries ({max_retries}) exceeded.") from None
                delay *= exponential_base * (1 + jitter * random.random())
                time.sleep(delay)

    return wrapper


@retry_with_exponential_backoff
def completions_with_manual_backoff(**kwargs: Any) -> Any:
    return openai.Completion.create(**kwargs)


def test_tenacity_decorated_completion_loop_stays_under_the_limit(server: FakeOpenAI) -> None:
    # The guide's loop that triggers 429s with the v0 SDK: here the shared client paces it (10/s).
    for i in range(25):
        response = completion_with_backoff(model=MODEL, prompt=f"Once upon a time, {i}", max_tokens=10)
        assert response.choices[0].text == f" echo:Once upon a time, {i}#0"
        assert response["choices"][0]["text"] == response.choices[0].text
    assert server.stats()["rate_limited"] == 0
    assert server.stats()["admitted"] == 25


def test_backoff_wrapper_catches_the_legacy_rate_limit_error(server: FakeOpenAI) -> None:
    server.inject("quota")  # not retried by the client: reaches the caller as v0's RateLimitError
    response = completions_with_backoff(model=MODEL, prompt="Once upon a time,")
    assert response.choices[0].text == " echo:Once upon a time,#0"
    assert server.stats()["quota"] == 1


def test_hand_written_retry_decorator(server: FakeOpenAI) -> None:
    assert completions_with_manual_backoff(model=MODEL, prompt="Once upon a time,").choices[0].index == 0
    server.inject("quota", count=2)
    fast = retry_with_exponential_backoff(openai.Completion.create, initial_delay=0.01)
    assert fast(model=MODEL, prompt="Once upon a time,").choices[0].text == " echo:Once upon a time,#0"
    assert server.stats()["quota"] == 2


def test_batched_prompts_matched_back_by_index(server: FakeOpenAI) -> None:
    prompts = [f"Once upon a time, story {i}," for i in range(10)]
    response = openai.Completion.create(model="curie", prompt=prompts, max_tokens=20)  # as in the guide
    stories = [""] * len(prompts)
    for choice in response.choices:
        stories[choice.index] = prompts[choice.index] + choice.text
    assert stories == [f"{p} echo:{p[:40]}#0" for p in prompts]
    assert [c.index for c in response.choices] != list(range(10))  # the server shuffled them


# -- results and settings -----------------------------------------------------------------------


def test_results_behave_like_v0_objects(server: FakeOpenAI) -> None:
    chat = openai.ChatCompletion.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert chat.choices[0].message.content == chat["choices"][0]["message"]["content"] == "echo:Hi#0"
    assert chat.usage.total_tokens == chat["usage"]["total_tokens"] > 0
    assert json.loads(json.dumps(chat)) == chat.to_dict()
    assert type(chat.to_dict()["choices"][0]) is dict
    assert repr(chat).startswith("<OpenAIObject chat.completion id=chatcmpl-")
    with pytest.raises(AttributeError):
        _ = chat.no_such_field
    vectors = openai.Embedding.create(engine="text-embedding-3-small", input=["a", "b"])  # engine: v0's alias
    assert [len(item["embedding"]) for item in vectors.data] == [8, 8]
    assert server.requests_log[-1]["body"]["model"] == "text-embedding-3-small"
    assert isinstance(vectors.data[0].embedding[0], float)


def test_moderation_goes_to_its_endpoint(server: FakeOpenAI) -> None:
    with pytest.raises(openai.error.InvalidRequestError) as caught:  # the fake server has no /moderations
        openai.Moderation.create(input="hello")
    assert caught.value.http_status == 404
    assert server.requests_log[-1]["path"] == "/v1/moderations"


def test_errors_map_to_the_v0_classes(server: FakeOpenAI) -> None:
    server.inject("quota")
    with pytest.raises(openai.error.RateLimitError) as quota:
        openai.Completion.create(model=MODEL, prompt="x")
    assert isinstance(quota.value.__cause__, openai_v1.RateLimitError)
    assert quota.value.http_status == 429 and quota.value.code == "insufficient_quota"
    assert "exceeded your current quota" in str(quota.value)
    server.inject("400")
    with pytest.raises(openai.error.InvalidRequestError) as bad:
        openai.Completion.create(model=MODEL, prompt="x")
    assert isinstance(bad.value.__cause__, openai_v1.BadRequestError)
    assert isinstance(bad.value, openai.error.OpenAIError)
    with pytest.raises(openai.error.AuthenticationError):
        openai.Completion.create(model=MODEL, prompt="x", api_key="sk-wrong")
    openai.set_client(ThrottledClient(api_key="sk-test", base_url=server.base_url, retry=0))
    server.inject("503")
    with pytest.raises(openai.error.ServiceUnavailableError):
        openai.Completion.create(model=MODEL, prompt="x")
    server.inject("500")
    with pytest.raises(openai.error.APIError):
        openai.Completion.create(model=MODEL, prompt="x")
    with pytest.raises(openai.error.Timeout):
        server.inject("slow")
        openai.Completion.create(model=MODEL, prompt="x", request_timeout=0.2)
    import throttled_openai.legacy.error as error_module  # v0's `import openai.error` shape

    assert error_module.RateLimitError is openai.error.RateLimitError


def test_settings_are_read_at_call_time(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    assert openai.Completion.create(model=MODEL, prompt="a").choices[0].text == " echo:a#0"
    openai.api_key = "sk-wrong"
    with pytest.raises(openai.error.AuthenticationError):
        openai.Completion.create(model=MODEL, prompt="a")
    openai.api_key = "sk-other"
    assert openai.Completion.create(model=MODEL, prompt="b").choices[0].text == " echo:b#0"
    with FakeOpenAI() as second:
        openai.api_base = second.base_url
        openai.Completion.create(model=MODEL, prompt="c")
        assert second.stats()["admitted"] == 1
        openai.Completion.create(model=MODEL, prompt="d", api_base=server.base_url, api_key="sk-test")
        assert second.stats()["requests"] == 1
    # Unset module settings fall back to the environment, read now.
    openai.api_key = openai.api_base = None
    openai.set_client(None)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_API_BASE", server.base_url)
    assert openai.Completion.create(model=MODEL, prompt="e").choices[0].text == " echo:e#0"
    client = openai.get_client()
    assert client is not None and client.limiter is not None


def test_one_shared_client_for_concurrent_first_calls(server: FakeOpenAI) -> None:
    barrier = threading.Barrier(8)
    texts: list = []  # type: ignore[type-arg]

    def call(i: int) -> None:
        barrier.wait()
        texts.append(openai.Completion.create(model=MODEL, prompt=f"t{i}").choices[0].text)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(texts) == sorted(f" echo:t{i}#0" for i in range(8))
    client = openai.get_client()
    assert client is not None and client.stats().calls == 8  # every call went through one client


# -- regressions ---------------------------------------------------------------------------------


def test_per_call_settings_apply_to_that_call_only(server: FakeOpenAI) -> None:
    openai.api_key = openai.api_base = None  # nothing set: the per-call values must not become the defaults
    openai.Completion.create(
        model=MODEL, prompt="a", api_key="sk-test", api_base=server.base_url, organization="org-per-call"
    )
    assert server.requests_log[-1]["headers"].get("openai-organization") == "org-per-call"
    client = openai.get_client()  # built from the module settings and environment, not from that call
    assert client is not None and str(client.base_url).startswith("https://api.openai.com")
    with pytest.raises(openai.error.AuthenticationError):  # no key anywhere: v0 raised
        openai.Completion.create(model=MODEL, prompt="b", api_base=server.base_url)
    openai.api_key = "sk-test"
    openai.Completion.create(model=MODEL, prompt="c", api_base=server.base_url)
    assert "openai-organization" not in server.requests_log[-1]["headers"]
    assert server.stats()["requests"] == 2


def test_request_timeout_is_raised_at_once_not_retried(server: FakeOpenAI) -> None:
    server.inject("slow", count=5)
    with pytest.raises(openai.error.Timeout):
        openai.Completion.create(model=MODEL, prompt="x", request_timeout=0.3)
    assert server.stats()["requests"] == 1


def test_errors_carry_request_id_and_a_409_is_try_again(server: FakeOpenAI) -> None:
    server.inject("400")
    with pytest.raises(openai.error.InvalidRequestError) as bad:
        openai.Completion.create(model=MODEL, prompt="x")
    assert bad.value.request_id and bad.value.organization is None
    import http.server

    class Conflict(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            body = b'{"error": {"message": "busy", "type": "conflict"}}'
            self.send_response(409)
            for name, value in (("content-type", "application/json"), ("x-should-retry", "false")):
                self.send_header(name, value)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Conflict)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(openai.error.TryAgain) as again:
            openai.Completion.create(model=MODEL, prompt="x", api_base=f"http://127.0.0.1:{httpd.server_address[1]}/v1")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert again.value.http_status == 409 and str(again.value) == "busy"


# -- v0's other module settings ------------------------------------------------------------------


def _v0_settings_in_a_fresh_process(**env: str) -> Dict[str, Any]:
    """The module's v0 settings as a script reads them right after ``import``, with ``env`` set."""
    code = (
        "import json, throttled_openai.legacy as openai\n"
        f"names = {sorted(V0_DEFAULTS)!r}\n"
        "print(json.dumps({**{n: getattr(openai, n) for n in names}, 'aiosession': openai.aiosession.get()}))\n"
    )
    clean = {name: value for name, value in os.environ.items() if not name.startswith("OPENAI_")}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_v0_settings_read_as_v0_defined_them() -> None:
    assert _v0_settings_in_a_fresh_process() == {**V0_DEFAULTS, "aiosession": None}
    from_env = _v0_settings_in_a_fresh_process(OPENAI_API_KEY_PATH="/run/secrets/openai", OPENAI_API_TYPE="azure")
    assert from_env["api_key_path"] == "/run/secrets/openai"
    assert from_env["api_type"] == "azure" and from_env["api_version"] == "2023-03-15-preview"  # v0's Azure default


def test_api_key_path_is_read_at_every_call_before_api_key(server: FakeOpenAI, tmp_path: Path) -> None:
    key_file = tmp_path / "openai-key"
    key_file.write_text("sk-other\n")
    openai.api_key = "sk-wrong"
    openai.api_key_path = str(key_file)
    assert openai.Completion.create(model=MODEL, prompt="a").choices[0].text == " echo:a#0"  # the file's key
    key_file.write_text("sk-wrong")  # rotated in place: the next call reads the new key
    with pytest.raises(openai.error.AuthenticationError):
        openai.Completion.create(model=MODEL, prompt="b")
    assert openai.Completion.create(model=MODEL, prompt="c", api_key="sk-test").choices[0].text == " echo:c#0"
    key_file.write_text("  \n")
    with pytest.raises(openai.error.AuthenticationError) as empty:
        openai.Completion.create(model=MODEL, prompt="d")
    assert str(empty.value) == f"openai.api_key_path: {key_file} holds no API key (the file is empty)"
    openai.api_key_path = str(tmp_path / "missing")
    with pytest.raises(openai.error.AuthenticationError, match=r"cannot read an API key from .*missing"):
        openai.Completion.create(model=MODEL, prompt="e")
    assert openai.Completion.create(model=MODEL, prompt="e", api_key="sk-test").choices[0].text == " echo:e#0"
    openai.api_key_path = None  # back to api_key
    with pytest.raises(openai.error.AuthenticationError):
        openai.Completion.create(model=MODEL, prompt="f")
    assert server.stats()["admitted"] == 3


def test_api_version_is_sent_as_v0_sent_it(server: FakeOpenAI) -> None:
    openai.Completion.create(model=MODEL, prompt="a")
    assert "openai-version" not in server.requests_log[-1]["headers"]
    openai.api_version = "2020-11-07"
    openai.Completion.create(model=MODEL, prompt="a")
    assert server.requests_log[-1]["headers"]["openai-version"] == "2020-11-07"
    openai.ChatCompletion.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], api_version="v2")
    assert server.requests_log[-1]["headers"]["openai-version"] == "v2"
    assert "api_version" not in server.requests_log[-1]["body"]
    openai.Completion.create(model=MODEL, prompt="a", headers={"OpenAI-Version": "mine"})  # the call's headers win
    assert server.requests_log[-1]["headers"]["openai-version"] == "mine"


def test_api_type_open_ai_only_azure_names_the_v1_way(server: FakeOpenAI) -> None:
    for kind in ("open_ai", "openai", "OpenAI"):
        openai.api_type = kind
        assert openai.Completion.create(model=MODEL, prompt=kind).choices[0].text == f" echo:{kind}#0"
    sent = server.stats()["requests"]

    def azure(call: str) -> str:  # the v1 call of the resource used, never another's
        return (
            f"use {call} from openai>=1, with client = throttled_openai.ThrottledAzureClient(azure_endpoint=..., "
            f"api_version=..., rpm=..., tpm=...) (see {GUIDE})"
        )

    calls = [
        (
            lambda: openai.Completion.create(model=MODEL, prompt="x"),
            "client.completions.create(model=<deployment>, ...)",
        ),
        (
            lambda: openai.ChatCompletion.create(model="gpt-4o-mini", messages=[]),
            "client.chat.completions.create(model=<deployment>, ...)",
        ),
        (lambda: openai.Embedding.create(model=MODEL, input="x"), "client.embeddings.create(model=<deployment>, ...)"),
        (lambda: openai.Model.list(), "client.models.list()"),
        (lambda: openai.Model.retrieve("gpt-4o-mini"), "client.models.retrieve(...)"),
    ]
    for kind in ("azure", "azure_ad", "azuread"):
        openai.api_type = kind
        for call, v1 in calls:
            with pytest.raises(openai.NotSupportedError) as caught:
                call()
            assert str(caught.value) == f"throttled_openai.legacy does not support api_type={kind!r}; {azure(v1)}"
    openai.api_type = "open_ai"
    with pytest.raises(openai.NotSupportedError) as per_call:
        openai.ChatCompletion.create(model="gpt-4o-mini", messages=[], api_type="azure")
    assert str(per_call.value) == (
        "throttled_openai.legacy does not support api_type='azure'; "
        + azure("client.chat.completions.create(model=<deployment>, ...)")
    )
    with pytest.raises(openai.NotSupportedError) as deployment:
        openai.Completion.create(deployment_id="my-gpt", prompt="x")
    assert str(deployment.value) == "throttled_openai.legacy does not support deployment_id (Azure); " + azure(
        "client.completions.create(model=<deployment>, ...)"
    )
    assert not isinstance(deployment.value, openai.error.OpenAIError)  # v0 code catching those does not hide it
    openai.api_type = "bogus"
    with pytest.raises(openai.error.InvalidAPIType) as bad:
        openai.Completion.create(model=MODEL, prompt="x")
    assert str(bad.value) == "api_type 'bogus' is invalid: use 'open_ai' (Azure: ThrottledAzureClient)"
    assert isinstance(bad.value, openai.error.OpenAIError)
    assert server.stats()["requests"] == sent  # nothing was sent


class _ForwardProxy(http.server.BaseHTTPRequestHandler):
    """A forward HTTP proxy: relays absolute-form requests (``POST http://host:port/path``) and records them."""

    protocol_version = "HTTP/1.1"

    def _relay(self) -> None:
        target = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        hop = ("connection", "proxy-connection", "keep-alive", "host", "content-length", "transfer-encoding")
        headers = {name: value for name, value in self.headers.items() if name.lower() not in hop}
        self.server.seen.append(f"{self.command} {self.path}")  # type: ignore[attr-defined]
        upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        try:
            upstream.request(self.command, target.path + (f"?{target.query}" if target.query else ""), body, headers)
            reply = upstream.getresponse()
            data = reply.read()
        finally:
            upstream.close()
        self.send_response(reply.status)
        for name, value in reply.getheaders():
            if name.lower() not in hop:
                self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _relay

    def log_message(self, *args: Any) -> None:
        pass


class _Models(http.server.BaseHTTPRequestHandler):
    """``GET`` and ``DELETE /v1/models/{id}`` as OpenAI answers them (the fake server lists models only)."""

    def _answer(self, extra: Dict[str, Any]) -> None:
        model = urllib.parse.unquote(self.path.split("?")[0].rsplit("/", 1)[1])
        self.server.seen.append((self.command, self.path, self.headers.get("authorization")))  # type: ignore[attr-defined]
        data = json.dumps({"id": model, "object": "model", **extra}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer({"created": 1692901427, "owned_by": "my-org"})

    def do_DELETE(self) -> None:
        self._answer({"deleted": True})

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _http_server(handler: Type[http.server.BaseHTTPRequestHandler]) -> Iterator[Any]:
    """A real HTTP server on 127.0.0.1 with ``handler``; ``.seen`` collects what the handler records."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.seen = []  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_proxy_carries_every_request(server: FakeOpenAI) -> None:
    with _http_server(_ForwardProxy) as proxy_server:
        url = f"http://127.0.0.1:{proxy_server.server_address[1]}"
        seen: List[str] = proxy_server.seen
        openai.Completion.create(model=MODEL, prompt="direct")
        assert seen == []
        openai.proxy = url
        assert openai.Completion.create(model=MODEL, prompt="a").choices[0].text == " echo:a#0"
        assert seen == [f"POST {server.base_url}/completions"]
        openai.proxy = {"http": url}  # v0's dict form; the fake server is http://
        assert "gpt-4o-mini" in [model.id for model in openai.Model.list().data]
        assert seen[-1] == f"GET {server.base_url}/models"
        openai.proxy = {"https": url}  # https only: this http:// request goes direct
        openai.Completion.create(model=MODEL, prompt="b")
        openai.proxy = None
        openai.Completion.create(model=MODEL, prompt="c")
        assert len(seen) == 2
    sent = server.stats()["requests"]
    assert sent == 5  # four completions and the list of models, each once
    message = (
        "'openai.proxy' must be specified as either a string URL or a dict with string URL under the https "
        "and/or http keys."
    )
    for wrong in (8080, ["http://proxy"], {"socks": "socks5://proxy"}, {"https": 8080}):
        openai.proxy = wrong
        with pytest.raises(ValueError) as caught:
            openai.Completion.create(model=MODEL, prompt="x")
        assert str(caught.value) == message  # v0's own message
    openai.proxy = "proxy.example:3128"
    with pytest.raises(ValueError, match=r"^openai\.proxy: .*\(give a URL: http://host:port\)$"):
        openai.Completion.create(model=MODEL, prompt="x")
    openai.proxy = "http://127.0.0.1:9"
    openai.set_client(ThrottledClient(api_key="sk-test", base_url=server.base_url))
    with pytest.raises(openai.NotSupportedError) as given:
        openai.Completion.create(model=MODEL, prompt="x")
    assert str(given.value) == (
        "throttled_openai.legacy does not support openai.proxy with a client given to set_client(); use that "
        "client's own http_client: ThrottledClient(http_client=openai.DefaultHttpxClient(proxy=...)) "
        f"(see {GUIDE})"
    )
    assert server.stats()["requests"] == sent  # none of the refused calls was sent


def test_settings_without_effect_are_accepted_and_requestssession_is_refused(server: FakeOpenAI) -> None:
    openai.verify_ssl_certs, openai.enable_telemetry, openai.ca_bundle_path = False, True, "/etc/ssl/ca.pem"
    openai.app_info, openai.debug, openai.log = {"name": "my-app", "version": "1.0", "url": None}, True, "debug"
    assert openai.Completion.create(model=MODEL, prompt="a").choices[0].text == " echo:a#0"
    assert openai.aiosession.get() is None
    token = openai.aiosession.set("a session")  # v0 code sets it at start-up: that works
    assert openai.aiosession.get() == "a session"
    openai.aiosession.reset(token)
    openai.requestssession = object()
    with pytest.raises(openai.NotSupportedError) as caught:
        openai.Completion.create(model=MODEL, prompt="b")
    assert str(caught.value) == (
        "throttled_openai.legacy does not support openai.requestssession (a requests session); use "
        "set_client(ThrottledClient(http_client=httpx.Client(...))) with the same settings "
        f"(see {GUIDE})"
    )
    assert server.stats()["requests"] == 1


# -- Model -----------------------------------------------------------------------------------------


def test_model_list_returns_v0_model_objects(server: FakeOpenAI) -> None:
    models = openai.Model.list()
    assert type(models) is openai.OpenAIObject and models.object == "list"
    assert "gpt-4o-mini" in [model.id for model in models.data]
    assert all(type(model) is openai.Model for model in models.data)
    first = models.data[0]
    assert first.owned_by == first["owned_by"] and repr(first).startswith(f"<Model model id={first.id} at ")
    assert json.loads(json.dumps(models)) == models.to_dict()
    assert (server.requests_log[-1]["method"], server.requests_log[-1]["path"]) == ("GET", "/v1/models")
    client = openai.get_client()
    assert client is not None and client.stats().calls == 1  # through the shared, throttled client


def test_model_retrieve_and_delete(server: FakeOpenAI) -> None:
    name = "ft:gpt-3.5-turbo-0613:my-org:custom:7p4lURel"
    with _http_server(_Models) as models_server:
        base = f"http://127.0.0.1:{models_server.server_address[1]}/v1"
        model = openai.Model.retrieve(name, api_base=base)
        assert type(model) is openai.Model and model.id == name and model.owned_by == "my-org"
        deleted = openai.Model.delete(name, api_base=base, request_timeout=10)
        assert deleted.deleted is True and deleted.id == name
        assert models_server.seen == [
            ("GET", f"/v1/models/{name}", "Bearer sk-test"),
            ("DELETE", f"/v1/models/{name}", "Bearer sk-test"),
        ]
    for wrong in ("", "..", None):
        with pytest.raises(openai.error.InvalidRequestError, match="invalid model ID"):
            openai.Model.retrieve(wrong)
    assert server.stats()["requests"] == 0


# -- what is not supported -----------------------------------------------------------------------

# v0 calls this module does not offer, and the openai>=1 call each message must name.
NOT_SUPPORTED = {
    "Image.create": "client.images.generate(...)",
    "Image.create_edit": "client.images.edit(...)",
    "Image.create_variation": "client.images.create_variation(...)",
    "Audio.transcribe": "client.audio.transcriptions.create(...)",
    "Audio.translate": "client.audio.translations.create(...)",
    "File.create": "client.files.create(...)",
    "File.list": "client.files.list()",
    "File.retrieve": "client.files.retrieve(...)",
    "File.delete": "client.files.delete(...)",
    "File.download": "client.files.content(...)",
    "FineTuningJob.create": "client.fine_tuning.jobs.create(...)",
    "FineTuningJob.list_events": "client.fine_tuning.jobs.list_events(...)",
    "FineTune.create": "client.fine_tuning.jobs.create(...)",
    "FineTune.list": "client.fine_tuning.jobs.list()",
    "Edit.create": "client.chat.completions.create(...)",
    "Engine.list": "client.models.list()",
    "Engine.retrieve": "client.models.retrieve(...)",
    "Deployment.list": "throttled_openai.ThrottledAzureClient",
}


def test_unsupported_calls_raise_naming_the_v1_way(server: FakeOpenAI) -> None:
    with pytest.raises(openai.NotSupportedError) as image:
        openai.Image.create(prompt="a white siamese cat", n=1, size="1024x1024")
    assert str(image.value) == (
        "throttled_openai.legacy does not support Image.create; use client.images.generate(...) from openai>=1, "
        f"with client = throttled_openai.ThrottledClient() to keep it throttled (see {GUIDE})"
    )
    assert isinstance(image.value, NotImplementedError) and not isinstance(image.value, openai.error.OpenAIError)
    for call, v1 in NOT_SUPPORTED.items():
        resource, method = call.split(".")
        for name in (method, "a" + method):  # and v0's async twin
            with pytest.raises(openai.NotSupportedError) as caught:
                getattr(getattr(openai, resource), name)("x", model="m")
            message = str(caught.value)
            assert message.startswith(f"throttled_openai.legacy does not support {resource}.{name}; use "), message
            assert v1 in message and message.endswith(f"(see {GUIDE})"), message
    for name in openai.__all__:  # `from throttled_openai.legacy import *` works
        assert getattr(openai, name) is not None
    assert server.stats()["requests"] == 0


def test_acreate_is_not_supported_and_its_hint_works(server: FakeOpenAI) -> None:
    for resource, v1 in (
        (openai.Completion, "completions.create"),
        (openai.ChatCompletion, "chat.completions.create"),
        (openai.Embedding, "embeddings.create"),
        (openai.Moderation, "moderations.create"),
    ):
        name = resource.__name__
        with pytest.raises(openai.NotSupportedError) as caught:
            resource.acreate(model=MODEL, prompt="x")
        assert str(caught.value) == (
            f"throttled_openai.legacy does not support {name}.acreate (async calls); use await "
            f"asyncio.to_thread({name}.create, ...), which waits its turn in the same limiter, or await "
            f"client.{v1}(...) from openai>=1, with client = throttled_openai.AsyncThrottledClient() (its own "
            f"limiter, unless given limiter=) (see {GUIDE})"
        )
    for method in ("alist", "aretrieve", "adelete"):
        with pytest.raises(openai.NotSupportedError, match=rf"does not support Model\.{method} \(async calls\)"):
            getattr(openai.Model, method)("gpt-4o-mini")
    assert server.stats()["requests"] == 0

    async def main() -> List[Any]:  # the way the message gives
        calls = (asyncio.to_thread(openai.Completion.create, model=MODEL, prompt=f"p{i}") for i in range(4))
        return await asyncio.gather(*calls)

    results = asyncio.run(main())
    assert [result.choices[0].text for result in results] == [f" echo:p{i}#0" for i in range(4)]
