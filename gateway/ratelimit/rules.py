"""Rate limits as the config states them, and which buckets one operation draws from. Pure: no I/O, no clock.

Owns the `rate_limits:` schema and its meaning:

    rate_limits:
      - {match: {role: reader}, tool: "*", limit: 60/minute, burst: 10}      # per principal and tool
      - {match: {client_id: ci-bot}, tool: deploy, limit: 5/hour}
      - {match: {any: true}, per: principal, limit: 600/minute}              # every counted operation

A rule is a token bucket: `limit` N/period refills N tokens per period, `burst` (default N) is how many it
holds. What is counted: tools/call, resources/read, prompts/get, and the server's sampling requests; lists,
ping, initialize, discover and the rest are not. A rule with `tool:` counts only calls of the tools its glob
matches, one bucket per tool; without it, every counted operation, one bucket. `per` says whose bucket:
`principal` (issuer and subject, the default), `client` (a caller without one: its own), `role` (the matched
role; with `any`, the roles held),
or `upstream`. A request needs a token from every rule that applies to it, taken together or not at all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import orjson
from pydantic import Field, field_validator, model_validator

from gateway.mcp import Operation
from gateway.policy.globs import GlobIndex
from gateway.principal import Principal
from gateway.yamlfile import StrictModel

COUNTED = frozenset({"tool_call", "resource_read", "prompt_get", "sampling"})
_COUNTED_METHODS = frozenset({"tools/call", "resources/read", "prompts/get", "sampling/createMessage"})
_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_LIMIT = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day)\s*$")


class LimitMatch(StrictModel):
    """Whom a rule counts: every key given must hold (`any: true` alone: everyone)."""

    role: str | None = None
    client_id: str | None = None
    subject: str | None = None
    any: bool = False

    @model_validator(mode="after")
    def _something(self) -> LimitMatch:
        if not (self.any or self.role or self.client_id or self.subject):
            raise ValueError("say whom the rule counts: role, client_id, subject, or any: true")
        return self


class RateLimit(StrictModel):
    id: str | None = None  # the rule's name in audit events, metrics and errors; default rate_limits[N]
    match: LimitMatch
    tool: str | None = None  # a glob of tool names: only those calls, one bucket per tool
    limit: str  # N/second | N/minute | N/hour | N/day
    burst: int | None = Field(None, gt=0, strict=True)  # how many the bucket holds; default N
    per: Literal["principal", "client", "role", "upstream"] = "principal"

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: str) -> str:
        found = _LIMIT.match(value)
        if found is None or int(found.group(1)) == 0:
            raise ValueError("a limit is N/second, N/minute, N/hour or N/day, with N > 0 (e.g. 60/minute)")
        return value

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        found = _LIMIT.match(self.limit)
        assert found is not None
        return int(found.group(1)) / _PERIODS[found.group(2)]

    @property
    def capacity(self) -> int:
        found = _LIMIT.match(self.limit)
        assert found is not None
        return self.burst if self.burst is not None else int(found.group(1))


@dataclass(frozen=True, slots=True)
class Bucket:
    """One token bucket an operation draws from: its store key, size and refill rate (tokens per second)."""

    key: str
    capacity: int
    rate: float
    rule: str


class Limits:
    """The compiled rules: which buckets an operation of a principal through an upstream draws from."""

    def __init__(self, rules: Sequence[RateLimit]) -> None:
        self.rules = tuple(rules)
        self.ids = tuple(rule.id or f"rate_limits[{index}]" for index, rule in enumerate(rules))
        self._tools = tuple(GlobIndex([rule.tool]) if rule.tool is not None else None for rule in rules)
        self._sizes = tuple((rule.capacity, rule.rate) for rule in rules)  # read once, not per request

    def __bool__(self) -> bool:
        return bool(self.rules)

    def buckets(self, principal: Principal, roles: Sequence[str], op: Operation, upstream: str) -> list[Bucket]:
        """Every bucket `op` needs a token from (none for what is not counted)."""
        if op.kind not in COUNTED or op.method not in _COUNTED_METHODS:
            return []
        found = []
        for index, rule in enumerate(self.rules):
            matched_role = _matches(rule.match, principal, roles)
            if matched_role is None:
                continue
            tools = self._tools[index]
            if tools is not None and (op.kind != "tool_call" or not tools.matches(op.name or "")):
                continue
            whose: list[str] = {
                "principal": [principal.issuer, principal.subject],
                # a caller without a client id is a client of its own: no shared bucket for them all
                "client": ["client", principal.client_id] if principal.client_id else
                          ["principal", principal.issuer, principal.subject],
                "role": [matched_role] if matched_role else sorted(roles),
                "upstream": [upstream],
            }[rule.per]
            # JSON: no issuer, subject or tool name can make two callers' keys one
            key = orjson.dumps([self.ids[index], rule.per, whose, op.name if tools is not None else None]).decode()
            capacity, rate = self._sizes[index]
            found.append(Bucket(key, capacity, rate, self.ids[index]))
        return found

    def describe(self, principal: Principal, roles: Sequence[str], op: Operation, upstream: str = "") -> list[str]:
        """In words, each rule that would count `op` (for `policy explain`)."""
        named = {bucket.rule for bucket in self.buckets(principal, roles, op, upstream)}
        return [f"{self.ids[i]}: {rule.limit}, burst {rule.capacity}, per {rule.per}"
                + (f" and tool ({rule.tool})" if rule.tool is not None else "")
                for i, rule in enumerate(self.rules) if self.ids[i] in named]


def _matches(match: LimitMatch, principal: Principal, roles: Sequence[str]) -> str | None:
    """The role the rule matched on ("" when it names none), or None when it does not hold for the principal."""
    if match.client_id is not None and match.client_id != principal.client_id:
        return None
    if match.subject is not None and match.subject != principal.subject:
        return None
    if match.role is not None:
        return match.role if match.role in roles else None
    return ""
