"""Every claim the gateway reads has one JSON type, whichever source vouched for the token.

A validly signed token (or an active introspection answer) whose `scope` is an
object, whose `exp` is a string, whose `amr` is a lone string... is refused 401
invalid_token and audited `auth_failed`: never a grant, never a 500, never
forwarded. The same table runs through the gateway's own JWTs and through RFC
7662 introspection (a real HTTP server that answers with whatever claims the
test put in the opaque token).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.auth.keys import ALGORITHM
from gateway.principal import ClaimTypeError, principal_from_claims
from tests.harness import Deployment, ServerThread, deploy
from tests.test_auth_options import call

RESOURCE = "<the gateway's resource>"  # in an `aud` list below, stands for the deployment's resource URL

# (what, claims laid over an otherwise valid token that grants mcp:tools, the reason audited)
WRONG_TYPES: list[tuple[str, dict[str, Any], str]] = [
    ("scope a number", {"scope": 5}, "claim_type:scope"),
    ("scope null", {"scope": None}, "claim_type:scope"),
    ("scope an object (its keys are no scopes)", {"scope": {"mcp:tools": 1}}, "claim_type:scope"),
    ("scope a list", {"scope": ["mcp:tools"]}, "claim_type:scope"),
    ("scp a number", {"scp": 5}, "claim_type:scp"),
    ("scp a list holding an object", {"scp": ["mcp:tools", {}]}, "claim_type:scp"),
    ("sub a number", {"sub": 5}, "claim_type:sub"),
    ("iss a list", {"iss": ["http://127.0.0.1:1"]}, "claim_type:iss"),
    ("aud a number", {"aud": 5}, "claim_type:aud"),
    ("aud a list holding a number", {"aud": [RESOURCE, 5]}, "claim_type:aud"),
    ("exp a string", {"exp": "x"}, "claim_type:exp"),
    ("exp a numeric string", {"exp": str(int(time.time()) + 600)}, "claim_type:exp"),
    ("exp true", {"exp": True}, "claim_type:exp"),
    ("nbf an object", {"nbf": {}}, "claim_type:nbf"),
    ("iat false", {"iat": False}, "claim_type:iat"),
    ("jti a number", {"jti": 5}, "claim_type:jti"),
    ("client_id an object", {"client_id": {}}, "claim_type:client_id"),
    ("azp a list", {"azp": ["agent"]}, "claim_type:azp"),
    ("acr a number", {"acr": 2}, "claim_type:acr"),
    ("amr a lone string", {"amr": "pwd"}, "claim_type:amr"),
    ("amr a list holding a number", {"amr": ["pwd", 1]}, "claim_type:amr"),
    ("auth_time NaN", {"auth_time": float("nan")}, "claim_type:auth_time"),
    ("auth_time Infinity", {"auth_time": float("inf")}, "claim_type:auth_time"),
    ("gateway_level a number", {"gateway_level": 3}, "claim_type:gateway_level"),
]

# (what, claims laid over an otherwise valid token that names no scope): each reaches the upstream
WELL_TYPED: list[tuple[str, dict[str, Any]]] = [
    ("scope a space-separated string", {"scope": "mcp:read mcp:tools"}),
    ("scp a list of strings", {"scp": ["mcp:tools"]}),
    ("scp a string", {"scp": "mcp:tools"}),
    ("times as floats", {"scope": "mcp:tools", "exp": time.time() + 600.5, "auth_time": time.time() - 5.5}),
    ("every optional claim", {"scope": "mcp:tools", "client_id": "agent", "azp": "agent", "acr": "urn:mfa",
                              "amr": ["pwd", "otp"], "gateway_level": "high",
                              "aud": [RESOURCE, "http://127.0.0.1:1/other"]}),
]


def _payload(deployment: Deployment, issuer: str, claims: dict[str, Any]) -> dict[str, Any]:
    config = deployment.runtime.config
    resource = config.resource_url(config.upstreams[0])
    now = int(time.time())
    body: dict[str, Any] = {"iss": issuer, "sub": "alice", "aud": resource, "iat": now, "nbf": now,
                            "exp": now + 600, "jti": uuid.uuid4().hex}
    body.update(claims)
    if isinstance(body["aud"], list):
        body["aud"] = [resource if named == RESOURCE else named for named in body["aud"]]
    return body


def _own_jwt(deployment: Deployment, claims: dict[str, Any]) -> str:
    """Signed with the gateway's own key, the payload exactly as given (PyJWT's encoder would refuse some)."""
    key = deployment.runtime.signing_key
    body = _payload(deployment, deployment.runtime.config.public_url, claims)
    return jwt.PyJWS().encode(json.dumps(body).encode(), key.private, algorithm=ALGORITHM,
                              headers={"kid": key.kid, "typ": "JWT"})


def _opaque(deployment: Deployment, issuer: str, claims: dict[str, Any], active: Any = True) -> str:
    """An opaque token that the introspection server below answers with these claims and `active`."""
    answer = {"active": active, **_payload(deployment, issuer, claims)}
    return base64.urlsafe_b64encode(json.dumps(answer).encode()).rstrip(b"=").decode()


def _introspection_server() -> ServerThread:
    """An RFC 7662 endpoint answering each token with the JSON it carries (NaN and all, byte for byte)."""

    async def introspect(request: Request) -> Response:
        token = str((await request.form())["token"])
        return Response(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)), media_type="application/json")

    return ServerThread(Starlette(routes=[Route("/introspect", introspect, methods=["POST"])])).start()


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = deploy("proxy", tmp_path_factory.mktemp("own"))
    yield deployment
    deployment.stop()


@pytest.fixture(scope="module")
def introspected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, str]]:
    server = _introspection_server()
    directory = tmp_path_factory.mktemp("introspected")
    deployment = deploy("proxy", directory, auth={
        "clients": {"signing_key_file": str(directory / "key.pem")},
        "introspection": {"url": f"{server.url}/introspect", "client_id": "gateway", "client_secret": "secret",
                          "issuer": server.url},
    })
    yield deployment, server.url
    deployment.stop()
    server.stop()


def _assert_refused(deployment: Deployment, token: str, reason: str) -> None:
    forwarded = len(deployment.recorder.requests)
    response = call(deployment, token)
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    event = deployment.audit_events()[-1]
    assert (event["result"], event["reason"]) == ("auth_failed", reason)
    assert len(deployment.recorder.requests) == forwarded, "a refused token's request reached the upstream"


@pytest.mark.parametrize(("what", "claims", "reason"), WRONG_TYPES, ids=[row[0] for row in WRONG_TYPES])
def test_a_gateway_token_with_a_claim_of_the_wrong_type_is_refused_and_never_forwarded(
        own: Deployment, what: str, claims: dict[str, Any], reason: str) -> None:
    _assert_refused(own, _own_jwt(own, {"scope": "mcp:tools", **claims}), reason)


@pytest.mark.parametrize(("what", "claims", "reason"), WRONG_TYPES, ids=[row[0] for row in WRONG_TYPES])
def test_an_introspection_answer_with_a_claim_of_the_wrong_type_is_refused_and_never_forwarded(
        introspected: tuple[Deployment, str], what: str, claims: dict[str, Any], reason: str) -> None:
    deployment, issuer = introspected
    _assert_refused(deployment, _opaque(deployment, issuer, {"scope": "mcp:tools", **claims}), reason)


@pytest.mark.parametrize("active", ["true", 1, None, [True]])
def test_an_introspection_answer_whose_active_is_not_a_boolean_is_refused(
        introspected: tuple[Deployment, str], active: Any) -> None:
    deployment, issuer = introspected
    _assert_refused(deployment, _opaque(deployment, issuer, {"scope": "mcp:tools"}, active),
                    "introspection_unavailable")


@pytest.mark.parametrize(("what", "claims"), WELL_TYPED, ids=[row[0] for row in WELL_TYPED])
def test_claims_of_the_right_types_are_accepted_from_every_source(
        own: Deployment, introspected: tuple[Deployment, str], what: str, claims: dict[str, Any]) -> None:
    deployment, issuer = introspected
    for target, token in ((own, _own_jwt(own, claims)), (deployment, _opaque(deployment, issuer, claims))):
        response = call(target, token)
        assert response.status_code == 200, response.text
        event = target.audit_events()[-1]
        assert (event["result"], event["roles"]) == ("allowed", "reader")


def test_a_principal_is_never_built_from_a_scope_object() -> None:
    with pytest.raises(ClaimTypeError, match="claim scope must be a space-separated string"):
        principal_from_claims({"sub": "alice", "iss": "x", "scope": {"mcp:tools": 1}})
