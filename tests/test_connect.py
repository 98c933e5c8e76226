"""`mcp-gateway connect`: the SDK client over stdio -> connect -> an OAuth-protected MCP endpoint, for real.

The authorization server is oidc-provider (PKCE required, resource
indicators, rotated refresh tokens, dynamic registration); the user's browser
is tests/oidc_browser.py, which Python's `webbrowser` runs from $BROWSER and
which logs in and consents over HTTP. The endpoint is this gateway
(introspecting oidc-provider's opaque tokens, no cache, so a revocation shows at
once) or an MCPServer with the SDK's own auth.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.oauth.client import OAuthHttp
from gateway.oauth.metadata import OAuthClientError
from tests.harness import DEFAULT_POLICY, Deployment, ServerThread, deploy
from tests.sdk_auth import SdkAuthServer
from tests.test_introspection import OidcProvider

MCP_GATEWAY = Path(sys.executable).parent / "mcp-gateway"
BROWSER = Path(__file__).parent / "oidc_browser.py"
ERAS = ["auto", "legacy"]


@dataclass
class User:
    """One person at one machine: their state directory (the token store), their browser, its log."""

    home: Path
    login: str = "alice"
    tamper: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def browser_log(self) -> Path:
        return self.home / "browser.log"

    @property
    def stderr_log(self) -> Path:
        return self.home / "connect.stderr"

    def env(self) -> dict[str, str]:
        env = {"PATH": os.environ["PATH"], "HOME": str(self.home), "XDG_STATE_HOME": str(self.home / "state"),
               "BROWSER": f"{sys.executable} {BROWSER} %s", "OIDC_LOGIN": self.login,
               "OIDC_BROWSER_LOG": str(self.browser_log), **self.extra_env}
        if self.tamper:
            env["OIDC_TAMPER"] = self.tamper
        return env

    def browser_runs(self) -> list[dict[str, Any]]:
        if not self.browser_log.exists():
            return []
        return [json.loads(line) for line in self.browser_log.read_text().splitlines()]

    def stored(self) -> dict[str, Any]:
        path = self.home / "state" / "mcp-gateway" / "tokens.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(MCP_GATEWAY), *args, "--token-store", "file"], env=self.env(),
                              capture_output=True, text=True, timeout=60)

    @asynccontextmanager
    async def connect(self, url: str, era: str, *options: str) -> AsyncIterator[Client]:
        params = StdioServerParameters(command=str(MCP_GATEWAY), env=self.env(),
                                       args=["connect", url, "--token-store", "file", *options])
        with self.stderr_log.open("a") as errlog:
            async with Client(stdio_client(params, errlog=errlog), mode=era) as session:
                yield session


@pytest.fixture
def oidc() -> Iterator[OidcProvider]:
    server = OidcProvider()
    yield server
    server.stop()


@pytest.fixture
def user(tmp_path: Path) -> User:
    home = tmp_path / "home"
    home.mkdir()
    return User(home)


def gateway_behind(tmp_path: Path, oidc: OidcProvider, policy: dict[str, Any] | None = None,
                   **auth: Any) -> Deployment:
    return deploy("proxy", tmp_path, policy=policy, auth={
        "clients": {"signing_key_file": str(tmp_path / "key.pem")},
        "authorization_servers": [oidc.url],
        "introspection": {"url": f"{oidc.url}/token/introspection", "client_id": "gateway",
                          "client_secret": "gateway-secret", "issuer": oidc.url, "cache_s": 0},
        **auth,
    })


@pytest.fixture
def gateway(tmp_path: Path, oidc: OidcProvider) -> Iterator[Deployment]:
    directory = tmp_path / "gateway"
    directory.mkdir()
    deployment = gateway_behind(directory, oidc)
    yield deployment
    deployment.stop()


def grant_of(user: User, url: str) -> dict[str, Any]:
    [grant] = [g for key, g in user.stored().items() if key == url]
    return grant


def revoke_at(oidc: OidcProvider, token: str, client_id: str) -> None:
    httpx.post(f"{oidc.url}/token/revocation", data={"token": token, "client_id": client_id}).raise_for_status()


@pytest.mark.parametrize("era", ERAS)
async def test_connect_logs_in_with_pkce_and_carries_the_host_through_the_gateway(
        gateway: Deployment, user: User, era: str) -> None:
    async with user.connect(gateway.url, era) as session:
        tools = {t.name for t in (await session.list_tools()).tools}
        called = await session.call_tool("echo", {"text": "from a stdio host"})
        read = await session.read_resource("file:///srv/docs/readme")
    assert "echo" in tools and "delete_file" not in tools
    assert called.content[0].text == "from a stdio host"  # type: ignore[union-attr]
    assert read.contents[0].text == "The demo docs."  # type: ignore[union-attr]

    [run] = user.browser_runs()
    query = dict(httpx.URL(run["authorize_url"]).params)
    assert query["code_challenge_method"] == "S256" and query["resource"] == gateway.url
    assert "code_verifier" not in query
    grant = grant_of(user, gateway.url)
    assert grant["issuer"] == gateway.runtime.config.auth.authorization_servers[0]
    assert grant["tokens"]["refresh_token"] and grant["client"]["auth_method"] == "none"  # registered (RFC 7591)
    served = [e for e in gateway.audit_events() if e["operation"] == "tools/call"]
    assert [(e["user_id"], e["result"]) for e in served] == [("alice", "allowed")]
    assert all("authorization" not in r.headers for r in gateway.recorder.requests)


async def test_a_second_connect_reuses_the_kept_tokens_without_a_browser(gateway: Deployment, user: User) -> None:
    for text in ("first", "second"):
        async with user.connect(gateway.url, "auto") as session:
            assert (await session.call_tool("echo", {"text": text})).content[0].text == text  # type: ignore[union-attr]
    assert len(user.browser_runs()) == 1


async def test_a_preregistered_client_id_is_used_as_given(gateway: Deployment, user: User) -> None:
    async with user.connect(gateway.url, "auto", "--client-id", "mcp-desktop") as session:
        await session.call_tool("echo", {"text": "pre-registered"})
    [run] = user.browser_runs()
    assert dict(httpx.URL(run["authorize_url"]).params)["client_id"] == "mcp-desktop"
    assert grant_of(user, gateway.url)["client"]["client_id"] == "mcp-desktop"


async def test_a_401_is_answered_by_one_refresh_with_the_rotated_refresh_token_kept(tmp_path: Path, user: User
                                                                                     ) -> None:
    # A token the server stopped accepting before the client expected (a clock running fast, an early expiry):
    # the kept expiry is pushed out, then the token lives out its real two seconds.
    oidc = OidcProvider(env={"OIDC_ACCESS_TTL": "2"})
    deployment = gateway_behind(tmp_path, oidc)
    try:
        async with user.connect(deployment.url, "auto", "--client-id", "mcp-desktop") as session:
            await session.call_tool("echo", {"text": "before"})
        stored = user.stored()
        before = stored[deployment.url]["tokens"]
        before["expires_at"] = time.time() + 3600
        (user.home / "state" / "mcp-gateway" / "tokens.json").write_text(json.dumps(stored))
        time.sleep(2)  # the token's real lifetime
        async with user.connect(deployment.url, "auto", "--client-id", "mcp-desktop") as session:
            after_call = await session.call_tool("echo", {"text": "after the server refused the token"})
        assert after_call.content[0].text == "after the server refused the token"  # type: ignore[union-attr]
        after = grant_of(user, deployment.url)["tokens"]
        assert after["access_token"] != before["access_token"]
        assert after["refresh_token"] != before["refresh_token"], "the rotated refresh token was not kept"
        assert len(user.browser_runs()) == 1, "a refresh, not a new login"
        refused = [e["reason"] for e in deployment.audit_events() if e["result"] == "auth_failed"]
        assert len(refused) == 2  # the first, token-less request; then the token the server no longer took
    finally:
        deployment.stop()
        oidc.stop()


async def test_a_token_about_to_expire_is_refreshed_before_it_is_sent(tmp_path: Path, user: User) -> None:
    oidc = OidcProvider(env={"OIDC_ACCESS_TTL": "2"})
    deployment = gateway_behind(tmp_path, oidc)
    try:
        async with user.connect(deployment.url, "auto") as session:
            await session.call_tool("echo", {"text": "one"})
            first = grant_of(user, deployment.url)["tokens"]
            time.sleep(2)  # the token's lifetime: its running out is what is tested
            await session.call_tool("echo", {"text": "two"})
        second = grant_of(user, deployment.url)["tokens"]
        assert second["access_token"] != first["access_token"]
        failed = [e for e in deployment.audit_events() if e["result"] == "auth_failed"]
        assert len(failed) == 1, "only the first, token-less request may be refused: the refresh came first"
    finally:
        deployment.stop()
        oidc.stop()


async def test_logout_revokes_so_the_old_token_is_refused_and_forgets_it(gateway: Deployment, user: User) -> None:
    async with user.connect(gateway.url, "legacy") as session:
        await session.call_tool("echo", {"text": "logged in"})
    held = grant_of(user, gateway.url)["tokens"]["access_token"]
    listing = user.cli("tokens", "list")
    assert gateway.url in listing.stdout and "refresh=yes" in listing.stdout and held not in listing.stdout

    logout = user.cli("logout", gateway.url)
    assert logout.returncode == 0, logout.stderr
    assert "refresh token revoked" in logout.stdout and "access token revoked" in logout.stdout
    assert user.stored() == {}
    assert gateway.url not in user.cli("tokens", "list").stdout
    answer = httpx.post(gateway.url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                        headers={"authorization": f"Bearer {held}", "accept": "application/json, text/event-stream"})
    assert answer.status_code == 401


def operator_by_scope(tmp_path: Path, oidc: OidcProvider, scope: str) -> Deployment:
    """A gateway whose metadata offers mcp:tools only, and whose policy makes `scope` an operator: what a
    reader needs to call delete_file is a step-up to `scope`."""
    policy = {**DEFAULT_POLICY, "bindings": [*DEFAULT_POLICY["bindings"],
                                             {"when": {"scope": scope}, "roles": ["operator"]}]}
    return gateway_behind(tmp_path, oidc, policy, scopes_supported=["mcp:tools"])


async def test_insufficient_scope_steps_up_to_the_union_of_the_scopes(
        tmp_path: Path, oidc: OidcProvider, user: User) -> None:
    deployment = operator_by_scope(tmp_path, oidc, "mcp:admin")
    try:
        async with user.connect(deployment.url, "auto") as session:
            await session.call_tool("echo", {"text": "a reader"})
            deleted = await session.call_tool("delete_file", {"path": "/tmp/x"})
            assert deleted.content[0].text.startswith("deleted")  # type: ignore[union-attr]
        runs = user.browser_runs()
        assert len(runs) == 2
        assert dict(httpx.URL(runs[1]["authorize_url"]).params)["scope"] == "mcp:admin mcp:tools"
        assert grant_of(user, deployment.url)["tokens"]["scope"] == "mcp:admin mcp:tools"
    finally:
        deployment.stop()


async def test_step_up_that_does_not_get_the_scope_is_tried_once(tmp_path: Path, oidc: OidcProvider,
                                                                 user: User) -> None:
    # mcp:root is a scope the policy grants by but the authorization server does not issue
    deployment = operator_by_scope(tmp_path, oidc, "mcp:root")
    try:
        async with user.connect(deployment.url, "auto") as session:
            await session.call_tool("echo", {"text": "a reader"})
            for _ in range(2):
                with pytest.raises(MCPError) as refused:
                    await session.call_tool("delete_file", {"path": "/tmp/x"})
        assert "Authorization failed" in refused.value.error.message
        assert len(user.browser_runs()) <= 2, "the step-up was tried more than once"
        assert not [r for r in deployment.recorder.requests if b"delete_file" in r.body]
    finally:
        deployment.stop()


@pytest.mark.parametrize(("tamper", "refusal"), [
    ("state", "state does not match"),
    ("iss", "mix-up"),
    ("drop_iss", "carries no iss"),
])
async def test_a_forged_redirect_is_refused_and_nothing_is_kept(gateway: Deployment, user: User, tamper: str,
                                                               refusal: str) -> None:
    user.tamper = tamper
    with pytest.raises(BaseException) as failed:  # the SDK wraps the first request's error in groups
        async with user.connect(gateway.url, "legacy") as session:
            await session.list_tools()
    assert refusal in str(_innermost(failed.value))
    assert user.stored() == {}
    assert refusal in user.stderr_log.read_text()
    assert not [r for r in gateway.recorder.requests if r.method == "POST"]


def _innermost(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


@pytest.mark.parametrize("era", ERAS)
async def test_connect_reaches_an_mcp_server_with_the_sdks_own_auth(oidc: OidcProvider, user: User,
                                                                    era: str) -> None:
    server = SdkAuthServer(oidc.url)
    try:
        async with user.connect(server.url, era) as session:
            called = await session.call_tool("echo", {"text": "not this gateway"})
        assert called.content[0].text == "not this gateway"  # type: ignore[union-attr]
        [run] = user.browser_runs()
        assert dict(httpx.URL(run["authorize_url"]).params)["resource"] == server.url
    finally:
        server.stop()


def metadata_server(oidc: OidcProvider, change: dict[str, Any]) -> ServerThread:
    """A resource whose metadata names an authorization server that serves oidc-provider's real metadata,
    changed by `change`: what a misconfigured or hostile server would publish."""
    real = httpx.get(f"{oidc.url}/.well-known/openid-configuration").json()
    thread: ServerThread

    async def resource(_: Any) -> Response:
        return JSONResponse({"resource": f"{thread.url}/mcp", "authorization_servers": [thread.url]})

    async def server(_: Any) -> Response:
        return JSONResponse({**real, "issuer": thread.url, **change})

    thread = ServerThread(Starlette(routes=[Route("/.well-known/oauth-protected-resource/mcp", resource),
                                            Route("/.well-known/oauth-authorization-server", server)]))
    return thread.start()


@pytest.mark.parametrize(("change", "refusal"), [
    ({"code_challenge_methods_supported": ["plain"]}, "does not offer PKCE with S256"),
    ({"issuer": "https://as.example"}, "names the issuer 'https://as.example'"),
    ({"token_endpoint": "http://as.example/token"}, "is not an HTTPS URL"),
])
async def test_unsafe_authorization_server_metadata_is_refused(oidc: OidcProvider, change: dict[str, Any],
                                                               refusal: str) -> None:
    thread = metadata_server(oidc, change)
    try:
        async with httpx.AsyncClient() as http:
            with pytest.raises(OAuthClientError, match=refusal):
                await OAuthHttp(http).discover(f"{thread.url}/mcp", {})
    finally:
        thread.stop()


async def test_no_token_secret_or_verifier_reaches_any_log(gateway: Deployment, user: User, oidc: OidcProvider,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    async with user.connect(gateway.url, "legacy") as session:
        await session.call_tool("echo", {"text": "logged"})
        first = grant_of(user, gateway.url)
        revoke_at(oidc, first["tokens"]["access_token"], first["client"]["client_id"])
        await session.call_tool("echo", {"text": "refreshed"})
    second = grant_of(user, gateway.url)
    assert user.cli("logout", gateway.url).returncode == 0
    logs = "\n".join([user.stderr_log.read_text(), user.browser_log.read_text(), caplog.text])
    secrets = {grant["tokens"][kind] for grant in (first, second) for kind in ("access_token", "refresh_token")}
    assert len(secrets) == 4
    assert not [s for s in secrets if s in logs]
    challenges = {dict(httpx.URL(run["authorize_url"]).params)["code_challenge"] for run in user.browser_runs()}
    for word in set(re.findall(r"[A-Za-z0-9_~.-]{43,128}", logs)):
        digest = base64.urlsafe_b64encode(hashlib.sha256(word.encode()).digest()).rstrip(b"=").decode()
        assert digest not in challenges, "a PKCE code verifier was logged"


async def test_no_browser_prints_the_url_for_the_user_to_open(gateway: Deployment, user: User) -> None:
    user.extra_env["BROWSER"] = "false"  # a browser that cannot open: only the printed URL can be followed

    async def the_user() -> None:
        for _ in range(500):
            printed = user.stderr_log.read_text() if user.stderr_log.exists() else ""
            found = re.search(r"^(http://127\.0\.0\.1:\d+/auth\?\S+)$", printed, re.MULTILINE)
            if found:
                opened = await asyncio.create_subprocess_exec(sys.executable, str(BROWSER), found.group(1),
                                                              env=user.env())
                assert await opened.wait() == 0
                return
            await asyncio.sleep(0.02)
        raise AssertionError("no authorization URL was printed")

    user_task = asyncio.get_running_loop().create_task(the_user())
    async with user.connect(gateway.url, "auto", "--no-browser") as session:
        called = await session.call_tool("echo", {"text": "printed, opened by hand"})
    await user_task
    assert called.content[0].text == "printed, opened by hand"  # type: ignore[union-attr]
    assert "opening a browser" not in user.stderr_log.read_text()


def test_a_token_store_others_can_read_is_refused_before_anything_runs(user: User) -> None:
    directory = user.home / "state" / "mcp-gateway"
    directory.mkdir(parents=True, mode=0o700)
    (directory / "tokens.json").write_text("{}")
    (directory / "tokens.json").chmod(0o644)
    for command in (["connect", "https://gw.example/mcp"], ["logout", "https://gw.example/mcp"], ["tokens", "list"]):
        done = user.cli(*command)
        assert done.returncode == 1, command
        assert "chmod 600" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert done.stdout == ""
