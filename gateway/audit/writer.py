"""The audit log's writer: every decision becomes an `AuditEvent`, queued without waiting, written in batches.

Owns the bounded in-memory queue between the request path and the sinks, the
writer task that drains it in batches to every sink, the behaviour when a
sink fails, and the flush on shutdown.

- `record()` never awaits disk or network. When the queue holds `max_buffer`
  events it raises `AuditUnavailable`: the caller refuses the request rather
  than lose the event, and the refusal is counted.
- A batch that a sink cannot take stays queued and is retried (every sink
  keeps its own place: a batch is never written twice to one sink).
- `on_sink_failure: fail_closed` — while a sink is failing, `accepting()` is
  false and the gateway refuses new requests (503); the refusals themselves are
  queued and written once the sink recovers. `buffer` — requests go on and events
  accumulate, up to `max_buffer`.
- `durability: written` — `written()` waits until every event recorded so far
  is on every sink (committed; the JSONL file fsynced). The request path awaits
  it before an answer's last byte, so an answer a client received whole has its
  events written: a process killed at any moment has lost none of them. While
  anyone waits the writer does not linger for a batch to gather: what queued
  during one sink write goes in the next (group commit). `queued` — `written()`
  returns at once; an answer waits only for its event to be queued, and a
  killed process loses the events still queued. Past `write_timeout_s`
  `written()` raises `AuditUnavailable` and the answer is withheld; under
  `buffer`, while a sink is failing and until what was held meanwhile is
  written, nobody waits (the events are held in memory, which is what `buffer`
  chooses).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections import deque
from typing import TYPE_CHECKING

from gateway.audit.chainkey import load_or_create_chain_key
from gateway.audit.event import AuditEvent
from gateway.audit.sinks import Sink, open_sink
from gateway.exceptions import GatewayError

if TYPE_CHECKING:
    from gateway.config import Audit
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.audit")

_LINGER_S = 0.01
_RETRY_S = 0.5


class AuditUnavailable(GatewayError):
    """The event cannot be accepted without being lost (the buffer is full)."""


class AuditLog:
    """The queue and writer for one gateway process.

    Args:
        config: the `audit:` section (sinks, on_sink_failure, max_buffer, batch_size, chain_key_file).
        metrics: where written / buffered / refused / sink-error counts go.

    The chain key is read here, once for the life of the process (and created if absent).
    """

    def __init__(self, config: Audit, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self.key = load_or_create_chain_key(config.chain_key_file)
        self._queue: deque[AuditEvent] = deque()
        self._sinks: list[Sink] = []
        self._offsets: list[int] = []  # per sink: how many events at the head of the queue it already holds
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._closing = False
        self._recorded = 0  # events recorded in the life of the process
        self._written = 0  # of those, how many are on every sink (events are written in the order recorded)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()  # (events recorded, ...) in that order
        self._backlog_end = 0  # under buffer: the events recorded when the failing sinks recovered
        self.failing: set[str] = set()  # names of sinks whose last write failed
        self.chain = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this writer's hash chain
        # the policy in force, which every event names (the runtime keeps it current across reloads)
        self.policy_version: str | None = None

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def sinks(self) -> list[Sink]:
        return self._sinks

    def accepting(self) -> bool:
        """May new requests be served? False when fail_closed and a sink is failing, or the buffer is full."""
        if len(self._queue) >= self._config.max_buffer:
            return False
        return not (self._config.on_sink_failure == "fail_closed" and self.failing)

    def start(self) -> None:
        """Start the writer on the running loop (idempotent). Sinks are opened by the writer, with retries."""
        if self._task is not None:
            return
        self._sinks = [open_sink(spec) for spec in self._config.sinks]
        self._offsets = [0] * len(self._sinks)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")

    def record(self, event: AuditEvent) -> None:
        if len(self._queue) >= self._config.max_buffer:
            self._metrics.audit_refused.inc()
            raise AuditUnavailable(f"audit buffer full ({self._config.max_buffer} events)")
        event.chain = self.chain
        if event.policy_version is None:
            event.policy_version = self.policy_version
        if event.rule is None:  # whatever refused or recorded it without a policy rule: the check is its reason
            event.rule = event.reason
        self._queue.append(event)
        self._recorded += 1
        self._metrics.audit_queue_depth.set(len(self._queue))
        self._wake.set()

    async def written(self) -> None:
        """Under `durability: written`, return once every event recorded so far is on every sink; raise
        `AuditUnavailable` if that takes longer than `write_timeout_s` (the events stay queued). Under `queued`,
        return at once."""
        if self._config.durability == "queued" or self._written >= self._recorded or self._buffering():
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append((self._recorded, waiter))
        self._wake.set()
        # A timer on the future itself rather than asyncio.wait_for, which relays the result through a future of
        # its own: one turn of the event loop fewer between the commit and the answer going out.
        timer = loop.call_later(self._config.write_timeout_s, _time_out, waiter)
        try:
            await waiter
        except TimeoutError:
            raise AuditUnavailable(f"audit events not written within {self._config.write_timeout_s} s (failing "
                                   f"sinks: {', '.join(sorted(self.failing)) or 'none'}; {len(self._queue)} queued)"
                                   ) from None
        finally:
            timer.cancel()

    def _buffering(self) -> bool:
        """on_sink_failure: buffer, and a sink is failing, or the events held meanwhile are still being written:
        answers go out with their events held in memory (not behind a backlog of up to max_buffer events)."""
        return self._config.on_sink_failure == "buffer" and bool(self.failing or self._written < self._backlog_end)

    def _release_waiters(self) -> None:
        waiters, written = self._waiters, self._written
        if self._buffering():
            written = self._recorded
        while waiters and waiters[0][0] <= written:
            _, waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def _run(self) -> None:
        await self._open_sinks()
        while True:
            await self._wake.wait()
            if len(self._queue) < self._config.batch_size and not self._closing and not self._waiters:
                await asyncio.sleep(_LINGER_S)  # let a batch gather: one transaction per batch, not per event
            self._wake.clear()
            await self._drain()
            if self._closing and not self._queue:
                return

    async def _open_sinks(self) -> None:
        pending = list(range(len(self._sinks)))
        while pending:
            for index in list(pending):
                sink = self._sinks[index]
                try:
                    await sink.open()
                except Exception as exc:
                    self._failed(sink, exc)
                    continue
                pending.remove(index)
                self._recovered(sink)
            if pending:
                await asyncio.sleep(_RETRY_S)

    async def _drain(self) -> None:
        async with self._lock:
            while self._queue:
                size = min(self._config.batch_size, len(self._queue))
                for index, sink in enumerate(self._sinks):
                    while self._offsets[index] < size:
                        start = self._offsets[index]
                        batch = [self._queue[i] for i in range(start, size)]
                        try:
                            await sink.write(batch, self.key)
                        except Exception as exc:
                            self._failed(sink, exc)
                            await asyncio.sleep(_RETRY_S)
                            continue
                        self._offsets[index] = size
                        self._recovered(sink)
                        self._metrics.audit_written.labels(sink.name).inc(len(batch))
                for _ in range(size):
                    self._queue.popleft()
                self._written += size
                self._release_waiters()
                self._offsets = [offset - size for offset in self._offsets]
                self._metrics.audit_queue_depth.set(len(self._queue))
                self._metrics.audit_buffered.set(len(self._queue) if self.failing else 0)

    def _failed(self, sink: Sink, exc: Exception) -> None:
        if sink.name not in self.failing:
            log.error("audit sink %s failed (%s): %d events held for retry", sink.name, exc, len(self._queue))
        self.failing.add(sink.name)
        self._metrics.audit_sink_errors.labels(sink.name).inc()
        self._metrics.audit_buffered.set(len(self._queue))
        self._release_waiters()

    def _recovered(self, sink: Sink) -> None:
        if sink.name in self.failing:
            self.failing.discard(sink.name)
            log.warning("audit sink %s recovered", sink.name)
            if not self.failing:
                self._backlog_end = self._recorded

    async def flush(self) -> None:
        """Wait until everything queued so far is written to every sink (events leave the queue only then)."""
        while self._queue:
            self._wake.set()
            await asyncio.sleep(0.005)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Flush the queue, stop the writer, close the sinks. A sink still down after `timeout_s` is reported
        with the number of events it never received; nothing is dropped without that line in the log."""
        if self._task is None:
            return
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            self._task.cancel()
            log.critical("audit: %d events could not be written before shutdown (failing sinks: %s)",
                         len(self._queue), ", ".join(sorted(self.failing)))
        self._task = None
        for sink in self._sinks:
            try:
                await sink.close()
            except Exception:
                log.exception("audit sink %s did not close cleanly", sink.name)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
