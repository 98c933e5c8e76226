"""The admin console: web pages the gateway serves under /admin/ for people operating it.

    GET  /admin/login?token=...              a one-time sign-in URL (`login_url`, `mcp-gateway admin-login`):
                                             a page asking to sign in; without a token: signed out
    POST /admin/login                        its form: the token spent for a session cookie, 303 to /admin/
    POST /admin/logout                       end the session
    GET  /admin/                             overview: decisions per minute over the last hour, pending approvals
    GET  /admin/ui/audit[?user&client&tool&result&since&until&limit]   the audit trail, with a live tail
    GET  /admin/ui/audit/tail?after=...      the live tail's JSON
    GET  /admin/ui/approvals                 pending approvals; POST .../<id>/approve|deny
    GET  /admin/ui/sessions                  token sessions; POST .../<id>/revoke
    GET  /admin/ui/roles                     runtime role assignments; POST .../assign, .../<id>/revoke
    GET  /admin/ui/tools                     tool pins and changed definitions; POST .../<upstream>/approve|pin
    GET  /admin/ui/upstreams                 upstream health
    GET  /admin/ui/policy                    the policy in force; POST .../explain
    GET  /admin/static/console.css|js        the stylesheet and the script

Server-rendered HTML (Jinja2, autoescaped), no inline script or style, a strict Content-Security-Policy, and
a CSRF token on every form. The actions are `gateway.operators`', the same as the JSON admin API's.

    session      sign-in, the cookie, CSRF and the console's MAC key
    routes       `Console` (the ASGI app) and `serves`: the route table, the checks, the audit events
    render       the request and answer values, templates, security headers, flash messages
    pages        the pages; actions: the forms
    chart        the overview's SVG chart (pure); trail: the audit trail newest first
    health       upstream probes and processes; policy_view: the policy described, and explain
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.lazy import names_from

if TYPE_CHECKING:
    from gateway.console.routes import Console, serves
    from gateway.console.session import login_url

__all__ = ["Console", "login_url", "serves"]

_HOMES = {
    "gateway.console.routes": ("Console", "serves"),
    "gateway.console.session": ("login_url",),
}

if not TYPE_CHECKING:  # mypy reads the imports above; at run time each name's module is imported on first use
    __getattr__ = names_from(__name__, _HOMES)
