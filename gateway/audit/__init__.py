"""The audit trail: every decision becomes an `AuditEvent`, queued without waiting, written in batches.

Owns: the bounded in-memory queue between the request path and the sinks,
the writer task that drains it in batches to every sink, and the flush on
shutdown. `record()` never awaits disk or network; when the queue is full it
raises `AuditUnavailable` so the caller refuses the request rather than
dropping the event. A sink that fails keeps its batch and is retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from gateway.audit.event import AuditEvent, redact_arguments
from gateway.audit.sinks import JsonlSink, Sink, SqliteSink
from gateway.config import Audit

__all__ = ["AuditEvent", "AuditLog", "AuditUnavailable", "redact_arguments"]

log = logging.getLogger("gateway.audit")


class AuditUnavailable(Exception):
    """The queue is full: the event cannot be accepted without being lost."""


class AuditLog:
    """The queue and writer for one gateway process.

    Args:
        config: the `audit:` section (sinks, max_queue, batch_size).
    """

    def __init__(self, config: Audit) -> None:
        self._config = config
        self._queue: deque[AuditEvent] = deque()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._sinks: list[Sink] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.written = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        """Open the sinks and start the writer on the running loop (idempotent)."""
        if self._task is not None:
            return
        for spec in self._config.sinks:
            self._sinks.append(SqliteSink(spec.path) if spec.type == "sqlite" else JsonlSink(spec.path))
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")

    def record(self, event: AuditEvent) -> None:
        if len(self._queue) >= self._config.max_queue:
            raise AuditUnavailable(f"audit queue full ({self._config.max_queue} events)")
        self._queue.append(event)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._drain()
            if self._closing:
                return

    async def _drain(self) -> None:
        async with self._lock:
            while self._queue:
                batch = [self._queue[i] for i in range(min(self._config.batch_size, len(self._queue)))]
                done: set[int] = set()  # sinks that already hold this batch: a retry must not write it twice
                while len(done) < len(self._sinks):
                    for index, sink in enumerate(self._sinks):
                        if index in done:
                            continue
                        try:
                            await sink.write(batch)
                        except Exception:
                            log.exception("audit sink %s failed; %d events kept for retry", sink.name, len(batch))
                            continue
                        done.add(index)
                    if len(done) < len(self._sinks):
                        await asyncio.sleep(0.5)
                for _ in batch:
                    self._queue.popleft()
                self.written += len(batch)

    async def flush(self) -> None:
        """Wait until everything queued so far is written."""
        await self._drain()

    async def close(self) -> None:
        """Flush the queue, stop the writer, close the sinks."""
        if self._task is None:
            return
        self._closing = True
        self._wake.set()
        await self._task
        self._task = None
        for sink in self._sinks:
            await sink.close()
        self._sinks.clear()
