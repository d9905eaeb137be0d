"""What a caller tells the client about the call it is making, in this thread or this asyncio task.

The SDK's resource methods (``chat.completions.create`` ...) take no extra arguments of ours, so a bulk
worker (the ``map_*`` helpers, ``throttled-openai run``) passes what the client needs through
:data:`current` instead: the cost it already counted while packing a batch, the event that stops the run,
and how long the call waited. Kept apart from :mod:`~throttled_openai.client` so that the bulk engine
depends on it, not on the client.

Each field is a :class:`contextvars.ContextVar`, not a thread-local: the async client's response hook
runs in the task that made the call, among many others on the same thread, and must see that call's
attempt. Threads still keep separate values (each thread has its own context), and a task starts with a
copy of its creator's values, so what it sets stays its own.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import Any, Generic, Optional, TypeVar

__all__ = ["CallContext", "current"]

_T = TypeVar("_T")


class _Field(Generic[_T]):
    """An attribute of :class:`CallContext` kept in a ContextVar: per thread and per asyncio task."""

    def __init__(self, default: _T) -> None:
        self._default = default
        self._var: ContextVar[_T]  # made when the class is created, named after the attribute

    def __set_name__(self, owner: type, name: str) -> None:
        self._var = ContextVar(f"throttled_openai.{name}", default=self._default)

    def __get__(self, instance: object, owner: Optional[type] = None) -> _T:
        return self._var.get()

    def __set__(self, instance: object, value: _T) -> None:
        self._var.set(value)


class CallContext:
    """Per-call fields (per thread, per asyncio task), each reset by whoever set it.

    - ``cost``: tokens the next request was already counted at (read and cleared by the client);
    - ``cancel``: a ``threading.Event`` that, once set, makes the call give up waiting (``Cancelled``).
      Set while a bulk worker runs; such a call waits its turn without the client's ``max_wait``;
    - ``waited``: seconds this thread's (or task's) calls spent waiting (capacity and backoff), for
      latency figures;
    - ``attempt``: the attempt on the wire, for the response hook to report headers to.
    """

    cost = _Field[Optional[int]](None)
    cancel = _Field[Optional[threading.Event]](None)
    waited = _Field[float](0.0)
    attempt = _Field[Any](None)


current = CallContext()
