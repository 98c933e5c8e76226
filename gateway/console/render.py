"""What a console handler is given and what it gives back: the request as read (`Page`), and the answer
(`Answer`: an HTML page from a template, JSON, a redirect or a static file) with the headers every console
answer carries.

Owns the Jinja2 environment (templates shipped in the package, autoescaped, undefined names an error), the
security headers (a strict Content-Security-Policy: no inline script or style anywhere, so not even `style=`
attributes; framing refused; nothing cached; no referrer, which keeps a sign-in URL's token out of any
Referer), the nav bar, and the flash messages a redirect-after-POST carries (`?done=` / `?error=`, sealed
with the console key, so that only the console can make a page say something).
"""

from __future__ import annotations

import functools
import importlib.resources
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import jinja2
import orjson

from gateway import operators
from gateway.audit.reading import utc_time

if TYPE_CHECKING:
    from gateway.console.session import ConsoleKey
    from gateway.principal import Principal
    from gateway.runtime import Runtime

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
)
_STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
# (path, label, the config's scope the page needs)
NAV = (
    ("/admin/", "Overview", "admin"),
    ("/admin/ui/audit", "Audit", "audit"),
    ("/admin/ui/approvals", "Approvals", "approvals"),
    ("/admin/ui/sessions", "Sessions", "sessions"),
    ("/admin/ui/roles", "Roles", "roles"),
    ("/admin/ui/tools", "Tools", "tools"),
    ("/admin/ui/upstreams", "Upstreams", "admin"),
    ("/admin/ui/policy", "Policy", "admin"),
)


@dataclass(slots=True)
class Page:
    """One console request, as its handler sees it: a signed-in operator, and every field given once."""

    runtime: Runtime
    key: ConsoleKey
    path: str
    query: Mapping[str, str]
    form: Mapping[str, str]
    item: str  # the id a path names (/admin/ui/roles/<id>/revoke), else ""
    operator: Principal
    csrf: str


@dataclass(slots=True)
class Answer:
    """What the console sends, and what its audit event says (`reason`; `result` unless allowed)."""

    status: int
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reason: str = ""
    result: str = "allowed"

    def head(self) -> list[tuple[bytes, bytes]]:
        framing = [(b"content-type", self.content_type.encode())] if self.body else []
        return [*framing, (b"content-length", str(len(self.body)).encode()), *SECURITY_HEADERS, *self.headers]


@functools.cache
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("gateway.console", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["utc"] = utc_time
    env.filters["ago"] = _ago
    return env


def _ago(stamp: object) -> str:
    """`in 4m 10s` / `2m ago`, for times near now."""
    if not isinstance(stamp, int | float):
        return ""
    delta = stamp - time.time()
    seconds = int(abs(delta))
    text = f"{seconds // 3600}h {seconds % 3600 // 60}m" if seconds >= 3600 else (
        f"{seconds // 60}m {seconds % 60}s" if seconds >= 60 else f"{seconds}s")
    return f"in {text}" if delta > 0 else f"{text} ago"


def document(template: str, status: int = 200, **context: Any) -> Answer:
    """A page that needs no session (signed out, refusals)."""
    body = _templates().get_template(template).render(nav=(), operator=None, csrf="", flash=None, here="",
                                                       **context)
    return Answer(status, body.encode())


def page(request: Page, template: str, status: int = 200, *, reason: str = "", **context: Any) -> Answer:
    """A console page for a signed-in operator: the nav bar (pages whose scope they hold), their forms' CSRF
    token, and the flash message the URL carries, if the console sealed it."""
    runtime, scopes = request.runtime, request.operator.scopes
    nav = [(href, label) for href, label, part in NAV if operators.scope_for(runtime.config, part) in scopes]
    body = _templates().get_template(template).render(
        nav=nav, operator=request.operator, csrf=request.csrf, flash=_flash(request), here=request.path,
        policy_version=runtime.policy.version, **context)
    return Answer(status, body.encode(), reason=reason)


def _flash(request: Page) -> tuple[str, str] | None:
    for kind in ("done", "error"):
        text, seal = request.query.get(kind), request.query.get("seal", "")
        if text is not None and request.key.flash_ok(kind, text, seal):
            return kind, text
    return None


def redirect(location: str, headers: list[tuple[bytes, bytes]] | None = None, *, reason: str = "",
             result: str = "allowed") -> Answer:
    return Answer(303, headers=[(b"location", location.encode()), *(headers or [])], reason=reason, result=result)


def back(request: Page, location: str, kind: str, text: str, *, reason: str, result: str = "allowed") -> Answer:
    """Redirect-after-POST to `location`, which then says `text` (kind `done` or `error`)."""
    text = text[:300]
    query = urlencode({kind: text, "seal": request.key.flash_seal(kind, text)})
    return redirect(f"{location}?{query}", reason=reason, result=result)


def json_answer(value: Any, status: int = 200, *, reason: str = "") -> Answer:
    return Answer(status, orjson.dumps(value), "application/json", reason=reason)


def static_file(name: str) -> Answer | None:
    """A file of the console's `static/` directory, read once; None for any name not shipped (and nothing is
    remembered of it: only shipped names are cached)."""
    return _shipped(name) if name in _STATIC else None


@functools.cache
def _shipped(name: str) -> Answer:
    body = importlib.resources.files("gateway.console").joinpath("static", name).read_bytes()
    return Answer(200, body, _STATIC[name])
