"""The openai SDK surfaces ThrottledClient relies on. If one of these fails after an SDK upgrade, the
throttling would silently stop working: fix client.py before anything else.

- ``OpenAI.request(cast_to, options, *, stream, stream_cls)``: every resource call goes through it.
- ``options.json_data`` / ``options.url``: the request body (a dict) and path, read to price the call.
- ``copy(..., _extra_kwargs=...)``: how copies receive the shared limiter, policy and counters.
- ``http_client.event_hooks["response"]``: public httpx/httpx2 API, where the headers are read.
- ``response.stream``: public httpx/httpx2 API (the body stream), wrapped to read a stream's usage.
- ``options.max_retries``: set to 0 on each request, so the SDK's retries stay off while the client's
  ``max_retries`` attribute reports the policy's.
- ``options.headers["X-Stainless-Raw-Response"] == "stream"``: how ``with_streaming_response`` marks a
  request whose body it hands over unread (settled when read, not at once).
- A 2xx body that is not JSON: the SDK raises ``ValueError`` (JSONDecodeError) for a broken JSON body and
  returns the text for a non-JSON content type; both are caught and retried as ``MalformedResponse``.
- ``openai.APIResponseValidationError(response, body, message=)``, the base of ``MalformedResponse``.
- ``openai.DefaultHttpxClient`` can be subclassed (the client's own HTTP client closes itself).
- Each ``create`` the bulk helpers call has a signature naming the arguments it takes.
- The asyncio client (``AsyncThrottledClient``) relies on the same surfaces of ``openai.AsyncOpenAI``:
  ``async def request(cast_to, options, *, stream, stream_cls)`` (openai 1.40 adds ``remaining_retries``),
  ``copy(..., _extra_kwargs=...)`` on ``AsyncOpenAI`` and ``AsyncAzureOpenAI``, a subclassable
  ``openai.DefaultAsyncHttpxClient`` whose ``event_hooks`` (request and response) are *awaited*,
  ``response.stream`` an ``AsyncByteStream`` of the response's library (httpx or httpx2), ``close()`` a
  coroutine that closes the HTTP client, and the ``X-Stainless-Raw-Response: stream`` marker.
- The Batch API route: ``files.create(file=(name, data, type), purpose=)``, ``batches.create``,
  ``retrieve``, ``list`` (auto-paging), ``cancel``, ``files.with_streaming_response.content`` read with
  ``iter_bytes()``, and ``construct()`` to build ``ChatCompletion`` / ``CompletionChoice`` from dicts.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from typing import Any, List

import openai
import pytest
from openai._models import FinalRequestOptions

from throttled_openai import AsyncThrottledClient, ThrottledClient
from throttled_openai.testing import FakeOpenAI


def test_request_signature() -> None:
    params = inspect.signature(openai.OpenAI.request).parameters
    assert list(params)[:3] == ["self", "cast_to", "options"], "SDK changed OpenAI.request's positional arguments"
    assert "stream" in params and params["stream"].kind is inspect.Parameter.KEYWORD_ONLY


def test_request_options_fields() -> None:
    fields = getattr(FinalRequestOptions, "model_fields", None) or FinalRequestOptions.__fields__
    for name in ("json_data", "url", "method", "max_retries", "headers"):
        assert name in fields, f"SDK's FinalRequestOptions lost {name!r}"


@pytest.mark.parametrize("cls", [openai.OpenAI, openai.AzureOpenAI, openai.AsyncOpenAI, openai.AsyncAzureOpenAI])
def test_copy_accepts_extra_kwargs(cls: type) -> None:
    params = inspect.signature(cls.copy).parameters
    assert "_extra_kwargs" in params, f"{cls.__name__}.copy no longer takes _extra_kwargs"
    assert cls.with_options is cls.copy


def test_default_http_client_has_settable_event_hooks() -> None:
    client = openai.DefaultHttpxClient()
    hooks = client.event_hooks
    assert "response" in hooks
    client.event_hooks = {**hooks, "response": [*hooks["response"], print]}
    assert print in client.event_hooks["response"]
    client.close()


def test_the_override_and_the_hook_are_both_reached() -> None:
    with FakeOpenAI(rpm=1234, tpm=56789) as server:
        client = ThrottledClient(base_url=server.base_url, api_key="sk-contract")
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert client.stats().calls == 1, "ThrottledClient.request was bypassed by the SDK"
        state = client.limiter.snapshot()["m"]
        assert (state["requests_limit"], state["tokens_limit"]) == (1234, 56789), "the response hook never ran"
        copied = client.with_options(timeout=3)
        assert copied.limiter is client.limiter, "copy() did not pass the limiter on"
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        used = [chunk.usage.total_tokens for chunk in stream if chunk.usage is not None]
        assert client.stats().tokens_used == 2 * used[0] if used else False, "the stream's body was not scanned"


def test_with_streaming_response_marks_the_request() -> None:
    seen = []

    class Spy(ThrottledClient):
        def request(self, cast_to, options, *args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(dict(options.headers) if isinstance(options.headers, dict) else {})
            return super().request(cast_to, options, *args, **kwargs)

    with FakeOpenAI() as server:
        client = Spy(base_url=server.base_url, api_key="sk-contract")
        with client.chat.completions.with_streaming_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        ) as response:
            response.read()
    assert seen and seen[0].get("X-Stainless-Raw-Response") == "stream"


@pytest.mark.parametrize(("fault", "outcome"), [("stream_cut", ValueError), ("html_200", str)])
def test_a_2xx_body_that_is_not_json_reaches_request(fault: str, outcome: type) -> None:
    """What the plain SDK does with such a body (with retries off): what ThrottledClient.request sees."""
    with FakeOpenAI() as server:
        plain = openai.OpenAI(base_url=server.base_url, api_key="sk-contract", max_retries=0)
        server.inject(fault, 1)
        try:
            got: object = plain.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        except ValueError as error:
            got = error
        plain.close()
    assert isinstance(got, outcome), got


def test_response_validation_error_signature() -> None:
    import sys

    # httpx, or httpx2 for openai 3.x: the library of the SDK's own client
    http = next(
        sys.modules[c.__module__.split(".")[0]]
        for c in openai.DefaultHttpxClient.__mro__
        if c.__module__.startswith("httpx")
    )
    response = http.Response(200, request=http.Request("POST", "http://127.0.0.1/v1/x"))
    error = openai.APIResponseValidationError(response, None, message="m")
    assert (error.status_code, error.message, error.response) == (200, "m", response)


def test_bulk_create_methods_name_their_arguments() -> None:
    client = openai.OpenAI(api_key="sk-contract", base_url="http://127.0.0.1:9/v1")
    for create, names in (
        (client.completions.create, {"prompt", "model", "max_tokens", "timeout", "extra_body"}),
        (client.chat.completions.create, {"messages", "model", "max_tokens", "timeout", "extra_body"}),
        (client.embeddings.create, {"input", "model", "timeout", "extra_body"}),
    ):
        parameters = inspect.signature(create).parameters
        assert names <= set(parameters), f"{create} lost {names - set(parameters)}"
        assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    client.close()


def test_the_batch_and_files_surfaces_the_batch_api_route_uses() -> None:
    """batch_api.py calls these, by these names; the files' content is read in blocks."""
    for method, names in [
        (openai.resources.Batches.create, {"input_file_id", "endpoint", "completion_window", "metadata"}),
        (openai.resources.Batches.list, {"after", "limit"}),
        (openai.resources.Files.create, {"file", "purpose"}),
    ]:
        assert names <= set(inspect.signature(method).parameters), method
    with FakeOpenAI(batch_speed=1000, batch_validation_seconds=0.01, batch_finalizing_seconds=0.01) as server:
        client = ThrottledClient(base_url=server.base_url, api_key="sk-test")
        line = b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}\n'
        uploaded = client.files.create(file=("in.jsonl", line, "application/jsonl"), purpose="batch")
        batch = client.with_options(max_retries=0).batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h", metadata={"k": "v"}
        )
        assert [b.id for b in client.batches.list(limit=100)] == [batch.id] and batch.metadata == {"k": "v"}
        while batch.status not in ("completed", "failed"):
            batch = client.batches.retrieve(batch.id)
            counts = batch.request_counts
        assert batch.status == "completed" and counts is not None and counts.completed == 1
        assert batch.errors is None and batch.output_file_id
        with client.files.with_streaming_response.content(batch.output_file_id) as response:
            data = b"".join(response.iter_bytes())
        assert b'"custom_id":"a"' in data.replace(b" ", b"")


def test_sdk_models_build_from_a_dict_with_construct() -> None:
    """BatchJob.results() turns response bodies into the types map_* gives, nested models included."""
    from openai.types import CompletionChoice
    from openai.types.chat import ChatCompletion

    body = {"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}]}  # fmt: skip
    completion = ChatCompletion.construct(**body)
    assert completion.choices[0].message.content == "hi"
    choice = CompletionChoice.construct(index=0, text="t", finish_reason="stop", logprobs=None)
    assert choice.text == "t"


# -- the asyncio client ------------------------------------------------------------------------------


def _library_of(cls: type) -> Any:
    """httpx, or httpx2 for openai 3.x: the HTTP library a class of the SDK's is built on."""
    return next(sys.modules[c.__module__.split(".")[0]] for c in cls.__mro__ if c.__module__.startswith("httpx"))


def test_async_request_signature() -> None:
    request = openai.AsyncOpenAI.request
    assert inspect.iscoroutinefunction(request), "AsyncOpenAI.request is no longer a coroutine function"
    params = inspect.signature(request).parameters
    assert list(params)[:3] == ["self", "cast_to", "options"], "SDK changed AsyncOpenAI.request's positional arguments"
    rest = {name: p for name, p in params.items() if name not in ("self", "cast_to", "options")}
    assert "stream" in rest and set(rest) <= {"stream", "stream_cls", "remaining_retries"}, sorted(rest)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest.values())
    assert inspect.iscoroutinefunction(openai.AsyncOpenAI.close), "AsyncOpenAI.close is not awaited any more"


def test_default_async_http_client_is_subclassable_with_settable_hooks() -> None:
    library = _library_of(openai.DefaultAsyncHttpxClient)
    assert issubclass(openai.DefaultAsyncHttpxClient, library.AsyncClient)
    assert hasattr(library, "AsyncByteStream") and hasattr(library, "SyncByteStream")

    class Mine(openai.DefaultAsyncHttpxClient):  # type: ignore[misc, valid-type]
        pass

    async def body() -> None:
        client = Mine()
        hooks = client.event_hooks
        assert set(hooks) >= {"request", "response"}
        client.event_hooks = {**hooks, "response": [*hooks["response"], print]}
        assert print in client.event_hooks["response"] and not client.is_closed
        await client.aclose()
        assert client.is_closed

    asyncio.run(body())


def test_async_hooks_are_awaited_in_the_calling_task_with_an_async_byte_stream() -> None:
    """AsyncClient awaits each request and response hook (a plain function would fail there), in the task
    that sends, before the body is read; response.stream is the library's AsyncByteStream."""
    seen: List[str] = []

    async def on_request(request: Any) -> None:
        seen.append(f"request {asyncio.current_task() is task}")

    async def on_response(response: Any) -> None:
        library = _library_of(type(response))
        seen.append(f"response {asyncio.current_task() is task} {isinstance(response.stream, library.AsyncByteStream)}")

    async def body() -> None:
        http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [on_request], "response": [on_response]})
        plain = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-contract", http_client=http, max_retries=0)
        await plain.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        await plain.close()
        assert http.is_closed, "AsyncOpenAI.close() no longer closes its HTTP client"

    with FakeOpenAI() as server:
        task = None

        async def main() -> None:
            nonlocal task
            task = asyncio.current_task()
            await body()

        asyncio.run(main())
    assert seen == ["request True", "response True True"]


def test_the_async_override_and_hooks_are_reached() -> None:
    async def body() -> None:
        async with AsyncThrottledClient(base_url=server.base_url, api_key="sk-contract") as client:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
            assert client.stats().calls == 1, "AsyncThrottledClient.request was bypassed by the SDK"
            state = client.limiter.snapshot()["m"]
            assert (state["requests_limit"], state["tokens_limit"]) == (1234, 56789), "the response hook never ran"
            assert client.with_options(timeout=3).limiter is client.limiter, "copy() did not pass the limiter on"
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            used = [chunk.usage.total_tokens async for chunk in stream if chunk.usage is not None]
            assert used and client.stats().tokens_used == 2 * used[0], "the stream's body was not scanned"

    with FakeOpenAI(rpm=1234, tpm=56789) as server:
        asyncio.run(body())


def test_async_with_streaming_response_marks_the_request() -> None:
    seen = []

    class Spy(AsyncThrottledClient):
        async def request(self, cast_to, options, *args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(dict(options.headers) if isinstance(options.headers, dict) else {})
            return await super().request(cast_to, options, *args, **kwargs)

    async def body() -> None:
        client = Spy(base_url=server.base_url, api_key="sk-contract")
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with client, client.chat.completions.with_streaming_response.create(**chat) as response:
            await response.read()

    with FakeOpenAI() as server:
        asyncio.run(body())
    assert seen and seen[0].get("X-Stainless-Raw-Response") == "stream"
