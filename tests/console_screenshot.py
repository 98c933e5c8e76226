"""Write docs/console.png: the admin console's approvals page, 1280x800, in front of a real gateway.

    .venv/bin/python -m tests.console_screenshot [--page approvals|overview|audit|...] [--out docs/console.png]

A gateway (reverse proxy) in front of the demo MCP server, with the approval policy of the console's tests;
real traffic from the MCP SDK client (allowed calls, refused ones, a bad token); one call approved earlier,
and two calls held for approval while the picture is taken. Everything shown happened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import tempfile
from pathlib import Path

import httpx
from mcp.shared.exceptions import MCPError
from playwright.async_api import async_playwright

from gateway.console import login_url
from tests.console_browser import APPROVAL_POLICY, launch, sdk_client
from tests.harness import ROOT, Deployment, deploy

PAGES = {"overview": "/admin/", "audit": "/admin/ui/audit", "approvals": "/admin/ui/approvals",
         "sessions": "/admin/ui/sessions", "roles": "/admin/ui/roles", "upstreams": "/admin/ui/upstreams",
         "policy": "/admin/ui/policy"}


async def traffic(gateway: Deployment) -> None:
    """Calls that pass and calls that are refused, by the SDK client; requests with a bad token."""
    async with sdk_client(gateway.url, gateway.token("alice")) as alice:
        for city in ("Oslo", "Lima", "Pune"):
            await alice.call_tool("get_weather", {"city": city})
        await alice.call_tool("search", {"query": "demo"})
        for path in ("/etc/passwd", "/var/log/auth.log"):
            with contextlib.suppress(MCPError):
                await alice.call_tool("delete_file", {"path": path})
    async with httpx.AsyncClient() as raw:
        for _ in range(2):
            await raw.post(gateway.url, headers={"Authorization": "Bearer not-a-token"}, json={})


async def wait_for_pending(gateway: Deployment, count: int) -> None:
    store = gateway.runtime.approvals.store
    for _ in range(100):
        listed = gateway.gateway.call(store.listing())
        if sum(a.status == "pending" for a in listed) >= count:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the held calls never showed as pending")


async def shoot(gateway: Deployment, page_name: str, out: Path) -> None:
    await traffic(gateway)
    base = gateway.runtime.config.public_url
    olga_token = gateway.token("olga", scopes=(), groups=["ops"])
    async with async_playwright() as playwright, sdk_client(gateway.url, olga_token) as olga:
        browser = await launch(playwright)
        page = await (await browser.new_context(viewport={"width": 1280, "height": 800})).new_page()
        await page.goto(login_url(gateway.runtime.config, gateway.runtime.authenticator, "rita"))
        async with page.expect_navigation():
            await page.get_by_role("button", name="Sign in as rita").click()
        earlier = asyncio.ensure_future(olga.call_tool("delete_file", {"path": "/srv/build/cache"}))
        await wait_for_pending(gateway, 1)
        await page.goto(f"{base}/admin/ui/approvals")
        await page.locator("article.approval input[name=reason]").first.fill("stale build cache")
        async with page.expect_navigation():
            await page.get_by_role("button", name="Approve").first.click()
        await earlier
        held = [asyncio.ensure_future(olga.call_tool("delete_file", {"path": path}))
                for path in ("/srv/release/app-1.4.2.tar.gz", "/srv/release/app-1.4.1.tar.gz")]
        await wait_for_pending(gateway, 2)
        await page.goto(f"{base}{PAGES[page_name]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(out))
        await browser.close()
        for approval in gateway.gateway.call(gateway.runtime.approvals.store.listing()):  # let the held calls end
            if approval.status == "pending":
                gateway.gateway.call(gateway.runtime.approvals.decide(
                    approval.id, approve=False, by="rita", roles=("release-managers",), reason="picture taken"))
        await asyncio.gather(*held, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page", choices=sorted(PAGES), default="approvals")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "console.png")
    args = parser.parse_args()
    logging.disable(logging.INFO)  # the gateway's per-request lines and the HTTP clients' say nothing here
    with tempfile.TemporaryDirectory() as directory:
        gateway = deploy("proxy", Path(directory), policy=APPROVAL_POLICY)
        try:
            asyncio.run(shoot(gateway, args.page, args.out))
        finally:
            gateway.stop()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
