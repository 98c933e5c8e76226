"""Bearer JWTs from a real authorization server (npm oauth2-mock-server), verified through its JWKS."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.harness import Deployment, deploy
from tests.node_peers import NodeAuthServer
from tests.test_bad_input import BASE_HEADERS, modern


class Idp(NodeAuthServer):
    """oauth2-mock-server (tests/node/idp.mjs): JWTs, JWKS, key rotation on SIGUSR2."""

    script = "idp.mjs"

    def token(self, audience: Any, scope: str = "mcp:tools", client: str = "agent", **claims: Any) -> str:
        data = {"grant_type": "client_credentials", "scope": scope, "aud": audience if isinstance(audience, str)
                else audience[0]}
        if not isinstance(audience, str):
            claims["aud"] = audience
        if claims:
            data["claims"] = json.dumps(claims)
        response = httpx.post(f"{self.url}/token", data=data, auth=(client, "secret"))
        response.raise_for_status()
        return str(response.json()["access_token"])

    def rotate(self) -> None:
        self.process.send_signal(signal.SIGUSR2)
        time.sleep(0.3)


@pytest.fixture
def idp() -> Iterator[Idp]:
    server = Idp()
    yield server
    server.stop()


def behind(tmp_path: Path, idp: Idp, mode: str = "proxy", **jwt_config: Any) -> Deployment:
    return deploy(mode, tmp_path, auth={"jwt": {"issuer": idp.url, **jwt_config},
                                        "clients": {"signing_key_file": str(tmp_path / "key.pem")}})


def post(deployment: Deployment, token: str) -> httpx.Response:
    headers, body = modern("tools/call", {"name": "echo", "arguments": {"text": "hi"}})
    return httpx.post(deployment.url, headers={**BASE_HEADERS, **headers, "Authorization": f"Bearer {token}"},
                      json=body)


def metric(deployment: Deployment, line_start: str) -> float:
    text = httpx.get(f"{deployment.gateway.url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


@pytest.mark.parametrize("mode", ["proxy", "middleware"])
@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_the_sdk_client_works_through_the_gateway_with_a_real_idp_token(tmp_path: Path, idp: Idp, mode: str,
                                                                               era: str) -> None:
    deployment = behind(tmp_path, idp, mode)
    try:
        token = idp.token(deployment.url)
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
        async with Client(streamable_http_client(deployment.url, http_client=http), mode=era) as session:
            result = await session.call_tool("echo", {"text": "from a real IdP"})
            assert result.content[0].text == "from a real IdP"  # type: ignore[union-attr]
        calls = [e for e in deployment.audit_events() if e["operation"] == "tools/call"]
        assert [(e["user_id"], e["client_id"], e["roles"]) for e in calls] == [("agent", "agent", "reader")]
        metadata = httpx.get(f"{deployment.gateway.url}/.well-known/oauth-protected-resource/mcp").json()
        assert metadata["authorization_servers"][0] == idp.url
    finally:
        deployment.stop()


def _segment(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def _idp_public_pem(idp: Idp) -> bytes:
    jwk = httpx.get(f"{idp.url}/jwks").json()["keys"][0]
    public = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(jwk))
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[union-attr]


def _forged(audience: str, idp: Idp) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    return jwt.encode({"iss": idp.url, "sub": "mallory", "aud": audience, "exp": now + 600, "iat": now}, key,
                      algorithm="RS256", headers={"kid": "forged-key"})


def _unsigned(audience: str, idp: Idp) -> str:
    now = int(time.time())
    return (_segment({"alg": "none", "kid": "key-1", "typ": "JWT"}) + "."
            + _segment({"iss": idp.url, "sub": "mallory", "aud": audience, "exp": now + 600}) + ".")


def _hs256_with_public_key(audience: str, idp: Idp) -> str:
    now = int(time.time())
    header = _segment({"alg": "HS256", "kid": "key-1", "typ": "JWT"})
    payload = _segment({"iss": idp.url, "sub": "mallory", "aud": audience, "exp": now + 600})
    signature = hmac.new(_idp_public_pem(idp), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


REFUSED: list[tuple[str, Any, str]] = [
    ("alg none", lambda d, i: _unsigned(d.url, i), "alg_not_allowed:none"),
    ("HS256 signed with the public key", lambda d, i: _hs256_with_public_key(d.url, i), "alg_not_allowed:HS256"),
    ("unknown kid", lambda d, i: _forged(d.url, i), "unknown_kid"),
    ("expired", lambda d, i: i.token(d.url, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200,
                                     nbf=int(time.time()) - 7200), "expired"),
    ("nbf in the future", lambda d, i: i.token(d.url, nbf=int(time.time()) + 3600), "not_yet_valid"),
    ("wrong iss", lambda d, i: i.token(d.url, iss="http://127.0.0.1:1/evil"), "wrong_issuer"),
    ("wrong aud", lambda d, i: i.token("http://127.0.0.1:1/other"), "wrong_audience"),
    ("aud array without us", lambda d, i: i.token(["http://a.example/mcp", "http://b.example/mcp"]),
     "wrong_audience"),
    ("missing exp", lambda d, i: i.token(d.url, exp=None), "missing_claim:exp"),
]


def test_every_bad_token_is_refused_audited_and_not_forwarded(tmp_path: Path, idp: Idp) -> None:
    deployment = behind(tmp_path, idp)
    try:
        assert post(deployment, idp.token(deployment.url)).status_code == 200  # the keys are fetched
        deployment.recorder.clear()
        for case, make, _ in REFUSED:
            response = post(deployment, make(deployment, idp))
            assert response.status_code == 401, case
            assert response.json()["error"]["code"] == -32001, case
            challenge = response.headers["www-authenticate"]
            assert 'error="invalid_token"' in challenge and "resource_metadata=" in challenge, case
        assert deployment.recorder.requests == [], "a refused token's request reached the upstream"
        refused = [(e["result"], e["reason"]) for e in deployment.audit_events()][1:]
        assert refused == [("auth_failed", reason) for _, _, reason in REFUSED]
        assert post(deployment, idp.token([deployment.url, "http://b.example/mcp"])).status_code == 200
    finally:
        deployment.stop()


def test_a_rotated_key_is_picked_up_without_a_restart(tmp_path: Path, idp: Idp) -> None:
    deployment = behind(tmp_path, idp, min_refresh_interval_s=0)
    try:
        assert post(deployment, idp.token(deployment.url)).status_code == 200
        idp.rotate()
        kids = []
        for _ in range(4):  # the IdP now signs with its keys in turn
            token = idp.token(deployment.url)
            kids.append(jwt.get_unverified_header(token)["kid"])
            assert post(deployment, token).status_code == 200
        assert "key-2" in kids
        assert metric(deployment, 'mcp_gateway_jwks_refreshes_total{outcome="ok"}') == 2
    finally:
        deployment.stop()


def test_cached_keys_serve_while_the_idp_is_down_and_unknown_kids_fail_closed(tmp_path: Path) -> None:
    idp = Idp()
    deployment = behind(tmp_path, idp, min_refresh_interval_s=0)
    try:
        assert post(deployment, idp.token(deployment.url)).status_code == 200
        later = idp.token(deployment.url, scope="mcp:tools mcp:read")  # minted now, presented after the outage
        idp.stop()
        assert post(deployment, later).status_code == 200
        refused = post(deployment, _forged(deployment.url, idp))
        assert refused.status_code == 401
        assert metric(deployment, 'mcp_gateway_jwks_refreshes_total{outcome="failed"}') == 1
        assert deployment.audit_events()[-1]["reason"] == "unknown_kid"
    finally:
        deployment.stop()
        if idp.process.poll() is None:
            idp.stop()


def test_a_flood_of_made_up_kids_fetches_the_jwks_at_most_once_per_interval(tmp_path: Path, idp: Idp) -> None:
    deployment = behind(tmp_path, idp, min_refresh_interval_s=60)
    try:
        assert post(deployment, idp.token(deployment.url)).status_code == 200
        for _ in range(50):
            assert post(deployment, _forged(deployment.url, idp)).status_code == 401
        fetched = metric(deployment, "mcp_gateway_jwks_refreshes_total")
        assert fetched == 1, f"the JWKS was fetched {fetched} times"
    finally:
        deployment.stop()


def test_a_token_is_verified_once_and_then_served_from_the_cache(tmp_path: Path, idp: Idp) -> None:
    deployment = behind(tmp_path, idp)
    try:
        token = idp.token(deployment.url)
        for _ in range(5):
            assert post(deployment, token).status_code == 200
        assert metric(deployment, 'mcp_gateway_token_cache_total{outcome="miss"}') == 1
        assert metric(deployment, 'mcp_gateway_token_cache_total{outcome="hit"}') == 4
        assert metric(deployment, 'mcp_gateway_auth_attempts_total{outcome="ok",source="jwt"}') == 5
    finally:
        deployment.stop()


def test_config_refuses_symmetric_algorithms(tmp_path: Path) -> None:
    from gateway import ConfigError, load_config
    from tests.harness import write_config

    path = write_config(tmp_path, "http://127.0.0.1:9/mcp",
                        auth={"jwt": {"issuer": "http://idp", "algorithms": ["RS256", "HS256", "none"]}})
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert any("auth.jwt.algorithms: HS256, none not allowed" in line for line in raised.value.problems)


def test_readyz_reports_whether_the_issuers_keys_are_at_hand(tmp_path: Path) -> None:
    idp = Idp()
    dead = Idp()
    dead.stop()  # an issuer that never answers
    for name in ("up", "down"):
        (tmp_path / name).mkdir()
    ready = behind(tmp_path / "up", idp, min_refresh_interval_s=0)
    unready = behind(tmp_path / "down", dead, min_refresh_interval_s=0)
    try:
        answer = httpx.get(f"{ready.gateway.url}/readyz")
        assert answer.status_code == 200 and answer.json()["checks"]["jwks_keys"] is True
        answer = httpx.get(f"{unready.gateway.url}/readyz")
        assert answer.status_code == 503 and answer.json()["checks"]["jwks_keys"] is False
    finally:
        ready.stop()
        unready.stop()
        idp.stop()
