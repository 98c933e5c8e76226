"""The rules an answer is checked against, decided for the principal of one forwarded request.

Owns what a principal may see of an answer, message by message (the inspector
finds the messages, `inspect`):

- list results (every list method in `mcp.METHODS`, every page) keep only the
  items the principal may see, and a `cacheScope: "public"` on them becomes
  `"private"`; a `tasks/list` result keeps only the principal's own tasks;
- a server->client request on a stream (sampling, elicitation, roots, ping) is
  decided and recorded; one the principal may not answer is dropped and the
  upstream is answered on the client's behalf; one passed on is remembered so
  that only this principal's answer to it is taken;
- an `input_required` result (and a 2026-07-28 task waiting for input) loses
  the `inputRequests` the principal may not answer; with none left it becomes
  an error;
- a result that created a task makes the task the principal's; task status
  notifications about other principals' tasks are dropped;
- the tools a `tools/list` result shows are learnt (their schemas check
  `Mcp-Param-*` headers; their definitions are compared with their pins), and
  those whose definitions no operator approved are not shown (`pinning`).

`ResponseRules` is built per request from the exchange (principal, policy
snapshot, era) and the forwarded operations; what it needs of the running
gateway (decisions, recording, telling the upstream) is the `Gateway` protocol.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from gateway import errors, jsonrpc, mcp
from gateway.handles import Handles, awaited_key
from gateway.jsonrpc import JsonRpcId, id_key
from gateway.policy.engine import refused_in_mode

if TYPE_CHECKING:
    from collections.abc import Sequence

    from gateway.exchange import Exchange
    from gateway.policy.engine import Decision

log = logging.getLogger("gateway")

_HOUR_S = 3600.0
_TASK_TTL_S = 86400.0  # how long a task is remembered when its result names no time to live
_TASK_NOTIFICATIONS = frozenset({"notifications/tasks/status", "notifications/tasks"})
_MAY_NEED_INPUT = frozenset({"tool_call", "prompt_get", "resource_read", "task"})
# Every member of a result that `result()` reads when the result is not a list (input requests, a created task):
# an answer too large to hold is judged on these alone (`inspect`), so a rule that reads another must add it here.
RESULT_MEMBERS_READ = frozenset({"resultType", "status", "inputRequests", "task", "taskId", "ttlMs", "ttl"})


class Gateway(Protocol):
    """What the rules need of the running gateway."""

    handles: Handles

    def decide(self, ex: Exchange, op: mcp.Operation) -> Decision:
        """The policy's decision for this exchange's principal, on its policy snapshot."""

    async def rate_limited(self, ex: Exchange, op: mcp.Operation, decision: Decision) -> Decision:
        """`decision`, or its refusal when a rate limit that counts `op` has no token left (the tokens taken)."""

    async def input_asked(self, ex: Exchange, op: mcp.Operation) -> None:
        """`op` was answered `input_required`: its retry with the client's answers is the same call."""

    def server_request_decided(self, ex: Exchange, op: mcp.Operation, decision: Decision) -> None:
        """Record the decision on a server->client request."""

    def server_request_withheld(self, ex: Exchange, op: mcp.Operation) -> None:
        """Answer the upstream on the client's behalf: a request on a stream that the client will not see."""

    async def tools_listed(self, ex: Exchange, result: dict[str, Any]) -> frozenset[str]:
        """The tools a `tools/list` result shows (before filtering); the names of those it must not show."""


class ResponseRules:
    """What to do with the answers to one forwarded request."""

    def __init__(self, ex: Exchange, forwarded: Sequence[int], gateway: Gateway, *,
                 extra: Sequence[bytes] = ()) -> None:
        self._ex = ex
        self._gateway = gateway
        ops = [(ex.messages[i], op) for i in forwarded if (op := ex.operations[i]) is not None]
        self.request_ids = tuple(ex.messages[i].id for i in forwarded if ex.messages[i].kind == "request")
        self.extra = list(extra)  # refused members of a batch, already answered
        self._lists = {id_key(op.request_id): (op.method, spec.listing) for _, op in ops
                       if (spec := mcp.METHODS.get(op.method)) is not None and spec.listing is not None}
        self._may_need_input = {id_key(op.request_id): op for _, op in ops
                                if ex.era == "modern" and op.kind in _MAY_NEED_INPUT}
        # the task a tasks/* request polls: the input requests of a task waiting for input are shown on every poll
        self._polled_task = {id_key(op.request_id): op.task_ids[0] for _, op in ops
                             if op.kind == "task" and op.task_ids}
        # A call may create a task: in 2025-11-25 when it asks for one (params.task); in the 2026-07-28 tasks
        # extension whenever the server chooses to.
        self._may_create_task = {id_key(op.request_id) for message, op in ops if op.kind == "tool_call"
                                 and (ex.era == "modern" or "task" in (message.params or {}))}

    @property
    def judged_on_members(self) -> bool:
        """Whether the JSON answer can be judged on its result's `RESULT_MEMBERS_READ` and its own top-level
        members alone: nothing in it is a list to filter or an answer to merge."""
        return not (self._lists or self.extra)

    @property
    def holds_json(self) -> bool:
        """Whether a JSON answer must be read whole: something in it may be rewritten or recorded."""
        return bool(self._lists or self._may_need_input or self._may_create_task or self.extra)

    async def result(self, message: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        """The result to one of this exchange's requests, as the principal may see it."""
        request_id = id_key(message.get("id"))
        if request_id in self._may_create_task:
            await self._task_created(result)
        listed = self._lists.get(request_id)
        if listed is not None:
            method, listing = listed
            if listing.item_kind == "task":
                return await self._own_tasks_only(message, result, listing)
            unapproved: frozenset[str] = frozenset()
            if listing.item_kind == "tool_call":
                unapproved = await self._gateway.tools_listed(self._ex, result)
            return self._filtered_list(message, result, method, listing, unapproved)
        asked = self._may_need_input.get(request_id)
        if asked is not None and "input_required" in (result.get("resultType"), result.get("status")):
            answer = await self._filtered_input(message, result)
            if "result" in answer:  # the client is asked, and will call again with its answers: one call
                await self._gateway.input_asked(self._ex, asked)
            return answer
        return message

    async def server_request(self, message: dict[str, Any]) -> bool:
        """Whether a server->client request on a stream may reach the client."""
        # one SSE stream's request ids are the session's own: a replayed stream shows the same request again
        shown = f"sse:{self._ex.session_id}:{message.get('id')}" if self._ex.session_id else None
        op, decision = await self._decided(message, message.get("id"), shown)
        if decision.allowed:
            try:  # the client's answer will be taken only if it answers this, for this principal
                handles, principal = self._gateway.handles, self._ex.principal
                assert principal is not None
                await handles.sessions.expect_answer(awaited_key(self._ex, op.request_id), principal.identity,
                                                     op.kind, handles.answer_timeout_s)
                return True
            except errors.StateUnavailable:
                log.error("cannot record server request %s for its answer: dropped", op.method)
        self._gateway.server_request_withheld(self._ex, op)
        return False

    async def notification(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Task status notifications reach only the task's owner; other notifications pass."""
        if message.get("method") not in _TASK_NOTIFICATIONS:
            return message
        params = message.get("params")
        task_id = params.get("taskId") if isinstance(params, dict) else None
        if not isinstance(task_id, str) or task_id not in await self._owned([task_id]):
            return None
        return message

    # ---- one kind of result ---------------------------------------------------------------------

    async def _decided(self, message: dict[str, Any], request_id: JsonRpcId,
                       shown: str | None = None) -> tuple[mcp.Operation, Decision]:
        """A server request decided and recorded. `shown`: what makes it the same request when it is shown again
        (None: every showing is a request of its own)."""
        method = message.get("method")
        op = mcp.classify_server_request(jsonrpc.Message(
            "request", request_id, method if isinstance(method, str) else None, message.get("params"), message))
        decision = self._gateway.decide(self._ex, op)
        if decision.allowed and decision.per_hour is not None:
            decision = await self._counted(decision, decision.per_hour, message, shown)
        decision = await self._gateway.rate_limited(self._ex, op, decision)
        self._gateway.server_request_decided(self._ex, op, decision)
        return op, decision

    async def _counted(self, decision: Decision, per_hour: int, message: dict[str, Any],
                       shown: str | None) -> Decision:
        """An allowed sampling request counted against the principal's hourly allowance (in the session store,
        so replicas share the count): over it, refused; when the count cannot be kept, refused too. A request
        passed on once is not counted again when it is shown again (a 2026-07-28 task polled while it waits for
        input, an SSE stream replayed): one request, one count, in either era."""
        principal, sessions = self._ex.principal, self._gateway.handles.sessions
        assert principal is not None and self._ex.policy is not None
        who = hashlib.sha256(orjson.dumps([principal.issuer, principal.subject])).hexdigest()
        passed = None if shown is None else "sampling-passed:" + hashlib.sha256(orjson.dumps(
            [who, self._ex.upstream.name, shown, message], option=orjson.OPT_SORT_KEYS)).hexdigest()
        try:
            if passed is not None and await sessions.tally(passed, _HOUR_S, add=0):
                return decision
            if await sessions.tally(f"sampling:{who}", _HOUR_S) <= per_hour:
                if passed is not None:
                    await sessions.tally(passed, _HOUR_S)
                return decision
            refusal = replace(decision, allowed=False, outcome="denied", reason=f"sampling:per_hour>{per_hour}",
                              detail=f"this caller's server requests have used all {per_hour} samplings of this hour")
        except errors.StateUnavailable:
            refusal = replace(decision, allowed=False, outcome="denied", reason="sampling:count_unavailable")
        return refused_in_mode(self._ex.policy, decision, refusal)

    def _visible(self, listing: mcp.Listing, method: str, item: dict[str, Any]) -> bool:
        op = mcp.item_operation(listing, method, item)
        return op is not None and self._gateway.decide(self._ex, op).visible

    def _filtered_list(self, message: dict[str, Any], result: dict[str, Any], method: str,
                       listing: mcp.Listing, unapproved: frozenset[str]) -> dict[str, Any]:
        items = result.get(listing.items)
        if not isinstance(items, list):
            return message
        kept = [item for item in items if isinstance(item, dict) and self._visible(listing, method, item)
                and item[listing.item_key] not in unapproved]  # visible: named by a string
        if len(kept) == len(items) and result.get("cacheScope") != "public":
            return message
        new_result = {**result, listing.items: kept}
        if new_result.get("cacheScope") == "public":
            new_result["cacheScope"] = "private"  # filtered per principal: no shared cache may keep it
        return {**message, "result": new_result}

    async def _filtered_input(self, message: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        requests = result.get("inputRequests")
        task = self._polled_task.get(id_key(message.get("id")))
        if not isinstance(requests, dict) or not requests:
            return message
        kept = {}
        for key, request in requests.items():  # each is decided and recorded, in order
            shown = f"task:{task}:{key}" if task is not None else None  # a round of a call is a request of its own
            if isinstance(request, dict) and (await self._decided(request, None, shown))[1].allowed:
                kept[key] = request
        if len(kept) == len(requests):
            return message
        if not kept:
            methods = sorted({str(r.get("method")) for r in requests.values() if isinstance(r, dict)})
            asked = ", ".join(methods)
            error = errors.error_object(errors.FORBIDDEN, f"the server asked for {asked}, which is not allowed")
            return {"jsonrpc": "2.0", "id": message.get("id"), "error": error}
        return {**message, "result": {**result, "inputRequests": kept}}

    async def _own_tasks_only(self, message: dict[str, Any], result: dict[str, Any],
                              listing: mcp.Listing) -> dict[str, Any]:
        tasks = result.get(listing.items)
        if not isinstance(tasks, list):
            return message
        ids = [t[listing.item_key] for t in tasks if isinstance(t, dict) and isinstance(t.get(listing.item_key), str)]
        owned = await self._owned(ids) if ids else set()
        kept = [t for t in tasks if isinstance(t, dict) and t.get(listing.item_key) in owned]
        return message if len(kept) == len(tasks) else {**message, "result": {**result, listing.items: kept}}

    async def _task_created(self, result: dict[str, Any]) -> None:
        task = mcp.created_task(result)
        if task is None:
            return
        task_id, ttl_s = task
        principal = self._ex.principal
        assert principal is not None
        try:
            await self._gateway.handles.sessions.own_task(self._ex.upstream.name, task_id, principal.identity,
                                                          ttl_s or _TASK_TTL_S)
        except errors.StateUnavailable:
            log.error("task %s created for %s could not be recorded: it cannot be reached through "
                                    "the gateway", task_id, principal.subject)

    async def _owned(self, task_ids: list[str]) -> set[str]:
        principal = self._ex.principal
        assert principal is not None
        try:
            return await self._gateway.handles.sessions.owned_tasks(self._ex.upstream.name, principal.identity,
                                                                    task_ids)
        except errors.StateUnavailable:
            return set()  # what cannot be checked is not shown

