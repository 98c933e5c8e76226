"""`check-config --probe` and `/readyz`: each dependency a config names is reached once, nothing is changed, and
each one that cannot be used is one `FILE: key.path: why` line (issue 17).

Each row of BROKEN breaks one dependency of a config whose every other dependency is real and working (an HTTP
upstream, a stdio program, Redis, PostgreSQL, a JWKS, key files), and states the one line the probe gives for it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import ConfigError, create_app, load_config, probes
from gateway.app import reverse_proxy_problems
from gateway.audit.chainkey import load_or_create_chain_key
from gateway.auth.keys import SigningKey, SigningKeyError, load_or_create_signing_key, load_signing_key
from gateway.cli import main
from gateway.config_upstream import Upstream
from gateway.probes import Reachability, probe, probed
from tests.harness import ROOT, Recorder, ServerThread, build_server, free_port, proxy_for, write_config
from tests.test_bad_input import BASE_HEADERS, modern

DSN = "postgresql://127.0.0.1/test"
REDIS = "redis://127.0.0.1:6379/0"


class Issuer:
    """An IdP's documents: the path -> the JSON served there; any other path is a 404."""

    def __init__(self) -> None:
        key = SigningKey(ec.generate_private_key(ec.SECP256R1()), "probe")
        self.documents: dict[str, Any] = {"/jwks": {"keys": [key.public_jwk()]}, "/empty": {"keys": []}}
        self.app = Starlette(routes=[Route("/{path:path}", self.serve)])

    async def serve(self, request: Request) -> Response:
        document = self.documents.get(request.url.path)
        return Response(status_code=404) if document is None else JSONResponse(document)


@dataclass
class World:
    upstream: str  # a running MCP server's URL
    upstream_port: int
    issuer: str  # base URL of the Issuer
    table: str  # an audit table that exists, owned by the test's (superuser) role
    reader: str  # a role with no privilege on it, nor on the schema


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    upstream = ServerThread(build_server().streamable_http_app()).start()
    issuer = ServerThread(Issuer().app).start()
    suffix = uuid.uuid4().hex[:10]
    table, reader = f"probe_{suffix}", f"probe_reader_{suffix}"
    asyncio.run(_sql(f"CREATE TABLE {table} (seq bigserial PRIMARY KEY)", f"CREATE ROLE {reader} LOGIN"))
    try:
        yield World(f"{upstream.url}/mcp", upstream.port, issuer.url, table, reader)
    finally:
        asyncio.run(_sql(f"DROP TABLE IF EXISTS {table}", f"DROP ROLE IF EXISTS {reader}"))
        upstream.stop()
        issuer.stop()


async def _sql(*statements: str) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def working(world: World, d: Path) -> dict[str, Any]:
    """The settings of a config every dependency of which is there and working; key files and logs included."""
    load_or_create_signing_key(d / "key.pem")
    load_or_create_chain_key(d / "chain.key")
    (d / "audit.jsonl").touch()
    return {
        "upstreams": [{"name": "demo", "path": "/mcp", "url": world.upstream},
                      {"name": "kit", "path": "/kit", "command": [sys.executable, "-c", "pass"], "cwd": str(d)}],
        "auth": {"clients": {"signing_key_file": str(d / "key.pem")},
                 "jwt": {"issuer": world.issuer, "jwks_uri": f"{world.issuer}/jwks"},
                 "introspection": {"url": world.upstream, "client_id": "gateway", "client_secret": "s3cret"}},
        "audit": {"sinks": [{"type": "sqlite", "path": str(d / "audit.db")},
                            {"type": "jsonl", "path": str(d / "audit.jsonl"), "rotate_mb": 10},
                            {"type": "postgres", "dsn": DSN, "table": world.table}],
                  "chain_key_file": str(d / "chain.key")},
        "sessions": {"backend": "redis", "url": REDIS},
        "role_assignments": {"backend": "postgres", "dsn": DSN},
    }


def write(d: Path, settings: dict[str, Any]) -> Path:
    return write_config(d, None, **settings)


def a_file(d: Path) -> None:
    """A regular file: a path under it can never be created, whoever the test runs as (root writes anywhere)."""
    (d / "file").write_text("not a directory")


def garbage_key(d: Path) -> None:
    (d / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")


def rsa_key(d: Path) -> None:
    (d / "key.pem").write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def short_chain_key(d: Path) -> None:
    (d / "chain.key").write_bytes(b"abc")


def script(d: Path) -> None:
    (d / "server.py").write_text("print('hi')\n")
    os.chmod(d / "server.py", 0o644)


@dataclass(frozen=True)
class Broken:
    """One dependency broken: `settings` (dotted key -> value) changed in the working config, after `files` put
    what they need in its directory; `line` is what follows `FILE: `. Strings in both are formatted with: d (the
    directory), closed (a port nothing listens on), issuer, upstream_port, table, reader, and loader_says (what
    the signing key loader says of the key file, in the words of `cryptography`)."""

    what: str
    settings: dict[str, Any]
    line: str
    files: Callable[[Path], None] = lambda d: None


BROKEN = [
    Broken("upstream: nothing listens", {"upstreams.0.url": "http://127.0.0.1:{closed}/mcp"},
           "upstreams.0.url: cannot connect to http://127.0.0.1:{closed}/mcp: connection refused"),
    Broken("upstream: https to a server speaking plain HTTP",
           {"upstreams.0.url": "https://127.0.0.1:{upstream_port}/mcp"},
           "upstreams.0.url: cannot connect to https://127.0.0.1:{upstream_port}/mcp: TLS handshake failed: "
           "WRONG_VERSION_NUMBER"),
    Broken("stdio upstream: the program is not on its PATH",
           {"upstreams.1.command": ["no-such-mcp-server"], "upstreams.1.env": {"PATH": "{d}/bin"}},
           "upstreams.1.command: no-such-mcp-server: not found on the PATH ({d}/bin)"),
    Broken("stdio upstream: the program is not executable", {"upstreams.1.command": ["./server.py"]},
           "upstreams.1.command: {d}/server.py: not executable", script),
    Broken("stdio upstream: its cwd is not there", {"upstreams.1.cwd": "{d}/gone"},
           "upstreams.1.cwd: {d}/gone: no such directory"),
    Broken("signing key: garbage PEM", {}, "auth.clients.signing_key_file: {loader_says}", garbage_key),
    Broken("signing key: an RSA key", {}, "auth.clients.signing_key_file: {d}/key.pem: not an EC P-256 private key "
           "(tokens are signed with ES256)", rsa_key),
    Broken("signing key: its directory cannot be made", {"auth.clients.signing_key_file": "{d}/file/key.pem"},
           "auth.clients.signing_key_file: {d}/file/key.pem: cannot be created: {d}/file is not a directory", a_file),
    Broken("JWKS: no keys", {"auth.jwt.jwks_uri": "{issuer}/empty"},
           "auth.jwt.jwks_uri: no signing keys from {issuer}/empty: holds no key that verifies signatures"),
    Broken("JWKS: a 404 (its query never shown)", {"auth.jwt.jwks_uri": "{issuer}/missing?key=k3y"},
           "auth.jwt.jwks_uri: no signing keys from {issuer}/missing: answered 404"),
    Broken("JWKS: no metadata to discover it from", {"auth.jwt": {"issuer": "{issuer}/nobody"}},
           "auth.jwt.issuer: no signing keys from {issuer}/nobody: no jwks_uri in {issuer}/nobody's metadata"),
    Broken("introspection: nothing listens", {"auth.introspection.url": "http://127.0.0.1:{closed}/introspect"},
           "auth.introspection.url: cannot connect to http://127.0.0.1:{closed}/introspect: connection refused"),
    Broken("sqlite sink: under a file", {"audit.sinks.0.path": "{d}/file/audit.db"},
           "audit.sinks.0.path: {d}/file/audit.db: cannot be created: {d}/file is not a directory", a_file),
    Broken("sqlite sink: a directory", {"audit.sinks.0.path": "{d}"},
           "audit.sinks.0.path: {d}: a directory, not a file"),
    Broken("jsonl sink: under a file, a directory deeper", {"audit.sinks.1.path": "{d}/file/x/audit.jsonl"},
           "audit.sinks.1.path: {d}/file/x/audit.jsonl: cannot be created: {d}/file is not a directory", a_file),
    Broken("postgres sink: nothing listens (no password shown)",
           {"audit.sinks.2.dsn": "postgresql://gw:pa55word@127.0.0.1:{closed}/test"},
           "audit.sinks.2.dsn: cannot connect to postgresql://***@127.0.0.1:{closed}/test: connection refused"),
    Broken("postgres sink: no such database", {"audit.sinks.2.dsn": "postgresql://127.0.0.1/probe_no_such_db"},
           'audit.sinks.2.dsn: cannot connect to postgresql://127.0.0.1/probe_no_such_db: database "probe_no_such_db" '
           "does not exist"),
    Broken("postgres sink: a table the role may not write",
           {"audit.sinks.2.dsn": "postgresql://{reader}@127.0.0.1/test"},
           "audit.sinks.2.dsn: postgresql://***@127.0.0.1/test: {reader} may not insert into or read table {table}"),
    Broken("postgres sink: no table, and the role may not create one",
           {"audit.sinks.2.dsn": "postgresql://{reader}@127.0.0.1/test", "audit.sinks.2.table": "probe_absent"},
           "audit.sinks.2.dsn: postgresql://***@127.0.0.1/test: no table probe_absent, and {reader} may not create it "
           "in schema public"),
    Broken("chain key: too short", {}, "audit.chain_key_file: {d}/chain.key: holds 3 bytes; a chain key is at least "
           "32 random bytes", short_chain_key),
    Broken("sessions: Redis not there (no password shown)", {"sessions.url": "redis://:pa55word@127.0.0.1:{closed}/0"},
           "sessions.url: cannot reach redis://***@127.0.0.1:{closed}/0: connection refused"),
    Broken("role assignments: a Redis of their own not there",
           {"role_assignments": {"backend": "redis", "url": "redis://127.0.0.1:{closed}/0"}},
           "role_assignments.url: cannot reach redis://127.0.0.1:{closed}/0: connection refused"),
    Broken("role assignments: PostgreSQL not there",
           {"role_assignments": {"backend": "postgres", "dsn": "postgresql://127.0.0.1:{closed}/test"}},
           "role_assignments.dsn: cannot connect to postgresql://127.0.0.1:{closed}/test: connection refused"),
    Broken("role assignments: a SQLite file under a file", {"role_assignments": {"path": "{d}/file/state.db"}},
           "role_assignments.path: {d}/file/state.db: cannot be created: {d}/file is not a directory", a_file),
]


def formatted(value: Any, names: dict[str, object]) -> Any:
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, list):
        return [formatted(v, names) for v in value]
    if isinstance(value, dict):
        return {k: formatted(v, names) for k, v in value.items()}
    return value


def put(settings: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node: Any = settings
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[int(last) if isinstance(node, list) else last] = value


def loader_says(key_file: Path) -> str:
    try:
        load_signing_key(key_file)
    except SigningKeyError as exc:
        return str(exc)
    return "(loads)"


@pytest.mark.parametrize("broken", BROKEN, ids=[b.what for b in BROKEN])
async def test_a_dependency_that_cannot_be_used_is_one_line_naming_its_key(
        world: World, tmp_path: Path, broken: Broken) -> None:
    settings = working(world, tmp_path)
    broken.files(tmp_path)
    names: dict[str, object] = {"d": tmp_path, "closed": free_port(), "issuer": world.issuer, "table": world.table,
                                "upstream_port": world.upstream_port, "reader": world.reader,
                                "loader_says": loader_says(tmp_path / "key.pem")}
    for key, value in broken.settings.items():
        put(settings, key, formatted(value, names))
    path = write(tmp_path, settings)
    assert await probe(load_config(path), timeout_s=2) == [f"{path}: {broken.line.format(**names)}"]


async def test_a_config_whose_dependencies_all_work_has_no_problem(world: World, tmp_path: Path) -> None:
    config = load_config(write(tmp_path, working(world, tmp_path)))
    assert await probe(config, timeout_s=2) == []
    assert probed(config) == [
        "upstream demo", "upstream kit", "signing key", "JWKS", "introspection endpoint", "audit sink 0 (sqlite)",
        "audit sink 1 (jsonl)", "audit sink 2 (postgres)", "chain key", "sessions' Redis",
        "role assignments' PostgreSQL"]


async def test_probing_creates_nothing(world: World, tmp_path: Path) -> None:
    """The files and table the gateway would create are not there before, and not there after."""
    settings = working(world, tmp_path / "unused")
    state = tmp_path / "state"
    state.mkdir()
    settings["auth"]["clients"]["signing_key_file"] = str(state / "keys" / "key.pem")
    settings["audit"] = {"sinks": [{"type": "sqlite", "path": str(state / "audit.db")},
                                   {"type": "jsonl", "path": str(state / "logs" / "audit.jsonl")},
                                   {"type": "postgres", "dsn": DSN, "table": "probe_never_created"}],
                         "chain_key_file": str(state / "chain.key")}
    settings["role_assignments"] = {"backend": "sqlite", "path": str(state / "state.db")}
    config = load_config(write(tmp_path, settings))
    assert await probe(config, timeout_s=2) == []
    assert list(state.iterdir()) == []
    conn = await asyncpg.connect(DSN)
    try:
        assert await conn.fetchval("SELECT to_regclass('probe_never_created')") is None
    finally:
        await conn.close()


def test_the_redis_the_sessions_and_the_role_assignments_share_is_probed_once(world: World, tmp_path: Path) -> None:
    """`role_assignments` not given and sessions in Redis: the roles live there too (`load_config`), and a key
    the file does not hold is never named."""
    settings = working(world, tmp_path)
    del settings["role_assignments"]
    config = load_config(write(tmp_path, settings))
    assert (config.role_assignments.backend, config.role_assignments.url) == ("redis", REDIS)
    assert "sessions' Redis" in probed(config) and "role assignments' Redis" not in probed(config)


# ---- the command ---------------------------------------------------------------------------------------------

def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_check_config_refuses_an_upstream_without_url_with_the_line_serve_refuses_it_with(tmp_path: Path) -> None:
    """Finding: such a config passed check-config, and then serve exited 2."""
    path = write_config(tmp_path, None)
    checked, served = cli("check-config", "--config", str(path)), cli("serve", "--config", str(path))
    assert checked.returncode == served.returncode == 2
    assert checked.stderr == served.stderr == (
        f"{path}: upstreams.0.url: required to run as a reverse proxy (or command, for a stdio server)\n")


def test_check_config_and_create_app_refuse_a_process_user_without_root_alike(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, None, upstreams=[{"name": "kit", "path": "/kit", "command": [sys.executable],
                                                    "process": {"user": "nobody"}}])
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    line = f"{path}: upstreams.0.process: user and group need the gateway to run as root"
    assert reverse_proxy_problems(load_config(path)) == [line]
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"{line}\n"
    with pytest.raises(ConfigError) as raised:
        create_app(path)
    assert raised.value.problems == [line]


def test_check_config_probe_prints_every_problem_one_per_line(tmp_path: Path) -> None:
    """Findings: an upstream nothing listens on, an audit path that cannot be written and PostgreSQL down all
    passed check-config (and failed later). Without --probe they still do: probing is asked for."""
    upstream, pg, redis = free_port(), free_port(), free_port()
    a_file(tmp_path)
    path = write_config(tmp_path, f"http://127.0.0.1:{upstream}/mcp", audit={"sinks": [
        {"type": "jsonl", "path": str(tmp_path / "file" / "audit.jsonl")},
        {"type": "postgres", "dsn": f"postgresql://gw:pa55word@127.0.0.1:{pg}/test"}]},
        sessions={"backend": "redis", "url": f"redis://127.0.0.1:{redis}/0"})
    assert cli("check-config", "--config", str(path)).returncode == 0
    done = cli("check-config", "--config", str(path), "--probe")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == [
        f"{path}: upstreams.0.url: cannot connect to http://127.0.0.1:{upstream}/mcp: connection refused",
        f"{path}: audit.sinks.0.path: {tmp_path}/file/audit.jsonl: cannot be created: {tmp_path}/file is not a "
        "directory",
        f"{path}: audit.sinks.1.dsn: cannot connect to postgresql://***@127.0.0.1:{pg}/test: connection refused",
        f"{path}: sessions.url: cannot reach redis://127.0.0.1:{redis}/0: connection refused",
    ]
    assert "pa55word" not in done.stderr


def test_check_config_probe_says_what_it_reached(world: World, tmp_path: Path) -> None:
    path = write(tmp_path, working(world, tmp_path))
    done = cli("check-config", "--config", str(path), "--probe")
    assert (done.returncode, done.stderr) == (0, "")
    policy = load_config(path).policy
    assert done.stdout == (
        f"{path}: OK (2 upstream(s): demo at /mcp, kit at /kit; policy {policy.source} version {policy.version}; "
        "reached upstream demo, upstream kit, signing key, JWKS, introspection endpoint, audit sink 0 (sqlite), "
        "audit sink 1 (jsonl), audit sink 2 (postgres), chain key, sessions' Redis, role assignments' PostgreSQL)\n")


# ---- /readyz -------------------------------------------------------------------------------------------------

def _until(condition: Callable[[], httpx.Response], status: int, timeout: float = 15) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while (answer := condition()).status_code != status:
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.2)
    return answer


def test_readyz_names_an_upstream_that_stops_and_is_ready_again_when_it_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: with its upstream down the gateway said it was ready, and every call got a 502."""
    monkeypatch.setattr(probes, "READINESS_TTL_S", 0.5)  # the cache's rule is the next test's; here, the answers
    recorder = Recorder(build_server().streamable_http_app())
    upstream = ServerThread(recorder).start()
    deployment = proxy_for(f"{upstream.url}/mcp", recorder, tmp_path)

    def readyz() -> httpx.Response:
        return httpx.get(f"{deployment.gateway.url}/readyz", timeout=10)

    try:
        ready = readyz()
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["upstream_demo_reachable"] is True
        assert ready.json()["unreachable_upstreams"] == {}
        upstream.stop()
        down = _until(readyz, 503)  # within the few seconds an answer is reused
        assert down.json()["checks"]["upstream_demo_reachable"] is False
        assert down.json()["unreachable_upstreams"] == {"demo": "connection refused"}
        headers, body = modern("tools/call", {"name": "echo", "arguments": {"text": "hi"}})
        called = httpx.post(deployment.url, json=body, headers={
            **BASE_HEADERS, **headers, "Authorization": f"Bearer {deployment.token()}"})
        assert called.status_code == 502
        upstream = ServerThread(build_server().streamable_http_app(), upstream.port).start()  # an app runs once
        assert _until(readyz, 200).json()["checks"]["upstream_demo_reachable"] is True
    finally:
        deployment.stop()
        upstream.stop()


async def test_polling_readiness_opens_one_connection_per_few_seconds_and_one_at_a_time() -> None:
    listener = socket.create_server(("127.0.0.1", free_port()))
    listener.setblocking(False)
    try:
        upstream = Upstream(name="u", path="/mcp", url=f"http://127.0.0.1:{listener.getsockname()[1]}/mcp")
        reachability = Reachability(upstream, ttl_s=60)
        answers = await asyncio.gather(*(reachability.why_not() for _ in range(20)))
        answers += [await reachability.why_not() for _ in range(20)]
        assert answers == [None] * 40
        accepted = []
        while True:
            try:
                accepted.append(listener.accept()[0])
            except BlockingIOError:
                break
        assert len(accepted) == 1
        for connection in accepted:
            connection.close()
    finally:
        listener.close()
