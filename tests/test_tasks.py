"""A task belongs to the principal whose call created it: others get the answer for a task that does not exist.

2025-11-25 against @modelcontextprotocol/server-everything (tasks on `tools/call` with `params.task`); the
2026-07-28 tasks extension against an upstream that keeps one task store for every caller, as a stateless
upstream behind a gateway does (it sees one client: the gateway).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway import sse
from tests.harness import Recorder, ServerThread
from tests.node_peers import server_everything
from tests.test_bad_input import BASE_HEADERS, modern
from tests.test_server_everything import EVERYTHING_POLICY
from tests.test_upstream_failures import _audit, _proxy_to

LEGACY = {**BASE_HEADERS, "MCP-Protocol-Version": "2025-11-25"}
NOT_FOUND = {"code": -32602, "message": "Failed to retrieve task: Task not found"}


def _token(app: Any, subject: str) -> str:
    config = app.runtime.config
    return str(app.runtime.authenticator.issue_token(subject=subject, scopes=["mcp:tools"],
                                                     audience=config.resource_url(config.upstreams[0])))


def _messages(response: httpx.Response) -> list[dict[str, Any]]:
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return [json.loads(e.data) for e in sse.Decoder().feed(response.content) if e.data]
    return [response.json()]


class LegacyClient:
    """One principal's 2025-11-25 session through the gateway, by hand (the SDK client has no tasks API)."""

    def __init__(self, url: str, app: Any, subject: str) -> None:
        self.url = url
        self.headers = {**LEGACY, "Authorization": f"Bearer {_token(app, subject)}"}
        self.ids = itertools.count(1)
        init = self.post("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                        "clientInfo": {"name": subject, "version": "1"}})
        self.headers["Mcp-Session-Id"] = init.headers["mcp-session-id"]
        httpx.post(url, headers=self.headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})

    def post(self, method: str, params: dict[str, Any]) -> httpx.Response:
        return httpx.post(self.url, headers=self.headers, timeout=30,
                          json={"jsonrpc": "2.0", "id": next(self.ids), "method": method, "params": params})

    def answer(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        response = self.post(method, params)
        return next(m for m in _messages(response) if "result" in m or "error" in m)


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Any]]:
    directory = tmp_path_factory.mktemp("tasks")
    with server_everything() as upstream_url:
        server, app = _proxy_to(directory, upstream_url, policy=EVERYTHING_POLICY)
        try:
            yield f"{server.url}/mcp", app, server
        finally:
            server.stop()


def test_a_task_is_its_creators_in_the_2025_era(everything: tuple[str, Any, Any]) -> None:
    url, app, server = everything
    alice, bob = LegacyClient(url, app, "alice"), LegacyClient(url, app, "bob")
    created = alice.answer("tools/call", {"name": "simulate-research-query", "arguments": {"topic": "tides"},
                                          "task": {"ttl": 60000}})
    task_id = created["result"]["task"]["taskId"]

    assert alice.answer("tasks/get", {"taskId": task_id})["result"]["taskId"] == task_id
    assert [t["taskId"] for t in alice.answer("tasks/list", {})["result"]["tasks"]] == [task_id]
    for method in ("tasks/get", "tasks/result", "tasks/cancel"):
        refused = bob.post(method, {"taskId": task_id})
        assert refused.status_code == 200 and refused.json()["error"] == NOT_FOUND  # as an upstream says it
        unknown = bob.post(method, {"taskId": "no-such-task"})
        assert unknown.json()["error"] == refused.json()["error"]  # one answer for another's and for none
    assert task_id not in json.dumps(bob.answer("tasks/list", {}))
    assert alice.answer("tasks/cancel", {"taskId": task_id})["result"]["status"] == "cancelled"

    events = _audit(server, app)
    assert events.count("denied:task:not_owned") == 6


def test_a_task_created_without_asking_for_one_is_nobodys(everything: tuple[str, Any, Any]) -> None:
    url, app, _ = everything
    alice = LegacyClient(url, app, "alice")
    # A call that did not ask for a task: its answer is not read for one, so no task id can be claimed from it.
    plain = alice.answer("tools/call", {"name": "echo", "arguments": {"message": "hi"}})
    assert "task" not in plain["result"]
    assert alice.post("tasks/get", {"taskId": "made-up"}).json()["error"] == NOT_FOUND


class SharedTasks:
    """A 2026-07-28 upstream with the tasks extension and one task store for every caller."""

    def __init__(self) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}
        self.app = Recorder(Starlette(routes=[Route("/mcp", self.handle, methods=["POST"])]))

    async def handle(self, request: Request) -> Response:
        message = await request.json()
        method, params, request_id = message["method"], message.get("params", {}), message["id"]
        if method == "tools/call":
            task_id = f"task-{len(self.tasks) + 1}"
            self.tasks[task_id] = {"taskId": task_id, "status": "input_required", "createdAt": "2026-12-02T00:00:00Z",
                                   "lastUpdatedAt": "2026-12-02T00:00:00Z", "ttlMs": 60000}
            return self._json(request_id, {"resultType": "task", **self.tasks[task_id]})
        if method in ("tasks/get", "tasks/cancel", "tasks/update"):
            task = self.tasks.get(params.get("taskId"))
            if task is None:
                return JSONResponse({"jsonrpc": "2.0", "id": request_id, "error": NOT_FOUND}, status_code=400)
            return self._json(request_id, {"resultType": "complete", **task, "inputRequests": {
                "ask": {"method": "elicitation/create", "params": {"message": "which?", "requestedSchema": {}}},
                "sample": {"method": "sampling/createMessage", "params": {"messages": [], "maxTokens": 5}}}})
        if method == "subscriptions/listen":
            async def stream() -> Any:
                ack = {"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged", "params": {}}
                yield sse.encode(json.dumps(ack))
                for task in self.tasks.values():  # this upstream tells every listener about every task
                    yield sse.encode(json.dumps({"jsonrpc": "2.0", "method": "notifications/tasks", "params": task}))
                yield sse.encode(json.dumps({"jsonrpc": "2.0", "id": request_id, "result": {}}))
            return StreamingResponse(stream(), media_type="text/event-stream")
        return JSONResponse({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": method}})

    @staticmethod
    def _json(request_id: Any, result: dict[str, Any]) -> Response:
        return JSONResponse({"jsonrpc": "2.0", "id": request_id, "result": result})


def test_a_task_is_its_creators_in_the_2026_era_even_when_the_upstream_shares_them(tmp_path: Path) -> None:
    upstream = SharedTasks()
    upstream_server = ServerThread(upstream.app).start()
    server, app = _proxy_to(tmp_path, f"{upstream_server.url}/mcp", policy={
        "roles": {"r": {"permissions": {"can_execute_tools": ["*"], "can_elicit": True}}},
        "bindings": [{"when": {"scope": "mcp:tools"}, "roles": ["r"]}]})

    def call(subject: str, method: str, params: dict[str, Any]) -> httpx.Response:
        headers, body = modern(method, params)
        return httpx.post(f"{server.url}/mcp", json=body, timeout=30,
                          headers={**BASE_HEADERS, **headers, "Authorization": f"Bearer {_token(app, subject)}"})

    try:
        created = call("alice", "tools/call", {"name": "research", "arguments": {}})
        task_id = created.json()["result"]["taskId"]
        mine = call("alice", "tasks/get", {"taskId": task_id}).json()["result"]
        assert mine["status"] == "input_required" and list(mine["inputRequests"]) == ["ask"]  # sampling not hers
        upstream.app.clear()
        for method, params in (("tasks/get", {}), ("tasks/cancel", {}),
                               ("tasks/update", {"inputResponses": {"ask": {"action": "accept", "content": {}}}})):
            refused = call("bob", method, {"taskId": task_id, **params})
            assert refused.status_code == 400 and refused.json()["error"] == NOT_FOUND
        listen = call("bob", "subscriptions/listen", {"notifications": {"taskIds": [task_id]}})
        assert listen.status_code == 400 and listen.json()["error"] == NOT_FOUND
        assert upstream.app.requests == []  # none of bob's attempts reached the upstream

        call("bob", "tools/call", {"name": "research", "arguments": {}})  # bob's own task, task-2
        heard = call("bob", "subscriptions/listen", {"notifications": {"taskIds": ["task-2"]}})
        told = [m["params"]["taskId"] for m in _messages(heard) if m.get("method") == "notifications/tasks"]
        assert told == ["task-2"]  # the upstream told him of task-1 too; the gateway did not pass it on
    finally:
        server.stop()
        upstream_server.stop()
