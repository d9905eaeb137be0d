"""Every response ends well: bodies that are not what they should be, streams settled and checked,
429s counted, HTTP clients closed. The real SDK over real HTTP against the fake server."""

from __future__ import annotations

import gc
import sys
from typing import Any, Iterator

import openai
import pytest

from throttled_openai import IncompleteStream, MalformedResponse, RateLimiter, Retry, ThrottledClient
from throttled_openai.testing import FakeOpenAI

KEY = "sk-responses-0123456789"
FAST = Retry(backoff_base=0.01, backoff_max=0.05)
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
INSTRUCT = "gpt-3.5-turbo-instruct"
needs_responses = pytest.mark.skipif(
    not hasattr(openai.OpenAI, "responses"), reason="the Responses API came with openai 1.66"
)

# Fault -> the kind it is counted as in stats().errors.
BODY_FAULTS = {
    "stream_cut": "malformed_response",  # a JSON body cut in half, its Content-Length matching the cut
    "empty_200": "malformed_response",
    "html_200": "malformed_response",
    "error_200": "malformed_response",
    "502_html": "gateway_error",
    "504_html": "gateway_error",
}


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(rpm=60_000, tpm=10_000_000) as fake:
        yield fake


def client_for(server: FakeOpenAI, **kwargs: Any) -> ThrottledClient:
    kwargs.setdefault("retry", FAST)
    return ThrottledClient(base_url=server.base_url, api_key=KEY, **kwargs)


@pytest.mark.parametrize("fault", sorted(BODY_FAULTS))
def test_a_bad_body_is_retried_in_a_plain_call(server: FakeOpenAI, fault: str) -> None:
    client = client_for(server)
    server.inject(fault, 2)
    reply = client.chat.completions.create(**CHAT)
    assert reply.choices[0].message.content == "echo:hello#0"
    stats = client.stats()
    assert stats.errors == {BODY_FAULTS[fault]: 2} and stats.retries == 2 and stats.failures == 0
    assert server.stats()["requests"] == 3


@pytest.mark.parametrize("fault", ["stream_cut", "empty_200", "html_200", "error_200"])
def test_a_bad_body_is_raised_as_malformed_once_the_policy_gives_up(server: FakeOpenAI, fault: str) -> None:
    client = client_for(server, retry=Retry(max_retries=1, backoff_base=0.01, backoff_max=0.02))
    server.inject(fault, 2)
    with pytest.raises(MalformedResponse) as info:
        client.chat.completions.create(**CHAT)
    assert info.value.status_code == 200 and isinstance(info.value, openai.APIError)
    assert KEY not in str(info.value)
    assert client.stats().failures == 1 and server.stats()["requests"] == 2


def test_raw_responses_are_checked_too(server: FakeOpenAI) -> None:
    client = client_for(server)
    server.inject("html_200", 1)
    raw = client.chat.completions.with_raw_response.create(**CHAT)
    assert raw.parse().choices[0].message.content == "echo:hello#0"
    assert client.stats().errors == {"malformed_response": 1}
    assert client.stats().tokens_used == raw.parse().usage.total_tokens


@pytest.mark.parametrize("fault", sorted(BODY_FAULTS))
def test_a_bad_body_loses_nothing_in_the_bulk_helpers(server: FakeOpenAI, fault: str) -> None:
    client = client_for(server)
    server.inject(fault, 3)
    prompts = [f"p{i}" for i in range(40)]
    choices = client.map_completions(prompts, model=INSTRUCT, max_tokens=2, batch_size=10)
    assert [c.text for c in choices] == [f" echo:{p}#0" for p in prompts]
    vectors = client.map_embeddings(prompts, model="text-embedding-3-small", batch_size=10)
    assert len(vectors) == 40 and all(vectors)
    assert sum(client.stats().errors.values()) == 3


def test_a_cut_chat_stream_raises_where_it_is_read(server: FakeOpenAI) -> None:
    client = client_for(server)
    server.inject("stream_cut", 1)
    stream = client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})
    with pytest.raises(IncompleteStream, match="final event"):
        for _ in stream:
            pass
    stats = client.stats()
    assert stats.errors == {"incomplete_stream": 1} and stats.failures == 1 and stats.tokens_used == 0
    # The next stream is whole, and settled against its usage.
    chunks = list(client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo:hello#0"
    assert client.stats().tokens_used == chunks[-1].usage.total_tokens > 0


def test_a_stream_left_early_is_settled_without_complaint(server: FakeOpenAI) -> None:
    client = client_for(server)
    with client.chat.completions.create(**CHAT, stream=True) as stream:
        next(iter(stream))
    assert client.stats().errors == {} and client.stats().failures == 0
    assert client.limiter.snapshot()["gpt-4o-mini"]["waiting"] == 0


@needs_responses
def test_a_streamed_responses_call_is_settled_against_its_usage(server: FakeOpenAI) -> None:
    client = client_for(server, limiter=RateLimiter(tpm=60_000, initial_burst=60.0))  # starts full: 60,000
    stream = client.responses.create(model="gpt-4o-mini", input="hello", max_output_tokens=4000, stream=True)
    events = list(stream)
    completed = [e for e in events if e.type == "response.completed"]
    assert len(completed) == 1
    used = completed[0].response.usage.total_tokens
    assert client.stats().tokens_used == used > 0
    # The ~4,000 tokens booked were given back, down to what was used (1,000 a second refill: a miss
    # would need 2.5 s to hide).
    assert client.limiter.snapshot()["gpt-4o-mini"]["tokens_level"] >= 60_000 - used - 1500


@needs_responses
def test_a_cut_responses_stream_raises_where_it_is_read(server: FakeOpenAI) -> None:
    client = client_for(server)
    server.inject("stream_cut", 1)
    with pytest.raises(IncompleteStream):
        for _ in client.responses.create(model="gpt-4o-mini", input="hello", max_output_tokens=5, stream=True):
            pass
    assert client.stats().errors == {"incomplete_stream": 1}


@pytest.mark.parametrize("stream", [False, True])
def test_with_streaming_response_is_settled_when_read(server: FakeOpenAI, stream: bool) -> None:
    client = client_for(server)
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    with client.chat.completions.with_streaming_response.create(**CHAT, **extra) as response:
        body = b"".join(response.iter_bytes())
    assert body
    used = client.stats().tokens_used
    assert used > 0  # settled against the usage in the body it streamed
    assert client.limiter.snapshot()["gpt-4o-mini"]["waiting"] == 0


def test_with_streaming_response_unread_keeps_the_estimate(server: FakeOpenAI) -> None:
    """A body closed unread shows no usage: the estimate stays charged (the server did the work)."""
    client = client_for(server, limiter=RateLimiter(tpm=60_000, initial_burst=60.0))
    with client.chat.completions.with_streaming_response.create(**{**CHAT, "max_tokens": 5000}) as response:
        assert response.status_code == 200
    assert client.stats().tokens_used == 0 and client.stats().tokens_reserved > 5000
    assert client.limiter.snapshot()["gpt-4o-mini"]["tokens_level"] <= 60_000 - 5000 + 1500


def test_every_429_counts_as_a_429(server: FakeOpenAI) -> None:
    """Retried or not, past max_retry_after or not: a 429 is counted under rate_limited."""
    impatient = client_for(server, retry=Retry(max_retry_after=0.05, backoff_base=0.01, backoff_max=0.02))
    server.inject("429", 1)  # asks for 0.2 s: more than max_retry_after, so raised at once
    with pytest.raises(openai.RateLimitError):
        impatient.chat.completions.create(**CHAT)
    assert impatient.stats().rate_limited == {"rate_limit_requests": 1} and impatient.stats().errors == {}
    no_retries = client_for(server, retry=Retry(max_retries=0))
    server.inject("429", 1)
    with pytest.raises(openai.RateLimitError):
        no_retries.chat.completions.create(**CHAT)
    assert no_retries.stats().total_429s == 1 and no_retries.stats().errors == {}


def test_a_client_closes_the_http_client_it_made(server: FakeOpenAI) -> None:
    with client_for(server) as client:
        client.chat.completions.create(**CHAT)
    assert client.is_closed()
    # Garbage collected without close(): the HTTP client it made closes itself when collected (the SDK's
    # clients sit in reference cycles, so the cycle collector finalizes them), as the SDK's own does.
    client = client_for(server)
    client.chat.completions.create(**CHAT)
    http = client._client  # the SDK's attribute for it
    del client
    gc.collect()
    assert not http.is_closed  # still referenced here: nothing closed it early
    http.__del__()  # what collecting it does
    assert http.is_closed


def test_a_client_leaves_an_http_client_it_was_given_open(server: FakeOpenAI) -> None:
    http = openai.DefaultHttpxClient()
    client = client_for(server, http_client=http)
    client.chat.completions.create(**CHAT)
    del client
    gc.collect()
    assert not http.is_closed
    again = client_for(server, http_client=http)
    again.chat.completions.create(**CHAT)
    http.close()


def test_a_parse_that_fails_on_a_whole_answer_is_the_callers_not_retried(server: FakeOpenAI) -> None:
    """parse() with a schema the answer does not fit raises pydantic's error (a ValueError) from inside
    the SDK: a whole JSON answer, so not a malformed body: raised at once, as by the plain SDK."""
    import pydantic

    class Verdict(pydantic.BaseModel):
        verdict: str

    client = client_for(server)
    completions = client.chat.completions
    parse = getattr(completions, "parse", None) or client.beta.chat.completions.parse  # moved in openai 1.92
    with pytest.raises(ValueError) as info:
        parse(**CHAT, response_format=Verdict)  # the fake answers "echo:hello#0": not a Verdict
    assert not isinstance(info.value, MalformedResponse)
    assert server.stats()["requests"] == 1 and client.stats().errors == {}


def test_text_from_an_endpoint_that_may_answer_text_is_not_a_fault() -> None:
    """An SRT transcript comes back as a str (openai 1.x casts it to Transcription); only a token-bearing
    endpoint's answer, or an HTML page, is judged."""
    from openai.types.audio import Transcription

    from throttled_openai.client import _examine

    http = next(
        sys.modules[c.__module__.split(".")[0]]
        for c in openai.DefaultHttpxClient.__mro__
        if c.__module__.startswith("httpx")
    )
    request = http.Request("POST", "http://127.0.0.1/v1/audio/transcriptions")
    srt = http.Response(200, text="1\n00:00:00,000 --> 00:00:01,000\nhi\n", request=request)
    assert _examine(srt.text, Transcription, srt, None) is None
    page = http.Response(200, html="<html>log in</html>", request=request)
    with pytest.raises(MalformedResponse, match="text/html"):
        _examine(page.text, Transcription, page, None)


def test_an_error_event_in_a_stream_is_counted(server: FakeOpenAI) -> None:
    client = client_for(server)
    server.inject("error_200", 1)  # for a stream: an event-stream whose only event is {"error": ...}
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(**CHAT, stream=True):
            pass
    assert client.stats().errors == {"stream_error": 1} and client.stats().failures == 1
