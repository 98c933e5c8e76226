"""Runtime role assignments: the value; each store for real (a SQLite file, PostgreSQL on 127.0.0.1:5432, Redis on
127.0.0.1:6379), shared by replicas and kept across restarts; their merge into a principal's roles, which ends on
time without a write and never defeats (or fools) the decision cache; and `policy explain --config`."""

from __future__ import annotations

import asyncio
import json
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio
import yaml
from pydantic import ValidationError

from gateway.assignment_stores import PostgresAssignments, RedisAssignments, SqliteAssignments
from gateway.assignments import Assignment, AssignmentStore, RoleAssignments, open_assignments
from gateway.cli import main
from gateway.config import RoleAssignmentsStore, load_config
from gateway.errors import StateUnavailable
from gateway.policy import DecisionCache, load_policy
from gateway.policy.explain import operation_for
from gateway.principal import Principal
from tests.harness import write_config

DSN = "postgresql://127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"
NOW = 1_800_000_000.0
POLICY = {
    "roles": {
        "reader": {"permissions": {"can_execute_tools": ["search"]}},
        "release": {"permissions": {"can_execute_tools": ["deploy"]}},
    },
    "bindings": [{"when": {"scope": "mcp:tools"}, "roles": ["reader"]}],
}


def assignment(subject: str = "alice", role: str = "release", *, client_id: str | None = None,
               expires_at: float | None = None, reason: str = "deploy window") -> Assignment:
    return Assignment(id=uuid.uuid4().hex[:16], subject=subject, client_id=client_id, role=role,
                      assigned_by="olga", assigned_at=time.time(), expires_at=expires_at, reason=reason)


# ---- the value -----------------------------------------------------------------------------------------------

MATCHES = [
    # assigned to (subject, client) | the caller (subject, client) | applies
    (("alice", None), ("alice", None), True),
    (("alice", None), ("alice", "cli"), True),
    (("alice", "cli"), ("alice", "cli"), True),
    (("alice", "cli"), ("alice", "web"), False),
    (("alice", "cli"), ("alice", None), False),
    (("alice", None), ("bob", None), False),
    (("alice", None), ("Alice", None), False),
    (("alice", "cli"), ("cli", "alice"), False),
]


@pytest.mark.parametrize(("assigned", "caller", "applies"), MATCHES)
def test_an_assignment_applies_to_its_subject_through_its_client_or_any(
        assigned: tuple[str, str | None], caller: tuple[str, str | None], applies: bool) -> None:
    assert assignment(assigned[0], client_id=assigned[1]).matches(*caller) is applies


ACTIVE = [
    # expires_at | now | active
    (None, NOW + 10 * 365 * 86400, True),
    (NOW + 60, NOW, True),
    (NOW + 60, NOW + 59.999, True),
    (NOW + 60, NOW + 60, False),
    (NOW + 60, NOW + 3600, False),
]


@pytest.mark.parametrize(("expires_at", "now", "active"), ACTIVE)
def test_an_assignment_is_active_until_the_instant_it_expires(expires_at: float | None, now: float,
                                                               active: bool) -> None:
    assert assignment(expires_at=expires_at).active(now) is active


def test_a_new_assignment_has_a_random_id_and_lasts_its_ttl_and_round_trips_as_a_dict() -> None:
    made = Assignment.new("alice", "release", assigned_by="olga", client_id="cli", ttl_s=7200, reason="r", now=NOW)
    other = Assignment.new("alice", "release", assigned_by="olga", now=NOW)
    assert made.id != other.id and len(made.id) == 16
    assert (made.assigned_at, made.expires_at, other.expires_at) == (NOW, NOW + 7200, None)
    assert Assignment.from_dict(json.loads(json.dumps(made.as_dict()))) == made
    with pytest.raises(ValueError, match="longer than 0"):
        Assignment.new("alice", "release", assigned_by="olga", ttl_s=0)


# ---- each store, for real -------------------------------------------------------------------------------------

Opener = Callable[[], AssignmentStore]


@pytest.fixture(params=["sqlite", "postgres", "redis"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens another store on the same storage each call: the same gateway restarted, or another replica."""
    unique = f"ra_{uuid.uuid4().hex[:10]}"
    opened: list[AssignmentStore] = []

    def open_store() -> AssignmentStore:
        store: AssignmentStore
        if request.param == "sqlite":
            store = SqliteAssignments(tmp_path / "state.db")
        elif request.param == "postgres":
            store = PostgresAssignments(DSN, unique)
        else:
            store = RedisAssignments(REDIS, prefix=f"test:{unique}:")
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.close()
    if request.param == "postgres":
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {unique}, {unique}_generation")
        finally:
            await conn.close()
    elif request.param == "redis":
        client = redis.asyncio.from_url(REDIS)
        await client.delete(f"test:{unique}:assignments", f"test:{unique}:generation")
        await client.aclose()


async def test_a_store_adds_lists_and_removes_assignments(opener: Opener) -> None:
    store = opener()
    assert await store.all() == []
    anywhere, through_cli = assignment(), assignment(client_id="cli", expires_at=time.time() + 3600)
    await store.add(anywhere)
    await store.add(through_cli)
    assert sorted(await store.all(), key=lambda a: a.assigned_at) == [anywhere, through_cli]
    assert await store.remove(anywhere.id) == anywhere
    assert await store.remove(anywhere.id) is None
    assert await store.remove("no-such-id") is None
    assert await store.all() == [through_cli]


async def test_assignments_outlive_the_store_that_wrote_them(opener: Opener) -> None:
    first = opener()
    kept, removed = assignment(), assignment(role="reader")
    await first.add(kept)
    await first.add(removed)
    await first.remove(removed.id)
    await first.close()
    assert await opener().all() == [kept]


async def test_an_expired_assignment_is_never_listed_and_is_deleted_by_the_next_add(opener: Opener) -> None:
    store = opener()
    expired = assignment(expires_at=time.time() - 1)
    await store.add(expired)
    assert await store.all() == []
    await store.add(assignment(role="reader"))
    assert await store.remove(expired.id) is None  # gone: the second add deleted it


async def test_every_write_by_any_replica_changes_the_generation_and_reads_do_not(opener: Opener) -> None:
    store, replica = opener(), opener()
    seen = [await store.generation()]
    await store.all()
    await replica.all()
    assert await store.generation() == seen[-1]
    mine = assignment()
    for write in (store.add(mine), replica.add(assignment(role="reader")), replica.remove(mine.id)):
        await write
        seen.append(await store.generation())
        assert seen[-1] not in seen[:-1]


async def test_a_change_by_another_replica_applies_on_the_callers_next_request(opener: Opener) -> None:
    gateway, replica = RoleAssignments(opener()), opener()
    alice = Principal("alice", "https://idp.example", client_id="cli")
    assert await gateway.apply(alice) is alice
    granted = assignment(client_id="cli")
    await replica.add(granted)
    assert (await gateway.apply(alice)).roles == {"release"}
    await replica.add(assignment(client_id="web", role="reader"))  # another client of alice's: not this one
    assert (await gateway.apply(alice)).roles == {"release"}
    await replica.remove(granted.id)
    assert await gateway.apply(alice) is alice


async def test_expiry_ends_a_role_on_time_without_any_write(opener: Opener) -> None:
    store = opener()
    clock = [time.time()]
    gateway = RoleAssignments(store, clock=lambda: clock[0])
    bob = Principal("bob", "https://idp.example")
    await store.add(assignment("bob", expires_at=clock[0] + 60))
    assert (await gateway.apply(bob)).roles == {"release"}
    assert [a.subject for a in await gateway.of("bob", None)] == ["bob"]
    generation = await store.generation()
    clock[0] += 60
    assert await gateway.apply(bob) is bob
    assert await gateway.of("bob", None) == []
    assert await store.generation() == generation  # nobody wrote: the clock alone ended it


async def test_passthroughs_write_and_refresh_at_once(opener: Opener) -> None:
    gateway = RoleAssignments(opener())
    carol = Principal("carol", "https://idp.example")
    granted = assignment("carol")
    await gateway.add(granted)
    assert await gateway.all() == [granted]
    assert (await gateway.apply(carol)).roles == {"release"}
    assert await gateway.remove(granted.id) == granted
    assert await gateway.apply(carol) is carol
    assert await gateway.all() == []


# ---- the merge and the decision cache -------------------------------------------------------------------------

async def test_the_same_principal_object_while_roles_stay_and_another_when_they_change(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(POLICY))
    policy = load_policy(tmp_path / "p.yaml")
    deploy = operation_for("tools/call", "deploy")
    store = SqliteAssignments(tmp_path / "state.db")
    gateway, cache = RoleAssignments(store), DecisionCache()
    dave = Principal("dave", "https://idp.example", scopes=frozenset({"mcp:tools"}))
    try:
        assert await gateway.apply(dave) is dave
        assert not cache(await gateway.apply(dave), deploy, policy).allowed
        granted = assignment("dave")
        await store.add(granted)
        with_release = await gateway.apply(dave)
        assert with_release is not dave and with_release.roles == {"release"}
        assert await gateway.apply(dave) is with_release
        assert cache(await gateway.apply(dave), deploy, policy).allowed
        await store.add(assignment("dave", role="reader"))
        with_both = await gateway.apply(dave)
        assert with_both is not with_release and with_both.roles == {"release", "reader"}
        await store.remove(granted.id)
        revoked = await gateway.apply(dave)
        assert revoked.roles == {"reader"} and not cache(revoked, deploy, policy).allowed  # nothing stale served
    finally:
        await store.close()


async def test_a_role_granted_directly_as_well_as_assigned_leaves_the_principal_as_it_is(tmp_path: Path) -> None:
    store = SqliteAssignments(tmp_path / "state.db")
    gateway = RoleAssignments(store)
    erin = Principal("erin", "https://idp.example", roles=frozenset({"release", "guest"}))
    try:
        await store.add(assignment("erin"))
        assert await gateway.apply(erin) is erin
    finally:
        await store.close()


class _FlakyStore:
    """A store that answers until it is told to be unreachable."""

    def __init__(self) -> None:
        self.down = False
        self.rows = [assignment("frank")]

    async def add(self, a: Assignment) -> None:
        raise AssertionError("not written to")

    async def remove(self, assignment_id: str) -> Assignment | None:
        raise AssertionError("not written to")

    async def all(self) -> list[Assignment]:
        return self._answer(self.rows)

    async def generation(self) -> str:
        return self._answer("1")

    async def close(self) -> None:
        return None

    def _answer(self, value: Any) -> Any:
        if self.down:
            raise StateUnavailable("ConnectionError")
        return value


async def test_a_store_gone_after_answering_fails_the_request_rather_than_serve_what_it_said_before() -> None:
    store = _FlakyStore()
    gateway = RoleAssignments(store)
    frank = Principal("frank", "https://idp.example")
    assert (await gateway.apply(frank)).roles == {"release"}
    store.down = True
    with pytest.raises(StateUnavailable):
        await gateway.apply(frank)
    with pytest.raises(StateUnavailable):
        await gateway.of("frank", None)


UNREACHABLE: list[tuple[str, Callable[[Path], AssignmentStore]]] = [
    ("postgres", lambda _: PostgresAssignments("postgresql://127.0.0.1:1/test", "role_assignments")),
    ("redis", lambda _: RedisAssignments("redis://127.0.0.1:1/0", prefix="test:unreachable:")),
    ("sqlite", lambda tmp: SqliteAssignments(tmp / "a-file" / "state.db")),  # its directory is a file
]


@pytest.mark.parametrize(("backend", "make"), UNREACHABLE, ids=[u[0] for u in UNREACHABLE])
async def test_a_store_that_cannot_be_reached_raises_state_unavailable(
        backend: str, make: Callable[[Path], AssignmentStore], tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    store = make(tmp_path)
    try:
        with pytest.raises(StateUnavailable):
            await RoleAssignments(store).apply(Principal("alice", "https://idp.example"))
        with pytest.raises(StateUnavailable):
            await store.add(assignment())
        with pytest.raises(StateUnavailable):
            await store.remove("any")
    finally:
        await store.close()


# ---- configuration --------------------------------------------------------------------------------------------

BAD_STORES = [
    ({"backend": "postgres"}, "the postgres backend needs dsn"),
    ({"backend": "redis"}, "the redis backend needs url"),
    ({"backend": "redis", "url": "http://127.0.0.1:6379"}, "the redis backend needs url"),
    ({"backend": "postgres", "dsn": DSN, "table": "roles; DROP TABLE x"}, "String should match pattern"),
    ({"backend": "postgres", "dsn": DSN, "table": "t" * 53}, "String should match pattern"),
    ({"url": REDIS}, "url: not a setting of the sqlite backend"),
    ({"backend": "redis", "url": REDIS, "path": "state.db"}, "path: not a setting of the redis backend"),
    ({"backend": "mysql"}, "Input should be 'sqlite', 'postgres' or 'redis'"),
]


@pytest.mark.parametrize(("given", "why"), BAD_STORES)
def test_a_role_assignments_store_is_refused_when_it_names_no_usable_place(given: dict[str, Any], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        RoleAssignmentsStore.model_validate(given)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_the_configured_store_is_the_one_opened(backend: str, tmp_path: Path) -> None:
    table = f"ra_{uuid.uuid4().hex[:10]}"
    spec = {"backend": "sqlite", "path": str(tmp_path / "roles.db")} if backend == "sqlite" else {
        "backend": "postgres", "dsn": DSN, "table": table}
    granted = assignment()
    writer = open_assignments(RoleAssignmentsStore.model_validate(spec))
    await writer.add(granted)
    await writer.close()
    reader = open_assignments(RoleAssignmentsStore.model_validate(spec))
    try:
        assert await reader.of("alice", "any-client") == [granted]
    finally:
        await reader.close()
        if backend == "postgres":
            conn = await asyncpg.connect(DSN)
            await conn.execute(f"DROP TABLE IF EXISTS {table}, {table}_generation")
            await conn.close()


def test_the_sqlite_file_lies_beside_the_config_and_only_its_owner_may_read_it(tmp_path: Path) -> None:
    default = load_config(write_config(tmp_path, "http://127.0.0.1:9/mcp"))
    assert default.role_assignments.path == tmp_path / "state.db"
    named = load_config(write_config(tmp_path, "http://127.0.0.1:9/mcp", role_assignments={"path": "x/roles.db"}))
    assert named.role_assignments.path == tmp_path / "x" / "roles.db"
    elsewhere = load_config(write_config(tmp_path, "http://127.0.0.1:9/mcp", role_assignments={
        "backend": "redis", "url": REDIS}))
    assert elsewhere.role_assignments.url == REDIS

    async def touch() -> None:
        gateway = open_assignments(named.role_assignments)
        await gateway.all()
        await gateway.close()

    asyncio.run(touch())
    assert stat.S_IMODE((tmp_path / "x" / "roles.db").stat().st_mode) == 0o600


# ---- policy explain --config ----------------------------------------------------------------------------------

def test_policy_explain_with_the_config_shows_assigned_roles_and_when_they_expire(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9/mcp", policy=POLICY,
                          role_assignments={"path": "roles.db"})
    expires = 1_900_000_000.0
    granted = assignment("gina", client_id="cli", expires_at=expires)
    unknown = assignment("gina", role="no-such-role", reason="")

    async def seed() -> None:
        store = SqliteAssignments(tmp_path / "roles.db")
        for a in (granted, unknown, assignment("gina", client_id="web"), assignment("gina", expires_at=1.0),
                  assignment("hank")):
            await store.add(a)
        await store.close()

    asyncio.run(seed())
    (tmp_path / "claims.json").write_text('{"sub": "gina", "client_id": "cli", "scope": "mcp:tools"}')
    command = ["policy", "explain", "--claims", str(tmp_path / "claims.json"), "--method", "tools/call",
               "--name", "deploy"]

    assert main([*command, "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "decision:   allowed"
    until = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert until == "2030-03-17T17:46:40Z"
    roles = lines[lines.index("roles:") + 1:lines.index("auth level: standard")]
    assert roles == [
        f'  release      from assigned (id {granted.id}, by olga, client cli, expires {until}, reason "deploy window")',
        "  reader       from bindings[0] (scope=mcp:tools)",
        f"  no-such-role ignored, not a role of this policy: assigned (id {unknown.id}, by olga, until revoked)",
    ]

    assert main([*command, "--policy", str(tmp_path / "policy.yaml")]) == 0  # no config: no assignments
    out = capsys.readouterr().out
    assert out.startswith("decision:   denied") and "assigned" not in out


def test_policy_explain_fails_when_the_configured_store_cannot_be_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9/mcp", policy=POLICY,
                          role_assignments={"backend": "redis", "url": "redis://127.0.0.1:1/0"})
    assert main(["policy", "explain", "--config", str(config), "--method", "tools/call", "--name", "deploy"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "role_assignments: the redis store cannot be read (state_unavailable:" in captured.err
