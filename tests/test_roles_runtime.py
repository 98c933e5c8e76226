"""Runtime role assignment end to end: `mcp-gateway roles` and the admin API grant and withdraw a role while the
gateway runs, the caller's next request (in the same session, through the decision cache) sees it, it ends on
time, it can be bound to one client, a second gateway sharing the store sees it, and every change is audited
with who made it. The store itself is tested in test_assignments.py."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.harness import ROOT, Deployment, Recorder, ServerThread, build_server, proxy_for
from tests.test_bad_input import BASE_HEADERS, modern


def _client(deployment: Deployment, token: str, url: str | None = None) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
    return Client(streamable_http_client(url or deployment.url, http_client=http), mode="auto")


def _roles(deployment: Deployment, *args: str, operator: str = "olga") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "roles", *args, "--config",
                           str(deployment.config_path), "--url", deployment.gateway.url, "--as", operator],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def _admin(deployment: Deployment, method: str, path: str, body: dict[str, Any] | None = None,
           scope: str = "roles:admin") -> httpx.Response:
    config = deployment.runtime.config
    token = deployment.runtime.authenticator.issue_token(subject="olga", audience=f"{config.public_url}/admin",
                                                         scopes=[scope])
    return httpx.request(method, f"{deployment.gateway.url}{path}", json=body, timeout=10,
                         headers={"authorization": f"Bearer {token}"})


async def _refused(session: Client, tool: str, arguments: dict[str, Any]) -> int:
    with pytest.raises(MCPError) as refused:
        await session.call_tool(tool, arguments)
    return refused.value.error.code


async def test_a_role_assigned_while_running_takes_effect_on_the_next_call_and_revoking_ends_it(
        gateway: Deployment) -> None:
    async with _client(gateway, gateway.token("alice")) as session:
        assert await _refused(session, "delete_file", {"path": "/tmp/a"}) == -32602  # reader: unknown tool

        assigned = _roles(gateway, "assign", "--subject", "alice", "--role", "operator", "--expires", "2h",
                          "--reason", "incident 9")
        assert assigned.returncode == 0, assigned.stderr
        assignment_id = assigned.stdout.split("id ")[-1].strip()
        result = await session.call_tool("delete_file", {"path": "/tmp/a"})  # same session, same token
        assert result.content[0].text == "deleted /tmp/a"  # type: ignore[union-attr]

        listed = _roles(gateway, "list", "--subject", "alice")
        assert listed.returncode == 0 and assignment_id in listed.stdout and "incident 9" in listed.stdout

        revoked = _roles(gateway, "revoke", assignment_id)
        assert revoked.returncode == 0 and "revoked operator from alice" in revoked.stdout
        assert await _refused(session, "delete_file", {"path": "/tmp/b"}) == -32602

    assert [m for m in gateway.recorder.mcp_methods() if m == "tools/call"] == ["tools/call"]
    events = gateway.audit_events()
    changes = [(e["operation"], e["user_id"], e["result"]) for e in events if e["operation"].startswith("admin/roles")]
    assert changes == [("admin/roles:post", "olga", "allowed"), ("admin/roles", "olga", "allowed"),
                       ("admin/roles:delete", "olga", "allowed")]
    assigned_event = next(e for e in events if e["operation"] == "admin/roles:post")
    assert "roles:assigned:operator to=alice client=* until " in assigned_event["reason"]
    assert assigned_event["reason"].endswith(f"id={assignment_id}")
    calls = [(e["result"], e["roles"]) for e in events if e["tool_executed"] == "delete_file"
             and e["operation"] == "tools/call"]
    assert calls == [("denied", "reader"), ("allowed", "operator,reader"), ("denied", "reader")]


async def test_an_assignment_ends_on_time_without_anyone_touching_it(gateway: Deployment) -> None:
    made = _admin(gateway, "POST", "/admin/roles", {"subject": "alice", "role": "operator", "expires_in_s": 1})
    assert made.status_code == 200, made.text
    async with _client(gateway, gateway.token("alice")) as session:
        await session.call_tool("delete_file", {"path": "/tmp/jit"})
        time.sleep(max(0.0, made.json()["assignment"]["expires_at"] - time.time()) + 0.05)
        assert await _refused(session, "delete_file", {"path": "/tmp/late"}) == -32602
    assert _admin(gateway, "GET", "/admin/roles").json()["assignments"] == []


async def test_an_assignment_bound_to_a_client_holds_only_through_that_client(gateway: Deployment) -> None:
    made = _admin(gateway, "POST", "/admin/roles", {"subject": "alice", "role": "operator", "client_id": "app-1"})
    assert made.status_code == 200
    config = gateway.runtime.config
    through_app = gateway.runtime.authenticator.issue_token(
        subject="alice", audience=config.resource_url(config.upstreams[0]), scopes=["mcp:tools"], client_id="app-1")
    async with _client(gateway, through_app) as session:
        await session.call_tool("delete_file", {"path": "/tmp/app"})
    async with _client(gateway, gateway.token("alice")) as session:
        assert await _refused(session, "delete_file", {"path": "/tmp/app"}) == -32602


@pytest.mark.parametrize(("body", "scope", "status", "says"), [
    ({"subject": "alice", "role": "superuser"}, "roles:admin", 400, "'superuser' is not a role"),
    ({"subject": "", "role": "operator"}, "roles:admin", 400, "subject is required"),
    ({"subject": "alice", "role": "operator", "expires_in_s": -5}, "roles:admin", 400, "more than 0 s"),
    ({"subject": "alice", "role": "operator", "expires_in_s": "2h"}, "roles:admin", 400, "number of seconds"),
    ({"subject": "alice", "role": "operator"}, "audit:read", 403, "needs scope roles:admin"),
])
def test_a_bad_or_unauthorised_assignment_is_refused_and_audited(gateway: Deployment, body: dict[str, Any],
                                                                  scope: str, status: int, says: str) -> None:
    answer = _admin(gateway, "POST", "/admin/roles", body, scope=scope)
    assert answer.status_code == status and says in answer.json()["error"]["message"]
    assert _admin(gateway, "GET", "/admin/roles").json()["assignments"] == []
    refused = [e for e in gateway.audit_events() if e["operation"] == "admin/roles:post"]
    assert [(e["user_id"], e["status"]) for e in refused] == [("olga", status)]


def test_the_roles_command_explains_what_it_cannot_do(gateway: Deployment) -> None:
    bad = _roles(gateway, "assign", "--subject", "alice", "--role", "operator", "--expires", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    unknown = _roles(gateway, "revoke", "nope")
    assert unknown.returncode == 1 and "404" in unknown.stderr and "no role assignment" in unknown.stderr


async def test_two_gateways_sharing_postgresql_see_each_others_assignments(tmp_path: Path) -> None:
    table = f"roles_{uuid.uuid4().hex[:12]}"
    store = {"backend": "postgres", "dsn": "postgresql://127.0.0.1:5432/test", "table": table}
    recorder = Recorder(build_server().streamable_http_app())
    upstream = ServerThread(recorder).start()
    replicas: list[Deployment] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            replicas.append(proxy_for(f"{upstream.url}/mcp", recorder, tmp_path / name, role_assignments=store))
        first, second = replicas
        async with _client(second, second.token("alice")) as session:
            assert await _refused(session, "delete_file", {"path": "/tmp/r"}) == -32602
            made = _admin(first, "POST", "/admin/roles", {"subject": "alice", "role": "operator"})
            assert made.status_code == 200
            await session.call_tool("delete_file", {"path": "/tmp/r"})  # through the other replica
            assert _admin(first, "DELETE", f"/admin/roles/{made.json()['assignment']['id']}").status_code == 200
            assert await _refused(session, "delete_file", {"path": "/tmp/r"}) == -32602
    finally:
        for replica in replicas:
            replica.stop()
        upstream.stop()
        connection = await asyncpg.connect("postgresql://127.0.0.1:5432/test")
        await connection.execute(f"DROP TABLE IF EXISTS {table}")
        await connection.close()


def test_no_role_changes_while_the_audit_trail_cannot_record_them(tmp_path: Path) -> None:
    from tests.harness import deploy

    path = tmp_path / "audit.jsonl"
    gateway = deploy("proxy", tmp_path, audit={"sinks": [{"type": "jsonl", "path": str(path)}],
                                               "on_sink_failure": "fail_closed", "write_timeout_s": 1})
    headers, ping = modern("tools/call", {"name": "echo", "arguments": {"text": "x"}})
    headers = {**BASE_HEADERS, **headers, "authorization": f"Bearer {gateway.token()}"}
    try:
        assert httpx.post(gateway.url, json=ping, headers=headers).status_code == 200
        gateway.gateway.call(gateway.runtime.audit.flush())
        path.rename(tmp_path / "kept.jsonl")
        path.mkdir()  # a directory where the file was: every write fails (root ignores file modes)
        deadline = time.monotonic() + 10
        while httpx.post(gateway.url, json=ping, headers=headers).status_code != 503:
            assert time.monotonic() < deadline, "the gateway never noticed its audit trail failing"
            time.sleep(0.05)
        refused = _admin(gateway, "POST", "/admin/roles", {"subject": "alice", "role": "operator"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == -32053
        assert gateway.gateway.call(gateway.runtime.assignments.all()) == []
        path.rmdir()  # the trail mended, so that stopping flushes what waited
        (tmp_path / "kept.jsonl").rename(path)
    finally:
        gateway.stop()
