"""Opaque tokens from a real OpenID provider (npm oidc-provider), checked by RFC 7662 introspection.

oidc-provider issues opaque access tokens bound to the gateway's resource (RFC
8707 resource indicators); the gateway asks its introspection endpoint about
each token once, then serves the answer from its cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.streamable_http import streamable_http_client

from tests.harness import Deployment, deploy
from tests.node_peers import NodeAuthServer
from tests.test_auth_options import call
from tests.test_oauth_server import MemoryTokens


class OidcProvider(NodeAuthServer):
    """oidc-provider (tests/node/oidc.mjs): opaque tokens, introspection, resource indicators."""

    script = "oidc.mjs"

    def token(self, resource: str, scope: str | None = "mcp:tools") -> str:
        form = {"grant_type": "client_credentials", "resource": resource, **({"scope": scope} if scope else {})}
        response = httpx.post(f"{self.url}/token", data=form, auth=("mcp-client", "mcp-client-secret"))
        response.raise_for_status()
        return str(response.json()["access_token"])

    def revoke(self, token: str) -> None:
        httpx.post(f"{self.url}/token/revocation", data={"token": token},
                   auth=("mcp-client", "mcp-client-secret")).raise_for_status()


@pytest.fixture
def oidc() -> Iterator[OidcProvider]:
    server = OidcProvider()
    yield server
    server.stop()


def behind(tmp_path: Path, oidc: OidcProvider, mode: str = "proxy", **introspection: Any) -> Deployment:
    return deploy(mode, tmp_path, auth={
        "clients": {"signing_key_file": str(tmp_path / "key.pem")},
        "authorization_servers": [oidc.url],
        "introspection": {"url": f"{oidc.url}/token/introspection", "client_id": "gateway",
                          "client_secret": "gateway-secret", "issuer": oidc.url, **introspection},
    })


def introspections(deployment: Deployment) -> dict[str, float]:
    metrics = deployment.runtime.metrics.render().decode()
    prefix = "mcp_gateway_introspections_total{outcome=\""
    return {line[len(prefix):].split('"')[0]: float(line.split()[-1])
            for line in metrics.splitlines() if line.startswith(prefix)}


@pytest.mark.parametrize("mode", ["proxy", "middleware"])
async def test_the_sdk_oauth_client_gets_an_opaque_token_from_oidc_provider_and_calls_through(
        tmp_path: Path, oidc: OidcProvider, mode: str) -> None:
    deployment = behind(tmp_path, oidc, mode)
    try:
        provider = ClientCredentialsOAuthProvider(
            server_url=deployment.url, storage=MemoryTokens(), client_id="mcp-client",
            client_secret="mcp-client-secret", scope="mcp:tools", issuer=oidc.url)
        async with Client(streamable_http_client(deployment.url, http_client=httpx2.AsyncClient(auth=provider)),
                          mode="auto") as session:
            for _ in range(3):
                result = await session.call_tool("echo", {"text": "opaque, introspected"})
        assert result.content[0].text == "opaque, introspected"  # type: ignore[union-attr]
        events = [(e["operation"], e["result"], e["user_id"], e["roles"]) for e in deployment.audit_events()]
        assert events[0][1] == "auth_failed"  # token-less: 401 pointing at the metadata naming oidc-provider
        assert events.count(("tools/call", "allowed", "mcp-client", "reader")) == 3
        assert introspections(deployment) == {"active": 1.0}  # asked once, then cached
    finally:
        deployment.stop()


def test_inactive_foreign_unscoped_and_unverifiable_tokens(tmp_path: Path, oidc: OidcProvider) -> None:
    deployment = behind(tmp_path, oidc, cache_s=0)  # every request asks: revocation at the IdP shows at once
    try:
        token = oidc.token(deployment.url)
        assert call(deployment, token).status_code == 200
        oidc.revoke(token)
        foreign = oidc.token("http://127.0.0.1:1/elsewhere")
        unscoped = oidc.token(deployment.url, scope=None)
        forwarded = len(deployment.recorder.requests)
        for bad, reason in ((token, "inactive"), ("made-up-opaque-token", "inactive"), (foreign, "wrong_audience")):
            refused = call(deployment, bad)
            assert refused.status_code == 401, reason
            assert 'error="invalid_token"' in refused.headers["www-authenticate"]
            assert "resource_metadata=" in refused.headers["www-authenticate"]
            event = deployment.audit_events()[-1]
            assert (event["result"], event["reason"]) == ("auth_failed", reason)
        # No scope claim: authenticated, but no scope-bound role, so nothing granted.
        assert call(deployment, unscoped).status_code in (400, 403)
        assert deployment.audit_events()[-1]["result"] == "denied"
        oidc.stop()
        down = call(deployment, "never-seen-before")
        assert down.status_code == 401 and deployment.audit_events()[-1]["reason"] == "introspection_unavailable"
        assert len(deployment.recorder.requests) == forwarded  # none of them reached the upstream
        assert introspections(deployment)["error"] == 1.0
    finally:
        deployment.stop()
