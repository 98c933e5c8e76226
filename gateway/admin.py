"""The admin API: the audit trail and token sessions, as JSON, for principals holding the right scope.

    GET    /admin/audit?...          the audit trail (scope: audit.read_scope)
    GET    /admin/sessions           token sessions that have not expired (scope: sessions.admin_scope)
    DELETE /admin/sessions/<jti>     revoke that token: refused on its next request (same scope)

Owns those endpoints: authentication (a token for the gateway's admin
resource, `{public_url}/admin`, or for any of its upstreams), the scope
check, the work itself, and an audit event for every access, refused or not.
`mcp-gateway sessions list|revoke` are clients of the sessions endpoints.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

import orjson

from gateway import errors
from gateway.audit.event import AuditEvent
from gateway.audit.reading import BadQuery, query_from, reader_for
from gateway.audit.writer import AuditUnavailable
from gateway.auth.authenticator import AuthFailed
from gateway.runtime import Runtime
from gateway.types import ASGIScope, ASGISend, header_values, send_json

AUDIT_PATH = "/admin/audit"
SESSIONS_PATH = "/admin/sessions"


def serves(path: str) -> bool:
    return path in (AUDIT_PATH, SESSIONS_PATH) or path.startswith(SESSIONS_PATH + "/")


async def serve(runtime: Runtime, scope: ASGIScope, send: ASGISend) -> None:
    path, method = scope["path"], scope.get("method", "")
    if path == AUDIT_PATH:
        await _guarded(runtime, scope, send, "admin/audit", runtime.config.audit.read_scope,
                       {"GET": lambda: _audit(runtime, scope)})
    elif path == SESSIONS_PATH:
        await _guarded(runtime, scope, send, "admin/sessions", runtime.config.sessions.admin_scope,
                       {"GET": lambda: _sessions(runtime)})
    else:
        token_id = path[len(SESSIONS_PATH) + 1:]
        await _guarded(runtime, scope, send, f"admin/sessions:{method.lower()}",
                       runtime.config.sessions.admin_scope, {"DELETE": lambda: _revoke(runtime, token_id)})


async def _guarded(runtime: Runtime, scope: ASGIScope, send: ASGISend, operation: str, needed: str,
                   handlers: dict[str, Callable[[], Awaitable[tuple[bytes, str]]]]) -> None:
    """Authenticate, check `needed`, run the handler for the method; answer and audit whatever happens."""
    config = runtime.config
    started = time.perf_counter()
    method = scope.get("method", "")
    event = AuditEvent(result="allowed", reason="", operation=operation, http_method=method,
                       source_ip=(scope.get("client") or [None])[0])
    status, payload, challenge = 200, b"", None
    try:
        handler = handlers.get(method)
        if handler is None:
            raise errors.GatewayRefusal(errors.METHOD_NOT_ALLOWED, method)
        audiences = (f"{config.public_url}/admin", *(config.resource_url(u) for u in config.upstreams))
        principal = await runtime.authenticator.authenticate(header_values(scope), b"", audiences, "/admin")
        event.user_id, event.client_id = principal.subject, principal.client_id
        if needed not in principal.scopes:
            challenge = runtime.authenticator.challenge("/admin", "insufficient_scope", scope=needed)
            raise errors.GatewayRefusal(errors.FORBIDDEN, f"needs scope {needed}", reason=f"admin:no_scope:{needed}")
        payload, event.reason = await handler()
    except AuthFailed as failed:
        status, challenge = failed.refusal.http_status, failed.challenge
        event.result, event.reason = "auth_failed", failed.reason
        payload = errors.error_body(failed.refusal, None, failed.detail)
    except errors.GatewayRefusal as refusal:
        status = refusal.refusal.http_status
        event.result, event.reason = refusal.refusal.audit_result, refusal.reason
        payload = errors.error_body(refusal.refusal, None, refusal.detail)
    headers = [(b"www-authenticate", challenge.encode())] if challenge is not None else []
    event.status = status
    event.duration_ms = round((time.perf_counter() - started) * 1000, 3)
    with contextlib.suppress(AuditUnavailable):  # counted by the audit log; the caller still gets its answer
        runtime.audit.record(event)
    await send_json(send, status, payload, headers)


async def _audit(runtime: Runtime, scope: ASGIScope) -> tuple[bytes, str]:
    params = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    try:
        query = query_from(params)
        reader = reader_for(runtime.config.audit, params.get("sink"))
    except BadQuery as exc:
        raise errors.GatewayRefusal(errors.INVALID_PARAMS, str(exc), reason="admin:bad_query") from None
    try:
        events = await reader.query(query)
    finally:
        await reader.close()
    return orjson.dumps({"sink": reader.name, "count": len(events), "events": events}), "admin:audit_read"


async def _sessions(runtime: Runtime) -> tuple[bytes, str]:
    tokens = sorted(await runtime.sessions.tokens(), key=lambda t: t.issued_at)
    return orjson.dumps({"count": len(tokens), "sessions": [t.as_dict() for t in tokens]}), "admin:sessions_list"


async def _revoke(runtime: Runtime, token_id: str) -> tuple[bytes, str]:
    known = {t.token_id: t for t in await runtime.sessions.tokens()}.get(token_id)
    if known is None:
        raise errors.GatewayRefusal(errors.NOT_FOUND, f"no token session {token_id!r}", reason="admin:no_such_session")
    await runtime.sessions.revoke(token_id, known.expires_at)
    runtime.metrics.revocations.inc()
    return orjson.dumps({"revoked": token_id}), f"admin:revoked:{token_id}"
