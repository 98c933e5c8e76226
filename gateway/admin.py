"""`GET /admin/audit`: the audit trail as JSON, for principals holding the configured read scope.

Owns that endpoint: authentication (a token for the gateway's admin resource,
`{public_url}/admin`, or for any of its upstreams), the scope check, the
query, and an audit event for the access itself.
"""

from __future__ import annotations

import contextlib
import time
from urllib.parse import parse_qsl

import orjson

from gateway import errors
from gateway.audit import AuditEvent, AuditUnavailable
from gateway.audit.reading import BadQuery, query_from, reader_for
from gateway.auth import AuthFailed
from gateway.runtime import Runtime
from gateway.types import ASGIScope, ASGISend, header_values, send_json

PATH = "/admin/audit"


async def serve_audit(runtime: Runtime, scope: ASGIScope, send: ASGISend) -> None:
    config = runtime.config
    started = time.perf_counter()
    event = AuditEvent(result="allowed", reason="admin:audit_read", operation="admin/audit",
                       http_method=scope.get("method"), source_ip=(scope.get("client") or [None])[0])
    status, payload, challenge = 200, b"", None
    try:
        if scope.get("method") != "GET":
            raise errors.GatewayRefusal(errors.METHOD_NOT_ALLOWED, scope.get("method", ""))
        audiences = (f"{config.public_url}/admin", *(config.resource_url(u) for u in config.upstreams))
        principal = await runtime.authenticator.authenticate(header_values(scope), b"", audiences, "/admin")
        event.user_id, event.client_id = principal.subject, principal.client_id
        needed = config.audit.read_scope
        if needed not in principal.scopes:
            challenge = runtime.authenticator.challenge("/admin", "insufficient_scope", scope=needed)
            raise errors.GatewayRefusal(errors.FORBIDDEN, f"needs scope {needed}", reason="admin:no_read_scope")
        params = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        try:
            query = query_from(params)
            reader = reader_for(config.audit, params.get("sink"))
        except BadQuery as exc:
            raise errors.GatewayRefusal(errors.INVALID_PARAMS, str(exc), reason="admin:bad_query") from None
        try:
            events = await reader.query(query)
        finally:
            await reader.close()
        payload = orjson.dumps({"sink": reader.name, "count": len(events), "events": events})
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
