"""A small fake OpenAI API server for testing code against rate limits.

It speaks real HTTP/1.1 on 127.0.0.1 so tests exercise the real ``openai`` SDK (connection
pooling, retries, error mapping) rather than mocks, and it enforces OpenAI-style per-minute
(and optionally per-day) request and token limits with token buckets, so a client that is too
fast gets real 429s with real headers.  Standard library only (plus optional tiktoken for token
counting).

    from throttled_openai.testing import FakeOpenAI

    with FakeOpenAI(rpm=600, tpm=100_000, bucket_seconds=1.0) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test")

The modules, each one idea, in the order they build on each other:

- :mod:`.counting`: how tokens are counted (:func:`count_tokens`);
- :mod:`.formats`: OpenAI's formats: Go durations, error bodies, rate-limit messages;
- :mod:`.replies`: a reply (:class:`_Reply`): JSON or server-sent events;
- :mod:`.faults`: the injectable faults (:data:`FAULTS`) and what they do to a reply;
- :mod:`.model`: token buckets, each (key, model) pair's buckets, a request's admission cost;
- :mod:`.endpoints`: what each endpoint accepts and answers, streams included;
- :mod:`.batches`: the Files and Batch APIs: uploads, and batches run in simulated time;
- :mod:`.server`: the HTTP server and handler;
- :mod:`.fake`: :class:`FakeOpenAI`, which ties them together: settings, routing, admission;
- :mod:`.redis_server`: :class:`RedisServer`, a throwaway ``redis-server``.
"""

# The public names are in __all__.  The private ones ("name as name": an explicit re-export) keep
# importing from here as they did when this package was one module; new code should import them
# from their module.
from .batches import BATCH_FAULTS, BATCH_PHASES
from .counting import _count_cached as _count_cached
from .counting import _encoder as _encoder
from .counting import count_tokens
from .endpoints import _BadRequest as _BadRequest
from .endpoints import _content_text as _content_text
from .endpoints import _embedding as _embedding
from .endpoints import _int_param as _int_param
from .endpoints import _is_tokens as _is_tokens
from .endpoints import _split_inputs as _split_inputs
from .endpoints import _text_size as _text_size
from .endpoints import _usage as _usage
from .fake import _ENDPOINTS as _ENDPOINTS
from .fake import _HEADERS_REPORTS as _HEADERS_REPORTS
from .fake import _MODELS as _MODELS
from .fake import FakeOpenAI
from .faults import _FAULT_RETRY_S as _FAULT_RETRY_S
from .faults import _REJECTING_FAULTS as _REJECTING_FAULTS
from .faults import FAULTS
from .formats import _EPS as _EPS
from .formats import _RL_DOCS as _RL_DOCS
from .formats import _UNITS as _UNITS
from .formats import JSONDict as JSONDict
from .formats import _error as _error
from .formats import _go_duration as _go_duration
from .formats import _mask_key as _mask_key
from .formats import _ms as _ms
from .formats import _num as _num
from .formats import _quota_error as _quota_error
from .formats import _rate_limit_error as _rate_limit_error
from .formats import _too_large_error as _too_large_error
from .model import COST_MODELS
from .model import _admission_cost as _admission_cost
from .model import _Bucket as _Bucket
from .model import _Job as _Job
from .model import _Pair as _Pair
from .redis_server import RedisServer
from .redis_server import _free_port as _free_port
from .replies import _json_reply as _json_reply
from .replies import _Reply as _Reply
from .server import _Handler as _Handler
from .server import _Server as _Server

__all__ = ["BATCH_FAULTS", "BATCH_PHASES", "COST_MODELS", "FAULTS", "FakeOpenAI", "RedisServer", "count_tokens"]
