"""Fixtures: a gateway in each deployment mode in front of a real MCP upstream; an audit table of a test's own in
the PostgreSQL on 127.0.0.1:5432."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import httpx._transports.default
import httpx2._transports.default
import pytest

from tests.harness import Deployment, ServerThread, build_server, deploy

DSN = "postgresql://127.0.0.1/test"


def _one_default_ssl_context(transport: ModuleType) -> None:
    """Every client httpx (and the SDK's httpx2) builds loads the CA bundle into a new SSL context, about 28 ms,
    and a one-shot `httpx.get` builds a client: hundreds of times a run, for TLS that no test uses (every server
    here is plain HTTP on 127.0.0.1). The default context is built once and shared (an SSLContext may be);
    any other verify or cert setting is built as asked."""
    create: Callable[..., ssl.SSLContext] = transport.create_ssl_context

    @functools.cache
    def default() -> ssl.SSLContext:
        return create()

    def shared(verify: Any = True, cert: Any = None, trust_env: bool = True) -> ssl.SSLContext:
        if verify is True and cert is None and trust_env:
            return default()
        return create(verify=verify, cert=cert, trust_env=trust_env)

    transport.create_ssl_context = shared  # type: ignore[attr-defined]


_one_default_ssl_context(httpx._transports.default)
_one_default_ssl_context(httpx2._transports.default)


@pytest.fixture(params=["proxy", "middleware"])
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """The demo MCPServer (sessions, SSE answers) behind the gateway, as reverse proxy and as middleware."""
    deployment = deploy(request.param, tmp_path)
    yield deployment
    deployment.stop()


@pytest.fixture(params=["proxy", "middleware"])
def stateless_gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """The demo MCPServer in stateless JSON mode behind the gateway, in both deployment modes."""
    deployment = deploy(request.param, tmp_path, stateless=True, json_response=True)
    yield deployment
    deployment.stop()


@contextlib.contextmanager
def pg_audit_table() -> Iterator[str]:
    """The name of an audit table of its own in the PostgreSQL at DSN (created by the gateway's sink), dropped
    when done: for a fixture of a wider scope than `pg_table`'s."""
    table = f"audit_{uuid.uuid4().hex[:10]}"
    try:
        yield table
    finally:
        async def drop() -> None:
            conn = await asyncpg.connect(DSN)
            try:
                await conn.execute(f"DROP TABLE IF EXISTS {table}")
                await conn.execute(f"DROP TABLE IF EXISTS {table}_away")
            finally:
                await conn.close()

        asyncio.run(drop())


@pytest.fixture
def pg_table() -> Iterator[str]:
    """The name of an audit table of this test's own (created by the gateway's sink), dropped afterwards."""
    with pg_audit_table() as table:
        yield table


@pytest.fixture(scope="module")
def demo_upstream() -> Iterator[str]:
    """The demo MCPServer (stateful, streamable HTTP) on a port of its own for a module's tests: its MCP URL."""
    server = ServerThread(build_server().streamable_http_app()).start()
    try:
        yield f"{server.url}/mcp"
    finally:
        server.stop()
