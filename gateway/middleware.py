"""`MCPSecurityMiddleware`: the order of the request path, as a pure ASGI callable.

    guards -> authenticate -> read the MCP request -> sessions -> decide -> state handles
           -> tool pins -> approvals -> refuse | forward -> inspect the answer -> record

Owns only that order, which paths are guarded (the gateway's own routes are
`endpoints`, every other path is the wrapped app's), and the mapping of a
stage's exception to a refusal. Each stage is one module: `guards`, `auth`,
`exchange.read_body` + `mcp.read_request`, `handles`, `policy`, `pinning`, `approvals`, `refusals`,
`forwarding` (+ `inspect`, `response_rules`), `audit.recording`.

A new request-side stage is one call in `_handle`; a new rule on answers is a
method of `ResponseRules`. The wrapped app is an in-process MCP server app, or
`UpstreamProxy` for the reverse proxy: the same checks run in both.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from gateway import admin, console, errors, guards, mcp, refusals
from gateway.approvals.stream import HeldAnswer, progress_token
from gateway.audit.recording import Recorder
from gateway.audit.writer import AuditUnavailable
from gateway.auth.authenticator import AuthFailed
from gateway.config import Config, Upstream, load_config
from gateway.endpoints import Endpoints
from gateway.exchange import Exchange, read_body
from gateway.forwarding import Forwarder
from gateway.handles import Handles
from gateway.policy import Decision, DecisionCache
from gateway.runtime import Runtime
from gateway.types import ASGIApp, ASGIMessage, ASGIReceive, ASGIScope, ASGISend, header_values, send_json

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from gateway.principal import Principal

log = logging.getLogger("gateway")


class MCPSecurityMiddleware:
    """Guards the MCP endpoints of `app`; every other path is passed to `app` untouched.

    Args:
        app: an MCP server ASGI app (in-process) or an `UpstreamProxy`.
        config: a `Config`, or the path of a config file to load.
        runtime: shared state (audit log, authenticator, metrics); created from
            `config` when not given. The middleware starts it on ASGI lifespan
            startup, or on the first request when the server runs no lifespan.
        apps: per-upstream apps when one middleware guards several upstreams
            (the reverse proxy); `app` then serves every other path.
    """

    def __init__(self, app: ASGIApp, config: Config | str | Path, *, runtime: Runtime | None = None,
                 apps: Mapping[str, ASGIApp] | None = None) -> None:
        self.app = app
        self.config = config if isinstance(config, Config) else load_config(config)
        self.runtime = runtime = runtime or Runtime(self.config)
        self._routes = {u.path: u for u in self.config.upstreams}
        self._admin_port = self.config.admin_listen.port if self.config.admin_listen is not None else None
        self._endpoints = Endpoints(self.config, runtime)
        self._decide = DecisionCache()  # decide(), remembered per principal, operation and policy
        self.handles = Handles(runtime.sessions, runtime.metrics,
                               answer_timeout_s=self.config.limits.upstream_timeout_s)
        self._recorder = Recorder(runtime.audit, runtime.metrics, self.config.audit)
        self._forwarder = Forwarder(app, apps or {}, self.config, runtime, self._recorder, self.handles)

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if self._admin_port is not None and scope["type"] == "http" and not self._on_its_listener(scope, path):
            await send_json(send, 404, b'{"error":"not_found"}')
            return
        upstream = self._routes.get(path.rstrip("/") or "/")
        if upstream is not None and scope["type"] == "http":
            await self._handle(upstream, scope, receive, send)
        elif upstream is not None:
            await send({"type": "websocket.close", "code": 1008})
        elif scope["type"] == "http" and self._endpoints.serves(path):
            await self._endpoints(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _on_its_listener(self, scope: ASGIScope, path: str) -> bool:
        """With `admin_listen` (serve): the operators' routes (/metrics, /admin, the console) are served on that
        listener only, everything else on the public one only; /healthz and /readyz on both."""
        if path in ("/healthz", "/readyz"):
            return True
        server = scope.get("server") or (None, None)
        operators = path == "/metrics" or admin.serves(path) or console.serves(path)
        return operators == (server[1] == self._admin_port)

    async def _handle(self, upstream: Upstream, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        self.runtime.start()
        ex = Exchange(upstream, guards.as_forwarded(scope))
        if self.runtime.tracing is not None:  # off: ex.trace stays the no-op
            ex.trace = self.runtime.tracing.request(ex.scope)
        limits, body = self.config.limits, b""
        try:
            if not self.runtime.audit.accepting():
                # No decision may go unrecorded: while the audit trail cannot take more, nothing is served.
                self.runtime.metrics.requests_refused_for_audit.inc()
                raise errors.GatewayRefusal(errors.AUDIT_UNAVAILABLE, "audit trail unavailable",
                                            reason="audit_unavailable")
            headers = header_values(ex.scope)
            guards.check_edge(ex, headers, self.config)
            ex.principal = await self._principal(ex, headers)
            if ex.http_method == "POST":
                guards.check_body(headers, limits.max_body_bytes)
                body = await read_body(receive, limit=limits.max_body_bytes, timeout_s=limits.client_body_timeout_s)
                self._read(ex, body, headers)
            else:
                ex.operations = (mcp.Operation("stream_open" if ex.http_method == "GET" else "session_end",
                                               ex.http_method),)
            await self.handles.check_session(ex)
            with ex.trace.span("decide"):
                ex.policy = self.runtime.policy.for_upstream(ex.upstream.name)
                ex.decisions = tuple(self.decide(ex, op) if op is not None else None for op in ex.operations)
            await self.handles.check_handles(ex)
            await self.runtime.pins.check(ex)  # a tool whose definition no operator approved is not called
            await self.runtime.rate_limits.check(ex)  # what a rate limit counts takes its token, or is refused
            if any(d is not None and d.allowed and d.approval is not None for d in ex.decisions):
                token = progress_token(ex)
                held = HeldAnswer(send, token) if token is not None else None
                send = held or send  # a held client's answer may be carried in the SSE answer started for it

                async def recheck(op: mcp.Operation) -> Decision:
                    """After a wait: the token once more, then `op` decided as of now."""
                    ex.principal = await self._principal(ex, headers)
                    ex.policy = self.runtime.policy.for_upstream(ex.upstream.name)
                    return await self.runtime.pins.decided(ex, op, self.decide(ex, op))

                await self.runtime.approvals.check(ex, receive, recheck, held.progress if held is not None else None)
        except errors.GatewayRefusal as refusal:
            await self._refuse(ex, send, refusal)
            return
        except Exception:
            log.exception("gateway error before forwarding")
            await self._refuse(ex, send, errors.GatewayRefusal(errors.INTERNAL, reason="exception"))
            return
        denied = self._denials(ex)
        if denied and len(denied) == len(ex.decisions):
            status, payload, answer_headers = refusals.answer_denials(list(denied.values()), len(ex.messages))
            self._recorder.exchange(ex, status)
            await self._answer(ex, send, status, payload, answer_headers)
            return
        await self._forwarder.forward(ex, receive, body, denied, send, self)

    async def _principal(self, ex: Exchange, headers: Mapping[str, list[str]]) -> Principal:
        """Who asks, as of now: the token verified (revocation and expiry included), with the roles assigned at
        runtime. Asked as a request comes in, and again before a call approved after a wait is let through."""
        with ex.trace.span("authenticate"):
            principal = await self.runtime.authenticator.authenticate(
                headers, ex.scope.get("query_string", b""), self.config.resource_url(ex.upstream), ex.upstream.path)
            return await self.runtime.assignments.apply(principal)

    def _read(self, ex: Exchange, body: bytes, headers: Mapping[str, list[str]]) -> None:
        """What the body asks for, or the refusal that says why it cannot be acted on."""
        read = mcp.read_request(body, headers, max_depth=self.config.limits.max_json_depth,
                                tool_schema=lambda name: self.runtime.tool_schema(ex.upstream.name, name))
        ex.messages, ex.protocol_version = read.messages, read.protocol_version
        if isinstance(read, mcp.Invalid):
            raise refusals.unreadable(read)
        ex.era, ex.operations = read.era, read.operations

    def _denials(self, ex: Exchange) -> dict[int, refusals.Denial]:
        """For each refused message, by index: how it is answered."""
        assert ex.policy is not None
        explain = ex.policy.deny_detail == "explain"
        # the approval gate runs last: a refused message it has a verdict for it refused, unless the policy did
        # once more after a wait (withdrawn)
        return {index: refusals.approval_denial(op, ex.approvals[index])
                if index in ex.approvals and ex.approvals[index].outcome != "withdrawn" else
                refusals.denial(op, decision, era=ex.era, explain=explain, upstream_path=ex.upstream.path,
                                challenger=self.runtime.authenticator)
                for index, (op, decision) in enumerate(zip(ex.operations, ex.decisions, strict=True))
                if op is not None and decision is not None and not decision.allowed}

    async def _refuse(self, ex: Exchange, send: ASGISend, refusal: errors.GatewayRefusal) -> None:
        challenge = refusal.challenge if isinstance(refusal, AuthFailed) else None
        status, payload, headers = refusals.refusal_answer(refusal, ex.only_id, challenge)
        self._recorder.refused(ex, refusal)
        if refusal.refusal is errors.AUDIT_UNAVAILABLE:  # the one answer that cannot wait for the audit trail
            await send_json(send, status, payload, headers)
        else:
            await self._answer(ex, send, status, payload, headers)

    async def _answer(self, ex: Exchange, send: ASGISend, status: int, payload: bytes,
                      headers: list[tuple[bytes, bytes]]) -> None:
        """The gateway's own answer, once its events are on record (under audit.durability: written, on every
        sink); if they cannot be written in time, the audit-unavailable refusal instead."""
        try:
            await self._recorder.written(ex)
        except AuditUnavailable:
            status, payload, headers = refusals.refusal_answer(
                errors.GatewayRefusal(errors.AUDIT_UNAVAILABLE, "audit trail unavailable"), ex.only_id, None)
        await send_json(send, status, payload, headers)

    # ---- what the response rules ask of the gateway (`response_rules.Gateway`) -------------------

    def decide(self, ex: Exchange, op: mcp.Operation) -> Decision:
        assert ex.principal is not None and ex.policy is not None
        hinted = self.runtime.tool_level(ex.upstream.name, op.name) if op.kind == "tool_call" and op.name else 0
        return self._decide(ex.principal, op, ex.policy, hinted, era=ex.era or "", upstream=ex.upstream.name)

    async def rate_limited(self, ex: Exchange, op: mcp.Operation, decision: Decision) -> Decision:
        return await self.runtime.rate_limits.decided(ex, op, decision)

    async def input_asked(self, ex: Exchange, op: mcp.Operation) -> None:
        await self.runtime.rate_limits.retry_expected(ex, op)

    def server_request_decided(self, ex: Exchange, op: mcp.Operation, decision: Decision) -> None:
        self._recorder.server_request(ex, op, decision)

    def server_request_withheld(self, ex: Exchange, op: mcp.Operation) -> None:
        self._forwarder.tell_upstream(ex, op)

    async def tools_listed(self, ex: Exchange, result: dict[str, Any]) -> frozenset[str]:
        self.runtime.learn_tools(ex.upstream.name, result)
        return await self.runtime.pins.listed(ex, result)

    # ---- lifespan -------------------------------------------------------------------------------

    async def _lifespan(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        async def wrapped_receive() -> ASGIMessage:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.runtime.start()
            return message

        async def wrapped_send(message: ASGIMessage) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.runtime.close()
            await send(message)

        await self.app(scope, wrapped_receive, wrapped_send)
