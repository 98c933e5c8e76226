"""What the console's browser tests (and `tests.console_screenshot`) share: a real headless Chromium driven by
Playwright, gateways with the policies they need, the SDK client as the caller, and an attacker's site.

- `Tab` is one browser page that remembers every console response (each must carry the CSP), every CSP
  violation the browser reports, and a screenshot of each page it showed (written out when a test fails).
- `launch` starts Debian's chromium (never a downloaded browser).
- `deploy_with_stdio` is a reverse proxy in front of the demo server over HTTP and the same server as a stdio
  upstream, for the upstreams page.
- `attacker_app` serves a page on another port that posts a form to the console by itself, from a static
  script (as a real attacker's page would).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from playwright.async_api import Browser, Locator, Page, Playwright, Response

from gateway import create_app
from gateway.console.render import CSP
from tests.harness import (
    DEFAULT_POLICY,
    ROOT,
    Deployment,
    Recorder,
    ServerThread,
    build_server,
    free_port,
    write_config,
)

CHROMIUM = "/usr/bin/chromium"
OUTPUT = ROOT / "tests" / "output" / "console"

# The suite's default policy, plus release managers (rita, by her subject) who approve dangerous calls.
POLICY: dict[str, Any] = {
    "roles": {**DEFAULT_POLICY["roles"], "release-managers": {"permissions": {"can_execute_tools": ["search"]}}},
    "bindings": [*DEFAULT_POLICY["bindings"], {"when": {"subject": "rita"}, "roles": ["release-managers"]}],
}
APPROVAL_POLICY: dict[str, Any] = {
    **POLICY,
    "tools": {"delete_file": {"approval": {"approvers": ["role:release-managers"], "mode": "hold", "timeout_s": 60}}},
}


async def launch(playwright: Playwright) -> Browser:
    return await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])


def sdk_client(url: str, token: str) -> Client:
    """The official MCP SDK client, as the gateway's caller."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
    return Client(streamable_http_client(url, http_client=http), mode="auto")


class Tab:
    """One browser page, watched: console responses, CSP violations, screenshots."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.responses: list[Response] = []
        self.violations: list[str] = []
        self.shots: list[tuple[str, bytes]] = []
        page.on("response", self._response)
        page.on("console", self._console)

    def _response(self, response: Response) -> None:
        if urlsplit(response.url).path.startswith("/admin"):
            self.responses.append(response)

    def _console(self, message: Any) -> None:
        if "Content Security Policy" in message.text or "Content-Security-Policy" in message.text:
            self.violations.append(message.text)

    async def snap(self) -> None:
        label = re.sub(r"[^A-Za-z0-9]+", "-", urlsplit(self.page.url).path).strip("-") or "page"
        self.shots.append((label, await self.page.screenshot(full_page=True)))

    async def goto(self, url: str) -> Response:
        response = await self.page.goto(url)
        assert response is not None
        await self.snap()
        return response

    async def submit(self, button: Locator) -> Response | None:
        """Click a button that sends a form, and wait for the page it leads to."""
        async with self.page.expect_navigation() as navigation:
            await button.click()
        response = await navigation.value
        await self.snap()
        return response

    async def flash(self) -> str:
        return (await self.page.locator("p.flash").inner_text()).strip()

    def problems(self) -> list[str]:
        """Console answers without the CSP header, and violations the browser reported."""
        missing = [f"no CSP on {r.status} {r.url}" for r in self.responses
                   if r.headers.get("content-security-policy") != CSP]
        return missing + [f"CSP violation: {v}" for v in self.violations]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for number, (label, png) in enumerate(self.shots, 1):
            (directory / f"{number:02d}-{label}.png").write_bytes(png)


def deploy_with_stdio(directory: Path) -> Deployment:
    """A reverse proxy in front of the demo server over HTTP (`/mcp`) and as a stdio upstream (`/kit`)."""
    recorder = Recorder(build_server().streamable_http_app())
    upstream = ServerThread(recorder).start()
    port = free_port()
    config_path = write_config(directory, None, public_url=f"http://127.0.0.1:{port}", policy=POLICY, upstreams=[
        {"name": "demo", "path": "/mcp", "url": f"{upstream.url}/mcp"},
        {"name": "kit", "path": "/kit", "command": [sys.executable, str(ROOT / "examples" / "demo_server.py"),
                                                     "--stdio"]},
    ])
    app: Any = create_app(config_path)
    gateway = ServerThread(app, port).start()
    return Deployment("proxy", gateway, recorder, app.runtime, config_path, upstream)


def attacker_app(action: str, fields: dict[str, str]) -> Any:
    """An ASGI app: `/` is a page whose form posts `fields` to `action`, sent by `/go.js` as the page loads."""
    inputs = "".join(f'<input type="hidden" name="{k}" value="{v}">' for k, v in fields.items())
    return site_app({
        "/": (b"text/html", f'<!doctype html><title>Win a prize</title><form method="post" action="{action}">'
                            f'{inputs}</form><script src="/go.js"></script>'.encode()),
        "/go.js": (b"text/javascript", b"document.forms[0].submit();"),
    })


def site_app(pages: dict[str, tuple[bytes, bytes]]) -> Any:
    """An ASGI app serving `pages` (path -> content type, body): another web site."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        content_type, body = pages.get(scope["path"], (b"text/plain", b"not here"))
        await send({"type": "http.response.start", "status": 200 if scope["path"] in pages else 404,
                    "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": body})

    return app
