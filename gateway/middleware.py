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

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway import errors, jsonrpc, mcp, sse
from gateway.audit import AuditEvent, AuditUnavailable, redact_arguments
from gateway.auth import AuthFailed, Principal
from gateway.config import Config, Upstream, load_config
from gateway.metrics import method_label
from gateway.policy import Decision, decide
from gateway.runtime import Runtime
from gateway.types import ASGIApp, ASGIMessage, ASGIReceive, ASGIScope, ASGISend, RequestState, header_values

log = logging.getLogger("gateway")

_JSON = (b"content-type", b"application/json")
# Bounded copy of a list result kept to learn tool schemas from; larger results are passed on unread.
_MAX_INSPECTED_BYTES = 8 * 1024 * 1024
_UNKNOWN_WORD = {"tool_call": "tool", "prompt_get": "prompt", "resource_read": "resource",
                 "resource_subscribe": "resource", "resource_unsubscribe": "resource"}


@dataclass(slots=True)
class _Exchange:
    """What the middleware knows about one HTTP request while it is handled."""

    upstream: Upstream
    http_method: str
    source_ip: str | None
    started: float = field(default_factory=time.perf_counter)
    principal: Principal | None = None
    era: mcp.Era | None = None
    protocol_version: str | None = None
    session_id: str | None = None
    messages: tuple[jsonrpc.Message, ...] = ()
    operations: tuple[mcp.Operation | None, ...] = ()
    decisions: tuple[Decision | None, ...] = ()


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
        self._routes = {u.path: u for u in self.config.upstreams}
        self._apps = dict(apps or {})
        self._metadata_prefix = "/.well-known/oauth-protected-resource"

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
        else:
            await self.app(scope, receive, send)

    # ---- the request path -------------------------------------------------------------------

    async def _handle(self, upstream: Upstream, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        self.runtime.start()
        client = scope.get("client")
        ex = _Exchange(upstream, scope["method"], client[0] if client else None)
        try:
            headers = header_values(scope)
            self._guard_edge(ex, headers)
            ex.principal = self.runtime.authenticator.authenticate(
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
            self._decide(ex)
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
        if denied and len(denied) == len([d for d in ex.decisions if d is not None]):
            await self._answer_denials(ex, send, denied)
            return
        await self._forward(ex, scope, receive, body, denied, send)

    def _guard_edge(self, ex: _Exchange, headers: Mapping[str, list[str]]) -> None:
        if ex.http_method not in ("POST", "GET", "DELETE"):
            raise errors.GatewayRefusal(errors.METHOD_NOT_ALLOWED, ex.http_method)
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
        while True:
            message = await receive()
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

    def _decide(self, ex: _Exchange) -> None:
        assert ex.principal is not None
        policy = self.config.policy
        ex.decisions = tuple(decide(ex.principal, op, policy) if op is not None else None for op in ex.operations)

    def _denials(self, ex: _Exchange) -> dict[int, bytes | None]:
        """For each refused message, by index: its JSON-RPC error response (None for a notification)."""
        out: dict[int, bytes | None] = {}
        for index, decision in enumerate(ex.decisions):
            if decision is None or decision.allowed:
                continue
            op = ex.operations[index]
            assert op is not None
            out[index] = None if op.request_id is None and op.kind != "stream_open" else self._denial_body(op, decision)
        return out

    def _denial_body(self, op: mcp.Operation, decision: Decision) -> bytes:
        _, error = self._denial_error(op, decision)
        return orjson.dumps({"jsonrpc": "2.0", "id": op.request_id, "error": error})

    def _denial_error(self, op: mcp.Operation, decision: Decision) -> tuple[errors.Refusal, dict[str, Any]]:
        policy = self.config.policy
        if op.kind == "unknown":
            return errors.METHOD_NOT_FOUND, errors.error_object(errors.METHOD_NOT_FOUND, op.method)
        if policy.deny_detail == "minimal" and decision.hidden and op.target is not None:
            word = _UNKNOWN_WORD.get(op.kind, "item")
            message = f"Unknown {word}: {op.target}"
            return errors.UNKNOWN_TARGET, {"code": errors.UNKNOWN_TARGET.code, "message": message}
        if policy.deny_detail == "explain":
            return errors.FORBIDDEN, errors.error_object(errors.FORBIDDEN, f"{op.method} denied by {decision.reason}")
        return errors.FORBIDDEN, errors.error_object(errors.FORBIDDEN)

    # ---- answering ----------------------------------------------------------------------------

    async def _answer_denials(self, ex: _Exchange, send: ASGISend, denied: dict[int, bytes | None]) -> None:
        bodies = [b for b in denied.values() if b is not None]
        if not bodies:
            status, payload = 202, b""
        elif len(ex.messages) > 1:
            status, payload = 200, b"[" + b",".join(bodies) + b"]"
        else:
            op, decision = ex.operations[0], ex.decisions[0]
            assert op is not None and decision is not None
            status = self._denial_error(op, decision)[0].http_status
            payload = bodies[0]
        headers = [_JSON, (b"content-length", str(len(payload)).encode())] if payload else []
        await _respond(send, status, headers, payload)
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
        headers = [_JSON, (b"content-length", str(len(payload)).encode()), *(extra_headers or [])]
        await _respond(send, refusal.refusal.http_status, headers, payload)
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
        denied: dict[int, bytes | None],
        send: ASGISend,
    ) -> None:
        forwarded = [m for i, m in enumerate(ex.messages) if i not in denied]
        if denied:  # a 2025-03-26 batch of which only some messages may pass
            body = jsonrpc.dumps([m.raw for m in forwarded])
        state = RequestState(request_ids=tuple(m.id for m in forwarded if m.kind == "request"))
        inner_scope = dict(scope)
        inner_scope["headers"] = [
            (name, value)
            for name, value in scope["headers"]
            if name not in (b"authorization", b"content-length")
        ] + ([(b"content-length", str(len(body)).encode())] if ex.http_method == "POST" else [])
        inner_scope["mcp_gateway"] = state
        watcher = _ResponseWatcher(self, ex, state, send, [b for b in denied.values() if b is not None])
        sent = False

        async def replay() -> ASGIMessage:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body, only http.disconnect can come

        app = self._apps.get(ex.upstream.path, self.app)
        try:
            await app(inner_scope, replay, watcher.send)
        except Exception:
            log.exception("error in the wrapped app for %s", ex.upstream.name)
            state.upstream_error = state.upstream_error or "exception"
            if not watcher.response_started:
                only_id = state.request_ids[0] if len(state.request_ids) == 1 else None
                payload = errors.error_body(errors.INTERNAL, only_id)
                await _respond(send, 500, [_JSON, (b"content-length", str(len(payload)).encode())], payload)
                watcher.status = 500
            elif not watcher.finished:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if not watcher.audited:
                watcher.audit()

    # ---- audit --------------------------------------------------------------------------------

    def _audit_all(self, ex: _Exchange, status: int, upstream_error: str | None = None) -> None:
        """One event per message (or one for a GET/DELETE), with its own decision."""
        for index, op in enumerate(ex.operations):
            decision = ex.decisions[index] if index < len(ex.decisions) else None
            if op is None or decision is None:
                continue
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
                status=status,
                arguments=redact_arguments(op.arguments, self.config.audit.redact_keys,
                                           self.config.audit.max_arguments_bytes),
            )
            self._record(ex, event, op.method if op.kind not in ("notification", "client_response") else op.kind)

    def _record(self, ex: _Exchange, event: AuditEvent, method: str) -> None:
        elapsed = time.perf_counter() - ex.started
        principal = ex.principal
        event.duration_ms = round(elapsed * 1000, 3)
        event.connection_id = ex.session_id or uuid.uuid4().hex
        event.user_id = principal.subject if principal else None
        event.client_id = principal.client_id if principal else None
        event.upstream = ex.upstream.name
        event.source_ip = ex.source_ip
        event.protocol_version = ex.protocol_version
        event.http_method = ex.http_method
        metrics = self.runtime.metrics
        metrics.requests.labels(ex.upstream.name, method_label(method), event.result).inc()
        metrics.request_seconds.labels(ex.upstream.name).observe(elapsed)
        try:
            self.runtime.audit.record(event)
        except AuditUnavailable:
            metrics.audit_refused.inc()
            log.error("audit queue full: event %s could not be queued", event.id)
        metrics.audit_queue_depth.set(self.runtime.audit.depth)
        log.info("%s %s %s %s %s", event.id, ex.upstream.name, event.operation, event.result, event.reason)

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

    async def _protected_resource_metadata(self, path: str, send: ASGISend) -> None:
        """RFC 9728 metadata, built from `public_url` (never from the request's Host)."""
        suffix = path[len(self._metadata_prefix):]
        prefix = self.config.public_path_prefix
        upstream = self._routes.get(suffix[len(prefix):] if suffix.startswith(prefix) else "")
        if upstream is None and len(self.config.upstreams) == 1 and suffix in ("", "/"):
            upstream = self.config.upstreams[0]
        if upstream is None:
            payload = b'{"error":"not_found"}'
            await _respond(send, 404, [_JSON, (b"content-length", str(len(payload)).encode())], payload)
            return
        payload = orjson.dumps({
            "resource": self.config.resource_url(upstream),
            "authorization_servers": [self.config.public_url],
            "bearer_methods_supported": ["header"],
            "resource_name": upstream.name,
        })
        await _respond(send, 200, [_JSON, (b"content-length", str(len(payload)).encode())], payload)


class _ResponseWatcher:
    """Sits on the response as it streams back: learns, tells the client about cut-off calls, audits once.

    Bytes pass through as they come. Only two cases hold anything back: a
    2025-03-26 batch of which some members were refused (their errors are
    merged into the upstream's JSON array, or appended as SSE events), and a
    202 for a batch whose forwarded members were all notifications (the
    refused requests still get their answers).
    """

    def __init__(
        self, middleware: MCPSecurityMiddleware, ex: _Exchange, state: RequestState, send: ASGISend,
        extra_errors: list[bytes],
    ) -> None:
        self._mw = middleware
        self._ex = ex
        self._state = state
        self._send = send
        self._extra = extra_errors
        self.status = 0
        self.response_started = False
        self.finished = False
        self.audited = False
        self._sse = False
        self._copy: list[bytes] | None = None  # a JSON body kept to learn from or merge into
        self._copied = 0
        self._decoder: sse.Decoder | None = None
        self._answered: set[str | None] = set()
        self._list_ids = {op.request_id for op in ex.operations if op is not None and op.method == "tools/list"}
        self._held_start: ASGIMessage | None = None
        self._replacement: bytes | None = None

    async def send(self, message: ASGIMessage) -> None:
        if message["type"] == "http.response.start":
            await self._start(message)
        elif message["type"] == "http.response.body":
            await self._body(message)
        else:
            await self._send(message)

    async def _start(self, message: ASGIMessage) -> None:
        self.response_started = True
        self.status = message["status"]
        headers = list(message.get("headers", []))
        content_type = next((v for n, v in headers if n.lower() == b"content-type"), b"").lower()
        self._sse = content_type.startswith(b"text/event-stream")
        if self._sse and (self._state.request_ids or self._list_ids):
            self._decoder = sse.Decoder()
        elif content_type.startswith(b"application/json") and (self._list_ids or self._extra):
            self._copy = []
        if self._ex.http_method == "GET":
            self.audit()  # a legacy GET stream can stay open for hours: record it when it opens
        if self._extra and self._copy is not None:
            self._held_start = {**message, "headers": [(n, v) for n, v in headers if n.lower() != b"content-length"]}
            return
        if self._extra and self.status == 202:
            self._replacement = b"[" + b",".join(self._extra) + b"]"
            self.status = 200
            await self._send({"type": "http.response.start", "status": 200,
                              "headers": [_JSON, (b"content-length", str(len(self._replacement)).encode())]})
            return
        await self._send(message)

    async def _body(self, message: ASGIMessage) -> None:
        chunk: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if self._replacement is not None:
            if not more:
                await self._finish(self._replacement)
            return
        if self._copy is not None and (self._held_start is not None or self._copied <= _MAX_INSPECTED_BYTES):
            self._copy.append(chunk)
            self._copied += len(chunk)
        if self._decoder is not None and chunk:
            self._inspect_events(chunk)
        if self._held_start is not None:
            if not more:
                payload = self._merged_json()
                await self._send({**self._held_start, "headers": [
                    *self._held_start["headers"], (b"content-length", str(len(payload)).encode())]})
                await self._finish(payload)
            return
        if more:
            await self._send(message)
            return
        await self._finish(chunk + self._sse_tail())

    async def _finish(self, last: bytes) -> None:
        await self._send({"type": "http.response.body", "body": last, "more_body": False})
        self.finished = True
        if self._copy is not None and self._copied <= _MAX_INSPECTED_BYTES:
            self._learn_from_json(b"".join(self._copy))
        self.audit()

    def _sse_tail(self) -> bytes:
        """Events to add as an SSE stream ends: errors for calls the upstream cut short, and refused batch members."""
        if not self._sse:
            return b""
        out = b""
        if self._state.upstream_error is not None:
            for request_id in self._state.request_ids:
                if _id_text(request_id) not in self._answered:
                    body = errors.error_body(errors.UPSTREAM_UNAVAILABLE, request_id, self._state.upstream_error)
                    out += sse.encode(body.decode(), event="message")
        for body in self._extra:
            out += sse.encode(body.decode(), event="message")
        return out

    def _merged_json(self) -> bytes:
        assert self._copy is not None
        raw = b"".join(self._copy)
        try:
            answered = orjson.loads(raw) if raw else []
        except orjson.JSONDecodeError:
            answered = []
        items = answered if isinstance(answered, list) else [answered]
        return orjson.dumps([*items, *(orjson.loads(b) for b in self._extra)])

    def _inspect_events(self, chunk: bytes) -> None:
        assert self._decoder is not None
        try:
            events = self._decoder.feed(chunk)
        except sse.EventTooLarge:
            self._decoder = None
            return
        for event in events:
            if event.is_message and event.data is not None:
                try:
                    self._observe(orjson.loads(event.data))
                except orjson.JSONDecodeError:
                    continue

    def _learn_from_json(self, raw: bytes) -> None:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        for message in value if isinstance(value, list) else [value]:
            self._observe(message)

    def _observe(self, message: Any) -> None:
        """Note a response going back: which call it answers, and tool schemas from a tools/list result."""
        if not isinstance(message, dict) or ("result" not in message and "error" not in message):
            return
        self._answered.add(_id_text(message.get("id")))
        result = message.get("result")
        if message.get("id") in self._list_ids and isinstance(result, dict):
            self._mw.runtime.learn_tools(self._ex.upstream.name, result)

    def audit(self) -> None:
        if not self.audited:
            self.audited = True
            self._mw._audit_all(self._ex, self.status or 500, self._state.upstream_error)


async def _respond(send: ASGISend, status: int, headers: list[tuple[bytes, bytes]], payload: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def _first(headers: Mapping[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None


def _id_text(value: jsonrpc.JsonRpcId) -> str | None:
    return None if value is None else str(value)
