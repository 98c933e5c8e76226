"""Three replicas that behave as one gateway, tested for real (issue 16, part 2).

Three `mcp-gateway serve` processes share one config directory (one config file, one signing key, one audit
chain key; each replica its own port), their sessions, revocations, rate-limit buckets and approvals in the Redis
on 127.0.0.1:6379, their role assignments and their audit trail in the PostgreSQL on 127.0.0.1:5432 (tables of
this run's own), in front of one MCP server (the demo MCPServer, in this process), behind a real nginx whose
upstream is the three, round robin. A request is pinned to a replica by sending it to that replica's own port,
or spread by nginx.

- a legacy session opened through one replica goes on through the others, and through nginx; another principal
  presenting its id is refused by every one;
- a token revoked through one is refused by the others within a second (RFC 7009, and `sessions revoke`);
- a rate limit of N calls a minute is N across the three, not 3N;
- a role assigned, and an approval asked, through one are seen by the others;
- every request made is exactly one row, and `audit verify` passes over the replicas' chains;
- a replica killed with SIGKILL under load has lost no event of an answer a client received whole
  (`audit.durability: written`, the default), and what it wrote is intact.

nginx is a required peer (`make install` installs Debian's nginx-light): without it these tests fail, they do not
skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import httpx
import jwt
import pytest
import redis

from gateway.auth.authenticator import Authenticator
from gateway.auth.keys import load_or_create_signing_key, load_signing_key
from gateway.auth.secrets import hash_secret
from gateway.config import load_config
from tests.harness import DEFAULT_POLICY, ROOT, Recorder, ServerThread, build_server, free_port, write_config
from tests.test_bad_input import BASE_HEADERS, modern

DSN = "postgresql://127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
LEGACY = "2025-11-25"
QUOTA = 10  # calls a minute, per principal, counted across the replicas
BOT_SECRET = "a client secret long enough for the test"
RUN = uuid.uuid4().hex[:8]  # names of this run's own: tables, JSON-RPC ids, the upstream (its tool pins are in Redis)
# The `mcp-gateway` command as installed beside this interpreter (the venv's), as an operator runs it
MCP_GATEWAY = [str(Path(sys.executable).with_name("mcp-gateway"))] \
    if Path(sys.executable).with_name("mcp-gateway").exists() else [sys.executable, "-m", "gateway.cli"]

POLICY: dict[str, Any] = {
    "roles": {**DEFAULT_POLICY["roles"], "release-managers": {"permissions": {}}},
    "bindings": [*DEFAULT_POLICY["bindings"], {"when": {"subject": "rita"}, "roles": ["release-managers"]}],
    "tools": {"get_weather": {"approval": {"approvers": ["role:release-managers"], "mode": "retry",
                                           "timeout_s": 120}}},
}


# ---- the peers: nginx and `mcp-gateway serve` processes ------------------------------------------------------------

def nginx_binary() -> str:
    """The nginx to run; a clear failure (not a skip) when there is none: the suite is expected to run these."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                            if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.fail("nginx is not installed, and the replica tests need a real load balancer in front of the "
                    "replicas: run `make install` (it installs Debian's nginx-light) or "
                    "`apt-get install nginx-light`", pytrace=False)
    return found


NGINX_CONF = """worker_processes 1;
master_process off;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    upstream gateways {{
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://gateways;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"""


class Nginx:
    """A private nginx on a free 127.0.0.1 port: one upstream, round robin over `ports`."""

    def __init__(self, directory: Path, ports: Sequence[int]) -> None:
        self.directory = directory
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        # max_fails=0: a replica that fails a request stays in the rotation (nginx would otherwise skip it for
        # 10 s, and requests through nginx would no longer go round the three)
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in ports)
        (directory / "nginx.conf").write_text(NGINX_CONF.format(dir=directory, servers=servers, port=self.port))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        log = self.directory / "error.log"
        self.process = subprocess.Popen(
            [nginx_binary(), "-p", str(self.directory), "-c", str(self.directory / "nginx.conf"), "-e", str(log),
             "-g", f"daemon off; pid {self.directory / 'nginx.pid'}; error_log {log} warn;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port, self.process, log)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    """Until something listens on `port`; a process that exits meanwhile fails the test with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{log.name}: exited ({process.returncode}) before it listened on {port}:\n"
                               + (log.read_text()[-3000:] if log.exists() else ""))
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


class Replica:
    """One `mcp-gateway serve --config CONFIG --port PORT` process: a replica of the gateway."""

    def __init__(self, name: str, config: Path, port: int | None = None) -> None:
        self.name = name
        self.config = config
        self.port = port or free_port()
        self.log = config.parent / f"replica-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        with self.log.open("ab") as log:  # a file, not a pipe: a JSON line per request would fill a pipe
            self.process = subprocess.Popen([*MCP_GATEWAY, "serve", "--config", str(self.config), "--port",
                                             str(self.port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        return self

    def wait_ready(self, timeout: float = 30.0) -> Replica:
        assert self.process is not None
        wait_listening(self.port, self.process, self.log, timeout)
        poll(lambda: httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200, timeout,
             f"replica {self.name} never became ready")
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp(self) -> str:
        return f"{self.url}/mcp"

    def stop(self) -> None:
        """SIGTERM (which flushes the audit queue), then wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


def poll(condition: Any, timeout: float, failure: str, every: float = 0.05) -> float:
    """Call `condition` until it is true; the seconds that took, or fail with `failure` at the deadline."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(httpx.TransportError):
            if condition():
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            pytest.fail(f"{failure} (waited {timeout}s)")
        time.sleep(every)


# ---- the audit trail in PostgreSQL -----------------------------------------------------------------------------------

async def _fetch(statement: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(DSN)
    try:
        return [dict(row) for row in await conn.fetch(statement, *args)]
    finally:
        await conn.close()


def audit_rows(table: str) -> list[dict[str, Any]]:
    """Every row of the audit table, in the order written."""
    return asyncio.run(_fetch(f"SELECT seq, id, chain, result, reason, status, operation, user_id, request_id "
                              f"FROM {table} ORDER BY seq"))


def drop_tables(*tables: str) -> None:
    async def drop() -> None:
        conn = await asyncpg.connect(DSN)
        try:
            for table in tables:
                await conn.execute(f"DROP TABLE IF EXISTS {table}")
        finally:
            await conn.close()

    asyncio.run(drop())


def forget_pins(upstream: str) -> None:
    """Tool pins live in the shared Redis with no expiry: remove those of an upstream of this run's own."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.delete(f"mcpgw:pins:{upstream}", f"mcpgw:pins-seen:{upstream}")
    finally:
        client.close()


def chain_pid(chain: str) -> int:
    """The process that wrote a chain (`host:pid:nonce`)."""
    return int(chain.rsplit(":", 2)[1])


def audit_verify(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MCP_GATEWAY, "audit", "verify", "--config", str(config)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


# ---- the stack ---------------------------------------------------------------------------------------------------

@dataclass
class Ledger:
    """What the stack was asked: every HTTP request made to a replica (directly or through nginx) that the
    gateway audits, and every JSON-RPC id sent. The audit table must hold exactly one row for each."""

    requests: int = 0
    answered: dict[str, int] = field(default_factory=dict)  # JSON-RPC id -> the HTTP status of its answer


@dataclass(kw_only=True)
class Clients:
    """The client side of replicas sharing `config`: tokens signed with their key, and every request made to them
    counted in a ledger."""

    config: Path
    signer: Authenticator
    public_url: str
    ledger: Ledger = field(default_factory=Ledger)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    @classmethod
    def of(cls, config_path: Path) -> Clients:
        config = load_config(config_path)
        return cls(config=config_path, public_url=config.public_url,
                   signer=Authenticator(config, load_signing_key(config.auth.clients.signing_key_file)))

    def token(self, subject: str, scopes: Sequence[str] = ("mcp:tools",), **claims: Any) -> str:
        return self.signer.issue_token(subject=subject, audience=f"{self.public_url}/mcp", scopes=scopes,
                                       claims=claims)

    def admin_token(self, subject: str, scope: str) -> str:
        return self.signer.issue_token(subject=subject, audience=f"{self.public_url}/admin", scopes=[scope])

    def next_id(self) -> str:
        return f"{RUN}-{next(self._ids)}"

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One HTTP request the gateway audits, counted in the ledger."""
        self.ledger.requests += 1
        response = httpx.request(method, url, timeout=30, **kwargs)
        message = kwargs.get("json")
        if isinstance(message, dict) and "id" in message:
            self.ledger.answered[message["id"]] = response.status_code
        return response

    def call(self, base: str, token: str | None, tool: str = "echo", **arguments: Any) -> httpx.Response:
        """A 2026-07-28 tools/call to the MCP endpoint `base` (a replica's or nginx's)."""
        headers, body = modern("tools/call", {"name": tool, "arguments": arguments or {"text": "x"}})
        body["id"] = self.next_id()
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        return self.request("POST", base, headers={**BASE_HEADERS, **headers, **auth}, json=body)

    def legacy(self, base: str, token: str, method: str, params: Mapping[str, Any] | None = None,
               session: str | None = None, notification: bool = False) -> httpx.Response:
        """A 2025-11-25 message in the session `session`."""
        headers = {**BASE_HEADERS, "Authorization": f"Bearer {token}", "MCP-Protocol-Version": LEGACY}
        if session:
            headers["Mcp-Session-Id"] = session
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": dict(params or {})}
        if not notification:
            message["id"] = self.next_id()
        return self.request("POST", base, headers=headers, json=message)

    def admin(self, base: str, method: str, path: str, subject: str, scope: str,
              body: Mapping[str, Any] | None = None) -> httpx.Response:
        return self.request(method, f"{base}{path}", json=body,
                            headers={"Authorization": f"Bearer {self.admin_token(subject, scope)}"})

    def cli(self, *args: str, replica: Replica, operator: str = "olga") -> subprocess.CompletedProcess[str]:
        """An operator's `mcp-gateway` command against one replica (one audited request to its admin API)."""
        done = subprocess.run([*MCP_GATEWAY, *args, "--config", str(self.config), "--url", replica.url, "--as",
                               operator], capture_output=True, text=True, cwd=ROOT, timeout=60)
        self.ledger.requests += 1
        return done


@dataclass(kw_only=True)
class Stack(Clients):
    """Three replicas behind nginx, in front of one upstream, with their audit trail in `table`."""

    directory: Path
    table: str
    replicas: list[Replica]
    nginx: Nginx
    upstream: ServerThread
    recorder: Recorder

    @property
    def mcp(self) -> str:
        """The MCP endpoint through nginx."""
        return f"{self.nginx.url}/mcp"

    def rows_of(self, replicas: Sequence[Replica]) -> list[dict[str, Any]]:
        pids = {r.pid for r in replicas}
        return [row for row in audit_rows(self.table) if chain_pid(row["chain"]) in pids]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    nginx_binary()
    directory = tmp_path_factory.mktemp("replicas")
    table, roles_table = f"audit_r{RUN}", f"roles_r{RUN}"
    recorder = Recorder(build_server().streamable_http_app())  # stateful: legacy sessions, SSE answers
    upstream = ServerThread(recorder).start()
    ports = [free_port() for _ in range(3)]
    nginx = Nginx(directory / "nginx", ports)
    public_url = nginx.url  # what clients are told, and every token's audience: the same at every replica
    config = write_config(
        directory, f"{upstream.url}/mcp", policy=POLICY, public_url=public_url,
        upstream_options={"name": f"demo-{RUN}"},
        listen={"host": "127.0.0.1", "port": ports[0]},
        auth={"clients": {"signing_key_file": str(directory / "key.pem"), "registered": [
            {"client_id": "ci-bot", "secret_hash": hash_secret(BOT_SECRET), "scopes": ["mcp:tools"]}]}},
        sessions={"backend": "redis", "url": REDIS_URL},
        role_assignments={"backend": "postgres", "dsn": DSN, "table": roles_table},
        audit={"sinks": [{"type": "postgres", "dsn": DSN, "table": table}], "on_sink_failure": "fail_closed"},
        rate_limits=[{"match": {"any": True}, "per": "principal", "limit": f"{QUOTA}/minute"}],
        policy_reload_interval_s=0,
    )
    # No signing key and no chain key yet: the replicas, starting at once, make one of each between them.
    replicas = [Replica(name, config, port) for name, port in zip("abc", ports, strict=True)]
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        nginx.start()
        signer = Authenticator(load_config(config), load_signing_key(directory / "key.pem"))
        yield Stack(config=config, signer=signer, public_url=public_url, directory=directory, table=table,
                    replicas=replicas, nginx=nginx, upstream=upstream, recorder=recorder)
    finally:
        nginx.stop()
        for replica in replicas:
            replica.stop()
        upstream.stop()
        drop_tables(table, roles_table, f"{roles_table}_generation")
        forget_pins(f"demo-{RUN}")


def subject(name: str) -> str:
    """A subject of this test alone (each has its own rate-limit bucket and roles)."""
    return f"{name}-{uuid.uuid4().hex[:6]}"


# ---- one deployment ----------------------------------------------------------------------------------------------

def test_replicas_started_at_once_on_a_new_config_make_one_signing_key_and_one_chain_key(stack: Stack) -> None:
    kids = {json.dumps(httpx.get(f"{r.url}/.well-known/jwks.json").json(), sort_keys=True) for r in stack.replicas}
    assert len(kids) == 1, "the replicas sign with different keys"
    (jwk,) = json.loads(kids.pop())["keys"]
    assert jwk["kid"] == load_signing_key(stack.directory / "key.pem").kid
    assert sorted(p.name for p in stack.directory.iterdir() if "key" in p.name) == ["audit-chain.key", "key.pem"]
    assert stat.S_IMODE((stack.directory / "key.pem").stat().st_mode) == 0o600


def test_a_process_that_finds_the_signing_key_made_meanwhile_uses_that_one(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The race the replicas above may run into: one looked for the key before another wrote it (it used to fail
    with FileExistsError, and could read a key file still being written)."""
    path = tmp_path / "key.pem"
    made = load_or_create_signing_key(path)
    monkeypatch.setattr(Path, "exists", lambda _self: False)  # it looked just before the other linked its key
    assert load_or_create_signing_key(path).kid == made.kid
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]  # no draft left behind


def test_replicas_opening_a_new_audit_table_at_once_all_open_it() -> None:
    """Each replica's PostgreSQL sink creates the shared table if it is missing: at once, all must succeed (a
    concurrent CREATE ... IF NOT EXISTS failed with a duplicate key in pg_class; under fail_closed, the replica
    refused requests until its retry)."""
    from gateway.audit.sinks import PostgresSink

    async def open_at_once(table: str) -> list[BaseException | None]:
        sinks = [PostgresSink(DSN, table) for _ in range(4)]
        try:
            return await asyncio.gather(*(s.open() for s in sinks), return_exceptions=True)
        finally:
            for sink in sinks:
                await sink.close()

    tables = [f"audit_o{uuid.uuid4().hex[:10]}" for _ in range(5)]
    try:
        outcomes = [asyncio.run(open_at_once(table)) for table in tables]
    finally:
        drop_tables(*tables)
    assert [o for opened in outcomes for o in opened if o is not None] == []


# ---- sessions ------------------------------------------------------------------------------------------------------

def open_session(stack: Clients, base: str, token: str) -> str:
    init = stack.legacy(base, token, "initialize", {"protocolVersion": LEGACY, "capabilities": {},
                                                    "clientInfo": {"name": "replica-test", "version": "1"}})
    assert init.status_code == 200, init.text
    session = init.headers["mcp-session-id"]
    assert stack.legacy(base, token, "notifications/initialized", session=session, notification=True
                        ).status_code == 202
    return session


def sent_id(response: httpx.Response) -> str:
    """The JSON-RPC id of the request `response` answers."""
    return str(json.loads(response.request.content)["id"])


def sse_result(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC message of a legacy answer (SSE or JSON)."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        return dict(json.loads(data[-1]))
    return dict(response.json())


def test_a_legacy_session_opened_through_one_replica_continues_through_the_others_and_nginx(stack: Stack) -> None:
    a, b, c = stack.replicas
    alice = stack.token(subject("alice"))
    session = open_session(stack, a.mcp, alice)
    through_nginx = []
    for base in (b.mcp, c.mcp, a.mcp, stack.mcp, stack.mcp, stack.mcp):
        listed = stack.legacy(base, alice, "tools/list", session=session)
        assert listed.status_code == 200, (base, listed.text)
        assert "echo" in {t["name"] for t in sse_result(listed)["result"]["tools"]}
        if base == stack.mcp:
            through_nginx.append(sent_id(listed))
    # nginx spread the three over the three replicas (round robin), and each served the session
    served = poll_rows(stack, lambda rows: [r for r in rows if r["request_id"] in through_nginx], 3)
    assert {chain_pid(r["chain"]) for r in served} == {r.pid for r in stack.replicas}
    called = stack.legacy(c.mcp, alice, "tools/call", {"name": "echo", "arguments": {"text": "through c"}},
                          session=session)
    assert called.status_code == 200 and "through c" in json.dumps(sse_result(called)["result"])
    # whichever replica forwarded it, every message after initialize reached the upstream in that one session
    assert sum(s.headers.get("mcp-session-id") == session for s in stack.recorder.requests) == 1 + 6 + 1


def test_another_principals_token_with_that_session_id_is_refused_on_every_replica(stack: Stack) -> None:
    alice, mallory = stack.token(subject("alice")), stack.token(subject("mallory"))
    session = open_session(stack, stack.replicas[1].mcp, alice)
    forwarded = len(stack.recorder.requests)
    for base in [r.mcp for r in stack.replicas] + [stack.mcp] * 3:
        hijack = stack.legacy(base, mallory, "tools/call", {"name": "echo", "arguments": {"text": "x"}},
                              session=session)
        assert hijack.status_code == 403, (base, hijack.text)
        assert hijack.json()["error"] == {"code": -32013, "message": "Invalid session"}
    assert len(stack.recorder.requests) == forwarded, "a hijacking request reached the upstream"
    assert stack.legacy(stack.replicas[2].mcp, alice, "tools/list", session=session).status_code == 200
    hijacks = poll_rows(stack, lambda rows: [r for r in rows if r["reason"] == "session_hijack"
                                             and r["user_id"] == _sub(mallory)], 6)
    assert {chain_pid(r["chain"]) for r in hijacks} == {r.pid for r in stack.replicas}


def _sub(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["sub"])


def poll_rows(stack: Stack, select: Any, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    """The rows `select` picks from the audit table, once there are `count` of them (the writers batch)."""
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        nonlocal found
        found = select(audit_rows(stack.table))
        return len(found) >= count

    poll(enough, timeout, f"fewer than {count} such audit rows")
    assert len(found) == count, found
    return found


# ---- revocation ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["rfc7009", "sessions_revoke"])
def test_a_token_revoked_through_one_replica_is_refused_by_the_others_within_a_second(stack: Stack,
                                                                                        how: str) -> None:
    a, b, c = stack.replicas
    issued = stack.request("POST", f"{a.url}/oauth/token", data={"grant_type": "client_credentials"},
                           auth=("ci-bot", BOT_SECRET))
    assert issued.status_code == 200, issued.text
    token = issued.json()["access_token"]
    for replica in (a, b, c):  # verified, cached, and recorded as used by every replica
        assert stack.call(replica.mcp, token).status_code == 200
    if how == "rfc7009":
        revoked = stack.request("POST", f"{a.url}/oauth/revoke", data={"token": token}, auth=("ci-bot", BOT_SECRET))
        assert revoked.status_code == 200
    else:
        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        done = stack.cli("sessions", "revoke", jti, replica=a)
        assert done.returncode == 0 and done.stdout.strip() == f"revoked {jti}", done.stderr
    revoked_at = time.monotonic()
    refused: dict[str, httpx.Response] = {}

    def both_refuse() -> bool:
        for replica in (b, c):
            if replica.name not in refused:
                answer = stack.call(replica.mcp, token)
                if answer.status_code == 401:
                    refused[replica.name] = answer
        return len(refused) == 2

    poll(both_refuse, 1.0, f"replicas {sorted({'b', 'c'} - set(refused))} still served a token revoked through a",
         every=0.02)
    assert time.monotonic() - revoked_at <= 1.0
    for answer in refused.values():
        assert 'error="invalid_token"' in answer.headers["www-authenticate"]
        assert answer.json()["error"]["code"] == -32001
    assert stack.call(a.mcp, token).status_code == 401
    assert stack.call(stack.mcp, token).status_code == 401


# ---- rate limits -----------------------------------------------------------------------------------------------

def test_a_rate_limit_of_n_calls_is_n_across_the_three_replicas_not_3n(stack: Stack) -> None:
    token = stack.token(subject("quota"))
    started = time.monotonic()
    answers = [stack.call(replica.mcp, token) for _ in range(QUOTA) for replica in stack.replicas]
    answers += [stack.call(stack.mcp, token) for _ in range(3)]
    refilled = int((time.monotonic() - started) * QUOTA / 60)  # a token a 6 s: none, unless this machine crawls
    statuses = Counter(a.status_code for a in answers)
    assert QUOTA <= statuses[200] <= QUOTA + refilled and statuses[200] + statuses[429] == len(answers), statuses
    assert all(a.status_code == 200 for a in answers[:QUOTA])  # the first N, wherever they landed
    refused = answers[QUOTA]
    assert refused.json()["error"]["code"] == -32018 and int(refused.headers["retry-after"]) >= 1
    other = stack.token(subject("other"))  # a bucket per principal: another caller is not held back
    assert stack.call(stack.mcp, other).status_code == 200


# ---- role assignments and approvals ----------------------------------------------------------------------------

def test_a_role_assigned_through_one_replica_holds_on_the_others_and_its_withdrawal_too(stack: Stack) -> None:
    a, b, c = stack.replicas
    who = subject("alice")
    token = stack.token(who)
    for replica in (a, b, c):  # a tool outside the caller's roles: hidden (deny_detail: minimal)
        refused = stack.call(replica.mcp, token, "delete_file", path="/tmp/x")
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, -32602)
    assigned = stack.cli("roles", "assign", "--subject", who, "--role", "operator", "--expires", "1h",
                         "--reason", "replica test", replica=a)
    assert assigned.returncode == 0, assigned.stderr
    for replica in (b, c):
        answer = stack.call(replica.mcp, token, "delete_file", path="/tmp/x")
        assert answer.status_code == 200, (replica.name, answer.text)
    listed = stack.admin(c.url, "GET", f"/admin/roles?subject={who}", "olga", "roles:admin")
    (assignment,) = listed.json()["assignments"]
    assert assignment["role"] == "operator" and assignment["assigned_by"] == "olga"
    withdrawn = stack.admin(b.url, "DELETE", f"/admin/roles/{assignment['id']}", "olga", "roles:admin")
    assert withdrawn.status_code == 200, withdrawn.text
    for replica in (a, c):
        assert stack.call(replica.mcp, token, "delete_file", path="/tmp/x").status_code == 400


def test_an_approval_asked_through_one_replica_is_listed_decided_and_used_through_the_others(stack: Stack) -> None:
    a, b, c = stack.replicas
    token = stack.token(subject("alice"))
    asked = stack.call(a.mcp, token, "get_weather", city="Oslo")
    assert asked.status_code == 403 and asked.json()["error"]["code"] == -32014
    approval_id = asked.json()["error"]["data"]["approval_id"]
    again = stack.call(b.mcp, token, "get_weather", city="Oslo")  # the same call, through another: the same one
    assert again.json()["error"]["data"]["approval_id"] == approval_id
    listed = stack.admin(c.url, "GET", "/admin/approvals", "rita", "approvals:decide")
    pending = [x for x in listed.json()["approvals"] if x["id"] == approval_id]
    assert [(x["status"], x["tool"]) for x in pending] == [("pending", "get_weather")]
    approved = stack.cli("approvals", "approve", approval_id, "--reason", "replicas", replica=c, operator="rita")
    assert approved.returncode == 0, approved.stderr
    passed = stack.call(b.mcp, token, "get_weather", city="Oslo")
    assert passed.status_code == 200, passed.text
    once = stack.call(a.mcp, token, "get_weather", city="Oslo")  # exactly once, whichever replica is asked
    assert once.status_code == 403 and once.json()["error"]["data"]["approval_id"] != approval_id


# ---- the audit trail -------------------------------------------------------------------------------------------

# Events that record something other than a request: a tool definition first seen (pinning: warn), an approver's
# decision. Every other event is one request.
NOT_REQUESTS = ("tools/new", "tools/definition_changed", "approvals/approved", "approvals/denied",
                "approvals/expired")


def queue_depth(replica: Replica) -> float:
    text = httpx.get(f"{replica.url}/metrics", timeout=5).text
    line = next(x for x in text.splitlines() if x.startswith("mcp_gateway_audit_queue_depth "))
    return float(line.split()[1])


def test_every_request_of_the_run_is_exactly_one_row_and_audit_verify_passes_over_the_chains(stack: Stack) -> None:
    a, b, c = stack.replicas
    # some traffic of every kind, through nginx and each replica, besides what the tests before made
    reader = stack.token(subject("audited"))
    for base in (stack.mcp, a.mcp, b.mcp, c.mcp, stack.mcp, stack.mcp):
        assert stack.call(base, reader).status_code == 200
        assert stack.call(base, reader, "delete_file", path="/x").status_code == 400  # hidden from a reader
        assert stack.call(base, None).status_code == 401
        assert stack.call(base, "not.a.token").status_code == 401
        assert stack.request("POST", base, content=b"{", headers={**BASE_HEADERS, "Authorization":
                                                                  f"Bearer {reader}"}).status_code == 400

    def written() -> list[dict[str, Any]]:
        return [row for row in stack.rows_of(stack.replicas) if row["operation"] not in NOT_REQUESTS]

    poll(lambda: len(written()) >= stack.ledger.requests, 10, "the replicas never wrote an event per request")
    poll(lambda: all(queue_depth(r) == 0 for r in stack.replicas), 10, "an audit queue never emptied")
    rows = written()
    assert len(rows) == stack.ledger.requests, "not exactly one row per request"
    assert len({r["id"] for r in rows}) == len(rows)
    ids = Counter(r["request_id"] for r in rows if r["request_id"] is not None)
    assert max(ids.values()) == 1, "a JSON-RPC request recorded twice"
    assert set(ids) <= set(stack.ledger.answered), "a row for a request nobody made"
    # every JSON-RPC request that got past authentication is recorded under its own id
    assert {i for i, status in stack.ledger.answered.items() if status != 401} <= set(ids)
    assert {chain_pid(r["chain"]) for r in rows} == {r.pid for r in stack.replicas}, "a replica wrote nothing"
    done = audit_verify(stack.config)
    assert done.returncode == 0, done.stdout + done.stderr
    total = len(audit_rows(stack.table))
    assert done.stdout.strip().endswith(f"{total} events, chain intact"), done.stdout


# ---- SIGKILL ---------------------------------------------------------------------------------------------------

@dataclass
class Load:
    """Concurrent tools/call requests to one MCP endpoint, each under its own JSON-RPC id and every few under a
    new principal (the stack's rate limit counts each principal's calls)."""

    stack: Stack
    url: str
    ledger: Ledger | None = None  # where requests to the stack's three replicas are counted
    sent: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)  # a whole 200 answer received
    unanswered: list[str] = field(default_factory=list)  # the connection broke before a whole answer
    stopped: bool = False
    _token: str = ""

    def _next_token(self) -> str:
        if len(self.sent) % (QUOTA // 2) == 0:
            self._token = self.stack.token(subject("load"))
        return self._token

    async def run(self, session: aiohttp.ClientSession, workers: int, until: asyncio.Event) -> None:
        async def worker() -> None:
            while not until.is_set() and not self.stopped:
                headers, body = modern("tools/call", {"name": "echo", "arguments": {"text": "load"}})
                body["id"] = self.stack.next_id()
                headers["Authorization"] = f"Bearer {self._next_token()}"
                self.sent.append(body["id"])
                if self.ledger is not None:
                    self.ledger.requests += 1
                try:
                    async with session.post(self.url, json=body, headers={**BASE_HEADERS, **headers}) as response:
                        await response.read()
                except (aiohttp.ClientError, ConnectionError):
                    self.unanswered.append(body["id"])
                    self.stopped = True
                    continue
                if self.ledger is not None:
                    self.ledger.answered[body["id"]] = response.status
                assert response.status == 200, (response.status, await response.text())
                self.acknowledged.append(body["id"])

        await asyncio.gather(*(worker() for _ in range(workers)))


def test_a_replica_killed_under_load_lost_no_event_of_an_answer_it_gave(stack: Stack, record_property: Any) -> None:
    """A fourth replica (same config, same table) takes a load on its own port and is killed with SIGKILL
    while answering; the three keep serving a load through nginx meanwhile.

    What is guaranteed (`audit.durability: written`, the default): an answer's end goes out only once its events
    are committed, so every request the killed replica answered whole is a row; what it wrote is there once and
    its chain (cut short) verifies with the others; the other replicas lose nothing. Requests in flight at the
    kill (no whole answer) may or may not have a row: the upstream may have run them, the client cannot know."""
    victim = Replica("d", stack.config).start().wait_ready()
    victim_load, others_load = Load(stack, victim.mcp), Load(stack, stack.mcp, stack.ledger)
    load_seconds = 0.0

    async def scenario() -> None:
        nonlocal load_seconds
        done = asyncio.Event()

        async def kill_when_busy() -> None:
            nonlocal load_seconds
            started = deadline = time.monotonic()
            deadline += 30
            while len(victim_load.acknowledged) < 300:
                assert time.monotonic() < deadline, "the replica never answered the load"
                await asyncio.sleep(0.002)
            victim.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            load_seconds = time.monotonic() - started
            at_kill = len(others_load.acknowledged)  # the three go on a while after the kill
            while len(others_load.acknowledged) < at_kill + 100:
                assert time.monotonic() < deadline, "the other replicas stopped answering"
                await asyncio.sleep(0.002)
            done.set()

        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as to_victim, \
                aiohttp.ClientSession(timeout=timeout) as to_nginx:
            await asyncio.gather(victim_load.run(to_victim, 16, done), others_load.run(to_nginx, 8, done),
                                 kill_when_busy())

    try:
        asyncio.run(scenario())
        assert victim.process is not None and victim.process.wait(10) == -signal.SIGKILL
    finally:
        victim.kill()
    assert others_load.unanswered == [], "a request through nginx to the other replicas went unanswered"
    others = set(others_load.acknowledged)
    # the others lose nothing: every request they answered is one row, whichever of the three took it
    poll(lambda: others <= {r["request_id"] for r in stack.rows_of(stack.replicas)}, 10,
         "a replica that was not killed lost an event")
    every_row = audit_rows(stack.table)
    assert Counter(r["request_id"] for r in every_row if r["request_id"] in others) == Counter(others)
    # the killed one: what it wrote is there once, for requests it was sent, and its cut chain verifies
    victim_rows = [r for r in every_row if chain_pid(r["chain"]) == victim.pid]
    written = Counter(r["request_id"] for r in victim_rows)
    assert victim_rows and max(written.values()) == 1, "nothing written, or an event written twice"
    assert set(written) <= set(victim_load.sent), "a row for a request never made"
    assert all(r["result"] == "allowed" and r["status"] == 200 for r in victim_rows)
    done = audit_verify(stack.config)
    assert done.returncode == 0, done.stdout + done.stderr
    acknowledged = set(victim_load.acknowledged)
    lost = acknowledged - set(written)
    figures = {"acknowledged": len(acknowledged), "written": len(written), "acknowledged_not_written": len(lost),
               "written_not_acknowledged": len(set(written) - acknowledged),
               "in_flight_at_kill": len(victim_load.unanswered), "others_acknowledged": len(others),
               "victim_rate_per_s": round(len(acknowledged) / load_seconds)}
    for name, value in figures.items():
        record_property(name, value)
    print(f"\nSIGKILL under load, the killed replica: {figures}")
    assert not lost, f"{len(lost)} answers a client received whole have no event"
