"""v0-style code runs against the fake server with nothing changed but ``import throttled_openai.legacy as openai``.

The functions marked "as in the guide" are the shapes of the Cookbook's rate-limit guide
(``../shared/seed/how-to-handle-rate-limits.ko.md``), written for openai<1.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any, Iterator

import backoff
import openai as openai_v1
import pytest
from tenacity import retry, stop_after_attempt, wait_random_exponential

import throttled_openai.legacy as openai
from throttled_openai import ThrottledClient
from throttled_openai.testing import FakeOpenAI

MODEL = "gpt-3.5-turbo-instruct"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    for name in ("OPENAI_API_KEY", "OPENAI_API_BASE", "OPENAI_BASE_URL", "OPENAI_ORGANIZATION"):
        monkeypatch.delenv(name, raising=False)
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
