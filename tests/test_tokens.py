"""Token estimates: exact with tiktoken, a character estimate without, never an exception."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from throttled_openai.tokens import TokenCounter, endpoint_of, estimate_cost, usage_tokens


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


def test_cl100k_counts_exactly(counter: TokenCounter) -> None:
    # conftest installs the offline cl100k_base file: counting is tiktoken's, not an estimate.
    assert counter.count("hello world", "gpt-3.5-turbo-instruct") == 2
    assert counter.count("", "gpt-4") == 0


def test_unloadable_encoding_falls_back_to_cl100k(counter: TokenCounter, caplog: pytest.LogCaptureFixture) -> None:
    # gpt-4o uses o200k_base, which cannot download here: cl100k_base stands in, without a warning.
    with caplog.at_level(logging.WARNING, logger="throttled_openai"):
        assert counter.count("hello world", "gpt-4o") == 2
    assert not caplog.records


def test_character_estimate_when_nothing_loads(caplog: pytest.LogCaptureFixture) -> None:
    bare = TokenCounter(fallback_encodings=())
    with caplog.at_level(logging.WARNING, logger="throttled_openai"):
        assert bare.count("x" * 40, "no-such-model") == 10
        assert bare.count("y" * 8, "no-such-model") == 2
    assert len(caplog.records) == 1  # one warning per model, not one per call
    assert "4 characters per token" in caplog.records[0].getMessage()


def test_without_tiktoken_installed_counting_still_works() -> None:
    code = (
        "import sys; sys.modules['tiktoken'] = None\n"
        "from throttled_openai.tokens import TokenCounter, estimate_cost\n"
        "c = TokenCounter()\n"
        "print(estimate_cost('completions', {'model': 'x', 'prompt': 'a' * 40, 'max_tokens': 5}, c))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "15"


def test_completions_cost_counts_every_prompt_and_sample(counter: TokenCounter) -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": ["hello world", "hello"], "n": 3, "max_tokens": 10}
    # "hello world": 2 tiktoken tokens but 11 characters, so 3 (never below one per 4 characters); "hello": 2
    assert estimate_cost("completions", body, counter) == (3 + 2) + 2 * 3 * 10
    assert estimate_cost("completions", {"model": "m", "prompt": [1, 2, 3]}, counter) == 3 + 16  # server default
    assert estimate_cost("completions", {"prompt": [[1, 2], [3]], "best_of": 4, "max_tokens": 1}, counter) == 3 + 8


def test_chat_cost_follows_the_cookbook(counter: TokenCounter) -> None:
    body = {
        "model": "gpt-4",
        "messages": [{"role": "system", "content": "hello world"}, {"role": "user", "content": "hello"}],
        "max_completion_tokens": 7,
        "n": 2,
    }
    # 2 + per message (4 + role + content), each text at least 1 per 4 characters:
    # (4 + 2 ["system"] + 3 ["hello world"]) + (4 + 1 ["user"] + 2 ["hello"]) = 18; plus 2 × 7
    assert estimate_cost("chat", body, counter) == 18 + 14
    parts = {"model": "gpt-4", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}
    assert estimate_cost("chat", parts, counter) == 2 + 4 + 1 + 2 + 1024


def test_embeddings_and_responses(counter: TokenCounter) -> None:
    assert estimate_cost("embeddings", {"model": "text-embedding-3-small", "input": ["hello", "world"]}, counter) == 4
    body = {"model": "gpt-4o", "input": "hello world", "instructions": "hello", "max_output_tokens": 5}
    assert estimate_cost("responses", body, counter) == 3 + 2 + 5


def test_admission_estimate_is_never_below_the_character_count(counter: TokenCounter) -> None:
    # OpenAI counts a request against TPM "based on the character count", not with tiktoken. A chat of
    # 24,400 characters is ~5,950 tiktoken tokens but ~6,100 by characters: it must be seen as too large
    # for 6,000 TPM at once, not after waiting a minute for the server to refuse it.
    text = "The quick brown fox jumps over the lazy dog. " * 542 + "Done."  # 24,395 characters
    assert counter.count(text, "gpt-4") < len(text) / 4  # tiktoken alone would count less
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    assert estimate_cost("chat", body, counter) >= len(text) / 4
    for endpoint, field in (("completions", "prompt"), ("embeddings", "input"), ("responses", "input")):
        assert estimate_cost(endpoint, {"model": "gpt-4", field: text}, counter) >= len(text) / 4
    # Text tiktoken counts higher (digits, CJK) keeps tiktoken's count.
    digits = "1234567890" * 100
    assert estimate_cost("embeddings", {"model": "gpt-4", "input": digits}, counter) == counter.count(digits, "gpt-4")


def test_other_endpoints_cost_no_tokens(counter: TokenCounter) -> None:
    assert endpoint_of("/models") is None
    assert estimate_cost(None, {"anything": 1}, counter) == 0
    assert endpoint_of("/chat/completions") == "chat"
    assert endpoint_of("/deployments/d1/completions?api-version=1") == "completions"


def test_odd_bodies_do_not_raise(counter: TokenCounter) -> None:
    for body in ({}, {"prompt": None}, {"messages": "hi"}, {"messages": [None, 3]}, {"max_tokens": "12"}):
        for endpoint in ("completions", "chat", "embeddings", "responses"):
            assert estimate_cost(endpoint, body, counter) >= 0


def test_usage_tokens() -> None:
    assert usage_tokens({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}) == 7
    assert usage_tokens({"input_tokens": 3, "output_tokens": 4}) == 7
    assert usage_tokens(None) is None
    assert usage_tokens({}) is None
