"""The external authorization server's signing keys: fetched, cached, refreshed, never fetched per request.

Owns the JWKS of one issuer: discovering its `jwks_uri` (RFC 8414 / OIDC
metadata) when none is configured, fetching it with the async HTTP client (the
event loop never blocks), keeping only the keys that may verify signatures,
and deciding when a fetch is worth making. What the IdP serves is untrusted
input: a document of any other shape is a failed fetch, never an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import jwt
from cachetools import TTLCache

if TYPE_CHECKING:
    from gateway.config_auth import ExternalJwt
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.auth")

# What a failed fetch raises: the IdP unreachable, an answer other than 200, a document that is no JWKS.
FETCH_ERRORS = (httpx.HTTPError, httpx.InvalidURL, ValueError, RecursionError, jwt.PyJWTError)


class JwksCache:
    """Signing keys of `config.issuer`, fetched when needed and at a bounded rate.

    A fetch is needed when there are no keys yet, when the keys are older than
    `config.jwks_cache_s` (a routine refresh), or when a token names a kid that
    is not among them (a rotation, or a made-up kid). Two tiers keep made-up
    kids cheap for the IdP without holding up a genuine rotation:

    - a token bucket of fetches: `config.refresh_burst` may be made at once, and
      the bucket refills at one per `config.min_refresh_interval_s`. The first
      token signed with a newly published key is accepted at once; a flood of
      distinct made-up kids costs the IdP the burst, then one fetch per interval.
      `min_refresh_interval_s = 0` lifts the limit.
    - a negative cache: a kid that a fetch begun after the token arrived did not
      contain is refused without another fetch for `min_refresh_interval_s`, so
      one made-up kid repeated costs one fetch and leaves the bucket to the
      rotations that need it. It holds at most `negative_cache_size` kids (the
      least recently seen go first; the bucket still bounds what they cost).

    A fetch fails (counted as `jwks_refreshes{outcome="failed"}` and logged) when
    the IdP cannot be reached, answers anything but 200, or serves anything but
    a JSON object with a `keys` list holding at least one signature key: `use`
    absent or `sig`, `key_ops`, when present, including `verify`. The last good
    keys then stay in use, and a kid not among them is refused (fail closed).
    Concurrent lookups share one fetch.

    Args:
        config: issuer, jwks_uri (or discovery), `jwks_cache_s`, `min_refresh_interval_s`, `refresh_burst`.
        metrics: JWKS fetches are counted here by outcome (ok, failed).
        negative_cache_size: how many absent kids to remember.
    """

    def __init__(self, config: ExternalJwt, metrics: Metrics | None = None, *,
                 negative_cache_size: int = 1024) -> None:
        self._config = config
        self._metrics = metrics
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")  # when the fetch that got the current keys began
        self._attempted_at = float("-inf")  # when the last fetch, good or not, began
        self._allowance = float(config.refresh_burst)
        self._allowance_at = time.monotonic()
        self._absent: TTLCache[str | None, bool] | None = (
            TTLCache(maxsize=negative_cache_size, ttl=config.min_refresh_interval_s)
            if config.min_refresh_interval_s > 0 else None)
        self._jwks_uri = config.jwks_uri
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for `kid` (the only key, when the token names none and the set has one), or None."""
        found = self._lookup(kid)
        if found is not None and not self._stale():
            return found
        if found is None and self._absent is not None and kid in self._absent:
            return None
        asked_at = time.monotonic()
        await self._fetch_unless_done_since(asked_at)
        found = self._lookup(kid)
        if found is None and self._absent is not None and self._fetched_at >= asked_at:
            self._absent[kid] = True
        return found

    async def ready(self) -> bool:
        """Whether any key is at hand; when none is, one fetch (if the bucket allows)."""
        if not self._keys:
            await self._fetch_unless_done_since(time.monotonic())
        return bool(self._keys)

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def _stale(self) -> bool:
        return time.monotonic() - self._fetched_at > self._config.jwks_cache_s

    async def _fetch_unless_done_since(self, asked_at: float) -> None:
        async with self._lock:
            # A fetch begun while this caller waited for the lock answers its question too.
            if self._attempted_at < asked_at and self._take_from_bucket():
                await self._refresh()

    def _take_from_bucket(self) -> bool:
        interval = self._config.min_refresh_interval_s
        if interval == 0:
            return True
        now = time.monotonic()
        self._allowance = min(float(self._config.refresh_burst),
                              self._allowance + (now - self._allowance_at) / interval)
        self._allowance_at = now
        if self._allowance < 1:
            return False
        self._allowance -= 1
        return True

    @property
    def jwks_uri(self) -> str | None:
        """The JWKS URL: the configured one, else the one discovery found (None before it did)."""
        return self._jwks_uri

    async def fetch(self, timeout_s: float = 5) -> dict[str, jwt.PyJWK]:
        """One fetch now, whatever the bucket holds, discovering `jwks_uri` first when it is not known: the
        signature keys it got, kept nowhere. Raises one of FETCH_ERRORS when it gets none (`check-config
        --probe` says which)."""
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
            uri = self._jwks_uri or await self._discover(client)
            response = await client.get(uri)
            response.raise_for_status()
            return signature_keys(response.json())

    async def _refresh(self) -> None:
        started = self._attempted_at = time.monotonic()
        try:
            keys = await self.fetch()
        except FETCH_ERRORS as exc:
            log.warning("JWKS of %s unavailable (%s); %d cached keys stay in use",
                        self._config.issuer, exc, len(self._keys))
            self._count("failed")
            return
        self._keys = keys
        self._fetched_at = started
        self._count("ok")

    async def _discover(self, client: httpx.AsyncClient) -> str:
        issuer = self._config.issuer.rstrip("/")
        for suffix in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
            response = await client.get(issuer + suffix)
            if response.status_code != 200:
                continue
            metadata: Any = response.json()
            if not isinstance(metadata, dict):
                raise ValueError(f"{issuer}{suffix} is not a JSON object")
            named = metadata.get("issuer")
            if not isinstance(named, str) or named.rstrip("/") != issuer:
                raise ValueError(f"{issuer}{suffix} names another issuer")
            uri = metadata.get("jwks_uri")
            if isinstance(uri, str):
                if urlsplit(uri).scheme not in ("http", "https"):
                    raise ValueError(f"{issuer}{suffix} names a jwks_uri that is not an http(s) URL")
                self._jwks_uri = uri
                return uri
        raise ValueError(f"no jwks_uri in {issuer}'s metadata")

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.jwks_refreshes.labels(outcome).inc()


def signature_keys(document: object) -> dict[str, jwt.PyJWK]:
    """The keys of a JWKS document that may verify signatures, by kid (by position when none has a kid).

    Raises ValueError, or jwt.PyJWKSetError when no key is usable: either way the document is no JWKS to use.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS (a JSON object with a list of keys)")
    candidates = [entry for entry in document["keys"] if _verifies_signatures(entry)]
    keys = jwt.PyJWKSet.from_dict({"keys": candidates}).keys
    return {key.key_id: key for key in keys if key.key_id is not None} or {str(i): key for i, key in enumerate(keys)}


def _verifies_signatures(entry: object) -> bool:
    """Whether a JWK (RFC 7517 section 4) may verify signatures; its members that PyJWK reads must be strings,
    since PyJWK looks some of them up in tables."""
    if not isinstance(entry, dict):
        return False
    if any(name in entry and not isinstance(entry[name], str) for name in ("kty", "kid", "alg", "crv", "use")):
        return False
    if "key_ops" in entry and not (isinstance(entry["key_ops"], list) and "verify" in entry["key_ops"]):
        return False
    use: object = entry.get("use", "sig")
    return use == "sig"
