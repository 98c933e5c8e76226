"""The console's pages (GET): what each shows, read through `operators` (never around it).

    /admin/                  overview: decisions per minute over the last hour (SVG), pending approvals
    /admin/ui/audit          the audit trail, newest first, filtered; paged by time (`until`)
    /admin/ui/audit/tail     JSON: events after `after` (the page's live tail polls it)
    /admin/ui/approvals      pending approvals with Approve / Deny forms; recently decided ones
    /admin/ui/sessions       token sessions, each with a Revoke form
    /admin/ui/roles          runtime role assignments with Revoke forms; the assign form
    /admin/ui/tools          each upstream's tools: pinned, changed or new, with Approve forms and the definition
    /admin/ui/upstreams      each upstream's health (`health`)
    /admin/ui/policy         the policy in force (`policy_view`), and the explain form

Each handler returns an `Answer`; a refusal from `operators` (a bad filter, say) is shown on the page.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gateway import errors, operators
from gateway.audit.reading import BadQuery
from gateway.console import chart, health, policy_view, trail
from gateway.console.render import Answer, Page, json_answer, page

if TYPE_CHECKING:
    from gateway.runtime import Runtime

CHART_EVENTS = 999  # as many as one read of the trail shows that is not full (`trail.newest`)
PAGE_SIZES = (25, 50, 100, 200, 500)
_TAIL_BATCH = 200


def _reader(runtime: Runtime) -> trail.Read:
    async def read(params: dict[str, str]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = (await operators.read_audit(runtime, params)).result["events"]
        return events

    return read


async def overview(request: Page) -> Answer:
    runtime, now = request.runtime, time.time()
    events = await trail.newest(_reader(runtime), {"since": "1h"}, CHART_EVENTS, now)
    minutes = chart.buckets(events, now)
    return page(request, "overview.html", reason="console:overview", chart=chart.layout(minutes),
                truncated=len(events) >= CHART_EVENTS, pending=await runtime.approvals.pending_count(),
                upstreams=len(runtime.config.upstreams), policy=runtime.policy)


def _filters(request: Page) -> dict[str, str]:
    return {k: request.query[k] for k in (*trail.FILTERS, "since", "until") if request.query.get(k)}


async def audit(request: Page) -> Answer:
    """The newest events matching the form; `Older` moves `until` to the oldest shown."""
    filters = _filters(request)
    if "since" not in filters and "until" not in filters and "since" not in request.query:
        filters["since"] = "1h"
    limit = int(request.query["limit"]) if request.query.get("limit", "") in {str(n) for n in PAGE_SIZES} else 50
    now = time.time()
    rows: list[dict[str, Any]] = []
    error = None
    try:
        rows = [trail.row(e) for e in await trail.newest(_reader(request.runtime), filters, limit, now)]
    except (BadQuery, errors.GatewayRefusal) as exc:
        error = exc.detail if isinstance(exc, errors.GatewayRefusal) else str(exc)
    tail = {k: v for k, v in filters.items() if k in trail.FILTERS}
    live = error is None and "until" not in filters
    older = {**filters, "limit": str(limit), "until": f"{rows[-1]['timestamp']:.6f}"} if len(rows) == limit else None
    newest = {**{k: v for k, v in filters.items() if k != "until"}, "limit": str(limit)} if not live else None
    return page(request, "audit.html", 400 if error else 200, reason="console:audit_read", rows=rows, error=error,
                filters=filters, limit=limit, sizes=PAGE_SIZES, results=trail.RESULTS, older=older, newest=newest,
                tail=tail if live else None, after=f"{max((r['timestamp'] for r in rows), default=now):.6f}")


async def audit_tail(request: Page) -> Answer:
    """JSON for the live tail: events from `after` on, oldest first (the script skips those it has)."""
    after = request.query.get("after", "")
    try:
        float(after)
    except ValueError:
        return json_answer({"error": "after must be a UNIX time"}, 400, reason="console:bad_query")
    params = {k: request.query[k] for k in trail.FILTERS if request.query.get(k)}
    try:
        events = (await operators.read_audit(request.runtime, {**params, "since": after,
                                                               "limit": str(_TAIL_BATCH)})).result["events"]
    except errors.GatewayRefusal as refusal:
        return json_answer({"error": refusal.detail}, 400, reason=refusal.reason)
    rows = [trail.row(e) for e in events]
    latest = max((r["timestamp"] for r in rows), default=float(after))
    return json_answer({"events": rows, "after": f"{latest:.6f}"}, reason="console:audit_tail")


async def approvals(request: Page) -> Answer:
    listed = (await operators.list_approvals(request.runtime)).result["approvals"]
    pending = [a for a in listed if a["status"] == "pending"]
    decided = [a for a in listed if a["status"] != "pending"]
    return page(request, "approvals.html", reason="console:approvals_list", pending=pending, decided=decided)


async def sessions(request: Page) -> Answer:
    listed = (await operators.list_sessions(request.runtime)).result["sessions"]
    listed.sort(key=lambda s: -s["issued_at"])
    return page(request, "sessions.html", reason="console:sessions_list", sessions=listed,
                mine=request.operator.token_id, now=time.time())


async def roles(request: Page) -> Answer:
    listed = (await operators.list_roles(request.runtime)).result["assignments"]
    return page(request, "roles.html", reason="console:roles_list", assignments=listed,
                roles=list(request.runtime.policy.roles))


async def tools(request: Page) -> Answer:
    listed = (await operators.list_tools(request.runtime)).result["tools"]
    by_upstream = {u.name: [t for t in listed if t["upstream"] == u.name] for u in request.runtime.config.upstreams}
    modes = {u.name: u.pinning for u in request.runtime.config.upstreams}
    return page(request, "tools.html", reason="console:tools_list", upstreams=by_upstream, modes=modes)


async def upstreams(request: Page) -> Answer:
    return page(request, "upstreams.html", reason="console:upstreams",
                upstreams=await health.survey(request.runtime), middleware=not request.runtime.upstream_apps)


async def policy(request: Page) -> Answer:
    return page(request, "policy.html", reason="console:policy", view=policy_view.describe(request.runtime),
                asked=policy_view.EXPLAIN_DEFAULTS, explained=None, error=None)
