"""The admin console, in a real headless Chromium in front of a real gateway, with the MCP SDK as the caller
(its pure parts are tested by table in `test_console_parts`).

Every browser test also checks, as it ends, that each console answer carried the Content-Security-Policy and
that the browser reported no violation of it. When a test fails, a screenshot of each page it visited is
written under tests/output/console/<test name>/.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.shared.exceptions import MCPError
from playwright.async_api import Browser, async_playwright

from gateway import cli
from gateway.console import login_url
from gateway.console.render import CSP
from tests.console_browser import (
    APPROVAL_POLICY,
    OUTPUT,
    POLICY,
    Tab,
    attacker_app,
    deploy_with_stdio,
    launch,
    sdk_client,
    site_app,
)
from tests.harness import Deployment, ServerThread, deploy

# ---- over HTTP --------------------------------------------------------------------------------------------


def test_around_an_in_process_app_the_console_serves_and_refuses_what_a_session_may_not_do(tmp_path: Path) -> None:
    gateway = deploy("middleware", tmp_path, policy=POLICY)
    try:
        config = gateway.runtime.config
        only_admin = login_url(config, gateway.runtime.authenticator, "vera", scopes=[config.admin.scope])
        with httpx.Client(base_url=config.public_url) as browser:
            offered = browser.get(only_admin)
            assert offered.status_code == 200 and "Sign in as vera" in offered.text
            assert browser.get(only_admin).status_code == 200, "opening the link spends nothing"
            token = only_admin.split("token=", 1)[1]
            elsewhere = browser.post("/admin/login", data={"token": token},
                                     headers={"origin": "http://127.0.0.1:1", "sec-fetch-site": "cross-site"})
            assert elsewhere.status_code == 403 and browser.cookies.get("mcpgw_console") is None
            signed_in = browser.post("/admin/login", data={"token": token}, headers={"origin": config.public_origin})
            assert signed_in.status_code == 303 and signed_in.headers["location"] == "/admin/"
            upstreams = browser.get("/admin/ui/upstreams")
            assert upstreams.status_code == 200 and "in-process" in upstreams.text
            assert 'href="/admin/ui/roles"' not in upstreams.text, "no link to a page the session may not open"
            csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', upstreams.text)
            assert csrf is not None
            assert browser.get("/admin/ui/roles").status_code == 403
            form = {"csrf": csrf[1], "subject": "vera", "role": "operator"}
            assert browser.post("/admin/ui/roles/assign", data=form).status_code == 403
            twice = browser.post("/admin/ui/roles/assign", content=f"csrf={csrf[1]}&role=a&role=b",
                                 headers={"content-type": "application/x-www-form-urlencoded"})
            assert twice.status_code == 400 and "role given more than once" in twice.text
            as_json = browser.post("/admin/ui/policy/explain", json={"csrf": csrf[1]})
            assert as_json.status_code == 403
            assert browser.get("/admin/ui/nothing").status_code == 404
            assert all(browser.get(path).headers["content-security-policy"] == CSP
                       for path in ("/admin/", "/admin/static/console.js", "/admin/static/nothing", "/admin/login"))
        assert [(op, result, reason) for op, result, reason, user, _ in events(gateway, "console/roles")] == [
            ("console/roles:view", "denied", "console:no_scope:roles:admin"),
            ("console/roles:assign", "denied", "console:no_scope:roles:admin"),
            ("console/roles:assign", "invalid_request", "console:repeated_field")]
    finally:
        gateway.stop()


# ---- in the browser -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await launch(playwright)
        yield chromium
        await chromium.close()


@pytest.fixture
async def tab(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Tab]:
    failures = request.session.testsfailed
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    watched = Tab(await context.new_page())
    yield watched
    problems = watched.problems()
    if problems or request.session.testsfailed > failures:
        watched.save(OUTPUT / request.node.name)
    await context.close()
    assert not problems


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Deployment]:
    deployment = deploy("proxy", tmp_path, policy=POLICY)
    yield deployment
    deployment.stop()


async def sign_in(tab: Tab, gateway: Deployment, subject: str = "rita") -> None:
    config = gateway.runtime.config
    await tab.goto(login_url(config, gateway.runtime.authenticator, subject))
    response = await tab.submit(tab.page.get_by_role("button", name=f"Sign in as {subject}"))
    assert tab.page.url == f"{config.public_url}/admin/", "the token must leave the address bar"
    assert response is not None and response.status == 200
    assert await tab.page.locator("h1").inner_text() == "Overview"


def events(gateway: Deployment, operation_prefix: str) -> list[tuple[Any, ...]]:
    return [(e["operation"], e["result"], e["reason"], e["user_id"], e["status"]) for e in gateway.audit_events()
            if e["operation"].startswith(operation_prefix)]


async def test_sign_in_works_once_and_every_page_is_served_under_the_csp(
        tab: Tab, gateway: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    base = gateway.runtime.config.public_url
    await tab.goto(f"{base}/admin/ui/roles")
    assert tab.page.url == f"{base}/admin/login", "no session: the signed-out page, not a loop"
    assert await tab.page.locator("h1").inner_text() == "Signed out"
    assert cli.main(["admin-login", "--config", str(gateway.config_path), "--as", "rita"]) == 0
    url = capsys.readouterr().out.strip()
    assert url.startswith(f"{base}/admin/login?token=")
    await tab.goto(url)
    await tab.submit(tab.page.get_by_role("button", name="Sign in as rita"))
    assert tab.page.url == f"{base}/admin/", "the token must leave the address bar"
    [cookie] = await tab.page.context.cookies()
    assert (cookie["name"], cookie["path"], cookie["httpOnly"], cookie["sameSite"], cookie["secure"]) == (
        "mcpgw_console", "/admin", True, "Strict", False)
    headings = {}
    for link in ["Audit", "Approvals", "Sessions", "Roles", "Upstreams", "Policy", "Overview"]:
        await tab.submit(tab.page.get_by_role("link", name=link, exact=True))
        headings[link] = await tab.page.locator("h1").inner_text()
    assert headings == {"Audit": "Audit trail", "Approvals": "Approvals", "Sessions": "Token sessions",
                        "Roles": "Role assignments", "Upstreams": "Upstreams", "Policy": "Policy in force",
                        "Overview": "Overview"}
    assert await tab.page.locator("svg.chart rect.bar.allowed").count() >= 1  # the console's own page views
    await tab.goto(f"{base}/admin/ui/policy")
    form = tab.page.locator("form.explain")
    await form.locator("input[name=subject]").fill("alice")
    await form.locator("input[name=scopes]").fill("mcp:tools")
    await form.locator("input[name=name]").fill("delete_file")
    await tab.submit(form.get_by_role("button", name="Explain"))
    explained = await tab.page.locator("#explained").inner_text()
    assert "decision:   denied" in explained and "role operator" in explained

    again = await tab.goto(url)
    assert again.status == 403 and "used already" in await tab.page.locator("main").inner_text()
    assert all(r.headers["content-security-policy"] == CSP for r in tab.responses) and len(tab.responses) > 10
    logins = events(gateway, "console/login")
    assert [(op, result, reason.split(" ")[0], user, status) for op, result, reason, user, status in logins] == [
        ("console/login", "allowed", "console:login_offered", "rita", 200),
        ("console/login", "allowed", "console:login", "rita", 303),
        ("console/login", "denied", "console:login:revoked", None, 403)]
    assert ("console/roles:view", "auth_failed", "console:session:no_session", None, 303) in events(gateway, "con")

    await tab.goto(f"{base}/admin/")  # the refused link changed nothing: still signed in
    await tab.submit(tab.page.get_by_role("button", name="Sign out"))
    assert tab.page.url == f"{base}/admin/login" and await tab.page.context.cookies() == []


async def test_a_refused_call_shows_in_the_filtered_trail_and_the_live_tail_adds_the_next(
        tab: Tab, gateway: Deployment) -> None:
    async with sdk_client(gateway.url, gateway.token("alice")) as caller:
        with pytest.raises(MCPError):
            await caller.call_tool("delete_file", {"path": "/etc/passwd"})
        await sign_in(tab, gateway)
        await tab.submit(tab.page.get_by_role("link", name="Audit", exact=True))
        await tab.page.locator("select[name=result]").select_option("denied")
        await tab.submit(tab.page.get_by_role("button", name="Show"))
        rows = tab.page.locator("#trail tbody tr")
        assert await rows.count() == 1
        cells = [c.strip() for c in await rows.first.locator("td").all_inner_texts()]
        assert cells[1:7] == ["denied", "alice", "", "tools/call", "delete_file", "no-grant:tool"]

        await tab.page.evaluate("window.notReloaded = true")
        with pytest.raises(MCPError):
            await caller.call_tool("delete_file", {"path": "/etc/shadow"})
        await rows.nth(1).wait_for(timeout=10_000)  # the live tail put the new one on top
    assert await rows.count() == 2 and await tab.page.evaluate("window.notReloaded") is True
    assert "fresh" in (await rows.first.get_attribute("class") or "")
    assert [c.strip() for c in await rows.first.locator("td").all_inner_texts()][1:6] == [
        "denied", "alice", "", "tools/call", "delete_file"]
    await tab.snap()


async def test_an_approver_approves_a_held_call_and_the_caller_gets_its_result(tab: Tab, tmp_path: Path) -> None:
    gateway = deploy("proxy", tmp_path, policy=APPROVAL_POLICY)
    try:
        await sign_in(tab, gateway, "rita")
        async with sdk_client(gateway.url, gateway.token("olga", scopes=(), groups=["ops"])) as caller:
            call = asyncio.ensure_future(caller.call_tool("delete_file", {"path": "/srv/release/old.tar"}))
            pending = tab.page.locator("article.approval")
            deadline = time.monotonic() + 20
            while not await pending.count():
                assert time.monotonic() < deadline and not call.done(), "the held call never showed"
                await asyncio.sleep(0.3)
                await tab.goto(f"{gateway.runtime.config.public_url}/admin/ui/approvals")
            facts = await pending.inner_text()
            assert "olga" in facts and "demo · delete_file" in facts and "/srv/release/old.tar" in facts
            assert not call.done(), "the call must wait for the decision"
            await pending.locator("input[name=reason]").first.fill("release 1.2 cleanup")
            await tab.submit(pending.get_by_role("button", name="Approve"))
            assert (await tab.flash()).startswith("approved ")
            result = await asyncio.wait_for(call, 30)
        assert result.content[0].text == "deleted /srv/release/old.tar"  # type: ignore[union-attr]
        await tab.goto(f"{gateway.runtime.config.public_url}/admin/ui/approvals")
        decided = [c.strip() for c in await tab.page.locator("#decided tbody tr").first.locator("td").all_inner_texts()]
        assert decided[:4] == ["used", "olga", "demo · delete_file", "rita"]
        trail_events = gateway.audit_events()
        [request] = [e for e in trail_events if e["operation"] == "tools/call"]
        assert (request["result"], request["user_id"], request["approval_granted"], request["approver"]) == (
            "allowed", "olga", 1, "rita")
        assert [(e["result"], e["user_id"]) for e in trail_events
                if e["operation"] == "console/approvals:approve"] == [("allowed", "rita")]
    finally:
        gateway.stop()


async def test_a_role_assigned_in_the_console_lets_the_next_call_pass_until_revoked(
        tab: Tab, gateway: Deployment) -> None:
    async with sdk_client(gateway.url, gateway.token("alice")) as caller:
        with pytest.raises(MCPError):
            await caller.call_tool("delete_file", {"path": "/tmp/a"})
        await sign_in(tab, gateway)
        await tab.submit(tab.page.get_by_role("link", name="Roles", exact=True))
        form = tab.page.locator("form.assign")
        await form.locator("input[name=subject]").fill("alice")
        await form.locator("select[name=role]").select_option("operator")
        await form.locator("input[name=expires]").fill("30m")
        await form.locator("input[name=reason]").fill("incident 42")
        await tab.submit(form.get_by_role("button", name="Assign"))
        assert await tab.flash() == "assigned operator to alice for 30m"
        row = tab.page.locator("#assignments tbody tr")
        cells = [c.strip() for c in await row.locator("td").all_inner_texts()]
        assert cells[:4] == ["alice", "any", "operator", "rita"]

        passed = await caller.call_tool("delete_file", {"path": "/tmp/a"})
        assert passed.content[0].text == "deleted /tmp/a"  # type: ignore[union-attr]

        await tab.submit(row.get_by_role("button", name="Revoke"))
        assert (await tab.flash()).startswith("revoked assignment ")
        with pytest.raises(MCPError):
            await caller.call_tool("delete_file", {"path": "/tmp/a"})
    changes = [(op, result, reason.split(":")[0:2], user)
               for op, result, reason, user, _ in events(gateway, "console/roles:") if op != "console/roles:view"]
    assert changes == [("console/roles:assign", "allowed", ["roles", "assigned"], "rita"),
                       ("console/roles:revoke", "allowed", ["roles", "revoked"], "rita")]
    assert [e["result"] for e in gateway.audit_events() if e["operation"] == "tools/call"
            and e["tool_executed"] == "delete_file"] == [
        "denied", "allowed", "denied"]


async def test_a_form_posted_from_another_origin_or_without_the_token_is_refused_and_audited(
        tab: Tab, gateway: Deployment) -> None:
    await sign_in(tab, gateway)
    base = gateway.runtime.config.public_url
    attacker = ServerThread(attacker_app(f"{base}/admin/ui/roles/assign",
                                         {"subject": "mallory", "role": "operator", "reason": "free roles"})).start()
    try:
        async with tab.page.expect_response(lambda r: r.url.endswith("/admin/ui/roles/assign")) as answered:
            await tab.page.goto(attacker.url)
        assert (await answered.value).status == 403
        await tab.page.wait_for_url(f"{base}/admin/ui/roles/assign")
        await tab.snap()
    finally:
        attacker.stop()
    assert "refused" in await tab.page.locator("main").inner_text()
    assert gateway.gateway.call(gateway.runtime.assignments.all()) == []

    await tab.goto(f"{base}/admin/ui/roles")
    form = tab.page.locator("form.assign")
    await form.locator("input[name=subject]").fill("mallory")
    await form.locator("input[name=csrf]").evaluate("input => { input.value = '0'.repeat(64); }")
    wrong = await tab.submit(form.get_by_role("button", name="Assign"))
    assert wrong is not None and wrong.status == 403
    await tab.goto(f"{base}/admin/ui/roles")
    await form.locator("input[name=subject]").fill("mallory")
    await form.locator("input[name=csrf]").evaluate("input => input.remove()")
    missing = await tab.submit(form.get_by_role("button", name="Assign"))
    assert missing is not None and missing.status == 403
    assert gateway.gateway.call(gateway.runtime.assignments.all()) == []
    refused = [(result, reason, user, status)
               for _, result, reason, user, status in events(gateway, "console/roles:assign")]
    assert refused == [("denied", "console:csrf", "rita", 403)] * 3, "each refusal is audited, naming the session"


async def test_a_sign_in_link_opened_from_another_site_signs_in(tab: Tab, gateway: Deployment) -> None:
    """SameSite=Strict withholds the cookie from navigations another site starts (a link in a web chat): the
    sign-in is the form of the page the link opens, so the cookie is set and sent by the gateway's own pages."""
    config = gateway.runtime.config
    link = login_url(config, gateway.runtime.authenticator, "rita")
    chat = ServerThread(site_app({"/": (b"text/html", f'<!doctype html><a href="{link}">console</a>'.encode())}))
    chat.start()
    try:
        port = chat.url.rsplit(":", 1)[1]
        await tab.goto(f"http://localhost:{port}/")  # localhost is another site than 127.0.0.1
        await tab.submit(tab.page.get_by_role("link", name="console"))
        await tab.submit(tab.page.get_by_role("button", name="Sign in as rita"))
        await tab.page.wait_for_url(f"{config.public_url}/admin/")
        assert await tab.page.locator("h1").inner_text() == "Overview"
    finally:
        chat.stop()


async def test_the_upstreams_page_shows_reachability_and_the_stdio_processes(tab: Tab, tmp_path: Path) -> None:
    gateway = deploy_with_stdio(tmp_path)
    try:
        config = gateway.runtime.config
        token = gateway.runtime.authenticator.issue_token(subject="alice", audience=config.resource_url(
            config.upstreams[1]), scopes=["mcp:tools"])
        async with sdk_client(f"{config.public_url}/kit", token) as caller:
            said = await caller.call_tool("echo", {"text": "over stdio"})
            assert said.content[0].text == "over stdio"  # type: ignore[union-attr]
            await sign_in(tab, gateway)
            await tab.submit(tab.page.get_by_role("link", name="Upstreams", exact=True))
        demo = await tab.page.locator("#upstream-demo").inner_text()
        assert "http" in demo and "yes" in demo and "TCP connect in" in demo and "upstream-secret" not in demo
        kit = tab.page.locator("#upstream-kit")
        assert "demo_server.py --stdio" in await kit.inner_text() and "ok" in await kit.inner_text()
        process = [c.strip() for c in await kit.locator("table tbody tr").first.locator("td").all_inner_texts()]
        assert process[0].isdigit() and process[1] == "alice"
    finally:
        gateway.stop()
