"""The test authorization server (tests/node/oidc.mjs, npm oidc-provider) and the browser stand-in
(tests/oidc_browser.py) behave as the authorization tests assume.

The authorization-code flow runs for real: tests/oidc_browser.py plays the user against oidc-provider, and the
code lands at a loopback receiver the test runs, as it would at a desktop client's redirect_uri.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from tests.test_introspection import OidcProvider

BROWSER = Path(__file__).resolve().parent / "oidc_browser.py"
RESOURCE = "http://127.0.0.1:65000/mcp"
UPSTREAM = "http://127.0.0.1:65001/upstream"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


class Receiver:
    """A desktop client's loopback redirect receiver: records the query of every request it gets, answers 200."""

    def __init__(self) -> None:
        self.queries: list[dict[str, str]] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                receiver.paths.append(parts.path)
                receiver.queries.append({k: v[0] for k, v in parse_qs(parts.query).items()})
                body = b"you may close this window"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def callback(self) -> str:
        return f"http://127.0.0.1:{self.port}/callback"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def oidc() -> Iterator[OidcProvider]:
    server = OidcProvider()
    yield server
    server.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorization_url(oidc: OidcProvider, client_id: str, redirect_uri: str, state: str,
                      challenge: str | None, resource: str = RESOURCE, scope: str = "mcp:tools") -> str:
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "state": state,
             "scope": scope, "resource": resource}
    if challenge is not None:
        query |= {"code_challenge": challenge, "code_challenge_method": "S256"}
    return f"{oidc.url}/auth?{urlencode(query)}"


def browse(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OIDC_")} | env
    return subprocess.run([sys.executable, str(BROWSER), url], env=environment, capture_output=True, text=True,
                          timeout=60, check=False)


def code_flow(oidc: OidcProvider, receiver: Receiver, client_id: str = "mcp-desktop", login: str = "alice",
              resource: str = RESOURCE) -> dict[str, Any]:
    """Authorize as `login` through the browser stand-in, then redeem the code (PKCE, resource): the token response."""
    verifier, challenge = pkce()
    state = secrets.token_urlsafe(16)
    run = browse(authorization_url(oidc, client_id, receiver.callback, state, challenge, resource), OIDC_LOGIN=login)
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""
    arrived = receiver.queries[-1]
    assert arrived["state"] == state and arrived["iss"] == oidc.url
    response = httpx.post(f"{oidc.url}/token", data={
        "grant_type": "authorization_code", "code": arrived["code"], "redirect_uri": receiver.callback,
        "code_verifier": verifier, "client_id": client_id, "resource": resource})
    assert response.status_code == 200, response.text
    return dict(response.json())


def introspect(oidc: OidcProvider, token: str) -> dict[str, Any]:
    response = httpx.post(f"{oidc.url}/token/introspection", data={"token": token}, auth=("gateway", "gateway-secret"))
    response.raise_for_status()
    return dict(response.json())


def test_metadata_advertises_s256_iss_registration_and_revocation(oidc: OidcProvider) -> None:
    metadata = httpx.get(f"{oidc.url}/.well-known/oauth-authorization-server").json()
    assert metadata["issuer"] == oidc.url
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["authorization_response_iss_parameter_supported"] is True
    assert metadata["registration_endpoint"] == f"{oidc.url}/reg"
    assert metadata["revocation_endpoint"] == f"{oidc.url}/token/revocation"
    assert metadata["introspection_endpoint"] == f"{oidc.url}/token/introspection"
    assert {"authorization_code", "refresh_token", "client_credentials", TOKEN_EXCHANGE} <= set(
        metadata["grant_types_supported"])
    assert "implicit" not in metadata["grant_types_supported"]
    assert "none" in metadata["token_endpoint_auth_methods_supported"]


def test_desktop_code_flow_with_pkce_resource_and_rotating_refresh_tokens(
        oidc: OidcProvider, receiver: Receiver, tmp_path: Path) -> None:
    verifier, challenge = pkce()
    log = tmp_path / "browser.jsonl"
    url = authorization_url(oidc, "mcp-desktop", receiver.callback, "st-1", challenge)
    run = browse(url, OIDC_BROWSER_LOG=str(log))
    assert (run.returncode, run.stdout) == (0, ""), run.stderr
    # registered as http://127.0.0.1/callback: the loopback port of the request is accepted (RFC 8252 7.3)
    assert receiver.paths == ["/callback"]
    arrived = receiver.queries[0]
    assert arrived["state"] == "st-1" and arrived["iss"] == oidc.url and arrived["code"]
    entry = json.loads(log.read_text())
    assert entry["authorize_url"] == url and entry["status"] == 200
    assert entry["redirect"].startswith(f"{receiver.callback}?")

    form = {"grant_type": "authorization_code", "code": arrived["code"], "redirect_uri": receiver.callback,
            "client_id": "mcp-desktop", "resource": RESOURCE}
    wrong = httpx.post(f"{oidc.url}/token", data=form | {"code_verifier": pkce()[0]})
    assert (wrong.status_code, wrong.json()["error"]) == (400, "invalid_grant")
    tokens = httpx.post(f"{oidc.url}/token", data=form | {"code_verifier": verifier}).json()
    assert tokens["token_type"] == "Bearer" and tokens["scope"] == "mcp:tools"
    assert "." not in tokens["access_token"] and "id_token" not in tokens  # opaque, and no OpenID Connect
    assert tokens["refresh_token"]  # no offline_access asked for
    seen = introspect(oidc, tokens["access_token"])
    assert (seen["active"], seen["sub"], seen["aud"], seen["client_id"], seen["scope"]) == (
        True, "alice", RESOURCE, "mcp-desktop", "mcp:tools")

    refresh = {"grant_type": "refresh_token", "client_id": "mcp-desktop", "resource": RESOURCE}
    renewed = httpx.post(f"{oidc.url}/token", data=refresh | {"refresh_token": tokens["refresh_token"]}).json()
    assert renewed["refresh_token"] not in (None, tokens["refresh_token"])  # rotated
    assert introspect(oidc, renewed["access_token"])["aud"] == RESOURCE
    reused = httpx.post(f"{oidc.url}/token", data=refresh | {"refresh_token": tokens["refresh_token"]})
    assert (reused.status_code, reused.json()["error"]) == (400, "invalid_grant")
    # oidc-provider treats the reuse as theft: the whole grant, the rotated refresh token with it, is revoked
    again = httpx.post(f"{oidc.url}/token", data=refresh | {"refresh_token": renewed["refresh_token"]})
    assert (again.status_code, again.json()["error"]) == (400, "invalid_grant")


def test_the_browser_tampers_with_the_redirect_on_request_and_fails_loudly(
        oidc: OidcProvider, receiver: Receiver, tmp_path: Path) -> None:
    expected = {"state": ("tampered-state", oidc.url), "iss": ("st-t", "http://evil.example"),
                "drop_iss": ("st-t", None)}
    for how, (state, iss) in expected.items():
        run = browse(authorization_url(oidc, "mcp-desktop", receiver.callback, "st-t", pkce()[1]), OIDC_TAMPER=how)
        assert (run.returncode, run.stdout) == (0, ""), run.stderr
        arrived = receiver.queries[-1]
        assert arrived["code"] and (arrived["state"], arrived.get("iss")) == (state, iss), how
    log = tmp_path / "browser.jsonl"
    unknown = f"{oidc.url}/auth?" + urlencode({"client_id": "nobody", "response_type": "code", "scope": "mcp:tools"})
    failed = browse(unknown, OIDC_BROWSER_LOG=str(log))
    assert (failed.returncode, failed.stdout) == (1, "") and "oidc_browser:" in failed.stderr
    entry = json.loads(log.read_text())
    assert (entry["authorize_url"], entry["redirect"], entry["status"]) == (unknown, None, None) and entry["error"]
    assert len(receiver.queries) == 3


def test_authorization_requests_without_s256_pkce_or_with_an_unregistered_path_are_refused(
        oidc: OidcProvider, receiver: Receiver) -> None:
    for challenge in (None, "plain"):
        url = authorization_url(oidc, "mcp-desktop", receiver.callback, "st-2", None)
        if challenge == "plain":
            url += "&code_challenge=" + "a" * 43 + "&code_challenge_method=plain"
        refused = httpx.get(url)
        assert refused.status_code == 303
        location = refused.headers["location"]
        assert location.startswith(f"{receiver.callback}?")
        query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
        assert (query["error"], query["state"], query["iss"]) == ("invalid_request", "st-2", oidc.url)
        assert "code" not in query
    # the port may vary, the path may not: an unregistered redirect_uri gets an error page, no redirect
    _, challenge = pkce()
    elsewhere = httpx.get(authorization_url(oidc, "mcp-desktop", f"http://127.0.0.1:{receiver.port}/other", "s",
                                            challenge))
    assert elsewhere.status_code == 400 and "location" not in elsewhere.headers
    assert receiver.queries == []


def test_a_dynamically_registered_native_client_completes_the_flow(oidc: OidcProvider, receiver: Receiver) -> None:
    registered = httpx.post(f"{oidc.url}/reg", json={
        "client_name": "desktop app", "application_type": "native", "token_endpoint_auth_method": "none",
        "redirect_uris": [receiver.callback], "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"], "scope": "mcp:tools mcp:read"})
    assert registered.status_code == 201, registered.text
    client = registered.json()
    assert client["token_endpoint_auth_method"] == "none" and "client_secret" not in client
    tokens = code_flow(oidc, receiver, client_id=client["client_id"], login="bob")
    assert tokens["refresh_token"]
    seen = introspect(oidc, tokens["access_token"])
    assert (seen["active"], seen["sub"], seen["aud"], seen["client_id"]) == (True, "bob", RESOURCE,
                                                                            client["client_id"])


def test_token_exchange_for_another_resource(oidc: OidcProvider, receiver: Receiver) -> None:
    alice = code_flow(oidc, receiver)["access_token"]
    exchange = {"grant_type": TOKEN_EXCHANGE, "subject_token": alice, "subject_token_type": ACCESS_TOKEN_TYPE,
                "resource": UPSTREAM}
    basic = ("gateway-upstream", "gateway-upstream-secret")
    response = httpx.post(f"{oidc.url}/token", data=exchange, auth=basic)
    assert response.status_code == 200, response.text
    issued = response.json()
    assert (issued["issued_token_type"], issued["token_type"], issued["scope"]) == (
        ACCESS_TOKEN_TYPE, "Bearer", "mcp:tools")
    assert issued["expires_in"] > 0 and "refresh_token" not in issued
    seen = introspect(oidc, issued["access_token"])
    assert (seen["active"], seen["sub"], seen["aud"], seen["client_id"], seen["scope"]) == (
        True, "alice", UPSTREAM, "gateway-upstream", "mcp:tools")

    posted = httpx.post(f"{oidc.url}/token", data=exchange | {
        "client_id": "gateway-upstream", "client_secret": "gateway-upstream-secret"})
    assert posted.status_code == 200, posted.text  # client_secret_post as well

    def refused(**changes: str) -> tuple[int, str]:
        answer = httpx.post(f"{oidc.url}/token", data=exchange | changes, auth=basic)
        return answer.status_code, answer.json()["error"]

    assert refused(subject_token="made-up-token") == (400, "invalid_grant")
    assert refused(scope="mcp:tools mcp:admin") == (400, "invalid_scope")  # more than the subject token holds
    assert refused(subject_token_type="urn:ietf:params:oauth:token-type:id_token") == (400, "invalid_request")
    assert refused(resource="https://elsewhere.example/") == (400, "invalid_target")
    no_resource = httpx.post(f"{oidc.url}/token", data={k: v for k, v in exchange.items() if k != "resource"},
                             auth=basic)
    assert (no_resource.status_code, no_resource.json()["error"]) == (400, "invalid_target")
    not_allowed = httpx.post(f"{oidc.url}/token", data=exchange, auth=("mcp-client", "mcp-client-secret"))
    assert not_allowed.status_code == 400
    revoked = httpx.post(f"{oidc.url}/token/revocation", data={"token": alice, "client_id": "mcp-desktop"})
    assert revoked.status_code == 200  # by its own client: oidc-provider lets no other client revoke it
    assert introspect(oidc, alice)["active"] is False
    assert refused() == (400, "invalid_grant")


def test_access_token_lifetime_comes_from_oidc_access_ttl(receiver: Receiver) -> None:
    short = OidcProvider(env={"OIDC_ACCESS_TTL": "2"})
    try:
        response = httpx.post(f"{short.url}/token", data={
            "grant_type": "client_credentials", "resource": RESOURCE, "scope": "mcp:tools"},
            auth=("mcp-client", "mcp-client-secret"))
        assert response.json()["expires_in"] == 2
        tokens = code_flow(short, receiver)
        assert tokens["expires_in"] == 2
        seen = introspect(short, tokens["access_token"])
        assert seen["exp"] - seen["iat"] == 2
    finally:
        short.stop()
