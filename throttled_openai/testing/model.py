"""The rate-limit model: token buckets, each (api key, model) pair's buckets, and what a request costs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from .formats import _EPS
from .replies import _Reply

__all__ = ["COST_MODELS"]

COST_MODELS = frozenset({"tiktoken", "chars", "json_bytes"})


@dataclass
class _Bucket:
    """A token bucket: ``capacity`` units, refilled continuously at ``rate`` units per second.

    ``level`` may be negative (debt) after a request larger than ``capacity`` was admitted.
    """

    unit: str  # "RPM", "TPM", "RPD" or "TPD": which limit it enforces (see formats._UNITS)
    limit: float  # the advertised limit, per minute or per day
    capacity: float
    rate: float
    level: float
    t: float  # time.monotonic() of the last refill

    def refill(self, now: float) -> None:
        if now > self.t:
            self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
            self.t = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds ``amount``."""
        return max(0.0, (amount - self.level) / self.rate)

    def need(self, amount: float) -> float:
        """Level at which ``amount`` is admitted: ``amount``, or a full bucket when it is larger."""
        return min(amount, self.capacity)

    def fits(self, amount: float) -> bool:
        return self.level >= self.need(amount) - _EPS

    def reset_in(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass
class _Pair:
    """Rate-limit state for one (api key, model) pair; None = no such limit."""

    req: Optional[_Bucket]
    tok: Optional[_Bucket]
    req_day: Optional[_Bucket] = None
    tok_day: Optional[_Bucket] = None

    @classmethod
    def full(
        cls,
        minute: Tuple[Optional[float], Optional[float]],
        day: Tuple[Optional[float], Optional[float]],
        bucket_seconds: float,
        day_seconds: float,
        now: float,
    ) -> _Pair:
        """Full buckets for the per-minute limits ``minute`` = (rpm, tpm), holding ``bucket_seconds``
        of budget (the request bucket at least 1 request), and the per-day limits ``day`` = (rpd,
        tpd), holding the whole limit refilled over ``day_seconds``; None = no such limit."""
        (rpm, tpm), (rpd, tpd), scale = minute, day, bucket_seconds / 60.0
        pair = cls(
            _Bucket("RPM", rpm, max(rpm * scale, 1.0), rpm / 60, 0, now) if rpm else None,
            _Bucket("TPM", tpm, tpm * scale, tpm / 60, 0, now) if tpm else None,
            _Bucket("RPD", rpd, rpd, rpd / day_seconds, 0, now) if rpd else None,
            _Bucket("TPD", tpd, tpd, tpd / day_seconds, 0, now) if tpd else None,
        )
        for bucket in pair.buckets():
            bucket.level = bucket.capacity
        return pair

    def buckets(self) -> List[_Bucket]:
        return [b for b in (self.req, self.tok, self.req_day, self.tok_day) if b is not None]

    def refill(self, now: float) -> None:
        for bucket in self.buckets():
            bucket.refill(now)

    def charges(self, cost: int) -> List[Tuple[_Bucket, int]]:
        """(bucket, amount) a request of admission cost ``cost`` takes: 1 request, ``cost`` tokens."""
        return [(b, 1 if b.unit[0] == "R" else cost) for b in self.buckets()]

    def too_large(self, cost: int) -> Optional[_Bucket]:
        """The first token bucket (per minute, then per day) whose whole limit is below ``cost``:
        no wait can admit the request.  None when there is none."""
        return next((b for b, amount in self.charges(cost) if b.unit[0] == "T" and amount > b.limit + _EPS), None)

    def fits(self, cost: int) -> bool:
        """Whether every bucket admits a request of admission cost ``cost``."""
        return all(bucket.fits(amount) for bucket, amount in self.charges(cost))

    def longest_wait(self, cost: int) -> Tuple[float, _Bucket, int]:
        """(seconds to wait, bucket, amount) of the bucket that needs the longest wait for
        ``cost`` (the first of equals); only when it does not fit."""
        waits = [(b.wait_for(b.need(a)), b, a) for b, a in self.charges(cost) if not b.fits(a)]
        return max(waits, key=lambda w: w[0])

    def take(self, cost: int) -> None:
        """Take ``cost`` from every bucket at once; a level may go negative (debt)."""
        for bucket, amount in self.charges(cost):
            bucket.level -= amount

    def refund(self, tokens: int) -> None:
        """Give ``tokens`` back to the token buckets, up to their capacity (negative: charge more)."""
        for bucket in (self.tok, self.tok_day):
            if bucket is not None:
                bucket.level = min(bucket.capacity, bucket.level + tokens)


@dataclass
class _Job:
    """A validated API request: what it costs and how to render its successful response."""

    model: str
    input_tokens: int  # the input as tiktoken counts it (with chat's per-message overhead)
    input_chars: int  # characters of the input's text fields
    input_ids: int  # token ids given as the input (token-id prompts)
    output_tokens: int  # output the request may generate: n * max_tokens (per prompt)
    usage_total: int  # tokens the response will report as used
    render: Callable[[str], _Reply]  # fault name ("" for none) -> reply
    cost: int = 0  # admission cost in the server's cost model, set by FakeOpenAI._process


def _admission_cost(cost_model: str, job: _Job, body: bytes) -> int:
    """Tokens a request costs at admission: an input estimate plus the output it may generate.

    The input estimate is, by ``cost_model``: "tiktoken", the encoder's count; "chars",
    ceil(characters of the text fields / 4) + the number of token ids; "json_bytes",
    ceil(bytes of the raw JSON body / 4).
    """
    if cost_model == "chars":
        estimate = -(-job.input_chars // 4) + job.input_ids
    elif cost_model == "json_bytes":
        estimate = -(-len(body) // 4)
    else:
        estimate = job.input_tokens
    return estimate + job.output_tokens
