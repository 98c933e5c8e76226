"""State handles bound to the principal: legacy sessions, tasks, and answers to server->client requests.

Owns the rule that a handle is never authentication: a session id, a task id or
the id of a server->client request is honoured only for the principal it was
issued to. `check_session` refuses a legacy session the gateway did not bind to
this principal; `track_session` binds the id an upstream issues (and ends the
binding on DELETE); `check_handles` turns an allowed message into a refused one
when it names a task the principal does not own, or answers a server request
that was not passed to it (or answers it with the wrong kind of result).
The bindings themselves live in `sessions` (memory or Redis).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import orjson

from gateway import errors, mcp

if TYPE_CHECKING:
    from gateway.exchange import Exchange
    from gateway.jsonrpc import JsonRpcId
    from gateway.metrics import Metrics
    from gateway.sessions import SessionStore

log = logging.getLogger("gateway")


class Handles:
    """The state-handle stage, over the shared session store."""

    def __init__(self, sessions: SessionStore, metrics: Metrics, *, answer_timeout_s: float) -> None:
        self.sessions = sessions
        self._metrics = metrics
        self.answer_timeout_s = answer_timeout_s  # how long a server->client request waits for its answer

    async def check_session(self, ex: Exchange) -> None:
        """A legacy session id must be one the gateway bound, to this principal."""
        if ex.session_id is None or ex.era == "modern" or (ex.protocol_version or "") in mcp.MODERN_VERSIONS:
            return  # 2026-07-28 has no sessions: the header is ignored upstream too
        assert ex.principal is not None
        owner = await self.sessions.owner(ex.session_id)
        if owner is None:
            self._metrics.session_refusals.labels("unknown").inc()
            raise errors.GatewayRefusal(errors.UNKNOWN_SESSION, reason="session_unknown")
        if owner != ex.principal.identity:
            self._metrics.session_refusals.labels("hijack").inc()
            log.warning("session %s presented by %s but bound to %s", ex.session_id[:8], ex.principal.identity,
                        owner, extra={"session_hijack": True})
            raise errors.GatewayRefusal(errors.INVALID_SESSION, reason="session_hijack")

    async def track_session(self, ex: Exchange, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Bind the session id an upstream issues; end the binding when its DELETE succeeds."""
        sessions, principal = self.sessions, ex.principal
        if ex.http_method == "DELETE" and ex.session_id is not None and 200 <= status < 300:
            await sessions.end(ex.session_id)
        elif ex.session_id is None and principal is not None:
            issued = next((v.decode("latin-1") for n, v in headers if n.lower() == b"mcp-session-id"), None)
            if issued is None or ex.era == "modern":
                return
            if await sessions.owner(issued) not in (None, principal.identity):
                log.error("upstream issued session id %s... that is bound to another principal", issued[:8])
                return
            await sessions.bind(issued, principal.identity)
        else:
            return
        self._metrics.active_sessions.set(await sessions.active())

    async def check_handles(self, ex: Exchange) -> None:
        """State handles in the messages are the principal's own: the tasks a request names, and the server
        request a client's response answers. A message failing this is refused as its own decision."""
        assert ex.principal is not None
        sessions, identity = self.sessions, ex.principal.identity
        decisions = list(ex.decisions)
        for index, op in enumerate(ex.operations):
            decision = decisions[index]
            if op is None or decision is None or not decision.allowed:
                continue
            if op.task_ids:
                owned = await sessions.owned_tasks(ex.upstream.name, identity, op.task_ids)
                if len(owned) < len(set(op.task_ids)):
                    decisions[index] = replace(decision, allowed=False, outcome="denied", reason="task:not_owned",
                                               hidden=True)
            elif op.kind == "client_response":
                key = awaited_key(ex, op.request_id)
                awaited = await sessions.take_answer(key)  # taken at once: two answers cannot both pass
                reason = None
                if awaited is None or awaited[0] != identity:
                    reason = "response:unsolicited"
                elif ex.messages[index].kind == "response" and \
                        not mcp.answers(ex.messages[index].raw.get("result"), awaited[1]):
                    reason = f"response:not_a_{awaited[1]}_result"
                if reason is not None:
                    if awaited is not None:  # still awaited: its principal may answer it properly
                        await sessions.expect_answer(key, *awaited, self.answer_timeout_s)
                    decisions[index] = replace(decision, allowed=False, outcome="denied", reason=reason)
        ex.decisions = tuple(decisions)


def awaited_key(ex: Exchange, request_id: JsonRpcId) -> str:
    """Where a server->client request passed to this principal waits for its answer: per upstream, per legacy
    session (or per principal without one), per JSON-RPC id (its type included: 1 is not "1")."""
    return f"{ex.upstream.name}\0{ex.holder()}\0{orjson.dumps(request_id).decode()}"
