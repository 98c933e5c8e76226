"""Token buckets kept in memory or in Redis: taking one token from each of several buckets, all or none.

Owns the arithmetic (a bucket refills at `rate` tokens a second up to `capacity`; a request takes one token
from every bucket it needs, or takes nothing and learns how long until it could) and its two homes:
`MemoryBuckets` for one process, and a Lua script Redis runs atomically, so that every replica sharing the
Redis draws from the same buckets and two replicas never both take the last token. Redis's own clock
(`TIME`) is the only clock the shared buckets read, so replicas' clocks need not agree.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cachetools import TLRUCache

from gateway.ratelimit.rules import Bucket
from gateway.sessions import reached

# KEYS: the buckets; ARGV: capacity and rate of each, in order. Returns {0, "0"} when a token was taken from
# every bucket, else {N, seconds until each would have one}: N the bucket (from 1) that keeps it longest, and
# nothing taken. A bucket is a hash {t: tokens, ts: when}; it expires once it would be full again, so an idle
# caller costs Redis nothing.
_TAKE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local tokens = {}
local wait = 0
local longest = 0
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[2 * i - 1])
  local rate = tonumber(ARGV[2 * i])
  local held = redis.call('HMGET', key, 't', 'ts')
  local t = tonumber(held[1]) or capacity
  local ts = tonumber(held[2]) or now
  t = math.min(capacity, t + math.max(0, now - ts) * rate)
  tokens[i] = t
  if t < 1 and (1 - t) / rate > wait then
    wait = (1 - t) / rate
    longest = i
  end
end
if longest > 0 then return {longest, tostring(wait)} end
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[2 * i - 1])
  local rate = tonumber(ARGV[2 * i])
  redis.call('HSET', key, 't', tostring(tokens[i] - 1), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((capacity - tokens[i] + 1) / rate * 1000) + 1000)
end
return {0, '0'}
"""
_PREFIX = "mcpgw:bucket:"


@dataclass(frozen=True, slots=True)
class Taken:
    """What taking a token from each bucket came to: taken (`rule` None), or refused by `rule`, whose bucket
    holds a token again in `wait_s` seconds."""

    wait_s: float = 0.0
    rule: str | None = None


class MemoryBuckets:
    """The buckets of one process. Bounded: a bucket is forgotten once it would be full again (a full bucket is
    what a new one would be), and past `max_buckets` the least recently used goes first."""

    def __init__(self, max_buckets: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        # key -> (tokens, when, when it is full again)
        self._held: TLRUCache[str, tuple[float, float, float]] = TLRUCache(
            maxsize=max_buckets, ttu=lambda _key, value, _now: value[2], timer=clock)
        self._clock = clock

    async def take(self, buckets: Sequence[Bucket]) -> Taken:
        now = self._clock()
        tokens = []
        refused = Taken()
        for bucket in buckets:
            held, since, _ = self._held.get(bucket.key, (float(bucket.capacity), now, now))
            held = min(bucket.capacity, held + max(0.0, now - since) * bucket.rate)
            tokens.append(held)
            if held < 1 and (1 - held) / bucket.rate > refused.wait_s:
                refused = Taken((1 - held) / bucket.rate, bucket.rule)
        if refused.rule is not None:
            return refused
        for bucket, held in zip(buckets, tokens, strict=True):
            self._held[bucket.key] = (held - 1, now, now + (bucket.capacity - held + 1) / bucket.rate)
        return refused


class RedisBuckets:
    """The buckets every replica sharing one Redis draws from: one script call per decision."""

    def __init__(self, redis: Any) -> None:
        self._script = redis.register_script(_TAKE)

    @reached
    async def take(self, buckets: Sequence[Bucket]) -> Taken:
        args: list[Any] = []
        for bucket in buckets:
            args += [bucket.capacity, repr(bucket.rate)]
        keys = [_PREFIX + hashlib.sha256(b.key.encode()).hexdigest() for b in buckets]
        longest, wait = await self._script(keys=keys, args=args)
        return Taken() if int(longest) == 0 else Taken(max(float(wait), 1e-3), buckets[int(longest) - 1].rule)


def retry_after(seconds: float) -> int:
    """Whole seconds for `Retry-After` (at least one: a client told 0 would ask again at once)."""
    return max(1, math.ceil(seconds))
