"""`make soak`: mixed traffic at 64 connections against `mcp-gateway serve` for 10 minutes, and what it shows.

The demo server runs as its own process (legacy sessions, SSE answers), the gateway as `serve` with the SQLite
audit sink, and this process drives 64 connections of mixed traffic: 2026-07-28 calls allowed and refused, lists,
tokens missing, and 2025-11-25 sessions (initialize, a call answered over SSE, the GET stream, DELETE). Every
answer's status is checked against what that step must get. Printed at the end:

    requests, unexpected statuses (must be 0), audit rows == requests, RSS and open file descriptors of the
    gateway each minute, and their drift between minute 2 and the end (must be < 10%)

Usage: python -m tests.soak [--minutes 10] [--connections 64]   (exit 1 when a figure is off)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from gateway.auth.authenticator import Authenticator
from gateway.auth.keys import load_or_create_signing_key
from gateway.config import load_config
from tests.harness import MODERN, ROOT, free_port, wait_for_port, write_config

ACCEPT = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}


class Load:
    """The traffic of one soak: every request counted, every status checked against the one expected."""

    def __init__(self, url: str, reader: str, operator: str) -> None:
        self.url = url
        self.reader, self.operator = reader, operator
        self.requests = 0
        self.unexpected: Counter[str] = Counter()
        self.steps: Counter[str] = Counter()
        self.ids = itertools.count(1)

    async def post(self, session: aiohttp.ClientSession, step: str, expected: int, headers: dict[str, str],
                   body: dict[str, Any]) -> aiohttp.ClientResponse:
        async with session.post(self.url, headers={**ACCEPT, **headers}, data=json.dumps(body)) as response:
            await response.read()
            self._count(step, expected, response.status)
            return response

    def _count(self, step: str, expected: int, status: int) -> None:
        self.requests += 1
        self.steps[step] += 1
        if status != expected:
            self.unexpected[f"{step}: {status} (expected {expected})"] += 1

    async def modern(self, session: aiohttp.ClientSession, token: str, method: str, params: dict[str, Any],
                     step: str, expected: int) -> None:
        headers = {"MCP-Protocol-Version": MODERN, "Mcp-Method": method}
        if "name" in params or "uri" in params:
            headers["Mcp-Name"] = params.get("name") or params["uri"]
        if token:
            headers["Authorization"] = f"Bearer {token}"
        body = {"jsonrpc": "2.0", "id": next(self.ids), "method": method, "params": {**params, "_meta": META}}
        await self.post(session, step, expected, headers, body)

    async def legacy_session(self, session: aiohttp.ClientSession) -> None:
        headers = {"MCP-Protocol-Version": "2025-11-25", "Authorization": f"Bearer {self.reader}"}
        init = await self.post(session, "legacy initialize", 200, headers, {
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "soak",
                                                                                            "version": "1"}}})
        sid = init.headers.get("mcp-session-id")
        if sid is None:
            return
        headers["Mcp-Session-Id"] = sid
        await self.post(session, "legacy initialized", 202, headers,
                        {"jsonrpc": "2.0", "method": "notifications/initialized"})
        await self.post(session, "legacy call over SSE", 200, headers, {
            "jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "s"}}})
        async with session.get(self.url, headers={**headers, "Accept": "text/event-stream"}) as stream:
            self._count("legacy GET stream", 200, stream.status)
            with contextlib.suppress(TimeoutError):  # the stream stays open: a moment of it, then the client leaves
                await asyncio.wait_for(stream.content.read(1), 0.05)
        async with session.delete(self.url, headers=headers) as ended:
            self._count("legacy DELETE", 200, ended.status)

    async def worker(self, until: float) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            for turn in itertools.count():
                if time.monotonic() > until:
                    return
                kind = turn % 8
                if kind in (0, 1):
                    await self.modern(session, self.reader, "tools/call", {"name": "echo", "arguments": {"text": "x"}},
                                      "allowed call", 200)
                elif kind == 2:
                    await self.modern(session, self.reader, "tools/call", {"name": "delete_file",
                                                                           "arguments": {"path": "/x"}},
                                      "refused call (hidden tool)", 400)
                elif kind == 3:
                    await self.modern(session, self.reader, "tools/list", {}, "list", 200)
                elif kind == 4:
                    await self.modern(session, "", "tools/list", {}, "no token", 401)
                elif kind == 5:
                    await self.modern(session, self.operator, "tools/call",
                                      {"name": "delete_file", "arguments": {"path": "/x"}},
                                      "operator call above its sign-in's level (step-up)", 401)
                elif kind == 6:
                    await self.modern(session, self.reader, "resources/read", {"uri": "file:///srv/docs/readme"},
                                      "allowed read", 200)
                else:
                    await self.legacy_session(session)


def _sample(pid: int) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of process `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def _audit_rows(database: Path) -> int:
    db = sqlite3.connect(database)
    try:  # one row per request; server->client requests have no status of their own, and there are none here
        return int(db.execute("SELECT COUNT(*) FROM audit_events WHERE status IS NOT NULL").fetchone()[0])
    finally:
        db.close()


async def soak(minutes: float, connections: int) -> bool:
    directory = Path(tempfile.mkdtemp(prefix="mcp-gateway-soak-"))
    upstream_port, port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "examples" / "demo_server.py"), "--port",
                                 str(upstream_port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config_path = write_config(directory, f"http://127.0.0.1:{upstream_port}/mcp",
                               public_url=f"http://127.0.0.1:{port}", listen={"host": "127.0.0.1", "port": port},
                               log_level="WARNING", policy=_policy())
    config = load_config(config_path)
    authenticator = Authenticator(config, load_or_create_signing_key(config.auth.clients.signing_key_file))
    audience = config.resource_url(config.upstreams[0])
    reader = authenticator.issue_token(subject="alice", audience=audience, scopes=["mcp:tools"], ttl_s=7200)
    operator = authenticator.issue_token(subject="olga", audience=audience, claims={"groups": ["ops"]}, ttl_s=7200)
    log = (directory / "gateway.log").open("w")
    gateway = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path)],
                               cwd=ROOT, stdout=log, stderr=log)
    load = Load(f"http://127.0.0.1:{port}/mcp", reader, operator)
    samples: list[tuple[float, float, int]] = []
    try:
        wait_for_port(upstream_port)
        wait_for_port(port)
        started = time.monotonic()
        until = started + minutes * 60
        workers = [asyncio.create_task(load.worker(until)) for _ in range(connections)]
        printed = 0.0
        while time.monotonic() < until - 1:  # sampled under load only
            await asyncio.sleep(min(5.0, max(0.1, until - 1 - time.monotonic())))
            rss, fds = _sample(gateway.pid)
            samples.append((time.monotonic() - started, rss, fds))
            if samples[-1][0] - printed >= 60 or time.monotonic() >= until - 1:
                printed = samples[-1][0]
                print(f"  {printed / 60:5.1f} min  {load.requests:>9,} requests  RSS {rss:6.1f} MB  "
                      f"fds {fds:4d}  unexpected {sum(load.unexpected.values())}", flush=True)
        await asyncio.gather(*workers)
        database = config.audit.sinks[0].path
        assert database is not None
        deadline = time.monotonic() + 30
        while _audit_rows(database) < load.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        rows = _audit_rows(database)
    finally:
        gateway.terminate()
        gateway.wait(30)
        upstream.terminate()
        upstream.wait(10)
        log.close()
    return _report(load, rows, samples, minutes)


def _report(load: Load, rows: int, samples: list[tuple[float, float, int]], minutes: float) -> bool:
    # Instantaneous figures move with the connections in flight: each side is the median of a minute of samples
    # (minute 2, and the last minute; a fifth of the run each for short runs).
    span = min(60.0, minutes * 60 / 5)
    start_at = min(120.0, minutes * 60 / 5)
    base = _median([s for s in samples if start_at <= s[0] < start_at + span])
    end = _median([s for s in samples if s[0] >= samples[-1][0] - span])
    rss_drift = (end[1] - base[1]) / base[1]
    fd_drift = (end[2] - base[2]) / base[2]
    ok = not load.unexpected and rows == load.requests and rss_drift < 0.10 and fd_drift < 0.10
    print(f"\nsoak: {minutes:g} min, {load.requests:,} requests ({load.requests / (minutes * 60):,.0f}/s)")
    for step, count in sorted(load.steps.items()):
        print(f"  {count:>9,}  {step}")
    print(f"unexpected statuses: {sum(load.unexpected.values())} {dict(load.unexpected) or ''}")
    print(f"audit rows: {rows:,} for {load.requests:,} requests ({'equal' if rows == load.requests else 'DIFFER'})")
    print(f"RSS: {base[1]:.1f} MB at {base[0] / 60:.1f} min -> {end[1]:.1f} MB at the end ({rss_drift:+.1%}; "
          "medians of a minute of samples)")
    print(f"open fds: {base[2]:.0f} at {base[0] / 60:.1f} min -> {end[2]:.0f} at the end ({fd_drift:+.1%})")
    print("PASS" if ok else "FAIL")
    return ok


def _median(samples: list[tuple[float, float, int]]) -> tuple[float, float, float]:
    def middle(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[len(ordered) // 2]

    return (middle([s[0] for s in samples]), middle([s[1] for s in samples]), middle([float(s[2]) for s in samples]))


def _policy() -> dict[str, Any]:
    """The shipped default policy: readers, operators, delete_* at level critical (a hardware key)."""
    import yaml

    policy: dict[str, Any] = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text())
    return policy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args(argv)
    return 0 if asyncio.run(soak(args.minutes, args.connections)) else 1


if __name__ == "__main__":
    sys.exit(main())
