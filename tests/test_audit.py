"""The audit trail against real sinks: SQLite and JSONL files and the PostgreSQL server on 127.0.0.1:5432.

Exactly one event per request, in every sink; nothing lost under load, when a
sink fails, or at shutdown; tampering found by `audit verify`, with the chain
key, even when whoever tampered recomputed the chain.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import create_app
from gateway.audit.chainkey import load_or_create_chain_key
from gateway.audit.event import GENESIS, AuditEvent, ChainKey, record_bytes
from gateway.audit.sinks import AuditQuery, open_sink
from gateway.audit.writer import AuditLog
from gateway.config import Audit, AuditSink, load_config
from gateway.metrics import Metrics
from tests.conftest import DSN
from tests.harness import ROOT, Deployment, ServerThread, deploy, free_port, wait_for_port, write_config
from tests.test_bad_input import BASE_HEADERS, modern
from tests.test_upstream_failures import ScriptedUpstream


def sinks(tmp_path: Path, table: str) -> list[dict[str, Any]]:
    return [{"type": "sqlite", "path": str(tmp_path / "audit.db")},
            {"type": "jsonl", "path": str(tmp_path / "audit.jsonl")},
            {"type": "postgres", "dsn": DSN, "table": table}]


def read_all(deployment: Deployment, sink_index: int) -> list[dict[str, Any]]:
    """Every event of one sink, through that sink's own query path."""
    spec = deployment.runtime.config.audit.sinks[sink_index]
    deployment.gateway.call(deployment.runtime.audit.flush())

    async def read() -> list[dict[str, Any]]:
        reader = open_sink(spec)
        try:
            return await reader.query(AuditQuery(limit=1_000_000))
        finally:
            await reader.close()

    return asyncio.run(read())


def audit_verify(config_path: Path) -> subprocess.CompletedProcess[str]:
    """`mcp-gateway audit verify --config config_path`, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "verify", "--config", str(config_path)],
                          capture_output=True, text=True, cwd=ROOT)


def verify(deployment: Deployment) -> list[str]:
    return audit_verify(deployment.config_path).stdout.splitlines()


def call(url: str, token: str | None, tool: str = "echo", **headers: str) -> httpx.Response:
    h, body = modern("tools/call", {"name": tool, "arguments": {"text": "x", "api_key": "k-123"}})
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    h.update({name.replace("_", "-"): value for name, value in headers.items()})
    return httpx.post(url, headers={**BASE_HEADERS, **h, **auth}, json=body)


def test_every_result_kind_is_exactly_one_event_with_its_fields_in_every_sink(tmp_path: Path, pg_table: str) -> None:
    deployment = deploy("proxy", tmp_path, audit={"sinks": sinks(tmp_path, pg_table)})
    dead = ScriptedUpstream(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    try:
        token = deployment.token()
        assert call(deployment.url, token).status_code == 200
        assert call(deployment.url, token, "delete_file").status_code == 400
        assert call(deployment.url, None).status_code == 401
        assert call(deployment.url, token, Mcp_Name="other").status_code == 400
        expected = [("allowed", "echo", 200, "alice"), ("denied", "delete_file", 400, "alice"),
                    ("auth_failed", None, 401, None), ("invalid_request", None, 400, "alice")]
        per_sink = [read_all(deployment, i) for i in range(3)]
        for events in per_sink:
            assert [(e["result"], e["tool_executed"], e["status"], e["user_id"]) for e in events] == expected
            allowed = events[0]
            assert allowed["reason"] == "role:reader:tool" and allowed["operation"] == "tools/call"
            assert allowed["upstream"] == "demo" and allowed["source_ip"] == "127.0.0.1"
            assert allowed["protocol_version"] == "2026-07-28" and allowed["request_id"] == "7"
            assert allowed["roles"] == ["reader"] and allowed["policy_version"]
            assert json.loads(allowed["arguments"]) == {"text": "x", "api_key": "[REDACTED]"}
            assert allowed["duration_ms"] > 0 and abs(allowed["timestamp"] - time.time()) < 60
            assert events[2]["reason"] == "no_token"
            assert events[3]["reason"].startswith("header_mismatch:")
        assert per_sink[0] == per_sink[1] == per_sink[2], "the sinks disagree"
        assert len({e["id"] for e in per_sink[0]}) == 4
    finally:
        deployment.stop()

    for url, result, reason in ((f"http://127.0.0.1:{free_port()}/mcp", "upstream_error", "upstream:connect"),
                                (f"http://127.0.0.1:{dead.port}/mcp", "error", "status:500")):
        other = tmp_path / result
        other.mkdir()
        port = free_port()
        app = create_app(write_config(other, url, public_url=f"http://127.0.0.1:{port}"))
        server = ServerThread(app, port).start()
        try:
            config = app.runtime.config
            token = app.runtime.authenticator.issue_token(subject="alice", audience=config.resource_url(
                config.upstreams[0]), scopes=["mcp:tools"])
            call(f"{server.url}/mcp", token)
            server.call(app.runtime.audit.flush())
            db = sqlite3.connect(config.audit.sinks[0].path)
            rows = db.execute("SELECT result, reason FROM audit_events").fetchall()
            db.close()
            assert rows == [(result, reason)]
        finally:
            server.stop()
    dead.close()


async def _load(url: str, tokens: dict[str, str], total: int, concurrency: int = 32) -> dict[int, int]:
    statuses: dict[int, int] = {}
    kinds = [("echo", "good"), ("delete_file", "good"), ("echo", "none"), ("echo", "bad")]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)

    async def worker(client: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            tool, who = kinds[i % len(kinds)]
            headers, body = modern("tools/call", {"name": tool, "arguments": {"text": str(i)}})
            if who != "none":
                headers["Authorization"] = f"Bearer {tokens[who]}"
            async with client.post(url, headers={**BASE_HEADERS, **headers}, json=body) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1

    # aiohttp, not httpx: the load generator shares the gateway's interpreter, and costs it less this way
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses


def test_5000_mixed_requests_give_exactly_5000_events_in_each_sink(tmp_path: Path, pg_table: str) -> None:
    deployment = deploy("proxy", tmp_path, stateless=True, json_response=True,
                        audit={"sinks": sinks(tmp_path, pg_table), "batch_size": 200})
    try:
        tokens = {"good": deployment.token(), "bad": "x.y.z"}
        statuses = asyncio.run(_load(deployment.url, tokens, 5000))
        assert statuses == {200: 1250, 400: 1250, 401: 2500}
        for index in range(3):
            events = read_all(deployment, index)
            assert len(events) == 5000 and len({e["id"] for e in events}) == 5000
            counts = {r: sum(e["result"] == r for e in events) for r in ("allowed", "denied", "auth_failed")}
            assert counts == {"allowed": 1250, "denied": 1250, "auth_failed": 2500}
        assert all(line.endswith("5000 events, chain intact") for line in verify(deployment))
    finally:
        deployment.stop()


def test_a_postgres_outage_fails_closed_and_loses_nothing(tmp_path: Path, pg_table: str) -> None:
    deployment = deploy("proxy", tmp_path, audit={"sinks": sinks(tmp_path, pg_table)[::2],
                                                  "on_sink_failure": "fail_closed", "write_timeout_s": 1})
    token = deployment.token()

    async def sql(statement: str) -> None:
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    try:
        assert call(deployment.url, token).status_code == 200
        deployment.gateway.call(deployment.runtime.audit.flush())
        # A cut connection: the sink reconnects on its next batch; nothing is refused for long.
        asyncio.run(sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        f"WHERE datname = 'test' AND pid <> pg_backend_pid() AND query ILIKE '%{pg_table}%'"))
        # A sustained outage: the table is gone while requests keep coming.
        asyncio.run(sql(f"ALTER TABLE {pg_table} RENAME TO {pg_table}_away"))
        statuses = []
        for _ in range(20):
            statuses.append(call(deployment.url, token).status_code)
            time.sleep(0.05)
        # the first call went through to the upstream; its answer waited for its event, which could not be written
        # within write_timeout_s: withheld (503). From then on the gateway knows the sink is failing: refused.
        assert statuses == [503] * 20, "an answer went out while the audit trail could not record it"
        ready = httpx.get(f"{deployment.gateway.url}/readyz")
        assert ready.status_code == 503 and ready.json()["failing_sinks"] == [f"postgres:{pg_table}"]
        asyncio.run(sql(f"ALTER TABLE {pg_table}_away RENAME TO {pg_table}"))
        probes = []
        deadline = time.monotonic() + 15
        while not probes or probes[-1] != 200:
            assert time.monotonic() < deadline, "never recovered"
            probes.append(call(deployment.url, token).status_code)
            time.sleep(0.1)
        made = 1 + len(statuses) + len(probes)
        refused = statuses.count(503) + probes.count(503)
        sqlite_events = read_all(deployment, 0)
        pg_events = read_all(deployment, 1)
        assert sqlite_events == pg_events, "the sinks disagree after the outage"
        assert len(pg_events) == made, "a request went unrecorded"
        # every 503 but the withheld answer is a refusal on record as such; the withheld one is on record as the
        # upstream answered it
        assert [e["reason"] for e in pg_events].count("audit_unavailable") == refused - 1
        assert all(line.endswith("chain intact") for line in verify(deployment))
    finally:
        deployment.stop()


@pytest.mark.parametrize("fault", ["unwritable", "disk full"])
def test_an_unwritable_file_or_a_full_disk_buffers_then_recovers_with_nothing_lost(tmp_path: Path, fault: str) -> None:
    path = tmp_path / "audit.jsonl"
    deployment = deploy("proxy", tmp_path, audit={"sinks": [{"type": "jsonl", "path": str(path)}],
                                                  "on_sink_failure": "buffer"})
    token = deployment.token()
    try:
        assert call(deployment.url, token).status_code == 200
        deployment.gateway.call(deployment.runtime.audit.flush())
        path.rename(tmp_path / "kept.jsonl")
        if fault == "unwritable":
            path.mkdir()  # root ignores file modes, so "unwritable" is a directory standing where the file was
        else:
            path.symlink_to("/dev/full")  # every write fails with ENOSPC
        statuses = [call(deployment.url, token).status_code for _ in range(10)]
        assert statuses == [200] * 10  # buffer mode keeps serving
        time.sleep(1)
        assert deployment.runtime.audit.depth == 10
        metrics = httpx.get(f"{deployment.gateway.url}/metrics").text
        assert "mcp_gateway_audit_buffered_events 10.0" in metrics
        if fault == "unwritable":
            path.rmdir()
        else:
            path.unlink()
        (tmp_path / "kept.jsonl").rename(path)
        deployment.gateway.call(deployment.runtime.audit.flush(), timeout=15)
        lines = path.read_text().splitlines()
        assert len(lines) == 11
        assert all(line.endswith("chain intact") for line in verify(deployment))
    finally:
        deployment.stop()


def _tamper_sqlite(db_path: Path, how: str) -> None:
    db = sqlite3.connect(db_path)
    if how == "edit":
        db.execute("UPDATE audit_events SET result = 'allowed' WHERE seq = 2")
    elif how == "edit-record":
        row = db.execute("SELECT record FROM audit_events WHERE seq = 2").fetchone()
        db.execute("UPDATE audit_events SET record = ? WHERE seq = 2", (row[0].replace("denied", "allowed"),))
    elif how == "delete":
        db.execute("DELETE FROM audit_events WHERE seq = 2")
    elif how == "reorder":
        columns = [r[1] for r in db.execute("PRAGMA table_info(audit_events)") if r[1] not in ("seq", "id")]
        a = db.execute(f"SELECT {', '.join(columns)} FROM audit_events WHERE seq = 2").fetchone()
        b = db.execute(f"SELECT {', '.join(columns)} FROM audit_events WHERE seq = 3").fetchone()
        sets = ", ".join(f"{c} = ?" for c in columns)
        db.execute(f"UPDATE audit_events SET {sets} WHERE seq = 2", b)
        db.execute(f"UPDATE audit_events SET {sets} WHERE seq = 3", a)
    db.commit()
    db.close()


def _tamper_jsonl(path: Path, how: str) -> None:
    lines = path.read_text().splitlines()
    if how in ("edit", "edit-record"):
        lines[1] = lines[1].replace('"denied"', '"allowed"')
    elif how == "delete":
        del lines[1]
    elif how == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    path.write_text("\n".join(lines) + "\n")


async def _tamper_postgres(table: str, how: str) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        if how == "edit":
            await conn.execute(f"UPDATE {table} SET result = 'allowed' WHERE seq = 2")
        elif how == "edit-record":
            await conn.execute(f"UPDATE {table} SET record = replace(record, 'denied', 'allowed') WHERE seq = 2")
        elif how == "delete":
            await conn.execute(f"DELETE FROM {table} WHERE seq = 2")
        elif how == "reorder":
            await conn.execute(f"UPDATE {table} SET seq = -2 WHERE seq = 2")
            await conn.execute(f"UPDATE {table} SET seq = 2 WHERE seq = 3")
            await conn.execute(f"UPDATE {table} SET seq = 3 WHERE seq = -2")
    finally:
        await conn.close()


@pytest.mark.parametrize("how", ["edit", "edit-record", "delete", "reorder"])
def test_audit_verify_finds_an_edited_deleted_or_reordered_event(tmp_path: Path, pg_table: str, how: str) -> None:
    deployment = deploy("proxy", tmp_path, audit={"sinks": sinks(tmp_path, pg_table)})
    try:
        token = deployment.token()
        for tool in ("echo", "delete_file", "echo", "search"):
            call(deployment.url, token, tool)
        deployment.gateway.call(deployment.runtime.audit.flush())
        assert verify(deployment) == [
            f"sqlite:{tmp_path / 'audit.db'}: OK, 4 events, chain intact",
            f"jsonl:{tmp_path / 'audit.jsonl'}: OK, 4 events, chain intact",
            f"postgres:{pg_table}: OK, 4 events, chain intact",
        ]
    finally:
        deployment.stop()
    _tamper_sqlite(tmp_path / "audit.db", how)
    _tamper_jsonl(tmp_path / "audit.jsonl", how)
    asyncio.run(_tamper_postgres(pg_table, how))
    done = audit_verify(deployment.config_path)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(": BROKEN at event 2 " in line for line in lines), lines


def test_metrics_parse_and_stay_bounded_under_10000_distinct_unknown_tools(tmp_path: Path) -> None:
    # A real `mcp-gateway serve` process: the load generator does not share an interpreter with the gateway.
    port = free_port()
    config = write_config(tmp_path, f"http://127.0.0.1:{free_port()}/mcp", public_url=f"http://127.0.0.1:{port}",
                          listen={"host": "127.0.0.1", "port": port})
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port)
        token = subprocess.run([sys.executable, "-m", "gateway.cli", "issue-token", "--config", str(config),
                                "--subject", "alice", "--scope", "mcp:tools"], capture_output=True, text=True,
                               cwd=ROOT, check=True).stdout.strip()
        call(f"{base}/mcp", token)

        def series() -> int:
            return sum(len(f.samples) for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text))

        async def flood() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
                sem = asyncio.Semaphore(32)

                async def one(i: int) -> None:
                    async with sem:
                        headers, body = modern("tools/call", {"name": f"probe_{i}", "arguments": {}})
                        async with client.post(f"{base}/mcp", json=body, headers={
                                **BASE_HEADERS, **headers, "Authorization": f"Bearer {token}"}) as response:
                            await response.read()

                await asyncio.gather(*(one(i) for i in range(10_000)))

        before = series()
        asyncio.run(flood())
        after = series()
        assert after - before < 40, f"{after - before} new series for 10,000 distinct tool names"
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)}
        decided = {tuple(sorted(s.labels.items())): s.value for s in families["mcp_gateway_decisions"].samples
                   if s.name.endswith("_total")}
        assert decided[(("reason", "no-grant:tool"), ("result", "denied"), ("tool", "other"))] == 10_000
        assert decided[(("reason", "role:reader:tool"), ("result", "allowed"), ("tool", "echo"))] == 1
        for name in ("mcp_gateway_requests", "mcp_gateway_auth_attempts", "mcp_gateway_token_cache",
                     "mcp_gateway_audit_events_written", "mcp_gateway_upstream_duration_seconds",
                     "mcp_gateway_overhead_duration_seconds", "mcp_gateway_audit_queue_depth"):
            assert name in families, name
    finally:
        process.terminate()
        process.wait(30)


def test_admin_audit_needs_the_read_scope(tmp_path: Path) -> None:
    deployment = deploy("proxy", tmp_path)
    try:
        call(deployment.url, deployment.token(), "delete_file")
        admin = f"{deployment.gateway.url}/admin/audit"
        assert httpx.get(admin).status_code == 401
        refused = httpx.get(admin, headers={"Authorization": f"Bearer {deployment.token()}"})
        assert refused.status_code == 403
        assert 'error="insufficient_scope", scope="audit:read"' in refused.headers["www-authenticate"]
        reader = deployment.runtime.authenticator.issue_token(
            subject="auditor", audience=f"{deployment.runtime.config.public_url}/admin", scopes=["audit:read"])
        deployment.gateway.call(deployment.runtime.audit.flush())
        found = httpx.get(admin, params={"result": "denied", "since": "1h", "tool": "delete_file"},
                          headers={"Authorization": f"Bearer {reader}"})
        assert found.status_code == 200, found.text
        assert [(e["user_id"], e["tool_executed"]) for e in found.json()["events"]] == [("alice", "delete_file")]
        bad = httpx.get(admin, params={"since": "yesterday"}, headers={"Authorization": f"Bearer {reader}"})
        assert bad.status_code == 400 and "is not a time" in bad.json()["error"]["message"]
        accesses = [e["result"] for e in deployment.audit_events() if e["operation"] == "admin/audit"]
        assert accesses == ["auth_failed", "denied", "allowed", "invalid_request"]
    finally:
        deployment.stop()


def test_sigterm_flushes_every_event_and_logs_are_json_with_the_audit_id(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, f"http://127.0.0.1:{free_port()}/mcp", public_url=f"http://127.0.0.1:{port}",
                          listen={"host": "127.0.0.1", "port": port},
                          audit={"sinks": [{"type": "sqlite", "path": str(tmp_path / "audit.db")}],
                                 "batch_size": 100000})
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port)
        statuses = [call(f"http://127.0.0.1:{port}/mcp", None).status_code for _ in range(200)]
        assert statuses == [401] * 200
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    db = sqlite3.connect(tmp_path / "audit.db")
    ids = {row[0] for row in db.execute("SELECT id FROM audit_events")}
    db.close()
    assert len(ids) == 200
    logged = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    requests = [entry for entry in logged if entry["message"] == "request"]
    assert {entry["audit_id"] for entry in requests} == ids
    assert all(entry["level"] == "INFO" and entry["result"] == "auth_failed" for entry in requests)


def test_audit_query_prints_a_table(tmp_path: Path) -> None:
    deployment = deploy("proxy", tmp_path)
    try:
        call(deployment.url, deployment.token(), "delete_file")
        deployment.gateway.call(deployment.runtime.audit.flush())
    finally:
        deployment.stop()
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "query", "--config",
                           str(deployment.config_path), "--since", "1h", "--user", "alice", "--result", "denied"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    header, row, summary = done.stdout.splitlines()
    assert header.split() == ["time", "result", "operation", "target", "user", "client", "reason", "status"]
    assert row.split()[2:6] == ["denied", "tools/call", "delete_file", "alice"]
    assert summary.startswith("1 event(s) from sqlite:")
    as_json = subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "query", "--config",
                              str(deployment.config_path), "--format", "json", "--tool", "echo"],
                             capture_output=True, text=True, cwd=ROOT)
    assert json.loads(as_json.stdout) == []


def test_the_jsonl_sink_rotates_and_verifies_across_files(tmp_path: Path) -> None:
    spec = AuditSink(type="jsonl", path=tmp_path / "a.jsonl", rotate_mb=0.001)  # about 1 KB a file
    key = ChainKey(os.urandom(32))

    async def write() -> None:
        sink = open_sink(spec)
        await sink.open()
        for i in range(20):
            await sink.write([AuditEvent(result="allowed", reason=f"r{i}")], key)
        await sink.close()
        reopened = open_sink(spec)
        await reopened.open()
        await reopened.write([AuditEvent(result="denied", reason="after restart")], key)
        report = await reopened.verify(key)
        assert report.ok and report.count == 21
        assert len(await reopened.query(AuditQuery(result="denied"))) == 1

    asyncio.run(write())
    assert len(list(tmp_path.glob("a.jsonl.*"))) >= 2
    shutil.rmtree(tmp_path)
    os.makedirs(tmp_path)


def test_two_workers_share_the_sinks_and_the_metrics(tmp_path: Path, pg_table: str) -> None:
    port = free_port()
    config = write_config(tmp_path, f"http://127.0.0.1:{free_port()}/mcp", public_url=f"http://127.0.0.1:{port}",
                          listen={"host": "127.0.0.1", "port": port}, audit={"sinks": sinks(tmp_path, pg_table)[::2]},
                          sessions={"backend": "redis", "url": "redis://127.0.0.1:6379/0"})  # what --workers needs
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
                                "--workers", "2"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        time.sleep(1.5)  # both workers up
        for _ in range(300):  # a new connection each, so both workers can take some
            assert call(f"http://127.0.0.1:{port}/mcp", None).status_code == 401
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        total = sum(s.value for s in families["mcp_gateway_requests"].samples if s.name.endswith("_total"))
        assert total == 300, "the workers' counts were not added up"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    db = sqlite3.connect(tmp_path / "audit.db")
    chains = dict(db.execute("SELECT chain, count(*) FROM audit_events GROUP BY chain").fetchall())
    db.close()
    # One chain per worker that took connections (the kernel decides how many did; usually both).
    assert sum(chains.values()) == 300 and 1 <= len(chains) <= 2, chains
    done = audit_verify(config)
    assert done.returncode == 0, done.stdout
    assert all(line.endswith("300 events, chain intact") for line in done.stdout.splitlines())


def test_deleting_an_earlier_writers_events_is_found_through_the_next_chains_anchor(tmp_path: Path) -> None:
    spec = AuditSink(type="sqlite", path=tmp_path / "a.db")
    key = ChainKey(os.urandom(32))

    async def two_lifetimes() -> None:
        for chain in ("first-run", "second-run"):
            sink = open_sink(spec)
            await sink.open()
            events = [AuditEvent(result="allowed", reason=str(i), chain=chain) for i in range(3)]
            await sink.write(events, key)
            await sink.close()

    asyncio.run(two_lifetimes())

    async def verify_now() -> Any:
        return await open_sink(spec).verify(key)

    assert asyncio.run(verify_now()).ok
    db = sqlite3.connect(tmp_path / "a.db")
    db.execute("DELETE FROM audit_events WHERE chain = 'first-run'")
    db.commit()
    db.close()
    report = asyncio.run(verify_now())
    assert (report.ok, report.broken_at) == (False, 1)
    assert "earlier events were deleted" in (report.why or "")


def _sha256(prev_hash: str, record: bytes) -> str:
    """The chain as it was sealed before it had a key: anyone can compute this."""
    return hashlib.sha256(prev_hash.encode() + b"\n" + record).hexdigest()


_GUESSED = ChainKey(b"a key the forger made up, not ours")

# How the forger seals the rewritten events -> (seal, key_id written into them, why `audit verify` refuses them).
FORGERIES: dict[str, tuple[Callable[[str, bytes], str], str | None, str]] = {
    "plain-sha256": (_sha256, None, "hash does not match the record under this key (the event was edited, or its "
                                    "hash recomputed without the key)"),
    "hmac-under-a-guessed-key": (_GUESSED.seal, None, "hash does not match the record under this key (the event "
                                                      "was edited, or its hash recomputed without the key)"),
    "hmac-under-a-guessed-key-named-in-the-record": (_GUESSED.seal, _GUESSED.id,
                                                     "sealed with key {guessed}, this key is {real}"),
}


def _rewrite_and_rechain(db_path: Path, event_id: str, seal: Callable[[str, bytes], str], key_id: str | None) -> None:
    """What someone who can write the database, but not read the chain key, does to turn a denial into an
    allowed call and hide it: rewrite the event (record and column alike), then seal it and every later event
    again with `seal`, each prev_hash naming the new hash before it. The events before it are left as they are."""
    db = sqlite3.connect(db_path)
    start = db.execute("SELECT seq FROM audit_events WHERE id = ?", (event_id,)).fetchone()[0]
    rows = db.execute("SELECT seq, record, prev_hash FROM audit_events WHERE seq >= ? ORDER BY seq",
                      (start,)).fetchall()
    prev_hash = rows[0][2]
    for seq, record, _ in rows:
        event = json.loads(record)
        if seq == start:
            event["result"] = "allowed"
        if key_id is not None:
            event["key_id"] = key_id
        forged = record_bytes(event)
        digest = seal(prev_hash, forged)
        db.execute("UPDATE audit_events SET result = ?, key_id = ?, record = ?, prev_hash = ?, hash = ? "
                   "WHERE seq = ?", (event["result"], event["key_id"], forged.decode(), prev_hash, digest, seq))
        prev_hash = digest
    db.commit()
    db.close()


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_denial_rewritten_as_allowed_with_the_chain_recomputed_without_the_key_is_broken_at_that_event(
        tmp_path: Path, forgery: str) -> None:
    deployment = deploy("proxy", tmp_path)
    try:
        token = deployment.token()
        for tool in ("echo", "delete_file", "echo", "search"):
            call(deployment.url, token, tool)
        events = deployment.audit_events()
        real = deployment.runtime.audit.key.id
    finally:
        deployment.stop()
    assert [e["result"] for e in events] == ["allowed", "denied", "allowed", "allowed"]
    assert audit_verify(deployment.config_path).returncode == 0
    seal, named, why = FORGERIES[forgery]
    denied = events[1]["id"]
    _rewrite_and_rechain(tmp_path / "audit.db", denied, seal, named)
    db = sqlite3.connect(tmp_path / "audit.db")
    assert [r for (r,) in db.execute("SELECT result FROM audit_events ORDER BY seq")] == ["allowed"] * 4
    db.close()

    done = audit_verify(deployment.config_path)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [f"sqlite:{tmp_path / 'audit.db'}: BROKEN at event 2 (id {denied}): "
                                        + why.format(guessed=_GUESSED.id, real=real)]


def test_the_same_rewrite_sealed_with_the_real_key_passes_which_is_why_the_key_is_kept_from_sink_writers(
        tmp_path: Path) -> None:
    deployment = deploy("proxy", tmp_path)
    try:
        call(deployment.url, deployment.token(), "delete_file")
        call(deployment.url, deployment.token(), "echo")
        denied = deployment.audit_events()[0]["id"]
        stolen = deployment.runtime.audit.key
    finally:
        deployment.stop()
    _rewrite_and_rechain(tmp_path / "audit.db", denied, stolen.seal, None)
    done = audit_verify(deployment.config_path)
    assert (done.returncode, done.stdout) == (0, f"sqlite:{tmp_path / 'audit.db'}: OK, 2 events, chain intact\n")


async def _lifetime(audit: Audit, results: Sequence[str]) -> ChainKey:
    """One gateway process's audit log: built (the key read, or created), one event per result, closed."""
    log = AuditLog(audit, Metrics())
    log.start()
    for result in results:
        log.record(AuditEvent(result=result, reason="test"))
    await log.close()
    return log.key


def test_the_chain_key_is_created_owner_only_and_reused_so_a_restart_extends_a_trail_that_verifies(
        tmp_path: Path, pg_table: str) -> None:
    config_path = write_config(tmp_path, "http://127.0.0.1:9/mcp", audit={"sinks": sinks(tmp_path, pg_table)})
    audit = load_config(config_path).audit
    key_file = tmp_path / "audit-chain.key"
    assert audit.chain_key_file == key_file and not key_file.exists()  # the default: beside the config file

    first = asyncio.run(_lifetime(audit, ["allowed", "denied", "allowed"]))
    secret = key_file.read_bytes()
    assert len(secret) == 32 and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = asyncio.run(_lifetime(audit, ["denied", "allowed"]))
    assert second.id == first.id and key_file.read_bytes() == secret

    db = sqlite3.connect(tmp_path / "audit.db")
    sealed_by = db.execute("SELECT DISTINCT key_id FROM audit_events").fetchall()
    chains = db.execute("SELECT count(DISTINCT chain) FROM audit_events").fetchone()[0]
    db.close()
    assert sealed_by == [(first.id,)] and chains == 2  # the second process's chain is anchored to the first's
    done = audit_verify(config_path)
    assert done.returncode == 0, done.stdout
    assert done.stdout.splitlines() == [f"sqlite:{tmp_path / 'audit.db'}: OK, 5 events, chain intact",
                                        f"jsonl:{tmp_path / 'audit.jsonl'}: OK, 5 events, chain intact",
                                        f"postgres:{pg_table}: OK, 5 events, chain intact"]


def test_workers_starting_at_once_create_one_key_and_all_use_it(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "audit-chain.key"
    together = threading.Barrier(16)

    def start_worker() -> str:
        together.wait()
        return load_or_create_chain_key(path).id

    with ThreadPoolExecutor(16) as pool:
        ids = {started.result() for started in [pool.submit(start_worker) for _ in range(16)]}
    assert len(ids) == 1
    assert [p.name for p in path.parent.iterdir()] == ["audit-chain.key"]  # no draft left behind
    assert len(path.read_bytes()) == 32


def test_verify_without_the_key_file_exits_2_with_a_clear_message_and_creates_nothing(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, "http://127.0.0.1:9/mcp")
    asyncio.run(_lifetime(load_config(config_path).audit, ["denied"]))
    key_file = tmp_path / "audit-chain.key"
    key_file.rename(tmp_path / "kept-elsewhere.key")
    before = sorted(tmp_path.iterdir())

    done = audit_verify(config_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"{key_file}: audit.chain_key_file: no such file; the chain can only be checked with the "
                           "key that sealed it (the gateway creates the key when it first starts)\n")
    assert sorted(tmp_path.iterdir()) == before


def test_verify_with_another_key_names_the_key_that_sealed_the_event_and_this_one(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, "http://127.0.0.1:9/mcp")
    sealing = asyncio.run(_lifetime(load_config(config_path).audit, ["denied", "allowed"]))
    key_file = tmp_path / "audit-chain.key"
    key_file.write_bytes(os.urandom(32))
    other = ChainKey(key_file.read_bytes())
    db = sqlite3.connect(tmp_path / "audit.db")
    first_id = db.execute("SELECT id FROM audit_events ORDER BY seq LIMIT 1").fetchone()[0]
    db.close()

    done = audit_verify(config_path)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [f"sqlite:{tmp_path / 'audit.db'}: BROKEN at event 1 (id {first_id}): "
                                        f"sealed with key {sealing.id}, this key is {other.id}"]


_LEGACY_COLUMNS = ("id", "result", "reason", "chain", "timestamp", "record", "prev_hash", "hash")


def _legacy_row() -> tuple[Any, ...]:
    """An event as sealed before chain keys: no key_id in its record, plain SHA-256 from the genesis value."""
    event = AuditEvent(result="denied", reason="before the upgrade", chain="old-run").to_dict()
    del event["key_id"]
    record = record_bytes(event)
    return (event["id"], event["result"], event["reason"], event["chain"], event["timestamp"], record.decode(),
            GENESIS, _sha256(GENESIS, record))


async def _write_legacy_trail(spec: AuditSink, row: tuple[Any, ...]) -> None:
    """A sink as it stood before key_id: the table the sinks created then, holding one event sealed then."""
    if spec.type == "jsonl":
        assert spec.path is not None
        event = dict(zip(_LEGACY_COLUMNS, row, strict=True))
        line = {**json.loads(event["record"]), "prev_hash": event["prev_hash"], "hash": event["hash"]}
        spec.path.write_text(json.dumps(line) + "\n")
        return
    sink = open_sink(spec)
    await sink.open()
    await sink.close()
    columns = ", ".join(_LEGACY_COLUMNS)
    if spec.type == "sqlite":
        db = sqlite3.connect(str(spec.path))
        db.execute("ALTER TABLE audit_events DROP COLUMN key_id")
        db.execute(f"INSERT INTO audit_events ({columns}) VALUES ({', '.join('?' * len(row))})", row)
        db.commit()
        db.close()
        return
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f"ALTER TABLE {spec.table} DROP COLUMN key_id")
        await conn.execute(f"INSERT INTO {spec.table} ({columns}) VALUES "
                           f"({', '.join(f'${i + 1}' for i in range(len(row)))})", *row)
    finally:
        await conn.close()


async def _key_id_column(spec: AuditSink) -> list[str | None]:
    if spec.type == "sqlite":
        db = sqlite3.connect(str(spec.path))
        try:
            return [value for (value,) in db.execute("SELECT key_id FROM audit_events ORDER BY seq")]
        finally:
            db.close()
    conn = await asyncpg.connect(DSN)
    try:
        return [row["key_id"] for row in await conn.fetch(f"SELECT key_id FROM {spec.table} ORDER BY seq")]
    finally:
        await conn.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "jsonl"])
def test_a_trail_from_before_key_id_gains_the_column_and_its_unkeyed_events_are_reported_unverifiable(
        tmp_path: Path, pg_table: str, kind: str) -> None:
    spec = AuditSink.model_validate(next(s for s in sinks(tmp_path, pg_table) if s["type"] == kind))
    legacy = _legacy_row()
    key = ChainKey(os.urandom(32))
    asyncio.run(_write_legacy_trail(spec, legacy))

    async def upgrade() -> Any:
        sink = open_sink(spec)
        try:
            await sink.open()
            await sink.write([AuditEvent(result="allowed", reason="after the upgrade") for _ in range(2)], key)
            events = await sink.query(AuditQuery())
            return events, await sink.verify(key)
        finally:
            await sink.close()

    events, report = asyncio.run(upgrade())
    assert [e.get("key_id") for e in events] == [None, key.id, key.id]
    if kind != "jsonl":
        assert asyncio.run(_key_id_column(spec)) == [None, key.id, key.id]
    assert (report.ok, report.count, report.broken_at, report.event_id) == (False, 1, 1, legacy[0])
    assert report.why == "sealed without a chain key (written before keyed chains, or forged): it cannot be verified"


def test_the_sqlite_wal_stays_bounded_under_writes_that_never_pause_and_loses_nothing(tmp_path: Path) -> None:
    """Checkpoints made in their own thread while commits go on cannot rewind the WAL; the commits' own, made
    every 4,000 pages, still do: the WAL does not grow with the trail, and every event is kept."""
    spec = AuditSink(type="sqlite", path=tmp_path / "a.db")
    key = ChainKey(os.urandom(32))
    wal = tmp_path / "a.db-wal"
    sizes: list[int] = []

    async def write_many() -> None:
        sink = open_sink(spec)
        await sink.open()
        for batch in range(120):  # 120 x 200 rows of some 2.3 kB: 55 MB of WAL were it never rewound
            await sink.write([AuditEvent(result="allowed", reason="x" * 500, chain=str(batch)) for _ in range(200)],
                             key)
            sizes.append(wal.stat().st_size)
        await sink.close()

    asyncio.run(write_many())
    assert max(sizes) < 20 * 1024 * 1024, sizes
    db = sqlite3.connect(tmp_path / "a.db")
    assert db.execute("SELECT count(*) FROM audit_events").fetchone()[0] == 24_000
    db.close()

    async def verify_now() -> Any:
        return await open_sink(spec).verify(key)

    assert asyncio.run(verify_now()).ok
