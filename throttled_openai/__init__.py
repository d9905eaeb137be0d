"""Call the OpenAI API as fast as your rate limits allow, and never faster.

``ThrottledClient`` is an ``openai.OpenAI`` whose every request passes a shared requests- and
tokens-per-minute limiter, is retried by one :class:`Retry` policy, and is settled against the real
token usage; ``AsyncThrottledClient`` is the same for ``openai.AsyncOpenAI``. See README.md for the tour.
"""

from .batch_api import BatchJob, BatchRequestError
from .batching import IncompleteResponse
from .client import AsyncThrottledAzureClient, AsyncThrottledClient, ThrottledAzureClient, ThrottledClient
from .errors import (
    BudgetExhausted,
    Cancelled,
    IncompleteStream,
    LimiterUnavailable,
    MalformedResponse,
    RateLimitTimeout,
    RequestTooLarge,
    ThrottledOpenAIError,
)
from .headers import RateLimitHeaders, parse_rate_limit_headers
from .limiter import Limits, RateLimiter, Reservation
from .mapping import BulkError, BulkInterrupted, BulkTimeout, Progress
from .redis_limiter import RedisRateLimiter
from .retry import Retry
from .stats import StatsSnapshot
from .tokens import TokenCounter, estimate_cost

__version__ = "0.1.0"

__all__ = [
    "AsyncThrottledAzureClient",
    "AsyncThrottledClient",
    "BatchJob",
    "BatchRequestError",
    "BulkError",
    "BulkInterrupted",
    "BulkTimeout",
    "BudgetExhausted",
    "Cancelled",
    "IncompleteResponse",
    "IncompleteStream",
    "LimiterUnavailable",
    "Limits",
    "MalformedResponse",
    "Progress",
    "RateLimitHeaders",
    "RateLimitTimeout",
    "RateLimiter",
    "RedisRateLimiter",
    "RequestTooLarge",
    "Reservation",
    "Retry",
    "StatsSnapshot",
    "ThrottledAzureClient",
    "ThrottledClient",
    "ThrottledOpenAIError",
    "TokenCounter",
    "__version__",
    "estimate_cost",
    "parse_rate_limit_headers",
]
