"""The console as one ASGI app: which path is which page or form, and what every request goes through.

    static    /admin/static/<file>    the stylesheet and the script, no session needed
    sign-in   GET /admin/login?token= a page asking to sign in (opening the link spends nothing); its form,
              POST /admin/login, exchanges the one-time token for a session cookie, then 303 to
              /admin/; without a token, the signed-out page
              POST /admin/logout      revoke the session, clear the cookie
    pages     GET /admin/, /admin/ui/<page>[/...]     (`pages`)
    forms     POST /admin/ui/<page>/[<id>/]<action>  (`actions`)

For a page or a form, in order: the session cookie is authenticated (none, expired or revoked: 303 to the
signed-out page, or 401 for the live tail's JSON); a POST must be a urlencoded form with no field given twice,
sent from the console's own origin and carrying the session's CSRF token (else 403); the operator must hold the
part's scope (else 403). Every answer carries the security headers (`render`), and every request but static
files, the signed-out page and the live tail's successful polls is one audit event naming the operator (as
the admin API's are), refused ones included.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from gateway import errors, operators
from gateway.audit.event import AuditEvent
from gateway.audit.writer import AuditUnavailable
from gateway.auth.authenticator import AuthFailed
from gateway.console import actions, pages, session
from gateway.console.render import Answer, Page, document, json_answer, redirect, static_file
from gateway.exchange import read_body
from gateway.types import header_values

if TYPE_CHECKING:
    from collections.abc import Mapping

    from gateway.principal import Principal
    from gateway.runtime import Runtime
    from gateway.types import ASGIReceive, ASGIScope, ASGISend

log = logging.getLogger("gateway.console")
ROOT, UI, STATIC, LOGOUT = "/admin/", "/admin/ui/", "/admin/static/", "/admin/logout"
_MAX_FORM = 32 * 1024
_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
Handler = Callable[[Page], Awaitable[Answer]]


@dataclass(frozen=True, slots=True)
class Route:
    handler: Handler
    part: str  # whose scope it needs: admin, audit, sessions, approvals, roles, tools (`operators.scope_for`)
    operation: str  # the audit event's
    json: bool = False  # answers (and refusals) as JSON
    quiet: bool = False  # audited only when refused


# (method, path under /admin/ui/ with an id as *) -> route; "" is the overview at /admin/
ROUTES: dict[tuple[str, str], Route] = {
    ("GET", ""): Route(pages.overview, "admin", "console/overview:view"),
    ("GET", "audit"): Route(pages.audit, "audit", "console/audit:view"),
    ("GET", "audit/tail"): Route(pages.audit_tail, "audit", "console/audit:tail", json=True, quiet=True),
    ("GET", "approvals"): Route(pages.approvals, "approvals", "console/approvals:view"),
    ("POST", "approvals/*/approve"): Route(actions.approve, "approvals", "console/approvals:approve"),
    ("POST", "approvals/*/deny"): Route(actions.deny, "approvals", "console/approvals:deny"),
    ("GET", "sessions"): Route(pages.sessions, "sessions", "console/sessions:view"),
    ("POST", "sessions/*/revoke"): Route(actions.revoke_session, "sessions", "console/sessions:revoke"),
    ("GET", "roles"): Route(pages.roles, "roles", "console/roles:view"),
    ("POST", "roles/assign"): Route(actions.assign_role, "roles", "console/roles:assign"),
    ("POST", "roles/*/revoke"): Route(actions.revoke_role, "roles", "console/roles:revoke"),
    ("GET", "tools"): Route(pages.tools, "tools", "console/tools:view"),
    ("POST", "tools/*/approve"): Route(actions.approve_tool, "tools", "console/tools:approve"),
    ("POST", "tools/*/pin"): Route(actions.pin_tools, "tools", "console/tools:pin"),
    ("GET", "upstreams"): Route(pages.upstreams, "admin", "console/upstreams:view"),
    ("GET", "policy"): Route(pages.policy, "admin", "console/policy:view"),
    ("POST", "policy/explain"): Route(actions.explain, "admin", "console/policy:explain"),
}


def serves(path: str) -> bool:
    return path == ROOT or path.startswith((UI, STATIC)) or path in (session.LOGIN_PATH, LOGOUT)


def _place(path: str) -> tuple[str, str]:
    """(route key, the id it names) of a page or form path."""
    parts = [] if path == ROOT else path[len(UI):].split("/")
    if len(parts) == 3:
        return f"{parts[0]}/*/{parts[2]}", parts[1]
    return "/".join(parts), ""


def _fields(text: str) -> dict[str, str]:
    """A query string or urlencoded form, each field at most once (a repeated one is refused, not chosen)."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False, errors="strict", max_num_fields=64)
    except (UnicodeDecodeError, ValueError):
        raise errors.GatewayRefusal(errors.INVALID_PARAMS, "unreadable fields", reason="console:bad_fields") from None
    fields = dict(pairs)
    if len(fields) != len(pairs):
        repeated = sorted({k for k, _ in pairs if sum(1 for n, _ in pairs if n == k) > 1})
        raise errors.GatewayRefusal(errors.INVALID_PARAMS, f"{', '.join(repeated)} given more than once",
                                    reason="console:repeated_field")
    return fields


class Console:
    """The admin console of one gateway runtime; its MAC key is derived once, here."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._key = session.ConsoleKey(runtime.signing_key)

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        path, method = scope["path"], scope.get("method", "")
        if path.startswith(STATIC):
            found = static_file(path[len(STATIC):]) if method == "GET" else None
            await _send(send, found or document("message.html", 404, title="Not found", text="No such file."))
            return
        started = time.perf_counter()
        event = AuditEvent(result="allowed", reason="", operation="console", http_method=method,
                           source_ip=(scope.get("client") or [None])[0])
        quiet = False
        try:
            answer, quiet = await self._answer(scope, receive, event)
        except AuthFailed as failed:  # no session, or it ended
            event.result, event.reason = "auth_failed", f"console:session:{failed.reason}"
            answer = (json_answer({"error": "signed out"}, 401) if event.operation == "console/audit:tail"
                      else redirect(session.LOGIN_PATH))
        except errors.GatewayRefusal as refusal:
            event.result, event.reason = refusal.refusal.audit_result, refusal.reason
            answer = document("message.html", refusal.refusal.http_status, title=refusal.refusal.message,
                              text=refusal.detail or refusal.refusal.message,
                              sign_in=event.operation == "console/login")
        except Exception:
            log.exception("console error")
            event.result, event.reason = "error", "console:exception"
            answer = document("message.html", 500, title="Internal error", text="The console failed; see the log.")
        if answer.reason:
            event.reason, event.result = answer.reason, answer.result
        if event.reason and not (quiet and event.result == "allowed"):
            event.status = answer.status
            event.duration_ms = round((time.perf_counter() - started) * 1000, 3)
            try:
                self._runtime.audit.record(event)
                await self._runtime.audit.written()
            except AuditUnavailable as unavailable:  # the answer goes out: what it did is done
                log.error("console answer %s sent before its audit event %s was on record: %s", event.reason,
                          event.id, unavailable)
        await _send(send, answer)

    async def _answer(self, scope: ASGIScope, receive: ASGIReceive, event: AuditEvent) -> tuple[Answer, bool]:
        """The answer, and whether it is a quiet one (audited only when refused)."""
        runtime, path, method = self._runtime, scope["path"], scope.get("method", "")
        headers = header_values(scope)
        if path in (session.LOGIN_PATH, LOGOUT):
            event.operation = "console/login" if path == session.LOGIN_PATH else "console/logout"
            if method not in (("GET", "POST") if path == session.LOGIN_PATH else ("POST",)):
                raise errors.GatewayRefusal(errors.METHOD_NOT_ALLOWED, f"{method} {path}", reason="console:no_route")
            if path == session.LOGIN_PATH and method == "GET":
                return await self._offer(_fields(scope.get("query_string", b"").decode("latin-1")), event), False
            if path == session.LOGIN_PATH:
                return await self._sign_in(await self._form(headers, receive, None), event), False
            operator = await self._operator(headers, event)
            await self._form(headers, receive, operator)
            return await self._sign_out(operator), False
        key, item = _place(path)
        route = ROUTES.get((method, key))
        if route is None:
            event.operation = f"console/{key or 'overview'}"
            refusal = errors.METHOD_NOT_ALLOWED if any(k == key for _, k in ROUTES) else errors.NOT_FOUND
            raise errors.GatewayRefusal(refusal, f"{method} {path}", reason="console:no_route")
        event.operation = route.operation
        query = _fields(scope.get("query_string", b"").decode("latin-1"))
        operator = await self._operator(headers, event)
        form = await self._form(headers, receive, operator) if method == "POST" else {}
        if item and not _ID.fullmatch(item):
            raise errors.GatewayRefusal(errors.NOT_FOUND, f"no such item {item!r}", reason="console:bad_id")
        needed = operators.scope_for(runtime.config, route.part)
        if needed not in operator.scopes:
            raise errors.GatewayRefusal(errors.FORBIDDEN, f"this page needs the scope {needed}",
                                        reason=f"console:no_scope:{needed}")
        request = Page(runtime, self._key, path, query, form, item, operator, self._key.csrf_token(
            str(operator.token_id)))
        return await route.handler(request), route.quiet

    async def _operator(self, headers: Mapping[str, list[str]], event: AuditEvent) -> Principal:
        operator = await session.operator(self._runtime, headers)
        event.user_id, event.client_id = operator.subject, operator.client_id
        return operator

    async def _form(self, headers: Mapping[str, list[str]], receive: ASGIReceive, operator: Principal | None
                    ) -> Mapping[str, str]:
        """A POST's form, once it is known to come from the console's own page (of `operator`'s session: its
        CSRF token; the sign-in form, sent before there is a session, carries the one-time token instead)."""
        why = session.cross_site(headers, self._runtime.config.public_origin)
        content_type = (headers.get("content-type") or [""])[0].split(";")[0].strip().lower()
        if why is None and content_type != "application/x-www-form-urlencoded":
            why = f"a form is sent as application/x-www-form-urlencoded, not {content_type or 'without a type'}"
        form: Mapping[str, str] = {}
        if why is None:
            body = await read_body(receive, limit=_MAX_FORM,
                                   timeout_s=self._runtime.config.limits.client_body_timeout_s)
            if not body.isascii():  # a urlencoded form is ASCII: its UTF-8 is percent-encoded
                raise errors.GatewayRefusal(errors.INVALID_PARAMS, "the form is not urlencoded",
                                            reason="console:bad_fields")
            form = _fields(body.decode("ascii"))
            if operator is not None and not self._key.csrf_ok(str(operator.token_id), form.get("csrf")):
                why = "the form carries no valid CSRF token (reload the page and try again)"
        if why is not None:
            raise errors.GatewayRefusal(errors.FORBIDDEN, f"refused: {why}", reason="console:csrf")
        return form

    async def _offer(self, query: Mapping[str, str], event: AuditEvent) -> Answer:
        """The sign-in link opened: a page that asks to sign in. Opening a link spends nothing (a chat's link
        preview or a mail scanner fetches it too); the sign-in is the form it sends."""
        token = query.get("token")
        if not token:
            return document("signed_out.html")
        login = await session.login_of(self._runtime, token)
        event.user_id = login.subject
        answer = document("sign_in.html", subject=login.subject, token=token)
        answer.reason = "console:login_offered"
        return answer

    async def _sign_in(self, form: Mapping[str, str], event: AuditEvent) -> Answer:
        token_value, principal = await session.sign_in(self._runtime, form.get("token", ""))
        event.user_id, event.client_id = principal.subject, principal.client_id
        config = self._runtime.config
        cookie = session.session_cookie(token_value, config.admin.console_session_ttl_s,
                                        config.public_url.startswith("https:"))
        return redirect(ROOT, [(b"set-cookie", cookie.encode())],
                        reason=f"console:login session={principal.token_id}")

    async def _sign_out(self, operator: Principal) -> Answer:
        await session.sign_out(self._runtime, operator)
        cleared = session.cleared_cookie(self._runtime.config.public_url.startswith("https:"))
        return redirect(session.LOGIN_PATH, [(b"set-cookie", cleared.encode())],
                        reason=f"console:logout session={operator.token_id}")


async def _send(send: ASGISend, answer: Answer) -> None:
    await send({"type": "http.response.start", "status": answer.status, "headers": answer.head()})
    await send({"type": "http.response.body", "body": answer.body, "more_body": False})
