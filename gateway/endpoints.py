"""The gateway's own routes, the same in both deployment modes.

Owns which paths the gateway answers itself rather than guarding or passing
on: RFC 9728 protected-resource metadata (built from `public_url`, never from
the request's Host), the OAuth authorization server (`auth.server`), the
admin API (`admin`) and the admin console (`console`). The middleware asks
`serves(path)` and hands the request over; everything else is an MCP endpoint
or the wrapped app's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from gateway import admin, console
from gateway.auth import server
from gateway.auth.server import AuthorizationServer
from gateway.types import ASGIReceive, ASGIScope, ASGISend, send_json

if TYPE_CHECKING:
    from gateway.config import Config, Upstream
    from gateway.runtime import Runtime

_METADATA_PREFIX = "/.well-known/oauth-protected-resource"


class Endpoints:
    """The gateway's own HTTP endpoints."""

    def __init__(self, config: Config, runtime: Runtime) -> None:
        self._config = config
        self._runtime = runtime
        self._routes = {u.path: u for u in config.upstreams}
        self._authorization_server = AuthorizationServer(runtime)
        self._console = console.Console(runtime)

    def serves(self, path: str) -> bool:
        return (path.startswith(_METADATA_PREFIX) or path in server.PATHS or admin.serves(path)
                or console.serves(path))

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        path: str = scope.get("path", "")
        if path.startswith(_METADATA_PREFIX):
            await self._protected_resource_metadata(path, send)
            return
        self._runtime.start()
        if path in server.PATHS:
            await self._authorization_server(scope, receive, send)
        elif console.serves(path):
            await self._console(scope, receive, send)
        else:
            await admin.serve(self._runtime, scope, receive, send)

    async def _protected_resource_metadata(self, path: str, send: ASGISend) -> None:
        """RFC 9728 metadata for the upstream the path names (or the only one)."""
        config = self._config
        suffix = path[len(_METADATA_PREFIX):]
        prefix = config.public_path_prefix
        upstream: Upstream | None = self._routes.get(suffix[len(prefix):] if suffix.startswith(prefix) else "")
        if upstream is None and len(config.upstreams) == 1 and suffix in ("", "/"):
            upstream = config.upstreams[0]
        if upstream is None:
            await send_json(send, 404, b'{"error":"not_found"}')
            return
        payload = orjson.dumps({
            "resource": config.resource_url(upstream),
            "authorization_servers": list(self._authorization_servers()),
            "bearer_methods_supported": ["header"],
            "scopes_supported": list(self._scopes_supported()),
            "resource_name": upstream.name,
        })
        await send_json(send, 200, payload)

    def _authorization_servers(self) -> tuple[str, ...]:
        auth = self._config.auth
        if auth.authorization_servers is not None:
            return auth.authorization_servers
        return (*((auth.jwt.issuer,) if auth.jwt is not None else ()), self._config.public_url)

    def _scopes_supported(self) -> tuple[str, ...]:
        auth = self._config.auth
        if auth.scopes_supported is not None:
            return auth.scopes_supported
        return tuple(sorted(set(self._runtime.policy.scopes) | set(auth.scope_hierarchy)))
