"""The processes of one stdio upstream: one per isolation key, bounded, stopped when idle, restarted with backoff.

Owns which process serves a key (a caller, a legacy session, or everyone: the
upstream's `isolation` decides the key, `stdio.upstream` computes it), that no
more than `process.max_processes` run at once (past that a new key is refused,
never forked), that a process unused for `process.idle_timeout_s` is stopped,
that a process that broke is replaced by a fresh one on the next call after a
backoff (0.5 s doubling to 30 s while it keeps breaking), and that a crash loop
(3 breaks within a minute) is visible to `/readyz` and the metrics. On close,
every process is stopped (its whole process group).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.exceptions import GatewayError
from gateway.stdio.channel import Broken, Channel
from gateway.stdio.process import ProcessSpec

if TYPE_CHECKING:
    from gateway.config import Limits, Upstream
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.stdio")

_BACKOFF_S = (0.5, 30.0)
_LOOP_BREAKS, _LOOP_WINDOW_S = 3, 60.0


class PoolFull(GatewayError):
    """Every process slot is taken by another key."""


@dataclass(frozen=True, slots=True)
class Running:
    """One running process, as an operator sees it: whose it is (its isolation key), when it started (UNIX
    seconds), and how long it has had nothing to do (None while it serves a call or a stream)."""

    whose: str
    pid: int
    started_at: float
    idle_s: float | None


class Pool:
    """The running processes of one stdio upstream, by isolation key."""

    def __init__(self, upstream: Upstream, limits: Limits, metrics: Metrics) -> None:
        assert upstream.command is not None
        process = upstream.process
        self.upstream = upstream
        self._spec = ProcessSpec(upstream.name, upstream.command, dict(upstream.env),
                                 str(upstream.cwd) if upstream.cwd is not None else None, process.memory_mb,
                                 process.cpu_s, process.open_files, process.user, process.group)
        self._max_line = limits.max_inspected_bytes
        self._timeout_s = limits.upstream_timeout_s
        self._metrics = metrics
        self._channels: dict[str, Channel] = {}
        self._starting: dict[str, asyncio.Task[Channel]] = {}
        self._breaks: list[float] = []  # when processes broke, for the backoff and the crash-loop verdict
        self._reaper: asyncio.Task[None] | None = None

    @property
    def crash_looping(self) -> bool:
        now = time.monotonic()
        return sum(1 for t in self._breaks if now - t < _LOOP_WINDOW_S) >= _LOOP_BREAKS

    async def channel(self, key: str) -> Channel:
        """The process serving `key`, started if there is none (or the last one broke). Raises Broken, PoolFull."""
        self._ensure_reaper()
        channel = self._channels.get(key)
        if channel is not None and channel.broken is None:
            return channel
        if channel is not None:
            await self._remove(key, channel.broken.kind if channel.broken else "exited")
        starting = self._starting.get(key)
        if starting is None:
            if len(self._channels) + len(self._starting) >= self.upstream.process.max_processes:
                raise PoolFull(f"{self.upstream.name}: all {self.upstream.process.max_processes} processes in use")
            starting = self._starting[key] = asyncio.get_running_loop().create_task(self._start(key))
            starting.add_done_callback(lambda task: self._started(key, task))
        return await asyncio.shield(starting)  # a caller that goes away does not stop the start for others

    def _started(self, key: str, task: asyncio.Task[Channel]) -> None:
        self._starting.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here: every caller waiting on it may have gone away

    def running(self) -> list[Running]:
        now = time.monotonic()
        return [Running(key, channel.child.pid, channel.started_at, now - channel.last_used if channel.idle else None)
                for key, channel in self._channels.items() if channel.broken is None]

    def existing(self, key: str) -> Channel | None:
        channel = self._channels.get(key)
        return channel if channel is not None and channel.broken is None else None

    async def end(self, key: str, reason: str) -> None:
        """Stop the process serving `key`, if any (a legacy session that ended)."""
        channel = self._channels.get(key)
        if channel is not None:
            await self._remove(key, reason)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for task in list(self._starting.values()):
            task.cancel()
        await asyncio.gather(*(self._remove(key, "shutdown") for key in list(self._channels)),
                             return_exceptions=True)

    async def _start(self, key: str) -> Channel:
        await asyncio.sleep(self._backoff_s())
        self._metrics.stdio_spawns.labels(self.upstream.name).inc()
        try:
            channel = await Channel.open(self._spec, max_line_bytes=self._max_line, timeout_s=self._timeout_s)
        except Broken:
            self._breaks.append(time.monotonic())
            self._metrics.stdio_exits.labels(self.upstream.name, "spawn").inc()
            raise
        self._channels[key] = channel
        self._metrics.stdio_processes.labels(self.upstream.name).inc()
        log.info("%s: started process %d", self.upstream.name, channel.child.pid,
                 extra={"upstream": self.upstream.name, "pid": channel.child.pid})
        return channel

    def _backoff_s(self) -> float:
        now = time.monotonic()
        recent = [t for t in self._breaks if now - t < _LOOP_WINDOW_S]
        self._breaks = recent
        if not recent:
            return 0.0
        low, high = _BACKOFF_S
        return max(0.0, min(high, low * 2.0 ** (len(recent) - 1)) - (now - recent[-1]))

    async def _remove(self, key: str, reason: str) -> None:
        channel = self._channels.pop(key, None)
        if channel is None:
            return
        if channel.broken is not None and reason in ("exited", "protocol", "timeout"):
            self._breaks.append(time.monotonic())
        self._metrics.stdio_processes.labels(self.upstream.name).dec()
        self._metrics.stdio_exits.labels(self.upstream.name, reason).inc()
        await channel.close()

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        idle_s = self.upstream.process.idle_timeout_s
        while True:
            await asyncio.sleep(min(idle_s / 4, 30.0))
            now = time.monotonic()
            for key, channel in list(self._channels.items()):
                if channel.broken is not None:
                    await self._remove(key, channel.broken.kind)
                elif channel.idle and now - channel.last_used >= idle_s:
                    with contextlib.suppress(Exception):
                        await self._remove(key, "idle")
