"""stdio upstreams end to end: the SDK client over HTTP through the gateway to programs it runs.

The tests' own stdio server (`tests/stdio_server.py`) shows what the real peers cannot: the child's whole
environment, state per process, a crash, a flood, a hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import mcp_types as types
import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from gateway.app import create_app
from tests.harness import DEFAULT_POLICY, ServerThread, audit_events, free_port, wait_for_port
from tests.test_bad_input import modern

SERVER = [sys.executable, str(Path(__file__).with_name("stdio_server.py"))]
POLICY: dict[str, Any] = {
    "roles": {
        "reader": {"permissions": {"can_execute_tools": ["env", "count", "pid", "echo"]}},
        "operator": {"inherits": ["reader"], "permissions": {"can_execute_tools": ["*"],
                                                              "can_request_sampling": True}},
    },
    "bindings": DEFAULT_POLICY["bindings"],
}
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}


class StdioGateway:
    """`serve`'s app in front of a stdio upstream, on a port of its own."""

    def __init__(self, directory: Path, *, command: list[str] = SERVER, limits: dict[str, Any] | None = None,
                 roles: dict[str, Any] | None = None, **upstream: Any) -> None:
        port = free_port()
        path = self.write(directory, port, command, upstream, limits, roles)
        self.app = create_app(path)
        self.runtime = self.app.runtime
        self.server = ServerThread(self.app, port).start()
        self.url = f"{self.server.url}/mcp"

    @staticmethod
    def write(directory: Path, port: int, command: list[str], upstream: dict[str, Any],
              limits: dict[str, Any] | None = None, roles: dict[str, Any] | None = None) -> Path:
        """The config (and policy) of a gateway on `port` in front of `command`."""
        policy = {**POLICY, "roles": {**POLICY["roles"], **(roles or {})}}
        (directory / "policy.yaml").write_text(yaml.safe_dump(policy))
        config = {
            "public_url": f"http://127.0.0.1:{port}",
            "upstreams": [{"name": "kit", "path": "/mcp", "command": command, **upstream}],
            "policy": str(directory / "policy.yaml"),
            "auth": {"clients": {"signing_key_file": str(directory / "key.pem")}},
            "audit": {"sinks": [{"type": "sqlite", "path": str(directory / "audit.db")}]},
            "limits": limits or {},
        }
        path = directory / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def token(self, subject: str, **claims: Any) -> str:
        config = self.runtime.config
        scopes = () if claims else ("mcp:tools",)
        return self.runtime.authenticator.issue_token(subject=subject, audience=config.resource_url(
            config.upstreams[0]), scopes=scopes, claims=claims)

    def client(self, subject: str = "alice", mode: str = "legacy", **options: Any) -> Client:
        token = self.token(subject, groups=["ops"]) if subject.startswith("op") else self.token(subject)
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
        return Client(streamable_http_client(self.url, http_client=http), mode=mode, **options)

    def audit(self) -> list[dict[str, Any]]:
        return audit_events(self.server, self.runtime)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def stdio(tmp_path: Path) -> Any:
    gateway = StdioGateway(tmp_path, env={"SERVICE_TOKEN": "for-the-child"})
    yield gateway
    gateway.stop()


def text(result: Any) -> str:
    return str(result.content[0].text)


async def test_the_child_sees_only_its_configured_environment(stdio: StdioGateway,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTROSPECTION_SECRET", "gateway-only")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "gateway-only")
    async with stdio.client() as session:
        env = json.loads(text(await session.call_tool("env", {})))
    assert sorted(env) == ["HOME", "LANG", "PATH", "SERVICE_TOKEN", "TMPDIR"]
    assert env["SERVICE_TOKEN"] == "for-the-child" and env["PATH"] == os.environ["PATH"]
    assert env["TMPDIR"].startswith(env["HOME"]) and not Path(env["HOME"]).samefile(Path.home())


async def test_each_principal_has_its_own_process_and_state(stdio: StdioGateway) -> None:
    async with stdio.client("alice") as alice, stdio.client("bob") as bob:
        assert [text(await alice.call_tool("count", {})) for _ in range(2)] == ["1", "2"]
        assert text(await bob.call_tool("count", {})) == "1"
        alice_pid, bob_pid = text(await alice.call_tool("pid", {})), text(await bob.call_tool("pid", {}))
    assert alice_pid != bob_pid
    calls = [e for e in stdio.audit() if e["operation"] == "tools/call"]
    assert {(e["user_id"], str(e["upstream_process"])) for e in calls} == {("alice", alice_pid), ("bob", bob_pid)}


async def test_lists_are_filtered_and_a_forbidden_call_never_reaches_the_child(stdio: StdioGateway) -> None:
    async with stdio.client() as session:
        listed = {t.name for t in (await session.list_tools()).tools}
        assert listed == {"env", "count", "pid", "echo"}
        with pytest.raises(MCPError) as refused:
            await session.call_tool("crash", {})
        assert refused.value.error.message == "Unknown tool: crash"
        assert text(await session.call_tool("count", {})) == "1"  # same process, still alive: it never crashed
    denied = [(e["tool_executed"], e["result"], e["reason"]) for e in stdio.audit() if e["result"] == "denied"]
    assert denied == [("crash", "denied", "no-grant:tool")]


async def test_a_crash_fails_the_call_and_the_next_call_gets_a_fresh_process(stdio: StdioGateway) -> None:
    async with stdio.client("operator") as session:
        before = text(await session.call_tool("pid", {}))
        with pytest.raises(MCPError) as failed:
            await session.call_tool("crash", {})
        assert failed.value.error.code == -32050
        after = text(await session.call_tool("pid", {}))
    assert after != before
    crashed = [e for e in stdio.audit() if e["tool_executed"] == "crash" and e["operation"] == "tools/call"]
    assert [(e["result"], e["reason"]) for e in crashed] == [("upstream_error", "upstream:exited")]


@pytest.mark.parametrize(("tool", "reason"), [("flood", "upstream:protocol"), ("garbage", "upstream:protocol")])
async def test_a_child_that_breaks_the_stdio_framing_is_replaced(stdio: StdioGateway, tool: str,
                                                                  reason: str) -> None:
    async with stdio.client("operator") as session:
        with pytest.raises(MCPError) as failed:
            await session.call_tool(tool, {"bytes": 4 << 20})
        assert failed.value.error.code == -32050
        assert text(await session.call_tool("count", {})) == "1"  # a new process
    assert [e["reason"] for e in stdio.audit() if e["tool_executed"] == tool and e["operation"] == "tools/call"] == [
        reason]


async def test_a_silent_child_times_out_with_the_upstream_timeout_error(tmp_path: Path) -> None:
    gateway = StdioGateway(tmp_path, limits={"upstream_timeout_s": 1})
    try:
        async with gateway.client("operator") as session:
            with pytest.raises(MCPError) as failed:
                await session.call_tool("hang", {})
            assert failed.value.error.code == -32051
            seen = json.loads(text(await session.call_tool("cancelled", {})))
            assert seen["cancelled"] == seen["hung"] != []  # told to cancel, under the id it knows the call by
    finally:
        gateway.stop()


async def test_progress_reaches_the_caller_under_its_own_token(stdio: StdioGateway) -> None:
    reported: list[tuple[float, float | None]] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        reported.append((done, total))

    async with stdio.client("operator") as session:
        seen_by_child = text(await session.call_tool("progress", {}, progress_callback=progress))
    assert reported == [(1, 2), (2, 2)]
    assert seen_by_child.startswith(tuple("0123456789abcdef")) and "-p" in seen_by_child  # the gateway's token


async def test_past_max_processes_a_new_caller_gets_a_clear_error(tmp_path: Path) -> None:
    gateway = StdioGateway(tmp_path, process={"max_processes": 1})
    try:
        async with gateway.client("alice") as alice:
            await alice.call_tool("count", {})
            async with httpx2.AsyncClient() as http:
                busy = await http.post(gateway.url, json=INITIALIZE, headers=_headers(gateway, "bob"))
            assert busy.status_code == 503 and busy.json()["error"]["code"] == -32055
            assert text(await alice.call_tool("count", {})) == "2"  # alice's process was not taken from her
        refused = [e for e in gateway.audit() if e["user_id"] == "bob"]
        assert [(e["operation"], e["result"], e["reason"]) for e in refused] == [
            ("initialize", "upstream_error", "upstream:busy")]
    finally:
        gateway.stop()


@pytest.mark.parametrize("mode", ["legacy", "auto"])  # on the POST's SSE stream; as input_required and a retry
async def test_sampling_from_the_child_reaches_its_caller_and_the_answer_goes_back(stdio: StdioGateway,
                                                                                   mode: str) -> None:
    async def sample(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="42"),
                                         model="test")

    async with stdio.client("operator", mode=mode, sampling_callback=sample) as session:
        answered = json.loads(text(await session.call_tool("ask", {})))
    assert answered["content"]["text"] == "42"
    sampled = [e for e in stdio.audit() if e["operation"] == "sampling/createMessage"]
    assert [(e["result"], e["user_id"]) for e in sampled] == [("allowed", "operator")]


async def test_a_2026_client_is_served_in_its_own_era_by_a_handshake_era_child(stdio: StdioGateway) -> None:
    async with stdio.client(mode="auto") as session:
        assert {t.name for t in (await session.list_tools()).tools} == {"env", "count", "pid", "echo"}
        assert text(await session.call_tool("echo", {"x": "y"})) == '{"x": "y"}'
        assert text(await session.call_tool("count", {})) == "1"
    events = stdio.audit()
    assert events[0]["operation"] == "server/discover" and "initialize" not in [e["operation"] for e in events]
    assert {e["protocol_version"] for e in events} == {"2026-07-28"}


async def test_a_parked_call_is_only_picked_up_by_its_own_caller(stdio: StdioGateway) -> None:
    headers, ask = modern("tools/call", {"name": "ask", "arguments": {}})
    async with httpx2.AsyncClient() as http:
        asked = await http.post(stdio.url, json=ask, headers={**headers, **_headers(stdio, "operator")})
        result = asked.json()["result"]
        assert result["resultType"] == "input_required"
        [(key, request)] = result["inputRequests"].items()
        assert request["method"] == "sampling/createMessage"
        answer = {"role": "assistant", "content": {"type": "text", "text": "mine"}, "model": "m"}
        retry = {**ask, "params": {**ask["params"], "requestState": result["requestState"],
                                   "inputResponses": {key: answer}}}
        stolen = await http.post(stdio.url, json=retry, headers={**headers, **_headers(stdio, "opal")})
        assert stolen.status_code == 400 and "requestState" in stolen.json()["error"]["message"]
        finished = await http.post(stdio.url, json=retry, headers={**headers, **_headers(stdio, "operator")})
    assert json.loads(finished.json()["result"]["content"][0]["text"])["content"]["text"] == "mine"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    status = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    return status == "Z"  # exited, waiting for its parent to read its status


def _all_gone(*pids: int) -> bool:
    """Whether every process has ended within 10 s (what ends them runs in the gateway's own time)."""
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(_gone(pid) for pid in pids)


async def test_sigterm_of_serve_leaves_no_process_behind(tmp_path: Path) -> None:
    port = free_port()
    StdioGateway.write(tmp_path, port, SERVER, {})
    cli = str(Path(sys.executable).with_name("mcp-gateway"))
    config = str(tmp_path / "gateway.yaml")
    serve = subprocess.Popen([cli, "serve", "--config", config, "--port", str(port)], stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)  # serve has made the signing key by now
        token = subprocess.run([cli, "issue-token", "--config", config, "--subject", "operator", "--claim",
                                'groups=["ops"]'], capture_output=True, text=True, check=True).stdout.strip()
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
        async with Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http),
                          mode="legacy") as session:
            child = int(text(await session.call_tool("pid", {})))
            grandchild = int(text(await session.call_tool("spawn", {})))
        assert not _gone(child) and not _gone(grandchild)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        assert _all_gone(child, grandchild), "a process of the stdio upstream outlived the gateway"
    finally:
        serve.kill()


async def test_per_session_isolation_gives_each_session_its_process_and_delete_ends_it(tmp_path: Path) -> None:
    gateway = StdioGateway(tmp_path, isolation="per_session")
    try:
        async with gateway.client("alice") as first, gateway.client("alice") as second:
            pids = {text(await first.call_tool("pid", {})), text(await second.call_tool("pid", {}))}
            assert text(await first.call_tool("count", {})) == "1"
            assert text(await second.call_tool("count", {})) == "1"
        assert len(pids) == 2
        assert _all_gone(*map(int, pids))  # both sessions were ended (DELETE): their processes with them
    finally:
        gateway.stop()


async def test_shared_isolation_is_one_process_for_everyone(tmp_path: Path) -> None:
    gateway = StdioGateway(tmp_path, isolation="shared")
    try:
        async with gateway.client("alice") as alice, gateway.client("bob") as bob:
            assert text(await alice.call_tool("pid", {})) == text(await bob.call_tool("pid", {}))
            assert [text(await s.call_tool("count", {})) for s in (alice, bob)] == ["1", "2"]
    finally:
        gateway.stop()


async def test_an_idle_process_is_stopped_and_the_next_call_starts_another(tmp_path: Path) -> None:
    # Plain POSTs: an SDK client keeps a GET stream open, and a process with a listener is not idle.
    gateway = StdioGateway(tmp_path, process={"idle_timeout_s": 0.4})
    try:
        async with httpx2.AsyncClient() as http:
            session = await initialize(http, gateway, "alice")
            first = int(text_of(await call(http, gateway, "alice", session, "pid")))
            assert _all_gone(first)
            assert int(text_of(await call(http, gateway, "alice", session, "pid"))) != first
        assert 'reason="idle"' in gateway.runtime.metrics.render().decode()
    finally:
        gateway.stop()


def _headers(gateway: StdioGateway, subject: str, session: str | None = None) -> dict[str, str]:
    token = gateway.token(subject, groups=["ops"]) if subject.startswith("op") else gateway.token(subject)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    return {**headers, "Mcp-Session-Id": session} if session else headers


async def initialize(http: httpx2.AsyncClient, gateway: StdioGateway, subject: str) -> str:
    answer = await http.post(gateway.url, headers=_headers(gateway, subject), json=INITIALIZE)
    assert answer.status_code == 200, answer.text
    return str(answer.headers["mcp-session-id"])


async def call(http: httpx2.AsyncClient, gateway: StdioGateway, subject: str, session: str, tool: str) -> Any:
    answer = await http.post(gateway.url, headers=_headers(gateway, subject, session), json={
        "jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": tool, "arguments": {}}})
    return answer.json()


def text_of(answer: Any) -> str:
    return str(answer["result"]["content"][0]["text"])


async def test_a_program_that_cannot_start_is_an_upstream_error_and_a_crash_loop_is_not_ready(
        tmp_path: Path) -> None:
    gateway = StdioGateway(tmp_path, command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    try:
        async with httpx2.AsyncClient() as http:
            for _ in range(3):
                failed = await http.post(gateway.url, json=INITIALIZE, headers=_headers(gateway, "alice"))
                assert failed.status_code == 502 and failed.json()["error"]["code"] == -32050
            ready = await http.get(f"{gateway.server.url}/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["stdio_kit_not_crash_looping"] is False
        assert [e["reason"] for e in gateway.audit()] == ["upstream:exited"] * 3
    finally:
        gateway.stop()


async def test_the_quick_start_serves_a_stdio_server_with_a_printed_token(tmp_path: Path) -> None:
    port = free_port()
    cli = str(Path(sys.executable).with_name("mcp-gateway"))
    serve = subprocess.Popen([cli, "serve", "--stdio", "--port", str(port), "--", *SERVER],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "TMPDIR": str(tmp_path)})  # where the quick start's files go
    try:
        assert serve.stdout is not None
        printed = [serve.stdout.readline() for _ in range(4)]
        token = next(line for line in printed if "Bearer " in line).split("Bearer ")[1].strip()
        assert f"served at http://127.0.0.1:{port}/mcp" in printed[0]
        wait_for_port(port)
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
        async with Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http),
                          mode="auto") as session:
            assert text(await session.call_tool("echo", {"q": 1})) == '{"q": 1}'
        directory = Path(printed[-1].split(": ", 1)[1].strip())
        assert (directory / "audit.db").exists() and (directory / "gateway.yaml").exists()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_request_of_the_childs_the_caller_may_not_answer_never_reaches_the_caller(tmp_path: Path,
                                                                                          mode: str) -> None:
    gateway = StdioGateway(tmp_path, roles={"reader": {"permissions": {"can_execute_tools": ["ask", "echo"]}}})
    sampled: list[Any] = []

    async def sample(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        sampled.append(params)
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="x"),
                                         model="m")

    try:
        async with gateway.client("alice", mode=mode, sampling_callback=sample) as session:
            if mode == "legacy":  # dropped from the stream; the child is answered with the gateway's refusal
                answer = json.loads(text(await session.call_tool("ask", {})))
                assert answer["message"] == "Forbidden: sampling/createMessage is not allowed by the gateway's policy"
            else:  # taken out of inputRequests: none left, so the result became the refusal
                with pytest.raises(MCPError) as refused:
                    await session.call_tool("ask", {})
                assert refused.value.error.code == -32011
            assert text(await session.call_tool("echo", {"a": 1})) == '{"a": 1}'
        assert sampled == []
        denied = [e for e in gateway.audit() if e["operation"] == "sampling/createMessage"]
        assert [(e["result"], e["reason"]) for e in denied] == [("denied", "no-grant:sampling")]
    finally:
        gateway.stop()


async def test_a_launcher_planted_in_the_working_directory_is_never_run(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    (workdir / "gateway" / "stdio").mkdir(parents=True)
    for package in ("gateway", "gateway/stdio"):
        (workdir / package / "__init__.py").write_text("")
    marker = tmp_path / "planted-code-ran"
    (workdir / "gateway" / "stdio" / "launch.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    gateway = StdioGateway(tmp_path, cwd=str(workdir))
    try:
        async with gateway.client() as session:
            assert text(await session.call_tool("echo", {"a": 1})) == '{"a": 1}'
        assert not marker.exists()
    finally:
        gateway.stop()
