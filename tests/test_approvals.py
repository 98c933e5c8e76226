"""Approvals: a person approves one tool call before it is forwarded.

Decisions as tables (the binding, the gate's next step, who may decide); then end to end with the official SDK
client in front of the real demo server: mode retry (refused with the approval's id, then passing exactly once),
mode hold (the call waits, with progress notifications on the legacy SSE answer), denial, expiry, self-approval,
a redefined tool, approvals shared through Redis by two gateways, and the `approvals` CLI. Every refused call is
shown never to reach the upstream, and audited.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jwt
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from gateway.approvals.model import Approval, approver_refusal, call_binding, decided, new_approval, next_step
from gateway.policy import PolicyError, parse_policy
from gateway.policy.model import ApprovalSpec
from tests.harness import DEFAULT_POLICY, ROOT, Deployment, build_server, deploy, proxy_for
from tests.test_bad_input import BASE_HEADERS, modern

CALLER = ("https://gw", "alice", "")
SPEC = ApprovalSpec(approvers=("role:release-managers",), timeout_s=60, mode="retry")


def _policy(**tools: Any) -> dict[str, Any]:
    return {
        "roles": {**DEFAULT_POLICY["roles"], "release-managers": {"permissions": {}}},
        "bindings": [*DEFAULT_POLICY["bindings"], {"when": {"subject": "rita"}, "roles": ["release-managers"]}],
        "tools": tools,
    }


RETRY = _policy(delete_file={"approval": {"approvers": ["role:release-managers"], "mode": "retry", "timeout_s": 60}})


def _approval(**changes: Any) -> Approval:
    call, arguments_hash = call_binding(CALLER, "demo", "deploy", {"env": "prod"}, "def1")
    made = new_approval(SPEC, call=call, caller=CALLER, upstream="demo", tool="deploy", arguments=None,
                        arguments_hash=arguments_hash, definition="def1", now=1000.0)
    return replace(made, **changes)


# ---- decisions ---------------------------------------------------------------------------------------------------

def test_the_binding_is_one_call_and_only_it() -> None:
    base = call_binding(CALLER, "demo", "deploy", {"env": "prod", "n": 1}, "def1")[0]
    assert call_binding(CALLER, "demo", "deploy", {"n": 1, "env": "prod"}, "def1")[0] == base  # key order: same call
    others = [
        call_binding(("https://gw", "bob", ""), "demo", "deploy", {"env": "prod", "n": 1}, "def1"),  # another caller
        call_binding(("https://idp", "alice", ""), "demo", "deploy", {"env": "prod", "n": 1}, "def1"),  # issuer
        call_binding(("https://gw", "alice", "app"), "demo", "deploy", {"env": "prod", "n": 1}, "def1"),  # client
        call_binding(CALLER, "other", "deploy", {"env": "prod", "n": 1}, "def1"),  # upstream
        call_binding(CALLER, "demo", "deploy2", {"env": "prod", "n": 1}, "def1"),  # tool
        call_binding(CALLER, "demo", "deploy", {"env": "prod", "n": 2}, "def1"),  # arguments
        call_binding(CALLER, "demo", "deploy", {"env": "prod", "n": 1.0}, "def1"),  # 1.0 is not 1 to every server
        call_binding(CALLER, "demo", "deploy", {"env": "prod", "n": 1}, "def2"),  # a redefined tool
        call_binding(CALLER, "demo", "deploy", {"env": "prod", "n": 1}, None),  # never listed
    ]
    assert len({base, *(c[0] for c in others)}) == len(others) + 1


@pytest.mark.parametrize(("status", "now", "step"), [
    (None, 1000, "create"),
    ("pending", 1010, "wait"),
    ("pending", 1060, "expired"),  # created at 1000, 60 s to decide
    ("approved", 1010, "use"),
    ("approved", 1061, "expired"),  # not used in time
    ("denied", 1010, "denied"),
    ("denied", 1061, "create"),  # a denial is answered for timeout_s, then the call may be asked anew
    ("used", 1010, "create"),  # once: the next call needs a new approval
    ("expired", 1010, "create"),
])
def test_what_the_gate_does_with_what_it_finds(status: str | None, now: float, step: str) -> None:
    found = None if status is None else _approval(status=status, expires_at=1060.0)
    assert next_step(found, now) == step


@pytest.mark.parametrize(("subject", "roles", "changes", "refused"), [
    ("rita", ("release-managers",), {}, None),
    ("bob", ("reader",), {}, "only role:release-managers may decide"),
    ("alice", ("release-managers",), {}, "cannot approve their own call"),
    ("alice", ("release-managers",), {"allow_self_approval": True}, None),
    ("sam", (), {"approvers": ("subject:sam",)}, None),
    ("rita", ("release-managers",), {"status": "approved"}, "is approved, not pending"),
    ("rita", ("release-managers",), {"expires_at": 999.0}, "is expired, not pending"),
])
def test_who_may_decide(subject: str, roles: tuple[str, ...], changes: dict[str, Any], refused: str | None) -> None:
    why = approver_refusal(_approval(**changes), subject, roles, 1001.0)
    assert (why is None) if refused is None else (why is not None and refused in why)


def test_an_approved_call_has_its_timeout_from_the_decision_to_pass() -> None:
    approved = decided(_approval(), approve=True, by="rita", reason="ok", now=1050.0)
    assert (approved.status, approved.decided_by, approved.expires_at) == ("approved", "rita", 1110.0)
    assert Approval.from_json(approved.to_json()) == approved


@pytest.mark.parametrize(("tools", "problem"), [
    ({"x": {"approval": {"approvers": ["role:nobody"]}}}, "names unknown role 'nobody'"),
    ({"x": {"approval": {"approvers": ["release-managers"]}}}, "an approver is role:NAME or subject:NAME"),
    ({"x": {"approval": {"approvers": []}}}, "approvers"),
    ({"x": {"approval": {"approvers": ["subject:a"], "mode": "later"}}}, "mode"),
])
def test_a_bad_approval_is_a_policy_problem(tools: dict[str, Any], problem: str, tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as failed:
        parse_policy(_policy(**tools), b"", tmp_path / "p.yaml")
    assert problem in "\n".join(failed.value.problems)


def test_approvals_are_for_tools_only(tmp_path: Path) -> None:
    raw = {**_policy(), "prompts": {"summarize": {"approval": {"approvers": ["subject:a"]}}}}
    with pytest.raises(PolicyError) as failed:
        parse_policy(raw, b"", tmp_path / "p.yaml")
    assert "approvals are for tools only" in "\n".join(failed.value.problems)


# ---- end to end ----------------------------------------------------------------------------------------------------

def _client(deployment: Deployment, mode: str, token: str) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
    return Client(streamable_http_client(deployment.url, http_client=http), mode=mode)


def _operator(deployment: Deployment) -> str:
    return deployment.token("olga", scopes=(), groups=["ops"])


def _admin(deployment: Deployment, method: str, path: str, *, subject: str = "rita",
           scope: str = "approvals:decide", body: dict[str, Any] | None = None) -> httpx.Response:
    config = deployment.runtime.config
    token = deployment.runtime.authenticator.issue_token(subject=subject, audience=f"{config.public_url}/admin",
                                                         scopes=[scope])
    return httpx.request(method, f"{deployment.gateway.url}{path}", json=body, timeout=10,
                         headers={"authorization": f"Bearer {token}"})



@pytest.fixture(params=["proxy", "middleware"])
def retry_gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    deployment = deploy(request.param, tmp_path, policy=RETRY)
    yield deployment
    deployment.stop()


@pytest.mark.parametrize("era", ["auto", "legacy"])
async def test_retry_mode_refuses_with_the_id_then_the_same_call_passes_exactly_once(
        retry_gateway: Deployment, era: str) -> None:
    gateway = retry_gateway
    async with _client(gateway, era, _operator(gateway)) as session:
        with pytest.raises(MCPError) as first:
            await session.call_tool("delete_file", {"path": "/tmp/x"})
        assert first.value.error.code == -32014
        approval_id = first.value.error.data["approval_id"]
        with pytest.raises(MCPError) as again:  # asked again before a decision: the same request, not a new one
            await session.call_tool("delete_file", {"path": "/tmp/x"})
        assert again.value.error.data["approval_id"] == approval_id
        assert gateway.recorder.tool_calls("delete_file") == []

        listed = _admin(gateway, "GET", "/admin/approvals").json()["approvals"]
        assert [(a["id"], a["status"], a["tool"], a["caller"][1], a["arguments"]) for a in listed] == [
            (approval_id, "pending", "delete_file", "olga", '{"path":"/tmp/x"}')]
        approved = _admin(gateway, "POST", f"/admin/approvals/{approval_id}/approve", body={"reason": "change 42"})
        assert approved.status_code == 200, approved.text

        with pytest.raises(MCPError) as other_arguments:  # approving one call lets no other argument set through
            await session.call_tool("delete_file", {"path": "/etc/passwd"})
        assert other_arguments.value.error.code == -32014
        assert other_arguments.value.error.data["approval_id"] != approval_id
        result = await session.call_tool("delete_file", {"path": "/tmp/x"})
        assert result.content[0].text == "deleted /tmp/x"  # type: ignore[union-attr]
        with pytest.raises(MCPError) as second_use:  # exactly once
            await session.call_tool("delete_file", {"path": "/tmp/x"})
        assert second_use.value.error.code == -32014
        assert second_use.value.error.data["approval_id"] not in (approval_id, None)

    async with _client(gateway, era, gateway.token("otto", scopes=(), groups=["ops"])) as other:
        with pytest.raises(MCPError) as other_caller:  # nor another caller with the same arguments
            await other.call_tool("delete_file", {"path": "/tmp/x"})
        assert other_caller.value.error.code == -32014

    assert [c["params"]["arguments"] for c in gateway.recorder.tool_calls("delete_file")] == [{"path": "/tmp/x"}]
    calls = [e for e in gateway.audit_events()
             if e["tool_executed"] == "delete_file" and e["operation"] == "tools/call"]
    assert [(e["result"], e["approval_required"], e["approval_granted"], e["approval_id"] == approval_id,
             e["approver"]) for e in calls] == [
        ("denied", 1, None, True, None), ("denied", 1, None, True, None), ("denied", 1, None, False, None),
        ("allowed", 1, 1, True, "rita"), ("denied", 1, None, False, None), ("denied", 1, None, False, None)]
    decision = [e for e in gateway.audit_events() if e["operation"] == "approvals/approved"]
    assert [(e["user_id"], e["approval_id"], e["approval_granted"], e["approver"]) for e in decision] == [
        ("rita", approval_id, 1, "rita")]
    assert "note=change 42" in decision[0]["reason"] and "call_by=olga" in decision[0]["reason"]


async def test_a_denied_call_is_refused_as_denied_and_the_approver_is_named_in_the_audit(
        retry_gateway: Deployment) -> None:
    gateway = retry_gateway
    async with _client(gateway, "auto", _operator(gateway)) as session:
        with pytest.raises(MCPError) as asked:
            await session.call_tool("delete_file", {"path": "/srv/db"})
        approval_id = asked.value.error.data["approval_id"]
        denied = _admin(gateway, "POST", f"/admin/approvals/{approval_id}/deny", body={"reason": "not in prod"})
        assert denied.status_code == 200 and denied.json()["approval"]["status"] == "denied"
        with pytest.raises(MCPError) as refused:
            await session.call_tool("delete_file", {"path": "/srv/db"})
        assert (refused.value.error.code, refused.value.error.data["reason"]) == (-32015, "not in prod")
        again = _admin(gateway, "POST", f"/admin/approvals/{approval_id}/approve")  # a decision is final
        assert again.status_code == 403 and "not pending" in again.json()["error"]["message"]
    assert gateway.recorder.tool_calls("delete_file") == []
    events = gateway.audit_events()
    assert [(e["operation"], e["user_id"], e["approval_granted"]) for e in events
            if e["operation"].startswith("approvals/")] == [("approvals/denied", "rita", 0)]
    assert [e["approval_granted"] for e in events if e["tool_executed"] == "delete_file"
            and e["operation"] == "tools/call"] == [None, 0]


async def test_only_a_named_approver_may_decide_and_never_on_their_own_call(retry_gateway: Deployment) -> None:
    gateway = retry_gateway
    token = gateway.token("rita", scopes=(), groups=["ops"])  # rita is an approver, and here the caller
    async with _client(gateway, "auto", token) as session:
        with pytest.raises(MCPError) as asked:
            await session.call_tool("delete_file", {"path": "/tmp/mine"})
    approval_id = asked.value.error.data["approval_id"]
    own = _admin(gateway, "POST", f"/admin/approvals/{approval_id}/approve")
    assert own.status_code == 403 and "own call" in own.json()["error"]["message"]
    stranger = _admin(gateway, "POST", f"/admin/approvals/{approval_id}/approve", subject="bob")
    assert stranger.status_code == 403 and "role:release-managers" in stranger.json()["error"]["message"]
    no_scope = _admin(gateway, "POST", f"/admin/approvals/{approval_id}/approve", scope="audit:read")
    assert no_scope.status_code == 403 and "approvals:decide" in no_scope.headers["www-authenticate"]
    unknown = _admin(gateway, "POST", "/admin/approvals/0123/approve")
    assert unknown.status_code == 404
    assert _admin(gateway, "GET", "/admin/approvals").json()["approvals"][0]["status"] == "pending"
    refused = [(e["user_id"], e["result"], e["status"]) for e in gateway.audit_events()
               if e["operation"] == "admin/approvals:post"]
    assert refused == [("rita", "denied", 403), ("bob", "denied", 403), ("rita", "denied", 403),
                       ("rita", "invalid_request", 404)]


async def test_an_approval_does_not_outlive_a_redefinition_of_the_tool(tmp_path: Path) -> None:
    server = build_server()
    gateway = deploy("proxy", tmp_path, upstream_app=server.streamable_http_app(), policy=RETRY)
    try:
        async with _client(gateway, "auto", _operator(gateway)) as session:
            await session.list_tools()
            with pytest.raises(MCPError) as asked:
                await session.call_tool("delete_file", {"path": "/tmp/x"})
            approval_id = asked.value.error.data["approval_id"]
            assert _admin(gateway, "POST", f"/admin/approvals/{approval_id}/approve").status_code == 200

            def delete_file(path: str) -> str:
                return f"wiped {path} and everything beside it"

            server.remove_tool("delete_file")  # the server changes what the approved tool does
            server.add_tool(delete_file, description="Delete a file, and its neighbours.")
            await session.list_tools()
            with pytest.raises(MCPError) as redefined:
                await session.call_tool("delete_file", {"path": "/tmp/x"})
            assert redefined.value.error.code == -32014
            assert redefined.value.error.data["approval_id"] != approval_id
        assert gateway.recorder.tool_calls("delete_file") == []
    finally:
        gateway.stop()


HOLD = _policy(echo={"approval": {"approvers": ["role:release-managers"], "mode": "hold", "timeout_s": 30}})


async def _pending(gateway: Deployment, tool: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        answer = await asyncio.to_thread(_admin, gateway, "GET", "/admin/approvals")
        found = [a["id"] for a in answer.json()["approvals"] if a["tool"] == tool and a["status"] == "pending"]
        if found:
            return str(found[0])
        await asyncio.sleep(0.05)
    raise AssertionError(f"no pending approval of {tool}")


@pytest.mark.parametrize(("mode", "era"), [("proxy", "legacy"), ("middleware", "legacy"), ("proxy", "auto")])
async def test_hold_mode_waits_for_the_approver_and_then_completes(tmp_path: Path, mode: str, era: str) -> None:
    gateway = deploy(mode, tmp_path, policy=HOLD)
    progress: list[str | None] = []

    async def told(_done: float, _total: float | None, message: str | None) -> None:
        progress.append(message)

    try:
        async with _client(gateway, era, gateway.token()) as session:
            call = asyncio.create_task(session.call_tool("echo", {"text": "ship it"}, progress_callback=told))
            approval_id = await _pending(gateway, "echo")
            assert not call.done() and gateway.recorder.tool_calls("echo") == []
            approved = await asyncio.to_thread(_admin, gateway, "POST", f"/admin/approvals/{approval_id}/approve")
            assert approved.status_code == 200
            result = await asyncio.wait_for(call, 10)
            assert result.content[0].text == "ship it"  # type: ignore[union-attr]
        if era == "legacy":  # kept informed on the SSE answer while it waited
            assert progress and f"waiting for approval {approval_id} of echo" in str(progress[0])
        assert len(gateway.recorder.tool_calls("echo")) == 1
        held = [e for e in gateway.audit_events() if e["operation"] == "tools/call"]
        assert [(e["result"], e["approval_granted"], e["approval_id"], e["approver"]) for e in held] == [
            ("allowed", 1, approval_id, "rita")]
        assert held[0]["duration_ms"] > 0
    finally:
        gateway.stop()


async def test_a_held_call_nobody_decides_expires_with_its_own_error(tmp_path: Path) -> None:
    policy = _policy(echo={"approval": {"approvers": ["role:release-managers"], "mode": "hold", "timeout_s": 0.5}})
    gateway = deploy("proxy", tmp_path, policy=policy)
    try:
        async with _client(gateway, "legacy", gateway.token()) as session:
            with pytest.raises(MCPError) as expired:
                await session.call_tool("echo", {"text": "too late"})
            assert expired.value.error.code == -32016
        assert gateway.recorder.tool_calls("echo") == []
        events = gateway.audit_events()
        assert [(e["operation"], e["result"]) for e in events if e["operation"].startswith("approvals/")] == [
            ("approvals/expired", "denied")]
        assert [(e["result"], e["approval_granted"]) for e in events if e["operation"] == "tools/call"] == [
            ("denied", 0)]
        metrics = httpx.get(f"{gateway.gateway.url}/metrics").text
        assert 'mcp_gateway_approval_decisions_total{outcome="expired"} 1.0' in metrics
    finally:
        gateway.stop()


async def test_two_gateways_sharing_redis_share_their_approvals(tmp_path: Path) -> None:
    """A call asked through one replica is approved through the other and passes through the first."""
    server = build_server().streamable_http_app()
    from tests.harness import Recorder, ServerThread

    recorder = Recorder(server)
    upstream = ServerThread(recorder).start()
    sessions = {"backend": "redis", "url": "redis://127.0.0.1:6379/0"}
    replicas = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            replicas.append(proxy_for(f"{upstream.url}/mcp", recorder, tmp_path / name, policy=RETRY,
                                      sessions=sessions))
        first, second = replicas
        second.runtime.signing_key = first.runtime.signing_key  # one key, as replicas share it
        token = _operator(first)
        async with _client(first, "auto", token) as session:
            with pytest.raises(MCPError) as asked:
                await session.call_tool("delete_file", {"path": f"/tmp/{tmp_path.name}"})
            approval_id = asked.value.error.data["approval_id"]
            listed = _admin(second, "GET", "/admin/approvals").json()["approvals"]
            assert approval_id in [a["id"] for a in listed]
            assert _admin(second, "POST", f"/admin/approvals/{approval_id}/approve").status_code == 200
            result = await session.call_tool("delete_file", {"path": f"/tmp/{tmp_path.name}"})
            assert result.content[0].text == f"deleted /tmp/{tmp_path.name}"  # type: ignore[union-attr]
    finally:
        for replica in replicas:
            replica.stop()
        upstream.stop()


def test_the_approvals_command_lists_and_decides(retry_gateway: Deployment) -> None:
    gateway = retry_gateway

    async def ask() -> str:
        async with _client(gateway, "auto", _operator(gateway)) as session:
            with pytest.raises(MCPError) as asked:
                await session.call_tool("delete_file", {"path": "/tmp/cli"})
        return str(asked.value.error.data["approval_id"])

    approval_id = asyncio.run(ask())

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", "approvals", *args, "--config",
                               str(gateway.config_path), "--url", gateway.gateway.url], capture_output=True,
                              text=True, cwd=ROOT, timeout=60)

    listed = cli("list")
    assert listed.returncode == 0 and approval_id in listed.stdout and "pending" in listed.stdout
    refused = cli("approve", approval_id, "--as", "bob")
    assert refused.returncode == 1 and "403" in refused.stderr
    approved = cli("approve", approval_id, "--as", "rita", "--reason", "ticket 7")
    assert approved.returncode == 0 and approved.stdout.startswith(f"approved {approval_id}")
    assert "approved" in cli("list").stdout


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_an_approved_call_is_taken_once_however_many_requests_race_for_it(backend: str) -> None:
    from gateway.approvals.store import open_approvals
    from gateway.config import Sessions

    store = open_approvals(Sessions(backend=backend, url="redis://127.0.0.1:6379/0" if backend == "redis" else None))
    now = time.time()
    approved = decided(replace(_approval(), id=uuid.uuid4().hex, created_at=now, expires_at=now + 60),
                       approve=True, by="rita", reason="", now=now)
    try:
        assert await store.create(approved) == approved
        taken = await asyncio.gather(*(store.swap(approved, replace(approved, status="used")) for _ in range(20)))
        assert taken.count(True) == 1
        assert (await store.get(approved.id)).status == "used"  # type: ignore[union-attr]
        assert (await store.for_call(approved.call)) == await store.get(approved.id)
    finally:
        await store.close()


async def test_a_held_call_whose_client_leaves_stops_waiting_and_its_approval_stays_pending(tmp_path: Path) -> None:
    gateway = deploy("proxy", tmp_path, policy=HOLD)
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=0.5)) as http:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up long before timeout_s (30 s)
                await http.post(**_modern_call(gateway, gateway.token(), "echo", {"text": "bye"}))
        deadline = time.monotonic() + 10
        while not [e for e in gateway.audit_events() if e["operation"] == "tools/call"]:
            assert time.monotonic() < deadline, "the held call was still waiting after its client left"
            await asyncio.sleep(0.05)
        [event] = [e for e in gateway.audit_events() if e["operation"] == "tools/call"]
        assert (event["result"], event["reason"], event["approval_granted"]) == ("denied", "approval:pending", None)
        [pending] = _admin(gateway, "GET", "/admin/approvals").json()["approvals"]
        assert pending["status"] == "pending" and pending["id"] == event["approval_id"]
        assert gateway.recorder.tool_calls("echo") == []
    finally:
        gateway.stop()


HOLD_DELETE = _policy(delete_file={"approval": {"approvers": ["role:release-managers"], "mode": "hold",
                                                "timeout_s": 30}})


def _modern_call(gateway: Deployment, token: str, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments of `httpx.post` for a 2026-07-28 tools/call (the status and body as the gateway answers)."""
    headers, body = modern("tools/call", {"name": tool, "arguments": arguments})
    return {"url": gateway.url, "json": body,
            "headers": {**BASE_HEADERS, **headers, "authorization": f"Bearer {token}"}}


async def test_a_held_call_is_decided_again_when_approved_a_withdrawn_role_refuses_it(tmp_path: Path) -> None:
    gateway = deploy("proxy", tmp_path, policy=HOLD_DELETE)
    runtime = gateway.runtime
    try:
        made = _admin(gateway, "POST", "/admin/roles", scope="roles:admin",
                      body={"subject": "alice", "role": "operator"})
        async with httpx.AsyncClient(timeout=20) as http:
            call = asyncio.create_task(http.post(**_modern_call(gateway, gateway.token(), "delete_file",
                                                                {"path": "/srv/a"})))
            approval_id = await _pending(gateway, "delete_file")
            withdrawn = await asyncio.to_thread(_admin, gateway, "DELETE",
                                                f"/admin/roles/{made.json()['assignment']['id']}", scope="roles:admin")
            assert withdrawn.status_code == 200
            assert (await asyncio.to_thread(_admin, gateway, "POST",
                                            f"/admin/approvals/{approval_id}/approve")).status_code == 200
            answer = await asyncio.wait_for(call, 10)
        assert answer.json()["error"]["code"] == -32602  # as the policy answers a tool the caller cannot see
        assert gateway.recorder.tool_calls("delete_file") == []
        assert gateway.gateway.call(runtime.approvals.store.get(approval_id)).status == "approved"  # unused
        [event] = [e for e in gateway.audit_events() if e["operation"] == "tools/call"]
        assert (event["result"], event["reason"], event["approval_granted"]) == ("denied", "no-grant:tool", 1)
    finally:
        gateway.stop()


async def test_a_held_call_whose_token_is_revoked_while_it_waits_is_refused(tmp_path: Path) -> None:
    gateway = deploy("proxy", tmp_path, policy=HOLD_DELETE)
    try:
        token = _operator(gateway)
        async with httpx.AsyncClient(timeout=20) as http:
            call = asyncio.create_task(http.post(**_modern_call(gateway, token, "delete_file", {"path": "/srv/b"})))
            approval_id = await _pending(gateway, "delete_file")
            jti = jwt.decode(token, options={"verify_signature": False})["jti"]
            revoked = await asyncio.to_thread(_admin, gateway, "DELETE", f"/admin/sessions/{jti}",
                                              scope="sessions:admin")
            assert revoked.status_code == 200
            assert (await asyncio.to_thread(_admin, gateway, "POST",
                                            f"/admin/approvals/{approval_id}/approve")).status_code == 200
            answer = await asyncio.wait_for(call, 10)
        assert answer.status_code == 401 and "revoked" in answer.json()["error"]["message"]
        assert gateway.recorder.tool_calls("delete_file") == []
    finally:
        gateway.stop()


async def test_a_tool_redefined_while_its_call_waits_needs_an_approval_of_its_own(tmp_path: Path) -> None:
    server = build_server()
    gateway = deploy("proxy", tmp_path, upstream_app=server.streamable_http_app(), policy=HOLD_DELETE)
    try:
        token = _operator(gateway)
        async with _client(gateway, "auto", token) as session, httpx.AsyncClient(timeout=20) as http:
            await session.list_tools()
            call = asyncio.create_task(http.post(**_modern_call(gateway, token, "delete_file", {"path": "/srv/c"})))
            first = await _pending(gateway, "delete_file")

            def delete_file(path: str) -> str:
                return f"wiped {path}"

            server.remove_tool("delete_file")
            server.add_tool(delete_file, description="Delete a file, and its neighbours.")
            await session.list_tools()  # the gateway sees the new definition
            approved = await asyncio.to_thread(_admin, gateway, "POST", f"/admin/approvals/{first}/approve")
            assert approved.status_code == 200
            deadline = time.monotonic() + 10
            while (second := await _pending(gateway, "delete_file")) == first:  # asked anew, for the new tool
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert not call.done() and gateway.recorder.tool_calls("delete_file") == []
            assert (await asyncio.to_thread(_admin, gateway, "POST",
                                            f"/admin/approvals/{second}/approve")).status_code == 200
            answer = await asyncio.wait_for(call, 10)
        assert answer.json()["result"]["content"][0]["text"] == "wiped /srv/c"
    finally:
        gateway.stop()


async def test_approvers_read_the_whole_arguments_while_the_audit_keeps_them_redacted(
        retry_gateway: Deployment) -> None:
    gateway = retry_gateway
    async with _client(gateway, "auto", _operator(gateway)) as session:
        with pytest.raises(MCPError) as asked:
            await session.call_tool("delete_file", {"path": "/srv/x", "api_key": "k-123"})
    [listed] = _admin(gateway, "GET", "/admin/approvals").json()["approvals"]
    assert listed["arguments"] == '{"api_key":"k-123","path":"/srv/x"}'
    _admin(gateway, "POST", f"/admin/approvals/{asked.value.error.data['approval_id']}/deny")
    recorded = {e["operation"]: e["arguments"] for e in gateway.audit_events() if e["arguments"]}
    assert recorded == {"tools/call": '{"path":"/srv/x","api_key":"[REDACTED]"}',
                        "approvals/denied": '{"api_key":"[REDACTED]","path":"/srv/x"}'}


async def test_a_caller_cannot_flood_approvers_nor_ask_about_what_cannot_be_shown(tmp_path: Path) -> None:
    from gateway.approvals.store import MAX_PENDING_PER_CALLER

    gateway = deploy("proxy", tmp_path, policy=RETRY, limits={"max_body_bytes": 1_000_000, "max_json_depth": 32})
    try:
        async with _client(gateway, "auto", _operator(gateway)) as session:
            for n in range(MAX_PENDING_PER_CALLER):
                with pytest.raises(MCPError) as asked:
                    await session.call_tool("delete_file", {"path": f"/tmp/{n}"})
                assert asked.value.error.code == -32014
            with pytest.raises(MCPError) as flooded:
                await session.call_tool("delete_file", {"path": "/tmp/one-more"})
            assert flooded.value.error.code == -32011 and "too many" in flooded.value.error.message
            with pytest.raises(MCPError) as huge:
                await session.call_tool("delete_file", {"path": "/tmp/" + "x" * 300_000})
            assert huge.value.error.code == -32011 and "cannot be put before an approver" in huge.value.error.message
        assert len(_admin(gateway, "GET", "/admin/approvals").json()["approvals"]) == MAX_PENDING_PER_CALLER
    finally:
        gateway.stop()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_requests_racing_for_a_new_call_make_one_approval(backend: str) -> None:
    from gateway.approvals.store import open_approvals
    from gateway.config import Sessions

    store = open_approvals(Sessions(backend=backend, url="redis://127.0.0.1:6379/0" if backend == "redis" else None))
    caller = ("https://gw", f"racer-{uuid.uuid4().hex}", "")
    call, arguments_hash = call_binding(caller, "demo", "deploy", {"n": 1}, None)
    now = time.time()
    try:
        made = await asyncio.gather(*(store.create(new_approval(
            SPEC, call=call, caller=caller, upstream="demo", tool="deploy", arguments="{}",
            arguments_hash=arguments_hash, definition=None, now=now)) for _ in range(20)))
        assert len({a.id for a in made if a is not None}) == 1 and None not in made
        assert (await store.for_call(call)) == made[0]
    finally:
        await store.close()


def test_a_held_batch_puts_every_call_before_the_approvers_at_once(tmp_path: Path) -> None:
    from tests.harness import ServerThread, free_port, write_config
    from tests.node_peers import server_everything

    policy = {"roles": {"echoer": {"permissions": {"can_execute_tools": ["echo"]}}},
              "bindings": [{"when": {"scope": "mcp:tools"}, "roles": ["echoer"]}],
              "tools": {"echo": {"approval": {"approvers": ["subject:rita"], "mode": "hold", "timeout_s": 30}}}}
    from gateway import create_app

    with server_everything() as upstream_url:
        port = free_port()
        app = create_app(write_config(tmp_path, upstream_url, policy=policy, public_url=f"http://127.0.0.1:{port}"))
        server = ServerThread(app, port).start()
        gateway = Deployment("proxy", server, None, app.runtime, tmp_path / "gateway.yaml")  # type: ignore[arg-type]
        try:
            config = app.runtime.config
            token = app.runtime.authenticator.issue_token(
                subject="bob", audience=config.resource_url(config.upstreams[0]), scopes=["mcp:tools"])
            headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
            url = f"{server.url}/mcp"
            init = httpx.post(url, headers=headers, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
            headers["Mcp-Session-Id"] = init.headers["mcp-session-id"]
            httpx.post(url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
            batch = [{"jsonrpc": "2.0", "id": i, "method": "tools/call",
                      "params": {"name": "echo", "arguments": {"message": text}}} for i, text in ((2, "a"), (3, "b"))]

            async def run() -> httpx.Response:
                async with httpx.AsyncClient(timeout=20) as http:
                    answer = asyncio.create_task(http.post(url, headers=headers, json=batch))
                    deadline = time.monotonic() + 10
                    while True:  # both asked before either is decided
                        listed = (await asyncio.to_thread(_admin, gateway, "GET", "/admin/approvals")).json()
                        if len(listed["approvals"]) == 2:
                            break
                        assert time.monotonic() < deadline, listed
                        await asyncio.sleep(0.05)
                    for approval in listed["approvals"]:
                        path = f"/admin/approvals/{approval['id']}/approve"
                        assert (await asyncio.to_thread(_admin, gateway, "POST", path)).status_code == 200
                    return await asyncio.wait_for(answer, 10)

            answered = asyncio.run(run())
            texts = {m["id"]: m["result"]["content"][0]["text"] for m in (
                json.loads(line[6:]) for line in answered.text.splitlines() if line.startswith("data: "))}
            assert texts == {2: "Echo: a", 3: "Echo: b"}
        finally:
            server.stop()
