"""Bearer JWTs from a real authorization server (npm oauth2-mock-server), verified through its JWKS."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.harness import Deployment, ServerThread, deploy
from tests.node_peers import NodeAuthServer
from tests.test_bad_input import BASE_HEADERS, modern


class Idp(NodeAuthServer):
    """oauth2-mock-server (tests/node/idp.mjs): JWTs, JWKS, key rotation on SIGUSR2."""

    script = "idp.mjs"

    def token(self, audience: Any, scope: str = "mcp:tools", client: str = "agent", *,
              overrides: dict[str, Any] | None = None, **claims: Any) -> str:
        """A client-credentials token; `claims` (or `overrides`, for claims named like a parameter) are merged in,
        a None value removing the claim."""
        claims.update(overrides or {})
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

    def token_signed_with(self, kid: str, audience: str) -> str:
        """A token the IdP signed with key `kid` (after a rotation it signs with its keys in turn)."""
        for _ in range(10):
            token = self.token(audience)
            if jwt.get_unverified_header(token)["kid"] == kid:
                return token
        raise AssertionError(f"the IdP signed nothing with {kid}")


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


def _made_up_kids(audience: str, idp: Idp, kids: list[str]) -> list[str]:
    """Tokens claiming the IdP's issuer, each naming one of `kids`, none of which the IdP ever published."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    claims = {"iss": idp.url, "sub": "mallory", "aud": audience, "exp": now + 600, "iat": now}
    return [jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid}) for kid in kids]


def test_a_made_up_kid_does_not_delay_a_key_rotation(tmp_path: Path, idp: Idp) -> None:
    deployment = behind(tmp_path, idp)  # the default limits: 30 s between fetches once the burst is spent
    try:
        assert post(deployment, idp.token(deployment.url)).status_code == 200
        assert post(deployment, _made_up_kids(deployment.url, idp, ["made-up"])[0]).status_code == 401
        idp.rotate()
        assert post(deployment, idp.token_signed_with("key-2", deployment.url)).status_code == 200
        assert metric(deployment, 'mcp_gateway_jwks_refreshes_total{outcome="ok"}') == 3
    finally:
        deployment.stop()


def test_a_flood_of_distinct_made_up_kids_costs_the_idp_no_more_than_the_burst(tmp_path: Path, idp: Idp) -> None:
    deployment = behind(tmp_path, idp)
    try:
        assert post(deployment, idp.token(deployment.url)).status_code == 200
        forwarded = len(deployment.recorder.requests)
        flood = _made_up_kids(deployment.url, idp, [f"made-up-{i}" for i in range(200)])
        answers = [post(deployment, token) for token in flood]
        assert all(a.status_code == 401 and 'error="invalid_token"' in a.headers["www-authenticate"]
                   for a in answers)
        assert len(deployment.recorder.requests) == forwarded
        fetched = metric(deployment, "mcp_gateway_jwks_refreshes_total")  # the first keys' fetch included
        external = deployment.runtime.config.auth.jwt
        assert external is not None and fetched <= external.refresh_burst, f"the JWKS was fetched {fetched} times"
        assert post(deployment, idp.token(deployment.url)).status_code == 200  # known keys serve on
    finally:
        deployment.stop()


def test_one_made_up_kid_repeated_is_fetched_for_once_and_leaves_room_for_a_rotation(tmp_path: Path,
                                                                                     idp: Idp) -> None:
    deployment = behind(tmp_path, idp)
    try:
        assert post(deployment, idp.token(deployment.url)).status_code == 200
        for token in _made_up_kids(deployment.url, idp, ["made-up"] * 50):
            assert post(deployment, token).status_code == 401
        assert metric(deployment, "mcp_gateway_jwks_refreshes_total") == 2  # the first keys, then one look
        idp.rotate()
        assert post(deployment, idp.token_signed_with("key-2", deployment.url)).status_code == 200
    finally:
        deployment.stop()


def test_a_real_idp_token_with_a_claim_of_the_wrong_type_is_refused(tmp_path: Path, idp: Idp) -> None:
    deployment = behind(tmp_path, idp)
    rows: list[tuple[dict[str, Any], str]] = [
        ({"scope": {"mcp:tools": 1}}, "claim_type:scope"),
        ({"amr": "pwd"}, "claim_type:amr"),
        ({"exp": str(int(time.time()) + 600)}, "claim_type:exp"),
        ({"client_id": 7}, "claim_type:client_id"),
    ]
    try:
        for claims, reason in rows:
            response = post(deployment, idp.token(deployment.url, overrides=claims))
            assert response.status_code == 401, (claims, response.text)
            assert 'error="invalid_token"' in response.headers["www-authenticate"]
            event = deployment.audit_events()[-1]
            assert (event["result"], event["reason"]) == ("auth_failed", reason)
        assert deployment.recorder.requests == []
    finally:
        deployment.stop()


class HostileIssuer:
    """An issuer on 127.0.0.1 whose metadata and JWKS are whatever documents the test sets: an IdP gone bad.

    It starts out sound: RFC 8414 metadata naming its /jwks, which publishes one ES256 key, `good`."""

    METADATA = "/.well-known/oauth-authorization-server"

    def __init__(self) -> None:
        self.keys = {"good": ec.generate_private_key(ec.SECP256R1())}
        self.documents: dict[str, Any] = {}
        self.server = ServerThread(Starlette(routes=[Route("/{path:path}", self._serve)])).start()
        self.url = self.server.url
        self.documents[self.METADATA] = {"issuer": self.url, "jwks_uri": f"{self.url}/jwks"}
        self.documents["/jwks"] = {"keys": [self.jwk("good")]}

    def jwk(self, kid: str, **members: Any) -> dict[str, Any]:
        """The public JWK of key `kid` (made on first use), with `members` added."""
        key = self.keys.setdefault(kid, ec.generate_private_key(ec.SECP256R1()))
        public: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        return {**public, "kid": kid, "alg": "ES256", **members}

    def token(self, audience: str, kid: str = "good") -> str:
        now = int(time.time())
        claims = {"iss": self.url, "sub": "agent", "aud": audience, "exp": now + 600, "iat": now,
                  "scope": "mcp:tools"}
        return jwt.encode(claims, self.keys[kid], algorithm="ES256", headers={"kid": kid})

    async def _serve(self, request: Request) -> Response:
        path = request.url.path
        if path not in self.documents:
            return Response(status_code=404)
        document = self.documents[path]
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        return Response(body, media_type="application/json")

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def hostile() -> Iterator[HostileIssuer]:
    issuer = HostileIssuer()
    yield issuer
    issuer.stop()


def behind_hostile(tmp_path: Path, issuer: HostileIssuer) -> Deployment:
    # no limit on fetches: each request below that needs keys makes one
    return deploy("proxy", tmp_path, auth={"jwt": {"issuer": issuer.url, "min_refresh_interval_s": 0},
                                           "clients": {"signing_key_file": str(tmp_path / "key.pem")}})


_JWKS_BY_POSITION: list[tuple[str, Callable[[HostileIssuer], Any]]] = [
    ("an array", lambda i: []),
    ("a string", lambda i: "x"),
    ("null", lambda i: None),
    ("a number", lambda i: 5),
    ("not JSON", lambda i: b"{not json"),
    ("no keys", lambda i: {}),
    ("keys a number", lambda i: {"keys": 5}),
    ("keys an object", lambda i: {"keys": i.jwk("good")}),
    ("keys holding no JWK", lambda i: {"keys": [5, "x", None, []]}),
    ("a key whose alg is a list", lambda i: {"keys": [i.jwk("good", alg=["ES256"])]}),
    ("a key whose kty is an object", lambda i: {"keys": [i.jwk("good", kty={"EC": 1})]}),
    ("a key whose kid is a number", lambda i: {"keys": [{**i.jwk("good"), "kid": 5}]}),
    ("only an encryption key", lambda i: {"keys": [i.jwk("good", use="enc")]}),
]
_METADATA: list[tuple[str, Callable[[HostileIssuer], Any]]] = [
    ("an array", lambda i: []),
    ("null", lambda i: None),
    ("a string", lambda i: "x"),
    ("issuer a number", lambda i: {"issuer": 5, "jwks_uri": f"{i.url}/jwks"}),
    ("jwks_uri a number", lambda i: {"issuer": i.url, "jwks_uri": 5}),
    ("jwks_uri a list", lambda i: {"issuer": i.url, "jwks_uri": [f"{i.url}/jwks"]}),
    ("jwks_uri no URL", lambda i: {"issuer": i.url, "jwks_uri": "http://[::1"}),
    ("jwks_uri not http", lambda i: {"issuer": i.url, "jwks_uri": "file:///etc/passwd"}),
]
HOSTILE: list[tuple[str, str, Callable[[HostileIssuer], Any]]] = (
    [(f"JWKS {what}", "/jwks", make) for what, make in _JWKS_BY_POSITION]
    + [(f"metadata {what}", HostileIssuer.METADATA, make) for what, make in _METADATA])


@pytest.mark.parametrize(("what", "path", "document"), HOSTILE, ids=[row[0] for row in HOSTILE])
def test_a_hostile_jwks_or_metadata_document_is_a_failed_fetch_and_a_401_never_a_500(
        tmp_path: Path, hostile: HostileIssuer, caplog: pytest.LogCaptureFixture, what: str, path: str,
        document: Callable[[HostileIssuer], Any]) -> None:
    hostile.documents[path] = document(hostile)
    deployment = behind_hostile(tmp_path, hostile)
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.auth"):
            response = post(deployment, hostile.token(deployment.url))
        assert response.status_code == 401
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
        event = deployment.audit_events()[-1]
        assert (event["result"], event["reason"]) == ("auth_failed", "unknown_kid")
        assert metric(deployment, 'mcp_gateway_jwks_refreshes_total{outcome="failed"}') == 1
        assert any(r.levelno == logging.WARNING and "unavailable" in r.getMessage() for r in caplog.records)
        ready = httpx.get(f"{deployment.gateway.url}/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["jwks_keys"] is False
        assert deployment.recorder.requests == []
    finally:
        deployment.stop()


@pytest.mark.parametrize(("what", "document"), _JWKS_BY_POSITION, ids=[row[0] for row in _JWKS_BY_POSITION])
def test_the_last_good_keys_stay_in_use_when_the_jwks_turns_hostile(
        tmp_path: Path, hostile: HostileIssuer, what: str, document: Callable[[HostileIssuer], Any]) -> None:
    deployment = behind_hostile(tmp_path, hostile)
    try:
        assert post(deployment, hostile.token(deployment.url)).status_code == 200
        hostile.documents["/jwks"] = document(hostile)
        hostile.jwk("rotated")  # a key the JWKS never publishes: its token makes the gateway fetch again
        assert post(deployment, hostile.token(deployment.url, kid="rotated")).status_code == 401
        assert metric(deployment, 'mcp_gateway_jwks_refreshes_total{outcome="failed"}') == 1
        assert post(deployment, hostile.token(deployment.url)).status_code == 200
        ready = httpx.get(f"{deployment.gateway.url}/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["jwks_keys"] is True
    finally:
        deployment.stop()


# (what, the members a second key is published with, whether a token it signed is accepted)
KEY_USES: list[tuple[str, dict[str, Any], bool]] = [
    ("neither use nor key_ops", {}, True),
    ("use sig", {"use": "sig"}, True),
    ("key_ops verify", {"key_ops": ["verify"]}, True),
    ("use sig, key_ops sign and verify", {"use": "sig", "key_ops": ["sign", "verify"]}, True),
    ("use enc", {"use": "enc"}, False),
    ("use null", {"use": None}, False),
    ("key_ops encrypt and wrapKey", {"key_ops": ["encrypt", "wrapKey"]}, False),
    ("key_ops sign only", {"key_ops": ["sign"]}, False),
    ("key_ops the string verify", {"key_ops": "verify"}, False),
    ("use sig but key_ops encrypt", {"use": "sig", "key_ops": ["encrypt"]}, False),
]


@pytest.mark.parametrize(("what", "members", "accepted"), KEY_USES, ids=[row[0] for row in KEY_USES])
def test_only_keys_published_for_signature_verification_verify_tokens(
        tmp_path: Path, hostile: HostileIssuer, what: str, members: dict[str, Any], accepted: bool) -> None:
    hostile.documents["/jwks"] = {"keys": [hostile.jwk("good"), hostile.jwk("second", **members)]}
    deployment = behind_hostile(tmp_path, hostile)
    try:
        response = post(deployment, hostile.token(deployment.url, kid="second"))
        if accepted:
            assert response.status_code == 200
        else:
            assert response.status_code == 401
            assert 'error="invalid_token"' in response.headers["www-authenticate"]
            assert deployment.audit_events()[-1]["reason"] == "unknown_kid"
        assert post(deployment, hostile.token(deployment.url)).status_code == 200  # the sound key serves
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
