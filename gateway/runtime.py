"""What one running gateway holds between requests: authenticator, audit log, metrics, learnt tool schemas.

Owns the start and stop of those resources, so that the reverse proxy
(`create_app`) and the ASGI middleware around an in-process app share one
lifecycle and one set of state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cachetools import LRUCache

from gateway.audit import AuditLog
from gateway.auth import Authenticator, load_or_create_signing_key
from gateway.config import Config
from gateway.metrics import Metrics


class Runtime:
    """The stateful parts of a gateway, shared by every request it handles."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.signing_key = load_or_create_signing_key(config.auth.clients.signing_key_file)
        self.authenticator = Authenticator(config, self.signing_key)
        self.audit = AuditLog(config.audit)
        self.metrics = Metrics()
        # Per upstream: tool name -> inputSchema, learnt from tools/list results passing through,
        # so that 2026-07-28 Mcp-Param-* headers can be checked against the tool's declaration.
        self._tool_schemas: dict[str, LRUCache[str, Mapping[str, Any]]] = {
            u.name: LRUCache(maxsize=10_000) for u in config.upstreams
        }
        self.started = False

    def start(self) -> None:
        """Start background work on the running loop (idempotent; also called lazily on first request)."""
        if not self.started:
            self.audit.start()
            self.started = True

    async def close(self) -> None:
        """Flush the audit trail and stop."""
        await self.audit.close()
        self.started = False

    def tool_schema(self, upstream: str, tool: str) -> Mapping[str, Any] | None:
        return self._tool_schemas[upstream].get(tool)

    def learn_tools(self, upstream: str, result: Mapping[str, Any]) -> None:
        tools = result.get("tools")
        if not isinstance(tools, list):
            return
        cache = self._tool_schemas[upstream]
        for tool in tools:
            if not isinstance(tool, dict):
                continue
            name, schema = tool.get("name"), tool.get("inputSchema")
            if isinstance(name, str) and isinstance(schema, dict):
                cache[name] = schema
