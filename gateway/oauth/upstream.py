"""Tokens the gateway obtains itself for an upstream that requires its own (`upstreams[].oauth`).

Owns getting, caching and dropping them: `client_credentials` gives one token
for the gateway; `token_exchange` (RFC 8693) exchanges each caller's validated
token for one whose audience is the upstream, cached per caller token. A token
is fetched once and reused until a tenth of its life (at most a minute) is
left; callers arriving while it is fetched wait for that one fetch, which runs
as its own task so that a caller going away cancels nobody else's. The token
endpoint is the configured one, or discovered from the upstream's RFC 9728
metadata at its well-known URL, and then only from the configured `issuer`
when one is set (config requires `token_url` or `issuer` for token exchange:
an upstream must not choose where callers' tokens are sent). A token the
upstream answered 401 to is dropped, so the next call fetches a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx
from cachetools import TTLCache

from gateway.config_auth import UpstreamOAuth
from gateway.oauth.client import ClientIdentity, OAuthHttp
from gateway.oauth.grants import Tokens
from gateway.oauth.metadata import OAuthClientError

log = logging.getLogger("gateway.oauth")

_EXCHANGED_MAX = 10_000  # callers whose exchanged tokens are kept at once
_EXCHANGED_TTL_S = 3600.0  # and for at most this long, whatever lifetime they were issued with


class UpstreamCredential:
    """The `Authorization` value for requests to one upstream.

    Args:
        upstream: the upstream's name (for log lines and metrics).
        url: the upstream's URL: the RFC 8707 resource unless `settings.resource` names another.
        settings: the upstream's `oauth` section.
        on_fetch: called with "ok" or "failed" after each request to the token endpoint.
    """

    def __init__(self, upstream: str, url: str, settings: UpstreamOAuth,
                 on_fetch: Callable[[str], None] = lambda outcome: None,
                 clock: Callable[[], float] = time.time) -> None:
        self._name = upstream
        self._url = url
        self._settings = settings
        self._on_fetch = on_fetch
        self._clock = clock
        self._client = ClientIdentity(settings.client_id, settings.client_secret, settings.auth_method)
        self._http_client = httpx.AsyncClient(timeout=settings.timeout_s)
        self._http = OAuthHttp(self._http_client, clock)
        self._token_url = settings.token_url
        self._own: Tokens | None = None
        self._exchanged: TTLCache[str, Tokens] = TTLCache(_EXCHANGED_MAX, _EXCHANGED_TTL_S)
        self._fetching: dict[str | None, asyncio.Task[Tokens]] = {}

    @property
    def needs_caller_token(self) -> bool:
        return self._settings.grant == "token_exchange"

    async def authorization(self, caller_token: str | None) -> str:
        """`Bearer …` for the next request; fetched (once, however many callers wait) when none is fresh."""
        key = caller_token if self.needs_caller_token else None
        if self.needs_caller_token and caller_token is None:
            raise OAuthClientError("token_exchange needs the caller's token, and this request has none")
        held = self._exchanged.get(key) if key is not None else self._own
        if held is None or held.expiring(self._clock()):
            held = await self._single_flight(key)
        return f"Bearer {held.access_token}"

    def drop(self, authorization: str) -> None:
        """The upstream answered 401 to `authorization`: forget that token."""
        token = authorization.removeprefix("Bearer ")
        if self._own is not None and self._own.access_token == token:
            self._own = None
        for key, held in list(self._exchanged.items()):
            if held.access_token == token:
                self._exchanged.pop(key, None)
        log.warning("upstream %s refused the gateway's token; a new one is fetched for the next call", self._name)

    async def close(self) -> None:
        await self._http_client.aclose()

    async def _single_flight(self, key: str | None) -> Tokens:
        fetch = self._fetching.get(key)
        if fetch is None:
            fetch = asyncio.get_running_loop().create_task(self._fetch(key))
            self._fetching[key] = fetch
            fetch.add_done_callback(lambda done: self._fetched(key, done))
        return await asyncio.shield(fetch)

    def _fetched(self, key: str | None, fetch: asyncio.Task[Tokens]) -> None:
        self._fetching.pop(key, None)
        if not fetch.cancelled():
            fetch.exception()  # read here, so a fetch whose every waiter left is not reported as never read

    async def _fetch(self, caller_token: str | None) -> Tokens:
        settings = self._settings
        resource = settings.resource or self._url
        try:
            token_url = self._token_url or await self._discover()
            if caller_token is None:
                tokens = await self._http.client_credentials(token_url, self._client, frozenset(settings.scopes),
                                                             resource)
                self._own = tokens
            else:
                tokens = await self._http.token_exchange(token_url, self._client, caller_token,
                                                         frozenset(settings.scopes), resource, settings.audience)
                self._exchanged[caller_token] = tokens
        except OAuthClientError as exc:
            self._on_fetch("failed")
            log.error("upstream %s: no token: %s", self._name, exc)
            raise
        self._on_fetch("ok")
        return tokens

    async def _discover(self) -> str:
        _, server = await self._http.discover(self._url, {})
        wanted = self._settings.issuer
        if wanted is not None and server.issuer != wanted:
            raise OAuthClientError(f"the upstream names the authorization server {server.issuer}, not the "
                                   f"configured issuer {wanted}: refused")
        self._token_url = server.token_endpoint
        return server.token_endpoint
