"""Forwarding: exactly what was decided goes to the wrapped app, and its answer comes back through the inspector.

Owns the request the upstream receives: only the allowed members of a batch,
serialised anew from the decoded messages (never the client's bytes, which
another parser could read differently), resource URIs in the normalised form
they were decided in, the client's token removed, an `X-MCP-Identity` only
ever set by the gateway, and (when tracing) the gateway's W3C trace context in
place of the client's. Owns running the wrapped app (an in-process MCP app or
`UpstreamProxy`) with the `ResponseInspector` as its `send`, recording the
exchange once its answer's status is known (before the client sees the last
byte), and answering the upstream on the client's behalf when a server->client
request is withheld from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from gateway import errors, jsonrpc
from gateway.auth.authenticator import bearer_token
from gateway.inspect import ResponseInspector
from gateway.policy.engine import roles_for
from gateway.response_rules import Gateway, ResponseRules
from gateway.types import ASGIApp, ASGIMessage, ASGIReceive, ASGIScope, ASGISend, RequestState

if TYPE_CHECKING:
    from collections.abc import Mapping

    from gateway.audit.recording import Recorder
    from gateway.config import Config
    from gateway.exchange import Exchange
    from gateway.handles import Handles
    from gateway.mcp import Operation
    from gateway.refusals import Denial
    from gateway.runtime import Runtime

log = logging.getLogger("gateway")

_JSON = (b"content-type", b"application/json")
_NOT_FORWARDED = frozenset({b"authorization", b"content-length", b"x-mcp-identity"})
# When the gateway traces, the upstream gets the gateway's trace context in place of the client's.
_NOT_FORWARDED_TRACED = _NOT_FORWARDED | {b"traceparent", b"tracestate"}


class Forwarder:
    """Forwards decided requests to the app that serves each upstream path."""

    def __init__(self, app: ASGIApp, apps: Mapping[str, ASGIApp], config: Config, runtime: Runtime,
                 recorder: Recorder, handles: Handles) -> None:
        self._app = app
        self._config = config
        self._apps = dict(apps)
        self._runtime = runtime
        self._recorder = recorder
        self._handles = handles
        self._background: set[asyncio.Task[None]] = set()

    async def forward(self, ex: Exchange, receive: ASGIReceive, body: bytes, denied: dict[int, Denial],
                      send: ASGISend, gateway: Gateway) -> None:
        runtime = self._runtime
        forwarded = [i for i in range(len(ex.messages)) if i not in denied]
        # The client's token stays here; an X-MCP-Identity only ever comes from the gateway.
        traced = ex.trace.upstream(ex)  # the W3C context naming the hop's span; empty when not tracing
        dropped = _NOT_FORWARDED_TRACED if traced else _NOT_FORWARDED
        headers = [(n, v) for n, v in ex.scope["headers"] if n not in dropped]
        if traced:
            headers += [(name.encode(), value.encode()) for name, value in traced.items()]
        if ex.upstream.identity_header and ex.principal is not None:
            policy = ex.policy or runtime.policy.for_upstream(ex.upstream.name)
            identity = runtime.authenticator.identity_token(
                ex.principal, roles_for(ex.principal, policy),
                ex.upstream.url or self._config.resource_url(ex.upstream))
            headers.append((b"x-mcp-identity", identity.encode()))
        body, headers = _rewritten(ex, forwarded, body, headers, traced)
        if ex.http_method == "POST":
            headers.append((b"content-length", str(len(body)).encode()))
        rules = ResponseRules(ex, forwarded, gateway, extra=[d.body for d in denied.values() if d.answerable])
        state = ex.state
        state.request_ids = rules.request_ids
        state.caller = ex.caller
        if ex.upstream.oauth is not None and ex.upstream.oauth.grant == "token_exchange":
            state.caller_token = _bearer_token(ex.scope)
        inner_scope = {**ex.scope, "headers": headers, "mcp_gateway": state}
        audited = False
        forwarded_at = time.perf_counter()

        def audit(status: int) -> None:
            nonlocal audited
            if audited:
                return
            audited = True
            metrics = runtime.metrics
            if state.upstream_error is not None:
                metrics.upstream_errors.labels(ex.upstream.name, state.upstream_error).inc()
            if inspector.started_at is not None:
                upstream_s = inspector.started_at - forwarded_at
                metrics.child(metrics.upstream_seconds, ex.upstream.name).observe(upstream_s)
                metrics.child(metrics.gateway_seconds, ex.upstream.name).observe(
                    max(0.0, time.perf_counter() - ex.started - upstream_s))
            self._recorder.exchange(ex, status, state.upstream_error)

        async def complete(status: int) -> None:
            """On record (and, under audit.durability: written, on every sink) before the client can see the
            answer end."""
            audit(status)
            await self._recorder.written(ex)

        inspector = ResponseInspector(send, rules, max_bytes=self._config.limits.max_inspected_bytes,
                                      upstream_error=lambda: state.upstream_error, on_complete=complete,
                                      # a legacy GET stream can stay open for hours: it is recorded when it opens
                                      complete_on_start=ex.http_method == "GET",
                                      before_start=lambda status, headers: self._handles.track_session(
                                          ex, status, headers))
        try:
            try:
                await self._app_for(ex)(inner_scope, _replay(body, receive), inspector.send)
            except Exception:
                if not inspector.withheld:  # else the app only passed on the inspector's own failure
                    log.exception("error in the wrapped app for %s", ex.upstream.name)
                    state.upstream_error = state.upstream_error or "exception"
            finally:
                ex.trace.upstream_done(inspector.status or 500, state.upstream_error)
            await inspector.close()
        finally:
            audit(inspector.status or 500)  # if cancelled (the client went away) before that: on record still

    def tell_upstream(self, ex: Exchange, op: Operation) -> None:
        """Answer a refused server->client request to the upstream on the client's behalf, so it does not wait."""
        error = errors.error_object(errors.FORBIDDEN, f"{op.method} is not allowed by the gateway's policy")
        body = orjson.dumps({"jsonrpc": "2.0", "id": op.request_id, "error": error})
        keep = (b"mcp-session-id", b"mcp-protocol-version", b"host", b"user-agent")
        headers = [(n, v) for n, v in ex.scope["headers"] if n in keep]
        headers += [_JSON, (b"accept", b"application/json, text/event-stream"),
                    (b"content-length", str(len(body)).encode())]
        inner = {**ex.scope, "method": "POST", "headers": headers, "query_string": b"",
                 "mcp_gateway": RequestState(caller=ex.state.caller, caller_token=ex.state.caller_token),
                 "path": ex.upstream.path}
        app = self._app_for(ex)

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

    def _app_for(self, ex: Exchange) -> ASGIApp:
        return self._apps.get(ex.upstream.path, self._app)


def _rewritten(ex: Exchange, forwarded: list[int], body: bytes, headers: list[tuple[bytes, bytes]],
               traced: Mapping[str, str]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The body and headers to forward: exactly what was decided, serialised anew from the decoded messages
    (never the client's bytes, which another parser could read differently: a repeated key, an escape), only
    the allowed members of a batch, resource URIs in the normalised form they were decided in, and the
    gateway's trace context (`traced`) in place of a client's `_meta.traceparent` (SEP-414)."""
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
    if traced:
        messages = [_with_trace_context(raw, traced) for raw in messages]
    return jsonrpc.dumps(messages if len(ex.messages) > 1 else messages[0]), headers


def _with_trace_context(raw: dict[str, Any], traced: Mapping[str, str]) -> dict[str, Any]:
    """`raw` with `traced` in place of the trace context a client put in its `params._meta`, if it put one:
    an upstream that reads it there (the SDKs do) then sees the gateway's span as the parent."""
    params = raw.get("params")
    if not isinstance(params, dict) or not isinstance(meta := params.get("_meta"), dict) or "traceparent" not in meta:
        return raw
    kept = {k: v for k, v in meta.items() if k not in ("traceparent", "tracestate")}
    return {**raw, "params": {**params, "_meta": {**kept, **traced}}}


def _bearer_token(scope: ASGIScope) -> str | None:
    """The caller's token (the authenticator has checked there is exactly one, and verified it)."""
    value = next((v for n, v in scope["headers"] if n == b"authorization"), None)
    return None if value is None else bearer_token(value.decode("latin-1"))


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
