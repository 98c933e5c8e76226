"""What the upstream learns (X-MCP-Identity), scope hierarchy, auth.resource and the advertised scopes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from tests.harness import Deployment, deploy
from tests.test_bad_input import BASE_HEADERS, modern


def call(deployment: Deployment, token: str, **extra: str) -> httpx.Response:
    headers, body = modern("tools/call", {"name": "echo", "arguments": {"text": "hi"}})
    return httpx.post(deployment.url, json=body,
                      headers={**BASE_HEADERS, **headers, "Authorization": f"Bearer {token}", **extra})


@pytest.fixture(params=["proxy", "middleware"])
def with_identity(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    deployment = deploy(request.param, tmp_path, upstream_options={"identity_header": True})
    yield deployment
    deployment.stop()


def test_the_upstream_gets_a_short_lived_identity_it_can_verify_and_never_the_clients(
        with_identity: Deployment) -> None:
    token = with_identity.token("alice", groups=["ops"])
    forged = jwt.encode({"sub": "root"}, "x" * 32, algorithm="HS256")
    assert call(with_identity, token, **{"X-MCP-Identity": forged}).status_code == 200
    seen = [r.headers for r in with_identity.recorder.requests if r.method == "POST"][-1]
    assert "authorization" not in seen
    identity = seen["x-mcp-identity"]
    assert identity != forged
    keys = jwt.PyJWKSet.from_dict(httpx.get(f"{with_identity.gateway.url}/.well-known/jwks.json").json())
    header = jwt.get_unverified_header(identity)
    upstream = with_identity.runtime.config.upstreams[0]
    audience = upstream.url or with_identity.url
    claims = jwt.decode(identity, keys[header["kid"]].key, algorithms=["ES256"], audience=audience,
                        issuer=with_identity.runtime.config.public_url)
    assert header["typ"] == "mcp-identity+jwt"
    assert (claims["sub"], claims["roles"], claims["scope"]) == ("alice", ["operator", "reader"], "mcp:tools")
    assert claims["exp"] - claims["iat"] == 60

    # The upstream cannot turn it into an access token for the gateway (middleware: same audience).
    before = len(with_identity.recorder.requests)
    replayed = call(with_identity, identity)
    assert replayed.status_code == 401
    assert len(with_identity.recorder.requests) == before
    assert with_identity.audit_events()[-1]["reason"] in ("identity_token", "wrong_audience")


def test_without_identity_header_a_clients_x_mcp_identity_is_dropped(tmp_path: Path) -> None:
    deployment = deploy("proxy", tmp_path)
    try:
        assert call(deployment, deployment.token(), **{"X-MCP-Identity": "forged"}).status_code == 200
        assert all("x-mcp-identity" not in r.headers for r in deployment.recorder.requests)
    finally:
        deployment.stop()


def test_a_broader_scope_implies_the_narrower_ones(tmp_path: Path) -> None:
    deployment = deploy("middleware", tmp_path, auth={
        "clients": {"signing_key_file": str(tmp_path / "key.pem")},
        "scope_hierarchy": {"mcp:admin": ["mcp:ops"], "mcp:ops": ["mcp:tools"]},
    })
    try:
        assert call(deployment, deployment.token(scopes=("mcp:admin",))).status_code == 200  # admin -> ops -> tools
        refused = call(deployment, deployment.token(scopes=("mcp:other",)))
        assert refused.status_code in (400, 403)  # no role: hidden as an unknown tool, or a scope challenge
        assert deployment.audit_events()[-1]["result"] == "denied"
        metadata = httpx.get(f"{deployment.gateway.url}/.well-known/oauth-protected-resource/mcp").json()
        assert metadata["scopes_supported"] == ["mcp:admin", "mcp:ops", "mcp:tools"]
    finally:
        deployment.stop()


def test_auth_resource_sets_the_audience_and_the_advertised_resource(tmp_path: Path) -> None:
    deployment = deploy("proxy", tmp_path, auth={
        "clients": {"signing_key_file": str(tmp_path / "key.pem")},
        "resource": "https://mcp.example.com/mcp",
        "scopes_supported": ["mcp:tools", "mcp:read"],
    })
    try:
        assert call(deployment, deployment.token()).status_code == 200  # minted for the configured resource
        public = deployment.runtime.authenticator.issue_token(subject="bob", audience=deployment.url,
                                                              scopes=["mcp:tools"])
        refused = call(deployment, public)
        assert refused.status_code == 401 and deployment.audit_events()[-1]["reason"] == "wrong_audience"
        metadata = httpx.get(f"{deployment.gateway.url}/.well-known/oauth-protected-resource/mcp").json()
        assert metadata["resource"] == "https://mcp.example.com/mcp"
        assert metadata["scopes_supported"] == ["mcp:tools", "mcp:read"]
    finally:
        deployment.stop()
