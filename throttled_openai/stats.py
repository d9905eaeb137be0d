"""Counters of what a client family (a client and its ``copy()``/``with_options()``) did."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Mapping

__all__ = ["Stats", "StatsSnapshot"]


@dataclass(frozen=True)
class StatsSnapshot:
    """A consistent copy of the counters at one moment.

    ``calls``: API calls made through the client; ``requests``: HTTP attempts sent (calls + retries);
    ``retries``; ``failures``: calls that ended in an exception; ``rate_limited``: every 429 received,
    retried or not, by kind (``rate_limit_requests``, ``rate_limit_tokens``, ``rate_limit_other``,
    ``quota``, ``too_large``); ``errors``: other failed attempts by kind (``server_error``,
    ``gateway_error``, ``timeout``, ``connection``, ``malformed_response``, ``incomplete_stream``,
    ``status_400``, ...); ``tokens_reserved``: estimated tokens booked per attempt;
    ``tokens_used``: tokens the responses' ``usage`` reported; ``wait_seconds`` / ``max_wait_seconds``:
    total and longest time one attempt waited for capacity or backoff; ``limits``: per model, the
    limiter's view of its limits when the snapshot was taken (:meth:`RateLimiter.snapshot`: each
    limit's window and source, budgets, the cost factor); empty from :class:`Stats` itself.
    """

    calls: int = 0
    requests: int = 0
    retries: int = 0
    failures: int = 0
    rate_limited: Mapping[str, int] = field(default_factory=dict)
    errors: Mapping[str, int] = field(default_factory=dict)
    tokens_reserved: int = 0
    tokens_used: int = 0
    wait_seconds: float = 0.0
    max_wait_seconds: float = 0.0
    limits: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def total_429s(self) -> int:
        return sum(self.rate_limited.values())


class Stats:
    """Thread-safe counters; :meth:`snapshot` returns a :class:`StatsSnapshot`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snap = StatsSnapshot()
        self._rate_limited: Dict[str, int] = {}
        self._errors: Dict[str, int] = {}

    def call(self) -> None:
        with self._lock:
            self._snap = replace(self._snap, calls=self._snap.calls + 1)

    def attempt(self, tokens: int, waited: float) -> None:
        with self._lock:
            snap = self._snap
            self._snap = replace(
                snap,
                requests=snap.requests + 1,
                tokens_reserved=snap.tokens_reserved + tokens,
                wait_seconds=snap.wait_seconds + waited,
                max_wait_seconds=max(snap.max_wait_seconds, waited),
            )

    def waited(self, seconds: float) -> None:
        with self._lock:
            snap = self._snap
            self._snap = replace(
                snap, wait_seconds=snap.wait_seconds + seconds, max_wait_seconds=max(snap.max_wait_seconds, seconds)
            )

    def used(self, tokens: int) -> None:
        with self._lock:
            self._snap = replace(self._snap, tokens_used=self._snap.tokens_used + tokens)

    def failed_attempt(self, kind: str, status_429: bool, retried: bool) -> None:
        """One attempt failed with ``kind``; every 429 counts under ``rate_limited``, retried or not."""
        with self._lock:
            table = self._rate_limited if status_429 else self._errors
            table[kind] = table.get(kind, 0) + 1
            if retried:
                self._snap = replace(self._snap, retries=self._snap.retries + 1)

    def failed_call(self) -> None:
        with self._lock:
            self._snap = replace(self._snap, failures=self._snap.failures + 1)

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return replace(self._snap, rate_limited=dict(self._rate_limited), errors=dict(self._errors))
