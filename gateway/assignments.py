"""Roles granted and withdrawn while the gateway runs (`mcp-gateway roles assign`), and their merge into requests.

Owns the `Assignment` value (a role given to a subject, optionally only through one of its clients, until
revoked or until it expires), the `AssignmentStore` protocol its backends implement
(`gateway.assignment_stores`: sqlite, postgres, redis), and `RoleAssignments`, which the request path asks to
add a principal's assigned roles to the roles it was granted directly. The policy's `roles_for` then merges
them with its bindings, keeping only roles the policy defines.

Every replica sharing a store sees a change on its next request: each request asks the store's cheap
`generation()` and re-reads the assignments only when it changed. Expiry is checked at each request, so
just-in-time access ends on time without anyone writing. A store that cannot be reached raises
`StateUnavailable` (a 503 for the request): a role that cannot be checked is neither assumed nor dropped.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from cachetools import LRUCache

from gateway.errors import StateUnavailable
from gateway.principal import Principal

if TYPE_CHECKING:
    from gateway.config import RoleAssignmentsStore


@dataclass(frozen=True, slots=True)
class Assignment:
    """One role given to `subject` (through any of its clients, or only through `client_id`)."""

    id: str
    subject: str
    client_id: str | None  # None: whichever client the subject uses
    role: str
    assigned_by: str
    assigned_at: float
    expires_at: float | None  # None: until revoked
    reason: str

    @classmethod
    def new(cls, subject: str, role: str, *, assigned_by: str, client_id: str | None = None,
            ttl_s: float | None = None, reason: str = "", now: float | None = None) -> Assignment:
        """A fresh assignment with a random id, made now, lasting `ttl_s` seconds (None: until revoked)."""
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError("an assignment must last longer than 0 seconds")
        made = time.time() if now is None else now
        return cls(id=secrets.token_hex(8), subject=subject, client_id=client_id, role=role,
                   assigned_by=assigned_by, assigned_at=made,
                   expires_at=None if ttl_s is None else made + ttl_s, reason=reason)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Assignment:
        """The inverse of `as_dict` (what the backends store)."""
        return cls(id=str(data["id"]), subject=str(data["subject"]), client_id=data.get("client_id"),
                   role=str(data["role"]), assigned_by=str(data["assigned_by"]),
                   assigned_at=float(data["assigned_at"]),
                   expires_at=None if data.get("expires_at") is None else float(data["expires_at"]),
                   reason=str(data.get("reason", "")))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def active(self, now: float) -> bool:
        """Whether the role is held at `now` (it ends at `expires_at` exactly)."""
        return self.expires_at is None or now < self.expires_at

    def matches(self, subject: str, client_id: str | None) -> bool:
        """Whether it applies to a caller with this subject, through this client."""
        return subject == self.subject and (self.client_id is None or client_id == self.client_id)


class AssignmentStore(Protocol):
    """Where assignments persist, shared by every replica that opens the same one."""

    async def add(self, a: Assignment) -> None: ...

    async def remove(self, assignment_id: str) -> Assignment | None:
        """Delete one assignment; the one removed, or None if there was none by that id."""

    async def all(self) -> list[Assignment]:
        """Every assignment that has not expired (expired ones may be deleted lazily)."""

    async def generation(self) -> str:
        """A value that changes whenever any writer (this process or another sharing the store) changed the
        assignments. Asked on every request: one cheap read."""

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Snapshot:
    generation: str
    by_subject: Mapping[str, tuple[Assignment, ...]]


def _index(assignments: Iterable[Assignment]) -> dict[str, tuple[Assignment, ...]]:
    by_subject: dict[str, list[Assignment]] = {}
    for a in sorted(assignments, key=lambda a: (a.assigned_at, a.id)):
        by_subject.setdefault(a.subject, []).append(a)
    return {subject: tuple(found) for subject, found in by_subject.items()}


class RoleAssignments:
    """A gateway's view of one `AssignmentStore`: what the request path asks for a principal's assigned roles.

    `store`: the backend; this object closes it. `clock`: the time expiry is judged at (seconds since the
    epoch). `cache_size`: how many augmented principals are remembered. `apply` returns the very principal it
    was given when no active assignment adds a role, and the same augmented object for the same principal and
    the same set of assigned roles: the decision cache keys on the principal's identity, so a fresh object per
    request would defeat it, while a changed role set must never be served a decision taken without it.
    """

    def __init__(self, store: AssignmentStore, *, clock: Callable[[], float] = time.time,
                 cache_size: int = 10_000) -> None:
        self.store = store
        self._clock = clock
        self._snapshot: _Snapshot | None = None
        # (id of the principal, its assigned roles) -> (that principal, kept so its id is not reused; augmented)
        self._augmented: LRUCache[tuple[int, frozenset[str]], tuple[Principal, Principal]] = LRUCache(cache_size)

    async def apply(self, principal: Principal) -> Principal:
        """`principal` with the roles of its active assignments added to `roles`. StateUnavailable when the
        store cannot be reached."""
        roles = frozenset(a.role for a in self._matching(await self._current(), principal.subject,
                                                          principal.client_id))
        if roles <= principal.roles:
            return principal
        key = (id(principal), roles)
        found = self._augmented.get(key)
        if found is not None and found[0] is principal:
            return found[1]
        augmented = replace(principal, roles=principal.roles | roles)
        self._augmented[key] = (principal, augmented)
        return augmented

    async def of(self, subject: str, client_id: str | None) -> list[Assignment]:
        """The active assignments a caller with this subject and client holds, oldest first."""
        return self._matching(await self._current(), subject, client_id)

    async def add(self, assignment: Assignment) -> None:
        await self.store.add(assignment)
        await self._refresh()

    async def remove(self, assignment_id: str) -> Assignment | None:
        removed = await self.store.remove(assignment_id)
        await self._refresh()
        return removed

    async def all(self) -> list[Assignment]:
        """Every active assignment, oldest first."""
        snapshot = await self._refresh()
        now = self._clock()
        return sorted((a for found in snapshot.by_subject.values() for a in found if a.active(now)),
                      key=lambda a: (a.assigned_at, a.id))

    async def ready(self) -> bool:
        """Whether the store answers (what `/readyz` reports)."""
        try:
            await self.store.generation()
        except StateUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self.store.close()

    def _matching(self, snapshot: _Snapshot, subject: str, client_id: str | None) -> list[Assignment]:
        now = self._clock()
        return [a for a in snapshot.by_subject.get(subject, ()) if a.active(now) and a.matches(subject, client_id)]

    async def _current(self) -> _Snapshot:
        # The generation is read before the rows: rows read after it are at least as new as it says, so a
        # snapshot is never labelled newer than it is (at worst it is read once more).
        generation = await self.store.generation()
        snapshot = self._snapshot
        if snapshot is not None and snapshot.generation == generation:
            return snapshot
        snapshot = _Snapshot(generation, _index(await self.store.all()))
        self._snapshot = snapshot
        return snapshot

    async def _refresh(self) -> _Snapshot:
        self._snapshot = None
        return await self._current()


def open_assignments(config: RoleAssignmentsStore) -> RoleAssignments:
    """The assignments of the store `role_assignments:` configures (connected on first use)."""
    from gateway.assignment_stores import PostgresAssignments, RedisAssignments, SqliteAssignments

    store: AssignmentStore
    if config.backend == "postgres":
        assert config.dsn is not None
        store = PostgresAssignments(config.dsn, config.table)
    elif config.backend == "redis":
        assert config.url is not None
        store = RedisAssignments(config.url)
    else:
        store = SqliteAssignments(config.path)
    return RoleAssignments(store)
