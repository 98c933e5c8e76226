"""The external authorization server's signing keys: fetched, cached, refreshed, never fetched per request.

Owns the JWKS of one issuer. Keys are fetched with the async HTTP client
(the event loop never blocks) and handed to `jwt.PyJWKSet`. Two tiers, as
in pyjwt's own client, but asynchronous:

- a routine refresh once the fetched set is older than `jwks_cache_s`;
- an unknown `kid` triggers a fetch at most once per `min_refresh_interval_s`,
  so a flood of made-up kids cannot hammer the IdP.

While the IdP is unreachable the last good keys keep serving; a kid that is
not among them is refused (fail closed). Concurrent lookups share one fetch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import httpx
import jwt

if TYPE_CHECKING:
    from gateway.config import ExternalJwt
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.auth")


class JwksCache:
    """Signing keys of `config.issuer`.

    Args:
        config: issuer, jwks_uri (or discovery), cache and refresh intervals.
        metrics: JWKS refreshes and failures are counted here.
    """

    def __init__(self, config: ExternalJwt, metrics: Metrics | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0
        self._attempted_at = float("-inf")
        self._jwks_uri = config.jwks_uri
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for `kid` (the only key, when the token names none and the set has one), or None."""
        now = time.monotonic()
        found = self._lookup(kid)
        stale = now - self._fetched_at > self._config.jwks_cache_s
        if found is not None and not stale:
            return found
        async with self._lock:
            found = self._lookup(kid)
            stale = time.monotonic() - self._fetched_at > self._config.jwks_cache_s
            if found is not None and not stale:
                return found  # another request refreshed while this one waited
            if time.monotonic() - self._attempted_at >= self._config.min_refresh_interval_s:
                await self._refresh()
            return self._lookup(kid)

    async def ready(self) -> bool:
        """Whether any key is at hand; when none is, one fetch (at most once per refresh interval)."""
        if not self._keys:
            async with self._lock:
                if not self._keys and time.monotonic() - self._attempted_at >= self._config.min_refresh_interval_s:
                    await self._refresh()
        return bool(self._keys)

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        self._attempted_at = time.monotonic()
        try:
            async with httpx.AsyncClient(timeout=5, follow_redirects=False) as client:
                uri = self._jwks_uri or await self._discover(client)
                response = await client.get(uri)
                response.raise_for_status()
                keys = jwt.PyJWKSet.from_dict(response.json()).keys
        except (httpx.HTTPError, ValueError, jwt.PyJWKSetError) as exc:
            log.warning("JWKS of %s unavailable (%s); %d cached keys stay in use",
                        self._config.issuer, exc, len(self._keys))
            self._count("failed")
            return
        self._keys = {key.key_id: key for key in keys if key.key_id is not None} or {
            str(i): key for i, key in enumerate(keys)}
        self._fetched_at = time.monotonic()
        self._count("ok")

    async def _discover(self, client: httpx.AsyncClient) -> str:
        issuer = self._config.issuer.rstrip("/")
        for suffix in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
            response = await client.get(issuer + suffix)
            if response.status_code == 200:
                metadata: dict[str, Any] = response.json()
                if metadata.get("issuer", "").rstrip("/") != issuer:
                    raise ValueError(f"{issuer}{suffix} names another issuer")
                uri = metadata.get("jwks_uri")
                if isinstance(uri, str):
                    self._jwks_uri = uri
                    return uri
        raise ValueError(f"no jwks_uri in {issuer}'s metadata")

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.jwks_refreshes.labels(outcome).inc()
