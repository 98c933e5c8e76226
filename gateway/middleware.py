"""`MCPSecurityMiddleware`: the request path, in order, as a pure ASGI callable.

    edge guards -> authenticate -> parse + classify -> decide -> forward -> inspect response -> audit

Owns the order of those steps and the HTTP exchange around them: reading the
body within limits, answering refusals (status, JSON-RPC error body,
`WWW-Authenticate`), replaying the body to the wrapped app without the
client's `Authorization` header, watching the response go by (learning tool
schemas, telling the client which calls an upstream failure cut short) and
recording exactly one audit event per message. Every decision itself is made
by the module that owns it (`auth`, `mcp`, `policy`).

The wrapped app is an in-process MCP server app, or `UpstreamProxy` for the
reverse proxy: the same checks run in both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from gateway import admin, errors, jsonrpc, mcp
from gateway.audit import AuditEvent, AuditUnavailable, redact_arguments
from gateway.audit.event import new_id
from gateway.auth import AuthFailed, Principal, server
from gateway.auth.server import AuthorizationServer
from gateway.config import Config, Upstream, load_config
from gateway.metrics import method_label
from gateway.policy import Decision, DecisionCache, Policy, roles_for
from gateway.responses import ResponseInspector, Rules
from gateway.runtime import Runtime
from gateway.sessions import StateUnavailable
from gateway.types import (
    ASGIApp,
    ASGIMessage,
    ASGIReceive,
    ASGIScope,
    ASGISend,
    RequestState,
    connection_options,
    header_values,
    send_json,
)

log = logging.getLogger("gateway")

_JSON = (b"content-type", b"application/json")
_TASK_TTL_S = 86400.0  # how long a task is remembered when its result names no time to live
# Headers the gateway reads to decide: a second copy is refused, since a reader taking the first and one taking
# the last would act on different values.
_SINGLE_HEADERS = ("content-type", "mcp-session-id", "mcp-protocol-version", "mcp-method", "mcp-name", "origin",
                   "last-event-id")
_UNKNOWN_WORD = {"tool_call": "tool", "prompt_get": "prompt", "resource_read": "resource",
                 "resource_subscribe": "resource", "resource_unsubscribe": "resource"}


@dataclass(frozen=True, slots=True)
class _Denial:
    """How one refused message is answered: HTTP status and body (when it is the only message), challenge."""

    status: int
    body: bytes
    challenge: str | None = None
    answerable: bool = True  # a request: in a batch its error is part of the answer (a notification's is not)


@dataclass(slots=True)
class _Exchange:
    """What the middleware knows about one HTTP request while it is handled."""

    upstream: Upstream
    http_method: str
    source_ip: str | None
    started: float = field(default_factory=time.perf_counter)
    policy: Policy | None = None  # one snapshot per request: a reload never changes it half-way
    principal: Principal | None = None
    era: mcp.Era | None = None
    protocol_version: str | None = None
    session_id: str | None = None
    messages: tuple[jsonrpc.Message, ...] = ()
    operations: tuple[mcp.Operation | None, ...] = ()
    decisions: tuple[Decision | None, ...] = ()
    connection_id: str = field(default_factory=new_id)  # links the events of one HTTP request (a batch's members)


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

    def __init__(
        self,
        app: ASGIApp,
        config: Config | str | Path,
        *,
        runtime: Runtime | None = None,
        apps: Mapping[str, ASGIApp] | None = None,
    ) -> None:
        self.app = app
        self.config = config if isinstance(config, Config) else load_config(config)
        self.runtime = runtime or Runtime(self.config)
        self._decide_one = DecisionCache()  # decide(), remembered per principal, operation and policy
        self._routes = {u.path: u for u in self.config.upstreams}
        self._apps = dict(apps or {})
        self._metadata_prefix = "/.well-known/oauth-protected-resource"
        self._background: set[asyncio.Task[None]] = set()
        self._authorization_server = AuthorizationServer(self.runtime)

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        path: str = scope.get("path", "")
        upstream = self._routes.get(path.rstrip("/") or "/")
        if upstream is not None and scope["type"] == "http":
            await self._handle(upstream, scope, receive, send)
        elif upstream is not None:
            await send({"type": "websocket.close", "code": 1008})
        elif scope["type"] == "http" and path.startswith(self._metadata_prefix):
            await self._protected_resource_metadata(path, send)
        elif scope["type"] == "http" and path in server.PATHS:
            self.runtime.start()
            await self._authorization_server(scope, receive, send)
        elif scope["type"] == "http" and admin.serves(path):
            self.runtime.start()
            await admin.serve(self.runtime, scope, send)
        else:
            await self.app(scope, receive, send)

    # ---- the request path -------------------------------------------------------------------

    async def _handle(self, upstream: Upstream, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        self.runtime.start()
        scope = _as_forwarded(scope)
        client = scope.get("client")
        ex = _Exchange(upstream, scope["method"], client[0] if client else None)
        if not self.runtime.audit.accepting():
            # No decision may go unrecorded: while the audit trail cannot take more, nothing is served.
            self.runtime.metrics.requests_refused_for_audit.inc()
            await self._refuse(ex, send, errors.GatewayRefusal(errors.AUDIT_UNAVAILABLE, "audit trail unavailable",
                                                               reason="audit_unavailable"))
            return
        try:
            headers = header_values(scope)
            self._guard_edge(ex, headers)
            ex.principal = await self.runtime.authenticator.authenticate(
                headers, scope.get("query_string", b""), self.config.resource_url(upstream), upstream.path
            )
            body = b""
            if ex.http_method == "POST":
                body = await self._read_body(receive, headers)
                self._understand(ex, body, headers)
            else:
                ex.messages = ()
                ex.operations = (mcp.Operation("stream_open" if ex.http_method == "GET" else "session_end",
                                               ex.http_method),)
            await self._check_session(ex)
            self._decide(ex)
            await self._check_handles(ex)
        except AuthFailed as refusal:
            await self._refuse(ex, send, refusal, extra_headers=[(b"www-authenticate", refusal.challenge.encode())])
            return
        except errors.GatewayRefusal as refusal:
            await self._refuse(ex, send, refusal)
            return
        except Exception:
            log.exception("gateway error before forwarding")
            await self._refuse(ex, send, errors.GatewayRefusal(errors.INTERNAL, reason="exception"))
            return
        denied = self._denials(ex)
        if denied and len(denied) == len(ex.decisions):
            await self._answer_denials(ex, send, denied)
            return
        await self._forward(ex, scope, receive, body, denied, send)

    def _guard_edge(self, ex: _Exchange, headers: Mapping[str, list[str]]) -> None:
        if ex.http_method not in ("POST", "GET", "DELETE"):
            raise errors.GatewayRefusal(errors.METHOD_NOT_ALLOWED, ex.http_method)
        for name in _SINGLE_HEADERS:
            if len(headers.get(name, ())) > 1:  # a first-copy reader and a last-copy reader would disagree
                raise errors.GatewayRefusal(errors.INVALID_REQUEST, f"{name} header appears more than once",
                                            reason=f"repeated_header:{name}")
        origins = headers.get("origin")
        if origins:
            origin = origins[0].rstrip("/")
            if origin.lower() != self.config.public_origin and origin not in self.config.allowed_origins:
                raise errors.GatewayRefusal(errors.FORBIDDEN_ORIGIN, reason=f"origin:{origin}")
        ex.session_id = _first(headers, mcp.SESSION_HEADER)
        ex.protocol_version = _first(headers, mcp.PROTOCOL_VERSION_HEADER)

    async def _read_body(self, receive: ASGIReceive, headers: Mapping[str, list[str]]) -> bytes:
        content_type = (_first(headers, "content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise errors.GatewayRefusal(errors.BAD_CONTENT_TYPE, reason=f"content-type:{content_type or 'none'}")
        limit = self.config.limits.max_body_bytes
        declared = _first(headers, "content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise errors.GatewayRefusal(errors.PAYLOAD_TOO_LARGE, f"limit is {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + self.config.limits.client_body_timeout_s
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
            if size > limit:
                raise errors.GatewayRefusal(errors.PAYLOAD_TOO_LARGE, f"limit is {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _understand(self, ex: _Exchange, body: bytes, headers: Mapping[str, list[str]]) -> None:
        """Parse, find the era, check the routing headers, classify: or refuse with the reason."""
        try:
            parsed = jsonrpc.parse_body(body, max_depth=self.config.limits.max_json_depth)
        except jsonrpc.NotJson as exc:
            raise errors.GatewayRefusal(errors.PARSE_ERROR, reason=f"parse:{exc}") from None
        except jsonrpc.NotJsonRpc as exc:
            raise errors.GatewayRefusal(errors.INVALID_REQUEST, str(exc), reason=f"invalid:{exc}") from None
        ex.messages = parsed.messages
        ex.era = mcp.detect_era(parsed.messages, ex.protocol_version)
        if parsed.is_batch and (ex.era == "modern" or (ex.protocol_version or "2025-03-26") not in mcp.BATCH_VERSIONS):
            raise errors.GatewayRefusal(errors.INVALID_REQUEST, "batches are allowed only in protocol 2025-03-26",
                                        reason="batch_not_allowed")
        if ex.era == "modern":
            message = parsed.messages[0]
            ex.protocol_version = mcp.meta_protocol_version(message) or ex.protocol_version
            schema = None
            if message.method == "tools/call" and isinstance(message.params, dict):
                name = message.params.get("name")
                schema = self.runtime.tool_schema(ex.upstream.name, name) if isinstance(name, str) else None
            mismatch = mcp.routing_header_mismatch(message, headers, schema)
            if mismatch is not None:
                raise errors.GatewayRefusal(errors.HEADER_MISMATCH, mismatch, reason=f"header_mismatch:{mismatch}")
        elif parsed.messages[0].method == "initialize" and isinstance(parsed.messages[0].params, dict):
            version = parsed.messages[0].params.get("protocolVersion")
            ex.protocol_version = version if isinstance(version, str) else ex.protocol_version
        try:
            ex.operations = tuple(mcp.classify(m) for m in parsed.messages)
        except mcp.MalformedParams as exc:
            raise errors.GatewayRefusal(errors.INVALID_PARAMS, str(exc), reason=f"invalid_params:{exc}") from None

    async def _check_session(self, ex: _Exchange) -> None:
        """A legacy session id must be one the gateway bound, to this principal."""
        if ex.session_id is None or ex.era == "modern" or (ex.protocol_version or "") in mcp.MODERN_VERSIONS:
            return  # 2026-07-28 has no sessions: the header is ignored upstream too
        assert ex.principal is not None
        owner = await self.runtime.sessions.owner(ex.session_id)
        if owner is None:
            self.runtime.metrics.session_refusals.labels("unknown").inc()
            raise errors.GatewayRefusal(errors.UNKNOWN_SESSION, reason="session_unknown")
        if owner != ex.principal.identity:
            self.runtime.metrics.session_refusals.labels("hijack").inc()
            log.warning("session %s presented by %s but bound to %s", ex.session_id[:8], ex.principal.identity,
                        owner, extra={"session_hijack": True})
            raise errors.GatewayRefusal(errors.INVALID_SESSION, reason="session_hijack")

    async def _track_session(self, ex: _Exchange, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Bind the session id an upstream issues; end the binding when its DELETE succeeds."""
        sessions, principal = self.runtime.sessions, ex.principal
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
        self.runtime.metrics.active_sessions.set(await sessions.active())

    async def _check_handles(self, ex: _Exchange) -> None:
        """State handles in the messages are the principal's own: the tasks a request names, and the server
        request a client's response answers. A message failing this is refused as its own decision."""
        assert ex.principal is not None
        sessions, identity = self.runtime.sessions, ex.principal.identity
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
                key = self._awaited_key(ex, op.request_id)
                awaited = await sessions.take_answer(key)  # taken at once: two answers cannot both pass
                reason = None
                if awaited is None or awaited[0] != identity:
                    reason = "response:unsolicited"
                elif ex.messages[index].kind == "response" and \
                        not mcp.answers(ex.messages[index].raw.get("result"), awaited[1]):
                    reason = f"response:not_a_{awaited[1]}_result"
                if reason is not None:
                    if awaited is not None:  # still awaited: its principal may answer it properly
                        await sessions.expect_answer(key, *awaited, self.config.limits.upstream_timeout_s)
                    decisions[index] = replace(decision, allowed=False, outcome="denied", reason=reason)
        ex.decisions = tuple(decisions)

    def _awaited_key(self, ex: _Exchange, request_id: jsonrpc.JsonRpcId) -> str:
        """Where a server->client request passed to this principal waits for its answer: per upstream, per
        legacy session (or per principal without one), per JSON-RPC id (its type included: 1 is not "1")."""
        assert ex.principal is not None
        holder = ex.session_id or "\0".join(ex.principal.identity)
        return f"{ex.upstream.name}\0{holder}\0{orjson.dumps(request_id).decode()}"

    def _decide(self, ex: _Exchange) -> None:
        assert ex.principal is not None
        policy = ex.policy = self.runtime.policy
        decide = self._decide_one
        ex.decisions = tuple(decide(ex.principal, op, policy) if op is not None else None for op in ex.operations)

    def _denials(self, ex: _Exchange) -> dict[int, _Denial]:
        """For each refused message, by index: how it is answered."""
        out: dict[int, _Denial] = {}
        for index, decision in enumerate(ex.decisions):
            if decision is not None and not decision.allowed:
                op = ex.operations[index]
                assert op is not None
                out[index] = self._denial(op, decision, ex)
        return out

    def _denial(self, op: mcp.Operation, decision: Decision, ex: _Exchange) -> _Denial:
        """The refusal, its JSON-RPC error and its challenge, by outcome and `deny_detail`."""
        assert ex.policy is not None
        explain = ex.policy.deny_detail == "explain"
        detail = f"{op.method} {op.target or ''}".strip() + f" refused by {decision.reason}" if explain else ""
        challenge = None
        if op.kind == "client_response":
            refusal, error = errors.UNSOLICITED_RESPONSE, errors.error_object(errors.UNSOLICITED_RESPONSE)
        elif decision.reason == "task:not_owned":  # the same answer as for a task that does not exist
            refusal, error = errors.UNKNOWN_TASK, errors.error_object(errors.UNKNOWN_TASK)
        elif op.kind == "unknown":
            refusal, error = errors.METHOD_NOT_FOUND, errors.error_object(errors.METHOD_NOT_FOUND, op.method)
        elif decision.outcome == "step_up":
            refusal = errors.SECURITY_LEVEL
            why = f"{op.method} needs authentication of level {decision.required_level}"
            error = errors.error_object(refusal, why if explain else "")
            challenge = self.runtime.authenticator.challenge(
                ex.upstream.path, "insufficient_user_authentication", description=why,
                acr_values=" ".join(decision.acr_values) or None)
        elif decision.outcome == "insufficient_scope":
            refusal, error = errors.FORBIDDEN, errors.error_object(errors.FORBIDDEN, detail)
            challenge = self.runtime.authenticator.challenge(ex.upstream.path, "insufficient_scope",
                                                             scope=" ".join(decision.scopes))
        elif not explain and decision.hidden and op.target is not None and op.kind != "completion":
            refusal = errors.UNKNOWN_TARGET
            error = {"code": refusal.code, "message": f"Unknown {_UNKNOWN_WORD.get(op.kind, 'item')}: {op.target}"}
        else:
            refusal, error = errors.FORBIDDEN, errors.error_object(errors.FORBIDDEN, detail)
        status = refusal.http_status
        if refusal in (errors.UNKNOWN_TARGET, errors.UNKNOWN_TASK) and ex.era != "modern":
            status = 200  # how a legacy-era upstream answers an unknown tool or task: a JSON-RPC error, HTTP 200
        # A notification or a client's response gets no JSON-RPC answer: alone in its POST, an HTTP error status
        # and an error without an id say it was refused; in a batch, nothing does.
        answered = None if op.kind == "client_response" else op.request_id
        body = orjson.dumps({"jsonrpc": "2.0", "id": answered, "error": error})
        return _Denial(status, body, challenge, answerable=answered is not None)

    async def _answer_denials(self, ex: _Exchange, send: ASGISend, denied: dict[int, _Denial]) -> None:
        bodies = [d.body for d in denied.values() if d.answerable]
        headers: list[tuple[bytes, bytes]] = []
        if len(ex.messages) > 1 and not bodies:
            status, payload = 202, b""
        elif len(ex.messages) > 1:
            status, payload = 200, b"[" + b",".join(bodies) + b"]"
        else:
            denial = next(iter(denied.values()))
            status, payload = denial.status, denial.body
            if denial.challenge is not None:
                headers.append((b"www-authenticate", denial.challenge.encode()))
        await send_json(send, status, payload, headers)
        self._audit_all(ex, status)

    async def _refuse(
        self,
        ex: _Exchange,
        send: ASGISend,
        refusal: errors.GatewayRefusal,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        request_id = ex.messages[0].id if len(ex.messages) == 1 else None
        payload = errors.error_body(refusal.refusal, request_id, refusal.detail)
        await send_json(send, refusal.refusal.http_status, payload, extra_headers or [])
        method = (ex.messages[0].method or "response") if len(ex.messages) == 1 else ex.http_method
        self._record(ex, AuditEvent(
            result=refusal.refusal.audit_result,
            reason=refusal.reason,
            operation=method,
            request_id=_id_text(request_id),
            status=refusal.refusal.http_status,
        ), method)

    async def _forward(
        self,
        ex: _Exchange,
        scope: ASGIScope,
        receive: ASGIReceive,
        body: bytes,
        denied: dict[int, _Denial],
        send: ASGISend,
    ) -> None:
        forwarded = [i for i in range(len(ex.messages)) if i not in denied]
        # The client's token stays here; an X-MCP-Identity only ever comes from the gateway.
        headers = [(n, v) for n, v in scope["headers"] if n not in _NOT_FORWARDED]
        if ex.upstream.identity_header and ex.principal is not None:
            policy = ex.policy or self.runtime.policy
            identity = self.runtime.authenticator.identity_token(
                ex.principal, roles_for(ex.principal, policy), ex.upstream.url or self.config.resource_url(ex.upstream))
            headers.append((b"x-mcp-identity", identity.encode()))
        body, headers = self._rewritten(ex, forwarded, body, headers)
        if ex.http_method == "POST":
            headers.append((b"content-length", str(len(body)).encode()))
        state = RequestState(request_ids=tuple(ex.messages[i].id for i in forwarded
                                               if ex.messages[i].kind == "request"))
        inner_scope = {**scope, "headers": headers, "mcp_gateway": state}
        audited = False
        forwarded_at = time.perf_counter()

        def audit(status: int) -> None:
            nonlocal audited
            if audited:
                return
            audited = True
            if state.upstream_error is not None:
                self.runtime.metrics.upstream_errors.labels(ex.upstream.name, state.upstream_error).inc()
            if inspector.started_at is not None:
                upstream_s = inspector.started_at - forwarded_at
                metrics = self.runtime.metrics
                metrics.child(metrics.upstream_seconds, ex.upstream.name).observe(upstream_s)
                metrics.child(metrics.gateway_seconds, ex.upstream.name).observe(
                    max(0.0, time.perf_counter() - ex.started - upstream_s))
            self._audit_all(ex, status, state.upstream_error)

        inspector = ResponseInspector(send, self._rules(ex, scope, forwarded, denied, state),
                                      max_bytes=self.config.limits.max_inspected_bytes,
                                      upstream_error=lambda: state.upstream_error, on_complete=audit,
                                      # a legacy GET stream can stay open for hours: it is recorded when it opens
                                      complete_on_start=ex.http_method == "GET",
                                      before_start=lambda status, headers: self._track_session(ex, status, headers))
        app = self._apps.get(ex.upstream.path, self.app)
        try:
            await app(inner_scope, _replay(body, receive), inspector.send)
        except Exception:
            log.exception("error in the wrapped app for %s", ex.upstream.name)
            state.upstream_error = state.upstream_error or "exception"
            if not inspector.response_started:
                only_id = state.request_ids[0] if len(state.request_ids) == 1 else None
                payload = errors.error_body(errors.INTERNAL, only_id)
                await send_json(send, 500, payload)
                inspector.status = 500
            elif not inspector.finished:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            audit(inspector.status or 500)

    def _rewritten(self, ex: _Exchange, forwarded: list[int], body: bytes, headers: list[tuple[bytes, bytes]]
                   ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """The body and headers to forward: exactly what was decided, serialised anew from the decoded messages
        (never the client's bytes, which another parser could read differently: a repeated key, an escape), only
        the allowed members of a batch, and resource URIs in the normalised form they were decided in."""
        if ex.http_method != "POST":
            return body, headers
        messages = [ex.messages[i].raw for i in forwarded]
        for position, index in enumerate(forwarded):
            op, decision = ex.operations[index], ex.decisions[index]
            if op is None or decision is None or decision.uri is None or op.uri == decision.uri \
                    or op.kind == "completion":
                continue
            raw = messages[position]
            messages[position] = {**raw, "params": {**raw["params"], "uri": decision.uri}}
            if ex.era == "modern":
                headers = [(n, v) for n, v in headers if n != b"mcp-name"]
                headers.append((b"mcp-name", decision.uri.encode()))
        return jsonrpc.dumps(messages if len(ex.messages) > 1 else messages[0]), headers

    def _rules(self, ex: _Exchange, scope: ASGIScope, forwarded: list[int], denied: dict[int, _Denial],
               state: RequestState) -> Rules:
        """What the response to this request is checked against, as decisions for this principal."""
        principal, policy = ex.principal, ex.policy
        assert principal is not None and policy is not None
        sessions, upstream = self.runtime.sessions, ex.upstream.name
        ops = [(ex.messages[i], op) for i in forwarded if (op := ex.operations[i]) is not None]
        lists = {op.request_id: op.method for _, op in ops if op.kind == "list" or op.method == "tasks/list"}
        may_need_input = {op.request_id for _, op in ops if ex.era == "modern"
                          and op.kind in ("tool_call", "prompt_get", "resource_read", "task")}
        # A call may create a task: in 2025-11-25 when it asks for one (params.task); in the 2026-07-28 tasks
        # extension whenever the server chooses to.
        may_create_task = {op.request_id for message, op in ops if op.kind == "tool_call"
                           and (ex.era == "modern" or "task" in (message.params or {}))}

        def item_visible(method: str, item: dict[str, Any]) -> bool:
            op = _item_operation(method, item)
            return op is not None and self._decide_one(principal, op, policy).visible

        def police(message: dict[str, Any], request_id: jsonrpc.JsonRpcId) -> tuple[mcp.Operation, Decision]:
            """Decide and audit one server->client request (on a stream, or in inputRequests)."""
            method = message.get("method")
            op = mcp.classify_server_request(jsonrpc.Message(
                "request", request_id, method if isinstance(method, str) else None, message.get("params"), message))
            decision = self._decide_one(principal, op, policy)
            self._audit_server_request(ex, op, decision)
            return op, decision

        async def server_request(message: dict[str, Any]) -> bool:
            op, decision = police(message, message.get("id"))
            if decision.allowed:
                try:  # the client's answer will be taken only if it answers this, for this principal
                    await sessions.expect_answer(self._awaited_key(ex, op.request_id), principal.identity, op.kind,
                                                 self.config.limits.upstream_timeout_s)
                    return True
                except StateUnavailable:
                    log.error("cannot record server request %s for its answer: dropped", op.method)
            self._tell_upstream(ex, scope, op, decision)
            return False

        def input_request(request: dict[str, Any]) -> bool:
            return police(request, None)[1].allowed

        def learn(method: str, result: dict[str, Any]) -> None:
            if method == "tools/list":
                self.runtime.learn_tools(ex.upstream.name, result)

        async def answered(result: dict[str, Any]) -> None:
            task = mcp.created_task(result)
            if task is not None:
                task_id, ttl_s = task
                try:
                    await sessions.own_task(upstream, task_id, principal.identity, ttl_s or _TASK_TTL_S)
                except StateUnavailable:
                    log.error("task %s created for %s could not be recorded: it cannot be reached through the "
                              "gateway", task_id, principal.subject)

        async def own_tasks(task_ids: list[str]) -> set[str]:
            try:
                return await sessions.owned_tasks(upstream, principal.identity, task_ids)
            except StateUnavailable:
                return set()  # what cannot be checked is not shown

        return Rules(
            lists=lists,
            may_need_input=may_need_input,
            may_create_task=may_create_task,
            item_visible=item_visible,
            server_request=server_request,
            input_request=input_request,
            learn=learn,
            answered=answered,
            own_tasks=own_tasks,
            request_ids=state.request_ids,
            extra=[d.body for d in denied.values() if d.answerable] if forwarded else [],
        )

    def _tell_upstream(self, ex: _Exchange, scope: ASGIScope, op: mcp.Operation, decision: Decision) -> None:
        """Answer a refused server->client request to the upstream on the client's behalf, so it does not wait."""
        error = errors.error_object(errors.FORBIDDEN, f"{op.method} is not allowed by the gateway's policy")
        body = orjson.dumps({"jsonrpc": "2.0", "id": op.request_id, "error": error})
        keep = (b"mcp-session-id", b"mcp-protocol-version", b"host", b"user-agent")
        headers = [(n, v) for n, v in scope["headers"] if n in keep]
        headers += [_JSON, (b"accept", b"application/json, text/event-stream"),
                    (b"content-length", str(len(body)).encode())]
        inner = {**scope, "method": "POST", "headers": headers, "query_string": b"",
                 "mcp_gateway": RequestState(), "path": ex.upstream.path}
        app = self._apps.get(ex.upstream.path, self.app)

        async def deliver() -> None:
            async def discard(_: ASGIMessage) -> None:
                return None

            try:
                await app(inner, _replay(body, _never_disconnect), discard)
            except Exception:
                log.exception("could not tell upstream %s that %s was refused", ex.upstream.name, op.method)

        task = asyncio.get_running_loop().create_task(deliver())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- audit --------------------------------------------------------------------------------

    def _audit_all(self, ex: _Exchange, status: int, upstream_error: str | None = None) -> None:
        """One event per message (or one for a GET/DELETE), with its own decision."""
        for index, op in enumerate(ex.operations):
            decision = ex.decisions[index] if index < len(ex.decisions) else None
            if op is None or decision is None:
                continue
            assert ex.policy is not None
            tool = op.name if op.kind == "tool_call" and op.name in ex.policy.named_tools else "other"
            metrics = self.runtime.metrics
            metrics.child(metrics.decisions, "allowed" if decision.allowed else decision.outcome, decision.reason,
                          tool if op.kind == "tool_call" else "").inc()
            if not decision.allowed:
                result, reason = "denied", decision.reason
            elif upstream_error is not None or status in (502, 504):
                result, reason = "upstream_error", f"upstream:{upstream_error or status}"
            elif status >= 500:
                result, reason = "error", f"status:{status}"
            else:
                result, reason = "allowed", decision.reason
            event = AuditEvent(
                result=result,
                reason=reason,
                operation=op.method,
                request_id=_id_text(op.request_id),
                resource_accessed=op.uri,
                tool_executed=op.name if op.kind == "tool_call" else None,
                prompt=op.name if op.kind == "prompt_get" else None,
                roles=decision.roles,
                policy_version=decision.policy_version,
                security_level=decision.required_level,
                status=status,
                arguments=redact_arguments(op.arguments, self.config.audit.redact_keys,
                                           self.config.audit.max_arguments_bytes),
            )
            self._record(ex, event, op.method if op.kind not in ("notification", "client_response") else op.kind)

    def _audit_server_request(self, ex: _Exchange, op: mcp.Operation, decision: Decision) -> None:
        """A request from the server to the client (sampling, elicitation, roots) is a decision too."""
        self._record(ex, AuditEvent(
            result="allowed" if decision.allowed else "denied",
            reason=decision.reason,
            operation=op.method,
            request_id=_id_text(op.request_id),
            roles=decision.roles,
            policy_version=decision.policy_version,
        ), op.method)

    def _record(self, ex: _Exchange, event: AuditEvent, method: str) -> None:
        elapsed = time.perf_counter() - ex.started
        principal = ex.principal
        event.duration_ms = round(elapsed * 1000, 3)
        event.connection_id = ex.session_id or ex.connection_id
        event.user_id = principal.subject if principal else None
        event.client_id = principal.client_id if principal else None
        event.upstream = ex.upstream.name
        event.source_ip = ex.source_ip
        event.protocol_version = ex.protocol_version
        event.http_method = ex.http_method
        metrics = self.runtime.metrics
        metrics.child(metrics.requests, ex.upstream.name, method_label(method), event.result).inc()
        metrics.child(metrics.request_seconds, ex.upstream.name).observe(elapsed)
        try:
            self.runtime.audit.record(event)
        except AuditUnavailable:
            log.error("audit buffer full: event %s could not be queued", event.id,
                      extra={"audit_id": event.id, "result": event.result, "reason": event.reason})
        if log.isEnabledFor(logging.INFO):
            log.info("request", extra={
                "audit_id": event.id, "upstream": ex.upstream.name, "operation": event.operation,
                "result": event.result, "reason": event.reason, "status": event.status, "user_id": event.user_id,
                "client_id": event.client_id, "duration_ms": event.duration_ms, "source_ip": event.source_ip,
            })

    # ---- lifespan and metadata ------------------------------------------------------------------

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

    def _authorization_servers(self) -> tuple[str, ...]:
        auth = self.config.auth
        if auth.authorization_servers is not None:
            return auth.authorization_servers
        return (*((auth.jwt.issuer,) if auth.jwt is not None else ()), self.config.public_url)

    def _scopes_supported(self) -> tuple[str, ...]:
        auth = self.config.auth
        if auth.scopes_supported is not None:
            return auth.scopes_supported
        return tuple(sorted(set(self.runtime.policy.scopes) | set(auth.scope_hierarchy)))

    async def _protected_resource_metadata(self, path: str, send: ASGISend) -> None:
        """RFC 9728 metadata, built from `public_url` (never from the request's Host)."""
        suffix = path[len(self._metadata_prefix):]
        prefix = self.config.public_path_prefix
        upstream = self._routes.get(suffix[len(prefix):] if suffix.startswith(prefix) else "")
        if upstream is None and len(self.config.upstreams) == 1 and suffix in ("", "/"):
            upstream = self.config.upstreams[0]
        if upstream is None:
            payload = b'{"error":"not_found"}'
            await send_json(send, 404, payload)
            return
        payload = orjson.dumps({
            "resource": self.config.resource_url(upstream),
            "authorization_servers": list(self._authorization_servers()),
            "bearer_methods_supported": ["header"],
            "scopes_supported": list(self._scopes_supported()),
            "resource_name": upstream.name,
        })
        await send_json(send, 200, payload)


_NOT_FORWARDED = frozenset({b"authorization", b"content-length", b"x-mcp-identity"})


def _as_forwarded(scope: ASGIScope) -> ASGIScope:
    """The request with only the headers an upstream may receive, so that what the gateway reads is what the
    upstream reads: not those the Connection header names (RFC 9110 7.6.1: they end at this hop), and not
    names with an underscore (which some servers read as a hyphen: `mcp_session_id` as `Mcp-Session-Id`)."""
    headers = scope["headers"]
    nominated = connection_options(headers)
    kept = [(n, v) for n, v in headers if b"_" not in n and n not in nominated]
    return scope if len(kept) == len(headers) else {**scope, "headers": kept}


def _replay(body: bytes, receive: ASGIReceive) -> ASGIReceive:
    """A `receive` that gives `body` once, then whatever the client's connection says (a disconnect)."""
    sent = False

    async def replay() -> ASGIMessage:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _never_disconnect() -> ASGIMessage:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


_ITEM_KEYS: dict[str, tuple[mcp.OperationKind, str]] = {
    "tools/list": ("tool_call", "name"),
    "prompts/list": ("prompt_get", "name"),
    "resources/list": ("resource_read", "uri"),
    "resources/templates/list": ("completion", "uriTemplate"),  # shown when one expansion is readable
}


def _item_operation(method: str, item: dict[str, Any]) -> mcp.Operation | None:
    """The operation a list item stands for: calling the tool, getting the prompt, reading the resource."""
    kind, key = _ITEM_KEYS[method]
    value = item.get(key)
    if not isinstance(value, str):
        return None
    if key == "name":
        return mcp.Operation(kind, method, name=value)
    return mcp.Operation(kind, method, uri=value)


def _first(headers: Mapping[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None


def _id_text(value: jsonrpc.JsonRpcId) -> str | None:
    return None if value is None else str(value)
