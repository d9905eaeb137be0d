"""The endpoints: what each one accepts (validation, token counts, admission cost) and answers."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union, cast

from .counting import count_tokens
from .formats import JSONDict
from .model import _Job
from .replies import _json_reply, _Reply, _sse, _sse_reply


@dataclass(frozen=True)
class _Env:
    """What the endpoints take from the server that runs them."""

    completion_tokens: int  # tokens each generated choice uses: min(max_tokens, completion_tokens)
    context_length: Optional[int]  # legacy completions' context window; None = unchecked
    next_id: Callable[[], int]  # a fresh number, for response ids
    shuffled: Callable[[List[Any]], List[Any]]  # the list, shuffled in place when the server shuffles


def _content_text(content: Any) -> str:
    """Text of a message ``content``: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


class _BadRequest(Exception):
    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _int_param(body: JSONDict, name: str, default: int, minimum: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _BadRequest(f"Invalid '{name}': expected an integer >= {minimum}, got {value!r}.", name)
    return value


def _is_tokens(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _text_size(items: List[Tuple[Union[str, List[int]], int]]) -> Tuple[int, int]:
    """(characters of the string items, token ids in the token-id items) of split inputs."""
    chars = sum(len(item) for item, _ in items if isinstance(item, str))
    return chars, sum(tokens for item, tokens in items if not isinstance(item, str))


def _split_inputs(value: Any, param: str) -> List[Tuple[Union[str, List[int]], int]]:
    """Split a prompt/input (str, [str], [int] or [[int]]) into (item, token count) pairs."""
    if isinstance(value, str):
        return [(value, count_tokens(value))]
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return [(x, count_tokens(x)) for x in value]
        if _is_tokens(value):
            return [(cast(List[int], value), len(value))]
        if all(_is_tokens(x) for x in value):
            return [(x, len(x)) for x in value]
    raise _BadRequest(
        f"Invalid type for '{param}': expected a string, a list of strings, a list of integers "
        "or a list of lists of integers.",
        param,
    )


def _embedding(item: Union[str, List[int]], dims: int) -> List[float]:
    """Deterministic pseudo-embedding from a hash of the input, exactly representable in float32."""
    seed = (item if isinstance(item, str) else json.dumps(item)).encode()
    raw = b""
    block = 0
    while len(raw) < 4 * dims:
        raw += hashlib.sha256(seed + block.to_bytes(4, "little")).digest()
        block += 1
    ints = struct.unpack(f"<{dims}I", raw[: 4 * dims])
    floats = [i / 2**31 - 1.0 for i in ints]
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *floats)))


def _usage(prompt: int, completion: int) -> JSONDict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


_DELTA_CHARS = 4  # characters of text per response.output_text.delta event of a streamed response


def _output_text(text: str) -> JSONDict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(item_id: str, status: str, content: List[JSONDict]) -> JSONDict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _response_events(response: JSONDict, text: str) -> List[bytes]:
    """The server-sent events of a streamed Responses API answer, as OpenAI sends them.

    ``response`` is the completed response, with one message of one ``output_text`` part,
    ``text``.  Events: ``response.created`` and ``response.in_progress`` (the response with
    status ``in_progress``, no output, ``usage`` null), ``response.output_item.added`` (the
    message, ``in_progress``, no content), ``response.content_part.added`` (an empty
    ``output_text``), one ``response.output_text.delta`` per 4 characters of ``text``,
    ``response.output_text.done``, ``response.content_part.done``,
    ``response.output_item.done`` (the completed message) and ``response.completed`` (the whole
    response, with ``usage``).  Each is ``event: <type>`` and ``data: <JSON>`` whose JSON
    carries ``type`` and ``sequence_number`` (0, 1, ...).  No ``data: [DONE]`` follows.
    """
    message = response["output"][0]
    started = {**response, "status": "in_progress", "output": [], "usage": None}
    at = {"item_id": message["id"], "output_index": 0, "content_index": 0}
    deltas = [text[i : i + _DELTA_CHARS] for i in range(0, len(text), _DELTA_CHARS)]
    events: List[Tuple[str, JSONDict]] = [
        ("response.created", {"response": started}),
        ("response.in_progress", {"response": started}),
        ("response.output_item.added", {"output_index": 0, "item": _message(message["id"], "in_progress", [])}),
        ("response.content_part.added", {**at, "part": _output_text("")}),
        *[("response.output_text.delta", {**at, "delta": delta, "logprobs": []}) for delta in deltas],
        ("response.output_text.done", {**at, "text": text, "logprobs": []}),
        ("response.content_part.done", {**at, "part": _output_text(text)}),
        ("response.output_item.done", {"output_index": 0, "item": message}),
        ("response.completed", {"response": response}),
    ]
    return [_sse({"type": name, "sequence_number": i, **data}, name) for i, (name, data) in enumerate(events)]


def _completions(body: JSONDict, model: str, env: _Env) -> _Job:
    if body.get("prompt") is None:
        raise _BadRequest("Missing required parameter: 'prompt'.", "prompt")
    if body.get("stream"):
        raise _BadRequest("FakeOpenAI does not support stream for completions.", "stream")
    prompts = _split_inputs(body["prompt"], "prompt")
    n = _int_param(body, "n", 1, 1)
    max_tokens = _int_param(body, "max_tokens", 16, 0)
    prompt_tokens = sum(tokens for _, tokens in prompts)
    if env.context_length is not None:
        for _, tokens in prompts:
            if tokens + max_tokens > env.context_length:
                raise _BadRequest(
                    f"This model's maximum context length is {env.context_length} tokens, however you "
                    f"requested {tokens + max_tokens} tokens ({tokens} in your prompt; {max_tokens} for the "
                    "completion). Please reduce your prompt; or completion length.",
                    "prompt",
                )
    completion = len(prompts) * n * min(max_tokens, env.completion_tokens)
    texts = [p if isinstance(p, str) else str(p[:8]) for p, _ in prompts]

    def render(fault: str) -> _Reply:
        choices = [
            {"index": i * n + j, "text": f" echo:{text[:40]}#{j}", "logprobs": None, "finish_reason": "length"}
            for i, text in enumerate(texts)
            for j in range(n)
        ]
        return _json_reply(
            200,
            {
                "id": f"cmpl-{env.next_id()}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": _damage(env.shuffled(choices), fault),
                "usage": _usage(prompt_tokens, completion),
            },
        )

    chars, ids = _text_size(prompts)
    output = len(prompts) * n * max_tokens
    return _Job(model, prompt_tokens, chars, ids, output, prompt_tokens + completion, render)


def _chat_completions(body: JSONDict, model: str, env: _Env) -> _Job:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("Missing required parameter: 'messages'.", "messages")
    prompt_tokens, chars = 3, 0
    for message in messages:
        if not isinstance(message, dict):
            raise _BadRequest("Invalid type for 'messages': expected a list of objects.", "messages")
        prompt_tokens += 3
        for name, value in message.items():
            text = value if isinstance(value, str) else _content_text(value) if name == "content" else ""
            prompt_tokens += count_tokens(text)
            chars += len(text)
    n = _int_param(body, "n", 1, 1)
    if body.get("max_completion_tokens") is not None:
        max_tokens = _int_param(body, "max_completion_tokens", 1024, 0)
    else:
        max_tokens = _int_param(body, "max_tokens", 1024, 0)
    per_choice = min(max_tokens, env.completion_tokens)
    text = _content_text(messages[-1].get("content"))[:40]
    stream = bool(body.get("stream"))
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

    def render(fault: str) -> _Reply:
        base = {"id": f"chatcmpl-{env.next_id()}", "created": int(time.time()), "model": model}
        usage = _usage(prompt_tokens, n * per_choice)
        order = env.shuffled(list(range(n)))
        if not stream:
            choices = [
                {
                    "index": j,
                    "message": {"role": "assistant", "content": f"echo:{text}#{j}"},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
                for j in order
            ]
            payload = {**base, "object": "chat.completion", "choices": _damage(choices, fault)}
            return _json_reply(200, {**payload, "usage": usage})
        chunk: JSONDict = {**base, "object": "chat.completion.chunk"}
        if include_usage:
            chunk["usage"] = None
        events = [
            {
                **chunk,
                "choices": [
                    {
                        "index": j,
                        "delta": {"role": "assistant", "content": f"echo:{text}#{j}"},
                        "finish_reason": None,
                        "logprobs": None,
                    }
                ],
            }
            for j in order
        ]
        final = [{"index": j, "delta": {}, "finish_reason": "stop", "logprobs": None} for j in order]
        events.append({**chunk, "choices": final})
        if include_usage:
            events.append({**chunk, "choices": [], "usage": usage})
        return _sse_reply([*map(_sse, events), b"data: [DONE]\n\n"])

    return _Job(model, prompt_tokens, chars, 0, n * max_tokens, prompt_tokens + n * per_choice, render)


def _embeddings(body: JSONDict, model: str, env: _Env) -> _Job:
    if body.get("input") is None:
        raise _BadRequest("Missing required parameter: 'input'.", "input")
    inputs = _split_inputs(body["input"], "input")
    dims = _int_param(body, "dimensions", 8, 1)
    if dims > 8192:
        raise _BadRequest("Invalid 'dimensions': at most 8192.", "dimensions")
    as_base64 = body.get("encoding_format") == "base64"
    tokens = sum(t for _, t in inputs)

    def render(fault: str) -> _Reply:
        data = []
        for i, (item, _) in enumerate(inputs):
            vector = _embedding(item, dims)
            encoded: Any = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode() if as_base64 else vector
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        payload = {
            "object": "list",
            "data": _damage(env.shuffled(data), fault),
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return _json_reply(200, payload)

    chars, ids = _text_size(inputs)
    return _Job(model, tokens, chars, ids, 0, tokens, render)


def _responses(body: JSONDict, model: str, env: _Env) -> _Job:
    inp = body.get("input")
    if isinstance(inp, str):
        input_tokens, text, chars = count_tokens(inp), inp, len(inp)
    elif isinstance(inp, list) and inp:
        input_tokens, text, chars = 0, "", 0
        for item in inp:
            if not isinstance(item, (str, dict)):
                raise _BadRequest("Invalid type for 'input': expected a list of input items.", "input")
            text = item if isinstance(item, str) else _content_text(item.get("content"))
            input_tokens += count_tokens(text) + (3 if isinstance(item, dict) else 0)
            chars += len(text)
    else:
        raise _BadRequest("Missing required parameter: 'input'.", "input")
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        input_tokens += count_tokens(instructions)
        chars += len(instructions)
    max_output = _int_param(body, "max_output_tokens", 1024, 0)
    output_tokens = min(max_output, env.completion_tokens)
    stream = bool(body.get("stream"))

    def render(fault: str) -> _Reply:
        rid = env.next_id()
        answer = f"echo:{text[:40]}"
        payload: JSONDict = {
            "id": f"resp_{rid}",
            "object": "response",
            "created_at": int(time.time()),
            "model": model,
            "status": "completed",
            "error": None,
            "incomplete_details": None,
            "instructions": instructions,
            "max_output_tokens": max_output,
            "metadata": {},
            "output": [_message(f"msg_{rid}", "completed", [_output_text(answer)])],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }
        return _sse_reply(_response_events(payload, answer)) if stream else _json_reply(200, payload)

    return _Job(model, input_tokens, chars, 0, max_output, input_tokens + output_tokens, render)


def _damage(items: List[JSONDict], fault: str) -> List[JSONDict]:
    """Apply the ``missing_choice`` / ``duplicate_choice`` faults to choices or embeddings."""
    if fault == "missing_choice" and items:
        return items[:-1]
    if fault == "duplicate_choice" and items:
        return [*items, dict(items[0])]
    return items


#: endpoint (the path after ``/v1/``) -> the function that validates a request and makes its job
_JOBS: Dict[str, Callable[[JSONDict, str, _Env], _Job]] = {
    "completions": _completions,
    "chat/completions": _chat_completions,
    "embeddings": _embeddings,
    "responses": _responses,
}
