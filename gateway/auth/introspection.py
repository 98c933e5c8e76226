"""RFC 7662 token introspection: ask the authorization server whether an opaque token is active.

Owns the call to the introspection endpoint (client_secret_basic, with the
async HTTP client: the event loop never blocks) and a bounded cache of its
answers by token hash, each reused for at most `cache_s` and never past the
token's own `exp`, so the authorization server is asked once per token per
interval, not once per request. An inactive answer is cached too (a token
never becomes active again), which keeps a replayed bad token off the IdP.

Deciding what an active answer means for the request (audience, issuer,
subject, the type of each claim) is the authenticator's job; this module only
reports the claims, and refuses an answer it cannot read: one that is not a
JSON object, or whose `active` is not a boolean.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any

import httpx
from cachetools import TLRUCache

from gateway.exceptions import GatewayError

if TYPE_CHECKING:
    from gateway.config_auth import Introspection
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.auth")


class IntrospectionUnavailable(GatewayError):
    """The introspection endpoint could not be asked, or gave no usable answer."""


class Introspector:
    """Claims of active tokens, from one authorization server's introspection endpoint.

    Args:
        config: endpoint, the gateway's own client credentials, cache cap, timeout.
        metrics: calls are counted by outcome (active, inactive, error).
        cache_size: how many answers to remember.
    """

    def __init__(self, config: Introspection, metrics: Metrics | None = None, cache_size: int = 10_000) -> None:
        self._config = config
        self._metrics = metrics
        self._answers: TLRUCache[str, tuple[dict[str, Any] | None, float]] = TLRUCache(
            maxsize=cache_size, ttu=lambda _k, v, _now: v[1], timer=time.time)
        self._client: httpx.AsyncClient | None = None

    async def claims(self, token: str) -> dict[str, Any] | None:
        """The token's claims if the server says it is active, None if inactive; raises IntrospectionUnavailable."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._answers.get(digest)
        if cached is not None:
            return cached[0]
        answer = await self._ask(token)
        now = time.time()
        until = now + self._config.cache_s
        active = answer["active"]
        exp = answer.get("exp")
        if active and isinstance(exp, int | float):
            until = min(until, float(exp))
        if until > now:
            self._answers[digest] = (answer if active else None, until)
        self._count("active" if active else "inactive")
        return answer if active else None

    async def _ask(self, token: str) -> dict[str, Any]:
        config = self._config
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=config.timeout_s, follow_redirects=False)
        try:
            response = await self._client.post(
                config.url, data={"token": token, "token_type_hint": "access_token"},
                auth=(config.client_id, config.client_secret), headers={"accept": "application/json"})
        except httpx.HTTPError as exc:
            self._count("error")
            log.warning("introspection at %s failed: %s", config.url, exc)
            raise IntrospectionUnavailable(f"introspection endpoint unreachable: {type(exc).__name__}") from None
        try:
            answer = response.json() if response.status_code == 200 else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            self._count("error")
            log.warning("introspection at %s answered %s without a JSON object", config.url, response.status_code)
            raise IntrospectionUnavailable(f"introspection endpoint answered {response.status_code}")
        if not isinstance(answer.get("active"), bool):
            # RFC 7662 2.2: `active` is a boolean. Read any other way, "false" or 1 could pass for active.
            self._count("error")
            log.warning("introspection at %s answered without a boolean active", config.url)
            raise IntrospectionUnavailable("introspection endpoint answered without a boolean active")
        return answer

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.introspections.labels(outcome).inc()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
