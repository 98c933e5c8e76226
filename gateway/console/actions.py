"""The console's forms (POST): each calls one `operators` action and redirects back to its page, which then
says what was done or why it was refused (redirect-after-POST; the audit event says the same).

    /admin/ui/approvals/<id>/approve|deny   operators.decide_approval (reason)
    /admin/ui/sessions/<id>/revoke          operators.revoke_session
    /admin/ui/roles/assign                  operators.assign_role (subject, client_id, role, expires, reason)
    /admin/ui/roles/<id>/revoke             operators.revoke_role
    /admin/ui/tools/<upstream>/approve      operators.approve_tool (tool, and the hash the operator saw)
    /admin/ui/tools/<upstream>/pin          operators.pin_tools
    /admin/ui/policy/explain                explain a call (renders the policy page with the answer)

CSRF, the session and the scope were checked before any of these runs (`routes`).
"""

from __future__ import annotations

from collections.abc import Awaitable

from gateway import errors, operators
from gateway.audit.reading import BadQuery, parse_duration
from gateway.console import policy_view
from gateway.console.render import Answer, Page, back, page


async def _done(request: Page, location: str, action: Awaitable[operators.Done], said: str) -> Answer:
    """Run `action`; back to `location` saying `said`, or why it was refused."""
    try:
        done = await action
    except errors.GatewayRefusal as refusal:
        return back(request, location, "error", refusal.detail or refusal.refusal.message, reason=refusal.reason,
                    result=refusal.refusal.audit_result)
    return back(request, location, "done", said, reason=done.reason)


async def approve(request: Page) -> Answer:
    return await _decide(request, approve=True)


async def deny(request: Page) -> Answer:
    return await _decide(request, approve=False)


async def _decide(request: Page, *, approve: bool) -> Answer:
    action = operators.decide_approval(request.runtime, request.operator, request.item, approve=approve,
                                       reason=request.form.get("reason", ""))
    return await _done(request, "/admin/ui/approvals", action,
                       f"{'approved' if approve else 'denied'} {request.item}")


async def revoke_session(request: Page) -> Answer:
    return await _done(request, "/admin/ui/sessions", operators.revoke_session(request.runtime, request.item),
                       f"revoked token session {request.item}")


async def assign_role(request: Page) -> Answer:
    form = request.form
    subject, role = form.get("subject", "").strip(), form.get("role", "")
    expires = form.get("expires", "").strip()
    try:
        ttl_s = parse_duration(expires) if expires else None
    except BadQuery as exc:
        return back(request, "/admin/ui/roles", "error", f"expires: {exc}", reason="roles:bad_expiry",
                    result="invalid_request")
    action = operators.assign_role(request.runtime, request.operator, subject=subject, role=role,
                                   client_id=form.get("client_id", "").strip() or None, ttl_s=ttl_s,
                                   reason=form.get("reason", ""))
    until = f" for {expires}" if expires else " until revoked"
    return await _done(request, "/admin/ui/roles", action, f"assigned {role} to {subject}{until}")


async def revoke_role(request: Page) -> Answer:
    return await _done(request, "/admin/ui/roles", operators.revoke_role(request.runtime, request.item),
                       f"revoked assignment {request.item}")


async def approve_tool(request: Page) -> Answer:
    tool = request.form.get("tool", "")
    action = operators.approve_tool(request.runtime, request.operator, request.item, tool,
                                    expected=request.form.get("hash") or None)
    return await _done(request, "/admin/ui/tools", action, f"approved {tool} at {request.item}")


async def pin_tools(request: Page) -> Answer:
    return await _done(request, "/admin/ui/tools", operators.pin_tools(request.runtime, request.operator,
                                                                       request.item),
                       f"pinned every definition of {request.item} last seen")


async def explain(request: Page) -> Answer:
    """The policy page, with the explanation of the call the form describes (or what is wrong with the form)."""
    asked = {k: request.form.get(k, policy_view.EXPLAIN_DEFAULTS[k]) for k in policy_view.EXPLAIN_FIELDS}
    view = policy_view.describe(request.runtime)
    try:
        lines = await policy_view.explain_call(request.runtime, asked)
    except ValueError as exc:
        return page(request, "policy.html", 400, reason="console:explain_refused", view=view, asked=asked,
                    explained=None, error=str(exc))
    target = asked["name"] or asked["uri"]
    reason = f"console:explained {asked['method']} {target}".rstrip()[:200]
    return page(request, "policy.html", reason=reason, view=view, asked=asked, explained=lines, error=None)
