"""Legacy-era session binding: a session id belongs to the principal it was issued to."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import create_app
from gateway.config import Sessions
from gateway.sessions import TokenSession, open_sessions
from tests.harness import Deployment, ServerThread, deploy, free_port, write_config
from tests.test_bad_input import BASE_HEADERS, modern

LEGACY = "2025-11-25"


def legacy(url: str, token: str, method: str, params: dict[str, Any] | None = None,
           session: str | None = None, id: int | None = 1, http: str = "POST") -> httpx.Response:
    headers = {**BASE_HEADERS, "Authorization": f"Bearer {token}", "MCP-Protocol-Version": LEGACY}
    if session:
        headers["Mcp-Session-Id"] = session
    if http == "DELETE":
        return httpx.delete(url, headers=headers)
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
    if id is not None:
        message["id"] = id
    return httpx.post(url, headers=headers, json=message)


def open_session(url: str, token: str) -> str:
    init = legacy(url, token, "initialize", {"protocolVersion": LEGACY, "capabilities": {},
                                             "clientInfo": {"name": "t", "version": "1"}})
    assert init.status_code == 200, init.text
    session = init.headers["mcp-session-id"]
    assert legacy(url, token, "notifications/initialized", session=session, id=None).status_code == 202
    return session


def test_a_session_presented_by_another_principal_is_refused_audited_and_not_forwarded(gateway: Deployment) -> None:
    alice, bob = gateway.token("alice"), gateway.token("bob")
    session = open_session(gateway.url, alice)
    assert legacy(gateway.url, alice, "tools/list", session=session).status_code == 200
    seen = len(gateway.recorder.requests)

    hijack = legacy(gateway.url, bob, "tools/call", {"name": "echo", "arguments": {"text": "x"}}, session=session)
    assert hijack.status_code == 403
    assert hijack.json()["error"] == {"code": -32013, "message": "Invalid session"}
    assert len(gateway.recorder.requests) == seen, "the hijacking request reached the upstream"
    events = gateway.audit_events()
    assert [(e["user_id"], e["result"], e["reason"]) for e in events if e["reason"].startswith("session")] == [
        ("bob", "denied", "session_hijack")]
    assert legacy(gateway.url, alice, "tools/list", session=session).status_code == 200


def test_an_unknown_or_ended_session_is_answered_404(gateway: Deployment) -> None:
    alice = gateway.token("alice")
    unknown = legacy(gateway.url, alice, "tools/list", session="never-issued")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == -32013
    session = open_session(gateway.url, alice)
    assert legacy(gateway.url, alice, "", session=session, http="DELETE").status_code in (200, 204)
    after = legacy(gateway.url, alice, "tools/list", session=session)
    assert after.status_code == 404
    assert not any(b"never-issued" in json.dumps(r.headers).encode() for r in gateway.recorder.requests)


def test_the_2026_era_ignores_the_session_header(gateway: Deployment) -> None:
    headers, body = modern("tools/list")
    response = httpx.post(gateway.url, headers={**BASE_HEADERS, **headers, "Mcp-Session-Id": "whatever",
                                                "Authorization": f"Bearer {gateway.token()}"}, json=body)
    assert response.status_code == 200


REDIS = {"backend": "redis", "url": "redis://127.0.0.1:6379/0"}


def test_replicas_share_bindings_through_redis(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    deployment = deploy("proxy", tmp_path / "a", sessions=REDIS)
    assert deployment.upstream is not None
    # Replica B: same public URL and signing key as A, so a token for one is good at both.
    (tmp_path / "b" / "key.pem").write_bytes((tmp_path / "a" / "key.pem").read_bytes())
    port = free_port()
    config = write_config(tmp_path / "b", f"{deployment.upstream.url}/mcp",
                          public_url=deployment.runtime.config.public_url,
                          sessions=REDIS)
    replica = ServerThread(create_app(config), port).start()
    try:
        alice, bob = deployment.token("alice"), deployment.token("bob")
        session = open_session(deployment.url, alice)
        other = f"{replica.url}/mcp"
        assert legacy(other, alice, "tools/list", session=session).status_code == 200
        assert legacy(other, bob, "tools/list", session=session).status_code == 403
        metrics = httpx.get(f"{deployment.gateway.url}/metrics").text
        assert "mcp_gateway_active_sessions" in metrics
        assert legacy(other, alice, "", session=session, http="DELETE").status_code in (200, 204)
        assert legacy(deployment.url, alice, "tools/list", session=session).status_code == 404
    finally:
        replica.stop()
        deployment.stop()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_token_sessions_record_use_and_revocation_in_either_store(backend: str) -> None:
    store = open_sessions(Sessions(**(REDIS if backend == "redis" else {})))
    now = time.time()
    mine = f"t-{uuid.uuid4().hex}"
    session = TokenSession(token_id=mine, subject="ci-bot", client_id="ci-bot", issuer="http://gw",
                           scopes=("mcp:tools",), issued_at=now, expires_at=now + 60)
    expired = TokenSession(**{**session.as_dict(), "token_id": f"x-{uuid.uuid4().hex}", "expires_at": now - 1})
    try:
        await store.open_token(session)
        await store.open_token(expired)
        listed = {t.token_id: t for t in await store.tokens()}
        assert listed[mine].last_seen is None and expired.token_id not in listed
        assert await store.token_used(session) is False
        listed = {t.token_id: t for t in await store.tokens()}
        assert listed[mine].last_seen is not None and listed[mine].scopes == ("mcp:tools",)
        await store.revoke(mine, session.expires_at)
        assert await store.token_used(session) is True
        assert {t.token_id: t for t in await store.tokens()}[mine].revoked
    finally:
        await store.close()
