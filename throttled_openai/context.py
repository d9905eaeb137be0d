"""What a caller tells the client about the call it is making on this thread.

The SDK's resource methods (``chat.completions.create`` ...) take no extra arguments of ours, so a bulk
worker (the ``map_*`` helpers, ``throttled-openai run``) passes what the client needs through this
thread-local instead: the cost it already counted while packing a batch, the event that stops the run,
and how long the call waited. Kept apart from :mod:`~throttled_openai.client` so that the bulk engine
depends on it, not on the client.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

__all__ = ["CallContext", "current"]


class CallContext(threading.local):
    """Per-thread fields, each reset by whoever set it.

    - ``cost``: tokens the next request was already counted at (read and cleared by the client);
    - ``cancel``: a ``threading.Event`` that, once set, makes the call give up waiting (``Cancelled``).
      Set while a bulk worker runs; such a call waits its turn without the client's ``max_wait``;
    - ``waited``: seconds this thread's calls spent waiting (capacity and backoff), for latency figures;
    - ``attempt``: the attempt on the wire, for the response hook to report headers to.
    """

    cost: Optional[int] = None
    cancel: Optional[threading.Event] = None
    waited: float = 0.0
    attempt: Any = None


current = CallContext()
