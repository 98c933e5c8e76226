"""A user's authorization for one MCP server, and keeping it usable: login, refresh, step-up, logout.

Owns the MCP authorization flow as a desktop client runs it: discovery from
the server's 401 challenge, who the client is (in order: a pre-registered
`--client-id`, a Client ID Metadata Document URL when the server supports
them, RFC 7591 registration), the browser (or the URL printed), the loopback
redirect, the code exchange; then, per request, a token refreshed ahead of its
expiry, one refresh (else a new login) on a 401, one step-up to the union of
the scopes on a 403 `insufficient_scope`, and every change written to the
token store. The tokens themselves never reach a message or a log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
import webbrowser
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from gateway.oauth.client import ClientIdentity, OAuthHttp, TokenRefused
from gateway.oauth.grants import Tokens, authorization_request, code_from_redirect
from gateway.oauth.loopback import RedirectReceiver
from gateway.oauth.metadata import OAuthClientError, ServerMetadata, canonical_url, scopes, trusted_url
from gateway.oauth.store import TokenStore

log = logging.getLogger("gateway.oauth")

@dataclass(frozen=True, slots=True)
class Grant:
    """What is kept for one MCP server: whose tokens, for which resource, from which authorization server."""

    server_url: str
    resource: str
    issuer: str
    client: ClientIdentity
    tokens: Tokens

    def as_json(self) -> dict[str, Any]:
        return {"server_url": self.server_url, "resource": self.resource, "issuer": self.issuer,
                "client": self.client.as_json(), "tokens": self.tokens.as_json()}

    @classmethod
    def from_json(cls, stored: Mapping[str, Any]) -> Grant:
        return cls(str(stored["server_url"]), str(stored["resource"]), str(stored["issuer"]),
                   ClientIdentity.from_json(stored["client"]), Tokens.from_json(stored["tokens"]))


@dataclass(frozen=True, slots=True)
class ClientChoice:
    """How the user asked the client to identify itself (all None: dynamic registration)."""

    client_id: str | None = None
    client_secret: str | None = None
    client_metadata_url: str | None = None
    scopes: frozenset[str] = frozenset()


class Authorization:
    """The authorization of one user for one MCP server URL, loaded from and saved to `store`.

    Args:
        http: the OAuth requests.
        store: where the grant is kept (key: the server URL in canonical form).
        server_url: the MCP endpoint.
        choice: how the client identifies itself, and scopes asked for on every login.
        open_browser: False prints the authorization URL instead of opening a browser.
        announce: how to tell the user something (a line on stderr; never stdout, the MCP channel).
        login_timeout_s: how long a login waits for the browser's redirect.
    """

    def __init__(self, http: OAuthHttp, store: TokenStore, server_url: str, choice: ClientChoice, *,
                 open_browser: bool = True, announce: Callable[[str], None] = print,
                 login_timeout_s: float = 300.0, clock: Callable[[], float] = time.time) -> None:
        self._http = http
        self._store = store
        self.key = canonical_url(server_url)
        self._server_url = server_url
        self._choice = choice
        self._open_browser = open_browser
        self._announce = announce
        self._timeout = login_timeout_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._servers: dict[str, ServerMetadata] = {}
        self._stepped_up: frozenset[str] | None = None
        self._attempt = 0  # logins started
        self._failed: OAuthClientError | None = None  # how the last one failed, if it did
        stored = store.get(self.key)
        self.grant = Grant.from_json(stored) if stored is not None else None

    async def token(self) -> str | None:
        """The access token to send now, refreshed first when it is about to expire; None before any login."""
        grant = self.grant
        if grant is None or not grant.tokens.expiring(self._clock()):
            return None if grant is None else grant.tokens.access_token
        async with self._lock:
            grant = self._reloaded()
            if grant is not None and grant.tokens.expiring(self._clock()) and grant.tokens.refresh_token:
                try:
                    await self._refresh(grant)
                except OAuthClientError as exc:
                    log.warning("refresh failed (%s); the next 401 starts a new login", exc)
            return None if self.grant is None else self.grant.tokens.access_token

    async def unauthorized(self, challenge: Mapping[str, str], sent: str | None) -> None:
        """A 401 to a request sent with `sent`: refresh once, else log in again (unless another task already did,
        or a login failed while this request waited: then its error, not another browser window)."""
        attempt = self._attempt
        async with self._lock:
            if self._settled(sent, attempt):
                return
            grant = self.grant
            if grant is not None and grant.tokens.refresh_token is not None:
                try:
                    await self._refresh(grant)
                    return
                except TokenRefused as exc:
                    log.info("%s: logging in again", exc)
            await self._login(challenge, self._stepped_up or frozenset())

    async def insufficient_scope(self, challenge: Mapping[str, str], sent: str | None) -> None:
        """A 403 insufficient_scope: log in once more asking for the union of the scopes (step-up), once."""
        attempt = self._attempt
        async with self._lock:
            if self._settled(sent, attempt):
                return
            grant = self.grant
            held = grant.tokens.scope if grant is not None else frozenset()
            wanted = held | scopes(challenge.get("scope")) | self._choice.scopes
            if self._stepped_up is not None and wanted <= self._stepped_up:
                raise OAuthClientError(f"the server still needs scope {challenge.get('scope')!r} after the "
                                       "authorization was stepped up to it: the account is not granted it")
            self._stepped_up = wanted
            await self._login(challenge, wanted)

    async def logout(self) -> list[str]:
        """Revoke (RFC 7009) what is held and forget it; what was revoked, in words."""
        grant = self.grant
        if grant is None:
            return []
        done = []
        try:
            server = await self._server(grant.issuer)
            for hint, token in (("refresh_token", grant.tokens.refresh_token),
                                ("access_token", grant.tokens.access_token)):
                if token is not None and await self._http.revoke(server, grant.client, token, hint):
                    done.append(f"{hint.replace('_', ' ')} revoked at {server.issuer}")
        finally:
            self._store.delete(self.key)
            self.grant = None
        return done

    def _settled(self, sent: str | None, attempt: int) -> bool:
        """Under the lock, for a refusal of `sent`: True when another task has replaced the token meanwhile (the
        request is sent again with the new one); raises how a login started meanwhile failed."""
        grant = self._reloaded()
        if grant is not None and grant.tokens.access_token != sent:
            return True
        if self._attempt != attempt and self._failed is not None:
            raise self._failed
        return False

    def _reloaded(self) -> Grant | None:
        """The grant as the store has it now: another `connect` may have refreshed it (rotating the refresh
        token this one holds), or `logout` removed it."""
        stored = self._store.get(self.key)
        self.grant = Grant.from_json(stored) if stored is not None else None
        return self.grant

    async def _refresh(self, grant: Grant) -> None:
        server = await self._server(grant.issuer)
        try:
            tokens = await self._http.refresh(server, grant.client, grant.tokens, grant.resource)
        except TokenRefused as exc:
            if exc.error == "invalid_grant":  # dead: never sent again
                self._save(replace(grant, tokens=replace(grant.tokens, refresh_token=None)))
            raise
        self._save(replace(grant, tokens=tokens))
        log.info("access token for %s refreshed", self._server_url)

    async def _login(self, challenge: Mapping[str, str], wanted: frozenset[str]) -> None:
        self._attempt += 1
        try:
            await self._log_in(challenge, wanted)
        except OAuthClientError as exc:
            self._failed = exc
            raise
        self._failed = None

    async def _log_in(self, challenge: Mapping[str, str], wanted: frozenset[str]) -> None:
        resource, server = await self._http.discover(self._server_url, challenge)
        asked = wanted or scopes(challenge.get("scope")) or frozenset(resource.scopes_supported)
        asked |= self._choice.scopes
        async with RedirectReceiver() as receiver:
            client = await self._identify(server, receiver.redirect_uri)
            request = authorization_request(server, client.client_id, receiver.redirect_uri, resource.resource,
                                            asked)
            await self._show(request.url, server.issuer)
            params = await receiver.wait(self._timeout)
        code = code_from_redirect(request, server, params)
        tokens = await self._http.exchange_code(server, client, request, code)
        self._servers[server.issuer] = server
        self._save(Grant(self.key, resource.resource, server.issuer, client, tokens))
        self._announce(f"mcp-gateway: authorized at {server.issuer} (scope: {' '.join(sorted(tokens.scope))})")

    async def _identify(self, server: ServerMetadata, redirect_uri: str) -> ClientIdentity:
        known = client_identity(self._choice, server, self.grant)
        if known is not None:
            return known
        return await self._http.register(server, redirect_uri, "mcp-gateway connect")

    async def _show(self, url: str, issuer: str) -> None:
        if self._open_browser:
            self._announce(f"mcp-gateway: opening a browser to authorize at {issuer}")
            # a browser command may run until it exits: in a thread, so the redirect can arrive meanwhile
            if await asyncio.to_thread(webbrowser.open, url):
                return
        self._announce(f"mcp-gateway: to authorize, open this URL in a browser:\n{url}")

    async def _server(self, issuer: str) -> ServerMetadata:
        if issuer not in self._servers:
            self._servers[issuer] = await self._http.server_metadata(issuer)
        return self._servers[issuer]

    def _save(self, grant: Grant) -> None:
        self.grant = grant
        self._store.put(self.key, grant.as_json())


def client_metadata_url(value: str) -> str:
    """A Client ID Metadata Document URL as the MCP specification requires it: HTTPS, with a path."""
    if not trusted_url(value) or not value.startswith("https://") or value.rstrip("/").count("/") < 3:
        raise OAuthClientError(f"--client-metadata-url {value!r} must be an https:// URL with a path")
    return value


def client_identity(choice: ClientChoice, server: ServerMetadata, grant: Grant | None) -> ClientIdentity | None:
    """Who the client is to `server`, in the MCP order; None: register one (RFC 7591).

    A pre-registered client id first (with its secret, if it has one, sent as the server prefers), then a
    Client ID Metadata Document URL (only where the server accepts them), then the client registered for this
    server's issuer before: reused, so that a new login keeps what the server binds to the client (a grant, a
    gateway's legacy session); a loopback redirect may use any port (RFC 8252 7.3).
    """
    if choice.client_id is not None:
        if choice.client_secret is None:
            return ClientIdentity(choice.client_id)
        post = "client_secret_basic" not in server.auth_methods and "client_secret_post" in server.auth_methods
        return ClientIdentity(choice.client_id, choice.client_secret,
                              "client_secret_post" if post else "client_secret_basic")
    if choice.client_metadata_url is not None:
        if not server.client_id_metadata_documents:
            raise OAuthClientError(f"authorization server {server.issuer} does not accept Client ID Metadata "
                                   "Documents (client_id_metadata_document_supported): give --client-id, or "
                                   "neither, to register dynamically")
        return ClientIdentity(choice.client_metadata_url)
    if grant is not None and grant.issuer == server.issuer:
        return grant.client
    return None
