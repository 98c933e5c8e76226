"""An MCP server that is not this gateway and requires OAuth itself: the demo MCPServer with the SDK's own auth.

The SDK's bearer middleware and protected-resource metadata, with a token
verifier that asks oidc-provider (RFC 7662, as the `gateway` client) about
each token and accepts it only when it is active and its audience is this
server. Used as a `connect` target and as an upstream the gateway must hold
its own token for.
"""

from __future__ import annotations

from typing import Any

import httpx
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

from examples.demo_server import build_server
from tests.harness import Recorder, ServerThread, free_port


class IntrospectingVerifier:
    """The SDK's `TokenVerifier`, answered by oidc-provider's introspection endpoint."""

    def __init__(self, issuer: str, resource: str) -> None:
        self.issuer = issuer
        self.resource = resource

    async def verify_token(self, token: str) -> AccessToken | None:
        async with httpx.AsyncClient(timeout=10) as http:
            answer = (await http.post(f"{self.issuer}/token/introspection", data={"token": token},
                                      auth=("gateway", "gateway-secret"))).json()
        audience = answer.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if not answer.get("active") or self.resource not in audiences:
            return None
        return AccessToken(token=token, client_id=str(answer.get("client_id")),
                           scopes=str(answer.get("scope", "")).split(), expires_at=answer.get("exp"),
                           resource=self.resource, subject=answer.get("sub"))


class SdkAuthServer:
    """The demo server on a free loopback port at `/mcp`, protected by the SDK's auth; every request recorded."""

    def __init__(self, issuer: str, required_scopes: tuple[str, ...] = ("mcp:tools",), **app_options: Any) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/mcp"
        server = build_server(
            token_verifier=IntrospectingVerifier(issuer, self.url),
            auth=AuthSettings(issuer_url=issuer, resource_server_url=self.url, required_scopes=list(required_scopes),
                              validate_token_resource=False))
        self.recorder = Recorder(server.streamable_http_app(**app_options))
        self.thread = ServerThread(self.recorder, port).start()

    def stop(self) -> None:
        self.thread.stop()
