"""The gateway's own authorization server: client_credentials, revocation, metadata, JWKS."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import httpx2
import jwt
import pytest
from mcp import Client
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

from gateway.auth.secrets import hash_secret, secret_matches
from tests.harness import ROOT, Deployment, deploy
from tests.test_bad_input import BASE_HEADERS, modern

SECRET = "correct horse battery staple"
HASH = hash_secret(SECRET)


class MemoryTokens:
    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


@pytest.fixture(params=["proxy", "middleware"])
def gateway_as(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    deployment = deploy(request.param, tmp_path, auth={"clients": {
        "signing_key_file": str(tmp_path / "key.pem"),
        "max_failures": 3,
        "registered": [{"client_id": "ci-bot", "secret_hash": HASH, "scopes": ["mcp:tools"],
                        "claims": {"groups": ["ci"]}, "security_level": "standard"}],
    }})
    yield deployment
    deployment.stop()


def token_request(deployment: Deployment, **form: str) -> httpx.Response:
    return httpx.post(f"{deployment.gateway.url}/oauth/token", data={"grant_type": "client_credentials", **form},
                      auth=("ci-bot", SECRET))


def call(deployment: Deployment, token: str) -> httpx.Response:
    headers, body = modern("tools/call", {"name": "echo", "arguments": {"text": "hi"}})
    return httpx.post(deployment.url, headers={**BASE_HEADERS, **headers, "Authorization": f"Bearer {token}"},
                      json=body)


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_the_sdk_oauth_client_completes_the_whole_flow_through_the_gateway(gateway_as: Deployment,
                                                                                 era: str) -> None:
    issuer = gateway_as.runtime.config.public_url
    provider = ClientCredentialsOAuthProvider(server_url=gateway_as.url, storage=MemoryTokens(), client_id="ci-bot",
                                              client_secret=SECRET, scope="mcp:tools", issuer=issuer)
    http = httpx2.AsyncClient(auth=provider)
    async with Client(streamable_http_client(gateway_as.url, http_client=http), mode=era) as session:
        result = await session.call_tool("echo", {"text": "a bot, by the book"})
    assert result.content[0].text == "a bot, by the book"  # type: ignore[union-attr]
    events = [(e["operation"], e["result"], e["user_id"]) for e in gateway_as.audit_events()]
    assert events[0][1] == "auth_failed"  # the first, token-less try: 401 with the metadata URL
    assert ("oauth/token", "allowed", "ci-bot") in events
    assert ("tools/call", "allowed", "ci-bot") in events


def test_a_wrong_or_unknown_secret_is_invalid_client_and_audited(gateway_as: Deployment) -> None:
    url = f"{gateway_as.gateway.url}/oauth/token"
    wrong = httpx.post(url, data={"grant_type": "client_credentials"}, auth=("ci-bot", "not the secret"))
    unknown = httpx.post(url, data={"grant_type": "client_credentials", "client_id": "nobody",
                                    "client_secret": "whatever-whatever"})
    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
    assert wrong.headers["www-authenticate"] == 'Basic realm="mcp-gateway"'
    assert (unknown.status_code, unknown.json()["error"]) == (401, "invalid_client")
    assert [(e["result"], e["reason"]) for e in gateway_as.audit_events()] == [
        ("auth_failed", "oauth:invalid_client")] * 2


def test_client_secret_post_works_and_scopes_and_resources_are_checked(gateway_as: Deployment) -> None:
    url = f"{gateway_as.gateway.url}/oauth/token"
    posted = httpx.post(url, data={"grant_type": "client_credentials", "client_id": "ci-bot", "client_secret": SECRET,
                                   "resource": gateway_as.url})
    assert posted.status_code == 200 and posted.json()["scope"] == "mcp:tools"
    assert posted.headers["cache-control"] == "no-store"
    claims = jwt.decode(posted.json()["access_token"], options={"verify_signature": False})
    assert (claims["aud"], claims["sub"], claims["groups"], claims["gateway_level"]) == (
        gateway_as.url, "ci-bot", ["ci"], "standard")
    assert token_request(gateway_as, scope="mcp:admin").json()["error"] == "invalid_scope"
    assert token_request(gateway_as, resource="http://127.0.0.1:1/elsewhere").json()["error"] == "invalid_target"
    assert token_request(gateway_as, grant_type="password").json()["error"] == "unsupported_grant_type"


def test_a_revoked_token_is_refused_on_its_next_request(gateway_as: Deployment) -> None:
    token = token_request(gateway_as).json()["access_token"]
    assert call(gateway_as, token).status_code == 200  # verified and cached
    revoked = httpx.post(f"{gateway_as.gateway.url}/oauth/revoke", data={"token": token}, auth=("ci-bot", SECRET))
    assert revoked.status_code == 200
    refused = call(gateway_as, token)
    assert refused.status_code == 401 and 'error="invalid_token"' in refused.headers["www-authenticate"]
    assert gateway_as.audit_events()[-1]["reason"] == "revoked"
    if gateway_as.mode == "proxy":  # /metrics is the reverse proxy's route
        assert "mcp_gateway_revocations_total 1.0" in httpx.get(f"{gateway_as.gateway.url}/metrics").text
    fresh = token_request(gateway_as).json()["access_token"]
    assert call(gateway_as, fresh).status_code == 200


def test_metadata_and_jwks_let_others_verify_the_gateways_tokens(gateway_as: Deployment) -> None:
    base = gateway_as.gateway.url
    metadata = httpx.get(f"{base}/.well-known/oauth-authorization-server").json()
    assert metadata["issuer"] == gateway_as.runtime.config.public_url
    assert metadata["token_endpoint"].endswith("/oauth/token") and metadata["grant_types_supported"] == [
        "client_credentials"]
    keys = jwt.PyJWKSet.from_dict(httpx.get(f"{base}/.well-known/jwks.json").json())
    token = token_request(gateway_as).json()["access_token"]
    kid = jwt.get_unverified_header(token)["kid"]
    claims = jwt.decode(token, keys[kid].key, algorithms=["ES256"], audience=gateway_as.url)
    assert claims["client_id"] == "ci-bot"
    resource = httpx.get(f"{base}/.well-known/oauth-protected-resource/mcp").json()
    assert resource["resource"] == gateway_as.url and resource["authorization_servers"] == [metadata["issuer"]]


def test_hash_secret_prints_a_hash_that_matches_and_refuses_short_secrets() -> None:
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "hash-secret"], input=SECRET + "\n",
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and secret_matches(SECRET, done.stdout.strip())
    assert not secret_matches("something else entirely", done.stdout.strip())
    short = subprocess.run([sys.executable, "-m", "gateway.cli", "hash-secret"], input="short\n",
                           capture_output=True, text=True, cwd=ROOT)
    assert short.returncode == 2



def _cli(deployment: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "sessions", *args, "--config",
                           str(deployment.config_path), "--url", deployment.gateway.url, "--as", "olga"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_sessions_list_shows_issued_tokens_and_sessions_revoke_ends_one(gateway_as: Deployment) -> None:
    used = token_request(gateway_as).json()["access_token"]
    unused = token_request(gateway_as).json()["access_token"]
    used_id, unused_id = (jwt.decode(t, options={"verify_signature": False})["jti"] for t in (used, unused))
    assert call(gateway_as, used).status_code == 200

    listed = _cli(gateway_as, "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    sessions = {s["token_id"]: s for s in json.loads(listed.stdout)}
    assert {s["subject"] for s in sessions.values()} == {"ci-bot", "olga"}  # the command's own (--as), too
    assert {i for i, s in sessions.items() if s["subject"] == "ci-bot"} == {used_id, unused_id}
    assert sessions[used_id]["client_id"] == "ci-bot" and sessions[used_id]["scopes"] == ["mcp:tools"]
    assert sessions[used_id]["last_seen"] is not None and sessions[unused_id]["last_seen"] is None
    assert sessions[used_id]["issued_at"] <= sessions[used_id]["last_seen"] < sessions[used_id]["expires_at"]
    table = _cli(gateway_as, "list")
    assert used_id in table.stdout and "active" in table.stdout

    revoked = _cli(gateway_as, "revoke", used_id)
    assert revoked.returncode == 0 and revoked.stdout.strip() == f"revoked {used_id}"
    before = len(gateway_as.recorder.requests)
    refused = call(gateway_as, used)
    assert refused.status_code == 401 and 'error="invalid_token"' in refused.headers["www-authenticate"]
    assert len(gateway_as.recorder.requests) == before  # never reached the upstream
    assert call(gateway_as, unused).status_code == 200
    assert "revoked" in _cli(gateway_as, "list").stdout
    missing = _cli(gateway_as, "revoke", "no-such-token")
    assert missing.returncode == 1 and "404" in missing.stderr
    events = [(e["operation"], e["result"], e["reason"]) for e in gateway_as.audit_events()]
    assert ("admin/sessions:delete", "allowed", f"admin:revoked:{used_id}") in events
    assert [r for _, r, why in events if why == "revoked"] == ["auth_failed"]
    assert ("admin/sessions:delete", "invalid_request", "admin:no_such_session") in events


def test_the_sessions_api_needs_the_admin_scope(gateway_as: Deployment) -> None:
    admin = f"{gateway_as.gateway.url}/admin/sessions"
    bot = token_request(gateway_as).json()["access_token"]  # mcp:tools only
    forbidden = httpx.get(admin, headers={"Authorization": f"Bearer {bot}"})
    assert forbidden.status_code == 403 and 'scope="sessions:admin"' in forbidden.headers["www-authenticate"]
    assert httpx.get(admin).status_code == 401
    assert httpx.delete(f"{admin}/x", headers={"Authorization": f"Bearer {bot}"}).status_code == 403
    assert [(e["operation"], e["result"]) for e in gateway_as.audit_events()][-3:] == [
        ("admin/sessions", "denied"), ("admin/sessions", "auth_failed"), ("admin/sessions:delete", "denied")]
