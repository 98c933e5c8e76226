"""Where approvals live while they matter: in memory (one process), or in Redis so every replica sees them.

Owns keeping each record until it stops mattering (its expiry plus an hour of
history for the console), making a call's approval at most once however many
requests for it race (`create`: the live approval of the call if there is one,
else a new one, unless its caller already has `MAX_PENDING_PER_CALLER`
waiting), changing a record only if nobody changed it meanwhile (`swap`: this
is what makes an approved call pass exactly once), and waiting for a record to
change (a held call waits for its decision).

    redis   mcpgw:approval:<id>             the record (JSON), with a TTL
            mcpgw:approval-call:<call>      the id of the latest record of that call, as long as it
            mcpgw:approvals-of:<caller>     sorted set: the caller's pending approvals, by expiry
            mcpgw:approvals                 sorted set of ids by when they may be forgotten

A store that cannot be reached raises `StateUnavailable`: a call that needs an
approval is refused (503) rather than passed unchecked.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import TYPE_CHECKING, Protocol

from cachetools import TLRUCache

from gateway.approvals.model import Approval
from gateway.sessions import reached, redis_client

if TYPE_CHECKING:
    from gateway.config import Sessions

HISTORY_S = 3600  # a decided or expired approval stays listed this long past its expiry
MAX_PENDING_PER_CALLER = 50  # past it, a caller's next call that needs an approval is refused
_POLL_S = 0.2  # how often a Redis-backed wait looks for a decision


def _keep_until(approval: Approval) -> float:
    return approval.expires_at + HISTORY_S


def _caller_key(approval: Approval) -> str:
    return hashlib.sha256("\0".join(approval.caller).encode()).hexdigest()[:32]


class ApprovalStore(Protocol):
    async def create(self, approval: Approval) -> Approval | None:
        """The call's live (pending or approved) approval if it has one, else `approval`, recorded as the
        call's latest; None when the caller already has `MAX_PENDING_PER_CALLER` approvals pending."""

    async def get(self, approval_id: str) -> Approval | None: ...

    async def for_call(self, call: str) -> Approval | None:
        """The latest approval of `call`, if one is kept."""

    async def swap(self, old: Approval, new: Approval) -> bool:
        """Replace `old` by `new` if the stored record is still exactly `old`; whether it was."""

    async def listing(self) -> list[Approval]:
        """Every kept approval."""

    async def changed(self, approval: Approval, timeout_s: float) -> Approval | None:
        """The record once it differs from `approval` (None if gone), or `approval` after `timeout_s`."""

    async def close(self) -> None: ...


class MemoryApprovals:
    def __init__(self, max_items: int = 100_000) -> None:
        def until(_key: str, value: Approval, _now: float) -> float:
            return _keep_until(value)

        self._records: TLRUCache[str, Approval] = TLRUCache(maxsize=max_items, ttu=until, timer=time.time)
        self._calls: TLRUCache[str, Approval] = TLRUCache(maxsize=max_items, ttu=until, timer=time.time)
        self._pending: dict[str, set[str]] = {}  # caller -> ids of its approvals that were pending when last seen
        self._events: dict[str, asyncio.Event] = {}

    async def create(self, approval: Approval) -> Approval | None:
        # No await from here to the end: nothing else runs in between, so this is atomic in one process.
        now = time.time()
        latest = self._calls.get(approval.call)
        current = None if latest is None else self._records.get(latest.id)
        if current is not None and current.status_at(now) in ("pending", "approved"):
            return current
        caller = _caller_key(approval)
        pending = {i for i in self._pending.get(caller, ())
                   if (r := self._records.get(i)) is not None and r.status_at(now) == "pending"}
        if len(pending) >= MAX_PENDING_PER_CALLER:
            self._pending[caller] = pending
            return None
        self._pending[caller] = pending | {approval.id}
        self._records[approval.id] = approval
        self._calls[approval.call] = approval
        return approval

    async def get(self, approval_id: str) -> Approval | None:
        return self._records.get(approval_id)

    async def for_call(self, call: str) -> Approval | None:
        latest = self._calls.get(call)
        return None if latest is None else self._records.get(latest.id)

    async def swap(self, old: Approval, new: Approval) -> bool:
        if self._records.get(old.id) != old:
            return False
        self._records[old.id] = new
        if self._calls.get(new.call) is not None:
            self._calls[new.call] = new  # kept as long as the record it names
        event = self._events.pop(old.id, None)
        if event is not None:
            event.set()
        return True

    async def listing(self) -> list[Approval]:
        self._records.expire()
        return list(self._records.values())

    async def changed(self, approval: Approval, timeout_s: float) -> Approval | None:
        current = self._records.get(approval.id)
        if current != approval:
            return current
        event = self._events.setdefault(approval.id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return approval
        return self._records.get(approval.id)

    async def close(self) -> None:
        return None


# KEYS: call index, the new record, the caller's pending set, every approval.
# ARGV: new JSON, new id, keep-until (ms), now (s), new expiry (s), limit, record prefix, keep-until (s).
_CREATE = """
local latest = redis.call('GET', KEYS[1])
if latest then
  local record = redis.call('GET', ARGV[7] .. latest)
  if record then
    local found = cjson.decode(record)
    if (found.status == 'pending' or found.status == 'approved') and found.expires_at > tonumber(ARGV[4]) then
      return record
    end
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[4])
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[6]) then
  return false
end
redis.call('SET', KEYS[2], ARGV[1], 'PXAT', ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[2])
redis.call('PEXPIREAT', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[8], ARGV[2])
return ARGV[1]
"""

# Replace the record only if it is byte for byte the one the caller read; the call's index lives as long as
# it, and a record no longer pending leaves its caller's pending set.
# KEYS: the record, the call index, the caller's pending set. ARGV: old JSON, new JSON, keep-until (ms), id,
# still pending (1 or 0).
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
if redis.call('GET', KEYS[2]) == ARGV[4] then
  redis.call('PEXPIREAT', KEYS[2], ARGV[3])
end
if ARGV[5] == '0' then
  redis.call('ZREM', KEYS[3], ARGV[4])
end
return 1
"""


class RedisApprovals:
    _RECORD = "mcpgw:approval:"
    _CALL = "mcpgw:approval-call:"
    _OF = "mcpgw:approvals-of:"
    _ALL = "mcpgw:approvals"

    def __init__(self, config: Sessions) -> None:
        self._redis = redis_client(config)
        self._create = self._redis.register_script(_CREATE)
        self._swap = self._redis.register_script(_SWAP)

    @reached
    async def create(self, approval: Approval) -> Approval | None:
        until = _keep_until(approval)
        kept = await self._create(
            keys=[self._CALL + approval.call, self._RECORD + approval.id, self._OF + _caller_key(approval),
                  self._ALL],
            args=[approval.to_json(), approval.id, int(until * 1000), time.time(), approval.expires_at,
                  MAX_PENDING_PER_CALLER, self._RECORD, until])
        return None if kept is None else Approval.from_json(kept)

    @reached
    async def get(self, approval_id: str) -> Approval | None:
        raw = await self._redis.get(self._RECORD + approval_id)
        return None if raw is None else Approval.from_json(raw)

    @reached
    async def for_call(self, call: str) -> Approval | None:
        approval_id = await self._redis.get(self._CALL + call)
        return None if approval_id is None else await self.get(_text(approval_id))

    @reached
    async def swap(self, old: Approval, new: Approval) -> bool:
        until = _keep_until(new)
        swapped = await self._swap(
            keys=[self._RECORD + old.id, self._CALL + old.call, self._OF + _caller_key(old)],
            args=[old.to_json(), new.to_json(), int(until * 1000), old.id, int(new.status == "pending")])
        if swapped:
            await self._redis.zadd(self._ALL, {new.id: until})
        return bool(swapped)

    @reached
    async def listing(self) -> list[Approval]:
        await self._redis.zremrangebyscore(self._ALL, "-inf", time.time())
        ids = await self._redis.zrange(self._ALL, 0, -1)
        if not ids:
            return []
        raws = await self._redis.mget([self._RECORD + _text(i) for i in ids])
        return [Approval.from_json(raw) for raw in raws if raw is not None]

    async def changed(self, approval: Approval, timeout_s: float) -> Approval | None:
        deadline = time.monotonic() + timeout_s
        while True:
            current = await self.get(approval.id)
            if current != approval:
                return current
            left = deadline - time.monotonic()
            if left <= 0:
                return approval
            await asyncio.sleep(min(_POLL_S, left))

    async def close(self) -> None:
        await self._redis.aclose()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_approvals(config: Sessions) -> ApprovalStore:
    """Approvals live with the other state handles: in memory, or in the same Redis."""
    return RedisApprovals(config) if config.backend == "redis" else MemoryApprovals()
