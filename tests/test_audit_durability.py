"""`audit.durability`: what a client holds is on record first (issue 16).

Under `written` (the default) an answer's end waits until its events are on every sink: a JSON answer's body
(and, while nothing of it went out, its head), the SSE event that answers the client's request, the gateway's
own refusal. The sink here is the real PostgreSQL, made to wait by a lock on its table held from another
connection, so the answer is seen waiting for the commit, then arriving once the commit can happen. An answer
whose events cannot be written within `write_timeout_s` is withheld: the client gets the audit-unavailable error
instead (or, if the stream had begun, a stream cut off without the answer), and the event is written when the
sink can take it. Under `queued` the answer goes out with its event queued, not yet written.

What a SIGKILL does to a replica under load is in tests/test_replicas.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.audit.event import AuditEvent, ChainKey
from gateway.audit.writer import AuditLog
from gateway.config import Audit, AuditSink
from gateway.metrics import Metrics
from tests.conftest import DSN
from tests.harness import Deployment, deploy
from tests.test_bad_input import BASE_HEADERS, modern
from tests.test_rate_limits import legacy_session

ECHO = {"name": "echo", "arguments": {"text": "on record"}}


async def rows(table: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(DSN)
    try:
        return [dict(r) for r in await conn.fetch(f"SELECT request_id, result, status, reason FROM {table}")]
    finally:
        await conn.close()


@contextmanager
def table_locked(table: str) -> Iterator[threading.Event]:
    """The audit table locked from another connection until the event yielded is set (or the block ends):
    the gateway's insert waits for the lock, so its commit, and whatever waits for it, waits too."""
    release, locked = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(DSN)
        try:
            async with conn.transaction():
                await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                locked.set()
                while not release.is_set():
                    await asyncio.sleep(0.01)
        finally:
            await conn.close()

    holder = threading.Thread(target=asyncio.run, args=(hold(),))
    holder.start()
    assert locked.wait(10), "the lock was never taken"
    try:
        yield release
    finally:
        release.set()
        holder.join(10)


class Call:
    """One request sent from a thread, recording when its answer's JSON-RPC message arrived (for an SSE answer,
    the event itself, read as it streams) and what it was."""

    def __init__(self, url: str, headers: dict[str, str], body: dict[str, Any]) -> None:
        self.status = 0
        self.message: dict[str, Any] | None = None
        self.arrived: float | None = None
        self.failure: Exception | None = None
        self._thread = threading.Thread(target=self._run, args=(url, headers, body))
        self._thread.start()

    def _run(self, url: str, headers: dict[str, str], body: dict[str, Any]) -> None:
        try:
            with httpx.stream("POST", url, headers=headers, json=body, timeout=30) as response:
                self.status = response.status_code
                if response.headers["content-type"].startswith("text/event-stream"):
                    for line in response.iter_lines():
                        if line.startswith("data: ") and '"id"' in line:
                            self.arrived, self.message = time.monotonic(), httpx.Response(200, content=line[6:]).json()
                else:
                    content = response.read()
                    self.arrived, self.message = time.monotonic(), httpx.Response(200, content=content).json()
        except httpx.HTTPError as failure:
            self.failure = failure

    def join(self) -> Call:
        self._thread.join(30)
        assert not self._thread.is_alive()
        return self


def request(deployment: Deployment, era: str, token: str, tool: dict[str, Any] = ECHO,
            request_id: int = 41) -> tuple[dict[str, str], dict[str, Any]]:
    if era == "legacy":  # answered as an SSE stream
        headers = legacy_session(deployment, token, "2025-11-25")
        return headers, {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": tool}
    headers, body = modern("tools/call", tool, id=request_id)
    return {**BASE_HEADERS, **headers, "Authorization": f"Bearer {token}"}, body


def until_answered(deployment: Deployment, forwarded: bool, calls: int, timeout: float = 10) -> float:
    """When the gateway had what it answers with: the upstream's answer to the echo call (if it is forwarded:
    more than `calls` echo calls seen), or the refusal's event queued behind the locked table (if it is not)."""
    deadline = time.monotonic() + timeout
    while (len(deployment.recorder.tool_calls("echo")) == calls if forwarded
           else deployment.runtime.audit.depth == 0):
        assert time.monotonic() < deadline, "the request never reached the point of answering"
        time.sleep(0.01)
    return time.monotonic()


def refused_for_audit(deployment: Deployment) -> float:
    metrics = httpx.get(f"{deployment.gateway.url}/metrics").text
    return next(s.value for f in text_string_to_metric_families(metrics) for s in f.samples
                if s.name == "mcp_gateway_requests_refused_audit_total")


@pytest.fixture
def gateway(tmp_path: Path, pg_table: str) -> Iterator[Deployment]:
    deployment = deploy("proxy", tmp_path, audit={"sinks": [{"type": "postgres", "dsn": DSN, "table": pg_table}],
                                                  "write_timeout_s": 2})
    try:
        token = deployment.token()
        assert httpx.post(deployment.url, **_kw(*request(deployment, "modern", token, request_id=1))).status_code \
            == 200  # the table exists from here on
        yield deployment
    finally:
        deployment.stop()


def _kw(headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    return {"headers": headers, "json": body}


@pytest.mark.parametrize(("era", "tool", "expect"), [
    ("modern", ECHO, "result"),  # a JSON answer
    ("legacy", ECHO, "result"),  # an SSE event
    ("modern", {"name": "delete_everything", "arguments": {}}, "error"),  # the gateway's own refusal
])
def test_an_answer_reaches_the_client_only_once_its_event_is_committed(gateway: Deployment, pg_table: str,
                                                                       era: str, tool: dict[str, Any],
                                                                       expect: str) -> None:
    headers, body = request(gateway, era, gateway.token(), tool)
    calls_before = len(gateway.recorder.tool_calls("echo"))
    with table_locked(pg_table) as release:
        call = Call(gateway.url, headers, body)
        answered = until_answered(gateway, expect == "result", calls_before)
        time.sleep(0.3)  # what the upstream answered has had time to reach the client, had nothing held it
        assert call.message is None, "the answer arrived before its event could be committed"
        assert time.monotonic() < answered + 1.5, "too slow to tell: the write timeout (2 s) is near"
        released_at = time.monotonic()
        release.set()
        call.join()
    assert call.failure is None and call.message is not None, call.failure
    assert expect in call.message and call.arrived is not None and call.arrived >= released_at
    committed = asyncio.run(rows(pg_table))
    assert [(r["result"], r["status"]) for r in committed if r["request_id"] == "41"] == \
        [("allowed" if expect == "result" else "denied", call.status)]
    assert len(gateway.recorder.tool_calls("echo")) == calls_before + (expect == "result")


@pytest.mark.parametrize("era", ["modern", "legacy"])
def test_an_answer_whose_event_cannot_be_written_in_time_is_withheld_and_its_event_written_later(
        gateway: Deployment, pg_table: str, era: str) -> None:
    headers, body = request(gateway, era, gateway.token())
    with table_locked(pg_table):
        call = Call(gateway.url, headers, body).join()  # the lock outlives write_timeout_s (2 s)
    if era == "modern":  # nothing of the answer had gone out: the audit-unavailable error instead
        assert call.status == 503 and call.message is not None
        assert call.message["error"]["code"] == -32053 and "result" not in call.message
    else:  # the stream had begun: it is cut off, without the answer and without its end
        assert call.status == 200 and call.message is None
        assert isinstance(call.failure, httpx.RemoteProtocolError), call.failure
    assert gateway.recorder.tool_calls("echo")[-1]["params"]["arguments"] == ECHO["arguments"], "never forwarded"
    assert refused_for_audit(gateway) == 1

    def written() -> list[dict[str, Any]]:
        return [r for r in asyncio.run(rows(pg_table)) if r["request_id"] == "41"]

    deadline = time.monotonic() + 10
    while not written():
        assert time.monotonic() < deadline, "the withheld answer's event was never written"
        time.sleep(0.05)
    assert [(r["result"], r["status"]) for r in written()] == [("allowed", 200)]  # as the upstream answered it


def test_under_queued_durability_the_answer_goes_out_with_its_event_still_queued(tmp_path: Path,
                                                                                 pg_table: str) -> None:
    deployment = deploy("proxy", tmp_path, audit={"sinks": [{"type": "postgres", "dsn": DSN, "table": pg_table}],
                                                  "durability": "queued"})
    try:
        token = deployment.token()
        assert httpx.post(deployment.url, **_kw(*request(deployment, "modern", token, request_id=1))).status_code \
            == 200
        deployment.gateway.call(deployment.runtime.audit.flush())
        with table_locked(pg_table):
            call = Call(deployment.url, *request(deployment, "modern", token)).join()
            assert call.status == 200 and call.message is not None and "result" in call.message
            assert deployment.runtime.audit.depth == 1, "the event should still be queued behind the lock"
        deployment.gateway.call(deployment.runtime.audit.flush())
        assert [r["result"] for r in asyncio.run(rows(pg_table)) if r["request_id"] == "41"] == ["allowed"]
    finally:
        deployment.stop()


class GatedSink:
    """A sink that fails while `broken`, and otherwise writes only when the test lets one write through."""

    name = "gated"

    def __init__(self) -> None:
        self.broken = True
        self.gate = asyncio.Semaphore(0)
        self.events: list[AuditEvent] = []

    async def open(self) -> None:
        pass

    async def write(self, events: list[AuditEvent], key: ChainKey) -> None:
        if self.broken:
            raise OSError("the disk is gone")
        await self.gate.acquire()
        self.events += events

    async def close(self) -> None:
        pass


async def test_under_buffer_answers_wait_neither_for_a_failing_sink_nor_for_the_backlog_it_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`on_sink_failure: buffer` chooses to answer with events held in memory while a sink fails; once it is
    back, an answer waits for its own event's batch, not for the (up to max_buffer) events held before it."""
    sink = GatedSink()
    monkeypatch.setattr("gateway.audit.writer.open_sink", lambda spec: sink)
    audit = Audit(sinks=(AuditSink(type="jsonl", path=tmp_path / "unused.jsonl"),), on_sink_failure="buffer",
                  batch_size=2, write_timeout_s=1, chain_key_file=tmp_path / "chain.key")
    log = AuditLog(audit, Metrics())
    log.start()
    try:
        for _ in range(6):
            log.record(AuditEvent(result="allowed", reason="test"))
        while not log.failing:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(log.written(), 0.5)  # the sink is failing: nobody waits
        sink.broken = False
        sink.gate.release()  # the first batch of the backlog goes through: the sink is back
        while log.failing:
            await asyncio.sleep(0.01)
        log.record(AuditEvent(result="allowed", reason="after"))
        await asyncio.wait_for(log.written(), 0.5)  # four held events still to write: not waited for
        for _ in range(3):
            sink.gate.release()
        while len(sink.events) < 7:
            await asyncio.sleep(0.01)
        log.record(AuditEvent(result="allowed", reason="caught up"))
        waiting = asyncio.ensure_future(log.written())  # the backlog is written: this one waits for its own write
        await asyncio.sleep(0.2)
        assert not waiting.done(), "an answer went out before its event was written, with no sink failing"
        sink.gate.release()
        await asyncio.wait_for(waiting, 1)
        assert [e.reason for e in sink.events][-2:] == ["after", "caught up"]
    finally:
        for _ in range(10):
            sink.gate.release()
        await log.close()
