"""An upstream that requires its own OAuth token: the gateway obtains it (upstreams[].oauth), never the caller.

The upstream is the demo MCPServer with the SDK's own auth (tests/sdk_auth.py),
which asks oidc-provider about every token it gets; the gateway authenticates
its callers with its own tokens (or oidc-provider's, for token exchange). Each
test shows what reached the upstream: never the caller's token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from tests.harness import Deployment, proxy_for
from tests.sdk_auth import SdkAuthServer
from tests.test_bad_input import BASE_HEADERS, modern
from tests.test_e2e_sdk import client
from tests.test_introspection import OidcProvider
from tests.test_oidc_peer import Receiver, code_flow


def oidc_with(**env: str) -> OidcProvider:
    return OidcProvider(env=env)


@pytest.fixture
def oidc() -> Iterator[OidcProvider]:
    server = oidc_with()
    yield server
    server.stop()


def behind_gateway(tmp_path: Path, upstream: SdkAuthServer, oauth: dict[str, Any], **overrides: Any) -> Deployment:
    deployment = proxy_for(upstream.url, upstream.recorder, tmp_path, upstream_options={"oauth": oauth}, **overrides)
    deployment.extra.append(upstream.stop)
    return deployment


def fetches(deployment: Deployment) -> dict[str, float]:
    prefix = 'mcp_gateway_upstream_token_fetches_total{outcome="'
    metrics = deployment.runtime.metrics.render().decode().replace('upstream="demo",', "")
    return {line[len(prefix):].split('"')[0]: float(line.split()[-1])
            for line in metrics.splitlines() if line.startswith(prefix)}


def tokens_seen(upstream: SdkAuthServer) -> list[str]:
    return [r.headers["authorization"].removeprefix("Bearer ") for r in upstream.recorder.requests
            if "authorization" in r.headers]


def introspect(oidc: OidcProvider, token: str) -> dict[str, Any]:
    answer = httpx.post(f"{oidc.url}/token/introspection", data={"token": token},
                        auth=("gateway", "gateway-secret")).json()
    assert isinstance(answer, dict)
    return answer


def client_credentials(oidc: OidcProvider, **extra: Any) -> dict[str, Any]:
    return {"grant": "client_credentials", "token_url": f"{oidc.url}/token", "client_id": "mcp-client",
            "client_secret": "mcp-client-secret", "scopes": ["mcp:tools"], **extra}


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_the_gateway_fetches_one_token_for_many_calls_and_the_caller_token_never_reaches_the_upstream(
        tmp_path: Path, oidc: OidcProvider, era: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    upstream = SdkAuthServer(oidc.url)
    deployment = behind_gateway(tmp_path, upstream, client_credentials(oidc))
    try:
        caller = deployment.token()
        async with client(deployment, era, caller) as session:
            for n in range(5):
                result = await session.call_tool("echo", {"text": f"call {n}"})
                assert result.content[0].text == f"call {n}"  # type: ignore[union-attr]
        seen = tokens_seen(upstream)
        assert caller not in seen
        assert len(set(seen)) == 1, "one token for every call"
        held = introspect(oidc, seen[0])
        assert (held["active"], held["client_id"], held["aud"]) == (True, "mcp-client", upstream.url)
        assert fetches(deployment) == {"ok": 1.0}
        assert not [secret for secret in ("mcp-client-secret", seen[0], caller) if secret in caplog.text]
    finally:
        deployment.stop()


async def test_a_token_is_fetched_again_when_it_expires(tmp_path: Path) -> None:
    oidc = oidc_with(OIDC_ACCESS_TTL="2")
    upstream = SdkAuthServer(oidc.url)
    deployment = behind_gateway(tmp_path, upstream, client_credentials(oidc))
    try:
        async with client(deployment, "auto") as session:
            await session.call_tool("echo", {"text": "first"})
            time.sleep(2.1)  # the token's whole lifetime: what is tested is that it ran out
            await session.call_tool("echo", {"text": "second"})
        assert len(set(tokens_seen(upstream))) == 2
        assert fetches(deployment) == {"ok": 2.0}
    finally:
        deployment.stop()
        oidc.stop()


async def test_an_upstream_401_fails_that_call_without_replaying_it_and_the_next_call_gets_a_new_token(
        tmp_path: Path, oidc: OidcProvider) -> None:
    upstream = SdkAuthServer(oidc.url)
    deployment = behind_gateway(tmp_path, upstream, client_credentials(oidc))
    try:
        async with client(deployment, "auto") as session:
            await session.call_tool("echo", {"text": "first"})
            [held] = set(tokens_seen(upstream))
            oidc.revoke(held)  # the upstream now answers 401 to the token the gateway holds
            calls_before = len([r for r in upstream.recorder.requests if b"tools/call" in r.body])
            with pytest.raises(MCPError) as refused:
                await session.call_tool("echo", {"text": "refused upstream"})
            assert refused.value.error.code == -32056
            calls = [r for r in upstream.recorder.requests if b"tools/call" in r.body]
            assert len(calls) == calls_before + 1, "the refused POST was replayed"
            after = await session.call_tool("echo", {"text": "third"})
            assert after.content[0].text == "third"  # type: ignore[union-attr]
        assert len(set(tokens_seen(upstream))) == 2
        events = [(e["result"], e["reason"]) for e in deployment.audit_events() if e["operation"] == "tools/call"]
        assert [r for r, _ in events] == ["allowed", "upstream_error", "allowed"]
        assert events[1][1] == "upstream:unauthorized"
    finally:
        deployment.stop()


async def test_the_token_endpoint_is_discovered_from_the_upstream_metadata(tmp_path: Path, oidc: OidcProvider
                                                                           ) -> None:
    upstream = SdkAuthServer(oidc.url)
    settings = client_credentials(oidc)
    del settings["token_url"]
    deployment = behind_gateway(tmp_path, upstream, settings)
    try:
        async with client(deployment, "auto") as session:
            result = await session.call_tool("echo", {"text": "discovered"})
        assert result.content[0].text == "discovered"  # type: ignore[union-attr]
        assert fetches(deployment) == {"ok": 1.0}
    finally:
        deployment.stop()


async def test_a_token_endpoint_that_refuses_the_gateway_is_an_upstream_credential_error(
        tmp_path: Path, oidc: OidcProvider) -> None:
    upstream = SdkAuthServer(oidc.url)
    deployment = behind_gateway(tmp_path, upstream, client_credentials(oidc, client_secret="wrong"))
    try:
        headers, body = modern("tools/call", {"name": "echo", "arguments": {"text": "no token"}})
        answer = httpx.post(deployment.url, json=body, headers={
            **BASE_HEADERS, **headers, "Authorization": f"Bearer {deployment.token()}"})
        assert answer.status_code == 502
        error = answer.json()["error"]
        assert error["code"] == -32056
        assert "wrong" not in answer.text
        assert not [r for r in upstream.recorder.requests if b"tools/call" in r.body]
        assert fetches(deployment) == {"failed": 1.0}
        events = [(e["result"], e["reason"]) for e in deployment.audit_events() if e["operation"] == "tools/call"]
        assert events == [("upstream_error", "upstream:credential")]
    finally:
        deployment.stop()


async def test_token_exchange_gives_the_upstream_the_user_never_the_callers_token(
        tmp_path: Path, oidc: OidcProvider) -> None:
    upstream = SdkAuthServer(oidc.url)
    exchange = {"grant": "token_exchange", "token_url": f"{oidc.url}/token", "client_id": "gateway-upstream",
                "client_secret": "gateway-upstream-secret", "scopes": ["mcp:tools"]}
    deployment = behind_gateway(tmp_path, upstream, exchange, auth={
        "clients": {"signing_key_file": str(tmp_path / "key.pem")},
        "authorization_servers": [oidc.url],
        "introspection": {"url": f"{oidc.url}/token/introspection", "client_id": "gateway",
                          "client_secret": "gateway-secret", "issuer": oidc.url}})
    receiver = Receiver()
    try:
        alice = code_flow(oidc, receiver, resource=deployment.url)["access_token"]
        bob = code_flow(oidc, receiver, login="bob", resource=deployment.url)["access_token"]
        for caller in (alice, bob, alice):
            async with client(deployment, "auto", caller) as session:
                await session.call_tool("echo", {"text": "exchanged"})
        seen = tokens_seen(upstream)
        assert alice not in seen and bob not in seen
        held = {token: introspect(oidc, token) for token in set(seen)}
        assert sorted((h["sub"], h["aud"], h["client_id"]) for h in held.values()) == [
            ("alice", upstream.url, "gateway-upstream"), ("bob", upstream.url, "gateway-upstream")]
        assert fetches(deployment) == {"ok": 2.0}, "one exchange per caller, however many calls"
    finally:
        receiver.stop()
        deployment.stop()


async def test_callers_arriving_together_wait_for_one_fetch(tmp_path: Path, oidc: OidcProvider) -> None:
    upstream = SdkAuthServer(oidc.url)
    deployment = behind_gateway(tmp_path, upstream, client_credentials(oidc))
    try:
        headers, body = modern("tools/call", {"name": "echo", "arguments": {"text": "together"}})
        async with httpx.AsyncClient(headers={**BASE_HEADERS, **headers,
                                              "Authorization": f"Bearer {deployment.token()}"}) as http:
            answers = await asyncio.gather(*[http.post(deployment.url, json=body) for _ in range(8)])
        assert [a.status_code for a in answers] == [200] * 8
        assert fetches(deployment) == {"ok": 1.0}
    finally:
        deployment.stop()
