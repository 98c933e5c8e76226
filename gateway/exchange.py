"""One HTTP request to a guarded MCP endpoint, while it is handled; and the one body reader.

Owns: `Exchange`, what the stages have learnt about one request (who asks, in
which era, every message with its operation and decision) and which stage
writes each field; `read_body`, the only place a request body is read from an
ASGI `receive` (MCP endpoints, the OAuth server, the forwarding hop), within a
size limit and a deadline.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway import errors
from gateway.audit.event import new_id
from gateway.tracing import NO_TRACE, RequestTrace
from gateway.types import ASGIReceive, ASGIScope, RequestState

if TYPE_CHECKING:
    from gateway.approvals import Verdict
    from gateway.config import Upstream
    from gateway.jsonrpc import JsonRpcId, Message
    from gateway.mcp import Era, Operation
    from gateway.policy.engine import Decision
    from gateway.policy.model import Policy
    from gateway.principal import Principal


@dataclass(slots=True)
class Exchange:
    """What the stages know about one HTTP request, filled in as they run: `protocol_version` comes from the
    header (guards) and then the body (reading); `decisions` from the policy and then the state-handle checks,
    which may refuse an allowed message."""

    upstream: Upstream
    scope: ASGIScope  # the request as the upstream may see it (`guards.as_forwarded`)
    started: float = field(default_factory=time.perf_counter)
    http_method: str = field(init=False)
    source_ip: str | None = field(init=False)
    connection_id: str = field(default_factory=new_id)  # links the events of one HTTP request (a batch's members)
    # guards: from the headers
    session_id: str | None = None
    protocol_version: str | None = None
    # authenticate
    principal: Principal | None = None
    # read the MCP request
    era: Era | None = None
    messages: tuple[Message, ...] = ()
    operations: tuple[Operation | None, ...] = ()
    # decide
    policy: Policy | None = None  # one snapshot per request: a reload never changes it half-way
    decisions: tuple[Decision | None, ...] = ()
    # forward: shared with the forwarding hop in scope["mcp_gateway"], which reports upstream failures in it
    # (the forwarder too, when the wrapped app raises)
    state: RequestState = field(default_factory=RequestState)
    # the approval gate: per message index that needed a person's approval, what became of it
    approvals: dict[int, Verdict] = field(default_factory=dict)
    # the middleware: its trace, when tracing is on (`tracing`); the stages report to it
    trace: RequestTrace = NO_TRACE
    # the recorder: an event of this request could not even be queued (the audit buffer was full)
    unrecorded: bool = False

    def __post_init__(self) -> None:
        self.http_method = self.scope["method"]
        client = self.scope.get("client")
        self.source_ip = client[0] if client else None

    @property
    def only_id(self) -> JsonRpcId:
        """The id an error for the whole request answers: the one message's, or null for a batch."""
        return self.messages[0].id if len(self.messages) == 1 else None

    @property
    def caller(self) -> str | None:
        """The principal as one string (issuer, subject, client), for what is kept per caller."""
        return "\0".join(self.principal.identity) if self.principal is not None else None

    def holder(self) -> str:
        """Whose state handles these are: the legacy session, or the principal without one."""
        assert self.principal is not None
        return self.session_id or str(self.caller)


async def read_body(receive: ASGIReceive, *, limit: int | None = None, timeout_s: float | None = None) -> bytes:
    """The whole request body: refused (413) past `limit` bytes, (408) when it has not all come within
    `timeout_s`, and (400) when the client goes away first. Without bounds it reads a body already read whole
    (the one the middleware replays to the forwarding hop)."""
    chunks: list[bytes] = []
    size = 0
    deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise errors.GatewayRefusal(errors.REQUEST_TIMEOUT, reason="body_timeout") from None
        if message["type"] == "http.disconnect":
            raise errors.GatewayRefusal(errors.INVALID_REQUEST, "client disconnected", reason="disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise errors.GatewayRefusal(errors.PAYLOAD_TOO_LARGE, f"limit is {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
