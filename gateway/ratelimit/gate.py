"""The rate-limit stage of the request path: each allowed message that is counted takes its tokens, or is refused.

Owns turning an allowed decision into a `rate_limited` one (HTTP 429 with `Retry-After` alone in its POST,
a JSON-RPC error `-32018` each inside a batch: only the members over a limit are refused), the metric per
rule, and what a store that cannot be reached means: `rate_limits_on_store_failure: closed` (the default)
refuses (503, `rate_limit:store_unavailable`), `open` lets the message through and says so in the log and a
metric. A refused message is recorded like any other refusal and never forwarded.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import orjson

from gateway.errors import StateUnavailable
from gateway.ratelimit.buckets import MemoryBuckets, RedisBuckets, retry_after
from gateway.ratelimit.rules import Limits, RateLimit

if TYPE_CHECKING:
    from collections.abc import Sequence

    from gateway.exchange import Exchange
    from gateway.mcp import Operation
    from gateway.metrics import Metrics
    from gateway.policy.engine import Decision
    from gateway.sessions import SessionStore

log = logging.getLogger("gateway")

STORE_UNAVAILABLE = "rate_limit:store_unavailable"
_RETRY_S = 600.0  # how long a call asked for input may take to come back with its answers, still one call


class RateLimiter:
    """The rules of the config's `rate_limits:` with the buckets they draw from (the sessions' Redis when there
    is one, else this process's memory); asked once per allowed message that a rule counts."""

    def __init__(self, rules: Sequence[RateLimit], sessions: SessionStore,
                 on_store_failure: Literal["closed", "open"], metrics: Metrics) -> None:
        self.limits = Limits(rules)
        redis = getattr(sessions, "client", None)  # the sessions' Redis, when they have one: shared by replicas
        self._buckets = RedisBuckets(redis) if redis is not None else MemoryBuckets()
        self._on_store_failure = on_store_failure
        self._metrics = metrics
        self._sessions = sessions

    async def check(self, ex: Exchange) -> None:
        """Each allowed message of the request that a rule counts takes its tokens; those that cannot are
        refused in `ex.decisions`."""
        if not self.limits:
            return
        decisions = list(ex.decisions)
        for index, (op, decision) in enumerate(zip(ex.operations, decisions, strict=True)):
            if op is not None and decision is not None and decision.allowed:
                decisions[index] = await self.decided(ex, op, decision)
        ex.decisions = tuple(decisions)

    async def decided(self, ex: Exchange, op: Operation, decision: Decision) -> Decision:
        """`decision` on `op`, or its refusal when a rule that counts it has no token left."""
        if not self.limits or not decision.allowed or ex.principal is None:
            return decision
        buckets = self.limits.buckets(ex.principal, decision.roles, op, ex.upstream.name)
        if not buckets or (op.input_responses and await self._retried(ex, op)):
            return decision
        try:
            taken = await self._buckets.take(buckets)
        except StateUnavailable as exc:
            self._metrics.rate_limit_store_failures.labels(self._on_store_failure).inc()
            if self._on_store_failure == "open":
                log.warning("rate limits not counted, the store is unreachable (%s): %s let through", exc.reason,
                            op.method)
                return decision
            return replace(decision, allowed=False, outcome="denied", reason=STORE_UNAVAILABLE)
        if taken.rule is None:
            return decision
        self._metrics.rate_limited.labels(taken.rule).inc()
        return replace(decision, allowed=False, outcome="rate_limited", reason=f"rate_limit:{taken.rule}",
                       retry_after_s=retry_after(taken.wait_s))

    async def retry_expected(self, ex: Exchange, op: Operation) -> None:
        """`op` was answered `input_required` (2026-07-28): the client will call again with the same target and
        arguments and its answers, and that retry is the same call, already counted. One credit per answer."""
        if self.limits and ex.principal is not None:
            with contextlib.suppress(StateUnavailable):  # no credit: the retry is counted as a call of its own
                await self._sessions.tally(self._retry_key(ex, op), _RETRY_S)

    async def _retried(self, ex: Exchange, op: Operation) -> bool:
        """Whether `op`, carrying answers, is the retry of a call this principal was asked for input on: its
        credit is taken. Answers the gateway never asked for (a client skipping the count) find none."""
        key = self._retry_key(ex, op)
        try:
            if await self._sessions.tally(key, _RETRY_S, add=-1) >= 0:
                return True
            await self._sessions.tally(key, _RETRY_S)  # there was none: as it was
        except StateUnavailable:
            return False
        return False

    @staticmethod
    def _retry_key(ex: Exchange, op: Operation) -> str:
        principal = ex.principal
        assert principal is not None
        return "rl-retry:" + hashlib.sha256(orjson.dumps(
            [principal.issuer, principal.subject, ex.upstream.name, op.method, op.name, op.uri, op.arguments],
            option=orjson.OPT_SORT_KEYS)).hexdigest()
