"""What an operator can do, whichever way they ask: the admin API (JSON, `admin`) and the console (HTML, `console`).

Owns each action on the running gateway's state (read the audit trail, list
and revoke token sessions, list and decide approvals, list, assign and revoke
roles, list and approve tool definitions) and what it is recorded as: each
returns `Done`, its result and the audit reason of the event the channel
records with the operator as its `user_id`. A refused action raises
`GatewayRefusal`; a change is refused while the audit trail cannot take its
event (`recordable`). Who the operator is and which scope each action needs is
the channel's business.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway import errors
from gateway.assignments import Assignment
from gateway.audit.reading import BadQuery, query_from, reader_for
from gateway.audit.sinks import SinkUnreadable
from gateway.pins import short
from gateway.policy.engine import roles_for

if TYPE_CHECKING:
    from collections.abc import Mapping

    from gateway.config import Config
    from gateway.principal import Principal
    from gateway.runtime import Runtime

MAX_REASON = 500


@dataclass(frozen=True, slots=True)
class Done:
    result: dict[str, Any]
    reason: str  # the audit event's reason


def scope_for(config: Config, part: str) -> str:
    """The scope an operator needs for a part of the gateway's state (admin: the console itself; audit, sessions,
    approvals, roles, tools), as configured: the admin API and the console ask the same."""
    return {"admin": config.admin.scope, "audit": config.audit.read_scope, "sessions": config.sessions.admin_scope,
            "approvals": config.admin.approvals_scope, "roles": config.admin.roles_scope,
            "tools": config.admin.tools_scope}[part]


def recordable(runtime: Runtime) -> None:
    """Refuse a change while the audit trail cannot take its event: no grant, revocation or decision may go
    unrecorded (the request path holds itself to the same rule)."""
    if not runtime.audit.accepting():
        runtime.metrics.requests_refused_for_audit.inc()
        raise errors.GatewayRefusal(errors.AUDIT_UNAVAILABLE, "audit trail unavailable", reason="audit_unavailable")


def _bad(why: str, reason: str) -> errors.GatewayRefusal:
    return errors.GatewayRefusal(errors.INVALID_PARAMS, why, reason=reason)


async def read_audit(runtime: Runtime, params: Mapping[str, str]) -> Done:
    try:
        query = query_from(params)
        reader = reader_for(runtime.config.audit, params.get("sink"))
    except BadQuery as exc:
        raise _bad(str(exc), "admin:bad_query") from None
    try:
        events = await reader.query(query)
    except SinkUnreadable as exc:
        raise errors.GatewayRefusal(errors.AUDIT_UNAVAILABLE, str(exc), reason="admin:audit_unreadable") from None
    finally:
        await reader.close()
    return Done({"sink": reader.name, "count": len(events), "events": events}, "admin:audit_read")


async def list_sessions(runtime: Runtime) -> Done:
    tokens = sorted(await runtime.sessions.tokens(), key=lambda t: t.issued_at)
    return Done({"count": len(tokens), "sessions": [t.as_dict() for t in tokens]}, "admin:sessions_list")


async def revoke_session(runtime: Runtime, token_id: str) -> Done:
    recordable(runtime)
    known = {t.token_id: t for t in await runtime.sessions.tokens()}.get(token_id)
    if known is None:
        raise errors.GatewayRefusal(errors.NOT_FOUND, f"no token session {token_id!r}", reason="admin:no_such_session")
    await runtime.sessions.revoke(token_id, known.expires_at)
    runtime.metrics.revocations.inc()
    return Done({"revoked": token_id}, f"admin:revoked:{token_id}")


async def roles_of(runtime: Runtime, principal: Principal) -> tuple[str, ...]:
    """Every role `principal` holds now: the policy's bindings and runtime assignments."""
    return roles_for(await runtime.assignments.apply(principal), runtime.policy)


async def list_approvals(runtime: Runtime) -> Done:
    now = time.time()
    approvals = sorted(await runtime.approvals.store.listing(),
                       key=lambda a: (a.status_at(now) != "pending", -a.created_at))
    items = [{**a.as_dict(), "status": a.status_at(now)} for a in approvals]
    return Done({"count": len(items), "approvals": items}, "admin:approvals_list")


async def decide_approval(runtime: Runtime, operator: Principal, approval_id: str, *, approve: bool,
                          reason: str) -> Done:
    """An approver's decision: they must be one the policy names, and not the caller (unless it allows that)."""
    recordable(runtime)
    approval = await runtime.approvals.decide(
        approval_id, approve=approve, by=operator.subject, roles=await roles_of(runtime, operator),
        reason=reason[:MAX_REASON])
    return Done({"approval": approval.as_dict()}, f"approval:{approval.status}:{approval.id}")


async def list_roles(runtime: Runtime, subject: str | None = None) -> Done:
    assignments = sorted(await runtime.assignments.all(), key=lambda a: (a.subject, a.role, a.assigned_at))
    items = [a.as_dict() for a in assignments if subject is None or a.subject == subject]
    return Done({"count": len(items), "assignments": items}, "admin:roles_list")


async def assign_role(runtime: Runtime, operator: Principal, *, subject: str, role: str,
                      client_id: str | None = None, ttl_s: float | None = None, reason: str = "") -> Done:
    recordable(runtime)
    if not subject or len(subject) > 256:
        raise _bad("subject is required (at most 256 characters)", "roles:bad_subject")
    if runtime.policy.engine is None and role not in runtime.policy.roles:  # Cedar reads any role name
        raise _bad(f"{role!r} is not a role of the policy in force (have: {', '.join(runtime.policy.roles)})",
                   "roles:unknown_role")
    if ttl_s is not None and not 0 < ttl_s <= 366 * 86400:
        raise _bad("expires must be more than 0 s and at most a year away", "roles:bad_expiry")
    assignment = Assignment.new(subject, role, assigned_by=operator.subject, client_id=client_id or None,
                                ttl_s=ttl_s, reason=reason[:MAX_REASON])
    await runtime.assignments.add(assignment)
    runtime.metrics.role_changes.labels("assign").inc()
    until = "until revoked" if assignment.expires_at is None else f"until {assignment.expires_at:.0f}"
    return Done({"assignment": assignment.as_dict()},
                f"roles:assigned:{role} to={subject} client={client_id or '*'} {until} id={assignment.id}")


async def revoke_role(runtime: Runtime, assignment_id: str) -> Done:
    recordable(runtime)
    removed = await runtime.assignments.remove(assignment_id)
    if removed is None:
        raise errors.GatewayRefusal(errors.NOT_FOUND, f"no role assignment {assignment_id!r}",
                                    reason="roles:no_such_assignment")
    runtime.metrics.role_changes.labels("revoke").inc()
    return Done({"revoked": removed.as_dict()},
                f"roles:revoked:{removed.role} from={removed.subject} id={removed.id}")


async def list_tools(runtime: Runtime, upstream: str | None = None) -> Done:
    items = await runtime.pins.tools(upstream)
    return Done({"count": len(items), "tools": items}, "admin:tools_list")


async def approve_tool(runtime: Runtime, operator: Principal, upstream: str, tool: str,
                       expected: str | None = None) -> Done:
    """Pin the definition of `tool` last seen (only if it is still `expected`, a hash or its prefix, when given)."""
    recordable(runtime)
    if not tool:
        raise errors.GatewayRefusal(errors.NOT_FOUND, "name the tool: /admin/tools/<upstream>/<tool>/approve",
                                    reason="tools:no_tool")
    old, new = await runtime.pins.approve(upstream, tool, operator.subject, expected or None)
    return Done({"upstream": upstream, "tool": tool, "pinned": new, "previous": old},
                f"tools:approved:{upstream}/{tool} {short(old)}->{short(new)}")


async def pin_tools(runtime: Runtime, operator: Principal, upstream: str) -> Done:
    """Pin every definition of `upstream` last seen; the answer holds every pin, as a pins file would."""
    recordable(runtime)
    pins, held = await runtime.pins.pin_all(upstream, operator.subject)
    reason = f"tools:pinned:{upstream} tools={len(pins)}" + (f" held_by_file={','.join(held)}" if held else "")
    return Done({"upstream": upstream, "pins": pins, "held_by_file": held}, reason[:500])
