"""B6: audit events per second to each sink, beside the request rate that produced them.

Two figures per sink, measured in one run:
  1. the sink's own ceiling: events queued as fast as possible, time until written;
  2. under load: `mcp-gateway serve` with that sink alone, wrk (Debian package) sending
     tools/call requests the policy refuses (so no upstream is involved and every
     request is one event), 8 s at 32 connections; requests/s from wrk beside events/s
     written (from /metrics) and the queue left at the end. A queue that grows means the
     sink does not keep up; the gateway then refuses (fail_closed) rather than lose events.

    python bench/bench_audit.py        (needs wrk on PATH and PostgreSQL on 127.0.0.1:5432)
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import save  # noqa: E402
from gateway.audit.event import AuditEvent  # noqa: E402
from gateway.audit.writer import AuditLog  # noqa: E402
from gateway.config import Audit  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402

DSN = "postgresql://127.0.0.1/test"
POLICY = {"roles": {"reader": {"permissions": {"can_execute_tools": ["echo"]}}},
          "bindings": [{"when": {"scope": "mcp:tools"}, "roles": ["reader"]}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sink_spec(kind: str, directory: Path) -> dict[str, Any]:
    if kind == "postgres":
        return {"type": "postgres", "dsn": DSN, "table": f"bench_{uuid.uuid4().hex[:8]}"}
    return {"type": kind, "path": str(directory / f"audit.{'db' if kind == 'sqlite' else 'jsonl'}")}


async def ceiling(kind: str, directory: Path, events: int = 50_000) -> float:
    log = AuditLog(Audit.model_validate({"sinks": [sink_spec(kind, directory)], "max_buffer": events + 1}),
                   Metrics())
    log.start()
    await log.flush()
    start = time.perf_counter()
    for i in range(events):
        log.record(AuditEvent(result="denied", reason="no-grant:tool", operation="tools/call",
                              tool_executed=f"tool_{i % 50}", user_id="bench", status=400))
    await log.flush()
    elapsed = time.perf_counter() - start
    await log.close()
    return events / elapsed


def metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def under_load(kind: str, directory: Path) -> tuple[float, float, float]:
    port = free_port()
    (directory / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    config = {
        "listen": {"host": "127.0.0.1", "port": port}, "public_url": f"http://127.0.0.1:{port}",
        "upstreams": [{"name": "none", "path": "/mcp", "url": "http://127.0.0.1:9/mcp"}],
        "policy": "policy.yaml", "auth": {"clients": {"signing_key_file": "key.pem"}},
        "audit": {"sinks": [sink_spec(kind, directory)], "on_sink_failure": "buffer", "max_buffer": 10_000_000},
        "log_level": "WARNING",
    }
    (directory / "gateway.yaml").write_text(yaml.safe_dump(config))
    cli = [sys.executable, "-m", "gateway.cli"]
    server = subprocess.Popen([*cli, "serve", "--config", str(directory / "gateway.yaml")], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        token = subprocess.run([*cli, "issue-token", "--config", str(directory / "gateway.yaml"), "--subject",
                                "bench", "--scope", "mcp:tools"], capture_output=True, text=True, check=True,
                               cwd=ROOT).stdout.strip()
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "delete_file", "arguments": {}, "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}}}})
        script = directory / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(body)}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            'wrk.headers["Accept"] = "application/json, text/event-stream"\n'
            'wrk.headers["MCP-Protocol-Version"] = "2026-07-28"\n'
            'wrk.headers["Mcp-Method"] = "tools/call"\n'
            'wrk.headers["Mcp-Name"] = "delete_file"\n'
            f'wrk.headers["Authorization"] = "Bearer {token}"\n')
        url = f"http://127.0.0.1:{port}"
        before = subprocess.run(["curl", "-s", f"{url}/metrics"], capture_output=True, text=True).stdout
        started = time.perf_counter()
        out = subprocess.run(["wrk", "-t2", "-c32", "-d8s", "-s", str(script), f"{url}/mcp"],
                             capture_output=True, text=True).stdout
        elapsed = time.perf_counter() - started
        after = subprocess.run(["curl", "-s", f"{url}/metrics"], capture_output=True, text=True).stdout
        rps = float(re.search(r"Requests/sec:\s+(\S+)", out).group(1))  # type: ignore[union-attr]
        written = metric(after, "mcp_gateway_audit_events_written_total") - metric(
            before, "mcp_gateway_audit_events_written_total")
        return rps, written / elapsed, metric(after, "mcp_gateway_audit_queue_depth")
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    if shutil.which("wrk") is None:
        sys.exit("bench_audit needs wrk: apt-get install wrk")
    print("B6 audit: events per second to each sink")
    print(f"{'sink':>9}  {'ceiling ev/s':>12}  {'requests/s':>10}  {'written ev/s':>12}  {'queue at end':>12}")
    results = {}
    for kind in ("sqlite", "jsonl", "postgres"):
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            top = asyncio.run(ceiling(kind, directory))
            rps, written, queue = under_load(kind, directory)
        print(f"{kind:>9}  {top:>12,.0f}  {rps:>10,.0f}  {written:>12,.0f}  {queue:>12,.0f}")
        results[kind] = {"ceiling_events_s": top, "requests_s": rps, "written_events_s": written, "queue_at_end": queue}
    print(f"\nresults: {save('audit', results)}")


if __name__ == "__main__":
    main()
