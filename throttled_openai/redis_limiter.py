"""A rate limiter whose budget lives in Redis, so that every process and host share one limit.

An OpenAI limit belongs to the organization: eight gunicorn workers with a limiter each would send
eight times too much. :class:`RedisRateLimiter` keeps the buckets of :class:`RateLimiter` (refill,
burst, settle, calibration from headers, the pause after a 429) in one Redis hash per (account,
model), and changes them only inside Lua scripts, one per operation, so that checking both budgets and
booking a request is one atomic step for every process at once. Time is Redis's own clock, as the
hosts' clocks differ. What stays in the process is the line of its threads: one thread per process,
at the head, asks Redis, and the others wait for their turn as with the in-process limiter. Refunds made
by other processes cannot wake that head, so it asks again at least every ``poll`` seconds.

When Redis does not answer within ``timeout``, ``on_error`` decides: ``"raise"`` fails the call with
:class:`LimiterUnavailable` before anything is sent; ``"local"`` limits in this process alone (with a
warning). Either way Redis is left alone for ``retry_interval`` seconds, then asked again. Bookkeeping
after a request was sent (settle, headers, pause) never fails that request: while Redis is down it is
skipped, and the shared budget goes without that correction (the server's headers show the truth again
with the next response).

Failing over without a burst. Every process loses Redis at once, and the server's bucket, which the
shared limit kept near empty, stays as it was. So a process's local buckets start empty, not full, and
refill from then on, and each local call costs the inverse of this process's share of what every
process took from the shared budget just before (four processes that took a quarter each: four times
the cost, on the tokens a call of that key uses once settled), so that together they stay near the
limit. When Redis answers again but has lost a key (a restart, a ``FLUSHALL``, an eviction) that this
process used within the key's TTL, the key starts empty too, with its normal refill: a key used for the
first time, or not for longer than its TTL, starts with its burst. In both cases the server's
``x-ratelimit-remaining-*`` headers then lower the levels further where others still take more.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import math
import random
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Set, Tuple, Type, Union

from .errors import Cancelled, LimiterUnavailable, RateLimitTimeout, RequestTooLarge
from .headers import RateLimitHeaders
from .limiter import (
    _CANCEL_CHECK_SECONDS,
    _JITTER_SECONDS,
    _KINDS,
    _MIN_BURST_SECONDS,
    LimitKey,
    Limits,
    RateLimiter,
    Reservation,
    _describe_limits,
    _KeyState,
    _server_full,
)
from .waiting import Step, Steps, Wait, Waiter, adrive, drive

__all__ = ["RedisRateLimiter"]

log = logging.getLogger("throttled_openai")

# An idle key expires after this long (ms): a minute after its last use a bucket is full anyway, and
# learned limits are learned again from the next response.
_TTL_MS = 600_000

# While Redis is down, each process takes its share of the limit: of what every process took from the
# shared budget between its last reservations, up to this many within this many seconds before the
# failure; at least this share.
_SHARE_TAKES = 256
_SHARE_SECONDS = 10.0
_MIN_SHARE = 0.05

# Shared by every script. KEYS[1]: the hash of one (account, model). ARGV[1..7]: this process's
# configured rpm and tpm (0: none), headroom, initial burst and jitter (seconds), TTL (ms), and 1 if this
# process used the key within the TTL (so that a missing key was lost, not expired), else 0.
# Fields: <b>server (the server's limit), <b>cap, <b>ceil, <b>level, <b>stamp, <b>booked (<b> is "r" for
# requests or "t" for tokens), paused_until, shrunk_at, answered, and for each caller waiting in line
# (one per process at most: the head of its own line) wa:<id> (when it joined), wt:<id> (its tokens)
# and wl:<id> (when it leaves the line unless it asks again first: a process that died leaves it).
# Numbers go in and out as strings: Lua would truncate a reply number to an integer.
_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end  -- Redis 6: TIME before writes
local key = KEYS[1]
local cfg = {r = tonumber(ARGV[1]), t = tonumber(ARGV[2])}
local headroom, initial_burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local jitter, ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local h = {}
local raw = redis.call('HGETALL', key)
for i = 1, #raw, 2 do h[raw[i]] = tonumber(raw[i + 1]) end
local drop = {}  -- fields to delete when saving
-- The key is gone although this process used it within its TTL: Redis lost it (a restart, a FLUSHALL,
-- an eviction) while the server's bucket may well be spent. Its buckets start empty, not full.
local lost = #raw == 0 and ARGV[7] == '1'

-- The callers waiting in line across processes, and the biggest cost among them.
local line, biggest = {}, 0
for field, _ in pairs(h) do
  local id = string.match(field, '^wa:(.+)$')
  if id then
    local w = {id = id, at = h['wa:' .. id], tokens = h['wt:' .. id] or 0, lease = h['wl:' .. id] or 0}
    if w.lease > now then
      line[id] = w
      biggest = math.max(biggest, w.tokens)
    else
      for _, f in ipairs({'wa:', 'wt:', 'wl:'}) do drop[#drop + 1] = f .. id end
    end
  end
end

local function fmt(x) return string.format('%.17g', x) end

-- One budget, or nil while neither this process nor the server has given it a limit.
local function bucket(b)
  local limit = h[b .. 'server']
  if cfg[b] > 0 and (limit == nil or cfg[b] < limit) then limit = cfg[b] end
  if limit == nil then return nil end
  local B = {b = b, limit = limit, rate = limit / 60 * (1 - headroom), hold = 0}
  B.ceil = math.min(h[b .. 'ceil'] or limit, limit)
  B.cap = h[b .. 'cap']
  if B.cap == nil then
    B.cap = math.min(B.ceil, math.max(B.rate * math.max(initial_burst - jitter, initial_burst / 2), 1))
    B.level, B.stamp = B.cap, now
    if lost then B.level = 0 end  -- it refills from now; `remaining` headers lower it further if need be
  else
    B.level, B.stamp = h[b .. 'level'], h[b .. 'stamp']
  end
  B.booked = h[b .. 'booked'] or 0
  -- While a call bigger than the burst waits in line, the level may fill up to its cost.
  if b == 't' then B.hold = biggest end
  return B
end

local function room(B) return math.max(B.cap, B.hold) end

local function advance(B)
  if not B then return end
  if now > B.stamp then
    B.level = B.level + (now - B.stamp) * B.rate
  end
  B.stamp = now  -- also when Redis's clock stepped back (NTP, a failover): refill from here, don't stall
  B.level = math.min(room(B), B.level)  -- and never above the room, once a big waiter has left
end

local function give_back(B, units) B.level = math.min(room(B), B.level + units) end

local function take(B, units)
  B.level = B.level - units
  B.booked = B.booked + units
end

-- When `units` may be taken (a full bucket, if more than it holds) leaving `keep` units in it. If both
-- don't fit in the bucket, an estimate: that is after those ahead went, which frees the `keep`.
local function earliest(B, units, keep)
  if not B then return now end
  local want = units + keep
  if keep == 0 then want = math.min(units, room(B)) end
  local missing = want - B.level
  if missing <= 0 then return now end
  return now + missing / B.rate
end

local function save(R, T, extra)
  local args = {}
  for _, B in pairs({R, T}) do
    for _, f in ipairs({'cap', 'level', 'stamp', 'booked'}) do
      args[#args + 1] = B.b .. f
      args[#args + 1] = fmt(B[f])
    end
  end
  for name, value in pairs(extra or {}) do
    args[#args + 1] = name
    args[#args + 1] = fmt(value)
  end
  if #drop > 0 then redis.call('HDEL', key, unpack(drop)) end  -- first: a lapsed waiter may come back
  if #args > 0 then redis.call('HSET', key, unpack(args)) end
  redis.call('PEXPIRE', key, ttl)
end

local function known(R, T) if R or T then return '1' end return '0' end
"""

# ARGV[8]: tokens; [9]: the caller's id; [10]: the longest it will wait; [11]: how long its place in
# line lasts unless it asks again; [12]: seconds its process is still paused (a 429 Redis may have
# missed). Takes one request and the tokens if both budgets hold them, no pause runs, and they leave
# what the callers ahead in line need. A caller that will wait takes its place in
# line: across processes, callers are then served first come, first served, and a big call is not
# starved by a stream of small ones.
# Reply: {'ok', now, requests booked, tokens booked, known} | {'too_large', tpm}
#      | {'wait', seconds, requests per second, whether refunds may shorten the wait, in line, known}
_ACQUIRE = """
local tokens, me, patience, lease = tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[10]), tonumber(ARGV[11])
local R, T = bucket('r'), bucket('t')
if T and tokens > T.limit then return {'too_large', fmt(T.limit)} end
if T and tokens > T.cap then T.hold = math.max(T.hold, tokens) end  -- its whole cost may fill in
local mine = line[me]
local keep_r, keep_t = 0, 0
for id, w in pairs(line) do
  if id ~= me and (mine == nil or w.at < mine.at or (w.at == mine.at and id < me)) then
    keep_r, keep_t = keep_r + 1, keep_t + w.tokens
  end
end
advance(R)
advance(T)
local go_t = earliest(T, tokens, keep_t)
local go = math.max(earliest(R, 1, keep_r), go_t, h['paused_until'] or 0, now + tonumber(ARGV[12]))
local extra = {}
if go <= now then
  if R then take(R, 1) end
  if T then take(T, tokens) end
  if mine then for _, f in ipairs({'wa:', 'wt:', 'wl:'}) do drop[#drop + 1] = f .. me end end
  save(R, T, extra)
  return {'ok', fmt(now), fmt(R and R.booked or 0), fmt(T and T.booked or 0), known(R, T)}
end
local queued = go - now <= patience
if queued then
  extra['wa:' .. me] = mine and mine.at or now
  extra['wt:' .. me] = tokens
  extra['wl:' .. me] = now + lease
elseif mine then  -- it gives up: out of the line
  for _, f in ipairs({'wa:', 'wt:', 'wl:'}) do drop[#drop + 1] = f .. me end
end
save(R, T, extra)
-- Whether tokens are what it waits for: then refunds (settled usage) may bring its turn forward.
local refunds, in_line = '0', '0'
if go_t >= go then refunds = '1' end
if queued then in_line = '1' end
return {'wait', fmt(go - now), fmt(R and R.rate or 0), refunds, in_line, known(R, T)}
"""

# ARGV[8]: requests to give back; ARGV[9]: tokens to give back (negative: to charge).
_GIVE_BACK = """
local R, T = bucket('r'), bucket('t')
local requests, tokens = tonumber(ARGV[8]), tonumber(ARGV[9])
advance(R)
advance(T)
if R and requests > 0 then give_back(R, requests) end
if T and tokens > 0 then give_back(T, tokens) elseif T and tokens < 0 then take(T, -tokens) end
if R or T then save(R, T) end
return 1
"""

# ARGV[8]: accepted (1/0); [9]: Redis time of the reservation; [10]: its tokens; [11], [12]: booked
# totals after it; [13]..[16]: limit and remaining requests, limit and remaining tokens ('': not sent);
# [17], [18]: what the server's request and token buckets hold when full, by their reset ('': unknown).
_OBSERVE = """
local accepted = ARGV[8] == '1'
local elapsed = math.max(0, now - tonumber(ARGV[9]))
local cost = {r = 1, t = tonumber(ARGV[10])}
local mark = {r = tonumber(ARGV[11]), t = tonumber(ARGV[12])}
local limit = {r = tonumber(ARGV[13]), t = tonumber(ARGV[15])}
local remaining = {r = tonumber(ARGV[14]), t = tonumber(ARGV[16])}
-- What the server's bucket holds when full, by its reset, in its own units ('' when unknown).
local full = {r = tonumber(ARGV[17]), t = tonumber(ARGV[18])}
local extra = {answered = 1}
for _, b in ipairs({'r', 't'}) do
  if limit[b] and limit[b] >= 1 and limit[b] ~= h[b .. 'server'] then
    h[b .. 'server'] = limit[b]
    extra[b .. 'server'] = limit[b]
  end
end
local R, T = bucket('r'), bucket('t')
advance(R)
advance(T)
if T and not accepted then give_back(T, cost.t) end  -- a refusal took none of our tokens
for _, B in pairs({R, T}) do
  local left = remaining[B.b]
  if left then
    local margin = B.rate * tonumber(ARGV[5])
    local top = full[B.b]
    if not top then
      top = left
      if accepted then top = left + cost[B.b] end
    end
    local grown = math.max(0, math.min(B.ceil, top - margin) - B.cap)
    B.cap = B.cap + grown
    local seen = left + B.rate * elapsed - margin - (B.booked - mark[B.b])
    B.level = math.min(B.level + grown, room(B), seen)
  end
end
save(R, T, extra)
return known(R, T)
"""

# ARGV[8]: seconds; [9]: 'requests', 'tokens' or '' (both); [10]: Redis time of the refused
# reservation; [11]: smallest burst, in seconds. Several 429s from one burst shrink it once.
_PAUSE = """
local extra = {paused_until = math.max(h['paused_until'] or 0, now + tonumber(ARGV[8]))}
local R, T = bucket('r'), bucket('t')
if tonumber(ARGV[10]) > (h['shrunk_at'] or 0) then
  extra.shrunk_at = now
  local kind = ARGV[9]
  local named = {R, T}
  if kind == 'requests' then named = {R} elseif kind == 'tokens' then named = {T} end
  for _, B in pairs(named) do
    advance(B)
    B.ceil = math.max(math.max(B.rate * tonumber(ARGV[11]), 1), B.cap / 2)
    B.cap = math.min(B.cap, B.ceil)
    B.level = math.min(B.level, 0)
    extra[B.b .. 'ceil'] = B.ceil
  end
end
save(R, T, extra)
return 1
"""

# Reply: for requests then tokens: limit, rate, burst, level ('' while no limit); then pause left, answered.
_INFO = """
local out = {}
for _, b in ipairs({'r', 't'}) do
  local B = bucket(b)
  if B then
    advance(B)
    for _, v in ipairs({B.limit, B.rate, B.cap, B.level}) do out[#out + 1] = fmt(v) end
  else
    for _ = 1, 4 do out[#out + 1] = '' end
  end
end
out[#out + 1] = fmt(math.max(0, (h['paused_until'] or 0) - now))
out[#out + 1] = fmt(h['answered'] or 0)
return out
"""

# ARGV[8]: the id of a caller that gives up waiting: out of the line at once, not when its lease lapses.
_LEAVE = """
for _, f in ipairs({'wa:', 'wt:', 'wl:'}) do drop[#drop + 1] = f .. ARGV[8] end
save(nil, nil)
return 1
"""

_SCRIPTS = {
    "leave": _LEAVE,
    "acquire": _ACQUIRE,
    "give_back": _GIVE_BACK,
    "observe": _OBSERVE,
    "pause": _PAUSE,
    "info": _INFO,
}


class _RedisReservation(Reservation):
    """A reservation booked in Redis. ``booked_at``: when, on Redis's clock (``ready_at`` is ours)."""

    __slots__ = ("booked_at",)

    def __init__(self, key: LimitKey, tokens: int, ready_at: float, marks: Tuple[float, float], booked_at: float):
        super().__init__(key, tokens, ready_at, marks)
        self.booked_at = booked_at


class _Script(Step):
    """One script call: on a thread through the limiter's client, in a task through its loop's
    ``redis.asyncio`` client. The same scripts, keys and arguments either way."""

    __slots__ = ("args", "keys", "limiter", "name")

    def __init__(self, limiter: RedisRateLimiter, name: str, keys: List[str], args: List[Any]) -> None:
        self.limiter, self.name, self.keys, self.args = limiter, name, keys, args

    def block(self) -> Any:
        return self.limiter._scripts[self.name](keys=self.keys, args=self.args)

    async def wait(self) -> Any:
        # A cancelled call may still have run in Redis: an acquire then over-books (the safe side), a
        # give-back is lost (the same), a waiter's place lapses with its lease.
        return await self.limiter._scripts_of_loop()[self.name](keys=self.keys, args=self.args)


class _Info:
    """What the ``info`` script says of one key."""

    __slots__ = ("answered", "paused_for", "requests", "tokens")

    def __init__(self, reply: List[str]) -> None:
        def bucket(part: List[str]) -> Optional[Tuple[float, float, float, float]]:
            return None if part[0] == "" else (float(part[0]), float(part[1]), float(part[2]), float(part[3]))

        self.requests = bucket(reply[0:4])  # limit, rate, burst, level
        self.tokens = bucket(reply[4:8])
        self.paused_for = float(reply[8])
        self.answered = reply[9] not in ("0", "")


class RedisRateLimiter(RateLimiter):
    """A :class:`RateLimiter` shared by every process and host that points at the same Redis.

    - ``redis``: a URL (``"redis://localhost:6379/0"``, ``"rediss://..."``, ``"unix://..."``) or an
      existing ``redis.Redis`` (or ``valkey.Valkey``) client. A client built from a URL gives up on an
      operation after ``timeout`` seconds; your own client keeps its own ``socket_timeout`` and retries
      (give it both a short timeout and few retries: every call may wait that long when Redis hangs).
    - ``rpm``, ``tpm``, ``limits``, ``headroom``, ``initial_burst``: as for :class:`RateLimiter`. Give
      every process the same limits (or none, to learn them from the server).
    - ``on_error``: what a call does when Redis fails or times out. ``"raise"``: raise
      :class:`LimiterUnavailable`, sending nothing. ``"local"``: log a warning and limit in this
      process alone, at the share of the limit it took just before (from empty buckets, so that the
      first call may wait for its cost to refill); the server's ``x-ratelimit-remaining-*`` headers
      still show this process what the others used. Either way Redis is asked again ``retry_interval``
      seconds after it failed.
    - ``prefix``: the start of every key, ``{prefix}:{account}:{model}``; ``account`` is a hash of the
      API key and base URL, never the key. Keys expire ten minutes after their last use.
    - ``timeout``: seconds a Redis operation may take (for a client built from a URL) before it counts
      as a failure; ``retry_interval``: seconds Redis is left alone after a failure.
    - ``poll``: while tokens are what a caller waits for, how often it asks Redis again, to see refunds
      made by other processes (seconds); otherwise it asks at least every quarter of a second.
    """

    def __init__(
        self,
        redis: Union[str, Any],
        rpm: Optional[float] = None,
        tpm: Optional[float] = None,
        *,
        limits: Optional[Mapping[str, Limits]] = None,
        on_error: str = "raise",
        prefix: str = "throttled_openai",
        timeout: float = 0.5,
        retry_interval: float = 2.0,
        poll: float = 0.05,
        headroom: float = 0.02,
        initial_burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(rpm, tpm, limits=limits, headroom=headroom, initial_burst=initial_burst, clock=clock)
        if on_error not in ("raise", "local"):
            raise ValueError(f"on_error must be 'raise' or 'local', got {on_error!r}")
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"prefix must be a non-empty string without spaces, got {prefix!r}")
        for name, value in (("timeout", timeout), ("retry_interval", retry_interval), ("poll", poll)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        self._on_error = on_error
        self._prefix = prefix
        self._retry_interval = float(retry_interval)
        self._poll = float(poll)
        self._redis = _connect(redis, float(timeout))
        self._url = redis if isinstance(redis, str) else None
        self._timeout = float(timeout)
        # Coroutines talk to Redis through a redis.asyncio client of their own event loop (one cannot
        # serve two loops), made from the same URL or connection settings on the loop's first call.
        self._loop_scripts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Tuple[Any, Dict[str, Any]]]
        self._loop_scripts = weakref.WeakKeyDictionary()
        self._errors = _error_types("RedisError", "ValkeyError", builtin=OSError)
        self._broken = _error_types("ConnectionError", builtin=ConnectionError)
        self._where = _describe(self._redis)
        self._scripts = {name: self._redis.register_script(_PRELUDE + body) for name, body in _SCRIPTS.items()}
        # How often a waiting head asks again when only someone ahead giving up could bring its turn
        # forward; and how long its place in line lasts unless renewed: a few such sleeps and Redis calls.
        self._patrol = max(self._poll, 0.25)
        self._lease = 4 * self._patrol + 2 * float(timeout)
        self._ready: Dict[LimitKey, float] = {}  # when Redis last said the head of each key may go
        self._last_use: Dict[LimitKey, float] = {}  # when this process last took from each key (our clock)
        self._shared: Set[LimitKey] = set()  # keys whose last reservation came from Redis
        # This process's last reservations from Redis: when, every process's request and token totals
        # after each, and its tokens; and while Redis is down, this process's share of those totals.
        self._takes: Dict[LimitKey, Deque[Tuple[float, float, float, int]]] = {}
        self._local_share: Dict[LimitKey, Tuple[float, float]] = {}
        self._usage: Dict[LimitKey, float] = {}  # tokens used over tokens booked, by the calls of each key
        self._rates: Dict[LimitKey, float] = {}  # the requests per second Redis last reported
        self._down_until = -math.inf  # after a failure, Redis is not asked again before this
        self._outage = False  # Redis failed and has not answered since (to log its end once)

    def _scripts_of_loop(self) -> Dict[str, Any]:
        """The scripts registered on this event loop's own async client (made on first use)."""
        loop = asyncio.get_running_loop()
        entry = self._loop_scripts.get(loop)
        if entry is None:
            client = _async_twin(self._redis, self._url, self._timeout)
            scripts = {name: client.register_script(_PRELUDE + body) for name, body in _SCRIPTS.items()}
            with self._lock:
                # A loop that ended keeps its client (its connections hold the loop): let both go.
                for ended in [other for other in self._loop_scripts if other.is_closed()]:
                    del self._loop_scripts[ended]
                entry = self._loop_scripts.setdefault(loop, (client, scripts))
        return entry[1]

    async def aclose(self) -> None:
        """Close the async Redis client of the running event loop, if one was made (call it before the
        loop ends, e.g. in a FastAPI lifespan's shutdown, to close its connections cleanly)."""
        with self._lock:
            entry = self._loop_scripts.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            close = getattr(entry[0], "aclose", None) or entry[0].close  # redis-py < 5.0.1: close()
            await close()

    @property
    def local_only(self) -> bool:
        """Whether calls are limited in this process alone for now, because Redis failed."""
        return self._on_error == "local" and self._resting()

    def _resting(self) -> bool:
        """Whether Redis failed less than ``retry_interval`` ago: it is not asked again until then."""
        return self._clock() < self._down_until

    def redis_key(self, key: LimitKey) -> str:
        """The Redis key of ``key``'s budget."""
        return f"{self._prefix}:{key[0]}:{key[1]}"

    # -- talking to Redis ------------------------------------------------------------------------

    def _config(self, key: LimitKey) -> List[Any]:
        # The limits this process knows: configured, or learned from headers. Sent with every call, so
        # that a Redis restarted empty, or a key expired, limits from the first call on. And whether this
        # process took from the key within its TTL: then the key cannot have expired, and if it is
        # missing, Redis lost it and its buckets start empty.
        state = self._keys.get(key)
        if state is None:
            limits = self.limits_for(key[1])
            rpm, tpm = limits.rpm, limits.tpm
        else:
            rpm, tpm = state.requests.limit, state.tokens.limit
        used = int(self._clock() - self._last_use.get(key, -math.inf) < _TTL_MS / 1000)
        return [rpm or 0, tpm or 0, self._headroom, self._initial_burst, _JITTER_SECONDS, _TTL_MS, used]

    def _run(self, script: str, key: LimitKey, *args: Any) -> Steps[List[str]]:
        """Run one script on ``key`` (a step: see ``waiting.py``); raises one of ``self._errors`` when
        Redis fails.

        A connection that broke (a pooled one, after Redis restarted) is tried once more on a new one,
        for the scripts that may run twice if the first reply was lost after they ran: twice only
        over-books (acquire) or changes nothing. A refund or a refusal's refund (observe) twice would give
        back twice: those are skipped instead, without counting as Redis failing.
        """
        call = _Script(self, script, [self.redis_key(key)], [*self._config(key), *args])
        try:
            reply = yield call
        except self._broken as error:
            if script in ("give_back", "observe"):
                log.debug("throttled_openai: Redis connection broke (%s); %s skipped", type(error).__name__, script)
                return []
            log.debug("throttled_openai: Redis connection broke (%s); trying a new one", type(error).__name__)
            reply = yield call
        self._answered()
        return [_text(part) for part in reply] if isinstance(reply, list) else [_text(reply)]

    def _try(self, script: str, key: LimitKey, *args: Any) -> Steps[Optional[List[str]]]:
        """:meth:`_run` for bookkeeping that must never fail a call: ``None`` when Redis failed."""
        if self._resting():
            return None
        try:
            return (yield from self._run(script, key, *args))
        except self._errors as error:
            self._failed(error)
            return None

    def _failed(self, error: BaseException) -> None:
        self._down_until = self._clock() + self._retry_interval
        if not self._outage:
            self._outage = True
            then = "limiting in this process alone" if self._on_error == "local" else "calls fail"
            log.warning(
                "throttled_openai: Redis at %s failed (%s: %s); %s until it answers again",
                self._where,
                type(error).__name__,
                error,
                then,
            )

    def _unavailable(self, error: Optional[BaseException] = None) -> LimiterUnavailable:
        why = type(error).__name__ if error else f"it failed less than {self._retry_interval:g}s ago"
        return LimiterUnavailable(
            f"the shared rate limiter's Redis at {self._where} is unavailable ({why}); nothing was sent",
            retry_after=max(self._retry_interval if error else self._down_until - self._clock(), 0.1),
        )

    def _answered(self) -> None:
        if self._outage:
            self._outage = False
            self._down_until = -math.inf
            log.warning("throttled_openai: Redis at %s answers again; limits are shared again", self._where)

    # -- taking capacity -------------------------------------------------------------------------

    def _taking(
        self,
        key: LimitKey,
        state: _KeyState,
        tokens: int,
        deadline: float,
        timeout: Optional[float],
        cancel: Optional[threading.Event],
        waiter: Waiter,
    ) -> Steps[Reservation]:
        caller = random.getrandbits(48)  # names this call's place in the line across processes
        in_line = False
        try:
            while True:
                if self.local_only:
                    return (yield from self._take_locally(key, state, tokens, deadline, timeout, cancel, waiter))
                if self._resting():
                    raise self._unavailable()
                nap = _CANCEL_CHECK_SECONDS if cancel else math.inf
                with self._lock:
                    self._watch(state, waiter)
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"wait for model {key[1]!r} cancelled")
                    too_large = state.too_large(key[1], tokens)  # a limit may have been learned meanwhile
                    if too_large is not None:
                        raise too_large
                    now = self._clock()
                    # Long-window budgets (per day) are kept in this process, from the server's `remaining`.
                    budgets_at = self._budgets_ready(key, state, tokens, now, deadline, timeout)
                    probing = not state.learned and state.probe is not None  # no limit known yet
                    if probing and now >= deadline:
                        raise RateLimitTimeout(key[1], retry_after=1.0, max_wait=timeout or 0.0)
                    paused = max(0.0, state.paused_until - now)  # this process's pause, in case Redis missed it
                if budgets_at > now:
                    yield Wait(waiter, min(budgets_at - now, nap), self._sleep)
                    continue
                if probing:  # wait for the probe's answer
                    yield Wait(waiter, min(deadline - now, nap), self._sleep)
                    continue
                in_line = True  # perhaps, from now on: if this call is interrupted, its answer is not known
                try:
                    patience = min(deadline - now, 1e12)
                    reply = yield from self._run("acquire", key, tokens, caller, patience, self._lease, paused)
                except self._errors as error:
                    self._failed(error)
                    if self._on_error == "raise":
                        raise self._unavailable(error) from error
                    continue
                in_line = reply[0] == "wait" and reply[4] == "1"
                if reply[0] == "too_large":
                    raise RequestTooLarge(key[1], tokens, float(reply[1]))
                now = self._clock()
                with self._lock:
                    if reply[-1] == "1":
                        state.learned = True
                    if reply[0] == "ok":  # (taking also took it out of the line)
                        return self._took(key, state, tokens, reply, now)
                wait, rate, refunds = float(reply[1]), float(reply[2]), reply[3] == "1"
                self._ready[key] = now + wait
                self._rates[key] = rate
                if now + wait > deadline:
                    raise RateLimitTimeout(key[1], retry_after=wait, max_wait=timeout or 0.0)
                # Ask again soon when other processes' refunds may bring the turn forward (tokens bind);
                # waiting for requests or a pause, only someone ahead giving up can, so ask less often.
                again = self._poll if refunds else self._patrol
                yield Wait(waiter, min(wait, again, nap), self._sleep)
        except GeneratorExit:  # closed between two steps: no more steps; its place lapses with its lease
            raise
        except BaseException:
            if in_line:  # leave the line now: those behind would wait for this caller until its lease lapsed
                yield from self._try("leave", key, caller)
            raise

    def _took(self, key: LimitKey, state: _KeyState, tokens: int, reply: List[str], now: float) -> Reservation:
        """The reservation Redis granted with ``reply``. Called under the lock."""
        marks = (float(reply[2]), float(reply[3]))
        self._ready[key] = now
        self._note_take(key, now, marks, tokens)
        reservation = _RedisReservation(key, tokens, now, marks, float(reply[1]))
        for kind, units in (("requests", 1), ("tokens", tokens)):
            budget = state.budgets.get(kind)
            if budget is not None:
                budget.take(units)
        if not state.learned:  # no limit known anywhere yet: this call is the probe
            state.probe = reservation
            reservation.probe = True
        return reservation

    # -- while Redis is down ----------------------------------------------------------------------

    def _take_locally(
        self,
        key: LimitKey,
        state: _KeyState,
        tokens: int,
        deadline: float,
        timeout: Optional[float],
        cancel: Optional[threading.Event],
        waiter: Waiter,
    ) -> Steps[Reservation]:
        """Take from this process's own buckets, while Redis is down (``on_error="local"``).

        Every process does so at once, and each bucket refills at the whole rate. So that together they
        stay near the limit, at the switch from Redis the buckets start empty (full, they would let
        every process send a whole burst at once, into a server bucket that the shared limit kept
        spent), and each call is charged at the inverse of this process's share of what every process
        took from the shared budget just before (a quarter: four times its cost; for tokens, four times
        what a call of this key uses once settled, as settling refunds the rest of its estimate only
        once). The server's ``remaining`` headers then show each process what the others take.
        """
        with self._lock:
            if key in self._shared:  # the first local reservation after shared ones
                self._shared.discard(key)
                now = self._clock()
                self._local_share[key] = self._share(key, now)
                for bucket in (state.requests, state.tokens):
                    bucket.advance(now)
                    bucket.level = min(bucket.level, 0.0)
        reservation = yield from super()._taking(key, state, tokens, deadline, timeout, cancel, waiter)
        with self._lock:
            shares = self._local_share.get(key, (1.0, 1.0))
            used = tokens * self._usage.get(key, 1.0)  # what the call will likely use, once settled
            for bucket, units, share in ((state.requests, 1.0, shares[0]), (state.tokens, used, shares[1])):
                if bucket.active:  # the rest of the charge: debt that the next caller waits out
                    bucket.level -= units * (1 / share - 1)
            self._last_use[key] = self._clock()
        return reservation

    def _note_take(self, key: LimitKey, now: float, marks: Tuple[float, float], tokens: int) -> None:
        """Remember a reservation from Redis: when (our clock), every process's totals after it, its tokens."""
        self._last_use[key] = now
        self._shared.add(key)
        takes = self._takes.setdefault(key, deque(maxlen=_SHARE_TAKES))
        if takes and marks[0] < takes[-1][1]:  # the key was created anew: its totals start again
            takes.clear()
        takes.append((now, marks[0], marks[1], tokens))

    def _note_usage(self, reservation: Reservation, used_tokens: Optional[int]) -> None:
        """Follow what the calls of a key use, over the tokens they booked (a moving average): while Redis
        is down, the share's charge is on what a call will use, not on the estimate that settling refunds."""
        if isinstance(used_tokens, bool) or not isinstance(used_tokens, int) or used_tokens < 0:
            return
        if reservation.done or reservation.refused or reservation.tokens <= 0:
            return
        ratio = used_tokens / reservation.tokens
        before = self._usage.get(reservation.key)
        self._usage[reservation.key] = ratio if before is None else before + (ratio - before) / 8

    def _share(self, key: LimitKey, now: float) -> Tuple[float, float]:
        """This process's share of the requests and of the tokens that every process took from ``key``
        between its takes of the last ``_SHARE_SECONDS``: from 1, while unknown, down to ``_MIN_SHARE``."""
        takes = [take for take in self._takes.get(key, ()) if now - take[0] <= _SHARE_SECONDS]
        if len(takes) < 2:
            return 1.0, 1.0
        (_, first_requests, first_tokens, _), (_, last_requests, last_tokens, _) = takes[0], takes[-1]
        own_requests, own_tokens = len(takes) - 1, sum(take[3] for take in takes[1:])
        requests = own_requests / (last_requests - first_requests) if last_requests > first_requests else 1.0
        tokens = own_tokens / (last_tokens - first_tokens) if own_tokens and last_tokens > first_tokens else requests
        return min(1.0, max(_MIN_SHARE, requests)), min(1.0, max(_MIN_SHARE, tokens))

    def _projected_turn(self, key: LimitKey, state: _KeyState, now: float) -> float:
        """When a caller joining the line could go: after the head, at the time Redis last gave it, and
        one request interval per caller ahead. The local buckets are not charged in Redis mode."""
        rate = self._rates.get(key, 0.0)
        if self.local_only or rate <= 0:
            return super()._projected_turn(key, state, now)
        ready = self._ready.get(key, now)
        if ready <= now:  # the head was let through: capacity is there, or may be
            return state.paused_until
        return max(ready + (len(state.line) + 1) / rate, state.paused_until)

    # -- ending a reservation --------------------------------------------------------------------

    def _end(
        self, reservation: Reservation, sent: bool, used_tokens: Optional[int] = None
    ) -> Tuple[Optional[_KeyState], float]:
        """Mark ``reservation`` done, and settle the budgets this process keeps (a cancel gives its
        whole cost back; ``used_tokens`` charges the real usage). Returns its key's state (``None`` if
        it was done already) and the tokens to charge in Redis for its usage (negative: give back)."""
        extra = 0.0
        with self._lock:
            if reservation.done:
                return None, extra
            state = self._keys[reservation.key]
            now = self._clock()
            self._ended(state, reservation, now, sent)
            if not sent:
                for kind, units in (("requests", 1.0), ("tokens", float(reservation.tokens))):
                    budget = state.budgets.get(kind)
                    if budget is not None:
                        budget.advance(now)
                        budget.give_back(units)
            elif used_tokens is not None and not reservation.refused:
                extra = self._settled_extra(state, reservation, used_tokens, now)
                if "tokens" in state.budgets:
                    self._charge_usage((state.budgets["tokens"],), extra, now)
            self._end_probe(state, reservation, learned=False)
            return state, extra

    def _give_back(self, state: _KeyState, key: LimitKey, requests: int, tokens: float) -> Steps[None]:
        if not (requests or tokens):
            return
        answered = yield from self._try("give_back", key, requests, tokens)
        if answered is not None and tokens >= 0:
            with self._lock:
                self._wake(state)  # our own head sees the refund at once; others at their next poll

    def cancel(self, reservation: Reservation) -> None:
        drive(self._cancelling(reservation))

    async def acancel(self, reservation: Reservation) -> None:
        await adrive(self._cancelling(reservation))

    def _cancelling(self, reservation: Reservation) -> Steps[None]:
        if not isinstance(reservation, _RedisReservation):
            super().cancel(reservation)  # taken while Redis was down
            return
        state, _ = self._end(reservation, sent=False)
        if state is not None:
            yield from self._give_back(state, reservation.key, 1, reservation.tokens)

    def settle(self, reservation: Reservation, used_tokens: Optional[int]) -> None:
        drive(self._settling(reservation, used_tokens))

    async def asettle(self, reservation: Reservation, used_tokens: Optional[int]) -> None:
        await adrive(self._settling(reservation, used_tokens))

    def _settling(self, reservation: Reservation, used_tokens: Optional[int]) -> Steps[None]:
        self._note_usage(reservation, used_tokens)
        if not isinstance(reservation, _RedisReservation):
            super().settle(reservation, used_tokens)
            return
        if isinstance(used_tokens, bool) or not isinstance(used_tokens, (int, type(None))) or (used_tokens or 0) < 0:
            used_tokens = None
        state, extra = self._end(reservation, sent=True, used_tokens=used_tokens)
        if state is not None and extra:
            yield from self._give_back(state, reservation.key, 0, -extra)

    # -- learning from the server ----------------------------------------------------------------

    def observe(self, reservation: Reservation, headers: RateLimitHeaders, status: int = 200) -> None:
        drive(self._observing(reservation, headers, status))

    async def aobserve(self, reservation: Reservation, headers: RateLimitHeaders, status: int = 200) -> None:
        await adrive(self._observing(reservation, headers, status))

    def _observing(self, reservation: Reservation, headers: RateLimitHeaders, status: int) -> Steps[None]:
        if not isinstance(reservation, _RedisReservation):
            super().observe(reservation, headers, status)
            return
        accepted = 200 <= status < 300
        with self._lock:
            state = self._keys[reservation.key]
            state.answered = True
            reservation.refused = not accepted
            now = self._clock()
            if not accepted and "tokens" in state.budgets:  # a refusal took none of our tokens
                state.budgets["tokens"].advance(now)
                state.budgets["tokens"].give_back(reservation.tokens)
            # Long-window limits stay in this process's budgets; Redis keeps the per-minute ones.
            headers = self._read_windows(state, reservation, headers, accepted, now)
            # The local buckets learn the limits too, to limit by them at once if Redis fails later.
            for kind in _KINDS:
                limit = getattr(headers, f"limit_{kind}")
                if limit is not None:
                    state.minute(kind).learn(limit, self._headroom, self._initial_burst)
                    if kind == "tokens" and accepted and headers.remaining_tokens is not None:
                        overbooked = state.overbooked.total - state.overbooked.since(reservation.ready_at)
                        full = _server_full(state.tokens, headers.remaining_tokens, headers.reset_tokens)
                        state.refunds.observe(
                            reservation.ready_at, headers.remaining_tokens, reservation.marks[1], overbooked,
                            limit / 60, full,
                        )  # fmt: skip
            fulls = [
                _server_full(
                    state.minute(kind), getattr(headers, f"remaining_{kind}"), getattr(headers, f"reset_{kind}")
                )
                for kind in _KINDS
            ]
        yield from self._try(
            "observe",
            reservation.key,
            int(accepted),
            reservation.booked_at,
            reservation.tokens,
            *reservation.marks,
            *(_arg(v) for v in (headers.limit_requests, headers.remaining_requests)),
            *(_arg(v) for v in (headers.limit_tokens, headers.remaining_tokens)),
            *(_arg(v) for v in fulls),
        )
        learned = accepted or headers.limit_requests is not None or headers.limit_tokens is not None
        with self._lock:
            self._end_probe(state, reservation, learned=learned)
            self._reject_too_large(reservation.key, state)
            self._wake(state)

    def pause(self, reservation: Reservation, seconds: float, kind: str = "") -> None:
        drive(self._pausing(reservation, seconds, kind))

    async def apause(self, reservation: Reservation, seconds: float, kind: str = "") -> None:
        await adrive(self._pausing(reservation, seconds, kind))

    def _pausing(self, reservation: Reservation, seconds: float, kind: str) -> Steps[None]:
        if not isinstance(reservation, _RedisReservation):
            super().pause(reservation, seconds, kind)
            return
        with self._lock:  # this process pauses even if Redis fails now
            state = self._keys[reservation.key]
            state.paused_until = max(state.paused_until, self._clock() + seconds)
        yield from self._try("pause", reservation.key, seconds, kind, reservation.booked_at, _MIN_BURST_SECONDS)

    # -- what the bulk helpers plan with ---------------------------------------------------------

    def _info(self, key: LimitKey) -> Steps[Optional[_Info]]:
        with self._lock:
            self._state(key, self._clock())
        reply = yield from self._try("info", key)
        return None if reply is None else _Info(reply)

    def _planning(self, key: LimitKey, what: str) -> Steps[Any]:
        """What the bulk helpers plan with (``what``: that method of :class:`RateLimiter`), from Redis;
        from this process while Redis is down."""
        info = yield from self._info(key)
        if info is None:
            return getattr(RateLimiter, what)(self, key)
        if what == "request_rate":
            return info.requests[1] if info.requests else None
        if what == "token_burst":
            return info.tokens[2] if info.tokens else None
        return self.limits_for(key[1]).tpm is not None or info.answered or RateLimiter.limits_known(self, key)

    def request_rate(self, key: LimitKey) -> Optional[float]:
        return drive(self._planning(key, "request_rate"))  # type: ignore[no-any-return]

    def limits_known(self, key: LimitKey) -> bool:
        return drive(self._planning(key, "limits_known"))  # type: ignore[no-any-return]

    def token_burst(self, key: LimitKey) -> Optional[float]:
        return drive(self._planning(key, "token_burst"))  # type: ignore[no-any-return]

    async def arequest_rate(self, key: LimitKey) -> Optional[float]:
        return await adrive(self._planning(key, "request_rate"))  # type: ignore[no-any-return]

    async def alimits_known(self, key: LimitKey) -> bool:
        return await adrive(self._planning(key, "limits_known"))  # type: ignore[no-any-return]

    async def atoken_burst(self, key: LimitKey) -> Optional[float]:
        return await adrive(self._planning(key, "token_burst"))  # type: ignore[no-any-return]

    # -- looking at it ---------------------------------------------------------------------------

    def snapshot(self) -> Dict[str, Dict[str, Any]]:
        """As :meth:`RateLimiter.snapshot`, from Redis (from this process while Redis is down)."""
        out = super().snapshot()
        with self._lock:
            keys = list(self._keys)
        for key in keys:
            info = drive(self._info(key))
            if info is None:
                continue
            entry = out[key[1]]
            entry["paused_for"] = info.paused_for
            for name, bucket in (("requests", info.requests), ("tokens", info.tokens)):
                entry[f"{name}_limit"] = bucket[0] if bucket else None
                entry[f"{name}_burst"] = bucket[2] if bucket else None
                entry[f"{name}_level"] = bucket[3] if bucket else None
        return out

    def __repr__(self) -> str:
        """This process's view, without asking Redis (a repr neither waits on it nor fails it over): per
        model, the limits it knows and where they came from, its budgets, its callers waiting, when Redis
        last said its head may go; while Redis is down and it limits alone, its local buckets' levels and
        its share. Then ``shared``, ``local_only`` or ``unavailable``. Never the Redis password (only
        host, port and db) nor an API key (keys hold a hash of it, and are not shown)."""
        entries = RateLimiter.snapshot(self)  # the process's own buckets: no Redis call
        now = self._clock()
        local = self.local_only
        with self._lock:
            extras = {key[1]: (self._ready.get(key), self._local_share.get(key)) for key in self._keys}
        parts = []
        for model, entry in entries.items():
            ready, share = extras.get(model, (None, None))
            # In Redis mode the local buckets are not charged: their levels would mislead.
            text = f"{model}: {_describe_limits(entry, levels=local)}, waiting={entry['waiting']:.0f}"
            if local and share is not None:
                text += f", share {share[0]:.0%} of requests, {share[1]:.0%} of tokens"
            elif not local and ready is not None and ready > now:
                text += f", next turn in {ready - now:.2f}s (Redis)"
            text += f", cost x{entry['cost_factor']:.2f}" if entry["cost_factor"] != 1.0 else ""
            text += f", refunds {entry['refund_share']:.0%}" if entry["refund_share"] != 1.0 else ""
            text += f", paused {entry['paused_for']:.2f}s" if entry["paused_for"] else ""
            parts.append(text)
        if self._resting():
            state = "local_only" if local else "unavailable"  # limiting in this process alone, or failing
            mode = f"{state} (Redis failed; asked again in {self._down_until - now:.1f}s)"
        else:
            mode = "shared"
        default = self.limits_for("")
        return (
            f"<RedisRateLimiter redis={self._where} prefix={self._prefix!r} on_error={self._on_error!r} "
            f"rpm={default.rpm} tpm={default.tpm} {mode} [{'; '.join(parts)}]>"
        )


def _connect(redis: Union[str, Any], timeout: float) -> Any:
    if isinstance(redis, str):
        try:
            import redis as redis_py
        except ImportError:
            raise ImportError(
                "RedisRateLimiter needs the redis package: pip install 'throttled-openai[redis]'"
            ) from None
        return redis_py.Redis.from_url(redis, socket_timeout=timeout, socket_connect_timeout=timeout)
    if not callable(getattr(redis, "register_script", None)):
        raise TypeError(f"redis must be a URL or a redis.Redis client, got {type(redis).__name__}")
    if inspect.iscoroutinefunction(getattr(redis, "execute_command", None)):
        raise TypeError(
            "redis must be a URL or a synchronous client (redis.Redis), not redis.asyncio.Redis: one async "
            "client cannot serve two event loops, so async callers get one per loop, made from its settings"
        )
    kwargs = getattr(getattr(redis, "connection_pool", None), "connection_kwargs", None) or {}
    if kwargs and kwargs.get("socket_timeout") is None:
        log.warning(
            "throttled_openai: the Redis client given to RedisRateLimiter has no socket_timeout: a Redis that "
            "stops answering would hold calls until the OS gives up; give it one (and few retries)"
        )
    return redis


def _async_twin(client: Any, url: Optional[str], timeout: float) -> Any:
    """A ``redis.asyncio`` (or ``valkey.asyncio``) client that connects where ``client`` does, for the
    running event loop: from the URL, or from the connection settings of ``client``'s pool."""
    library = type(client).__module__.split(".")[0]  # redis or valkey
    aio = importlib.import_module(f"{library}.asyncio")
    redis_class = getattr(aio, "Valkey", None) or aio.Redis
    if url is not None:
        return redis_class.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    pool = client.connection_pool
    connection_class = getattr(importlib.import_module(f"{library}.asyncio.connection"), pool.connection_class.__name__)
    # The settings the async connection takes (the sync one has more: OCSP checks, say); objects of the
    # sync library (its retry policy, its connect hook) stay behind.
    accepted = _parameters(connection_class)
    settings = {
        k: v for k, v in pool.connection_kwargs.items() if k not in ("retry", "redis_connect_func") and k in accepted
    }
    return redis_class(connection_pool=aio.ConnectionPool(connection_class=connection_class, **settings))


def _parameters(cls: type) -> Set[str]:
    """The named arguments of ``__init__`` along ``cls``'s bases (each passes the rest on to the next)."""
    names: Set[str] = set()
    for klass in cls.__mro__[:-1]:  # (not object)
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return names


def _error_types(*names: str, builtin: Type[BaseException]) -> Tuple[Type[BaseException], ...]:
    """The exception classes of these ``names`` in redis-py and valkey-py (those installed), and ``builtin``."""
    found: List[Type[BaseException]] = [builtin]
    for module in ("redis.exceptions", "valkey.exceptions"):
        try:
            exceptions = __import__(module, fromlist=["_"])
        except ImportError:
            continue
        for name in names:
            error = getattr(exceptions, name, None)
            if isinstance(error, type) and issubclass(error, BaseException):
                found.append(error)
    return tuple(found)


def _describe(client: Any) -> str:
    """Where the client connects, without credentials: ``host:port/db`` or the socket path."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None) or {}
    if kwargs.get("path"):
        return f"unix:{kwargs['path']}/{kwargs.get('db', 0)}"
    if kwargs.get("host"):
        return f"{kwargs['host']}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
    return type(client).__name__


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _arg(value: Optional[float]) -> Any:
    return "" if value is None else value
