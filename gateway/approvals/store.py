"""Where approvals live while they matter: in memory (one process), or in Redis so every replica sees them.

Owns keeping each record until it stops mattering (its expiry plus an hour of
history for the console), finding the latest record of a call, changing a
record only if nobody changed it meanwhile (`swap`: this is what makes an
approved call pass exactly once, however many requests race for it), and
waiting for a record to change (a held call waits for its decision).

    redis   mcpgw:approval:<id>          the record (JSON), with a TTL
            mcpgw:approval-call:<call>   the id of the latest record of that call
            mcpgw:approvals              sorted set of ids by when they may be forgotten

A store that cannot be reached raises `StateUnavailable`: a call that needs an
approval is refused (503) rather than passed unchecked.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

from cachetools import TLRUCache

from gateway.approvals.model import Approval
from gateway.sessions import reached, redis_client

if TYPE_CHECKING:
    from gateway.config import Sessions

HISTORY_S = 3600  # a decided or expired approval stays listed this long past its expiry
_POLL_S = 0.2  # how often a Redis-backed wait looks for a decision


def _keep_until(approval: Approval) -> float:
    return approval.expires_at + HISTORY_S


class ApprovalStore(Protocol):
    async def put(self, approval: Approval) -> None:
        """Record a new approval as the latest of its call."""

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
        self._records: TLRUCache[str, Approval] = TLRUCache(
            maxsize=max_items, ttu=lambda _k, v, _now: _keep_until(v), timer=time.time)
        self._calls: dict[str, str] = {}
        self._events: dict[str, asyncio.Event] = {}

    async def put(self, approval: Approval) -> None:
        self._records[approval.id] = approval
        self._calls = {c: i for c, i in self._calls.items() if i in self._records}
        self._calls[approval.call] = approval.id

    async def get(self, approval_id: str) -> Approval | None:
        return self._records.get(approval_id)

    async def for_call(self, call: str) -> Approval | None:
        approval_id = self._calls.get(call)
        return None if approval_id is None else self._records.get(approval_id)

    async def swap(self, old: Approval, new: Approval) -> bool:
        if self._records.get(old.id) != old:
            return False
        self._records[old.id] = new
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


# Replace the record only if it is byte for byte the one the caller read.
_SWAP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
  return 1
end
return 0
"""


class RedisApprovals:
    _RECORD = "mcpgw:approval:"
    _CALL = "mcpgw:approval-call:"
    _ALL = "mcpgw:approvals"

    def __init__(self, config: Sessions) -> None:
        self._redis = redis_client(config)
        self._swap = self._redis.register_script(_SWAP)

    @reached
    async def put(self, approval: Approval) -> None:
        until_ms = int(_keep_until(approval) * 1000)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._RECORD + approval.id, approval.to_json(), pxat=until_ms)
            pipe.set(self._CALL + approval.call, approval.id, pxat=until_ms)
            pipe.zadd(self._ALL, {approval.id: _keep_until(approval)})
            await pipe.execute()

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
        until_ms = int(_keep_until(new) * 1000)
        swapped = await self._swap(keys=[self._RECORD + old.id], args=[old.to_json(), new.to_json(), until_ms])
        if swapped:
            await self._redis.zadd(self._ALL, {new.id: _keep_until(new)})
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
