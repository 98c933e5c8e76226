"""ResponseRules over fixed decisions, for table tests of the response side: an item named "secret" is hidden,
sampling is refused, everything else is allowed; the task "mine" belongs to the caller. The session store is
the real in-memory one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from gateway.config import Sessions, Upstream
from gateway.exchange import Exchange
from gateway.handles import Handles
from gateway.jsonrpc import JsonRpcId, Message
from gateway.mcp import Operation, classify
from gateway.metrics import Metrics
from gateway.policy.engine import Decision
from gateway.principal import Principal
from gateway.response_rules import ResponseRules
from gateway.sessions import MemorySessions

CALLER = Principal("alice", "https://issuer.test")
OWNED_TASKS = {"mine"}
UPSTREAM = Upstream(name="up", path="/mcp")


class FixedGateway:
    """What the rules ask of the gateway, with fixed decisions; what they were told is appended to `seen`."""

    def __init__(self, seen: list[Any]) -> None:
        self.handles = Handles(MemorySessions(Sessions()), Metrics(), answer_timeout_s=60)
        self.seen = seen

    def decide(self, ex: Exchange, op: Operation) -> Decision:
        hidden = op.name == "secret" or op.kind == "sampling"
        return Decision(not hidden, "fixed", (), "test", outcome="denied" if hidden else "allowed", hidden=hidden)

    async def rate_limited(self, ex: Exchange, op: Operation, decision: Decision) -> Decision:
        return decision  # no rate limits here

    async def input_asked(self, ex: Exchange, op: Operation) -> None:
        return None

    def server_request_decided(self, ex: Exchange, op: Operation, decision: Decision) -> None:
        self.seen.append(op)

    def server_request_withheld(self, ex: Exchange, op: Operation) -> None:
        self.seen.append(("withheld", op.request_id))

    async def tools_listed(self, ex: Exchange, result: dict[str, Any]) -> frozenset[str]:
        self.seen.append(("tools/list", result))
        return frozenset()


async def fixed_rules(seen: list[Any] | None = None, *, lists: dict[JsonRpcId, str] | None = None,
                      may_need_input: set[JsonRpcId] | None = None, may_create_task: set[JsonRpcId] | None = None,
                      request_ids: tuple[JsonRpcId, ...] = (1,), extra: list[bytes] | None = None,
                      ) -> tuple[ResponseRules, FixedGateway]:
    """Rules for one forwarded request per id in `request_ids`: a `lists` method, a tools/call that may need input
    (2026-07-28) or may create a task (it asks for one), or else a plain tools/call."""
    gateway = FixedGateway([] if seen is None else seen)
    for task in OWNED_TASKS:
        await gateway.handles.sessions.own_task(UPSTREAM.name, task, CALLER.identity, 60)
    ex = Exchange(UPSTREAM, {"method": "POST", "headers": [], "client": ("127.0.0.1", 1)})
    ex.principal, ex.era = CALLER, "modern" if may_need_input else "legacy"
    messages = []
    for request_id in request_ids:
        params: dict[str, Any] = {"name": "echo", "arguments": {}}
        method = (lists or {}).get(request_id, "tools/call")
        if method != "tools/call":
            params = {}
        elif request_id in (may_create_task or set()):
            params["task"] = {}
        messages.append(Message("request", request_id, method, params,
                                {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}))
    ex.messages = tuple(messages)
    ex.operations = tuple(classify(m) for m in messages)
    return ResponseRules(ex, range(len(messages)), gateway, extra=extra or []), gateway


def completions(into: list[int]) -> Callable[[int], Awaitable[None]]:
    """A ResponseInspector `on_complete` that notes each status it is called with in `into`."""

    async def complete(status: int) -> None:
        into.append(status)

    return complete
