"""The admin API: the audit trail, token sessions, approvals, role assignments and tool pins, as JSON, for
principals holding the right scope.

    GET    /admin/audit?...                   the audit trail                      audit.read_scope
    GET    /admin/sessions                    token sessions that have not expired sessions.admin_scope
    DELETE /admin/sessions/<jti>              revoke that token: refused on its next request
    GET    /admin/approvals                   approvals pending and recently decided  admin.approvals_scope
    POST   /admin/approvals/<id>/approve      {"reason": ...}: as an approver the policy names
    POST   /admin/approvals/<id>/deny         {"reason": ...}
    GET    /admin/roles[?subject=S]           runtime role assignments             admin.roles_scope
    POST   /admin/roles                       {"subject", "role", "client_id"?, "expires_in_s"?, "reason"?}
    DELETE /admin/roles/<id>                  withdraw an assignment
    GET    /admin/tools[?upstream=U]          tool pins: pinned, last seen, status  admin.tools_scope
    POST   /admin/tools/<upstream>/<tool>/approve  {"hash"?}: pin the definition last seen (if it is "hash")
    POST   /admin/tools/<upstream>/pin        pin every definition last seen

Owns those endpoints: authentication (a token for the gateway's admin
resource, `{public_url}/admin`, or for any of its upstreams), the scope
check, reading the request, and an audit event for every access, refused or
not, naming the operator; the actions themselves are `operators`'.
`mcp-gateway sessions|approvals|roles|tools` are clients of these endpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson

from gateway import errors, operators
from gateway.audit.event import AuditEvent
from gateway.audit.writer import AuditUnavailable
from gateway.auth.authenticator import AuthFailed
from gateway.exchange import read_body
from gateway.types import ASGIReceive, ASGIScope, ASGISend, header_values, send_json

if TYPE_CHECKING:
    from gateway.principal import Principal
    from gateway.runtime import Runtime

PREFIX = "/admin/"
_MAX_BODY = 64 * 1024
log = logging.getLogger("gateway")
Handler = Callable[["Runtime", "Principal", str, dict[str, Any], dict[str, str]], Awaitable[operators.Done]]


# (resource, has an id, action after the id, method) -> handler(runtime, operator, id, body, query)
_ROUTES: dict[tuple[str, bool, str, str], Handler] = {
    ("audit", False, "", "GET"): lambda rt, _p, _i, _b, q: operators.read_audit(rt, q),
    ("sessions", False, "", "GET"): lambda rt, _p, _i, _b, _q: operators.list_sessions(rt),
    ("sessions", True, "", "DELETE"): lambda rt, _p, i, _b, _q: operators.revoke_session(rt, i),
    ("approvals", False, "", "GET"): lambda rt, _p, _i, _b, _q: operators.list_approvals(rt),
    ("approvals", True, "approve", "POST"): lambda rt, p, i, b, _q: operators.decide_approval(
        rt, p, i, approve=True, reason=_text(b, "reason")),
    ("approvals", True, "deny", "POST"): lambda rt, p, i, b, _q: operators.decide_approval(
        rt, p, i, approve=False, reason=_text(b, "reason")),
    ("roles", False, "", "GET"): lambda rt, _p, _i, _b, q: operators.list_roles(rt, q.get("subject")),
    ("roles", False, "", "POST"): lambda rt, p, _i, b, _q: operators.assign_role(
        rt, p, subject=_text(b, "subject"), role=_text(b, "role"), client_id=_text(b, "client_id") or None,
        ttl_s=_seconds(b, "expires_in_s"), reason=_text(b, "reason")),
    ("roles", True, "", "DELETE"): lambda rt, _p, i, _b, _q: operators.revoke_role(rt, i),
    ("tools", False, "", "GET"): lambda rt, _p, _i, _b, q: operators.list_tools(rt, q.get("upstream")),
    ("tools", True, "approve", "POST"): lambda rt, p, i, b, _q: operators.approve_tool(
        rt, p, *_tool_of(i), expected=_text(b, "hash")),
    ("tools", True, "pin", "POST"): lambda rt, p, i, _b, _q: operators.pin_tools(rt, p, i),
}


def _route(path: str) -> tuple[str, str | None, str] | None:
    """(resource, id, action) of an API path, or None when it is none of the API's."""
    parts = path[len(PREFIX):].split("/") if path.startswith(PREFIX) else []
    if len(parts) > 3 and parts[0] == "tools":  # tools/<upstream>/<tool>/approve: the id is "<upstream>/<tool>"
        parts = [parts[0], "/".join(parts[1:-1]), parts[-1]]
    if not parts or parts[0] not in ("audit", "sessions", "approvals", "roles", "tools") or len(parts) > 3:
        return None
    if len(parts) == 1:
        return parts[0], None, ""
    return (parts[0], parts[1], parts[2] if len(parts) == 3 else "") if parts[1] else None


def _tool_of(item: str) -> tuple[str, str]:
    """(upstream, tool) of a tools/<upstream>/<tool>/approve path's id (a tool's name may hold "/")."""
    upstream, _, tool = item.partition("/")
    return upstream, tool


def serves(path: str) -> bool:
    return _route(path) is not None


async def serve(runtime: Runtime, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
    """Authenticate, check the scope, run the action; answer and audit whatever happens."""
    config = runtime.config
    started = time.perf_counter()
    method = scope.get("method", "")
    route = _route(scope["path"])
    assert route is not None
    resource, item, action = route
    event = AuditEvent(result="allowed", reason="", operation=f"admin/{resource}" + (
        f":{method.lower()}" if item is not None or method != "GET" else ""), http_method=method,
        source_ip=(scope.get("client") or [None])[0])
    status, payload, challenge = 200, b"", None
    try:
        handler = _ROUTES.get((resource, item is not None, action, method))
        if handler is None:
            raise errors.GatewayRefusal(errors.METHOD_NOT_ALLOWED, f"{method} {scope['path']}")
        needed = operators.scope_for(config, resource)
        audiences = (config.admin_resource, *(config.resource_url(u) for u in config.upstreams))
        principal = await runtime.authenticator.authenticate(header_values(scope), b"", audiences, "/admin")
        event.user_id, event.client_id = principal.subject, principal.client_id
        if principal.claims.get("purpose") == "console-login":  # a sign-in link, good once, for the console only
            raise errors.GatewayRefusal(errors.FORBIDDEN, "a console sign-in link is not an API token",
                                        reason="admin:login_token")
        if needed not in principal.scopes:
            challenge = runtime.authenticator.challenge("/admin", "insufficient_scope", scope=needed)
            raise errors.GatewayRefusal(errors.FORBIDDEN, f"needs scope {needed}", reason=f"admin:no_scope:{needed}")
        body = await _json_body(receive, config.limits.client_body_timeout_s) if method == "POST" else {}
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        done = await handler(runtime, principal, item or "", body, query)
        payload, event.reason = orjson.dumps(done.result), done.reason
    except AuthFailed as failed:
        status, challenge = failed.refusal.http_status, failed.challenge
        event.result, event.reason = "auth_failed", failed.reason
        payload = errors.error_body(failed.refusal, None, failed.detail)
    except errors.GatewayRefusal as refusal:
        status = refusal.refusal.http_status
        event.result, event.reason = refusal.refusal.audit_result, refusal.reason
        payload = errors.error_body(refusal.refusal, None, refusal.detail)
    except Exception:  # a bug, or a store failing in a way it does not name: logged, answered, audited
        log.exception("admin API error")
        status, event.result, event.reason = 500, "error", "admin:exception"
        payload = errors.error_body(errors.INTERNAL)
    headers = [(b"www-authenticate", challenge.encode())] if challenge is not None else []
    event.status = status
    event.duration_ms = round((time.perf_counter() - started) * 1000, 3)
    try:
        runtime.audit.record(event)
        await runtime.audit.written()
    except AuditUnavailable as unavailable:  # the change is made: the operator is told so, the log says this
        log.error("admin answer %s sent before its audit event %s was on record: %s", event.reason, event.id,
                  unavailable)
    await send_json(send, status, payload, headers)


async def _json_body(receive: ASGIReceive, timeout_s: float) -> dict[str, Any]:
    body = await read_body(receive, limit=_MAX_BODY, timeout_s=timeout_s)
    try:
        parsed = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError:
        raise errors.GatewayRefusal(errors.PARSE_ERROR, reason="admin:bad_body") from None
    if not isinstance(parsed, dict):
        raise errors.GatewayRefusal(errors.INVALID_PARAMS, "the body must be a JSON object", reason="admin:bad_body")
    return parsed


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:  # absent, or null: not given
        return ""
    if not isinstance(value, str):
        raise errors.GatewayRefusal(errors.INVALID_PARAMS, f"{key} must be a string", reason=f"admin:bad_{key}")
    return value


def _seconds(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise errors.GatewayRefusal(errors.INVALID_PARAMS, f"{key} must be a number of seconds",
                                    reason=f"admin:bad_{key}")
    return float(value)
